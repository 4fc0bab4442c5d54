//! The checkpoint coordinator of a JobMaster: when to trigger, which tasks
//! must acknowledge, when a checkpoint is complete.
//!
//! Protocol of one checkpoint (at most one is pending at a time, Flink's
//! default of one concurrent checkpoint):
//! 1. trigger: once the interval has passed since the last trigger and the
//!    minimum pause since the last completion (or when a person asks for a
//!    savepoint), the coordinator allocates the next id and waits for every
//!    task of the job; the JobMaster creates the checkpoint's directory and
//!    has the TaskManagers inject barrier `id` at every source;
//! 2. every task aligns the barrier, snapshots, writes its state file
//!    durably and acknowledges with the file's handle;
//! 3. when the last task has acknowledged, the JobMaster writes the
//!    metadata file; only once that is durable is the checkpoint complete
//!    ([`CheckpointCoordinator::complete`]), and only then are older
//!    checkpoints deleted and tasks told to commit;
//! 4. a checkpoint not complete within the timeout, declined by a task, or
//!    overtaken by a failure or a finished task is aborted: its files are
//!    never referenced by a metadata file.
//!
//! Invariants: ids only grow, also across restarts of the job, so that no
//! two attempts ever write the same file; `latest` only ever names a
//! checkpoint whose metadata is durable. No checkpoint is triggered once a
//! task has finished: a finished task can no longer take a barrier, and
//! the job's last completed checkpoint stays the one it restarts from.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use strom_core::config::CheckpointingOptions;

/// A task of the job: vertex and subtask.
pub type TaskKey = (usize, u32);

/// Why a checkpoint is taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckpointKind {
    Checkpoint,
    /// Triggered by a person; `stop`: the job ends once it is complete.
    Savepoint {
        stop: bool,
    },
}

/// A checkpoint waiting for acknowledgements.
#[derive(Debug)]
pub struct PendingCheckpoint<H> {
    pub id: u64,
    pub kind: CheckpointKind,
    pub directory: PathBuf,
    pub triggered_at: Instant,
    pub timestamp_ms: u64,
    awaiting: HashSet<TaskKey>,
    pub acknowledgements: Vec<(TaskKey, H)>,
}

/// A checkpoint whose metadata is durable.
#[derive(Clone, Debug)]
pub struct CompletedCheckpoint {
    pub id: u64,
    pub kind: CheckpointKind,
    pub directory: PathBuf,
    pub duration: Duration,
    pub size_bytes: u64,
}

/// What an acknowledgement led to.
#[derive(Debug)]
pub enum Acknowledged<H> {
    /// Not the pending checkpoint, or a task that already acknowledged.
    Ignored,
    Waiting,
    /// Every task has acknowledged: write the metadata.
    AllAcknowledged(PendingCheckpoint<H>),
}

/// Counts for `/jobs/:id/checkpoints` and progress lines.
#[derive(Clone, Debug, Default)]
pub struct CheckpointCounts {
    pub triggered: u64,
    pub completed: u64,
    pub failed: u64,
}

pub struct CheckpointCoordinator<H> {
    options: CheckpointingOptions,
    tasks: Vec<TaskKey>,
    next_id: u64,
    pending: Option<PendingCheckpoint<H>>,
    last_trigger: Instant,
    last_completion: Option<Instant>,
    latest: Option<CompletedCheckpoint>,
    /// A task has finished: no more periodic checkpoints.
    finishing: bool,
    pub counts: CheckpointCounts,
    pub history: Vec<CompletedCheckpoint>,
}

/// How many completed checkpoints the coordinator remembers for reports.
const HISTORY_LENGTH_MAX: usize = 32;

impl<H> CheckpointCoordinator<H> {
    pub fn new(
        options: CheckpointingOptions,
        tasks: Vec<TaskKey>,
        first_id: u64,
        now: Instant,
    ) -> Self {
        CheckpointCoordinator {
            options,
            tasks,
            next_id: first_id,
            pending: None,
            last_trigger: now,
            last_completion: None,
            latest: None,
            finishing: false,
            counts: CheckpointCounts::default(),
            history: Vec::new(),
        }
    }

    pub fn options(&self) -> &CheckpointingOptions {
        &self.options
    }

    /// A new attempt of the job starts: whatever was pending is aborted
    /// (returned), and the interval counts from now.
    pub fn restart(&mut self, now: Instant) -> Option<PendingCheckpoint<H>> {
        self.last_trigger = now;
        self.finishing = false;
        self.abort_pending()
    }

    /// Whether a periodic checkpoint is due at `now`.
    pub fn periodic_due(&self, now: Instant) -> bool {
        self.next_periodic_trigger()
            .is_some_and(|deadline| now >= deadline)
    }

    fn next_periodic_trigger(&self) -> Option<Instant> {
        let interval = self.options.interval?;
        if self.pending.is_some() || self.finishing || self.options.directory.is_none() {
            return None;
        }
        let after_interval = self.last_trigger + interval;
        let after_pause = self
            .last_completion
            .map(|completion| completion + self.options.min_pause)
            .unwrap_or(after_interval);
        Some(after_interval.max(after_pause))
    }

    /// When the JobMaster must look again: the next periodic trigger or
    /// the pending checkpoint's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        let timeout = self
            .pending
            .as_ref()
            .map(|pending| pending.triggered_at + self.options.timeout);
        match (self.next_periodic_trigger(), timeout) {
            (Some(first), Some(second)) => Some(first.min(second)),
            (first, second) => first.or(second),
        }
    }

    /// Whether a checkpoint is pending now (a savepoint must wait for it).
    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    /// Whether a checkpoint can be triggered at all now.
    pub fn can_trigger(&self) -> bool {
        self.pending.is_none() && !self.finishing
    }

    /// Starts checkpoint `id` (the returned one) in `directory`.
    pub fn trigger(
        &mut self,
        now: Instant,
        timestamp_ms: u64,
        kind: CheckpointKind,
        directory: PathBuf,
    ) -> u64 {
        assert!(self.can_trigger(), "one checkpoint at a time");
        let id = self.next_id;
        self.next_id += 1;
        self.last_trigger = now;
        self.counts.triggered += 1;
        self.pending = Some(PendingCheckpoint {
            id,
            kind,
            directory,
            triggered_at: now,
            timestamp_ms,
            awaiting: self.tasks.iter().copied().collect(),
            acknowledgements: Vec::new(),
        });
        id
    }

    /// The id the next checkpoint will get.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    pub fn acknowledge(&mut self, id: u64, task: TaskKey, handle: H) -> Acknowledged<H> {
        let Some(pending) = self.pending.as_mut().filter(|pending| pending.id == id) else {
            return Acknowledged::Ignored;
        };
        if !pending.awaiting.remove(&task) {
            return Acknowledged::Ignored;
        }
        pending.acknowledgements.push((task, handle));
        if pending.awaiting.is_empty() {
            Acknowledged::AllAcknowledged(self.pending.take().expect("pending"))
        } else {
            Acknowledged::Waiting
        }
    }

    /// A task could not take part: the checkpoint is aborted.
    pub fn decline(&mut self, id: u64) -> Option<PendingCheckpoint<H>> {
        if self
            .pending
            .as_ref()
            .is_some_and(|pending| pending.id == id)
        {
            self.abort_pending()
        } else {
            None
        }
    }

    /// The pending checkpoint, if it has run out of time.
    pub fn expire(&mut self, now: Instant) -> Option<PendingCheckpoint<H>> {
        let expired = self
            .pending
            .as_ref()
            .is_some_and(|pending| now >= pending.triggered_at + self.options.timeout);
        if expired {
            self.abort_pending()
        } else {
            None
        }
    }

    /// A task finished: the pending checkpoint can no longer complete, and
    /// none is triggered from now on.
    pub fn task_finished(&mut self) -> Option<PendingCheckpoint<H>> {
        self.finishing = true;
        self.abort_pending()
    }

    fn abort_pending(&mut self) -> Option<PendingCheckpoint<H>> {
        let aborted = self.pending.take();
        if aborted.is_some() {
            self.counts.failed += 1;
        }
        aborted
    }

    /// The metadata of a checkpoint whose every task acknowledged is
    /// durable: it is complete and becomes the one to restore from.
    pub fn complete(&mut self, completed: CompletedCheckpoint, now: Instant) {
        assert!(
            self.latest
                .as_ref()
                .is_none_or(|latest| latest.id < completed.id),
            "checkpoints complete in id order"
        );
        self.last_completion = Some(now);
        self.counts.completed += 1;
        self.history.push(completed.clone());
        if self.history.len() > HISTORY_LENGTH_MAX {
            self.history.remove(0);
        }
        self.latest = Some(completed);
    }

    /// The checkpoint whose metadata write failed counts as failed.
    pub fn metadata_failed(&mut self) {
        self.counts.failed += 1;
    }

    pub fn latest(&self) -> Option<&CompletedCheckpoint> {
        self.latest.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(interval_ms: u64) -> CheckpointingOptions {
        CheckpointingOptions {
            interval: Some(Duration::from_millis(interval_ms)),
            directory: Some(PathBuf::from("/checkpoints")),
            timeout: Duration::from_millis(1000),
            min_pause: Duration::from_millis(50),
            retained: 1,
        }
    }

    fn completed(id: u64) -> CompletedCheckpoint {
        CompletedCheckpoint {
            id,
            kind: CheckpointKind::Checkpoint,
            directory: PathBuf::from(format!("/checkpoints/chk-{id}")),
            duration: Duration::ZERO,
            size_bytes: 0,
        }
    }

    #[test]
    fn a_checkpoint_completes_once_every_task_has_acknowledged() {
        let start = Instant::now();
        let mut coordinator =
            CheckpointCoordinator::<&str>::new(options(100), vec![(0, 0), (1, 0)], 1, start);
        assert!(!coordinator.periodic_due(start));
        let later = start + Duration::from_millis(100);
        assert!(coordinator.periodic_due(later));
        let id = coordinator.trigger(later, 0, CheckpointKind::Checkpoint, "/c/chk-1".into());
        assert_eq!(id, 1);
        assert!(!coordinator.periodic_due(later + Duration::from_secs(1)));
        assert!(matches!(
            coordinator.acknowledge(1, (0, 0), "a"),
            Acknowledged::Waiting
        ));
        assert!(matches!(
            coordinator.acknowledge(1, (0, 0), "a"),
            Acknowledged::Ignored
        ));
        assert!(matches!(
            coordinator.acknowledge(7, (1, 0), "b"),
            Acknowledged::Ignored
        ));
        let Acknowledged::AllAcknowledged(pending) = coordinator.acknowledge(1, (1, 0), "b") else {
            panic!("both tasks acknowledged");
        };
        assert_eq!(pending.acknowledgements.len(), 2);
        assert!(
            coordinator.latest().is_none(),
            "complete only once the metadata is durable"
        );
        coordinator.complete(completed(1), later);
        assert_eq!(coordinator.latest().map(|latest| latest.id), Some(1));
        // The minimum pause counts from the completion.
        assert!(!coordinator.periodic_due(later + Duration::from_millis(40)));
        assert!(coordinator.periodic_due(later + Duration::from_millis(100)));
    }

    #[test]
    fn timeouts_declines_restarts_and_finished_tasks_abort_and_ids_keep_growing() {
        let start = Instant::now();
        let mut coordinator = CheckpointCoordinator::<()>::new(options(10), vec![(0, 0)], 5, start);
        let at = start + Duration::from_millis(10);
        let first = coordinator.trigger(at, 0, CheckpointKind::Checkpoint, "/a".into());
        assert!(coordinator
            .expire(at + Duration::from_millis(999))
            .is_none());
        assert_eq!(
            coordinator
                .expire(at + Duration::from_millis(1000))
                .map(|p| p.id),
            Some(first)
        );
        let second = coordinator.trigger(at, 0, CheckpointKind::Checkpoint, "/b".into());
        assert!(
            coordinator.decline(first).is_none(),
            "a stale decline changes nothing"
        );
        assert_eq!(coordinator.decline(second).map(|p| p.id), Some(second));
        let third = coordinator.trigger(at, 0, CheckpointKind::Checkpoint, "/c".into());
        assert_eq!(coordinator.restart(at).map(|p| p.id), Some(third));
        assert_eq!(coordinator.next_id(), 8);
        assert_eq!(coordinator.counts.failed, 3);
        coordinator.task_finished();
        assert!(!coordinator.can_trigger());
        assert!(!coordinator.periodic_due(at + Duration::from_secs(10)));
    }
}
