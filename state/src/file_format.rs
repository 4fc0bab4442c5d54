//! Byte layouts of the two checkpoint file kinds, and the atomic file write.
//!
//! All integers are little-endian and fixed width (`u32`, `u64`); no field is
//! ever a `usize`. Every structure carries its own CRC-32 (IEEE, as computed
//! by `crc32fast`), so a reader checks each piece before it believes the
//! lengths and offsets in it.
//!
//! # State file (`*.state`): all operators of one task subtask
//!
//! ```text
//! offset  width  field
//! ------  -----  ---------------------------------------------------------
//! File header, 16 bytes
//!      0      8  magic b"STROMST\0"
//!      8      4  format version (u32), currently 1
//!     12      4  CRC-32 of bytes 0..12
//! Blocks, one after another from offset 16; each is a 24-byte header then
//! its payload:
//!     +0      4  kind (u32): 1 = keyed state of one key group,
//!                            2 = one operator state element
//!     +4      4  operator index (u32): position of the operator in the
//!                task's chain, as listed in the metadata
//!     +8      4  index (u32): the absolute key group (kind 1) or the
//!                element's position in the operator's list (kind 2)
//!    +12      4  payload length in bytes (u32)
//!    +16      4  CRC-32 of the payload
//!    +20      4  CRC-32 of bytes +0..+20 of this block header
//!    +24    len  payload: the opaque bytes the operator snapshotted
//! Footer, last 24 bytes of the file
//!     +0      8  magic b"STROMEND"
//!     +8      4  block count (u32)
//!    +12      8  offset of the footer itself (u64) = file size - 24
//!    +20      4  CRC-32 of bytes +0..+20 of the footer
//! ```
//!
//! Blocks appear per operator in chain order: first its key groups in the
//! order the operator handed them over, then its operator state elements in
//! list order. The footer makes truncation visible even when the cut falls
//! exactly between two blocks: the last 24 bytes are then a block's tail, not
//! a footer. The metadata additionally records every block's offset, length
//! and CRC and the CRC-32 of the whole file.
//!
//! # Metadata file (`_metadata`): one per completed checkpoint or savepoint
//!
//! ```text
//! offset  width  field
//! ------  -----  ---------------------------------------------------------
//!      0      8  magic b"STROMMD\0"
//!      8      4  format version (u32), currently 1
//!     12      4  reserved, zero
//!     16      8  body length in bytes (u64)
//!     24      4  CRC-32 of the body
//!     28      4  CRC-32 of bytes 0..28
//!     32    len  body: an rkyv 0.8 archive of `CheckpointMetadata`
//!                (little-endian, 32-bit relative pointers and lengths),
//!                read only through rkyv's validating `from_bytes`
//! ```
//!
//! The file is exactly `32 + body length` bytes long.
//!
//! # Versioning
//!
//! The magic (bytes 0..8) and the version (bytes 8..12) of both file kinds
//! never move. Any change to a layout above, including any change to the
//! fields of the types archived in the metadata body, bumps that file kind's
//! version. A reader accepts every version from 1 up to the one it writes and
//! refuses newer ones with a message that names both versions; it never
//! guesses at a layout it does not know.

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::Path;

use crate::error::StateError;

/// First 8 bytes of every state file.
pub const STATE_FILE_MAGIC: [u8; 8] = *b"STROMST\0";
/// First 8 bytes of a state file's footer.
pub const STATE_FILE_FOOTER_MAGIC: [u8; 8] = *b"STROMEND";
/// First 8 bytes of every metadata file.
pub const METADATA_FILE_MAGIC: [u8; 8] = *b"STROMMD\0";
/// The state file version this build writes, and the newest it reads.
pub const STATE_FILE_VERSION: u32 = 1;
/// The metadata file version this build writes, and the newest it reads.
pub const METADATA_FILE_VERSION: u32 = 1;

pub const STATE_FILE_HEADER_SIZE: u64 = 16;
pub const BLOCK_HEADER_SIZE: u64 = 24;
pub const STATE_FILE_FOOTER_SIZE: u64 = 24;
pub const METADATA_HEADER_SIZE: u64 = 32;

const _: () = assert!(STATE_FILE_MAGIC.len() + 4 + 4 == STATE_FILE_HEADER_SIZE as usize);
const _: () = assert!(6 * 4 == BLOCK_HEADER_SIZE as usize);
const _: () = assert!(STATE_FILE_FOOTER_MAGIC.len() + 4 + 8 + 4 == STATE_FILE_FOOTER_SIZE as usize);
const _: () =
    assert!(METADATA_FILE_MAGIC.len() + 4 + 4 + 8 + 4 + 4 == METADATA_HEADER_SIZE as usize);
// The metadata body starts 16-byte aligned relative to the file start, which
// keeps the rkyv archive's alignment if the file is ever mapped.
// (`u64::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.)
#[allow(clippy::manual_is_multiple_of)]
const _: () = assert!(METADATA_HEADER_SIZE % 16 == 0);

/// Suffix of the temporary name a file is written under before its rename.
pub const TEMPORARY_SUFFIX: &str = ".tmp";

/// What a block's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockKind {
    KeyGroup = 1,
    OperatorStateElement = 2,
}

impl BlockKind {
    fn from_u32(value: u32) -> Option<BlockKind> {
        match value {
            1 => Some(BlockKind::KeyGroup),
            2 => Some(BlockKind::OperatorStateElement),
            _ => None,
        }
    }
}

/// A decoded block header whose own checksum held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct BlockHeader {
    pub kind: BlockKind,
    pub operator_index: u32,
    pub index: u32,
    pub length: u32,
    pub payload_crc32: u32,
}

/// A block found by [`parse_state_file`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct ParsedBlock {
    pub header: BlockHeader,
    /// File offset of the block header; the payload follows it.
    pub offset: u64,
    /// Whether the payload's CRC-32 equals the one in the header.
    pub payload_intact: bool,
}

impl ParsedBlock {
    /// The payload, which the caller may use only if `payload_intact`.
    pub fn payload<'a>(&self, bytes: &'a [u8]) -> &'a [u8] {
        let start = (self.offset + BLOCK_HEADER_SIZE) as usize;
        &bytes[start..start + self.header.length as usize]
    }
}

pub(crate) fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn u32_at(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(
        bytes[offset..offset + 4]
            .try_into()
            .expect("a 4-byte slice"),
    )
}

fn u64_at(bytes: &[u8], offset: usize) -> u64 {
    u64::from_le_bytes(
        bytes[offset..offset + 8]
            .try_into()
            .expect("an 8-byte slice"),
    )
}

/// Builds a state file in memory: header, then blocks, then [`finish`] adds
/// the footer.
///
/// [`finish`]: StateFileEncoder::finish
pub(crate) struct StateFileEncoder {
    bytes: Vec<u8>,
    block_count: u32,
}

impl StateFileEncoder {
    pub fn new(capacity: usize) -> StateFileEncoder {
        let mut bytes = Vec::with_capacity(capacity);
        bytes.extend_from_slice(&STATE_FILE_MAGIC);
        bytes.extend_from_slice(&STATE_FILE_VERSION.to_le_bytes());
        let header_crc32 = crc32(&bytes);
        bytes.extend_from_slice(&header_crc32.to_le_bytes());
        assert_eq!(bytes.len() as u64, STATE_FILE_HEADER_SIZE);
        StateFileEncoder {
            bytes,
            block_count: 0,
        }
    }

    /// Appends one block and returns its header offset and payload CRC-32.
    /// The caller has checked that the payload fits a `u32` length.
    pub fn push_block(
        &mut self,
        kind: BlockKind,
        operator_index: u32,
        index: u32,
        payload: &[u8],
    ) -> (u64, u32) {
        let length = u32::try_from(payload.len()).expect("payload length checked by the caller");
        let offset = self.bytes.len() as u64;
        let payload_crc32 = crc32(payload);
        let header_start = self.bytes.len();
        for field in [kind as u32, operator_index, index, length, payload_crc32] {
            self.bytes.extend_from_slice(&field.to_le_bytes());
        }
        let header_crc32 = crc32(&self.bytes[header_start..]);
        self.bytes.extend_from_slice(&header_crc32.to_le_bytes());
        self.bytes.extend_from_slice(payload);
        self.block_count = self
            .block_count
            .checked_add(1)
            .expect("fewer than 2^32 blocks in a state file");
        (offset, payload_crc32)
    }

    /// Appends the footer and returns the complete file.
    pub fn finish(mut self) -> Vec<u8> {
        let footer_offset = self.bytes.len() as u64;
        let footer_start = self.bytes.len();
        self.bytes.extend_from_slice(&STATE_FILE_FOOTER_MAGIC);
        self.bytes
            .extend_from_slice(&self.block_count.to_le_bytes());
        self.bytes.extend_from_slice(&footer_offset.to_le_bytes());
        let footer_crc32 = crc32(&self.bytes[footer_start..]);
        self.bytes.extend_from_slice(&footer_crc32.to_le_bytes());
        assert_eq!(
            self.bytes.len() as u64,
            footer_offset + STATE_FILE_FOOTER_SIZE
        );
        self.bytes
    }
}

/// What [`parse_state_file`] found.
pub(crate) struct ParsedStateFile {
    /// The blocks whose headers held, in file order.
    pub blocks: Vec<ParsedBlock>,
    /// Every problem found, in file order. A problem in the file header, the
    /// footer or a block header ends the scan, since the lengths after it
    /// cannot be trusted; a failing payload checksum does not.
    pub problems: Vec<StateError>,
    /// True iff the header and footer held and every block header up to the
    /// footer held: `blocks` is then the file's full block list.
    pub structure_intact: bool,
}

/// Checks a state file's structure and every checksum in it, without
/// trusting any length or offset before its checksum held.
///
/// `operator_names` (the operator ids in chain order, from the metadata) only
/// makes messages readable; pass `&[]` if unknown.
pub(crate) fn parse_state_file(
    path: &Path,
    bytes: &[u8],
    operator_names: &[&str],
) -> ParsedStateFile {
    let mut parsed = ParsedStateFile {
        blocks: Vec::new(),
        problems: Vec::new(),
        structure_intact: false,
    };
    let header_size = STATE_FILE_HEADER_SIZE as usize;
    let footer_size = STATE_FILE_FOOTER_SIZE as usize;
    let block_header_size = BLOCK_HEADER_SIZE as usize;

    // Magic first, so a wrong file is called wrong rather than damaged.
    let magic_length = bytes.len().min(STATE_FILE_MAGIC.len());
    if bytes[..magic_length] != STATE_FILE_MAGIC[..magic_length] || bytes.is_empty() {
        parsed.problems.push(StateError::NotStromFile {
            path: path.to_path_buf(),
            expected: "state file",
            found: bytes[..magic_length].to_vec(),
        });
        return parsed;
    }
    if bytes.len() < header_size + footer_size {
        parsed.problems.push(StateError::damaged(
            path,
            format!(
                "it is only {} bytes long, shorter than a header and a footer ({} bytes): the \
                 file is truncated",
                bytes.len(),
                header_size + footer_size
            ),
        ));
        return parsed;
    }
    let version = u32_at(bytes, 8);
    if version > STATE_FILE_VERSION {
        parsed.problems.push(StateError::NewerVersion {
            path: path.to_path_buf(),
            version,
            supported: STATE_FILE_VERSION,
        });
        return parsed;
    }
    if version == 0 {
        parsed.problems.push(StateError::damaged(
            path,
            "the header records format version 0, which no Strom writes",
        ));
        return parsed;
    }
    let stored = u32_at(bytes, 12);
    let computed = crc32(&bytes[..12]);
    if stored != computed {
        parsed.problems.push(StateError::damaged(
            path,
            format!("the file header fails its checksum (stored {stored:#010x}, computed {computed:#010x})"),
        ));
        return parsed;
    }

    // The footer bounds the blocks. Without a valid one the file was cut or
    // never finished; the blocks are still scanned so that a report can say
    // how far the file is intact.
    let footer_start = bytes.len() - footer_size;
    let footer = &bytes[footer_start..];
    let mut footer_block_count = None;
    if footer[..8] != STATE_FILE_FOOTER_MAGIC {
        parsed.problems.push(StateError::damaged(
            path,
            format!(
                "it has no footer (its last {footer_size} bytes are not one): the file is \
                 truncated or was never completely written"
            ),
        ));
    } else {
        let stored = u32_at(footer, 20);
        let computed = crc32(&footer[..20]);
        let recorded_offset = u64_at(footer, 12);
        if stored != computed {
            parsed.problems.push(StateError::damaged(
                path,
                format!("the footer fails its checksum (stored {stored:#010x}, computed {computed:#010x})"),
            ));
        } else if recorded_offset != footer_start as u64 {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "the footer records its own offset as {recorded_offset} but sits at \
                     {footer_start}: the file is truncated or has bytes appended"
                ),
            ));
        } else {
            footer_block_count = Some(u32_at(footer, 8));
        }
    }
    let blocks_end = if footer_block_count.is_some() {
        footer_start
    } else {
        bytes.len()
    };

    let mut position = header_size;
    let mut headers_intact = true;
    while position < blocks_end {
        let block_number = parsed.blocks.len();
        if blocks_end - position < block_header_size {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "block {block_number} at offset {position} is cut off inside its header \
                     ({} of {block_header_size} bytes)",
                    blocks_end - position
                ),
            ));
            headers_intact = false;
            break;
        }
        let header = &bytes[position..position + block_header_size];
        let stored = u32_at(header, 20);
        let computed = crc32(&header[..20]);
        if stored != computed {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "block {block_number} at offset {position} has a header that fails its \
                     checksum (stored {stored:#010x}, computed {computed:#010x})"
                ),
            ));
            headers_intact = false;
            break;
        }
        let Some(kind) = BlockKind::from_u32(u32_at(header, 0)) else {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "block {block_number} at offset {position} has unknown kind {}",
                    u32_at(header, 0)
                ),
            ));
            headers_intact = false;
            break;
        };
        let block_header = BlockHeader {
            kind,
            operator_index: u32_at(header, 4),
            index: u32_at(header, 8),
            length: u32_at(header, 12),
            payload_crc32: u32_at(header, 16),
        };
        let payload_start = position + block_header_size;
        let available = blocks_end - payload_start;
        if block_header.length as usize > available {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "block {block_number} ({}) is cut off: its payload is {} bytes, only \
                     {available} follow",
                    describe_block(&block_header, operator_names),
                    block_header.length
                ),
            ));
            headers_intact = false;
            break;
        }
        let payload = &bytes[payload_start..payload_start + block_header.length as usize];
        let computed = crc32(payload);
        let payload_intact = computed == block_header.payload_crc32;
        if !payload_intact {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "block {block_number} ({}) fails its checksum (stored {:#010x}, computed \
                     {computed:#010x})",
                    describe_block(&block_header, operator_names),
                    block_header.payload_crc32
                ),
            ));
        }
        parsed.blocks.push(ParsedBlock {
            header: block_header,
            offset: position as u64,
            payload_intact,
        });
        position = payload_start + block_header.length as usize;
    }

    if let Some(block_count) = footer_block_count {
        if headers_intact && block_count as usize != parsed.blocks.len() {
            parsed.problems.push(StateError::damaged(
                path,
                format!(
                    "the footer records {block_count} blocks, the file holds {}",
                    parsed.blocks.len()
                ),
            ));
        } else if headers_intact {
            parsed.structure_intact = true;
        }
    }
    parsed
}

/// "key group 17 of operator '3:window(q5)'", for messages.
pub(crate) fn describe_block(header: &BlockHeader, operator_names: &[&str]) -> String {
    let operator = match operator_names.get(header.operator_index as usize) {
        Some(name) => format!("operator '{name}'"),
        None => format!("operator #{}", header.operator_index),
    };
    match header.kind {
        BlockKind::KeyGroup => format!("key group {} of {operator}", header.index),
        BlockKind::OperatorStateElement => {
            format!("operator state element {} of {operator}", header.index)
        }
    }
}

/// Wraps an encoded metadata body in the metadata file header.
pub(crate) fn encode_metadata_file(body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(METADATA_HEADER_SIZE as usize + body.len());
    bytes.extend_from_slice(&METADATA_FILE_MAGIC);
    bytes.extend_from_slice(&METADATA_FILE_VERSION.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    bytes.extend_from_slice(&(body.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&crc32(body).to_le_bytes());
    let header_crc32 = crc32(&bytes);
    bytes.extend_from_slice(&header_crc32.to_le_bytes());
    assert_eq!(bytes.len() as u64, METADATA_HEADER_SIZE);
    bytes.extend_from_slice(body);
    bytes
}

/// Checks a metadata file's header and body checksum and returns the body.
pub(crate) fn open_metadata_file<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a [u8], StateError> {
    let header_size = METADATA_HEADER_SIZE as usize;
    let magic_length = bytes.len().min(METADATA_FILE_MAGIC.len());
    if bytes.is_empty() || bytes[..magic_length] != METADATA_FILE_MAGIC[..magic_length] {
        return Err(StateError::NotStromFile {
            path: path.to_path_buf(),
            expected: "metadata file",
            found: bytes[..magic_length].to_vec(),
        });
    }
    if bytes.len() < header_size {
        return Err(StateError::Truncated {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            expected: METADATA_HEADER_SIZE,
            recorded_by: "a metadata header alone is",
        });
    }
    let version = u32_at(bytes, 8);
    if version > METADATA_FILE_VERSION {
        return Err(StateError::NewerVersion {
            path: path.to_path_buf(),
            version,
            supported: METADATA_FILE_VERSION,
        });
    }
    if version == 0 {
        return Err(StateError::damaged(
            path,
            "the header records format version 0, which no Strom writes",
        ));
    }
    let stored = u32_at(bytes, 28);
    let computed = crc32(&bytes[..28]);
    if stored != computed {
        return Err(StateError::damaged(
            path,
            format!("the metadata header fails its checksum (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    let body_length = u64_at(bytes, 16);
    let expected_size = METADATA_HEADER_SIZE.saturating_add(body_length);
    let size = bytes.len() as u64;
    if size < expected_size {
        return Err(StateError::Truncated {
            path: path.to_path_buf(),
            size,
            expected: expected_size,
            recorded_by: "its header records",
        });
    }
    if size > expected_size {
        return Err(StateError::damaged(
            path,
            format!(
                "it is {size} bytes long, its header records {expected_size}: bytes were \
                 appended"
            ),
        ));
    }
    let body = &bytes[header_size..];
    let stored = u32_at(bytes, 24);
    let computed = crc32(body);
    if stored != computed {
        return Err(StateError::damaged(
            path,
            format!("the metadata body fails its checksum (stored {stored:#010x}, computed {computed:#010x})"),
        ));
    }
    Ok(body)
}

/// Whether `name` can name a file inside a checkpoint directory: one plain
/// path component, not hidden, not a temporary name.
pub(crate) fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.ends_with(TEMPORARY_SUFFIX)
        && !name.contains(['/', '\\', '\0'])
}

/// Writes `bytes` to `dir/file_name` so that the name either does not exist
/// or holds all of `bytes`, even across a crash:
///
/// 1. write `dir/file_name.tmp` (replacing any leftover of an earlier try);
/// 2. fsync it, so its bytes are on disk before its name is;
/// 3. rename it to `file_name`, atomically replacing nothing or an older file;
/// 4. fsync `dir`, so the rename itself is durable.
pub(crate) fn write_file_atomically(
    dir: &Path,
    file_name: &str,
    bytes: &[u8],
) -> Result<(), StateError> {
    let final_path = dir.join(file_name);
    let temporary_path = dir.join(format!("{file_name}{TEMPORARY_SUFFIX}"));
    let result = (|| {
        let mut file = File::create(&temporary_path)
            .map_err(|error| StateError::io("create", &temporary_path, error))?;
        file.write_all(bytes)
            .map_err(|error| StateError::io("write", &temporary_path, error))?;
        file.sync_all()
            .map_err(|error| StateError::io("fsync", &temporary_path, error))?;
        drop(file);
        fs::rename(&temporary_path, &final_path)
            .map_err(|error| StateError::io("rename a temporary file to", &final_path, error))?;
        sync_directory(dir)
    })();
    if result.is_err() {
        // Best effort: a leftover temporary file is harmless (it is never
        // read and is overwritten by the next try), so its removal may fail.
        let _ = fs::remove_file(&temporary_path);
    }
    result
}

/// Makes the entries of `dir` (creations, renames, deletions) durable.
pub(crate) fn sync_directory(dir: &Path) -> Result<(), StateError> {
    File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(|error| StateError::io("fsync the directory", dir, error))
}

/// Reads a whole file, mapping "not found" to `missing`.
pub(crate) fn read_file(
    path: &Path,
    missing: impl FnOnce() -> StateError,
) -> Result<Vec<u8>, StateError> {
    fs::read(path).map_err(|error| match error.kind() {
        ErrorKind::NotFound => missing(),
        _ => StateError::io("read", path, error),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_block_file() -> Vec<u8> {
        let mut encoder = StateFileEncoder::new(0);
        encoder.push_block(BlockKind::KeyGroup, 0, 5, b"hello");
        encoder.push_block(BlockKind::OperatorStateElement, 1, 0, b"");
        encoder.finish()
    }

    #[test]
    fn an_encoded_file_parses_back_to_its_blocks() {
        let bytes = two_block_file();
        assert_eq!(bytes.len(), 16 + 24 + 5 + 24 + 24);
        let parsed = parse_state_file(Path::new("x.state"), &bytes, &[]);
        assert!(parsed.problems.is_empty());
        assert!(parsed.structure_intact);
        assert_eq!(parsed.blocks.len(), 2);
        assert_eq!(parsed.blocks[0].payload(&bytes), b"hello");
        assert_eq!(parsed.blocks[1].offset, 16 + 24 + 5);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let bytes = two_block_file();
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            let parsed = parse_state_file(Path::new("x.state"), &damaged, &[]);
            assert!(!parsed.problems.is_empty(), "bit {bit} not detected");
        }
    }

    #[test]
    fn every_truncation_is_detected() {
        let bytes = two_block_file();
        for length in 0..bytes.len() {
            let parsed = parse_state_file(Path::new("x.state"), &bytes[..length], &[]);
            assert!(!parsed.problems.is_empty(), "cut at {length} not detected");
        }
    }

    #[test]
    fn a_metadata_envelope_rejects_damage() {
        let bytes = encode_metadata_file(b"body bytes");
        assert_eq!(
            open_metadata_file(Path::new("_metadata"), &bytes).unwrap(),
            b"body bytes"
        );
        for bit in 0..bytes.len() * 8 {
            let mut damaged = bytes.clone();
            damaged[bit / 8] ^= 1 << (bit % 8);
            assert!(open_metadata_file(Path::new("_metadata"), &damaged).is_err());
        }
        for length in 0..bytes.len() {
            assert!(open_metadata_file(Path::new("_metadata"), &bytes[..length]).is_err());
        }
    }
}
