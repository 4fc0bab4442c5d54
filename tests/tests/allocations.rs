//! No allocation per record on the data path in steady state: a counting
//! global allocator watches q1 at parallelism 2 with its bids crossing
//! slots (a rebalance between two slots of one TaskManager) and crossing
//! TaskManagers (two TaskManagers whose channels go over TCP), and the
//! allocations a run adds per extra record stay far below one.
//!
//! Method: the same job runs twice, on a small and on a large number of
//! events; whatever is allocated once (deployment, buffers that are then
//! reused, per-run setup) cancels out in the difference, and what is left
//! is what the extra records cost. A buffer of up to 1024 records costs a
//! few allocations (its archive, which the consumer frees; across
//! TaskManagers also the frame it arrives in and glommio's state for each
//! socket operation), so the bound is allocations per buffer, far below
//! one per record: about 0.003 per record across slots and 0.012 across
//! TaskManagers when this was written.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

use strom_bench::nexmark::{Bid, Event, GeneratorConfig, Q1Row};
use strom_bench::queries::{AnswerSink, NexmarkSource};
use strom_core::program::report_accumulators;
use strom_core::{Collector, JobArgs, Program, StreamExecutionEnvironment};
use strom_scheduler::{LocalCluster, LocalClusterConfig};

/// Counts every allocation of the process (all threads).
struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers to the system allocator; only counts.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `dealloc`'s contract.
        unsafe { System.dealloc(pointer, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller upholds `realloc`'s contract.
        unsafe { System.realloc(pointer, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// q1 with its bids rebalanced: every record crosses from a source slot
/// to a map slot.
fn build_q1_across(
    env: &StreamExecutionEnvironment,
    matches: &clap::ArgMatches,
) -> Result<(), String> {
    let events = *matches.get_one::<u64>("events").expect("a default");
    env.from_source(
        NexmarkSource::new(GeneratorConfig { events, seed: 42 }),
        strom_core::WatermarkStrategy::for_monotonous_timestamps(),
        "Source: nexmark",
    )
    .flat_map(|event, out: &mut dyn Collector<Bid>| {
        if let Event::Bid(bid) = event {
            out.collect(bid);
        }
    })
    .name("bids")
    .rebalance()
    .map(|bid| Q1Row::from_bid(&bid))
    .name("q1 euro")
    .add_sink(AnswerSink::default())
    .name("answer sink q1");
    Ok(())
}

const Q1_ACROSS: Program = Program {
    name: "q1-across",
    about: "q1 with its bids rebalanced across slots",
    command: || {
        clap::Command::new("q1-across").arg(
            clap::Arg::new("events")
                .long("events")
                .default_value("100000")
                .value_parser(clap::value_parser!(u64)),
        )
    },
    build: build_q1_across,
    report: report_accumulators,
};

/// Allocations of one run of q1-across on `events` events, and the rows it
/// answered.
fn allocations_of_a_run(cluster: &LocalCluster, events: u64) -> (u64, u64) {
    let args = JobArgs::new(vec!["--events".to_string(), events.to_string()], 2);
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let result = cluster.execute("q1-across", args).expect("the job runs");
    let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
    let rows = result.accumulators.get("rows").unwrap_or_default();
    (allocations, rows)
}

/// Runs small and large, twice each (the first run of a cluster warms its
/// pools), and checks the allocations per extra record.
fn assert_no_allocation_per_record(config: LocalClusterConfig, placement: &str) {
    let cluster = LocalCluster::start(vec![Q1_ACROSS], config).expect("a local cluster");
    const SMALL: u64 = 200_000;
    const LARGE: u64 = 2_200_000;
    let _ = allocations_of_a_run(&cluster, SMALL);
    let (small, small_rows) = allocations_of_a_run(&cluster, SMALL);
    let (large, large_rows) = allocations_of_a_run(&cluster, LARGE);
    cluster.shutdown();
    let extra_records = large_rows - small_rows;
    assert!(extra_records > 1_000_000, "{large_rows} - {small_rows}");
    let per_record = large.saturating_sub(small) as f64 / extra_records as f64;
    eprintln!(
        "{placement}: {small} allocations for {small_rows} rows, {large} for {large_rows}: {per_record:.5} per extra record"
    );
    // One allocation per record would be 1 or more; a handful per buffer of
    // 1024 records is well below this bound.
    assert!(
        per_record < 0.02,
        "{placement}: {per_record:.4} allocations per record ({small} for {small_rows} rows, {large} for {large_rows})"
    );
}

#[test]
fn q1_at_parallelism_2_allocates_nothing_per_record_across_slots_and_task_managers() {
    assert_no_allocation_per_record(LocalClusterConfig::slots(2), "across slots");
    assert_no_allocation_per_record(
        LocalClusterConfig {
            slot_count: 1,
            task_manager_count: 2,
            busy_poll: None,
        },
        "across TaskManagers",
    );
}
