//! The messages between client, JobManager and TaskManager.
//!
//! Protocol of a job:
//! 1. a TaskManager registers with its slot count;
//! 2. the client submits a program name and its arguments; the JobManager
//!    builds and validates the JobGraph (refusing an invalid job before
//!    anything runs), checks the savepoint it starts from, and checks that
//!    enough slots are free;
//! 3. the JobManager sends `DeployJob` with the attempt number, the slot of
//!    every subtask and the checkpoint to restore; the TaskManager rebuilds
//!    the same JobGraph from the program, reads the checkpoint, and starts
//!    the subtasks in those slots;
//! 4. while the job runs, the JobMaster triggers checkpoints
//!    (`TriggerCheckpoint` to the sources' TaskManager), tasks acknowledge
//!    them (`AcknowledgeCheckpoint`), and once one is complete every task
//!    hears `CheckpointComplete`;
//! 5. every subtask reports `TaskFinished` (with its accumulators) or
//!    `TaskFailed`; a failure cancels the attempt, and the restart strategy
//!    decides between a new attempt from the latest completed checkpoint
//!    and failing the job. Reports of an older attempt are ignored;
//! 6. when every subtask of an attempt has finished, the job's result is
//!    the merge of their accumulators.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::time::Duration;

use strom_core::snapshot::{CheckpointBarrier, Committable};
use strom_core::{Accumulators, JobArgs};

use strom_state::TaskStateHandle;

use crate::coordinator::CheckpointCounts;

/// A job's id: 128 random bits, written as 32 hex digits (as Flink's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u128);

impl JobId {
    /// A new random id.
    pub fn random() -> JobId {
        use std::hash::{BuildHasher, Hasher};
        // RandomState is seeded from the OS's randomness per instance.
        let half = || {
            let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
            hasher.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|elapsed| elapsed.as_nanos())
                    .unwrap_or_default(),
            );
            hasher.finish()
        };
        JobId((u128::from(half()) << 64) | u128::from(half()))
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for JobId {
    type Err = String;

    fn from_str(text: &str) -> Result<JobId, String> {
        if text.len() != 32 {
            return Err(format!("'{text}' is not a job id (32 hex digits)"));
        }
        u128::from_str_radix(text, 16)
            .map(JobId)
            .map_err(|_| format!("'{text}' is not a job id (32 hex digits)"))
    }
}

/// A slot of the cluster: which TaskManager, which of its slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotRef {
    pub task_manager: usize,
    pub slot: u32,
}

/// What a finished job produced.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub job_id: JobId,
    pub job_name: String,
    pub accumulators: Accumulators,
    /// From the first deployment to the last subtask finishing.
    pub duration: Duration,
    pub slots_used: u32,
    /// How many times the job restarted after a failure.
    pub restarts: u32,
    pub checkpoints: CheckpointCounts,
    /// The savepoint the job was stopped with, if it was stopped.
    pub stopped_with_savepoint: Option<PathBuf>,
}

/// What happens to a job while it runs, for the client to show.
#[derive(Clone, Debug)]
pub enum JobEvent {
    Submitted {
        job_id: JobId,
        job_name: String,
        restored_from: Option<PathBuf>,
    },
    CheckpointCompleted {
        id: u64,
        savepoint: bool,
        path: PathBuf,
        duration: Duration,
        size_bytes: u64,
        /// The longest any task stopped its stream for the snapshot.
        pause_max: Duration,
        /// The longest any task held back inputs that had delivered the
        /// barrier while it waited for the others (alignment).
        alignment_max: Duration,
    },
    CheckpointAborted {
        id: u64,
        reason: String,
    },
    Restarting {
        restart: u32,
        delay: Duration,
        cause: String,
        from_checkpoint: Option<PathBuf>,
    },
}

/// One line (two for a restored submission) per event, as `strom local`
/// and a JobManager's log show it.
impl fmt::Display for JobEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JobEvent::Submitted {
                job_id,
                job_name,
                restored_from,
            } => {
                write!(f, "job {job_id} ({job_name}) submitted")?;
                if let Some(path) = restored_from {
                    write!(f, "\nrestoring from {}", path.display())?;
                }
                Ok(())
            }
            JobEvent::CheckpointCompleted {
                id,
                savepoint,
                path,
                duration,
                size_bytes,
                pause_max,
                alignment_max,
            } => write!(
                f,
                "{} {id} completed in {} ms, {size_bytes} bytes, longest stream pause {} us, longest alignment {} us: {}",
                if *savepoint { "savepoint" } else { "checkpoint" },
                duration.as_millis(),
                pause_max.as_micros(),
                alignment_max.as_micros(),
                path.display()
            ),
            JobEvent::CheckpointAborted { id, reason } => {
                write!(f, "checkpoint {id} aborted: {reason}")
            }
            JobEvent::Restarting {
                restart,
                delay,
                cause,
                from_checkpoint,
            } => write!(
                f,
                "restart {restart} in {} ms from {}: {cause}",
                delay.as_millis(),
                from_checkpoint
                    .as_ref()
                    .map(|path| path.display().to_string())
                    .unwrap_or_else(|| "the start".to_string())
            ),
        }
    }
}

/// A job as `list` and the REST API show it: running, waiting, or ended
/// (the JobManager keeps the last [`crate::jobmanager::JOB_ARCHIVE_SIZE`]
/// ended jobs, as Flink's job history).
#[derive(Clone, Debug)]
pub struct JobStatus {
    pub job_id: JobId,
    pub job_name: String,
    /// The program it runs.
    pub program: String,
    /// Flink's words: `RUNNING`, `RESTARTING`, `FINISHED`, `FAILED`,
    /// `CANCELED`; and `WAITING_FOR_SLOTS` while the cluster has too few
    /// free slots for it (`reason` says how many it needs).
    pub state: String,
    /// Why the job is in its state, when that needs saying: what it waits
    /// for, why it failed or restarts.
    pub reason: Option<String>,
    pub attempt: u32,
    pub restarts: u32,
    pub parallelism: u32,
    /// Milliseconds since the Unix epoch.
    pub start_time_ms: u64,
    pub end_time_ms: Option<u64>,
    /// From submission to now, or to its end.
    pub duration: Duration,
    pub checkpoints: CheckpointCounts,
    pub latest_checkpoint: Option<PathBuf>,
    pub vertices: Vec<VertexStatus>,
    /// The merged accumulators of a finished job (the program's report
    /// is made from them).
    pub accumulators: Option<Accumulators>,
    /// The savepoint a stopped job was stopped with.
    pub stopped_with_savepoint: Option<PathBuf>,
}

impl JobStatus {
    /// Whether the job has ended (finished, failed or was cancelled).
    pub fn is_terminal(&self) -> bool {
        matches!(self.state.as_str(), "FINISHED" | "FAILED" | "CANCELED")
    }
}

/// A vertex of a job (a chain of operators) and its subtasks.
#[derive(Clone, Debug)]
pub struct VertexStatus {
    pub id: usize,
    /// The chained operators' names, joined with " -> ".
    pub name: String,
    pub parallelism: u32,
    pub subtasks: Vec<SubtaskStatus>,
}

/// One subtask's figures of the current attempt, as its TaskManager last
/// reported them (about once a second).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubtaskStatus {
    pub subtask: u32,
    /// The TaskManager it runs on (its id in hex), when deployed.
    pub task_manager: Option<String>,
    /// Records the subtask read from its input channels.
    pub records_in: u64,
    /// Records it wrote to its output channels.
    pub records_out: u64,
    /// Its current watermark (input watermark; a source's output
    /// watermark), milliseconds; `None` before the first.
    pub watermark: Option<i64>,
}

/// What one subtask's task counts, reported by its TaskManager.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubtaskMetrics {
    pub vertex: usize,
    pub subtask: u32,
    pub records_in: u64,
    pub records_out: u64,
    /// `i64::MIN` before the first watermark.
    pub watermark: i64,
}

/// What a TaskManager's network service moved over its links.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetworkCounts {
    /// Channel elements (record buffers and events) sent to other
    /// TaskManagers, and their payload bytes.
    pub elements_sent: u64,
    pub bytes_sent: u64,
    /// Channel elements received from other TaskManagers, and their
    /// payload bytes.
    pub elements_received: u64,
    pub bytes_received: u64,
}

/// A TaskManager as `GET /taskmanagers` shows it.
#[derive(Clone, Debug)]
pub struct TaskManagerStatus {
    /// Its id, 16 hex digits.
    pub id: String,
    /// Where its control connection comes from (`None` in a local cluster).
    pub control_address: Option<String>,
    /// Where other TaskManagers reach its data port.
    pub data_address: Option<String>,
    pub slots_total: u32,
    pub slots_free: u32,
    /// Milliseconds since it was last heard from.
    pub last_heartbeat_ms_ago: u64,
    pub network: NetworkCounts,
}

/// A job submitted to the Dispatcher (`POST /jobs`, `strom run`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSubmission {
    pub program: String,
    /// The program's arguments, with any job options among them.
    pub arguments: Vec<String>,
    /// Overrides `--parallelism` among the arguments.
    pub parallelism: Option<u32>,
    /// A savepoint (or retained checkpoint) to start from: an absolute
    /// path.
    pub savepoint_path: Option<PathBuf>,
    pub allow_non_restored_state: bool,
}

/// Messages to the JobManager.
pub enum ToJobManager {
    SubmitJob {
        program: String,
        args: JobArgs,
        reply: Sender<Result<JobResult, String>>,
        events: Option<Sender<JobEvent>>,
    },
    RegisterTaskManager {
        task_manager: usize,
        slot_count: u32,
        sender: Sender<ToTaskManager>,
        /// Where other TaskManagers reach its network service.
        data_address: Option<SocketAddr>,
        /// Where its control connection comes from (a remote TaskManager).
        control_address: Option<SocketAddr>,
        /// Whether the registration was accepted (a remote TaskManager
        /// waits for it).
        registered: Option<Sender<Result<(), String>>>,
    },
    TaskFinished {
        job: JobId,
        attempt: u32,
        vertex: usize,
        subtask: u32,
        accumulators: Accumulators,
        /// Files its sinks staged, to commit when the job has finished.
        committables: Vec<Committable>,
    },
    TaskFailed {
        job: JobId,
        attempt: u32,
        vertex: usize,
        subtask: u32,
        error: String,
    },
    AcknowledgeCheckpoint {
        job: JobId,
        attempt: u32,
        vertex: usize,
        subtask: u32,
        checkpoint_id: u64,
        handle: TaskStateHandle,
        /// How long the task's stream stood still for the snapshot.
        pause: Duration,
        /// How long it held back inputs while aligning the barrier.
        alignment: Duration,
    },
    DeclineCheckpoint {
        job: JobId,
        attempt: u32,
        checkpoint_id: u64,
        reason: String,
    },
    /// Takes a savepoint of a running job (into `target`, or the job's
    /// checkpoint directory), and with `stop` ends the job after it.
    TriggerSavepoint {
        job: JobId,
        target: Option<PathBuf>,
        stop: bool,
        reply: Sender<Result<PathBuf, String>>,
    },
    ListJobs {
        reply: Sender<Vec<JobStatus>>,
    },
    /// Submits a job without waiting for it: the answer is its id, or why
    /// it was refused. Its end goes to the job archive.
    SubmitDetached {
        submission: JobSubmission,
        reply: Sender<Result<JobId, String>>,
    },
    ListTaskManagers {
        reply: Sender<Vec<TaskManagerStatus>>,
    },
    /// What the tasks of one attempt counted, about once a second.
    TaskMetrics {
        job: JobId,
        attempt: u32,
        tasks: Vec<SubtaskMetrics>,
    },
    /// A TaskManager's liveness and network figures.
    TaskManagerHeartbeat {
        task_manager: usize,
        network: NetworkCounts,
    },
    /// A TaskManager stopped heartbeating or its connection closed: its
    /// slots are gone, and the jobs that ran there restart.
    TaskManagerLost {
        task_manager: usize,
        reason: String,
    },
    CancelJob {
        job: JobId,
        reply: Sender<Result<(), String>>,
    },
    Shutdown,
}

/// Messages to a TaskManager.
pub enum ToTaskManager {
    /// Runs the subtasks of one attempt of the job that `slots[vertex][subtask]`
    /// places on this TaskManager, and wires their channels to the others
    /// (reached at `data_addresses[&task_manager]`); `restore` is the
    /// checkpoint the operators start from.
    DeployJob {
        job: JobId,
        attempt: u32,
        program: String,
        args: JobArgs,
        slots: Vec<Vec<SlotRef>>,
        data_addresses: BTreeMap<usize, SocketAddr>,
        restore: Option<PathBuf>,
    },
    /// Injects `barrier` at every source subtask of the attempt.
    TriggerCheckpoint {
        job: JobId,
        attempt: u32,
        barrier: CheckpointBarrier,
    },
    /// Every task's state of the checkpoint is durable.
    CheckpointComplete {
        job: JobId,
        attempt: u32,
        checkpoint_id: u64,
    },
    CancelJob {
        job: JobId,
    },
    /// A report of one of this TaskManager's subtasks, to forward.
    Report(ToJobManager),
    Shutdown,
}
