//! Sources: where records enter a job.
//!
//! A [`Source`] is shared by all subtasks of a source operator and creates
//! one [`SourceReader`] per subtask, which emits that subtask's share. A
//! bounded source's readers finish; an unbounded one's never do (the job
//! runs until it is cancelled).

use std::sync::Arc;

use crate::time::Timestamp;

/// What a reader reports after a poll.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceStatus {
    /// More records are ready now.
    MoreAvailable,
    /// Nothing is ready now; poll again later.
    NothingAvailable,
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
}

/// A source of records, as Flink's `Source`: shared by all subtasks.
pub trait Source<T>: Send + Sync + 'static {
    fn boundedness(&self) -> Boundedness;

    /// The reader of subtask `subtask_index` of `parallelism`.
    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>>;
}

/// Emits one subtask's share of a source.
pub trait SourceReader<T> {
    /// Emits up to about `budget` records and says what comes next.
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus;
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
            next: subtask_index as usize,
            step: parallelism as usize,
        })
    }
}

struct CollectionReader<T> {
    records: Arc<Vec<T>>,
    next: usize,
    step: usize,
}

impl<T: Clone> SourceReader<T> for CollectionReader<T> {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus {
        for _ in 0..budget {
            match self.records.get(self.next) {
                Some(record) => output.collect(record.clone()),
                None => return SourceStatus::Finished,
            }
            self.next += self.step;
        }
        if self.next < self.records.len() {
            SourceStatus::MoreAvailable
        } else {
            SourceStatus::Finished
        }
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
            count: self.count.unwrap_or(u64::MAX),
            next: u64::from(subtask_index),
            step: u64::from(parallelism),
        })
    }
}

struct GeneratorReader<T> {
    generate: Arc<dyn Fn(u64) -> T + Send + Sync>,
    count: u64,
    next: u64,
    step: u64,
}

impl<T> SourceReader<T> for GeneratorReader<T> {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus {
        for _ in 0..budget {
            if self.next >= self.count {
                return SourceStatus::Finished;
            }
            output.collect((self.generate)(self.next));
            self.next = self.next.saturating_add(self.step);
        }
        if self.next >= self.count {
            SourceStatus::Finished
        } else {
            SourceStatus::MoreAvailable
        }
    }
}
