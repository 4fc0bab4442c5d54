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

//!
//! Protocol of a lost TaskManager (its connection closed, or it stopped
//! heartbeating): its slots are forgotten; every job with a subtask there
//! fails its attempt as above and gives back all its slots; its next
//! attempt takes free slots wherever they are. A job that cannot get
//! enough slots waits (`WAITING_FOR_SLOTS`, with the reason in its status)
//! until TaskManagers register, and fails after the slot wait timeout.

use std::collections::{BTreeMap, HashMap, VecDeque};
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
    JobEvent, JobId, JobResult, JobStatus, JobSubmission, NetworkCounts, SlotRef, SubtaskMetrics,
    SubtaskStatus, TaskManagerStatus, ToJobManager, ToTaskManager, VertexStatus,
};
use crate::restart::RestartBackoff;

/// What a task acknowledged: its state file, how long its stream paused,
/// how long it aligned.
type Acknowledgement = (TaskStateHandle, Duration, Duration);

/// How long the JobManager sleeps when no timer is due: it wakes for every
/// message anyway.
const IDLE_WAKE_INTERVAL: Duration = Duration::from_secs(1);

/// How many ended jobs the JobManager keeps for `GET /jobs` and `strom
/// list` (Flink's `jobstore.max-capacity`, smaller); older ones are
/// forgotten.
pub const JOB_ARCHIVE_SIZE: usize = 256;

/// How the JobManager behaves beyond its jobs' own options.
#[derive(Clone, Debug, Default)]
pub struct JobManagerConfig {
    /// How long a job waits for enough free slots (at submission or after
    /// losing a TaskManager) before it fails; `None`: a job that does not
    /// find its slots at once is refused (a local cluster, where no
    /// TaskManager will come).
    pub slot_wait_timeout: Option<Duration>,
    /// Writes what happens (jobs, checkpoints, restarts, TaskManagers) to
    /// standard error, one line each: the log of a `strom jobmanager`.
    pub log: bool,
}

struct RegisteredTaskManager {
    /// Which job holds each slot; `None` when free.
    slot_holders: Vec<Option<JobId>>,
    sender: Sender<ToTaskManager>,
    /// Where other TaskManagers reach its network service, if it has one
    /// (a lone TaskManager needs none).
    data_address: Option<SocketAddr>,
    control_address: Option<SocketAddr>,
    last_heard: Instant,
    network: NetworkCounts,
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
    /// The next attempt needs more free slots than the cluster has; it
    /// fails at `deadline`.
    WaitingForSlots {
        deadline: Option<Instant>,
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
    /// Each vertex's name and parallelism.
    vertices: Vec<(String, u32)>,
    /// The job's slot of every subtask (`JobGraph::slot_of`):
    /// `slot_index[vertex][subtask]`.
    slot_index: Vec<Vec<u32>>,
    /// The TaskManagers that hold some of its slots.
    task_managers: Vec<usize>,
    /// The slot of every subtask: `slots[vertex][subtask]`; empty while the
    /// job holds no slots.
    slots: Vec<Vec<SlotRef>>,
    slots_used: u32,
    attempt: u32,
    subtask_count: usize,
    subtasks_remaining: usize,
    accumulators: Accumulators,
    started_at: Instant,
    started_at_ms: u64,
    state: JobState,
    /// The cause of the last restart, for the job's status.
    last_failure: Option<String>,
    reply: Sender<Result<JobResult, String>>,
    events: Option<Sender<JobEvent>>,
    log: bool,
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
    /// What the current attempt's tasks last reported, by (vertex, subtask).
    metrics: HashMap<(usize, u32), SubtaskMetrics>,
}

impl JobMaster {
    fn event(&self, job: JobId, event: JobEvent) {
        if self.log {
            log_event(job, &event);
        }
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }
}

/// One line on standard error for a job's event (a `strom jobmanager`'s
/// log).
fn log_event(job: JobId, event: &JobEvent) {
    match event {
        JobEvent::Submitted { .. } => eprintln!("{event}"),
        _ => eprintln!("job {job}: {event}"),
    }
}

pub struct JobManager {
    programs: Vec<Program>,
    config: JobManagerConfig,
    task_managers: BTreeMap<usize, RegisteredTaskManager>,
    jobs: HashMap<JobId, JobMaster>,
    /// Ended jobs, newest last.
    archive: VecDeque<JobStatus>,
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

/// Checks a path that arrived over the network: the JobManager and the
/// TaskManagers resolve it, in their own working directories, so it must
/// be absolute, and it must not climb out of where it points with `..`.
fn check_remote_path(what: &str, path: &Path) -> Result<(), String> {
    if !path.is_absolute() {
        return Err(format!(
            "the {what} '{}' is not an absolute path",
            path.display()
        ));
    }
    if path
        .components()
        .any(|component| matches!(component, std::path::Component::ParentDir))
    {
        return Err(format!(
            "the {what} '{}' contains '..' (path traversal is refused)",
            path.display()
        ));
    }
    Ok(())
}

/// A job's final state and what its client hears.
enum Ending {
    Finished(JobResult),
    Failed(String),
    Cancelled(String),
}

impl JobManager {
    pub fn new(programs: Vec<Program>) -> Self {
        JobManager::with_config(programs, JobManagerConfig::default())
    }

    pub fn with_config(programs: Vec<Program>, config: JobManagerConfig) -> Self {
        JobManager {
            programs,
            config,
            task_managers: BTreeMap::new(),
            jobs: HashMap::new(),
            archive: VecDeque::new(),
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
        for task_manager in self.task_managers.values() {
            let _ = task_manager.sender.send(ToTaskManager::Shutdown);
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.jobs
            .values()
            .filter_map(|master| match master.state {
                JobState::Restarting { at } => Some(at),
                JobState::WaitingForSlots { deadline } => deadline,
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

    /// Restarts that are due, jobs that may have their slots now,
    /// checkpoints to expire or trigger.
    fn on_timers(&mut self, now: Instant) {
        let jobs: Vec<JobId> = self.jobs.keys().copied().collect();
        for job in jobs {
            let Some(master) = self.jobs.get_mut(&job) else {
                continue;
            };
            match master.state {
                JobState::Restarting { at } if now >= at => self.deploy_attempt(job),
                JobState::Restarting { .. } => {}
                JobState::WaitingForSlots { deadline } => {
                    if self.allocate(job) {
                        self.deploy_attempt(job);
                    } else if deadline.is_some_and(|deadline| now >= deadline) {
                        let master = self.jobs.remove(&job).expect("a known job");
                        let message = format!(
                            "job '{}' failed: {} within the slot wait timeout of {:?}",
                            master.name,
                            self.slot_shortage(master.slots_used),
                            self.config.slot_wait_timeout.unwrap_or_default(),
                        );
                        self.finish(job, master, Ending::Failed(message));
                    }
                }
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
                master.event(
                    job,
                    JobEvent::CheckpointAborted {
                        id,
                        reason: error.to_string(),
                    },
                );
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
        master.event(
            job,
            JobEvent::CheckpointAborted {
                id: pending.id,
                reason,
            },
        );
    }

    fn handle(&mut self, message: ToJobManager) {
        match message {
            ToJobManager::RegisterTaskManager {
                task_manager,
                slot_count,
                sender,
                data_address,
                control_address,
                registered,
            } => {
                let answer = self.register(
                    task_manager,
                    slot_count,
                    sender,
                    data_address,
                    control_address,
                );
                if let Some(registered) = registered {
                    let _ = registered.send(answer);
                }
            }
            ToJobManager::TaskManagerHeartbeat {
                task_manager,
                network,
            } => {
                if let Some(registered) = self.task_managers.get_mut(&task_manager) {
                    registered.last_heard = Instant::now();
                    registered.network = network;
                }
            }
            ToJobManager::TaskManagerLost {
                task_manager,
                reason,
            } => self.task_manager_lost(task_manager, &reason),
            ToJobManager::ListTaskManagers { reply } => {
                let now = Instant::now();
                let statuses = self
                    .task_managers
                    .iter()
                    .map(|(id, registered)| TaskManagerStatus {
                        id: format!("{id:016x}"),
                        control_address: registered
                            .control_address
                            .map(|address| address.to_string()),
                        data_address: registered.data_address.map(|address| address.to_string()),
                        slots_total: registered.slot_holders.len() as u32,
                        slots_free: registered.slots_free(),
                        last_heartbeat_ms_ago: now
                            .saturating_duration_since(registered.last_heard)
                            .as_millis() as u64,
                        network: registered.network,
                    })
                    .collect();
                let _ = reply.send(statuses);
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
            ToJobManager::SubmitDetached { submission, reply } => {
                let _ = reply.send(self.submit_detached(submission));
            }
            ToJobManager::TaskMetrics {
                job,
                attempt,
                tasks,
            } => {
                if let Some(master) = self
                    .jobs
                    .get_mut(&job)
                    .filter(|master| master.attempt == attempt)
                {
                    for task in tasks {
                        master.metrics.insert((task.vertex, task.subtask), task);
                    }
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
                let mut jobs: Vec<JobStatus> = self
                    .jobs
                    .iter()
                    .map(|(job, master)| self.status(*job, master))
                    .collect();
                jobs.sort_by_key(|status| std::cmp::Reverse(status.start_time_ms));
                jobs.extend(self.archive.iter().rev().cloned());
                let _ = reply.send(jobs);
            }
            ToJobManager::CancelJob { job, reply } => match self.jobs.remove(&job) {
                Some(master) => {
                    let message = format!("job '{}' ({job}) was cancelled", master.name);
                    self.finish(job, master, Ending::Cancelled(message));
                    let _ = reply.send(Ok(()));
                }
                None => {
                    let _ = reply.send(Err(format!("no running job {job}")));
                }
            },
            ToJobManager::Shutdown => {}
        }
    }

    fn register(
        &mut self,
        task_manager: usize,
        slot_count: u32,
        sender: Sender<ToTaskManager>,
        data_address: Option<SocketAddr>,
        control_address: Option<SocketAddr>,
    ) -> Result<(), String> {
        if self.task_managers.contains_key(&task_manager) {
            return Err(format!(
                "a TaskManager with id {task_manager:016x} is registered already"
            ));
        }
        if slot_count == 0 {
            return Err("a TaskManager must offer at least one slot".to_string());
        }
        if self.config.log {
            eprintln!(
                "TaskManager {task_manager:016x} registered with {slot_count} slots{}{}",
                control_address
                    .map(|address| format!(" from {address}"))
                    .unwrap_or_default(),
                data_address
                    .map(|address| format!(", data port {address}"))
                    .unwrap_or_default(),
            );
        }
        self.task_managers.insert(
            task_manager,
            RegisteredTaskManager {
                slot_holders: vec![None; slot_count as usize],
                sender,
                data_address,
                control_address,
                last_heard: Instant::now(),
                network: NetworkCounts::default(),
            },
        );
        Ok(())
    }

    /// A TaskManager is gone: its slots with it; the jobs that ran there
    /// restart (or fail, by their restart strategy) on the slots left.
    fn task_manager_lost(&mut self, task_manager: usize, reason: &str) {
        let Some(lost) = self.task_managers.remove(&task_manager) else {
            return;
        };
        let who = format!(
            "TaskManager {task_manager:016x}{}",
            lost.control_address
                .map(|address| format!(" ({address})"))
                .unwrap_or_default()
        );
        if self.config.log {
            eprintln!("{who} lost: {reason}");
        }
        let affected: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, master)| master.task_managers.contains(&task_manager))
            .map(|(job, _)| *job)
            .collect();
        for job in affected {
            let master = self.jobs.get_mut(&job).expect("a known job");
            master.task_managers.retain(|id| *id != task_manager);
            if matches!(master.state, JobState::Running) {
                let attempt = master.attempt;
                self.task_failed(job, attempt, format!("{who} was lost: {reason}"));
            }
            if self.jobs.contains_key(&job) {
                self.release_slots(job);
            }
        }
    }

    /// Sends `message()` to each of `task_managers`.
    fn send_to(&self, task_managers: &[usize], message: impl Fn() -> ToTaskManager) {
        for task_manager in task_managers {
            if let Some(registered) = self.task_managers.get(task_manager) {
                let _ = registered.sender.send(message());
            }
        }
    }

    /// Gives a job's slots back and stops what runs of it there.
    fn release_slots(&mut self, job: JobId) {
        let Some(master) = self.jobs.get_mut(&job) else {
            return;
        };
        let task_managers = std::mem::take(&mut master.task_managers);
        master.slots.clear();
        self.free_slots(job, &task_managers);
    }

    /// Frees the slots `job` holds on `task_managers` and cancels what runs
    /// of it there.
    fn free_slots(&mut self, job: JobId, task_managers: &[usize]) {
        for task_manager in task_managers {
            if let Some(registered) = self.task_managers.get_mut(task_manager) {
                registered.release(job);
                let _ = registered.sender.send(ToTaskManager::CancelJob { job });
            }
        }
    }

    /// Free slots over all TaskManagers.
    fn slots_free(&self) -> u32 {
        self.task_managers
            .values()
            .map(RegisteredTaskManager::slots_free)
            .sum()
    }

    /// Why a job of `slots_required` slots cannot start now.
    fn slot_shortage(&self, slots_required: u32) -> String {
        let slots_free = self.slots_free();
        let slot_count: usize = self
            .task_managers
            .values()
            .map(|task_manager| task_manager.slot_holders.len())
            .sum();
        format!(
            "not enough slots: it needs {slots_required}, the cluster has {slots_free} free of {slot_count} on {} TaskManager{}",
            self.task_managers.len(),
            if self.task_managers.len() == 1 { "" } else { "s" }
        )
    }

    /// Takes free slots for a job that holds none; whether it got them.
    /// Slots are taken TaskManager by TaskManager, so that jobs running at
    /// once never share a core.
    fn allocate(&mut self, job: JobId) -> bool {
        let master = self.jobs.get(&job).expect("a known job");
        if !master.slots.is_empty() {
            return true;
        }
        let slots_required = master.slots_used as usize;
        if (self.slots_free() as usize) < slots_required {
            return false;
        }
        let mut free_slots: Vec<SlotRef> = Vec::new();
        for (id, task_manager) in &mut self.task_managers {
            for slot in 0..task_manager.slot_holders.len() {
                if free_slots.len() == slots_required {
                    break;
                }
                if task_manager.slot_holders[slot].is_none() {
                    task_manager.slot_holders[slot] = Some(job);
                    free_slots.push(SlotRef {
                        task_manager: *id,
                        slot: slot as u32,
                    });
                }
            }
        }
        let master = self.jobs.get_mut(&job).expect("a known job");
        let mut task_managers: Vec<usize> =
            free_slots.iter().map(|slot| slot.task_manager).collect();
        task_managers.dedup();
        master.task_managers = task_managers;
        master.slots = master
            .slot_index
            .iter()
            .map(|vertex| {
                vertex
                    .iter()
                    .map(|slot| free_slots[*slot as usize])
                    .collect()
            })
            .collect();
        true
    }

    /// A job has ended: its slots go back, its client hears how, and the
    /// archive keeps its status.
    fn finish(&mut self, job: JobId, master: JobMaster, ending: Ending) {
        self.free_slots(job, &master.task_managers);
        let mut status = self.status(job, &master);
        status.end_time_ms = Some(now_ms());
        let (state, outcome) = match ending {
            Ending::Finished(result) => {
                status.accumulators = Some(result.accumulators.clone());
                status.stopped_with_savepoint = result.stopped_with_savepoint.clone();
                status.reason = None;
                ("FINISHED", Ok(result))
            }
            Ending::Failed(message) => {
                status.reason = Some(message.clone());
                ("FAILED", Err(message))
            }
            Ending::Cancelled(message) => {
                status.reason = Some(message.clone());
                ("CANCELED", Err(message))
            }
        };
        status.state = state.to_string();
        if self.config.log {
            match &outcome {
                Ok(result) => eprintln!(
                    "job {job} ({}) FINISHED in {} ms{}",
                    master.name,
                    result.duration.as_millis(),
                    result
                        .stopped_with_savepoint
                        .as_ref()
                        .map(|path| format!(", stopped with savepoint {}", path.display()))
                        .unwrap_or_default()
                ),
                Err(message) => eprintln!("job {job} ({}) {state}: {message}", master.name),
            }
        }
        let _ = master.reply.send(outcome);
        self.archive.push_back(status);
        while self.archive.len() > JOB_ARCHIVE_SIZE {
            self.archive.pop_front();
        }
    }

    /// A job's status as the REST API shows it.
    fn status(&self, job: JobId, master: &JobMaster) -> JobStatus {
        let (state, reason) = match master.state {
            JobState::Running => ("RUNNING", None),
            JobState::Restarting { .. } => ("RESTARTING", master.last_failure.clone()),
            JobState::WaitingForSlots { .. } => (
                "WAITING_FOR_SLOTS",
                Some(self.slot_shortage(master.slots_used)),
            ),
        };
        let vertices = master
            .vertices
            .iter()
            .enumerate()
            .map(|(vertex, (name, parallelism))| VertexStatus {
                id: vertex,
                name: name.clone(),
                parallelism: *parallelism,
                subtasks: (0..*parallelism)
                    .map(|subtask| {
                        let metrics = master.metrics.get(&(vertex, subtask));
                        SubtaskStatus {
                            subtask,
                            task_manager: master
                                .slots
                                .get(vertex)
                                .and_then(|slots| slots.get(subtask as usize))
                                .map(|slot| format!("{:016x}", slot.task_manager)),
                            records_in: metrics.map_or(0, |metrics| metrics.records_in),
                            records_out: metrics.map_or(0, |metrics| metrics.records_out),
                            watermark: metrics
                                .map(|metrics| metrics.watermark)
                                .filter(|watermark| *watermark != i64::MIN),
                        }
                    })
                    .collect(),
            })
            .collect();
        JobStatus {
            job_id: job,
            job_name: master.name.clone(),
            program: master.program.clone(),
            state: state.to_string(),
            reason,
            attempt: master.attempt,
            restarts: master.backoff.restarts(),
            parallelism: master.args.parallelism,
            start_time_ms: master.started_at_ms,
            end_time_ms: None,
            duration: master.started_at.elapsed(),
            checkpoints: master.coordinator.counts.clone(),
            latest_checkpoint: master
                .coordinator
                .latest()
                .map(|latest| latest.directory.clone()),
            vertices,
            accumulators: None,
            stopped_with_savepoint: None,
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
        master.event(
            job,
            JobEvent::CheckpointCompleted {
                id: pending.id,
                savepoint: is_savepoint,
                path: pending.directory.clone(),
                duration: completed.duration,
                size_bytes: completed.size_bytes,
                pause_max,
                alignment_max,
            },
        );
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
            self.finish(job, master, Ending::Finished(result));
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
        let mut master = self.jobs.remove(&job).expect("the job is known");
        if let Some((_, request)) = master.savepoint_in_flight.take() {
            let _ = request
                .reply
                .send(Err("the job finished first".to_string()));
        }
        for request in master.savepoint_requests.drain(..) {
            let _ = request
                .reply
                .send(Err("the job finished first".to_string()));
        }
        // Every task has finished: what the sinks staged since the last
        // checkpoint is the job's, exactly once, and becomes visible now.
        if let Err(error) = commit_all(&master.committables) {
            let message = format!("job '{}' failed to commit its output: {error}", master.name);
            self.finish(job, master, Ending::Failed(message));
            return;
        }
        // A finished job needs no checkpoint to resume from (as in Flink).
        if let Some(storage) = &master.storage {
            let _ = std::fs::remove_dir_all(storage.root());
        }
        let result = JobResult {
            job_id: job,
            job_name: master.name.clone(),
            accumulators: std::mem::take(&mut master.accumulators),
            duration: master.started_at.elapsed(),
            slots_used: master.slots_used,
            restarts: master.backoff.restarts(),
            checkpoints: master.coordinator.counts.clone(),
            stopped_with_savepoint: None,
        };
        self.finish(job, master, Ending::Finished(result));
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
                master.last_failure = Some(error.clone());
                master.event(
                    job,
                    JobEvent::Restarting {
                        restart: master.backoff.restarts(),
                        delay,
                        cause: error,
                        from_checkpoint: master.restore_path.clone(),
                    },
                );
            }
            None => {
                let master = self.jobs.remove(&job).expect("a known job");
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
                let message = format!("job '{}' failed: {error}{gave_up}{kept}", master.name);
                self.finish(job, master, Ending::Failed(message));
            }
        }
    }

    /// Deploys the next attempt of a job, once it has its slots; until then
    /// it waits for them (or, without a slot wait timeout, fails).
    fn deploy_attempt(&mut self, job: JobId) {
        if !self.allocate(job) {
            let shortage = self.slot_shortage(self.jobs[&job].slots_used);
            let master = self.jobs.get_mut(&job).expect("a known job");
            match self.config.slot_wait_timeout {
                Some(timeout) => {
                    if !matches!(master.state, JobState::WaitingForSlots { .. }) {
                        master.state = JobState::WaitingForSlots {
                            deadline: Some(Instant::now() + timeout),
                        };
                        if self.config.log {
                            eprintln!("job {job} ({}) waits for slots: {shortage}", master.name);
                        }
                    }
                }
                None => {
                    let master = self.jobs.remove(&job).expect("a known job");
                    let message = format!(
                        "job '{}' failed: {}",
                        master.name,
                        self.slot_shortage(master.slots_used)
                    );
                    self.finish(job, master, Ending::Failed(message));
                }
            }
            return;
        }
        let master = self.jobs.get_mut(&job).expect("a known job");
        master.attempt += 1;
        master.state = JobState::Running;
        master.subtasks_remaining = master.subtask_count;
        master.accumulators = Accumulators::default();
        master.metrics.clear();
        // A failed attempt's staged files stay uncommitted (and hidden).
        master.committables.clear();
        master.coordinator.restart(Instant::now());
        let data_addresses: BTreeMap<usize, SocketAddr> = self
            .task_managers
            .iter()
            .filter_map(|(id, task_manager)| {
                task_manager.data_address.map(|address| (*id, address))
            })
            .collect();
        let master = self.jobs.get(&job).expect("a known job");
        // A TaskManager that is gone is found by its connection, which
        // reports it lost; its jobs then restart.
        self.send_to(&master.task_managers, || ToTaskManager::DeployJob {
            job,
            attempt: master.attempt,
            program: master.program.clone(),
            args: master.args.clone(),
            slots: master.slots.clone(),
            data_addresses: data_addresses.clone(),
            restore: master.restore_path.clone(),
        });
    }

    /// A job submitted over the REST API: its arguments are parsed here, as
    /// every TaskManager will parse them, and the paths among its options
    /// must be absolute.
    fn submit_detached(&mut self, submission: JobSubmission) -> Result<JobId, String> {
        let program = self
            .programs
            .iter()
            .find(|program| program.name == submission.program)
            .ok_or_else(|| self.unknown_program(&submission.program))?;
        let mut arguments = submission.arguments;
        let given = |arguments: &[String], long: &str, short: Option<&str>| {
            arguments.iter().any(|argument| {
                argument == long
                    || argument.starts_with(&format!("{long}="))
                    || short.is_some_and(|short| argument.starts_with(short))
            })
        };
        if let Some(parallelism) = submission.parallelism {
            if given(&arguments, "--parallelism", Some("-p")) {
                return Err(
                    "the parallelism is given twice: in the request and as --parallelism among the program arguments"
                        .to_string(),
                );
            }
            arguments.extend(["--parallelism".to_string(), parallelism.to_string()]);
        }
        if let Some(path) = submission.savepoint_path {
            if given(&arguments, "--from-savepoint", Some("-s")) {
                return Err(
                    "the savepoint is given twice: in the request and as --from-savepoint among the program arguments"
                        .to_string(),
                );
            }
            arguments.extend(["--from-savepoint".to_string(), path.display().to_string()]);
        }
        if submission.allow_non_restored_state
            && !given(&arguments, "--allow-non-restored-state", None)
        {
            arguments.push("--allow-non-restored-state".to_string());
        }
        let matches = program.parse(&arguments).map_err(|error| {
            format!("invalid arguments for program '{}': {error}", program.name)
        })?;
        let args = JobArgs::from_matches(arguments, &matches);
        if let Some(directory) = &args.checkpointing.directory {
            check_remote_path("checkpoint directory", directory)?;
        }
        if let Some(restore) = &args.restore {
            check_remote_path("savepoint path", &restore.path)?;
        }
        let program_name = program.name;
        let (reply, _) = std::sync::mpsc::channel();
        self.submit(program_name, args, &reply, None)
    }

    fn unknown_program(&self, name: &str) -> String {
        let known: Vec<&str> = self.programs.iter().map(|program| program.name).collect();
        format!(
            "unknown program '{name}'; this JobManager knows: {}",
            known.join(", ")
        )
    }

    fn submit(
        &mut self,
        program_name: &str,
        args: JobArgs,
        reply: &Sender<Result<JobResult, String>>,
        events: Option<Sender<JobEvent>>,
    ) -> Result<JobId, String> {
        let program = self
            .programs
            .iter()
            .find(|program| program.name == program_name)
            .ok_or_else(|| self.unknown_program(program_name))?;
        if args.parallelism > args.max_parallelism {
            return Err(format!(
                "--parallelism {} is above the max parallelism {} (set --max-parallelism)",
                args.parallelism, args.max_parallelism
            ));
        }
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
        if self.slots_free() < slots_required && self.config.slot_wait_timeout.is_none() {
            return Err(format!(
                "job '{}': {}",
                job_graph.name,
                self.slot_shortage(slots_required)
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
        let slot_index: Vec<Vec<u32>> = job_graph
            .vertices
            .iter()
            .map(|vertex| {
                (0..vertex.parallelism)
                    .map(|subtask| job_graph.slot_of(vertex.id, subtask))
                    .collect()
            })
            .collect();
        let vertices: Vec<(String, u32)> = job_graph
            .vertices
            .iter()
            .map(|vertex| {
                let names: Vec<&str> = vertex
                    .operators
                    .iter()
                    .map(|node| job_graph.operator_name(*node))
                    .collect();
                (names.join(" -> "), vertex.parallelism)
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
            vertices,
            slot_index,
            task_managers: Vec::new(),
            slots: Vec::new(),
            slots_used: slots_required,
            attempt: 0,
            subtask_count: tasks.len(),
            subtasks_remaining: tasks.len(),
            accumulators: Accumulators::default(),
            started_at: Instant::now(),
            started_at_ms: now_ms(),
            state: JobState::Restarting { at: Instant::now() },
            last_failure: None,
            reply: reply.clone(),
            events,
            log: self.config.log,
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
            metrics: HashMap::new(),
            args,
        };
        master.event(
            job,
            JobEvent::Submitted {
                job_id: job,
                job_name: master.name.clone(),
                restored_from: master.restore_path.clone(),
            },
        );
        self.jobs.insert(job, master);
        self.deploy_attempt(job);
        Ok(job)
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

    use strom_core::JobArgs;

    use super::*;
    use crate::test_programs::NUMBERS;

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
            control_address: None,
            registered: None,
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
        assert!(refused.contains("not enough slots"), "{refused}");
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

    fn register(
        job_manager: &mut JobManager,
        task_manager: usize,
        slot_count: u32,
    ) -> mpsc::Receiver<ToTaskManager> {
        let (sender, inbox) = mpsc::channel();
        let (registered, answer) = mpsc::channel();
        job_manager.handle(ToJobManager::RegisterTaskManager {
            task_manager,
            slot_count,
            sender,
            data_address: Some(SocketAddr::from((
                [127, 0, 0, 1],
                1000 + task_manager as u16,
            ))),
            control_address: None,
            registered: Some(registered),
        });
        answer.recv().expect("an answer").expect("registered");
        inbox
    }

    fn job_state(job_manager: &mut JobManager, job: JobId) -> JobStatus {
        let (reply, answer) = mpsc::channel();
        job_manager.handle(ToJobManager::ListJobs { reply });
        answer
            .recv()
            .expect("a listing")
            .into_iter()
            .find(|status| status.job_id == job)
            .expect("the job is listed")
    }

    fn cluster_config() -> JobManagerConfig {
        JobManagerConfig {
            slot_wait_timeout: Some(Duration::from_secs(60)),
            log: false,
        }
    }

    #[test]
    fn a_lost_task_manager_restarts_its_jobs_on_the_slots_of_one_that_registers_later() {
        let mut job_manager = JobManager::with_config(vec![NUMBERS], cluster_config());
        let first = register(&mut job_manager, 1, 1);
        let second = register(&mut job_manager, 2, 1);
        let mut args = JobArgs::new(Vec::new(), 2);
        args.restart = strom_core::config::RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        };
        let (reply, results) = mpsc::channel();
        job_manager.handle(ToJobManager::SubmitJob {
            program: "numbers".into(),
            args,
            reply,
            events: None,
        });
        let (job, _) = deployed_slots(&first);
        let _ = deployed_slots(&second);
        job_manager.handle(ToJobManager::TaskManagerLost {
            task_manager: 2,
            reason: "killed".into(),
        });
        // The attempt is cancelled on the TaskManager that is left.
        assert!(matches!(
            first.try_recv(),
            Ok(ToTaskManager::CancelJob { .. })
        ));
        job_manager.on_timers(Instant::now());
        let waiting = job_state(&mut job_manager, job);
        assert_eq!(waiting.state, "WAITING_FOR_SLOTS");
        let reason = waiting.reason.expect("a reason");
        assert!(
            reason.contains("needs 2, the cluster has 1 free of 1"),
            "{reason}"
        );
        let third = register(&mut job_manager, 3, 1);
        job_manager.on_timers(Instant::now());
        let (deployed_job, _) = deployed_slots(&third);
        assert_eq!(deployed_job, job);
        let status = job_state(&mut job_manager, job);
        assert_eq!(
            (status.state.as_str(), status.attempt, status.restarts),
            ("RUNNING", 2, 1)
        );
        let task_managers: Vec<Option<String>> = status.vertices[0]
            .subtasks
            .iter()
            .map(|subtask| subtask.task_manager.clone())
            .collect();
        assert_eq!(
            task_managers,
            vec![Some(format!("{:016x}", 1)), Some(format!("{:016x}", 3))]
        );
        assert!(results.try_recv().is_err(), "the job has not ended");
    }

    #[test]
    fn a_job_without_enough_slots_fails_after_the_slot_wait_timeout() {
        let mut job_manager = JobManager::with_config(
            vec![NUMBERS],
            JobManagerConfig {
                slot_wait_timeout: Some(Duration::from_millis(10)),
                log: false,
            },
        );
        let _inbox = register(&mut job_manager, 7, 1);
        let (reply, _) = mpsc::channel();
        job_manager.handle(ToJobManager::SubmitDetached {
            submission: JobSubmission {
                program: "numbers".into(),
                parallelism: Some(2),
                ..JobSubmission::default()
            },
            reply,
        });
        let (reply, answer) = mpsc::channel();
        job_manager.handle(ToJobManager::ListJobs { reply });
        let job = answer.recv().expect("a listing")[0].job_id;
        assert_eq!(job_state(&mut job_manager, job).state, "WAITING_FOR_SLOTS");
        job_manager.on_timers(Instant::now() + Duration::from_secs(1));
        let failed = job_state(&mut job_manager, job);
        assert_eq!(failed.state, "FAILED");
        let reason = failed.reason.expect("a reason");
        assert!(
            reason.contains("not enough slots") && reason.contains("slot wait timeout"),
            "{reason}"
        );
    }

    #[test]
    fn detached_submissions_are_checked_before_anything_runs() {
        let mut job_manager = JobManager::with_config(vec![NUMBERS], cluster_config());
        let inbox = register(&mut job_manager, 1, 4);
        let submit = |job_manager: &mut JobManager, submission: JobSubmission| {
            let (reply, answer) = mpsc::channel();
            job_manager.handle(ToJobManager::SubmitDetached { submission, reply });
            answer.recv().expect("an answer")
        };
        let refusals = [
            (
                JobSubmission {
                    program: "nope".into(),
                    ..JobSubmission::default()
                },
                "unknown program 'nope'; this JobManager knows: numbers",
            ),
            (
                JobSubmission {
                    program: "numbers".into(),
                    arguments: vec!["--bogus".into()],
                    ..JobSubmission::default()
                },
                "invalid arguments for program 'numbers'",
            ),
            (
                JobSubmission {
                    program: "numbers".into(),
                    arguments: vec!["-p".into(), "2".into()],
                    parallelism: Some(2),
                    ..JobSubmission::default()
                },
                "the parallelism is given twice",
            ),
            (
                JobSubmission {
                    program: "numbers".into(),
                    arguments: vec![
                        "--checkpoint-dir".into(),
                        "/tmp/../etc".into(),
                        "--checkpoint-interval".into(),
                        "1s".into(),
                    ],
                    ..JobSubmission::default()
                },
                "contains '..'",
            ),
            (
                JobSubmission {
                    program: "numbers".into(),
                    arguments: vec!["--checkpoint-dir".into(), "relative".into()],
                    ..JobSubmission::default()
                },
                "is not an absolute path",
            ),
            (
                JobSubmission {
                    program: "numbers".into(),
                    savepoint_path: Some(PathBuf::from("/no/such/savepoint")),
                    ..JobSubmission::default()
                },
                "/no/such/savepoint",
            ),
            (
                JobSubmission {
                    program: "numbers".into(),
                    arguments: vec!["--max-parallelism".into(), "2".into()],
                    parallelism: Some(3),
                    ..JobSubmission::default()
                },
                "above the max parallelism",
            ),
        ];
        for (submission, expected) in refusals {
            let refused = submit(&mut job_manager, submission.clone())
                .expect_err(&format!("{submission:?} is refused"));
            assert!(
                refused.contains(expected),
                "{refused} (expected: {expected})"
            );
        }
        assert!(inbox.try_recv().is_err(), "nothing was deployed");
        let job = submit(
            &mut job_manager,
            JobSubmission {
                program: "numbers".into(),
                parallelism: Some(2),
                ..JobSubmission::default()
            },
        )
        .expect("accepted");
        let (deployed, slots) = deployed_slots(&inbox);
        assert_eq!((deployed, slots), (job, vec![vec![0, 1], vec![0, 1]]));
    }
}
