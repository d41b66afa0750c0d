use std::sync::Arc;
use std::thread;

use coherence_core::{Config, Node};

#[test]
fn four_nodes_count_to_1200() {
    let transports = transport_local::cluster(4);
    let handles: Vec<_> = transports
        .into_iter()
        .map(|t| {
            thread::spawn(move || {
                let node = Node::start(t, Config::default()).unwrap();
                let c = node.object("counter", 0i64).unwrap();
                let mut seen = Vec::new();
                for _ in 0..300 {
                    seen.push(
                        c.update(|v| {
                            *v += 1;
                            *v
                        })
                        .unwrap(),
                    );
                }
                let v: Arc<i64> = c.read().unwrap();
                (node, seen, *v)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut nodes = Vec::new();
    for h in handles {
        let (n, seen, _) = h.join().unwrap();
        all.extend(seen);
        nodes.push(n);
    }
    all.sort();
    assert_eq!(all, (1..=1200).collect::<Vec<_>>());
    let ts: Vec<_> = nodes
        .into_iter()
        .map(|n| thread::spawn(move || n.shutdown()))
        .collect();
    for t in ts {
        t.join().unwrap().unwrap();
    }
}
