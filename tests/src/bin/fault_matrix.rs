//! The real-process fault matrix: 3 and 5 `fault_node` processes over ZeroMQ update and read
//! one counter while one of them is killed (SIGKILL, in the middle of a write, node 0 or
//! another), stalled (SIGSTOP for 5 s or 20 s, then SIGCONT) or cut off with others (a
//! partition of one node, and of two out of five, for 5 s, then healed), and the counter's
//! history is checked ([`tests::counter_history::check`]): linearizable, no value returned
//! twice, no returned update lost, the final value read alike by every node. The stalled or
//! cut-off nodes must find themselves out, join again as new nodes and update again. For each
//! run it reports how long the cluster went without a completed update after the fault, and
//! fails if that exceeds twice the failure detection time (`lost_after`).
//!
//! ```text
//! fault_matrix [--net netns|loopback] [--only SUBSTRING] [--node PATH]
//! ```
//!
//! `--net netns` (the default as root) puts every process in a network namespace of its own,
//! joined by a bridge, as `.ci/netns-zmq.sh` does; a partition moves the cut-off nodes' links
//! to a second bridge, and the heal moves them back. `--net loopback` runs on 127.0.0.1 without
//! root, which cannot partition: it runs the kills and stalls only and says so. Exits 0 when
//! every run passed.

use std::collections::BTreeSet;
use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use rand::Rng;
use tests::counter_history::{check, now_ns, Ending, Kind, Op};
use tests::peer_process::{lines_of, signal};

/// Failure detection of every node (`ZmqConfig::lost_after`).
const LOST_AFTER: Duration = Duration::from_millis(1500);
/// Every node's lease: shorter than the detection, as the defaults are.
const LEASE: Duration = Duration::from_millis(1000);
/// Every node's operation timeout.
const TIMEOUT: Duration = Duration::from_secs(3);
/// How long the nodes run before the fault.
const BEFORE: Duration = Duration::from_secs(3);
/// How long a partition lasts.
const CUT: Duration = Duration::from_secs(5);
/// How long the nodes run after the fault ended (a stalled or cut-off node joins again).
const AFTER: Duration = Duration::from_secs(8);
/// Bound on every wait for a process's answer.
const ANSWER: Duration = Duration::from_secs(30);

const USAGE: &str = "usage: fault_matrix [--net netns|loopback] [--only SUBSTRING] [--node PATH]";

#[derive(Debug, Clone)]
enum Fault {
    /// SIGKILL `victim` as soon as it prints that it is writing.
    Kill { victim: usize },
    /// SIGSTOP `victim` for `secs`, then SIGCONT.
    Stop { victim: usize, secs: u64 },
    /// Cut `side` off from the others for [`CUT`], then heal.
    Cut { side: Vec<usize> },
}

#[derive(Debug, Clone)]
struct Scenario {
    name: String,
    nodes: usize,
    fault: Fault,
}

fn scenarios() -> Vec<Scenario> {
    let mut all = Vec::new();
    for nodes in [3, 5] {
        let mut add = |name: &str, fault: Fault| {
            all.push(Scenario {
                name: format!("{nodes} nodes: {name}"),
                nodes,
                fault,
            })
        };
        add("SIGKILL node 0 mid-write", Fault::Kill { victim: 0 });
        add(
            &format!("SIGKILL node {} mid-write", nodes - 1),
            Fault::Kill { victim: nodes - 1 },
        );
        add("SIGSTOP node 1 for 5 s", Fault::Stop { victim: 1, secs: 5 });
        add(
            "SIGSTOP node 1 for 20 s",
            Fault::Stop {
                victim: 1,
                secs: 20,
            },
        );
        add(
            &format!("partition of node {} for 5 s", nodes - 1),
            Fault::Cut {
                side: vec![nodes - 1],
            },
        );
        if nodes == 5 {
            add(
                "partition of nodes 0 and 4 for 5 s",
                Fault::Cut { side: vec![0, 4] },
            );
        }
    }
    all
}

/// Runs `program args`, failing with its output if it fails.
fn sh(program: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Where the processes run: loopback ports, or one network namespace each.
enum Net {
    Loopback { ports: Vec<u16> },
    Namespaces { tag: String, nodes: usize },
}

impl Net {
    fn loopback(nodes: usize) -> Result<Net, String> {
        // Free ports, picked by the kernel; closed again before the nodes bind them.
        let listeners: Vec<std::net::TcpListener> = (0..nodes)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot pick a port: {e}"))?;
        let ports = listeners
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("cannot pick a port: {e}"))?;
        Ok(Net::Loopback { ports })
    }

    /// A bridge `TAGb0` joining one namespace per node (`TAG-I`, address 10.78.0.I+1), and an
    /// empty bridge `TAGb1` for the side a partition cuts off.
    fn namespaces(nodes: usize) -> Result<Net, String> {
        let tag = format!("fm{}", std::process::id() % 100_000);
        let net = Net::Namespaces {
            tag: tag.clone(),
            nodes,
        };
        for bridge in ["b0", "b1"] {
            let name = format!("{tag}{bridge}");
            sh("ip", &["link", "add", &name, "type", "bridge"])?;
            sh("ip", &["link", "set", &name, "up"])?;
        }
        for i in 0..nodes {
            let ns = format!("{tag}-{i}");
            let (host, inner) = (format!("{tag}h{i}"), format!("{tag}n{i}"));
            sh("ip", &["netns", "add", &ns])?;
            sh(
                "ip",
                &["link", "add", &host, "type", "veth", "peer", "name", &inner],
            )?;
            sh(
                "ip",
                &["link", "set", &host, "master", &format!("{tag}b0"), "up"],
            )?;
            sh("ip", &["link", "set", &inner, "netns", &ns])?;
            sh("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            let addr = format!("10.78.0.{}/24", i + 1);
            sh("ip", &["-n", &ns, "addr", "add", &addr, "dev", &inner])?;
            sh("ip", &["-n", &ns, "link", "set", &inner, "up"])?;
        }
        Ok(net)
    }

    fn addr(&self, i: usize) -> String {
        match self {
            Net::Loopback { ports } => format!("tcp://127.0.0.1:{}", ports[i]),
            Net::Namespaces { .. } => format!("tcp://10.78.0.{}:7000", i + 1),
        }
    }

    /// The command that runs `program` as node `i`.
    fn command(&self, i: usize, program: &str) -> Command {
        match self {
            Net::Loopback { .. } => Command::new(program),
            Net::Namespaces { tag, .. } => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &format!("{tag}-{i}"), program]);
                c
            }
        }
    }

    /// Moves the links of `side` to bridge `TAGb{bridge}`: 1 cuts them off, 0 heals.
    fn attach(&self, side: &[usize], bridge: u8) -> Result<(), String> {
        let Net::Namespaces { tag, .. } = self else {
            return Err("a partition needs --net netns".into());
        };
        for i in side {
            let (host, to) = (format!("{tag}h{i}"), format!("{tag}b{bridge}"));
            sh("ip", &["link", "set", &host, "master", &to])?;
        }
        Ok(())
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        if let Net::Namespaces { tag, nodes } = self {
            for i in 0..*nodes {
                let _ = sh("ip", &["netns", "del", &format!("{tag}-{i}")]);
                let _ = sh("ip", &["link", "del", &format!("{tag}h{i}")]);
            }
            for bridge in ["b0", "b1"] {
                let _ = sh("ip", &["link", "del", &format!("{tag}{bridge}")]);
            }
        }
    }
}

/// One `fault_node` process and what it printed.
struct Process {
    index: usize,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    log: Vec<String>,
    killed: bool,
}

impl Process {
    fn start(
        net: &Net,
        node: &str,
        index: usize,
        nodes: usize,
        secret: &str,
    ) -> Result<Process, String> {
        let mut command = net.command(index, node);
        command.args(["--listen", &net.addr(index), "--cluster", "fault-matrix"]);
        command.args(["--secret", secret]);
        command.args(["--lost-after-ms", &LOST_AFTER.as_millis().to_string()]);
        command.args(["--lease-ms", &LEASE.as_millis().to_string()]);
        command.args(["--timeout-ms", &TIMEOUT.as_millis().to_string()]);
        if index > 0 {
            command.args(["--join", &net.addr(0)]);
        }
        for peer in (0..nodes).filter(|&p| p != index) {
            command.args(["--peer", &net.addr(peer)]);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start {node}: {e}"))?;
        Ok(Process {
            index,
            stdin: child.stdin.take(),
            lines: lines_of(child.stdout.take().expect("piped")),
            child,
            log: Vec::new(),
            killed: false,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn send(&mut self, command: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin closed")?;
        writeln!(stdin, "{command}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("process {}: cannot send {command:?}: {e}", self.index))
    }

    /// Takes what it printed so far.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }

    /// Waits for a line starting with `prefix`, keeping every line; returns it.
    fn wait_for(&mut self, prefix: &str) -> Result<String, String> {
        let deadline = Instant::now() + ANSWER;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "process {} printed no {prefix:?} within {ANSWER:?}",
                        self.index
                    ))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(format!(
                        "process {} ended before printing {prefix:?}",
                        self.index
                    ))
                }
            }
        }
    }

    /// Waits for it to die of SIGKILL (it kills itself while writing).
    fn reap(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + ANSWER;
        loop {
            self.drain();
            match self.child.try_wait() {
                Ok(Some(status)) if status.signal() == Some(libc::SIGKILL) => break,
                Ok(Some(status)) => {
                    return Err(format!("process {} ended with {status}", self.index))
                }
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(1)),
                Ok(None) => return Err(format!("process {} is still alive", self.index)),
                Err(e) => return Err(format!("process {}: {e}", self.index)),
            }
        }
        self.killed = true;
        // What it printed before it died.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(1)) {
            self.log.push(line);
        }
        Ok(())
    }

    /// Its operations; for a killed process, an update it was writing when it died counts
    /// as one of unknown outcome.
    fn ops(&self) -> Vec<Op> {
        let label = format!("p{}", self.index);
        let mut ops = Vec::new();
        let mut writing: Option<i64> = None;
        let mut last_end = 0;
        for line in &self.log {
            if let Some(v) = line.strip_prefix("writing ") {
                writing = v.trim().parse().ok();
            } else if let Some(op) = Op::parse(&label, line) {
                if op.kind == Kind::Update {
                    writing = None;
                }
                last_end = op.end;
                ops.push(op);
            }
        }
        if let (true, Some(v)) = (self.killed, writing) {
            ops.push(Op {
                process: label,
                kind: Kind::Update,
                start: last_end,
                end: u64::MAX,
                ending: Ending::Unknown {
                    attempted: Some(v),
                    error: "killed while writing".into(),
                },
            });
        }
        ops
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What one run measured.
struct Outcome {
    summary: String,
    /// The longest time without a completed update after the fault.
    gap: Duration,
}

fn run(scenario: &Scenario, node: &str, use_netns: bool) -> Result<Outcome, String> {
    let net = if use_netns {
        Net::namespaces(scenario.nodes)?
    } else {
        Net::loopback(scenario.nodes)?
    };
    let secret: String = {
        let mut rng = rand::thread_rng();
        (0..32)
            .map(|_| format!("{:x}", rng.gen_range(0..16u8)))
            .collect()
    };
    let mut procs: Vec<Process> = Vec::new();
    for i in 0..scenario.nodes {
        let mut p = Process::start(&net, node, i, scenario.nodes, &secret)?;
        let ready = p.wait_for("ready ")?;
        if ready != format!("ready {i}") {
            return Err(format!("process {i} says {ready:?}, expected node id {i}"));
        }
        procs.push(p);
    }
    for p in &mut procs {
        p.send("go")?;
    }
    thread::sleep(BEFORE);
    for p in &mut procs {
        p.drain();
    }
    let fault_at = now_ns();
    let mut out_of_cluster: Vec<usize> = Vec::new();
    match &scenario.fault {
        Fault::Kill { victim } => {
            procs[*victim].send("die-writing")?;
            procs[*victim].reap()?;
        }
        Fault::Stop { victim, secs } => {
            let pid = procs[*victim].pid();
            signal(pid, "STOP")?;
            sleep_draining(&mut procs, Duration::from_secs(*secs));
            signal(pid, "CONT")?;
            out_of_cluster.push(*victim);
        }
        Fault::Cut { side } => {
            net.attach(side, 1)?;
            sleep_draining(&mut procs, CUT);
            net.attach(side, 0)?;
            out_of_cluster.extend(side);
        }
    }
    let healed_at = now_ns();
    sleep_draining(&mut procs, AFTER);
    let live: Vec<usize> = (0..procs.len()).filter(|&i| !procs[i].killed).collect();
    for &i in &live {
        procs[i].send("stop")?;
    }
    for &i in &live {
        procs[i].wait_for("stopped")?;
    }
    let mut finals = BTreeSet::new();
    for &i in &live {
        procs[i].send("final")?;
        let line = procs[i].wait_for("final ")?;
        let value = line["final ".len()..].trim();
        let value: i64 = value
            .parse()
            .map_err(|_| format!("process {i} could not read the final value: {line}"))?;
        finals.insert(value);
    }
    for &i in &live {
        procs[i].send("leave")?;
        procs[i].wait_for("left")?;
        let status = procs[i]
            .child
            .wait()
            .map_err(|e| format!("process {i}: {e}"))?;
        if !status.success() {
            return Err(format!("process {i} exited with {status}"));
        }
        procs[i].drain();
    }
    if finals.len() != 1 {
        return Err(format!(
            "the processes read different final values: {finals:?}"
        ));
    }
    let final_value = *finals.first().expect("one");

    let ops: Vec<Op> = procs.iter().flat_map(Process::ops).collect();
    let summary = check(&ops, final_value)?;

    // Every stalled or cut-off process found itself out, joined again and updated again.
    for &i in &out_of_cluster {
        let log = &procs[i].log;
        let joined = log.iter().position(|l| l.starts_with("joined "));
        let Some(joined) = joined else {
            return Err(format!(
                "process {i} was stalled or cut off but never joined again"
            ));
        };
        let updated = log[joined..]
            .iter()
            .filter_map(|l| Op::parse("", l))
            .any(|op| op.kind == Kind::Update && matches!(op.ending, Ending::Ok(_)));
        if !updated {
            return Err(format!("process {i} joined again but never updated after"));
        }
    }

    // The longest stretch without a completed update from the fault on.
    let mut ends: Vec<u64> = ops
        .iter()
        .filter(|op| op.kind == Kind::Update && matches!(op.ending, Ending::Ok(_)))
        .map(|op| op.end)
        .filter(|&end| end >= fault_at)
        .collect();
    ends.sort_unstable();
    let mut gap = 0u64;
    let mut previous = fault_at;
    for end in ends {
        gap = gap.max(end - previous);
        previous = end;
    }
    let gap = Duration::from_nanos(gap);
    if gap > 2 * LOST_AFTER {
        return Err(format!(
            "the cluster completed no update for {gap:?} after the fault, over twice the \
             failure detection ({LOST_AFTER:?})"
        ));
    }
    // How the victim of a kill died: while its update's write was under way (its function ran
    // and the update never returned), or just after one returned.
    let killed = match scenario.fault {
        Fault::Kill { victim } => {
            let mid = procs[victim]
                .ops()
                .last()
                .is_some_and(|op| op.end == u64::MAX);
            if mid {
                "; killed in the middle of a write"
            } else {
                "; killed just after a write returned"
            }
        }
        _ => "",
    };
    // What the stalled or cut-off processes completed while the fault lasted (all of it is in
    // the history checked above).
    let served = out_of_cluster
        .iter()
        .flat_map(|&i| procs[i].ops())
        .filter(|op| matches!(op.ending, Ending::Ok(_)))
        .filter(|op| op.end > fault_at && op.start < healed_at)
        .count();
    let served = if out_of_cluster.is_empty() {
        String::new()
    } else {
        format!("; {served} operations completed by the out-of-cluster side during the fault, then it rejoined")
    };
    Ok(Outcome {
        summary: format!(
            "final {final_value}: {} updates returned, {} of unknown outcome ({} took effect), \
             {} reads, {} refused; longest time without a completed update after the fault \
             {gap:.2?} ({:.2}x lost_after){killed}{served}",
            summary.ok_updates,
            summary.unknown_updates,
            summary.unknown_took_effect,
            summary.ok_reads,
            summary.no_effect,
            gap.as_secs_f64() / LOST_AFTER.as_secs_f64(),
        ),
        gap,
    })
}

/// Sleeps for `d`, taking what the processes print meanwhile.
fn sleep_draining(procs: &mut [Process], d: Duration) {
    let until = Instant::now() + d;
    while Instant::now() < until {
        thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
        for p in procs.iter_mut() {
            p.drain();
        }
    }
}

fn main() -> ExitCode {
    let mut net = None;
    let mut only = None;
    let mut node = None;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        match (flag.as_str(), value) {
            ("--net", Some(v)) if v == "netns" || v == "loopback" => net = Some(v == "netns"),
            ("--only", Some(v)) => only = Some(v),
            ("--node", Some(v)) => node = Some(v),
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let use_netns = net.unwrap_or(root);
    if use_netns && !root {
        eprintln!("fault_matrix: --net netns needs root (network namespaces)");
        return ExitCode::from(2);
    }
    let node = node.unwrap_or_else(|| {
        let me = std::env::current_exe().expect("own path");
        me.with_file_name("fault_node")
            .to_string_lossy()
            .into_owned()
    });
    let mut failed = 0;
    let mut ran = 0;
    let mut longest = Duration::ZERO;
    for scenario in scenarios() {
        if only
            .as_ref()
            .is_some_and(|o| !scenario.name.contains(o.as_str()))
        {
            continue;
        }
        if matches!(scenario.fault, Fault::Cut { .. }) && !use_netns {
            println!(
                "{}: not run (a partition needs --net netns, as root)",
                scenario.name
            );
            continue;
        }
        ran += 1;
        let began = Instant::now();
        match run(&scenario, &node, use_netns) {
            Ok(outcome) => {
                println!(
                    "{}: ok in {:.1?}: {}",
                    scenario.name,
                    began.elapsed(),
                    outcome.summary
                );
                longest = longest.max(outcome.gap);
            }
            Err(e) => {
                failed += 1;
                println!(
                    "{}: FAILED after {:.1?}: {e}",
                    scenario.name,
                    began.elapsed()
                );
            }
        }
    }
    println!(
        "fault matrix: {ran} runs, {failed} failed; the longest time without a completed update \
         after a fault was {longest:.2?} ({:.2}x the failure detection, lost_after {LOST_AFTER:?})",
        longest.as_secs_f64() / LOST_AFTER.as_secs_f64()
    );
    if failed == 0 && ran > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
