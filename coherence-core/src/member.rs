//! One member's whole sans-IO state: the token protocol of the current epoch, and the view
//! change that ends the epoch and recreates the tokens in the next one.
//!
//! Every message travels in an [`Envelope`] stamped with the sender's epoch. Token traffic of
//! an older epoch, or reaching a member that froze for a view change or was removed, is
//! dropped and counted ([`Member::fenced`]): its tokens belong to an epoch whose tokens the
//! next view recreates. A member that installs a view first sends the decision to every other
//! member of it, and only then its token traffic of the new epoch; with the transport's
//! per-pair FIFO, every member has installed a view before it hears anything of that view's
//! epoch, so token traffic from a newer epoch is refused ([`Rejected::FutureEpoch`]).
//!
//! Membership changes come in as inputs: the transport reports a node asking to join
//! ([`Member::admit`]) or a member it lost ([`Member::suspect`]), the user leaves
//! ([`Member::leave`]). [`Member::wanted`] says which view this member should propose now, if
//! any: the *coordinator* (the lowest-id member not suspected) proposes the current members
//! without the suspected ones and with the joiners, and a leaving member proposes the view
//! without itself. A join request reported to another member is handed on to the
//! coordinator ([`Traffic::Join`]). The coordinator gives joiners the next unused ids, and
//! the decision carries them with every member's [`Contact`] ([`Decision`]): admission is
//! decided here, and transports connect to the nodes the installed view names
//! ([`MemberOutput::Connect`]). The driver calls [`Member::propose_wanted`] after such an input and again
//! on a timer, which retries a proposal that stalled (its proposer crashed, or a member it
//! keeps did not answer and is suspected meanwhile). A node that joins starts as an outsider
//! ([`Member::joining`]) and becomes a member when a decision that names it arrives.
//!
//! With leases ([`Member::with_lease`], see [`crate::lease`]) a member serves a read (a read,
//! an open, the lock of an update) only while a majority of its view has granted it a lease;
//! otherwise the read ends as [`Outcome::NoMajority`]. Every input takes the time, which
//! only leases use: [`Member::tick`] renews them when due ([`Member::next_tick`]).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use crate::lease::{Lease, LeaseMessage, Leases};
use crate::protocol::{Event, Outcome, Output, Plan, Protocol, Rejected, Report};
use crate::transport::{Contact, NodeId};
use crate::view::{Proposal, Recreation, View, ViewMessage, ViewOutput, Views};
use crate::wire::{Envelope, Traffic, ViewChange};

/// Join requests the coordinator keeps at most: a flood of requests (from a holder of the
/// cluster's secret) cannot grow it further; the joiners beyond retry their requests.
const MAX_JOINERS: usize = 64;

/// What one view change decides besides the members.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Decision {
    /// Each object's value and tokens in the new epoch.
    pub recreation: Plan,
    /// How each member of the new view is reached, for transports that connect to them (for
    /// those that need none, as threads and MPI ranks, it is empty).
    pub contacts: BTreeMap<NodeId, Contact>,
    /// The lowest id no node had so far: the next joiners' ids start there, so an id is never
    /// given twice (a node that comes back joins as a new one).
    pub next_id: NodeId,
}

/// One output of [`Member::poll_output`], in the order the driver must act on them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MemberOutput {
    /// A token-protocol event (readability, completions), as [`Output::Event`].
    Event(Event),
    /// A view that names this node is being installed: the transport connects to its members
    /// at these contacts (this node's own among them). Comes before
    /// anything is sent to a member of that view.
    Connect(BTreeMap<NodeId, Contact>),
    /// Send `envelope` to `to`.
    Send {
        /// The destination.
        to: NodeId,
        /// The stamped message.
        envelope: Envelope,
    },
    /// A view was installed here with the token recreation it decided; this node is removed
    /// if it is not among the members.
    Installed {
        /// The view.
        view: View,
        /// Each object's value in the new epoch.
        plan: Plan,
    },
}

/// A member: the token protocol of its current view, and that view's successor in the making.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    protocol: Protocol,
    views: Views<Report, Decision>,
    /// How the members of the current view are reached (see [`Decision::contacts`]).
    contacts: BTreeMap<NodeId, Contact>,
    /// The lowest id not given yet (see [`Decision::next_id`]).
    next_id: NodeId,
    /// The members of the view installed here last, to tell those the next view removes.
    installed_members: BTreeSet<NodeId>,
    /// Token messages dropped because they belonged to an epoch that was over here.
    fenced: u64,
    /// Nodes the transport reported lost: no view takes them (back) in. Kept after they are
    /// removed: a joiner lost before the view that takes it in was decided is removed by the
    /// next one. (Ids are never reused: a node that comes back joins with a new id.)
    suspected: BTreeSet<NodeId>,
    /// Coordinator only: nodes asking to join, by incarnation; the next view takes them in,
    /// under the ids [`Member::admissions`] gives them.
    joiners: BTreeMap<u64, Contact>,
    /// This member asked to leave: it proposes the view without itself until one is decided.
    leaving: bool,
    /// The leases this member gives others and, if it serves reads only under one, holds.
    leases: Leases,
    outputs: VecDeque<MemberOutput>,
}

/// The protocol as the view change sees it, with the leases that may hold back an acceptance
/// and what a proposal decides about contacts and ids.
struct Seat<'a> {
    protocol: &'a mut Protocol,
    leases: &'a Leases,
    now: Instant,
    contacts: &'a BTreeMap<NodeId, Contact>,
    /// The joiners a proposal of this member takes in, under their new ids.
    admissions: BTreeMap<NodeId, Contact>,
    next_id: NodeId,
}

impl Recreation<Report, Decision> for Seat<'_> {
    fn report(&mut self) -> Report {
        self.protocol.report()
    }

    fn plan(
        &self,
        view: &View,
        members: &BTreeSet<NodeId>,
        reports: &BTreeMap<NodeId, Report>,
    ) -> Decision {
        let contacts = members
            .iter()
            .filter_map(|m| {
                let contact = self.contacts.get(m).or_else(|| self.admissions.get(m));
                contact.map(|c| (*m, c.clone()))
            })
            .collect();
        let after_members = members.last().map_or(0, |m| m.saturating_add(1));
        Decision {
            recreation: self.protocol.plan(view, members, reports),
            contacts,
            next_id: self.next_id.max(after_members),
        }
    }

    fn accepts(&self, view: &View, members: &BTreeSet<NodeId>) -> bool {
        self.leases.accepts(view, members, self.now)
    }
}

impl Member {
    /// A member of `view` running `protocol`, whose peers become the view's other members.
    pub fn new(protocol: Protocol, view: View) -> Self {
        let mut protocol = protocol;
        let id = protocol.id();
        for &peer in &view.members {
            if peer != id {
                protocol.peer_joined(peer);
            }
        }
        let next_id = view.members.last().map_or(0, |m| m.saturating_add(1));
        Member {
            installed_members: view.members.clone(),
            views: Views::new(id, view),
            protocol,
            contacts: BTreeMap::new(),
            next_id,
            fenced: 0,
            suspected: BTreeSet::new(),
            joiners: BTreeMap::new(),
            leaving: false,
            leases: Leases::new(None),
            outputs: VecDeque::new(),
        }
    }

    /// A founding member whose transport is reached at `contact`: the founding view names it,
    /// so the decisions that take joiners in tell them how to reach it.
    pub fn with_contact(mut self, contact: Contact) -> Self {
        self.contacts.insert(self.protocol.id(), contact);
        self
    }

    /// Serves reads only under a lease whose grants bind for `duration` (see
    /// [`crate::lease`]): for members that may be cut off from each other while they run.
    pub fn with_lease(mut self, duration: Duration) -> Self {
        self.leases = Leases::new(Some(duration));
        self.leases
            .installed(self.views.current(), self.protocol.id());
        self
    }

    /// How long this member may serve reads.
    pub fn lease(&self) -> Lease {
        self.leases.until()
    }

    /// When [`Member::tick`] has lease requests to send next (`None`: no leases, or nothing
    /// to renew now because the member is frozen, removed or not a member yet).
    pub fn next_tick(&self, now: Instant) -> Option<Instant> {
        (self.leases.holds() && self.renews()).then(|| self.leases.renew_at().unwrap_or(now))
    }

    fn renews(&self) -> bool {
        let id = self.protocol.id();
        !self.views.is_outsider()
            && !self.protocol.is_frozen()
            && !self.protocol.is_removed()
            && self.view().members.contains(&id)
    }

    /// Time passed: asks the other members for lease grants when due.
    pub fn tick(&mut self, now: Instant) {
        if !self.renews() {
            return;
        }
        let Some(request) = self.leases.renew(now) else {
            return;
        };
        let id = self.protocol.id();
        let others: Vec<NodeId> = self
            .view()
            .members
            .iter()
            .copied()
            .filter(|&m| m != id)
            .collect();
        for to in others {
            self.send_lease(to, request);
        }
    }

    /// A node joining a running cluster: it is no member (its operations wait) until the
    /// members decide a view that takes it in, which they do once their transports report it
    /// ([`Member::admit`]).
    pub fn joining(protocol: Protocol) -> Self {
        let id = protocol.id();
        Member {
            views: Views::outsider(id),
            ..Member::new(
                protocol,
                View {
                    epoch: 0,
                    members: BTreeSet::new(),
                },
            )
        }
    }

    /// A node reached at `contact` asks to join. The coordinator keeps the request, and the
    /// next view it proposes takes the node in under a new id; another member hands it on to
    /// the coordinator. A request of a member of the view (its incarnation admitted already)
    /// is a repeat and ignored, as is one while this member leaves. Returns whether the
    /// coordinator has a new joiner (a repeated request must not restart a view change under
    /// way: joiners ask again every [`crate::wait::JOIN_RETRY`]).
    pub fn admit(&mut self, contact: Contact) -> bool {
        let id = self.protocol.id();
        if self.views.is_outsider()
            || self.protocol.is_removed()
            || self.leaving
            || !self.view().members.contains(&id)
            || self
                .contacts
                .values()
                .any(|c| c.incarnation == contact.incarnation)
        {
            return false;
        }
        let Some(&coordinator) = self.view().members.difference(&self.suspected).next() else {
            return false;
        };
        if coordinator != id {
            let envelope = Envelope {
                epoch: self.views.current().epoch,
                traffic: Traffic::Join(contact),
            };
            self.outputs.push_back(MemberOutput::Send {
                to: coordinator,
                envelope,
            });
            return false;
        }
        if self.joiners.len() >= MAX_JOINERS || self.joiners.contains_key(&contact.incarnation) {
            return false;
        }
        self.joiners.insert(contact.incarnation, contact);
        true
    }

    /// The joiners a proposal of this member takes in now, under the ids they get: the next
    /// unused ones, in the order of their incarnations (any order would do: one proposal is
    /// decided, and a joiner learns its id from that decision). At most one fewer than the
    /// members that stay (one, for a member alone): should every joiner be dead, those
    /// members still make a majority of the new view and can remove them. A leaving member
    /// takes none in: it would not tell their transports where the others are.
    fn admissions(&self) -> BTreeMap<NodeId, Contact> {
        if self.leaving {
            return BTreeMap::new();
        }
        let staying = self.view().members.difference(&self.suspected).count();
        (self.next_id..)
            .zip(self.joiners.values().cloned())
            .take(staying.saturating_sub(1).max(1))
            .collect()
    }

    /// The transport lost `node`: the next view leaves it out (a joiner that is lost is no
    /// longer taken in). Its requests are forgotten at once, so no token goes there.
    pub fn suspect(&mut self, now: Instant, node: NodeId) {
        if node == self.protocol.id() {
            return;
        }
        self.suspected.insert(node);
        self.operate(now, |p| p.peer_left(node));
    }

    /// Leaves: this member proposes the view without itself (its report hands its values
    /// on) until it is removed, which [`MemberOutput::Installed`] without it tells.
    pub fn leave(&mut self) {
        self.leaving = true;
    }

    /// Whether the transport lost every other member of the current view.
    pub fn others_lost(&self) -> bool {
        let id = self.protocol.id();
        self.view()
            .members
            .iter()
            .all(|m| *m == id || self.suspected.contains(m))
    }

    /// Whether the transport lost a majority of the current view: since a lost node never
    /// speaks again, no view with this member can be decided any more (it was cut off or
    /// stalled past failure detection, and the others likely removed it; or a majority
    /// crashed). It can only join again as a new node.
    pub fn cut_off(&self) -> bool {
        let id = self.protocol.id();
        let view = self.view();
        !self.views.is_outsider()
            && !self.protocol.is_removed()
            && view.members.contains(&id)
            && view.members.difference(&self.suspected).count() < view.majority()
    }

    /// Whether this member asked to leave.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// The members this node should propose as the next view now, if any: the coordinator's
    /// view without suspected members and with the joiners when either differs from the
    /// current view or a view change is under way (it may have stalled); a leaving member's
    /// view without itself (also to learn, by the answers to its proposal, of a decision that
    /// removed it and did not reach it). Nothing while fewer than a majority of the view are
    /// unsuspected:
    /// no decision could be reached, and proposing would freeze this member for nothing.
    pub fn wanted(&self) -> Option<BTreeSet<NodeId>> {
        let id = self.protocol.id();
        let view = self.view();
        if self.views.is_outsider() || self.protocol.is_removed() || !view.members.contains(&id) {
            return None;
        }
        // Without a majority that may answer, a proposal could only freeze this member.
        let reachable = view.members.difference(&self.suspected).count();
        if reachable < view.majority() {
            return None;
        }
        let mut next: BTreeSet<NodeId> = view
            .members
            .difference(&self.suspected)
            .copied()
            .chain(self.admissions().into_keys())
            .collect();
        if self.leaving {
            next.remove(&id);
            return Some(next);
        }
        let coordinator = view.members.difference(&self.suspected).next() == Some(&id);
        let change = next != view.members || self.protocol.is_frozen();
        (coordinator && change).then_some(next)
    }

    /// Proposes [`Member::wanted`], if anything; returns whether it did.
    pub fn propose_wanted(&mut self, now: Instant) -> bool {
        match self.wanted() {
            Some(members) => {
                self.propose(now, members);
                true
            }
            None => false,
        }
    }

    /// The token protocol, to inspect.
    pub fn protocol(&self) -> &Protocol {
        &self.protocol
    }

    /// The view installed here.
    pub fn view(&self) -> &View {
        self.views.current()
    }

    /// Token messages dropped since this member started because their epoch was over here.
    pub fn fenced(&self) -> u64 {
        self.fenced
    }

    /// Runs a local operation (`open`, `read`, `write`, `lock`, `commit`, `cancel`) on the
    /// protocol at `now`; its outputs are stamped with the current epoch.
    pub fn operate<R>(&mut self, now: Instant, operation: impl FnOnce(&mut Protocol) -> R) -> R {
        let result = operation(&mut self.protocol);
        self.take_protocol_outputs(now);
        result
    }

    /// Proposes `members` as the next view (see [`Views::propose`]); this member freezes.
    /// [`Member::propose_wanted`] chooses the members by the rules above.
    pub fn propose(&mut self, now: Instant, members: BTreeSet<NodeId>) {
        self.seated(now, |views, seat| views.propose(members, seat));
    }

    /// Runs `act` on the view protocol with this member's seat in it, then takes its outputs
    /// (messages to send, views to install). One place builds the seat: it borrows the
    /// member's fields apart from `views`.
    fn seated(&mut self, now: Instant, act: impl FnOnce(&mut Views<Report, Decision>, &mut Seat)) {
        let admissions = self.admissions();
        let mut seat = Seat {
            protocol: &mut self.protocol,
            leases: &self.leases,
            now,
            contacts: &self.contacts,
            admissions,
            next_id: self.next_id,
        };
        act(&mut self.views, &mut seat);
        self.take_view_outputs(now);
    }

    /// One envelope from `from`, at `now`.
    pub fn handle(
        &mut self,
        now: Instant,
        from: NodeId,
        envelope: Envelope,
    ) -> Result<(), Rejected> {
        let current = self.views.current().epoch;
        match envelope.traffic {
            Traffic::View(message) => {
                if freezes_sender(&message, current) {
                    self.leases.froze(from);
                }
                self.seated(now, |views, seat| views.handle(from, *message, seat));
            }
            Traffic::Lease(message) => self.handle_lease(now, from, envelope.epoch, message),
            Traffic::Join(contact) => {
                // The driver's periodic check proposes the view with it.
                self.admit(contact);
            }
            Traffic::Token(_) if envelope.epoch > current => {
                return Err(Rejected::FutureEpoch {
                    epoch: envelope.epoch,
                    current,
                });
            }
            Traffic::Token(_)
                if envelope.epoch < current
                    || self.protocol.is_frozen()
                    || self.protocol.is_removed() =>
            {
                self.fenced += 1;
            }
            Traffic::Token(message) => {
                let handled = self.protocol.handle(from, message);
                self.take_protocol_outputs(now);
                handled?;
            }
        }
        Ok(())
    }

    /// A lease request is granted to a member of the same view by a member not frozen; a
    /// grant of this epoch extends this member's lease. Anything else is ignored: leases of
    /// another epoch mean nothing here.
    fn handle_lease(&mut self, now: Instant, from: NodeId, epoch: u64, message: LeaseMessage) {
        let id = self.protocol.id();
        let view = self.views.current();
        let frozen = self.protocol.is_frozen() || self.protocol.is_removed();
        let leases = &mut self.leases;
        if epoch != view.epoch || !view.members.contains(&from) || !view.members.contains(&id) {
            return;
        }
        match message {
            LeaseMessage::Request { sent, millis } => {
                if leases.grant(from, millis, now, frozen) {
                    self.send_lease(from, LeaseMessage::Grant { sent });
                }
            }
            LeaseMessage::Grant { sent } => leases.granted_by(from, sent, now, view, id),
        }
    }

    /// The next output to act on.
    pub fn poll_output(&mut self) -> Option<MemberOutput> {
        self.outputs.pop_front()
    }

    fn take_protocol_outputs(&mut self, now: Instant) {
        let epoch = self.views.current().epoch;
        while let Some(output) = self.protocol.poll_output() {
            let output = match output {
                Output::Event(Event::Completed { op, outcome }) => {
                    let outcome = self.served(now, op, outcome);
                    Output::Event(Event::Completed { op, outcome })
                }
                output => output,
            };
            self.outputs.push_back(match output {
                Output::Event(event) => MemberOutput::Event(event),
                Output::Send { to, message } => MemberOutput::Send {
                    to,
                    envelope: Envelope {
                        epoch,
                        traffic: Traffic::Token(message),
                    },
                },
            });
        }
    }

    /// A read (a read, an open, an update's lock) ends as [`Outcome::NoMajority`] when the
    /// lease does not hold at `now`: the value may be one a majority has replaced since. A
    /// lock is released unchanged.
    fn served(&mut self, now: Instant, op: u64, outcome: Outcome) -> Outcome {
        let read = matches!(
            outcome,
            Outcome::Read(_) | Outcome::Opened(_) | Outcome::Granted(_)
        );
        if !read || self.lease().holds_at(now) {
            return outcome;
        }
        if matches!(outcome, Outcome::Granted(_)) {
            self.protocol.commit(op, None);
        }
        Outcome::NoMajority
    }

    fn take_view_outputs(&mut self, now: Instant) {
        // The report froze the protocol: its readability changes go first.
        self.take_protocol_outputs(now);
        let outputs: Vec<_> = std::iter::from_fn(|| self.views.poll_output()).collect();
        // The transport can reach a new member before anything goes to it (a proposer sends
        // the decision before it installs the view).
        let id = self.protocol.id();
        for output in &outputs {
            if let ViewOutput::Installed { view, plan } = output {
                if view.members.contains(&id) {
                    self.contacts = plan.contacts.clone();
                    self.outputs
                        .push_back(MemberOutput::Connect(plan.contacts.clone()));
                }
            }
        }
        for output in outputs {
            match output {
                ViewOutput::Send { to, message } => self.send_view(to, message),
                ViewOutput::Frozen => {}
                ViewOutput::Installed {
                    view,
                    plan: decision,
                } => {
                    self.next_id = decision.next_id;
                    self.joiners.retain(|incarnation, _| {
                        !decision
                            .contacts
                            .values()
                            .any(|c| c.incarnation == *incarnation)
                    });
                    // The decision reaches every member before any token traffic of its epoch,
                    // and every member it removes: the proposer may not reach them all (a
                    // partition), and a removed node that does not learn it serves nothing
                    // but keeps waiting.
                    let told: BTreeSet<NodeId> = view
                        .members
                        .union(&self.installed_members)
                        .copied()
                        .filter(|&m| m != id)
                        .collect();
                    self.installed_members = view.members.clone();
                    for to in told {
                        let decided = ViewMessage::Decided {
                            epoch: view.epoch - 1,
                            proposal: Proposal {
                                members: view.members.clone(),
                                plan: decision.clone(),
                            },
                        };
                        self.send_view(to, decided);
                    }
                    let plan = decision.recreation;
                    self.leases.installed(&view, id);
                    self.protocol.install(&view, &plan);
                    self.tick(now);
                    self.take_protocol_outputs(now);
                    self.outputs
                        .push_back(MemberOutput::Installed { view, plan });
                }
            }
        }
    }

    fn send_lease(&mut self, to: NodeId, message: LeaseMessage) {
        let envelope = Envelope {
            epoch: self.views.current().epoch,
            traffic: Traffic::Lease(message),
        };
        self.outputs.push_back(MemberOutput::Send { to, envelope });
    }

    fn send_view(&mut self, to: NodeId, message: ViewChange) {
        let envelope = Envelope {
            epoch: self.views.current().epoch,
            traffic: Traffic::View(Box::new(message)),
        };
        self.outputs.push_back(MemberOutput::Send { to, envelope });
    }
}

/// Whether `message`, of epoch `current`, shows that its sender promised a ballot for the next
/// view, so it froze and serves nothing more in this epoch: a proposer's `Prepare` and
/// `Accept` (it promised its own ballot), a `Promise`, an `Accepted`, a `Refused`.
fn freezes_sender(message: &ViewChange, current: u64) -> bool {
    match message {
        ViewMessage::Prepare { epoch, .. }
        | ViewMessage::Promise { epoch, .. }
        | ViewMessage::Accept { epoch, .. }
        | ViewMessage::Accepted { epoch, .. }
        | ViewMessage::Refused { epoch, .. } => *epoch == current,
        ViewMessage::Decided { .. } => false,
    }
}
