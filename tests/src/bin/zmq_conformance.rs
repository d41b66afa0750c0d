//! The conformance scenarios over ZeroMQ, one node per OS process: every process runs every
//! scenario of [`tests::conformance`] that process clusters run (the same code
//! `mpi_conformance` runs under MPI, and the thread clusters run).
//!
//! ```text
//! zmq_conformance --expect N [--listen ADDR] [--join ADDR] [--policy update|invalidate]
//!                 [--cluster-id ID] [--watch-stdin]
//! ```
//!
//! The process without `--join` founds the cluster and is rank 0; the others join through any
//! member and their rank is the id the cluster assigns (the next unused one: 1, 2, ... in the
//! order they are admitted). `--expect N` is the number of ranks: ids must come out as 0..N.
//! Every process prints `node ID listening on ADDR` once its transport is up. The first
//! scenario needs the last rank (id N-1) to join late: rank 0 prints
//! [`conformance::LATE_READY`] once the others have written, and a launcher starts the last process
//! then (one started earlier still passes: it only opens the objects late). Rank 1 prints a
//! line per scenario and the summary; a failing process prints why on stderr. Every process
//! exits 0 only if every scenario passed on it and it left the cluster; `--watch-stdin` makes
//! it exit at once when its stdin ends (its launcher is gone).

use std::io::Read;
use std::process::ExitCode;

use coherence_core::WritePolicy;
use tests::conformance;
use transport_zmq::{ZmqConfig, ZmqTransport};

const USAGE: &str = "usage: zmq_conformance --expect N [--listen ADDR] [--join ADDR] \
                     [--policy update|invalidate] [--cluster-id ID] [--watch-stdin]";

/// What the command line asked for.
struct Args {
    listen: String,
    join: Option<String>,
    expect: usize,
    policy: WritePolicy,
    cluster_id: String,
    watch_stdin: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        listen: "tcp://127.0.0.1:0".to_string(),
        join: None,
        expect: 0,
        policy: WritePolicy::Update,
        cluster_id: "conformance".to_string(),
        watch_stdin: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--watch-stdin" {
            args.watch_stdin = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => args.listen = value,
            "--join" => args.join = Some(value),
            "--cluster-id" => args.cluster_id = value,
            "--expect" => {
                args.expect = value
                    .parse()
                    .map_err(|_| format!("--expect {value:?} is not a number"))?;
            }
            "--policy" => {
                args.policy = match value.as_str() {
                    "update" => WritePolicy::Update,
                    "invalidate" => WritePolicy::Invalidate,
                    other => return Err(format!("unknown policy {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.expect < 2 {
        return Err("--expect N with N >= 2 is required".to_string());
    }
    Ok(args)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("zmq_conformance: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if args.watch_stdin {
        // The launcher holds our stdin open; when it ends, the launcher is gone: so are we.
        std::thread::spawn(|| {
            let _ = std::io::stdin().read_to_end(&mut Vec::new());
            eprintln!("zmq_conformance: stdin ended, the launcher is gone; exiting");
            std::process::exit(3);
        });
    }
    let transport = match ZmqTransport::start(ZmqConfig {
        join: args.join.clone(),
        join_timeout: conformance::TIMEOUT,
        ..ZmqConfig::new(args.listen.clone(), args.cluster_id.clone())
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("zmq_conformance: ZeroMQ: {e}");
            return ExitCode::FAILURE;
        }
    };
    let id = coherence_core::Transport::local_id(&transport);
    println!("node {id} listening on {}", transport.local_addr());
    let late_ready = Box::new(|| println!("{}", conformance::LATE_READY));
    let label = format!("zmq -n {} {:?}", args.expect, args.policy);
    match conformance::run_ranks(transport, args.expect, args.policy, &label, late_ready) {
        Ok(passed) => {
            if id as usize == conformance::REPORTER {
                println!("zmq: {passed} passed, 0 failed");
            }
            ExitCode::SUCCESS
        }
        // The failure is printed and the others were told; exit as a crash would.
        Err(_) => std::process::exit(1),
    }
}
