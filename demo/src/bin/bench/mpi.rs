//! MPI: one node per rank, exactly 2 ranks (`mpiexec -n 2`).
//!
//! MPI allows one transport per process, so the run goes in phases on one [`MpiTransport`]:
//! the raw `MPI_Send`/`MPI_Recv` round trip ([`MpiTransport::raw_ping_pong`]) and the round
//! trip of frames through the transport's own send/recv; then one node per write policy, each
//! started on a [`Phase`] view of the transport and shut down before the next. Rank 0
//! measures read hits, write and update latency with spread tokens, and writes holding every
//! token; rank 1 holds tokens (and, under Invalidate, takes one back after each write).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Node, NodeId, Transport, TransportError, TransportEvent};
use serde_bytes::ByteBuf;
use transport_mpi::MpiTransport;

use crate::measure::{self, Payload};
use crate::net::{echo, next_frame, ping};
use crate::report::{
    size_label, Latency, Op, Policy, RoundTrip, TransportReport, WriteLatency, SIZES,
};
use crate::{Plan, Progress};

/// Frame that ends a phase's node on this rank: the peer's [`Phase`] reports it as
/// [`TransportEvent::Left`], as the transport's own goodbye would.
const GOODBYE: &[u8] = b"coherence-bench/goodbye";
/// Frame that ends a phase: everything the peer's node sent comes before it.
const PHASE_END: &[u8] = b"coherence-bench/phase-end";
/// How long rank 0 lets rank 1 take a token back between Invalidate writes.
const INVALIDATE_PAUSE: Duration = Duration::from_micros(300);
/// How long rank 0's traffic must be still before it times writes that must send nothing.
const SETTLE: Duration = Duration::from_millis(50);
/// Longest wait for that.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the other rank to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Progress steps of the MPI run: raw round trips twice, the frame round trip, read hits,
/// latencies, writes holding every token.
const STEPS: u64 = (4 * SIZES.len() + 1 + 2 * SIZES.len() * 2) as u64;

/// Runs this rank's part; rank 0 returns the report, rank 1 `None`.
pub fn run(plan: &Plan, quick: bool) -> Result<Option<TransportReport>, String> {
    let transport = Arc::new(MpiTransport::init().map_err(|e| format!("MPI: {e}"))?);
    let rank = transport.local_id();
    let result = if transport.size() == 2 {
        measure(&transport, plan, quick)
    } else {
        Err(format!(
            "MPI mode needs exactly 2 ranks (`mpiexec -n 2`), this world has {}",
            transport.size()
        ))
    };
    // Returns once every rank closed; MPI is finalized then.
    transport.close();
    match result {
        Ok(report) if rank == 0 => Ok(Some(report)),
        Ok(report) => {
            for e in &report.errors {
                eprintln!("rank {rank}: {e}");
            }
            Ok(None)
        }
        Err(e) => Err(format!("rank {rank}: {e}")),
    }
}

/// Everything measured on this rank; errors of a phase are recorded, later phases still run.
fn measure(t: &Arc<MpiTransport>, plan: &Plan, quick: bool) -> Result<TransportReport, String> {
    let rank = t.local_id();
    let peer = 1 - rank;
    let progress = Progress::new(STEPS, rank == 0 && !quick);
    let mut report = TransportReport {
        transport: "mpi".into(),
        ..TransportReport::default()
    };
    raw_floors(t, plan, &progress, &mut report)?;
    progress.step("mpi: transport frame round trip".into());
    if rank == 0 {
        let latency = ping(&**t, peer, 8, plan.rtt)?;
        report.round_trips.push(RoundTrip {
            size_bytes: 8,
            mode: "transport send/recv (progress threads)".into(),
            parked: false,
            latency,
        });
    } else {
        echo(&**t)?;
    }
    for policy in Policy::BOTH {
        if let Err(e) = phase(t, policy, plan, &progress, &mut report) {
            report.errors.push(format!("{} policy: {e}", policy.name()));
        }
    }
    // The floors again at the end: the better counts, the worse shows the noise.
    if let Err(e) = raw_floors(t, plan, &progress, &mut report) {
        report.errors.push(e);
    }
    progress.finish();
    report.relate_to_floor();
    Ok(report)
}

/// Blocking `MPI_Send`/`MPI_Recv` round trips at every size (both ranks at once), the best of
/// the budget's passes; merged into the report's earlier measurement if there is one.
fn raw_floors(
    t: &MpiTransport,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let peer = 1 - t.local_id();
    for (i, size) in SIZES.into_iter().enumerate() {
        progress.step(format!("mpi: raw MPI round trip, {}", size_label(size)));
        let rounds = raw_rounds(size, plan);
        let mut means = Vec::new();
        for _ in 0..plan.rtt.passes.max(1) {
            let mean = t
                .raw_ping_pong(peer, rounds, size)
                .ok_or("raw MPI ping-pong failed")?;
            means.push(mean);
        }
        let best = means.iter().min().copied().unwrap_or_default();
        let worst = means.iter().max().copied().unwrap_or_default();
        let mut latency = Latency::mean_only(rounds as usize, best);
        match report.round_trips.get(i) {
            Some(before) => {
                let worst = worst.as_nanos() as f64;
                latency.worst_pass_ns =
                    Some(before.latency.worst_pass_ns.unwrap_or(0.0).max(worst));
                if before.latency.mean_ns < latency.mean_ns {
                    latency.mean_ns = before.latency.mean_ns;
                }
                report.round_trips[i].latency = latency;
            }
            None => {
                latency.worst_pass_ns = Some(worst.as_nanos() as f64);
                report.round_trips.push(RoundTrip {
                    size_bytes: size,
                    mode: "MPI_Send/MPI_Recv, blocking (mean per pass)".into(),
                    parked: false,
                    latency,
                });
            }
        }
    }
    Ok(())
}

/// Rounds of the raw ping-pong at `size`: about the plan's round-trip time budget.
fn raw_rounds(size: usize, plan: &Plan) -> u32 {
    let per_round_ns = 1_000.0 + size as f64 * 0.2;
    let rounds = plan.rtt.time.as_nanos() as f64 / per_round_ns;
    rounds.clamp(100.0, plan.rtt.samples as f64) as u32
}

/// One node per rank with `policy`, measured, shut down, and the transport drained.
fn phase(
    t: &Arc<MpiTransport>,
    policy: Policy,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let rank = t.local_id();
    let config = Config::default().write_policy(policy.write_policy());
    let peer_ended = Arc::new(AtomicBool::new(false));
    let view = Phase {
        inner: Arc::clone(t),
        closed: AtomicBool::new(false),
        peer_ended: Arc::clone(&peer_ended),
    };
    let node = Node::start(view, config).map_err(|e| e.to_string())?;
    let result = if rank == 0 {
        lead(&node, t, policy, plan, progress, report)
    } else {
        follow(&node, policy)
    };
    let down = node.shutdown().map_err(|e| format!("shutdown: {e}"));
    let drained = end_phase(t, &peer_ended);
    result.and(down).and(drained)
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
    t: &MpiTransport,
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
            Policy::Invalidate => owned_writes(node, t, plan, progress, report)?,
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
                    parked: false,
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
    t: &MpiTransport,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let messages = || node.stats().messages_sent;
    let frames = || t.frames_sent();
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

/// Sends the end-of-phase marker and drops everything the peer's node still sent, up to the
/// peer's marker (unless this rank's node already saw it), so the next phase's node starts
/// on a clean inbox.
fn end_phase(t: &MpiTransport, peer_ended: &AtomicBool) -> Result<(), String> {
    let peer = 1 - t.local_id();
    t.send(peer, PHASE_END.to_vec())
        .map_err(|e| format!("phase end: {e}"))?;
    while !peer_ended.load(Ordering::Acquire) {
        let (from, bytes) = next_frame(t).map_err(|e| format!("phase end: {e}"))?;
        if from == peer && bytes == PHASE_END {
            break;
        }
    }
    Ok(())
}

/// The MPI transport as one phase's node sees it: closing it does not finalize MPI but sends
/// a goodbye frame, which the peer's `Phase` reports as [`TransportEvent::Left`] (the leave
/// protocol needs that, as with the transport's own close). The peer's end-of-phase marker,
/// should it come while this node still runs, is noted in `peer_ended` instead of reaching
/// the node.
struct Phase {
    inner: Arc<MpiTransport>,
    closed: AtomicBool,
    peer_ended: Arc<AtomicBool>,
}

impl Transport for Phase {
    fn local_id(&self) -> NodeId {
        self.inner.local_id()
    }

    fn peers(&self) -> Vec<NodeId> {
        self.inner.peers()
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) -> Result<(), TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        self.inner.send(to, frame)
    }

    fn recv(&self, timeout: Duration) -> Result<Option<TransportEvent>, TransportError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(TransportError::Closed);
        }
        match self.inner.recv(timeout)? {
            Some(TransportEvent::Frame { from, bytes }) if bytes == GOODBYE => {
                Ok(Some(TransportEvent::Left(from)))
            }
            Some(TransportEvent::Frame { bytes, .. }) if bytes == PHASE_END => {
                self.peer_ended.store(true, Ordering::Release);
                Ok(None)
            }
            event => Ok(event),
        }
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::AcqRel) {
            for peer in self.inner.peers() {
                let _ = self.inner.send(peer, GOODBYE.to_vec());
            }
        }
    }
}
