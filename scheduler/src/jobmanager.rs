//! The JobManager: Dispatcher, ResourceManager and JobMasters in one thread
//! that handles one message at a time (see [`crate::messages`]).

use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender};
use std::time::Instant;

use strom_core::{Accumulators, Program};

use crate::messages::{JobId, JobResult, ToJobManager, ToTaskManager};

struct RegisteredTaskManager {
    /// Which job holds each slot; `None` when free.
    slot_holders: Vec<Option<JobId>>,
    sender: Sender<ToTaskManager>,
}

impl RegisteredTaskManager {
    fn slots_free(&self) -> u32 {
        self.slot_holders
            .iter()
            .filter(|holder| holder.is_none())
            .count() as u32
    }

    /// Frees every slot `job` holds.
    fn release(&mut self, job: JobId) {
        for holder in &mut self.slot_holders {
            if *holder == Some(job) {
                *holder = None;
            }
        }
    }
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
                    slot_holders: vec![None; slot_count as usize],
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
                    task_manager.release(job);
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
                task_manager.release(job);
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
            .find(|(_, task_manager)| task_manager.slots_free() >= slots_required)
            .ok_or_else(|| {
                let slots_free: u32 = self.task_managers.iter().map(RegisteredTaskManager::slots_free).sum();
                let slot_count: usize =
                    self.task_managers.iter().map(|task_manager| task_manager.slot_holders.len()).sum();
                format!(
                    "not enough slots: job '{}' needs {slots_required}, the cluster has {slots_free} free of {slot_count}",
                    job_graph.name
                )
            })?;
        let job = self.next_job_id;
        self.next_job_id += 1;
        // The job's slots are numbered from 0 (`slot_of`); take that many
        // free slots of the TaskManager, so that jobs running at once never
        // share a core.
        let holders = &mut self.task_managers[task_manager].slot_holders;
        let free_slots: Vec<u32> = (0..holders.len() as u32)
            .filter(|slot| holders[*slot as usize].is_none())
            .take(slots_required as usize)
            .collect();
        for slot in &free_slots {
            holders[*slot as usize] = Some(job);
        }
        let slots: Vec<Vec<u32>> = job_graph
            .vertices
            .iter()
            .map(|vertex| {
                (0..vertex.parallelism)
                    .map(|subtask| free_slots[job_graph.slot_of(vertex.id, subtask) as usize])
                    .collect()
            })
            .collect();
        let subtask_count = job_graph
            .vertices
            .iter()
            .map(|vertex| vertex.parallelism as usize)
            .sum();
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
        let deployed = self.task_managers[task_manager]
            .sender
            .send(ToTaskManager::DeployJob {
                job,
                program: program_name.to_string(),
                args,
                slots,
            });
        if deployed.is_err() {
            self.jobs.remove(&job);
            self.task_managers[task_manager].release(job);
            return Err("the TaskManager is gone".to_string());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use strom_core::program::report_accumulators;
    use strom_core::source::GeneratorSource;
    use strom_core::{JobArgs, StreamExecutionEnvironment, WatermarkStrategy};

    use super::*;

    fn build_numbers(env: &StreamExecutionEnvironment, _: &clap::ArgMatches) -> Result<(), String> {
        env.from_source(
            GeneratorSource::bounded(10, |index| index),
            WatermarkStrategy::no_watermarks(),
            "numbers",
        )
        .rebalance()
        .map(|value| value + 1)
        .name("increment");
        Ok(())
    }

    const NUMBERS: Program = Program {
        name: "numbers",
        about: "ten numbers",
        command: || clap::Command::new("numbers"),
        build: build_numbers,
        report: report_accumulators,
    };

    fn deployed_slots(inbox: &mpsc::Receiver<ToTaskManager>) -> (JobId, Vec<Vec<u32>>) {
        match inbox.try_recv() {
            Ok(ToTaskManager::DeployJob { job, slots, .. }) => (job, slots),
            _ => panic!("expected a deployment"),
        }
    }

    #[test]
    fn jobs_running_at_once_get_different_slots_and_give_them_back() {
        let mut job_manager = JobManager::new(vec![NUMBERS]);
        let (sender, inbox) = mpsc::channel();
        job_manager.handle(ToJobManager::RegisterTaskManager {
            task_manager: 0,
            slot_count: 4,
            sender,
        });
        let args = JobArgs {
            arguments: Vec::new(),
            parallelism: 2,
            max_parallelism: 128,
        };
        let (reply, results) = mpsc::channel();
        for _ in 0..2 {
            let submit = ToJobManager::SubmitJob {
                program: "numbers".into(),
                args: args.clone(),
                reply: reply.clone(),
            };
            job_manager.handle(submit);
        }
        let (first, first_slots) = deployed_slots(&inbox);
        let (_, second_slots) = deployed_slots(&inbox);
        assert_eq!(first_slots, vec![vec![0, 1], vec![0, 1]]);
        assert_eq!(second_slots, vec![vec![2, 3], vec![2, 3]]);
        let third = ToJobManager::SubmitJob {
            program: "numbers".into(),
            args: args.clone(),
            reply: reply.clone(),
        };
        job_manager.handle(third);
        let refused = results
            .try_recv()
            .expect("a reply")
            .expect_err("no slots are free");
        assert!(refused.starts_with("not enough slots"), "{refused}");
        for (vertex, subtask) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let finished = ToJobManager::TaskFinished {
                job: first,
                vertex,
                subtask,
                accumulators: Accumulators::default(),
            };
            job_manager.handle(finished);
        }
        assert!(results.try_recv().expect("the first job's result").is_ok());
        assert!(matches!(inbox.try_recv(), Ok(ToTaskManager::CancelJob { job }) if job == first));
        job_manager.handle(ToJobManager::SubmitJob {
            program: "numbers".into(),
            args,
            reply,
        });
        let (_, reused_slots) = deployed_slots(&inbox);
        assert_eq!(
            reused_slots,
            vec![vec![0, 1], vec![0, 1]],
            "the first job's slots are free again"
        );
    }
}
