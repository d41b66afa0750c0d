//! A ZMTP frame header that claims a huge body (1 TiB, 16 GiB, 1 GiB), sent by a stranger
//! right after the greeting, after the ZMTP handshake, and after a join request (which
//! authenticates a connection), to a node with and without a secret: the node closes the
//! connection before reserving anything, counts it, keeps its memory and keeps serving its
//! members.
//!
//! One test in this file, so that the process's memory is this test's alone.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;

use coherence_core::{Transport, TransportEvent};
use common::{cluster, config, WAIT};
use hmac::{KeyInit, Mac};
use sha2::{Digest, Sha256};
use transport_zmq::{ZmqConfig, ZmqStats, ZmqTransport};

const SECRET: &[u8] = b"a secret the attacker happens to have for the join";
const CLAIMS: [u64; 3] = [1 << 40, 16 << 30, 1 << 30];

/// Where the stranger stops before the lying frame header.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Right after exchanging greetings.
    Greeting,
    /// After READY both ways: a ZMTP peer in good standing.
    Ready,
    /// After a join request the node accepts: an authenticated connection.
    Joined,
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn cluster_hash(cluster_id: &str) -> u64 {
    let digest = Sha256::new()
        .chain_update(b"coherence-zmq cluster\0")
        .chain_update(cluster_id.as_bytes())
        .finalize();
    u64::from_le_bytes(digest[..8].try_into().unwrap())
}

/// A join request laid out as the crate docs describe, with a MAC when there is a secret.
fn join_request(cluster_id: &str, secret: Option<&[u8]>, nonce: u64) -> Vec<u8> {
    // Port 9 (discard) refuses connections: the admitted member is soon reported lost.
    let addr = b"tcp://127.0.0.1:9";
    let mut payload = nonce.to_le_bytes().to_vec();
    payload.extend_from_slice(&(addr.len() as u16).to_le_bytes());
    payload.extend_from_slice(addr);
    let mut frame = b"COH1".to_vec();
    frame.extend_from_slice(&[1, 2, u8::from(secret.is_some()), 0]);
    frame.extend_from_slice(&cluster_hash(cluster_id).to_le_bytes());
    frame.extend_from_slice(&u32::MAX.to_le_bytes());
    frame.extend_from_slice(&[0; 16]);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    if let Some(secret) = secret {
        let mac = hmac::Hmac::<Sha256>::new_from_slice(secret)
            .unwrap()
            .chain_update(&frame)
            .finalize()
            .into_bytes();
        frame.extend_from_slice(&mac);
    }
    frame
}

/// Speaks ZMTP 3.0 as a DEALER up to `phase`, sends a frame header claiming `claim` bytes and
/// a few bytes of body, and returns once the node closed the connection.
fn lie(addr: &str, phase: Phase, claim: u64, cluster_id: &str, secret: Option<&[u8]>) {
    let mut tcp = TcpStream::connect(addr.trim_start_matches("tcp://")).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut greeting = [0u8; 64];
    greeting[0] = 0xff;
    greeting[9] = 0x7f;
    greeting[10] = 3;
    greeting[12..16].copy_from_slice(b"NULL");
    tcp.write_all(&greeting).unwrap();
    let mut theirs = [0u8; 64];
    tcp.read_exact(&mut theirs).unwrap();
    if !matches!(phase, Phase::Greeting) {
        let mut ready = vec![5];
        ready.extend_from_slice(b"READY");
        ready.push(11);
        ready.extend_from_slice(b"Socket-Type");
        ready.extend_from_slice(&6u32.to_be_bytes());
        ready.extend_from_slice(b"DEALER");
        tcp.write_all(&[0x04, ready.len() as u8]).unwrap();
        tcp.write_all(&ready).unwrap();
        let mut head = [0u8; 2];
        tcp.read_exact(&mut head).unwrap();
        assert_eq!(head[0], 0x04, "the node's READY is a short command");
        let mut body = vec![0; usize::from(head[1])];
        tcp.read_exact(&mut body).unwrap();
    }
    if matches!(phase, Phase::Joined) {
        let join = join_request(cluster_id, secret, rand::random());
        tcp.write_all(&[0x02]).unwrap();
        tcp.write_all(&(join.len() as u64).to_be_bytes()).unwrap();
        tcp.write_all(&join).unwrap();
    }
    tcp.write_all(&[0x02]).unwrap();
    tcp.write_all(&claim.to_be_bytes()).unwrap();
    let _ = tcp.write_all(b"COH1 and then some");
    // What the node still sends is at most its READY (after the greeting alone).
    let mut rest = Vec::new();
    match tcp.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{phase:?}, claim {claim}: the node did not close: {e}"),
    }
    assert!(
        rest.len() <= 64,
        "{phase:?}: the node sent {} bytes",
        rest.len()
    );
}

/// Frames between the two members, in both directions; `Joined` and `Left` of the members the
/// attacker's join requests admitted may come in between.
fn members_still_talk(a: &ZmqTransport, b: &ZmqTransport, round: u8) {
    for (from, to) in [(a, b), (b, a)] {
        let payload = vec![round; 1000];
        from.send(to.local_id(), payload.clone()).unwrap();
        loop {
            match to.recv(WAIT).unwrap().expect("a frame within WAIT") {
                TransportEvent::Frame {
                    from: sender,
                    bytes,
                } => {
                    assert_eq!((sender, bytes), (from.local_id(), payload));
                    break;
                }
                TransportEvent::Joined(_) | TransportEvent::Left(_) => {}
            }
        }
    }
}

#[test]
fn huge_frame_claims_close_the_connection_without_reserving_memory() {
    for secret in [None, Some(SECRET)] {
        let cluster_id = if secret.is_some() {
            "claims-s"
        } else {
            "claims"
        };
        let base = ZmqConfig {
            secret: secret.map(<[u8]>::to_vec),
            ..config(cluster_id)
        };
        let nodes = cluster(2, &base);
        let (a, b) = (&nodes[0], &nodes[1]);
        members_still_talk(a, b, 1);
        let before = a.stats();
        let (rss, peak) = (status_kib("VmRSS:"), status_kib("VmPeak:"));
        for phase in [Phase::Greeting, Phase::Ready, Phase::Joined] {
            for claim in CLAIMS {
                lie(&a.local_addr(), phase, claim, cluster_id, secret);
            }
        }
        members_still_talk(a, b, 2);
        let (rss_after, peak_after) = (status_kib("VmRSS:"), status_kib("VmPeak:"));
        eprintln!(
            "secret: {}; VmRSS {rss} -> {rss_after} KiB, VmPeak {peak} -> {peak_after} KiB",
            secret.is_some()
        );
        assert!(
            rss_after < rss + 8 * 1024,
            "resident memory grew from {rss} to {rss_after} KiB"
        );
        // The smallest claim is 1 GiB: had any been reserved, the peak would show it.
        assert!(
            peak_after < peak + 512 * 1024,
            "virtual memory peaked at {peak_after} KiB, from {peak}"
        );
        let after = a.stats();
        assert_eq!(
            after,
            ZmqStats {
                rejected_oversize: before.rejected_oversize + 9,
                frames_sent: after.frames_sent,
                frames_received: after.frames_received,
                ..before
            },
            "every lie counted as oversize, and the join requests authenticated"
        );
    }
}
