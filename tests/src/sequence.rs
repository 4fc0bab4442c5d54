//! The `sequence` test program: proves exactly-once state under failures.
//!
//! Its source emits, for `K` keys, the sequence numbers `0, 1, 2, ...` of
//! every key, in order (record `i` is key `i % K` with number `i / K`). A
//! keyed function keeps, per key, the number it expects next, and counts a
//! record whose number is below it as a duplicate and a jump above it as
//! losses. The sink adds up records, duplicates and losses as checkpointed
//! state. After any number of failures and restores, an exactly-once engine
//! reports `duplicates=0`, `losses=0` and `records=K*N`.
//!
//! Failures: `--fail-at I,J` fails the source subtask that reaches record
//! `I` (once per process); `--fail-in-snapshot C` fails the sink while it
//! snapshots checkpoint `C` or the first one after it (once per process),
//! in the middle of a checkpoint.

use std::sync::{Arc, Mutex};

use clap::{Arg, ArgMatches, Command};
use strom_core::function::{Collector, KeyedContext, KeyedProcessFunction, SinkFunction};
use strom_core::operator::OperatorContext;
use strom_core::program::{report_accumulators, Program};
use strom_core::snapshot::{IndexSplits, StateReader, StateWriter};
use strom_core::source::{Boundedness, Pace, Source, SourceOutput, SourceReader, SourceStatus};
use strom_core::state::{KeyedStateStore, ValueState};
use strom_core::{StreamExecutionEnvironment, Timestamp, WatermarkStrategy};

/// Failures that have happened in this process, so each happens once.
static FAILED: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

/// Fails (panics) the first time `what` reaches `at` in this process.
fn fail_once(what: &'static str, at: u64) {
    let mut failed = FAILED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !failed.contains(&(what, at)) {
        failed.push((what, at));
        drop(failed);
        // Said before the panic: two failures in one attempt restart the
        // job once, and only the first one's message reaches the report.
        eprintln!("injecting a failure: {what} {at}");
        panic!("injected failure: {what} {at}");
    }
}

#[derive(Clone)]
struct SequenceSource {
    keys: u64,
    count: u64,
    fail_at: Arc<Vec<u64>>,
    records_per_second: u64,
}

impl SequenceSource {
    fn reader(&self, splits: IndexSplits, parallelism: u32) -> Box<dyn SourceReader<(u64, u64)>> {
        Box::new(SequenceReader {
            source: self.clone(),
            splits,
            pace: (self.records_per_second > 0)
                .then(|| Pace::new(self.records_per_second as f64 / f64::from(parallelism))),
        })
    }
}

impl Source<(u64, u64)> for SequenceSource {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(
        &self,
        subtask_index: u32,
        parallelism: u32,
    ) -> Box<dyn SourceReader<(u64, u64)>> {
        self.reader(
            IndexSplits::fresh(subtask_index, parallelism, self.count),
            parallelism,
        )
    }

    fn restore_reader(
        &self,
        _subtask_index: u32,
        parallelism: u32,
        state: Vec<Vec<u8>>,
    ) -> Result<Box<dyn SourceReader<(u64, u64)>>, String> {
        Ok(self.reader(IndexSplits::restore(&state)?, parallelism))
    }
}

struct SequenceReader {
    source: SequenceSource,
    splits: IndexSplits,
    pace: Option<Pace>,
}

impl SourceReader<(u64, u64)> for SequenceReader {
    fn poll_next(
        &mut self,
        output: &mut dyn SourceOutput<(u64, u64)>,
        budget: usize,
    ) -> SourceStatus {
        let budget = match &mut self.pace {
            Some(pace) => pace.allow(budget),
            None => budget,
        };
        if budget == 0 && !self.splits.is_finished() {
            return SourceStatus::NothingAvailable;
        }
        let source = &self.source;
        self.splits.read(budget, |index| {
            if source.fail_at.contains(&index) {
                fail_once("the source reached record", index);
            }
            output.collect_with_timestamp(
                (index % source.keys, index / source.keys),
                index as Timestamp,
            );
        })
    }

    fn snapshot_state(&mut self) -> Result<Vec<Vec<u8>>, String> {
        Ok(self.splits.snapshot())
    }
}

/// Per key, the sequence number expected next.
#[derive(Clone, Default)]
struct SequenceCheck {
    expected: ValueState<u64>,
}

/// What one record did: (records, duplicates, losses).
type Tally = (u64, u64, u64);

impl KeyedProcessFunction<u64, (u64, u64), Tally> for SequenceCheck {
    fn open(&mut self, state: &mut KeyedStateStore<u64>) {
        self.expected = state.value_state("expected");
    }

    fn process_element(
        &mut self,
        (_, number): (u64, u64),
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<Tally>,
    ) {
        let expected = self.expected.value(context).copied().unwrap_or(0);
        if number < expected {
            out.collect((1, 1, 0));
        } else {
            self.expected.update(context, number + 1);
            out.collect((1, 0, number - expected));
        }
    }
}

/// Adds up the tallies as checkpointed state.
#[derive(Clone, Default)]
struct TallySink {
    tally: Tally,
    fail_in_snapshot: Option<u64>,
}

impl SinkFunction<Tally> for TallySink {
    fn invoke(&mut self, (records, duplicates, losses): Tally, _timestamp: Timestamp) {
        self.tally.0 += records;
        self.tally.1 += duplicates;
        self.tally.2 += losses;
    }

    fn snapshot_state(&mut self, checkpoint_id: u64) -> Vec<Vec<u8>> {
        // The first snapshot from that checkpoint on: checkpoint ids are
        // not known in advance (a failure aborts the pending one).
        if self
            .fail_in_snapshot
            .is_some_and(|first| checkpoint_id >= first)
        {
            fail_once(
                "the sink snapshotting a checkpoint from",
                self.fail_in_snapshot.unwrap_or_default(),
            );
        }
        let mut writer = StateWriter::default();
        writer.put_u64(self.tally.0);
        writer.put_u64(self.tally.1);
        writer.put_u64(self.tally.2);
        vec![writer.bytes]
    }

    fn restore_state(&mut self, elements: Vec<Vec<u8>>) -> Result<(), String> {
        for element in elements {
            let mut reader = StateReader::new(&element);
            self.tally.0 += reader.u64()?;
            self.tally.1 += reader.u64()?;
            self.tally.2 += reader.u64()?;
        }
        Ok(())
    }

    fn finish(&mut self, context: &OperatorContext) {
        let mut accumulators = context.accumulators.borrow_mut();
        accumulators.add("records", self.tally.0);
        accumulators.add("duplicates", self.tally.1);
        accumulators.add("losses", self.tally.2);
    }
}

fn sequence_command() -> Command {
    let number = |name: &'static str, default: &'static str, help: &'static str| {
        Arg::new(name)
            .long(name)
            .default_value(default)
            .value_parser(clap::value_parser!(u64))
            .help(help)
    };
    Command::new("sequence")
        .arg(number("keys", "1000", "How many keys"))
        .arg(number("per-key", "1000", "Sequence numbers per key"))
        .arg(number(
            "records-per-second",
            "0",
            "Pace of the source (0: as fast as possible)",
        ))
        .arg(
            Arg::new("fail-at")
                .long("fail-at")
                .value_delimiter(',')
                .value_parser(clap::value_parser!(u64))
                .help("Records at which the source fails, once each"),
        )
        .arg(
            Arg::new("fail-in-snapshot")
                .long("fail-in-snapshot")
                .value_parser(clap::value_parser!(u64))
                .help("Fail the sink, once, while it snapshots this checkpoint or the first one after it"),
        )
}

fn build_sequence(env: &StreamExecutionEnvironment, matches: &ArgMatches) -> Result<(), String> {
    let keys = *matches.get_one::<u64>("keys").expect("a default");
    let per_key = *matches.get_one::<u64>("per-key").expect("a default");
    let source = SequenceSource {
        keys,
        count: keys * per_key,
        fail_at: Arc::new(
            matches
                .get_many::<u64>("fail-at")
                .map(|indices| indices.copied().collect())
                .unwrap_or_default(),
        ),
        records_per_second: *matches
            .get_one::<u64>("records-per-second")
            .expect("a default"),
    };
    env.from_source(
        source,
        WatermarkStrategy::no_watermarks(),
        "sequence source",
    )
    .key_by(|(key, _): &(u64, u64)| *key)
    .process(SequenceCheck::default())
    .name("sequence check")
    .add_sink(TallySink {
        tally: (0, 0, 0),
        fail_in_snapshot: matches.get_one::<u64>("fail-in-snapshot").copied(),
    })
    .name("tally");
    Ok(())
}

/// The `sequence` program.
pub const SEQUENCE_PROGRAM: Program = Program {
    name: "sequence",
    about: "Per-key sequence numbers that must each arrive exactly once",
    command: sequence_command,
    build: build_sequence,
    report: report_accumulators,
};
