//! Linearizability of histories recorded from real multi-threaded runs over the in-memory
//! transport, checked with stateright's `LinearizabilityTester`; see
//! [`tests::conformance::linearizability`] for the workload and why histories are segmented.
//!
//! A negative control feeds the same checker hand-made non-linearizable histories and asserts
//! that it rejects them, so the check is known to bite.

use coherence_core::WritePolicy;
use tests::conformance::linearizability::{
    check, linearizable, stale_reads, Entry, Op, Ret, ThreadId, Verdict,
};
use tests::conformance::LocalCluster;

/// Runs and checks the workload under `policy`, printing what it measured.
fn linearizable_under(policy: WritePolicy, seed: u64) {
    let report = linearizable(&LocalCluster::default(), policy, seed);
    println!("{policy:?}, seed {seed:#x}: {report:?}");
}

#[test]
fn linearizable_update_policy() {
    linearizable_under(WritePolicy::Update, 0x5eed_0001);
}

#[test]
fn linearizable_invalidate_policy() {
    linearizable_under(WritePolicy::Invalidate, 0x5eed_0002);
}

/// Builds a history from `(thread, entry)` shorthand: `Ok(op)` invokes, `Err(ret)` returns.
fn history(events: &[(ThreadId, Result<Op, Ret>)]) -> Vec<Entry> {
    events
        .iter()
        .map(|(t, e)| match e {
            Ok(op) => Entry::Invoke(*t, op.clone()),
            Err(ret) => Entry::Return(*t, ret.clone()),
        })
        .collect()
}

/// The check bites: hand-made non-linearizable histories are rejected, and near-identical
/// linearizable ones are accepted.
#[test]
fn negative_control() {
    use Op::{Read, Swap, Write};
    // A stale read: the write of 1 completed before the read began, yet it returned 0.
    let stale = history(&[
        (0, Ok(Write(1))),
        (0, Err(Ret::Written)),
        (1, Ok(Read)),
        (1, Err(Ret::Read(0))),
    ]);
    assert!(
        check(0, &stale) == Verdict::NotLinearizable,
        "a stale read was accepted"
    );
    assert!(!stale_reads(0, &stale).is_empty());
    // The same read overlapping the write may return either value.
    let concurrent = history(&[
        (0, Ok(Write(1))),
        (1, Ok(Read)),
        (1, Err(Ret::Read(0))),
        (0, Err(Ret::Written)),
    ]);
    assert!(
        check(0, &concurrent) == Verdict::Linearizable,
        "a concurrent read was rejected"
    );
    assert!(stale_reads(0, &concurrent).is_empty());
    // A lost update: two concurrent swaps both replaced 0.
    let lost = history(&[
        (0, Ok(Swap(1))),
        (1, Ok(Swap(2))),
        (0, Err(Ret::Swapped(0))),
        (1, Err(Ret::Swapped(0))),
    ]);
    assert!(
        check(0, &lost) == Verdict::NotLinearizable,
        "a lost update was accepted"
    );
    let chained = history(&[
        (0, Ok(Swap(1))),
        (1, Ok(Swap(2))),
        (0, Err(Ret::Swapped(2))),
        (1, Err(Ret::Swapped(0))),
    ]);
    assert!(
        check(0, &chained) == Verdict::Linearizable,
        "a chain of swaps was rejected"
    );
    // New-old inversion: one reader sees 1 then a later reader sees the older 0, while the
    // write is still in flight.
    let inversion = history(&[
        (0, Ok(Write(1))),
        (1, Ok(Read)),
        (1, Err(Ret::Read(1))),
        (2, Ok(Read)),
        (2, Err(Ret::Read(0))),
        (0, Err(Ret::Written)),
    ]);
    assert!(
        check(0, &inversion) == Verdict::NotLinearizable,
        "a new-old inversion was accepted"
    );
    // A value nobody wrote.
    let garbage = history(&[(0, Ok(Read)), (0, Err(Ret::Read(7)))]);
    assert!(
        check(0, &garbage) == Verdict::NotLinearizable,
        "a value nobody wrote was accepted"
    );
    assert!(!stale_reads(0, &garbage).is_empty());
}
