//! `strom-bench`: benchmark harnesses that print figures and ratios.
//!
//! `strom-bench throughput` runs every Nexmark query on the engine at
//! parallelism 1 and 2 and, in the same invocation, the hand-written
//! single-threaded baseline of the same query, so that the ratio between
//! them holds on a shared, noisy machine. `strom-bench checkpoints` runs
//! queries with and without periodic checkpoints in one invocation and
//! prints the ratio, with what each checkpoint took. `strom-bench latency`
//! runs an open-loop job from one slot to another (in one TaskManager, and
//! across two over TCP) at several rates and prints its latency beside the
//! machine's floor, measured in the same invocation (see
//! `strom_bench::latency` for how).

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use strom_bench::latency::floor::{self, FloorConfig, Waiting};
use strom_bench::latency::{
    histogram_path, merge_histograms, read_histogram, LatencyKind, LATENCY_PROGRAM,
    RECEIVED_ACCUMULATOR, SINK_NAME, SOURCE_NAME, WARMUP_ACCUMULATOR,
};
use strom_bench::nexmark::{run_baseline, Answer, GeneratorConfig, Query};
use strom_bench::queries::{answer_of, NEXMARK_PROGRAM};
use strom_core::program::JobOutcome;
use strom_core::JobArgs;
use strom_scheduler::messages::ToJobManager;
use strom_scheduler::{JobEvent, JobManagerHandle, LocalCluster, LocalClusterConfig};

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
    /// Open-loop latency at parallelism 1, the source in one slot and the
    /// sink in another (in one TaskManager, and in two over TCP), from each
    /// record's scheduled send time, beside the machine's floor: a ring
    /// ping-pong between two cores and a loopback TCP round trip.
    Latency(LatencyOptions),
    /// A TaskManager process of `latency --placements processes` (started
    /// by it, not by hand).
    #[command(hide = true)]
    LatencyTaskManager {
        #[arg(long)]
        job_manager: String,
        #[arg(long)]
        cpu: usize,
        #[arg(long, value_parser = strom_core::config::parse_duration)]
        busy_poll: Option<Duration>,
    },
}

/// Where the latency job's two slots are.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LatencyPlacement {
    /// Two slots of one TaskManager: records cross a slot-to-slot ring.
    Slots,
    /// Two TaskManagers of one slot each in this process: records cross
    /// their network services over loopback TCP, as between processes.
    TaskManagers,
    /// Two TaskManager processes of one slot each (this binary, started
    /// again), with the JobManager in this one: records cross TCP between
    /// processes.
    Processes,
}

impl LatencyPlacement {
    fn name(self) -> &'static str {
        match self {
            LatencyPlacement::Slots => "2 slots, 1 TM",
            LatencyPlacement::TaskManagers => "2 TMs, TCP",
            LatencyPlacement::Processes => "2 TM processes",
        }
    }

    fn key(self) -> &'static str {
        match self {
            LatencyPlacement::Slots => "slots",
            LatencyPlacement::TaskManagers => "task-managers",
            LatencyPlacement::Processes => "processes",
        }
    }

    /// Whether the source and the sink are in different TaskManagers.
    fn across_task_managers(self) -> bool {
        self != LatencyPlacement::Slots
    }
}

/// The cluster of a latency run.
enum LatencyCluster {
    Local(LocalCluster),
    Processes(ProcessCluster),
}

/// A JobManager in this process and two TaskManager processes of one slot
/// each, on the two floor CPUs, as `strom jobmanager` and two `strom
/// taskmanager --slots 1` would be.
struct ProcessCluster {
    job_manager: std::sync::mpsc::Sender<ToJobManager>,
    thread: Option<std::thread::JoinHandle<()>>,
    children: Vec<std::process::Child>,
}

/// How long a TaskManager process may take to register or to stop.
const TASK_MANAGER_PROCESS_TIMEOUT: Duration = Duration::from_secs(20);
/// The heartbeat timeout between the JobManager and its TaskManagers.
const PROCESS_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(10);

impl LatencyCluster {
    fn start(
        placement: LatencyPlacement,
        busy_poll: Option<Duration>,
    ) -> anyhow::Result<LatencyCluster> {
        let config = match placement {
            LatencyPlacement::Slots => LocalClusterConfig {
                busy_poll,
                ..LocalClusterConfig::slots(2)
            },
            LatencyPlacement::TaskManagers => LocalClusterConfig {
                slot_count: 1,
                task_manager_count: 2,
                busy_poll,
            },
            LatencyPlacement::Processes => {
                return Ok(LatencyCluster::Processes(ProcessCluster::start(busy_poll)?))
            }
        };
        Ok(LatencyCluster::Local(
            LocalCluster::start(vec![LATENCY_PROGRAM], config).map_err(anyhow::Error::msg)?,
        ))
    }

    fn job_manager(&self) -> JobManagerHandle {
        match self {
            LatencyCluster::Local(cluster) => cluster.job_manager(),
            LatencyCluster::Processes(cluster) => {
                JobManagerHandle::new(cluster.job_manager.clone())
            }
        }
    }

    fn execute(&self, args: JobArgs) -> anyhow::Result<strom_scheduler::JobResult> {
        match self {
            LatencyCluster::Local(cluster) => cluster
                .execute(LATENCY_PROGRAM.name, args)
                .map_err(anyhow::Error::msg),
            LatencyCluster::Processes(cluster) => {
                let (reply, result) = std::sync::mpsc::channel();
                cluster
                    .job_manager
                    .send(ToJobManager::SubmitJob {
                        program: LATENCY_PROGRAM.name.to_string(),
                        args,
                        reply,
                        events: None,
                    })
                    .map_err(|_| anyhow::anyhow!("the JobManager stopped"))?;
                result
                    .recv()
                    .map_err(|_| anyhow::anyhow!("the JobManager stopped before the job ended"))?
                    .map_err(anyhow::Error::msg)
            }
        }
    }

    fn shutdown(self) -> anyhow::Result<()> {
        match self {
            LatencyCluster::Local(cluster) => {
                cluster.shutdown();
                Ok(())
            }
            LatencyCluster::Processes(mut cluster) => cluster.stop(),
        }
    }
}

impl ProcessCluster {
    fn start(busy_poll: Option<Duration>) -> anyhow::Result<ProcessCluster> {
        use strom_scheduler::cluster::ControlServer;
        use strom_scheduler::jobmanager::{JobManager, JobManagerConfig};
        let (sender, inbox) = std::sync::mpsc::channel();
        let job_manager = JobManager::with_config(
            vec![LATENCY_PROGRAM],
            JobManagerConfig {
                slot_wait_timeout: Some(TASK_MANAGER_PROCESS_TIMEOUT),
                log: false,
            },
        );
        let thread = std::thread::Builder::new()
            .name("strom-jobmanager".to_string())
            .spawn(move || job_manager.run(inbox))
            .context("cannot start the JobManager thread")?;
        let mut cluster = ProcessCluster {
            job_manager: sender.clone(),
            thread: Some(thread),
            children: Vec::new(),
        };
        let control = ControlServer::start(
            ([127, 0, 0, 1], 0).into(),
            None,
            PROCESS_HEARTBEAT_TIMEOUT,
            sender,
        )
        .map_err(anyhow::Error::msg)?;
        let executable = std::env::current_exe().context("cannot find this executable")?;
        let (first_cpu, second_cpu) = floor::floor_cpus();
        for cpu in [first_cpu, second_cpu] {
            let mut command = std::process::Command::new(&executable);
            command.args([
                "latency-task-manager",
                "--job-manager",
                &control.local_addr().to_string(),
                "--cpu",
                &cpu.to_string(),
            ]);
            if let Some(spin) = busy_poll {
                command.args(["--busy-poll", &format!("{}us", spin.as_micros())]);
            }
            let child = command
                .stdin(std::process::Stdio::null())
                .spawn()
                .with_context(|| format!("cannot start {}", executable.display()))?;
            cluster.children.push(child);
        }
        let handle = JobManagerHandle::new(cluster.job_manager.clone());
        let started = Instant::now();
        while handle.task_managers().map_err(anyhow::Error::msg)?.len() < 2 {
            if started.elapsed() > TASK_MANAGER_PROCESS_TIMEOUT {
                bail!("the TaskManager processes did not register within {TASK_MANAGER_PROCESS_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(cluster)
    }

    /// Stops the JobManager, which tells the TaskManagers to end; a
    /// TaskManager process that does not is killed.
    fn stop(&mut self) -> anyhow::Result<()> {
        let _ = self.job_manager.send(ToJobManager::Shutdown);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let started = Instant::now();
        let mut stubborn = Vec::new();
        for mut child in self.children.drain(..) {
            loop {
                if child.try_wait()?.is_some() {
                    break;
                }
                if started.elapsed() > TASK_MANAGER_PROCESS_TIMEOUT {
                    let _ = child.kill();
                    let _ = child.wait();
                    stubborn.push(child.id());
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !stubborn.is_empty() {
            bail!("TaskManager processes {stubborn:?} did not stop and were killed");
        }
        Ok(())
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        if !self.children.is_empty() {
            let _ = self.job_manager.send(ToJobManager::Shutdown);
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A TaskManager process of the `processes` placement.
fn latency_task_manager(
    job_manager: String,
    cpu: usize,
    busy_poll: Option<Duration>,
) -> anyhow::Result<()> {
    strom_scheduler::cluster::run_task_manager(
        vec![LATENCY_PROGRAM],
        strom_scheduler::cluster::TaskManagerConfig {
            job_manager,
            slot_count: 1,
            cpus: vec![cpu],
            data_bind: ([127, 0, 0, 1], 0).into(),
            secret: None,
            registration_timeout: TASK_MANAGER_PROCESS_TIMEOUT,
            heartbeat_timeout: PROCESS_HEARTBEAT_TIMEOUT,
            busy_poll,
        },
    )
    .map_err(anyhow::Error::msg)
}

struct Measurement {
    query: Query,
    /// `None` for the baseline.
    parallelism: Option<u32>,
    answer: Answer,
    duration: Duration,
}

/// A local cluster of `slots` slots for the runs of a benchmark: it is
/// started once and runs job after job (of any parallelism up to `slots`),
/// as a standing cluster does, so that no run pays for the start of the
/// cluster (its executors' first milliseconds on cores that were idle).
fn bench_cluster(slots: u32) -> anyhow::Result<LocalCluster> {
    LocalCluster::start(vec![NEXMARK_PROGRAM], LocalClusterConfig::slots(slots))
        .map_err(anyhow::Error::msg)
}

fn run_engine(
    cluster: &LocalCluster,
    query: Query,
    config: GeneratorConfig,
    parallelism: u32,
) -> anyhow::Result<(Answer, Duration)> {
    let (answer, duration, _) = run_engine_with(cluster, query, config, parallelism, &[])?;
    Ok((answer, duration))
}

/// Runs a query on `cluster` with extra job options; returns its answer,
/// its duration (from the job's deployment to its last result) and the
/// checkpoints it completed.
fn run_engine_with(
    cluster: &LocalCluster,
    query: Query,
    config: GeneratorConfig,
    parallelism: u32,
    options: &[String],
) -> anyhow::Result<(Answer, Duration, Vec<JobEvent>)> {
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
    let outcome = JobOutcome {
        accumulators: result.accumulators,
        duration: result.duration,
        slots_used: result.slots_used,
    };
    Ok((answer_of(&outcome), result.duration, checkpoints))
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
    // One cluster, with slots for the largest parallelism, runs every job.
    let cluster = bench_cluster(parallelisms.iter().copied().max().unwrap_or(1))?;
    let mut measurements = Vec::new();
    for query in queries {
        // Runs alternate (the baseline, then the engine at each
        // parallelism, round after round), so that all see the same noise
        // of a shared machine; the fastest of each counts.
        let mut baseline_answer = None;
        let mut baseline_best = Duration::MAX;
        let mut engine_best = vec![Duration::MAX; parallelisms.len()];
        for _ in 0..repetitions.max(1) {
            let started = Instant::now();
            let answer = run_baseline(*query, config);
            baseline_best = baseline_best.min(started.elapsed());
            baseline_answer = Some(answer);
            for (parallelism, best) in parallelisms.iter().zip(&mut engine_best) {
                let (engine_answer, duration) = run_engine(&cluster, *query, config, *parallelism)
                    .with_context(|| format!("{} at parallelism {parallelism}", query.name()))?;
                if engine_answer != answer {
                    bail!(
                        "{} at parallelism {parallelism}: the engine printed {} but the baseline {}",
                        query.name(),
                        engine_answer.line(*query),
                        answer.line(*query)
                    );
                }
                *best = (*best).min(duration);
            }
        }
        let answer = baseline_answer.expect("a baseline run");
        measurements.push(Measurement {
            query: *query,
            parallelism: None,
            answer,
            duration: baseline_best,
        });
        for (parallelism, duration) in parallelisms.iter().zip(engine_best) {
            measurements.push(Measurement {
                query: *query,
                parallelism: Some(*parallelism),
                answer,
                duration,
            });
        }
    }
    cluster.shutdown();
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
        Harness::Latency(options) => latency(options),
        Harness::LatencyTaskManager {
            job_manager,
            cpu,
            busy_poll,
        } => latency_task_manager(job_manager, cpu, busy_poll),
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
    let cluster = bench_cluster(parallelism)?;
    for query in queries {
        // Runs alternate, so that both see the same noise of a shared
        // machine; the fastest of each counts.
        let mut plain_duration = Duration::MAX;
        let mut checkpointed: Option<(Answer, Duration, Vec<JobEvent>)> = None;
        for _ in 0..repetitions {
            let (plain_answer, duration) = run_engine(&cluster, *query, config, parallelism)?;
            plain_duration = plain_duration.min(duration);
            let run = run_engine_with(&cluster, *query, config, parallelism, &options)?;
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
    cluster.shutdown();
    Ok(())
}

/// The options of `strom-bench latency`.
#[derive(clap::Args)]
struct LatencyOptions {
    /// Rates to run at, events per second, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
    rates: Vec<u64>,
    /// How long each run's schedule lasts (events = rate * duration).
    #[arg(long, default_value = "5s", value_parser = strom_core::config::parse_duration)]
    duration: Duration,
    /// Events per run, whatever the rate (instead of --duration).
    #[arg(long)]
    events: Option<u64>,
    /// The start of each run's schedule whose records are counted but
    /// not recorded (links and caches warming up).
    #[arg(long, default_value = "500ms", value_parser = strom_core::config::parse_duration)]
    warmup: Duration,
    /// Where the source and the sink run, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "slots,task-managers")]
    placements: Vec<LatencyPlacement>,
    /// Round trips each floor measures.
    #[arg(long, default_value_t = 50_000)]
    floor_samples: u64,
    /// Keep the sinks' histogram files (HDR V2) here; by default they go
    /// to a temporary directory that is removed.
    #[arg(long)]
    histogram_dir: Option<std::path::PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Busy-poll: idle slots spin this long before they sleep (as
    /// `strom taskmanager --busy-poll`; network services still sleep);
    /// the CPU it costs is printed. Default: they sleep at once.
    #[arg(long, value_parser = strom_core::config::parse_duration)]
    busy_poll: Option<Duration>,
}

/// Linux reports process CPU time in ticks of `USER_HZ`, 100 a second on
/// every architecture the kernel's ABI fixes it for.
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) a process has used so far, from
/// `/proc/PID/stat` (this process for `None`).
fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(&path).with_context(|| format!("cannot read {path}"))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let after_name = stat
        .rsplit_once(')')
        .with_context(|| format!("{path} has no command name"))?
        .1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| -> anyhow::Result<f64> {
        fields
            .get(index)
            .and_then(|field| field.parse::<f64>().ok())
            .with_context(|| format!("{path}: no CPU time field"))
    };
    // utime and stime are fields 14 and 15, 12 and 13 after the name.
    Ok((ticks(11)? + ticks(12)?) / USER_HZ)
}

/// CPU time of every process of the cluster: this one and, for the
/// `processes` placement, the TaskManager processes.
fn cluster_cpu_seconds(cluster: &LatencyCluster) -> anyhow::Result<f64> {
    let mut seconds = cpu_seconds(None)?;
    if let LatencyCluster::Processes(processes) = cluster {
        for child in &processes.children {
            seconds += cpu_seconds(Some(child.id()))?;
        }
    }
    Ok(seconds)
}

/// One run of the latency job.
struct LatencyRun {
    placement: LatencyPlacement,
    rate: u64,
    sent: u64,
    received: u64,
    /// Received within the warm-up: counted, not recorded.
    warmup_received: u64,
    end_to_end: Histogram<u64>,
    source_wait: Histogram<u64>,
    transit: Histogram<u64>,
    /// The TaskManagers of the source's and of the sink's subtasks.
    source_task_managers: Vec<String>,
    sink_task_managers: Vec<String>,
    /// Channel elements the TaskManagers sent one another over TCP.
    network_elements: u64,
    /// CPU cores the cluster kept busy on average over the job.
    cpu_cores: f64,
}

/// Microseconds, from nanoseconds.
fn micros(nanoseconds: u64) -> f64 {
    nanoseconds as f64 / 1e3
}

/// p50, p99, p99.9 and max, in microseconds.
fn percentiles(histogram: &Histogram<u64>) -> [f64; 4] {
    [
        micros(histogram.value_at_quantile(0.50)),
        micros(histogram.value_at_quantile(0.99)),
        micros(histogram.value_at_quantile(0.999)),
        micros(histogram.max()),
    ]
}

fn percentiles_json(histogram: &Histogram<u64>) -> serde_json::Value {
    let [p50, p99, p999, max] = percentiles(histogram);
    serde_json::json!({
        "samples": histogram.len(),
        "p50_us": p50,
        "p99_us": p99,
        "p99_9_us": p999,
        "max_us": max,
        "mean_us": histogram.mean() / 1e3,
    })
}

fn network_elements_sent(cluster: &LatencyCluster) -> anyhow::Result<u64> {
    Ok(cluster
        .job_manager()
        .task_managers()
        .map_err(anyhow::Error::msg)?
        .iter()
        .map(|task_manager| task_manager.network.elements_sent)
        .sum())
}

fn run_latency(
    placement: LatencyPlacement,
    rate: u64,
    events: u64,
    warmup: Duration,
    directory: &std::path::Path,
    busy_poll: Option<Duration>,
) -> anyhow::Result<LatencyRun> {
    let cluster = LatencyCluster::start(placement, busy_poll)?;
    let base = directory.join(format!("{}-{rate}", placement.key()));
    let arguments: Vec<String> = vec![
        "--events-per-second".to_string(),
        rate.to_string(),
        "--events".to_string(),
        events.to_string(),
        "--histogram-out".to_string(),
        base.to_string_lossy().to_string(),
        "--warmup".to_string(),
        format!("{}us", warmup.as_micros()),
    ];
    let matches = LATENCY_PROGRAM
        .parse(&arguments)
        .map_err(anyhow::Error::msg)?;
    let mut args = JobArgs::from_matches(arguments, &matches);
    args.parallelism = 1;
    let network_before = network_elements_sent(&cluster)?;
    let (cpu_before, started) = (cluster_cpu_seconds(&cluster)?, Instant::now());
    let result = cluster.execute(args)?;
    let cpu_cores = (cluster_cpu_seconds(&cluster)? - cpu_before) / started.elapsed().as_secs_f64();
    let network_elements = network_elements_sent(&cluster)? - network_before;
    let status = cluster
        .job_manager()
        .list_jobs()
        .map_err(anyhow::Error::msg)?
        .into_iter()
        .find(|status| status.job_id == result.job_id)
        .context("the finished job is not listed")?;
    cluster.shutdown()?;
    let task_managers_of = |name: &str| -> anyhow::Result<(u32, Vec<String>)> {
        let vertex = status
            .vertices
            .iter()
            .find(|vertex| vertex.name.contains(name))
            .with_context(|| format!("no vertex runs {name}"))?;
        let task_managers = vertex
            .subtasks
            .iter()
            .map(|subtask| subtask.task_manager.clone().unwrap_or_default())
            .collect();
        Ok((vertex.parallelism, task_managers))
    };
    let (_, source_task_managers) = task_managers_of(SOURCE_NAME)?;
    let (sink_parallelism, sink_task_managers) = task_managers_of(SINK_NAME)?;
    // The slot sharing groups make two slots; with one slot per
    // TaskManager they must be on different TaskManagers.
    if result.slots_used != 2 {
        bail!(
            "the latency job took {} slots, not 2: source and sink share a slot",
            result.slots_used
        );
    }
    let apart = source_task_managers
        .iter()
        .all(|source| !sink_task_managers.contains(source));
    if placement.across_task_managers() != apart {
        bail!(
            "{}: the source ran on TaskManager {source_task_managers:?} and the sink on {sink_task_managers:?}",
            placement.name()
        );
    }
    // Per kind, the merge of every sink subtask's histogram.
    let mut merged = Vec::new();
    for kind in LatencyKind::ALL {
        let parts = (0..sink_parallelism)
            .map(|subtask| read_histogram(&histogram_path(&base, kind, subtask)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        merged.push(merge_histograms(&parts));
    }
    let [end_to_end, source_wait, transit]: [Histogram<u64>; 3] = merged
        .try_into()
        .map_err(|_| anyhow::anyhow!("three kinds of latency"))?;
    Ok(LatencyRun {
        placement,
        rate,
        sent: events,
        received: result.accumulators.get(RECEIVED_ACCUMULATOR).unwrap_or(0),
        warmup_received: result.accumulators.get(WARMUP_ACCUMULATOR).unwrap_or(0),
        end_to_end,
        source_wait,
        transit,
        source_task_managers,
        sink_task_managers,
        network_elements,
        cpu_cores,
    })
}

fn latency(options: LatencyOptions) -> anyhow::Result<()> {
    let floor_config = FloorConfig {
        samples: options.floor_samples,
        warmup_samples: (options.floor_samples / 10).min(10_000),
    };
    let ring = floor::ring_one_way(floor_config, Waiting::Park).context("the ring floor")?;
    let ring_spinning =
        floor::ring_one_way(floor_config, Waiting::Spin(floor::RING_SPIN_BEFORE_PARK))
            .context("the spinning ring floor")?;
    let tcp = floor::tcp_round_trip(floor_config).context("the TCP floor")?;
    let (directory, temporary) = match &options.histogram_dir {
        Some(directory) => (directory.clone(), false),
        None => (
            std::env::temp_dir().join(format!("strom-bench-latency-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&directory)
        .with_context(|| format!("cannot create {}", directory.display()))?;
    let mut runs = Vec::new();
    for placement in &options.placements {
        for rate in &options.rates {
            let events = options
                .events
                .unwrap_or_else(|| (*rate as f64 * options.duration.as_secs_f64()).round() as u64);
            let run = run_latency(
                *placement,
                *rate,
                events,
                options.warmup,
                &directory,
                options.busy_poll,
            )
            .with_context(|| format!("{} at {rate} events/s", placement.name()))?;
            if !options.json {
                eprintln!(
                    "{} at {rate} events/s: {} of {} records, p99 {:.1} us",
                    placement.name(),
                    run.received,
                    run.sent,
                    micros(run.end_to_end.value_at_quantile(0.99))
                );
            }
            runs.push(run);
        }
    }
    if temporary {
        let _ = std::fs::remove_dir_all(&directory);
    }
    let floor_of = |placement: LatencyPlacement| match placement {
        LatencyPlacement::Slots => ("ring one-way", &ring),
        LatencyPlacement::TaskManagers | LatencyPlacement::Processes => ("tcp round trip", &tcp),
    };
    let (pinger_cpu, echo_cpu) = floor::floor_cpus();
    if options.json {
        let rows: Vec<serde_json::Value> = runs
            .iter()
            .map(|run| {
                let (floor_name, floor) = floor_of(run.placement);
                serde_json::json!({
                    "placement": run.placement.key(),
                    "events_per_second": run.rate,
                    "sent": run.sent,
                    "received": run.received,
                    "warmup_received": run.warmup_received,
                    "end_to_end": percentiles_json(&run.end_to_end),
                    "source_wait": percentiles_json(&run.source_wait),
                    "transit": percentiles_json(&run.transit),
                    "floor": floor_name,
                    "p99_over_floor_p99": run.end_to_end.value_at_quantile(0.99) as f64
                        / floor.value_at_quantile(0.99).max(1) as f64,
                    "source_task_managers": run.source_task_managers,
                    "sink_task_managers": run.sink_task_managers,
                    "network_elements_sent": run.network_elements,
                    "cpu_cores": run.cpu_cores,
                })
            })
            .collect();
        let document = serde_json::json!({
            "warmup_ms": options.warmup.as_secs_f64() * 1e3,
            "busy_poll_us": options.busy_poll.map(|spin| spin.as_micros() as u64),
            "floor_cpus": [pinger_cpu, echo_cpu],
            "floors": {
                "ring_one_way": percentiles_json(&ring),
                "ring_one_way_spinning": percentiles_json(&ring_spinning),
                "tcp_round_trip": percentiles_json(&tcp),
            },
            "runs": rows,
        });
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        println!(
            "Floor: CPUs {pinger_cpu} and {echo_cpu}, {} samples each (microseconds)",
            options.floor_samples
        );
        println!("| floor | p50 | p99 | p99.9 | max |");
        println!("| --- | ---: | ---: | ---: | ---: |");
        for (name, histogram) in [
            ("ring one-way (round trip / 2), parking as slots do", &ring),
            (
                "ring one-way (round trip / 2), spinning: no wake-up",
                &ring_spinning,
            ),
            ("tcp loopback round trip", &tcp),
        ] {
            let [p50, p99, p999, max] = percentiles(histogram);
            println!("| {name} | {p50:.1} | {p99:.1} | {p999:.1} | {max:.1} |");
        }
        println!();
        println!(
            "Engine: parallelism 1, source and key_by -> q1 map -> sink in two slots; latency from the scheduled send time (microseconds), {} ms warm-up not recorded; {}",
            options.warmup.as_millis(),
            match options.busy_poll {
                Some(spin) => format!("idle slots busy-poll for {spin:?} before they sleep"),
                None => "idle slots sleep at once (no busy-polling)".to_string(),
            }
        );
        println!(
            "| placement | events/s | sent | received | p50 | p99 | p99.9 | max | source wait p50 / p99 / max | transit p50 / p99 | p99 / floor p99 | CPU cores busy |"
        );
        println!(
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
        for run in &runs {
            let [p50, p99, p999, max] = percentiles(&run.end_to_end);
            let [wait_p50, wait_p99, _, wait_max] = percentiles(&run.source_wait);
            let [transit_p50, transit_p99, _, _] = percentiles(&run.transit);
            let (floor_name, floor) = floor_of(run.placement);
            println!(
                "| {} | {} | {} | {} | {p50:.1} | {p99:.1} | {p999:.1} | {max:.1} | {wait_p50:.1} / {wait_p99:.1} / {wait_max:.1} | {transit_p50:.1} / {transit_p99:.1} | {:.1}x {floor_name} | {:.2} |",
                run.placement.name(),
                run.rate,
                run.sent,
                run.received,
                run.end_to_end.value_at_quantile(0.99) as f64
                    / floor.value_at_quantile(0.99).max(1) as f64,
                run.cpu_cores,
            );
        }
        for run in &runs {
            if run.placement.across_task_managers() {
                println!(
                    "{} at {} events/s: source on TaskManager {}, sink on {}, {} channel elements over TCP",
                    run.placement.name(),
                    run.rate,
                    run.source_task_managers.join(","),
                    run.sink_task_managers.join(","),
                    run.network_elements
                );
            }
        }
    }
    let lossy: Vec<String> = runs
        .iter()
        .filter(|run| run.received != run.sent)
        .map(|run| {
            format!(
                "{} at {} events/s received {} of {}",
                run.placement.name(),
                run.rate,
                run.received,
                run.sent
            )
        })
        .collect();
    if !lossy.is_empty() {
        bail!("records were lost: {}", lossy.join("; "));
    }
    Ok(())
}
