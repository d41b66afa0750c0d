//! A two-node ZeroMQ cluster with a shared secret keeps its objects coherent under a 10 s
//! bombardment of both nodes' ports, while counter traffic runs on both nodes:
//!
//! - raw TCP connections that send random bytes instead of a ZMTP greeting;
//! - raw ZMTP connections (a DEALER handshake written by hand here) that send random
//!   messages, frames in this transport's layout with a foreign cluster tag or format version,
//!   and multi-part messages;
//! - real ZeroMQ transports that try to join: one of another cluster id (valid frames of
//!   another cluster), one without the secret and one with a wrong secret (unauthenticated
//!   frames).
//!
//! Afterwards the recorded history is checked: every `update` result is unique and they are
//! exactly `1..=K`, the final value is `K` on both nodes, and every read returned a value
//! between the updates completed before it began and the updates begun before it ended (the
//! linearizability condition for a counter). The nodes' reject counters must have risen.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use coherence_core::{Config, DistObj, Node};
use rand::{Rng, RngCore};
use transport_zmq::{ZmqConfig, ZmqStats, ZmqTransport};

const CLUSTER: &str = "hostile-test";
const SECRET: &[u8] = b"the cluster's secret";
/// How long the bombardment lasts.
const ATTACK: Duration = Duration::from_secs(10);
/// Longest a raw socket waits for the node.
const IO_TIMEOUT: Duration = Duration::from_secs(2);

fn zmq_config(cluster: &str, secret: Option<&[u8]>, join: Option<String>) -> ZmqConfig {
    ZmqConfig {
        join,
        secret: secret.map(<[u8]>::to_vec),
        join_timeout: Duration::from_millis(300),
        ..ZmqConfig::new("tcp://127.0.0.1:0", cluster)
    }
}

/// The TCP address of a node's `tcp://127.0.0.1:PORT`.
fn socket_addr(zmq_addr: &str) -> SocketAddr {
    zmq_addr
        .trim_start_matches("tcp://")
        .parse()
        .expect("a tcp://IP:PORT address")
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

/// Connects and sends random bytes where the ZMTP greeting belongs.
fn garbage_connection(addr: SocketAddr) {
    let Ok(mut tcp) = TcpStream::connect_timeout(&addr, IO_TIMEOUT) else {
        return;
    };
    let _ = tcp.set_write_timeout(Some(IO_TIMEOUT));
    let len = rand::thread_rng().gen_range(1..4096);
    let _ = tcp.write_all(&random_bytes(len));
}

/// A ZMTP 3.0 DEALER connection, handshake written by hand (NULL mechanism).
fn zmtp_dealer(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let mut tcp = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    tcp.set_write_timeout(Some(IO_TIMEOUT))?;
    let mut greeting = [0u8; 64];
    greeting[0] = 0xff;
    greeting[9] = 0x7f;
    greeting[10] = 3;
    greeting[12..16].copy_from_slice(b"NULL");
    tcp.write_all(&greeting)?;
    let mut theirs = [0u8; 64];
    tcp.read_exact(&mut theirs)?;
    let mut ready = vec![5];
    ready.extend_from_slice(b"READY");
    ready.push(11);
    ready.extend_from_slice(b"Socket-Type");
    ready.extend_from_slice(&6u32.to_be_bytes());
    ready.extend_from_slice(b"DEALER");
    tcp.write_all(&[0x04, ready.len() as u8])?;
    tcp.write_all(&ready)?;
    // Their READY: a short or long command frame.
    let mut flags = [0u8; 1];
    tcp.read_exact(&mut flags)?;
    let len = if flags[0] & 0x02 != 0 {
        let mut len = [0u8; 8];
        tcp.read_exact(&mut len)?;
        u64::from_be_bytes(len) as usize
    } else {
        let mut len = [0u8; 1];
        tcp.read_exact(&mut len)?;
        usize::from(len[0])
    };
    let mut body = vec![0; len.min(4096)];
    tcp.read_exact(&mut body)?;
    Ok(tcp)
}

/// Sends one ZMTP message of `parts`.
fn zmtp_send(tcp: &mut TcpStream, parts: &[Vec<u8>]) -> std::io::Result<()> {
    for (i, part) in parts.iter().enumerate() {
        let more = if i + 1 < parts.len() { 0x01 } else { 0 };
        if part.len() > 255 {
            tcp.write_all(&[more | 0x02])?;
            tcp.write_all(&(part.len() as u64).to_be_bytes())?;
        } else {
            tcp.write_all(&[more, part.len() as u8])?;
        }
        tcp.write_all(part)?;
    }
    Ok(())
}

/// A frame in the transport's documented layout (magic, version, kind, flags, cluster tag,
/// sender, sequence, acknowledgement, length, payload) with the given tag and version.
fn layout_frame(version: u8, cluster_tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut frame = b"COH1".to_vec();
    frame.extend_from_slice(&[version, 5, 0, 0]);
    frame.extend_from_slice(&cluster_tag.to_le_bytes());
    frame.extend_from_slice(&0u32.to_le_bytes());
    frame.extend_from_slice(&1u64.to_le_bytes());
    frame.extend_from_slice(&0u64.to_le_bytes());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// One raw ZMTP connection's worth of hostile messages.
fn zmtp_attack(addr: SocketAddr) {
    let Ok(mut tcp) = zmtp_dealer(addr) else {
        return;
    };
    let mut rng = rand::thread_rng();
    for _ in 0..20 {
        let message = match rng.gen_range(0..4) {
            0 => vec![random_bytes(rng.gen_range(0..200))],
            // The transport's frame format is version 2: first a foreign tag, then a foreign
            // version.
            1 => vec![layout_frame(2, rng.gen(), &random_bytes(16))],
            2 => vec![layout_frame(rng.gen_range(3..=255), rng.gen(), b"x")],
            _ => vec![random_bytes(8), random_bytes(8)],
        };
        if zmtp_send(&mut tcp, &message).is_err() {
            return;
        }
    }
}

/// A real transport that tries to join through `addr` and must be refused.
fn intruder(cluster: &str, secret: Option<&[u8]>, addr: &str) {
    let attempt = ZmqTransport::start(zmq_config(cluster, secret, Some(addr.to_string())));
    assert!(
        attempt.is_err(),
        "an intruder of cluster {cluster:?} (secret: {}) was admitted",
        secret.is_some()
    );
}

/// One recorded operation: what it was, what it returned, and when it began and ended on a
/// clock shared by all threads.
#[derive(Debug, Clone, Copy)]
struct Op {
    update: bool,
    value: i64,
    invoked: u64,
    returned: u64,
}

/// Runs counter traffic on `counter` until `stop`, recording every operation: an update, then
/// one to three reads (a read with a token is local and takes nanoseconds, so unbounded reads
/// would only fill memory). Returns how many updates it made and the slowest operation.
fn traffic(
    counter: &DistObj<i64>,
    clock: &AtomicU64,
    stop: &AtomicBool,
    history: &Mutex<Vec<Op>>,
) -> (usize, Duration) {
    let mut rng = rand::thread_rng();
    let mut mine = Vec::new();
    let mut slowest = Duration::ZERO;
    let mut reads_due = 0;
    while !stop.load(Ordering::Relaxed) {
        let update = reads_due == 0;
        reads_due = if update {
            rng.gen_range(1..=3)
        } else {
            reads_due - 1
        };
        let began = Instant::now();
        let invoked = clock.fetch_add(1, Ordering::SeqCst);
        let value = if update {
            counter.update(|c| {
                *c += 1;
                *c
            })
        } else {
            counter.read().map(|v| *v)
        }
        .unwrap_or_else(|e| panic!("counter operation failed under attack: {e}"));
        let returned = clock.fetch_add(1, Ordering::SeqCst);
        slowest = slowest.max(began.elapsed());
        mine.push(Op {
            update,
            value,
            invoked,
            returned,
        });
    }
    let updates = mine.iter().filter(|o| o.update).count();
    history.lock().unwrap().extend(mine);
    (updates, slowest)
}

/// Checks the history of a counter that started at 0 and ended at `last`.
fn check_history(history: &[Op], last: i64) {
    let mut updates: Vec<i64> = history
        .iter()
        .filter(|o| o.update)
        .map(|o| o.value)
        .collect();
    updates.sort_unstable();
    let k = updates.len() as i64;
    assert_eq!(last, k, "final value after {k} updates");
    assert!(
        updates.iter().copied().eq(1..=k),
        "update results are not exactly 1..={k}: duplicates or gaps"
    );
    let mut invocations: Vec<u64> = history
        .iter()
        .filter(|o| o.update)
        .map(|o| o.invoked)
        .collect();
    let mut returns: Vec<u64> = history
        .iter()
        .filter(|o| o.update)
        .map(|o| o.returned)
        .collect();
    invocations.sort_unstable();
    returns.sort_unstable();
    for op in history {
        let done_before = returns.partition_point(|&r| r < op.invoked) as i64;
        let begun_before = invocations.partition_point(|&i| i < op.returned) as i64;
        assert!(
            (done_before..=begun_before).contains(&op.value),
            "{op:?} returned {}, but {done_before} updates had completed before it began and \
             {begun_before} had begun before it ended",
            op.value
        );
    }
}

#[test]
fn coherent_under_a_hostile_network() {
    let founder = Arc::new(
        ZmqTransport::start(zmq_config(CLUSTER, Some(SECRET), None)).expect("founder starts"),
    );
    let addr0 = founder.local_addr();
    let config = Config::default();
    // The founder's node takes the joiner in (a view change), so it runs first.
    let node0 = Node::start(Arc::clone(&founder), config.clone()).unwrap();
    let joiner = Arc::new(
        ZmqTransport::start(ZmqConfig {
            join_timeout: Duration::from_secs(10),
            ..zmq_config(CLUSTER, Some(SECRET), Some(addr0.clone()))
        })
        .expect("joiner starts"),
    );
    let addr1 = joiner.local_addr();
    let transports = [Arc::clone(&founder), Arc::clone(&joiner)];
    let before: Vec<ZmqStats> = transports.iter().map(|t| t.stats()).collect();
    let nodes = [node0, Node::start(joiner, config).unwrap()];
    let counters: Vec<DistObj<i64>> = nodes
        .iter()
        .map(|n| n.object("counter", 0).unwrap())
        .collect();

    let clock = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let history = Mutex::new(Vec::new());
    let started = Instant::now();
    // One traffic thread per node: several threads updating on one node can hold a remote
    // update off for seconds (a fairness problem of the core, reported separately), which is
    // not what this test is about.
    let progress = thread::scope(|s| {
        let traffic: Vec<_> = counters
            .iter()
            .map(|counter| s.spawn(|| traffic(counter, &clock, &stop, &history)))
            .collect();
        for addr in [&addr0, &addr1] {
            let target = socket_addr(addr);
            s.spawn(move || {
                while started.elapsed() < ATTACK {
                    garbage_connection(target);
                    thread::sleep(Duration::from_millis(5));
                }
            });
            s.spawn(move || {
                while started.elapsed() < ATTACK {
                    zmtp_attack(target);
                    thread::sleep(Duration::from_millis(5));
                }
            });
            s.spawn(move || {
                while started.elapsed() < ATTACK {
                    intruder("another-cluster", Some(SECRET), addr);
                    intruder(CLUSTER, None, addr);
                    intruder(CLUSTER, Some(b"a wrong secret"), addr);
                }
            });
        }
        while started.elapsed() < ATTACK {
            thread::sleep(Duration::from_millis(50));
        }
        stop.store(true, Ordering::Relaxed);
        traffic
            .into_iter()
            .map(|t| t.join().expect("traffic thread"))
            .collect::<Vec<_>>()
    });

    let history = history.into_inner().unwrap();
    let finals: Vec<i64> = counters.iter().map(|c| *c.read().unwrap()).collect();
    assert_eq!(
        finals[0], finals[1],
        "the nodes disagree on the final value"
    );
    eprintln!(
        "{} operations in {:?} under attack; (updates, slowest operation) per node: {progress:?}",
        history.len(),
        started.elapsed()
    );
    for (id, (updates, _)) in progress.iter().enumerate() {
        assert!(
            *updates >= 100,
            "node {id}: only {updates} updates got through"
        );
    }
    check_history(&history, finals[0]);

    for (id, (t, before)) in transports.iter().zip(&before).enumerate() {
        let after = t.stats();
        eprintln!("node {id}: {after:?}");
        assert!(
            after.rejected_malformed > before.rejected_malformed,
            "node {id}: {after:?}"
        );
        assert!(
            after.rejected_foreign > before.rejected_foreign,
            "node {id}: {after:?}"
        );
        assert!(
            after.rejected_unauthenticated > before.rejected_unauthenticated,
            "node {id}: {after:?}"
        );
        assert!(
            after.frames_received > before.frames_received,
            "node {id}: {after:?}"
        );
    }
    for node in nodes {
        node.shutdown().expect("a node leaves");
    }
}
