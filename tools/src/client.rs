//! The client commands that control running jobs through the JobManager's
//! REST API (`strom_scheduler::rest`), as Flink's `flink savepoint`,
//! `flink stop`, `flink cancel` and `flink list`:
//!
//! - `strom savepoint JOB_ID [TARGET_DIR]`: `POST /jobs/:id/savepoints`,
//!   prints `Savepoint completed. Path: <path>`.
//! - `strom stop JOB_ID [--savepoint-path DIR]`: `POST /jobs/:id/stop`,
//!   stop with a savepoint, prints `Savepoint completed. Path: <path>`.
//! - `strom cancel JOB_ID`: `PATCH /jobs/:id?mode=cancel`, prints
//!   `Cancelled job <id>.`
//! - `strom list`: `GET /jobs/overview`, prints `<id> : <name> (<state>)`
//!   per job.
//!
//! Each takes `--jobmanager HOST:PORT` (default `127.0.0.1:8081`, Flink's
//! REST port) and `--secret-file PATH` when the JobManager has a secret.
//! The result goes to stdout, progress and errors to stderr; the exit code
//! is 0 when done, 1 when the JobManager could not be reached or refused,
//! 2 for a bad argument.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Arg, ArgMatches, Command};
use serde_json::{json, Value};
use strom_core::program::JobOutcome;
use strom_core::Program;
use strom_scheduler::JobId;

/// Exit code of a bad argument (as clap's).
const EXIT_USAGE: u8 = 2;
/// Exit code of a JobManager that could not be reached or refused.
const EXIT_REFUSED: u8 = 1;

/// Flink's REST port.
const JOBMANAGER_DEFAULT: &str = "127.0.0.1:8081";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a listing or a cancel may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long we wait for a savepoint: the JobManager answers once it is
/// complete, which takes as long as writing the job's state.
const SAVEPOINT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The largest answer we read (ours are small JSON documents).
const ANSWER_SIZE_MAX: u64 = 1024 * 1024;
/// The largest secret file we read.
const SECRET_SIZE_MAX: u64 = 4096;

/// The client subcommands: savepoint, stop, cancel, list.
pub fn commands() -> Vec<Command> {
    let job_id = || {
        Arg::new("job_id")
            .value_name("JOB_ID")
            .required(true)
            .help("The job's id (32 hex digits, as `strom list` shows)")
    };
    vec![
        with_connection_args(
            Command::new("savepoint")
                .about("Take a savepoint of a running job and print its path")
                .arg(job_id())
                .arg(
                    Arg::new("target_directory")
                        .value_name("TARGET_DIR")
                        .value_parser(clap::value_parser!(PathBuf))
                        .help("Where to write the savepoint [default: the job's checkpoint directory]/savepoints"),
                ),
        ),
        with_connection_args(
            Command::new("stop")
                .about("Stop a running job with a savepoint and print its path")
                .arg(job_id())
                .arg(
                    Arg::new("savepoint_path")
                        .long("savepoint-path")
                        .short('p')
                        .alias("savepointPath")
                        .value_name("DIR")
                        .value_parser(clap::value_parser!(PathBuf))
                        .help("Where to write the savepoint [default: the job's checkpoint directory]/savepoints"),
                ),
        ),
        with_connection_args(
            Command::new("cancel")
                .about("Cancel a running job without a savepoint")
                .arg(job_id()),
        ),
        with_connection_args(
            Command::new("list")
                .about("List the running jobs (with --all, the ended ones too)")
                .arg(
                    Arg::new("all")
                        .long("all")
                        .short('a')
                        .action(clap::ArgAction::SetTrue)
                        .help("Also list the jobs that finished, failed or were cancelled"),
                ),
        ),
    ]
}

/// Adds `--jobmanager` and `--secret-file`.
pub fn with_connection_args(command: Command) -> Command {
    command
        .arg(
            Arg::new("jobmanager")
                .long("jobmanager")
                .short('m')
                .value_name("HOST:PORT")
                .default_value(JOBMANAGER_DEFAULT)
                .help("The JobManager's REST address"),
        )
        .arg(
            Arg::new("secret_file")
                .long("secret-file")
                .value_name("PATH")
                .value_parser(clap::value_parser!(PathBuf))
                .help("A file holding the JobManager's REST secret, sent as a bearer token"),
        )
}

/// How often an attached `strom run` asks how its job is doing.
const POLL_INTERVAL: Duration = Duration::from_millis(500);
/// How often it prints a progress line while the job runs.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// `strom run`: submits a program with its raw arguments (`POST /jobs`);
/// detached, prints the job id; attached, shows progress on stderr until
/// the job ends, then prints the program's report (made from the job's
/// accumulators) on stdout.
pub fn run_program(
    matches: &ArgMatches,
    program: &Program,
    arguments: Vec<String>,
    program_matches: &ArgMatches,
) -> ExitCode {
    match submit_and_follow(matches, program, arguments, program_matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Refused(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

fn submit_and_follow(
    matches: &ArgMatches,
    program: &Program,
    arguments: Vec<String>,
    program_matches: &ArgMatches,
) -> Result<(), Failure> {
    let client = JobManagerClient::new(matches)?;
    let detached = matches.get_flag("detached");
    let answer = client.post(
        "/jobs",
        &json!({ "program": program.name, "programArgs": arguments }),
    )?;
    let job = answer["jobid"].as_str().ok_or_else(|| {
        Failure::Refused(format!(
            "the JobManager answered without a job id: {answer}"
        ))
    })?;
    if detached {
        println!("Job has been submitted with JobID {job}");
        return Ok(());
    }
    eprintln!("Job has been submitted with JobID {job}");
    let mut last_state = String::new();
    let mut last_progress: Option<(std::time::Instant, u64)> = None;
    let mut last_completed = 0;
    loop {
        let status = client.get(&format!("/jobs/{job}"))?;
        let state = status["state"].as_str().unwrap_or("UNKNOWN").to_string();
        let reason = status["reason"].as_str().map(str::to_string);
        if state != last_state {
            match &reason {
                Some(reason) if !matches!(state.as_str(), "FAILED" | "CANCELED") => {
                    eprintln!("job {job} is {state}: {reason}")
                }
                _ => eprintln!("job {job} is {state}"),
            }
            last_state = state.clone();
        }
        match state.as_str() {
            "FINISHED" => return finished(program, program_matches, job, &status),
            "FAILED" | "CANCELED" => {
                return Err(Failure::Refused(
                    reason.unwrap_or_else(|| format!("job {job} is {state}")),
                ))
            }
            _ => {}
        }
        if let Ok(checkpoints) = client.get(&format!("/jobs/{job}/checkpoints")) {
            let completed = checkpoints["counts"]["completed"].as_u64().unwrap_or(0);
            if completed > last_completed {
                let path = checkpoints["latest"]["completed"]["external_path"]
                    .as_str()
                    .unwrap_or("?");
                eprintln!("checkpoint completed ({completed} in all): {path}");
                last_completed = completed;
            }
        }
        let records = source_records(&status);
        let now = std::time::Instant::now();
        match last_progress {
            None => last_progress = Some((now, records)),
            Some((at, before)) if now.duration_since(at) >= PROGRESS_INTERVAL => {
                if state == "RUNNING" {
                    let rate = records.saturating_sub(before) as f64
                        / now.duration_since(at).as_secs_f64();
                    eprintln!(
                        "job {job}: {records} records from the sources, {:.2}M records/s",
                        rate / 1e6
                    );
                }
                last_progress = Some((now, records));
            }
            Some(_) => {}
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Records the job's first vertex (its source) has written.
fn source_records(status: &Value) -> u64 {
    status["vertices"]
        .as_array()
        .and_then(|vertices| vertices.first())
        .and_then(|vertex| vertex["metrics"]["write-records"].as_u64())
        .unwrap_or(0)
}

/// Prints a finished job's result: the program's report, or the savepoint
/// it was stopped with.
fn finished(
    program: &Program,
    program_matches: &ArgMatches,
    job: &str,
    status: &Value,
) -> Result<(), Failure> {
    if let Some(savepoint) = status["savepoint"].as_str() {
        println!("job {job} stopped with savepoint {savepoint}");
        return Ok(());
    }
    let mut accumulators = strom_core::Accumulators::default();
    if let Some(values) = status["accumulators"].as_object() {
        for (name, value) in values {
            let value = value.as_u64().ok_or_else(|| {
                Failure::Refused(format!("accumulator '{name}' is not a number: {value}"))
            })?;
            accumulators.add(name, value);
        }
    }
    let slots_used = status["vertices"]
        .as_array()
        .and_then(|vertices| {
            vertices
                .iter()
                .filter_map(|vertex| vertex["parallelism"].as_u64())
                .max()
        })
        .unwrap_or(1) as u32;
    let outcome = JobOutcome {
        accumulators,
        duration: Duration::from_millis(status["duration"].as_u64().unwrap_or(0)),
        slots_used,
    };
    for line in (program.report)(program_matches, &outcome) {
        println!("{line}");
    }
    Ok(())
}

/// Why a command did not complete.
enum Failure {
    /// A bad argument: exit 2.
    Usage(String),
    /// The JobManager could not be reached or refused: exit 1.
    Refused(String),
}

/// Runs one of the client subcommands; returns the process exit code (0 ok,
/// 1 the JobManager could not be reached or refused, 2 bad usage).
pub fn run(name: &str, matches: &ArgMatches) -> ExitCode {
    match run_command(name, matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_USAGE)
        }
        Err(Failure::Refused(message)) => {
            eprintln!("error: {message}");
            ExitCode::from(EXIT_REFUSED)
        }
    }
}

fn run_command(name: &str, matches: &ArgMatches) -> Result<(), Failure> {
    let client = JobManagerClient::new(matches)?;
    match name {
        "savepoint" => {
            let job = job_id(matches)?;
            let target = absolute(matches.get_one::<PathBuf>("target_directory"))?;
            eprintln!("Triggering savepoint for job {job}.");
            let body = match target {
                Some(target) => json!({ "target-directory": target }),
                None => json!({}),
            };
            let answer = client.post(&format!("/jobs/{job}/savepoints"), &body)?;
            println!("Savepoint completed. Path: {}", location(&answer)?);
            Ok(())
        }
        "stop" => {
            let job = job_id(matches)?;
            let target = absolute(matches.get_one::<PathBuf>("savepoint_path"))?;
            eprintln!("Suspending job {job} with a savepoint.");
            let body = match target {
                Some(target) => json!({ "targetDirectory": target }),
                None => json!({}),
            };
            let answer = client.post(&format!("/jobs/{job}/stop"), &body)?;
            println!("Savepoint completed. Path: {}", location(&answer)?);
            Ok(())
        }
        "cancel" => {
            let job = job_id(matches)?;
            eprintln!("Cancelling job {job}.");
            client.patch(&format!("/jobs/{job}?mode=cancel"))?;
            println!("Cancelled job {job}.");
            Ok(())
        }
        "list" => {
            let answer = client.get("/jobs/overview")?;
            let all = matches.get_flag("all");
            let lines = job_lines(&answer, all).ok_or_else(|| {
                Failure::Refused(format!(
                    "the JobManager answered with an unexpected listing: {answer}"
                ))
            })?;
            if lines.is_empty() {
                println!("{}", if all { "No jobs." } else { "No running jobs." });
            }
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        _ => Err(Failure::Usage(format!("'{name}' is not a client command"))),
    }
}

fn job_id(matches: &ArgMatches) -> Result<JobId, Failure> {
    let text = matches
        .get_one::<String>("job_id")
        .ok_or_else(|| Failure::Usage("give the job's id".to_string()))?;
    JobId::from_str(text).map_err(|message| {
        Failure::Usage(format!("{message}; `strom list` shows the running jobs"))
    })
}

/// The JobManager is another process with another working directory, so
/// a relative target directory is made absolute here, against ours.
fn absolute(path: Option<&PathBuf>) -> Result<Option<PathBuf>, Failure> {
    path.map(|path| {
        std::path::absolute(path).map_err(|error| {
            Failure::Usage(format!(
                "cannot make '{}' absolute: {error}",
                path.display()
            ))
        })
    })
    .transpose()
}

fn location(answer: &Value) -> Result<&str, Failure> {
    answer["location"].as_str().ok_or_else(|| {
        Failure::Refused(format!(
            "the JobManager answered without a savepoint location: {answer}"
        ))
    })
}

/// `<id> : <name> (<state>)` per job of a `GET /jobs/overview` answer:
/// the jobs that have not ended, or with `all` every job.
fn job_lines(answer: &Value, all: bool) -> Option<Vec<String>> {
    answer["jobs"]
        .as_array()?
        .iter()
        .filter(|job| {
            all || !matches!(
                job["state"].as_str(),
                Some("FINISHED" | "FAILED" | "CANCELED")
            )
        })
        .map(|job| {
            Some(format!(
                "{} : {} ({})",
                job["jid"].as_str()?,
                job["name"].as_str()?,
                job["state"].as_str()?
            ))
        })
        .collect()
}

/// The message of a refusal, `{"errors": [...]}` in Flink's shape, or the
/// status and the start of the body if the answer is something else.
fn refusal_message(status: u16, body: &str) -> String {
    let errors: Option<Vec<String>> = serde_json::from_str::<Value>(body).ok().and_then(|value| {
        value["errors"]
            .as_array()?
            .iter()
            .map(|error| error.as_str().map(str::to_string))
            .collect()
    });
    match errors {
        Some(errors) if !errors.is_empty() => errors.join("; "),
        _ => {
            let start: String = body.chars().take(200).collect();
            format!("the JobManager answered HTTP {status}: {start}")
        }
    }
}

/// Turns `--jobmanager` into a base URL; a bare `HOST:PORT` is `http://`.
fn base_url(address: &str) -> Result<String, Failure> {
    let bare = address
        .strip_prefix("http://")
        .unwrap_or(address)
        .trim_end_matches('/');
    let port_ok = bare
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok || bare.contains('/') {
        return Err(Failure::Usage(format!(
            "--jobmanager '{address}' is not HOST:PORT (for example {JOBMANAGER_DEFAULT})"
        )));
    }
    Ok(format!("http://{bare}"))
}

fn read_secret(path: &Path) -> Result<String, Failure> {
    use std::io::Read;
    let mut secret = String::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(SECRET_SIZE_MAX).read_to_string(&mut secret))
        .map_err(|error| {
            Failure::Usage(format!(
                "cannot read the secret file {}: {error}",
                path.display()
            ))
        })?;
    let secret = secret.trim();
    if secret.is_empty() {
        return Err(Failure::Usage(format!(
            "the secret file {} is empty",
            path.display()
        )));
    }
    Ok(secret.to_string())
}

struct JobManagerClient {
    /// As the user gave it, for messages.
    address: String,
    base_url: String,
    authorization: Option<String>,
    has_secret: bool,
}

impl JobManagerClient {
    fn new(matches: &ArgMatches) -> Result<JobManagerClient, Failure> {
        let address = matches
            .get_one::<String>("jobmanager")
            .cloned()
            .unwrap_or_else(|| JOBMANAGER_DEFAULT.to_string());
        let base_url = base_url(&address)?;
        let secret = matches
            .get_one::<PathBuf>("secret_file")
            .map(|path| read_secret(path))
            .transpose()?;
        Ok(JobManagerClient {
            address,
            base_url,
            has_secret: secret.is_some(),
            authorization: secret.map(|secret| format!("Bearer {secret}")),
        })
    }

    fn agent(timeout: Duration) -> ureq::Agent {
        ureq::Agent::config_builder()
            // Refusals carry the JobManager's message; we read it ourselves.
            .http_status_as_error(false)
            // The JobManager is usually on this host or this network: an
            // HTTP proxy from the environment is not meant for it.
            .proxy(None)
            .max_redirects(0)
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .timeout_global(Some(timeout))
            .build()
            .into()
    }

    fn authorize<B>(&self, request: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(authorization) => request.header("Authorization", authorization),
            None => request,
        }
    }

    fn get(&self, path: &str) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base_url);
        let request = self.authorize(Self::agent(REQUEST_TIMEOUT).get(&url));
        self.answer(request.call(), REQUEST_TIMEOUT)
    }

    fn post(&self, path: &str, body: &Value) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base_url);
        let request = self
            .authorize(Self::agent(SAVEPOINT_TIMEOUT).post(&url))
            .header("Content-Type", "application/json");
        self.answer(request.send(body.to_string()), SAVEPOINT_TIMEOUT)
    }

    fn patch(&self, path: &str) -> Result<Value, Failure> {
        let url = format!("{}{path}", self.base_url);
        let request = self.authorize(Self::agent(REQUEST_TIMEOUT).patch(&url));
        self.answer(request.send_empty(), REQUEST_TIMEOUT)
    }

    fn answer(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        timeout: Duration,
    ) -> Result<Value, Failure> {
        let mut response = result.map_err(|error| self.transport_failure(error, timeout))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(ANSWER_SIZE_MAX)
            .read_to_string()
            .map_err(|error| self.transport_failure(error, timeout))?;
        if status >= 400 {
            let mut message = refusal_message(status, &body);
            if status == 401 && !self.has_secret {
                message.push_str(" (the JobManager has a secret: give it with --secret-file)");
            }
            return Err(Failure::Refused(message));
        }
        if body.trim().is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_str(&body).map_err(|error| {
            Failure::Refused(format!(
                "the JobManager at {} answered HTTP {status} with malformed JSON: {error}",
                self.address
            ))
        })
    }

    fn transport_failure(&self, error: ureq::Error, timeout: Duration) -> Failure {
        let address = &self.address;
        Failure::Refused(match error {
            ureq::Error::Timeout(_) => format!(
                "the JobManager at {address} did not answer within {} seconds; a savepoint may still complete (see `strom list`)",
                timeout.as_secs()
            ),
            error => format!("cannot reach the JobManager at {address}: {error}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(arguments: &[&str]) -> (String, ArgMatches) {
        let command = Command::new("strom").subcommands(commands());
        let matches = command.try_get_matches_from(arguments).unwrap();
        let (name, matches) = matches.subcommand().unwrap();
        (name.to_string(), matches.clone())
    }

    #[test]
    fn parses_flink_style_arguments() {
        let job = "0123456789abcdef0123456789abcdef";
        let (name, parsed) = matches(&[
            "strom",
            "stop",
            "-m",
            "host:9",
            job,
            "--savepointPath",
            "/sp",
        ]);
        assert_eq!(name, "stop");
        assert_eq!(parsed.get_one::<String>("jobmanager").unwrap(), "host:9");
        assert_eq!(
            parsed.get_one::<PathBuf>("savepoint_path").unwrap(),
            Path::new("/sp")
        );
        assert_eq!(
            job_id(&parsed).ok().map(|job| job.to_string()),
            Some(job.to_string())
        );
        let (_, parsed) = matches(&["strom", "savepoint", job, "/sp"]);
        assert_eq!(
            parsed.get_one::<String>("jobmanager").unwrap(),
            JOBMANAGER_DEFAULT
        );
        let (_, parsed) = matches(&["strom", "cancel", "12ab"]);
        assert!(matches!(job_id(&parsed), Err(Failure::Usage(_))));
        assert!(Command::new("strom")
            .subcommands(commands())
            .try_get_matches_from(["strom", "savepoint"])
            .is_err());
    }

    #[test]
    fn checks_jobmanager_addresses() {
        assert_eq!(
            base_url("127.0.0.1:8081").ok(),
            Some("http://127.0.0.1:8081".to_string())
        );
        assert_eq!(
            base_url("http://jm:8081/").ok(),
            Some("http://jm:8081".to_string())
        );
        assert_eq!(
            base_url("[::1]:8081").ok(),
            Some("http://[::1]:8081".to_string())
        );
        for bad in [
            "jm",
            "jm:",
            ":8081",
            "jm:99999",
            "jm:8081/jobs",
            "https://jm:8081",
        ] {
            assert!(matches!(base_url(bad), Err(Failure::Usage(_))), "{bad}");
        }
    }

    #[test]
    fn reads_refusals_and_listings() {
        assert_eq!(
            refusal_message(404, r#"{"errors":["no running job 12"]}"#),
            "no running job 12"
        );
        assert_eq!(refusal_message(400, r#"{"errors":["a","b"]}"#), "a; b");
        assert_eq!(
            refusal_message(502, "Bad Gateway"),
            "the JobManager answered HTTP 502: Bad Gateway"
        );
        let overview =
            json!({ "jobs": [{ "jid": "ab", "name": "q5", "state": "RUNNING", "attempt": 0 }] });
        assert_eq!(
            job_lines(&overview, true),
            Some(vec!["ab : q5 (RUNNING)".to_string()])
        );
        assert_eq!(job_lines(&json!({ "jobs": [] }), false), Some(Vec::new()));
        assert_eq!(job_lines(&json!({ "jobs": [{ "jid": "ab" }] }), true), None);
    }

    #[test]
    fn reports_an_unreachable_jobmanager() {
        // A port that was free a moment ago: nothing listens there.
        let address = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let (_, parsed) = matches(&["strom", "list", "--jobmanager", &address.to_string()]);
        let client = JobManagerClient::new(&parsed).ok().unwrap();
        match client.get("/jobs/overview") {
            Err(Failure::Refused(message)) => assert!(
                message.starts_with(&format!("cannot reach the JobManager at {address}: ")),
                "{message}"
            ),
            _ => panic!("expected a refusal"),
        }
    }
}
