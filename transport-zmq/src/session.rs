//! Noise sessions: with a shared secret, every connection starts with a Noise handshake in
//! which both ends contribute a fresh ephemeral key, and every frame after it is encrypted and
//! authenticated under that connection's own keys.
//!
//! An HMAC with the shared secret proved who wrote a frame once, not that it was fresh: a
//! captured join request, replayed after its joiner left, was admitted again. A session key
//! depends on both ends' ephemeral keys, so a frame sealed in one session does not open in any
//! other, and the nonce counter that Noise keeps per direction makes a frame replayed,
//! dropped or reordered within a session fail too. Frames also no longer cross in clear.
//!
//! The pattern is `Noise_NNpsk0_25519_AESGCM_BLAKE2s` (snow implements it): two messages,
//! `-> psk, e` and `<- e, ee`. The cipher is AES-256-GCM from ring (through snow's
//! `ring-accelerated` resolver): on the bench VM it sealed and opened a 4 KiB frame in about
//! 1.5 µs and a small one in 0.2 µs, where the pure-Rust ChaChaPoly took 11 µs and 4 µs, which
//! made a write between two processes up to 1.9 times slower. Knowing the PSK is what authenticates both ends; no static
//! keys are needed, since every member holds the same secret and the transport's hello says
//! who speaks. The PSK is HKDF-SHA256 of the secret with the cluster id in its info, so one
//! secret used by two clusters gives two keys. Only the connecting side (a DEALER) sends
//! frames in its session; the listener sends the second handshake message and nothing else.
//!
//! Noise messages are at most 65,535 bytes. A frame longer than a message's payload is sealed
//! as consecutive Noise messages in one ZeroMQ message, each full but the last; the receiver
//! cuts the ZeroMQ message at the same places. A frame cut short or glued to another fails
//! the frame header's length check, and a missing, repeated or moved piece fails the nonce.

use bytes::Bytes;
use hkdf::Hkdf;
use sha2::Sha256;
use snow::{HandshakeState, TransportState};

use crate::wire::Reject;

/// The Noise protocol of every session.
pub(crate) const PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_BLAKE2s";
/// Mixed into the handshake hash: both ends must be this transport at this frame version.
const PROLOGUE: &[u8] = b"coherence-zmq session, frame version 2";
/// HKDF info label of the PSK; the cluster id follows it.
const PSK_INFO: &[u8] = b"coherence-zmq noise psk\0";
/// Largest Noise message (the Noise specification's limit).
const MAX_NOISE: usize = 65535;
/// AES-GCM's authentication tag, which every Noise message here carries.
pub(crate) const TAG_LEN: usize = 16;
/// Payload of one full Noise message.
const PIECE: usize = MAX_NOISE - TAG_LEN;
/// Length of both handshake messages: an X25519 public key and the tag of an empty payload.
pub(crate) const HANDSHAKE_LEN: usize = 32 + TAG_LEN;

/// The key material of one cluster: where every session starts from.
#[derive(Clone)]
pub(crate) struct Keys {
    psk: [u8; 32],
}

impl std::fmt::Debug for Keys {
    /// Never prints the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Keys(<redacted>)")
    }
}

/// Why a session could not be set up or used; the engine counts it as a [`Reject`].
fn refused(error: snow::Error, handshake: bool) -> Reject {
    tracing::debug!(%error, handshake, "Noise refused a message");
    if handshake {
        Reject::Unauthenticated("Noise handshake failed: another secret or cluster id")
    } else {
        Reject::Replayed("did not decrypt under its session")
    }
}

impl Keys {
    /// Derives the PSK of `cluster_id` from `secret`.
    pub(crate) fn new(cluster_id: &str, secret: &[u8]) -> Keys {
        let mut info = PSK_INFO.to_vec();
        info.extend_from_slice(cluster_id.as_bytes());
        let mut psk = [0; 32];
        Hkdf::<Sha256>::new(None, secret)
            .expand(&info, &mut psk)
            .unwrap_or_else(|_| unreachable!("HKDF-SHA256 yields up to 8160 bytes"));
        Keys { psk }
    }

    fn builder(&self) -> Result<snow::Builder<'_>, snow::Error> {
        snow::Builder::new(PATTERN.parse()?)
            .psk(0, &self.psk)?
            .prologue(PROLOGUE)
    }

    /// Starts a session as the connecting side: the state to finish it with, and the first
    /// handshake message to send.
    pub(crate) fn initiate(&self) -> Result<(Initiator, Vec<u8>), Reject> {
        let mut state = self
            .builder()
            .and_then(snow::Builder::build_initiator)
            .map_err(|e| refused(e, true))?;
        let mut message = vec![0; HANDSHAKE_LEN];
        let len = state
            .write_message(&[], &mut message)
            .map_err(|e| refused(e, true))?;
        message.truncate(len);
        Ok((Initiator(state), message))
    }

    /// Answers a first handshake message as the listening side: the session in which to open
    /// what the peer sends, and the second handshake message to send back.
    pub(crate) fn respond(&self, first: &[u8]) -> Result<(Session, Vec<u8>), Reject> {
        let mut state = self
            .builder()
            .and_then(snow::Builder::build_responder)
            .map_err(|e| refused(e, true))?;
        if first.len() != HANDSHAKE_LEN {
            return Err(Reject::Malformed(
                "a Noise handshake message of the wrong length",
            ));
        }
        let mut payload = [0; HANDSHAKE_LEN];
        state
            .read_message(first, &mut payload)
            .map_err(|e| refused(e, true))?;
        let mut message = vec![0; HANDSHAKE_LEN];
        let len = state
            .write_message(&[], &mut message)
            .map_err(|e| refused(e, true))?;
        message.truncate(len);
        Ok((Session::from(state)?, message))
    }
}

/// A session's connecting side, waiting for the second handshake message.
pub(crate) struct Initiator(HandshakeState);

impl Initiator {
    /// Reads the listener's answer: the session in which to seal frames.
    pub(crate) fn finish(mut self, second: &[u8]) -> Result<Session, Reject> {
        if second.len() != HANDSHAKE_LEN {
            return Err(Reject::Malformed(
                "a Noise handshake message of the wrong length",
            ));
        }
        let mut payload = [0; HANDSHAKE_LEN];
        self.0
            .read_message(second, &mut payload)
            .map_err(|e| refused(e, true))?;
        Session::from(self.0)
    }
}

/// One direction of traffic on one connection, after the handshake.
pub(crate) struct Session(TransportState);

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("sent", &self.0.sending_nonce())
            .field("received", &self.0.receiving_nonce())
            .finish()
    }
}

/// Length of a frame of `len` bytes once sealed.
pub(crate) fn sealed_len(len: usize) -> usize {
    len.saturating_add(len.div_ceil(PIECE).saturating_mul(TAG_LEN))
}

impl Session {
    fn from(state: HandshakeState) -> Result<Session, Reject> {
        state
            .into_transport_mode()
            .map(Session)
            .map_err(|e| refused(e, true))
    }

    /// Encrypts and authenticates `frame` as the next message of this session. Fails only
    /// after 2^64 messages, or if the frame is empty (no frame of this transport is).
    pub(crate) fn seal(&mut self, frame: &[u8]) -> Result<Bytes, snow::Error> {
        if frame.is_empty() {
            return Err(snow::Error::Input);
        }
        let mut out = vec![0; sealed_len(frame.len())];
        let mut at = 0;
        for piece in frame.chunks(PIECE) {
            at += self.0.write_message(piece, &mut out[at..])?;
        }
        out.truncate(at);
        Ok(Bytes::from(out))
    }

    /// Decrypts the next message of this session; anything but exactly that message (one
    /// replayed from this or an earlier session, reordered, altered or forged) fails, and the
    /// session is of no further use then: the caller closes the connection.
    pub(crate) fn open(&mut self, message: &[u8]) -> Result<Bytes, Reject> {
        let pieces = message.len().div_ceil(MAX_NOISE);
        let Some(len) = message
            .len()
            .checked_sub(pieces * TAG_LEN)
            .filter(|&n| n > 0)
        else {
            return Err(Reject::Malformed("a sealed message shorter than its tag"));
        };
        let mut out = vec![0; len];
        let mut at = 0;
        for piece in message.chunks(MAX_NOISE) {
            at += self
                .0
                .read_message(piece, &mut out[at..])
                .map_err(|e| refused(e, false))?;
        }
        out.truncate(at);
        Ok(Bytes::from(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(keys: &Keys) -> (Session, Session) {
        let (initiator, first) = keys.initiate().unwrap();
        let (responder, second) = keys.respond(&first).unwrap();
        (initiator.finish(&second).unwrap(), responder)
    }

    #[test]
    fn frames_of_any_length_round_trip_in_order() {
        let keys = Keys::new("lab", b"secret");
        let (mut sender, mut receiver) = pair(&keys);
        for len in [1, 40, PIECE - 1, PIECE, PIECE + 1, 3 * PIECE + 7] {
            let frame: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let sealed = sender.seal(&frame).unwrap();
            assert_eq!(sealed.len(), sealed_len(len), "len {len}");
            assert_eq!(&receiver.open(&sealed).unwrap()[..], &frame[..]);
        }
    }

    #[test]
    fn replayed_reordered_and_foreign_messages_fail() {
        let keys = Keys::new("lab", b"secret");
        let (mut sender, mut receiver) = pair(&keys);
        let first = sender.seal(b"first frame").unwrap();
        let second = sender.seal(b"second frame").unwrap();
        // Out of order: the receiver expects the first.
        assert!(matches!(receiver.open(&second), Err(Reject::Replayed(_))));
        assert!(receiver.open(&first).is_ok());
        // Replayed within the session.
        assert!(matches!(receiver.open(&first), Err(Reject::Replayed(_))));
        // Replayed into a fresh session with the same keys: a fresh handshake, fresh keys.
        let (_, mut later) = pair(&keys);
        assert!(matches!(later.open(&first), Err(Reject::Replayed(_))));
        // The whole conversation replayed to a new responder: the replayed first handshake
        // message is answered, but the frames of the old session do not open in the new one.
        let (initiator, hello) = keys.initiate().unwrap();
        let (responder, answer) = keys.respond(&hello).unwrap();
        let mut old = initiator.finish(&answer).unwrap();
        let join = old.seal(b"join").unwrap();
        let (mut replayed, _) = keys.respond(&hello).unwrap();
        assert!(matches!(replayed.open(&join), Err(Reject::Replayed(_))));
        drop(responder);
    }

    #[test]
    fn another_secret_or_cluster_fails_the_handshake() {
        let keys = Keys::new("lab", b"secret");
        let (_, first) = keys.initiate().unwrap();
        for other in [Keys::new("lab", b"secreT"), Keys::new("lab2", b"secret")] {
            assert!(matches!(
                other.respond(&first),
                Err(Reject::Unauthenticated(_))
            ));
        }
        assert!(matches!(
            keys.respond(&first[1..]),
            Err(Reject::Malformed(_))
        ));
        let (initiator, _) = keys.initiate().unwrap();
        let (_, stranger) = Keys::new("lab", b"guess")
            .respond(&{
                let (_, first) = Keys::new("lab", b"guess").initiate().unwrap();
                first
            })
            .unwrap();
        assert!(matches!(
            initiator.finish(&stranger),
            Err(Reject::Unauthenticated(_))
        ));
    }

    #[test]
    fn truncated_and_empty_messages_fail_without_panicking() {
        use crate::wire::{Codec, Header, Kind};
        let codec = Codec::new("lab", Some(b"secret"), 4 * PIECE);
        let keys = codec.keys().unwrap();
        let header = Header {
            kind: Kind::Data,
            sender: 1,
            seq: 1,
            ack: 0,
        };
        let frame = codec.encode(header, &vec![7; 2 * PIECE]);
        let cuts = [
            0,
            1,
            TAG_LEN,
            TAG_LEN + 1,
            MAX_NOISE,
            MAX_NOISE + TAG_LEN + 1,
        ];
        for cut in cuts.into_iter().chain([sealed_len(frame.len()) - 1]) {
            let (mut sender, mut receiver) = pair(keys);
            let sealed = sender.seal(&frame).unwrap();
            // Cut at a piece's end, the pieces before it open: the frame header's length is
            // what tells the frame is incomplete.
            let opened = receiver.open(&sealed[..cut]);
            assert!(
                opened.and_then(|f| codec.decode(&f)).is_err(),
                "cut at {cut}"
            );
        }
        let (mut sender, _) = pair(keys);
        assert!(sender.seal(&[]).is_err());
    }
}
