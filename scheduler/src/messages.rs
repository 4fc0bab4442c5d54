//! The messages between client, JobManager and TaskManager.
//!
//! Protocol of a job:
//! 1. a TaskManager registers with its slot count;
//! 2. the client submits a program name and its arguments; the JobManager
//!    builds and validates the JobGraph (refusing an invalid job before
//!    anything runs) and checks that enough slots are free;
//! 3. the JobManager sends `DeployJob` with the slot of every subtask; the
//!    TaskManager rebuilds the same JobGraph from the program and starts the
//!    subtasks in those slots;
//! 4. every subtask reports `TaskFinished` (with its accumulators) or
//!    `TaskFailed`; the first failure fails the job and the JobManager
//!    cancels the rest, so that a job always ends;
//! 5. when every subtask has finished, the job's result is the merge of
//!    their accumulators.

use std::sync::mpsc::Sender;
use std::time::Duration;

use strom_core::{Accumulators, JobArgs};

pub type JobId = u64;

/// What a finished job produced.
#[derive(Clone, Debug)]
pub struct JobResult {
    pub job_id: JobId,
    pub job_name: String,
    pub accumulators: Accumulators,
    /// From deployment to the last subtask finishing.
    pub duration: Duration,
    pub slots_used: u32,
}

/// Messages to the JobManager.
pub enum ToJobManager {
    SubmitJob {
        program: String,
        args: JobArgs,
        reply: Sender<Result<JobResult, String>>,
    },
    RegisterTaskManager {
        task_manager: usize,
        slot_count: u32,
        sender: Sender<ToTaskManager>,
    },
    TaskFinished {
        job: JobId,
        vertex: usize,
        subtask: u32,
        accumulators: Accumulators,
    },
    TaskFailed {
        job: JobId,
        vertex: usize,
        subtask: u32,
        error: String,
    },
    Shutdown,
}

/// Messages to a TaskManager.
pub enum ToTaskManager {
    /// Runs every subtask of the job; `slots[vertex][subtask]` is its slot.
    DeployJob {
        job: JobId,
        program: String,
        args: JobArgs,
        slots: Vec<Vec<u32>>,
    },
    CancelJob {
        job: JobId,
    },
    /// A report of one of this TaskManager's subtasks, to forward.
    Report(ToJobManager),
    Shutdown,
}
