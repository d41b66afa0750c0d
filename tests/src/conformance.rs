//! The cross-transport conformance suite: scenarios that every transport must pass, each
//! written once.
//!
//! A scenario ([`scenarios`]) is a function of one participant, a [`Rank`]: its node, its rank
//! (`0..size`, the node's id; rank 0 founded the cluster), the number of ranks, a barrier, and a
//! way to share small results (objects of the cluster itself). It returns `Err` with a message
//! naming the rank and the step. Three kinds of cluster run the same functions:
//!
//! - a thread cluster ([`run_threads`]): a fresh cluster of a [`Cluster`] per scenario, one
//!   thread per rank, for the in-memory transport (`tests/tests/local_conformance.rs`) and for
//!   ZeroMQ nodes in one process (`tests/tests/zmq_in_process_conformance.rs`);
//! - a process cluster ([`run_ranks`]): one rank per OS process, every process runs every
//!   scenario in turn on one cluster, for ZeroMQ processes (`zmq_conformance`, launched by
//!   `tests/tests/zmq_process_conformance.rs`) and MPI ranks (`mpi_conformance`).
//!
//! What only one kind has is a [`Need`] of the scenario and a capability of the [`Kind`]: the
//! scenario is skipped where the kind lacks it, never copied. The late joiner works everywhere,
//! differently: a thread cluster starts the last rank's node only when rank 0 says so
//! ([`Rank::late_ready`]), a ZeroMQ launcher starts the last process then, and an MPI world is
//! fixed, so its last rank only opens the objects late.
//!
//! Nothing can hang a run: every library call is bounded by [`TIMEOUT`], every wait for another
//! rank by [`PATIENCE`], and a failing rank calls the run off so the others stop at their next
//! meeting instead of waiting for it. The [`linearizability`] check is transport-agnostic in
//! the same way, on thread clusters.

use std::cell::{Cell, OnceCell};
use std::fmt::Display;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Error, Node, Transport, WritePolicy};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub mod linearizability;
mod scenarios;

pub use scenarios::{OtherRecord, Record, Scenario, MIN_PROGRESS, SCENARIOS};

/// Bounds every library operation of the scenarios (except where a scenario tests timeouts):
/// long enough never to fire on a slow, loaded machine, short enough that a hang fails the run.
pub const TIMEOUT: Duration = Duration::from_secs(20);
/// Bounds every wait for other ranks (barriers, shared results, a late joiner's go-ahead).
pub const PATIENCE: Duration = Duration::from_secs(60);
/// How often a waiting rank looks again.
const POLL: Duration = Duration::from_micros(200);
/// How often a rank polling an object checks whether the run was called off.
const CALL_OFF_POLL: Duration = Duration::from_millis(50);
/// The barrier object of a process cluster, which every rank opens first.
const BARRIER: &str = "conformance/barrier";

/// The rank that prints the scenario lines and the summary in a process cluster: rank 1 stays
/// in the cluster to the end of every scenario, including the last one, where the founder
/// (rank 0) leaves early.
pub const REPORTER: usize = 1;

/// What rank 0 of a ZeroMQ process run prints on stdout once the other ranks have written the
/// objects of the late-joiner scenario: the launcher starts the last rank's process only then,
/// so that it really joins a running cluster.
pub const LATE_READY: &str = "late joiner may join";

/// The configuration every node of the scenarios uses: [`TIMEOUT`] and the given write policy.
pub fn config(policy: WritePolicy) -> Config {
    Config::default().timeout(TIMEOUT).write_policy(policy)
}

/// A scenario's result on one rank: `Err` says what went wrong, naming the rank.
pub type Outcome = Result<(), String>;

/// How a cluster runs its ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One thread per rank and a fresh cluster per scenario ([`run_threads`]), whose members
    /// found it together (in memory).
    Threads,
    /// Like [`Kind::Threads`], but each member after the founder joins through it (ZeroMQ in
    /// one process): the founder's node takes it in, so the founder cannot stay silent.
    JoinedThreads,
    /// One process per rank, every scenario in turn on one cluster ([`run_ranks`]).
    Processes,
}

/// Something a scenario needs that not every [`Kind`] of cluster has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A cluster whose founder (rank 0) is a member whose node never starts, so nothing
    /// answers: only a fresh cluster per scenario whose members found it together is one. A
    /// running process cluster is not, nor one whose members join through the founder's node
    /// (ZeroMQ timeouts are tested across processes by `tests/tests/zmq_sigkill.rs` and
    /// `zmq_sigstop.rs`).
    SilentFounder,
}

impl Kind {
    /// Whether clusters of this kind have what `need` asks for.
    pub fn has(self, need: Need) -> bool {
        match need {
            Need::SilentFounder => self == Kind::Threads,
        }
    }
}

/// Makes one member's transport, on the thread that then starts its node: a joiner's may wait
/// for the members before it, whose nodes take it in.
pub type Starter = Box<dyn FnOnce() -> Result<Box<dyn Transport>, String> + Send>;

/// A provider of fresh clusters for one transport, for [`run_threads`].
pub trait Cluster: Sync {
    /// A fresh cluster of `n` members: one starter per member, in id order (the starter at
    /// index `i` makes the transport with id `i`, so index 0 is the founding node). Each
    /// member's node starts as soon as its starter returned.
    fn start(&self, n: usize) -> Vec<Starter>;

    /// A late joiner into the cluster started last; its id is the next unused one.
    fn join(&self) -> Result<Box<dyn Transport>, String>;

    /// How its ranks run: [`Kind::Threads`] unless its members join one another.
    fn kind(&self) -> Kind {
        Kind::Threads
    }
}

/// A provider of in-memory clusters (`transport-local`), built one member at a time on a
/// [`transport_local::LocalNetwork`]; remembers the network started last, so
/// [`Cluster::join`] adds a late joiner to it.
#[derive(Debug, Default)]
pub struct LocalCluster {
    network: Mutex<Option<transport_local::LocalNetwork>>,
}

impl Cluster for LocalCluster {
    fn start(&self, n: usize) -> Vec<Starter> {
        let (network, founders) = transport_local::LocalNetwork::founding(n);
        *lock(&self.network) = Some(network);
        founders
            .into_iter()
            .map(|t| Box::new(move || Ok(Box::new(t) as Box<dyn Transport>)) as Starter)
            .collect()
    }

    fn join(&self) -> Result<Box<dyn Transport>, String> {
        let network = lock(&self.network)
            .clone()
            .ok_or_else(|| "no cluster was started to join".to_string())?;
        // The members' nodes decide the view that takes it in: a round trip or two.
        let joiner = network.join(TIMEOUT).map_err(|e| e.to_string())?;
        Ok(Box::new(joiner))
    }
}

/// Locks `mutex`, ignoring poisoning: a rank that panicked is reported by its runner, and the
/// data here (arrival counts, histories) stays consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Starts a cluster of `n` whose starters check the id-order promise of [`Cluster::start`].
fn fresh(c: &dyn Cluster, n: usize) -> Vec<Starter> {
    let starters = c.start(n);
    assert_eq!(starters.len(), n, "the cluster has the wrong size");
    starters
        .into_iter()
        .enumerate()
        .map(|(i, start)| {
            Box::new(move || {
                let transport = start()?;
                match transport.local_id() as usize {
                    id if id == i => Ok(transport),
                    id => Err(format!("the transport of member {i} has id {id}")),
                }
            }) as Starter
        })
        .collect()
}

/// The state of a barrier: arrivals so far, and why the run was called off, if it was. A
/// process cluster keeps it in an object of the cluster, a thread cluster in a [`Team`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Barrier {
    /// Arrivals over all rounds.
    arrivals: u64,
    /// Set by a rank that failed, so the others stop instead of waiting for it.
    failed: Option<String>,
}

/// The meeting place of a thread cluster's ranks, in memory: it works before a rank's node has
/// started and after it has left, which an object of the cluster cannot.
#[derive(Debug, Default)]
struct Team {
    barrier: Mutex<Barrier>,
    /// Set by rank 0 when the late joiner may start its node ([`Rank::late_ready`]).
    late_ready: AtomicBool,
}

impl Team {
    /// Waits (for at most [`PATIENCE`]) until rank 0 says the late joiner may start, unless the
    /// run is called off first.
    fn await_late_ready(&self, who: impl Display) -> Outcome {
        let deadline = Instant::now() + PATIENCE;
        while !self.late_ready.load(Ordering::Acquire) {
            if let Some(why) = &lock(&self.barrier).failed {
                return Err(format!("{who}: called off: {why}"));
            }
            if Instant::now() > deadline {
                return Err(format!("{who}: no go-ahead to join within {PATIENCE:?}"));
            }
            thread::sleep(POLL);
        }
        Ok(())
    }
}

/// Where ranks meet: a [`Team`] for threads, the barrier object for processes.
enum Meeting<'a> {
    Team(&'a Team),
    Object(DistObj<Barrier>),
}

impl Meeting<'_> {
    fn look(&self, who: impl Display) -> Result<Barrier, String> {
        match self {
            Meeting::Team(team) => Ok(lock(&team.barrier).clone()),
            Meeting::Object(obj) => read(who, obj),
        }
    }

    fn update(&self, who: impl Display, f: impl FnOnce(&mut Barrier)) -> Outcome {
        match self {
            Meeting::Team(team) => {
                f(&mut lock(&team.barrier));
                Ok(())
            }
            Meeting::Object(obj) => obj.update(f).or_fail(format_args!("{who} barrier")),
        }
    }

    /// Arrives, then waits until `target` arrivals are in (for at most [`PATIENCE`]), unless
    /// the run is called off first.
    fn meet(&self, who: impl Display + Copy, target: u64) -> Outcome {
        self.update(who, |b| b.arrivals += 1)?;
        let deadline = Instant::now() + PATIENCE;
        loop {
            let b = self.look(who)?;
            if let Some(why) = &b.failed {
                return Err(format!("{who}: called off: {why}"));
            }
            if b.arrivals >= target {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{who}: {} of {target} arrivals at the barrier after {PATIENCE:?}",
                    b.arrivals
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// `Err` if the run was called off.
    fn go_on(&self, who: impl Display + Copy) -> Outcome {
        match self.look(who)?.failed {
            Some(why) => Err(format!("{who}: called off: {why}")),
            None => Ok(()),
        }
    }

    /// Tells the other ranks to stop waiting (best effort: this rank may be the broken one).
    fn call_off(&self, who: impl Display, why: &str) {
        let _ = self.update(who, |b| {
            b.failed.get_or_insert_with(|| why.to_string());
        });
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

/// `Ok` if `condition` holds, else `Err(what())`.
fn check(condition: bool, what: impl FnOnce() -> String) -> Outcome {
    if condition {
        Ok(())
    } else {
        Err(what())
    }
}

/// Names a rank in messages: "rank R".
#[derive(Debug, Clone, Copy)]
struct Who(usize);

impl Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {}", self.0)
    }
}

/// Reads a copy of `obj`'s value; `who` names the reader in a failure.
fn read<T>(who: impl Display, obj: &DistObj<T>) -> Result<T, String>
where
    T: Serialize + DeserializeOwned + Send + Sync + Clone + 'static,
{
    obj.read()
        .map(|v| T::clone(&v))
        .or_fail(format_args!("{who} read {:?}", obj.name()))
}

/// Produces a rank's transport once its node is to start: at once, or (the late joiner of a
/// thread cluster) only once rank 0 says so.
type Pending<'a> = Box<dyn FnOnce() -> Result<Box<dyn Transport>, String> + Send + 'a>;

/// One participant of a scenario: its node, rank, the number of ranks, where the ranks meet.
///
/// The node starts on first use, so that a thread cluster's late joiner joins only when rank 0
/// says so, and a founder that a scenario never uses never starts.
pub struct Rank<'a> {
    rank: usize,
    size: usize,
    config: Config,
    node: OnceCell<Node>,
    pending: Cell<Option<Pending<'a>>>,
    meeting: Meeting<'a>,
    /// Ranks that still meet at the barrier (fewer once ranks have left).
    parties: Cell<u64>,
    /// Arrivals the next meeting must see: every round adds `parties`.
    target: Cell<u64>,
    late_ready: Box<dyn Fn() + Send + 'a>,
}

impl std::fmt::Debug for Rank<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rank")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish()
    }
}

impl<'a> Rank<'a> {
    fn new(
        rank: usize,
        size: usize,
        config: Config,
        meeting: Meeting<'a>,
        late_ready: Box<dyn Fn() + Send + 'a>,
    ) -> Rank<'a> {
        Rank {
            rank,
            size,
            config,
            node: OnceCell::new(),
            pending: Cell::new(None),
            meeting,
            parties: Cell::new(size as u64),
            target: Cell::new(0),
            late_ready,
        }
    }

    /// This rank, for messages.
    fn who(&self) -> Who {
        Who(self.rank)
    }

    /// The node, started with the scenarios' configuration if it has not started yet.
    fn node(&self) -> Result<&Node, String> {
        self.start_node(&self.config)
    }

    /// The node, started with `config` if it has not started yet. Fails once it has left.
    fn start_node(&self, config: &Config) -> Result<&Node, String> {
        if let Some(node) = self.node.get() {
            return Ok(node);
        }
        let pending = self
            .pending
            .take()
            .ok_or_else(|| format!("{}: its node is used after it left", self.who()))?;
        let node = Node::start(pending()?, config.clone())
            .or_fail(format_args!("{} start", self.who()))?;
        check(node.id() as usize == self.rank, || {
            format!("{}: the node got id {}", self.who(), node.id())
        })?;
        Ok(self.node.get_or_init(|| node))
    }

    /// Opens `name`, failing with the rank and name.
    fn open<T>(&self, name: &str, init: T) -> Result<DistObj<T>, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        self.node()?
            .object(name, init)
            .or_fail(format_args!("{} open {name:?}", self.who()))
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
        let seen = read(self.who(), obj)?;
        check(&seen == expected, || {
            format!(
                "{}: {} is {seen:?} {when}, expected {expected:?}",
                self.who(),
                obj.name()
            )
        })
    }

    /// Fails unless `obj` is at `expected` version; `when` says at which point.
    fn expect_version<T>(&self, obj: &DistObj<T>, expected: u64, when: impl Display) -> Outcome
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        let version = obj.version();
        check(version == expected, || {
            format!(
                "{}: {} at version {version} {when}, expected {expected}",
                self.who(),
                obj.name()
            )
        })
    }

    /// Waits until every rank still taking part arrived.
    fn sync(&self) -> Outcome {
        let target = self.target.get() + self.parties.get();
        self.target.set(target);
        self.meeting.meet(self.who(), target)
    }

    /// The last meeting with a rank that leaves ([`Rank::leave`]): from then on, one rank
    /// fewer meets.
    fn see_off(&self) -> Outcome {
        self.sync()?;
        self.parties.set(self.parties.get() - 1);
        Ok(())
    }

    /// Tells rank 0's go-ahead for the late joiner: a thread cluster starts the last rank's
    /// node only now, a ZeroMQ launcher starts the last process.
    fn late_ready(&self) {
        (self.late_ready)();
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
            let value = read(self.who(), obj)?;
            if done(&value) {
                return Ok(value);
            }
            if began.elapsed() > PATIENCE {
                return Err(format!(
                    "{}: {} still {value:?} after {PATIENCE:?}",
                    self.who(),
                    obj.name()
                ));
            }
            if looked_at_barrier.elapsed() > CALL_OFF_POLL {
                looked_at_barrier = Instant::now();
                self.meeting.go_on(self.who())?;
            }
            thread::sleep(POLL);
        }
    }

    /// This rank puts its `mine` into the map object `name`, then waits until `ranks` ranks
    /// did; returns what each put, in rank order.
    fn gather_from<T>(&self, name: &str, ranks: usize, mine: T) -> Result<Vec<(usize, T)>, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + Clone + std::fmt::Debug + 'static,
    {
        let all = self.open(name, std::collections::BTreeMap::<u32, T>::new())?;
        all.update(|m| m.insert(self.rank as u32, mine))
            .or_fail(format_args!("{} update {name:?}", self.who()))?;
        let all = self.wait_until(&all, |m| m.len() >= ranks)?;
        Ok(all.into_iter().map(|(k, v)| (k as usize, v)).collect())
    }

    /// Every rank puts its `mine` into the map object `name`, then waits until every rank did;
    /// returns every rank's, in rank order.
    fn gather<T>(&self, name: &str, mine: T) -> Result<Vec<(usize, T)>, String>
    where
        T: Serialize + DeserializeOwned + Send + Sync + Clone + std::fmt::Debug + 'static,
    {
        self.gather_from(name, self.size, mine)
    }

    /// Shuts the node down, if it is running.
    fn shut_down(&mut self) -> Outcome {
        match self.node.take() {
            Some(node) => node
                .shutdown()
                .or_fail(format_args!("{} shutdown", self.who())),
            None => Ok(()),
        }
    }

    /// Leaves: this rank's last meeting (the others [`Rank::see_off`] it) and the shutdown of
    /// its node; afterwards every operation on `handle` must return `Error::Stopped`.
    ///
    /// A thread cluster's [`Team`] meets without the node, so there the node leaves first and
    /// the others go on only once it is gone. A process cluster meets through the node, so
    /// there the node leaves right after its last arrival, and the others go on while it
    /// leaves, which their next reads and updates must also survive.
    fn leave(&mut self, handle: &DistObj<i64>) -> Outcome {
        let id = self.node()?.id();
        if let Meeting::Team(_) = self.meeting {
            self.shut_down()?;
            self.sync()?;
        } else {
            self.sync()?;
            self.shut_down()?;
        }
        let stopped = |what: &str, ok: bool| {
            check(ok, || {
                format!("{}: {what} after shutdown is not Stopped", self.who())
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

    /// Runs `scenario` on this rank; a panic is a failure too. A failing rank calls the run
    /// off, so the others stop at their next meeting.
    fn play(&mut self, scenario: &Scenario) -> Outcome {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| (scenario.run)(self)))
            .unwrap_or_else(|payload| {
                let what = payload
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| payload.downcast_ref::<&str>().copied())
                    .unwrap_or("a panic");
                Err(format!("{} panicked: {what}", self.who()))
            });
        if let Err(e) = &outcome {
            let why = format!("{} failed {:?}: {e}", self.who(), scenario.name);
            self.meeting.call_off(self.who(), &why);
        }
        outcome
    }
}

/// Runs the scenario called `name` on a fresh cluster of `c` with one thread per rank, under
/// `policy`, then shuts down every node still running, all at once, each on its own thread.
///
/// # Panics
/// With every rank's failure if the scenario or a shutdown fails; if there is no scenario
/// `name`, or thread clusters lack what it needs.
pub fn run_threads(c: &dyn Cluster, name: &str, policy: WritePolicy) {
    let scenario = SCENARIOS
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no scenario {name:?}"));
    assert!(
        scenario.needs.is_none_or(|need| c.kind().has(need)),
        "{name} needs {:?}, which this cluster lacks",
        scenario.needs
    );
    let n = scenario.ranks;
    let team = Team::default();
    let started = if scenario.late_joiner { n - 1 } else { n };
    let mut ranks: Vec<Rank> = fresh(c, started)
        .into_iter()
        .enumerate()
        .map(|(i, start)| thread_rank(i, n, policy, &team, start))
        .collect();
    if scenario.late_joiner {
        let team = &team;
        let joins = move || {
            team.await_late_ready(Who(n - 1))?;
            c.join()
        };
        ranks.push(thread_rank(n - 1, n, policy, team, Box::new(joins)));
    }
    let mut failures = on_threads(&mut ranks, |r| r.play(scenario));
    if failures.is_empty() {
        failures = on_threads(&mut ranks, Rank::shut_down);
    }
    // Ranks whose node never started hold their transport until here, as a silent member.
    drop(ranks);
    assert!(
        failures.is_empty(),
        "{name} ({policy:?}) failed:\n{}",
        failures.join("\n")
    );
}

/// Rank `rank` of `n` of a thread cluster: meets in `team`; its node starts, under `policy`,
/// from the transport `pending` produces.
fn thread_rank<'a>(
    rank: usize,
    n: usize,
    policy: WritePolicy,
    team: &'a Team,
    pending: Pending<'a>,
) -> Rank<'a> {
    let late_ready = move || team.late_ready.store(true, Ordering::Release);
    let r = Rank::new(
        rank,
        n,
        config(policy),
        Meeting::Team(team),
        Box::new(late_ready),
    );
    r.pending.set(Some(pending));
    r
}

/// Runs `f` for every rank on its own thread; returns the failures.
fn on_threads<'a>(
    ranks: &mut [Rank<'a>],
    f: impl Fn(&mut Rank<'a>) -> Outcome + Sync,
) -> Vec<String> {
    let f = &f;
    thread::scope(|scope| {
        let handles: Vec<_> = ranks
            .iter_mut()
            .map(|r| {
                thread::Builder::new()
                    .name(format!("rank-{}", r.rank))
                    .spawn_scoped(scope, move || f(r))
                    .expect("spawn a rank's thread")
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| match h.join() {
                Ok(outcome) => outcome.err(),
                Err(_) => Some("a rank's thread panicked".to_string()),
            })
            .collect()
    })
}

/// Runs every scenario of [`SCENARIOS`] that process clusters can run, in order, on this
/// process's `transport`: its node is rank `transport.local_id()` of `size`, under `policy`.
/// The last scenario leaves the cluster. `label` starts every line printed; `late_ready` is
/// what rank 0 does once the late joiner may join (see [`LATE_READY`]).
///
/// The [`REPORTER`] rank prints `LABEL: NAME ... ok (TIME)` for each scenario: it passes only
/// once every rank did, since a failed rank calls the barrier off instead of arriving. A
/// failing rank prints `LABEL: NAME ... FAILED on rank R: WHY` on stderr and stops: it returns
/// `Err` at once, without leaving (its node is leaked, as if the process crashed, so that an
/// MPI rank does not block in `MPI_Finalize`); the caller should exit with a failure status.
/// Returns the number of scenarios passed.
pub fn run_ranks(
    transport: impl Transport,
    size: usize,
    policy: WritePolicy,
    label: &str,
    late_ready: Box<dyn Fn() + Send>,
) -> Result<usize, String> {
    let rank = transport.local_id() as usize;
    let fail = |why: String| {
        let why = format!("{label}: rank {rank}: {why}");
        eprintln!("{why}");
        why
    };
    if size < 2 || rank >= size {
        return Err(fail(format!(
            "of {size}: the suite needs 2 ranks or more, ranks 0..size"
        )));
    }
    let node = Node::start(transport, config(policy)).map_err(|e| fail(format!("start: {e}")))?;
    let barrier = match node.object(BARRIER, Barrier::default()) {
        Ok(b) => b,
        Err(e) => {
            // Stop as a crash would: no leave, which under MPI would wait for every rank.
            std::mem::forget(node);
            return Err(fail(format!("cannot open the barrier: {e}")));
        }
    };
    let mut r = Rank::new(
        rank,
        size,
        config(policy),
        Meeting::Object(barrier),
        late_ready,
    );
    r.node = OnceCell::from(node);
    let mut passed = 0;
    for scenario in SCENARIOS
        .iter()
        .filter(|s| s.needs.is_none_or(|need| Kind::Processes.has(need)))
    {
        let began = Instant::now();
        if let Err(e) = r.play(scenario) {
            let why = format!("{label}: {} ... FAILED on rank {rank}: {e}", scenario.name);
            eprintln!("{why}");
            std::mem::forget(r);
            return Err(why);
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
    Ok(passed)
}

/// Declares the suite for one thread-cluster transport: a module per scenario with one `#[test]`
/// per write policy, each running the scenario on a fresh `$cluster` (an expression of a type
/// that implements [`Cluster`]), and a test that the list names every scenario clusters of its
/// [`Kind`] can run, so no transport misses one. `conformance_suite!(cluster)` runs every
/// scenario; `conformance_suite!(cluster, joined)` every one but those that need a silent
/// founder ([`Kind::JoinedThreads`]).
#[macro_export]
macro_rules! conformance_suite {
    ($cluster:expr) => {
        $crate::conformance_suite!($cluster, [timeouts_are_errors]);
    };
    ($cluster:expr, joined) => {
        $crate::conformance_suite!($cluster, []);
    };
    // The scenarios of `Need::SilentFounder` are the bracketed ones.
    ($cluster:expr, [$($silent_founder:ident),*]) => {
        $crate::conformance_suite!(
            @list $cluster;
            late_joiner,
            lab_integer_and_dict,
            counter,
            late_opener,
            concurrent_create,
            many_objects,
            shared_node,
            no_starvation,
            no_starvation_by_local_threads,
            large_value,
            type_mismatch,
            shutdown_hands_tokens_on,
            $($silent_founder,)*
        );
    };
    (@list $cluster:expr; $($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn update_policy() {
                    $crate::conformance::run_threads(
                        &$cluster,
                        stringify!($scenario),
                        coherence_core::WritePolicy::Update,
                    );
                }

                #[test]
                fn invalidate_policy() {
                    $crate::conformance::run_threads(
                        &$cluster,
                        stringify!($scenario),
                        coherence_core::WritePolicy::Invalidate,
                    );
                }
            }
        )*

        mod listing {
            #[test]
            fn every_scenario_is_listed() {
                use $crate::conformance::Cluster;
                let kind = $cluster.kind();
                let mut listed = [$(stringify!($scenario)),*];
                listed.sort_unstable();
                let mut runnable: Vec<&str> = $crate::conformance::SCENARIOS
                    .iter()
                    .filter(|s| s.needs.is_none_or(|n| kind.has(n)))
                    .map(|s| s.name)
                    .collect();
                runnable.sort_unstable();
                assert_eq!(listed.as_slice(), runnable.as_slice());
            }
        }
    };
}
