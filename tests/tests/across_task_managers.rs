//! A job whose subtasks run on two TaskManagers, their channels crossing
//! TCP (loopback) through each TaskManager's network service, prints the
//! same answers as on one TaskManager; so does one whose slots busy-poll.

use strom_bench::nexmark::{reference_answers, Query};
use strom_bench::queries::{answer_of, NEXMARK_PROGRAM};
use strom_core::program::JobOutcome;
use strom_core::JobArgs;
use strom_scheduler::{LocalCluster, LocalClusterConfig};

/// Runs `queries` at parallelism 2 on a cluster of `config` and checks
/// each answer against `answers.txt` (1,000,000 events, seed 42).
fn check_answers(config: LocalClusterConfig, queries: &[Query]) {
    let case = reference_answers()
        .expect("the reference answers")
        .into_iter()
        .find(|case| case.events == 1_000_000 && case.seed == 42)
        .expect("answers.txt has 1,000,000 events with seed 42");
    let cluster = LocalCluster::start(vec![NEXMARK_PROGRAM], config).expect("a cluster");
    for query in queries {
        let arguments: Vec<String> = [
            "--query",
            query.name(),
            "--events",
            "1000000",
            "--seed",
            "42",
        ]
        .map(String::from)
        .to_vec();
        let matches = NEXMARK_PROGRAM.parse(&arguments).expect("valid arguments");
        let mut args = JobArgs::from_matches(arguments, &matches);
        args.parallelism = 2;
        let result = cluster
            .execute(NEXMARK_PROGRAM.name, args)
            .unwrap_or_else(|error| panic!("{}: {error}", query.name()));
        assert_eq!(result.slots_used, 2);
        let outcome = JobOutcome {
            accumulators: result.accumulators,
            duration: result.duration,
            slots_used: result.slots_used,
        };
        assert_eq!(
            answer_of(&outcome).line(*query),
            case.answer(*query)
                .expect("a reference answer")
                .line(*query),
            "{}",
            query.name()
        );
    }
    cluster.shutdown();
}

#[test]
fn nexmark_answers_across_two_task_managers_of_one_slot_each() {
    check_answers(
        LocalClusterConfig {
            slot_count: 1,
            task_manager_count: 2,
            busy_poll: None,
        },
        &[Query::Q5, Query::Q8, Query::Q3],
    );
}

#[test]
fn nexmark_answers_with_busy_polling_slots() {
    // Idle slots spin instead of sleeping, and sources poll again instead
    // of setting timers: the same answers, and every job ends.
    check_answers(
        LocalClusterConfig {
            busy_poll: Some(std::time::Duration::from_millis(5)),
            ..LocalClusterConfig::slots(2)
        },
        &[Query::Q1, Query::Q5, Query::Q7],
    );
}
