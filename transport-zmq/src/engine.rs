//! The asynchronous half: one task on a current-thread tokio runtime owns every socket and all
//! membership state, so nothing here needs a lock except what the synchronous API reads.
//!
//! Inputs are messages from the listener's connections (see the `listener` module), link events (a DEALER connected or
//! broke), commands from the synchronous API (a crossbeam channel plus a [`Notify`] to wake
//! us) and a periodic tick (heartbeats, loss detection, retransmission, reconnects).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use bytes::Bytes;
use coherence_core::{NodeId, TransportEvent};
use crossbeam_channel::{Receiver, TryRecvError};
use futures::StreamExt;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use zeromq::{
    DealerSendHalf, DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend,
    ZmqMessage,
};

use crate::listener::{self, Context, Inbound, Limits};
use crate::session::Session;
use crate::wire::{Codec, Header, Hello, Join, Kind, MemberInfo, Reject, Welcome, NO_ID};
use crate::{ZmqError, ZmqStats};
use coherence_core::wait;

/// A receiver acknowledges at least every this many delivered frames, so a one-way stream
/// does not make the sender buffer frames for a whole heartbeat period.
const ACK_EVERY: u64 = 64;
/// Frames (and their bytes) held back in all, from senders not yet announced or while
/// joining; beyond that frames are dropped, and retransmitted later by their senders.
const MAX_HELD_FRAMES: usize = 4096;
const MAX_HELD_BYTES: usize = 256 << 20;
/// The sequence number of a welcome: always the first reliable frame to a joiner.
const WELCOME_SEQ: u64 = 1;
/// Messages buffered between the listener's connections and the engine; a full buffer stops
/// reading, which pushes back on senders through TCP.
const INBOUND_BUFFER: usize = 1024;

/// What the synchronous API asks of the engine.
#[derive(Debug)]
pub(crate) enum Command {
    Send { to: NodeId, frame: Vec<u8> },
    Close,
    Abort,
}

/// State shared with the synchronous API.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Current peers; `send` checks it so a departed peer is an error at once.
    pub members: RwLock<BTreeSet<NodeId>>,
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

    fn set_member(&self, id: NodeId, present: bool) {
        let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
        if present {
            members.insert(id);
        } else {
            members.remove(&id);
        }
    }
}

/// What `start` learns once the node has an id.
#[derive(Debug)]
pub(crate) struct Started {
    pub id: NodeId,
    pub peers: Vec<NodeId>,
    pub local_addr: String,
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

impl Link {
    fn epoch(&self) -> Option<u64> {
        match self {
            Link::Connecting { epoch, .. } | Link::Up { epoch, .. } => Some(*epoch),
            Link::Down { .. } => None,
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

    /// Drops what `ack` covers; `true` if that was anything.
    fn on_ack(&mut self, ack: u64, now: Instant) -> bool {
        let before = self.unacked.len();
        while self.unacked.front().is_some_and(|(seq, _)| *seq <= ack) {
            self.unacked.pop_front();
        }
        let progressed = self.unacked.len() != before;
        if progressed {
            self.last_progress = now;
        }
        progressed
    }
}

/// Frames from a sender that said hello before its announcement reached us.
struct Held {
    since: Instant,
    /// The incarnation the connection claimed, and the frame.
    frames: Vec<(u64, Header, Bytes)>,
}

/// Coordinator only: a joiner's welcome, waiting for members to acknowledge its announcement.
struct PendingWelcome {
    id: NodeId,
    nonce: u64,
    since: Instant,
    /// Members yet to acknowledge, with the sequence number of the announcement.
    waiting: BTreeMap<NodeId, u64>,
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

/// A node waiting for its welcome.
struct Joining {
    contact: String,
    link: Link,
    deadline: Instant,
    next_try: Instant,
    started: mpsc::UnboundedSender<Result<Started, ZmqError>>,
    /// Everything but the welcome (with its connection), replayed in order once we know our
    /// id.
    stash: Vec<(u64, Header, Bytes)>,
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
    /// `None` until welcomed.
    id: Option<NodeId>,
    next_id: NodeId,
    members: BTreeMap<NodeId, Peer>,
    departed: BTreeSet<NodeId>,
    /// Links to departed members, kept until the given time: zmq.rs only queues what we send
    /// for a writer task, and dropping a DEALER right after a send could lose the frame (the
    /// acknowledgement of a goodbye, whose sender then waited for it until its deadline).
    retired: Vec<(Instant, Link)>,
    /// The listener's connections that said hello, by connection number.
    conns: HashMap<u64, Conn>,
    held: BTreeMap<NodeId, Held>,
    /// Frames and bytes in `held` and in the joining stash, to bound them.
    held_frames: usize,
    held_bytes: usize,
    /// Coordinator only: join nonces already admitted, so a repeated request is not a new member.
    admitted: BTreeMap<u64, NodeId>,
    welcomes: Vec<PendingWelcome>,
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
            next_id: 0,
            members: BTreeMap::new(),
            departed: BTreeSet::new(),
            retired: Vec::new(),
            conns: HashMap::new(),
            held: BTreeMap::new(),
            held_frames: 0,
            held_bytes: 0,
            admitted: BTreeMap::new(),
            welcomes: Vec::new(),
            joining: None,
            closing: None,
            next_heartbeat: Instant::now(),
            next_epoch: 0,
        }
    }

    /// Founds a cluster (reporting at once) or starts joining one; `false` if already failed.
    fn start(&mut self, started: mpsc::UnboundedSender<Result<Started, ZmqError>>) -> bool {
        match self.join.clone() {
            None => {
                self.id = Some(0);
                self.next_id = 1;
                tracing::info!(addr = %self.advertised, "founded a cluster as node 0");
                started
                    .send(Ok(Started {
                        id: 0,
                        peers: Vec::new(),
                        local_addr: self.local_addr.clone(),
                    }))
                    .is_ok()
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
                    stash: Vec::new(),
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
    /// authenticates the connection: a hello we accept (while joining: any hello, checked once
    /// we are welcomed) or a join request.
    async fn on_frame(&mut self, conn: u64, header: Header, payload: Bytes) -> bool {
        let opens =
            header.kind == Kind::Hello || header.kind == Kind::Join && header.sender == NO_ID;
        if let Some(joining) = &mut self.joining {
            if header.kind == Kind::Welcome {
                self.on_welcome(header, &payload).await;
            } else if self.held_frames < MAX_HELD_FRAMES
                && self.held_bytes + payload.len() <= MAX_HELD_BYTES
            {
                self.held_frames += 1;
                self.held_bytes += payload.len();
                joining.stash.push((conn, header, payload));
            } else {
                tracing::warn!(from = header.sender, "too much traffic before our welcome");
            }
            return opens;
        }
        match header.kind {
            Kind::Hello => return self.on_hello(conn, header, &payload),
            Kind::Join if header.sender == NO_ID => return self.on_join_request(&payload).await,
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

    /// A frame from a connection that said hello as `header.sender`.
    async fn on_sender_frame(&mut self, incarnation: u64, header: Header, payload: Bytes) {
        if self.members.contains_key(&header.sender) {
            self.on_member_frame(header, payload).await;
        } else if self.departed.contains(&header.sender) {
            tracing::debug!(from = header.sender, "dropped a frame of a departed node");
        } else {
            // Not announced yet: keep it until the announcement, so `Joined` comes first.
            if self.held_frames < MAX_HELD_FRAMES
                && self.held_bytes + payload.len() <= MAX_HELD_BYTES
            {
                self.held_frames += 1;
                self.held_bytes += payload.len();
                let held = self.held.entry(header.sender).or_insert_with(|| Held {
                    since: Instant::now(),
                    frames: Vec::new(),
                });
                held.frames.push((incarnation, header, payload));
            } else {
                tracing::warn!(from = header.sender, "too many frames from unknown nodes");
            }
        }
    }

    /// Whether the hello is accepted: the connection then speaks for its sender.
    fn on_hello(&mut self, conn: u64, header: Header, payload: &[u8]) -> bool {
        let Some(hello) = Hello::decode(payload) else {
            self.reject(Reject::Malformed("bad hello"));
            return false;
        };
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
        let lost_after = self.lost_after;
        if let Some(peer) = self.members.get_mut(&header.sender) {
            if peer.incarnation != hello.incarnation {
                self.reject(Reject::Foreign(
                    "hello from another process with a member's id",
                ));
                self.conns.insert(conn, Conn::Refused);
                return false;
            }
            peer.heard(Instant::now(), lost_after);
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

    async fn on_member_frame(&mut self, header: Header, payload: Bytes) {
        let from = header.sender;
        let now = Instant::now();
        let Some(peer) = self.members.get_mut(&from) else {
            return;
        };
        peer.heard(now, self.lost_after);
        if peer.on_ack(header.ack, now) && !self.welcomes.is_empty() {
            self.send_due_welcomes().await;
        }
        let Some(peer) = self.members.get_mut(&from) else {
            return;
        };
        if header.seq == 0 {
            return;
        }
        if header.seq <= peer.delivered {
            tracing::trace!(from, seq = header.seq, "dropped a duplicate");
            return;
        }
        if header.seq != peer.delivered + 1 {
            // Cannot happen with FIFO links; the sender retransmits, so drop it.
            tracing::warn!(from, seq = header.seq, expected = peer.delivered + 1, "gap");
            return;
        }
        peer.delivered = header.seq;
        // The coordinator waits for announcements to be acknowledged before it welcomes.
        let ack_now = peer.delivered - peer.acked >= ACK_EVERY || header.kind == Kind::Announce;
        match header.kind {
            Kind::Data => {
                self.shared.frames_received.fetch_add(1, Ordering::Relaxed);
                self.emit(TransportEvent::Frame {
                    from,
                    bytes: payload.to_vec(),
                });
            }
            Kind::Goodbye => {
                // Acknowledge everything, the goodbye included, so the leaver can stop.
                self.send_heartbeat(from).await;
                self.remove_member(from, "said goodbye");
                return;
            }
            Kind::Join => {
                self.on_join_request(&payload).await;
            }
            Kind::Announce => match MemberInfo::decode(&payload) {
                Some(info) => self.add_member(info).await,
                None => self.reject(Reject::Malformed("bad announcement")),
            },
            // A repeated welcome: we were admitted already.
            Kind::Welcome | Kind::Hello | Kind::Heartbeat | Kind::Handshake => {}
        }
        if ack_now {
            self.send_heartbeat(from).await;
        }
    }

    /// The lowest live id coordinates joins; every member computes it from its own view.
    fn coordinator(&self) -> NodeId {
        let me = self.my_id();
        self.members
            .keys()
            .next()
            .map_or(me, |&first| first.min(me))
    }

    /// Whether the request was well-formed (which, from a joiner, authenticates its
    /// connection; see [`Engine::on_frame`]).
    async fn on_join_request(&mut self, payload: &[u8]) -> bool {
        let Some(join) = Join::decode(payload) else {
            self.reject(Reject::Malformed("bad join request"));
            return false;
        };
        if self.closing.is_some() {
            return true; // the joiner retries, and reaches someone else
        }
        let coordinator = self.coordinator();
        if coordinator != self.my_id() {
            self.send_reliable(coordinator, Kind::Join, payload).await;
            return true;
        }
        if let Some(id) = self.admitted.get(&join.nonce) {
            if self.members.contains_key(id) {
                // Already admitted: its welcome travels reliably, nothing to repeat.
                tracing::debug!(id, "repeated join request");
                return true;
            }
            // Admitted, then lost before it could speak: admit it afresh under a new id.
        }
        let id = self.next_id;
        let Some(next) = id.checked_add(1).filter(|&next| next != NO_ID) else {
            tracing::error!("node id space exhausted; join refused");
            return true;
        };
        self.next_id = next;
        self.admitted.insert(join.nonce, id);
        let info = MemberInfo {
            id,
            incarnation: join.nonce,
            addr: join.addr,
        };
        let mut announcement = Vec::new();
        info.encode_into(&mut announcement);
        let mut waiting = BTreeMap::new();
        let others: Vec<NodeId> = self.members.keys().copied().collect();
        for member in others {
            if let Some(seq) = self
                .send_reliable(member, Kind::Announce, &announcement)
                .await
            {
                waiting.insert(member, seq);
            }
        }
        tracing::info!(id, addr = %info.addr, "admitted a new member");
        self.add_member(info).await;
        if let Some(peer) = self.members.get_mut(&id) {
            // Sequence number 1 stays free for the welcome, which is sent last but must be
            // delivered first; the joiner holds back what comes before it.
            peer.next_seq = WELCOME_SEQ + 1;
        }
        self.welcomes.push(PendingWelcome {
            id,
            nonce: join.nonce,
            since: Instant::now(),
            waiting,
        });
        self.send_due_welcomes().await;
        true
    }

    /// Sends each pending welcome once every member acknowledged the announcement (so each
    /// queued `Joined` before the joiner's `start` returns), or left. A member silent for
    /// `lost_after` is as good as lost: the welcome does not wait longer than that, so the
    /// newcomer speaks before the other members' patience with it runs out.
    async fn send_due_welcomes(&mut self) {
        let members = &self.members;
        let now = Instant::now();
        let patience = self.lost_after;
        let mut due = Vec::new();
        self.welcomes.retain_mut(|pending| {
            pending.waiting.retain(|member, seq| {
                members.get(member).is_some_and(|peer| {
                    peer.unacked
                        .front()
                        .is_some_and(|(oldest, _)| oldest <= seq)
                })
            });
            let overdue = now.saturating_duration_since(pending.since) > patience;
            if overdue && !pending.waiting.is_empty() {
                tracing::warn!(
                    id = pending.id,
                    silent = ?pending.waiting.keys().collect::<Vec<_>>(),
                    "welcoming without every member's acknowledgement"
                );
            }
            let ready = pending.waiting.is_empty() || overdue;
            if ready {
                due.push((pending.id, pending.nonce));
            }
            !ready
        });
        for (id, nonce) in due {
            let mut members = vec![MemberInfo {
                id: self.my_id(),
                incarnation: self.incarnation,
                addr: self.advertised.clone(),
            }];
            members.extend(self.members.iter().filter(|(&member, _)| member != id).map(
                |(&id, peer)| MemberInfo {
                    id,
                    incarnation: peer.incarnation,
                    addr: peer.addr.clone(),
                },
            ));
            let welcome = Welcome {
                nonce,
                id,
                next_id: self.next_id,
                members,
            };
            let header = Header {
                kind: Kind::Welcome,
                sender: self.my_id(),
                seq: WELCOME_SEQ,
                ack: 0,
            };
            let frame = self.codec.encode(header, &welcome.encode());
            let Some(peer) = self.members.get_mut(&id) else {
                continue; // lost before it was welcomed
            };
            let now = Instant::now();
            if peer.unacked.is_empty() {
                peer.last_progress = now;
            }
            peer.last_heard = now;
            peer.unacked.push_front((WELCOME_SEQ, frame.clone()));
            peer.link.transmit(frame, peer.backoff).await;
        }
    }

    async fn on_welcome(&mut self, header: Header, payload: &[u8]) {
        let Some(welcome) = Welcome::decode(payload) else {
            self.reject(Reject::Malformed("bad welcome"));
            return;
        };
        if welcome.nonce != self.incarnation {
            tracing::debug!("a welcome for another joiner");
            return;
        }
        let Some(joining) = self.joining.take() else {
            return;
        };
        let now = Instant::now();
        let lost_after = self.lost_after;
        self.id = Some(welcome.id);
        self.next_id = welcome.next_id;
        for info in welcome.members {
            if info.id == welcome.id || self.members.contains_key(&info.id) {
                continue;
            }
            let link = self.connect(LinkTarget::Peer(info.id), info.addr.clone());
            self.members.insert(
                info.id,
                Peer::new(info.addr, info.incarnation, link, now, lost_after),
            );
            self.shared.set_member(info.id, true);
        }
        if let Some(coordinator) = self.members.get_mut(&header.sender) {
            coordinator.delivered = header.seq;
        }
        let peers: Vec<NodeId> = self.members.keys().copied().collect();
        tracing::info!(id = welcome.id, ?peers, "joined the cluster");
        let _ = joining.started.send(Ok(Started {
            id: welcome.id,
            peers,
            local_addr: self.local_addr.clone(),
        }));
        self.held_frames = 0;
        self.held_bytes = 0;
        for (conn, header, payload) in joining.stash {
            Box::pin(self.on_frame(conn, header, payload)).await;
        }
    }

    /// Adds an announced member: `Joined` first, then whatever it already sent us.
    async fn add_member(&mut self, info: MemberInfo) {
        let id = info.id;
        if Some(id) == self.id || self.members.contains_key(&id) || self.departed.contains(&id) {
            return;
        }
        self.next_id = self.next_id.max(id.saturating_add(1));
        let link = self.connect(LinkTarget::Peer(id), info.addr.clone());
        // A newcomer speaks only once welcomed, which the coordinator may delay by up to
        // `lost_after` (waiting for acknowledgements from a member that died): grant it that
        // much on top before calling it lost.
        let peer = Peer::new(
            info.addr,
            info.incarnation,
            link,
            Instant::now(),
            self.lost_after * 2,
        );
        self.members.insert(id, peer);
        self.shared.set_member(id, true);
        self.emit(TransportEvent::Joined(id));
        if let Some(held) = self.held.remove(&id) {
            self.release_held(&held);
            for (incarnation, header, payload) in held.frames {
                if incarnation == info.incarnation {
                    Box::pin(self.on_member_frame(header, payload)).await;
                } else {
                    self.reject(Reject::Foreign(
                        "frame from another process with a member's id",
                    ));
                }
            }
        }
    }

    fn release_held(&mut self, held: &Held) {
        self.held_frames -= held.frames.len();
        self.held_bytes -= held.frames.iter().map(|(_, _, p)| p.len()).sum::<usize>();
    }

    fn remove_member(&mut self, id: NodeId, why: &str) {
        let Some(peer) = self.members.remove(&id) else {
            return;
        };
        self.retired
            .push((Instant::now() + self.lost_after, peer.link));
        tracing::info!(node = self.my_id(), peer = id, why, "member left");
        self.shared.set_member(id, false);
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
                if peer.link.epoch() != Some(epoch) {
                    return;
                }
                let Link::Connecting { _task, .. } =
                    std::mem::replace(&mut peer.link, Link::Down { retry_at: now })
                else {
                    return;
                };
                peer.link = Link::Up {
                    epoch,
                    send,
                    session,
                    _task,
                };
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
                if joining.link.epoch() != Some(epoch) {
                    return;
                }
                let Link::Connecting { _task, .. } =
                    std::mem::replace(&mut joining.link, Link::Down { retry_at: now })
                else {
                    return;
                };
                joining.link = Link::Up {
                    epoch,
                    send,
                    session,
                    _task,
                };
                self.send_join_request().await;
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

    /// Queues a frame in the reliable stream to `to` and sends it if the link is up; returns
    /// its sequence number, `None` if `to` is not a member.
    async fn send_reliable(&mut self, to: NodeId, kind: Kind, payload: &[u8]) -> Option<u64> {
        let sender = self.my_id();
        let codec = self.codec.clone();
        let Some(peer) = self.members.get_mut(&to) else {
            tracing::debug!(to, "dropped a frame for a departed peer");
            return None;
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
        Some(seq)
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

        // A joiner cannot speak before its welcome: only its absence after that counts.
        let welcoming: BTreeSet<NodeId> = self.welcomes.iter().map(|w| w.id).collect();
        let lost: Vec<NodeId> = self
            .members
            .iter()
            .filter(|(id, peer)| {
                now.saturating_duration_since(peer.last_heard) > peer.patience
                    && !welcoming.contains(id)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in lost {
            tracing::warn!(peer = id, after = ?self.lost_after, "peer lost: silent too long");
            self.remove_member(id, "lost");
        }
        if !self.welcomes.is_empty() {
            // Members that left no longer hold a welcome back.
            self.send_due_welcomes().await;
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
                    // dropped on the way (e.g. held too long); resend, the receiver dedups.
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
        let lost_after = self.lost_after;
        let (expired, kept): (BTreeMap<NodeId, Held>, _) = std::mem::take(&mut self.held)
            .into_iter()
            .partition(|(_, held)| now.saturating_duration_since(held.since) > lost_after);
        self.held = kept;
        for (id, held) in expired {
            tracing::warn!(
                from = id,
                "dropped frames of a node that was never announced"
            );
            self.release_held(&held);
        }
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
                Command::Close => {
                    if self.closing.is_none() {
                        // Joiners we admitted get their welcome now, before our goodbye.
                        for pending in &mut self.welcomes {
                            pending.waiting.clear();
                        }
                        self.send_due_welcomes().await;
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
