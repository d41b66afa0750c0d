//! The conformance scenarios over MPI, one node per rank: `mpiexec -n N mpi_conformance
//! [update|invalidate]`, N >= 2. Every rank runs every scenario of [`tests::conformance`] that
//! process clusters run (the same code every other cluster runs); ranks meet at barriers built
//! from the library itself (an object counting arrivals), so the only MPI calls are the
//! transport's. Each scenario checks its outcome on every rank; the process exits non-zero
//! (and mpiexec with it) on the first failure. Rank 1 (which stays to the end) prints one line
//! per scenario and a summary. An MPI world is fixed, so the late joiner's rank runs from the
//! start and only opens the objects late.

use std::process::ExitCode;

use coherence_core::WritePolicy;
use tests::conformance;
use transport_mpi::MpiTransport;

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
    let rank = coherence_core::Transport::local_id(&transport) as usize;
    let label = format!("mpi -n {size} {policy:?}");
    match conformance::run_ranks(transport, size, policy, &label, Box::new(|| ())) {
        Ok(passed) => {
            if rank == conformance::REPORTER {
                println!("mpi: {passed} passed, 0 failed");
            }
            ExitCode::SUCCESS
        }
        // The failure is printed; the other ranks would wait for this one: stop here,
        // mpiexec ends them.
        Err(_) => std::process::exit(1),
    }
}
