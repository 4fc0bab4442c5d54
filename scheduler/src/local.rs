//! The local mini-cluster: a JobManager and one TaskManager in this
//! process, talking through the same messages as a standalone cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

use strom_core::{JobArgs, Program};

use crate::jobmanager::JobManager;
use crate::messages::{
    JobEvent, JobId, JobResult, JobStatus, JobSubmission, TaskManagerStatus, ToJobManager,
    ToTaskManager,
};
use crate::taskmanager::{allowed_cpus, SlotConfig, TaskManager};

/// How to size the mini-cluster.
#[derive(Clone, Debug)]
pub struct LocalClusterConfig {
    /// Slots of each TaskManager (one pinned executor each).
    pub slot_count: u32,
    /// TaskManagers in the process (1 by default). With more than one,
    /// each gets a network service on loopback and its own CPUs, and
    /// channels between them cross TCP as between machines.
    pub task_manager_count: u32,
    /// Busy-polling of idle slots (see [`SlotConfig::busy_poll`]).
    pub busy_poll: Option<std::time::Duration>,
}

impl LocalClusterConfig {
    /// One TaskManager with `slot_count` slots.
    pub fn slots(slot_count: u32) -> LocalClusterConfig {
        LocalClusterConfig {
            slot_count,
            task_manager_count: 1,
            busy_poll: None,
        }
    }
}

/// Asks the JobManager about and for running jobs, from any thread.
#[derive(Clone)]
pub struct JobManagerHandle {
    sender: Sender<ToJobManager>,
}

impl JobManagerHandle {
    /// A handle on the JobManager that reads `sender`'s messages.
    pub fn new(sender: Sender<ToJobManager>) -> JobManagerHandle {
        JobManagerHandle { sender }
    }

    fn ask<T>(&self, message: impl FnOnce(Sender<T>) -> ToJobManager) -> Result<T, String> {
        let (reply, answer) = mpsc::channel();
        self.sender
            .send(message(reply))
            .map_err(|_| "the JobManager stopped".to_string())?;
        answer
            .recv()
            .map_err(|_| "the JobManager stopped before it answered".to_string())
    }

    pub fn list_jobs(&self) -> Result<Vec<JobStatus>, String> {
        self.ask(|reply| ToJobManager::ListJobs { reply })
    }

    /// Takes a savepoint (and with `stop` ends the job after it); returns
    /// its directory.
    pub fn trigger_savepoint(
        &self,
        job: JobId,
        target: Option<PathBuf>,
        stop: bool,
    ) -> Result<PathBuf, String> {
        self.ask(|reply| ToJobManager::TriggerSavepoint {
            job,
            target,
            stop,
            reply,
        })?
    }

    pub fn cancel(&self, job: JobId) -> Result<(), String> {
        self.ask(|reply| ToJobManager::CancelJob { job, reply })?
    }

    /// Submits a job without waiting for its end; returns its id.
    pub fn submit(&self, submission: JobSubmission) -> Result<JobId, String> {
        self.ask(|reply| ToJobManager::SubmitDetached { submission, reply })?
    }

    /// The registered TaskManagers and their slots.
    pub fn task_managers(&self) -> Result<Vec<TaskManagerStatus>, String> {
        self.ask(|reply| ToJobManager::ListTaskManagers { reply })
    }
}

pub struct LocalCluster {
    job_manager: Sender<ToJobManager>,
    task_managers: Vec<Sender<ToTaskManager>>,
    threads: Vec<JoinHandle<()>>,
}

impl LocalCluster {
    /// Starts the JobManager and the TaskManagers, which register their
    /// slots.
    pub fn start(
        programs: Vec<Program>,
        config: LocalClusterConfig,
    ) -> Result<LocalCluster, String> {
        let (job_manager_sender, job_manager_inbox) = mpsc::channel();
        let job_manager = JobManager::new(programs.clone());
        let mut threads = vec![std::thread::Builder::new()
            .name("strom-jobmanager".to_string())
            .spawn(move || job_manager.run(job_manager_inbox))
            .map_err(|error| format!("cannot start the JobManager thread: {error}"))?];
        let cpus = allowed_cpus();
        let networked = config.task_manager_count > 1;
        let mut task_managers = Vec::new();
        for index in 0..config.task_manager_count.max(1) as usize {
            let (task_manager_sender, task_manager_inbox) = mpsc::channel();
            // Several TaskManagers split the CPUs, as on separate machines.
            let own_cpus: Vec<usize> = if networked {
                (0..config.slot_count as usize)
                    .map(|slot| cpus[(index * config.slot_count as usize + slot) % cpus.len()])
                    .collect()
            } else {
                cpus.clone()
            };
            let task_manager = TaskManager::start(
                index,
                programs.clone(),
                SlotConfig {
                    count: config.slot_count,
                    cpus: own_cpus,
                    busy_poll: config.busy_poll,
                },
                networked.then(|| SocketAddr::from(([127, 0, 0, 1], 0))),
                None,
                job_manager_sender.clone(),
                task_manager_sender.clone(),
            )?;
            let slot_count = task_manager.slot_count();
            let data_address = task_manager.data_address();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("strom-taskmanager-{index}"))
                    .spawn(move || task_manager.run(task_manager_inbox))
                    .map_err(|error| format!("cannot start the TaskManager thread: {error}"))?,
            );
            job_manager_sender
                .send(ToJobManager::RegisterTaskManager {
                    task_manager: index,
                    slot_count,
                    sender: task_manager_sender.clone(),
                    data_address,
                    control_address: None,
                    registered: None,
                })
                .map_err(|_| "the JobManager stopped".to_string())?;
            task_managers.push(task_manager_sender);
        }
        Ok(LocalCluster {
            job_manager: job_manager_sender,
            task_managers,
            threads,
        })
    }

    /// Submits a job and waits for its end.
    pub fn execute(&self, program: &str, args: JobArgs) -> Result<JobResult, String> {
        self.execute_with_events(program, args, None)
    }

    /// Submits a job and waits for its end; what happens meanwhile (its id,
    /// checkpoints, restarts) goes to `events`.
    pub fn execute_with_events(
        &self,
        program: &str,
        args: JobArgs,
        events: Option<Sender<JobEvent>>,
    ) -> Result<JobResult, String> {
        let (reply, result) = mpsc::channel();
        self.job_manager
            .send(ToJobManager::SubmitJob {
                program: program.to_string(),
                args,
                reply,
                events,
            })
            .map_err(|_| "the JobManager stopped".to_string())?;
        result
            .recv()
            .map_err(|_| "the JobManager stopped before the job ended".to_string())?
    }

    /// A handle to the JobManager that other threads can use.
    pub fn job_manager(&self) -> JobManagerHandle {
        JobManagerHandle {
            sender: self.job_manager.clone(),
        }
    }

    /// Stops the TaskManager (and its slots) and the JobManager.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.job_manager.send(ToJobManager::Shutdown);
        // Told directly too, so that the TaskManagers stop even if the
        // JobManager has died.
        for task_manager in &self.task_managers {
            let _ = task_manager.send(ToTaskManager::Shutdown);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.stop();
    }
}
