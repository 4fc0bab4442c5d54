//! A failing user function fails the job with a message naming the operator
//! and subtask, and the process exits non-zero without hanging; an invalid
//! job is refused before anything runs.

use std::sync::atomic::Ordering;
use std::time::Duration;

use strom_core::JobArgs;
use strom_scheduler::{LocalCluster, LocalClusterConfig};
use strom_tests::cli::run;
use strom_tests::programs::{test_programs, INVALID_JOB_RECORDS_GENERATED};

const STROM: &str = env!("CARGO_BIN_EXE_strom-testjobs");
const DEADLINE: Duration = Duration::from_secs(60);

#[test]
fn a_panicking_user_function_fails_the_job_naming_operator_and_subtask() {
    for operator in ["map", "keyed", "sink"] {
        for parallelism in ["1", "2"] {
            let arguments = [
                "local",
                "panicking",
                "--operator",
                operator,
                "--parallelism",
                parallelism,
            ];
            let finished = run(STROM, &arguments, DEADLINE);
            assert_eq!(finished.code, Some(1), "{arguments:?}: {finished:?}");
            let last_line = finished
                .stderr
                .trim_end()
                .lines()
                .last()
                .unwrap_or_default();
            assert!(
                last_line
                    .starts_with("error: job 'panicking' failed: operator 'explode' (subtask ")
                    && last_line
                        .ends_with(&format!("/{parallelism}) panicked: boom at record 50000")),
                "{arguments:?}: {last_line:?}"
            );
            assert!(
                finished.stdout.is_empty(),
                "a failed job prints no result: {:?}",
                finished.stdout
            );
        }
    }
}

#[test]
fn invalid_jobs_are_refused_before_they_run() {
    let cases = [
        (vec!["local", "cycle"], "invalid job: the operators form a cycle: increment -> merge -> increment"),
        (
            vec!["local", "over-max-parallelism"],
            "invalid job: operator 'double' has parallelism 129, which must be between 1 and the max parallelism 128",
        ),
        (vec!["plan", "cycle"], "the operators form a cycle"),
    ];
    for (arguments, message) in cases {
        let finished = run(STROM, &arguments, DEADLINE);
        assert_eq!(finished.code, Some(1), "{arguments:?}: {finished:?}");
        assert!(
            finished.stderr.contains(message),
            "{arguments:?}: {}",
            finished.stderr
        );
    }
}

#[test]
fn the_job_manager_refuses_an_invalid_job_without_running_any_of_it() {
    let cluster = LocalCluster::start(test_programs(), LocalClusterConfig::slots(1))
        .expect("a local cluster");
    let args = JobArgs::new(Vec::new(), 1);
    for program in ["cycle", "over-max-parallelism"] {
        let error = cluster
            .execute(program, args.clone())
            .expect_err("an invalid job is refused");
        assert!(error.starts_with("invalid job: "), "{error}");
    }
    let too_wide = JobArgs::new(Vec::new(), 200);
    let error = cluster
        .execute("count", too_wide)
        .expect_err("parallelism above max parallelism is refused");
    assert!(error.contains("parallelism 200"), "{error}");
    let needs_more_slots = JobArgs::new(Vec::new(), 2);
    let error = cluster
        .execute("count", needs_more_slots)
        .expect_err("a job needing 2 slots on 1 is refused");
    assert!(error.contains("not enough slots"), "{error}");
    assert_eq!(
        INVALID_JOB_RECORDS_GENERATED.load(Ordering::Relaxed),
        0,
        "a refused job generated records"
    );
    // The cluster is still usable afterwards.
    let result = cluster.execute("count", args).expect("a valid job runs");
    assert_eq!(result.accumulators.get("records"), Some(1000));
    cluster.shutdown();
}

/// A key type without a stable hash does not compile: the earliest refusal.
#[test]
fn a_key_type_without_a_stable_hash_is_refused_at_compile_time() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("ui/key_by_*.rs");
}
