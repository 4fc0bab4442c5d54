//! strom-state: where state goes when it leaves memory.
//!
//! Keyed state lives in memory in the operators that own it
//! (`strom_core::state`), split by key group. This crate owns what happens
//! to it beyond one run:
//!
//! - [`checkpoint`]: the content of a checkpoint or savepoint. A task
//!   subtask writes one state file for all operators of its chain
//!   ([`write_task_state`]); the coordinator completes the checkpoint by
//!   writing `_metadata` ([`write_metadata`]); restore verifies every byte
//!   and hands out key groups and operator state at any new parallelism
//!   ([`read_checkpoint`]). Its module doc gives the directory layout, the
//!   commit protocol and what restore verifies.
//! - [`file_format`]: the byte layouts of state and metadata files
//!   (magic, version, CRC-32 per block) and the atomic write (temporary
//!   name, fsync, rename, directory fsync).
//! - [`storage`]: the `chk-<id>` directories of a job run, retention, and
//!   savepoint directories.
//! - [`inspect`](mod@inspect): a report of a snapshot's contents and of every problem
//!   in it, for the `strom` tool.
//! - [`redistribution`]: which key groups each subtask takes over when a
//!   job is restored at another parallelism.
//!
//! All errors are one [`StateError`], which names the file and the problem.
//! The crate depends on strom-core (key groups), rkyv (the metadata body) and
//! crc32fast, and never on strom-net: only strom-scheduler wires state and
//! transport together. It does blocking file I/O; callers run it off the
//! record-processing path.
#![forbid(unsafe_code)]

pub mod checkpoint;
pub mod error;
pub mod file_format;
pub mod inspect;
pub mod redistribution;
pub mod storage;

pub use checkpoint::{
    read_checkpoint, write_metadata, write_task_state, BlockRef, CheckpointMetadata,
    OperatorStateHandle, OperatorSubtaskState, RestoredCheckpoint, RestoredOperator,
    RestoredSubtask, SnapshotKind, TaskStateHandle, METADATA_FILE_NAME,
};
pub use error::StateError;
pub use inspect::{inspect, InspectReport, InspectedOperator, InspectedSubtask};
pub use storage::{create_savepoint_dir, latest_completed_checkpoint, CheckpointStorage};

#[cfg(test)]
mod test_support;
