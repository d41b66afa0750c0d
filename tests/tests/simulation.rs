//! Deterministic simulation: a sweep over thousands of seeds, a single-seed tracer, scripted
//! scenarios and regression seeds. See `tests::sim`.

use std::collections::BTreeSet;
use std::time::Instant;

use bytes::Bytes;
use coherence_core::protocol::{OpId, Outcome, WritePolicy};
use coherence_core::wire::Value;
use coherence_core::NodeId;
use tests::seeds::{env_u64, sweep};
use tests::sim::{run_seed, SimConfig, SimReport, Simulation};

/// Scheduler seeds each scripted scenario runs under, per policy.
const SCENARIO_SEEDS: u64 = 100;

/// Seeds `0..SIM_SEEDS` (default 5000), 2 to 5 nodes, 1 to 3 objects, both policies, joins and
/// leaves, all derived from the seed; split over two threads.
#[test]
fn many_seeds() {
    let seeds = env_u64("SIM_SEEDS").unwrap_or(5000);
    assert!(seeds > 0, "SIM_SEEDS=0 would check nothing");
    let start = Instant::now();
    let (total, report) = sweep(
        seeds,
        |seed| {
            let cfg = SimConfig::for_seed(seed);
            run_seed(seed, &cfg).map_err(|error| {
                format!(
                    "simulation failed: seed={seed} config={cfg:?} error={error}\n  rerun: \
                     SIM_SEED={seed} cargo test -p tests --test simulation single_seed -- \
                     --ignored --nocapture"
                )
            })
        },
        SimReport::add,
    );
    println!("{seeds} seeds in {:.1?}: {total:?}", start.elapsed());
    assert!(
        report.is_empty(),
        "{} of {seeds} seeds failed:\n{}",
        report.len(),
        report.join("\n")
    );
}

/// Replays seed `SIM_SEED`, printing every step (ignored unless asked for: it checks nothing
/// the sweep does not).
#[test]
#[ignore = "replays one seed: SIM_SEED=N cargo test -p tests --test simulation single_seed -- --ignored --nocapture"]
fn single_seed() {
    let seed = env_u64("SIM_SEED").expect("set SIM_SEED to the seed to replay");
    let cfg = SimConfig {
        trace: true,
        ..SimConfig::for_seed(seed)
    };
    println!("seed={seed} config={cfg:?}");
    match run_seed(seed, &cfg) {
        Ok(report) => println!("ok: {report:?}"),
        Err(error) => panic!("simulation failed: seed={seed} error={error}"),
    }
}

// ----- scripted scenarios, each under many schedules -----

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// Runs `scenario` on a fresh cluster of `nodes` nodes and `objects` objects under
/// [`SCENARIO_SEEDS`] scheduler seeds and both policies; the simulation checks every invariant
/// after every step.
fn each_schedule(
    nodes: u32,
    objects: usize,
    scenario: impl Fn(&mut Simulation) -> Result<(), String>,
) {
    for policy in [WritePolicy::Update, WritePolicy::Invalidate] {
        for seed in 0..SCENARIO_SEEDS {
            let cfg = SimConfig {
                nodes,
                objects,
                policy,
                abort_percent: 0,
                ..SimConfig::default()
            };
            let mut sim = Simulation::new(seed, cfg);
            if let Err(error) = scenario(&mut sim) {
                panic!("scenario failed: policy={policy:?} seed={seed}: {error}");
            }
        }
    }
}

/// Every node opens `object`, then the cluster settles.
fn open_everywhere(sim: &mut Simulation, object: usize) -> Result<(), String> {
    for node in sim.node_ids() {
        sim.open(node, object)?;
    }
    sim.settle()
}

/// Delivers up to `count` random messages.
fn deliver_some(sim: &mut Simulation, count: usize) -> Result<(), String> {
    for _ in 0..count {
        if !sim.deliver_random()? {
            break;
        }
    }
    Ok(())
}

fn written_version(sim: &Simulation, op: OpId) -> Result<u64, String> {
    match sim.outcome(op) {
        Some(Outcome::Written { version }) => Ok(*version),
        other => Err(format!("write op {op} ended with {other:?}")),
    }
}

fn read_value(sim: &Simulation, op: OpId) -> Result<Value, String> {
    match sim.outcome(op) {
        Some(Outcome::Read(value) | Outcome::Opened(value)) => Ok(value.clone()),
        other => Err(format!("read op {op} ended with {other:?}")),
    }
}

/// Every node reads `object`; all must see `version`.
fn all_read_version(sim: &mut Simulation, object: usize, version: u64) -> Result<(), String> {
    let reads = sim
        .node_ids()
        .into_iter()
        .map(|node| sim.read(node, object))
        .collect::<Result<Vec<OpId>, String>>()?;
    sim.settle()?;
    for op in reads {
        let value = read_value(sim, op)?;
        ensure!(
            value.version == version,
            "read op {op} saw {value:?}, expected version {version}"
        );
    }
    Ok(())
}

#[test]
fn two_concurrent_writers_on_three_nodes() {
    each_schedule(3, 1, |sim| {
        open_everywhere(sim, 0)?;
        let a = sim.write(1, 0)?;
        let b = sim.write(2, 0)?;
        sim.settle()?;
        let versions = BTreeSet::from([written_version(sim, a)?, written_version(sim, b)?]);
        ensure!(
            versions == BTreeSet::from([1, 2]),
            "writes got versions {versions:?}"
        );
        all_read_version(sim, 0, 2)?;
        // The same with read-modify-write: both locks are granted and commit in turn.
        let c = sim.lock(2, 0)?;
        let d = sim.lock(1, 0)?;
        sim.settle()?;
        for op in [c, d] {
            ensure!(
                matches!(sim.outcome(op), Some(Outcome::Granted(_))),
                "lock op {op} ended with {:?}",
                sim.outcome(op)
            );
        }
        all_read_version(sim, 0, 4)
    });
}

#[test]
fn concurrent_open_of_a_new_name_by_all_nodes_creates_it_once() {
    each_schedule(4, 1, |sim| {
        // Genesis (node 0) opens last, so the others' requests race to it.
        let ops = (0..4)
            .rev()
            .map(|node| sim.open(node, 0))
            .collect::<Result<Vec<OpId>, String>>()?;
        sim.settle()?;
        let values = ops
            .iter()
            .map(|&op| read_value(sim, op))
            .collect::<Result<Vec<Value>, String>>()?;
        let inits: Vec<Bytes> = ops
            .iter()
            .map(|op| Bytes::from(format!("init{op}")))
            .collect();
        let first = &values[0];
        ensure!(
            values.iter().all(|v| v == first) && first.version == 0 && inits.contains(&first.bytes),
            "opens saw {values:?}, inits were {inits:?}"
        );
        Ok(())
    });
}

#[test]
fn late_joiner_opens_the_latest_value() {
    each_schedule(3, 1, |sim| {
        open_everywhere(sim, 0)?;
        for i in 0..5 {
            sim.write(i % 3, 0)?;
            deliver_some(sim, 3)?;
        }
        sim.settle()?;
        let new = sim.join()?;
        let op = sim.open(new, 0)?;
        sim.settle()?;
        let value = read_value(sim, op)?;
        ensure!(value.version == 5, "the joiner opened {value:?}");
        all_read_version(sim, 0, 5)
    });
}

#[test]
fn genesis_leaves_while_others_open_new_names() {
    each_schedule(4, 3, |sim| {
        sim.open(0, 0)?;
        sim.settle()?;
        sim.leave(0)?;
        deliver_some(sim, 2)?;
        let mut ops = Vec::new();
        for node in 1..4 {
            for object in [1, 2, 0] {
                ops.push(sim.open(node, object)?);
            }
        }
        sim.settle()?;
        ensure!(sim.node(0).is_none(), "node 0 never left");
        for op in ops {
            read_value(sim, op)?;
        }
        let genesis: Vec<NodeId> = sim
            .node_ids()
            .into_iter()
            .filter(|&n| sim.node(n).is_some_and(|p| p.is_genesis()))
            .collect();
        ensure!(genesis.len() == 1, "genesis nodes {genesis:?}");
        Ok(())
    });
}

#[test]
fn owner_token_holder_leaves() {
    each_schedule(3, 1, |sim| {
        open_everywhere(sim, 0)?;
        sim.write(1, 0)?;
        sim.settle()?;
        let owns = |sim: &Simulation, n: NodeId| {
            let view = sim.node(n).and_then(|p| p.token_view(sim.object_name(0)));
            view.is_some_and(|v| v.owner)
        };
        let owner = sim
            .node_ids()
            .into_iter()
            .find(|&n| owns(sim, n))
            .ok_or("nobody owns o0")?;
        sim.leave(owner)?;
        let others: Vec<NodeId> = sim.node_ids().into_iter().filter(|&n| n != owner).collect();
        let write = sim.write(others[0], 0)?;
        let read = sim.read(others[1], 0)?;
        sim.settle()?;
        ensure!(sim.node(owner).is_none(), "node {owner} never left");
        ensure!(
            written_version(sim, write)? == 2,
            "the write after the leave"
        );
        read_value(sim, read)?;
        all_read_version(sim, 0, 2)
    });
}

#[test]
fn all_but_one_node_leave() {
    each_schedule(4, 2, |sim| {
        open_everywhere(sim, 0)?;
        open_everywhere(sim, 1)?;
        for node in 0..3 {
            sim.write(node, 0)?;
            sim.leave(node)?;
            sim.write(3, 1)?;
            sim.settle()?;
        }
        ensure!(sim.node_ids() == [3], "members left: {:?}", sim.node_ids());
        let last = sim.node(3).expect("node 3 stays");
        ensure!(last.is_genesis(), "the last node is not genesis");
        for object in 0..2 {
            let view = last.token_view(sim.object_name(object));
            ensure!(
                view.is_some_and(|v| v.owner && v.readable && v.tokens == v.total),
                "the last node holds {view:?} of o{object}"
            );
        }
        let latest = sim.latest(1).expect("o1 exists").version;
        ensure!(latest == 3, "o1 is at version {latest} after 3 writes");
        all_read_version(sim, 1, 3)
    });
}

// ----- regressions -----

/// Runs `seed` exactly as [`many_seeds`] does.
fn regression(seed: u64) {
    let cfg = SimConfig::for_seed(seed);
    if let Err(error) = run_seed(seed, &cfg) {
        panic!(
            "simulation failed: seed={seed} config={cfg:?} error={error}\n  rerun: \
             SIM_SEED={seed} cargo test -p tests --test simulation single_seed -- --ignored --nocapture"
        );
    }
}

/// A member leaves before it handled `Joined` of a node that already counts it as a peer:
/// it thinks it is alone, finishes leaving at once and takes every token and the genesis role
/// with it, so the joiner can never open anything.
#[test]
fn regression_leave_before_joined_is_delivered() {
    let run = || -> Result<(), String> {
        let cfg = SimConfig {
            nodes: 1,
            objects: 1,
            ..SimConfig::default()
        };
        let mut sim = Simulation::new(0, cfg);
        sim.open(0, 0)?;
        sim.settle()?;
        let new = sim.join()?;
        sim.leave(0)?; // `Joined(1)` is still queued: node 0 knows no member
        let op = sim.open(new, 0)?;
        sim.settle()?;
        read_value(&sim, op).map(drop)
    };
    run().unwrap_or_else(|error| panic!("{error}"));
}

/// Two nodes leave concurrently. Node 1 handles node 0's `Leaving` (forgets node 0, acks),
/// then leaves itself. It must not finish before node 0's `Genesis`, sent after `Leaving`,
/// reached it, or the genesis role is lost.
#[test]
fn regression_concurrent_leaves_keep_the_genesis_role() {
    let run = || -> Result<(), String> {
        let cfg = SimConfig {
            nodes: 3,
            objects: 1,
            ..SimConfig::default()
        };
        let mut sim = Simulation::new(0, cfg);
        sim.leave(0)?; // Leaving to 1 and 2, then Genesis to 1
        sim.deliver(0, 1)?; // node 1 forgets node 0 and acknowledges
        sim.leave(1)?;
        sim.deliver(1, 2)?;
        sim.deliver(2, 1)?; // node 2's ack; Genesis 0 -> 1 is still queued
        sim.settle()
    };
    run().unwrap_or_else(|error| panic!("{error}"));
}

/// A leave racing a join: node 0 leaves before it handled `Joined(2)`, believes it is alone
/// and leaves with every token (see [`regression_leave_before_joined_is_delivered`]).
#[test]
fn regression_seed_4907() {
    regression(4907);
}

/// A leave racing a join, losing the genesis role: node 1 holds it, node 2 joins, node 1
/// leaves before it handled `Joined(2)`; its only peer, node 0, is itself departing, so there
/// is no heir for the role.
#[test]
fn regression_seed_32910() {
    regression(32910);
}

/// Concurrent leaves: node 1 forgets leaving node 0, then leaves and must not finish while
/// node 0's `Genesis` is still in flight to it.
#[test]
fn regression_seed_12031() {
    regression(12031);
}

/// Concurrent leaves: node 2 handles node 1's `Leaving`, then leaves; node 1 still holds
/// node 2's old request and forwards a token to it, so node 2 must wait for node 1.
#[test]
fn regression_seed_21956() {
    regression(21956);
}

/// Once writes stop, a round of reads on every node leaves a token at every node: a second
/// round completes locally, without a message. Before, a node kept tokens passed to a request
/// of another node that had already finished (its `Done` still on the way), and readers then
/// passed the owner's last token back and forth.
#[test]
fn readers_keep_a_token_once_writes_stop() {
    each_schedule(4, 1, |sim| {
        open_everywhere(sim, 0)?;
        for round in 0..12u32 {
            let node = round % 4;
            if round % 3 == 0 {
                sim.write(node, 0)?;
            } else {
                sim.read(node, 0)?;
            }
            deliver_some(sim, 3)?;
        }
        sim.settle()?;
        for node in sim.node_ids() {
            sim.read(node, 0)?;
        }
        sim.settle()?;
        for node in sim.node_ids() {
            let op = sim.read(node, 0)?;
            ensure!(
                sim.outcome(op).is_some(),
                "node {node}'s read after the read round needed a token: {:?}",
                sim.node(node)
                    .and_then(|p| p.token_view(sim.object_name(0)))
            );
        }
        Ok(())
    });
}

/// Under Update, a reader's request that crosses the writer's push is answered by that push:
/// the owner keeps its last token, so its own reads stay local.
#[test]
fn a_read_request_that_crosses_the_push_leaves_the_owner_its_token() {
    let cfg = SimConfig {
        nodes: 2,
        objects: 1,
        policy: WritePolicy::Update,
        abort_percent: 0,
        ..SimConfig::default()
    };
    let mut sim = Simulation::new(0, cfg);
    let scenario = |sim: &mut Simulation| -> Result<(), String> {
        open_everywhere(sim, 0)?;
        let write = sim.write(0, 0)?;
        // Node 1 hands its token to the write, then misses a read: its request queues behind
        // the grant, so it reaches node 0 after node 0 wrote and pushed the new value.
        sim.deliver(0, 1)?;
        let read = sim.read(1, 0)?;
        sim.deliver(1, 0)?;
        let version = written_version(sim, write)?;
        sim.deliver(1, 0)?;
        let owner = sim.node(0).and_then(|p| p.token_view(sim.object_name(0)));
        ensure!(
            owner.is_some_and(|view| view.readable),
            "the owner gave its token to a request the push answers: {owner:?}"
        );
        sim.settle()?;
        let value = read_value(sim, read)?;
        ensure!(
            value.version == version,
            "the crossing read saw {value:?}, expected version {version}"
        );
        Ok(())
    };
    if let Err(error) = scenario(&mut sim) {
        panic!("{error}");
    }
}
