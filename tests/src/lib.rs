//! Cross-crate test support: the deterministic simulation, the stateright models (the token
//! protocol's and the view change's) and the transport conformance suite ([`conformance`]: every scenario written once, run by thread
//! clusters and by one process per rank).

pub mod conformance;
pub mod model;
pub mod sim;
pub mod view_model;
