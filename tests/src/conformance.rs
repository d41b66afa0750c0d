//! The cross-transport conformance suite: scenarios that every transport must pass.
//!
//! Each scenario is a `pub fn` that takes a [`Cluster`], a provider of fresh transports, and
//! a [`WritePolicy`]. It starts one [`Node`] per transport on its own thread, runs, and asserts
//! real outcomes (values, versions, error variants, timings); a failure panics with a message
//! that names the node and the step. The in-memory transport runs them, through
//! [`LocalCluster`], in `tests/tests/local_conformance.rs`; the ZeroMQ transport runs the
//! same functions with its own [`Cluster`] (threads in one process). The same kinds of
//! scenario with one node per OS process, for MPI ranks and ZeroMQ node processes, are in
//! [`crate::ranked`]. The [`linearizability`] check is transport-agnostic in the same way.
//!
//! Nothing here can hang a test run: every operation is bounded by [`TIMEOUT`], and the
//! threads of a scenario meet at a [`Team`] barrier that gives up when a member panicked or
//! after [`TEAM_WAIT`].

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Error, Node, NodeId, Transport, WritePolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A provider of clusters for one transport.
pub trait Cluster: Sync {
    /// Starts a fresh cluster of `n` members and returns their transports in id order: the
    /// transport at index `i` has id `i`, so index 0 is the founding node.
    fn start(&self, n: usize) -> Vec<Box<dyn Transport>>;

    /// A late joiner into the cluster started last, or `None` if the transport cannot add a
    /// member to a running cluster.
    fn join(&self) -> Option<Box<dyn Transport>>;
}

/// Operation timeout of every scenario except the timeout scenario itself: long enough never
/// to fire on a slow, loaded machine, short enough that a hang fails the test.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Longest a scenario thread waits for the others at a [`Team`] barrier before it fails.
pub const TEAM_WAIT: Duration = Duration::from_secs(60);

/// The configuration the scenarios use: [`TIMEOUT`] and the given write policy.
pub fn config(policy: WritePolicy) -> Config {
    Config::default().timeout(TIMEOUT).write_policy(policy)
}

/// A reusable barrier for the threads of one scenario that never hangs: waiting fails (panics)
/// as soon as a member thread panicked, or after [`TEAM_WAIT`].
#[derive(Debug)]
pub struct Team {
    parties: usize,
    state: Mutex<TeamState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct TeamState {
    arrived: usize,
    generation: u64,
    broken: bool,
}

impl Team {
    /// A barrier for `parties` threads.
    pub fn new(parties: usize) -> Team {
        Team {
            parties,
            state: Mutex::new(TeamState::default()),
            cond: Condvar::new(),
        }
    }

    /// Waits until every party arrived.
    ///
    /// # Panics
    /// If a member panicked (see [`Team::member`]) or the others did not arrive in time.
    pub fn wait(&self) {
        let mut state = self.lock();
        assert!(!state.broken, "a member of the team failed");
        let generation = state.generation;
        state.arrived += 1;
        if state.arrived == self.parties {
            state.arrived = 0;
            state.generation += 1;
            self.cond.notify_all();
            return;
        }
        let deadline = Instant::now() + TEAM_WAIT;
        while state.generation == generation {
            assert!(!state.broken, "a member of the team failed");
            let now = Instant::now();
            if now >= deadline {
                state.broken = true;
                self.cond.notify_all();
                panic!("the team did not meet within {TEAM_WAIT:?}");
            }
            state = self
                .cond
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Marks the calling thread as a member: if it panics while the returned guard lives, the
    /// barrier breaks and every waiter fails instead of waiting for it.
    pub fn member(&self) -> Member<'_> {
        Member(self)
    }

    fn lock(&self) -> MutexGuard<'_, TeamState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Breaks its [`Team`] when dropped during a panic.
#[derive(Debug)]
pub struct Member<'a>(&'a Team);

impl Drop for Member<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            self.0.lock().broken = true;
            self.0.cond.notify_all();
        }
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

/// Starts a cluster of `n` and checks that it keeps the id-order promise of [`Cluster::start`].
fn fresh(c: &dyn Cluster, n: usize) -> Vec<Box<dyn Transport>> {
    let transports = c.start(n);
    assert_eq!(transports.len(), n, "the cluster has the wrong size");
    for (i, t) in transports.iter().enumerate() {
        assert_eq!(t.local_id() as usize, i, "transports are not in id order");
    }
    transports
}

fn start(transport: Box<dyn Transport>, config: &Config) -> Node {
    let id = transport.local_id();
    Node::start(transport, config.clone()).unwrap_or_else(|e| panic!("node {id} start: {e}"))
}

fn open<T>(node: &Node, name: &str, init: T) -> DistObj<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    node.object(name, init)
        .unwrap_or_else(|e| panic!("node {} open {name:?}: {e}", node.id()))
}

fn read<T>(node: NodeId, obj: &DistObj<T>) -> T
where
    T: Serialize + DeserializeOwned + Send + Sync + Clone + 'static,
{
    T::clone(
        &obj.read()
            .unwrap_or_else(|e| panic!("node {node} read {:?}: {e}", obj.name())),
    )
}

fn write<T>(node: NodeId, obj: &DistObj<T>, value: T)
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    obj.write(value)
        .unwrap_or_else(|e| panic!("node {node} write {:?}: {e}", obj.name()));
}

/// `update(+by)` returning the new value.
fn add(node: NodeId, obj: &DistObj<i64>, by: i64) -> i64 {
    obj.update(|v| {
        *v += by;
        *v
    })
    .unwrap_or_else(|e| panic!("node {node} update {:?}: {e}", obj.name()))
}

fn shutdown(node: Node) {
    let id = node.id();
    node.shutdown()
        .unwrap_or_else(|e| panic!("node {id} shutdown: {e}"));
}

/// Spawns a named scoped thread that is a member of `team`.
fn spawn<'s, 'e, R: Send + 's>(
    scope: &'s Scope<'s, 'e>,
    team: &'e Team,
    name: String,
    f: impl FnOnce() -> R + Send + 's,
) -> ScopedJoinHandle<'s, R> {
    thread::Builder::new()
        .name(name)
        .spawn_scoped(scope, move || {
            let _member = team.member();
            f()
        })
        .expect("spawn a scenario thread")
}

/// Joins every handle, then re-raises the first panic with its original payload.
fn join_all<R>(handles: Vec<ScopedJoinHandle<'_, R>>) -> Vec<R> {
    let mut results = Vec::new();
    let mut panic = None;
    for handle in handles {
        match handle.join() {
            Ok(r) => results.push(r),
            Err(payload) => {
                panic.get_or_insert(payload);
            }
        }
    }
    if let Some(payload) = panic {
        std::panic::resume_unwind(payload);
    }
    results
}

/// Runs `f(index, transport)` for every transport on its own thread, all members of `team`,
/// and returns the results in index order.
fn on_nodes<R: Send>(
    team: &Team,
    transports: Vec<Box<dyn Transport>>,
    f: impl Fn(usize, Box<dyn Transport>) -> R + Sync,
) -> Vec<R> {
    let f = &f;
    thread::scope(|scope| {
        let handles = transports
            .into_iter()
            .enumerate()
            .map(|(i, t)| spawn(scope, team, format!("node-{i}"), move || f(i, t)))
            .collect();
        join_all(handles)
    })
}

/// Asserts that `result` is `Err(Error::Stopped(id))`.
fn assert_stopped<R: std::fmt::Debug>(what: &str, id: NodeId, result: Result<R, Error>) {
    match result {
        Err(Error::Stopped(stopped)) => assert_eq!(stopped, id, "{what}: wrong node in Stopped"),
        other => panic!("{what} on stopped node {id}: expected Err(Stopped({id})), got {other:?}"),
    }
}

/// Asserts that every operation of a handle of the stopped node `id` returns `Stopped`.
fn assert_handle_stopped(id: NodeId, obj: &DistObj<i64>) {
    assert_stopped("read", id, obj.read());
    assert_stopped("try_read", id, obj.try_read());
    assert_stopped("write", id, obj.write(1));
    assert_stopped("update", id, obj.update(|v| *v += 1));
}

/// Records a discrepancy if `obj.version()` is not `expected` right after a read of the value
/// with that version. Collected rather than asserted at once, so that the scenario's other
/// checks still run; [`assert_versions`] reports them at the end.
fn check_version<T>(mismatches: &mut Vec<String>, obj: &DistObj<T>, expected: u64, step: &str)
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    let version = obj.version();
    if version != expected {
        mismatches.push(format!("{step}: version() {version}, expected {expected}"));
    }
}

/// Fails if [`check_version`] recorded any discrepancy.
fn assert_versions(id: NodeId, mismatches: &[String]) {
    assert!(
        mismatches.is_empty(),
        "node {id}: version() disagrees with the value just read: {mismatches:?}"
    );
}

/// Asserts that `result` is `Err(Error::TypeMismatch)` for `object`, naming the `expected`
/// and `found` types (a substring of each type name).
fn expect_mismatch<T>(
    id: NodeId,
    result: Result<DistObj<T>, Error>,
    object: &str,
    expected: &str,
    found: &str,
) {
    match result {
        Err(Error::TypeMismatch {
            object: o,
            expected: e,
            found: f,
        }) => {
            assert_eq!(o, object, "node {id}: TypeMismatch names the wrong object");
            assert!(e.contains(expected), "node {id}: expected type {e:?}");
            assert!(f.contains(found), "node {id}: found type {f:?}");
        }
        Err(e) => panic!("node {id} open {object:?}: expected TypeMismatch, got {e}"),
        Ok(_) => panic!("node {id} open {object:?}: expected TypeMismatch, got Ok"),
    }
}

/// The lab's integer and dictionary tests on 4 nodes: each node writes in turn and every node
/// reads and checks the value (and its version) after each turn; then all four nodes shut down
/// at once, each on its own thread, and every shutdown succeeds.
pub fn lab_integer_and_dict(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 4;
    let config = config(policy);
    let team = Team::new(N);
    on_nodes(&team, fresh(c, N), |i, t| {
        let node = start(t, &config);
        let id = node.id();
        let integer = open(&node, "lab-integer", 0i64);
        let dict = open(&node, "lab-dictionary", BTreeMap::<String, i64>::new());
        team.wait();
        assert_eq!(read(id, &integer), 0, "node {id}: initial integer");
        assert_eq!(
            read(id, &dict),
            BTreeMap::new(),
            "node {id}: initial dictionary"
        );
        team.wait();

        // Integer: plain writes in turn, then increments in turn.
        let mut writes = 0;
        let mut mismatches = Vec::new();
        for turn in 0..N {
            let value = 100 * (turn as i64 + 1);
            if i == turn {
                write(id, &integer, value);
            }
            writes += 1;
            team.wait();
            assert_eq!(
                read(id, &integer),
                value,
                "node {id}: integer after turn {turn}"
            );
            check_version(
                &mut mismatches,
                &integer,
                writes,
                &format!("write turn {turn}"),
            );
            team.wait();
        }
        for turn in 0..N {
            if i == turn {
                assert_eq!(add(id, &integer, 1), 401 + turn as i64);
            }
            writes += 1;
            team.wait();
            assert_eq!(
                read(id, &integer),
                401 + turn as i64,
                "node {id}: turn {turn}"
            );
            check_version(
                &mut mismatches,
                &integer,
                writes,
                &format!("update turn {turn}"),
            );
            team.wait();
        }

        // Dictionary: each node adds its key in turn, then node 0 replaces the whole map.
        let mut expected = BTreeMap::new();
        for turn in 0..N {
            let key = format!("node-{turn}");
            let value = 10 * turn as i64;
            if i == turn {
                dict.update(|d| {
                    d.insert(key.clone(), value);
                    d.insert("last".to_string(), turn as i64);
                })
                .unwrap_or_else(|e| panic!("node {id} update dictionary: {e}"));
            }
            expected.insert(key, value);
            expected.insert("last".to_string(), turn as i64);
            team.wait();
            assert_eq!(
                read(id, &dict),
                expected,
                "node {id}: dictionary after turn {turn}"
            );
            team.wait();
        }
        let replaced = BTreeMap::from([("replaced".to_string(), 1)]);
        if i == 0 {
            write(id, &dict, replaced.clone());
        }
        team.wait();
        assert_eq!(read(id, &dict), replaced, "node {id}: replaced dictionary");
        team.wait();
        shutdown(node);
        assert_versions(id, &mismatches);
    });
}

/// 4 nodes x 300 concurrent `update(+1)` on one counter: the update results are exactly
/// 1..=1200 (each node's own results increasing), and every node then reads 1200.
pub fn counter(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 4;
    const PER_NODE: i64 = 300;
    let config = config(policy);
    let team = Team::new(N);
    let results = on_nodes(&team, fresh(c, N), |_, t| {
        let node = start(t, &config);
        let id = node.id();
        let counter = open(&node, "counter", 0i64);
        team.wait();
        let seen: Vec<i64> = (0..PER_NODE).map(|_| add(id, &counter, 1)).collect();
        assert!(
            seen.windows(2).all(|w| w[0] < w[1]),
            "node {id}: its own updates returned non-increasing values"
        );
        team.wait();
        assert_eq!(read(id, &counter), N as i64 * PER_NODE, "node {id}: final");
        let mut mismatches = Vec::new();
        check_version(
            &mut mismatches,
            &counter,
            N as u64 * PER_NODE as u64,
            "final",
        );
        team.wait();
        shutdown(node);
        assert_versions(id, &mismatches);
        seen
    });
    let mut all: Vec<i64> = results.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=N as i64 * PER_NODE).collect::<Vec<_>>());
}

/// A late joiner and a late opener start from the current value, never their `init`:
/// 3 founders write an int, a struct and a counter; a rank opens an object only after others
/// wrote it; a new node joins (while the founders keep updating a counter) and sees the
/// current int and struct; it writes, and the founders see its writes.
///
/// # Panics
/// Also if `c` cannot add a member ([`Cluster::join`] returns `None`): run this scenario only
/// for clusters that support joining.
pub fn late_joiner(c: &dyn Cluster, policy: WritePolicy) {
    const FOUNDERS: usize = 3;
    const BUSY: i64 = 50;
    let config = config(policy);
    let team = Team::new(FOUNDERS + 1);
    let transports = fresh(c, FOUNDERS);
    let record = Record {
        owner: "node-0".to_string(),
        items: vec![1, 2, 3],
        tags: BTreeMap::from([("a".to_string(), -1)]),
    };
    let joiner_record = Record {
        owner: "joiner".to_string(),
        items: vec![9; 100],
        tags: BTreeMap::new(),
    };
    thread::scope(|scope| {
        let mut handles: Vec<_> = transports
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let (config, team, record, joiner_record) =
                    (&config, &team, &record, &joiner_record);
                spawn(scope, team, format!("founder-{i}"), move || {
                    let node = start(t, config);
                    let id = node.id();
                    let int = open(&node, "late-int", 0i64);
                    let rec = open(&node, "late-struct", record.clone());
                    let busy = open(&node, "late-busy", 0i64);
                    team.wait();
                    // Each founder adds 10 + i in turn; node 0 writes the struct.
                    for turn in 0..FOUNDERS {
                        if i == turn {
                            add(id, &int, 10 + i as i64);
                        }
                        team.wait();
                    }
                    if i == 0 {
                        let mut r = record.clone();
                        r.items.push(4);
                        write(id, &rec, r);
                    }
                    // A rank that opens an object only after others wrote it.
                    if i < 2 {
                        let late = open(&node, "late-open", 7i64);
                        if i == 1 {
                            write(id, &late, 8);
                        }
                    }
                    team.wait();
                    if i == 2 {
                        let late = open(&node, "late-open", -1i64);
                        assert_eq!(read(id, &late), 8, "node {id}: opened late, got its init");
                    }
                    team.wait(); // A: the founders wrote; the joiner may join
                    for _ in 0..BUSY {
                        add(id, &busy, 1);
                    }
                    team.wait(); // B: the joiner wrote
                    assert_eq!(read(id, &int), 1000, "node {id}: the joiner's write");
                    assert_eq!(read(id, &rec), *joiner_record, "node {id}: joiner's struct");
                    team.wait(); // B2: every founder read before any updates
                    add(id, &int, 1);
                    team.wait(); // C
                    assert_eq!(read(id, &int), 1000 + FOUNDERS as i64, "node {id}");
                    assert_eq!(read(id, &busy), (FOUNDERS as i64 + 1) * BUSY, "node {id}");
                    team.wait();
                    shutdown(node);
                })
            })
            .collect();
        let (config, team, record, joiner_record) = (&config, &team, &record, &joiner_record);
        handles.push(spawn(scope, team, "joiner".to_string(), move || {
            for _ in 0..FOUNDERS + 2 {
                team.wait();
            }
            team.wait(); // A
            let t = c
                .join()
                .expect("late_joiner needs a cluster that supports join");
            let node = start(t, config);
            let id = node.id();
            assert!(
                id as usize >= FOUNDERS,
                "the joiner got a founder's id {id}"
            );
            let int = open(&node, "late-int", -999i64);
            assert_eq!(read(id, &int), 33, "joiner: late-int is its init or stale");
            let mut mismatches = Vec::new();
            check_version(
                &mut mismatches,
                &int,
                FOUNDERS as u64,
                "late-int on joining",
            );
            let other = Record {
                owner: "not me".to_string(),
                items: Vec::new(),
                tags: BTreeMap::new(),
            };
            let rec = open(&node, "late-struct", other);
            let mut expected = record.clone();
            expected.items.push(4);
            assert_eq!(read(id, &rec), expected, "joiner: late-struct");
            let late = open(&node, "late-open", -5i64);
            assert_eq!(read(id, &late), 8, "joiner: late-open");
            let busy = open(&node, "late-busy", -1_000_000i64);
            for _ in 0..BUSY {
                add(id, &busy, 1);
            }
            write(id, &int, 1000);
            write(id, &rec, joiner_record.clone());
            team.wait(); // B
            team.wait(); // B2
            team.wait(); // C
            assert_eq!(read(id, &int), 1000 + FOUNDERS as i64, "joiner: final int");
            assert_eq!(
                read(id, &busy),
                (FOUNDERS as i64 + 1) * BUSY,
                "joiner: busy"
            );
            team.wait();
            shutdown(node);
            assert_versions(id, &mismatches);
        }));
        join_all(handles);
    });
}

/// Node A opens "x" as `i64`, node B opens it as `String` (and a struct as a look-alike
/// struct): `Error::TypeMismatch` naming both types; B can still open "x" with the right type
/// and other objects, and A sees B's writes.
pub fn type_mismatch(c: &dyn Cluster, policy: WritePolicy) {
    let config = config(policy);
    let team = Team::new(2);
    let record = Record {
        owner: "a".to_string(),
        items: vec![1],
        tags: BTreeMap::new(),
    };
    on_nodes(&team, fresh(c, 2), |i, t| {
        let node = start(t, &config);
        let id = node.id();
        if i == 0 {
            let x = open(&node, "x", 5i64);
            write(id, &x, 6);
            open(&node, "rec", record.clone());
            expect_mismatch(id, node.object("x", String::new()), "x", "String", "i64");
        }
        team.wait();
        if i == 1 {
            expect_mismatch(id, node.object("x", "s".to_string()), "x", "String", "i64");
            let other = OtherRecord {
                owner: "b".to_string(),
                items: Vec::new(),
                tags: BTreeMap::new(),
            };
            expect_mismatch(
                id,
                node.object("rec", other),
                "rec",
                "OtherRecord",
                "Record",
            );
            let x = open(&node, "x", 0i64);
            assert_eq!(read(id, &x), 6, "node {id}: x after a mismatch");
            let rec = open(&node, "rec", record.clone());
            assert_eq!(read(id, &rec), record, "node {id}: rec after a mismatch");
            let y = open(&node, "y", "hello".to_string());
            write(id, &y, "world".to_string());
        }
        team.wait();
        if i == 0 {
            let y = open(&node, "y", String::new());
            assert_eq!(read(id, &y), "world", "node {id}: y written by node 1");
            expect_mismatch(id, node.object("y", 0u8), "y", "u8", "String");
        }
        team.wait();
        shutdown(node);
    });
}

/// A node that holds tokens (it wrote last) shuts down, first a joiner-like member (node 3),
/// then the founder (node 0): each shutdown succeeds, the remaining nodes still read the
/// latest values, write, and create new objects, and the stopped node's handles return
/// `Error::Stopped` for read, try_read, write and update.
pub fn shutdown_hands_tokens_on(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 4;
    let config = config(policy);
    let team = Team::new(N);
    let results = on_nodes(&team, fresh(c, N), |i, t| {
        let node = start(t, &config);
        let id = node.id();
        let a = open(&node, "handoff-a", 0i64);
        let b = open(&node, "handoff-b", String::new());
        let v = open(&node, "handoff-c", Vec::<u32>::new());
        team.wait();
        add(id, &a, 1);
        team.wait();
        // Phase 1: node 3 writes last and leaves.
        if i == 3 {
            write(id, &a, 100);
            write(id, &b, "from-3".to_string());
            write(id, &v, vec![3; 1000]);
            shutdown(node);
            assert_handle_stopped(id, &a);
            assert_stopped("read", id, b.read());
            for _barrier in ["A", "A2", "B", "C", "D", "E"] {
                team.wait();
            }
            return None;
        }
        team.wait(); // A: node 3 is gone
        assert_eq!(read(id, &a), 100, "node {id}: a after node 3 left");
        assert_eq!(read(id, &b), "from-3", "node {id}: b after node 3 left");
        assert_eq!(
            read(id, &v),
            vec![3; 1000],
            "node {id}: c after node 3 left"
        );
        team.wait(); // A2: everyone read before anyone updates
        add(id, &a, 1);
        team.wait(); // B
        assert_eq!(
            read(id, &a),
            103,
            "node {id}: a after updates without node 3"
        );
        team.wait(); // C

        // Phase 2: the founder writes last and leaves.
        if i == 0 {
            write(id, &a, 200);
            write(id, &b, "from-0".to_string());
            shutdown(node);
            assert_handle_stopped(id, &a);
            team.wait(); // D
            team.wait(); // E
            return None;
        }
        team.wait(); // D: node 0 is gone too
        assert_eq!(read(id, &a), 200, "node {id}: a after the founder left");
        assert_eq!(
            read(id, &b),
            "from-0",
            "node {id}: b after the founder left"
        );
        assert_eq!(
            read(id, &v),
            vec![3; 1000],
            "node {id}: c after the founder left"
        );
        team.wait(); // E: everyone read before anyone updates
        add(id, &a, 1);
        // New objects can still be created, with exactly one init winning.
        let fresh = open(&node, "handoff-new", 1000 + i as i64);
        let fresh_value = read(id, &fresh);
        Some((node, a, fresh_value))
    });
    // The last two nodes meet here, outside the team.
    let survivors: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(survivors.len(), 2);
    let inits = [1001, 1002];
    assert!(
        inits.contains(&survivors[0].2),
        "new object: {}",
        survivors[0].2
    );
    assert_eq!(
        survivors[0].2, survivors[1].2,
        "two inits won the new object"
    );
    for (node, a, _) in &survivors {
        assert_eq!(read(node.id(), a), 202, "node {}: final a", node.id());
    }
    thread::scope(|scope| {
        let handles = survivors
            .into_iter()
            .map(|(node, _, _)| scope.spawn(move || shutdown(node)))
            .collect();
        join_all(handles);
    });
}

/// When several nodes open a new name at once, exactly one `init` wins: 4 nodes open each of
/// 10 new names concurrently with distinct inits and all read the same one.
pub fn concurrent_create(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 4;
    const NAMES: usize = 10;
    let config = config(policy);
    let team = Team::new(N);
    let seen = on_nodes(&team, fresh(c, N), |i, t| {
        let node = start(t, &config);
        let id = node.id();
        team.wait();
        let objects: Vec<_> = (0..NAMES)
            .map(|k| open(&node, &format!("create-{k}"), (100 * k + i) as i64))
            .collect();
        team.wait();
        let values: Vec<i64> = objects.iter().map(|o| read(id, o)).collect();
        team.wait();
        shutdown(node);
        values
    });
    for k in 0..NAMES {
        let winner = seen[0][k];
        assert!(
            (0..N).any(|i| winner == (100 * k + i) as i64),
            "create-{k}: {winner} is nobody's init"
        );
        for (i, values) in seen.iter().enumerate() {
            assert_eq!(values[k], winner, "create-{k}: node {i} sees another init");
        }
    }
}

/// 40 objects at once on 4 nodes: every node opens all of them (in a different order) and
/// updates all of them from 2 threads; every final value is right on every node.
pub fn many_objects(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 4;
    const OBJECTS: usize = 40;
    const THREADS: usize = 2;
    const ROUNDS: usize = 3;
    let config = config(policy);
    let team = Team::new(N);
    on_nodes(&team, fresh(c, N), |i, t| {
        let node = start(t, &config);
        let id = node.id();
        let order: Vec<usize> = (0..OBJECTS).map(|k| (k + i * 10) % OBJECTS).collect();
        let mut objects: Vec<Option<DistObj<i64>>> = vec![None; OBJECTS];
        for &k in &order {
            objects[k] = Some(open(&node, &format!("many-{k}"), 1000 * k as i64));
        }
        let objects: Vec<DistObj<i64>> = objects.into_iter().flatten().collect();
        team.wait();
        thread::scope(|scope| {
            let handles = (0..THREADS)
                .map(|th| {
                    let (objects, order) = (&objects, &order);
                    scope.spawn(move || {
                        for _ in 0..ROUNDS {
                            for j in 0..OBJECTS {
                                let k = order[(j + th * 7) % OBJECTS];
                                add(id, &objects[k], 1);
                            }
                        }
                    })
                })
                .collect();
            join_all(handles);
        });
        team.wait();
        for (k, obj) in objects.iter().enumerate() {
            let expected = 1000 * k as i64 + (N * THREADS * ROUNDS) as i64;
            assert_eq!(read(id, obj), expected, "node {id}: many-{k}");
        }
        team.wait();
        shutdown(node);
    });
}

/// Several threads share one node: 2 nodes x 4 threads x 100 updates, with reads between
/// them. No increment is lost, each thread's updates and reads are monotonic, and the update
/// results are exactly 1..=800.
pub fn shared_node(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 2;
    const THREADS: usize = 4;
    const PER_THREAD: usize = 100;
    let total = (N * THREADS * PER_THREAD) as i64;
    let config = config(policy);
    let team = Team::new(N);
    let results = on_nodes(&team, fresh(c, N), |_, t| {
        let node = start(t, &config);
        let id = node.id();
        let counter = open(&node, "shared", 0i64);
        team.wait();
        let seen: Vec<i64> = thread::scope(|scope| {
            let handles = (0..THREADS)
                .map(|th| {
                    let counter = counter.clone();
                    scope.spawn(move || {
                        let mut last = 0;
                        let mut mine = Vec::with_capacity(PER_THREAD);
                        for _ in 0..PER_THREAD {
                            let now = read(id, &counter);
                            assert!(
                                now >= last,
                                "node {id} thread {th}: read {now} after {last}"
                            );
                            let new = add(id, &counter, 1);
                            assert!(new > now, "node {id} thread {th}: update {new} after {now}");
                            mine.push(new);
                            last = new;
                        }
                        mine
                    })
                })
                .collect();
            join_all(handles).into_iter().flatten().collect()
        });
        team.wait();
        assert_eq!(read(id, &counter), total, "node {id}: final");
        team.wait();
        shutdown(node);
        seen
    });
    let mut all: Vec<i64> = results.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=total).collect::<Vec<_>>());
}

/// Updates every contending node must complete in the no-starvation scenarios' 1.5 s: a starved
/// node completes none (its update times out), a served one hundreds or more.
pub const MIN_PROGRESS: usize = 20;

/// No writer starves under contention: 3 nodes hammer `update(+1)` on one counter for 1.5 s.
/// Every node keeps completing updates ([`MIN_PROGRESS`] at least; the share itself depends on
/// scheduling, so it belongs in the benchmark), no update fails or takes a quarter of the
/// timeout, and no increment is lost.
pub fn no_starvation(c: &dyn Cluster, policy: WritePolicy) {
    const N: usize = 3;
    const RUN: Duration = Duration::from_millis(1500);
    let config = config(policy);
    let team = Team::new(N);
    let results = on_nodes(&team, fresh(c, N), |_, t| {
        let node = start(t, &config);
        let id = node.id();
        let counter = open(&node, "contended", 0i64);
        team.wait();
        let deadline = Instant::now() + RUN;
        let mut seen = Vec::new();
        let mut slowest = Duration::ZERO;
        while Instant::now() < deadline {
            let began = Instant::now();
            seen.push(add(id, &counter, 1));
            slowest = slowest.max(began.elapsed());
        }
        team.wait();
        let total = read(id, &counter);
        team.wait();
        shutdown(node);
        (id, seen, slowest, total)
    });
    let total: usize = results.iter().map(|r| r.1.len()).sum();
    for (id, seen, slowest, final_value) in &results {
        assert_eq!(*final_value as usize, total, "node {id}: final value");
        assert!(
            seen.len() >= MIN_PROGRESS,
            "node {id} starved: {} of {total} updates ({:?})",
            seen.len(),
            results.iter().map(|r| r.1.len()).collect::<Vec<_>>()
        );
        assert!(
            *slowest < TIMEOUT / 4,
            "node {id}: an update took {slowest:?}"
        );
    }
    let mut all: Vec<i64> = results.into_iter().flat_map(|r| r.1).collect();
    all.sort_unstable();
    assert_eq!(all, (1..=total as i64).collect::<Vec<_>>());
}

/// Local threads cannot starve a remote writer: node 0 updates a counter from two threads, so
/// one of its updates is always queued, while node 1 updates it from one thread. Node 1 must
/// keep completing updates, every one well within the timeout (before the fix it got none and
/// timed out).
pub fn no_starvation_by_local_threads(c: &dyn Cluster, policy: WritePolicy) {
    const RUN: Duration = Duration::from_millis(1500);
    let config = config(policy);
    let team = Team::new(2);
    let results = on_nodes(&team, fresh(c, 2), |_, t| {
        let node = start(t, &config);
        let id = node.id();
        let counter = open(&node, "hot", 0i64);
        let threads = if id == 0 { 2 } else { 1 };
        team.wait();
        let deadline = Instant::now() + RUN;
        let per_thread: Vec<(usize, Duration)> = thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        let (mut done, mut slowest) = (0, Duration::ZERO);
                        while Instant::now() < deadline {
                            let began = Instant::now();
                            add(id, &counter, 1);
                            slowest = slowest.max(began.elapsed());
                            done += 1;
                        }
                        (done, slowest)
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().expect("worker"))
                .collect()
        });
        team.wait();
        let total = read(id, &counter);
        team.wait();
        shutdown(node);
        let done: usize = per_thread.iter().map(|p| p.0).sum();
        let slowest = per_thread.iter().map(|p| p.1).max().unwrap_or_default();
        (id, done, slowest, total)
    });
    let total: usize = results.iter().map(|r| r.1).sum();
    for (id, done, slowest, final_value) in &results {
        assert_eq!(*final_value as usize, total, "node {id}: final value");
        assert!(
            *done >= MIN_PROGRESS,
            "node {id} starved: {done} of {total} updates"
        );
        assert!(
            *slowest < TIMEOUT / 4,
            "node {id}: an update took {slowest:?}"
        );
    }
}

/// Timeouts are errors, not hangs. In a cluster of 2 whose founder (node 0) never starts a
/// node, `object()` on node 1 returns `Error::Timeout` after about the configured 300 ms, as
/// does a second attempt, and `shutdown` returns within the timeout too. And on a working
/// cluster, every operation on a handle of a node after its `shutdown` returns
/// `Error::Stopped` while the other node carries on.
pub fn timeouts_are_errors(c: &dyn Cluster, policy: WritePolicy) {
    const SHORT: Duration = Duration::from_millis(300);
    const SLACK: Duration = Duration::from_millis(1500);
    let mut transports = fresh(c, 2);
    let t1 = transports.pop().expect("two transports");
    let _silent_founder = transports.pop().expect("two transports");
    let node = start(t1, &config(policy).timeout(SHORT));
    for attempt in 0..2 {
        let began = Instant::now();
        let result = node.object("orphan", 0i64);
        let took = began.elapsed();
        match result {
            Err(Error::Timeout {
                operation,
                object,
                after,
            }) => {
                assert_eq!(operation, "open", "attempt {attempt}");
                assert_eq!(object, "orphan", "attempt {attempt}");
                assert_eq!(after, SHORT, "attempt {attempt}");
            }
            other => panic!("attempt {attempt}: expected Err(Timeout), got {other:?}"),
        }
        assert!(
            took >= SHORT && took < SHORT + SLACK,
            "attempt {attempt}: open failed after {took:?}, configured {SHORT:?}"
        );
    }
    let began = Instant::now();
    let result = node.shutdown();
    let took = began.elapsed();
    assert!(
        matches!(result, Ok(()) | Err(Error::Timeout { .. })),
        "shutdown without a founder: {result:?}"
    );
    assert!(
        took < SHORT + SLACK,
        "shutdown without a founder took {took:?}"
    );

    let config = config(policy);
    let mut transports = fresh(c, 2);
    let n1 = start(transports.pop().expect("two transports"), &config);
    let n0 = start(transports.pop().expect("two transports"), &config);
    let x0 = open(&n0, "x", 1i64);
    let x1 = open(&n1, "x", 2i64);
    assert_eq!(read(0, &x0), 1, "node 0 created x");
    write(1, &x1, 5);
    shutdown(n1);
    assert_handle_stopped(1, &x1);
    assert_eq!(read(0, &x0), 5, "node 0 after node 1 left");
    assert_eq!(add(0, &x0, 1), 6);
    shutdown(n0);
    assert_handle_stopped(0, &x0);
}

/// A provider of in-memory clusters (`transport-local`), built one member at a time on a
/// [`transport_local::LocalNetwork`]; remembers the network started last, so
/// [`Cluster::join`] adds a late joiner to it.
#[derive(Debug, Default)]
pub struct LocalCluster {
    network: Mutex<Option<transport_local::LocalNetwork>>,
}

impl Cluster for LocalCluster {
    fn start(&self, n: usize) -> Vec<Box<dyn Transport>> {
        let network = transport_local::LocalNetwork::new();
        let transports = (0..n)
            .map(|_| Box::new(network.join()) as Box<dyn Transport>)
            .collect();
        *self.network.lock().unwrap_or_else(PoisonError::into_inner) = Some(network);
        transports
    }

    fn join(&self) -> Option<Box<dyn Transport>> {
        let network = self.network.lock().unwrap_or_else(PoisonError::into_inner);
        network
            .as_ref()
            .map(|n| Box::new(n.join()) as Box<dyn Transport>)
    }
}

pub mod linearizability {
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

    use super::{config, fresh, start, Cluster, Team};

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
    fn record(c: &dyn Cluster, policy: WritePolicy, seed: u64) -> Vec<Vec<Entry>> {
        let config = config(policy);
        let histories: Vec<Mutex<Vec<Entry>>> = (0..OBJECTS).map(|_| Mutex::default()).collect();
        let team = Team::new(THREADS);
        let (histories, team, config) = (&histories, &team, &config);
        let nodes: Vec<Node> = thread::scope(|scope| {
            let handles = fresh(c, NODES)
                .into_iter()
                .enumerate()
                .map(|(n, t)| {
                    scope.spawn(move || {
                        let node = start(t, config);
                        let objects: Vec<DistObj<i64>> = (0..OBJECTS)
                            .map(|k| super::open(&node, &format!("lin-{k}"), 0i64))
                            .collect();
                        thread::scope(|scope| {
                            let handles = (0..THREADS_PER_NODE)
                                .map(|th| {
                                    let thread = (n * THREADS_PER_NODE + th) as ThreadId;
                                    let objects = &objects;
                                    scope.spawn(move || {
                                        let _member = team.member();
                                        workload(objects, histories, team, thread, seed);
                                    })
                                })
                                .collect();
                            super::join_all(handles);
                        });
                        node
                    })
                })
                .collect();
            super::join_all(handles)
        });
        for node in nodes {
            super::shutdown(node);
        }
        histories
            .iter()
            .map(|h| std::mem::take(&mut *h.lock().expect("history lock")))
            .collect()
    }

    /// One thread's share of the workload: random operations, and a quiescent point every
    /// [`SEGMENT_OPS`] of them, where thread 0 reads every object and cuts the histories.
    fn workload(
        objects: &[DistObj<i64>],
        histories: &[Mutex<Vec<Entry>>],
        team: &Team,
        thread: ThreadId,
        seed: u64,
    ) {
        let mut rng = StdRng::seed_from_u64(seed ^ u64::from(thread));
        for i in 0..SEGMENTS * SEGMENT_OPS {
            let k = rng.gen_range(0..OBJECTS);
            let value = i64::from(thread + 1) * 1_000_000 + i as i64;
            let op = match rng.gen_range(0..4) {
                0 | 1 => Op::Read,
                2 => Op::Write(value),
                _ => Op::Swap(value),
            };
            run(&objects[k], &histories[k], thread, op);
            if (i + 1) % SEGMENT_OPS == 0 {
                team.wait();
                if thread == 0 {
                    for (obj, history) in objects.iter().zip(histories) {
                        run(obj, history, thread, Op::Read);
                        history.lock().expect("history lock").push(Entry::Cut);
                    }
                }
                team.wait();
            }
        }
    }

    /// Runs `op` on `obj`, recording its invocation and return in `history`.
    fn run(obj: &DistObj<i64>, history: &Mutex<Vec<Entry>>, thread: ThreadId, op: Op) {
        let log = |entry| history.lock().expect("history lock").push(entry);
        log(Entry::Invoke(thread, op.clone()));
        let ret = match op {
            Op::Read => obj.read().map(|v| Ret::Read(*v)),
            Op::Write(v) => obj.write(v).map(|()| Ret::Written),
            Op::Swap(v) => obj.update(|x| Ret::Swapped(std::mem::replace(x, v))),
        };
        let ret = ret.unwrap_or_else(|e| panic!("thread {thread}: {op:?} on {}: {e}", obj.name()));
        log(Entry::Return(thread, ret));
    }
}

/// Declares the whole suite for one transport: a module per scenario with one `#[test]` per
/// write policy, each running the scenario on a fresh `$cluster` (an expression of a type that
/// implements [`Cluster`]). Every transport's runner is this one line, so none can miss a
/// scenario.
#[macro_export]
macro_rules! conformance_suite {
    ($cluster:expr) => {
        $crate::conformance_suite!(
            $cluster;
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
    };
    ($cluster:expr; $($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn update_policy() {
                    $crate::conformance::$scenario(
                        &$cluster,
                        coherence_core::WritePolicy::Update,
                    );
                }

                #[test]
                fn invalidate_policy() {
                    $crate::conformance::$scenario(
                        &$cluster,
                        coherence_core::WritePolicy::Invalidate,
                    );
                }
            }
        )*
    };
}
