//! Read-hit cost against the `RwLock<Arc<T>>` read-and-clone baseline, measured in one run.
//!
//! `cargo bench -p coherence-core --bench read_hit`. Prints ns per read for 1 and 2 threads and
//! the ratios; the best of several rounds is reported because the machine is noisy.

use std::hint::black_box;
use std::sync::{Arc, Barrier, RwLock};
use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, Node};

const READS: u64 = 2_000_000;
const ROUNDS: usize = 7;

/// Best nanoseconds per read over `ROUNDS`, each thread doing `READS` reads at once.
fn best_ns_per_read(threads: usize, read: impl Fn() -> i64 + Sync) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let barrier = Barrier::new(threads);
        let elapsed: Vec<Duration> = thread::scope(|s| {
            let workers: Vec<_> = (0..threads)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let start = Instant::now();
                        let mut sum = 0i64;
                        for _ in 0..READS {
                            sum = sum.wrapping_add(read());
                        }
                        black_box(sum);
                        start.elapsed()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let slowest = elapsed.into_iter().max().unwrap();
        best = best.min(slowest.as_nanos() as f64 / READS as f64);
    }
    best
}

fn main() {
    let node = Node::start(
        transport_local::cluster(1).pop().unwrap(),
        Config::default(),
    )
    .expect("node starts");
    let obj = node.object("x", 42i64).expect("object opens");
    assert_eq!(*obj.read().unwrap(), 42);
    let baseline = RwLock::new(Arc::new(42i64));

    println!("| readers | RwLock<Arc<T>> ns/read | DistObj::read ns/read | ratio |");
    println!("|---|---|---|---|");
    for threads in [1, 2] {
        let base = best_ns_per_read(threads, || {
            let value: Arc<i64> = Arc::clone(&black_box(&baseline).read().unwrap());
            *value
        });
        let ours = best_ns_per_read(threads, || *black_box(&obj).read().unwrap());
        println!("| {threads} | {base:.1} | {ours:.1} | {:.2} |", ours / base);
    }
    let one = best_ns_per_read(1, || *black_box(&obj).read().unwrap());
    let two = best_ns_per_read(2, || *black_box(&obj).read().unwrap());
    println!(
        "DistObj::read throughput, 2 threads vs 1: {:.2}x",
        2.0 * one / two
    );
    assert_eq!(node.stats().messages_sent, 0, "read hits must send nothing");
    node.shutdown().expect("shutdown");
}
