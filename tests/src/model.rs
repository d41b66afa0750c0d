//! An exhaustive model of the token-coherence protocol for the `stateright` checker.
//!
//! The state is one [`Protocol`] per node, a FIFO channel per ordered pair of nodes, and each
//! node's progress through a script of operations ([`Step`]s). An action either delivers the head
//! of one channel or lets one node issue its next step, so the checker explores every
//! interleaving that per-pair FIFO allows. Nodes numbered from `founders` on join later, at any
//! point, as an action of their own.
//!
//! Nodes are driven as the real driver drives them: after every input, `poll_output()` until
//! empty (events first, then messages). What one input sends to one peer travels as one frame,
//! which the receiver handles message by message without other input in between (the driver
//! holds its lock for the whole frame). The model also keeps what the driver publishes for local reads (the
//! `Readable`/`Unreadable` events), the latest committed value of every object, and every breach
//! of a rule that can only be seen during a step (a stale outcome, a skipped version, a write
//! without all tokens). [`Model::properties`] turns these into named safety properties, plus
//! "not stuck" and the liveness property "scripts complete and quiesce".
//!
//! Every path is finite: [`State::deliveries`] counts delivered frames and the boundary
//! [`MAX_DELIVERIES`] cuts runs that never settle. So the state graph is acyclic, and
//! stateright's `eventually` check, which is only sound on acyclic graphs, reports a livelock as
//! a path that ends at the boundary without completing. (The counter roughly doubles the state
//! count, since paths to the same state may deliver different numbers of frames.) The liveness
//! condition can only hold in a state without successors, so stateright's other caveat, paths
//! merging with different `eventually` progress, does not apply either.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use coherence_core::protocol::{Event, OpId, Outcome, Output, Protocol, WritePolicy};
use coherence_core::wire::{Grant, Init, Message, Value};
use coherence_core::NodeId;
use stateright::{Checker, Model, Property};

/// The type name of every scripted open (type mismatches are not modelled).
const TYPE_NAME: &str = "bytes";

/// Deliveries after which a run counts as never settling (see the module docs).
pub const MAX_DELIVERIES: u32 = 200;

/// One scripted operation of a node. A node issues a step once the previous one completed,
/// except [`Step::Leave`], which may be issued as soon as the previous step was issued and so
/// can interrupt it (the interrupted operation completes as `Aborted`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `Protocol::open` with this node's initial value.
    Open {
        /// The object.
        object: &'static str,
        /// The initial value this node offers.
        init: &'static [u8],
    },
    /// `Protocol::read`.
    Read {
        /// The object.
        object: &'static str,
    },
    /// `Protocol::write`.
    Write {
        /// The object.
        object: &'static str,
        /// The new value.
        bytes: &'static [u8],
    },
    /// `Protocol::lock`; a [`Step::Commit`] must follow.
    Lock {
        /// The object.
        object: &'static str,
    },
    /// `Protocol::commit` of the lock the previous step took, with a new value (completes at
    /// once).
    Commit {
        /// The new value.
        bytes: &'static [u8],
    },
    /// `Protocol::leave`; completes on `Event::Left`. Must be the last step.
    Leave,
}

/// What travels in a channel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Item {
    /// What one input of the sender produced for the receiver, in order.
    Frame(Arc<[Message]>),
    /// The sender joined (the transport delivers this before any frame from it).
    Joined(NodeId),
    /// The sender left (the transport delivers this after every frame from it).
    Left(NodeId),
}

/// Whether a node is a member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Life {
    /// Not joined yet.
    Absent,
    /// A member, with its protocol state.
    Live(Box<Protocol>),
    /// Left the cluster (after `Event::Left`).
    Gone,
}

/// One node: its protocol, its script's progress and what its driver published.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct NodeState {
    /// The protocol, while the node is a member.
    pub life: Life,
    /// Steps issued so far.
    pub issued: usize,
    /// Which steps completed (indexed by step, which is also the `OpId`).
    pub done: Vec<bool>,
    /// The granted lock that the next [`Step::Commit`] ends.
    pub lock: Option<OpId>,
    /// The driver's readable cells, per object: the value local reads return.
    pub published: BTreeMap<String, Value>,
}

impl NodeState {
    fn protocol(&self) -> Option<&Protocol> {
        match &self.life {
            Life::Live(protocol) => Some(protocol),
            Life::Absent | Life::Gone => None,
        }
    }
}

/// A rule broken during a step; kept in the state so that a property can report it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Breach {
    /// An `Opened`, `Read` or `Granted` outcome did not carry the latest committed value.
    StaleOutcome {
        /// The node.
        node: NodeId,
        /// The operation.
        op: OpId,
        /// The value it got.
        got: Value,
        /// The latest committed value.
        latest: Option<Value>,
    },
    /// A write's version is not the previous version plus one.
    VersionSkip {
        /// The node.
        node: NodeId,
        /// The operation.
        op: OpId,
        /// The version written.
        version: u64,
        /// The version expected.
        expected: u64,
    },
    /// A write or lock completed while the node did not hold every token.
    PartialWrite {
        /// The node.
        node: NodeId,
        /// The operation.
        op: OpId,
        /// Tokens held after the step plus those sent on in the same step.
        tokens: u32,
        /// The token total.
        total: u32,
    },
    /// An operation completed that was not pending, or with the wrong kind of outcome
    /// (`op` is `None` for an unexpected `Event::Left`).
    UnexpectedCompletion {
        /// The node.
        node: NodeId,
        /// The operation.
        op: Option<OpId>,
        /// The outcome.
        outcome: String,
    },
    /// Tokens or the genesis role sent to a node that is not a member, which the transport
    /// drops. (Other messages to a departed node are moot: a peer cannot know when a departing
    /// node closes, so the protocol may address it after that.)
    Lost {
        /// The sender.
        from: NodeId,
        /// The addressee.
        to: NodeId,
        /// What was dropped.
        message: Message,
    },
    /// The protocol panicked (a failed internal assertion); exploration stops there.
    Panicked {
        /// The node.
        node: NodeId,
        /// The panic message.
        message: String,
    },
}

/// The whole system at one point of a run. Nodes are shared between states until one changes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    /// Every node, indexed by id.
    pub nodes: Vec<Arc<NodeState>>,
    /// FIFO channels, the one from `a` to `b` at index `a * nodes + b`.
    pub channels: Vec<VecDeque<Item>>,
    /// The latest committed value of every created object.
    pub latest: Arc<BTreeMap<String, Value>>,
    /// Every version-0 value seen per object (at its creation and in outcomes).
    pub inits: Arc<BTreeMap<String, BTreeSet<Bytes>>>,
    /// Rules broken so far.
    pub breaches: Vec<Breach>,
    /// Frames and notifications delivered so far (bounded by [`MAX_DELIVERIES`]).
    pub deliveries: u32,
}

impl State {
    fn node_mut(&mut self, id: NodeId) -> &mut NodeState {
        Arc::make_mut(&mut self.nodes[id as usize])
    }

    fn channel_mut(&mut self, from: NodeId, to: NodeId) -> &mut VecDeque<Item> {
        let n = self.nodes.len();
        &mut self.channels[from as usize * n + to as usize]
    }

    fn live(&self) -> impl Iterator<Item = (NodeId, &Protocol)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(id, node)| node.protocol().map(|p| (id as NodeId, p)))
    }

    fn is_live(&self, id: NodeId) -> bool {
        self.nodes[id as usize].protocol().is_some()
    }

    /// `(count, owner, total)` of every grant of `object` in flight.
    fn grants_in_flight<'a>(
        &'a self,
        object: &'a str,
    ) -> impl Iterator<Item = (u32, bool, u32)> + 'a {
        self.channels
            .iter()
            .flatten()
            .flat_map(|item| match item {
                Item::Frame(messages) => &messages[..],
                Item::Joined(_) | Item::Left(_) => &[],
            })
            .filter_map(move |message| match message {
                Message::Grant(g) if &*g.object == object => Some((g.count, g.owner, g.total)),
                _ => None,
            })
    }

    fn panicked(&self) -> bool {
        self.breaches
            .iter()
            .any(|b| matches!(b, Breach::Panicked { .. }))
    }

    fn scripts_done(&self) -> bool {
        self.nodes.iter().all(|node| node.done.iter().all(|&d| d))
    }

    fn quiescent(&self) -> bool {
        self.channels.iter().all(VecDeque::is_empty)
            && self
                .live()
                .all(|(_, p)| !p.is_busy() && p.known_requests() == 0)
    }

    /// Checks a value an operation returned against the latest committed one.
    fn check_value(&mut self, node: NodeId, op: OpId, object: &str, got: Value) {
        self.observe(object, &got);
        if self.latest.get(object) != Some(&got) {
            let latest = self.latest.get(object).cloned();
            self.breaches.push(Breach::StaleOutcome {
                node,
                op,
                got,
                latest,
            });
        }
    }

    /// Notes a version-0 value of `object` among its inits; the first value seen of an object
    /// is its creation.
    fn observe(&mut self, object: &str, value: &Value) {
        if value.version != 0 {
            return;
        }
        if !self
            .inits
            .get(object)
            .is_some_and(|s| s.contains(&value.bytes))
        {
            Arc::make_mut(&mut self.inits)
                .entry(object.to_string())
                .or_default()
                .insert(value.bytes.clone());
        }
        if !self.latest.contains_key(object) {
            Arc::make_mut(&mut self.latest).insert(object.to_string(), value.clone());
        }
    }

    /// Records a write of `bytes` as version `version` of `object`.
    fn record_write(&mut self, node: NodeId, op: OpId, object: &str, version: u64, bytes: Bytes) {
        let expected = self.latest.get(object).map_or(1, |v| v.version + 1);
        if version != expected {
            self.breaches.push(Breach::VersionSkip {
                node,
                op,
                version,
                expected,
            });
        }
        let value = Value {
            version,
            type_name: TYPE_NAME.into(),
            bytes,
        };
        Arc::make_mut(&mut self.latest).insert(object.to_string(), value);
    }

    /// Queues a frame from `from` to `to`, or drops it if `to` is not a member.
    fn send(&mut self, from: NodeId, to: NodeId, frame: Vec<Message>) {
        if self.is_live(to) {
            self.channel_mut(from, to)
                .push_back(Item::Frame(frame.into()));
        } else {
            self.drop_frame(from, to, &frame);
        }
    }

    /// Records the tokens and genesis roles among `messages` from `from` to `to` as lost.
    fn drop_frame(&mut self, from: NodeId, to: NodeId, messages: &[Message]) {
        let lost = messages
            .iter()
            .filter(|m| matches!(m, Message::Grant(_) | Message::Genesis { .. }));
        for message in lost {
            let message = message.clone();
            self.breaches.push(Breach::Lost { from, to, message });
        }
    }

    fn no_breach(&self, kind: fn(&Breach) -> bool) -> bool {
        !self.breaches.iter().any(kind)
    }
}

/// One move of the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deliver the head of the channel `from -> to`.
    Deliver {
        /// The sender.
        from: NodeId,
        /// The receiver.
        to: NodeId,
    },
    /// The node issues its next scripted step.
    Issue(NodeId),
    /// The node joins the cluster.
    Join(NodeId),
}

/// A cluster of nodes running scripts; see the module docs.
#[derive(Debug, Clone)]
pub struct CoherenceModel {
    policy: WritePolicy,
    founders: usize,
    scripts: Vec<Vec<Step>>,
}

impl CoherenceModel {
    /// Node `i` runs `scripts[i]`; nodes `0..founders` form the cluster at the start (node 0 is
    /// genesis) and the others join at points of the checker's choosing.
    pub fn new(policy: WritePolicy, founders: usize, scripts: Vec<Vec<Step>>) -> Self {
        assert!((1..=scripts.len()).contains(&founders));
        for script in &scripts {
            if let Some(i) = script.iter().position(|s| *s == Step::Leave) {
                assert_eq!(i + 1, script.len(), "Leave must be the last step");
            }
            for (i, step) in script.iter().enumerate() {
                let after_lock = i > 0 && matches!(script[i - 1], Step::Lock { .. });
                assert_eq!(
                    matches!(step, Step::Commit { .. }),
                    after_lock,
                    "Commit must follow Lock, and only Lock"
                );
            }
        }
        CoherenceModel {
            policy,
            founders,
            scripts,
        }
    }

    fn node_count(&self) -> usize {
        self.scripts.len()
    }

    fn can_issue(&self, state: &State, id: usize) -> bool {
        let node = &state.nodes[id];
        let Some(&step) = self.scripts[id].get(node.issued) else {
            return false;
        };
        node.protocol().is_some()
            && (step == Step::Leave || node.issued == 0 || node.done[node.issued - 1])
    }

    /// Runs one input on node `id`'s protocol, recording a panic as a breach.
    fn apply<R>(
        &self,
        state: &mut State,
        id: NodeId,
        input: impl FnOnce(&mut Protocol) -> R,
    ) -> Option<R> {
        let Life::Live(protocol) = &mut state.node_mut(id).life else {
            unreachable!("only members get input");
        };
        match panic::catch_unwind(AssertUnwindSafe(|| input(protocol))) {
            Ok(result) => Some(result),
            Err(payload) => {
                let message = payload
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                state.breaches.push(Breach::Panicked { node: id, message });
                None
            }
        }
    }

    /// Runs one input on node `id` and handles its output.
    fn run(&self, state: &mut State, id: NodeId, input: impl FnOnce(&mut Protocol)) {
        if self.apply(state, id, input).is_some() {
            self.absorb(state, id, Vec::new());
        }
    }

    /// Delivers the head of the channel `from -> to`.
    fn deliver(&self, state: &mut State, from: NodeId, to: NodeId) {
        let Some(item) = state.channel_mut(from, to).pop_front() else {
            return;
        };
        state.deliveries += 1;
        match item {
            Item::Frame(messages) => {
                for (i, message) in messages.iter().enumerate() {
                    if state.panicked() {
                        return;
                    }
                    if !state.is_live(to) {
                        state.drop_frame(from, to, &messages[i..]);
                        return;
                    }
                    // A correct peer's message is never rejected: a rejection is a breach.
                    self.run(state, to, |p| {
                        if let Err(e) = p.handle(from, message.clone()) {
                            panic!("node {to} rejected a message from {from}: {e}");
                        }
                    });
                }
            }
            Item::Joined(peer) => self.run(state, to, |p| p.peer_joined(peer)),
            Item::Left(peer) => self.run(state, to, |p| p.peer_left(peer)),
        }
    }

    /// Issues node `id`'s next step.
    fn issue(&self, state: &mut State, id: NodeId) {
        let node = state.node_mut(id);
        let op = node.issued as OpId;
        let step = self.scripts[id as usize][node.issued];
        node.issued += 1;
        match step {
            Step::Open { object, init } => {
                let init = Init {
                    type_name: TYPE_NAME.into(),
                    bytes: Bytes::from_static(init),
                };
                self.run(state, id, |p| p.open(op, object, init));
            }
            Step::Read { object } => self.run(state, id, |p| p.read(op, object)),
            Step::Write { object, bytes } => {
                self.run(state, id, |p| {
                    p.write(op, object, Bytes::from_static(bytes))
                });
            }
            Step::Lock { object } => self.run(state, id, |p| p.lock(op, object)),
            Step::Commit { bytes } => {
                let node = state.node_mut(id);
                node.done[op as usize] = true;
                let lock = node.lock.take();
                let committed = self.apply(state, id, |p| {
                    lock.and_then(|lock| p.commit(lock, Some(Bytes::from_static(bytes))))
                });
                let Some(version) = committed else {
                    return; // The protocol panicked.
                };
                let mut writes = Vec::new();
                // Without a lock (it was aborted) nothing was written.
                if let Some(version) = version {
                    let Step::Lock { object } = self.scripts[id as usize][op as usize - 1] else {
                        unreachable!("checked in CoherenceModel::new");
                    };
                    state.record_write(id, op, object, version, Bytes::from_static(bytes));
                    writes.push((op, object));
                }
                self.absorb(state, id, writes);
            }
            Step::Leave => self.run(state, id, Protocol::leave),
        }
    }

    /// Handles the output of node `id`'s last input as the driver does: events first, then
    /// one frame per addressee. `writes` lists writes that completed outside events (a commit);
    /// each write, from there or from an event, is checked to have held every token.
    fn absorb(&self, state: &mut State, id: NodeId, mut writes: Vec<(OpId, &'static str)>) {
        let Life::Live(protocol) = &mut state.node_mut(id).life else {
            unreachable!("only members get input");
        };
        // `poll_output` hands out every event before the first message.
        let (mut events, mut sends) = (Vec::new(), Vec::new());
        while let Some(output) = protocol.poll_output() {
            match output {
                Output::Event(event) => events.push(event),
                Output::Send { to, message } => sends.push((to, message)),
            }
        }
        let mut left = false;
        for event in events {
            match event {
                Event::Readable { object, value } => {
                    state
                        .node_mut(id)
                        .published
                        .insert(object.to_string(), value);
                }
                Event::Unreadable { object } => {
                    state.node_mut(id).published.remove(&*object);
                }
                Event::Completed { op, outcome } => {
                    writes.extend(self.complete(state, id, op, outcome).map(|o| (op, o)));
                }
                Event::Left => left = true,
            }
        }
        let protocol = state.nodes[id as usize].protocol().expect("still a member");
        // A new object's first value shows here, or in a grant if every token went on at once.
        let created: Vec<(String, Value)> = protocol
            .object_names()
            .filter(|object| !state.latest.contains_key(*object))
            .filter_map(|object| {
                let value = protocol.readable_value(object).cloned();
                let value =
                    value.or_else(|| grants(&sends, object).find_map(|g| g.value.clone()))?;
                Some((object.to_string(), value))
            })
            .collect();
        let partial: Vec<Breach> = writes
            .into_iter()
            .filter_map(|(op, object)| {
                let view = protocol.token_view(object)?;
                let tokens = view.tokens + grants(&sends, object).map(|g| g.count).sum::<u32>();
                (tokens != view.total).then_some(Breach::PartialWrite {
                    node: id,
                    op,
                    tokens,
                    total: view.total,
                })
            })
            .collect();
        state.breaches.extend(partial);
        for (object, value) in created {
            state.observe(&object, &value);
        }
        let mut frames: BTreeMap<NodeId, Vec<Message>> = BTreeMap::new();
        for (to, message) in sends {
            frames.entry(to).or_default().push(message);
        }
        for (to, frame) in frames {
            state.send(id, to, frame);
        }
        if left {
            self.depart(state, id);
        }
    }

    /// Records the completion of `op` at node `id`; returns the object if the operation was a
    /// write or a lock (whose tokens must then be checked).
    fn complete(
        &self,
        state: &mut State,
        id: NodeId,
        op: OpId,
        outcome: Outcome,
    ) -> Option<&'static str> {
        let index = op as usize;
        let node = state.node_mut(id);
        let pending = index < node.issued && !node.done[index];
        let step = self.scripts[id as usize].get(index).copied();
        match (pending, step, outcome) {
            (true, _, Outcome::Aborted) => {
                node.done[index] = true;
                None
            }
            (true, Some(Step::Open { object, .. }), Outcome::Opened(value))
            | (true, Some(Step::Read { object }), Outcome::Read(value)) => {
                node.done[index] = true;
                state.check_value(id, op, object, value);
                None
            }
            (true, Some(Step::Lock { object }), Outcome::Granted(value)) => {
                node.done[index] = true;
                node.lock = Some(op);
                state.check_value(id, op, object, value);
                Some(object)
            }
            (true, Some(Step::Write { object, bytes }), Outcome::Written { version }) => {
                node.done[index] = true;
                state.record_write(id, op, object, version, Bytes::from_static(bytes));
                Some(object)
            }
            (_, _, outcome) => {
                state.breaches.push(Breach::UnexpectedCompletion {
                    node: id,
                    op: Some(op),
                    outcome: format!("{outcome:?}"),
                });
                None
            }
        }
    }

    /// Node `id` left: its Leave step completes, frames still addressed to it are dropped, and
    /// every member learns of the departure after the node's last frame.
    fn depart(&self, state: &mut State, id: NodeId) {
        let leave = self.scripts[id as usize]
            .iter()
            .position(|&s| s == Step::Leave);
        let node = state.node_mut(id);
        node.life = Life::Gone;
        match leave {
            Some(index) if index < node.issued && !node.done[index] => node.done[index] = true,
            _ => state.breaches.push(Breach::UnexpectedCompletion {
                node: id,
                op: None,
                outcome: "Left".to_string(),
            }),
        }
        for from in 0..self.node_count() as NodeId {
            let pending: Vec<Item> = state.channel_mut(from, id).drain(..).collect();
            for item in pending {
                // Membership news for a node that is gone is moot.
                if let Item::Frame(messages) = item {
                    state.drop_frame(from, id, &messages);
                }
            }
        }
        let members: Vec<NodeId> = state.live().map(|(m, _)| m).collect();
        for member in members {
            state.channel_mut(id, member).push_back(Item::Left(id));
        }
    }

    /// Node `id` joins: it knows every member, and each member hears of it before its first
    /// frame.
    fn join(&self, state: &mut State, id: NodeId) {
        let members: Vec<NodeId> = state.live().map(|(m, _)| m).collect();
        state.node_mut(id).life =
            Life::Live(Box::new(Protocol::new(id, members.clone(), self.policy)));
        for member in members {
            state.channel_mut(id, member).push_front(Item::Joined(id));
        }
    }

    /// For every created object, the tokens held and in flight add up to the total that every
    /// holder and every grant agrees on.
    fn tokens_conserved(&self, state: &State) -> bool {
        state.latest.keys().all(|object| {
            let mut sum = 0;
            let mut totals = BTreeSet::new();
            for (_, p) in state.live() {
                if let Some(view) = p.token_view(object).filter(|v| v.tokens > 0) {
                    sum += view.tokens;
                    totals.insert(view.total);
                }
            }
            for (count, _, total) in state.grants_in_flight(object) {
                sum += count;
                totals.insert(total);
            }
            totals.len() == 1 && totals.first() == Some(&sum)
        })
    }

    /// Every created object has exactly one owner token, held or in flight.
    fn one_owner(&self, state: &State) -> bool {
        state.latest.keys().all(|object| {
            let held = state
                .live()
                .filter(|(_, p)| p.token_view(object).is_some_and(|v| v.owner))
                .count();
            let moving = state
                .grants_in_flight(object)
                .filter(|&(_, owner, _)| owner)
                .count();
            held + moving == 1
        })
    }

    /// Every readable copy and every published cell holds the latest committed value, and the
    /// driver's cells match the protocol's readability.
    fn copies_current(&self, state: &State) -> bool {
        state.nodes.iter().all(|node| {
            let Some(p) = node.protocol() else {
                return true;
            };
            let cells_match = p
                .object_names()
                .chain(node.published.keys().map(String::as_str))
                .all(|object| p.readable_value(object) == node.published.get(object));
            cells_match
                && node
                    .published
                    .iter()
                    .all(|(object, value)| state.latest.get(object) == Some(value))
        })
    }

    /// A granted lock keeps every token until its commit.
    fn locks_hold_all(&self, state: &State) -> bool {
        state.nodes.iter().enumerate().all(|(id, node)| {
            let (Some(lock), Some(p)) = (node.lock, node.protocol()) else {
                return true;
            };
            let Step::Lock { object } = self.scripts[id][lock as usize] else {
                unreachable!("locks are taken by Lock steps");
            };
            p.token_view(object).is_some_and(|v| v.tokens == v.total)
        })
    }

    /// Each object's version-0 values agree and are one of its openers' inits.
    fn one_init(&self, state: &State) -> bool {
        state.inits.iter().all(|(object, seen)| {
            seen.len() == 1
                && self.scripts.iter().flatten().any(|step| {
                    matches!(step, Step::Open { object: o, init }
                        if *o == object.as_str() && seen.contains(*init))
                })
        })
    }

    /// The actions possible in `state`: none after a panic.
    fn enabled<'a>(&'a self, state: &'a State) -> impl Iterator<Item = Action> + 'a {
        let n = self.node_count();
        let deliveries = state
            .channels
            .iter()
            .enumerate()
            .filter_map(move |(i, channel)| {
                let (from, to) = ((i / n) as NodeId, (i % n) as NodeId);
                (!channel.is_empty() && state.is_live(to)).then_some(Action::Deliver { from, to })
            });
        let issues = (0..n)
            .filter(move |&id| self.can_issue(state, id))
            .map(|id| Action::Issue(id as NodeId));
        let joins = (0..n)
            .filter(move |&id| state.nodes[id].life == Life::Absent)
            .map(|id| Action::Join(id as NodeId));
        let panicked = state.panicked();
        deliveries
            .chain(issues)
            .chain(joins)
            .filter(move |_| !panicked)
    }

    /// Describes `action` taken in `state`: the delivered item or the issued step.
    pub fn describe(&self, state: &State, action: &Action) -> String {
        match *action {
            Action::Deliver { from, to } => {
                let n = self.node_count();
                let item = &state.channels[from as usize * n + to as usize][0];
                format!("deliver {from} -> {to}: {item:?}")
            }
            Action::Issue(id) => {
                let issued = state.nodes[id as usize].issued;
                let step = self.scripts[id as usize][issued];
                format!("node {id} issues op {issued}: {step:?}")
            }
            Action::Join(id) => format!("node {id} joins"),
        }
    }

    /// A readable summary of `state`: every node's tokens and progress, the channels, the
    /// latest values and the breaches.
    pub fn summary(&self, state: &State) -> String {
        let mut out = String::new();
        for (id, node) in state.nodes.iter().enumerate() {
            let done: Vec<usize> = (0..node.done.len()).filter(|&i| node.done[i]).collect();
            let _ = write!(
                out,
                "node {id}: issued {} done {done:?} lock {:?}",
                node.issued, node.lock
            );
            match &node.life {
                Life::Absent => out.push_str(" (not joined)\n"),
                Life::Gone => out.push_str(" (left)\n"),
                Life::Live(p) => {
                    let _ = writeln!(
                        out,
                        " busy {} requests {} genesis {} leaving {}",
                        p.is_busy(),
                        p.known_requests(),
                        p.is_genesis(),
                        p.is_leaving()
                    );
                    for object in p.object_names() {
                        let _ = writeln!(out, "  {object}: {:?}", p.token_view(object));
                    }
                }
            }
        }
        let n = self.node_count();
        for (index, channel) in state.channels.iter().enumerate() {
            if !channel.is_empty() {
                let _ = writeln!(out, "channel {} -> {}: {channel:?}", index / n, index % n);
            }
        }
        let _ = writeln!(out, "latest: {:?}", state.latest);
        let _ = writeln!(out, "breaches: {:?}", state.breaches);
        out
    }
}

/// The grants of `object` among `sends`.
fn grants<'a>(sends: &'a [(NodeId, Message)], object: &'a str) -> impl Iterator<Item = &'a Grant> {
    sends.iter().filter_map(move |(_, message)| match message {
        Message::Grant(g) if &*g.object == object => Some(g),
        _ => None,
    })
}

impl Model for CoherenceModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let n = self.node_count();
        let founders = 0..self.founders as NodeId;
        let nodes = self
            .scripts
            .iter()
            .enumerate()
            .map(|(id, script)| {
                let life = if id < self.founders {
                    Life::Live(Box::new(Protocol::new(
                        id as NodeId,
                        founders.clone(),
                        self.policy,
                    )))
                } else {
                    Life::Absent
                };
                Arc::new(NodeState {
                    life,
                    issued: 0,
                    done: vec![false; script.len()],
                    lock: None,
                    published: BTreeMap::new(),
                })
            })
            .collect();
        vec![State {
            nodes,
            channels: vec![VecDeque::new(); n * n],
            latest: Arc::default(),
            inits: Arc::default(),
            breaches: Vec::new(),
            deliveries: 0,
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        actions.extend(self.enabled(state));
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Deliver { from, to } => self.deliver(&mut state, from, to),
            Action::Issue(id) => self.issue(&mut state, id),
            Action::Join(id) => self.join(&mut state, id),
        }
        Some(state)
    }

    fn format_step(&self, last: &State, action: Action) -> Option<String> {
        Some(self.describe(last, &action))
    }

    fn within_boundary(&self, state: &State) -> bool {
        state.deliveries <= MAX_DELIVERIES
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("token conservation", |m, s| m.tokens_conserved(s)),
            Property::always("one owner token", |m, s| m.one_owner(s)),
            Property::always("readable copies are current", |m, s| m.copies_current(s)),
            Property::always("versions step by one", |_, s: &State| {
                s.no_breach(|b| matches!(b, Breach::VersionSkip { .. }))
            }),
            Property::always("writes hold every token", |m, s| {
                m.locks_hold_all(s) && s.no_breach(|b| matches!(b, Breach::PartialWrite { .. }))
            }),
            Property::always("outcomes carry the latest value", |_, s: &State| {
                s.no_breach(|b| matches!(b, Breach::StaleOutcome { .. }))
            }),
            Property::always("one init wins", |m, s| m.one_init(s)),
            Property::always("operations complete once", |_, s: &State| {
                s.no_breach(|b| matches!(b, Breach::UnexpectedCompletion { .. }))
            }),
            Property::always("no token or role is lost", |_, s: &State| {
                s.no_breach(|b| matches!(b, Breach::Lost { .. }))
            }),
            Property::always("protocol never panics", |_, s: &State| !s.panicked()),
            Property::always("not stuck", |m, s: &State| {
                s.panicked() || m.enabled(s).next().is_some() || s.scripts_done()
            }),
            Property::eventually("scripts complete and quiesce", |_, s: &State| {
                s.panicked() || (s.scripts_done() && s.quiescent())
            }),
        ]
    }
}

/// What one exhaustive check explored.
#[derive(Debug, Clone, Copy)]
pub struct CheckStats {
    /// Distinct states visited.
    pub unique_states: usize,
    /// States generated, repeats included.
    pub states: usize,
    /// Longest path explored.
    pub max_depth: usize,
    /// Wall-clock time of the check.
    pub elapsed: Duration,
}

/// Explores every state of `model` breadth-first; panics, with each counterexample's path and
/// last state, if a property fails. Prints and returns the statistics.
pub fn check(name: &str, model: CoherenceModel) -> CheckStats {
    let start = Instant::now();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let checker = model.checker().threads(threads).spawn_bfs().join();
    let stats = CheckStats {
        unique_states: checker.unique_state_count(),
        states: checker.state_count(),
        max_depth: checker.max_depth(),
        elapsed: start.elapsed(),
    };
    println!(
        "{name}: {} unique states ({} generated), depth {}, {:.2?}",
        stats.unique_states, stats.states, stats.max_depth, stats.elapsed
    );
    let model = checker.model();
    let mut report = String::new();
    for property in model.properties() {
        let Some(path) = checker.discovery(property.name) else {
            continue;
        };
        let _ = writeln!(report, "\n=== \"{}\" fails; path:", property.name);
        let steps = path.into_vec();
        for (state, action) in &steps {
            if let Some(action) = action {
                let _ = writeln!(report, "- {}", model.describe(state, action));
            }
        }
        let (last, _) = steps.last().expect("a path has a state");
        let _ = write!(report, "last state:\n{}", model.summary(last));
    }
    assert!(report.is_empty(), "{name}: counterexamples found:{report}");
    checker.assert_properties();
    stats
}
