//! The boundary between the protocol and the network.
//!
//! A transport moves opaque frames between node ids and reports membership. It knows nothing of
//! tokens, objects or messages: the wire codec lives in [`crate::wire`].

use std::sync::Arc;
use std::time::Duration;

/// Identifies one node (a process, a rank, a thread) of the cluster.
pub type NodeId = u32;

/// What a transport hands the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransportEvent {
    /// A frame from a peer. Frames from one peer arrive in the order that peer sent them.
    Frame {
        /// The sending node.
        from: NodeId,
        /// The encoded frame, exactly as the peer passed it to [`Transport::send`].
        bytes: Vec<u8>,
    },
    /// A node joined the cluster. Delivered before any frame from that node.
    Joined(NodeId),
    /// A node left the cluster or was lost. Delivered after every frame from that node.
    Left(NodeId),
}

/// Why a transport call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    /// The destination is not a member of the cluster (never joined, or already left).
    #[error("unknown peer {0}")]
    UnknownPeer(NodeId),
    /// The transport was closed; nothing can be sent or received any more.
    #[error("transport closed")]
    Closed,
    /// The frame is larger than the transport can carry; nothing was sent.
    #[error("a frame of {len} bytes exceeds this transport's limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's size.
        len: usize,
        /// The largest frame the transport sends.
        max: usize,
    },
    /// Any other failure of the underlying network library.
    #[error("transport failure: {0}")]
    Io(String),
}

/// Moves frames between the nodes of one cluster.
///
/// Requirements the protocol relies on:
/// - frames between one ordered pair of nodes are delivered in order (per-pair FIFO), none lost
///   while both nodes are members;
/// - the founding node of a cluster has id 0 (it holds, virtually, every object not yet created);
/// - `Joined(j)` is queued at every member before `j`'s own transport is handed out, so a member
///   that leaves afterwards learns of `j` first (the driver handles queued events before it
///   leaves);
/// - [`TransportEvent::Joined`] precedes the first frame of a new node and
///   [`TransportEvent::Left`] follows its last frame.
///
/// All methods take `&self`: the driver thread receives while user threads send.
pub trait Transport: Send + Sync + 'static {
    /// This node's id.
    fn local_id(&self) -> NodeId;

    /// The other members known when the node starts; later changes arrive as events.
    fn peers(&self) -> Vec<NodeId>;

    /// Queues `frame` for `to`. Must not block on the receiver.
    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError>;

    /// The largest frame [`Transport::send`] accepts. The node refuses a value that could not
    /// travel in one frame before any token moves, and splits what it sends to fit.
    fn max_frame(&self) -> usize {
        usize::MAX
    }

    /// How many processes of this cluster, this one included, run on this machine and share
    /// its cores (1 by default: unknown, or only this one). The wait policy lets a process's
    /// polling threads spin only while all these processes' pollers could fit the cores.
    fn colocated_processes(&self) -> usize {
        1
    }

    /// Whether this node joins a cluster that already runs (rather than founding one with
    /// the peers it knows at start): it becomes a member when the members' view change takes
    /// it in, which they start when their transports report it [`TransportEvent::Joined`].
    fn joins_running_cluster(&self) -> bool {
        false
    }

    /// Whether the members of this cluster fail together (threads of one process, ranks of
    /// one MPI job, which ends when one rank dies): then no write needs copies to survive a
    /// crash, and [`crate::Config::durability`] defaults to 0.
    fn members_fail_together(&self) -> bool {
        false
    }

    /// Waits up to `timeout` for the next event; `Ok(None)` when none came in time.
    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError>;

    /// Leaves the cluster: peers see [`TransportEvent::Left`] after this node's last frame.
    fn close(&self);
}

/// Forwards every call to the transport behind a pointer.
macro_rules! forward_transport {
    ($(#[$doc:meta])* $pointer:ident) => {
        $(#[$doc])*
        impl<T: Transport + ?Sized> Transport for $pointer<T> {
            fn local_id(&self) -> NodeId {
                (**self).local_id()
            }

            fn peers(&self) -> Vec<NodeId> {
                (**self).peers()
            }

            fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
                (**self).send(to, frame)
            }

            fn max_frame(&self) -> usize {
                (**self).max_frame()
            }

            fn colocated_processes(&self) -> usize {
                (**self).colocated_processes()
            }

            fn joins_running_cluster(&self) -> bool {
                (**self).joins_running_cluster()
            }

            fn members_fail_together(&self) -> bool {
                (**self).members_fail_together()
            }

            fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
                (**self).recv(timeout)
            }

            fn close(&self) {
                (**self).close()
            }
        }
    };
}

forward_transport!(
    /// Lets code choose a transport at run time (`Box<dyn Transport>`).
    Box
);
forward_transport!(
    /// Lets code keep a handle on the transport it gave a node (to read its own counters, say):
    /// `Node::start(Arc::clone(&transport), config)`.
    Arc
);
