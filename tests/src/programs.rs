//! Job programs that the end-to-end tests run: jobs that fail on purpose
//! and jobs that are invalid on purpose.

use std::sync::atomic::{AtomicU64, Ordering};

use clap::{Arg, ArgMatches, Command};
use strom_core::function::{Collector, KeyedContext, KeyedProcessFunction, SinkFunction};
use strom_core::operator::OperatorContext;
use strom_core::program::{report_accumulators, Program};
use strom_core::source::GeneratorSource;
use strom_core::{StreamExecutionEnvironment, Timestamp, WatermarkStrategy};

/// How many records the sources of the invalid programs generated: stays 0
/// when a job is refused before it runs.
pub static INVALID_JOB_RECORDS_GENERATED: AtomicU64 = AtomicU64::new(0);

/// Every test program.
pub fn test_programs() -> Vec<Program> {
    vec![
        PANICKING_PROGRAM,
        CYCLE_PROGRAM,
        OVER_MAX_PARALLELISM_PROGRAM,
        COUNT_PROGRAM,
        crate::sequence::SEQUENCE_PROGRAM,
    ]
}

fn panicking_command() -> Command {
    Command::new("panicking")
        .arg(Arg::new("records").long("records").default_value("100000").value_parser(clap::value_parser!(u64)))
        .arg(Arg::new("panic-at").long("panic-at").default_value("50000").value_parser(clap::value_parser!(u64)))
        .arg(
            Arg::new("operator")
                .long("operator")
                .default_value("map")
                .value_parser(["map", "keyed", "sink"])
                .help("Where the user function panics: a chained map, a keyed process function after a shuffle, or the sink"),
        )
}

#[derive(Clone)]
struct PanicAt {
    index: u64,
}

impl KeyedProcessFunction<u64, u64, u64> for PanicAt {
    fn process_element(
        &mut self,
        value: u64,
        _context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<u64>,
    ) {
        assert!(value != self.index, "boom at record {value}");
        out.collect(value);
    }
}

#[derive(Clone)]
struct CountingSink {
    count: u64,
    panic_at: Option<u64>,
}

impl SinkFunction<u64> for CountingSink {
    fn invoke(&mut self, value: u64, _timestamp: Timestamp) {
        if Some(value) == self.panic_at {
            panic!("boom at record {value}");
        }
        self.count += 1;
    }

    fn finish(&mut self, context: &OperatorContext) {
        context.accumulators.borrow_mut().add("records", self.count);
    }
}

fn build_panicking(env: &StreamExecutionEnvironment, matches: &ArgMatches) -> Result<(), String> {
    let records = *matches.get_one::<u64>("records").expect("default");
    let panic_at = *matches.get_one::<u64>("panic-at").expect("default");
    let operator = matches
        .get_one::<String>("operator")
        .expect("default")
        .clone();
    let numbers = env.from_source(
        GeneratorSource::bounded(records, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    );
    let sink = CountingSink {
        count: 0,
        panic_at: (operator == "sink").then_some(panic_at),
    };
    match operator.as_str() {
        "map" => {
            numbers
                .map(move |value| {
                    assert!(value != panic_at, "boom at record {value}");
                    value
                })
                .name("explode")
                .rebalance()
                .add_sink(sink)
                .name("count");
        }
        "keyed" => {
            numbers
                .key_by(|value| *value)
                .process(PanicAt { index: panic_at })
                .name("explode")
                .add_sink(sink)
                .name("count");
        }
        _ => {
            numbers.rebalance().add_sink(sink).name("explode");
        }
    }
    Ok(())
}

/// A job whose user function panics at one record.
pub const PANICKING_PROGRAM: Program = Program {
    name: "panicking",
    about: "Counts numbers, but a user function panics at one of them",
    command: panicking_command,
    build: build_panicking,
    report: report_accumulators,
};

fn counted_numbers(env: &StreamExecutionEnvironment) -> strom_core::DataStream<u64> {
    env.from_source(
        GeneratorSource::bounded(1000, |index| {
            INVALID_JOB_RECORDS_GENERATED.fetch_add(1, Ordering::Relaxed);
            index
        }),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    )
}

fn no_arguments(name: &'static str) -> Command {
    Command::new(name)
}

fn build_cycle(env: &StreamExecutionEnvironment, _matches: &ArgMatches) -> Result<(), String> {
    let numbers = counted_numbers(env);
    let merged = numbers.clone().union(Vec::new()).name("merge");
    let incremented = merged.clone().map(|value| value + 1).name("increment");
    // Feed "increment" back into "merge": a cycle the DataStream API cannot
    // make, built with the low-level graph API.
    env.add_edge(incremented.node_id(), merged.node_id(), 0);
    incremented
        .add_sink(CountingSink {
            count: 0,
            panic_at: None,
        })
        .name("count");
    Ok(())
}

/// An invalid job: its operators form a cycle.
pub const CYCLE_PROGRAM: Program = Program {
    name: "cycle",
    about: "An invalid job whose operators form a cycle",
    command: || no_arguments("cycle"),
    build: build_cycle,
    report: report_accumulators,
};

fn build_over_max_parallelism(
    env: &StreamExecutionEnvironment,
    _matches: &ArgMatches,
) -> Result<(), String> {
    counted_numbers(env)
        .map(|value| value * 2)
        .name("double")
        .set_parallelism(env.max_parallelism() + 1)
        .add_sink(CountingSink {
            count: 0,
            panic_at: None,
        })
        .name("count");
    Ok(())
}

/// An invalid job: one operator's parallelism is above the max parallelism.
pub const OVER_MAX_PARALLELISM_PROGRAM: Program = Program {
    name: "over-max-parallelism",
    about: "An invalid job with an operator above the max parallelism",
    command: || no_arguments("over-max-parallelism"),
    build: build_over_max_parallelism,
    report: report_accumulators,
};

fn build_count(env: &StreamExecutionEnvironment, _matches: &ArgMatches) -> Result<(), String> {
    counted_numbers(env)
        .rebalance()
        .add_sink(CountingSink {
            count: 0,
            panic_at: None,
        })
        .name("count");
    Ok(())
}

/// A valid job over the same source as the invalid ones.
pub const COUNT_PROGRAM: Program = Program {
    name: "count",
    about: "Counts 1000 numbers",
    command: || no_arguments("count"),
    build: build_count,
    report: report_accumulators,
};
