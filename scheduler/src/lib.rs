//! strom-scheduler: the runtime.
//!
//! - [`jobmanager`]: the JobManager (Dispatcher, ResourceManager and a
//!   JobMaster per job): takes job submissions, checks them, asks for slots,
//!   deploys subtasks, and turns task reports into the job's result.
//! - [`taskmanager`]: the TaskManager: its slots are glommio executors
//!   pinned one per core; it deploys subtasks into them and wires their
//!   channels.
//! - [`task`]: the task loop that drives a subtask's operators, barrier
//!   alignment and the snapshot's asynchronous phase.
//! - [`coordinator`]: the checkpoint coordinator of a JobMaster;
//!   [`restart`]: restart strategies. Both plain structs without I/O.
//! - [`cluster`]: the standalone cluster's control plane: the
//!   JobManager's control port and the TaskManager process.
//! - [`local`]: the local mini-cluster, a JobManager and a TaskManager in one
//!   process, as Flink's MiniCluster.
//!
//! JobManager and TaskManager only talk through the messages of
//! [`messages`], so that the standalone cluster changes the transport, not
//! the protocol. Depends on strom-core (jobs), strom-net (channels) and
//! strom-state (checkpoint files), and is the one crate that wires them.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod coordinator;
pub mod file_sink;
pub mod jobmanager;
pub mod local;
pub mod messages;
pub mod network;
pub mod rest;
pub mod restart;
pub mod task;
pub mod taskmanager;
#[cfg(test)]
mod test_programs;
mod wake;

pub use local::{JobManagerHandle, LocalCluster, LocalClusterConfig};
pub use messages::{JobEvent, JobId, JobResult};
