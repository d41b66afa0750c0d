//! Arbitrary sequences of messages from peers (well-formed or not, from members, strangers or
//! this node itself), mixed with local operations: `Protocol::handle` never panics, and a
//! message it refuses leaves the state exactly as it was.
#![no_main]

use std::collections::BTreeSet;
use std::sync::Arc;

use arbitrary::Arbitrary;
use bytes::Bytes;
use coherence_core::protocol::{Protocol, WritePolicy};
use coherence_core::wire::{Access, Grant, Init, Message, Request, RequestId, Value};
use libfuzzer_sys::fuzz_target;

/// This node's id; 0 and 2 are its peers, 1 is itself, anything else a stranger.
const ME: u32 = 1;
/// Objects are named from a small set, so messages meet each other's state.
const NAMES: [&str; 3] = ["a", "b", "c"];

#[derive(Debug, Arbitrary)]
enum Step {
    Message { from: u8, message: Msg },
    Open { op: u8, object: u8 },
    Read { op: u8, object: u8 },
    Write { op: u8, object: u8, byte: u8 },
    Lock { op: u8, object: u8 },
    Commit { op: u8, byte: Option<u8> },
    Cancel { op: u8 },
    PeerJoined { peer: u8 },
    PeerLeft { peer: u8 },
    Leave,
}

#[derive(Debug, Arbitrary)]
enum Msg {
    Request {
        ts: u64,
        node: u8,
        object: u8,
        write: bool,
        have: Option<u8>,
        init: Option<u8>,
    },
    Grant {
        object: u8,
        count: u32,
        owner: bool,
        total: u32,
        version: Option<u8>,
        value: Option<(u8, u8)>,
        for_request: bool,
    },
    Done {
        object: u8,
        ts: u64,
        node: u8,
    },
    Leaving,
    LeaveAck,
    Genesis {
        created: Vec<u8>,
    },
    Replicate {
        object: u8,
        value: (u8, u8),
    },
    Replicated {
        object: u8,
        version: u8,
    },
}

fn name(i: u8) -> Arc<str> {
    NAMES[usize::from(i) % NAMES.len()].into()
}

fn value(version: u8, byte: u8) -> Value {
    Value {
        version: version.into(),
        type_name: "u8".into(),
        bytes: Bytes::from(vec![byte]),
    }
}

fn init(byte: u8) -> Init {
    Init {
        type_name: "u8".into(),
        bytes: Bytes::from(vec![byte]),
    }
}

fn message(m: Msg) -> Message {
    match m {
        Msg::Request {
            ts,
            node,
            object,
            write,
            have,
            init: with,
        } => Message::Request(Request {
            id: RequestId {
                ts,
                node: node.into(),
            },
            object: name(object),
            access: if write { Access::Write } else { Access::Read },
            have_version: have.map(u64::from),
            init: with.map(init),
        }),
        Msg::Grant {
            object,
            count,
            owner,
            total,
            version,
            value: v,
            for_request,
        } => Message::Grant(Grant {
            object: name(object),
            count,
            owner,
            total,
            version: version.map(u64::from),
            value: v.map(|(version, byte)| value(version, byte)),
            for_request,
        }),
        Msg::Done { object, ts, node } => Message::Done {
            object: name(object),
            id: RequestId {
                ts,
                node: node.into(),
            },
        },
        Msg::Leaving => Message::Leaving,
        Msg::LeaveAck => Message::LeaveAck,
        Msg::Genesis { created } => Message::Genesis {
            created: created.into_iter().map(name).collect::<BTreeSet<_>>(),
        },
        Msg::Replicate {
            object,
            value: (version, byte),
        } => Message::Replicate {
            object: name(object),
            value: value(version, byte),
        },
        Msg::Replicated { object, version } => Message::Replicated {
            object: name(object),
            version: version.into(),
        },
    }
}

fuzz_target!(|steps: Vec<Step>| {
    // With durability, so writes wait for copies and `Replicated` meets a waiting write.
    let mut p = Protocol::new(ME, [0, 2], WritePolicy::Update).with_durability(1);
    for step in steps {
        match step {
            Step::Message { from, message: m } => {
                let before = p.clone();
                if p.handle(from.into(), message(m)).is_err() {
                    assert!(p == before, "a refused message changed the state");
                }
            }
            Step::Open { op, object } => p.open(op.into(), &name(object), init(0)),
            Step::Read { op, object } => p.read(op.into(), &name(object)),
            Step::Write { op, object, byte } => {
                p.write(op.into(), &name(object), Bytes::from(vec![byte]))
            }
            Step::Lock { op, object } => p.lock(op.into(), &name(object)),
            Step::Commit { op, byte } => {
                p.commit(op.into(), byte.map(|b| Bytes::from(vec![b])));
            }
            Step::Cancel { op } => {
                p.cancel(op.into());
            }
            Step::PeerJoined { peer } => p.peer_joined(peer.into()),
            Step::PeerLeft { peer } => p.peer_left(peer.into()),
            Step::Leave => p.leave(),
        }
        while p.poll_output().is_some() {}
    }
});
