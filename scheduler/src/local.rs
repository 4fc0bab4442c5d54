//! The local mini-cluster: a JobManager and one TaskManager in this
//! process, talking through the same messages as a standalone cluster.

use std::path::PathBuf;
use std::sync::mpsc::{self, Sender};
use std::thread::JoinHandle;

use strom_core::{JobArgs, Program};

use crate::jobmanager::JobManager;
use crate::messages::{JobEvent, JobId, JobResult, JobStatus, ToJobManager, ToTaskManager};
use crate::taskmanager::TaskManager;

/// How to size the mini-cluster.
#[derive(Clone, Debug)]
pub struct LocalClusterConfig {
    /// Slots of the one TaskManager (one pinned executor each).
    pub slot_count: u32,
}

/// Asks the JobManager about and for running jobs, from any thread.
#[derive(Clone)]
pub struct JobManagerHandle {
    sender: Sender<ToJobManager>,
}

impl JobManagerHandle {
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
}

pub struct LocalCluster {
    job_manager: Sender<ToJobManager>,
    task_manager: Sender<ToTaskManager>,
    threads: Vec<JoinHandle<()>>,
}

impl LocalCluster {
    /// Starts the JobManager and the TaskManager, which registers its slots.
    pub fn start(
        programs: Vec<Program>,
        config: LocalClusterConfig,
    ) -> Result<LocalCluster, String> {
        let (job_manager_sender, job_manager_inbox) = mpsc::channel();
        let (task_manager_sender, task_manager_inbox) = mpsc::channel();
        let task_manager = TaskManager::start(
            0,
            programs.clone(),
            config.slot_count,
            job_manager_sender.clone(),
            task_manager_sender.clone(),
        )?;
        let slot_count = task_manager.slot_count();
        let job_manager = JobManager::new(programs);
        let threads = vec![
            std::thread::Builder::new()
                .name("strom-jobmanager".to_string())
                .spawn(move || job_manager.run(job_manager_inbox))
                .map_err(|error| format!("cannot start the JobManager thread: {error}"))?,
            std::thread::Builder::new()
                .name("strom-taskmanager".to_string())
                .spawn(move || task_manager.run(task_manager_inbox))
                .map_err(|error| format!("cannot start the TaskManager thread: {error}"))?,
        ];
        job_manager_sender
            .send(ToJobManager::RegisterTaskManager {
                task_manager: 0,
                slot_count,
                sender: task_manager_sender.clone(),
            })
            .map_err(|_| "the JobManager stopped".to_string())?;
        Ok(LocalCluster {
            job_manager: job_manager_sender,
            task_manager: task_manager_sender,
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
        // Told directly too, so that the TaskManager stops even if the
        // JobManager has died.
        let _ = self.task_manager.send(ToTaskManager::Shutdown);
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
