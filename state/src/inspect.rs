//! Inspecting a checkpoint or savepoint for people: what it holds and
//! everything that is wrong with it.
//!
//! Unlike [`read_checkpoint`](crate::checkpoint::read_checkpoint), which
//! stops at the first problem, [`inspect`] checks every state file and
//! collects every problem it finds, each naming its file. It runs exactly
//! the checks restore runs, so `is_intact()` means `read_checkpoint`
//! succeeds (barring changes to the files in between).

use std::fmt;
use std::path::{Path, PathBuf};

use crate::checkpoint::{
    read_metadata, resolve_checkpoint_path, validate_metadata, verify_task_file, CheckpointMetadata,
};
use crate::error::StateError;

/// What [`inspect`] found.
#[derive(Debug)]
pub struct InspectReport {
    /// The path that was inspected.
    pub path: PathBuf,
    /// The metadata, if it could be read and decoded.
    pub metadata: Option<CheckpointMetadata>,
    /// Size of `_metadata` in bytes, if it could be read.
    pub metadata_size_bytes: Option<u64>,
    /// Every operator in the metadata, in order of first appearance.
    pub operators: Vec<InspectedOperator>,
    /// Every problem found, in the order found.
    pub problems: Vec<StateError>,
}

/// One operator across its subtasks, as the metadata records it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectedOperator {
    pub operator_id: String,
    pub operator_name: String,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// Sorted by subtask index.
    pub subtasks: Vec<InspectedSubtask>,
}

/// One subtask of an operator: where its state is and whether it is intact.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InspectedSubtask {
    pub subtask_index: u32,
    pub file_name: String,
    /// Recorded size of the whole state file (shared by the task's chain).
    pub file_size: u64,
    /// The key groups with state, sorted.
    pub key_groups: Vec<u32>,
    pub keyed_state_bytes: u64,
    pub operator_state_count: u32,
    pub operator_state_bytes: u64,
    /// Whether every check of its state file held.
    pub file_intact: bool,
}

impl InspectReport {
    /// True iff the metadata and every state file passed every check.
    pub fn is_intact(&self) -> bool {
        self.metadata.is_some() && self.problems.is_empty()
    }
}

/// Inspects the checkpoint or savepoint at `path` (its directory or its
/// `_metadata`), never stopping at the first problem.
pub fn inspect(path: &Path) -> InspectReport {
    let mut report = InspectReport {
        path: path.to_path_buf(),
        metadata: None,
        metadata_size_bytes: None,
        operators: Vec::new(),
        problems: Vec::new(),
    };
    let (directory, metadata_path) = match resolve_checkpoint_path(path) {
        Ok(paths) => paths,
        Err(problem) => {
            report.problems.push(problem);
            return report;
        }
    };
    let (metadata, metadata_size) = match read_metadata(&metadata_path) {
        Ok(read) => read,
        Err(problem) => {
            report.problems.push(problem);
            return report;
        }
    };
    report
        .problems
        .extend(validate_metadata(&metadata_path, &metadata));

    for task in &metadata.tasks {
        let file_intact = match verify_task_file(&directory, task) {
            Ok(_) => true,
            Err(problems) => {
                report.problems.extend(problems);
                false
            }
        };
        for operator in &task.operators {
            let mut key_groups: Vec<u32> = operator
                .key_groups
                .iter()
                .map(|block| block.index)
                .collect();
            key_groups.sort_unstable();
            let subtask = InspectedSubtask {
                subtask_index: operator.subtask_index,
                file_name: task.file_name.clone(),
                file_size: task.file_size,
                key_groups,
                keyed_state_bytes: operator
                    .key_groups
                    .iter()
                    .map(|block| u64::from(block.length))
                    .sum(),
                operator_state_count: operator.operator_state.len() as u32,
                operator_state_bytes: operator
                    .operator_state
                    .iter()
                    .map(|block| u64::from(block.length))
                    .sum(),
                file_intact,
            };
            match report
                .operators
                .iter_mut()
                .find(|known| known.operator_id == operator.operator_id)
            {
                Some(known) => known.subtasks.push(subtask),
                None => report.operators.push(InspectedOperator {
                    operator_id: operator.operator_id.clone(),
                    operator_name: operator.operator_name.clone(),
                    parallelism: operator.parallelism,
                    max_parallelism: operator.max_parallelism,
                    subtasks: vec![subtask],
                }),
            }
        }
    }
    for operator in &mut report.operators {
        operator
            .subtasks
            .sort_by_key(|subtask| subtask.subtask_index);
    }
    report.metadata = Some(metadata);
    report.metadata_size_bytes = Some(metadata_size);
    report
}

impl fmt::Display for InspectReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Strom snapshot '{}'", self.path.display())?;
        match &self.metadata {
            None => writeln!(f, "  metadata:   unreadable (see problems)")?,
            Some(metadata) => {
                writeln!(f, "  job:        {}", metadata.job_name)?;
                writeln!(
                    f,
                    "  {:<11} {}",
                    format!("{}:", metadata.kind),
                    metadata.checkpoint_id
                )?;
                writeln!(
                    f,
                    "  taken:      {} ({} ms since the epoch)",
                    format_utc(metadata.timestamp_ms),
                    metadata.timestamp_ms
                )?;
                writeln!(
                    f,
                    "  size:       {} state files, {} bytes, plus {} bytes of metadata",
                    metadata.tasks.len(),
                    metadata.state_size_bytes(),
                    self.metadata_size_bytes.unwrap_or(0)
                )?;
            }
        }
        for operator in &self.operators {
            writeln!(f)?;
            writeln!(
                f,
                "operator '{}' ({}), parallelism {}, max parallelism {}",
                operator.operator_id,
                operator.operator_name,
                operator.parallelism,
                operator.max_parallelism
            )?;
            let rows: Vec<Vec<String>> = operator
                .subtasks
                .iter()
                .map(|subtask| {
                    vec![
                        subtask.subtask_index.to_string(),
                        subtask.file_name.clone(),
                        subtask.file_size.to_string(),
                        format!(
                            "{} ({})",
                            compact_ranges(&subtask.key_groups),
                            subtask.key_groups.len()
                        ),
                        subtask.keyed_state_bytes.to_string(),
                        subtask.operator_state_count.to_string(),
                        subtask.operator_state_bytes.to_string(),
                        if subtask.file_intact { "ok" } else { "DAMAGED" }.to_string(),
                    ]
                })
                .collect();
            write_table(
                f,
                &[
                    "subtask",
                    "file",
                    "file bytes",
                    "key groups (count)",
                    "keyed bytes",
                    "elements",
                    "element bytes",
                    "checksums",
                ],
                &rows,
            )?;
        }
        writeln!(f)?;
        if self.is_intact() {
            writeln!(f, "intact: every check holds")
        } else {
            writeln!(f, "NOT INTACT: {} problem(s)", self.problems.len())?;
            for problem in &self.problems {
                writeln!(f, "  - {problem}")?;
            }
            Ok(())
        }
    }
}

/// Left-aligned columns, two spaces apart, indented by two.
fn write_table(f: &mut fmt::Formatter<'_>, header: &[&str], rows: &[Vec<String>]) -> fmt::Result {
    let mut widths: Vec<usize> = header.iter().map(|title| title.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut write_row = |cells: Vec<&str>| {
        let line: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        writeln!(f, "  {}", line.join("  ").trim_end())
    };
    write_row(header.to_vec())?;
    for row in rows {
        write_row(row.iter().map(String::as_str).collect())?;
    }
    Ok(())
}

/// Sorted key groups as ranges: `[0, 1, 2, 5, 7, 8]` becomes "0-2, 5, 7-8";
/// none becomes "-".
pub fn compact_ranges(sorted: &[u32]) -> String {
    let mut ranges: Vec<String> = Vec::new();
    let mut iter = sorted.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while end < u32::MAX && iter.peek() == Some(&(end + 1)) {
            end = iter.next().expect("peeked");
        }
        ranges.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    if ranges.is_empty() {
        "-".to_string()
    } else {
        ranges.join(", ")
    }
}

/// Milliseconds since the Unix epoch as "2024-05-01 12:00:00.123 UTC".
fn format_utc(timestamp_ms: u64) -> String {
    let seconds = timestamp_ms / 1000;
    let (hour, minute, second) = (seconds % 86_400 / 3600, seconds % 3600 / 60, seconds % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (seconds / 86_400) as i64 + 719_468;
    let era = days.div_euclid(146_097);
    let day_of_era = days.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}.{:03} UTC",
        timestamp_ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{SnapshotKind, METADATA_FILE_NAME};
    use crate::test_support::*;

    #[test]
    fn key_groups_print_as_ranges() {
        assert_eq!(compact_ranges(&[]), "-");
        assert_eq!(compact_ranges(&[3]), "3");
        assert_eq!(compact_ranges(&[0, 1, 2, 5, 7, 8]), "0-2, 5, 7-8");
        assert_eq!(
            compact_ranges(&[u32::MAX - 1, u32::MAX]),
            format!("{}-{}", u32::MAX - 1, u32::MAX)
        );
    }

    #[test]
    fn timestamps_print_as_utc() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00.000 UTC");
        assert_eq!(format_utc(951_782_400_123), "2000-02-29 00:00:00.123 UTC");
        assert_eq!(format_utc(1_714_564_800_000), "2024-05-01 12:00:00.000 UTC");
    }

    #[test]
    fn an_intact_checkpoint_is_reported_in_full() {
        let dir = TempDir::new("inspect-intact");
        write_sample_checkpoint(dir.path(), 42, 2, SnapshotKind::Checkpoint);
        let report = inspect(dir.path());
        assert!(report.is_intact(), "{report}");
        assert_eq!(report.operators.len(), 2);
        let window = &report.operators[1];
        assert_eq!(window.operator_id, WINDOW_ID);
        assert_eq!(
            (window.parallelism, window.max_parallelism),
            (2, MAX_PARALLELISM)
        );
        assert_eq!(window.subtasks[1].file_name, "task-1.state");
        assert_eq!(window.subtasks[1].key_groups.len(), 64 - 13);
        assert_eq!(report.operators[0].subtasks[1].operator_state_count, 3);
        let text = report.to_string();
        for expected in [
            "job:        nexmark q5",
            "checkpoint: 42",
            "2024-05-01 12:00:00.042 UTC",
            "operator '3:window(q5)' (q5 window), parallelism 2, max parallelism 128",
            "1-4, 6-9, 11-14",
            "intact: every check holds",
        ] {
            assert!(text.contains(expected), "no '{expected}' in:\n{text}");
        }
    }

    #[test]
    fn a_damaged_checkpoint_reports_every_problem() {
        let dir = TempDir::new("inspect-damaged");
        let metadata = write_sample_checkpoint(dir.path(), 42, 3, SnapshotKind::Checkpoint);
        // Two damaged blocks in task 0, task 1 truncated, task 2 intact.
        let path = dir.path().join("task-0.state");
        let mut bytes = std::fs::read(&path).unwrap();
        for block in &metadata.tasks[0].operators[1].key_groups[1..3] {
            bytes[(block.offset + 24) as usize] ^= 1;
        }
        std::fs::write(&path, bytes).unwrap();
        let path = dir.path().join("task-1.state");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 30]).unwrap();

        let report = inspect(dir.path());
        assert!(!report.is_intact());
        let messages: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            messages
                .iter()
                .filter(|m| m.contains("task-0.state") && m.contains("fails its checksum"))
                .count(),
            2,
            "{messages:#?}"
        );
        assert!(messages
            .iter()
            .any(|m| m.contains("task-1.state") && m.contains("is truncated")));
        assert!(!messages.iter().any(|m| m.contains("task-2.state")));
        let window = &report.operators[1];
        let intact: Vec<bool> = window.subtasks.iter().map(|s| s.file_intact).collect();
        assert_eq!(intact, [false, false, true]);
        let text = report.to_string();
        assert!(
            text.contains("DAMAGED") && text.contains("NOT INTACT"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_metadata_file_is_reported() {
        let dir = TempDir::new("inspect-no-metadata");
        write_sample_checkpoint(dir.path(), 1, 1, SnapshotKind::Checkpoint);
        std::fs::remove_file(dir.path().join(METADATA_FILE_NAME)).unwrap();
        let report = inspect(dir.path());
        assert!(!report.is_intact());
        assert!(report.metadata.is_none());
        let text = report.to_string();
        assert!(text.contains("metadata:   unreadable"), "{text}");
        assert!(text.contains("the checkpoint never completed"), "{text}");
    }
}
