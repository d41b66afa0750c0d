//! A node process stopped with SIGSTOP while it holds every token of an object, then resumed.
//!
//! Nodes 0 and 1 run in this process over ZeroMQ on 127.0.0.1; node 2 is the `zmq_peer`
//! helper in its own OS process, holding every token of "a" (value 7). It is stopped for
//! longer than the failure detection (`lost_after`): the survivors remove it, recover 7 from
//! the copy its write left, and write 8. When it resumes it still holds "a"'s tokens of the
//! old epoch, and its clock says its lease ran out long ago: asked to read "a", it must not
//! answer 7 (a value a completed write replaced) but fail (`NoMajority`, or `Removed` once it
//! learns it was removed, or a timeout).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Node, WritePolicy};
use transport_zmq::{ZmqConfig, ZmqTransport};

const CLUSTER: &str = "sigstop-test";
/// The same values as the `zmq_peer` helper's.
const LOST_AFTER: Duration = Duration::from_millis(1500);
const HEARTBEAT: Duration = Duration::from_millis(100);
const LEASE: Duration = Duration::from_millis(1000);
/// The operation timeout of the surviving nodes: the failure detection and a view change.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long the holder stays stopped.
const STALL: Duration = Duration::from_secs(5);

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
        .lease(LEASE)
}

/// Sends `signal` (`STOP`, `CONT`) to process `pid` with the `kill` program.
fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

#[test]
fn a_stalled_holder_serves_no_stale_read_after_it_resumes() {
    let founder = ZmqTransport::start(zmq_config(None)).expect("founder starts");
    let addr = founder.local_addr();
    let joiner = ZmqTransport::start(zmq_config(Some(addr.clone()))).expect("joiner starts");
    let n0 = Node::start(founder, config()).unwrap();
    let n1 = Node::start(joiner, config()).unwrap();
    let a0: DistObj<i64> = n0.object("a", 0).unwrap();
    let a1: DistObj<i64> = n1.object("a", 0).unwrap();

    let mut peer = Reaped(
        Command::new(env!("CARGO_BIN_EXE_zmq_peer"))
            .args([&addr, CLUSTER, "a", "7"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start zmq_peer"),
    );
    let mut commands = peer.0.stdin.take().unwrap();
    let stdout = peer.0.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("zmq_peer reports that it holds \"a\"");
    assert_eq!(line, "holding a as node 2 at version 1");
    assert_eq!(a0.try_read().unwrap(), None);

    // Stopped with every token of "a": the survivors recover its returned write and go on.
    signal(peer.0.id(), "STOP");
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
    signal(peer.0.id(), "CONT");
    writeln!(commands, "read").expect("ask zmq_peer to read");
    commands.flush().unwrap();
    let answer = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("zmq_peer answers the read");
    eprintln!("the resumed holder answered: {answer}");
    assert!(
        answer.starts_with("read a failed: "),
        "the resumed holder served a read it could not know to be current: {answer}"
    );

    // The survivors are unaffected.
    let updated = a1.update(|v| {
        *v += 1;
        *v
    });
    assert_eq!(updated.unwrap(), 9);
    assert_eq!(*a0.read().unwrap(), 9);
    drop(commands);
    drop(peer);
    n1.shutdown().expect("node 1 leaves");
    n0.shutdown().expect("node 0 leaves");
}
