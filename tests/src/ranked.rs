//! The conformance scenarios in per-rank form: one node per OS process, every process runs
//! every scenario. The MPI binary (`mpi_conformance`, one rank per process under `mpiexec`) and
//! the ZeroMQ binary (`zmq_conformance`, one node process per `--listen`) both call [`run`]
//! with their node, so one copy of the scenarios serves every multi-process transport.
//!
//! A process is a [`Rank`]: its node, its rank (the node id, `0..size`; rank 0 founded the
//! cluster) and the number of ranks. Ranks meet at a barrier built from the library itself (an
//! object counting arrivals), so the scenarios need nothing from the transport but the node.
//! Each scenario asserts its outcome on every rank and returns `Err` with a message naming the
//! rank and the step; the failing rank calls the barrier off, so the other ranks stop at their
//! next meeting instead of waiting for it. Every library call is bounded by [`TIMEOUT`] and
//! every wait for another rank by [`PATIENCE`]: nothing hangs.
//!
//! The in-process suite ([`crate::conformance`]) has the same kinds of scenario, with one node
//! per thread. What it has and this form does not: `timeouts_are_errors` needs a cluster whose
//! founder never starts a node, which a running per-process cluster is not (ZeroMQ timeouts
//! across processes are tested by `tests/tests/zmq_sigkill.rs`). What this form adds: a 16 MiB
//! value, and a late joiner that under ZeroMQ is a process started only after the others wrote
//! (see [`LATE_READY`]).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt::Display;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coherence_core::{Config, DistObj, Error, Node, WritePolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::conformance::{OtherRecord, Record, MIN_PROGRESS};

/// Bounds every library operation: long enough never to fire on a loaded machine, short
/// enough that a lost token fails the run.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Bounds every wait for other ranks (barriers, results).
pub const PATIENCE: Duration = Duration::from_secs(60);
/// How often a waiting rank looks again.
const POLL: Duration = Duration::from_micros(200);
/// How often a waiting rank checks whether the run was called off.
const CALL_OFF_POLL: Duration = Duration::from_millis(50);
/// The barrier object every rank opens first.
const BARRIER: &str = "conformance/barrier";

/// The rank that prints the scenario lines and the summary: rank 1 stays in the cluster to the
/// end of every scenario, including [`FINALE`], where the founder (rank 0) leaves early.
pub const REPORTER: usize = 1;

/// What rank 0 of a ZeroMQ run prints on stdout once the other ranks have written the objects
/// of the late-joiner scenario: a launcher starts the last rank's process only then, so that it
/// really joins a running cluster.
pub const LATE_READY: &str = "late joiner may join";

/// The name of the last scenario, in which the ranks leave.
pub const FINALE: &str = "shutdown hands tokens on";

/// The configuration every rank uses: [`TIMEOUT`] and the given write policy.
pub fn config(policy: WritePolicy) -> Config {
    Config::default().timeout(TIMEOUT).write_policy(policy)
}

/// A scenario's result on one rank: `Err` says what went wrong, naming the rank.
pub type Outcome = Result<(), String>;

/// A named scenario every rank runs.
#[derive(Clone, Copy)]
pub struct Scenario {
    /// What the runner prints.
    pub name: &'static str,
    /// The scenario's code, run by every rank.
    pub run: fn(&Rank) -> Outcome,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// The scenarios in the order [`run`] runs them; [`FINALE`] follows them. The late joiner comes
/// first so that under ZeroMQ the last process joins before anything else happened.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "late joiner starts from the current value",
        run: late_joiner,
    },
    Scenario {
        name: "lab integer and dictionary",
        run: lab,
    },
    Scenario {
        name: "concurrent updates",
        run: concurrent_updates,
    },
    Scenario {
        name: "late opener",
        run: late_opener,
    },
    Scenario {
        name: "concurrent create",
        run: concurrent_create,
    },
    Scenario {
        name: "many objects",
        run: many_objects,
    },
    Scenario {
        name: "threads sharing a node",
        run: shared_node,
    },
    Scenario {
        name: "no starvation",
        run: no_starvation,
    },
    Scenario {
        name: "no starvation by local threads",
        run: no_starvation_by_local_threads,
    },
    Scenario {
        name: "16 MiB value",
        run: large_value,
    },
    Scenario {
        name: "type mismatch",
        run: type_mismatch,
    },
];

/// The barrier's value: arrivals so far, and why the run was called off, if it was.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Barrier {
    /// Arrivals over all rounds.
    pub arrivals: u64,
    /// Set by a rank that failed, so the others stop instead of waiting for it.
    pub failed: Option<String>,
}

/// One process's view: its node, rank, the number of ranks, and the barrier.
pub struct Rank {
    node: Option<Node>,
    rank: usize,
    size: usize,
    barrier: DistObj<Barrier>,
    /// Ranks that still meet at the barrier (fewer once ranks left in [`FINALE`]).
    parties: Cell<u64>,
    /// Arrivals the next wait at the barrier must see: every round adds `parties`.
    target: Cell<u64>,
    late_ready: Option<Box<dyn Fn()>>,
}

impl std::fmt::Debug for Rank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rank")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

/// Turns a library error into a scenario failure that says what was being done.
trait OrFail<T> {
    fn or_fail(self, what: impl Display) -> Result<T, String>;
}

impl<T, E: Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: impl Display) -> Result<T, String> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn check(condition: bool, what: impl FnOnce() -> String) -> Outcome {
    if condition {
        Ok(())
    } else {
        Err(what())
    }
}

impl Rank {
    /// This rank: the node's id.
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks in the run.
    pub fn size(&self) -> usize {
        self.size
    }

    /// The node; present until the rank leaves in [`FINALE`].
    fn node(&self) -> &Node {
        self.node
            .as_ref()
            .expect("the rank's node is used after it left")
    }

    /// Opens `name`, failing with the rank and name.
    fn open<T>(&self, name: &str, init: T) -> Result<DistObj<T>, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.node()
            .object(name, init)
            .or_fail(format_args!("rank {} open {name:?}", self.rank))
    }

    /// Reads a copy of `obj`'s value.
    fn read<T>(&self, obj: &DistObj<T>) -> Result<T, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + Clone + 'static,
    {
        read(self.rank, obj)
    }

    /// Reads `obj` and fails, naming this rank and the object, unless it holds `expected`;
    /// `when` says at which point of the scenario.
    fn read_expecting<T>(&self, obj: &DistObj<T>, expected: &T, when: impl Display) -> Outcome
    where
        T: Serialize
            + DeserializeOwned
            + Send
            + Sync
            + Clone
            + PartialEq
            + std::fmt::Debug
            + 'static,
    {
        let seen = self.read(obj)?;
        check(&seen == expected, || {
            format!(
                "rank {}: {} is {seen:?} {when}, expected {expected:?}",
                self.rank,
                obj.name()
            )
        })
    }

    /// Waits until every rank still taking part arrived.
    pub fn sync(&self) -> Outcome {
        let target = self.target.get() + self.parties.get();
        self.target.set(target);
        self.barrier
            .update(|b| b.arrivals += 1)
            .or_fail(format_args!("rank {} barrier arrival", self.rank))?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let b = self
                .barrier
                .read()
                .or_fail(format_args!("rank {} barrier", self.rank))?;
            if let Some(why) = &b.failed {
                return Err(format!("rank {}: called off: {why}", self.rank));
            }
            if b.arrivals >= target {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "rank {}: {} of {target} arrivals at the barrier after {PATIENCE:?}",
                    self.rank, b.arrivals
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// Tells the other ranks to stop waiting (best effort: this rank may be the broken one).
    fn call_off(&self, why: &str) {
        let _ = self.barrier.update(|b| {
            b.failed.get_or_insert_with(|| why.to_string());
        });
    }

    /// Polls `obj` until `done` holds, for at most [`PATIENCE`]; stops early if the run was
    /// called off.
    fn wait_until<T>(&self, obj: &DistObj<T>, done: impl Fn(&T) -> bool) -> Result<T, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + Clone + std::fmt::Debug + 'static,
    {
        let began = Instant::now();
        let mut looked_at_barrier = began;
        loop {
            let value = self.read(obj)?;
            if done(&value) {
                return Ok(value);
            }
            if began.elapsed() > PATIENCE {
                return Err(format!(
                    "rank {}: {} still {value:?} after {PATIENCE:?}",
                    self.rank,
                    obj.name()
                ));
            }
            if looked_at_barrier.elapsed() > CALL_OFF_POLL {
                looked_at_barrier = Instant::now();
                let b = self
                    .barrier
                    .read()
                    .or_fail(format_args!("rank {} barrier", self.rank))?;
                if let Some(why) = &b.failed {
                    return Err(format!("rank {}: called off: {why}", self.rank));
                }
            }
            thread::sleep(POLL);
        }
    }

    /// Every rank puts its `mine` into the map object `name`, then waits until every rank
    /// did; returns the map, keyed by rank.
    fn gather<T>(&self, name: &str, mine: T) -> Result<BTreeMap<u32, T>, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + Clone + std::fmt::Debug + 'static,
    {
        let all = self.open(name, BTreeMap::<u32, T>::new())?;
        all.update(|m| m.insert(self.rank as u32, mine))
            .or_fail(format_args!("rank {} update {name:?}", self.rank))?;
        self.wait_until(&all, |m| m.len() >= self.size)
    }

    /// Shuts the node down; afterwards every operation on `handle` must return
    /// `Error::Stopped`.
    fn leave(&mut self, handle: &DistObj<i64>) -> Outcome {
        let node = self.node.take().expect("a rank leaves once");
        let id = node.id();
        node.shutdown()
            .or_fail(format_args!("rank {} shutdown", self.rank))?;
        let stopped = |what: &str, ok: bool| {
            check(ok, || {
                format!("rank {}: {what} after shutdown is not Stopped", self.rank)
            })
        };
        let is_stopped = |e: &Error| matches!(e, Error::Stopped(s) if *s == id);
        stopped("read", handle.read().is_err_and(|e| is_stopped(&e)))?;
        stopped("try_read", handle.try_read().is_err_and(|e| is_stopped(&e)))?;
        stopped("write", handle.write(1).is_err_and(|e| is_stopped(&e)))?;
        stopped(
            "update",
            handle.update(|v| *v += 1).is_err_and(|e| is_stopped(&e)),
        )
    }
}

fn read<T>(rank: usize, obj: &DistObj<T>) -> Result<T, String>
where
    T: Serialize + DeserializeOwned + Send + Sync + Clone + 'static,
{
    obj.read()
        .map(|v| T::clone(&v))
        .or_fail(format_args!("rank {rank} read {:?}", obj.name()))
}

fn write<T>(rank: usize, obj: &DistObj<T>, value: T) -> Outcome
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    obj.write(value)
        .or_fail(format_args!("rank {rank} write {:?}", obj.name()))
}

/// `update(+by)`, returning the new value.
fn add(rank: usize, obj: &DistObj<i64>, by: i64) -> Result<i64, String> {
    obj.update(|v| {
        *v += by;
        *v
    })
    .or_fail(format_args!("rank {rank} update {:?}", obj.name()))
}

/// Joins scoped threads, returning the first failure (or panic) as an error.
fn join_all<R>(
    rank: usize,
    handles: Vec<thread::ScopedJoinHandle<'_, Result<R, String>>>,
) -> Result<Vec<R>, String> {
    let mut results = Vec::new();
    let mut failure = None;
    for handle in handles {
        match handle.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                failure.get_or_insert(e);
            }
            Err(_) => {
                failure.get_or_insert(format!("rank {rank}: a scenario thread panicked"));
            }
        }
    }
    failure.map_or(Ok(results), Err)
}

/// Runs every scenario of [`SCENARIOS`], then [`FINALE`], on this process's `node` as rank
/// `node.id()` of `size`, and leaves the cluster. `label` starts every line printed.
///
/// The [`REPORTER`] rank prints `LABEL: NAME ... ok (TIME)` for each scenario: it passes only
/// once every rank did, since a failed rank calls the barrier off instead of arriving. A
/// failing rank prints `LABEL: NAME ... FAILED on rank R: WHY` on stderr and stops: it returns
/// `Err` at once, without leaving (its node is leaked, as if the process crashed, so that an
/// MPI rank does not block in `MPI_Finalize`); the caller should exit with a failure status.
/// `late_ready` is called on rank 0 once the others may join late (see [`LATE_READY`]).
/// Returns the number of scenarios passed, [`FINALE`] included.
pub fn run(
    node: Node,
    size: usize,
    label: &str,
    late_ready: Option<Box<dyn Fn()>>,
) -> Result<usize, String> {
    let rank = node.id() as usize;
    if size < 2 || rank >= size {
        let why = format!(
            "{label}: rank {rank} of {size}: the suite needs 2 ranks or more, ranks 0..size"
        );
        eprintln!("{why}");
        std::mem::forget(node);
        return Err(why);
    }
    let barrier = match node.object(BARRIER, Barrier::default()) {
        Ok(b) => b,
        Err(e) => {
            let why = format!("{label}: rank {rank}: cannot open the barrier: {e}");
            eprintln!("{why}");
            std::mem::forget(node);
            return Err(why);
        }
    };
    let mut r = Rank {
        node: Some(node),
        rank,
        size,
        barrier,
        parties: Cell::new(size as u64),
        target: Cell::new(0),
        late_ready,
    };
    let mut passed = 0;
    let mut outcome = Ok(());
    for scenario in SCENARIOS {
        let began = Instant::now();
        outcome = (scenario.run)(&r).map_err(|e| (scenario.name, e));
        if outcome.is_err() {
            break;
        }
        passed += 1;
        if rank == REPORTER {
            println!(
                "{label}: {} ... ok ({:.2?})",
                scenario.name,
                began.elapsed()
            );
        }
    }
    if outcome.is_ok() {
        let began = Instant::now();
        outcome = shutdown_hands_tokens_on(&mut r).map_err(|e| (FINALE, e));
        if outcome.is_ok() {
            passed += 1;
            if rank == REPORTER {
                println!("{label}: {FINALE} ... ok ({:.2?})", began.elapsed());
            }
        }
    }
    match outcome {
        Ok(()) => Ok(passed),
        Err((name, e)) => {
            let why = format!("{label}: {name} ... FAILED on rank {rank}: {e}");
            eprintln!("{why}");
            if r.node.is_some() {
                r.call_off(&format!("rank {rank} failed {name:?}: {e}"));
            }
            // Stop as a crash would: no leave, which under MPI would wait for every rank.
            std::mem::forget(r);
            Err(why)
        }
    }
}

/// The late joiner: every rank but the last opens the objects and writes them, then keeps
/// updating a counter until the last rank has opened them; only then does the last rank open
/// them (under ZeroMQ, its process starts only then: rank 0 calls `late_ready`). It must start
/// from the current values and versions, never its inits; its updates and writes interleave
/// with the others' and nothing is lost.
fn late_joiner(r: &Rank) -> Outcome {
    const LATE_BUSY: i64 = 50;
    let late = r.size - 1;
    let founders = late as u64;
    let record = Record {
        owner: "rank-0".to_string(),
        items: vec![1, 2, 3],
        tags: BTreeMap::from([("a".to_string(), -1)]),
    };
    let mut written_record = record.clone();
    written_record.items.push(4);
    let joiner_record = Record {
        owner: "late".to_string(),
        items: vec![9; 100],
        tags: BTreeMap::new(),
    };
    let written = r.open("late-join/written", 0u64)?;
    let joined = r.open("late-join/joined", false)?;
    if r.rank != late {
        let int = r.open("late-join/int", 0i64)?;
        let rec = r.open("late-join/struct", record.clone())?;
        let busy = r.open("late-join/busy", 0i64)?;
        add(r.rank, &int, 10 + r.rank as i64)?;
        if r.rank == 0 {
            rec.update(|v| v.items.push(4))
                .or_fail("rank 0 update \"late-join/struct\"")?;
        }
        written
            .update(|w| *w += 1)
            .or_fail(format_args!("rank {} update \"late-join/written\"", r.rank))?;
        if r.rank == 0 {
            r.wait_until(&written, |&w| w >= founders)?;
            if let Some(ready) = &r.late_ready {
                ready();
            }
        }
        // Keep updating while the last rank joins and opens.
        let began = Instant::now();
        let mut mine = 0u64;
        while !r.read(&joined)? {
            add(r.rank, &busy, 1)?;
            mine += 1;
            check(began.elapsed() < PATIENCE, || {
                format!(
                    "rank {}: the late rank did not open within {PATIENCE:?}",
                    r.rank
                )
            })?;
            thread::sleep(Duration::from_millis(1));
        }
        let counts = r.open("late-join/busy-counts", BTreeMap::<u32, u64>::new())?;
        counts
            .update(|c| c.insert(r.rank as u32, mine))
            .or_fail(format_args!(
                "rank {} update \"late-join/busy-counts\"",
                r.rank
            ))?;
    } else {
        r.wait_until(&written, |&w| w >= founders)?;
        let int = r.open("late-join/int", -999i64)?;
        let expected: i64 = (0..late as i64).map(|i| 10 + i).sum();
        r.read_expecting(&int, &expected, "on the late rank (its init is -999)")?;
        check(int.version() == founders, || {
            format!(
                "the late rank: late-join/int at version {}, expected {founders}",
                int.version()
            )
        })?;
        let other = Record {
            owner: "not me".to_string(),
            items: Vec::new(),
            tags: BTreeMap::new(),
        };
        let rec = r.open("late-join/struct", other)?;
        r.read_expecting(&rec, &written_record, "on the late rank")?;
        let busy = r.open("late-join/busy", -1_000_000i64)?;
        for _ in 0..LATE_BUSY {
            add(r.rank, &busy, 1)?;
        }
        write(r.rank, &int, 1000)?;
        write(r.rank, &rec, joiner_record.clone())?;
        write(r.rank, &joined, true)?;
    }
    r.sync()?;
    let int = r.open("late-join/int", 0i64)?;
    let rec = r.open("late-join/struct", record)?;
    let busy = r.open("late-join/busy", 0i64)?;
    let counts = r.open("late-join/busy-counts", BTreeMap::<u32, u64>::new())?;
    let counts = r.wait_until(&counts, |c| c.len() as u64 >= founders)?;
    r.read_expecting(&int, &1000, "after the late rank's write")?;
    r.read_expecting(&rec, &joiner_record, "after the late rank's write")?;
    let expected = counts.values().sum::<u64>() as i64 + LATE_BUSY;
    r.read_expecting(
        &busy,
        &expected,
        format_args!("after {counts:?} + {LATE_BUSY} increments"),
    )?;
    r.sync()?;
    add(r.rank, &int, 1)?;
    r.sync()?;
    r.read_expecting(&int, &(1000 + r.size as i64), "after everyone's update")?;
    r.sync()
}

/// The lab: each rank writes "int" in turn and every rank reads it (and its version); the
/// same with increments; each rank inserts into a map in turn; rank 0 replaces the map.
fn lab(r: &Rank) -> Outcome {
    let int = r.open("lab/int", 0i64)?;
    let dict = r.open("lab/dict", BTreeMap::<u32, i64>::new())?;
    r.sync()?;
    let check_int = |expected: i64, version: u64, after: &str| -> Outcome {
        r.read_expecting(&int, &expected, format_args!("after {after}"))?;
        check(int.version() == version, || {
            format!(
                "rank {}: int at version {} after {after}, expected {version}",
                r.rank,
                int.version()
            )
        })
    };
    for turn in 0..r.size {
        if turn == r.rank {
            write(r.rank, &int, turn as i64 * 10 + 1)?;
        }
        r.sync()?;
        check_int(
            turn as i64 * 10 + 1,
            turn as u64 + 1,
            &format!("rank {turn}'s write"),
        )?;
        r.sync()?;
    }
    let base = (r.size as i64 - 1) * 10 + 1;
    for turn in 0..r.size {
        if turn == r.rank {
            let new = add(r.rank, &int, 1)?;
            check(new == base + turn as i64 + 1, || {
                format!("rank {}: update returned {new}", r.rank)
            })?;
        }
        r.sync()?;
        let version = (r.size + turn + 1) as u64;
        check_int(
            base + turn as i64 + 1,
            version,
            &format!("rank {turn}'s update"),
        )?;
        r.sync()?;
    }
    for turn in 0..r.size {
        if turn == r.rank {
            dict.update(|m| m.insert(turn as u32, turn as i64))
                .or_fail(format_args!("rank {} update \"lab/dict\"", r.rank))?;
        }
        r.sync()?;
        let map = r.read(&dict)?;
        check(
            map.len() == turn + 1 && map.get(&(turn as u32)) == Some(&(turn as i64)),
            || {
                format!(
                    "rank {} read dict {map:?} after rank {turn}'s insert",
                    r.rank
                )
            },
        )?;
        r.sync()?;
    }
    let replaced = BTreeMap::from([(1000u32, -1i64)]);
    if r.rank == 0 {
        write(r.rank, &dict, replaced.clone())?;
    }
    r.sync()?;
    let map = r.read(&dict)?;
    check(map == replaced, || {
        format!("rank {} read dict {map:?} after rank 0 replaced it", r.rank)
    })?;
    r.sync()
}

/// No increment lost or doubled: the values updates of a counter starting at 0 returned,
/// sorted, are exactly 1..=total.
fn check_increments(mut seen: Vec<i64>, total: i64) -> Outcome {
    seen.sort_unstable();
    check(seen.iter().copied().eq(1..=total), || {
        format!("update results are not exactly 1..={total}")
    })
}

/// Every rank adds 1 three hundred times: each rank's results increase, and all results
/// together are exactly 1..=300*size.
fn concurrent_updates(r: &Rank) -> Outcome {
    const PER_RANK: u64 = 300;
    let counter = r.open("updates/counter", 0u64)?;
    r.sync()?;
    let mut mine = Vec::with_capacity(PER_RANK as usize);
    for _ in 0..PER_RANK {
        mine.push(
            counter
                .update(|c| {
                    *c += 1;
                    *c
                })
                .or_fail(format_args!("rank {} update \"updates/counter\"", r.rank))?,
        );
    }
    check(mine.windows(2).all(|w| w[0] < w[1]), || {
        format!(
            "rank {}: its own updates returned non-increasing values",
            r.rank
        )
    })?;
    let all = r.gather("updates/results", mine)?;
    let total = PER_RANK * r.size as u64;
    check_increments(
        all.values().flatten().map(|&v| v as i64).collect(),
        total as i64,
    )?;
    let last = r.read(&counter)?;
    check(last == total, || {
        format!("rank {}: final counter {last}", r.rank)
    })?;
    r.sync()
}

/// The last rank opens an object only after the others wrote it: it starts from the current
/// value, not its init.
fn late_opener(r: &Rank) -> Outcome {
    let late = r.size - 1;
    if r.rank != late {
        let obj = r.open("late/value", String::from("first"))?;
        obj.update(|s| s.push_str(&format!("+{}", r.rank)))
            .or_fail(format_args!("rank {} update \"late/value\"", r.rank))?;
    }
    r.sync()?;
    if r.rank == late {
        let obj = r.open("late/value", String::from("late init"))?;
        let value = r.read(&obj)?;
        check(
            value.starts_with("first") && value.matches('+').count() == late,
            || format!("the late opener saw {value:?}"),
        )?;
        check(obj.version() == late as u64, || {
            format!("version {}", obj.version())
        })?;
    }
    r.sync()
}

/// Every rank opens the same 10 new names at once with its own inits: exactly one init wins
/// each name, and every rank sees the same one.
fn concurrent_create(r: &Rank) -> Outcome {
    const NAMES: usize = 10;
    r.sync()?;
    let mut values = Vec::with_capacity(NAMES);
    for k in 0..NAMES {
        let obj = r.open(&format!("create/{k}"), (100 * k + r.rank) as i64)?;
        values.push(r.read(&obj)?);
    }
    let all = r.gather("create/seen", values)?;
    for k in 0..NAMES {
        let winner = all[&0][k];
        check((0..r.size).any(|i| winner == (100 * k + i) as i64), || {
            format!("create/{k}: {winner} is nobody's init")
        })?;
        for (rank, seen) in &all {
            check(seen[k] == winner, || {
                format!(
                    "create/{k}: rank {rank} sees {}, rank 0 sees {winner}",
                    seen[k]
                )
            })?;
        }
    }
    r.sync()
}

/// 40 objects: every rank opens all of them (each in its own order) and updates each of them
/// from 2 threads, 3 rounds; every final value is right on every rank.
fn many_objects(r: &Rank) -> Outcome {
    const OBJECTS: usize = 40;
    const THREADS: usize = 2;
    const ROUNDS: usize = 3;
    let order: Vec<usize> = (0..OBJECTS).map(|k| (k + r.rank * 10) % OBJECTS).collect();
    let mut objects: Vec<Option<DistObj<i64>>> = vec![None; OBJECTS];
    for &k in &order {
        objects[k] = Some(r.open(&format!("many/{k}"), 1000 * k as i64)?);
    }
    let objects: Vec<DistObj<i64>> = objects.into_iter().flatten().collect();
    r.sync()?;
    let rank = r.rank;
    thread::scope(|scope| {
        let handles = (0..THREADS)
            .map(|th| {
                let (objects, order) = (&objects, &order);
                scope.spawn(move || -> Outcome {
                    for _ in 0..ROUNDS {
                        for j in 0..OBJECTS {
                            add(rank, &objects[order[(j + th * 7) % OBJECTS]], 1)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(rank, handles)
    })?;
    r.sync()?;
    for (k, obj) in objects.iter().enumerate() {
        let expected = 1000 * k as i64 + (r.size * THREADS * ROUNDS) as i64;
        r.read_expecting(obj, &expected, "after every thread's updates")?;
    }
    r.sync()
}

/// Four threads share each rank's node, 100 updates each with reads between them: each
/// thread's reads and updates are monotonic, no increment is lost, and all update results
/// together are exactly 1..=400*size.
fn shared_node(r: &Rank) -> Outcome {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 100;
    let total = (r.size * THREADS * PER_THREAD) as i64;
    let counter = r.open("shared/counter", 0i64)?;
    r.sync()?;
    let rank = r.rank;
    let mine: Vec<i64> = thread::scope(|scope| {
        let handles = (0..THREADS)
            .map(|th| {
                let counter = counter.clone();
                scope.spawn(move || -> Result<Vec<i64>, String> {
                    let mut last = 0;
                    let mut mine = Vec::with_capacity(PER_THREAD);
                    for _ in 0..PER_THREAD {
                        let now = read(rank, &counter)?;
                        check(now >= last, || {
                            format!("rank {rank} thread {th}: read {now} after {last}")
                        })?;
                        let new = add(rank, &counter, 1)?;
                        check(new > now, || {
                            format!("rank {rank} thread {th}: update {new} after {now}")
                        })?;
                        mine.push(new);
                        last = new;
                    }
                    Ok(mine)
                })
            })
            .collect();
        join_all(rank, handles)
    })?
    .into_iter()
    .flatten()
    .collect();
    let all = r.gather("shared/results", mine)?;
    check_increments(all.into_values().flatten().collect(), total)?;
    let last = r.read(&counter)?;
    check(last == total, || format!("rank {}: final {last}", r.rank))?;
    r.sync()
}

/// How long the no-starvation scenarios contend.
const CONTEND: Duration = Duration::from_millis(1500);

/// No writer starves: every rank hammers `update(+1)` on one counter for 1.5 s. Every rank
/// keeps completing updates ([`MIN_PROGRESS`] at least), none takes a quarter of the timeout,
/// and the results together are exactly 1..=total.
fn no_starvation(r: &Rank) -> Outcome {
    let counter = r.open("contended", 0i64)?;
    r.sync()?;
    let deadline = Instant::now() + CONTEND;
    let mut mine = Vec::new();
    let mut slowest = Duration::ZERO;
    while Instant::now() < deadline {
        let began = Instant::now();
        mine.push(add(r.rank, &counter, 1)?);
        slowest = slowest.max(began.elapsed());
    }
    check(slowest < TIMEOUT / 4, || {
        format!("rank {}: an update took {slowest:?}", r.rank)
    })?;
    let all = r.gather("contended/results", mine)?;
    let counts: Vec<usize> = all.values().map(Vec::len).collect();
    for (rank, seen) in &all {
        check(seen.len() >= MIN_PROGRESS, || {
            format!("rank {rank} starved: {} updates of {counts:?}", seen.len())
        })?;
    }
    let seen: Vec<i64> = all.into_values().flatten().collect();
    let total = seen.len() as i64;
    check_increments(seen, total)?;
    r.read_expecting(&counter, &total, "after every update")?;
    r.sync()
}

/// Local threads cannot starve remote writers: rank 0 updates a counter from two threads (one
/// of its updates is always queued), every other rank from one. Every rank keeps completing
/// updates, each well within the timeout, and none is lost.
fn no_starvation_by_local_threads(r: &Rank) -> Outcome {
    let counter = r.open("hot", 0i64)?;
    let threads = if r.rank == 0 { 2 } else { 1 };
    r.sync()?;
    let deadline = Instant::now() + CONTEND;
    let rank = r.rank;
    let per_thread = thread::scope(|scope| {
        let handles = (0..threads)
            .map(|_| {
                let counter = &counter;
                scope.spawn(move || -> Result<(u64, Duration), String> {
                    let (mut done, mut slowest) = (0, Duration::ZERO);
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        add(rank, counter, 1)?;
                        slowest = slowest.max(began.elapsed());
                        done += 1;
                    }
                    Ok((done, slowest))
                })
            })
            .collect();
        join_all(rank, handles)
    })?;
    let slowest = per_thread.iter().map(|p| p.1).max().unwrap_or_default();
    check(slowest < TIMEOUT / 4, || {
        format!("rank {}: an update took {slowest:?}", r.rank)
    })?;
    let done: u64 = per_thread.iter().map(|p| p.0).sum();
    let all = r.gather("hot/done", done)?;
    for (rank, done) in &all {
        check(*done >= MIN_PROGRESS as u64, || {
            format!("rank {rank} starved: {done} updates of {all:?}")
        })?;
    }
    let total = all.values().sum::<u64>() as i64;
    r.read_expecting(&counter, &total, "after every update")?;
    r.sync()
}

/// A 16 MiB value written by each rank in turn and read by every rank.
fn large_value(r: &Rank) -> Outcome {
    const SIZE: usize = 16 << 20;
    let obj = r.open("large/value", Bytes::new())?;
    r.sync()?;
    for turn in 0..r.size {
        if turn == r.rank {
            write(r.rank, &obj, Bytes::from(vec![turn as u8 + 1; SIZE]))?;
        }
        r.sync()?;
        let value = obj
            .read()
            .or_fail(format_args!("rank {} read \"large/value\"", r.rank))?;
        check(
            value.len() == SIZE && value.iter().all(|&b| b == turn as u8 + 1),
            || {
                format!(
                    "rank {} read {} bytes after rank {turn}'s write",
                    r.rank,
                    value.len()
                )
            },
        )?;
        r.sync()?;
    }
    Ok(())
}

/// Checks that opening `object` failed with `Error::TypeMismatch` naming it and the types.
fn expect_mismatch<T>(
    rank: usize,
    result: Result<DistObj<T>, Error>,
    object: &str,
    expected: &str,
    found: &str,
) -> Outcome {
    match result {
        Err(Error::TypeMismatch {
            object: o,
            expected: e,
            found: f,
        }) if o == object && e.contains(expected) && f.contains(found) => Ok(()),
        Err(e) => Err(format!(
            "rank {rank} open {object:?} as {expected}: expected TypeMismatch naming {found}, got {e}"
        )),
        Ok(_) => Err(format!(
            "rank {rank} open {object:?} as {expected}: expected TypeMismatch, got Ok"
        )),
    }
}

/// Rank 0 creates an i64 and a struct; every other rank opening them as a String or a
/// look-alike struct gets `TypeMismatch` naming both types, then opens them with the right
/// types and sees rank 0's values. The last rank writes a String that rank 0 reads, and rank 0
/// opening it as u8 gets `TypeMismatch`.
fn type_mismatch(r: &Rank) -> Outcome {
    let record = Record {
        owner: "rank-0".to_string(),
        items: vec![1],
        tags: BTreeMap::new(),
    };
    let last = r.size - 1;
    if r.rank == 0 {
        let x = r.open("typed/x", 5i64)?;
        write(r.rank, &x, 6)?;
        r.open("typed/rec", record.clone())?;
        expect_mismatch(
            r.rank,
            r.node().object("typed/x", String::new()),
            "typed/x",
            "String",
            "i64",
        )?;
    }
    r.sync()?;
    if r.rank != 0 {
        expect_mismatch(
            r.rank,
            r.node().object("typed/x", String::new()),
            "typed/x",
            "String",
            "i64",
        )?;
        let other = OtherRecord {
            owner: "b".to_string(),
            items: Vec::new(),
            tags: BTreeMap::new(),
        };
        expect_mismatch(
            r.rank,
            r.node().object("typed/rec", other),
            "typed/rec",
            "OtherRecord",
            "Record",
        )?;
        let x = r.open("typed/x", 0i64)?;
        r.read_expecting(&x, &6, "after a mismatch")?;
        let rec = r.open("typed/rec", record.clone())?;
        r.read_expecting(&rec, &record, "after a mismatch")?;
    }
    if r.rank == last {
        let y = r.open("typed/y", "hello".to_string())?;
        write(r.rank, &y, "world".to_string())?;
    }
    r.sync()?;
    if r.rank == 0 {
        let y = r.open("typed/y", String::new())?;
        r.read_expecting(&y, &"world".to_string(), "after the last rank's write")?;
        expect_mismatch(
            r.rank,
            r.node().object("typed/y", 0u8),
            "typed/y",
            "u8",
            "String",
        )?;
    }
    r.sync()
}

/// The finale: ranks leave while holding tokens and the others lose nothing. First the last
/// rank (when there are 3 ranks or more), then the founder (rank 0, which holds the genesis
/// role) write last and shut down; each time, the remaining ranks read the leaver's values,
/// update, and (after the founder left) create a new object with exactly one init winning.
/// A leaver's handles return `Error::Stopped` afterwards. The remaining ranks then shut down.
///
/// The remaining ranks read right after the leaver's last barrier arrival, so they may be
/// served before, during or after its leave; all three must give its values, and their later
/// updates need every token, including those the leaver held.
fn shutdown_hands_tokens_on(r: &mut Rank) -> Outcome {
    let leavers: Vec<usize> = if r.size >= 3 {
        vec![r.size - 1, 0]
    } else {
        vec![0]
    };
    let a = r.open("handoff/a", 0i64)?;
    let b = r.open("handoff/b", String::new())?;
    let c = r.open("handoff/c", Vec::<u32>::new())?;
    r.sync()?;
    add(r.rank, &a, 1)?;
    r.sync()?;
    let mut expected_a = r.size as i64;
    for (phase, &leaver) in leavers.iter().enumerate() {
        let value = 100 * (phase as i64 + 1);
        let text = format!("from-{leaver}");
        if r.rank == leaver {
            write(r.rank, &a, value)?;
            write(r.rank, &b, text)?;
            write(r.rank, &c, vec![leaver as u32; 1000])?;
            // The last arrival: the others read once everyone is here, this rank leaves.
            r.sync()?;
            r.leave(&a)?;
            return check(
                b.read().is_err_and(|e| matches!(e, Error::Stopped(_))),
                || {
                    format!(
                        "rank {}: read of handoff/b after shutdown is not Stopped",
                        r.rank
                    )
                },
            );
        }
        r.sync()?;
        r.parties.set(r.parties.get() - 1);
        let remaining = r.parties.get() as i64;
        r.read_expecting(&a, &value, format_args!("after rank {leaver} left"))?;
        r.read_expecting(&b, &text, format_args!("after rank {leaver} left"))?;
        let seen = r.read(&c)?;
        check(seen == vec![leaver as u32; 1000], || {
            format!(
                "rank {}: handoff/c has {} items after rank {leaver} left",
                r.rank,
                seen.len()
            )
        })?;
        r.sync()?;
        add(r.rank, &a, 1)?;
        r.sync()?;
        expected_a = value + remaining;
        r.read_expecting(
            &a,
            &expected_a,
            format_args!("after updates without rank {leaver}"),
        )?;
        r.sync()?;
    }
    // Only ranks that stay get here; the genesis role has moved from rank 0.
    let fresh = r.open("handoff/new", 1000 + r.rank as i64)?;
    let winner = r.read(&fresh)?;
    let stayed: Vec<usize> = (0..r.size).filter(|i| !leavers.contains(i)).collect();
    check(stayed.iter().any(|&i| winner == 1000 + i as i64), || {
        format!(
            "rank {}: handoff/new is {winner}, no remaining rank's init",
            r.rank
        )
    })?;
    let seen = r.open("handoff/new-seen", BTreeMap::<u32, i64>::new())?;
    seen.update(|m| m.insert(r.rank as u32, winner))
        .or_fail(format_args!("rank {} update \"handoff/new-seen\"", r.rank))?;
    let all = r.wait_until(&seen, |m| m.len() >= stayed.len())?;
    check(all.values().all(|&v| v == winner), || {
        format!("two inits won handoff/new: {all:?}")
    })?;
    let last = r.read(&a)?;
    check(last == expected_a, || {
        format!("rank {}: final handoff/a {last}", r.rank)
    })?;
    r.sync()?;
    r.leave(&a)
}
