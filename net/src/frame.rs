//! The wire frame between processes.
//!
//! Every message on a link is one frame: a fixed 20-byte header followed by
//! `length` payload bytes. All integers are little-endian and fixed width.
//!
//! ```text
//! offset  size  field
//!      0     4  magic     u32  FRAME_MAGIC, the bytes "STRM"
//!      4     2  version   u16  FRAME_VERSION
//!      6     2  kind      u16  FrameKind: 1 Hello, 2 Data, 3 Credit, 4 Close
//!      8     4  channel   u32  the channel of a Data or Credit frame, else 0
//!     12     4  length    u32  payload bytes that follow, <= FRAME_PAYLOAD_MAX
//!     16     4  crc32     u32  crc32 (IEEE) of the payload bytes
//!     20     -  payload   `length` bytes
//! ```
//!
//! Payloads by kind:
//!
//! ```text
//! Hello   0  peer_id u64 | 8  nonce [u8; 16] | 24  has_proof u8 (0 or 1)
//!         | 25  proof [u8; 32] if has_proof                    (25 or 57 bytes)
//! Data    0  element tag u8, then by tag:
//!           0 Records     the rkyv bytes as they are            (1 + n bytes)
//!           1 Watermark   1  timestamp i64                      (9 bytes)
//!           2 Idle        1  idle u8 (0 or 1)                   (2 bytes)
//!           3 Barrier     1  checkpoint_id u64 | 9  timestamp_ms u64
//!                         | 17  is_savepoint u8 (0 or 1) | 18  path_length u16
//!                         | 20  target path, UTF-8, <= BARRIER_PATH_LENGTH_MAX
//!           4 EndOfInput  nothing                               (1 byte)
//! Credit  0  credit_count u32, at least 1                       (4 bytes)
//! Close   0  reason, UTF-8, <= CLOSE_REASON_LENGTH_MAX bytes
//! ```
//!
//! The decoder checks the header (magic, version, kind, length within
//! [`FRAME_PAYLOAD_MAX`] and within the bounds of the kind and element tag)
//! before it allocates anything for the payload, checks the crc32 once the
//! payload is complete, and only then decodes it, returning a [`NetError`]
//! for anything out of place, never panicking. A records payload is handed
//! over as an [`AlignedVec`] without being read: the consumer validates it
//! with rkyv before it reads a record.

use std::path::PathBuf;
use std::sync::Arc;

use rkyv::util::AlignedVec;
use strom_core::record::StreamElement;
use strom_core::snapshot::CheckpointBarrier;

use crate::error::NetError;

/// The first four bytes of every frame: "STRM".
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"STRM");
/// The protocol version this process speaks; peers must speak the same.
pub const FRAME_VERSION: u16 = 1;
/// Bytes in a frame header.
pub const FRAME_HEADER_SIZE: usize = 20;
/// The largest payload a frame may carry. Bounds the memory one frame of a
/// peer can make this process allocate; a records buffer must fit in it
/// (with its one tag byte).
pub const FRAME_PAYLOAD_MAX: u32 = 4 * 1024 * 1024;
/// The longest checkpoint target path a barrier may carry, in bytes.
pub const BARRIER_PATH_LENGTH_MAX: usize = 4096;
/// The longest reason a Close frame carries, in bytes; longer reasons are
/// cut on encoding.
pub const CLOSE_REASON_LENGTH_MAX: usize = 1024;
/// Bytes of the random challenge in a Hello frame.
pub const HELLO_NONCE_SIZE: usize = 16;
/// Bytes of the secret proof (an HMAC-SHA256) in a Hello frame.
pub const HELLO_PROOF_SIZE: usize = 32;

const HELLO_PAYLOAD_SIZE_WITHOUT_PROOF: usize = 8 + HELLO_NONCE_SIZE + 1;
const HELLO_PAYLOAD_SIZE_WITH_PROOF: usize = HELLO_PAYLOAD_SIZE_WITHOUT_PROOF + HELLO_PROOF_SIZE;
const CREDIT_PAYLOAD_SIZE: usize = 4;
const BARRIER_FIXED_SIZE: usize = 8 + 8 + 1 + 2;

const TAG_RECORDS: u8 = 0;
const TAG_WATERMARK: u8 = 1;
const TAG_IDLE: u8 = 2;
const TAG_BARRIER: u8 = 3;
const TAG_END_OF_INPUT: u8 = 4;

const _: () = assert!(FRAME_HEADER_SIZE == 4 + 2 + 2 + 4 + 4 + 4);
const _: () = assert!(BARRIER_PATH_LENGTH_MAX <= u16::MAX as usize);
const _: () =
    assert!(1 + BARRIER_FIXED_SIZE + BARRIER_PATH_LENGTH_MAX <= FRAME_PAYLOAD_MAX as usize);
const _: () = assert!(CLOSE_REASON_LENGTH_MAX <= FRAME_PAYLOAD_MAX as usize);

/// What a frame carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum FrameKind {
    /// Handshake: who the sender is and, with a cluster secret, its proof.
    Hello = 1,
    /// One stream element for a channel.
    Data = 2,
    /// The receiver of a channel grants the sender more buffers.
    Credit = 3,
    /// The sender closes the link (with a reason).
    Close = 4,
}

impl FrameKind {
    /// The kind with wire value `value`.
    pub fn from_u16(value: u16) -> Result<FrameKind, NetError> {
        match value {
            1 => Ok(FrameKind::Hello),
            2 => Ok(FrameKind::Data),
            3 => Ok(FrameKind::Credit),
            4 => Ok(FrameKind::Close),
            kind => Err(NetError::UnknownKind { kind }),
        }
    }
}

/// A decoded and checked frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub channel: u32,
    pub length: u32,
    pub checksum: u32,
}

impl FrameHeader {
    /// The header's wire bytes.
    pub fn encode(&self) -> [u8; FRAME_HEADER_SIZE] {
        let mut bytes = [0; FRAME_HEADER_SIZE];
        bytes[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes[4..6].copy_from_slice(&FRAME_VERSION.to_le_bytes());
        bytes[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        bytes[8..12].copy_from_slice(&self.channel.to_le_bytes());
        bytes[12..16].copy_from_slice(&self.length.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.checksum.to_le_bytes());
        bytes
    }

    /// Decodes and checks a header: magic, version, kind, and the payload
    /// length against [`FRAME_PAYLOAD_MAX`] and the bounds of the kind.
    pub fn decode(bytes: &[u8; FRAME_HEADER_SIZE]) -> Result<FrameHeader, NetError> {
        let magic = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        if magic != FRAME_MAGIC {
            return Err(NetError::BadMagic { found: magic });
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != FRAME_VERSION {
            return Err(NetError::UnsupportedVersion {
                found: version,
                supported: FRAME_VERSION,
            });
        }
        let kind = FrameKind::from_u16(u16::from_le_bytes([bytes[6], bytes[7]]))?;
        let channel = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        let length = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        let checksum = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
        if length > FRAME_PAYLOAD_MAX {
            return Err(NetError::OversizedFrame {
                length: u64::from(length),
                length_max: FRAME_PAYLOAD_MAX,
            });
        }
        let header = FrameHeader {
            kind,
            channel,
            length,
            checksum,
        };
        header.check_kind_bounds()?;
        Ok(header)
    }

    fn check_kind_bounds(&self) -> Result<(), NetError> {
        let length = self.length as usize;
        let malformed = |reason: String| {
            Err(NetError::MalformedPayload {
                kind: self.kind,
                reason,
            })
        };
        if matches!(self.kind, FrameKind::Hello | FrameKind::Close) && self.channel != 0 {
            return malformed(format!(
                "channel field is {} but must be 0 for this kind",
                self.channel
            ));
        }
        match self.kind {
            FrameKind::Hello => {
                if length != HELLO_PAYLOAD_SIZE_WITHOUT_PROOF
                    && length != HELLO_PAYLOAD_SIZE_WITH_PROOF
                {
                    return malformed(format!(
                        "length {length}, expected {HELLO_PAYLOAD_SIZE_WITHOUT_PROOF} or {HELLO_PAYLOAD_SIZE_WITH_PROOF}"
                    ));
                }
            }
            FrameKind::Data => {
                if length == 0 {
                    return malformed("empty payload, expected an element tag".to_string());
                }
            }
            FrameKind::Credit => {
                if length != CREDIT_PAYLOAD_SIZE {
                    return malformed(format!("length {length}, expected {CREDIT_PAYLOAD_SIZE}"));
                }
            }
            FrameKind::Close => {
                if length > CLOSE_REASON_LENGTH_MAX {
                    return malformed(format!(
                        "reason of {length} bytes exceeds {CLOSE_REASON_LENGTH_MAX}"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The handshake message (see [`crate::link`] for the protocol).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    /// The sender's process id in the cluster.
    pub peer_id: u64,
    /// The sender's random challenge for the other side.
    pub nonce: [u8; HELLO_NONCE_SIZE],
    /// The sender's proof that it knows the cluster secret, if it has one.
    pub proof: Option<[u8; HELLO_PROOF_SIZE]>,
}

/// One decoded frame.
#[derive(Debug)]
pub enum Frame {
    Hello(Hello),
    Data {
        channel: u32,
        element: StreamElement,
    },
    Credit {
        channel: u32,
        credit_count: u32,
    },
    Close {
        reason: String,
    },
}

impl Frame {
    /// The kind of this frame.
    pub fn kind(&self) -> FrameKind {
        match self {
            Frame::Hello(_) => FrameKind::Hello,
            Frame::Data { .. } => FrameKind::Data,
            Frame::Credit { .. } => FrameKind::Credit,
            Frame::Close { .. } => FrameKind::Close,
        }
    }
}

/// Appends the frame's wire bytes (header and payload) to `out`. On error
/// `out` is left as it was.
pub fn encode_frame(frame: &Frame, out: &mut Vec<u8>) -> Result<(), NetError> {
    match frame {
        Frame::Hello(hello) => {
            encode_hello(hello, out);
            Ok(())
        }
        Frame::Data { channel, element } => encode_data(*channel, element, out),
        Frame::Credit {
            channel,
            credit_count,
        } => {
            encode_credit(*channel, *credit_count, out);
            Ok(())
        }
        Frame::Close { reason } => {
            encode_close(reason, out);
            Ok(())
        }
    }
}

/// Appends a Hello frame to `out`.
pub fn encode_hello(hello: &Hello, out: &mut Vec<u8>) {
    encode_with(FrameKind::Hello, 0, out, |payload| {
        payload.extend_from_slice(&hello.peer_id.to_le_bytes());
        payload.extend_from_slice(&hello.nonce);
        match &hello.proof {
            Some(proof) => {
                payload.push(1);
                payload.extend_from_slice(proof);
            }
            None => payload.push(0),
        }
        Ok(())
    })
    .expect("a Hello frame always fits");
}

/// Appends a Credit frame granting `credit_count` (at least 1) buffers on
/// `channel` to `out`.
pub fn encode_credit(channel: u32, credit_count: u32, out: &mut Vec<u8>) {
    assert!(credit_count > 0, "a credit grant of zero is never sent");
    encode_with(FrameKind::Credit, channel, out, |payload| {
        payload.extend_from_slice(&credit_count.to_le_bytes());
        Ok(())
    })
    .expect("a Credit frame always fits");
}

/// Appends a Close frame to `out`, cutting `reason` to
/// [`CLOSE_REASON_LENGTH_MAX`] bytes at a character boundary.
pub fn encode_close(reason: &str, out: &mut Vec<u8>) {
    let mut end = reason.len().min(CLOSE_REASON_LENGTH_MAX);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    encode_with(FrameKind::Close, 0, out, |payload| {
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        Ok(())
    })
    .expect("a Close frame always fits");
}

/// Appends a Data frame carrying `element` on `channel` to `out`. Fails
/// (leaving `out` as it was) for a records buffer larger than a frame or a
/// barrier whose target path is not UTF-8 or too long.
pub fn encode_data(
    channel: u32,
    element: &StreamElement,
    out: &mut Vec<u8>,
) -> Result<(), NetError> {
    encode_with(FrameKind::Data, channel, out, |payload| {
        encode_element(element, payload)
    })
}

/// The payload length of a Data frame carrying `element`, or why it cannot
/// be sent: a records buffer larger than a frame, or a barrier whose target
/// path is not UTF-8 or longer than [`BARRIER_PATH_LENGTH_MAX`]. A link
/// checks this when an element is handed to it, so that the error reaches
/// the producer and not the connection.
pub fn data_payload_length(element: &StreamElement) -> Result<usize, NetError> {
    let length = match element {
        StreamElement::Records(bytes) => {
            let length = 1 + bytes.len() as u64;
            if length > u64::from(FRAME_PAYLOAD_MAX) {
                return Err(NetError::OversizedFrame {
                    length,
                    length_max: FRAME_PAYLOAD_MAX,
                });
            }
            length as usize
        }
        StreamElement::Watermark(_) => 1 + 8,
        StreamElement::Idle(_) => 1 + 1,
        StreamElement::Barrier(barrier) => {
            let malformed = |reason: String| NetError::MalformedPayload {
                kind: FrameKind::Data,
                reason,
            };
            let path = barrier.target.to_str().ok_or_else(|| {
                malformed(format!(
                    "barrier target path {} is not UTF-8",
                    barrier.target.display()
                ))
            })?;
            if path.len() > BARRIER_PATH_LENGTH_MAX {
                return Err(malformed(format!(
                    "barrier target path of {} bytes exceeds {BARRIER_PATH_LENGTH_MAX}",
                    path.len()
                )));
            }
            1 + BARRIER_FIXED_SIZE + path.len()
        }
        StreamElement::EndOfInput => 1,
        // Made only for a consumer of the same slot, never for a link.
        StreamElement::Local(records) => {
            return Err(NetError::MalformedPayload {
                kind: FrameKind::Data,
                reason: format!(
                    "{} records handed over within a slot cannot be sent over a link",
                    records.count()
                ),
            })
        }
    };
    Ok(length)
}

fn encode_element(element: &StreamElement, payload: &mut Vec<u8>) -> Result<(), NetError> {
    let length = data_payload_length(element)?;
    let start = payload.len();
    payload.reserve(length);
    match element {
        StreamElement::Records(bytes) => {
            payload.push(TAG_RECORDS);
            payload.extend_from_slice(bytes);
        }
        StreamElement::Watermark(timestamp) => {
            payload.push(TAG_WATERMARK);
            payload.extend_from_slice(&timestamp.to_le_bytes());
        }
        StreamElement::Idle(idle) => {
            payload.push(TAG_IDLE);
            payload.push(u8::from(*idle));
        }
        StreamElement::Barrier(barrier) => {
            // UTF-8 and bounded: checked by `data_payload_length`.
            let path = barrier.target.to_str().unwrap_or_default();
            payload.push(TAG_BARRIER);
            payload.extend_from_slice(&barrier.checkpoint_id.to_le_bytes());
            payload.extend_from_slice(&barrier.timestamp_ms.to_le_bytes());
            payload.push(u8::from(barrier.is_savepoint));
            payload.extend_from_slice(&(path.len() as u16).to_le_bytes());
            payload.extend_from_slice(path.as_bytes());
        }
        StreamElement::EndOfInput => payload.push(TAG_END_OF_INPUT),
        StreamElement::Local(_) => unreachable!("refused by data_payload_length"),
    }
    assert_eq!(payload.len() - start, length, "data payload length");
    Ok(())
}

/// Reserves a header in `out`, lets `write_payload` append the payload,
/// then fills in the header with the payload's length and crc32.
fn encode_with(
    kind: FrameKind,
    channel: u32,
    out: &mut Vec<u8>,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), NetError>,
) -> Result<(), NetError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_SIZE]);
    if let Err(error) = write_payload(out) {
        out.truncate(start);
        return Err(error);
    }
    let payload = &out[start + FRAME_HEADER_SIZE..];
    let length = payload.len() as u64;
    if length > u64::from(FRAME_PAYLOAD_MAX) {
        out.truncate(start);
        return Err(NetError::OversizedFrame {
            length,
            length_max: FRAME_PAYLOAD_MAX,
        });
    }
    let header = FrameHeader {
        kind,
        channel,
        length: length as u32,
        checksum: crc32fast::hash(payload),
    };
    // The encoder must produce what the decoder accepts.
    debug_assert!(header.check_kind_bounds().is_ok());
    out[start..start + FRAME_HEADER_SIZE].copy_from_slice(&header.encode());
    Ok(())
}

/// Decodes a complete, checksummed payload of a frame with `header`.
/// For a Data frame, `tag` is its first byte and `body` the rest.
fn decode_payload(header: &FrameHeader, tag: u8, body: AlignedVec) -> Result<Frame, NetError> {
    let malformed = |reason: String| NetError::MalformedPayload {
        kind: header.kind,
        reason,
    };
    match header.kind {
        FrameKind::Hello => {
            // The length is one of the two Hello sizes (checked in the header).
            let mut nonce = [0; HELLO_NONCE_SIZE];
            nonce.copy_from_slice(&body[8..8 + HELLO_NONCE_SIZE]);
            let has_proof = body[HELLO_PAYLOAD_SIZE_WITHOUT_PROOF - 1];
            let proof = match (has_proof, body.len()) {
                (0, HELLO_PAYLOAD_SIZE_WITHOUT_PROOF) => None,
                (1, HELLO_PAYLOAD_SIZE_WITH_PROOF) => {
                    let mut proof = [0; HELLO_PROOF_SIZE];
                    proof.copy_from_slice(&body[HELLO_PAYLOAD_SIZE_WITHOUT_PROOF..]);
                    Some(proof)
                }
                (flag, length) => {
                    return Err(malformed(format!(
                        "proof flag {flag} does not match payload length {length}"
                    )))
                }
            };
            Ok(Frame::Hello(Hello {
                peer_id: read_u64(&body[0..8]),
                nonce,
                proof,
            }))
        }
        FrameKind::Credit => {
            let credit_count = u32::from_le_bytes([body[0], body[1], body[2], body[3]]);
            if credit_count == 0 {
                return Err(malformed("a credit grant of zero".to_string()));
            }
            Ok(Frame::Credit {
                channel: header.channel,
                credit_count,
            })
        }
        FrameKind::Close => match String::from_utf8(body.to_vec()) {
            Ok(reason) => Ok(Frame::Close { reason }),
            Err(_) => Err(malformed("reason is not UTF-8".to_string())),
        },
        FrameKind::Data => {
            let element = match tag {
                TAG_RECORDS => StreamElement::Records(body),
                TAG_WATERMARK => StreamElement::Watermark(read_u64(&body) as i64),
                TAG_IDLE => match body[0] {
                    0 => StreamElement::Idle(false),
                    1 => StreamElement::Idle(true),
                    flag => return Err(malformed(format!("idle flag {flag}, expected 0 or 1"))),
                },
                TAG_BARRIER => {
                    let is_savepoint = match body[16] {
                        0 => false,
                        1 => true,
                        flag => {
                            return Err(malformed(format!(
                                "barrier savepoint flag {flag}, expected 0 or 1"
                            )))
                        }
                    };
                    let path_length = usize::from(u16::from_le_bytes([body[17], body[18]]));
                    let path = &body[BARRIER_FIXED_SIZE..];
                    if path_length != path.len() {
                        return Err(malformed(format!(
                            "barrier path length {path_length}, but {} bytes follow",
                            path.len()
                        )));
                    }
                    let path = std::str::from_utf8(path)
                        .map_err(|_| malformed("barrier target path is not UTF-8".to_string()))?;
                    StreamElement::Barrier(CheckpointBarrier {
                        checkpoint_id: read_u64(&body[0..8]),
                        timestamp_ms: read_u64(&body[8..16]),
                        target: Arc::new(PathBuf::from(path)),
                        is_savepoint,
                    })
                }
                TAG_END_OF_INPUT => StreamElement::EndOfInput,
                // Unknown tags are refused as soon as the tag arrives.
                tag => return Err(malformed(format!("unknown element tag {tag}"))),
            };
            Ok(Frame::Data {
                channel: header.channel,
                element,
            })
        }
    }
}

/// The bounds on the length of the body after element tag `tag`, or why
/// `body_length` is out of them.
fn check_element_body(tag: u8, body_length: usize) -> Result<(), String> {
    let fits = match tag {
        TAG_RECORDS => true,
        TAG_WATERMARK => body_length == 8,
        TAG_IDLE => body_length == 1,
        TAG_BARRIER => (BARRIER_FIXED_SIZE..=BARRIER_FIXED_SIZE + BARRIER_PATH_LENGTH_MAX)
            .contains(&body_length),
        TAG_END_OF_INPUT => body_length == 0,
        tag => return Err(format!("unknown element tag {tag}")),
    };
    if fits {
        Ok(())
    } else {
        Err(format!(
            "element tag {tag} with a body of {body_length} bytes"
        ))
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut array = [0; 8];
    array.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(array)
}

/// Turns a byte stream into frames, whatever pieces the stream arrives in.
///
/// Feed it with [`FrameDecoder::decode`] until the input is used up:
///
/// ```text
/// let mut input = &bytes_read[..];
/// while !input.is_empty() {
///     let (consumed, frame) = decoder.decode(input)?;
///     input = &input[consumed..];
///     if let Some(frame) = frame { handle(frame) }
/// }
/// ```
///
/// Memory is bounded by one frame: the payload buffer is allocated once the
/// header is checked, at the size the header announces. After an error the
/// byte stream has lost its framing; the connection must be dropped.
#[derive(Debug)]
pub struct FrameDecoder {
    state: DecoderState,
}

#[derive(Debug)]
enum DecoderState {
    Header {
        bytes: [u8; FRAME_HEADER_SIZE],
        filled: usize,
    },
    Payload {
        header: FrameHeader,
        hasher: crc32fast::Hasher,
        /// The element tag of a Data frame, once read.
        tag: Option<u8>,
        body: AlignedVec,
        /// Payload bytes still to come.
        remaining: usize,
    },
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder {
            state: DecoderState::Header {
                bytes: [0; FRAME_HEADER_SIZE],
                filled: 0,
            },
        }
    }

    /// Whether the decoder sits between frames (has no partial frame).
    pub fn is_between_frames(&self) -> bool {
        matches!(self.state, DecoderState::Header { filled: 0, .. })
    }

    /// Consumes bytes from `input` up to the end of at most one frame and
    /// returns how many it consumed and the frame, if one completed.
    /// Consumes all of `input` when no frame completes in it.
    pub fn decode(&mut self, input: &[u8]) -> Result<(usize, Option<Frame>), NetError> {
        let mut consumed = 0;
        loop {
            match &mut self.state {
                DecoderState::Header { bytes, filled } => {
                    let take = (FRAME_HEADER_SIZE - *filled).min(input.len() - consumed);
                    bytes[*filled..*filled + take]
                        .copy_from_slice(&input[consumed..consumed + take]);
                    *filled += take;
                    consumed += take;
                    if *filled < FRAME_HEADER_SIZE {
                        return Ok((consumed, None));
                    }
                    let header = FrameHeader::decode(bytes);
                    self.state = DecoderState::Header {
                        bytes: [0; FRAME_HEADER_SIZE],
                        filled: 0,
                    };
                    let header = header?;
                    let length = header.length as usize;
                    // A Data frame's body is allocated once its tag is known.
                    let body = if header.kind == FrameKind::Data {
                        AlignedVec::new()
                    } else {
                        AlignedVec::with_capacity(length)
                    };
                    self.state = DecoderState::Payload {
                        header,
                        hasher: crc32fast::Hasher::new(),
                        tag: None,
                        body,
                        remaining: length,
                    };
                }
                DecoderState::Payload {
                    header,
                    hasher,
                    tag,
                    body,
                    remaining,
                } => {
                    if header.kind == FrameKind::Data && tag.is_none() && *remaining > 0 {
                        let Some(&first) = input.get(consumed) else {
                            return Ok((consumed, None));
                        };
                        consumed += 1;
                        *remaining -= 1;
                        hasher.update(&[first]);
                        if let Err(reason) = check_element_body(first, *remaining) {
                            let kind = header.kind;
                            self.reset();
                            return Err(NetError::MalformedPayload { kind, reason });
                        }
                        *tag = Some(first);
                        *body = AlignedVec::with_capacity(*remaining);
                    }
                    let take = (*remaining).min(input.len() - consumed);
                    let piece = &input[consumed..consumed + take];
                    hasher.update(piece);
                    body.extend_from_slice(piece);
                    consumed += take;
                    *remaining -= take;
                    if *remaining > 0 {
                        return Ok((consumed, None));
                    }
                    let DecoderState::Payload {
                        header,
                        hasher,
                        tag,
                        body,
                        ..
                    } = std::mem::replace(
                        &mut self.state,
                        DecoderState::Header {
                            bytes: [0; FRAME_HEADER_SIZE],
                            filled: 0,
                        },
                    )
                    else {
                        unreachable!("the decoder is in its payload state");
                    };
                    let computed = hasher.finalize();
                    if computed != header.checksum {
                        return Err(NetError::ChecksumMismatch {
                            channel: header.channel,
                            stored: header.checksum,
                            computed,
                        });
                    }
                    let frame = decode_payload(&header, tag.unwrap_or(0), body)?;
                    return Ok((consumed, Some(frame)));
                }
            }
        }
    }

    fn reset(&mut self) {
        *self = FrameDecoder::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn barrier(path: &str) -> StreamElement {
        StreamElement::Barrier(CheckpointBarrier {
            checkpoint_id: 42,
            timestamp_ms: 1_700_000_000_000,
            target: Arc::new(PathBuf::from(path)),
            is_savepoint: true,
        })
    }

    fn records(bytes: &[u8]) -> StreamElement {
        let mut aligned = AlignedVec::new();
        aligned.extend_from_slice(bytes);
        StreamElement::Records(aligned)
    }

    fn every_element() -> Vec<StreamElement> {
        vec![
            records(b"some archived records"),
            records(b""),
            StreamElement::Watermark(-5),
            StreamElement::Watermark(i64::MAX),
            StreamElement::Idle(true),
            StreamElement::Idle(false),
            barrier("/tmp/checkpoints/chk-42"),
            StreamElement::EndOfInput,
        ]
    }

    /// Compares elements by their encoding (StreamElement has no PartialEq).
    fn same_element(left: &StreamElement, right: &StreamElement) -> bool {
        let mut left_bytes = Vec::new();
        let mut right_bytes = Vec::new();
        encode_data(0, left, &mut left_bytes).unwrap();
        encode_data(0, right, &mut right_bytes).unwrap();
        left_bytes == right_bytes
    }

    fn decode_all(decoder: &mut FrameDecoder, mut input: &[u8]) -> Result<Vec<Frame>, NetError> {
        let mut frames = Vec::new();
        while !input.is_empty() {
            let (consumed, frame) = decoder.decode(input)?;
            assert!(consumed > 0 || input.is_empty());
            input = &input[consumed..];
            frames.extend(frame);
        }
        Ok(frames)
    }

    fn all_frames() -> (Vec<u8>, usize) {
        let mut bytes = Vec::new();
        encode_hello(
            &Hello {
                peer_id: 7,
                nonce: [3; HELLO_NONCE_SIZE],
                proof: Some([9; HELLO_PROOF_SIZE]),
            },
            &mut bytes,
        );
        encode_hello(
            &Hello {
                peer_id: u64::MAX,
                nonce: [0; HELLO_NONCE_SIZE],
                proof: None,
            },
            &mut bytes,
        );
        let elements = every_element();
        for (index, element) in elements.iter().enumerate() {
            encode_data(index as u32 + 1, element, &mut bytes).unwrap();
        }
        encode_credit(5, 16, &mut bytes);
        encode_close("bye", &mut bytes);
        (bytes, 2 + elements.len() + 2)
    }

    fn check_all_frames(frames: &[Frame]) {
        let elements = every_element();
        assert!(matches!(
            &frames[0],
            Frame::Hello(Hello { peer_id: 7, proof: Some(proof), .. }) if proof == &[9; HELLO_PROOF_SIZE]
        ));
        assert!(matches!(
            &frames[1],
            Frame::Hello(Hello {
                peer_id: u64::MAX,
                proof: None,
                ..
            })
        ));
        for (index, expected) in elements.iter().enumerate() {
            match &frames[2 + index] {
                Frame::Data { channel, element } => {
                    assert_eq!(*channel, index as u32 + 1);
                    assert!(
                        same_element(element, expected),
                        "{element:?} != {expected:?}"
                    );
                }
                other => panic!("expected data, got {other:?}"),
            }
        }
        assert!(matches!(
            frames[2 + elements.len()],
            Frame::Credit {
                channel: 5,
                credit_count: 16
            }
        ));
        assert!(matches!(&frames[3 + elements.len()], Frame::Close { reason } if reason == "bye"));
    }

    /// Records handed over within a slot are never framed: a link
    /// refuses them with an error that says so, and writes nothing.
    #[test]
    fn records_handed_over_within_a_slot_are_refused_by_a_link() {
        let mut records = vec![strom_core::record::StreamRecord {
            timestamp: 1,
            value: 5u64,
        }];
        let local = StreamElement::Local(strom_core::record::LocalRecords::take(
            &mut records,
            Box::default(),
        ));
        let error = data_payload_length(&local).unwrap_err().to_string();
        assert!(error.contains("within a slot"), "{error}");
        let mut bytes = Vec::new();
        assert!(encode_data(9, &local, &mut bytes).is_err());
        assert!(bytes.is_empty());
    }

    #[test]
    fn every_frame_round_trips_in_one_piece() {
        let (bytes, frame_count) = all_frames();
        let mut decoder = FrameDecoder::new();
        let frames = decode_all(&mut decoder, &bytes).unwrap();
        assert_eq!(frames.len(), frame_count);
        check_all_frames(&frames);
        assert!(decoder.is_between_frames());
    }

    #[test]
    fn truncated_input_fed_byte_by_byte_yields_frames_only_when_complete() {
        let (bytes, frame_count) = all_frames();
        let mut decoder = FrameDecoder::new();
        let mut frames = Vec::new();
        for (index, byte) in bytes.iter().enumerate() {
            let (consumed, frame) = decoder.decode(std::slice::from_ref(byte)).unwrap();
            assert_eq!(consumed, 1, "byte {index}");
            frames.extend(frame);
        }
        assert_eq!(frames.len(), frame_count);
        check_all_frames(&frames);

        // A stream cut anywhere yields the frames before the cut, and none
        // of the cut one.
        let (bytes, _) = all_frames();
        let mut first = Vec::new();
        encode_data(1, &records(b"0123456789"), &mut first).unwrap();
        for cut in 0..first.len() {
            let mut decoder = FrameDecoder::new();
            let frames = decode_all(&mut decoder, &first[..cut]).unwrap();
            assert!(frames.is_empty(), "cut at {cut}");
            assert_eq!(decoder.is_between_frames(), cut == 0);
        }
        let mut decoder = FrameDecoder::new();
        assert_eq!(
            decode_all(&mut decoder, &bytes[..bytes.len() - 1])
                .unwrap()
                .len(),
            frame_count - 1
        );
    }

    #[test]
    fn decode_consumes_at_most_one_frame() {
        let (bytes, _) = all_frames();
        let mut decoder = FrameDecoder::new();
        let (consumed, frame) = decoder.decode(&bytes).unwrap();
        assert!(frame.is_some());
        assert_eq!(consumed, FRAME_HEADER_SIZE + HELLO_PAYLOAD_SIZE_WITH_PROOF);
    }

    #[test]
    fn records_arrive_aligned() {
        let mut bytes = vec![0xAB]; // misalign the frame in the input
        encode_data(3, &records(&[1; 100]), &mut bytes).unwrap();
        let mut decoder = FrameDecoder::new();
        let frames = decode_all(&mut decoder, &bytes[1..]).unwrap();
        match &frames[0] {
            Frame::Data {
                element: StreamElement::Records(aligned),
                ..
            } => {
                assert_eq!(aligned.as_ptr() as usize % AlignedVec::<16>::ALIGNMENT, 0);
                assert_eq!(&aligned[..], &[1; 100][..]);
            }
            other => panic!("expected records, got {other:?}"),
        }
    }

    fn header_bytes(magic: u32, version: u16, kind: u16, channel: u32, length: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&magic.to_le_bytes());
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&channel.to_le_bytes());
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes
    }

    fn decode_error(bytes: &[u8]) -> NetError {
        let mut decoder = FrameDecoder::new();
        match decode_all(&mut decoder, bytes) {
            Ok(frames) => panic!("expected an error, decoded {frames:?}"),
            Err(error) => error,
        }
    }

    #[test]
    fn header_errors_name_what_is_wrong() {
        assert!(matches!(
            decode_error(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            NetError::BadMagic { found } if found == u32::from_le_bytes(*b"GET ")
        ));
        assert!(matches!(
            decode_error(&header_bytes(FRAME_MAGIC, 2, 2, 0, 1)),
            NetError::UnsupportedVersion {
                found: 2,
                supported: FRAME_VERSION
            }
        ));
        assert!(matches!(
            decode_error(&header_bytes(FRAME_MAGIC, FRAME_VERSION, 99, 0, 1)),
            NetError::UnknownKind { kind: 99 }
        ));
        let error = decode_error(&header_bytes(FRAME_MAGIC, FRAME_VERSION, 2, 0, u32::MAX));
        assert!(matches!(
            error,
            NetError::OversizedFrame {
                length: 4_294_967_295,
                length_max: FRAME_PAYLOAD_MAX
            }
        ));
        assert!(error.to_string().contains("4294967295"), "{error}");
        assert!(error.to_string().contains("4194304"), "{error}");
        assert!(matches!(
            decode_error(&header_bytes(FRAME_MAGIC, FRAME_VERSION, 3, 0, 5)),
            NetError::MalformedPayload {
                kind: FrameKind::Credit,
                ..
            }
        ));
        assert!(matches!(
            decode_error(&header_bytes(FRAME_MAGIC, FRAME_VERSION, 1, 4, 25)),
            NetError::MalformedPayload {
                kind: FrameKind::Hello,
                ..
            }
        ));
    }

    #[test]
    fn oversized_length_is_refused_from_the_header_alone() {
        // Only the header arrives: the error comes before any payload, so
        // nothing of the announced size was allocated.
        let header = header_bytes(FRAME_MAGIC, FRAME_VERSION, 2, 1, FRAME_PAYLOAD_MAX + 1);
        let mut decoder = FrameDecoder::new();
        assert!(matches!(
            decoder.decode(&header),
            Err(NetError::OversizedFrame { length, .. }) if length == u64::from(FRAME_PAYLOAD_MAX) + 1
        ));
        // A maximal, legal length is accepted (the payload just is not there yet).
        let header = header_bytes(FRAME_MAGIC, FRAME_VERSION, 2, 1, FRAME_PAYLOAD_MAX);
        assert!(matches!(
            FrameDecoder::new().decode(&header),
            Ok((FRAME_HEADER_SIZE, None))
        ));
    }

    #[test]
    fn checksum_mismatch_reports_both_sums() {
        let mut bytes = Vec::new();
        encode_data(9, &StreamElement::Watermark(1), &mut bytes).unwrap();
        let stored = u32::from_le_bytes(bytes[16..20].try_into().unwrap());
        *bytes.last_mut().unwrap() ^= 0x40;
        let computed = crc32fast::hash(&bytes[FRAME_HEADER_SIZE..]);
        assert!(matches!(
            decode_error(&bytes),
            NetError::ChecksumMismatch { channel: 9, stored: s, computed: c } if s == stored && c == computed
        ));
    }

    /// A frame with a correct header and checksum around `payload`.
    fn frame_with_payload(kind: FrameKind, channel: u32, payload: &[u8]) -> Vec<u8> {
        let mut bytes = FrameHeader {
            kind,
            channel,
            length: payload.len() as u32,
            checksum: crc32fast::hash(payload),
        }
        .encode()
        .to_vec();
        bytes.extend_from_slice(payload);
        bytes
    }

    #[test]
    fn malformed_payloads_are_errors_not_panics() {
        let cases: Vec<(FrameKind, Vec<u8>)> = vec![
            (FrameKind::Data, vec![TAG_WATERMARK, 1, 2, 3]),
            (FrameKind::Data, vec![TAG_IDLE, 2]),
            (FrameKind::Data, vec![TAG_IDLE]),
            (FrameKind::Data, vec![TAG_END_OF_INPUT, 0]),
            (FrameKind::Data, vec![77, 0, 0]),
            (FrameKind::Data, vec![TAG_BARRIER, 1, 2]),
            (FrameKind::Credit, vec![0, 0, 0, 0]),
            (FrameKind::Close, vec![0xFF, 0xFE]),
            (FrameKind::Hello, {
                let mut payload = vec![0; HELLO_PAYLOAD_SIZE_WITHOUT_PROOF];
                payload[HELLO_PAYLOAD_SIZE_WITHOUT_PROOF - 1] = 1; // proof flag, no proof
                payload
            }),
        ];
        for (kind, payload) in cases {
            let error = decode_error(&frame_with_payload(kind, 0, &payload));
            assert!(
                matches!(error, NetError::MalformedPayload { kind: found, .. } if found == kind),
                "{kind:?} {payload:?}: {error}"
            );
        }
        // Barriers: bad flag, length disagreeing with the bytes, bad UTF-8.
        let mut good = Vec::new();
        encode_data(0, &barrier("/a/b"), &mut good).unwrap();
        let payload = good[FRAME_HEADER_SIZE..].to_vec();
        let mut bad_flag = payload.clone();
        bad_flag[17] = 2;
        let mut bad_length = payload.clone();
        bad_length[18] = 3;
        let mut bad_utf8 = payload.clone();
        bad_utf8[20] = 0xFF;
        for payload in [bad_flag, bad_length, bad_utf8] {
            let error = decode_error(&frame_with_payload(FrameKind::Data, 0, &payload));
            assert!(
                matches!(error, NetError::MalformedPayload { .. }),
                "{error}"
            );
        }
    }

    #[test]
    fn encoder_refuses_what_the_decoder_would() {
        let mut out = vec![1, 2, 3];
        let huge = records(&vec![0; FRAME_PAYLOAD_MAX as usize]);
        assert!(matches!(
            encode_data(1, &huge, &mut out),
            Err(NetError::OversizedFrame { length, .. }) if length == u64::from(FRAME_PAYLOAD_MAX) + 1
        ));
        assert_eq!(out, vec![1, 2, 3]);
        let largest = records(&vec![0; FRAME_PAYLOAD_MAX as usize - 1]);
        encode_data(1, &largest, &mut out).unwrap();
        let long_path = "x".repeat(BARRIER_PATH_LENGTH_MAX + 1);
        assert!(matches!(
            encode_data(1, &barrier(&long_path), &mut Vec::new()),
            Err(NetError::MalformedPayload { .. })
        ));
        let longest_path = "x".repeat(BARRIER_PATH_LENGTH_MAX);
        let mut bytes = Vec::new();
        encode_data(1, &barrier(&longest_path), &mut bytes).unwrap();
        assert_eq!(
            decode_all(&mut FrameDecoder::new(), &bytes).unwrap().len(),
            1
        );
        // A long close reason is cut at a character boundary.
        let mut bytes = Vec::new();
        encode_close(&"é".repeat(CLOSE_REASON_LENGTH_MAX), &mut bytes);
        let frames = decode_all(&mut FrameDecoder::new(), &bytes).unwrap();
        assert!(
            matches!(&frames[0], Frame::Close { reason } if reason.len() == CLOSE_REASON_LENGTH_MAX)
        );
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_decoder() {
        // A small deterministic generator: every input either decodes or
        // errors, in any split.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (valid, _) = all_frames();
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            let flips = next() % 4 + 1;
            for _ in 0..flips {
                let index = (next() as usize) % bytes.len();
                bytes[index] = next() as u8;
            }
            let split = (next() as usize) % bytes.len();
            let mut decoder = FrameDecoder::new();
            let _ = decode_all(&mut decoder, &bytes[..split])
                .and_then(|_| decode_all(&mut decoder, &bytes[split..]));
        }
    }
}
