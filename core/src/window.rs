//! Event-time windows: assigners, window functions, the window operator and
//! the window join.
//!
//! Protocol of the window operator, per record with timestamp `ts`:
//! 1. the assigner gives the windows that hold `ts`;
//! 2. a window is late when `window.max_timestamp() + allowed_lateness <=
//!    watermark`; a late window drops the record (allowed lateness is 0 by
//!    default, as in Flink); a session window is judged once merged with
//!    the sessions it touches;
//! 3. the record is added to the window's accumulator in keyed state; a new
//!    `(key, window)` registers one timer at `window.max_timestamp()` (and,
//!    with allowed lateness, one for clean-up at `max_timestamp() +
//!    lateness`); a window the watermark has already passed (late, within
//!    the allowed lateness) gets no firing timer: it fires at once instead;
//! 4. session windows first merge every window of the key that overlaps the
//!    new one, moving their accumulators and timers to the merged window;
//! 5. when the watermark reaches a window's timer the window fires: its
//!    result is emitted with timestamp `window.max_timestamp()`, and its state
//!    is removed when the clean-up time is reached.
//!
//! Every window of a finite input fires, because the input ends with the
//! watermark `MAX_WATERMARK`.

use hashbrown::hash_map::RawEntryMut;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use crate::function::{Collector, TimestampedCollector};
use crate::key::Key;
use crate::operator::{OperatorContext, Output, ShippingCollector, TwoInputOperator};
use crate::record::Record;
use crate::record::StreamRecord;
use crate::snapshot::{CheckpointBarrier, StateReader, StateWriter, TaskSnapshot};
use crate::state::{KeyedStateStore, TimerService, ValueCodec};
use crate::time::{Timestamp, MIN_WATERMARK, NO_TIMESTAMP};

/// A window of event time `[start, end)`.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    rkyv::Archive,
    rkyv::Serialize,
    rkyv::Deserialize,
)]
pub struct TimeWindow {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl TimeWindow {
    /// The largest timestamp that belongs to the window.
    pub fn max_timestamp(&self) -> Timestamp {
        self.end - 1
    }

    fn intersects(&self, other: &TimeWindow) -> bool {
        self.start <= other.end && self.end >= other.start
    }

    fn cover(&self, other: &TimeWindow) -> TimeWindow {
        TimeWindow {
            start: self.start.min(other.start),
            end: self.end.max(other.end),
        }
    }
}

/// Which windows a record belongs to, as Flink's event-time window assigners.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowAssigner {
    Tumbling { size: i64, offset: i64 },
    Sliding { size: i64, slide: i64, offset: i64 },
    Session { gap: i64 },
}

/// The start of the window of `size` (on the grid shifted by `offset`)
/// that holds `timestamp`: Flink's `TimeWindow.getWindowStartWithOffset`.
/// Tumbling windows, slides and panes all start on such a grid.
#[inline]
fn window_start(timestamp: Timestamp, offset: i64, size: i64) -> Timestamp {
    timestamp - (timestamp - offset).rem_euclid(size)
}

fn milliseconds(duration: Duration) -> i64 {
    let value = duration.as_millis() as i64;
    assert!(
        value > 0,
        "a window size, slide or gap must be at least 1 ms"
    );
    value
}

impl WindowAssigner {
    /// `TumblingEventTimeWindows.of(size)`.
    pub fn tumbling(size: Duration) -> Self {
        WindowAssigner::Tumbling {
            size: milliseconds(size),
            offset: 0,
        }
    }

    /// `SlidingEventTimeWindows.of(size, slide)`.
    pub fn sliding(size: Duration, slide: Duration) -> Self {
        WindowAssigner::Sliding {
            size: milliseconds(size),
            slide: milliseconds(slide),
            offset: 0,
        }
    }

    /// `EventTimeSessionWindows.withGap(gap)`.
    pub fn session(gap: Duration) -> Self {
        WindowAssigner::Session {
            gap: milliseconds(gap),
        }
    }

    pub fn is_merging(&self) -> bool {
        matches!(self, WindowAssigner::Session { .. })
    }

    /// Appends the windows that hold `timestamp` to `windows`.
    pub fn assign(&self, timestamp: Timestamp, windows: &mut Vec<TimeWindow>) {
        match *self {
            WindowAssigner::Tumbling { size, offset } => {
                let start = window_start(timestamp, offset, size);
                windows.push(TimeWindow {
                    start,
                    end: start + size,
                });
            }
            WindowAssigner::Sliding {
                size,
                slide,
                offset,
            } => {
                let last_start = window_start(timestamp, offset, slide);
                let mut start = last_start;
                while start > timestamp - size {
                    windows.push(TimeWindow {
                        start,
                        end: start + size,
                    });
                    start -= slide;
                }
            }
            WindowAssigner::Session { gap } => {
                windows.push(TimeWindow {
                    start: timestamp,
                    end: timestamp + gap,
                });
            }
        }
    }
}

/// Incremental aggregation of a window, as Flink's `AggregateFunction`.
pub trait AggregateFunction<I, A, R>: Clone + Send + Sync + 'static {
    fn create_accumulator(&self) -> A;
    fn add(&self, value: I, accumulator: &mut A);
    /// Adds a value read in place, which the caller keeps (as Flink's
    /// `add` is handed a reference): by default [`add`](Self::add) of a
    /// clone. An aggregate that keeps few of its values (a maximum, the
    /// top rows) overrides it to clone only those it keeps.
    #[inline]
    fn add_ref(&self, value: &I, accumulator: &mut A)
    where
        I: Clone,
    {
        self.add(value.clone(), accumulator);
    }
    fn get_result(&self, accumulator: A) -> R;
    /// Merges two accumulators (session windows).
    fn merge(&self, first: A, second: A) -> A;
}

/// A window aggregate's partial result for one key and one pane, as the
/// local phase of a two-phase aggregation ships it to the global phase.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct WindowPartial<K, A> {
    pub key: K,
    pub accumulator: A,
}

impl WindowAssigner {
    /// The tumbling "panes" (Flink SQL's slices) whose unions are this
    /// assigner's windows, as `(size, offset)`: a tumbling window is its own
    /// pane; a sliding window whose size is a multiple of its slide is the
    /// union of `size / slide` panes of one slide. Every window holding a
    /// pane's last millisecond holds the whole pane, and only those windows
    /// hold any of it. `None` for sessions and for sliding windows whose
    /// size is not a multiple of the slide.
    pub(crate) fn window_size(&self) -> i64 {
        match *self {
            WindowAssigner::Tumbling { size, .. } | WindowAssigner::Sliding { size, .. } => size,
            WindowAssigner::Session { gap } => gap,
        }
    }

    pub(crate) fn panes(&self) -> Option<(i64, i64)> {
        match *self {
            WindowAssigner::Tumbling { size, offset } => Some((size, offset)),
            WindowAssigner::Sliding {
                size,
                slide,
                offset,
            } if size % slide == 0 => Some((slide, offset)),
            _ => None,
        }
    }
}

/// Most `(key, pane)` accumulators the local phase holds before it ships
/// them all early (Flink's mini-batch size): bounds its memory whatever
/// the number of keys.
pub(crate) const LOCAL_AGGREGATION_MAX_ENTRIES: usize = 1 << 16;

/// The local phase of a two-phase window aggregation (Flink SQL's
/// local-global aggregation over slices): chained before the shuffle, it
/// adds each record to its key's accumulator of the record's pane, and
/// ships one [`WindowPartial`] per key and pane, stamped with the pane's
/// last millisecond, when the watermark passes the pane. The global phase,
/// after the shuffle, merges the partials into its windows as the window
/// operator would have added the records. So a shuffle carries one record
/// per key and pane instead of one per input record.
///
/// It keeps no state across checkpoints: a barrier first ships every
/// accumulator (Flink's `prepareSnapshotPreBarrier`), so what a checkpoint
/// covers is in the global phase's state. It ships early too when it holds
/// [`LOCAL_AGGREGATION_MAX_ENTRIES`], and a record for a pane the watermark
/// has passed goes out at once, for the global phase to judge as late or
/// not, as it would judge the record itself.
pub(crate) struct LocalWindowAggregate<K, I, A, R, F, S> {
    /// The key selector, of its own type: called inlined.
    pub(crate) key_selector: Arc<S>,
    pub(crate) aggregate: F,
    /// Pane size and offset (see [`WindowAssigner::panes`]).
    pub(crate) pane_size: i64,
    pub(crate) pane_offset: i64,
    /// Open panes, each with its keys' accumulators, in ascending start
    /// order (a handful: the watermark ships the old ones).
    pub(crate) panes: Vec<(i64, rustc_hash::FxHashMap<K, A>)>,
    /// The pane of the previous record, `[start, end)`, and its index in
    /// `panes`: most records fall in the same pane as the one before.
    pub(crate) current: (i64, i64, usize),
    /// Emptied pane maps, kept for their capacity.
    pub(crate) spare: Vec<rustc_hash::FxHashMap<K, A>>,
    pub(crate) entries: usize,
    pub(crate) watermark: Timestamp,
    /// Scratch: partials shipped, handed on a batch at a time.
    pub(crate) shipped: Vec<StreamRecord<WindowPartial<K, A>>>,
    pub(crate) next: Box<dyn Output<WindowPartial<K, A>>>,
    pub(crate) operator_name: String,
    pub(crate) _types: PhantomData<fn(&I) -> R>,
}

impl<K, I, A, R, F, S> LocalWindowAggregate<K, I, A, R, F, S> {
    pub(crate) fn new(
        key_selector: Arc<S>,
        aggregate: F,
        (pane_size, pane_offset): (i64, i64),
        operator_name: String,
        next: Box<dyn Output<WindowPartial<K, A>>>,
    ) -> Self {
        LocalWindowAggregate {
            key_selector,
            aggregate,
            pane_size,
            pane_offset,
            panes: Vec::new(),
            current: (0, 0, 0),
            spare: Vec::new(),
            entries: 0,
            watermark: MIN_WATERMARK,
            shipped: Vec::new(),
            next,
            operator_name,
            _types: PhantomData,
        }
    }

    /// Ships every pane that ends at or before `watermark` (all of them
    /// for `Timestamp::MAX`).
    fn ship_through(&mut self, watermark: Timestamp) {
        let shipped = self
            .panes
            .iter()
            .take_while(|(start, _)| start.saturating_add(self.pane_size - 1) <= watermark)
            .count();
        if shipped == 0 {
            return;
        }
        for (start, mut pane) in self.panes.drain(..shipped) {
            let mut out = ShippingCollector {
                output: &mut *self.next,
                batch: &mut self.shipped,
                timestamp: start.saturating_add(self.pane_size - 1),
            };
            self.entries -= pane.len();
            for (key, accumulator) in pane.drain() {
                out.collect(WindowPartial { key, accumulator });
            }
            drop(out);
            self.spare.push(pane);
        }
        // The cached pane may be one shipped, and the indices moved:
        // judge the next record's pane afresh.
        self.current = (0, 0, 0);
    }
}

impl<K, I, A, R, F, S> LocalWindowAggregate<K, I, A, R, F, S>
where
    K: Key,
    I: Clone,
    F: AggregateFunction<I, A, R>,
    S: Fn(&I) -> K,
{
    /// The index in `panes` of the pane of `timestamp`, opened if need be;
    /// when the watermark has passed that pane, its last millisecond.
    #[inline]
    fn pane_of(&mut self, timestamp: Timestamp) -> Result<usize, Timestamp> {
        let (start, end, index) = self.current;
        // The cached pane never starts at NO_TIMESTAMP (below), so a
        // record without a timestamp always reaches the check below.
        if timestamp >= start && timestamp < end {
            return Ok(index);
        }
        assert!(
            timestamp != NO_TIMESTAMP,
            "window operator '{}' received a record without a timestamp: give the source a WatermarkStrategy with a timestamp assigner",
            self.operator_name
        );
        let start = window_start(timestamp, self.pane_offset, self.pane_size);
        let end = start + self.pane_size;
        if end - 1 <= self.watermark {
            return Err(end - 1);
        }
        let index = match self
            .panes
            .iter()
            .rposition(|(existing, _)| *existing <= start)
        {
            Some(found) if self.panes[found].0 == start => found,
            found => {
                let at = found.map_or(0, |found| found + 1);
                let spare = self.spare.pop().unwrap_or_default();
                self.panes.insert(at, (start, spare));
                at
            }
        };
        if start != NO_TIMESTAMP {
            self.current = (start, end, index);
        }
        Ok(index)
    }

    /// Adds `records` a run at a time: records one after another with the
    /// same key in the same pane (all of a pane's records when the key is
    /// the window, as q7's) go to one accumulator found once. The records
    /// are read in place and added by reference
    /// ([`AggregateFunction::add_ref`]: cloned only if the aggregate keeps
    /// them): moving each out of the batch first costs a copy through the
    /// stack that the next load stalls on.
    #[inline]
    fn add_records(&mut self, records: &[StreamRecord<I>]) {
        // The selector out of `self`, once per batch: a plain call through
        // a local reference, not reloaded behind `&mut self` per record.
        let key_selector = self.key_selector.clone();
        let key_selector = &*key_selector;
        let mut records = records.iter().peekable();
        while let Some(record) = records.next() {
            let index = match self.pane_of(record.timestamp) {
                Ok(index) => index,
                Err(last) => {
                    // Late here: ship it alone, for the global phase to judge.
                    let mut accumulator = self.aggregate.create_accumulator();
                    self.aggregate.add_ref(&record.value, &mut accumulator);
                    let key = key_selector(&record.value);
                    self.next.push(WindowPartial { key, accumulator }, last);
                    continue;
                }
            };
            // The records from this one on that fall in its pane, with the
            // pane's bounds and map in locals: per record, a time check, a
            // key, and a lookup only when the key is not the one before
            // (a run of one key, as q7's, finds its accumulator once).
            let (start, end, _) = self.current;
            let aggregate = &self.aggregate;
            let pane = &mut self.panes[index].1;
            let entries_before = pane.len();
            let mut key = key_selector(&record.value);
            let mut accumulator = pane
                .entry(key.clone())
                .or_insert_with(|| aggregate.create_accumulator());
            aggregate.add_ref(&record.value, accumulator);
            while let Some(next) =
                records.next_if(|next| start <= next.timestamp && next.timestamp < end)
            {
                let key_of_next = key_selector(&next.value);
                if key_of_next != key {
                    key = key_of_next;
                    accumulator = pane
                        .entry(key.clone())
                        .or_insert_with(|| aggregate.create_accumulator());
                }
                aggregate.add_ref(&next.value, accumulator);
            }
            self.entries += pane.len() - entries_before;
            if self.entries >= LOCAL_AGGREGATION_MAX_ENTRIES {
                self.ship_through(Timestamp::MAX);
            }
        }
    }
}

impl<K, I, A, R, F, S> Output<I> for LocalWindowAggregate<K, I, A, R, F, S>
where
    K: Key,
    I: Clone,
    F: AggregateFunction<I, A, R>,
    S: Fn(&I) -> K,
{
    #[inline]
    fn push(&mut self, record: I, timestamp: Timestamp) {
        self.add_records(std::slice::from_ref(&StreamRecord {
            value: record,
            timestamp,
        }));
    }

    fn push_batch(&mut self, records: &mut Vec<StreamRecord<I>>) {
        self.add_records(records);
        records.clear();
    }

    fn watermark(&mut self, watermark: Timestamp) {
        self.watermark = watermark;
        self.ship_through(watermark);
        self.next.watermark(watermark);
    }
    fn idle(&mut self, idle: bool) {
        if idle {
            // An idle input no longer holds the global phase's watermark
            // back, so what it holds must be there first, as the records
            // themselves would be.
            self.ship_through(Timestamp::MAX);
        }
        self.next.idle(idle);
    }
    fn flush(&mut self) {
        // Holding partials until their pane ends is the point; a flush
        // ships only what is already downstream of here.
        self.next.flush();
    }
    fn end_of_input(&mut self) {
        self.ship_through(Timestamp::MAX);
        self.next.end_of_input();
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, snapshot: &mut TaskSnapshot) {
        self.ship_through(Timestamp::MAX);
        self.next.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.next.checkpoint_complete(checkpoint_id);
    }
}

/// A key's panes in the global phase of a two-phase window aggregation.
#[derive(Clone)]
pub(crate) struct KeyPanes<A> {
    /// Every window of this key that ends at or before this has fired
    /// (so that windows fired before a checkpoint do not fire again after
    /// a restore).
    fired_through: Timestamp,
    /// `(pane start, accumulator)`, in ascending start order.
    panes: smallvec::SmallVec<[(Timestamp, A); 2]>,
}

/// How a key's panes go into a checkpoint.
fn key_panes_codec<A: 'static>(accumulator: ValueCodec<A>) -> ValueCodec<KeyPanes<A>> {
    let write = accumulator.write.clone();
    let read = accumulator.read;
    ValueCodec::new(
        move |key_panes: &KeyPanes<A>, writer| {
            writer.put_i64(key_panes.fired_through);
            writer.put_u32(key_panes.panes.len() as u32);
            for (start, value) in &key_panes.panes {
                writer.put_i64(*start);
                write(value, writer)?;
            }
            Ok(())
        },
        move |reader| {
            let fired_through = reader.i64()?;
            let count = reader.u32()?;
            let panes = (0..count)
                .map(|_| Ok((reader.i64()?, read(reader)?)))
                .collect::<Result<_, String>>()?;
            Ok(KeyPanes {
                fired_through,
                panes,
            })
        },
    )
}

/// The name of the slicing window operator's state in snapshots.
const WINDOW_PANES_STATE: &str = "window-panes";

/// One pane of the slicing window operator, shared copy-on-write with the
/// snapshots taken of it (the first write after a snapshot copies the
/// pane, which is one slide's partials).
type Pane<K, A> = std::rc::Rc<PanePartials<K, A>>;

/// A pane's partials as they came, in one list for all key groups. A key
/// may be there more than once (a partial from each local subtask, or one
/// shipped early): firing merges a window's partials per key whatever
/// their panes, so adding a partial is an append, not a lookup, and the
/// key's group is found only when a snapshot or a restored operator needs
/// it.
#[derive(Clone)]
pub(crate) struct PanePartials<K, A> {
    partials: Vec<(K, A)>,
    /// No key is there twice (restored, or merged for a snapshot).
    distinct: bool,
}

impl<K, A> Default for PanePartials<K, A> {
    fn default() -> Self {
        PanePartials {
            partials: Vec::new(),
            distinct: true,
        }
    }
}

impl<K, A> PanePartials<K, A> {
    fn clear(&mut self) {
        self.partials.clear();
        self.distinct = true;
    }
}

/// Runs `$body` for each partial (`$key: &K`, `$accumulator: A`) of a
/// window's pane: moved out when no later window holds the pane
/// (`$last_use`) and no snapshot reads it, copied otherwise. A macro, not
/// a function taking a closure: called per partial, the closure was
/// compiled out of line (q5: 80M more instructions).
macro_rules! for_each_partial {
    ($pane:expr, $last_use:expr, |$key:ident, $accumulator:ident| $body:block) => {
        if let (true, Some(pane)) = ($last_use, std::rc::Rc::get_mut($pane)) {
            for (key, $accumulator) in pane.partials.drain(..) {
                let $key = &key;
                $body
            }
        } else {
            for ($key, accumulator) in &$pane.partials {
                let $accumulator = accumulator.clone();
                $body
            }
        }
    };
}

/// Adds a partial to `merged`, a window's results per key: merged with the
/// key's result so far, or inserted (`key` cloned only then).
#[inline]
fn merge_partial<K: Key, A, R, F: AggregateFunction<WindowPartial<K, A>, A, R>>(
    merged: &mut FxHashbrownMap<K, A>,
    aggregate: &F,
    key: &K,
    accumulator: A,
) {
    match merged.raw_entry_mut().from_key(key) {
        RawEntryMut::Occupied(mut sum) => {
            let sum = sum.get_mut();
            let current = std::mem::replace(sum, aggregate.create_accumulator());
            *sum = aggregate.merge(current, accumulator);
        }
        RawEntryMut::Vacant(entry) => {
            entry.insert(key.clone(), accumulator);
        }
    }
}

/// A hash map whose entry API looks a key up once and clones it only when
/// it inserts it.
type FxHashbrownMap<K, V> = hashbrown::HashMap<K, V, rustc_hash::FxBuildHasher>;

/// The global phase of a two-phase window aggregation without allowed
/// lateness (Flink SQL's slicing window aggregate). State is held per pane,
/// not per window: a partial is added once whatever the number of windows
/// holding its pane, and firing a window touches only the panes of that
/// window, however far ahead of the watermark other panes are. When the
/// watermark passes a window's end, its panes' partials are merged per key
/// (a single pane with each key once is emitted as it is), the results are
/// emitted, and the oldest pane, which no later window holds, is dropped.
/// No timers: the panes held and the watermark say what fires.
///
/// A pane keeps its partials as they come ([`PanePartials`]), so a key
/// with partials from several local subtasks (or shipped early, or late
/// at the local phase) is there more than once, and each window holding
/// the pane merges them all: with sliding windows and several upstream
/// subtasks, more merges per firing in exchange for no lookup per
/// partial. The Nexmark source deals blocks of event time to its
/// subtasks, so a pane's partials mostly come from one.
///
/// Snapshots are keyed state like any other operator's (by key group, so
/// a job restores at another parallelism): per key, its panes and the end
/// through which its windows have fired, so that a restored operator does
/// not fire them again.
pub(crate) struct SlicingWindowOperator<K, A, R, O, F, W> {
    pub(crate) aggregation: WindowAggregation<K, WindowPartial<K, A>, A, R, O, F, W>,
    pub(crate) size: i64,
    pub(crate) pane_size: i64,
    pub(crate) pane_offset: i64,
    /// Only for key groups and their keys' group indices.
    pub(crate) store: KeyedStateStore<K>,
    pub(crate) codec: ValueCodec<KeyPanes<A>>,
    /// Open panes, in ascending start order (a handful: firing drops the
    /// old ones).
    pub(crate) panes: Vec<(Timestamp, Pane<K, A>)>,
    /// The index in `panes` of the pane the last partials went to (checked
    /// before use: panes come and go): a local phase ships a pane's
    /// partials together.
    pub(crate) last_pane: usize,
    /// Per key group: every window ending at or before this has fired for
    /// its keys (restored; the minimum otherwise).
    pub(crate) group_fired_end: Vec<Timestamp>,
    /// Every window ending at or before this has fired (or was empty).
    pub(crate) fired_end: Timestamp,
    pub(crate) watermark: Timestamp,
    /// Scratch: one window's results per key, merged from its panes.
    pub(crate) merged: FxHashbrownMap<K, A>,
    /// Scratch: results emitted by a firing, handed on a batch at a time.
    pub(crate) emitted: Vec<StreamRecord<O>>,
    /// Emptied pane maps of dropped panes, kept for their capacity.
    pub(crate) spare: Vec<Pane<K, A>>,
    pub(crate) next: Box<dyn Output<O>>,
    pub(crate) operator_name: String,
    pub(crate) context: OperatorContext,
}

impl<K, A, R, O, F, W> SlicingWindowOperator<K, A, R, O, F, W>
where
    K: Key,
    A: Clone + 'static,
    F: AggregateFunction<WindowPartial<K, A>, A, R>,
    W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>),
{
    pub(crate) fn new(
        size: i64,
        (pane_size, pane_offset): (i64, i64),
        aggregation: WindowAggregation<K, WindowPartial<K, A>, A, R, O, F, W>,
        accumulator: ValueCodec<A>,
        context: &OperatorContext,
        next: Box<dyn Output<O>>,
    ) -> Self {
        let codec = key_panes_codec(accumulator);
        let mut store = KeyedStateStore::new(context.key_groups, context.max_parallelism);
        let group_count = context.key_groups.count();
        let mut operator = SlicingWindowOperator {
            aggregation,
            size,
            pane_size,
            pane_offset,
            store: KeyedStateStore::new(context.key_groups, context.max_parallelism),
            codec: codec.clone(),
            panes: Vec::new(),
            last_pane: 0,
            group_fired_end: vec![MIN_WATERMARK; group_count],
            fired_end: MIN_WATERMARK,
            watermark: MIN_WATERMARK,
            merged: Default::default(),
            emitted: Vec::new(),
            spare: Vec::new(),
            next,
            operator_name: context.operator_name.clone(),
            context: context.clone(),
        };
        if let Some(restored) = context.take_restored() {
            // Read the snapshot as the keyed state it is, then spread each
            // key's panes over the pane maps.
            let table = store.table_index::<KeyPanes<A>>(WINDOW_PANES_STATE, codec);
            store
                .restore_without_timers(&restored.key_groups)
                .unwrap_or_else(|error| context.restore_failed(&error));
            for (key, key_panes) in store.table::<KeyPanes<A>>(table).iter() {
                let group = operator.store.group_index(key);
                let fired = &mut operator.group_fired_end[group];
                *fired = (*fired).max(key_panes.fired_through);
                // A key is in one subtask's groups, once per pane: the
                // restored panes stay distinct.
                for (start, accumulator) in &key_panes.panes {
                    let at = operator.pane_at(*start);
                    std::rc::Rc::make_mut(&mut operator.panes[at].1)
                        .partials
                        .push((key.clone(), accumulator.clone()));
                }
            }
        }
        operator
    }

    /// The index in `panes` of the pane starting at `start`, opened if
    /// need be.
    #[inline]
    fn pane_at(&mut self, start: Timestamp) -> usize {
        let last = self.last_pane;
        if self.panes.get(last).is_some_and(|(held, _)| *held == start) {
            return last;
        }
        let at = match self.panes.binary_search_by_key(&start, |(held, _)| *held) {
            Ok(at) => at,
            Err(at) => {
                let pane = self.spare.pop().unwrap_or_default();
                self.panes.insert(at, (start, pane));
                at
            }
        };
        self.last_pane = at;
        at
    }

    /// The largest window end `e` (on the pane grid) with `e - 1 <= watermark`.
    fn last_end_through(&self, watermark: Timestamp) -> Timestamp {
        // In i128: the watermark is `MAX` at the end of the input, and the
        // offset may be negative.
        let bound = i128::from(watermark) + 1;
        let end =
            bound - (bound - i128::from(self.pane_offset)).rem_euclid(i128::from(self.pane_size));
        end.clamp(i128::from(Timestamp::MIN), i128::from(Timestamp::MAX)) as Timestamp
    }

    /// Adds partials to their panes, a run of one pane's partials (as a
    /// local phase ships them) at a time: one pane lookup and one
    /// copy-on-write check per run.
    #[inline]
    fn add_partials(
        &mut self,
        partials: &mut impl Iterator<Item = StreamRecord<WindowPartial<K, A>>>,
    ) {
        let mut partials = partials.peekable();
        while let Some(first) = partials.next() {
            let timestamp = first.timestamp;
            assert!(
                timestamp != NO_TIMESTAMP,
                "window operator '{}' received a record without a timestamp",
                self.operator_name
            );
            let pane_start = window_start(timestamp, self.pane_offset, self.pane_size);
            let pane_end = pane_start.saturating_add(self.pane_size);
            let in_pane = |partial: &StreamRecord<WindowPartial<K, A>>| {
                pane_start <= partial.timestamp && partial.timestamp < pane_end
            };
            if pane_start + self.size - 1 <= self.watermark {
                // Every window holding the pane is late: dropped, as the
                // records themselves would be.
                while partials.next_if(in_pane).is_some() {}
                continue;
            }
            let at = self.pane_at(pane_start);
            // Copied only when a snapshot still reads it.
            let pane = std::rc::Rc::make_mut(&mut self.panes[at].1);
            let aggregate = &self.aggregation.aggregate;
            // Each as `add` to a new accumulator would make it.
            let add = |partial: StreamRecord<WindowPartial<K, A>>| {
                let WindowPartial { key, accumulator } = partial.value;
                (
                    key,
                    aggregate.merge(aggregate.create_accumulator(), accumulator),
                )
            };
            pane.partials.push(add(first));
            while let Some(partial) = partials.next_if(in_pane) {
                pane.partials.push(add(partial));
            }
            pane.distinct = false;
        }
    }

    /// Merges the partials of each key in each pane into one, as a snapshot
    /// holds them: per key, one accumulator per pane.
    fn merge_panes(&mut self) {
        let aggregate = &self.aggregation.aggregate;
        for (_, pane) in &mut self.panes {
            if pane.distinct {
                continue;
            }
            let pane = std::rc::Rc::make_mut(pane);
            for (key, accumulator) in pane.partials.drain(..) {
                merge_partial(&mut self.merged, aggregate, &key, accumulator);
            }
            pane.partials.extend(self.merged.drain());
            pane.distinct = true;
        }
    }

    /// Fires the window ending at `end` for every key that holds a pane of
    /// it, and drops the oldest pane, which no later window holds.
    fn fire(&mut self, end: Timestamp) {
        let start = end - self.size;
        let next_start = start + self.pane_size;
        let window = TimeWindow { start, end };
        // A window's results go on in batches, as a source's records do:
        // the operator after this one (q5's top rows) takes a batch a run
        // at a time.
        let mut out = ShippingCollector {
            output: &mut *self.next,
            batch: &mut self.emitted,
            timestamp: window.max_timestamp(),
        };
        let aggregate = &self.aggregation.aggregate;
        let window_function = &self.aggregation.window_function;
        let group_fired_end = &self.group_fired_end;
        let store = &self.store;
        // Only a restored operator has groups whose windows fired before
        // the checkpoint: otherwise no key's group is looked up.
        let any_fired = group_fired_end.iter().any(|fired| *fired >= end);
        let skip = |key: &K| any_fired && group_fired_end[store.group_index(key)] >= end;
        // The indices of the window's panes (`panes` is in start order).
        let held: Vec<usize> = (0..self.panes.len())
            .filter(|&at| (start..end).contains(&self.panes[at].0))
            .collect();
        match held[..] {
            [only] if self.panes[only].1.distinct => {
                // One pane, each key once: emitted as it is.
                let (pane_start, pane) = &mut self.panes[only];
                for_each_partial!(pane, *pane_start < next_start, |key, accumulator| {
                    if !skip(key) {
                        let result = aggregate.get_result(accumulator);
                        window_function(key, &window, result, &mut out);
                    }
                });
            }
            _ => {
                let merged = &mut self.merged;
                for &at in &held {
                    let (pane_start, pane) = &mut self.panes[at];
                    for_each_partial!(pane, *pane_start < next_start, |key, accumulator| {
                        if !skip(key) {
                            merge_partial(merged, aggregate, key, accumulator);
                        }
                    });
                }
                for (key, accumulator) in merged.drain() {
                    window_function(&key, &window, aggregate.get_result(accumulator), &mut out);
                }
            }
        }
        let dropped = self
            .panes
            .iter()
            .take_while(|(start, _)| *start < next_start)
            .count();
        for (_, mut pane) in self.panes.drain(..dropped) {
            empty_for_reuse(&mut pane, PanePartials::clear);
            self.spare.push(pane);
        }
    }
}

/// Empties state shared copy-on-write with snapshots, for reuse: in place,
/// keeping its room, when no snapshot reads it any more; otherwise the
/// snapshot keeps it and new empty state takes its place.
fn empty_for_reuse<T: Default>(shared: &mut std::rc::Rc<T>, clear: impl FnOnce(&mut T)) {
    match std::rc::Rc::get_mut(shared) {
        Some(state) => clear(state),
        None => *shared = std::rc::Rc::default(),
    }
}

/// Entries spread by their key group index over `group_count` lists, each
/// in the order given: how a snapshot of state held for many key groups in
/// one table reads each group's share once it has made this.
fn by_key_group<T>(group_count: usize, entries: impl Iterator<Item = (u32, T)>) -> Vec<Vec<T>> {
    let mut by_group: Vec<Vec<T>> = (0..group_count).map(|_| Vec::new()).collect();
    for (group, entry) in entries {
        by_group[group as usize].push(entry);
    }
    by_group
}

/// A snapshot of the slicing window operator, in the layout of a keyed
/// state store with one table ([`WINDOW_PANES_STATE`]) and no timers.
struct PanesCapture<K, A> {
    /// The key groups, and each key's group.
    grouping: KeyedStateStore<K>,
    /// Each key once per pane ([`SlicingWindowOperator::merge_panes`]).
    panes: Vec<(Timestamp, Pane<K, A>)>,
    fired_end: Vec<Timestamp>,
    codec: ValueCodec<KeyPanes<A>>,
    /// Per key group, its partials: `(pane, index in the pane)`, in pane
    /// order. Made at the first group's serialization, in one pass over
    /// every pane, so that each group then reads only its own.
    partials_by_group: std::cell::RefCell<Option<Vec<Vec<(u32, u32)>>>>,
}

impl<K: Key, A: Clone + 'static> crate::snapshot::KeyedCapture for PanesCapture<K, A> {
    fn group_count(&self) -> usize {
        self.grouping.key_groups().count()
    }

    fn serialize_group(&self, group_index: usize) -> Result<Option<(u32, Vec<u8>)>, String> {
        let mut partials_by_group = self.partials_by_group.borrow_mut();
        let partials_by_group = partials_by_group.get_or_insert_with(|| {
            let partials = self
                .panes
                .iter()
                .enumerate()
                .flat_map(|(pane_index, (_, pane))| {
                    pane.partials
                        .iter()
                        .enumerate()
                        .map(move |(index, (key, _))| {
                            let group = self.grouping.group_index(key) as u32;
                            (group, (pane_index as u32, index as u32))
                        })
                });
            by_key_group(self.group_count(), partials)
        });
        let mut keys: rustc_hash::FxHashMap<&K, KeyPanes<A>> = Default::default();
        for &(pane_index, index) in &partials_by_group[group_index] {
            let (start, pane) = &self.panes[pane_index as usize];
            let (key, accumulator) = &pane.partials[index as usize];
            keys.entry(key)
                .or_insert_with(|| KeyPanes {
                    fired_through: self.fired_end[group_index],
                    panes: smallvec::SmallVec::new(),
                })
                .panes
                .push((*start, accumulator.clone()));
        }
        write_keyed_group(
            self.grouping.key_groups(),
            group_index,
            WINDOW_PANES_STATE,
            &keys,
            &self.codec,
        )
    }
}

impl<K, A, R, O, F, W> Output<WindowPartial<K, A>> for SlicingWindowOperator<K, A, R, O, F, W>
where
    K: Key,
    A: Clone + 'static,
    F: AggregateFunction<WindowPartial<K, A>, A, R>,
    W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>),
{
    fn push(&mut self, partial: WindowPartial<K, A>, timestamp: Timestamp) {
        self.add_partials(&mut std::iter::once(StreamRecord {
            value: partial,
            timestamp,
        }));
    }

    fn push_batch(&mut self, partials: &mut Vec<StreamRecord<WindowPartial<K, A>>>) {
        self.add_partials(&mut partials.drain(..));
    }

    fn watermark(&mut self, watermark: Timestamp) {
        self.watermark = watermark;
        let last_end = self.last_end_through(watermark);
        while let Some(&(first_pane, _)) = self.panes.first() {
            // The next window to fire: after the last one fired, and no
            // earlier than the first window holding the oldest pane.
            let end = self
                .fired_end
                .saturating_add(self.pane_size)
                .max(first_pane + self.pane_size);
            if end > last_end || end <= self.fired_end {
                // Not due yet (or, at the very end of time, no further
                // window end exists).
                break;
            }
            self.fire(end);
            self.fired_end = end;
        }
        self.fired_end = self.fired_end.max(last_end);
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
        self.merge_panes();
        let capture = PanesCapture {
            grouping: KeyedStateStore::new(self.store.key_groups(), self.context.max_parallelism),
            panes: self
                .panes
                .iter()
                .map(|(start, pane)| (*start, pane.clone()))
                .collect(),
            fired_end: self
                .group_fired_end
                .iter()
                .map(|group| (*group).max(self.fired_end))
                .collect(),
            codec: self.codec.clone(),
            partials_by_group: Default::default(),
        };
        snapshot.add(self.context.capture(Some(Box::new(capture)), Vec::new()));
        self.next.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.next.checkpoint_complete(checkpoint_id);
    }
}

/// The global phase's aggregate function: merges partial accumulators
/// with the user's `merge`, and finishes with the user's `get_result`.
pub(crate) struct MergePartials<F, I> {
    pub(crate) aggregate: F,
    pub(crate) _input: PhantomData<fn(I)>,
}

impl<F: Clone, I> Clone for MergePartials<F, I> {
    fn clone(&self) -> Self {
        MergePartials {
            aggregate: self.aggregate.clone(),
            _input: PhantomData,
        }
    }
}

impl<K, I, A, R, F> AggregateFunction<WindowPartial<K, A>, A, R> for MergePartials<F, I>
where
    I: 'static,
    F: AggregateFunction<I, A, R>,
{
    fn create_accumulator(&self) -> A {
        self.aggregate.create_accumulator()
    }
    #[inline]
    fn add(&self, partial: WindowPartial<K, A>, accumulator: &mut A) {
        let current = std::mem::replace(accumulator, self.aggregate.create_accumulator());
        *accumulator = self.aggregate.merge(current, partial.accumulator);
    }
    fn get_result(&self, accumulator: A) -> R {
        self.aggregate.get_result(accumulator)
    }
    fn merge(&self, first: A, second: A) -> A {
        self.aggregate.merge(first, second)
    }
}

/// What the window operator does with a window's contents: an aggregate
/// function followed by a window function.
pub(crate) struct WindowAggregation<K, I, A, R, O, F, W> {
    pub(crate) aggregate: F,
    pub(crate) window_function: Arc<W>,
    pub(crate) _types: PhantomData<fn(K, I, A, R, O)>,
}

impl<K, I, A, R, O, F, W> WindowAggregation<K, I, A, R, O, F, W>
where
    F: AggregateFunction<I, A, R>,
    W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>),
{
    fn emit(&self, key: &K, window: &TimeWindow, accumulator: A, out: &mut dyn Collector<O>) {
        let result = self.aggregate.get_result(accumulator);
        (self.window_function)(key, window, result, out);
    }
}

type WindowContents<A> = Vec<(TimeWindow, A)>;

fn write_window(window: &TimeWindow, writer: &mut StateWriter) {
    writer.put_i64(window.start);
    writer.put_i64(window.end);
}

fn read_window(reader: &mut StateReader<'_>) -> Result<TimeWindow, String> {
    Ok(TimeWindow {
        start: reader.i64()?,
        end: reader.i64()?,
    })
}

/// How a key's windows and their accumulators go into a checkpoint.
fn window_contents_codec<A: 'static>(accumulator: ValueCodec<A>) -> ValueCodec<WindowContents<A>> {
    let write = accumulator.write.clone();
    let read = accumulator.read;
    ValueCodec::new(
        move |contents: &WindowContents<A>, writer| {
            writer.put_u32(contents.len() as u32);
            for (window, value) in contents {
                write_window(window, writer);
                write(value, writer)?;
            }
            Ok(())
        },
        move |reader| {
            let count = reader.u32()?;
            (0..count)
                .map(|_| Ok((read_window(reader)?, read(reader)?)))
                .collect()
        },
    )
}

/// The keyed window operator (one input, chainable).
pub(crate) struct WindowOperator<K, I, A, R, O, F, W> {
    pub(crate) key_selector: Arc<dyn Fn(&I) -> K + Send + Sync>,
    pub(crate) assigner: WindowAssigner,
    pub(crate) allowed_lateness: i64,
    pub(crate) aggregation: WindowAggregation<K, I, A, R, O, F, W>,
    pub(crate) store: KeyedStateStore<K>,
    pub(crate) table: usize,
    pub(crate) timers: TimerService<K, TimeWindow>,
    pub(crate) watermark: Timestamp,
    pub(crate) scratch: Vec<TimeWindow>,
    pub(crate) new_windows: Vec<TimeWindow>,
    pub(crate) next: Box<dyn Output<O>>,
    pub(crate) operator_name: String,
    pub(crate) context: OperatorContext,
}

impl<K, I, A, R, O, F, W> WindowOperator<K, I, A, R, O, F, W>
where
    K: Key,
    I: Clone,
    A: Clone + 'static,
    F: AggregateFunction<I, A, R>,
    W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>),
{
    pub(crate) fn new(
        key_selector: Arc<dyn Fn(&I) -> K + Send + Sync>,
        assigner: WindowAssigner,
        allowed_lateness: i64,
        aggregation: WindowAggregation<K, I, A, R, O, F, W>,
        accumulator: ValueCodec<A>,
        context: &OperatorContext,
        next: Box<dyn Output<O>>,
    ) -> Self {
        let mut store = KeyedStateStore::new(context.key_groups, context.max_parallelism);
        let table = store.table_index::<WindowContents<A>>(
            "window-contents",
            window_contents_codec(accumulator),
        );
        let restored = context.take_restored();
        if let Some(restored) = &restored {
            store
                .restore_without_timers(&restored.key_groups)
                .unwrap_or_else(|error| context.restore_failed(&error));
        }
        let mut operator = WindowOperator {
            key_selector,
            assigner,
            allowed_lateness,
            aggregation,
            store,
            table,
            watermark: MIN_WATERMARK,
            scratch: Vec::new(),
            new_windows: Vec::new(),
            next,
            operator_name: context.operator_name.clone(),
            context: context.clone(),
            timers: TimerService::new(false),
        };
        if restored.is_some() {
            operator.register_restored_timers();
        }
        operator
    }

    /// Timers are not written into checkpoints: every window in state has
    /// exactly the timers [`WindowOperator::register`] gives it, so a
    /// restore registers them again. (The watermark starts over, so every
    /// firing timer is registered.)
    fn register_restored_timers(&mut self) {
        let windows: Vec<(K, TimeWindow)> = self
            .store
            .table::<WindowContents<A>>(self.table)
            .iter()
            .flat_map(|(key, contents)| {
                contents
                    .iter()
                    .map(move |(window, _)| (key.clone(), *window))
            })
            .collect();
        for (key, window) in windows {
            self.register(&key, &window);
        }
    }

    fn is_late(&self, window: &TimeWindow) -> bool {
        window.max_timestamp().saturating_add(self.allowed_lateness) <= self.watermark
    }

    fn register(&mut self, key: &K, window: &TimeWindow) {
        // As Flink's EventTimeTrigger: a window the watermark has already
        // passed (late, within the allowed lateness) fires at once where its
        // record is added, so a timer would fire it a second time.
        if window.max_timestamp() > self.watermark {
            self.timers.register(key, window, window.max_timestamp());
        }
        if self.allowed_lateness > 0 {
            self.timers.register(
                key,
                window,
                window.max_timestamp().saturating_add(self.allowed_lateness),
            );
        }
    }

    fn unregister(&mut self, key: &K, window: &TimeWindow) {
        self.timers.delete(key, window, window.max_timestamp());
        if self.allowed_lateness > 0 {
            self.timers.delete(
                key,
                window,
                window.max_timestamp().saturating_add(self.allowed_lateness),
            );
        }
    }

    /// Adds the record to each of `windows` (non-merging assigners), with
    /// one state lookup for the key.
    fn add_to_windows(&mut self, key: &K, group: usize, windows: &[TimeWindow], record: I) {
        let entries = self
            .store
            .table_mut::<WindowContents<A>>(self.table)
            .get_or_insert_with(group, key, Vec::new);
        let mut new_windows = std::mem::take(&mut self.new_windows);
        let mut fire_now = false;
        if let Some((last, rest)) = windows.split_last() {
            let mut add = |window: &TimeWindow, record: I| {
                match entries.iter_mut().find(|(existing, _)| existing == window) {
                    Some((_, accumulator)) => self.aggregation.aggregate.add(record, accumulator),
                    None => {
                        let mut accumulator = self.aggregation.aggregate.create_accumulator();
                        self.aggregation.aggregate.add(record, &mut accumulator);
                        entries.push((*window, accumulator));
                        new_windows.push(*window);
                    }
                }
                fire_now |= window.max_timestamp() <= self.watermark;
            };
            for window in rest {
                add(window, record.clone());
            }
            add(last, record);
        }
        for window in new_windows.drain(..) {
            self.register(key, &window);
        }
        self.new_windows = new_windows;
        if fire_now {
            // Late but within the allowed lateness: fire again at once.
            for window in windows {
                if window.max_timestamp() <= self.watermark {
                    self.fire(key, group, *window, false);
                }
            }
        }
    }

    fn add_to_session(&mut self, key: &K, group: usize, window: TimeWindow, record: I) {
        // As in Flink, a session is late only once merged: a record behind
        // the watermark may still extend a session the watermark has not
        // passed.
        if let Some(entries) = self
            .store
            .table::<WindowContents<A>>(self.table)
            .get(group, key)
        {
            let mut covered = window;
            let mut grown = true;
            while grown {
                grown = false;
                for (existing, _) in entries {
                    if existing.intersects(&covered) && covered.cover(existing) != covered {
                        covered = covered.cover(existing);
                        grown = true;
                    }
                }
            }
            if self.is_late(&covered) {
                return;
            }
        } else if self.is_late(&window) {
            return;
        }
        let entries = self
            .store
            .table_mut::<WindowContents<A>>(self.table)
            .get_or_insert_with(group, key, Vec::new);
        let mut merged_window = window;
        let mut merged: Option<A> = None;
        let mut removed = Vec::new();
        let mut index = 0;
        while index < entries.len() {
            if entries[index].0.intersects(&merged_window) {
                let (existing, accumulator) = entries.swap_remove(index);
                merged_window = merged_window.cover(&existing);
                merged = Some(match merged {
                    Some(current) => self.aggregation.aggregate.merge(current, accumulator),
                    None => accumulator,
                });
                removed.push(existing);
                // Growing the window may now reach entries already passed.
                index = 0;
            } else {
                index += 1;
            }
        }
        let mut accumulator =
            merged.unwrap_or_else(|| self.aggregation.aggregate.create_accumulator());
        self.aggregation.aggregate.add(record, &mut accumulator);
        entries.push((merged_window, accumulator));
        for old in removed {
            self.unregister(key, &old);
        }
        self.register(key, &merged_window);
        if merged_window.max_timestamp() <= self.watermark {
            self.fire(key, group, merged_window, false);
        }
    }

    /// Emits the window's result; with `purge`, removes its state.
    fn fire(&mut self, key: &K, group: usize, window: TimeWindow, purge: bool) {
        let table = self.store.table_mut::<WindowContents<A>>(self.table);
        let Some(entries) = table.get_mut(group, key) else {
            return;
        };
        let Some(position) = entries.iter().position(|(existing, _)| *existing == window) else {
            return;
        };
        let accumulator = if purge {
            let (_, accumulator) = entries.swap_remove(position);
            if entries.is_empty() {
                table.remove(group, key);
            }
            accumulator
        } else {
            entries[position].1.clone()
        };
        let mut out = TimestampedCollector {
            output: &mut *self.next,
            timestamp: window.max_timestamp(),
        };
        self.aggregation.emit(key, &window, accumulator, &mut out);
    }

    fn purge(&mut self, key: &K, group: usize, window: TimeWindow) {
        let table = self.store.table_mut::<WindowContents<A>>(self.table);
        if let Some(entries) = table.get_mut(group, key) {
            entries.retain(|(existing, _)| *existing != window);
            if entries.is_empty() {
                table.remove(group, key);
            }
        }
    }
}

impl<K, I, A, R, O, F, W> Output<I> for WindowOperator<K, I, A, R, O, F, W>
where
    K: Key,
    I: Clone,
    A: Clone + 'static,
    F: AggregateFunction<I, A, R>,
    W: Fn(&K, &TimeWindow, R, &mut dyn Collector<O>),
{
    fn push(&mut self, record: I, timestamp: Timestamp) {
        assert!(
            timestamp != NO_TIMESTAMP,
            "window operator '{}' received a record without a timestamp: give the source a WatermarkStrategy with a timestamp assigner",
            self.operator_name
        );
        let key = (self.key_selector)(&record);
        let group = self.store.group_index(&key);
        let mut windows = std::mem::take(&mut self.scratch);
        windows.clear();
        self.assigner.assign(timestamp, &mut windows);
        if self.assigner.is_merging() {
            if let Some(window) = windows.first() {
                self.add_to_session(&key, group, *window, record);
            }
        } else {
            windows.retain(|window| !self.is_late(window));
            self.add_to_windows(&key, group, &windows, record);
        }
        self.scratch = windows;
    }

    fn watermark(&mut self, watermark: Timestamp) {
        self.watermark = watermark;
        while let Some((timestamp, key, window)) = self.timers.pop_ready(watermark) {
            let group = self.store.group_index(&key);
            let cleanup_time = window.max_timestamp().saturating_add(self.allowed_lateness);
            if timestamp == window.max_timestamp() {
                self.fire(&key, group, window, cleanup_time == timestamp);
            } else if timestamp == cleanup_time {
                self.purge(&key, group, window);
            }
        }
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
        snapshot.add(
            self.context
                .capture(Some(self.store.capture_without_timers()), Vec::new()),
        );
        self.next.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.next.checkpoint_complete(checkpoint_id);
    }
}

/// The window join: per key and window, every pair of a left and a right
/// record, emitted when the window fires (Flink's
/// `join(...).where(...).equalTo(...).window(...).apply(...)`).
///
/// State is held per window (as Flink SQL's window join keeps it), as a
/// hash join builds it: left records by key, right records in a list. When
/// the watermark passes a window's end, each right record probes the left
/// records of its key, the pairs are emitted and the window is dropped
/// whole. No per-key timers, and no key group looked up per record: as the
/// slicing window operator's panes, a window is shared whole with a
/// snapshot, which finds each key's group as it writes. Snapshots are
/// keyed state like any other operator's: per key, its windows with their
/// records ([`JoinContents`], the table `join-contents`), so a job restores
/// at another parallelism.
pub(crate) struct WindowJoinOperator<K, L, R, O, J, SL, SR> {
    /// The key selectors, each of its own type: called inlined.
    pub(crate) left_key: Arc<SL>,
    pub(crate) right_key: Arc<SR>,
    pub(crate) assigner: WindowAssigner,
    pub(crate) join: Arc<J>,
    /// Only for the subtask's key groups (snapshots and restores).
    pub(crate) store: KeyedStateStore<K>,
    pub(crate) codec: ValueCodec<JoinContents<L, R>>,
    /// Open windows, in firing order (by end, then start), each with its
    /// keys' records.
    pub(crate) windows: OpenJoinWindows<K, L, R>,
    pub(crate) watermark: Timestamp,
    /// Scratch: the windows of the record being added.
    pub(crate) scratch: Vec<TimeWindow>,
    /// Scratch: a batch's runs of records in one window, and their lengths.
    pub(crate) runs: Vec<(TimeWindow, usize)>,
    pub(crate) next: Box<dyn Output<O>>,
    pub(crate) operator_name: String,
    pub(crate) context: OperatorContext,
}

/// How one side's records go into a window of the join.
trait JoinInput<K, L, R, T> {
    /// The key of `record`, one of this side's, by the join's selectors.
    fn key_of(left: &impl Fn(&L) -> K, right: &impl Fn(&R) -> K, record: &T) -> K;
    /// Adds all of `run`'s records, each with its key (the caller's next
    /// run starts where this one ends).
    fn add_run(window: &mut JoinWindow<K, L, R>, run: impl Iterator<Item = (K, T)>);
}

/// The left side: the build side, by key in its window's map.
struct LeftSide;

impl<K: Key, L: Clone, R> JoinInput<K, L, R, L> for LeftSide {
    #[inline(always)]
    fn key_of(left: &impl Fn(&L) -> K, _: &impl Fn(&R) -> K, record: &L) -> K {
        left(record)
    }
    #[inline]
    fn add_run(window: &mut JoinWindow<K, L, R>, run: impl Iterator<Item = (K, L)>) {
        let lefts = std::rc::Rc::make_mut(&mut window.lefts);
        if lefts.is_empty() {
            // A new window's first run: room for its keys at once.
            lefts.reserve(run.size_hint().0);
        }
        for (key, record) in run {
            match lefts.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut lefts) => {
                    lefts.get_mut().push(record)
                }
                std::collections::hash_map::Entry::Vacant(entry) => {
                    entry.insert(smallvec::smallvec![record]);
                }
            }
        }
    }
}

/// The right side: the probe side, in the window's one list.
struct RightSide;

impl<K: Clone, L, R: Clone> JoinInput<K, L, R, R> for RightSide {
    #[inline(always)]
    fn key_of(_: &impl Fn(&L) -> K, right: &impl Fn(&R) -> K, record: &R) -> K {
        right(record)
    }
    #[inline]
    fn add_run(window: &mut JoinWindow<K, L, R>, run: impl Iterator<Item = (K, R)>) {
        std::rc::Rc::make_mut(&mut window.rights).extend(run);
    }
}

/// One side of a key's window in the join. Most keys hold one record a
/// side in a window (a person and their auction), so one is kept inline
/// rather than behind an allocation.
type JoinSide<T> = smallvec::SmallVec<[T; 1]>;

/// A key's windows in the join, each with its left and right records: the
/// form of join state in snapshots.
type JoinContents<L, R> = Vec<(TimeWindow, JoinSide<L>, JoinSide<R>)>;

/// A window's left records, by key (the build side of the hash join).
type JoinLefts<K, L> = rustc_hash::FxHashMap<K, JoinSide<L>>;

/// One window of the join: its left records by key, and its right records
/// as they came (the probe side), each with its key, in one list (a right
/// record is appended where the one before it went, rather than to one of
/// many lists: the rights are most of q8's records). Each is shared
/// copy-on-write with snapshots as a whole, as a pane of the slicing
/// window operator is: a run of records makes it writable once, and no
/// record's key group is looked up until a snapshot writes it.
pub(crate) struct JoinWindow<K, L, R> {
    lefts: std::rc::Rc<JoinLefts<K, L>>,
    rights: std::rc::Rc<Vec<(K, R)>>,
}

impl<K, L, R> Clone for JoinWindow<K, L, R> {
    fn clone(&self) -> Self {
        JoinWindow {
            lefts: self.lefts.clone(),
            rights: self.rights.clone(),
        }
    }
}

impl<K, L, R> JoinWindow<K, L, R> {
    fn new() -> Self {
        JoinWindow {
            lefts: std::rc::Rc::default(),
            rights: std::rc::Rc::default(),
        }
    }

    /// Empties it for reuse, keeping what no snapshot still reads.
    fn clear(&mut self) {
        empty_for_reuse(&mut self.lefts, |lefts| lefts.clear());
        empty_for_reuse(&mut self.rights, |rights| rights.clear());
    }
}

/// The open windows of the join, in firing order (by end, then start):
/// a handful, as the watermark fires them, so a sorted vector, with the
/// window used last looked at first (records come in time order, so most
/// fall in the window of the one before).
pub(crate) struct OpenJoinWindows<K, L, R> {
    windows: Vec<((Timestamp, Timestamp), JoinWindow<K, L, R>)>,
    /// The index of the window used last (checked before use: firing
    /// shifts the indices).
    last: usize,
    /// The emptied maps of fired windows, for new windows to reuse: a
    /// window's maps then start with the room the last one grew to.
    spare: Vec<JoinWindow<K, L, R>>,
}

impl<K, L, R> OpenJoinWindows<K, L, R> {
    fn new() -> Self {
        OpenJoinWindows {
            windows: Vec::new(),
            last: 0,
            spare: Vec::new(),
        }
    }

    /// The state of `window`, opened if need be.
    #[inline]
    fn window(&mut self, window: &TimeWindow) -> &mut JoinWindow<K, L, R> {
        let id = (window.end, window.start);
        let at = match self.windows.get(self.last) {
            Some((existing, _)) if *existing == id => self.last,
            _ => match self
                .windows
                .binary_search_by(|(existing, _)| existing.cmp(&id))
            {
                Ok(found) => found,
                Err(at) => {
                    let state = self.spare.pop().unwrap_or_else(JoinWindow::new);
                    self.windows.insert(at, (id, state));
                    at
                }
            },
        };
        self.last = at;
        &mut self.windows[at].1
    }

    /// Removes the windows whose last millisecond is at or before
    /// `watermark`, oldest first, for `fire` to read; their maps, once
    /// fired, are emptied and kept for reuse.
    fn fire_through(
        &mut self,
        watermark: Timestamp,
        mut fire: impl FnMut(TimeWindow, &mut JoinWindow<K, L, R>),
    ) {
        let due = self
            .windows
            .iter()
            .take_while(|((end, _), _)| end - 1 <= watermark)
            .count();
        for ((end, start), mut state) in self.windows.drain(..due) {
            fire(TimeWindow { start, end }, &mut state);
            state.clear();
            self.spare.push(state);
        }
    }
}

/// The name of the window join's state in snapshots.
const JOIN_STATE: &str = "join-contents";

fn join_contents_codec<L: Record, R: Record>() -> ValueCodec<JoinContents<L, R>> {
    ValueCodec::new(
        |contents: &JoinContents<L, R>, writer| {
            writer.put_u32(contents.len() as u32);
            for (window, lefts, rights) in contents {
                write_window(window, writer);
                writer.put_u32(lefts.len() as u32);
                lefts.iter().try_for_each(|left| left.write_value(writer))?;
                writer.put_u32(rights.len() as u32);
                rights
                    .iter()
                    .try_for_each(|right| right.write_value(writer))?;
            }
            Ok(())
        },
        |reader| {
            let count = reader.u32()?;
            (0..count)
                .map(|_| {
                    let window = read_window(reader)?;
                    let left_count = reader.u32()?;
                    let lefts = (0..left_count)
                        .map(|_| L::read_value(reader))
                        .collect::<Result<JoinSide<L>, _>>()?;
                    let right_count = reader.u32()?;
                    let rights = (0..right_count)
                        .map(|_| R::read_value(reader))
                        .collect::<Result<JoinSide<R>, _>>()?;
                    Ok((window, lefts, rights))
                })
                .collect()
        },
    )
}

impl<K, L, R, O, J, SL, SR> WindowJoinOperator<K, L, R, O, J, SL, SR>
where
    K: Key,
    L: Record,
    R: Record,
    J: Fn(L, R) -> O,
    SL: Fn(&L) -> K,
    SR: Fn(&R) -> K,
{
    pub(crate) fn new(
        left_key: Arc<SL>,
        right_key: Arc<SR>,
        assigner: WindowAssigner,
        join: Arc<J>,
        context: &OperatorContext,
        next: Box<dyn Output<O>>,
    ) -> Self {
        let mut head = WindowJoinOperator {
            left_key,
            right_key,
            assigner,
            join,
            store: KeyedStateStore::new(context.key_groups, context.max_parallelism),
            codec: join_contents_codec(),
            windows: OpenJoinWindows::new(),
            watermark: MIN_WATERMARK,
            scratch: Vec::new(),
            runs: Vec::new(),
            next,
            operator_name: context.operator_name.clone(),
            context: context.clone(),
        };
        if let Some(restored) = context.take_restored() {
            // Read the snapshot as the keyed state it is, then spread each
            // key's windows over the window maps.
            let mut store: KeyedStateStore<K> =
                KeyedStateStore::new(context.key_groups, context.max_parallelism);
            let table = store.table_index::<JoinContents<L, R>>(JOIN_STATE, join_contents_codec());
            store
                .restore_without_timers(&restored.key_groups)
                .unwrap_or_else(|error| context.restore_failed(&error));
            for (key, contents) in store.table::<JoinContents<L, R>>(table).iter() {
                for (window, lefts, rights) in contents {
                    let state = head.windows.window(window);
                    if !lefts.is_empty() {
                        std::rc::Rc::make_mut(&mut state.lefts).insert(key.clone(), lefts.clone());
                    }
                    std::rc::Rc::make_mut(&mut state.rights)
                        .extend(rights.iter().map(|right| (key.clone(), right.clone())));
                }
            }
        }
        head
    }

    /// Adds a batch of one side's records to their windows, with `S`.
    /// Tumbling windows take a run of records in one window at once: the
    /// window found, and its map or list made writable, once per run rather
    /// than once per record.
    fn add_batch<T: Clone, S: JoinInput<K, L, R, T>>(
        &mut self,
        records: &mut Vec<StreamRecord<T>>,
    ) {
        let WindowAssigner::Tumbling { size, offset } = self.assigner else {
            for StreamRecord { timestamp, value } in records.drain(..) {
                let key = S::key_of(&*self.left_key, &*self.right_key, &value);
                self.add(timestamp, value, |window, value| {
                    S::add_run(window, std::iter::once((key.clone(), value)));
                });
            }
            return;
        };
        let (left_key, right_key) = (&*self.left_key, &*self.right_key);
        let key_of = |value: &T| S::key_of(left_key, right_key, value);
        let windows = &mut self.windows;
        let watermark = self.watermark;
        // Each run of records in one window is found first, by its
        // timestamps alone, then moved into the window through an iterator
        // of known length: the window's list grows once per run and is
        // written without a check per record (moving record by record
        // through a `Peekable` took 38 instructions per record of q8's
        // right side).
        let mut from = 0;
        let mut runs = std::mem::take(&mut self.runs);
        runs.clear();
        while let Some(first) = records.get(from) {
            let timestamp = first.timestamp;
            assert_timestamped(timestamp, &self.operator_name);
            let start = window_start(timestamp, offset, size);
            let window = TimeWindow {
                start,
                end: start + size,
            };
            // Those after it in the same window (a record without a
            // timestamp ends the run, to be judged as the first of the
            // next).
            let in_window = |record: &StreamRecord<T>| {
                // `start <= timestamp < end` in one comparison.
                (record.timestamp != NO_TIMESTAMP)
                    & ((record.timestamp.wrapping_sub(window.start) as u64) < size as u64)
            };
            let rest = &records[from + 1..];
            // Records come in time order, so most batches are one run: eight
            // at a time, without a branch per record.
            let mut length = 1;
            for chunk in rest.chunks_exact(8) {
                if !chunk
                    .iter()
                    .fold(true, |all, record| all & in_window(record))
                {
                    break;
                }
                length += 8;
            }
            length += rest[length - 1..]
                .iter()
                .take_while(|r| in_window(r))
                .count();
            runs.push((window, length));
            from += length;
        }
        let mut drained = records.drain(..);
        for &(window, length) in &runs {
            let run = drained
                .by_ref()
                .take(length)
                .map(|record| (key_of(&record.value), record.value));
            if window.max_timestamp() > watermark {
                S::add_run(windows.window(&window), run);
            } else {
                // Late: dropped, as the window has fired.
                run.for_each(drop);
            }
        }
        debug_assert_eq!(drained.len(), 0, "a run of the batch was not taken whole");
        self.runs = runs;
    }

    /// Adds `record` to each of its windows (of a sliding assigner) that
    /// the watermark has not passed, with `side`.
    fn add<T: Clone>(
        &mut self,
        timestamp: Timestamp,
        record: T,
        side: impl Fn(&mut JoinWindow<K, L, R>, T),
    ) {
        assert_timestamped(timestamp, &self.operator_name);
        let mut windows = std::mem::take(&mut self.scratch);
        windows.clear();
        self.assigner.assign(timestamp, &mut windows);
        let watermark = self.watermark;
        windows.retain(|window| window.max_timestamp() > watermark);
        if let Some((last, rest)) = windows.split_last() {
            let open = &mut self.windows;
            for window in rest {
                side(open.window(window), record.clone());
            }
            side(open.window(last), record);
        }
        self.scratch = windows;
    }
}

/// Panics, naming the window join, at a record without a timestamp.
fn assert_timestamped(timestamp: Timestamp, operator_name: &str) {
    assert!(
        timestamp != NO_TIMESTAMP,
        "window join '{operator_name}' received a record without a timestamp: give the source a WatermarkStrategy with a timestamp assigner"
    );
}

/// A snapshot of the window join, in the layout of a keyed state store
/// with one table ([`JOIN_STATE`]) and no timers.
struct JoinCapture<K, L, R> {
    /// The key groups, and each key's group.
    grouping: KeyedStateStore<K>,
    windows: Vec<(TimeWindow, JoinWindow<K, L, R>)>,
    codec: ValueCodec<JoinContents<L, R>>,
    /// Per key group, its records: `(window, entry)`, in window order.
    /// Made at the first group's serialization, in one pass over every
    /// window, so that each group then reads only its own.
    entries_by_group: std::cell::RefCell<Option<Vec<Vec<(u32, JoinEntry<K>)>>>>,
}

/// Where a key group's records are in a window of a [`JoinCapture`].
enum JoinEntry<K> {
    /// The left records of this key.
    Left(K),
    /// The right record at this position.
    Right(u32),
}

impl<K: Key, L: Record, R: Record> crate::snapshot::KeyedCapture for JoinCapture<K, L, R> {
    fn group_count(&self) -> usize {
        self.grouping.key_groups().count()
    }

    fn serialize_group(&self, group_index: usize) -> Result<Option<(u32, Vec<u8>)>, String> {
        let mut entries_by_group = self.entries_by_group.borrow_mut();
        let entries_by_group = entries_by_group.get_or_insert_with(|| {
            let grouping = &self.grouping;
            let entries = self
                .windows
                .iter()
                .enumerate()
                .flat_map(|(index, (_, state))| {
                    let lefts = state.lefts.keys().map(move |key| {
                        let group = grouping.group_index(key) as u32;
                        (group, (index as u32, JoinEntry::Left(key.clone())))
                    });
                    let rights =
                        state
                            .rights
                            .iter()
                            .enumerate()
                            .map(move |(position, (key, _))| {
                                let group = grouping.group_index(key) as u32;
                                (group, (index as u32, JoinEntry::Right(position as u32)))
                            });
                    lefts.chain(rights)
                });
            by_key_group(self.group_count(), entries)
        });
        let mut keys: rustc_hash::FxHashMap<&K, JoinContents<L, R>> = Default::default();
        let mut per_key: rustc_hash::FxHashMap<&K, (JoinSide<L>, JoinSide<R>)> = Default::default();
        let mut entries = entries_by_group[group_index].iter().peekable();
        while let Some(&&(window_index, _)) = entries.peek() {
            let (window, state) = &self.windows[window_index as usize];
            while let Some((_, entry)) = entries.next_if(|(window, _)| *window == window_index) {
                match entry {
                    JoinEntry::Left(key) => {
                        per_key.entry(key).or_default().0 = state.lefts[key].clone();
                    }
                    JoinEntry::Right(position) => {
                        let (key, right) = &state.rights[*position as usize];
                        per_key.entry(key).or_default().1.push(right.clone());
                    }
                }
            }
            for (key, (lefts, rights)) in per_key.drain() {
                keys.entry(key).or_default().push((*window, lefts, rights));
            }
        }
        write_keyed_group(
            self.grouping.key_groups(),
            group_index,
            JOIN_STATE,
            &keys,
            &self.codec,
        )
    }
}

/// One key group of a snapshot in the layout of a keyed state store with
/// one table, `name`, holding `entries`, and no timers; `None` when there
/// are no entries.
fn write_keyed_group<K: Key, V>(
    key_groups: crate::key::KeyGroupRange,
    group_index: usize,
    name: &str,
    entries: &rustc_hash::FxHashMap<&K, V>,
    codec: &ValueCodec<V>,
) -> Result<Option<(u32, Vec<u8>)>, String> {
    if entries.is_empty() {
        return Ok(None);
    }
    let mut writer = StateWriter::default();
    writer.put_u32(1);
    writer.put_str(name);
    writer.put_u32(entries.len() as u32);
    for (key, value) in entries {
        key.write_value(&mut writer)?;
        (codec.write)(value, &mut writer)?;
    }
    // No timers.
    writer.put_u32(0);
    Ok(Some((key_groups.start + group_index as u32, writer.bytes)))
}

impl<K, L, R, O, J, SL, SR> TwoInputOperator<L, R> for WindowJoinOperator<K, L, R, O, J, SL, SR>
where
    K: Key,
    L: Record,
    R: Record,
    J: Fn(L, R) -> O,
    SL: Fn(&L) -> K,
    SR: Fn(&R) -> K,
{
    fn push_batch1(&mut self, batch: &mut Vec<StreamRecord<L>>) {
        self.add_batch::<L, LeftSide>(batch);
    }

    fn push_batch2(&mut self, batch: &mut Vec<StreamRecord<R>>) {
        self.add_batch::<R, RightSide>(batch);
    }

    fn watermark(&mut self, watermark: Timestamp) {
        self.watermark = watermark;
        let (join, next) = (&self.join, &mut self.next);
        self.windows.fire_through(watermark, |window, state| {
            let timestamp = window.max_timestamp();
            let lefts = &*state.lefts;
            let mut probe = |key: &K, right: R| {
                if let Some((last, rest)) = lefts.get(key).and_then(|lefts| lefts.split_last()) {
                    for left in rest {
                        next.push(join(left.clone(), right.clone()), timestamp);
                    }
                    next.push(join(last.clone(), right), timestamp);
                }
            };
            match std::rc::Rc::get_mut(&mut state.rights) {
                Some(rights) => {
                    for (key, right) in rights.drain(..) {
                        probe(&key, right);
                    }
                }
                // A snapshot still holds them: read them (the window is
                // emptied afresh after).
                None => {
                    for (key, right) in state.rights.iter() {
                        probe(key, right.clone());
                    }
                }
            }
        });
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
        let capture = JoinCapture {
            grouping: KeyedStateStore::new(self.store.key_groups(), self.context.max_parallelism),
            windows: self
                .windows
                .windows
                .iter()
                .map(|((end, start), state)| {
                    (
                        TimeWindow {
                            start: *start,
                            end: *end,
                        },
                        state.clone(),
                    )
                })
                .collect(),
            codec: self.codec.clone(),
            entries_by_group: Default::default(),
        };
        snapshot.add(self.context.capture(Some(Box::new(capture)), Vec::new()));
        self.next.snapshot(barrier, snapshot);
    }
    fn checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.next.checkpoint_complete(checkpoint_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assigned(assigner: WindowAssigner, timestamp: Timestamp) -> Vec<TimeWindow> {
        let mut windows = Vec::new();
        assigner.assign(timestamp, &mut windows);
        windows.sort();
        windows
    }

    #[test]
    fn tumbling_and_sliding_windows_follow_the_spec() {
        let tumbling = WindowAssigner::tumbling(Duration::from_millis(10_000));
        assert_eq!(
            assigned(tumbling, 12_345),
            vec![TimeWindow {
                start: 10_000,
                end: 20_000
            }]
        );
        let sliding =
            WindowAssigner::sliding(Duration::from_millis(10_000), Duration::from_millis(2_000));
        let windows = assigned(sliding, 12_345);
        assert_eq!(windows.len(), 5);
        assert_eq!(
            windows[0],
            TimeWindow {
                start: 4_000,
                end: 14_000
            }
        );
        assert_eq!(
            windows[4],
            TimeWindow {
                start: 12_000,
                end: 22_000
            }
        );
        assert!(windows
            .iter()
            .all(|window| window.start <= 12_345 && 12_345 < window.end));
        assert_eq!(
            assigned(tumbling, -1),
            vec![TimeWindow {
                start: -10_000,
                end: 0
            }]
        );
    }

    /// Collects what a window operator emits: (result, timestamp).
    struct Emitted(std::rc::Rc<std::cell::RefCell<Vec<(u64, Timestamp)>>>);

    impl Output<u64> for Emitted {
        fn push(&mut self, record: u64, timestamp: Timestamp) {
            self.0.borrow_mut().push((record, timestamp));
        }
        crate::operator::ignore_control!();
    }

    #[derive(Clone)]
    struct Sum;

    impl AggregateFunction<u64, u64, u64> for Sum {
        fn create_accumulator(&self) -> u64 {
            0
        }
        fn add(&self, value: u64, sum: &mut u64) {
            *sum += value;
        }
        fn get_result(&self, sum: u64) -> u64 {
            sum
        }
        fn merge(&self, first: u64, second: u64) -> u64 {
            first + second
        }
    }

    type Emissions = std::rc::Rc<std::cell::RefCell<Vec<(u64, Timestamp)>>>;

    /// A window operator that sums `u64` records of one key into `emitted`.
    fn summing_operator(
        assigner: WindowAssigner,
        allowed_lateness: i64,
        emitted: &Emissions,
    ) -> impl Output<u64> {
        summing_operator_from(
            assigner,
            allowed_lateness,
            emitted,
            Default::default(),
            |_| 0,
        )
    }

    /// The context of the one subtask of operator "window", starting from
    /// `restore`.
    fn test_context(restore: crate::snapshot::TaskRestore) -> OperatorContext {
        OperatorContext {
            operator_name: "window".to_string(),
            subtask_index: 0,
            parallelism: 1,
            max_parallelism: 128,
            key_groups: crate::key::KeyGroupRange::for_subtask(128, 1, 0),
            accumulators: Default::default(),
            chain_position: 0,
            tracker: Default::default(),
            operator_id: "1:window".to_string(),
            restore: std::rc::Rc::new(std::cell::RefCell::new(restore)),
            committables: Default::default(),
        }
    }

    /// The window function of the summing operators: each window's sum.
    fn emit_sum() -> Arc<impl Fn(&u64, &TimeWindow, u64, &mut dyn Collector<u64>)> {
        Arc::new(|_: &u64, _: &TimeWindow, sum: u64, out: &mut dyn Collector<u64>| out.collect(sum))
    }

    /// The same, keyed by `key`, starting from `restore`.
    fn summing_operator_from(
        assigner: WindowAssigner,
        allowed_lateness: i64,
        emitted: &Emissions,
        restore: crate::snapshot::TaskRestore,
        key: fn(&u64) -> u64,
    ) -> impl Output<u64> {
        let context = test_context(restore);
        WindowOperator::new(
            Arc::new(key),
            assigner,
            allowed_lateness,
            WindowAggregation {
                aggregate: Sum,
                window_function: emit_sum(),
                _types: PhantomData,
            },
            ValueCodec::record(),
            &context,
            Box::new(Emitted(emitted.clone())),
        )
    }

    /// The two phases of a window aggregation over `assigner`: the local
    /// phase feeding the global one, the slicing operator, directly (one
    /// subtask, so the shuffle between them changes nothing).
    fn two_phase_summing_operator(
        assigner: WindowAssigner,
        emitted: &Emissions,
        key: fn(&u64) -> u64,
        restore: crate::snapshot::TaskRestore,
    ) -> LocalWindowAggregate<u64, u64, u64, u64, Sum, fn(&u64) -> u64> {
        let context = test_context(restore);
        let panes = assigner.panes().expect("the assigner has panes");
        let global = SlicingWindowOperator::new(
            assigner.window_size(),
            panes,
            WindowAggregation {
                aggregate: MergePartials {
                    aggregate: Sum,
                    _input: PhantomData::<fn(u64)>,
                },
                window_function: emit_sum(),
                _types: PhantomData,
            },
            ValueCodec::record(),
            &context,
            Box::new(Emitted(emitted.clone())),
        );
        LocalWindowAggregate::new(
            Arc::new(key),
            Sum,
            panes,
            "window".to_string(),
            Box::new(global),
        )
    }

    #[test]
    fn two_phase_aggregation_emits_what_one_phase_does() {
        // Records in rough time order with some late ones, watermarks
        // every few records, and the input turning idle and active (which
        // ships the local phase early, as a checkpoint barrier does). The
        // local phase takes them one at a time and in batches (with runs
        // of one key: all of them for the constant key).
        let keys: [fn(&u64) -> u64; 2] = [|value| value % 7, |_| 3];
        for key in keys {
            two_phase_aggregation_emits_what_one_phase_does_with(key);
        }
    }

    fn two_phase_aggregation_emits_what_one_phase_does_with(key: fn(&u64) -> u64) {
        let assigners = [
            WindowAssigner::tumbling(Duration::from_millis(100)),
            WindowAssigner::sliding(Duration::from_millis(100), Duration::from_millis(20)),
            // A negative offset: the end of input (watermark MAX) must not
            // overflow the window arithmetic.
            WindowAssigner::Tumbling {
                size: 100,
                offset: -30,
            },
        ];
        for assigner in assigners {
            let (one, two, batched) = (
                Emissions::default(),
                Emissions::default(),
                Emissions::default(),
            );
            let mut one_phase = summing_operator_from(assigner, 0, &one, Default::default(), key);
            let mut two_phase = two_phase_summing_operator(assigner, &two, key, Default::default());
            let mut two_phase_batched =
                two_phase_summing_operator(assigner, &batched, key, Default::default());
            let mut batch = Vec::new();
            let mut state = 42u64;
            for index in 0..3000u64 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let jitter = ((state >> 33) % 120) as i64;
                // Runs of records in one millisecond, then a jump.
                let timestamp = (index as i64 / 5) * 10 - jitter * i64::from(index % 9 == 0);
                let value = state >> 40;
                one_phase.push(value, timestamp);
                two_phase.push(value, timestamp);
                batch.push(StreamRecord { value, timestamp });
                if index % 17 == 0 {
                    let watermark = (index as i64 / 5) * 10 - 60;
                    one_phase.watermark(watermark);
                    two_phase.watermark(watermark);
                    two_phase_batched.push_batch(&mut batch);
                    two_phase_batched.watermark(watermark);
                }
                if index % 500 == 0 {
                    two_phase.idle(true);
                    two_phase.idle(false);
                    two_phase_batched.push_batch(&mut batch);
                    two_phase_batched.idle(true);
                    two_phase_batched.idle(false);
                }
            }
            two_phase_batched.push_batch(&mut batch);
            one_phase.watermark(crate::time::MAX_WATERMARK);
            for two_phase in [&mut two_phase, &mut two_phase_batched] {
                two_phase.end_of_input();
                two_phase.watermark(crate::time::MAX_WATERMARK);
            }
            let sorted = |emissions: &Emissions| {
                let mut rows = emissions.borrow().clone();
                rows.sort();
                rows
            };
            assert!(!one.borrow().is_empty());
            assert_eq!(sorted(&one), sorted(&two), "{assigner:?}");
            assert_eq!(sorted(&one), sorted(&batched), "{assigner:?}, in batches");
        }
    }

    /// A record without a timestamp stops the local phase with a message
    /// that says what to do, whether it starts a batch or comes in the
    /// middle of a run of one key in one pane.
    #[test]
    fn the_local_phase_refuses_a_record_without_a_timestamp() {
        for batch in [
            vec![(1, crate::time::NO_TIMESTAMP)],
            vec![(1, 10), (1, 11), (1, crate::time::NO_TIMESTAMP)],
        ] {
            let emitted = Emissions::default();
            let tumbling = WindowAssigner::tumbling(Duration::from_millis(100));
            let mut operator =
                two_phase_summing_operator(tumbling, &emitted, |_| 0, Default::default());
            let mut records = records(&batch);
            let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                operator.push_batch(&mut records)
            }))
            .expect_err("a record without a timestamp was taken");
            let message = panic
                .downcast_ref::<String>()
                .expect("a formatted panic message");
            assert!(
                message.contains("without a timestamp") && message.contains("WatermarkStrategy"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_late_record_within_the_allowed_lateness_fires_its_window_once() {
        let emitted = Emissions::default();
        let tumbling = WindowAssigner::tumbling(Duration::from_millis(100));
        let mut operator = summing_operator(tumbling, 100, &emitted);
        operator.watermark(149);
        // [0, 100) never held a record: late, within the lateness.
        operator.push(5, 50);
        assert_eq!(*emitted.borrow(), [(5, 99)]);
        operator.watermark(150);
        assert_eq!(*emitted.borrow(), [(5, 99)], "fired a second time");
        operator.push(7, 60);
        operator.watermark(crate::time::MAX_WATERMARK);
        assert_eq!(*emitted.borrow(), [(5, 99), (12, 99)]);
    }

    #[test]
    fn a_late_record_that_extends_a_session_the_watermark_has_not_passed_joins_it() {
        let emitted = Emissions::default();
        let session = WindowAssigner::session(Duration::from_millis(30));
        let mut operator = summing_operator(session, 0, &emitted);
        operator.push(1, 100);
        operator.watermark(99);
        // [70, 100) alone is late, but it touches [100, 130).
        operator.push(2, 70);
        // [30, 60) is late and touches no session.
        operator.push(4, 30);
        operator.watermark(crate::time::MAX_WATERMARK);
        assert_eq!(*emitted.borrow(), [(3, 129)]);
    }

    #[test]
    fn a_restored_two_phase_aggregation_fires_each_window_once() {
        // Sliding windows of two panes: at the barrier, the panes of
        // [150, 200) are held for [150, 250) after [100, 200) fired. The
        // restored operator starts from the minimum watermark and must not
        // fire [100, 200) again. Tumbling windows of one pane, emitted
        // without a merge when each key is there once.
        for assigner in [
            WindowAssigner::sliding(Duration::from_millis(100), Duration::from_millis(50)),
            WindowAssigner::tumbling(Duration::from_millis(100)),
        ] {
            a_restored_two_phase_aggregation_fires_each_window_once_with(assigner);
        }
    }

    fn a_restored_two_phase_aggregation_fires_each_window_once_with(assigner: WindowAssigner) {
        let by_digit: fn(&u64) -> u64 = |record| record % 10;
        let records: Vec<(u64, Timestamp)> =
            (0..200).map(|index| (index, index as i64 * 3)).collect();
        let uninterrupted = Emissions::default();
        let mut operator =
            summing_operator_from(assigner, 0, &uninterrupted, Default::default(), by_digit);
        for (record, timestamp) in &records {
            operator.push(*record, *timestamp);
            if *record == 120 {
                operator.watermark(200);
            }
        }
        operator.watermark(crate::time::MAX_WATERMARK);

        let before = Emissions::default();
        let mut operator =
            two_phase_summing_operator(assigner, &before, by_digit, Default::default());
        for (record, timestamp) in &records[..=120] {
            operator.push(*record, *timestamp);
            if *record == 80 || *record == 110 {
                // Ships the local phase's panes early, as an idle input
                // does: the open panes holding 240 and 330 then get each
                // digit's partial twice, which the snapshot holds as one.
                // No record after the barrier falls in the first.
                operator.idle(true);
                operator.idle(false);
            }
        }
        operator.watermark(200);
        let barrier = first_barrier();
        let mut snapshot = TaskSnapshot::default();
        operator.snapshot(&barrier, &mut snapshot);
        operator.push(1_000, 500);
        let serialized = snapshot.serialize().unwrap();
        assert_eq!(serialized.len(), 1);
        let restore = restore_of(serialized[0].key_groups.clone());
        let after = Emissions::default();
        let mut restored = two_phase_summing_operator(assigner, &after, by_digit, restore);
        for (record, timestamp) in &records[121..] {
            restored.push(*record, *timestamp);
        }
        restored.watermark(crate::time::MAX_WATERMARK);
        assert_resumed_as_uninterrupted(&before, &after, &uninterrupted);
    }

    /// The barrier of the tests' one checkpoint.
    fn first_barrier() -> CheckpointBarrier {
        CheckpointBarrier {
            checkpoint_id: 1,
            timestamp_ms: 0,
            target: Default::default(),
            is_savepoint: false,
        }
    }

    /// What a subtask of the test operator ("1:window", [`test_context`])
    /// restores: `key_groups`.
    fn restore_of(key_groups: Vec<(u32, Vec<u8>)>) -> crate::snapshot::TaskRestore {
        let mut restore = crate::snapshot::TaskRestore::default();
        restore.operators.insert(
            "1:window".to_string(),
            crate::snapshot::OperatorRestore {
                key_groups,
                operator_state: Vec::new(),
            },
        );
        restore
    }

    /// Asserts that what was emitted before a snapshot and after its
    /// restore is, as a multiset, what a run without either emitted.
    fn assert_resumed_as_uninterrupted(
        before: &Emissions,
        after: &Emissions,
        uninterrupted: &Emissions,
    ) {
        let mut resumed: Vec<_> = before
            .borrow()
            .iter()
            .chain(after.borrow().iter())
            .copied()
            .collect();
        let mut expected = uninterrupted.borrow().clone();
        resumed.sort();
        expected.sort();
        assert_eq!(resumed, expected);
    }

    /// A tumbling window join of `u64`s keyed by their last digit, each
    /// pair emitted as `left * 1_000 + right`, as subtask `subtask` of
    /// `parallelism`.
    fn digit_join(
        emitted: &Emissions,
        restore: crate::snapshot::TaskRestore,
        parallelism: u32,
        subtask: u32,
    ) -> WindowJoinOperator<
        u64,
        u64,
        u64,
        u64,
        impl Fn(u64, u64) -> u64,
        impl Fn(&u64) -> u64,
        impl Fn(&u64) -> u64,
    > {
        let mut context = test_context(restore);
        context.parallelism = parallelism;
        context.subtask_index = subtask;
        context.key_groups = crate::key::KeyGroupRange::for_subtask(128, parallelism, subtask);
        WindowJoinOperator::new(
            Arc::new(|left: &u64| left % 10),
            Arc::new(|right: &u64| right % 10),
            WindowAssigner::tumbling(Duration::from_millis(100)),
            Arc::new(|left: u64, right: u64| left * 1_000 + right),
            &context,
            Box::new(Emitted(emitted.clone())),
        )
    }

    fn records(values: &[(u64, Timestamp)]) -> Vec<StreamRecord<u64>> {
        values
            .iter()
            .map(|&(value, timestamp)| StreamRecord { value, timestamp })
            .collect()
    }

    #[test]
    fn a_window_join_takes_a_batch_of_several_windows_out_of_order_run_by_run() {
        // Runs shorter and longer than eight records, windows revisited,
        // a window's end right after it, and a run in a window the
        // watermark has fired (late, dropped).
        let spans: [(std::ops::Range<u64>, i64); 7] = [
            (0..13, 100),
            (13..16, 250),
            (16..35, 120),
            (35..37, 40),
            (37..46, 299),
            (46..47, 199),
            // The first millisecond after the window before.
            (47..50, 200),
        ];
        let batch = |base: u64| -> Vec<(u64, Timestamp)> {
            spans
                .iter()
                .flat_map(|(values, at)| values.clone().map(move |value| (base + value, *at)))
                .collect()
        };
        let (lefts, rights) = (batch(1_000), batch(2_000));
        let emitted = Emissions::default();
        let mut operator = digit_join(&emitted, Default::default(), 1, 0);
        operator.watermark(99);
        operator.push_batch1(&mut records(&lefts));
        operator.push_batch2(&mut records(&rights));
        operator.watermark(crate::time::MAX_WATERMARK);
        let window = |at: i64| at / 100;
        let mut expected = Vec::new();
        for &(left, left_at) in &lefts {
            for &(right, right_at) in &rights {
                if left % 10 == right % 10 && window(left_at) == window(right_at) && left_at > 99 {
                    expected.push(left * 1_000 + right);
                }
            }
        }
        let mut actual: Vec<u64> = emitted.borrow().iter().map(|&(value, _)| value).collect();
        actual.sort();
        expected.sort();
        assert!(expected.len() > 40);
        assert_eq!(actual, expected);
    }

    #[test]
    fn a_window_join_restored_at_another_parallelism_emits_what_it_would_have() {
        // Six rounds of ten left and ten right records, 5 ms apart, over
        // the windows [0, 100), [100, 200) and [200, 300); one left ahead
        // in [200, 300), so that two windows are open at the snapshot.
        let round = |round: u64| -> [Vec<(u64, Timestamp)>; 2] {
            let at = |index: u64, offset: i64| index as i64 * 5 + offset;
            [
                (10 * round..10 * round + 10)
                    .map(|index| (index, at(index, 0)))
                    .collect(),
                (10 * round..10 * round + 10)
                    .map(|index| (500 + index, at(index, 2)))
                    .collect(),
            ]
        };
        let ahead = (7, 260);
        let run = |operator: &mut WindowJoinOperator<_, _, _, _, _, _, _>,
                   rounds: std::ops::Range<u64>| {
            for [lefts, rights] in rounds.map(round) {
                operator.push_batch1(&mut records(&lefts));
                operator.push_batch2(&mut records(&rights));
            }
        };
        let uninterrupted = Emissions::default();
        let mut operator = digit_join(&uninterrupted, Default::default(), 1, 0);
        run(&mut operator, 0..3);
        operator.watermark(99);
        operator.push_batch1(&mut records(&[ahead]));
        run(&mut operator, 3..6);
        operator.watermark(crate::time::MAX_WATERMARK);
        assert!(uninterrupted.borrow().len() > 100);

        let before = Emissions::default();
        let mut operator = digit_join(&before, Default::default(), 1, 0);
        run(&mut operator, 0..3);
        operator.watermark(99);
        operator.push_batch1(&mut records(&[ahead]));
        let mut snapshot = TaskSnapshot::default();
        let barrier = first_barrier();
        operator.snapshot(&barrier, &mut snapshot);
        // Written after the barrier, to both sides of an open window that
        // holds records of key 0: the snapshot must not see them.
        operator.push_batch1(&mut records(&[(980, 120)]));
        operator.push_batch2(&mut records(&[(990, 130)]));
        let serialized = snapshot.serialize().unwrap();
        assert_eq!(serialized.len(), 1);

        // Restored as two subtasks, each with its key groups' share.
        let parallelism = 2;
        let after = Emissions::default();
        let mut subtasks: Vec<_> = (0..parallelism)
            .map(|subtask| {
                let owned = crate::key::KeyGroupRange::for_subtask(128, parallelism, subtask);
                let restore = restore_of(
                    serialized[0]
                        .key_groups
                        .iter()
                        .filter(|(group, _)| owned.contains(*group))
                        .cloned()
                        .collect(),
                );
                (owned, digit_join(&after, restore, parallelism, subtask))
            })
            .collect();
        let ranges: Vec<_> = subtasks.iter().map(|(owned, _)| *owned).collect();
        let owner = |value: u64| {
            let group = crate::key::key_group_of(&(value % 10), 128);
            ranges
                .iter()
                .position(|owned| owned.contains(group))
                .expect("an owner")
        };
        for [lefts, rights] in (3..6).map(round) {
            for left in lefts {
                subtasks[owner(left.0)].1.push_batch1(&mut records(&[left]));
            }
            for right in rights {
                subtasks[owner(right.0)]
                    .1
                    .push_batch2(&mut records(&[right]));
            }
        }
        for (_, subtask) in &mut subtasks {
            subtask.watermark(crate::time::MAX_WATERMARK);
        }
        assert_resumed_as_uninterrupted(&before, &after, &uninterrupted);
    }

    #[test]
    fn a_restored_window_operator_fires_what_the_snapshot_held() {
        let by_digit: fn(&u64) -> u64 = |record| record % 10;
        let sliding =
            WindowAssigner::sliding(Duration::from_millis(100), Duration::from_millis(50));
        let uninterrupted = Emissions::default();
        let mut operator =
            summing_operator_from(sliding, 0, &uninterrupted, Default::default(), by_digit);
        let records: Vec<(u64, Timestamp)> =
            (0..200).map(|index| (index, index as i64 * 3)).collect();
        for (record, timestamp) in &records {
            operator.push(*record, *timestamp);
            if *record == 120 {
                operator.watermark(200);
            }
        }
        operator.watermark(crate::time::MAX_WATERMARK);

        let before = Emissions::default();
        let mut operator = summing_operator_from(sliding, 0, &before, Default::default(), by_digit);
        let mut snapshot = TaskSnapshot::default();
        for (record, timestamp) in &records[..=120] {
            operator.push(*record, *timestamp);
        }
        operator.watermark(200);
        let barrier = first_barrier();
        operator.snapshot(&barrier, &mut snapshot);
        // Written after the barrier: the snapshot must not see it.
        operator.push(1_000, 500);
        let serialized = snapshot.serialize().unwrap();
        assert_eq!(serialized.len(), 1);
        assert!(!serialized[0].key_groups.is_empty());

        let restore = restore_of(serialized[0].key_groups.clone());
        let after = Emissions::default();
        let mut restored = summing_operator_from(sliding, 0, &after, restore, by_digit);
        for (record, timestamp) in &records[121..] {
            restored.push(*record, *timestamp);
        }
        restored.watermark(crate::time::MAX_WATERMARK);
        assert_resumed_as_uninterrupted(&before, &after, &uninterrupted);
    }
}
