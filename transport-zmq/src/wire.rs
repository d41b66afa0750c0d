//! The transport's own frame format: a fixed header and the payload.
//!
//! Every frame is laid out as
//!
//! ```text
//! offset size field
//!      0    4 magic b"COH1"            (rejects strangers speaking ZMTP)
//!      4    1 version                  (rejects other versions of this format)
//!      5    1 kind                     (1 hello, 2 join, 5 data, 6 heartbeat, 7 goodbye,
//!                                       8 handshake; 3 and 4, the welcome and announcement of
//!                                       the transport's former admission, are retired and
//!                                       dropped as unknown)
//!      6    1 flags                    (bit 0: the cluster has a secret)
//!      7    1 reserved, 0
//!      8    8 cluster-id hash, LE      (rejects frames of another cluster)
//!     16    4 sender id, LE            (u32::MAX while the sender has no id yet)
//!     20    8 sequence number, LE      (0 for unsequenced kinds, see below)
//!     28    8 acknowledgement, LE      (highest sequence number delivered from the receiver)
//!     36    4 payload length, LE
//!     40    n payload
//! ```
//!
//! Without a secret each frame is one single-part ZeroMQ message. With a secret (flag bit 0
//! set in every frame), a connection's first message is a handshake frame whose payload is
//! the first Noise handshake message, the listener answers with a handshake frame carrying
//! the second, and every later message is a frame sealed in that connection's Noise session
//! (see the `session` module): nothing of it, header included, crosses in clear.
//!
//! Decoding checks everything before anything is believed, and never panics: a frame that
//! fails is a [`Reject`], which the engine counts and drops.

use bytes::{BufMut, Bytes, BytesMut};
use coherence_core::NodeId;
use sha2::{Digest, Sha256};

use crate::session::Keys;

/// First bytes of every frame.
pub(crate) const MAGIC: [u8; 4] = *b"COH1";
/// Version of this frame format; a node drops frames of any other version. Version 1 carried
/// an HMAC instead of Noise sessions.
pub(crate) const VERSION: u8 = 2;
/// Size of the fixed header.
pub(crate) const HEADER_LEN: usize = 40;
/// Sender id of a node that has no id yet (it only sends `Join`), and of every
/// handshake frame (who speaks is said inside the session).
pub(crate) const NO_ID: NodeId = NodeId::MAX;
/// Flag bit: the sender's cluster has a secret, so the frame travels in a Noise session.
const FLAG_SECRET: u8 = 1;

/// What a frame is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// First frame on every new connection: who is speaking, to whom.
    Hello = 1,
    /// A joiner's request to be taken in, unsequenced and without sender id; the receiving
    /// member reports it to its core. (Kinds 3 and 4 were the welcome and announcement of
    /// the transport's own admission, which the core's views replaced; they stay unused.)
    Join = 2,
    /// An opaque frame of the core.
    Data = 5,
    /// Liveness and acknowledgements.
    Heartbeat = 6,
    /// The sender leaves; nothing follows it.
    Goodbye = 7,
    /// With a secret: a Noise handshake message, the only frame that crosses in clear.
    Handshake = 8,
}

impl Kind {
    fn from_u8(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Join,
            5 => Kind::Data,
            6 => Kind::Heartbeat,
            7 => Kind::Goodbye,
            8 => Kind::Handshake,
            _ => return None,
        })
    }
}

/// The header fields that the engine acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub sender: NodeId,
    /// Position in the sender's reliable stream to this receiver; 0 for unsequenced frames.
    pub seq: u64,
    /// Highest sequence number the sender has delivered from the receiver.
    pub ack: u64,
}

/// Why a received frame was dropped; each maps to one counter of [`crate::ZmqStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reject {
    /// Truncated, inconsistent, or breaking the protocol's rules.
    Malformed(&'static str),
    /// Another magic, version or cluster: not ours.
    Foreign(&'static str),
    /// Longer than `max_frame`.
    Oversize(usize),
    /// Not from a holder of the secret: no session where one is needed, a failed Noise
    /// handshake, or a session where this node has no secret.
    Unauthenticated(&'static str),
    /// A sealed message that did not decrypt under its connection's session: replayed from an
    /// earlier session or from earlier in this one, reordered, or altered on the way.
    Replayed(&'static str),
}

/// Encodes and checks frames for one cluster, and holds its session keys when it has a
/// secret.
#[derive(Debug, Clone)]
pub(crate) struct Codec {
    cluster: u64,
    keys: Option<Keys>,
    max_frame: usize,
}

/// A stable 64-bit digest of the cluster id, so frames carry a fixed-size tag of it.
pub(crate) fn cluster_hash(cluster_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"coherence-zmq cluster\0")
        .chain_update(cluster_id.as_bytes())
        .finalize();
    let mut tag = [0u8; 8];
    tag.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(tag)
}

impl Codec {
    /// A codec for `cluster_id`; with a secret, frames travel in Noise sessions.
    pub(crate) fn new(cluster_id: &str, secret: Option<&[u8]>, max_frame: usize) -> Codec {
        Codec {
            cluster: cluster_hash(cluster_id),
            keys: secret.map(|secret| Keys::new(cluster_id, secret)),
            max_frame,
        }
    }

    /// The session keys, with a secret.
    pub(crate) fn keys(&self) -> Option<&Keys> {
        self.keys.as_ref()
    }

    /// Builds a frame. The caller keeps payloads within `max_frame`, which fits a `u32`.
    pub(crate) fn encode(&self, header: Header, payload: &[u8]) -> Bytes {
        let mut out = BytesMut::with_capacity(HEADER_LEN + payload.len());
        out.put_slice(&MAGIC);
        out.put_u8(VERSION);
        out.put_u8(header.kind as u8);
        out.put_u8(if self.keys.is_some() { FLAG_SECRET } else { 0 });
        out.put_u8(0);
        out.put_u64_le(self.cluster);
        out.put_u32_le(header.sender);
        out.put_u64_le(header.seq);
        out.put_u64_le(header.ack);
        out.put_u32_le(u32::try_from(payload.len()).unwrap_or(u32::MAX));
        out.put_slice(payload);
        out.freeze()
    }

    /// Checks a received frame (opened from its session, with a secret) and splits it into
    /// header and payload (a view, no copy).
    pub(crate) fn decode(&self, frame: &Bytes) -> Result<(Header, Bytes), Reject> {
        if frame.len() > HEADER_LEN + self.max_frame {
            return Err(Reject::Oversize(frame.len()));
        }
        let Some(head) = frame.get(..HEADER_LEN) else {
            return Err(Reject::Malformed("shorter than the header"));
        };
        let u32_at =
            |at: usize| u32::from_le_bytes([head[at], head[at + 1], head[at + 2], head[at + 3]]);
        let u64_at = |at: usize| (u64::from(u32_at(at + 4)) << 32) | u64::from(u32_at(at));
        if head[..4] != MAGIC {
            return Err(Reject::Foreign("bad magic"));
        }
        if head[4] != VERSION {
            return Err(Reject::Foreign("other frame format version"));
        }
        if u64_at(8) != self.cluster {
            return Err(Reject::Foreign("other cluster id"));
        }
        let kind = Kind::from_u8(head[5]).ok_or(Reject::Malformed("unknown kind"))?;
        let flags = head[6];
        if flags & !FLAG_SECRET != 0 || head[7] != 0 {
            return Err(Reject::Malformed("unknown flags"));
        }
        let len = u32_at(36) as usize;
        if len > self.max_frame {
            return Err(Reject::Oversize(len));
        }
        match (&self.keys, flags & FLAG_SECRET != 0) {
            (Some(_), false) => {
                return Err(Reject::Unauthenticated(
                    "the sender has no secret, this node has one",
                ))
            }
            (None, true) => {
                return Err(Reject::Unauthenticated(
                    "the sender uses a secret, this node has none",
                ))
            }
            _ => {}
        }
        let body_end = HEADER_LEN + len;
        if frame.len() != body_end {
            return Err(Reject::Malformed("length does not match the header"));
        }
        let header = Header {
            kind,
            sender: u32_at(16),
            seq: u64_at(20),
            ack: u64_at(28),
        };
        check_sequencing(&header)?;
        Ok((header, frame.slice(HEADER_LEN..body_end)))
    }
}

/// Which kinds travel in the reliable, sequenced stream of a pair, and which do not.
fn check_sequencing(header: &Header) -> Result<(), Reject> {
    let sequenced = match header.kind {
        Kind::Hello | Kind::Heartbeat | Kind::Handshake | Kind::Join => false,
        Kind::Data | Kind::Goodbye => true,
    };
    if sequenced != (header.seq != 0) {
        return Err(Reject::Malformed("sequence number does not fit the kind"));
    }
    if header.sender == NO_ID && !matches!(header.kind, Kind::Join | Kind::Handshake) {
        return Err(Reject::Malformed(
            "only a join may come from a node without id",
        ));
    }
    if matches!(header.kind, Kind::Handshake | Kind::Join)
        && (header.sender != NO_ID || header.ack != 0)
    {
        return Err(Reject::Malformed(
            "a handshake or join request comes from a node without id",
        ));
    }
    Ok(())
}

/// Payload of [`Kind::Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hello {
    pub target: NodeId,
    pub target_incarnation: u64,
    pub incarnation: u64,
}

/// Payload of [`Kind::Join`]: the joiner's nonce (its future incarnation) and address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Join {
    pub nonce: u64,
    pub addr: String,
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(20);
        out.put_u32_le(self.target);
        out.put_u64_le(self.target_incarnation);
        out.put_u64_le(self.incarnation);
        out
    }

    pub(crate) fn decode(payload: &[u8]) -> Option<Hello> {
        let mut r = Reader(payload);
        let hello = Hello {
            target: r.u32()?,
            target_incarnation: r.u64()?,
            incarnation: r.u64()?,
        };
        r.finish(hello)
    }
}

impl Join {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(10 + self.addr.len());
        out.put_u64_le(self.nonce);
        put_str(&mut out, &self.addr);
        out
    }

    pub(crate) fn decode(payload: &[u8]) -> Option<Join> {
        let mut r = Reader(payload);
        let join = Join {
            nonce: r.u64()?,
            addr: r.string()?,
        };
        r.finish(join)
    }
}

/// Strings are a u16 length and UTF-8 bytes; addresses are short.
fn put_str(out: &mut Vec<u8>, s: &str) {
    let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.put_u16_le(bytes.len() as u16);
    out.put_slice(bytes);
}

/// A bounds-checked cursor: every read is `None` past the end instead of a panic.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }

    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }

    fn string(&mut self) -> Option<String> {
        let len = self.u16()? as usize;
        String::from_utf8(self.take(len)?.to_vec()).ok()
    }

    /// `value` if every byte was consumed: trailing bytes mean a malformed payload.
    fn finish<T>(self, value: T) -> Option<T> {
        self.0.is_empty().then_some(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(sender: NodeId, seq: u64) -> Header {
        Header {
            kind: Kind::Data,
            sender,
            seq,
            ack: 7,
        }
    }

    #[test]
    fn round_trip_with_and_without_secret() {
        for secret in [None, Some(&b"s3cret"[..])] {
            let codec = Codec::new("lab", secret, 1024);
            let frame = codec.encode(data(3, 9), b"payload");
            let (header, payload) = codec.decode(&frame).unwrap();
            assert_eq!(header, data(3, 9));
            assert_eq!(&payload[..], b"payload");
        }
    }

    #[test]
    fn rejects_foreign_oversize_unauthenticated_and_truncated() {
        let ours = Codec::new("lab", Some(b"k"), 16);
        let frame = ours.encode(data(1, 1), b"x");
        let other_cluster = Codec::new("other", Some(b"k"), 16).encode(data(1, 1), b"x");
        let no_key = Codec::new("lab", None, 16).encode(data(1, 1), b"x");
        let big = Codec::new("lab", Some(b"k"), 64).encode(data(1, 1), &[0; 17]);
        assert!(matches!(
            ours.decode(&other_cluster),
            Err(Reject::Foreign(_))
        ));
        // Which secret a frame was sealed with is the session's business; the flag says
        // whether the sender has one at all, both ways.
        assert!(matches!(
            ours.decode(&no_key),
            Err(Reject::Unauthenticated(_))
        ));
        assert!(matches!(
            Codec::new("lab", None, 16).decode(&frame),
            Err(Reject::Unauthenticated(_))
        ));
        assert!(matches!(ours.decode(&big), Err(Reject::Oversize(_))));
        for cut in 0..frame.len() {
            assert!(ours.decode(&frame.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut longer = frame.to_vec();
        longer.push(0);
        assert!(matches!(
            ours.decode(&Bytes::from(longer)),
            Err(Reject::Malformed(_))
        ));
    }

    #[test]
    fn rejects_kinds_with_the_wrong_sequencing() {
        let codec = Codec::new("lab", None, 16);
        let heartbeat_with_seq = Header {
            kind: Kind::Heartbeat,
            sender: 1,
            seq: 4,
            ack: 0,
        };
        let data_without_seq = data(1, 0);
        let data_without_id = data(NO_ID, 1);
        let sequenced_join = Header {
            kind: Kind::Join,
            sender: NO_ID,
            seq: 1,
            ack: 0,
        };
        let join_with_id = Header {
            kind: Kind::Join,
            sender: 1,
            seq: 0,
            ack: 0,
        };
        let handshake_with_id = Header {
            kind: Kind::Handshake,
            sender: 1,
            seq: 0,
            ack: 0,
        };
        for header in [
            heartbeat_with_seq,
            data_without_seq,
            data_without_id,
            handshake_with_id,
            sequenced_join,
            join_with_id,
        ] {
            let frame = codec.encode(header, b"");
            assert!(matches!(codec.decode(&frame), Err(Reject::Malformed(_))));
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let codec = Codec::new("lab", None, 256);
        let valid = codec.encode(data(2, 5), b"abc");
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let len = rng.gen_range(0..120);
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
            if rng.gen_bool(0.5) && len >= HEADER_LEN {
                // Keep a valid prefix so the later checks get exercised too.
                bytes[..HEADER_LEN].copy_from_slice(&valid[..HEADER_LEN]);
            }
            let _ = codec.decode(&Bytes::from(bytes.clone()));
            let _ = Hello::decode(&bytes);
            let _ = Join::decode(&bytes);
        }
    }

    #[test]
    fn control_payloads_round_trip() {
        let hello = Hello {
            target: 2,
            target_incarnation: 5,
            incarnation: 6,
        };
        assert_eq!(Hello::decode(&hello.encode()), Some(hello));
        let join = Join {
            nonce: 42,
            addr: "tcp://127.0.0.1:5555".into(),
        };
        assert_eq!(Join::decode(&join.encode()), Some(join.clone()));
        let mut truncated = join.encode();
        truncated.pop();
        assert_eq!(Join::decode(&truncated), None);
    }
}
