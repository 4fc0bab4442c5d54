//! Savepoints as a Flink user meets them through the command line: a job
//! stopped with a savepoint resumes, at another parallelism, with the answer
//! of an uninterrupted run; a savepoint taken while the job runs leaves it
//! running; a damaged savepoint is refused with a one-line error naming the
//! damaged file, and `strom checkpoint inspect` finds the same damage; a
//! savepoint whose operators the job lacks, or whose max parallelism differs,
//! is refused unless the user allows it.

use std::path::Path;
use std::time::Duration;

use strom_bench::nexmark::{reference_answers, Query};
use strom_tests::cli::{run, Finished};
use strom_tests::support::{
    copy_snapshot, file_name, flip_a_bit_in_the_middle, largest_state_file, path_text,
    truncate_to_half, RunningCommand, TempDir,
};

const STROM: &str = env!("CARGO_BIN_EXE_strom-testjobs");
/// How long any one command may run before the test calls it a hang.
const DEADLINE: Duration = Duration::from_secs(60);
/// How long to wait for a line a running job prints early on.
const LINE_DEADLINE: Duration = Duration::from_secs(30);
/// Every run reads the same input, so every uninterrupted q5 run prints the
/// reference answer for it.
const EVENTS: &str = "1000000";
const SEED: &str = "42";
/// Slows the generator so that the 1,000,000 events take about a second:
/// long enough to act on the job while it runs.
const EVENTS_PER_SECOND: &str = "1000000";

fn strom(arguments: &[&str]) -> Finished {
    run(STROM, arguments, DEADLINE)
}

/// The `answers.txt` line for q5 over 1,000,000 events with seed 42.
fn q5_reference_answer() -> String {
    reference_answer(Query::Q5)
}

/// `query`'s reference answer line for the shared input.
fn reference_answer(query: Query) -> String {
    let case = reference_answers()
        .expect("the reference answers")
        .into_iter()
        .find(|case| case.events == 1_000_000 && case.seed == 42)
        .expect("answers.txt has events=1000000 seed=42");
    case.answer(query)
        .expect("an answer for events=1000000 seed=42")
        .line(query)
}

/// The lines of `stdout` that are a Nexmark answer (`<query> rows=...`).
fn answer_lines(stdout: &str) -> Vec<&str> {
    stdout
        .lines()
        .filter(|line| line.contains(" rows=") && line.contains(" checksum="))
        .collect()
}

/// A q5 job running, rate limited, with checkpoints, whose REST API the test
/// can reach.
struct RunningJob {
    command: RunningCommand,
    rest_address: String,
    job_id: String,
}

/// Starts q5 over the shared input at `parallelism` (plus `extra`
/// arguments), rate limited and checkpointing into `checkpoint_dir`, and
/// returns once it has completed its first checkpoint: it is under way.
fn start_rate_limited_q5(parallelism: &str, extra: &[&str], checkpoint_dir: &str) -> RunningJob {
    start_rate_limited("q5", parallelism, extra, checkpoint_dir)
}

/// As [`start_rate_limited_q5`], for `query`.
fn start_rate_limited(
    query: &str,
    parallelism: &str,
    extra: &[&str],
    checkpoint_dir: &str,
) -> RunningJob {
    let mut arguments = vec![
        "local",
        "--rest-port",
        "0",
        "nexmark",
        "--query",
        query,
        "--events",
        EVENTS,
        "--seed",
        SEED,
        "--parallelism",
        parallelism,
        "--events-per-second",
        EVENTS_PER_SECOND,
        "--checkpoint-interval",
        "100ms",
        "--checkpoint-dir",
        checkpoint_dir,
    ];
    arguments.extend_from_slice(extra);
    let mut command = RunningCommand::start(STROM, &arguments);
    let rest_line = command.wait_for_stderr_line("REST API line", LINE_DEADLINE, |line| {
        line.starts_with("REST API at http://")
    });
    let rest_address = rest_line["REST API at http://".len()..]
        .trim_end_matches('/')
        .to_string();
    let job_line = command.wait_for_stderr_line("job submitted line", LINE_DEADLINE, |line| {
        line.starts_with("job ") && line.ends_with(" submitted")
    });
    let job_id = job_line
        .split_whitespace()
        .nth(1)
        .expect("a job id after `job`")
        .to_string();
    assert!(
        job_id.len() == 32 && job_id.chars().all(|digit| digit.is_ascii_hexdigit()),
        "a job id is 32 hex digits: {job_line:?}"
    );
    command.wait_for_stderr_line("first completed checkpoint", LINE_DEADLINE, |line| {
        line.starts_with("checkpoint ") && line.contains(" completed")
    });
    RunningJob {
        command,
        rest_address,
        job_id,
    }
}

/// The path a client command printed as `Savepoint completed. Path: <path>`.
fn savepoint_path_printed(client: &Finished, command: &str) -> String {
    assert_eq!(client.code, Some(0), "`strom {command}` failed: {client:?}");
    client
        .stdout
        .lines()
        .find_map(|line| line.strip_prefix("Savepoint completed. Path: "))
        .unwrap_or_else(|| panic!("`strom {command}` printed no savepoint path: {client:?}"))
        .trim()
        .to_string()
}

/// Stops a running q5 job with a savepoint under `savepoint_dir`, checks
/// that the job reports the stop and printed no answer, and returns the
/// savepoint's path.
fn stop_with_savepoint(job: RunningJob, savepoint_dir: &str) -> String {
    let client = strom(&[
        "stop",
        "-m",
        &job.rest_address,
        &job.job_id,
        "--savepoint-path",
        savepoint_dir,
    ]);
    let savepoint = savepoint_path_printed(&client, "stop");
    assert!(
        savepoint.starts_with(savepoint_dir),
        "the savepoint {savepoint} is not under {savepoint_dir}"
    );
    let stopped = job.command.finish(DEADLINE);
    assert_eq!(
        stopped.code,
        Some(0),
        "a job stopped with a savepoint exits 0: {stopped:?}"
    );
    assert!(
        stopped.stdout.contains(&format!(
            "job {} stopped with savepoint {savepoint}",
            job.job_id
        )),
        "the stopped job does not report its savepoint {savepoint}: {stopped:?}"
    );
    assert!(
        answer_lines(&stopped.stdout).is_empty(),
        "a job stopped half way prints no answer: {:?}",
        stopped.stdout
    );
    assert!(
        Path::new(&savepoint).join("_metadata").is_file(),
        "the savepoint {savepoint} has no _metadata"
    );
    savepoint
}

/// Runs `strom local nexmark --query <query> ... --from-savepoint <savepoint>`
/// at `parallelism`, without a rate limit, plus `extra` arguments.
fn restore(query: &str, parallelism: &str, savepoint: &str, extra: &[&str]) -> Finished {
    let mut arguments = vec![
        "local",
        "--rest-port",
        "0",
        "nexmark",
        "--query",
        query,
        "--events",
        EVENTS,
        "--seed",
        SEED,
        "--parallelism",
        parallelism,
        "--from-savepoint",
        savepoint,
    ];
    arguments.extend_from_slice(extra);
    strom(&arguments)
}

/// Asserts that a run from `savepoint` said it restored from it and ended
/// with the q5 reference answer. A run that ignored the savepoint and read
/// the input from the start would print the same answer, hence the first
/// check; the damage tests show that the state files are read.
fn assert_resumes_with_the_reference_answer(finished: &Finished, savepoint: &str, what: &str) {
    assert!(
        finished
            .stderr
            .contains(&format!("restoring from {savepoint}")),
        "{what} does not say it restores from {savepoint}: {finished:?}"
    );
    assert_prints_the_reference_answer(finished, what);
}

/// Asserts a run ended with the q5 reference answer as its first line.
fn assert_prints_the_reference_answer(finished: &Finished, what: &str) {
    assert_eq!(finished.code, Some(0), "{what}: {finished:?}");
    assert_eq!(
        finished.stdout.lines().next().unwrap_or_default(),
        q5_reference_answer(),
        "{what} does not print the uninterrupted answer: {finished:?}"
    );
}

/// Asserts a restore was refused: a nonzero exit, no answer, and a last
/// stderr line `error: ...` (the only one) that contains every one of
/// `names`. Returns that line.
fn assert_refused(finished: &Finished, what: &str, names: &[&str]) -> String {
    assert_ne!(finished.code, Some(0), "{what} must fail: {finished:?}");
    assert!(
        finished.code.is_some(),
        "{what} must exit, not die of a signal: {finished:?}"
    );
    assert!(
        answer_lines(&finished.stdout).is_empty(),
        "{what} must print no answer: {:?}",
        finished.stdout
    );
    let error_lines: Vec<&str> = finished
        .stderr
        .lines()
        .filter(|line| line.starts_with("error: "))
        .collect();
    assert_eq!(
        error_lines.len(),
        1,
        "{what} must print one `error: ` line: {:?}",
        finished.stderr
    );
    let error = error_lines[0];
    assert_eq!(
        finished.stderr.trim_end().lines().last(),
        Some(error),
        "{what}: the error is the last thing printed: {:?}",
        finished.stderr
    );
    for name in names {
        assert!(
            error.contains(name),
            "{what}: {error:?} does not mention {name:?}"
        );
    }
    error.to_string()
}

/// Makes an intact q5 savepoint (taken at parallelism 2 about a tenth of the
/// way through) inside `scratch`, and checks that `strom checkpoint inspect`
/// finds it intact.
fn intact_q5_savepoint(scratch: &TempDir) -> String {
    let job = start_rate_limited_q5("2", &[], &scratch.join("checkpoints"));
    let savepoint = stop_with_savepoint(job, &scratch.join("savepoints"));
    let inspected = strom(&["checkpoint", "inspect", &savepoint]);
    assert_eq!(
        inspected.code,
        Some(0),
        "an intact savepoint inspects clean: {inspected:?}"
    );
    for expected in [
        "Source: nexmark",
        "q5 bid counts",
        "key groups",
        // Flink's key group ranges for max parallelism 128 at parallelism 2.
        "0-63 (64)",
        "64-127 (64)",
        "intact",
    ] {
        assert!(
            inspected.stdout.contains(expected),
            "`strom checkpoint inspect` of an intact savepoint lacks {expected:?}:\n{}",
            inspected.stdout
        );
    }
    savepoint
}

#[test]
fn q5_stopped_with_a_savepoint_resumes_at_another_parallelism_with_the_uninterrupted_answer() {
    // One case at a time: the machine has two cores.
    for (from, to) in [("1", "2"), ("2", "1"), ("2", "3")] {
        let scratch = TempDir::new("savepoint-rescale");
        let job = start_rate_limited_q5(from, &[], &scratch.join("checkpoints"));
        let savepoint = stop_with_savepoint(job, &scratch.join("savepoints"));
        let extra: &[&str] = if to == "3" {
            &["--allow-oversubscribe"]
        } else {
            &[]
        };
        let resumed = restore("q5", to, &savepoint, extra);
        assert_resumes_with_the_reference_answer(
            &resumed,
            &savepoint,
            &format!("q5 stopped at parallelism {from} and resumed at {to}"),
        );
    }
}

#[test]
fn joins_stopped_with_a_savepoint_resume_at_another_parallelism_with_the_uninterrupted_answer() {
    // The window join's state (q8): each key's records per window, spread
    // over the windows of the subtasks that own its key group after the
    // change; the connected keyed process's (q3): keyed state. At
    // parallelism 1 the join is chained behind the split of its one
    // source (a junction of its two inputs, snapshotted once), at more it
    // heads a task of its own: each is restored into the other.
    for (query, from, to) in [
        (Query::Q8, "2", "3"),
        (Query::Q8, "1", "2"),
        (Query::Q3, "1", "2"),
    ] {
        let name = query.name();
        let scratch = TempDir::new(&format!("savepoint-rescale-{name}-{from}-{to}"));
        let job = start_rate_limited(name, from, &[], &scratch.join("checkpoints"));
        let savepoint = stop_with_savepoint(job, &scratch.join("savepoints"));
        let resumed = restore(name, to, &savepoint, &["--allow-oversubscribe"]);
        assert!(
            resumed
                .stderr
                .contains(&format!("restoring from {savepoint}")),
            "{name} does not say it restores from {savepoint}: {resumed:?}"
        );
        assert_eq!(resumed.code, Some(0), "{resumed:?}");
        assert_eq!(
            resumed.stdout.lines().next().unwrap_or_default(),
            reference_answer(query),
            "{name} stopped at parallelism {from} and resumed at {to} does not print the uninterrupted answer: {resumed:?}"
        );
    }
}

#[test]
fn a_savepoint_taken_while_the_job_runs_restores_and_the_job_goes_on() {
    let scratch = TempDir::new("savepoint-running");
    let mut job = start_rate_limited_q5("2", &[], &scratch.join("checkpoints"));
    let savepoint_dir = scratch.join("savepoints");
    let client = strom(&[
        "savepoint",
        "-m",
        &job.rest_address,
        &job.job_id,
        &savepoint_dir,
    ]);
    let savepoint = savepoint_path_printed(&client, "savepoint");
    assert!(
        savepoint.starts_with(&savepoint_dir),
        "the savepoint {savepoint} is not under {savepoint_dir}"
    );
    job.command
        .wait_for_stderr_line("savepoint completed line", LINE_DEADLINE, |line| {
            line.starts_with("savepoint ") && line.ends_with(&format!(": {savepoint}"))
        });
    // The job was not stopped: it runs to the end with the whole answer.
    let went_on = job.command.finish(DEADLINE);
    assert_prints_the_reference_answer(&went_on, "the job that a savepoint was taken of");
    assert!(
        !went_on.stdout.contains("stopped with savepoint"),
        "a savepoint alone does not stop the job: {went_on:?}"
    );
    assert!(Path::new(&savepoint).join("_metadata").is_file());
    let resumed = restore("q5", "2", &savepoint, &[]);
    assert_resumes_with_the_reference_answer(
        &resumed,
        &savepoint,
        "q5 resumed from a savepoint of a running job",
    );
}

/// How a test damages its copy of a savepoint; returns the damaged file.
type Damage = fn(&Path) -> std::path::PathBuf;

/// Damages a copy of an intact savepoint with `damage`, then checks that a
/// restore from it is refused with an error naming the damaged file and one
/// of `what_is_wrong`, and that `strom checkpoint inspect` exits 1 naming it.
fn check_damage_is_detected(label: &str, damage: Damage, what_is_wrong: &[&str]) {
    let scratch = TempDir::new(label);
    let intact = intact_q5_savepoint(&scratch);
    let copy = scratch.path().join("damaged-copy");
    copy_snapshot(Path::new(&intact), &copy);
    let damaged_file = damage(&copy);
    let damaged_name = file_name(&damaged_file);
    let copy = path_text(&copy);

    let restored = restore("q5", "2", &copy, &[]);
    let error = assert_refused(
        &restored,
        &format!("restoring a savepoint with {label}"),
        &[&damaged_name],
    );
    assert!(
        what_is_wrong.iter().any(|words| error.contains(words)),
        "restoring a savepoint with {label}: {error:?} says none of {what_is_wrong:?}"
    );

    let inspected = strom(&["checkpoint", "inspect", &copy]);
    assert_eq!(
        inspected.code,
        Some(1),
        "`strom checkpoint inspect` of a savepoint with {label} exits 1: {inspected:?}"
    );
    let report = format!("{}{}", inspected.stdout, inspected.stderr);
    assert!(
        report.contains(&damaged_name),
        "`strom checkpoint inspect` of a savepoint with {label} does not name {damaged_name}:\n{report}"
    );
    assert!(
        what_is_wrong.iter().any(|words| report.contains(words)),
        "`strom checkpoint inspect` of a savepoint with {label} says none of {what_is_wrong:?}:\n{report}"
    );
}

#[test]
fn a_flipped_bit_in_a_state_file_is_detected_and_named() {
    check_damage_is_detected(
        "flipped-bit-in-state",
        |snapshot| {
            let file = largest_state_file(snapshot);
            flip_a_bit_in_the_middle(&file);
            file
        },
        &["checksum"],
    );
}

#[test]
fn a_truncated_state_file_is_detected_and_named() {
    check_damage_is_detected(
        "truncated-state",
        |snapshot| {
            let file = largest_state_file(snapshot);
            truncate_to_half(&file);
            file
        },
        &["truncated"],
    );
}

#[test]
fn a_missing_state_file_is_detected_and_named() {
    check_damage_is_detected(
        "missing-state",
        |snapshot| {
            let file = largest_state_file(snapshot);
            std::fs::remove_file(&file).expect("removing a state file");
            file
        },
        &["missing", "not found", "No such file"],
    );
}

#[test]
fn a_missing_metadata_file_is_detected_and_named() {
    check_damage_is_detected(
        "missing-metadata",
        |snapshot| {
            let file = snapshot.join("_metadata");
            std::fs::remove_file(&file).expect("removing _metadata");
            file
        },
        &["missing", "no metadata file", "not found", "No such file"],
    );
}

#[test]
fn a_flipped_bit_in_the_metadata_is_detected_and_named() {
    check_damage_is_detected(
        "flipped-bit-in-metadata",
        |snapshot| {
            let file = snapshot.join("_metadata");
            flip_a_bit_in_the_middle(&file);
            file
        },
        &["checksum"],
    );
}

#[test]
fn a_savepoint_with_unmatched_operators_is_refused_unless_allowed() {
    let scratch = TempDir::new("savepoint-unmatched");
    let savepoint = intact_q5_savepoint(&scratch);
    let refused = restore("q8", "2", &savepoint, &[]);
    assert_refused(
        &refused,
        "restoring a q5 savepoint into q8",
        &["--allow-non-restored-state"],
    );
    let allowed = restore("q8", "2", &savepoint, &["--allow-non-restored-state"]);
    assert_eq!(
        allowed.code,
        Some(0),
        "with --allow-non-restored-state, q8 runs from a q5 savepoint: {allowed:?}"
    );
    // The answer depends on what state q8 got back, so only its shape is
    // checked.
    assert!(
        allowed.stdout.starts_with("q8 rows="),
        "q8 runs to the end and prints its answer: {allowed:?}"
    );
}

#[test]
fn a_savepoint_cannot_change_the_max_parallelism() {
    let scratch = TempDir::new("savepoint-max-parallelism");
    let savepoint = intact_q5_savepoint(&scratch);
    let refused = restore("q5", "2", &savepoint, &["--max-parallelism", "64"]);
    let error = assert_refused(
        &refused,
        "restoring a savepoint of max parallelism 128 at 64",
        &[],
    );
    assert!(
        error.contains("max parallelism") || error.contains("--max-parallelism"),
        "the refusal does not mention max parallelism: {error:?}"
    );
}
