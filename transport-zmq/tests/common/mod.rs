//! Helpers shared by the integration tests: loopback clusters and bounded waits.
#![allow(dead_code)] // each test binary uses its own subset

use std::time::{Duration, Instant};

use coherence_core::{NodeId, Transport, TransportEvent};
use transport_zmq::{ZmqConfig, ZmqTransport};

/// Longest any single wait in a test may take; a hang fails instead of blocking the run.
pub const WAIT: Duration = Duration::from_secs(10);

/// A loopback configuration for `cluster` with a fast heartbeat, so loss tests stay short.
/// Also turns on logging to the test output (`RUST_LOG=transport_zmq=debug` to see it).
pub fn config(cluster: &str) -> ZmqConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    ZmqConfig {
        lost_after: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(100),
        ..ZmqConfig::new("tcp://127.0.0.1:0", cluster)
    }
}

/// Starts a founder and `n - 1` joiners through it (ids 0..n), and consumes (checking them)
/// the `Joined` events that earlier members get for later ones.
pub fn cluster(n: usize, base: &ZmqConfig) -> Vec<ZmqTransport> {
    let nodes = cluster_unread(n, base);
    for (i, node) in nodes.iter().enumerate() {
        for j in i + 1..n {
            assert_eq!(next(node), TransportEvent::Joined(j as NodeId), "node {i}");
        }
    }
    nodes
}

/// Like [`cluster`], but leaves every event for the caller (e.g. a `Node`, which must see
/// the `Joined` events).
pub fn cluster_unread(n: usize, base: &ZmqConfig) -> Vec<ZmqTransport> {
    let founder = ZmqTransport::start(base.clone()).expect("founder starts");
    let addr = founder.local_addr();
    let mut nodes = vec![founder];
    for i in 1..n {
        let node = ZmqTransport::start(ZmqConfig {
            join: Some(addr.clone()),
            ..base.clone()
        })
        .expect("joiner starts");
        assert_eq!(node.local_id() as usize, i);
        nodes.push(node);
    }
    nodes
}

/// The next event, within [`WAIT`].
pub fn next(node: &ZmqTransport) -> TransportEvent {
    node.recv(WAIT)
        .expect("transport is open")
        .unwrap_or_else(|| panic!("node {} got no event within {WAIT:?}", node.local_id()))
}

/// Asserts that nothing arrives within `quiet`.
pub fn expect_quiet(node: &ZmqTransport, quiet: Duration) {
    if let Some(event) = node.recv(quiet).expect("transport is open") {
        panic!("node {} got unexpected {event:?}", node.local_id());
    }
}

/// Waits until `check` holds, polling; panics after [`WAIT`] with `what`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn frame(from: NodeId, bytes: &[u8]) -> TransportEvent {
    TransportEvent::Frame {
        from,
        bytes: bytes.to_vec(),
    }
}
