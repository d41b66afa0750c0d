//! A node process killed with SIGKILL while it holds every token of an object.
//!
//! Nodes 0 and 1 run in this process over ZeroMQ on 127.0.0.1; node 2 is the `zmq_peer`
//! helper, a separate OS process that writes object "a" under the `Invalidate` policy (so it
//! holds all of "a"'s tokens; its write returned once another member held a copy, the default
//! durability over ZeroMQ) and is then killed with SIGKILL: no goodbye, no token handed on.
//! The survivors remove it by a view change once their transports report it lost, recreate
//! "a"'s tokens from the newest copy, and go on: "a" reads the killed node's last write and
//! takes new writes within twice the failure-detection time (`lost_after`), and objects the
//! dead node never held ("b", and "c" created after the kill) work throughout.

use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Node, Transport, WritePolicy};
use tests::peer_process::{zmq_config, Peer, LEASE, LOST_AFTER};
use transport_zmq::ZmqTransport;

const CLUSTER: &str = "sigkill-test";
/// The operation timeout of the surviving nodes.
const TIMEOUT: Duration = Duration::from_secs(2);

fn config() -> Config {
    Config::default()
        .timeout(TIMEOUT)
        .write_policy(WritePolicy::Invalidate)
        .lease(LEASE)
}

/// Rounds of [`exercise`]; each adds 11 to the value.
const ROUNDS: usize = 20;

/// Updates, writes and reads `b` through both survivors in turn, all within `limit`, and
/// checks every value. `b` must hold `start`; it holds `start + 11 * ROUNDS` afterwards.
fn exercise(b: [&DistObj<i64>; 2], start: i64, limit: Duration) -> i64 {
    let began = Instant::now();
    let mut expected = start;
    for round in 0..ROUNDS {
        let (writer, reader) = (b[round % 2], b[(round + 1) % 2]);
        expected = writer
            .update(|v| {
                *v += 1;
                *v
            })
            .expect("update of b");
        assert_eq!(*reader.read().expect("read of b"), expected);
        expected += 10;
        reader.write(expected).expect("write of b");
        assert_eq!(*writer.read().expect("read of b"), expected);
    }
    assert!(
        began.elapsed() < limit,
        "{} operations on b took {:?}",
        ROUNDS * 4,
        began.elapsed()
    );
    expected
}

#[test]
fn survivors_recreate_the_tokens_of_a_killed_holder() {
    let founder = ZmqTransport::start(zmq_config(CLUSTER, None)).expect("founder starts");
    let addr = founder.local_addr();
    // The founder's node takes the joiner in, so it runs first.
    let n0 = Node::start(founder, config()).unwrap();
    let joiner =
        ZmqTransport::start(zmq_config(CLUSTER, Some(addr.clone()))).expect("joiner starts");
    assert_eq!(joiner.local_id(), 1);
    let n1 = Node::start(joiner, config()).unwrap();
    let a0: DistObj<i64> = n0.object("a", 0).unwrap();
    let a1: DistObj<i64> = n1.object("a", 0).unwrap();
    let b0: DistObj<i64> = n0.object("b", 0).unwrap();
    let b1: DistObj<i64> = n1.object("b", 0).unwrap();
    assert_eq!(exercise([&b0, &b1], 0, TIMEOUT), 220);

    // Node 2, in its own process, takes every token of "a".
    let mut peer = Peer::start(env!("CARGO_BIN_EXE_zmq_peer"), &addr, CLUSTER, "a", 7);
    let line = peer.line(Duration::from_secs(30));
    assert_eq!(line.trim_end(), "holding a as node 2 at version 1");
    // Node 0 and 1 gave their tokens up for that write.
    assert_eq!(a0.try_read().unwrap(), None);
    assert_eq!(a1.try_read().unwrap(), None);

    // SIGKILL: the peer vanishes with all of "a"'s tokens.
    peer.kill();
    let killed = Instant::now();

    // "a" waits for the view change, then reads the killed node's write: it returned, so a
    // survivor holds a copy. Meanwhile "b" keeps working (but for the view change itself).
    thread::scope(|s| {
        s.spawn(|| {
            let value = a1.read().expect("read of a on node 1 after the kill");
            let recovered = killed.elapsed();
            eprintln!("a readable again {recovered:?} after the kill (lost_after {LOST_AFTER:?})");
            assert_eq!(*value, 7, "the killed node's returned write was lost");
            assert!(
                recovered < 2 * LOST_AFTER,
                "recovery took {recovered:?}, more than twice lost_after ({LOST_AFTER:?})"
            );
        });
        assert_eq!(exercise([&b0, &b1], 220, TIMEOUT), 440);
    });
    a0.write(8).expect("write of a on node 0 after the kill");
    assert_eq!(*a1.read().unwrap(), 8);
    assert_eq!(
        a1.update(|v| {
            *v += 1;
            *v
        })
        .unwrap(),
        9
    );
    assert_eq!(*a0.read().unwrap(), 9);
    let stats = n0.stats();
    assert!(
        stats.epoch >= 3,
        "no view change removed the killed node: {stats:?}"
    );

    assert_eq!(exercise([&b0, &b1], 440, TIMEOUT), 660);
    let c0: DistObj<String> = n0.object("c", "created after the kill".into()).unwrap();
    let c1: DistObj<String> = n1.object("c", String::new()).unwrap();
    c1.write("written by node 1".into()).unwrap();
    assert_eq!(*c0.read().unwrap(), "written by node 1");

    n1.shutdown().expect("node 1 leaves");
    assert_eq!(*b0.read().unwrap(), 660);
    assert_eq!(*a0.read().unwrap(), 9);
    n0.shutdown().expect("node 0 leaves");
}
