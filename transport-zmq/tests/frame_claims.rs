//! A ZMTP frame header that claims a huge body (1 TiB, 16 GiB, 1 GiB), sent by a stranger
//! right after the greeting, after the ZMTP handshake, and after a join request (which
//! authenticates a connection), to a node with and without a secret: the node closes the
//! connection before reserving anything, counts it, keeps its memory and keeps serving its
//! members.
//!
//! One test in this file, so that the process's memory is this test's alone.

mod common;

use std::io::{Read, Write};

use coherence_core::{Transport, TransportEvent};
use common::{cluster, config, join_request, RawDealer, WAIT};
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
    /// After a join request the node accepts (with a secret, in a Noise session): an
    /// authenticated connection.
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

/// Speaks ZMTP 3.0 as a DEALER up to `phase`, sends a frame header claiming `claim` bytes and
/// a few bytes of body, and returns once the node closed the connection.
fn lie(addr: &str, phase: Phase, claim: u64, cluster_id: &str, secret: Option<&[u8]>) {
    let mut dealer = match phase {
        Phase::Greeting => RawDealer::greet(addr),
        Phase::Ready | Phase::Joined => RawDealer::connect(addr),
    };
    if matches!(phase, Phase::Joined) {
        if let Some(secret) = secret {
            dealer.handshake(cluster_id, secret);
        }
        dealer.send(&join_request(cluster_id, secret.is_some(), rand::random()));
    }
    let tcp = &mut dealer.tcp;
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

/// Frames between the two members, in both directions; the attacker's join requests, reported
/// as `JoinRequest`, may come in between.
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
                TransportEvent::JoinRequest(_) => {}
                other => panic!("unexpected {other:?}"),
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
