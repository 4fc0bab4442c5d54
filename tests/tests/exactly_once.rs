//! Exactly-once state: whatever fails, the answer is as if nothing failed.
//!
//! - Nexmark q3, q5, q7 and q8 at parallelism 2, with a checkpoint every
//!   100 ms and three injected failures, print the answers of
//!   `shared/bench/answers.txt`.
//! - Per-key sequence numbers arrive exactly once (no duplicate, no loss)
//!   across repeated failures, one of them in the middle of a snapshot.
//! - A job killed with SIGKILL resumes from its latest retained checkpoint
//!   and prints the answer of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::time::Duration;

use strom_bench::nexmark::{reference_answers, Query};
use strom_tests::cli::run;
use strom_tests::support::RunningCommand;

const STROM: &str = env!("CARGO_BIN_EXE_strom-testjobs");
const DEADLINE: Duration = Duration::from_secs(120);

/// A fresh directory for one test's checkpoints.
fn scratch_directory(name: &str) -> PathBuf {
    let directory = std::env::temp_dir().join(format!("strom-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).expect("a scratch directory");
    directory
}

fn restart_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| line.starts_with("restart "))
        .collect()
}

#[test]
fn nexmark_answers_survive_three_injected_failures_at_parallelism_2() {
    let case = reference_answers()
        .expect("the reference answers")
        .into_iter()
        .find(|case| case.events == 1_000_000 && case.seed == 42)
        .expect("answers.txt has 1,000,000 events with seed 42");
    for query in [Query::Q3, Query::Q5, Query::Q7, Query::Q8] {
        let directory = scratch_directory(&format!("failures-{}", query.name()));
        let checkpoint_dir = directory.to_string_lossy().to_string();
        let arguments = [
            "local",
            "--rest-port",
            "0",
            "nexmark",
            "--query",
            query.name(),
            "--events",
            "1000000",
            "--seed",
            "42",
            "--parallelism",
            "2",
            "--checkpoint-interval",
            "100ms",
            "--checkpoint-dir",
            &checkpoint_dir,
            // Failures a few checkpoints apart, so that restarts restore
            // checkpoints, not only the start.
            "--fail-at",
            "300000,600000,850000",
            "--restart-delay",
            "20ms",
            "--events-per-second",
            "1000000",
        ];
        let finished = run(STROM, &arguments, DEADLINE);
        assert_eq!(
            finished.code,
            Some(0),
            "{}: {}",
            query.name(),
            finished.stderr
        );
        let expected = case.answer(query).expect("a reference answer").line(query);
        assert_eq!(
            finished.stdout.lines().next(),
            Some(expected.as_str()),
            "{}: {}",
            query.name(),
            finished.stderr
        );
        let restarts = restart_lines(&finished.stderr);
        assert_eq!(restarts.len(), 3, "{}: {}", query.name(), finished.stderr);
        assert!(
            restarts.iter().any(|line| line.contains("/chk-")),
            "{}: no restart restored a checkpoint: {}",
            query.name(),
            finished.stderr
        );
        let _ = std::fs::remove_dir_all(&directory);
    }
}

#[test]
fn every_sequence_number_arrives_exactly_once_across_failures_and_a_failure_during_a_snapshot() {
    let directory = scratch_directory("sequence");
    let checkpoint_dir = directory.to_string_lossy().to_string();
    let arguments = [
        "local",
        "--rest-port",
        "0",
        "sequence",
        "--keys",
        "1000",
        "--per-key",
        "2000",
        "--parallelism",
        "2",
        "--checkpoint-interval",
        "50ms",
        "--checkpoint-dir",
        &checkpoint_dir,
        "--fail-at",
        "500000,1000000,1500000",
        "--fail-in-snapshot",
        "4",
        "--restart-delay",
        "20ms",
        "--records-per-second",
        "2000000",
    ];
    let finished = run(STROM, &arguments, DEADLINE);
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    let mut report: Vec<&str> = finished.stdout.lines().collect();
    report.sort();
    assert_eq!(
        report,
        ["duplicates=0", "losses=0", "records=2000000"],
        "{}",
        finished.stderr
    );
    // Four failures; two that happen in the same attempt restart it once.
    let restarts = restart_lines(&finished.stderr);
    assert!((3..=4).contains(&restarts.len()), "{}", finished.stderr);
    assert!(
        finished
            .stderr
            .contains("injecting a failure: the sink snapshotting a checkpoint"),
        "the failure during the snapshot did not happen: {}",
        finished.stderr
    );
    let _ = std::fs::remove_dir_all(&directory);
}

/// The highest `chk-<n>` of `job_root` that has its metadata file.
fn latest_checkpoint(job_root: &Path) -> Option<PathBuf> {
    std::fs::read_dir(job_root)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let id: u64 = entry
                .file_name()
                .to_str()?
                .strip_prefix("chk-")?
                .parse()
                .ok()?;
            entry
                .path()
                .join("_metadata")
                .exists()
                .then_some((id, entry.path()))
        })
        .max_by_key(|(id, _)| *id)
        .map(|(_, path)| path)
}

#[test]
fn a_job_killed_with_sigkill_resumes_from_its_latest_retained_checkpoint() {
    let query_arguments = [
        "nexmark",
        "--query",
        "q5",
        "--events",
        "3000000",
        "--seed",
        "2026",
        "--parallelism",
        "2",
    ];
    let uninterrupted = run(
        STROM,
        &[&["local", "--rest-port", "0"][..], &query_arguments[..]].concat(),
        DEADLINE,
    );
    assert_eq!(uninterrupted.code, Some(0), "{}", uninterrupted.stderr);
    let answer = uninterrupted
        .stdout
        .lines()
        .next()
        .expect("an answer")
        .to_string();

    let directory = scratch_directory("sigkill");
    let checkpoint_dir = directory.to_string_lossy().to_string();
    let checkpointed = [
        &["local", "--rest-port", "0"][..],
        &query_arguments[..],
        &[
            "--checkpoint-interval",
            "100ms",
            "--checkpoint-dir",
            &checkpoint_dir,
            "--events-per-second",
            "2000000",
        ][..],
    ]
    .concat();
    let mut running = RunningCommand::start(STROM, &checkpointed);
    let submitted =
        running.wait_for_stderr_line("the job id", DEADLINE, |line| line.starts_with("job "));
    let job_id = submitted
        .split_whitespace()
        .nth(1)
        .expect("a job id")
        .to_string();
    // About a third of the way: the run lasts 1.5 s, a checkpoint every
    // 100 ms.
    running.wait_for_stderr_line("checkpoint 5", DEADLINE, |line| {
        line.starts_with("checkpoint 5 completed")
    });
    // Dropping it kills the process with SIGKILL.
    drop(running);

    let latest = latest_checkpoint(&directory.join(&job_id))
        .expect("the killed job's checkpoints are kept on disk");
    let latest_path = latest.to_string_lossy().to_string();
    let resumed = run(
        STROM,
        &[
            &["local", "--rest-port", "0"][..],
            &query_arguments[..],
            &["--from-savepoint", &latest_path][..],
        ]
        .concat(),
        DEADLINE,
    );
    assert_eq!(resumed.code, Some(0), "{}", resumed.stderr);
    assert!(
        resumed
            .stderr
            .contains(&format!("restoring from {latest_path}")),
        "{}",
        resumed.stderr
    );
    assert_eq!(resumed.stdout.lines().next(), Some(answer.as_str()));
    let _ = std::fs::remove_dir_all(&directory);
}

/// The lines of the committed (visible) part files of `directory`, sorted,
/// and whether any staged file was left visible.
fn committed_lines(directory: &Path) -> Vec<String> {
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(directory).expect("the output directory") {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name().to_string_lossy().to_string();
        if name.starts_with('.') {
            // Staged by a failed attempt: never committed, hidden.
            assert!(name.ends_with(".inprogress"), "unexpected file {name}");
            continue;
        }
        assert!(name.starts_with("part-"), "unexpected file {name}");
        let text = std::fs::read_to_string(entry.path()).expect("a part file");
        lines.extend(text.lines().map(str::to_string));
    }
    lines.sort();
    lines
}

#[test]
fn committed_output_files_after_failures_equal_those_of_a_fault_free_run() {
    let directory = scratch_directory("file-sink");
    let fault_free = directory.join("fault-free");
    let recovered = directory.join("recovered");
    let checkpoints = directory.join("checkpoints");
    let query = [
        "local",
        "--rest-port",
        "0",
        "nexmark",
        "--query",
        "q8",
        "--events",
        "1000000",
        "--parallelism",
        "2",
    ];
    let path = |path: &Path| path.to_string_lossy().to_string();
    let finished = run(
        STROM,
        &[&query[..], &["--output", &path(&fault_free)][..]].concat(),
        DEADLINE,
    );
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    let finished = run(
        STROM,
        &[
            &query[..],
            &[
                "--output",
                &path(&recovered),
                "--checkpoint-interval",
                "100ms",
                "--checkpoint-dir",
                &path(&checkpoints),
                "--fail-at",
                "300000,600000,850000",
                "--restart-delay",
                "20ms",
                "--events-per-second",
                "1000000",
            ][..],
        ]
        .concat(),
        DEADLINE,
    );
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_eq!(
        restart_lines(&finished.stderr).len(),
        3,
        "{}",
        finished.stderr
    );
    let expected = committed_lines(&fault_free);
    assert_eq!(
        expected.len(),
        12442,
        "q8 over 1,000,000 events has 12442 rows"
    );
    assert_eq!(committed_lines(&recovered), expected);
    let _ = std::fs::remove_dir_all(&directory);
}
