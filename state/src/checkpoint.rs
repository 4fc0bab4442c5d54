//! Checkpoint and savepoint contents: writing task state and metadata, and
//! restoring them.
//!
//! # Directory layout
//!
//! ```text
//! <checkpoint-dir>/
//!   <job-dir-name>/                  one per job run (CheckpointStorage's root)
//!     chk-<id>/                      one per checkpoint; id in decimal, no padding
//!       <file>.state                 one per task subtask, named by the engine
//!       _metadata                    written last: its presence completes the checkpoint
//!       <name>.tmp                   only while a file is being written
//! <savepoint-target-dir>/
//!   savepoint-<job>-<id>-<suffix>/   same files as a chk-<id>, kind = Savepoint
//! ```
//!
//! A checkpoint or savepoint directory is self-contained: `_metadata` names
//! its state files relative to the directory, so it can be moved or copied
//! as a whole. The byte layouts of both file kinds are in [`file_format`].
//!
//! # Commit protocol
//!
//! 1. Before injecting barrier `n`, the coordinator creates `chk-n/`
//!    ([`CheckpointStorage::create_checkpoint_dir`]; the parent is fsynced).
//! 2. Each task subtask, on its aligned barrier `n`, calls
//!    [`write_task_state`] with the snapshots of all operators of its chain.
//!    It encodes the file in memory, re-parses the encoding and asserts that
//!    every checksum holds (checked before writing), then writes it under a
//!    temporary name, fsyncs it, renames it and fsyncs the directory. The
//!    returned [`TaskStateHandle`] travels to the coordinator in the ack.
//! 3. When every subtask has acknowledged, the coordinator calls
//!    [`write_metadata`]. It checks that the handles describe a usable
//!    checkpoint (every subtask of every operator present, no key group held
//!    twice), that every state file exists with its recorded size, encodes
//!    and re-decodes the metadata (asserting equality), and writes `_metadata`
//!    atomically the same way.
//! 4. The coordinator then calls [`CheckpointStorage::complete`], which
//!    applies retention, and tells the tasks that `n` is complete.
//! 5. A checkpoint that fails or times out before step 3 finishes is removed
//!    with [`CheckpointStorage::discard`].
//!
//! Invariants:
//!
//! - A file name in a checkpoint directory holds either nothing or the full
//!   bytes written under it (temporary name, fsync, rename).
//! - `_metadata` exists only if every state file it names was durable
//!   before it was written (steps 2 and 3 are ordered by the acks), so a
//!   checkpoint is complete iff its `_metadata` exists and is valid.
//! - Restore uses no byte before the checksum covering it has been checked.
//!
//! [`CheckpointStorage::create_checkpoint_dir`]: crate::storage::CheckpointStorage::create_checkpoint_dir
//! [`CheckpointStorage::complete`]: crate::storage::CheckpointStorage::complete
//! [`CheckpointStorage::discard`]: crate::storage::CheckpointStorage::discard
//!
//! # What restore verifies
//!
//! [`read_checkpoint`] loads everything eagerly and fails, naming the file
//! and the problem, unless all of this holds:
//!
//! 1. `_metadata` exists; its magic, version, header CRC, length and body CRC
//!    hold; the body passes rkyv's validation and decodes.
//! 2. The metadata is consistent: plain, distinct file names; for every
//!    operator, the same parallelism and max parallelism in every subtask,
//!    every subtask `0..parallelism` exactly once, key groups below the max
//!    parallelism and each held by at most one subtask.
//! 3. Every state file exists and has exactly the recorded size.
//! 4. Its header (magic, version, CRC) and footer (magic, CRC, own offset,
//!    block count) hold, and every block header's and payload's CRC holds.
//! 5. Its blocks are exactly the ones the metadata records, at the recorded
//!    offsets, with the recorded lengths and CRCs.
//! 6. The CRC-32 of the whole file equals the recorded one.

use std::collections::HashMap;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use rkyv::{Archive, Deserialize, Serialize};
use strom_core::key::KeyGroupRange;

use crate::error::StateError;
use crate::file_format::{
    self, crc32, describe_block, encode_metadata_file, is_plain_file_name, open_metadata_file,
    parse_state_file, read_file, write_file_atomically, BlockHeader, BlockKind, ParsedBlock,
};

/// Name of the file whose presence makes a checkpoint or savepoint complete.
pub const METADATA_FILE_NAME: &str = "_metadata";

/// What one operator of a task's chain snapshotted, for one subtask.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OperatorSubtaskState {
    /// Stable id of the operator in the job, e.g. "3:window(q5)".
    pub operator_id: String,
    /// For people (inspect output).
    pub operator_name: String,
    pub subtask_index: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// Keyed state: one opaque serialized blob per key group (absolute key
    /// group number), only key groups that hold something.
    pub key_groups: Vec<(u32, Vec<u8>)>,
    /// Operator (non-keyed) state: a list of opaque elements (e.g. source
    /// splits, sink counters), redistributed round robin on rescale.
    pub operator_state: Vec<Vec<u8>>,
}

/// Whether a snapshot was taken by the coordinator for recovery, or by a
/// user to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub enum SnapshotKind {
    Checkpoint,
    Savepoint,
}

impl std::fmt::Display for SnapshotKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SnapshotKind::Checkpoint => "checkpoint",
            SnapshotKind::Savepoint => "savepoint",
        })
    }
}

/// Where one block lives in a state file.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct BlockRef {
    /// The absolute key group (keyed state) or the element's position in the
    /// operator's list (operator state).
    pub index: u32,
    /// File offset of the block's 24-byte header; the payload follows it.
    pub offset: u64,
    /// Payload length in bytes.
    pub length: u32,
    /// CRC-32 of the payload.
    pub crc32: u32,
}

/// The part of a state file that holds one operator's snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct OperatorStateHandle {
    pub operator_id: String,
    pub operator_name: String,
    pub subtask_index: u32,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// One block per key group that holds state, `index` = key group.
    pub key_groups: Vec<BlockRef>,
    /// One block per operator state element, `index` = position, in order.
    pub operator_state: Vec<BlockRef>,
}

/// What a task subtask reports to the coordinator after writing its state:
/// enough to find and verify every byte of the file.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct TaskStateHandle {
    /// Name of the file inside the checkpoint directory.
    pub file_name: String,
    pub file_size: u64,
    /// CRC-32 of the whole file.
    pub file_crc32: u32,
    /// The operators of the task's chain, in chain order (the operator index
    /// in block headers is the position in this list).
    pub operators: Vec<OperatorStateHandle>,
}

/// The content of `_metadata`: what a complete checkpoint or savepoint holds.
#[derive(Clone, Debug, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct CheckpointMetadata {
    pub job_name: String,
    pub checkpoint_id: u64,
    pub kind: SnapshotKind,
    /// When the coordinator triggered it, in milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    pub tasks: Vec<TaskStateHandle>,
}

impl CheckpointMetadata {
    /// Sum of the recorded sizes of all state files.
    pub fn state_size_bytes(&self) -> u64 {
        self.tasks.iter().map(|task| task.file_size).sum()
    }
}

/// Writes the state of all operators of one task subtask to
/// `checkpoint_dir/file_name`, durably and atomically (protocol step 2).
///
/// Panics if `file_name` is not a plain file name or the snapshots are
/// malformed (duplicate operator ids or key groups, `subtask_index >=
/// parallelism`, `parallelism > max_parallelism`, a key group `>=
/// max_parallelism`): those are bugs in the caller.
pub fn write_task_state(
    checkpoint_dir: &Path,
    file_name: &str,
    operators: &[OperatorSubtaskState],
) -> Result<TaskStateHandle, StateError> {
    assert!(
        is_plain_file_name(file_name) && file_name != METADATA_FILE_NAME,
        "'{file_name}' cannot name a state file"
    );
    let path = checkpoint_dir.join(file_name);
    let mut payload_size = 0usize;
    for (position, operator) in operators.iter().enumerate() {
        assert!(
            operators[..position]
                .iter()
                .all(|other| other.operator_id != operator.operator_id),
            "operator '{}' appears twice in one task",
            operator.operator_id
        );
        assert!(
            operator.parallelism >= 1
                && operator.parallelism <= operator.max_parallelism
                && operator.subtask_index < operator.parallelism,
            "operator '{}': subtask {} of parallelism {} and max parallelism {}",
            operator.operator_id,
            operator.subtask_index,
            operator.parallelism,
            operator.max_parallelism
        );
        let mut key_groups: Vec<u32> = operator
            .key_groups
            .iter()
            .map(|(group, _)| *group)
            .collect();
        key_groups.sort_unstable();
        assert!(
            key_groups.windows(2).all(|pair| pair[0] < pair[1]),
            "operator '{}' hands over a key group twice",
            operator.operator_id
        );
        assert!(
            key_groups
                .last()
                .is_none_or(|group| *group < operator.max_parallelism),
            "operator '{}' hands over a key group beyond max parallelism {}",
            operator.operator_id,
            operator.max_parallelism
        );
        assert!(u32::try_from(operator.operator_state.len()).is_ok());
        let blobs = operator
            .key_groups
            .iter()
            .map(|(group, blob)| (format!("the state of key group {group}"), blob))
            .chain(
                operator
                    .operator_state
                    .iter()
                    .enumerate()
                    .map(|(element, blob)| (format!("operator state element {element}"), blob)),
            );
        for (what, blob) in blobs {
            if u32::try_from(blob.len()).is_err() {
                return Err(StateError::BlockTooLarge {
                    path,
                    operator_id: operator.operator_id.clone(),
                    what,
                    size: blob.len() as u64,
                });
            }
            payload_size += file_format::BLOCK_HEADER_SIZE as usize + blob.len();
        }
    }
    assert!(u32::try_from(operators.len()).is_ok());

    let mut encoder = file_format::StateFileEncoder::new(
        file_format::STATE_FILE_HEADER_SIZE as usize
            + payload_size
            + file_format::STATE_FILE_FOOTER_SIZE as usize,
    );
    let mut handles = Vec::with_capacity(operators.len());
    for (operator_index, operator) in operators.iter().enumerate() {
        let operator_index = operator_index as u32;
        let mut push = |kind, index: u32, blob: &[u8]| {
            let (offset, crc32) = encoder.push_block(kind, operator_index, index, blob);
            BlockRef {
                index,
                offset,
                length: blob.len() as u32,
                crc32,
            }
        };
        let key_groups = operator
            .key_groups
            .iter()
            .map(|(group, blob)| push(BlockKind::KeyGroup, *group, blob))
            .collect();
        let operator_state = operator
            .operator_state
            .iter()
            .enumerate()
            .map(|(element, blob)| push(BlockKind::OperatorStateElement, element as u32, blob))
            .collect();
        handles.push(OperatorStateHandle {
            operator_id: operator.operator_id.clone(),
            operator_name: operator.operator_name.clone(),
            subtask_index: operator.subtask_index,
            parallelism: operator.parallelism,
            max_parallelism: operator.max_parallelism,
            key_groups,
            operator_state,
        });
    }
    let bytes = encoder.finish();
    let handle = TaskStateHandle {
        file_name: file_name.to_string(),
        file_size: bytes.len() as u64,
        file_crc32: crc32(&bytes),
        operators: handles,
    };

    // Check before writing: the bytes must pass exactly the verification
    // that restore will apply, or the encoder has a bug.
    let (_, problems) = verify_task_bytes(&path, &bytes, &handle);
    assert!(
        problems.is_empty(),
        "encoded state file fails its own verification: {}",
        problems[0]
    );
    write_file_atomically(checkpoint_dir, file_name, &bytes)?;
    Ok(handle)
}

/// Writes `checkpoint_dir/_metadata` durably and atomically (protocol step
/// 3); once it returns `Ok`, the checkpoint is complete.
///
/// Fails without writing if the metadata does not describe a restorable
/// checkpoint, or a state file it names is missing or has another size.
pub fn write_metadata(
    checkpoint_dir: &Path,
    metadata: &CheckpointMetadata,
) -> Result<(), StateError> {
    let metadata_path = checkpoint_dir.join(METADATA_FILE_NAME);
    if let Some(problem) = validate_metadata(&metadata_path, metadata)
        .into_iter()
        .next()
    {
        return Err(problem);
    }
    for task in &metadata.tasks {
        let path = checkpoint_dir.join(&task.file_name);
        let size = match fs::metadata(&path) {
            Ok(file) => file.len(),
            Err(error) if error.kind() == ErrorKind::NotFound => {
                return Err(StateError::MissingFile { path })
            }
            Err(error) => return Err(StateError::io("inspect", &path, error)),
        };
        if let Some(problem) = size_problem(&path, size, task.file_size) {
            return Err(problem);
        }
    }

    let body = rkyv::to_bytes::<rkyv::rancor::Error>(metadata)
        .expect("checkpoint metadata always serializes");
    let bytes = encode_metadata_file(&body);
    // Check before writing: the file must decode to what we were given.
    let decoded = decode_metadata(&metadata_path, &bytes)
        .unwrap_or_else(|problem| panic!("encoded metadata fails its own verification: {problem}"));
    assert_eq!(
        &decoded, metadata,
        "encoded metadata decodes to something else"
    );
    write_file_atomically(checkpoint_dir, METADATA_FILE_NAME, &bytes)
}

/// A verified checkpoint or savepoint, loaded into memory.
#[derive(Debug)]
pub struct RestoredCheckpoint {
    path: PathBuf,
    metadata: CheckpointMetadata,
    operators: Vec<RestoredOperator>,
    total_size_bytes: u64,
}

/// One operator's state across all its old subtasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredOperator {
    pub operator_id: String,
    pub operator_name: String,
    /// The parallelism the state was written at.
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// Indexed by old subtask: `subtasks[i].subtask_index == i`.
    pub subtasks: Vec<RestoredSubtask>,
}

/// What one old subtask of an operator held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoredSubtask {
    pub subtask_index: u32,
    /// The state file it came from.
    pub file_name: String,
    /// Key group blobs, sorted by key group.
    pub key_groups: Vec<(u32, Vec<u8>)>,
    /// Operator state elements, in list order.
    pub operator_state: Vec<Vec<u8>>,
}

impl RestoredCheckpoint {
    pub fn metadata(&self) -> &CheckpointMetadata {
        &self.metadata
    }

    /// The checkpoint or savepoint directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every operator with state, in the order of first appearance in the
    /// metadata.
    pub fn operators(&self) -> &[RestoredOperator] {
        &self.operators
    }

    /// Whether the snapshot holds state of `operator_id`. An operator it does
    /// not hold starts empty; one it holds that the new job lacks is state
    /// that would be dropped, which the caller decides about.
    pub fn has_operator(&self, operator_id: &str) -> bool {
        self.operator(operator_id).is_some()
    }

    /// The state of `operator_id`, if the snapshot holds any.
    pub fn operator(&self, operator_id: &str) -> Option<&RestoredOperator> {
        self.operators
            .iter()
            .find(|operator| operator.operator_id == operator_id)
    }

    /// The keyed state blobs of `key_groups` of an operator, sorted by key
    /// group, from whichever old subtasks held them. Empty for an operator
    /// the checkpoint does not know (a new operator starts empty). The
    /// caller checks that the new job's max parallelism equals the old one
    /// (`RestoredOperator::max_parallelism`): key groups mean nothing
    /// across a change of it.
    pub fn keyed_state(&self, operator_id: &str, key_groups: KeyGroupRange) -> Vec<(u32, Vec<u8>)> {
        let Some(operator) = self.operator(operator_id) else {
            return Vec::new();
        };
        let mut state: Vec<(u32, Vec<u8>)> = operator
            .subtasks
            .iter()
            .flat_map(|subtask| subtask.key_groups.iter())
            .filter(|(group, _)| key_groups.contains(*group))
            .cloned()
            .collect();
        state.sort_unstable_by_key(|(group, _)| *group);
        state
    }

    /// The operator state elements that `new_subtask` of `new_parallelism`
    /// restores: all elements of all old subtasks, in old subtask order, are
    /// numbered `j = 0, 1, ...` and element `j` goes to new subtask
    /// `j % new_parallelism` (Flink's round-robin list state
    /// redistribution). Empty for an unknown operator.
    pub fn operator_state(
        &self,
        operator_id: &str,
        new_subtask: u32,
        new_parallelism: u32,
    ) -> Vec<Vec<u8>> {
        assert!(
            new_subtask < new_parallelism,
            "subtask {new_subtask} of parallelism {new_parallelism}"
        );
        let Some(operator) = self.operator(operator_id) else {
            return Vec::new();
        };
        operator
            .subtasks
            .iter()
            .flat_map(|subtask| subtask.operator_state.iter())
            .enumerate()
            .filter(|(element, _)| {
                *element as u64 % u64::from(new_parallelism) == u64::from(new_subtask)
            })
            .map(|(_, blob)| blob.clone())
            .collect()
    }

    /// Bytes on disk: all state files plus `_metadata`.
    pub fn total_size_bytes(&self) -> u64 {
        self.total_size_bytes
    }
}

/// Reads and verifies a checkpoint or savepoint; `path` is its directory or
/// its `_metadata` file. See the module doc for everything that is checked.
pub fn read_checkpoint(path: &Path) -> Result<RestoredCheckpoint, StateError> {
    let (directory, metadata_path) = resolve_checkpoint_path(path)?;
    let (metadata, metadata_size) = read_metadata(&metadata_path)?;
    if let Some(problem) = validate_metadata(&metadata_path, &metadata)
        .into_iter()
        .next()
    {
        return Err(problem);
    }

    let mut operators: Vec<RestoredOperator> = Vec::new();
    let mut positions: HashMap<String, usize> = HashMap::new();
    let mut total_size_bytes = metadata_size;
    for task in &metadata.tasks {
        let verified =
            verify_task_file(&directory, task).map_err(|mut problems| problems.swap_remove(0))?;
        total_size_bytes += task.file_size;
        // Verification matched the file's blocks one to one, in order, with
        // the handle's; take the payloads in that order.
        let mut blocks = verified.blocks.iter();
        for operator in &task.operators {
            let mut payloads = |count: usize| -> Vec<(u32, Vec<u8>)> {
                blocks
                    .by_ref()
                    .take(count)
                    .map(|block| {
                        assert!(block.payload_intact);
                        (block.header.index, block.payload(&verified.bytes).to_vec())
                    })
                    .collect()
            };
            let mut key_groups = payloads(operator.key_groups.len());
            key_groups.sort_unstable_by_key(|(group, _)| *group);
            let operator_state = payloads(operator.operator_state.len())
                .into_iter()
                .map(|(_, blob)| blob)
                .collect();
            let position = *positions
                .entry(operator.operator_id.clone())
                .or_insert_with(|| {
                    operators.push(RestoredOperator {
                        operator_id: operator.operator_id.clone(),
                        operator_name: operator.operator_name.clone(),
                        parallelism: operator.parallelism,
                        max_parallelism: operator.max_parallelism,
                        subtasks: Vec::new(),
                    });
                    operators.len() - 1
                });
            operators[position].subtasks.push(RestoredSubtask {
                subtask_index: operator.subtask_index,
                file_name: task.file_name.clone(),
                key_groups,
                operator_state,
            });
        }
        assert!(blocks.next().is_none());
    }
    for operator in &mut operators {
        operator
            .subtasks
            .sort_unstable_by_key(|subtask| subtask.subtask_index);
        // Validation guarantees every subtask exactly once.
        assert!(operator
            .subtasks
            .iter()
            .enumerate()
            .all(|(index, subtask)| subtask.subtask_index as usize == index));
    }
    Ok(RestoredCheckpoint {
        path: directory,
        metadata,
        operators,
        total_size_bytes,
    })
}

/// The checkpoint directory and its metadata file, for a path that is either.
pub(crate) fn resolve_checkpoint_path(path: &Path) -> Result<(PathBuf, PathBuf), StateError> {
    if path.is_dir() {
        return Ok((path.to_path_buf(), path.join(METADATA_FILE_NAME)));
    }
    let parent = match path.parent() {
        Some(parent) if parent.as_os_str().is_empty() => Path::new("."),
        Some(parent) => parent,
        None => {
            return Err(StateError::NoCheckpoint {
                path: path.to_path_buf(),
            })
        }
    };
    if path.is_file() {
        return Ok((parent.to_path_buf(), path.to_path_buf()));
    }
    if path
        .file_name()
        .is_some_and(|name| name == METADATA_FILE_NAME)
        && parent.is_dir()
    {
        return Err(StateError::MissingMetadata {
            path: path.to_path_buf(),
        });
    }
    Err(StateError::NoCheckpoint {
        path: path.to_path_buf(),
    })
}

/// Reads, checks and decodes a metadata file; returns it and its size.
pub(crate) fn read_metadata(metadata_path: &Path) -> Result<(CheckpointMetadata, u64), StateError> {
    let bytes = read_file(metadata_path, || StateError::MissingMetadata {
        path: metadata_path.to_path_buf(),
    })?;
    let metadata = decode_metadata(metadata_path, &bytes)?;
    Ok((metadata, bytes.len() as u64))
}

fn decode_metadata(metadata_path: &Path, bytes: &[u8]) -> Result<CheckpointMetadata, StateError> {
    let body = open_metadata_file(metadata_path, bytes)?;
    // rkyv needs the archive aligned; a Vec<u8> from a read gives no such
    // promise, so copy the (small) body once.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    rkyv::from_bytes::<CheckpointMetadata, rkyv::rancor::Error>(&aligned).map_err(|error| {
        StateError::damaged(
            metadata_path,
            format!("the metadata body passes its checksum but does not decode: {error}"),
        )
    })
}

/// Every way `metadata` fails to describe a restorable checkpoint.
pub(crate) fn validate_metadata(
    metadata_path: &Path,
    metadata: &CheckpointMetadata,
) -> Vec<StateError> {
    struct OperatorSeen<'a> {
        operator_id: &'a str,
        parallelism: u32,
        max_parallelism: u32,
        /// Which file holds each subtask.
        subtasks: Vec<Option<&'a str>>,
        /// Which subtask holds each key group.
        key_group_owners: Vec<Option<u32>>,
    }
    let mut problems = Vec::new();
    let mut problem = |text: String| problems.push(StateError::inconsistent(metadata_path, text));
    let mut file_names: HashMap<&str, ()> = HashMap::new();
    let mut seen: Vec<OperatorSeen> = Vec::new();
    for task in &metadata.tasks {
        let file = task.file_name.as_str();
        if !is_plain_file_name(file) || file == METADATA_FILE_NAME {
            problem(format!("'{file}' cannot name a state file"));
            continue;
        }
        if file_names.insert(file, ()).is_some() {
            problem(format!("state file '{file}' is listed twice"));
            continue;
        }
        for (position, operator) in task.operators.iter().enumerate() {
            let id = operator.operator_id.as_str();
            if task.operators[..position]
                .iter()
                .any(|other| other.operator_id == id)
            {
                problem(format!("operator '{id}' appears twice in '{file}'"));
                continue;
            }
            if operator.parallelism == 0
                || operator.parallelism > operator.max_parallelism
                || operator.subtask_index >= operator.parallelism
            {
                problem(format!(
                    "'{file}' holds operator '{id}' as subtask {} of parallelism {} and max \
                     parallelism {}",
                    operator.subtask_index, operator.parallelism, operator.max_parallelism
                ));
                continue;
            }
            for (element, block) in operator.operator_state.iter().enumerate() {
                if block.index as usize != element {
                    problem(format!(
                        "'{file}' records operator state element {element} of operator '{id}' \
                         with index {}",
                        block.index
                    ));
                }
            }
            let entry = match seen.iter_mut().position(|other| other.operator_id == id) {
                Some(index) => &mut seen[index],
                None => {
                    seen.push(OperatorSeen {
                        operator_id: id,
                        parallelism: operator.parallelism,
                        max_parallelism: operator.max_parallelism,
                        subtasks: vec![None; operator.parallelism as usize],
                        key_group_owners: vec![None; operator.max_parallelism as usize],
                    });
                    seen.last_mut().expect("just pushed")
                }
            };
            if (entry.parallelism, entry.max_parallelism)
                != (operator.parallelism, operator.max_parallelism)
            {
                problem(format!(
                    "operator '{id}' has parallelism {} and max parallelism {} in '{file}', but \
                     {} and {} elsewhere",
                    operator.parallelism,
                    operator.max_parallelism,
                    entry.parallelism,
                    entry.max_parallelism
                ));
                continue;
            }
            let slot = &mut entry.subtasks[operator.subtask_index as usize];
            if let Some(other_file) = slot {
                problem(format!(
                    "subtask {} of operator '{id}' is in both '{other_file}' and '{file}'",
                    operator.subtask_index
                ));
                continue;
            }
            *slot = Some(file);
            for block in &operator.key_groups {
                let Some(owner) = entry.key_group_owners.get_mut(block.index as usize) else {
                    problem(format!(
                        "'{file}' holds key group {} of operator '{id}', beyond its max \
                         parallelism {}",
                        block.index, operator.max_parallelism
                    ));
                    continue;
                };
                if let Some(other) = owner {
                    problem(format!(
                        "key group {} of operator '{id}' is held by subtask {other} and by \
                         subtask {} ('{file}')",
                        block.index, operator.subtask_index
                    ));
                    continue;
                }
                *owner = Some(operator.subtask_index);
            }
        }
    }
    for operator in &seen {
        let missing: Vec<String> = operator
            .subtasks
            .iter()
            .enumerate()
            .filter(|(_, file)| file.is_none())
            .map(|(subtask, _)| subtask.to_string())
            .collect();
        if !missing.is_empty() {
            problem(format!(
                "operator '{}' has parallelism {} but no state for subtask(s) {}",
                operator.operator_id,
                operator.parallelism,
                missing.join(", ")
            ));
        }
    }
    problems
}

/// A state file whose every check held, with its bytes.
pub(crate) struct VerifiedTaskFile {
    pub bytes: Vec<u8>,
    /// The file's blocks, one to one and in order with the handle's.
    pub blocks: Vec<ParsedBlock>,
}

/// Reads one state file and checks it against its handle; on failure,
/// returns every problem found (at least one), the first being the one that
/// matters most.
pub(crate) fn verify_task_file(
    directory: &Path,
    handle: &TaskStateHandle,
) -> Result<VerifiedTaskFile, Vec<StateError>> {
    let path = directory.join(&handle.file_name);
    let bytes = read_file(&path, || StateError::MissingFile { path: path.clone() })
        .map_err(|problem| vec![problem])?;
    let (blocks, problems) = verify_task_bytes(&path, &bytes, handle);
    if problems.is_empty() {
        Ok(VerifiedTaskFile { bytes, blocks })
    } else {
        Err(problems)
    }
}

/// The checks of [`verify_task_file`] after the read, on bytes in memory:
/// the blocks found and every problem, in order of importance.
fn verify_task_bytes(
    path: &Path,
    bytes: &[u8],
    handle: &TaskStateHandle,
) -> (Vec<ParsedBlock>, Vec<StateError>) {
    let mut problems: Vec<StateError> = size_problem(path, bytes.len() as u64, handle.file_size)
        .into_iter()
        .collect();
    let parsed = parse_state_file(path, bytes, &operator_names(handle));
    problems.extend(parsed.problems);
    if parsed.structure_intact {
        problems.extend(match_handle(path, &parsed.blocks, handle));
    }
    if problems.is_empty() {
        problems.extend(file_crc_problem(path, bytes, handle));
    }
    (parsed.blocks, problems)
}

fn operator_names(handle: &TaskStateHandle) -> Vec<&str> {
    handle
        .operators
        .iter()
        .map(|operator| operator.operator_id.as_str())
        .collect()
}

fn size_problem(path: &Path, size: u64, recorded: u64) -> Option<StateError> {
    if size < recorded {
        Some(StateError::Truncated {
            path: path.to_path_buf(),
            size,
            expected: recorded,
            recorded_by: "the metadata records",
        })
    } else if size > recorded {
        Some(StateError::damaged(
            path,
            format!("it is {size} bytes long, the metadata records {recorded}"),
        ))
    } else {
        None
    }
}

fn file_crc_problem(path: &Path, bytes: &[u8], handle: &TaskStateHandle) -> Option<StateError> {
    let computed = crc32(bytes);
    (computed != handle.file_crc32).then(|| {
        StateError::damaged(
            path,
            format!(
                "the whole file fails its checksum (the metadata records {:#010x}, computed \
                 {computed:#010x})",
                handle.file_crc32
            ),
        )
    })
}

/// Checks that the file's blocks are exactly the handle's, in order.
fn match_handle(
    path: &Path,
    blocks: &[ParsedBlock],
    handle: &TaskStateHandle,
) -> Option<StateError> {
    let names = operator_names(handle);
    let expected: Vec<(BlockHeader, u64)> = handle
        .operators
        .iter()
        .enumerate()
        .flat_map(|(operator_index, operator)| {
            let keyed = operator
                .key_groups
                .iter()
                .map(move |block| (BlockKind::KeyGroup, block));
            let elements = operator
                .operator_state
                .iter()
                .map(|block| (BlockKind::OperatorStateElement, block));
            keyed.chain(elements).map(move |(kind, block)| {
                let header = BlockHeader {
                    kind,
                    operator_index: operator_index as u32,
                    index: block.index,
                    length: block.length,
                    payload_crc32: block.crc32,
                };
                (header, block.offset)
            })
        })
        .collect();
    if expected.len() != blocks.len() {
        return Some(StateError::damaged(
            path,
            format!(
                "it holds {} blocks, the metadata records {}",
                blocks.len(),
                expected.len()
            ),
        ));
    }
    for (number, (block, (header, offset))) in blocks.iter().zip(&expected).enumerate() {
        if block.header != *header || block.offset != *offset {
            return Some(StateError::damaged(
                path,
                format!(
                    "block {number} is {} at offset {} ({} bytes, crc {:#010x}), the metadata \
                     records {} at offset {offset} ({} bytes, crc {:#010x})",
                    describe_block(&block.header, &names),
                    block.offset,
                    block.header.length,
                    block.header.payload_crc32,
                    describe_block(header, &names),
                    header.length,
                    header.payload_crc32
                ),
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::*;
    use std::fs::OpenOptions;

    fn flip_bit(path: &Path, offset: u64) {
        let mut bytes = fs::read(path).unwrap();
        bytes[offset as usize] ^= 0x10;
        fs::write(path, bytes).unwrap();
    }

    fn truncate(path: &Path, length: u64) {
        OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(length)
            .unwrap();
    }

    /// Reads `dir`, expecting an error whose message names `file`; returns it.
    fn read_error(dir: &Path, file: &str) -> StateError {
        let error = read_checkpoint(dir).expect_err("the damage must be detected");
        let message = error.to_string();
        assert!(
            message.contains(&dir.join(file).display().to_string()),
            "'{message}' does not name {file}"
        );
        error
    }

    #[test]
    fn a_checkpoint_reads_back_as_written() {
        let dir = TempDir::new("round-trip");
        let written = write_sample_checkpoint(dir.path(), 7, 2, SnapshotKind::Checkpoint);
        // Through the directory and through the metadata file alike.
        for path in [
            dir.path().to_path_buf(),
            dir.path().join(METADATA_FILE_NAME),
        ] {
            let restored = read_checkpoint(&path).unwrap();
            assert_eq!(restored.metadata(), &written);
            assert_eq!(restored.path(), dir.path());
            let ids: Vec<&str> = restored
                .operators()
                .iter()
                .map(|o| o.operator_id.as_str())
                .collect();
            assert_eq!(ids, [SOURCE_ID, WINDOW_ID]);
            for subtask in 0..2 {
                let expected = sample_task_operators(subtask, 2);
                for (operator, expected) in restored.operators().iter().zip(&expected) {
                    assert_eq!(operator.parallelism, 2);
                    assert_eq!(operator.max_parallelism, MAX_PARALLELISM);
                    let state = &operator.subtasks[subtask as usize];
                    assert_eq!(state.file_name, sample_file_name(subtask));
                    assert_eq!(state.key_groups, expected.key_groups);
                    assert_eq!(state.operator_state, expected.operator_state);
                }
            }
            let on_disk: u64 = fs::read_dir(dir.path())
                .unwrap()
                .map(|entry| entry.unwrap().metadata().unwrap().len())
                .sum();
            assert_eq!(restored.total_size_bytes(), on_disk);
        }
        // No temporary file is left behind.
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["_metadata", "task-0.state", "task-1.state"]);
    }

    #[test]
    fn keyed_state_is_restored_exactly_once_at_another_parallelism() {
        for (old, new) in [(2, 3), (3, 1), (2, 2)] {
            let dir = TempDir::new("rescale");
            write_sample_checkpoint(dir.path(), 1, old, SnapshotKind::Savepoint);
            let restored = read_checkpoint(dir.path()).unwrap();
            let mut seen = vec![0u32; MAX_PARALLELISM as usize];
            for subtask in 0..new {
                let range = KeyGroupRange::for_subtask(MAX_PARALLELISM, new, subtask);
                for (group, blob) in restored.keyed_state(WINDOW_ID, range) {
                    assert!(range.contains(group));
                    assert_eq!(Some(blob), sample_key_group_blob(group));
                    seen[group as usize] += 1;
                }
            }
            for group in 0..MAX_PARALLELISM {
                let expected = u32::from(sample_key_group_blob(group).is_some());
                assert_eq!(
                    seen[group as usize], expected,
                    "{old}->{new}: key group {group}"
                );
            }
            // The source has no keyed state, an unknown operator has nothing.
            let all = KeyGroupRange {
                start: 0,
                end: MAX_PARALLELISM,
            };
            assert!(restored.keyed_state(SOURCE_ID, all).is_empty());
            assert!(restored.keyed_state("9:new operator", all).is_empty());
        }
    }

    #[test]
    fn operator_state_is_redistributed_round_robin() {
        let dir = TempDir::new("round-robin");
        write_sample_checkpoint(dir.path(), 1, 2, SnapshotKind::Checkpoint);
        let restored = read_checkpoint(dir.path()).unwrap();
        let element = |text: &str| text.as_bytes().to_vec();
        // Old subtask 0 held splits 0.0, 0.1; old subtask 1 held 1.0, 1.1, 1.2.
        assert_eq!(
            restored.operator_state(SOURCE_ID, 0, 3),
            [element("split 0.0"), element("split 1.1")]
        );
        assert_eq!(
            restored.operator_state(SOURCE_ID, 1, 3),
            [element("split 0.1"), element("split 1.2")]
        );
        assert_eq!(
            restored.operator_state(SOURCE_ID, 2, 3),
            [element("split 1.0")]
        );
        let mut all = sample_source_elements(0);
        all.extend(sample_source_elements(1));
        assert_eq!(restored.operator_state(SOURCE_ID, 0, 1), all);
        assert!(restored.operator_state(WINDOW_ID, 0, 1).is_empty());
    }

    #[test]
    fn a_flipped_bit_in_a_payload_is_named() {
        let dir = TempDir::new("flip-payload");
        let metadata = write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        let block = &metadata.tasks[1].operators[1].key_groups[4];
        flip_bit(&dir.path().join("task-1.state"), block.offset + 24 + 3);
        let message = read_error(dir.path(), "task-1.state").to_string();
        assert!(
            message.contains(&format!(
                "(key group {} of operator '{WINDOW_ID}') fails its checksum",
                block.index
            )),
            "{message}"
        );
    }

    #[test]
    fn a_flipped_bit_in_a_block_header_is_named() {
        let dir = TempDir::new("flip-header");
        let metadata = write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        // The length field: a reader trusting it would run off the block.
        let block = &metadata.tasks[0].operators[1].key_groups[2];
        flip_bit(&dir.path().join("task-0.state"), block.offset + 12);
        let message = read_error(dir.path(), "task-0.state").to_string();
        assert!(
            message.contains("has a header that fails its checksum"),
            "{message}"
        );
    }

    #[test]
    fn a_truncated_state_file_is_named() {
        let dir = TempDir::new("truncated");
        let metadata = write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        let task = &metadata.tasks[0];
        let path = dir.path().join(&task.file_name);
        let block = &task.operators[1].key_groups[5];
        // Mid-block, exactly at a block boundary, and just before the footer.
        for length in [block.offset + 24 + 2, block.offset, task.file_size - 24] {
            truncate(&path, length);
            let error = read_error(dir.path(), &task.file_name);
            assert!(
                matches!(error, StateError::Truncated { size, expected, .. }
                    if size == length && expected == task.file_size),
                "{error}"
            );
            assert!(error.to_string().contains(&format!(
                "is truncated: {length} bytes, the metadata records {}",
                task.file_size
            )));
            // Without the metadata's size, the file's own structure shows it.
            let bytes = fs::read(&path).unwrap();
            let parsed = parse_state_file(&path, &bytes, &[]);
            assert!(!parsed.structure_intact && !parsed.problems.is_empty());
        }
    }

    #[test]
    fn a_missing_state_file_is_named() {
        let dir = TempDir::new("missing-file");
        write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        fs::remove_file(dir.path().join("task-1.state")).unwrap();
        let error = read_error(dir.path(), "task-1.state");
        assert!(matches!(error, StateError::MissingFile { .. }), "{error}");
        assert!(error.to_string().ends_with("is missing"));
    }

    #[test]
    fn a_missing_metadata_file_means_an_incomplete_checkpoint() {
        let dir = TempDir::new("missing-metadata");
        write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        fs::remove_file(dir.path().join(METADATA_FILE_NAME)).unwrap();
        for path in [
            dir.path().to_path_buf(),
            dir.path().join(METADATA_FILE_NAME),
        ] {
            let error = read_checkpoint(&path).unwrap_err();
            assert!(
                matches!(error, StateError::MissingMetadata { .. }),
                "{error}"
            );
            assert_eq!(
                error.to_string(),
                format!(
                    "no metadata file '{}': the checkpoint never completed, or this is not a \
                     checkpoint directory",
                    dir.path().join(METADATA_FILE_NAME).display()
                )
            );
        }
        let nowhere = dir.path().join("no such checkpoint");
        assert!(matches!(
            read_checkpoint(&nowhere),
            Err(StateError::NoCheckpoint { .. })
        ));
    }

    #[test]
    fn a_flipped_bit_in_the_metadata_is_named() {
        let dir = TempDir::new("flip-metadata");
        write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        let path = dir.path().join(METADATA_FILE_NAME);
        let size = fs::metadata(&path).unwrap().len();
        // In the header and in the body.
        for offset in [20, size / 2] {
            flip_bit(&path, offset);
            let error = read_error(dir.path(), METADATA_FILE_NAME);
            assert!(matches!(error, StateError::Damaged { .. }), "{error}");
            assert!(error.to_string().contains("fails its checksum"), "{error}");
            flip_bit(&path, offset);
        }
        read_checkpoint(dir.path()).unwrap();
    }

    #[test]
    fn a_file_with_a_bad_magic_is_not_a_strom_file() {
        let dir = TempDir::new("bad-magic");
        write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        for file in ["task-0.state", METADATA_FILE_NAME] {
            let path = dir.path().join(file);
            let original = fs::read(&path).unwrap();
            let mut bytes = original.clone();
            bytes[..4].copy_from_slice(b"PK\x03\x04");
            fs::write(&path, bytes).unwrap();
            let error = read_error(dir.path(), file);
            assert!(matches!(error, StateError::NotStromFile { .. }), "{error}");
            assert!(error.to_string().contains("is not a Strom"), "{error}");
            assert!(error.to_string().contains("b\"PK\\x03\\x04"), "{error}");
            fs::write(&path, original).unwrap();
        }
    }

    #[test]
    fn a_newer_format_version_is_refused_by_name() {
        let dir = TempDir::new("newer");
        write_sample_checkpoint(dir.path(), 3, 1, SnapshotKind::Checkpoint);
        for file in ["task-0.state", METADATA_FILE_NAME] {
            let path = dir.path().join(file);
            let original = fs::read(&path).unwrap();
            let mut bytes = original.clone();
            bytes[8..12].copy_from_slice(&9u32.to_le_bytes());
            fs::write(&path, bytes).unwrap();
            let message = read_error(dir.path(), file).to_string();
            assert!(
                message.contains("format version 9, which is newer than this build reads (1)"),
                "{message}"
            );
            fs::write(&path, original).unwrap();
        }
    }

    #[test]
    fn a_state_file_from_another_checkpoint_is_refused() {
        // Same structure, other content: only the recorded checksums tell.
        let dir = TempDir::new("swapped");
        let other = TempDir::new("swapped-other");
        write_sample_checkpoint(dir.path(), 3, 2, SnapshotKind::Checkpoint);
        let mut operators = sample_task_operators(0, 2);
        operators[0].operator_state[0] = b"split 0.X".to_vec();
        write_task_state(other.path(), "task-0.state", &operators).unwrap();
        fs::copy(
            other.path().join("task-0.state"),
            dir.path().join("task-0.state"),
        )
        .unwrap();
        let message = read_error(dir.path(), "task-0.state").to_string();
        assert!(message.contains("the metadata records"), "{message}");
    }

    #[test]
    fn metadata_that_misses_a_subtask_is_not_written() {
        let dir = TempDir::new("incomplete");
        let task =
            write_task_state(dir.path(), "task-0.state", &sample_task_operators(0, 2)).unwrap();
        let metadata = CheckpointMetadata {
            job_name: "q5".to_string(),
            checkpoint_id: 1,
            kind: SnapshotKind::Checkpoint,
            timestamp_ms: 0,
            tasks: vec![task],
        };
        let error = write_metadata(dir.path(), &metadata).unwrap_err();
        assert!(matches!(error, StateError::Inconsistent { .. }), "{error}");
        assert!(
            error.to_string().contains("no state for subtask(s) 1"),
            "{error}"
        );
        assert!(!dir.path().join(METADATA_FILE_NAME).exists());
    }

    #[test]
    fn metadata_whose_state_file_is_missing_is_not_written() {
        let dir = TempDir::new("unwritten");
        let task =
            write_task_state(dir.path(), "task-0.state", &sample_task_operators(0, 1)).unwrap();
        fs::remove_file(dir.path().join("task-0.state")).unwrap();
        let metadata = CheckpointMetadata {
            job_name: "q5".to_string(),
            checkpoint_id: 1,
            kind: SnapshotKind::Checkpoint,
            timestamp_ms: 0,
            tasks: vec![task],
        };
        let error = write_metadata(dir.path(), &metadata).unwrap_err();
        assert!(matches!(error, StateError::MissingFile { .. }), "{error}");
    }

    #[test]
    fn an_empty_task_and_empty_blobs_round_trip() {
        let dir = TempDir::new("empty");
        let operators = vec![OperatorSubtaskState {
            operator_id: "2:map".to_string(),
            operator_name: "map".to_string(),
            subtask_index: 0,
            parallelism: 1,
            max_parallelism: 1,
            key_groups: vec![(0, Vec::new())],
            operator_state: vec![Vec::new()],
        }];
        let tasks = vec![
            write_task_state(dir.path(), "a.state", &operators).unwrap(),
            write_task_state(dir.path(), "b.state", &[]).unwrap(),
        ];
        let metadata = CheckpointMetadata {
            job_name: "empty".to_string(),
            checkpoint_id: 0,
            kind: SnapshotKind::Checkpoint,
            timestamp_ms: 0,
            tasks,
        };
        write_metadata(dir.path(), &metadata).unwrap();
        let restored = read_checkpoint(dir.path()).unwrap();
        assert_eq!(
            restored.keyed_state("2:map", KeyGroupRange { start: 0, end: 1 }),
            [(0, Vec::new())]
        );
        assert_eq!(restored.operator_state("2:map", 0, 1), [Vec::<u8>::new()]);
    }

    #[test]
    fn task_state_handles_can_travel_between_threads() {
        fn assert_send_clone<T: Send + Clone + 'static>() {}
        assert_send_clone::<TaskStateHandle>();
        assert_send_clone::<CheckpointMetadata>();
    }
}
