//! An exhaustive model of whole members ([`coherence_core::member::Member`]: the token
//! protocol, the view change and the leases together) for the `stateright` checker, in the
//! three situations where they must hold each other up:
//!
//! - [`Fault::CrashDuringWrite`]: the holder of every token writes and may crash at any point
//!   of it (what it sent and is still in flight either arrives or is lost); the survivors'
//!   transports report it lost, they remove it and read.
//! - [`Fault::MinorityWriter`]: the holder is cut off from the other two at any point and
//!   writes and reads on its side; the majority's transports report it lost once the cut is
//!   detected, and node 0 writes on theirs.
//! - [`Fault::RemovedReturns`]: the holder stalls; the others detect it, remove it and write;
//!   then it resumes, hears from its transport that the others are lost, and reads.
//! - [`Fault::CrashWhileJoining`]: the crash during a write, after a new node asked node 1 to
//!   join (at any point before the crash): node 1 hands the request on to the coordinator, whose view change
//!   gives the joiner its id ([`JOINER`]); the joiner exists once a decision names it (as its
//!   transport learns its id from the first member that speaks to it) and installs that view.
//!   (A read by the joiner on top makes the state space too large to explore.)
//!
//! Three founding members share one object (`i64`), whose every token the setup leaves at
//! node 2 with value 1 (Invalidate policy, durability 1, leases on). The network is a FIFO
//! channel per ordered pair. Token traffic, operations, reports and the fault interleave in
//! every order; lease and view-change messages at the head of a channel arrive at once (the
//! view change's own interleavings are [`crate::view_model`]'s), which keeps each run to a
//! few hundred thousand states. Time moves in steps of [`TICK`] (each step fires the members'
//! lease timers), for at most [`MAX_TICKS`] steps: enough for a grant to expire, so a removal
//! is possible, and for the survivors to renew their leases.
//!
//! Properties, in every state: at most one node that may write the object (it holds every
//! token, is not frozen or removed, and its lease holds); every node that installs an epoch
//! installs the same view and plan; no write that returned is missing from a later plan; the
//! history of returned operations is linearizable (stateright's `LinearizabilityTester`); a
//! node out of the majority that has heard all its transport reports is removed or cut off
//! ([`Member::cut_off`]) once nothing is left to deliver to it.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use coherence_core::member::{Member, MemberOutput};
use coherence_core::protocol::{Event, OpId, Outcome, Plan, Protocol, WritePolicy};
use coherence_core::view::{Epoch, View};
use coherence_core::wire::{Envelope, Init, Traffic};
use coherence_core::{Contact, NodeId};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester};
use stateright::{Model, Property};

use crate::conformance::linearizability::{Op, Ret, SwapRegister};
use crate::fault_sim::{bytes_of, value_of};

/// Every member's lease.
pub const LEASE: Duration = Duration::from_millis(1000);
/// One step of time: two of them outlast a grant (with the drift margin), so a removal is
/// possible after two, and the survivors renew their leases on the way.
pub const TICK: Duration = Duration::from_millis(600);
/// Most steps of time in a run.
pub const MAX_TICKS: u8 = 3;
/// Most retries of a proposal (a member's retry timer firing) per node.
const MAX_PROPOSALS: u8 = 1;

const OBJECT: &str = "x";
/// The node that holds every token after the setup, and suffers the fault.
const VICTIM: NodeId = 2;
/// The id the view change gives the joiner of [`Fault::CrashWhileJoining`].
const JOINER: NodeId = 3;

/// The one fault of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Fault {
    /// The victim writes 2 and crashes at any point; node 0 reads.
    CrashDuringWrite,
    /// The victim is cut off at any point, writes 2 and reads; node 0 writes 3.
    MinorityWriter,
    /// The victim stalls at any point; node 0 writes 3; the victim resumes cut off and reads.
    RemovedReturns,
    /// As [`Fault::CrashDuringWrite`], after a joiner asked node 1 to join.
    CrashWhileJoining,
}

/// The model: which fault.
#[derive(Debug, Clone)]
pub struct MemberModel {
    /// The fault of every run.
    pub fault: Fault,
}

/// One scripted operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Step {
    Write(i64),
    Read,
}

/// Where the fault is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Phase {
    /// Not yet happened.
    Before,
    /// Happened (crashed, cut off, stalled), not yet detected.
    Under,
    /// Both sides' transports report each other lost; what was in flight between them is
    /// gone, and nothing more passes.
    Detected,
    /// The stalled victim runs again (still severed from the others).
    Resumed,
}

/// One state of the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    nodes: Vec<Member>,
    net: BTreeMap<(NodeId, NodeId), VecDeque<Envelope>>,
    ticks: u8,
    phase: Phase,
    /// Transport reports not yet heard: (observer, lost node).
    reports: BTreeSet<(NodeId, NodeId)>,
    /// Per node, the index of its next scripted step.
    next: Vec<usize>,
    /// Operations under way: id, node, step.
    pending: BTreeMap<OpId, (NodeId, Step)>,
    proposals: Vec<u8>,
    /// Whether the joiner asked (only [`Fault::CrashWhileJoining`]).
    asked: bool,
    /// Keyed by operation: one that ended without effect stays open there.
    history: LinearizabilityTester<OpId, SwapRegister>,
    /// Writes that returned: (epoch, version, value).
    returned: Vec<(Epoch, u64, i64)>,
    decided: BTreeMap<Epoch, (View, Plan)>,
    /// The first broken rule, if any (checked where it happens).
    broken: Option<String>,
}

/// What happens next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Deliver the oldest message from the first node to the second.
    Deliver(NodeId, NodeId),
    /// A node starts its next scripted operation.
    Start(NodeId),
    /// A node hears its transport report the second node lost.
    Report(NodeId, NodeId),
    /// A node's retry timer fires: it proposes the view it wants, if any.
    Propose(NodeId),
    /// Time moves on by [`TICK`]; due lease timers fire.
    Tick,
    /// The fault happens.
    Fault,
    /// The fault is detected.
    Detect,
    /// The joiner asks node 1 to join (node 1's transport reports its request).
    Ask,
    /// The stalled victim resumes.
    Resume,
    /// A message in flight from the crashed victim is lost.
    Lose(NodeId),
}

/// How the joiner of [`Fault::CrashWhileJoining`] is reached.
fn joiner_contact() -> Contact {
    Contact {
        incarnation: 7,
        addr: "joiner".into(),
    }
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl MemberModel {
    fn script(&self, node: NodeId) -> &'static [Step] {
        match (self.fault, node) {
            (Fault::CrashDuringWrite | Fault::CrashWhileJoining, VICTIM) => &[Step::Write(2)],
            (Fault::CrashDuringWrite, 0) => &[Step::Read],
            (Fault::MinorityWriter, VICTIM) => &[Step::Write(2), Step::Read],
            (Fault::MinorityWriter, 0) => &[Step::Write(3)],
            (Fault::RemovedReturns, VICTIM) => &[Step::Read],
            (Fault::RemovedReturns, 0) => &[Step::Write(3)],
            _ => &[],
        }
    }

    fn now(s: &State) -> Instant {
        origin() + TICK * u32::from(s.ticks)
    }

    fn crashed(&self, s: &State, node: NodeId) -> bool {
        self.crashes() && node == VICTIM && s.phase != Phase::Before
    }

    /// Whether the victim crashes (rather than being cut off or stalled).
    fn crashes(&self) -> bool {
        matches!(
            self.fault,
            Fault::CrashDuringWrite | Fault::CrashWhileJoining
        )
    }

    /// Whether `node` takes steps now (not crashed, not stalled).
    fn runs(&self, s: &State, node: NodeId) -> bool {
        if node != VICTIM || s.phase == Phase::Before {
            return true;
        }
        match self.fault {
            Fault::CrashDuringWrite | Fault::CrashWhileJoining => false,
            Fault::MinorityWriter => true,
            Fault::RemovedReturns => s.phase == Phase::Resumed,
        }
    }

    /// Whether the fault separates the pair: a cut holds their messages until it is
    /// detected, a detection drops them for good. (A stalled victim's messages already sent
    /// still arrive; those to it wait until it resumes.)
    fn separated(&self, s: &State, a: NodeId, b: NodeId) -> bool {
        let across = (a == VICTIM) != (b == VICTIM);
        across
            && match (self.fault, s.phase) {
                (Fault::CrashDuringWrite | Fault::CrashWhileJoining, _) | (_, Phase::Before) => {
                    false
                }
                (Fault::MinorityWriter, _) => true,
                (Fault::RemovedReturns, phase) => phase >= Phase::Detected,
            }
    }

    fn deliverable(&self, s: &State, from: NodeId, to: NodeId) -> bool {
        s.net.get(&(from, to)).is_some_and(|q| !q.is_empty())
            && self.runs(s, to)
            && !self.crashed(s, to)
            && !self.separated(s, from, to)
    }

    /// Acts on `node`'s outputs.
    fn after(&self, s: &mut State, node: NodeId) {
        while let Some(output) = s.nodes[node as usize].poll_output() {
            match output {
                MemberOutput::Send { to, envelope } => {
                    if !(s.phase >= Phase::Detected && self.separated(s, node, to)) {
                        s.net.entry((node, to)).or_default().push_back(envelope);
                    }
                }
                MemberOutput::Event(Event::Completed { op, outcome }) => {
                    self.completed(s, op, outcome);
                }
                MemberOutput::Event(_) => {}
                MemberOutput::Connect(contacts) => self.connect(s, contacts),
                MemberOutput::Installed { view, plan } => self.installed(s, node, view, plan),
            }
        }
    }

    /// A decision names these members: the joiner exists from the first one that gives it
    /// its id (its transport learns the id from the first member that speaks to it).
    fn connect(&self, s: &mut State, contacts: BTreeMap<NodeId, Contact>) {
        for (id, contact) in contacts {
            if (id as usize) < s.nodes.len() {
                continue;
            }
            if id != JOINER || contact != joiner_contact() {
                s.broken
                    .get_or_insert(format!("id {id} given to {contact:?}"));
                continue;
            }
            let protocol = Protocol::new(id, [], WritePolicy::Invalidate).with_durability(1);
            s.nodes.push(Member::joining(protocol).with_lease(LEASE));
            s.next.push(0);
            s.proposals.push(0);
        }
    }

    fn completed(&self, s: &mut State, op: OpId, outcome: Outcome) {
        let Some((node, step)) = s.pending.remove(&op) else {
            return; // the setup's operations
        };
        let ret = match (step, outcome) {
            (Step::Read, Outcome::Read(value)) => Ret::Read(value_of(&value.bytes)),
            (Step::Write(v), Outcome::Written { version }) => {
                let epoch = s.nodes[node as usize].view().epoch;
                s.returned.push((epoch, version, v));
                Ret::Written
            }
            // Refused or cut short: no effect, the operation stays open in the history
            // (which allows either).
            (_, Outcome::NoMajority | Outcome::Interrupted | Outcome::Removed) => return,
            (step, outcome) => {
                s.broken
                    .get_or_insert(format!("{step:?} at node {node} ended {outcome:?}"));
                return;
            }
        };
        if let Err(e) = s.history.on_return(op, ret) {
            s.broken.get_or_insert(format!("history: {e}"));
        }
    }

    fn installed(&self, s: &mut State, node: NodeId, view: View, plan: Plan) {
        if let Some((decided, decided_plan)) = s.decided.get(&view.epoch) {
            if (decided, decided_plan) != (&view, &plan) {
                s.broken.get_or_insert(format!(
                    "node {node} installed {view:?}, epoch {} was decided as {decided:?}",
                    view.epoch
                ));
            }
            return;
        }
        let planned = plan.values.get(OBJECT);
        for &(epoch, version, value) in &s.returned {
            let kept = planned.is_some_and(|p| {
                p.version > version || (p.version == version && value_of(&p.bytes) == value)
            });
            if epoch < view.epoch && !kept {
                s.broken.get_or_insert(format!(
                    "epoch {} lost the write of {value} that returned in epoch {epoch}",
                    view.epoch
                ));
            }
        }
        s.decided.insert(view.epoch, (view, plan));
    }

    /// Three members of view 0 with leases; every node opens the object and node 2 writes 1,
    /// everything delivered in order.
    fn setup(&self) -> State {
        let view = View {
            epoch: 0,
            members: (0..3).collect(),
        };
        let nodes = (0..3)
            .map(|id| {
                let protocol = Protocol::new(id, [], WritePolicy::Invalidate).with_durability(1);
                Member::new(protocol, view.clone()).with_lease(LEASE)
            })
            .collect();
        let mut s = State {
            nodes,
            net: BTreeMap::new(),
            ticks: 0,
            phase: Phase::Before,
            reports: BTreeSet::new(),
            next: vec![0; 3],
            pending: BTreeMap::new(),
            proposals: vec![0; 3],
            asked: false,
            history: LinearizabilityTester::new(SwapRegister(1)),
            returned: Vec::new(),
            decided: BTreeMap::from([(0, (view, Plan::default()))]),
            broken: None,
        };
        let now = Self::now(&s);
        let drain = |s: &mut State| {
            while let Some((from, to)) = s.net.iter().find(|(_, q)| !q.is_empty()).map(|(k, _)| *k)
            {
                let envelope = s.net.get_mut(&(from, to)).and_then(VecDeque::pop_front);
                let envelope = envelope.expect("not empty");
                s.nodes[to as usize]
                    .handle(now, from, envelope)
                    .expect("setup traffic is accepted");
                self.after(s, to);
            }
        };
        for node in 0..3 {
            s.nodes[node as usize].tick(now);
            self.after(&mut s, node);
        }
        drain(&mut s);
        for node in 0..3 {
            let init = Init {
                type_name: "i64".into(),
                bytes: bytes_of(0),
            };
            s.nodes[node as usize].operate(now, |p| p.open(100 + u64::from(node), OBJECT, init));
            self.after(&mut s, node);
            drain(&mut s);
        }
        s.nodes[VICTIM as usize].operate(now, |p| p.write(110, OBJECT, bytes_of(1)));
        self.after(&mut s, VICTIM);
        drain(&mut s);
        s
    }

    /// The nodes that may write the object now.
    fn writers(&self, s: &State) -> Vec<NodeId> {
        let now = Self::now(s);
        (0..s.nodes.len() as NodeId)
            .filter(|&n| !self.crashed(s, n))
            .filter(|&n| {
                let member = &s.nodes[n as usize];
                let p = member.protocol();
                !p.is_frozen()
                    && !p.is_removed()
                    && member.lease().holds_at(now)
                    && p.token_view(OBJECT)
                        .is_some_and(|v| v.tokens > 0 && v.tokens == v.total)
            })
            .collect()
    }
}

impl MemberModel {
    /// Lease and view-change traffic at the head of a channel arrives at once (in a fixed
    /// order, FIFO per channel kept), so only token traffic, operations and faults interleave:
    /// the view change's own interleavings are checked exhaustively by
    /// [`crate::view_model`], and the seeded simulation interleaves everything.
    fn deliver_control(&self, s: &mut State) {
        let now = Self::now(s);
        loop {
            let head = s.net.iter().find(|(&(from, to), q)| {
                matches!(
                    q.front(),
                    Some(Envelope {
                        traffic: Traffic::Lease(_) | Traffic::View(_),
                        ..
                    })
                ) && self.deliverable(s, from, to)
            });
            let Some((&(from, to), _)) = head else { return };
            let envelope = s.net.get_mut(&(from, to)).and_then(VecDeque::pop_front);
            let envelope = envelope.expect("a head");
            if let Err(e) = s.nodes[to as usize].handle(now, from, envelope) {
                s.broken
                    .get_or_insert(format!("node {to} refused a message: {e}"));
            }
            self.after(s, to);
        }
    }

    /// One action, before the lease traffic settles.
    fn step(&self, s: &State, action: Action) -> Option<State> {
        let mut s = s.clone();
        let now = Self::now(&s);
        match action {
            Action::Deliver(from, to) => {
                let envelope = s.net.get_mut(&(from, to))?.pop_front()?;
                if let Err(e) = s.nodes[to as usize].handle(now, from, envelope) {
                    s.broken
                        .get_or_insert(format!("node {to} refused a message: {e}"));
                }
                self.after(&mut s, to);
            }
            Action::Lose(to) => {
                s.net.get_mut(&(VICTIM, to))?.pop_back()?;
            }
            Action::Start(node) => {
                let step = self.script(node)[s.next[node as usize]];
                s.next[node as usize] += 1;
                let op = 1000 + s.next.iter().sum::<usize>() as u64 * 10 + u64::from(node);
                s.pending.insert(op, (node, step));
                let invoked = match step {
                    Step::Read => Op::Read,
                    Step::Write(v) => Op::Write(v),
                };
                if let Err(e) = s.history.on_invoke(op, invoked) {
                    s.broken.get_or_insert(format!("history: {e}"));
                }
                s.nodes[node as usize].operate(now, |p| match step {
                    Step::Read => p.read(op, OBJECT),
                    Step::Write(v) => p.write(op, OBJECT, bytes_of(v)),
                });
                self.after(&mut s, node);
            }
            Action::Report(observer, lost) => {
                // As the node does: hear it, then propose what it wants.
                s.reports.remove(&(observer, lost));
                s.nodes[observer as usize].suspect(now, lost);
                s.nodes[observer as usize].propose_wanted(now);
                self.after(&mut s, observer);
            }
            Action::Propose(node) => {
                s.proposals[node as usize] += 1;
                s.nodes[node as usize].propose_wanted(now);
                self.after(&mut s, node);
            }
            Action::Tick => {
                s.ticks += 1;
                let now = Self::now(&s);
                for node in 0..s.nodes.len() as NodeId {
                    let due = s.nodes[node as usize]
                        .next_tick(now)
                        .is_some_and(|at| at <= now);
                    if self.runs(&s, node) && due {
                        s.nodes[node as usize].tick(now);
                        self.after(&mut s, node);
                    }
                }
            }
            Action::Fault => {
                s.phase = Phase::Under;
                if self.crashes() {
                    // The survivors' transports report the crash, each in its own time.
                    s.reports.extend([(0, VICTIM), (1, VICTIM)]);
                }
            }
            Action::Detect => {
                s.phase = Phase::Detected;
                for other in [0, 1] {
                    s.reports.insert((other, VICTIM));
                    s.reports.insert((VICTIM, other));
                    s.net.remove(&(other, VICTIM));
                    s.net.remove(&(VICTIM, other));
                }
            }
            Action::Resume => s.phase = Phase::Resumed,
            Action::Ask => {
                // As the node does: a new joiner at the coordinator starts a view change, a
                // request at another member goes on to the coordinator.
                s.asked = true;
                if s.nodes[1].admit(joiner_contact()) {
                    s.nodes[1].propose_wanted(now);
                }
                self.after(&mut s, 1);
            }
        }
        Some(s)
    }
}

impl Model for MemberModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.setup()]
    }

    fn actions(&self, s: &State, actions: &mut Vec<Action>) {
        if s.broken.is_some() {
            return;
        }
        for &(from, to) in s.net.keys() {
            if self.deliverable(s, from, to) {
                actions.push(Action::Deliver(from, to));
            }
            let in_flight = s.net.get(&(from, to)).is_some_and(|q| !q.is_empty());
            if in_flight && self.crashed(s, from) && from != to {
                actions.push(Action::Lose(to));
            }
        }
        if self.fault == Fault::CrashWhileJoining && !s.asked && s.phase == Phase::Before {
            actions.push(Action::Ask);
        }
        for node in 0..s.nodes.len() as NodeId {
            let busy = s.pending.values().any(|(n, _)| *n == node);
            let script = self.script(node);
            let member = s.nodes[node as usize].view().members.contains(&node);
            if self.runs(s, node) && member && !busy && s.next[node as usize] < script.len() {
                actions.push(Action::Start(node));
            }
            if self.runs(s, node)
                && s.proposals[node as usize] < MAX_PROPOSALS
                && s.nodes[node as usize].wanted().is_some()
            {
                actions.push(Action::Propose(node));
            }
        }
        for &(observer, lost) in &s.reports {
            if self.runs(s, observer) {
                actions.push(Action::Report(observer, lost));
            }
        }
        // Time matters once the fault happened (before, every lease holds).
        if s.ticks < MAX_TICKS && s.phase != Phase::Before {
            actions.push(Action::Tick);
        }
        match (s.phase, self.fault) {
            (Phase::Before, _) => actions.push(Action::Fault),
            (Phase::Under, Fault::MinorityWriter | Fault::RemovedReturns) => {
                actions.push(Action::Detect)
            }
            (Phase::Detected, Fault::RemovedReturns) => actions.push(Action::Resume),
            _ => {}
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut s = self.step(s, action)?;
        self.deliver_control(&mut s);
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("no rule broken", |_, s: &State| s.broken.is_none()),
            Property::always("one writer", |m: &MemberModel, s: &State| {
                m.writers(s).len() <= 1
            }),
            Property::always("linearizable", |_, s: &State| {
                s.history.serialized_history().is_some()
            }),
            Property::always(
                "a node out of the majority ends removed or cut off",
                |m: &MemberModel, s: &State| {
                    let victim = &s.nodes[VICTIM as usize];
                    let settled = s.phase >= Phase::Detected
                        && m.runs(s, VICTIM)
                        && !s.reports.iter().any(|(o, _)| *o == VICTIM)
                        && !s
                            .net
                            .iter()
                            .any(|(&(_, to), q)| to == VICTIM && !q.is_empty());
                    !settled || victim.protocol().is_removed() || victim.cut_off()
                },
            ),
            Property::sometimes("the survivors remove the victim", |_, s: &State| {
                s.nodes[0].view().epoch > 0 && !s.nodes[0].view().members.contains(&VICTIM)
            }),
            Property::sometimes(
                "node 0 completes its script (the joiner is a member) after the fault",
                |m, s: &State| {
                    if m.fault == Fault::CrashWhileJoining {
                        return s.phase != Phase::Before
                            && s.nodes
                                .get(JOINER as usize)
                                .is_some_and(|joiner| joiner.view().members.contains(&JOINER));
                    }
                    s.phase != Phase::Before
                        && s.next[0] == m.script(0).len()
                        && !s.pending.values().any(|(n, _)| *n == 0)
                },
            ),
        ]
    }
}
