//! Wakes an executor that sleeps through its own timer.
//!
//! Under heavy load on this project's VMs (Linux 6.18, glommio 0.9), an
//! executor now and then went to sleep in `io_uring_enter` and stayed
//! there: neither its next timer (10 ms away) nor a wake-up from another
//! thread (glommio writes the sleeper's eventfd) woke it, and its tasks
//! sat still for the 60 s a test waited (3 in 1,300 rounds of six copies
//! of the network tests beside three busy loops; `/proc` showed the thread
//! in `io_cqring_wait`, and a task of the same executor that woke every
//! 10 ms stopped running with it). glommio sleeps on its main ring with a poll
//! of its latency ring, where both its timers and its eventfd read
//! complete; whichever step loses the wake-up, a signal ends the wait
//! (`io_uring_enter` returns `EINTR`, which glommio takes as a wake-up),
//! and the executor then fires its due timers and runs the wake-ups
//! queued for it.
//!
//! So each executor that [`watch`]es itself beats: a task of its own
//! records the time every [`HEARTBEAT_INTERVAL`]. One thread per process
//! looks every [`CHECK_INTERVAL`] and signals (`SIGURG`, whose handler does
//! nothing) the thread of every executor whose last beat is older than
//! [`STALL_AFTER`]. A thread that is merely busy (a long task, or a core
//! taken by the host) gets a signal it does not notice: the handler
//! returns, and an interrupted blocking call is restarted.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::pthread::{pthread_kill, pthread_self, Pthread};
use nix::sys::signal::Signal;

/// How often a watched executor records that it runs.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);

/// How often the watchdog thread looks at the beats.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// How old a beat may get before its executor is signalled. A slot's
/// task may run up to its preemption interval (100 ms) before the executor
/// gets back to its timers, so a busy slot beats about that often; this is
/// over twice as long, so that a busy thread is not signalled for nothing.
pub const STALL_AFTER: Duration = Duration::from_millis(250);

/// A stall this long is reported on stderr when it ends with a signal.
const REPORT_STALL_AFTER: Duration = Duration::from_secs(1);

/// What the watchdog knows of one executor.
#[derive(Debug)]
struct Watched {
    id: u64,
    name: String,
    thread: Pthread,
    /// Nanoseconds since [`epoch`] at the last beat.
    beat: Arc<AtomicU64>,
    /// Whether this stall was reported already.
    reported: bool,
}

static WATCHED: Mutex<Vec<Watched>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static SIGNALS_SENT: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_nanos() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// How many signals the watchdog has sent to stalled executors since the
/// process started.
pub fn signals_sent() -> u64 {
    SIGNALS_SENT.load(Ordering::Relaxed)
}

/// Keeps the calling executor watched while it lives; dropping it (on
/// the executor's thread, before the thread ends) stops the watching.
#[derive(Debug)]
pub struct Watch {
    id: u64,
    /// Tells the heartbeat task to end.
    stopped: Rc<Cell<bool>>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stopped.set(true);
        lock_watched().retain(|watched| watched.id != self.id);
    }
}

fn lock_watched() -> std::sync::MutexGuard<'static, Vec<Watched>> {
    // Nothing is left half-done under the lock: a poisoned one is usable.
    WATCHED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Watches the current executor (call it on the executor, and keep the
/// [`Watch`] in its main future): starts its heartbeat task and, on the
/// first call in the process, the watchdog thread. `name` names the
/// executor in reports. Fails if the signal handler cannot be installed
/// or the thread cannot start.
pub fn watch(name: &str) -> Result<Watch, String> {
    start_watchdog()?;
    let beat = Arc::new(AtomicU64::new(now_nanos()));
    let stopped = Rc::new(Cell::new(false));
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    lock_watched().push(Watched {
        id,
        name: name.to_string(),
        thread: pthread_self(),
        beat: beat.clone(),
        reported: false,
    });
    let heartbeat_stopped = stopped.clone();
    glommio::spawn_local(async move {
        while !heartbeat_stopped.get() {
            glommio::timer::sleep(HEARTBEAT_INTERVAL).await;
            beat.store(now_nanos(), Ordering::Relaxed);
        }
    })
    .detach();
    Ok(Watch { id, stopped })
}

/// Installs the handler and starts the watchdog thread, once.
fn start_watchdog() -> Result<(), String> {
    static STARTED: OnceLock<Result<(), String>> = OnceLock::new();
    STARTED
        .get_or_init(|| {
            // A handler, so that the signal interrupts a sleeping system
            // call (an ignored one would not); the flag is never read.
            signal_hook::flag::register(
                signal_hook::consts::SIGURG,
                Arc::new(AtomicBool::new(false)),
            )
            .map_err(|error| {
                format!("cannot install the executor watchdog's signal handler: {error}")
            })?;
            std::thread::Builder::new()
                .name("strom-watchdog".to_string())
                .spawn(|| loop {
                    std::thread::sleep(CHECK_INTERVAL);
                    check();
                })
                .map(drop)
                .map_err(|error| format!("cannot start the executor watchdog: {error}"))
        })
        .clone()
}

/// Signals every watched executor whose last beat is older than
/// [`STALL_AFTER`]. Runs under the lock, so that a [`Watch`] being dropped
/// (its thread still alive) waits for it.
fn check() {
    let now = now_nanos();
    let stall_after = STALL_AFTER.as_nanos() as u64;
    for watched in lock_watched().iter_mut() {
        let since_beat = now.saturating_sub(watched.beat.load(Ordering::Relaxed));
        if since_beat <= stall_after {
            watched.reported = false;
            continue;
        }
        if pthread_kill(watched.thread, Signal::SIGURG).is_ok() {
            SIGNALS_SENT.fetch_add(1, Ordering::Relaxed);
        }
        if !watched.reported && since_beat >= REPORT_STALL_AFTER.as_nanos() as u64 {
            watched.reported = true;
            eprintln!(
                "strom: executor {} has not run its timers for {:?}; signalling it",
                watched.name,
                Duration::from_nanos(since_beat)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};

    /// An executor whose thread is held up (here by a task that blocks
    /// it) is signalled, and goes on as before once it is free: the
    /// signal is harmless to a thread that was not asleep in the kernel.
    #[test]
    fn a_stalled_executor_is_signalled_and_carries_on() {
        let before = signals_sent();
        let executor = LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(64 * 1024)
            .spawn(move || async move {
                let _watch = watch("signalled-test").expect("watch the executor");
                // Blocks the thread past STALL_AFTER: no beat meanwhile.
                let started = Instant::now();
                while signals_sent() == before && started.elapsed() < Duration::from_secs(30) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Timers still fire afterwards.
                glommio::timer::sleep(Duration::from_millis(20)).await;
                started.elapsed()
            })
            .unwrap();
        let elapsed = executor.join().unwrap();
        assert!(signals_sent() > before, "no signal within {elapsed:?}");
        // Dropped with its executor: no longer watched.
        assert!(lock_watched()
            .iter()
            .all(|watched| watched.name != "signalled-test"));
    }
}
