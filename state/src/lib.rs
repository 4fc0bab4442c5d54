//! strom-state: where keyed state goes when it leaves memory.
//!
//! Keyed state lives in memory in the operators that own it
//! (`strom_core::state`), split by key group. This crate owns what happens
//! to it beyond one run: which key groups each subtask takes over when a job
//! is restored at another parallelism ([`redistribution`]), and, with the
//! checkpoint issue, snapshot files, the checkpoint storage layout and
//! restore. It depends on strom-core (keys and key groups) and never on
//! strom-net: only strom-scheduler wires state and transport together.
#![forbid(unsafe_code)]

pub mod redistribution;
