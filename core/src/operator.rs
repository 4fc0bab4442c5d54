//! Operators and the pieces a task is made of.
//!
//! A task is a chain of operators: each implements [`Output`] for its input
//! type and owns the [`Output`] of the next one, so a record moves down the
//! chain by direct calls. At the end of a chain a [`RecordWriter`] batches
//! records per channel into rkyv buffers and queues them, with watermarks and
//! end-of-input in order, for the runtime to send. The runtime drives a task
//! through its head: a [`SourceHead`] it polls, or a [`TaskHead`] it feeds
//! with the buffers and watermarks of its input channels.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::accumulator::Accumulators;
use crate::function::{
    Collector, KeyedCoProcessFunction, KeyedContext, KeyedProcessFunction, SinkFunction,
    TimestampedCollector,
};
use crate::key::{subtask_for_key_group, Key, KeyGroupAssigner, KeyGroupRange};
use crate::record::{LocalRecords, Record, StreamElement, StreamRecord};
use crate::snapshot::{
    CheckpointBarrier, Committable, KeyedCapture, OperatorCapture, OperatorRestore, TaskRestore,
    TaskSnapshot,
};
use crate::source::{SourceOutput, SourceReader, SourceStatus};
use crate::state::{KeyedStateStore, TimerService};
use crate::time::{Timestamp, WatermarkStrategy, MAX_WATERMARK, MIN_WATERMARK, NO_TIMESTAMP};
use rkyv::util::AlignedVec;

/// The most records a writer gathers into one buffer per channel.
pub const BATCH_RECORDS_MAX: usize = 1024;

/// The most records a source hands down its chain at once (see
/// [`Output::push_batch`]): enough to pay one call per operator for many
/// records, few enough that the batch stays in the L1 cache between
/// operators. A task head passes on a buffer from another slot in batches
/// of this size; records from a task of the same slot, and a two-input
/// operator's buffers, go on whole (up to [`BATCH_RECORDS_MAX`]), as
/// moving them into smaller batches would cost more than it saves.
pub const CHAIN_BATCH_RECORDS: usize = 256;

/// The receiving end of an operator: records, event time and the end.
pub trait Output<T> {
    fn push(&mut self, record: T, timestamp: Timestamp);
    /// Records in order, handed over at once: the same as pushing each of
    /// them, which is what it does unless an operator can do better (map,
    /// filter and flat-map pass the whole batch on with one call, so a chain
    /// pays one call per operator per batch, and each operator reads records
    /// the previous one wrote long before, not a moment ago). It takes every
    /// record, leaving `batch` empty for the caller to refill.
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<T>>) {
        for record in batch.drain(..) {
            self.push(record.value, record.timestamp);
        }
    }
    /// A copy of each record of `batch`, which stays the caller's: the
    /// same as [`Output::push_batch`] of a copy of it, which is what it
    /// does (the copy made in `scratch`, empty before and after) unless an
    /// operator can copy each record as it reads it. Map, filter and flat
    /// map do, so that a stream that several operators read (a fan-out) is
    /// not first copied whole, then read again.
    fn push_batch_cloned(&mut self, batch: &[StreamRecord<T>], scratch: &mut Vec<StreamRecord<T>>)
    where
        T: Clone,
    {
        scratch.extend_from_slice(batch);
        self.push_batch(scratch);
        scratch.clear();
    }
    /// Event time reached `watermark`: fire what is due, then forward it.
    fn watermark(&mut self, watermark: Timestamp);
    /// The input turned idle or active.
    fn idle(&mut self, idle: bool);
    /// Ship whatever is buffered (the task has no more input ready).
    fn flush(&mut self);
    /// The input has ended (after the final watermark).
    fn end_of_input(&mut self);
    /// A checkpoint barrier: capture this operator's state into
    /// `snapshot`, then pass the barrier on (see [`crate::snapshot`]).
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot);
    /// Checkpoint `checkpoint_id` is complete: every task's state of it is
    /// durable, so what it covers may be committed.
    fn checkpoint_complete(&mut self, checkpoint_id: u64);
}

/// What an operator knows of where it runs.
#[derive(Clone)]
pub struct OperatorContext {
    pub operator_name: String,
    pub subtask_index: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
    pub key_groups: KeyGroupRange,
    pub accumulators: Rc<RefCell<Accumulators>>,
    /// The operator's position in its chain (0: the head).
    pub chain_position: usize,
    /// Where the task records which operator of the chain runs.
    pub tracker: Rc<Cell<usize>>,
    /// The operator's stable id: what names its state in checkpoints.
    pub operator_id: String,
    /// The state the task starts from, which each operator takes its share
    /// of when it is created.
    pub restore: Rc<RefCell<TaskRestore>>,
    /// What sinks leave to commit once the whole job has finished.
    pub committables: Rc<RefCell<Vec<Committable>>>,
}

impl OperatorContext {
    /// This operator's state in the checkpoint the task starts from.
    pub fn take_restored(&self) -> Option<OperatorRestore> {
        self.restore
            .borrow_mut()
            .operators
            .remove(&self.operator_id)
    }

    /// A capture of this operator's state at a barrier.
    pub fn capture(
        &self,
        keyed: Option<Box<dyn KeyedCapture>>,
        operator_state: Vec<Vec<u8>>,
    ) -> OperatorCapture {
        OperatorCapture {
            operator_id: self.operator_id.clone(),
            operator_name: self.operator_name.clone(),
            subtask_index: self.subtask_index,
            parallelism: self.parallelism,
            max_parallelism: self.max_parallelism,
            keyed,
            operator_state,
        }
    }

    /// Fails the task when its restored state cannot be read: the job
    /// changed in a way its checkpoint does not fit.
    pub fn restore_failed(&self, error: &str) -> ! {
        panic!(
            "cannot restore the state of operator '{}' ({}): {error}",
            self.operator_name, self.operator_id
        )
    }
}

/// A task's output, shared by its writers and the runtime.
pub type OutputQueue = Rc<TaskOutput>;

/// How many spare buffers a task keeps for its writers to encode into.
const SPARE_BUFFERS_MAX: usize = 64;

/// Spare buffers larger than this are freed, not kept: a burst of large
/// records does not pin its buffers' memory for the rest of the job.
const SPARE_BUFFER_BYTES_MAX: usize = 1 << 20;

/// Elements a task has produced and not yet handed to its channels, tagged
/// with the index of the output channel. The runtime drains it, waiting
/// where a channel is full, so backpressure reaches the task between batches.
///
/// With them, spare buffers: buffers the channels' consumers have read and
/// given back, which the writers encode their next buffers into. A buffer
/// is allocated once and goes round between its producer and consumer, as
/// Flink's network buffers go back to their pool. Allocated on one core
/// and freed on another, each buffer cost two calls into the allocator
/// that contended for the producer's arena lock (`futex` calls), grew
/// through `realloc` and faulted its pages in afresh.
#[derive(Default)]
pub struct TaskOutput {
    elements: RefCell<VecDeque<(usize, StreamElement)>>,
    spares: RefCell<Vec<AlignedVec>>,
    /// Vectors of records given back by consumers of this slot, by output
    /// channel ([`StreamElement::Local`]).
    local_spares: RefCell<Vec<(usize, Box<dyn std::any::Any + Send>)>>,
    /// Which output channels lead to a task of the same slot (set by the
    /// runtime before the task's operators are built; none by default).
    local_channels: RefCell<Vec<bool>>,
}

impl TaskOutput {
    /// Queues `element` for output channel `channel`.
    pub fn push(&self, channel: usize, element: StreamElement) {
        self.elements.borrow_mut().push_back((channel, element));
    }

    /// The oldest queued element and its channel.
    pub fn pop(&self) -> Option<(usize, StreamElement)> {
        self.elements.borrow_mut().pop_front()
    }

    /// Whether the task takes more spare buffers.
    pub fn wants_spares(&self) -> bool {
        self.spares.borrow().len() < SPARE_BUFFERS_MAX
    }

    /// Keeps `buffer` (emptied) for a writer's next buffer, unless it is
    /// larger than [`SPARE_BUFFER_BYTES_MAX`].
    pub fn add_spare(&self, mut buffer: AlignedVec) {
        if buffer.capacity() <= SPARE_BUFFER_BYTES_MAX {
            buffer.clear();
            self.spares.borrow_mut().push(buffer);
        }
    }

    /// A spare buffer, if there is one.
    fn take_spare(&self) -> Option<AlignedVec> {
        self.spares.borrow_mut().pop()
    }

    /// Says which output channels lead to a task of the same slot: their
    /// writers hand records over as they are.
    pub fn set_local_channels(&self, local: Vec<bool>) {
        *self.local_channels.borrow_mut() = local;
    }

    /// Whether output channel `channel` leads to a task of the same slot.
    fn is_local(&self, channel: usize) -> bool {
        self.local_channels
            .borrow()
            .get(channel)
            .copied()
            .unwrap_or(false)
    }

    /// Keeps `records`, given back on output channel `channel`, for that
    /// channel's writer.
    pub fn add_local_spare(&self, channel: usize, records: Box<dyn std::any::Any + Send>) {
        let mut spares = self.local_spares.borrow_mut();
        if spares.len() < SPARE_BUFFERS_MAX {
            spares.push((channel, records));
        }
    }

    /// A vector of records given back on `channel`, if there is one (in
    /// its box: the box goes round too, as the `dyn Any` it travels in).
    #[allow(clippy::box_collection)]
    fn take_local_spare<T: Record>(&self, channel: usize) -> Option<Box<Vec<StreamRecord<T>>>> {
        let mut spares = self.local_spares.borrow_mut();
        let at = spares.iter().position(|(of, _)| *of == channel)?;
        spares.swap_remove(at).1.downcast().ok()
    }
}

/// The head of a task whose input comes from channels.
pub trait TaskHead {
    /// A buffer of records from a channel of logical input `input`.
    fn on_buffer(&mut self, input: usize, bytes: &[u8]) -> Result<(), String>;
    /// Records from a task of the same slot on logical input `input`,
    /// taken out of `records`.
    fn on_local(&mut self, input: usize, records: &mut LocalRecords) -> Result<(), String>;
    fn on_watermark(&mut self, watermark: Timestamp);
    fn on_idle(&mut self, idle: bool);
    fn flush(&mut self);
    fn end_of_input(&mut self);
    /// Every input has delivered `barrier` (aligned).
    fn on_barrier(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot);
    fn checkpoint_complete(&mut self, checkpoint_id: u64);
}

/// The head of a task that starts with a source.
pub trait SourceHead {
    /// Emits up to about `budget` records.
    fn poll(&mut self, budget: usize) -> SourceStatus;
    fn flush(&mut self);
    /// Sends the final watermark and end-of-input down the chain.
    fn end_of_input(&mut self);
    /// Captures the reader's position and the chain's state at a barrier
    /// the coordinator injected, and sends the barrier downstream.
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot);
    fn checkpoint_complete(&mut self, checkpoint_id: u64);
}

/// The control methods of an [`Output`] that ends a chain and has nothing
/// to do with event time, checkpoints or the end (a sink of records alone).
macro_rules! ignore_control {
    () => {
        fn watermark(&mut self, _watermark: Timestamp) {}
        fn idle(&mut self, _idle: bool) {}
        fn flush(&mut self) {}
        fn end_of_input(&mut self) {}
        fn snapshot(&mut self, _barrier: &CheckpointBarrier, _snapshot: &mut TaskSnapshot) {}
        fn checkpoint_complete(&mut self, _checkpoint_id: u64) {}
    };
}
// For the window tests.
#[cfg(test)]
pub(crate) use ignore_control;

macro_rules! forward_control {
    () => {
        fn watermark(&mut self, watermark: Timestamp) {
            self.next.watermark(watermark);
        }
        fn idle(&mut self, idle: bool) {
            self.next.idle(idle);
        }
        fn flush(&mut self) {
            self.next.flush();
        }
        fn end_of_input(&mut self) {
            self.next.end_of_input();
        }
        fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
            self.next.snapshot(barrier, snapshot);
        }
        fn checkpoint_complete(&mut self, checkpoint_id: u64) {
            self.next.checkpoint_complete(checkpoint_id);
        }
    };
}

pub(crate) struct MapOperator<I, O, F> {
    pub(crate) function: Arc<F>,
    pub(crate) next: Box<dyn Output<O>>,
    /// Where a batch's results gather before they go on (empty between
    /// calls; kept for its capacity).
    pub(crate) mapped: Vec<StreamRecord<O>>,
    pub(crate) _input: PhantomData<fn(I)>,
}

impl<I, O, F> MapOperator<I, O, F> {
    pub(crate) fn new(function: Arc<F>, next: Box<dyn Output<O>>) -> Self {
        MapOperator {
            function,
            next,
            mapped: Vec::new(),
            _input: PhantomData,
        }
    }
}

impl<I, O, F: Fn(I) -> O> Output<I> for MapOperator<I, O, F> {
    fn push(&mut self, record: I, timestamp: Timestamp) {
        let mapped = (self.function)(record);
        self.next.push(mapped, timestamp);
    }
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<I>>) {
        let function = &*self.function;
        self.mapped
            .extend(batch.drain(..).map(|record| StreamRecord {
                timestamp: record.timestamp,
                value: function(record.value),
            }));
        self.next.push_batch(&mut self.mapped);
        self.mapped.clear();
    }
    fn push_batch_cloned(&mut self, batch: &[StreamRecord<I>], _: &mut Vec<StreamRecord<I>>)
    where
        I: Clone,
    {
        let function = &*self.function;
        self.mapped.extend(batch.iter().map(|record| StreamRecord {
            timestamp: record.timestamp,
            value: function(record.value.clone()),
        }));
        self.next.push_batch(&mut self.mapped);
        self.mapped.clear();
    }
    forward_control!();
}

pub(crate) struct FilterOperator<T, F> {
    pub(crate) function: Arc<F>,
    pub(crate) next: Box<dyn Output<T>>,
}

impl<T, F: Fn(&T) -> bool> Output<T> for FilterOperator<T, F> {
    fn push(&mut self, record: T, timestamp: Timestamp) {
        if (self.function)(&record) {
            self.next.push(record, timestamp);
        }
    }
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<T>>) {
        let function = &*self.function;
        batch.retain(|record| function(&record.value));
        if !batch.is_empty() {
            self.next.push_batch(batch);
        }
        batch.clear();
    }
    fn push_batch_cloned(&mut self, batch: &[StreamRecord<T>], scratch: &mut Vec<StreamRecord<T>>)
    where
        T: Clone,
    {
        let function = &*self.function;
        scratch.extend(
            batch
                .iter()
                .filter(|record| function(&record.value))
                .cloned(),
        );
        if !scratch.is_empty() {
            self.next.push_batch(scratch);
        }
        scratch.clear();
    }
    forward_control!();
}

pub(crate) struct FlatMapOperator<I, O, F> {
    pub(crate) function: Arc<F>,
    pub(crate) next: Box<dyn Output<O>>,
    /// Where a batch's results gather before they go on (empty between
    /// calls; kept for its capacity).
    pub(crate) collected: Vec<StreamRecord<O>>,
    pub(crate) _input: PhantomData<fn(I)>,
}

impl<I, O, F> FlatMapOperator<I, O, F> {
    pub(crate) fn new(function: Arc<F>, next: Box<dyn Output<O>>) -> Self {
        FlatMapOperator {
            function,
            next,
            collected: Vec::new(),
            _input: PhantomData,
        }
    }
}

/// A function that emits to a main output and a side output (Flink's side
/// outputs, `ProcessFunction` with an `OutputTag`): each record is read
/// once, however many streams it is split into.
pub(crate) struct SplitOperator<I, A, B, F> {
    pub(crate) function: Arc<F>,
    pub(crate) main: Box<dyn Output<A>>,
    pub(crate) side: Box<dyn Output<B>>,
    /// Where a batch's results gather before they go on (empty between
    /// calls; kept for their capacity).
    pub(crate) main_collected: Vec<StreamRecord<A>>,
    pub(crate) side_collected: Vec<StreamRecord<B>>,
    pub(crate) _input: PhantomData<fn(I)>,
}

/// The two outputs a split operator is built with, type-erased as one
/// (see graph.rs).
pub(crate) struct SplitOutputs {
    pub(crate) main: crate::graph::ErasedOutput,
    pub(crate) side: crate::graph::ErasedOutput,
}

impl<I, A, B, F> SplitOperator<I, A, B, F>
where
    F: Fn(I, &mut dyn Collector<A>, &mut dyn Collector<B>),
{
    /// Splits each record of a batch, its results shipped a batch at a
    /// time to each output.
    fn split_all(&mut self, records: impl Iterator<Item = StreamRecord<I>>) {
        let function = &*self.function;
        let mut main = ShippingCollector {
            output: &mut *self.main,
            batch: &mut self.main_collected,
            timestamp: NO_TIMESTAMP,
        };
        let mut side = ShippingCollector {
            output: &mut *self.side,
            batch: &mut self.side_collected,
            timestamp: NO_TIMESTAMP,
        };
        for record in records {
            main.timestamp = record.timestamp;
            side.timestamp = record.timestamp;
            function(record.value, &mut main, &mut side);
        }
    }
}

impl<I, A, B, F> Output<I> for SplitOperator<I, A, B, F>
where
    F: Fn(I, &mut dyn Collector<A>, &mut dyn Collector<B>),
{
    fn push(&mut self, record: I, timestamp: Timestamp) {
        let mut main = TimestampedCollector {
            output: &mut *self.main,
            timestamp,
        };
        let mut side = TimestampedCollector {
            output: &mut *self.side,
            timestamp,
        };
        (self.function)(record, &mut main, &mut side);
    }
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<I>>) {
        self.split_all(batch.drain(..));
    }
    fn push_batch_cloned(&mut self, batch: &[StreamRecord<I>], _: &mut Vec<StreamRecord<I>>)
    where
        I: Clone,
    {
        self.split_all(batch.iter().cloned());
    }
    fn watermark(&mut self, watermark: Timestamp) {
        self.main.watermark(watermark);
        self.side.watermark(watermark);
    }
    fn idle(&mut self, idle: bool) {
        self.main.idle(idle);
        self.side.idle(idle);
    }
    fn flush(&mut self) {
        self.main.flush();
        self.side.flush();
    }
    fn end_of_input(&mut self) {
        self.main.end_of_input();
        self.side.end_of_input();
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        self.main.snapshot(barrier, snapshot);
        self.side.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.main.checkpoint_complete(checkpoint_id);
        self.side.checkpoint_complete(checkpoint_id);
    }
}

/// Gathers what a function emits into batches for `output`: each batch
/// goes on when it is full, the rest when the collector is dropped.
pub(crate) struct ShippingCollector<'a, T> {
    pub(crate) output: &'a mut dyn Output<T>,
    /// Empty when the collector is made and when it is dropped.
    pub(crate) batch: &'a mut Vec<StreamRecord<T>>,
    pub(crate) timestamp: Timestamp,
}

impl<T> Collector<T> for ShippingCollector<'_, T> {
    fn collect(&mut self, record: T) {
        let timestamp = self.timestamp;
        self.collect_with_timestamp(record, timestamp);
    }

    fn collect_with_timestamp(&mut self, record: T, timestamp: Timestamp) {
        self.batch.push(StreamRecord {
            timestamp,
            value: record,
        });
        if self.batch.len() >= CHAIN_BATCH_RECORDS {
            self.output.push_batch(self.batch);
        }
    }
}

impl<T> Drop for ShippingCollector<'_, T> {
    fn drop(&mut self) {
        // Not while a panic unwinds: the task fails anyway, and a second
        // panic from downstream would abort the process.
        if !self.batch.is_empty() && !std::thread::panicking() {
            self.output.push_batch(self.batch);
        }
    }
}

impl<I, O, F: Fn(I, &mut dyn crate::function::Collector<O>)> Output<I>
    for FlatMapOperator<I, O, F>
{
    fn push(&mut self, record: I, timestamp: Timestamp) {
        let mut collector = TimestampedCollector {
            output: &mut *self.next,
            timestamp,
        };
        (self.function)(record, &mut collector);
    }
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<I>>) {
        let function = &*self.function;
        // A function may emit many records per record: they go on in
        // batches of the usual size, not the whole batch's at once.
        let mut collector = ShippingCollector {
            output: &mut *self.next,
            batch: &mut self.collected,
            timestamp: NO_TIMESTAMP,
        };
        for record in batch.drain(..) {
            collector.timestamp = record.timestamp;
            function(record.value, &mut collector);
        }
    }
    fn push_batch_cloned(&mut self, batch: &[StreamRecord<I>], _: &mut Vec<StreamRecord<I>>)
    where
        I: Clone,
    {
        let function = &*self.function;
        let mut collector = ShippingCollector {
            output: &mut *self.next,
            batch: &mut self.collected,
            timestamp: NO_TIMESTAMP,
        };
        for record in batch {
            collector.timestamp = record.timestamp;
            function(record.value.clone(), &mut collector);
        }
    }
    forward_control!();
}

pub(crate) struct SinkOperator<T, S> {
    pub(crate) sink: S,
    pub(crate) context: OperatorContext,
    pub(crate) _input: PhantomData<fn(T)>,
}

impl<T, S: SinkFunction<T>> Output<T> for SinkOperator<T, S> {
    fn push(&mut self, record: T, timestamp: Timestamp) {
        self.sink.invoke(record, timestamp);
    }
    fn watermark(&mut self, _watermark: Timestamp) {}
    fn idle(&mut self, _idle: bool) {}
    fn flush(&mut self) {}
    fn end_of_input(&mut self) {
        self.sink.finish(&self.context);
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        let state = self.sink.snapshot_state(barrier.checkpoint_id);
        snapshot.add(self.context.capture(None, state));
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.sink.notify_checkpoint_complete(checkpoint_id);
    }
}

/// Hands every record to several outputs (a stream consumed twice).
pub(crate) struct FanOut<T> {
    pub(crate) outputs: Vec<Box<dyn Output<T>>>,
    /// Scratch for the outputs but the last, each of which copies what it
    /// keeps of a batch into it or takes the whole batch's copy made in
    /// it ([`Output::push_batch_cloned`]; empty between calls).
    pub(crate) copy: Vec<StreamRecord<T>>,
}

impl<T: Clone> Output<T> for FanOut<T> {
    fn push(&mut self, record: T, timestamp: Timestamp) {
        if let Some((last, rest)) = self.outputs.split_last_mut() {
            for output in rest {
                output.push(record.clone(), timestamp);
            }
            last.push(record, timestamp);
        }
    }
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<T>>) {
        if let Some((last, rest)) = self.outputs.split_last_mut() {
            for output in rest {
                output.push_batch_cloned(batch, &mut self.copy);
            }
            last.push_batch(batch);
        }
        batch.clear();
    }
    fn watermark(&mut self, watermark: Timestamp) {
        self.outputs
            .iter_mut()
            .for_each(|output| output.watermark(watermark));
    }
    fn idle(&mut self, idle: bool) {
        self.outputs.iter_mut().for_each(|output| output.idle(idle));
    }
    fn flush(&mut self) {
        self.outputs.iter_mut().for_each(|output| output.flush());
    }
    fn end_of_input(&mut self) {
        self.outputs
            .iter_mut()
            .for_each(|output| output.end_of_input());
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        self.outputs
            .iter_mut()
            .for_each(|output| output.snapshot(barrier, snapshot));
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.outputs
            .iter_mut()
            .for_each(|output| output.checkpoint_complete(checkpoint_id));
    }
}

/// Records which operator of the chain is running, so that a panic can be
/// attributed to it: the index is set on entry and restored on return, so
/// after an unwind it names the innermost operator that did not return. It
/// wraps the concrete operator, adding no virtual call of its own.
pub(crate) struct Tracked<T, Op> {
    pub(crate) index: usize,
    pub(crate) tracker: Rc<Cell<usize>>,
    pub(crate) inner: Op,
    pub(crate) _input: PhantomData<fn(T)>,
}

impl<T: 'static, Op: Output<T> + 'static> Tracked<T, Op> {
    /// `inner`, chained at its operator's place in `context`'s chain, as
    /// the chain builds it (a type-erased `Box<dyn Output<T>>`).
    pub(crate) fn erased(context: &OperatorContext, inner: Op) -> crate::graph::ErasedOutput {
        crate::graph::erase::<T>(Box::new(Tracked {
            index: context.chain_position,
            tracker: context.tracker.clone(),
            inner,
            _input: PhantomData,
        }))
    }
}

impl<T, Op: Output<T>> Output<T> for Tracked<T, Op> {
    #[inline]
    fn push(&mut self, record: T, timestamp: Timestamp) {
        let previous = self.tracker.replace(self.index);
        self.inner.push(record, timestamp);
        self.tracker.set(previous);
    }
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<T>>) {
        let previous = self.tracker.replace(self.index);
        self.inner.push_batch(batch);
        self.tracker.set(previous);
    }
    fn push_batch_cloned(&mut self, batch: &[StreamRecord<T>], scratch: &mut Vec<StreamRecord<T>>)
    where
        T: Clone,
    {
        let previous = self.tracker.replace(self.index);
        self.inner.push_batch_cloned(batch, scratch);
        self.tracker.set(previous);
    }
    fn watermark(&mut self, watermark: Timestamp) {
        let previous = self.tracker.replace(self.index);
        self.inner.watermark(watermark);
        self.tracker.set(previous);
    }
    fn idle(&mut self, idle: bool) {
        let previous = self.tracker.replace(self.index);
        self.inner.idle(idle);
        self.tracker.set(previous);
    }
    fn flush(&mut self) {
        let previous = self.tracker.replace(self.index);
        self.inner.flush();
        self.tracker.set(previous);
    }
    fn end_of_input(&mut self) {
        let previous = self.tracker.replace(self.index);
        self.inner.end_of_input();
        self.tracker.set(previous);
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        let previous = self.tracker.replace(self.index);
        self.inner.snapshot(barrier, snapshot);
        self.tracker.set(previous);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        let previous = self.tracker.replace(self.index);
        self.inner.checkpoint_complete(checkpoint_id);
        self.tracker.set(previous);
    }
}

/// How a writer picks the channel of a record.
pub(crate) enum ChannelSelector<T> {
    /// One channel: the consumer subtask with the producer's index.
    Forward,
    /// Round robin over the consumers.
    Rebalance { next: usize },
    /// Every consumer gets every record.
    Broadcast,
    /// The consumer that owns the key group of the record's key.
    Hash {
        key_hash: crate::key::RecordKeyHash<T>,
        /// The key hashes of the batch being written.
        hashes: Vec<u64>,
        assigner: KeyGroupAssigner,
        /// The channel of every key group, computed once: no division per
        /// record.
        channel_of_key_group: Vec<u32>,
    },
}

impl<T> ChannelSelector<T> {
    /// Hash partitioning over `channel_count` consumers.
    pub(crate) fn hash(
        key_hash: crate::key::RecordKeyHash<T>,
        max_parallelism: u32,
        channel_count: usize,
    ) -> Self {
        let channel_of_key_group = (0..max_parallelism)
            .map(|key_group| {
                subtask_for_key_group(key_group, max_parallelism, channel_count as u32)
            })
            .collect();
        ChannelSelector::Hash {
            key_hash,
            hashes: Vec::new(),
            assigner: KeyGroupAssigner::new(max_parallelism),
            channel_of_key_group,
        }
    }
}

/// Batches records per channel into rkyv buffers and queues them.
pub(crate) struct RecordWriter<T> {
    pub(crate) selector: ChannelSelector<T>,
    pub(crate) channels: ChannelBuffers<T>,
}

/// A writer's channels: per channel the records not yet encoded, and
/// where its encoded buffers go.
pub(crate) struct ChannelBuffers<T> {
    /// Index of this writer's first channel in the task's output queue.
    channel_base: usize,
    buffers: Vec<Vec<StreamRecord<T>>>,
    /// The size of each channel's last encoded buffer: the capacity of a
    /// new buffer when no spare is at hand, so that it is one allocation.
    encoded_sizes: Vec<usize>,
    queue: OutputQueue,
}

impl<T: Record> RecordWriter<T> {
    pub(crate) fn new(
        selector: ChannelSelector<T>,
        channel_base: usize,
        channel_count: usize,
        queue: OutputQueue,
    ) -> Self {
        RecordWriter {
            selector,
            channels: ChannelBuffers {
                channel_base,
                buffers: (0..channel_count)
                    .map(|_| Vec::with_capacity(BATCH_RECORDS_MAX))
                    .collect(),
                encoded_sizes: vec![0; channel_count],
                queue,
            },
        }
    }
}

impl<T: Record> ChannelBuffers<T> {
    fn count(&self) -> usize {
        self.buffers.len()
    }

    #[inline]
    fn append(&mut self, channel: usize, record: T, timestamp: Timestamp) {
        let buffer = &mut self.buffers[channel];
        buffer.push(StreamRecord {
            timestamp,
            value: record,
        });
        if buffer.len() >= BATCH_RECORDS_MAX {
            self.ship(channel);
        }
    }

    /// Appends all of `records` to channel 0.
    fn append_all(&mut self, records: &mut Vec<StreamRecord<T>>) {
        let mut records = records.drain(..);
        loop {
            let buffer = &mut self.buffers[0];
            buffer.extend(records.by_ref().take(BATCH_RECORDS_MAX - buffer.len()));
            if buffer.len() < BATCH_RECORDS_MAX {
                return;
            }
            self.ship(0);
        }
    }

    fn ship(&mut self, channel: usize) {
        let buffer = &mut self.buffers[channel];
        if buffer.is_empty() {
            return;
        }
        let channel_index = self.channel_base + channel;
        // A channel to a task of the same slot gets the records as they
        // are, not encoded.
        if self.queue.is_local(channel_index) {
            let spare = self
                .queue
                .take_local_spare::<T>(channel_index)
                .unwrap_or_else(|| Box::new(Vec::with_capacity(BATCH_RECORDS_MAX)));
            let records = LocalRecords::take(buffer, spare);
            self.queue
                .push(channel_index, StreamElement::Local(records));
            return;
        }
        let into = self
            .queue
            .take_spare()
            .unwrap_or_else(|| AlignedVec::with_capacity(self.encoded_sizes[channel]));
        // Encoding into an AlignedVec cannot fail for our record types short
        // of running out of memory, which aborts anyway.
        let bytes = T::encode(buffer, into).expect("encoding records into a buffer");
        self.encoded_sizes[channel] = bytes.len();
        buffer.clear();
        self.queue
            .push(channel_index, StreamElement::Records(bytes));
    }

    fn ship_all(&mut self) {
        for channel in 0..self.buffers.len() {
            self.ship(channel);
        }
    }

    fn broadcast_event(&mut self, event: impl Fn() -> StreamElement) {
        self.ship_all();
        for channel in 0..self.buffers.len() {
            self.queue.push(self.channel_base + channel, event());
        }
    }
}

impl<T: Record> Output<T> for RecordWriter<T> {
    fn push_batch(&mut self, batch: &mut Vec<StreamRecord<T>>) {
        let channels = &mut self.channels;
        // One channel takes every record whatever the partitioning: a
        // key_by into one subtask computes no key hash.
        if channels.count() == 1 {
            return channels.append_all(batch);
        }
        match &mut self.selector {
            ChannelSelector::Forward => channels.append_all(batch),
            ChannelSelector::Hash {
                key_hash,
                hashes,
                assigner,
                channel_of_key_group,
            } => {
                // The batch's hashes in one call, the key selector inlined
                // into its loop.
                hashes.clear();
                key_hash.of_batch(batch, hashes);
                for (record, hash) in batch.drain(..).zip(hashes.iter()) {
                    let key_group = assigner.key_group_of_hash(*hash);
                    let channel = channel_of_key_group[key_group as usize] as usize;
                    channels.append(channel, record.value, record.timestamp);
                }
            }
            _ => {
                for record in batch.drain(..) {
                    self.push(record.value, record.timestamp);
                }
            }
        }
    }

    fn push(&mut self, record: T, timestamp: Timestamp) {
        let channels = &mut self.channels;
        let channel_count = channels.count();
        if channel_count == 1 {
            return channels.append(0, record, timestamp);
        }
        match &mut self.selector {
            ChannelSelector::Forward => channels.append(0, record, timestamp),
            ChannelSelector::Rebalance { next } => {
                let channel = *next;
                *next = (channel + 1) % channel_count;
                channels.append(channel, record, timestamp);
            }
            ChannelSelector::Broadcast => {
                for channel in 0..channel_count - 1 {
                    channels.append(channel, record.clone(), timestamp);
                }
                channels.append(channel_count - 1, record, timestamp);
            }
            ChannelSelector::Hash {
                key_hash,
                assigner,
                channel_of_key_group,
                ..
            } => {
                let key_group = assigner.key_group_of_hash(key_hash.of(&record));
                let channel = channel_of_key_group[key_group as usize] as usize;
                channels.append(channel, record, timestamp);
            }
        }
    }

    fn watermark(&mut self, watermark: Timestamp) {
        self.channels
            .broadcast_event(|| StreamElement::Watermark(watermark));
    }

    fn idle(&mut self, idle: bool) {
        self.channels.broadcast_event(|| StreamElement::Idle(idle));
    }

    fn flush(&mut self) {
        self.channels.ship_all();
    }

    fn end_of_input(&mut self) {
        self.channels.broadcast_event(|| StreamElement::EndOfInput);
    }

    fn snapshot(&mut self, barrier: &CheckpointBarrier, _snapshot: &mut TaskSnapshot) {
        self.channels
            .broadcast_event(|| StreamElement::Barrier(barrier.clone()));
    }

    fn checkpoint_complete(&mut self, _checkpoint_id: u64) {}
}

/// Drops everything (an operator whose output nobody consumes).
pub(crate) struct Discard;

impl<T> Output<T> for Discard {
    fn push(&mut self, _record: T, _timestamp: Timestamp) {}
    ignore_control!();
}

/// A task head's event time, end and checkpoints, handed to `$field` (the
/// chain's first operator).
macro_rules! head_control {
    ($field:ident) => {
        fn on_watermark(&mut self, watermark: Timestamp) {
            self.$field.watermark(watermark);
        }
        fn on_idle(&mut self, idle: bool) {
            self.$field.idle(idle);
        }
        fn flush(&mut self) {
            self.$field.flush();
        }
        fn end_of_input(&mut self) {
            self.$field.end_of_input();
        }
        fn on_barrier(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
            self.$field.snapshot(barrier, snapshot);
        }
        fn checkpoint_complete(&mut self, checkpoint_id: u64) {
            self.$field.checkpoint_complete(checkpoint_id);
        }
    };
}

/// The head of a one-input task (or a union): decodes buffers into records
/// for the chain.
pub(crate) struct DecodingHead<T> {
    pub(crate) next: Box<dyn Output<T>>,
    /// Decoded records on their way down the chain (empty between calls).
    pub(crate) batch: Vec<StreamRecord<T>>,
}

impl<T: Record> TaskHead for DecodingHead<T> {
    fn on_buffer(&mut self, _input: usize, bytes: &[u8]) -> Result<(), String> {
        let (next, batch) = (&mut self.next, &mut self.batch);
        let decoded = T::decode(bytes, |value, timestamp| {
            batch.push(StreamRecord { timestamp, value });
            if batch.len() >= CHAIN_BATCH_RECORDS {
                next.push_batch(batch);
                batch.clear();
            }
        });
        if !batch.is_empty() {
            next.push_batch(batch);
            batch.clear();
        }
        decoded
    }
    fn on_local(&mut self, _input: usize, records: &mut LocalRecords) -> Result<(), String> {
        let records = records.records_mut::<T>()?;
        if !records.is_empty() {
            self.next.push_batch(records);
            records.clear();
        }
        Ok(())
    }
    head_control!(next);
}

/// A two-input operator (a connected keyed process, a window join): the
/// records of either input, and the event time of both combined. As the
/// head of its task, [`TwoInputHead`] decodes its channels' buffers into
/// it; chained behind operators of its own task (both inputs come from one
/// chain, see graph.rs), a [`Junction`] combines what its two inputs
/// deliver.
pub(crate) trait TwoInputOperator<I1, I2> {
    /// Records of the first input, in order; `batch` is left empty.
    fn push_batch1(&mut self, batch: &mut Vec<StreamRecord<I1>>);
    /// Records of the second input, in order; `batch` is left empty.
    fn push_batch2(&mut self, batch: &mut Vec<StreamRecord<I2>>);
    /// The watermark of both inputs combined.
    fn watermark(&mut self, watermark: Timestamp);
    /// Whether both inputs are idle.
    fn idle(&mut self, idle: bool);
    fn flush(&mut self);
    /// Both inputs have ended.
    fn end_of_input(&mut self);
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot);
    fn checkpoint_complete(&mut self, checkpoint_id: u64);
}

/// The head of a task whose first operator has two inputs: decodes each
/// buffer whole, then hands its records over at once.
pub(crate) struct TwoInputHead<I1, I2, Op> {
    pub(crate) operator: Op,
    /// Decoded records (empty between calls).
    pub(crate) batch1: Vec<StreamRecord<I1>>,
    pub(crate) batch2: Vec<StreamRecord<I2>>,
}

impl<I1, I2, Op> TwoInputHead<I1, I2, Op> {
    pub(crate) fn new(operator: Op) -> Self {
        TwoInputHead {
            operator,
            batch1: Vec::new(),
            batch2: Vec::new(),
        }
    }
}

impl<I1: Record, I2: Record, Op: TwoInputOperator<I1, I2>> TaskHead for TwoInputHead<I1, I2, Op> {
    fn on_local(&mut self, input: usize, records: &mut LocalRecords) -> Result<(), String> {
        if input == 0 {
            let records = records.records_mut::<I1>()?;
            self.operator.push_batch1(records);
            records.clear();
        } else {
            let records = records.records_mut::<I2>()?;
            self.operator.push_batch2(records);
            records.clear();
        }
        Ok(())
    }
    fn on_buffer(&mut self, input: usize, bytes: &[u8]) -> Result<(), String> {
        if input == 0 {
            let batch = &mut self.batch1;
            let decoded = I1::decode(bytes, |value, timestamp| {
                batch.push(StreamRecord { timestamp, value })
            });
            self.operator.push_batch1(batch);
            batch.clear();
            decoded
        } else {
            let batch = &mut self.batch2;
            let decoded = I2::decode(bytes, |value, timestamp| {
                batch.push(StreamRecord { timestamp, value })
            });
            self.operator.push_batch2(batch);
            batch.clear();
            decoded
        }
    }
    head_control!(operator);
}

/// A two-input operator chained behind operators of its own task: each
/// input is an [`Output`] ([`JunctionInput`]) of the operator before it,
/// and this combines what the two deliver, as a task's input channels are
/// combined. Event time goes by the slower input (a watermark valve of
/// two); the end comes when both inputs have ended. Both inputs come from
/// one chain, so a barrier, a flush or a checkpoint's completion reaches
/// it through each: it snapshots once the barrier has come through both
/// (what an operator before it emits as it snapshots is then in the
/// state, as with barrier alignment), and passes the rest on the first.
pub(crate) struct Junction<Op> {
    operator: Op,
    valve: crate::time::WatermarkValve,
    ended: [bool; 2],
    /// The barrier being aligned, and the inputs it has come through.
    barrier: (Option<u64>, [bool; 2]),
    /// The checkpoint last completed.
    completed: Option<u64>,
}

impl<Op> Junction<Op> {
    /// The two inputs of `operator`, for the operators before it.
    pub(crate) fn inputs<I1, I2>(
        operator: Op,
    ) -> (
        JunctionInput<I1, I1, I2, Op, 0>,
        JunctionInput<I2, I1, I2, Op, 1>,
    )
    where
        Op: TwoInputOperator<I1, I2>,
    {
        let junction = Rc::new(RefCell::new(Junction {
            operator,
            valve: crate::time::WatermarkValve::new(2),
            ended: [false; 2],
            barrier: (None, [false; 2]),
            completed: None,
        }));
        (
            JunctionInput::new(junction.clone()),
            JunctionInput::new(junction),
        )
    }
}

impl<Op> Junction<Op> {
    /// Applies what the valve's output changed, as a task applies its
    /// valve's.
    fn apply<I1, I2>(&mut self, output: crate::time::ValveOutput)
    where
        Op: TwoInputOperator<I1, I2>,
    {
        for change in output.in_order() {
            match change {
                crate::time::ValveChange::Watermark(watermark) => {
                    self.operator.watermark(watermark)
                }
                crate::time::ValveChange::Idle(idle) => self.operator.idle(idle),
            }
        }
    }
}

/// Input `INPUT` (0 or 1) of a [`Junction`], of records `T` (`I1` or
/// `I2`).
pub(crate) struct JunctionInput<T, I1, I2, Op, const INPUT: usize> {
    junction: Rc<RefCell<Junction<Op>>>,
    /// A record pushed alone, as a batch of one (empty between calls).
    one: Vec<StreamRecord<T>>,
    _inputs: PhantomData<fn(I1, I2)>,
}

impl<T, I1, I2, Op, const INPUT: usize> JunctionInput<T, I1, I2, Op, INPUT> {
    fn new(junction: Rc<RefCell<Junction<Op>>>) -> Self {
        JunctionInput {
            junction,
            one: Vec::new(),
            _inputs: PhantomData,
        }
    }
}

/// The [`Output`] of input `$input` of a junction, of records `$record`,
/// which it hands to its operator's `$push_batch`.
macro_rules! junction_input {
    ($input:literal, $record:ident, $push_batch:ident) => {
        impl<I1, I2, Op: TwoInputOperator<I1, I2>> Output<$record>
            for JunctionInput<$record, I1, I2, Op, $input>
        {
            fn push(&mut self, record: $record, timestamp: Timestamp) {
                self.one.push(StreamRecord {
                    timestamp,
                    value: record,
                });
                self.junction
                    .borrow_mut()
                    .operator
                    .$push_batch(&mut self.one);
                self.one.clear();
            }
            fn push_batch(&mut self, batch: &mut Vec<StreamRecord<$record>>) {
                self.junction.borrow_mut().operator.$push_batch(batch);
                batch.clear();
            }
            fn watermark(&mut self, watermark: Timestamp) {
                let mut junction = self.junction.borrow_mut();
                let output = junction.valve.on_watermark($input, watermark);
                junction.apply::<I1, I2>(output);
            }
            fn idle(&mut self, idle: bool) {
                let mut junction = self.junction.borrow_mut();
                let output = junction.valve.on_idle($input, idle);
                junction.apply::<I1, I2>(output);
            }
            fn flush(&mut self) {
                self.junction.borrow_mut().operator.flush();
            }
            fn end_of_input(&mut self) {
                let mut junction = self.junction.borrow_mut();
                let already = junction.ended == [true; 2];
                junction.ended[$input] = true;
                if !already && junction.ended == [true; 2] {
                    junction.operator.end_of_input();
                }
            }
            fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
                let mut junction = self.junction.borrow_mut();
                let id = barrier.checkpoint_id;
                if junction.barrier.0 != Some(id) {
                    junction.barrier = (Some(id), [false; 2]);
                }
                junction.barrier.1[$input] = true;
                // Aligned: every input that has not ended has passed the
                // barrier on, and with it what the operators before it
                // emitted as they snapshotted.
                let (arrived, ended) = (junction.barrier.1, junction.ended);
                if (0..2).all(|input| arrived[input] || ended[input]) {
                    junction.barrier.1 = [false; 2];
                    junction.operator.snapshot(barrier, snapshot);
                }
            }
            fn checkpoint_complete(&mut self, checkpoint_id: u64) {
                let mut junction = self.junction.borrow_mut();
                if junction.completed != Some(checkpoint_id) {
                    junction.completed = Some(checkpoint_id);
                    junction.operator.checkpoint_complete(checkpoint_id);
                }
            }
        }
    };
}

junction_input!(0, I1, push_batch1);
junction_input!(1, I2, push_batch2);

/// Turns a source reader into the head of a task: assigns timestamps,
/// generates watermarks after every poll, and marks the subtask idle.
pub(crate) struct SourceTask<T> {
    pub(crate) context: OperatorContext,
    pub(crate) reader: Box<dyn SourceReader<T>>,
    pub(crate) output: SourceCollector<T>,
    pub(crate) strategy: WatermarkStrategy<T>,
    pub(crate) emitted_watermark: Timestamp,
    pub(crate) idle: bool,
    pub(crate) last_record_at: Instant,
    pub(crate) last_watermark_at: Instant,
}

pub(crate) struct SourceCollector<T> {
    pub(crate) next: Box<dyn Output<T>>,
    /// Records collected and not yet handed down the chain: they go at
    /// [`CHAIN_BATCH_RECORDS`] and at the end of every poll, before anything
    /// else reaches the chain.
    pub(crate) batch: Vec<StreamRecord<T>>,
    pub(crate) assigner: Option<Arc<dyn Fn(&T) -> Timestamp + Send + Sync>>,
    pub(crate) max_timestamp: Timestamp,
    pub(crate) emitted: u64,
}

impl<T> SourceOutput<T> for SourceCollector<T> {
    fn collect(&mut self, record: T) {
        let timestamp = match &self.assigner {
            Some(assigner) => assigner(&record),
            None => NO_TIMESTAMP,
        };
        self.collect_with_timestamp(record, timestamp);
    }

    fn collect_with_timestamp(&mut self, record: T, timestamp: Timestamp) {
        if timestamp > self.max_timestamp {
            self.max_timestamp = timestamp;
        }
        self.emitted += 1;
        self.batch.push(StreamRecord {
            timestamp,
            value: record,
        });
        if self.batch.len() >= CHAIN_BATCH_RECORDS {
            self.ship();
        }
    }

    fn collect_batch(&mut self, records: &mut Vec<StreamRecord<T>>) {
        if let Some(latest) = records.iter().map(|record| record.timestamp).max() {
            self.hand_over(records, latest);
        }
    }

    fn collect_ordered_batch(&mut self, records: &mut Vec<StreamRecord<T>>) {
        debug_assert!(
            records
                .windows(2)
                .all(|pair| pair[0].timestamp <= pair[1].timestamp),
            "an ordered batch out of event-time order"
        );
        // The scan for the latest of an unordered batch was 4% of q7's
        // instructions (5 a bid).
        if let Some(latest) = records.last().map(|record| record.timestamp) {
            self.hand_over(records, latest);
        }
    }

    fn skip_to(&mut self, timestamp: Timestamp) {
        self.max_timestamp = self.max_timestamp.max(timestamp);
    }
}

impl<T> SourceCollector<T> {
    /// Hands `records` (not empty), the latest of them at `latest`, down
    /// the chain after what was collected before them.
    #[inline]
    fn hand_over(&mut self, records: &mut Vec<StreamRecord<T>>, latest: Timestamp) {
        self.max_timestamp = self.max_timestamp.max(latest);
        self.emitted += records.len() as u64;
        if self.batch.is_empty() {
            // Straight down the chain: no copy.
            self.next.push_batch(records);
            records.clear();
        } else {
            self.batch.append(records);
            self.ship();
        }
    }

    /// Hands the records collected so far down the chain.
    fn ship(&mut self) {
        if !self.batch.is_empty() {
            self.next.push_batch(&mut self.batch);
            self.batch.clear();
        }
    }
}

impl<T> SourceTask<T> {
    pub(crate) fn new(
        context: OperatorContext,
        reader: Box<dyn SourceReader<T>>,
        next: Box<dyn Output<T>>,
        strategy: WatermarkStrategy<T>,
    ) -> Self {
        SourceTask {
            context,
            reader,
            output: SourceCollector {
                next,
                batch: Vec::with_capacity(CHAIN_BATCH_RECORDS),
                assigner: strategy.timestamp_assigner.clone(),
                max_timestamp: MIN_WATERMARK,
                emitted: 0,
            },
            strategy,
            emitted_watermark: MIN_WATERMARK,
            idle: false,
            last_record_at: Instant::now(),
            last_watermark_at: Instant::now(),
        }
    }
}

impl<T> SourceHead for SourceTask<T> {
    fn poll(&mut self, budget: usize) -> SourceStatus {
        let before = self.output.emitted;
        let status = self.reader.poll_next(&mut self.output, budget);
        self.output.ship();
        let produced = self.output.emitted > before;
        if produced {
            self.last_record_at = Instant::now();
            if self.idle {
                self.idle = false;
                self.output.next.idle(false);
            }
        }
        // Watermarks are periodic, as Flink's auto-watermark interval: each
        // one ships every partial buffer downstream, so emitting one per
        // poll would cut batches short. A reader that pauses or ends gets
        // its watermark at once.
        let due = status != SourceStatus::MoreAvailable
            || self.last_watermark_at.elapsed() >= self.strategy.watermark_interval;
        if due && self.strategy.generates_watermarks && self.output.max_timestamp > MIN_WATERMARK {
            self.last_watermark_at = Instant::now();
            let watermark = self
                .output
                .max_timestamp
                .saturating_sub(self.strategy.out_of_orderness_ms)
                .saturating_sub(1);
            if watermark > self.emitted_watermark {
                self.emitted_watermark = watermark;
                self.output.next.watermark(watermark);
            }
        }
        let nothing_available = matches!(
            status,
            SourceStatus::NothingAvailable | SourceStatus::NothingAvailableFor(_)
        );
        if !produced && !self.idle && nothing_available {
            let timeout = self.strategy.idleness.unwrap_or(Duration::MAX);
            if self.last_record_at.elapsed() >= timeout {
                self.idle = true;
                self.output.next.idle(true);
            }
        }
        status
    }

    fn flush(&mut self) {
        self.output.next.flush();
    }

    fn end_of_input(&mut self) {
        if self.idle {
            self.output.next.idle(false);
        }
        self.output.next.watermark(MAX_WATERMARK);
        self.output.next.end_of_input();
    }

    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        let position = match self.reader.snapshot_state() {
            Ok(position) => position,
            Err(error) => panic!(
                "source '{}' cannot take part in checkpoint {}: {error}",
                self.context.operator_name, barrier.checkpoint_id
            ),
        };
        snapshot.add(self.context.capture(None, position));
        self.output.next.snapshot(barrier, snapshot);
    }

    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.output.next.checkpoint_complete(checkpoint_id);
    }
}

/// The keyed state, event-time timers and watermark that keyed process and
/// co-process functions run against, and the one way to call them with a
/// key in scope.
pub(crate) struct KeyedRuntime<K> {
    store: KeyedStateStore<K>,
    timers: TimerService<K, ()>,
    watermark: Timestamp,
}

impl<K: Key> KeyedRuntime<K> {
    /// A subtask's keyed runtime; `open` registers the function's state,
    /// which then gets what the task restores.
    pub(crate) fn new(
        context: &OperatorContext,
        open: impl FnOnce(&mut KeyedStateStore<K>),
    ) -> Self {
        let mut store = KeyedStateStore::new(context.key_groups, context.max_parallelism);
        open(&mut store);
        let mut timers = TimerService::new(true);
        if let Some(restored) = context.take_restored() {
            store
                .restore(&restored.key_groups, |_, reader| {
                    timers.restore_group(reader)
                })
                .unwrap_or_else(|error| context.restore_failed(&error));
        }
        KeyedRuntime {
            store,
            timers,
            watermark: MIN_WATERMARK,
        }
    }

    /// Captures keyed state (copy-on-write) and timers.
    fn capture(&self, context: &OperatorContext) -> OperatorCapture {
        let timers = self
            .timers
            .encode_by_group(&self.store)
            .expect("encoding timers into memory");
        context.capture(Some(self.store.capture(timers)), Vec::new())
    }

    /// Runs `call` with `key` in scope; what it emits is stamped `timestamp`.
    fn call<O>(
        &mut self,
        key: &K,
        timestamp: Timestamp,
        next: &mut dyn Output<O>,
        call: impl FnOnce(&mut KeyedContext<'_, K>, &mut dyn Collector<O>),
    ) {
        let group_index = self.store.group_index(key);
        let mut context = KeyedContext {
            key,
            group_index,
            timestamp,
            watermark: self.watermark,
            store: &mut self.store,
            timers: &mut self.timers,
        };
        let mut out = TimestampedCollector {
            output: next,
            timestamp,
        };
        call(&mut context, &mut out);
    }

    /// Advances event time: fires every timer due, then forwards the
    /// watermark.
    fn advance<O>(
        &mut self,
        watermark: Timestamp,
        next: &mut dyn Output<O>,
        mut on_timer: impl FnMut(Timestamp, &mut KeyedContext<'_, K>, &mut dyn Collector<O>),
    ) {
        self.watermark = watermark;
        while let Some((timestamp, key, ())) = self.timers.pop_ready(watermark) {
            self.call(&key, timestamp, next, |context, out| {
                on_timer(timestamp, context, out)
            });
        }
        next.watermark(watermark);
    }
}

/// Runs a [`KeyedProcessFunction`].
pub(crate) struct KeyedProcessOperator<K, I, O, F> {
    pub(crate) context: OperatorContext,
    pub(crate) key_selector: Arc<dyn Fn(&I) -> K + Send + Sync>,
    pub(crate) function: F,
    pub(crate) runtime: KeyedRuntime<K>,
    pub(crate) next: Box<dyn Output<O>>,
}

impl<K: Key, I, O, F: KeyedProcessFunction<K, I, O>> KeyedProcessOperator<K, I, O, F> {
    pub(crate) fn new(
        key_selector: Arc<dyn Fn(&I) -> K + Send + Sync>,
        mut function: F,
        context: &OperatorContext,
        next: Box<dyn Output<O>>,
    ) -> Self {
        let runtime = KeyedRuntime::new(context, |store| function.open(store));
        KeyedProcessOperator {
            context: context.clone(),
            key_selector,
            function,
            runtime,
            next,
        }
    }
}

impl<K: Key, I, O, F: KeyedProcessFunction<K, I, O>> Output<I>
    for KeyedProcessOperator<K, I, O, F>
{
    fn push(&mut self, record: I, timestamp: Timestamp) {
        let key = (self.key_selector)(&record);
        let function = &mut self.function;
        self.runtime
            .call(&key, timestamp, &mut *self.next, |context, out| {
                function.process_element(record, context, out)
            });
    }

    fn watermark(&mut self, watermark: Timestamp) {
        let function = &mut self.function;
        self.runtime
            .advance(watermark, &mut *self.next, |timestamp, context, out| {
                function.on_timer(timestamp, context, out)
            });
    }

    fn idle(&mut self, idle: bool) {
        self.next.idle(idle);
    }
    fn flush(&mut self) {
        self.next.flush();
    }
    fn end_of_input(&mut self) {
        self.next.end_of_input();
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        snapshot.add(self.runtime.capture(&self.context));
        self.next.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.next.checkpoint_complete(checkpoint_id);
    }
}

/// Runs a [`KeyedCoProcessFunction`] as the head of a two-input task.
pub(crate) struct KeyedCoProcessOperator<K, I1, I2, O, F, S1, S2> {
    pub(crate) context: OperatorContext,
    /// The key selectors, each of its own type: called inlined.
    pub(crate) key_selector1: Arc<S1>,
    pub(crate) key_selector2: Arc<S2>,
    pub(crate) _inputs: PhantomData<fn(&I1, &I2)>,
    pub(crate) function: F,
    pub(crate) runtime: KeyedRuntime<K>,
    pub(crate) next: Box<dyn Output<O>>,
}

impl<K, I1, I2, O, F, S1, S2> TwoInputOperator<I1, I2>
    for KeyedCoProcessOperator<K, I1, I2, O, F, S1, S2>
where
    K: Key,
    F: KeyedCoProcessFunction<K, I1, I2, O>,
    S1: Fn(&I1) -> K,
    S2: Fn(&I2) -> K,
{
    fn push_batch1(&mut self, batch: &mut Vec<StreamRecord<I1>>) {
        let (runtime, function, next) = (&mut self.runtime, &mut self.function, &mut self.next);
        let selector = &*self.key_selector1;
        for StreamRecord { timestamp, value } in batch.drain(..) {
            runtime.call(&selector(&value), timestamp, &mut **next, |context, out| {
                function.process_element1(value, context, out)
            });
        }
    }

    fn push_batch2(&mut self, batch: &mut Vec<StreamRecord<I2>>) {
        let (runtime, function, next) = (&mut self.runtime, &mut self.function, &mut self.next);
        let selector = &*self.key_selector2;
        for StreamRecord { timestamp, value } in batch.drain(..) {
            runtime.call(&selector(&value), timestamp, &mut **next, |context, out| {
                function.process_element2(value, context, out)
            });
        }
    }

    fn watermark(&mut self, watermark: Timestamp) {
        let function = &mut self.function;
        self.runtime
            .advance(watermark, &mut *self.next, |timestamp, context, out| {
                function.on_timer(timestamp, context, out)
            });
    }

    fn idle(&mut self, idle: bool) {
        self.next.idle(idle);
    }
    fn flush(&mut self) {
        self.next.flush();
    }
    fn end_of_input(&mut self) {
        self.next.end_of_input();
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        snapshot.add(self.runtime.capture(&self.context));
        self.next.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.next.checkpoint_complete(checkpoint_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the size of every batch it is handed, and the records.
    #[derive(Default)]
    struct Batches {
        sizes: Rc<RefCell<Vec<usize>>>,
        records: Rc<RefCell<Vec<(u64, Timestamp)>>>,
    }

    impl Output<u64> for Batches {
        fn push(&mut self, record: u64, timestamp: Timestamp) {
            self.sizes.borrow_mut().push(1);
            self.records.borrow_mut().push((record, timestamp));
        }
        fn push_batch(&mut self, batch: &mut Vec<StreamRecord<u64>>) {
            self.sizes.borrow_mut().push(batch.len());
            self.records.borrow_mut().extend(
                batch
                    .drain(..)
                    .map(|record| (record.value, record.timestamp)),
            );
        }
        ignore_control!();
    }

    /// What a two-input operator was handed, in order.
    #[derive(Default)]
    struct Calls(Rc<RefCell<Vec<String>>>);

    impl TwoInputOperator<u64, String> for Calls {
        fn push_batch1(&mut self, batch: &mut Vec<StreamRecord<u64>>) {
            for record in batch.drain(..) {
                self.0.borrow_mut().push(format!("1:{}", record.value));
            }
        }
        fn push_batch2(&mut self, batch: &mut Vec<StreamRecord<String>>) {
            for record in batch.drain(..) {
                self.0.borrow_mut().push(format!("2:{}", record.value));
            }
        }
        fn watermark(&mut self, watermark: Timestamp) {
            self.0.borrow_mut().push(format!("watermark {watermark}"));
        }
        fn idle(&mut self, idle: bool) {
            self.0.borrow_mut().push(format!("idle {idle}"));
        }
        fn flush(&mut self) {}
        fn end_of_input(&mut self) {
            self.0.borrow_mut().push("end".to_string());
        }
        fn snapshot(&mut self, barrier: &CheckpointBarrier, _snapshot: &mut TaskSnapshot) {
            let id = barrier.checkpoint_id;
            self.0.borrow_mut().push(format!("snapshot {id}"));
        }
        fn checkpoint_complete(&mut self, checkpoint_id: u64) {
            self.0
                .borrow_mut()
                .push(format!("complete {checkpoint_id}"));
        }
    }

    /// A writer whose channel leads to a task of its own slot hands its
    /// records over as they are, in order, with their timestamps; the
    /// consumer's head takes them, and the vector given back is the one
    /// the writer fills next. A consumer of another type gets an error
    /// naming its type. The other channel of the writer still gets bytes.
    #[test]
    fn records_for_a_task_of_the_same_slot_are_handed_over_as_they_are() {
        let queue: OutputQueue = Rc::default();
        queue.set_local_channels(vec![false, true]);
        let mut writer =
            RecordWriter::<u64>::new(ChannelSelector::Rebalance { next: 0 }, 0, 2, queue.clone());
        for value in 0..6u64 {
            writer.push(value, 100 + value as Timestamp);
        }
        writer.flush();
        let (first, second) = (queue.pop().unwrap(), queue.pop().unwrap());
        assert!(queue.pop().is_none());
        assert!(matches!(first, (0, StreamElement::Records(_))));
        let (1, StreamElement::Local(mut local)) = second else {
            panic!("channel 1 leads to the same slot: {second:?}");
        };
        assert_eq!(local.count(), 3);
        let sink = Batches::default();
        let records = sink.records.clone();
        let mut head = DecodingHead {
            next: Box::new(sink),
            batch: Vec::new(),
        };
        head.on_local(0, &mut local).unwrap();
        assert_eq!(*records.borrow(), [(1, 101), (3, 103), (5, 105)]);
        let address = local.records_mut::<u64>().unwrap().as_ptr();
        // A head of another record type refuses them.
        let mut strings = DecodingHead::<String> {
            next: Box::new(Discard),
            batch: Vec::new(),
        };
        let error = strings.on_local(0, &mut local).unwrap_err();
        assert!(error.contains("String"), "{error}");
        // Given back, the vector becomes the writer's next one to fill (it
        // swaps its full vector for the spare): the two go round.
        let mut handed = vec![address];
        for round in 0..2u64 {
            queue.add_local_spare(1, local.into_spare());
            assert_eq!(queue.local_spares.borrow().len(), 1);
            writer.push(6 + 2 * round, 106);
            writer.push(7 + 2 * round, 107);
            writer.flush();
            assert!(
                queue.local_spares.borrow().is_empty(),
                "the spare was taken"
            );
            queue.pop().unwrap();
            let Some((1, StreamElement::Local(next))) = queue.pop() else {
                panic!("no records for the same slot");
            };
            local = next;
            assert_eq!(local.count(), 1);
            handed.push(local.records_mut::<u64>().unwrap().as_ptr());
        }
        assert_ne!(handed[0], handed[1]);
        assert_eq!(handed[0], handed[2]);
    }

    #[test]
    fn a_junction_combines_its_two_inputs_as_a_task_combines_its_channels() {
        let calls = Calls::default();
        let seen = calls.0.clone();
        let (mut first, mut second) = Junction::inputs::<u64, String>(calls);
        first.push(7, 1);
        second.push("x".to_string(), 2);
        // Event time goes by the slower input.
        first.watermark(10);
        second.watermark(5);
        second.watermark(20);
        // An idle input does not hold the other back; both idle, the
        // operator is.
        first.idle(true);
        second.watermark(30);
        second.idle(true);
        second.idle(false);
        // A barrier, and its completion, reach it through both inputs:
        // once each.
        let barrier = CheckpointBarrier {
            checkpoint_id: 3,
            timestamp_ms: 0,
            target: Arc::new(std::path::PathBuf::new()),
            is_savepoint: false,
        };
        let mut snapshot = TaskSnapshot::default();
        first.snapshot(&barrier, &mut snapshot);
        // What the other input's operators emit before the barrier comes
        // through it is in the snapshot.
        second.push("y".to_string(), 40);
        second.snapshot(&barrier, &mut snapshot);
        second.checkpoint_complete(3);
        first.checkpoint_complete(3);
        // The end, once both inputs have ended.
        first.end_of_input();
        first.end_of_input();
        second.end_of_input();
        assert_eq!(
            *seen.borrow(),
            [
                "1:7",
                "2:x",
                "watermark 5",
                "watermark 10",
                "watermark 20",
                "watermark 30",
                "idle true",
                "idle false",
                "2:y",
                "snapshot 3",
                "complete 3",
                "end",
            ]
        );
    }

    #[test]
    // `u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
    #[allow(clippy::manual_is_multiple_of)]
    fn a_batch_goes_through_map_filter_and_flat_map_in_order_in_batches_of_the_usual_size() {
        let sink = Batches::default();
        let (sizes, records) = (sink.sizes.clone(), sink.records.clone());
        // Each record becomes ten, so one batch in is ten batches' worth out.
        let flat_map = FlatMapOperator::new(
            Arc::new(|value: u64, out: &mut dyn Collector<u64>| {
                for copy in 0..10 {
                    out.collect(value * 10 + copy);
                }
            }),
            Box::new(sink),
        );
        let filter = FilterOperator {
            function: Arc::new(|value: &u64| value % 3 != 0),
            next: Box::new(flat_map),
        };
        let mut map = MapOperator::new(Arc::new(|value: u64| value + 1), Box::new(filter));
        let mut batch: Vec<StreamRecord<u64>> = (0..CHAIN_BATCH_RECORDS as u64)
            .map(|value| StreamRecord {
                timestamp: value as Timestamp * 2,
                value,
            })
            .collect();
        map.push_batch(&mut batch);
        assert!(batch.is_empty(), "the caller's batch is left empty");

        let expected: Vec<(u64, Timestamp)> = (0..CHAIN_BATCH_RECORDS as u64)
            .filter(|value| (value + 1) % 3 != 0)
            .flat_map(|value| (0..10).map(move |copy| ((value + 1) * 10 + copy, value as i64 * 2)))
            .collect();
        assert_eq!(*records.borrow(), expected);
        let sizes = sizes.borrow();
        assert!(
            sizes.iter().all(|size| *size <= CHAIN_BATCH_RECORDS + 9),
            "batches of at most about {CHAIN_BATCH_RECORDS} records: {sizes:?}"
        );
        assert!(sizes.len() > 1, "{sizes:?}");
    }

    #[test]
    #[allow(clippy::manual_is_multiple_of)]
    fn a_fan_out_hands_every_output_the_whole_batch_whether_it_copies_as_it_reads_or_not() {
        // Map, filter and flat map copy each record as they read it; a
        // sink takes a copy made for it; the last output takes the batch.
        let sinks: Vec<Batches> = (0..5).map(|_| Batches::default()).collect();
        let records: Vec<_> = sinks.iter().map(|sink| sink.records.clone()).collect();
        let mut sinks = sinks.into_iter();
        let mut next = || Box::new(sinks.next().expect("five sinks"));
        let outputs: Vec<Box<dyn Output<u64>>> = vec![
            Box::new(MapOperator::new(Arc::new(|value: u64| value + 1), next())),
            Box::new(FilterOperator {
                function: Arc::new(|value: &u64| value % 2 == 1),
                next: next(),
            }),
            Box::new(FlatMapOperator::new(
                Arc::new(|value: u64, out: &mut dyn Collector<u64>| {
                    out.collect(value);
                    out.collect(value * 100);
                }),
                next(),
            )),
            next(),
            Box::new(MapOperator::new(Arc::new(|value: u64| value * 2), next())),
        ];
        let mut fan_out = FanOut {
            outputs,
            copy: Vec::new(),
        };
        for round in 0..2u64 {
            let mut batch: Vec<StreamRecord<u64>> = (0..10)
                .map(|value| StreamRecord {
                    timestamp: value as Timestamp,
                    value: round * 10 + value,
                })
                .collect();
            fan_out.push_batch(&mut batch);
            assert!(fan_out.copy.is_empty(), "the scratch copy is left empty");
        }
        let inputs: Vec<(u64, Timestamp)> =
            (0..20).map(|value| (value, value as i64 % 10)).collect();
        let expected: [Vec<(u64, Timestamp)>; 5] = [
            inputs.iter().map(|&(value, at)| (value + 1, at)).collect(),
            inputs
                .iter()
                .copied()
                .filter(|(value, _)| value % 2 == 1)
                .collect(),
            inputs
                .iter()
                .flat_map(|&(value, at)| [(value, at), (value * 100, at)])
                .collect(),
            inputs.clone(),
            inputs.iter().map(|&(value, at)| (value * 2, at)).collect(),
        ];
        for (output, (got, expected)) in records.iter().zip(expected).enumerate() {
            assert_eq!(*got.borrow(), expected, "output {output}");
        }
    }

    #[test]
    fn map_and_flat_map_behind_a_fan_out_copy_each_record_as_they_read_it_not_the_batch() {
        // A flat map that emits more than a batch per record, tracked as a
        // chained operator is, and a map: neither needs the batch copied
        // whole, so the fan-out's scratch never holds a record.
        let (map_sink, flat_sink, last_sink) =
            (Batches::default(), Batches::default(), Batches::default());
        let (mapped, flat, last) = (
            map_sink.records.clone(),
            flat_sink.records.clone(),
            last_sink.records.clone(),
        );
        let flat_sizes = flat_sink.sizes.clone();
        let tracker = Rc::new(Cell::new(7));
        let flat_map = Tracked {
            index: 1,
            tracker: tracker.clone(),
            inner: FlatMapOperator::new(
                Arc::new(|value: u64, out: &mut dyn Collector<u64>| {
                    for copy in 0..CHAIN_BATCH_RECORDS as u64 + 44 {
                        out.collect(value * 1_000 + copy);
                    }
                }),
                Box::new(flat_sink),
            ),
            _input: PhantomData,
        };
        let mut fan_out = FanOut {
            outputs: vec![
                Box::new(flat_map),
                Box::new(MapOperator::new(
                    Arc::new(|value: u64| value + 1),
                    Box::new(map_sink),
                )),
                Box::new(last_sink),
            ],
            copy: Vec::new(),
        };
        let mut batch: Vec<StreamRecord<u64>> = (0..3)
            .map(|value| StreamRecord {
                timestamp: value as Timestamp,
                value,
            })
            .collect();
        fan_out.push_batch(&mut batch);
        assert_eq!(
            fan_out.copy.capacity(),
            0,
            "no output had the batch copied whole"
        );
        assert_eq!(tracker.get(), 7, "the tracker is restored");
        assert_eq!(*last.borrow(), vec![(0, 0), (1, 1), (2, 2)]);
        assert_eq!(*mapped.borrow(), vec![(1, 0), (2, 1), (3, 2)]);
        let expected: Vec<(u64, Timestamp)> = (0..3u64)
            .flat_map(|value| {
                (0..CHAIN_BATCH_RECORDS as u64 + 44)
                    .map(move |copy| (value * 1_000 + copy, value as i64))
            })
            .collect();
        assert_eq!(*flat.borrow(), expected);
        assert!(
            flat_sizes
                .borrow()
                .iter()
                .all(|size| *size <= CHAIN_BATCH_RECORDS),
            "{:?}",
            flat_sizes.borrow()
        );
    }
}
