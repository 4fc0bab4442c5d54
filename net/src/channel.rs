//! Channels between subtasks of one process.
//!
//! A channel is glommio's bounded shared channel: a lock-free SPSC ring of
//! [`CHANNEL_CAPACITY_BUFFERS`] elements with cache-padded head and tail,
//! whose ends are connected on the executors (slots) that use them, and
//! which wakes a parked consumer or producer across cores. Both ends must be
//! connected before either is used: connecting is a rendezvous.

use glommio::channels::shared_channel::{
    self, ConnectedReceiver, ConnectedSender, SharedReceiver, SharedSender,
};
use strom_core::record::StreamElement;

/// How many elements (buffers of records or events) a channel holds before
/// its producer waits. With buffers of up to 1024 records this bounds the
/// records in flight per channel. At 16, q5 at parallelism 2 kept its
/// two slots busy 156-167% of two cores (the slots slept 14-19% of the
/// time, each sleep about 1.4 ms); at 32, 184-191% and a fifth more
/// events/s; 64 gained nothing more.
pub const CHANNEL_CAPACITY_BUFFERS: usize = 32;

/// The producer end, not yet connected (movable to its slot).
pub type ChannelSender = SharedSender<StreamElement>;
/// The consumer end, not yet connected (movable to its slot).
pub type ChannelReceiver = SharedReceiver<StreamElement>;
/// The producer end, connected on its slot.
pub type ConnectedChannelSender = ConnectedSender<StreamElement>;
/// The consumer end, connected on its slot.
pub type ConnectedChannelReceiver = ConnectedReceiver<StreamElement>;

/// A new channel between two subtasks.
pub fn channel() -> (ChannelSender, ChannelReceiver) {
    shared_channel::new_bounded(CHANNEL_CAPACITY_BUFFERS)
}
