//! The transports under test: building clusters of endpoints, the raw ping-pong floor, and
//! clusters of started nodes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use coherence_core::{Config, Node, NodeId, Transport, TransportEvent};
use transport_zmq::{ZmqConfig, ZmqTransport};

use crate::report::{Latency, RoundTrip};
use crate::Budget;

/// How long a raw receive may wait for a frame before the measurement gives up.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(10);

/// One endpoint, ready for `Node::start` or raw use.
pub type Endpoint = Box<dyn Transport>;

/// A transport that builds clusters inside this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// `transport-local`: crossbeam channels between threads.
    Local,
    /// `transport-zmq`: ROUTER/DEALER over TCP loopback, driven by the threads that receive.
    Zmq,
}

/// Distinguishes the ZeroMQ clusters of one run.
static CLUSTERS: AtomicU64 = AtomicU64::new(0);

impl Net {
    /// The name in reports and file names.
    pub fn name(self) -> &'static str {
        match self {
            Net::Local => "local",
            Net::Zmq => "zmq",
        }
    }

    /// `n` endpoints of one new cluster for raw frames (no node), ids `0..n`.
    pub fn endpoints(self, n: usize) -> Result<Vec<Endpoint>, String> {
        match self {
            Net::Local => Ok(transport_local::cluster(n)
                .into_iter()
                .map(|t| Box::new(t) as Endpoint)
                .collect()),
            Net::Zmq => {
                zmq_mesh(n).map(|ts| ts.into_iter().map(|t| Box::new(t) as Endpoint).collect())
            }
        }
    }

    /// `n` started nodes of one new cluster, ids `0..n`. Over ZeroMQ each joins through the
    /// founder once the node before it runs: the founder's node takes it in.
    pub fn cluster(self, n: usize, config: &Config) -> Result<Cluster, String> {
        let start = |t: Endpoint| Node::start(t, config.clone()).map_err(|e| e.to_string());
        let nodes = match self {
            Net::Local => transport_local::cluster(n)
                .into_iter()
                .map(|t| start(Box::new(t)))
                .collect::<Result<_, _>>()?,
            Net::Zmq => {
                let base = zmq_base();
                let founder =
                    ZmqTransport::start(base.clone()).map_err(|e| format!("zmq founder: {e}"))?;
                let join = founder.local_addr();
                let mut nodes = vec![start(Box::new(founder))?];
                for i in 1..n {
                    let t = ZmqTransport::start(ZmqConfig {
                        join: Some(join.clone()),
                        ..base.clone()
                    })
                    .map_err(|e| format!("zmq joiner {i}: {e}"))?;
                    nodes.push(start(Box::new(t))?);
                }
                nodes
            }
        };
        Ok(Cluster { nodes })
    }

    /// The raw round trips of this transport: frames through `send`/`recv` between two
    /// threads, one echoing, at every size in `sizes`.
    pub fn round_trips(self, sizes: &[usize], budget: Budget) -> Result<Vec<RoundTrip>, String> {
        let mut out = Vec::new();
        match self {
            Net::Local => {
                for &size in sizes {
                    let [a, b] = pair(transport_local::cluster(2))?;
                    let latency = ping_pong(&a, &b, size, budget)?;
                    out.push(trip(size, "send/recv, threads of one process", latency));
                }
            }
            Net::Zmq => {
                let [a, b] = pair(zmq_mesh(2)?)?;
                for &size in sizes {
                    let latency = ping_pong(&a, &b, size, budget)?;
                    out.push(trip(size, "send/recv, threads of one process", latency));
                }
                // Each close waits for the other's acknowledgement: close both at once.
                std::thread::scope(|s| {
                    s.spawn(|| a.close());
                    s.spawn(|| b.close());
                });
            }
        }
        Ok(out)
    }
}

fn trip(size_bytes: usize, mode: &str, latency: Latency) -> RoundTrip {
    RoundTrip {
        size_bytes,
        mode: mode.to_string(),
        latency,
    }
}

fn pair<T>(transports: Vec<T>) -> Result<[T; 2], String> {
    transports
        .try_into()
        .map_err(|_| "expected two endpoints".to_string())
}

/// The configuration of a new ZeroMQ cluster on loopback, with an id of its own.
fn zmq_base() -> ZmqConfig {
    let cluster_id = format!(
        "bench-{}-{}",
        std::process::id(),
        CLUSTERS.fetch_add(1, Ordering::Relaxed)
    );
    ZmqConfig::new("tcp://127.0.0.1:0", cluster_id)
}

/// `n` ZeroMQ endpoints on loopback for raw frames: the first founds the cluster, the others
/// join through it, and with no node to decide views this plays the members' part: each
/// joiner gets the next id and every member is told of it (`connect_members`).
fn zmq_mesh(n: usize) -> Result<Vec<ZmqTransport>, String> {
    let base = zmq_base();
    let founder = ZmqTransport::start(base.clone()).map_err(|e| format!("zmq founder: {e}"))?;
    let join = founder.local_addr();
    let mut view = BTreeMap::from([(0, founder.contact().ok_or("the founder has no contact")?)]);
    let mut out = vec![founder];
    for i in 1..n {
        let cfg = ZmqConfig {
            join: Some(join.clone()),
            ..base.clone()
        };
        let starting = std::thread::spawn(move || ZmqTransport::start(cfg));
        let contact = loop {
            match out[0].recv(RECV_TIMEOUT) {
                Ok(Some(TransportEvent::JoinRequest(contact))) => break contact,
                Ok(Some(_)) => {}
                Ok(None) => return Err(format!("zmq joiner {i} never asked to join")),
                Err(e) => return Err(format!("zmq founder: {e}")),
            }
        };
        view.insert(i as NodeId, contact);
        for member in &out {
            member.connect_members(&view);
        }
        let t = starting
            .join()
            .map_err(|_| format!("zmq joiner {i} panicked"))?
            .map_err(|e| format!("zmq joiner {i}: {e}"))?;
        t.connect_members(&view);
        out.push(t);
    }
    Ok(out)
}

/// Waits for the next frame, skipping membership events.
pub fn next_frame(t: &dyn Transport) -> Result<(NodeId, Vec<u8>), String> {
    let deadline = Instant::now() + RECV_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no frame within {RECV_TIMEOUT:?}"));
        }
        match t.recv(left) {
            Ok(Some(TransportEvent::Frame { from, bytes })) => return Ok((from, bytes)),
            Ok(_) => {}
            Err(e) => return Err(format!("receive: {e}")),
        }
    }
}

/// Round trips of `size`-byte frames from `pinger` to `peer` and back (the best of the
/// budget's passes); every send is a fresh copy, as a serialized frame would be. Ends the
/// echo with an empty frame.
pub fn ping(
    pinger: &dyn Transport,
    peer: NodeId,
    size: usize,
    budget: Budget,
) -> Result<Latency, String> {
    let payload = vec![0x5a_u8; size.max(1)];
    let result = budget.best(|| ping_pass(pinger, peer, &payload, budget));
    // Stop the echo even after a failure.
    let _ = pinger.send(peer, Vec::new());
    result
}

fn ping_pass(
    pinger: &dyn Transport,
    peer: NodeId,
    payload: &[u8],
    budget: Budget,
) -> Result<Latency, String> {
    let mut samples = Vec::new();
    let start = Instant::now();
    for i in 0.. {
        if budget.done(samples.len(), start) {
            break;
        }
        let frame = payload.to_vec();
        let t = Instant::now();
        pinger.send(peer, frame).map_err(|e| format!("send: {e}"))?;
        loop {
            let (from, _) = next_frame(pinger)?;
            if from == peer {
                break;
            }
        }
        if i >= budget.warmup {
            samples.push(t.elapsed());
        }
    }
    Latency::of(samples).ok_or_else(|| "no round trip measured".to_string())
}

/// Echoes every frame back (as a fresh copy) until an empty one comes.
pub fn echo(t: &dyn Transport) -> Result<(), String> {
    loop {
        let (from, bytes) = next_frame(t)?;
        if bytes.is_empty() {
            return Ok(());
        }
        t.send(from, bytes.to_vec())
            .map_err(|e| format!("echo: {e}"))?;
    }
}

/// Ping-pong between two endpoints of one process, `a` timing, `b` echoing on its own thread.
fn ping_pong<T: Transport>(a: &T, b: &T, size: usize, budget: Budget) -> Result<Latency, String> {
    std::thread::scope(|s| {
        let echo = s.spawn(|| echo(b));
        let latency = ping(a, b.local_id(), size, budget);
        let echoed = echo
            .join()
            .unwrap_or_else(|_| Err("echo thread panicked".into()));
        let latency = latency?;
        echoed.map(|()| latency)
    })
}

/// Started nodes of one cluster. Dropped without [`Cluster::shutdown`], each node still
/// leaves (`Node`'s drop does).
pub struct Cluster {
    /// Node `i` has id `i`.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Protocol messages all nodes have sent, the lease's background renewals aside.
    pub fn messages_sent(&self) -> u64 {
        let stats = self.nodes.iter().map(Node::stats);
        stats.map(|s| s.messages_sent - s.lease_messages_sent).sum()
    }

    /// Frames all nodes have handed to their transports, those carrying only lease
    /// renewals aside.
    pub fn frames_sent(&self) -> u64 {
        let stats = self.nodes.iter().map(Node::stats);
        stats.map(|s| s.frames_sent - s.lease_frames_sent).sum()
    }

    /// Shuts every node down at once (each leave waits for the others' acknowledgements).
    pub fn shutdown(self) -> Result<(), String> {
        let errors: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .nodes
                .into_iter()
                .map(|node| {
                    s.spawn(move || {
                        let id = node.id();
                        node.shutdown().map_err(|e| format!("node {id}: {e}"))
                    })
                })
                .collect();
            handles
                .into_iter()
                .filter_map(|h| match h.join() {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some("a shutdown thread panicked".into()),
                })
                .collect()
        });
        if errors.is_empty() {
            Ok(())
        } else {
            Err(format!("shutdown: {}", errors.join("; ")))
        }
    }
}
