//! The asynchronous half: one task on a current-thread tokio runtime owns every socket and all
//! connection state, so nothing here needs a lock except what the synchronous API reads.
//!
//! Inputs are messages from the listener's connections (see the `listener` module), link
//! events (a DEALER connected or broke), commands from the synchronous API (a crossbeam
//! channel plus a [`Notify`] to wake us) and a periodic tick (heartbeats, loss detection,
//! retransmission, reconnects).
//!
//! Who is a member is not decided here: the core's view change does, and names the members
//! with [`Command::Connect`]. The engine reports join requests, learns a joiner's id from the
//! first hello addressed to its incarnation, and delivers the frames of senders that addressed
//! us before they were named.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use coherence_core::{Contact, NodeId, TransportEvent};
use crossbeam_channel::{Receiver, TryRecvError};
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use zeromq::{
    DealerSendHalf, DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend,
    ZmqMessage,
};

use crate::listener::{self, Context, Inbound, Limits, MAX_ADDR_LEN};
use crate::session::Session;
use crate::wire::{Codec, Header, Hello, Join, Kind, Reject, NO_ID};
use crate::{ZmqError, ZmqStats};
use coherence_core::wait;

/// A receiver acknowledges at least every this many delivered frames, so a one-way stream
/// does not make the sender buffer frames for a whole heartbeat period.
const ACK_EVERY: u64 = 64;
/// Senders not named by the core yet whose receive state we keep; frames of more are dropped
/// (and counted), so that strangers cannot make us allocate without bound.
const MAX_UNNAMED_SENDERS: usize = 64;
/// Messages buffered between the listener's connections and the engine; a full buffer stops
/// reading, which pushes back on senders through TCP.
const INBOUND_BUFFER: usize = 1024;

/// What the synchronous API asks of the engine.
#[derive(Debug)]
pub(crate) enum Command {
    Send {
        to: NodeId,
        frame: Vec<u8>,
    },
    /// The installed view's members, this node among them (see `Transport::connect_members`).
    Connect(BTreeMap<NodeId, Contact>),
    Close,
    Abort,
}

/// Who `send` accepts frames for.
#[derive(Debug, Default)]
pub(crate) struct Roster {
    /// The members named by the core, other than this node, that are still here.
    pub members: BTreeSet<NodeId>,
    /// Members lost or gone, and senders that said goodbye before they were named: never
    /// members again (the core never reuses an id).
    pub departed: BTreeSet<NodeId>,
}

impl Roster {
    /// The core names `named` (this node, `me`, among them): add the new ones. Members it no
    /// longer names depart by goodbye or loss, as the decision must still reach them.
    pub(crate) fn name(&mut self, me: NodeId, named: &BTreeMap<NodeId, Contact>) {
        for &id in named.keys() {
            if id != me && !self.departed.contains(&id) {
                self.members.insert(id);
            }
        }
    }

    fn depart(&mut self, id: NodeId) {
        self.members.remove(&id);
        self.departed.insert(id);
    }
}

/// State shared with the synchronous API.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Current members and departed ones; `send` checks it so a departed peer is an error at
    /// once.
    pub roster: RwLock<Roster>,
    /// Wakes the engine when a command was queued.
    pub wake: Notify,
    pub frames_sent: AtomicU64,
    pub frames_received: AtomicU64,
    pub rejected_malformed: AtomicU64,
    pub rejected_foreign: AtomicU64,
    pub rejected_unauthenticated: AtomicU64,
    pub rejected_replayed: AtomicU64,
    pub rejected_oversize: AtomicU64,
    pub dropped_unauthenticated: AtomicU64,
    pub dropped_unnamed: AtomicU64,
    pub accept_errors: AtomicU64,
}

impl Shared {
    pub(crate) fn stats(&self) -> ZmqStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ZmqStats {
            frames_sent: get(&self.frames_sent),
            frames_received: get(&self.frames_received),
            rejected_malformed: get(&self.rejected_malformed),
            rejected_foreign: get(&self.rejected_foreign),
            rejected_unauthenticated: get(&self.rejected_unauthenticated),
            rejected_replayed: get(&self.rejected_replayed),
            rejected_oversize: get(&self.rejected_oversize),
            dropped_unauthenticated: get(&self.dropped_unauthenticated),
            dropped_unnamed: get(&self.dropped_unnamed),
            accept_errors: get(&self.accept_errors),
        }
    }

    /// Counts a dropped frame (or a connection closed for one) and says why in the log.
    pub(crate) fn count(&self, reject: Reject) {
        let (counter, reason) = match reject {
            Reject::Malformed(reason) => (&self.rejected_malformed, reason),
            Reject::Foreign(reason) => (&self.rejected_foreign, reason),
            Reject::Oversize(len) => {
                tracing::warn!(len, "dropped an oversize frame");
                self.rejected_oversize.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Reject::Unauthenticated(reason) => (&self.rejected_unauthenticated, reason),
            Reject::Replayed(reason) => (&self.rejected_replayed, reason),
        };
        tracing::warn!(reason, "dropped a frame");
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn roster(&self) -> std::sync::RwLockWriteGuard<'_, Roster> {
        self.roster.write().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `send` accepts frames for `id`.
    pub(crate) fn is_member(&self, id: NodeId) -> bool {
        let roster = self.roster.read().unwrap_or_else(PoisonError::into_inner);
        roster.members.contains(&id)
    }

    /// The current members other than this node, lowest id first.
    pub(crate) fn members(&self) -> Vec<NodeId> {
        let roster = self.roster.read().unwrap_or_else(PoisonError::into_inner);
        roster.members.iter().copied().collect()
    }
}

/// What `start` learns once the node has an id.
#[derive(Debug)]
pub(crate) struct Started {
    pub id: NodeId,
    pub local_addr: String,
    /// How members reach this process: its incarnation and advertised address.
    pub contact: Contact,
}

/// Everything the engine needs from the configuration.
#[derive(Debug)]
pub(crate) struct Settings {
    pub listen: String,
    pub advertise: Option<String>,
    pub join: Option<String>,
    pub codec: Codec,
    pub heartbeat: Duration,
    pub lost_after: Duration,
    pub join_timeout: Duration,
    pub limits: Limits,
}

/// The engine task: binds, joins or founds, runs until close. Whichever thread drives the
/// runtime runs it (see `Driver` in the crate root).
pub(crate) async fn run(
    settings: Settings,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    inbox: mpsc::UnboundedSender<TransportEvent>,
    started: mpsc::UnboundedSender<Result<Started, ZmqError>>,
) {
    let (tcp, local_addr) = match listener::bind(&settings.listen).await {
        Ok(bound) => bound,
        Err(reason) => {
            let _ = started.send(Err(ZmqError::Bind {
                addr: settings.listen.clone(),
                reason,
            }));
            return;
        }
    };
    let (inbound_tx, inbound_rx) = mpsc::channel(INBOUND_BUFFER);
    let (gone_tx, gone_rx) = mpsc::unbounded_channel();
    // Dropping it (when this task ends) stops accepting; each connection then ends when it
    // next hands the engine a message or its peer closes.
    let context = Context::new(
        settings.codec.clone(),
        settings.limits,
        Arc::clone(&shared),
        inbound_tx,
        gone_tx,
    );
    let _listener = AbortOnDrop(tokio::spawn(listener::accept(tcp, context)));
    let (links_tx, links_rx) = mpsc::unbounded_channel();
    let mut engine = Engine::new(settings, local_addr, shared, commands, inbox, links_tx);
    if engine.start(started) {
        engine.run(inbound_rx, gone_rx, links_rx).await;
    }
    // Dropping the engine closes every DEALER.
}

/// Keeps a DEALER connected to `addr`, with a secret runs the Noise handshake on it (within
/// `connect_timeout` too), reports it up, then reports when it breaks.
async fn run_link(
    target: LinkTarget,
    epoch: u64,
    addr: String,
    codec: Codec,
    connect_timeout: Duration,
    events: mpsc::UnboundedSender<LinkEvent>,
) {
    let mut options = SocketOptions::default();
    // The identity stays random on purpose: peers do not use it (who we are is in the hello),
    // and a fixed one would only tell strangers which connection is a member's.
    options.connect_timeout(connect_timeout);
    let mut dealer = DealerSocket::with_options(options);
    let mut monitor = dealer.monitor();
    if let Err(e) = dealer.connect(&addr).await {
        tracing::debug!(%addr, error = %e, "cannot connect");
        let _ = events.send(LinkEvent::Down { target, epoch });
        return;
    }
    let (mut send, mut recv) = dealer.split();
    let session = match codec.keys() {
        None => None,
        Some(_) => {
            let handshake = open_session(&codec, &mut send, &mut recv);
            match tokio::time::timeout(connect_timeout, handshake).await {
                Ok(Ok(session)) => Some(session),
                Ok(Err(reason)) => {
                    tracing::warn!(%addr, reason, "no session: cannot talk to this address");
                    let _ = events.send(LinkEvent::Down { target, epoch });
                    return;
                }
                Err(_) => {
                    tracing::debug!(%addr, "no answer to our Noise handshake in time");
                    let _ = events.send(LinkEvent::Down { target, epoch });
                    return;
                }
            }
        }
    };
    if events
        .send(LinkEvent::Up {
            target,
            epoch,
            send,
            session,
        })
        .is_err()
    {
        return;
    }
    // Listeners send nothing after the handshake; polling the receive side is what notices
    // that the peer closed the connection.
    loop {
        tokio::select! {
            received = recv.recv() => if received.is_err() { break },
            event = monitor.next() => match event {
                Some(SocketEvent::Disconnected(_)) | None => break,
                Some(_) => {}
            },
        }
    }
    let _ = events.send(LinkEvent::Down { target, epoch });
}

/// The Noise handshake as the connecting side: our first message, the listener's answer.
async fn open_session(
    codec: &Codec,
    send: &mut DealerSendHalf,
    recv: &mut zeromq::DealerRecvHalf,
) -> Result<Session, String> {
    let keys = codec.keys().ok_or("no secret")?;
    let (initiator, first) = keys.initiate().map_err(|e| format!("{e:?}"))?;
    let header = Header {
        kind: Kind::Handshake,
        sender: NO_ID,
        seq: 0,
        ack: 0,
    };
    send.send(ZmqMessage::from(codec.encode(header, &first)))
        .await
        .map_err(|e| e.to_string())?;
    let answer = recv.recv().await.map_err(|e| e.to_string())?;
    let answer = match answer.into_vec().as_slice() {
        [only] => only.clone(),
        _ => return Err("a multi-part answer to the handshake".into()),
    };
    let (header, payload) = codec.decode(&answer).map_err(|e| format!("{e:?}"))?;
    if header.kind != Kind::Handshake {
        return Err(format!("a {:?} frame for an answer", header.kind));
    }
    initiator.finish(&payload).map_err(|e| format!("{e:?}"))
}

/// Which DEALER a link event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LinkTarget {
    Peer(NodeId),
    /// The member a joiner contacts.
    Contact,
}

enum LinkEvent {
    Up {
        target: LinkTarget,
        epoch: u64,
        send: DealerSendHalf,
        /// With a secret: the session every frame on this link is sealed in.
        session: Option<Session>,
    },
    Down {
        target: LinkTarget,
        epoch: u64,
    },
}

/// Aborts a task when dropped, so replacing a link stops its old watcher.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One outgoing DEALER and its state. Epochs tell a stale event from the current one.
enum Link {
    Connecting {
        epoch: u64,
        _task: AbortOnDrop,
    },
    Up {
        epoch: u64,
        send: DealerSendHalf,
        session: Option<Session>,
        _task: AbortOnDrop,
    },
    Down {
        retry_at: Instant,
    },
}

/// Whether frame `seq` of `from` comes next after `delivered`, which it then becomes.
/// Duplicates (a resend after a reconnect) and gaps are dropped: links are FIFO and a sender
/// resends what was not acknowledged, so a gap cannot last.
fn next_in_order(delivered: &mut u64, from: NodeId, seq: u64) -> bool {
    if seq <= *delivered {
        tracing::trace!(from, seq, "dropped a duplicate");
        return false;
    }
    if seq != *delivered + 1 {
        tracing::warn!(from, seq, expected = *delivered + 1, "gap");
        return false;
    }
    *delivered = seq;
    true
}

impl Link {
    fn epoch(&self) -> Option<u64> {
        match self {
            Link::Connecting { epoch, .. } | Link::Up { epoch, .. } => Some(*epoch),
            Link::Down { .. } => None,
        }
    }

    /// The connection attempt of `epoch` succeeded: the link is up on it. `false` (and the
    /// link unchanged) if the link has moved on since that attempt began.
    fn connected(
        &mut self,
        epoch: u64,
        send: DealerSendHalf,
        session: Option<Session>,
        now: Instant,
    ) -> bool {
        if self.epoch() != Some(epoch) {
            return false;
        }
        match std::mem::replace(self, Link::Down { retry_at: now }) {
            Link::Connecting { _task, .. } => {
                *self = Link::Up {
                    epoch,
                    send,
                    session,
                    _task,
                };
                true
            }
            other => {
                *self = other;
                false
            }
        }
    }

    /// Sends on an up link, sealed in its session with a secret; `false` if the link broke
    /// (it is then down, to be retried). Frames are kept unsealed and sealed here, as each
    /// connection has its own session and a reconnect resends under the new one.
    async fn transmit(&mut self, frame: Bytes, backoff: Duration) -> bool {
        let Link::Up { send, session, .. } = self else {
            return false;
        };
        let frame = match session {
            None => frame,
            Some(session) => match session.seal(&frame) {
                Ok(sealed) => sealed,
                Err(e) => {
                    // Only after 2^64 frames on one connection: a new one has a new session.
                    tracing::warn!(error = %e, "cannot seal a frame; reconnecting");
                    *self = Link::Down {
                        retry_at: Instant::now() + backoff,
                    };
                    return false;
                }
            },
        };
        match send.send(ZmqMessage::from(frame)).await {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(error = %e, "a DEALER failed; reconnecting");
                *self = Link::Down {
                    retry_at: Instant::now() + backoff,
                };
                false
            }
        }
    }
}

/// A member as this node sees it.
struct Peer {
    addr: String,
    incarnation: u64,
    link: Link,
    backoff: Duration,
    /// Sequence number of the next reliable frame to this peer.
    next_seq: u64,
    /// Reliable frames sent but not acknowledged, oldest first; resent after a reconnect.
    unacked: VecDeque<(u64, Bytes)>,
    /// When `unacked` last shrank, or became non-empty.
    last_progress: Instant,
    /// Highest sequence number delivered from this peer.
    delivered: u64,
    /// `delivered` as of the last frame we sent it (our last acknowledgement).
    acked: u64,
    last_heard: Instant,
    /// How long it may stay silent: `lost_after`, and twice that for a newcomer until we
    /// first hear from it.
    patience: Duration,
}

impl Peer {
    fn new(addr: String, incarnation: u64, link: Link, now: Instant, patience: Duration) -> Peer {
        Peer {
            addr,
            incarnation,
            link,
            backoff: wait::RECONNECT_MIN,
            next_seq: 1,
            unacked: VecDeque::new(),
            last_progress: now,
            delivered: 0,
            acked: 0,
            last_heard: now,
            patience,
        }
    }

    fn heard(&mut self, now: Instant, lost_after: Duration) {
        self.last_heard = now;
        self.patience = lost_after;
    }

    /// Drops what `ack` covers.
    fn on_ack(&mut self, ack: u64, now: Instant) {
        let before = self.unacked.len();
        while self.unacked.front().is_some_and(|(seq, _)| *seq <= ack) {
            self.unacked.pop_front();
        }
        if self.unacked.len() != before {
            self.last_progress = now;
        }
    }
}

/// A sender that said a hello addressed to us before the core named it: its frames are
/// delivered in order, and what was delivered carries over once it is named.
struct Unnamed {
    /// The process its hello spoke for.
    incarnation: u64,
    /// Highest sequence number delivered from it.
    delivered: u64,
    last_heard: Instant,
    /// It said goodbye: once named, it is reported `Left` at once.
    gone: bool,
}

/// A listener connection that said hello.
#[derive(Debug, Clone, Copy)]
enum Conn {
    /// Speaks for this sender and incarnation.
    Speaks { sender: NodeId, incarnation: u64 },
    /// Its hello was for another node or process (typically a peer's DEALER still aimed at
    /// a process that used our port before us): the rest is dropped, counted once.
    Refused,
}

/// A node waiting for a member to address it, which tells it its id.
struct Joining {
    contact: String,
    link: Link,
    deadline: Instant,
    next_try: Instant,
    started: mpsc::UnboundedSender<Result<Started, ZmqError>>,
}

#[derive(Debug, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

struct Engine {
    codec: Codec,
    heartbeat: Duration,
    lost_after: Duration,
    join_timeout: Duration,
    join: Option<String>,
    local_addr: String,
    /// The address members connect to: `advertise`, or the bound address.
    advertised: String,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    inbox: mpsc::UnboundedSender<TransportEvent>,
    links_tx: mpsc::UnboundedSender<LinkEvent>,
    /// Random per start; also the nonce of our join request.
    incarnation: u64,
    /// `None` until a member addressed us.
    id: Option<NodeId>,
    /// The members the core named, other than us.
    members: BTreeMap<NodeId, Peer>,
    departed: BTreeSet<NodeId>,
    /// Links to departed members, kept until the given time: zmq.rs only queues what we send
    /// for a writer task, and dropping a DEALER right after a send could lose the frame (the
    /// acknowledgement of a goodbye, whose sender then waited for it until its deadline).
    retired: Vec<(Instant, Link)>,
    /// The listener's connections that said hello, by connection number.
    conns: HashMap<u64, Conn>,
    /// Senders that addressed us before the core named them, at most `MAX_UNNAMED_SENDERS`.
    unnamed: BTreeMap<NodeId, Unnamed>,
    joining: Option<Joining>,
    /// Set by `close`: when to give up waiting for acknowledgements of our goodbye.
    closing: Option<Instant>,
    next_heartbeat: Instant,
    next_epoch: u64,
}

impl Engine {
    fn new(
        settings: Settings,
        local_addr: String,
        shared: Arc<Shared>,
        commands: Receiver<Command>,
        inbox: mpsc::UnboundedSender<TransportEvent>,
        links_tx: mpsc::UnboundedSender<LinkEvent>,
    ) -> Engine {
        let advertised = settings.advertise.unwrap_or_else(|| local_addr.clone());
        Engine {
            codec: settings.codec,
            heartbeat: settings.heartbeat,
            lost_after: settings.lost_after,
            join_timeout: settings.join_timeout,
            join: settings.join,
            local_addr,
            advertised,
            shared,
            commands,
            inbox,
            links_tx,
            incarnation: rand::random(),
            id: None,
            members: BTreeMap::new(),
            departed: BTreeSet::new(),
            retired: Vec::new(),
            conns: HashMap::new(),
            unnamed: BTreeMap::new(),
            joining: None,
            closing: None,
            next_heartbeat: Instant::now(),
            next_epoch: 0,
        }
    }

    /// What `start` returns once we have `id`.
    fn started(&self, id: NodeId) -> Started {
        Started {
            id,
            local_addr: self.local_addr.clone(),
            contact: Contact {
                incarnation: self.incarnation,
                addr: self.advertised.clone(),
            },
        }
    }

    /// Founds a cluster (reporting at once) or starts joining one; `false` if already failed.
    fn start(&mut self, started: mpsc::UnboundedSender<Result<Started, ZmqError>>) -> bool {
        match self.join.clone() {
            None => {
                self.id = Some(0);
                tracing::info!(addr = %self.advertised, "founded a cluster as node 0");
                started.send(Ok(self.started(0))).is_ok()
            }
            Some(contact) => {
                let now = Instant::now();
                let link = self.connect(LinkTarget::Contact, contact.clone());
                self.joining = Some(Joining {
                    contact,
                    link,
                    deadline: now + self.join_timeout,
                    next_try: now + wait::JOIN_RETRY,
                    started,
                });
                true
            }
        }
    }

    async fn run(
        &mut self,
        mut inbound: mpsc::Receiver<Inbound>,
        mut gone: mpsc::UnboundedReceiver<u64>,
        mut links: mpsc::UnboundedReceiver<LinkEvent>,
    ) {
        let shared = Arc::clone(&self.shared);
        let mut tick = tokio::time::interval((self.heartbeat / 2).max(Duration::from_millis(1)));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let flow = tokio::select! {
                input = inbound.recv() => match input {
                    Some(Inbound { conn, frame, verdict }) => {
                        let authenticates = self.on_message(conn, frame).await;
                        if let Some(verdict) = verdict {
                            let _ = verdict.send(authenticates);
                        }
                        Flow::Continue
                    }
                    None => Flow::Exit,
                },
                Some(conn) = gone.recv() => {
                    self.conns.remove(&conn);
                    Flow::Continue
                }
                Some(event) = links.recv() => {
                    self.on_link(event).await;
                    Flow::Continue
                }
                () = shared.wake.notified() => Flow::Continue,
                _ = tick.tick() => self.on_tick().await,
            };
            if flow == Flow::Exit || self.drain_commands().await == Flow::Exit || self.closed() {
                return;
            }
        }
    }

    fn my_id(&self) -> NodeId {
        self.id.unwrap_or(NO_ID)
    }

    /// Starts a DEALER task for `target`.
    fn connect(&mut self, target: LinkTarget, addr: String) -> Link {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        let task = tokio::spawn(run_link(
            target,
            epoch,
            addr,
            self.codec.clone(),
            self.lost_after,
            self.links_tx.clone(),
        ));
        Link::Connecting {
            epoch,
            _task: AbortOnDrop(task),
        }
    }

    fn reject(&self, reject: Reject) {
        self.shared.count(reject);
    }

    /// Hands a data frame of `from` to the node.
    fn deliver(&self, from: NodeId, payload: &[u8]) {
        self.shared.frames_received.fetch_add(1, Ordering::Relaxed);
        self.emit(TransportEvent::Frame {
            from,
            bytes: payload.to_vec(),
        });
    }

    fn emit(&self, event: TransportEvent) {
        // After close nobody reads the inbox; the transport's receiver lives until then.
        if self.closing.is_none() {
            let _ = self.inbox.send(event);
        }
    }

    /// A message from connection `conn`; `true` if it authenticates a new connection (see
    /// [`Engine::on_frame`]).
    async fn on_message(&mut self, conn: u64, frame: Bytes) -> bool {
        match self.codec.decode(&frame) {
            Ok((header, payload)) => self.on_frame(conn, header, payload).await,
            Err(reject) => {
                self.reject(reject);
                false
            }
        }
    }

    /// Acts on a checked frame. Returns whether, as a connection's first message, it
    /// authenticates the connection: a hello we accept or a well-formed join request.
    async fn on_frame(&mut self, conn: u64, header: Header, payload: Bytes) -> bool {
        match header.kind {
            Kind::Hello => return self.on_hello(conn, header, &payload),
            // The codec lets a join through only unsequenced and from a node without id.
            Kind::Join => return self.on_join_request(&payload),
            // The listener consumes handshakes; one in a session, or without a secret, is not
            // how this transport speaks.
            Kind::Handshake => self.reject(Reject::Malformed("a handshake where frames belong")),
            _ => match self.conns.get(&conn).copied() {
                None => self.reject(Reject::Malformed("frame before hello")),
                Some(Conn::Refused) => {
                    tracing::debug!(from = header.sender, "dropped a frame of a refused hello");
                }
                Some(Conn::Speaks { sender, .. }) if sender != header.sender => {
                    self.reject(Reject::Malformed(
                        "sender differs from the one that said hello on this connection",
                    ));
                }
                Some(Conn::Speaks { incarnation, .. }) => {
                    self.on_sender_frame(incarnation, header, payload).await;
                }
            },
        }
        false
    }

    /// A frame from a connection that said hello as `header.sender` of `incarnation`.
    async fn on_sender_frame(&mut self, incarnation: u64, header: Header, payload: Bytes) {
        let from = header.sender;
        if let Some(peer) = self.members.get(&from) {
            if peer.incarnation == incarnation {
                self.on_member_frame(header, payload).await;
            } else {
                self.reject(Reject::Foreign(
                    "frame from another process with a member's id",
                ));
            }
        } else if self.departed.contains(&from) {
            tracing::debug!(from, "dropped a frame of a departed node");
        } else {
            self.on_unnamed_frame(incarnation, header, payload);
        }
    }

    /// A frame from a sender that addressed us before the core named it: delivered in order,
    /// duplicates dropped, as for a member (it cannot be acknowledged: we have no link to it).
    fn on_unnamed_frame(&mut self, incarnation: u64, header: Header, payload: Bytes) {
        let from = header.sender;
        let Some(sender) = self.unnamed.get_mut(&from) else {
            // Its hello came while `MAX_UNNAMED_SENDERS` others were tracked.
            tracing::warn!(
                from,
                "dropped a frame of a sender not named yet: too many of them"
            );
            self.shared.dropped_unnamed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if sender.incarnation != incarnation {
            self.reject(Reject::Foreign(
                "frame from another process with an unnamed sender's id",
            ));
            return;
        }
        sender.last_heard = Instant::now();
        if header.seq == 0 || sender.gone {
            return;
        }
        if !next_in_order(&mut sender.delivered, from, header.seq) {
            return;
        }
        match header.kind {
            Kind::Data => self.deliver(from, &payload),
            Kind::Goodbye => {
                tracing::info!(from, "a sender not named yet said goodbye");
                sender.gone = true;
            }
            Kind::Hello | Kind::Join | Kind::Heartbeat | Kind::Handshake => {}
        }
    }

    /// Whether the hello is accepted: the connection then speaks for its sender. While we
    /// join, the first hello addressed to our incarnation tells us our id.
    fn on_hello(&mut self, conn: u64, header: Header, payload: &[u8]) -> bool {
        let Some(hello) = Hello::decode(payload) else {
            self.reject(Reject::Malformed("bad hello"));
            return false;
        };
        if self.id.is_none()
            && hello.target_incarnation == self.incarnation
            && hello.target != NO_ID
            && hello.target != header.sender
        {
            self.learn_id(hello.target);
        }
        if header.sender == self.my_id() {
            self.reject(Reject::Malformed("hello from our own id"));
            return false;
        }
        if hello.target != self.my_id() || hello.target_incarnation != self.incarnation {
            self.reject(Reject::Foreign("hello meant for another node"));
            self.conns.insert(conn, Conn::Refused);
            return false;
        }
        if self.departed.contains(&header.sender) {
            tracing::debug!(from = header.sender, "hello from a departed node");
            self.conns.insert(conn, Conn::Refused);
            return false;
        }
        let now = Instant::now();
        let lost_after = self.lost_after;
        if let Some(peer) = self.members.get_mut(&header.sender) {
            if peer.incarnation != hello.incarnation {
                self.reject(Reject::Foreign(
                    "hello from another process with a member's id",
                ));
                self.conns.insert(conn, Conn::Refused);
                return false;
            }
            peer.heard(now, lost_after);
        } else if let Some(sender) = self.unnamed.get_mut(&header.sender) {
            if sender.incarnation != hello.incarnation {
                self.reject(Reject::Foreign(
                    "hello from another process with an unnamed sender's id",
                ));
                self.conns.insert(conn, Conn::Refused);
                return false;
            }
            sender.last_heard = now;
        } else if self.unnamed.len() < MAX_UNNAMED_SENDERS {
            tracing::debug!(from = header.sender, "hello from a sender not named yet");
            self.unnamed.insert(
                header.sender,
                Unnamed {
                    incarnation: hello.incarnation,
                    delivered: 0,
                    last_heard: now,
                    gone: false,
                },
            );
        } else {
            tracing::warn!(
                from = header.sender,
                "too many senders not named yet: its frames are dropped until it is named"
            );
        }
        self.conns.insert(
            conn,
            Conn::Speaks {
                sender: header.sender,
                incarnation: hello.incarnation,
            },
        );
        true
    }

    /// A member addressed us while we join: that is our id, and `start` returns.
    fn learn_id(&mut self, id: NodeId) {
        let Some(joining) = self.joining.take() else {
            return;
        };
        self.id = Some(id);
        tracing::info!(id, "a member addressed us: joined the cluster");
        let _ = joining.started.send(Ok(self.started(id)));
    }

    async fn on_member_frame(&mut self, header: Header, payload: Bytes) {
        let from = header.sender;
        let now = Instant::now();
        let Some(peer) = self.members.get_mut(&from) else {
            return;
        };
        peer.heard(now, self.lost_after);
        peer.on_ack(header.ack, now);
        if header.seq == 0 {
            return;
        }
        if !next_in_order(&mut peer.delivered, from, header.seq) {
            return;
        }
        let ack_now = peer.delivered - peer.acked >= ACK_EVERY;
        match header.kind {
            Kind::Data => self.deliver(from, &payload),
            Kind::Goodbye => {
                // Acknowledge everything, the goodbye included, so the leaver can stop.
                self.send_heartbeat(from).await;
                self.remove_member(from, "said goodbye");
                return;
            }
            Kind::Hello | Kind::Join | Kind::Heartbeat | Kind::Handshake => {}
        }
        if ack_now {
            self.send_heartbeat(from).await;
        }
    }

    /// Reports a well-formed join request to the core, every time it comes (the core
    /// deduplicates); whether it was well-formed, which authenticates a joiner's connection
    /// (see [`Engine::on_frame`]).
    fn on_join_request(&mut self, payload: &[u8]) -> bool {
        let Some(join) = Join::decode(payload) else {
            self.reject(Reject::Malformed("bad join request"));
            return false;
        };
        if join.addr.len() > MAX_ADDR_LEN
            || !matches!(join.addr.parse(), Ok(zeromq::Endpoint::Tcp(..)))
        {
            self.reject(Reject::Malformed("a join request without a tcp:// address"));
            return false;
        }
        if self.id.is_none() {
            tracing::debug!("a join request while we join ourselves");
            return true;
        }
        tracing::debug!(incarnation = join.nonce, addr = %join.addr, "join request");
        self.emit(TransportEvent::JoinRequest(Contact {
            incarnation: join.nonce,
            addr: join.addr,
        }));
        true
    }

    /// The core installed a view naming `named`: connect to the members we do not have. A
    /// member the view no longer names stays until its goodbye or its loss, as a leaver or a
    /// removed node must still hear the decision that removed it (and answer it).
    fn connect_members(&mut self, named: BTreeMap<NodeId, Contact>) {
        let Some(me) = self.id else {
            return;
        };
        if self.closing.is_some() {
            return;
        }
        let now = Instant::now();
        for (id, contact) in named {
            if id == me || self.departed.contains(&id) {
                continue;
            }
            if let Some(peer) = self.members.get(&id) {
                if peer.incarnation == contact.incarnation {
                    continue;
                }
                tracing::info!(peer = id, "a member is another process now; replacing it");
                if let Some(old) = self.members.remove(&id) {
                    self.retired.push((now + self.lost_after, old.link));
                }
            }
            // What an unnamed sender already delivered stays delivered.
            let unnamed = self
                .unnamed
                .remove(&id)
                .filter(|sender| sender.incarnation == contact.incarnation);
            let link = self.connect(LinkTarget::Peer(id), contact.addr.clone());
            // A newcomer may speak only once its own view is installed: grant it time for
            // that on top before calling it lost.
            let mut peer = Peer::new(
                contact.addr,
                contact.incarnation,
                link,
                now,
                self.lost_after * 2,
            );
            let gone = unnamed.as_ref().is_some_and(|sender| sender.gone);
            if let Some(sender) = unnamed {
                peer.delivered = sender.delivered;
            }
            tracing::debug!(peer = id, addr = %peer.addr, "connecting to a named member");
            self.members.insert(id, peer);
            if gone {
                self.remove_member(id, "said goodbye before it was named");
            }
        }
    }

    /// Forgets a member that left or was lost, and reports it `Left`.
    fn remove_member(&mut self, id: NodeId, why: &str) {
        let Some(peer) = self.members.remove(&id) else {
            return;
        };
        self.retired
            .push((Instant::now() + self.lost_after, peer.link));
        tracing::info!(node = self.my_id(), peer = id, why, "member left");
        self.shared.roster().depart(id);
        self.departed.insert(id);
        self.conns
            .retain(|_, conn| !matches!(conn, Conn::Speaks { sender, .. } if *sender == id));
        self.emit(TransportEvent::Left(id));
    }

    async fn on_link(&mut self, event: LinkEvent) {
        let now = Instant::now();
        match event {
            LinkEvent::Up {
                target: LinkTarget::Peer(id),
                epoch,
                send,
                session,
            } => {
                let my_id = self.my_id();
                let my_incarnation = self.incarnation;
                let codec = self.codec.clone();
                let Some(peer) = self.members.get_mut(&id) else {
                    return;
                };
                if !peer.link.connected(epoch, send, session, now) {
                    return;
                }
                peer.backoff = wait::RECONNECT_MIN;
                let hello = Hello {
                    target: id,
                    target_incarnation: peer.incarnation,
                    incarnation: my_incarnation,
                };
                let header = Header {
                    kind: Kind::Hello,
                    sender: my_id,
                    seq: 0,
                    ack: peer.delivered,
                };
                peer.acked = peer.delivered;
                tracing::debug!(peer = id, resending = peer.unacked.len(), "link up");
                // The hello, then everything not yet acknowledged: a reconnect loses nothing.
                let mut frames = vec![codec.encode(header, &hello.encode())];
                frames.extend(peer.unacked.iter().map(|(_, frame)| frame.clone()));
                for frame in frames {
                    if !peer.link.transmit(frame, peer.backoff).await {
                        break;
                    }
                }
            }
            LinkEvent::Up {
                target: LinkTarget::Contact,
                epoch,
                send,
                session,
            } => {
                let Some(joining) = &mut self.joining else {
                    return;
                };
                if joining.link.connected(epoch, send, session, now) {
                    self.send_join_request().await;
                }
            }
            LinkEvent::Down {
                target: LinkTarget::Peer(id),
                epoch,
            } => {
                if let Some(peer) = self.members.get_mut(&id) {
                    if peer.link.epoch() == Some(epoch) {
                        tracing::debug!(peer = id, "link down; reconnecting");
                        peer.link = Link::Down {
                            retry_at: now + peer.backoff,
                        };
                        peer.backoff = (peer.backoff * 2).min(wait::RECONNECT_MAX);
                    }
                }
            }
            LinkEvent::Down {
                target: LinkTarget::Contact,
                epoch,
            } => {
                if let Some(joining) = &mut self.joining {
                    if joining.link.epoch() == Some(epoch) {
                        joining.link = Link::Down {
                            retry_at: now + wait::JOIN_RETRY,
                        };
                    }
                }
            }
        }
    }

    async fn send_join_request(&mut self) {
        let header = Header {
            kind: Kind::Join,
            sender: NO_ID,
            seq: 0,
            ack: 0,
        };
        let join = Join {
            nonce: self.incarnation,
            addr: self.advertised.clone(),
        };
        let frame = self.codec.encode(header, &join.encode());
        if let Some(joining) = &mut self.joining {
            joining.link.transmit(frame, wait::JOIN_RETRY).await;
        }
    }

    /// Queues a frame in the reliable stream to `to` and sends it if the link is up (nothing
    /// if `to` is not a member).
    async fn send_reliable(&mut self, to: NodeId, kind: Kind, payload: &[u8]) {
        let sender = self.my_id();
        let codec = self.codec.clone();
        let Some(peer) = self.members.get_mut(&to) else {
            tracing::debug!(to, "dropped a frame for a departed peer");
            return;
        };
        let seq = peer.next_seq;
        peer.next_seq += 1;
        peer.acked = peer.delivered;
        let frame = codec.encode(
            Header {
                kind,
                sender,
                seq,
                ack: peer.delivered,
            },
            payload,
        );
        if peer.unacked.is_empty() {
            peer.last_progress = Instant::now();
        }
        peer.unacked.push_back((seq, frame.clone()));
        peer.link.transmit(frame, peer.backoff).await;
    }

    async fn send_heartbeat(&mut self, to: NodeId) {
        let sender = self.my_id();
        let codec = self.codec.clone();
        let Some(peer) = self.members.get_mut(&to) else {
            return;
        };
        peer.acked = peer.delivered;
        let frame = codec.encode(
            Header {
                kind: Kind::Heartbeat,
                sender,
                seq: 0,
                ack: peer.delivered,
            },
            &[],
        );
        peer.link.transmit(frame, peer.backoff).await;
    }

    async fn on_tick(&mut self) -> Flow {
        let now = Instant::now();
        if let Some(joining) = &mut self.joining {
            if now >= joining.deadline {
                let _ = joining.started.send(Err(ZmqError::JoinTimeout {
                    addr: joining.contact.clone(),
                    after: self.join_timeout,
                }));
                return Flow::Exit;
            }
            if let Link::Down { retry_at } = joining.link {
                if now >= retry_at {
                    let contact = joining.contact.clone();
                    let link = self.connect(LinkTarget::Contact, contact);
                    if let Some(joining) = &mut self.joining {
                        joining.link = link;
                    }
                }
            } else if now >= joining.next_try {
                joining.next_try = now + wait::JOIN_RETRY;
                self.send_join_request().await;
            }
            return Flow::Continue;
        }

        let lost: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(_, peer)| now.saturating_duration_since(peer.last_heard) > peer.patience)
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            tracing::warn!(peer = id, after = ?self.lost_after, "peer lost: silent too long");
            self.remove_member(id, "lost");
        }

        let retransmit_after = self.lost_after / 2;
        let mut reconnect = Vec::new();
        for (&id, peer) in &mut self.members {
            match peer.link {
                Link::Down { retry_at } if now >= retry_at => {
                    reconnect.push((id, peer.addr.clone()))
                }
                Link::Up { .. }
                    if !peer.unacked.is_empty()
                        && now.saturating_duration_since(peer.last_progress) > retransmit_after =>
                {
                    // Nothing acknowledged for long although the link is up: something was
                    // dropped on the way; resend, the receiver dedups.
                    tracing::debug!(peer = id, frames = peer.unacked.len(), "retransmitting");
                    peer.last_progress = now;
                    let frames: Vec<Bytes> = peer.unacked.iter().map(|(_, f)| f.clone()).collect();
                    for frame in frames {
                        if !peer.link.transmit(frame, peer.backoff).await {
                            break;
                        }
                    }
                }
                _ => {}
            }
        }
        for (id, addr) in reconnect {
            let link = self.connect(LinkTarget::Peer(id), addr);
            if let Some(peer) = self.members.get_mut(&id) {
                peer.link = link;
            }
        }

        if now >= self.next_heartbeat {
            self.next_heartbeat = now + self.heartbeat;
            let ids: Vec<NodeId> = self.members.keys().copied().collect();
            for id in ids {
                self.send_heartbeat(id).await;
            }
        }

        self.retired.retain(|(until, _)| now < *until);
        // A sender that names us heartbeats us; one silent for longer than its patience with a
        // newcomer has given up on us (or died), and resends nothing: its state can go.
        let patience = self.lost_after * 2;
        self.unnamed.retain(|&id, sender| {
            let keep = now.saturating_duration_since(sender.last_heard) <= patience;
            if !keep {
                tracing::debug!(from = id, "forgot a sender that was never named");
            }
            keep
        });
        Flow::Continue
    }

    /// Runs every queued command; stops at `Abort`, or when the synchronous side is gone.
    async fn drain_commands(&mut self) -> Flow {
        loop {
            let command = match self.commands.try_recv() {
                Ok(command) => command,
                Err(TryRecvError::Empty) => return Flow::Continue,
                Err(TryRecvError::Disconnected) => return Flow::Exit,
            };
            match command {
                Command::Send { to, frame } => {
                    if self.closing.is_none() {
                        self.send_reliable(to, Kind::Data, &frame).await;
                    }
                }
                Command::Connect(named) => self.connect_members(named),
                Command::Close => {
                    if self.closing.is_none() {
                        self.closing = Some(Instant::now() + self.lost_after);
                        let ids: Vec<NodeId> = self.members.keys().copied().collect();
                        tracing::info!(node = self.my_id(), "leaving");
                        for id in ids {
                            self.send_reliable(id, Kind::Goodbye, &[]).await;
                        }
                    }
                }
                Command::Abort => return Flow::Exit,
            }
        }
    }

    /// After close: done once every peer acknowledged our goodbye, or at the deadline.
    fn closed(&self) -> bool {
        let Some(deadline) = self.closing else {
            return false;
        };
        let acknowledged = self.members.values().all(|peer| peer.unacked.is_empty());
        if !acknowledged && Instant::now() < deadline {
            return false;
        }
        if !acknowledged {
            tracing::warn!("closing without every goodbye acknowledged");
        }
        true
    }
}
