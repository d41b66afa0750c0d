//! A node in its own OS process, for the SIGKILL and SIGSTOP tests
//! (`tests/tests/zmq_sigkill.rs`, `tests/tests/zmq_sigstop.rs`).
//!
//! `zmq_peer JOIN_ADDR CLUSTER_ID OBJECT VALUE` joins the ZeroMQ cluster through `JOIN_ADDR`,
//! opens the `i64` object `OBJECT` and writes `VALUE` to it under the `Invalidate` policy, so
//! that it holds every token of the object. It then prints `holding OBJECT as node ID at
//! version V` and waits for commands on stdin: `read` reads the object and prints `read
//! OBJECT: VALUE` or `read OBJECT failed: ERROR`. When its stdin ends (the test is gone) it
//! exits at once, without leaving the cluster, as a crash would.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::time::Duration;

use coherence_core::{Config, DistObj, Node, WritePolicy};
use tests::peer_process::{zmq_config, LEASE};
use transport_zmq::ZmqTransport;

/// The operation timeout: a read that cannot be served says so within it.
const TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [join, cluster, object, value] = args.as_slice() else {
        eprintln!("usage: zmq_peer JOIN_ADDR CLUSTER_ID OBJECT VALUE");
        return ExitCode::from(2);
    };
    let Ok(value) = value.parse::<i64>() else {
        eprintln!("VALUE must be a whole number, got {value:?}");
        return ExitCode::from(2);
    };
    match hold(join, cluster, object, value) {
        Ok((node, obj)) => {
            // Serve commands until killed, or until the test goes away.
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                match line.trim() {
                    "read" => match obj.read() {
                        Ok(value) => println!("read {object}: {value}"),
                        Err(e) => println!("read {object} failed: {e}"),
                    },
                    other => println!("unknown command {other:?}"),
                }
                let _ = std::io::stdout().flush();
            }
            // Exit without a goodbye, like a crash; the node is never shut down.
            std::mem::forget(node);
            std::process::exit(0);
        }
        Err(e) => {
            eprintln!("zmq_peer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Joins, takes every token of `object` by writing `value`, and says so on stdout.
fn hold(
    join: &str,
    cluster: &str,
    object: &str,
    value: i64,
) -> Result<(Node, DistObj<i64>), String> {
    let transport = ZmqTransport::start(zmq_config(cluster, Some(join.to_string())))
        .map_err(|e| format!("cannot join {join}: {e}"))?;
    let config = Config::default()
        .write_policy(WritePolicy::Invalidate)
        .lease(LEASE)
        .timeout(TIMEOUT);
    let node = Node::start(transport, config).map_err(|e| format!("cannot start: {e}"))?;
    let obj = node
        .object(object, 0i64)
        .map_err(|e| format!("cannot open {object:?}: {e}"))?;
    obj.write(value)
        .map_err(|e| format!("cannot write {object:?}: {e}"))?;
    println!(
        "holding {object} as node {} at version {}",
        node.id(),
        obj.version()
    );
    let _ = std::io::stdout().flush();
    Ok((node, obj))
}
