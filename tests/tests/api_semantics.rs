//! End-to-end tests of the DataStream API's semantics, as a Flink user
//! expects them. Every test runs real jobs on a real `LocalCluster` and
//! compares what a sink saw with results computed by hand or by a plain loop
//! over the same input.
//!
//! Programs are fn pointers without captures, so the sinks write their rows
//! into the process-global [`RESULTS`] under the program's name. Every
//! program has a name of its own, so tests may run in parallel; a test that
//! runs one program several times (parallelism 1 and 2) runs them one after
//! the other.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use clap::ArgMatches;
use strom_core::function::{Collector, KeyedContext, SinkFunction};
use strom_core::key::{key_group_of, subtask_for_key_group, DEFAULT_MAX_PARALLELISM};
use strom_core::operator::OperatorContext;
use strom_core::program::{report_accumulators, JobArgs, Program};
use strom_core::source::{
    Boundedness, CollectionSource, GeneratorSource, Source, SourceOutput, SourceReader,
    SourceStatus,
};
use strom_core::state::KeyedStateStore;
use strom_core::time::MAX_WATERMARK;
use strom_core::{
    AggregateFunction, DataStream, JobGraph, KeyedCoProcessFunction, KeyedProcessFunction,
    ListState, MapState, ReducingState, StreamExecutionEnvironment, TimeWindow, Timestamp,
    ValueState, WatermarkStrategy, WindowAssigner,
};
use strom_scheduler::{LocalCluster, LocalClusterConfig};

// ---------------------------------------------------------------------------
// Harness: collecting sinks, programs and a runner.
// ---------------------------------------------------------------------------

/// Rows written by the sinks of running jobs, per program name.
static RESULTS: Mutex<BTreeMap<String, Vec<String>>> = Mutex::new(BTreeMap::new());

/// Locks a global of this file; a test that panicked while holding it left
/// nothing half-written that the others could trip on.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn push_row(key: &str, row: String) {
    lock(&RESULTS).entry(key.to_string()).or_default().push(row);
}

fn take_rows(key: &str) -> Vec<String> {
    lock(&RESULTS).remove(key).unwrap_or_default()
}

/// Formats a record, its timestamp and the sink subtask into a row.
type Format<T> = fn(&T, Timestamp, u32) -> String;

/// A sink that writes every record, formatted, into [`RESULTS`] at once.
struct CollectSink<T> {
    key: &'static str,
    format: Format<T>,
    subtask: u32,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        CollectSink {
            key: self.key,
            format: self.format,
            subtask: self.subtask,
        }
    }
}

impl<T> CollectSink<T> {
    fn new(key: &'static str, format: Format<T>) -> Self {
        CollectSink {
            key,
            format,
            subtask: 0,
        }
    }
}

impl<T: 'static> SinkFunction<T> for CollectSink<T> {
    fn open(&mut self, context: &OperatorContext) {
        self.subtask = context.subtask_index;
    }

    fn invoke(&mut self, value: T, timestamp: Timestamp) {
        push_row(self.key, (self.format)(&value, timestamp, self.subtask));
    }
}

/// Rows that are the records themselves.
fn strings(key: &'static str) -> CollectSink<String> {
    CollectSink::new(key, |row, _, _| row.clone())
}

/// Rows that are the records followed by `@timestamp`.
fn stamped(key: &'static str) -> CollectSink<String> {
    CollectSink::new(key, |row, timestamp, _| format!("{row}@{timestamp}"))
}

fn no_arguments() -> clap::Command {
    clap::Command::new("api-semantics")
}

/// A test program: its name is also the key of its rows in [`RESULTS`].
const fn program(
    name: &'static str,
    build: fn(&StreamExecutionEnvironment, &ArgMatches) -> Result<(), String>,
) -> Program {
    Program {
        name,
        about: "a job of the api_semantics tests",
        command: no_arguments,
        build,
        report: report_accumulators,
    }
}

fn job_args(parallelism: u32, max_parallelism: u32) -> JobArgs {
    JobArgs {
        max_parallelism,
        ..JobArgs::new(Vec::new(), parallelism)
    }
}

fn job_graph(program: Program, parallelism: u32) -> JobGraph {
    program
        .job_graph(&job_args(parallelism, DEFAULT_MAX_PARALLELISM))
        .unwrap_or_else(|error| panic!("job '{}' is invalid: {error}", program.name))
}

/// Runs `program` to its end on a cluster of its own, with as many slots as
/// its JobGraph needs, and returns its rows, sorted.
fn run(program: Program, parallelism: u32) -> Vec<String> {
    run_with_max_parallelism(program, parallelism, DEFAULT_MAX_PARALLELISM)
}

fn run_with_max_parallelism(
    program: Program,
    parallelism: u32,
    max_parallelism: u32,
) -> Vec<String> {
    let args = job_args(parallelism, max_parallelism);
    let slot_count = program
        .job_graph(&args)
        .unwrap_or_else(|error| panic!("job '{}' is invalid: {error}", program.name))
        .slots_required();
    take_rows(program.name);
    let cluster = LocalCluster::start(vec![program], LocalClusterConfig::slots(slot_count))
        .unwrap_or_else(|error| panic!("cannot start a cluster of {slot_count} slots: {error}"));
    match cluster.execute(program.name, args) {
        Ok(_) => cluster.shutdown(),
        Err(message) => {
            // Do not wait for the failed job's tasks to unwind.
            std::mem::forget(cluster);
            panic!(
                "job '{}' at parallelism {parallelism} failed: {message}",
                program.name
            );
        }
    }
    let mut rows = take_rows(program.name);
    rows.sort();
    rows
}

fn sorted(mut rows: Vec<String>) -> Vec<String> {
    rows.sort();
    rows
}

/// Compares rows as multisets, with a readable difference on failure.
fn assert_rows(actual: &[String], expected: Vec<String>, what: &str) {
    let expected = sorted(expected);
    if actual == expected.as_slice() {
        return;
    }
    let count = |rows: &[String]| {
        let mut counts: BTreeMap<String, i64> = BTreeMap::new();
        for row in rows {
            *counts.entry(row.clone()).or_default() += 1;
        }
        counts
    };
    let (actual_counts, expected_counts) = (count(actual), count(&expected));
    let rows: BTreeSet<&String> = actual_counts.keys().chain(expected_counts.keys()).collect();
    // Positive: rows seen more often than expected; negative: missing.
    let difference: Vec<(i64, &String)> = rows
        .into_iter()
        .map(|row| {
            let seen = actual_counts.get(row).copied().unwrap_or(0);
            (seen - expected_counts.get(row).copied().unwrap_or(0), row)
        })
        .filter(|(surplus, _)| *surplus != 0)
        .take(20)
        .collect();
    panic!(
        "{what}: {} rows, expected {}; surplus (+) and missing (-) rows, first 20:\n{difference:#?}",
        actual.len(),
        expected.len()
    );
}

fn window_label(window: &TimeWindow) -> String {
    format!("[{}, {})", window.start, window.end)
}

// ---------------------------------------------------------------------------
// Records, sources and functions shared by several tests.
// ---------------------------------------------------------------------------

/// A keyed, timestamped record.
#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Event {
    key: String,
    timestamp: i64,
    value: u64,
}

impl Event {
    fn new(key: &str, timestamp: i64, value: u64) -> Self {
        Event {
            key: key.to_string(),
            timestamp,
            value,
        }
    }
}

fn event_time() -> WatermarkStrategy<Event> {
    WatermarkStrategy::for_monotonous_timestamps()
        .with_timestamp_assigner(|event: &Event| event.timestamp)
}

/// Sums the values of a window's events.
#[derive(Clone, Copy)]
struct SumValues;

impl AggregateFunction<Event, u64, u64> for SumValues {
    fn create_accumulator(&self) -> u64 {
        0
    }
    fn add(&self, event: Event, sum: &mut u64) {
        *sum += event.value;
    }
    fn get_result(&self, sum: u64) -> u64 {
        sum
    }
    fn merge(&self, first: u64, second: u64) -> u64 {
        first + second
    }
}

/// Counts the records of a window.
#[derive(Clone, Copy)]
struct Count;

impl<T> AggregateFunction<T, u64, u64> for Count {
    fn create_accumulator(&self) -> u64 {
        0
    }
    fn add(&self, _record: T, count: &mut u64) {
        *count += 1;
    }
    fn get_result(&self, count: u64) -> u64 {
        count
    }
    fn merge(&self, first: u64, second: u64) -> u64 {
        first + second
    }
}

/// A bounded source over a list that emits one record per poll and then
/// pauses (`NothingAvailable`), so that the source task emits a watermark
/// after every record: a record that comes after a larger timestamp in the
/// list is behind the watermark (late).
struct OneByOneSource<T> {
    records: Arc<Vec<T>>,
}

impl<T: Clone + Send + Sync + 'static> Source<T> for OneByOneSource<T> {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<T>> {
        Box::new(OneByOneReader {
            records: self.records.clone(),
            next: subtask_index as usize,
            step: parallelism as usize,
        })
    }
}

struct OneByOneReader<T> {
    records: Arc<Vec<T>>,
    next: usize,
    step: usize,
}

impl<T: Clone> SourceReader<T> for OneByOneReader<T> {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<T>, _budget: usize) -> SourceStatus {
        match self.records.get(self.next) {
            Some(record) => {
                output.collect(record.clone());
                self.next += self.step;
                SourceStatus::NothingAvailable
            }
            None => SourceStatus::Finished,
        }
    }
}

// ---------------------------------------------------------------------------
// 1. map, filter and flat_map.
// ---------------------------------------------------------------------------

const TRANSFORMATIONS: &str = "transformations";
const TRANSFORMED_COUNT: u64 = 1_000;
const SENTENCES: [&str; 4] = ["the quick brown fox", "", "jumps over", "the lazy dog"];

fn build_transformations(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    env.from_source(
        GeneratorSource::bounded(TRANSFORMED_COUNT, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    )
    .map(|number: u64| number * 3)
    .filter(|number| number % 2 == 0)
    .flat_map(|number, out: &mut dyn Collector<String>| {
        // Zero, one or two rows per record.
        for copy in 0..(number / 2) % 3 {
            out.collect(format!("number {number}#{copy}"));
        }
    })
    .add_sink(strings(TRANSFORMATIONS));
    env.from_collection(SENTENCES.iter().map(|line| line.to_string()).collect())
        .flat_map(|line: String, out: &mut dyn Collector<String>| {
            for word in line.split_whitespace() {
                out.collect(word.to_string());
            }
        })
        .filter(|word| word.len() > 3)
        .map(|word| format!("word {}", word.to_uppercase()))
        .add_sink(strings(TRANSFORMATIONS));
    Ok(())
}

const TRANSFORMATIONS_PROGRAM: Program = program(TRANSFORMATIONS, build_transformations);

#[test]
fn map_filter_and_flat_map_transform_every_record_exactly_once() {
    let mut expected = Vec::new();
    for index in 0..TRANSFORMED_COUNT {
        let number = index * 3;
        if number % 2 == 0 {
            for copy in 0..(number / 2) % 3 {
                expected.push(format!("number {number}#{copy}"));
            }
        }
    }
    for line in SENTENCES {
        for word in line.split_whitespace().filter(|word| word.len() > 3) {
            expected.push(format!("word {}", word.to_uppercase()));
        }
    }
    for parallelism in [1, 2] {
        let rows = run(TRANSFORMATIONS_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

// ---------------------------------------------------------------------------
// 2. Keyed state and event-time timers.
// ---------------------------------------------------------------------------

const KEYED_STATE: &str = "keyed-state";
const READING_COUNT: u64 = 200;
const READING_KEYS: u64 = 4;
const BUCKET_MS: i64 = 100;
/// A timer every key registers on every record: it fires once per key, at
/// the end of input, when every record has been seen.
const FINAL_TIMER: Timestamp = 1_000_000;
/// A timer every record registers and deletes again: it never fires.
const DELETED_TIMER: Timestamp = 2_000_000;

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Reading {
    key: u64,
    timestamp: i64,
    value: u64,
}

fn reading(index: u64) -> Reading {
    Reading {
        key: index % READING_KEYS,
        timestamp: 7 * index as i64,
        value: index,
    }
}

/// The last timestamp of the bucket that holds `timestamp`.
fn bucket_end(timestamp: Timestamp) -> Timestamp {
    timestamp - timestamp.rem_euclid(BUCKET_MS) + BUCKET_MS - 1
}

/// Per key, reports each bucket of event time when the watermark passes it,
/// using every kind of keyed state.
#[derive(Clone, Default)]
struct BucketReport {
    timers_fired: ValueState<u64>,
    pending: ListState<(Timestamp, u64)>,
    bucket_counts: MapState<Timestamp, u64>,
    sum: ReducingState<u64>,
}

impl KeyedProcessFunction<u64, Reading, String> for BucketReport {
    fn open(&mut self, state: &mut KeyedStateStore<u64>) {
        self.timers_fired = state.value_state("timers-fired");
        self.pending = state.list_state("pending");
        self.bucket_counts = state.map_state("bucket-counts");
        self.sum = state.reducing_state("sum", |sum: &u64, value: u64| sum + value);
    }

    fn process_element(
        &mut self,
        reading: Reading,
        context: &mut KeyedContext<'_, u64>,
        _out: &mut dyn Collector<String>,
    ) {
        assert_eq!(*context.current_key(), reading.key);
        assert_eq!(context.timestamp(), reading.timestamp);
        let bucket = bucket_end(reading.timestamp);
        // Every record of a bucket registers its timer: one timer remains.
        context.register_event_time_timer(bucket);
        context.register_event_time_timer(FINAL_TIMER);
        context.register_event_time_timer(DELETED_TIMER);
        context.delete_event_time_timer(DELETED_TIMER);
        self.pending
            .add(context, (reading.timestamp, reading.value));
        let count = self
            .bucket_counts
            .get(context, &bucket)
            .copied()
            .unwrap_or(0);
        self.bucket_counts.put(context, bucket, count + 1);
        self.sum.add(context, reading.value);
    }

    fn on_timer(
        &mut self,
        timestamp: Timestamp,
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<String>,
    ) {
        let watermark = context.current_watermark();
        assert!(
            watermark >= timestamp,
            "timer {timestamp} fired before the watermark reached it (watermark {watermark})"
        );
        assert_eq!(context.timestamp(), timestamp);
        assert_ne!(timestamp, DELETED_TIMER, "a deleted timer fired");
        let key = *context.current_key();
        let fired = self.timers_fired.value(context).copied().unwrap_or(0) + 1;
        self.timers_fired.update(context, fired);
        if timestamp == FINAL_TIMER {
            let sum = self.sum.get(context).copied().unwrap_or(0);
            let open_buckets = self.bucket_counts.entries(context).count();
            let pending = self.pending.get(context).len();
            out.collect(format!(
                "key {key} final timer #{fired}: sum={sum} open buckets={open_buckets} pending={pending}"
            ));
            return;
        }
        // Records of later buckets may already be here (from a faster
        // source subtask); they stay for their own timer.
        let (due, later): (Vec<_>, Vec<_>) = self
            .pending
            .take(context)
            .partition(|(record_timestamp, _)| *record_timestamp <= timestamp);
        for entry in later {
            self.pending.add(context, entry);
        }
        let mut values: Vec<u64> = due.iter().map(|(_, value)| *value).collect();
        values.sort_unstable();
        let count = self.bucket_counts.remove(context, &timestamp).unwrap_or(0);
        out.collect(format!(
            "key {key} timer #{fired} at {timestamp}: count={count} values={values:?} before end of input={}",
            watermark < MAX_WATERMARK
        ));
    }
}

fn build_keyed_state(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    env.from_source(
        GeneratorSource::bounded(READING_COUNT, reading),
        WatermarkStrategy::for_monotonous_timestamps()
            .with_timestamp_assigner(|reading: &Reading| reading.timestamp),
        "readings",
    )
    .key_by(|reading| reading.key)
    .process(BucketReport::default())
    .add_sink(stamped(KEYED_STATE));
    Ok(())
}

const KEYED_STATE_PROGRAM: Program = program(KEYED_STATE, build_keyed_state);

#[test]
fn keyed_state_and_event_time_timers_fire_once_per_key_and_timestamp_at_the_watermark() {
    let mut buckets: BTreeMap<u64, BTreeMap<Timestamp, Vec<u64>>> = BTreeMap::new();
    for index in 0..READING_COUNT {
        let reading = reading(index);
        buckets
            .entry(reading.key)
            .or_default()
            .entry(bucket_end(reading.timestamp))
            .or_default()
            .push(reading.value);
    }
    // Every source subtask's last watermark is at least 7 * 198 - 1, so
    // every bucket but the last fires before the end of input; the last one
    // (ending after the last record) fires with the final watermark.
    let last_timestamp = 7 * (READING_COUNT as i64 - 1);
    let mut expected = Vec::new();
    for (key, key_buckets) in &buckets {
        for (position, (end, values)) in key_buckets.iter().enumerate() {
            let mut values = values.clone();
            values.sort_unstable();
            expected.push(format!(
                "key {key} timer #{} at {end}: count={} values={values:?} before end of input={}@{end}",
                position + 1,
                values.len(),
                *end < last_timestamp
            ));
        }
        let sum: u64 = key_buckets.values().flatten().sum();
        expected.push(format!(
            "key {key} final timer #{}: sum={sum} open buckets=0 pending=0@{FINAL_TIMER}",
            key_buckets.len() + 1
        ));
    }
    for parallelism in [1, 2] {
        let rows = run(KEYED_STATE_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

// ---------------------------------------------------------------------------
// 3. Tumbling, sliding and session windows; window functions and reduce.
// ---------------------------------------------------------------------------

const WINDOW_EVENT_COUNT: u64 = 120;
const WINDOW_SIZE_MS: i64 = 100;
const SLIDE_MS: i64 = 40;

fn window_event(index: u64) -> Event {
    Event::new(&format!("k{}", index % 3), 13 * index as i64, index)
}

fn window_events(env: &StreamExecutionEnvironment) -> strom_core::DataStream<Event> {
    env.from_source(
        GeneratorSource::bounded(WINDOW_EVENT_COUNT, window_event),
        event_time(),
        "events",
    )
}

/// The events of every (key, window) that `starts` assigns them to.
fn expected_windows(
    starts: impl Fn(i64) -> Vec<i64>,
    size: i64,
) -> BTreeMap<(String, TimeWindow), Vec<Event>> {
    let mut windows: BTreeMap<(String, TimeWindow), Vec<Event>> = BTreeMap::new();
    for index in 0..WINDOW_EVENT_COUNT {
        let event = window_event(index);
        for start in starts(event.timestamp) {
            let window = TimeWindow {
                start,
                end: start + size,
            };
            windows
                .entry((event.key.clone(), window))
                .or_default()
                .push(event.clone());
        }
    }
    windows
}

fn tumbling_starts(timestamp: i64) -> Vec<i64> {
    vec![timestamp - timestamp.rem_euclid(WINDOW_SIZE_MS)]
}

/// Every multiple of the slide whose window holds `timestamp`, found by
/// trying them all.
fn sliding_starts(timestamp: i64) -> Vec<i64> {
    (-10..100)
        .map(|multiple| multiple * SLIDE_MS)
        .filter(|start| *start <= timestamp && timestamp < start + WINDOW_SIZE_MS)
        .collect()
}

const TUMBLING: &str = "tumbling";

fn build_tumbling(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let events = window_events(env);
    let windowed = || {
        events
            .clone()
            .key_by(|event: &Event| event.key.clone())
            .window(WindowAssigner::tumbling(Duration::from_millis(
                WINDOW_SIZE_MS as u64,
            )))
    };
    windowed()
        .aggregate(SumValues)
        .add_sink(CollectSink::new(TUMBLING, |sum, timestamp, _| {
            format!("aggregate: sum={sum}@{timestamp}")
        }));
    windowed()
        .aggregate_with(
            SumValues,
            |key: &String, window: &TimeWindow, sum: u64, out: &mut dyn Collector<String>| {
                out.collect(format!(
                    "aggregate_with: {key} {} sum={sum}",
                    window_label(window)
                ));
            },
        )
        .add_sink(stamped(TUMBLING));
    windowed()
        .process(
            |key: &String,
             window: &TimeWindow,
             events: Vec<Event>,
             out: &mut dyn Collector<String>| {
                let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
                values.sort_unstable();
                out.collect(format!(
                    "process: {key} {} values={values:?}",
                    window_label(window)
                ));
            },
        )
        .add_sink(stamped(TUMBLING));
    Ok(())
}

const TUMBLING_PROGRAM: Program = program(TUMBLING, build_tumbling);

#[test]
fn tumbling_windows_aggregate_each_key_and_window_once_at_the_window_end() {
    let mut expected = Vec::new();
    for ((key, window), events) in expected_windows(tumbling_starts, WINDOW_SIZE_MS) {
        let sum: u64 = events.iter().map(|event| event.value).sum();
        let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
        values.sort_unstable();
        let end = window.max_timestamp();
        expected.push(format!("aggregate: sum={sum}@{end}"));
        expected.push(format!(
            "aggregate_with: {key} {} sum={sum}@{end}",
            window_label(&window)
        ));
        expected.push(format!(
            "process: {key} {} values={values:?}@{end}",
            window_label(&window)
        ));
    }
    for parallelism in [1, 2] {
        let rows = run(TUMBLING_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const SLIDING: &str = "sliding";

fn build_sliding(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let events = window_events(env);
    let windowed = || {
        events
            .clone()
            .key_by(|event: &Event| event.key.clone())
            .window(WindowAssigner::sliding(
                Duration::from_millis(WINDOW_SIZE_MS as u64),
                Duration::from_millis(SLIDE_MS as u64),
            ))
    };
    windowed()
        .aggregate_with(
            Count,
            |key: &String, window: &TimeWindow, count: u64, out: &mut dyn Collector<String>| {
                out.collect(format!(
                    "count: {key} {} count={count}",
                    window_label(window)
                ));
            },
        )
        .add_sink(stamped(SLIDING));
    windowed()
        .process(
            |key: &String,
             window: &TimeWindow,
             events: Vec<Event>,
             out: &mut dyn Collector<String>| {
                let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
                values.sort_unstable();
                out.collect(format!(
                    "process: {key} {} values={values:?}",
                    window_label(window)
                ));
            },
        )
        .add_sink(stamped(SLIDING));
    Ok(())
}

const SLIDING_PROGRAM: Program = program(SLIDING, build_sliding);

#[test]
fn sliding_windows_hold_every_record_in_each_overlapping_window() {
    let mut expected = Vec::new();
    for ((key, window), events) in expected_windows(sliding_starts, WINDOW_SIZE_MS) {
        let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
        values.sort_unstable();
        let end = window.max_timestamp();
        expected.push(format!(
            "count: {key} {} count={}@{end}",
            window_label(&window),
            values.len()
        ));
        expected.push(format!(
            "process: {key} {} values={values:?}@{end}",
            window_label(&window)
        ));
    }
    // 100 ms windows every 40 ms: windows start before the first record.
    assert!(expected.iter().any(|row| row.contains("[-80, 20)")));
    for parallelism in [1, 2] {
        let rows = run(SLIDING_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const WINDOW_REDUCE: &str = "window-reduce";

fn build_window_reduce(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    window_events(env)
        .key_by(|event: &Event| event.key.clone())
        .window(WindowAssigner::tumbling(Duration::from_millis(
            WINDOW_SIZE_MS as u64,
        )))
        .reduce(|first, second| {
            if second.value > first.value {
                second
            } else {
                first
            }
        })
        .add_sink(CollectSink::new(
            WINDOW_REDUCE,
            |event: &Event, timestamp, _| {
                format!(
                    "{} max value={} from {}@{timestamp}",
                    event.key, event.value, event.timestamp
                )
            },
        ));
    Ok(())
}

const WINDOW_REDUCE_PROGRAM: Program = program(WINDOW_REDUCE, build_window_reduce);

#[test]
fn window_reduce_emits_one_reduced_record_per_key_and_window() {
    let mut expected = Vec::new();
    for ((key, window), events) in expected_windows(tumbling_starts, WINDOW_SIZE_MS) {
        let largest = events
            .iter()
            .max_by_key(|event| event.value)
            .expect("a window holds a record");
        expected.push(format!(
            "{key} max value={} from {}@{}",
            largest.value,
            largest.timestamp,
            window.max_timestamp()
        ));
    }
    for parallelism in [1, 2] {
        let rows = run(WINDOW_REDUCE_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const SESSIONS: &str = "sessions";
const SESSION_GAP_MS: u64 = 30;
/// (key, timestamp, value), in source order. Out of order within 100 ms.
const SESSION_EVENTS: [(&str, i64, u64); 15] = [
    ("a", 0, 1),
    ("b", 5, 2),
    ("c", 0, 3),
    ("a", 10, 4),
    ("b", 36, 5),
    ("c", 60, 6),
    ("a", 25, 7),
    ("d", 200, 8),
    ("b", 66, 9),
    // Bridges c's sessions [0, 30) and [60, 90) into one.
    ("c", 30, 10),
    ("d", 150, 11),
    ("a", 100, 12),
    // Bridges d's sessions [150, 180) and [200, 230).
    ("d", 175, 13),
    ("a", 120, 14),
    ("a", 300, 15),
];

fn build_sessions(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let events: Vec<Event> = SESSION_EVENTS
        .iter()
        .map(|(key, timestamp, value)| Event::new(key, *timestamp, *value))
        .collect();
    let events = env.from_source(
        CollectionSource::new(events),
        WatermarkStrategy::for_bounded_out_of_orderness(Duration::from_millis(100))
            .with_timestamp_assigner(|event: &Event| event.timestamp),
        "session events",
    );
    let windowed = || {
        events
            .clone()
            .key_by(|event: &Event| event.key.clone())
            .window(WindowAssigner::session(Duration::from_millis(
                SESSION_GAP_MS,
            )))
    };
    windowed()
        .process(
            |key: &String,
             window: &TimeWindow,
             events: Vec<Event>,
             out: &mut dyn Collector<String>| {
                let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
                values.sort_unstable();
                out.collect(format!(
                    "process: {key} {} values={values:?}",
                    window_label(window)
                ));
            },
        )
        .add_sink(stamped(SESSIONS));
    windowed()
        .aggregate_with(
            SumValues,
            |key: &String, window: &TimeWindow, sum: u64, out: &mut dyn Collector<String>| {
                out.collect(format!("sum: {key} {} sum={sum}", window_label(window)));
            },
        )
        .add_sink(stamped(SESSIONS));
    Ok(())
}

const SESSIONS_PROGRAM: Program = program(SESSIONS, build_sessions);

#[test]
fn session_windows_merge_records_closer_than_the_gap() {
    // By hand, with a 30 ms gap: a record at t opens [t, t + 30); windows
    // that overlap or touch merge (as Flink's TimeWindow.intersects).
    let sessions: [(&str, i64, i64, &[u64]); 7] = [
        ("a", 0, 55, &[1, 4, 7]),
        ("a", 100, 150, &[12, 14]),
        ("a", 300, 330, &[15]),
        // 5 and 36: [5, 35) and [36, 66) do not touch.
        ("b", 5, 35, &[2]),
        // 36 and 66 are exactly one gap apart: [36, 66) touches [66, 96).
        ("b", 36, 96, &[5, 9]),
        ("c", 0, 90, &[3, 6, 10]),
        ("d", 150, 230, &[8, 11, 13]),
    ];
    let mut expected = Vec::new();
    for (key, start, end, values) in sessions {
        let sum: u64 = values.iter().sum();
        let mut sorted_values = values.to_vec();
        sorted_values.sort_unstable();
        let last = end - 1;
        expected.push(format!(
            "process: {key} [{start}, {end}) values={sorted_values:?}@{last}"
        ));
        expected.push(format!("sum: {key} [{start}, {end}) sum={sum}@{last}"));
    }
    for parallelism in [1, 2] {
        let rows = run(SESSIONS_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

// ---------------------------------------------------------------------------
// 4. Allowed lateness.
// ---------------------------------------------------------------------------

const LATENESS_DEFAULT: &str = "lateness-default";
const LATENESS_ALLOWED: &str = "lateness-allowed";
const ALLOWED_LATENESS_MS: u64 = 100;

/// In source order; with one record per poll the source's watermark is the
/// largest timestamp so far minus one.
fn late_events() -> Vec<Event> {
    vec![
        Event::new("a", 10, 1),
        Event::new("a", 20, 2),
        // Watermark 149: a's window [0, 100) fires with [1, 2].
        Event::new("a", 150, 3),
        // Late for [0, 100), within 100 ms of allowed lateness.
        Event::new("a", 30, 4),
        // Late for b's [0, 100), which has no record yet.
        Event::new("b", 50, 5),
        // Watermark 259: [100, 200) fires; [0, 100) is past its lateness.
        Event::new("a", 260, 6),
        // Too late even with allowed lateness.
        Event::new("a", 40, 7),
        Event::new("b", 99, 8),
    ]
}

fn build_lateness(env: &StreamExecutionEnvironment, key: &'static str, lateness: Option<Duration>) {
    let windowed = env
        .from_source(
            OneByOneSource {
                records: Arc::new(late_events()),
            },
            WatermarkStrategy::for_bounded_out_of_orderness(Duration::ZERO)
                .with_timestamp_assigner(|event: &Event| event.timestamp),
            "events in order of arrival",
        )
        // One source subtask keeps the order of arrival for every run.
        .set_parallelism(1)
        .key_by(|event: &Event| event.key.clone())
        .window(WindowAssigner::tumbling(Duration::from_millis(
            WINDOW_SIZE_MS as u64,
        )));
    let windowed = match lateness {
        Some(lateness) => windowed.allowed_lateness(lateness),
        None => windowed,
    };
    windowed
        .process(
            |key: &String,
             window: &TimeWindow,
             events: Vec<Event>,
             out: &mut dyn Collector<String>| {
                let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
                values.sort_unstable();
                out.collect(format!("{key} {} values={values:?}", window_label(window)));
            },
        )
        .add_sink(stamped(key));
}

fn build_lateness_default(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_lateness(env, LATENESS_DEFAULT, None);
    Ok(())
}

fn build_lateness_allowed(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_lateness(
        env,
        LATENESS_ALLOWED,
        Some(Duration::from_millis(ALLOWED_LATENESS_MS)),
    );
    Ok(())
}

const LATENESS_DEFAULT_PROGRAM: Program = program(LATENESS_DEFAULT, build_lateness_default);
const LATENESS_ALLOWED_PROGRAM: Program = program(LATENESS_ALLOWED, build_lateness_allowed);

fn rows(rows: &[&str]) -> Vec<String> {
    rows.iter().map(|row| row.to_string()).collect()
}

#[test]
fn without_allowed_lateness_records_behind_the_watermark_are_dropped() {
    let expected = rows(&[
        "a [0, 100) values=[1, 2]@99",
        "a [100, 200) values=[3]@199",
        "a [200, 300) values=[6]@299",
    ]);
    for parallelism in [1, 2] {
        let rows = run(LATENESS_DEFAULT_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

#[test]
fn with_allowed_lateness_a_late_record_fires_its_window_again_once() {
    let expected = rows(&[
        "a [0, 100) values=[1, 2]@99",
        // The late record 4 fires a's window again, with everything in it.
        "a [0, 100) values=[1, 2, 4]@99",
        // A late record in a window that had none fires it once, at once.
        "b [0, 100) values=[5]@99",
        "a [100, 200) values=[3]@199",
        "a [200, 300) values=[6]@299",
        // Records 7 and 8 come after the watermark passed 99 + 100: dropped.
    ]);
    for parallelism in [1, 2] {
        let rows = run(LATENESS_ALLOWED_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const LATE_SESSIONS: &str = "late-sessions";

fn build_late_sessions(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let events = vec![
        Event::new("a", 100, 1),
        // Watermark 99: [70, 100) alone is late, but it touches a's live
        // session [100, 130), so (as in Flink) it extends that session.
        Event::new("a", 70, 2),
        // [30, 60) is late and touches no session: dropped.
        Event::new("a", 30, 3),
        // Watermark 199: a's session [70, 130) fires.
        Event::new("b", 200, 4),
        // [150, 180) is late and does not touch [200, 230): dropped.
        Event::new("b", 150, 5),
        // [175, 205) is not late; it merges with [200, 230).
        Event::new("b", 175, 6),
    ];
    env.from_source(
        OneByOneSource {
            records: Arc::new(events),
        },
        WatermarkStrategy::for_bounded_out_of_orderness(Duration::ZERO)
            .with_timestamp_assigner(|event: &Event| event.timestamp),
        "events in order of arrival",
    )
    .set_parallelism(1)
    .key_by(|event: &Event| event.key.clone())
    .window(WindowAssigner::session(Duration::from_millis(
        SESSION_GAP_MS,
    )))
    .process(
        |key: &String, window: &TimeWindow, events: Vec<Event>, out: &mut dyn Collector<String>| {
            let mut values: Vec<u64> = events.iter().map(|event| event.value).collect();
            values.sort_unstable();
            out.collect(format!("{key} {} values={values:?}", window_label(window)));
        },
    )
    .add_sink(stamped(LATE_SESSIONS));
    Ok(())
}

const LATE_SESSIONS_PROGRAM: Program = program(LATE_SESSIONS, build_late_sessions);

#[test]
fn a_late_record_that_extends_a_live_session_joins_it() {
    let expected = rows(&[
        "a [70, 130) values=[1, 2]@129",
        "b [175, 230) values=[4, 6]@229",
    ]);
    for parallelism in [1, 2] {
        let rows = run(LATE_SESSIONS_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

// ---------------------------------------------------------------------------
// 5. connect with a KeyedCoProcessFunction, and the window join.
// ---------------------------------------------------------------------------

const CO_PROCESS: &str = "co-process";
const ORDER_COUNT: u64 = 40;
/// How long an order waits for its payment (and a payment for its order).
const MATCH_TIMEOUT_MS: i64 = 50;

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Order {
    id: u64,
    timestamp: i64,
    amount: u64,
}

#[derive(Clone, Debug, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Payment {
    order: u64,
    timestamp: i64,
    paid: u64,
}

fn order(index: u64) -> Order {
    Order {
        id: index,
        timestamp: 10 * index as i64,
        amount: 3 * index,
    }
}

/// Every third payment names an order that does not exist.
fn payment(index: u64) -> Payment {
    Payment {
        order: match index % 3 {
            0 => 1000 + index,
            _ => index,
        },
        timestamp: 10 * index as i64 + 5,
        paid: 3 * index + 1,
    }
}

/// Matches orders with payments, whichever comes first; reports what found
/// no partner in time.
#[derive(Clone, Default)]
struct MatchPayments {
    order: ValueState<Order>,
    payment: ValueState<Payment>,
}

impl KeyedCoProcessFunction<u64, Order, Payment, String> for MatchPayments {
    fn open(&mut self, state: &mut KeyedStateStore<u64>) {
        self.order = state.value_state("order");
        self.payment = state.value_state("payment");
    }

    fn process_element1(
        &mut self,
        order: Order,
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<String>,
    ) {
        match self.payment.clear(context) {
            Some(payment) => out.collect(format!(
                "matched order {} amount={} paid={}",
                order.id, order.amount, payment.paid
            )),
            None => {
                context.register_event_time_timer(order.timestamp + MATCH_TIMEOUT_MS);
                self.order.update(context, order);
            }
        }
    }

    fn process_element2(
        &mut self,
        payment: Payment,
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<String>,
    ) {
        match self.order.clear(context) {
            Some(order) => out.collect(format!(
                "matched order {} amount={} paid={}",
                order.id, order.amount, payment.paid
            )),
            None => {
                context.register_event_time_timer(payment.timestamp + MATCH_TIMEOUT_MS);
                self.payment.update(context, payment);
            }
        }
    }

    fn on_timer(
        &mut self,
        timestamp: Timestamp,
        context: &mut KeyedContext<'_, u64>,
        out: &mut dyn Collector<String>,
    ) {
        if let Some(order) = self.order.clear(context) {
            out.collect(format!("unpaid order {}@{timestamp}", order.id));
        }
        if let Some(payment) = self.payment.clear(context) {
            out.collect(format!(
                "payment for unknown order {}@{timestamp}",
                payment.order
            ));
        }
    }
}

fn build_co_process(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let orders = env.from_source(
        GeneratorSource::bounded(ORDER_COUNT, order),
        WatermarkStrategy::for_monotonous_timestamps()
            .with_timestamp_assigner(|order: &Order| order.timestamp),
        "orders",
    );
    let payments = env.from_source(
        GeneratorSource::bounded(ORDER_COUNT, payment),
        WatermarkStrategy::for_monotonous_timestamps()
            .with_timestamp_assigner(|payment: &Payment| payment.timestamp),
        "payments",
    );
    orders
        .key_by(|order| order.id)
        .connect(payments.key_by(|payment| payment.order))
        .process(MatchPayments::default())
        .add_sink(strings(CO_PROCESS));
    Ok(())
}

const CO_PROCESS_PROGRAM: Program = program(CO_PROCESS, build_co_process);

/// What the co-process of orders and payments emits.
fn expected_matches() -> Vec<String> {
    let orders: BTreeMap<u64, Order> = (0..ORDER_COUNT)
        .map(|index| (index, order(index)))
        .collect();
    let mut expected = Vec::new();
    let mut paid = BTreeSet::new();
    for index in 0..ORDER_COUNT {
        let payment = payment(index);
        match orders.get(&payment.order) {
            Some(order) => {
                paid.insert(order.id);
                expected.push(format!(
                    "matched order {} amount={} paid={}",
                    order.id, order.amount, payment.paid
                ));
            }
            None => expected.push(format!(
                "payment for unknown order {}@{}",
                payment.order,
                payment.timestamp + MATCH_TIMEOUT_MS
            )),
        }
    }
    for order in orders.values().filter(|order| !paid.contains(&order.id)) {
        expected.push(format!(
            "unpaid order {}@{}",
            order.id,
            order.timestamp + MATCH_TIMEOUT_MS
        ));
    }
    expected
}

#[test]
fn connected_keyed_streams_share_keyed_state_and_timers() {
    let expected = expected_matches();
    for parallelism in [1, 2] {
        let rows = run(CO_PROCESS_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const SPLIT_CO_PROCESS: &str = "split-co-process";

/// Orders and payments from one source (event `2i` is order `i`, `2i + 1`
/// payment `i`), split in two and connected again: at parallelism 1 the
/// split and the co-process are one task, the co-process fed directly by
/// both flat maps.
fn build_split_co_process(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let events = env.from_source(
        GeneratorSource::bounded(2 * ORDER_COUNT, |event| event),
        WatermarkStrategy::for_monotonous_timestamps().with_timestamp_assigner(|event: &u64| {
            if event & 1 == 0 {
                order(event / 2).timestamp
            } else {
                payment(event / 2).timestamp
            }
        }),
        "orders and payments",
    );
    let orders = events
        .clone()
        .flat_map(|event: u64, out: &mut dyn Collector<Order>| {
            if event & 1 == 0 {
                out.collect(order(event / 2));
            }
        })
        .name("orders");
    let payments = events
        .flat_map(|event: u64, out: &mut dyn Collector<Payment>| {
            if event & 1 == 1 {
                out.collect(payment(event / 2));
            }
        })
        .name("payments");
    orders
        .key_by(|order| order.id)
        .connect(payments.key_by(|payment| payment.order))
        .process(MatchPayments::default())
        .name("match payments")
        .add_sink(strings(SPLIT_CO_PROCESS))
        .name("sink");
    Ok(())
}

const SPLIT_CO_PROCESS_PROGRAM: Program = program(SPLIT_CO_PROCESS, build_split_co_process);

#[test]
fn a_co_process_of_one_split_stream_is_chained_at_parallelism_1_with_the_same_results() {
    let names = |parallelism: u32| -> Vec<String> {
        job_graph(SPLIT_CO_PROCESS_PROGRAM, parallelism)
            .vertices
            .iter()
            .map(|vertex| vertex.name.clone())
            .collect()
    };
    assert_eq!(
        names(1),
        ["orders and payments -> orders -> payments -> match payments -> sink"]
    );
    assert_eq!(
        names(2),
        [
            "orders and payments -> orders -> payments",
            "match payments -> sink"
        ]
    );
    // Timers fire as the co-process's two inputs' watermarks pass them, as
    // with two sources.
    for parallelism in [1, 2] {
        assert_rows(
            &run(SPLIT_CO_PROCESS_PROGRAM, parallelism),
            expected_matches(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const WINDOW_JOIN: &str = "window-join";
const JOIN_WINDOW_MS: i64 = 50;

/// (key, timestamp, name)
type Named = (u64, i64, String);

fn left_record(index: u64) -> Named {
    (index % 4, 5 * index as i64, format!("L{index}"))
}

fn right_record(index: u64) -> Named {
    (index % 3, 7 * index as i64, format!("R{index}"))
}

const LEFT_COUNT: u64 = 60;
const RIGHT_COUNT: u64 = 45;

fn build_window_join(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let named_time = || {
        WatermarkStrategy::for_monotonous_timestamps()
            .with_timestamp_assigner(|record: &Named| record.1)
    };
    let left = env.from_source(
        GeneratorSource::bounded(LEFT_COUNT, left_record),
        named_time(),
        "left",
    );
    let right = env.from_source(
        GeneratorSource::bounded(RIGHT_COUNT, right_record),
        named_time(),
        "right",
    );
    join_left_and_right(left, right, WINDOW_JOIN);
    Ok(())
}

/// The window join of the tests: left and right records with equal keys in
/// the same tumbling window, into the sink `key`.
fn join_left_and_right(left: DataStream<Named>, right: DataStream<Named>, key: &'static str) {
    left.join(right)
        .where_key(|left| left.0)
        .equal_to(|right| right.0)
        .window(WindowAssigner::tumbling(Duration::from_millis(
            JOIN_WINDOW_MS as u64,
        )))
        .apply(|left, right| format!("key {} {} {}", left.0, left.2, right.2))
        .add_sink(stamped(key));
}

const WINDOW_JOIN_PROGRAM: Program = program(WINDOW_JOIN, build_window_join);

/// What the window join of the left and right records emits.
fn expected_pairs() -> Vec<String> {
    let window_of = |timestamp: i64| timestamp - timestamp.rem_euclid(JOIN_WINDOW_MS);
    let mut expected = Vec::new();
    for left in (0..LEFT_COUNT).map(left_record) {
        for right in (0..RIGHT_COUNT).map(right_record) {
            if left.0 == right.0 && window_of(left.1) == window_of(right.1) {
                expected.push(format!(
                    "key {} {} {}@{}",
                    left.0,
                    left.2,
                    right.2,
                    window_of(left.1) + JOIN_WINDOW_MS - 1
                ));
            }
        }
    }
    expected
}

#[test]
fn window_join_pairs_records_with_equal_keys_in_the_same_window() {
    let expected = expected_pairs();
    assert!(expected.len() > 20, "the test data should join");
    for parallelism in [1, 2] {
        let rows = run(WINDOW_JOIN_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

/// The window join's left and right records from one source, in event
/// time order, each marked with whether it is a left one.
fn left_and_right(env: &StreamExecutionEnvironment) -> strom_core::DataStream<(bool, Named)> {
    let mut sides: Vec<(bool, Named)> = (0..LEFT_COUNT)
        .map(|index| (true, left_record(index)))
        .chain((0..RIGHT_COUNT).map(|index| (false, right_record(index))))
        .collect();
    sides.sort_by_key(|(_, record)| record.1);
    let count = sides.len() as u64;
    env.from_source(
        GeneratorSource::bounded(count, move |index| sides[index as usize].clone()),
        WatermarkStrategy::for_monotonous_timestamps()
            .with_timestamp_assigner(|event: &(bool, Named)| event.1 .1),
        "left and right",
    )
}

const SPLIT_WINDOW_JOIN: &str = "split-window-join";

/// The window join's left and right records from one source, in event
/// time order, split in two and joined again (chained at parallelism 1).
fn build_split_window_join(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let events = left_and_right(env);
    let side = |left: bool| {
        move |(is_left, record): (bool, Named), out: &mut dyn Collector<Named>| {
            if is_left == left {
                out.collect(record);
            }
        }
    };
    let left = events.clone().flat_map(side(true)).name("left");
    let right = events.flat_map(side(false)).name("right");
    join_left_and_right(left, right, SPLIT_WINDOW_JOIN);
    Ok(())
}

const SPLIT_WINDOW_JOIN_PROGRAM: Program = program(SPLIT_WINDOW_JOIN, build_split_window_join);

#[test]
fn a_window_join_of_one_split_stream_is_chained_at_parallelism_1_with_the_same_results() {
    assert_eq!(job_graph(SPLIT_WINDOW_JOIN_PROGRAM, 1).vertices.len(), 1);
    assert_eq!(job_graph(SPLIT_WINDOW_JOIN_PROGRAM, 2).vertices.len(), 2);
    // Two sources are two tasks, whatever the parallelism.
    assert_eq!(job_graph(WINDOW_JOIN_PROGRAM, 1).vertices.len(), 3);
    for parallelism in [1, 2] {
        assert_rows(
            &run(SPLIT_WINDOW_JOIN_PROGRAM, parallelism),
            expected_pairs(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const SIDE_OUTPUT_WINDOW_JOIN: &str = "side-output-window-join";

/// As [`build_split_window_join`], split by one operator with a side
/// output instead of two flat maps.
fn build_side_output_window_join(
    env: &StreamExecutionEnvironment,
    _: &ArgMatches,
) -> Result<(), String> {
    let (left, right) = left_and_right(env).split(
        |(is_left, record): (bool, Named),
         left: &mut dyn Collector<Named>,
         right: &mut dyn Collector<Named>| {
            if is_left {
                left.collect(record);
            } else {
                right.collect(record);
            }
        },
    );
    join_left_and_right(
        left.name("left"),
        right.name("right"),
        SIDE_OUTPUT_WINDOW_JOIN,
    );
    Ok(())
}

const SIDE_OUTPUT_WINDOW_JOIN_PROGRAM: Program =
    program(SIDE_OUTPUT_WINDOW_JOIN, build_side_output_window_join);

#[test]
fn a_window_join_of_a_stream_split_by_a_side_output_has_the_same_results() {
    // At parallelism 1 the split, its side output and the join are one
    // task with the source.
    assert_eq!(
        job_graph(SIDE_OUTPUT_WINDOW_JOIN_PROGRAM, 1).vertices.len(),
        1
    );
    assert_eq!(
        job_graph(SIDE_OUTPUT_WINDOW_JOIN_PROGRAM, 2).vertices.len(),
        2
    );
    for parallelism in [1, 2] {
        assert_rows(
            &run(SIDE_OUTPUT_WINDOW_JOIN_PROGRAM, parallelism),
            expected_pairs(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const SIDE_OUTPUT: &str = "side-output";
const SIDE_OUTPUT_COUNT: u64 = 5_000;

/// Numbers split by one operator: each even number twice on the main
/// output, each odd one as text on the side output, which goes on at a
/// parallelism of its own; both end in one sink.
fn build_side_output(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let (evens, odds) = env
        .from_source(
            GeneratorSource::bounded(SIDE_OUTPUT_COUNT, |index| index),
            WatermarkStrategy::no_watermarks(),
            "numbers",
        )
        .split(
            |number: u64, evens: &mut dyn Collector<u64>, odds: &mut dyn Collector<String>| {
                if number % 2 == 1 {
                    odds.collect(format!("odd {number}"));
                } else {
                    evens.collect(number);
                    evens.collect(number);
                }
            },
        );
    let odds = odds
        .name("odds")
        .rebalance()
        .map(|text: String| text)
        .set_parallelism(1);
    evens
        .name("evens")
        .map(|number: u64| format!("even {number}"))
        .union(vec![odds])
        .add_sink(strings(SIDE_OUTPUT));
    Ok(())
}

const SIDE_OUTPUT_PROGRAM: Program = program(SIDE_OUTPUT, build_side_output);

#[test]
fn a_side_output_gets_what_its_operator_emits_to_it_and_runs_in_its_tasks() {
    let expected: Vec<String> = (0..SIDE_OUTPUT_COUNT)
        .flat_map(|number| {
            if number % 2 == 1 {
                vec![format!("odd {number}")]
            } else {
                vec![format!("even {number}"); 2]
            }
        })
        .collect();
    for parallelism in [1, 2] {
        let graph = job_graph(SIDE_OUTPUT_PROGRAM, parallelism);
        // The side output is chained to its operator, which is chained to
        // the source.
        let names: Vec<&str> = graph
            .vertices
            .iter()
            .map(|vertex| vertex.name.as_str())
            .collect();
        let with_source = names
            .iter()
            .find(|name| name.contains("numbers"))
            .expect("a vertex of the source");
        assert!(
            with_source.contains("odds") && with_source.contains("evens"),
            "{names:?}"
        );
        assert_rows(
            &run(SIDE_OUTPUT_PROGRAM, parallelism),
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

/// The operator's parallelism, set on its main stream after the split, is
/// its side output's too; and disabling the operator's chaining keeps the
/// side output's consumers out of its task as well as the main output's.
#[test]
fn a_side_output_takes_its_operators_parallelism_and_chaining() {
    let env = StreamExecutionEnvironment::new();
    env.set_parallelism(2);
    let (main, side) = env.from_collection(vec![1u64, 2, 3]).rebalance().split(
        |number: u64, main: &mut dyn Collector<u64>, side: &mut dyn Collector<u64>| {
            main.collect(number);
            side.collect(number);
        },
    );
    let main = main.name("split").set_parallelism(3).disable_chaining();
    main.map(|number: u64| number)
        .name("after main")
        .add_sink(CollectSink::new("unused main", |row: &u64, _, _| {
            row.to_string()
        }));
    side.name("side")
        .map(|number: u64| number)
        .name("after side")
        .set_parallelism(3)
        .add_sink(CollectSink::new("unused side", |row: &u64, _, _| {
            row.to_string()
        }));
    let graph = env.build().unwrap_or_else(|error| panic!("{error}"));
    let vertex_of = |name: &str| {
        graph
            .vertices
            .iter()
            .find(|vertex| vertex.name.split(" -> ").any(|part| part == name))
            .unwrap_or_else(|| panic!("no vertex runs '{name}'"))
    };
    assert_eq!(vertex_of("split").id, vertex_of("side").id);
    assert_eq!(vertex_of("split").parallelism, 3);
    assert_ne!(vertex_of("after side").id, vertex_of("side").id);
    assert_ne!(vertex_of("after main").id, vertex_of("split").id);
}

#[test]
fn a_side_output_at_another_parallelism_than_its_operator_is_refused() {
    let env = StreamExecutionEnvironment::new();
    let (main, side) = env.from_collection(vec![1u64, 2, 3]).split(
        |number: u64, main: &mut dyn Collector<u64>, side: &mut dyn Collector<u64>| {
            main.collect(number);
            side.collect(number);
        },
    );
    main.add_sink(CollectSink::new("unused main", |row: &u64, _, _| {
        row.to_string()
    }));
    side.name("side")
        .set_parallelism(3)
        .add_sink(CollectSink::new("unused side", |row: &u64, _, _| {
            row.to_string()
        }));
    let error = env.build().map(|_| ()).unwrap_err().to_string();
    assert!(
        error.contains("side") && error.contains("side output runs in the tasks"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------
// 6. Union, partitioning, parallelism per operator, chaining and slot
//    sharing.
// ---------------------------------------------------------------------------

const UNION: &str = "union";

fn build_union(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let numbers = env.from_source(
        GeneratorSource::bounded(100, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    );
    let thousands = env
        .from_collection((1000..1050).collect::<Vec<u64>>())
        .set_parallelism(1);
    let doubled = env
        .from_source(
            GeneratorSource::bounded(30, |index| 2 * index),
            WatermarkStrategy::no_watermarks(),
            "even numbers",
        )
        .map(|number: u64| number + 5000);
    numbers
        .union(vec![thousands, doubled])
        .map(|number| number.to_string())
        .add_sink(strings(UNION));
    Ok(())
}

const UNION_PROGRAM: Program = program(UNION, build_union);

#[test]
fn union_merges_every_record_of_every_input() {
    let expected: Vec<String> = (0..100u64)
        .chain(1000..1050)
        .chain((0..30).map(|index| 2 * index + 5000))
        .map(|number| number.to_string())
        .collect();
    for parallelism in [1, 2] {
        let rows = run(UNION_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const REBALANCE: &str = "rebalance";
const PARTITIONED_COUNT: u64 = 100;

fn subtask_and_number(number: &u64, _: Timestamp, subtask: u32) -> String {
    format!("subtask {subtask}: {number}")
}

fn build_rebalance(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    env.from_source(
        GeneratorSource::bounded(PARTITIONED_COUNT, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    )
    .set_parallelism(1)
    .rebalance()
    .map(|number: u64| number)
    .name("identity")
    .add_sink(CollectSink::new(REBALANCE, subtask_and_number));
    Ok(())
}

const REBALANCE_PROGRAM: Program = program(REBALANCE, build_rebalance);

#[test]
fn rebalance_deals_records_round_robin_from_one_source_subtask_to_a_wider_operator() {
    let graph = job_graph(REBALANCE_PROGRAM, 2);
    let source = &graph.vertices[0];
    assert_eq!((source.name.as_str(), source.parallelism), ("numbers", 1));
    let map = &graph.vertices[1];
    assert_eq!(
        (map.name.as_str(), map.parallelism),
        ("identity -> Sink", 2)
    );
    assert_eq!(graph.edges[0].partitioning.name(), "REBALANCE");
    // One producer deals record i to subtask i mod 2.
    let expected: Vec<String> = (0..PARTITIONED_COUNT)
        .map(|number| subtask_and_number(&number, 0, (number % 2) as u32))
        .collect();
    let rows = run(REBALANCE_PROGRAM, 2);
    assert_rows(&rows, expected, "parallelism 2");
}

const BROADCAST: &str = "broadcast";

fn build_broadcast(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    env.from_source(
        GeneratorSource::bounded(PARTITIONED_COUNT, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    )
    .set_parallelism(1)
    .broadcast()
    .map(|number: u64| number)
    .add_sink(CollectSink::new(BROADCAST, subtask_and_number));
    Ok(())
}

const BROADCAST_PROGRAM: Program = program(BROADCAST, build_broadcast);

#[test]
fn broadcast_sends_every_record_to_every_subtask() {
    for parallelism in [1u32, 2] {
        let expected: Vec<String> = (0..parallelism)
            .flat_map(|subtask| {
                (0..PARTITIONED_COUNT).map(move |number| subtask_and_number(&number, 0, subtask))
            })
            .collect();
        assert_eq!(
            expected.len() as u64,
            PARTITIONED_COUNT * u64::from(parallelism)
        );
        let rows = run(BROADCAST_PROGRAM, parallelism);
        assert_rows(&rows, expected, &format!("parallelism {parallelism}"));
    }
}

const FORWARD: &str = "forward";

fn build_forward(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    env.from_source(
        GeneratorSource::bounded(PARTITIONED_COUNT, |index| index),
        WatermarkStrategy::no_watermarks(),
        "numbers",
    )
    .forward()
    .map(|number: u64| number)
    .name("unchained identity")
    .disable_chaining()
    .add_sink(CollectSink::new(FORWARD, subtask_and_number));
    Ok(())
}

const FORWARD_PROGRAM: Program = program(FORWARD, build_forward);

#[test]
fn forward_keeps_each_record_on_the_subtask_index_that_produced_it() {
    let graph = job_graph(FORWARD_PROGRAM, 2);
    let names: Vec<&str> = graph
        .vertices
        .iter()
        .map(|vertex| vertex.name.as_str())
        .collect();
    assert_eq!(names, ["numbers", "unchained identity", "Sink"]);
    assert!(graph
        .edges
        .iter()
        .all(|edge| edge.partitioning.name() == "FORWARD"));
    // Source subtask s generates indices s, s + 2, ...: they must stay on s.
    let expected: Vec<String> = (0..PARTITIONED_COUNT)
        .map(|number| subtask_and_number(&number, 0, (number % 2) as u32))
        .collect();
    let rows = run(FORWARD_PROGRAM, 2);
    assert_rows(&rows, expected, "parallelism 2");
}

const MIXED_PARALLELISM: &str = "mixed-parallelism";
const PIPELINE_COUNT: u64 = 300;
const PIPELINE_WINDOW_MS: i64 = 50;

/// A pipeline whose operators `configure` may unchain or move to another
/// slot sharing group; the results must not change.
fn build_pipeline(
    env: &StreamExecutionEnvironment,
    key: &'static str,
    configure: fn(strom_core::DataStream<u64>) -> strom_core::DataStream<u64>,
) {
    let numbers = env.from_source(
        GeneratorSource::bounded(PIPELINE_COUNT, |index| index),
        WatermarkStrategy::for_monotonous_timestamps()
            .with_timestamp_assigner(|number: &u64| *number as i64),
        "numbers",
    );
    let doubled = configure(numbers.map(|number: u64| number * 2).name("double"));
    doubled
        .filter(|number| number % 3 != 0)
        .name("not divisible by 3")
        .key_by(|number| number % 5)
        .window(WindowAssigner::tumbling(Duration::from_millis(
            PIPELINE_WINDOW_MS as u64,
        )))
        .aggregate_with(
            Count,
            |key: &u64, window: &TimeWindow, count: u64, out: &mut dyn Collector<String>| {
                out.collect(format!("key {key} {} count={count}", window_label(window)));
            },
        )
        .name("counts")
        .add_sink(stamped(key))
        .name("sink");
}

fn expected_pipeline_rows() -> Vec<String> {
    let mut counts: BTreeMap<(u64, i64), u64> = BTreeMap::new();
    for number in 0..PIPELINE_COUNT {
        let doubled = number * 2;
        if doubled % 3 != 0 {
            let timestamp = number as i64;
            let start = timestamp - timestamp.rem_euclid(PIPELINE_WINDOW_MS);
            *counts.entry((doubled % 5, start)).or_default() += 1;
        }
    }
    counts
        .into_iter()
        .map(|((key, start), count)| {
            format!(
                "key {key} [{start}, {}) count={count}@{}",
                start + PIPELINE_WINDOW_MS,
                start + PIPELINE_WINDOW_MS - 1
            )
        })
        .collect()
}

fn build_mixed_parallelism(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let numbers = env
        .from_source(
            GeneratorSource::bounded(PIPELINE_COUNT, |index| index),
            WatermarkStrategy::for_monotonous_timestamps()
                .with_timestamp_assigner(|number: &u64| *number as i64),
            "numbers",
        )
        .set_parallelism(1);
    numbers
        .rebalance()
        .map(|number: u64| number * 2)
        .name("double")
        .set_parallelism(2)
        .filter(|number| number % 3 != 0)
        .name("not divisible by 3")
        .set_parallelism(2)
        .key_by(|number| number % 5)
        .window(WindowAssigner::tumbling(Duration::from_millis(
            PIPELINE_WINDOW_MS as u64,
        )))
        .aggregate_with(
            Count,
            |key: &u64, window: &TimeWindow, count: u64, out: &mut dyn Collector<String>| {
                out.collect(format!("key {key} {} count={count}", window_label(window)));
            },
        )
        .name("counts")
        .set_parallelism(1)
        .add_sink(stamped(MIXED_PARALLELISM))
        .name("sink");
    Ok(())
}

const MIXED_PARALLELISM_PROGRAM: Program = program(MIXED_PARALLELISM, build_mixed_parallelism);

#[test]
fn operators_with_their_own_parallelism_give_the_same_results() {
    // Source 1 -> map and filter 2 (rebalanced) -> window 1 -> sink at the
    // job's parallelism.
    let graph = job_graph(MIXED_PARALLELISM_PROGRAM, 2);
    let shape: Vec<(&str, u32)> = graph
        .vertices
        .iter()
        .map(|vertex| (vertex.name.as_str(), vertex.parallelism))
        .collect();
    assert_eq!(
        shape,
        [
            ("numbers", 1),
            ("double -> not divisible by 3 -> counts (local)", 2),
            ("counts", 1),
            ("sink", 2)
        ]
    );
    for parallelism in [1, 2] {
        let rows = run(MIXED_PARALLELISM_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected_pipeline_rows(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const CHAINED: &str = "chained";
const UNCHAINED: &str = "unchained";
const ISOLATED: &str = "isolated";

fn build_chained(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_pipeline(env, CHAINED, |stream| stream);
    Ok(())
}

fn build_unchained(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_pipeline(env, UNCHAINED, |stream| stream.disable_chaining());
    Ok(())
}

fn build_isolated(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_pipeline(env, ISOLATED, |stream| {
        stream.slot_sharing_group("isolated")
    });
    Ok(())
}

const CHAINED_PROGRAM: Program = program(CHAINED, build_chained);
const UNCHAINED_PROGRAM: Program = program(UNCHAINED, build_unchained);
const ISOLATED_PROGRAM: Program = program(ISOLATED, build_isolated);

#[test]
fn disable_chaining_and_slot_sharing_groups_change_the_job_graph_not_the_results() {
    for parallelism in [1u32, 2] {
        let vertices = |program: Program| -> Vec<(String, String)> {
            job_graph(program, parallelism)
                .vertices
                .iter()
                .map(|vertex| (vertex.name.clone(), vertex.slot_sharing_group.clone()))
                .collect()
        };
        let owned = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(name, group)| (name.to_string(), group.to_string()))
                .collect()
        };
        // At parallelism 2 the window aggregate's local phase chains before
        // the shuffle, its global phase after. At parallelism 1 the shuffle
        // has one receiver, which gets every record as over a forward edge:
        // it is chained too.
        let shuffled = |before: &str, after: &str| -> Vec<String> {
            if parallelism == 1 {
                vec![format!("{before} -> {after}")]
            } else {
                vec![before.to_string(), after.to_string()]
            }
        };
        let in_group = |names: Vec<String>, group: &str| -> Vec<(String, String)> {
            names
                .into_iter()
                .map(|name| (name, group.to_string()))
                .collect()
        };
        assert_eq!(
            vertices(CHAINED_PROGRAM),
            in_group(
                shuffled(
                    "numbers -> double -> not divisible by 3 -> counts (local)",
                    "counts -> sink"
                ),
                "default"
            )
        );
        let mut unchained = owned(&[("numbers", "default"), ("double", "default")]);
        unchained.extend(in_group(
            shuffled("not divisible by 3 -> counts (local)", "counts -> sink"),
            "default",
        ));
        assert_eq!(vertices(UNCHAINED_PROGRAM), unchained);
        // Operators after "double" name no group: they inherit its.
        let mut isolated = owned(&[("numbers", "default")]);
        isolated.extend(in_group(
            shuffled(
                "double -> not divisible by 3 -> counts (local)",
                "counts -> sink",
            ),
            "isolated",
        ));
        assert_eq!(vertices(ISOLATED_PROGRAM), isolated);
        assert_eq!(
            job_graph(CHAINED_PROGRAM, parallelism).slots_required(),
            parallelism
        );
        assert_eq!(
            job_graph(UNCHAINED_PROGRAM, parallelism).slots_required(),
            parallelism
        );
        let isolated = job_graph(ISOLATED_PROGRAM, parallelism);
        assert_eq!(isolated.slots_required(), 2 * parallelism);
        assert!(
            isolated
                .to_string()
                .contains("slot sharing group 'isolated'"),
            "{isolated}"
        );
        for program in [CHAINED_PROGRAM, UNCHAINED_PROGRAM, ISOLATED_PROGRAM] {
            let rows = run(program, parallelism);
            assert_rows(
                &rows,
                expected_pipeline_rows(),
                &format!("{} at parallelism {parallelism}", program.name),
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 7. Watermarks: the minimum over inputs, and idleness.
// ---------------------------------------------------------------------------

const SLOW_INPUT: &str = "slow-input";
const SLOW_COUNT: u64 = 100;
const SLOW_TIMESTAMP_STEP: i64 = 10;
const SLOW_INTERVAL: Duration = Duration::from_millis(2);

/// Emits records with timestamps `10 * index`, one every 2 ms of wall time,
/// subtask s of p taking indices s, s + p, ...
struct PacedSource {
    key: &'static str,
}

impl Source<Event> for PacedSource {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<Event>> {
        Box::new(PacedReader {
            key: self.key,
            next: u64::from(subtask_index),
            step: u64::from(parallelism),
            due: None,
        })
    }
}

struct PacedReader {
    key: &'static str,
    next: u64,
    step: u64,
    due: Option<Instant>,
}

impl SourceReader<Event> for PacedReader {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<Event>, _budget: usize) -> SourceStatus {
        if self.next >= SLOW_COUNT {
            return SourceStatus::Finished;
        }
        let now = Instant::now();
        if self.due.is_some_and(|due| now < due) {
            return SourceStatus::NothingAvailable;
        }
        output.collect(Event::new(
            self.key,
            SLOW_TIMESTAMP_STEP * self.next as i64,
            self.next,
        ));
        self.next += self.step;
        self.due = Some(now + SLOW_INTERVAL);
        SourceStatus::NothingAvailable
    }
}

/// Counts a window's records per input.
#[derive(Clone, Copy)]
struct CountPerInput;

impl AggregateFunction<Event, (u64, u64), (u64, u64)> for CountPerInput {
    fn create_accumulator(&self) -> (u64, u64) {
        (0, 0)
    }
    fn add(&self, event: Event, counts: &mut (u64, u64)) {
        if event.key == "fast" {
            counts.0 += 1;
        } else {
            counts.1 += 1;
        }
    }
    fn get_result(&self, counts: (u64, u64)) -> (u64, u64) {
        counts
    }
    fn merge(&self, first: (u64, u64), second: (u64, u64)) -> (u64, u64) {
        (first.0 + second.0, first.1 + second.1)
    }
}

fn build_slow_input(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    let fast = env.from_source(
        GeneratorSource::bounded(SLOW_COUNT, |index| {
            Event::new("fast", SLOW_TIMESTAMP_STEP * index as i64, index)
        }),
        event_time(),
        "fast source",
    );
    let slow = env.from_source(PacedSource { key: "slow" }, event_time(), "slow source");
    count_windows_per_input(fast, slow, SLOW_INPUT);
    Ok(())
}

/// The union of `fast` and `slow` in tumbling windows, each window's
/// records counted per input, into the rows of `key`.
fn count_windows_per_input(
    fast: strom_core::DataStream<Event>,
    slow: strom_core::DataStream<Event>,
    key: &'static str,
) {
    fast.union(vec![slow])
        .key_by(|_: &Event| 0u64)
        .window(WindowAssigner::tumbling(Duration::from_millis(
            WINDOW_SIZE_MS as u64,
        )))
        .aggregate_with(
            CountPerInput,
            |_: &u64,
             window: &TimeWindow,
             (fast, slow): (u64, u64),
             out: &mut dyn Collector<String>| {
                out.collect(format!("{} fast={fast} slow={slow}", window_label(window)));
            },
        )
        .add_sink(strings(key));
}

const SLOW_INPUT_PROGRAM: Program = program(SLOW_INPUT, build_slow_input);

#[test]
fn a_task_watermark_is_the_minimum_over_its_inputs_so_a_slow_input_holds_windows_back() {
    // The fast source ends (sending its final watermark) long before the slow
    // one has emitted its records. Were the union's watermark not the
    // minimum over its inputs, windows would fire early and drop the slow
    // records as late.
    let windows = SLOW_COUNT as i64 * SLOW_TIMESTAMP_STEP / WINDOW_SIZE_MS;
    let per_window = WINDOW_SIZE_MS / SLOW_TIMESTAMP_STEP;
    let expected: Vec<String> = (0..windows)
        .map(|window| {
            let start = window * WINDOW_SIZE_MS;
            format!(
                "[{start}, {}) fast={per_window} slow={per_window}",
                start + WINDOW_SIZE_MS
            )
        })
        .collect();
    for parallelism in [1, 2] {
        let rows = run(SLOW_INPUT_PROGRAM, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
    }
}

const IDLENESS_COUNT: u64 = 100;
const IDLENESS_TIMEOUT: Duration = Duration::from_millis(20);
/// How long the idle subtask waits for windows before it gives up (and the
/// test fails): far beyond what the job needs, even on a loaded machine.
const IDLE_SUBTASK_PATIENCE: Duration = Duration::from_secs(10);
/// Windows [0, 100) to [800, 900) of both keys can fire on the active
/// subtask's watermark alone (its last record has timestamp 990); the
/// windows [900, 1000) need the final watermark.
const EARLY_WINDOW_END: i64 = 900;
const EARLY_WINDOW_ROWS: u64 = 2 * 9;

/// What one idleness job saw, shared by its source and its sink.
struct IdlenessProbe {
    /// The key of the job's rows in [`RESULTS`].
    key: &'static str,
    /// Whether the active subtask emits its records all at once (and then
    /// turns idle too) rather than paced (and never idle while it has data).
    burst: bool,
    windows_fired: AtomicU64,
    /// When each window fired, by window start.
    fired_at: Mutex<Vec<(i64, Instant)>>,
    /// When the idle subtask ended, and whether it ran out of patience.
    idle_subtask_end: Mutex<Option<(Instant, bool)>>,
}

impl IdlenessProbe {
    const fn new(key: &'static str, burst: bool) -> Self {
        IdlenessProbe {
            key,
            burst,
            windows_fired: AtomicU64::new(0),
            fired_at: Mutex::new(Vec::new()),
            idle_subtask_end: Mutex::new(None),
        }
    }

    fn reset(&self) {
        self.windows_fired.store(0, Ordering::SeqCst);
        lock(&self.fired_at).clear();
        *lock(&self.idle_subtask_end) = None;
    }
}

const ONE_IDLE_SUBTASK_KEY: &str = "one-idle-subtask";
const EVERY_SUBTASK_IDLE_KEY: &str = "every-subtask-idle";
static ONE_IDLE_SUBTASK: IdlenessProbe = IdlenessProbe::new(ONE_IDLE_SUBTASK_KEY, false);
static EVERY_SUBTASK_IDLE: IdlenessProbe = IdlenessProbe::new(EVERY_SUBTASK_IDLE_KEY, true);

/// Two subtasks: subtask 0 has all the data, subtask 1 none. Subtask 1
/// stays open (with nothing available) until the windows that subtask 0's
/// watermark closes have fired, so they can only have fired while it was
/// idle. Subtask 0 ends after subtask 1, so that its final watermark
/// releases nothing early.
struct IdleSplitSource {
    probe: &'static IdlenessProbe,
}

impl Source<Event> for IdleSplitSource {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, subtask_index: u32, parallelism: u32) -> Box<dyn SourceReader<Event>> {
        assert_eq!(parallelism, 2, "the idleness source runs two subtasks");
        if subtask_index == 0 {
            Box::new(ActiveReader {
                probe: self.probe,
                next: 0,
                due: None,
            })
        } else {
            Box::new(IdleReader {
                probe: self.probe,
                started: None,
            })
        }
    }
}

struct ActiveReader {
    probe: &'static IdlenessProbe,
    next: u64,
    due: Option<Instant>,
}

impl SourceReader<Event> for ActiveReader {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<Event>, budget: usize) -> SourceStatus {
        if self.next >= IDLENESS_COUNT {
            return if lock(&self.probe.idle_subtask_end).is_some() {
                SourceStatus::Finished
            } else {
                SourceStatus::NothingAvailable
            };
        }
        // Paced, this subtask never looks idle while it has data.
        let now = Instant::now();
        if self.due.is_some_and(|due| now < due) {
            return SourceStatus::NothingAvailable;
        }
        let count = if self.probe.burst { budget as u64 } else { 1 };
        for _ in 0..count.min(IDLENESS_COUNT - self.next) {
            output.collect(Event::new(
                &format!("k{}", self.next % 2),
                10 * self.next as i64,
                self.next,
            ));
            self.next += 1;
        }
        self.due = Some(now + Duration::from_millis(1));
        SourceStatus::NothingAvailable
    }
}

struct IdleReader {
    probe: &'static IdlenessProbe,
    started: Option<Instant>,
}

impl SourceReader<Event> for IdleReader {
    fn poll_next(&mut self, _output: &mut dyn SourceOutput<Event>, _budget: usize) -> SourceStatus {
        let started = *self.started.get_or_insert_with(Instant::now);
        let windows_fired = self.probe.windows_fired.load(Ordering::SeqCst) >= EARLY_WINDOW_ROWS;
        let out_of_patience = started.elapsed() > IDLE_SUBTASK_PATIENCE;
        if windows_fired || out_of_patience {
            *lock(&self.probe.idle_subtask_end) = Some((Instant::now(), out_of_patience));
            SourceStatus::Finished
        } else {
            SourceStatus::NothingAvailable
        }
    }
}

/// Records each window row and when it arrived.
#[derive(Clone)]
struct FiringTimeSink {
    probe: &'static IdlenessProbe,
}

impl SinkFunction<(i64, String)> for FiringTimeSink {
    fn invoke(&mut self, (start, row): (i64, String), _timestamp: Timestamp) {
        lock(&self.probe.fired_at).push((start, Instant::now()));
        push_row(self.probe.key, row);
        self.probe.windows_fired.fetch_add(1, Ordering::SeqCst);
    }
}

fn build_idleness(env: &StreamExecutionEnvironment, probe: &'static IdlenessProbe) {
    env.from_source(
        IdleSplitSource { probe },
        event_time().with_idleness(IDLENESS_TIMEOUT),
        "one subtask without data",
    )
    .set_parallelism(2)
    .key_by(|event: &Event| event.key.clone())
    .window(WindowAssigner::tumbling(Duration::from_millis(
        WINDOW_SIZE_MS as u64,
    )))
    .aggregate_with(
        Count,
        |key: &String, window: &TimeWindow, count: u64, out: &mut dyn Collector<(i64, String)>| {
            out.collect((
                window.start,
                format!("{key} {} count={count}", window_label(window)),
            ));
        },
    )
    .add_sink(FiringTimeSink { probe });
}

fn build_one_idle_subtask(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_idleness(env, &ONE_IDLE_SUBTASK);
    Ok(())
}

fn build_every_subtask_idle(
    env: &StreamExecutionEnvironment,
    _: &ArgMatches,
) -> Result<(), String> {
    build_idleness(env, &EVERY_SUBTASK_IDLE);
    Ok(())
}

const ONE_IDLE_SUBTASK_PROGRAM: Program = program(ONE_IDLE_SUBTASK_KEY, build_one_idle_subtask);
const EVERY_SUBTASK_IDLE_PROGRAM: Program =
    program(EVERY_SUBTASK_IDLE_KEY, build_every_subtask_idle);

/// Runs an idleness job at parallelism 1 and 2 and checks that the windows
/// the active subtask's watermark closes fired while the other subtask was
/// still running (idle).
fn check_windows_fire_while_a_subtask_is_idle(program: Program, probe: &'static IdlenessProbe) {
    let mut expected = Vec::new();
    for key in ["k0", "k1"] {
        for window in 0..10 {
            let start = window * WINDOW_SIZE_MS;
            expected.push(format!(
                "{key} [{start}, {}) count=5",
                start + WINDOW_SIZE_MS
            ));
        }
    }
    for parallelism in [1, 2] {
        probe.reset();
        let rows = run(program, parallelism);
        assert_rows(
            &rows,
            expected.clone(),
            &format!("parallelism {parallelism}"),
        );
        let (ended_at, out_of_patience) =
            lock(&probe.idle_subtask_end).expect("the idle subtask ended");
        assert!(
            !out_of_patience,
            "parallelism {parallelism}: windows did not fire while a source subtask was idle"
        );
        let fired_at = lock(&probe.fired_at).clone();
        let early: Vec<Instant> = fired_at
            .iter()
            .filter(|(start, _)| *start < EARLY_WINDOW_END)
            .map(|(_, at)| *at)
            .collect();
        assert_eq!(early.len() as u64, EARLY_WINDOW_ROWS);
        assert!(
            early.iter().all(|at| *at <= ended_at),
            "parallelism {parallelism}: a window fired only after the idle subtask ended"
        );
    }
}

#[test]
fn an_idle_source_subtask_does_not_hold_back_the_windows_of_the_others() {
    check_windows_fire_while_a_subtask_is_idle(ONE_IDLE_SUBTASK_PROGRAM, &ONE_IDLE_SUBTASK);
}

#[test]
fn when_every_source_subtask_turns_idle_the_largest_watermark_fires_windows() {
    // The active subtask emits everything in one poll and then turns idle
    // as well, before or after the subtask without data: either way, as in
    // Flink, the valve then flushes the largest watermark of its inputs.
    check_windows_fire_while_a_subtask_is_idle(EVERY_SUBTASK_IDLE_PROGRAM, &EVERY_SUBTASK_IDLE);
}

// ---------------------------------------------------------------------------
// 8. Max parallelism and key groups.
// ---------------------------------------------------------------------------

const KEY_GROUPS: &str = "key-groups";
const KEY_GROUP_RECORDS: u64 = 600;
const KEY_COUNT: u64 = 37;

fn build_key_groups(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    // One source subtask: each key's records arrive in index order at every
    // parallelism, so the rolling reduce's running sums are the same too.
    let readings = env
        .from_source(
            GeneratorSource::bounded(KEY_GROUP_RECORDS, |index| Reading {
                key: index % KEY_COUNT,
                timestamp: 3 * index as i64,
                value: index,
            }),
            WatermarkStrategy::for_monotonous_timestamps()
                .with_timestamp_assigner(|reading: &Reading| reading.timestamp),
            "readings",
        )
        .set_parallelism(1);
    readings
        .clone()
        .key_by(|reading| reading.key)
        .window(WindowAssigner::tumbling(Duration::from_millis(200)))
        .aggregate_with(
            Count,
            |key: &u64, window: &TimeWindow, count: u64, out: &mut dyn Collector<(u64, String)>| {
                out.collect((
                    *key,
                    format!("window {} count={count}", window_label(window)),
                ));
            },
        )
        .add_sink(CollectSink::new(KEY_GROUPS, |(key, row), _, subtask| {
            format!("key {key} {row} on subtask {subtask}")
        }));
    readings
        .key_by(|reading| reading.key)
        .reduce(|sum, reading| Reading {
            key: reading.key,
            timestamp: reading.timestamp,
            value: sum.value + reading.value,
        })
        .add_sink(CollectSink::new(
            KEY_GROUPS,
            |reading: &Reading, _, subtask| {
                format!(
                    "key {} rolling sum={} at {} on subtask {subtask}",
                    reading.key, reading.value, reading.timestamp
                )
            },
        ));
    Ok(())
}

const KEY_GROUPS_PROGRAM: Program = program(KEY_GROUPS, build_key_groups);

#[test]
fn keyed_results_do_not_depend_on_parallelism_or_max_parallelism() {
    let mut expected = Vec::new();
    let mut windows: BTreeMap<(u64, i64), u64> = BTreeMap::new();
    let mut sums: BTreeMap<u64, u64> = BTreeMap::new();
    for index in 0..KEY_GROUP_RECORDS {
        let (key, timestamp) = (index % KEY_COUNT, 3 * index as i64);
        *windows
            .entry((key, timestamp - timestamp.rem_euclid(200)))
            .or_default() += 1;
        let sum = sums.entry(key).or_default();
        *sum += index;
        expected.push(format!("key {key} rolling sum={sum} at {timestamp}"));
    }
    for ((key, start), count) in windows {
        expected.push(format!(
            "key {key} window [{start}, {}) count={count}",
            start + 200
        ));
    }
    for (parallelism, max_parallelism) in [(1, 128), (2, 128), (2, 2), (2, 7), (1, 1)] {
        let rows = run_with_max_parallelism(KEY_GROUPS_PROGRAM, parallelism, max_parallelism);
        let what = format!("parallelism {parallelism}, max parallelism {max_parallelism}");
        // Every key is on the subtask that owns its key group.
        let mut without_subtask = Vec::new();
        for row in &rows {
            let (row, subtask) = row.rsplit_once(" on subtask ").expect("a subtask");
            let key: u64 = row
                .strip_prefix("key ")
                .and_then(|rest| rest.split(' ').next())
                .and_then(|key| key.parse().ok())
                .expect("a key");
            let owner = subtask_for_key_group(
                key_group_of(&key, max_parallelism),
                max_parallelism,
                parallelism,
            );
            assert_eq!(subtask, owner.to_string(), "{what}: key {key}");
            without_subtask.push(row.to_string());
        }
        assert_rows(&sorted(without_subtask), expected.clone(), &what);
    }
}

// ---------------------------------------------------------------------------
// Watermark alignment.
// ---------------------------------------------------------------------------

const ALIGNED: &str = "aligned";
const UNALIGNED: &str = "unaligned";
/// The fast source's records (timestamps 0, 10, ..., 19 990); the slow
/// source has [`SLOW_COUNT`] records (0 to 990), one every 2 ms.
const LEADING_COUNT: u64 = 2_000;
const ALIGNMENT_DRIFT: Duration = Duration::from_millis(100);
/// How far the fast source may get ahead of the slow one with alignment:
/// the drift, plus what the channel's ring holds (one record and one
/// watermark per element, 16 elements) with room to spare.
const ALIGNED_LEAD_MAX: i64 = 600;
/// How far ahead it gets without alignment, at the least.
const UNALIGNED_LEAD_MIN: i64 = 5_000;

/// What one alignment job saw of its two sources.
struct AlignmentProbe {
    /// The slow source's latest timestamp, and whether it has ended.
    slow_latest: AtomicI64,
    slow_ended: AtomicBool,
    /// The largest lead of the fast source's timestamps over the slow
    /// source's while the slow one ran.
    lead_max: AtomicI64,
}

impl AlignmentProbe {
    const fn new() -> Self {
        AlignmentProbe {
            slow_latest: AtomicI64::new(0),
            slow_ended: AtomicBool::new(false),
            lead_max: AtomicI64::new(0),
        }
    }

    fn reset(&self) {
        self.slow_latest.store(0, Ordering::SeqCst);
        self.slow_ended.store(false, Ordering::SeqCst);
        self.lead_max.store(0, Ordering::SeqCst);
    }
}

static ALIGNED_PROBE: AlignmentProbe = AlignmentProbe::new();
static UNALIGNED_PROBE: AlignmentProbe = AlignmentProbe::new();

/// One of the two sources of an alignment job: the fast one emits a record
/// per poll as fast as it is polled; the slow one, one every 2 ms. Each
/// record is followed by a watermark (the reader pauses after it), and so
/// goes in a buffer of its own.
struct ProbedSource {
    probe: &'static AlignmentProbe,
    fast: bool,
}

impl Source<Event> for ProbedSource {
    fn boundedness(&self) -> Boundedness {
        Boundedness::Bounded
    }

    fn create_reader(&self, _: u32, _: u32) -> Box<dyn SourceReader<Event>> {
        Box::new(ProbedReader {
            probe: self.probe,
            fast: self.fast,
            next: 0,
            due: None,
        })
    }
}

struct ProbedReader {
    probe: &'static AlignmentProbe,
    fast: bool,
    next: u64,
    due: Option<Instant>,
}

impl SourceReader<Event> for ProbedReader {
    fn poll_next(&mut self, output: &mut dyn SourceOutput<Event>, _budget: usize) -> SourceStatus {
        let timestamp = SLOW_TIMESTAMP_STEP * self.next as i64;
        if self.fast {
            if self.next >= LEADING_COUNT {
                return SourceStatus::Finished;
            }
            if !self.probe.slow_ended.load(Ordering::SeqCst) {
                let lead = timestamp - self.probe.slow_latest.load(Ordering::SeqCst);
                self.probe.lead_max.fetch_max(lead, Ordering::SeqCst);
            }
            output.collect(Event::new("fast", timestamp, self.next));
            self.next += 1;
            // A watermark after every record, and polled again at once.
            return SourceStatus::NothingAvailableFor(Duration::ZERO);
        } else {
            if self.next >= SLOW_COUNT {
                self.probe.slow_ended.store(true, Ordering::SeqCst);
                return SourceStatus::Finished;
            }
            let now = Instant::now();
            if self.due.is_some_and(|due| now < due) {
                return SourceStatus::NothingAvailable;
            }
            self.due = Some(now + SLOW_INTERVAL);
            self.probe.slow_latest.store(timestamp, Ordering::SeqCst);
            output.collect(Event::new("slow", timestamp, self.next));
        }
        self.next += 1;
        SourceStatus::NothingAvailable
    }
}

fn build_alignment(env: &StreamExecutionEnvironment, key: &'static str, aligned: bool) {
    let probe = if aligned {
        &ALIGNED_PROBE
    } else {
        &UNALIGNED_PROBE
    };
    let strategy = || match aligned {
        true => event_time().with_watermark_alignment("test", ALIGNMENT_DRIFT),
        false => event_time(),
    };
    let fast = env.from_source(ProbedSource { probe, fast: true }, strategy(), "fast");
    let slow = env.from_source(ProbedSource { probe, fast: false }, strategy(), "slow");
    count_windows_per_input(fast, slow, key);
}

fn build_aligned(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_alignment(env, ALIGNED, true);
    Ok(())
}

fn build_unaligned(env: &StreamExecutionEnvironment, _: &ArgMatches) -> Result<(), String> {
    build_alignment(env, UNALIGNED, false);
    Ok(())
}

const ALIGNED_PROGRAM: Program = program(ALIGNED, build_aligned);
const UNALIGNED_PROGRAM: Program = program(UNALIGNED, build_unaligned);

#[test]
fn watermark_alignment_keeps_a_fast_source_within_the_drift_of_a_slow_one() {
    // Both jobs give the same windows: alignment delays, never drops.
    let per_window = (WINDOW_SIZE_MS / SLOW_TIMESTAMP_STEP) as u64;
    let expected: Vec<String> = (0..LEADING_COUNT / per_window)
        .map(|window| {
            let start = window as i64 * WINDOW_SIZE_MS;
            let slow = if window < SLOW_COUNT / per_window {
                per_window
            } else {
                0
            };
            format!(
                "[{start}, {}) fast={per_window} slow={slow}",
                start + WINDOW_SIZE_MS
            )
        })
        .collect();

    // The window task reads both sources' channels: aligned, it is the
    // only one that holds the fast channel back.
    let graph = job_graph(ALIGNED_PROGRAM, 1);
    let window_vertex = graph
        .vertices
        .iter()
        .find(|vertex| !vertex.is_source)
        .expect("a window task");
    assert_eq!(
        graph.watermark_alignment(window_vertex.id),
        Some(ALIGNMENT_DRIFT.as_millis() as i64)
    );
    let unaligned_graph = job_graph(UNALIGNED_PROGRAM, 1);
    assert!(unaligned_graph
        .vertices
        .iter()
        .all(|vertex| unaligned_graph.watermark_alignment(vertex.id).is_none()));
    // The plan says where it applies.
    let plan = graph.to_string();
    assert!(
        plan.contains("holds input channels more than 100 ms ahead of the slowest (group 'test')"),
        "{plan}"
    );
    assert!(!unaligned_graph.to_string().contains("watermark alignment"));

    UNALIGNED_PROBE.reset();
    assert_rows(&run(UNALIGNED_PROGRAM, 1), expected.clone(), "unaligned");
    let unaligned_lead = UNALIGNED_PROBE.lead_max.load(Ordering::SeqCst);
    ALIGNED_PROBE.reset();
    assert_rows(&run(ALIGNED_PROGRAM, 1), expected, "aligned");
    let aligned_lead = ALIGNED_PROBE.lead_max.load(Ordering::SeqCst);
    assert!(
        unaligned_lead >= UNALIGNED_LEAD_MIN,
        "without alignment the fast source led by only {unaligned_lead} ms: the test cannot tell alignment from its absence"
    );
    assert!(
        aligned_lead <= ALIGNED_LEAD_MAX,
        "with a drift of {ALIGNMENT_DRIFT:?} the fast source led by {aligned_lead} ms"
    );
}
