//! Where checkpoints of one job run live, and which of them are kept.
//!
//! `CheckpointStorage` owns `<checkpoint-dir>/<job-dir-name>/` and its
//! `chk-<id>/` subdirectories (see [`crate::checkpoint`] for what is inside).
//! Retention, each time checkpoint `n` completes:
//!
//! 1. the caller has made `chk-n/_metadata` durable ([`write_metadata`]
//!    returned `Ok`); `complete(n)` checks that it exists;
//! 2. it lists the `chk-<id>` directories with `id <= n`: those with a
//!    `_metadata` are completed, the others with `id < n` are leftovers of
//!    aborted checkpoints;
//! 3. it deletes every leftover, and every completed checkpoint but the
//!    newest `retained`;
//! 4. a completed checkpoint is deleted `_metadata` first (then the
//!    directory is fsynced), so a crash in the middle leaves an incomplete
//!    directory, never a `_metadata` whose state files are gone.
//!
//! Invariants: a directory with `id > n` is never touched, as it may belong
//! to a checkpoint in flight; the newest completed checkpoint is never
//! deleted, since `retained >= 1`.
//!
//! [`write_metadata`]: crate::checkpoint::write_metadata

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use crate::checkpoint::METADATA_FILE_NAME;
use crate::error::StateError;
use crate::file_format::sync_directory;

/// Prefix of a checkpoint directory's name; the id follows in decimal.
pub const CHECKPOINT_DIR_PREFIX: &str = "chk-";

/// How many names `create_savepoint_dir` tries before it gives up.
const SAVEPOINT_NAME_ATTEMPTS_MAX: u32 = 16;

/// The checkpoint directories of one job run, and their retention.
#[derive(Debug)]
pub struct CheckpointStorage {
    root: PathBuf,
    retained: u32,
    latest_completed: Option<u64>,
}

impl CheckpointStorage {
    /// Creates `checkpoint_dir/job_dir_name/` (and its parents) durably.
    /// `retained` (at least 1) is how many completed checkpoints are kept.
    pub fn new(
        checkpoint_dir: &Path,
        job_dir_name: &str,
        retained: u32,
    ) -> Result<Self, StateError> {
        assert!(
            retained >= 1,
            "at least one completed checkpoint must be kept"
        );
        assert!(
            crate::file_format::is_plain_file_name(job_dir_name),
            "'{job_dir_name}' cannot name a job directory"
        );
        let root = checkpoint_dir.join(job_dir_name);
        fs::create_dir_all(&root).map_err(|error| StateError::io("create", &root, error))?;
        sync_directory(checkpoint_dir)?;
        if let Some(parent) = checkpoint_dir
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            sync_directory(parent)?;
        }
        let latest_completed =
            latest_completed_checkpoint(&root).and_then(|path| checkpoint_id_of(&path));
        Ok(CheckpointStorage {
            root,
            retained,
            latest_completed,
        })
    }

    /// `<checkpoint-dir>/<job-dir-name>/`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The newest checkpoint passed to `complete`, or found complete at `new`.
    pub fn latest_completed(&self) -> Option<u64> {
        self.latest_completed
    }

    /// `root/chk-<id>`, whether or not it exists.
    pub fn checkpoint_path(&self, id: u64) -> PathBuf {
        self.root.join(format!("{CHECKPOINT_DIR_PREFIX}{id}"))
    }

    /// Creates `chk-<id>/` durably (protocol step 1) and returns its path.
    /// An existing directory of that name (from an earlier attempt) is reused.
    pub fn create_checkpoint_dir(&self, id: u64) -> Result<PathBuf, StateError> {
        let path = self.checkpoint_path(id);
        fs::create_dir_all(&path).map_err(|error| StateError::io("create", &path, error))?;
        sync_directory(&self.root)?;
        Ok(path)
    }

    /// Applies retention after checkpoint `id` completed (see the module doc)
    /// and returns the directories it deleted.
    pub fn complete(&mut self, id: u64) -> Result<Vec<PathBuf>, StateError> {
        let metadata_path = self.checkpoint_path(id).join(METADATA_FILE_NAME);
        if !metadata_path.is_file() {
            return Err(StateError::MissingMetadata {
                path: metadata_path,
            });
        }
        self.latest_completed = Some(self.latest_completed.map_or(id, |latest| latest.max(id)));

        let mut completed = Vec::new();
        let mut deleted = Vec::new();
        for (other, path) in list_checkpoint_dirs(&self.root)? {
            if other > id {
                continue;
            }
            if path.join(METADATA_FILE_NAME).is_file() {
                completed.push((other, path));
            } else if other < id {
                remove_checkpoint_dir(&path)?;
                deleted.push(path);
            }
        }
        completed.sort_unstable_by_key(|(id, _)| std::cmp::Reverse(*id));
        for (_, path) in completed.into_iter().skip(self.retained as usize) {
            remove_checkpoint_dir(&path)?;
            deleted.push(path);
        }
        if !deleted.is_empty() {
            sync_directory(&self.root)?;
        }
        deleted.sort();
        Ok(deleted)
    }

    /// Deletes the directory of checkpoint `id`, which was aborted (protocol
    /// step 5). Nothing to delete is not an error.
    pub fn discard(&self, id: u64) -> Result<(), StateError> {
        let path = self.checkpoint_path(id);
        if !path.exists() {
            return Ok(());
        }
        remove_checkpoint_dir(&path)?;
        sync_directory(&self.root)
    }
}

/// The highest `chk-<id>` directory under `job_root` that holds a
/// `_metadata`, or `None`. It is complete but not yet verified:
/// `read_checkpoint` does that.
pub fn latest_completed_checkpoint(job_root: &Path) -> Option<PathBuf> {
    list_checkpoint_dirs(job_root)
        .ok()?
        .into_iter()
        .filter(|(_, path)| path.join(METADATA_FILE_NAME).is_file())
        .max_by_key(|(id, _)| *id)
        .map(|(_, path)| path)
}

/// Creates a fresh savepoint directory
/// `target_dir/savepoint-<job_name>-<id>-<6 random hex digits>` durably and
/// returns its path. Characters of `job_name` other than ASCII letters,
/// digits, `-` and `_` become `_`.
pub fn create_savepoint_dir(
    target_dir: &Path,
    job_name: &str,
    id: u64,
) -> Result<PathBuf, StateError> {
    fs::create_dir_all(target_dir).map_err(|error| StateError::io("create", target_dir, error))?;
    let job: String = job_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut last_error = None;
    for _ in 0..SAVEPOINT_NAME_ATTEMPTS_MAX {
        // RandomState is seeded from the OS per process and varies per
        // instance: enough to keep two savepoints of one id apart.
        let suffix = RandomState::new().build_hasher().finish() & 0xff_ffff;
        let path = target_dir.join(format!("savepoint-{job}-{id}-{suffix:06x}"));
        match fs::create_dir(&path) {
            Ok(()) => {
                sync_directory(target_dir)?;
                return Ok(path);
            }
            Err(error) if error.kind() == ErrorKind::AlreadyExists => {
                last_error = Some((path, error))
            }
            Err(error) => return Err(StateError::io("create", &path, error)),
        }
    }
    let (path, error) = last_error.expect("at least one attempt");
    Err(StateError::io("create", &path, error))
}

/// The id of a `chk-<id>` directory, from its name.
pub fn checkpoint_id_of(path: &Path) -> Option<u64> {
    let digits = path
        .file_name()?
        .to_str()?
        .strip_prefix(CHECKPOINT_DIR_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Every `chk-<id>` directory directly under `root`, unsorted.
fn list_checkpoint_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>, StateError> {
    let entries = fs::read_dir(root).map_err(|error| StateError::io("list", root, error))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|error| StateError::io("list", root, error))?;
        let path = entry.path();
        if let Some(id) = checkpoint_id_of(&path) {
            if path.is_dir() {
                dirs.push((id, path));
            }
        }
    }
    Ok(dirs)
}

/// Deletes a checkpoint directory, `_metadata` first (retention step 4).
fn remove_checkpoint_dir(path: &Path) -> Result<(), StateError> {
    let metadata_path = path.join(METADATA_FILE_NAME);
    match fs::remove_file(&metadata_path) {
        Ok(()) => sync_directory(path)?,
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(StateError::io("delete", &metadata_path, error)),
    }
    fs::remove_dir_all(path).map_err(|error| StateError::io("delete", path, error))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{read_checkpoint, SnapshotKind};
    use crate::test_support::{write_sample_checkpoint, TempDir};

    fn checkpoint(storage: &CheckpointStorage, id: u64) -> PathBuf {
        let dir = storage.create_checkpoint_dir(id).unwrap();
        write_sample_checkpoint(&dir, id, 1, SnapshotKind::Checkpoint);
        dir
    }

    fn remaining(storage: &CheckpointStorage) -> Vec<u64> {
        let mut ids: Vec<u64> = list_checkpoint_dirs(storage.root())
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        ids.sort_unstable();
        ids
    }

    #[test]
    fn only_the_newest_retained_checkpoints_are_kept() {
        let base = TempDir::new("retention");
        let mut storage =
            CheckpointStorage::new(&base.path().join("checkpoints"), "job-a", 2).unwrap();
        assert_eq!(
            storage.root(),
            base.path().join("checkpoints").join("job-a")
        );
        assert!(storage.complete(1).is_err(), "chk-1 has no metadata yet");
        checkpoint(&storage, 1);
        assert_eq!(storage.complete(1).unwrap(), Vec::<PathBuf>::new());
        checkpoint(&storage, 2);
        assert_eq!(storage.complete(2).unwrap(), Vec::<PathBuf>::new());
        checkpoint(&storage, 3);
        assert_eq!(
            storage.complete(3).unwrap(),
            vec![storage.checkpoint_path(1)]
        );
        assert_eq!(remaining(&storage), [2, 3]);
        assert_eq!(storage.latest_completed(), Some(3));
        read_checkpoint(&storage.checkpoint_path(2)).unwrap();
    }

    #[test]
    fn aborted_older_checkpoints_are_removed_and_newer_ones_left_alone() {
        let base = TempDir::new("aborted");
        let mut storage = CheckpointStorage::new(base.path(), "job", 2).unwrap();
        checkpoint(&storage, 1);
        storage.complete(1).unwrap();
        // chk-2 aborted halfway (a state file, no metadata); chk-3 was
        // discarded explicitly; chk-5 is still in flight while 4 completes.
        let aborted = storage.create_checkpoint_dir(2).unwrap();
        fs::write(aborted.join("task-0.state"), b"partial").unwrap();
        let discarded = storage.create_checkpoint_dir(3).unwrap();
        storage.discard(3).unwrap();
        assert!(!discarded.exists());
        storage.discard(3).unwrap();
        let pending = storage.create_checkpoint_dir(5).unwrap();
        fs::write(pending.join("task-0.state"), b"in flight").unwrap();
        checkpoint(&storage, 4);
        assert_eq!(storage.complete(4).unwrap(), vec![aborted]);
        assert_eq!(remaining(&storage), [1, 4, 5]);
        assert!(pending.join("task-0.state").exists());
    }

    #[test]
    fn the_latest_completed_checkpoint_has_metadata() {
        let base = TempDir::new("latest");
        let mut storage = CheckpointStorage::new(base.path(), "job", 3).unwrap();
        assert_eq!(latest_completed_checkpoint(storage.root()), None);
        checkpoint(&storage, 8);
        storage.complete(8).unwrap();
        // Numeric, not lexical, order: 9 < 10; chk-10 never completed.
        checkpoint(&storage, 9);
        storage.create_checkpoint_dir(10).unwrap();
        fs::create_dir(storage.root().join("chk-x")).unwrap();
        fs::create_dir(storage.root().join("chk-+11")).unwrap();
        assert_eq!(
            latest_completed_checkpoint(storage.root()),
            Some(storage.checkpoint_path(9))
        );
        assert_eq!(
            latest_completed_checkpoint(&base.path().join("nothing")),
            None
        );
        // A new storage on the same root picks up where the old one was.
        let reopened = CheckpointStorage::new(base.path(), "job", 3).unwrap();
        assert_eq!(reopened.latest_completed(), Some(9));
    }

    #[test]
    fn savepoints_get_fresh_self_contained_directories() {
        let base = TempDir::new("savepoints");
        let target = base.path().join("savepoints");
        let first = create_savepoint_dir(&target, "nexmark q5/run", 12).unwrap();
        let second = create_savepoint_dir(&target, "nexmark q5/run", 12).unwrap();
        assert_ne!(first, second);
        let name = first.file_name().unwrap().to_str().unwrap();
        assert!(name.starts_with("savepoint-nexmark_q5_run-12-"), "{name}");
        assert_eq!(name.len(), "savepoint-nexmark_q5_run-12-".len() + 6);
        write_sample_checkpoint(&first, 12, 2, SnapshotKind::Savepoint);
        // Self-contained: it restores after the directory moved.
        let moved = base.path().join("moved");
        fs::rename(&first, &moved).unwrap();
        let restored = read_checkpoint(&moved).unwrap();
        assert_eq!(restored.metadata().kind, SnapshotKind::Savepoint);
        assert_eq!(restored.metadata().checkpoint_id, 12);
    }
}
