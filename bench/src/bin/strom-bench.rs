//! `strom-bench`: benchmark harnesses that print figures and ratios.
//!
//! `strom-bench throughput` runs every Nexmark query on the engine at
//! parallelism 1 and 2 and, in the same invocation, the hand-written
//! single-threaded baseline of the same query, so that the ratio between
//! them holds on a shared, noisy machine. `strom-bench checkpoints` runs
//! queries with and without periodic checkpoints in one invocation and
//! prints the ratio, with what each checkpoint took.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use strom_bench::nexmark::{run_baseline, Answer, GeneratorConfig, Query};
use strom_bench::queries::{answer_of, NEXMARK_PROGRAM};
use strom_core::program::JobOutcome;
use strom_core::JobArgs;
use strom_scheduler::{JobEvent, LocalCluster, LocalClusterConfig};

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
    /// What checkpoints cost: for each query, the throughput with a
    /// checkpoint every interval as a ratio to none, in the same
    /// invocation, and each checkpoint's duration, size, and the longest
    /// pause and alignment it caused in the stream.
    Checkpoints {
        /// Events per run.
        #[arg(long, default_value_t = 30_000_000)]
        events: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, value_delimiter = ',', default_value = "q5,q8")]
        queries: Vec<Query>,
        #[arg(long, default_value_t = 2)]
        parallelism: u32,
        /// The checkpoint interval.
        #[arg(long, default_value = "1s", value_parser = strom_core::config::parse_duration)]
        interval: Duration,
        /// Where checkpoints go (removed afterwards).
        #[arg(long)]
        checkpoint_dir: Option<std::path::PathBuf>,
        /// Runs of each measurement; the fastest counts.
        #[arg(long, default_value_t = 3)]
        repetitions: u32,
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
    let (answer, duration, _) = run_engine_with(query, config, parallelism, &[])?;
    Ok((answer, duration))
}

/// Runs a query with extra job options; returns its answer, its duration
/// and the checkpoints it completed.
fn run_engine_with(
    query: Query,
    config: GeneratorConfig,
    parallelism: u32,
    options: &[String],
) -> anyhow::Result<(Answer, Duration, Vec<JobEvent>)> {
    let cluster = LocalCluster::start(
        vec![NEXMARK_PROGRAM],
        LocalClusterConfig::slots(parallelism),
    )
    .map_err(anyhow::Error::msg)?;
    let arguments: Vec<String> = [
        "--query",
        query.name(),
        "--events",
        &config.events.to_string(),
        "--seed",
        &config.seed.to_string(),
    ]
    .map(String::from)
    .into_iter()
    .chain(options.iter().cloned())
    .collect();
    let matches = NEXMARK_PROGRAM
        .parse(&arguments)
        .map_err(anyhow::Error::msg)?;
    let mut args = JobArgs::from_matches(arguments, &matches);
    args.parallelism = parallelism;
    let (events, event_inbox) = std::sync::mpsc::channel();
    let result = cluster
        .execute_with_events(NEXMARK_PROGRAM.name, args, Some(events))
        .map_err(anyhow::Error::msg)?;
    let checkpoints: Vec<JobEvent> = event_inbox
        .try_iter()
        .filter(|event| matches!(event, JobEvent::CheckpointCompleted { .. }))
        .collect();
    cluster.shutdown();
    let outcome = JobOutcome {
        accumulators: result.accumulators,
        duration: result.duration,
        slots_used: result.slots_used,
    };
    Ok((answer_of(&outcome), result.duration, checkpoints))
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
        Harness::Checkpoints {
            events,
            seed,
            queries,
            parallelism,
            interval,
            checkpoint_dir,
            repetitions,
        } => checkpoints(
            GeneratorConfig { events, seed },
            &queries,
            parallelism,
            interval,
            checkpoint_dir,
            repetitions,
        ),
    }
}

fn checkpoints(
    config: GeneratorConfig,
    queries: &[Query],
    parallelism: u32,
    interval: Duration,
    checkpoint_dir: Option<std::path::PathBuf>,
    repetitions: u32,
) -> anyhow::Result<()> {
    let directory = checkpoint_dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("strom-bench-checkpoints-{}", std::process::id()))
    });
    let options = [
        "--checkpoint-interval".to_string(),
        format!("{}ms", interval.as_millis()),
        "--checkpoint-dir".to_string(),
        directory.to_string_lossy().to_string(),
    ];
    println!(
        "{} events, parallelism {parallelism}, a checkpoint every {} ms, fastest of {repetitions} runs",
        config.events,
        interval.as_millis()
    );
    println!(
        "| query | none events/s | checkpointed events/s | ratio | checkpoints | duration median / max ms | size median / max MB | longest pause us | longest alignment ms |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for query in queries {
        // Runs alternate, so that both see the same noise of a shared
        // machine; the fastest of each counts.
        let mut plain_duration = Duration::MAX;
        let mut checkpointed: Option<(Answer, Duration, Vec<JobEvent>)> = None;
        for _ in 0..repetitions {
            let (plain_answer, duration) = run_engine(*query, config, parallelism)?;
            plain_duration = plain_duration.min(duration);
            let run = run_engine_with(*query, config, parallelism, &options)?;
            if run.0 != plain_answer {
                bail!(
                    "{}: the checkpointed run printed another answer",
                    query.name()
                );
            }
            if checkpointed.as_ref().is_none_or(|best| run.1 < best.1) {
                checkpointed = Some(run);
            }
        }
        let (_, duration, events) = checkpointed.expect("at least one run");
        let _ = std::fs::remove_dir_all(&directory);
        let mut durations = Vec::new();
        let mut sizes = Vec::new();
        let mut pause_max = Duration::ZERO;
        let mut alignment_max = Duration::ZERO;
        for event in &events {
            if let JobEvent::CheckpointCompleted {
                duration,
                size_bytes,
                pause_max: pause,
                alignment_max: alignment,
                ..
            } = event
            {
                durations.push(*duration);
                sizes.push(*size_bytes);
                pause_max = pause_max.max(*pause);
                alignment_max = alignment_max.max(*alignment);
            }
        }
        durations.sort();
        sizes.sort();
        let rate = |duration: Duration| config.events as f64 / duration.as_secs_f64();
        let median = |values: &[u64]| values.get(values.len() / 2).copied().unwrap_or(0);
        let millis: Vec<u64> = durations.iter().map(|d| d.as_millis() as u64).collect();
        println!(
            "| {} | {:.1}M | {:.1}M | {:.2} | {} | {} / {} | {:.1} / {:.1} | {} | {:.1} |",
            query.name(),
            rate(plain_duration) / 1e6,
            rate(duration) / 1e6,
            rate(duration) / rate(plain_duration),
            durations.len(),
            median(&millis),
            millis.last().copied().unwrap_or(0),
            median(&sizes) as f64 / 1e6,
            sizes.last().copied().unwrap_or(0) as f64 / 1e6,
            pause_max.as_micros(),
            alignment_max.as_secs_f64() * 1e3,
        );
    }
    Ok(())
}
