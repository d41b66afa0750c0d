//! Hostile input on 127.0.0.1: garbage, foreign, oversize and unauthenticated frames are
//! dropped and counted while the legitimate traffic goes on. A connection whose first message
//! does not authenticate it is closed, so each hostile message comes on a connection of its
//! own.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use bytes::Bytes;
use coherence_core::{Transport, TransportEvent};
use common::cluster_hash;
use common::{cluster, config, expect_quiet, next, WAIT};
use rand::Rng;
use transport_zmq::{ZmqConfig, ZmqStats, ZmqTransport};
use zeromq::{Socket, SocketSend, ZmqMessage};

const MAX_FRAME: usize = 1 << 20;
const DATA: u8 = 5;
const HELLO: u8 = 1;
const HANDSHAKE: u8 = 8;
const FLAG_SECRET: u8 = 1;

fn raw_frame(kind: u8, flags: u8, cluster: u64, sender: u32, seq: u64, payload: &[u8]) -> Bytes {
    Bytes::from(common::raw_frame(
        kind, flags, cluster, sender, seq, payload,
    ))
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut rng = rand::thread_rng();
    (0..len).map(|_| rng.gen()).collect()
}

/// Sends each of `messages` from a raw DEALER of its own to `addr`, then waits (inside the
/// runtime, so the DEALERs keep flushing) until `done` holds.
fn raw_dealers(addr: &str, messages: Vec<ZmqMessage>, done: impl Fn() -> bool) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut dealers = Vec::new();
        for message in messages {
            let mut dealer = zeromq::DealerSocket::new();
            dealer.connect(addr).await.expect("raw DEALER connects");
            dealer.send(message).await.expect("raw DEALER sends");
            dealers.push(dealer);
        }
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "rejections not counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
}

/// Keeps `a` and `b` exchanging numbered frames while `attack` runs, then checks that every
/// frame arrived in order and nothing else did.
fn legit_traffic_survives(a: &ZmqTransport, b: &ZmqTransport, attack: impl FnOnce() + Send) {
    const N: u32 = 300;
    std::thread::scope(|s| {
        s.spawn(|| {
            for seq in 0..N {
                a.send(1, seq.to_le_bytes().to_vec()).unwrap();
                std::thread::sleep(Duration::from_micros(300));
            }
        });
        s.spawn(attack);
        for seq in 0..N {
            assert_eq!(next(b), common::frame(0, &seq.to_le_bytes()));
        }
    });
    b.send(0, b"done".to_vec()).unwrap();
    assert_eq!(next(a), common::frame(1, b"done"));
    expect_quiet(a, Duration::from_millis(50));
    expect_quiet(b, Duration::from_millis(50));
}

#[test]
fn hostile_frames_are_counted_and_dropped_with_a_secret() {
    let base = ZmqConfig {
        secret: Some(b"correct horse battery staple".to_vec()),
        max_frame: MAX_FRAME,
        ..config("guarded")
    };
    let nodes = cluster(2, &base);
    let target = &nodes[1];
    let addr = target.local_addr();
    let ours = cluster_hash("guarded");
    legit_traffic_survives(&nodes[0], target, || {
        // Raw TCP garbage where the ZMTP greeting belongs: the node closes the connection and
        // counts it (we wait for its greeting first and for the close, so it surely read ours).
        let port = addr.rsplit(':').next().unwrap();
        let mut tcp = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        let mut greeting = [0; 64];
        tcp.read_exact(&mut greeting).unwrap();
        let mut garbage = random_bytes(64 << 10);
        garbage[0] = 0;
        let _ = tcp.write_all(&garbage);
        let closed = tcp.read(&mut greeting);
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "the node kept a connection that sent garbage: {closed:?}"
        );
        drop(tcp);

        let hostile: Vec<ZmqMessage> = vec![
            // Random bytes: too short to be a frame, then without our magic.
            ZmqMessage::from(random_bytes(17)),
            ZmqMessage::from(random_bytes(300)),
            // Looks valid, other cluster id.
            ZmqMessage::from(raw_frame(DATA, 0, ours ^ 1, 0, 1, b"x")),
            // Oversize: a real one (closed by its ZMTP frame header, before it is read), and a
            // short one claiming a huge payload.
            ZmqMessage::from(raw_frame(
                DATA,
                FLAG_SECRET,
                ours,
                0,
                1,
                &vec![0; MAX_FRAME + 1],
            )),
            ZmqMessage::from({
                let mut lie = raw_frame(DATA, FLAG_SECRET, ours, 0, 1, b"").to_vec();
                lie[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
                Bytes::from(lie)
            }),
            // Unauthenticated: a frame of a node without the secret; a frame of a node that
            // claims one, where the Noise handshake belongs; a handshake message made up
            // without the secret; a hello in clear, which cannot make this connection speak
            // for node 0.
            ZmqMessage::from(raw_frame(DATA, 0, ours, 0, 1, b"forged")),
            ZmqMessage::from(raw_frame(DATA, FLAG_SECRET, ours, 0, 1, b"forged")),
            ZmqMessage::from(raw_frame(
                HANDSHAKE,
                FLAG_SECRET,
                ours,
                u32::MAX,
                0,
                &random_bytes(48),
            )),
            ZmqMessage::from(raw_frame(HELLO, FLAG_SECRET, ours, 0, 0, &[0; 20])),
            // Several parts: not how this transport speaks.
            ZmqMessage::try_from(vec![Bytes::from_static(b"a"), Bytes::from_static(b"b")]).unwrap(),
        ];
        raw_dealers(&addr, hostile, || {
            let s = target.stats();
            s.rejected_malformed >= 3
                && s.rejected_foreign >= 2
                && s.rejected_oversize >= 2
                && s.rejected_unauthenticated >= 4
        });
    });
    let stats = target.stats();
    eprintln!("{stats:?}");
    assert_eq!(
        stats,
        ZmqStats {
            frames_sent: 1,
            frames_received: 300,
            rejected_malformed: 3,
            rejected_foreign: 2,
            rejected_oversize: 2,
            rejected_unauthenticated: 4,
            rejected_replayed: 0,
            // Every hostile connection was closed at its first message, none timed out.
            dropped_unauthenticated: 0,
            dropped_unnamed: 0,
            accept_errors: 0,
        }
    );
}

#[test]
fn without_a_secret_frames_must_follow_a_hello_for_this_node() {
    let nodes = cluster(2, &config("open"));
    let target = &nodes[1];
    let addr = target.local_addr();
    let ours = cluster_hash("open");
    legit_traffic_survives(&nodes[0], target, || {
        // Well-formed, but no hello on this connection: whose frame would that be?
        let data_before_hello = raw_frame(DATA, 0, ours, 0, 1, b"forged");
        // A hello that names node 1 but not its incarnation: meant for another process.
        let mut hello = 1u32.to_le_bytes().to_vec();
        hello.extend_from_slice(&[0; 16]);
        let stale_hello = raw_frame(HELLO, 0, ours, 0, 0, &hello);
        // A joiner's request must be unsequenced; this one is not.
        let sequenced_join = raw_frame(2, 0, ours, u32::MAX, 3, b"");
        let messages = [
            data_before_hello,
            stale_hello.clone(),
            stale_hello,
            sequenced_join,
        ]
        .into_iter()
        .map(ZmqMessage::from)
        .collect();
        raw_dealers(&addr, messages, || {
            let s = target.stats();
            s.rejected_malformed >= 2 && s.rejected_foreign >= 2
        });
    });
    let stats = target.stats();
    assert_eq!(
        (stats.rejected_malformed, stats.rejected_foreign),
        (2, 2),
        "{stats:?}"
    );
    assert_eq!(next_is_none(target), None);
}

fn next_is_none(node: &ZmqTransport) -> Option<TransportEvent> {
    node.recv(Duration::from_millis(20)).unwrap()
}

#[test]
fn a_node_with_another_secret_cannot_join() {
    let founder = ZmqTransport::start(ZmqConfig {
        secret: Some(b"one".to_vec()),
        ..config("secretive")
    })
    .unwrap();
    let result = ZmqTransport::start(ZmqConfig {
        join: Some(founder.local_addr()),
        secret: Some(b"two".to_vec()),
        join_timeout: Duration::from_millis(800),
        ..config("secretive")
    });
    assert!(result.is_err(), "joined with the wrong secret");
    assert!(founder.stats().rejected_unauthenticated >= 1);
    let other_cluster = ZmqTransport::start(ZmqConfig {
        join: Some(founder.local_addr()),
        secret: Some(b"one".to_vec()),
        join_timeout: Duration::from_millis(800),
        ..config("elsewhere")
    });
    assert!(other_cluster.is_err(), "joined another cluster");
    assert!(founder.stats().rejected_foreign >= 1);
    assert_eq!(next_is_none(&founder), None);
}
