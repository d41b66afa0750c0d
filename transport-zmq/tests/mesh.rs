//! Ordering, membership and departure over real ZeroMQ sockets on 127.0.0.1.

mod common;

use std::time::{Duration, Instant};

use coherence_core::{NodeId, Transport, TransportError, TransportEvent};
use common::{admit, cluster, config, expect_quiet, frame, next};
use transport_zmq::{ZmqConfig, ZmqTransport};

/// Receives `count` frames per sender in `from` and checks each sender's sequence numbers.
fn receive_in_order(node: &ZmqTransport, from: &[NodeId], count: u32) {
    let mut next_seq = vec![0u32; from.len()];
    for _ in 0..count as usize * from.len() {
        match next(node) {
            TransportEvent::Frame {
                from: sender,
                bytes,
            } => {
                let slot = from
                    .iter()
                    .position(|&f| f == sender)
                    .expect("known sender");
                let seq = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes"));
                assert_eq!(
                    seq,
                    next_seq[slot],
                    "node {} from {sender}",
                    node.local_id()
                );
                assert_eq!(bytes.len(), 4 + (seq as usize % 64), "payload intact");
                next_seq[slot] += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn numbered(seq: u32) -> Vec<u8> {
    let mut bytes = seq.to_le_bytes().to_vec();
    bytes.resize(4 + seq as usize % 64, seq as u8);
    bytes
}

#[test]
fn two_nodes_exchange_frames_in_order() {
    let nodes = cluster(2, &config("two"));
    assert_eq!(nodes[0].members(), vec![1]);
    assert_eq!(nodes[1].members(), vec![0]);
    const N: u32 = 2000;
    for seq in 0..N {
        nodes[0].send(1, numbered(seq)).unwrap();
        nodes[1].send(0, numbered(seq)).unwrap();
    }
    receive_in_order(&nodes[0], &[1], N);
    receive_in_order(&nodes[1], &[0], N);
    assert_eq!(nodes[0].stats().frames_sent, u64::from(N));
    assert_eq!(nodes[1].stats().frames_received, u64::from(N));
    assert_eq!(
        nodes[0].send(7, vec![]),
        Err(TransportError::UnknownPeer(7))
    );
    assert_eq!(
        nodes[0].send(0, vec![]),
        Err(TransportError::UnknownPeer(0))
    );
    expect_quiet(&nodes[0], Duration::from_millis(100));
}

#[test]
fn three_nodes_keep_fifo_per_pair() {
    let nodes = cluster(3, &config("three"));
    assert_eq!(nodes[2].members(), vec![0, 1]);
    const N: u32 = 1000;
    std::thread::scope(|s| {
        for node in &nodes {
            s.spawn(move || {
                for seq in 0..N {
                    for to in 0..3 {
                        if to != node.local_id() {
                            node.send(to, numbered(seq)).unwrap();
                        }
                    }
                }
            });
        }
    });
    for node in &nodes {
        let others: Vec<NodeId> = (0..3).filter(|&p| p != node.local_id()).collect();
        receive_in_order(node, &others, N);
    }
}

#[test]
fn join_through_any_member() {
    let base = config("indirect");
    let mut nodes = cluster(2, &base);
    // Through node 1, then through the newest member: each reports the request.
    for via in [1, 2] {
        let joiner = admit(&nodes, via, base.clone());
        nodes.push(joiner);
    }
    let ids: Vec<NodeId> = nodes.iter().map(Transport::local_id).collect();
    assert_eq!(ids, vec![0, 1, 2, 3]);
    for node in &nodes {
        for to in 0..4 {
            if to != node.local_id() {
                node.send(to, vec![node.local_id() as u8]).unwrap();
            }
        }
    }
    for node in &nodes {
        let mut got: Vec<TransportEvent> = (0..3).map(|_| next(node)).collect();
        got.sort_by_key(|e| format!("{e:?}"));
        let expected: Vec<TransportEvent> = (0..4u32)
            .filter(|&from| from != node.local_id())
            .map(|from| frame(from, &[from as u8]))
            .collect();
        assert_eq!(got, expected, "node {}", node.local_id());
    }
}

#[test]
fn close_reports_left_after_the_last_frame() {
    let nodes = cluster(3, &config("close"));
    for seq in 0..500 {
        nodes[2].send(0, numbered(seq)).unwrap();
    }
    nodes[2].send(1, b"last".to_vec()).unwrap();
    let started = Instant::now();
    nodes[2].close();
    let took = started.elapsed();
    // Returns once the peers acknowledged the goodbye, before the deadline (`lost_after`).
    assert!(took < config("close").lost_after, "close took {took:?}");
    assert_eq!(nodes[2].send(0, vec![]), Err(TransportError::Closed));
    assert_eq!(nodes[2].recv(Duration::ZERO), Err(TransportError::Closed));
    receive_in_order(&nodes[0], &[2], 500);
    assert_eq!(next(&nodes[0]), TransportEvent::Left(2));
    assert_eq!(next(&nodes[1]), frame(2, b"last"));
    assert_eq!(next(&nodes[1]), TransportEvent::Left(2));
    assert_eq!(
        nodes[0].send(2, vec![]),
        Err(TransportError::UnknownPeer(2))
    );
    // The others carry on.
    nodes[0].send(1, b"still here".to_vec()).unwrap();
    assert_eq!(next(&nodes[1]), frame(0, b"still here"));
    eprintln!("close took {took:?}");
}

#[test]
fn a_killed_node_is_reported_lost_within_lost_after() {
    let base = config("kill");
    let nodes = cluster(3, &base);
    nodes[1].send(0, b"before".to_vec()).unwrap();
    assert_eq!(next(&nodes[0]), frame(1, b"before"));
    let killed = Instant::now();
    nodes[1].abort();
    for node in [&nodes[0], &nodes[2]] {
        assert_eq!(next(node), TransportEvent::Left(1));
        let after = killed.elapsed();
        assert!(
            after >= base.lost_after - base.heartbeat && after < base.lost_after * 2,
            "lost after {after:?}"
        );
        assert_eq!(node.send(1, vec![]), Err(TransportError::UnknownPeer(1)));
    }
    eprintln!("loss detected after {:?}", killed.elapsed());
    nodes[2].send(0, b"after".to_vec()).unwrap();
    assert_eq!(next(&nodes[0]), frame(2, b"after"));
    // A view without the lost node takes a newcomer in under a fresh id.
    let survivors: Vec<ZmqTransport> = nodes
        .into_iter()
        .filter(|node| node.local_id() != 1)
        .collect();
    let newcomer = admit(&survivors, 1, base);
    assert_eq!((newcomer.local_id(), newcomer.members()), (3, vec![0, 2]));
}

#[test]
fn a_restarted_peer_on_the_same_port_is_a_new_member() {
    let base = config("restart");
    let nodes = cluster(2, &base);
    let port_addr = nodes[1].local_addr();
    nodes[1].abort();
    // Same address, new process: the old DEALER reconnects to it, and is refused. The view
    // that takes it in still names the dead node, which is not reported lost yet.
    let restarted = admit(
        &nodes,
        0,
        ZmqConfig {
            listen: port_addr.clone(),
            ..base
        },
    );
    assert_eq!(restarted.local_addr(), port_addr);
    assert_eq!(restarted.local_id(), 2);
    assert_eq!(next(&nodes[0]), TransportEvent::Left(1));
    nodes[0].send(2, b"welcome back".to_vec()).unwrap();
    // The restarted node was told of the dead one too; it may report it lost first.
    let mut event = next(&restarted);
    if event == TransportEvent::Left(1) {
        event = next(&restarted);
    }
    assert_eq!(event, frame(0, b"welcome back"));
}

#[test]
fn joining_a_silent_address_times_out() {
    // A port that nobody serves: bind one, learn the port, release it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let result = ZmqTransport::start(ZmqConfig {
        join: Some(format!("tcp://127.0.0.1:{port}")),
        join_timeout: Duration::from_millis(700),
        ..config("nobody")
    });
    assert!(
        matches!(result, Err(transport_zmq::ZmqError::JoinTimeout { .. })),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// A caller in async code runs inside another tokio runtime, where `block_on` would panic:
/// start, send, receive (with and without waiting) and close must work there too.
#[test]
fn works_when_called_from_inside_another_tokio_runtime() {
    let outer = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    outer.block_on(async {
        let nodes = cluster(2, &config("inside-a-runtime"));
        nodes[0].send(1, b"from async code".to_vec()).unwrap();
        assert_eq!(next(&nodes[1]), frame(0, b"from async code"));
        nodes[1].send(0, b"and back".to_vec()).unwrap();
        let deadline = Instant::now() + common::WAIT;
        let reply = loop {
            if let Some(event) = nodes[0].recv(Duration::ZERO).expect("transport is open") {
                break event;
            }
            assert!(
                Instant::now() < deadline,
                "no reply within {:?}",
                common::WAIT
            );
        };
        assert_eq!(reply, frame(1, b"and back"));
        nodes[1].close();
        assert_eq!(next(&nodes[0]), TransportEvent::Left(1));
        nodes[0].close();
    });
}
