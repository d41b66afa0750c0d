//! The scenarios, each written once as a function of one [`Rank`]. Every scenario works with
//! 2 ranks or more; a thread cluster runs it with [`Scenario::ranks`], a process cluster with
//! as many as it has. A process cluster runs them in the order of [`SCENARIOS`] on one
//! cluster, so object names never repeat across scenarios, and each scenario but the last ends
//! with every rank's node still running.

use std::collections::BTreeMap;
use std::thread;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coherence_core::{DistObj, Error};
use serde::{Deserialize, Serialize};

use super::{check, read, Need, OrFail, Outcome, Rank, Who, PATIENCE, TIMEOUT};

/// A named scenario every rank runs.
#[derive(Clone, Copy)]
pub struct Scenario {
    /// Its name: the test module of a thread suite, the line a process cluster prints.
    pub name: &'static str,
    /// How many ranks a thread cluster runs it with.
    pub ranks: usize,
    /// Whether the last rank is a late joiner: a thread cluster starts its node only once
    /// rank 0 says so. A ZeroMQ launcher starts the last process then, so this scenario comes
    /// first.
    pub late_joiner: bool,
    /// What it needs that not every kind of cluster has; it is skipped where that is missing.
    pub needs: Option<Need>,
    /// The scenario's code, run by every rank.
    pub run: fn(&mut Rank<'_>) -> Outcome,
}

impl std::fmt::Debug for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// Every scenario, in the order a process cluster runs them: the late joiner first, so that
/// under ZeroMQ the last process joins before anything else happened; the shutdown last,
/// since the ranks leave in it.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "late_joiner",
        ranks: 4,
        late_joiner: true,
        needs: None,
        run: late_joiner,
    },
    scenario("lab_integer_and_dict", 4, lab_integer_and_dict),
    scenario("counter", 4, counter),
    scenario("late_opener", 3, late_opener),
    scenario("concurrent_create", 4, concurrent_create),
    scenario("many_objects", 4, many_objects),
    scenario("shared_node", 2, shared_node),
    scenario("no_starvation", 3, no_starvation),
    scenario(
        "no_starvation_by_local_threads",
        2,
        no_starvation_by_local_threads,
    ),
    scenario("large_value", 3, large_value),
    scenario("type_mismatch", 3, type_mismatch),
    Scenario {
        name: "timeouts_are_errors",
        ranks: 2,
        late_joiner: false,
        needs: Some(Need::SilentFounder),
        run: timeouts_are_errors,
    },
    scenario("shutdown_hands_tokens_on", 4, shutdown_hands_tokens_on),
];

/// A scenario every kind of cluster runs, all ranks from the start.
const fn scenario(name: &'static str, ranks: usize, run: fn(&mut Rank<'_>) -> Outcome) -> Scenario {
    Scenario {
        name,
        ranks,
        late_joiner: false,
        needs: None,
        run,
    }
}

/// A user struct as a value type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Who wrote it.
    pub owner: String,
    /// Some payload.
    pub items: Vec<u32>,
    /// A nested map.
    pub tags: BTreeMap<String, i64>,
}

/// A struct with the same shape as [`Record`] but another type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtherRecord {
    /// Who wrote it.
    pub owner: String,
    /// Some payload.
    pub items: Vec<u32>,
    /// A nested map.
    pub tags: BTreeMap<String, i64>,
}

/// Updates every contending rank must complete in the no-starvation scenarios' 1.5 s: a
/// starved rank completes none (its update times out), a served one hundreds or more.
pub const MIN_PROGRESS: usize = 20;

/// How long the no-starvation scenarios contend.
const CONTEND: Duration = Duration::from_millis(1500);

fn write<T>(who: Who, obj: &DistObj<T>, value: T) -> Outcome
where
    T: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    obj.write(value)
        .or_fail(format_args!("{who} write {:?}", obj.name()))
}

/// `update(+by)`, returning the new value.
fn add(who: Who, obj: &DistObj<i64>, by: i64) -> Result<i64, String> {
    obj.update(|v| {
        *v += by;
        *v
    })
    .or_fail(format_args!("{who} update {:?}", obj.name()))
}

/// Joins scoped threads, returning the first failure (or panic) as an error.
fn join_all<R>(
    who: Who,
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
                failure.get_or_insert(format!("{who}: a scenario thread panicked"));
            }
        }
    }
    failure.map_or(Ok(results), Err)
}

/// No increment lost or doubled: the values updates of a counter starting at 0 returned,
/// sorted, are exactly 1..=total.
fn check_increments(mut seen: Vec<i64>, total: i64) -> Outcome {
    seen.sort_unstable();
    check(seen.iter().copied().eq(1..=total), || {
        format!("update results are not exactly 1..={total}")
    })
}

/// A late joiner starts from the current values and versions, never its inits: every rank but
/// the last opens an int, a struct and a counter and writes them, then keeps updating the
/// counter until the last rank has opened them; only then does the last rank come (its node
/// or process starts only then, except under MPI, where it only opens the objects then). Its
/// updates and writes interleave with the others' and nothing is lost; every rank sees its
/// writes.
fn late_joiner(r: &mut Rank<'_>) -> Outcome {
    const LATE_BUSY: i64 = 50;
    let late = r.size - 1;
    let founders = late as u64;
    let who = r.who();
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
        add(who, &int, 10 + r.rank as i64)?;
        if r.rank == 0 {
            rec.update(|v| v.items.push(4))
                .or_fail("rank 0 update \"late-join/struct\"")?;
        }
        written
            .update(|w| *w += 1)
            .or_fail(format_args!("{who} update \"late-join/written\""))?;
        if r.rank == 0 {
            r.wait_until(&written, |&w| w >= founders)?;
            r.late_ready();
        }
        // Keep updating while the last rank joins and opens.
        let began = Instant::now();
        let mut mine = 0u64;
        while !read(who, &joined)? {
            add(who, &busy, 1)?;
            mine += 1;
            check(began.elapsed() < PATIENCE, || {
                format!("{who}: the late rank did not open within {PATIENCE:?}")
            })?;
            thread::sleep(Duration::from_millis(1));
        }
        let counts = r.open("late-join/busy-counts", BTreeMap::<u32, u64>::new())?;
        counts
            .update(|c| c.insert(r.rank as u32, mine))
            .or_fail(format_args!("{who} update \"late-join/busy-counts\""))?;
    } else {
        r.wait_until(&written, |&w| w >= founders)?;
        let int = r.open("late-join/int", -999i64)?;
        let expected: i64 = (0..late as i64).map(|i| 10 + i).sum();
        r.read_expecting(&int, &expected, "on the late rank (its init is -999)")?;
        r.expect_version(&int, founders, "on the late rank")?;
        let other = Record {
            owner: "not me".to_string(),
            items: Vec::new(),
            tags: BTreeMap::new(),
        };
        let rec = r.open("late-join/struct", other)?;
        r.read_expecting(&rec, &written_record, "on the late rank")?;
        let busy = r.open("late-join/busy", -1_000_000i64)?;
        for _ in 0..LATE_BUSY {
            add(who, &busy, 1)?;
        }
        write(who, &int, 1000)?;
        write(who, &rec, joiner_record.clone())?;
        write(who, &joined, true)?;
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
    add(who, &int, 1)?;
    r.sync()?;
    r.read_expecting(&int, &(1000 + r.size as i64), "after everyone's update")?;
    r.sync()
}

/// The lab's integer and dictionary tests: every rank sees the initial values; each rank
/// writes "int" in turn and every rank reads it and its version; the same with increments;
/// each rank inserts its key (and "last") into a map in one update, in turn, and every rank
/// reads exactly the keys inserted so far; rank 0 replaces the whole map.
fn lab_integer_and_dict(r: &mut Rank<'_>) -> Outcome {
    let who = r.who();
    let int = r.open("lab/int", 0i64)?;
    let dict = r.open("lab/dict", BTreeMap::<String, i64>::new())?;
    r.sync()?;
    r.read_expecting(&int, &0, "on open")?;
    r.read_expecting(&dict, &BTreeMap::new(), "on open")?;
    r.sync()?;
    let check_int = |expected: i64, version: u64, after: &str| -> Outcome {
        r.read_expecting(&int, &expected, format_args!("after {after}"))?;
        r.expect_version(&int, version, format_args!("after {after}"))
    };
    for turn in 0..r.size {
        let value = 100 * (turn as i64 + 1);
        if turn == r.rank {
            write(who, &int, value)?;
        }
        r.sync()?;
        check_int(value, turn as u64 + 1, &format!("rank {turn}'s write"))?;
        r.sync()?;
    }
    let base = 100 * r.size as i64;
    for turn in 0..r.size {
        let value = base + turn as i64 + 1;
        if turn == r.rank {
            let new = add(who, &int, 1)?;
            check(new == value, || {
                format!("{who}: update returned {new}, expected {value}")
            })?;
        }
        r.sync()?;
        let version = (r.size + turn + 1) as u64;
        check_int(value, version, &format!("rank {turn}'s update"))?;
        r.sync()?;
    }
    let mut expected = BTreeMap::new();
    for turn in 0..r.size {
        let key = format!("rank-{turn}");
        let value = 10 * turn as i64;
        if turn == r.rank {
            dict.update(|d| {
                d.insert(key.clone(), value);
                d.insert("last".to_string(), turn as i64);
            })
            .or_fail(format_args!("{who} update \"lab/dict\""))?;
        }
        expected.insert(key, value);
        expected.insert("last".to_string(), turn as i64);
        r.sync()?;
        r.read_expecting(&dict, &expected, format_args!("after rank {turn}'s insert"))?;
        r.sync()?;
    }
    let replaced = BTreeMap::from([("replaced".to_string(), 1)]);
    if r.rank == 0 {
        write(who, &dict, replaced.clone())?;
    }
    r.sync()?;
    r.read_expecting(&dict, &replaced, "after rank 0 replaced it")?;
    r.sync()
}

/// Every rank adds 1 three hundred times at once: each rank's results increase, all results
/// together are exactly 1..=300*size, and every rank then reads the total at that version.
fn counter(r: &mut Rank<'_>) -> Outcome {
    const PER_RANK: i64 = 300;
    let who = r.who();
    let counter = r.open("updates/counter", 0i64)?;
    r.sync()?;
    let mine = (0..PER_RANK)
        .map(|_| add(who, &counter, 1))
        .collect::<Result<Vec<i64>, String>>()?;
    check(mine.windows(2).all(|w| w[0] < w[1]), || {
        format!("{who}: its own updates returned non-increasing values")
    })?;
    let all = r.gather("updates/results", mine)?;
    let total = PER_RANK * r.size as i64;
    check_increments(all.into_iter().flat_map(|(_, v)| v).collect(), total)?;
    r.read_expecting(&counter, &total, "after every update")?;
    r.expect_version(&counter, total as u64, "after every update")?;
    r.sync()
}

/// The last rank opens an object only after the others wrote it: it starts from the current
/// value and version, not its init.
fn late_opener(r: &mut Rank<'_>) -> Outcome {
    let late = r.size - 1;
    if r.rank != late {
        let obj = r.open("late/value", String::from("first"))?;
        obj.update(|s| s.push_str(&format!("+{}", r.rank)))
            .or_fail(format_args!("{} update \"late/value\"", r.who()))?;
    }
    r.sync()?;
    if r.rank == late {
        let obj = r.open("late/value", String::from("late init"))?;
        let value = read(r.who(), &obj)?;
        check(
            value.starts_with("first") && value.matches('+').count() == late,
            || format!("the late opener saw {value:?}"),
        )?;
        r.expect_version(&obj, late as u64, "on the late opener")?;
    }
    r.sync()
}

/// Every rank opens the same 10 new names at once with its own inits: exactly one init wins
/// each name, and every rank sees the same one.
fn concurrent_create(r: &mut Rank<'_>) -> Outcome {
    const NAMES: usize = 10;
    r.sync()?;
    let objects = (0..NAMES)
        .map(|k| r.open(&format!("create/{k}"), (100 * k + r.rank) as i64))
        .collect::<Result<Vec<_>, String>>()?;
    r.sync()?;
    let values = objects
        .iter()
        .map(|o| read(r.who(), o))
        .collect::<Result<Vec<i64>, String>>()?;
    let all = r.gather("create/seen", values)?;
    for k in 0..NAMES {
        let winner = all[0].1[k];
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
fn many_objects(r: &mut Rank<'_>) -> Outcome {
    const OBJECTS: usize = 40;
    const THREADS: usize = 2;
    const ROUNDS: usize = 3;
    let who = r.who();
    let order: Vec<usize> = (0..OBJECTS).map(|k| (k + r.rank * 10) % OBJECTS).collect();
    let mut objects: Vec<Option<DistObj<i64>>> = vec![None; OBJECTS];
    for &k in &order {
        objects[k] = Some(r.open(&format!("many/{k}"), 1000 * k as i64)?);
    }
    let objects: Vec<DistObj<i64>> = objects.into_iter().flatten().collect();
    r.sync()?;
    thread::scope(|scope| {
        let handles = (0..THREADS)
            .map(|th| {
                let (objects, order) = (&objects, &order);
                scope.spawn(move || -> Outcome {
                    for _ in 0..ROUNDS {
                        for j in 0..OBJECTS {
                            add(who, &objects[order[(j + th * 7) % OBJECTS]], 1)?;
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        join_all(who, handles)
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
fn shared_node(r: &mut Rank<'_>) -> Outcome {
    const THREADS: usize = 4;
    const PER_THREAD: usize = 100;
    let who = r.who();
    let total = (r.size * THREADS * PER_THREAD) as i64;
    let counter = r.open("shared/counter", 0i64)?;
    r.sync()?;
    let mine: Vec<i64> = thread::scope(|scope| {
        let handles = (0..THREADS)
            .map(|th| {
                let counter = &counter;
                scope.spawn(move || -> Result<Vec<i64>, String> {
                    let mut last = 0;
                    let mut mine = Vec::with_capacity(PER_THREAD);
                    for _ in 0..PER_THREAD {
                        let now = read(who, counter)?;
                        check(now >= last, || {
                            format!("{who} thread {th}: read {now} after {last}")
                        })?;
                        let new = add(who, counter, 1)?;
                        check(new > now, || {
                            format!("{who} thread {th}: update {new} after {now}")
                        })?;
                        mine.push(new);
                        last = new;
                    }
                    Ok(mine)
                })
            })
            .collect();
        join_all(who, handles)
    })?
    .into_iter()
    .flatten()
    .collect();
    let all = r.gather("shared/results", mine)?;
    check_increments(all.into_iter().flat_map(|(_, v)| v).collect(), total)?;
    r.read_expecting(&counter, &total, "after every update")?;
    r.sync()
}

/// No writer starves under contention: every rank hammers `update(+1)` on one counter for
/// 1.5 s. Every rank keeps completing updates ([`MIN_PROGRESS`] at least; the share itself
/// depends on scheduling, so it belongs in the benchmark), none fails or takes a quarter of
/// the timeout, the results together are exactly 1..=total, and every rank reads the total.
fn no_starvation(r: &mut Rank<'_>) -> Outcome {
    let who = r.who();
    let counter = r.open("contended", 0i64)?;
    r.sync()?;
    let deadline = Instant::now() + CONTEND;
    let mut mine = Vec::new();
    let mut slowest = Duration::ZERO;
    while Instant::now() < deadline {
        let began = Instant::now();
        mine.push(add(who, &counter, 1)?);
        slowest = slowest.max(began.elapsed());
    }
    check(slowest < TIMEOUT / 4, || {
        format!("{who}: an update took {slowest:?}")
    })?;
    let all = r.gather("contended/results", mine)?;
    let counts: Vec<usize> = all.iter().map(|(_, seen)| seen.len()).collect();
    for (rank, seen) in &all {
        check(seen.len() >= MIN_PROGRESS, || {
            format!("rank {rank} starved: {} updates of {counts:?}", seen.len())
        })?;
    }
    let seen: Vec<i64> = all.into_iter().flat_map(|(_, v)| v).collect();
    let total = seen.len() as i64;
    check_increments(seen, total)?;
    r.read_expecting(&counter, &total, "after every update")?;
    r.sync()
}

/// Local threads cannot starve remote writers: rank 0 updates a counter from two threads (one
/// of its updates is always queued), every other rank from one. Every rank keeps completing
/// updates, each well within the timeout, and none is lost.
fn no_starvation_by_local_threads(r: &mut Rank<'_>) -> Outcome {
    let who = r.who();
    let counter = r.open("hot", 0i64)?;
    let threads = if r.rank == 0 { 2 } else { 1 };
    r.sync()?;
    let deadline = Instant::now() + CONTEND;
    let per_thread = thread::scope(|scope| {
        let handles = (0..threads)
            .map(|_| {
                let counter = &counter;
                scope.spawn(move || -> Result<(u64, Duration), String> {
                    let (mut done, mut slowest) = (0, Duration::ZERO);
                    while Instant::now() < deadline {
                        let began = Instant::now();
                        add(who, counter, 1)?;
                        slowest = slowest.max(began.elapsed());
                        done += 1;
                    }
                    Ok((done, slowest))
                })
            })
            .collect();
        join_all(who, handles)
    })?;
    let slowest = per_thread.iter().map(|p| p.1).max().unwrap_or_default();
    check(slowest < TIMEOUT / 4, || {
        format!("{who}: an update took {slowest:?}")
    })?;
    let done: u64 = per_thread.iter().map(|p| p.0).sum();
    let all = r.gather("hot/done", done)?;
    for (rank, done) in &all {
        check(*done >= MIN_PROGRESS as u64, || {
            format!("rank {rank} starved: {done} updates of {all:?}")
        })?;
    }
    let total = all.iter().map(|(_, done)| done).sum::<u64>() as i64;
    r.read_expecting(&counter, &total, "after every update")?;
    r.sync()
}

/// A 16 MiB value written by each rank in turn and read whole by every rank.
fn large_value(r: &mut Rank<'_>) -> Outcome {
    const SIZE: usize = 16 << 20;
    let who = r.who();
    let obj = r.open("large/value", Bytes::new())?;
    r.sync()?;
    for turn in 0..r.size {
        let byte = turn as u8 + 1;
        if turn == r.rank {
            write(who, &obj, Bytes::from(vec![byte; SIZE]))?;
        }
        r.sync()?;
        let value = obj
            .read()
            .or_fail(format_args!("{who} read \"large/value\""))?;
        check(
            value.len() == SIZE && value.iter().all(|&b| b == byte),
            || format!("{who} read {} bytes after rank {turn}'s write", value.len()),
        )?;
        r.sync()?;
    }
    Ok(())
}

/// Checks that opening `object` failed with `Error::TypeMismatch` naming it and the types.
fn expect_mismatch<T>(
    who: Who,
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
            "{who} open {object:?} as {expected}: expected TypeMismatch naming {found}, got {e}"
        )),
        Ok(_) => Err(format!(
            "{who} open {object:?} as {expected}: expected TypeMismatch, got Ok"
        )),
    }
}

/// Rank 0 creates an i64 and a struct; every other rank opening them as a String or a
/// look-alike struct gets `TypeMismatch` naming both types, then opens them with the right
/// types and sees rank 0's values. The last rank writes a String that rank 0 reads, and rank 0
/// opening it as u8 gets `TypeMismatch`.
fn type_mismatch(r: &mut Rank<'_>) -> Outcome {
    let who = r.who();
    let record = Record {
        owner: "rank-0".to_string(),
        items: vec![1],
        tags: BTreeMap::new(),
    };
    let last = r.size - 1;
    let node = r.node()?;
    if r.rank == 0 {
        let x = r.open("typed/x", 5i64)?;
        write(who, &x, 6)?;
        r.open("typed/rec", record.clone())?;
        let as_string = node.object("typed/x", String::new());
        expect_mismatch(who, as_string, "typed/x", "String", "i64")?;
    }
    r.sync()?;
    if r.rank != 0 {
        let as_string = node.object("typed/x", "s".to_string());
        expect_mismatch(who, as_string, "typed/x", "String", "i64")?;
        let other = OtherRecord {
            owner: "b".to_string(),
            items: Vec::new(),
            tags: BTreeMap::new(),
        };
        let as_other = node.object("typed/rec", other);
        expect_mismatch(who, as_other, "typed/rec", "OtherRecord", "Record")?;
        let x = r.open("typed/x", 0i64)?;
        r.read_expecting(&x, &6, "after a mismatch")?;
        let rec = r.open("typed/rec", record.clone())?;
        r.read_expecting(&rec, &record, "after a mismatch")?;
    }
    if r.rank == last {
        let y = r.open("typed/y", "hello".to_string())?;
        write(who, &y, "world".to_string())?;
    }
    r.sync()?;
    if r.rank == 0 {
        let y = r.open("typed/y", String::new())?;
        r.read_expecting(&y, &"world".to_string(), "after the last rank's write")?;
        expect_mismatch(who, node.object("typed/y", 0u8), "typed/y", "u8", "String")?;
    }
    r.sync()
}

/// Timeouts are errors, not hangs. In a cluster whose founder (rank 0) never starts a node,
/// `object()` on rank 1 returns `Error::Timeout` after about the configured 300 ms, as does a
/// second attempt, and `shutdown` returns within the timeout too. (That a node's handles
/// return `Error::Stopped` after its shutdown while the others carry on is checked by
/// [`shutdown_hands_tokens_on`].)
fn timeouts_are_errors(r: &mut Rank<'_>) -> Outcome {
    const SHORT: Duration = Duration::from_millis(300);
    // Bounds "returns, does not hang", with room for a loaded 2-core machine.
    const SLACK: Duration = Duration::from_secs(5);
    if r.rank != 1 {
        // The silent founder, whose transport is a member nobody answers for.
        return Ok(());
    }
    let who = r.who();
    let node = r.start_node(&r.config.clone().timeout(SHORT))?;
    for attempt in 0..2 {
        let began = Instant::now();
        let result = node.object("orphan", 0i64);
        let took = began.elapsed();
        match result {
            Err(Error::Timeout {
                operation: "open",
                object,
                after,
            }) if object == "orphan" && after == SHORT => {}
            other => {
                return Err(format!(
                    "{who} attempt {attempt}: expected Err(Timeout) of open \"orphan\" after \
                     {SHORT:?}, got {other:?}"
                ))
            }
        }
        check(took >= SHORT && took < SHORT + SLACK, || {
            format!("{who} attempt {attempt}: open failed after {took:?}, configured {SHORT:?}")
        })?;
    }
    let node = r.node.take().expect("the node started above");
    let began = Instant::now();
    let result = node.shutdown();
    let took = began.elapsed();
    check(
        matches!(result, Ok(()) | Err(Error::Timeout { .. })),
        || format!("{who}: shutdown without a founder: {result:?}"),
    )?;
    check(took < SHORT + SLACK, || {
        format!("{who}: shutdown without a founder took {took:?}")
    })
}

/// Ranks leave while holding tokens and the others lose nothing. First the last rank (when
/// there are 3 ranks or more), then the founder (rank 0, which holds the genesis role) write
/// last and shut down; each time, the remaining ranks read the leaver's values (and a list
/// only the first leaver wrote), update, and (after the founder left) create a new object with
/// exactly one init winning. A leaver's handles return `Error::Stopped` afterwards. The
/// remaining ranks then shut down at once.
fn shutdown_hands_tokens_on(r: &mut Rank<'_>) -> Outcome {
    let who = r.who();
    let leavers: Vec<usize> = if r.size >= 3 {
        vec![r.size - 1, 0]
    } else {
        vec![0]
    };
    let a = r.open("handoff/a", 0i64)?;
    let b = r.open("handoff/b", String::new())?;
    let c = r.open("handoff/c", Vec::<u32>::new())?;
    let list = vec![leavers[0] as u32; 1000];
    r.sync()?;
    add(who, &a, 1)?;
    r.sync()?;
    let mut expected_a = r.size as i64;
    for (phase, &leaver) in leavers.iter().enumerate() {
        let value = 100 * (phase as i64 + 1);
        let text = format!("from-{leaver}");
        if r.rank == leaver {
            write(who, &a, value)?;
            write(who, &b, text)?;
            if phase == 0 {
                write(who, &c, list)?;
            }
            r.leave(&a)?;
            return check(
                b.read().is_err_and(|e| matches!(e, Error::Stopped(_))),
                || format!("{who}: read of handoff/b after shutdown is not Stopped"),
            );
        }
        r.see_off()?;
        let remaining = r.parties.get() as i64;
        let after = format!("after rank {leaver} left");
        r.read_expecting(&a, &value, &after)?;
        r.read_expecting(&b, &text, &after)?;
        r.read_expecting(&c, &list, &after)?;
        r.sync()?;
        add(who, &a, 1)?;
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
    let winner = read(who, &fresh)?;
    let stayed: Vec<usize> = (0..r.size).filter(|i| !leavers.contains(i)).collect();
    check(stayed.iter().any(|&i| winner == 1000 + i as i64), || {
        format!("{who}: handoff/new is {winner}, no remaining rank's init")
    })?;
    let all = r.gather_from("handoff/new-seen", stayed.len(), winner)?;
    check(all.iter().all(|&(_, v)| v == winner), || {
        format!("two inits won handoff/new: {all:?}")
    })?;
    r.read_expecting(&a, &expected_a, "at the end")?;
    r.leave(&a)
}
