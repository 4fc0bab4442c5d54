//! The user function traits of the DataStream API, and the contexts they see.

use crate::key::Key;
use crate::operator::Output;
use crate::state::{KeyedStateStore, TimerService};
use crate::time::Timestamp;

/// Where a function emits its results.
pub trait Collector<T> {
    /// Emits a record with the timestamp of the record (or timer) that is
    /// being processed.
    fn collect(&mut self, record: T);
    /// Emits a record with an explicit event timestamp.
    fn collect_with_timestamp(&mut self, record: T, timestamp: Timestamp);
}

/// A collector that stamps records with the current timestamp and pushes
/// them into the next operator.
pub(crate) struct TimestampedCollector<'a, T> {
    pub(crate) output: &'a mut dyn Output<T>,
    pub(crate) timestamp: Timestamp,
}

impl<T> Collector<T> for TimestampedCollector<'_, T> {
    fn collect(&mut self, record: T) {
        self.output.push(record, self.timestamp);
    }

    fn collect_with_timestamp(&mut self, record: T, timestamp: Timestamp) {
        self.output.push(record, timestamp);
    }
}

impl<T> Collector<T> for Vec<T> {
    fn collect(&mut self, record: T) {
        self.push(record);
    }

    fn collect_with_timestamp(&mut self, record: T, _timestamp: Timestamp) {
        self.push(record);
    }
}

/// What a keyed function sees while it handles one record or timer: the
/// current key, its keyed state, event time and timers.
pub struct KeyedContext<'a, K> {
    pub(crate) key: &'a K,
    pub(crate) group_index: usize,
    pub(crate) timestamp: Timestamp,
    pub(crate) watermark: Timestamp,
    pub(crate) store: &'a mut KeyedStateStore<K>,
    pub(crate) timers: &'a mut TimerService<K, ()>,
}

impl<'a, K: Key> KeyedContext<'a, K> {
    pub fn current_key(&self) -> &K {
        self.key
    }

    /// The event timestamp of the record being processed, or the timestamp
    /// of the timer that fired.
    pub fn timestamp(&self) -> Timestamp {
        self.timestamp
    }

    pub fn current_watermark(&self) -> Timestamp {
        self.watermark
    }

    /// Calls `on_timer` for the current key once the watermark reaches
    /// `timestamp`. Registering the same timestamp twice keeps one timer.
    pub fn register_event_time_timer(&mut self, timestamp: Timestamp) {
        self.timers.register(self.key, &(), timestamp);
    }

    pub fn delete_event_time_timer(&mut self, timestamp: Timestamp) {
        self.timers.delete(self.key, &(), timestamp);
    }

    pub(crate) fn state_scope(&self) -> (&KeyedStateStore<K>, usize, &K) {
        (self.store, self.group_index, self.key)
    }

    pub(crate) fn state_scope_mut(&mut self) -> (&mut KeyedStateStore<K>, usize, &K) {
        (self.store, self.group_index, self.key)
    }
}

/// A function over a keyed stream with keyed state and event-time timers,
/// as Flink's `KeyedProcessFunction`. Each subtask gets its own clone.
pub trait KeyedProcessFunction<K: Key, I, O>: Clone + Send + Sync + 'static {
    /// Registers state handles; called once per subtask before any record.
    fn open(&mut self, _state: &mut KeyedStateStore<K>) {}

    fn process_element(
        &mut self,
        value: I,
        context: &mut KeyedContext<'_, K>,
        out: &mut dyn Collector<O>,
    );

    fn on_timer(
        &mut self,
        _timestamp: Timestamp,
        _context: &mut KeyedContext<'_, K>,
        _out: &mut dyn Collector<O>,
    ) {
    }
}

/// A function over two connected keyed streams that share keyed state and
/// timers, as Flink's `KeyedCoProcessFunction`.
pub trait KeyedCoProcessFunction<K: Key, I1, I2, O>: Clone + Send + Sync + 'static {
    fn open(&mut self, _state: &mut KeyedStateStore<K>) {}

    fn process_element1(
        &mut self,
        value: I1,
        context: &mut KeyedContext<'_, K>,
        out: &mut dyn Collector<O>,
    );

    fn process_element2(
        &mut self,
        value: I2,
        context: &mut KeyedContext<'_, K>,
        out: &mut dyn Collector<O>,
    );

    fn on_timer(
        &mut self,
        _timestamp: Timestamp,
        _context: &mut KeyedContext<'_, K>,
        _out: &mut dyn Collector<O>,
    ) {
    }
}

/// A sink: the end of a stream. Each subtask gets its own clone.
pub trait SinkFunction<T>: Clone + Send + Sync + 'static {
    fn open(&mut self, _context: &crate::operator::OperatorContext) {}

    fn invoke(&mut self, value: T, timestamp: Timestamp);

    /// Called once when the input has ended; the place to report results
    /// into the job's accumulators.
    fn finish(&mut self, _context: &crate::operator::OperatorContext) {}

    /// The sink's state at a checkpoint barrier, as a list of elements (as
    /// Flink's operator `ListState`): a job restored at another parallelism
    /// hands the elements of all old subtasks round robin to the new ones.
    fn snapshot_state(&mut self, _checkpoint_id: u64) -> Vec<Vec<u8>> {
        Vec::new()
    }

    /// Called after `open` with this subtask's share of the state of the
    /// checkpoint the job starts from (nothing on a fresh start).
    fn restore_state(&mut self, elements: Vec<Vec<u8>>) -> Result<(), String> {
        if elements.is_empty() {
            Ok(())
        } else {
            Err("the checkpoint holds state for this sink, which restores none".to_string())
        }
    }

    /// Every task's state of checkpoint `checkpoint_id` is durable: commit
    /// what the sink staged for it (two-phase commit).
    fn notify_checkpoint_complete(&mut self, _checkpoint_id: u64) {}
}
