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
                    port_arg("rest-port", "8081", "The port of the REST API (for `strom savepoint`, `stop`, `list`, `cancel`); if it is taken, any free port; 0: any free port"),
                )
                .arg(
                    bind_arg("The address the REST API listens on"),
                )
                .subcommand_value_name("PROGRAM")
                .subcommands(program_commands("Run")),
        )
        .subcommand(
            client::with_connection_args(
                Command::new("run")
                    .about("Submit a job program to a cluster's JobManager (its REST address); attached, follow it to its end and print its result")
                    .subcommand_required(true)
                    .arg(
                        Arg::new("detached")
                            .long("detached")
                            .short('d')
                            .action(clap::ArgAction::SetTrue)
                            .help("Print the job id and return; the job runs on"),
                    )
                    .subcommand_value_name("PROGRAM")
                    .subcommands(program_commands("Submit")),
            ),
        )
        .subcommand(
            Command::new("jobmanager")
                .about("Run a standalone cluster's JobManager: the REST API (for clients) and the control port (for TaskManagers)")
                .arg(
                    bind_arg("The address both ports listen on (0.0.0.0 for every interface)"),
                )
                .arg(
                    port_arg("rest-port", "8081", "The REST API's port (0: any free port)"),
                )
                .arg(
                    port_arg("rpc-port", "6123", "The control port TaskManagers register at (0: any free port)"),
                )
                .arg(secret_file_arg())
                .arg(
                    duration_arg("heartbeat-timeout", "5s", "A TaskManager silent this long is lost, and its jobs restart elsewhere (a closed connection is lost at once)"),
                )
                .arg(
                    duration_arg("slot-wait-timeout", "5min", "How long a job waits for enough free slots before it fails"),
                )
                .arg(
                    Arg::new("application")
                        .long("application")
                        .action(clap::ArgAction::SetTrue)
                        .help("Application mode: run the one program given after the options, print its result, and exit (with the TaskManagers) when it ends"),
                )
                .subcommand_value_name("PROGRAM")
                .subcommands(program_commands("Run in application mode")),
        )
        .subcommand(
            Command::new("taskmanager")
                .about("Run a standalone cluster's TaskManager: register its slots (one pinned core each) with the JobManager and run the subtasks it deploys")
                .arg(
                    Arg::new("jobmanager")
                        .long("jobmanager")
                        .short('m')
                        .value_name("HOST:PORT")
                        .default_value("127.0.0.1:6123")
                        .help("The JobManager's control port (its --rpc-port, not the REST port)"),
                )
                .arg(
                    Arg::new("slots")
                        .long("slots")
                        .value_name("N")
                        .value_parser(clap::value_parser!(u32).range(1..=1024))
                        .help("How many slots to offer [default: one per core of --cores, else 1]"),
                )
                .arg(
                    Arg::new("cores")
                        .long("cores")
                        .value_name("LIST")
                        .value_parser(parse_cores)
                        .help("The cores to pin the slots to, like 0,2-3 (slot i on the i-th) [default: every core this process may use]"),
                )
                .arg(
                    Arg::new("allow-oversubscribe")
                        .long("allow-oversubscribe")
                        .action(clap::ArgAction::SetTrue)
                        .help("Offer more slots than cores (slots then share cores)"),
                )
                .arg(
                    bind_arg("The address of the data port; other TaskManagers connect to it, so on several machines give this machine's address"),
                )
                .arg(
                    port_arg("data-port", "0", "The data port (0: any free port)"),
                )
                .arg(secret_file_arg())
                .arg(
                    duration_arg("registration-timeout", "5min", "How long to keep trying to reach the JobManager"),
                )
                .arg(
                    duration_arg("heartbeat-timeout", "5s", "A JobManager silent this long is lost: the TaskManager stops its subtasks and registers again"),
                )
                .arg(
                    Arg::new("busy-poll")
                        .long("busy-poll")
                        .value_name("DURATION")
                        .value_parser(strom_core::config::parse_duration)
                        .help("Busy-poll: an idle slot spins this long before it sleeps, so that the next record finds it awake (microseconds instead of a wake-up); costs a core per slot while idle. Default: sleep at once"),
                ),
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
        Some(("jobmanager", jobmanager_matches)) => {
            run_jobmanager(&programs, jobmanager_matches, &arguments)
        }
        Some(("taskmanager", taskmanager_matches)) => {
            run_taskmanager(&programs, taskmanager_matches)
        }
        Some((verb @ ("local" | "plan" | "run"), verb_matches)) => {
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
            } else if verb == "run" {
                client::run_program(
                    verb_matches,
                    program,
                    arguments[position + 1..].to_vec(),
                    program_matches,
                )
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
        Ok(result) => {
            print_result(program, matches, result);
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

/// Prints a finished job's result on standard output: the savepoint it was
/// stopped with, or the program's report.
fn print_result(program: &Program, matches: &ArgMatches, result: strom_scheduler::JobResult) {
    if let Some(path) = &result.stopped_with_savepoint {
        println!(
            "job {} stopped with savepoint {}",
            result.job_id,
            path.display()
        );
        return;
    }
    let outcome = JobOutcome {
        accumulators: result.accumulators,
        duration: result.duration,
        slots_used: result.slots_used,
    };
    for line in (program.report)(matches, &outcome) {
        println!("{line}");
    }
}

/// `--NAME DURATION` (like `5s`, `5min`) with a default.
fn duration_arg(name: &'static str, default: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .value_name("DURATION")
        .default_value(default)
        .value_parser(strom_core::config::parse_duration)
        .help(help)
}

/// `--bind ADDRESS`, 127.0.0.1 unless given.
fn bind_arg(help: &'static str) -> Arg {
    Arg::new("bind")
        .long("bind")
        .value_name("ADDRESS")
        .default_value("127.0.0.1")
        .value_parser(clap::value_parser!(std::net::IpAddr))
        .help(help)
}

/// `--NAME PORT` with a default.
fn port_arg(name: &'static str, default: &'static str, help: &'static str) -> Arg {
    Arg::new(name)
        .long(name)
        .value_name("PORT")
        .default_value(default)
        .value_parser(clap::value_parser!(u16))
        .help(help)
}

fn secret_file_arg() -> Arg {
    Arg::new("secret-file")
        .long("secret-file")
        .value_name("PATH")
        .value_parser(clap::value_parser!(std::path::PathBuf))
        .help("A file holding the cluster's shared secret: every REST request (as a bearer token) and every TaskManager connection must present it")
}

/// Parses a core list like `0,2-3`.
fn parse_cores(text: &str) -> Result<Vec<usize>, String> {
    let mut cores = Vec::new();
    for part in text.split(',') {
        let part = part.trim();
        let bad = || format!("'{part}' is not a core or a range of cores (like 0,2-3)");
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (
                first.trim().parse::<usize>().map_err(|_| bad())?,
                last.trim().parse::<usize>().map_err(|_| bad())?,
            ),
            None => {
                let core = part.parse::<usize>().map_err(|_| bad())?;
                (core, core)
            }
        };
        if first > last {
            return Err(bad());
        }
        for core in first..=last {
            if cores.contains(&core) {
                return Err(format!("core {core} is listed twice"));
            }
            cores.push(core);
        }
    }
    Ok(cores)
}

fn read_secret(matches: &ArgMatches) -> Result<Option<Vec<u8>>, String> {
    matches
        .get_one::<std::path::PathBuf>("secret-file")
        .map(|path| strom_scheduler::cluster::read_secret_file(path))
        .transpose()
}

/// `strom jobmanager`: serves until killed, or in application mode until
/// its one job ends.
fn run_jobmanager(programs: &[Program], matches: &ArgMatches, arguments: &[String]) -> ExitCode {
    use strom_scheduler::cluster::ControlServer;
    use strom_scheduler::jobmanager::{JobManager, JobManagerConfig};
    use strom_scheduler::JobManagerHandle;
    let bind = *matches
        .get_one::<std::net::IpAddr>("bind")
        .expect("a default");
    let rest_port = *matches.get_one::<u16>("rest-port").expect("a default");
    let rpc_port = *matches.get_one::<u16>("rpc-port").expect("a default");
    let heartbeat_timeout = *matches
        .get_one::<std::time::Duration>("heartbeat-timeout")
        .expect("a default");
    let slot_wait_timeout = *matches
        .get_one::<std::time::Duration>("slot-wait-timeout")
        .expect("a default");
    let secret = match read_secret(matches) {
        Ok(secret) => secret,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    let rest_secret = match secret
        .as_ref()
        .map(|secret| String::from_utf8(secret.clone()))
    {
        Some(Err(_)) => return fail(EXIT_USAGE, "the secret file is not UTF-8 text"),
        Some(Ok(secret)) => Some(secret),
        None => None,
    };
    let application = matches.get_flag("application");
    let application_program = match (application, matches.subcommand()) {
        (true, Some((name, program_matches))) => {
            let program = programs
                .iter()
                .find(|program| program.name == name)
                .expect("clap knows only these");
            let position = arguments
                .iter()
                .position(|argument| argument == name)
                .expect("the program name");
            let job_args =
                JobArgs::from_matches(arguments[position + 1..].to_vec(), program_matches);
            if let Err(message) = check_parallelism(&job_args) {
                return fail(EXIT_USAGE, &message);
            }
            Some((program, job_args, program_matches.clone()))
        }
        (true, None) => {
            return fail(
                EXIT_USAGE,
                "--application needs the program to run after the options, like `strom jobmanager --application nexmark --query q5`",
            )
        }
        (false, Some((name, _))) => {
            return fail(
                EXIT_USAGE,
                &format!("a program ('{name}') is given without --application; submit jobs with `strom run`"),
            )
        }
        (false, None) => None,
    };
    let (sender, inbox) = mpsc::channel();
    let job_manager = JobManager::with_config(
        programs.to_vec(),
        JobManagerConfig {
            slot_wait_timeout: Some(slot_wait_timeout),
            log: true,
        },
    );
    let job_manager_thread = match std::thread::Builder::new()
        .name("strom-jobmanager".to_string())
        .spawn(move || job_manager.run(inbox))
    {
        Ok(thread) => thread,
        Err(error) => {
            return fail(
                EXIT_JOB_FAILED,
                &format!("cannot start the JobManager thread: {error}"),
            )
        }
    };
    let control = match ControlServer::start(
        (bind, rpc_port).into(),
        secret,
        heartbeat_timeout,
        sender.clone(),
    ) {
        Ok(control) => control,
        Err(message) => return fail(EXIT_JOB_FAILED, &message),
    };
    let rest = match RestServer::start(
        JobManagerHandle::new(sender.clone()),
        (bind, rest_port).into(),
        rest_secret,
    ) {
        Ok(rest) => rest,
        Err(message) => return fail(EXIT_JOB_FAILED, &message),
    };
    eprintln!(
        "JobManager started: REST API at http://{}, control port {} (TaskManagers: strom taskmanager --jobmanager {})",
        rest.local_addr(),
        control.local_addr(),
        control.local_addr()
    );
    let Some((program, job_args, program_matches)) = application_program else {
        let _ = job_manager_thread.join();
        return ExitCode::SUCCESS;
    };
    // The JobManager logs the job's events itself.
    let (reply, result) = mpsc::channel();
    let submitted = sender.send(strom_scheduler::messages::ToJobManager::SubmitJob {
        program: program.name.to_string(),
        args: job_args,
        reply,
        events: None,
    });
    let result = match submitted {
        Ok(()) => result
            .recv()
            .unwrap_or_else(|_| Err("the JobManager stopped before the job ended".to_string())),
        Err(_) => Err("the JobManager stopped".to_string()),
    };
    // The JobManager tells its TaskManagers to shut down too; the process
    // stays until that has been sent, or they would register again.
    let _ = sender.send(strom_scheduler::messages::ToJobManager::Shutdown);
    let _ = job_manager_thread.join();
    if !control.finish_sending(strom_scheduler::cluster::FINISH_SENDING_TIMEOUT) {
        eprintln!(
            "some TaskManagers were not told to shut down within {:?}; they will try to register again",
            strom_scheduler::cluster::FINISH_SENDING_TIMEOUT
        );
    }
    rest.stop();
    match result {
        Ok(result) => {
            print_result(program, &program_matches, result);
            ExitCode::SUCCESS
        }
        Err(message) => fail(EXIT_JOB_FAILED, &message),
    }
}

/// `strom taskmanager`: serves its JobManager until told to shut down.
fn run_taskmanager(programs: &[Program], matches: &ArgMatches) -> ExitCode {
    use strom_scheduler::cluster::{run_task_manager, TaskManagerConfig};
    let allowed = allowed_cpus();
    let cores: Vec<usize> = matches
        .get_one::<Vec<usize>>("cores")
        .cloned()
        .unwrap_or_default();
    if let Some(core) = cores.iter().find(|core| !allowed.contains(core)) {
        return fail(
            EXIT_USAGE,
            &format!("--cores: core {core} is not one this process may run on ({allowed:?})"),
        );
    }
    let core_count = if cores.is_empty() {
        allowed.len()
    } else {
        cores.len()
    } as u32;
    let slots = matches
        .get_one::<u32>("slots")
        .copied()
        .unwrap_or(if cores.is_empty() { 1 } else { core_count });
    if slots > core_count && !matches.get_flag("allow-oversubscribe") {
        return fail(
            EXIT_USAGE,
            &format!(
                "--slots {slots} is more than the {core_count} cores to pin them to; pass --allow-oversubscribe to share cores"
            ),
        );
    }
    let secret = match read_secret(matches) {
        Ok(secret) => secret,
        Err(message) => return fail(EXIT_USAGE, &message),
    };
    let bind = *matches
        .get_one::<std::net::IpAddr>("bind")
        .expect("a default");
    let data_port = *matches.get_one::<u16>("data-port").expect("a default");
    let config = TaskManagerConfig {
        job_manager: matches
            .get_one::<String>("jobmanager")
            .cloned()
            .expect("a default"),
        slot_count: slots,
        cpus: cores,
        data_bind: (bind, data_port).into(),
        secret,
        registration_timeout: *matches
            .get_one::<std::time::Duration>("registration-timeout")
            .expect("a default"),
        heartbeat_timeout: *matches
            .get_one::<std::time::Duration>("heartbeat-timeout")
            .expect("a default"),
        busy_poll: matches.get_one::<std::time::Duration>("busy-poll").copied(),
    };
    match run_task_manager(programs.to_vec(), config) {
        Ok(()) => {
            eprintln!("TaskManager shut down by its JobManager");
            ExitCode::SUCCESS
        }
        Err(message) => fail(EXIT_JOB_FAILED, &message),
    }
}

/// One line on standard error per thing that happens to a running job.
fn print_event(event: &JobEvent) {
    eprintln!("{event}");
}
