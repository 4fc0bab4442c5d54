//! Checkpoint barriers and what operators hand over when they snapshot.
//!
//! Protocol of a snapshot inside one task (the runtime in strom-scheduler
//! drives it; files and the coordinator live there and in strom-state):
//! 1. a barrier reaches the head of the task: a source head gets it from the
//!    coordinator, an input head once every input channel has delivered it
//!    (alignment);
//! 2. the barrier travels down the chain with [`Output::snapshot`]: each
//!    operator adds an [`OperatorCapture`] to the [`TaskSnapshot`], then
//!    passes the barrier on; the writers at the end of the chain ship their
//!    partial buffers and queue the barrier on every output channel, so it
//!    stays in order with the records (the synchronous phase: no record is
//!    processed while it runs);
//! 3. keyed state is captured copy-on-write: the capture shares each key
//!    group's table with the operator, and the first write to a shared key
//!    group after the capture copies that one group. Timers and operator
//!    state are small and copied at once;
//! 4. the runtime serializes the captures with [`TaskSnapshot::serialize`]
//!    one key group at a time while the stream goes on (the asynchronous
//!    phase), writes them to disk, and acknowledges.
//!
//! Invariant: a capture holds exactly the effect of the records before the
//! barrier, whatever the task does after step 2.
//!
//! [`Output::snapshot`]: crate::operator::Output::snapshot

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use crate::source::SourceStatus;

/// The marker that splits a stream between two checkpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointBarrier {
    pub checkpoint_id: u64,
    /// When the coordinator triggered it (milliseconds since the epoch).
    pub timestamp_ms: u64,
    /// The directory every task writes its state file into.
    pub target: Arc<PathBuf>,
    pub is_savepoint: bool,
}

/// Appends the fixed-width little-endian encoding of snapshot data.
#[derive(Debug, Default)]
pub struct StateWriter {
    pub bytes: Vec<u8>,
}

impl StateWriter {
    pub fn put_u32(&mut self, value: u32) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn put_u64(&mut self, value: u64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    pub fn put_i64(&mut self, value: i64) {
        self.bytes.extend_from_slice(&value.to_le_bytes());
    }

    /// A length (u32) and the bytes.
    pub fn put_bytes(&mut self, bytes: &[u8]) {
        let length = u32::try_from(bytes.len()).expect("a state value under 4 GiB");
        self.put_u32(length);
        self.bytes.extend_from_slice(bytes);
    }

    pub fn put_str(&mut self, value: &str) {
        self.put_bytes(value.as_bytes());
    }
}

/// Reads what a [`StateWriter`] wrote; every read checks the length left.
#[derive(Debug)]
pub struct StateReader<'a> {
    bytes: &'a [u8],
}

impl<'a> StateReader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        StateReader { bytes }
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], String> {
        if self.bytes.len() < count {
            return Err(format!(
                "state ends early: {count} bytes wanted, {} left",
                self.bytes.len()
            ));
        }
        let (taken, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Ok(taken)
    }

    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn i64(&mut self) -> Result<i64, String> {
        Ok(i64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    pub fn bytes(&mut self) -> Result<&'a [u8], String> {
        let length = self.u32()? as usize;
        self.take(length)
    }

    pub fn string(&mut self) -> Result<String, String> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "a state name is not UTF-8".to_string())
    }
}

/// Keyed state captured at a barrier, serialized later one key group at a
/// time (see the module's protocol, step 3).
pub trait KeyedCapture {
    /// How many key groups the capture covers (the operator's own).
    fn group_count(&self) -> usize;
    /// The key group number and serialized state of the `group_index`-th
    /// key group, or `None` when it holds nothing.
    fn serialize_group(&self, group_index: usize) -> Result<Option<(u32, Vec<u8>)>, String>;
}

/// What one operator of the chain captured at a barrier.
pub struct OperatorCapture {
    pub operator_id: String,
    pub operator_name: String,
    pub subtask_index: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
    pub keyed: Option<Box<dyn KeyedCapture>>,
    /// Operator state: list elements, redistributed round robin when the
    /// job is restored at another parallelism.
    pub operator_state: Vec<Vec<u8>>,
}

/// The state of one operator, serialized.
#[derive(Clone, Debug, Default)]
pub struct OperatorSnapshot {
    pub operator_id: String,
    pub operator_name: String,
    pub subtask_index: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
    pub key_groups: Vec<(u32, Vec<u8>)>,
    pub operator_state: Vec<Vec<u8>>,
}

/// Everything the operators of one task captured at one barrier.
#[derive(Default)]
pub struct TaskSnapshot {
    pub operators: Vec<OperatorCapture>,
}

impl TaskSnapshot {
    pub fn add(&mut self, capture: OperatorCapture) {
        self.operators.push(capture);
    }

    /// Key groups left to serialize over all operators: the runtime
    /// serializes them one at a time, yielding in between.
    pub fn work_items(&self) -> Vec<(usize, usize)> {
        let mut items = Vec::new();
        for (operator, capture) in self.operators.iter().enumerate() {
            if let Some(keyed) = &capture.keyed {
                items.extend((0..keyed.group_count()).map(|group| (operator, group)));
            }
        }
        items
    }

    /// Serializes one work item into `snapshots` (one per operator).
    pub fn serialize_item(
        &self,
        (operator, group): (usize, usize),
        snapshots: &mut [OperatorSnapshot],
    ) -> Result<(), String> {
        let keyed = self.operators[operator]
            .keyed
            .as_ref()
            .expect("a work item of keyed state");
        if let Some(blob) = keyed.serialize_group(group)? {
            snapshots[operator].key_groups.push(blob);
        }
        Ok(())
    }

    /// The serialized snapshots before any key group: operator state only.
    pub fn empty_snapshots(&self) -> Vec<OperatorSnapshot> {
        self.operators
            .iter()
            .map(|capture| OperatorSnapshot {
                operator_id: capture.operator_id.clone(),
                operator_name: capture.operator_name.clone(),
                subtask_index: capture.subtask_index,
                parallelism: capture.parallelism,
                max_parallelism: capture.max_parallelism,
                key_groups: Vec::new(),
                operator_state: capture.operator_state.clone(),
            })
            .collect()
    }

    /// Serializes everything at once (tests; the runtime interleaves).
    pub fn serialize(&self) -> Result<Vec<OperatorSnapshot>, String> {
        let mut snapshots = self.empty_snapshots();
        for item in self.work_items() {
            self.serialize_item(item, &mut snapshots)?;
        }
        Ok(snapshots)
    }
}

/// A file a sink staged and that becomes visible only once the job has
/// finished: the end of a bounded job commits what no checkpoint covered
/// (see [`crate::function::SinkFunction::finish`]). The JobMaster renames
/// `from` to `to` after every task has finished, before it reports the
/// job's result.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Committable {
    pub from: PathBuf,
    pub to: PathBuf,
}

/// The state one operator subtask starts from.
#[derive(Clone, Debug, Default)]
pub struct OperatorRestore {
    /// Serialized keyed state per key group, for the key groups this
    /// subtask owns now.
    pub key_groups: Vec<(u32, Vec<u8>)>,
    /// This subtask's share of the operator state elements.
    pub operator_state: Vec<Vec<u8>>,
}

/// The state every operator of one task starts from, by operator id.
#[derive(Clone, Debug, Default)]
pub struct TaskRestore {
    pub operators: HashMap<String, OperatorRestore>,
}

/// A run of indices that a source reads: blocks of `block` consecutive
/// indices, one block every `step` indices, from `first` and below `end`
/// (with `block` 1, every `step`-th index). `next` is the next one to read.
/// Generator and collection sources, and the Nexmark source, split their
/// input this way; the runs are their operator state, so a job restored at
/// another parallelism hands whole runs to the new subtasks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexSplit {
    // Private, so that nothing moves `next` without `block_end`.
    next: u64,
    step: u64,
    end: u64,
    first: u64,
    block: u64,
    /// The end of the block holding `next` (derived, not serialized).
    block_end: u64,
}

impl IndexSplit {
    /// Every `step`-th index from `first`, below `end`.
    pub fn strided(first: u64, step: u64, end: u64) -> Self {
        IndexSplit::blocks(first, step, 1, end)
    }

    /// Blocks of `block` indices, one every `step`, from `first`, below
    /// `end`.
    ///
    /// # Panics
    /// If `block` is 0 or larger than `step`.
    pub fn blocks(first: u64, step: u64, block: u64, end: u64) -> Self {
        assert!(
            block >= 1 && block <= step,
            "a split's blocks ({block}) must be 1 to its step ({step}) long"
        );
        IndexSplit::at(first, step, block, end, first)
    }

    /// The split of `first, step, block, end` with `next` as its next index
    /// (moved to the first index of the split at or after it).
    fn at(first: u64, step: u64, block: u64, end: u64, next: u64) -> Self {
        let mut split = IndexSplit {
            next: first,
            step,
            end,
            first,
            block,
            block_end: first.saturating_add(block),
        };
        split.skip_below(next);
        split
    }

    pub fn is_finished(&self) -> bool {
        self.next >= self.end
    }

    /// Whether its blocks hold whole runs of `size` indices that start at
    /// multiples of `size`: every such run is all read or all not.
    pub fn is_aligned_to(&self, size: u64) -> bool {
        size > 0
            && self.first.is_multiple_of(size)
            && self.block.is_multiple_of(size)
            && self.step.is_multiple_of(size)
    }

    /// The same split, its next index moved to the first of its indices at
    /// or after `next`.
    pub fn at_index(self, next: u64) -> Self {
        IndexSplit::at(self.first, self.step, self.block, self.end, next)
    }

    /// The next run of up to `limit` (at least 1) indices inside the block
    /// holding `next`, advancing past it.
    #[inline]
    fn take_run(&mut self, limit: u64) -> Range<u64> {
        debug_assert!(
            self.next < self.block_end,
            "a split's next index left its block"
        );
        debug_assert!(limit > 0, "an empty run");
        let start = self.next;
        // `start < end`, so the run is not empty.
        let end = self
            .block_end
            .min(self.end)
            .min(start.saturating_add(limit));
        self.next = end;
        if end == self.block_end {
            self.next = self.block_end.saturating_add(self.step - self.block);
            self.block_end = self.next.saturating_add(self.block);
        }
        start..end
    }

    /// Moves `next` to the split's first index at or above `index`.
    fn skip_below(&mut self, index: u64) {
        if self.next >= index {
            return;
        }
        let offset = (index - self.first) % self.step;
        let block_start = index - offset;
        (self.next, self.block_end) = if offset < self.block {
            (index, block_start.saturating_add(self.block))
        } else {
            let next = block_start.saturating_add(self.step);
            (next, next.saturating_add(self.block))
        };
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut writer = StateWriter::default();
        writer.put_u64(self.next);
        writer.put_u64(self.step);
        writer.put_u64(self.end);
        writer.put_u64(self.first);
        writer.put_u64(self.block);
        writer.bytes
    }

    /// Reads a split that [`IndexSplit::encode`] wrote, or one of the
    /// strided form written before splits had blocks (`next, step, end`).
    pub fn decode(bytes: &[u8]) -> Result<IndexSplit, String> {
        let mut reader = StateReader::new(bytes);
        let (next, step, end) = (reader.u64()?, reader.u64()?, reader.u64()?);
        let (first, block) = if reader.is_empty() {
            (next % step.max(1), 1)
        } else {
            (reader.u64()?, reader.u64()?)
        };
        let valid = step > 0 && block >= 1 && block <= step && first <= next;
        if !valid || !reader.is_empty() {
            return Err("a source split is malformed".to_string());
        }
        Ok(IndexSplit::at(first, step, block, end, next))
    }
}

/// The splits of one source subtask, read in index order: always the split
/// whose next index is smallest, so that a subtask that took over several
/// splits still emits its records in the order of their indices (and of
/// their event times, where those grow with the index).
#[derive(Clone, Debug, Default)]
pub struct IndexSplits {
    pub splits: Vec<IndexSplit>,
}

impl IndexSplits {
    /// The share of subtask `subtask_index` of `parallelism` over `0..end`.
    pub fn fresh(subtask_index: u32, parallelism: u32, end: u64) -> Self {
        IndexSplits::fresh_blocks(subtask_index, parallelism, end, 1)
    }

    /// The share of subtask `subtask_index` of `parallelism` over `0..end`
    /// in blocks of `block` consecutive indices, dealt round-robin: a
    /// subtask reads runs of neighbouring indices, and the subtasks move
    /// through the indices together, a block apart.
    pub fn fresh_blocks(subtask_index: u32, parallelism: u32, end: u64, block: u64) -> Self {
        let block = block.max(1);
        IndexSplits {
            splits: vec![IndexSplit::blocks(
                u64::from(subtask_index).saturating_mul(block),
                u64::from(parallelism.max(1)).saturating_mul(block),
                block,
                end,
            )],
        }
    }

    pub fn restore(elements: &[Vec<u8>]) -> Result<Self, String> {
        let splits = elements
            .iter()
            .map(|bytes| IndexSplit::decode(bytes))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(IndexSplits { splits })
    }

    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        self.splits.iter().map(IndexSplit::encode).collect()
    }

    /// The next index to read, advancing its split; `None` when all ended.
    #[inline]
    pub fn next_index(&mut self) -> Option<u64> {
        self.next_run(1).map(|run| run.start)
    }

    pub fn is_finished(&self) -> bool {
        self.splits.iter().all(IndexSplit::is_finished)
    }

    /// Hands up to `budget` next indices to `each`, and says what a
    /// reader over these splits reports after it.
    #[inline]
    pub fn read(&mut self, budget: usize, mut each: impl FnMut(u64)) -> SourceStatus {
        self.read_runs(budget as u64, |run| run.for_each(&mut each))
    }

    /// Hands up to `budget` next indices to `each` in runs of consecutive
    /// indices, in index order, and says what a reader over these splits
    /// reports after it. A run lies inside one block of one split and
    /// below the next index of every other split, so a reader loops over a
    /// run without asking for each index; it reads the whole run (passing
    /// over the indices it has no use for).
    #[inline]
    pub fn read_runs(&mut self, budget: u64, mut each: impl FnMut(Range<u64>)) -> SourceStatus {
        let mut left = budget;
        while left > 0 {
            let Some(run) = self.next_run(left) else {
                return SourceStatus::Finished;
            };
            left -= run.end - run.start;
            each(run);
        }
        if self.is_finished() {
            SourceStatus::Finished
        } else {
            SourceStatus::MoreAvailable
        }
    }

    /// The next run of at most `limit` (at least 1) indices, its split
    /// moved past it; `None` when all ended.
    #[inline]
    fn next_run(&mut self, limit: u64) -> Option<Range<u64>> {
        if let [split] = self.splits.as_mut_slice() {
            return (!split.is_finished()).then(|| split.take_run(limit));
        }
        // Several splits (taken over from other subtasks): the one whose
        // next index is smallest, up to the next index of the one after.
        let mut first: Option<usize> = None;
        let mut bound = u64::MAX;
        for (at, split) in self.splits.iter().enumerate() {
            if split.is_finished() {
                continue;
            }
            match first {
                Some(current) if self.splits[current].next <= split.next => {
                    bound = bound.min(split.next);
                }
                _ => {
                    if let Some(current) = first {
                        bound = bound.min(self.splits[current].next);
                    }
                    first = Some(at);
                }
            }
        }
        let split = &mut self.splits[first?];
        let limit = limit.min(bound.saturating_sub(split.next).max(1));
        Some(split.take_run(limit))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves each of `splits` to its first index at or above `index` (as a
    /// restore at that index does, [`IndexSplit::at_index`]).
    fn skip_below(splits: &mut IndexSplits, index: u64) {
        for split in &mut splits.splits {
            split.skip_below(index);
        }
    }

    #[test]
    fn skipping_below_an_index_moves_every_split_to_its_first_index_at_or_above_it() {
        let mut splits = IndexSplits {
            splits: vec![
                IndexSplit::strided(3, 4, 100),
                IndexSplit::strided(5, 4, 12),
                IndexSplit::strided(30, 4, 100),
            ],
        };
        skip_below(&mut splits, 20);
        let next: Vec<u64> = splits.splits.iter().map(|split| split.next).collect();
        assert_eq!(next, vec![23, 21, 30]);
        assert!(splits.splits[1].is_finished());
        assert_eq!(splits.next_index(), Some(23));
    }

    #[test]
    fn splits_taken_over_by_one_subtask_are_read_in_index_order() {
        let mut splits = IndexSplits {
            splits: vec![IndexSplit::strided(7, 2, 12), IndexSplit::strided(4, 2, 12)],
        };
        let mut indices = Vec::new();
        while let Some(index) = splits.next_index() {
            indices.push(index);
        }
        assert_eq!(indices, [4, 6, 7, 8, 9, 10, 11]);
        let restored = IndexSplits::restore(&splits.snapshot()).unwrap();
        assert!(restored.is_finished());
    }

    #[test]
    fn runs_hand_out_the_indices_in_order_inside_blocks_and_within_the_budget() {
        // One subtask's splits after a restore: two old subtasks' blocks
        // of 5 (every 10) and one's interleaved indices.
        let splits = || IndexSplits {
            splits: vec![
                IndexSplit::blocks(0, 10, 5, 47),
                // Restored inside another's block: from its next own one.
                IndexSplit::blocks(5, 10, 5, 47).at_index(13),
                IndexSplit::strided(100, 3, 110),
            ],
        };
        let one_by_one: Vec<u64> = {
            let mut splits = splits();
            std::iter::from_fn(|| splits.next_index()).collect()
        };
        for budget in [1, 2, 3, 7, 100] {
            let mut read = splits();
            let mut indices = Vec::new();
            let mut polls = 0;
            loop {
                let mut this_poll = 0;
                let status = read.read_runs(budget, |run| {
                    assert!(!run.is_empty(), "an empty run");
                    // Inside one block of 5, or one interleaved index.
                    assert!(
                        run.start / 5 == (run.end - 1) / 5
                            || run.start >= 100 && run.end - run.start == 1,
                        "run {run:?} crosses a block"
                    );
                    this_poll += run.end - run.start;
                    indices.extend(run);
                });
                assert!(
                    this_poll <= budget,
                    "{this_poll} indices for a budget of {budget}"
                );
                polls += 1;
                if status == SourceStatus::Finished {
                    break;
                }
                assert!(polls < 1000, "never finished");
            }
            assert_eq!(indices, one_by_one, "budget {budget}");
        }
        assert_eq!(
            one_by_one,
            [(0..5), (10..15), (20..25), (30..35), (40..45)]
                .into_iter()
                .flatten()
                .chain((15..47).filter(|i| i % 10 >= 5))
                .chain([100, 103, 106, 109])
                .collect::<std::collections::BTreeSet<u64>>()
                .into_iter()
                .collect::<Vec<u64>>()
        );
    }

    #[test]
    fn block_splits_deal_runs_of_neighbouring_indices_round_robin() {
        let read_all = |mut splits: IndexSplits| {
            let mut indices = Vec::new();
            while let Some(index) = splits.next_index() {
                indices.push(index);
            }
            indices
        };
        assert_eq!(
            read_all(IndexSplits::fresh_blocks(0, 2, 20, 3)),
            [0, 1, 2, 6, 7, 8, 12, 13, 14, 18, 19]
        );
        assert_eq!(
            read_all(IndexSplits::fresh_blocks(1, 2, 20, 3)),
            [3, 4, 5, 9, 10, 11, 15, 16, 17]
        );
        // Skipping into another subtask's block lands on the next own
        // block; into an own block, on the index itself.
        let mut splits = IndexSplits::fresh_blocks(1, 2, 40, 3);
        skip_below(&mut splits, 7);
        assert_eq!(splits.next_index(), Some(9));
        skip_below(&mut splits, 16);
        assert_eq!(splits.next_index(), Some(16));
        assert_eq!(splits.next_index(), Some(17));
        // A snapshot taken inside a block resumes inside it.
        let restored = IndexSplits::restore(&splits.snapshot()).unwrap();
        assert_eq!(read_all(restored), [21, 22, 23, 27, 28, 29, 33, 34, 35, 39]);
        // A subtask restored with both splits reads them in index order.
        let mut both = IndexSplits::fresh_blocks(0, 2, 12, 3);
        both.splits
            .extend(IndexSplits::fresh_blocks(1, 2, 12, 3).splits);
        assert_eq!(read_all(both), (0..12).collect::<Vec<u64>>());
    }

    #[test]
    fn a_strided_split_written_before_blocks_still_restores() {
        let mut writer = StateWriter::default();
        for value in [7u64, 4, 20] {
            writer.put_u64(value);
        }
        let split = IndexSplit::decode(&writer.bytes).unwrap();
        assert_eq!(split, IndexSplit::strided(3, 4, 20).at_index(7));
        let mut splits = IndexSplits {
            splits: vec![split],
        };
        let indices: Vec<u64> = std::iter::from_fn(|| splits.next_index()).collect();
        assert_eq!(indices, [7, 11, 15, 19]);
    }

    #[test]
    fn a_short_read_is_an_error_not_a_panic() {
        let mut reader = StateReader::new(&[1, 0, 0]);
        assert!(reader.u32().is_err());
        assert!(IndexSplit::decode(&[0; 5]).is_err());
    }
}
