//! The measurements on started nodes: read hits, write latency with spread tokens, writes
//! holding every token, and mixed workloads.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier, PoisonError, RwLock};
use std::time::{Duration, Instant};

use coherence_core::{DistObj, Error, Node};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_bytes::ByteBuf;

use crate::report::{Latency, Op, OwnedWrite, Policy, ReadHit, ReadScaling};
use crate::{Budget, ReadPlan};

/// A value type the benchmark stores: `u64` for 8 bytes, a byte buffer (serialized as
/// MessagePack `bin`, i.e. one copy) for larger sizes.
pub trait Payload: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// A value of `bytes` bytes.
    fn of_size(bytes: usize) -> Self;
    /// A copy that differs from the others by `i`.
    fn variant(&self, i: u64) -> Self;
    /// Changes the value in place, as an `update` closure would.
    fn bump(&mut self);
}

impl Payload for u64 {
    fn of_size(_bytes: usize) -> u64 {
        0
    }

    fn variant(&self, i: u64) -> u64 {
        i
    }

    fn bump(&mut self) {
        *self = self.wrapping_add(1);
    }
}

impl Payload for ByteBuf {
    fn of_size(bytes: usize) -> ByteBuf {
        ByteBuf::from(vec![0x5a; bytes])
    }

    fn variant(&self, i: u64) -> ByteBuf {
        let mut copy = self.clone();
        if let Some(first) = copy.first_mut() {
            *first = i as u8;
        }
        copy
    }

    fn bump(&mut self) {
        if let Some(first) = self.first_mut() {
            *first = first.wrapping_add(1);
        }
    }
}

fn text(e: Error) -> String {
    e.to_string()
}

/// Nanoseconds per call of `read` on each of `threads` threads at once, `reads` calls each:
/// the slowest thread's time over `reads`. `read` returns false on failure.
fn per_read_ns(
    threads: usize,
    reads: u64,
    read: &(impl Fn() -> bool + Sync),
) -> Result<f64, String> {
    let barrier = Barrier::new(threads);
    let elapsed: Vec<Option<Duration>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    barrier.wait();
                    let start = Instant::now();
                    for _ in 0..reads {
                        if !read() {
                            return None;
                        }
                    }
                    Some(start.elapsed())
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().ok().flatten())
            .collect()
    });
    let slowest = elapsed
        .into_iter()
        .collect::<Option<Vec<Duration>>>()
        .and_then(|e| e.into_iter().max())
        .ok_or("a read failed")?;
    Ok(slowest.as_nanos() as f64 / reads as f64)
}

/// Read hits of `obj` (a token must be here) with 1 and 2 threads, against an
/// `RwLock<Arc<T>>` read-and-clone of a value of the same size; the best of
/// `plan.rounds` rounds, alternating ours and the baseline.
pub fn read_hit<V: Payload>(
    obj: &DistObj<V>,
    size: usize,
    plan: ReadPlan,
) -> Result<(Vec<ReadHit>, ReadScaling), String> {
    // A blocking read first: it waits for a token and, where reads need one, the lease.
    obj.read().map_err(text)?;
    if obj.try_read().map_err(text)?.is_none() {
        return Err(format!(
            "{}: no token here, reads would not hit",
            obj.name()
        ));
    }
    let baseline = RwLock::new(Arc::new(V::of_size(size)));
    let base_read = || {
        let lock = black_box(&baseline);
        black_box(Arc::clone(
            &*lock.read().unwrap_or_else(PoisonError::into_inner),
        ));
        true
    };
    let ours_read = || black_box(obj).read().map(black_box).is_ok();
    // Work that shares nothing: how much parallelism the machine gave two threads.
    let control = || {
        black_box(black_box(0x9e37_79b9_u64).wrapping_mul(black_box(31)));
        true
    };
    let mut hits = Vec::new();
    for threads in [1, 2] {
        let (mut ours, mut base) = (f64::MAX, f64::MAX);
        for _ in 0..plan.rounds {
            base = base.min(per_read_ns(threads, plan.reads, &base_read)?);
            ours = ours.min(per_read_ns(threads, plan.reads, &ours_read)?);
        }
        hits.push(ReadHit {
            size_bytes: size,
            threads,
            ours_ns: ours,
            baseline_ns: base,
            ours_reads_per_s: threads as f64 * 1e9 / ours,
            baseline_reads_per_s: threads as f64 * 1e9 / base,
            ratio: ours / base,
        });
    }
    let (mut one, mut two) = (f64::MAX, f64::MAX);
    for _ in 0..plan.rounds {
        one = one.min(per_read_ns(1, plan.reads, &control)?);
        two = two.min(per_read_ns(2, plan.reads, &control)?);
    }
    let scaling = ReadScaling {
        size_bytes: size,
        ours_2_vs_1: hits[1].ours_reads_per_s / hits[0].ours_reads_per_s,
        baseline_2_vs_1: hits[1].baseline_reads_per_s / hits[0].baseline_reads_per_s,
        control_2_vs_1: 2.0 * one / two,
    };
    Ok((hits, scaling))
}

/// Latency of `op` on `objs[0]` (node 0's handle) while every other node holds a token:
/// the Update policy hands them one after each write; with Invalidate every other node reads
/// (untimed) before each timed operation.
pub fn write_latency<V: Payload>(
    objs: &[DistObj<V>],
    size: usize,
    policy: Policy,
    op: Op,
    budget: Budget,
) -> Result<Latency, String> {
    let (writer, others) = objs.split_first().ok_or("no node")?;
    spread_write_latency(writer, size, op, budget, || {
        if policy == Policy::Invalidate {
            for other in others {
                other.read().map_err(text)?;
            }
        }
        Ok(())
    })
}

/// Latency of `op` on `writer` (the best of the budget's passes), calling `spread` untimed
/// before each operation: it must leave a token with every other node that does not get one
/// from the write itself (in another process, it asks that process to read).
pub fn spread_write_latency<V: Payload>(
    writer: &DistObj<V>,
    size: usize,
    op: Op,
    budget: Budget,
    mut spread: impl FnMut() -> Result<(), String>,
) -> Result<Latency, String> {
    let proto = V::of_size(size);
    let mut i = 0u64;
    budget.best(|| {
        let mut samples = Vec::new();
        let start = Instant::now();
        let mut warmup = budget.warmup;
        while !budget.done(samples.len(), start) {
            spread()?;
            let value = proto.variant(i);
            i += 1;
            let t = Instant::now();
            match op {
                Op::Write => writer.write(value).map_err(text)?,
                Op::Update => writer.update(V::bump).map_err(text)?,
            }
            let elapsed = t.elapsed();
            if warmup > 0 {
                warmup -= 1;
            } else {
                samples.push(elapsed);
            }
        }
        Latency::of(samples).ok_or_else(|| "no write measured".into())
    })
}

/// Writes to a new object `name` that only `node` opens (Invalidate policy: after the first
/// write it holds every token), timed in batches of prepared values; counts the messages
/// and frames sent meanwhile with `messages` and `frames`.
pub fn owned_write<V: Payload>(
    node: &Node,
    name: &str,
    size: usize,
    budget: Budget,
    messages: impl Fn() -> u64,
    frames: impl Fn() -> u64,
) -> Result<OwnedWrite, String> {
    let obj = node.object(name, V::of_size(size)).map_err(text)?;
    let proto = V::of_size(size);
    for i in 0..budget.warmup as u64 {
        obj.write(proto.variant(i)).map_err(text)?;
    }
    let batch = ((4 << 20) / size).clamp(8, 10_000);
    // The object's creation is announced to the other nodes, which answer: count from when
    // that traffic is over (no message for 50 ms), so only what the writes send is counted.
    let quiet = || {
        let before = (messages(), frames());
        std::thread::sleep(Duration::from_millis(50));
        (messages(), frames()) == before
    };
    let settling = Instant::now();
    while !quiet() && settling.elapsed() < Duration::from_secs(2) {}
    let (messages_before, frames_before) = (messages(), frames());
    let mut writes = 0u64;
    let mut timed = Duration::ZERO;
    let mut best = f64::INFINITY;
    let start = Instant::now();
    while !budget.done(writes as usize, start) {
        let values: Vec<V> = (0..batch as u64).map(|i| proto.variant(i)).collect();
        let t = Instant::now();
        for value in values {
            obj.write(value).map_err(text)?;
        }
        let elapsed = t.elapsed();
        timed += elapsed;
        writes += batch as u64;
        best = best.min(elapsed.as_nanos() as f64 / batch as f64);
    }
    Ok(OwnedWrite {
        size_bytes: size,
        writes,
        ns_per_write: best,
        mean_ns_per_write: timed.as_nanos() as f64 / writes.max(1) as f64,
        messages_sent: messages() - messages_before,
        frames_sent: frames() - frames_before,
    })
}

/// A small fast generator (xorshift64*), so choosing reads or writes costs nothing.
pub struct Rng(u64);

impl Rng {
    /// A generator for worker `i`.
    pub fn new(i: usize) -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9))
    }

    /// The next number.
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Whether the next operation is a read, with probability `read_pct` percent.
    pub fn is_read(&mut self, read_pct: u32) -> bool {
        (self.next() >> 32) % 100 < u64::from(read_pct)
    }
}

/// Runs `worker(i, stop)` on `n` threads from a common start for `duration`; each returns
/// how many operations it did before `stop` was set. Returns each worker's rate and the
/// time they ran.
pub fn run_for(
    n: usize,
    duration: Duration,
    worker: impl Fn(usize, &AtomicBool) -> Result<u64, String> + Sync,
) -> Result<(Vec<f64>, f64), String> {
    let stop = AtomicBool::new(false);
    let barrier = Barrier::new(n + 1);
    let results: Vec<Result<(u64, Duration), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (stop, barrier, worker) = (&stop, &barrier, &worker);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    let ops = worker(i, stop);
                    // Stop the others early if this one failed.
                    if ops.is_err() {
                        stop.store(true, Ordering::Relaxed);
                    }
                    ops.map(|ops| (ops, start.elapsed()))
                })
            })
            .collect();
        barrier.wait();
        let deadline = Instant::now() + duration;
        while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5).min(duration));
        }
        stop.store(true, Ordering::Relaxed);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into())))
            .collect()
    });
    let mut rates = Vec::new();
    let mut secs: f64 = 0.0;
    for r in results {
        let (ops, elapsed) = r?;
        secs = secs.max(elapsed.as_secs_f64());
        rates.push(ops as f64 / elapsed.as_secs_f64());
    }
    Ok((rates, secs))
}

/// Runs a workload `passes` times and keeps the pass with the highest total rate.
pub fn best_total(
    passes: usize,
    mut pass: impl FnMut() -> Result<(Vec<f64>, f64), String>,
) -> Result<(Vec<f64>, f64), String> {
    let mut best: Option<(Vec<f64>, f64)> = None;
    for _ in 0..passes.max(1) {
        let result = pass()?;
        let total = |r: &(Vec<f64>, f64)| r.0.iter().sum::<f64>();
        if best.as_ref().is_none_or(|b| total(&result) > total(b)) {
            best = Some(result);
        }
    }
    best.ok_or_else(|| "no pass".into())
}

/// The mixed workload on our nodes: worker `i` reads or writes node `i`'s handle.
pub fn mixed(
    objs: &[DistObj<u64>],
    read_pct: u32,
    duration: Duration,
) -> Result<(Vec<f64>, f64), String> {
    run_for(objs.len(), duration, |i, stop| {
        let obj = &objs[i];
        let mut rng = Rng::new(i);
        let mut ops = 0u64;
        while !stop.load(Ordering::Relaxed) {
            if rng.is_read(read_pct) {
                black_box(obj.read().map_err(text)?);
            } else {
                obj.write(rng.next()).map_err(text)?;
            }
            ops += 1;
        }
        Ok(ops)
    })
}
