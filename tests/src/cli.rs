//! Running the command line as a user does, with a deadline so that a hang
//! fails the test instead of stalling it.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished command printed, and how it exited.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `binary arguments...`, failing the test if it takes longer than
/// `deadline`.
pub fn run(binary: &str, arguments: &[&str], deadline: Duration) -> Finished {
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(arguments)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {binary}: {error}"));
    // Read both pipes on threads so that a chatty child never blocks.
    let mut stdout_pipe = child.stdout.take().expect("piped stdout");
    let mut stderr_pipe = child.stderr.take().expect("piped stderr");
    let stdout_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout_pipe.read_to_string(&mut text);
        text
    });
    let stderr_reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text);
        text
    });
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the child") {
            break status;
        }
        if started.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{binary} {}` did not finish within {deadline:?}: it hangs",
                arguments.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Finished {
        code: status.code(),
        stdout: stdout_reader.join().expect("stdout reader"),
        stderr: stderr_reader.join().expect("stderr reader"),
        elapsed: started.elapsed(),
    }
}

/// A command that is still running, whose standard error is read line by
/// line as it comes, so that a test can act when something happens.
pub struct Running {
    child: std::process::Child,
    stderr_lines: std::sync::mpsc::Receiver<String>,
    stderr_seen: Vec<String>,
    stdout_reader: Option<std::thread::JoinHandle<String>>,
}

impl Running {
    pub fn start(binary: &str, arguments: &[&str]) -> Running {
        let mut child = Command::new(binary)
            .args(arguments)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {binary}: {error}"));
        let stderr_pipe = child.stderr.take().expect("piped stderr");
        let (sender, stderr_lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr_pipe).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stdout_pipe = child.stdout.take().expect("piped stdout");
        let stdout_reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout_pipe.read_to_string(&mut text);
            text
        });
        Running {
            child,
            stderr_lines,
            stderr_seen: Vec::new(),
            stdout_reader: Some(stdout_reader),
        }
    }

    /// Waits for a line of standard error that `wanted` accepts, and
    /// returns it; fails the test (killing the command) after `deadline`.
    pub fn wait_for_line(&mut self, deadline: Duration, wanted: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let left = deadline.saturating_sub(started.elapsed());
            match self.stderr_lines.recv_timeout(left) {
                Ok(line) => {
                    self.stderr_seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "the awaited line did not come within {deadline:?}; standard error so far:\n{}",
                        self.stderr_seen.join("\n")
                    );
                }
            }
        }
    }

    /// Kills the command with SIGKILL, as a crash or an operator would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the command to end.
    pub fn finish(mut self, deadline: Duration) -> Finished {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the child") {
                break status;
            }
            if started.elapsed() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("the command did not finish within {deadline:?}: it hangs");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut stderr = self.stderr_seen.join("\n");
        for line in self.stderr_lines.iter() {
            stderr.push('\n');
            stderr.push_str(&line);
        }
        Finished {
            code: status.code(),
            stdout: self
                .stdout_reader
                .take()
                .expect("read once")
                .join()
                .expect("stdout reader"),
            stderr,
            elapsed: started.elapsed(),
        }
    }
}
