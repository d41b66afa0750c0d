//! Strangers who connect and say nothing cannot exhaust a node.
//!
//! - In this process: idle connections are closed after `handshake_timeout`, and beyond
//!   `max_unauthenticated` the oldest is closed first, while members keep talking.
//! - With a child process whose open-file limit is 256 (`ulimit -n`): 400 idle connections fill
//!   its file table. Its CPU stays near idle (no spinning on the failed accepts), a new member
//!   still joins through it within 2 s, and writes between members still succeed.
//!
//! The child is this test binary again, running the ignored test `node_process`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coherence_core::{Config, Node, Transport};
use common::{cluster, config, eventually, WAIT};
use transport_zmq::{ZmqConfig, ZmqTransport};

const CLUSTER: &str = "exhaustion";
const SECRET: &[u8] = b"exhaustion test secret";
/// Tells this binary that it runs as the child.
const CHILD_ENV: &str = "COHERENCE_ZMQ_EXHAUSTION_CHILD";
/// The child's open-file limit, and the idle connections opened against it.
const FILE_LIMIT: usize = 256;
const IDLE_CONNECTIONS: usize = 400;
/// What the child prints before each line meant for the parent.
const TAG: &str = "node: ";

fn tcp_addr(zmq_addr: &str) -> String {
    zmq_addr.trim_start_matches("tcp://").to_owned()
}

/// Whether the node closed `tcp` (end of stream or reset) within [`WAIT`].
fn closed_by_node(tcp: &mut TcpStream) -> bool {
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = Vec::new();
    match tcp.read_to_end(&mut sink) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

#[test]
fn idle_connections_time_out_and_the_oldest_make_room() {
    let base = ZmqConfig {
        max_unauthenticated: 4,
        ..config("idle")
    };
    assert_eq!(
        base.handshake_timeout,
        Duration::from_secs(5),
        "the default"
    );
    let nodes = cluster(2, &base);
    let addr = tcp_addr(&nodes[1].local_addr());
    // Six idle connections, one at a time so the node accepts them in order: the first two
    // are closed to make room, long before the deadline.
    let mut idle: Vec<TcpStream> = (0..6)
        .map(|_| {
            let mut tcp = TcpStream::connect(&addr).unwrap();
            let mut greeting = [0; 64];
            tcp.read_exact(&mut greeting).unwrap();
            tcp
        })
        .collect();
    for tcp in &mut idle[..2] {
        assert!(closed_by_node(tcp), "an old idle connection was kept");
    }
    let newest = &mut idle[5];
    newest.set_nonblocking(true).unwrap();
    let still_open = newest.read(&mut [0; 1]);
    assert!(
        matches!(&still_open, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the newest was closed instead of the oldest: {still_open:?}"
    );
    newest.set_nonblocking(false).unwrap();
    assert_eq!(nodes[1].stats().dropped_unauthenticated, 2);
    // The other four, at the handshake deadline; members never noticed.
    for tcp in &mut idle[2..] {
        assert!(
            closed_by_node(tcp),
            "an idle connection outlived the deadline"
        );
    }
    eventually("every idle connection counted", || {
        nodes[1].stats().dropped_unauthenticated == 6
    });
    nodes[0].send(1, b"still here".to_vec()).unwrap();
    assert_eq!(common::next(&nodes[1]), common::frame(0, b"still here"));
    assert_eq!(nodes[1].stats().accept_errors, 0);
}

/// The child: founds the cluster, holds a token of "x", prints its address, then answers
/// `stats` on stdin until stdin closes. Does nothing when run by hand.
#[test]
#[ignore = "the node process of the test below, which starts it"]
fn node_process() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let transport = ZmqTransport::start(ZmqConfig {
        secret: Some(SECRET.to_vec()),
        // Above the file limit, so the table fills before this limit is reached.
        max_unauthenticated: 4 * FILE_LIMIT,
        ..ZmqConfig::new("tcp://127.0.0.1:0", CLUSTER)
    })
    .expect("the node starts");
    let transport = Arc::new(transport);
    let node = Node::start(Arc::clone(&transport), Config::default()).expect("node");
    let x = node.object("x", 0i64).expect("open x");
    x.read().expect("read x");
    println!("{TAG}ready {}", transport.local_addr());
    for line in std::io::stdin().lines() {
        let Ok(line) = line else { break };
        if line == "stats" {
            let stats = transport.stats();
            println!(
                "{TAG}stats {} {}",
                stats.dropped_unauthenticated, stats.accept_errors
            );
        }
    }
    node.shutdown().expect("shutdown");
}

/// The child process; killed if the test fails before it ends.
struct NodeProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl NodeProcess {
    fn start() -> NodeProcess {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit -n {FILE_LIMIT} && exec \"$0\" \"$@\""))
            .arg(exe)
            .args(["node_process", "--exact", "--ignored", "--nocapture"])
            .env(CHILD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the node process starts");
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        NodeProcess {
            child,
            stdin,
            stdout,
        }
    }

    /// The next line the node meant for us, without the tag.
    fn line(&mut self) -> String {
        loop {
            let mut line = String::new();
            let read = self.stdout.read_line(&mut line).unwrap();
            assert!(read > 0, "the node process ended");
            if let Some(ours) = line.trim_end().strip_prefix(TAG) {
                return ours.to_owned();
            }
        }
    }

    /// The child's CPU time so far (user and system), from `/proc/PID/stat` in clock ticks
    /// of 1/100 s (Linux's USER_HZ).
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses: state is the first, utime
        // and stime the 12th and 13th.
        let fields: Vec<u64> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .skip(1)
            .map(|field| field.parse().unwrap_or(0))
            .collect();
        Duration::from_millis((fields[10] + fields[11]) * 10)
    }

    /// (dropped_unauthenticated, accept_errors) of the child's transport.
    fn stats(&mut self) -> (u64, u64) {
        writeln!(self.stdin.as_mut().unwrap(), "stats").unwrap();
        let line = self.line();
        let mut numbers = line
            .strip_prefix("stats ")
            .expect("a stats line")
            .split(' ')
            .map(|n| n.parse().unwrap());
        (numbers.next().unwrap(), numbers.next().unwrap())
    }

    fn finish(mut self) {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "the node process failed: {status}");
                return;
            }
            assert!(Instant::now() < deadline, "the node process did not end");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn member(contact: &str) -> Node {
    let transport = ZmqTransport::start(ZmqConfig {
        join: Some(contact.to_owned()),
        secret: Some(SECRET.to_vec()),
        ..ZmqConfig::new("tcp://127.0.0.1:0", CLUSTER)
    })
    .expect("a member joins");
    Node::start(transport, Config::default()).expect("node")
}

#[test]
fn idle_connections_up_to_the_file_limit_neither_spin_nor_block_joins() {
    let mut node = NodeProcess::start();
    let ready = node.line();
    let contact = ready
        .strip_prefix("ready ")
        .expect("a ready line")
        .to_owned();
    let a = member(&contact);
    let xa = a.object("x", 0i64).unwrap();
    assert_eq!(*xa.read().unwrap(), 0);

    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS)
        .map(|_| TcpStream::connect(tcp_addr(&contact)).expect("the kernel queues it"))
        .collect();
    eventually("the node's file table to fill", || node.stats().1 > 0);

    let cpu = node.cpu();
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    let used = node.cpu() - cpu;
    let share = used.as_secs_f64() / measured.elapsed().as_secs_f64();
    eprintln!("node CPU with {IDLE_CONNECTIONS} idle connections: {used:?} in one second");
    assert!(
        share < 0.5,
        "the node used {:.0} % of a core",
        share * 100.0
    );

    let joining = Instant::now();
    let b = member(&contact);
    let took = joining.elapsed();
    eprintln!("a new member joined in {took:?}");
    assert!(took < Duration::from_secs(2), "joining took {took:?}");
    let xb = b.object("x", 0i64).unwrap();
    xa.write(7).unwrap();
    assert_eq!(*xb.read().unwrap(), 7);
    xb.write(8).unwrap();
    assert_eq!(*xa.read().unwrap(), 8);

    let (dropped, accept_errors) = node.stats();
    eprintln!("node: {dropped} idle connections closed, {accept_errors} failed accepts");
    assert!(dropped > 0 && accept_errors > 0);
    drop(idle);
    b.shutdown().unwrap();
    a.shutdown().unwrap();
    node.finish();
}
