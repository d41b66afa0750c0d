//! Deterministic simulation of a cluster of [`Protocol`] nodes under a seeded scheduler.
//!
//! The network is one FIFO queue per ordered pair of nodes. Every step delivers the head of a
//! random non-empty queue or starts a random local operation, so messages are delayed and
//! reordered across pairs but stay in order within a pair, as the transport contract promises.
//! Membership changes travel in the same queues: `Joined(new)` precedes the new node's first
//! message to a member and `Left(x)` follows x's last message.
//!
//! After every step the simulation checks the invariants `docs/PROTOCOL.md` lists: token
//! conservation with one agreed total, exactly one owner token, the data rule (every readable
//! copy and every value in flight is the latest), versions without gaps, reads and opens that
//! return the latest value, writes only with every token, exactly one genesis node. At the end
//! it stops starting operations, lets every queue drain and checks that every operation was
//! served, every leave finished and no node remembers a request: starvation freedom under a
//! fair scheduler.
//!
//! [`run_seed`] runs one random schedule; [`Simulation`] can also be driven step by step for
//! scripted scenarios.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Display;
use std::panic::{self, AssertUnwindSafe};

use bytes::Bytes;
use coherence_core::protocol::{Event, OpId, Outcome, Output, Protocol, TokenView, WritePolicy};
use coherence_core::wire::{Init, Message, Value};
use coherence_core::NodeId;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The type name every simulated object is opened with.
const TYPE_NAME: &str = "u64";

/// Relative weights of the random actions; an action that is impossible in a state (nothing
/// to deliver, no lock to commit, no join left) is skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Weights {
    /// Deliver the head of a random non-empty queue.
    pub deliver: u32,
    /// A live node reads an object (opening it first if it has not yet).
    pub read: u32,
    /// A live node writes an object (opening it first if it has not yet).
    pub write: u32,
    /// A live node locks an object for update (opening it first if it has not yet).
    pub lock: u32,
    /// A granted lock commits (or aborts, see [`SimConfig::abort_percent`]).
    pub commit: u32,
    /// A waiting operation or a granted lock is cancelled, as on a timeout.
    pub cancel: u32,
    /// A live node leaves (never the last live node).
    pub leave: u32,
    /// A new node joins.
    pub join: u32,
}

impl Default for Weights {
    fn default() -> Self {
        Weights {
            deliver: 60,
            read: 10,
            write: 6,
            lock: 4,
            commit: 8,
            cancel: 1,
            leave: 1,
            join: 1,
        }
    }
}

/// What one simulation runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimConfig {
    /// Nodes at the start, with ids `0..nodes`; node 0 is the genesis node.
    pub nodes: u32,
    /// Objects, named `o0`, `o1`, ... (1 to 3 is plenty).
    pub objects: usize,
    /// Local operations started before the run settles (opens included).
    pub max_ops: u64,
    /// Write policy of every node.
    pub policy: WritePolicy,
    /// Most nodes that join during the run.
    pub joins: u32,
    /// Most nodes that leave during the run.
    pub leaves: u32,
    /// Relative weights of the random actions.
    pub weights: Weights,
    /// Percentage of commits that abort (commit without a value).
    pub abort_percent: u32,
    /// The run fails if it has not settled after this many steps (a livelock).
    pub max_steps: u64,
    /// Print every step, its events and its messages to stdout.
    pub trace: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            nodes: 3,
            objects: 2,
            max_ops: 100,
            policy: WritePolicy::Update,
            joins: 1,
            leaves: 1,
            weights: Weights::default(),
            abort_percent: 10,
            max_steps: 100_000,
            trace: false,
        }
    }
}

impl SimConfig {
    /// The configuration the seed sweep uses for `seed`: 2 to 5 nodes, 1 to 3 objects, either
    /// policy, 40 to 150 operations, up to 2 joins and 2 leaves.
    pub fn for_seed(seed: u64) -> SimConfig {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED_C0DE_CAFE_F00D);
        SimConfig {
            nodes: rng.gen_range(2..=5),
            objects: rng.gen_range(1..=3),
            max_ops: rng.gen_range(40..=150),
            policy: if rng.gen_bool(0.5) {
                WritePolicy::Update
            } else {
                WritePolicy::Invalidate
            },
            joins: rng.gen_range(0..=2),
            leaves: rng.gen_range(0..=2),
            ..SimConfig::default()
        }
    }
}

/// What a run covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// Inputs given to nodes (local operations, deliveries), plus joins.
    pub steps: u64,
    /// Protocol messages delivered.
    pub delivered: u64,
    /// Membership notifications (`Joined`, `Left`) delivered.
    pub notifications: u64,
    /// Messages dropped because their receiver had left (they carried no token).
    pub dropped: u64,
    /// Local operations started.
    pub ops_started: u64,
    /// Local operations that completed with a result (aborts not counted).
    pub ops_completed: u64,
    /// Operations cancelled.
    pub cancelled: u64,
    /// Operations aborted by their node's leave.
    pub aborted: u64,
    /// Writes applied (writes and committed updates).
    pub writes: u64,
    /// Nodes that joined.
    pub joins: u64,
    /// Nodes that finished leaving.
    pub leaves: u64,
}

impl SimReport {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &SimReport) {
        self.steps += other.steps;
        self.delivered += other.delivered;
        self.notifications += other.notifications;
        self.dropped += other.dropped;
        self.ops_started += other.ops_started;
        self.ops_completed += other.ops_completed;
        self.cancelled += other.cancelled;
        self.aborted += other.aborted;
        self.writes += other.writes;
        self.joins += other.joins;
        self.leaves += other.leaves;
    }
}

/// Runs the random schedule of `seed` under `cfg`, checking the invariants after every step
/// and starvation freedom at the end. A protocol panic (a failed debug assertion) is an error.
pub fn run_seed(seed: u64, cfg: &SimConfig) -> Result<SimReport, String> {
    let mut sim = Simulation::new(seed, cfg.clone());
    match panic::catch_unwind(AssertUnwindSafe(|| sim.run())) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".to_string());
            Err(sim.fail(format!("panic: {message}")))
        }
    }
}

/// One item in a network queue.
#[derive(Debug, Clone)]
enum Item {
    Message(Message),
    Joined(NodeId),
    Left(NodeId),
}

/// Whether a node opened an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpenState {
    Closed,
    Opening,
    Open,
}

/// One simulated node.
#[derive(Debug)]
struct SimNode {
    proto: Protocol,
    open: Vec<OpenState>,
    /// Versions the node announced readable through events, per object.
    published: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OpKind {
    Open(Bytes),
    Read,
    Write(Bytes),
    Lock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OpStatus {
    /// Waiting for its completion.
    Pending,
    /// A lock that was granted and awaits its commit.
    Granted,
    /// Finished with this outcome (a committed lock keeps its `Granted` outcome).
    Done(Outcome),
    Cancelled,
}

#[derive(Debug, Clone)]
struct OpRecord {
    node: NodeId,
    object: usize,
    kind: OpKind,
    status: OpStatus,
}

impl OpRecord {
    fn active(&self) -> bool {
        matches!(self.status, OpStatus::Pending | OpStatus::Granted)
    }
}

/// A cluster of protocol nodes, its network and the checker's view of every object.
#[derive(Debug)]
pub struct Simulation {
    cfg: SimConfig,
    rng: StdRng,
    nodes: BTreeMap<NodeId, SimNode>,
    next_node: NodeId,
    /// Non-empty queues only.
    queues: BTreeMap<(NodeId, NodeId), VecDeque<Item>>,
    ops: BTreeMap<OpId, OpRecord>,
    next_op: OpId,
    next_payload: u64,
    names: Vec<String>,
    /// The latest value of each object, once it was created.
    latest: Vec<Option<Value>>,
    joins_started: u32,
    leaves_started: u32,
    step: u64,
    report: SimReport,
}

impl Simulation {
    /// A cluster of `cfg.nodes` nodes that all know each other, with a scheduler seeded by
    /// `seed`.
    pub fn new(seed: u64, cfg: SimConfig) -> Simulation {
        let names: Vec<String> = (0..cfg.objects).map(|i| format!("o{i}")).collect();
        let nodes = (0..cfg.nodes)
            .map(|id| {
                let proto = Protocol::new(id, 0..cfg.nodes, cfg.policy);
                (id, SimNode::new(proto, names.len()))
            })
            .collect();
        Simulation {
            rng: StdRng::seed_from_u64(seed),
            nodes,
            next_node: cfg.nodes,
            queues: BTreeMap::new(),
            ops: BTreeMap::new(),
            next_op: 0,
            next_payload: 0,
            latest: vec![None; names.len()],
            names,
            joins_started: 0,
            leaves_started: 0,
            step: 0,
            report: SimReport::default(),
            cfg,
        }
    }

    /// Runs random steps until `cfg.max_ops` operations were started, then settles.
    pub fn run(&mut self) -> Result<SimReport, String> {
        while self.report.ops_started < self.cfg.max_ops {
            self.check_step_budget()?;
            self.random_step()?;
        }
        self.settle()?;
        Ok(self.report.clone())
    }

    /// The name of object `object`.
    pub fn object_name(&self, object: usize) -> &str {
        &self.names[object]
    }

    /// The protocol state of node `id`, unless it left (or never existed).
    pub fn node(&self, id: NodeId) -> Option<&Protocol> {
        self.nodes.get(&id).map(|n| &n.proto)
    }

    /// Ids of the nodes still in the cluster (leaving ones included).
    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// The latest value of `object`, once it was created.
    pub fn latest(&self, object: usize) -> Option<&Value> {
        self.latest[object].as_ref()
    }

    /// How `op` ended, if it did (a committed lock reports its `Granted` value).
    pub fn outcome(&self, op: OpId) -> Option<&Outcome> {
        match &self.ops.get(&op)?.status {
            OpStatus::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    // ----- scripted inputs -----

    /// Node `node` opens `object` with init bytes `init<op>`, so each open's init is unique.
    pub fn open(&mut self, node: NodeId, object: usize) -> Result<OpId, String> {
        let init = Bytes::from(format!("init{}", self.next_op));
        self.start_op(node, object, OpKind::Open(init))
    }

    /// Node `node` reads `object`, which it opened.
    pub fn read(&mut self, node: NodeId, object: usize) -> Result<OpId, String> {
        self.start_op(node, object, OpKind::Read)
    }

    /// Node `node` writes a fresh unique value to `object`, which it opened.
    pub fn write(&mut self, node: NodeId, object: usize) -> Result<OpId, String> {
        let bytes = self.payload();
        self.start_op(node, object, OpKind::Write(bytes))
    }

    /// Node `node` locks `object` for update; commit it with [`Simulation::commit`] once
    /// granted.
    pub fn lock(&mut self, node: NodeId, object: usize) -> Result<OpId, String> {
        self.start_op(node, object, OpKind::Lock)
    }

    /// Ends the granted lock `op`, writing a fresh unique value if `write`.
    pub fn commit(&mut self, op: OpId, write: bool) -> Result<(), String> {
        let rec = self.ops.get(&op).cloned();
        let Some(rec) = rec.filter(|r| r.status == OpStatus::Granted) else {
            return Err(self.fail(format!("op {op} holds no granted lock")));
        };
        let (node, object) = (rec.node, rec.object);
        let bytes = write.then(|| self.payload());
        self.begin_step(|| format!("node {node} commits op {op} with {bytes:?}"));
        let name = self.names[object].clone();
        let view = self.nodes[&node].proto.token_view(&name);
        if !holds_all(view, 0) {
            return Err(self.fail(format!(
                "write rule: node {node} commits op {op} on {name} holding {view:?}"
            )));
        }
        let Some(version) = self.node_mut(node).proto.commit(op, bytes.clone()) else {
            return Err(self.fail(format!("node {node} lost the granted lock op {op}")));
        };
        let latest = self.latest[object]
            .clone()
            .expect("a granted object exists");
        match bytes {
            Some(bytes) => {
                self.record_write(object, version, bytes, node)?;
            }
            None if version != latest.version => {
                return Err(self.fail(format!(
                    "aborted commit of op {op} at node {node} reports version {version}, latest \
                     is {}",
                    latest.version
                )));
            }
            None => {}
        }
        self.ops.get_mut(&op).expect("checked").status = OpStatus::Done(Outcome::Granted(latest));
        self.after_input(node)
    }

    /// Cancels the active operation `op` (a timeout); a granted lock is released unwritten.
    pub fn cancel(&mut self, op: OpId) -> Result<(), String> {
        let rec = self.ops.get(&op).cloned();
        let Some(rec) = rec.filter(OpRecord::active) else {
            return Err(self.fail(format!("op {op} is not active")));
        };
        let node = rec.node;
        self.begin_step(|| format!("node {node} cancels op {op}"));
        if !self.node_mut(node).proto.cancel(op) {
            return Err(self.fail(format!(
                "node {node} refused to cancel its active op {op} ({rec:?})"
            )));
        }
        if matches!(rec.kind, OpKind::Open(_)) {
            self.node_mut(node).open[rec.object] = OpenState::Closed;
        }
        self.ops.get_mut(&op).expect("checked").status = OpStatus::Cancelled;
        self.report.cancelled += 1;
        self.after_input(node)
    }

    /// Node `node` starts leaving; some other node must stay live.
    pub fn leave(&mut self, node: NodeId) -> Result<(), String> {
        self.live_node(node)?;
        if self.live_nodes().len() < 2 {
            return Err(self.fail(format!("node {node} is the last live node")));
        }
        self.leaves_started += 1;
        // The transport queues `Joined(j)` in every member's inbox before it hands `j` its
        // transport, and the driver handles what its inbox holds before it leaves: so a
        // pending `Joined` reaches the leaver first.
        let pending_joins: Vec<NodeId> = self
            .queues
            .iter()
            .filter(|(&(_, to), queue)| {
                to == node && matches!(queue.front(), Some(Item::Joined(_)))
            })
            .map(|(&(from, _), _)| from)
            .collect();
        for from in pending_joins {
            self.deliver(from, node)?;
        }
        self.begin_step(|| format!("node {node} leaves"));
        self.node_mut(node).proto.leave();
        self.after_input(node)?;
        let active: Vec<OpId> = self
            .active_ops()
            .filter(|(_, r)| r.node == node)
            .map(|(&op, _)| op)
            .collect();
        if !active.is_empty() {
            return Err(self.fail(format!(
                "node {node} is leaving but its ops {active:?} were not aborted"
            )));
        }
        Ok(())
    }

    /// A new node joins, knowing every current member (leaving ones included); every member
    /// gets `Joined` before the new node's first message.
    pub fn join(&mut self) -> Result<NodeId, String> {
        let id = self.next_node;
        self.next_node += 1;
        self.joins_started += 1;
        self.begin_step(|| format!("node {id} joins"));
        let members = self.node_ids();
        for &m in &members {
            self.queues
                .entry((id, m))
                .or_default()
                .push_front(Item::Joined(id));
        }
        let proto = Protocol::new(id, members, self.cfg.policy);
        self.nodes.insert(id, SimNode::new(proto, self.names.len()));
        self.report.joins += 1;
        self.check_invariants()?;
        Ok(id)
    }

    /// Delivers the head of a random non-empty queue. Returns false if every queue is empty.
    pub fn deliver_random(&mut self) -> Result<bool, String> {
        if self.queues.is_empty() {
            return Ok(false);
        }
        let index = self.rng.gen_range(0..self.queues.len());
        let (&(from, to), _) = self.queues.iter().nth(index).expect("in range");
        self.deliver(from, to)?;
        Ok(true)
    }

    /// Delivers the head of the queue from `from` to `to`, which must not be empty.
    pub fn deliver(&mut self, from: NodeId, to: NodeId) -> Result<(), String> {
        let Some(queue) = self.queues.get_mut(&(from, to)) else {
            return Err(self.fail(format!("nothing to deliver from {from} to {to}")));
        };
        let item = queue.pop_front().expect("queues are non-empty");
        if queue.is_empty() {
            self.queues.remove(&(from, to));
        }
        self.begin_step(|| format!("deliver {from} -> {to}: {item:?}"));
        let proto = &mut self
            .nodes
            .get_mut(&to)
            .expect("queues to departed nodes are removed")
            .proto;
        match item {
            Item::Message(message) => {
                if let Err(e) = proto.handle(from, message) {
                    return Err(self.fail(format!("node {to} rejected a message from {from}: {e}")));
                }
                self.report.delivered += 1;
            }
            Item::Joined(id) => {
                proto.peer_joined(id);
                self.report.notifications += 1;
            }
            Item::Left(id) => {
                proto.peer_left(id);
                self.report.notifications += 1;
            }
        }
        self.after_input(to)
    }

    /// Stops starting operations: commits every granted lock and delivers until every queue is
    /// empty, then checks that every operation was served, every leave finished and no request
    /// is left anywhere.
    pub fn settle(&mut self) -> Result<(), String> {
        loop {
            self.check_step_budget()?;
            let granted = self
                .ops
                .iter()
                .find(|(_, r)| r.status == OpStatus::Granted)
                .map(|(&op, _)| op);
            if let Some(op) = granted {
                let write = self.rng.gen_range(0..100) >= self.cfg.abort_percent;
                self.commit(op, write)?;
            } else if !self.deliver_random()? {
                break;
            }
        }
        let leaving: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.proto.is_leaving())
            .map(|(&id, _)| id)
            .collect();
        if !leaving.is_empty() {
            return Err(self.fail(format!(
                "quiescent, but nodes {leaving:?} never finished leaving"
            )));
        }
        let starved: Vec<String> = self
            .active_ops()
            .map(|(op, r)| format!("op {op} {r:?}"))
            .collect();
        if !starved.is_empty() {
            return Err(self.fail(format!(
                "quiescent, but operations were never served: {}",
                starved.join(", ")
            )));
        }
        let ids = self.node_ids();
        for (&id, node) in &self.nodes {
            let p = &node.proto;
            if p.is_busy() || p.known_requests() != 0 {
                return Err(self.fail(format!(
                    "quiescent, but node {id} is busy={} with {} known requests: {p:?}",
                    p.is_busy(),
                    p.known_requests()
                )));
            }
            let others: BTreeSet<NodeId> = ids.iter().copied().filter(|&m| m != id).collect();
            if *p.members() != others {
                return Err(self.fail(format!(
                    "quiescent, but node {id} has members {:?}, the cluster is {ids:?}",
                    p.members()
                )));
            }
        }
        self.check_invariants()
    }

    // ----- the random driver -----

    fn random_step(&mut self) -> Result<(), String> {
        #[derive(Clone, Copy, PartialEq, Eq)]
        enum Action {
            Deliver,
            Read,
            Write,
            Lock,
            Commit,
            Cancel,
            Leave,
            Join,
        }
        let w = &self.cfg.weights;
        let can_op = !self.op_candidates().is_empty();
        let any_granted = self.ops.values().any(|r| r.status == OpStatus::Granted);
        let any_active = self.active_ops().next().is_some();
        let can_leave = self.leaves_started < self.cfg.leaves && self.live_nodes().len() >= 2;
        let options = [
            (Action::Deliver, w.deliver, !self.queues.is_empty()),
            (Action::Read, w.read, can_op),
            (Action::Write, w.write, can_op),
            (Action::Lock, w.lock, can_op),
            (Action::Commit, w.commit, any_granted),
            (Action::Cancel, w.cancel, any_active),
            (Action::Leave, w.leave, can_leave),
            (Action::Join, w.join, self.joins_started < self.cfg.joins),
        ];
        let possible: Vec<(Action, u32)> = options
            .iter()
            .filter(|&&(_, weight, possible)| possible && weight > 0)
            .map(|&(action, weight, _)| (action, weight))
            .collect();
        let total: u32 = possible.iter().map(|&(_, weight)| weight).sum();
        if total == 0 {
            return Err(self.fail("no action is possible"));
        }
        let mut pick = self.rng.gen_range(0..total);
        let mut action = possible[0].0;
        for (candidate, weight) in possible {
            if pick < weight {
                action = candidate;
                break;
            }
            pick -= weight;
        }
        match action {
            Action::Deliver => self.deliver_random().map(drop),
            Action::Read | Action::Write | Action::Lock => {
                let candidates = self.op_candidates();
                let (node, object) = candidates[self.rng.gen_range(0..candidates.len())];
                let started = if self.nodes[&node].open[object] == OpenState::Closed {
                    self.open(node, object)
                } else if action == Action::Read {
                    self.read(node, object)
                } else if action == Action::Write {
                    self.write(node, object)
                } else {
                    self.lock(node, object)
                };
                started.map(drop)
            }
            Action::Commit => {
                let granted: Vec<OpId> = self
                    .ops
                    .iter()
                    .filter(|(_, r)| r.status == OpStatus::Granted)
                    .map(|(&op, _)| op)
                    .collect();
                let op = granted[self.rng.gen_range(0..granted.len())];
                let write = self.rng.gen_range(0..100) >= self.cfg.abort_percent;
                self.commit(op, write)
            }
            Action::Cancel => {
                let active: Vec<OpId> = self.active_ops().map(|(&op, _)| op).collect();
                let op = active[self.rng.gen_range(0..active.len())];
                self.cancel(op)
            }
            Action::Leave => {
                let live = self.live_nodes();
                let node = live[self.rng.gen_range(0..live.len())];
                self.leave(node)
            }
            Action::Join => self.join().map(drop),
        }
    }

    /// `(node, object)` pairs where a live node may start an operation (not while it opens).
    fn op_candidates(&self) -> Vec<(NodeId, usize)> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.proto.is_leaving())
            .flat_map(|(&id, n)| {
                n.open
                    .iter()
                    .enumerate()
                    .filter(|(_, &s)| s != OpenState::Opening)
                    .map(move |(object, _)| (id, object))
            })
            .collect()
    }

    // ----- plumbing -----

    fn live_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.proto.is_leaving())
            .map(|(&id, _)| id)
            .collect()
    }

    fn live_node(&self, node: NodeId) -> Result<&SimNode, String> {
        match self.nodes.get(&node) {
            Some(n) if !n.proto.is_leaving() => Ok(n),
            _ => Err(self.fail(format!("node {node} is not a live member"))),
        }
    }

    fn node_mut(&mut self, node: NodeId) -> &mut SimNode {
        self.nodes.get_mut(&node).expect("callers check membership")
    }

    fn active_ops(&self) -> impl Iterator<Item = (&OpId, &OpRecord)> {
        self.ops.iter().filter(|(_, r)| r.active())
    }

    fn payload(&mut self) -> Bytes {
        self.next_payload += 1;
        Bytes::from(format!("w{}", self.next_payload))
    }

    /// Formats a failure with the current step.
    fn fail(&self, what: impl Display) -> String {
        format!("step {}: {what}", self.step)
    }

    fn check_step_budget(&self) -> Result<(), String> {
        if self.step >= self.cfg.max_steps {
            return Err(self.fail(format!(
                "not settled after {} steps (livelock?)",
                self.cfg.max_steps
            )));
        }
        Ok(())
    }

    fn begin_step(&mut self, what: impl FnOnce() -> String) {
        self.step += 1;
        self.report.steps += 1;
        if self.cfg.trace {
            println!("[{}] {}", self.step, what());
        }
    }

    fn start_op(&mut self, node: NodeId, object: usize, kind: OpKind) -> Result<OpId, String> {
        let state = self.live_node(node)?.open[object];
        let opening = matches!(kind, OpKind::Open(_));
        if opening != (state == OpenState::Closed) || state == OpenState::Opening {
            return Err(self.fail(format!(
                "node {node} cannot start {kind:?} on o{object} while {state:?}"
            )));
        }
        let op = self.next_op;
        self.next_op += 1;
        self.report.ops_started += 1;
        self.begin_step(|| format!("node {node} starts op {op}: {kind:?} o{object}"));
        self.ops.insert(
            op,
            OpRecord {
                node,
                object,
                kind: kind.clone(),
                status: OpStatus::Pending,
            },
        );
        let name = self.names[object].clone();
        let sim_node = self.node_mut(node);
        match kind {
            OpKind::Open(bytes) => {
                sim_node.open[object] = OpenState::Opening;
                let init = Init {
                    type_name: TYPE_NAME.into(),
                    bytes,
                };
                sim_node.proto.open(op, &name, init);
            }
            OpKind::Read => sim_node.proto.read(op, &name),
            OpKind::Write(bytes) => sim_node.proto.write(op, &name, bytes),
            OpKind::Lock => sim_node.proto.lock(op, &name),
        }
        self.after_input(node)?;
        Ok(op)
    }

    /// Applies what `node` produced in this step: queues its messages, checks and records its
    /// events, removes it if it finished leaving, then checks every invariant.
    fn after_input(&mut self, node: NodeId) -> Result<(), String> {
        let proto = &mut self.node_mut(node).proto;
        // `poll_output` hands out every event before the first message.
        let (mut events, mut sends) = (Vec::new(), Vec::new());
        while let Some(output) = proto.poll_output() {
            match output {
                Output::Event(event) => events.push(event),
                Output::Send { to, message } => sends.push((to, message)),
            }
        }
        if self.cfg.trace {
            for event in &events {
                println!("    event {event:?}");
            }
            for (to, message) in &sends {
                println!("    send {node} -> {to}: {message:?}");
            }
        }
        // Tokens this step handed on, per object: the write rule check needs them.
        let mut handed_on: BTreeMap<String, u32> = BTreeMap::new();
        for (to, message) in sends {
            if let Message::Grant(grant) = &message {
                *handed_on.entry(grant.object.to_string()).or_default() += grant.count;
            }
            self.enqueue(node, to, message)?;
        }
        self.detect_creation()?;
        // Completions in their order first (reads before the writes of the same step), then
        // readability, which shows the state at the end of the step whatever the event order.
        let mut left = false;
        let mut readability = Vec::new();
        for event in events {
            match event {
                Event::Completed { op, outcome } => self.complete(node, op, outcome, &handed_on)?,
                Event::Left => left = true,
                event => readability.push(event),
            }
        }
        for event in readability {
            match event {
                Event::Readable { object, value } => {
                    let index = self.index_of(&object)?;
                    self.check_latest(index, &value, || format!("Readable event at node {node}"))?;
                    self.node_mut(node)
                        .published
                        .insert(object.to_string(), value.version);
                }
                Event::Unreadable { object } => {
                    if self.node_mut(node).published.remove(&*object).is_none() {
                        return Err(self.fail(format!(
                            "node {node}: Unreadable {object} that was not readable"
                        )));
                    }
                }
                _ => unreachable!("only readability events are collected"),
            }
        }
        if left {
            self.depart(node)?;
        }
        self.check_invariants()
    }

    fn enqueue(&mut self, from: NodeId, to: NodeId, message: Message) -> Result<(), String> {
        if from == to {
            return Err(self.fail(format!("node {from} sent {message:?} to itself")));
        }
        if self.nodes.contains_key(&to) {
            self.queues
                .entry((from, to))
                .or_default()
                .push_back(Item::Message(message));
            return Ok(());
        }
        self.drop_message(from, to, &message)
    }

    /// A message to a node that is gone is lost; that is only harmless if it carries neither
    /// tokens nor the genesis role.
    fn drop_message(&mut self, from: NodeId, to: NodeId, message: &Message) -> Result<(), String> {
        if matches!(message, Message::Grant(_) | Message::Genesis { .. }) {
            return Err(self.fail(format!(
                "node {from} -> departed node {to}: {message:?} is lost"
            )));
        }
        self.report.dropped += 1;
        Ok(())
    }

    fn index_of(&self, object: &str) -> Result<usize, String> {
        self.names
            .iter()
            .position(|n| n == object)
            .ok_or_else(|| self.fail(format!("unknown object {object}")))
    }

    /// Checks that `value` is the latest value of `object`.
    fn check_latest(
        &self,
        object: usize,
        value: &Value,
        what: impl FnOnce() -> String,
    ) -> Result<(), String> {
        match &self.latest[object] {
            Some(latest) if latest == value => Ok(()),
            latest => Err(self.fail(format!(
                "data rule: {} carries {value:?} but the latest value of o{object} is {latest:?}",
                what()
            ))),
        }
    }

    /// Records the write of `version` with `bytes` at `node`: versions go up by one.
    fn record_write(
        &mut self,
        object: usize,
        version: u64,
        bytes: Bytes,
        node: NodeId,
    ) -> Result<(), String> {
        let latest = self.latest[object].as_mut().expect("written objects exist");
        if version != latest.version + 1 {
            let expected = latest.version + 1;
            return Err(self.fail(format!(
                "node {node} wrote version {version} of o{object}, expected {expected}"
            )));
        }
        latest.version = version;
        latest.bytes = bytes;
        self.report.writes += 1;
        Ok(())
    }

    fn complete(
        &mut self,
        node: NodeId,
        op: OpId,
        outcome: Outcome,
        handed_on: &BTreeMap<String, u32>,
    ) -> Result<(), String> {
        let Some(rec) = self.ops.get(&op).cloned() else {
            return Err(self.fail(format!("node {node} completed unknown op {op}")));
        };
        let aborted = outcome == Outcome::Aborted;
        let may_complete =
            rec.status == OpStatus::Pending || (aborted && rec.status == OpStatus::Granted);
        if rec.node != node || !may_complete {
            return Err(self.fail(format!(
                "node {node} completed op {op} with {outcome:?}, but it is {rec:?}"
            )));
        }
        let object = rec.object;
        let name = self.names[object].clone();
        let what = || format!("{outcome:?} of op {op} at node {node}");
        let view = self.nodes[&node].proto.token_view(&name);
        let mut status = OpStatus::Done(outcome.clone());
        match (&rec.kind, &outcome) {
            (OpKind::Open(_), Outcome::Opened(value)) => {
                self.check_latest(object, value, what)?;
                self.node_mut(node).open[object] = OpenState::Open;
            }
            (OpKind::Read, Outcome::Read(value)) => self.check_latest(object, value, what)?,
            (OpKind::Write(bytes), Outcome::Written { version }) => {
                // Tokens held now plus those handed on in this step were all here at the write.
                let handed = handed_on.get(&name).copied().unwrap_or(0);
                if !holds_all(view, handed) {
                    return Err(self.fail(format!(
                        "write rule: {} holding {view:?} after handing on {handed} tokens",
                        what()
                    )));
                }
                self.record_write(object, *version, bytes.clone(), node)?;
            }
            (OpKind::Lock, Outcome::Granted(value)) => {
                self.check_latest(object, value, what)?;
                if !holds_all(view, 0) {
                    return Err(self.fail(format!("write rule: {} but view {view:?}", what())));
                }
                status = OpStatus::Granted;
            }
            (_, Outcome::Aborted) => {
                if !self.nodes[&node].proto.is_leaving() {
                    return Err(self.fail(format!("{} but the node is not leaving", what())));
                }
                self.report.aborted += 1;
            }
            _ => return Err(self.fail(format!("{} does not fit {:?}", what(), rec.kind))),
        }
        if !aborted {
            self.report.ops_completed += 1;
        }
        self.ops.get_mut(&op).expect("checked").status = status;
        Ok(())
    }

    /// Removes `node`, which finished leaving: it holds no token, no token or genesis role is
    /// in flight to it, and every member hears `Left` after its last message.
    fn depart(&mut self, node: NodeId) -> Result<(), String> {
        let sim_node = self.nodes.remove(&node).expect("departing node exists");
        let proto = &sim_node.proto;
        if !self.nodes.is_empty() {
            for name in &self.names {
                if let Some(view) = proto.token_view(name).filter(|v| v.tokens > 0) {
                    return Err(self.fail(format!(
                        "node {node} left holding tokens of {name}: {view:?}"
                    )));
                }
            }
        }
        if proto.is_busy() {
            return Err(self.fail(format!("node {node} left while busy: {proto:?}")));
        }
        let inbound: Vec<(NodeId, NodeId)> = self
            .queues
            .keys()
            .filter(|&&(_, to)| to == node)
            .copied()
            .collect();
        for key in inbound {
            let queue = self.queues.remove(&key).expect("listed");
            let from = key.0;
            for item in queue {
                if let Item::Message(message) = item {
                    self.drop_message(from, node, &message)?;
                }
            }
        }
        for &m in self.nodes.keys() {
            self.queues
                .entry((node, m))
                .or_default()
                .push_back(Item::Left(node));
        }
        self.report.leaves += 1;
        Ok(())
    }

    /// Notices objects a genesis node created in this step and records their version 0, which
    /// must be the init of exactly one open of that object.
    fn detect_creation(&mut self) -> Result<(), String> {
        for object in 0..self.names.len() {
            if self.latest[object].is_some() {
                continue;
            }
            let name = &self.names[object];
            let mut values: Vec<Value> = Vec::new();
            let mut tokens = false;
            for n in self.nodes.values() {
                tokens |= n.proto.token_view(name).is_some_and(|v| v.tokens > 0);
                values.extend(n.proto.readable_value(name).cloned());
            }
            for grant in self.grants_in_flight(name) {
                tokens = true;
                values.extend(grant.value.clone());
            }
            if !tokens {
                continue;
            }
            let Some(v0) = values.first().cloned() else {
                return Err(self.fail(format!("{name} was created but no value exists")));
            };
            let openers: Vec<OpId> = self
                .ops
                .iter()
                .filter(|(_, r)| r.object == object && r.kind == OpKind::Open(v0.bytes.clone()))
                .map(|(&op, _)| op)
                .collect();
            if values.iter().any(|v| *v != v0)
                || v0.version != 0
                || &*v0.type_name != TYPE_NAME
                || openers.len() != 1
            {
                return Err(self.fail(format!(
                    "creation of {name}: values {values:?} match the inits of ops {openers:?}"
                )));
            }
            self.latest[object] = Some(v0);
        }
        Ok(())
    }

    fn grants_in_flight<'a>(
        &'a self,
        name: &'a str,
    ) -> impl Iterator<Item = &'a coherence_core::wire::Grant> + 'a {
        self.queues
            .values()
            .flatten()
            .filter_map(move |item| match item {
                Item::Message(Message::Grant(g)) if &*g.object == name => Some(g),
                _ => None,
            })
    }

    /// Checks the safety invariants over all nodes and all messages in flight.
    fn check_invariants(&self) -> Result<(), String> {
        for (object, name) in self.names.iter().enumerate() {
            self.check_object(object, name)?;
        }
        let genesis_nodes: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.proto.is_genesis())
            .map(|(&id, _)| id)
            .collect();
        let genesis_messages = self
            .queues
            .values()
            .flatten()
            .filter(|i| matches!(i, Item::Message(Message::Genesis { .. })))
            .count();
        if genesis_nodes.len() + genesis_messages != 1 {
            return Err(self.fail(format!(
                "genesis role: nodes {genesis_nodes:?} and {genesis_messages} messages in flight"
            )));
        }
        Ok(())
    }

    fn check_object(&self, object: usize, name: &str) -> Result<(), String> {
        let latest = &self.latest[object];
        let mut sum = 0u32;
        let mut owners = 0;
        let mut totals = BTreeSet::new();
        for (&id, n) in &self.nodes {
            let readable = n.proto.readable_value(name);
            if n.published.get(name) != readable.map(|v| &v.version) {
                return Err(self.fail(format!(
                    "node {id}: events announced {name} readable at {:?}, its state says {:?}",
                    n.published.get(name),
                    readable.map(|v| v.version)
                )));
            }
            let Some(view) = n.proto.token_view(name) else {
                continue;
            };
            if view.tokens > 0 {
                sum += view.tokens;
                totals.insert(view.total);
            }
            if view.owner {
                owners += 1;
                if !view.readable {
                    return Err(self.fail(format!(
                        "data rule: node {id} owns {name} but is not readable: {view:?}"
                    )));
                }
            }
            if let Some(value) = readable {
                self.check_latest(object, value, || format!("readable copy at node {id}"))?;
            }
        }
        for grant in self.grants_in_flight(name) {
            sum += grant.count;
            owners += u32::from(grant.owner);
            totals.insert(grant.total);
            if grant.count == 0 {
                return Err(self.fail(format!("grant without tokens: {grant:?}")));
            }
            if let Some(value) = &grant.value {
                self.check_latest(object, value, || format!("grant in flight {grant:?}"))?;
            }
            let latest_version = latest.as_ref().map(|v| v.version);
            if grant.version.is_some() && grant.version != latest_version {
                return Err(self.fail(format!(
                    "data rule: grant in flight {grant:?} claims a stale version, latest is \
                     {latest_version:?}"
                )));
            }
        }
        match latest {
            None if sum == 0 && owners == 0 => Ok(()),
            Some(_) if totals.len() == 1 && totals.first() == Some(&sum) && owners == 1 => Ok(()),
            _ => Err(self.fail(format!(
                "conservation of {name}: {sum} tokens, totals {totals:?}, {owners} owner tokens \
                 (created: {})",
                latest.is_some()
            ))),
        }
    }
}

/// Whether a node with `view` holds every token once `handed_on` tokens it just sent away are
/// counted back.
fn holds_all(view: Option<TokenView>, handed_on: u32) -> bool {
    view.is_some_and(|v| v.tokens + handed_on == v.total)
}

impl SimNode {
    fn new(proto: Protocol, objects: usize) -> SimNode {
        SimNode {
            proto,
            open: vec![OpenState::Closed; objects],
            published: BTreeMap::new(),
        }
    }
}
