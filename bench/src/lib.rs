//! Benchmarks and correctness workloads for Strom.
//!
//! This crate holds the Nexmark workload as `NEXMARK.md` (in `shared/bench/`)
//! pins it down: the deterministic event generator, the event and result row
//! types, the order-independent answer checksum, and hand-written
//! single-threaded baselines that compute every query's answer without the
//! engine. It also hosts the Nexmark queries written as Strom job programs and
//! the harnesses that run them, so that throughput and latency figures are
//! always printed next to a baseline run over the same events.
//!
//! It depends on `strom-core` and `strom-scheduler` to build and run jobs;
//! nothing in the engine depends on it, so benchmark code never leaks into
//! the runtime.

#![forbid(unsafe_code)]

pub mod latency;
pub mod nexmark;
pub mod queries;
