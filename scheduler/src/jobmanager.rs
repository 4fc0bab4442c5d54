//! The JobManager: Dispatcher, ResourceManager and JobMasters in one thread
//! that handles one message at a time (see [`crate::messages`]).

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use strom_core::{Accumulators, Program};

use crate::messages::{JobId, JobResult, ToJobManager, ToTaskManager};

struct RegisteredTaskManager {
    slot_count: u32,
    slots_free: u32,
    sender: Sender<ToTaskManager>,
}

/// One running job.
struct JobMaster {
    name: String,
    task_manager: usize,
    subtasks_remaining: usize,
    slots_used: u32,
    accumulators: Accumulators,
    started_at: Instant,
    reply: Sender<Result<JobResult, String>>,
}

pub struct JobManager {
    programs: Vec<Program>,
    task_managers: Vec<RegisteredTaskManager>,
    jobs: HashMap<JobId, JobMaster>,
    next_job_id: JobId,
}

impl JobManager {
    pub fn new(programs: Vec<Program>) -> Self {
        JobManager {
            programs,
            task_managers: Vec::new(),
            jobs: HashMap::new(),
            next_job_id: 1,
        }
    }

    /// Handles messages until `Shutdown`.
    pub fn run(mut self, inbox: Receiver<ToJobManager>) {
        while let Ok(message) = inbox.recv() {
            if let ToJobManager::Shutdown = message {
                for task_manager in &self.task_managers {
                    let _ = task_manager.sender.send(ToTaskManager::Shutdown);
                }
                return;
            }
            self.handle(message);
        }
    }

    fn handle(&mut self, message: ToJobManager) {
        match message {
            ToJobManager::RegisterTaskManager {
                task_manager,
                slot_count,
                sender,
            } => {
                assert_eq!(
                    task_manager,
                    self.task_managers.len(),
                    "TaskManagers register in order"
                );
                self.task_managers.push(RegisteredTaskManager {
                    slot_count,
                    slots_free: slot_count,
                    sender,
                });
            }
            ToJobManager::SubmitJob {
                program,
                args,
                reply,
            } => {
                if let Err(error) = self.submit(&program, args, &reply) {
                    let _ = reply.send(Err(error));
                }
            }
            ToJobManager::TaskFinished {
                job, accumulators, ..
            } => {
                let Some(master) = self.jobs.get_mut(&job) else {
                    return;
                };
                master.accumulators.merge(&accumulators);
                master.subtasks_remaining -= 1;
                if master.subtasks_remaining == 0 {
                    let master = self.jobs.remove(&job).expect("the job is known");
                    let task_manager = &mut self.task_managers[master.task_manager];
                    task_manager.slots_free += master.slots_used;
                    let _ = task_manager.sender.send(ToTaskManager::CancelJob { job });
                    let result = JobResult {
                        job_id: job,
                        job_name: master.name,
                        accumulators: master.accumulators,
                        duration: master.started_at.elapsed(),
                        slots_used: master.slots_used,
                    };
                    let _ = master.reply.send(Ok(result));
                }
            }
            ToJobManager::TaskFailed {
                job,
                vertex: _,
                subtask: _,
                error,
            } => {
                // The first failure fails the job; later reports of its
                // cancelled subtasks find no job and are dropped.
                let Some(master) = self.jobs.remove(&job) else {
                    return;
                };
                let task_manager = &mut self.task_managers[master.task_manager];
                task_manager.slots_free += master.slots_used;
                let _ = task_manager.sender.send(ToTaskManager::CancelJob { job });
                let _ = master
                    .reply
                    .send(Err(format!("job '{}' failed: {error}", master.name)));
            }
            ToJobManager::Shutdown => {}
        }
    }

    fn submit(
        &mut self,
        program_name: &str,
        args: strom_core::JobArgs,
        reply: &Sender<Result<JobResult, String>>,
    ) -> Result<(), String> {
        let program = self
            .programs
            .iter()
            .find(|program| program.name == program_name)
            .ok_or_else(|| format!("unknown program '{program_name}'"))?;
        let job_graph = program.job_graph(&args)?;
        let slots_required = job_graph.slots_required();
        let (task_manager, _) = self
            .task_managers
            .iter()
            .enumerate()
            .find(|(_, task_manager)| task_manager.slots_free >= slots_required)
            .ok_or_else(|| {
                let slots_free: u32 = self.task_managers.iter().map(|task_manager| task_manager.slots_free).sum();
                let slot_count: u32 = self.task_managers.iter().map(|task_manager| task_manager.slot_count).sum();
                format!(
                    "not enough slots: job '{}' needs {slots_required}, the cluster has {slots_free} free of {slot_count}",
                    job_graph.name
                )
            })?;
        let job = self.next_job_id;
        self.next_job_id += 1;
        let slots: Vec<Vec<u32>> = job_graph
            .vertices
            .iter()
            .map(|vertex| {
                (0..vertex.parallelism)
                    .map(|subtask| job_graph.slot_of(vertex.id, subtask))
                    .collect()
            })
            .collect();
        let subtask_count = job_graph
            .vertices
            .iter()
            .map(|vertex| vertex.parallelism as usize)
            .sum();
        self.task_managers[task_manager].slots_free -= slots_required;
        self.jobs.insert(
            job,
            JobMaster {
                name: job_graph.name.clone(),
                task_manager,
                subtasks_remaining: subtask_count,
                slots_used: slots_required,
                accumulators: Accumulators::default(),
                started_at: Instant::now(),
                reply: reply.clone(),
            },
        );
        self.task_managers[task_manager]
            .sender
            .send(ToTaskManager::DeployJob {
                job,
                program: program_name.to_string(),
                args,
                slots,
            })
            .map_err(|_| "the TaskManager is gone".to_string())
    }
}
