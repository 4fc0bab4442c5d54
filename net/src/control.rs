//! The control plane: messages between the JobManager and its TaskManagers.
//!
//! A standalone cluster is one `strom jobmanager` process and any number of
//! `strom taskmanager --jobmanager HOST:PORT --slots N` processes. Each
//! TaskManager holds one control connection to the JobManager's control
//! port: a blocking [`std::net::TcpStream`] served by a plain thread on each
//! side (the data plane, [`crate::link`], runs on glommio; the control plane
//! carries a few messages a second and needs no executor).
//!
//! # Protocol
//!
//! `T` is a TaskManager, `J` the JobManager.
//!
//! 1. Connect: `T` opens a TCP connection to `J`'s control port within
//!    [`CONTROL_CONNECT_TIMEOUT`] ([`ControlConnection::connect`]); `J`
//!    hands each accepted stream to [`ControlConnection::accept`].
//! 2. Handshake (at most [`CONTROL_HANDSHAKE_TIMEOUT`]), as [`crate::link`]'s
//!    but with its own role labels, so a proof made for one plane is worth
//!    nothing on the other:
//!    1. `J` sends `Hello { nonce: nJ }` without a proof.
//!    2. `T` sends `Hello { nonce: nT, proof }`, where, if `T` has a cluster
//!       secret, `proof = HMAC-SHA256(secret, "strom-control-v1 connector" |
//!       nJ | nT)`.
//!    3. `J` checks it: a proof that is missing (`J` has a secret), wrong,
//!       or present while `J` has no secret makes `J` send
//!       `Close { reason }`, close the connection and return an error
//!       naming `T`'s address; `T` returns [`NetError::Rejected`] with that
//!       reason. Otherwise `J` sends `Hello { nonce: nJ, proof }` with, if it
//!       has a secret, `proof = HMAC-SHA256(secret, "strom-control-v1
//!       acceptor" | nT | nJ)`.
//!    4. `T` checks `J`'s proof the same way (so a TaskManager never takes
//!       work from an impostor) and, if it is out of place, sends
//!       `Close { reason }` and returns the error. With no secret on either
//!       side no proof travels and none is checked.
//! 3. Register: `T` draws a random nonzero `task_manager_id` when it starts
//!    (a restarted TaskManager is a new one, as in Flink) and sends
//!    `Register { task_manager_id, slot_count, data_address }`, the address
//!    of its data-plane listener. `J` answers `Registered` with the same id,
//!    or refuses (an id already registered, no slots) with `Close { reason }`.
//!    Nothing else is sent before `Registered`.
//! 4. Heartbeats: `T` sends `Heartbeat` every [`HEARTBEAT_INTERVAL`]; `J`
//!    answers each with `Heartbeat`. Each side counts any message as a sign
//!    of life ([`Liveness`]); a side that hears nothing for
//!    [`HEARTBEAT_TIMEOUT`] declares the other lost and closes the
//!    connection: `J` fails the attempts that had subtasks on the lost
//!    TaskManager and forgets its slots; `T` cancels every subtask it runs
//!    and registers again. A closed connection is a loss at once, without
//!    waiting for the timeout.
//! 5. Deploy: for each attempt of a job, `J` sends `DeployJob` to every
//!    TaskManager that holds one of its subtasks, with the slot of every
//!    subtask of every vertex (which TaskManager, its data address, which
//!    slot). Each TaskManager rebuilds the JobGraph from the program name and
//!    its raw arguments, runs the subtasks placed on its own id, and opens
//!    data links to the other TaskManagers named in the placement.
//! 6. Reports: while the attempt runs, `J` sends `TriggerCheckpoint` (the
//!    TaskManager injects the barrier at its source subtasks of the attempt),
//!    `CheckpointComplete` and `CancelJob`; `T` reports `TaskFinished`,
//!    `TaskFailed`, `AcknowledgeCheckpoint` and `DeclineCheckpoint` per
//!    subtask. Every report names its job and attempt; `J` ignores reports
//!    of an attempt that is no longer current. Each second `T` also sends
//!    `TaskMetrics` per job (records in and out and the watermark of each
//!    of its subtasks) and `NetworkMetrics` (what its data plane moved),
//!    just before its `Heartbeat`; and it sends a job's `TaskMetrics`
//!    before each `TaskFinished`, so the finished job's counts are final.
//! 7. Shutdown: `J` sends `Shutdown`; `T` cancels what runs, closes the
//!    connection and exits. Either side may instead send `Close { reason }`
//!    ([`ControlConnection::close`]), which the other side's next receive
//!    returns as [`NetError::Rejected`].
//!
//! Invariants: messages of one direction arrive in the order they were sent
//! (one TCP stream). Nothing a peer sends is acted on before it is checked:
//! the header (magic, version, kind, reserved field, length within
//! [`CONTROL_PAYLOAD_MAX`]) before any payload memory is allocated, the
//! crc32 once the payload is in, the rkyv archive with its validator, and
//! every string and list against its named bound ([`ADDRESS_LENGTH_MAX`]
//! and the rest). Anything out of place is an error naming the peer, never
//! a panic; the framing is then lost and the caller drops the connection.
//!
//! # Byte layout
//!
//! Frames have the data plane's header shape ([`crate::frame`]) with their
//! own magic: a data-plane peer on the control port (or the reverse) fails
//! at the first header with an error saying so, instead of a confusing
//! kind or payload error, and the two protocols version independently.
//! All integers are little-endian and fixed width.
//!
//! ```text
//! offset  size  field
//!      0     4  magic     u32  CONTROL_MAGIC, the bytes "STRC"
//!      4     2  version   u16  CONTROL_VERSION
//!      6     2  kind      u16  ControlFrameKind: 1 Hello, 2 ToJobManager,
//!                              3 ToTaskManager, 4 Close
//!      8     4  reserved  u32  0
//!     12     4  length    u32  payload bytes that follow, <= CONTROL_PAYLOAD_MAX
//!     16     4  crc32     u32  crc32 (IEEE) of the payload bytes
//!     20     -  payload   `length` bytes
//! ```
//!
//! Payloads by kind:
//!
//! ```text
//! Hello          0  nonce [u8; 16] | 16  has_proof u8 (0 or 1)
//!                | 17  proof [u8; 32] if has_proof            (17 or 49 bytes)
//! ToJobManager   an rkyv 0.8 archive of a ToJobManagerWire
//! ToTaskManager  an rkyv 0.8 archive of a ToTaskManagerWire
//! Close          reason, UTF-8, <= CLOSE_REASON_LENGTH_MAX bytes
//! ```
//!
//! The kind names the direction, so a message sent the wrong way is refused
//! by its kind before its archive is looked at. The archives use rkyv's
//! default format (little-endian, 32-bit relative pointers); every process
//! of a cluster runs the same binary, and [`CONTROL_VERSION`] changes
//! whenever a message changes.

use std::io::{self, Read, Write};
use std::marker::PhantomData;
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::error::NetError;
use crate::frame::{
    BARRIER_PATH_LENGTH_MAX, CLOSE_REASON_LENGTH_MAX, HELLO_NONCE_SIZE, HELLO_PROOF_SIZE,
};
use crate::proof;

/// The first four bytes of every control frame: "STRC".
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"STRC");
/// The control protocol version this process speaks; peers must speak the
/// same.
pub const CONTROL_VERSION: u16 = 2;
/// Bytes in a control frame header.
pub const CONTROL_HEADER_SIZE: usize = 20;
/// The largest control payload. Bounds the memory one frame of a peer can
/// make this process allocate; the largest messages are a deployment of a
/// wide job and a checkpoint acknowledgement with its state handle.
pub const CONTROL_PAYLOAD_MAX: u32 = 16 * 1024 * 1024;

/// The longest [`ControlConnection::connect`] waits for the TCP connection
/// by default (the TaskManager's command line passes it).
pub const CONTROL_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a handshake may take before the connection is dropped.
pub const CONTROL_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a send may wait for a peer that does not read, so that a
/// stuck TaskManager never stalls the JobManager's thread for longer.
pub const CONTROL_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a TaskManager sends `Heartbeat` (the default).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a side hears nothing from the other before it declares it lost
/// (the default): five missed heartbeats, so a busy moment does not cost a
/// restart, while a TaskManager that hangs is found in seconds. (Heartbeats
/// are sent and answered by the connection's own threads, never held up by
/// a deployment or a checkpoint; a TaskManager that dies closes its
/// connection and is lost at once.)
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest `host:port` address, in bytes.
pub const ADDRESS_LENGTH_MAX: usize = 255;
/// The longest program name, in bytes.
pub const PROGRAM_NAME_LENGTH_MAX: usize = 255;
/// The most raw arguments a deployment carries.
pub const ARGUMENT_COUNT_MAX: usize = 1024;
/// The longest raw argument, in bytes.
pub const ARGUMENT_LENGTH_MAX: usize = 4096;
/// The most vertices a deployment places.
pub const VERTEX_COUNT_MAX: usize = 1024;
/// The most subtasks a deployment places, over all vertices.
pub const SLOT_ASSIGNMENT_COUNT_MAX: usize = 65536;
/// The longest path (checkpoint target, restore path, committable), in
/// bytes: the same bound as a barrier's target on the data plane.
pub const PATH_LENGTH_MAX: usize = BARRIER_PATH_LENGTH_MAX;
/// The most accumulators one finished subtask reports.
pub const ACCUMULATOR_COUNT_MAX: usize = 4096;
/// The longest accumulator name, in bytes.
pub const ACCUMULATOR_NAME_LENGTH_MAX: usize = 255;
/// The most committables (staged sink files) one finished subtask reports.
pub const COMMITTABLE_COUNT_MAX: usize = 1024;
/// The longest error or decline reason, in bytes; [`cut_to_length`] makes
/// a longer text fit.
pub const REASON_LENGTH_MAX: usize = 64 * 1024;
/// The largest opaque state handle one acknowledgement carries, in bytes.
pub const STATE_HANDLE_SIZE_MAX: usize = 8 * 1024 * 1024;

const HELLO_PAYLOAD_SIZE_WITHOUT_PROOF: usize = HELLO_NONCE_SIZE + 1;
const HELLO_PAYLOAD_SIZE_WITH_PROOF: usize = HELLO_PAYLOAD_SIZE_WITHOUT_PROOF + HELLO_PROOF_SIZE;

const PROOF_ROLE_CONNECTOR: &[u8] = b"strom-control-v1 connector";
const PROOF_ROLE_ACCEPTOR: &[u8] = b"strom-control-v1 acceptor";

const _: () = assert!(CONTROL_HEADER_SIZE == 4 + 2 + 2 + 4 + 4 + 4);
const _: () = assert!(CONTROL_MAGIC != crate::frame::FRAME_MAGIC);
const _: () = assert!(STATE_HANDLE_SIZE_MAX < CONTROL_PAYLOAD_MAX as usize);
const _: () = assert!(REASON_LENGTH_MAX < CONTROL_PAYLOAD_MAX as usize);
const _: () = assert!(HEARTBEAT_INTERVAL.as_nanos() < HEARTBEAT_TIMEOUT.as_nanos());

/// Where one subtask runs: which TaskManager (and how to reach its data
/// plane) and which of its slots.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct SlotAddress {
    pub task_manager_id: u64,
    /// `host:port` of the TaskManager's data-plane listener.
    pub data_address: String,
    pub slot: u32,
}

/// What one subtask counted (see [`ToJobManagerWire::TaskMetrics`]).
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct SubtaskMetricsWire {
    pub vertex: u32,
    pub subtask: u32,
    pub records_in: u64,
    pub records_out: u64,
    /// Milliseconds; `i64::MIN` before the first watermark.
    pub watermark: i64,
}

/// A message from a TaskManager to the JobManager.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ToJobManagerWire {
    /// The first message after the handshake.
    Register {
        task_manager_id: u64,
        slot_count: u32,
        /// `host:port` of the TaskManager's data-plane listener.
        data_address: String,
    },
    Heartbeat {
        task_manager_id: u64,
    },
    TaskFinished {
        job: u128,
        attempt: u32,
        vertex: u32,
        subtask: u32,
        /// Accumulator name and value.
        accumulators: Vec<(String, u64)>,
        /// Files the subtask's sinks staged, to commit when the job has
        /// finished: (from, to) paths.
        committables: Vec<(String, String)>,
    },
    TaskFailed {
        job: u128,
        attempt: u32,
        vertex: u32,
        subtask: u32,
        error: String,
    },
    AcknowledgeCheckpoint {
        job: u128,
        attempt: u32,
        vertex: u32,
        subtask: u32,
        checkpoint_id: u64,
        /// Opaque here: strom-state's task state handle, archived by the
        /// scheduler (strom-net does not depend on strom-state).
        state_handle: Vec<u8>,
        /// How long the task's stream stood still for the snapshot.
        pause_us: u64,
        /// How long it held back inputs while aligning the barrier.
        alignment_us: u64,
    },
    DeclineCheckpoint {
        job: u128,
        attempt: u32,
        checkpoint_id: u64,
        reason: String,
    },
    /// What the subtasks of one attempt counted, about once a second.
    TaskMetrics {
        job: u128,
        attempt: u32,
        tasks: Vec<SubtaskMetricsWire>,
    },
    /// What the TaskManager's data plane moved so far, about once a second.
    NetworkMetrics {
        elements_sent: u64,
        bytes_sent: u64,
        elements_received: u64,
        bytes_received: u64,
    },
}

/// A message from the JobManager to a TaskManager.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum ToTaskManagerWire {
    /// The registration is accepted, under this id.
    Registered { task_manager_id: u64 },
    /// The answer to a TaskManager's heartbeat: the JobManager is alive.
    Heartbeat,
    /// Runs the subtasks of one attempt placed on this TaskManager.
    DeployJob {
        job: u128,
        attempt: u32,
        program: String,
        /// The program's raw arguments (with the job options); every
        /// process parses them itself and builds the same JobGraph.
        arguments: Vec<String>,
        /// `slots[vertex][subtask]`: where each subtask runs.
        slots: Vec<Vec<SlotAddress>>,
        /// The checkpoint or savepoint the operators start from.
        restore: Option<String>,
    },
    /// Injects barrier `checkpoint_id` at this TaskManager's source subtasks
    /// of the attempt.
    TriggerCheckpoint {
        job: u128,
        attempt: u32,
        checkpoint_id: u64,
        timestamp_ms: u64,
        /// The checkpoint's directory.
        target: String,
        is_savepoint: bool,
    },
    /// Every task's state of the checkpoint is durable.
    CheckpointComplete {
        job: u128,
        attempt: u32,
        checkpoint_id: u64,
    },
    /// Cancels every subtask of the job on this TaskManager.
    CancelJob { job: u128 },
    /// Cancel everything, close the connection and exit.
    Shutdown,
}

/// The kind field of a control frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum ControlFrameKind {
    /// Handshake: a nonce and, with a cluster secret, a proof.
    Hello = 1,
    /// An archived [`ToJobManagerWire`].
    ToJobManager = 2,
    /// An archived [`ToTaskManagerWire`].
    ToTaskManager = 3,
    /// The sender closes the connection, with a reason.
    Close = 4,
}

impl ControlFrameKind {
    /// The kind with wire value `value`.
    pub fn from_u16(value: u16) -> Result<ControlFrameKind, NetError> {
        match value {
            1 => Ok(ControlFrameKind::Hello),
            2 => Ok(ControlFrameKind::ToJobManager),
            3 => Ok(ControlFrameKind::ToTaskManager),
            4 => Ok(ControlFrameKind::Close),
            kind => Err(malformed(format!("unknown control frame kind {kind}"))),
        }
    }
}

/// A message of one direction of the control protocol. Sealed: the two
/// wire enums are the only ones.
pub trait ControlMessage: Sized + sealed::Sealed {
    /// The frame kind that carries this message.
    const KIND: ControlFrameKind;

    /// Checks every string and list against its bound.
    fn check_bounds(&self) -> Result<(), NetError>;

    /// The rkyv archive of the message (bounds not checked).
    fn archive(&self) -> Result<AlignedVec, NetError>;

    /// Validates and decodes an archive (bounds not checked).
    fn unarchive(bytes: &[u8]) -> Result<Self, NetError>;
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::ToJobManagerWire {}
    impl Sealed for super::ToTaskManagerWire {}
}

impl ControlMessage for ToJobManagerWire {
    const KIND: ControlFrameKind = ControlFrameKind::ToJobManager;

    fn check_bounds(&self) -> Result<(), NetError> {
        match self {
            ToJobManagerWire::Register { data_address, .. } => check_length(
                "Register data_address",
                data_address.len(),
                ADDRESS_LENGTH_MAX,
            ),
            ToJobManagerWire::Heartbeat { .. } => Ok(()),
            ToJobManagerWire::TaskFinished {
                accumulators,
                committables,
                ..
            } => {
                check_length(
                    "TaskFinished accumulators",
                    accumulators.len(),
                    ACCUMULATOR_COUNT_MAX,
                )?;
                for (name, _) in accumulators {
                    check_length(
                        "TaskFinished accumulator name",
                        name.len(),
                        ACCUMULATOR_NAME_LENGTH_MAX,
                    )?;
                }
                check_length(
                    "TaskFinished committables",
                    committables.len(),
                    COMMITTABLE_COUNT_MAX,
                )?;
                for (from, to) in committables {
                    check_length("TaskFinished committable path", from.len(), PATH_LENGTH_MAX)?;
                    check_length("TaskFinished committable path", to.len(), PATH_LENGTH_MAX)?;
                }
                Ok(())
            }
            ToJobManagerWire::TaskFailed { error, .. } => {
                check_length("TaskFailed error", error.len(), REASON_LENGTH_MAX)
            }
            ToJobManagerWire::AcknowledgeCheckpoint { state_handle, .. } => check_length(
                "AcknowledgeCheckpoint state_handle",
                state_handle.len(),
                STATE_HANDLE_SIZE_MAX,
            ),
            ToJobManagerWire::DeclineCheckpoint { reason, .. } => {
                check_length("DeclineCheckpoint reason", reason.len(), REASON_LENGTH_MAX)
            }
            ToJobManagerWire::TaskMetrics { tasks, .. } => {
                check_length("TaskMetrics tasks", tasks.len(), SLOT_ASSIGNMENT_COUNT_MAX)
            }
            ToJobManagerWire::NetworkMetrics { .. } => Ok(()),
        }
    }

    fn archive(&self) -> Result<AlignedVec, NetError> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .map_err(|error| malformed(format!("cannot archive a ToJobManager message: {error}")))
    }

    fn unarchive(bytes: &[u8]) -> Result<Self, NetError> {
        rkyv::from_bytes::<ToJobManagerWire, rkyv::rancor::Error>(bytes)
            .map_err(|error| malformed(format!("ToJobManager payload does not validate: {error}")))
    }
}

impl ControlMessage for ToTaskManagerWire {
    const KIND: ControlFrameKind = ControlFrameKind::ToTaskManager;

    fn check_bounds(&self) -> Result<(), NetError> {
        match self {
            ToTaskManagerWire::Registered { .. }
            | ToTaskManagerWire::Heartbeat
            | ToTaskManagerWire::CheckpointComplete { .. }
            | ToTaskManagerWire::CancelJob { .. }
            | ToTaskManagerWire::Shutdown => Ok(()),
            ToTaskManagerWire::DeployJob {
                program,
                arguments,
                slots,
                restore,
                ..
            } => {
                check_length("DeployJob program", program.len(), PROGRAM_NAME_LENGTH_MAX)?;
                check_length("DeployJob arguments", arguments.len(), ARGUMENT_COUNT_MAX)?;
                for argument in arguments {
                    check_length("DeployJob argument", argument.len(), ARGUMENT_LENGTH_MAX)?;
                }
                check_length("DeployJob slots (vertices)", slots.len(), VERTEX_COUNT_MAX)?;
                let assignment_count: usize = slots.iter().map(Vec::len).sum();
                check_length(
                    "DeployJob slots (subtasks of all vertices)",
                    assignment_count,
                    SLOT_ASSIGNMENT_COUNT_MAX,
                )?;
                for address in slots.iter().flatten() {
                    check_length(
                        "DeployJob slot data_address",
                        address.data_address.len(),
                        ADDRESS_LENGTH_MAX,
                    )?;
                }
                if let Some(restore) = restore {
                    check_length("DeployJob restore", restore.len(), PATH_LENGTH_MAX)?;
                }
                Ok(())
            }
            ToTaskManagerWire::TriggerCheckpoint { target, .. } => {
                check_length("TriggerCheckpoint target", target.len(), PATH_LENGTH_MAX)
            }
        }
    }

    fn archive(&self) -> Result<AlignedVec, NetError> {
        rkyv::to_bytes::<rkyv::rancor::Error>(self)
            .map_err(|error| malformed(format!("cannot archive a ToTaskManager message: {error}")))
    }

    fn unarchive(bytes: &[u8]) -> Result<Self, NetError> {
        rkyv::from_bytes::<ToTaskManagerWire, rkyv::rancor::Error>(bytes)
            .map_err(|error| malformed(format!("ToTaskManager payload does not validate: {error}")))
    }
}

fn check_length(field: &'static str, length: usize, length_max: usize) -> Result<(), NetError> {
    if length > length_max {
        return Err(NetError::FieldOutOfBounds {
            field,
            length: length as u64,
            length_max: length_max as u64,
        });
    }
    Ok(())
}

fn malformed(reason: String) -> NetError {
    NetError::MalformedControlFrame { reason }
}

/// `text` cut to at most `length_max` bytes at a character boundary, for
/// free text (an error, a reason) that must fit its bound.
pub fn cut_to_length(text: &str, length_max: usize) -> &str {
    let mut end = text.len().min(length_max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A decoded and checked control frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ControlHeader {
    kind: ControlFrameKind,
    length: u32,
    checksum: u32,
}

impl ControlHeader {
    fn encode(&self) -> [u8; CONTROL_HEADER_SIZE] {
        let mut bytes = [0; CONTROL_HEADER_SIZE];
        bytes[0..4].copy_from_slice(&CONTROL_MAGIC.to_le_bytes());
        bytes[4..6].copy_from_slice(&CONTROL_VERSION.to_le_bytes());
        bytes[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        // 8..12: reserved, zero.
        bytes[12..16].copy_from_slice(&self.length.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.checksum.to_le_bytes());
        bytes
    }

    /// Checks magic, version, kind, reserved field and the length against
    /// [`CONTROL_PAYLOAD_MAX`] and the bounds of the kind.
    fn decode(bytes: &[u8; CONTROL_HEADER_SIZE]) -> Result<ControlHeader, NetError> {
        let word = |at: usize| {
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
        };
        let magic = word(0);
        if magic != CONTROL_MAGIC {
            return Err(NetError::BadControlMagic { found: magic });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != CONTROL_VERSION {
            return Err(NetError::UnsupportedVersion {
                found: version,
                supported: CONTROL_VERSION,
            });
        }
        let kind = ControlFrameKind::from_u16(u16::from_le_bytes([bytes[6], bytes[7]]))?;
        let reserved = word(8);
        if reserved != 0 {
            return Err(malformed(format!(
                "reserved header field is {reserved:#x}, must be 0"
            )));
        }
        let length = word(12);
        if length > CONTROL_PAYLOAD_MAX {
            return Err(NetError::OversizedFrame {
                length: u64::from(length),
                length_max: CONTROL_PAYLOAD_MAX,
            });
        }
        let length_fits = match kind {
            ControlFrameKind::Hello => {
                length as usize == HELLO_PAYLOAD_SIZE_WITHOUT_PROOF
                    || length as usize == HELLO_PAYLOAD_SIZE_WITH_PROOF
            }
            ControlFrameKind::Close => length as usize <= CLOSE_REASON_LENGTH_MAX,
            ControlFrameKind::ToJobManager | ControlFrameKind::ToTaskManager => length > 0,
        };
        if !length_fits {
            return Err(malformed(format!("{kind:?} frame of {length} bytes")));
        }
        Ok(ControlHeader {
            kind,
            length,
            checksum: word(16),
        })
    }
}

/// Appends a frame of `kind` with `payload` to `out`.
fn encode_frame(kind: ControlFrameKind, payload: &[u8], out: &mut Vec<u8>) {
    assert!(
        payload.len() <= CONTROL_PAYLOAD_MAX as usize,
        "control payload length checked by the caller"
    );
    let header = ControlHeader {
        kind,
        length: payload.len() as u32,
        checksum: crc32fast::hash(payload),
    };
    out.reserve(CONTROL_HEADER_SIZE + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
}

/// Appends the frame of `message` to `out`: checks its bounds, archives it
/// and checks the archive fits a frame. On error `out` is left as it was.
pub fn encode_message<M: ControlMessage>(message: &M, out: &mut Vec<u8>) -> Result<(), NetError> {
    message.check_bounds()?;
    let payload = message.archive()?;
    if payload.len() as u64 > u64::from(CONTROL_PAYLOAD_MAX) {
        return Err(NetError::OversizedFrame {
            length: payload.len() as u64,
            length_max: CONTROL_PAYLOAD_MAX,
        });
    }
    encode_frame(M::KIND, &payload, out);
    Ok(())
}

fn encode_close(reason: &str, out: &mut Vec<u8>) {
    encode_frame(
        ControlFrameKind::Close,
        cut_to_length(reason, CLOSE_REASON_LENGTH_MAX).as_bytes(),
        out,
    );
}

/// The handshake message.
#[derive(Clone, Debug, PartialEq, Eq)]
struct ControlHello {
    nonce: [u8; HELLO_NONCE_SIZE],
    proof: Option<[u8; HELLO_PROOF_SIZE]>,
}

fn encode_hello(hello: &ControlHello, out: &mut Vec<u8>) {
    let mut payload = Vec::with_capacity(HELLO_PAYLOAD_SIZE_WITH_PROOF);
    payload.extend_from_slice(&hello.nonce);
    match &hello.proof {
        Some(proof) => {
            payload.push(1);
            payload.extend_from_slice(proof);
        }
        None => payload.push(0),
    }
    encode_frame(ControlFrameKind::Hello, &payload, out);
}

fn decode_hello(payload: &[u8]) -> Result<ControlHello, NetError> {
    // The length is one of the two Hello sizes (checked in the header).
    let mut nonce = [0; HELLO_NONCE_SIZE];
    nonce.copy_from_slice(&payload[..HELLO_NONCE_SIZE]);
    let proof = match (payload[HELLO_NONCE_SIZE], payload.len()) {
        (0, HELLO_PAYLOAD_SIZE_WITHOUT_PROOF) => None,
        (1, HELLO_PAYLOAD_SIZE_WITH_PROOF) => {
            let mut proof = [0; HELLO_PROOF_SIZE];
            proof.copy_from_slice(&payload[HELLO_PAYLOAD_SIZE_WITHOUT_PROOF..]);
            Some(proof)
        }
        (flag, length) => {
            return Err(malformed(format!(
                "Hello proof flag {flag} does not match payload length {length}"
            )))
        }
    };
    Ok(ControlHello { nonce, proof })
}

/// Reads frames from a byte stream, keeping a partial frame across read
/// timeouts. Memory is bounded by one frame, allocated once its header is
/// checked.
#[derive(Debug, Default)]
struct FrameReader {
    header: [u8; CONTROL_HEADER_SIZE],
    header_filled: usize,
    payload: Option<PartialPayload>,
}

#[derive(Debug)]
struct PartialPayload {
    header: ControlHeader,
    bytes: AlignedVec,
    filled: usize,
}

impl FrameReader {
    /// Reads until one frame is complete and its checksum checked. A read
    /// timeout of `source` returns its io error with the partial frame kept,
    /// so that the next call goes on where this one stopped.
    fn read_frame(
        &mut self,
        source: &mut impl Read,
    ) -> Result<(ControlFrameKind, AlignedVec), NetError> {
        while self.payload.is_none() {
            let read = read_some(source, &mut self.header[self.header_filled..])?;
            if read == 0 {
                if self.header_filled == 0 {
                    return Err(NetError::PeerClosed);
                }
                return Err(truncated(self.header_filled, CONTROL_HEADER_SIZE));
            }
            self.header_filled += read;
            if self.header_filled == CONTROL_HEADER_SIZE {
                self.header_filled = 0;
                let header = ControlHeader::decode(&self.header)?;
                let mut bytes = AlignedVec::with_capacity(header.length as usize);
                bytes.resize(header.length as usize, 0);
                self.payload = Some(PartialPayload {
                    header,
                    bytes,
                    filled: 0,
                });
            }
        }
        let partial = self.payload.as_mut().expect("a payload is being read");
        while partial.filled < partial.bytes.len() {
            let read = read_some(source, &mut partial.bytes[partial.filled..])?;
            if read == 0 {
                let (filled, length) = (partial.filled, partial.bytes.len());
                self.payload = None;
                return Err(truncated(
                    CONTROL_HEADER_SIZE + filled,
                    CONTROL_HEADER_SIZE + length,
                ));
            }
            partial.filled += read;
        }
        let PartialPayload { header, bytes, .. } =
            self.payload.take().expect("a payload is being read");
        let computed = crc32fast::hash(&bytes);
        if computed != header.checksum {
            return Err(NetError::ChecksumMismatch {
                channel: 0,
                stored: header.checksum,
                computed,
            });
        }
        Ok((header.kind, bytes))
    }

    /// Whether no part of a frame has been read.
    fn is_between_frames(&self) -> bool {
        self.header_filled == 0 && self.payload.is_none()
    }
}

fn read_some(source: &mut impl Read, buffer: &mut [u8]) -> Result<usize, NetError> {
    loop {
        match source.read(buffer) {
            Ok(read) => return Ok(read),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(NetError::io("receive a control frame", error)),
        }
    }
}

fn truncated(received: usize, expected: usize) -> NetError {
    NetError::io(
        "receive a control frame",
        io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("the stream ended inside a frame, after {received} of its {expected} bytes"),
        ),
    )
}

fn is_timeout(error: &NetError) -> bool {
    matches!(error, NetError::Io { source, .. }
        if matches!(source.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
}

/// Reads the next message of type `M`: a Close frame is the peer's
/// refusal, a Hello or a message of the other direction is out of place.
fn read_message<M: ControlMessage>(
    reader: &mut FrameReader,
    source: &mut impl Read,
) -> Result<M, NetError> {
    let (kind, payload) = reader.read_frame(source)?;
    match kind {
        kind if kind == M::KIND => {
            let message = M::unarchive(&payload)?;
            message.check_bounds()?;
            Ok(message)
        }
        ControlFrameKind::Close => Err(NetError::Rejected {
            reason: close_reason(&payload)?,
        }),
        other => Err(malformed(format!(
            "a {other:?} frame where a {:?} message belongs",
            M::KIND
        ))),
    }
}

fn close_reason(payload: &[u8]) -> Result<String, NetError> {
    String::from_utf8(payload.to_vec())
        .map_err(|_| malformed("Close reason is not UTF-8".to_string()))
}

/// Reads the next frame of a handshake; it must be a Hello.
fn read_hello(reader: &mut FrameReader, source: &mut impl Read) -> Result<ControlHello, NetError> {
    let (kind, payload) = reader.read_frame(source)?;
    match kind {
        ControlFrameKind::Hello => decode_hello(&payload),
        ControlFrameKind::Close => Err(NetError::Rejected {
            reason: close_reason(&payload)?,
        }),
        other => Err(malformed(format!(
            "a {other:?} frame during the handshake, expected Hello"
        ))),
    }
}

/// The proof of the secret by the side in `role`.
fn prove(
    secret: &[u8],
    role: &[u8],
    challenge: &[u8; HELLO_NONCE_SIZE],
    response: &[u8; HELLO_NONCE_SIZE],
) -> [u8; HELLO_PROOF_SIZE] {
    proof::prove(secret, &[role, challenge, response])
}

/// Checks the proof of `hello` against this side's secret, in constant
/// time. A proof must be there exactly when this side has a secret.
fn verify(
    secret: Option<&[u8]>,
    role: &[u8],
    challenge: &[u8; HELLO_NONCE_SIZE],
    hello: &ControlHello,
) -> Result<(), NetError> {
    match (secret, &hello.proof) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(NetError::UnexpectedSecretProof),
        (Some(_), None) => Err(NetError::SecretProofMissing),
        (Some(secret), Some(proof))
            if proof::holds(secret, &[role, challenge, &hello.nonce], proof) =>
        {
            Ok(())
        }
        (Some(_), Some(_)) => Err(NetError::SecretProofWrong),
    }
}

fn write_bytes(
    stream: &mut TcpStream,
    bytes: &[u8],
    operation: &'static str,
) -> Result<(), NetError> {
    stream
        .write_all(bytes)
        .map_err(|error| NetError::io(operation, error))
}

/// Refuses the peer: tells it why (best effort) and closes the connection.
fn refuse(stream: &mut TcpStream, error: &NetError) {
    let mut frame = Vec::new();
    encode_close(&format!("handshake refused: {error}"), &mut frame);
    // The peer may be gone already; the error returned is ours.
    let _ = stream.write_all(&frame);
    let _ = stream.shutdown(Shutdown::Both);
}

fn set_timeouts(
    stream: &TcpStream,
    read: Option<Duration>,
    write: Option<Duration>,
) -> Result<(), NetError> {
    stream
        .set_read_timeout(read)
        .and_then(|()| stream.set_write_timeout(write))
        .map_err(|error| NetError::io("configure the control socket", error))
}

/// The accepting side of the handshake (steps 2.1 and 2.3).
fn accept_handshake(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    secret: Option<&[u8]>,
) -> Result<(), NetError> {
    let nonce = proof::random_nonce()?;
    let mut frame = Vec::new();
    encode_hello(&ControlHello { nonce, proof: None }, &mut frame);
    write_bytes(stream, &frame, "send the handshake")?;
    let response = read_hello(reader, stream)?;
    if let Err(error) = verify(secret, PROOF_ROLE_CONNECTOR, &nonce, &response) {
        refuse(stream, &error);
        return Err(error);
    }
    let acceptance = ControlHello {
        nonce,
        proof: secret.map(|secret| prove(secret, PROOF_ROLE_ACCEPTOR, &response.nonce, &nonce)),
    };
    frame.clear();
    encode_hello(&acceptance, &mut frame);
    write_bytes(stream, &frame, "send the handshake")
}

/// The connecting side of the handshake (steps 2.2 and 2.4).
fn connect_handshake(
    stream: &mut TcpStream,
    reader: &mut FrameReader,
    secret: Option<&[u8]>,
) -> Result<(), NetError> {
    let challenge = read_hello(reader, stream)?;
    if challenge.proof.is_some() {
        return Err(malformed(
            "the acceptor's first Hello carries a proof".to_string(),
        ));
    }
    let nonce = proof::random_nonce()?;
    let response = ControlHello {
        nonce,
        proof: secret.map(|secret| prove(secret, PROOF_ROLE_CONNECTOR, &challenge.nonce, &nonce)),
    };
    let mut frame = Vec::new();
    encode_hello(&response, &mut frame);
    write_bytes(stream, &frame, "send the handshake")?;
    let acceptance = read_hello(reader, stream)?;
    let checked = if acceptance.nonce != challenge.nonce {
        Err(malformed(
            "the acceptance does not repeat the challenge's nonce".to_string(),
        ))
    } else {
        verify(secret, PROOF_ROLE_ACCEPTOR, &nonce, &acceptance)
    };
    if let Err(error) = checked {
        refuse(stream, &error);
        return Err(error);
    }
    Ok(())
}

/// One end of a control connection, sending `S` and receiving `R`: a
/// TaskManager's end is a [`TaskManagerConnection`], the JobManager's end of
/// one TaskManager's connection a [`JobManagerConnection`].
///
/// Every error names the peer's address. After an error other than a
/// receive timeout, the framing is lost: drop the connection.
pub struct ControlConnection<S, R> {
    sender: ControlSender<S>,
    receiver: ControlReceiver<R>,
}

/// The TaskManager's end: sends [`ToJobManagerWire`], receives
/// [`ToTaskManagerWire`].
pub type TaskManagerConnection = ControlConnection<ToJobManagerWire, ToTaskManagerWire>;
/// The JobManager's end of one TaskManager's connection: sends
/// [`ToTaskManagerWire`], receives [`ToJobManagerWire`].
pub type JobManagerConnection = ControlConnection<ToTaskManagerWire, ToJobManagerWire>;

/// The sending half of a control connection.
pub struct ControlSender<S> {
    stream: TcpStream,
    peer_addr: SocketAddr,
    /// The frame being sent, reused.
    buffer: Vec<u8>,
    message: PhantomData<fn(&S)>,
}

/// The receiving half of a control connection.
pub struct ControlReceiver<R> {
    stream: TcpStream,
    peer_addr: SocketAddr,
    reader: FrameReader,
    /// The read timeout the socket has now, to set it only when it changes.
    read_timeout: Option<Duration>,
    /// The error that ended the connection; every later receive returns it.
    failed: Option<NetError>,
    message: PhantomData<fn() -> R>,
}

impl<S: ControlMessage, R: ControlMessage> ControlConnection<S, R> {
    /// Connects to `address` (`host:port`), trying each address it
    /// resolves to within `timeout`, and does the connector's side of the
    /// handshake with `secret`, also within `timeout`.
    pub fn connect(
        address: &str,
        secret: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<ControlConnection<S, R>, NetError> {
        let resolved = address.to_socket_addrs().map_err(|error| {
            NetError::io(
                "resolve the control address",
                io::Error::new(error.kind(), format!("{address}: {error}")),
            )
        })?;
        let mut last_error = None;
        let mut stream = None;
        for candidate in resolved {
            match TcpStream::connect_timeout(&candidate, timeout) {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) => {
                    last_error = Some(
                        NetError::io("connect to the control port", error).with_peer(candidate),
                    )
                }
            }
        }
        let mut stream = match (stream, last_error) {
            (Some(stream), _) => stream,
            (None, Some(error)) => return Err(error),
            (None, None) => {
                return Err(NetError::io(
                    "resolve the control address",
                    io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{address} resolves to no address"),
                    ),
                ))
            }
        };
        let peer_addr = stream
            .peer_addr()
            .map_err(|error| NetError::io("read the peer address", error))?;
        let handshake = |stream: &mut TcpStream, reader: &mut FrameReader| {
            set_timeouts(stream, Some(timeout), Some(timeout))?;
            connect_handshake(stream, reader, secret)
        };
        let mut reader = FrameReader::default();
        handshake(&mut stream, &mut reader).map_err(|error| error.with_peer(peer_addr))?;
        ControlConnection::start(stream, peer_addr, reader)
    }

    /// Does the acceptor's side of the handshake on a stream accepted from
    /// the control port, within [`CONTROL_HANDSHAKE_TIMEOUT`].
    pub fn accept(
        mut stream: TcpStream,
        secret: Option<&[u8]>,
    ) -> Result<ControlConnection<S, R>, NetError> {
        let peer_addr = stream
            .peer_addr()
            .map_err(|error| NetError::io("read the peer address", error))?;
        let mut reader = FrameReader::default();
        set_timeouts(
            &stream,
            Some(CONTROL_HANDSHAKE_TIMEOUT),
            Some(CONTROL_HANDSHAKE_TIMEOUT),
        )
        .and_then(|()| accept_handshake(&mut stream, &mut reader, secret))
        .map_err(|error| error.with_peer(peer_addr))?;
        ControlConnection::start(stream, peer_addr, reader)
    }

    fn start(
        stream: TcpStream,
        peer_addr: SocketAddr,
        reader: FrameReader,
    ) -> Result<ControlConnection<S, R>, NetError> {
        let configure = || {
            set_timeouts(&stream, None, Some(CONTROL_WRITE_TIMEOUT))?;
            // Control messages are small and each one matters at once
            // (a checkpoint trigger, a cancel).
            stream
                .set_nodelay(true)
                .map_err(|error| NetError::io("configure the control socket", error))?;
            stream
                .try_clone()
                .map_err(|error| NetError::io("clone the control socket", error))
        };
        let receiving = configure().map_err(|error| error.with_peer(peer_addr))?;
        Ok(ControlConnection {
            sender: ControlSender {
                stream,
                peer_addr,
                buffer: Vec::new(),
                message: PhantomData,
            },
            receiver: ControlReceiver {
                stream: receiving,
                peer_addr,
                reader,
                read_timeout: None,
                failed: None,
                message: PhantomData,
            },
        })
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.sender.peer_addr
    }

    /// Sends one message (see [`ControlSender::send`]).
    pub fn send(&mut self, message: &S) -> Result<(), NetError> {
        self.sender.send(message)
    }

    /// Receives one message, waiting as long as it takes (see
    /// [`ControlReceiver::recv`]).
    pub fn recv(&mut self) -> Result<R, NetError> {
        self.receiver.recv()
    }

    /// Receives one message if one completes within `timeout` (see
    /// [`ControlReceiver::recv_timeout`]).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<R>, NetError> {
        self.receiver.recv_timeout(timeout)
    }

    /// Tells the peer why and closes the connection.
    pub fn close(mut self, reason: &str) {
        self.sender.close(reason);
    }

    /// The two halves, for a sending and a receiving thread.
    pub fn split(self) -> (ControlSender<S>, ControlReceiver<R>) {
        (self.sender, self.receiver)
    }
}

impl<S: ControlMessage> ControlSender<S> {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Sends one message. A message beyond a bound is refused before
    /// anything is sent (the connection stays usable); a failed or timed
    /// out write (after [`CONTROL_WRITE_TIMEOUT`]) loses the connection.
    pub fn send(&mut self, message: &S) -> Result<(), NetError> {
        self.buffer.clear();
        encode_message(message, &mut self.buffer)?;
        let result = write_bytes(&mut self.stream, &self.buffer, "send a control message");
        // A deployment may be megabytes; do not keep that much for heartbeats.
        if self.buffer.capacity() > 64 * 1024 {
            self.buffer = Vec::new();
        }
        result.map_err(|error| error.with_peer(self.peer_addr))
    }

    /// Tells the peer why (best effort, cut to [`CLOSE_REASON_LENGTH_MAX`]
    /// bytes) and closes the connection, both halves.
    pub fn close(&mut self, reason: &str) {
        self.buffer.clear();
        encode_close(reason, &mut self.buffer);
        // The peer may be gone already; closing is all that is left to do.
        let _ = self.stream.write_all(&self.buffer);
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}

impl<R: ControlMessage> ControlReceiver<R> {
    /// The peer's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// Receives one message, waiting as long as it takes. The end of the
    /// stream is [`NetError::PeerClosed`]; a Close frame
    /// [`NetError::Rejected`] with the peer's reason.
    pub fn recv(&mut self) -> Result<R, NetError> {
        self.receive(None)
    }

    /// Receives one message if one completes within `timeout`; `None` if
    /// none did. A frame cut by the timeout is kept and completed by the
    /// next receive.
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Option<R>, NetError> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            match self.receive(Some(remaining)) {
                Ok(message) => return Ok(Some(message)),
                Err(NetError::Peer { source, .. }) if is_timeout(&source) => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// One receive with a socket read timeout of `timeout` (`None`: wait).
    fn receive(&mut self, timeout: Option<Duration>) -> Result<R, NetError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        if self.read_timeout != timeout {
            self.stream.set_read_timeout(timeout).map_err(|error| {
                NetError::io("configure the control socket", error).with_peer(self.peer_addr)
            })?;
            self.read_timeout = timeout;
        }
        match read_message(&mut self.reader, &mut self.stream) {
            Ok(message) => Ok(message),
            Err(error) if is_timeout(&error) => Err(error.with_peer(self.peer_addr)),
            Err(error) => {
                let error = error.with_peer(self.peer_addr);
                self.failed = Some(error.clone());
                let _ = self.stream.shutdown(Shutdown::Both);
                Err(error)
            }
        }
    }

    /// Whether no part of a message has been received (a timeout did not
    /// cut one).
    pub fn is_between_messages(&self) -> bool {
        self.reader.is_between_frames()
    }
}

/// Heartbeat bookkeeping for one control connection, without I/O or a
/// clock of its own: the caller passes `now`, so a test drives it with made
/// up instants. The TaskManager keeps one for its JobManager, the
/// JobManager one per TaskManager.
#[derive(Clone, Debug)]
pub struct Liveness {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    last_sent: Instant,
}

impl Liveness {
    /// A connection that was heard from and sent to at `now`.
    pub fn new(now: Instant, interval: Duration, timeout: Duration) -> Liveness {
        assert!(
            !interval.is_zero() && interval < timeout,
            "a heartbeat interval ({interval:?}) must be positive and shorter than the timeout ({timeout:?})"
        );
        Liveness {
            interval,
            timeout,
            last_heard: now,
            last_sent: now,
        }
    }

    /// With [`HEARTBEAT_INTERVAL`] and [`HEARTBEAT_TIMEOUT`].
    pub fn with_defaults(now: Instant) -> Liveness {
        Liveness::new(now, HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT)
    }

    /// A message arrived at `now`: any message is a sign of life.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = self.last_heard.max(now);
    }

    /// How long nothing has been heard.
    pub fn silence(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard)
    }

    /// Whether the peer is lost: nothing heard for the timeout.
    pub fn is_lost(&self, now: Instant) -> bool {
        self.silence(now) >= self.timeout
    }

    /// Whether a heartbeat is due at `now`; if so, counts it as sent.
    pub fn heartbeat_due(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_sent) >= self.interval {
            self.last_sent = now;
            return true;
        }
        false
    }

    /// When something next needs doing: a heartbeat or the loss check.
    pub fn next_deadline(&self) -> Instant {
        (self.last_sent + self.interval).min(self.last_heard + self.timeout)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::thread;

    use super::*;
    use crate::frame::FRAME_MAGIC;

    const SECRET: &[u8] = b"the cluster secret";

    fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    /// A connected pair over loopback: (the TaskManager's end, the
    /// JobManager's end).
    fn connection_pair(
        connector_secret: Option<&[u8]>,
        acceptor_secret: Option<&[u8]>,
    ) -> (
        Result<TaskManagerConnection, NetError>,
        Result<JobManagerConnection, NetError>,
        SocketAddr,
        SocketAddr,
    ) {
        let (listener, address) = listener();
        thread::scope(|scope| {
            let acceptor = scope.spawn(|| {
                let (stream, peer) = listener.accept().unwrap();
                (JobManagerConnection::accept(stream, acceptor_secret), peer)
            });
            let connected = TaskManagerConnection::connect(
                &address.to_string(),
                connector_secret,
                Duration::from_secs(5),
            );
            let (accepted, connector_address) = acceptor.join().unwrap();
            (connected, accepted, address, connector_address)
        })
    }

    fn every_to_job_manager() -> Vec<ToJobManagerWire> {
        vec![
            ToJobManagerWire::Register {
                task_manager_id: 0x1234_5678_9abc_def0,
                slot_count: 16,
                data_address: "worker-7.example.com:6121".to_string(),
            },
            ToJobManagerWire::Heartbeat {
                task_manager_id: u64::MAX,
            },
            ToJobManagerWire::TaskFinished {
                job: u128::MAX - 5,
                attempt: 3,
                vertex: 2,
                subtask: 11,
                accumulators: vec![
                    ("records-in".to_string(), 42),
                    ("bytes".to_string(), u64::MAX),
                ],
                committables: vec![(
                    "/data/out/.part-0-3.inprogress".to_string(),
                    "/data/out/part-0-3".to_string(),
                )],
            },
            ToJobManagerWire::TaskFinished {
                job: 1,
                attempt: 0,
                vertex: 0,
                subtask: 0,
                accumulators: Vec::new(),
                committables: Vec::new(),
            },
            ToJobManagerWire::TaskFailed {
                job: 7,
                attempt: 1,
                vertex: 4,
                subtask: 5,
                error: "operator 'window' panicked: índice fuera de rango".to_string(),
            },
            ToJobManagerWire::AcknowledgeCheckpoint {
                job: 9,
                attempt: 2,
                vertex: 1,
                subtask: 3,
                checkpoint_id: 77,
                state_handle: (0..=255).collect(),
                pause_us: 120,
                alignment_us: 3_000,
            },
            ToJobManagerWire::DeclineCheckpoint {
                job: 9,
                attempt: 2,
                checkpoint_id: 78,
                reason: "the task is not running yet".to_string(),
            },
        ]
    }

    fn deploy_job(vertex_count: usize, parallelism: usize, address: &str) -> ToTaskManagerWire {
        ToTaskManagerWire::DeployJob {
            job: 0xfeed_beef,
            attempt: 4,
            program: "nexmark-q5".to_string(),
            arguments: vec!["--parallelism".to_string(), "4".to_string(), String::new()],
            slots: (0..vertex_count)
                .map(|_| {
                    (0..parallelism)
                        .map(|subtask| SlotAddress {
                            task_manager_id: subtask as u64 % 2 + 1,
                            data_address: address.to_string(),
                            slot: subtask as u32 / 2,
                        })
                        .collect()
                })
                .collect(),
            restore: Some("/checkpoints/job/chk-12".to_string()),
        }
    }

    fn every_to_task_manager() -> Vec<ToTaskManagerWire> {
        vec![
            ToTaskManagerWire::Registered {
                task_manager_id: 99,
            },
            ToTaskManagerWire::Heartbeat,
            deploy_job(3, 4, "10.0.0.1:6121"),
            ToTaskManagerWire::DeployJob {
                job: 0,
                attempt: 0,
                program: "word-count".to_string(),
                arguments: Vec::new(),
                slots: Vec::new(),
                restore: None,
            },
            ToTaskManagerWire::TriggerCheckpoint {
                job: 5,
                attempt: 1,
                checkpoint_id: 12,
                timestamp_ms: 1_700_000_000_000,
                target: "/checkpoints/job/savepoint-12".to_string(),
                is_savepoint: true,
            },
            ToTaskManagerWire::CheckpointComplete {
                job: 5,
                attempt: 1,
                checkpoint_id: 12,
            },
            ToTaskManagerWire::CancelJob { job: 5 },
            ToTaskManagerWire::Shutdown,
        ]
    }

    #[test]
    fn every_message_round_trips_both_ways_with_and_without_a_secret() {
        for secret in [None, Some(SECRET)] {
            let (task_manager, job_manager, ..) = connection_pair(secret, secret);
            let (mut task_manager, mut job_manager) = (task_manager.unwrap(), job_manager.unwrap());
            thread::scope(|scope| {
                scope.spawn(|| {
                    for message in every_to_job_manager() {
                        task_manager.send(&message).unwrap();
                    }
                    for expected in every_to_task_manager() {
                        assert_eq!(task_manager.recv().unwrap(), expected);
                    }
                });
                for expected in every_to_job_manager() {
                    assert_eq!(job_manager.recv().unwrap(), expected);
                }
                for message in every_to_task_manager() {
                    job_manager.send(&message).unwrap();
                }
            });
        }
    }

    #[test]
    fn split_halves_work_from_two_threads() {
        let (task_manager, job_manager, ..) = connection_pair(Some(SECRET), Some(SECRET));
        let (mut sender, mut receiver) = task_manager.unwrap().split();
        let mut job_manager = job_manager.unwrap();
        thread::scope(|scope| {
            scope.spawn(move || {
                for _ in 0..100 {
                    sender
                        .send(&ToJobManagerWire::Heartbeat { task_manager_id: 1 })
                        .unwrap();
                }
            });
            scope.spawn(move || {
                for _ in 0..100 {
                    assert_eq!(receiver.recv().unwrap(), ToTaskManagerWire::Heartbeat);
                }
            });
            for _ in 0..100 {
                assert_eq!(
                    job_manager.recv().unwrap(),
                    ToJobManagerWire::Heartbeat { task_manager_id: 1 }
                );
                job_manager.send(&ToTaskManagerWire::Heartbeat).unwrap();
            }
        });
    }

    #[test]
    fn a_mismatched_secret_is_refused_on_both_sides_naming_the_peer() {
        let cases: [(Option<&[u8]>, Option<&[u8]>, fn(&NetError) -> bool); 3] = [
            (Some(b"another secret"), Some(SECRET), |error| {
                matches!(error, NetError::SecretProofWrong)
            }),
            (None, Some(SECRET), |error| {
                matches!(error, NetError::SecretProofMissing)
            }),
            (Some(SECRET), None, |error| {
                matches!(error, NetError::UnexpectedSecretProof)
            }),
        ];
        for (connector_secret, acceptor_secret, expected) in cases {
            let (connected, accepted, acceptor_address, connector_address) =
                connection_pair(connector_secret, acceptor_secret);
            let accept_error = accepted.err().expect("the acceptor refuses");
            assert!(
                matches!(&accept_error, NetError::Peer { peer, source } if *peer == connector_address && expected(source)),
                "{accept_error}"
            );
            let connect_error = connected.err().expect("the connector is refused");
            assert!(
                matches!(&connect_error, NetError::Peer { peer, source }
                    if *peer == acceptor_address
                    && matches!(&**source, NetError::Rejected { reason } if reason.contains("secret"))),
                "{connect_error}"
            );
            assert!(connect_error
                .to_string()
                .contains("configure the same secret"));
        }
    }

    /// A fake JobManager that does step 2.1, then answers the connector's
    /// Hello with `acceptance(response_nonce, challenge_nonce)`; returns the
    /// frame kind the connector sends next (a Close, or nothing).
    fn fake_acceptor(
        listener: &TcpListener,
        acceptance: impl FnOnce(&[u8; HELLO_NONCE_SIZE], &[u8; HELLO_NONCE_SIZE]) -> ControlHello,
    ) -> Result<(ControlFrameKind, AlignedVec), NetError> {
        let (mut stream, _) = listener.accept().unwrap();
        let nonce = [3; HELLO_NONCE_SIZE];
        let mut frame = Vec::new();
        encode_hello(&ControlHello { nonce, proof: None }, &mut frame);
        stream.write_all(&frame).unwrap();
        let mut reader = FrameReader::default();
        let response = read_hello(&mut reader, &mut stream).unwrap();
        frame.clear();
        encode_hello(&acceptance(&response.nonce, &nonce), &mut frame);
        stream.write_all(&frame).unwrap();
        reader.read_frame(&mut stream)
    }

    #[test]
    fn a_connector_refuses_an_acceptor_that_cannot_prove_the_secret() {
        let cases: [(
            Option<&[u8]>,
            fn(&[u8; HELLO_NONCE_SIZE], &[u8; HELLO_NONCE_SIZE]) -> ControlHello,
            fn(&NetError) -> bool,
        ); 4] = [
            (
                Some(SECRET),
                |response, challenge| ControlHello {
                    nonce: *challenge,
                    proof: Some(prove(b"guess", PROOF_ROLE_ACCEPTOR, response, challenge)),
                },
                |error| matches!(error, NetError::SecretProofWrong),
            ),
            (
                // A proof made for the other role is refused: no reflection.
                Some(SECRET),
                |response, challenge| ControlHello {
                    nonce: *challenge,
                    proof: Some(prove(SECRET, PROOF_ROLE_CONNECTOR, response, challenge)),
                },
                |error| matches!(error, NetError::SecretProofWrong),
            ),
            (
                Some(SECRET),
                |_, challenge| ControlHello {
                    nonce: *challenge,
                    proof: None,
                },
                |error| matches!(error, NetError::SecretProofMissing),
            ),
            (
                None,
                |_, _| ControlHello {
                    nonce: [4; HELLO_NONCE_SIZE],
                    proof: None,
                },
                |error| matches!(error, NetError::MalformedControlFrame { .. }),
            ),
        ];
        for (secret, acceptance, expected) in cases {
            let (listener, address) = listener();
            thread::scope(|scope| {
                let fake = scope.spawn(|| fake_acceptor(&listener, acceptance));
                let error = TaskManagerConnection::connect(
                    &address.to_string(),
                    secret,
                    Duration::from_secs(5),
                )
                .err()
                .expect("the connector refuses");
                assert!(
                    matches!(&error, NetError::Peer { peer, source } if *peer == address && expected(source)),
                    "{error}"
                );
                let (kind, _) = fake.join().unwrap().unwrap();
                assert_eq!(kind, ControlFrameKind::Close);
            });
        }
    }

    #[test]
    fn a_connector_with_the_secret_is_accepted_by_an_honest_fake() {
        // The proofs are computed as the module documents them.
        let (listener, address) = listener();
        thread::scope(|scope| {
            let fake = scope.spawn(|| {
                fake_acceptor(&listener, |response, challenge| ControlHello {
                    nonce: *challenge,
                    proof: Some(prove(SECRET, PROOF_ROLE_ACCEPTOR, response, challenge)),
                })
            });
            let connection = TaskManagerConnection::connect(
                &address.to_string(),
                Some(SECRET),
                Duration::from_secs(5),
            )
            .unwrap();
            drop(connection);
            assert!(matches!(fake.join().unwrap(), Err(NetError::PeerClosed)));
        });
    }

    /// A raw client that does the connector's handshake without a secret and
    /// then writes `bytes`; returns what the JobManager's end receives.
    fn receive_after_raw_bytes(bytes: &[u8], close: bool) -> (NetError, SocketAddr) {
        let (listener, address) = listener();
        thread::scope(|scope| {
            let client = scope.spawn(move || {
                let mut stream = TcpStream::connect(address).unwrap();
                let mut reader = FrameReader::default();
                connect_handshake(&mut stream, &mut reader, None).unwrap();
                stream.write_all(bytes).unwrap();
                if close {
                    stream.shutdown(Shutdown::Write).unwrap();
                }
                // Wait until the JobManager's end drops the connection.
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
                stream.local_addr().unwrap()
            });
            let (stream, _) = listener.accept().unwrap();
            let mut connection = JobManagerConnection::accept(stream, None).unwrap();
            let error = connection.recv().unwrap_err();
            // The error sticks: the framing is lost.
            let again = connection.recv().unwrap_err();
            assert_eq!(again.to_string(), error.to_string());
            drop(connection);
            (error, client.join().unwrap())
        })
    }

    fn raw_header(
        magic: u32,
        version: u16,
        kind: u16,
        reserved: u32,
        length: u32,
        crc: u32,
    ) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&magic.to_le_bytes());
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&reserved.to_le_bytes());
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes
    }

    fn heartbeat_frame() -> Vec<u8> {
        let mut frame = Vec::new();
        encode_message(
            &ToJobManagerWire::Heartbeat { task_manager_id: 5 },
            &mut frame,
        )
        .unwrap();
        frame
    }

    #[test]
    fn a_peer_sending_garbage_after_the_handshake_gets_an_error_naming_it() {
        let mut bad_crc = heartbeat_frame();
        bad_crc[16] ^= 0xff;
        let mut flipped_payload = heartbeat_frame();
        flipped_payload[CONTROL_HEADER_SIZE] ^= 0x01;
        let oversized = raw_header(CONTROL_MAGIC, CONTROL_VERSION, 2, 0, u32::MAX, 0);
        let mut truncated_frame = heartbeat_frame();
        truncated_frame.truncate(truncated_frame.len() - 3);
        let mut wrong_direction = Vec::new();
        encode_message(&ToTaskManagerWire::Shutdown, &mut wrong_direction).unwrap();
        let mut junk_archive = Vec::new();
        encode_frame(
            ControlFrameKind::ToJobManager,
            &[0xff; 64],
            &mut junk_archive,
        );
        let mut hello_again = Vec::new();
        encode_hello(
            &ControlHello {
                nonce: [0; HELLO_NONCE_SIZE],
                proof: None,
            },
            &mut hello_again,
        );
        // A valid archive whose field breaks its bound (a peer that skips
        // the encoder's check).
        let mut unbounded = Vec::new();
        let too_long = ToJobManagerWire::Register {
            task_manager_id: 1,
            slot_count: 1,
            data_address: "x".repeat(ADDRESS_LENGTH_MAX + 1),
        };
        encode_frame(
            ControlFrameKind::ToJobManager,
            &too_long.archive().unwrap(),
            &mut unbounded,
        );

        type Check = fn(&NetError) -> bool;
        let cases: Vec<(&str, Vec<u8>, bool, Check)> = vec![
            (
                "http",
                b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
                false,
                |error| matches!(error, NetError::BadControlMagic { .. }),
            ),
            (
                "data plane",
                raw_header(FRAME_MAGIC, 1, 1, 0, 0, 0),
                false,
                |error| {
                    matches!(error, NetError::BadControlMagic { found } if *found == FRAME_MAGIC)
                        && error.to_string().contains("data port")
                },
            ),
            (
                "version",
                raw_header(CONTROL_MAGIC, 9, 2, 0, 1, 0),
                false,
                |error| matches!(error, NetError::UnsupportedVersion { found: 9, .. }),
            ),
            (
                "kind",
                raw_header(CONTROL_MAGIC, CONTROL_VERSION, 77, 0, 1, 0),
                false,
                |error| matches!(error, NetError::MalformedControlFrame { reason } if reason.contains("kind 77")),
            ),
            (
                "reserved",
                raw_header(CONTROL_MAGIC, CONTROL_VERSION, 2, 1, 1, 0),
                false,
                |error| matches!(error, NetError::MalformedControlFrame { reason } if reason.contains("reserved")),
            ),
            (
                "oversized",
                oversized,
                false,
                |error| matches!(error, NetError::OversizedFrame { length, .. } if *length == u64::from(u32::MAX)),
            ),
            ("bad crc", bad_crc, false, |error| {
                matches!(error, NetError::ChecksumMismatch { .. })
            }),
            ("flipped payload", flipped_payload, false, |error| {
                matches!(error, NetError::ChecksumMismatch { .. })
            }),
            (
                "truncated",
                truncated_frame,
                true,
                |error| matches!(error, NetError::Io { source, .. } if source.kind() == io::ErrorKind::UnexpectedEof),
            ),
            (
                "wrong direction",
                wrong_direction,
                false,
                |error| matches!(error, NetError::MalformedControlFrame { reason } if reason.contains("ToTaskManager")),
            ),
            (
                "junk archive",
                junk_archive,
                false,
                |error| matches!(error, NetError::MalformedControlFrame { reason } if reason.contains("validate")),
            ),
            ("hello again", hello_again, false, |error| {
                matches!(error, NetError::MalformedControlFrame { .. })
            }),
            (
                "unbounded field",
                unbounded,
                false,
                |error| matches!(error, NetError::FieldOutOfBounds { length_max, .. } if *length_max == ADDRESS_LENGTH_MAX as u64),
            ),
            ("closed", Vec::new(), true, |error| {
                matches!(error, NetError::PeerClosed)
            }),
        ];
        for (name, bytes, close, check) in cases {
            let (error, client_address) = receive_after_raw_bytes(&bytes, close);
            assert!(
                matches!(&error, NetError::Peer { peer, source } if *peer == client_address && check(source)),
                "{name}: {error}"
            );
        }
    }

    #[test]
    fn garbage_instead_of_a_handshake_is_refused_naming_the_peer() {
        let (listener, address) = listener();
        thread::scope(|scope| {
            let client = scope.spawn(move || {
                let mut stream = TcpStream::connect(address).unwrap();
                stream.write_all(&[0x55; 64]).unwrap();
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
                stream.local_addr().unwrap()
            });
            let (stream, _) = listener.accept().unwrap();
            let error = JobManagerConnection::accept(stream, Some(SECRET))
                .err()
                .unwrap();
            let client_address = client.join().unwrap();
            assert!(
                matches!(&error, NetError::Peer { peer, source } if *peer == client_address
                    && matches!(**source, NetError::BadControlMagic { found: 0x5555_5555 })),
                "{error}"
            );
        });
    }

    #[test]
    fn a_close_with_a_reason_reaches_the_peer() {
        let (task_manager, job_manager, ..) = connection_pair(None, None);
        let mut task_manager = task_manager.unwrap();
        job_manager
            .unwrap()
            .close("task manager id 7 is already registered");
        let error = task_manager.recv().unwrap_err();
        assert!(
            matches!(error.root(), NetError::Rejected { reason } if reason == "task manager id 7 is already registered"),
            "{error}"
        );
    }

    #[test]
    fn a_receive_timeout_keeps_a_partial_frame() {
        let (listener, address) = listener();
        thread::scope(|scope| {
            let (halfway_sender, halfway) = std::sync::mpsc::channel();
            let (go_on_sender, go_on) = std::sync::mpsc::channel::<()>();
            scope.spawn(move || {
                let mut stream = TcpStream::connect(address).unwrap();
                let mut reader = FrameReader::default();
                connect_handshake(&mut stream, &mut reader, None).unwrap();
                let mut frames = heartbeat_frame();
                frames.extend_from_slice(&heartbeat_frame());
                // Half a header, then the rest of the first frame and half
                // of the second, then the rest.
                let cuts = [7, heartbeat_frame().len() + 5, frames.len()];
                let mut start = 0;
                for cut in cuts {
                    stream.write_all(&frames[start..cut]).unwrap();
                    start = cut;
                    halfway_sender.send(()).unwrap();
                    go_on.recv().unwrap();
                }
            });
            let (stream, _) = listener.accept().unwrap();
            let mut connection = JobManagerConnection::accept(stream, None).unwrap();
            let short = Duration::from_millis(50);
            assert_eq!(connection.recv_timeout(short).unwrap(), None);
            halfway.recv().unwrap();
            assert_eq!(connection.recv_timeout(short).unwrap(), None);
            assert!(!connection.receiver.is_between_messages());
            go_on_sender.send(()).unwrap();
            halfway.recv().unwrap();
            let expected = ToJobManagerWire::Heartbeat { task_manager_id: 5 };
            assert_eq!(
                connection.recv_timeout(short).unwrap(),
                Some(expected.clone())
            );
            assert_eq!(connection.recv_timeout(short).unwrap(), None);
            go_on_sender.send(()).unwrap();
            halfway.recv().unwrap();
            assert_eq!(connection.recv().unwrap(), expected);
            assert!(connection.receiver.is_between_messages());
            go_on_sender.send(()).unwrap();
        });
    }

    #[test]
    fn connecting_to_a_closed_port_fails_naming_it() {
        let (listener, address) = listener();
        drop(listener);
        let error =
            TaskManagerConnection::connect(&address.to_string(), None, Duration::from_secs(1))
                .err()
                .unwrap();
        assert!(
            matches!(&error, NetError::Peer { peer, .. } if *peer == address),
            "{error}"
        );
        let error =
            TaskManagerConnection::connect("no-such-host.invalid:1", None, Duration::from_secs(1))
                .err()
                .unwrap();
        assert!(
            error.to_string().contains("no-such-host.invalid"),
            "{error}"
        );
    }

    #[test]
    fn every_bound_is_enforced_on_encode_leaving_the_buffer_as_it_was() {
        let long = |length: usize| "x".repeat(length + 1);
        let to_job_manager = [
            ToJobManagerWire::Register {
                task_manager_id: 1,
                slot_count: 1,
                data_address: long(ADDRESS_LENGTH_MAX),
            },
            ToJobManagerWire::TaskFinished {
                job: 1,
                attempt: 1,
                vertex: 1,
                subtask: 1,
                accumulators: vec![(String::new(), 0); ACCUMULATOR_COUNT_MAX + 1],
                committables: Vec::new(),
            },
            ToJobManagerWire::TaskFinished {
                job: 1,
                attempt: 1,
                vertex: 1,
                subtask: 1,
                accumulators: vec![(long(ACCUMULATOR_NAME_LENGTH_MAX), 0)],
                committables: Vec::new(),
            },
            ToJobManagerWire::TaskFinished {
                job: 1,
                attempt: 1,
                vertex: 1,
                subtask: 1,
                accumulators: Vec::new(),
                committables: vec![(String::new(), String::new()); COMMITTABLE_COUNT_MAX + 1],
            },
            ToJobManagerWire::TaskFinished {
                job: 1,
                attempt: 1,
                vertex: 1,
                subtask: 1,
                accumulators: Vec::new(),
                committables: vec![(String::new(), long(PATH_LENGTH_MAX))],
            },
            ToJobManagerWire::TaskFailed {
                job: 1,
                attempt: 1,
                vertex: 1,
                subtask: 1,
                error: long(REASON_LENGTH_MAX),
            },
            ToJobManagerWire::AcknowledgeCheckpoint {
                job: 1,
                attempt: 1,
                vertex: 1,
                subtask: 1,
                checkpoint_id: 1,
                state_handle: vec![0; STATE_HANDLE_SIZE_MAX + 1],
                pause_us: 0,
                alignment_us: 0,
            },
            ToJobManagerWire::DeclineCheckpoint {
                job: 1,
                attempt: 1,
                checkpoint_id: 1,
                reason: long(REASON_LENGTH_MAX),
            },
        ];
        let deploy = |change: fn(&mut ToTaskManagerWire)| {
            let mut message = deploy_job(1, 1, "host:1");
            change(&mut message);
            message
        };
        let to_task_manager = [
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { program, .. } = message {
                    *program = "p".repeat(PROGRAM_NAME_LENGTH_MAX + 1);
                }
            }),
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { arguments, .. } = message {
                    *arguments = vec![String::new(); ARGUMENT_COUNT_MAX + 1];
                }
            }),
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { arguments, .. } = message {
                    arguments.push("a".repeat(ARGUMENT_LENGTH_MAX + 1));
                }
            }),
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { slots, .. } = message {
                    *slots = vec![Vec::new(); VERTEX_COUNT_MAX + 1];
                }
            }),
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { slots, .. } = message {
                    let address = slots[0][0].clone();
                    *slots = vec![vec![address; SLOT_ASSIGNMENT_COUNT_MAX / 2 + 1]; 2];
                }
            }),
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { slots, .. } = message {
                    slots[0][0].data_address = "h".repeat(ADDRESS_LENGTH_MAX + 1);
                }
            }),
            deploy(|message| {
                if let ToTaskManagerWire::DeployJob { restore, .. } = message {
                    *restore = Some("r".repeat(PATH_LENGTH_MAX + 1));
                }
            }),
            ToTaskManagerWire::TriggerCheckpoint {
                job: 1,
                attempt: 1,
                checkpoint_id: 1,
                timestamp_ms: 1,
                target: long(PATH_LENGTH_MAX),
                is_savepoint: false,
            },
        ];
        let mut out = b"earlier bytes".to_vec();
        for message in &to_job_manager {
            let error = encode_message(message, &mut out).unwrap_err();
            assert!(
                matches!(error, NetError::FieldOutOfBounds { .. }),
                "{error}"
            );
            // The same message archived by a careless peer is refused on decode.
            assert!(matches!(
                decode_archive::<ToJobManagerWire>(&message.archive().unwrap()),
                Err(NetError::FieldOutOfBounds { .. })
            ));
        }
        for message in &to_task_manager {
            let error = encode_message(message, &mut out).unwrap_err();
            assert!(
                matches!(error, NetError::FieldOutOfBounds { .. }),
                "{error}"
            );
            assert!(matches!(
                decode_archive::<ToTaskManagerWire>(&message.archive().unwrap()),
                Err(NetError::FieldOutOfBounds { .. })
            ));
        }
        assert_eq!(out, b"earlier bytes");

        // At the bounds, messages encode.
        let at_bound = ToJobManagerWire::TaskFailed {
            job: 1,
            attempt: 1,
            vertex: 1,
            subtask: 1,
            error: "e".repeat(REASON_LENGTH_MAX),
        };
        encode_message(&at_bound, &mut out).unwrap();

        // Within every field bound, a deployment too large for one frame.
        let huge = deploy_job(
            2,
            SLOT_ASSIGNMENT_COUNT_MAX / 2,
            &"h".repeat(ADDRESS_LENGTH_MAX),
        );
        let before = out.len();
        let error = encode_message(&huge, &mut out).unwrap_err();
        assert!(matches!(error, NetError::OversizedFrame { .. }), "{error}");
        assert_eq!(out.len(), before);
    }

    fn decode_archive<M: ControlMessage>(archive: &[u8]) -> Result<M, NetError> {
        let mut frame = Vec::new();
        encode_frame(M::KIND, archive, &mut frame);
        read_message::<M>(&mut FrameReader::default(), &mut &frame[..])
    }

    #[test]
    fn cut_to_length_respects_character_boundaries() {
        assert_eq!(cut_to_length("héllo", 2), "h");
        assert_eq!(cut_to_length("héllo", 3), "hé");
        assert_eq!(cut_to_length("hello", 10), "hello");
    }

    /// A small deterministic generator (xorshift64*), so that a failure
    /// repeats.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, bound: usize) -> usize {
            (self.next() % bound as u64) as usize
        }

        fn bytes(&mut self, length: usize) -> Vec<u8> {
            (0..length).map(|_| self.next() as u8).collect()
        }
    }

    /// Every frame in `bytes`, until the first error (or the end).
    fn decode_all<M: ControlMessage>(bytes: &[u8]) -> Result<Vec<M>, NetError> {
        let mut reader = FrameReader::default();
        let mut source = bytes;
        let mut messages = Vec::new();
        loop {
            match read_message::<M>(&mut reader, &mut source) {
                Ok(message) => messages.push(message),
                Err(NetError::PeerClosed) => return Ok(messages),
                Err(error) => return Err(error),
            }
        }
    }

    #[test]
    fn decoding_random_bytes_never_panics() {
        let mut random = Random(0x9e37_79b9_7f4a_7c15);
        let mut valid_to_job_manager = Vec::new();
        for message in every_to_job_manager() {
            encode_message(&message, &mut valid_to_job_manager).unwrap();
        }
        let mut valid_to_task_manager = Vec::new();
        for message in every_to_task_manager() {
            encode_message(&message, &mut valid_to_task_manager).unwrap();
        }
        assert_eq!(
            decode_all::<ToJobManagerWire>(&valid_to_job_manager).unwrap(),
            every_to_job_manager()
        );
        assert_eq!(
            decode_all::<ToTaskManagerWire>(&valid_to_task_manager).unwrap(),
            every_to_task_manager()
        );
        let archives_to_job_manager: Vec<AlignedVec> = every_to_job_manager()
            .iter()
            .map(|message| message.archive().unwrap())
            .collect();
        let archives_to_task_manager: Vec<AlignedVec> = every_to_task_manager()
            .iter()
            .map(|message| message.archive().unwrap())
            .collect();
        for round in 0..20_000 {
            // Plain random bytes, often behind a valid header so that the
            // payload reaches the rkyv validator.
            let length = random.below(300);
            let mut bytes = random.bytes(length);
            if round % 2 == 0 {
                let kind = [
                    ControlFrameKind::ToJobManager,
                    ControlFrameKind::ToTaskManager,
                ][random.below(2)];
                let mut framed = Vec::new();
                if !bytes.is_empty() {
                    encode_frame(kind, &bytes, &mut framed);
                }
                bytes = framed;
            }
            let _ = decode_all::<ToJobManagerWire>(&bytes);
            let _ = decode_all::<ToTaskManagerWire>(&bytes);

            // A valid archive with a few bytes changed, checksummed again:
            // the validator alone stands between it and the decoder.
            let (archive, kind) = if round % 2 == 0 {
                let archives = &archives_to_job_manager;
                (
                    archives[random.below(archives.len())].to_vec(),
                    ControlFrameKind::ToJobManager,
                )
            } else {
                let archives = &archives_to_task_manager;
                (
                    archives[random.below(archives.len())].to_vec(),
                    ControlFrameKind::ToTaskManager,
                )
            };
            let mut archive = archive;
            for _ in 0..1 + random.below(4) {
                let at = random.below(archive.len());
                archive[at] = random.next() as u8;
            }
            let mut framed = Vec::new();
            encode_frame(kind, &archive, &mut framed);
            let _ = decode_all::<ToJobManagerWire>(&framed);
            let _ = decode_all::<ToTaskManagerWire>(&framed);

            // A valid stream cut anywhere or with one byte changed.
            let valid = if round % 2 == 0 {
                &valid_to_job_manager
            } else {
                &valid_to_task_manager
            };
            let mut changed = valid[..random.below(valid.len() + 1)].to_vec();
            if !changed.is_empty() && round % 3 == 0 {
                let at = random.below(changed.len());
                changed[at] ^= 1 << random.below(8);
            }
            let _ = decode_all::<ToJobManagerWire>(&changed);
            let _ = decode_all::<ToTaskManagerWire>(&changed);
        }
    }

    #[test]
    fn liveness_sends_heartbeats_and_declares_a_silent_peer_lost() {
        let start = Instant::now();
        let at = |milliseconds: u64| start + Duration::from_millis(milliseconds);
        let mut liveness = Liveness::new(
            start,
            Duration::from_millis(100),
            Duration::from_millis(1000),
        );
        assert!(!liveness.heartbeat_due(at(50)));
        assert!(liveness.heartbeat_due(at(100)));
        assert!(!liveness.heartbeat_due(at(150)));
        assert_eq!(liveness.next_deadline(), at(200));
        assert!(!liveness.is_lost(at(999)));
        liveness.heard(at(900));
        // Late news does not move the last sign of life back.
        liveness.heard(at(800));
        assert!(!liveness.is_lost(at(1899)));
        assert!(liveness.is_lost(at(1900)));
        assert_eq!(liveness.silence(at(1900)), Duration::from_millis(1000));
        let mut quiet = Liveness::with_defaults(start);
        assert!(quiet.heartbeat_due(start + HEARTBEAT_INTERVAL));
        assert_eq!(quiet.next_deadline(), start + HEARTBEAT_INTERVAL * 2);
        assert!(quiet.is_lost(start + HEARTBEAT_TIMEOUT));
    }
}
