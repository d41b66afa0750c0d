//! Cross-crate test support: the deterministic simulations (the token protocol's, and members
//! with views under crashes), the stateright models (the token protocol's and the view
//! change's) and the transport conformance suite ([`conformance`]: every scenario written once,
//! run by thread clusters and by one process per rank), and the counter history that the
//! real-process fault matrix checks ([`counter_history`]).

pub mod conformance;
pub mod counter_history;
pub mod exhaustive;
pub mod fault_sim;
pub mod member_model;
pub mod model;
pub mod peer_process;
pub mod seeds;
pub mod sim;
pub mod view_model;
