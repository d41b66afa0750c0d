//! A Rust node sharing objects with Python nodes over ZeroMQ, for the Python tests
//! (`tests/test_rust_peer.py`) and as an example of the Rust side of a msgpack object.
//!
//! `rust_peer JOIN_ADDR CLUSTER_ID` joins the cluster through `JOIN_ADDR`, then answers
//! commands, one per line on stdin, with one line on stdout: `ok [VALUE]` or `error MESSAGE`.
//! Values are printed in Rust's debug format, which for these types is a Python literal.
//!
//! - `open-i64 NAME INIT`: opens `NAME` as `DistObj<i64>` (`rust_type="i64"` in Python)
//! - `open-map NAME`: opens `NAME` as `DistObj<BTreeMap<String, i64>>`
//!   (`rust_type="BTreeMap<String, i64>"`), with an empty map as init
//! - `read NAME`: the object's value
//! - `add NAME N`: adds `N` to an `i64` object atomically; answers the new value
//! - `insert NAME KEY N`: inserts `KEY: N` into a map object atomically; answers the new map
//! - `bye` (or the end of stdin): shuts the node down and exits
//!
//! Build it with `cargo build --release --example rust_peer` in `python/`.

use std::collections::{BTreeMap, HashMap};
use std::io::BufRead;
use std::process::ExitCode;

use coherence_core::{Config, DistObj, Node};
use transport_zmq::{ZmqConfig, ZmqTransport};

type Map = BTreeMap<String, i64>;

/// The objects this peer opened, by name.
#[derive(Default)]
struct Objects {
    ints: HashMap<String, DistObj<i64>>,
    maps: HashMap<String, DistObj<Map>>,
}

impl Objects {
    /// Runs one command; the answer's text after `ok` or `error`.
    fn run(&mut self, node: &Node, words: &[&str]) -> Result<String, String> {
        let number = |s: &str| s.parse::<i64>().map_err(|e| format!("{s:?}: {e}"));
        match words {
            ["open-i64", name, init] => {
                let obj = node
                    .object(name, number(init)?)
                    .map_err(|e| e.to_string())?;
                self.ints.insert(name.to_string(), obj);
                Ok(String::new())
            }
            ["open-map", name] => {
                let obj = node.object(name, Map::new()).map_err(|e| e.to_string())?;
                self.maps.insert(name.to_string(), obj);
                Ok(String::new())
            }
            ["read", name] => match (self.ints.get(*name), self.maps.get(*name)) {
                (Some(obj), _) => obj.read().map(|v| format!("{v:?}")),
                (_, Some(obj)) => obj.read().map(|v| format!("{v:?}")),
                _ => return Err(format!("{name:?} is not open")),
            }
            .map_err(|e| e.to_string()),
            ["add", name, n] => {
                let n = number(n)?;
                let obj = self
                    .ints
                    .get(*name)
                    .ok_or(format!("no i64 object {name:?}"))?;
                obj.update(|v| {
                    *v += n;
                    format!("{v:?}")
                })
                .map_err(|e| e.to_string())
            }
            ["insert", name, key, n] => {
                let n = number(n)?;
                let obj = self
                    .maps
                    .get(*name)
                    .ok_or(format!("no map object {name:?}"))?;
                obj.update(|map| {
                    map.insert(key.to_string(), n);
                    format!("{map:?}")
                })
                .map_err(|e| e.to_string())
            }
            _ => Err(format!("unknown command {:?}", words.join(" "))),
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [join, cluster] = args.as_slice() else {
        eprintln!("usage: rust_peer JOIN_ADDR CLUSTER_ID");
        return ExitCode::from(2);
    };
    let transport = match ZmqTransport::start(ZmqConfig {
        join: Some(join.clone()),
        ..ZmqConfig::new("tcp://127.0.0.1:0", cluster.as_str())
    }) {
        Ok(transport) => transport,
        Err(e) => {
            eprintln!("rust_peer: cannot join {join}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = match Node::start(transport, Config::default()) {
        Ok(node) => node,
        Err(e) => {
            eprintln!("rust_peer: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("ok node {}", node.id());
    let mut objects = Objects::default();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        if words == ["bye"] {
            break;
        }
        match objects.run(&node, &words) {
            Ok(answer) if answer.is_empty() => println!("ok"),
            Ok(answer) => println!("ok {answer}"),
            Err(e) => println!("error {e}"),
        }
    }
    drop(objects);
    match node.shutdown() {
        Ok(()) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("error {e}");
            ExitCode::FAILURE
        }
    }
}
