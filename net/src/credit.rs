//! Credit-based flow control for the channels of one link.
//!
//! Many channels share one TCP connection. If a sender wrote whatever its
//! producers gave it, one consumer that falls behind would fill the
//! connection's buffers and stall every other channel on it. Credits keep
//! each channel within the buffers its receiver set aside for it, so bytes
//! on the wire are always bytes that will be taken off it at once.
//!
//! The protocol, per channel:
//!
//! 1. The receiver opens the channel with room for `capacity` buffers and
//!    grants the sender `capacity` credits (a Credit frame).
//! 2. The sender queues elements for the channel in a bounded queue
//!    ([`SenderCredits::offer`]); a producer whose queue is full waits.
//! 3. The sender sends a queued element as a Data frame only while it holds
//!    credit for the channel, spending one credit per frame
//!    ([`SenderCredits::next_to_send`]); channels with credit and queued
//!    elements take turns (round-robin).
//! 4. The receiver counts each Data frame against the credit it granted
//!    ([`ReceiverCredits::on_data`]); a frame without credit is a protocol
//!    violation and ends the link.
//! 5. When the consumer takes a buffer, its slot is free again
//!    ([`ReceiverCredits::on_consumed`]). Freed slots are granted back in
//!    batches of a quarter of the capacity, or at once when the sender has
//!    no credit left ([`ReceiverCredits::next_grant`]).
//! 6. A grant adds to the sender's credit ([`SenderCredits::grant`]), which
//!    sends queued elements again (step 3).
//!
//! Invariants:
//!
//! - Receiver, per channel: `outstanding + buffered + pending == capacity`,
//!   where `outstanding` is credit granted and not yet used by a frame,
//!   `buffered` is frames received and not yet consumed, `pending` is slots
//!   freed and not yet granted. So the receiver never holds more than
//!   `capacity` buffers of a channel.
//! - Sender, per channel: at most `queue_capacity` queued elements, and
//!   credit never goes negative.
//! - No channel without credit blocks another: the send order skips
//!   channels without credit, and each channel has its own queue, so a full
//!   queue stalls only that channel's producer.
//! - No deadlock: whenever the sender is out of credit (`outstanding == 0`)
//!   and a slot is free (`pending > 0`), a grant is due.
//!
//! These are plain structs without I/O; [`crate::link`] drives them.

use std::collections::{HashMap, VecDeque};

use crate::error::NetError;

/// The sender's half: credit and a bounded queue per channel.
#[derive(Debug)]
pub struct SenderCredits<T> {
    channels: HashMap<u32, SenderChannel<T>>,
    /// Channels with credit and a queued element, each at most once, in the
    /// order they take turns.
    ready: VecDeque<u32>,
    queue_capacity: usize,
    channel_count_max: usize,
}

#[derive(Debug)]
struct SenderChannel<T> {
    credit_count: u32,
    queue: VecDeque<T>,
    is_ready: bool,
}

impl<T> SenderChannel<T> {
    fn new() -> Self {
        SenderChannel {
            credit_count: 0,
            queue: VecDeque::new(),
            is_ready: false,
        }
    }
}

impl<T> SenderCredits<T> {
    /// A sender with `queue_capacity` queued elements per channel, for at
    /// most `channel_count_max` channels.
    pub fn new(queue_capacity: usize, channel_count_max: usize) -> Self {
        assert!(queue_capacity > 0, "a sender needs room for one element");
        SenderCredits {
            channels: HashMap::new(),
            ready: VecDeque::new(),
            queue_capacity,
            channel_count_max,
        }
    }

    fn channel(&mut self, channel: u32) -> Result<&mut SenderChannel<T>, NetError> {
        if !self.channels.contains_key(&channel) && self.channels.len() >= self.channel_count_max {
            return Err(NetError::TooManyChannels {
                channel_count_max: self.channel_count_max as u32,
            });
        }
        Ok(self
            .channels
            .entry(channel)
            .or_insert_with(SenderChannel::new))
    }

    /// Queues `item` for `channel`, or hands it back (`Ok(Err(item))`) when
    /// the channel's queue is full: the producer waits for credit.
    pub fn offer(&mut self, channel: u32, item: T) -> Result<Result<(), T>, NetError> {
        let queue_capacity = self.queue_capacity;
        let state = self.channel(channel)?;
        if state.queue.len() >= queue_capacity {
            return Ok(Err(item));
        }
        state.queue.push_back(item);
        let becomes_ready = state.credit_count > 0 && !state.is_ready;
        if becomes_ready {
            state.is_ready = true;
            self.ready.push_back(channel);
        }
        Ok(Ok(()))
    }

    /// Whether `channel`'s queue has room for one more element.
    pub fn has_room(&self, channel: u32) -> bool {
        self.channels
            .get(&channel)
            .is_none_or(|state| state.queue.len() < self.queue_capacity)
    }

    /// Adds `credit_count` credits to `channel` (from a Credit frame).
    pub fn grant(&mut self, channel: u32, credit_count: u32) -> Result<(), NetError> {
        let state = self.channel(channel)?;
        state.credit_count = state
            .credit_count
            .checked_add(credit_count)
            .ok_or(NetError::CreditOverflow { channel })?;
        let becomes_ready = !state.queue.is_empty() && !state.is_ready;
        if becomes_ready {
            state.is_ready = true;
            self.ready.push_back(channel);
        }
        Ok(())
    }

    /// The next element to send, spending one credit of its channel.
    /// Channels take turns; channels without credit are skipped.
    pub fn next_to_send(&mut self) -> Option<(u32, T)> {
        let channel = self.ready.pop_front()?;
        let state = self
            .channels
            .get_mut(&channel)
            .expect("a ready channel exists");
        assert!(state.is_ready && state.credit_count > 0 && !state.queue.is_empty());
        let item = state
            .queue
            .pop_front()
            .expect("a ready channel has an element");
        state.credit_count -= 1;
        if state.credit_count > 0 && !state.queue.is_empty() {
            self.ready.push_back(channel);
        } else {
            state.is_ready = false;
        }
        Some((channel, item))
    }

    /// The credit `channel` holds.
    pub fn credit_count(&self, channel: u32) -> u32 {
        self.channels
            .get(&channel)
            .map_or(0, |state| state.credit_count)
    }

    /// The elements queued for `channel`.
    pub fn queued_count(&self, channel: u32) -> usize {
        self.channels
            .get(&channel)
            .map_or(0, |state| state.queue.len())
    }

    /// Removes every queued element (when the link ends).
    pub fn clear(&mut self) {
        self.channels.clear();
        self.ready.clear();
    }
}

/// The receiver's half: buffer accounting and grants per channel.
#[derive(Debug)]
pub struct ReceiverCredits {
    channels: HashMap<u32, ReceiverChannel>,
    /// Channels with a grant due, each at most once.
    grants_due: VecDeque<u32>,
    channel_count_max: usize,
}

#[derive(Debug)]
struct ReceiverChannel {
    capacity: u32,
    /// Credit granted that no frame has used yet.
    outstanding: u32,
    /// Frames received that the consumer has not taken yet.
    buffered: u32,
    /// Slots freed and not yet granted.
    pending: u32,
    is_grant_due: bool,
}

impl ReceiverChannel {
    fn check(&self) {
        assert_eq!(
            self.outstanding + self.buffered + self.pending,
            self.capacity,
            "receiver credit accounting"
        );
    }

    /// Whether freed slots should be granted now: in batches, or at once
    /// when the sender has nothing left to send with.
    fn grant_wanted(&self) -> bool {
        let batch = (self.capacity / 4).max(1);
        self.pending > 0 && (self.pending >= batch || self.outstanding == 0)
    }
}

impl ReceiverCredits {
    /// A receiver for at most `channel_count_max` channels.
    pub fn new(channel_count_max: usize) -> Self {
        ReceiverCredits {
            channels: HashMap::new(),
            grants_due: VecDeque::new(),
            channel_count_max,
        }
    }

    /// Opens `channel` with room for `capacity` buffers, all granted at once.
    pub fn open(&mut self, channel: u32, capacity: u32) -> Result<(), NetError> {
        assert!(capacity > 0, "a channel needs room for one buffer");
        if self.channels.contains_key(&channel) {
            return Err(NetError::ChannelInUse { channel });
        }
        if self.channels.len() >= self.channel_count_max {
            return Err(NetError::TooManyChannels {
                channel_count_max: self.channel_count_max as u32,
            });
        }
        self.channels.insert(
            channel,
            ReceiverChannel {
                capacity,
                outstanding: 0,
                buffered: 0,
                pending: capacity,
                is_grant_due: true,
            },
        );
        self.grants_due.push_back(channel);
        Ok(())
    }

    /// Counts a Data frame that arrived on `channel`; an error if the
    /// sender had no credit for it.
    pub fn on_data(&mut self, channel: u32) -> Result<(), NetError> {
        let state = self
            .channels
            .get_mut(&channel)
            .ok_or(NetError::CreditViolation { channel })?;
        if state.outstanding == 0 {
            return Err(NetError::CreditViolation { channel });
        }
        state.outstanding -= 1;
        state.buffered += 1;
        state.check();
        self.schedule(channel);
        Ok(())
    }

    /// The consumer took one buffer of `channel`: its slot is free.
    pub fn on_consumed(&mut self, channel: u32) {
        let state = self
            .channels
            .get_mut(&channel)
            .expect("only open channels are consumed");
        assert!(state.buffered > 0, "consumed more than was received");
        state.buffered -= 1;
        state.pending += 1;
        state.check();
        self.schedule(channel);
    }

    fn schedule(&mut self, channel: u32) {
        let state = self.channels.get_mut(&channel).expect("channel is open");
        if !state.is_grant_due && state.grant_wanted() {
            state.is_grant_due = true;
            self.grants_due.push_back(channel);
        }
    }

    /// The next grant to send: `(channel, credit_count)`.
    pub fn next_grant(&mut self) -> Option<(u32, u32)> {
        let channel = self.grants_due.pop_front()?;
        let state = self.channels.get_mut(&channel).expect("channel is open");
        assert!(state.is_grant_due && state.pending > 0);
        state.is_grant_due = false;
        let credit_count = state.pending;
        state.outstanding += credit_count;
        state.pending = 0;
        state.check();
        Some((channel, credit_count))
    }

    /// Whether a grant is waiting to be sent.
    pub fn has_grant_due(&self) -> bool {
        !self.grants_due.is_empty()
    }

    /// The buffers of `channel` received and not yet consumed.
    pub fn buffered_count(&self, channel: u32) -> u32 {
        self.channels
            .get(&channel)
            .map_or(0, |state| state.buffered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain<T>(sender: &mut SenderCredits<T>) -> Vec<(u32, T)> {
        std::iter::from_fn(|| sender.next_to_send()).collect()
    }

    #[test]
    fn sender_sends_only_with_credit() {
        let mut sender = SenderCredits::new(4, 16);
        sender.offer(1, "a").unwrap().unwrap();
        sender.offer(1, "b").unwrap().unwrap();
        assert!(sender.next_to_send().is_none(), "no credit yet");
        sender.grant(1, 1).unwrap();
        assert_eq!(drain(&mut sender), vec![(1, "a")]);
        assert_eq!(sender.credit_count(1), 0);
        assert_eq!(sender.queued_count(1), 1);
        sender.grant(1, 5).unwrap();
        assert_eq!(drain(&mut sender), vec![(1, "b")]);
        assert_eq!(sender.credit_count(1), 4);
        // With credit left, a new element is ready at once.
        sender.offer(1, "c").unwrap().unwrap();
        assert_eq!(drain(&mut sender), vec![(1, "c")]);
    }

    #[test]
    fn sender_queue_is_bounded_per_channel() {
        let mut sender = SenderCredits::new(2, 16);
        sender.offer(1, 10).unwrap().unwrap();
        sender.offer(1, 11).unwrap().unwrap();
        assert!(!sender.has_room(1));
        assert_eq!(sender.offer(1, 12).unwrap(), Err(12));
        // Another channel has its own room.
        assert!(sender.has_room(2));
        sender.offer(2, 20).unwrap().unwrap();
        sender.grant(1, 1).unwrap();
        assert_eq!(sender.next_to_send(), Some((1, 10)));
        assert!(sender.has_room(1));
        sender.offer(1, 12).unwrap().unwrap();
    }

    #[test]
    fn channel_without_credit_does_not_block_others() {
        let mut sender = SenderCredits::new(4, 16);
        for item in 0..4 {
            sender.offer(1, item).unwrap().unwrap(); // never gets credit
        }
        sender.offer(2, 100).unwrap().unwrap();
        sender.offer(2, 101).unwrap().unwrap();
        sender.grant(2, 8).unwrap();
        assert_eq!(drain(&mut sender), vec![(2, 100), (2, 101)]);
        assert_eq!(sender.queued_count(1), 4);
    }

    #[test]
    fn channels_with_credit_take_turns() {
        let mut sender = SenderCredits::new(4, 16);
        for item in 0..3 {
            sender.offer(1, item).unwrap().unwrap();
            sender.offer(2, 10 + item).unwrap().unwrap();
        }
        sender.grant(1, 10).unwrap();
        sender.grant(2, 10).unwrap();
        assert_eq!(
            drain(&mut sender),
            vec![(1, 0), (2, 10), (1, 1), (2, 11), (1, 2), (2, 12)]
        );
    }

    #[test]
    fn sender_refuses_overflowing_credit_and_too_many_channels() {
        let mut sender = SenderCredits::<u8>::new(1, 2);
        sender.grant(1, u32::MAX).unwrap();
        assert!(matches!(
            sender.grant(1, 1),
            Err(NetError::CreditOverflow { channel: 1 })
        ));
        sender.grant(2, 1).unwrap();
        assert!(matches!(
            sender.grant(3, 1),
            Err(NetError::TooManyChannels {
                channel_count_max: 2
            })
        ));
        assert!(matches!(
            sender.offer(3, 0),
            Err(NetError::TooManyChannels { .. })
        ));
    }

    #[test]
    fn receiver_grants_capacity_then_returns_freed_slots() {
        let mut receiver = ReceiverCredits::new(16);
        receiver.open(7, 8).unwrap();
        assert_eq!(receiver.next_grant(), Some((7, 8)));
        assert_eq!(receiver.next_grant(), None);
        for _ in 0..8 {
            receiver.on_data(7).unwrap();
        }
        assert_eq!(receiver.buffered_count(7), 8);
        assert!(matches!(
            receiver.on_data(7),
            Err(NetError::CreditViolation { channel: 7 })
        ));
        // The sender is out of credit: the first freed slot is granted at once.
        receiver.on_consumed(7);
        assert_eq!(receiver.next_grant(), Some((7, 1)));
        // With credit outstanding, slots are granted in batches of 8 / 4.
        receiver.on_consumed(7);
        assert_eq!(receiver.next_grant(), None);
        receiver.on_consumed(7);
        assert_eq!(receiver.next_grant(), Some((7, 2)));
    }

    #[test]
    fn receiver_grants_when_sender_runs_dry_even_below_the_batch() {
        let mut receiver = ReceiverCredits::new(16);
        receiver.open(1, 16).unwrap();
        assert_eq!(receiver.next_grant(), Some((1, 16)));
        for _ in 0..15 {
            receiver.on_data(1).unwrap();
        }
        receiver.on_consumed(1); // pending 1 < batch 4, outstanding 1
        assert!(!receiver.has_grant_due());
        receiver.on_data(1).unwrap(); // outstanding 0: the sender is dry
        assert_eq!(receiver.next_grant(), Some((1, 1)));
    }

    #[test]
    fn receiver_refuses_data_on_unopened_channels_and_double_opens() {
        let mut receiver = ReceiverCredits::new(1);
        assert!(matches!(
            receiver.on_data(3),
            Err(NetError::CreditViolation { channel: 3 })
        ));
        receiver.open(3, 1).unwrap();
        assert!(matches!(
            receiver.open(3, 1),
            Err(NetError::ChannelInUse { channel: 3 })
        ));
        assert!(matches!(
            receiver.open(4, 1),
            Err(NetError::TooManyChannels { .. })
        ));
    }

    /// Sender and receiver together, with frames in flight, never exceed
    /// the receiver's capacity and deliver everything in order.
    #[test]
    fn sender_and_receiver_deliver_in_order_within_capacity() {
        let capacity = 5;
        let mut sender = SenderCredits::new(3, 4);
        let mut receiver = ReceiverCredits::new(4);
        receiver.open(1, capacity).unwrap();
        let mut to_sender: VecDeque<(u32, u32)> = VecDeque::new();
        let mut to_receiver: VecDeque<(u32, u64)> = VecDeque::new();
        let mut buffers: VecDeque<u64> = VecDeque::new();
        let mut delivered = Vec::new();
        let mut next_item = 0u64;
        let mut state = 12345u64;
        let mut random = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) % 5
        };
        while delivered.len() < 1000 {
            match random() {
                0 => {
                    if sender.offer(1, next_item).unwrap().is_ok() {
                        next_item += 1;
                    }
                }
                1 => to_sender.extend(std::iter::from_fn(|| receiver.next_grant())),
                2 => {
                    while let Some((channel, count)) = to_sender.pop_front() {
                        sender.grant(channel, count).unwrap();
                    }
                    to_receiver.extend(sender.next_to_send());
                }
                3 => {
                    if let Some((channel, item)) = to_receiver.pop_front() {
                        receiver.on_data(channel).unwrap();
                        buffers.push_back(item);
                        assert!(buffers.len() <= capacity as usize);
                    }
                }
                _ => {
                    if let Some(item) = buffers.pop_front() {
                        receiver.on_consumed(1);
                        delivered.push(item);
                    }
                }
            }
        }
        assert!(delivered.iter().copied().eq(0..delivered.len() as u64));
    }
}
