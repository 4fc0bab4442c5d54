//! Channels between subtasks of one process.
//!
//! A channel is a bounded lock-free ring of [`CHANNEL_CAPACITY_BUFFERS`]
//! elements (crossbeam's `ArrayQueue`) between one producer and one
//! consumer, each on its own executor (slot), with one waker per side: a
//! consumer waiting for an element and a producer waiting for room register
//! their task's waker, and the other side wakes it, across cores, after its
//! push or pop. A side that is not waiting costs the other two atomic
//! operations on its waker (each waker on a cache line of its own).
//!
//! Why not glommio's shared channel: its consumer learns of an element only
//! when its executor's loop polls the channel, and one turn of that loop
//! (timers, three io_urings, the preemption timer re-armed through a system
//! call) took 7-10 µs on this project's VM, against 0.1-0.4 µs for a task
//! that polls the ring itself ([`ConnectedChannelReceiver::try_recv`]) while
//! it busy-polls. The ring is the same kind of structure (a bounded SPSC
//! ring with cache-padded ends); the waiting is what changed.
//!
//! Either end dropped closes the channel: the consumer still receives what
//! was sent before the producer's end went away, then `None`; a producer
//! whose consumer is gone gets its element back, even one waiting for room.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use rkyv::util::AlignedVec;
use strom_core::record::StreamElement;

/// How many elements (buffers of records or events) a channel holds before
/// its producer waits. With buffers of up to 1024 records this bounds the
/// records in flight per channel, and the buffers that go round between
/// its two ends (as many again come back as spares). With glommio's
/// channel, whose consumer learned of a buffer only on a turn of its
/// executor, q5 at parallelism 2 needed 32 to keep both slots busy. With
/// this ring, 32 kept over a megabyte of q8's records in flight per
/// channel, more than a core's L2 holds, and q8 at parallelism 2 took 15%
/// more cycles than at 8 (167M against 144M, median of 8 runs at
/// 10,000,000 events); at 4, q5 and q7 took 6-8% more than at 32, each
/// producer waiting more often; at 8, q5 took the same and q7 differed by
/// less than this machine's noise.
pub const CHANNEL_CAPACITY_BUFFERS: usize = 8;

/// In a busy-polling slot, how long a task with nothing to read polls its
/// rings itself before it waits the executor's way
/// ([`ConnectedChannelReceiver::recv_spinning`]). The executor's reactor
/// (timers, sockets, wake-ups) does not run meanwhile, so it is short; a
/// stream whose next buffer comes within it never waits the slow way.
pub const BUSY_POLL_SPIN: Duration = Duration::from_micros(200);

/// What both ends of a channel share.
#[derive(Debug)]
struct Shared {
    ring: ArrayQueue<StreamElement>,
    /// Buffers the consumer has read, given back for the producer to
    /// encode into ([`ConnectedChannelReceiver::recycle`]).
    spares: ArrayQueue<AlignedVec>,
    /// The same for records handed over within a slot
    /// ([`StreamElement::Local`]).
    local_spares: ArrayQueue<Box<dyn std::any::Any + Send>>,
    /// Whether the producer takes spares: set at its first look. A
    /// network link's receiving end never looks, and the buffers given
    /// back on its channel are freed rather than kept for no one.
    producer_recycles: AtomicBool,
    /// The consumer's task, while it waits for an element.
    consumer: CachePadded<AtomicWaker>,
    /// The producer's task, while it waits for room.
    producer: CachePadded<AtomicWaker>,
    producer_gone: AtomicBool,
    consumer_gone: AtomicBool,
}

/// The producer end, not yet connected (movable to its slot).
#[derive(Debug)]
pub struct ChannelSender {
    end: ProducerEnd,
}

/// The consumer end, not yet connected (movable to its slot).
#[derive(Debug)]
pub struct ChannelReceiver {
    end: ConsumerEnd,
}

/// The producer end, connected on its slot.
#[derive(Debug)]
pub struct ConnectedChannelSender {
    end: ProducerEnd,
}

/// The consumer end, connected on its slot.
#[derive(Debug)]
pub struct ConnectedChannelReceiver {
    end: ConsumerEnd,
}

/// Closes the channel for the consumer when dropped.
#[derive(Debug)]
struct ProducerEnd(Arc<Shared>);

/// Closes the channel for the producer when dropped.
#[derive(Debug)]
struct ConsumerEnd(Arc<Shared>);

impl Drop for ProducerEnd {
    fn drop(&mut self) {
        self.0.producer_gone.store(true, Ordering::Release);
        self.0.consumer.wake();
    }
}

impl Drop for ConsumerEnd {
    fn drop(&mut self) {
        self.0.consumer_gone.store(true, Ordering::Release);
        self.0.producer.wake();
    }
}

/// A new channel between two subtasks.
pub fn channel() -> (ChannelSender, ChannelReceiver) {
    let shared = Arc::new(Shared {
        ring: ArrayQueue::new(CHANNEL_CAPACITY_BUFFERS),
        spares: ArrayQueue::new(CHANNEL_CAPACITY_BUFFERS),
        local_spares: ArrayQueue::new(CHANNEL_CAPACITY_BUFFERS),
        producer_recycles: AtomicBool::new(false),
        consumer: CachePadded::new(AtomicWaker::new()),
        producer: CachePadded::new(AtomicWaker::new()),
        producer_gone: AtomicBool::new(false),
        consumer_gone: AtomicBool::new(false),
    });
    (
        ChannelSender {
            end: ProducerEnd(shared.clone()),
        },
        ChannelReceiver {
            end: ConsumerEnd(shared),
        },
    )
}

impl ChannelSender {
    /// This end, on the executor that will use it. (Immediate: kept async
    /// so that an end is always connected on its own slot.)
    pub async fn connect(self) -> ConnectedChannelSender {
        ConnectedChannelSender { end: self.end }
    }
}

impl ChannelReceiver {
    /// This end, on the executor that will use it.
    pub async fn connect(self) -> ConnectedChannelReceiver {
        ConnectedChannelReceiver { end: self.end }
    }
}

/// Why [`ConnectedChannelSender::try_send`] gave an element back.
#[derive(Debug)]
pub enum TrySendError {
    /// The ring is full: the consumer is behind.
    Full(StreamElement),
    /// The consumer's end is gone.
    Closed(StreamElement),
}

impl ConnectedChannelSender {
    /// Sends `element` if the ring has room, waking the consumer if it
    /// waits.
    pub fn try_send(&self, element: StreamElement) -> Result<(), TrySendError> {
        let shared = &self.end.0;
        if shared.consumer_gone.load(Ordering::Acquire) {
            return Err(TrySendError::Closed(element));
        }
        match shared.ring.push(element) {
            Ok(()) => {
                shared.consumer.wake();
                Ok(())
            }
            Err(element) => Err(TrySendError::Full(element)),
        }
    }

    /// Sends `element`, waiting for room; gives it back if the consumer's
    /// end is gone.
    pub async fn send(&self, mut element: StreamElement) -> Result<(), StreamElement> {
        loop {
            match self.try_send(element) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(back)) => return Err(back),
                Err(TrySendError::Full(back)) => {
                    element = back;
                    std::future::poll_fn(|context| self.poll_room(context)).await;
                }
            }
        }
    }

    /// A buffer the consumer has read and given back, if there is one.
    /// From the first call on, the consumer gives buffers back.
    pub fn take_spare(&self) -> Option<AlignedVec> {
        self.recycles();
        self.end.0.spares.pop()
    }

    /// A vector of records the consumer (of the same slot) has taken and
    /// given back, if there is one.
    pub fn take_local_spare(&self) -> Option<Box<dyn std::any::Any + Send>> {
        self.recycles();
        self.end.0.local_spares.pop()
    }

    fn recycles(&self) {
        let flag = &self.end.0.producer_recycles;
        // Read first: the cache line is not written on every call.
        if !flag.load(Ordering::Relaxed) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    /// Ready once the ring has room or the consumer is gone.
    fn poll_room(&self, context: &mut Context<'_>) -> Poll<()> {
        let shared = &self.end.0;
        let ready = || !shared.ring.is_full() || shared.consumer_gone.load(Ordering::Acquire);
        if ready() {
            return Poll::Ready(());
        }
        shared.producer.register(context.waker());
        // Checked again after registering: a pop in between would have
        // found no waker to wake.
        if ready() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl ConnectedChannelReceiver {
    /// The next element if one is there (`Ready(Some)`), the end of the
    /// channel (`Ready(None)`: the producer's end is gone and everything it
    /// sent was received), or `Pending`, without registering to be woken.
    #[inline]
    pub fn try_recv(&self) -> Poll<Option<StreamElement>> {
        let shared = &self.end.0;
        if let Some(element) = shared.ring.pop() {
            shared.producer.wake();
            return Poll::Ready(Some(element));
        }
        if shared.producer_gone.load(Ordering::Acquire) {
            // Pushed just before the producer's end went away?
            return Poll::Ready(shared.ring.pop());
        }
        Poll::Pending
    }

    /// As [`Self::try_recv`], registering the task to be woken by the next
    /// element (or the end) when there is none.
    pub fn poll_recv(&self, context: &mut Context<'_>) -> Poll<Option<StreamElement>> {
        if let Poll::Ready(received) = self.try_recv() {
            return Poll::Ready(received);
        }
        self.end.0.consumer.register(context.waker());
        // Checked again after registering: a push in between would have
        // found no waker to wake.
        self.try_recv()
    }

    /// Gives a buffer this end has read back to the producer, to encode a
    /// later buffer into, so that buffers go round instead of being
    /// allocated by one core and freed by another. Freed here instead if
    /// the producer takes no spares (a network link's receiving end) or
    /// already has a ring's worth (as many as can be in flight).
    pub fn recycle(&self, mut buffer: AlignedVec) {
        if self.end.0.producer_recycles.load(Ordering::Relaxed) {
            buffer.clear();
            let _ = self.end.0.spares.push(buffer);
        }
    }

    /// Gives the emptied vector of a [`StreamElement::Local`] back to the
    /// producer (freed here instead, as [`Self::recycle`]'s buffers).
    pub fn recycle_local(&self, records: Box<dyn std::any::Any + Send>) {
        if self.end.0.producer_recycles.load(Ordering::Relaxed) {
            let _ = self.end.0.local_spares.push(records);
        }
    }

    /// The next element, or `None` at the end of the channel.
    pub async fn recv(&self) -> Option<StreamElement> {
        std::future::poll_fn(|context| self.poll_recv(context)).await
    }

    /// As [`Self::recv`], but first polls the ring itself for up to `spin`,
    /// yielding to the executor's other tasks between polls (without going
    /// back to the executor's reactor): what a busy-polling slot does.
    pub async fn recv_spinning(&self, spin: Duration) -> Option<StreamElement> {
        if let Some(received) = spin_until(spin, || self.try_recv(), || false).await {
            return received;
        }
        self.recv().await
    }
}

/// Polls `poll` until it is ready (its value), `stop` says so, or `spin`
/// has passed (`None`), yielding to the executor's other ready tasks between
/// polls. The executor's reactor (timers, I/O, wake-ups from other cores)
/// does not run meanwhile, so keep `spin` short.
pub async fn spin_until<T>(
    spin: Duration,
    mut poll: impl FnMut() -> Poll<T>,
    mut stop: impl FnMut() -> bool,
) -> Option<T> {
    let started = Instant::now();
    loop {
        if let Poll::Ready(value) = poll() {
            return Some(value);
        }
        if stop() || started.elapsed() >= spin {
            return None;
        }
        YieldNow(false).await;
    }
}

/// Gives the other ready tasks of the executor a turn, once.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, context: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        context.waker().wake_by_ref();
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use glommio::{LocalExecutorBuilder, Placement};

    fn watermark(element: Option<StreamElement>) -> Option<i64> {
        match element {
            Some(StreamElement::Watermark(watermark)) => Some(watermark),
            Some(other) => panic!("not a watermark: {other:?}"),
            None => None,
        }
    }

    fn executor(name: &str) -> LocalExecutorBuilder {
        LocalExecutorBuilder::new(Placement::Unbound)
            .name(name)
            .io_memory(256 * 1024)
    }

    /// A buffer the consumer gives back reaches the producer as a spare,
    /// the same allocation, emptied, once the producer looks for spares;
    /// past the ring's size, given-back buffers are dropped rather than
    /// kept.
    #[test]
    fn buffers_given_back_come_round_to_the_producer() {
        let (sender, receiver) = channel();
        let (sender, receiver) = futures_lite::future::block_on(async {
            (sender.connect().await, receiver.connect().await)
        });
        // A producer that never looks for spares gets none kept for it.
        receiver.recycle(AlignedVec::with_capacity(64));
        assert!(sender.take_spare().is_none());
        let mut bytes = AlignedVec::<16>::with_capacity(4096);
        bytes.extend_from_slice(&[7; 100]);
        let address = bytes.as_ptr();
        sender
            .try_send(StreamElement::Records(bytes))
            .expect("room in the ring");
        let Poll::Ready(Some(StreamElement::Records(read))) = receiver.try_recv() else {
            panic!("the buffer was not received");
        };
        receiver.recycle(read);
        let spare = sender.take_spare().expect("the buffer came back");
        assert_eq!(spare.as_ptr(), address);
        assert!(spare.is_empty());
        assert!(spare.capacity() >= 4096);
        assert!(sender.take_spare().is_none());
        for _ in 0..CHANNEL_CAPACITY_BUFFERS + 5 {
            receiver.recycle(AlignedVec::with_capacity(64));
        }
        let mut kept = 0;
        while sender.take_spare().is_some() {
            kept += 1;
        }
        assert_eq!(kept, CHANNEL_CAPACITY_BUFFERS);
    }

    /// Every element arrives, in order, across two executors, through a
    /// ring much smaller than the stream (the producer waits for room and
    /// is woken), then the end.
    #[test]
    fn elements_cross_executors_in_order_with_backpressure() {
        let (sender, receiver) = channel();
        let count = CHANNEL_CAPACITY_BUFFERS as i64 * 20;
        let producer = executor("producer")
            .spawn(move || async move {
                let sender = sender.connect().await;
                for index in 0..count {
                    sender
                        .send(StreamElement::Watermark(index))
                        .await
                        .expect("the consumer is there");
                }
            })
            .unwrap();
        let consumer = executor("consumer")
            .spawn(move || async move {
                let receiver = receiver.connect().await;
                let mut seen = Vec::new();
                while let Some(watermark) = watermark(receiver.recv().await) {
                    seen.push(watermark);
                    if seen.len() % 7 == 3 {
                        // Fall behind now and then.
                        glommio::timer::sleep(Duration::from_micros(200)).await;
                    }
                }
                seen
            })
            .unwrap();
        producer.join().unwrap();
        let seen = consumer.join().unwrap();
        assert_eq!(seen, (0..count).collect::<Vec<_>>());
    }

    /// The same through the spinning receive.
    #[test]
    fn a_spinning_receiver_gets_every_element_then_the_end() {
        let (sender, receiver) = channel();
        let count = CHANNEL_CAPACITY_BUFFERS as i64 * 10;
        let producer = executor("producer")
            .spawn(move || async move {
                let sender = sender.connect().await;
                for index in 0..count {
                    if index % 50 == 0 {
                        glommio::timer::sleep(Duration::from_micros(300)).await;
                    }
                    sender.send(StreamElement::Watermark(index)).await.unwrap();
                }
            })
            .unwrap();
        let consumer = executor("consumer")
            .spawn(move || async move {
                let receiver = receiver.connect().await;
                let mut seen = Vec::new();
                while let Some(watermark) =
                    watermark(receiver.recv_spinning(Duration::from_micros(100)).await)
                {
                    seen.push(watermark);
                }
                seen
            })
            .unwrap();
        producer.join().unwrap();
        assert_eq!(consumer.join().unwrap(), (0..count).collect::<Vec<_>>());
    }

    /// A producer waiting for room in a full ring gets its element back
    /// when the consumer's end is dropped (it does not wait forever).
    #[test]
    fn a_producer_blocked_on_a_full_ring_sees_the_consumer_go() {
        let (sender, receiver) = channel();
        let (filled, filled_wait) = std::sync::mpsc::channel();
        let producer = executor("producer")
            .spawn(move || async move {
                let sender = sender.connect().await;
                for index in 0..CHANNEL_CAPACITY_BUFFERS as i64 {
                    sender.try_send(StreamElement::Watermark(index)).unwrap();
                }
                assert!(matches!(
                    sender.try_send(StreamElement::Watermark(-1)),
                    Err(TrySendError::Full(_))
                ));
                filled.send(()).unwrap();
                watermark(sender.send(StreamElement::Watermark(99)).await.err())
            })
            .unwrap();
        filled_wait.recv().unwrap();
        drop(receiver);
        assert_eq!(producer.join().unwrap(), Some(99));
    }

    /// A dropped producer ends the channel after what it sent; an element
    /// sent after the consumer is gone comes back as closed.
    #[test]
    fn either_end_dropped_closes_the_channel() {
        let (sender, receiver) = channel();
        let result = executor("both")
            .spawn(move || async move {
                let sender = sender.connect().await;
                let receiver = receiver.connect().await;
                sender.try_send(StreamElement::Watermark(1)).unwrap();
                sender.try_send(StreamElement::Watermark(2)).unwrap();
                drop(sender);
                let first = watermark(receiver.recv().await);
                let second = watermark(receiver.recv().await);
                let end = watermark(receiver.recv().await);
                let (sender, receiver) = channel();
                let sender = sender.connect().await;
                drop(receiver);
                let closed = matches!(
                    sender.try_send(StreamElement::Watermark(3)),
                    Err(TrySendError::Closed(_))
                );
                (first, second, end, closed)
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(result, (Some(1), Some(2), None, true));
    }
}
