//! The job options every program takes beyond its parallelism: checkpoints,
//! restarts, and the savepoint a job starts from.
//!
//! They mirror Flink's configuration (`execution.checkpointing.*`,
//! `restart-strategy.*`, `execution.savepoint.*`) as command-line options,
//! parsed by every process from the job's arguments.

use std::path::PathBuf;
use std::time::Duration;

/// Periodic checkpoints of a job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointingOptions {
    /// `None`: no periodic checkpoints (savepoints still work with a
    /// directory).
    pub interval: Option<Duration>,
    /// Where checkpoints go: `<dir>/<job id>/chk-<n>/`.
    pub directory: Option<PathBuf>,
    /// A checkpoint not complete after this long is aborted.
    pub timeout: Duration,
    /// The least time between the end of one checkpoint and the start of
    /// the next.
    pub min_pause: Duration,
    /// Completed checkpoints kept on disk.
    pub retained: u32,
}

impl Default for CheckpointingOptions {
    fn default() -> Self {
        CheckpointingOptions {
            interval: None,
            directory: None,
            timeout: Duration::from_secs(10 * 60),
            min_pause: Duration::ZERO,
            retained: 1,
        }
    }
}

/// What happens when a task fails.
#[derive(Clone, Debug, PartialEq)]
pub enum RestartStrategy {
    /// The job fails at the first failure.
    None,
    /// Up to `attempts` restarts, `delay` apart.
    FixedDelay { attempts: u32, delay: Duration },
    /// Restarts without end, the delay growing by `multiplier` from
    /// `initial` up to `max`, and going back to `initial` after a run of
    /// `reset_after` without failure (Flink's default with checkpoints).
    ExponentialDelay {
        initial: Duration,
        max: Duration,
        multiplier: f64,
        reset_after: Duration,
        attempts: u32,
    },
}

impl Eq for RestartStrategy {}

/// Where a job's state starts from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreOptions {
    /// A savepoint or retained checkpoint: its directory or its
    /// `_metadata` file.
    pub path: PathBuf,
    /// Drop the state of operators the job no longer has, instead of
    /// refusing to start.
    pub allow_non_restored_state: bool,
}

/// Parses a duration such as `100ms`, `1s` or `2min`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("'{text}' is not a duration such as 100ms, 1s or 2min ({error})"))
}

/// How long a record may wait in a partly filled buffer while its task
/// stays busy, unless the job says otherwise (Flink's
/// `execution.buffer-timeout`).
pub const DEFAULT_BUFFER_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(100);

pub(crate) fn add_options(command: clap::Command) -> clap::Command {
    let duration = |name: &'static str, help: &'static str| {
        clap::Arg::new(name)
            .long(name)
            .value_name("DURATION")
            .value_parser(parse_duration)
            .help(help)
    };
    command
        .arg(duration(
            "buffer-timeout",
            "Ship a partly filled buffer of a busy task after this long (a task with no more input ready ships at once) [default: 100ms]",
        ))
        .arg(duration(
            "checkpoint-interval",
            "Take a checkpoint this often (e.g. 100ms, 1s); off by default",
        ))
        .arg(
            clap::Arg::new("checkpoint-dir")
                .long("checkpoint-dir")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Where checkpoints are written (a local disk or a shared mount)"),
        )
        .arg(duration("checkpoint-timeout", "Abort a checkpoint not complete after this long [default: 10min]"))
        .arg(duration("min-pause-between-checkpoints", "The least time from the end of a checkpoint to the start of the next [default: 0ms]"))
        .arg(
            clap::Arg::new("retained-checkpoints")
                .long("retained-checkpoints")
                .value_name("N")
                .default_value("1")
                .value_parser(clap::value_parser!(u32).range(1..))
                .help("Completed checkpoints kept on disk"),
        )
        .arg(
            clap::Arg::new("restart-strategy")
                .long("restart-strategy")
                .value_parser(["none", "fixed-delay", "exponential-delay"])
                .help("What a task failure does [default: exponential-delay with checkpoints, none without]"),
        )
        .arg(
            clap::Arg::new("restart-attempts")
                .long("restart-attempts")
                .value_name("N")
                .value_parser(clap::value_parser!(u32))
                .help("Restarts before the job fails [default: 1 for fixed-delay, unlimited for exponential-delay]"),
        )
        .arg(duration("restart-delay", "The delay before a restart (the first one, for exponential-delay) [default: 1s]"))
        .arg(duration("restart-max-delay", "The longest delay of exponential-delay [default: 1min]"))
        .arg(
            clap::Arg::new("from-savepoint")
                .long("from-savepoint")
                .short('s')
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Start from a savepoint or a retained checkpoint (its directory or its _metadata file)"),
        )
        .arg(
            clap::Arg::new("allow-non-restored-state")
                .long("allow-non-restored-state")
                .short('n')
                .action(clap::ArgAction::SetTrue)
                .help("Drop the state of operators that the job no longer has, instead of refusing to start"),
        )
}

pub(crate) fn checkpointing_from(matches: &clap::ArgMatches) -> CheckpointingOptions {
    let defaults = CheckpointingOptions::default();
    CheckpointingOptions {
        interval: matches.get_one::<Duration>("checkpoint-interval").copied(),
        directory: matches.get_one::<PathBuf>("checkpoint-dir").cloned(),
        timeout: matches
            .get_one::<Duration>("checkpoint-timeout")
            .copied()
            .unwrap_or(defaults.timeout),
        min_pause: matches
            .get_one::<Duration>("min-pause-between-checkpoints")
            .copied()
            .unwrap_or(defaults.min_pause),
        retained: matches
            .get_one::<u32>("retained-checkpoints")
            .copied()
            .unwrap_or(defaults.retained),
    }
}

pub(crate) fn restart_from(matches: &clap::ArgMatches, checkpointing: bool) -> RestartStrategy {
    let delay = matches
        .get_one::<Duration>("restart-delay")
        .copied()
        .unwrap_or(Duration::from_secs(1));
    let attempts = matches.get_one::<u32>("restart-attempts").copied();
    let name = matches
        .get_one::<String>("restart-strategy")
        .map(String::as_str)
        .unwrap_or(if checkpointing {
            "exponential-delay"
        } else {
            "none"
        });
    match name {
        "fixed-delay" => RestartStrategy::FixedDelay {
            attempts: attempts.unwrap_or(1),
            delay,
        },
        "exponential-delay" => RestartStrategy::ExponentialDelay {
            initial: delay,
            max: matches
                .get_one::<Duration>("restart-max-delay")
                .copied()
                .unwrap_or(Duration::from_secs(60))
                .max(delay),
            multiplier: 1.5,
            reset_after: Duration::from_secs(60 * 60),
            attempts: attempts.unwrap_or(u32::MAX),
        },
        _ => RestartStrategy::None,
    }
}

pub(crate) fn restore_from(matches: &clap::ArgMatches) -> Option<RestoreOptions> {
    matches
        .get_one::<PathBuf>("from-savepoint")
        .map(|path| RestoreOptions {
            path: path.clone(),
            allow_non_restored_state: matches.get_flag("allow-non-restored-state"),
        })
}
