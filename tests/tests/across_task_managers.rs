//! A job whose subtasks run on two TaskManagers, their channels crossing
//! TCP (loopback) through each TaskManager's network service, prints the
//! same answers as on one TaskManager.

use strom_bench::nexmark::{reference_answers, Query};
use strom_bench::queries::{answer_of, NEXMARK_PROGRAM};
use strom_core::program::JobOutcome;
use strom_core::JobArgs;
use strom_scheduler::{LocalCluster, LocalClusterConfig};

#[test]
fn nexmark_answers_across_two_task_managers_of_one_slot_each() {
    let case = reference_answers()
        .expect("the reference answers")
        .into_iter()
        .find(|case| case.events == 1_000_000 && case.seed == 42)
        .expect("answers.txt has 1,000,000 events with seed 42");
    let cluster = LocalCluster::start(
        vec![NEXMARK_PROGRAM],
        LocalClusterConfig {
            slot_count: 1,
            task_manager_count: 2,
            busy_poll: None,
        },
    )
    .expect("two TaskManagers");
    for query in [Query::Q5, Query::Q8, Query::Q3] {
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
            answer_of(&outcome).line(query),
            case.answer(query).expect("a reference answer").line(query),
            "{}",
            query.name()
        );
    }
    cluster.shutdown();
}
