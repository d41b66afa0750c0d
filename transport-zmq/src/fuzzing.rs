//! Entry points for the cargo-fuzz targets in `fuzz/`, and nothing else: not part of the API,
//! hidden from the documentation, and free to change with the targets.
//!
//! Each function runs the transport's own code on bytes as they would come off the network:
//! frames and their control payloads, one connection to the listener (ZMTP greeting, READY,
//! frame headers, with a secret the Noise handshake, then messages), and Noise handshake and
//! sealed messages. None of them changes how a node behaves; they only make that code
//! reachable from outside the crate. They report what a target can check (a round trip, a
//! count) and leave the asserting to it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::engine::Shared;
use crate::listener::{self, Context, Inbound, Limits};
use crate::session::Keys;
use crate::wire::{Codec, Hello, Join, HEADER_LEN};

/// The cluster every function here uses.
pub const CLUSTER: &str = "fuzz";
/// The secret every function here uses, when it uses one.
pub const SECRET: &[u8] = b"fuzz secret";
/// `max_frame` of every codec here: small, so that a claim beyond it is easy to reach.
pub const MAX_FRAME: usize = 64 << 10;

fn codec(secret: bool) -> Codec {
    Codec::new(CLUSTER, secret.then_some(SECRET), MAX_FRAME)
}

/// Decodes `frame` as a node of [`CLUSTER`] with [`MAX_FRAME`] would, with or without
/// [`SECRET`] (a frame as opened from its session), then its payload as the control payload
/// its kind says. Returns the frame encoded again from what was decoded, `None` if it was
/// refused: the codec reads every field, so that must equal `frame`.
pub fn frame_round_trip(frame: &[u8], secret: bool) -> Option<Vec<u8>> {
    let codec = codec(secret);
    let (header, payload) = codec.decode(&Bytes::copy_from_slice(frame)).ok()?;
    payloads_round_trip(&payload);
    Some(codec.encode(header, &payload).to_vec())
}

/// Decodes `payload` as each control payload (hello, join request); whether every one that
/// decoded encodes back to exactly `payload`.
pub fn payloads_round_trip(payload: &[u8]) -> bool {
    let hello = Hello::decode(payload).is_none_or(|hello| hello.encode() == payload);
    let join = Join::decode(payload).is_none_or(|join| join.encode() == payload);
    hello && join
}

/// What one fuzzed connection to the listener came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Connection {
    /// Messages the listener handed to the engine (the first one included).
    pub messages: usize,
    /// The largest of them.
    pub largest: usize,
}

/// Runs the listener's side of one connection on `input`, the bytes a peer sends, with or
/// without [`SECRET`]; the engine is a stand-in that decodes each message with the codec and
/// authenticates a connection whose first message decodes. Ends when the listener closes the
/// connection or the input runs out.
pub fn listener_connection(input: &[u8], secret: bool) -> Connection {
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return Connection::default();
    };
    let codec = codec(secret);
    let limits = Limits {
        handshake_timeout: Duration::from_secs(5),
        max_unauthenticated: 1,
        max_message: crate::session::sealed_len(HEADER_LEN + MAX_FRAME),
    };
    let input = input.to_vec();
    runtime.block_on(async move {
        let (to_engine, mut inbound) = mpsc::channel::<Inbound>(16);
        let (gone, _gone) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let context = Context::new(codec.clone(), limits, shared, to_engine, gone);
        let (mut peer, ours) = tokio::io::duplex(64 << 10);
        let engine = tokio::spawn(async move {
            let mut seen = Connection::default();
            while let Some(message) = inbound.recv().await {
                seen.messages += 1;
                seen.largest = seen.largest.max(message.frame.len());
                let decoded = codec.decode(&message.frame).is_ok();
                if let Some(verdict) = message.verdict {
                    let _ = verdict.send(decoded);
                }
            }
            seen
        });
        let sender = tokio::spawn(async move {
            let _ = peer.write_all(&input).await;
            let _ = peer.shutdown().await;
            // Takes what the listener writes until it closes, so it never waits on a full pipe.
            let mut answers = Vec::new();
            let _ = peer.read_to_end(&mut answers).await;
        });
        listener::serve(0, ours, Arc::new(context)).await;
        let _ = sender.await;
        engine.await.unwrap_or_default()
    })
}

fn keys() -> Keys {
    Keys::new(CLUSTER, SECRET)
}

/// Answers `first` as the listener's side of a Noise handshake of [`CLUSTER`] with
/// [`SECRET`]; whether it was accepted.
pub fn noise_respond(first: &[u8]) -> bool {
    keys().respond(first).is_ok()
}

/// Starts a Noise handshake as the connecting side and reads `answer` as the listener's;
/// whether a session came of it.
pub fn noise_finish(answer: &[u8]) -> bool {
    keys()
        .initiate()
        .and_then(|(initiator, _)| initiator.finish(answer))
        .is_ok()
}

/// Opens each of `messages` in turn on the listening side of a real session, as sealed
/// messages off the network, until one fails (as the listener closes the connection then);
/// returns how many opened.
pub fn noise_open(messages: &[&[u8]]) -> usize {
    let Some((_, mut receiver)) = session_pair() else {
        return 0;
    };
    messages
        .iter()
        .take_while(|message| receiver.open(message).is_ok())
        .count()
}

/// Seals each of `frames` in a real session and opens it on the other side; whether every
/// one came back unchanged (an empty frame, which the transport never sends, is refused by
/// both sides and counts as unchanged).
pub fn noise_round_trip(frames: &[&[u8]]) -> bool {
    let Some((mut sender, mut receiver)) = session_pair() else {
        return false;
    };
    frames.iter().all(|frame| match sender.seal(frame) {
        Ok(sealed) => receiver.open(&sealed).is_ok_and(|opened| opened == frame),
        Err(_) => frame.is_empty(),
    })
}

fn session_pair() -> Option<(crate::session::Session, crate::session::Session)> {
    let keys = keys();
    let (initiator, first) = keys.initiate().ok()?;
    let (receiver, answer) = keys.respond(&first).ok()?;
    Some((initiator.finish(&answer).ok()?, receiver))
}
