//! Linearizability of histories recorded from real multi-threaded runs, checked with
//! stateright's [`LinearizabilityTester`].
//!
//! 3 nodes with 2 threads each run random reads, writes of unique values and swaps (an
//! `update` that stores a new value and returns the old one) on a few objects. Every
//! operation is recorded at its real invocation and return under the object's history
//! lock: the invocation is logged before the call starts and the return after it ended, so
//! each recorded interval contains the real one and a linearizable execution always yields
//! a linearizable record. Linearizability is local (a history is linearizable iff each
//! object's sub-history is), so each object's history is checked on its own.
//!
//! stateright's tester searches depth-first without memoization, so the cost of one long
//! history is unpredictable: single histories of 6000 operations on 4 objects took 4 to 8 s
//! to accept, and a non-linearizable one was not rejected within 120 s. The threads
//! therefore meet every [`SEGMENT_OPS`] operations at a quiescent point where thread 0
//! alone reads every object; the history is cut after that read and each segment is
//! checked from the value it read. This is exact: every operation of a segment ends before
//! the read begins and every later one begins after it ended, so every linearization of
//! the whole history passes through the read, and linearizations of the segments joined
//! at the reads form one of the whole.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{DistObj, Node, WritePolicy};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

use super::{config, fresh, lock, Cluster, Meeting, Outcome, Team};

/// Nodes in the cluster.
pub const NODES: usize = 3;
/// User threads per node, sharing the node.
pub const THREADS_PER_NODE: usize = 2;
/// Threads in all.
pub const THREADS: usize = NODES * THREADS_PER_NODE;
/// Objects the threads pick from at random; each gets its own history.
pub const OBJECTS: usize = 2;
/// Operations per thread between two quiescent points.
pub const SEGMENT_OPS: usize = 20;
/// Segments per run: 6 threads x 200 x 20 = 24,000 random operations per run, plus the
/// reads at the quiescent points.
pub const SEGMENTS: usize = 200;
/// Longest the checker may take for one segment before the run fails instead of hanging
/// (a non-linearizable history makes the search exhaustive).
pub const CHECK_BUDGET: Duration = Duration::from_secs(30);

/// A register of `i64` with an atomic swap: the sequential specification of one object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SwapRegister(pub i64);

/// An operation on a [`SwapRegister`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `read()`.
    Read,
    /// `write(v)`.
    Write(i64),
    /// `update(|x| replace(x, v))`: stores `v`, returns the previous value.
    Swap(i64),
}

/// What an [`Op`] returned.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Ret {
    /// A read saw this value.
    Read(i64),
    /// A write completed.
    Written,
    /// A swap replaced this value.
    Swapped(i64),
}

impl SequentialSpec for SwapRegister {
    type Op = Op;
    type Ret = Ret;

    fn invoke(&mut self, op: &Op) -> Ret {
        match *op {
            Op::Read => Ret::Read(self.0),
            Op::Write(v) => {
                self.0 = v;
                Ret::Written
            }
            Op::Swap(v) => Ret::Swapped(std::mem::replace(&mut self.0, v)),
        }
    }
}

/// Identifies a recording thread: `node * THREADS_PER_NODE + thread`.
pub type ThreadId = u32;

/// One recorded event of a history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// The thread invoked `Op`.
    Invoke(ThreadId, Op),
    /// The thread's operation returned `Ret`.
    Return(ThreadId, Ret),
    /// A quiescent point, right after thread 0's read of the object.
    Cut,
}

/// What the checker concluded about one history.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The tester found a serialization.
    Linearizable,
    /// The tester proved that none exists.
    NotLinearizable,
    /// The search did not end within [`CHECK_BUDGET`].
    GaveUp,
}

/// Checks one history that starts from the value `init` with a [`LinearizabilityTester`].
/// Runs the search on a thread with a large stack (it recurses once per operation) and gives
/// up after [`CHECK_BUDGET`].
pub fn check(init: i64, history: &[Entry]) -> Verdict {
    let mut tester = LinearizabilityTester::<ThreadId, SwapRegister>::new(SwapRegister(init));
    for entry in history {
        let fed = match entry {
            Entry::Invoke(t, op) => tester.on_invoke(*t, op.clone()).map(|_| ()),
            Entry::Return(t, ret) => tester.on_return(*t, ret.clone()).map(|_| ()),
            Entry::Cut => panic!("check one segment at a time"),
        };
        fed.unwrap_or_else(|e| panic!("malformed history: {e}"));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    thread::Builder::new()
        .name("checker".to_string())
        .stack_size(256 << 20)
        .spawn(move || {
            let _ = tx.send(tester.serialized_history().is_some());
        })
        .expect("spawn the checker");
    match rx.recv_timeout(CHECK_BUDGET) {
        Ok(true) => Verdict::Linearizable,
        Ok(false) => Verdict::NotLinearizable,
        Err(_) => Verdict::GaveUp,
    }
}

/// Splits an object's history at its quiescent points into segments, each with the value it
/// starts from (0, then what thread 0 read right before the cut).
fn segments(history: &[Entry]) -> Vec<(i64, &[Entry])> {
    let mut found = Vec::new();
    let mut init = 0;
    for segment in history.split(|e| *e == Entry::Cut) {
        if segment.is_empty() {
            continue;
        }
        found.push((init, segment));
        init = match segment.last() {
            Some(Entry::Return(0, Ret::Read(v))) => *v,
            last => panic!("a segment ends with {last:?}, not thread 0's read"),
        };
    }
    found
}

/// Finds stale reads, a sufficient (not necessary) sign of non-linearizability that is cheap
/// to compute and easy to read: an operation returned value `v` although another write
/// completed after `v`'s write completed and before the operation began. `init` is the value
/// before the history.
pub fn stale_reads(init: i64, history: &[Entry]) -> Vec<String> {
    // Every completed operation: (thread, op, ret, invoked at, returned at), times are indexes.
    let mut open: BTreeMap<ThreadId, (Op, usize)> = BTreeMap::new();
    let mut ops = Vec::new();
    for (at, entry) in history.iter().enumerate() {
        match entry {
            Entry::Invoke(t, op) => {
                open.insert(*t, (op.clone(), at));
            }
            Entry::Return(t, ret) => {
                let (op, invoked) = open.remove(t).expect("a return follows its invocation");
                ops.push((*t, op, ret.clone(), invoked, at));
            }
            Entry::Cut => {}
        }
    }
    let writes: BTreeMap<i64, (usize, usize)> = ops
        .iter()
        .filter_map(|(_, op, _, invoked, returned)| match *op {
            Op::Write(v) | Op::Swap(v) => Some((v, (*invoked, *returned))),
            Op::Read => None,
        })
        .collect();
    let mut found = Vec::new();
    for (t, op, ret, invoked, _) in &ops {
        let (Ret::Read(v) | Ret::Swapped(v)) = ret else {
            continue;
        };
        // When `v`'s write completed; `None` for the initial value (before everything).
        let v_done = match writes.get(v) {
            Some(&(_, done)) => Some(done),
            None if *v == init => None,
            None => {
                found.push(format!(
                    "thread {t}: {op:?} returned {v}, which nobody wrote"
                ));
                continue;
            }
        };
        let newer = writes.iter().find(|(w, &(w_invoked, w_done))| {
            *w != v && v_done.is_none_or(|d| d < w_invoked) && w_done < *invoked
        });
        if let Some((w, (w_invoked, w_done))) = newer {
            found.push(format!(
                "thread {t}: {op:?} invoked at event {invoked} returned {v}, but {w} was \
             written at events {w_invoked}..{w_done}, after {v}'s write ended ({v_done:?})"
            ));
        }
    }
    found
}

/// What [`linearizable`] measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Operations recorded (and checked).
    pub ops: usize,
    /// Time of the recorded run.
    pub recorded: Duration,
    /// Segments checked.
    pub segments: usize,
    /// Time of all checks.
    pub checked: Duration,
    /// Time of the slowest check of one segment.
    pub slowest: Duration,
}

/// Records a run of the random workload on a cluster of `c` under `policy` and asserts that
/// every segment of every object's history is linearizable. On failure, the panic message
/// names the segment, the checker's verdict and any stale reads, and the segment is saved
/// to a file in the temporary directory.
pub fn linearizable(c: &dyn Cluster, policy: WritePolicy, seed: u64) -> Report {
    let began = Instant::now();
    let histories = record(c, policy, seed);
    let recorded = began.elapsed();
    let ops: usize = histories
        .iter()
        .flatten()
        .filter(|e| matches!(e, Entry::Return(..)))
        .count();
    assert_eq!(ops, THREADS * SEGMENTS * SEGMENT_OPS + OBJECTS * SEGMENTS);
    let began = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut segments_checked = 0;
    for (k, history) in histories.iter().enumerate() {
        for (s, (init, segment)) in segments(history).into_iter().enumerate() {
            let check_began = Instant::now();
            let verdict = check(init, segment);
            slowest = slowest.max(check_began.elapsed());
            segments_checked += 1;
            if verdict != Verdict::Linearizable {
                let path = std::env::temp_dir()
                    .join(format!("coherence-lin-{policy:?}-{seed:#x}-{k}-{s}.txt"));
                let dump: Vec<String> = segment.iter().map(|e| format!("{e:?}")).collect();
                std::fs::write(&path, dump.join("\n")).expect("write the history");
                panic!(
                    "{policy:?}, seed {seed:#x}: segment {s} of lin-{k} (from {init}, {} \
                     events): {verdict:?}; stale reads: {:?}; history in {}",
                    segment.len(),
                    stale_reads(init, segment),
                    path.display()
                );
            }
        }
    }
    Report {
        ops,
        recorded,
        segments: segments_checked,
        checked: began.elapsed(),
        slowest,
    }
}

/// Runs the random workload on a fresh cluster and returns each object's history.
///
/// # Panics
/// If an operation fails, naming the thread and the operation.
fn record(c: &dyn Cluster, policy: WritePolicy, seed: u64) -> Vec<Vec<Entry>> {
    let config = config(policy);
    let histories: Vec<Mutex<Vec<Entry>>> = (0..OBJECTS).map(|_| Mutex::default()).collect();
    let team = Team::default();
    // One after the other: a member's node runs before the next member's transport asks it to
    // be taken in.
    let nodes: Vec<Node> = fresh(c, NODES)
        .into_iter()
        .map(|start| Node::start(start().expect("a transport starts"), config.clone()))
        .map(|node| node.expect("a node starts"))
        .collect();
    let objects: Vec<Vec<DistObj<i64>>> = nodes
        .iter()
        .map(|node| {
            (0..OBJECTS)
                .map(|k| node.object(&format!("lin-{k}"), 0i64).expect("open"))
                .collect()
        })
        .collect();
    let (histories, team) = (&histories, &team);
    let failures: Vec<String> = thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let objects = &objects[t / THREADS_PER_NODE];
                scope.spawn(move || {
                    let meeting = Meeting::Team(team);
                    let outcome = workload(objects, histories, &meeting, t as ThreadId, seed);
                    if let Err(e) = &outcome {
                        meeting.call_off(format_args!("thread {t}"), e);
                    }
                    outcome
                })
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a thread panicked".into()))
                    .err()
            })
            .collect()
    });
    for node in nodes {
        node.shutdown().expect("shutdown");
    }
    assert!(failures.is_empty(), "the recorded run failed: {failures:?}");
    histories
        .iter()
        .map(|h| std::mem::take(&mut *lock(h)))
        .collect()
}

/// One thread's share of the workload: random operations, and a quiescent point every
/// [`SEGMENT_OPS`] of them, where thread 0 reads every object and cuts the histories.
fn workload(
    objects: &[DistObj<i64>],
    histories: &[Mutex<Vec<Entry>>],
    meeting: &Meeting<'_>,
    thread: ThreadId,
    seed: u64,
) -> Outcome {
    let who = format!("thread {thread}");
    let mut arrivals = 0;
    let mut meet = || {
        arrivals += THREADS as u64;
        meeting.meet(who.as_str(), arrivals)
    };
    let mut rng = StdRng::seed_from_u64(seed ^ u64::from(thread));
    for i in 0..SEGMENTS * SEGMENT_OPS {
        let k = rng.gen_range(0..OBJECTS);
        let value = i64::from(thread + 1) * 1_000_000 + i as i64;
        let op = match rng.gen_range(0..4) {
            0 | 1 => Op::Read,
            2 => Op::Write(value),
            _ => Op::Swap(value),
        };
        run(&objects[k], &histories[k], thread, op)?;
        if (i + 1) % SEGMENT_OPS == 0 {
            meet()?;
            if thread == 0 {
                for (obj, history) in objects.iter().zip(histories) {
                    run(obj, history, thread, Op::Read)?;
                    lock(history).push(Entry::Cut);
                }
            }
            meet()?;
        }
    }
    Ok(())
}

/// Runs `op` on `obj`, recording its invocation and return in `history`.
fn run(obj: &DistObj<i64>, history: &Mutex<Vec<Entry>>, thread: ThreadId, op: Op) -> Outcome {
    let log = |entry| lock(history).push(entry);
    log(Entry::Invoke(thread, op.clone()));
    let ret = match op {
        Op::Read => obj.read().map(|v| Ret::Read(*v)),
        Op::Write(v) => obj.write(v).map(|()| Ret::Written),
        Op::Swap(v) => obj.update(|x| Ret::Swapped(std::mem::replace(x, v))),
    };
    let ret = ret.map_err(|e| format!("thread {thread}: {op:?} on {}: {e}", obj.name()))?;
    log(Entry::Return(thread, ret));
    Ok(())
}
