//! ZeroMQ transport for coherence, on zmq.rs (pure Rust): nodes on different hosts form a
//! cluster over TCP.
//!
//! What this crate is for: connections, membership of the mesh, per-pair FIFO (sequence
//! numbers, acknowledgements, resends) and authentication. What it must not do: know anything
//! of tokens or objects, or take a protocol decision.
//!
//! # Shape
//! Each node listens on one TCP port and connects one zmq.rs DEALER to every peer's port; all
//! traffic from A to B goes over A's single DEALER to B, which is what makes frames of one
//! ordered pair arrive in order. On its port a node speaks the receiving side of ZMTP itself,
//! as a ROUTER would (see "Hostile networks" for why). zmq.rs is asynchronous: one task on a
//! current-thread tokio runtime owns every socket. The runtime has no thread of its own: whichever thread waits in
//! [`Transport::recv`] runs it (a node's driver, or a caller polling for its reply). A frame
//! thus goes from the socket to the protocol on one thread, as in a raw zmq.rs loop; a
//! hand-off to a runtime thread and back cost each round trip two thread wake-ups.
//! [`Transport::send`] queues the frame and returns: a thread waiting inside the runtime is
//! woken to write it, else the next `recv` does. A keeper thread drives the runtime when
//! nobody has for a few milliseconds (at once when a frame is sent then), so heartbeats,
//! joins and frames go on while no one receives.
//!
//! # Membership
//! Who is a member, and under which id, is decided by the core's view change, not here. A
//! node started without [`ZmqConfig::join`] founds a cluster and is node 0. A node started
//! with `join` sends a join request (its incarnation and advertised address, the same as its
//! [`Transport::contact`]) to that member every [`coherence_core::wait::JOIN_RETRY`]; the
//! member reports each one as [`TransportEvent::JoinRequest`] and assigns nothing. When the
//! core's view takes the joiner in, the members' cores name it in
//! [`Transport::connect_members`]; their transports connect to it, and the first hello
//! addressed to the joiner's incarnation tells it its id. [`ZmqTransport::start`] returns
//! then, with no peers (the core starts as an outsider), or fails with
//! [`ZmqError::JoinTimeout`] after [`ZmqConfig::join_timeout`]. A later hello naming our
//! incarnation with another id is refused.
//!
//! [`Transport::connect_members`] names the installed view's members: the transport connects
//! to each one it has no link to (giving a newcomer twice `lost_after` to be heard from). A
//! member the view no longer names stays until it says goodbye or is lost (then reported
//! [`TransportEvent::Left`] as any other): a leaver or a removed node must still hear the
//! decision that removed it. Frames from a
//! sender not named yet are delivered too, in order and without duplicates, if its connection
//! said a hello addressed to this node's id and incarnation: a joiner hears the decision that
//! takes it in from members it does not know yet, and a member may hear a newcomer before its
//! own core installed the view. Such a sender cannot be acknowledged before it is named (it
//! resends after a reconnect; duplicates are dropped); what was delivered from it stays
//! delivered once it is named. At most 64 such senders are tracked at a time (the frames of
//! more are dropped and counted in [`ZmqStats::dropped_unnamed`]); one silent for twice
//! `lost_after` is forgotten.
//!
//! Each new connection starts with a hello naming the sender, its incarnation (a random
//! number per process start) and the intended receiver; frames on that connection must come
//! from the sender it named. Reliable frames (data, goodbye) carry a per-pair
//! sequence number and are acknowledged (piggybacked on traffic and heartbeats); a DEALER
//! whose connection broke is re-created with backoff and resends everything unacknowledged,
//! and the receiver drops duplicates, so a reconnect neither loses nor reorders frames.
//!
//! [`Transport::close`] sends a goodbye after the last frame to every peer, waits (at most
//! [`ZmqConfig::lost_after`]) until every peer acknowledged it, and stops the runtime; peers
//! report [`TransportEvent::Left`] when they reach the goodbye. A named member silent (no
//! heartbeat, no traffic) for `lost_after` is reported `Left` as lost and sending to it fails
//! with [`TransportError::UnknownPeer`]; as we stop heartbeating it too, it drops us in turn.
//! Heartbeats, loss detection and `Left` concern named members only.
//!
//! ```no_run
//! use coherence_core::{Config, Node};
//! use transport_zmq::{ZmqConfig, ZmqTransport};
//!
//! let founding = ZmqTransport::start(ZmqConfig::new("tcp://127.0.0.1:0", "lab")).unwrap();
//! let contact = founding.local_addr();
//! // The founder's node answers join requests: its view change takes the joiner in.
//! let founder = Node::start(founding, Config::default()).unwrap();
//! let joiner = ZmqTransport::start(ZmqConfig {
//!     join: Some(contact),
//!     ..ZmqConfig::new("tcp://127.0.0.1:0", "lab")
//! })
//! .unwrap();
//! let node = Node::start(joiner, Config::default()).unwrap();
//! # drop((node, founder));
//! ```
//!
//! # Frame hygiene
//! Every frame carries a magic, a format version, a hash of the cluster id, its kind, sender,
//! sequencing and payload length (see the `wire` module), and is checked before it is
//! believed. A frame that is truncated, malformed, of another cluster or version, longer
//! than [`ZmqConfig::max_frame`] or not from a holder of the secret is dropped with a
//! `tracing` warning and counted in [`ZmqStats`]; it never stops the node.
//!
//! # Sessions
//! With a shared secret ([`ZmqConfig::secret`], see [`secret_from_env_or_file`]) every
//! connection starts with a Noise handshake, `Noise_NNpsk0_25519_AESGCM_BLAKE2s` through
//! the `snow` crate, in which both ends contribute a fresh X25519 ephemeral key. The pre-shared
//! key is HKDF-SHA256 of the secret (no salt, info `coherence-zmq noise psk\0` followed by the
//! cluster id) and the prologue is `coherence-zmq session, frame version 2`. The connecting
//! side sends the first handshake message as the payload of a handshake frame (the only frame
//! that crosses in clear), the listener answers with the second in a handshake frame, and from
//! then on every frame on that connection is encrypted and authenticated with AES-256-GCM
//! under the session's keys, with the nonce counter Noise keeps (a frame longer than a Noise
//! message is sealed as consecutive Noise messages in one ZeroMQ message).
//!
//! Traffic from A to B goes only over A's DEALER to B's listener, and B answers over its own
//! DEALER to A: so each direction of a pair has a session of its own, started by its sender,
//! and the listener never sends anything but the handshake's answer. A reconnect starts a new
//! session, and what was not acknowledged is sealed again in it: per-pair FIFO, resends and
//! duplicate detection work inside sessions as they did without them.
//!
//! # Threat model
//! What an attacker who can see, send and hold back packets on the network can do:
//!
//! | | without a secret | with a secret |
//! |---|---|---|
//! | eavesdrop | reads every frame: object values, members, addresses | sees that nodes talk, when, and how much (message lengths); not what |
//! | inject | anything: join, then read and write every object | nothing is believed: the handshake needs the PSK, frames need the session keys |
//! | replay | a recorded join is reported again (the core may take in a phantom member, which delays every member's shutdown until it is reported lost), a recorded hello speaks for a live member | a recorded first handshake message is answered, but nothing recorded opens in the new session: the connection is closed at its first sealed message ([`ZmqStats::rejected_replayed`]) |
//! | reorder, duplicate, alter | within TCP only if on the path; duplicates are dropped by sequence number | breaks the session's nonce or tag: the connection is closed and counted, the sender reconnects and resends |
//! | drop, delay, cut | frames wait for the reconnect and resend; a member unheard for `lost_after` is reported lost | the same: Noise hides content, not availability |
//! | connection floods | bounded: see "Hostile networks" | the same |
//! | huge frames | closed at the frame header, before the body is read or reserved | the same |
//!
//! Both ways, anyone who can reach the port can take the slots for connections that have not
//! authenticated yet (which delays joiners), and use bandwidth and CPU: keep the port
//! firewalled. A holder of the secret is a member in all but name: it can join, read and write
//! every object, impersonate any member in a hello, and (being able to answer handshakes) stand
//! in the middle between members. Sessions have no forward secrecy against it: whoever obtains
//! the secret later cannot decrypt a recorded session (its ephemeral keys are gone), but can
//! impersonate nodes from then on. Changing the secret means restarting every node with the
//! new one.
//!
//! Without a secret, anyone who reaches the port can join and then read and write every
//! object. So a node refuses to listen on an address other than loopback without one
//! ([`ZmqError::Insecure`]), unless [`ZmqConfig::insecure`] says that the network is trusted.
//!
//! # Hostile networks
//! Nothing a peer sends before it authenticated makes the node allocate more than a few KiB,
//! abort, panic or spin. A connection *authenticates* with its first frame: a hello the node
//! accepts or a join request (with a secret: after a Noise handshake, sealed in its session).
//! Until then:
//! - every frame it sends, ZMTP command or message, may be at most 4 KiB; a frame header that
//!   claims more closes the connection before any of the body is read or reserved (counted in
//!   [`ZmqStats::rejected_oversize`]), and so does a first message that does not authenticate
//!   (or, with a secret, a handshake message that does not open with the key);
//! - it has [`ZmqConfig::handshake_timeout`] (default 5 s) to authenticate, and at most
//!   [`ZmqConfig::max_unauthenticated`] (default 64) such connections are kept: one more closes
//!   the oldest ([`ZmqStats::dropped_unauthenticated`]);
//! - a failed accept (a full file table, EMFILE) pauses accepting for
//!   [`coherence_core::wait::ACCEPT_BACKOFF`] instead of failing again at once, and lowers that
//!   limit to three quarters of the connections then open, closing the oldest, so that a
//!   quarter of the descriptors they held stay free for members, joiners and the node's own
//!   outgoing connections ([`ZmqStats::accept_errors`]).
//!
//! Afterwards a frame may be as long as `max_frame` plus this transport's header (and, with a
//! secret, the Noise tags); one that claims more closes the connection too.
//!
//! Why the node speaks ZMTP itself on its port: zmq.rs 0.7 reserves the length a frame header
//! claims before it reads the body, and has no limit (one 103-byte message claiming 1 TiB made
//! the process abort); it has no handshake deadline, no limit of connections and no way to
//! close one peer of a ROUTER; and its accept loop retries a failed accept at once, which spun
//! a core while the file table was full. A node only *receives* on its port (its ROUTER never
//! sent), so that side of ZMTP 3.0 with the NULL mechanism is small: greeting and READY both
//! ways, then length-prefixed frames (with a secret, one answer to the Noise handshake goes
//! back). Writing it here puts every check before the bytes are believed, and lets the engine
//! decide which connection authenticated. The alternatives:
//! - a guard in front of zmq.rs that checks frame headers and forwards the bytes to the ROUTER
//!   on an internal address adds a hop (a copy, a socket, more descriptors per connection) to
//!   every frame, and still needs zmq.rs's accept loop not to spin on the internal side;
//! - a patched copy of zmq.rs with a size check before the reserve fixes only the allocation:
//!   the deadline, the limits and the accept loop need changes all through its ROUTER;
//! - libzmq (the `zmq` crate, `ZMQ_MAXMSGSIZE`) means a C library and a rewrite of the engine
//!   on another API.
//!
//! Measured on the 2-core VM of `docs/BENCHMARKS.md` ("Hostile networks"), before and after
//! in one session: write latency with spread tokens between two processes did not change
//! (update, 8 B: best pass 24.6 µs before, 24.2 µs after), and the in-process round trip
//! (`examples/round_trip.rs`) got faster, since a frame reaches the engine without zmq.rs's
//! ROUTER queues (8 B: 20.7 to 17.3 µs; 64 KiB: 61.2 to 49.7 µs; best of 5). The guard would
//! add its hop on top of the "before" figures; the patched copy would measure as "before"
//! and fix only the allocation. Neither was built.
//!
//! # Limits
//! Ids are assigned by the core's views, which never reuse one; this transport treats a member
//! that departed (left or lost) as gone for good, even if a later view names
//! its id again. A connection whose hello was refused (another node or process, a departed
//! sender) stays refused until it is made again: a member that a view names with another
//! incarnation than the one we had is heard once that process reconnects.
#![deny(missing_docs)]

mod engine;
#[doc(hidden)]
pub mod fuzzing;
mod listener;
mod session;
mod wire;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use std::collections::BTreeMap;

use coherence_core::{Contact, NodeId, Transport, TransportError, TransportEvent};
use crossbeam_channel::Sender;
use tokio::runtime::Runtime;
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, Notify};

use coherence_core::wait;

use crate::engine::{Command, Settings, Shared};
use crate::listener::{Limits, MAX_ADDR_LEN};
use crate::session::sealed_len;
use crate::wire::{Codec, HEADER_LEN};

/// Environment variable that [`secret_from_env_or_file`] reads when no file is given.
pub const SECRET_ENV: &str = "COHERENCE_SECRET";

/// Default [`ZmqConfig::max_frame`]: large values cross in one frame.
pub const DEFAULT_MAX_FRAME: usize = 64 << 20;

/// Extra time `start` and `close` allow the engine beyond its own deadlines.
const GRACE: Duration = Duration::from_secs(2);

/// How a [`ZmqTransport`] starts.
#[derive(Clone)]
pub struct ZmqConfig {
    /// Address to listen on, e.g. `tcp://127.0.0.1:0` (port 0 picks a free port; see
    /// [`ZmqTransport::local_addr`]).
    pub listen: String,
    /// Address announced to other members, when it differs from the bound one (e.g. when
    /// listening on `0.0.0.0` or behind a port mapping).
    pub advertise: Option<String>,
    /// Address of any running member to join through; `None` founds a new cluster.
    pub join: Option<String>,
    /// Name of the cluster; frames of other clusters are dropped.
    pub cluster_id: String,
    /// Shared secret; when set, every connection starts with a Noise handshake keyed with it
    /// and every frame is encrypted and authenticated in that connection's session (see
    /// "Threat model").
    pub secret: Option<Vec<u8>>,
    /// Largest frame accepted or sent, in bytes (payload of [`Transport::send`]).
    pub max_frame: usize,
    /// How long a silent peer stays a member before it is reported lost; also bounds `close`.
    pub lost_after: Duration,
    /// Interval of heartbeats (and acknowledgements); well below `lost_after`.
    pub heartbeat: Duration,
    /// How long a joiner's `start` waits for a member to address it (the view that takes it
    /// in is installed).
    pub join_timeout: Duration,
    /// How long a new incoming connection has to authenticate (ZMTP handshake, then a hello
    /// or a join request) before it is closed. Members do it within milliseconds; the limit
    /// is for strangers who connect and say nothing.
    pub handshake_timeout: Duration,
    /// Most incoming connections that have not authenticated yet; one more closes the oldest.
    /// Each costs a file descriptor and a few KiB, so keep it well below the open-file limit.
    pub max_unauthenticated: usize,
    /// Allows listening on an address other than loopback without a [`ZmqConfig::secret`].
    /// Without a secret anyone who reaches the port can join and then read or write every
    /// object, so that needs this explicit opt-out; see [`ZmqError::Insecure`].
    pub insecure: bool,
}

impl std::fmt::Debug for ZmqConfig {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqConfig")
            .field("listen", &self.listen)
            .field("advertise", &self.advertise)
            .field("join", &self.join)
            .field("cluster_id", &self.cluster_id)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("max_frame", &self.max_frame)
            .field("lost_after", &self.lost_after)
            .field("heartbeat", &self.heartbeat)
            .field("join_timeout", &self.join_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_unauthenticated", &self.max_unauthenticated)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl ZmqConfig {
    /// A founding node's configuration with the default limits; set `join` to join instead.
    pub fn new(listen: impl Into<String>, cluster_id: impl Into<String>) -> ZmqConfig {
        ZmqConfig {
            listen: listen.into(),
            advertise: None,
            join: None,
            cluster_id: cluster_id.into(),
            secret: None,
            max_frame: DEFAULT_MAX_FRAME,
            lost_after: Duration::from_secs(3),
            heartbeat: Duration::from_millis(200),
            join_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
            max_unauthenticated: 64,
            insecure: false,
        }
    }

    fn validate(&self) -> Result<(), ZmqError> {
        let invalid = |why: &str| Err(ZmqError::InvalidConfig(why.to_owned()));
        for addr in [
            Some(&self.listen),
            self.join.as_ref(),
            self.advertise.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !matches!(addr.parse(), Ok(zeromq::Endpoint::Tcp(..))) {
                return invalid(&format!("{addr:?} is not a tcp:// endpoint"));
            }
            if addr.len() > MAX_ADDR_LEN {
                return invalid(&format!("an address is longer than {MAX_ADDR_LEN} bytes"));
            }
        }
        if self.cluster_id.is_empty() {
            return invalid("empty cluster_id");
        }
        if self.secret.as_ref().is_some_and(Vec::is_empty) {
            return invalid("empty secret");
        }
        if self.max_frame == 0 || self.max_frame > u32::MAX as usize - HEADER_LEN {
            return invalid("max_frame must be between 1 byte and 4 GiB");
        }
        if self.heartbeat.is_zero() || self.lost_after < self.heartbeat * 3 {
            return invalid("heartbeat must be positive and at most a third of lost_after");
        }
        if self.handshake_timeout.is_zero() || self.max_unauthenticated == 0 {
            return invalid("handshake_timeout and max_unauthenticated must be positive");
        }
        if self.secret.is_none() && !self.insecure && !is_loopback(&self.listen) {
            return Err(ZmqError::Insecure {
                addr: self.listen.clone(),
            });
        }
        Ok(())
    }
}

/// Whether a `tcp://` endpoint is on loopback: a 127.0.0.0/8 or ::1 address, or `localhost`.
/// Any other name may resolve to a reachable address, so it counts as not loopback.
fn is_loopback(endpoint: &str) -> bool {
    match endpoint.parse() {
        Ok(zeromq::Endpoint::Tcp(zeromq::Host::Ipv4(ip), _)) => ip.is_loopback(),
        Ok(zeromq::Endpoint::Tcp(zeromq::Host::Ipv6(ip), _)) => {
            std::net::IpAddr::V6(ip).to_canonical().is_loopback()
        }
        Ok(zeromq::Endpoint::Tcp(zeromq::Host::Domain(name), _)) => {
            name.eq_ignore_ascii_case("localhost")
        }
        _ => false,
    }
}

impl Default for ZmqConfig {
    /// Founds the cluster "coherence" on a free loopback port.
    fn default() -> ZmqConfig {
        ZmqConfig::new("tcp://127.0.0.1:0", "coherence")
    }
}

/// Why a [`ZmqTransport`] could not start, or a secret could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ZmqError {
    /// The configuration is inconsistent (the message says which field).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The listen address could not be bound (in use, not local, a name that does not resolve).
    #[error("cannot bind {addr}: {reason}")]
    Bind {
        /// The listen address.
        addr: String,
        /// What the operating system (or the name lookup) reported.
        reason: String,
    },
    /// The tokio runtime or the keeper thread could not be created.
    #[error("cannot start the ZeroMQ runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// No member addressed this joiner in time: the contact is unreachable, uses another
    /// cluster id or secret (it then drops our request and counts it), or its cluster's view
    /// did not take us in.
    #[error(
        "no member addressed us within {after:?} after our join requests to {addr}: unreachable, \
         another cluster id or secret, or no view took us in"
    )]
    JoinTimeout {
        /// The address we tried to join through.
        addr: String,
        /// The configured join timeout.
        after: Duration,
    },
    /// The engine stopped, or did not report, within `join_timeout` and a grace period.
    #[error("the ZeroMQ engine stopped or hung during start-up")]
    StartUp,
    /// The secret file could not be read.
    #[error("cannot read the secret file {path}: {source}")]
    SecretFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The secret file or variable is empty: an empty key would authenticate nothing.
    #[error("the secret is empty")]
    EmptySecret,
    /// Asked to listen on an address other than loopback without a secret: anyone who can
    /// reach it could join the cluster and read or change every object.
    #[error(
        "refusing to listen on {addr} without a secret: anyone who can reach it could join the \
         cluster and read or change every object. Give every node the same secret \
         (ZmqConfig::secret, e.g. from a secret file or COHERENCE_SECRET), or, on a network \
         you trust, opt out explicitly (ZmqConfig::insecure; --insecure in the demo)"
    )]
    Insecure {
        /// The listen address.
        addr: String,
    },
}

/// Reads the cluster secret from `path` (the `--secret-file` of a program) or, without a
/// path, from the environment variable [`SECRET_ENV`]; `Ok(None)` when neither is given.
///
/// A file's trailing line break (`\n` or `\r\n`) is not part of the secret, so `echo` can
/// write one; the rest is used as raw bytes.
pub fn secret_from_env_or_file(path: Option<&Path>) -> Result<Option<Vec<u8>>, ZmqError> {
    let secret = match path {
        Some(path) => {
            let mut bytes = std::fs::read(path).map_err(|source| ZmqError::SecretFile {
                path: path.to_owned(),
                source,
            })?;
            if bytes.ends_with(b"\n") {
                bytes.pop();
                if bytes.ends_with(b"\r") {
                    bytes.pop();
                }
            }
            bytes
        }
        None => match std::env::var_os(SECRET_ENV) {
            Some(value) => value.into_encoded_bytes(),
            None => return Ok(None),
        },
    };
    if secret.is_empty() {
        return Err(ZmqError::EmptySecret);
    }
    Ok(Some(secret))
}

/// Counters of one endpoint, for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZmqStats {
    /// Frames accepted by [`Transport::send`].
    pub frames_sent: u64,
    /// Data frames delivered to [`Transport::recv`].
    pub frames_received: u64,
    /// Frames dropped as truncated, inconsistent or against the protocol's rules.
    pub rejected_malformed: u64,
    /// Frames dropped for another magic, version or cluster id, or meant for another node.
    pub rejected_foreign: u64,
    /// Frames and connections refused for not coming from a holder of the secret: a failed
    /// Noise handshake (another secret or cluster id), a frame where the handshake belongs,
    /// or a frame of a node with a secret to one without.
    pub rejected_unauthenticated: u64,
    /// Sealed messages that did not decrypt under their connection's session, each closing
    /// its connection: replayed from an earlier session (a recorded join, say) or from
    /// earlier in the same one, reordered, or altered on the way.
    pub rejected_replayed: u64,
    /// Frames dropped for exceeding `max_frame`, and connections closed for a frame header
    /// that claims more than their limit (before it authenticated: a few KiB).
    pub rejected_oversize: u64,
    /// Incoming connections closed before they authenticated: not within
    /// `handshake_timeout`, or to make room for a newer one (`max_unauthenticated`, a full
    /// file table).
    pub dropped_unauthenticated: u64,
    /// Frames dropped from senders that addressed this node before the core named them,
    /// because as many such senders as this transport keeps track of (64) were tracked.
    pub dropped_unnamed: u64,
    /// Failed accepts, typically for a full file table; each pauses accepting for a moment.
    pub accept_errors: u64,
}

/// Runs the tokio runtime on the threads that call in; see the crate documentation.
struct Driver {
    /// `Some` until dropped: the runtime is shut down without blocking, which is allowed
    /// even inside another runtime.
    runtime: Option<Runtime>,
    /// Threads inside the runtime for `start`, `send`, `recv` or `close`.
    driving: AtomicUsize,
    /// Counts entries, so the keeper sees whether anyone drove since its last look.
    entries: AtomicU64,
    /// `entries` as of the keeper's last look.
    seen: AtomicU64,
    /// The keeper thread, for `send_soon` to wake.
    keeper: OnceLock<std::thread::Thread>,
    /// Set while the keeper drives; a thread that enters then asks it to hand over.
    keeper_driving: AtomicBool,
    /// Ends the keeper's slice early.
    handover: Notify,
    /// Tells the keeper thread to end.
    stopping: AtomicBool,
}

impl Driver {
    fn new() -> Result<Driver, ZmqError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ZmqError::Runtime)?;
        Ok(Driver {
            runtime: Some(runtime),
            driving: AtomicUsize::new(0),
            entries: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            keeper: OnceLock::new(),
            keeper_driving: AtomicBool::new(false),
            handover: Notify::new(),
            stopping: AtomicBool::new(false),
        })
    }

    fn runtime(&self) -> &Runtime {
        self.runtime
            .as_ref()
            .unwrap_or_else(|| unreachable!("the runtime lives until the driver is dropped"))
    }

    /// Runs the runtime on this thread until `future` is done. Inside another runtime, where
    /// `block_on` is not allowed (a caller in async code), a helper thread does it.
    fn run<F>(&self, future: F) -> Result<F::Output, TransportError>
    where
        F: Future + Send,
        F::Output: Send,
    {
        if tokio::runtime::Handle::try_current().is_err() {
            return Ok(self.block_on(future));
        }
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("coherence-zmq-drive".into())
                .spawn_scoped(scope, || self.block_on(future))
                .map_err(|e| TransportError::Io(format!("cannot start a thread: {e}")))?
                .join()
                .map_err(|_| TransportError::Io("the ZeroMQ runtime panicked".into()))
        })
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.driving.fetch_add(1, Ordering::SeqCst);
        self.entries.fetch_add(1, Ordering::Relaxed);
        if self.keeper_driving.load(Ordering::SeqCst) {
            self.handover.notify_one();
        }
        let output = self.runtime().block_on(future);
        self.driving.fetch_sub(1, Ordering::SeqCst);
        output
    }

    /// After a send: if nobody has driven the runtime since the keeper's last look (no one
    /// receives), wake the keeper to send the frame now rather than at its next look.
    /// Otherwise whoever drives next sends it, and one waiting inside the runtime is woken by
    /// the command itself.
    fn send_soon(&self) {
        if self.idle() && self.entries.load(Ordering::Relaxed) == self.seen.load(Ordering::Relaxed)
        {
            if let Some(keeper) = self.keeper.get() {
                keeper.unpark();
            }
        }
    }

    /// Whether no thread drives the runtime right now.
    fn idle(&self) -> bool {
        self.driving.load(Ordering::SeqCst) == 0
    }

    /// The keeper thread: drives the runtime in slices while nobody else has for a look.
    fn keep(&self) {
        while !self.stopping.load(Ordering::Acquire) {
            std::thread::park_timeout(wait::KEEPER_LOOK);
            let entries = self.entries.load(Ordering::Relaxed);
            if self.seen.swap(entries, Ordering::Relaxed) != entries
                || !self.idle()
                || self.stopping.load(Ordering::Acquire)
            {
                continue;
            }
            // Announce first, then check again: a thread entering at the same time either
            // sees the flag and ends the slice, or is seen here.
            self.keeper_driving.store(true, Ordering::SeqCst);
            if self.idle() {
                self.runtime().block_on(async {
                    tokio::select! {
                        () = tokio::time::sleep(wait::KEEPER_SLICE) => {}
                        () = self.handover.notified() => {}
                    }
                });
            }
            self.keeper_driving.store(false, Ordering::SeqCst);
            self.seen
                .store(self.entries.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            // Cancels what is left (socket tasks, DEALERs), closing every socket.
            runtime.shutdown_background();
        }
    }
}

/// One node's endpoint. Closing or dropping it leaves the cluster.
pub struct ZmqTransport {
    id: NodeId,
    /// How members reach this process.
    contact: Contact,
    /// Started with [`ZmqConfig::join`]: a member of a running cluster takes it in.
    joining: bool,
    local_addr: String,
    max_frame: usize,
    lost_after: Duration,
    shared: Arc<Shared>,
    commands: Sender<Command>,
    inbox: Mutex<mpsc::UnboundedReceiver<TransportEvent>>,
    driver: Arc<Driver>,
    engine: Mutex<Option<tokio::task::JoinHandle<()>>>,
    keeper: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
}

impl std::fmt::Debug for ZmqTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZmqTransport")
            .field("id", &self.id)
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl ZmqTransport {
    /// Binds, then founds a cluster or joins one; returns once this node has its id.
    pub fn start(cfg: ZmqConfig) -> Result<ZmqTransport, ZmqError> {
        cfg.validate()?;
        let joining = cfg.join.is_some();
        let largest = HEADER_LEN + cfg.max_frame;
        let settings = Settings {
            codec: Codec::new(&cfg.cluster_id, cfg.secret.as_deref(), cfg.max_frame),
            listen: cfg.listen,
            advertise: cfg.advertise,
            join: cfg.join,
            heartbeat: cfg.heartbeat,
            lost_after: cfg.lost_after,
            join_timeout: cfg.join_timeout,
            limits: Limits {
                handshake_timeout: cfg.handshake_timeout,
                max_unauthenticated: cfg.max_unauthenticated,
                max_message: if cfg.secret.is_some() {
                    sealed_len(largest)
                } else {
                    largest
                },
            },
        };
        let driver = Arc::new(Driver::new()?);
        let shared = Arc::new(Shared::default());
        let (commands_tx, commands_rx) = crossbeam_channel::unbounded();
        let (inbox_tx, inbox_rx) = mpsc::unbounded_channel();
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let engine = driver.runtime().spawn(engine::run(
            settings,
            Arc::clone(&shared),
            commands_rx,
            inbox_tx,
            started_tx,
        ));
        // The engine reports once it has an id; dropping the driver on failure ends it.
        let started = driver
            .run(async { tokio::time::timeout(cfg.join_timeout + GRACE, started_rx.recv()).await })
            .map_err(|e| ZmqError::Runtime(std::io::Error::other(e.to_string())))?;
        let started = match started {
            Ok(Some(Ok(started))) => started,
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) | Err(_) => return Err(ZmqError::StartUp),
        };
        let keeper_driver = Arc::clone(&driver);
        let keeper = std::thread::Builder::new()
            .name("coherence-zmq-keeper".into())
            .spawn(move || keeper_driver.keep())
            .map_err(ZmqError::Runtime)?;
        let _ = driver.keeper.set(keeper.thread().clone());
        tracing::debug!(id = started.id, addr = %started.local_addr, "ZeroMQ transport started");
        Ok(ZmqTransport {
            id: started.id,
            contact: started.contact,
            joining,
            local_addr: started.local_addr,
            max_frame: cfg.max_frame,
            lost_after: cfg.lost_after,
            shared,
            commands: commands_tx,
            inbox: Mutex::new(inbox_rx),
            driver,
            engine: Mutex::new(Some(engine)),
            keeper: Mutex::new(Some(keeper)),
            closed: AtomicBool::new(false),
        })
    }

    /// The address the node listens on, with the real port when the config said port 0.
    pub fn local_addr(&self) -> String {
        self.local_addr.clone()
    }

    /// A snapshot of this endpoint's counters.
    pub fn stats(&self) -> ZmqStats {
        self.shared.stats()
    }

    /// The current members other than this node, lowest id first: those named by
    /// [`Transport::connect_members`] and not gone since, which [`Transport::send`] accepts
    /// frames for. For monitoring and tests.
    pub fn members(&self) -> Vec<NodeId> {
        self.shared.members()
    }

    /// Stops at once without a goodbye, as a crash would: peers report this node lost after
    /// `lost_after`. For fault-injection tests; use [`Transport::close`] to leave.
    pub fn abort(&self) {
        self.stop(Command::Abort);
    }

    /// Hands `command` to the engine once, drives the runtime until the engine ends (bounded),
    /// and stops the keeper.
    fn stop(&self, command: Command) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let _ = self.commands.send(command);
        self.shared.wake.notify_one();
        if let Some(engine) = take(&self.engine) {
            // close waits at most lost_after for acknowledgements; never wait forever on top.
            let limit = self.lost_after + GRACE;
            // The timer must be made inside the runtime.
            match self
                .driver
                .run(async move { tokio::time::timeout(limit, engine).await })
            {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(_))) => tracing::error!(id = self.id, "the ZeroMQ engine panicked"),
                Ok(Err(_)) => {
                    tracing::error!(id = self.id, "the ZeroMQ engine did not stop; cancelled")
                }
                Err(e) => tracing::error!(id = self.id, error = %e, "cannot stop the engine"),
            }
        }
        self.driver.stopping.store(true, Ordering::Release);
        self.driver.handover.notify_one();
        if let Some(keeper) = take(&self.keeper) {
            keeper.thread().unpark();
            if keeper.join().is_err() {
                tracing::error!(id = self.id, "the ZeroMQ keeper thread panicked");
            }
        }
    }
}

/// Takes what `slot` holds; a panic elsewhere while it was locked does not matter to a take.
fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(PoisonError::into_inner).take()
}

impl Transport for ZmqTransport {
    fn local_id(&self) -> NodeId {
        self.id
    }

    /// Always empty: a founder starts alone, and a joiner starts as an outsider whom the
    /// core's view takes in ([`Transport::connect_members`] then names the members).
    fn peers(&self) -> Vec<NodeId> {
        Vec::new()
    }

    fn joins_running_cluster(&self) -> bool {
        self.joining
    }

    fn max_frame(&self) -> usize {
        self.max_frame
    }

    /// This process's incarnation and advertised address (what a joiner sends in its join
    /// request).
    fn contact(&self) -> Option<Contact> {
        Some(self.contact.clone())
    }

    /// Names the members at once for [`Transport::send`], then has the engine connect to the
    /// new ones (before any frame sent after this call).
    fn connect_members(&self, members: &BTreeMap<NodeId, Contact>) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        self.shared.roster().name(self.id, members);
        if self
            .commands
            .send(Command::Connect(members.clone()))
            .is_ok()
        {
            self.shared.wake.notify_one();
            self.driver.send_soon();
        }
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        if frame.len() > self.max_frame {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: self.max_frame,
            });
        }
        if !self.shared.is_member(to) {
            return Err(TransportError::UnknownPeer(to));
        }
        self.commands
            .send(Command::Send { to, frame })
            .map_err(|_| TransportError::Closed)?;
        self.shared.wake.notify_one();
        self.shared.frames_sent.fetch_add(1, Ordering::Relaxed);
        self.driver.send_soon();
        Ok(())
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        let mut inbox = self.inbox.lock().unwrap_or_else(PoisonError::into_inner);
        match inbox.try_recv() {
            Ok(event) => return Ok(Some(event)),
            Err(TryRecvError::Disconnected) => return Err(TransportError::Closed),
            Err(TryRecvError::Empty) => {}
        }
        let inbox = &mut *inbox;
        let received = self.driver.run(async move {
            if !timeout.is_zero() {
                return tokio::time::timeout(timeout, inbox.recv()).await.ok();
            }
            // Let the runtime poll the sockets and run what became ready, without waiting.
            for _ in 0..wait::RUNTIME_ROUNDS {
                tokio::task::yield_now().await;
                match inbox.try_recv() {
                    Ok(event) => return Some(Some(event)),
                    Err(TryRecvError::Disconnected) => return Some(None),
                    Err(TryRecvError::Empty) => {}
                }
            }
            None
        })?;
        match received {
            Some(Some(event)) => Ok(Some(event)),
            // The engine ended: the transport was closed or failed.
            Some(None) => Err(TransportError::Closed),
            None => Ok(None),
        }
    }

    /// Says goodbye after the last frame, waits (at most `lost_after`) for peers to
    /// acknowledge it, and stops the runtime.
    fn close(&self) {
        self.stop(Command::Close);
    }
}

impl Drop for ZmqTransport {
    /// A dropped endpoint leaves properly, like `close`.
    fn drop(&mut self) {
        self.close();
    }
}
