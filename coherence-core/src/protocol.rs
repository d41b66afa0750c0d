//! The token-coherence state machine of one node: sans-IO and deterministic.
//!
//! Inputs are local operations ([`Protocol::open`], [`Protocol::read`], [`Protocol::write`],
//! [`Protocol::lock`], [`Protocol::commit`], [`Protocol::cancel`], [`Protocol::leave`]) and
//! network input ([`Protocol::handle`], [`Protocol::peer_joined`], [`Protocol::peer_left`]).
//! Outputs are polled one at a time with [`Protocol::poll_output`], in the order the driver must
//! act on them: value changes and completions first, then the messages. There is no clock
//! and no thread; the state is `Clone + Eq + Hash` so a model checker can explore it.
//! `docs/PROTOCOL.md` explains the rules and why they are safe and starvation-free.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;

use bytes::Bytes;

use crate::transport::NodeId;
use crate::view::{Recreation, View};
use crate::wire::{Access, Grant, Init, Message, Request, RequestId, Value};

/// Identifies a local operation; chosen by the caller, unique per node.
pub type OpId = u64;

/// What the node does with its tokens after a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WritePolicy {
    /// Send the new value with one token to every node that opened the object, so their reads
    /// stay local (the lab's behaviour; best for read-mostly objects).
    #[default]
    Update,
    /// Keep every token until someone asks (migratory; best when one node writes repeatedly).
    Invalidate,
}

/// How a local operation ended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The object is open; here is its current value (which may not be the caller's init).
    Opened(Value),
    /// A read's value.
    Read(Value),
    /// A write was applied; this is the new version.
    Written {
        /// Version after the write.
        version: u64,
    },
    /// All tokens are here and the object is locked for this operation until
    /// [`Protocol::commit`]; this is the current value.
    Granted(Value),
    /// The operation was abandoned because the node is leaving.
    Aborted,
    /// A view change came between the operation and its end, and it did not take effect: a
    /// granted lock lost its tokens, or a write's value is not the one the new view kept. The
    /// caller may retry it.
    Interrupted,
    /// This node is not a member of the current view any more; it serves nothing until it
    /// joins again as a new member.
    Removed,
    /// A read (or an update's lock) found this node without a lease: it has not heard from a
    /// majority of its view lately, which may have removed it and replaced the value. Nothing
    /// changed; the caller may retry once the lease is renewed (see [`crate::lease`]).
    NoMajority,
}

/// Why [`Protocol::handle`] refused a message. No correct peer sends one of these, so acting on
/// it could only break the invariants (a bug, or another program speaking our wire format); the
/// message is dropped whole and the state is left as it was.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The transport says the message came from this node itself.
    #[error("a message claims to come from this node itself")]
    FromSelf,
    /// A request or its `Done` names a request of another node: only a request's owner sends
    /// those.
    #[error("node {from} sent a message about a request of node {owner}")]
    NotTheOwner {
        /// The sender.
        from: NodeId,
        /// The node the request belongs to.
        owner: NodeId,
    },
    /// A Lamport time past [`MAX_TIMESTAMP`]: taking it would let the clock run out, after
    /// which requests could no longer be ordered fairly.
    #[error("Lamport time {0} is beyond any clock a node reaches")]
    TimestampTooLate(u64),
    /// A grant that does not fit the tokens held here: no tokens, more than the total, a total
    /// other than the one held, or a second owner token.
    #[error("a grant of {count} token(s) of {object:?} (total {total}, owner {owner}) does not fit the {held} held here (total {held_total}, owner {held_owner})")]
    TokensDoNotAddUp {
        /// The object.
        object: Arc<str>,
        /// Tokens granted.
        count: u32,
        /// The grant's total.
        total: u32,
        /// Whether the grant carries the owner token.
        owner: bool,
        /// Tokens held here.
        held: u32,
        /// The total held here.
        held_total: u32,
        /// Whether the owner token is held here.
        held_owner: bool,
    },
    /// The owner token came without the value, and the value held here is not the version it
    /// names: the owner answers for the data.
    #[error("the owner token of {0:?} came without a value this node holds")]
    OwnerWithoutValue(Arc<str>),
    /// Token traffic stamped with an epoch this node has not reached: a member that installs
    /// a view tells the others before it sends anything of the new epoch, so no correct peer
    /// sends one.
    #[error("token traffic of epoch {epoch} reached a node in epoch {current}")]
    FutureEpoch {
        /// The epoch the message was stamped with.
        epoch: u64,
        /// This node's epoch.
        current: u64,
    },
    /// A copy to keep of a value newer than the one readable here: only the holder of every
    /// token writes, so no correct writer sends one while this node holds a token.
    #[error("node {from} asked to keep version {version} of {object:?} while this node holds a token of it")]
    ReplicaOfHeldObject {
        /// The sender.
        from: NodeId,
        /// The object.
        object: Arc<str>,
        /// The copy's version.
        version: u64,
    },
}

/// The latest Lamport time a node accepts. Clocks advance by one per request, so honest nodes
/// stay far below it (2^63 requests); a larger time can only be a fault, and taking it would
/// leave the clock no room to grow.
pub const MAX_TIMESTAMP: u64 = u64::MAX / 2;

/// One output of [`Protocol::poll_output`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Apply it now: it comes before every message it may depend on.
    Event(Event),
    /// Send `message` to `to` (after every event before it, in this order).
    Send {
        /// The destination.
        to: NodeId,
        /// The message.
        message: Message,
    },
}

/// Something the driver must act on, in order, before sending this step's messages.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Event {
    /// The local copy of `object` is readable with this value.
    Readable {
        /// The object's name.
        object: Arc<str>,
        /// The value now readable.
        value: Value,
    },
    /// The local copy of `object` may no longer be read.
    Unreadable {
        /// The object's name.
        object: Arc<str>,
    },
    /// A local operation finished.
    Completed {
        /// The operation.
        op: OpId,
        /// Its result.
        outcome: Outcome,
    },
    /// [`Protocol::leave`] finished: every peer acknowledged and no token is left here
    /// (unless no peer remains, in which case the objects end with this node).
    Left,
}

/// A read-only view of one object's tokens at one node, for tests and statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenView {
    /// Tokens held, including the owner token.
    pub tokens: u32,
    /// Whether the owner token is held.
    pub owner: bool,
    /// The total this node last saw (current whenever `tokens > 0`).
    pub total: u32,
    /// Whether the local value may be read (needs `tokens > 0`).
    pub readable: bool,
    /// Version of the local value, if the node has one.
    pub version: Option<u64>,
}

/// A request in a node's table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Entry {
    access: Access,
    have_version: Option<u64>,
    init: Option<Init>,
    /// This node, as owner, already sent the requester a token for this read.
    served: bool,
}

/// The active requests of one object, in priority order. A sorted `Vec`: there are at most as
/// many as nodes, and a `BTreeMap` allocated and freed a node each time its only request came
/// and went, which was most of a write's allocations.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Requests(Vec<(RequestId, Entry)>);

impl Requests {
    fn position(&self, id: &RequestId) -> Result<usize, usize> {
        self.0.binary_search_by(|(other, _)| other.cmp(id))
    }

    /// Adds a request, replacing one with the same id.
    fn insert(&mut self, id: RequestId, entry: Entry) {
        match self.position(&id) {
            Ok(at) => self.0[at].1 = entry,
            Err(at) => self.0.insert(at, (id, entry)),
        }
    }

    fn remove(&mut self, id: &RequestId) {
        if let Ok(at) = self.position(id) {
            self.0.remove(at);
        }
    }

    fn get(&self, id: &RequestId) -> &Entry {
        let at = self.position(id).expect("a known request");
        &self.0[at].1
    }

    fn first_id(&self) -> Option<&RequestId> {
        self.0.first().map(|(id, _)| id)
    }

    fn iter(&self) -> impl Iterator<Item = &(RequestId, Entry)> {
        self.0.iter()
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}

/// Tokens that came for a request this node no longer has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Stray {
    sender: NodeId,
    count: u32,
    /// The version the tokens came with.
    version: Option<u64>,
}

/// A write whose value waits for copies at other members before it is applied
/// (durability): the node keeps every token meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Replicating {
    op: OpId,
    value: Value,
    /// Members that hold a copy.
    copies: BTreeSet<NodeId>,
    /// Copies the write waits for: the durability, or the other members if fewer.
    needed: usize,
}

/// What one node holds of every object when it promises a view change: for each object the
/// newest value it has, readable or not, including a copy kept for another writer and its own
/// write waiting for copies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Report {
    /// The newest value of each object known here.
    pub values: BTreeMap<Arc<str>, Value>,
    /// Objects this node holds every token of for an `update` (locked, or its write waiting
    /// to be applied): it keeps them in the next epoch, so the update goes on.
    pub held: BTreeSet<Arc<str>>,
}

/// The token recreation a view change decides: each object's value in the new epoch (the
/// newest any reporting member held), and who gets its tokens: one each to the staying
/// members that had the object (they use it; a member that never opened it, or a joiner, may
/// not be running yet, and a token there would wait for it), the lowest of them with the owner
/// token; an object a staying member held for an `update` wholly to that member, so the update
/// goes on; an object only removed members had, wholly to the lowest staying member. The
/// lowest-id member takes the genesis role. Every member learns every value, so a later read
/// request names the version it has and the owner sends no data.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Plan {
    /// The value each object has in the new epoch; an object missing here exists nowhere.
    pub values: BTreeMap<Arc<str>, Value>,
    /// Who gets one token of each object (the first one also the owner token).
    pub tokens: BTreeMap<Arc<str>, BTreeSet<NodeId>>,
}

/// A local write waiting for all tokens: with bytes it is applied at once, without it locks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PendingWrite {
    op: OpId,
    bytes: Option<Bytes>,
}

/// This node's active request for one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Mine {
    id: RequestId,
    /// Broadcast to the members yet.
    announced: bool,
    /// It already let a batch of local writes run: writes queued later need a new request,
    /// ordered after the requests that arrived meanwhile, so local writers cannot starve
    /// remote ones.
    spent: bool,
}

/// One object as seen by this node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Object {
    tokens: u32,
    owner: bool,
    total: u32,
    /// Last value known here; readable only while `tokens > 0 && valid`.
    value: Option<Value>,
    valid: bool,
    /// The version the driver was last told is readable.
    published: Option<u64>,
    /// Every known active request, in priority order.
    requests: Requests,
    /// Nodes that opened the object: they get the new value after a write (Update policy).
    interested: BTreeSet<NodeId>,
    /// This node's active request.
    mine: Option<Mine>,
    /// Local operations waiting for a token.
    readers: Vec<OpId>,
    openers: Vec<(OpId, Init)>,
    writers: VecDeque<PendingWrite>,
    /// A granted write holds the object until [`Protocol::commit`].
    locked: Option<OpId>,
    /// The lock was committed while this node was frozen: its write waits, first in line,
    /// for the next epoch, and the object is still held for it.
    committed_frozen: bool,
    /// A write was applied that the write policy has not acted on yet.
    unshared_write: bool,
    /// The last update this node pushed after a write (Update policy).
    pushed: Pushed,
    /// This node's write waiting for copies (durability).
    replicating: Option<Replicating>,
    /// A copy of another writer's value, kept for a view change's report (never readable).
    replica: Option<Value>,
    /// Tokens of the grant being handled, if they came for a request this node no longer has:
    /// the step sends as many back (see [`Grant::for_request`]).
    stray: Option<Stray>,
}

/// An update a writer pushed: the new version, with one token, to each of `to`.
///
/// A read request from one of them that names an older version (or none) left its node before
/// the push arrived there (a node's version only grows), so the push, which carries the value,
/// completes it. Without this the owner handed its last token to such a request, lost its own
/// reads and got a stray token back. The record never needs clearing: what it says about a
/// past push stays true.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
struct Pushed {
    version: u64,
    to: Vec<NodeId>,
}

impl Pushed {
    /// Whether this push answers a read request of `node` that has version `have` (none: the
    /// node had no value yet, so it asked before the push arrived too). This covers the
    /// targets' requests already waiting when the push left as well as those that crossed it.
    fn answers(&self, node: NodeId, have: Option<u64>) -> bool {
        have.is_none_or(|have| have < self.version) && self.to.contains(&node)
    }
}

impl Object {
    fn readable(&self) -> bool {
        self.tokens > 0 && self.valid
    }

    fn current(&self) -> Value {
        self.value.clone().expect("a readable object has a value")
    }
}

/// The protocol state of one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Protocol {
    id: NodeId,
    policy: WritePolicy,
    /// How many other members must hold a write's value before the write is applied.
    durability: u32,
    /// This node promised to take part in a view change: it acts on nothing until the next
    /// view is installed.
    frozen: bool,
    /// A view without this node was installed: it serves nothing any more.
    removed: bool,
    clock: u64,
    members: BTreeSet<NodeId>,
    /// How many other members the view has, reachable or not: what a write's copies are
    /// counted against (a member cut off from the others must not count them out).
    view_others: usize,
    objects: BTreeMap<Arc<str>, Object>,
    /// Whether this node creates objects nobody has created yet (node 0 at first).
    genesis: bool,
    /// Objects created by a genesis node so far (complete only while `genesis`).
    created: BTreeSet<Arc<str>>,
    leaving: bool,
    /// Peers that announced their leave but have not closed yet: they may still send to us.
    departing: BTreeSet<NodeId>,
    awaiting_acks: BTreeSet<NodeId>,
    left: bool,
    /// Readability changes, applied before `completions` (see [`Protocol::poll_output`]).
    readability: VecDeque<Event>,
    completions: VecDeque<Event>,
    sends: VecDeque<(NodeId, Message)>,
}

impl Protocol {
    /// A node `id` that knows `peers`. Node 0 founds the cluster and starts as genesis.
    pub fn new(id: NodeId, peers: impl IntoIterator<Item = NodeId>, policy: WritePolicy) -> Self {
        Protocol {
            id,
            policy,
            durability: 0,
            frozen: false,
            removed: false,
            clock: 0,
            members: peers.into_iter().filter(|&p| p != id).collect(),
            view_others: 0,
            objects: BTreeMap::new(),
            genesis: id == 0,
            created: BTreeSet::new(),
            leaving: false,
            departing: BTreeSet::new(),
            awaiting_acks: BTreeSet::new(),
            left: false,
            readability: VecDeque::new(),
            completions: VecDeque::new(),
            sends: VecDeque::new(),
        }
    }

    /// Makes every write wait until `copies` other members (or every other member, if fewer)
    /// hold its value before it is applied and returns, so a write that returned survives its
    /// writer's crash (with views). The node keeps every token of the object meanwhile; reads
    /// there see the previous value.
    pub fn with_durability(mut self, copies: u32) -> Self {
        self.durability = copies;
        self
    }

    /// Copies a write waits for now: the durability, or the other members if fewer (a copy
    /// needs a member to hold it; with none, nothing could survive this node anyway).
    /// With any durability, the writer and its copies are a majority of the view as well:
    /// every later view is decided by a majority, which then includes a holder of the value,
    /// even when the writer and some copies are cut off together (a partition) rather than
    /// crashed.
    fn copies_needed(&self) -> usize {
        if self.durability == 0 {
            return 0;
        }
        let others = self.view_others.max(self.members.len());
        let view = others + 1;
        (self.durability as usize).max(view / 2).min(others)
    }

    /// Whether `op` is a write still to be applied (waiting for copies, or committed while
    /// frozen): it completes with an event.
    pub fn completes_later(&self, op: OpId) -> bool {
        self.objects.values().any(|o| {
            o.replicating.as_ref().is_some_and(|r| r.op == op)
                || o.writers.iter().any(|w| w.op == op && w.bytes.is_some())
        })
    }

    /// Whether this node promised a view change and waits for the next view.
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Whether a view without this node was installed.
    pub fn is_removed(&self) -> bool {
        self.removed
    }

    /// This node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The peers this node currently sends to.
    pub fn members(&self) -> &BTreeSet<NodeId> {
        &self.members
    }

    /// Whether [`Protocol::leave`] was called.
    pub fn is_leaving(&self) -> bool {
        self.leaving
    }

    /// Whether this node currently holds the genesis role.
    pub fn is_genesis(&self) -> bool {
        self.genesis
    }

    /// Token state of `object` here, if this node has heard of it.
    pub fn token_view(&self, object: &str) -> Option<TokenView> {
        self.objects.get(object).map(|o| TokenView {
            tokens: o.tokens,
            owner: o.owner,
            total: o.total,
            readable: o.readable(),
            version: o.value.as_ref().map(|v| v.version),
        })
    }

    /// This node's shared copy of the name `object`, if it has heard of it: a decoded message
    /// can use it instead of allocating the name again.
    pub fn shared_name(&self, object: &str) -> Option<Arc<str>> {
        self.objects
            .get_key_value(object)
            .map(|(name, _)| Arc::clone(name))
    }

    /// Names of every object this node has heard of.
    pub fn object_names(&self) -> impl Iterator<Item = &str> {
        self.objects.keys().map(|name| &**name)
    }

    /// The value readable here, if any.
    pub fn readable_value(&self, object: &str) -> Option<&Value> {
        self.objects
            .get(object)
            .filter(|o| o.readable())
            .and_then(|o| o.value.as_ref())
    }

    /// Whether any local operation or own request is still active.
    pub fn is_busy(&self) -> bool {
        self.objects.values().any(|o| {
            o.mine.is_some()
                || o.locked.is_some()
                || o.replicating.is_some()
                || !o.readers.is_empty()
                || !o.openers.is_empty()
                || !o.writers.is_empty()
        })
    }

    /// Number of active requests (own and others') known here.
    pub fn known_requests(&self) -> usize {
        self.objects.values().map(|o| o.requests.len()).sum()
    }

    /// The next output, in the order the driver must act on it: every event of the inputs so
    /// far (readability changes first, so the caller of a completed operation already sees the
    /// value it wrote or read), then the messages to send, in order. A driver that acts on each
    /// output as it comes cannot send a message before the event it depends on was applied.
    pub fn poll_output(&mut self) -> Option<Output> {
        if let Some(event) = self.readability.pop_front() {
            return Some(Output::Event(event));
        }
        if let Some(event) = self.completions.pop_front() {
            return Some(Output::Event(event));
        }
        self.sends
            .pop_front()
            .map(|(to, message)| Output::Send { to, message })
    }

    /// The shared name of `object`, adding the object if this node has not heard of it: the
    /// table, messages and events then share one allocation of the name.
    fn intern(&mut self, object: &str) -> Arc<str> {
        if let Some((name, _)) = self.objects.get_key_value(object) {
            return Arc::clone(name);
        }
        let name: Arc<str> = Arc::from(object);
        self.objects.insert(Arc::clone(&name), Object::default());
        name
    }

    // ----- local operations -----

    /// Opens `object`, creating it with `init` if it exists nowhere yet.
    pub fn open(&mut self, op: OpId, object: &str, init: Init) {
        if self.aborted_while_leaving(op) {
            return;
        }
        let name = self.intern(object);
        self.object(&name).openers.push((op, init));
        self.step(&name);
    }

    /// Reads `object` (completes at once if a token is here).
    pub fn read(&mut self, op: OpId, object: &str) {
        if self.aborted_while_leaving(op) {
            return;
        }
        let name = self.intern(object);
        self.object(&name).readers.push(op);
        self.step(&name);
    }

    /// Writes `bytes` to `object` once all tokens are here.
    pub fn write(&mut self, op: OpId, object: &str, bytes: Bytes) {
        self.queue_write(op, object, Some(bytes));
    }

    /// Gathers all tokens of `object` and locks it until [`Protocol::commit`]: for
    /// read-modify-write, where the new value is computed from the current one.
    pub fn lock(&mut self, op: OpId, object: &str) {
        self.queue_write(op, object, None);
    }

    fn queue_write(&mut self, op: OpId, object: &str, bytes: Option<Bytes>) {
        if self.aborted_while_leaving(op) {
            return;
        }
        let name = self.intern(object);
        self.object(&name)
            .writers
            .push_back(PendingWrite { op, bytes });
        self.step(&name);
    }

    /// A leaving node starts nothing: its `Leaving` is out, so peers forget any request it
    /// issued now, and tokens they sent for it could arrive after it closed. (A caller on
    /// another thread can start an operation while `shutdown` runs.)
    fn aborted_while_leaving(&mut self, op: OpId) -> bool {
        let outcome = if self.removed {
            Outcome::Removed
        } else if self.leaving {
            Outcome::Aborted
        } else {
            return false;
        };
        self.completions.push_back(Event::Completed { op, outcome });
        true
    }

    /// An object known to exist (interned, stepped, or listed).
    fn object(&mut self, name: &str) -> &mut Object {
        self.objects.get_mut(name).expect("known objects exist")
    }

    /// Ends the lock of a granted operation, writing `bytes` if given. Returns the version now
    /// held, or `None` if `op` holds no lock.
    ///
    /// With durability, a write is applied once enough members hold a copy, and a node that
    /// froze for a view change while the lock was held applies it in the next epoch: then the
    /// returned version is the one it will have, and [`Event::Completed`] with
    /// [`Outcome::Written`] follows ([`Protocol::completes_later`] tells). A view change keeps
    /// a lock with its holder.
    pub fn commit(&mut self, op: OpId, bytes: Option<Bytes>) -> Option<u64> {
        let name = self.find_lock(op)?;
        let needed = self.copies_needed();
        let o = self.objects.get_mut(&name).expect("found above");
        o.locked = None;
        let version = match bytes {
            Some(bytes) if self.frozen => {
                // Applied in the next epoch, where the plan leaves the object with this node
                // (it reported it held); first in line, so nothing comes in between.
                let version = o.current().version + 1;
                let bytes = Some(bytes);
                o.writers.push_front(PendingWrite { op, bytes });
                o.committed_frozen = true;
                Some(version)
            }
            Some(bytes) if needed > 0 => Some(start_replicating(
                &name,
                o,
                op,
                bytes,
                (&self.members, needed),
                &mut self.sends,
            )),
            Some(bytes) => Some(apply_write(o, bytes)),
            None => Some(o.current().version),
        };
        self.step(&name);
        version
    }

    fn find_lock(&self, op: OpId) -> Option<Arc<str>> {
        self.objects
            .iter()
            .find(|(_, o)| o.locked == Some(op))
            .map(|(name, _)| Arc::clone(name))
    }

    /// Abandons a waiting operation (its caller timed out). A granted lock is released without
    /// writing. Returns false if `op` is not active (it may have completed meanwhile).
    pub fn cancel(&mut self, op: OpId) -> bool {
        if self.commit(op, None).is_some() {
            return true;
        }
        let found = self.objects.iter_mut().find_map(|(name, o)| {
            let before = o.readers.len() + o.openers.len() + o.writers.len();
            o.readers.retain(|&r| r != op);
            o.openers.retain(|(r, _)| *r != op);
            o.writers.retain(|w| w.op != op);
            (before != o.readers.len() + o.openers.len() + o.writers.len()).then(|| name.clone())
        });
        let Some(name) = found else {
            return false;
        };
        self.step(&name);
        true
    }

    /// Leaves the cluster: abandons local operations, hands every token and the genesis role
    /// on, and announces the departure. [`Event::Left`] follows once every peer acknowledged.
    pub fn leave(&mut self) {
        if self.leaving {
            return;
        }
        self.leaving = true;
        let names: Vec<Arc<str>> = self.objects.keys().cloned().collect();
        for name in &names {
            let o = self.objects.get_mut(name).expect("listed");
            let mut aborted: Vec<OpId> = o.readers.drain(..).collect();
            aborted.extend(o.openers.drain(..).map(|(op, _)| op));
            aborted.extend(o.writers.drain(..).map(|w| w.op));
            aborted.extend(o.locked.take());
            for op in aborted {
                self.completions.push_back(Event::Completed {
                    op,
                    outcome: Outcome::Aborted,
                });
            }
            self.step(name);
        }
        // A departing peer may still send us tokens until it has seen our `Leaving`, so it must
        // acknowledge too (or close, which the transport reports).
        self.awaiting_acks = self.members.union(&self.departing).copied().collect();
        for &peer in &self.awaiting_acks {
            self.sends.push_back((peer, Message::Leaving));
        }
        if self.genesis {
            self.genesis = false;
            let created = std::mem::take(&mut self.created);
            if let Some(&heir) = self.members.iter().next() {
                self.sends.push_back((heir, Message::Genesis { created }));
            }
        }
        self.check_left();
    }

    // ----- views -----

    /// Installs a decided view: the tokens of the previous epoch are gone, and every object
    /// starts again from `plan` (one token and the planned value at each member, the owner
    /// token and the genesis role at the lowest-id member). Operations the view change cut
    /// short end as [`Outcome::Interrupted`], a waiting write whose value the plan kept as
    /// [`Outcome::Written`]; operations still waiting are asked for again in the new epoch. A
    /// node the view does not name is removed: everything it waits for ends as
    /// [`Outcome::Removed`] and it serves nothing more.
    pub fn install(&mut self, view: &View, plan: &Plan) {
        let member = view.members.contains(&self.id);
        let first = view.members.iter().next().copied();
        self.members = view
            .members
            .iter()
            .copied()
            .filter(|&m| m != self.id)
            .collect();
        self.view_others = self.members.len();
        self.frozen = false;
        self.removed = !member;
        self.genesis = member && first == Some(self.id);
        self.created = if self.genesis {
            plan.values.keys().cloned().collect()
        } else {
            BTreeSet::new()
        };
        self.departing.clear();
        self.awaiting_acks.clear();
        let mut names: Vec<Arc<str>> = self.objects.keys().cloned().collect();
        for name in plan.values.keys() {
            if !self.objects.contains_key(name) {
                self.objects.insert(Arc::clone(name), Object::default());
                names.push(Arc::clone(name));
            }
        }
        for name in &names {
            let o = self.objects.get_mut(name).expect("listed");
            let planned = plan.values.get(name);
            if let Some(pending) = o.replicating.take() {
                let outcome = if planned == Some(&pending.value) {
                    Outcome::Written {
                        version: pending.value.version,
                    }
                } else {
                    Outcome::Interrupted
                };
                let op = pending.op;
                self.completions.push_back(Event::Completed { op, outcome });
            }
            let receivers = plan.tokens.get(name);
            let receives = member && receivers.is_some_and(|r| r.contains(&self.id));
            let keeps = receives && receivers.is_some_and(|r| r.len() == 1);
            let lock = o.locked.take();
            if let Some(op) = lock.filter(|_| !keeps) {
                let outcome = if member {
                    Outcome::Interrupted
                } else {
                    Outcome::Removed
                };
                self.completions.push_back(Event::Completed { op, outcome });
            }
            let mut waiting = Object {
                readers: std::mem::take(&mut o.readers),
                openers: std::mem::take(&mut o.openers),
                writers: std::mem::take(&mut o.writers),
                published: o.published,
                locked: lock.filter(|_| keeps),
                ..Object::default()
            };
            if !member {
                let ops = waiting
                    .readers
                    .drain(..)
                    .chain(waiting.openers.drain(..).map(|(op, _)| op));
                let ops: Vec<OpId> = ops.chain(waiting.writers.drain(..).map(|w| w.op)).collect();
                for op in ops {
                    let outcome = Outcome::Removed;
                    self.completions.push_back(Event::Completed { op, outcome });
                }
            } else if let Some(value) = planned {
                waiting.value = Some(value.clone());
                if let Some(receivers) = receivers.filter(|_| receives) {
                    waiting.tokens = 1;
                    waiting.total = receivers.len() as u32;
                    waiting.owner = receivers.iter().next() == Some(&self.id);
                    waiting.valid = true;
                    waiting.interested = receivers
                        .iter()
                        .copied()
                        .filter(|&n| n != self.id)
                        .collect();
                }
            }
            *o = waiting;
        }
        for name in &names {
            self.step(name);
        }
    }

    /// Stops acting in the current epoch: nothing is readable here until the next view.
    fn freeze(&mut self) {
        self.frozen = true;
        let names: Vec<Arc<str>> = self.objects.keys().cloned().collect();
        for name in &names {
            self.object(name).valid = false;
            self.step(name);
        }
    }

    // ----- network input -----

    /// A peer joined: it learns this node's active requests (the lab's "new process" rule is
    /// served by its own open request).
    pub fn peer_joined(&mut self, peer: NodeId) {
        if peer == self.id || !self.members.insert(peer) {
            return;
        }
        self.view_others = self.view_others.max(self.members.len());
        if self.leaving {
            self.sends.push_back((peer, Message::Leaving));
            self.awaiting_acks.insert(peer);
            return;
        }
        for (name, o) in &self.objects {
            if let Some(mine) = o.mine.filter(|m| m.announced) {
                let entry = o.requests.get(&mine.id);
                self.sends
                    .push_back((peer, Message::Request(request_of(name, mine.id, entry))));
            }
        }
    }

    /// A peer left or was lost: forget it and its requests. A report about this node itself
    /// (a transport bug) is ignored: forgetting its own requests would lose track of them.
    pub fn peer_left(&mut self, peer: NodeId) {
        if peer == self.id {
            return;
        }
        self.forget(peer);
        self.departing.remove(&peer);
        self.awaiting_acks.remove(&peer);
        self.check_left();
    }

    /// One message from `from`. A message no correct peer sends is refused whole (see
    /// [`Rejected`]).
    pub fn handle(&mut self, from: NodeId, message: Message) -> Result<(), Rejected> {
        self.check(from, &message)?;
        match message {
            Message::Request(request) => {
                self.clock = self.clock.max(request.id.ts);
                let name = self.intern(&request.object);
                let o = self.object(&name);
                o.interested.insert(request.id.node);
                o.requests.insert(
                    request.id,
                    Entry {
                        access: request.access,
                        have_version: request.have_version,
                        init: request.init,
                        served: false,
                    },
                );
                self.step(&name);
            }
            Message::Grant(grant) => {
                let name = self.intern(&grant.object);
                let o = self.object(&name);
                if grant.for_request && o.mine.is_none() {
                    o.stray = Some(Stray {
                        sender: from,
                        count: grant.count,
                        version: grant.version,
                    });
                }
                receive_grant(o, grant);
                self.step(&name);
            }
            Message::Done { object, id } => {
                if let Some(o) = self.objects.get_mut(&object) {
                    o.requests.remove(&id);
                    self.step(&object);
                }
            }
            Message::Leaving => {
                self.forget(from);
                self.departing.insert(from);
                self.sends.push_back((from, Message::LeaveAck));
            }
            Message::LeaveAck => {
                self.awaiting_acks.remove(&from);
                self.check_left();
            }
            Message::Genesis { created } => self.take_genesis(created),
            Message::Replicate { object, value } => {
                let name = self.intern(&object);
                let o = self.object(&name);
                let version = value.version;
                let held = [o.value.as_ref(), o.replica.as_ref()]
                    .into_iter()
                    .flatten()
                    .map(|v| v.version)
                    .max();
                if held.is_none_or(|held| held < version) {
                    o.replica = Some(value);
                }
                self.sends.push_back((
                    from,
                    Message::Replicated {
                        object: name,
                        version,
                    },
                ));
            }
            Message::Replicated { object, version } => {
                let Some(o) = self.objects.get_mut(&object) else {
                    return Ok(());
                };
                let Some(pending) = o
                    .replicating
                    .as_mut()
                    .filter(|r| r.value.version == version)
                else {
                    // A copy for a write that already has enough of them.
                    return Ok(());
                };
                pending.copies.insert(from);
                if pending.copies.len() >= pending.needed {
                    let Replicating { op, value, .. } = o.replicating.take().expect("checked");
                    let version = value.version;
                    o.value = Some(value);
                    o.unshared_write = true;
                    self.completions.push_back(Event::Completed {
                        op,
                        outcome: Outcome::Written { version },
                    });
                    self.step(&object);
                    self.check_left();
                }
            }
        }
        Ok(())
    }

    /// Frames to `to` could not be sent: the transport no longer counts it a member (its `Left`
    /// is on the way). The messages never left, so the tokens and the genesis role they carried
    /// are still this node's. `to` is forgotten first, so they do not go there again.
    pub fn send_failed(&mut self, to: NodeId, messages: impl IntoIterator<Item = Message>) {
        self.peer_left(to);
        for message in messages {
            match message {
                Message::Grant(grant) => {
                    let name = self.intern(&grant.object);
                    receive_grant(self.object(&name), grant);
                    self.step(&name);
                }
                Message::Genesis { created } => self.take_genesis(created),
                Message::Request(_)
                | Message::Done { .. }
                | Message::Leaving
                | Message::LeaveAck
                | Message::Replicate { .. }
                | Message::Replicated { .. } => {}
            }
        }
    }

    /// The genesis role arrived: keep it, or pass it straight on while leaving.
    fn take_genesis(&mut self, created: BTreeSet<Arc<str>>) {
        if self.leaving {
            if let Some(&heir) = self.members.iter().next() {
                self.sends.push_back((heir, Message::Genesis { created }));
            }
        } else {
            self.genesis = true;
            self.created.extend(created);
            let names: Vec<Arc<str>> = self.objects.keys().cloned().collect();
            for name in names {
                self.step(&name);
            }
        }
    }

    /// Refuses what no correct peer sends; see [`Rejected`].
    fn check(&self, from: NodeId, message: &Message) -> Result<(), Rejected> {
        if from == self.id {
            return Err(Rejected::FromSelf);
        }
        match message {
            Message::Request(Request { id, .. }) | Message::Done { id, .. } if id.node != from => {
                Err(Rejected::NotTheOwner {
                    from,
                    owner: id.node,
                })
            }
            Message::Request(request) if request.id.ts > MAX_TIMESTAMP => {
                Err(Rejected::TimestampTooLate(request.id.ts))
            }
            Message::Grant(grant) => check_grant(self.objects.get(&grant.object), grant),
            Message::Replicate { object, value } => match self.objects.get(object) {
                Some(o)
                    if o.readable()
                        && o.value.as_ref().is_some_and(|v| v.version < value.version) =>
                {
                    Err(Rejected::ReplicaOfHeldObject {
                        from,
                        object: Arc::clone(object),
                        version: value.version,
                    })
                }
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    // ----- the engine -----

    fn forget(&mut self, peer: NodeId) {
        self.members.remove(&peer);
        let names: Vec<Arc<str>> = self.objects.keys().cloned().collect();
        for name in names {
            let o = self.objects.get_mut(&name).expect("listed");
            o.interested.remove(&peer);
            o.requests.0.retain(|(id, _)| id.node != peer);
            self.step(&name);
        }
    }

    fn check_left(&mut self) {
        // A write waiting for copies keeps the tokens here until it is applied.
        let replicating = self.objects.values().any(|o| o.replicating.is_some());
        if self.leaving && !self.left && self.awaiting_acks.is_empty() && !replicating {
            self.left = true;
            self.completions.push_back(Event::Left);
        }
    }

    /// Runs `object` to a fixed point after any input: create it if this node is genesis,
    /// complete what can complete, issue or cancel the own request, pass idle tokens on, and
    /// publish readability changes.
    fn step(&mut self, name: &Arc<str>) {
        // Frozen or removed, a node only withdraws readability: operations wait for the
        // next view (or end as `Removed`).
        if !self.frozen && !self.removed {
            self.create_if_genesis(name);
            loop {
                let progressed = self.complete_local(name);
                let reissued = self.update_own_request(name);
                if !progressed && !reissued {
                    break;
                }
            }
            self.pass_tokens_on(name);
        }
        self.finish_step(name);
    }

    /// Genesis holds, virtually, every token of every object nobody created yet: on the first
    /// opening request it creates the object with that request's init, so exactly one init wins.
    fn create_if_genesis(&mut self, name: &Arc<str>) {
        if !self.genesis || self.created.contains(name) {
            return;
        }
        let o = self.objects.get_mut(name).expect("stepped objects exist");
        let init = o
            .openers
            .first()
            .map(|(_, init)| init.clone())
            .or_else(|| o.requests.iter().find_map(|(_, e)| e.init.clone()));
        let Some(init) = init else {
            return;
        };
        debug_assert_eq!(o.tokens, 0, "an uncreated object has no tokens anywhere");
        o.tokens = 1;
        o.total = 1;
        o.owner = true;
        o.valid = true;
        o.value = Some(Value {
            version: 0,
            type_name: init.type_name,
            bytes: init.bytes,
        });
        self.created.insert(Arc::clone(name));
    }

    /// Completes local operations the held tokens allow. Returns whether anything completed.
    /// A node holding every token applies its queued writes at once; the tokens go on to other
    /// requests in the same step, so that overtakes by at most one batch.
    fn complete_local(&mut self, name: &Arc<str>) -> bool {
        let needed = self.copies_needed();
        let o = self.objects.get_mut(name).expect("stepped objects exist");
        if !o.readable() {
            return false;
        }
        let mut progressed = false;
        // Cloned only for someone: a clone counts two references up and down again.
        if !o.readers.is_empty() || !o.openers.is_empty() {
            let value = o.current();
            for op in o.readers.drain(..) {
                self.completions.push_back(Event::Completed {
                    op,
                    outcome: Outcome::Read(value.clone()),
                });
            }
            for (op, _) in o.openers.drain(..) {
                self.completions.push_back(Event::Completed {
                    op,
                    outcome: Outcome::Opened(value.clone()),
                });
            }
            progressed = true;
        }
        // Writes run while every token is here and this node's turn has come: its request is
        // the first in the table (or nobody else asked).
        let turn = match (o.mine, o.requests.first_id()) {
            (Some(mine), first) => !mine.spent && first == Some(&mine.id),
            (None, first) => first.is_none(),
        };
        while turn && o.tokens == o.total && o.locked.is_none() && o.replicating.is_none() {
            let Some(pending) = o.writers.pop_front() else {
                break;
            };
            progressed = true;
            if let Some(mine) = o.mine.as_mut() {
                mine.spent = true;
            }
            let outcome = match pending.bytes {
                Some(bytes) if needed > 0 => {
                    // Completes when enough copies are acknowledged.
                    let copies = (&self.members, needed);
                    start_replicating(name, o, pending.op, bytes, copies, &mut self.sends);
                    continue;
                }
                Some(bytes) => Outcome::Written {
                    version: apply_write(o, bytes),
                },
                None => {
                    o.locked = Some(pending.op);
                    Outcome::Granted(o.current())
                }
            };
            self.completions.push_back(Event::Completed {
                op: pending.op,
                outcome,
            });
        }
        if o.unshared_write && o.locked.is_none() && o.replicating.is_none() && o.writers.is_empty()
        {
            o.unshared_write = false;
            self.after_write(name);
        }
        progressed
    }

    /// Issues the own request when local operations wait, retires it when none do. Returns
    /// whether it issued a new request (which may already be this node's turn).
    fn update_own_request(&mut self, name: &Arc<str>) -> bool {
        let o = self.objects.get_mut(name).expect("stepped objects exist");
        let wanted = if !o.writers.is_empty() {
            Some(Access::Write)
        } else if !o.readers.is_empty() || !o.openers.is_empty() {
            Some(Access::Read)
        } else {
            None
        };
        if o.locked.is_some() {
            return false;
        }
        let spent = o.mine.is_some_and(|m| m.spent);
        let current = o.mine.map(|m| o.requests.get(&m.id).access);
        if !spent && current == wanted {
            return false;
        }
        // A read request does not serve a waiting write; a write request serves waiting reads.
        if !spent && current == Some(Access::Write) && wanted == Some(Access::Read) {
            return false;
        }
        self.retire_own_request(name);
        let o = self.objects.get_mut(name).expect("stepped objects exist");
        if let Some(access) = wanted {
            self.clock += 1;
            let id = RequestId {
                ts: self.clock,
                node: self.id,
            };
            let init = o.openers.first().map(|(_, init)| init.clone());
            o.requests.insert(
                id,
                Entry {
                    access,
                    have_version: o.value.as_ref().map(|v| v.version),
                    init,
                    served: false,
                },
            );
            o.mine = Some(Mine {
                id,
                announced: false,
                spent: false,
            });
            return true;
        }
        false
    }

    /// Removes the own request from the table and tells every member it is finished.
    fn retire_own_request(&mut self, name: &Arc<str>) {
        let o = self.objects.get_mut(name).expect("stepped objects exist");
        let Some(Mine { id, announced, .. }) = o.mine.take() else {
            return;
        };
        o.requests.remove(&id);
        if announced {
            for &peer in &self.members {
                let object = Arc::clone(name);
                self.sends.push_back((peer, Message::Done { object, id }));
            }
        }
    }

    /// Idle tokens flow toward the highest-priority requests: the owner hands one token to each
    /// read ahead of the first write, the first write gets every remaining token. A node stops
    /// at its own request (it is next), and never gives tokens away while locked.
    fn pass_tokens_on(&mut self, name: &Arc<str>) {
        let me = self.id;
        let Protocol {
            objects,
            sends,
            members,
            leaving,
            ..
        } = self;
        let o = objects.get_mut(name).expect("stepped objects exist");
        let stray = o.stray.take();
        if o.locked.is_some() || o.replicating.is_some() || o.tokens == 0 {
            return;
        }
        // Tokens passed to a request of ours that already finished (its `Done` was still on
        // the way, or a read was served twice): as many go straight back. Kept, they would
        // pile up here while their sender lacks them, and readers would then pass one token
        // back and forth; passed on, they could meet another finished request. Our `Done` left
        // before this grant on the same link, so the sender will not pass them here again.
        if let Some(stray) = stray {
            // A write applied earlier may have pushed some tokens out in this very step.
            let count = stray.count.min(o.tokens);
            if !*leaving && count > 0 && members.contains(&stray.sender) {
                let mut grant = take_tokens(name, o, count, None, false);
                // No write can happen while the tokens are here, so the version they came
                // with still holds, even if this node's own copy is older.
                grant.version = grant.version.or(stray.version);
                sends.push_back((stray.sender, Message::Grant(grant)));
            }
        }
        for at in 0..o.requests.len() {
            let (id, ref mut entry) = o.requests.0[at];
            if o.tokens == 0 || id.node == me {
                break;
            }
            let have = entry.have_version;
            match entry.access {
                Access::Read => {
                    if o.owner && !entry.served {
                        entry.served = true;
                        if o.pushed.answers(id.node, have) {
                            continue;
                        }
                        let want = (o.interested.len() as u32 + 1).max(o.total);
                        if o.tokens == o.total && want > o.total {
                            // Minting is safe only while every token is here.
                            o.total = want;
                            o.tokens = want;
                        }
                        let count = if o.tokens > 1 { 1 } else { o.tokens };
                        let grant = take_tokens(name, o, count, have, true);
                        sends.push_back((id.node, Message::Grant(grant)));
                    }
                }
                Access::Write => {
                    let all = o.tokens;
                    let grant = take_tokens(name, o, all, have, true);
                    sends.push_back((id.node, Message::Grant(grant)));
                    break;
                }
            }
        }
        if *leaving && o.tokens > 0 {
            // Nobody asked: hand the rest to a node that uses the object, else to anyone.
            let heir = o
                .requests
                .iter()
                .map(|(id, _)| id.node)
                .find(|&n| n != me)
                .or_else(|| o.interested.iter().copied().find(|&n| n != me))
                .or_else(|| members.iter().next().copied());
            if let Some(heir) = heir {
                let all = o.tokens;
                let grant = take_tokens(name, o, all, None, false);
                sends.push_back((heir, Message::Grant(grant)));
            }
        }
    }

    /// Redistributes after a write, per policy: the Update policy sends the new value with one
    /// token to every interested node, unless a write waits (then the tokens go there).
    fn after_write(&mut self, name: &Arc<str>) {
        // The write request is finished: its `Done` must reach the others before the new
        // tokens, or they would pass those tokens straight back to the finished writer.
        self.retire_own_request(name);
        let me = self.id;
        let Protocol {
            objects,
            sends,
            members,
            ..
        } = self;
        let o = objects.get_mut(name).expect("stepped objects exist");
        let first_other = o.requests.iter().find(|(id, _)| id.node != me);
        let write_waits = matches!(first_other, Some((_, e)) if e.access == Access::Write);
        if self.policy != WritePolicy::Update || write_waits || self.leaving {
            return;
        }
        let is_target = |n: &NodeId| *n != me && members.contains(n);
        let targets = o.interested.iter().filter(|n| is_target(n)).count() as u32;
        if targets == 0 {
            return;
        }
        let want = (targets + 1).max(o.total);
        if o.tokens == o.total && want > o.total {
            o.total = want;
            o.tokens = want;
        }
        o.pushed.version = o.value.as_ref().expect("a writer has a value").version;
        o.pushed.to.clear();
        let mut next = o.interested.iter().copied().find(is_target);
        while let Some(target) = next {
            if o.tokens <= 1 {
                break;
            }
            o.pushed.to.push(target);
            let grant = take_tokens(name, o, 1, None, false);
            sends.push_back((target, Message::Grant(grant)));
            next = o
                .interested
                .range((Bound::Excluded(target), Bound::Unbounded))
                .copied()
                .find(is_target);
        }
    }

    /// Ends a step: broadcasts a new own request, retires a finished one, publishes
    /// readability changes.
    fn finish_step(&mut self, name: &Arc<str>) {
        let o = self.objects.get_mut(name).expect("stepped objects exist");
        // A request that was served within its own step never needs to leave the node.
        let announce = !self.frozen && !self.removed;
        if let Some(mine) = o
            .mine
            .as_mut()
            .filter(|m| announce && !m.announced && !m.spent)
        {
            mine.announced = true;
            let id = mine.id;
            let request = request_of(name, id, o.requests.get(&id));
            for &peer in &self.members {
                self.sends
                    .push_back((peer, Message::Request(request.clone())));
            }
        }
        let readable = o.readable();
        let version = o.value.as_ref().map(|v| v.version);
        if readable && o.published != version {
            o.published = version;
            self.readability.push_back(Event::Readable {
                object: Arc::clone(name),
                value: o.current(),
            });
        } else if !readable && o.published.is_some() {
            o.published = None;
            self.readability.push_back(Event::Unreadable {
                object: Arc::clone(name),
            });
        }
    }
}

impl Recreation<Report, Plan> for Protocol {
    /// Reports the newest value of every object and freezes.
    fn report(&mut self) -> Report {
        let values = self
            .objects
            .iter()
            .filter_map(|(name, o)| {
                let pending = o.replicating.as_ref().map(|r| &r.value);
                let newest = [o.value.as_ref(), o.replica.as_ref(), pending]
                    .into_iter()
                    .flatten()
                    .max_by_key(|v| v.version)?;
                Some((Arc::clone(name), newest.clone()))
            })
            .collect();
        let held = self
            .objects
            .iter()
            .filter(|(_, o)| o.locked.is_some() || o.committed_frozen)
            .map(|(name, _)| Arc::clone(name))
            .collect();
        self.freeze();
        Report { values, held }
    }

    /// Each object's newest reported value. Versions grow by one per write and only the holder
    /// of every token writes, so within an epoch one version names one value; a write that
    /// returned is on `durability + 1` nodes, so it is in the reports unless all of them failed.
    fn plan(
        &self,
        _view: &View,
        members: &BTreeSet<NodeId>,
        reports: &BTreeMap<NodeId, Report>,
    ) -> Plan {
        let mut values: BTreeMap<Arc<str>, Value> = BTreeMap::new();
        let mut users: BTreeMap<Arc<str>, BTreeSet<NodeId>> = BTreeMap::new();
        let mut held: BTreeMap<Arc<str>, NodeId> = BTreeMap::new();
        for (&reporter, report) in reports {
            let stays = members.contains(&reporter);
            for (name, value) in &report.values {
                let newer = values.get(name).is_none_or(|v| v.version < value.version);
                if newer {
                    values.insert(Arc::clone(name), value.clone());
                }
                if stays {
                    users.entry(Arc::clone(name)).or_default().insert(reporter);
                }
            }
            if stays {
                for name in &report.held {
                    held.insert(Arc::clone(name), reporter);
                }
            }
        }
        let first = members.iter().next().copied();
        let tokens = values
            .keys()
            .filter_map(|name| {
                let to = match (held.get(name), users.remove(name)) {
                    (Some(&holder), _) => BTreeSet::from([holder]),
                    (None, Some(users)) => users,
                    (None, None) => BTreeSet::from([first?]),
                };
                Some((Arc::clone(name), to))
            })
            .collect();
        Plan { values, tokens }
    }
}

fn request_of(name: &Arc<str>, id: RequestId, entry: &Entry) -> Request {
    Request {
        id,
        object: Arc::clone(name),
        access: entry.access,
        have_version: entry.have_version,
        init: entry.init.clone(),
    }
}

/// Applies one write (all tokens are here) and returns the new version.
fn apply_write(o: &mut Object, bytes: Bytes) -> u64 {
    debug_assert_eq!(o.tokens, o.total, "writes need every token");
    o.unshared_write = true;
    let value = o.value.as_mut().expect("an owner has a value");
    value.version += 1;
    value.bytes = bytes;
    value.version
}

/// Takes `count` tokens out of `o` (the owner token last), with the value if the receiver, who
/// has `have`, may lack it. Giving the last token away makes the local copy unreadable.
fn take_tokens(
    name: &Arc<str>,
    o: &mut Object,
    count: u32,
    have: Option<u64>,
    for_request: bool,
) -> Grant {
    debug_assert!(count >= 1 && count <= o.tokens);
    let version = o
        .valid
        .then(|| o.value.as_ref().map(|v| v.version))
        .flatten();
    let owner = o.owner && count == o.tokens;
    // Only the owner answers for the data: it sends it unless the receiver has it.
    let value = (o.owner && have != version).then(|| o.current());
    o.tokens -= count;
    if owner {
        o.owner = false;
    }
    if o.tokens == 0 {
        o.valid = false;
    }
    Grant {
        object: Arc::clone(name),
        count,
        owner,
        total: o.total,
        version,
        value,
        for_request,
    }
}

/// Whether `grant` fits the tokens held of its object (`o`; none if never heard of). Every
/// token message carries the current total, and a node holding tokens knows it, so the counts
/// must add up within it; there is one owner token, and it comes with the value unless the
/// receiver has that version.
fn check_grant(o: Option<&Object>, grant: &Grant) -> Result<(), Rejected> {
    let (held, held_total, held_owner, held_version) = o.map_or((0, 0, false, None), |o| {
        (
            o.tokens,
            o.total,
            o.owner,
            o.value.as_ref().map(|v| v.version),
        )
    });
    let fits = grant.count > 0
        && held
            .checked_add(grant.count)
            .is_some_and(|sum| sum <= grant.total)
        && (held == 0 || held_total == grant.total)
        && !(held_owner && grant.owner);
    if !fits {
        return Err(Rejected::TokensDoNotAddUp {
            object: Arc::clone(&grant.object),
            count: grant.count,
            total: grant.total,
            owner: grant.owner,
            held,
            held_total,
            held_owner,
        });
    }
    if grant.owner
        && grant.value.is_none()
        && (grant.version.is_none() || grant.version != held_version)
    {
        return Err(Rejected::OwnerWithoutValue(Arc::clone(&grant.object)));
    }
    Ok(())
}

fn receive_grant(o: &mut Object, grant: Grant) {
    o.tokens += grant.count;
    o.owner |= grant.owner;
    o.total = grant.total;
    if let Some(value) = grant.value {
        o.value = Some(value);
        o.valid = true;
    } else if grant.version.is_some() && grant.version == o.value.as_ref().map(|v| v.version) {
        o.valid = true;
    }
    let newest = o.value.as_ref().map(|v| v.version);
    if o.replica
        .as_ref()
        .is_some_and(|r| Some(r.version) <= newest)
    {
        o.replica = None;
    }
}

/// Starts a write that waits for copies: every member is asked to keep the value, and the node
/// keeps every token until enough of them did. Returns the version the write will have.
fn start_replicating(
    name: &Arc<str>,
    o: &mut Object,
    op: OpId,
    bytes: Bytes,
    (members, needed): (&BTreeSet<NodeId>, usize),
    sends: &mut VecDeque<(NodeId, Message)>,
) -> u64 {
    debug_assert_eq!(o.tokens, o.total, "writes need every token");
    let current = o.current();
    let value = Value {
        version: current.version + 1,
        type_name: current.type_name,
        bytes,
    };
    for &peer in members {
        let object = Arc::clone(name);
        let value = value.clone();
        sends.push_back((peer, Message::Replicate { object, value }));
    }
    let version = value.version;
    o.replicating = Some(Replicating {
        op,
        value,
        copies: BTreeSet::new(),
        needed,
    });
    version
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init() -> Init {
        Init {
            type_name: "i64".into(),
            bytes: Bytes::from_static(b"\x00"),
        }
    }

    /// Node 0 (genesis) and node 1; node 0 has created "x" and holds its only token.
    fn pair_with_object_at_0() -> (Protocol, Protocol) {
        let mut p0 = Protocol::new(0, [1], WritePolicy::Update);
        let p1 = Protocol::new(1, [0], WritePolicy::Update);
        p0.open(1, "x", init());
        let (_, sends) = outputs(&mut p0);
        assert!(sends.is_empty(), "genesis opens locally");
        (p0, p1)
    }

    /// Every output so far: the events, then the messages.
    fn outputs(p: &mut Protocol) -> (Vec<Event>, Vec<(NodeId, Message)>) {
        let (mut events, mut sends) = (Vec::new(), Vec::new());
        while let Some(output) = p.poll_output() {
            match output {
                Output::Event(event) => {
                    assert!(sends.is_empty(), "an event came after a message: {event:?}");
                    events.push(event);
                }
                Output::Send { to, message } => sends.push((to, message)),
            }
        }
        (events, sends)
    }

    /// The messages so far (the events before them are dropped).
    fn sends(p: &mut Protocol) -> Vec<(NodeId, Message)> {
        outputs(p).1
    }

    /// The completions so far (the messages after them are dropped).
    fn completions(p: &mut Protocol) -> Vec<(OpId, Outcome)> {
        completed(outputs(p).0)
    }

    /// The completions among `events`.
    fn completed(events: Vec<Event>) -> Vec<(OpId, Outcome)> {
        events
            .into_iter()
            .filter_map(|e| match e {
                Event::Completed { op, outcome } => Some((op, outcome)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_leaving_node_aborts_new_operations_without_asking_anyone() {
        let (mut p0, mut p1) = pair_with_object_at_0();
        p1.leave();
        let _ = completions(&mut p1);
        let _ = sends(&mut p1);
        p1.open(7, "x", init());
        p1.read(8, "x");
        p1.write(9, "x", Bytes::from_static(b"\x01"));
        p1.lock(10, "x");
        assert_eq!(
            completions(&mut p1),
            [7, 8, 9, 10].map(|op| (op, Outcome::Aborted))
        );
        assert!(
            sends(&mut p1).is_empty(),
            "no request leaves a leaving node"
        );
        assert!(!p1.is_busy());
        // Node 0 is untouched.
        assert_eq!(p0.token_view("x").map(|v| v.tokens), Some(1));
        assert!(sends(&mut p0).is_empty());
    }

    #[test]
    fn messages_no_correct_peer_sends_are_rejected_without_effect() {
        let (mut p0, _) = pair_with_object_at_0();
        let x: Arc<str> = "x".into();
        let grant = |count, owner, total, value: Option<Value>| {
            Message::Grant(Grant {
                object: Arc::clone(&x),
                count,
                owner,
                total,
                version: Some(0),
                value,
                for_request: false,
            })
        };
        let request = |ts, node| {
            Message::Request(Request {
                id: RequestId { ts, node },
                object: Arc::clone(&x),
                access: Access::Write,
                have_version: None,
                init: None,
            })
        };
        let value = Value {
            version: 0,
            type_name: "i64".into(),
            bytes: Bytes::from_static(b"\x00"),
        };
        let cases = [
            (0, request(1, 0), "this node itself"),
            (1, request(1, 2), "a request of node"),
            (
                1,
                Message::Done {
                    object: Arc::clone(&x),
                    id: RequestId { ts: 1, node: 0 },
                },
                "a request of node",
            ),
            (1, request(MAX_TIMESTAMP + 1, 1), "Lamport time"),
            (1, grant(0, false, 1, None), "does not fit"),
            (1, grant(1, false, 1, None), "does not fit"),
            (1, grant(u32::MAX, false, u32::MAX, None), "does not fit"),
            (1, grant(1, true, 2, Some(value.clone())), "does not fit"),
            (1, grant(1, false, 3, None), "does not fit"),
        ];
        for (from, message, reason) in cases {
            let before = p0.clone();
            let error = p0.handle(from, message.clone()).unwrap_err();
            assert!(error.to_string().contains(reason), "{message:?}: {error}");
            assert_eq!(p0, before, "{message:?} changed the state");
        }
        // The owner token without a value, at a node that never had one.
        let mut fresh = Protocol::new(2, [0, 1], WritePolicy::Update);
        let error = fresh.handle(0, grant(1, true, 1, None)).unwrap_err();
        assert_eq!(error, Rejected::OwnerWithoutValue(Arc::clone(&x)));
        assert_eq!(fresh.token_view("x"), None);
        // A correct grant still goes through.
        fresh.handle(0, grant(1, true, 1, Some(value))).unwrap();
        assert_eq!(fresh.token_view("x").map(|v| v.readable), Some(true));
    }

    /// Found by the `protocol_handle` fuzz target: a `Left` about this node itself made it
    /// forget its own pending write, and the next step panicked looking for it.
    #[test]
    fn a_left_report_about_itself_is_ignored() {
        let (_, mut p1) = pair_with_object_at_0();
        p1.write(1, "x", Bytes::from_static(b"\x01"));
        let before = p1.clone();
        p1.peer_left(1);
        assert_eq!(p1, before);
        p1.peer_joined(1);
        assert_eq!(p1, before);
    }

    #[test]
    fn tokens_of_a_refused_send_stay_with_the_sender() {
        let (mut p0, mut p1) = pair_with_object_at_0();
        p1.write(2, "x", Bytes::from_static(b"\x01"));
        for (to, message) in sends(&mut p1) {
            assert_eq!(to, 0);
            p0.handle(1, message).unwrap();
        }
        let out = sends(&mut p0);
        assert!(
            out.iter()
                .any(|(to, m)| *to == 1 && matches!(m, Message::Grant(g) if g.owner)),
            "node 0 grants node 1 every token: {out:?}"
        );
        assert_eq!(p0.token_view("x").map(|v| v.tokens), Some(0));
        // The transport no longer knows node 1: nothing was sent.
        p0.send_failed(1, out.into_iter().map(|(_, m)| m));
        let view = p0.token_view("x").expect("known");
        assert_eq!((view.tokens, view.total, view.owner), (1, 1, true));
        assert!(view.readable, "the value is still the latest");
        assert!(!p0.members().contains(&1));
        assert!(
            sends(&mut p0).is_empty(),
            "nothing goes to the forgotten peer"
        );
    }

    fn bytes(v: u8) -> Bytes {
        Bytes::copy_from_slice(&[v])
    }

    /// The completions and messages so far; every message handed to its destination.
    fn route(from: &mut Protocol, to: &mut [&mut Protocol]) -> Vec<(OpId, Outcome)> {
        let (events, out) = outputs(from);
        for (dest, message) in out {
            if let Some(p) = to.iter_mut().find(|p| p.id() == dest) {
                p.handle(from.id(), message).unwrap();
            }
        }
        completed(events)
    }

    #[test]
    fn a_durable_write_waits_for_its_copies_and_not_for_stale_ones() {
        let node = |id| Protocol::new(id, [0, 1, 2], WritePolicy::Invalidate).with_durability(1);
        let (mut p0, mut p1, mut p2) = (node(0), node(1), node(2));
        p0.open(1, "x", init());
        let _ = outputs(&mut p0);
        p0.write(2, "x", bytes(1));
        assert!(
            route(&mut p0, &mut [&mut p1, &mut p2]).is_empty(),
            "no copy yet"
        );
        assert_eq!(
            p0.token_view("x").unwrap().version,
            Some(0),
            "not applied yet"
        );
        route(&mut p1, &mut [&mut p0]);
        assert_eq!(completions(&mut p0), [(2, Outcome::Written { version: 1 })]);
        // The next write must not count node 2's late answer about version 1.
        p0.write(3, "x", bytes(2));
        let (events, copies) = outputs(&mut p0);
        assert!(events.is_empty());
        route(&mut p2, &mut [&mut p0]);
        assert!(completions(&mut p0).is_empty(), "a stale copy counted");
        for (dest, message) in copies.into_iter().filter(|(dest, _)| *dest == 1) {
            assert_eq!(dest, 1);
            p1.handle(0, message).unwrap();
        }
        route(&mut p1, &mut [&mut p0]);
        assert_eq!(completions(&mut p0), [(3, Outcome::Written { version: 2 })]);
    }

    #[test]
    fn a_view_change_recreates_tokens_from_the_newest_copy() {
        let node = |id| Protocol::new(id, [0, 1, 2], WritePolicy::Update).with_durability(1);
        let (mut p0, mut p1, mut p2) = (node(0), node(1), node(2));
        p0.open(1, "x", init());
        let _ = outputs(&mut p0);
        p0.write(2, "x", bytes(7));
        // Node 1 keeps a copy and answers; node 0 crashes before it hears the answer, and the
        // copy to node 2 is lost.
        route(&mut p0, &mut [&mut p1]);
        let _ = sends(&mut p1);
        let view = View {
            epoch: 1,
            members: [1, 2].into(),
        };
        let reports = BTreeMap::from([(1, p1.report()), (2, p2.report())]);
        assert!(p1.is_frozen() && p2.is_frozen());
        p2.read(3, "x");
        assert!(sends(&mut p2).is_empty(), "a frozen node asks nobody");
        let plan = p1.plan(&view, &view.members, &reports);
        assert_eq!(plan.values["x"].version, 1);
        p1.install(&view, &plan);
        p2.install(&view, &plan);
        // Node 1 had the object: every token is its. Node 2 never opened it: it knows the
        // value, and asks for a token in the new epoch.
        let v1 = p1.token_view("x").unwrap();
        assert_eq!(
            (v1.tokens, v1.total, v1.owner, v1.readable),
            (1, 1, true, true)
        );
        assert_eq!(v1.version, Some(1));
        assert!(p1.is_genesis() && !p2.is_genesis());
        assert_eq!(p2.token_view("x").unwrap().tokens, 0);
        assert!(route(&mut p2, &mut [&mut p1]).is_empty());
        route(&mut p1, &mut [&mut p2]);
        assert_eq!(p2.readable_value("x").unwrap().bytes, bytes(7));
        assert_eq!(
            completions(&mut p2),
            [(3, Outcome::Read(plan.values["x"].clone()))]
        );
        // Node 0 learns of the view it is not in: its write took effect (the plan kept it),
        // and removed, it serves nothing more.
        p0.install(&view, &plan);
        assert_eq!(completions(&mut p0), [(2, Outcome::Written { version: 1 })]);
        p0.read(4, "x");
        assert_eq!(completions(&mut p0), [(4, Outcome::Removed)]);
        assert!(p0.is_removed() && !p0.is_genesis());
    }
}
