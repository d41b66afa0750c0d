//! Write latency with spread tokens on 2 ranks against the raw MPI round trip, in one run:
//! `mpiexec -n 2 target/release/examples/write_latency`.
//!
//! The program initializes MPI itself and attaches the transport to it
//! ([`MpiTransport::attach`]). Measures, in this order: blocking `MPI_Send`/`MPI_Recv` round
//! trips on the program's own communicator (the physical floor), round trips of frames through
//! the transport's own send/recv,
//! then `DistObj::write` on rank 0 while rank 1 holds a token of the object (the Update policy
//! gives it one after every write), so each write gathers a token over the network.

use std::time::{Duration, Instant};

use coherence_core::{Config, Node, Transport, TransportEvent, WritePolicy};
use mpi::traits::*;
use transport_mpi::MpiTransport;

const ROUNDS: u32 = 2000;

fn transport_round_trip(t: &MpiTransport, rounds: u32) -> Duration {
    let peer = 1 - t.local_id();
    let wait = |t: &MpiTransport| loop {
        if let Ok(Some(TransportEvent::Frame { .. })) = t.recv(Duration::from_secs(10)) {
            break;
        }
    };
    let start = Instant::now();
    for _ in 0..rounds {
        if t.local_id() == 0 {
            t.send(peer, vec![0; 8]).expect("send");
            wait(t);
        } else {
            wait(t);
            t.send(peer, vec![0; 8]).expect("send");
        }
    }
    start.elapsed() / rounds
}

/// Blocking round trips of 8 bytes with the other rank; rank 0 sends first.
fn raw_round_trip(comm: &mpi::topology::SimpleCommunicator, rounds: u32) -> Duration {
    let other = comm.process_at_rank(1 - comm.rank());
    let mut buffer = [0u8; 8];
    let start = Instant::now();
    for _ in 0..rounds {
        if comm.rank() == 0 {
            other.send(&buffer[..]);
            other.receive_into(&mut buffer[..]);
        } else {
            other.receive_into(&mut buffer[..]);
            other.send(&buffer[..]);
        }
    }
    start.elapsed() / rounds
}

fn main() {
    let (universe, threading) =
        mpi::initialize_with_threading(mpi::Threading::Multiple).expect("MPI starts");
    assert_eq!(
        threading,
        mpi::Threading::Multiple,
        "MPI without THREAD_MULTIPLE"
    );
    let world = universe.world();
    assert_eq!(world.size(), 2, "run with mpiexec -n 2");
    let raw = raw_round_trip(&world.duplicate(), ROUNDS);
    let transport = MpiTransport::attach().expect("attaches");
    let rank = transport.local_id();
    let framed = transport_round_trip(&transport, ROUNDS);

    let config = Config::default().write_policy(WritePolicy::Update);
    let node = Node::start(transport, config).expect("node starts");
    let obj = node.object("bench/x", 0u64).expect("opens");
    let done = node.object("bench/done", false).expect("opens");
    if rank == 0 {
        // Let rank 1 open the object and hold a token first.
        while obj.version() == 0 && *obj.read().unwrap() == 0 {
            obj.write(1).expect("write");
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut samples = Vec::with_capacity(ROUNDS as usize);
        for i in 0..ROUNDS as u64 {
            let start = Instant::now();
            obj.write(i).expect("write");
            samples.push(start.elapsed());
        }
        samples.sort();
        let median = samples[samples.len() / 2];
        let mean = samples.iter().sum::<Duration>() / ROUNDS;
        println!("| measure | 2 ranks |");
        println!("|---|---|");
        println!("| raw MPI ping-pong round trip (8 B) | {raw:.2?} |");
        println!("| transport frame round trip (8 B) | {framed:.2?} |");
        println!("| write with spread tokens, median | {median:.2?} |");
        println!("| write with spread tokens, mean | {mean:.2?} |");
        println!(
            "write / raw MPI round trip: {:.1}x (median); write / transport round trip: {:.1}x",
            median.as_secs_f64() / raw.as_secs_f64(),
            median.as_secs_f64() / framed.as_secs_f64()
        );
        done.write(true).expect("done");
    } else {
        while !*done.read().expect("read") {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    node.shutdown().expect("shutdown");
    // MPI_Finalize, by the program that initialized MPI.
    drop(universe);
}
