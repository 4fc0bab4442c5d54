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

/// A job as `list` shows it.
#[derive(Clone, Debug)]
pub struct JobStatus {
    pub job_id: JobId,
    pub job_name: String,
    pub state: String,
    pub attempt: u32,
    pub checkpoints: CheckpointCounts,
    pub latest_checkpoint: Option<PathBuf>,
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
    /// (reached at `data_addresses[task_manager]`); `restore` is the
    /// checkpoint the operators start from.
    DeployJob {
        job: JobId,
        attempt: u32,
        program: String,
        args: JobArgs,
        slots: Vec<Vec<SlotRef>>,
        data_addresses: Vec<Option<SocketAddr>>,
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
