//! The `zmq_peer` node process of the SIGKILL and SIGSTOP tests, and what those tests and
//! the peer share: the failure detection, lease and heartbeat settings, and the launcher
//! side (start it, read its lines, send it commands and signals).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::Duration;

use transport_zmq::ZmqConfig;

/// How long a silent peer stays a member (`ZmqConfig::lost_after`), on every node.
pub const LOST_AFTER: Duration = Duration::from_millis(1500);
/// Heartbeat interval, on every node.
pub const HEARTBEAT: Duration = Duration::from_millis(100);
/// Every node's lease: shorter than `LOST_AFTER`, as the defaults are, so that once the
/// others lose a node, the grants they gave it have expired and its removal waits for
/// nothing more.
pub const LEASE: Duration = Duration::from_millis(1000);

/// A ZeroMQ configuration on 127.0.0.1 with the settings above.
pub fn zmq_config(cluster: &str, join: Option<String>) -> ZmqConfig {
    ZmqConfig {
        join,
        lost_after: LOST_AFTER,
        heartbeat: HEARTBEAT,
        ..ZmqConfig::new("tcp://127.0.0.1:0", cluster)
    }
}

/// Sends `signal` (`STOP`, `CONT`, `KILL`) to process `pid` with the `kill` program.
pub fn signal(pid: u32, signal: &str) -> Result<(), String> {
    let status = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .map_err(|e| format!("cannot run kill: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid}: {status}"))
    }
}

/// The lines a child process prints, as they come (read by a thread of their own).
pub fn lines_of(stdout: ChildStdout) -> Receiver<String> {
    let (tx, lines) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    lines
}

/// A running `zmq_peer` process; killed when dropped, so a failing test leaves nothing
/// running.
pub struct Peer {
    child: Child,
    commands: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Peer {
    /// Starts `program` (the `zmq_peer` binary) to join through `join` and write `value` to
    /// `object`.
    pub fn start(program: &str, join: &str, cluster: &str, object: &str, value: i64) -> Peer {
        let mut child = Command::new(program)
            .args([join, cluster, object, &value.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start zmq_peer");
        Peer {
            commands: child.stdin.take(),
            lines: lines_of(child.stdout.take().expect("piped")),
            child,
        }
    }

    /// The process id, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The next line it prints, within `within`.
    pub fn line(&self, within: Duration) -> String {
        self.lines
            .recv_timeout(within)
            .unwrap_or_else(|e| panic!("zmq_peer printed nothing within {within:?}: {e}"))
    }

    /// Sends a command line (`read`).
    pub fn send(&mut self, command: &str) {
        let stdin = self.commands.as_mut().expect("stdin open");
        writeln!(stdin, "{command}").expect("send a command to zmq_peer");
        stdin.flush().expect("send a command to zmq_peer");
    }

    /// SIGKILLs it and waits for it; panics if it had exited on its own.
    pub fn kill(&mut self) {
        self.child.kill().expect("SIGKILL zmq_peer");
        let status = self.child.wait().expect("wait for zmq_peer");
        assert!(!status.success(), "zmq_peer exited by itself: {status}");
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
