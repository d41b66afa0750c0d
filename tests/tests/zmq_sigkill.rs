//! A node process killed with SIGKILL while it holds every token of an object.
//!
//! Nodes 0 and 1 run in this process over ZeroMQ on 127.0.0.1; node 2 is the `zmq_peer`
//! helper, a separate OS process that writes object "a" under the `Invalidate` policy (so it
//! holds all of "a"'s tokens) and is then killed with SIGKILL: no goodbye, no token handed on.
//! The survivors must fail operations that need "a"'s tokens with `Error::Timeout` within the
//! configured timeout (plus a margin), both before and after the transport reports the dead
//! node lost, while objects the dead node never held ("b", and "c" created after the kill)
//! keep working.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Error, Node, Transport, WritePolicy};
use transport_zmq::{ZmqConfig, ZmqTransport};

const CLUSTER: &str = "sigkill-test";
/// The same values as the `zmq_peer` helper's.
const LOST_AFTER: Duration = Duration::from_millis(1500);
const HEARTBEAT: Duration = Duration::from_millis(100);
/// The operation timeout of the surviving nodes.
const TIMEOUT: Duration = Duration::from_secs(2);
/// How much later than the timeout an operation may return: scheduling, the driver's poll.
const MARGIN: Duration = Duration::from_secs(1);

/// A child process that is killed when dropped, so a failing test leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn zmq_config(join: Option<String>) -> ZmqConfig {
    ZmqConfig {
        join,
        lost_after: LOST_AFTER,
        heartbeat: HEARTBEAT,
        ..ZmqConfig::new("tcp://127.0.0.1:0", CLUSTER)
    }
}

fn config() -> Config {
    Config::default()
        .timeout(TIMEOUT)
        .write_policy(WritePolicy::Invalidate)
}

/// Asserts that `op` fails with a timeout, in about the configured timeout.
fn assert_times_out<R: std::fmt::Debug>(what: &str, op: impl FnOnce() -> Result<R, Error>) {
    let start = Instant::now();
    let result = op();
    let took = start.elapsed();
    eprintln!("{what}: {result:?} after {took:?}");
    match result {
        Err(Error::Timeout { after, .. }) => assert_eq!(after, TIMEOUT, "{what}"),
        other => panic!("{what}: expected a timeout, got {other:?} after {took:?}"),
    }
    assert!(
        took <= TIMEOUT + MARGIN,
        "{what}: the timeout came after {took:?}, more than {TIMEOUT:?} + {MARGIN:?}"
    );
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
fn killed_token_holder_fails_only_its_objects() {
    let founder = ZmqTransport::start(zmq_config(None)).expect("founder starts");
    let addr = founder.local_addr();
    let joiner = ZmqTransport::start(zmq_config(Some(addr.clone()))).expect("joiner starts");
    assert_eq!((founder.local_id(), joiner.local_id()), (0, 1));
    let n0 = Node::start(founder, config()).unwrap();
    let n1 = Node::start(joiner, config()).unwrap();
    let a0: DistObj<i64> = n0.object("a", 0).unwrap();
    let a1: DistObj<i64> = n1.object("a", 0).unwrap();
    let b0: DistObj<i64> = n0.object("b", 0).unwrap();
    let b1: DistObj<i64> = n1.object("b", 0).unwrap();
    assert_eq!(exercise([&b0, &b1], 0, TIMEOUT), 220);

    // Node 2, in its own process, takes every token of "a".
    let mut peer = Reaped(
        Command::new(env!("CARGO_BIN_EXE_zmq_peer"))
            .args([&addr, CLUSTER, "a", "7"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start zmq_peer"),
    );
    let stdout = peer.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("zmq_peer reports that it holds \"a\"");
    assert_eq!(line.trim_end(), "holding a as node 2 at version 1");
    // Node 0 and 1 gave their tokens up for that write.
    assert_eq!(a0.try_read().unwrap(), None);
    assert_eq!(a1.try_read().unwrap(), None);

    // SIGKILL: the peer vanishes with all of "a"'s tokens.
    peer.0.kill().expect("SIGKILL zmq_peer");
    let status = peer.0.wait().unwrap();
    assert!(!status.success(), "{status}");
    let killed = Instant::now();

    // At once, before the transport reports the loss: "a" fails, "b" works, concurrently.
    thread::scope(|s| {
        s.spawn(|| assert_times_out("write of a on node 0", || a0.write(1)));
        s.spawn(|| assert_times_out("read of a on node 1", || a1.read()));
        assert_eq!(exercise([&b0, &b1], 220, TIMEOUT), 440);
    });
    let after_loss = LOST_AFTER + Duration::from_millis(500);
    if let Some(rest) = after_loss.checked_sub(killed.elapsed()) {
        thread::sleep(rest);
    }

    // Once it is reported lost: the tokens of "a" are gone for good (no token recreation yet),
    // so "a" still fails within the timeout; "b" and a new object work.
    assert_times_out("update of a on node 1", || a1.update(|v| *v += 1));
    assert_eq!(exercise([&b0, &b1], 440, TIMEOUT), 660);
    let c0: DistObj<String> = n0.object("c", "created after the kill".into()).unwrap();
    let c1: DistObj<String> = n1.object("c", String::new()).unwrap();
    c1.write("written by node 1".into()).unwrap();
    assert_eq!(*c0.read().unwrap(), "written by node 1");

    n1.shutdown().expect("node 1 leaves");
    assert_eq!(*b0.read().unwrap(), 660);
    n0.shutdown().expect("node 0 leaves");
}
