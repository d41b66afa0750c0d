//! Wire messages and their versioned codec.
//!
//! A frame is one protocol-version byte, the sender's epoch (a MessagePack integer: every
//! message in the frame belongs to it, see [`crate::member`]) and a MessagePack array of
//! [`Traffic`]. The driver batches everything one step sends to the same peer in one epoch into
//! one frame. Each message is a MessagePack array: an integer tag (`TAG_*`), then the message's
//! fields in declaration order, with [`RequestId`]s and [`Ballot`]s flattened, [`Init`],
//! [`Value`] and proposals as nested arrays, reports and plans as arrays of name-value pairs,
//! absent options as nil and value bytes as MessagePack binary.
//!
//! The codec is written by hand over `rmp` (the MessagePack layer rmp-serde is built on) rather
//! than derived with serde: every write crosses the wire twice, and rmp-serde's derived decoding
//! cost about 1,300 instructions for an 11-byte request (the enum variant named by a string,
//! then a generic visitor per field) against about 150 here. User values stay serde +
//! rmp-serde. A decoded value's bytes share the frame's buffer instead of being copied.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use bytes::Bytes;

use crate::lease::LeaseMessage;
use crate::member::Decision;
use crate::protocol::{Plan, Report};
use crate::transport::{Contact, NodeId};
use crate::view::{Ballot, Epoch, Proposal, ViewMessage};

/// Version of the wire format; a frame with another version is rejected.
pub const PROTOCOL_VERSION: u8 = 6;

/// A message of the view change, carrying reports and the decision (token recreation, contacts).
pub type ViewChange = ViewMessage<Report, Decision>;

/// What one member sends another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Traffic {
    /// Token protocol, valid only within the sender's epoch.
    Token(Message),
    /// View change, which names its own epoch. Boxed: it is rare and several times the size of
    /// the others, and every message is moved a few times on a write's path.
    View(Box<ViewChange>),
    /// Lease requests and grants, valid only within the sender's epoch.
    Lease(LeaseMessage),
    /// A join request a member's transport reported, handed on to the member that proposes
    /// views (the coordinator).
    Join(Contact),
}

/// A message stamped with the epoch its sender was in when it sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Envelope {
    /// The sender's epoch.
    pub epoch: Epoch,
    /// The message.
    pub traffic: Traffic,
}

/// Identifies one request: its Lamport timestamp, then its node. Lower sorts first and has
/// priority, so every node orders the same requests the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId {
    /// Lamport timestamp at the requester when it issued the request.
    pub ts: u64,
    /// The requesting node.
    pub node: NodeId,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// One token and the current value.
    Read,
    /// All tokens.
    Write,
}

/// The value an object is created with, carried by an opening node's request. Only the genesis
/// node uses it, and only if the object does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Init {
    /// Name of the value's type, so a node opening the object with another type gets an error.
    pub type_name: Arc<str>,
    /// The encoded initial value.
    pub bytes: Bytes,
}

/// A value with its version (the number of writes applied to it) and type.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Value {
    /// Writes applied since creation; versions are totally ordered because writes need all tokens.
    pub version: u64,
    /// Name of the value's type (shared: every copy of a value names the same type).
    pub type_name: Arc<str>,
    /// The encoded value.
    pub bytes: Bytes,
}

/// A persistent request for tokens of one object, broadcast to every member.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    /// Priority and identity.
    pub id: RequestId,
    /// The object's name (shared with the node's table, so messages do not copy it).
    pub object: Arc<str>,
    /// Read or write.
    pub access: Access,
    /// The version the requester already holds, so holders can omit unchanged data.
    pub have_version: Option<u64>,
    /// Present when the request opens the object (the lab's NEW_PROCESS).
    pub init: Option<Init>,
}

/// Tokens handed from one node to another (the lab's TOKEN_RELEASE, and with data its
/// DATA_UPDATE).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Grant {
    /// The object's name (shared with the node's table, so messages do not copy it).
    pub object: Arc<str>,
    /// Tokens carried, including the owner token if `owner`.
    pub count: u32,
    /// Whether the owner token is among them; its holder is responsible for the data.
    pub owner: bool,
    /// The object's current token total, so a writer never counts against a stale total.
    pub total: u32,
    /// The sender's current version, if the sender's copy is valid.
    pub version: Option<u64>,
    /// The value itself, unless the receiver is known to hold this version already.
    pub value: Option<Value>,
    /// Sent to serve a request of the receiver. A receiver whose request is already finished
    /// (a late `Done`, or a read served twice) sends such tokens back instead of keeping
    /// tokens that belong to someone else; pushed tokens (after a write, on a leave) it keeps.
    pub for_request: bool,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Message {
    /// Asks for tokens (the lab's TOKEN_REQUEST, WRITE_REQUEST and NEW_PROCESS).
    Request(Request),
    /// Hands tokens over.
    Grant(Grant),
    /// The request is finished (served or cancelled): remove it from the table (the lab's
    /// ACKNOWLEDGE, here sent by the requester).
    Done {
        /// The object's name.
        object: Arc<str>,
        /// The finished request.
        id: RequestId,
    },
    /// The sender is leaving: it has handed on its tokens, answer with [`Message::LeaveAck`].
    Leaving,
    /// Answer to [`Message::Leaving`]: the sender will send nothing more to the leaver.
    LeaveAck,
    /// Hands on the genesis role: the receiver now creates objects nobody has created yet.
    Genesis {
        /// Every object created so far.
        created: BTreeSet<Arc<str>>,
    },
    /// A writer that holds every token asks the receiver to keep a copy of the value it is
    /// about to write (the write returns once enough members have one, so it survives the
    /// writer's crash). The copy counts only when views recreate tokens; it is not readable.
    Replicate {
        /// The object's name.
        object: Arc<str>,
        /// The value of the pending write.
        value: Value,
    },
    /// Answer to [`Message::Replicate`]: the sender holds this version (or a newer one).
    Replicated {
        /// The object's name.
        object: Arc<str>,
        /// The version held.
        version: u64,
    },
}

const TAG_REQUEST: u8 = 0;
const TAG_GRANT: u8 = 1;
const TAG_DONE: u8 = 2;
const TAG_LEAVING: u8 = 3;
const TAG_LEAVE_ACK: u8 = 4;
const TAG_GENESIS: u8 = 5;
const TAG_REPLICATE: u8 = 6;
const TAG_REPLICATED: u8 = 7;
const TAG_PREPARE: u8 = 8;
const TAG_PROMISE: u8 = 9;
const TAG_ACCEPT: u8 = 10;
const TAG_ACCEPTED: u8 = 11;
const TAG_REFUSED: u8 = 12;
const TAG_DECIDED: u8 = 13;
const TAG_LEASE_REQUEST: u8 = 14;
const TAG_LEASE_GRANT: u8 = 15;
const TAG_JOIN: u8 = 16;

const ACCESS_READ: u8 = 0;
const ACCESS_WRITE: u8 = 1;

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The frame has no bytes at all.
    #[error("empty frame")]
    Empty,
    /// The frame was written by another protocol version.
    #[error("protocol version {found}, expected {PROTOCOL_VERSION}")]
    Version {
        /// The version byte found.
        found: u8,
    },
    /// The body is not a valid message list.
    #[error("malformed frame at byte {offset}: {reason}")]
    Malformed {
        /// Where in the frame (counting the version byte) decoding stopped.
        offset: usize,
        /// What was wrong there.
        reason: String,
    },
}

/// Encodes messages of `epoch` into one frame.
pub fn encode<'a, I>(epoch: Epoch, messages: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a Traffic>,
    I::IntoIter: ExactSizeIterator,
{
    let messages = messages.into_iter();
    // Room for a small frame, so it is not regrown byte by byte.
    let mut w = Vec::with_capacity(128);
    w.push(PROTOCOL_VERSION);
    uint(&mut w, epoch);
    array_len(&mut w, messages.len());
    for message in messages {
        match message {
            Traffic::Token(message) => encode_message(&mut w, message),
            Traffic::View(message) => encode_view(&mut w, message),
            Traffic::Lease(message) => encode_lease(&mut w, message),
            Traffic::Join(contact) => {
                array_len(&mut w, 3);
                uint(&mut w, TAG_JOIN.into());
                uint(&mut w, contact.incarnation);
                text(&mut w, &contact.addr);
            }
        }
    }
    w
}

/// Sorts `outbox` by destination and yields one batch per destination, each in the order it
/// was produced (the sort is stable): per-pair order holds.
pub fn batches_by_destination(
    outbox: &mut [(NodeId, Envelope)],
) -> impl Iterator<Item = &[(NodeId, Envelope)]> {
    outbox.sort_by_key(|(to, _)| *to);
    let outbox: &[(NodeId, Envelope)] = outbox;
    outbox.chunk_by(|a, b| a.0 == b.0)
}

/// Bytes a frame spends besides its messages (version byte, array header), at most.
const FRAME_HEADER_BOUND: usize = 8;

/// Bytes a message spends besides its names and value or init bytes, at most: every integer,
/// flag and header of the largest message (a `Grant` with a value) at full width, with room.
const MESSAGE_FIXED_BOUND: usize = 96;

/// The largest value `object` of type `type_name` may have, so that the message carrying it
/// still fits in a frame of `max_frame` bytes on its own.
pub fn max_value_len(max_frame: usize, object: &str, type_name: &str) -> usize {
    max_frame.saturating_sub(
        FRAME_HEADER_BOUND + MESSAGE_FIXED_BOUND + 2 * (object.len() + type_name.len()),
    )
}

/// An upper bound on the encoded size of `values` (a report's or a plan's).
fn values_bound(values: &BTreeMap<Arc<str>, Value>) -> usize {
    values
        .iter()
        .map(|(name, v)| MESSAGE_FIXED_BOUND + name.len() + v.type_name.len() + v.bytes.len())
        .sum()
}

/// An upper bound on the encoded size of a view change message.
fn view_size_bound(message: &ViewChange) -> usize {
    let names = |names: &mut dyn Iterator<Item = &Arc<str>>| -> usize {
        names.map(|name| name.len() + 16).sum()
    };
    let proposal_bound = |p: &Proposal<Decision>| {
        p.members.len() * 9
            + values_bound(&p.plan.recreation.values)
            + names(&mut p.plan.recreation.tokens.keys())
            + p.plan
                .recreation
                .tokens
                .values()
                .map(|r| r.len() * 9)
                .sum::<usize>()
            + p.plan
                .contacts
                .values()
                .map(|c| c.addr.len() + 24)
                .sum::<usize>()
    };
    MESSAGE_FIXED_BOUND
        + match message {
            ViewMessage::Promise {
                accepted, report, ..
            } => {
                accepted.as_ref().map_or(0, |(_, p)| proposal_bound(p))
                    + values_bound(&report.values)
                    + names(&mut report.held.iter())
            }
            ViewMessage::Accept { proposal, .. } | ViewMessage::Decided { proposal, .. } => {
                proposal_bound(proposal)
            }
            ViewMessage::Prepare { .. }
            | ViewMessage::Accepted { .. }
            | ViewMessage::Refused { .. } => 0,
        }
}

/// An upper bound on `traffic`'s encoded size.
fn size_bound(traffic: &Traffic) -> usize {
    let message = match traffic {
        Traffic::Token(message) => message,
        Traffic::View(message) => return view_size_bound(message),
        Traffic::Lease(_) => return MESSAGE_FIXED_BOUND,
        Traffic::Join(contact) => return MESSAGE_FIXED_BOUND + contact.addr.len(),
    };
    let payload = match message {
        Message::Request(r) => {
            r.object.len()
                + r.init
                    .as_ref()
                    .map_or(0, |i| i.type_name.len() + i.bytes.len())
        }
        Message::Grant(g) => {
            g.object.len()
                + g.value
                    .as_ref()
                    .map_or(0, |v| v.type_name.len() + v.bytes.len())
        }
        Message::Done { object, .. } => object.len(),
        Message::Leaving | Message::LeaveAck => 0,
        Message::Genesis { created } => created.iter().map(|name| name.len() + 8).sum(),
        Message::Replicate { object, value } => {
            object.len() + value.type_name.len() + value.bytes.len()
        }
        Message::Replicated { object, .. } => object.len(),
    };
    MESSAGE_FIXED_BOUND + payload
}

/// Splits one destination's messages, in order, into runs of one epoch that each encode to at
/// most `max_frame` bytes: the whole batch unless large values are on the way (a view change
/// reports every object) or a view was installed within the step. A message too large on its
/// own gets a run of its own.
pub fn frame_runs(
    batch: &[(NodeId, Envelope)],
    max_frame: usize,
) -> impl Iterator<Item = &[(NodeId, Envelope)]> {
    let mut rest = batch;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut size = FRAME_HEADER_BOUND;
        let mut end = 0;
        while let Some((_, envelope)) = rest.get(end) {
            let next = size_bound(&envelope.traffic);
            let same_epoch = envelope.epoch == rest[0].1.epoch;
            if end > 0 && (!same_epoch || size.saturating_add(next) > max_frame) {
                break;
            }
            size = size.saturating_add(next);
            end += 1;
        }
        let (run, tail) = rest.split_at(end);
        rest = tail;
        Some(run)
    })
}

// Writing to a `Vec` cannot fail: rmp's errors there are the `Vec`'s, which has none.
fn array_len(w: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("fewer than 2^32 elements");
    rmp::encode::write_array_len(w, len).expect("writing to a Vec");
}

fn uint(w: &mut Vec<u8>, n: u64) {
    rmp::encode::write_uint(w, n).expect("writing to a Vec");
}

fn text(w: &mut Vec<u8>, s: &str) {
    rmp::encode::write_str(w, s).expect("writing to a Vec");
}

fn binary(w: &mut Vec<u8>, bytes: &[u8]) {
    rmp::encode::write_bin(w, bytes).expect("writing to a Vec");
}

fn optional_uint(w: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => uint(w, n),
        None => rmp::encode::write_nil(w).expect("writing to a Vec"),
    }
}

fn encode_message(w: &mut Vec<u8>, message: &Message) {
    match message {
        Message::Request(r) => {
            array_len(w, 7);
            uint(w, TAG_REQUEST.into());
            uint(w, r.id.ts);
            uint(w, r.id.node.into());
            text(w, &r.object);
            uint(
                w,
                match r.access {
                    Access::Read => ACCESS_READ,
                    Access::Write => ACCESS_WRITE,
                }
                .into(),
            );
            optional_uint(w, r.have_version);
            match &r.init {
                Some(init) => {
                    array_len(w, 2);
                    text(w, &init.type_name);
                    binary(w, &init.bytes);
                }
                None => rmp::encode::write_nil(w).expect("writing to a Vec"),
            }
        }
        Message::Grant(g) => {
            array_len(w, 8);
            uint(w, TAG_GRANT.into());
            text(w, &g.object);
            uint(w, g.count.into());
            rmp::encode::write_bool(w, g.owner).expect("writing to a Vec");
            uint(w, g.total.into());
            optional_uint(w, g.version);
            match &g.value {
                Some(value) => write_value(w, value),
                None => rmp::encode::write_nil(w).expect("writing to a Vec"),
            }
            rmp::encode::write_bool(w, g.for_request).expect("writing to a Vec");
        }
        Message::Done { object, id } => {
            array_len(w, 4);
            uint(w, TAG_DONE.into());
            text(w, object);
            uint(w, id.ts);
            uint(w, id.node.into());
        }
        Message::Leaving => {
            array_len(w, 1);
            uint(w, TAG_LEAVING.into());
        }
        Message::LeaveAck => {
            array_len(w, 1);
            uint(w, TAG_LEAVE_ACK.into());
        }
        Message::Genesis { created } => {
            array_len(w, 2);
            uint(w, TAG_GENESIS.into());
            array_len(w, created.len());
            for name in created {
                text(w, name);
            }
        }
        Message::Replicate { object, value } => {
            array_len(w, 3);
            uint(w, TAG_REPLICATE.into());
            text(w, object);
            write_value(w, value);
        }
        Message::Replicated { object, version } => {
            array_len(w, 3);
            uint(w, TAG_REPLICATED.into());
            text(w, object);
            uint(w, *version);
        }
    }
}

fn write_value(w: &mut Vec<u8>, value: &Value) {
    array_len(w, 3);
    uint(w, value.version);
    text(w, &value.type_name);
    binary(w, &value.bytes);
}

fn write_values(w: &mut Vec<u8>, values: &BTreeMap<Arc<str>, Value>) {
    array_len(w, values.len());
    for (name, value) in values {
        array_len(w, 2);
        text(w, name);
        write_value(w, value);
    }
}

fn write_proposal(w: &mut Vec<u8>, proposal: &Proposal<Decision>) {
    array_len(w, 5);
    array_len(w, proposal.members.len());
    for &member in &proposal.members {
        uint(w, member.into());
    }
    let decision = &proposal.plan;
    uint(w, decision.next_id.into());
    array_len(w, decision.contacts.len());
    for (&id, contact) in &decision.contacts {
        array_len(w, 3);
        uint(w, id.into());
        uint(w, contact.incarnation);
        text(w, &contact.addr);
    }
    write_values(w, &decision.recreation.values);
    array_len(w, decision.recreation.tokens.len());
    for (name, receivers) in &decision.recreation.tokens {
        array_len(w, 2);
        text(w, name);
        array_len(w, receivers.len());
        for &receiver in receivers {
            uint(w, receiver.into());
        }
    }
}

fn write_report(w: &mut Vec<u8>, report: &Report) {
    array_len(w, 2);
    write_values(w, &report.values);
    array_len(w, report.held.len());
    for name in &report.held {
        text(w, name);
    }
}

/// A view message: its tag, its epoch, its ballot flattened (round, node) where it has one,
/// then its other fields.
fn encode_view(w: &mut Vec<u8>, message: &ViewChange) {
    let ballot = |w: &mut Vec<u8>, b: &Ballot| {
        uint(w, b.round);
        uint(w, b.node.into());
    };
    match message {
        ViewMessage::Prepare { epoch, ballot: b } => {
            array_len(w, 4);
            uint(w, TAG_PREPARE.into());
            uint(w, *epoch);
            ballot(w, b);
        }
        ViewMessage::Promise {
            epoch,
            ballot: b,
            accepted,
            report,
        } => {
            array_len(w, 6);
            uint(w, TAG_PROMISE.into());
            uint(w, *epoch);
            ballot(w, b);
            match accepted {
                Some((accepted, proposal)) => {
                    array_len(w, 3);
                    ballot(w, accepted);
                    write_proposal(w, proposal);
                }
                None => rmp::encode::write_nil(w).expect("writing to a Vec"),
            }
            write_report(w, report);
        }
        ViewMessage::Accept {
            epoch,
            ballot: b,
            proposal,
        } => {
            array_len(w, 5);
            uint(w, TAG_ACCEPT.into());
            uint(w, *epoch);
            ballot(w, b);
            write_proposal(w, proposal);
        }
        ViewMessage::Accepted { epoch, ballot: b } => {
            array_len(w, 4);
            uint(w, TAG_ACCEPTED.into());
            uint(w, *epoch);
            ballot(w, b);
        }
        ViewMessage::Refused { epoch, promised } => {
            array_len(w, 4);
            uint(w, TAG_REFUSED.into());
            uint(w, *epoch);
            ballot(w, promised);
        }
        ViewMessage::Decided { epoch, proposal } => {
            array_len(w, 3);
            uint(w, TAG_DECIDED.into());
            uint(w, *epoch);
            write_proposal(w, proposal);
        }
    }
}

/// A lease message: its tag, its stamp, and a request's duration.
fn encode_lease(w: &mut Vec<u8>, message: &LeaseMessage) {
    match message {
        LeaseMessage::Request { sent, millis } => {
            array_len(w, 3);
            uint(w, TAG_LEASE_REQUEST.into());
            uint(w, *sent);
            uint(w, *millis);
        }
        LeaseMessage::Grant { sent } => {
            array_len(w, 2);
            uint(w, TAG_LEASE_GRANT.into());
            uint(w, *sent);
        }
    }
}

/// Decodes a frame made by [`encode`]: its epoch and messages. Value bytes are slices of
/// `frame`, not copies.
pub fn decode(frame: Bytes) -> Result<(Epoch, Vec<Traffic>), DecodeError> {
    let mut messages = Vec::new();
    let epoch = decode_into(frame, &mut messages, |_| None)?;
    Ok((epoch, messages))
}

/// [`decode`] into `messages` (cleared first, so a caller can reuse one buffer), taking object
/// names from `known` where it has them: a name this node already uses is shared, not
/// allocated again. Returns the frame's epoch. On error `messages` is left empty.
pub fn decode_into(
    frame: Bytes,
    messages: &mut Vec<Traffic>,
    known: impl Fn(&str) -> Option<Arc<str>>,
) -> Result<Epoch, DecodeError> {
    messages.clear();
    let (&version, _) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version { found: version });
    }
    let mut d = Decoder {
        rest: &frame[1..],
        frame: &frame,
        known: &known,
    };
    let decoded = d
        .uint("the frame's epoch")
        .and_then(|epoch| d.messages(messages).map(|()| epoch));
    if decoded.is_err() {
        messages.clear();
    }
    decoded
}

/// Reads one frame's MessagePack, naming what it expected where it fails.
struct Decoder<'a> {
    /// What is left to read.
    rest: &'a [u8],
    frame: &'a Bytes,
    known: &'a dyn Fn(&str) -> Option<Arc<str>>,
}

impl<'a> Decoder<'a> {
    fn messages(&mut self, messages: &mut Vec<Traffic>) -> Result<(), DecodeError> {
        let count = self.array_len("the message list")?;
        // Every message takes at least two bytes, so a forged count cannot reserve much.
        messages.reserve((count as usize).min(self.rest.len() / 2));
        for _ in 0..count {
            messages.push(self.traffic()?);
        }
        if !self.rest.is_empty() {
            return Err(self.malformed("bytes after the last message".into()));
        }
        Ok(())
    }

    fn malformed(&self, reason: String) -> DecodeError {
        DecodeError::Malformed {
            offset: self.frame.len() - self.rest.len(),
            reason,
        }
    }

    fn expected(&self, what: &str) -> DecodeError {
        self.malformed(format!("expected {what}"))
    }

    /// One MessagePack item read by `read`; on failure the error points at the item's start.
    fn item<T, E>(
        &mut self,
        what: &str,
        read: impl FnOnce(&mut &'a [u8]) -> Result<T, E>,
    ) -> Result<T, DecodeError> {
        let start = self.rest;
        read(&mut self.rest).map_err(|_| {
            self.rest = start;
            self.expected(what)
        })
    }

    fn array_len(&mut self, what: &str) -> Result<u32, DecodeError> {
        self.item(what, rmp::decode::read_array_len)
    }

    fn uint<T: TryFrom<u64>>(&mut self, what: &str) -> Result<T, DecodeError> {
        let start = self.rest;
        let n: u64 = self.item(what, rmp::decode::read_int)?;
        T::try_from(n).map_err(|_| {
            self.rest = start;
            self.malformed(format!("{what} out of range: {n}"))
        })
    }

    fn is_nil(&mut self) -> bool {
        if let Some((&0xc0, rest)) = self.rest.split_first() {
            self.rest = rest;
            true
        } else {
            false
        }
    }

    /// Nil as `None`, anything else read by `read`.
    fn optional<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, DecodeError> {
        if self.is_nil() {
            Ok(None)
        } else {
            read(self).map(Some)
        }
    }

    fn optional_uint(&mut self, what: &str) -> Result<Option<u64>, DecodeError> {
        self.optional(|d| d.uint(what))
    }

    fn bool(&mut self, what: &str) -> Result<bool, DecodeError> {
        self.item(what, rmp::decode::read_bool)
    }

    /// The next `len` bytes.
    fn take(&mut self, len: u32, what: &str) -> Result<&'a [u8], DecodeError> {
        let len = len as usize;
        if self.rest.len() < len {
            return Err(self.malformed(format!("{what} truncated")));
        }
        let (taken, rest) = self.rest.split_at(len);
        self.rest = rest;
        Ok(taken)
    }

    fn text(&mut self, what: &str) -> Result<Arc<str>, DecodeError> {
        let len = self.item(what, rmp::decode::read_str_len)?;
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok((self.known)(text).unwrap_or_else(|| Arc::from(text))),
            Err(_) => Err(self.malformed(format!("{what} is not UTF-8"))),
        }
    }

    /// Binary data as a slice of the frame, sharing its buffer.
    fn binary(&mut self, what: &str) -> Result<Bytes, DecodeError> {
        let len = self.item(what, rmp::decode::read_bin_len)?;
        let bytes = self.take(len, what)?;
        Ok(self.frame.slice_ref(bytes))
    }

    /// The array header of a message part with exactly `fields` fields.
    fn fields(&mut self, fields: u32, what: &str) -> Result<(), DecodeError> {
        let len = self.array_len(what)?;
        if len != fields {
            return Err(self.malformed(format!("{what} has {len} fields, expected {fields}")));
        }
        Ok(())
    }

    fn value(&mut self) -> Result<Value, DecodeError> {
        self.fields(3, "a value")?;
        Ok(Value {
            version: self.uint("a value's version")?,
            type_name: self.text("a type name")?,
            bytes: self.binary("a value's bytes")?,
        })
    }

    /// A list whose count says `count` items, each at least `min_item` bytes long: a forged
    /// count fails at the frame's end before anything large is reserved.
    fn list<T>(
        &mut self,
        what: &str,
        min_item: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, DecodeError>,
    ) -> Result<Vec<T>, DecodeError> {
        let count = self.array_len(what)? as usize;
        let mut items = Vec::with_capacity(count.min(self.rest.len() / min_item.max(1)));
        for _ in 0..count {
            items.push(item(self)?);
        }
        Ok(items)
    }

    fn values(&mut self, what: &str) -> Result<BTreeMap<Arc<str>, Value>, DecodeError> {
        let pairs = self.list(what, 6, |d| {
            d.fields(2, "a name and value")?;
            Ok((d.text("an object name")?, d.value()?))
        })?;
        Ok(pairs.into_iter().collect())
    }

    fn ballot(&mut self) -> Result<Ballot, DecodeError> {
        Ok(Ballot {
            round: self.uint("a ballot's round")?,
            node: self.uint("a ballot's node")?,
        })
    }

    fn proposal(&mut self) -> Result<Proposal<Decision>, DecodeError> {
        self.fields(5, "a proposal")?;
        let members = self.list("a proposal's members", 1, |d| d.uint("a member"))?;
        let next_id = self.uint("the next node id")?;
        let contacts = self.list("a proposal's contacts", 4, |d| {
            d.fields(3, "a member's contact")?;
            let id = d.uint("a member")?;
            let incarnation = d.uint("an incarnation")?;
            let addr = d.text("an address")?.to_string();
            Ok((id, Contact { incarnation, addr }))
        })?;
        let values = self.values("a plan")?;
        let tokens = self.list("a plan's token receivers", 3, |d| {
            d.fields(2, "a name and its receivers")?;
            let name = d.text("an object name")?;
            let receivers = d.list("an object's receivers", 1, |d| d.uint("a receiver"))?;
            Ok((name, receivers.into_iter().collect()))
        })?;
        Ok(Proposal {
            members: members.into_iter().collect(),
            plan: Decision {
                recreation: Plan {
                    values,
                    tokens: tokens.into_iter().collect(),
                },
                contacts: contacts.into_iter().collect(),
                next_id,
            },
        })
    }

    fn report(&mut self) -> Result<Report, DecodeError> {
        self.fields(2, "a report")?;
        let values = self.values("a report's values")?;
        let held = self.list("a report's held objects", 1, |d| d.text("an object name"))?;
        Ok(Report {
            values,
            held: held.into_iter().collect(),
        })
    }

    fn traffic(&mut self) -> Result<Traffic, DecodeError> {
        // Peek at the tag to tell a view message from a token message.
        let start = self.rest;
        let _ = self.array_len("a message")?;
        let tag: u8 = self.uint("a message tag")?;
        self.rest = start;
        if tag < TAG_PREPARE {
            return self.message().map(Traffic::Token);
        }
        if tag == TAG_LEASE_REQUEST || tag == TAG_LEASE_GRANT {
            return self.lease_message().map(Traffic::Lease);
        }
        if tag == TAG_JOIN {
            self.fields(3, "a join request")?;
            let _tag: u8 = self.uint("a message tag")?;
            let incarnation = self.uint("an incarnation")?;
            let addr = self.text("an address")?.to_string();
            return Ok(Traffic::Join(Contact { incarnation, addr }));
        }
        self.view_message()
            .map(|view| Traffic::View(Box::new(view)))
    }

    /// A message's array header and tag: `fields_of` gives the field count (the tag counted)
    /// each known tag must come with; an unknown tag is reported at the tag.
    fn message_head(
        &mut self,
        fields_of: impl FnOnce(u8) -> Option<u32>,
    ) -> Result<u8, DecodeError> {
        let len = self.array_len("a message")?;
        let tag_at = self.rest;
        let tag: u8 = self.uint("a message tag")?;
        let Some(expected_len) = fields_of(tag) else {
            self.rest = tag_at;
            return Err(self.malformed(format!("unknown message tag {tag}")));
        };
        if len != expected_len {
            return Err(self.malformed(format!(
                "message with tag {tag} has {len} fields, expected {expected_len}"
            )));
        }
        Ok(tag)
    }

    fn lease_message(&mut self) -> Result<LeaseMessage, DecodeError> {
        let tag = self.message_head(|tag| Some(if tag == TAG_LEASE_REQUEST { 3 } else { 2 }))?;
        let sent = self.uint("a lease stamp")?;
        Ok(if tag == TAG_LEASE_REQUEST {
            LeaseMessage::Request {
                sent,
                millis: self.uint("a lease duration")?,
            }
        } else {
            LeaseMessage::Grant { sent }
        })
    }

    fn view_message(&mut self) -> Result<ViewChange, DecodeError> {
        let tag = self.message_head(|tag| match tag {
            TAG_PREPARE | TAG_ACCEPTED | TAG_REFUSED => Some(4),
            TAG_PROMISE => Some(6),
            TAG_ACCEPT => Some(5),
            TAG_DECIDED => Some(3),
            _ => None,
        })?;
        let epoch = self.uint("an epoch")?;
        Ok(match tag {
            TAG_PREPARE => ViewMessage::Prepare {
                epoch,
                ballot: self.ballot()?,
            },
            TAG_PROMISE => ViewMessage::Promise {
                epoch,
                ballot: self.ballot()?,
                accepted: self.optional(|d| {
                    d.fields(3, "an accepted proposal")?;
                    Ok((d.ballot()?, d.proposal()?))
                })?,
                report: self.report()?,
            },
            TAG_ACCEPT => ViewMessage::Accept {
                epoch,
                ballot: self.ballot()?,
                proposal: self.proposal()?,
            },
            TAG_ACCEPTED => ViewMessage::Accepted {
                epoch,
                ballot: self.ballot()?,
            },
            TAG_REFUSED => ViewMessage::Refused {
                epoch,
                promised: self.ballot()?,
            },
            _ => ViewMessage::Decided {
                epoch,
                proposal: self.proposal()?,
            },
        })
    }

    fn message(&mut self) -> Result<Message, DecodeError> {
        let tag = self.message_head(|tag| match tag {
            TAG_REQUEST => Some(7),
            TAG_GRANT => Some(8),
            TAG_DONE => Some(4),
            TAG_LEAVING | TAG_LEAVE_ACK => Some(1),
            TAG_GENESIS => Some(2),
            TAG_REPLICATE | TAG_REPLICATED => Some(3),
            _ => None,
        })?;
        Ok(match tag {
            TAG_REQUEST => {
                let id = RequestId {
                    ts: self.uint("a request's timestamp")?,
                    node: self.uint("a request's node")?,
                };
                let object = self.text("an object name")?;
                let access = match self.uint::<u8>("an access")? {
                    ACCESS_READ => Access::Read,
                    ACCESS_WRITE => Access::Write,
                    other => return Err(self.malformed(format!("unknown access {other}"))),
                };
                let have_version = self.optional_uint("a version")?;
                let init = self.optional(|d| {
                    d.fields(2, "an init")?;
                    Ok(Init {
                        type_name: d.text("a type name")?,
                        bytes: d.binary("an initial value")?,
                    })
                })?;
                Message::Request(Request {
                    id,
                    object,
                    access,
                    have_version,
                    init,
                })
            }
            TAG_GRANT => Message::Grant(Grant {
                object: self.text("an object name")?,
                count: self.uint("a token count")?,
                owner: self.bool("an owner flag")?,
                total: self.uint("a token total")?,
                version: self.optional_uint("a version")?,
                value: self.optional(Decoder::value)?,
                for_request: self.bool("a for-request flag")?,
            }),
            TAG_DONE => Message::Done {
                object: self.text("an object name")?,
                id: RequestId {
                    ts: self.uint("a request's timestamp")?,
                    node: self.uint("a request's node")?,
                },
            },
            TAG_LEAVING => Message::Leaving,
            TAG_LEAVE_ACK => Message::LeaveAck,
            TAG_REPLICATE => Message::Replicate {
                object: self.text("an object name")?,
                value: self.value()?,
            },
            TAG_REPLICATED => Message::Replicated {
                object: self.text("an object name")?,
                version: self.uint("a version")?,
            },
            _ => {
                let count = self.array_len("a list of object names")?;
                let mut created = BTreeSet::new();
                for _ in 0..count {
                    created.insert(self.text("an object name")?);
                }
                Message::Genesis { created }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoch the tests' frames are stamped with: large enough to take several bytes.
    const EPOCH: Epoch = 70_000;

    fn every_message() -> Vec<Traffic> {
        let value = |version, byte| Value {
            version,
            type_name: "i64".into(),
            bytes: Bytes::from(vec![byte; 3]),
        };
        let contact = |incarnation, addr: &str| Contact {
            incarnation,
            addr: addr.into(),
        };
        let proposal = Proposal {
            members: [0, 2, NodeId::MAX].into(),
            plan: Decision {
                recreation: Plan {
                    values: [("x".into(), value(4, 1)), ("ÿ".into(), value(0, 2))].into(),
                    tokens: [("x".into(), [2, 0].into())].into(),
                },
                contacts: [
                    (0, contact(7, "tcp://10.0.0.1:7000")),
                    (NodeId::MAX, contact(u64::MAX, "")),
                ]
                .into(),
                next_id: NodeId::MAX,
            },
        };
        let ballot = Ballot { round: 3, node: 2 };
        let views = [
            ViewMessage::Prepare { epoch: 5, ballot },
            ViewMessage::Promise {
                epoch: 5,
                ballot,
                accepted: Some((Ballot { round: 1, node: 0 }, proposal.clone())),
                report: Report {
                    values: [("x".into(), value(9, 3))].into(),
                    held: ["x".into()].into(),
                },
            },
            ViewMessage::Promise {
                epoch: u64::MAX,
                ballot,
                accepted: None,
                report: Report::default(),
            },
            ViewMessage::Accept {
                epoch: 5,
                ballot,
                proposal: proposal.clone(),
            },
            ViewMessage::Accepted { epoch: 5, ballot },
            ViewMessage::Refused {
                epoch: 5,
                promised: ballot,
            },
            ViewMessage::Decided {
                epoch: 5,
                proposal: Proposal {
                    members: BTreeSet::new(),
                    plan: Decision::default(),
                },
            },
        ];
        let tokens = vec![
            Message::Request(Request {
                id: RequestId { ts: 7, node: 3 },
                object: "x".into(),
                access: Access::Write,
                have_version: Some(2),
                init: Some(Init {
                    type_name: "i64".into(),
                    bytes: Bytes::from_static(&[1, 2, 3]),
                }),
            }),
            Message::Request(Request {
                id: RequestId {
                    ts: u64::MAX,
                    node: NodeId::MAX,
                },
                object: "ünïcode".into(),
                access: Access::Read,
                have_version: None,
                init: None,
            }),
            Message::Grant(Grant {
                object: "x".into(),
                count: 2,
                owner: true,
                total: 4,
                version: Some(5),
                value: Some(Value {
                    version: 5,
                    type_name: "i64".into(),
                    bytes: Bytes::from(vec![9u8; 4096]),
                }),
                for_request: true,
            }),
            Message::Grant(Grant {
                object: "y".into(),
                count: 1,
                owner: false,
                total: 1,
                version: None,
                value: None,
                for_request: false,
            }),
            Message::Done {
                object: "x".into(),
                id: RequestId { ts: 7, node: 3 },
            },
            Message::Leaving,
            Message::LeaveAck,
            Message::Genesis {
                created: ["a".into(), "b".into()].into(),
            },
            Message::Genesis {
                created: BTreeSet::new(),
            },
            Message::Replicate {
                object: "x".into(),
                value: Value {
                    version: 6,
                    type_name: "i64".into(),
                    bytes: Bytes::from_static(b"\x07"),
                },
            },
            Message::Replicated {
                object: "x".into(),
                version: 6,
            },
        ];
        let tokens = tokens.into_iter().map(Traffic::Token);
        let leases = [
            LeaseMessage::Request {
                sent: 0,
                millis: 2000,
            },
            LeaseMessage::Grant { sent: u64::MAX },
        ];
        let joins = [
            Traffic::Join(contact(3, "tcp://[::1]:9")),
            Traffic::Join(contact(0, "")),
        ];
        tokens
            .chain(views.into_iter().map(|view| Traffic::View(Box::new(view))))
            .chain(leases.into_iter().map(Traffic::Lease))
            .chain(joins)
            .collect()
    }

    fn decode_vec(frame: Vec<u8>) -> Result<Vec<Traffic>, DecodeError> {
        decode(Bytes::from(frame)).map(|(epoch, traffic)| {
            assert_eq!(epoch, EPOCH);
            traffic
        })
    }

    #[test]
    fn size_bounds_hold_and_runs_fit_the_frame_limit() {
        let batch: Vec<(NodeId, Envelope)> = every_message()
            .into_iter()
            .map(|traffic| {
                let epoch = EPOCH;
                (1, Envelope { epoch, traffic })
            })
            .collect();
        for (_, envelope) in &batch {
            let encoded = encode(EPOCH, [&envelope.traffic]).len();
            assert!(
                encoded <= FRAME_HEADER_BOUND + size_bound(&envelope.traffic),
                "{envelope:?}"
            );
        }
        for max_frame in [0, 100, 300, 4300, usize::MAX] {
            let runs: Vec<&[(NodeId, Envelope)]> = frame_runs(&batch, max_frame).collect();
            let rejoined: Vec<(NodeId, Envelope)> = runs.concat();
            assert_eq!(rejoined, batch, "order and content kept at {max_frame}");
            for run in &runs {
                let encoded = encode(EPOCH, run.iter().map(|(_, e)| &e.traffic)).len();
                assert!(
                    encoded <= max_frame || run.len() == 1,
                    "a run of {} messages encodes to {encoded} > {max_frame}",
                    run.len()
                );
            }
            let expected_runs = match max_frame {
                usize::MAX => 1,
                0 => batch.len(),
                _ => runs.len(),
            };
            assert_eq!(runs.len(), expected_runs);
        }
        assert!(frame_runs(&[], 10).next().is_none());
        // A view installed within a step: the messages of each epoch go in frames of their own.
        let mut mixed = batch[..3].to_vec();
        mixed[1].1.epoch = EPOCH + 1;
        let runs: Vec<&[(NodeId, Envelope)]> = frame_runs(&mixed, usize::MAX).collect();
        assert_eq!(runs.iter().map(|r| r.len()).collect::<Vec<_>>(), [1, 1, 1]);
    }

    #[test]
    fn round_trip_keeps_every_message() {
        let messages = every_message();
        assert_eq!(decode_vec(encode(EPOCH, &messages)).unwrap(), messages);
        assert_eq!(decode_vec(encode(EPOCH, &[])).unwrap(), vec![]);
    }

    #[test]
    fn payload_is_encoded_as_binary_and_decoded_without_a_copy() {
        let big = Bytes::from(vec![0xABu8; 4096]);
        let frame = Bytes::from(encode(
            EPOCH,
            &[Traffic::Token(Message::Grant(Grant {
                object: "o".into(),
                count: 1,
                owner: false,
                total: 1,
                version: None,
                value: Some(Value {
                    version: 0,
                    type_name: "".into(),
                    bytes: big.clone(),
                }),
                for_request: false,
            }))],
        ));
        // As an array, each byte >= 0x80 would take two bytes on the wire.
        assert!(frame.len() < 4096 + 64, "frame is {} bytes", frame.len());
        let [Traffic::Token(Message::Grant(grant))] = &decode(frame.clone()).unwrap().1[..] else {
            panic!("one grant expected");
        };
        let bytes = &grant.value.as_ref().unwrap().bytes;
        assert_eq!(bytes, &big);
        let within = frame.as_ptr_range();
        assert!(within.contains(&bytes.as_ptr()), "the value was copied");
    }

    fn malformed(frame: Vec<u8>) -> (usize, String) {
        match decode(Bytes::from(frame)) {
            Err(DecodeError::Malformed { offset, reason }) => (offset, reason),
            other => panic!("expected a malformed frame, got {other:?}"),
        }
    }

    #[test]
    fn bad_frames_are_errors_that_say_what_was_wrong() {
        assert!(matches!(decode_vec(vec![]), Err(DecodeError::Empty)));
        assert!(matches!(
            decode_vec(vec![99, 0, 0x90]),
            Err(DecodeError::Version { found: 99 })
        ));
        // Version, then epoch 0, then the messages.
        const V: u8 = PROTOCOL_VERSION;
        assert_eq!(
            malformed(vec![V, 0xc1]),
            (1, "expected the frame's epoch".into())
        );
        assert_eq!(
            malformed(vec![V, 0, 0xc1, 0xff]),
            (2, "expected the message list".into())
        );
        // [[99]]: a message with an unknown tag.
        assert_eq!(
            malformed(vec![V, 0, 0x91, 0x91, 99]),
            (4, "unknown message tag 99".into())
        );
        // [[3, 0]]: Leaving with a field too many.
        assert_eq!(
            malformed(vec![V, 0, 0x91, 0x92, 3, 0]).1,
            "message with tag 3 has 2 fields, expected 1"
        );
        // [[3]] followed by a stray byte.
        assert_eq!(
            malformed(vec![V, 0, 0x91, 0x91, 3, 0]),
            (5, "bytes after the last message".into())
        );
        // A Done whose node id does not fit in a NodeId.
        let mut frame = vec![V, 0, 0x91, 0x94, TAG_DONE, 0xa1, b'x', 1];
        frame.push(0xcf);
        frame.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(malformed(frame)
            .1
            .starts_with("a request's node out of range"));
        // A Done whose object name is not UTF-8.
        let frame = vec![V, 0, 0x91, 0x94, TAG_DONE, 0xa1, 0xff, 1, 1];
        assert_eq!(malformed(frame).1, "an object name is not UTF-8");
        // A list that claims more messages than the frame holds.
        assert_eq!(
            malformed(vec![V, 0, 0xdd, 0xff, 0xff, 0xff, 0xff]).1,
            "expected a message"
        );
        // A Decided whose member list claims more members than the frame holds.
        let frame = vec![
            V,
            0,
            0x91,
            0x93,
            TAG_DECIDED,
            0,
            0x95,
            0xdd,
            0xff,
            0xff,
            0xff,
            0xff,
        ];
        assert_eq!(malformed(frame).1, "expected a member");
    }

    #[test]
    fn every_truncation_and_corruption_is_an_error_not_a_panic() {
        let frame = encode(EPOCH, &every_message());
        for len in 0..frame.len() {
            assert!(decode_vec(frame[..len].to_vec()).is_err(), "cut at {len}");
        }
        // Every single byte replaced by a few telling values: decoding may succeed (a changed
        // number is still a number) but must never panic.
        for at in 1..frame.len() {
            for byte in [0x00, 0x7f, 0xc0, 0xc1, 0xcf, 0xdb, 0xdd, 0xff] {
                let mut corrupt = frame.clone();
                corrupt[at] = byte;
                let _ = decode(Bytes::from(corrupt));
            }
        }
    }
}
