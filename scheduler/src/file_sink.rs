//! A file sink with exactly-once output: part files committed by
//! checkpoints (two-phase commit), as Flink's `FileSink`.
//!
//! Protocol, per sink subtask:
//! 1. records are written, one line each, into a hidden in-progress file
//!    `.part-<run>-<subtask>-<n>.inprogress` of the output directory
//!    (`<run>` is random per subtask instance, so attempts never collide);
//! 2. at a checkpoint barrier (pre-commit) the in-progress file is flushed,
//!    fsynced and closed; it becomes pending for that checkpoint, and the
//!    list of pending files is the sink's checkpointed state;
//! 3. when the checkpoint is complete (every task's state is durable), the
//!    pending files it covers are renamed to their visible names
//!    `part-<run>-<subtask>-<n>` and the directory is fsynced (commit);
//! 4. a restored sink commits the pending files of the checkpoint it
//!    restores, which completed but whose commit may not have happened;
//! 5. at the end of a bounded input the last file is pre-committed and
//!    everything still pending is left to the JobMaster, which commits it
//!    only once every task of the job has finished.
//!
//! Invariant: a visible part file holds only records that a completed
//! checkpoint (or the finished job) covers, so after any number of failures
//! the visible files hold exactly the lines of a run without failures.
//! In-progress files of a failed attempt are never committed: they stay as
//! hidden files (as in Flink), which readers of the directory ignore.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use strom_core::function::SinkFunction;
use strom_core::operator::OperatorContext;
use strom_core::snapshot::{Committable, StateReader, StateWriter};
use strom_core::Timestamp;

/// The checkpoint id of files pending at the end of the input.
const END_OF_INPUT: u64 = u64::MAX;

/// Writes records as lines into part files, committed by checkpoints.
pub struct FileSink<T> {
    directory: PathBuf,
    format: Arc<dyn Fn(&T, &mut String) + Send + Sync>,
    run: String,
    subtask: u32,
    part_count: u64,
    line: String,
    current: Option<(PathBuf, BufWriter<File>)>,
    /// Pre-committed files: the checkpoint that covers each.
    pending: Vec<(u64, Committable)>,
}

impl<T> Clone for FileSink<T> {
    fn clone(&self) -> Self {
        // Each subtask opens its own files; a clone starts with none.
        FileSink {
            directory: self.directory.clone(),
            format: self.format.clone(),
            run: self.run.clone(),
            subtask: self.subtask,
            part_count: 0,
            line: String::new(),
            current: None,
            pending: Vec::new(),
        }
    }
}

impl<T> FileSink<T> {
    /// A sink writing into `directory` each record as the line `format`
    /// appends to the string it gets.
    pub fn new(
        directory: impl Into<PathBuf>,
        format: impl Fn(&T, &mut String) + Send + Sync + 'static,
    ) -> Self {
        FileSink {
            directory: directory.into(),
            format: Arc::new(format),
            run: String::new(),
            subtask: 0,
            part_count: 0,
            line: String::new(),
            current: None,
            pending: Vec::new(),
        }
    }

    fn fail(&self, what: &str, path: &Path, error: std::io::Error) -> ! {
        panic!("file sink: cannot {what} '{}': {error}", path.display())
    }

    /// Pre-commits the in-progress file, if any, for `checkpoint_id`.
    fn roll(&mut self, checkpoint_id: u64) {
        let Some((path, writer)) = self.current.take() else {
            return;
        };
        let file = writer
            .into_inner()
            .unwrap_or_else(|error| self.fail("write", &path, error.into_error()));
        file.sync_all()
            .unwrap_or_else(|error| self.fail("fsync", &path, error));
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .and_then(|name| name.strip_prefix('.'))
            .and_then(|name| name.strip_suffix(".inprogress"))
            .expect("an in-progress file name")
            .to_string();
        let to = self.directory.join(name);
        self.pending
            .push((checkpoint_id, Committable { from: path, to }));
    }

    fn commit_up_to(&mut self, checkpoint_id: u64) {
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(checkpoint, _)| *checkpoint <= checkpoint_id);
        self.pending = later;
        let due: Vec<Committable> = due
            .into_iter()
            .map(|(_, committable)| committable)
            .collect();
        if let Err(error) = crate::jobmanager::commit_all(&due) {
            panic!("file sink: {error}");
        }
    }
}

fn random_run_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(std::process::id().into());
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

impl<T: 'static> SinkFunction<T> for FileSink<T> {
    fn open(&mut self, context: &OperatorContext) {
        self.run = random_run_name();
        self.subtask = context.subtask_index;
        std::fs::create_dir_all(&self.directory)
            .unwrap_or_else(|error| self.fail("create", &self.directory.clone(), error));
    }

    fn invoke(&mut self, record: T, _timestamp: Timestamp) {
        if self.current.is_none() {
            let name = format!(
                ".part-{}-{}-{}.inprogress",
                self.run, self.subtask, self.part_count
            );
            self.part_count += 1;
            let path = self.directory.join(name);
            let file =
                File::create(&path).unwrap_or_else(|error| self.fail("create", &path, error));
            self.current = Some((path, BufWriter::new(file)));
        }
        self.line.clear();
        (self.format)(&record, &mut self.line);
        self.line.push('\n');
        let (path, writer) = self.current.as_mut().expect("an open part file");
        if let Err(error) = writer.write_all(self.line.as_bytes()) {
            let path = path.clone();
            self.fail("write", &path, error);
        }
    }

    fn snapshot_state(&mut self, checkpoint_id: u64) -> Vec<Vec<u8>> {
        self.roll(checkpoint_id);
        self.pending
            .iter()
            .map(|(checkpoint, committable)| {
                let mut writer = StateWriter::default();
                writer.put_u64(*checkpoint);
                writer.put_str(&committable.from.to_string_lossy());
                writer.put_str(&committable.to.to_string_lossy());
                writer.bytes
            })
            .collect()
    }

    fn restore_state(&mut self, elements: Vec<Vec<u8>>) -> Result<(), String> {
        for element in elements {
            let mut reader = StateReader::new(&element);
            let checkpoint = reader.u64()?;
            let from = PathBuf::from(reader.string()?);
            let to = PathBuf::from(reader.string()?);
            self.pending.push((checkpoint, Committable { from, to }));
        }
        // The checkpoint restored from is complete: commit what it covers.
        self.commit_up_to(u64::MAX);
        Ok(())
    }

    fn notify_checkpoint_complete(&mut self, checkpoint_id: u64) {
        self.commit_up_to(checkpoint_id);
    }

    fn finish(&mut self, context: &OperatorContext) {
        self.roll(END_OF_INPUT);
        context.committables.borrow_mut().extend(
            std::mem::take(&mut self.pending)
                .into_iter()
                .map(|(_, committable)| committable),
        );
    }
}
