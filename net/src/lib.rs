//! strom-net: moving bytes between tasks.
//!
//! Between slots of one process, records travel over bounded
//! single-producer single-consumer channels between glommio executors
//! ([`channel`]), one per (producer subtask, consumer subtask) pair, each
//! element an rkyv buffer of records or an in-band event. The bound is what
//! gives backpressure: a producer whose consumer is behind waits.
//!
//! Depends on strom-core (the element type) and glommio (the executor-aware
//! channels). Frames between machines (header, length, crc32, validated
//! payload) and credit-based flow control come with the standalone cluster.
#![forbid(unsafe_code)]

pub mod channel;
