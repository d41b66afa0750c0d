//! Helpers shared by the integration tests: loopback clusters and bounded waits.
#![allow(dead_code)] // each test binary uses its own subset

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use coherence_core::{Contact, NodeId, Transport, TransportEvent};
use transport_zmq::{ZmqConfig, ZmqTransport};

/// Longest any single wait in a test may take; a hang fails instead of blocking the run.
pub const WAIT: Duration = Duration::from_secs(10);

/// A loopback configuration for `cluster` with a fast heartbeat, so loss tests stay short.
/// Also turns on logging to the test output (`RUST_LOG=transport_zmq=debug` to see it).
pub fn config(cluster: &str) -> ZmqConfig {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    ZmqConfig {
        lost_after: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(100),
        ..ZmqConfig::new("tcp://127.0.0.1:0", cluster)
    }
}

/// Starts a founder and `n - 1` joiners through it (ids 0..n), playing the core's part in
/// admitting each (see [`admit`]); leaves no event behind.
pub fn cluster(n: usize, base: &ZmqConfig) -> Vec<ZmqTransport> {
    let mut nodes = vec![ZmqTransport::start(base.clone()).expect("founder starts")];
    for i in 1..n {
        let node = admit(&nodes, 0, base.clone());
        assert_eq!(node.local_id() as usize, i);
        nodes.push(node);
    }
    nodes
}

/// The members' contacts, as a view names them.
pub fn contacts<'a>(
    nodes: impl IntoIterator<Item = &'a ZmqTransport>,
) -> BTreeMap<NodeId, Contact> {
    nodes
        .into_iter()
        .map(|node| {
            (
                node.local_id(),
                node.contact().expect("a ZeroMQ node has a contact"),
            )
        })
        .collect()
}

/// Starts a joiner (`joiner`, with `join` set to `members[via]`) on a thread and plays the
/// core's part: takes the
/// `JoinRequest` that member reports, gives the joiner the next id, names the new members on
/// every member (whose transports then address the joiner, which learns its id from that),
/// then on the joiner. Drains repeated join requests.
pub fn admit(members: &[ZmqTransport], via: usize, joiner: ZmqConfig) -> ZmqTransport {
    let joiner = ZmqConfig {
        join: Some(members[via].local_addr()),
        ..joiner
    };
    let starting = std::thread::spawn(move || ZmqTransport::start(joiner));
    let request = match next(&members[via]) {
        TransportEvent::JoinRequest(contact) => contact,
        other => panic!("expected a join request, got {other:?}"),
    };
    let id = members.iter().map(Transport::local_id).max().unwrap_or(0) + 1;
    let mut view = contacts(members);
    view.insert(id, request.clone());
    for member in members {
        member.connect_members(&view);
    }
    let joiner = starting
        .join()
        .expect("no panic")
        .expect("the joiner starts");
    assert_eq!(joiner.local_id(), id);
    assert_eq!(joiner.peers(), Vec::<NodeId>::new());
    assert!(joiner.joins_running_cluster());
    assert_eq!(joiner.contact(), Some(request));
    joiner.connect_members(&view);
    drain_join_requests(&members[via]);
    joiner
}

/// Consumes the join requests a joiner repeated before it learned its id.
pub fn drain_join_requests(node: &ZmqTransport) {
    while let Some(event) = node
        .recv(Duration::from_millis(20))
        .expect("transport is open")
    {
        assert!(
            matches!(event, TransportEvent::JoinRequest(_)),
            "node {} got unexpected {event:?}",
            node.local_id()
        );
    }
}

/// The next event, within [`WAIT`].
pub fn next(node: &ZmqTransport) -> TransportEvent {
    node.recv(WAIT)
        .expect("transport is open")
        .unwrap_or_else(|| panic!("node {} got no event within {WAIT:?}", node.local_id()))
}

/// Asserts that nothing arrives within `quiet`.
pub fn expect_quiet(node: &ZmqTransport, quiet: Duration) {
    if let Some(event) = node.recv(quiet).expect("transport is open") {
        panic!("node {} got unexpected {event:?}", node.local_id());
    }
}

/// Waits until `check` holds, polling; panics after [`WAIT`] with `what`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn frame(from: NodeId, bytes: &[u8]) -> TransportEvent {
    TransportEvent::Frame {
        from,
        bytes: bytes.to_vec(),
    }
}

/// The cluster tag exactly as the transport computes it (documented in the frame layout).
pub fn cluster_hash(cluster_id: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(b"coherence-zmq cluster\0")
        .chain_update(cluster_id.as_bytes())
        .finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap())
}

/// A frame laid out as the crate docs describe (format version 2), with whatever fields a
/// test wants to fake.
pub fn raw_frame(
    kind: u8,
    flags: u8,
    cluster: u64,
    sender: u32,
    seq: u64,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = b"COH1".to_vec();
    out.extend_from_slice(&[2, kind, flags, 0]);
    out.extend_from_slice(&cluster.to_le_bytes());
    out.extend_from_slice(&sender.to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A joiner's request for `nonce`, naming an address that refuses connections (port 9,
/// discard).
pub fn join_request(cluster_id: &str, secret: bool, nonce: u64) -> Vec<u8> {
    let addr = b"tcp://127.0.0.1:9";
    let mut payload = nonce.to_le_bytes().to_vec();
    payload.extend_from_slice(&(addr.len() as u16).to_le_bytes());
    payload.extend_from_slice(addr);
    raw_frame(
        2,
        u8::from(secret),
        cluster_hash(cluster_id),
        u32::MAX,
        0,
        &payload,
    )
}

/// A ZMTP 3.0 DEALER written by hand on a plain TCP socket, which a test can make say anything,
/// with the Noise session of the crate docs when it knows the secret.
pub struct RawDealer {
    pub tcp: std::net::TcpStream,
    session: Option<snow::TransportState>,
}

impl RawDealer {
    /// Connects and exchanges greetings only.
    pub fn greet(addr: &str) -> RawDealer {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(addr.trim_start_matches("tcp://")).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let mut greeting = [0u8; 64];
        greeting[0] = 0xff;
        greeting[9] = 0x7f;
        greeting[10] = 3;
        greeting[12..16].copy_from_slice(b"NULL");
        tcp.write_all(&greeting).unwrap();
        let mut theirs = [0u8; 64];
        tcp.read_exact(&mut theirs).unwrap();
        RawDealer { tcp, session: None }
    }

    /// Connects, exchanges greetings and READY: a ZMTP peer in good standing.
    pub fn connect(addr: &str) -> RawDealer {
        use std::io::Write;
        let mut dealer = RawDealer::greet(addr);
        let mut ready = vec![5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&6u32.to_be_bytes());
        ready.extend_from_slice(b"DEALER");
        dealer.tcp.write_all(&[0x04, ready.len() as u8]).unwrap();
        dealer.tcp.write_all(&ready).unwrap();
        let (flags, _) = dealer.read_frame();
        assert_eq!(flags, 0x04, "the node's READY is a command");
        dealer
    }

    /// Reads one ZMTP frame: its flags and body.
    pub fn read_frame(&mut self) -> (u8, Vec<u8>) {
        use std::io::Read;
        let mut head = [0u8; 2];
        self.tcp.read_exact(&mut head).unwrap();
        let len = if head[0] & 0x02 != 0 {
            let mut rest = [0u8; 7];
            self.tcp.read_exact(&mut rest).unwrap();
            let mut long = [head[1], 0, 0, 0, 0, 0, 0, 0];
            long[1..].copy_from_slice(&rest);
            u64::from_be_bytes(long) as usize
        } else {
            usize::from(head[1])
        };
        let mut body = vec![0; len];
        self.tcp.read_exact(&mut body).unwrap();
        (head[0], body)
    }

    /// Writes one single-part message as it is (no session).
    pub fn send_raw(&mut self, body: &[u8]) {
        use std::io::Write;
        self.tcp.write_all(&[0x02]).unwrap();
        self.tcp
            .write_all(&(body.len() as u64).to_be_bytes())
            .unwrap();
        self.tcp.write_all(body).unwrap();
    }

    /// The Noise handshake of the crate docs: NNpsk0 with the PSK from HKDF-SHA256 of the
    /// secret, info "coherence-zmq noise psk\0" and the cluster id; the messages travel in
    /// handshake frames.
    pub fn handshake(&mut self, cluster_id: &str, secret: &[u8]) {
        let mut info = b"coherence-zmq noise psk\0".to_vec();
        info.extend_from_slice(cluster_id.as_bytes());
        let mut psk = [0u8; 32];
        hkdf::Hkdf::<sha2::Sha256>::new(None, secret)
            .expand(&info, &mut psk)
            .unwrap();
        let mut state = snow::Builder::new("Noise_NNpsk0_25519_AESGCM_BLAKE2s".parse().unwrap())
            .psk(0, &psk)
            .unwrap()
            .prologue(b"coherence-zmq session, frame version 2")
            .unwrap()
            .build_initiator()
            .unwrap();
        let mut first = [0u8; 48];
        state.write_message(&[], &mut first).unwrap();
        let cluster = cluster_hash(cluster_id);
        self.send_raw(&raw_frame(8, 1, cluster, u32::MAX, 0, &first));
        let (flags, answer) = self.read_frame();
        assert_eq!(flags, 0, "the answer is a single-part message");
        assert_eq!(
            &answer[..6],
            &[b'C', b'O', b'H', b'1', 2, 8],
            "a handshake frame"
        );
        let mut payload = [0u8; 48];
        state.read_message(&answer[40..], &mut payload).unwrap();
        self.session = Some(state.into_transport_mode().unwrap());
    }

    /// Sends `frame` as one message, sealed in the session if there is one.
    pub fn send(&mut self, frame: &[u8]) {
        let message = match &mut self.session {
            Some(session) => {
                let mut sealed = Vec::new();
                for piece in frame.chunks(65535 - 16) {
                    let mut out = vec![0; piece.len() + 16];
                    session.write_message(piece, &mut out).unwrap();
                    sealed.extend_from_slice(&out);
                }
                sealed
            }
            None => frame.to_vec(),
        };
        self.send_raw(&message);
    }
}

/// Both directions of one connection through a [`Proxy`].
#[derive(Debug, Default)]
pub struct Recording {
    /// What the connecting side sent.
    pub sent: Vec<u8>,
    /// What the listening side answered.
    pub answered: Vec<u8>,
}

/// A TCP proxy on 127.0.0.1 that forwards connections to `target`, records every byte both
/// ways, and can cut every live connection.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    live: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    recordings: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::Mutex<Recording>>>>>,
}

impl Proxy {
    /// Starts forwarding to `target`, which may start listening later.
    pub fn start(target: std::net::SocketAddr) -> Proxy {
        use std::net::{TcpListener, TcpStream};
        use std::sync::{Arc, Mutex};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let recordings: Arc<Mutex<Vec<Arc<Mutex<Recording>>>>> = Arc::default();
        let (registry, recorded) = (Arc::clone(&live), Arc::clone(&recordings));
        // Detached: it dies with the test process; every copy thread ends at its cut.
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let recording: Arc<Mutex<Recording>> = Arc::default();
                recorded.lock().unwrap().push(Arc::clone(&recording));
                let mut live = registry.lock().unwrap();
                live.push(client.try_clone().unwrap());
                live.push(server.try_clone().unwrap());
                let upstream = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let rec = Arc::clone(&recording);
                std::thread::spawn(move || pump(upstream.0, upstream.1, &rec, true));
                std::thread::spawn(move || pump(server, client, &recording, false));
            }
        });
        Proxy {
            addr,
            live,
            recordings,
        }
    }

    /// The proxy's address as a ZeroMQ endpoint.
    pub fn endpoint(&self) -> String {
        format!("tcp://{}", self.addr)
    }

    /// Shuts every live connection down; how many there were.
    pub fn cut(&self) -> usize {
        let mut live = self.live.lock().unwrap();
        for stream in live.iter() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
        let cut = live.len() / 2;
        live.clear();
        cut
    }

    /// A copy of every connection's bytes so far, in the order they were accepted.
    pub fn recordings(&self) -> Vec<Recording> {
        self.recordings
            .lock()
            .unwrap()
            .iter()
            .map(|recording| {
                let recording = recording.lock().unwrap();
                Recording {
                    sent: recording.sent.clone(),
                    answered: recording.answered.clone(),
                }
            })
            .collect()
    }
}

fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    recording: &std::sync::Mutex<Recording>,
    sent: bool,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 {
            break;
        }
        {
            let mut recording = recording.lock().unwrap();
            let log = if sent {
                &mut recording.sent
            } else {
                &mut recording.answered
            };
            log.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

/// A free port on 127.0.0.1 (free when this returns: a test binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
