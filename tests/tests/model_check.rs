//! Exhaustive model checks of small configurations (the invariants of `docs/PROTOCOL.md`): every
//! interleaving that per-pair FIFO channels allow, with the safety properties checked in every
//! state and liveness on every path. `tests::model` describes the model and its properties;
//! the `view_change_*` tests check the view change (`tests::view_model`), safety only; the
//! `members_*` tests check whole members (tokens, views and leases) under a crash during a
//! write, a partition with a minority writer and a removed node returning
//! (`tests::member_model`).
//!
//! To stay well under a minute in the test profile, the two-writer and genesis-leave tests drop
//! one open from the design brief's scripts; the `#[ignore]`d `*_all_open` tests run the full
//! scripts (`cargo test -p tests --release --test model_check -- --ignored`).

use std::collections::BTreeSet;

use coherence_core::protocol::WritePolicy;
use tests::exhaustive::check as check_exhaustively;
use tests::member_model::{Fault, MemberModel};
use tests::model::{check, CoherenceModel, Step};
use tests::view_model::ViewModel;

const X: &str = "x";

fn open(object: &'static str, init: &'static [u8]) -> Step {
    Step::Open { object, init }
}

/// Three nodes share "x": node 1 opens and writes it while node 2 opens it and does a
/// read-modify-write (lock, then commit), and node 0 reads it, opening it first if `node0_opens`
/// (otherwise its read may come before the object exists). The inits differ, so exactly one
/// must win.
fn two_writers(policy: WritePolicy, node0_opens: bool) -> CoherenceModel {
    let node0 = if node0_opens {
        vec![open(X, b"init 0"), Step::Read { object: X }]
    } else {
        vec![Step::Read { object: X }]
    };
    let node1 = vec![
        open(X, b"init 1"),
        Step::Write {
            object: X,
            bytes: b"write 1",
        },
    ];
    let node2 = vec![
        open(X, b"init 2"),
        Step::Lock { object: X },
        Step::Commit { bytes: b"commit 2" },
    ];
    CoherenceModel::new(policy, 3, vec![node0, node1, node2])
}

#[test]
fn two_writers_update() {
    check(
        "two writers, Update",
        two_writers(WritePolicy::Update, false),
    );
}

#[test]
fn two_writers_invalidate() {
    let model = two_writers(WritePolicy::Invalidate, false);
    check("two writers, Invalidate", model);
}

#[test]
#[ignore = "2.3 million states: about a minute in release"]
fn two_writers_all_open_update() {
    let model = two_writers(WritePolicy::Update, true);
    check("two writers, all open, Update", model);
}

#[test]
#[ignore = "1.9 million states: about a minute in release"]
fn two_writers_all_open_invalidate() {
    let model = two_writers(WritePolicy::Invalidate, true);
    check("two writers, all open, Invalidate", model);
}

/// Nodes 0 and 1 found the cluster: node 1 opens "x" and writes it, node 0 reads it. Node 2
/// joins at any point, then opens "x" and reads it.
#[test]
fn join() {
    let model = CoherenceModel::new(
        WritePolicy::Update,
        2,
        vec![
            vec![Step::Read { object: X }],
            vec![
                open(X, b"init 1"),
                Step::Write {
                    object: X,
                    bytes: b"write 1",
                },
            ],
            vec![open(X, b"init 2"), Step::Read { object: X }],
        ],
    );
    check("join", model);
}

/// Node 0 (genesis, and the first owner of what it creates) opens "x" and leaves, possibly
/// interrupting its open; node 1 opens "x" and writes it; node 2 opens a new object "y" (created
/// by node 0 or by its genesis heir) and reads "x", opening it first if `node2_opens_x`.
fn leave(node2_opens_x: bool) -> CoherenceModel {
    let mut node2 = vec![open("y", b"init y"), Step::Read { object: X }];
    if node2_opens_x {
        node2.insert(0, open(X, b"init 2"));
    }
    CoherenceModel::new(
        WritePolicy::Update,
        3,
        vec![
            vec![open(X, b"init 0"), Step::Leave],
            vec![
                open(X, b"init 1"),
                Step::Write {
                    object: X,
                    bytes: b"write 1",
                },
            ],
            node2,
        ],
    )
}

#[test]
fn genesis_leaves() {
    check("genesis leaves", leave(false));
}

#[test]
#[ignore = "9.1 million states: about 5 min and 10 GB of memory in release"]
fn genesis_leaves_all_open() {
    check("genesis leaves, all open", leave(true));
}

/// Two nodes leave concurrently: node 0 (genesis) at once, node 1 after opening "x", whose
/// tokens may still be on their way to it. Node 1, the genesis heir, may itself be leaving and
/// must pass the role on. Node 2 opens "x" and reads it.
#[test]
fn two_leave_concurrently() {
    let model = CoherenceModel::new(
        WritePolicy::Update,
        3,
        vec![
            vec![Step::Leave],
            vec![open(X, b"init 1"), Step::Leave],
            vec![open(X, b"init 2"), Step::Read { object: X }],
        ],
    );
    check("two leave concurrently", model);
}

/// Three founders; `proposals[n]` are node n's proposals, in turn.
fn views(proposals: Vec<Vec<BTreeSet<u32>>>, retries: u8, crash: bool) -> ViewModel {
    ViewModel {
        founders: 3,
        proposals,
        retries,
        crash,
    }
}

/// The three founders but `gone`.
fn without(gone: u32) -> BTreeSet<u32> {
    (0..3).filter(|&n| n != gone).collect()
}

fn members(nodes: &[u32]) -> BTreeSet<u32> {
    nodes.iter().copied().collect()
}

/// The view change among three founders: nodes 0 and 1 propose to remove different members
/// (so the proposals compete), and one node may crash at any point (node 2's crash leaves both
/// proposals a bare majority).
#[test]
fn view_change_competing_proposers() {
    let model = views(vec![vec![without(2)], vec![without(0)], vec![]], 0, true);
    check_exhaustively("view change, 2 competing proposers", model);
}

/// As [`view_change_competing_proposers`], with all three founders proposing.
#[test]
#[ignore = "13 million states: about 7 minutes in release"]
fn view_change_three_competing_proposers() {
    let proposals = vec![vec![without(2)], vec![without(0)], vec![without(1)]];
    check_exhaustively(
        "view change, 3 competing proposers",
        views(proposals, 0, true),
    );
}

/// Node 0 proposes, node 1 proposes a different membership, and node 0 retries once with a
/// higher ballot (as after a timeout): a retry must adopt whatever a majority may have
/// accepted.
#[test]
fn view_change_retried_proposal() {
    let model = views(vec![vec![without(2)], vec![without(0)], vec![]], 1, false);
    check_exhaustively("view change, a retried proposal", model);
}

/// Two epochs: node 0 removes node 2, then adds it back; node 1 competes to remove node 0.
#[test]
fn view_change_two_epochs() {
    let proposals = vec![
        vec![members(&[0, 1]), members(&[0, 1, 2])],
        vec![members(&[1, 2])],
        vec![],
    ];
    check_exhaustively("view change, two epochs", views(proposals, 0, false));
}

/// Whole members (tokens, views, leases): the holder of every token crashes at any point of
/// a write; the survivors remove it and read.
#[test]
fn members_crash_during_a_write() {
    check_exhaustively(
        "members: crash during a write",
        MemberModel {
            fault: Fault::CrashDuringWrite,
        },
    );
}

/// Whole members: the crash during a write, after a joiner asked node 1 (not the
/// coordinator); the request goes on to the coordinator and a view takes the joiner in under
/// id 3.
#[test]
fn members_crash_while_a_node_joins() {
    check_exhaustively(
        "members: crash while a node joins",
        MemberModel {
            fault: Fault::CrashWhileJoining,
        },
    );
}

/// Whole members: the holder is cut off at any point and writes and reads on its side while
/// the majority removes it and writes and reads on theirs.
#[test]
fn members_partition_with_a_minority_writer() {
    check_exhaustively(
        "members: partition with a minority writer",
        MemberModel {
            fault: Fault::MinorityWriter,
        },
    );
}

/// Whole members: the holder stalls, is removed, and returns to find itself cut off.
#[test]
fn members_removed_node_returns() {
    check_exhaustively(
        "members: a removed node returns",
        MemberModel {
            fault: Fault::RemovedReturns,
        },
    );
}
