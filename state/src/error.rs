//! The one error type of strom-state.
//!
//! Every variant names the file or directory it is about, so a message read
//! in a log, without the code at hand, says which file to look at and what is
//! wrong with it. Problems in a file's bytes are operating errors (a disk, a
//! copy or a crash did it) and come back as a `StateError`; misuse of the API
//! by the engine is a programmer error and panics.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Everything that can go wrong writing, reading or managing checkpoints.
#[derive(Debug)]
pub enum StateError {
    /// An operating system call failed.
    Io {
        /// What we were doing, as a verb phrase: "create", "read", "rename ... to".
        operation: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Neither a checkpoint directory nor a metadata file exists at `path`.
    NoCheckpoint { path: PathBuf },
    /// The directory exists but has no `_metadata`: the checkpoint never
    /// completed, or the directory is not a checkpoint.
    MissingMetadata { path: PathBuf },
    /// A state file that the metadata references does not exist.
    MissingFile { path: PathBuf },
    /// The file does not start with the magic bytes this file kind needs.
    NotStromFile {
        path: PathBuf,
        /// Which kind of file was expected: "state file" or "metadata file".
        expected: &'static str,
        /// The first bytes of the file (at most 8).
        found: Vec<u8>,
    },
    /// The file was written by a newer Strom whose format this build cannot read.
    NewerVersion {
        path: PathBuf,
        version: u32,
        supported: u32,
    },
    /// The file is shorter than its header or the metadata says it must be.
    Truncated {
        path: PathBuf,
        size: u64,
        expected: u64,
        /// Who recorded `expected`: "the metadata records", "its header records".
        recorded_by: &'static str,
    },
    /// The file's bytes are wrong: a checksum fails, a structure is cut off,
    /// or it disagrees with the metadata. `problem` is a complete sentence
    /// fragment, e.g. "block 4 (key group 17 of operator '3:window') fails
    /// its checksum (stored 0x1234abcd, computed 0x5678ef01)".
    Damaged { path: PathBuf, problem: String },
    /// The metadata is intact but describes an unusable checkpoint (a missing
    /// subtask, a key group held twice, ...), or a caller handed
    /// `write_metadata` such a description.
    Inconsistent { path: PathBuf, problem: String },
    /// One state blob is larger than a block can hold (`u32::MAX` bytes).
    BlockTooLarge {
        path: PathBuf,
        operator_id: String,
        what: String,
        size: u64,
    },
}

impl StateError {
    /// The file or directory the error is about.
    pub fn path(&self) -> &Path {
        match self {
            StateError::Io { path, .. }
            | StateError::NoCheckpoint { path }
            | StateError::MissingMetadata { path }
            | StateError::MissingFile { path }
            | StateError::NotStromFile { path, .. }
            | StateError::NewerVersion { path, .. }
            | StateError::Truncated { path, .. }
            | StateError::Damaged { path, .. }
            | StateError::Inconsistent { path, .. }
            | StateError::BlockTooLarge { path, .. } => path,
        }
    }

    pub(crate) fn io(operation: &'static str, path: &Path, source: io::Error) -> StateError {
        StateError::Io {
            operation,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn damaged(path: &Path, problem: impl Into<String>) -> StateError {
        StateError::Damaged {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }

    pub(crate) fn inconsistent(path: &Path, problem: impl Into<String>) -> StateError {
        StateError::Inconsistent {
            path: path.to_path_buf(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StateError::Io {
                operation,
                path,
                source,
            } => write!(f, "could not {operation} '{}': {source}", path.display()),
            StateError::NoCheckpoint { path } => write!(
                f,
                "no checkpoint at '{}': the path does not exist",
                path.display()
            ),
            StateError::MissingMetadata { path } => write!(
                f,
                "no metadata file '{}': the checkpoint never completed, or this is not a \
                 checkpoint directory",
                path.display()
            ),
            StateError::MissingFile { path } => {
                write!(f, "checkpoint file '{}' is missing", path.display())
            }
            StateError::NotStromFile {
                path,
                expected,
                found,
            } => write!(
                f,
                "checkpoint file '{}' is not a Strom {expected}: it starts with {}",
                path.display(),
                escape_bytes(found)
            ),
            StateError::NewerVersion {
                path,
                version,
                supported,
            } => write!(
                f,
                "checkpoint file '{}' has format version {version}, which is newer than this \
                 build reads ({supported})",
                path.display()
            ),
            StateError::Truncated {
                path,
                size,
                expected,
                recorded_by,
            } => write!(
                f,
                "checkpoint file '{}' is truncated: {size} bytes, {recorded_by} {expected}",
                path.display()
            ),
            StateError::Damaged { path, problem } => {
                write!(
                    f,
                    "checkpoint file '{}' is damaged: {problem}",
                    path.display()
                )
            }
            StateError::Inconsistent { path, problem } => {
                write!(
                    f,
                    "checkpoint '{}' is inconsistent: {problem}",
                    path.display()
                )
            }
            StateError::BlockTooLarge {
                path,
                operator_id,
                what,
                size,
            } => write!(
                f,
                "cannot write '{}': {what} of operator '{operator_id}' is {size} bytes, more \
                 than a block holds ({} bytes)",
                path.display(),
                u32::MAX
            ),
        }
    }
}

impl std::error::Error for StateError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StateError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Bytes as a Rust byte string literal, e.g. `b"PK\x03\x04"`, for messages.
fn escape_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing (the file is empty)".to_string();
    }
    let escaped: String = bytes
        .iter()
        .flat_map(|byte| std::ascii::escape_default(*byte))
        .map(char::from)
        .collect();
    format!("b\"{escaped}\"")
}
