//! The coherence core over ZeroMQ: three nodes in one process, concurrent increments. The
//! founder's core takes the joiners in (its view change answers their join requests).

mod common;

use std::time::Duration;

use coherence_core::{Config, Node};
use common::config;
use transport_zmq::{ZmqConfig, ZmqTransport};

#[test]
fn concurrent_updates_over_zmq_lose_no_increment() {
    const NODES: usize = 3;
    const THREADS_PER_NODE: usize = 2;
    const UPDATES: i64 = 300;
    let base = config("core");
    let settings = Config::default().timeout(Duration::from_secs(20));
    let founder = ZmqTransport::start(base.clone()).expect("founder starts");
    let contact = founder.local_addr();
    let mut nodes = vec![Node::start(founder, settings.clone()).expect("node 0 starts")];
    for i in 1..NODES {
        // Returns once the members' view took it in.
        let transport = ZmqTransport::start(ZmqConfig {
            join: Some(contact.clone()),
            ..base.clone()
        })
        .unwrap_or_else(|e| panic!("joiner {i} starts: {e}"));
        nodes.push(
            Node::start(transport, settings.clone())
                .unwrap_or_else(|e| panic!("node {i} starts: {e}")),
        );
    }
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
