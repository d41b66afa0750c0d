//! Wire messages and their versioned codec.
//!
//! A frame is one protocol-version byte followed by a MessagePack (rmp-serde) array of
//! [`Message`]s. The driver batches everything one step sends to the same peer into one frame.
//! Values travel as [`Bytes`], which serialize as MessagePack binary: a 4 KiB payload as a plain
//! `Vec<u8>` is encoded element by element and measured 150x slower.

use std::collections::BTreeSet;
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::transport::NodeId;

/// Version of the wire format; a frame with another version is rejected.
pub const PROTOCOL_VERSION: u8 = 1;

/// Identifies one request: its Lamport timestamp, then its node. Lower sorts first and has
/// priority, so every node orders the same requests the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct RequestId {
    /// Lamport timestamp at the requester when it issued the request.
    pub ts: u64,
    /// The requesting node.
    pub node: NodeId,
}

/// What a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Access {
    /// One token and the current value.
    Read,
    /// All tokens.
    Write,
}

/// The value an object is created with, carried by an opening node's request. Only the genesis
/// node uses it, and only if the object does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Init {
    /// Name of the value's type, so a node opening the object with another type gets an error.
    #[serde(deserialize_with = "shared_str")]
    pub type_name: Arc<str>,
    /// The encoded initial value.
    pub bytes: Bytes,
}

/// A value with its version (the number of writes applied to it) and type.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Value {
    /// Writes applied since creation; versions are totally ordered because writes need all tokens.
    pub version: u64,
    /// Name of the value's type (shared: every copy of a value names the same type).
    #[serde(deserialize_with = "shared_str")]
    pub type_name: Arc<str>,
    /// The encoded value.
    pub bytes: Bytes,
}

/// A persistent request for tokens of one object, broadcast to every member.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Request {
    /// Priority and identity.
    pub id: RequestId,
    /// The object's name (shared with the node's table, so messages do not copy it).
    #[serde(deserialize_with = "shared_str")]
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
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Grant {
    /// The object's name (shared with the node's table, so messages do not copy it).
    #[serde(deserialize_with = "shared_str")]
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
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Message {
    /// Asks for tokens (the lab's TOKEN_REQUEST, WRITE_REQUEST and NEW_PROCESS).
    Request(Request),
    /// Hands tokens over.
    Grant(Grant),
    /// The request is finished (served or cancelled): remove it from the table (the lab's
    /// ACKNOWLEDGE, here sent by the requester).
    Done {
        /// The object's name.
        #[serde(deserialize_with = "shared_str")]
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
}

/// Decodes a name straight into its shared form: serde's own `Arc<str>` goes through a
/// `String` and a `Box<str>` first, three allocations where one does.
fn shared_str<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Arc<str>, D::Error> {
    struct SharedStr;
    impl serde::de::Visitor<'_> for SharedStr {
        type Value = Arc<str>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a string")
        }

        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Arc<str>, E> {
            Ok(Arc::from(s))
        }
    }
    deserializer.deserialize_str(SharedStr)
}

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
    #[error("malformed frame: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
}

/// Encodes messages into one frame.
pub fn encode<'a, I>(messages: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a Message>,
    I::IntoIter: ExactSizeIterator,
{
    use serde::Serializer;
    // Room for a small frame, so it is not regrown byte by byte.
    let mut frame = Vec::with_capacity(128);
    frame.push(PROTOCOL_VERSION);
    rmp_serde::Serializer::new(&mut frame)
        .collect_seq(messages)
        .expect("writing to a Vec cannot fail");
    frame
}

/// Decodes a frame made by [`encode`].
pub fn decode(frame: &[u8]) -> Result<Vec<Message>, DecodeError> {
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version { found: version });
    }
    Ok(rmp_serde::from_slice(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_every_message() {
        let messages = vec![
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
        ];
        let frame = encode(&messages);
        assert_eq!(decode(&frame).unwrap(), messages);
    }

    #[test]
    fn payload_is_encoded_as_binary_not_as_an_array() {
        let big = Bytes::from(vec![0xABu8; 4096]);
        let frame = encode(&[Message::Grant(Grant {
            object: "o".into(),
            count: 1,
            owner: false,
            total: 1,
            version: None,
            value: Some(Value {
                version: 0,
                type_name: "".into(),
                bytes: big,
            }),
        })]);
        // As an array, each byte >= 0x80 would take two bytes on the wire.
        assert!(frame.len() < 4096 + 64, "frame is {} bytes", frame.len());
    }

    #[test]
    fn bad_frames_are_errors() {
        assert!(matches!(decode(&[]), Err(DecodeError::Empty)));
        assert!(matches!(
            decode(&[99, 0x90]),
            Err(DecodeError::Version { found: 99 })
        ));
        assert!(matches!(
            decode(&[PROTOCOL_VERSION, 0xc1, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
        let mut truncated = encode(&[Message::Leaving, Message::LeaveAck]);
        truncated.pop();
        assert!(decode(&truncated).is_err());
    }
}
