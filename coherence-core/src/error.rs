//! The one error type of the public API.

use std::time::Duration;

use crate::transport::TransportError;

/// Every way an operation of [`crate::Node`] or [`crate::DistObj`] can fail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The operation did not complete within the configured timeout (for example because a
    /// node holding tokens vanished, or the founding node 0 is not running).
    #[error("{operation} on {object:?} timed out after {after:?}")]
    Timeout {
        /// What was attempted: "open", "read", "write", "update" or "shutdown".
        operation: &'static str,
        /// The object, or empty for node-wide operations.
        object: String,
        /// The timeout that expired.
        after: Duration,
    },
    /// The object exists with another type than the one it was opened with.
    #[error("object {object:?} holds {found}, opened as {expected}")]
    TypeMismatch {
        /// The object's name.
        object: String,
        /// The type this caller asked for.
        expected: String,
        /// The type the object was created with.
        found: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode a value of {object:?}: {reason}")]
    Encode {
        /// The object's name.
        object: String,
        /// The codec's message.
        reason: String,
    },
    /// The encoded value would not fit in one frame of the node's transport
    /// ([`crate::Transport::max_frame`]); nothing was written.
    #[error("the value of {object:?} encodes to {len} bytes, over the {max} bytes a frame of this transport leaves for it")]
    ValueTooLarge {
        /// The object's name.
        object: String,
        /// The encoded value's size.
        len: usize,
        /// The largest value the transport's frames carry for this object.
        max: usize,
    },
    /// The object name is longer than [`crate::Config::max_name_len`]; nothing was opened.
    #[error("an object name of {len} bytes is longer than the {max} bytes allowed (Config::max_name_len)")]
    NameTooLong {
        /// The name's length in bytes.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// A value received could not be decoded as the object's type.
    #[error("cannot decode the value of {object:?}: {reason}")]
    Decode {
        /// The object's name.
        object: String,
        /// The codec's message.
        reason: String,
    },
    /// The node was shut down (or is shutting down); its handles no longer work.
    #[error("node {0} is stopped")]
    Stopped(u32),
    /// The node's transport failed, or was closed under the node by someone other than
    /// `shutdown`: the node stopped, and every waiting and later operation ends with this at
    /// once instead of a timeout.
    #[error("node {node} stopped: its transport failed: {cause}")]
    Transport {
        /// The node.
        node: u32,
        /// What the transport reported.
        #[source]
        cause: TransportError,
    },
    /// An operation on an object from inside that object's own `update` closure on the same
    /// thread: it would wait for the tokens the update holds. Use the closure's argument.
    #[error("{operation} on {object:?} from inside its own update closure")]
    InsideUpdate {
        /// What was attempted: "read", "write" or "update".
        operation: &'static str,
        /// The object's name.
        object: String,
    },
    /// The node's driver thread could not be started.
    #[error("cannot start the driver thread: {0}")]
    Spawn(String),
    /// The other members decided a view without this node (it was cut off or stalled while
    /// they went on). It serves nothing more; start a new node to join again.
    #[error("node {0} was removed from the cluster")]
    Removed(u32),
    /// The transport lost a majority of this node's view for good (it was cut off or stalled
    /// for longer than the failure detection, and the others have most likely removed it; or a
    /// majority crashed): no view with it can be decided any more, and as its reads need a
    /// majority's lease or its writes a majority's copies, it serves nothing more.
    /// An operation under way when this happened may or may not have taken effect. Start a new
    /// node to join again.
    #[error("node {0} lost a majority of its view for good and stopped")]
    CutOff(u32),
    /// This node has not heard from a majority of its view for longer than its lease (it is
    /// cut off, or was stalled): the majority may have removed it and written since, so it
    /// serves no read until a majority renews its lease. Returned once that did not happen
    /// within the operation timeout.
    #[error("{operation} on {object:?} refused: node {node} cannot reach a majority of its view (lease expired)")]
    NoMajority {
        /// The node.
        node: u32,
        /// The operation.
        operation: &'static str,
        /// The object.
        object: String,
    },
    /// A view change came while this `update` held the object, and its write did not take
    /// effect: nothing was written; the update may be tried again.
    #[error("{operation} on {object:?} was interrupted by a view change and did not take effect")]
    Interrupted {
        /// The operation.
        operation: &'static str,
        /// The object.
        object: String,
    },
}
