//! Views: which nodes are members, decided one epoch at a time by single-decree Paxos.
//!
//! A view is `(epoch, members)`. The next view (a joiner added, a leaver or a failed member
//! removed) is one consensus decision among the members of the current one: any member may
//! propose, a majority of the current members must accept, so two sides of a partition never
//! both install a successor, and a decision survives the crash of its proposer (a later
//! proposer finds it in the promises and proposes it again).
//!
//! A proposal also waits for the promise of every current member it keeps, so that no member
//! of the new view still acts in the old epoch once the new one may be decided; a member that
//! does not answer can only be left out (the proposer retries without it).
//!
//! The decision carries more than the members: a [`Proposal`]'s `plan` is made by the
//! proposer from the reports of the majority that promised (for the token protocol: what each
//! member holds of every object, from which the new epoch recreates the tokens). A member that
//! promises hands in its report and is [`ViewOutput::Frozen`]: it must not act in its epoch any
//! more (no token moves, no write), so the plan cannot miss anything that happened after the
//! report. It thaws only by installing the next view.
//!
//! Sans-IO like [`crate::protocol::Protocol`]: [`Views::propose`] and [`Views::handle`] are
//! the inputs, [`Views::poll_output`] the outputs; no clock (whoever drives it retries a
//! proposal that stalls, with a higher ballot), no thread, and the state is
//! `Clone + Eq + Hash` for the model checker.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;

use crate::transport::NodeId;

/// Numbers the views: each decision makes the next epoch.
pub type Epoch = u64;

/// Who is a member, from which epoch on.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct View {
    /// The view's number; the founding view has epoch 0.
    pub epoch: Epoch,
    /// The members; decisions about the next view need a majority of them.
    pub members: BTreeSet<NodeId>,
}

impl View {
    /// How many members make a majority.
    pub fn majority(&self) -> usize {
        self.members.len() / 2 + 1
    }
}

/// Orders the attempts to decide one epoch: a higher ballot supersedes a lower one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ballot {
    /// The attempt's round; a proposer that finds a higher one retries above it.
    pub round: u64,
    /// The proposer, so two proposers never share a ballot.
    pub node: NodeId,
}

/// What one decision installs: the next view's members and the plan made from the reports.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Proposal<P> {
    /// The members of the next view.
    pub members: BTreeSet<NodeId>,
    /// What the members do on installing it (the token recreation).
    pub plan: P,
}

/// The messages of the view change. `epoch` always names the current view whose successor is
/// being decided; only members of that view take part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ViewMessage<R, P> {
    /// Phase 1a: promise to ignore lower ballots, and report.
    Prepare {
        /// The view whose successor is decided.
        epoch: Epoch,
        /// The proposer's ballot.
        ballot: Ballot,
    },
    /// Phase 1b: the promise, with what was already accepted (which the proposer must
    /// propose again) and the sender's report.
    Promise {
        /// The view whose successor is decided.
        epoch: Epoch,
        /// The ballot promised.
        ballot: Ballot,
        /// The highest ballot accepted so far and its proposal.
        accepted: Option<(Ballot, Proposal<P>)>,
        /// The sender's state, frozen from now on.
        report: R,
    },
    /// Phase 2a: accept this proposal.
    Accept {
        /// The view whose successor is decided.
        epoch: Epoch,
        /// The proposer's ballot.
        ballot: Ballot,
        /// The proposal.
        proposal: Proposal<P>,
    },
    /// Phase 2b: the proposal of this ballot is accepted.
    Accepted {
        /// The view whose successor is decided.
        epoch: Epoch,
        /// The ballot accepted.
        ballot: Ballot,
    },
    /// The ballot is below one promised here: the proposer should retry above it.
    Refused {
        /// The view whose successor is decided.
        epoch: Epoch,
        /// The ballot promised here.
        promised: Ballot,
    },
    /// The successor of view `epoch` is decided: install it.
    Decided {
        /// The view whose successor was decided.
        epoch: Epoch,
        /// The decision.
        proposal: Proposal<P>,
    },
}

/// What the node driving a [`Views`] must do, in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ViewOutput<R, P> {
    /// Send `message` to `to`.
    Send {
        /// The destination.
        to: NodeId,
        /// The message.
        message: ViewMessage<R, P>,
    },
    /// This node promised to take part in deciding the next view and handed in its report:
    /// it must not act in the current epoch any more.
    Frozen,
    /// A new view is decided; this node is a member of it unless the members say otherwise.
    Installed {
        /// The new view.
        view: View,
        /// The plan decided with it.
        plan: P,
    },
}

/// What the view change needs from the rest of the node: its report when it promises, and,
/// when it proposes, the plan made from a majority's reports (for the token protocol: the
/// token recreation).
pub trait Recreation<R, P> {
    /// This node's report; from now on it does not act in the current epoch.
    fn report(&mut self) -> R;
    /// The plan for the view after `view`, whose members will be `members`, from the reports
    /// of a majority of `view`'s members.
    fn plan(&self, view: &View, members: &BTreeSet<NodeId>, reports: &BTreeMap<NodeId, R>) -> P;
    /// Whether this node may accept `members` as the view after `view` now. Leases say no
    /// while a grant to a member it removes still binds: the proposer retries later.
    fn accepts(&self, view: &View, members: &BTreeSet<NodeId>) -> bool {
        let _ = (view, members);
        true
    }
}

/// A proposal accepted, with the ballot it was accepted in.
type Accepted<P> = Option<(Ballot, Proposal<P>)>;

/// The proposer's progress.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Phase<R, P> {
    /// Collecting promises (and reports) from a majority.
    Preparing {
        /// Who promised, what each had accepted and reported.
        promises: BTreeMap<NodeId, (Accepted<P>, R)>,
    },
    /// Collecting acceptances of `proposal` from a majority.
    Accepting {
        proposal: Proposal<P>,
        accepted: BTreeSet<NodeId>,
    },
}

/// A proposal this node drives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Proposing<R, P> {
    ballot: Ballot,
    /// The members this node wants next (used unless a proposal was accepted already).
    members: BTreeSet<NodeId>,
    phase: Phase<R, P>,
}

/// One node's part in deciding views: acceptor of its current view's successor, and proposer
/// when asked to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Views<R, P> {
    id: NodeId,
    current: View,
    /// The decision that made the current view, to tell members that missed it.
    made_by: Option<Proposal<P>>,
    /// The highest ballot promised for deciding the current view's successor.
    promised: Option<Ballot>,
    /// The highest ballot accepted for it, with its proposal.
    accepted: Option<(Ballot, Proposal<P>)>,
    /// The highest round seen in this epoch, so a new ballot goes above it.
    highest_round: u64,
    proposing: Option<Proposing<R, P>>,
    /// Not a member of any view yet: waits for a decision that takes it in.
    outsider: bool,
    outputs: VecDeque<ViewOutput<R, P>>,
}

impl<R, P> Views<R, P>
where
    R: Clone + Debug + Eq + Hash,
    P: Clone + Debug + Eq + Hash,
{
    /// A node `id` of view `current` (which need not contain it: a node that is not a member
    /// only learns decisions).
    pub fn new(id: NodeId, current: View) -> Self {
        Views {
            id,
            current,
            made_by: None,
            promised: None,
            accepted: None,
            highest_round: 0,
            proposing: None,
            outsider: false,
            outputs: VecDeque::new(),
        }
    }

    /// A node `id` that asked to join a running cluster: it takes part in nothing until a
    /// decision that names it reaches it, and installs that view whatever its epoch.
    pub fn outsider(id: NodeId) -> Self {
        let nobody = View {
            epoch: 0,
            members: BTreeSet::new(),
        };
        Views {
            outsider: true,
            ..Views::new(id, nobody)
        }
    }

    /// Whether this node still waits for the view that takes it in.
    pub fn is_outsider(&self) -> bool {
        self.outsider
    }

    /// The view installed here.
    pub fn current(&self) -> &View {
        &self.current
    }

    /// Whether this node promised a ballot for the next view, so it must not act in the
    /// current one.
    pub fn frozen(&self) -> bool {
        self.promised.is_some()
    }

    /// The next output to act on.
    pub fn poll_output(&mut self) -> Option<ViewOutput<R, P>> {
        self.outputs.pop_front()
    }

    /// Proposes `members` as the next view, with a ballot above every one seen in this epoch
    /// (so calling it again is how a stalled proposal is retried). Only a member proposes.
    pub fn propose(&mut self, members: BTreeSet<NodeId>, node: &mut impl Recreation<R, P>) {
        if !self.current.members.contains(&self.id) {
            return;
        }
        self.highest_round += 1;
        let ballot = Ballot {
            round: self.highest_round,
            node: self.id,
        };
        self.proposing = Some(Proposing {
            ballot,
            members,
            phase: Phase::Preparing {
                promises: BTreeMap::new(),
            },
        });
        let epoch = self.current.epoch;
        for to in self.current.members.clone() {
            if to == self.id {
                self.on_prepare(self.id, epoch, ballot, node);
            } else {
                self.send(to, ViewMessage::Prepare { epoch, ballot });
            }
        }
    }

    /// Handles a message from `from` (a member of the current view; others are ignored).
    pub fn handle(
        &mut self,
        from: NodeId,
        message: ViewMessage<R, P>,
        node: &mut impl Recreation<R, P>,
    ) {
        if self.outsider {
            if let ViewMessage::Decided { epoch, proposal } = message {
                if proposal.members.contains(&self.id) {
                    self.outsider = false;
                    self.current.epoch = epoch;
                    self.install(proposal);
                }
            }
            return;
        }
        let epoch = match &message {
            ViewMessage::Prepare { epoch, .. }
            | ViewMessage::Promise { epoch, .. }
            | ViewMessage::Accept { epoch, .. }
            | ViewMessage::Accepted { epoch, .. }
            | ViewMessage::Refused { epoch, .. }
            | ViewMessage::Decided { epoch, .. } => *epoch,
        };
        if let ViewMessage::Decided { epoch, proposal } = &message {
            // A later decision without this node: it was removed for good (a node comes back
            // only as a new member), whatever decisions it missed in between.
            let later = *epoch > self.current.epoch;
            if later && !proposal.members.contains(&self.id) && self.current.members.contains(&from)
            {
                self.current.epoch = *epoch;
                self.install(proposal.clone());
                return;
            }
        }
        if epoch + 1 < self.current.epoch && !self.current.members.contains(&from) {
            // From a node removed more than one decision ago that has not heard of it: the
            // current view tells it (it is not in it).
            if let Some(proposal) = &self.made_by {
                if !matches!(message, ViewMessage::Decided { .. }) {
                    let (epoch, proposal) = (self.current.epoch - 1, proposal.clone());
                    self.send(from, ViewMessage::Decided { epoch, proposal });
                }
            }
            return;
        }
        if epoch + 1 == self.current.epoch {
            // About the decision that made this view: the sender missed it.
            if let Some(proposal) = &self.made_by {
                if !matches!(message, ViewMessage::Decided { .. }) {
                    let proposal = proposal.clone();
                    self.send(from, ViewMessage::Decided { epoch, proposal });
                }
            }
            return;
        }
        // Older: fenced. Newer: this node missed a decision; whoever is ahead answers its next
        // message with the decision it needs (above). Strangers take no part, except that a
        // node the decision took in passes it on like any member of the new view.
        let known = match &message {
            ViewMessage::Decided { proposal, .. } => {
                self.current.members.contains(&from) || proposal.members.contains(&from)
            }
            _ => self.current.members.contains(&from),
        };
        if epoch != self.current.epoch || !known {
            return;
        }
        match message {
            ViewMessage::Prepare { ballot, .. } => self.on_prepare(from, epoch, ballot, node),
            ViewMessage::Promise {
                ballot,
                accepted,
                report,
                ..
            } => self.on_promise(from, ballot, accepted, report, node),
            ViewMessage::Accept {
                ballot, proposal, ..
            } => self.on_accept(from, epoch, ballot, proposal, node),
            ViewMessage::Accepted { ballot, .. } => self.on_accepted(from, ballot),
            ViewMessage::Refused { promised, .. } => self.on_refused(promised),
            ViewMessage::Decided { proposal, .. } => self.install(proposal),
        }
    }

    /// A member promised a higher ballot: this proposal cannot succeed; the caller may retry
    /// with [`Views::propose`], which goes above it.
    fn on_refused(&mut self, promised: Ballot) {
        self.highest_round = self.highest_round.max(promised.round);
        if self.proposing.as_ref().is_some_and(|p| p.ballot < promised) {
            self.proposing = None;
        }
    }

    fn send(&mut self, to: NodeId, message: ViewMessage<R, P>) {
        self.outputs.push_back(ViewOutput::Send { to, message });
    }

    /// Sends to `to`, or handles at once when `to` is this node.
    fn reply(&mut self, to: NodeId, message: ViewMessage<R, P>, node: &mut impl Recreation<R, P>) {
        if to != self.id {
            self.send(to, message);
            return;
        }
        match message {
            ViewMessage::Promise {
                ballot,
                accepted,
                report,
                ..
            } => self.on_promise(to, ballot, accepted, report, node),
            ViewMessage::Accepted { ballot, .. } => self.on_accepted(to, ballot),
            ViewMessage::Refused { promised, .. } => self.on_refused(promised),
            ViewMessage::Prepare { .. }
            | ViewMessage::Accept { .. }
            | ViewMessage::Decided { .. } => {
                debug_assert!(false, "only answers are replies");
            }
        }
    }

    /// Promises `ballot` unless a higher one was promised (then `from` hears of that one).
    /// The first promise of an epoch freezes this node.
    fn promise(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        ballot: Ballot,
        node: &mut impl Recreation<R, P>,
    ) -> bool {
        self.highest_round = self.highest_round.max(ballot.round);
        if let Some(promised) = self.promised.filter(|&promised| promised > ballot) {
            self.reply(from, ViewMessage::Refused { epoch, promised }, node);
            return false;
        }
        if self.promised.is_none() {
            self.outputs.push_back(ViewOutput::Frozen);
        }
        self.promised = Some(ballot);
        true
    }

    fn on_prepare(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        ballot: Ballot,
        node: &mut impl Recreation<R, P>,
    ) {
        if !self.promise(from, epoch, ballot, node) {
            return;
        }
        let accepted = self.accepted.clone();
        let report = node.report();
        self.reply(
            from,
            ViewMessage::Promise {
                epoch,
                ballot,
                accepted,
                report,
            },
            node,
        );
    }

    fn on_promise(
        &mut self,
        from: NodeId,
        ballot: Ballot,
        accepted: Option<(Ballot, Proposal<P>)>,
        report: R,
        node: &mut impl Recreation<R, P>,
    ) {
        let majority = self.current.majority();
        let Some(proposing) = self.proposing.as_mut() else {
            return;
        };
        if proposing.ballot != ballot {
            return;
        }
        let Phase::Preparing { promises } = &mut proposing.phase else {
            return;
        };
        promises.insert(from, (accepted, report));
        // Every member that stays must have promised too: then none of them still serves
        // the old epoch once the new one is decided (only removed members may, and they can
        // no longer complete a write that needs copies).
        let current = &self.current.members;
        let staying = proposing.members.iter().filter(|m| current.contains(m));
        if promises.len() < majority || !staying.clone().all(|m| promises.contains_key(m)) {
            return;
        }
        // A proposal some member accepted may have been decided: only it may be proposed.
        let adopted = promises
            .values()
            .filter_map(|(accepted, _)| accepted.as_ref())
            .max_by_key(|(ballot, _)| *ballot)
            .map(|(_, proposal)| proposal.clone());
        let proposal = adopted.unwrap_or_else(|| {
            let reports = promises
                .iter()
                .map(|(node, (_, report))| (*node, report.clone()))
                .collect();
            Proposal {
                members: proposing.members.clone(),
                plan: node.plan(&self.current, &proposing.members, &reports),
            }
        });
        proposing.phase = Phase::Accepting {
            proposal: proposal.clone(),
            accepted: BTreeSet::new(),
        };
        let (epoch, ballot) = (self.current.epoch, proposing.ballot);
        for to in self.current.members.clone() {
            let accept = ViewMessage::Accept {
                epoch,
                ballot,
                proposal: proposal.clone(),
            };
            if to == self.id {
                self.on_accept(to, epoch, ballot, proposal.clone(), node);
            } else {
                self.send(to, accept);
            }
        }
    }

    fn on_accept(
        &mut self,
        from: NodeId,
        epoch: Epoch,
        ballot: Ballot,
        proposal: Proposal<P>,
        node: &mut impl Recreation<R, P>,
    ) {
        if !node.accepts(&self.current, &proposal.members) {
            return;
        }
        if !self.promise(from, epoch, ballot, node) {
            return;
        }
        self.accepted = Some((ballot, proposal));
        self.reply(from, ViewMessage::Accepted { epoch, ballot }, node);
    }

    fn on_accepted(&mut self, from: NodeId, ballot: Ballot) {
        let majority = self.current.majority();
        let Some(proposing) = self.proposing.as_mut() else {
            return;
        };
        if proposing.ballot != ballot {
            return;
        }
        let Phase::Accepting { proposal, accepted } = &mut proposing.phase else {
            return;
        };
        accepted.insert(from);
        if accepted.len() < majority {
            return;
        }
        let proposal = proposal.clone();
        let epoch = self.current.epoch;
        // Every old member learns it (a removed one learns it was removed), and every new one.
        let told: BTreeSet<NodeId> = self
            .current
            .members
            .union(&proposal.members)
            .copied()
            .filter(|&n| n != self.id)
            .collect();
        for to in told {
            self.send(
                to,
                ViewMessage::Decided {
                    epoch,
                    proposal: proposal.clone(),
                },
            );
        }
        self.install(proposal);
    }

    /// Moves to the next epoch.
    fn install(&mut self, proposal: Proposal<P>) {
        self.current = View {
            epoch: self.current.epoch + 1,
            members: proposal.members.clone(),
        };
        self.promised = None;
        self.accepted = None;
        self.highest_round = 0;
        self.proposing = None;
        self.outputs.push_back(ViewOutput::Installed {
            view: self.current.clone(),
            plan: proposal.plan.clone(),
        });
        self.made_by = Some(proposal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node whose report is its id, and whose plans list the reports they came from.
    struct Reporter(NodeId);

    impl Recreation<NodeId, Vec<NodeId>> for Reporter {
        fn report(&mut self) -> NodeId {
            self.0
        }

        fn plan(
            &self,
            _: &View,
            _: &BTreeSet<NodeId>,
            reports: &BTreeMap<NodeId, NodeId>,
        ) -> Vec<NodeId> {
            reports.values().copied().collect()
        }
    }

    type Node = Views<NodeId, Vec<NodeId>>;

    fn cluster(n: NodeId) -> Vec<Node> {
        let view = View {
            epoch: 0,
            members: (0..n).collect(),
        };
        (0..n).map(|id| Views::new(id, view.clone())).collect()
    }

    /// Delivers every message until none is left, except to and from `cut` nodes; returns the
    /// installations and freezes seen, per node.
    fn run(nodes: &mut [Node], cut: &[NodeId]) -> Vec<Vec<ViewOutput<NodeId, Vec<NodeId>>>> {
        let mut seen = vec![Vec::new(); nodes.len()];
        loop {
            let mut sent = Vec::new();
            for (id, node) in nodes.iter_mut().enumerate() {
                while let Some(output) = node.poll_output() {
                    match output {
                        ViewOutput::Send { to, message } => sent.push((id as NodeId, to, message)),
                        other => seen[id].push(other),
                    }
                }
            }
            if sent.is_empty() {
                return seen;
            }
            for (from, to, message) in sent {
                if cut.contains(&from) || cut.contains(&to) {
                    continue;
                }
                nodes[to as usize].handle(from, message, &mut Reporter(to));
            }
        }
    }

    fn members(ids: &[NodeId]) -> BTreeSet<NodeId> {
        ids.iter().copied().collect()
    }

    #[test]
    fn a_majority_removes_a_cut_off_member_and_the_plan_comes_from_its_reports() {
        let mut nodes = cluster(3);
        nodes[0].propose(members(&[0, 1]), &mut Reporter(0));
        let seen = run(&mut nodes, &[2]);
        for id in [0, 1] {
            assert_eq!(seen[id][0], ViewOutput::Frozen, "node {id} froze first");
            let ViewOutput::Installed { view, plan } = &seen[id][1] else {
                panic!("node {id} installed nothing: {:?}", seen[id]);
            };
            assert_eq!(
                view,
                &View {
                    epoch: 1,
                    members: members(&[0, 1])
                }
            );
            assert_eq!(plan, &vec![0, 1]);
            assert!(!nodes[id].frozen());
        }
        assert_eq!(
            nodes[2].current().epoch,
            0,
            "the cut-off node decided nothing"
        );
    }

    #[test]
    fn a_minority_decides_nothing() {
        let mut nodes = cluster(5);
        nodes[0].propose(members(&[0, 1]), &mut Reporter(0));
        run(&mut nodes, &[2, 3, 4]);
        assert!(nodes.iter().all(|n| n.current().epoch == 0));
        assert!(
            nodes[0].frozen() && nodes[1].frozen(),
            "they promised and stay frozen"
        );
    }

    #[test]
    fn a_member_that_missed_a_decision_learns_it_from_one_that_has_it() {
        let mut nodes = cluster(3);
        nodes[0].propose(members(&[0, 1, 2]), &mut Reporter(0));
        run(&mut nodes, &[2]);
        assert_eq!(nodes[2].current().epoch, 0);
        // Node 2 tries a change of its own in epoch 0; node 0 answers with the decision.
        nodes[2].propose(members(&[2]), &mut Reporter(2));
        run(&mut nodes, &[]);
        assert_eq!(nodes[2].current(), nodes[0].current());
        assert_eq!(nodes[2].current().epoch, 1);
    }

    #[test]
    fn a_removed_member_learns_it_was_removed() {
        let mut nodes = cluster(3);
        nodes[0].propose(members(&[0, 1]), &mut Reporter(0));
        let seen = run(&mut nodes, &[]);
        let installed = seen[2].iter().find_map(|o| match o {
            ViewOutput::Installed { view, .. } => Some(view.clone()),
            _ => None,
        });
        assert_eq!(
            installed,
            Some(View {
                epoch: 1,
                members: members(&[0, 1])
            })
        );
        // It is no longer a member: it cannot propose, and members ignore it.
        nodes[2].propose(members(&[2]), &mut Reporter(2));
        assert!(nodes[2].poll_output().is_none());
    }

    #[test]
    fn messages_of_an_older_epoch_and_from_strangers_are_ignored() {
        let mut nodes = cluster(3);
        nodes[0].propose(members(&[0, 1]), &mut Reporter(0));
        run(&mut nodes, &[2]);
        let stale = ViewMessage::Accept {
            epoch: 0,
            ballot: Ballot { round: 9, node: 2 },
            proposal: Proposal {
                members: members(&[2]),
                plan: vec![],
            },
        };
        // Node 2 is not a member of epoch 1; an epoch-0 message gets the decision as answer.
        nodes[1].handle(2, stale, &mut Reporter(1));
        assert!(matches!(
            nodes[1].poll_output(),
            Some(ViewOutput::Send {
                to: 2,
                message: ViewMessage::Decided { epoch: 0, .. }
            })
        ));
        assert_eq!(nodes[1].current().epoch, 1);
        let stranger = ViewMessage::Prepare {
            epoch: 1,
            ballot: Ballot { round: 1, node: 7 },
        };
        nodes[1].handle(7, stranger, &mut Reporter(1));
        assert!(nodes[1].poll_output().is_none());
        assert!(!nodes[1].frozen());
    }

    #[test]
    fn a_proposer_cut_off_during_a_decision_learns_it_when_it_retries() {
        let mut nodes = cluster(3);
        // Node 2 proposes, then retries above its own first ballot.
        nodes[2].propose(members(&[1, 2]), &mut Reporter(2));
        nodes[2].propose(members(&[1, 2]), &mut Reporter(2));
        let _ = run(&mut nodes, &[0]);
        assert_eq!(nodes[1].current().members, members(&[1, 2]));
        // Node 0 was cut off: it retries in epoch 0 and learns the decision instead.
        nodes[0].propose(members(&[0, 1]), &mut Reporter(0));
        run(&mut nodes, &[]);
        assert_eq!(nodes[0].current().members, members(&[1, 2]));
    }
}
