//! The conformance suite over the in-memory transport (`transport-local`): every scenario of
//! [`tests::conformance`] under both write policies.
//!
//! Clusters are built on a `LocalNetwork`, one member at a time, so that a late joiner can
//! join the running cluster (see [`LocalCluster`]).

use tests::conformance::LocalCluster;

/// Declares a module named after a scenario with one test per write policy.
macro_rules! scenarios {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                use coherence_core::WritePolicy;

                #[test]
                fn update_policy() {
                    tests::conformance::$scenario(
                        &super::LocalCluster::default(),
                        WritePolicy::Update,
                    );
                }

                #[test]
                fn invalidate_policy() {
                    tests::conformance::$scenario(
                        &super::LocalCluster::default(),
                        WritePolicy::Invalidate,
                    );
                }
            }
        )*
    };
}

scenarios!(
    lab_integer_and_dict,
    counter,
    late_joiner,
    type_mismatch,
    shutdown_hands_tokens_on,
    concurrent_create,
    many_objects,
    shared_node,
    no_starvation,
    no_starvation_by_local_threads,
    timeouts_are_errors,
);
