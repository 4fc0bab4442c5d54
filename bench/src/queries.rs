//! The Nexmark queries as Strom job programs, built with the DataStream API.
//!
//! One program, `nexmark`, takes `--query`, `--events` and `--seed`. Its
//! source is parallel: subtask `s` of `p` generates events `s, s+p, ...`, so
//! that event time advances alike on every subtask. Its answer sink sums
//! each subtask's rows into the `rows` and `checksum` accumulators, which the
//! JobManager merges (a wrapping sum, like the checksum itself).

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strom_core::function::{Collector, KeyedContext, SinkFunction};
use strom_core::operator::{OperatorContext, CHAIN_BATCH_RECORDS};
use strom_core::program::{JobOutcome, Program};
use strom_core::record::StreamRecord;
use strom_core::snapshot::{IndexSplits, StateReader, StateWriter};
use strom_core::source::{Boundedness, Pace, Source, SourceOutput, SourceReader, SourceStatus};
use strom_core::state::{KeyedStateStore, ValueState};
use strom_core::{
    AggregateFunction, DataStream, KeyedCoProcessFunction, ListState, StreamExecutionEnvironment,
    TimeWindow, Timestamp, WatermarkStrategy, WindowAssigner,
};
use strom_scheduler::file_sink::FileSink;

use crate::nexmark::generator::{timestamp, EventKind, AUCTIONS_PER_BLOCK, BLOCK_SIZE};
use crate::nexmark::model::{
    tumbling_window_start, Q2_AUCTION_DIVISOR, Q3_CATEGORY, Q3_STATES, Q5_WINDOW_SIZE_MS,
    Q5_WINDOW_SLIDE_MS, Q7_WINDOW_SIZE_MS, Q8_WINDOW_SIZE_MS,
};
use crate::nexmark::{
    Answer, AnswerRow, Auction, Bid, BidFields, Event, EventKinds, Generator, GeneratorConfig,
    Person, Q1Row, Q2Row, Q3Row, Q5Row, Q7Row, Q8Row, Query,
};

/// The Nexmark generator as a parallel, bounded source. Its position is
/// the next event index of each split it reads (see
/// [`IndexSplits`]), so a restored job generates exactly the events after
/// its checkpoint, at any parallelism.
#[derive(Clone, Debug)]
pub struct NexmarkSource {
    pub config: GeneratorConfig,
    /// Event indices at which the subtask that produces them fails, once
    /// per process (`--fail-at`), so that recovery can be seen.
    pub fail_at: Arc<Vec<u64>>,
    /// At most this many events per second over all subtasks (0: as fast
    /// as possible), so that a run lasts long enough to watch.
    pub events_per_second: u64,
    /// The kinds of event it emits; the others are passed over, never
    /// generated, as a consumer of only some topics never reads the rest.
    /// Event time still moves with every index (see
    /// [`SourceOutput::skip_to`]).
    pub kinds: EventKinds,
    /// The fields of each bid it computes (the others are zero), as a
    /// source given Flink SQL's projection push-down.
    pub bid_fields: BidFields,
    /// Whether it computes each auction's initial bid, reserve and expiry
    /// (zero otherwise; the same push-down).
    pub auction_details: bool,
    /// The events of each block of its splits, dealt to the subtasks in
    /// turn ([`SPLIT_BLOCK_EVENTS`]; 1: one event each in turn).
    pub split_block: u64,
    /// The watermark alignment of its readers (`--watermark-alignment`):
    /// the largest drift in event time between them, or none.
    pub watermark_alignment: Option<Duration>,
}

/// The `--fail-at` indices that have failed already in this process.
static FAILED_AT: Mutex<Vec<u64>> = Mutex::new(Vec::new());

impl NexmarkSource {
    pub fn new(config: GeneratorConfig) -> Self {
        NexmarkSource {
            config,
            fail_at: Arc::new(Vec::new()),
            events_per_second: 0,
            kinds: EventKinds::ALL,
            bid_fields: BidFields::ALL,
            auction_details: true,
            split_block: SPLIT_BLOCK_EVENTS,
            watermark_alignment: None,
        }
    }

    /// The same source, its splits dealt in blocks of `events`.
    pub fn with_split_block(&self, events: u64) -> Self {
        NexmarkSource {
            split_block: events.max(1),
            ..self.clone()
        }
    }

    /// The same source, emitting only the events of `kinds`.
    pub fn only(&self, kinds: EventKinds) -> Self {
        NexmarkSource {
            kinds,
            ..self.clone()
        }
    }

    /// The same source, computing only `fields` of each bid.
    pub fn projected(&self, bid_fields: BidFields) -> Self {
        NexmarkSource {
            bid_fields,
            ..self.clone()
        }
    }

    /// The same source, computing each auction's initial bid, reserve and
    /// expiry only if `details`.
    pub fn with_auction_details(&self, details: bool) -> Self {
        NexmarkSource {
            auction_details: details,
            ..self.clone()
        }
    }

    /// The reader of subtask `subtask_index` of `parallelism` in a new
    /// job, emitting the records `filter` keeps.
    fn fresh_reader<T: NexmarkRecord, F: SourceFilter<T>>(
        &self,
        subtask_index: u32,
        parallelism: u32,
        filter: F,
    ) -> Box<dyn SourceReader<T>> {
        let splits = IndexSplits::fresh_blocks(
            subtask_index,
            parallelism,
            self.config.events,
            self.split_block,
        );
        self.reader(splits, parallelism, filter)
    }

    /// A reader of the splits in `state` (from a checkpoint), emitting the
    /// records `filter` keeps.
    fn restored_reader<T: NexmarkRecord, F: SourceFilter<T>>(
        &self,
        parallelism: u32,
        state: &[Vec<u8>],
        filter: F,
    ) -> Result<Box<dyn SourceReader<T>>, String> {
        Ok(self.reader(IndexSplits::restore(state)?, parallelism, filter))
    }

    /// A reader of `splits`, compiled for its bid fields: the generator's
    /// code is specialized to each set of fields, as Flink SQL generates
    /// the code of a projection, so that the fields left out cost nothing
    /// at all, not even a test.
    fn reader<T: NexmarkRecord, F: SourceFilter<T>>(
        &self,
        splits: IndexSplits,
        parallelism: u32,
        filter: F,
    ) -> Box<dyn SourceReader<T>> {
        macro_rules! specialized {
            ($($bits:literal)*) => {
                match self.bid_fields.bits() {
                    $($bits => self.reader_of::<T, F, $bits>(splits, parallelism, filter),)*
                    other => unreachable!("bid fields of 4 bits, not {other}"),
                }
            };
        }
        if T::HAS_BIDS {
            specialized!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
        } else {
            self.reader_of::<T, F, 0>(splits, parallelism, filter)
        }
    }

    fn reader_of<T: NexmarkRecord, F: SourceFilter<T>, const BID_FIELDS: u8>(
        &self,
        splits: IndexSplits,
        parallelism: u32,
        filter: F,
    ) -> Box<dyn SourceReader<T>> {
        let pace = (self.events_per_second > 0)
            .then(|| Pace::new(self.events_per_second as f64 / f64::from(parallelism)));
        Box::new(NexmarkReader::<T, F, BID_FIELDS> {
            generator: self.config.generator(),
            splits,
            fail_at: self.fail_at.clone(),
            pace,
            kinds: T::kinds(self.kinds),
            auction_details: self.auction_details,
            filter,
            batch: Vec::with_capacity(CHAIN_BATCH_RECORDS),
        })
    }

    /// A source of the bids whose auction and time `keep` accepts
    /// (`keep(auction, date_time)`), as a source given Flink SQL's filter
    /// push-down: each bid is made with those alone for `keep` to test,
    /// and with the rest of the source's projection only if kept, so that
    /// a query passes over the bids it drops almost as cheaply as over the
    /// events of other kinds.
    pub fn bids_where<F>(&self, keep: F) -> Filtered<Bid, HeadFilter<F>>
    where
        F: Fn(u64, u64) -> bool + Clone + Send + Sync + 'static,
    {
        Filtered {
            source: self.clone(),
            filter: HeadFilter(keep),
            _records: PhantomData,
        }
    }

    /// A source of the records that `keep` accepts, made whole (with the
    /// source's projection: a bid's fields left out of it are zero when
    /// `keep` sees them) before it tests them (the same push-down): those
    /// it drops go no further than the source.
    pub fn records_where<T, F>(&self, keep: F) -> Filtered<T, RecordFilter<F>>
    where
        T: NexmarkRecord,
        F: Fn(&T) -> bool + Clone + Send + Sync + 'static,
    {
        Filtered {
            source: self.clone(),
            filter: RecordFilter(keep),
            _records: PhantomData,
        }
    }
}

/// A filter a Nexmark source applies to the records it makes, before they
/// reach its batch ([`NexmarkSource::bids_where`],
/// [`NexmarkSource::records_where`]).
pub trait SourceFilter<T>: Clone + Send + Sync + 'static {
    /// Whether it keeps every record: then each is made once, whole, and
    /// never tested.
    const KEEPS_ALL: bool;
    /// Whether it reads only a bid's auction and time: then a bid is made
    /// with those alone to be tested, and whole only if kept.
    const READS_BID_HEAD: bool;
    /// Whether the record is kept.
    fn keep(&self, record: &T) -> bool;
}

/// No filter: every record is kept.
#[derive(Clone, Copy, Debug)]
pub struct KeepAll;

impl<T> SourceFilter<T> for KeepAll {
    const KEEPS_ALL: bool = true;
    const READS_BID_HEAD: bool = false;
    #[inline(always)]
    fn keep(&self, _record: &T) -> bool {
        true
    }
}

/// A predicate on a bid's auction and time.
#[derive(Clone, Copy)]
pub struct HeadFilter<F>(F);

impl<F> SourceFilter<Bid> for HeadFilter<F>
where
    F: Fn(u64, u64) -> bool + Clone + Send + Sync + 'static,
{
    const KEEPS_ALL: bool = false;
    const READS_BID_HEAD: bool = true;
    #[inline(always)]
    fn keep(&self, bid: &Bid) -> bool {
        (self.0)(bid.auction, bid.date_time)
    }
}

/// A predicate on whole records.
#[derive(Clone, Copy)]
pub struct RecordFilter<F>(F);

impl<T, F> SourceFilter<T> for RecordFilter<F>
where
    F: Fn(&T) -> bool + Clone + Send + Sync + 'static,
{
    const KEEPS_ALL: bool = false;
    const READS_BID_HEAD: bool = false;
    #[inline(always)]
    fn keep(&self, record: &T) -> bool {
        (self.0)(record)
    }
}

/// The Nexmark source's records of one kind that a filter `P` keeps (see
/// [`NexmarkSource::bids_where`], [`NexmarkSource::records_where`]).
pub struct Filtered<T, P> {
    source: NexmarkSource,
    filter: P,
    _records: PhantomData<fn() -> T>,
}

impl<T, P: Clone> Clone for Filtered<T, P> {
    fn clone(&self) -> Self {
        Filtered {
            source: self.source.clone(),
            filter: self.filter.clone(),
            _records: PhantomData,
        }
    }
}

impl<T, P> fmt::Debug for Filtered<T, P> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Filtered")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl<T: NexmarkRecord, P: SourceFilter<T>> Source<T> for Filtered<T, P> {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>> {
        self.source
            .fresh_reader(subtask_index, parallelism, self.filter.clone())
    }

    fn restore_reader(
        &self,
        _subtask_index: u32,
        parallelism: u32,
        state: Vec<Vec<u8>>,
    ) -> Result<Box<dyn SourceReader<T>>, String> {
        self.source
            .restored_reader(parallelism, &state, self.filter.clone())
    }
}

/// What the Nexmark source can emit: every event, or the events of one
/// kind alone as their own records. A source of bids is the `bid` view of
/// the Nexmark tables (`SELECT bid.* ... WHERE event_type = 2`) with the
/// filter and the projection pushed into the source, so that no operator
/// downstream has to take the bid out of the event.
pub trait NexmarkRecord: strom_core::Record + Clone {
    /// Whether these records can be bids (and so have bid fields).
    const HAS_BIDS: bool;
    /// The kinds of event a source of these records emits, when it was
    /// told to emit `requested`.
    fn kinds(requested: EventKinds) -> EventKinds;
    /// Event `index`, of kind `kind` (one of those kinds), with the bid
    /// fields `fields`, and an auction's details if `auction_details`.
    fn generate(
        generator: &Generator,
        kind: EventKind,
        index: u64,
        fields: BidFields,
        auction_details: bool,
    ) -> Self;
    /// Its event time.
    fn date_time(&self) -> u64;
}

impl NexmarkRecord for Event {
    const HAS_BIDS: bool = true;
    fn kinds(requested: EventKinds) -> EventKinds {
        requested
    }
    #[inline(always)]
    fn generate(
        generator: &Generator,
        kind: EventKind,
        index: u64,
        fields: BidFields,
        auction_details: bool,
    ) -> Self {
        generator.event_of(kind, index, fields, auction_details)
    }
    #[inline(always)]
    fn date_time(&self) -> u64 {
        Event::date_time(self)
    }
}

impl NexmarkRecord for Bid {
    const HAS_BIDS: bool = true;
    fn kinds(_requested: EventKinds) -> EventKinds {
        EventKinds::BIDS
    }
    #[inline(always)]
    fn generate(
        generator: &Generator,
        _kind: EventKind,
        index: u64,
        fields: BidFields,
        _auction_details: bool,
    ) -> Self {
        generator.bid_with(index, fields)
    }
    #[inline(always)]
    fn date_time(&self) -> u64 {
        self.date_time
    }
}

impl NexmarkRecord for Person {
    const HAS_BIDS: bool = false;
    fn kinds(_requested: EventKinds) -> EventKinds {
        EventKinds::PERSONS
    }
    #[inline(always)]
    fn generate(
        generator: &Generator,
        _kind: EventKind,
        index: u64,
        _fields: BidFields,
        _auction_details: bool,
    ) -> Self {
        generator.person(index)
    }
    #[inline(always)]
    fn date_time(&self) -> u64 {
        self.date_time
    }
}

impl NexmarkRecord for Auction {
    const HAS_BIDS: bool = false;
    fn kinds(_requested: EventKinds) -> EventKinds {
        EventKinds::AUCTIONS
    }
    #[inline(always)]
    fn generate(
        generator: &Generator,
        _kind: EventKind,
        index: u64,
        _fields: BidFields,
        auction_details: bool,
    ) -> Self {
        generator.auction_with(index, auction_details)
    }
    #[inline(always)]
    fn date_time(&self) -> u64 {
        self.date_time
    }
}

/// A person or an auction as q8's join reads them: a person whole, and of
/// an auction its id and seller, with its time (32 bytes, where an
/// [`Event`] takes 64): the join's columns pushed into the source, as
/// Flink SQL pushes a projection into its scan of a table.
#[derive(Clone, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum PersonOrSoldAuction {
    Person(Person),
    Auction {
        auction: SoldAuction,
        date_time: u64,
    },
}

impl NexmarkRecord for PersonOrSoldAuction {
    const HAS_BIDS: bool = false;
    fn kinds(_requested: EventKinds) -> EventKinds {
        EventKinds::PERSONS_AND_AUCTIONS
    }
    #[inline(always)]
    fn generate(
        generator: &Generator,
        kind: EventKind,
        index: u64,
        _fields: BidFields,
        _auction_details: bool,
    ) -> Self {
        match kind {
            EventKind::Person => PersonOrSoldAuction::Person(generator.person(index)),
            EventKind::Auction => {
                let auction = generator.auction_with(index, false);
                PersonOrSoldAuction::Auction {
                    auction: SoldAuction::of(&auction),
                    date_time: auction.date_time,
                }
            }
            EventKind::Bid => unreachable!("a source of persons and auctions made a bid"),
        }
    }
    #[inline(always)]
    fn date_time(&self) -> u64 {
        match self {
            PersonOrSoldAuction::Person(person) => person.date_time,
            PersonOrSoldAuction::Auction { date_time, .. } => *date_time,
        }
    }
}

/// A stream of persons and auctions, for [`split_persons_and_auctions`].
trait PersonsAndAuctions: NexmarkRecord {
    fn join_input(self) -> JoinInput;
}

/// A person or an auction as the joins of q3 and q8 read it, or neither.
enum JoinInput {
    Person(Person),
    Auction(SoldAuction),
    Neither,
}

impl PersonsAndAuctions for Event {
    #[inline(always)]
    fn join_input(self) -> JoinInput {
        match self {
            Event::Person(person) => JoinInput::Person(person),
            Event::Auction(auction) => JoinInput::Auction(SoldAuction::of(&auction)),
            Event::Bid(_) => JoinInput::Neither,
        }
    }
}

impl PersonsAndAuctions for PersonOrSoldAuction {
    #[inline(always)]
    fn join_input(self) -> JoinInput {
        match self {
            PersonOrSoldAuction::Person(person) => JoinInput::Person(person),
            PersonOrSoldAuction::Auction { auction, .. } => JoinInput::Auction(auction),
        }
    }
}

/// The events in each block of the source's splits: 10 s of event time,
/// the size of every Nexmark window (q7, q8; q5's windows, and its 2 s
/// slides, start on its borders). Subtasks take blocks in turn, as readers
/// of a topic partitioned by time range would, so each reads runs of
/// neighbouring events: a window's events, or a slide's, come from one
/// subtask, whose local aggregate (q5, q7) then holds all of them and ships
/// one partial per key where interleaved subtasks would each ship one.
/// With indices dealt one by one, q5 at parallelism 2 shipped twice the
/// partials and used 1.6 times the CPU of parallelism 1.
const SPLIT_BLOCK_EVENTS: u64 = 100_000;

/// A source of events (of the kinds it was told, [`NexmarkSource::only`]),
/// or of bids, persons or auctions alone.
impl<T: NexmarkRecord> Source<T> for NexmarkSource {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>> {
        self.fresh_reader(subtask_index, parallelism, KeepAll)
    }

    fn restore_reader(
        &self,
        _subtask_index: u32,
        parallelism: u32,
        state: Vec<Vec<u8>>,
    ) -> Result<Box<dyn SourceReader<T>>, String> {
        self.restored_reader(parallelism, &state, KeepAll)
    }
}

/// Reads the events of `kinds` from `splits`, with the bid fields whose
/// bits are `BID_FIELDS` ([`BidFields::bits`]), and emits those `filter`
/// keeps. Its batches are in event-time order (it reads indices in
/// ascending order, and an event's time grows with its index), so it hands
/// them over as ordered ([`SourceOutput::collect_ordered_batch`]).
struct NexmarkReader<T, F, const BID_FIELDS: u8> {
    generator: Generator,
    splits: IndexSplits,
    fail_at: Arc<Vec<u64>>,
    /// Its share of `--events-per-second`.
    pace: Option<Pace>,
    kinds: EventKinds,
    auction_details: bool,
    filter: F,
    /// Records generated and not yet emitted (empty between polls): built
    /// in place here and handed over a batch at a time.
    batch: Vec<StreamRecord<T>>,
}

/// Generates the events of `run` that are of the kinds `kinds`, with the
/// bid fields `BID_FIELDS`, into `batch` those that `filter` keeps (see
/// [`emit_run`]). Each kind's run is a loop of its own, with the kind and
/// the fields constants in it; a stream of persons and auctions alone
/// takes each whole block of the run in one step instead (its person and
/// three auctions: two runs of at most three records a block, each found
/// and looped over on its own, cost q8's source more than making them).
#[inline(always)]
fn generate_run<T: NexmarkRecord, F: SourceFilter<T>, const BID_FIELDS: u8>(
    generator: Generator,
    kinds: EventKinds,
    auction_details: bool,
    filter: &F,
    run: Range<u64>,
    batch: &mut Vec<StreamRecord<T>>,
    output: &mut dyn SourceOutput<T>,
) {
    let fields = const { BidFields::from_bits(BID_FIELDS) };
    // The whole blocks of a run of persons and auctions alone, if any.
    let (first_block, end_block) = (run.start.div_ceil(BLOCK_SIZE), run.end / BLOCK_SIZE);
    let whole_blocks = (kinds == EventKinds::PERSONS_AND_AUCTIONS && first_block < end_block)
        .then_some(first_block..end_block);
    if F::KEEPS_ALL {
        // Each record made straight into the batch. (Through `RecordMaker` and
        // an `Option`, q5's and q7's sources took 7% more instructions.)
        // The kind and the fields constants in each closure itself, not
        // captures: the closure is compiled inside `extend`, which may not
        // be inlined here.
        macro_rules! make {
            ($kind:expr) => {
                move |index: u64| {
                    let fields = const { BidFields::from_bits(BID_FIELDS) };
                    T::generate(&generator, $kind, index, fields, auction_details)
                }
            };
        }
        macro_rules! each_run {
            ($run:expr) => {
                for (kind, taken) in kinds.taken_runs($run) {
                    match kind {
                        EventKind::Person => {
                            emit_all(taken, batch, output, make!(EventKind::Person))
                        }
                        EventKind::Auction => {
                            emit_all(taken, batch, output, make!(EventKind::Auction))
                        }
                        EventKind::Bid => emit_all(taken, batch, output, make!(EventKind::Bid)),
                    }
                }
            };
        }
        let Some(blocks) = whole_blocks else {
            each_run!(run);
            return;
        };
        // q8's source.
        each_run!(run.start..blocks.start * BLOCK_SIZE);
        emit_blocks(
            blocks.clone(),
            batch,
            output,
            make!(EventKind::Person),
            make!(EventKind::Auction),
        );
        each_run!(blocks.end * BLOCK_SIZE..run.end);
        return;
    }
    let made = RecordMaker {
        generator,
        fields,
        auction_details,
        filter,
    };
    // Filtered: each kind in a loop of its own, the kind a constant in it,
    // and no closure between the loop and the generator (the filter's test
    // made one too large to inline, and q2 took twice the instructions).
    macro_rules! each_run {
        ($run:expr) => {
            for (kind, taken) in kinds.taken_runs($run) {
                match kind {
                    EventKind::Person => emit_run(EventKind::Person, taken, &made, batch, output),
                    EventKind::Auction => emit_run(EventKind::Auction, taken, &made, batch, output),
                    EventKind::Bid => emit_run(EventKind::Bid, taken, &made, batch, output),
                }
            }
        };
    }
    let Some(blocks) = whole_blocks else {
        each_run!(run);
        return;
    };
    // q3's source: a call per kind per whole block.
    each_run!(run.start..blocks.start * BLOCK_SIZE);
    for block in blocks.clone() {
        let first = block * BLOCK_SIZE;
        emit_run(EventKind::Person, first..first + 1, &made, batch, output);
        let auctions = first + 1..first + 1 + AUCTIONS_PER_BLOCK;
        emit_run(EventKind::Auction, auctions, &made, batch, output);
    }
    each_run!(blocks.end * BLOCK_SIZE..run.end);
}

/// How a reader makes its records: with `fields` of each bid, and those
/// `filter` keeps.
struct RecordMaker<'a, F> {
    generator: Generator,
    fields: BidFields,
    auction_details: bool,
    filter: &'a F,
}

impl<F> RecordMaker<'_, F> {
    /// Record `index`, of kind `kind`, if kept. A bid tested on its
    /// auction and time alone is made with those first, and whole only if
    /// kept.
    #[inline(always)]
    fn make<T: NexmarkRecord>(&self, kind: EventKind, index: u64) -> Option<T>
    where
        F: SourceFilter<T>,
    {
        let (generator, fields, details) = (&self.generator, self.fields, self.auction_details);
        if F::READS_BID_HEAD && kind == EventKind::Bid {
            let head = T::generate(generator, kind, index, BidFields::NONE, details);
            return self
                .filter
                .keep(&head)
                .then(|| T::generate(generator, kind, index, fields, details));
        }
        Some(T::generate(generator, kind, index, fields, details))
            .filter(|record| self.filter.keep(record))
    }
}

/// Emits the records of kind `kind` that `made` makes of the indices `run`
/// (none where it makes none), stamped with their event time, into
/// `batch`, handing it to `output` whenever it is full.
#[inline(always)]
fn emit_run<T: NexmarkRecord, F: SourceFilter<T>>(
    kind: EventKind,
    run: Range<u64>,
    made: &RecordMaker<'_, F>,
    batch: &mut Vec<StreamRecord<T>>,
    output: &mut dyn SourceOutput<T>,
) {
    for index in run {
        if let Some(record) = made.make(kind, index) {
            push_record(record, batch, output);
        }
    }
}

/// The shortest run of indices that [`emit_all`] makes through `extend`.
const EXTEND_RUN_MIN: u64 = 8;

/// Emits the records that `make` makes of the indices `run`, as
/// [`emit_run`] with no filter.
#[inline(always)]
fn emit_all<T: NexmarkRecord>(
    run: Range<u64>,
    batch: &mut Vec<StreamRecord<T>>,
    output: &mut dyn SourceOutput<T>,
    make: impl Fn(u64) -> T,
) {
    // As many at a time as the batch has room for, through `extend` over
    // a range: a length known ahead, so the batch is written without a
    // capacity check or a length update per record (a push per record
    // took 14 of q7's 104 instructions per bid).
    if run.end - run.start < EXTEND_RUN_MIN {
        // A short run (a person, or three auctions, between bids): a
        // push each costs less than setting up an extend.
        for index in run {
            push_record(make(index), batch, output);
        }
        return;
    }
    extend_in_batches(run, batch, output, |index| [make(index)]);
}

/// Extends `batch` with the records `make` makes of each of `steps` (`N`
/// a step), stamped with their event time, as many steps at a time as the
/// batch has room for, handing it to `output` when it is full. Through
/// `extend` over an iterator of known length, the batch is written
/// without a capacity check or a length update per record.
#[inline(always)]
fn extend_in_batches<T: NexmarkRecord, const N: usize>(
    steps: Range<u64>,
    batch: &mut Vec<StreamRecord<T>>,
    output: &mut dyn SourceOutput<T>,
    make: impl Fn(u64) -> [T; N],
) {
    let mut from = steps.start;
    while from < steps.end {
        let room = CHAIN_BATCH_RECORDS.saturating_sub(batch.len()) / N;
        if room == 0 {
            // Not a whole step's room left: the batch goes as it is.
            output.collect_ordered_batch(batch);
            continue;
        }
        let to = steps.end.min(from + room as u64);
        batch.extend((from..to).flat_map(|step| {
            make(step).map(|record| StreamRecord {
                timestamp: record.date_time() as Timestamp,
                value: record,
            })
        }));
        from = to;
        if batch.len() >= CHAIN_BATCH_RECORDS {
            output.collect_ordered_batch(batch);
        }
    }
}

/// Emits the person and auctions of each of `blocks` (whole blocks of
/// [`BLOCK_SIZE`] indices), as [`emit_all`] does a run of one kind.
#[inline(always)]
fn emit_blocks<T: NexmarkRecord>(
    blocks: Range<u64>,
    batch: &mut Vec<StreamRecord<T>>,
    output: &mut dyn SourceOutput<T>,
    person: impl Fn(u64) -> T,
    auction: impl Fn(u64) -> T,
) {
    const _: () = assert!(AUCTIONS_PER_BLOCK == 3);
    extend_in_batches(blocks, batch, output, |block| {
        let first = block * BLOCK_SIZE;
        [
            person(first),
            auction(first + 1),
            auction(first + 2),
            auction(first + 3),
        ]
    });
}

/// Adds `record`, stamped with its event time, to `batch`, handing the
/// batch to `output` when it is full.
#[inline(always)]
fn push_record<T: NexmarkRecord>(
    record: T,
    batch: &mut Vec<StreamRecord<T>>,
    output: &mut dyn SourceOutput<T>,
) {
    batch.push(StreamRecord {
        timestamp: record.date_time() as Timestamp,
        value: record,
    });
    if batch.len() >= CHAIN_BATCH_RECORDS {
        output.collect_ordered_batch(batch);
    }
}

/// Fails the first time this process reaches a `--fail-at` index.
#[cold]
fn inject_failure(index: u64) {
    let mut failed = FAILED_AT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !failed.contains(&index) {
        failed.push(index);
        drop(failed);
        panic!("injected failure at event {index} (--fail-at)");
    }
}

impl<T: NexmarkRecord, F: SourceFilter<T>, const BID_FIELDS: u8> SourceReader<T>
    for NexmarkReader<T, F, BID_FIELDS>
{
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, budget: usize) -> SourceStatus {
        let kinds = self.kinds;
        // The budget in indices: a paced reader counts every index against
        // its rate; another reads about `budget` records' worth of indices
        // of its kinds where its splits hold whole blocks of events (the
        // Nexmark source's own do), and `budget` indices where they may
        // hold some kinds more than others.
        let indices = match &mut self.pace {
            Some(pace) => pace.allow(budget) as u64,
            None if self
                .splits
                .splits
                .iter()
                .all(|split| split.is_aligned_to(BLOCK_SIZE)) =>
            {
                (budget as u64).saturating_mul(BLOCK_SIZE) / kinds.per_block().max(1)
            }
            None => budget as u64,
        };
        if indices == 0 && !self.splits.is_finished() {
            return SourceStatus::NothingAvailable;
        }
        let (generator, fail_at, batch) = (self.generator, &self.fail_at, &mut self.batch);
        let (auction_details, filter) = (self.auction_details, &self.filter);
        let generate = |run: Range<u64>,
                        batch: &mut Vec<StreamRecord<T>>,
                        output: &mut dyn SourceOutput<T>| {
            generate_run::<T, F, BID_FIELDS>(
                generator,
                kinds,
                auction_details,
                filter,
                run,
                batch,
                output,
            );
        };
        let mut last = None;
        let status = self.splits.read_runs(indices, |run| {
            last = Some(run.end - 1);
            let mut from = run.start;
            // A failure to inject in this run: what comes before it is
            // emitted first.
            while let Some(at) = fail_at
                .iter()
                .copied()
                .filter(|at| (from..run.end).contains(at))
                .min()
            {
                generate(from..at, batch, output);
                output.collect_ordered_batch(batch);
                inject_failure(at);
                generate(at..at + 1, batch, output);
                from = at + 1;
            }
            generate(from..run.end, batch, output);
        });
        output.collect_ordered_batch(batch);
        if let Some(index) = last {
            // Read up to there, whether emitted or passed over: no later
            // record of this reader is older.
            output.skip_to(timestamp(index) as Timestamp);
        }
        status
    }

    fn snapshot_state(&mut self) -> Result<Vec<Vec<u8>>, String> {
        Ok(self.splits.snapshot())
    }
}

/// Sums the rows of one subtask into the job's answer accumulators. Its
/// rows and checksum are checkpointed, so the answer counts every row once
/// whatever fails; a job restored at another parallelism adds up the parts
/// each new subtask takes over.
#[derive(Clone, Debug, Default)]
pub struct AnswerSink {
    answer: Answer,
}

/// Accumulator names of the answer.
pub const ROWS_ACCUMULATOR: &str = "rows";
pub const CHECKSUM_ACCUMULATOR: &str = "checksum";

impl<R: AnswerRow> SinkFunction<R> for AnswerSink {
    fn invoke(&mut self, row: R, _timestamp: Timestamp) {
        self.answer.add_row(&row);
    }

    fn finish(&mut self, context: &OperatorContext) {
        let mut accumulators = context.accumulators.borrow_mut();
        accumulators.add(ROWS_ACCUMULATOR, self.answer.rows);
        accumulators.add(CHECKSUM_ACCUMULATOR, self.answer.checksum);
    }

    fn snapshot_state(&mut self, _checkpoint_id: u64) -> Vec<Vec<u8>> {
        let mut writer = StateWriter::default();
        writer.put_u64(self.answer.rows);
        writer.put_u64(self.answer.checksum);
        vec![writer.bytes]
    }

    fn restore_state(&mut self, elements: Vec<Vec<u8>>) -> Result<(), String> {
        for element in elements {
            let mut reader = StateReader::new(&element);
            self.answer.merge(Answer {
                rows: reader.u64()?,
                checksum: reader.u64()?,
            });
        }
        Ok(())
    }
}

/// The records of `source` of type `T`: every event, or one kind alone
/// (see [`NexmarkRecord`]), named after what they are.
fn read<T: NexmarkRecord>(
    env: &StreamExecutionEnvironment,
    source: &NexmarkSource,
    what: &str,
) -> DataStream<T> {
    read_from(env, source, source.clone(), what)
}

/// `records`, a part of `source`'s (a filtered one), aligned as it is.
fn read_from<T: NexmarkRecord>(
    env: &StreamExecutionEnvironment,
    source: &NexmarkSource,
    records: impl Source<T>,
    what: &str,
) -> DataStream<T> {
    let strategy = WatermarkStrategy::for_monotonous_timestamps();
    let strategy = match source.watermark_alignment {
        Some(drift) => strategy.with_watermark_alignment(WATERMARK_ALIGNMENT_GROUP, drift),
        None => strategy,
    };
    env.from_source(records, strategy, &format!("Source: nexmark {what}"))
}

/// The watermark alignment group of every nexmark source of a job.
const WATERMARK_ALIGNMENT_GROUP: &str = "nexmark";

fn bids(env: &StreamExecutionEnvironment, source: &NexmarkSource) -> DataStream<Bid> {
    read(env, source, "bids")
}

/// Where a query's rows go: the answer sink and, with `--output`, a file
/// sink that writes them as lines, committed by checkpoints.
struct RowSinks {
    query: Query,
    output: Option<PathBuf>,
}

impl RowSinks {
    fn add<R: AnswerRow + strom_core::Record>(&self, rows: DataStream<R>) {
        if let Some(directory) = &self.output {
            rows.clone()
                .add_sink(FileSink::new(
                    directory.clone(),
                    |row: &R, line: &mut String| {
                        let _ = row.write_row(line);
                    },
                ))
                .name(&format!("file sink {}", self.query.name()));
        }
        rows.add_sink(AnswerSink::default())
            .name(&format!("answer sink {}", self.query.name()));
    }
}

/// Ends a stream of rows in the query's sinks.
trait AddRowSinks {
    fn add_sink_with(self, sinks: &RowSinks);
}

impl<R: AnswerRow + strom_core::Record> AddRowSinks for DataStream<R> {
    fn add_sink_with(self, sinks: &RowSinks) {
        sinks.add(self);
    }
}

/// Builds query `query` over `source`'s events into `env`.
pub fn build_query(
    env: &StreamExecutionEnvironment,
    query: Query,
    source: NexmarkSource,
    output: Option<PathBuf>,
) {
    let sinks = RowSinks { query, output };
    // Only the events and bid fields the query reads are generated (the
    // source's filter and projection push-down): each kind is read from a
    // source of its own (bids, persons, auctions), computing only the bid
    // fields the query reads.
    let source = source
        .projected(query.bid_fields())
        .with_auction_details(query.auction_details());
    match query {
        Query::Q0 => {
            sinks.add(bids(env, &source));
        }
        Query::Q1 => {
            bids(env, &source)
                .map(|bid| Q1Row::from_bid(&bid))
                .name("q1 euro")
                .add_sink_with(&sinks);
        }
        Query::Q2 => {
            // The filter, on the auction alone, is pushed into the source:
            // a bid it drops is never made whole nor handed on.
            let selected = source.bids_where(|auction, _| Bid::is_q2_auction(auction));
            read_from(
                env,
                &source,
                selected,
                &format!("bids where auction % {Q2_AUCTION_DIVISOR} = 0"),
            )
            .map(|bid| Q2Row::from_bid(&bid))
            .name("q2 project")
            .add_sink_with(&sinks);
        }
        Query::Q3 => {
            // One source of the persons and auctions the join keeps (both
            // filters pushed into it: those it drops go no further), split
            // in two. At parallelism 1 the split and the join are then one
            // task (see the chaining rule in strom-core's graph.rs), where
            // two sources would each be a task of their own, their records
            // serialized to the join's.
            let events = read_from(
                env,
                &source,
                source
                    .only(EventKinds::PERSONS_AND_AUCTIONS)
                    .records_where(is_q3_selected),
                &format!(
                    "persons in {} and auctions in category {Q3_CATEGORY}",
                    Q3_STATES.join(", ")
                ),
            );
            // Of a person the join reads only their id and what the row
            // shows of them.
            let (persons, auctions) = split_persons_and_auctions(
                events,
                |person| Seller::of(&person),
                ["q3 person id and details", "q3 auction id and seller"],
            );
            persons
                .key_by(|seller| seller.id)
                .connect(auctions.key_by(|auction| auction.seller))
                .process(LocalItemSuggestion::default())
                .name("q3 join")
                .add_sink_with(&sinks);
        }
        Query::Q5 => {
            // As Flink SQL runs q5: a count per auction and sliding window,
            // then, per window, the auctions with the largest count. Both
            // are window aggregates, so each runs in two phases (a local
            // aggregate per slide before the shuffle, merged after it).
            let size = Duration::from_millis(Q5_WINDOW_SIZE_MS);
            let slide = Duration::from_millis(Q5_WINDOW_SLIDE_MS);
            bids(env, &source)
                .key_by(|bid| bid.auction)
                .window(WindowAssigner::sliding(size, slide))
                .aggregate_with(
                    Count,
                    |auction: &u64,
                     window: &TimeWindow,
                     count: u64,
                     out: &mut dyn Collector<Q5Row>| {
                        out.collect(Q5Row {
                            window_end: window.end as u64,
                            auction: *auction,
                            count,
                        });
                    },
                )
                .name("q5 bid counts")
                // A row is stamped with its window's last millisecond, so
                // the one slide-long window holding it is its own window's
                // last slide.
                .key_by(|row| row.window_end)
                .window(WindowAssigner::tumbling(slide))
                .aggregate_with(TopRows::new(|row: &Q5Row| row.count), each_row::<Q5Row>)
                .name("q5 hot items")
                .add_sink_with(&sinks);
        }
        Query::Q7 => {
            // As Flink SQL's q7, grouped by the window alone: the highest
            // bids of each subtask's share of a window (the local phase),
            // then of the whole window.
            bids(env, &source)
                // The constant size lets the compiler turn the division
                // into a multiplication.
                .key_by(|bid| tumbling_window_start(bid.date_time, Q7_WINDOW_SIZE_MS))
                .window(WindowAssigner::tumbling(Duration::from_millis(
                    Q7_WINDOW_SIZE_MS,
                )))
                .aggregate_with(
                    HighestBids,
                    |_: &u64,
                     window: &TimeWindow,
                     bids: Vec<Bid>,
                     out: &mut dyn Collector<Q7Row>| {
                        for bid in bids {
                            out.collect(Q7Row {
                                window_end: window.end as u64,
                                auction: bid.auction,
                                bidder: bid.bidder,
                                price: bid.price,
                            });
                        }
                    },
                )
                .name("q7 highest bid")
                .add_sink_with(&sinks);
        }
        Query::Q8 => {
            // One source of persons and auctions, split in two. Two
            // sources would drift apart in event time (the one of persons
            // reads a third as much), and without watermark alignment
            // between sources the join would hold the faster one's windows
            // open until the other caught up: at 10,000,000 events that
            // halved q8's throughput.
            let events = read::<PersonOrSoldAuction>(
                env,
                &source.only(EventKinds::PERSONS_AND_AUCTIONS),
                "persons and auctions",
            );
            let (persons, auctions) =
                split_persons_and_auctions(events, |person| person, ["persons", "auctions"]);
            let size = Q8_WINDOW_SIZE_MS;
            persons
                .join(auctions)
                .where_key(|person| person.id)
                .equal_to(|auction| auction.seller)
                .window(WindowAssigner::tumbling(Duration::from_millis(size)))
                .apply(move |person, auction| Q8Row {
                    person_id: person.id,
                    first_name: person.first_name,
                    last_name: person.last_name,
                    auction: auction.id,
                    window_end: tumbling_window_start(person.date_time, size) + size,
                })
                .name("q8 new users")
                .add_sink_with(&sinks);
        }
    }
}

/// Whether q3 keeps `event`: a person living in OR, ID or CA, or an
/// auction of its category.
fn is_q3_selected(event: &Event) -> bool {
    match event {
        Event::Person(person) => person.is_q3_selected(),
        Event::Auction(auction) => auction.is_q3_selected(),
        Event::Bid(_) => false,
    }
}

/// Splits a stream of persons and auctions in two, reading each event
/// once (a side output): `person` of each person, and of each auction
/// only its id and seller (the rest is left out before the shuffle, as
/// Flink SQL projects a join's inputs to the columns it uses). The
/// operator and its side output are named `names`.
fn split_persons_and_auctions<E: PersonsAndAuctions, P: strom_core::Record>(
    events: DataStream<E>,
    person: impl Fn(Person) -> P + Send + Sync + 'static,
    [persons_name, auctions_name]: [&str; 2],
) -> (DataStream<P>, DataStream<SoldAuction>) {
    let (persons, auctions) = events.split(
        move |event: E,
              persons: &mut dyn Collector<P>,
              auctions: &mut dyn Collector<SoldAuction>| {
            match event.join_input() {
                JoinInput::Person(kept) => persons.collect(person(kept)),
                JoinInput::Auction(auction) => auctions.collect(auction),
                JoinInput::Neither => {}
            }
        },
    );
    (persons.name(persons_name), auctions.name(auctions_name))
}

/// Counts the records of a window.
#[derive(Clone, Copy, Debug)]
pub struct Count;

impl<T> AggregateFunction<T, u64, u64> for Count {
    fn create_accumulator(&self) -> u64 {
        0
    }
    fn add(&self, _value: T, accumulator: &mut u64) {
        *accumulator += 1;
    }
    /// A record counted is not cloned.
    #[inline]
    fn add_ref(&self, _value: &T, accumulator: &mut u64)
    where
        T: Clone,
    {
        *accumulator += 1;
    }
    fn get_result(&self, accumulator: u64) -> u64 {
        accumulator
    }
    fn merge(&self, first: u64, second: u64) -> u64 {
        first + second
    }
}

/// Keeps the bids with the highest price of a window.
#[derive(Clone, Copy, Debug)]
pub struct HighestBids;

/// The bids at the highest price so far, and that price (0 while there
/// are none): the price beside the bids, so that the test most bids fail
/// reads one field rather than the first bid through the vector (2 of
/// q7's instructions a bid).
#[derive(Clone, Debug, Default, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Highest {
    price: u64,
    bids: Vec<Bid>,
}

impl AggregateFunction<Bid, Highest, Vec<Bid>> for HighestBids {
    fn create_accumulator(&self) -> Highest {
        Highest::default()
    }
    fn add(&self, bid: Bid, highest: &mut Highest) {
        // With no bids the price is 0, so the first bid is kept either way.
        if bid.price > highest.price {
            highest.price = bid.price;
            highest.bids.clear();
            highest.bids.push(bid);
        } else if bid.price == highest.price {
            highest.bids.push(bid);
        }
    }
    /// A bid is cloned only if it is kept: most are below the window's
    /// highest so far (a clone each was 0.8% of q7's instructions).
    #[inline]
    fn add_ref(&self, bid: &Bid, highest: &mut Highest) {
        if bid.price < highest.price {
            return;
        }
        self.add(bid.clone(), highest);
    }
    fn get_result(&self, highest: Highest) -> Vec<Bid> {
        highest.bids
    }
    fn merge(&self, first: Highest, second: Highest) -> Highest {
        let mut merged = first;
        for bid in second.bids {
            self.add(bid, &mut merged);
        }
        merged
    }
}

/// Keeps the rows with the largest measure (all of them on a tie): the
/// second stage of q5.
pub struct TopRows<R, M> {
    /// The measure, a type of its own (not a fn pointer) so that `add`
    /// compiles it in.
    measure: M,
    _rows: PhantomData<fn(&R)>,
}

impl<R, M: Fn(&R) -> u64> TopRows<R, M> {
    pub fn new(measure: M) -> Self {
        TopRows {
            measure,
            _rows: PhantomData,
        }
    }
}

impl<R, M: Clone> Clone for TopRows<R, M> {
    fn clone(&self) -> Self {
        TopRows {
            measure: self.measure.clone(),
            _rows: PhantomData,
        }
    }
}

impl<R, M> AggregateFunction<R, Vec<R>, Vec<R>> for TopRows<R, M>
where
    R: Clone + Send + Sync + 'static,
    M: Fn(&R) -> u64 + Clone + Send + Sync + 'static,
{
    fn create_accumulator(&self) -> Vec<R> {
        Vec::new()
    }
    #[inline]
    fn add(&self, row: R, top: &mut Vec<R>) {
        let measure = (self.measure)(&row);
        match top.first().map(&self.measure) {
            Some(largest) if measure < largest => {}
            Some(largest) if measure == largest => top.push(row),
            _ => {
                top.clear();
                top.push(row);
            }
        }
    }
    /// A row is cloned only if it is kept.
    #[inline]
    fn add_ref(&self, row: &R, top: &mut Vec<R>) {
        if top
            .first()
            .is_some_and(|largest| (self.measure)(row) < (self.measure)(largest))
        {
            return;
        }
        self.add(row.clone(), top);
    }
    fn get_result(&self, top: Vec<R>) -> Vec<R> {
        top
    }
    fn merge(&self, first: Vec<R>, second: Vec<R>) -> Vec<R> {
        let mut merged = first;
        for row in second {
            self.add(row, &mut merged);
        }
        merged
    }
}

/// A window function that emits every row of a window's result.
pub fn each_row<R>(_: &u64, _: &TimeWindow, rows: Vec<R>, out: &mut dyn Collector<R>) {
    for row in rows {
        out.collect(row);
    }
}

/// q3: joins each selected person with the selected auctions they sell,
/// whichever arrives first, each pair once. Person ids are unique, so a
/// person is kept and auctions that came before their seller wait for it.
#[derive(Clone, Default)]
pub struct LocalItemSuggestion {
    person: ValueState<SellerDetails>,
    /// The ids of the auctions waiting for their seller.
    waiting_auctions: ListState<u64>,
}

/// An auction as the joins of q3 and q8 read it: its id and seller.
#[derive(Clone, Copy, Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SoldAuction {
    pub id: u64,
    pub seller: u64,
}

impl SoldAuction {
    pub fn of(auction: &Auction) -> SoldAuction {
        SoldAuction {
            id: auction.id,
            seller: auction.seller,
        }
    }
}

/// A person as q3's join reads them: their id and what q3's row shows of
/// them (16 bytes instead of a whole person's 24).
#[derive(Clone, Copy, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct Seller {
    pub id: u64,
    pub details: SellerDetails,
}

/// What q3's row shows of a seller; the join keeps this per person.
#[derive(Clone, Copy, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct SellerDetails {
    pub first_name: u8,
    pub last_name: u8,
    pub city: u8,
    pub state: u8,
}

impl Seller {
    pub fn of(person: &Person) -> Seller {
        Seller {
            id: person.id,
            details: SellerDetails {
                first_name: person.first_name,
                last_name: person.last_name,
                city: person.city,
                state: person.state,
            },
        }
    }
}

impl SellerDetails {
    /// q3's row of this seller and the auction with id `auction`.
    #[inline]
    pub fn row(&self, auction: u64) -> Q3Row {
        Q3Row {
            first_name: self.first_name,
            last_name: self.last_name,
            city: self.city,
            state: self.state,
            auction,
        }
    }
}

impl KeyedCoProcessFunction<u64, Seller, SoldAuction, Q3Row> for LocalItemSuggestion {
    fn open(&mut self, state: &mut KeyedStateStore<u64>) {
        self.person = state.value_state("person");
        self.waiting_auctions = state.list_state("waiting-auctions");
    }

    fn process_element1(
        &mut self,
        seller: Seller,
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<Q3Row>,
    ) {
        for auction in self.waiting_auctions.take(context) {
            out.collect(seller.details.row(auction));
        }
        self.person.update(context, seller.details);
    }

    fn process_element2(
        &mut self,
        auction: SoldAuction,
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<Q3Row>,
    ) {
        match self.person.value(context) {
            Some(seller) => out.collect(seller.row(auction.id)),
            None => self.waiting_auctions.add(context, auction.id),
        }
    }
}

fn nexmark_command() -> clap::Command {
    clap::Command::new("nexmark")
        .about("A Nexmark query over generated events; prints its answer and throughput")
        .arg(
            clap::Arg::new("query")
                .long("query")
                .required(true)
                .value_parser(clap::builder::ValueParser::new(|value: &str| {
                    value.parse::<Query>()
                }))
                .help("The query: q0, q1, q2, q3, q5, q7 or q8"),
        )
        .arg(
            clap::Arg::new("events")
                .long("events")
                .default_value("1000000")
                .allow_negative_numbers(true)
                .value_parser(clap::value_parser!(u64))
                .help("How many events to generate (persons, auctions and bids)"),
        )
        .arg(
            clap::Arg::new("seed")
                .long("seed")
                .default_value("42")
                .allow_negative_numbers(true)
                .value_parser(clap::value_parser!(u64))
                .help("The generator's seed"),
        )
        .arg(
            clap::Arg::new("fail-at")
                .long("fail-at")
                .value_name("I,J,...")
                .value_delimiter(',')
                .value_parser(clap::value_parser!(u64))
                .help("Fail the source subtask that produces event I when it reaches it, once each, to see recovery"),
        )
        .arg(
            clap::Arg::new("output")
                .long("output")
                .value_name("DIR")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Also write the rows, one a line, into part files in DIR, committed exactly once by checkpoints"),
        )
        .arg(
            clap::Arg::new("events-per-second")
                .long("events-per-second")
                .value_name("RATE")
                .default_value("0")
                .value_parser(clap::value_parser!(u64))
                .help("Generate at most this many events per second (0: as fast as possible)"),
        )
        .arg(
            clap::Arg::new("watermark-alignment")
                .long("watermark-alignment")
                .value_name("DRIFT")
                .default_value("off")
                .value_parser(clap::builder::ValueParser::new(|value: &str| {
                    match value {
                        "off" => Ok(None),
                        _ => strom_core::config::parse_duration(value)
                            .and_then(|drift| {
                                if drift.as_millis() == 0 {
                                    Err("the drift must be at least 1ms (or 'off')".to_string())
                                } else {
                                    Ok(drift)
                                }
                            })
                            .map(Some),
                    }
                }))
                .help("Keep the source subtasks within DRIFT of event time of each other where their streams meet (watermark alignment, e.g. 30s; more than the 10s of event time of a split block, which the subtasks read at once), or 'off'"),
        )
}

fn query_and_config(matches: &clap::ArgMatches) -> (Query, GeneratorConfig) {
    let query = *matches
        .get_one::<Query>("query")
        .expect("--query is required");
    let events = *matches
        .get_one::<u64>("events")
        .expect("--events has a default");
    let seed = *matches
        .get_one::<u64>("seed")
        .expect("--seed has a default");
    (query, GeneratorConfig { events, seed })
}

fn build_nexmark(
    env: &StreamExecutionEnvironment,
    matches: &clap::ArgMatches,
) -> Result<(), String> {
    let (query, config) = query_and_config(matches);
    env.set_job_name(&format!("nexmark {}", query.name()));
    let fail_at: Vec<u64> = matches
        .get_many::<u64>("fail-at")
        .map(|indices| indices.copied().collect())
        .unwrap_or_default();
    if let Some(beyond) = fail_at.iter().find(|index| **index >= config.events) {
        return Err(format!(
            "--fail-at {beyond} is beyond the last event ({})",
            config.events.saturating_sub(1)
        ));
    }
    let source = NexmarkSource {
        config,
        fail_at: Arc::new(fail_at),
        events_per_second: *matches
            .get_one::<u64>("events-per-second")
            .expect("--events-per-second has a default"),
        watermark_alignment: *matches
            .get_one::<Option<Duration>>("watermark-alignment")
            .expect("--watermark-alignment has a default"),
        ..NexmarkSource::new(config)
    };
    build_query(
        env,
        query,
        source,
        matches.get_one::<PathBuf>("output").cloned(),
    );
    Ok(())
}

/// The answer of a finished nexmark job.
pub fn answer_of(outcome: &JobOutcome) -> Answer {
    Answer {
        rows: outcome.accumulators.get(ROWS_ACCUMULATOR).unwrap_or(0),
        checksum: outcome.accumulators.get(CHECKSUM_ACCUMULATOR).unwrap_or(0),
    }
}

fn report_nexmark(matches: &clap::ArgMatches, outcome: &JobOutcome) -> Vec<String> {
    let (query, config) = query_and_config(matches);
    let seconds = outcome.duration.as_secs_f64().max(f64::MIN_POSITIVE);
    let events_per_second = config.events as f64 / seconds;
    vec![
        answer_of(outcome).line(query),
        format!(
            "throughput: {:.0} events/s, {:.0} events/s per core ({} events in {:.3} s on {} cores)",
            events_per_second,
            events_per_second / f64::from(outcome.slots_used.max(1)),
            config.events,
            seconds,
            outcome.slots_used
        ),
    ]
}

/// The `nexmark` job program.
pub const NEXMARK_PROGRAM: Program = Program {
    name: "nexmark",
    about: "Nexmark queries q0, q1, q2, q3, q5, q7, q8 over generated events",
    command: nexmark_command,
    build: build_nexmark,
    report: report_nexmark,
};

#[cfg(test)]
mod tests {
    use super::*;

    fn bid_at(price: u64, auction: u64) -> Bid {
        Bid {
            auction,
            bidder: auction + 100,
            price,
            channel: 0,
            url_id: 0,
            date_time: 1_700_000_000_000,
        }
    }

    #[test]
    fn the_highest_bids_are_the_same_added_by_value_by_reference_or_merged() {
        // Ties, a lower price after a higher one, a price of 0 first.
        let prices = [0, 0, 5, 3, 5, 9, 2, 9, 9, 1, 0];
        let bids: Vec<Bid> = (0..)
            .zip(prices)
            .map(|(auction, price)| bid_at(price, auction))
            .collect();
        let by_value = bids
            .iter()
            .fold(HighestBids.create_accumulator(), |mut acc, bid| {
                HighestBids.add(bid.clone(), &mut acc);
                acc
            });
        let by_reference = bids
            .iter()
            .fold(HighestBids.create_accumulator(), |mut acc, bid| {
                HighestBids.add_ref(bid, &mut acc);
                acc
            });
        assert_eq!(by_reference, by_value);
        let highest = HighestBids.get_result(by_value);
        let auctions: Vec<u64> = highest.iter().map(|bid| bid.auction).collect();
        assert_eq!(auctions, [5, 7, 8], "the three bids at 9, in order");
        // Split anywhere and merged, the same.
        for at in 0..=bids.len() {
            let partial = |part: &[Bid]| {
                let mut acc = HighestBids.create_accumulator();
                part.iter()
                    .for_each(|bid| HighestBids.add_ref(bid, &mut acc));
                acc
            };
            let merged = HighestBids.merge(partial(&bids[..at]), partial(&bids[at..]));
            assert_eq!(HighestBids.get_result(merged), highest, "split at {at}");
        }
        // Only bids at 0: all of them.
        let mut zeros = HighestBids.create_accumulator();
        HighestBids.add_ref(&bid_at(0, 1), &mut zeros);
        HighestBids.add_ref(&bid_at(0, 2), &mut zeros);
        assert_eq!(HighestBids.get_result(zeros).len(), 2);
    }

    #[test]
    fn the_top_rows_are_the_same_added_by_value_or_by_reference() {
        let top = TopRows::new(|row: &(u64, u64)| row.1);
        let rows = [(1, 4), (2, 7), (3, 7), (4, 2), (5, 7), (6, 0)];
        let mut by_value = top.create_accumulator();
        let mut by_reference = top.create_accumulator();
        for row in rows {
            top.add(row, &mut by_value);
            top.add_ref(&row, &mut by_reference);
        }
        assert_eq!(by_reference, by_value);
        assert_eq!(by_value, [(2, 7), (3, 7), (5, 7)]);
    }

    /// What a reader emitted, and how far it said event time went.
    struct Recorded<T> {
        records: Vec<(T, Timestamp)>,
        skipped_to: Option<Timestamp>,
        /// The most records handed over in one batch.
        largest_batch: usize,
    }

    impl<T: NexmarkRecord> SourceOutput<T> for Recorded<T> {
        fn collect(&mut self, record: T) {
            let timestamp = record.date_time() as Timestamp;
            self.records.push((record, timestamp));
        }
        fn collect_with_timestamp(&mut self, record: T, timestamp: Timestamp) {
            self.records.push((record, timestamp));
        }
        fn skip_to(&mut self, timestamp: Timestamp) {
            self.skipped_to = self.skipped_to.max(Some(timestamp));
        }
        fn collect_batch(&mut self, records: &mut Vec<StreamRecord<T>>) {
            self.largest_batch = self.largest_batch.max(records.len());
            for record in records.drain(..) {
                self.collect_with_timestamp(record.value, record.timestamp);
            }
        }
        fn collect_ordered_batch(&mut self, records: &mut Vec<StreamRecord<T>>) {
            // What the collector takes on trust: the last record is the latest.
            let latest = self.records.last().map(|(_, timestamp)| *timestamp);
            assert!(
                latest
                    .into_iter()
                    .chain(records.iter().map(|record| record.timestamp))
                    .is_sorted(),
                "a batch said to be in event-time order is not"
            );
            self.collect_batch(records);
        }
    }

    /// q8's projection of a person or an auction: persons whole, auctions
    /// as id, seller and time.
    fn projected(event: Event) -> PersonOrSoldAuction {
        match event {
            Event::Person(person) => PersonOrSoldAuction::Person(person),
            Event::Auction(auction) => PersonOrSoldAuction::Auction {
                auction: SoldAuction::of(&auction),
                date_time: auction.date_time,
            },
            Event::Bid(bid) => panic!("expected no bids, got {bid:?}"),
        }
    }

    fn read_all<T: NexmarkRecord>(reader: &mut dyn SourceReader<T>, budget: usize) -> Recorded<T> {
        let mut recorded = Recorded {
            records: Vec::new(),
            skipped_to: None,
            largest_batch: 0,
        };
        while reader.poll_next(&mut recorded, budget) != SourceStatus::Finished {}
        recorded
    }

    /// Subtask `subtask` of `parallelism` of a source of `T`s.
    fn reader<T: NexmarkRecord>(
        source: &NexmarkSource,
        subtask: u32,
        parallelism: u32,
    ) -> Box<dyn SourceReader<T>> {
        Source::<T>::create_reader(source, subtask, parallelism)
    }

    const CONFIG: GeneratorConfig = GeneratorConfig {
        events: 1_000,
        seed: 42,
    };

    /// What a filtered source emits, against its unfiltered source's
    /// records that `keep` keeps, at parallelisms 1 to 3 and restored from
    /// a checkpoint taken after one poll.
    fn assert_filtered<T, P>(
        source: &NexmarkSource,
        filtered: &Filtered<T, P>,
        keep: impl Fn(&T) -> bool,
        is_whole: impl Fn(&T) -> bool,
    ) where
        T: NexmarkRecord + PartialEq + std::fmt::Debug,
        P: SourceFilter<T>,
    {
        for parallelism in 1..=3 {
            for subtask in 0..parallelism {
                let all = read_all(&mut *reader::<T>(source, subtask, parallelism), 7);
                let kept = read_all(&mut *filtered.create_reader(subtask, parallelism), 7);
                let expected: Vec<_> = all
                    .records
                    .iter()
                    .filter(|(record, _)| keep(record))
                    .cloned()
                    .collect();
                assert!(!expected.is_empty() && expected.len() < all.records.len());
                assert!(expected.iter().all(|(record, _)| is_whole(record)));
                assert_eq!(kept.records, expected);
                // Event time still goes as far as the indices read.
                assert_eq!(kept.skipped_to, all.skipped_to);
            }
        }
        let mut first = filtered.create_reader(0, 1);
        let mut before = Recorded {
            records: Vec::new(),
            skipped_to: None,
            largest_batch: 0,
        };
        first.poll_next(&mut before, 10);
        let state = first.snapshot_state().unwrap();
        let after = read_all(&mut *filtered.restore_reader(0, 1, state).unwrap(), 10);
        let all = read_all(&mut *filtered.create_reader(0, 1), 10);
        assert!(!before.records.is_empty() && !after.records.is_empty());
        assert_eq!([before.records, after.records].concat(), all.records);
    }

    #[test]
    fn a_source_of_persons_and_auctions_emits_them_in_index_order_in_batches_of_the_chain_size() {
        // Enough events for many batches, in splits of blocks of 70 indices
        // (a whole block of 50 and a part of one at either end), read with
        // a budget that fills batches and ends polls inside a block (so
        // that a batch starts with a block's last auctions).
        let config = GeneratorConfig {
            events: 20_000,
            seed: 7,
        };
        let generator = config.generator();
        let kinds = EventKinds::PERSONS_AND_AUCTIONS;
        let source = NexmarkSource::new(config).only(kinds);
        for (parallelism, block) in [(1, 70), (2, 70), (1, SPLIT_BLOCK_EVENTS)] {
            let source = source.with_split_block(block);
            for subtask in 0..parallelism {
                let mut split =
                    IndexSplits::fresh_blocks(subtask, parallelism, config.events, block);
                let indices: Vec<u64> = std::iter::from_fn(|| split.next_index())
                    .filter(|&index| kinds.includes(index))
                    .collect();
                let expected: Vec<_> = indices
                    .iter()
                    .map(|&index| {
                        (
                            projected(generator.event(index)),
                            timestamp(index) as Timestamp,
                        )
                    })
                    .collect();
                let reader = &mut *reader::<PersonOrSoldAuction>(&source, subtask, parallelism);
                let recorded = read_all(reader, 10_001);
                assert_eq!(
                    recorded.records, expected,
                    "subtask {subtask} of {parallelism}"
                );
                assert_eq!(recorded.largest_batch, CHAIN_BATCH_RECORDS);
                // The same as q3 reads them: whole events, filtered.
                let selected = is_q3_selected;
                let filtered = source.records_where(selected);
                let recorded = read_all(&mut *filtered.create_reader(subtask, parallelism), 10_001);
                let expected: Vec<_> = indices
                    .iter()
                    .map(|&index| (generator.event(index), timestamp(index) as Timestamp))
                    .filter(|(event, _)| selected(event))
                    .collect();
                assert_eq!(
                    recorded.records, expected,
                    "q3's, subtask {subtask} of {parallelism}"
                );
                assert!(recorded.largest_batch <= CHAIN_BATCH_RECORDS);
            }
        }
    }

    #[test]
    fn a_filter_pushed_into_the_source_emits_the_records_it_keeps_whole() {
        let source = NexmarkSource::new(CONFIG)
            .with_split_block(100)
            .projected(BidFields {
                bidder: true,
                price: true,
                ..BidFields::NONE
            });
        // Kept bids have every field of the projection, though the filter
        // saw only the auction and time.
        let whole = |bid: &Bid| bid.bidder != 0 && bid.price != 0;
        let on_auction = |auction: u64, _date_time: u64| auction.is_multiple_of(3);
        let keep = |bid: &Bid| on_auction(bid.auction, bid.date_time);
        assert_filtered(&source, &source.bids_where(on_auction), keep, whole);
        // A filter of whole records sees every field.
        let cheap = |bid: &Bid| bid.price < 50_000;
        assert_filtered(&source, &source.records_where(cheap), cheap, whole);
        let selected = Person::is_q3_selected;
        assert_filtered(&source, &source.records_where(selected), selected, |_| true);
        let selected = Auction::is_q3_selected;
        assert_filtered(&source, &source.records_where(selected), selected, |_| true);
        // Persons and auctions in one stream (q3's), each block's in one
        // step where the reader's run holds the whole block.
        let both = source.only(EventKinds::PERSONS_AND_AUCTIONS);
        let selected = |event: &Event| match event {
            Event::Person(person) => person.is_q3_selected(),
            Event::Auction(auction) => auction.is_q3_selected(),
            Event::Bid(_) => panic!("a source of persons and auctions made a bid"),
        };
        assert_filtered(&both, &both.records_where(selected), selected, |_| true);
    }

    #[test]
    fn a_poll_emits_about_its_budget_of_records_however_its_splits_fall() {
        let persons = NexmarkSource::new(CONFIG).only(EventKinds::PERSONS);
        // Splits of whole blocks of events: the budget is records.
        let polled = |source: &NexmarkSource, subtask: u32, parallelism: u32| {
            let mut recorded = Recorded {
                records: Vec::new(),
                skipped_to: None,
                largest_batch: 0,
            };
            reader::<Person>(source, subtask, parallelism).poll_next(&mut recorded, 10);
            recorded.records.len()
        };
        assert_eq!(polled(&persons, 0, 1), 10);
        // One index each in turn: subtask 0 of 50 holds every person and
        // nothing else, so a budget of indices would be 50 times too much.
        assert!(polled(&persons.with_split_block(1), 0, 50) <= 10);
    }

    #[test]
    fn a_failure_is_injected_at_its_index_after_every_record_before_it() {
        // Index 517 is a bid in the middle of a run of bids (block 10,
        // slots 4 to 49), and no other test of this process fails there.
        let at = 517;
        let source = NexmarkSource {
            fail_at: Arc::new(vec![at]),
            ..NexmarkSource::new(CONFIG)
        };
        let mut failing = reader::<Bid>(&source, 0, 1);
        let mut recorded = Recorded {
            records: Vec::new(),
            skipped_to: None,
            largest_batch: 0,
        };
        let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            while failing.poll_next(&mut recorded, 1_000) != SourceStatus::Finished {}
        }));
        let message = failed.expect_err("the reader fails at --fail-at 517");
        assert!(
            message
                .downcast_ref::<String>()
                .is_some_and(|message| message.contains("injected failure at event 517")),
            "{message:?}"
        );
        // Every bid before it was handed on first, and none after.
        let indices: Vec<u64> = (0..at).filter(|index| index % 50 >= 4).collect();
        assert_eq!(recorded.records.len(), indices.len());
        let generator = CONFIG.generator();
        for ((bid, _), index) in recorded.records.iter().zip(&indices) {
            assert_eq!(*bid, generator.bid_with(*index, BidFields::ALL));
        }
        // Restarted, a reader fails there no more (once per process).
        let again = read_all(&mut *reader::<Bid>(&source, 0, 1), 1_000);
        assert_eq!(again.records.len(), 920);
    }

    #[test]
    fn a_source_of_some_kinds_emits_exactly_those_and_moves_event_time_past_the_rest() {
        let generator = CONFIG.generator();
        let source = NexmarkSource::new(CONFIG)
            .only(EventKinds::PERSONS_AND_AUCTIONS)
            .with_split_block(1);

        let recorded = read_all(&mut *reader::<Event>(&source, 0, 1), 7);
        let expected: Vec<(Event, Timestamp)> = (0..CONFIG.events)
            .filter(|index| index % 50 < 4)
            .map(|index| {
                let event = generator.event(index);
                let timestamp = event.date_time() as Timestamp;
                (event, timestamp)
            })
            .collect();
        assert_eq!(recorded.records, expected);
        // The last event (index 999) is a bid, passed over.
        assert_eq!(recorded.skipped_to, Some(timestamp(999) as Timestamp));

        // Subtask 4 of 5 reads indices 4, 9, ..., 999: bids only. It emits
        // nothing, and its event time still reaches the last of them.
        let recorded = read_all(&mut *reader::<Event>(&source, 4, 5), 1_000);
        assert!(recorded.records.is_empty());
        assert_eq!(recorded.skipped_to, Some(timestamp(999) as Timestamp));

        let bids = read_all(
            &mut *reader::<Event>(&NexmarkSource::new(CONFIG).only(EventKinds::BIDS), 0, 1),
            64,
        );
        assert_eq!(bids.records.len(), 920);
        assert!(bids
            .records
            .iter()
            .all(|(event, _)| matches!(event, Event::Bid(_))));
    }

    /// The records a source of `T`s emits over all subtasks of
    /// `parallelism`, in index order, are `expected` of every index of
    /// `kinds`, and every subtask's event time reaches its last index.
    fn assert_reads_exactly<T: NexmarkRecord + PartialEq + std::fmt::Debug>(
        source: &NexmarkSource,
        kinds: EventKinds,
        expected: impl Fn(u64) -> T,
    ) {
        // One event each in turn, and blocks that end inside the input.
        for (parallelism, block) in [(1, 1), (3, 1), (3, 70), (2, SPLIT_BLOCK_EVENTS)] {
            let source = source.with_split_block(block);
            let mut records = Vec::new();
            for subtask in 0..parallelism {
                let recorded = read_all(&mut *reader::<T>(&source, subtask, parallelism), 5);
                let mut split =
                    IndexSplits::fresh_blocks(subtask, parallelism, CONFIG.events, block);
                let Some(last) = std::iter::from_fn(|| split.next_index()).last() else {
                    // A subtask without a block: it reads nothing.
                    assert!(recorded.records.is_empty());
                    continue;
                };
                let reached = (recorded.skipped_to.into_iter())
                    .chain(recorded.records.last().map(|(_, timestamp)| *timestamp))
                    .max()
                    .expect("event time moved");
                // A reader claims event time up to its last index read,
                // emitted or passed over, and no further.
                assert_eq!(
                    reached as u64,
                    timestamp(last),
                    "subtask {subtask} of {parallelism}: event time reached, its last index {last}"
                );
                records.extend(recorded.records);
            }
            records.sort_by_key(|(record, _)| record.date_time());
            let wanted: Vec<(T, Timestamp)> = (0..CONFIG.events)
                .filter(|&index| kinds.includes(index))
                .map(|index| (expected(index), timestamp(index) as Timestamp))
                .collect();
            // Order within a millisecond differs between subtasks: compare
            // as sorted lists.
            let sort = |mut list: Vec<(T, Timestamp)>| {
                list.sort_by(|a, b| (a.1, format!("{:?}", a.0)).cmp(&(b.1, format!("{:?}", b.0))));
                list
            };
            assert_eq!(
                sort(records),
                sort(wanted),
                "parallelism {parallelism}, blocks of {block}"
            );
        }
    }

    #[test]
    fn sources_of_bids_persons_and_auctions_emit_that_kind_alone_with_the_fields_asked_for() {
        let generator = CONFIG.generator();
        let price_only = BidFields {
            price: true,
            ..BidFields::NONE
        };
        let source = NexmarkSource::new(CONFIG).projected(price_only);
        assert_reads_exactly::<Bid>(&source, EventKinds::BIDS, |index| {
            generator.bid_with(index, price_only)
        });
        assert_reads_exactly::<Person>(&source, EventKinds::PERSONS, |index| {
            generator.person(index)
        });
        assert_reads_exactly::<Auction>(&source, EventKinds::AUCTIONS, |index| {
            generator.auction(index)
        });
        // Without an auction's details: the rest of it as before, they zero.
        let without_details = source.with_auction_details(false);
        assert_reads_exactly::<Auction>(&without_details, EventKinds::AUCTIONS, |index| Auction {
            initial_bid: 0,
            reserve: 0,
            expires: 0,
            ..generator.auction(index)
        });
        // q8's projection: persons whole, auctions as id, seller and time,
        // whatever kinds it was asked for.
        assert_reads_exactly::<PersonOrSoldAuction>(
            &source.only(EventKinds::ALL),
            EventKinds::PERSONS_AND_AUCTIONS,
            |index| projected(generator.event(index)),
        );
    }
}
