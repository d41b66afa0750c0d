//! The conformance scenarios over MPI, one node per rank: `mpiexec -n N mpi_conformance
//! [update|invalidate]`. Every rank runs every scenario; ranks meet at barriers built from the
//! library itself (an object counting arrivals), so the only MPI calls are the transport's.
//! Each scenario asserts its outcome on every rank; the process exits non-zero (and mpiexec
//! with it) on the first failure. Rank 0 prints one line per scenario and a summary.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coherence_core::{Config, DistObj, Error, Node, WritePolicy};
use transport_mpi::MpiTransport;

/// Bounds every library operation.
const TIMEOUT: Duration = Duration::from_secs(20);
/// Bounds every wait for other ranks.
const PATIENCE: Duration = Duration::from_secs(60);

/// One rank's view: its node, rank, world size and barrier.
struct Rank {
    node: Node,
    rank: usize,
    size: usize,
    barrier: DistObj<u64>,
    rounds: std::cell::Cell<u64>,
}

type Outcome = Result<(), String>;

/// A named scenario every rank runs.
type Scenario = (&'static str, fn(&Rank) -> Outcome);

impl Rank {
    /// Waits until every rank arrived.
    fn sync(&self) -> Outcome {
        self.rounds.set(self.rounds.get() + 1);
        let target = self.rounds.get() * self.size as u64;
        self.barrier
            .update(|a| *a += 1)
            .map_err(|e| e.to_string())?;
        wait_until(&self.barrier, |a| *a >= target)?;
        Ok(())
    }
}

/// Polls `obj` until `done` holds, for at most [`PATIENCE`].
fn wait_until<T>(obj: &DistObj<T>, done: impl Fn(&T) -> bool) -> Result<Arc<T>, String>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + std::fmt::Debug + 'static,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let value = obj.read().map_err(|e| e.to_string())?;
        if done(&value) {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: still {value:?} after {PATIENCE:?}",
                obj.name()
            ));
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn check(condition: bool, what: impl FnOnce() -> String) -> Outcome {
    if condition {
        Ok(())
    } else {
        Err(what())
    }
}

/// The lab: each rank writes "int" in turn, every rank reads it; the same with a map.
fn lab(r: &Rank) -> Outcome {
    let int = r.node.object("lab/int", 0i64).map_err(|e| e.to_string())?;
    let dict = r
        .node
        .object("lab/dict", BTreeMap::<u32, i64>::new())
        .map_err(|e| e.to_string())?;
    r.sync()?;
    for turn in 0..r.size {
        if turn == r.rank {
            int.write(turn as i64 * 10 + 1).map_err(|e| e.to_string())?;
            dict.update(|m| m.insert(turn as u32, turn as i64))
                .map_err(|e| e.to_string())?;
        }
        r.sync()?;
        let seen = *int.read().map_err(|e| e.to_string())?;
        check(seen == turn as i64 * 10 + 1, || {
            format!("rank {} read int {seen} after rank {turn}'s write", r.rank)
        })?;
        let map = dict.read().map_err(|e| e.to_string())?;
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
    Ok(())
}

/// Every rank adds 1 three hundred times; the results are exactly 1..=300*size.
fn concurrent_updates(r: &Rank) -> Outcome {
    let counter = r
        .node
        .object("updates/counter", 0u64)
        .map_err(|e| e.to_string())?;
    let results = r
        .node
        .object("updates/results", BTreeMap::<u32, Vec<u64>>::new())
        .map_err(|e| e.to_string())?;
    r.sync()?;
    let mut mine = Vec::with_capacity(300);
    for _ in 0..300 {
        mine.push(
            counter
                .update(|c| {
                    *c += 1;
                    *c
                })
                .map_err(|e| e.to_string())?,
        );
    }
    results
        .update(|all| all.insert(r.rank as u32, mine))
        .map_err(|e| e.to_string())?;
    let all = wait_until(&results, |all| all.len() == r.size)?;
    let mut seen: Vec<u64> = all.values().flatten().copied().collect();
    seen.sort_unstable();
    let expected: Vec<u64> = (1..=300 * r.size as u64).collect();
    check(seen == expected, || {
        format!("update results are not exactly 1..={}", 300 * r.size)
    })?;
    let total = *counter.read().map_err(|e| e.to_string())?;
    check(total == 300 * r.size as u64, || {
        format!("final counter {total}")
    })?;
    r.sync()
}

/// The last rank opens an object only after the others wrote it: it starts from the current
/// value, not its init.
fn late_opener(r: &Rank) -> Outcome {
    let late = r.size - 1;
    if r.rank != late {
        let obj = r
            .node
            .object("late/value", String::from("first"))
            .map_err(|e| e.to_string())?;
        obj.update(|s| s.push_str(&format!("+{}", r.rank)))
            .map_err(|e| e.to_string())?;
    }
    r.sync()?;
    if r.rank == late {
        let obj = r
            .node
            .object("late/value", String::from("late init"))
            .map_err(|e| e.to_string())?;
        let value = obj.read().map_err(|e| e.to_string())?;
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

/// A 16 MiB value written by each rank in turn and read by every rank.
fn large_value(r: &Rank) -> Outcome {
    const SIZE: usize = 16 << 20;
    let obj = r
        .node
        .object("large/value", Bytes::new())
        .map_err(|e| e.to_string())?;
    r.sync()?;
    for turn in 0..r.size {
        if turn == r.rank {
            obj.write(Bytes::from(vec![turn as u8 + 1; SIZE]))
                .map_err(|e| e.to_string())?;
        }
        r.sync()?;
        let value = obj.read().map_err(|e| e.to_string())?;
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

/// Rank 0 creates an i64; every other rank opening it as a String gets TypeMismatch.
fn type_mismatch(r: &Rank) -> Outcome {
    if r.rank == 0 {
        r.node.object("typed/x", 5i64).map_err(|e| e.to_string())?;
    }
    r.sync()?;
    if r.rank != 0 {
        match r.node.object("typed/x", String::new()) {
            Err(Error::TypeMismatch { .. }) => {}
            other => return Err(format!("opening an i64 as String gave {other:?}")),
        }
    }
    r.sync()
}

fn main() -> ExitCode {
    let policy = match std::env::args().nth(1).as_deref() {
        None | Some("update") => WritePolicy::Update,
        Some("invalidate") => WritePolicy::Invalidate,
        Some(other) => {
            eprintln!("unknown policy {other:?}: use update or invalidate");
            return ExitCode::from(2);
        }
    };
    let transport = match MpiTransport::init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("MPI: {e}");
            return ExitCode::FAILURE;
        }
    };
    let size = transport.size() as usize;
    let config = Config::default().timeout(TIMEOUT).write_policy(policy);
    let node = match Node::start(transport, config) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("node: {e}");
            return ExitCode::FAILURE;
        }
    };
    let barrier = match node.object("conformance/barrier", 0u64) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("barrier: {e}");
            return ExitCode::FAILURE;
        }
    };
    let r = Rank {
        rank: node.id() as usize,
        node,
        size,
        barrier,
        rounds: std::cell::Cell::new(0),
    };
    let scenarios: [Scenario; 5] = [
        ("lab integer and dictionary", lab),
        ("concurrent updates", concurrent_updates),
        ("late opener", late_opener),
        ("16 MiB value", large_value),
        ("type mismatch", type_mismatch),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, scenario) in scenarios {
        let start = Instant::now();
        match scenario(&r) {
            Ok(()) => {
                passed += 1;
                if r.rank == 0 {
                    println!(
                        "mpi -n {size} {policy:?}: {name} ... ok ({:.2?})",
                        start.elapsed()
                    );
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!(
                    "mpi -n {size} {policy:?}: {name} ... FAILED on rank {}: {e}",
                    r.rank
                );
                // The other ranks would wait at the next barrier: stop here, mpiexec ends them.
                break;
            }
        }
    }
    let Rank {
        node,
        barrier,
        rank,
        ..
    } = r;
    drop(barrier);
    if failed > 0 {
        std::process::exit(1);
    }
    if let Err(e) = node.shutdown() {
        eprintln!("shutdown: {e}");
        return ExitCode::FAILURE;
    }
    if rank == 0 {
        println!("mpi: {passed} passed, {failed} failed");
    }
    ExitCode::SUCCESS
}
