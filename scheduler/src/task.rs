//! The task loop: drives one subtask's operators on its slot.
//!
//! Protocol of a task:
//! 1. connect every output and input channel on the task's slot;
//! 2. a source task polls its reader for a budget of records at a time; an
//!    input task takes the next element of any input channel: buffers go to
//!    the head, watermarks and idleness through the watermark valve, and
//!    end-of-input is counted per channel;
//! 3. after every step the queued output elements are sent, waiting while a
//!    channel is full (backpressure); when no input is ready, partial
//!    buffers are flushed first (adaptive flushing), and a busy task flushes
//!    them at least every buffer timeout (the job's `--buffer-timeout`);
//! 4. checkpoints: a source task takes the barrier the coordinator sends
//!    through its mailbox between two polls; an input task that reads
//!    barrier `n` on a channel stops reading that channel until every input
//!    channel that has not ended has delivered `n` (alignment, for
//!    exactly-once), then snapshots. Either way the snapshot's synchronous
//!    phase (capture, barrier forwarded downstream) runs between two
//!    records, and its asynchronous phase (serialize, write the file
//!    durably, acknowledge) runs beside the task on the same slot, yielding
//!    between key groups, with the file written on a blocking thread. A
//!    newer barrier during alignment abandons the older checkpoint;
//! 5. once every input has ended (or the source has finished) the final
//!    watermark and end-of-input go downstream and the task reports its
//!    accumulators;
//! 6. a panic in user code fails the task with the operator's name; a closed
//!    channel means the job was cancelled, and the task just stops.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use strom_core::error::TaskError;
use strom_core::graph::{TaskInstance, TaskSetup};
use strom_core::operator::{OutputQueue, SourceHead, TaskHead};
use strom_core::record::{buffer_record_count, StreamElement};
use strom_core::snapshot::{CheckpointBarrier, TaskRestore, TaskSnapshot};
use strom_core::source::SourceStatus;
use strom_core::time::{ValveChange, ValveOutput, WatermarkValve};
use strom_core::JobGraph;
use strom_net::channel::{
    spin_until, ChannelReceiver, ChannelSender, ConnectedChannelReceiver, ConnectedChannelSender,
    TrySendError, BUSY_POLL_SPIN,
};

use strom_state::OperatorSubtaskState;

use crate::messages::{JobId, ToJobManager, ToTaskManager};

/// Records a source emits per poll before the task sends and yields.
const SOURCE_POLL_BUDGET_RECORDS: usize = 1024;
/// How long a source with nothing available waits before polling again.
const SOURCE_IDLE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// In a busy-polling slot, a source whose next record is due within this
/// polls again at once (letting the slot's other tasks run in between)
/// instead of setting a timer: a timer fires tens of microseconds late.
const SOURCE_SPIN_WAIT: Duration = Duration::from_micros(200);

thread_local! {
    /// Whether this thread is a slot that busy-polls (see
    /// [`crate::taskmanager::SlotConfig::busy_poll`]).
    static BUSY_POLLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this slot's thread as busy-polling (or not).
pub(crate) fn set_busy_polling(busy_polling: bool) {
    BUSY_POLLING.with(|flag| flag.set(busy_polling));
}

thread_local! {
    /// Whether this slot runs its TaskManager's network service, whose
    /// sockets need the slot's reactor.
    static HOSTS_NETWORK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this slot's thread as running the network service: its input
/// tasks then wait the executor's way, busy-polling or not, since their
/// records from other TaskManagers arrive through the slot's reactor (a
/// task spinning on its ring would hold them back for the spin).
pub(crate) fn set_hosts_network() {
    HOSTS_NETWORK.with(|flag| flag.set(true));
}

/// Whether input tasks on this thread poll their rings themselves.
fn spins_on_input() -> bool {
    BUSY_POLLING.with(|flag| flag.get()) && !HOSTS_NETWORK.with(|flag| flag.get())
}

/// How often a busy-polling slot's reactor gets a turn at least.
const REACTOR_TURN_INTERVAL: Duration = Duration::from_millis(2);

thread_local! {
    /// When this slot's reactor last got a turn from a spinning task.
    static LAST_REACTOR_TURN: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Before a busy-polling task spins again: gives the slot's reactor a turn
/// if it has not had one for [`REACTOR_TURN_INTERVAL`]. A task that spins
/// yields to the slot's other ready tasks but never lets the executor's
/// loop run, so timers, sockets and tasks woken from other cores (another
/// task's input, a command) would wait for the preemption timer (100 ms).
/// A timer a microsecond away makes the task wait the executor's way,
/// which runs the reactor before it wakes the task again.
async fn let_reactor_turn() {
    let now = Instant::now();
    let due = LAST_REACTOR_TURN.with(|last| {
        last.get()
            .is_none_or(|turn| now.duration_since(turn) >= REACTOR_TURN_INTERVAL)
    });
    if due {
        let mut turn = std::pin::pin!(glommio::timer::sleep(Duration::from_micros(1)));
        // Due already at its first poll (the thread was descheduled): no
        // turn was had; the next spin tries again.
        if futures_lite::future::poll_once(turn.as_mut())
            .await
            .is_some()
        {
            return;
        }
        turn.await;
        LAST_REACTOR_TURN.with(|last| last.set(Some(Instant::now())));
    }
}

/// What the TaskManager tells a running task.
#[derive(Debug)]
pub enum TaskCommand {
    /// Inject this barrier (source tasks only).
    TriggerCheckpoint(CheckpointBarrier),
    /// Every task's state of the checkpoint is durable.
    CheckpointComplete(u64),
}

/// A task's commands: filled by the TaskManager's thread, read by the task
/// between two polls of its source or two input elements. The flag keeps
/// the check per poll to one load; commands are rare.
#[derive(Debug, Default)]
pub struct Mailbox {
    pending: AtomicBool,
    commands: Mutex<VecDeque<TaskCommand>>,
}

impl Mailbox {
    pub fn push(&self, command: TaskCommand) {
        let mut commands = self
            .commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        commands.push_back(command);
        self.pending.store(true, Ordering::Release);
    }

    /// Whether a command waits (one load).
    fn has_pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    fn pop(&self) -> Option<TaskCommand> {
        if !self.pending.load(Ordering::Acquire) {
            return None;
        }
        let mut commands = self
            .commands
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let command = commands.pop_front();
        if commands.is_empty() {
            self.pending.store(false, Ordering::Release);
        }
        command
    }
}

pub type TaskMailbox = Arc<Mailbox>;

/// What a task counts, for the REST API and metrics: written by the task
/// (one store per buffer, never contended), read by the TaskManager's
/// thread about once a second.
#[derive(Debug)]
pub struct TaskMetrics {
    pub records_in: AtomicU64,
    pub records_out: AtomicU64,
    /// The input watermark of an input task, the output watermark of a
    /// source task; `i64::MIN` before the first.
    pub watermark: AtomicI64,
}

impl Default for TaskMetrics {
    fn default() -> Self {
        TaskMetrics {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
        }
    }
}

impl TaskMetrics {
    /// Adds to a counter that only this task writes.
    fn add(counter: &AtomicU64, count: u64) {
        counter.store(
            counter.load(Ordering::Relaxed).wrapping_add(count),
            Ordering::Relaxed,
        );
    }
}

/// One subtask to run, with its channels.
pub struct TaskDeployment {
    pub job: JobId,
    pub attempt: u32,
    pub vertex: usize,
    pub subtask: u32,
    /// The state its operators start from.
    pub restore: TaskRestore,
    /// Input channels with the logical input (0, or 1 for a second input).
    pub inputs: Vec<(ChannelReceiver, usize)>,
    /// Output channels, in the order the task's writers index them.
    pub outputs: Vec<ChannelSender>,
    /// For each output channel, whether its consumer runs in the same
    /// slot (its records are then handed over as they are).
    pub local_outputs: Vec<bool>,
    pub reports: Sender<ToTaskManager>,
    /// Where the TaskManager leaves the task its commands.
    pub mailbox: TaskMailbox,
    /// The longest a record waits in a partly filled buffer while the
    /// task stays busy.
    pub buffer_timeout: Duration,
    pub metrics: Arc<TaskMetrics>,
}

enum Stop {
    Failed(TaskError),
    /// A peer closed its channel: the job is being cancelled.
    Cancelled,
}

struct TaskRun<'a> {
    graph: &'a JobGraph,
    job: JobId,
    attempt: u32,
    vertex: usize,
    subtask: u32,
    setup: TaskSetup,
    outputs: Vec<ConnectedChannelSender>,
    mailbox: TaskMailbox,
    reports: Sender<ToTaskManager>,
    buffer_timeout: Duration,
    metrics: Arc<TaskMetrics>,
    /// Whether this is a source task (its watermark is its output's).
    is_source: bool,
}

/// Barrier alignment of an input task (see the module's protocol, step 4).
struct Alignment {
    barrier: CheckpointBarrier,
    started: Instant,
    /// Channels that delivered the barrier and are not read until the
    /// snapshot.
    blocked: Vec<bool>,
}

impl TaskRun<'_> {
    /// The name of the operator at `position` in the chain, and `i/p`.
    fn operator_at(&self, position: usize) -> (String, String) {
        let vertex = &self.graph.vertices[self.vertex];
        let node = vertex.operators[position.min(vertex.operators.len() - 1)];
        (
            self.graph.operator_name(node).to_string(),
            format!("{}/{}", self.subtask + 1, vertex.parallelism),
        )
    }

    /// An input that could not be read as the head operator's records.
    fn decode_failed(&self, message: String) -> Stop {
        let (operator, subtask) = self.operator_at(0);
        Stop::Failed(TaskError::Decode {
            operator,
            subtask,
            message,
        })
    }

    /// Runs user code; a panic becomes a failure naming the operator.
    fn guarded<R>(&self, call: impl FnOnce() -> R) -> Result<R, Stop> {
        self.setup.tracker.set(0);
        catch_unwind(AssertUnwindSafe(call)).map_err(|payload| {
            let message = strom_core::error::panic_message(payload.as_ref());
            let (operator, subtask) = self.operator_at(self.setup.tracker.get());
            Stop::Failed(TaskError::Panic {
                operator,
                subtask,
                message,
            })
        })
    }

    /// Sends every queued element, waiting where a channel is full.
    async fn drain(&self, queue: &OutputQueue) -> Result<(), Stop> {
        loop {
            let Some((channel, element)) = queue.pop() else {
                return Ok(());
            };
            match &element {
                StreamElement::Records(bytes) => {
                    TaskMetrics::add(&self.metrics.records_out, buffer_record_count(bytes))
                }
                StreamElement::Local(records) => {
                    TaskMetrics::add(&self.metrics.records_out, records.count() as u64)
                }
                StreamElement::Watermark(watermark) if self.is_source => {
                    self.metrics.watermark.store(*watermark, Ordering::Relaxed)
                }
                _ => {}
            }
            let sender = &self.outputs[channel];
            match sender.try_send(element) {
                Ok(()) => {}
                Err(TrySendError::Full(element)) => {
                    sender.send(element).await.map_err(|_| Stop::Cancelled)?;
                }
                Err(TrySendError::Closed(_)) => return Err(Stop::Cancelled),
            }
            // A buffer given back for each one sent, while the writers
            // have too few.
            if queue.wants_spares() {
                if let Some(spare) = sender.take_spare() {
                    queue.add_spare(spare);
                }
            }
            if let Some(records) = sender.take_local_spare() {
                queue.add_local_spare(channel, records);
            }
        }
    }

    async fn run_source(&self, mut head: Box<dyn SourceHead>) -> Result<(), Stop> {
        let queue = self.setup.queue.clone();
        let mut last_flush = Instant::now();
        loop {
            loop {
                match self.mailbox.pop() {
                    None => break,
                    Some(TaskCommand::TriggerCheckpoint(barrier)) => {
                        let started = Instant::now();
                        let mut snapshot = TaskSnapshot::default();
                        self.guarded(|| head.snapshot(&barrier, &mut snapshot))?;
                        self.persist(barrier, snapshot, started.elapsed(), Duration::ZERO);
                    }
                    Some(TaskCommand::CheckpointComplete(id)) => {
                        self.guarded(|| head.checkpoint_complete(id))?;
                    }
                }
            }
            let status = self.guarded(|| head.poll(SOURCE_POLL_BUDGET_RECORDS))?;
            if last_flush.elapsed() >= self.buffer_timeout {
                self.guarded(|| head.flush())?;
                last_flush = Instant::now();
            }
            self.drain(&queue).await?;
            match status {
                SourceStatus::Finished => break,
                SourceStatus::MoreAvailable => glommio::yield_if_needed().await,
                SourceStatus::NothingAvailable | SourceStatus::NothingAvailableFor(_) => {
                    self.guarded(|| head.flush())?;
                    self.drain(&queue).await?;
                    let wait = match status {
                        SourceStatus::NothingAvailableFor(wait) => {
                            wait.min(SOURCE_IDLE_POLL_INTERVAL)
                        }
                        _ => SOURCE_IDLE_POLL_INTERVAL,
                    };
                    if wait.is_zero()
                        || (wait < SOURCE_SPIN_WAIT && BUSY_POLLING.with(|flag| flag.get()))
                    {
                        let_reactor_turn().await;
                        futures_lite::future::yield_now().await;
                    } else {
                        glommio::timer::sleep(wait).await;
                    }
                }
            }
        }
        self.guarded(|| head.end_of_input())?;
        self.drain(&queue).await
    }

    async fn run_input(
        &self,
        mut head: Box<dyn TaskHead>,
        mut inputs: Vec<(ConnectedChannelReceiver, usize)>,
    ) -> Result<(), Stop> {
        let queue = self.setup.queue.clone();
        let mut valve = WatermarkValve::new(inputs.len());
        let mut ended = vec![false; inputs.len()];
        // Ended, or blocked by alignment: not read now.
        let mut skipped = vec![false; inputs.len()];
        let mut ended_count = 0;
        let mut next_channel = 0;
        let mut last_flush = Instant::now();
        let mut alignment: Option<Alignment> = None;
        // Watermark alignment: channels ahead of the slowest by more than
        // the drift are not read (their producers wait, backpressured).
        let max_drift = self.graph.watermark_alignment(self.vertex);
        let mut held = vec![false; inputs.len()];
        while ended_count < inputs.len() {
            self.take_commands(&mut *head)?;
            let ready = try_next(&inputs, &skipped, next_channel);
            let (channel, element) = match ready {
                Some(ready) => ready,
                None => {
                    // No input is ready: ship partial buffers before waiting.
                    self.guarded(|| head.flush())?;
                    last_flush = Instant::now();
                    self.drain(&queue).await?;
                    // A busy-polling slot first polls the rings itself, so
                    // that it reads the next buffer within a fraction of a
                    // microsecond of its push, not after a turn of the
                    // executor's loop (several microseconds).
                    let spun = if spins_on_input() {
                        let_reactor_turn().await;
                        spin_until(
                            BUSY_POLL_SPIN,
                            || match try_next(&inputs, &skipped, next_channel) {
                                Some(ready) => Poll::Ready(ready),
                                None => Poll::Pending,
                            },
                            || self.mailbox.has_pending(),
                        )
                        .await
                    } else {
                        None
                    };
                    let next = NextElement {
                        inputs: &mut inputs,
                        skipped: &skipped,
                        start: next_channel,
                    };
                    if let Some(ready) = spun {
                        ready
                    } else if self.mailbox.has_pending() {
                        // The spin stopped for a command: take it now (the
                        // mailbox wakes no one).
                        continue;
                    } else if !held.contains(&true) {
                        next.await
                    } else {
                        // Holding channels back, the task waits for the
                        // others only so long: a producer held here may be
                        // what another consumer waits for.
                        let timeout = async {
                            glommio::timer::sleep(ALIGNMENT_HOLD_TIMEOUT).await;
                            None
                        };
                        match futures_lite::future::or(async { Some(next.await) }, timeout).await {
                            Some(ready) => ready,
                            None => {
                                for (channel, held) in held.iter_mut().enumerate() {
                                    *held = false;
                                    skipped[channel] = ended[channel];
                                }
                                continue;
                            }
                        }
                    }
                }
            };
            next_channel = (channel + 1) % inputs.len();
            let Some(element) = element else {
                return Err(Stop::Cancelled);
            };
            let input = inputs[channel].1;
            match element {
                StreamElement::Records(bytes) => {
                    TaskMetrics::add(&self.metrics.records_in, buffer_record_count(&bytes));
                    let decoded = self.guarded(|| head.on_buffer(input, &bytes))?;
                    decoded.map_err(|message| self.decode_failed(message))?;
                    inputs[channel].0.recycle(bytes);
                }
                StreamElement::Local(mut records) => {
                    TaskMetrics::add(&self.metrics.records_in, records.count() as u64);
                    let taken = self.guarded(|| head.on_local(input, &mut records))?;
                    taken.map_err(|message| self.decode_failed(message))?;
                    inputs[channel].0.recycle_local(records.into_spare());
                }
                StreamElement::Watermark(watermark) => {
                    let output = valve.on_watermark(channel, watermark);
                    self.apply(&mut *head, output)?;
                }
                StreamElement::Idle(idle) => {
                    let output = valve.on_idle(channel, idle);
                    self.apply(&mut *head, output)?;
                }
                StreamElement::EndOfInput => {
                    ended[channel] = true;
                    skipped[channel] = true;
                    ended_count += 1;
                    self.try_complete_alignment(&mut *head, &mut alignment, &ended, &mut skipped)?;
                }
                StreamElement::Barrier(barrier) => {
                    let newer = alignment.as_ref().is_none_or(|current| {
                        barrier.checkpoint_id > current.barrier.checkpoint_id
                    });
                    if let Some(current) = alignment.as_ref().filter(|_| newer) {
                        // A newer checkpoint overtook the one being aligned:
                        // that one can no longer complete.
                        self.decline(
                            current.barrier.checkpoint_id,
                            "a newer barrier arrived during alignment".to_string(),
                        );
                        alignment = None;
                        skipped.copy_from_slice(&ended);
                    }
                    if newer {
                        alignment = Some(Alignment {
                            barrier,
                            started: Instant::now(),
                            blocked: vec![false; inputs.len()],
                        });
                    }
                    // An older barrier is one of an abandoned checkpoint.
                    if let Some(current) = alignment.as_mut() {
                        current.blocked[channel] = true;
                        skipped[channel] = true;
                    }
                    self.try_complete_alignment(&mut *head, &mut alignment, &ended, &mut skipped)?;
                }
            }
            if let Some(max_drift) = max_drift {
                hold_channels_ahead(
                    max_drift,
                    &valve,
                    alignment.as_ref(),
                    &ended,
                    &mut held,
                    &mut skipped,
                );
            }
            if last_flush.elapsed() >= self.buffer_timeout {
                self.guarded(|| head.flush())?;
                last_flush = Instant::now();
            }
            self.drain(&queue).await?;
            glommio::yield_if_needed().await;
        }
        self.guarded(|| head.end_of_input())?;
        self.drain(&queue).await
    }

    /// Snapshots once every channel that has not ended delivered the
    /// barrier, and reads all channels again.
    fn try_complete_alignment(
        &self,
        head: &mut dyn TaskHead,
        alignment: &mut Option<Alignment>,
        ended: &[bool],
        skipped: &mut [bool],
    ) -> Result<(), Stop> {
        let Some(current) = alignment.as_ref() else {
            return Ok(());
        };
        let aligned = (0..ended.len()).all(|channel| ended[channel] || current.blocked[channel]);
        if !aligned {
            return Ok(());
        }
        let current = alignment.take().expect("an alignment");
        let started = Instant::now();
        let mut snapshot = TaskSnapshot::default();
        self.guarded(|| head.on_barrier(&current.barrier, &mut snapshot))?;
        let alignment = started.duration_since(current.started);
        self.persist(current.barrier, snapshot, started.elapsed(), alignment);
        skipped.copy_from_slice(ended);
        Ok(())
    }

    /// Runs the commands the slot left in the mailbox.
    fn take_commands(&self, head: &mut dyn TaskHead) -> Result<(), Stop> {
        loop {
            match self.mailbox.pop() {
                None => return Ok(()),
                // Barriers reach input tasks through their channels.
                Some(TaskCommand::TriggerCheckpoint(_)) => {}
                Some(TaskCommand::CheckpointComplete(id)) => {
                    self.guarded(|| head.checkpoint_complete(id))?;
                }
            }
        }
    }

    /// The asynchronous phase of a snapshot: serializes the captures one
    /// key group at a time, writes the task's state file durably on a
    /// blocking thread, and acknowledges (or declines) to the JobMaster.
    fn persist(
        &self,
        barrier: CheckpointBarrier,
        snapshot: TaskSnapshot,
        pause: Duration,
        alignment: Duration,
    ) {
        let (job, attempt, vertex, subtask) = (self.job, self.attempt, self.vertex, self.subtask);
        let reports = self.reports.clone();
        let checkpoint_id = barrier.checkpoint_id;
        glommio::spawn_local(async move {
            let written = async {
                let mut serialized = snapshot.empty_snapshots();
                for item in snapshot.work_items() {
                    snapshot.serialize_item(item, &mut serialized)?;
                    glommio::yield_if_needed().await;
                }
                // Releases the key groups shared with the operators.
                drop(snapshot);
                let states: Vec<OperatorSubtaskState> = serialized
                    .into_iter()
                    .map(|operator| OperatorSubtaskState {
                        operator_id: operator.operator_id,
                        operator_name: operator.operator_name,
                        subtask_index: operator.subtask_index,
                        parallelism: operator.parallelism,
                        max_parallelism: operator.max_parallelism,
                        key_groups: operator.key_groups,
                        operator_state: operator.operator_state,
                    })
                    .collect();
                let directory = barrier.target.clone();
                let file_name = format!("task-{vertex}-{subtask}.state");
                glommio::executor()
                    .spawn_blocking(move || {
                        strom_state::write_task_state(&directory, &file_name, &states)
                            .map_err(|error| error.to_string())
                    })
                    .await
            }
            .await;
            let report = match written {
                Ok(handle) => ToJobManager::AcknowledgeCheckpoint {
                    job,
                    attempt,
                    vertex,
                    subtask,
                    checkpoint_id,
                    handle,
                    pause,
                    alignment,
                },
                Err(reason) => ToJobManager::DeclineCheckpoint {
                    job,
                    attempt,
                    checkpoint_id,
                    reason: format!("subtask {subtask} of vertex {vertex}: {reason}"),
                },
            };
            let _ = reports.send(ToTaskManager::Report(report));
        })
        .detach();
    }

    fn decline(&self, checkpoint_id: u64, reason: String) {
        let _ = self
            .reports
            .send(ToTaskManager::Report(ToJobManager::DeclineCheckpoint {
                job: self.job,
                attempt: self.attempt,
                checkpoint_id,
                reason,
            }));
    }

    fn apply(&self, head: &mut dyn TaskHead, output: ValveOutput) -> Result<(), Stop> {
        for change in output.in_order() {
            match change {
                ValveChange::Watermark(watermark) => {
                    self.metrics.watermark.store(watermark, Ordering::Relaxed);
                    self.guarded(|| head.on_watermark(watermark))?;
                }
                ValveChange::Idle(idle) => self.guarded(|| head.on_idle(idle))?,
            }
        }
        Ok(())
    }
}

/// How long a task holding channels back for watermark alignment waits
/// for its other channels before it reads the held ones again.
const ALIGNMENT_HOLD_TIMEOUT: Duration = Duration::from_millis(20);

/// Sets `held` to the channels ahead of the slowest by more than
/// `max_drift`, and `skipped` to what is not read now: ended channels, and
/// either the channels that delivered a checkpoint barrier while it is
/// aligned (holding none then: a held channel may owe its barrier) or the
/// held ones.
fn hold_channels_ahead(
    max_drift: i64,
    valve: &WatermarkValve,
    alignment: Option<&Alignment>,
    ended: &[bool],
    held: &mut [bool],
    skipped: &mut [bool],
) {
    match alignment {
        Some(alignment) => {
            held.fill(false);
            for (channel, skipped) in skipped.iter_mut().enumerate() {
                *skipped = ended[channel] || alignment.blocked[channel];
            }
        }
        None => {
            valve.ahead_of_slowest(max_drift, ended, held);
            for (channel, skipped) in skipped.iter_mut().enumerate() {
                *skipped = ended[channel] || held[channel];
            }
        }
    }
}

/// The next element of any input channel that is not skipped (ended, or
/// blocked by alignment), starting the search at `start` so that no channel
/// starves. `None` as the element: the channel closed before its
/// end-of-input.
struct NextElement<'a> {
    inputs: &'a mut [(ConnectedChannelReceiver, usize)],
    skipped: &'a [bool],
    start: usize,
}

/// The next element of the first input from `start` on (round robin) that
/// has one, without registering to be woken.
fn try_next(
    inputs: &[(ConnectedChannelReceiver, usize)],
    skipped: &[bool],
    start: usize,
) -> Option<(usize, Option<StreamElement>)> {
    let count = inputs.len();
    (0..count)
        .map(|offset| (start + offset) % count)
        .filter(|channel| !skipped[*channel])
        .find_map(|channel| match inputs[channel].0.try_recv() {
            Poll::Ready(element) => Some((channel, element)),
            Poll::Pending => None,
        })
}

impl Future for NextElement<'_> {
    type Output = (usize, Option<StreamElement>);

    fn poll(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let count = self.inputs.len();
        let start = self.start;
        for offset in 0..count {
            let channel = (start + offset) % count;
            if self.skipped[channel] {
                continue;
            }
            if let Poll::Ready(element) = self.inputs[channel].0.poll_recv(context) {
                return Poll::Ready((channel, element));
            }
        }
        Poll::Pending
    }
}

/// Connects all channel ends of a task on its slot.
async fn connect(
    inputs: Vec<(ChannelReceiver, usize)>,
    outputs: Vec<ChannelSender>,
) -> (
    Vec<(ConnectedChannelReceiver, usize)>,
    Vec<ConnectedChannelSender>,
) {
    let mut connected_outputs = Vec::with_capacity(outputs.len());
    for sender in outputs {
        connected_outputs.push(sender.connect().await);
    }
    let mut connected_inputs = Vec::with_capacity(inputs.len());
    for (receiver, input) in inputs {
        connected_inputs.push((receiver.connect().await, input));
    }
    (connected_inputs, connected_outputs)
}

/// Runs one subtask to its end and reports how it ended.
pub async fn run_task(graph: Arc<JobGraph>, deployment: TaskDeployment) {
    let TaskDeployment {
        job,
        attempt,
        vertex,
        subtask,
        restore,
        inputs,
        outputs,
        local_outputs,
        reports,
        mailbox,
        buffer_timeout,
        metrics,
    } = deployment;
    let (inputs, outputs) = connect(inputs, outputs).await;
    let run = TaskRun {
        graph: &graph,
        job,
        attempt,
        vertex,
        subtask,
        setup: TaskSetup::new(restore),
        outputs,
        mailbox,
        reports: reports.clone(),
        buffer_timeout,
        metrics,
        is_source: graph.vertices[vertex].is_source,
    };
    run.setup.queue.set_local_channels(local_outputs);
    let result = match run.guarded(|| graph.instantiate(vertex, subtask, &run.setup)) {
        Err(stop) => Err(stop),
        Ok(TaskInstance::Source(head)) => run.run_source(head).await,
        Ok(TaskInstance::Input(head)) => run.run_input(head, inputs).await,
    };
    let report = match result {
        Ok(()) => ToJobManager::TaskFinished {
            job,
            attempt,
            vertex,
            subtask,
            accumulators: run.setup.accumulators.borrow().clone(),
            committables: run.setup.committables.borrow().clone(),
        },
        Err(Stop::Failed(error)) => ToJobManager::TaskFailed {
            job,
            attempt,
            vertex,
            subtask,
            error: error.to_string(),
        },
        Err(Stop::Cancelled) => return,
    };
    let _ = reports.send(ToTaskManager::Report(report));
}
