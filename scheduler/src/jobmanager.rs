//! The JobManager: Dispatcher, ResourceManager and JobMasters in one thread
//! that handles one message at a time (see [`crate::messages`]), and wakes
//! for the JobMasters' timers: checkpoints to trigger or expire, restarts
//! that are due.
//!
//! Protocol of a failure (the JobMaster's part of recovery):
//! 1. the first `TaskFailed` of the current attempt aborts the pending
//!    checkpoint and cancels the attempt's subtasks; the job keeps its
//!    slots;
//! 2. the restart strategy gives a delay, or none: then the job fails,
//!    keeping its checkpoints on disk;
//! 3. after the delay the next attempt is deployed, restoring the latest
//!    completed checkpoint (or, if none completed yet, what the job was
//!    submitted with), with fresh accumulators; reports of older attempts
//!    are ignored from then on.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use strom_core::snapshot::{CheckpointBarrier, Committable};
use strom_core::{Accumulators, JobArgs, JobGraph, Program};
use strom_state::{
    CheckpointMetadata, CheckpointStorage, RestoredCheckpoint, SnapshotKind, TaskStateHandle,
};

use crate::coordinator::{
    Acknowledged, CheckpointCoordinator, CheckpointKind, CompletedCheckpoint, PendingCheckpoint,
};
use crate::messages::{
    JobEvent, JobId, JobResult, JobStatus, SlotRef, ToJobManager, ToTaskManager,
};
use crate::restart::RestartBackoff;

/// What a task acknowledged: its state file, how long its stream paused,
/// how long it aligned.
type Acknowledgement = (TaskStateHandle, Duration, Duration);

/// How long the JobManager sleeps when no timer is due: it wakes for every
/// message anyway.
const IDLE_WAKE_INTERVAL: Duration = Duration::from_secs(1);

struct RegisteredTaskManager {
    /// Which job holds each slot; `None` when free.
    slot_holders: Vec<Option<JobId>>,
    sender: Sender<ToTaskManager>,
    /// Where other TaskManagers reach its network service, if it has one
    /// (a lone TaskManager needs none).
    data_address: Option<SocketAddr>,
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

enum JobState {
    Running,
    /// The attempt failed; the next one starts at `at`.
    Restarting {
        at: Instant,
    },
}

/// A savepoint someone asked for.
struct SavepointRequest {
    target: PathBuf,
    stop: bool,
    reply: Sender<Result<PathBuf, String>>,
}

/// One job and its JobMaster.
struct JobMaster {
    name: String,
    program: String,
    args: JobArgs,
    /// The TaskManagers that hold some of its slots.
    task_managers: Vec<usize>,
    /// The slot of every subtask: `slots[vertex][subtask]`.
    slots: Vec<Vec<SlotRef>>,
    slots_used: u32,
    attempt: u32,
    subtask_count: usize,
    subtasks_remaining: usize,
    accumulators: Accumulators,
    started_at: Instant,
    state: JobState,
    reply: Sender<Result<JobResult, String>>,
    events: Option<Sender<JobEvent>>,
    coordinator: CheckpointCoordinator<Acknowledgement>,
    storage: Option<CheckpointStorage>,
    /// What the next attempt restores: the latest completed checkpoint, or
    /// what the job was submitted with.
    restore_path: Option<PathBuf>,
    backoff: RestartBackoff,
    /// What the finished tasks of this attempt left to commit.
    committables: Vec<Committable>,
    savepoint_requests: Vec<SavepointRequest>,
    /// The savepoint being taken, and who waits for it.
    savepoint_in_flight: Option<(u64, SavepointRequest)>,
}

impl JobMaster {
    fn event(&self, event: JobEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

pub struct JobManager {
    programs: Vec<Program>,
    task_managers: Vec<RegisteredTaskManager>,
    jobs: HashMap<JobId, JobMaster>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as u64)
        .unwrap_or_default()
}

/// Checks that a savepoint fits the job: the same max parallelism, and
/// every operator with state still in the job (unless its state may be
/// dropped). Returns the checkpoint id it holds.
fn check_restore(
    restored: &RestoredCheckpoint,
    graph: &JobGraph,
    allow_non_restored_state: bool,
) -> Result<u64, String> {
    let path = restored.path().display();
    let operators = graph.operators();
    for operator in restored.operators() {
        let matched = operators
            .iter()
            .any(|(operator_id, _, _)| *operator_id == operator.operator_id);
        if !matched {
            if allow_non_restored_state {
                continue;
            }
            return Err(format!(
                "cannot restore '{path}': it holds state of operator '{}' ({}), which job '{}' does not have; pass --allow-non-restored-state to drop that state",
                operator.operator_name, operator.operator_id, graph.name
            ));
        }
        if operator.max_parallelism != graph.max_parallelism {
            return Err(format!(
                "cannot restore '{path}': operator '{}' was snapshotted with max parallelism {}, and job '{}' has {}; the max parallelism (the number of key groups) cannot change",
                operator.operator_name, operator.max_parallelism, graph.name, graph.max_parallelism
            ));
        }
    }
    Ok(restored.metadata().checkpoint_id)
}

impl JobManager {
    pub fn new(programs: Vec<Program>) -> Self {
        JobManager {
            programs,
            task_managers: Vec::new(),
            jobs: HashMap::new(),
        }
    }

    /// Handles messages until `Shutdown`, waking for timers in between.
    pub fn run(mut self, inbox: Receiver<ToJobManager>) {
        loop {
            let now = Instant::now();
            let wait = self
                .next_deadline()
                .map(|deadline| deadline.saturating_duration_since(now))
                .unwrap_or(IDLE_WAKE_INTERVAL)
                .min(IDLE_WAKE_INTERVAL);
            match inbox.recv_timeout(wait) {
                Ok(ToJobManager::Shutdown) | Err(RecvTimeoutError::Disconnected) => break,
                Ok(message) => self.handle(message),
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.on_timers(Instant::now());
        }
        for task_manager in &self.task_managers {
            let _ = task_manager.sender.send(ToTaskManager::Shutdown);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.jobs
            .values()
            .filter_map(|master| match master.state {
                JobState::Restarting { at } => Some(at),
                JobState::Running => {
                    let savepoint_waiting =
                        !master.savepoint_requests.is_empty() && master.coordinator.can_trigger();
                    if savepoint_waiting {
                        Some(Instant::now())
                    } else {
                        master.coordinator.next_deadline()
                    }
                }
            })
            .min()
    }

    /// Restarts that are due, checkpoints to expire or trigger.
    fn on_timers(&mut self, now: Instant) {
        let jobs: Vec<JobId> = self.jobs.keys().copied().collect();
        for job in jobs {
            let Some(master) = self.jobs.get_mut(&job) else {
                continue;
            };
            match master.state {
                JobState::Restarting { at } if now >= at => self.deploy_attempt(job),
                JobState::Restarting { .. } => {}
                JobState::Running => {
                    if let Some(expired) = master.coordinator.expire(now) {
                        let reason = format!(
                            "not complete within the checkpoint timeout of {:?}",
                            master.coordinator.options().timeout
                        );
                        self.aborted(job, expired, reason);
                    }
                    self.maybe_trigger(job, now);
                }
            }
        }
    }

    fn maybe_trigger(&mut self, job: JobId, now: Instant) {
        let Some(master) = self.jobs.get_mut(&job) else {
            return;
        };
        if !master.coordinator.can_trigger() {
            return;
        }
        if !master.savepoint_requests.is_empty() {
            let request = master.savepoint_requests.remove(0);
            let id = master.coordinator.next_id();
            let directory =
                match strom_state::create_savepoint_dir(&request.target, &master.name, id) {
                    Ok(directory) => directory,
                    Err(error) => {
                        let _ = request.reply.send(Err(error.to_string()));
                        return;
                    }
                };
            let kind = CheckpointKind::Savepoint { stop: request.stop };
            master.savepoint_in_flight = Some((id, request));
            self.trigger(job, now, kind, directory);
            return;
        }
        if !master.coordinator.periodic_due(now) {
            return;
        }
        let id = master.coordinator.next_id();
        let Some(storage) = &master.storage else {
            return;
        };
        match storage.create_checkpoint_dir(id) {
            Ok(directory) => self.trigger(job, now, CheckpointKind::Checkpoint, directory),
            Err(error) => {
                // The directory may come back (a full disk, a remount):
                // count a failed checkpoint and try at the next interval.
                master.coordinator.metadata_failed();
                master.event(JobEvent::CheckpointAborted {
                    id,
                    reason: error.to_string(),
                });
            }
        }
    }

    fn trigger(&mut self, job: JobId, now: Instant, kind: CheckpointKind, directory: PathBuf) {
        let master = self.jobs.get_mut(&job).expect("a known job");
        let is_savepoint = matches!(kind, CheckpointKind::Savepoint { .. });
        let timestamp_ms = now_ms();
        let id = master
            .coordinator
            .trigger(now, timestamp_ms, kind, directory.clone());
        let barrier = CheckpointBarrier {
            checkpoint_id: id,
            timestamp_ms,
            target: Arc::new(directory),
            is_savepoint,
        };
        let attempt = master.attempt;
        let task_managers = master.task_managers.clone();
        self.send_to(&task_managers, || ToTaskManager::TriggerCheckpoint {
            job,
            attempt,
            barrier: barrier.clone(),
        });
    }

    /// A pending checkpoint was aborted: its files go, a savepoint's
    /// requester hears why.
    fn aborted(&mut self, job: JobId, pending: PendingCheckpoint<Acknowledgement>, reason: String) {
        let Some(master) = self.jobs.get_mut(&job) else {
            return;
        };
        let _ = std::fs::remove_dir_all(&pending.directory);
        if let Some((id, request)) = master.savepoint_in_flight.take() {
            if id == pending.id {
                let _ = request
                    .reply
                    .send(Err(format!("savepoint {id} failed: {reason}")));
            } else {
                master.savepoint_in_flight = Some((id, request));
            }
        }
        master.event(JobEvent::CheckpointAborted {
            id: pending.id,
            reason,
        });
    }

    fn handle(&mut self, message: ToJobManager) {
        match message {
            ToJobManager::RegisterTaskManager {
                task_manager,
                slot_count,
                sender,
                data_address,
            } => {
                assert_eq!(
                    task_manager,
                    self.task_managers.len(),
                    "TaskManagers register in order"
                );
                self.task_managers.push(RegisteredTaskManager {
                    slot_holders: vec![None; slot_count as usize],
                    sender,
                    data_address,
                });
            }
            ToJobManager::SubmitJob {
                program,
                args,
                reply,
                events,
            } => {
                if let Err(error) = self.submit(&program, args, &reply, events) {
                    let _ = reply.send(Err(error));
                }
            }
            ToJobManager::TaskFinished {
                job,
                attempt,
                accumulators,
                committables,
                ..
            } => self.task_finished(job, attempt, &accumulators, committables),
            ToJobManager::TaskFailed {
                job,
                attempt,
                vertex: _,
                subtask: _,
                error,
            } => self.task_failed(job, attempt, error),
            ToJobManager::AcknowledgeCheckpoint {
                job,
                attempt,
                vertex,
                subtask,
                checkpoint_id,
                handle,
                pause,
                alignment,
            } => {
                let Some(master) = self
                    .jobs
                    .get_mut(&job)
                    .filter(|master| master.attempt == attempt)
                else {
                    return;
                };
                if let Acknowledged::AllAcknowledged(pending) = master.coordinator.acknowledge(
                    checkpoint_id,
                    (vertex, subtask),
                    (handle, pause, alignment),
                ) {
                    self.all_acknowledged(job, pending);
                }
            }
            ToJobManager::DeclineCheckpoint {
                job,
                attempt,
                checkpoint_id,
                reason,
            } => {
                let Some(master) = self
                    .jobs
                    .get_mut(&job)
                    .filter(|master| master.attempt == attempt)
                else {
                    return;
                };
                if let Some(pending) = master.coordinator.decline(checkpoint_id) {
                    self.aborted(job, pending, reason);
                }
            }
            ToJobManager::TriggerSavepoint {
                job,
                target,
                stop,
                reply,
            } => {
                let Some(master) = self.jobs.get_mut(&job) else {
                    let _ = reply.send(Err(format!("no running job {job}")));
                    return;
                };
                let target = target.or_else(|| {
                    master
                        .args
                        .checkpointing
                        .directory
                        .as_ref()
                        .map(|directory| directory.join("savepoints"))
                });
                let Some(target) = target else {
                    let _ = reply.send(Err(
                        "no savepoint directory: give one, or run the job with --checkpoint-dir"
                            .to_string(),
                    ));
                    return;
                };
                master.savepoint_requests.push(SavepointRequest {
                    target,
                    stop,
                    reply,
                });
            }
            ToJobManager::ListJobs { reply } => {
                let jobs = self
                    .jobs
                    .iter()
                    .map(|(job, master)| JobStatus {
                        job_id: *job,
                        job_name: master.name.clone(),
                        state: match master.state {
                            JobState::Running => "RUNNING".to_string(),
                            JobState::Restarting { .. } => "RESTARTING".to_string(),
                        },
                        attempt: master.attempt,
                        checkpoints: master.coordinator.counts.clone(),
                        latest_checkpoint: master
                            .coordinator
                            .latest()
                            .map(|latest| latest.directory.clone()),
                    })
                    .collect();
                let _ = reply.send(jobs);
            }
            ToJobManager::CancelJob { job, reply } => match self.jobs.remove(&job) {
                Some(master) => {
                    self.release(job, &master);
                    let _ = master
                        .reply
                        .send(Err(format!("job '{}' ({job}) was cancelled", master.name)));
                    let _ = reply.send(Ok(()));
                }
                None => {
                    let _ = reply.send(Err(format!("no running job {job}")));
                }
            },
            ToJobManager::Shutdown => {}
        }
    }

    /// Sends `message()` to each of `task_managers`.
    fn send_to(&self, task_managers: &[usize], message: impl Fn() -> ToTaskManager) {
        for task_manager in task_managers {
            let _ = self.task_managers[*task_manager].sender.send(message());
        }
    }

    /// Gives a job's slots back and stops what runs of it.
    fn release(&mut self, job: JobId, master: &JobMaster) {
        for task_manager in &master.task_managers {
            let task_manager = &mut self.task_managers[*task_manager];
            task_manager.release(job);
            let _ = task_manager.sender.send(ToTaskManager::CancelJob { job });
        }
    }

    /// Every task acknowledged: the metadata file completes the checkpoint.
    fn all_acknowledged(&mut self, job: JobId, pending: PendingCheckpoint<Acknowledgement>) {
        let master = self.jobs.get_mut(&job).expect("a known job");
        let is_savepoint = matches!(pending.kind, CheckpointKind::Savepoint { .. });
        let pause_max = pending
            .acknowledgements
            .iter()
            .map(|(_, (_, pause, _))| *pause)
            .max()
            .unwrap_or_default();
        let alignment_max = pending
            .acknowledgements
            .iter()
            .map(|(_, (_, _, alignment))| *alignment)
            .max()
            .unwrap_or_default();
        let mut tasks: Vec<(crate::coordinator::TaskKey, TaskStateHandle)> = pending
            .acknowledgements
            .iter()
            .map(|(task, (handle, _, _))| (*task, handle.clone()))
            .collect();
        tasks.sort_by_key(|(task, _)| *task);
        let metadata = CheckpointMetadata {
            job_name: master.name.clone(),
            checkpoint_id: pending.id,
            kind: if is_savepoint {
                SnapshotKind::Savepoint
            } else {
                SnapshotKind::Checkpoint
            },
            timestamp_ms: pending.timestamp_ms,
            tasks: tasks.into_iter().map(|(_, handle)| handle).collect(),
        };
        if let Err(error) = strom_state::write_metadata(&pending.directory, &metadata) {
            master.coordinator.metadata_failed();
            let reason = format!("cannot write its metadata: {error}");
            self.aborted(job, pending, reason);
            return;
        }
        let completed = CompletedCheckpoint {
            id: pending.id,
            kind: pending.kind.clone(),
            directory: pending.directory.clone(),
            duration: pending.triggered_at.elapsed(),
            size_bytes: metadata.state_size_bytes(),
        };
        master
            .coordinator
            .complete(completed.clone(), Instant::now());
        master.event(JobEvent::CheckpointCompleted {
            id: pending.id,
            savepoint: is_savepoint,
            path: pending.directory.clone(),
            duration: completed.duration,
            size_bytes: completed.size_bytes,
            pause_max,
            alignment_max,
        });
        let stop = matches!(pending.kind, CheckpointKind::Savepoint { stop: true });
        if !is_savepoint {
            master.restore_path = Some(pending.directory.clone());
            if let Some(storage) = master.storage.as_mut() {
                // Older checkpoints go only now that this one is complete.
                let _ = storage.complete(pending.id);
            }
        }
        // Tasks commit what a checkpoint covers; an intermediate savepoint
        // commits nothing (as in Flink), a stopping one does.
        if !is_savepoint || stop {
            let (attempt, checkpoint_id) = (master.attempt, pending.id);
            let task_managers = master.task_managers.clone();
            self.send_to(&task_managers, || ToTaskManager::CheckpointComplete {
                job,
                attempt,
                checkpoint_id,
            });
        }
        let master = self.jobs.get_mut(&job).expect("a known job");
        if let Some((id, request)) = master.savepoint_in_flight.take() {
            if id == pending.id {
                let _ = request.reply.send(Ok(pending.directory.clone()));
            } else {
                master.savepoint_in_flight = Some((id, request));
            }
        }
        if stop {
            let master = self.jobs.remove(&job).expect("a known job");
            self.release(job, &master);
            let result = JobResult {
                job_id: job,
                job_name: master.name.clone(),
                accumulators: Accumulators::default(),
                duration: master.started_at.elapsed(),
                slots_used: master.slots_used,
                restarts: master.backoff.restarts(),
                checkpoints: master.coordinator.counts.clone(),
                stopped_with_savepoint: Some(pending.directory),
            };
            let _ = master.reply.send(Ok(result));
        }
    }

    fn task_finished(
        &mut self,
        job: JobId,
        attempt: u32,
        accumulators: &Accumulators,
        committables: Vec<Committable>,
    ) {
        let Some(master) = self.jobs.get_mut(&job).filter(|master| {
            master.attempt == attempt && matches!(master.state, JobState::Running)
        }) else {
            return;
        };
        master.accumulators.merge(accumulators);
        master.committables.extend(committables);
        master.subtasks_remaining -= 1;
        if let Some(pending) = master.coordinator.task_finished() {
            self.aborted(
                job,
                pending,
                "a task finished before acknowledging".to_string(),
            );
        }
        let master = self.jobs.get_mut(&job).expect("a known job");
        if master.subtasks_remaining > 0 {
            return;
        }
        let master = self.jobs.remove(&job).expect("the job is known");
        self.release(job, &master);
        if let Some((_, request)) = master.savepoint_in_flight {
            let _ = request
                .reply
                .send(Err("the job finished first".to_string()));
        }
        for request in master.savepoint_requests {
            let _ = request
                .reply
                .send(Err("the job finished first".to_string()));
        }
        // Every task has finished: what the sinks staged since the last
        // checkpoint is the job's, exactly once, and becomes visible now.
        if let Err(error) = commit_all(&master.committables) {
            let _ = master.reply.send(Err(format!(
                "job '{}' failed to commit its output: {error}",
                master.name
            )));
            return;
        }
        // A finished job needs no checkpoint to resume from (as in Flink).
        if let Some(storage) = &master.storage {
            let _ = std::fs::remove_dir_all(storage.root());
        }
        let result = JobResult {
            job_id: job,
            job_name: master.name,
            accumulators: master.accumulators,
            duration: master.started_at.elapsed(),
            slots_used: master.slots_used,
            restarts: master.backoff.restarts(),
            checkpoints: master.coordinator.counts.clone(),
            stopped_with_savepoint: None,
        };
        let _ = master.reply.send(Ok(result));
    }

    fn task_failed(&mut self, job: JobId, attempt: u32, error: String) {
        // Later reports of the failed attempt's cancelled subtasks find an
        // older attempt and are dropped.
        let Some(master) = self.jobs.get_mut(&job).filter(|master| {
            master.attempt == attempt && matches!(master.state, JobState::Running)
        }) else {
            return;
        };
        let now = Instant::now();
        let aborted = master.coordinator.restart(now);
        let task_managers = master.task_managers.clone();
        self.send_to(&task_managers, || ToTaskManager::CancelJob { job });
        if let Some(pending) = aborted {
            self.aborted(job, pending, "a task failed".to_string());
        }
        let master = self.jobs.get_mut(&job).expect("a known job");
        match master.backoff.on_failure(now) {
            Some(delay) => {
                master.state = JobState::Restarting { at: now + delay };
                master.event(JobEvent::Restarting {
                    restart: master.backoff.restarts(),
                    delay,
                    cause: error,
                    from_checkpoint: master.restore_path.clone(),
                });
            }
            None => {
                let master = self.jobs.remove(&job).expect("a known job");
                self.release(job, &master);
                let kept = master
                    .coordinator
                    .latest()
                    .map(|latest| {
                        format!(
                            "; its latest checkpoint is kept in '{}'",
                            latest.directory.display()
                        )
                    })
                    .unwrap_or_default();
                let gave_up = master
                    .backoff
                    .describe()
                    .map(|why| format!(" (no more restarts: {why})"))
                    .unwrap_or_default();
                let _ = master.reply.send(Err(format!(
                    "job '{}' failed: {error}{gave_up}{kept}",
                    master.name,
                )));
            }
        }
    }

    /// Deploys the next attempt of a job.
    fn deploy_attempt(&mut self, job: JobId) {
        let master = self.jobs.get_mut(&job).expect("a known job");
        master.attempt += 1;
        master.state = JobState::Running;
        master.subtasks_remaining = master.subtask_count;
        master.accumulators = Accumulators::default();
        // A failed attempt's staged files stay uncommitted (and hidden).
        master.committables.clear();
        master.coordinator.restart(Instant::now());
        let data_addresses: Vec<Option<SocketAddr>> = self
            .task_managers
            .iter()
            .map(|task_manager| task_manager.data_address)
            .collect();
        let master = self.jobs.get(&job).expect("a known job");
        let mut deployed = Ok(());
        for task_manager in &master.task_managers {
            let sent = self.task_managers[*task_manager]
                .sender
                .send(ToTaskManager::DeployJob {
                    job,
                    attempt: master.attempt,
                    program: master.program.clone(),
                    args: master.args.clone(),
                    slots: master.slots.clone(),
                    data_addresses: data_addresses.clone(),
                    restore: master.restore_path.clone(),
                });
            if sent.is_err() {
                deployed = Err(());
            }
        }
        if deployed.is_err() {
            let master = self.jobs.remove(&job).expect("a known job");
            self.release(job, &master);
            let _ = master
                .reply
                .send(Err("the TaskManager is gone".to_string()));
        }
    }

    fn submit(
        &mut self,
        program_name: &str,
        args: JobArgs,
        reply: &Sender<Result<JobResult, String>>,
        events: Option<Sender<JobEvent>>,
    ) -> Result<(), String> {
        let program = self
            .programs
            .iter()
            .find(|program| program.name == program_name)
            .ok_or_else(|| format!("unknown program '{program_name}'"))?;
        let job_graph = program.job_graph(&args)?;
        let options = &args.checkpointing;
        if options.interval.is_some() && options.directory.is_none() {
            return Err(
                "--checkpoint-interval needs --checkpoint-dir: where should checkpoints go?"
                    .to_string(),
            );
        }
        // The savepoint is read whole, every checksum checked, before any
        // slot is taken: a damaged one fails here, naming the file.
        let mut first_checkpoint_id = 1;
        if let Some(restore) = &args.restore {
            let restored =
                strom_state::read_checkpoint(&restore.path).map_err(|error| error.to_string())?;
            let restored_id =
                check_restore(&restored, &job_graph, restore.allow_non_restored_state)?;
            first_checkpoint_id = restored_id + 1;
        }
        let slots_required = job_graph.slots_required();
        let slots_free: u32 = self
            .task_managers
            .iter()
            .map(RegisteredTaskManager::slots_free)
            .sum();
        if slots_free < slots_required {
            let slot_count: usize = self
                .task_managers
                .iter()
                .map(|task_manager| task_manager.slot_holders.len())
                .sum();
            return Err(format!(
                "not enough slots: job '{}' needs {slots_required}, the cluster has {slots_free} free of {slot_count}",
                job_graph.name
            ));
        }
        let job = JobId::random();
        let storage = match &options.directory {
            Some(directory) => Some(
                CheckpointStorage::new(directory, &job.to_string(), options.retained)
                    .map_err(|error| error.to_string())?,
            ),
            None => None,
        };
        // The job's slots are numbered from 0 (`slot_of`); take that many
        // free slots, TaskManager by TaskManager, so that jobs running at
        // once never share a core.
        let mut free_slots: Vec<SlotRef> = Vec::new();
        for (index, task_manager) in self.task_managers.iter_mut().enumerate() {
            for slot in 0..task_manager.slot_holders.len() {
                if free_slots.len() == slots_required as usize {
                    break;
                }
                if task_manager.slot_holders[slot].is_none() {
                    task_manager.slot_holders[slot] = Some(job);
                    free_slots.push(SlotRef {
                        task_manager: index,
                        slot: slot as u32,
                    });
                }
            }
        }
        let mut task_managers: Vec<usize> =
            free_slots.iter().map(|slot| slot.task_manager).collect();
        task_managers.dedup();
        let slots: Vec<Vec<SlotRef>> = job_graph
            .vertices
            .iter()
            .map(|vertex| {
                (0..vertex.parallelism)
                    .map(|subtask| free_slots[job_graph.slot_of(vertex.id, subtask) as usize])
                    .collect()
            })
            .collect();
        let tasks: Vec<(usize, u32)> = job_graph
            .vertices
            .iter()
            .flat_map(|vertex| (0..vertex.parallelism).map(move |subtask| (vertex.id, subtask)))
            .collect();
        let master = JobMaster {
            name: job_graph.name.clone(),
            program: program_name.to_string(),
            task_managers,
            slots,
            slots_used: slots_required,
            attempt: 0,
            subtask_count: tasks.len(),
            subtasks_remaining: tasks.len(),
            accumulators: Accumulators::default(),
            started_at: Instant::now(),
            state: JobState::Restarting { at: Instant::now() },
            reply: reply.clone(),
            events,
            coordinator: CheckpointCoordinator::new(
                options.clone(),
                tasks,
                first_checkpoint_id,
                Instant::now(),
            ),
            storage,
            restore_path: args.restore.as_ref().map(|restore| restore.path.clone()),
            backoff: RestartBackoff::new(args.restart.clone()),
            committables: Vec::new(),
            savepoint_requests: Vec::new(),
            savepoint_in_flight: None,
            args,
        };
        master.event(JobEvent::Submitted {
            job_id: job,
            job_name: master.name.clone(),
            restored_from: master.restore_path.clone(),
        });
        self.jobs.insert(job, master);
        self.deploy_attempt(job);
        Ok(())
    }
}

/// Renames every staged file to its final name, durably. A file already
/// renamed (its final name exists, its staged name does not) counts as
/// committed, so that committing twice does no harm.
pub fn commit_all(committables: &[Committable]) -> Result<(), String> {
    let mut directories = std::collections::BTreeSet::new();
    for committable in committables {
        if !committable.from.exists() && committable.to.exists() {
            continue;
        }
        std::fs::rename(&committable.from, &committable.to).map_err(|error| {
            format!(
                "cannot commit '{}' as '{}': {error}",
                committable.from.display(),
                committable.to.display()
            )
        })?;
        if let Some(parent) = committable.to.parent() {
            directories.insert(parent.to_path_buf());
        }
    }
    for directory in directories {
        std::fs::File::open(&directory)
            .and_then(|handle| handle.sync_all())
            .map_err(|error| format!("cannot sync directory '{}': {error}", directory.display()))?;
    }
    Ok(())
}

/// The path of a checkpoint's directory as a person gives it: the
/// directory itself or its metadata file.
pub fn checkpoint_directory(path: &Path) -> &Path {
    if path
        .file_name()
        .is_some_and(|name| name == strom_state::METADATA_FILE_NAME)
    {
        path.parent().unwrap_or(path)
    } else {
        path
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
            Ok(ToTaskManager::DeployJob { job, slots, .. }) => (
                job,
                slots
                    .iter()
                    .map(|vertex| vertex.iter().map(|slot| slot.slot).collect())
                    .collect(),
            ),
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
            data_address: None,
        });
        let args = JobArgs::new(Vec::new(), 2);
        let (reply, results) = mpsc::channel();
        for _ in 0..2 {
            let submit = ToJobManager::SubmitJob {
                program: "numbers".into(),
                args: args.clone(),
                reply: reply.clone(),
                events: None,
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
            events: None,
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
                attempt: 1,
                vertex,
                subtask,
                accumulators: Accumulators::default(),
                committables: Vec::new(),
            };
            job_manager.handle(finished);
        }
        assert!(results.try_recv().expect("the first job's result").is_ok());
        assert!(matches!(inbox.try_recv(), Ok(ToTaskManager::CancelJob { job }) if job == first));
        job_manager.handle(ToJobManager::SubmitJob {
            program: "numbers".into(),
            args,
            reply,
            events: None,
        });
        let (_, reused_slots) = deployed_slots(&inbox);
        assert_eq!(
            reused_slots,
            vec![vec![0, 1], vec![0, 1]],
            "the first job's slots are free again"
        );
    }
}
