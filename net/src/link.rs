//! One TCP connection between two processes, carrying many channels.
//!
//! A link is a glommio (io_uring) TCP stream with two tasks on the executor
//! that made it: a reader that decodes frames and hands each Data frame to
//! its channel's bounded input, and a writer that sends credit grants and
//! the Data frames that credit allows ([`crate::credit`]). Producers hand
//! elements to a [`LinkSender`]; consumers take them from a
//! [`LinkReceiver`], one per channel, and each element taken returns a
//! credit to the sending side.
//!
//! The handshake, before any other frame (`A` accepts, `C` connects):
//!
//! 1. `A` sends `Hello { peer_id: A, nonce: nA, proof: none }`.
//! 2. `C` sends `Hello { peer_id: C, nonce: nC, proof }` where, if `C` has
//!    a cluster secret, `proof = HMAC-SHA256(secret, "strom-link-v1
//!    connector" | nA | nC | C)`.
//! 3. If `A` has a secret, it checks the proof (in constant time); a missing
//!    or wrong proof makes `A` send `Close { reason }`, close the connection
//!    and return an error naming `C`'s address. Otherwise `A` sends
//!    `Hello { peer_id: A, nonce: nA, proof }` with, if it has a secret,
//!    `proof = HMAC-SHA256(secret, "strom-link-v1 acceptor" | nC | nA | A)`.
//! 4. If `C` has a secret, it checks `A`'s proof the same way. Both sides
//!    now exchange Credit, Data and Close frames.
//!
//! Invariants: the secret never travels; a proof answers a fresh random
//! challenge, so it cannot be replayed, and names its role, so it cannot be
//! reflected. A handshake takes at most [`HANDSHAKE_TIMEOUT`].
//!
//! A peer that sends anything out of place (bad magic, a version or kind
//! this process does not know, an oversized length, a bad checksum, a
//! malformed payload, data without credit) ends the link: the socket is
//! shut down and the error, naming the peer's address, is returned by
//! [`Link::closed`] and by every later send and receive. Nothing else in the
//! process is affected.
//!
//! Every queue is bounded: [`SEND_QUEUE_CAPACITY_ELEMENTS`] elements per
//! channel waiting for credit, the receiver's granted capacity (at most
//! [`RECEIVE_CAPACITY_BUFFERS_MAX`]) per channel input,
//! [`LINK_CHANNEL_COUNT_MAX`] channels per link, one read buffer of
//! [`READ_BUFFER_SIZE`] bytes and one write batch of about
//! [`WRITE_BATCH_BYTES_MAX`] bytes (plus one frame) per link.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use glommio::net::{TcpListener, TcpStream};
use strom_core::record::StreamElement;

use crate::credit::{ReceiverCredits, SenderCredits};
use crate::error::NetError;
use crate::frame::{
    data_payload_length, encode_close, encode_credit, encode_data, encode_hello, Frame,
    FrameDecoder, FrameKind, Hello, HELLO_NONCE_SIZE, HELLO_PROOF_SIZE,
};
use crate::proof;

/// The most channels one link carries (either direction).
pub const LINK_CHANNEL_COUNT_MAX: usize = 4096;
/// Elements a channel's sender queues while it waits for credit; a
/// producer whose queue is full waits in [`LinkSender::send`].
pub const SEND_QUEUE_CAPACITY_ELEMENTS: usize = 4;
/// The most buffers a receiver may set aside for one channel.
pub const RECEIVE_CAPACITY_BUFFERS_MAX: u32 = 1024;
/// Bytes the reader takes from the socket at a time.
pub const READ_BUFFER_SIZE: usize = 64 * 1024;
/// The writer gathers frames up to this many bytes (plus one frame) into
/// one write.
pub const WRITE_BATCH_BYTES_MAX: usize = 256 * 1024;
/// The longest a handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest [`Link::connect`] waits for the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a closing link waits for the peer to take its last bytes
/// before it shuts the socket down regardless.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes the handshake reads at a time (it reads only a few small frames).
const HANDSHAKE_READ_SIZE: usize = 512;

const PROOF_ROLE_CONNECTOR: &[u8] = b"strom-link-v1 connector";
const PROOF_ROLE_ACCEPTOR: &[u8] = b"strom-link-v1 acceptor";

/// One connection to a peer process. Dropping it closes the connection.
pub struct Link {
    core: Rc<RefCell<LinkCore>>,
    peer_id: u64,
    peer_addr: SocketAddr,
}

/// Sends elements on any channel of a link; cheap to clone.
#[derive(Clone)]
pub struct LinkSender {
    core: Rc<RefCell<LinkCore>>,
}

/// Receives the elements of one channel of a link, in the order they were
/// sent. Dropping it discards what arrives on the channel and grants no
/// more credit, so the peer's producer stalls on that channel alone.
pub struct LinkReceiver {
    core: Rc<RefCell<LinkCore>>,
    channel: u32,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Link")
            .field("peer_id", &self.peer_id)
            .field("peer_addr", &self.peer_addr)
            .finish()
    }
}

/// The state the link's tasks and handles share (on one executor).
struct LinkCore {
    peer_addr: SocketAddr,
    sender: SenderCredits<StreamElement>,
    receiver: ReceiverCredits,
    inputs: HashMap<u32, Input>,
    /// Producers waiting for room in a channel's send queue.
    send_waiters: HashMap<u32, Vec<Waker>>,
    writer_waker: Option<Waker>,
    /// Woken when the link starts closing and when it ends.
    end_waiters: Vec<Waker>,
    state: LinkState,
}

struct Input {
    buffers: VecDeque<StreamElement>,
    waker: Option<Waker>,
    is_dropped: bool,
}

enum LinkState {
    Open,
    /// Close was asked for: the writer flushes what credit allows, sends
    /// Close and shuts the socket down.
    Closing,
    Ended {
        /// What [`Link::closed`] returns.
        result: Result<(), NetError>,
        /// What sends and receives return from now on.
        cause: NetError,
    },
}

impl LinkCore {
    fn new(peer_addr: SocketAddr) -> LinkCore {
        LinkCore {
            peer_addr,
            sender: SenderCredits::new(SEND_QUEUE_CAPACITY_ELEMENTS, LINK_CHANNEL_COUNT_MAX),
            receiver: ReceiverCredits::new(LINK_CHANNEL_COUNT_MAX),
            inputs: HashMap::new(),
            send_waiters: HashMap::new(),
            writer_waker: None,
            end_waiters: Vec::new(),
            state: LinkState::Open,
        }
    }

    fn ended_cause(&self) -> Option<NetError> {
        match &self.state {
            LinkState::Open => None,
            LinkState::Closing => Some(NetError::LinkClosed),
            LinkState::Ended { cause, .. } => Some(cause.clone()),
        }
    }

    fn wake_end_waiters(&mut self) {
        for waker in self.end_waiters.drain(..) {
            waker.wake();
        }
    }

    fn add_end_waiter(&mut self, context: &Context<'_>) {
        if !self
            .end_waiters
            .iter()
            .any(|waker| waker.will_wake(context.waker()))
        {
            self.end_waiters.push(context.waker().clone());
        }
    }

    fn wake_writer(&mut self) {
        if let Some(waker) = self.writer_waker.take() {
            waker.wake();
        }
    }

    /// Ends the link once: the first end wins. Wakes every waiter.
    fn end(&mut self, result: Result<(), NetError>, cause: NetError) {
        if matches!(self.state, LinkState::Ended { .. }) {
            return;
        }
        let peer = self.peer_addr;
        let result = result.map_err(|error| error.with_peer(peer));
        let cause = match cause {
            NetError::LinkClosed | NetError::PeerClosed => cause,
            other => other.with_peer(peer),
        };
        self.state = LinkState::Ended { result, cause };
        self.sender.clear();
        self.wake_writer();
        for waker in self.send_waiters.drain().flat_map(|(_, wakers)| wakers) {
            waker.wake();
        }
        for input in self.inputs.values_mut() {
            if let Some(waker) = input.waker.take() {
                waker.wake();
            }
        }
        self.wake_end_waiters();
    }

    /// Handles one frame from the peer; `Ok(false)` when the peer closed.
    fn on_frame(&mut self, frame: Frame) -> Result<bool, NetError> {
        match frame {
            Frame::Data { channel, element } => {
                self.receiver.on_data(channel)?;
                let input = self
                    .inputs
                    .get_mut(&channel)
                    .expect("a channel with credit has an input");
                if !input.is_dropped {
                    input.buffers.push_back(element);
                    if let Some(waker) = input.waker.take() {
                        waker.wake();
                    }
                }
                if self.receiver.has_grant_due() {
                    self.wake_writer();
                }
                Ok(true)
            }
            Frame::Credit {
                channel,
                credit_count,
            } => {
                self.sender.grant(channel, credit_count)?;
                self.wake_writer();
                Ok(true)
            }
            Frame::Close { .. } => Ok(false),
            Frame::Hello(_) => Err(NetError::UnexpectedFrame {
                expected: "Data, Credit or Close",
                found: FrameKind::Hello,
            }),
        }
    }

    /// Gathers the writer's next batch into `batch`.
    fn poll_writer(&mut self, context: &Context<'_>, batch: &mut Vec<u8>) -> Poll<WriterStep> {
        if matches!(self.state, LinkState::Ended { .. }) {
            return Poll::Ready(WriterStep::Stop);
        }
        while let Some((channel, credit_count)) = self.receiver.next_grant() {
            encode_credit(channel, credit_count, batch);
        }
        while batch.len() < WRITE_BATCH_BYTES_MAX {
            let Some((channel, element)) = self.sender.next_to_send() else {
                break;
            };
            encode_data(channel, &element, batch).expect("checked by LinkSender::send");
            if let Some(wakers) = self.send_waiters.remove(&channel) {
                wakers.into_iter().for_each(Waker::wake);
            }
        }
        if !batch.is_empty() {
            Poll::Ready(WriterStep::Write)
        } else if matches!(self.state, LinkState::Closing) {
            Poll::Ready(WriterStep::Close)
        } else {
            self.writer_waker = Some(context.waker().clone());
            Poll::Pending
        }
    }
}

enum WriterStep {
    Write,
    Close,
    Stop,
}

type SharedStream = Rc<RefCell<TcpStream>>;

/// Reads from a stream the reader and writer tasks share. The borrow lasts
/// one poll: the two tasks run on one thread, never at once.
async fn read_shared(stream: &SharedStream, buffer: &mut [u8]) -> io::Result<usize> {
    poll_fn(|context| Pin::new(&mut *stream.borrow_mut()).poll_read(context, buffer)).await
}

async fn write_all_shared(stream: &SharedStream, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        let written =
            poll_fn(|context| Pin::new(&mut *stream.borrow_mut()).poll_write(context, bytes))
                .await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        bytes = &bytes[written..];
    }
    Ok(())
}

/// Shuts both directions of the socket down, which also ends a pending read
/// of the other task. glommio's shutdown is a plain system call behind an
/// async signature: it is ready on its first poll.
fn shutdown_shared(stream: &SharedStream) {
    let stream = stream.borrow();
    let _ = futures_lite::future::block_on(stream.shutdown(Shutdown::Both));
}

impl Link {
    /// Connects to the process listening at `address` and runs the
    /// handshake as `local_id`, proving `secret` if given.
    pub async fn connect(
        address: SocketAddr,
        local_id: u64,
        secret: Option<&[u8]>,
    ) -> Result<Link, NetError> {
        let mut stream = TcpStream::connect_timeout(address, CONNECT_TIMEOUT)
            .await
            .map_err(|error| NetError::io("connect", error).with_peer(address))?;
        let mut decoder = FrameDecoder::new();
        let mut pending = Vec::new();
        let peer_id = connect_handshake(&mut stream, &mut decoder, &mut pending, local_id, secret)
            .await
            .map_err(|error| error.with_peer(address))?;
        Link::start(stream, address, peer_id, decoder, pending)
    }

    /// Accepts the next connection on `listener` and runs the handshake as
    /// `local_id`, requiring proof of `secret` if given. An error names the
    /// peer's address; the listener is unaffected.
    pub async fn accept(
        listener: &TcpListener,
        local_id: u64,
        secret: Option<&[u8]>,
    ) -> Result<Link, NetError> {
        let stream = listener
            .accept()
            .await
            .map_err(|error| NetError::io("accept a connection", error))?;
        Link::accept_stream(stream, local_id, secret).await
    }

    /// Runs the accepting side of the handshake on an accepted stream (so
    /// that a server can accept in one task and shake hands in others).
    pub async fn accept_stream(
        mut stream: TcpStream,
        local_id: u64,
        secret: Option<&[u8]>,
    ) -> Result<Link, NetError> {
        let peer_addr = stream
            .peer_addr()
            .map_err(|error| NetError::io("get the peer address", error))?;
        let mut decoder = FrameDecoder::new();
        let mut pending = Vec::new();
        match accept_handshake(&mut stream, &mut decoder, &mut pending, local_id, secret).await {
            Ok(peer_id) => Link::start(stream, peer_addr, peer_id, decoder, pending),
            Err(error) => {
                if !matches!(error, NetError::Io { .. } | NetError::PeerClosed) {
                    // Best effort: tell the peer why before hanging up.
                    let mut bytes = Vec::new();
                    encode_close(&error.to_string(), &mut bytes);
                    let _ = stream.write_all(&bytes).await;
                }
                let _ = stream.shutdown(Shutdown::Both).await;
                Err(error.with_peer(peer_addr))
            }
        }
    }

    fn start(
        stream: TcpStream,
        peer_addr: SocketAddr,
        peer_id: u64,
        decoder: FrameDecoder,
        pending: Vec<u8>,
    ) -> Result<Link, NetError> {
        let timeouts = stream
            .set_read_timeout(None)
            .and_then(|()| stream.set_write_timeout(None))
            .and_then(|()| stream.set_nodelay(true));
        timeouts
            .map_err(|error| NetError::io("configure the socket", error).with_peer(peer_addr))?;
        let stream = Rc::new(RefCell::new(stream));
        let core = Rc::new(RefCell::new(LinkCore::new(peer_addr)));
        glommio::spawn_local(read_loop(core.clone(), stream.clone(), decoder, pending)).detach();
        glommio::spawn_local(write_loop(core.clone(), stream)).detach();
        Ok(Link {
            core,
            peer_id,
            peer_addr,
        })
    }

    /// The peer's process id, from its Hello.
    pub fn peer_id(&self) -> u64 {
        self.peer_id
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// A handle to send elements on this link.
    pub fn sender(&self) -> LinkSender {
        LinkSender {
            core: self.core.clone(),
        }
    }

    /// Opens `channel` for receiving, with room for `capacity_buffers`
    /// elements (all granted to the peer at once).
    pub fn open_input(
        &self,
        channel: u32,
        capacity_buffers: u32,
    ) -> Result<LinkReceiver, NetError> {
        assert!(
            (1..=RECEIVE_CAPACITY_BUFFERS_MAX).contains(&capacity_buffers),
            "channel capacity {capacity_buffers} outside 1..={RECEIVE_CAPACITY_BUFFERS_MAX}"
        );
        let mut core = self.core.borrow_mut();
        if let Some(cause) = core.ended_cause() {
            return Err(cause);
        }
        core.receiver.open(channel, capacity_buffers)?;
        core.inputs.insert(
            channel,
            Input {
                buffers: VecDeque::with_capacity(capacity_buffers as usize),
                waker: None,
                is_dropped: false,
            },
        );
        core.wake_writer();
        Ok(LinkReceiver {
            core: self.core.clone(),
            channel,
        })
    }

    /// Closes the link: what credit allows is still sent, then a Close
    /// frame, then the connection is shut down. Elements still waiting for
    /// credit are dropped.
    pub fn close(&self) {
        let mut core = self.core.borrow_mut();
        if matches!(core.state, LinkState::Open) {
            core.state = LinkState::Closing;
            core.wake_writer();
            core.wake_end_waiters();
        }
    }

    /// Waits until the link has ended: `Ok` after a close by either side,
    /// the error (naming the peer) that ended it otherwise.
    pub async fn closed(&self) -> Result<(), NetError> {
        poll_fn(|context| {
            let mut core = self.core.borrow_mut();
            if let LinkState::Ended { result, .. } = &core.state {
                return Poll::Ready(result.clone());
            }
            core.add_end_waiter(context);
            Poll::Pending
        })
        .await
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

impl LinkSender {
    /// Queues `element` for `channel`, waiting while the channel's queue is
    /// full (its receiver has granted no credit for it). Other channels are
    /// not held up. Fails at once for an element no frame can carry, and
    /// once the link has ended.
    pub async fn send(&self, channel: u32, element: StreamElement) -> Result<(), NetError> {
        data_payload_length(&element)?;
        let mut element = Some(element);
        poll_fn(|context| {
            let mut core = self.core.borrow_mut();
            if let Some(cause) = core.ended_cause() {
                return Poll::Ready(Err(cause));
            }
            let item = element.take().expect("polled after completion");
            match core.sender.offer(channel, item) {
                Err(error) => Poll::Ready(Err(error)),
                Ok(Ok(())) => {
                    core.wake_writer();
                    Poll::Ready(Ok(()))
                }
                Ok(Err(item)) => {
                    element = Some(item);
                    let waiters = core.send_waiters.entry(channel).or_default();
                    if !waiters.iter().any(|waker| waker.will_wake(context.waker())) {
                        waiters.push(context.waker().clone());
                    }
                    Poll::Pending
                }
            }
        })
        .await
    }
}

impl LinkReceiver {
    /// The channel this receiver reads.
    pub fn channel(&self) -> u32 {
        self.channel
    }

    /// The next element of the channel. After the link ended, the elements
    /// that arrived before are still returned, then the link's error.
    pub async fn recv(&self) -> Result<StreamElement, NetError> {
        poll_fn(|context| {
            let mut core = self.core.borrow_mut();
            let core = &mut *core;
            let input = core
                .inputs
                .get_mut(&self.channel)
                .expect("an open channel has an input");
            if let Some(element) = input.buffers.pop_front() {
                core.receiver.on_consumed(self.channel);
                if core.receiver.has_grant_due() {
                    core.wake_writer();
                }
                return Poll::Ready(Ok(element));
            }
            if let LinkState::Ended { cause, .. } = &core.state {
                return Poll::Ready(Err(cause.clone()));
            }
            input.waker = Some(context.waker().clone());
            Poll::Pending
        })
        .await
    }
}

impl Drop for LinkReceiver {
    fn drop(&mut self) {
        let mut core = self.core.borrow_mut();
        if let Some(input) = core.inputs.get_mut(&self.channel) {
            input.is_dropped = true;
            input.buffers.clear();
            input.waker = None;
        }
    }
}

/// The reader task: frames from the socket until the link ends.
async fn read_loop(
    core: Rc<RefCell<LinkCore>>,
    stream: SharedStream,
    mut decoder: FrameDecoder,
    pending: Vec<u8>,
) {
    let result = read_frames(&core, &stream, &mut decoder, &pending).await;
    let (result, cause) = match result {
        Ok(()) => (Ok(()), NetError::PeerClosed),
        Err(error) => (Err(error.clone()), error),
    };
    // If this side closed the link, the writer ended it already and this
    // end changes nothing.
    core.borrow_mut().end(result, cause);
    shutdown_shared(&stream);
}

/// Decodes and handles frames; `Ok` when the peer sent Close.
async fn read_frames(
    core: &Rc<RefCell<LinkCore>>,
    stream: &SharedStream,
    decoder: &mut FrameDecoder,
    pending: &[u8],
) -> Result<(), NetError> {
    if !handle_bytes(core, decoder, pending)? {
        return Ok(());
    }
    let mut buffer = vec![0; READ_BUFFER_SIZE];
    loop {
        let read = read_shared(stream, &mut buffer)
            .await
            .map_err(|error| NetError::io("read from the peer", error))?;
        if read == 0 {
            return Err(NetError::PeerClosed);
        }
        if !handle_bytes(core, decoder, &buffer[..read])? {
            return Ok(());
        }
        glommio::yield_if_needed().await;
    }
}

/// Feeds `bytes` to the decoder and handles every frame; `Ok(false)` when
/// the peer closed.
fn handle_bytes(
    core: &Rc<RefCell<LinkCore>>,
    decoder: &mut FrameDecoder,
    mut bytes: &[u8],
) -> Result<bool, NetError> {
    let mut core = core.borrow_mut();
    if matches!(core.state, LinkState::Ended { .. }) {
        return Ok(false);
    }
    while !bytes.is_empty() {
        let (consumed, frame) = decoder.decode(bytes)?;
        bytes = &bytes[consumed..];
        if let Some(frame) = frame {
            if !core.on_frame(frame)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// The writer task: grants and data as credit allows, until the link ends.
async fn write_loop(core: Rc<RefCell<LinkCore>>, stream: SharedStream) {
    let mut batch = Vec::with_capacity(WRITE_BATCH_BYTES_MAX);
    loop {
        let step = poll_fn(|context| core.borrow_mut().poll_writer(context, &mut batch)).await;
        match step {
            WriterStep::Write => {
                if let Err(error) = write_before_close_deadline(&core, &stream, &batch).await {
                    let error = NetError::io("write to the peer", error);
                    core.borrow_mut().end(Err(error.clone()), error);
                    shutdown_shared(&stream);
                    return;
                }
                batch.clear();
                // Large batches would otherwise keep this core busy.
                glommio::yield_if_needed().await;
            }
            WriterStep::Close => {
                encode_close("link closed", &mut batch);
                let _ = write_before_close_deadline(&core, &stream, &batch).await;
                shutdown_shared(&stream);
                core.borrow_mut().end(Ok(()), NetError::LinkClosed);
                return;
            }
            WriterStep::Stop => return,
        }
    }
}

/// Writes `bytes`, unless the link has been closing for [`CLOSE_TIMEOUT`]:
/// a peer that stopped reading must not keep a closed link (and its
/// socket) alive.
async fn write_before_close_deadline(
    core: &Rc<RefCell<LinkCore>>,
    stream: &SharedStream,
    bytes: &[u8],
) -> io::Result<()> {
    let deadline = async {
        poll_fn(|context| {
            let mut core = core.borrow_mut();
            if matches!(core.state, LinkState::Open) {
                core.add_end_waiter(context);
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await;
        glommio::timer::sleep(CLOSE_TIMEOUT).await;
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the peer took no bytes for {CLOSE_TIMEOUT:?} after close"),
        ))
    };
    futures_lite::future::or(write_all_shared(stream, bytes), deadline).await
}

/// The proof of the secret by the side `prover_id` in `role`.
fn prove(
    secret: &[u8],
    role: &[u8],
    challenge: &[u8; HELLO_NONCE_SIZE],
    response: &[u8; HELLO_NONCE_SIZE],
    prover_id: u64,
) -> [u8; HELLO_PROOF_SIZE] {
    proof::prove(
        secret,
        &[role, challenge, response, &prover_id.to_le_bytes()],
    )
}

/// Checks the proof in `hello` (if this side has a secret), in constant time.
fn verify(
    secret: Option<&[u8]>,
    role: &[u8],
    challenge: &[u8; HELLO_NONCE_SIZE],
    hello: &Hello,
) -> Result<(), NetError> {
    let Some(secret) = secret else {
        return Ok(());
    };
    let proof = hello.proof.ok_or(NetError::SecretProofMissing)?;
    let parts: [&[u8]; 4] = [role, challenge, &hello.nonce, &hello.peer_id.to_le_bytes()];
    if proof::holds(secret, &parts, &proof) {
        Ok(())
    } else {
        Err(NetError::SecretProofWrong)
    }
}

async fn send_hello(stream: &mut TcpStream, hello: &Hello) -> Result<(), NetError> {
    let mut bytes = Vec::new();
    encode_hello(hello, &mut bytes);
    stream
        .write_all(&bytes)
        .await
        .map_err(|error| NetError::io("write the handshake", error))
}

/// Reads the next frame during the handshake; it must be a Hello. Bytes
/// read past it stay in `pending` for the reader task.
async fn read_hello(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    pending: &mut Vec<u8>,
) -> Result<Hello, NetError> {
    let frame = loop {
        let (consumed, frame) = decoder.decode(pending)?;
        pending.drain(..consumed);
        if let Some(frame) = frame {
            break frame;
        }
        let mut chunk = [0; HANDSHAKE_READ_SIZE];
        let read = stream
            .read(&mut chunk)
            .await
            .map_err(|error| NetError::io("read the handshake", error))?;
        if read == 0 {
            return Err(NetError::PeerClosed);
        }
        pending.extend_from_slice(&chunk[..read]);
    };
    match frame {
        Frame::Hello(hello) => Ok(hello),
        Frame::Close { reason } => Err(NetError::Rejected { reason }),
        other => Err(NetError::UnexpectedFrame {
            expected: "Hello",
            found: other.kind(),
        }),
    }
}

fn set_handshake_timeouts(stream: &TcpStream) -> Result<(), NetError> {
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|error| NetError::io("configure the socket", error))
}

/// The accepting side of the handshake (steps 1 and 3); the peer's id.
async fn accept_handshake(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    pending: &mut Vec<u8>,
    local_id: u64,
    secret: Option<&[u8]>,
) -> Result<u64, NetError> {
    set_handshake_timeouts(stream)?;
    let nonce = proof::random_nonce()?;
    let challenge = Hello {
        peer_id: local_id,
        nonce,
        proof: None,
    };
    send_hello(stream, &challenge).await?;
    let response = read_hello(stream, decoder, pending).await?;
    verify(secret, PROOF_ROLE_CONNECTOR, &nonce, &response)?;
    let acceptance = Hello {
        peer_id: local_id,
        nonce,
        proof: secret.map(|secret| {
            prove(
                secret,
                PROOF_ROLE_ACCEPTOR,
                &response.nonce,
                &nonce,
                local_id,
            )
        }),
    };
    send_hello(stream, &acceptance).await?;
    Ok(response.peer_id)
}

/// The connecting side of the handshake (steps 2 and 4); the peer's id.
async fn connect_handshake(
    stream: &mut TcpStream,
    decoder: &mut FrameDecoder,
    pending: &mut Vec<u8>,
    local_id: u64,
    secret: Option<&[u8]>,
) -> Result<u64, NetError> {
    set_handshake_timeouts(stream)?;
    let challenge = read_hello(stream, decoder, pending).await?;
    let nonce = proof::random_nonce()?;
    let response = Hello {
        peer_id: local_id,
        nonce,
        proof: secret.map(|secret| {
            prove(
                secret,
                PROOF_ROLE_CONNECTOR,
                &challenge.nonce,
                &nonce,
                local_id,
            )
        }),
    };
    send_hello(stream, &response).await?;
    let acceptance = read_hello(stream, decoder, pending).await?;
    if acceptance.peer_id != challenge.peer_id || acceptance.nonce != challenge.nonce {
        return Err(NetError::MalformedPayload {
            kind: FrameKind::Hello,
            reason: "the acceptance does not match the challenge".to_string(),
        });
    }
    verify(secret, PROOF_ROLE_ACCEPTOR, &nonce, &acceptance)?;
    Ok(acceptance.peer_id)
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::path::PathBuf;
    use std::sync::Arc;

    use glommio::timer::sleep;
    use glommio::{LocalExecutorBuilder, Placement};
    use rkyv::util::AlignedVec;
    use strom_core::record::{Record, StreamRecord};
    use strom_core::snapshot::CheckpointBarrier;

    use super::*;
    use crate::frame::{FRAME_HEADER_SIZE, FRAME_MAGIC, FRAME_PAYLOAD_MAX};

    /// io_uring memory per test executor: the machine locks little memory.
    const TEST_IO_MEMORY_BYTES: usize = 512 * 1024;
    const TEST_TIMEOUT: Duration = Duration::from_secs(20);

    /// Runs `test` on a fresh glommio executor thread.
    fn run<G, F>(test: G)
    where
        G: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + 'static,
    {
        LocalExecutorBuilder::new(Placement::Unbound)
            .io_memory(TEST_IO_MEMORY_BYTES)
            .spawn(move || async move {
                let _watch = crate::watchdog::watch("link test").unwrap();
                futures_lite::future::or(test(), async {
                    sleep(TEST_TIMEOUT).await;
                    panic!("test timed out after {TEST_TIMEOUT:?}");
                })
                .await
            })
            .expect("start a test executor")
            .join()
            .expect("the test executor ran to the end");
    }

    fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback listener");
        let address = listener.local_addr().unwrap();
        (listener, address)
    }

    /// A connected pair of links: (accepting side, connecting side).
    async fn link_pair(secret: Option<&'static [u8]>) -> (Link, Link) {
        let (listener, address) = listener();
        let connecting = glommio::spawn_local(async move {
            Link::connect(address, 2, secret).await.expect("connect")
        });
        let accepted = Link::accept(&listener, 1, secret).await.expect("accept");
        let connected = connecting.await;
        assert_eq!(accepted.peer_id(), 2);
        assert_eq!(connected.peer_id(), 1);
        (accepted, connected)
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

    fn every_element(seed: u64) -> Vec<StreamElement> {
        vec![
            records(&[seed, seed + 1, seed + 2]),
            StreamElement::Watermark(seed as i64 - 100),
            StreamElement::Idle(true),
            StreamElement::Idle(false),
            StreamElement::Barrier(CheckpointBarrier {
                checkpoint_id: seed,
                timestamp_ms: 1_700_000_000_000 + seed,
                target: Arc::new(PathBuf::from(format!("/tmp/strom/chk-{seed}"))),
                is_savepoint: seed >= 20,
            }),
            StreamElement::EndOfInput,
        ]
    }

    fn assert_same(received: &StreamElement, expected: &StreamElement) {
        match (received, expected) {
            (StreamElement::Records(_), StreamElement::Records(_)) => {
                assert_eq!(decode_records(received), decode_records(expected))
            }
            (StreamElement::Watermark(left), StreamElement::Watermark(right)) => {
                assert_eq!(left, right)
            }
            (StreamElement::Idle(left), StreamElement::Idle(right)) => assert_eq!(left, right),
            (StreamElement::Barrier(left), StreamElement::Barrier(right)) => {
                assert_eq!(left.checkpoint_id, right.checkpoint_id);
                assert_eq!(left.timestamp_ms, right.timestamp_ms);
                assert_eq!(left.target, right.target);
                assert_eq!(left.is_savepoint, right.is_savepoint);
            }
            (StreamElement::EndOfInput, StreamElement::EndOfInput) => {}
            _ => panic!("received {received:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn every_element_kind_round_trips_over_several_channels_both_ways() {
        run(|| async {
            let (accepted, connected) = link_pair(Some(b"cluster secret")).await;
            let channels = [0u32, 1, 7, u32::MAX];
            let inputs: Vec<LinkReceiver> = channels
                .iter()
                .map(|&channel| accepted.open_input(channel, 4).unwrap())
                .collect();
            let reply_input = connected.open_input(3, 2).unwrap();
            let sender = connected.sender();
            for (index, &channel) in channels.iter().enumerate() {
                for element in every_element(index as u64 * 10) {
                    sender.send(channel, element).await.unwrap();
                }
            }
            for (index, input) in inputs.iter().enumerate() {
                assert_eq!(input.channel(), channels[index]);
                for expected in every_element(index as u64 * 10) {
                    assert_same(&input.recv().await.unwrap(), &expected);
                }
            }
            // And back the other way.
            for element in every_element(99) {
                accepted.sender().send(3, element).await.unwrap();
            }
            for expected in every_element(99) {
                assert_same(&reply_input.recv().await.unwrap(), &expected);
            }
            // A clean close ends both sides without an error.
            connected.close();
            connected.closed().await.unwrap();
            accepted.closed().await.unwrap();
            assert!(matches!(inputs[0].recv().await, Err(NetError::PeerClosed)));
            assert!(matches!(
                sender.send(0, StreamElement::EndOfInput).await,
                Err(NetError::LinkClosed)
            ));
        });
    }

    #[test]
    fn records_arrive_in_order_per_channel() {
        const CHANNEL_COUNT: u32 = 4;
        const ELEMENT_COUNT: u64 = 500;
        run(|| async {
            let (accepted, connected) = link_pair(None).await;
            // Small capacities, so credit runs out and returns many times.
            let inputs: Vec<LinkReceiver> = (0..CHANNEL_COUNT)
                .map(|channel| accepted.open_input(channel, 1 + channel).unwrap())
                .collect();
            let producers: Vec<_> = (0..CHANNEL_COUNT)
                .map(|channel| {
                    let sender = connected.sender();
                    glommio::spawn_local(async move {
                        for index in 0..ELEMENT_COUNT {
                            let first = index * 3;
                            sender
                                .send(channel, records(&[first, first + 1, first + 2]))
                                .await
                                .unwrap();
                        }
                        sender
                            .send(channel, StreamElement::EndOfInput)
                            .await
                            .unwrap();
                    })
                })
                .collect();
            let consumers: Vec<_> = inputs
                .into_iter()
                .map(|input| {
                    glommio::spawn_local(async move {
                        let mut values = Vec::new();
                        loop {
                            match input.recv().await.unwrap() {
                                StreamElement::EndOfInput => break,
                                element => values.extend(decode_records(&element)),
                            }
                        }
                        values
                    })
                })
                .collect();
            for producer in producers {
                producer.await;
            }
            for consumer in consumers {
                let values = consumer.await;
                assert!(values.iter().copied().eq(0..ELEMENT_COUNT * 3));
            }
        });
    }

    #[test]
    fn a_channel_whose_receiver_never_reads_does_not_stall_another() {
        run(|| async {
            let (accepted, connected) = link_pair(None).await;
            let _stalled = accepted.open_input(1, 2).unwrap();
            let flowing = accepted.open_input(2, 2).unwrap();
            let stalled_sent = Rc::new(std::cell::Cell::new(0usize));
            let stalled_producer = {
                let sender = connected.sender();
                let stalled_sent = stalled_sent.clone();
                glommio::spawn_local(async move {
                    for value in 0..1000 {
                        sender.send(1, records(&[value])).await.unwrap();
                        stalled_sent.set(stalled_sent.get() + 1);
                    }
                })
            };
            let sender = connected.sender();
            let consumer = glommio::spawn_local(async move {
                for value in 0..1000 {
                    assert_eq!(decode_records(&flowing.recv().await.unwrap()), vec![value]);
                }
            });
            for value in 0..1000 {
                sender.send(2, records(&[value])).await.unwrap();
            }
            consumer.await;
            // The stalled channel took its credit and filled its queue, no more.
            assert_eq!(stalled_sent.get(), 2 + SEND_QUEUE_CAPACITY_ELEMENTS);
            drop(stalled_producer);
        });
    }

    /// Connects a plain TCP stream and, as a well-behaved peer would, runs
    /// the connecting side of the handshake by hand.
    async fn raw_handshake(address: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(address).await.unwrap();
        let mut decoder = FrameDecoder::new();
        let mut pending = Vec::new();
        connect_handshake(&mut stream, &mut decoder, &mut pending, 9, None)
            .await
            .unwrap();
        stream
    }

    /// Whether the peer hung up: reading reaches the end (or a reset).
    async fn assert_disconnected(stream: &mut TcpStream) {
        let mut buffer = [0; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    }

    /// After a bad peer, the same listener still accepts a good one.
    async fn assert_listener_still_accepts(listener: &TcpListener, secret: Option<&'static [u8]>) {
        let address = listener.local_addr().unwrap();
        let connecting =
            glommio::spawn_local(async move { Link::connect(address, 5, secret).await.unwrap() });
        let accepted = Link::accept(listener, 1, secret).await.unwrap();
        let connected = connecting.await;
        let input = accepted.open_input(0, 1).unwrap();
        connected
            .sender()
            .send(0, StreamElement::Watermark(17))
            .await
            .unwrap();
        assert!(matches!(
            input.recv().await.unwrap(),
            StreamElement::Watermark(17)
        ));
    }

    fn header(kind: u16, channel: u32, length: u32, checksum: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&crate::frame::FRAME_VERSION.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&channel.to_le_bytes());
        bytes.extend_from_slice(&length.to_le_bytes());
        bytes.extend_from_slice(&checksum.to_le_bytes());
        assert_eq!(bytes.len(), FRAME_HEADER_SIZE);
        bytes
    }

    #[test]
    fn garbage_before_the_handshake_is_refused_naming_the_peer() {
        run(|| async {
            let (listener, address) = listener();
            let client = glommio::spawn_local(async move {
                let mut stream = TcpStream::connect(address).await.unwrap();
                let local = stream.local_addr().unwrap();
                stream
                    .write_all(b"GET / HTTP/1.1\r\nHost: strom\r\n\r\n")
                    .await
                    .unwrap();
                assert_disconnected(&mut stream).await;
                local
            });
            let error = Link::accept(&listener, 1, None).await.unwrap_err();
            let client_address = client.await;
            match &error {
                NetError::Peer { peer, source } => {
                    assert_eq!(*peer, client_address);
                    assert!(matches!(**source, NetError::BadMagic { .. }), "{error}");
                }
                other => panic!("expected a peer error, got {other}"),
            }
            assert!(error.to_string().contains(&client_address.to_string()));
            assert_listener_still_accepts(&listener, None).await;
        });
    }

    #[test]
    fn an_oversized_length_after_the_handshake_ends_the_link() {
        run(|| async {
            let (listener, address) = listener();
            let client = glommio::spawn_local(async move {
                let mut stream = raw_handshake(address).await;
                stream
                    .write_all(&header(FrameKind::Data as u16, 0, u32::MAX, 0))
                    .await
                    .unwrap();
                assert_disconnected(&mut stream).await;
            });
            let link = Link::accept(&listener, 1, None).await.unwrap();
            let error = link.closed().await.unwrap_err();
            assert!(
                matches!(
                    error.root(),
                    NetError::OversizedFrame {
                        length: 4_294_967_295,
                        length_max: FRAME_PAYLOAD_MAX
                    }
                ),
                "{error}"
            );
            assert!(matches!(error, NetError::Peer { peer, .. } if peer == link.peer_addr()));
            client.await;
            // The link's handles see the error too.
            assert!(matches!(
                link.sender().send(0, StreamElement::EndOfInput).await,
                Err(NetError::Peer { .. })
            ));
            assert_listener_still_accepts(&listener, None).await;
        });
    }

    #[test]
    fn a_bad_checksum_after_the_handshake_ends_the_link() {
        run(|| async {
            let (listener, address) = listener();
            let client = glommio::spawn_local(async move {
                let mut stream = raw_handshake(address).await;
                let mut frame = Vec::new();
                encode_credit(4, 1, &mut frame);
                frame[FRAME_HEADER_SIZE] ^= 0x01; // corrupt the payload
                stream.write_all(&frame).await.unwrap();
                assert_disconnected(&mut stream).await;
            });
            let link = Link::accept(&listener, 1, None).await.unwrap();
            let error = link.closed().await.unwrap_err();
            assert!(
                matches!(error.root(), NetError::ChecksumMismatch { channel: 4, .. }),
                "{error}"
            );
            client.await;
            assert_listener_still_accepts(&listener, None).await;
        });
    }

    #[test]
    fn data_without_credit_ends_the_link() {
        run(|| async {
            let (listener, address) = listener();
            let client = glommio::spawn_local(async move {
                let mut stream = raw_handshake(address).await;
                let mut frame = Vec::new();
                encode_data(6, &StreamElement::EndOfInput, &mut frame).unwrap();
                stream.write_all(&frame).await.unwrap();
                assert_disconnected(&mut stream).await;
            });
            let link = Link::accept(&listener, 1, None).await.unwrap();
            let error = link.closed().await.unwrap_err();
            assert!(
                matches!(error.root(), NetError::CreditViolation { channel: 6 }),
                "{error}"
            );
            client.await;
        });
    }

    #[test]
    fn a_wrong_or_missing_secret_is_refused_and_the_listener_keeps_accepting() {
        const SECRET: &[u8] = b"the right secret";
        run(|| async {
            let (listener, address) = listener();

            // A wrong secret: the connector learns why, the acceptor names it.
            let connecting =
                glommio::spawn_local(
                    async move { Link::connect(address, 3, Some(b"wrong")).await },
                );
            let error = Link::accept(&listener, 1, Some(SECRET)).await.unwrap_err();
            assert!(
                matches!(error.root(), NetError::SecretProofWrong),
                "{error}"
            );
            assert!(matches!(error, NetError::Peer { .. }));
            let connect_error = connecting.await.unwrap_err();
            assert!(
                matches!(connect_error.root(), NetError::Rejected { reason } if reason.contains("wrong secret")),
                "{connect_error}"
            );

            // No secret at all, from a raw client.
            let client = glommio::spawn_local(async move {
                let mut stream = TcpStream::connect(address).await.unwrap();
                let local = stream.local_addr().unwrap();
                let mut decoder = FrameDecoder::new();
                let mut pending = Vec::new();
                let challenge = read_hello(&mut stream, &mut decoder, &mut pending)
                    .await
                    .unwrap();
                assert_eq!(challenge.peer_id, 1);
                send_hello(
                    &mut stream,
                    &Hello {
                        peer_id: 4,
                        nonce: [0; HELLO_NONCE_SIZE],
                        proof: None,
                    },
                )
                .await
                .unwrap();
                let refusal = read_hello(&mut stream, &mut decoder, &mut pending).await;
                assert!(
                    matches!(refusal, Err(NetError::Rejected { .. })),
                    "{refusal:?}"
                );
                assert_disconnected(&mut stream).await;
                local
            });
            let error = Link::accept(&listener, 1, Some(SECRET)).await.unwrap_err();
            let client_address = client.await;
            assert!(
                matches!(&error, NetError::Peer { peer, source } if *peer == client_address && matches!(**source, NetError::SecretProofMissing)),
                "{error}"
            );

            // A connector with a secret refuses an acceptor without one.
            let connecting =
                glommio::spawn_local(async move { Link::connect(address, 3, Some(SECRET)).await });
            let _accepted = Link::accept(&listener, 1, None).await.unwrap();
            let connect_error = connecting.await.unwrap_err();
            assert!(
                matches!(connect_error.root(), NetError::SecretProofMissing),
                "{connect_error}"
            );

            assert_listener_still_accepts(&listener, Some(SECRET)).await;
        });
    }

    #[test]
    fn closing_one_side_ends_both_without_an_error() {
        run(|| async {
            let (accepted, connected) = link_pair(None).await;
            accepted.close();
            accepted.closed().await.unwrap();
            connected.closed().await.unwrap();
            assert!(matches!(
                accepted.open_input(1, 1),
                Err(NetError::LinkClosed)
            ));
        });
    }

    #[test]
    fn closing_a_link_whose_peer_stopped_reading_ends_within_the_close_timeout() {
        run(|| async {
            let (listener, address) = listener();
            let (link, _silent_peer) = futures_lite::future::zip(
                async { Link::accept(&listener, 1, None).await.unwrap() },
                async move {
                    // A peer that grants plenty of credit, then never reads.
                    let mut stream = raw_handshake(address).await;
                    let mut frame = Vec::new();
                    encode_credit(0, 1000, &mut frame);
                    stream.write_all(&frame).await.unwrap();
                    stream
                },
            )
            .await;
            let sent = Rc::new(std::cell::Cell::new(0usize));
            let producer = {
                let sender = link.sender();
                let sent = sent.clone();
                glommio::spawn_local(async move {
                    let mut buffer = AlignedVec::new();
                    buffer.resize(1024 * 1024, 7);
                    loop {
                        let element = StreamElement::Records(buffer.clone());
                        if sender.send(0, element).await.is_err() {
                            return;
                        }
                        sent.set(sent.get() + 1);
                    }
                })
            };
            // Wait until the socket is full and the producer stalls.
            let mut last = usize::MAX;
            while sent.get() != last {
                last = sent.get();
                sleep(Duration::from_millis(200)).await;
            }
            let started = std::time::Instant::now();
            link.close();
            // The close could not complete: the link ends with the timeout.
            let error = link.closed().await.unwrap_err();
            let took = started.elapsed();
            assert!(
                matches!(error.root(), NetError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut),
                "{error}"
            );
            assert!(
                took >= CLOSE_TIMEOUT - Duration::from_millis(100),
                "{took:?}"
            );
            assert!(took < CLOSE_TIMEOUT + Duration::from_secs(2), "{took:?}");
            producer.await;
        });
    }

    #[test]
    fn elements_no_frame_can_carry_are_refused_at_send() {
        run(|| async {
            let (_accepted, connected) = link_pair(None).await;
            let mut huge = AlignedVec::new();
            huge.resize(FRAME_PAYLOAD_MAX as usize, 0);
            let error = connected
                .sender()
                .send(0, StreamElement::Records(huge))
                .await
                .unwrap_err();
            assert!(matches!(error, NetError::OversizedFrame { .. }), "{error}");
            // The link is unaffected.
            assert!(connected
                .sender()
                .send(0, StreamElement::EndOfInput)
                .await
                .is_ok());
        });
    }
}
