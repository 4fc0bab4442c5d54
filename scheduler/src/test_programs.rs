//! A small job program for the scheduler's unit tests.

use strom_core::program::report_accumulators;
use strom_core::source::GeneratorSource;
use strom_core::{Program, StreamExecutionEnvironment, WatermarkStrategy};

fn build_numbers(env: &StreamExecutionEnvironment, _: &clap::ArgMatches) -> Result<(), String> {
    env.from_source(
        GeneratorSource::bounded(10, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    )
    .rebalance()
    .map(|value| value + 1)
    .name("increment");
    Ok(())
}

pub const NUMBERS: Program = Program {
    name: "numbers",
    about: "ten numbers",
    command: || clap::Command::new("numbers"),
    build: build_numbers,
    report: report_accumulators,
};
