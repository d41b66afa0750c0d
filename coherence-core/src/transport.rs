//! The boundary between the protocol and the network.
//!
//! A transport moves opaque frames between node ids and reports membership. It knows nothing of
//! tokens, objects or messages: the wire codec lives in [`crate::wire`].

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Identifies one node (a process, a rank, a thread) of the cluster.
pub type NodeId = u32;

/// How a node is reached: where its transport listens and which process start it is. The
/// views carry every member's contact, so each member's transport connects to the nodes the
/// installed view names; the protocol never looks inside.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Contact {
    /// A random number per process start: a member's id is believed only from the process
    /// the view admitted, not from another one that later listens at the same address.
    pub incarnation: u64,
    /// Where its transport listens, in the transport's own notation (for ZeroMQ an endpoint
    /// such as `tcp://10.0.0.5:7000`).
    pub addr: String,
}

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
    /// A node that is no member asks to join, reachable at this contact. The members' view
    /// change decides whether and under which id it is taken in; its transport learns the id
    /// when a member of the view that took it in first speaks to it.
    JoinRequest(Contact),
    /// A member left the cluster or was lost. Delivered after every frame from that node.
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
/// - frames from a node the transport was not told of yet (by
///   [`Transport::connect_members`]) are delivered too, in order, if that node addressed them
///   to this node's id and process: a joiner hears the decision that takes it in from members
///   it does not know yet, and a member may hear a joiner before its own copy of the decision;
/// - [`TransportEvent::Left`] follows the last frame of a member.
///
/// All methods take `&self`: the driver thread receives while user threads send.
pub trait Transport: Send + Sync + 'static {
    /// This node's id.
    fn local_id(&self) -> NodeId;

    /// The other members known when the node starts (none for a joiner); later ones come with
    /// the views, through [`Transport::connect_members`].
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
    /// it in, which they start when their transports report its [`TransportEvent::JoinRequest`].
    fn joins_running_cluster(&self) -> bool {
        false
    }

    /// This node's contact, which the founding view names so that joiners learn it (`None`:
    /// the transport connects its nodes by other means, as threads and MPI ranks are). Only a
    /// node that founds a cluster alone gives one: the founding view of several nodes would
    /// know no contact but its own.
    fn contact(&self) -> Option<Contact> {
        None
    }

    /// The installed view names these members, this node among them, reachable at these
    /// contacts: connect to the ones not connected yet. A member no longer named stays until it
    /// leaves or is lost, as usual: a leaver or a removed node must still hear the decision
    /// that removed it, and answer. Called before
    /// the protocol sends anything to a member it names for the first time.
    fn connect_members(&self, members: &BTreeMap<NodeId, Contact>) {
        let _ = members;
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

            fn contact(&self) -> Option<Contact> {
                (**self).contact()
            }

            fn connect_members(&self, members: &BTreeMap<NodeId, Contact>) {
                (**self).connect_members(members)
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
