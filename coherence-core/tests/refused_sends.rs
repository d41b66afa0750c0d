//! Sends a transport refuses must not lose what they carry.
//! - A transport may drop a peer before its `Left` reaches the driver (ZeroMQ does once the
//!   peer is silent for `lost_after`): sends to it then fail with `UnknownPeer`, and the tokens
//!   in such a frame must stay with the sender.
//! - A transport has a frame limit (`Transport::max_frame`, ZeroMQ's `max_frame` say): a value
//!   too large for it is refused before any token moves. (Several messages for one peer
//!   travel in as many frames as they need: `wire::frame_runs`, tested in the core.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use coherence_core::{
    Config, Error, Node, NodeId, Transport, TransportError, TransportEvent, WritePolicy,
};
use transport_local::LocalTransport;

const MAX_FRAME: usize = 1024;

/// A local transport that carries frames of at most [`MAX_FRAME`] bytes and, once `refusing`
/// is set, refuses every send to `gone` as `UnknownPeer`.
struct Faulty {
    inner: LocalTransport,
    gone: NodeId,
    refusing: Arc<AtomicBool>,
}

impl Faulty {
    fn new(inner: LocalTransport) -> Faulty {
        Faulty {
            inner,
            gone: NodeId::MAX,
            refusing: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Transport for Faulty {
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
        if frame.len() > MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        self.inner.send(to, frame)
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        self.inner.recv(timeout)
    }

    fn close(&self) {
        self.inner.close()
    }
}

fn two_nodes() -> (Node, Node) {
    let config = Config::default()
        .write_policy(WritePolicy::Invalidate)
        .timeout(Duration::from_secs(10));
    let mut nodes = transport_local::cluster(2)
        .into_iter()
        .map(|t| Node::start(Faulty::new(t), config.clone()).unwrap());
    (nodes.next().unwrap(), nodes.next().unwrap())
}

#[test]
fn a_value_too_large_for_a_frame_is_refused_before_anything_moves() {
    let (node0, node1) = two_nodes();
    let x0 = node0.object("x", vec![1u8]).unwrap();
    let x1 = node1.object("x", vec![0u8]).unwrap();
    match x1.write(vec![7u8; 2 * MAX_FRAME]) {
        Err(Error::ValueTooLarge { object, len, max }) => {
            assert_eq!(object, "x");
            assert!(len > max && max < MAX_FRAME, "len {len}, max {max}");
        }
        other => panic!("expected ValueTooLarge, got {other:?}"),
    }
    match node0.object("big", vec![7u8; 2 * MAX_FRAME]) {
        Err(Error::ValueTooLarge { .. }) => {}
        other => panic!("expected ValueTooLarge for an init, got {other:?}"),
    }
    // Nothing moved: the object works on both nodes, with the value that was there.
    assert_eq!(*x1.read().unwrap(), vec![1u8]);
    x1.write(vec![2u8; 100]).unwrap();
    assert_eq!(*x0.read().unwrap(), vec![2u8; 100]);
    node1.shutdown().unwrap();
    node0.shutdown().unwrap();
}

#[test]
fn tokens_in_a_refused_frame_stay_with_the_sender() {
    let mut transports = transport_local::cluster(2);
    let t1 = Faulty::new(transports.pop().expect("two transports"));
    let refusing = Arc::new(AtomicBool::new(false));
    let t0 = Faulty {
        gone: 1,
        refusing: Arc::clone(&refusing),
        ..Faulty::new(transports.pop().expect("two transports"))
    };
    // Without copies and leases: node 0 is to go on alone, which a member of two may do only
    // when nothing makes it wait for the other (a copy of each write, a lease granted).
    let config = Config::default()
        .write_policy(WritePolicy::Invalidate)
        .durability(0)
        .lease(Duration::ZERO);
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
