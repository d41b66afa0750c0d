//! Admission is the core's: the transport reports join requests and assigns nothing, a joiner
//! learns its id from the first hello addressed to its incarnation, `connect_members` names
//! the members, and frames of a sender not named yet are delivered in order.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use coherence_core::{Contact, NodeId, Transport, TransportError, TransportEvent};
use common::{
    cluster, cluster_hash, config, contacts, drain_join_requests, eventually, expect_quiet, frame,
    next, raw_frame, RawDealer,
};
use transport_zmq::{ZmqConfig, ZmqTransport};

const HELLO: u8 = 1;
const DATA: u8 = 5;

/// Starts a joiner through `contact` on a thread.
fn start_joiner(base: &ZmqConfig, contact: &ZmqTransport) -> std::thread::JoinHandle<ZmqTransport> {
    let cfg = ZmqConfig {
        join: Some(contact.local_addr()),
        ..base.clone()
    };
    std::thread::spawn(move || ZmqTransport::start(cfg).expect("the joiner starts"))
}

fn join_request(node: &ZmqTransport) -> Contact {
    match next(node) {
        TransportEvent::JoinRequest(contact) => contact,
        other => panic!("expected a join request, got {other:?}"),
    }
}

/// The payload of a hello: to `target` of `target_incarnation`, from `incarnation`.
fn hello(target: NodeId, target_incarnation: u64, incarnation: u64) -> Vec<u8> {
    let mut payload = target.to_le_bytes().to_vec();
    payload.extend_from_slice(&target_incarnation.to_le_bytes());
    payload.extend_from_slice(&incarnation.to_le_bytes());
    payload
}

#[test]
fn a_join_request_is_reported_with_the_joiners_contact_and_assigns_nothing() {
    let base = config("request");
    let nodes = cluster(2, &base);
    let starting = start_joiner(&base, &nodes[1]);
    let request = join_request(&nodes[1]);
    // The joiner repeats its request; each one is reported, nothing else happens.
    let mut repeats = 0;
    let deadline = std::time::Instant::now() + Duration::from_millis(1200);
    while std::time::Instant::now() < deadline {
        match nodes[1].recv(Duration::from_millis(50)).unwrap() {
            Some(TransportEvent::JoinRequest(again)) => {
                assert_eq!(again, request);
                repeats += 1;
            }
            Some(other) => panic!("unexpected {other:?}"),
            None => {}
        }
    }
    assert!(repeats >= 1, "the request was not repeated");
    expect_quiet(&nodes[0], Duration::from_millis(10));
    assert_eq!(nodes[0].members(), vec![1]);
    assert_eq!(nodes[1].members(), vec![0]);
    assert!(!starting.is_finished(), "the joiner started without a view");

    let mut view = contacts(&nodes);
    view.insert(2, request.clone());
    for node in &nodes {
        node.connect_members(&view);
    }
    let joiner = starting.join().unwrap();
    assert_eq!(joiner.local_id(), 2);
    assert_eq!(joiner.contact(), Some(request.clone()));
    assert_eq!(request.addr, joiner.local_addr());
    joiner.connect_members(&view);
    drain_join_requests(&nodes[1]);
    assert_eq!(joiner.members(), vec![0, 1]);
    for node in &nodes {
        node.send(2, vec![node.local_id() as u8]).unwrap();
        joiner.send(node.local_id(), b"hi".to_vec()).unwrap();
        assert_eq!(next(node), frame(2, b"hi"));
    }
    let mut got = vec![next(&joiner), next(&joiner)];
    got.sort_by_key(|e| format!("{e:?}"));
    assert_eq!(got, vec![frame(0, &[0]), frame(1, &[1])]);
}

#[test]
fn the_joiner_learns_its_id_from_the_first_hello() {
    let base = config("any-id");
    let founder = ZmqTransport::start(base.clone()).unwrap();
    assert_eq!(founder.local_id(), 0);
    assert_eq!(
        founder.contact().map(|c| c.addr),
        Some(founder.local_addr())
    );
    assert!(!founder.joins_running_cluster());
    let starting = start_joiner(&base, &founder);
    let request = join_request(&founder);
    // Whatever id the view gives: the transport takes it from the hello.
    let view = BTreeMap::from([(0, founder.contact().unwrap()), (7, request)]);
    founder.connect_members(&view);
    let joiner = starting.join().unwrap();
    assert_eq!(joiner.local_id(), 7);
    assert_eq!(joiner.peers(), Vec::<NodeId>::new());
    assert!(joiner.joins_running_cluster());
    joiner.connect_members(&view);
    drain_join_requests(&founder);
    founder.send(7, b"to 7".to_vec()).unwrap();
    joiner.send(0, b"to 0".to_vec()).unwrap();
    assert_eq!(next(&joiner), frame(0, b"to 7"));
    assert_eq!(next(&founder), frame(7, b"to 0"));
}

#[test]
fn frames_from_a_sender_not_named_yet_are_delivered_in_order() {
    const N: u32 = 200;
    let base = config("unnamed");
    let nodes = cluster(2, &base);
    let starting = start_joiner(&base, &nodes[0]);
    let request = join_request(&nodes[0]);
    let mut view = contacts(&nodes);
    view.insert(2, request);
    // Only node 0's core installed the view so far.
    nodes[0].connect_members(&view);
    let joiner = starting.join().unwrap();
    joiner.connect_members(&view);
    drain_join_requests(&nodes[0]);
    for seq in 0..N {
        joiner.send(1, seq.to_le_bytes().to_vec()).unwrap();
    }
    for seq in 0..N {
        assert_eq!(next(&nodes[1]), frame(2, &seq.to_le_bytes()), "frame {seq}");
    }
    assert_eq!(
        nodes[1].send(2, vec![]),
        Err(TransportError::UnknownPeer(2))
    );
    // Named now: what was delivered stays delivered, and the stream goes on.
    nodes[1].connect_members(&view);
    for seq in N..2 * N {
        joiner.send(1, seq.to_le_bytes().to_vec()).unwrap();
    }
    for seq in N..2 * N {
        assert_eq!(next(&nodes[1]), frame(2, &seq.to_le_bytes()), "frame {seq}");
    }
    nodes[1].send(2, b"named".to_vec()).unwrap();
    assert_eq!(next(&joiner), frame(1, b"named"));
    // Acknowledged from now on: nothing is delivered twice, even after the retransmit delay.
    expect_quiet(&nodes[1], base.lost_after);
    assert_eq!(nodes[1].stats().frames_received, u64::from(2 * N));
}

#[test]
fn a_member_no_longer_named_stays_until_its_goodbye() {
    let base = config("unnamed-member");
    let nodes = cluster(3, &base);
    let mut view = contacts(&nodes);
    view.remove(&2);
    nodes[0].connect_members(&view);
    // The view removed it (it leaves, say): it must still hear that decision, and answer.
    nodes[0].send(2, b"you are out".to_vec()).unwrap();
    assert_eq!(next(&nodes[2]), frame(0, b"you are out"));
    nodes[2].send(0, b"bye then".to_vec()).unwrap();
    assert_eq!(next(&nodes[0]), frame(2, b"bye then"));
    assert_eq!(nodes[0].members(), vec![1, 2]);
    // Its goodbye makes it `Left` after its last frame, and gone for good.
    nodes[2].close();
    assert_eq!(next(&nodes[0]), TransportEvent::Left(2));
    assert_eq!(
        nodes[0].send(2, vec![]),
        Err(TransportError::UnknownPeer(2))
    );
    nodes[0].connect_members(&view);
    assert_eq!(nodes[0].members(), vec![1]);
    nodes[0].send(1, b"still here".to_vec()).unwrap();
    assert_eq!(next(&nodes[1]), TransportEvent::Left(2));
    assert_eq!(next(&nodes[1]), frame(0, b"still here"));
}

#[test]
fn hellos_for_another_id_or_process_are_refused() {
    let base = config("foreign-hello");
    let nodes = cluster(2, &base);
    let target = &nodes[1];
    let incarnation = target.contact().unwrap().incarnation;
    let ours = cluster_hash("foreign-hello");
    let before = target.stats().rejected_foreign;
    // Our incarnation, another id; then our id, another incarnation. Each on a connection of
    // its own, followed by a data frame that must not be delivered.
    for payload in [
        hello(5, incarnation, 77),
        hello(1, incarnation.wrapping_add(1), 77),
    ] {
        let mut dealer = RawDealer::connect(&target.local_addr());
        dealer.send(&raw_frame(HELLO, 0, ours, 9, 0, &payload));
        dealer.send(&raw_frame(DATA, 0, ours, 9, 1, b"forged"));
    }
    eventually("both hellos refused", || {
        target.stats().rejected_foreign >= before + 2
    });
    // A hello for us from a sender nobody named: its frames are delivered, in order.
    let mut dealer = RawDealer::connect(&target.local_addr());
    dealer.send(&raw_frame(HELLO, 0, ours, 9, 0, &hello(1, incarnation, 77)));
    dealer.send(&raw_frame(DATA, 0, ours, 9, 2, b"gap"));
    dealer.send(&raw_frame(DATA, 0, ours, 9, 1, b"one"));
    dealer.send(&raw_frame(DATA, 0, ours, 9, 1, b"one again"));
    dealer.send(&raw_frame(DATA, 0, ours, 9, 2, b"two"));
    assert_eq!(next(target), frame(9, b"one"));
    assert_eq!(next(target), frame(9, b"two"));
    expect_quiet(target, Duration::from_millis(100));
    assert_eq!(target.stats().rejected_foreign, before + 2);
}

#[test]
fn senders_not_named_yet_are_bounded() {
    let nodes = cluster(2, &config("bounded"));
    let target = &nodes[1];
    let incarnation = target.contact().unwrap().incarnation;
    let ours = cluster_hash("bounded");
    let mut dealer = RawDealer::connect(&target.local_addr());
    // 64 senders are tracked; the 65th's frames are dropped and counted.
    for sender in 100..=164u32 {
        dealer.send(&raw_frame(
            HELLO,
            0,
            ours,
            sender,
            0,
            &hello(1, incarnation, 42),
        ));
    }
    dealer.send(&raw_frame(DATA, 0, ours, 164, 1, b"untracked"));
    dealer.send(&raw_frame(
        HELLO,
        0,
        ours,
        100,
        0,
        &hello(1, incarnation, 42),
    ));
    dealer.send(&raw_frame(DATA, 0, ours, 100, 1, b"tracked"));
    assert_eq!(next(target), frame(100, b"tracked"));
    assert_eq!(target.stats().dropped_unnamed, 1);
    expect_quiet(target, Duration::from_millis(50));
}
