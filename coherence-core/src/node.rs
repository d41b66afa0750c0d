//! The driver and the public handles: [`Node`] owns one transport and one [`Member`] (the
//! token protocol and the views); [`DistObj`] is a typed handle on one object.
//!
//! The protocol state sits behind one mutex. Every step applies the protocol's events
//! (readability, completions) before its messages are sent, and sends happen under the mutex,
//! so per-pair order is the order the protocol produced. A read of an object whose token is
//! here never takes the mutex: it loads the decoded value from a lock-free cell.
//!
//! Network input is taken from the transport and handled by whoever holds the receive turn, so
//! frames are handled in arrival order. While a user thread waits for its operation it takes
//! the turn itself and polls the transport: the reply is handled on the thread that wants it,
//! and the driver thread sleeps meanwhile (whoever waits drives the IO; handing a reply from
//! the driver to a waiting caller would cost a futex wake-up, longer than the round trip).
//! After [`Config::spin`] the caller hands the turn back to the driver and sleeps. How every
//! thread waits is decided in the [`crate::wait`] module.
//!
//! A transport that fails, or is closed under the node, stops it: every waiting and later
//! operation returns [`Error::Transport`] at once.
//!
//! Membership: the transport's [`TransportEvent::JoinRequest`] and [`TransportEvent::Left`] become
//! the member's [`Member::admit`] and [`Member::suspect`]; the member proposes the next view
//! when its rules say so, and the driver retries every [`Config::view_retry`] while one is
//! wanted. `shutdown` is a view change that removes this node.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Sender;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::cell::{self, Cell};
use crate::config::Config;
use crate::error::Error;
use crate::lease::Lease;
use crate::member::{Member, MemberOutput};
use crate::protocol::{Event, OpId, Outcome, Protocol};
use crate::transport::{NodeId, Transport, TransportError, TransportEvent};
use crate::view::View;
use crate::wait::{view_retry_after, Budget, Poller, DRIVER_NAP, DRIVER_YIELDS_FOR, LEASE_RETRY};
use crate::wire::{self, Envelope, Init, Traffic};

/// Counters of one node's traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// Frames handed to the transport.
    pub frames_sent: u64,
    /// Protocol messages inside those frames.
    pub messages_sent: u64,
    /// Of those, lease requests and grants: background traffic a member under a lease sends
    /// every quarter of it, whatever the objects do.
    pub lease_messages_sent: u64,
    /// Frames that carried nothing but lease messages.
    pub lease_frames_sent: u64,
    /// Frames received and decoded.
    pub frames_received: u64,
    /// Frames dropped because they could not be decoded.
    pub frames_rejected: u64,
    /// Decoded messages dropped because no correct peer sends them (see
    /// [`crate::protocol::Rejected`]).
    pub messages_rejected: u64,
    /// Token messages dropped because their epoch was over here (fencing).
    pub messages_fenced: u64,
    /// The epoch of the view installed here.
    pub epoch: u64,
}

#[derive(Default)]
struct Counters {
    frames_sent: AtomicU64,
    messages_sent: AtomicU64,
    lease_messages_sent: AtomicU64,
    lease_frames_sent: AtomicU64,
    frames_received: AtomicU64,
    frames_rejected: AtomicU64,
    messages_rejected: AtomicU64,
}

/// Everything behind the mutex.
struct Core {
    member: Member,
    /// When this node last proposed a view in this epoch, or first found itself frozen for
    /// another member's proposal: a stalled proposal is retried a backoff later, and one
    /// that another member drives gets that long to finish before this one proposes over it.
    proposed_at: Option<Instant>,
    /// Proposals since the last view was installed: each retry waits twice as long, so
    /// proposals that carry large reports are not cut short by the next one.
    proposals: u32,
    /// Since when the transport has lost a majority of the view ([`Member::cut_off`]): after
    /// a grace period for a decision already on its way, the node stops.
    cut_off_since: Option<Instant>,
    /// Operations in progress and their callers: one per waiting thread, so a short list.
    waiters: Vec<(OpId, Arc<Waiter>)>,
    cells: BTreeMap<Arc<str>, Arc<Cell>>,
    left: Option<Sender<()>>,
    /// This step's messages, grouped by destination; kept to reuse its buffer.
    outbox: Vec<(NodeId, Envelope)>,
    /// The messages of the frame being handled; kept to reuse its buffer.
    inbox: Vec<Traffic>,
}

/// Where a waiting caller's outcome lands. Each thread has one and reuses it for every
/// operation (a thread waits for one operation at a time), so an operation allocates no
/// channel.
struct Waiter {
    thread: Thread,
    ready: AtomicBool,
    outcome: Mutex<Option<Outcome>>,
}

impl Waiter {
    fn of_this_thread() -> Arc<Waiter> {
        thread_local! {
            static WAITER: Arc<Waiter> = Arc::new(Waiter {
                thread: std::thread::current(),
                ready: AtomicBool::new(false),
                outcome: Mutex::new(None),
            });
        }
        WAITER.with(Arc::clone)
    }

    fn slot(&self) -> MutexGuard<'_, Option<Outcome>> {
        self.outcome
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Forgets a previous operation's outcome (one that completed after its caller gave up).
    fn reset(&self) {
        *self.slot() = None;
        self.ready.store(false, Ordering::Release);
    }

    /// Hands over the outcome; wakes the thread if it sleeps (costs nothing if it polls).
    fn deliver(&self, outcome: Outcome) {
        *self.slot() = Some(outcome);
        self.ready.store(true, Ordering::Release);
        self.thread.unpark();
    }

    /// The outcome, if delivered.
    fn take(&self) -> Option<Outcome> {
        if self.ready.load(Ordering::Acquire) {
            self.slot().take()
        } else {
            None
        }
    }

    /// Sleeps until the outcome comes, `deadline` passes or `give_up` says so (checked after
    /// every wake-up).
    fn sleep_until(&self, deadline: Instant, give_up: impl Fn() -> bool) -> Option<Outcome> {
        loop {
            if let Some(outcome) = self.take() {
                return Some(outcome);
            }
            let now = Instant::now();
            if now >= deadline || give_up() {
                return None;
            }
            std::thread::park_timeout(deadline - now);
        }
    }
}

thread_local! {
    /// The objects whose `update` closure runs on this thread, with their node: an operation
    /// on one of them from inside the closure would wait for itself.
    static UPDATING: std::cell::RefCell<Vec<(*const Inner, Arc<str>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// How many entries `UPDATING` has. A read hit looks at this alone: a plain counter needs
    /// no destructor, so reading it skips the check whether the list is still alive.
    static UPDATES_RUNNING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks an `update` closure as running on this thread until dropped (also by a panic).
struct InsideUpdate;

impl InsideUpdate {
    fn enter(node: &Inner, object: &Arc<str>) -> InsideUpdate {
        UPDATING.with_borrow_mut(|updating| updating.push((node, Arc::clone(object))));
        UPDATES_RUNNING.set(UPDATES_RUNNING.get() + 1);
        InsideUpdate
    }
}

impl Drop for InsideUpdate {
    fn drop(&mut self) {
        UPDATES_RUNNING.set(UPDATES_RUNNING.get() - 1);
        UPDATING.with_borrow_mut(|updating| updating.pop());
    }
}

struct Inner {
    id: NodeId,
    config: Config,
    transport: Arc<dyn Transport>,
    /// The transport's [`Transport::max_frame`].
    max_frame: usize,
    core: Mutex<Core>,
    /// Set by `shutdown`, and when the transport failed: one load tells a read it may go on.
    stopped: AtomicBool,
    /// Why the transport failed (or was closed under the node), if it did: every waiting and
    /// later operation ends with it.
    failure: std::sync::OnceLock<TransportError>,
    /// Tells the driver thread to exit (after the leave completed or timed out).
    halt: AtomicBool,
    /// The other members removed this node.
    removed: AtomicBool,
    /// The transport lost a majority of this node's view for good.
    cut_off: AtomicBool,
    next_op: AtomicU64,
    counters: Counters,
    /// Held by whoever takes frames from the transport and handles them: the driver, or a
    /// caller polling for its own outcome. One holder at a time keeps arrival order.
    receive_turn: Mutex<()>,
    /// Callers polling the transport themselves; the driver naps while there are any.
    pollers: AtomicUsize,
    /// Counts operations that started polling, so the driver tells one from the next.
    poll_starts: AtomicU64,
    /// The driver sleeps until the last poller wakes it.
    driver_parked: AtomicBool,
    /// The driver thread, to wake it from a nap when the last poller gives up early.
    driver: std::sync::OnceLock<Thread>,
    /// Whether the member serves reads under a lease ([`Config::lease`]).
    leased: bool,
    /// Whether every read needs a majority's lease or every write a majority's copies
    /// (durability): then a member cut off from a majority for good can serve nothing.
    needs_majority: bool,
    /// When the node started: the member's clock when leases are off (it only uses time for
    /// leases, so reading the clock would be wasted).
    started: Instant,
    /// The read hits' clock, read when the node started.
    started_coarse: u64,
    /// How much earlier a lease ends on the read hits' clock ([`coarse::margin`]).
    coarse_margin: Duration,
    /// Until when, on the read hits' clock ([`coarse`]), the lease holds ([`LEASE_UNBOUNDED`]:
    /// no end, 0: none), so a read hit checks it without the mutex.
    lease_until: AtomicU64,
}

/// `Inner::lease_until` of a lease without end.
const LEASE_UNBOUNDED: u64 = u64::MAX;

/// The clock a read hit checks its lease with: on Linux the monotonic clock at the kernel
/// tick's resolution, read in a few nanoseconds where the precise one costs about as much as
/// the whole read hit (a 2-member cluster's read hit measured 47 ns with it, against 33 ns
/// for an `RwLock<Arc<T>>` read). It runs behind real time by up to its resolution, so a
/// deadline is moved earlier by [`coarse::margin`] before it is compared with it.
mod coarse {
    use std::time::Duration;

    /// Nanoseconds on the monotonic clock, at the kernel tick's resolution.
    #[cfg(target_os = "linux")]
    #[inline]
    pub(super) fn now() -> u64 {
        read(libc::CLOCK_MONOTONIC_COARSE)
    }

    /// How much earlier than its deadline a lease must end on this clock: twice its
    /// resolution, and a millisecond for the reading of the two clocks at start.
    #[cfg(target_os = "linux")]
    pub(super) fn margin() -> Duration {
        let mut res = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `res` is a valid timespec the call writes to.
        let ok = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res) } == 0;
        let resolution = if ok {
            Duration::new(res.tv_sec as u64, res.tv_nsec as u32)
        } else {
            Duration::from_millis(10)
        };
        resolution * 2 + Duration::from_millis(1)
    }

    #[cfg(target_os = "linux")]
    #[inline]
    fn read(clock: libc::clockid_t) -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec the call writes to; the clock id is a constant
        // every Linux has.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// Elsewhere: the precise monotonic clock, in nanoseconds since the first reading.
    #[cfg(not(target_os = "linux"))]
    #[inline]
    pub(super) fn now() -> u64 {
        static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        ORIGIN
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    }

    /// Elsewhere: a millisecond for the reading of the two clocks at start.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn margin() -> Duration {
        Duration::from_millis(1)
    }
}

impl Inner {
    /// Encodes a value of `object`, refusing one that no frame of the transport could carry:
    /// found out at send time, its tokens would already be on the way.
    fn encode_value<T: Serialize>(&self, object: &str, value: &T) -> Result<Bytes, Error> {
        let bytes = rmp_serde::to_vec(value).map_err(|e| Error::Encode {
            object: object.to_string(),
            reason: e.to_string(),
        })?;
        let max = wire::max_value_len(self.max_frame, object, std::any::type_name::<T>());
        if bytes.len() > max {
            return Err(Error::ValueTooLarge {
                object: object.to_string(),
                len: bytes.len(),
                max,
            });
        }
        Ok(Bytes::from(bytes))
    }

    fn lock(&self) -> MutexGuard<'_, Core> {
        // Only a bug panics under this lock (input no correct peer sends is refused before it
        // changes anything), and it may leave that step half done. Going on still beats
        // poisoning every later call: callers get their errors and timeouts.
        self.core
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[inline]
    fn check_running(&self) -> Result<(), Error> {
        if self.stopped.load(Ordering::Acquire) {
            Err(self.stopped_error())
        } else {
            Ok(())
        }
    }

    /// Why operations fail once the node stopped: the transport's failure, or a shutdown.
    fn stopped_error(&self) -> Error {
        if self.removed.load(Ordering::Acquire) {
            return Error::Removed(self.id);
        }
        if self.cut_off.load(Ordering::Acquire) {
            return Error::CutOff(self.id);
        }
        match self.failure.get() {
            Some(cause) => Error::Transport {
                node: self.id,
                cause: cause.clone(),
            },
            None => Error::Stopped(self.id),
        }
    }

    /// The transport failed, or was closed under the node (not by `shutdown`): remember why,
    /// stop the node and wake every waiting caller, which then returns that error.
    fn fail(&self, cause: TransportError) {
        if self.halt.load(Ordering::Acquire) || self.failure.set(cause.clone()).is_err() {
            return;
        }
        tracing::error!(node = self.id, error = %cause, "transport failed: the node stops");
        self.stopped.store(true, Ordering::Release);
        let mut core = self.lock();
        for (_, waiter) in &core.waiters {
            waiter.thread.unpark();
        }
        // A `shutdown` waiting for the leave to be acknowledged stops waiting.
        core.left = None;
        drop(core);
        if let Some(driver) = self.driver.get() {
            driver.unpark();
        }
    }

    /// Refuses an operation on `object` from inside that object's own `update` closure on this
    /// thread: it would wait for the tokens its own update holds.
    #[inline]
    fn check_not_updating(&self, operation: &'static str, object: &str) -> Result<(), Error> {
        if UPDATES_RUNNING.get() == 0 {
            return Ok(());
        }
        let inside = UPDATING.with_borrow(|updating| {
            updating
                .iter()
                .any(|(node, name)| std::ptr::eq(*node, self) && &**name == object)
        });
        if inside {
            return Err(Error::InsideUpdate {
                operation,
                object: object.to_string(),
            });
        }
        Ok(())
    }

    /// Runs one protocol input, then applies its events and sends its messages.
    fn step(&self, core: &mut Core, input: impl FnOnce(&mut Protocol)) {
        core.member.operate(self.now(), input);
        self.flush(core);
    }

    /// The member's clock: only leases use it.
    #[inline]
    fn now(&self) -> Instant {
        if self.leased {
            Instant::now()
        } else {
            self.started
        }
    }

    /// Whether the lease lets a read hit serve now (one load without leases).
    #[inline]
    fn lease_holds(&self) -> bool {
        let until = self.lease_until.load(Ordering::Acquire);
        until == LEASE_UNBOUNDED || coarse::now() < until
    }

    /// Publishes the member's lease for read hits, and renews it when due.
    fn renew_lease(&self, core: &mut Core) {
        if !self.leased {
            return;
        }
        let now = Instant::now();
        if core.member.next_tick(now).is_some_and(|at| now >= at) {
            core.member.tick(now);
        }
        let until = match core.member.lease() {
            Lease::Unbounded => LEASE_UNBOUNDED,
            Lease::Until(at) => {
                // On the read hits' clock, moved earlier by what that clock may lag.
                let after_start = at.saturating_duration_since(self.started);
                let on_coarse = self.started_coarse + after_start.as_nanos() as u64;
                on_coarse
                    .saturating_sub(self.coarse_margin.as_nanos() as u64)
                    .clamp(1, LEASE_UNBOUNDED - 1)
            }
            Lease::Expired => 0,
        };
        self.lease_until.store(until, Ordering::Release);
    }

    /// Proposes the view the member wants, if any (see [`Member::wanted`]).
    fn propose_wanted(&self, core: &mut Core) {
        if core.member.propose_wanted(self.now()) {
            core.proposed_at = Some(Instant::now());
            core.proposals = core.proposals.saturating_add(1);
            tracing::info!(node = self.id, view = ?core.member.view(), "view change proposed");
        }
        self.flush(core);
    }

    /// A view was installed here: a member that was removed without leaving stops.
    fn installed(&self, view: &View, left: &mut Option<Sender<()>>) {
        tracing::info!(node = self.id, ?view, "view installed");
        if view.members.contains(&self.id) {
            return;
        }
        if let Some(done) = left.take() {
            let _ = done.send(());
        } else if !self.stopped.load(Ordering::Acquire) {
            tracing::error!(
                node = self.id,
                ?view,
                "removed from the cluster: the node stops"
            );
            self.removed.store(true, Ordering::Release);
            self.stopped.store(true, Ordering::Release);
        }
    }

    fn flush(&self, core: &mut Core) {
        let installed = &mut false;
        self.renew_lease(core);
        let Core {
            member,
            waiters,
            cells,
            left,
            outbox,
            proposals,
            proposed_at,
            ..
        } = core;
        // Events come before the messages of the same step: a caller sees the value its
        // operation read or wrote before anything leaves, and messages stay in order.
        while let Some(output) = member.poll_output() {
            let event = match output {
                MemberOutput::Event(event) => event,
                MemberOutput::Send { to, envelope } => {
                    outbox.push((to, envelope));
                    continue;
                }
                MemberOutput::Connect(contacts) => {
                    // Before the outbox goes out: it may hold the decision for a new member.
                    self.transport.connect_members(&contacts);
                    continue;
                }
                MemberOutput::Installed { view, .. } => {
                    self.installed(&view, left);
                    *proposals = 0;
                    *proposed_at = None;
                    *installed = true;
                    continue;
                }
            };
            match event {
                Event::Readable { object, value } => {
                    cells.entry(object).or_default().publish(&value);
                }
                Event::Unreadable { object } => {
                    if let Some(cell) = cells.get(&object) {
                        cell.invalidate();
                    }
                }
                Event::Completed { op, outcome } => {
                    // The waiter may have timed out and gone; nothing to do then.
                    if let Some(at) = waiters.iter().position(|(id, _)| *id == op) {
                        waiters.swap_remove(at).1.deliver(outcome);
                    }
                }
                // The node leaves by a view change (above), never by the token protocol's own
                // leave.
                Event::Left => {}
            }
        }
        let mut refused = Vec::new();
        let runs = wire::batches_by_destination(outbox)
            .flat_map(|batch| wire::frame_runs(batch, self.max_frame));
        for batch in runs {
            let (to, epoch) = (batch[0].0, batch[0].1.epoch);
            for (_, envelope) in batch {
                tracing::trace!(node = self.id, to, epoch, msg = ?envelope.traffic, "send");
            }
            let frame = wire::encode(epoch, batch.iter().map(|(_, e)| &e.traffic));
            match self.transport.send(to, frame) {
                Ok(()) => {
                    let counters = &self.counters;
                    counters.frames_sent.fetch_add(1, Ordering::Relaxed);
                    let messages = batch.len() as u64;
                    counters
                        .messages_sent
                        .fetch_add(messages, Ordering::Relaxed);
                    let leases = batch
                        .iter()
                        .filter(|(_, e)| matches!(e.traffic, Traffic::Lease(_)))
                        .count() as u64;
                    if leases > 0 {
                        counters
                            .lease_messages_sent
                            .fetch_add(leases, Ordering::Relaxed);
                        if leases == messages {
                            counters.lease_frames_sent.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // After our own leave the transport is closed while peers that leave at the
                // same time may still be answered (a `LeaveAck`); they hear of our close.
                Err(TransportError::Closed) if self.stopped.load(Ordering::Acquire) => {
                    tracing::debug!(node = self.id, to, "frame not sent: this node has left")
                }
                // The transport dropped `to` before its `Left` reached us: what the frame
                // carried stays here.
                Err(TransportError::UnknownPeer(_)) => {
                    tracing::debug!(node = self.id, to, "frame not sent: the peer is gone");
                    let tokens = batch.iter().filter_map(|(_, e)| match &e.traffic {
                        Traffic::Token(message) => Some(message.clone()),
                        Traffic::View(_) | Traffic::Lease(_) | Traffic::Join(_) => None,
                    });
                    refused.push((to, tokens.collect::<Vec<_>>()));
                }
                Err(e) => tracing::warn!(node = self.id, to, error = %e, "frame not sent"),
            }
        }
        outbox.clear();
        if *installed {
            // What the new view leaves to do (a leaver still in it, joiners still out).
            self.propose_wanted(core);
        }
        if refused.is_empty() {
            return;
        }
        for (to, messages) in refused {
            // The transport dropped `to`: as good as its `Left`.
            core.member.suspect(self.now(), to);
            core.member
                .operate(self.now(), |p| p.send_failed(to, messages));
        }
        self.leave_if_alone(core);
        // What the returned tokens now allow (each refusal forgets a peer, so this ends).
        self.flush(core);
    }

    /// Starts operation `start` and waits for its outcome, cancelling it on timeout.
    fn run_op(
        &self,
        operation: &'static str,
        object: &str,
        start: impl FnOnce(&mut Protocol, OpId),
    ) -> Result<Outcome, Error> {
        self.run_op_with_id(operation, object, start)
            .map(|(_, outcome)| outcome)
    }

    /// [`Inner::run_op_with_id`] for an operation that reads (open, read, an update's lock):
    /// while the lease does not hold it is tried again, every [`LEASE_RETRY`], until the
    /// operation timeout.
    fn run_read_op(
        &self,
        operation: &'static str,
        object: &str,
        start: impl Fn(&mut Protocol, OpId),
    ) -> Result<(OpId, Outcome), Error> {
        let started = Instant::now();
        loop {
            match self.run_op_with_id(operation, object, &start) {
                Err(Error::NoMajority { .. }) if started.elapsed() < self.config.timeout => {
                    std::thread::sleep(LEASE_RETRY);
                }
                done => return done,
            }
        }
    }

    /// [`Inner::run_op`], also returning the operation's id.
    fn run_op_with_id(
        &self,
        operation: &'static str,
        object: &str,
        start: impl FnOnce(&mut Protocol, OpId),
    ) -> Result<(OpId, Outcome), Error> {
        self.check_running()?;
        let op = self.next_op.fetch_add(1, Ordering::Relaxed);
        // One span per operation, so a trace shows each one as a slice on its node's track.
        let _span =
            tracing::debug_span!("operation", node = self.id, operation, object, op).entered();
        let waiter = Waiter::of_this_thread();
        waiter.reset();
        {
            let mut core = self.lock();
            core.waiters.push((op, Arc::clone(&waiter)));
            self.step(&mut core, |p| start(p, op));
        }
        Ok((op, self.wait(operation, object, op, &waiter)?))
    }

    fn wait(
        &self,
        operation: &'static str,
        object: &str,
        op: OpId,
        waiter: &Waiter,
    ) -> Result<Outcome, Error> {
        let start = Instant::now();
        // Ends the wait at once when the node stopped under it (the outcome will not come).
        let failed = || self.failure.get().is_some() || self.cut_off.load(Ordering::Acquire);
        let outcome = match self.poll_for(waiter, start) {
            Some(outcome) => Some(outcome),
            None => waiter.sleep_until(start + self.config.timeout, failed),
        };
        let outcome = match outcome {
            Some(outcome) => outcome,
            None => {
                let mut core = self.lock();
                core.waiters.retain(|(id, _)| *id != op);
                let mut cancelled = false;
                self.step(&mut core, |p| {
                    // A write waiting for its copies cannot be called back: it may still take
                    // effect, which a timeout allows.
                    cancelled = p.cancel(op) || p.completes_later(op);
                });
                drop(core);
                if cancelled && failed() {
                    tracing::warn!(node = self.id, operation, object, "node stopped under it");
                    return Err(self.stopped_error());
                }
                if cancelled {
                    tracing::warn!(node = self.id, operation, object, "operation timed out");
                    return Err(Error::Timeout {
                        operation,
                        object: object.to_string(),
                        after: self.config.timeout,
                    });
                }
                // It completed while we gave up: the outcome is here.
                waiter.take().ok_or_else(|| self.stopped_error())?
            }
        };
        match outcome {
            Outcome::Aborted | Outcome::Removed => Err(self.stopped_error()),
            Outcome::Interrupted => Err(Error::Interrupted {
                operation,
                object: object.to_string(),
            }),
            Outcome::NoMajority => Err(Error::NoMajority {
                node: self.id,
                operation,
                object: object.to_string(),
            }),
            outcome => Ok(outcome),
        }
    }

    /// Polls for up to [`Config::spin`] (bounded by the timeout): takes the receive turn when
    /// it is free and handles what the transport delivered, one event at a time, so the reply
    /// is handled right here and the caller leaves as soon as it is. `None` when the outcome
    /// did not come; the driver has the turn back then.
    fn poll_for(&self, waiter: &Waiter, start: Instant) -> Option<Outcome> {
        let budget = self.config.spin.min(self.config.timeout);
        self.pollers.fetch_add(1, Ordering::SeqCst);
        self.poll_starts.fetch_add(1, Ordering::Relaxed);
        let mut rounds = 0u32;
        let mut poller = Poller::new(Budget::of_process());
        let outcome = loop {
            if let Some(outcome) = waiter.take() {
                break Some(outcome);
            }
            if self.failure.get().is_some() {
                break None;
            }
            if let Ok(_turn) = self.receive_turn.try_lock() {
                // One event at a time: once ours is handled the caller goes, and what else
                // came (or frames the transport still has to write) is the driver's.
                match self.transport.recv(Duration::ZERO) {
                    Ok(Some(event)) => self.handle_event(event),
                    Ok(None) => {
                        poller.pause();
                    }
                    Err(cause) => {
                        self.fail(cause);
                        break None;
                    }
                }
            } else {
                // The driver is waiting inside the transport and will handle the reply: give
                // it the core.
                poller.release();
                std::thread::yield_now();
            }
            if let Some(outcome) = waiter.take() {
                break Some(outcome);
            }
            rounds = rounds.wrapping_add(1);
            // Reading the clock every round would cost more than the poll itself.
            if rounds.is_multiple_of(64) && start.elapsed() >= budget {
                break None;
            }
        };
        poller.release();
        if self.pollers.fetch_sub(1, Ordering::SeqCst) == 1
            && self.driver_parked.load(Ordering::SeqCst)
        {
            // The driver gave up waiting for us and sleeps: it must take over now, not after
            // its nap. Only slow operations get here, so the wake-up's cost is a small share.
            if let Some(driver) = self.driver.get() {
                driver.unpark();
            }
        }
        outcome
    }

    /// Handles every event the transport has ready, without waiting. The caller holds the
    /// receive turn. `false` if the transport failed.
    fn handle_ready(&self) -> bool {
        loop {
            match self.transport.recv(Duration::ZERO) {
                Ok(Some(event)) => self.handle_event(event),
                Ok(None) => return true,
                Err(cause) => {
                    self.fail(cause);
                    return false;
                }
            }
        }
    }

    /// The driver thread: feeds network input to the protocol until halted. It also starts the
    /// leave `shutdown` asked for, after handling everything the transport already delivered:
    /// a decision that took a joiner in, queued before the leave, must be seen, or the leaver
    /// could believe itself alone and take the objects with it.
    fn drive(self: Arc<Self>) {
        let mut leave_started = false;
        let mut polled_since = None;
        let mut seen_episode = 0;
        let mut busy_since = Instant::now();
        let mut poller = Poller::new(Budget::of_process());
        let mut next_view_check = Instant::now();
        while !self.halt.load(Ordering::Acquire) && self.failure.get().is_none() {
            if self.pollers.load(Ordering::SeqCst) > 0 {
                poller.release();
                // Each operation that polls gets the driver's yielding window anew: a driver
                // that only ever ran while callers polled would otherwise nap at once, and
                // the next operation would wait for its wake-up.
                let episode = self.poll_starts.load(Ordering::Relaxed);
                if seen_episode != episode {
                    seen_episode = episode;
                    polled_since = None;
                }
                self.stand_aside(*polled_since.get_or_insert_with(Instant::now));
                busy_since = Instant::now();
                continue;
            }
            polled_since = None;
            let turn = self
                .receive_turn
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if !leave_started && self.stopped.load(Ordering::Acquire) {
                if !self.handle_ready() {
                    break;
                }
                let mut core = self.lock();
                core.member.leave();
                self.propose_wanted(&mut core);
                self.leave_if_alone(&mut core);
                leave_started = true;
                continue;
            }
            // Poll without waiting while traffic is recent, so a caller that starts polling
            // finds the turn free; then wait inside the transport, holding the turn.
            let wait = if busy_since.elapsed() < self.config.spin {
                Duration::ZERO
            } else {
                poller.release();
                self.config.poll_interval
            };
            if Instant::now() >= next_view_check {
                next_view_check = Instant::now() + self.config.view_retry / 4;
                self.retry_view();
            }
            match self.transport.recv(wait) {
                Ok(Some(event)) => {
                    self.handle_event(event);
                    busy_since = Instant::now();
                }
                Ok(None) if wait.is_zero() => {
                    drop(turn);
                    // Cooperative: on a machine with few cores, another thread (a caller, the
                    // peer process's driver) may need this core to produce what we wait for.
                    poller.yield_now();
                }
                Ok(None) => {}
                // Closed by `shutdown` (which halts first), or failed or closed under us.
                Err(cause) => {
                    self.fail(cause);
                    break;
                }
            }
        }
    }

    /// The driver's turn while callers poll: yield the core for a while (a quick operation
    /// ends before that, and the driver goes on without being woken), then sleep until the
    /// last poller wakes it.
    fn stand_aside(&self, polled_since: Instant) {
        if polled_since.elapsed() < DRIVER_YIELDS_FOR {
            std::thread::yield_now();
            return;
        }
        self.driver_parked.store(true, Ordering::SeqCst);
        if self.pollers.load(Ordering::SeqCst) > 0 {
            std::thread::park_timeout(DRIVER_NAP);
        }
        self.driver_parked.store(false, Ordering::SeqCst);
    }

    /// Proposes again a view that is still wanted after [`Config::view_retry`]; a leaving
    /// node whose every other member is lost leaves without a view change.
    fn retry_view(&self) {
        let mut core = self.lock();
        // Renews the lease of an idle node (busy ones renew in every step).
        self.flush(&mut core);
        if core.member.protocol().is_frozen() && core.proposed_at.is_none() {
            core.proposed_at = Some(Instant::now());
        }
        let backoff = view_retry_after(self.config.view_retry, core.proposals, self.id);
        let due = core.proposed_at.is_none_or(|at| at.elapsed() >= backoff);
        if due && core.member.wanted().is_some() {
            self.propose_wanted(&mut core);
        }
        self.leave_if_alone(&mut core);
        self.stop_if_cut_off(&mut core);
    }

    /// Stops the node once the transport has lost a majority of its view for longer than
    /// [`Config::view_retry`] (a decision already on its way, from a member still reachable,
    /// would have arrived), if it needs a majority to serve anything: every waiting and later
    /// operation ends with [`Error::CutOff`]. A leaving node just leaves. (Without leases and
    /// durability a member keeps serving the objects whose tokens it holds.)
    fn stop_if_cut_off(&self, core: &mut Core) {
        let stops = self.needs_majority && core.member.cut_off();
        if !stops || self.cut_off.load(Ordering::Acquire) {
            core.cut_off_since = None;
            return;
        }
        let since = *core.cut_off_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.config.view_retry {
            return;
        }
        if let Some(done) = core.left.take() {
            tracing::info!(
                node = self.id,
                "a majority of the view is lost: leaving alone"
            );
            let _ = done.send(());
            return;
        }
        if self.stopped.load(Ordering::Acquire) {
            return; // stopped for another reason (removed, the transport failed)
        }
        tracing::error!(
            node = self.id,
            view = ?core.member.view(),
            "the transport lost a majority of the view: the node stops"
        );
        self.cut_off.store(true, Ordering::Release);
        self.stopped.store(true, Ordering::Release);
        for (_, waiter) in &core.waiters {
            waiter.thread.unpark();
        }
    }

    /// A leaving member that lost every other member cannot have a view decided (no
    /// majority answers); nobody is left to hand anything to, so it just goes.
    fn leave_if_alone(&self, core: &mut Core) {
        if core.member.is_leaving() && core.member.others_lost() {
            if let Some(done) = core.left.take() {
                tracing::info!(node = self.id, "every other member is lost: leaving alone");
                let _ = done.send(());
            }
        }
    }

    fn handle_event(&self, event: TransportEvent) {
        let mut core = self.lock();
        match event {
            TransportEvent::Frame { from, bytes } => {
                let mut inbox = std::mem::take(&mut core.inbox);
                let protocol = core.member.protocol();
                match wire::decode_into(Bytes::from(bytes), &mut inbox, |name| {
                    protocol.shared_name(name)
                }) {
                    Ok(epoch) => {
                        self.counters
                            .frames_received
                            .fetch_add(1, Ordering::Relaxed);
                        for traffic in inbox.drain(..) {
                            tracing::trace!(node = self.id, from, epoch, msg = ?traffic, "receive");
                            let fenced = core.member.fenced();
                            let envelope = Envelope { epoch, traffic };
                            let handled = core.member.handle(self.now(), from, envelope);
                            self.flush(&mut core);
                            if core.member.fenced() > fenced {
                                tracing::debug!(node = self.id, from, epoch, "message fenced");
                            }
                            if let Err(e) = handled {
                                self.counters
                                    .messages_rejected
                                    .fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(node = self.id, from, error = %e, "message rejected");
                            }
                        }
                    }
                    Err(e) => {
                        self.counters
                            .frames_rejected
                            .fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(node = self.id, from, error = %e, "frame rejected");
                    }
                }
                core.inbox = inbox;
            }
            TransportEvent::JoinRequest(contact) => {
                tracing::info!(node = self.id, addr = %contact.addr, "a node asks to join");
                if core.member.admit(contact) {
                    self.propose_wanted(&mut core);
                } else {
                    // A request handed on to the coordinator goes out; a repeat changes nothing.
                    self.flush(&mut core);
                }
            }
            TransportEvent::Left(peer) => {
                tracing::info!(node = self.id, peer, "peer lost or gone");
                core.member.suspect(self.now(), peer);
                self.propose_wanted(&mut core);
                self.leave_if_alone(&mut core);
            }
        }
    }

    fn cell(&self, object: &str) -> Arc<Cell> {
        Arc::clone(self.lock().cells.entry(Arc::from(object)).or_default())
    }
}

/// One member of a cluster: owns a transport, runs the protocol on a driver thread, and opens
/// objects. `Send + Sync`: share it (or its handles) between threads.
pub struct Node {
    inner: Arc<Inner>,
    driver: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("id", &self.inner.id).finish()
    }
}

impl Node {
    /// Joins the cluster `transport` belongs to and starts the driver thread.
    pub fn start<T: Transport>(transport: T, config: Config) -> Result<Node, Error> {
        let id = transport.local_id();
        let durability = config
            .durability
            .unwrap_or(if transport.members_fail_together() {
                0
            } else {
                1
            });
        let lease = config
            .lease
            .unwrap_or(if transport.members_fail_together() {
                Duration::ZERO
            } else {
                crate::wait::LEASE
            });
        let protocol = Protocol::new(id, [], config.write_policy).with_durability(durability);
        let member = if transport.joins_running_cluster() {
            Member::joining(protocol)
        } else {
            let mut members: std::collections::BTreeSet<NodeId> =
                transport.peers().into_iter().collect();
            members.insert(id);
            let alone = members.len() == 1;
            let member = Member::new(protocol, View { epoch: 0, members });
            match transport.contact() {
                Some(contact) if alone => member.with_contact(contact),
                _ => member,
            }
        };
        let leased = !lease.is_zero();
        let member = if leased {
            member.with_lease(lease)
        } else {
            member
        };
        tracing::debug!(node = id, view = ?member.view(), durability, "node starting");
        let max_frame = transport.max_frame();
        Budget::of_process().share_with(transport.colocated_processes());
        let inner = Arc::new(Inner {
            id,
            config,
            transport: Arc::new(transport),
            max_frame,
            core: Mutex::new(Core {
                member,
                proposed_at: None,
                cut_off_since: None,
                proposals: 0,
                waiters: Vec::new(),
                cells: BTreeMap::new(),
                left: None,
                outbox: Vec::new(),
                inbox: Vec::new(),
            }),
            stopped: AtomicBool::new(false),
            failure: std::sync::OnceLock::new(),
            halt: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            cut_off: AtomicBool::new(false),
            next_op: AtomicU64::new(0),
            counters: Counters::default(),
            receive_turn: Mutex::new(()),
            pollers: AtomicUsize::new(0),
            poll_starts: AtomicU64::new(0),
            driver_parked: AtomicBool::new(false),
            driver: std::sync::OnceLock::new(),
            leased,
            needs_majority: leased || durability > 0,
            started: Instant::now(),
            started_coarse: coarse::now(),
            coarse_margin: coarse::margin(),
            lease_until: AtomicU64::new(if leased { 0 } else { LEASE_UNBOUNDED }),
        });
        let driver_inner = Arc::clone(&inner);
        let driver = std::thread::Builder::new()
            .name(format!("coherence-node-{id}"))
            .spawn(move || driver_inner.drive())
            .map_err(|e| Error::Spawn(e.to_string()))?;
        let _ = inner.driver.set(driver.thread().clone());
        Ok(Node {
            inner,
            driver: Some(driver),
        })
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// Traffic counters.
    pub fn stats(&self) -> NodeStats {
        let c = &self.inner.counters;
        let core = self.inner.lock();
        NodeStats {
            frames_sent: c.frames_sent.load(Ordering::Relaxed),
            messages_sent: c.messages_sent.load(Ordering::Relaxed),
            lease_messages_sent: c.lease_messages_sent.load(Ordering::Relaxed),
            lease_frames_sent: c.lease_frames_sent.load(Ordering::Relaxed),
            frames_received: c.frames_received.load(Ordering::Relaxed),
            frames_rejected: c.frames_rejected.load(Ordering::Relaxed),
            messages_rejected: c.messages_rejected.load(Ordering::Relaxed),
            messages_fenced: core.member.fenced(),
            epoch: core.member.view().epoch,
        }
    }

    /// Opens the object `name`: joins it with its current value if it exists anywhere in the
    /// cluster, otherwise creates it with `init` (when several nodes create a name at once,
    /// exactly one `init` wins).
    pub fn object<T>(&self, name: &str, init: T) -> Result<DistObj<T>, Error>
    where
        T: Serialize + DeserializeOwned + Send + Sync + 'static,
    {
        if name.len() > self.inner.config.max_name_len {
            return Err(Error::NameTooLong {
                len: name.len(),
                max: self.inner.config.max_name_len,
            });
        }
        let type_name = std::any::type_name::<T>();
        let init = Init {
            type_name: type_name.into(),
            bytes: self.inner.encode_value(name, &init)?,
        };
        let (_, outcome) = self
            .inner
            .run_read_op("open", name, |p, op| p.open(op, name, init.clone()))?;
        let Outcome::Opened(value) = outcome else {
            unreachable!("open completes with Opened, got {outcome:?}")
        };
        if &*value.type_name != type_name {
            return Err(Error::TypeMismatch {
                object: name.to_string(),
                expected: type_name.to_string(),
                found: value.type_name.to_string(),
            });
        }
        Ok(DistObj {
            name: name.into(),
            cell: self.inner.cell(name),
            node: Arc::clone(&self.inner),
            _type: PhantomData,
        })
    }

    /// Leaves the cluster: hands every token on so the remaining nodes lose nothing, waits for
    /// every peer to acknowledge, then stops the driver and closes the transport. Handles of
    /// this node return [`Error::Stopped`] afterwards.
    pub fn shutdown(mut self) -> Result<(), Error> {
        self.stop()
    }

    fn stop(&mut self) -> Result<(), Error> {
        let Some(driver) = self.driver.take() else {
            return Ok(());
        };
        let inner = &self.inner;
        let (tx, rx) = crossbeam_channel::bounded(1);
        // New operations fail from now on; the driver thread starts the leave.
        inner.lock().left = Some(tx);
        inner.stopped.store(true, Ordering::Release);
        // Fails at once if the transport failed (`fail` drops the sender). A node that was
        // removed or cut off is out already: nothing to wait for.
        let out = inner.removed.load(Ordering::Acquire) || inner.cut_off.load(Ordering::Acquire);
        let acknowledged =
            out || (inner.failure.get().is_none() && rx.recv_timeout(inner.config.timeout).is_ok());
        inner.lock().left = None;
        inner.halt.store(true, Ordering::Release);
        inner.transport.close();
        if driver.join().is_err() {
            tracing::error!(node = inner.id, "driver thread panicked");
        }
        tracing::debug!(node = inner.id, acknowledged, "node stopped");
        if acknowledged {
            Ok(())
        } else if inner.failure.get().is_some() {
            Err(inner.stopped_error())
        } else {
            Err(Error::Timeout {
                operation: "shutdown",
                object: String::new(),
                after: inner.config.timeout,
            })
        }
    }
}

impl Drop for Node {
    /// A node dropped without `shutdown` still leaves properly, so no token is lost.
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            tracing::warn!(node = self.inner.id, error = %e, "shutdown on drop failed");
        }
    }
}

/// A typed handle on one replicated object. Cheap to clone; usable from any thread.
pub struct DistObj<T> {
    name: Arc<str>,
    cell: Arc<Cell>,
    node: Arc<Inner>,
    _type: PhantomData<fn() -> T>,
}

impl<T> Clone for DistObj<T> {
    fn clone(&self) -> Self {
        DistObj {
            name: Arc::clone(&self.name),
            cell: Arc::clone(&self.cell),
            node: Arc::clone(&self.node),
            _type: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for DistObj<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DistObj")
            .field("name", &self.name)
            .field("node", &self.node.id)
            .finish()
    }
}

impl<T> DistObj<T>
where
    T: Serialize + DeserializeOwned + Send + Sync + 'static,
{
    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The current value. Local (no message, no lock, no decoding after the first read of a
    /// version) while this node holds a token; otherwise fetches a token and the value.
    #[inline]
    pub fn read(&self) -> Result<Arc<T>, Error> {
        if let Some(value) = self.try_read()? {
            return Ok(value);
        }
        self.read_miss()
    }

    /// A read without a token here, kept out of [`DistObj::read`] so that the hit's code stays
    /// short (see `docs/BENCHMARKS.md`, fourteenth round).
    #[inline(never)]
    fn read_miss(&self) -> Result<Arc<T>, Error> {
        let (_, outcome) = self
            .node
            .run_read_op("read", &self.name, |p, op| p.read(op, &self.name))?;
        let (Outcome::Read(value) | Outcome::Opened(value)) = outcome else {
            unreachable!("read completes with Read, got {outcome:?}")
        };
        self.cell.saw_version(value.version);
        Ok(Arc::new(cell::decode(&self.name, &value.bytes)?))
    }

    /// The current value if this node holds a token (and, with leases, its lease holds),
    /// without waiting; `Ok(None)` otherwise.
    #[inline]
    pub fn try_read(&self) -> Result<Option<Arc<T>>, Error> {
        self.node.check_running()?;
        self.node.check_not_updating("read", &self.name)?;
        if !self.node.lease_holds() {
            return Ok(None);
        }
        self.cell.read(&self.name)
    }

    /// Replaces the value once this node holds every token (and, with
    /// [`Config::durability`], once enough other members hold it too). A view change that
    /// interrupts the write before it took effect makes it start again.
    pub fn write(&self, value: T) -> Result<(), Error> {
        self.node.check_not_updating("write", &self.name)?;
        let bytes = self.node.encode_value(&self.name, &value)?;
        let started = Instant::now();
        loop {
            let outcome = self.node.run_op("write", &self.name, |p, op| {
                p.write(op, &self.name, bytes.clone())
            });
            match outcome {
                Ok(Outcome::Written { version }) => {
                    self.cell.saw_version(version);
                    return Ok(());
                }
                Err(Error::Interrupted { .. }) if started.elapsed() < self.node.config.timeout => {
                    tracing::debug!(node = self.node.id, object = %self.name, "write retried");
                }
                Err(e) => return Err(e),
                Ok(outcome) => unreachable!("write completes with Written, got {outcome:?}"),
            }
        }
    }

    /// Atomic read-modify-write: gathers every token, runs `f` on the current value, writes the
    /// result. No other write can come between the read and the write.
    pub fn update<R>(&self, f: impl FnOnce(&mut T) -> R) -> Result<R, Error> {
        self.try_update(|value| Ok::<R, std::convert::Infallible>(f(value)))
            .map(|done| done.unwrap_or_else(|never| match never {}))
    }

    /// [`DistObj::update`] with a closure that may refuse: on `Ok` the new value is written,
    /// on `Err` nothing is (the object is released unchanged) and the closure's error is
    /// returned inside `Ok`. The outer `Err` is the library's own failure.
    pub fn try_update<R, E>(
        &self,
        f: impl FnOnce(&mut T) -> Result<R, E>,
    ) -> Result<Result<R, E>, Error> {
        self.node.check_not_updating("update", &self.name)?;
        let (op, outcome) = self
            .node
            .run_read_op("update", &self.name, |p, op| p.lock(op, &self.name))?;
        let Outcome::Granted(value) = outcome else {
            unreachable!("lock completes with Granted, got {outcome:?}")
        };
        // Released without a write if anything below fails, `f` refuses or `f` panics.
        let lock = Lock {
            node: &self.node,
            object: &self.name,
            op,
        };
        let mut current: T = cell::decode(&self.name, &value.bytes)?;
        let inside = InsideUpdate::enter(&self.node, &self.name);
        let result = f(&mut current);
        drop(inside);
        let result = match result {
            Ok(result) => result,
            Err(refused) => return Ok(Err(refused)),
        };
        let bytes = self.node.encode_value(&self.name, &current)?;
        self.cell.saw_version(lock.commit(bytes)?);
        Ok(Ok(result))
    }

    /// Number of writes applied to the value this node holds (or last held).
    pub fn version(&self) -> u64 {
        self.cell.last_version()
    }
}

/// A granted update. Dropped without [`Lock::commit`] (decoding, the closure or encoding
/// failed), it releases the object unchanged.
struct Lock<'a> {
    node: &'a Inner,
    object: &'a str,
    op: OpId,
}

impl Lock<'_> {
    /// Writes `bytes` and releases the object, waiting for the copies the durability asks
    /// for; fails if the node stopped meanwhile, or a view change interrupted the update.
    fn commit(self, bytes: Bytes) -> Result<u64, Error> {
        let (node, object, op) = (self.node, self.object, self.op);
        std::mem::forget(self);
        let waiter = Waiter::of_this_thread();
        waiter.reset();
        let mut version = None;
        let mut replicating = false;
        {
            let mut core = node.lock();
            core.waiters.push((op, Arc::clone(&waiter)));
            node.step(&mut core, |p| {
                version = p.commit(op, Some(bytes));
                replicating = p.completes_later(op);
            });
            if !replicating {
                core.waiters.retain(|(id, _)| *id != op);
            }
        }
        if replicating {
            return match node.wait("update", object, op, &waiter)? {
                Outcome::Written { version } => Ok(version),
                outcome => unreachable!("a commit completes with Written, got {outcome:?}"),
            };
        }
        // No lock any more: the node stopped, or a view change took the tokens (and told a
        // waiter that was already gone, or this one).
        match version {
            Some(version) => Ok(version),
            None => {
                node.check_running()?;
                Err(Error::Interrupted {
                    operation: "update",
                    object: object.to_string(),
                })
            }
        }
    }
}

impl Drop for Lock<'_> {
    fn drop(&mut self) {
        let mut core = self.node.lock();
        self.node.step(&mut core, |p| {
            p.commit(self.op, None);
        });
    }
}
