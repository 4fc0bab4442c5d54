//! `strom-bench`: benchmark harnesses that print figures and ratios.
//!
//! `strom-bench throughput` runs every Nexmark query on the engine at
//! parallelism 1 and 2 and, in the same invocation, the hand-written
//! single-threaded baseline of the same query, so that the ratio between
//! them holds on a shared, noisy machine.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use strom_bench::nexmark::{run_baseline, Answer, GeneratorConfig, Query};
use strom_bench::queries::{answer_of, NEXMARK_PROGRAM};
use strom_core::program::JobOutcome;
use strom_core::JobArgs;
use strom_scheduler::{LocalCluster, LocalClusterConfig};

#[derive(Parser)]
#[command(name = "strom-bench", about = "Strom's benchmark harnesses", version)]
struct Arguments {
    #[command(subcommand)]
    harness: Harness,
}

#[derive(Subcommand)]
enum Harness {
    /// Throughput of every Nexmark query on the engine at parallelism 1 and
    /// 2, beside the hand-written single-threaded baseline.
    Throughput {
        /// Events per run.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Queries to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "q0,q1,q2,q3,q5,q7,q8")]
        queries: Vec<Query>,
        /// Parallelisms to run the engine at, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        parallelisms: Vec<u32>,
        /// Runs of each measurement; the fastest counts.
        #[arg(long, default_value_t = 3)]
        repetitions: u32,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

struct Measurement {
    query: Query,
    /// `None` for the baseline.
    parallelism: Option<u32>,
    answer: Answer,
    duration: Duration,
}

fn run_engine(
    query: Query,
    config: GeneratorConfig,
    parallelism: u32,
) -> anyhow::Result<(Answer, Duration)> {
    let cluster = LocalCluster::start(
        vec![NEXMARK_PROGRAM],
        LocalClusterConfig {
            slot_count: parallelism,
        },
    )
    .map_err(anyhow::Error::msg)?;
    let arguments = [
        "--query",
        query.name(),
        "--events",
        &config.events.to_string(),
        "--seed",
        &config.seed.to_string(),
    ]
    .map(String::from)
    .to_vec();
    let args = JobArgs::new(arguments, parallelism);
    let result = cluster
        .execute(NEXMARK_PROGRAM.name, args)
        .map_err(anyhow::Error::msg)?;
    cluster.shutdown();
    let outcome = JobOutcome {
        accumulators: result.accumulators,
        duration: result.duration,
        slots_used: result.slots_used,
    };
    Ok((answer_of(&outcome), result.duration))
}

fn fastest<T>(
    repetitions: u32,
    mut run: impl FnMut() -> anyhow::Result<(T, Duration)>,
) -> anyhow::Result<(T, Duration)> {
    let mut best = run()?;
    for _ in 1..repetitions {
        let next = run()?;
        if next.1 < best.1 {
            best = next;
        }
    }
    Ok(best)
}

fn throughput(
    events: u64,
    seed: u64,
    queries: &[Query],
    parallelisms: &[u32],
    repetitions: u32,
    json: bool,
) -> anyhow::Result<()> {
    let config = GeneratorConfig { events, seed };
    let mut measurements = Vec::new();
    for query in queries {
        let (baseline_answer, baseline_duration) = fastest(repetitions, || {
            let started = Instant::now();
            let answer = run_baseline(*query, config);
            Ok((answer, started.elapsed()))
        })?;
        measurements.push(Measurement {
            query: *query,
            parallelism: None,
            answer: baseline_answer,
            duration: baseline_duration,
        });
        for parallelism in parallelisms {
            let (answer, duration) =
                fastest(repetitions, || run_engine(*query, config, *parallelism))
                    .with_context(|| format!("{} at parallelism {parallelism}", query.name()))?;
            if answer != baseline_answer {
                bail!(
                    "{} at parallelism {parallelism}: the engine printed {} but the baseline {}",
                    query.name(),
                    answer.line(*query),
                    baseline_answer.line(*query)
                );
            }
            measurements.push(Measurement {
                query: *query,
                parallelism: Some(*parallelism),
                answer,
                duration,
            });
        }
    }
    let rate = |measurement: &Measurement| events as f64 / measurement.duration.as_secs_f64();
    if json {
        let rows: Vec<String> = measurements
            .iter()
            .map(|measurement| {
                let baseline = measurements
                    .iter()
                    .find(|other| other.query == measurement.query && other.parallelism.is_none())
                    .expect("a baseline per query");
                let cores = measurement.parallelism.unwrap_or(1);
                format!(
                    "{{\"query\":\"{}\",\"runner\":\"{}\",\"cores\":{cores},\"events\":{events},\"seconds\":{:.6},\"events_per_second\":{:.0},\"events_per_second_per_core\":{:.0},\"ratio_to_baseline_times_cores\":{:.3},\"rows\":{},\"checksum\":{}}}",
                    measurement.query.name(),
                    if measurement.parallelism.is_some() { "engine" } else { "baseline" },
                    measurement.duration.as_secs_f64(),
                    rate(measurement),
                    rate(measurement) / f64::from(cores),
                    rate(measurement) / (rate(baseline) * f64::from(cores)),
                    measurement.answer.rows,
                    measurement.answer.checksum
                )
            })
            .collect();
        println!("[{}]", rows.join(",\n "));
        return Ok(());
    }
    println!("Nexmark throughput, {events} events, seed {seed}, fastest of {repetitions} runs");
    println!(
        "{:<6} {:<12} {:>6} {:>14} {:>16} {:>22}",
        "query", "runner", "cores", "events/s", "events/s/core", "engine / (baseline*cores)"
    );
    for measurement in &measurements {
        let baseline = measurements
            .iter()
            .find(|other| other.query == measurement.query && other.parallelism.is_none())
            .expect("a baseline per query");
        let cores = measurement.parallelism.unwrap_or(1);
        let ratio = match measurement.parallelism {
            Some(_) => format!(
                "{:.2}",
                rate(measurement) / (rate(baseline) * f64::from(cores))
            ),
            None => "-".to_string(),
        };
        println!(
            "{:<6} {:<12} {:>6} {:>14.0} {:>16.0} {:>22}",
            measurement.query.name(),
            match measurement.parallelism {
                Some(parallelism) => format!("engine p={parallelism}"),
                None => "baseline".to_string(),
            },
            cores,
            rate(measurement),
            rate(measurement) / f64::from(cores),
            ratio
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Arguments::parse().harness {
        Harness::Throughput {
            events,
            seed,
            queries,
            parallelisms,
            repetitions,
            json,
        } => throughput(events, seed, &queries, &parallelisms, repetitions, json),
    }
}
