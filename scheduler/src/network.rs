//! The TaskManager's network service: the data plane between TaskManagers.
//!
//! Tasks only ever see [`ChannelSender`] and [`ChannelReceiver`]. When a
//! channel's producer and consumer run in different TaskManager processes,
//! the TaskManager asks its [`NetworkService`] for the local end instead of
//! making a local channel, and the service carries the elements over one
//! [`Link`] per peer TaskManager.
//!
//! The service is one glommio executor per TaskManager. With several
//! slots it is a thread of its own, not pinned: the machine's cores each
//! belong to a slot, and pinning the network thread to one of them would
//! make it compete with that one slot alone, while an unbound thread runs
//! wherever the kernel finds room. A TaskManager of one slot runs it on
//! that slot's executor instead ([`NetworkService::start_hosted`]): its
//! tasks are the service's only users, and a record then reaches the
//! socket without changing threads. Everything network related (the
//! listener, the links, the forwarding tasks) lives on that one executor,
//! so links are plain single-threaded state and only the channel rings
//! cross threads.
//!
//! The protocol, per remote channel:
//!
//! 1. Both TaskManagers compute the same id for the channel with
//!    [`channel_id`]. The producer's TaskManager calls
//!    [`NetworkService::remote_output`], the consumer's
//!    [`NetworkService::remote_input`]; each checks the id against its
//!    registry of live channels per (peer, direction) and refuses a
//!    duplicate (a hash collision) with an error, rather than mixing two
//!    channels' elements.
//! 2. The call makes a local channel, hands one end to the caller and sends
//!    the other, in a command over a bounded queue, to the service executor,
//!    which spawns a forwarding task for it.
//! 3. The forwarding task connects its local end, then waits for the link
//!    to the peer. Between two
//!    TaskManagers the one with the lower id connects, lazily, when it first
//!    needs the link; the other waits up to [`LINK_WAIT_TIMEOUT`] for it to
//!    arrive. So a pair never has two links.
//! 4. An output task moves elements from the local channel to the link
//!    ([`LinkSender::send`], which waits for the consumer's credit); an input
//!    task opens the channel on the link with as much credit as the local
//!    channel has room ([`CHANNEL_CAPACITY_BUFFERS`]) and moves elements
//!    from the link into the local channel. The consumer's backpressure thus
//!    crosses the link: a full local channel stops the input task, which
//!    stops returning credit, which stops the producer's output task, which
//!    stops reading the producer's channel.
//! 5. A forwarding task ends after it forwarded end-of-input, when its task
//!    dropped the local end, when its link fails, or when the channel is
//!    released ([`NetworkService::release`]). Ending drops its local end, so
//!    a task on a failed link sees a closed channel.
//!
//! Invariants: at most one link per peer (a newly accepted link from a peer
//! replaces the old one, which the peer has given up on); elements of one
//! channel arrive in order, with watermarks, barriers and end-of-input
//! in-band; a stalled channel stalls only its own forwarding tasks. Every
//! queue is bounded: commands by [`COMMAND_QUEUE_CAPACITY`], each channel by
//! its ring and its link credit, handshakes in flight by
//! [`HANDSHAKE_COUNT_MAX`], the error log by [`ERROR_LOG_CAPACITY`], the
//! registry by [`REGISTERED_CHANNEL_COUNT_MAX`].
//!
//! A forwarding task connects its local end before it can be cancelled
//! (connecting is immediate), so that a cancelled one still drops a
//! connected end, which the task's side sees as the channel closed.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_lite::future;
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};
use strom_core::record::StreamElement;
use strom_net::channel::{
    channel, ChannelReceiver, ChannelSender, ConnectedChannelReceiver, ConnectedChannelSender,
    CHANNEL_CAPACITY_BUFFERS,
};
use strom_net::link::{Link, LinkSender};

use crate::messages::NetworkCounts;
use crate::wake::{CommandReceiver, CommandSender};

/// Commands waiting for the service executor; a caller beyond it waits.
pub const COMMAND_QUEUE_CAPACITY: usize = 1024;
/// Memory the service's io_uring may lock for registered buffers (as a
/// slot's: a default locked-memory limit of 8 MiB holds a few executors).
pub const NETWORK_IO_MEMORY_BYTES: usize = 512 * 1024;
/// How long the service executor may take to start and bind.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a TaskManager with the higher id waits for the peer with the
/// lower id to connect, before the channel fails.
pub const LINK_WAIT_TIMEOUT: Duration = Duration::from_secs(60);
/// Incoming connections in their handshake at once; more are refused.
pub const HANDSHAKE_COUNT_MAX: usize = 16;
/// Errors kept for [`NetworkService::recent_errors`]; older ones are dropped.
pub const ERROR_LOG_CAPACITY: usize = 64;
/// Remote channels registered at once in one service.
pub const REGISTERED_CHANNEL_COUNT_MAX: usize = 16 * 1024;
/// How long stopping waits for the links to close.
const STOP_TIMEOUT: Duration = Duration::from_secs(1);
/// How long stopping waits for a service hosted on a slot to end: it
/// closes its links within [`STOP_TIMEOUT`]; a host that neither runs nor
/// drops it is not waited for forever.
const HOSTED_STOP_WAIT: Duration = Duration::from_secs(5);
/// The pause after a failed accept (for example when out of descriptors).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

const _: () = assert!(CHANNEL_CAPACITY_BUFFERS as u64 <= u32::MAX as u64);

/// A channel id on a link, the same in both TaskManagers: FNV-1a over the
/// little-endian bytes of the fields, folded to 32 bits. Stable across
/// processes, builds and releases (unlike std's hasher).
///
/// Two channels may collide (about one pair in 2^32). A collision matters
/// only between channels of one link in one direction, and there the
/// registry of [`NetworkService`] refuses the second channel with an error,
/// so the job attempt fails instead of mixing two channels' elements; its
/// restart uses a new attempt number and so new ids.
pub fn channel_id(job: u128, attempt: u32, edge: usize, producer: u32, consumer: u32) -> u32 {
    const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let edge = edge as u64;
    let bytes = job
        .to_le_bytes()
        .into_iter()
        .chain(attempt.to_le_bytes())
        .chain(edge.to_le_bytes())
        .chain(producer.to_le_bytes())
        .chain(consumer.to_le_bytes());
    let mut hash = FNV_OFFSET_BASIS;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    (hash ^ (hash >> 32)) as u32
}

/// Which way a remote channel goes, seen from this TaskManager.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Direction {
    Output,
    Input,
}

/// A channel between this TaskManager and `peer`.
#[derive(Clone, Copy, Debug)]
struct RemoteChannel {
    peer: u64,
    peer_addr: SocketAddr,
    channel_id: u32,
}

/// The service's end of the local channel of a remote channel.
enum LocalEnd {
    /// Of an output: the service takes the producer's elements.
    Output(ChannelReceiver),
    /// Of an input: the service hands elements to the consumer.
    Input(ChannelSender),
}

enum Command {
    Open {
        channel: RemoteChannel,
        end: LocalEnd,
    },
    Release {
        channel_ids: Vec<u32>,
    },
    Stop,
}

/// The last errors of the service, shared with the handle; each is also
/// written to stderr.
#[derive(Clone)]
struct ErrorLog {
    local_id: u64,
    errors: Arc<Mutex<VecDeque<String>>>,
}

impl ErrorLog {
    fn report(&self, error: String) {
        eprintln!("TaskManager {:016x} network: {error}", self.local_id);
        let mut errors = self
            .errors
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if errors.len() == ERROR_LOG_CAPACITY {
            errors.pop_front();
        }
        errors.push_back(error);
    }
}

/// What the service moved, counted by its forwarding tasks (the only
/// writers, all on the service executor) and read by the TaskManager.
#[derive(Debug, Default)]
pub struct NetworkCounters {
    elements_sent: AtomicU64,
    bytes_sent: AtomicU64,
    elements_received: AtomicU64,
    bytes_received: AtomicU64,
}

impl NetworkCounters {
    fn count(elements: &AtomicU64, bytes: &AtomicU64, element: &StreamElement) {
        let size = match element {
            StreamElement::Records(buffer) => buffer.len() as u64,
            _ => 0,
        };
        elements.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(size, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> NetworkCounts {
        NetworkCounts {
            elements_sent: self.elements_sent.load(Ordering::Relaxed),
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            elements_received: self.elements_received.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
        }
    }
}

/// One per TaskManager process: the handle to the service executor.
pub struct NetworkService {
    counters: Arc<NetworkCounters>,
    local_id: u64,
    local_addr: SocketAddr,
    /// The service executor's commands: it sleeps until one comes.
    commands: CommandSender<Command>,
    /// The live remote channels, for refusing duplicate ids.
    registry: Mutex<HashSet<(u64, Direction, u32)>>,
    errors: ErrorLog,
    /// Where the service runs, to wait for it to stop; `None` once stopped.
    runner: Option<ServiceRunner>,
}

/// Where a network service runs.
enum ServiceRunner {
    /// Its own executor thread.
    Thread(glommio::ExecutorJoinHandle<()>),
    /// A task on another executor (a slot's, see
    /// [`NetworkService::start_hosted`]), which says on this channel when
    /// it has ended (or was dropped with its executor).
    Hosted(mpsc::Receiver<()>),
}

/// The service's main future, made on the executor that runs it (it is
/// not `Send`).
pub type ServiceFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// What makes a hosted service's main future, sent to the host executor.
pub type HostedService = Box<dyn FnOnce() -> ServiceFuture + Send>;

/// Sends `()` when dropped: when the hosted service's future ends or is
/// dropped with its executor.
struct EndSignal(mpsc::Sender<()>);

impl Drop for EndSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

impl std::fmt::Debug for NetworkService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NetworkService")
            .field("local_id", &self.local_id)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl NetworkService {
    /// Starts the service executor (an unbound thread, see the module
    /// documentation), which listens on `bind` (port 0: any) for links from
    /// other TaskManagers, requiring proof of `secret` if given, and proves
    /// it when it connects.
    pub fn start(
        local_id: u64,
        bind: SocketAddr,
        secret: Option<Vec<u8>>,
    ) -> Result<NetworkService, String> {
        Self::start_with(local_id, bind, secret, |service| {
            let thread = LocalExecutorBuilder::new(Placement::Unbound)
                .name(&format!("strom-network-{local_id}"))
                .io_memory(NETWORK_IO_MEMORY_BYTES)
                .spawn(move || async move {
                    // Signalled if it sleeps through its own timers (a
                    // hosted service is on a slot, which is watched).
                    let watch = strom_net::watchdog::watch(&format!("network service {local_id}"));
                    if let Err(error) = &watch {
                        eprintln!("strom: {error}; the network service runs unwatched");
                    }
                    service().await;
                    drop(watch);
                })
                .map_err(|error| format!("cannot start the network service: {error}"))?;
            Ok(ServiceRunner::Thread(thread))
        })
    }

    /// Starts the service as a task of another executor: `host` sends what
    /// makes its future to that executor, which spawns it. A TaskManager
    /// of one slot runs its service on its slot this way, so that a record
    /// goes from its task to the socket (and from the socket to its task)
    /// without changing threads: two wake-ups fewer per side, each tens of
    /// microseconds on a VM.
    pub fn start_hosted(
        local_id: u64,
        bind: SocketAddr,
        secret: Option<Vec<u8>>,
        host: impl FnOnce(HostedService) -> Result<(), String>,
    ) -> Result<NetworkService, String> {
        Self::start_with(local_id, bind, secret, |service| {
            let (ended, service_ended) = mpsc::channel();
            host(Box::new(move || {
                let end_signal = EndSignal(ended);
                Box::pin(async move {
                    service().await;
                    drop(end_signal);
                })
            }))?;
            Ok(ServiceRunner::Hosted(service_ended))
        })
    }

    /// Starts the service with `run`, which starts what `service` makes
    /// (the service's main future) on an executor.
    fn start_with(
        local_id: u64,
        bind: SocketAddr,
        secret: Option<Vec<u8>>,
        run: impl FnOnce(HostedService) -> Result<ServiceRunner, String>,
    ) -> Result<NetworkService, String> {
        let (commands, command_inbox) = crate::wake::bounded(COMMAND_QUEUE_CAPACITY);
        let (ready, service_ready) = mpsc::channel();
        let errors = ErrorLog {
            local_id,
            errors: Arc::new(Mutex::new(VecDeque::with_capacity(ERROR_LOG_CAPACITY))),
        };
        let service_errors = errors.clone();
        let counters = Arc::new(NetworkCounters::default());
        let service_counters = counters.clone();
        let runner = run(Box::new(move || {
            Box::pin(service_main(
                local_id,
                bind,
                secret,
                command_inbox,
                ready,
                service_errors,
                service_counters,
            ))
        }))?;
        let local_addr = match service_ready.recv_timeout(START_TIMEOUT) {
            Ok(Ok(address)) => address,
            Ok(Err(error)) => {
                let _ = runner.join();
                return Err(error);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let cause = match runner.join() {
                    Ok(()) => "its executor stopped".to_string(),
                    Err(error) => error,
                };
                return Err(format!(
                    "cannot start the network service: {cause} (io_uring needs locked memory: check `ulimit -l`, see the README)"
                ));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                // Dropping `commands` stops the service if it ever starts.
                return Err(format!(
                    "the network service did not start within {START_TIMEOUT:?}: is the machine overloaded?"
                ));
            }
        };
        Ok(NetworkService {
            counters,
            local_id,
            local_addr,
            commands,
            registry: Mutex::new(HashSet::new()),
            errors,
            runner: Some(runner),
        })
    }

    /// Where the service listens for links from other TaskManagers.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the service has sent to and received from other TaskManagers.
    pub fn counts(&self) -> NetworkCounts {
        self.counters.snapshot()
    }

    /// The producer side of a channel whose consumer runs in TaskManager
    /// `peer` (listening at `peer_addr`): the service forwards what the
    /// producer sends on the returned end over the link as `channel_id`.
    /// Fails for an id already registered toward `peer` (a [`channel_id`]
    /// collision) and when the service has stopped. The id stays registered
    /// until [`NetworkService::release`], even after end-of-input.
    pub fn remote_output(
        &self,
        peer: u64,
        peer_addr: SocketAddr,
        channel_id: u32,
    ) -> Result<ChannelSender, String> {
        self.register(peer, Direction::Output, channel_id)?;
        let (sender, receiver) = channel();
        let channel = RemoteChannel {
            peer,
            peer_addr,
            channel_id,
        };
        self.command(Command::Open {
            channel,
            end: LocalEnd::Output(receiver),
        })?;
        Ok(sender)
    }

    /// The consumer side of a channel whose producer runs in TaskManager
    /// `peer`: the service opens `channel_id` on the link from the peer
    /// (waiting for the link if needed) with credit for as many buffers as
    /// the local channel holds, and forwards each element into the returned
    /// end. Fails as [`NetworkService::remote_output`] does.
    pub fn remote_input(
        &self,
        peer: u64,
        peer_addr: SocketAddr,
        channel_id: u32,
    ) -> Result<ChannelReceiver, String> {
        self.register(peer, Direction::Input, channel_id)?;
        let (sender, receiver) = channel();
        let channel = RemoteChannel {
            peer,
            peer_addr,
            channel_id,
        };
        self.command(Command::Open {
            channel,
            end: LocalEnd::Input(sender),
        })?;
        Ok(receiver)
    }

    /// Drops every remote channel of `channel_ids` (a job attempt ended or
    /// was cancelled): their forwarding tasks stop and drop their local ends;
    /// the links stay up.
    pub fn release(&self, channel_ids: &[u32]) {
        let released: HashSet<u32> = channel_ids.iter().copied().collect();
        self.lock_registry()
            .retain(|(_, _, channel_id)| !released.contains(channel_id));
        // A stopped service has no channels left to release.
        let _ = self.command(Command::Release {
            channel_ids: channel_ids.to_vec(),
        });
    }

    /// The last errors (at most [`ERROR_LOG_CAPACITY`]), oldest first: links
    /// that could not be made or failed, and channels that failed with them.
    pub fn recent_errors(&self) -> Vec<String> {
        self.errors
            .errors
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Closes the links and stops the service executor.
    pub fn stop(mut self) {
        self.shut_down();
    }

    fn shut_down(&mut self) {
        if let Some(runner) = self.runner.take() {
            let _ = self.commands.send(Command::Stop);
            if let Err(error) = runner.join() {
                self.errors.report(format!(
                    "the network service stopped with an error: {error}"
                ));
            }
        }
    }

    fn lock_registry(&self) -> std::sync::MutexGuard<'_, HashSet<(u64, Direction, u32)>> {
        self.registry
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn register(&self, peer: u64, direction: Direction, channel_id: u32) -> Result<(), String> {
        assert_ne!(peer, self.local_id, "a remote channel to this TaskManager");
        let mut registry = self.lock_registry();
        if registry.len() >= REGISTERED_CHANNEL_COUNT_MAX {
            return Err(format!(
                "TaskManager {} has {REGISTERED_CHANNEL_COUNT_MAX} remote channels already: release the channels of finished jobs",
                self.local_id
            ));
        }
        if !registry.insert((peer, direction, channel_id)) {
            let direction = match direction {
                Direction::Output => "to",
                Direction::Input => "from",
            };
            return Err(format!(
                "channel id {channel_id} {direction} TaskManager {peer} is in use already (two channels hash to one id): refusing to mix their elements; a restart with a new attempt picks new ids"
            ));
        }
        Ok(())
    }

    fn command(&self, command: Command) -> Result<(), String> {
        self.commands.send(command).map_err(|_| {
            format!(
                "the network service of TaskManager {} has stopped",
                self.local_id
            )
        })
    }
}

impl ServiceRunner {
    /// Waits for the service to end.
    fn join(self) -> Result<(), String> {
        match self {
            ServiceRunner::Thread(thread) => thread.join().map_err(|error| error.to_string()),
            // Ended or dropped with its executor: either way the signal
            // has been sent.
            ServiceRunner::Hosted(ended) => match ended.recv_timeout(HOSTED_STOP_WAIT) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => Ok(()),
                Err(mpsc::RecvTimeoutError::Timeout) => Err(format!(
                    "its host executor did not end it within {HOSTED_STOP_WAIT:?}"
                )),
            },
        }
    }
}

impl Drop for NetworkService {
    fn drop(&mut self) {
        self.shut_down();
    }
}

/// Whether a forwarding task was told to stop (its channel was released).
#[derive(Default)]
struct Cancel {
    is_cancelled: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Cancel {
    fn cancel(&self) {
        self.is_cancelled.set(true);
        if let Some(waker) = self.waker.borrow_mut().take() {
            waker.wake();
        }
    }

    async fn cancelled(&self) {
        poll_fn(|context| {
            if self.is_cancelled.get() {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(context.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// What the service knows of its link to one peer.
enum PeerLink {
    /// This side is connecting (attempt number).
    Connecting { attempt: u64 },
    /// The link is up; `generation` tells it from its successors.
    Up { link: Rc<Link>, generation: u64 },
    /// Connect attempt `attempt` failed; the next use tries again.
    Failed { attempt: u64, error: String },
}

/// The service's run state, on its executor.
struct ServiceCore {
    local_id: u64,
    secret: Option<Rc<[u8]>>,
    peers: HashMap<u64, PeerLink>,
    /// Counts changes of `peers`; waiters for a link watch it.
    peer_change_count: u64,
    peer_waiters: Vec<Waker>,
    next_attempt: u64,
    next_generation: u64,
    /// The forwarding tasks of each channel id (one per peer and direction).
    channels: HashMap<u32, Vec<Rc<Cancel>>>,
    handshake_count: usize,
    errors: ErrorLog,
    counters: Arc<NetworkCounters>,
}

type SharedCore = Rc<RefCell<ServiceCore>>;

impl ServiceCore {
    fn notify_peer_change(&mut self) {
        self.peer_change_count += 1;
        for waker in self.peer_waiters.drain(..) {
            waker.wake();
        }
    }

    /// Makes `link` the one link to `peer`, closing the one it replaces.
    fn install(core: &SharedCore, peer: u64, link: Link) {
        let link = Rc::new(link);
        let generation = {
            let mut core = core.borrow_mut();
            let generation = core.next_generation;
            core.next_generation += 1;
            let previous = core.peers.insert(
                peer,
                PeerLink::Up {
                    link: link.clone(),
                    generation,
                },
            );
            if let Some(PeerLink::Up { link: previous, .. }) = previous {
                previous.close();
            }
            core.notify_peer_change();
            generation
        };
        glommio::spawn_local(watch_link(core.clone(), peer, link, generation)).detach();
    }
}

/// Removes a link from the peers when it ends, reporting why.
async fn watch_link(core: SharedCore, peer: u64, link: Rc<Link>, generation: u64) {
    let result = link.closed().await;
    let mut core = core.borrow_mut();
    if let Err(error) = result {
        core.errors
            .report(format!("the link to TaskManager {peer} failed: {error}"));
    }
    if matches!(core.peers.get(&peer), Some(PeerLink::Up { generation: current, .. }) if *current == generation)
    {
        core.peers.remove(&peer);
        core.notify_peer_change();
    }
}

/// Waits for the link to `peer` (connecting if this side has the lower id)
/// and applies `use_link` to it.
async fn with_link<R>(
    core: &SharedCore,
    peer: u64,
    peer_addr: SocketAddr,
    use_link: impl FnOnce(&Link) -> R,
) -> Result<R, String> {
    let deadline = Instant::now() + LINK_WAIT_TIMEOUT;
    let mut awaited_attempt = None;
    loop {
        // Only the side that waits for the peer to connect has a deadline;
        // a connect attempt has its own timeouts.
        let mut is_waiting_for_peer = false;
        let mut connect_attempt = None;
        let seen_change_count = {
            let mut state = core.borrow_mut();
            let local_id = state.local_id;
            match state.peers.get(&peer) {
                Some(PeerLink::Up { link, .. }) => return Ok(use_link(link)),
                Some(PeerLink::Connecting { attempt }) => awaited_attempt = Some(*attempt),
                Some(PeerLink::Failed { attempt, error }) if awaited_attempt == Some(*attempt) => {
                    return Err(error.clone());
                }
                _ if local_id < peer => {
                    let attempt = state.next_attempt;
                    state.next_attempt += 1;
                    state.peers.insert(peer, PeerLink::Connecting { attempt });
                    awaited_attempt = Some(attempt);
                    connect_attempt = Some(attempt);
                }
                _ => {
                    if Instant::now() >= deadline {
                        return Err(format!(
                            "TaskManager {peer} did not connect within {LINK_WAIT_TIMEOUT:?}"
                        ));
                    }
                    is_waiting_for_peer = true;
                }
            }
            state.peer_change_count
        };
        // glommio runs a new task at once: spawn without holding the core.
        if let Some(attempt) = connect_attempt {
            glommio::spawn_local(connect(core.clone(), peer, peer_addr, attempt)).detach();
        }
        let changed = poll_fn(|context| {
            let mut state = core.borrow_mut();
            if state.peer_change_count != seen_change_count {
                return Poll::Ready(());
            }
            if !state
                .peer_waiters
                .iter()
                .any(|waker| waker.will_wake(context.waker()))
            {
                state.peer_waiters.push(context.waker().clone());
            }
            Poll::Pending
        });
        if is_waiting_for_peer {
            let timeout = glommio::timer::sleep(deadline.saturating_duration_since(Instant::now()));
            future::or(changed, timeout).await;
        } else {
            changed.await;
        }
    }
}

/// Connect attempt `attempt` to `peer`.
async fn connect(core: SharedCore, peer: u64, peer_addr: SocketAddr, attempt: u64) {
    let (local_id, secret) = {
        let core = core.borrow();
        (core.local_id, core.secret.clone())
    };
    let error = match Link::connect(peer_addr, local_id, secret.as_deref()).await {
        Ok(link) if link.peer_id() == peer => {
            ServiceCore::install(&core, peer, link);
            return;
        }
        Ok(link) => format!(
            "expected TaskManager {peer} at {peer_addr}, found TaskManager {}",
            link.peer_id()
        ),
        Err(error) => format!("cannot link to TaskManager {peer}: {error}"),
    };
    let mut core = core.borrow_mut();
    core.errors.report(error.clone());
    // Unless a link from the peer arrived meanwhile, waiters learn why.
    if matches!(core.peers.get(&peer), Some(PeerLink::Connecting { attempt: current }) if *current == attempt)
    {
        core.peers.insert(peer, PeerLink::Failed { attempt, error });
        core.notify_peer_change();
    }
}

/// Accepts links from other TaskManagers, each handshake in its own task.
async fn accept_loop(core: SharedCore, listener: TcpListener) {
    loop {
        let stream = match listener.accept().await {
            Ok(stream) => stream,
            Err(error) => {
                core.borrow()
                    .errors
                    .report(format!("cannot accept a connection: {error}"));
                glommio::timer::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let (local_id, secret) = {
            let mut state = core.borrow_mut();
            if state.handshake_count >= HANDSHAKE_COUNT_MAX {
                let peer_addr = stream.peer_addr().ok();
                state.errors.report(format!(
                    "refused a connection from {peer_addr:?}: {HANDSHAKE_COUNT_MAX} handshakes in flight already"
                ));
                continue;
            }
            state.handshake_count += 1;
            (state.local_id, state.secret.clone())
        };
        let core = core.clone();
        glommio::spawn_local(async move {
            let result = Link::accept_stream(stream, local_id, secret.as_deref()).await;
            core.borrow_mut().handshake_count -= 1;
            match result {
                Ok(link) if link.peer_id() == local_id => core.borrow().errors.report(format!(
                    "refused a link from {} claiming this TaskManager's id {local_id}",
                    link.peer_addr()
                )),
                Ok(link) => {
                    let peer = link.peer_id();
                    ServiceCore::install(&core, peer, link);
                }
                Err(error) => core
                    .borrow()
                    .errors
                    .report(format!("refused a link: {error}")),
            }
        })
        .detach();
    }
}

/// Why a forwarding task ended, when not with an error.
enum Ended {
    EndOfInput,
    /// The task's end of the local channel was dropped.
    LocalEndDropped,
    Released,
}

/// Moves the producer's elements from the local channel onto the link.
async fn forward_output(
    core: SharedCore,
    channel: RemoteChannel,
    receiver: ChannelReceiver,
    cancel: Rc<Cancel>,
) {
    let RemoteChannel {
        peer,
        peer_addr,
        channel_id,
    } = channel;
    // Not cancellable: see the module documentation.
    let receiver: ConnectedChannelReceiver = receiver.connect().await;
    let forward = async {
        let sender: LinkSender = with_link(&core, peer, peer_addr, Link::sender).await?;
        let counters = core.borrow().counters.clone();
        loop {
            let Some(element) = receiver.recv().await else {
                return Ok(Ended::LocalEndDropped);
            };
            NetworkCounters::count(&counters.elements_sent, &counters.bytes_sent, &element);
            let is_end = matches!(element, StreamElement::EndOfInput);
            sender
                .send(channel_id, element)
                .await
                .map_err(|error| error.to_string())?;
            if is_end {
                return Ok(Ended::EndOfInput);
            }
            glommio::yield_if_needed().await;
        }
    };
    let result = future::or(forward, async {
        cancel.cancelled().await;
        Ok(Ended::Released)
    })
    .await;
    // The producer sees the channel closed (even one waiting for room).
    drop(receiver);
    finish(&core, channel_id, &cancel, result, || {
        format!("channel {channel_id} to TaskManager {peer}")
    });
}

/// Moves elements from the link into the consumer's local channel.
async fn forward_input(
    core: SharedCore,
    channel: RemoteChannel,
    sender: ChannelSender,
    cancel: Rc<Cancel>,
) {
    let RemoteChannel {
        peer,
        peer_addr,
        channel_id,
    } = channel;
    // Not cancellable: see the module documentation.
    let sender: ConnectedChannelSender = sender.connect().await;
    let forward = async {
        let receiver = with_link(&core, peer, peer_addr, |link| {
            link.open_input(channel_id, CHANNEL_CAPACITY_BUFFERS as u32)
        })
        .await?
        .map_err(|error| error.to_string())?;
        let counters = core.borrow().counters.clone();
        loop {
            let element = receiver.recv().await.map_err(|error| error.to_string())?;
            NetworkCounters::count(
                &counters.elements_received,
                &counters.bytes_received,
                &element,
            );
            let is_end = matches!(element, StreamElement::EndOfInput);
            // A consumer gone, even while its ring is full, ends the wait
            // for room with the element given back.
            if sender.send(element).await.is_err() {
                return Ok(Ended::LocalEndDropped);
            }
            if is_end {
                return Ok(Ended::EndOfInput);
            }
            glommio::yield_if_needed().await;
        }
    };
    let result = future::or(forward, async {
        cancel.cancelled().await;
        Ok(Ended::Released)
    })
    .await;
    drop(sender);
    finish(&core, channel_id, &cancel, result, || {
        format!("channel {channel_id} from TaskManager {peer}")
    });
}

/// Unregisters an ended forwarding task and reports its error.
fn finish(
    core: &SharedCore,
    channel_id: u32,
    cancel: &Rc<Cancel>,
    result: Result<Ended, String>,
    name: impl FnOnce() -> String,
) {
    let mut core = core.borrow_mut();
    if let Some(cancels) = core.channels.get_mut(&channel_id) {
        cancels.retain(|other| !Rc::ptr_eq(other, cancel));
        if cancels.is_empty() {
            core.channels.remove(&channel_id);
        }
    }
    match result {
        Ok(Ended::EndOfInput | Ended::Released) => {}
        // The task failed or was cancelled; its job attempt ends anyway.
        Ok(Ended::LocalEndDropped) => {}
        Err(error) => core.errors.report(format!("{} failed: {error}", name())),
    }
}

/// Starts the forwarding task of a remote channel.
fn open(core: &SharedCore, channel: RemoteChannel, end: LocalEnd) {
    let cancel = Rc::new(Cancel::default());
    core.borrow_mut()
        .channels
        .entry(channel.channel_id)
        .or_default()
        .push(cancel.clone());
    // glommio runs a new task at once: spawn without holding the core.
    match end {
        LocalEnd::Output(receiver) => {
            glommio::spawn_local(forward_output(core.clone(), channel, receiver, cancel)).detach()
        }
        LocalEnd::Input(sender) => {
            glommio::spawn_local(forward_input(core.clone(), channel, sender, cancel)).detach()
        }
    };
}

/// Runs commands until Stop (or until the handle is gone).
async fn command_loop(core: SharedCore, commands: CommandReceiver<Command>) {
    loop {
        match commands.next().await {
            Some(Command::Stop) | None => return,
            Some(Command::Release { channel_ids }) => {
                let mut core = core.borrow_mut();
                for channel_id in channel_ids {
                    for cancel in core.channels.remove(&channel_id).unwrap_or_default() {
                        cancel.cancel();
                    }
                }
            }
            Some(Command::Open { channel, end }) => open(&core, channel, end),
        }
    }
}

async fn service_main(
    local_id: u64,
    bind: SocketAddr,
    secret: Option<Vec<u8>>,
    commands: CommandReceiver<Command>,
    ready: mpsc::Sender<Result<SocketAddr, String>>,
    errors: ErrorLog,
    counters: Arc<NetworkCounters>,
) {
    let listener = match TcpListener::bind(bind)
        .and_then(|listener| listener.local_addr().map(|address| (listener, address)))
    {
        Ok((listener, address)) => {
            let _ = ready.send(Ok(address));
            listener
        }
        Err(error) => {
            let _ = ready.send(Err(format!(
                "the network service cannot listen on {bind}: {error}"
            )));
            return;
        }
    };
    let core = Rc::new(RefCell::new(ServiceCore {
        local_id,
        secret: secret.map(Rc::from),
        peers: HashMap::new(),
        peer_change_count: 0,
        peer_waiters: Vec::new(),
        next_attempt: 0,
        next_generation: 0,
        channels: HashMap::new(),
        handshake_count: 0,
        errors,
        counters,
    }));
    // The accept loop is a task of its own: a task polls every future it
    // awaits whenever it wakes, and glommio's accept keeps one waker per
    // poll, so sharing a task with the command poll would pile them up.
    let accepting = glommio::spawn_local(accept_loop(core.clone(), listener));
    command_loop(core.clone(), commands).await;
    accepting.cancel().await;
    // Close every link and give the peers a moment to see the Close frame.
    let links: Vec<Rc<Link>> = core
        .borrow_mut()
        .peers
        .drain()
        .filter_map(|(_, peer)| match peer {
            PeerLink::Up { link, .. } => Some(link),
            PeerLink::Connecting { .. } | PeerLink::Failed { .. } => None,
        })
        .collect();
    let closing = async {
        for link in &links {
            link.close();
        }
        for link in &links {
            let _ = link.closed().await;
        }
    };
    future::or(closing, glommio::timer::sleep(STOP_TIMEOUT)).await;
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;

    use strom_core::record::StreamRecord;
    use strom_core::snapshot::CheckpointBarrier;
    use strom_core::Record;

    use super::*;

    const TEST_TIMEOUT: Duration = Duration::from_secs(60);
    const TEST_IO_MEMORY_BYTES: usize = 512 * 1024;

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    fn service(id: u64, secret: Option<&[u8]>) -> NetworkService {
        NetworkService::start(id, loopback(), secret.map(<[u8]>::to_vec)).unwrap()
    }

    /// Runs `body` on a new unbound executor, failing after TEST_TIMEOUT.
    fn on_executor<G, F, T>(body: G) -> glommio::ExecutorJoinHandle<T>
    where
        G: FnOnce() -> F + Send + 'static,
        F: Future<Output = T> + 'static,
        T: Send + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(TEST_IO_MEMORY_BYTES)
            .spawn(move || async move {
                let _watch = strom_net::watchdog::watch("network test").unwrap();
                future::or(body(), async {
                    glommio::timer::sleep(TEST_TIMEOUT).await;
                    panic!("test executor timed out after {TEST_TIMEOUT:?}");
                })
                .await
            })
            .expect("start a test executor")
    }

    fn records(values: &[u64]) -> StreamElement {
        let records: Vec<StreamRecord<u64>> = values
            .iter()
            .map(|&value| StreamRecord {
                timestamp: value as i64,
                value,
            })
            .collect();
        StreamElement::Records(u64::encode(&records, rkyv::util::AlignedVec::new()).unwrap())
    }

    fn decode_records(element: &StreamElement) -> Vec<u64> {
        let StreamElement::Records(bytes) = element else {
            panic!("expected records, got {element:?}");
        };
        let mut values = Vec::new();
        u64::decode(bytes, |value, _| values.push(value)).expect("valid records");
        values
    }

    fn barrier(checkpoint_id: u64) -> StreamElement {
        StreamElement::Barrier(CheckpointBarrier {
            checkpoint_id,
            timestamp_ms: 1_700_000_000_000,
            target: Arc::new("/tmp/strom-network-test".into()),
            is_savepoint: false,
        })
    }

    /// A compact description of an element, to compare sequences.
    fn describe(element: &StreamElement) -> String {
        match element {
            StreamElement::Records(_) => format!("records {:?}", decode_records(element)),
            StreamElement::Watermark(timestamp) => format!("watermark {timestamp}"),
            StreamElement::Idle(is_idle) => format!("idle {is_idle}"),
            StreamElement::Barrier(barrier) => format!("barrier {}", barrier.checkpoint_id),
            StreamElement::EndOfInput => "end of input".to_string(),
            StreamElement::Local(records) => format!("{} local records", records.count()),
        }
    }

    /// A producer: sends `elements` in order, then returns.
    fn produce(
        sender: ChannelSender,
        elements: impl FnOnce() -> Vec<StreamElement> + Send + 'static,
    ) -> glommio::ExecutorJoinHandle<()> {
        on_executor(move || async move {
            let sender = sender.connect().await;
            for element in elements() {
                sender.send(element).await.expect("the channel is open");
            }
        })
    }

    /// A consumer: receives until end-of-input, checks that the channel then
    /// closes, and returns what it received.
    fn consume(receiver: ChannelReceiver) -> glommio::ExecutorJoinHandle<Vec<String>> {
        on_executor(move || async move {
            let receiver = receiver.connect().await;
            let mut received = Vec::new();
            loop {
                let element = receiver.recv().await.expect("end of input before close");
                received.push(describe(&element));
                if matches!(element, StreamElement::EndOfInput) {
                    break;
                }
            }
            // The forwarding task ended after end-of-input.
            assert!(receiver.recv().await.is_none());
            received
        })
    }

    /// Waits until `service` reported an error containing `needle`.
    fn wait_for_error(service: &NetworkService, needle: &str) -> String {
        let deadline = Instant::now() + TEST_TIMEOUT;
        loop {
            if let Some(error) = service
                .recent_errors()
                .into_iter()
                .find(|error| error.contains(needle))
            {
                return error;
            }
            assert!(
                Instant::now() < deadline,
                "no error containing {needle:?}: {:?}",
                service.recent_errors()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn channel_ids_are_stable_and_spread() {
        // Pinned: every process of a cluster, whatever its build, must agree.
        assert_eq!(channel_id(0, 0, 0, 0, 0), 0xd57f_bcfd);
        assert_eq!(
            channel_id(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef, 3, 2, 1, 0),
            channel_id(0x0123_4567_89ab_cdef_0123_4567_89ab_cdef, 3, 2, 1, 0)
        );
        let mut seen = HashSet::new();
        for attempt in 0..4 {
            for edge in 0..8 {
                for producer in 0..16 {
                    for consumer in 0..16 {
                        assert!(seen.insert(channel_id(42, attempt, edge, producer, consumer)));
                    }
                }
            }
        }
    }

    #[test]
    fn records_and_events_cross_in_order_and_end_of_input_ends_the_channel() {
        let first = service(1, None);
        let second = service(2, None);
        let id = channel_id(7, 0, 0, 0, 0);
        let sender = first.remote_output(2, second.local_addr(), id).unwrap();
        let receiver = second.remote_input(1, first.local_addr(), id).unwrap();
        let consumer = consume(receiver);
        let producer = produce(sender, || {
            vec![
                records(&[1, 2, 3]),
                StreamElement::Watermark(3),
                records(&[4]),
                barrier(1),
                StreamElement::Idle(true),
                StreamElement::Idle(false),
                records(&[5, 6]),
                StreamElement::Watermark(i64::MAX),
                StreamElement::EndOfInput,
            ]
        });
        producer.join().unwrap();
        assert_eq!(
            consumer.join().unwrap(),
            [
                "records [1, 2, 3]",
                "watermark 3",
                "records [4]",
                "barrier 1",
                "idle true",
                "idle false",
                "records [5, 6]",
                "watermark 9223372036854775807",
                "end of input",
            ]
        );
        assert!(
            first.recent_errors().is_empty(),
            "{:?}",
            first.recent_errors()
        );
        assert!(
            second.recent_errors().is_empty(),
            "{:?}",
            second.recent_errors()
        );
        first.stop();
        second.stop();
    }

    #[test]
    fn several_channels_share_one_link_in_both_directions() {
        const BUFFER_COUNT: u64 = 300;
        let first = service(1, None);
        let second = service(2, None);
        let mut producers = Vec::new();
        let mut consumers = Vec::new();
        for channel in 0..6u32 {
            let id = channel_id(9, 1, 0, channel, 0);
            // Channels 0..4 go from 1 to 2, the others back; the service
            // with the higher id waits for the lower one's link.
            let (from, to, from_id, to_id) = if channel < 4 {
                (&first, &second, 1, 2)
            } else {
                (&second, &first, 2, 1)
            };
            let sender = from.remote_output(to_id, to.local_addr(), id).unwrap();
            let receiver = to.remote_input(from_id, from.local_addr(), id).unwrap();
            let base = u64::from(channel) * 1_000_000;
            producers.push(produce(sender, move || {
                (0..BUFFER_COUNT)
                    .map(|index| records(&[base + index * 2, base + index * 2 + 1]))
                    .chain([StreamElement::EndOfInput])
                    .collect()
            }));
            consumers.push((base, consume(receiver)));
        }
        for producer in producers {
            producer.join().unwrap();
        }
        for (base, consumer) in consumers {
            let received = consumer.join().unwrap();
            let expected: Vec<String> = (0..BUFFER_COUNT)
                .map(|index| format!("records {:?}", [base + index * 2, base + index * 2 + 1]))
                .chain(["end of input".to_string()])
                .collect();
            assert_eq!(received, expected);
        }
        assert!(
            first.recent_errors().is_empty(),
            "{:?}",
            first.recent_errors()
        );
        assert!(
            second.recent_errors().is_empty(),
            "{:?}",
            second.recent_errors()
        );
        first.stop();
        second.stop();
    }

    #[test]
    fn a_slow_consumer_stalls_only_its_own_channel() {
        const BUFFER_COUNT: usize = 500;
        let first = service(1, None);
        let second = service(2, None);
        let slow_id = channel_id(11, 0, 0, 0, 0);
        let fast_id = channel_id(11, 0, 0, 0, 1);
        let slow_sender = first
            .remote_output(2, second.local_addr(), slow_id)
            .unwrap();
        let fast_sender = first
            .remote_output(2, second.local_addr(), fast_id)
            .unwrap();
        let slow_receiver = second.remote_input(1, first.local_addr(), slow_id).unwrap();
        let fast_receiver = second.remote_input(1, first.local_addr(), fast_id).unwrap();

        let slow_sent = Arc::new(AtomicUsize::new(0));
        let slow_producer = {
            let slow_sent = slow_sent.clone();
            on_executor(move || async move {
                let sender = slow_sender.connect().await;
                for index in 0..BUFFER_COUNT as u64 {
                    sender.send(records(&[index])).await.unwrap();
                    slow_sent.fetch_add(1, Ordering::Relaxed);
                }
                sender.send(StreamElement::EndOfInput).await.unwrap();
            })
        };
        let (fast_done, wait_fast_done) = mpsc::channel();
        let slow_consumer = on_executor(move || async move {
            let receiver = slow_receiver.connect().await;
            // Reads nothing until the fast channel is through.
            while wait_fast_done.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let mut values = Vec::new();
            while let Some(element) = receiver.recv().await {
                if matches!(element, StreamElement::EndOfInput) {
                    break;
                }
                values.extend(decode_records(&element));
            }
            values
        });
        let fast_consumer = consume(fast_receiver);
        let fast_producer = produce(fast_sender, || {
            (0..BUFFER_COUNT as u64)
                .map(|index| records(&[index]))
                .chain([StreamElement::EndOfInput])
                .collect()
        });
        fast_producer.join().unwrap();
        assert_eq!(fast_consumer.join().unwrap().len(), BUFFER_COUNT + 1);
        // The slow channel holds at most its two rings, its credit and a
        // few elements in hand: far fewer than were offered.
        let stalled_at = slow_sent.load(Ordering::Relaxed);
        assert!(
            stalled_at < 4 * CHANNEL_CAPACITY_BUFFERS
                && 4 * CHANNEL_CAPACITY_BUFFERS < BUFFER_COUNT,
            "the slow producer sent {stalled_at}"
        );
        fast_done.send(()).unwrap();
        slow_producer.join().unwrap();
        assert!(slow_consumer
            .join()
            .unwrap()
            .into_iter()
            .eq(0..BUFFER_COUNT as u64));
        first.stop();
        second.stop();
    }

    #[test]
    fn a_wrong_secret_prevents_the_link_and_is_reported() {
        let first = service(1, Some(b"one secret"));
        let second = service(2, Some(b"another secret"));
        let id = channel_id(13, 0, 0, 0, 0);
        let sender = first.remote_output(2, second.local_addr(), id).unwrap();
        let producer = on_executor(move || async move {
            let sender = sender.connect().await;
            // The channel closes when the forwarding task gives up.
            let mut sent_count = 0;
            while sender
                .send(StreamElement::Watermark(sent_count))
                .await
                .is_ok()
            {
                sent_count += 1;
            }
            sent_count
        });
        // The producer's sends fail (how many succeed before depends on
        // when the service got to it): joining proves they ended.
        producer.join().unwrap();
        let error = wait_for_error(&first, "cannot link to TaskManager 2");
        assert!(error.contains("wrong secret"), "{error}");
        wait_for_error(&second, "wrong secret proof");
        wait_for_error(&first, &format!("channel {id} to TaskManager 2 failed"));
        first.stop();
        second.stop();
    }

    #[test]
    fn release_stops_forwarding_and_keeps_the_link() {
        let first = service(1, None);
        let second = service(2, None);
        let released_id = channel_id(17, 0, 0, 0, 0);
        let sender = first
            .remote_output(2, second.local_addr(), released_id)
            .unwrap();
        let receiver = second
            .remote_input(1, first.local_addr(), released_id)
            .unwrap();
        let (producer_ready, wait_producer_ready) = mpsc::channel();
        let (consumer_ready, wait_consumer_ready) = mpsc::channel();
        let (released, wait_released) = mpsc::channel::<()>();
        let (released_too, wait_released_too) = mpsc::channel::<()>();
        let producer = on_executor(move || async move {
            let sender = sender.connect().await;
            for index in 0..3 {
                sender.send(records(&[index])).await.unwrap();
            }
            producer_ready.send(()).unwrap();
            while wait_released.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            // Sends fail once the forwarding task let go of the channel.
            let mut sent_count = 0;
            while sender
                .send(StreamElement::Watermark(sent_count))
                .await
                .is_ok()
            {
                sent_count += 1;
            }
            sent_count
        });
        let consumer = on_executor(move || async move {
            let receiver = receiver.connect().await;
            for index in 0..3 {
                let element = receiver.recv().await.unwrap();
                assert_eq!(decode_records(&element), [index]);
            }
            consumer_ready.send(()).unwrap();
            while wait_released_too.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            // The channel closes without end-of-input.
            let mut rest = Vec::new();
            while let Some(element) = receiver.recv().await {
                rest.push(describe(&element));
            }
            rest
        });
        wait_producer_ready.recv().unwrap();
        wait_consumer_ready.recv().unwrap();
        first.release(&[released_id]);
        second.release(&[released_id]);
        released.send(()).unwrap();
        released_too.send(()).unwrap();
        // The producer's sends fail (how many succeed before depends on
        // when the service got to it): joining proves they ended.
        producer.join().unwrap();
        let rest = consumer.join().unwrap();
        assert!(
            rest.iter().all(|element| element.starts_with("watermark")),
            "{rest:?}"
        );

        // The link is still up and carries new channels.
        let id = channel_id(17, 1, 0, 0, 0);
        let sender = first.remote_output(2, second.local_addr(), id).unwrap();
        let receiver = second.remote_input(1, first.local_addr(), id).unwrap();
        let consumer = consume(receiver);
        produce(sender, || vec![records(&[99]), StreamElement::EndOfInput])
            .join()
            .unwrap();
        assert_eq!(consumer.join().unwrap(), ["records [99]", "end of input"]);
        assert!(
            first.recent_errors().is_empty(),
            "{:?}",
            first.recent_errors()
        );
        assert!(
            second.recent_errors().is_empty(),
            "{:?}",
            second.recent_errors()
        );
        first.stop();
        second.stop();
    }

    #[test]
    fn a_failed_link_closes_the_local_ends() {
        let first = service(1, None);
        let second = service(2, None);
        let output_id = channel_id(19, 0, 0, 0, 0);
        let input_id = channel_id(19, 0, 1, 0, 0);
        let sender = first
            .remote_output(2, second.local_addr(), output_id)
            .unwrap();
        let remote_receiver = second
            .remote_input(1, first.local_addr(), output_id)
            .unwrap();
        let remote_sender = second
            .remote_output(1, first.local_addr(), input_id)
            .unwrap();
        let receiver = first
            .remote_input(2, second.local_addr(), input_id)
            .unwrap();
        let (up, wait_up) = mpsc::channel();
        let local_up = up.clone();
        let (peer_gone, wait_peer_gone) = mpsc::channel::<()>();
        let peer_tasks = on_executor(move || async move {
            let receiver = remote_receiver.connect().await;
            let sender = remote_sender.connect().await;
            sender.send(StreamElement::Watermark(1)).await.unwrap();
            assert!(matches!(
                receiver.recv().await,
                Some(StreamElement::Watermark(2))
            ));
            up.send(()).unwrap();
            // Keep the ends until the peer's service is gone.
            while wait_peer_gone.try_recv().is_err() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        });
        let local_tasks = on_executor(move || async move {
            let sender = sender.connect().await;
            let receiver = receiver.connect().await;
            sender.send(StreamElement::Watermark(2)).await.unwrap();
            assert!(matches!(
                receiver.recv().await,
                Some(StreamElement::Watermark(1))
            ));
            local_up.send(()).unwrap();
            // The input closes without end-of-input.
            assert!(receiver.recv().await.is_none());
            // The output closes once its forwarding task hits the dead link.
            let mut sent_count = 0;
            while sender.send(StreamElement::Watermark(3)).await.is_ok() {
                sent_count += 1;
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
            sent_count
        });
        // Both sides received before the link goes: under load, the
        // peer's watermark could still be on its way when it stopped.
        wait_up.recv().unwrap();
        wait_up.recv().unwrap();
        second.stop();
        peer_gone.send(()).unwrap();
        peer_tasks.join().unwrap();
        // Joining proves that both local ends closed.
        local_tasks.join().unwrap();
        wait_for_error(
            &first,
            &format!("channel {output_id} to TaskManager 2 failed"),
        );
        wait_for_error(
            &first,
            &format!("channel {input_id} from TaskManager 2 failed"),
        );
        first.stop();
    }

    #[test]
    fn a_duplicate_channel_id_is_refused() {
        let first = service(1, None);
        let address = "127.0.0.1:9".parse().unwrap();
        let id = channel_id(23, 0, 0, 0, 0);
        let _sender = first.remote_output(2, address, id).unwrap();
        let error = first.remote_output(2, address, id).unwrap_err();
        assert!(error.contains("in use already"), "{error}");
        // The same id on another link or in the other direction is another
        // channel.
        let _receiver = first.remote_input(2, address, id).unwrap();
        let _other = first.remote_output(3, address, id).unwrap();
        first.release(&[id]);
        let _again = first.remote_output(2, address, id).unwrap();
        first.release(&[id]);
        first.stop();
    }
}
