//! Helpers for this crate's tests: temporary directories and sample jobs.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use strom_core::key::KeyGroupRange;

use crate::checkpoint::{
    write_metadata, write_task_state, CheckpointMetadata, OperatorSubtaskState, SnapshotKind,
};

/// A directory under the system temporary directory, deleted on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "strom-state-{name}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create a temporary directory");
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) const MAX_PARALLELISM: u32 = 128;
pub(crate) const SOURCE_ID: &str = "1:source(bids)";
pub(crate) const WINDOW_ID: &str = "3:window(q5)";

/// The blob key group `key_group` holds in the sample job, or `None` for
/// the key groups that hold nothing (every fifth).
// `u32::is_multiple_of` needs Rust 1.87; the workspace supports 1.85.
#[allow(clippy::manual_is_multiple_of)]
pub(crate) fn sample_key_group_blob(key_group: u32) -> Option<Vec<u8>> {
    (key_group % 5 != 0).then(|| {
        format!("window state of key group {key_group};")
            .repeat(1 + key_group as usize % 4)
            .into_bytes()
    })
}

/// The operator state elements of source subtask `subtask`.
pub(crate) fn sample_source_elements(subtask: u32) -> Vec<Vec<u8>> {
    (0..subtask + 2)
        .map(|element| format!("split {subtask}.{element}").into_bytes())
        .collect()
}

/// The chain of one sample task: a source with operator state, then a
/// window with keyed state.
pub(crate) fn sample_task_operators(subtask: u32, parallelism: u32) -> Vec<OperatorSubtaskState> {
    let range = KeyGroupRange::for_subtask(MAX_PARALLELISM, parallelism, subtask);
    vec![
        OperatorSubtaskState {
            operator_id: SOURCE_ID.to_string(),
            operator_name: "bids source".to_string(),
            subtask_index: subtask,
            parallelism,
            max_parallelism: MAX_PARALLELISM,
            key_groups: Vec::new(),
            operator_state: sample_source_elements(subtask),
        },
        OperatorSubtaskState {
            operator_id: WINDOW_ID.to_string(),
            operator_name: "q5 window".to_string(),
            subtask_index: subtask,
            parallelism,
            max_parallelism: MAX_PARALLELISM,
            key_groups: (range.start..range.end)
                .filter_map(|group| sample_key_group_blob(group).map(|blob| (group, blob)))
                .collect(),
            operator_state: Vec::new(),
        },
    ]
}

/// The file name of sample task `subtask`.
pub(crate) fn sample_file_name(subtask: u32) -> String {
    format!("task-{subtask}.state")
}

/// Writes a complete sample checkpoint of `parallelism` tasks into `dir`.
pub(crate) fn write_sample_checkpoint(
    dir: &Path,
    checkpoint_id: u64,
    parallelism: u32,
    kind: SnapshotKind,
) -> CheckpointMetadata {
    let tasks = (0..parallelism)
        .map(|subtask| {
            write_task_state(
                dir,
                &sample_file_name(subtask),
                &sample_task_operators(subtask, parallelism),
            )
            .expect("write task state")
        })
        .collect();
    let metadata = CheckpointMetadata {
        job_name: "nexmark q5".to_string(),
        checkpoint_id,
        kind,
        timestamp_ms: 1_714_564_800_000 + checkpoint_id,
        tasks,
    };
    write_metadata(dir, &metadata).expect("write metadata");
    metadata
}
