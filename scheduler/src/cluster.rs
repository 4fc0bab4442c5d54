//! The standalone cluster: the JobManager's control port and the
//! TaskManager process, joined by strom-net's control connections (see
//! `strom_net::control` for the protocol and its byte layout).
//!
//! Both sides keep the in-process messages of [`crate::messages`]: the
//! JobManager and the TaskManager run exactly as in a local cluster, and
//! this module only carries their messages over the wire.
//!
//! - JobManager side ([`ControlServer`]): a thread accepts control
//!   connections; each connection gets a thread that does the handshake,
//!   waits for `Register` (within [`REGISTRATION_TIMEOUT`]), registers the
//!   TaskManager with the JobManager, then reads its messages, answers its
//!   heartbeats and watches its liveness; and a writer thread that sends
//!   the JobManager's messages to it. A connection that closes, fails, or
//!   stays silent for the heartbeat timeout makes the JobManager declare
//!   the TaskManager lost. A peer that fails the handshake or sends
//!   anything malformed is logged and disconnected; nothing else is
//!   affected.
//! - TaskManager side ([`run_task_manager`]): connect (retrying until the
//!   registration timeout), start the slots and the network service,
//!   register, then forward the JobManager's messages to the TaskManager
//!   and its reports back, with a heartbeat each second. A TaskManager that
//!   loses its JobManager stops its slots and registers again as a new
//!   TaskManager (as in Flink, its subtasks were the JobManager's to
//!   restart); `Shutdown` ends the process.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use strom_core::snapshot::{CheckpointBarrier, Committable};
use strom_core::{Accumulators, JobArgs, Program};
use strom_net::control::{
    JobManagerConnection, Liveness, SlotAddress, SubtaskMetricsWire, TaskManagerConnection,
    ToJobManagerWire, ToTaskManagerWire, CONTROL_HANDSHAKE_TIMEOUT, HEARTBEAT_INTERVAL,
};
use strom_state::TaskStateHandle;

use crate::messages::{JobId, NetworkCounts, SlotRef, SubtaskMetrics, ToJobManager, ToTaskManager};
use crate::taskmanager::{SlotConfig, TaskManager};

/// How long a connected TaskManager may take to send `Register`.
pub const REGISTRATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Control connections served at once; more are closed at once (and
/// logged). Far above any real cluster, far below what threads allow.
pub const CONTROL_CONNECTION_COUNT_MAX: usize = 1024;
/// How long a TaskManager waits between attempts to reach its JobManager.
const CONNECT_RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How long a stopping JobManager waits for its last messages (the
/// TaskManagers' `Shutdown`) to be sent: one write's timeout.
pub const FINISH_SENDING_TIMEOUT: Duration = strom_net::control::CONTROL_WRITE_TIMEOUT;
/// The pause after a failed accept (out of descriptors, say).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// The JobManager's control port.
pub struct ControlServer {
    address: SocketAddr,
    senders: Arc<LiveSenders>,
}

/// How many connections' sending threads still run: each ends once the
/// JobManager has dropped its side (after `Shutdown`, the last message).
#[derive(Default)]
struct LiveSenders {
    count: Mutex<usize>,
    changed: Condvar,
}

impl LiveSenders {
    /// Counts one more sending thread until the guard drops.
    fn enter(self: &Arc<Self>) -> LiveSender {
        *self
            .count
            .lock()
            .unwrap_or_else(|poison| poison.into_inner()) += 1;
        LiveSender(self.clone())
    }
}

/// One running sending thread; dropping it (however the thread ends)
/// counts it out.
struct LiveSender(Arc<LiveSenders>);

impl Drop for LiveSender {
    fn drop(&mut self) {
        let mut count = self
            .0
            .count
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        *count -= 1;
        self.0.changed.notify_all();
    }
}

impl ControlServer {
    /// Listens on `bind` (port 0: any free port) for TaskManagers and
    /// registers them with the JobManager behind `job_manager`. TaskManagers
    /// must prove `secret` if given. Serves until the process ends.
    pub fn start(
        bind: SocketAddr,
        secret: Option<Vec<u8>>,
        heartbeat_timeout: Duration,
        job_manager: Sender<ToJobManager>,
    ) -> Result<ControlServer, String> {
        if heartbeat_timeout <= HEARTBEAT_INTERVAL {
            return Err(format!(
                "the heartbeat timeout ({heartbeat_timeout:?}) must be longer than the heartbeat interval ({HEARTBEAT_INTERVAL:?})"
            ));
        }
        let listener = TcpListener::bind(bind)
            .map_err(|error| format!("cannot bind the control port to {bind}: {error}"))?;
        let address = listener
            .local_addr()
            .map_err(|error| format!("cannot read the control port's address: {error}"))?;
        let secret: Option<Arc<[u8]>> = secret.map(Arc::from);
        let senders = Arc::new(LiveSenders::default());
        let accept_senders = senders.clone();
        thread::Builder::new()
            .name("strom-control-accept".to_string())
            .spawn(move || {
                accept_loop(
                    listener,
                    secret,
                    heartbeat_timeout,
                    job_manager,
                    accept_senders,
                )
            })
            .map_err(|error| format!("cannot start the control port's thread: {error}"))?;
        Ok(ControlServer { address, senders })
    }

    /// Waits until every connection has sent what the JobManager gave it,
    /// at most `timeout`; whether they all have. Call it after the
    /// JobManager has stopped (so its last `Shutdown` is queued and its
    /// side dropped): a process that exits before then cuts its
    /// TaskManagers off mid-message, and they try to register again
    /// instead of shutting down.
    pub fn finish_sending(&self, timeout: Duration) -> bool {
        let count = self
            .senders
            .count
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        let (count, _) = self
            .senders
            .changed
            .wait_timeout_while(count, timeout, |count| *count > 0)
            .unwrap_or_else(|poison| poison.into_inner());
        *count == 0
    }

    /// The address the control port listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.address
    }
}

fn accept_loop(
    listener: TcpListener,
    secret: Option<Arc<[u8]>>,
    heartbeat_timeout: Duration,
    job_manager: Sender<ToJobManager>,
    senders: Arc<LiveSenders>,
) {
    let served = Arc::new(AtomicUsize::new(0));
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(accepted) => accepted,
            Err(error) => {
                eprintln!("control port: accept failed: {error}");
                thread::sleep(ACCEPT_RETRY_DELAY);
                continue;
            }
        };
        if served.load(Ordering::Relaxed) >= CONTROL_CONNECTION_COUNT_MAX {
            eprintln!(
                "control port: refused {peer}: {CONTROL_CONNECTION_COUNT_MAX} connections are served already"
            );
            continue;
        }
        served.fetch_add(1, Ordering::Relaxed);
        let (secret, job_manager, served_too, senders) = (
            secret.clone(),
            job_manager.clone(),
            served.clone(),
            senders.clone(),
        );
        let spawned = thread::Builder::new()
            .name("strom-control".to_string())
            .spawn(move || {
                if let Err(error) = serve_task_manager(
                    stream,
                    secret.as_deref(),
                    heartbeat_timeout,
                    &job_manager,
                    &senders,
                ) {
                    eprintln!("control port: disconnected {peer}: {error}");
                }
                served_too.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(error) = spawned {
            served.fetch_sub(1, Ordering::Relaxed);
            eprintln!("control port: cannot serve {peer}: {error}");
        }
    }
}

/// One TaskManager's connection, from handshake to loss.
fn serve_task_manager(
    stream: std::net::TcpStream,
    secret: Option<&[u8]>,
    heartbeat_timeout: Duration,
    job_manager: &Sender<ToJobManager>,
    senders: &Arc<LiveSenders>,
) -> Result<(), String> {
    let mut connection =
        JobManagerConnection::accept(stream, secret).map_err(|error| error.to_string())?;
    let peer = connection.peer_addr();
    let (task_manager_id, slot_count, data_address) =
        match connection.recv_timeout(REGISTRATION_TIMEOUT) {
            Ok(Some(ToJobManagerWire::Register {
                task_manager_id,
                slot_count,
                data_address,
            })) => (task_manager_id, slot_count, data_address),
            Ok(Some(other)) => {
                let reason = format!("expected Register first, got {}", wire_name(&other));
                connection.close(&reason);
                return Err(reason);
            }
            Ok(None) => {
                let reason = format!("no Register within {REGISTRATION_TIMEOUT:?}");
                connection.close(&reason);
                return Err(reason);
            }
            Err(error) => return Err(error.to_string()),
        };
    let refuse = |connection: JobManagerConnection, reason: String| {
        connection.close(&reason);
        Err(reason)
    };
    if task_manager_id == 0 {
        return refuse(connection, "a TaskManager id must not be 0".to_string());
    }
    let data_address: SocketAddr = match data_address.parse() {
        Ok(address) => address,
        Err(_) => {
            return refuse(
                connection,
                format!("'{data_address}' is not a data address (IP:PORT)"),
            )
        }
    };
    let (sender, outbox) = mpsc::channel();
    let (registered, answer) = mpsc::channel();
    // Counted before the JobManager knows the TaskManager, so that its
    // messages (a `Shutdown` at once, say) are waited for from then on,
    // while `Registered` is still being sent; every return drops it.
    let live = senders.enter();
    job_manager
        .send(ToJobManager::RegisterTaskManager {
            task_manager: task_manager_id as usize,
            slot_count,
            sender,
            data_address: Some(data_address),
            control_address: Some(peer),
            registered: Some(registered),
        })
        .map_err(|_| "the JobManager stopped".to_string())?;
    match answer.recv() {
        Ok(Ok(())) => {}
        Ok(Err(reason)) => return refuse(connection, reason),
        Err(_) => return refuse(connection, "the JobManager stopped".to_string()),
    }
    connection
        .send(&ToTaskManagerWire::Registered { task_manager_id })
        .map_err(|error| error.to_string())?;
    let (control_sender, mut receiver) = connection.split();
    let control_sender = Arc::new(Mutex::new(control_sender));
    let writer_sender = control_sender.clone();
    // Ends when the JobManager forgets the TaskManager (dropping its
    // sender), after `Shutdown`, or when a send fails.
    thread::Builder::new()
        .name("strom-control-send".to_string())
        .spawn(move || {
            let _live = live;
            for message in outbox {
                let shutdown = matches!(message, ToTaskManager::Shutdown);
                let Some(wire) = to_task_manager_wire(message) else {
                    continue;
                };
                let mut sender = writer_sender
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                if sender.send(&wire).is_err() || shutdown {
                    break;
                }
            }
            writer_sender
                .lock()
                .unwrap_or_else(|poison| poison.into_inner())
                .close("the JobManager forgot this TaskManager");
        })
        .map_err(|error| format!("cannot start a control thread: {error}"))?;
    let mut liveness = Liveness::new(Instant::now(), HEARTBEAT_INTERVAL, heartbeat_timeout);
    let task_manager = task_manager_id as usize;
    let reason = loop {
        match receiver.recv_timeout(HEARTBEAT_INTERVAL) {
            Ok(Some(message)) => {
                liveness.heard(Instant::now());
                match message {
                    ToJobManagerWire::Heartbeat { .. } => {
                        let sent = control_sender
                            .lock()
                            .unwrap_or_else(|poison| poison.into_inner())
                            .send(&ToTaskManagerWire::Heartbeat);
                        if let Err(error) = sent {
                            break error.to_string();
                        }
                    }
                    ToJobManagerWire::Register { .. } => {
                        break "sent Register twice".to_string();
                    }
                    other => match to_job_manager(task_manager, other) {
                        Ok(message) => {
                            if job_manager.send(message).is_err() {
                                break "the JobManager stopped".to_string();
                            }
                        }
                        Err(error) => break error,
                    },
                }
            }
            Ok(None) => {
                if liveness.is_lost(Instant::now()) {
                    break format!("no heartbeat for {heartbeat_timeout:?}");
                }
            }
            Err(error) => break error.to_string(),
        }
    };
    control_sender
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .close(&reason);
    let _ = job_manager.send(ToJobManager::TaskManagerLost {
        task_manager,
        reason: reason.clone(),
    });
    Err(reason)
}

fn wire_name(message: &ToJobManagerWire) -> &'static str {
    match message {
        ToJobManagerWire::Register { .. } => "Register",
        ToJobManagerWire::Heartbeat { .. } => "Heartbeat",
        ToJobManagerWire::TaskFinished { .. } => "TaskFinished",
        ToJobManagerWire::TaskFailed { .. } => "TaskFailed",
        ToJobManagerWire::AcknowledgeCheckpoint { .. } => "AcknowledgeCheckpoint",
        ToJobManagerWire::DeclineCheckpoint { .. } => "DeclineCheckpoint",
        ToJobManagerWire::TaskMetrics { .. } => "TaskMetrics",
        ToJobManagerWire::NetworkMetrics { .. } => "NetworkMetrics",
    }
}

/// The JobManager's message on the wire; `None` for what never leaves a
/// process.
fn to_task_manager_wire(message: ToTaskManager) -> Option<ToTaskManagerWire> {
    Some(match message {
        ToTaskManager::DeployJob {
            job,
            attempt,
            program,
            args,
            slots,
            data_addresses,
            restore,
        } => ToTaskManagerWire::DeployJob {
            job: job.0,
            attempt,
            program,
            arguments: args.arguments,
            slots: slots
                .iter()
                .map(|vertex| {
                    vertex
                        .iter()
                        .map(|slot| SlotAddress {
                            task_manager_id: slot.task_manager as u64,
                            data_address: data_addresses
                                .get(&slot.task_manager)
                                .map(|address| address.to_string())
                                .unwrap_or_default(),
                            slot: slot.slot,
                        })
                        .collect()
                })
                .collect(),
            restore: restore.map(|path| path.display().to_string()),
        },
        ToTaskManager::TriggerCheckpoint {
            job,
            attempt,
            barrier,
        } => ToTaskManagerWire::TriggerCheckpoint {
            job: job.0,
            attempt,
            checkpoint_id: barrier.checkpoint_id,
            timestamp_ms: barrier.timestamp_ms,
            target: barrier.target.display().to_string(),
            is_savepoint: barrier.is_savepoint,
        },
        ToTaskManager::CheckpointComplete {
            job,
            attempt,
            checkpoint_id,
        } => ToTaskManagerWire::CheckpointComplete {
            job: job.0,
            attempt,
            checkpoint_id,
        },
        ToTaskManager::CancelJob { job } => ToTaskManagerWire::CancelJob { job: job.0 },
        ToTaskManager::Shutdown => ToTaskManagerWire::Shutdown,
        ToTaskManager::Report(_) => return None,
    })
}

/// A TaskManager's report as the JobManager takes it.
fn to_job_manager(task_manager: usize, message: ToJobManagerWire) -> Result<ToJobManager, String> {
    Ok(match message {
        ToJobManagerWire::TaskFinished {
            job,
            attempt,
            vertex,
            subtask,
            accumulators,
            committables,
        } => {
            let mut merged = Accumulators::default();
            for (name, value) in &accumulators {
                merged.add(name, *value);
            }
            ToJobManager::TaskFinished {
                job: JobId(job),
                attempt,
                vertex: vertex as usize,
                subtask,
                accumulators: merged,
                committables: committables
                    .into_iter()
                    .map(|(from, to)| Committable {
                        from: PathBuf::from(from),
                        to: PathBuf::from(to),
                    })
                    .collect(),
            }
        }
        ToJobManagerWire::TaskFailed {
            job,
            attempt,
            vertex,
            subtask,
            error,
        } => ToJobManager::TaskFailed {
            job: JobId(job),
            attempt,
            vertex: vertex as usize,
            subtask,
            error,
        },
        ToJobManagerWire::AcknowledgeCheckpoint {
            job,
            attempt,
            vertex,
            subtask,
            checkpoint_id,
            state_handle,
            pause_us,
            alignment_us,
        } => {
            let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(state_handle.len());
            aligned.extend_from_slice(&state_handle);
            let handle = rkyv::from_bytes::<TaskStateHandle, rkyv::rancor::Error>(&aligned)
                .map_err(|error| format!("a malformed state handle: {error}"))?;
            ToJobManager::AcknowledgeCheckpoint {
                job: JobId(job),
                attempt,
                vertex: vertex as usize,
                subtask,
                checkpoint_id,
                handle,
                pause: Duration::from_micros(pause_us),
                alignment: Duration::from_micros(alignment_us),
            }
        }
        ToJobManagerWire::DeclineCheckpoint {
            job,
            attempt,
            checkpoint_id,
            reason,
        } => ToJobManager::DeclineCheckpoint {
            job: JobId(job),
            attempt,
            checkpoint_id,
            reason,
        },
        ToJobManagerWire::TaskMetrics {
            job,
            attempt,
            tasks,
        } => ToJobManager::TaskMetrics {
            job: JobId(job),
            attempt,
            tasks: tasks
                .into_iter()
                .map(|task| SubtaskMetrics {
                    vertex: task.vertex as usize,
                    subtask: task.subtask,
                    records_in: task.records_in,
                    records_out: task.records_out,
                    watermark: task.watermark,
                })
                .collect(),
        },
        ToJobManagerWire::NetworkMetrics {
            elements_sent,
            bytes_sent,
            elements_received,
            bytes_received,
        } => ToJobManager::TaskManagerHeartbeat {
            task_manager,
            network: NetworkCounts {
                elements_sent,
                bytes_sent,
                elements_received,
                bytes_received,
            },
        },
        ToJobManagerWire::Register { .. } | ToJobManagerWire::Heartbeat { .. } => {
            return Err("an out of place Register or Heartbeat".to_string())
        }
    })
}

/// A TaskManager's report on the wire; `None` for what is not sent.
fn to_job_manager_wire(message: ToJobManager) -> Result<Option<ToJobManagerWire>, String> {
    Ok(Some(match message {
        ToJobManager::TaskFinished {
            job,
            attempt,
            vertex,
            subtask,
            accumulators,
            committables,
        } => ToJobManagerWire::TaskFinished {
            job: job.0,
            attempt,
            vertex: vertex as u32,
            subtask,
            accumulators: accumulators
                .iter()
                .map(|(name, value)| (name.to_string(), value))
                .collect(),
            committables: committables
                .into_iter()
                .map(|committable| {
                    (
                        committable.from.display().to_string(),
                        committable.to.display().to_string(),
                    )
                })
                .collect(),
        },
        ToJobManager::TaskFailed {
            job,
            attempt,
            vertex,
            subtask,
            error,
        } => ToJobManagerWire::TaskFailed {
            job: job.0,
            attempt,
            vertex: vertex as u32,
            subtask,
            error: strom_net::control::cut_to_length(&error, strom_net::control::REASON_LENGTH_MAX)
                .to_string(),
        },
        ToJobManager::AcknowledgeCheckpoint {
            job,
            attempt,
            vertex,
            subtask,
            checkpoint_id,
            handle,
            pause,
            alignment,
        } => ToJobManagerWire::AcknowledgeCheckpoint {
            job: job.0,
            attempt,
            vertex: vertex as u32,
            subtask,
            checkpoint_id,
            state_handle: rkyv::to_bytes::<rkyv::rancor::Error>(&handle)
                .map_err(|error| format!("cannot encode a state handle: {error}"))?
                .to_vec(),
            pause_us: pause.as_micros() as u64,
            alignment_us: alignment.as_micros() as u64,
        },
        ToJobManager::DeclineCheckpoint {
            job,
            attempt,
            checkpoint_id,
            reason,
        } => ToJobManagerWire::DeclineCheckpoint {
            job: job.0,
            attempt,
            checkpoint_id,
            reason: strom_net::control::cut_to_length(
                &reason,
                strom_net::control::REASON_LENGTH_MAX,
            )
            .to_string(),
        },
        ToJobManager::TaskMetrics {
            job,
            attempt,
            tasks,
        } => ToJobManagerWire::TaskMetrics {
            job: job.0,
            attempt,
            tasks: tasks
                .into_iter()
                .map(|task| SubtaskMetricsWire {
                    vertex: task.vertex as u32,
                    subtask: task.subtask,
                    records_in: task.records_in,
                    records_out: task.records_out,
                    watermark: task.watermark,
                })
                .collect(),
        },
        ToJobManager::TaskManagerHeartbeat { network, .. } => ToJobManagerWire::NetworkMetrics {
            elements_sent: network.elements_sent,
            bytes_sent: network.bytes_sent,
            elements_received: network.elements_received,
            bytes_received: network.bytes_received,
        },
        _ => return Ok(None),
    }))
}

/// How to run a TaskManager process.
#[derive(Clone, Debug)]
pub struct TaskManagerConfig {
    /// The JobManager's control address, `host:port`.
    pub job_manager: String,
    pub slot_count: u32,
    /// The CPUs of the slots (slot `i` on the `i`-th); empty: the CPUs this
    /// process may use.
    pub cpus: Vec<usize>,
    /// Where the data port listens (port 0: any free port); other
    /// TaskManagers connect to the address it reports.
    pub data_bind: SocketAddr,
    pub secret: Option<Vec<u8>>,
    /// How long to keep trying to reach the JobManager.
    pub registration_timeout: Duration,
    /// How long the JobManager may stay silent before it counts as lost.
    pub heartbeat_timeout: Duration,
    /// Busy-polling of idle slots (see [`SlotConfig::busy_poll`]).
    pub busy_poll: Option<Duration>,
}

/// Runs a TaskManager until its JobManager tells it to shut down; returns
/// an error if it cannot reach (or is refused by) its JobManager within
/// the registration timeout.
pub fn run_task_manager(programs: Vec<Program>, config: TaskManagerConfig) -> Result<(), String> {
    loop {
        match serve_job_manager(&programs, &config)? {
            Served::Shutdown => return Ok(()),
            Served::Lost(reason) => {
                eprintln!("lost the JobManager: {reason}; registering again");
            }
        }
    }
}

enum Served {
    Shutdown,
    Lost(String),
}

/// A random nonzero id: a TaskManager that registers again is a new one.
fn random_task_manager_id() -> u64 {
    loop {
        let id = (JobId::random().0 as u64) & (usize::MAX as u64);
        if id != 0 {
            return id;
        }
    }
}

fn connect(config: &TaskManagerConfig) -> Result<TaskManagerConnection, String> {
    let deadline = Instant::now() + config.registration_timeout;
    loop {
        let attempt = TaskManagerConnection::connect(
            &config.job_manager,
            config.secret.as_deref(),
            CONTROL_HANDSHAKE_TIMEOUT,
        );
        match attempt {
            Ok(connection) => return Ok(connection),
            // A refusal (a wrong secret) does not get better by retrying.
            Err(error @ strom_net::NetError::Rejected { .. }) => return Err(error.to_string()),
            Err(error) if Instant::now() >= deadline => {
                return Err(format!(
                    "cannot reach the JobManager at {} within {:?}: {error}",
                    config.job_manager, config.registration_timeout
                ))
            }
            Err(_) => thread::sleep(CONNECT_RETRY_INTERVAL),
        }
    }
}

/// One registration: from connecting to losing the JobManager or shutdown.
fn serve_job_manager(programs: &[Program], config: &TaskManagerConfig) -> Result<Served, String> {
    let mut connection = connect(config)?;
    let id = random_task_manager_id();
    let (reports, report_inbox) = mpsc::channel::<ToJobManager>();
    let (inbox_sender, inbox) = mpsc::channel::<ToTaskManager>();
    let task_manager = TaskManager::start(
        id as usize,
        programs.to_vec(),
        SlotConfig {
            count: config.slot_count,
            cpus: config.cpus.clone(),
            busy_poll: config.busy_poll,
        },
        Some(config.data_bind),
        config.secret.clone(),
        reports.clone(),
        inbox_sender.clone(),
    )?;
    let data_address = task_manager
        .data_address()
        .expect("a TaskManager of a cluster has a data port");
    let task_manager_thread = thread::Builder::new()
        .name("strom-taskmanager".to_string())
        .spawn(move || task_manager.run(inbox))
        .map_err(|error| format!("cannot start the TaskManager thread: {error}"))?;
    let stop_task_manager = |inbox_sender: &Sender<ToTaskManager>,
                             thread: thread::JoinHandle<()>| {
        let _ = inbox_sender.send(ToTaskManager::Shutdown);
        let _ = thread.join();
    };
    let registered = connection
        .send(&ToJobManagerWire::Register {
            task_manager_id: id,
            slot_count: config.slot_count,
            data_address: data_address.to_string(),
        })
        .map_err(|error| error.to_string())
        .and_then(|()| match connection.recv_timeout(REGISTRATION_TIMEOUT) {
            Ok(Some(ToTaskManagerWire::Registered { task_manager_id }))
                if task_manager_id == id =>
            {
                Ok(())
            }
            Ok(Some(_)) => Err("the JobManager answered Register with something else".to_string()),
            Ok(None) => Err(format!(
                "the JobManager did not answer Register within {REGISTRATION_TIMEOUT:?}"
            )),
            Err(error) => Err(error.to_string()),
        });
    if let Err(error) = registered {
        stop_task_manager(&inbox_sender, task_manager_thread);
        return Err(format!("cannot register with the JobManager: {error}"));
    }
    eprintln!(
        "TaskManager {id:016x} registered with the JobManager at {} ({} slots on CPUs {:?}, data port {data_address})",
        connection.peer_addr(),
        config.slot_count,
        if config.cpus.is_empty() {
            crate::taskmanager::allowed_cpus()
        } else {
            config.cpus.clone()
        }
    );
    let (control_sender, mut receiver) = connection.split();
    let control_sender = Arc::new(Mutex::new(control_sender));
    let writer_sender = control_sender.clone();
    // The TaskManager's reports, and a heartbeat every second, sent by
    // this thread so that a busy TaskManager thread (reading a large
    // checkpoint to restore) never misses one. Ends when the TaskManager
    // stops.
    let writer = thread::Builder::new()
        .name("strom-control-send".to_string())
        .spawn(move || {
            let mut last_heartbeat = Instant::now();
            loop {
                let wire = match report_inbox.recv_timeout(HEARTBEAT_INTERVAL) {
                    Ok(report) => match to_job_manager_wire(report) {
                        Ok(wire) => wire,
                        Err(error) => {
                            eprintln!("cannot report to the JobManager: {error}");
                            None
                        }
                    },
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                };
                let heartbeat = last_heartbeat.elapsed() >= HEARTBEAT_INTERVAL;
                if wire.is_none() && !heartbeat {
                    continue;
                }
                let mut sender = writer_sender
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
                let mut sent = wire.map_or(Ok(()), |wire| sender.send(&wire));
                if heartbeat && sent.is_ok() {
                    last_heartbeat = Instant::now();
                    sent = sender.send(&ToJobManagerWire::Heartbeat {
                        task_manager_id: id,
                    });
                }
                if let Err(error) = sent {
                    // The reader finds the connection lost too and starts
                    // over; until then reports have nowhere to go.
                    eprintln!("cannot report to the JobManager: {error}");
                    break;
                }
            }
        })
        .map_err(|error| format!("cannot start a control thread: {error}"))?;
    let mut liveness = Liveness::new(Instant::now(), HEARTBEAT_INTERVAL, config.heartbeat_timeout);
    let outcome = loop {
        match receiver.recv_timeout(HEARTBEAT_INTERVAL) {
            Ok(Some(message)) => {
                liveness.heard(Instant::now());
                let message = match message {
                    ToTaskManagerWire::Heartbeat | ToTaskManagerWire::Registered { .. } => continue,
                    ToTaskManagerWire::Shutdown => break Served::Shutdown,
                    other => from_wire(programs, id as usize, other, &reports),
                };
                if let Some(message) = message {
                    if inbox_sender.send(message).is_err() {
                        break Served::Lost("the TaskManager stopped".to_string());
                    }
                }
            }
            Ok(None) => {
                if liveness.is_lost(Instant::now()) {
                    break Served::Lost(format!(
                        "no heartbeat answer for {:?}",
                        config.heartbeat_timeout
                    ));
                }
            }
            Err(error) => break Served::Lost(error.to_string()),
        }
    };
    control_sender
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
        .close(match &outcome {
            Served::Shutdown => "shut down",
            Served::Lost(_) => "lost the JobManager",
        });
    drop(reports);
    stop_task_manager(&inbox_sender, task_manager_thread);
    drop(inbox_sender);
    let _ = writer.join();
    Ok(outcome)
}

/// The JobManager's message as the TaskManager takes it; a deployment it
/// cannot take is reported failed (to `reports`) and dropped.
fn from_wire(
    programs: &[Program],
    own_id: usize,
    message: ToTaskManagerWire,
    reports: &Sender<ToJobManager>,
) -> Option<ToTaskManager> {
    Some(match message {
        ToTaskManagerWire::DeployJob {
            job,
            attempt,
            program,
            arguments,
            slots,
            restore,
        } => match deployment(programs, &program, arguments, &slots) {
            Ok((args, slots, data_addresses)) => ToTaskManager::DeployJob {
                job: JobId(job),
                attempt,
                program,
                args,
                slots,
                data_addresses,
                restore: restore.map(PathBuf::from),
            },
            Err(error) => {
                let _ = reports.send(ToJobManager::TaskFailed {
                    job: JobId(job),
                    attempt,
                    vertex: 0,
                    subtask: 0,
                    error: format!("TaskManager {own_id:016x} cannot deploy the job: {error}"),
                });
                return None;
            }
        },
        ToTaskManagerWire::TriggerCheckpoint {
            job,
            attempt,
            checkpoint_id,
            timestamp_ms,
            target,
            is_savepoint,
        } => ToTaskManager::TriggerCheckpoint {
            job: JobId(job),
            attempt,
            barrier: CheckpointBarrier {
                checkpoint_id,
                timestamp_ms,
                target: Arc::new(PathBuf::from(target)),
                is_savepoint,
            },
        },
        ToTaskManagerWire::CheckpointComplete {
            job,
            attempt,
            checkpoint_id,
        } => ToTaskManager::CheckpointComplete {
            job: JobId(job),
            attempt,
            checkpoint_id,
        },
        ToTaskManagerWire::CancelJob { job } => ToTaskManager::CancelJob { job: JobId(job) },
        ToTaskManagerWire::Shutdown => ToTaskManager::Shutdown,
        ToTaskManagerWire::Registered { .. } | ToTaskManagerWire::Heartbeat => return None,
    })
}

type Placement = (JobArgs, Vec<Vec<SlotRef>>, BTreeMap<usize, SocketAddr>);

/// Parses a deployment's arguments (as the JobManager did) and placement.
fn deployment(
    programs: &[Program],
    program_name: &str,
    arguments: Vec<String>,
    slots: &[Vec<SlotAddress>],
) -> Result<Placement, String> {
    let program = programs
        .iter()
        .find(|program| program.name == program_name)
        .ok_or_else(|| format!("this TaskManager does not know program '{program_name}'"))?;
    let matches = program.parse(&arguments)?;
    let args = JobArgs::from_matches(arguments, &matches);
    let mut data_addresses = BTreeMap::new();
    let mut placement = Vec::with_capacity(slots.len());
    for vertex in slots {
        let mut vertex_slots = Vec::with_capacity(vertex.len());
        for slot in vertex {
            let task_manager = slot.task_manager_id as usize;
            if let std::collections::btree_map::Entry::Vacant(entry) =
                data_addresses.entry(task_manager)
            {
                let address: SocketAddr = slot.data_address.parse().map_err(|_| {
                    format!(
                        "TaskManager {task_manager:016x} has no valid data address ('{}')",
                        slot.data_address
                    )
                })?;
                entry.insert(address);
            }
            vertex_slots.push(SlotRef {
                task_manager,
                slot: slot.slot,
            });
        }
        placement.push(vertex_slots);
    }
    Ok((args, placement, data_addresses))
}

/// Reads a shared secret file: its content, trimmed; an empty or unreadable
/// file is an error naming it.
pub fn read_secret_file(path: &std::path::Path) -> Result<Vec<u8>, String> {
    let content = std::fs::read_to_string(path)
        .map_err(|error| format!("cannot read the secret file '{}': {error}", path.display()))?;
    let secret = content.trim();
    if secret.is_empty() {
        return Err(format!("the secret file '{}' is empty", path.display()));
    }
    Ok(secret.as_bytes().to_vec())
}

#[cfg(test)]
mod tests {
    use strom_state::{BlockRef, OperatorStateHandle};

    use super::*;
    use crate::test_programs::NUMBERS;

    /// Through the wire and back, as the control connection carries it.
    fn report_round_trip(report: ToJobManager) -> ToJobManager {
        let wire = to_job_manager_wire(report)
            .expect("encodes")
            .expect("a report that is sent");
        to_job_manager(7, wire).expect("decodes")
    }

    #[test]
    fn reports_cross_the_wire_unchanged() {
        let handle = TaskStateHandle {
            file_name: "task-1-0".into(),
            file_size: 4096,
            file_crc32: 0xdead_beef,
            operators: vec![OperatorStateHandle {
                operator_id: "2:window".into(),
                operator_name: "window".into(),
                subtask_index: 0,
                parallelism: 2,
                max_parallelism: 128,
                key_groups: vec![BlockRef {
                    index: 3,
                    offset: 16,
                    length: 100,
                    crc32: 9,
                }],
                operator_state: Vec::new(),
            }],
        };
        let acknowledged = report_round_trip(ToJobManager::AcknowledgeCheckpoint {
            job: JobId(42),
            attempt: 3,
            vertex: 1,
            subtask: 0,
            checkpoint_id: 9,
            handle: handle.clone(),
            pause: Duration::from_micros(54),
            alignment: Duration::from_micros(1290),
        });
        match acknowledged {
            ToJobManager::AcknowledgeCheckpoint {
                job,
                attempt,
                vertex,
                checkpoint_id,
                handle: decoded,
                pause,
                alignment,
                ..
            } => {
                assert_eq!((job, attempt, vertex, checkpoint_id), (JobId(42), 3, 1, 9));
                assert_eq!(decoded, handle);
                assert_eq!(
                    (pause, alignment),
                    (Duration::from_micros(54), Duration::from_micros(1290))
                );
            }
            _ => panic!("an acknowledgement"),
        }
        let mut accumulators = Accumulators::default();
        accumulators.add("rows", 74);
        let finished = report_round_trip(ToJobManager::TaskFinished {
            job: JobId(42),
            attempt: 3,
            vertex: 1,
            subtask: 1,
            accumulators: accumulators.clone(),
            committables: vec![Committable {
                from: "/out/.part-0.inprogress".into(),
                to: "/out/part-0".into(),
            }],
        });
        match finished {
            ToJobManager::TaskFinished {
                accumulators: decoded,
                committables,
                subtask,
                ..
            } => {
                assert_eq!((decoded, subtask), (accumulators, 1));
                assert_eq!(committables[0].to, PathBuf::from("/out/part-0"));
            }
            _ => panic!("a finished task"),
        }
        match report_round_trip(ToJobManager::TaskManagerHeartbeat {
            task_manager: 1,
            network: NetworkCounts {
                elements_sent: 1,
                bytes_sent: 2,
                elements_received: 3,
                bytes_received: 4,
            },
        }) {
            ToJobManager::TaskManagerHeartbeat {
                task_manager,
                network,
            } => {
                // The connection, not the message, says who it is.
                assert_eq!(task_manager, 7);
                assert_eq!(network.bytes_received, 4);
            }
            _ => panic!("a heartbeat"),
        }
        let malformed = ToJobManagerWire::AcknowledgeCheckpoint {
            job: 1,
            attempt: 1,
            vertex: 0,
            subtask: 0,
            checkpoint_id: 1,
            state_handle: vec![0xff; 10],
            pause_us: 0,
            alignment_us: 0,
        };
        let refused = to_job_manager(7, malformed).err().expect("refused");
        assert!(refused.contains("malformed state handle"), "{refused}");
    }

    #[test]
    fn a_deployment_crosses_the_wire_and_is_parsed_as_the_job_manager_did() {
        let arguments = vec!["--parallelism".to_string(), "2".to_string()];
        let args = JobArgs::from_matches(
            arguments.clone(),
            &NUMBERS.parse(&arguments).expect("parses"),
        );
        let slots = vec![
            vec![
                SlotRef {
                    task_manager: 5,
                    slot: 0,
                },
                SlotRef {
                    task_manager: 9,
                    slot: 1,
                },
            ];
            2
        ];
        let data_addresses = BTreeMap::from([
            (5, SocketAddr::from(([10, 0, 0, 5], 4000))),
            (9, SocketAddr::from(([10, 0, 0, 9], 4001))),
        ]);
        let wire = to_task_manager_wire(ToTaskManager::DeployJob {
            job: JobId(1),
            attempt: 2,
            program: "numbers".into(),
            args: args.clone(),
            slots: slots.clone(),
            data_addresses: data_addresses.clone(),
            restore: Some(PathBuf::from("/chk/chk-3")),
        })
        .expect("sent");
        let (reports, report_inbox) = mpsc::channel();
        match from_wire(&[NUMBERS], 5, wire, &reports) {
            Some(ToTaskManager::DeployJob {
                args: decoded_args,
                slots: decoded_slots,
                data_addresses: decoded_addresses,
                restore,
                attempt,
                ..
            }) => {
                assert_eq!(decoded_args.arguments, args.arguments);
                assert_eq!(decoded_args.parallelism, 2);
                assert_eq!(decoded_slots, slots);
                assert_eq!(decoded_addresses, data_addresses);
                assert_eq!(restore, Some(PathBuf::from("/chk/chk-3")));
                assert_eq!(attempt, 2);
            }
            _ => panic!("a deployment"),
        }
        // A program this TaskManager does not know fails the attempt.
        let unknown = ToTaskManagerWire::DeployJob {
            job: 1,
            attempt: 2,
            program: "other".into(),
            arguments: Vec::new(),
            slots: Vec::new(),
            restore: None,
        };
        assert!(from_wire(&[NUMBERS], 5, unknown, &reports).is_none());
        match report_inbox.try_recv() {
            Ok(ToJobManager::TaskFailed { error, attempt, .. }) => {
                assert_eq!(attempt, 2);
                assert!(error.contains("does not know program 'other'"), "{error}");
            }
            _ => panic!("a failure report"),
        }
    }
}
