//! A node process stopped with SIGSTOP while it holds every token of an object, then resumed.
//!
//! Nodes 0 and 1 run in this process over ZeroMQ on 127.0.0.1; node 2 is the `zmq_peer`
//! helper in its own OS process, holding every token of "a" (value 7). It is stopped for
//! longer than the failure detection (`lost_after`): the survivors remove it, recover 7 from
//! the copy its write left, and write 8. When it resumes it still holds "a"'s tokens of the
//! old epoch, and its clock says its lease ran out long ago: asked to read "a", it must not
//! answer 7 (a value a completed write replaced) but fail (`NoMajority`, `CutOff` or
//! `Removed`, or a timeout). Its transport lost the others for good while it was stopped, so
//! within a few seconds it finds itself cut off (`CutOff`) and serves nothing more.

use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Node, WritePolicy};
use tests::peer_process::{signal, zmq_config, Peer, LEASE, LOST_AFTER};
use transport_zmq::ZmqTransport;

const CLUSTER: &str = "sigstop-test";
/// The operation timeout of the surviving nodes: the failure detection and a view change.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long the holder stays stopped.
const STALL: Duration = Duration::from_secs(5);

fn config() -> Config {
    Config::default()
        .timeout(TIMEOUT)
        .write_policy(WritePolicy::Invalidate)
        .lease(LEASE)
}

#[test]
fn a_stalled_holder_serves_no_stale_read_after_it_resumes() {
    let founder = ZmqTransport::start(zmq_config(CLUSTER, None)).expect("founder starts");
    let addr = founder.local_addr();
    // The founder's node takes the joiner in, so it runs first.
    let n0 = Node::start(founder, config()).unwrap();
    let joiner =
        ZmqTransport::start(zmq_config(CLUSTER, Some(addr.clone()))).expect("joiner starts");
    let n1 = Node::start(joiner, config()).unwrap();
    let a0: DistObj<i64> = n0.object("a", 0).unwrap();
    let a1: DistObj<i64> = n1.object("a", 0).unwrap();

    let mut peer = Peer::start(env!("CARGO_BIN_EXE_zmq_peer"), &addr, CLUSTER, "a", 7);
    let line = peer.line(Duration::from_secs(30));
    assert_eq!(line, "holding a as node 2 at version 1");
    assert_eq!(a0.try_read().unwrap(), None);

    // Stopped with every token of "a": the survivors recover its returned write and go on.
    signal(peer.pid(), "STOP").unwrap();
    let stopped = Instant::now();
    assert_eq!(*a1.read().expect("read of a after the stop"), 7);
    eprintln!(
        "a readable again {:?} after the stop (lost_after {LOST_AFTER:?})",
        stopped.elapsed()
    );
    a0.write(8).expect("write of a after the stop");
    assert_eq!(*a1.read().unwrap(), 8);
    if let Some(rest) = STALL.checked_sub(stopped.elapsed()) {
        thread::sleep(rest);
    }

    // Resumed, the holder must not serve the value the survivors replaced.
    signal(peer.pid(), "CONT").unwrap();
    peer.send("read");
    let answer = peer.line(Duration::from_secs(30));
    eprintln!("the resumed holder answered: {answer}");
    assert!(
        answer.starts_with("read a failed: "),
        "the resumed holder served a read it could not know to be current: {answer}"
    );
    // Its transport lost the others for good: it finds itself cut off (or learns that it was
    // removed) and stops, instead of refusing reads for want of a lease forever.
    let resumed = Instant::now();
    loop {
        peer.send("read");
        let answer = peer.line(Duration::from_secs(30));
        if answer.contains("lost a majority of its view") || answer.contains("was removed") {
            eprintln!("{:?} after it resumed: {answer}", resumed.elapsed());
            break;
        }
        assert!(
            answer.starts_with("read a failed: ") && resumed.elapsed() < 4 * LOST_AFTER,
            "the resumed holder did not find itself out within {:?}: {answer}",
            4 * LOST_AFTER
        );
    }

    // The survivors are unaffected.
    let updated = a1.update(|v| {
        *v += 1;
        *v
    });
    assert_eq!(updated.unwrap(), 9);
    assert_eq!(*a0.read().unwrap(), 9);
    drop(peer);
    n1.shutdown().expect("node 1 leaves");
    n0.shutdown().expect("node 0 leaves");
}
