//! strom-net: moving bytes between tasks.
//!
//! Between slots of one process, records travel over bounded
//! single-producer single-consumer channels between glommio executors
//! ([`channel`]), one per (producer subtask, consumer subtask) pair, each
//! element an rkyv buffer of records or an in-band event. The bound is what
//! gives backpressure: a producer whose consumer is behind waits.
//!
//! Between processes, the same elements travel as frames over TCP through
//! io_uring:
//!
//! - [`frame`]: the wire frame (a fixed header with magic, version, kind,
//!   channel, length and crc32, then the payload), its encoding of stream
//!   elements, and an incremental decoder that bounds lengths before it
//!   allocates and checks every byte before it hands anything over.
//! - [`credit`]: credit-based flow control as plain structs without I/O:
//!   a sender sends on a channel only into buffers its receiver granted, so
//!   one slow channel never blocks the others on a shared connection.
//! - [`link`]: one TCP connection between two processes carrying many
//!   channels: the handshake (peer id, shared-secret proof), a reader and a
//!   writer task on glommio sockets, and per-channel senders and receivers.
//! - [`control`]: the control plane between the JobManager and its
//!   TaskManagers (register, heartbeats, deploy, checkpoint and task
//!   reports, shutdown): rkyv messages in checksummed frames with their own
//!   magic over a blocking TCP stream, after the same kind of HMAC handshake.
//! - [`error`]: [`NetError`], the crate's one error type.
//! - [`watchdog`]: signals an executor that sleeps through its own timer
//!   (a wake-up lost in `io_uring_enter` under heavy load).
//!
//! Depends on strom-core (the element type), crossbeam-queue,
//! crossbeam-utils and atomic-waker (the rings between slots and their wake-ups), glommio
//! (io_uring sockets), nix and signal-hook (the watchdog's signal), crc32fast (frame checksums), rkyv (aligned record
//! buffers) and hmac/sha2/getrandom (the handshake proof). It never
//! depends on strom-state; strom-scheduler wires the two together.
#![forbid(unsafe_code)]

pub mod channel;
pub mod control;
pub mod credit;
pub mod error;
pub mod frame;
pub mod link;
mod proof;
pub mod watchdog;

pub use error::NetError;
