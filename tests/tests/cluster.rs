//! The standalone cluster end to end: `strom jobmanager` and `strom
//! taskmanager` processes, with jobs submitted through `strom run` and the
//! REST API, as a user runs them.
//!
//! - Nexmark q5 and q8 at parallelism 2 on two TaskManagers of one slot
//!   each print the answers of `shared/bench/answers.txt`, through
//!   `strom run` and through `POST /jobs`, with every vertex spread over
//!   both TaskManagers and records crossing between them.
//! - A TaskManager killed with SIGKILL mid-run is replaced by a new one; the
//!   job restarts from its latest checkpoint and prints the answer of an
//!   uninterrupted run.
//! - Garbage, a header claiming a 4 GiB payload and a bad checksum, sent to
//!   a TaskManager's data port and to the JobManager's control port, close
//!   that one connection with a log line naming the peer; the cluster runs
//!   on and still answers right.
//! - A cluster secret guards the REST API and TaskManager registration.
//! - A job without enough slots waits for them, then fails after the slot
//!   wait timeout.
//! - Application mode runs its one job, prints its answer and exits, and
//!   so do its TaskManagers.
//!
//! Every test starts its own processes on free ports and kills them when it
//! ends, passed or failed ([`RunningCommand`] kills on drop). The tests run
//! one at a time ([`one_cluster_at_a_time`]): each cluster pins a slot to
//! each of the machine's two cores, and several clusters at once would
//! share those cores and make the one test that acts mid-run (the killed
//! TaskManager) depend on how the others load the machine.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strom_bench::nexmark::{reference_answers, Query};
use strom_bench::queries::answer_of;
use strom_core::program::JobOutcome;
use strom_core::Accumulators;
use strom_net::control::{ControlFrameKind, CONTROL_HEADER_SIZE, CONTROL_MAGIC, CONTROL_VERSION};
use strom_net::frame::{
    FrameKind, FRAME_HEADER_SIZE, FRAME_MAGIC, FRAME_PAYLOAD_MAX, FRAME_VERSION, HELLO_NONCE_SIZE,
};
use strom_tests::cli::run;
use strom_tests::support::{path_text, RunningCommand, TempDir};

/// The `strom` command line (with the test programs, which these tests do
/// not use: every process of a cluster must run the same binary).
const STROM: &str = env!("CARGO_BIN_EXE_strom-testjobs");
/// The longest a job or a command may take before the test calls it a hang.
const DEADLINE: Duration = Duration::from_secs(120);
/// The longest a process may take to start and print its start line.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// The longest the test waits for a change it caused (TaskManagers report
/// their figures with their heartbeat, about once a second).
const CHANGE_DEADLINE: Duration = Duration::from_secs(30);
/// The longest a peer may take to close a connection that sent it bad
/// bytes: well under the handshake timeout (10 s), so that a connection
/// dropped for being slow, not for being wrong, does not pass.
const CLOSE_DEADLINE: Duration = Duration::from_secs(5);
/// How often the test looks again at something it waits for.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// The seed of answers.txt's cases at 100,000 and 1,000,000 events; also
/// the programs' default seed, so the jobs below do not pass it.
const SEED: u64 = 42;

/// Serializes the tests of this file (see the file's comment). A test that
/// failed poisons the lock; the next one runs regardless.
fn one_cluster_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poison| poison.into_inner())
}

// ---------------------------------------------------------------------------
// Processes

/// A `strom jobmanager` process on free ports.
struct JobManager {
    process: RunningCommand,
    /// `IP:PORT` of the REST API.
    rest_address: String,
    /// `IP:PORT` of the control port, where TaskManagers register.
    control_address: String,
}

impl JobManager {
    /// Starts `strom jobmanager --rest-port 0 --rpc-port 0 <options>` and
    /// reads the ports it took from its start line.
    fn start(options: &[&str]) -> JobManager {
        let mut arguments = vec!["jobmanager", "--rest-port", "0", "--rpc-port", "0"];
        arguments.extend_from_slice(options);
        let mut process = RunningCommand::start(STROM, &arguments);
        let line = process.wait_for_stderr_line("its start line", START_DEADLINE, |line| {
            line.starts_with("JobManager started: ")
        });
        JobManager {
            process,
            rest_address: between(&line, "REST API at http://", ","),
            control_address: between(&line, "control port ", " "),
        }
    }

    /// The REST API, without a secret.
    fn rest(&self) -> Rest {
        Rest::new(&self.rest_address, None)
    }
}

/// A `strom taskmanager` process that has registered with its JobManager.
struct TaskManager {
    process: RunningCommand,
    /// 16 hex digits, as the REST API names it.
    id: String,
    /// `IP:PORT` of its data port, where other TaskManagers connect.
    data_address: String,
}

impl TaskManager {
    /// Starts a TaskManager of one slot pinned to `core` and waits until it
    /// has registered.
    fn start(control_address: &str, core: &str, options: &[&str]) -> TaskManager {
        let mut arguments = vec![
            "taskmanager",
            "--jobmanager",
            control_address,
            "--slots",
            "1",
            "--cores",
            core,
        ];
        arguments.extend_from_slice(options);
        let mut process = RunningCommand::start(STROM, &arguments);
        let line = process.wait_for_stderr_line("its registration", START_DEADLINE, |line| {
            line.contains(" registered with the JobManager at ")
        });
        let id = between(&line, "TaskManager ", " ");
        assert!(
            id.len() == 16 && id.chars().all(|digit| digit.is_ascii_hexdigit()),
            "a TaskManager id is 16 hex digits: {line}"
        );
        TaskManager {
            process,
            id,
            data_address: between(&line, "data port ", ")"),
        }
    }
}

/// A JobManager and two TaskManagers of one slot each, on cores 0 and 1.
struct Cluster {
    job_manager: JobManager,
    task_managers: Vec<TaskManager>,
}

impl Cluster {
    fn start(job_manager_options: &[&str]) -> Cluster {
        let job_manager = JobManager::start(job_manager_options);
        let task_managers = ["0", "1"]
            .into_iter()
            .map(|core| TaskManager::start(&job_manager.control_address, core, &[]))
            .collect();
        let cluster = Cluster {
            job_manager,
            task_managers,
        };
        let listed: BTreeSet<String> = cluster.rest().task_managers().into_keys().collect();
        assert_eq!(listed, cluster.task_manager_ids(), "GET /taskmanagers");
        cluster
    }

    fn rest(&self) -> Rest {
        self.job_manager.rest()
    }

    fn task_manager_ids(&self) -> BTreeSet<String> {
        self.task_managers
            .iter()
            .map(|task_manager| task_manager.id.clone())
            .collect()
    }
}

/// The text of `line` between `start` and the next `end`.
fn between(line: &str, start: &str, end: &str) -> String {
    let (_, after) = line
        .split_once(start)
        .unwrap_or_else(|| panic!("no '{start}' in: {line}"));
    let (found, _) = after
        .split_once(end)
        .unwrap_or_else(|| panic!("no '{end}' after '{start}' in: {line}"));
    found.to_string()
}

/// Polls `probe` until it gives a value, failing the test with what it saw
/// last if none comes within `deadline`.
fn wait_until<T>(
    what: &str,
    deadline: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> T {
    let started = Instant::now();
    loop {
        match probe() {
            Ok(value) => return value,
            Err(seen) if started.elapsed() > deadline => {
                panic!("{what}: not within {deadline:?}; last seen: {seen}")
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

// ---------------------------------------------------------------------------
// The REST API

/// What a TaskManager's network service moved, as `GET /taskmanagers`
/// reports it.
#[derive(Clone, Copy, Debug, Default)]
struct Traffic {
    elements_sent: u64,
    elements_received: u64,
}

/// A client of a JobManager's REST API.
struct Rest {
    base_url: String,
    authorization: Option<String>,
}

impl Rest {
    /// A client of the REST API at `address`, sending `secret` as a bearer
    /// token if given.
    fn new(address: &str, secret: Option<&str>) -> Rest {
        Rest {
            base_url: format!("http://{address}"),
            authorization: secret.map(|secret| format!("Bearer {secret}")),
        }
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            // A refusal is an answer the tests look at.
            .http_status_as_error(false)
            // The JobManager is on this host: no proxy from the environment.
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into()
    }

    /// The status and body of `GET path`.
    fn get(&self, path: &str) -> (u16, String) {
        let mut request = Self::agent().get(format!("{}{path}", self.base_url));
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        Self::answer(request.call(), "GET", path)
    }

    /// The status and body of `POST path` with a JSON body.
    fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let mut request = Self::agent()
            .post(format!("{}{path}", self.base_url))
            .header("Content-Type", "application/json");
        if let Some(authorization) = &self.authorization {
            request = request.header("Authorization", authorization);
        }
        Self::answer(request.send(body.to_string()), "POST", path)
    }

    fn answer(
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
        method: &str,
        path: &str,
    ) -> (u16, String) {
        let mut response =
            result.unwrap_or_else(|error| panic!("{method} {path}: no answer: {error}"));
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .unwrap_or_else(|error| panic!("{method} {path}: cannot read the answer: {error}"));
        (status, body)
    }

    fn json(status: u16, body: &str, method: &str, path: &str) -> Value {
        assert_eq!(status, 200, "{method} {path}: {body}");
        serde_json::from_str(body)
            .unwrap_or_else(|error| panic!("{method} {path}: not JSON ({error}): {body}"))
    }

    fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        Self::json(status, &body, "GET", path)
    }

    fn post_json(&self, path: &str, body: &Value) -> Value {
        let (status, answer) = self.post(path, body);
        Self::json(status, &answer, "POST", path)
    }

    /// `GET /jobs/:id`.
    fn job(&self, job: &str) -> Value {
        self.get_json(&format!("/jobs/{job}"))
    }

    /// Submits Nexmark `query` over `events` events with `POST /jobs` and
    /// returns the job id.
    fn submit(&self, query: Query, events: u64, parallelism: u32) -> String {
        let answer = self.post_json("/jobs", &submission(query, events, parallelism));
        let job = answer["jobid"]
            .as_str()
            .unwrap_or_else(|| panic!("POST /jobs answered without a job id: {answer}"));
        assert_eq!(job.len(), 32, "a job id is 32 hex digits: {answer}");
        job.to_string()
    }

    /// Polls `GET /jobs/:id` until the job has ended and returns its status.
    fn wait_for_end(&self, job: &str, deadline: Duration) -> Value {
        wait_until(&format!("job {job} ending"), deadline, || {
            let status = self.job(job);
            match status["state"].as_str() {
                Some("FINISHED" | "FAILED" | "CANCELED") => Ok(status),
                _ => Err(summary(&status)),
            }
        })
    }

    /// `GET /taskmanagers`, by TaskManager id.
    fn task_managers(&self) -> BTreeMap<String, Value> {
        let answer = self.get_json("/taskmanagers");
        answer["taskmanagers"]
            .as_array()
            .unwrap_or_else(|| panic!("GET /taskmanagers: no list: {answer}"))
            .iter()
            .map(|task_manager| {
                let id = task_manager["id"]
                    .as_str()
                    .unwrap_or_else(|| panic!("a TaskManager without an id: {answer}"));
                (id.to_string(), task_manager.clone())
            })
            .collect()
    }

    /// The network counts of every TaskManager.
    fn traffic(&self) -> BTreeMap<String, Traffic> {
        self.task_managers()
            .into_iter()
            .map(|(id, task_manager)| {
                let count = |name: &str| {
                    task_manager["network"][name].as_u64().unwrap_or_else(|| {
                        panic!("TaskManager {id} has no network count {name}: {task_manager}")
                    })
                };
                let traffic = Traffic {
                    elements_sent: count("elementsSent"),
                    elements_received: count("elementsReceived"),
                };
                (id, traffic)
            })
            .collect()
    }
}

/// The body of `POST /jobs` for Nexmark `query`.
fn submission(query: Query, events: u64, parallelism: u32) -> Value {
    json!({
        "program": "nexmark",
        "programArgs": ["--query", query.name(), "--events", events.to_string()],
        "parallelism": parallelism,
    })
}

/// A job's state and reason, for messages.
fn summary(status: &Value) -> String {
    format!("state {} reason {}", status["state"], status["reason"])
}

/// Checks that each vertex of parallelism 2 of a job has one subtask on
/// each TaskManager of `task_manager_ids` (as slot sharing places them on
/// two slots of different TaskManagers).
fn assert_spread_over(status: &Value, task_manager_ids: &BTreeSet<String>) {
    let vertices = status["vertices"]
        .as_array()
        .unwrap_or_else(|| panic!("a job without vertices: {status}"));
    let mut spread = 0;
    for vertex in vertices.iter().filter(|vertex| vertex["parallelism"] == 2) {
        let placed: BTreeSet<String> = vertex["subtasks"]
            .as_array()
            .unwrap_or_else(|| panic!("a vertex without subtasks: {vertex}"))
            .iter()
            .map(|subtask| {
                subtask["taskmanager-id"]
                    .as_str()
                    .unwrap_or("none")
                    .to_string()
            })
            .collect();
        assert_eq!(&placed, task_manager_ids, "vertex {}", vertex["name"]);
        spread += 1;
    }
    assert!(spread > 0, "no vertex of parallelism 2: {status}");
}

// ---------------------------------------------------------------------------
// Answers

/// The answer line of answers.txt for Nexmark `query` over `events` events.
fn expected_line(events: u64, query: Query) -> String {
    reference_answers()
        .expect("the reference answers")
        .into_iter()
        .find(|case| case.events == events && case.seed == SEED)
        .unwrap_or_else(|| panic!("answers.txt has {events} events with seed {SEED}"))
        .answer(query)
        .unwrap_or_else(|| panic!("answers.txt has {} at {events} events", query.name()))
        .line(query)
}

/// The answer line of a finished job, made from its accumulators as
/// `strom run` makes it.
fn answer_line(status: &Value, query: Query) -> String {
    let mut accumulators = Accumulators::default();
    let values = status["accumulators"]
        .as_object()
        .unwrap_or_else(|| panic!("a finished job without accumulators: {status}"));
    for (name, value) in values {
        let value = value
            .as_u64()
            .unwrap_or_else(|| panic!("accumulator {name} is not a number: {value}"));
        accumulators.add(name, value);
    }
    let outcome = JobOutcome {
        accumulators,
        duration: Duration::ZERO,
        slots_used: 0,
    };
    answer_of(&outcome).line(query)
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().to_string()
}

/// What an attached `strom run` printed.
struct Run {
    job: String,
    /// The first line of its stdout: the answer.
    answer: String,
}

/// Runs `strom run -m <rest_address> <client_options> nexmark --query
/// <query> --events <events> --parallelism <parallelism>` attached, and
/// checks that it succeeds.
fn strom_run(
    rest_address: &str,
    client_options: &[&str],
    query: Query,
    events: &str,
    parallelism: &str,
) -> Run {
    let mut arguments = vec!["run", "-m", rest_address];
    arguments.extend_from_slice(client_options);
    arguments.extend_from_slice(&[
        "nexmark",
        "--query",
        query.name(),
        "--events",
        events,
        "--parallelism",
        parallelism,
    ]);
    let finished = run(STROM, &arguments, DEADLINE);
    assert_eq!(finished.code, Some(0), "{arguments:?}: {}", finished.stderr);
    Run {
        job: job_id_in(&finished.stderr),
        answer: first_line(&finished.stdout),
    }
}

/// The job id of `strom run`'s line `Job has been submitted with JobID <id>`.
fn job_id_in(stderr: &str) -> String {
    stderr
        .lines()
        .find_map(|line| line.strip_prefix("Job has been submitted with JobID "))
        .unwrap_or_else(|| panic!("strom run named no job: {stderr}"))
        .trim()
        .to_string()
}

// ---------------------------------------------------------------------------
// Bad input on the data and control ports

/// Bytes a peer must refuse, and what its log line about it says.
struct BadInput {
    what: &'static str,
    bytes: Vec<u8>,
    logged: &'static str,
}

/// A frame header of either plane (both are 20 bytes, see `strom_net::frame`
/// and `strom_net::control`): magic, version, kind, channel (data plane) or
/// reserved (control plane) 0, payload length, payload crc32.
fn frame_header(magic: u32, version: u16, kind: u16, length: u32, checksum: u32) -> Vec<u8> {
    let mut header = Vec::with_capacity(FRAME_HEADER_SIZE);
    header.extend_from_slice(&magic.to_le_bytes());
    header.extend_from_slice(&version.to_le_bytes());
    header.extend_from_slice(&kind.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header.extend_from_slice(&length.to_le_bytes());
    header.extend_from_slice(&checksum.to_le_bytes());
    header
}

/// 64 bytes from a fixed xorshift sequence: random looking, the same on
/// every run.
fn garbage() -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut bytes = Vec::with_capacity(64);
    while bytes.len() < 64 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    assert!(bytes[..4] != *b"STRM" && bytes[..4] != *b"STRC");
    bytes
}

/// Garbage; a Hello header claiming a 4 GiB payload; and a Hello whose
/// header has the wrong crc32, for the plane of `magic` and `version`,
/// whose Hello payload (without a proof) is `hello_length` bytes.
fn bad_inputs(magic: u32, version: u16, hello_kind: u16, hello_length: usize) -> Vec<BadInput> {
    let payload = vec![0u8; hello_length];
    let wrong_checksum = crc32fast::hash(&payload) ^ 1;
    let mut bad_checksum = frame_header(
        magic,
        version,
        hello_kind,
        hello_length as u32,
        wrong_checksum,
    );
    bad_checksum.extend_from_slice(&payload);
    vec![
        BadInput {
            what: "garbage",
            bytes: garbage(),
            logged: "magic",
        },
        BadInput {
            what: "a header claiming a 4 GiB payload",
            bytes: frame_header(magic, version, hello_kind, u32::MAX, 0),
            logged: "exceeds the limit",
        },
        BadInput {
            what: "a Hello with a bad checksum",
            bytes: bad_checksum,
            logged: "checksum mismatch",
        },
    ]
}

/// Connects to `address`, sends `bytes` and reads until the peer closes the
/// connection, failing the test if it stays open for [`CLOSE_DEADLINE`].
/// Returns this end's address, which the peer's log names.
fn send_and_expect_close(address: &str, bytes: &[u8], what: &str) -> SocketAddr {
    let mut stream = TcpStream::connect(address)
        .unwrap_or_else(|error| panic!("cannot connect to {address}: {error}"));
    let local = stream.local_addr().expect("the local address");
    // The peer may hang up before it has read everything (it stops at the
    // first bad header): a failed write is fine, the reads below tell.
    let _ = stream.write_all(bytes);
    let started = Instant::now();
    let mut buffer = [0u8; 4096];
    loop {
        let remaining = CLOSE_DEADLINE.saturating_sub(started.elapsed());
        assert!(
            !remaining.is_zero(),
            "{address} kept the connection open for {CLOSE_DEADLINE:?} after {what}"
        );
        stream
            .set_read_timeout(Some(remaining))
            .expect("a read timeout");
        match stream.read(&mut buffer) {
            Ok(0) => return local,
            // The peer's Hello and its Close frame with the reason.
            Ok(_) => continue,
            Err(error) if error.kind() == ErrorKind::Interrupted => continue,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("{address} kept the connection open for {CLOSE_DEADLINE:?} after {what}")
            }
            // Reset: closed as well.
            Err(_) => return local,
        }
    }
}

/// Sends each bad input to `address` on a connection of its own, checks
/// the peer closes it, and waits for the peer's log line naming this end's
/// address and the error.
fn send_bad_inputs(address: &str, inputs: Vec<BadInput>, peer: &mut RunningCommand) {
    for input in inputs {
        let local = send_and_expect_close(address, &input.bytes, input.what);
        let peer_named = format!("peer {local}:");
        peer.wait_for_stderr_line(
            &format!("a line about {} from {local}", input.what),
            CHANGE_DEADLINE,
            |line| line.contains(&peer_named) && line.contains(input.logged),
        );
    }
}

// ---------------------------------------------------------------------------
// Tests

#[test]
fn q5_and_q8_through_strom_run_cross_two_task_managers() {
    let _one = one_cluster_at_a_time();
    let cluster = Cluster::start(&[]);
    let rest = cluster.rest();
    let task_manager_ids = cluster.task_manager_ids();
    for query in [Query::Q5, Query::Q8] {
        let outcome = strom_run(
            &cluster.job_manager.rest_address,
            &[],
            query,
            "1000000",
            "2",
        );
        assert_eq!(outcome.answer, expected_line(1_000_000, query));
        let status = rest.job(&outcome.job);
        assert_eq!(status["state"], "FINISHED", "{status}");
        assert_eq!(answer_line(&status, query), outcome.answer);
        assert_spread_over(&status, &task_manager_ids);
    }
    // The counts come with the TaskManagers' heartbeats, about once a second.
    wait_until(
        "records crossing between the TaskManagers, both ways",
        CHANGE_DEADLINE,
        || {
            let traffic = rest.traffic();
            let crossed = task_manager_ids.iter().all(|id| {
                traffic.get(id).is_some_and(|traffic| {
                    traffic.elements_sent > 0 && traffic.elements_received > 0
                })
            });
            if crossed {
                Ok(())
            } else {
                Err(format!("{traffic:?}"))
            }
        },
    );
}

#[test]
fn q5_and_q8_through_post_jobs() {
    let _one = one_cluster_at_a_time();
    let cluster = Cluster::start(&[]);
    let rest = cluster.rest();
    let task_manager_ids = cluster.task_manager_ids();
    let before = rest.traffic();
    for query in [Query::Q5, Query::Q8] {
        let job = rest.submit(query, 1_000_000, 2);
        let status = rest.wait_for_end(&job, DEADLINE);
        assert_eq!(status["state"], "FINISHED", "{}: {status}", query.name());
        assert_eq!(status["parallelism"], 2, "{status}");
        assert_eq!(answer_line(&status, query), expected_line(1_000_000, query));
        assert_spread_over(&status, &task_manager_ids);
    }
    wait_until(
        "the TaskManagers' network counts increasing",
        CHANGE_DEADLINE,
        || {
            let after = rest.traffic();
            let increased = task_manager_ids.iter().all(|id| {
                let before = before.get(id).copied().unwrap_or_default();
                after.get(id).is_some_and(|after| {
                    after.elements_sent > before.elements_sent
                        && after.elements_received > before.elements_received
                })
            });
            if increased {
                Ok(())
            } else {
                Err(format!("before {before:?}, now {after:?}"))
            }
        },
    );
}

#[test]
fn a_task_manager_killed_mid_run_is_replaced_and_the_answer_is_exact() {
    let _one = one_cluster_at_a_time();
    let uninterrupted = run(
        STROM,
        &[
            "local",
            "--rest-port",
            "0",
            "nexmark",
            "--query",
            "q5",
            "--events",
            "3000000",
            "--parallelism",
            "2",
        ],
        DEADLINE,
    );
    assert_eq!(uninterrupted.code, Some(0), "{}", uninterrupted.stderr);
    let expected = first_line(&uninterrupted.stdout);
    assert!(expected.starts_with("q5 rows="), "{}", uninterrupted.stdout);

    let checkpoints = TempDir::new("cluster-killed-task-manager");
    assert!(checkpoints.path().is_absolute());
    let checkpoint_dir = path_text(checkpoints.path());
    let mut cluster = Cluster::start(&["--heartbeat-timeout", "3s"]);
    let rest = cluster.rest();
    let rest_address = cluster.job_manager.rest_address.clone();
    // About three seconds at a million events a second: time to kill a
    // TaskManager after a few checkpoints, well before the end.
    let mut attached = RunningCommand::start(
        STROM,
        &[
            "run",
            "-m",
            &rest_address,
            "nexmark",
            "--query",
            "q5",
            "--events",
            "3000000",
            "--parallelism",
            "2",
            "--checkpoint-interval",
            "200ms",
            "--checkpoint-dir",
            &checkpoint_dir,
            "--events-per-second",
            "1000000",
        ],
    );
    let submitted = attached.wait_for_stderr_line("the job id", START_DEADLINE, |line| {
        line.starts_with("Job has been submitted with JobID ")
    });
    let job = job_id_in(&submitted);
    wait_until("two completed checkpoints", CHANGE_DEADLINE, || {
        let checkpoints = rest.get_json(&format!("/jobs/{job}/checkpoints"));
        match checkpoints["counts"]["completed"].as_u64() {
            Some(completed) if completed >= 2 => Ok(()),
            _ => Err(checkpoints.to_string()),
        }
    });
    let status = rest.job(&job);
    assert_eq!(
        status["state"],
        "RUNNING",
        "the job should still run when the TaskManager is killed: {}",
        summary(&status)
    );

    let mut lost = cluster.task_managers.remove(1);
    lost.process.kill();
    let reason = wait_until(
        "the job restarting or waiting for slots",
        CHANGE_DEADLINE,
        || {
            let status = rest.job(&job);
            match status["state"].as_str() {
                Some("RESTARTING" | "WAITING_FOR_SLOTS") => {
                    Ok(status["reason"].as_str().unwrap_or_default().to_string())
                }
                Some("RUNNING") => Err(summary(&status)),
                _ => panic!("the job ended instead of restarting: {status}"),
            }
        },
    );
    assert!(
        reason.contains(&lost.id),
        "the reason does not name the lost TaskManager {}: {reason}",
        lost.id
    );
    wait_until(
        "the lost TaskManager leaving GET /taskmanagers",
        CHANGE_DEADLINE,
        || {
            let listed = rest.task_managers();
            if listed.contains_key(&lost.id) {
                Err(format!("{:?}", listed.keys()))
            } else {
                Ok(())
            }
        },
    );
    // The JobManager restarts the job from its latest checkpoint, not
    // from the start.
    cluster.job_manager.process.wait_for_stderr_line(
        "a restart from a checkpoint",
        CHANGE_DEADLINE,
        |line| line.contains(&job) && line.contains("restart") && line.contains("/chk-"),
    );

    let replacement = TaskManager::start(&cluster.job_manager.control_address, "1", &[]);
    cluster.task_managers.push(replacement);
    let finished = attached.finish(DEADLINE);
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_eq!(
        first_line(&finished.stdout),
        expected,
        "{}",
        finished.stderr
    );

    let status = rest.job(&job);
    assert_eq!(status["state"], "FINISHED", "{status}");
    assert!(
        status["restarts"]
            .as_u64()
            .is_some_and(|restarts| restarts >= 1),
        "{status}"
    );
    // The last attempt ran on the TaskManager that stayed and on the new one.
    assert_spread_over(&status, &cluster.task_manager_ids());
}

#[test]
fn bad_input_to_the_data_and_control_ports_is_dropped_and_the_cluster_keeps_working() {
    let _one = one_cluster_at_a_time();
    let mut cluster = Cluster::start(&[]);

    let data_address = cluster.task_managers[0].data_address.clone();
    let data_hello_length = 8 + HELLO_NONCE_SIZE + 1;
    assert!(u64::from(u32::MAX) > u64::from(FRAME_PAYLOAD_MAX));
    send_bad_inputs(
        &data_address,
        bad_inputs(
            FRAME_MAGIC,
            FRAME_VERSION,
            FrameKind::Hello as u16,
            data_hello_length,
        ),
        &mut cluster.task_managers[0].process,
    );

    let control_address = cluster.job_manager.control_address.clone();
    let control_hello_length = HELLO_NONCE_SIZE + 1;
    assert_eq!(CONTROL_HEADER_SIZE, FRAME_HEADER_SIZE);
    send_bad_inputs(
        &control_address,
        bad_inputs(
            CONTROL_MAGIC,
            CONTROL_VERSION,
            ControlFrameKind::Hello as u16,
            control_hello_length,
        ),
        &mut cluster.job_manager.process,
    );

    assert!(
        cluster.job_manager.process.is_running(),
        "the JobManager died"
    );
    for task_manager in &mut cluster.task_managers {
        assert!(
            task_manager.process.is_running(),
            "TaskManager {} died",
            task_manager.id
        );
    }
    let listed: BTreeSet<String> = cluster.rest().task_managers().into_keys().collect();
    assert_eq!(listed, cluster.task_manager_ids(), "GET /taskmanagers");

    let outcome = strom_run(
        &cluster.job_manager.rest_address,
        &[],
        Query::Q5,
        "1000000",
        "2",
    );
    assert_eq!(outcome.answer, expected_line(1_000_000, Query::Q5));
    assert_spread_over(
        &cluster.rest().job(&outcome.job),
        &cluster.task_manager_ids(),
    );
}

#[test]
fn a_secret_guards_rest_and_task_manager_registration() {
    let _one = one_cluster_at_a_time();
    const SECRET: &str = "a-cluster-secret-for-the-tests";
    let directory = TempDir::new("cluster-secret");
    let secret_file = directory.join("secret");
    std::fs::write(&secret_file, format!("{SECRET}\n")).expect("the secret file");
    let mut job_manager = JobManager::start(&["--secret-file", &secret_file]);
    let rest_address = job_manager.rest_address.clone();

    let anonymous = Rest::new(&rest_address, None);
    let impostor = Rest::new(&rest_address, Some("not-the-secret"));
    let member = Rest::new(&rest_address, Some(SECRET));
    for path in ["/overview", "/jobs/overview", "/taskmanagers", "/metrics"] {
        let (status, body) = anonymous.get(path);
        assert_eq!(status, 401, "GET {path} without a token: {body}");
        let (status, body) = impostor.get(path);
        assert_eq!(status, 401, "GET {path} with a wrong token: {body}");
        let (status, body) = member.get(path);
        assert_eq!(status, 200, "GET {path} with the secret: {body}");
    }
    let (status, body) = anonymous.post("/jobs", &submission(Query::Q5, 100_000, 1));
    assert_eq!(status, 401, "POST /jobs without a token: {body}");
    let jobs = member.get_json("/jobs/overview");
    assert_eq!(jobs["jobs"], json!([]), "a refused submission ran: {jobs}");

    let refused = run(
        STROM,
        &[
            "taskmanager",
            "--jobmanager",
            &job_manager.control_address,
            "--slots",
            "1",
            "--cores",
            "0",
            "--registration-timeout",
            "5s",
        ],
        Duration::from_secs(60),
    );
    assert!(
        refused.code.is_some_and(|code| code != 0),
        "a TaskManager without the secret: {refused:?}"
    );
    assert!(
        refused.stderr.contains("refused") && refused.stderr.contains("secret"),
        "the TaskManager without the secret does not say it was refused for it: {}",
        refused.stderr
    );
    job_manager
        .process
        .wait_for_stderr_line("the refused TaskManager", CHANGE_DEADLINE, |line| {
            line.contains("disconnected") && line.contains("secret")
        });
    assert_eq!(member.get_json("/overview")["taskmanagers"], 0);

    let task_manager = TaskManager::start(
        &job_manager.control_address,
        "0",
        &["--secret-file", &secret_file],
    );
    let listed: Vec<String> = member.task_managers().into_keys().collect();
    assert_eq!(listed, vec![task_manager.id.clone()], "GET /taskmanagers");

    let without_secret = run(
        STROM,
        &[
            "run",
            "-m",
            &rest_address,
            "nexmark",
            "--query",
            "q5",
            "--events",
            "100000",
            "--parallelism",
            "1",
        ],
        DEADLINE,
    );
    assert_eq!(without_secret.code, Some(1), "{without_secret:?}");
    assert!(
        without_secret.stderr.contains("bearer token"),
        "{}",
        without_secret.stderr
    );

    let outcome = strom_run(
        &rest_address,
        &["--secret-file", &secret_file],
        Query::Q5,
        "100000",
        "1",
    );
    assert_eq!(outcome.answer, expected_line(100_000, Query::Q5));
}

#[test]
fn a_job_waits_for_slots_and_fails_after_the_slot_wait_timeout() {
    let _one = one_cluster_at_a_time();
    let job_manager = JobManager::start(&["--slot-wait-timeout", "2s"]);
    let task_manager = TaskManager::start(&job_manager.control_address, "0", &[]);
    let rest = job_manager.rest();

    let job = rest.submit(Query::Q5, 1_000_000, 2);
    let waiting = wait_until("the job waiting for slots", CHANGE_DEADLINE, || {
        let status = rest.job(&job);
        match status["state"].as_str() {
            Some("WAITING_FOR_SLOTS") => Ok(status),
            Some("FINISHED" | "FAILED" | "CANCELED") => {
                panic!("the job ended without waiting for slots: {status}")
            }
            _ => Err(summary(&status)),
        }
    });
    let reason = waiting["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("slots"), "{waiting}");

    let ended = rest.wait_for_end(&job, CHANGE_DEADLINE);
    assert_eq!(ended["state"], "FAILED", "{ended}");
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("slot wait timeout"), "{ended}");
    assert!(
        ended["duration"]
            .as_u64()
            .is_some_and(|duration| duration >= 2000),
        "the job failed before the slot wait timeout: {ended}"
    );
    // The job held nothing: the one slot is free.
    let task_managers = rest.task_managers();
    assert_eq!(
        task_managers[&task_manager.id]["freeSlots"], 1,
        "{task_managers:?}"
    );
}

#[test]
fn application_mode_runs_one_job_and_exits() {
    let _one = one_cluster_at_a_time();
    let job_manager = JobManager::start(&[
        "--application",
        "nexmark",
        "--query",
        "q8",
        "--events",
        "1000000",
        "--parallelism",
        "2",
    ]);
    let task_managers: Vec<TaskManager> = ["0", "1"]
        .into_iter()
        .map(|core| TaskManager::start(&job_manager.control_address, core, &[]))
        .collect();
    let finished = job_manager.process.finish(DEADLINE);
    assert_eq!(finished.code, Some(0), "{}", finished.stderr);
    assert_eq!(
        first_line(&finished.stdout),
        expected_line(1_000_000, Query::Q8),
        "{}",
        finished.stderr
    );
    for task_manager in task_managers {
        let id = task_manager.id;
        let finished = task_manager.process.finish(DEADLINE);
        assert_eq!(
            finished.code,
            Some(0),
            "TaskManager {id}: {}",
            finished.stderr
        );
    }
}
