//! Write latency with spread tokens on 2 ranks against the raw MPI round trip, in one run:
//! `mpiexec -n 2 target/release/examples/write_latency [update | invalidate [PAUSE_US]]`.
//!
//! The program initializes MPI itself and attaches the transport to it
//! ([`MpiTransport::attach`]). Measures, in this order: blocking `MPI_Send`/`MPI_Recv` round
//! trips on the program's own communicator (the physical floor), round trips of frames through
//! the transport's own send/recv,
//! then `DistObj::write` on rank 0 while rank 1 holds a token of the object, so each write
//! gathers a token over the network. Under `update` (the default) the policy gives rank 1 a
//! token after every write. Under `invalidate` rank 1 reads the object back after each write
//! (it polls every 20 µs) and rank 0 waits, spinning, until that read's request and `Done`
//! came; with `PAUSE_US` rank 0 sleeps that long instead, so its threads are idle when it
//! writes. A write that found every token here (rank 1 was late) sent nothing; it is not
//! counted.

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

    let args: Vec<String> = std::env::args().skip(1).collect();
    let policy = match args.first().map(String::as_str) {
        None | Some("update") => WritePolicy::Update,
        Some("invalidate") => WritePolicy::Invalidate,
        Some(other) => panic!("unknown policy {other:?}: update or invalidate"),
    };
    let pause = args
        .get(1)
        .map(|us| Duration::from_micros(us.parse().expect("PAUSE_US is a number of µs")));
    let invalidate = policy == WritePolicy::Invalidate;
    let config = Config::default().write_policy(policy);
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
        let mut received_after_write = node.stats().frames_received;
        for i in 0..ROUNDS as u64 {
            match (invalidate, pause) {
                (false, _) => {}
                (true, Some(pause)) => std::thread::sleep(pause),
                (true, None) => {
                    // Rank 1's read request and its `Done`, or 5 ms.
                    let waiting = Instant::now();
                    while node.stats().frames_received < received_after_write + 2
                        && waiting.elapsed() < Duration::from_millis(5)
                    {
                        std::hint::spin_loop();
                    }
                }
            }
            let sent = node.stats().messages_sent;
            let start = Instant::now();
            obj.write(i).expect("write");
            let took = start.elapsed();
            received_after_write = node.stats().frames_received;
            if node.stats().messages_sent != sent {
                samples.push(took);
            }
        }
        assert!(!samples.is_empty(), "no write gathered a token");
        samples.sort();
        let median = samples[samples.len() / 2];
        let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
        println!(
            "{policy:?} policy, {} of {ROUNDS} writes gathered a token{}",
            samples.len(),
            pause.map_or(String::new(), |p| format!(", {p:?} pause before each"))
        );
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
            if invalidate && obj.try_read().expect("read").is_none() {
                obj.read().expect("read");
            }
            std::thread::sleep(Duration::from_micros(if invalidate { 20 } else { 1000 }));
        }
    }
    node.shutdown().expect("shutdown");
    // MPI_Finalize, by the program that initialized MPI.
    drop(universe);
}
