//! The `strom` command line: run a job program on the embedded local
//! cluster (`strom local`), or print its JobGraph (`strom plan`).
//!
//! A user who writes job programs of their own makes a binary whose `main`
//! calls [`main_with_programs`] with their programs: the same command line,
//! with their programs beside (or instead of) the built-in ones.

mod client;

use std::process::ExitCode;
use std::sync::mpsc;

use clap::{Arg, ArgMatches, Command};
use strom_core::program::JobOutcome;
use strom_core::{JobArgs, Program};
use strom_scheduler::rest::RestServer;
use strom_scheduler::taskmanager::allowed_cpus;
use strom_scheduler::{JobEvent, LocalCluster, LocalClusterConfig};

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
                .arg(
                    Arg::new("rest-port")
                        .long("rest-port")
                        .value_name("PORT")
                        .default_value("8081")
                        .value_parser(clap::value_parser!(u16))
                        .help("The port of the REST API (for `strom savepoint`, `stop`, `list`, `cancel`); if it is taken, any free port; 0: any free port"),
                )
                .arg(
                    Arg::new("bind")
                        .long("bind")
                        .value_name("ADDRESS")
                        .default_value("127.0.0.1")
                        .value_parser(clap::value_parser!(std::net::IpAddr))
                        .help("The address the REST API listens on"),
                )
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
        .subcommand(
            Command::new("checkpoint")
                .about("Look into checkpoints and savepoints")
                .subcommand_required(true)
                .subcommand(
                    Command::new("inspect")
                        .about("List what a checkpoint or savepoint holds (operators, key groups, sizes) and check every checksum")
                        .arg(
                            Arg::new("path")
                                .required(true)
                                .value_name("PATH")
                                .value_parser(clap::value_parser!(std::path::PathBuf))
                                .help("The checkpoint's or savepoint's directory, or its _metadata file"),
                        ),
                ),
        )
        .subcommands(client::commands())
        .arg(Arg::new("quiet").long("quiet").hide(true).action(clap::ArgAction::SetTrue))
}

/// A panic in a task is mostly user code failing: the task catches it and
/// the JobManager reports it (and restarts the job, or fails it), so on a
/// slot's thread the default hook's paragraph and backtrace would bury the
/// report; one line says where it happened. Panics anywhere else keep the
/// default report.
fn quiet_task_panics() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        match thread.name().filter(|name| name.starts_with("strom-slot-")) {
            Some(name) => {
                let location = info
                    .location()
                    .map(|location| format!(" at {}:{}", location.file(), location.line()))
                    .unwrap_or_default();
                eprintln!("panic on {name}{location}");
            }
            None => default_hook(info),
        }
    }));
}

/// Prints a one-line error and returns the exit code.
fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(code)
}

/// Runs the command line over `programs`.
pub fn main_with_programs(programs: Vec<Program>) -> ExitCode {
    quiet_task_panics();
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
        Some(("checkpoint", checkpoint_matches)) => {
            let Some(("inspect", inspect_matches)) = checkpoint_matches.subcommand() else {
                unreachable!("clap requires a known subcommand")
            };
            let path = inspect_matches
                .get_one::<std::path::PathBuf>("path")
                .expect("the path is required");
            let report = strom_state::inspect(path);
            print!("{report}");
            if report.is_intact() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_JOB_FAILED)
            }
        }
        Some((name, client_matches))
            if client::commands()
                .iter()
                .any(|command| command.get_name() == name) =>
        {
            client::run(name, client_matches)
        }
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
                let bind = *verb_matches
                    .get_one::<std::net::IpAddr>("bind")
                    .expect("a default");
                let port = *verb_matches.get_one::<u16>("rest-port").expect("a default");
                run_local(program, &job_args, program_matches, (bind, port).into())
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
    if job_args.checkpointing.interval.is_some() && job_args.checkpointing.directory.is_none() {
        return Err(
            "--checkpoint-interval needs --checkpoint-dir: where should checkpoints go?"
                .to_string(),
        );
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

fn run_local(
    program: &Program,
    job_args: &JobArgs,
    matches: &ArgMatches,
    rest_address: std::net::SocketAddr,
) -> ExitCode {
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
    let cluster = match LocalCluster::start(vec![*program], LocalClusterConfig::slots(slot_count)) {
        Ok(cluster) => cluster,
        Err(message) => return fail(EXIT_JOB_FAILED, &message),
    };
    let rest = RestServer::start(cluster.job_manager(), rest_address, None).or_else(|_| {
        // The port is taken (another job, another cluster): any port will do.
        RestServer::start(cluster.job_manager(), (rest_address.ip(), 0).into(), None)
    });
    let rest = match rest {
        Ok(rest) => {
            eprintln!("REST API at http://{}", rest.local_addr());
            Some(rest)
        }
        Err(message) => {
            eprintln!("warning: no REST API: {message}");
            None
        }
    };
    let (events, event_inbox) = mpsc::channel();
    let printer = std::thread::spawn(move || {
        for event in event_inbox {
            print_event(&event);
        }
    });
    let result = cluster.execute_with_events(program.name, job_args.clone(), Some(events));
    // The sender went with the job: the printer ends once all is printed.
    let _ = printer.join();
    if let Some(rest) = rest {
        rest.stop();
    }
    match result {
        Ok(result) if result.stopped_with_savepoint.is_some() => {
            let path = result.stopped_with_savepoint.expect("a savepoint");
            println!(
                "job {} stopped with savepoint {}",
                result.job_id,
                path.display()
            );
            shutdown_within(cluster, CLUSTER_SHUTDOWN_TIMEOUT);
            ExitCode::SUCCESS
        }
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

/// One line on standard error per thing that happens to a running job.
fn print_event(event: &JobEvent) {
    match event {
        JobEvent::Submitted {
            job_id,
            job_name,
            restored_from,
        } => {
            eprintln!("job {job_id} ({job_name}) submitted");
            if let Some(path) = restored_from {
                eprintln!("restoring from {}", path.display());
            }
        }
        JobEvent::CheckpointCompleted {
            id,
            savepoint,
            path,
            duration,
            size_bytes,
            pause_max,
            alignment_max,
        } => eprintln!(
            "{} {id} completed in {} ms, {size_bytes} bytes, longest stream pause {} us, longest alignment {} us: {}",
            if *savepoint {
                "savepoint"
            } else {
                "checkpoint"
            },
            duration.as_millis(),
            pause_max.as_micros(),
            alignment_max.as_micros(),
            path.display()
        ),
        JobEvent::CheckpointAborted { id, reason } => {
            eprintln!("checkpoint {id} aborted: {reason}")
        }
        JobEvent::Restarting {
            restart,
            delay,
            cause,
            from_checkpoint,
        } => eprintln!(
            "restart {restart} in {} ms from {}: {cause}",
            delay.as_millis(),
            from_checkpoint
                .as_ref()
                .map(|path| path.display().to_string())
                .unwrap_or_else(|| "the start".to_string())
        ),
    }
}
