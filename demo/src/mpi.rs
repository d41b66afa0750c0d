//! Runs the lab scenario across MPI ranks, one node per process (`mpiexec -n N demo
//! --transport mpi`), as the lab's `mpiexec -n 4 python main.py` did.
//!
//! Ranks `0..N-1` take turns in the integer and dictionary tests; the last rank is the "new
//! process": its node runs from the start (an MPI world is fixed) but opens the objects only
//! after the others have written them, and must start from the current values. The ranks meet
//! and collect their results through the library itself: a barrier object and a results
//! object, so no MPI call is made outside the transport's progress thread. Every rank learns
//! the verdict; rank 0 prints the report.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Node};
use transport_mpi::MpiTransport;

use crate::lab::{
    self, Barrier, Failure, Harness, Observation, ProcessResult, Report, Results, Stop,
};

/// The barrier the turn-taking ranks meet at.
const BARRIER: &str = "demo/barrier";
/// Every rank's observations and outcome, keyed by rank.
const RESULTS: &str = "demo/results";

/// What this rank prints and returns: rank 0 gets the whole report, the others only the
/// verdict.
pub enum Outcome {
    /// Rank 0: the report of every rank.
    Report(Result<Report, Failure>),
    /// Any other rank: whether the run was coherent.
    Verdict(bool),
}

/// Runs this rank's part. Fails early (as `Failure`) if MPI or the node cannot start.
pub fn run(config: &Config) -> Outcome {
    match run_rank(config) {
        Ok(outcome) => outcome,
        Err(reason) => Outcome::Report(Err(Failure {
            observations: Vec::new(),
            reasons: vec![reason],
        })),
    }
}

fn run_rank(config: &Config) -> Result<Outcome, String> {
    let transport = MpiTransport::init().map_err(|e| format!("MPI: {e}"))?;
    let ranks = transport.size() as usize;
    if ranks < 2 {
        return Err(format!(
            "the scenario needs at least 2 ranks (mpiexec -n 2 or more), got {ranks}"
        ));
    }
    let node = Node::start(transport, config.clone()).map_err(|e| e.to_string())?;
    let rank = node.id() as usize;
    let takers = ranks - 1;
    // Every wait for another rank is bounded: a broken peer makes the verdict NO, not a hang.
    let patience = config.timeout * 4;
    let harness = RankHarness::new(&node, takers, patience)?;

    let part = if rank < takers {
        lab::run_participant(&node, rank, takers, &harness)
    } else {
        wait_for_results(&harness.results, takers, patience)
            .map_err(Stop::Failed)
            .and_then(|_| lab::run_late_joiner(&node, takers, &harness))
    };
    let failure = match part {
        Ok(()) => None,
        Err(Stop::Failed(reason)) => {
            harness.call_off(&reason);
            Some(reason)
        }
        Err(Stop::Aborted) => Some(format!("node {rank}: called off")),
    };
    let observations = std::mem::take(&mut *harness.observations.lock().unwrap());
    let mine = ProcessResult {
        observations,
        failure,
    };
    harness
        .results
        .update(|results| results.insert(node.id(), mine))
        .map_err(|e| format!("rank {rank}: cannot report its result: {e}"))?;
    let all = wait_for_results(&harness.results, ranks, patience);
    drop(harness);
    let shutdown = node
        .shutdown()
        .err()
        .map(|e| format!("rank {rank}: shutdown failed: {e}"));

    let outcome = lab::verdict(all, shutdown, ranks);
    Ok(if rank == 0 {
        Outcome::Report(outcome)
    } else {
        Outcome::Verdict(outcome.is_ok())
    })
}

/// Polls `results` until `count` ranks have reported, for at most `patience`.
fn wait_for_results(
    results: &DistObj<Results>,
    count: usize,
    patience: Duration,
) -> Result<Results, String> {
    let deadline = Instant::now() + patience;
    loop {
        let seen = results.read().map_err(|e| e.to_string())?;
        if seen.len() >= count {
            return Ok((*seen).clone());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "only {} of {count} ranks reported within {patience:?}",
                seen.len()
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// One rank's [`Harness`]: meets the other turn-taking ranks at a barrier object.
struct RankHarness {
    barrier: DistObj<Barrier>,
    results: DistObj<Results>,
    takers: u64,
    rounds: Mutex<u64>,
    patience: Duration,
    observations: Mutex<Vec<Observation>>,
}

impl RankHarness {
    fn new(node: &Node, takers: usize, patience: Duration) -> Result<RankHarness, String> {
        Ok(RankHarness {
            barrier: node
                .object(BARRIER, Barrier::default())
                .map_err(|e| e.to_string())?,
            results: node
                .object(RESULTS, Results::new())
                .map_err(|e| e.to_string())?,
            takers: takers as u64,
            rounds: Mutex::new(0),
            patience,
            observations: Mutex::new(Vec::new()),
        })
    }

    /// Tells the other ranks to stop waiting at the barrier.
    fn call_off(&self, reason: &str) {
        let _ = self.barrier.update(|b| {
            b.failed.get_or_insert_with(|| reason.to_string());
        });
    }
}

impl Harness for RankHarness {
    fn sync(&self) -> Result<(), Stop> {
        let mut rounds = self.rounds.lock().unwrap();
        *rounds += 1;
        let target = *rounds * self.takers;
        self.barrier
            .update(|b| b.arrivals += 1)
            .map_err(|e| Stop::Failed(format!("barrier: {e}")))?;
        Barrier::wait_for(target, self.patience, "", || {
            self.barrier
                .read()
                .map_err(|e| Stop::Failed(format!("barrier: {e}")))
        })
    }

    fn watch<R>(&self, _what: &str, call: impl FnOnce() -> R) -> R {
        // Every library call is bounded by the configured timeout.
        call()
    }

    fn observe(&self, observation: Observation) {
        self.observations.lock().unwrap().push(observation);
    }
}
