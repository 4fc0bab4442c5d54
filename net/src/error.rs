//! The one error type of strom-net.
//!
//! Every variant says what is wrong and carries the numbers that show it, so
//! that a log line about a bad peer is enough to tell a corrupt stream from a
//! misconfigured secret or a version skew between processes.

use std::fmt;
use std::io;
use std::net::SocketAddr;

use crate::frame::FrameKind;

/// What went wrong while encoding, decoding or moving frames.
#[derive(Debug)]
pub enum NetError {
    /// A frame header did not start with [`crate::frame::FRAME_MAGIC`]: the
    /// peer does not speak this protocol, or the stream lost its framing.
    BadMagic { found: u32 },
    /// The frame uses a protocol version this process does not speak.
    UnsupportedVersion { found: u16, supported: u16 },
    /// A frame payload longer than the limit, refused before allocating.
    OversizedFrame { length: u64, length_max: u32 },
    /// The payload's crc32 is not the one in the header.
    ChecksumMismatch {
        channel: u32,
        stored: u32,
        computed: u32,
    },
    /// The header names a frame kind this process does not know.
    UnknownKind { kind: u16 },
    /// The payload of a frame of a known kind does not decode.
    MalformedPayload { kind: FrameKind, reason: String },
    /// A well-formed frame that is not allowed at this point of the protocol.
    UnexpectedFrame {
        expected: &'static str,
        found: FrameKind,
    },
    /// The peer sent data on a channel for which it held no credit: it
    /// would overflow the receiver's bounded buffers.
    CreditViolation { channel: u32 },
    /// The peer granted so much credit that a counter would overflow.
    CreditOverflow { channel: u32 },
    /// A link carries at most this many channels (a bound on the memory a
    /// peer can make this process spend on channel state).
    TooManyChannels { channel_count_max: u32 },
    /// A channel was opened twice on one link.
    ChannelInUse { channel: u32 },
    /// The handshake carried no secret proof, but this side requires one.
    SecretProofMissing,
    /// The handshake's secret proof does not match this side's secret.
    SecretProofWrong,
    /// The handshake carried a secret proof, but this side has no secret
    /// (control plane): the two sides are configured differently.
    UnexpectedSecretProof,
    /// A control frame header did not start with
    /// [`crate::control::CONTROL_MAGIC`]: the peer is not a Strom control
    /// endpoint (a data port, say), or the stream lost its framing.
    BadControlMagic { found: u32 },
    /// A control frame that does not decode, or is not allowed here (an
    /// unknown kind, a message for the other direction, a payload that fails
    /// rkyv validation).
    MalformedControlFrame { reason: String },
    /// A string or list of a control message is longer than its bound
    /// (on encode or on decode).
    FieldOutOfBounds {
        field: &'static str,
        length: u64,
        length_max: u64,
    },
    /// The peer refused the connection (it sent Close during the handshake).
    Rejected { reason: String },
    /// The peer closed the connection (end of stream or a Close frame).
    PeerClosed,
    /// This side closed the link; nothing more can be sent or received.
    LinkClosed,
    /// A socket operation failed (including timeouts).
    Io {
        operation: &'static str,
        source: io::Error,
    },
    /// An error on the connection with `peer`.
    Peer {
        peer: SocketAddr,
        source: Box<NetError>,
    },
}

impl NetError {
    /// Wraps `source` with an operation name.
    pub fn io(operation: &'static str, source: impl Into<io::Error>) -> NetError {
        NetError::Io {
            operation,
            source: source.into(),
        }
    }

    /// Names the peer this error came from (once: an error that already
    /// names a peer is returned as it is).
    pub fn with_peer(self, peer: SocketAddr) -> NetError {
        match self {
            NetError::Peer { .. } => self,
            other => NetError::Peer {
                peer,
                source: Box::new(other),
            },
        }
    }

    /// The error without the peer context: what actually went wrong.
    pub fn root(&self) -> &NetError {
        match self {
            NetError::Peer { source, .. } => source.root(),
            other => other,
        }
    }
}

impl fmt::Display for NetError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetError::BadMagic { found } => write!(
                formatter,
                "bad frame magic {found:#010x} (expected {:#010x}): the peer does not speak the Strom protocol or the stream lost its framing",
                crate::frame::FRAME_MAGIC
            ),
            NetError::UnsupportedVersion { found, supported } => write!(
                formatter,
                "unsupported frame version {found} (this process speaks version {supported}): run the same Strom release on every process of the cluster"
            ),
            NetError::OversizedFrame { length, length_max } => write!(
                formatter,
                "frame payload of {length} bytes exceeds the limit of {length_max} bytes"
            ),
            NetError::ChecksumMismatch {
                channel,
                stored,
                computed,
            } => write!(
                formatter,
                "frame checksum mismatch on channel {channel}: header says {stored:#010x}, payload has {computed:#010x}"
            ),
            NetError::UnknownKind { kind } => write!(formatter, "unknown frame kind {kind}"),
            NetError::MalformedPayload { kind, reason } => {
                write!(formatter, "malformed {kind:?} frame payload: {reason}")
            }
            NetError::UnexpectedFrame { expected, found } => {
                write!(formatter, "unexpected {found:?} frame, expected {expected}")
            }
            NetError::CreditViolation { channel } => write!(
                formatter,
                "peer sent data on channel {channel} without credit"
            ),
            NetError::CreditOverflow { channel } => write!(
                formatter,
                "peer granted more credit on channel {channel} than a counter holds"
            ),
            NetError::TooManyChannels { channel_count_max } => write!(
                formatter,
                "a link carries at most {channel_count_max} channels"
            ),
            NetError::ChannelInUse { channel } => {
                write!(formatter, "channel {channel} is already open on this link")
            }
            NetError::SecretProofMissing => write!(
                formatter,
                "handshake without a secret proof, but a cluster secret is configured: configure the same secret on every process"
            ),
            NetError::SecretProofWrong => write!(
                formatter,
                "handshake with a wrong secret proof: configure the same secret on every process"
            ),
            NetError::UnexpectedSecretProof => write!(
                formatter,
                "handshake with a secret proof, but no cluster secret is configured here: configure the same secret on every process"
            ),
            NetError::BadControlMagic { found } => {
                if *found == crate::frame::FRAME_MAGIC {
                    write!(
                        formatter,
                        "the peer speaks the data-plane protocol, not the control protocol: the address is a data port, give the JobManager's control port"
                    )
                } else {
                    write!(
                        formatter,
                        "bad control frame magic {found:#010x} (expected {:#010x}): the peer is not a Strom control endpoint or the stream lost its framing",
                        crate::control::CONTROL_MAGIC
                    )
                }
            }
            NetError::MalformedControlFrame { reason } => {
                write!(formatter, "malformed control frame: {reason}")
            }
            NetError::FieldOutOfBounds {
                field,
                length,
                length_max,
            } => write!(
                formatter,
                "{field} has length {length}, more than its bound of {length_max}"
            ),
            NetError::Rejected { reason } => {
                write!(formatter, "the peer refused the connection: {reason}")
            }
            NetError::PeerClosed => write!(formatter, "the peer closed the connection"),
            NetError::LinkClosed => write!(formatter, "the link is closed"),
            NetError::Io { operation, source } => write!(formatter, "cannot {operation}: {source}"),
            NetError::Peer { peer, source } => write!(formatter, "peer {peer}: {source}"),
        }
    }
}

/// A link's error reaches every handle of the link (each sender, each
/// receiver, `closed`), so it is cloned; an io error is cloned as its kind
/// and message.
impl Clone for NetError {
    fn clone(&self) -> Self {
        match self {
            NetError::BadMagic { found } => NetError::BadMagic { found: *found },
            NetError::UnsupportedVersion { found, supported } => NetError::UnsupportedVersion {
                found: *found,
                supported: *supported,
            },
            NetError::OversizedFrame { length, length_max } => NetError::OversizedFrame {
                length: *length,
                length_max: *length_max,
            },
            NetError::ChecksumMismatch {
                channel,
                stored,
                computed,
            } => NetError::ChecksumMismatch {
                channel: *channel,
                stored: *stored,
                computed: *computed,
            },
            NetError::UnknownKind { kind } => NetError::UnknownKind { kind: *kind },
            NetError::MalformedPayload { kind, reason } => NetError::MalformedPayload {
                kind: *kind,
                reason: reason.clone(),
            },
            NetError::UnexpectedFrame { expected, found } => NetError::UnexpectedFrame {
                expected,
                found: *found,
            },
            NetError::CreditViolation { channel } => {
                NetError::CreditViolation { channel: *channel }
            }
            NetError::CreditOverflow { channel } => NetError::CreditOverflow { channel: *channel },
            NetError::TooManyChannels { channel_count_max } => NetError::TooManyChannels {
                channel_count_max: *channel_count_max,
            },
            NetError::ChannelInUse { channel } => NetError::ChannelInUse { channel: *channel },
            NetError::SecretProofMissing => NetError::SecretProofMissing,
            NetError::SecretProofWrong => NetError::SecretProofWrong,
            NetError::UnexpectedSecretProof => NetError::UnexpectedSecretProof,
            NetError::BadControlMagic { found } => NetError::BadControlMagic { found: *found },
            NetError::MalformedControlFrame { reason } => NetError::MalformedControlFrame {
                reason: reason.clone(),
            },
            NetError::FieldOutOfBounds {
                field,
                length,
                length_max,
            } => NetError::FieldOutOfBounds {
                field,
                length: *length,
                length_max: *length_max,
            },
            NetError::Rejected { reason } => NetError::Rejected {
                reason: reason.clone(),
            },
            NetError::PeerClosed => NetError::PeerClosed,
            NetError::LinkClosed => NetError::LinkClosed,
            NetError::Io { operation, source } => NetError::Io {
                operation,
                source: io::Error::new(source.kind(), source.to_string()),
            },
            NetError::Peer { peer, source } => NetError::Peer {
                peer: *peer,
                source: source.clone(),
            },
        }
    }
}

impl std::error::Error for NetError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            NetError::Io { source, .. } => Some(source),
            NetError::Peer { source, .. } => Some(source.as_ref()),
            _ => None,
        }
    }
}
