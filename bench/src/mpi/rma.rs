//! The MPI-3 RMA baseline: a window of 8 bytes on rank 0 that the ranks read and write
//! one-sided, each access in a passive-target lock epoch of its own (shared to read, exclusive
//! to write), through the MPI C API the `mpi` crate exposes (it has no RMA of its own).
//!
//! It is what MPI itself offers for a shared value: every access goes to rank 0's memory, none
//! is cached, and rank 0 makes no matching call for another rank's access (passive target).

use std::ffi::{c_int, c_void};
use std::hint::black_box;
use std::time::Instant;

use mpi::ffi;
use mpi::raw::AsRaw;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Run, MIXES};
use crate::report::{Latency, RmaLatency, RmaOp, System};
use crate::Budget;

/// Bytes of the window: one `u64`, as the object of the mixed workloads.
const WINDOW_BYTES: usize = 8;
/// The rank that holds the window.
const TARGET: c_int = 0;
/// The rank that times single accesses (at 2 ranks).
const TIMER: i32 = 1;

/// Latencies at 2 ranks (rank 1 times them, rank 0 waits), then the mixed workloads on every
/// rank. The window is freed (collectively) at the end.
pub fn measure(run: &mut Run) {
    let comm = run.comm;
    let window = Window::allocate(comm);
    if let Err(e) = &window {
        run.mine.errors.push(format!("RMA window: {e}"));
    }
    let window = window.ok();
    if run.pairs {
        let budget = run.plan.rtt;
        for op in [RmaOp::Read, RmaOp::Write] {
            run.progress
                .step(format!("mpi: RMA window latency, {}", op.how()));
            if comm.rank() == TIMER {
                let latency = match &window {
                    Some(w) => budget.best(|| w.latency_pass(op, budget)),
                    None => Err("no window".into()),
                };
                match latency {
                    Ok(latency) => run.mine.rma_latency.push(RmaLatency {
                        op,
                        size_bytes: WINDOW_BYTES,
                        latency,
                    }),
                    Err(e) => run
                        .mine
                        .errors
                        .push(format!("RMA latency, {}: {e}", op.how())),
                }
            }
            // Rank 0 waits here, inside MPI, while rank 1 accesses its window.
            comm.barrier();
        }
    }
    let size = comm.size();
    for pct in MIXES {
        run.progress
            .step(format!("mpi: {pct} % reads, {size} ranks, RMA window"));
        let rate = run.run_mix(pct, |read, rng| {
            let w = window.as_ref().ok_or("no window")?;
            if read {
                let mut value = [0u8; WINDOW_BYTES];
                w.read(&mut value)?;
                black_box(value);
                Ok(())
            } else {
                w.write(&rng.next().to_le_bytes())
            }
        });
        run.collect_mix(System::Rma, pct, rate.map(Some));
    }
}

/// An MPI window of [`WINDOW_BYTES`] on rank 0 and none elsewhere. Dropping it frees it, which
/// is collective: every rank drops it at the same point.
struct Window {
    win: ffi::MPI_Win,
    bytes: ffi::MPI_Datatype,
}

impl Window {
    /// Allocates the window (collective).
    fn allocate(comm: &SimpleCommunicator) -> Result<Window, String> {
        let size = if comm.rank() == TARGET {
            WINDOW_BYTES
        } else {
            0
        };
        let mut base: *mut c_void = std::ptr::null_mut();
        // SAFETY: reading an MPI constant; MPI is initialized.
        let mut win = unsafe { ffi::RSMPI_WIN_NULL };
        // SAFETY: `base` and `win` are out-parameters that live through the call; MPI writes
        // the window memory's address to `base` (only one-sided accesses touch that memory)
        // and the window's handle to `win`.
        let code = unsafe {
            ffi::MPI_Win_allocate(
                size as ffi::MPI_Aint,
                1,
                ffi::RSMPI_INFO_NULL,
                comm.as_raw(),
                (&mut base as *mut *mut c_void).cast(),
                &mut win,
            )
        };
        check("MPI_Win_allocate", code)?;
        Ok(Window {
            win,
            bytes: u8::equivalent_datatype().as_raw(),
        })
    }

    /// Reads the whole window into `into`.
    fn read(&self, into: &mut [u8; WINDOW_BYTES]) -> Result<(), String> {
        self.epoch(ffi::MPI_LOCK_SHARED as c_int, "MPI_Get", || {
            // SAFETY: `into` has WINDOW_BYTES bytes and stays borrowed until the epoch ends,
            // which completes the get; the target range is the whole window.
            unsafe {
                ffi::MPI_Get(
                    into.as_mut_ptr().cast(),
                    WINDOW_BYTES as c_int,
                    self.bytes,
                    TARGET,
                    0,
                    WINDOW_BYTES as c_int,
                    self.bytes,
                    self.win,
                )
            }
        })
    }

    /// Writes `value` over the whole window.
    fn write(&self, value: &[u8; WINDOW_BYTES]) -> Result<(), String> {
        self.epoch(ffi::MPI_LOCK_EXCLUSIVE as c_int, "MPI_Put", || {
            // SAFETY: `value` has WINDOW_BYTES bytes and stays borrowed until the epoch ends,
            // which completes the put; the target range is the whole window.
            unsafe {
                ffi::MPI_Put(
                    value.as_ptr().cast(),
                    WINDOW_BYTES as c_int,
                    self.bytes,
                    TARGET,
                    0,
                    WINDOW_BYTES as c_int,
                    self.bytes,
                    self.win,
                )
            }
        })
    }

    /// `access` in a passive-target epoch on rank 0's window locked with `lock`; the lock is
    /// released even if the access failed.
    fn epoch(&self, lock: c_int, what: &str, access: impl FnOnce() -> c_int) -> Result<(), String> {
        // SAFETY: `self.win` is a live window; rank TARGET holds it.
        check("MPI_Win_lock", unsafe {
            ffi::MPI_Win_lock(lock, TARGET, 0, self.win)
        })?;
        let accessed = check(what, access());
        // SAFETY: as above; this epoch was opened by the lock.
        let unlocked = check("MPI_Win_unlock", unsafe {
            ffi::MPI_Win_unlock(TARGET, self.win)
        });
        accessed.and(unlocked)
    }

    /// Times single accesses until the budget is done.
    fn latency_pass(&self, op: RmaOp, budget: Budget) -> Result<Latency, String> {
        let mut samples = Vec::new();
        let mut value = [0u8; WINDOW_BYTES];
        let start = Instant::now();
        for i in 0u64.. {
            if budget.done(samples.len(), start) {
                break;
            }
            let t = Instant::now();
            match op {
                RmaOp::Read => self.read(&mut value)?,
                RmaOp::Write => self.write(&i.to_le_bytes())?,
            }
            let elapsed = t.elapsed();
            if i >= budget.warmup as u64 {
                samples.push(elapsed);
            }
        }
        black_box(value);
        Latency::of(samples).ok_or_else(|| "no access measured".to_string())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: `self.win` is a live window, freed once; no epoch is open (every access
        // closes its own).
        let code = unsafe { ffi::MPI_Win_free(&mut self.win) };
        if let Err(e) = check("MPI_Win_free", code) {
            eprintln!("warning: {e}");
        }
    }
}

/// `Ok` if an MPI call returned `MPI_SUCCESS`. (With MPI's default error handler a failed
/// call aborts the program before it returns; this covers handlers that return.)
fn check(call: &str, code: c_int) -> Result<(), String> {
    if code == ffi::MPI_SUCCESS as c_int {
        Ok(())
    } else {
        Err(format!("{call} failed with MPI error {code}"))
    }
}
