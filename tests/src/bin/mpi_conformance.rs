//! The conformance scenarios over MPI, one node per rank: `mpiexec -n N mpi_conformance
//! [update|invalidate]`, N >= 2. Every rank runs every scenario of [`tests::ranked`] (the same
//! code the ZeroMQ process suite runs); ranks meet at barriers built from the library itself
//! (an object counting arrivals), so the only MPI calls are the transport's. Each scenario
//! asserts its outcome on every rank; the process exits non-zero (and mpiexec with it) on the
//! first failure. Rank 1 (which stays to the end) prints one line per scenario and a summary.

use std::process::ExitCode;

use coherence_core::{Node, WritePolicy};
use tests::ranked;
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
    let node = match Node::start(transport, ranked::config(policy)) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("node: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rank = node.id() as usize;
    match ranked::run(node, size, &format!("mpi -n {size} {policy:?}"), None) {
        Ok(passed) => {
            if rank == ranked::REPORTER {
                println!("mpi: {passed} passed, 0 failed");
            }
            ExitCode::SUCCESS
        }
        // The failure is printed; the other ranks would wait for this one: stop here,
        // mpiexec ends them.
        Err(_) => std::process::exit(1),
    }
}
