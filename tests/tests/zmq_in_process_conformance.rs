//! The conformance suite (`tests::conformance`) over ZeroMQ on 127.0.0.1 with every node a
//! thread of this process: every scenario thread clusters run, under both write policies.
//!
//! Each cluster is a founder plus joiners through it, so ids come out in order 0..n; a late
//! joiner joins through the founder of the cluster started last.

use std::sync::Mutex;
use std::time::Duration;

use coherence_core::Transport;
use tests::conformance::Cluster;
use transport_zmq::{ZmqConfig, ZmqTransport};

/// A loopback configuration with a fast heartbeat, so a lost peer shows quickly.
fn config() -> ZmqConfig {
    ZmqConfig {
        lost_after: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(100),
        ..ZmqConfig::new("tcp://127.0.0.1:0", "conformance")
    }
}

/// A founder and `n - 1` joiners through it: ids 0..n.
fn cluster(n: usize) -> Vec<ZmqTransport> {
    let founder = ZmqTransport::start(config()).expect("founder starts");
    let addr = founder.local_addr();
    let mut nodes = vec![founder];
    for i in 1..n {
        let node = ZmqTransport::start(ZmqConfig {
            join: Some(addr.clone()),
            ..config()
        })
        .expect("joiner starts");
        assert_eq!(node.local_id() as usize, i);
        nodes.push(node);
    }
    nodes
}

/// ZeroMQ clusters; remembers where the last one can be joined.
#[derive(Default)]
struct Zmq {
    founder_addr: Mutex<Option<String>>,
}

impl Cluster for Zmq {
    fn start(&self, n: usize) -> Vec<Box<dyn Transport>> {
        let nodes = cluster(n);
        *self.founder_addr.lock().unwrap() = nodes.first().map(ZmqTransport::local_addr);
        nodes
            .into_iter()
            .map(|t| Box::new(t) as Box<dyn Transport>)
            .collect()
    }

    fn join(&self) -> Result<Box<dyn Transport>, String> {
        let addr = self.founder_addr.lock().unwrap().clone();
        let addr = addr.ok_or("no cluster was started to join")?;
        let node = ZmqTransport::start(ZmqConfig {
            join: Some(addr),
            ..config()
        })
        .map_err(|e| format!("the late joiner cannot join: {e}"))?;
        Ok(Box::new(node))
    }
}

tests::conformance_suite!(super::Zmq::default());
