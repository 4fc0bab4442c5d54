//! strom-tests: end-to-end tests of Strom through its command line and its
//! runtime. The tests live in `tests/`; this library holds the job programs
//! they run (see [`programs`]) and helpers to run the command line.
#![forbid(unsafe_code)]

pub mod cli;
pub mod programs;
pub mod sequence;
pub mod support;
