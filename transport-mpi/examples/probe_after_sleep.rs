//! How long a frame that comes while its receiver sleeps waits to be seen, probing once or twice
//! per look: `mpiexec -n 2 target/release/examples/probe_after_sleep [PAUSE_US [SLEEP_US]]`.
//!
//! Raw MPI, no library code. Rank 0 sends its clock (8 bytes) every `PAUSE_US` (3,000 by
//! default); rank 1 looks with `MPI_Iprobe`, and sleeps `SLEEP_US` (1,000) between looks that
//! find nothing. First with one probe per look, then with a second probe after an empty one,
//! as `MpiTransport` does: with MPICH the second probe reports a frame the first did not. The
//! ranks must share a machine (the clock is the wall clock of both).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mpi::traits::*;

const ROUNDS: usize = 300;

fn now_ns() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is past 1970");
    u64::try_from(since.as_nanos()).expect("nanoseconds fit in 64 bits until 2554")
}

/// Median, 90th percentile and worst of `samples` (µs), sorted in place.
fn summary(samples: &mut [f64]) -> String {
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    format!(
        "median {:.0} µs, p90 {:.0} µs, worst {:.0} µs",
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

fn main() {
    let universe = mpi::initialize().expect("MPI starts");
    let world = universe.world();
    assert_eq!(world.size(), 2, "run with mpiexec -n 2");
    let arg = |i: usize, default: u64| {
        std::env::args()
            .nth(i)
            .map_or(default, |s| s.parse().expect("a number of µs"))
    };
    let (pause, sleep) = (
        Duration::from_micros(arg(1, 3_000)),
        Duration::from_micros(arg(2, 1_000)),
    );
    for probes in [1, 2] {
        if world.rank() == 0 {
            let other = world.process_at_rank(1);
            for _ in 0..ROUNDS {
                std::thread::sleep(pause);
                other.send(&[now_ns()][..]);
            }
        } else {
            let mut waited = Vec::with_capacity(ROUNDS);
            for _ in 0..ROUNDS {
                loop {
                    let found =
                        (0..probes).any(|_| world.any_process().immediate_probe().is_some());
                    if found {
                        let (sent, _) = world.any_process().receive_vec::<u64>();
                        waited.push(now_ns().saturating_sub(sent[0]) as f64 / 1e3);
                        break;
                    }
                    std::thread::sleep(sleep);
                }
            }
            println!(
                "{probes} probe(s) per look, {pause:?} between frames, {sleep:?} sleeps: a frame waited {}",
                summary(&mut waited)
            );
        }
        world.barrier();
    }
}
