//! The Nexmark workload, exactly as `shared/bench/NEXMARK.md` specifies it.
//!
//! - [`generator`] makes event `i` of a `(seed, N)` run from `i` alone, so any
//!   source subtask can make its share of the events without coordination.
//! - [`model`] holds the events and one row type per query, compact enough to
//!   ship between cores and processes, rendered to the spec's strings on demand.
//! - [`answer`] prints rows exactly as the spec does and sums their FNV-1a-64
//!   hashes, which makes an answer independent of row order and parallelism.
//! - [`baseline`] computes every query with a plain single-threaded loop: the
//!   yardstick for both correctness and speed.
//! - [`answers_file`] reads the reference answers in `shared/bench/answers.txt`.

pub mod answer;
pub mod answers_file;
pub mod baseline;
pub mod generator;
pub mod model;

pub use answer::{fnv1a64, Answer, AnswerRow, Fnv1a64Writer, ParseQueryError, Query};
pub use answers_file::{
    parse_reference_answers, reference_answers, ReferenceCase, REFERENCE_ANSWERS_PATH,
};
pub use baseline::run_baseline;
pub use generator::{
    splitmix64, subtask_indices, BidFields, EventKinds, Generator, GeneratorConfig, BASE_TIME_MS,
    EVENTS_PER_MILLISECOND,
};
pub use model::{Auction, Bid, Event, Person, Q1Row, Q2Row, Q3Row, Q5Row, Q7Row, Q8Row};
