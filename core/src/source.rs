//! Sources: where records enter a job.
//!
//! A [`Source`] is shared by all subtasks of a source operator and creates
//! one [`SourceReader`] per subtask, which emits that subtask's share. A
//! bounded source's readers finish; an unbounded one's never do (the job
//! runs until it is cancelled).

use std::sync::Arc;

use crate::record::StreamRecord;
use crate::snapshot::IndexSplits;
use crate::time::Timestamp;

/// What a reader reports after a poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceStatus {
    /// More records are ready now.
    MoreAvailable,
    /// Nothing is ready now; poll again later (the task waits its idle
    /// interval, a millisecond).
    NothingAvailable,
    /// Nothing is ready now, and nothing will be before this long (a paced
    /// or scheduled source knows): the task polls again then, if that is
    /// sooner than its idle interval, so a record due in 10 µs is not held
    /// for a millisecond.
    NothingAvailableFor(std::time::Duration),
    /// This reader has emitted everything it ever will.
    Finished,
}

/// Whether a source ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Boundedness {
    Bounded,
    Unbounded,
}

/// Where a reader emits records.
pub trait SourceOutput<T> {
    /// Emits a record; its timestamp comes from the watermark strategy's
    /// timestamp assigner.
    fn collect(&mut self, record: T);
    fn collect_with_timestamp(&mut self, record: T, timestamp: Timestamp);
    /// The reader passed over a record of `timestamp` without emitting it
    /// (a record its source was told to leave out): event time advances as
    /// if it had been emitted, so that a subtask whose records are all left
    /// out still moves its watermark.
    fn skip_to(&mut self, timestamp: Timestamp);
    /// Emits records in order, each with its timestamp, leaving `records`
    /// empty: the same as collecting each, only cheaper. A reader that
    /// builds its records straight into a batch of its own (up to
    /// [`crate::operator::CHAIN_BATCH_RECORDS`]) and hands it over here
    /// writes each record once, where the chain reads it a batch later;
    /// collecting one at a time copies each record just built.
    fn collect_batch(&mut self, records: &mut Vec<StreamRecord<T>>) {
        for record in records.drain(..) {
            self.collect_with_timestamp(record.value, record.timestamp);
        }
    }
    /// [`SourceOutput::collect_batch`] for records in event-time order
    /// (each timestamp at least the one before, as a reader of a log
    /// ordered by time emits them, and as Flink's
    /// `WatermarkStrategy.forMonotonousTimestamps` assumes): the last
    /// record's timestamp is taken as the latest, without reading the
    /// others'. A batch out of order is the reader's bug, which a debug
    /// build asserts; in a release build it only holds the watermark
    /// back, to the last record's time, until a later record moves it, and
    /// never makes a record late.
    fn collect_ordered_batch(&mut self, records: &mut Vec<StreamRecord<T>>) {
        self.collect_batch(records);
    }
}

/// A source of records, as Flink's `Source`: shared by all subtasks.
pub trait Source<T>: Send + Sync + 'static {
    fn boundedness(&self) -> Boundedness;

    /// The reader of subtask `subtask_index` of `parallelism`.
    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>>;

    /// The reader of subtask `subtask_index` of `parallelism` in a job
    /// restored from a checkpoint: `state` is its share of the elements
    /// that the old readers' [`SourceReader::snapshot_state`] returned
    /// (possibly none, or those of several old readers).
    fn restore_reader(
        &self,
        _subtask_index: u32,
        _parallelism: u32,
        _state: Vec<Vec<u8>>,
    ) -> Result<Box<dyn SourceReader<T>>, String> {
        Err("this source cannot be restored from a checkpoint".to_string())
    }
}

/// Emits one subtask's share of a source.
pub trait SourceReader<T> {
    /// Emits up to about `budget` records and says what comes next.
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus;

    /// The reader's position at a checkpoint barrier, as a list of
    /// elements (one per split it reads), so that the records after it
    /// can be read again after a failure.
    fn snapshot_state(&mut self) -> Result<Vec<Vec<u8>>, String> {
        Err("this source does not support checkpoints".to_string())
    }
}

/// Paces a reader at a rate, counted from its creation, so that a run lasts
/// long enough to watch or to act on (checkpoints, savepoints, failures).
#[derive(Clone, Debug)]
pub struct Pace {
    started: std::time::Instant,
    records_per_second: f64,
    emitted: u64,
}

impl Pace {
    pub fn new(records_per_second: f64) -> Pace {
        Pace {
            started: std::time::Instant::now(),
            records_per_second,
            emitted: 0,
        }
    }

    /// How many of `budget` records the reader may emit now (0: none yet);
    /// they count as emitted.
    pub fn allow(&mut self, budget: usize) -> usize {
        let due = (self.started.elapsed().as_secs_f64() * self.records_per_second) as u64;
        let allowed = due.saturating_sub(self.emitted).min(budget as u64);
        self.emitted += allowed;
        allowed as usize
    }
}

/// A bounded source over a fixed list, split round robin over subtasks.
pub struct CollectionSource<T> {
    records: Arc<Vec<T>>,
}

impl<T> CollectionSource<T> {
    pub fn new(records: Vec<T>) -> Self {
        CollectionSource {
            records: Arc::new(records),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Source<T> for CollectionSource<T> {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>> {
        Box::new(CollectionReader {
            records: self.records.clone(),
            splits: IndexSplits::fresh(subtask_index, parallelism, self.records.len() as u64),
        })
    }

    fn restore_reader(
        &self,
        _subtask_index: u32,
        _parallelism: u32,
        state: Vec<Vec<u8>>,
    ) -> Result<Box<dyn SourceReader<T>>, String> {
        Ok(Box::new(CollectionReader {
            records: self.records.clone(),
            splits: IndexSplits::restore(&state)?,
        }))
    }
}

struct CollectionReader<T> {
    records: Arc<Vec<T>>,
    splits: IndexSplits,
}

impl<T: Clone> SourceReader<T> for CollectionReader<T> {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus {
        let records = &self.records;
        self.splits.read(budget, |index| {
            output.collect(records[index as usize].clone())
        })
    }

    fn snapshot_state(&mut self) -> Result<Vec<Vec<u8>>, String> {
        Ok(self.splits.snapshot())
    }
}

/// Records made from their index by a function: indices `0..count`
/// (bounded) or `0..` (unbounded when `count` is `None`), subtask `s` of `p`
/// taking `s, s+p, s+2p, ...`.
pub struct GeneratorSource<T> {
    generate: Arc<dyn Fn(u64) -> T + Send + Sync>,
    count: Option<u64>,
}

impl<T> GeneratorSource<T> {
    pub fn bounded(count: u64, generate: impl Fn(u64) -> T + Send + Sync + 'static) -> Self {
        GeneratorSource {
            generate: Arc::new(generate),
            count: Some(count),
        }
    }

    pub fn unbounded(generate: impl Fn(u64) -> T + Send + Sync + 'static) -> Self {
        GeneratorSource {
            generate: Arc::new(generate),
            count: None,
        }
    }
}

impl<T: 'static> Source<T> for GeneratorSource<T> {
    fn boundedness(&self) -> Boundedness {
        if self.count.is_some() {
            Boundedness::Bounded
        } else {
            Boundedness::Unbounded
        }
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>> {
        Box::new(GeneratorReader {
            generate: self.generate.clone(),
            splits: IndexSplits::fresh(subtask_index, parallelism, self.count.unwrap_or(u64::MAX)),
        })
    }

    fn restore_reader(
        &self,
        _subtask_index: u32,
        _parallelism: u32,
        state: Vec<Vec<u8>>,
    ) -> Result<Box<dyn SourceReader<T>>, String> {
        Ok(Box::new(GeneratorReader {
            generate: self.generate.clone(),
            splits: IndexSplits::restore(&state)?,
        }))
    }
}

struct GeneratorReader<T> {
    generate: Arc<dyn Fn(u64) -> T + Send + Sync>,
    splits: IndexSplits,
}

impl<T> SourceReader<T> for GeneratorReader<T> {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus {
        let generate = &self.generate;
        self.splits
            .read(budget, |index| output.collect(generate(index)))
    }

    fn snapshot_state(&mut self) -> Result<Vec<Vec<u8>>, String> {
        Ok(self.splits.snapshot())
    }
}
