//! What an eavesdropper on the network gets from a member's traffic. A recording TCP proxy on
//! 127.0.0.1 stands in front of the founder (which advertises it), so a joiner's join request
//! and then all its traffic to the founder, a write of a distinctive 32-byte value included,
//! pass through it and are recorded both ways. After the joiner left, every recorded
//! connection is replayed byte for byte to the founder on a fresh connection.
//!
//! With a secret the recording does not contain the value, and the replay admits nobody and
//! changes nothing: each replayed connection is closed at its first sealed message and counted
//! in `ZmqStats::rejected_replayed`. Without a secret the same recording shows the value and
//! the replayed join is reported again, and the founder's core takes in a phantom member,
//! which shows the test records and replays the bytes that matter.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use coherence_core::{Config, Node};
use common::{config, eventually, free_port, Proxy, Recording, WAIT};
use transport_zmq::{ZmqConfig, ZmqStats, ZmqTransport};

/// The written value: 32 bytes that occur nowhere else, ASCII so that the core's encoding of a
/// string carries them as they are.
const VALUE: &str = "distinctive-value-5f0c9e27b1d84a";

/// A founder behind a recording proxy, after a joiner joined through the proxy, wrote
/// [`VALUE`], which the founder read, and left.
struct Scene {
    founder: Arc<ZmqTransport>,
    node: Node,
    recordings: Vec<Recording>,
}

fn scene(cluster_id: &str, secret: Option<&[u8]>) -> Scene {
    assert_eq!(VALUE.len(), 32);
    let base = ZmqConfig {
        secret: secret.map(<[u8]>::to_vec),
        ..config(cluster_id)
    };
    let port = free_port();
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], port)));
    let founder = Arc::new(
        ZmqTransport::start(ZmqConfig {
            listen: format!("tcp://127.0.0.1:{port}"),
            advertise: Some(proxy.endpoint()),
            ..base.clone()
        })
        .unwrap(),
    );
    // The founder's core takes the joiner in: its node runs before the joiner starts.
    let settings = Config::default().timeout(WAIT);
    let node = Node::start(Arc::clone(&founder), settings.clone()).unwrap();
    let joiner = Arc::new(
        ZmqTransport::start(ZmqConfig {
            join: Some(proxy.endpoint()),
            ..base
        })
        .unwrap(),
    );
    let writer = Node::start(Arc::clone(&joiner), settings).unwrap();
    let ours = node.object("x", String::new()).unwrap();
    let theirs = writer.object("x", String::new()).unwrap();
    theirs.write(VALUE.to_owned()).unwrap();
    assert_eq!(*ours.read().unwrap(), VALUE);
    writer.shutdown().unwrap();
    eventually("the joiner's departure", || founder.members().is_empty());
    let recordings = proxy.recordings();
    assert!(
        recordings.len() >= 2,
        "the join and the joiner's link went through the proxy"
    );
    Scene {
        founder,
        node,
        recordings,
    }
}

/// Whether any recorded byte stream contains [`VALUE`].
fn shows_value(recordings: &[Recording]) -> bool {
    recordings.iter().any(|recording| {
        [&recording.sent, &recording.answered]
            .iter()
            .any(|bytes| bytes.windows(VALUE.len()).any(|w| w == VALUE.as_bytes()))
    })
}

/// Sends what the connecting side once sent on a fresh connection to `addr`, and reads what
/// the node answers until it closes the connection or the sent bytes run out and it waits.
fn replay(addr: &str, sent: &[u8]) {
    let mut tcp = TcpStream::connect(addr.trim_start_matches("tcp://")).unwrap();
    tcp.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let _ = tcp.write_all(sent);
    let mut answer = Vec::new();
    let _ = tcp.read_to_end(&mut answer);
}

#[test]
fn with_a_secret_a_recorded_member_shows_no_value_and_replays_to_nothing() {
    let scene = scene("replay-sealed", Some(b"replay secret"));
    assert!(
        !shows_value(&scene.recordings),
        "the written value crossed the network in clear"
    );
    let before = scene.founder.stats();
    let addr = scene.founder.local_addr();
    for recording in &scene.recordings {
        replay(&addr, &recording.sent);
    }
    let replayed = scene.recordings.len() as u64;
    eventually("the replayed connections' rejection", || {
        scene.founder.stats().rejected_replayed >= before.rejected_replayed + replayed
    });
    // Nothing else happened: no member, no frame, no other reject.
    assert_eq!(
        scene.founder.stats(),
        ZmqStats {
            rejected_replayed: before.rejected_replayed + replayed,
            ..before
        }
    );
    assert_eq!(scene.founder.members(), Vec::<u32>::new());
    let object = scene.node.object("x", String::new()).unwrap();
    assert_eq!(*object.read().unwrap(), VALUE);
    scene.node.shutdown().unwrap();
}

#[test]
fn without_a_secret_the_same_recording_shows_the_value_and_its_join_admits_a_phantom() {
    let scene = scene("replay-clear", None);
    assert!(
        shows_value(&scene.recordings),
        "the recording missed the write"
    );
    let addr = scene.founder.local_addr();
    for recording in &scene.recordings {
        replay(&addr, &recording.sent);
    }
    eventually("a phantom member from the replayed join", || {
        !scene.founder.members().is_empty()
    });
    assert_eq!(scene.founder.stats().rejected_replayed, 0);
    scene.node.shutdown().unwrap();
}
