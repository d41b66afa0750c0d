//! Plain MPI messages, no library: the round-trip floor between ranks 0 and 1, and the
//! central-server baseline.

use std::hint::black_box;
use std::time::Instant;

use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::Run;
use crate::measure::Rng;
use crate::report::{merge_round_trips, size_label, Latency, RoundTrip, SIZES};
use crate::Budget;

/// Tag of a ping and its echo.
const PING_TAG: i32 = 1;
/// Tag that ends rank 1's echo loop.
const FINISH_TAG: i32 = 2;
/// Tag of a request to the central server.
const REQUEST_TAG: i32 = 3;
/// Tag of the central server's replies.
const REPLY_TAG: i32 = 4;

/// First byte of a read request.
const READ: u8 = 0;
/// First byte of a write request; the new value's 8 bytes follow.
const WRITE: u8 = 1;
/// First byte of a client's last message: it has finished its workload.
const DONE: u8 = 2;

/// Blocking `MPI_Send`/`MPI_Recv` round trips between ranks 0 and 1 (2 ranks) at every size,
/// each one timed on rank 0, the best of the budget's passes; merged into the report's (so
/// the floor measured again at the end keeps the better pass and the worse worst pass).
pub fn floors(run: &mut Run) {
    let (comm, budget) = (run.comm, run.plan.rtt);
    if comm.rank() != 0 {
        echo(comm);
        return;
    }
    let mut payload = vec![0x5a_u8; SIZES.iter().copied().max().unwrap_or(8)];
    let mut measured = Vec::new();
    for size in SIZES {
        run.progress
            .step(format!("mpi: raw MPI round trip, {}", size_label(size)));
        match budget.best(|| ping_pass(comm, &mut payload[..size], budget)) {
            Ok(latency) => measured.push(RoundTrip {
                size_bytes: size,
                mode: "MPI_Send/MPI_Recv, blocking, own communicator".into(),
                latency,
            }),
            Err(e) => run
                .mine
                .errors
                .push(format!("raw MPI round trip, {}: {e}", size_label(size))),
        }
    }
    comm.process_at_rank(1)
        .send_with_tag(&[0u8; 0][..], FINISH_TAG);
    merge_round_trips(&mut run.report.round_trips, measured);
}

/// Rank 0's round trips of `buf.len()`-byte messages to rank 1, until the budget is done;
/// fails only if it timed none.
fn ping_pass(comm: &SimpleCommunicator, buf: &mut [u8], budget: Budget) -> Result<Latency, String> {
    let peer = comm.process_at_rank(1);
    let mut samples = Vec::new();
    let start = Instant::now();
    for i in 0.. {
        if budget.done(samples.len(), start) {
            break;
        }
        let t = Instant::now();
        peer.send_with_tag(&*buf, PING_TAG);
        peer.receive_into_with_tag(buf, PING_TAG);
        let elapsed = t.elapsed();
        if i >= budget.warmup {
            samples.push(elapsed);
        }
    }
    Latency::of(samples).ok_or_else(|| "no round trip measured".to_string())
}

/// Rank 1: sends every ping back as it came, until rank 0 says it has finished.
fn echo(comm: &SimpleCommunicator) {
    let peer = comm.process_at_rank(0);
    let mut buf = vec![0u8; SIZES.iter().copied().max().unwrap_or(8)];
    loop {
        let status = peer.receive_into(&mut buf[..]);
        if status.tag() == FINISH_TAG {
            return;
        }
        let len = status.count(u8::equivalent_datatype()) as usize;
        peer.send_with_tag(&buf[..len], PING_TAG);
    }
}

/// The central-server baseline on plain MPI: rank 0 serves (it owns the value and answers
/// each request in turn) and runs no workload; every other rank runs the mixed workload as a
/// client, each operation a request and its reply. Returns this client's rate, `None` on
/// rank 0.
///
/// The server gets a rank of its own, as it gets an endpoint of its own in process: had rank 0
/// also run a client, that client would compete with the server for MPI's lock (MPICH
/// serializes the threads of a process) and be starved, and a local client reading a plain
/// variable would dwarf every remote one.
pub fn central(run: &Run, read_pct: u32) -> Result<Option<(f64, f64)>, String> {
    let comm = run.comm;
    if comm.rank() == 0 {
        // The clients start at a barrier.
        comm.barrier();
        return serve(comm, comm.size() - 1).map(|()| None);
    }
    let rate = run.run_mix(read_pct, |read, rng| {
        request(comm, read, rng);
        Ok(())
    });
    // Even after a failure: the server ends once every client said it is done.
    comm.process_at_rank(0)
        .send_with_tag(&[DONE][..], REQUEST_TAG);
    rate.map(Some)
}

/// One client operation: a read or a write request and the server's reply.
fn request(comm: &SimpleCommunicator, read: bool, rng: &mut Rng) {
    let server = comm.process_at_rank(0);
    if read {
        server.send_with_tag(&[READ][..], REQUEST_TAG);
    } else {
        let mut message = [WRITE; 9];
        message[1..].copy_from_slice(&rng.next().to_le_bytes());
        server.send_with_tag(&message[..], REQUEST_TAG);
    }
    let mut reply = [0u8; 8];
    server.receive_into_with_tag(&mut reply[..], REPLY_TAG);
    black_box(reply);
}

/// The server loop: answers reads with the value and writes with an empty acknowledgement,
/// until `clients` clients said they are done.
fn serve(comm: &SimpleCommunicator, mut clients: i32) -> Result<(), String> {
    let mut value = [0u8; 8];
    let mut buf = [0u8; 9];
    let mut bad = None;
    while clients > 0 {
        let status = comm
            .any_process()
            .receive_into_with_tag(&mut buf[..], REQUEST_TAG);
        let client = comm.process_at_rank(status.source_rank());
        match buf[0] {
            READ => client.send_with_tag(&value[..], REPLY_TAG),
            WRITE => {
                value.copy_from_slice(&buf[1..]);
                client.send_with_tag(&[0u8; 0][..], REPLY_TAG);
            }
            DONE => clients -= 1,
            other => {
                // Answered all the same, so the client does not wait forever.
                client.send_with_tag(&[0u8; 0][..], REPLY_TAG);
                bad = Some(format!(
                    "bad request {other} from rank {}",
                    status.source_rank()
                ));
            }
        }
    }
    bad.map_or(Ok(()), Err)
}
