//! Cross-crate test support: the deterministic simulation, the stateright model and the
//! transport conformance suite, in-process ([`conformance`]) and one node per process
//! ([`ranked`]).

pub mod conformance;
pub mod model;
pub mod ranked;
pub mod sim;
