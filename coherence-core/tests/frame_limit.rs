//! A transport's frame limit (`Transport::max_frame`, ZeroMQ's `max_frame` say): a value too
//! large for it is refused before any token moves, and several values for one peer travel in
//! as many frames as they need. A frame over the limit would be refused at send time, after its
//! tokens had left the protocol.

use std::time::Duration;

use coherence_core::{
    Config, Error, Node, NodeId, Transport, TransportError, TransportEvent, WritePolicy,
};
use transport_local::LocalTransport;

const MAX_FRAME: usize = 1024;

/// A local transport that carries frames of at most [`MAX_FRAME`] bytes.
struct Limited(LocalTransport);

impl Transport for Limited {
    fn local_id(&self) -> NodeId {
        self.0.local_id()
    }

    fn peers(&self) -> Vec<NodeId> {
        self.0.peers()
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        if frame.len() > MAX_FRAME {
            return Err(TransportError::FrameTooLarge {
                len: frame.len(),
                max: MAX_FRAME,
            });
        }
        self.0.send(to, frame)
    }

    fn max_frame(&self) -> usize {
        MAX_FRAME
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        self.0.recv(timeout)
    }

    fn close(&self) {
        self.0.close()
    }
}

fn two_nodes() -> (Node, Node) {
    let config = Config::default()
        .write_policy(WritePolicy::Invalidate)
        .timeout(Duration::from_secs(10));
    let mut nodes = transport_local::cluster(2)
        .into_iter()
        .map(|t| Node::start(Limited(t), config.clone()).unwrap());
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
fn values_for_one_peer_are_split_over_frames_that_fit() {
    let (node0, node1) = two_nodes();
    let value = |byte: u8| vec![byte; 600];
    let a0 = node0.object("a", value(0)).unwrap();
    let b0 = node0.object("b", value(0)).unwrap();
    let a1 = node1.object("a", value(0)).unwrap();
    let b1 = node1.object("b", value(0)).unwrap();
    // Node 0 gathers every token of both (Invalidate keeps them with the writer)...
    a0.write(value(1)).unwrap();
    b0.write(value(2)).unwrap();
    // ...and its leave hands both values to node 1 in one step: two frames, not one too large.
    node0.shutdown().unwrap();
    assert_eq!(*a1.read().unwrap(), value(1));
    assert_eq!(*b1.read().unwrap(), value(2));
    node1.shutdown().unwrap();
}
