//! A transport may drop a peer before its `Left` reaches the driver (ZeroMQ does once the peer
//! is silent for `lost_after`): sends to it then fail with `UnknownPeer`. Tokens in such a frame
//! never left, so they must stay with the sender, not vanish.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coherence_core::{
    Config, Error, Node, NodeId, Transport, TransportError, TransportEvent, WritePolicy,
};
use transport_local::LocalTransport;

/// A local transport that, once told to, refuses every send to `gone` as `UnknownPeer`.
struct Refusing {
    inner: LocalTransport,
    gone: NodeId,
    refusing: Arc<AtomicBool>,
}

impl Transport for Refusing {
    fn local_id(&self) -> NodeId {
        self.inner.local_id()
    }

    fn peers(&self) -> Vec<NodeId> {
        self.inner.peers()
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        if to == self.gone && self.refusing.load(Ordering::SeqCst) {
            return Err(TransportError::UnknownPeer(to));
        }
        self.inner.send(to, frame)
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        self.inner.recv(timeout)
    }

    fn close(&self) {
        self.inner.close()
    }
}

#[test]
fn tokens_in_a_refused_frame_stay_with_the_sender() {
    let mut transports = transport_local::cluster(2);
    let t1 = transports.pop().expect("two transports");
    let refusing = Arc::new(AtomicBool::new(false));
    let t0 = Refusing {
        inner: transports.pop().expect("two transports"),
        gone: 1,
        refusing: Arc::clone(&refusing),
    };
    let config = Config::default().write_policy(WritePolicy::Invalidate);
    let node0 = Node::start(t0, config.clone().timeout(Duration::from_secs(10))).unwrap();
    let node1 = Node::start(t1, config.timeout(Duration::from_millis(300))).unwrap();
    let x0 = node0.object("x", 0i64).unwrap();
    let x1 = node1.object("x", 0i64).unwrap();
    // Node 0 ends up holding every token (Invalidate keeps them with the writer).
    x1.write(1).unwrap();
    x0.write(2).unwrap();

    // Node 1 vanishes as far as node 0's transport is concerned; node 0 answers node 1's
    // write request with every token, and that frame is refused.
    refusing.store(true, Ordering::SeqCst);
    match x1.write(3) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("node 1's write should time out without the tokens, got {other:?}"),
    }
    // The tokens are still at node 0: it writes and reads alone.
    x0.write(4).unwrap();
    assert_eq!(*x0.read().unwrap(), 4);
    assert_eq!(x0.version(), 3);
    node0.shutdown().unwrap();
}
