//! Runs the lab scenario across MPI ranks, one node per process (`mpiexec -n N demo
//! --transport mpi`), as the lab's `mpiexec -n 4 python main.py` did.
//!
//! Ranks `0..N-1` take turns in the integer and dictionary tests; the last rank is the "new
//! process": its node runs from the start (an MPI world is fixed) but opens the objects only
//! after the others have written them, and must start from the current values. The ranks meet
//! and collect their results as every multi-process run does ([`crate::processes`]). Every
//! rank learns the verdict; rank 0 prints the report.

use coherence_core::{Config, Node};
use transport_mpi::MpiTransport;

use crate::lab::{Failure, Report};
use crate::processes::{Part, Process, Watch};

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

/// Library calls under MPI run unwatched: each is bounded by the configured timeout.
struct Unwatched;

impl Watch for Unwatched {
    fn watch<R>(&self, _what: &str, call: impl FnOnce() -> R) -> R {
        call()
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
    let process = Process::open(&node, takers, config.timeout * 4, &Unwatched)?;
    let part = if rank < takers {
        Part::Taker { rank }
    } else {
        Part::Late
    };
    process.play(&node, part)?;
    let outcome = process.verdict(node, ranks);
    Ok(if rank == 0 {
        Outcome::Report(outcome)
    } else {
        Outcome::Verdict(outcome.is_ok())
    })
}
