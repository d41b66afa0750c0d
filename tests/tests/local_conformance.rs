//! The conformance suite over the in-memory transport (`transport-local`): every scenario of
//! [`tests::conformance`] that thread clusters run, under both write policies, one thread per
//! rank.
//!
//! Clusters are built on a `LocalNetwork`, one member at a time, so that a late joiner can
//! join the running cluster (see [`LocalCluster`]).

use tests::conformance::LocalCluster;

tests::conformance_suite!(super::LocalCluster::default());
