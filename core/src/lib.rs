//! strom-core: what a Strom job is, independent of where it runs.
//!
//! This crate owns records and their rkyv encoding, keys and key groups, event
//! time and watermarks, the DataStream API (sources, transformations, keyed
//! process functions, windows, joins, sinks), the operators behind it, keyed
//! state in memory, and the JobGraph with its chaining rules and validation.
//!
//! It depends only on rkyv (record encoding) and clap (job program arguments),
//! and does no I/O: the runtime in `strom-scheduler` feeds a task's head with
//! buffers and watermarks and drains what the task's writers queue, so every
//! operator here can be driven by a plain test.
#![forbid(unsafe_code)]

pub mod accumulator;
pub mod config;
pub mod error;
pub mod function;
pub mod graph;
pub mod key;
pub mod operator;
pub mod program;
pub mod record;
pub mod snapshot;
pub mod source;
pub mod state;
pub mod stream;
pub mod time;
pub mod window;

pub use accumulator::Accumulators;
pub use error::{GraphError, TaskError};
pub use function::{Collector, KeyedCoProcessFunction, KeyedContext, KeyedProcessFunction};
pub use graph::{JobGraph, Partitioning};
pub use key::{Key, KeyHash, KeyHasher};
pub use program::{JobArgs, Program};
pub use record::Record;
pub use source::{Source, SourceOutput, SourceReader, SourceStatus};
pub use state::{ListState, MapState, ReducingState, ValueState};
pub use stream::{DataStream, KeySelector, KeyedStream, StreamExecutionEnvironment};
pub use time::{Timestamp, WatermarkStrategy};
pub use window::{AggregateFunction, TimeWindow, WindowAssigner, WindowPartial};
