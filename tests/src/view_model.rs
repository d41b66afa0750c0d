//! An exhaustive model of the view change ([`coherence_core::view`]) for the `stateright`
//! checker.
//!
//! Three founding members; scripted members propose successors (each a different membership,
//! so proposals compete), a proposer may retry with a higher ballot, and one node may crash at
//! any point: it stops, and what it sent and is still in flight either arrives or is lost. The
//! network is a FIFO channel per ordered pair of nodes, as the transport contract promises
//! (frames between live members are neither lost nor reordered). Each member's report is its
//! own id, and a plan is the map of reports it was made from, so the properties can see where
//! a decision came from.
//!
//! Safety properties, checked in every state: at most one decision per epoch (every node that
//! installs epoch e installs the same members and plan), every plan made from the reports of a
//! majority of the view it succeeds, every installed membership one that was proposed. Paxos
//! promises no liveness with competing proposers, so the model only checks that a decision is
//! reachable at all.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use coherence_core::view::{Epoch, Recreation, View, ViewMessage, ViewOutput, Views};
use coherence_core::NodeId;

use stateright::{Model, Property};

/// A member's report: its id.
type Report = NodeId;
/// A plan: the reports it was made from.
type Plan = BTreeMap<NodeId, Report>;
type Message = ViewMessage<Report, Plan>;

/// The rest of a node, as the view change sees it.
struct Reporter(NodeId);

impl Recreation<Report, Plan> for Reporter {
    fn report(&mut self) -> Report {
        self.0
    }

    fn plan(&self, _: &View, _: &BTreeSet<NodeId>, reports: &BTreeMap<NodeId, Report>) -> Plan {
        reports.clone()
    }
}

/// The model: who may propose what, and how many faults happen.
#[derive(Debug, Clone)]
pub struct ViewModel {
    /// Founding members, ids 0..founders.
    pub founders: NodeId,
    /// Per node, the memberships it proposes, in turn (a retry proposes the same again).
    pub proposals: Vec<Vec<BTreeSet<NodeId>>>,
    /// How many times node 0 may retry each of its proposals with a higher ballot.
    pub retries: u8,
    /// Whether one node may crash.
    pub crash: bool,
}

/// One state of the model.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct State {
    nodes: Vec<Views<Report, Plan>>,
    /// Messages in flight, per (from, to) channel, oldest first.
    net: BTreeMap<(NodeId, NodeId), VecDeque<Message>>,
    /// Per node, the next of its proposals, and the retries left for the current one.
    next: Vec<(usize, u8)>,
    crashed: Option<NodeId>,
    /// Every installation: (node, view, plan).
    installs: BTreeSet<(NodeId, View, Plan)>,
    /// The members of every decided view, by epoch (epoch 0: the founders).
    views: BTreeMap<Epoch, BTreeSet<NodeId>>,
    /// Every membership proposed so far.
    proposed: BTreeSet<BTreeSet<NodeId>>,
}

/// What happens next.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// Deliver the oldest message of the channel (from, to).
    Deliver(NodeId, NodeId),
    /// A node proposes its next membership (or retries the current one).
    Propose(NodeId, bool),
    /// A node crashes; with `true`, what it sent that is still in flight is lost.
    Crash(NodeId, bool),
}

impl State {
    fn live(&self, node: NodeId) -> bool {
        self.crashed != Some(node)
    }

    /// Takes the node's outputs: sends go in flight, installations are recorded.
    fn settle(&mut self, node: NodeId) {
        while let Some(output) = self.nodes[node as usize].poll_output() {
            match output {
                ViewOutput::Send { to, message } => {
                    self.net.entry((node, to)).or_default().push_back(message);
                }
                ViewOutput::Frozen => {}
                ViewOutput::Installed { view, plan } => {
                    self.views.entry(view.epoch).or_insert(view.members.clone());
                    self.installs.insert((node, view, plan));
                }
            }
        }
    }

    /// The oldest message of a channel, removed.
    fn take(&mut self, from: NodeId, to: NodeId) -> Option<Message> {
        let channel = self.net.get_mut(&(from, to))?;
        let message = channel.pop_front();
        if channel.is_empty() {
            self.net.remove(&(from, to));
        }
        message
    }
}

impl Model for ViewModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let founders: BTreeSet<NodeId> = (0..self.founders).collect();
        let view = View {
            epoch: 0,
            members: founders.clone(),
        };
        let nodes = (0..self.proposals.len() as NodeId)
            .map(|id| Views::new(id, view.clone()))
            .collect();
        vec![State {
            nodes,
            net: BTreeMap::new(),
            next: (0..self.proposals.len())
                .map(|node| (0, if node == 0 { self.retries } else { 0 }))
                .collect(),
            crashed: None,
            installs: BTreeSet::new(),
            views: BTreeMap::from([(0, founders)]),
            proposed: BTreeSet::new(),
        }]
    }

    fn actions(&self, state: &State, actions: &mut Vec<Action>) {
        for &(from, to) in state.net.keys() {
            if state.live(to) {
                actions.push(Action::Deliver(from, to));
            }
        }
        for node in 0..self.proposals.len() as NodeId {
            if !state.live(node) {
                continue;
            }
            let (next, retries) = state.next[node as usize];
            if next < self.proposals[node as usize].len() {
                actions.push(Action::Propose(node, false));
            }
            if next > 0 && retries > 0 {
                actions.push(Action::Propose(node, true));
            }
            if self.crash && state.crashed.is_none() {
                actions.push(Action::Crash(node, false));
                actions.push(Action::Crash(node, true));
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut state = last.clone();
        match action {
            Action::Deliver(from, to) => {
                let message = state.take(from, to)?;
                state.nodes[to as usize].handle(from, message, &mut Reporter(to));
                state.settle(to);
            }
            Action::Propose(node, retry) => {
                let (next, retries) = &mut state.next[node as usize];
                let members = if retry {
                    *retries -= 1;
                    self.proposals[node as usize][*next - 1].clone()
                } else {
                    *next += 1;
                    *retries = if node == 0 { self.retries } else { 0 };
                    self.proposals[node as usize][*next - 1].clone()
                };
                state.proposed.insert(members.clone());
                state.nodes[node as usize].propose(members, &mut Reporter(node));
                state.settle(node);
            }
            Action::Crash(node, lose_sent) => {
                state.crashed = Some(node);
                if lose_sent {
                    state.net.retain(|&(from, _), _| from != node);
                }
                // Nothing reaches a crashed node any more.
                state.net.retain(|&(_, to), _| to != node);
            }
        }
        Some(state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("one decision per epoch", |_, s: &State| {
                let mut decided: BTreeMap<Epoch, (&BTreeSet<NodeId>, &Plan)> = BTreeMap::new();
                s.installs.iter().all(|(_, view, plan)| {
                    *decided.entry(view.epoch).or_insert((&view.members, plan))
                        == (&view.members, plan)
                })
            }),
            Property::always(
                "plans come from a majority of the view before, and every member that stays",
                |_, s: &State| {
                    s.installs.iter().all(|(_, view, plan)| {
                        let Some(before) = s.views.get(&(view.epoch - 1)) else {
                            return false;
                        };
                        let staying = view.members.intersection(before);
                        plan.keys().all(|reporter| before.contains(reporter))
                            && plan.len() > before.len() / 2
                            && staying.into_iter().all(|m| plan.contains_key(m))
                    })
                },
            ),
            Property::always("installed members were proposed", |_, s: &State| {
                s.installs
                    .iter()
                    .all(|(_, view, _)| s.proposed.contains(&view.members))
            }),
            Property::always("members install in epoch order", |_, s: &State| {
                s.nodes
                    .iter()
                    .all(|node| s.views.get(&node.current().epoch) == Some(&node.current().members))
            }),
            Property::sometimes("a view is installed", |_, s: &State| !s.installs.is_empty()),
            Property::sometimes("two views are installed", |_, s: &State| {
                s.views.contains_key(&2)
            }),
        ]
    }
}
