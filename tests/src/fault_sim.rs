//! Deterministic simulation of [`Member`]s (token protocol, views and leases) under crashes,
//! partitions, stalls, heals, joins, leaves and view changes, with a seeded scheduler.
//!
//! The network is one FIFO queue per ordered pair of nodes; every step advances the simulated
//! time a little and delivers the head of a random queue to a live node, starts or finishes
//! an operation, crashes a node, cuts a minority off (a partition) or stalls a node, heals,
//! lets a node hear what its transport reports (a node lost, a node asking to join), fires a
//! node's retry timer, lets a new node ask to join or a member leave. Each node's clock runs
//! at its own rate, within the drift leases assume; due lease timers fire every step.
//!
//! A crashed node never acts again: what it sent may still arrive (a random prefix of each of
//! its queues survives), and what is sent to it stays in flight, where its tokens still count.
//! Across a partition nothing is delivered until it heals (then everything is, in order); the
//! cut-off side keeps running, and each side's transports report the other side lost. A
//! stalled node does nothing until its stall ends (its clock goes on); a long stall is
//! reported as a loss. Membership goes through the members' own rules ([`Member::wanted`]):
//! every node hears of a loss in its own time, the coordinator proposes, proposals race and
//! stall when a proposer crashes, and timers retry. A node that was cut off or stalled comes
//! back to find itself removed. Faults stop at the seed's budget (every node lost counts, as
//! a removed node never comes back as the same member), and never leave the newest view (or
//! that view without its leaving members) without a reachable majority.
//!
//! Checked after every step:
//! - at most one node that may write each object (holds every token, is live, not frozen, not
//!   removed, and its lease holds), across all epochs;
//! - in the newest epoch, once nobody in it is frozen: tokens add up to one agreed total with
//!   one owner token, counting the members that have not installed the view yet with the
//!   tokens the plan gives them, and token messages of that epoch in flight (if a crash lost
//!   some in flight: never more than the total, never two owner tokens);
//! - on every installation: no write that returned before is missing from the plan (with
//!   durability at least the number of crashes).
//!
//! At the end, operations stop, the last view change is driven to its end and every queue to
//! live nodes drains: every operation at a live node has completed, every live node is in the
//! same view of exactly the live nodes, and each object's history (every operation, the
//! crashed nodes' unfinished ones included) is linearizable, checked with stateright's
//! `LinearizabilityTester`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Display;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coherence_core::member::{Member, MemberOutput};
use coherence_core::protocol::{Event, OpId, Outcome, Plan, Protocol, WritePolicy};
use coherence_core::view::{Epoch, View};
use coherence_core::wire::{Envelope, Init, Message, Traffic};
use coherence_core::{Contact, NodeId};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::conformance::linearizability::{check, Entry, Op, Ret, Verdict};

/// The type name every simulated object is opened with.
const TYPE_NAME: &str = "i64";

/// The lease every simulated member serves under: about 800 steps, so that lease traffic
/// (every member asks every other one each quarter of it) takes a small share of the
/// deliveries even with seven members.
const LEASE: Duration = Duration::from_millis(400);

/// The most simulated time one step takes.
const MAX_STEP_TIME: Duration = Duration::from_millis(1);

/// The longest partition or stall.
const MAX_EPISODE: Duration = Duration::from_millis(1000);

/// How long a partition or stall lasts before the transports report the nodes on the other
/// side lost, and drop them for good (as the ZeroMQ transport does), at most: a shorter one
/// heals without a trace. Each episode draws its own, from a quarter of it: often before the
/// cut-off side's lease expired, which grants must then hold back.
const DETECTION: Duration = Duration::from_millis(600);

/// One seed's cluster and workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultConfig {
    /// Founding members, ids `0..nodes`.
    pub nodes: u32,
    /// Objects, all opened by every node before the faults begin.
    pub objects: usize,
    /// The write policy.
    pub policy: WritePolicy,
    /// Copies a write waits for: with any, no write that returned is lost.
    pub durability: u32,
    /// Nodes that may be lost to faults (crashed, cut off, stalled for long): a minority.
    pub crashes: u32,
    /// Operations started in all.
    pub ops: usize,
}

impl FaultConfig {
    /// The configuration seed `seed` runs: 3 to 5 nodes, 1 or 2 objects, either policy, up to
    /// a minority of faults, durability equal to that minority.
    pub fn for_seed(seed: u64) -> FaultConfig {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfa17_5eed);
        let nodes = rng.gen_range(3..=5);
        let minority = (nodes - 1) / 2;
        FaultConfig {
            nodes,
            objects: rng.gen_range(1..=2),
            policy: if rng.gen_bool(0.5) {
                WritePolicy::Update
            } else {
                WritePolicy::Invalidate
            },
            durability: minority,
            crashes: rng.gen_range(0..=minority),
            ops: rng.gen_range(16..=40),
        }
    }
}

/// What one seed did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultReport {
    /// Scheduler steps.
    pub steps: u64,
    /// Operations that returned a result.
    pub completed: u64,
    /// Operations that a view change interrupted.
    pub interrupted: u64,
    /// Nodes crashed.
    pub crashes: u64,
    /// Partitions that cut nodes off.
    pub partitions: u64,
    /// Nodes stalled.
    pub stalls: u64,
    /// Reads refused because the lease did not hold.
    pub no_majority: u64,
    /// View installations (counted per node).
    pub installs: u64,
    /// Token messages dropped by fencing.
    pub fenced: u64,
    /// Joiners a decision took in.
    pub joined: u64,
    /// Ids a decision gave to a joiner already taken in (its request heard late).
    pub ghosts: u64,
}

impl FaultReport {
    /// Adds another seed's counts.
    pub fn add(&mut self, other: &FaultReport) {
        self.steps += other.steps;
        self.completed += other.completed;
        self.interrupted += other.interrupted;
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.stalls += other.stalls;
        self.no_majority += other.no_majority;
        self.joined += other.joined;
        self.ghosts += other.ghosts;
        self.installs += other.installs;
        self.fenced += other.fenced;
    }
}

/// Runs seed `seed` with [`FaultConfig::for_seed`].
pub fn run_fault_seed(seed: u64) -> Result<FaultReport, String> {
    FaultSim::new(seed, FaultConfig::for_seed(seed)).run()
}

/// Replays seed `seed`, printing every step.
pub fn trace_fault_seed(seed: u64) -> Result<FaultReport, String> {
    FaultSim::new(seed, FaultConfig::for_seed(seed))
        .with_trace()
        .run()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write(i64),
    /// Lock, then commit this value.
    Swap(i64),
}

#[derive(Debug, Clone)]
struct OpRecord {
    node: NodeId,
    object: usize,
    kind: Kind,
    /// A swap's lock was granted with this value; it commits in a later step.
    granted: Option<i64>,
    /// The granted swap committed; it returns when its value has its copies.
    committed: bool,
    finished: bool,
}

impl OpRecord {
    fn awaits_commit(&self) -> bool {
        self.granted.is_some() && !self.committed && !self.finished
    }
}

/// What a node's transport tells it about another node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Reported {
    /// The node is lost (silent too long).
    Lost(NodeId),
    /// A node reached at this contact asks to join.
    Joining(Contact),
}

/// A fault that ends: a partition or a stall.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Episode {
    /// Nothing crosses between these nodes and the others until `until`.
    Cut {
        side: BTreeSet<NodeId>,
        until: Duration,
    },
    /// `node` does nothing until `until`.
    Stall { node: NodeId, until: Duration },
}

impl Episode {
    fn until(&self) -> Duration {
        match self {
            Episode::Cut { until, .. } | Episode::Stall { until, .. } => *until,
        }
    }

    /// The two sides of the episode: the nodes cut off (or stalled), and the others.
    fn cut_off(&self) -> BTreeSet<NodeId> {
        match self {
            Episode::Cut { side, .. } => side.clone(),
            Episode::Stall { node, .. } => BTreeSet::from([*node]),
        }
    }
}

/// The simulation of one seed.
pub struct FaultSim {
    seed: u64,
    cfg: FaultConfig,
    rng: StdRng,
    nodes: Vec<Member>,
    alive: Vec<bool>,
    net: BTreeMap<(NodeId, NodeId), VecDeque<Envelope>>,
    ops: BTreeMap<OpId, OpRecord>,
    next_op: OpId,
    next_value: i64,
    started: usize,
    /// Per object, the history in the checker's terms (thread = operation id).
    history: Vec<Vec<Entry>>,
    /// Every decided view and its plan, by epoch.
    decided: BTreeMap<Epoch, (View, Plan)>,
    /// The node whose write returned last.
    last_writer: Option<NodeId>,
    /// A write returned in the last step.
    just_wrote: bool,
    /// Per node, what its transport has yet to report, in order.
    reports: Vec<VecDeque<Reported>>,
    joins: u32,
    leaves: u32,
    /// Epochs in which a crash lost tokens in flight: their tokens only never exceed the
    /// total.
    lossy: BTreeSet<Epoch>,
    /// Per object, writes that returned: (epoch of the writer, version, value).
    returned: Vec<Vec<(Epoch, u64, i64)>>,
    report: FaultReport,
    trace: bool,
    /// Real time's origin: each node's clock is `origin + elapsed * rate`.
    origin: Instant,
    /// Simulated time since the start.
    elapsed: Duration,
    /// Per node, its clock's rate (within the drift leases assume).
    rates: Vec<f64>,
    /// The partition or stall under way, if any, and when it is detected.
    episode: Option<Episode>,
    detect_at: Duration,
    /// Pairs of nodes whose transports dropped each other (a partition or stall detected):
    /// nothing passes between them any more.
    severed: BTreeSet<(NodeId, NodeId)>,
    /// Nodes lost to faults so far (crashed, or cut off or stalled and reported lost).
    lost: BTreeSet<NodeId>,
    /// Joiners that asked and were not taken in yet, by incarnation: a node exists once a
    /// decision gave it an id, as its transport learns the id from the first member that
    /// speaks to it.
    asking: BTreeMap<u64, Contact>,
}

impl FaultSim {
    /// A cluster of `cfg.nodes` founding members that have opened every object.
    pub fn new(seed: u64, cfg: FaultConfig) -> FaultSim {
        let members: BTreeSet<NodeId> = (0..cfg.nodes).collect();
        let view = View {
            epoch: 0,
            members: members.clone(),
        };
        let nodes = members
            .iter()
            .map(|&id| {
                let protocol = Protocol::new(id, [], cfg.policy).with_durability(cfg.durability);
                Member::new(protocol, view.clone()).with_lease(LEASE)
            })
            .collect();
        let mut rng = StdRng::seed_from_u64(seed);
        let rates = (0..cfg.nodes).map(|_| Self::rate(&mut rng)).collect();
        FaultSim {
            seed,
            rng,
            origin: Instant::now(),
            elapsed: Duration::ZERO,
            rates,
            episode: None,
            detect_at: Duration::ZERO,
            severed: BTreeSet::new(),
            lost: BTreeSet::new(),
            asking: BTreeMap::new(),
            alive: vec![true; cfg.nodes as usize],
            nodes,
            net: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_op: 1,
            next_value: 1,
            started: 0,
            history: vec![Vec::new(); cfg.objects],
            decided: BTreeMap::from([(0, (view, Plan::default()))]),
            returned: vec![Vec::new(); cfg.objects],
            lossy: BTreeSet::new(),
            last_writer: None,
            just_wrote: false,
            reports: vec![VecDeque::new(); cfg.nodes as usize],
            joins: 0,
            leaves: 0,
            report: FaultReport::default(),
            trace: false,
            cfg,
        }
    }

    /// A clock rate within the drift leases assume (a little inside it).
    fn rate(rng: &mut StdRng) -> f64 {
        let drift = coherence_core::lease::MAX_CLOCK_DRIFT * 0.9;
        rng.gen_range(1.0 - drift..=1.0 + drift)
    }

    /// Node `node`'s clock now.
    fn now(&self, node: NodeId) -> Instant {
        self.origin + self.elapsed.mul_f64(self.rates[node as usize])
    }

    /// Prints every step (for replaying one seed).
    pub fn with_trace(mut self) -> Self {
        self.trace = true;
        self
    }

    /// Runs the seed: setup, random steps with faults, then the drain and the final checks.
    pub fn run(mut self) -> Result<FaultReport, String> {
        self.setup()?;
        // Operations go on while a partition or stall lasts, so the cut-off side is asked to
        // serve before and after its lease expired.
        while self.started < self.cfg.ops || self.episode.is_some() {
            self.random_step()?;
            self.check_budget()?;
        }
        self.drain()?;
        self.final_checks()?;
        Ok(self.report)
    }

    fn fail(&self, what: impl Display) -> String {
        format!(
            "fault seed {} ({:?}), step {}: {what}",
            self.seed, self.cfg, self.report.steps
        )
    }

    fn check_budget(&self) -> Result<(), String> {
        if self.report.steps > 200_000 {
            return Err(self.fail(format!("no end after 200000 steps: {}", self.summary())));
        }
        Ok(())
    }

    fn name(object: usize) -> String {
        format!("o{object}")
    }

    /// Every node opens every object (node 0, the genesis, first), and every queue drains:
    /// the faults start from a cluster where every object exists with value 0.
    fn setup(&mut self) -> Result<(), String> {
        // Leases first, so the opens can be served.
        for node in 0..self.cfg.nodes {
            let now = self.now(node);
            self.nodes[node as usize].tick(now);
            self.after(node)?;
        }
        while self.deliver_any()? {}
        for node in 0..self.cfg.nodes {
            for object in 0..self.cfg.objects {
                let op = self.next_op;
                self.next_op += 1;
                let init = Init {
                    type_name: TYPE_NAME.into(),
                    bytes: Bytes::copy_from_slice(&0i64.to_le_bytes()),
                };
                let now = self.now(node);
                self.nodes[node as usize].operate(now, |p| p.open(op, &Self::name(object), init));
                self.after(node)?;
            }
        }
        while self.deliver_any()? {}
        Ok(())
    }

    /// Lets simulated time pass: an episode that lasted long enough is detected, one that is
    /// over ends, due lease timers fire.
    fn pass_time(&mut self, time: Duration) -> Result<(), String> {
        self.elapsed += time;
        if self.episode.is_some() && self.detect_at <= self.elapsed {
            self.detect();
        }
        if self
            .episode
            .as_ref()
            .is_some_and(|e| e.until() <= self.elapsed)
        {
            self.trace_line(|| "the partition or stall ends".to_string());
            self.episode = None;
        }
        for node in self.active() {
            let now = self.now(node);
            if self.nodes[node as usize]
                .next_tick(now)
                .is_some_and(|at| at <= now)
            {
                self.nodes[node as usize].tick(now);
                self.after(node)?;
            }
        }
        Ok(())
    }

    fn random_step(&mut self) -> Result<(), String> {
        self.report.steps += 1;
        let time = self.rng.gen_range(Duration::ZERO..=MAX_STEP_TIME);
        self.pass_time(time)?;
        let roll = self.rng.gen_range(0..100);
        // Right after a write returned, a crash of its writer is likelier: its copies and
        // pushes may still be on the way.
        let just_wrote = std::mem::take(&mut self.just_wrote);
        if just_wrote && roll < 20 {
            self.crash()?;
        } else if roll < 60 {
            // Up to two deliveries: lease traffic grows with the square of the members.
            if !self.deliver_random()? {
                self.start_op()?;
            } else if self.rng.gen_bool(0.5) {
                self.deliver_random()?;
            }
        } else if roll < 78 {
            self.start_op()?;
        } else if roll < 85 {
            self.commit_one()?;
        } else if roll < 86 {
            self.crash()?;
        } else if roll < 88 {
            if self.rng.gen_bool(0.7) {
                self.cut()?;
            } else {
                self.stall()?;
            }
        } else if roll < 94 {
            self.report_random()?;
        } else if roll < 96 {
            self.tick_random()?;
        } else if roll < 98 {
            self.join()?;
        } else {
            self.leave()?;
        }
        self.check_invariants()
    }

    /// Whether `node` runs: not crashed, and not a joiner that no installed view took in yet.
    fn is_alive(&self, node: NodeId) -> bool {
        self.alive.get(node as usize).copied().unwrap_or(false)
    }

    fn live(&self) -> Vec<NodeId> {
        (0..self.nodes.len() as NodeId)
            .filter(|&n| self.alive[n as usize])
            .collect()
    }

    fn stalled(&self, node: NodeId) -> bool {
        matches!(&self.episode, Some(Episode::Stall { node: n, .. }) if *n == node)
    }

    /// Live nodes that are not stalled: they act.
    fn active(&self) -> Vec<NodeId> {
        self.live()
            .into_iter()
            .filter(|&n| !self.stalled(n))
            .collect()
    }

    /// Whether a partition keeps what `from` sends from reaching `to`.
    fn separated(&self, from: NodeId, to: NodeId) -> bool {
        matches!(&self.episode, Some(Episode::Cut { side, .. })
            if side.contains(&from) != side.contains(&to))
    }

    /// Active nodes that are members of their view (not joining, not removed).
    fn serving(&self) -> Vec<NodeId> {
        self.active()
            .into_iter()
            .filter(|&n| {
                let member = &self.nodes[n as usize];
                member.view().members.contains(&n) && !member.protocol().is_removed()
            })
            .collect()
    }

    /// Starts a read, write or swap at a random live node that has no operation running.
    fn start_op(&mut self) -> Result<(), String> {
        let idle: Vec<NodeId> = self
            .serving()
            .into_iter()
            .filter(|&n| !self.ops.values().any(|r| r.node == n && !r.finished))
            .collect();
        // During a partition or stall operations go on, up to twice the seed's count.
        if idle.is_empty() || self.started >= 2 * self.cfg.ops {
            return Ok(());
        }
        let node = idle[self.rng.gen_range(0..idle.len())];
        let object = self.rng.gen_range(0..self.cfg.objects);
        let kind = match self.rng.gen_range(0..3) {
            0 => Kind::Read,
            1 => Kind::Write(self.fresh_value()),
            _ => Kind::Swap(self.fresh_value()),
        };
        let op = self.next_op;
        self.next_op += 1;
        self.started += 1;
        self.trace_line(|| format!("node {node} starts {kind:?} on o{object} as op {op}"));
        self.ops.insert(
            op,
            OpRecord {
                node,
                object,
                kind,
                granted: None,
                committed: false,
                finished: false,
            },
        );
        let thread = op as u32;
        self.history[object].push(Entry::Invoke(
            thread,
            match kind {
                Kind::Read => Op::Read,
                Kind::Write(v) => Op::Write(v),
                Kind::Swap(v) => Op::Swap(v),
            },
        ));
        let name = Self::name(object);
        let now = self.now(node);
        self.nodes[node as usize].operate(now, |p| match kind {
            Kind::Read => p.read(op, &name),
            Kind::Write(v) => p.write(op, &name, bytes_of(v)),
            Kind::Swap(_) => p.lock(op, &name),
        });
        self.after(node)
    }

    fn fresh_value(&mut self) -> i64 {
        self.next_value += 1;
        self.next_value
    }

    /// A granted swap at a live node commits its value.
    fn commit_one(&mut self) -> Result<(), String> {
        let granted: Vec<OpId> = self
            .ops
            .iter()
            .filter(|(_, r)| r.awaits_commit() && self.alive[r.node as usize])
            .filter(|(_, r)| !self.stalled(r.node))
            .map(|(&op, _)| op)
            .collect();
        if granted.is_empty() {
            return Ok(());
        }
        let op = granted[self.rng.gen_range(0..granted.len())];
        let record = self.ops[&op].clone();
        let Kind::Swap(value) = record.kind else {
            return Err(self.fail("only swaps are granted"));
        };
        self.trace_line(|| format!("node {} commits op {op}", record.node));
        self.ops.get_mut(&op).expect("known").committed = true;
        // The swap completes with an event if it waits for copies or for the next view (see
        // `Protocol::completes_later`), else at once.
        let now = self.now(record.node);
        let (version, later) = self.nodes[record.node as usize].operate(now, |p| {
            let version = p.commit(op, Some(bytes_of(value)));
            (version, p.completes_later(op))
        });
        if let (false, Some(version), Some(old)) = (later, version, record.granted) {
            self.finish(op, Ret::Swapped(old), Some(version))?;
        }
        self.after(record.node)
    }

    /// Picks the node a fault hits: half the time the node that last returned a write, likely
    /// before its copies or pushes have all left (the case durability is for).
    fn victim(&mut self) -> NodeId {
        // Members only: a joiner lost before it is taken in would wait for good (it must ask
        // again as a new node).
        let live = self.serving();
        match self.last_writer.filter(|w| live.contains(w)) {
            Some(writer) if self.rng.gen_bool(0.5) => writer,
            _ => live[self.rng.gen_range(0..live.len())],
        }
    }

    /// Crashes a random live node, if the seed still allows a fault.
    fn crash(&mut self) -> Result<(), String> {
        if self.episode.is_some() || self.lost.len() >= self.cfg.crashes as usize {
            return Ok(());
        }
        let node = self.victim();
        if !self.survives_losing(&[node]) {
            return Ok(());
        }
        self.trace_line(|| format!("node {node} crashes"));
        self.alive[node as usize] = false;
        self.lost.insert(node);
        self.report.crashes += 1;
        // Every other node's transport reports it lost, each in its own time.
        for observer in self.live() {
            self.reports[observer as usize].push_back(Reported::Lost(node));
        }
        // Of what it sent, a random prefix of each queue is still delivered.
        let queues: Vec<(NodeId, NodeId)> = self
            .net
            .keys()
            .filter(|(from, _)| *from == node)
            .copied()
            .collect();
        for key in queues {
            let keep = {
                let len = self.net[&key].len();
                self.rng.gen_range(0..=len)
            };
            if let Some(queue) = self.net.get_mut(&key) {
                for lost in queue.drain(keep..) {
                    if matches!(lost.traffic, Traffic::Token(Message::Grant(_))) {
                        self.lossy.insert(lost.epoch);
                    }
                }
            }
        }
        Ok(())
    }

    /// The episode under way lasted its detection time: each side's transports report the other
    /// side lost and drop it (what was in flight between them is lost), and its nodes count
    /// as lost.
    fn detect(&mut self) {
        let Some(episode) = self.episode.clone() else {
            return;
        };
        self.detect_at = Duration::MAX;
        let side = episode.cut_off();
        self.trace_line(|| format!("nodes {side:?} are reported lost"));
        for a in self.live() {
            for b in self.live() {
                if side.contains(&a) && !side.contains(&b) {
                    self.reports[a as usize].push_back(Reported::Lost(b));
                    self.reports[b as usize].push_back(Reported::Lost(a));
                    self.severed.insert((a.min(b), a.max(b)));
                    for key in [(a, b), (b, a)] {
                        let dropped = self.net.remove(&key).unwrap_or_default();
                        self.lose(dropped);
                    }
                }
            }
        }
        self.lost.extend(side);
    }

    /// Messages lost in flight: their tokens are gone, so conservation only bounds the tokens
    /// of their epoch from above.
    fn lose(&mut self, lost: impl IntoIterator<Item = Envelope>) {
        for envelope in lost {
            if matches!(envelope.traffic, Traffic::Token(Message::Grant(_))) {
                self.lossy.insert(envelope.epoch);
            }
        }
    }

    fn is_severed(&self, a: NodeId, b: NodeId) -> bool {
        self.severed.contains(&(a.min(b), a.max(b)))
    }

    /// Cuts a random minority off, for up to [`MAX_EPISODE`], if the seed still allows losing
    /// it; after a detection time, each side's transports report the other side lost.
    fn cut(&mut self) -> Result<(), String> {
        let budget = (self.cfg.crashes as usize).saturating_sub(self.lost.len());
        if self.episode.is_some() || budget == 0 {
            return Ok(());
        }
        let first = self.victim();
        let mut side = vec![first];
        let size = self.rng.gen_range(1..=budget);
        let mut others: Vec<NodeId> = self.serving().into_iter().filter(|&n| n != first).collect();
        while side.len() < size && !others.is_empty() {
            side.push(others.swap_remove(self.rng.gen_range(0..others.len())));
        }
        if !self.survives_losing(&side) {
            return Ok(());
        }
        let side: BTreeSet<NodeId> = side.into_iter().collect();
        let until = self.elapsed + self.rng.gen_range(Duration::ZERO..=MAX_EPISODE);
        self.trace_line(|| format!("nodes {side:?} are cut off until {until:?}"));
        self.report.partitions += 1;
        self.detect_at = self.elapsed + self.rng.gen_range(DETECTION / 4..=DETECTION);
        self.episode = Some(Episode::Cut { side, until });
        Ok(())
    }

    /// Stalls a random node for up to [`MAX_EPISODE`]; one longer than its detection time is
    /// reported lost (only while the seed allows losing one more node).
    fn stall(&mut self) -> Result<(), String> {
        if self.episode.is_some() {
            return Ok(());
        }
        let node = self.victim();
        let may_lose = self.lost.len() < self.cfg.crashes as usize && self.survives_losing(&[node]);
        let longest = if may_lose { MAX_EPISODE } else { DETECTION / 8 };
        let until = self.elapsed + self.rng.gen_range(Duration::ZERO..=longest);
        self.trace_line(|| format!("node {node} stalls until {until:?}"));
        self.report.stalls += 1;
        self.detect_at = self.elapsed + self.rng.gen_range(DETECTION / 4..=DETECTION);
        self.episode = Some(Episode::Stall { node, until });
        Ok(())
    }

    /// Whether losing `nodes` (on top of what is down) leaves a reachable majority in every
    /// view some live member is still in or has moved to, and in each of those without its
    /// leaving members: otherwise nothing could be decided any more (a cluster shrunk to two
    /// members survives no loss, and members that missed the last decision still need a
    /// majority of their view).
    fn survives_losing(&self, nodes: &[NodeId]) -> bool {
        let oldest = self
            .serving()
            .into_iter()
            .map(|n| self.nodes[n as usize].view().epoch)
            .min()
            .unwrap_or(0);
        let up = |m: NodeId| self.is_alive(m) && !self.lost.contains(&m) && !nodes.contains(&m);
        let survives = |members: &mut dyn Iterator<Item = NodeId>, size: usize| {
            let up = members.filter(|&m| up(m)).count();
            up > size / 2
        };
        self.decided.range(oldest..).all(|(_, (view, _))| {
            let staying: Vec<NodeId> = view
                .members
                .iter()
                .copied()
                .filter(|&m| !self.nodes.get(m as usize).is_some_and(Member::is_leaving))
                .collect();
            survives(&mut view.members.iter().copied(), view.members.len())
                && survives(&mut staying.iter().copied(), staying.len())
        })
    }

    /// A random active node hears the oldest thing its transport has to report (a node lost
    /// or asking to join), and proposes what it wants then.
    fn report_random(&mut self) -> Result<(), String> {
        let ready: Vec<NodeId> = self
            .active()
            .into_iter()
            .filter(|&n| !self.reports[n as usize].is_empty())
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        let node = ready[self.rng.gen_range(0..ready.len())];
        self.hear_report(node)
    }

    fn hear_report(&mut self, node: NodeId) -> Result<(), String> {
        let Some(reported) = self.reports[node as usize].pop_front() else {
            return Ok(());
        };
        self.trace_line(|| format!("node {node} hears {reported:?}"));
        let now = self.now(node);
        match reported {
            Reported::Lost(lost) => self.nodes[node as usize].suspect(now, lost),
            Reported::Joining(contact) => {
                self.nodes[node as usize].admit(contact);
            }
        }
        self.after(node)?;
        self.propose_wanted(node)
    }

    /// A random active node's retry timer fires, or a joiner asks again.
    fn tick_random(&mut self) -> Result<(), String> {
        if !self.asking.is_empty() && self.rng.gen_bool(0.5) {
            return self.ask_again();
        }
        let active = self.active();
        let node = active[self.rng.gen_range(0..active.len())];
        self.propose_wanted(node)
    }

    /// The joiner that asked first and was not taken in asks a random serving member again,
    /// as a joiner's transport does on a timer: the member it asked may have handed the
    /// request to a coordinator that crashed, or been cut off.
    fn ask_again(&mut self) -> Result<(), String> {
        let serving = self.serving();
        let Some(contact) = self.asking.values().next().cloned() else {
            return Ok(());
        };
        if serving.is_empty() {
            return Ok(());
        }
        let member = serving[self.rng.gen_range(0..serving.len())];
        self.reports[member as usize].push_back(Reported::Joining(contact));
        Ok(())
    }

    fn propose_wanted(&mut self, node: NodeId) -> Result<(), String> {
        let wanted = self.nodes[node as usize].wanted();
        if let Some(members) = wanted {
            self.trace_line(|| format!("node {node} proposes {members:?}"));
            let now = self.now(node);
            self.nodes[node as usize].propose(now, members);
        }
        self.after(node)
    }

    /// A new node asks to join; every serving member's transport reports it in its time (a
    /// member that is not the coordinator hands it on).
    fn join(&mut self) -> Result<(), String> {
        if self.joins >= 2 {
            return Ok(());
        }
        self.joins += 1;
        let contact = Contact {
            incarnation: u64::from(self.joins),
            addr: format!("joiner {}", self.joins),
        };
        self.trace_line(|| format!("{contact:?} asks to join"));
        self.asking.insert(contact.incarnation, contact.clone());
        // Stalled members hear of it when they resume.
        let members = self.live().into_iter().filter(|&n| {
            let member = &self.nodes[n as usize];
            member.view().members.contains(&n) && !member.protocol().is_removed()
        });
        for observer in members.collect::<Vec<_>>() {
            self.reports[observer as usize].push_back(Reported::Joining(contact.clone()));
        }
        Ok(())
    }

    /// A decision names these members: a joiner it gives an id to starts as that node (ids
    /// are given in order, so each new one is the next index); a joiner taken in a second
    /// time under a new id is a ghost nobody answers for.
    fn connect(&mut self, contacts: BTreeMap<NodeId, Contact>) -> Result<(), String> {
        for (id, contact) in contacts {
            if (id as usize) < self.nodes.len() {
                continue;
            }
            if id as usize != self.nodes.len() {
                return Err(self.fail(format!(
                    "id {id} given while the next unused one is {}",
                    self.nodes.len()
                )));
            }
            let joiner = self.asking.remove(&contact.incarnation).is_some();
            self.trace_line(|| {
                let what = if joiner { "joins" } else { "is a ghost" };
                format!("node {id} ({contact:?}) {what}")
            });
            let protocol =
                Protocol::new(id, [], self.cfg.policy).with_durability(self.cfg.durability);
            self.nodes.push(Member::joining(protocol).with_lease(LEASE));
            self.alive.push(joiner);
            let rate = Self::rate(&mut self.rng);
            self.rates.push(rate);
            self.reports.push(VecDeque::new());
            if joiner {
                self.report.joined += 1;
            } else {
                // Nobody answers there: the members' transports report it lost.
                self.report.ghosts += 1;
                for observer in self.live() {
                    self.reports[observer as usize].push_back(Reported::Lost(id));
                }
            }
        }
        Ok(())
    }

    /// A random serving member leaves, if a live majority of its view stays.
    fn leave(&mut self) -> Result<(), String> {
        if self.leaves >= 1 {
            return Ok(());
        }
        let serving = self.serving();
        let node = serving[self.rng.gen_range(0..serving.len())];
        if !self.survives_losing(&[node]) || self.nodes[node as usize].is_leaving() {
            return Ok(());
        }
        self.leaves += 1;
        self.trace_line(|| format!("node {node} leaves"));
        self.nodes[node as usize].leave();
        self.propose_wanted(node)
    }

    /// Whether the head of the queue `from` to `to` may be delivered now.
    fn deliverable(&self, from: NodeId, to: NodeId, queue: &VecDeque<Envelope>) -> bool {
        !queue.is_empty()
            && self.is_alive(to)
            && !self.stalled(to)
            && !self.separated(from, to)
            && !self.is_severed(from, to)
    }

    fn deliver_random(&mut self) -> Result<bool, String> {
        let ready: Vec<(NodeId, NodeId)> = self
            .net
            .iter()
            .filter(|((from, to), q)| self.deliverable(*from, *to, q))
            .map(|(k, _)| *k)
            .collect();
        if ready.is_empty() {
            return Ok(false);
        }
        let (from, to) = ready[self.rng.gen_range(0..ready.len())];
        self.deliver(from, to)?;
        Ok(true)
    }

    fn deliver_any(&mut self) -> Result<bool, String> {
        let ready = self
            .net
            .iter()
            .find(|((from, to), q)| self.deliverable(*from, *to, q))
            .map(|(k, _)| *k);
        match ready {
            Some((from, to)) => {
                self.deliver(from, to)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    fn deliver(&mut self, from: NodeId, to: NodeId) -> Result<(), String> {
        let envelope = self
            .net
            .get_mut(&(from, to))
            .and_then(VecDeque::pop_front)
            .ok_or_else(|| self.fail("delivery from an empty queue"))?;
        self.trace_line(|| format!("{from} -> {to}: {envelope:?}"));
        let fenced = self.nodes[to as usize].fenced();
        let now = self.now(to);
        self.nodes[to as usize]
            .handle(now, from, envelope.clone())
            .map_err(|e| self.fail(format!("node {to} refused {envelope:?} from {from}: {e}")))?;
        self.report.fenced += self.nodes[to as usize].fenced() - fenced;
        self.after(to)
    }

    /// Acts on a node's outputs: messages go in flight, completions are recorded and checked.
    fn after(&mut self, node: NodeId) -> Result<(), String> {
        while let Some(output) = self.nodes[node as usize].poll_output() {
            match output {
                MemberOutput::Send { to, envelope } => {
                    if self.is_severed(node, to) {
                        self.lose([envelope]);
                    } else {
                        self.net.entry((node, to)).or_default().push_back(envelope);
                    }
                }
                MemberOutput::Event(Event::Completed { op, outcome }) => {
                    self.completed(node, op, outcome)?;
                }
                MemberOutput::Event(_) => {}
                MemberOutput::Connect(contacts) => self.connect(contacts)?,
                MemberOutput::Installed { view, plan } => {
                    self.report.installs += 1;
                    self.installed(node, view, plan)?;
                }
            }
        }
        Ok(())
    }

    fn completed(&mut self, node: NodeId, op: OpId, outcome: Outcome) -> Result<(), String> {
        let Some(record) = self.ops.get(&op).cloned() else {
            // The setup's opens.
            return match outcome {
                Outcome::Opened(_) => Ok(()),
                other => Err(self.fail(format!("setup op {op} at node {node} ended {other:?}"))),
            };
        };
        if record.finished {
            return Err(self.fail(format!("op {op} completed twice: {outcome:?}")));
        }
        match (record.kind, outcome) {
            (kind, ended @ (Outcome::Interrupted | Outcome::Removed)) => {
                // It did not take effect. An interrupted operation or a read leaves the
                // history (fewer operations that may or may not have happened keep the
                // checker's search small); a removed node's write stays unfinished, which
                // allows either.
                self.report.interrupted += 1;
                self.ops.get_mut(&op).expect("known").finished = true;
                if ended == Outcome::Interrupted || kind == Kind::Read {
                    self.forget(op, record.object);
                }
            }
            (Kind::Read | Kind::Swap(_), Outcome::NoMajority) if record.granted.is_none() => {
                // Refused: it read nothing, and a swap's lock was released unchanged.
                self.report.no_majority += 1;
                self.ops.get_mut(&op).expect("known").finished = true;
                self.forget(op, record.object);
            }
            (Kind::Read, Outcome::Read(value)) => {
                self.finish(op, Ret::Read(value_of(&value.bytes)), None)?;
            }
            (Kind::Write(_), Outcome::Written { version }) => {
                self.finish(op, Ret::Written, Some(version))?;
            }
            (Kind::Swap(_), Outcome::Granted(value)) if record.granted.is_none() => {
                self.ops.get_mut(&op).expect("known").granted = Some(value_of(&value.bytes));
            }
            (Kind::Swap(_), Outcome::Written { version }) => {
                let Some(old) = record.granted else {
                    return Err(self.fail(format!("swap {op} written before it was granted")));
                };
                self.finish(op, Ret::Swapped(old), Some(version))?;
            }
            (kind, outcome) => {
                return Err(self.fail(format!(
                    "op {op} ({kind:?}) at node {node} ended {outcome:?}"
                )))
            }
        }
        Ok(())
    }

    /// Takes `op`, which did not take effect, out of `object`'s history.
    fn forget(&mut self, op: OpId, object: usize) {
        let thread = op as u32;
        self.history[object].retain(|e| !matches!(e, Entry::Invoke(t, _) if *t == thread));
    }

    /// Records that `op` returned `ret`; a write also records its version.
    fn finish(&mut self, op: OpId, ret: Ret, version: Option<u64>) -> Result<(), String> {
        let record = self.ops.get_mut(&op).expect("known");
        record.finished = true;
        let record = record.clone();
        self.report.completed += 1;
        self.trace_line(|| format!("op {op} returns {ret:?}"));
        self.history[record.object].push(Entry::Return(op as u32, ret));
        if let (Some(version), Kind::Write(v) | Kind::Swap(v)) = (version, record.kind) {
            let epoch = self.nodes[record.node as usize].view().epoch;
            self.returned[record.object].push((epoch, version, v));
            self.last_writer = Some(record.node);
            self.just_wrote = true;
        }
        Ok(())
    }

    /// A node installed `view`: the same view and plan as every other node that installed
    /// this epoch, and no write that returned in an earlier epoch is missing from the plan.
    fn installed(&mut self, node: NodeId, view: View, plan: Plan) -> Result<(), String> {
        self.trace_line(|| format!("node {node} installs {view:?}"));
        if let Some((decided, decided_plan)) = self.decided.get(&view.epoch) {
            if *decided != view || *decided_plan != plan {
                return Err(self.fail(format!(
                    "node {node} installed {view:?} but epoch {} was decided as {decided:?}",
                    view.epoch
                )));
            }
            return Ok(());
        }
        for object in 0..self.cfg.objects {
            let planned = plan.values.get(Self::name(object).as_str());
            for &(epoch, version, value) in &self.returned[object] {
                if epoch >= view.epoch {
                    continue;
                }
                let kept = planned.is_some_and(|p| {
                    p.version > version || (p.version == version && value_of(&p.bytes) == value)
                });
                if !kept {
                    return Err(self.fail(format!(
                        "epoch {} lost the write of {value} (version {version}, returned in \
                         epoch {epoch}) to o{object}: the plan has {planned:?}",
                        view.epoch
                    )));
                }
            }
        }
        self.decided.insert(view.epoch, (view, plan));
        Ok(())
    }

    fn check_invariants(&self) -> Result<(), String> {
        for object in 0..self.cfg.objects {
            let name = Self::name(object);
            // One node that may write, across every epoch.
            let writers: Vec<NodeId> = self
                .live()
                .into_iter()
                .filter(|&n| {
                    let p = self.nodes[n as usize].protocol();
                    !p.is_frozen()
                        && !p.is_removed()
                        && self.nodes[n as usize].lease().holds_at(self.now(n))
                        && p.token_view(&name)
                            .is_some_and(|v| v.tokens > 0 && v.tokens == v.total)
                })
                .collect();
            if writers.len() > 1 {
                return Err(self.fail(format!("o{object} has writers {writers:?}")));
            }
            self.check_conservation(object)?;
        }
        Ok(())
    }

    /// Tokens of the newest decided epoch add up, once nobody in it is frozen.
    fn check_conservation(&self, object: usize) -> Result<(), String> {
        let name = Self::name(object);
        let (&epoch, (view, plan)) = self.decided.last_key_value().expect("epoch 0");
        let (mut tokens, mut owners, mut totals) = (0u32, 0u32, BTreeSet::new());
        for &m in &view.members {
            // A joiner exists once a member of the view that takes it in installed it.
            let installed = self
                .nodes
                .get(m as usize)
                .filter(|n| n.view().epoch == epoch);
            if let Some(member) = installed {
                if member.protocol().is_frozen() {
                    return Ok(());
                }
                if let Some(v) = member.protocol().token_view(&name).filter(|v| v.tokens > 0) {
                    tokens += v.tokens;
                    owners += u32::from(v.owner);
                    totals.insert(v.total);
                }
            } else if let Some(receivers) = plan.tokens.get(name.as_str()) {
                // What installing the plan will give it.
                if receivers.contains(&m) {
                    tokens += 1;
                    owners += u32::from(receivers.iter().next() == Some(&m));
                    totals.insert(receivers.len() as u32);
                }
            }
        }
        for queue in self.net.values() {
            for envelope in queue.iter().filter(|e| e.epoch == epoch) {
                if let Traffic::Token(Message::Grant(g)) = &envelope.traffic {
                    if *g.object == *name {
                        tokens += g.count;
                        owners += u32::from(g.owner);
                        totals.insert(g.total);
                    }
                }
            }
        }
        let agreed = if self.lossy.contains(&epoch) {
            totals.len() <= 1 && totals.first().is_none_or(|&t| t >= tokens) && owners <= 1
        } else {
            totals.len() <= 1
                && totals.first().is_none_or(|&t| t == tokens)
                && owners == u32::from(tokens > 0)
        };
        if !agreed {
            return Err(self.fail(format!(
                "o{object} in epoch {epoch}: {tokens} tokens, {owners} owner tokens, totals {totals:?}"
            )));
        }
        Ok(())
    }

    /// Ends the run: partitions heal and stalls end; no new operations; granted swaps commit;
    /// every message to a live node and every transport report is delivered; retry timers
    /// fire (time passing, so grants that hold a removal back expire) until no node wants a
    /// view.
    fn drain(&mut self) -> Result<(), String> {
        self.episode = None;
        for _ in 0..20_000 {
            self.report.steps += 1;
            let granted: Vec<OpId> = self
                .ops
                .iter()
                .filter(|(_, r)| r.awaits_commit() && self.alive[r.node as usize])
                .map(|(&op, _)| op)
                .collect();
            let reporting = self
                .live()
                .into_iter()
                .find(|&n| !self.reports[n as usize].is_empty());
            if !granted.is_empty() {
                self.commit_one()?;
            } else if self.deliver_any()? {
            } else if let Some(node) = reporting {
                self.hear_report(node)?;
            } else if let Some(node) = self
                .live()
                .into_iter()
                .find(|&n| self.nodes[n as usize].wanted().is_some())
            {
                self.pass_time(LEASE / 8)?;
                self.propose_wanted(node)?;
            } else if !self.asking.is_empty() {
                self.pass_time(LEASE / 8)?;
                self.ask_again()?;
            } else {
                return Ok(());
            }
            self.check_invariants()?;
        }
        Err(self.fail(format!("the cluster does not settle: {}", self.summary())))
    }

    /// Every node that was not lost (the lost ones were dropped by the others' transports and
    /// can only wait: they serve nothing once their lease expired) is in the same view of
    /// exactly those nodes, with nothing left waiting.
    fn final_checks(&mut self) -> Result<(), String> {
        if let Some(contact) = self.asking.values().next() {
            return Err(self.fail(format!("{contact:?} asked to join and was never taken in")));
        }
        let serving: BTreeSet<NodeId> = self
            .live()
            .into_iter()
            .filter(|&n| !self.nodes[n as usize].protocol().is_removed() && !self.lost.contains(&n))
            .collect();
        for &node in &serving {
            let member = &self.nodes[node as usize];
            if member.view().members != serving {
                return Err(self.fail(format!(
                    "node {node} ends in {:?}, the live members are {serving:?}",
                    member.view()
                )));
            }
            if member.protocol().is_busy() {
                return Err(self.fail(format!("node {node} still has operations waiting")));
            }
            if member.cut_off() {
                return Err(self.fail(format!("node {node} serves but counts itself cut off")));
            }
        }
        // A lost node that did not learn of its removal knows it can never be in a view again
        // (its node stops with `Error::CutOff`).
        for node in self.live() {
            let member = &self.nodes[node as usize];
            if self.lost.contains(&node) && !member.protocol().is_removed() && !member.cut_off() {
                return Err(self.fail(format!(
                    "lost node {node} neither removed nor cut off: {:?}",
                    member.view()
                )));
            }
        }
        if let Some((op, r)) = self
            .ops
            .iter()
            .find(|(_, r)| !r.finished && serving.contains(&r.node))
        {
            return Err(self.fail(format!(
                "op {op} at live node {} never ended: {r:?}",
                r.node
            )));
        }
        for object in 0..self.cfg.objects {
            match check(0, &self.history[object]) {
                Verdict::Linearizable => {}
                verdict => {
                    return Err(self.fail(format!(
                        "o{object}: {verdict:?}, history {:?}",
                        self.history[object]
                    )))
                }
            }
        }
        Ok(())
    }

    /// Each node's state in a few words, for failures.
    fn summary(&self) -> String {
        let nodes: Vec<String> = self
            .nodes
            .iter()
            .enumerate()
            .map(|(n, m)| {
                format!(
                    "node {n}: alive {}, lease {:?}, view {:?}, frozen {}, removed {}, leaving {}, wants {:?}, busy {}",
                    self.alive[n],
                    m.lease(),
                    m.view(),
                    m.protocol().is_frozen(),
                    m.protocol().is_removed(),
                    m.is_leaving(),
                    m.wanted(),
                    m.protocol().is_busy()
                )
            })
            .collect();
        nodes.join("; ")
    }

    fn trace_line(&self, line: impl FnOnce() -> String) {
        if self.trace {
            println!("[{}] {}", self.report.steps, line());
        }
    }
}

/// The value bytes of counter value `value` (the simulations' and models' objects are `i64`
/// counters, little-endian).
pub fn bytes_of(value: i64) -> Bytes {
    Bytes::copy_from_slice(&value.to_le_bytes())
}

/// The counter value whose bytes begin `bytes` (see [`bytes_of`]).
pub fn value_of(bytes: &[u8]) -> i64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    i64::from_le_bytes(raw)
}
