//! The lab with one node per process, as MPI ranks and ZeroMQ processes run it: how a process
//! meets the others, reports what it saw, and learns the verdict.
//!
//! The processes meet and collect their results through the library itself, a barrier object
//! and a results object, so a transport needs nothing but its node (and under MPI no MPI call
//! is made outside the transport's progress thread). Every wait for another process is
//! bounded: a broken peer makes the verdict NO, not a hang. Every process learns the verdict.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use coherence_core::{DistObj, Node, NodeId};

use crate::lab::{
    self, Barrier, Failure, Harness, Observation, ProcessResult, Report, Results, Stop,
};

/// The barrier the turn-taking processes meet at.
const BARRIER: &str = "demo/barrier";
/// Every process's observations and outcome, keyed by node id.
const RESULTS: &str = "demo/results";

/// Runs a library call: under ZeroMQ a watchdog ends the process if one outlives its timeout;
/// under MPI the call runs as it is.
pub trait Watch {
    /// Runs `call`, described by `what`.
    fn watch<R>(&self, what: &str, call: impl FnOnce() -> R) -> R;
}

/// What one process does in the lab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// Takes turns with the other takers; `rank` is its place among them.
    Taker {
        /// Its place among the takers, `0..takers`.
        rank: usize,
    },
    /// Opens the objects once every taker has reported.
    Late,
}

/// One process of the run: its [`Harness`], and the objects it meets and reports in.
pub struct Process<'a, W> {
    id: NodeId,
    barrier: DistObj<Barrier>,
    results: DistObj<Results>,
    takers: u64,
    rounds: Mutex<u64>,
    patience: Duration,
    observations: Mutex<Vec<Observation>>,
    watch: &'a W,
}

impl<'a, W: Watch> Process<'a, W> {
    /// Opens the barrier and the results on `node`, for `takers` turn-taking processes; every
    /// wait for another process gives up after `patience`.
    pub fn open(
        node: &Node,
        takers: usize,
        patience: Duration,
        watch: &'a W,
    ) -> Result<Self, String> {
        let id = node.id();
        let cannot = |name: &str, e| format!("node {id}: cannot open {name:?}: {e}");
        Ok(Process {
            id,
            barrier: watch
                .watch("open of the barrier", || {
                    node.object(BARRIER, Barrier::default())
                })
                .map_err(|e| cannot(BARRIER, e))?,
            results: watch
                .watch("open of the results", || {
                    node.object(RESULTS, Results::new())
                })
                .map_err(|e| cannot(RESULTS, e))?,
            takers: takers as u64,
            rounds: Mutex::new(0),
            patience,
            observations: Mutex::new(Vec::new()),
            watch,
        })
    }

    /// Plays `part` on `node` (the late joiner once every taker has reported), then reports
    /// what it saw and whether it failed. A process that fails calls the run off, so the
    /// others stop waiting for it. `Err` if the report could not be made.
    pub fn play(&self, node: &Node, part: Part) -> Result<(), String> {
        let takers = self.takers as usize;
        let outcome = match part {
            Part::Taker { rank } => lab::run_participant(node, rank, takers, self),
            Part::Late => self
                .wait_for_results(takers)
                .map_err(Stop::Failed)
                .and_then(|_| lab::run_late_joiner(node, takers, self)),
        };
        let failure = match outcome {
            Ok(()) => None,
            Err(Stop::Failed(reason)) => {
                self.call_off(&reason);
                Some(reason)
            }
            Err(Stop::Aborted) => Some(format!("node {}: called off", self.id)),
        };
        let mine = ProcessResult {
            observations: std::mem::take(&mut *lock(&self.observations)),
            failure,
        };
        self.watch
            .watch("report of the result", || {
                self.results.update(|results| results.insert(self.id, mine))
            })
            .map(drop)
            .map_err(|e| format!("node {}: cannot report its result: {e}", self.id))
    }

    /// Waits for the results of all `total` processes, shuts `node` down and returns the
    /// run's verdict, with every process's observations.
    pub fn verdict(self, node: Node, total: usize) -> Result<Report, Failure> {
        let all = self.wait_for_results(total);
        let shutdown = self
            .watch
            .watch("shutdown", || node.shutdown())
            .err()
            .map(|e| format!("node {}: shutdown failed: {e}", self.id));
        lab::verdict(all, shutdown, total)
    }

    /// Polls the results until `count` processes have reported, for at most the patience.
    pub fn wait_for_results(&self, count: usize) -> Result<Results, String> {
        let deadline = Instant::now() + self.patience;
        loop {
            let seen = self
                .watch
                .watch("read of the results", || self.results.read())
                .map_err(|e| format!("node {}: results: {e}", self.id))?;
            if seen.len() >= count {
                return Ok((*seen).clone());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "node {}: only {} of {count} nodes reported within {:?}",
                    self.id,
                    seen.len(),
                    self.patience
                ));
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    /// Tells the other processes to stop waiting at the barrier.
    fn call_off(&self, reason: &str) {
        let _ = self.watch.watch("call-off", || {
            self.barrier.update(|b| {
                b.failed.get_or_insert_with(|| reason.to_string());
            })
        });
    }
}

impl<W: Watch> Harness for Process<'_, W> {
    fn sync(&self) -> Result<(), Stop> {
        let mut rounds = lock(&self.rounds);
        *rounds += 1;
        let target = *rounds * self.takers;
        let failed = |e| Stop::Failed(format!("node {}: barrier: {e}", self.id));
        self.watch
            .watch("barrier arrival", || {
                self.barrier.update(|b| b.arrivals += 1)
            })
            .map_err(failed)?;
        Barrier::wait_for(
            target,
            self.patience,
            &format!("node {}: ", self.id),
            || {
                self.watch
                    .watch("barrier read", || self.barrier.read())
                    .map_err(failed)
            },
        )
    }

    fn watch<R>(&self, what: &str, call: impl FnOnce() -> R) -> R {
        self.watch.watch(what, call)
    }

    fn observe(&self, observation: Observation) {
        lock(&self.observations).push(observation);
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
