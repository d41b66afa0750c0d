//! One node process of the real-process fault matrix (`fault_matrix` starts 3 or 5 of them).
//!
//! ```text
//! fault_node --listen ADDR [--join ADDR]... --cluster ID [--secret S]
//!            [--lost-after-ms N] [--lease-ms N] [--timeout-ms N]
//! ```
//!
//! Without `--join` it founds the cluster; with it, it joins through the first address. It
//! opens the `i64` counter `n` and prints `ready ID`. Commands on stdin then drive it:
//! - `go`: update (increment) and read the counter in turn, as fast as it can, printing one
//!   line per operation ([`tests::counter_history::Op`]'s format, times on the machine's
//!   monotonic clock) and `writing V` from inside each update's function (so a launcher can
//!   kill it in the middle of a write). When the node finds itself cut off or removed
//!   (`Error::CutOff`, `Error::Removed`) it prints `out ERROR`, shuts that node down and joins
//!   again as a new node through any `--join` address, or any other node's address given with
//!   `--peer`, printing `joined ID`; then it goes on.
//! - `die-writing`: the next update, once its function ran, SIGKILLs this process a random
//!   0-40 µs later, while its write travels to the others (a crash in the middle of a write).
//! - `stop`: ends the loop (after the operation under way) and prints `stopped`.
//! - `final`: reads the counter and prints `final V` (`final none ERROR` if it cannot).
//! - `leave`: shuts the node down, prints `left`, and exits 0.
//!
//! When stdin ends (the launcher is gone) it exits at once.

use std::io::{BufRead, Write};
use std::process::ExitCode;
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::Duration;

use coherence_core::{Config, DistObj, Error, Node};
use rand::Rng;
use tests::counter_history::{now_ns, Ending, Kind, Op};
use transport_zmq::{ZmqConfig, ZmqTransport};

const USAGE: &str = "usage: fault_node --listen ADDR [--join ADDR]... [--peer ADDR]... \
                     --cluster ID [--secret S] [--lost-after-ms N] [--lease-ms N] [--timeout-ms N]";

/// The counter's name.
const COUNTER: &str = "n";

struct Args {
    listen: String,
    /// Addresses to join through at start.
    join: Vec<String>,
    /// Every other node's address: where to join again after being cut off.
    peers: Vec<String>,
    cluster: String,
    secret: Option<Vec<u8>>,
    lost_after: Duration,
    lease: Duration,
    timeout: Duration,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        listen: String::new(),
        join: Vec::new(),
        peers: Vec::new(),
        cluster: String::new(),
        secret: None,
        lost_after: Duration::from_millis(1500),
        lease: Duration::from_millis(1000),
        timeout: Duration::from_secs(3),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let millis = |v: String| {
            v.parse::<u64>()
                .map(Duration::from_millis)
                .map_err(|_| format!("{flag} takes whole milliseconds, got {v:?}"))
        };
        match flag.as_str() {
            "--listen" => args.listen = value()?,
            "--join" => args.join.push(value()?),
            "--peer" => args.peers.push(value()?),
            "--cluster" => args.cluster = value()?,
            "--secret" => args.secret = Some(value()?.into_bytes()),
            "--lost-after-ms" => args.lost_after = millis(value()?)?,
            "--lease-ms" => args.lease = millis(value()?)?,
            "--timeout-ms" => args.timeout = millis(value()?)?,
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if args.listen.is_empty() || args.cluster.is_empty() {
        return Err("--listen and --cluster are required".into());
    }
    Ok(args)
}

/// Prints one line and flushes it: the launcher reads lines as they come.
fn say(line: impl std::fmt::Display) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// A node of the cluster, joined through `join` (founding it when `None`), with the counter
/// open.
fn start(args: &Args, join: Option<&str>) -> Result<(Node, DistObj<i64>), String> {
    let transport = ZmqTransport::start(ZmqConfig {
        join: join.map(str::to_string),
        secret: args.secret.clone(),
        lost_after: args.lost_after,
        heartbeat: args.lost_after / 15,
        join_timeout: Duration::from_secs(2),
        ..ZmqConfig::new(args.listen.clone(), args.cluster.clone())
    })
    .map_err(|e| format!("cannot start the transport (join {join:?}): {e}"))?;
    let config = Config::default().timeout(args.timeout).lease(args.lease);
    let node = Node::start(transport, config).map_err(|e| format!("cannot start: {e}"))?;
    match node.object(COUNTER, 0i64) {
        Ok(counter) => Ok((node, counter)),
        Err(e) => {
            let _ = node.shutdown();
            Err(format!("cannot open {COUNTER:?}: {e}"))
        }
    }
}

/// Whether an update that failed with `e` certainly had no effect.
fn had_no_effect(e: &Error) -> bool {
    matches!(e, Error::Interrupted { .. } | Error::NoMajority { .. })
}

/// Whether `e` says this node is out of the cluster for good.
fn is_out(e: &Error) -> bool {
    matches!(
        e,
        Error::CutOff(_) | Error::Removed(_) | Error::Transport { .. }
    )
}

/// Arms a kernel timer that delivers SIGKILL to this process after `after`: it lands
/// wherever the process then is, whichever of its threads the scheduler runs.
fn kill_self_after(after: Duration) {
    // SAFETY: plain libc calls on zeroed C structs the calls fill in or read.
    unsafe {
        let mut event: libc::sigevent = std::mem::zeroed();
        event.sigev_notify = libc::SIGEV_SIGNAL;
        event.sigev_signo = libc::SIGKILL;
        let mut timer: libc::timer_t = std::mem::zeroed();
        if libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer) != 0 {
            eprintln!(
                "fault_node: timer_create failed: {}",
                std::io::Error::last_os_error()
            );
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        let mut spec: libc::itimerspec = std::mem::zeroed();
        spec.it_value.tv_nsec = after.as_nanos().max(1) as libc::c_long;
        if libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) != 0 {
            eprintln!(
                "fault_node: timer_settime failed: {}",
                std::io::Error::last_os_error()
            );
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// One update, logged; returns the error if it failed. With `die`, the process kills itself
/// while the update's write is under way.
fn update(process: &str, counter: &DistObj<i64>, die: bool) -> Option<Error> {
    let mut attempted = None;
    let start = now_ns();
    let result = counter.update(|v| {
        *v += 1;
        attempted = Some(*v);
        say(format_args!("writing {v}"));
        if die {
            kill_self_after(Duration::from_micros(rand::thread_rng().gen_range(0..40)));
        }
        *v
    });
    let end = now_ns();
    let (ending, error) = match result {
        Ok(v) => (Ending::Ok(v), None),
        Err(e) if had_no_effect(&e) => (Ending::NoEffect(e.to_string()), Some(e)),
        Err(e) => (
            Ending::Unknown {
                attempted,
                error: e.to_string(),
            },
            Some(e),
        ),
    };
    let op = Op {
        process: process.to_string(),
        kind: Kind::Update,
        start,
        end,
        ending,
    };
    say(op);
    error
}

/// One read, logged; returns the error if it failed.
fn read(process: &str, counter: &DistObj<i64>) -> Option<Error> {
    let start = now_ns();
    let result = counter.read();
    let end = now_ns();
    let (ending, error) = match result {
        Ok(v) => (Ending::Ok(*v), None),
        Err(e) => (Ending::NoEffect(e.to_string()), Some(e)),
    };
    let op = Op {
        process: process.to_string(),
        kind: Kind::Read,
        start,
        end,
        ending,
    };
    say(op);
    error
}

/// What the launcher asked for.
#[derive(Debug, PartialEq, Eq)]
enum Command {
    Go,
    DieWriting,
    Stop,
    Final,
    Leave,
}

fn commands() -> Receiver<Command> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            let command = match line.trim() {
                "go" => Command::Go,
                "die-writing" => Command::DieWriting,
                "stop" => Command::Stop,
                "final" => Command::Final,
                "leave" => Command::Leave,
                other => {
                    eprintln!("fault_node: unknown command {other:?}");
                    continue;
                }
            };
            if tx.send(command).is_err() {
                return;
            }
        }
        // The launcher is gone: so are we, without a goodbye.
        std::process::exit(0);
    });
    rx
}

/// Waits for `wanted`; anything else first is a protocol error of the launcher.
fn expect(commands: &Receiver<Command>, wanted: Command) -> Result<(), String> {
    match commands.recv() {
        Ok(c) if c == wanted => Ok(()),
        Ok(c) => Err(format!("expected {wanted:?}, got {c:?}")),
        Err(_) => Err("stdin closed".into()),
    }
}

/// Joins again as a new node through the other nodes' addresses in turn, until one takes
/// it in or the launcher says stop (then `None`).
fn rejoin(args: &Args, commands: &Receiver<Command>) -> Option<(Node, DistObj<i64>)> {
    let mut attempt = 0usize;
    loop {
        match commands.try_recv() {
            Ok(Command::Stop) => return None,
            Ok(other) => eprintln!("fault_node: {other:?} while joining again, ignored"),
            Err(TryRecvError::Empty) => {}
            Err(TryRecvError::Disconnected) => return None,
        }
        let through = &args.peers[attempt % args.peers.len()];
        attempt += 1;
        match start(args, Some(through)) {
            Ok(joined) => return Some(joined),
            Err(e) => {
                eprintln!("fault_node: joining again through {through}: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

fn run(args: Args) -> Result<(), String> {
    let commands = commands();
    let mut joined = Some(start(&args, args.join.first().map(String::as_str))?);
    if let Some((node, _)) = &joined {
        say(format_args!("ready {}", node.id()));
    }
    expect(&commands, Command::Go)?;
    while let Some((node, counter)) = &joined {
        let mut die = false;
        match commands.try_recv() {
            Ok(Command::Stop) | Err(TryRecvError::Disconnected) => break,
            Ok(Command::DieWriting) => die = true,
            Ok(other) => return Err(format!("{other:?} while running")),
            Err(TryRecvError::Empty) => {}
        }
        let process = format!("n{}", node.id());
        let error = update(&process, counter, die).or_else(|| read(&process, counter));
        let Some(error) = error.filter(is_out) else {
            continue;
        };
        say(format_args!("out {error}"));
        let (node, counter) = joined.take().expect("joined");
        drop(counter);
        // Out already: its shutdown has nothing to hand on.
        if let Err(e) = node.shutdown() {
            eprintln!("fault_node: shutting the old node down: {e}");
        }
        if args.peers.is_empty() {
            return Err("cut off, and no --peer to join again through".into());
        }
        joined = rejoin(&args, &commands);
        match &joined {
            Some((node, _)) => say(format_args!("joined {}", node.id())),
            None => break,
        }
    }
    say("stopped");
    expect(&commands, Command::Final)?;
    match &joined {
        Some((_, counter)) => match counter.read() {
            Ok(v) => say(format_args!("final {v}")),
            Err(e) => say(format_args!("final none {e}")),
        },
        None => say("final none not joined again"),
    }
    expect(&commands, Command::Leave)?;
    if let Some((node, counter)) = joined {
        drop(counter);
        let id = node.id();
        node.shutdown()
            .map_err(|e| format!("node {id} cannot leave: {e}"))?;
    }
    say("left");
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fault_node: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fault_node: {e}");
            ExitCode::FAILURE
        }
    }
}
