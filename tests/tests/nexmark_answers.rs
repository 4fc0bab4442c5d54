//! Every Nexmark query prints exactly the reference answer of
//! `shared/bench/answers.txt`, for every `(events, seed)` there, at
//! parallelism 1 and 2, through the command line as a user runs it.

use std::time::Duration;

use strom_bench::nexmark::{reference_answers, Query};
use strom_tests::cli::run;

const STROM: &str = env!("CARGO_BIN_EXE_strom-testjobs");
const DEADLINE: Duration = Duration::from_secs(120);

fn answer_line(query: Query, events: u64, seed: u64, parallelism: u32) -> String {
    let (events, seed, parallelism) = (
        events.to_string(),
        seed.to_string(),
        parallelism.to_string(),
    );
    let arguments = [
        "local",
        "nexmark",
        "--query",
        query.name(),
        "--events",
        &events,
        "--seed",
        &seed,
        "--parallelism",
        &parallelism,
    ];
    let finished = run(STROM, &arguments, DEADLINE);
    assert_eq!(
        finished.code,
        Some(0),
        "strom {} failed: {}",
        arguments.join(" "),
        finished.stderr
    );
    let mut lines = finished.stdout.lines();
    let answer = lines.next().unwrap_or_default().to_string();
    let throughput = lines.next().unwrap_or_default();
    assert!(
        throughput.starts_with("throughput: "),
        "no throughput line after the answer: {:?}",
        finished.stdout
    );
    answer
}

fn check_every_query_at(parallelism: u32, small_cases_only: bool) {
    let cases = reference_answers().expect("the reference answers");
    assert!(!cases.is_empty());
    for case in cases {
        if small_cases_only && case.events > 200_000 {
            continue;
        }
        for query in Query::ALL {
            let expected = case
                .answer(query)
                .expect("every query has a reference answer")
                .line(query);
            let printed = answer_line(query, case.events, case.seed, parallelism);
            assert_eq!(
                printed,
                expected,
                "{} over {} events (seed {}) at parallelism {parallelism}",
                query.name(),
                case.events,
                case.seed
            );
        }
    }
}

#[test]
fn every_query_prints_the_reference_answer_at_parallelism_1() {
    check_every_query_at(1, cfg!(debug_assertions));
}

#[test]
fn every_query_prints_the_reference_answer_at_parallelism_2() {
    check_every_query_at(2, cfg!(debug_assertions));
}

/// At an input that no table holds, parallelism 1 and 2 agree.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "3,000,000 events per query: run with --release"
)]
fn parallelism_1_and_2_agree_beyond_the_reference_table() {
    for query in Query::ALL {
        let single = answer_line(query, 3_000_000, 2026, 1);
        let double = answer_line(query, 3_000_000, 2026, 2);
        assert_eq!(
            single,
            double,
            "{} over 3,000,000 events, seed 2026",
            query.name()
        );
        let baseline = strom_bench::nexmark::run_baseline(
            query,
            strom_bench::nexmark::GeneratorConfig {
                events: 3_000_000,
                seed: 2026,
            },
        );
        assert_eq!(
            single,
            baseline.line(query),
            "{} against the hand-written baseline",
            query.name()
        );
    }
}
