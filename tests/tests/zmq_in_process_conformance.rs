//! The conformance suite (`tests::conformance`) over ZeroMQ on 127.0.0.1 with every node a
//! thread of this process: every scenario thread clusters run, under both write policies.
//!
//! Each cluster is a founder plus joiners through it, one after the other so that ids come out
//! in order 0..n: each joiner is taken in by the members' nodes (a view change), so it asks
//! once the member before it is in. A late joiner joins through the founder of the cluster
//! started last.

use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use coherence_core::Transport;
use tests::conformance::{Cluster, Kind, Starter, PATIENCE};
use transport_zmq::{ZmqConfig, ZmqTransport};

/// A loopback configuration with a fast heartbeat, so a lost peer shows quickly.
fn config() -> ZmqConfig {
    ZmqConfig {
        lost_after: Duration::from_millis(1500),
        heartbeat: Duration::from_millis(100),
        ..ZmqConfig::new("tcp://127.0.0.1:0", "conformance")
    }
}

/// How far the members of one cluster got: the founder's address once it runs, and how many
/// members have their transport (and so their id).
#[derive(Default)]
struct Progress {
    founder_addr: Option<String>,
    started: usize,
}

/// One cluster's progress and the condition its starters wait on.
type Chain = Arc<(Mutex<Progress>, Condvar)>;

/// Member `i`'s starter: the founder founds; joiner `i` waits for member `i - 1`, then joins
/// through the founder.
fn starter(chain: Chain, i: usize) -> Starter {
    Box::new(move || {
        let (progress, changed) = &*chain;
        let deadline = Instant::now() + PATIENCE;
        let mut p = progress.lock().unwrap_or_else(PoisonError::into_inner);
        while p.started < i {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("member {i}: member {} never started", p.started));
            }
            p = changed
                .wait_timeout(p, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        let cfg = ZmqConfig {
            join: p.founder_addr.clone(),
            ..config()
        };
        drop(p);
        let transport =
            ZmqTransport::start(cfg).map_err(|e| format!("member {i} cannot start: {e}"))?;
        let mut p = progress.lock().unwrap_or_else(PoisonError::into_inner);
        if i == 0 {
            p.founder_addr = Some(transport.local_addr());
        }
        p.started = i + 1;
        changed.notify_all();
        Ok(Box::new(transport) as Box<dyn Transport>)
    })
}

/// ZeroMQ clusters; remembers the last one, which a late joiner joins.
#[derive(Default)]
struct Zmq {
    last: Mutex<Option<Chain>>,
}

impl Cluster for Zmq {
    fn start(&self, n: usize) -> Vec<Starter> {
        let chain = Chain::default();
        *self.last.lock().unwrap() = Some(Arc::clone(&chain));
        (0..n).map(|i| starter(Arc::clone(&chain), i)).collect()
    }

    fn join(&self) -> Result<Box<dyn Transport>, String> {
        let chain = self.last.lock().unwrap().clone();
        let chain = chain.ok_or("no cluster was started to join")?;
        let addr = chain.0.lock().unwrap().founder_addr.clone();
        let addr = addr.ok_or("the founder never started")?;
        let node = ZmqTransport::start(ZmqConfig {
            join: Some(addr),
            ..config()
        })
        .map_err(|e| format!("the late joiner cannot join: {e}"))?;
        Ok(Box::new(node))
    }

    fn kind(&self) -> Kind {
        Kind::JoinedThreads
    }
}

// Every scenario but those that need a silent founder: here the founder's node takes every
// member in.
tests::conformance_suite!(super::Zmq::default(), joined);
