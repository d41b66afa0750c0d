//! Leases: how long a member may serve reads from the tokens it holds without hearing from a
//! majority of its view.
//!
//! A member cut off from the majority (a partition, a stall) still holds tokens, and the
//! majority may remove it and recreate those tokens elsewhere; reading them after that would
//! return a value a newer write replaced. So every member asks the others of its view for a
//! *grant* every quarter of the lease duration. A member that grants promises not to accept a
//! view that removes the asker until `duration` has passed on its own clock. Once a majority
//! (counting the asker) granted requests sent at time `t` or later, no view without the asker
//! can be decided before `t + duration` in real time, because the decision needs a majority of
//! acceptances, and that majority includes a grantor. The asker serves until
//! `t + duration * HOLD_SHARE` by its own clock: the share covers clocks that run at different
//! rates, by up to [`MAX_CLOCK_DRIFT`] each (the assumption this rests on: monotonic clocks,
//! rates within 1% of real time, which any working machine keeps by far).
//!
//! Grants outlive a view change: a grantor keeps honouring its grants to members of the new
//! view, so a member keeps the grants of the new view's members (a majority of the *new* view
//! must have granted). A member grants nothing while frozen for a view change (it may have
//! accepted a view without the asker already). A member that sent a view-change message of
//! the current epoch froze for it and serves nothing until the next view: its grants stop
//! binding in this epoch, so a member that leaves is not held back by them.
//!
//! Sans-IO and `Clone + Eq + Hash` like the rest of the member: time is an input.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::transport::NodeId;
use crate::view::View;

/// The longest a grant binds, whatever the asker asks for: a member asking for more (a
/// misconfiguration) could otherwise keep the others from ever removing it.
pub const MAX_GRANT: Duration = Duration::from_secs(60);

/// How far a clock's rate may be from real time, as a fraction (1%).
pub const MAX_CLOCK_DRIFT: f64 = 0.01;

/// The share of a grant's duration its holder serves for: the grantor's clock may run fast
/// and the holder's slow, by [`MAX_CLOCK_DRIFT`] each, so `(1 - d) / (1 + d)`, rounded down.
pub const HOLD_SHARE: f64 = 0.98;

/// The messages of leases; the envelope's epoch says which view they belong to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LeaseMessage {
    /// Asks for a grant; `sent` is the asker's stamp of when it asked.
    Request {
        /// The asker's clock when it asked, in its own units (echoed back).
        sent: u64,
        /// How long the grant is to bind, in milliseconds: the asker's lease duration (a
        /// member that holds no lease itself still grants, for as long as asked).
        millis: u64,
    },
    /// Grants the request stamped `sent`: the grantor accepts no view without the asker for
    /// the lease duration from when it granted.
    Grant {
        /// The stamp of the request granted.
        sent: u64,
    },
}

/// How long this member may serve reads, from [`Leases::until`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lease {
    /// Without bound: leases are off, or this member is a majority on its own.
    Unbounded,
    /// Until this instant (in the past once it expired).
    Until(Instant),
    /// Not at all: no majority granted a lease in this epoch yet.
    Expired,
}

impl Lease {
    /// Whether the member may serve reads at `now`.
    pub fn holds_at(&self, now: Instant) -> bool {
        match self {
            Lease::Unbounded => true,
            Lease::Until(until) => now < *until,
            Lease::Expired => false,
        }
    }
}

/// A member's leases: those it holds (grants it received) and those it gave.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leases {
    /// How long this member's grants bind their grantors; `None`: it serves without a lease
    /// (its members fail together), and only grants.
    duration: Option<Duration>,
    /// Stamps are nanoseconds since this instant (the first time this member was given).
    base: Option<Instant>,
    /// Per grantor, when the request it answered last in this epoch was sent.
    held: BTreeMap<NodeId, Instant>,
    /// Per asker, until when this member accepts no view without it.
    granted: BTreeMap<NodeId, Instant>,
    /// Members that froze for a view change in this epoch: they serve nothing more in it, so
    /// grants to them do not bind.
    frozen: BTreeSet<NodeId>,
    /// When the next requests are due; `None` right after a view was installed (at once).
    renew_at: Option<Instant>,
    /// What [`Leases::until`] returns, computed when grants or the view change.
    until: Lease,
}

impl Leases {
    /// Leases whose grants bind for `duration`, or (`None`) only the grants this member gives.
    pub fn new(duration: Option<Duration>) -> Self {
        Leases {
            duration,
            base: None,
            held: BTreeMap::new(),
            granted: BTreeMap::new(),
            frozen: BTreeSet::new(),
            renew_at: None,
            until: if duration.is_some() {
                Lease::Expired
            } else {
                Lease::Unbounded
            },
        }
    }

    /// How long this member may serve reads.
    pub fn until(&self) -> Lease {
        self.until
    }

    /// When requests are due next (`None`: now).
    pub fn renew_at(&self) -> Option<Instant> {
        self.renew_at
    }

    /// Whether this member serves only under a lease.
    pub fn holds(&self) -> bool {
        self.duration.is_some()
    }

    /// The request to send if requests are due at `now`; the next ones are due a quarter of
    /// the duration later.
    pub fn renew(&mut self, now: Instant) -> Option<LeaseMessage> {
        let duration = self.duration?;
        if self.renew_at.is_some_and(|at| now < at) {
            return None;
        }
        self.renew_at = Some(now + duration / 4);
        let millis = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let sent = self.stamp(now);
        Some(LeaseMessage::Request { sent, millis })
    }

    fn stamp(&mut self, now: Instant) -> u64 {
        let base = *self.base.get_or_insert(now);
        u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// `asker`, a member of the same view, asks for a grant of `millis` (at most
    /// [`MAX_GRANT`]): given unless this member is frozen or the asker froze in this epoch.
    pub fn grant(&mut self, asker: NodeId, millis: u64, now: Instant, frozen_here: bool) -> bool {
        if frozen_here || self.frozen.contains(&asker) {
            return false;
        }
        let until = now + Duration::from_millis(millis).min(MAX_GRANT);
        let entry = self.granted.entry(asker).or_insert(until);
        *entry = (*entry).max(until);
        true
    }

    /// `grantor` answered the request stamped `sent`, in the current epoch of `view`.
    pub fn granted_by(
        &mut self,
        grantor: NodeId,
        sent: u64,
        now: Instant,
        view: &View,
        id: NodeId,
    ) {
        let Some(base) = self.base else {
            return;
        };
        // A stamp from the future could only come from a bug: never later than now.
        let at = (base + Duration::from_nanos(sent)).min(now);
        let entry = self.held.entry(grantor).or_insert(at);
        *entry = (*entry).max(at);
        self.recompute(view, id);
    }

    /// `node` sent a view-change message of the current epoch: it froze.
    pub fn froze(&mut self, node: NodeId) {
        self.frozen.insert(node);
    }

    /// Whether this member may accept a view of `members` after `view` at `now`: not while a
    /// grant to a member it removes still binds.
    pub fn accepts(&self, view: &View, members: &BTreeSet<NodeId>, now: Instant) -> bool {
        view.members
            .iter()
            .filter(|m| !members.contains(m) && !self.frozen.contains(m))
            .all(|m| self.granted.get(m).is_none_or(|&until| now >= until))
    }

    /// A view was installed: only grants of its members count, requests are due at once.
    /// Grants given stay binding (until they expire), to members of the new view.
    pub fn installed(&mut self, view: &View, id: NodeId) {
        self.held.retain(|m, _| view.members.contains(m));
        self.frozen.clear();
        self.granted.retain(|m, _| view.members.contains(m));
        self.renew_at = None;
        self.recompute(view, id);
    }

    fn recompute(&mut self, view: &View, id: NodeId) {
        let Some(duration) = self.duration else {
            self.until = Lease::Unbounded;
            return;
        };
        if !view.members.contains(&id) {
            self.until = Lease::Expired;
            return;
        }
        // This member counts for itself; the others it needs are the latest grantors.
        let needed = view.majority() - 1;
        if needed == 0 {
            self.until = Lease::Unbounded;
            return;
        }
        let mut sent: Vec<Instant> = view
            .members
            .iter()
            .filter_map(|m| self.held.get(m))
            .copied()
            .collect();
        sent.sort_unstable_by(|a, b| b.cmp(a));
        self.until = match sent.get(needed - 1) {
            Some(&at) => Lease::Until(at + duration.mul_f64(HOLD_SHARE)),
            None => Lease::Expired,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(members: &[NodeId]) -> View {
        View {
            epoch: 0,
            members: members.iter().copied().collect(),
        }
    }

    #[test]
    fn a_majority_of_grants_makes_a_lease_from_the_oldest_request_it_needs() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let v = view(&[0, 1, 2, 3, 4]);
        let mut leases = Leases::new(Some(second));
        leases.installed(&v, 0);
        assert_eq!(leases.until(), Lease::Expired);
        let stamp = |request| match request {
            Some(LeaseMessage::Request { sent, millis: 1000 }) => sent,
            other => panic!("expected a request for a second, got {other:?}"),
        };
        let first = stamp(leases.renew(t0));
        assert_eq!(leases.renew(t0 + second / 8), None, "not due yet");
        let later = stamp(leases.renew(t0 + second / 4));
        leases.granted_by(1, later, t0 + second / 2, &v, 0);
        assert_eq!(
            leases.until(),
            Lease::Expired,
            "two of five are no majority"
        );
        leases.granted_by(2, first, t0 + second / 2, &v, 0);
        assert_eq!(
            leases.until(),
            Lease::Until(t0 + second.mul_f64(HOLD_SHARE))
        );
        leases.granted_by(3, later, t0 + second / 2, &v, 0);
        let until = t0 + second / 4 + second.mul_f64(HOLD_SHARE);
        assert_eq!(leases.until(), Lease::Until(until));
        assert!(leases.until().holds_at(until - Duration::from_nanos(1)));
        assert!(!leases.until().holds_at(until));
        leases.installed(&v, 0);
        assert_eq!(
            leases.until(),
            Lease::Until(until),
            "grants outlive a view change"
        );
        leases.installed(&view(&[0, 1, 4, 5, 6]), 0);
        assert_eq!(
            leases.until(),
            Lease::Expired,
            "only the new view's grants count"
        );
        leases.installed(&view(&[0]), 0);
        assert_eq!(
            leases.until(),
            Lease::Unbounded,
            "alone, a member is the majority"
        );
    }

    #[test]
    fn a_grant_holds_back_the_removal_of_its_holder_until_it_expires() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let v = view(&[0, 1, 2]);
        let mut leases = Leases::new(None);
        leases.installed(&v, 1);
        assert_eq!(
            leases.until(),
            Lease::Unbounded,
            "a member without leases grants only"
        );
        assert!(leases.grant(0, 1000, t0, false));
        let without_0 = [1, 2].into_iter().collect();
        assert!(!leases.accepts(&v, &without_0, t0 + second / 2));
        assert!(
            leases.accepts(&v, &v.members, t0 + second / 2),
            "keeping 0 is fine"
        );
        assert!(leases.accepts(&v, &without_0, t0 + second));
        assert!(
            !leases.grant(2, 1000, t0, true),
            "a frozen member grants nothing"
        );
        leases.froze(0);
        assert!(
            !leases.grant(0, 1000, t0, false),
            "nor to a member that froze"
        );
        assert!(
            leases.accepts(&v, &without_0, t0),
            "a frozen member serves nothing"
        );
    }
}
