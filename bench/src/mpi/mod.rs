//! MPI: one node per rank, under `mpiexec -n 2` (every figure) or `-n 4` (the mixed workloads
//! at 4), in a build with `--features mpi`.
//!
//! The bench owns MPI here, so that the peers the library is compared with run in the same
//! processes and the same run: it initializes MPI with `MPI_THREAD_MULTIPLE` (its own threads
//! and the transport's call MPI at once) and works on its own duplicate of the world
//! communicator. It measures, in this order:
//! - at 2 ranks, the raw blocking `MPI_Send`/`MPI_Recv` round trip, the floor ([`raw`]);
//! - the MPI-3 RMA window: at 2 ranks the latency of one-sided reads and writes, then the
//!   mixed workloads on every rank ([`rma`]);
//! - the central server on plain MPI messages at 99 % reads: rank 0 serves, the other ranks
//!   are its clients ([`raw`]);
//! - the library, on transports attached to this MPI ([`library`]);
//! - at 2 ranks, the floor again (the best pass counts, the worst shows the noise).
//!
//! Every rank goes through the same collective calls in the same order whatever fails: a
//! measurement that fails is recorded and the run goes on, so no rank waits for another
//! forever. At the end every rank sends its figures and errors to rank 0, which reports; MPI
//! is finalized last, when the universe is dropped.

mod library;
mod raw;
mod rma;

use std::time::{Duration, Instant};

use mpi::environment::Threading;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use serde::{Deserialize, Serialize};

use crate::measure::Rng;
use crate::report::{Mixed, RmaLatency, System, TransportReport, SIZES};
use crate::{Plan, Progress};

/// Read shares of the MPI mixed workloads, in percent.
const MIXES: [u32; 3] = [99, 90, 50];
/// Read share of the central server's mixed workload.
const CENTRAL_MIX: u32 = 99;
/// Tag of what every rank sends rank 0 at the end.
const FROM_RANK_TAG: i32 = 10;
/// How many operations a mixed workload runs between looks at the clock (reading it costs
/// about as much as a read hit).
const CLOCK_EVERY: u64 = 16;

/// Progress steps: at 2 ranks the floors twice, the RMA latencies, the transport's frame
/// round trip and the library's latency phases; the mixed workloads at any size.
fn steps(pairs: bool) -> u64 {
    let mixes = (3 * MIXES.len() + 1) as u64;
    if pairs {
        mixes + library::LATENCY_STEPS + (2 * SIZES.len() + 2) as u64
    } else {
        mixes
    }
}

/// How long each mixed workload runs.
fn mix_duration(quick: bool) -> Duration {
    if quick {
        Duration::from_millis(200)
    } else {
        Duration::from_millis(1500)
    }
}

/// What a rank other than 0 sends rank 0 at the end, as JSON.
#[derive(Debug, Default, Serialize, Deserialize)]
struct FromRank {
    /// Rank 1 measures the RMA window's latency.
    rma_latency: Vec<RmaLatency>,
    /// What failed on that rank.
    errors: Vec<String>,
}

/// Initializes MPI, runs this rank's part and finalizes MPI; rank 0 returns the report, the
/// others `None`.
pub fn run(plan: &Plan, quick: bool) -> Result<Option<TransportReport>, String> {
    let (universe, threading) = mpi::initialize_with_threading(Threading::Multiple)
        .ok_or("MPI was already initialized in this process")?;
    if threading != Threading::Multiple {
        // Every rank gets the same answer, so every rank stops here.
        return Err(format!(
            "the MPI library grants only {threading:?} threading; the bench needs Multiple \
             (its threads and the transport's call MPI at once)"
        ));
    }
    let comm = universe.world().duplicate();
    let result = measure(&comm, plan, quick);
    // The communicator is freed before MPI is finalized, which dropping the universe does.
    drop(comm);
    drop(universe);
    result
}

/// What every part of this rank's run uses, and what it measured so far.
struct Run<'a> {
    /// The bench's own communicator, a duplicate of the world's.
    comm: &'a SimpleCommunicator,
    plan: &'a Plan,
    /// The world has exactly 2 ranks, so latency figures are measured: between two nodes with
    /// nothing else running.
    pairs: bool,
    /// How long each mixed workload runs.
    mix: Duration,
    progress: Progress,
    /// The figures; only rank 0's count.
    report: TransportReport,
    /// What this rank sends rank 0 at the end (rank 0 adds its own to the report).
    mine: FromRank,
}

/// Everything measured on this rank, gathered on rank 0.
fn measure(
    comm: &SimpleCommunicator,
    plan: &Plan,
    quick: bool,
) -> Result<Option<TransportReport>, String> {
    let (rank, size) = (comm.rank(), comm.size());
    if size < 2 {
        return Err(
            "the MPI mode needs 2 ranks or more: `mpiexec -n 2` (every figure) or \
                    `-n 4`"
                .into(),
        );
    }
    let pairs = size == 2;
    let mut run = Run {
        comm,
        plan,
        pairs,
        mix: mix_duration(quick),
        progress: Progress::new(steps(pairs), rank == 0 && !quick),
        report: TransportReport {
            transport: "mpi".into(),
            ranks: Some(size as usize),
            ..TransportReport::default()
        },
        mine: FromRank::default(),
    };
    if pairs {
        raw::floors(&mut run);
    }
    rma::measure(&mut run);
    run.progress.step(format!(
        "mpi: {CENTRAL_MIX} % reads, {size} ranks, central server"
    ));
    let central = raw::central(&run, CENTRAL_MIX);
    run.collect_mix(System::Central, CENTRAL_MIX, central);
    library::measure(&mut run);
    if pairs {
        raw::floors(&mut run);
    }
    run.progress.finish();
    let Run {
        mut report,
        mut mine,
        ..
    } = run;
    if rank != 0 {
        // Cannot fail for these types; if it did, rank 0 would report that the empty message
        // does not decode.
        let json = serde_json::to_vec(&mine).unwrap_or_default();
        comm.process_at_rank(0)
            .send_with_tag(&json[..], FROM_RANK_TAG);
        return Ok(None);
    }
    report.errors.append(&mut mine.errors);
    for from in 1..size {
        let (json, _) = comm
            .process_at_rank(from)
            .receive_vec_with_tag::<u8>(FROM_RANK_TAG);
        match serde_json::from_slice::<FromRank>(&json) {
            Ok(theirs) => {
                report.rma_latency.extend(theirs.rma_latency);
                let errors = theirs.errors.into_iter();
                report
                    .errors
                    .extend(errors.map(|e| format!("rank {from}: {e}")));
            }
            Err(e) => report
                .errors
                .push(format!("rank {from}: its figures did not decode: {e}")),
        }
    }
    report.relate_to_floor();
    report.relate_to_baselines();
    Ok(Some(report))
}

impl Run<'_> {
    /// Runs this rank's part of a mixed workload: from a barrier (so every rank starts
    /// together) for the mix duration, `op(is_read, rng)` with reads chosen at `read_pct` % by a
    /// generator seeded with the rank. Returns the rank's operations per second and the
    /// seconds it ran.
    fn run_mix(
        &self,
        read_pct: u32,
        mut op: impl FnMut(bool, &mut Rng) -> Result<(), String>,
    ) -> Result<(f64, f64), String> {
        let mut rng = Rng::new(self.comm.rank() as usize);
        self.comm.barrier();
        let start = Instant::now();
        let mut ops = 0u64;
        loop {
            let read = rng.is_read(read_pct);
            op(read, &mut rng)?;
            ops += 1;
            if ops.is_multiple_of(CLOCK_EVERY) && start.elapsed() >= self.mix {
                break;
            }
        }
        let secs = start.elapsed().as_secs_f64();
        Ok((ops as f64 / secs, secs))
    }

    /// Gathers every rank's rate of one mixed workload on rank 0, which adds the figure to the
    /// report. `rate` is this rank's operations per second and seconds, `None` if it runs no
    /// workload (the central server). A rank whose part failed records why and sends NaN, and
    /// rank 0 then records which ranks failed instead of a figure.
    fn collect_mix(
        &mut self,
        system: System,
        read_pct: u32,
        rate: Result<Option<(f64, f64)>, String>,
    ) {
        let what = format!("{} at {read_pct} % reads", system.label());
        let sent = match rate {
            Ok(Some((per_s, secs))) => [per_s, secs],
            // No rate is negative.
            Ok(None) => [-1.0, 0.0],
            Err(e) => {
                self.mine.errors.push(format!("{what}: {e}"));
                [f64::NAN; 2]
            }
        };
        let root = self.comm.process_at_rank(0);
        if self.comm.rank() != 0 {
            root.gather_into(&sent[..]);
            return;
        }
        let ranks = self.comm.size() as usize;
        let mut all = vec![0.0f64; 2 * ranks];
        root.gather_into_root(&sent[..], &mut all[..]);
        let failed: Vec<String> = all
            .chunks(2)
            .enumerate()
            .filter(|(_, r)| r[0].is_nan())
            .map(|(rank, _)| rank.to_string())
            .collect();
        if !failed.is_empty() {
            self.report
                .errors
                .push(format!("{what}: failed on rank(s) {}", failed.join(", ")));
            return;
        }
        let per_node: Vec<f64> = all.chunks(2).map(|r| r[0]).filter(|&r| r >= 0.0).collect();
        let secs = all.chunks(2).map(|r| r[1]).fold(0.0, f64::max);
        self.report
            .mixed
            .push(Mixed::new(ranks, system, read_pct, per_node, secs));
    }
}
