//! The command line as a new user meets it: help everywhere, a plan, and a
//! one-line error with exit code 2 for every bad argument.

use std::time::Duration;

use strom_tests::cli::{run, Finished};

const STROM: &str = env!("CARGO_BIN_EXE_strom-testjobs");
const DEADLINE: Duration = Duration::from_secs(60);

fn strom(arguments: &[&str]) -> Finished {
    run(STROM, arguments, DEADLINE)
}

fn assert_usage_error(arguments: &[&str], names: &str) {
    let finished = strom(arguments);
    assert_eq!(
        finished.code,
        Some(2),
        "`strom {}` should exit 2: {finished:?}",
        arguments.join(" ")
    );
    let stderr = finished.stderr.trim_end();
    assert_eq!(
        stderr.lines().count(),
        1,
        "`strom {}` should print one line, printed {stderr:?}",
        arguments.join(" ")
    );
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(
        stderr.contains(names),
        "`strom {}`: {stderr:?} does not name {names:?}",
        arguments.join(" ")
    );
}

#[test]
fn every_command_has_help() {
    for arguments in [
        vec!["--help"],
        vec!["local", "--help"],
        vec!["local", "nexmark", "--help"],
        vec!["plan", "--help"],
        vec!["plan", "nexmark", "--help"],
        vec!["programs", "--help"],
        vec!["jobmanager", "--help"],
        vec!["taskmanager", "--help"],
        vec!["run", "--help"],
        vec!["run", "nexmark", "--help"],
    ] {
        let finished = strom(&arguments);
        assert_eq!(finished.code, Some(0), "{arguments:?}: {finished:?}");
        assert!(
            finished.stdout.contains("Usage:"),
            "{arguments:?}: {}",
            finished.stdout
        );
    }
    let help = strom(&["local", "nexmark", "--help"]).stdout;
    for option in [
        "--query",
        "--events",
        "--seed",
        "--parallelism",
        "--max-parallelism",
        "--allow-oversubscribe",
    ] {
        assert!(
            help.contains(option),
            "`local nexmark --help` lacks {option}: {help}"
        );
    }
}

#[test]
fn bad_arguments_get_a_one_line_error_and_exit_code_2() {
    assert_usage_error(&["local", "nexmark", "--query", "q4"], "q4");
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--parallelism", "0"],
        "--parallelism",
    );
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--parallelism", "200"],
        "--parallelism 200",
    );
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--parallelism", "64"],
        "--allow-oversubscribe",
    );
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--events", "ten"],
        "--events",
    );
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--seed", "-1"],
        "--seed",
    );
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--parallelism", "2x"],
        "--parallelism",
    );
    assert_usage_error(&["local", "nexmark"], "--query");
    assert_usage_error(
        &[
            "local",
            "nexmark",
            "--query",
            "q5",
            "--buffer-timeout",
            "1x",
        ],
        "--buffer-timeout",
    );
    assert_usage_error(
        &[
            "local",
            "nexmark",
            "--query",
            "q5",
            "--checkpoint-interval",
            "soon",
        ],
        "--checkpoint-interval",
    );
    assert_usage_error(
        &[
            "local",
            "nexmark",
            "--query",
            "q5",
            "--checkpoint-interval",
            "1s",
        ],
        "--checkpoint-dir",
    );
    assert_usage_error(
        &[
            "local",
            "nexmark",
            "--query",
            "q5",
            "--restart-strategy",
            "always",
        ],
        "--restart-strategy",
    );
    assert_usage_error(
        &["local", "nexmark", "--query", "q5", "--fail-at", "1,x"],
        "--fail-at",
    );
    assert_usage_error(&["local", "no-such-program"], "no-such-program");
    assert_usage_error(&["launch"], "launch");
}

#[test]
fn cluster_commands_refuse_bad_arguments_before_starting() {
    assert_usage_error(&["taskmanager", "--cores", "0,x"], "'x' is not a core");
    assert_usage_error(&["taskmanager", "--cores", "3-1"], "'3-1'");
    assert_usage_error(&["taskmanager", "--cores", "0,0"], "core 0 is listed twice");
    assert_usage_error(&["taskmanager", "--cores", "4096"], "core 4096");
    assert_usage_error(
        &["taskmanager", "--cores", "0", "--slots", "2"],
        "--allow-oversubscribe",
    );
    assert_usage_error(&["taskmanager", "--slots", "0"], "--slots");
    assert_usage_error(&["taskmanager", "--busy-poll", "always"], "--busy-poll");
    assert_usage_error(
        &["taskmanager", "--secret-file", "/no/such/secret"],
        "/no/such/secret",
    );
    assert_usage_error(
        &["jobmanager", "--secret-file", "/no/such/secret"],
        "/no/such/secret",
    );
    assert_usage_error(
        &["jobmanager", "--heartbeat-timeout", "soon"],
        "--heartbeat-timeout",
    );
    assert_usage_error(
        &["jobmanager", "--application"],
        "--application needs the program",
    );
    assert_usage_error(
        &["jobmanager", "nexmark", "--query", "q5"],
        "without --application",
    );
    assert_usage_error(
        &["run", "-m", "nowhere", "nexmark", "--query", "q5"],
        "--jobmanager 'nowhere' is not HOST:PORT",
    );
    assert_usage_error(&["run", "nexmark", "--query", "q4"], "q4");
    // A JobManager that is not there: one line, exit 1.
    let finished = strom(&["run", "-m", "127.0.0.1:1", "nexmark", "--query", "q5"]);
    assert_eq!(finished.code, Some(1), "{finished:?}");
    assert!(
        finished
            .stderr
            .contains("cannot reach the JobManager at 127.0.0.1:1"),
        "{}",
        finished.stderr
    );
}

#[test]
fn oversubscribing_runs_when_allowed() {
    let finished = strom(&[
        "local",
        "nexmark",
        "--query",
        "q5",
        "--events",
        "100000",
        "--parallelism",
        "3",
        "--allow-oversubscribe",
    ]);
    assert_eq!(finished.code, Some(0), "{finished:?}");
    assert!(
        finished
            .stdout
            .starts_with("q5 rows=9 checksum=12585502244741595627\n"),
        "{}",
        finished.stdout
    );
}

#[test]
fn plan_prints_vertices_chains_parallelism_and_partitioning() {
    let finished = strom(&["plan", "nexmark", "--query", "q5", "--parallelism", "2"]);
    assert_eq!(finished.code, Some(0), "{finished:?}");
    let plan = finished.stdout;
    assert!(plan.contains("JobGraph 'nexmark q5': 3 vertices"), "{plan}");
    // The source of bids and the local phase of the bid counts are
    // chained; the shuffles are not.
    assert!(
        plan.contains("vertex 0: Source: nexmark bids -> q5 bid counts (local) (parallelism 2"),
        "{plan}"
    );
    assert!(plan.contains("chained: q5 bid counts (local)"), "{plan}");
    assert_eq!(plan.matches(": HASH").count(), 2, "{plan}");
    assert!(
        plan.contains("vertex 2: q5 hot items -> answer sink q5 (parallelism 2"),
        "{plan}"
    );
    let q0 = strom(&["plan", "nexmark", "--query", "q0"]).stdout;
    assert!(q0.contains("1 vertices"), "q0 is one chain: {q0}");
}
