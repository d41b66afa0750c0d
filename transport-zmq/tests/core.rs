//! The coherence core over ZeroMQ: three nodes in one process, concurrent increments.

mod common;

use std::time::Duration;

use coherence_core::{Config, Node, Transport};
use common::{cluster_unread, config};

#[test]
fn concurrent_updates_over_zmq_lose_no_increment() {
    const NODES: usize = 3;
    const THREADS_PER_NODE: usize = 2;
    const UPDATES: i64 = 300;
    let transports = cluster_unread(NODES, &config("core"));
    let nodes: Vec<Node> = std::thread::scope(|s| {
        let handles: Vec<_> = transports
            .into_iter()
            .map(|t| {
                s.spawn(move || {
                    let id = t.local_id();
                    Node::start(t, Config::default().timeout(Duration::from_secs(20)))
                        .unwrap_or_else(|e| panic!("node {id} starts: {e}"))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for node in &nodes {
            let counter = node.object("counter", 0i64).expect("opens");
            for _ in 0..THREADS_PER_NODE {
                let counter = counter.clone();
                s.spawn(move || {
                    for _ in 0..UPDATES {
                        counter.update(|c| *c += 1).expect("updates");
                    }
                });
            }
        }
    });
    let expected = NODES as i64 * THREADS_PER_NODE as i64 * UPDATES;
    eprintln!("{expected} concurrent updates took {:?}", started.elapsed());
    for node in &nodes {
        let counter = node.object("counter", 0i64).expect("opens");
        assert_eq!(
            *counter.read().expect("reads"),
            expected,
            "node {}",
            node.id()
        );
    }
    for node in nodes {
        node.shutdown().expect("leaves");
    }
}
