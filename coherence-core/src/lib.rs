//! coherence-core: keeps named, typed objects coherent across processes by token counting.
//!
//! A read needs one of an object's tokens, a write needs all of them, so the
//! single-writer/multiple-reader invariant holds by counting. This crate holds the sans-IO
//! protocol state machine ([`protocol`]), the wire codec ([`wire`]), the [`Transport`] trait, the
//! driver ([`Node`]), the typed handle ([`DistObj`]), the library's one wait policy
//! ([`wait`]) and the consensus that decides views ([`view`]). Every protocol decision is made here. What this crate must not hold: a socket,
//! MPI, or any other network code; transports live in their own crates and only move frames.
//!
//! ```
//! use coherence_core::{Config, Node};
//! # fn main() -> Result<(), coherence_core::Error> {
//! # let transport = transport_local::cluster(1).pop().unwrap();
//! let node = Node::start(transport, Config::default())?;
//! let counter = node.object("counter", 0i64)?;
//! counter.write(*counter.read()? + 10)?;
//! assert_eq!(counter.update(|c| { *c += 1; *c })?, 11);
//! node.shutdown()?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod cell;
pub mod config;
pub mod error;
pub mod lease;
pub mod member;
pub mod node;
pub mod protocol;
pub mod transport;
pub mod view;
pub mod wait;
pub mod wire;

pub use config::{Config, WritePolicy};
pub use error::Error;
pub use node::{DistObj, Node, NodeStats};
pub use transport::{Contact, NodeId, Transport, TransportError, TransportEvent};
