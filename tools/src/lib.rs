//! The `strom` command line: run a job program on the embedded local
//! cluster (`strom local`), or print its JobGraph (`strom plan`).
//!
//! A user who writes job programs of their own makes a binary whose `main`
//! calls [`main_with_programs`] with their programs: the same command line,
//! with their programs beside (or instead of) the built-in ones.

use std::process::ExitCode;

use clap::{Arg, ArgMatches, Command};
use strom_core::program::JobOutcome;
use strom_core::{JobArgs, Program};
use strom_scheduler::taskmanager::allowed_cpus;
use strom_scheduler::{LocalCluster, LocalClusterConfig};

/// Exit code of a bad argument (as clap's).
const EXIT_USAGE: u8 = 2;
/// Exit code of a job that was refused or failed.
const EXIT_JOB_FAILED: u8 = 1;

/// How long the command waits for the local cluster's threads to stop
/// after the job's result is printed; the process ends either way.
const CLUSTER_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Stops the cluster, but never lets a slot that does not stop keep the
/// process from ending once the result is out.
fn shutdown_within(cluster: LocalCluster, timeout: std::time::Duration) {
    let (stopped, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        cluster.shutdown();
        let _ = stopped.send(());
    });
    if wait.recv_timeout(timeout).is_err() {
        eprintln!("warning: the local cluster did not stop within {timeout:?}; exiting anyway");
    }
}

/// The programs the `strom` binary ships.
pub fn builtin_programs() -> Vec<Program> {
    vec![strom_bench::queries::NEXMARK_PROGRAM]
}

fn command(programs: &[Program]) -> Command {
    let program_commands = |verb: &str| -> Vec<Command> {
        programs
            .iter()
            .map(|program| {
                program.full_command().about(format!(
                    "{verb} the '{}' program: {}",
                    program.name, program.about
                ))
            })
            .collect()
    };
    Command::new("strom")
        .about("Strom: stateful stream processing, thread per core")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .arg_required_else_help(true)
        .subcommand(
            Command::new("local")
                .about("Run a job program on an embedded local cluster (a JobManager and a TaskManager in this process)")
                .subcommand_required(true)
                .subcommand_value_name("PROGRAM")
                .subcommands(program_commands("Run")),
        )
        .subcommand(
            Command::new("plan")
                .about("Print the JobGraph of a job program: vertices, chained operators, parallelism, partitioning")
                .subcommand_required(true)
                .subcommand_value_name("PROGRAM")
                .subcommands(program_commands("Plan")),
        )
        .subcommand(Command::new("programs").about("List the job programs this binary knows"))
        .arg(Arg::new("quiet").long("quiet").hide(true).action(clap::ArgAction::SetTrue))
}

/// Prints a one-line error and returns the exit code.
fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// Runs the command line over `programs`.
pub fn main_with_programs(programs: Vec<Program>) -> ExitCode {
    let arguments: Vec<String> = std::env::args().collect();
    let matches = match command(&programs).try_get_matches_from(&arguments) {
        Ok(matches) => matches,
        Err(error) => {
            use clap::error::ErrorKind;
            return match error.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    let _ = error.print();
                    ExitCode::from(
                        if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                            EXIT_USAGE
                        } else {
                            0
                        },
                    )
                }
                _ => fail(
                    EXIT_USAGE,
                    &strom_core::program::first_line(&error.to_string()),
                ),
            };
        }
    };
    match matches.subcommand() {
        Some(("programs", _)) => {
            for program in &programs {
                println!("{}\t{}", program.name, program.about);
            }
            ExitCode::SUCCESS
        }
        Some((verb @ ("local" | "plan"), verb_matches)) => {
            let (program_name, program_matches) =
                verb_matches.subcommand().expect("a program is required");
            let program = programs
                .iter()
                .find(|program| program.name == program_name)
                .expect("clap knows only these");
            // The program's raw arguments: what follows its name.
            let position = arguments
                .iter()
                .position(|argument| argument == program_name)
                .expect("the program name");
            let job_args =
                JobArgs::from_matches(arguments[position + 1..].to_vec(), program_matches);
            if verb == "plan" {
                plan(program, &job_args)
            } else {
                run_local(program, &job_args, program_matches)
            }
        }
        _ => unreachable!("clap requires a known subcommand"),
    }
}

fn check_parallelism(job_args: &JobArgs) -> Result<(), String> {
    if job_args.parallelism > job_args.max_parallelism {
        return Err(format!(
            "--parallelism {} is above the max parallelism {} (set --max-parallelism)",
            job_args.parallelism, job_args.max_parallelism
        ));
    }
    Ok(())
}

fn plan(program: &Program, job_args: &JobArgs) -> ExitCode {
    if let Err(message) = check_parallelism(job_args) {
        return fail(EXIT_USAGE, &message);
    }
    match program.job_graph(job_args) {
        Ok(graph) => {
            print!("{graph}");
            ExitCode::SUCCESS
        }
        Err(message) => fail(EXIT_JOB_FAILED, &message),
    }
}

fn run_local(program: &Program, job_args: &JobArgs, matches: &ArgMatches) -> ExitCode {
    if let Err(message) = check_parallelism(job_args) {
        return fail(EXIT_USAGE, &message);
    }
    let graph = match program.job_graph(job_args) {
        Ok(graph) => graph,
        Err(message) => return fail(EXIT_JOB_FAILED, &message),
    };
    let slot_count = graph.slots_required();
    let cores = allowed_cpus().len() as u32;
    let oversubscribe = matches.get_flag("allow-oversubscribe");
    if slot_count > cores && !oversubscribe {
        return fail(
            EXIT_USAGE,
            &format!(
                "--parallelism {} needs {slot_count} slots but only {cores} cores are available; pass --allow-oversubscribe to share cores",
                job_args.parallelism
            ),
        );
    }
    drop(graph);
    let cluster = match LocalCluster::start(vec![*program], LocalClusterConfig { slot_count }) {
        Ok(cluster) => cluster,
        Err(message) => return fail(EXIT_JOB_FAILED, &message),
    };
    match cluster.execute(program.name, job_args.clone()) {
        Ok(result) => {
            let outcome = JobOutcome {
                accumulators: result.accumulators,
                duration: result.duration,
                slots_used: result.slots_used,
            };
            for line in (program.report)(matches, &outcome) {
                println!("{line}");
            }
            shutdown_within(cluster, CLUSTER_SHUTDOWN_TIMEOUT);
            ExitCode::SUCCESS
        }
        Err(message) => {
            eprintln!("error: {message}");
            // The JobManager has cancelled the job's tasks; do not wait for
            // them to unwind: a failed job ends the process at once.
            std::process::exit(i32::from(EXIT_JOB_FAILED));
        }
    }
}
