//! The full suite on a transport that builds whole clusters in this process (local, ZeroMQ).

use coherence_core::{Config, DistObj, Node};
use serde_bytes::ByteBuf;

use crate::central::Central;
use crate::measure::{self, Payload};
use crate::net::{Cluster, Net};
use crate::report::{
    merge_round_trips, size_label, Mixed, Op, Policy, System, TransportReport, WriteLatency, MIXES,
    SIZES,
};
use crate::{Plan, Progress};

/// Node counts of the write-latency figures.
pub const NODE_COUNTS: [usize; 3] = [2, 4, 8];
/// Node counts of the mixed workloads.
pub const MIX_NODES: [usize; 2] = [2, 4];

/// Progress steps of one suite run.
pub const STEPS: u64 = (3
    + SIZES.len()
    + NODE_COUNTS.len() * 2 * SIZES.len() * 2
    + SIZES.len()
    + MIX_NODES.len() * 3 * MIXES.len()) as u64;

/// Runs every measurement on `net`; failures are recorded in the report's `errors`.
pub fn run(net: Net, plan: &Plan, progress: &Progress) -> TransportReport {
    let mut report = TransportReport {
        transport: net.name().to_string(),
        ..TransportReport::default()
    };
    let name = net.name();
    progress.step(format!("{name}: raw round trips"));
    match net.round_trips(&SIZES, plan.rtt) {
        Ok(trips) => report.round_trips.extend(trips),
        Err(e) => report.errors.push(format!("raw round trip: {e}")),
    }
    let sections: [(&str, Section); 2] =
        [("read hit", read_hits), ("write latency", write_latencies)];
    for (what, section) in sections {
        if let Err(e) = section(net, plan, progress, &mut report) {
            report.errors.push(format!("{what}: {e}"));
        }
    }
    // The floors again, after the latencies and at the end: the best pass counts, so a noisy
    // moment cannot flatter the ratios; the worst pass shows how noisy it was.
    remeasure_floors(net, plan, progress, &mut report);
    let sections: [(&str, Section); 2] = [("owned write", owned_writes), ("mixed workload", mixed)];
    for (what, section) in sections {
        if let Err(e) = section(net, plan, progress, &mut report) {
            report.errors.push(format!("{what}: {e}"));
        }
    }
    remeasure_floors(net, plan, progress, &mut report);
    report.relate_to_floor();
    report.relate_to_baselines();
    report
}

/// Measures the raw round trips again and keeps, per row, the better pass and the worse
/// worst pass.
fn remeasure_floors(net: Net, plan: &Plan, progress: &Progress, report: &mut TransportReport) {
    progress.step(format!("{}: raw round trips again", net.name()));
    match net.round_trips(&SIZES, plan.rtt) {
        Ok(trips) => merge_round_trips(&mut report.round_trips, trips),
        Err(e) => report.errors.push(format!("raw round trip: {e}")),
    }
}

type Section = fn(Net, &Plan, &Progress, &mut TransportReport) -> Result<(), String>;

/// Starts `n` nodes with `policy`, runs `f` on them, and always shuts them down.
fn with_cluster(
    net: Net,
    n: usize,
    policy: Policy,
    f: impl FnOnce(&Cluster) -> Result<(), String>,
) -> Result<(), String> {
    with_config(net, n, &policy.config(), f)
}

/// Starts `n` nodes with `config`, runs `f` on them, and always shuts them down.
fn with_config(
    net: Net,
    n: usize,
    config: &Config,
    f: impl FnOnce(&Cluster) -> Result<(), String>,
) -> Result<(), String> {
    let cluster = net.cluster(n, config)?;
    let result = f(&cluster);
    let shutdown = cluster.shutdown();
    result.and(shutdown)
}

/// Opens `name` on every node.
fn open_all<V: Payload>(
    nodes: &[Node],
    name: &str,
    size: usize,
) -> Result<Vec<DistObj<V>>, String> {
    nodes
        .iter()
        .map(|n| n.object(name, V::of_size(size)).map_err(|e| e.to_string()))
        .collect()
}

fn read_hits(
    net: Net,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    // Two members, both holding a token: a member of a cluster that may be cut off (ZeroMQ)
    // serves reads under a lease, whose check every hit pays (a lone node needs none).
    with_cluster(net, 2, Policy::Update, |cluster| {
        for size in SIZES {
            progress.step(format!("{}: read hit, {}", net.name(), size_label(size)));
            let name = format!("bench/read/{size}");
            let (hits, scaling) = if size == 8 {
                let objs = open_all::<u64>(&cluster.nodes, &name, size)?;
                measure::read_hit(&objs[0], size, plan.read)?
            } else {
                let objs = open_all::<ByteBuf>(&cluster.nodes, &name, size)?;
                measure::read_hit(&objs[0], size, plan.read)?
            };
            report.read_hits.extend(hits);
            report.read_scaling.push(scaling);
        }
        Ok(())
    })
}

fn write_latencies(
    net: Net,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let mut errors = Vec::new();
    for n in NODE_COUNTS {
        for policy in Policy::BOTH {
            let result = with_cluster(net, n, policy, |cluster| {
                for size in SIZES {
                    let figures = if size == 8 {
                        latencies::<u64>(net, cluster, policy, size, plan, progress)?
                    } else {
                        latencies::<ByteBuf>(net, cluster, policy, size, plan, progress)?
                    };
                    report.writes.extend(figures);
                }
                Ok(())
            });
            if let Err(e) = result {
                errors.push(format!("{n} nodes, {}: {e}", policy.name()));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

/// Write and update latency of one value size on `cluster`.
fn latencies<V: Payload>(
    net: Net,
    cluster: &Cluster,
    policy: Policy,
    size: usize,
    plan: &Plan,
    progress: &Progress,
) -> Result<Vec<WriteLatency>, String> {
    let n = cluster.nodes.len();
    let objs = open_all::<V>(&cluster.nodes, &format!("bench/write/{size}"), size)?;
    let mut figures = Vec::new();
    for op in Op::BOTH {
        progress.step(format!(
            "{}: {} latency, {n} nodes, {}, {}",
            net.name(),
            op.name(),
            policy.name(),
            size_label(size)
        ));
        figures.push(WriteLatency {
            nodes: n,
            policy,
            op,
            size_bytes: size,
            latency: measure::write_latency(&objs, size, policy, op, plan.latency)?,
            discarded: 0,
            floor_ns: None,
            vs_floor: None,
        });
    }
    Ok(figures)
}

fn owned_writes(
    net: Net,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    // Durability 0 whatever `--durability` says: the zero-message write is what a writer
    // that needs no copies gets (with copies, every write waits for them).
    let config = Policy::Invalidate.config().durability(0);
    with_config(net, 2, &config, |cluster| {
        let node = &cluster.nodes[0];
        let messages = || cluster.messages_sent();
        let frames = || cluster.frames_sent();
        for size in SIZES {
            progress.step(format!(
                "{}: write holding every token, {}",
                net.name(),
                size_label(size)
            ));
            let name = format!("bench/owned/{size}");
            let owned = if size == 8 {
                measure::owned_write::<u64>(node, &name, size, plan.owned, messages, frames)?
            } else {
                measure::owned_write::<ByteBuf>(node, &name, size, plan.owned, messages, frames)?
            };
            report.owned_writes.push(owned);
        }
        Ok(())
    })
}

fn mixed(
    net: Net,
    plan: &Plan,
    progress: &Progress,
    report: &mut TransportReport,
) -> Result<(), String> {
    let mut errors = Vec::new();
    let figure = |nodes, system, read_pct, (per_node, secs): (Vec<f64>, f64)| {
        Mixed::new(nodes, system, read_pct, per_node, secs)
    };
    for n in MIX_NODES {
        for (policy, system) in [
            (Policy::Update, System::Update),
            (Policy::Invalidate, System::Invalidate),
        ] {
            let result = with_cluster(net, n, policy, |cluster| {
                let objs = open_all::<u64>(&cluster.nodes, "bench/mixed", 8)?;
                for pct in MIXES {
                    progress.step(format!(
                        "{}: {pct} % reads, {n} nodes, {}",
                        net.name(),
                        system.label()
                    ));
                    let rates = measure::best_total(plan.mixed_passes, || {
                        measure::mixed(&objs, pct, plan.mixed)
                    })?;
                    report.mixed.push(figure(n, system, pct, rates));
                }
                Ok(())
            });
            if let Err(e) = result {
                errors.push(format!("{n} nodes, {}: {e}", system.label()));
            }
        }
        let central = (|| {
            let central = Central::start(net.endpoints(n + 1)?)?;
            for pct in MIXES {
                progress.step(format!("{}: {pct} % reads, {n} nodes, central", net.name()));
                let rates =
                    measure::best_total(plan.mixed_passes, || central.run(pct, plan.mixed))?;
                report.mixed.push(figure(n, System::Central, pct, rates));
            }
            central.stop()
        })();
        if let Err(e) = central {
            errors.push(format!("{n} nodes, central server: {e}"));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}
