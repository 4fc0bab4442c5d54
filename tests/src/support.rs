//! Helpers for the end-to-end tests: a command line that keeps running
//! while the test reads its stderr line by line and acts on it (or kills
//! it), temporary directories that clean up after themselves, and ways to
//! damage a copy of a savepoint the way a disk or an operator might.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cli::Finished;

/// A directory under [`std::env::temp_dir`] with a name no other test or
/// test process uses, removed with everything in it when dropped.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `strom-<label>-<process id>-<sequence>-<nanoseconds>`.
    pub fn new(label: &str) -> Self {
        static SEQUENCE: AtomicU64 = AtomicU64::new(0);
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed);
        let nanoseconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|since_epoch| since_epoch.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "strom-{label}-{}-{sequence}-{nanoseconds}",
            std::process::id()
        ));
        fs::create_dir_all(&path)
            .unwrap_or_else(|error| panic!("cannot create {}: {error}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory, as a string for a command line.
    pub fn join(&self, name: &str) -> String {
        path_text(&self.path.join(name))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A path as a command-line argument; the tests only make UTF-8 paths.
pub fn path_text(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("{} is not UTF-8", path.display()))
        .to_string()
}

/// A command line still running, whose stderr the test reads line by line
/// while it runs. Dropping it kills the process if it still runs, so a
/// failed test leaves nothing behind.
pub struct RunningCommand {
    child: Child,
    command_line: String,
    started: Instant,
    stderr_lines: Receiver<String>,
    stderr_seen: Vec<String>,
    stdout_reader: Option<JoinHandle<String>>,
}

impl RunningCommand {
    pub fn start(binary: &str, arguments: &[&str]) -> Self {
        let command_line = format!("{binary} {}", arguments.join(" "));
        let mut child = Command::new(binary)
            .args(arguments)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start `{command_line}`: {error}"));
        let mut stdout_pipe = child.stdout.take().expect("piped stdout");
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        // Both pipes are drained on threads so that a chatty child never
        // blocks on a full pipe while the test waits for something else.
        let stdout_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout_pipe.read_to_string(&mut text);
            text
        });
        let (sender, stderr_lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        RunningCommand {
            child,
            command_line,
            started: Instant::now(),
            stderr_lines,
            stderr_seen: Vec::new(),
            stdout_reader: Some(stdout_reader),
        }
    }

    /// Reads stderr until a line satisfies `matches` and returns that line.
    /// Fails the test, showing what was printed, if the process ends first
    /// or no such line comes within `deadline`; `what` names the line in
    /// that message.
    pub fn wait_for_stderr_line(
        &mut self,
        what: &str,
        deadline: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let waiting_since = Instant::now();
        loop {
            let remaining = deadline.saturating_sub(waiting_since.elapsed());
            match self.stderr_lines.recv_timeout(remaining) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "`{}` printed no {what} within {deadline:?}; its stderr so far:\n{}",
                    self.command_line,
                    self.stderr_seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait();
                    panic!(
                        "`{}` ended ({status:?}) without printing {what}; its stderr:\n{}",
                        self.command_line,
                        self.stderr_seen.join("\n")
                    )
                }
            }
        }
    }

    /// Whether the process still runs (it has not exited, nor been killed).
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process with SIGKILL, as a crash would end it: it gets no
    /// chance to close its connections itself. Waits until it is gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit and returns all it printed, failing the
    /// test if it is still running after `deadline`.
    pub fn finish(mut self, deadline: Duration) -> Finished {
        let waiting_since = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the child") {
                break status;
            }
            if waiting_since.elapsed() > deadline {
                // All it printed until now, not only what was waited for.
                self.stderr_seen.extend(self.stderr_lines.try_iter());
                panic!(
                    "`{}` did not finish within {deadline:?}: it hangs; its stderr so far:\n{}",
                    self.command_line,
                    self.stderr_seen.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let stdout = self
            .stdout_reader
            .take()
            .expect("finish runs once")
            .join()
            .expect("stdout reader");
        // The process has exited, so its stderr ends soon: the reader sends
        // what is left and hangs up.
        while let Ok(line) = self.stderr_lines.recv_timeout(deadline) {
            self.stderr_seen.push(line);
        }
        let mut stderr = self.stderr_seen.join("\n");
        if !stderr.is_empty() {
            stderr.push('\n');
        }
        Finished {
            code: status.code(),
            stdout,
            stderr,
            elapsed: self.started.elapsed(),
        }
    }
}

impl Drop for RunningCommand {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Copies a savepoint or checkpoint directory, which holds only files.
pub fn copy_snapshot(from: &Path, to: &Path) {
    fs::create_dir_all(to)
        .unwrap_or_else(|error| panic!("cannot create {}: {error}", to.display()));
    for entry in
        fs::read_dir(from).unwrap_or_else(|error| panic!("cannot list {}: {error}", from.display()))
    {
        let entry = entry.expect("a directory entry");
        assert!(
            entry.file_type().expect("a file type").is_file(),
            "a snapshot directory holds only files: {}",
            entry.path().display()
        );
        fs::copy(entry.path(), to.join(entry.file_name()))
            .unwrap_or_else(|error| panic!("cannot copy {}: {error}", entry.path().display()));
    }
}

/// The largest `task-*.state` file of a snapshot directory: the one with the
/// most keyed state, where damage matters most.
pub fn largest_state_file(snapshot: &Path) -> PathBuf {
    fs::read_dir(snapshot)
        .unwrap_or_else(|error| panic!("cannot list {}: {error}", snapshot.display()))
        .map(|entry| entry.expect("a directory entry").path())
        .filter(|path| {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            name.starts_with("task-") && name.ends_with(".state")
        })
        .max_by_key(|path| {
            fs::metadata(path)
                .map(|metadata| metadata.len())
                .unwrap_or(0)
        })
        .unwrap_or_else(|| panic!("{} holds no task-*.state file", snapshot.display()))
}

/// Flips one bit of the byte in the middle of `file`.
pub fn flip_a_bit_in_the_middle(file: &Path) {
    let mut bytes =
        fs::read(file).unwrap_or_else(|error| panic!("cannot read {}: {error}", file.display()));
    assert!(!bytes.is_empty(), "{} is empty", file.display());
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0b0001_0000;
    fs::write(file, bytes)
        .unwrap_or_else(|error| panic!("cannot write {}: {error}", file.display()));
}

/// Cuts `file` to half its length, as a crash during a copy would.
pub fn truncate_to_half(file: &Path) {
    let length = fs::metadata(file)
        .unwrap_or_else(|error| panic!("cannot stat {}: {error}", file.display()))
        .len();
    assert!(length > 1, "{} is too short to truncate", file.display());
    fs::OpenOptions::new()
        .write(true)
        .open(file)
        .and_then(|opened| opened.set_len(length / 2))
        .unwrap_or_else(|error| panic!("cannot truncate {}: {error}", file.display()));
}

/// The file name of `path`, as error messages name it.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_else(|| panic!("{} has no UTF-8 file name", path.display()))
        .to_string()
}
