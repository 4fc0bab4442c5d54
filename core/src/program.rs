//! Job programs: Rust code that builds a job, registered under a name.
//!
//! Every process of a cluster runs the same binary, so a job travels as its
//! program's name and arguments, and each process rebuilds the same
//! JobGraph from them, as a Flink job travels as a jar and a main class.

use std::time::Duration;

use crate::accumulator::Accumulators;
use crate::config::{CheckpointingOptions, RestartStrategy, RestoreOptions};
use crate::graph::JobGraph;
use crate::stream::StreamExecutionEnvironment;

/// The job-level settings that every program accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobArgs {
    /// The program's own arguments (what follows its name).
    pub arguments: Vec<String>,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// The longest a record waits in a partly filled buffer of a busy task.
    pub buffer_timeout: Duration,
    pub checkpointing: CheckpointingOptions,
    pub restart: RestartStrategy,
    /// The savepoint or checkpoint the job starts from.
    pub restore: Option<RestoreOptions>,
}

/// A named job program.
#[derive(Clone, Copy)]
pub struct Program {
    pub name: &'static str,
    pub about: &'static str,
    /// The program's own arguments, for parsing and `--help`.
    pub command: fn() -> clap::Command,
    /// Builds the job into `env` from the parsed arguments.
    pub build: fn(&StreamExecutionEnvironment, &clap::ArgMatches) -> Result<(), String>,
    /// The lines that present a finished job's result to a person.
    pub report: fn(&clap::ArgMatches, &JobOutcome) -> Vec<String>,
}

/// A finished job, as a program's `report` sees it.
#[derive(Clone, Debug)]
pub struct JobOutcome {
    pub accumulators: Accumulators,
    /// From deployment to the last subtask finishing.
    pub duration: Duration,
    /// The cores (slots) the job ran on.
    pub slots_used: u32,
}

/// The report of a program without its own: every accumulator, one a line.
pub fn report_accumulators(_matches: &clap::ArgMatches, outcome: &JobOutcome) -> Vec<String> {
    outcome
        .accumulators
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect()
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").field("name", &self.name).finish()
    }
}

impl Program {
    /// The program's arguments with the job options that every program takes.
    pub fn full_command(&self) -> clap::Command {
        with_job_options((self.command)().name(self.name).about(self.about))
    }

    /// Parses the program's arguments (and the job options among them).
    pub fn parse(&self, arguments: &[String]) -> Result<clap::ArgMatches, String> {
        self.full_command()
            .no_binary_name(true)
            .try_get_matches_from(arguments)
            .map_err(|error| first_line(&error.to_string()))
    }

    /// Parses the arguments, builds the job and validates its graph.
    pub fn job_graph(&self, args: &JobArgs) -> Result<JobGraph, String> {
        let matches = self.parse(&args.arguments)?;
        let env = StreamExecutionEnvironment::new();
        env.set_job_name(self.name);
        env.set_parallelism(args.parallelism);
        env.set_max_parallelism(args.max_parallelism);
        // A panic in the program's code is the program's error, not the
        // process's: the JobManager that runs it serves other jobs too.
        let built = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (self.build)(&env, &matches)
        }))
        .map_err(|payload| {
            let message = crate::error::panic_message(payload.as_ref());
            format!(
                "job program '{}' panicked while building the job: {message}",
                self.name
            )
        })?;
        built?;
        env.build().map_err(|error| error.to_string())
    }
}

/// A (clap) error message on one line: its first paragraph, lines joined,
/// without the `error: ` prefix and the usage that follows.
pub fn first_line(message: &str) -> String {
    let paragraph: Vec<&str> = message
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let line = paragraph.join(" ");
    line.strip_prefix("error: ").unwrap_or(&line).to_string()
}

/// Adds the options every job takes: `--parallelism`, `--max-parallelism`,
/// `--allow-oversubscribe`, and those of checkpoints, restarts and restore
/// (see [`crate::config`]).
pub fn with_job_options(command: clap::Command) -> clap::Command {
    crate::config::add_options(command)
        .arg(
            clap::Arg::new("parallelism")
                .long("parallelism")
                .short('p')
                .default_value("1")
                .allow_negative_numbers(true)
                .value_parser(clap::value_parser!(u32).range(1..))
                .help("The default parallelism of the job's operators"),
        )
        .arg(
            clap::Arg::new("max-parallelism")
                .long("max-parallelism")
                .default_value("128")
                .value_parser(
                    clap::value_parser!(u32)
                        .range(1..=i64::from(crate::key::MAX_PARALLELISM_UPPER_BOUND)),
                )
                .help("The number of key groups: the upper bound of any operator's parallelism"),
        )
        .arg(
            clap::Arg::new("allow-oversubscribe")
                .long("allow-oversubscribe")
                .action(clap::ArgAction::SetTrue)
                .help("Run more slots than there are cores (slots then share cores)"),
        )
}

impl JobArgs {
    /// A job's arguments with default options and `parallelism`.
    pub fn new(arguments: Vec<String>, parallelism: u32) -> JobArgs {
        JobArgs {
            arguments,
            parallelism,
            max_parallelism: crate::key::DEFAULT_MAX_PARALLELISM,
            buffer_timeout: crate::config::DEFAULT_BUFFER_TIMEOUT,
            checkpointing: CheckpointingOptions::default(),
            restart: RestartStrategy::None,
            restore: None,
        }
    }

    /// The job options from parsed arguments, with the raw arguments kept
    /// so that every process can parse them again.
    pub fn from_matches(arguments: Vec<String>, matches: &clap::ArgMatches) -> JobArgs {
        let checkpointing = crate::config::checkpointing_from(matches);
        let restart = crate::config::restart_from(matches, checkpointing.interval.is_some());
        JobArgs {
            buffer_timeout: matches
                .get_one::<Duration>("buffer-timeout")
                .copied()
                .unwrap_or(crate::config::DEFAULT_BUFFER_TIMEOUT),
            checkpointing,
            restart,
            restore: crate::config::restore_from(matches),
            arguments,
            parallelism: *matches
                .get_one::<u32>("parallelism")
                .expect("--parallelism has a default"),
            max_parallelism: *matches
                .get_one::<u32>("max-parallelism")
                .expect("--max-parallelism has a default"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn panicking_build(
        _env: &StreamExecutionEnvironment,
        _matches: &clap::ArgMatches,
    ) -> Result<(), String> {
        panic!("no such table");
    }

    #[test]
    fn a_program_that_panics_while_building_is_an_error_not_a_crash() {
        let program = Program {
            name: "broken",
            about: "panics while building",
            command: || clap::Command::new("broken"),
            build: panicking_build,
            report: report_accumulators,
        };
        let args = JobArgs::new(Vec::new(), 1);
        let error = program.job_graph(&args).err().expect("the build panicked");
        assert_eq!(
            error,
            "job program 'broken' panicked while building the job: no such table"
        );
    }
}
