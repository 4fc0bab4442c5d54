//! The task loop: drives one subtask's operators on its slot.
//!
//! Protocol of a task:
//! 1. connect every output and input channel (a rendezvous with the peers,
//!    done concurrently so that no order of connections can deadlock);
//! 2. a source task polls its reader for a budget of records at a time; an
//!    input task takes the next element of any input channel: buffers go to
//!    the head, watermarks and idleness through the watermark valve, and
//!    end-of-input is counted per channel;
//! 3. after every step the queued output elements are sent, waiting while a
//!    channel is full (backpressure); when no input is ready, partial
//!    buffers are flushed first (adaptive flushing), and a busy task flushes
//!    them at least every `BUFFER_TIMEOUT`;
//! 4. once every input has ended (or the source has finished) the final
//!    watermark and end-of-input go downstream and the task reports its
//!    accumulators;
//! 5. a panic in user code fails the task with the operator's name; a closed
//!    channel means the job was cancelled, and the task just stops.

use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_lite::future::poll_once;
use futures_lite::Stream;
use strom_core::error::TaskError;
use strom_core::graph::{TaskInstance, TaskSetup};
use strom_core::operator::{OutputQueue, SourceHead, TaskHead};
use strom_core::record::StreamElement;
use strom_core::source::SourceStatus;
use strom_core::time::{ValveOutput, WatermarkValve};
use strom_core::JobGraph;
use strom_net::channel::{
    ChannelReceiver, ChannelSender, ConnectedChannelReceiver, ConnectedChannelSender,
};

use crate::messages::{JobId, ToJobManager, ToTaskManager};

/// Records a source emits per poll before the task sends and yields.
const SOURCE_POLL_BUDGET_RECORDS: usize = 1024;
/// The longest a record waits in a partially filled buffer while its task
/// stays busy (Flink's buffer timeout, 100 ms by default).
const BUFFER_TIMEOUT: Duration = Duration::from_millis(100);
/// How long a source with nothing available waits before polling again.
const SOURCE_IDLE_POLL_INTERVAL: Duration = Duration::from_millis(1);

/// One subtask to run, with its channels.
pub struct TaskDeployment {
    pub job: JobId,
    pub vertex: usize,
    pub subtask: u32,
    /// Input channels with the logical input (0, or 1 for a second input).
    pub inputs: Vec<(ChannelReceiver, usize)>,
    /// Output channels, in the order the task's writers index them.
    pub outputs: Vec<ChannelSender>,
    pub reports: Sender<ToTaskManager>,
}

enum Stop {
    Failed(TaskError),
    /// A peer closed its channel: the job is being cancelled.
    Cancelled,
}

struct TaskRun<'a> {
    graph: &'a JobGraph,
    vertex: usize,
    subtask: u32,
    setup: TaskSetup,
    outputs: Vec<ConnectedChannelSender>,
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
            let next = queue.borrow_mut().pop_front();
            let Some((channel, element)) = next else {
                return Ok(());
            };
            let sender = &self.outputs[channel];
            if let Err(error) = sender.try_send(element) {
                match error {
                    glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(element)) => {
                        sender.send(element).await.map_err(|_| Stop::Cancelled)?;
                    }
                    _ => return Err(Stop::Cancelled),
                }
            }
        }
    }

    async fn run_source(&self, mut head: Box<dyn SourceHead>) -> Result<(), Stop> {
        let queue = self.setup.queue.clone();
        let mut last_flush = Instant::now();
        loop {
            let status = self.guarded(|| head.poll(SOURCE_POLL_BUDGET_RECORDS))?;
            if last_flush.elapsed() >= BUFFER_TIMEOUT {
                self.guarded(|| head.flush())?;
                last_flush = Instant::now();
            }
            self.drain(&queue).await?;
            match status {
                SourceStatus::Finished => break,
                SourceStatus::MoreAvailable => glommio::yield_if_needed().await,
                SourceStatus::NothingAvailable => {
                    self.guarded(|| head.flush())?;
                    self.drain(&queue).await?;
                    glommio::timer::sleep(SOURCE_IDLE_POLL_INTERVAL).await;
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
        let mut ended_count = 0;
        let mut next_channel = 0;
        let mut last_flush = Instant::now();
        while ended_count < inputs.len() {
            let ready = poll_once(NextElement {
                inputs: &mut inputs,
                ended: &ended,
                start: next_channel,
            })
            .await;
            let (channel, element) = match ready {
                Some(ready) => ready,
                None => {
                    // No input is ready: ship partial buffers before waiting.
                    self.guarded(|| head.flush())?;
                    last_flush = Instant::now();
                    self.drain(&queue).await?;
                    NextElement {
                        inputs: &mut inputs,
                        ended: &ended,
                        start: next_channel,
                    }
                    .await
                }
            };
            next_channel = (channel + 1) % inputs.len();
            let Some(element) = element else {
                return Err(Stop::Cancelled);
            };
            let input = inputs[channel].1;
            match element {
                StreamElement::Records(bytes) => {
                    let decoded = self.guarded(|| head.on_buffer(input, &bytes))?;
                    decoded.map_err(|message| {
                        let (operator, subtask) = self.operator_at(0);
                        Stop::Failed(TaskError::Decode {
                            operator,
                            subtask,
                            message,
                        })
                    })?;
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
                    ended_count += 1;
                }
            }
            if last_flush.elapsed() >= BUFFER_TIMEOUT {
                self.guarded(|| head.flush())?;
                last_flush = Instant::now();
            }
            self.drain(&queue).await?;
            glommio::yield_if_needed().await;
        }
        self.guarded(|| head.end_of_input())?;
        self.drain(&queue).await
    }

    fn apply(&self, head: &mut dyn TaskHead, output: ValveOutput) -> Result<(), Stop> {
        // Turning idle, the watermark the valve flushes goes first, as in
        // Flink, so that what it fires, and the watermark itself, reach the
        // consumers while this task still counts as active for them.
        if output.idle == Some(true) {
            if let Some(watermark) = output.watermark {
                self.guarded(|| head.on_watermark(watermark))?;
            }
            return self.guarded(|| head.on_idle(true));
        }
        if let Some(idle) = output.idle {
            self.guarded(|| head.on_idle(idle))?;
        }
        if let Some(watermark) = output.watermark {
            self.guarded(|| head.on_watermark(watermark))?;
        }
        Ok(())
    }
}

/// The next element of any input channel that has not ended, starting the
/// search at `start` so that no channel starves. `None` as the element:
/// the channel closed before its end-of-input.
struct NextElement<'a> {
    inputs: &'a mut [(ConnectedChannelReceiver, usize)],
    ended: &'a [bool],
    start: usize,
}

impl Future for NextElement<'_> {
    type Output = (usize, Option<StreamElement>);

    fn poll(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Self::Output> {
        let count = self.inputs.len();
        let start = self.start;
        for offset in 0..count {
            let channel = (start + offset) % count;
            if self.ended[channel] {
                continue;
            }
            if let Poll::Ready(element) = Pin::new(&mut self.inputs[channel].0).poll_next(context) {
                return Poll::Ready((channel, element));
            }
        }
        Poll::Pending
    }
}

/// Connects all channel ends of a task at once.
async fn connect(
    inputs: Vec<(ChannelReceiver, usize)>,
    outputs: Vec<ChannelSender>,
) -> (
    Vec<(ConnectedChannelReceiver, usize)>,
    Vec<ConnectedChannelSender>,
) {
    let output_tasks: Vec<_> = outputs
        .into_iter()
        .map(|sender| glommio::spawn_local(sender.connect()))
        .collect();
    let input_tasks: Vec<_> = inputs
        .into_iter()
        .map(|(receiver, input)| {
            glommio::spawn_local(async move { (receiver.connect().await, input) })
        })
        .collect();
    let mut connected_outputs = Vec::with_capacity(output_tasks.len());
    for task in output_tasks {
        connected_outputs.push(task.await);
    }
    let mut connected_inputs = Vec::with_capacity(input_tasks.len());
    for task in input_tasks {
        connected_inputs.push(task.await);
    }
    (connected_inputs, connected_outputs)
}

/// Runs one subtask to its end and reports how it ended.
pub async fn run_task(graph: Arc<JobGraph>, deployment: TaskDeployment) {
    let TaskDeployment {
        job,
        vertex,
        subtask,
        inputs,
        outputs,
        reports,
    } = deployment;
    let (inputs, outputs) = connect(inputs, outputs).await;
    let run = TaskRun {
        graph: &graph,
        vertex,
        subtask,
        setup: TaskSetup::new(),
        outputs,
    };
    let result = match run.guarded(|| graph.instantiate(vertex, subtask, &run.setup)) {
        Err(stop) => Err(stop),
        Ok(TaskInstance::Source(head)) => run.run_source(head).await,
        Ok(TaskInstance::Input(head)) => run.run_input(head, inputs).await,
    };
    let report = match result {
        Ok(()) => ToJobManager::TaskFinished {
            job,
            vertex,
            subtask,
            accumulators: run.setup.accumulators.borrow().clone(),
        },
        Err(Stop::Failed(error)) => ToJobManager::TaskFailed {
            job,
            vertex,
            subtask,
            error: error.to_string(),
        },
        Err(Stop::Cancelled) => return,
    };
    let _ = reports.send(ToTaskManager::Report(report));
}
