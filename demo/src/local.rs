//! Runs the lab scenario on in-memory nodes: one thread per participant over a
//! [`LocalNetwork`], plus a late joiner that joins the network once the tests are done.
//!
//! The calling thread is the watchdog: it waits for the node threads, and gives up on the run if
//! a library call outlives the configured timeout (every call must return within it), so a
//! library bug shows up as a verdict instead of a hang.

use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use coherence_core::{Config, Error, Node, NodeId};
use transport_local::LocalNetwork;

use crate::lab::{self, Failure, Harness, Observation, Report, Stop};

/// How long past the configured timeout a library call may run before the watchdog calls it
/// hung: a shutdown, for one, may wait a full timeout and then for the driver thread.
const GRACE: Duration = Duration::from_secs(1);

/// How often the watchdog looks at the node threads.
const WATCH_INTERVAL: Duration = Duration::from_millis(5);

/// Runs the scenario with `nodes` participants and one late joiner, all configured by `config`.
pub fn run(nodes: usize, config: &Config) -> Result<Report, Failure> {
    // The participants found the network, so ids are ranks; the late joiner is taken in by
    // their view change.
    let (network, transports) = LocalNetwork::founding(nodes);
    let shared = Arc::new(Shared::new(nodes));

    let mut threads = Vec::with_capacity(nodes + 1);
    for (rank, transport) in transports.into_iter().enumerate() {
        let party = Party::new(&shared, rank);
        let config = config.clone();
        threads.extend(party.spawn(move |party| {
            let node = party.start(|| Node::start(transport, config))?;
            party.settle(lab::run_participant(&node, rank, nodes, party));
            // Tests done; then the late joiner's turn. Both phases end early when aborted.
            if party.phase().is_ok() {
                let _ = party.phase();
            }
            party.settle(lab::shut_down(node, party));
            Some(())
        }));
    }
    let late = Party::new(&shared, nodes);
    let late_config = config.clone();
    threads.extend(late.spawn(move |party| {
        party.phase().ok()?;
        let timeout = late_config.timeout;
        let transport = match party.watch("join", || network.join(timeout)) {
            Ok(transport) => transport,
            Err(e) => {
                party.settle(Err(Stop::Failed(format!("node {nodes}: join failed: {e}"))));
                return None;
            }
        };
        let node = party.start(|| Node::start(transport, late_config))?;
        party.settle(lab::run_late_joiner(&node, nodes, party));
        let _ = party.phase();
        party.settle(lab::shut_down(node, party));
        Some(())
    }));

    let limit = config.timeout + GRACE;
    while !threads.iter().all(JoinHandle::is_finished) {
        if let Some(hung) = shared.overdue(limit) {
            // The hung thread cannot be stopped; returning lets the process exit past it.
            shared.abort();
            shared.fail(hung);
            return shared.outcome();
        }
        thread::sleep(WATCH_INTERVAL);
    }
    for thread in threads {
        // Panics are caught inside the thread.
        let _ = thread.join();
    }
    shared.outcome()
}

/// State shared by the node threads and the watchdog.
struct Shared {
    /// The participants meet here between turns.
    turns: Rendezvous,
    /// Participants and the late joiner meet here: tests done, late joiner done.
    phases: Rendezvous,
    /// The library call each party is in, if any, and since when; indexed by node id.
    calls: Vec<Mutex<Option<(String, Instant)>>>,
    observations: Mutex<Vec<Observation>>,
    reasons: Mutex<Vec<String>>,
}

impl Shared {
    fn new(nodes: usize) -> Shared {
        Shared {
            turns: Rendezvous::new(nodes),
            phases: Rendezvous::new(nodes + 1),
            calls: (0..=nodes).map(|_| Mutex::new(None)).collect(),
            observations: Mutex::default(),
            reasons: Mutex::default(),
        }
    }

    /// Calls the run off: every party waiting at, or later reaching, a sync point stops.
    fn abort(&self) {
        self.turns.abort();
        self.phases.abort();
    }

    fn fail(&self, reason: String) {
        lock(&self.reasons).push(reason);
    }

    /// A library call that has run longer than `limit`, described.
    fn overdue(&self, limit: Duration) -> Option<String> {
        self.calls.iter().enumerate().find_map(|(node, call)| {
            let call = lock(call);
            let (what, since) = call.as_ref()?;
            let running = since.elapsed();
            (running > limit).then(|| {
                format!(
                    "node {node}: {what} still running after {running:.1?}, past the timeout; \
                     the library hangs"
                )
            })
        })
    }

    /// The run's result as it stands: a report if nothing went wrong.
    fn outcome(&self) -> Result<Report, Failure> {
        lab::outcome(
            lock(&self.observations).clone(),
            lock(&self.reasons).clone(),
        )
    }
}

/// One node thread's view of the run; implements [`Harness`] for the scenario.
struct Party {
    shared: Arc<Shared>,
    /// Rank, and node id: participants join in rank order, the late joiner comes last.
    id: NodeId,
}

impl Party {
    fn new(shared: &Arc<Shared>, index: usize) -> Party {
        Party {
            shared: Arc::clone(shared),
            id: NodeId::try_from(index).expect("node count fits in a NodeId"),
        }
    }

    /// Runs `body` on a new thread named after the node. A panic is recorded as a failure
    /// and calls the run off, so the other parties do not wait for this one forever; so does
    /// failing to start the thread, which returns `None`.
    fn spawn(
        self,
        body: impl FnOnce(&Party) -> Option<()> + Send + 'static,
    ) -> Option<JoinHandle<()>> {
        let shared = Arc::clone(&self.shared);
        let id = self.id;
        let spawned = thread::Builder::new()
            .name(format!("node-{}", self.id))
            .spawn(move || {
                if let Err(panic) = panic::catch_unwind(AssertUnwindSafe(|| body(&self))) {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "(no message)".to_string());
                    self.shared.abort();
                    self.shared
                        .fail(format!("node {} panicked: {message}", self.id));
                }
            });
        match spawned {
            Ok(handle) => Some(handle),
            Err(e) => {
                shared.fail(format!("node {id}: cannot start its thread: {e}"));
                shared.abort();
                None
            }
        }
    }

    /// Starts this party's node; on failure records why, calls the run off and returns `None`.
    fn start(&self, start: impl FnOnce() -> Result<Node, Error>) -> Option<Node> {
        match self.watch("start", start) {
            Ok(node) => Some(node),
            Err(e) => {
                let reason = format!("node {}: start failed: {e}", self.id);
                self.settle(Err(Stop::Failed(reason)));
                None
            }
        }
    }

    /// Waits for every participant and the late joiner at a phase boundary.
    fn phase(&self) -> Result<(), Aborted> {
        self.shared.phases.wait()
    }

    /// Records how a scenario function ended: a failure is a reason and calls the run off.
    fn settle(&self, result: Result<(), Stop>) {
        if let Err(Stop::Failed(reason)) = result {
            self.shared.fail(reason);
            self.shared.abort();
        }
    }
}

impl Harness for Party {
    fn sync(&self) -> Result<(), Stop> {
        self.shared.turns.wait().map_err(|Aborted| Stop::Aborted)
    }

    fn watch<R>(&self, what: &str, call: impl FnOnce() -> R) -> R {
        let slot = &self.shared.calls[self.id as usize];
        *lock(slot) = Some((what.to_string(), Instant::now()));
        let result = call();
        *lock(slot) = None;
        result
    }

    fn observe(&self, observation: Observation) {
        lock(&self.shared.observations).push(observation);
    }
}

/// The run was called off while waiting at a [`Rendezvous`].
#[derive(Debug)]
struct Aborted;

/// A reusable barrier that can be called off. `std::sync::Barrier` cannot: a party that fails
/// or panics would leave the others waiting forever.
struct Rendezvous {
    parties: usize,
    state: Mutex<RendezvousState>,
    released: Condvar,
}

#[derive(Default)]
struct RendezvousState {
    waiting: usize,
    generation: u64,
    aborted: bool,
}

impl Rendezvous {
    fn new(parties: usize) -> Rendezvous {
        Rendezvous {
            parties,
            state: Mutex::default(),
            released: Condvar::new(),
        }
    }

    /// Blocks until all parties have called `wait`, or the rendezvous is aborted.
    fn wait(&self) -> Result<(), Aborted> {
        let mut state = lock(&self.state);
        if state.aborted {
            return Err(Aborted);
        }
        state.waiting += 1;
        if state.waiting == self.parties {
            state.waiting = 0;
            state.generation += 1;
            self.released.notify_all();
            return Ok(());
        }
        let generation = state.generation;
        let state = self
            .released
            .wait_while(state, |s| s.generation == generation && !s.aborted)
            .unwrap_or_else(PoisonError::into_inner);
        if state.generation == generation {
            Err(Aborted)
        } else {
            Ok(())
        }
    }

    /// Releases every waiting party, and every later one, with [`Aborted`].
    fn abort(&self) {
        lock(&self.state).aborted = true;
        self.released.notify_all();
    }
}

/// Locks `mutex`, ignoring poisoning: panics are caught and reported per thread, and every
/// critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_releases_all_parties_each_round() {
        let rendezvous = Rendezvous::new(3);
        thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..100 {
                        rendezvous.wait().unwrap();
                    }
                });
            }
        });
        assert_eq!(lock(&rendezvous.state).generation, 100);
    }

    #[test]
    fn abort_releases_waiting_and_later_parties() {
        let rendezvous = Rendezvous::new(3);
        thread::scope(|s| {
            let waiter = s.spawn(|| rendezvous.wait());
            while lock(&rendezvous.state).waiting == 0 {
                thread::yield_now();
            }
            rendezvous.abort();
            assert!(waiter.join().unwrap().is_err());
        });
        assert!(rendezvous.wait().is_err());
    }
}
