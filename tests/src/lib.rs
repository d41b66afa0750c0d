//! Cross-crate test support: the deterministic simulation, the stateright model and the
//! transport conformance suite.

pub mod conformance;
pub mod model;
pub mod sim;
