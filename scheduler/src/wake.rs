//! Command queues into glommio executors that sleep until a command comes.
//!
//! A slot or the network service gets its commands (deploy, cancel, open a
//! channel) from the TaskManager's thread. Polling for them every
//! millisecond kept an idle TaskManager at about 9% of a core, so instead
//! the sender wakes the executor's waiting task with each command (glommio
//! wakes an executor from another thread through its eventfd), and the
//! executor sleeps in between.
//!
//! It still looks every [`FALLBACK_WAKE_INTERVAL`] whether woken or not:
//! glommio 0.9 can park an executor that was preempted before it ran
//! anything (see `SLOT_PREEMPT_INTERVAL` in the TaskManager), and a timer
//! is what gets such an executor going again.

use std::sync::mpsc::{self, Receiver, SendError, Sender, SyncSender, TryRecvError};
use std::sync::Arc;
use std::task::Poll;

use std::time::Duration;

use atomic_waker::AtomicWaker;

/// How often a waiting receiver looks for commands even if not woken.
pub(crate) const FALLBACK_WAKE_INTERVAL: Duration = Duration::from_millis(10);

/// The sending end. Dropping it wakes the receiver, which then sees the
/// queue closed.
#[derive(Debug)]
pub(crate) struct CommandSender<T> {
    sender: Option<Either<T>>,
    waker: Arc<AtomicWaker>,
}

#[derive(Debug)]
enum Either<T> {
    Unbounded(Sender<T>),
    /// Full: `send` blocks the calling thread until there is room.
    Bounded(SyncSender<T>),
}

/// The receiving end, for one task of one executor.
#[derive(Debug)]
pub(crate) struct CommandReceiver<T> {
    receiver: Receiver<T>,
    waker: Arc<AtomicWaker>,
    /// [`FALLBACK_WAKE_INTERVAL`], but for tests.
    fallback: Duration,
}

/// A queue of any length.
pub(crate) fn unbounded<T>() -> (CommandSender<T>, CommandReceiver<T>) {
    let (sender, receiver) = mpsc::channel();
    pair(Either::Unbounded(sender), receiver)
}

/// A queue of at most `capacity` commands: a sender beyond it waits.
pub(crate) fn bounded<T>(capacity: usize) -> (CommandSender<T>, CommandReceiver<T>) {
    let (sender, receiver) = mpsc::sync_channel(capacity);
    pair(Either::Bounded(sender), receiver)
}

fn pair<T>(sender: Either<T>, receiver: Receiver<T>) -> (CommandSender<T>, CommandReceiver<T>) {
    let waker = Arc::new(AtomicWaker::new());
    (
        CommandSender {
            sender: Some(sender),
            waker: waker.clone(),
        },
        CommandReceiver {
            receiver,
            waker,
            fallback: FALLBACK_WAKE_INTERVAL,
        },
    )
}

impl<T> CommandSender<T> {
    /// Queues `command` and wakes the receiver; fails when the receiver is
    /// gone.
    pub(crate) fn send(&self, command: T) -> Result<(), SendError<T>> {
        let sent = match &self.sender {
            Some(Either::Unbounded(sender)) => sender.send(command),
            Some(Either::Bounded(sender)) => sender.send(command),
            None => Err(SendError(command)),
        };
        self.waker.wake();
        sent
    }
}

impl<T> Drop for CommandSender<T> {
    fn drop(&mut self) {
        // Disconnect first, so that the receiver it wakes sees the end.
        drop(self.sender.take());
        self.waker.wake();
    }
}

impl<T> CommandReceiver<T> {
    /// The next command, waiting (asleep) until one comes; `None` once the
    /// sender is gone and every command it sent has been received.
    pub(crate) async fn next(&self) -> Option<T> {
        loop {
            let fallback = async {
                glommio::timer::sleep(self.fallback).await;
                None
            };
            if let Some(received) =
                futures_lite::future::or(async { Some(self.woken().await) }, fallback).await
            {
                return received;
            }
        }
    }

    /// The next command (or the end), once the sender wakes this task.
    async fn woken(&self) -> Option<T> {
        let receive = || match self.receiver.try_recv() {
            Ok(command) => Poll::Ready(Some(command)),
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
            Err(TryRecvError::Empty) => Poll::Pending,
        };
        std::future::poll_fn(|context| {
            if let Poll::Ready(command) = receive() {
                return Poll::Ready(command);
            }
            self.waker.register(context.waker());
            // A command sent before the registration woke no one: look
            // again.
            receive()
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::LocalExecutorBuilder;

    #[test]
    fn a_sleeping_executor_is_woken_by_each_command_and_by_the_end() {
        let (sender, mut receiver) = bounded(2);
        // No fallback within the test's time: only the sender wakes it.
        receiver.fallback = Duration::from_secs(3600);
        let (done, result) = std::sync::mpsc::channel();
        let executor = LocalExecutorBuilder::default()
            .io_memory(64 * 1024)
            .spawn(move || async move {
                let mut received = Vec::new();
                while let Some(command) = receiver.next().await {
                    received.push(command);
                }
                let _ = done.send(received);
            })
            .expect("an executor");
        // Sent from this thread, many while the executor sleeps.
        for command in 0..100u32 {
            sender.send(command).expect("the receiver is alive");
            if command % 10 == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        drop(sender);
        let received = result
            .recv_timeout(Duration::from_secs(60))
            .expect("the executor was not woken: a command or the end was lost");
        assert_eq!(received, (0..100).collect::<Vec<_>>());
        executor.join().expect("the executor ran");
    }
}
