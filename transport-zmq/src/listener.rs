//! The node's public TCP listener: the server side of ZMTP 3.0 with the NULL mechanism, so that
//! every byte a stranger sends is checked here before anything is reserved for it.
//!
//! zmq.rs's ROUTER reserved memory for whatever length a frame header claimed, had no limit on
//! connections and no deadline for a handshake, and spun on a failed accept (see "Hostile
//! networks" in the crate documentation). Every node only ever *receives* on its listener, so
//! its side of ZMTP is small: send our greeting and READY, check the peer's, then read frames
//! (and, with a secret, answer the Noise handshake once).
//!
//! With a secret, the first message must be a Noise handshake message that opens with the
//! cluster's key; the listener answers with the second handshake message, the only message it
//! ever sends, and from then on opens every message in that connection's session (see the
//! `session` module). A message that does not open closes the connection: it was replayed,
//! reordered, altered or forged, and the session cannot go on after a lost message anyway.
//!
//! A connection is *unauthenticated* until its first frame is a hello the engine accepts or
//! a join request (both pass the codec first: cluster and version, and with a secret they
//! must have opened in the session). Until then every frame it sends may be at most
//! [`FIRST_MESSAGE`] bytes, it must authenticate within `handshake_timeout`, and at most
//! `max_unauthenticated` such connections are kept (a new one closes the oldest). A first message that does not authenticate closes
//! the connection. Afterwards a message may be as long as the codec's largest frame. A frame
//! header that claims more than its limit closes the connection before any of the body is read.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use coherence_core::wait;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::Instant;
use zeromq::{Endpoint, Host};

use crate::engine::Shared;
use crate::session::Session;
use crate::wire::{Codec, Header, Kind, Reject, NO_ID};

/// Largest frame, command or message, a connection may send before it authenticated: a hello
/// is 76 bytes sealed, a handshake message 88, a join request names one address, and READY
/// names a socket type and at most a 255-byte identity. This bounds what a stranger makes us
/// allocate.
pub(crate) const FIRST_MESSAGE: usize = 4096;
/// Longest address a join request can carry within [`FIRST_MESSAGE`] (checked in the config).
pub(crate) const MAX_ADDR_LEN: usize = 1024;
/// Read at least this much at a time once authenticated, so a stream of small frames costs
/// one read call for many of them.
const READ_CHUNK: usize = 64 << 10;
/// Socket buffers of accepted connections, as zmq.rs sets them: large frames flow without
/// waiting for the window to grow.
const SOCKET_BUFFER: u32 = 4 << 20;
/// Connections waiting in the kernel to be accepted.
const BACKLOG: u32 = 1024;
/// The fewest unauthenticated connections a full file table lowers the limit to: enough that
/// a few joiners and reconnecting members are not closed by each other.
const MIN_UNAUTHENTICATED: usize = 8;
/// ZMTP frame flags.
const MORE: u8 = 0x01;
const LONG: u8 = 0x02;
const COMMAND: u8 = 0x04;

/// What the listener enforces, from the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub handshake_timeout: Duration,
    pub max_unauthenticated: usize,
    /// Largest message of an authenticated connection: header and `max_frame`, sealed with a
    /// secret.
    pub max_message: usize,
}

/// A message for the engine. The first message of a connection carries `verdict`: the engine
/// answers whether it authenticates the connection, and the connection reads nothing more
/// until it knows.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub conn: u64,
    pub frame: Bytes,
    pub verdict: Option<oneshot::Sender<bool>>,
}

/// Binds `listen` (a `tcp://` endpoint); returns the listener and its address with the real
/// port.
pub(crate) async fn bind(listen: &str) -> Result<(TcpListener, String), String> {
    let Ok(Endpoint::Tcp(host, port)) = listen.parse::<Endpoint>() else {
        return Err("not a tcp:// endpoint".into());
    };
    let addr = match &host {
        Host::Ipv4(ip) => SocketAddr::new(IpAddr::V4(*ip), port),
        Host::Ipv6(ip) => SocketAddr::new(IpAddr::V6(*ip), port),
        Host::Domain(name) => tokio::net::lookup_host((name.as_str(), port))
            .await
            .map_err(|e| format!("cannot resolve {name}: {e}"))?
            .next()
            .ok_or_else(|| format!("{name} resolves to no address"))?,
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| e.to_string())?;
    socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
    // Accepted sockets inherit it; a failure only costs throughput of large frames.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    socket.bind(addr).map_err(|e| e.to_string())?;
    let listener = socket.listen(BACKLOG).map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    Ok((listener, Endpoint::Tcp(host, port).to_string()))
}

/// Connections not yet authenticated, oldest (lowest number) first.
type Pending = Arc<Mutex<BTreeMap<u64, AbortHandle>>>;

/// What every connection task shares.
pub(crate) struct Context {
    codec: Codec,
    limits: Limits,
    shared: Arc<Shared>,
    to_engine: mpsc::Sender<Inbound>,
    gone: mpsc::UnboundedSender<u64>,
    pending: Pending,
}

/// Accepts connections until the task is dropped.
///
/// A failed accept (a full file table, most often) pauses for [`wait::ACCEPT_BACKOFF`] instead
/// of failing again at once. It also lowers the limit of unauthenticated connections to three
/// quarters of those open (not below [`MIN_UNAUTHENTICATED`] on its account) and closes the
/// oldest down to it:
/// the table filled up at that many, so a quarter of their descriptors stay free from then on
/// for members, joiners and our own outgoing connections.
pub(crate) async fn accept(listener: TcpListener, context: Context) {
    let context = Arc::new(context);
    let limits = context.limits;
    let mut limit = limits.max_unauthenticated;
    let mut next_conn = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                let failures = context.shared.accept_errors.fetch_add(1, Relaxed) + 1;
                let open = lock(&context.pending).len();
                limit = (open * 3 / 4).max(MIN_UNAUTHENTICATED).min(limit);
                // Once per streak is enough in the log: a full table fails many times a second.
                if failures.is_power_of_two() {
                    tracing::warn!(error = %e, failures, limit, "cannot accept; pausing");
                }
                drop_oldest(&context, limit.min(open.saturating_sub(1)));
                tokio::time::sleep(wait::ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let conn = next_conn;
        next_conn += 1;
        let task = tokio::spawn(serve(conn, stream, Arc::clone(&context)));
        // The task has not run yet (this runtime has one thread, and we did not yield), so
        // it finds itself in `pending` when it authenticates or ends.
        lock(&context.pending).insert(conn, task.abort_handle());
        if drop_oldest(&context, limit) {
            // Lets the runtime run the cancelled tasks, which closes their sockets before we
            // take another descriptor.
            tokio::task::yield_now().await;
        }
    }
}

fn lock(pending: &Pending) -> std::sync::MutexGuard<'_, BTreeMap<u64, AbortHandle>> {
    pending.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Closes the oldest unauthenticated connections until at most `keep` are left; whether it
/// closed any.
fn drop_oldest(context: &Context, keep: usize) -> bool {
    let mut pending = lock(&context.pending);
    let mut dropped = false;
    while pending.len() > keep {
        let Some((conn, task)) = pending.pop_first() else {
            break;
        };
        // The socket closes when the runtime next runs the cancelled task.
        task.abort();
        context.shared.dropped_unauthenticated.fetch_add(1, Relaxed);
        tracing::debug!(
            conn,
            keep,
            "closed an unauthenticated connection to make room"
        );
        dropped = true;
    }
    dropped
}

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// The peer closed it, the socket failed, or the engine is gone.
    Closed,
    /// It broke ZMTP, or its first message did not authenticate it.
    Refused(Reject),
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> End {
        End::Closed
    }
}

/// Tells the engine and the accept loop that a connection ended, however its task ends.
struct Departure {
    conn: u64,
    context: Arc<Context>,
}

impl Drop for Departure {
    fn drop(&mut self) {
        lock(&self.context.pending).remove(&self.conn);
        let _ = self.context.gone.send(self.conn);
    }
}

/// One accepted connection: handshake and authentication within the deadline, then messages.
pub(crate) async fn serve<S>(conn: u64, stream: S, context: Arc<Context>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _departure = Departure {
        conn,
        context: Arc::clone(&context),
    };
    let mut wire = Wire {
        stream,
        buf: BytesMut::new(),
    };
    let deadline = Instant::now() + context.limits.handshake_timeout;
    let handshake = wire.handshake(&context.codec);
    let (first, session) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(first)) => first,
        Ok(Err(end)) => return context.ended(conn, end),
        Err(_) => return context.timed_out(conn),
    };
    let (verdict, answer) = oneshot::channel();
    let message = Inbound {
        conn,
        frame: first,
        verdict: Some(verdict),
    };
    if context.to_engine.send(message).await.is_err() {
        return;
    }
    match tokio::time::timeout_at(deadline, answer).await {
        Ok(Ok(true)) => {}
        // The engine counted why; nothing this connection says later is believed.
        Ok(Ok(false) | Err(_)) => return,
        Err(_) => return context.timed_out(conn),
    }
    lock(&context.pending).remove(&conn);
    let end = wire.messages(conn, &context, session).await;
    context.ended(conn, end);
}

impl Context {
    /// What the accept loop and every connection need; `codec` decides whether connections
    /// start with a Noise handshake.
    pub(crate) fn new(
        codec: Codec,
        limits: Limits,
        shared: Arc<Shared>,
        to_engine: mpsc::Sender<Inbound>,
        gone: mpsc::UnboundedSender<u64>,
    ) -> Context {
        Context {
            codec,
            limits,
            shared,
            to_engine,
            gone,
            pending: Arc::default(),
        }
    }

    fn ended(&self, conn: u64, end: End) {
        if let End::Refused(reject) = end {
            tracing::debug!(conn, ?reject, "closed a connection");
            self.shared.count(reject);
        }
    }

    fn timed_out(&self, conn: u64) {
        tracing::debug!(conn, after = ?self.limits.handshake_timeout, "no hello in time");
        self.shared.dropped_unauthenticated.fetch_add(1, Relaxed);
    }
}

/// A connection's socket and what was read from it but not yet used.
struct Wire<S> {
    stream: S,
    buf: BytesMut,
}

/// One ZMTP frame.
struct Frame {
    flags: u8,
    body: Bytes,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// Reads until `n` bytes are buffered, `chunk` at a time at least.
    async fn fill(&mut self, n: usize, chunk: usize) -> Result<(), End> {
        while self.buf.len() < n {
            self.buf.reserve((n - self.buf.len()).max(chunk));
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(End::Closed);
            }
        }
        Ok(())
    }

    /// Reads one frame; its length is checked against `max_command` or `max_message` before
    /// anything is reserved for the body.
    async fn frame(&mut self, max_command: usize, max_message: usize) -> Result<Frame, End> {
        let chunk = READ_CHUNK.min(max_message);
        self.fill(2, chunk).await?;
        let flags = self.buf[0];
        if flags & !(MORE | LONG | COMMAND) != 0 {
            return Err(End::Refused(Reject::Malformed("reserved ZMTP frame flags")));
        }
        let len = if flags & LONG != 0 {
            self.fill(9, chunk).await?;
            self.buf.advance(1);
            self.buf.get_u64()
        } else {
            self.buf.advance(1);
            u64::from(self.buf.get_u8())
        };
        let max = if flags & COMMAND != 0 {
            max_command
        } else {
            max_message
        };
        let len = match usize::try_from(len) {
            Ok(len) if len <= max => len,
            _ => {
                tracing::warn!(len, max, "a frame header claims too much; closing");
                return Err(End::Refused(Reject::Oversize(
                    usize::try_from(len).unwrap_or(usize::MAX),
                )));
            }
        };
        self.fill(len, chunk).await?;
        Ok(Frame {
            flags,
            body: self.buf.split_to(len).freeze(),
        })
    }

    /// Greeting and READY both ways, with a secret the Noise handshake, then the first frame
    /// (opened from its session), all at most [`FIRST_MESSAGE`]. Returns the first frame and
    /// the session to open the rest in.
    async fn handshake(&mut self, codec: &Codec) -> Result<(Bytes, Option<Session>), End> {
        self.stream.write_all(&greeting()).await?;
        self.fill(64, FIRST_MESSAGE).await?;
        let theirs = self.buf.split_to(64);
        if theirs[0] != 0xff || theirs[9] != 0x7f || theirs[10] < 3 {
            return Err(End::Refused(Reject::Malformed("not a ZMTP 3 greeting")));
        }
        if theirs[12..32] != null_mechanism() {
            return Err(End::Refused(Reject::Malformed(
                "a ZMTP security mechanism other than NULL",
            )));
        }
        self.stream.write_all(&ready()).await?;
        let ready = self.frame(FIRST_MESSAGE, FIRST_MESSAGE).await?;
        if ready.flags & COMMAND == 0 || !peer_fits_a_router(&ready.body) {
            return Err(End::Refused(Reject::Malformed(
                "no READY from a DEALER, REQ or ROUTER",
            )));
        }
        let first = self.first_message().await?;
        let Some(keys) = codec.keys() else {
            return Ok((first, None));
        };
        let (header, payload) = codec.decode(&first).map_err(End::Refused)?;
        if header.kind != Kind::Handshake {
            return Err(End::Refused(Reject::Unauthenticated(
                "a frame where the Noise handshake belongs",
            )));
        }
        let (mut session, answer) = keys.respond(&payload).map_err(End::Refused)?;
        let answer = codec.encode(
            Header {
                kind: Kind::Handshake,
                sender: NO_ID,
                seq: 0,
                ack: 0,
            },
            &answer,
        );
        self.stream.write_all(&message(&answer)).await?;
        let sealed = self.first_message().await?;
        let first = session.open(&sealed).map_err(End::Refused)?;
        Ok((first, Some(session)))
    }

    /// The next single-part message of at most [`FIRST_MESSAGE`] bytes, skipping commands.
    async fn first_message(&mut self) -> Result<Bytes, End> {
        loop {
            let frame = self.frame(FIRST_MESSAGE, FIRST_MESSAGE).await?;
            if frame.flags & COMMAND != 0 {
                continue; // ZMTP 3.0 has none after READY; nothing to answer
            }
            if frame.flags & MORE != 0 {
                return Err(End::Refused(Reject::Malformed("not a single-part message")));
            }
            return Ok(frame.body);
        }
    }

    /// Hands every message (opened from `session`, with a secret) to the engine until the
    /// connection ends; a multi-part message, which this transport never sends, is read and
    /// dropped.
    async fn messages(
        &mut self,
        conn: u64,
        context: &Context,
        mut session: Option<Session>,
    ) -> End {
        let max = context.limits.max_message;
        let mut multipart = false;
        loop {
            let frame = match self.frame(FIRST_MESSAGE, max).await {
                Ok(frame) => frame,
                Err(end) => return end,
            };
            if frame.flags & COMMAND != 0 {
                continue;
            }
            if multipart || frame.flags & MORE != 0 {
                multipart = frame.flags & MORE != 0;
                if !multipart {
                    context
                        .shared
                        .count(Reject::Malformed("not a single-part message"));
                }
                continue;
            }
            let frame = match &mut session {
                Some(session) => match session.open(&frame.body) {
                    Ok(frame) => frame,
                    Err(reject) => return End::Refused(reject),
                },
                None => frame.body,
            };
            let message = Inbound {
                conn,
                frame,
                verdict: None,
            };
            if context.to_engine.send(message).await.is_err() {
                return End::Closed;
            }
        }
    }
}

/// The mechanism field of a greeting: "NULL", zero-padded to 20 bytes.
fn null_mechanism() -> [u8; 20] {
    let mut mechanism = [0u8; 20];
    mechanism[..4].copy_from_slice(b"NULL");
    mechanism
}

/// Our greeting: ZMTP 3.0, NULL mechanism, not as server (NULL has no roles).
fn greeting() -> [u8; 64] {
    let mut greeting = [0u8; 64];
    greeting[0] = 0xff;
    greeting[9] = 0x7f;
    greeting[10] = 3;
    greeting[12..32].copy_from_slice(&null_mechanism());
    greeting
}

/// A single-part ZMTP message frame carrying `body`.
fn message(body: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(body.len() + 9);
    match u8::try_from(body.len()) {
        Ok(len) => frame.extend_from_slice(&[0, len]),
        Err(_) => {
            frame.put_u8(LONG);
            frame.put_u64(body.len() as u64);
        }
    }
    frame.extend_from_slice(body);
    frame
}

/// Our READY command: a short command frame naming our socket type.
fn ready() -> Vec<u8> {
    let mut body = vec![5];
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&6u32.to_be_bytes());
    body.extend_from_slice(b"ROUTER");
    let mut frame = vec![COMMAND, body.len() as u8];
    frame.extend_from_slice(&body);
    frame
}

/// Whether `body` is a READY command whose Socket-Type may talk to a ROUTER.
fn peer_fits_a_router(body: &[u8]) -> bool {
    let mut rest = body;
    let name_len = take(&mut rest, 1).map_or(0, |len| usize::from(len[0]));
    if take(&mut rest, name_len) != Some(b"READY") {
        return false;
    }
    // Properties: a 1-byte name length, the name, a 4-byte value length, the value.
    while let Some(name_len) = take(&mut rest, 1) {
        let Some(name) = take(&mut rest, usize::from(name_len[0])) else {
            return false;
        };
        let Some(value_len) = take(&mut rest, 4) else {
            return false;
        };
        let value_len =
            u32::from_be_bytes([value_len[0], value_len[1], value_len[2], value_len[3]]);
        let Some(value) = usize::try_from(value_len)
            .ok()
            .and_then(|len| take(&mut rest, len))
        else {
            return false;
        };
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            return matches!(value, b"DEALER" | b"REQ" | b"ROUTER");
        }
    }
    false // no Socket-Type
}

/// The first `n` bytes of `rest`, which then starts after them; `None` if it is shorter.
fn take<'a>(rest: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if rest.len() < n {
        return None;
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Some(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_of(socket_type: &[u8]) -> Vec<u8> {
        let mut body = vec![5];
        body.extend_from_slice(b"READY");
        body.push(8);
        body.extend_from_slice(b"Identity");
        body.extend_from_slice(&2u32.to_be_bytes());
        body.extend_from_slice(b"id");
        body.push(11);
        body.extend_from_slice(b"Socket-Type");
        body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
        body.extend_from_slice(socket_type);
        body
    }

    #[test]
    fn accepts_a_dealer_and_refuses_other_socket_types_and_garbage() {
        assert!(peer_fits_a_router(&ready_of(b"DEALER")));
        assert!(peer_fits_a_router(&ready()[2..]));
        assert!(!peer_fits_a_router(&ready_of(b"PUB")));
        let dealer = ready_of(b"DEALER");
        for cut in 0..dealer.len() {
            assert!(!peer_fits_a_router(&dealer[..cut]), "cut at {cut}");
        }
        let mut lying = dealer.clone();
        // The identity's value length claims 4 GiB.
        lying[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(!peer_fits_a_router(&lying));
    }

    #[test]
    fn our_handshake_is_what_zmq_peers_expect() {
        let greeting = greeting();
        assert_eq!((greeting[0], greeting[9], greeting[10]), (0xff, 0x7f, 3));
        assert_eq!(&greeting[12..16], b"NULL");
        let ready = ready();
        assert_eq!(ready[0], COMMAND);
        assert_eq!(usize::from(ready[1]), ready.len() - 2);
    }
}
