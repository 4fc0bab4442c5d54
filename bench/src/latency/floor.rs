//! The floor of this machine, measured beside the engine: what a record
//! could at best take between two cores through the engine's ring, and a
//! small message's round trip over loopback TCP.
//!
//! Both run on two glommio executors pinned to two CPUs (the first two this
//! process may use), built as the engine builds its slots (same io memory
//! and preemption interval, and, but for the spinning ring, no spinning
//! before parking), so that a parked peer is woken exactly as a parked
//! slot is. Each sample is a round trip
//! timed on one executor with [`monotonic_now_ns`]; the first
//! [`FloorConfig::warmup_samples`] are dropped.
//!
//! - Ring: the pinger sends a [`StreamElement`] on a channel made by
//!   [`strom_net::channel::channel`] (the ring between two slots) and the
//!   echo sends it back on another; the sample is half the round trip, the
//!   one-way latency. With [`Waiting::Park`] the executors park when they
//!   wait, as slots do, so each hop wakes a sleeping thread on the other
//!   core; with [`Waiting::Spin`] each waits as a busy-polling slot's task
//!   does, polling the ring itself
//!   ([`ConnectedChannelReceiver::recv_spinning`]) on an executor that
//!   spins before it parks, which leaves the cost of the ring alone. The
//!   difference is the cross-core wake-up, which on a virtual machine (an
//!   idle vCPU woken by an interrupt) is most of it.
//! - TCP: the pinger writes [`TCP_MESSAGE_BYTES`] bytes on a loopback
//!   connection with `TCP_NODELAY` (glommio's io_uring `TcpStream`, as the
//!   engine's links), the echo reads and writes them back; the sample is
//!   the whole round trip.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{anyhow, Context};
use futures_lite::{AsyncReadExt, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use strom_core::record::StreamElement;
use strom_net::channel::{ConnectedChannelReceiver, BUSY_POLL_SPIN};

use super::{monotonic_now_ns, new_histogram};

/// The io memory of a floor executor: a slot's (and within `ulimit -l`).
const EXECUTOR_IO_MEMORY_BYTES: usize = 512 * 1024;
/// The preemption interval of a slot's executor.
const EXECUTOR_PREEMPT_INTERVAL: Duration = Duration::from_millis(100);
/// The size of the TCP floor's message: about a small frame.
pub const TCP_MESSAGE_BYTES: usize = 64;

/// How many samples the floors take.
#[derive(Clone, Copy, Debug)]
pub struct FloorConfig {
    pub samples: u64,
    pub warmup_samples: u64,
}

/// The two CPUs the floors run on: the first two this process may use (one
/// twice on a single-CPU machine).
pub fn floor_cpus() -> (usize, usize) {
    let cpus = strom_scheduler::taskmanager::allowed_cpus();
    let first = cpus.first().copied().unwrap_or(0);
    (first, cpus.get(1).copied().unwrap_or(first))
}

fn executor(name: &str, cpu: usize) -> LocalExecutorBuilder {
    LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(name)
        .io_memory(EXECUTOR_IO_MEMORY_BYTES)
        .preempt_timer(EXECUTOR_PREEMPT_INTERVAL)
}

/// How long the spinning ring floor's executors spin before they park:
/// far longer than a round trip, so that they never do.
pub const RING_SPIN_BEFORE_PARK: Duration = Duration::from_millis(10);

/// How the ring floor's executors wait for the next element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// Park at once, as the engine's slots do: each element wakes a
    /// sleeping thread on the other core.
    Park,
    /// Spin this long before parking, so that the peer is awake: the cost
    /// of the ring itself, without the wake-up.
    Spin(Duration),
}

impl Waiting {
    fn apply(self, builder: LocalExecutorBuilder) -> LocalExecutorBuilder {
        match self {
            Waiting::Park => builder,
            Waiting::Spin(spin) => builder.spin_before_park(spin),
        }
    }

    /// The next element, as a slot's task waits for it: polling the ring
    /// itself first when busy-polling.
    async fn recv(self, receiver: &ConnectedChannelReceiver) -> Option<StreamElement> {
        match self {
            Waiting::Park => receiver.recv().await,
            Waiting::Spin(_) => receiver.recv_spinning(BUSY_POLL_SPIN).await,
        }
    }
}

fn record(histogram: &mut Histogram<u64>, value: u64) {
    histogram
        .record(value.max(1))
        .expect("an auto-resizing histogram takes any value");
}

/// One-way latency through the slot-to-slot ring: half of each ping-pong's
/// round trip, in nanoseconds.
pub fn ring_one_way(config: FloorConfig, waiting: Waiting) -> anyhow::Result<Histogram<u64>> {
    let (pinger_cpu, echo_cpu) = floor_cpus();
    let executor = |name: &str, cpu: usize| waiting.apply(executor(name, cpu));
    let (ping_sender, ping_receiver) = strom_net::channel::channel();
    let (pong_sender, pong_receiver) = strom_net::channel::channel();
    let echo = executor("floor-ring-echo", echo_cpu)
        .spawn(move || async move {
            let pings = ping_receiver.connect().await;
            let pongs = pong_sender.connect().await;
            while let Some(element) = waiting.recv(&pings).await {
                if pongs.send(element).await.is_err() {
                    break;
                }
            }
        })
        .map_err(|error| anyhow!("cannot start the ring floor's echo executor: {error}"))?;
    let pinger = executor("floor-ring-ping", pinger_cpu)
        .spawn(move || async move {
            let pings = ping_sender.connect().await;
            let pongs = pong_receiver.connect().await;
            let mut histogram = new_histogram();
            for sample in 0..config.warmup_samples + config.samples {
                let started = monotonic_now_ns();
                if pings
                    .send(StreamElement::Watermark(sample as i64))
                    .await
                    .is_err()
                {
                    return Err("the echo closed its ring".to_string());
                }
                if waiting.recv(&pongs).await.is_none() {
                    return Err("the echo closed its ring".to_string());
                }
                let round_trip = monotonic_now_ns() - started;
                if sample >= config.warmup_samples {
                    record(&mut histogram, round_trip / 2);
                }
            }
            // Dropping the sender ends the echo.
            Ok(histogram)
        })
        .map_err(|error| anyhow!("cannot start the ring floor's ping executor: {error}"))?;
    let histogram = pinger
        .join()
        .map_err(|error| anyhow!("the ring floor's pinger failed: {error}"))?
        .map_err(|error| anyhow!("ring floor: {error}"))?;
    echo.join()
        .map_err(|error| anyhow!("the ring floor's echo failed: {error}"))?;
    Ok(histogram)
}

/// Round trips of a [`TCP_MESSAGE_BYTES`] message over loopback TCP, in
/// nanoseconds.
pub fn tcp_round_trip(config: FloorConfig) -> anyhow::Result<Histogram<u64>> {
    let (pinger_cpu, echo_cpu) = floor_cpus();
    let (address_sender, address_receiver) = std::sync::mpsc::channel::<SocketAddr>();
    let echo = executor("floor-tcp-echo", echo_cpu)
        .spawn(move || async move {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let _ = address_sender.send(listener.local_addr()?);
            drop(address_sender);
            let mut stream = listener.accept().await?;
            stream.set_nodelay(true)?;
            let mut message = [0u8; TCP_MESSAGE_BYTES];
            loop {
                match stream.read_exact(&mut message).await {
                    Ok(()) => stream.write_all(&message).await?,
                    // The pinger is done.
                    Err(error) if error.kind() == ErrorKind::UnexpectedEof => {
                        return Ok::<(), std::io::Error>(())
                    }
                    Err(error) => return Err(error),
                }
            }
        })
        .map_err(|error| anyhow!("cannot start the TCP floor's echo executor: {error}"))?;
    let address = address_receiver
        .recv_timeout(Duration::from_secs(10))
        .map_err(|_| anyhow!("the TCP floor's echo did not listen"))?;
    let pinger = executor("floor-tcp-ping", pinger_cpu)
        .spawn(move || async move {
            let mut stream = TcpStream::connect(address).await?;
            stream.set_nodelay(true)?;
            let mut message = [0u8; TCP_MESSAGE_BYTES];
            let mut histogram = new_histogram();
            for sample in 0..config.warmup_samples + config.samples {
                message[..8].copy_from_slice(&sample.to_le_bytes());
                let started = monotonic_now_ns();
                stream.write_all(&message).await?;
                stream.read_exact(&mut message).await?;
                let round_trip = monotonic_now_ns() - started;
                if sample >= config.warmup_samples {
                    record(&mut histogram, round_trip);
                }
            }
            stream.close().await?;
            Ok::<_, std::io::Error>(histogram)
        })
        .map_err(|error| anyhow!("cannot start the TCP floor's ping executor: {error}"))?;
    let histogram = pinger
        .join()
        .map_err(|error| anyhow!("the TCP floor's pinger failed: {error}"))?
        .context("TCP floor")?;
    echo.join()
        .map_err(|error| anyhow!("the TCP floor's echo failed: {error}"))?
        .context("TCP floor's echo")?;
    Ok(histogram)
}
