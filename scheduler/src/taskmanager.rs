//! The TaskManager: slots as pinned glommio executors, deployment of
//! subtasks into them, and the channels between them.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::net::SocketAddr;
use std::path::Path;

use glommio::{LocalExecutorBuilder, Placement};
use strom_core::key::KeyGroupRange;
use strom_core::snapshot::{OperatorRestore, TaskRestore};
use strom_core::{JobGraph, Program};
use strom_net::channel::{channel, ChannelReceiver, ChannelSender};

use crate::messages::{JobId, SlotRef, SubtaskMetrics, ToJobManager, ToTaskManager};
use crate::network::{channel_id, HostedService, NetworkService};
use crate::task::{run_task, TaskCommand, TaskDeployment, TaskMailbox, TaskMetrics};
use crate::wake::{CommandReceiver, CommandSender};

/// A task may run this long before it must let the slot's other tasks run
/// (glommio's default). Not shorter: glommio 0.9 can park an executor that
/// was preempted before it ran anything (fixed upstream only in a fork), and
/// a short preempt timer made that frequent on a loaded machine; tasks
/// yield on their own at every full channel anyway.
const SLOT_PREEMPT_INTERVAL: Duration = Duration::from_millis(100);
/// Memory each slot's io_uring may lock for registered buffers; small, so
/// that a default locked-memory limit of 8 MiB holds a few slots.
const SLOT_IO_MEMORY_BYTES: usize = 512 * 1024;
/// How long a slot may take to start its executor.
const SLOT_START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a slot told to stop may take to end its executor before it is
/// left running (a task that never yields would otherwise hang the process
/// that drops its TaskManager, an error or a panic on the way out).
const SLOT_STOP_WAIT: Duration = Duration::from_secs(5);

enum SlotCommand {
    Deploy {
        job: JobId,
        attempt: u32,
        graph: Arc<JobGraph>,
        tasks: Vec<TaskDeployment>,
    },
    Cancel {
        job: JobId,
    },
    /// Run the TaskManager's network service here (a one-slot TaskManager).
    HostNetwork(HostedService),
    Shutdown,
}

/// A task of a job's current attempt, as the TaskManager's thread sees it.
struct DeployedTask {
    is_source: bool,
    mailbox: TaskMailbox,
    vertex: usize,
    subtask: u32,
    metrics: Arc<TaskMetrics>,
}

/// How often a TaskManager reports its tasks' figures and its network
/// counts to the JobManager (its heartbeat, in a local cluster).
pub const METRICS_REPORT_INTERVAL: Duration = Duration::from_secs(1);

struct Slot {
    /// Its commands: an idle slot sleeps until one comes.
    commands: CommandSender<SlotCommand>,
    /// Its executor's thread; `None` once joined.
    thread: Option<glommio::ExecutorJoinHandle<()>>,
    /// Disconnected when the slot's executor has run its last task.
    ended: mpsc::Receiver<()>,
    index: usize,
}

impl Drop for Slot {
    /// Stops the slot's executor and waits for its thread, so that what
    /// ran on it (the tasks, a hosted network service's sockets) is gone
    /// when a TaskManager is: a join handle dropped alone would leave the
    /// thread running behind it. A slot that does not stop within
    /// [`SLOT_STOP_WAIT`] is left running, and said so.
    fn drop(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        let _ = self.commands.send(SlotCommand::Shutdown);
        match self.ended.recv_timeout(SLOT_STOP_WAIT) {
            Err(mpsc::RecvTimeoutError::Timeout) => eprintln!(
                "slot {} did not stop within {SLOT_STOP_WAIT:?} (a task that does not yield?): left running",
                self.index
            ),
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                let _ = thread.join();
            }
        }
    }
}

pub struct TaskManager {
    id: usize,
    programs: Vec<Program>,
    /// Carries the channels to and from subtasks on other TaskManagers.
    /// Declared (so dropped) before the slots: it may run on one, and
    /// stops only while that slot's executor still runs it.
    network: Option<NetworkService>,
    slots: Vec<Slot>,
    job_manager: Sender<ToJobManager>,
    inbox_sender: Sender<ToTaskManager>,
    /// The tasks of each job's current attempt here.
    mailboxes: HashMap<JobId, (u32, Vec<DeployedTask>)>,
    /// The network channels of each job's current attempt.
    remote_channels: HashMap<JobId, (u32, Vec<u32>)>,
}

/// The CPUs this process may run on, from `/proc/self/status`.
pub fn allowed_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .map(str::trim)
        .unwrap_or("");
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|part| !part.is_empty()) {
        let mut bounds = part
            .split('-')
            .filter_map(|bound| bound.trim().parse::<usize>().ok());
        if let Some(first) = bounds.next() {
            let last = bounds.next().unwrap_or(first);
            cpus.extend(first..=last);
        }
    }
    if cpus.is_empty() {
        let count = std::thread::available_parallelism()
            .map(|count| count.get())
            .unwrap_or(1);
        cpus.extend(0..count);
    }
    cpus
}

/// A TaskManager's slots.
#[derive(Clone, Debug, Default)]
pub struct SlotConfig {
    pub count: u32,
    /// The CPUs of the slots (slot `i` on the `i`-th, round robin); empty:
    /// the CPUs this process may use.
    pub cpus: Vec<usize>,
    /// Busy-polling: an idle slot spins this long before it parks its
    /// thread, so that the next element finds it awake instead of waking
    /// it (tens of microseconds on a VM), a task with no input ready polls
    /// its rings itself for up to 200 µs before it waits (not in a slot
    /// that hosts the network service), and a source whose next record is
    /// due within 200 µs polls again instead of setting a timer. Costs a
    /// core per slot while the slot is idle. The network service still
    /// parks when it has its own thread (a TaskManager of several slots);
    /// in a TaskManager of one slot it runs on the slot's executor, and
    /// spins with it. `None`: park at once.
    pub busy_poll: Option<Duration>,
}

impl TaskManager {
    /// Starts the slots, slot `i` pinned to the `i`-th of the slots' CPUs
    /// (round robin when there are more slots than CPUs), and, with a
    /// `data_bind` address, the network service that connects it to other
    /// TaskManagers (proving `secret` to them, and requiring it of them).
    pub fn start(
        id: usize,
        programs: Vec<Program>,
        slot_config: SlotConfig,
        data_bind: Option<SocketAddr>,
        secret: Option<Vec<u8>>,
        job_manager: Sender<ToJobManager>,
        inbox_sender: Sender<ToTaskManager>,
    ) -> Result<TaskManager, String> {
        let SlotConfig {
            count: slot_count,
            cpus,
            busy_poll,
        } = slot_config;
        let cpus = if cpus.is_empty() {
            allowed_cpus()
        } else {
            cpus
        };
        let mut slots = Vec::new();
        for index in 0..slot_count as usize {
            let cpu = cpus[index % cpus.len()];
            let (commands, command_inbox) = crate::wake::unbounded();
            let (ready, slot_ready) = mpsc::channel();
            let (ending, ended) = mpsc::channel::<()>();
            let mut builder = LocalExecutorBuilder::new(Placement::Fixed(cpu))
                .name(&format!("strom-slot-{index}"))
                .io_memory(SLOT_IO_MEMORY_BYTES)
                .preempt_timer(SLOT_PREEMPT_INTERVAL);
            if let Some(spin) = busy_poll {
                builder = builder.spin_before_park(spin);
            }
            let thread = builder
                .spawn(move || {
                    crate::task::set_busy_polling(busy_poll.is_some());
                    async move {
                        // Dropped, so disconnected, however the slot ends.
                        let _ending = ending;
                        // Signalled if it sleeps through its own timers.
                        let _watch = match strom_net::watchdog::watch(&format!("slot {index}")) {
                            Ok(watch) => watch,
                            Err(error) => {
                                let _ = ready.send(Err(error));
                                return;
                            }
                        };
                        slot_main(command_inbox, ready).await
                    }
                })
                .map_err(|error| format!("cannot start slot {index} on CPU {cpu}: {error}"))?;
            // An executor that cannot set up its io_uring dies in its thread;
            // wait for the slot to say it runs, so that a job is never
            // deployed into a dead slot (and never waits for it forever).
            match slot_ready.recv_timeout(SLOT_START_TIMEOUT) {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    let _ = thread.join();
                    return Err(format!("cannot start slot {index} on CPU {cpu}: {error}"));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let cause = match thread.join() {
                        Ok(()) => "its executor stopped".to_string(),
                        Err(error) => error.to_string(),
                    };
                    return Err(format!(
                        "cannot start slot {index} on CPU {cpu}: {cause} (io_uring needs locked memory: check `ulimit -l`, see the README)"
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    // Dropping `commands` stops the slot if it ever starts.
                    return Err(format!(
                        "slot {index} on CPU {cpu} did not start within {SLOT_START_TIMEOUT:?}: is the machine overloaded?"
                    ));
                }
            }
            slots.push(Slot {
                commands,
                thread: Some(thread),
                ended,
                index,
            });
        }
        let network = match (data_bind, &slots[..]) {
            (None, _) => None,
            // The slot's tasks are the service's only users: on the slot's
            // executor, their records reach the socket without a thread
            // hop (see `NetworkService::start_hosted`).
            (Some(bind), [slot]) => Some(NetworkService::start_hosted(
                id as u64,
                bind,
                secret,
                |service| {
                    slot.commands
                        .send(SlotCommand::HostNetwork(service))
                        .map_err(|_| {
                            "slot 0 stopped before the network service started".to_string()
                        })
                },
            )?),
            (Some(bind), _) => Some(NetworkService::start(id as u64, bind, secret)?),
        };
        Ok(TaskManager {
            id,
            programs,
            slots,
            job_manager,
            inbox_sender,
            mailboxes: HashMap::new(),
            network,
            remote_channels: HashMap::new(),
        })
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    /// Where other TaskManagers reach this one's network service.
    pub fn data_address(&self) -> Option<SocketAddr> {
        self.network.as_ref().map(NetworkService::local_addr)
    }

    /// Sends the JobManager what the tasks counted and what the network
    /// service moved.
    fn report_metrics(&self) {
        for job in self.mailboxes.keys() {
            self.report_job_metrics(*job);
        }
        let _ = self.job_manager.send(ToJobManager::TaskManagerHeartbeat {
            task_manager: self.id,
            network: self
                .network
                .as_ref()
                .map(NetworkService::counts)
                .unwrap_or_default(),
        });
    }

    /// Sends the JobManager what the tasks of `job` here counted.
    fn report_job_metrics(&self, job: JobId) {
        if let Some((attempt, tasks)) = self.mailboxes.get(&job) {
            let tasks = tasks
                .iter()
                .map(|task| SubtaskMetrics {
                    vertex: task.vertex,
                    subtask: task.subtask,
                    records_in: task.metrics.records_in.load(Ordering::Relaxed),
                    records_out: task.metrics.records_out.load(Ordering::Relaxed),
                    watermark: task.metrics.watermark.load(Ordering::Relaxed),
                })
                .collect();
            let _ = self.job_manager.send(ToJobManager::TaskMetrics {
                job,
                attempt: *attempt,
                tasks,
            });
        }
    }

    /// Handles messages until `Shutdown`, then stops the slots.
    pub fn run(mut self, inbox: Receiver<ToTaskManager>) {
        let mut last_report = Instant::now();
        loop {
            if last_report.elapsed() >= METRICS_REPORT_INTERVAL {
                self.report_metrics();
                last_report = Instant::now();
            }
            let message = match inbox.recv_timeout(METRICS_REPORT_INTERVAL) {
                Ok(message) => message,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            };
            match message {
                ToTaskManager::DeployJob {
                    job,
                    attempt,
                    program,
                    args,
                    slots,
                    data_addresses,
                    restore,
                } => {
                    if let Err(error) = self.deploy(
                        job,
                        attempt,
                        &program,
                        &args,
                        &slots,
                        &data_addresses,
                        restore.as_deref(),
                    ) {
                        let _ = self.job_manager.send(ToJobManager::TaskFailed {
                            job,
                            attempt,
                            vertex: 0,
                            subtask: 0,
                            error,
                        });
                    }
                }
                ToTaskManager::TriggerCheckpoint {
                    job,
                    attempt,
                    barrier,
                } => {
                    // Straight into the source tasks' mailboxes: a busy slot
                    // takes the barrier at its next poll.
                    if let Some((_, mailboxes)) = self
                        .mailboxes
                        .get(&job)
                        .filter(|(deployed, _)| *deployed == attempt)
                    {
                        for task in mailboxes.iter().filter(|task| task.is_source) {
                            task.mailbox
                                .push(TaskCommand::TriggerCheckpoint(barrier.clone()));
                        }
                    }
                }
                ToTaskManager::CheckpointComplete {
                    job,
                    attempt,
                    checkpoint_id,
                } => {
                    if let Some((_, mailboxes)) = self
                        .mailboxes
                        .get(&job)
                        .filter(|(deployed, _)| *deployed == attempt)
                    {
                        for task in mailboxes {
                            task.mailbox
                                .push(TaskCommand::CheckpointComplete(checkpoint_id));
                        }
                    }
                }
                ToTaskManager::CancelJob { job } => {
                    self.mailboxes.remove(&job);
                    if let (Some(network), Some((_, channels))) =
                        (&self.network, self.remote_channels.remove(&job))
                    {
                        network.release(&channels);
                    }
                    for slot in &self.slots {
                        let _ = slot.commands.send(SlotCommand::Cancel { job });
                    }
                }
                ToTaskManager::Report(report) => {
                    // A finished task's counts are final: the JobManager
                    // gets them before the report that may end the job.
                    if let ToJobManager::TaskFinished { job, .. } = &report {
                        self.report_job_metrics(*job);
                    }
                    let _ = self.job_manager.send(report);
                }
                ToTaskManager::Shutdown => break,
            }
        }
        // The network first: it may run on a slot.
        if let Some(network) = self.network {
            network.stop();
        }
        // All slots told first, so that they stop together; dropping each
        // then waits for its thread.
        for slot in &self.slots {
            let _ = slot.commands.send(SlotCommand::Shutdown);
        }
        drop(self.slots);
        let _ = self.id;
    }

    fn deploy(
        &mut self,
        job: JobId,
        attempt: u32,
        program_name: &str,
        args: &strom_core::JobArgs,
        slots: &[Vec<SlotRef>],
        data_addresses: &BTreeMap<usize, SocketAddr>,
        restore: Option<&Path>,
    ) -> Result<(), String> {
        let program = self
            .programs
            .iter()
            .find(|program| program.name == program_name)
            .ok_or_else(|| {
                format!(
                    "TaskManager {} does not know program '{program_name}'",
                    self.id
                )
            })?;
        let graph = Arc::new(program.job_graph(args)?);
        let same_shape = slots.len() == graph.vertices.len()
            && graph
                .vertices
                .iter()
                .zip(slots)
                .all(|(vertex, vertex_slots)| vertex_slots.len() == vertex.parallelism as usize);
        if !same_shape {
            return Err(format!(
                "program '{program_name}' built a different job on TaskManager {} than on the JobManager: is its build deterministic?",
                self.id
            ));
        }
        let restored = restore
            .map(|path| strom_state::read_checkpoint(path).map_err(|error| error.to_string()))
            .transpose()?;
        let operators = graph.operators();
        let mut mailboxes = Vec::new();
        let is_here =
            |vertex: usize, subtask: u32| slots[vertex][subtask as usize].task_manager == self.id;
        // One channel per (edge, producer, consumer) pair with an end here:
        // within this TaskManager a ring between slots, across
        // TaskManagers a channel of the network service's link.
        let mut senders: HashMap<(usize, u32, u32), ChannelSender> = HashMap::new();
        let mut receivers: HashMap<(usize, u32, u32), ChannelReceiver> = HashMap::new();
        let mut remote_channels = Vec::new();
        for edge in &graph.edges {
            for producer in 0..graph.vertices[edge.source].parallelism {
                for consumer in graph.consumers_of(edge.id, producer) {
                    let key = (edge.id, producer, consumer);
                    let (producer_here, consumer_here) = (
                        is_here(edge.source, producer),
                        is_here(edge.target, consumer),
                    );
                    if producer_here && consumer_here {
                        let (sender, receiver) = channel();
                        senders.insert(key, sender);
                        receivers.insert(key, receiver);
                        continue;
                    }
                    if !producer_here && !consumer_here {
                        continue;
                    }
                    let peer = if producer_here {
                        slots[edge.target][consumer as usize].task_manager
                    } else {
                        slots[edge.source][producer as usize].task_manager
                    };
                    let network = self.network.as_ref().ok_or_else(|| {
                        format!(
                            "TaskManager {} has no network service to reach TaskManager {peer}",
                            self.id
                        )
                    })?;
                    let peer_address = data_addresses
                        .get(&peer)
                        .copied()
                        .ok_or_else(|| format!("TaskManager {peer} has no data address"))?;
                    let channel_id = channel_id(job.0, attempt, edge.id, producer, consumer);
                    remote_channels.push(channel_id);
                    if producer_here {
                        senders.insert(
                            key,
                            network.remote_output(peer as u64, peer_address, channel_id)?,
                        );
                    } else {
                        receivers.insert(
                            key,
                            network.remote_input(peer as u64, peer_address, channel_id)?,
                        );
                    }
                }
            }
        }
        if let Some(network) = &self.network {
            if let Some((_, older)) = self.remote_channels.insert(job, (attempt, remote_channels)) {
                network.release(&older);
            }
        }
        let mut per_slot: Vec<Vec<TaskDeployment>> =
            (0..self.slots.len()).map(|_| Vec::new()).collect();
        for vertex in &graph.vertices {
            for subtask in 0..vertex.parallelism {
                if !is_here(vertex.id, subtask) {
                    continue;
                }
                let output_ends = graph.output_channels(vertex.id, subtask);
                // Same slot: both ends here, on one slot (one thread).
                let local_outputs = output_ends
                    .iter()
                    .map(|end| {
                        let target = graph.edges[end.edge].target;
                        is_here(target, end.subtask)
                            && slots[target][end.subtask as usize].slot
                                == slots[vertex.id][subtask as usize].slot
                    })
                    .collect();
                let outputs = output_ends
                    .into_iter()
                    .map(|end| {
                        senders
                            .remove(&(end.edge, subtask, end.subtask))
                            .expect("a sender per channel")
                    })
                    .collect();
                let inputs = graph
                    .input_channels(vertex.id, subtask)
                    .into_iter()
                    .map(|(end, input)| {
                        (
                            receivers
                                .remove(&(end.edge, end.subtask, subtask))
                                .expect("a receiver per channel"),
                            input,
                        )
                    })
                    .collect();
                let slot = slots[vertex.id][subtask as usize].slot as usize;
                if slot >= self.slots.len() {
                    return Err(format!(
                        "subtask assigned to slot {slot}, but TaskManager {} has {}",
                        self.id,
                        self.slots.len()
                    ));
                }
                let mut task_restore = TaskRestore::default();
                if let Some(restored) = &restored {
                    let key_groups = KeyGroupRange::for_subtask(
                        graph.max_parallelism,
                        vertex.parallelism,
                        subtask,
                    );
                    for (operator_id, _, operator_vertex) in &operators {
                        if *operator_vertex != vertex.id || !restored.has_operator(operator_id) {
                            continue;
                        }
                        task_restore.operators.insert(
                            operator_id.clone(),
                            OperatorRestore {
                                key_groups: restored.keyed_state(operator_id, key_groups),
                                operator_state: restored.operator_state(
                                    operator_id,
                                    subtask,
                                    vertex.parallelism,
                                ),
                            },
                        );
                    }
                }
                let mailbox = TaskMailbox::default();
                let metrics = Arc::new(TaskMetrics::default());
                mailboxes.push(DeployedTask {
                    is_source: vertex.is_source,
                    mailbox: mailbox.clone(),
                    vertex: vertex.id,
                    subtask,
                    metrics: metrics.clone(),
                });
                per_slot[slot].push(TaskDeployment {
                    mailbox,
                    buffer_timeout: args.buffer_timeout,
                    metrics,
                    job,
                    attempt,
                    vertex: vertex.id,
                    subtask,
                    restore: task_restore,
                    inputs,
                    outputs,
                    local_outputs,
                    reports: self.inbox_sender.clone(),
                });
            }
        }
        self.mailboxes.insert(job, (attempt, mailboxes));
        for (slot, tasks) in self.slots.iter().zip(per_slot) {
            if !tasks.is_empty() {
                slot.commands
                    .send(SlotCommand::Deploy {
                        job,
                        attempt,
                        graph: graph.clone(),
                        tasks,
                    })
                    .map_err(|_| "a slot has stopped".to_string())?;
            }
        }
        Ok(())
    }
}

/// The tasks of one attempt of a job in a slot.
struct SlotJob {
    attempt: u32,
    handles: Vec<glommio::task::JoinHandle<()>>,
}

/// The life of a slot: run the subtasks deployed into it; cancelling a job
/// drops its subtasks, which closes their channels so that their peers in
/// other slots stop too.
async fn slot_main(commands: CommandReceiver<SlotCommand>, ready: Sender<Result<(), String>>) {
    let _ = ready.send(Ok(()));
    let mut running: HashMap<JobId, SlotJob> = HashMap::new();
    loop {
        match commands.next().await {
            Some(SlotCommand::Deploy {
                job,
                attempt,
                graph,
                tasks,
            }) => {
                let slot_job = running.entry(job).or_insert_with(|| SlotJob {
                    attempt,
                    handles: Vec::new(),
                });
                if slot_job.attempt != attempt {
                    // What is left of an older attempt goes first.
                    for handle in slot_job.handles.drain(..) {
                        handle.cancel();
                    }
                    slot_job.attempt = attempt;
                }
                for deployment in tasks {
                    slot_job
                        .handles
                        .push(glommio::spawn_local(run_task(graph.clone(), deployment)).detach());
                }
            }
            Some(SlotCommand::Cancel { job }) => {
                // Cancelling a finished task does nothing, so the JobManager
                // sends this for every job that ends, to release the handles.
                if let Some(slot_job) = running.remove(&job) {
                    for handle in slot_job.handles {
                        handle.cancel();
                    }
                }
            }
            Some(SlotCommand::HostNetwork(service)) => {
                // Its sockets need the slot's reactor: tasks here do not
                // spin on their rings (see `task::set_hosts_network`).
                crate::task::set_hosts_network();
                glommio::spawn_local(service()).detach();
            }
            Some(SlotCommand::Shutdown) | None => {
                for slot_job in running.into_values() {
                    for handle in slot_job.handles {
                        handle.cancel();
                    }
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_slot_task_manager() -> TaskManager {
        let (job_manager, _) = mpsc::channel();
        let (inbox_sender, _) = mpsc::channel();
        TaskManager::start(
            0,
            Vec::new(),
            SlotConfig {
                count: 1,
                cpus: Vec::new(),
                busy_poll: None,
            },
            Some(SocketAddr::from(([127, 0, 0, 1], 0))),
            None,
            job_manager,
            inbox_sender,
        )
        .expect("a TaskManager of one slot starts")
    }

    /// A TaskManager of one slot runs its network service on the slot;
    /// however it stops, the service stops with it and its data port is
    /// free again (a service left on an ended executor would keep it).
    #[test]
    fn a_one_slot_task_manager_frees_its_data_port_however_it_stops() {
        let dropped = one_slot_task_manager();
        let address = dropped.data_address().expect("a data port");
        drop(dropped);
        std::net::TcpListener::bind(address).expect("the data port is free after a drop");

        let stopped = one_slot_task_manager();
        let address = stopped.data_address().expect("a data port");
        let (inbox_sender, inbox) = mpsc::channel();
        inbox_sender.send(ToTaskManager::Shutdown).unwrap();
        stopped.run(inbox);
        std::net::TcpListener::bind(address).expect("the data port is free after a shutdown");
    }
}
