//! End-to-end latency of the engine, open loop, against the floor of the
//! machine: the `latency` job program and what `strom-bench latency` needs
//! around it.
//!
//! How it measures (the reference for anyone reproducing the figures):
//!
//! 1. Clock. Every timestamp is `CLOCK_MONOTONIC` in nanoseconds
//!    ([`monotonic_now_ns`]), the one clock that every thread and every
//!    process of one machine reads alike, so a stamp taken on the source's
//!    core can be subtracted from a reading on the sink's core (or in
//!    another process).
//! 2. Open loop, scheduled stamps. The source ([`PacedBidSource`]) is paced
//!    at a fixed rate: event `i` (over all source subtasks) is due at
//!    `start + i / rate`, `start` being the first poll of the subtask's
//!    reader (the warm-up covers the consumers' start). Each record carries
//!    that *scheduled* time, not the time it was actually emitted, so a
//!    stall anywhere (the source not polled, a full ring, a slow sink) makes
//!    every record scheduled during it late, as a user would see it: no
//!    coordinated omission. The source never busy-waits its slot: a poll
//!    emits every event that is due (up to the task's budget) and returns
//!    `NothingAvailable` while the next one is not due yet; the task loop
//!    then flushes its partial buffers and polls again after its idle
//!    interval. Each record also carries the time its poll emitted it, so
//!    that the sink can split the latency into waiting to be emitted and
//!    travelling.
//! 3. Records. A q1-style bid ([`StampedBid`]: auction, bidder, price from
//!    the Nexmark generator's bids, and the two stamps), keyed by auction,
//!    converted to euro by a keyed q1 map ([`EuroConversion`]), into
//!    [`LatencySink`]. No watermarks: nothing else travels in band.
//! 4. Slots. The source is in slot sharing group [`SOURCE_GROUP`], the map
//!    and the sink in [`SINK_GROUP`], so at parallelism 1 the job takes two
//!    slots and every record crosses cores. `strom-bench latency` places
//!    them (`--placements`) in two slots of one TaskManager (`slots`: one
//!    slot-to-slot ring), in two TaskManagers of one slot each in its own
//!    process (`task-managers`: TCP over loopback between the two
//!    TaskManagers' network services, each running on its TaskManager's
//!    only slot, exactly as between processes), or in two TaskManager processes that it starts
//!    from its own binary (`processes`). With one slot per TaskManager the
//!    two slots are on different TaskManagers; the harness checks that
//!    from the JobManager's record of where each subtask ran, and fails if
//!    not.
//! 5. Histograms. The sink records, per record, in nanoseconds, into one
//!    HDR histogram (3 significant digits) each: `now - scheduled` (end to
//!    end, the latency), `emitted - scheduled` (source wait: how long the
//!    record waited for its poll) and `now - emitted` (transit: buffers,
//!    channels, operators) ([`LatencyKind`]). The records of the first
//!    `--warmup` of the schedule (counted from the first scheduled stamp the
//!    sink sees) are counted but not recorded, so that setting up links
//!    and caches does not count as steady state. At the end of input the
//!    sink writes its histograms with hdrhistogram's V2 serializer to
//!    [`histogram_path`] (one file of each kind per sink subtask), which
//!    the harness reads and merges ([`merge_histograms`]). Records
//!    received go to the [`RECEIVED_ACCUMULATOR`] accumulator.
//! 6. Floor ([`floor`]): in the same invocation, (i) a ping-pong between two
//!    executors pinned to two CPUs through the ring type the engine uses
//!    between slots ([`strom_net::channel::channel`]), one way being half a
//!    round trip, once with executors that park when idle as slots do and
//!    once with executors that spin (the ring without the cross-core
//!    wake-up); (ii) a round trip of a small message over loopback TCP
//!    (`TCP_NODELAY`, glommio's io_uring sockets, as the engine's links).
//!    The harness prints the engine's p99 as a ratio to the parking ring
//!    floor's (one way) for the placement in one TaskManager, and to the
//!    TCP round trip's (a whole round trip, not halved) for the placements
//!    across two TaskManagers.
//!
//! Everything runs on the machine as it is: figures from a machine that
//! runs other work (a build) carry its scheduling delays, in the floor as
//! in the engine, which is why the floor is measured in the same
//! invocation.

pub mod floor;

use std::path::{Path, PathBuf};
use std::time::Duration;

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use strom_core::function::{Collector, KeyedContext, KeyedProcessFunction, SinkFunction};
use strom_core::operator::OperatorContext;
use strom_core::program::{JobOutcome, Program};
use strom_core::source::{Boundedness, Source, SourceOutput, SourceReader, SourceStatus};
use strom_core::{StreamExecutionEnvironment, Timestamp, WatermarkStrategy};

use crate::nexmark::generator::BLOCK_SIZE;
use crate::nexmark::model::{Q1_EURO_RATE_DENOMINATOR, Q1_EURO_RATE_NUMERATOR};
use crate::nexmark::Generator;

/// The slot sharing group of the source.
pub const SOURCE_GROUP: &str = "latency-source";
/// The slot sharing group of the map and the sink.
pub const SINK_GROUP: &str = "latency-sink";
/// The name of the source operator (and so of its vertex).
pub const SOURCE_NAME: &str = "Source: paced bids";
/// The name of the sink operator.
pub const SINK_NAME: &str = "latency sink";
/// Records the sinks received, warm-up included.
pub const RECEIVED_ACCUMULATOR: &str = "latency_received";
/// Records the sinks received within the warm-up, not recorded.
pub const WARMUP_ACCUMULATOR: &str = "latency_warmup";
/// Significant decimal digits of every latency histogram.
pub const HISTOGRAM_SIGNIFICANT_DIGITS: u8 = 3;

const NANOSECONDS_PER_SECOND: u64 = 1_000_000_000;
/// Events of a Nexmark block that are not bids (a person, three auctions).
const NON_BIDS_PER_BLOCK: u64 = 4;

/// Now on `CLOCK_MONOTONIC`, in nanoseconds: the same clock on every core
/// and in every process of one machine.
pub fn monotonic_now_ns() -> u64 {
    let time = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always readable");
    time.tv_sec() as u64 * NANOSECONDS_PER_SECOND + time.tv_nsec() as u64
}

/// Which events of one source subtask are due when: event `i` (over all
/// subtasks) is scheduled at `start + i / rate`; subtask `s` of `p` sends
/// events `s, s+p, s+2p, ...` below the event count. Pure: the caller reads
/// the clock.
#[derive(Clone, Debug)]
pub struct PacingSchedule {
    start_ns: u64,
    events_per_second: u64,
    event_count: u64,
    parallelism: u64,
    /// The next event this subtask sends (a global index).
    next_index: u64,
}

impl PacingSchedule {
    pub fn new(
        start_ns: u64,
        events_per_second: u64,
        event_count: u64,
        subtask_index: u32,
        parallelism: u32,
    ) -> PacingSchedule {
        assert!(events_per_second > 0, "a schedule needs a positive rate");
        assert!(
            subtask_index < parallelism,
            "subtask {subtask_index} of {parallelism}"
        );
        PacingSchedule {
            start_ns,
            events_per_second,
            event_count,
            parallelism: u64::from(parallelism),
            next_index: u64::from(subtask_index),
        }
    }

    /// When event `index` (a global index) is due.
    pub fn scheduled_ns(&self, index: u64) -> u64 {
        let offset = u128::from(index) * u128::from(NANOSECONDS_PER_SECOND)
            / u128::from(self.events_per_second);
        self.start_ns + offset as u64
    }

    /// How many of the events scheduled at or before `now_ns` this subtask
    /// has not sent yet.
    pub fn due_count(&self, now_ns: u64) -> u64 {
        if now_ns < self.start_ns {
            return 0;
        }
        // Events `0..due` of all subtasks are due: `scheduled_ns(i) <= now`
        // exactly when `i * 1e9 < (elapsed + 1) * rate`.
        let elapsed = u128::from(now_ns - self.start_ns);
        let due = ((elapsed + 1) * u128::from(self.events_per_second))
            .div_ceil(u128::from(NANOSECONDS_PER_SECOND));
        let due = due.min(u128::from(self.event_count)) as u64;
        if due <= self.next_index {
            0
        } else {
            (due - self.next_index).div_ceil(self.parallelism)
        }
    }

    /// Takes the next `count` events of this subtask (fewer if it has
    /// fewer left): their global indices.
    pub fn take(&mut self, count: u64) -> std::iter::StepBy<std::ops::Range<u64>> {
        let first = self.next_index;
        let remaining = self
            .event_count
            .saturating_sub(first)
            .div_ceil(self.parallelism);
        self.next_index = first + count.min(remaining) * self.parallelism;
        (first..self.next_index).step_by(self.parallelism as usize)
    }

    /// Whether this subtask has sent all its events.
    /// When the next event this subtask sends is due.
    pub fn next_scheduled_ns(&self) -> u64 {
        self.scheduled_ns(self.next_index)
    }

    pub fn is_finished(&self) -> bool {
        self.next_index >= self.event_count
    }
}

/// A q1-style bid stamped with when it was due and when it was emitted
/// (`CLOCK_MONOTONIC` nanoseconds).
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct StampedBid {
    pub auction: u64,
    pub bidder: u64,
    pub price: u64,
    pub scheduled_ns: u64,
    pub emitted_ns: u64,
}

/// The Nexmark bid that is the `count`-th bid of the generator's stream.
fn bid_index(count: u64) -> u64 {
    let bids_per_block = BLOCK_SIZE - NON_BIDS_PER_BLOCK;
    count / bids_per_block * BLOCK_SIZE + NON_BIDS_PER_BLOCK + count % bids_per_block
}

/// The open-loop source: `event_count` bids at `events_per_second` over all
/// subtasks, each stamped with its scheduled time (see the module's step 2).
#[derive(Clone, Debug)]
pub struct PacedBidSource {
    pub events_per_second: u64,
    pub event_count: u64,
    pub seed: u64,
}

impl Source<StampedBid> for PacedBidSource {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(
        &self,
        subtask_index: u32,
        parallelism: u32,
    ) -> Box<dyn SourceReader<StampedBid>> {
        Box::new(PacedBidReader {
            source: self.clone(),
            subtask_index,
            parallelism,
            generator: Generator::new(self.seed),
            schedule: None,
        })
    }
}

struct PacedBidReader {
    source: PacedBidSource,
    subtask_index: u32,
    parallelism: u32,
    generator: Generator,
    /// Set at the first poll: the schedule starts when the task does.
    schedule: Option<PacingSchedule>,
}

impl SourceReader<StampedBid> for PacedBidReader {
    fn poll_next(
        &mut self,
        output: &mut dyn SourceOutput<StampedBid>,
        budget: usize,
    ) -> SourceStatus {
        let now_ns = monotonic_now_ns();
        let source = &self.source;
        let (subtask_index, parallelism) = (self.subtask_index, self.parallelism);
        let schedule = self.schedule.get_or_insert_with(|| {
            PacingSchedule::new(
                now_ns,
                source.events_per_second,
                source.event_count,
                subtask_index,
                parallelism,
            )
        });
        let due = schedule.due_count(now_ns);
        let count = due.min(budget as u64);
        for index in schedule.take(count) {
            let bid = self.generator.bid(bid_index(index));
            output.collect(StampedBid {
                auction: bid.auction,
                bidder: bid.bidder,
                price: bid.price,
                scheduled_ns: schedule.scheduled_ns(index),
                emitted_ns: now_ns,
            });
        }
        if schedule.is_finished() {
            SourceStatus::Finished
        } else if count < due {
            SourceStatus::MoreAvailable
        } else {
            // Polled again when the next event is due, not after the task's
            // idle interval.
            let next_ns = schedule.next_scheduled_ns();
            SourceStatus::NothingAvailableFor(Duration::from_nanos(
                next_ns.saturating_sub(monotonic_now_ns()),
            ))
        }
    }
}

/// The q1 map, keyed: a bid with its price in euro.
#[derive(Clone, Debug, Default)]
pub struct EuroConversion;

impl KeyedProcessFunction<u64, StampedBid, StampedBid> for EuroConversion {
    fn process_element(
        &mut self,
        bid: StampedBid,
        _context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<StampedBid>,
    ) {
        out.collect(StampedBid {
            price: bid.price * Q1_EURO_RATE_NUMERATOR / Q1_EURO_RATE_DENOMINATOR,
            ..bid
        });
    }
}

/// What a latency histogram measures: `end_to_end = source_wait +
/// transit`, record by record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LatencyKind {
    /// From the scheduled send time to the sink: the latency.
    EndToEnd,
    /// From the scheduled send time to the poll that emitted the record:
    /// how long it waited for the source task to poll.
    SourceWait,
    /// From the poll that emitted the record to the sink: buffering,
    /// channels, operators.
    Transit,
}

impl LatencyKind {
    pub const ALL: [LatencyKind; 3] = [
        LatencyKind::EndToEnd,
        LatencyKind::SourceWait,
        LatencyKind::Transit,
    ];

    /// Its name in file names and JSON.
    pub fn name(self) -> &'static str {
        match self {
            LatencyKind::EndToEnd => "end-to-end",
            LatencyKind::SourceWait => "source-wait",
            LatencyKind::Transit => "transit",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where sink subtask `subtask_index` writes its histogram of `kind`, for
/// `--histogram-out base`.
pub fn histogram_path(base: &Path, kind: LatencyKind, subtask_index: u32) -> PathBuf {
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{}.{subtask_index}.hgrm", kind.name()));
    PathBuf::from(name)
}

/// A new, auto-resizing latency histogram (nanoseconds).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new(HISTOGRAM_SIGNIFICANT_DIGITS).expect("3 significant digits are valid")
}

/// Writes `histogram` with the V2 serializer, under a temporary name first
/// so that a reader never sees half a file.
pub fn write_histogram(path: &Path, histogram: &Histogram<u64>) -> std::io::Result<()> {
    let mut bytes = Vec::new();
    V2Serializer::new()
        .serialize(histogram, &mut bytes)
        .map_err(|error| std::io::Error::other(format!("{error:?}")))?;
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    std::fs::write(&temporary, &bytes)?;
    std::fs::rename(&temporary, path)
}

/// Reads a histogram that [`write_histogram`] wrote.
pub fn read_histogram(path: &Path) -> anyhow::Result<Histogram<u64>> {
    let bytes = std::fs::read(path)
        .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .map_err(|error| anyhow::anyhow!("{} is not a V2 histogram: {error:?}", path.display()))
}

/// One histogram holding every value of `histograms`.
pub fn merge_histograms<'a>(
    histograms: impl IntoIterator<Item = &'a Histogram<u64>>,
) -> Histogram<u64> {
    let mut merged = new_histogram();
    for histogram in histograms {
        merged
            .add(histogram)
            .expect("an auto-resizing histogram takes any value");
    }
    merged
}

/// Records each record's latency (see the module's step 5).
#[derive(Clone, Debug)]
pub struct LatencySink {
    histogram_out: PathBuf,
    warmup_ns: u64,
    subtask_index: u32,
    /// The first scheduled stamp seen: where the warm-up is counted from.
    first_scheduled_ns: Option<u64>,
    received: u64,
    warmup_received: u64,
    /// One histogram per [`LatencyKind`], in the order of `ALL`.
    histograms: [Histogram<u64>; 3],
}

impl LatencySink {
    pub fn new(histogram_out: PathBuf, warmup: Duration) -> LatencySink {
        LatencySink {
            histogram_out,
            warmup_ns: warmup.as_nanos() as u64,
            subtask_index: 0,
            first_scheduled_ns: None,
            received: 0,
            warmup_received: 0,
            histograms: LatencyKind::ALL.map(|_| new_histogram()),
        }
    }

    fn record(&mut self, bid: &StampedBid, now_ns: u64) {
        self.received += 1;
        let first = *self.first_scheduled_ns.get_or_insert(bid.scheduled_ns);
        if bid.scheduled_ns < first.saturating_add(self.warmup_ns) {
            self.warmup_received += 1;
            return;
        }
        for kind in LatencyKind::ALL {
            let (from, to) = match kind {
                LatencyKind::EndToEnd => (bid.scheduled_ns, now_ns),
                LatencyKind::SourceWait => (bid.scheduled_ns, bid.emitted_ns),
                LatencyKind::Transit => (bid.emitted_ns, now_ns),
            };
            // 1 ns is the floor: a histogram's zero bucket says nothing.
            self.histograms[kind.index()]
                .record(to.saturating_sub(from).max(1))
                .expect("an auto-resizing histogram takes any value");
        }
    }

    /// This subtask's histogram of `kind`.
    pub fn histogram(&self, kind: LatencyKind) -> &Histogram<u64> {
        &self.histograms[kind.index()]
    }
}

impl SinkFunction<StampedBid> for LatencySink {
    fn open(&mut self, context: &OperatorContext) {
        self.subtask_index = context.subtask_index;
    }

    fn invoke(&mut self, bid: StampedBid, _timestamp: Timestamp) {
        self.record(&bid, monotonic_now_ns());
    }

    fn finish(&mut self, context: &OperatorContext) {
        for kind in LatencyKind::ALL {
            let histogram = self.histogram(kind);
            let path = histogram_path(&self.histogram_out, kind, self.subtask_index);
            if let Err(error) = write_histogram(&path, histogram) {
                panic!(
                    "cannot write the latency histogram {}: {error}",
                    path.display()
                );
            }
        }
        let mut accumulators = context.accumulators.borrow_mut();
        accumulators.add(RECEIVED_ACCUMULATOR, self.received);
        accumulators.add(WARMUP_ACCUMULATOR, self.warmup_received);
    }
}

/// Builds the latency job: paced source → key by auction → euro → sink.
pub fn build_latency_job(
    env: &StreamExecutionEnvironment,
    source: PacedBidSource,
    histogram_out: PathBuf,
    warmup: Duration,
) {
    env.from_source(source, WatermarkStrategy::no_watermarks(), SOURCE_NAME)
        .slot_sharing_group(SOURCE_GROUP)
        .key_by(|bid: &StampedBid| bid.auction)
        .process(EuroConversion)
        .name("q1 euro")
        .slot_sharing_group(SINK_GROUP)
        .add_sink(LatencySink::new(histogram_out, warmup))
        .name(SINK_NAME);
}

fn latency_command() -> clap::Command {
    clap::Command::new("latency")
        .about("Paced q1-style bids from one slot to a sink in another; writes latency histograms")
        .arg(
            clap::Arg::new("events-per-second")
                .long("events-per-second")
                .value_name("RATE")
                .required(true)
                .value_parser(clap::value_parser!(u64).range(1..))
                .help("The schedule's rate, over all source subtasks"),
        )
        .arg(
            clap::Arg::new("events")
                .long("events")
                .required(true)
                .value_parser(clap::value_parser!(u64))
                .help("How many events to send, over all source subtasks"),
        )
        .arg(
            clap::Arg::new("histogram-out")
                .long("histogram-out")
                .value_name("PATH")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help(
                    "Sink subtask i writes PATH.KIND.i.hgrm (HDR V2), KIND being end-to-end, source-wait and transit",
                ),
        )
        .arg(
            clap::Arg::new("warmup")
                .long("warmup")
                .default_value("0s")
                .value_parser(clap::builder::ValueParser::new(
                    strom_core::config::parse_duration,
                ))
                .help("Records scheduled within this long of the first are counted, not recorded"),
        )
        .arg(
            clap::Arg::new("seed")
                .long("seed")
                .default_value("42")
                .value_parser(clap::value_parser!(u64))
                .help("The bid generator's seed"),
        )
}

fn build_latency(
    env: &StreamExecutionEnvironment,
    matches: &clap::ArgMatches,
) -> Result<(), String> {
    let get = |name: &str| *matches.get_one::<u64>(name).expect("required or defaulted");
    env.set_job_name("latency");
    let source = PacedBidSource {
        events_per_second: get("events-per-second"),
        event_count: get("events"),
        seed: get("seed"),
    };
    let histogram_out = matches
        .get_one::<PathBuf>("histogram-out")
        .expect("--histogram-out is required")
        .clone();
    let warmup = *matches
        .get_one::<Duration>("warmup")
        .expect("--warmup has a default");
    build_latency_job(env, source, histogram_out, warmup);
    Ok(())
}

fn report_latency(matches: &clap::ArgMatches, outcome: &JobOutcome) -> Vec<String> {
    let sent = *matches
        .get_one::<u64>("events")
        .expect("--events is required");
    let received = outcome.accumulators.get(RECEIVED_ACCUMULATOR).unwrap_or(0);
    vec![format!(
        "sent {sent}, received {received}; histograms in {}.*.hgrm",
        matches
            .get_one::<PathBuf>("histogram-out")
            .expect("--histogram-out is required")
            .display()
    )]
}

/// The `latency` job program.
pub const LATENCY_PROGRAM: Program = Program {
    name: "latency",
    about: "Open-loop latency: paced, stamped bids from one slot to a sink in another",
    command: latency_command,
    build: build_latency,
    report: report_latency,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The events of subtask `s` of `p` due at `now`, by brute force.
    fn due_by_brute_force(schedule: &PacingSchedule, subtask: u64, now_ns: u64) -> u64 {
        (subtask..schedule.event_count)
            .step_by(schedule.parallelism as usize)
            .filter(|index| *index >= schedule.next_index)
            .filter(|index| schedule.scheduled_ns(*index) <= now_ns)
            .count() as u64
    }

    #[test]
    fn pacing_schedule_makes_due_exactly_the_events_scheduled_by_now() {
        // 3 events per microsecond at parallelism 1, and a rate that does
        // not divide a second, split over 3 subtasks.
        for (rate, parallelism) in [(3_000_000, 1), (7_000, 3), (1_000_000_000, 2)] {
            for subtask in 0..parallelism {
                let start = 1_000;
                let mut schedule = PacingSchedule::new(start, rate, 40, subtask, parallelism);
                assert_eq!(schedule.due_count(start - 1), 0, "nothing before the start");
                let mut taken = Vec::new();
                for now in (start..start + 10_000_000).step_by(997) {
                    let due = schedule.due_count(now);
                    assert_eq!(
                        due,
                        due_by_brute_force(&schedule, u64::from(subtask), now),
                        "rate {rate}, subtask {subtask}/{parallelism}, {} ns in",
                        now - start
                    );
                    // Take one at a time, as a poll with a budget of 1.
                    taken.extend(schedule.take(due.min(1)));
                    if schedule.is_finished() {
                        break;
                    }
                }
                while !schedule.is_finished() {
                    taken.extend(schedule.take(1));
                }
                let expected: Vec<u64> = (u64::from(subtask)..40)
                    .step_by(parallelism as usize)
                    .collect();
                assert_eq!(
                    taken, expected,
                    "every event of the subtask, once, in order"
                );
            }
        }
    }

    #[test]
    fn pacing_schedule_spaces_events_by_the_rate() {
        let schedule = PacingSchedule::new(500, 10_000, 100, 0, 1);
        assert_eq!(schedule.scheduled_ns(0), 500);
        assert_eq!(schedule.scheduled_ns(1), 500 + 100_000);
        assert_eq!(schedule.scheduled_ns(10_000), 500 + 1_000_000_000);
        assert_eq!(schedule.due_count(500), 1);
        assert_eq!(schedule.due_count(500 + 99_999), 1);
        assert_eq!(schedule.due_count(500 + 100_000), 2);
        assert_eq!(
            schedule.due_count(u64::MAX),
            100,
            "never more than the count"
        );
    }

    #[test]
    fn bids_are_taken_from_the_generators_bid_slots() {
        assert_eq!(bid_index(0), 4);
        assert_eq!(bid_index(45), 49);
        assert_eq!(bid_index(46), 54);
        for count in 0..500 {
            assert!(bid_index(count) % BLOCK_SIZE >= NON_BIDS_PER_BLOCK);
        }
    }

    #[test]
    fn histograms_survive_the_file_and_merge() {
        let directory =
            std::env::temp_dir().join(format!("strom-latency-test-{}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("a temporary directory");
        let base = directory.join("run");
        let mut parts = Vec::new();
        for subtask in 0..2u32 {
            let mut histogram = new_histogram();
            for value in 1..=1000u64 {
                histogram
                    .record(value * 1_000 + u64::from(subtask))
                    .expect("recorded");
            }
            let path = histogram_path(&base, LatencyKind::EndToEnd, subtask);
            write_histogram(&path, &histogram).expect("written");
            parts.push(read_histogram(&path).expect("read back"));
            assert_eq!(parts.last().map(Histogram::len), Some(1000));
        }
        let merged = merge_histograms(&parts);
        assert_eq!(merged.len(), 2000);
        assert!(merged.equivalent(merged.max(), 1_000_001));
        assert!(merged.equivalent(merged.value_at_quantile(0.5), 500_000));
        std::fs::remove_dir_all(&directory).expect("removed");
    }

    #[test]
    fn the_sink_counts_but_does_not_record_the_warmup() {
        let mut sink = LatencySink::new(PathBuf::from("unused"), Duration::from_micros(10));
        let bid = |scheduled_ns| StampedBid {
            auction: 1,
            bidder: 2,
            price: 3,
            scheduled_ns,
            emitted_ns: scheduled_ns + 1_000,
        };
        for scheduled in (0..20_000).step_by(1_000) {
            sink.record(&bid(100_000 + scheduled), 100_000 + scheduled + 5_000);
        }
        assert_eq!(sink.received, 20);
        assert_eq!(sink.warmup_received, 10);
        for (kind, value) in [
            (LatencyKind::EndToEnd, 5_000),
            (LatencyKind::SourceWait, 1_000),
            (LatencyKind::Transit, 4_000),
        ] {
            let histogram = sink.histogram(kind);
            assert_eq!(histogram.len(), 10, "{kind:?}");
            assert!(histogram.equivalent(histogram.max(), value), "{kind:?}");
            assert!(histogram.equivalent(histogram.min(), value), "{kind:?}");
        }
    }
}
