//! The library on MPI: one node per rank, each phase on a transport attached to the bench's
//! MPI ([`MpiTransport::attach`]: a duplicate of the world communicator of its own, MPI
//! neither initialized nor finalized by it). A phase ends with its node's shutdown, which
//! closes the transport and so returns once every rank closed theirs: phases start in step,
//! and nothing sent in one reaches the next.
//!
//! At 2 ranks: the round trip of frames through the transport itself; then one phase per
//! write policy, in which rank 0 measures read hits (Update), writes holding every token
//! (Invalidate) and write and update latency with spread tokens, while rank 1 holds tokens
//! (and under Invalidate takes one back after each write). At any size: the mixed workloads,
//! every rank on its own node's handle of one `DistObj<u64>`, one phase per policy.

use std::hint::black_box;
use std::time::{Duration, Instant};

use coherence_core::{DistObj, Node, Transport};
use mpi::traits::*;
use serde_bytes::ByteBuf;
use transport_mpi::MpiTransport;

use super::{Run, MIXES};
use crate::measure::{self, Payload};
use crate::net::{echo, ping};
use crate::report::{
    size_label, Latency, Op, Policy, RoundTrip, System, TransportReport, WriteLatency, SIZES,
};
use crate::{Plan, Progress};

/// How long rank 0 lets rank 1 take a token back between Invalidate writes.
const INVALIDATE_PAUSE: Duration = Duration::from_micros(300);
/// How long rank 0's traffic must be still before it times writes that must send nothing.
const SETTLE: Duration = Duration::from_millis(50);
/// Longest wait for that.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the other rank to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Progress steps at 2 ranks: the frame round trip, read hits, writes holding every token,
/// and the latencies of both policies.
pub const LATENCY_STEPS: u64 = (1 + 2 * SIZES.len() + 2 * SIZES.len() * 2) as u64;

/// Everything of the library this rank measures.
pub fn measure(run: &mut Run) {
    let rank = run.comm.rank();
    if run.pairs {
        run.progress.step("mpi: transport frame round trip".into());
        match frame_round_trip(rank, run.plan) {
            Ok(trip) => run.report.round_trips.extend(trip),
            Err(e) => run
                .mine
                .errors
                .push(format!("transport frame round trip: {e}")),
        }
        for policy in Policy::BOTH {
            let phase = latency_phase(rank, policy, run.plan, &run.progress, &mut run.report);
            if let Err(e) = phase {
                run.mine
                    .errors
                    .push(format!("{} policy: {e}", policy.name()));
            }
        }
    }
    for policy in Policy::BOTH {
        mixes(run, policy);
    }
}

/// A transport attached to the bench's MPI.
fn attach() -> Result<MpiTransport, String> {
    MpiTransport::attach().map_err(|e| format!("attaching the MPI transport: {e}"))
}

/// A node with `policy` on a newly attached transport.
fn start_node(policy: Policy) -> Result<Node, String> {
    let config = policy.config();
    Node::start(attach()?, config).map_err(|e| format!("node start: {e}"))
}

/// Round trips of 8-byte frames through the transport's own send/recv, timed on rank 0 while
/// rank 1 echoes; `None` on rank 1.
fn frame_round_trip(rank: i32, plan: &Plan) -> Result<Option<RoundTrip>, String> {
    let t = attach()?;
    let result = if rank == 0 {
        ping(&t, 1, 8, plan.rtt).map(|latency| {
            Some(RoundTrip {
                size_bytes: 8,
                mode: "MpiTransport send/recv, attached".into(),
                latency,
            })
        })
    } else {
        echo(&t).map(|()| None)
    };
    // Returns once the other rank closed too.
    t.close();
    result
}

/// One node per rank with `policy`: rank 0 measures, rank 1 holds tokens.
fn latency_phase(
    rank: i32,
    policy: Policy,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let node = start_node(policy)?;
    let result = if rank == 0 {
        lead(&node, policy, plan, progress, report)
    } else {
        follow(&node, policy)
    };
    let down = node.shutdown().map_err(|e| format!("shutdown: {e}"));
    result.and(down)
}

/// The mixed workloads on one node per rank with `policy`, every rank on its handle of one
/// `DistObj<u64>`: a read is `read()`, a write `write()`.
fn mixes(run: &mut Run, policy: Policy) {
    let system = match policy {
        Policy::Update => System::Update,
        Policy::Invalidate => System::Invalidate,
    };
    // A rank whose node did not start still takes part in every mix (and reports failing),
    // so the others do not wait for it.
    let node = start_node(policy);
    let obj = node.as_ref().map_err(String::clone).and_then(|node| {
        node.object("bench/mixed", 0u64)
            .map_err(|e| format!("open: {e}"))
    });
    let size = run.comm.size();
    for pct in MIXES {
        run.progress.step(format!(
            "mpi: {pct} % reads, {size} ranks, {}",
            system.label()
        ));
        let rate = run.run_mix(pct, |read, rng| {
            let obj = obj.as_ref().map_err(String::clone)?;
            if read {
                black_box(obj.read().map_err(|e| e.to_string())?);
            } else {
                obj.write(rng.next()).map_err(|e| e.to_string())?;
            }
            Ok(())
        });
        run.collect_mix(system, pct, rate.map(Some));
    }
    drop(obj);
    if let Ok(node) = node {
        if let Err(e) = node.shutdown() {
            run.mine
                .errors
                .push(format!("{}: shutdown: {e}", system.label()));
        }
    }
}

/// Objects both ranks open in a phase.
struct Objects {
    small: DistObj<u64>,
    page: DistObj<ByteBuf>,
    large: DistObj<ByteBuf>,
    ready: DistObj<u32>,
    done: DistObj<bool>,
}

impl Objects {
    fn open(node: &Node) -> Result<Objects, String> {
        let open_bytes =
            |size: usize| node.object(&format!("bench/write/{size}"), ByteBuf::of_size(size));
        let e = |e: coherence_core::Error| e.to_string();
        Ok(Objects {
            small: node.object("bench/write/8", 0u64).map_err(e)?,
            page: open_bytes(SIZES[1]).map_err(e)?,
            large: open_bytes(SIZES[2]).map_err(e)?,
            ready: node.object("bench/ready", 0u32).map_err(e)?,
            done: node.object("bench/done", false).map_err(e)?,
        })
    }
}

/// Rank 1: holds tokens until rank 0 is done; under Invalidate takes a token of every
/// measured object back whenever a write took it.
fn follow(node: &Node, policy: Policy) -> Result<(), String> {
    let e = |e: coherence_core::Error| e.to_string();
    let objs = Objects::open(node)?;
    objs.ready.update(|r| *r += 1).map_err(e)?;
    let poll = match policy {
        Policy::Update => Duration::from_millis(1),
        Policy::Invalidate => Duration::from_micros(20),
    };
    while !*objs.done.read().map_err(e)? {
        if policy == Policy::Invalidate {
            retake(&objs.small)?;
            retake(&objs.page)?;
            retake(&objs.large)?;
        }
        std::thread::sleep(poll);
    }
    Ok(())
}

/// Reads `obj` if this node holds no token of it (which fetches one).
fn retake<V: Payload>(obj: &DistObj<V>) -> Result<(), String> {
    if obj.try_read().map_err(|e| e.to_string())?.is_none() {
        obj.read().map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Rank 0: waits for rank 1, measures, then tells rank 1 it is done.
fn lead(
    node: &Node,
    policy: Policy,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let e = |e: coherence_core::Error| e.to_string();
    let objs = Objects::open(node)?;
    let start = Instant::now();
    while *objs.ready.read().map_err(e)? == 0 {
        if start.elapsed() > READY_TIMEOUT {
            return Err("rank 1 did not get ready".into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let result = (|| {
        match policy {
            Policy::Update => read_hits(node, plan, progress, report)?,
            // First, while rank 1 leaves this rank alone.
            Policy::Invalidate => owned_writes(node, plan, progress, report)?,
        }
        for size in SIZES {
            for op in Op::BOTH {
                progress.step(format!(
                    "mpi: {} latency, {}, {}",
                    op.name(),
                    policy.name(),
                    size_label(size)
                ));
                let (latency, discarded) = match size {
                    8 => latency(node, &objs.small, policy, op, plan)?,
                    s if s == SIZES[1] => latency(node, &objs.page, policy, op, plan)?,
                    _ => latency(node, &objs.large, policy, op, plan)?,
                };
                report.writes.push(WriteLatency {
                    nodes: 2,
                    policy,
                    op,
                    size_bytes: size,
                    latency,
                    discarded,
                    floor_ns: None,
                    vs_floor: None,
                });
            }
        }
        Ok::<(), String>(())
    })();
    // Release rank 1 even after a failure.
    let done = objs.done.write(true).map_err(e);
    result.and(done)
}

/// Writes to objects only rank 0 opens (Invalidate policy: it holds every token), once the
/// traffic of the start of the phase has settled.
fn owned_writes(
    node: &Node,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let messages = || node.stats().messages_sent;
    let frames = || node.stats().frames_sent;
    let start = Instant::now();
    let mut last = (messages(), frames());
    while start.elapsed() < SETTLE_TIMEOUT {
        std::thread::sleep(SETTLE);
        let now = (messages(), frames());
        if now == last {
            break;
        }
        last = now;
    }
    for size in SIZES {
        progress.step(format!(
            "mpi: write holding every token, {}",
            size_label(size)
        ));
        let name = format!("bench/owned/{size}");
        report.owned_writes.push(if size == 8 {
            measure::owned_write::<u64>(node, &name, size, plan.owned, messages, frames)?
        } else {
            measure::owned_write::<ByteBuf>(node, &name, size, plan.owned, messages, frames)?
        });
    }
    Ok(())
}

/// Read hits on objects only rank 0 opens (so it holds every token).
fn read_hits(
    node: &Node,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let e = |e: coherence_core::Error| e.to_string();
    for size in SIZES {
        progress.step(format!("mpi: read hit, {}", size_label(size)));
        let name = format!("bench/read/{size}");
        let (hits, scaling) = if size == 8 {
            measure::read_hit(&node.object(&name, 0u64).map_err(e)?, size, plan.read)?
        } else {
            let obj = node.object(&name, ByteBuf::of_size(size)).map_err(e)?;
            measure::read_hit(&obj, size, plan.read)?
        };
        report.read_hits.extend(hits);
        report.read_scaling.push(scaling);
    }
    Ok(())
}

/// Latency of `op` on `obj` with rank 1 holding a token before each one (the best of the
/// budget's passes). Under Invalidate,
/// rank 0 pauses so rank 1 can take a token back; an operation that sent no message found
/// every token here (rank 1 was late) and is discarded, and counted.
fn latency<V: Payload>(
    node: &Node,
    obj: &DistObj<V>,
    policy: Policy,
    op: Op,
    plan: &Plan,
) -> Result<(Latency, usize), String> {
    let budget = plan.latency;
    // The current value, which has the object's size.
    let proto: V = V::clone(&*obj.read().map_err(|e| e.to_string())?);
    let mut discarded = 0;
    let mut i = 0u64;
    let latency = budget.best(|| {
        let mut samples = Vec::new();
        let mut warmup = budget.warmup;
        let start = Instant::now();
        while !budget.done(samples.len(), start) && discarded <= budget.samples {
            if policy == Policy::Invalidate {
                std::thread::sleep(INVALIDATE_PAUSE);
            }
            let value = proto.variant(i);
            i += 1;
            let before = node.stats().messages_sent;
            let t = Instant::now();
            match op {
                Op::Write => obj.write(value).map_err(|e| e.to_string())?,
                Op::Update => obj.update(V::bump).map_err(|e| e.to_string())?,
            }
            let elapsed = t.elapsed();
            if policy == Policy::Invalidate && node.stats().messages_sent == before {
                discarded += 1;
            } else if warmup > 0 {
                warmup -= 1;
            } else {
                samples.push(elapsed);
            }
        }
        Latency::of(samples).ok_or_else(|| "no write measured".to_string())
    })?;
    Ok((latency, discarded))
}
