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
//! Who proposes, and when, is the driver's choice (a failure detector suspects a member, a node
//! asks to join): [`Member::propose`] is an input like any other. A proposal that stalls
//! (a member it keeps does not answer) is retried with [`Member::propose`], with fewer members
//! if need be.

use std::collections::{BTreeSet, VecDeque};

use crate::protocol::{Event, Output, Plan, Protocol, Rejected, Report};
use crate::transport::NodeId;
use crate::view::{Epoch, Proposal, View, ViewMessage, ViewOutput, Views};
use crate::wire::Message;

/// A message of the view change, carrying reports and the token recreation plan.
pub type ViewChange = ViewMessage<Report, Plan>;

/// What one member sends another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Token protocol, valid only within the sender's epoch.
    Token(Message),
    /// View change, which names its own epoch.
    View(ViewChange),
}

/// A message stamped with the epoch its sender was in when it sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Envelope {
    /// The sender's epoch.
    pub epoch: Epoch,
    /// The message.
    pub traffic: Traffic,
}

/// One output of [`Member::poll_output`], in the order the driver must act on them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum MemberOutput {
    /// A token-protocol event (readability, completions), as [`Output::Event`].
    Event(Event),
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
    views: Views<Report, Plan>,
    /// Token messages dropped because they belonged to an epoch that was over here.
    fenced: u64,
    outputs: VecDeque<MemberOutput>,
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
        Member {
            views: Views::new(id, view),
            protocol,
            fenced: 0,
            outputs: VecDeque::new(),
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
    /// protocol; its outputs are stamped with the current epoch.
    pub fn operate<R>(&mut self, operation: impl FnOnce(&mut Protocol) -> R) -> R {
        let result = operation(&mut self.protocol);
        self.take_protocol_outputs();
        result
    }

    /// Proposes `members` as the next view (see [`Views::propose`]); this member freezes.
    pub fn propose(&mut self, members: BTreeSet<NodeId>) {
        self.views.propose(members, &mut self.protocol);
        self.take_view_outputs();
    }

    /// One envelope from `from`.
    pub fn handle(&mut self, from: NodeId, envelope: Envelope) -> Result<(), Rejected> {
        let current = self.views.current().epoch;
        match envelope.traffic {
            Traffic::View(message) => {
                self.views.handle(from, message, &mut self.protocol);
                self.take_view_outputs();
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
                self.take_protocol_outputs();
                handled?;
            }
        }
        Ok(())
    }

    /// The next output to act on.
    pub fn poll_output(&mut self) -> Option<MemberOutput> {
        self.outputs.pop_front()
    }

    fn take_protocol_outputs(&mut self) {
        let epoch = self.views.current().epoch;
        while let Some(output) = self.protocol.poll_output() {
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

    fn take_view_outputs(&mut self) {
        // The report froze the protocol: its readability changes go first.
        self.take_protocol_outputs();
        while let Some(output) = self.views.poll_output() {
            match output {
                ViewOutput::Send { to, message } => self.send_view(to, message),
                ViewOutput::Frozen => {}
                ViewOutput::Installed { view, plan } => {
                    // The decision reaches every member before any token traffic of its epoch.
                    let id = self.protocol.id();
                    for &to in view.members.iter().filter(|&&m| m != id) {
                        let decided = ViewMessage::Decided {
                            epoch: view.epoch - 1,
                            proposal: Proposal {
                                members: view.members.clone(),
                                plan: plan.clone(),
                            },
                        };
                        self.send_view(to, decided);
                    }
                    self.protocol.install(&view, &plan);
                    self.take_protocol_outputs();
                    self.outputs
                        .push_back(MemberOutput::Installed { view, plan });
                }
            }
        }
    }

    fn send_view(&mut self, to: NodeId, message: ViewChange) {
        let envelope = Envelope {
            epoch: self.views.current().epoch,
            traffic: Traffic::View(message),
        };
        self.outputs.push_back(MemberOutput::Send { to, envelope });
    }
}
