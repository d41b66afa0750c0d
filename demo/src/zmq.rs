//! Runs the lab scenario over ZeroMQ, one node per OS process, in two ways.
//!
//! - **Launcher** ([`launch`], `demo --transport zmq --nodes N`): this process starts `N + 1`
//!   copies of itself on 127.0.0.1. The founder binds a free port and prints it; `N - 1`
//!   joiners join through it; the `N` of them take turns in the tests. Once they are done, the
//!   founder says so on its stdout and the launcher starts the last process, which joins the
//!   running cluster only then and must start from the current values: a real late process
//!   join. The launcher relays the founder's report, forwards everything else the children
//!   print to its stderr, and kills every child still running at its deadline.
//! - **One node per host** ([`run_node`] with [`Plan::Host`], `demo --transport zmq --listen
//!   ADDR [--join ADDR] --expect N`): this process is one node. Once `N` nodes are present,
//!   the last one admitted is the "new process" (it opens the objects only after the others
//!   have written them, as under MPI) and the others take turns.
//!
//! The nodes find out who takes part through a membership object (in the order they arrived),
//! then meet and collect their results as under MPI ([`crate::processes`]). Every wait for
//! another node is bounded, and a watchdog thread ends the process with a negative verdict if
//! a library call outlives its timeout, so no process hangs. Node 0, the founder, prints the report; every node process ends with the verdict
//! line and exits with it.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use coherence_core::{Config, DistObj, Node, NodeId, Transport};
use transport_zmq::{ZmqConfig, ZmqTransport};

use crate::lab::{Failure, Report};
use crate::processes::{Part, Process, Watch};

/// The membership object: the ids of the nodes taking part, in the order they registered.
const MEMBERS: &str = "demo/members";

/// What a node prints once it has bound its port: `node <id> listening on <addr>`.
const LISTENING: &str = " listening on ";
/// What the launcher's founder prints once every participant has reported.
const TESTS_DONE: &str = "zmq-launcher: tests done";
/// The start of the verdict line.
const VERDICT: &str = "coherent: ";

/// How long past its timeout a library call may run before the watchdog calls it hung: a
/// shutdown may wait a full timeout for acknowledgements, then for the transport's goodbye.
const GRACE: Duration = Duration::from_secs(5);
/// How often the launcher and the watchdog look at what they watch.
const POLL: Duration = Duration::from_millis(20);

/// What one node process does once its transport is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Started by hand with `--listen` and `--expect`: `expect` nodes gather; the last one
    /// admitted opens the objects late, the others take turns.
    Host {
        /// Nodes in the run, this one included.
        expect: usize,
    },
    /// A launcher's participant: `nodes` of them gather and take turns.
    Participant {
        /// Participants in the run.
        nodes: usize,
        /// The founder also tells the launcher (on stdout) when every participant reported.
        founder: bool,
    },
    /// A launcher's late joiner, started once the `nodes` participants have finished.
    Late {
        /// Participants in the run.
        nodes: usize,
    },
}

/// How to start one node process's transport, and what the node then does.
#[derive(Debug)]
pub struct NodeSpec {
    /// The ROUTER's address.
    pub listen: String,
    /// A member to join through; `None` founds the cluster.
    pub join: Option<String>,
    /// The cluster's name.
    pub cluster_id: String,
    /// The shared secret, if any.
    pub secret: Option<Vec<u8>>,
    /// Listen beyond loopback without a secret (`--insecure`).
    pub insecure: bool,
    /// This node's part.
    pub plan: Plan,
}

/// Runs one node process. Node 0 returns the whole report; any other node returns only the
/// verdict (no observations).
pub fn run_node(spec: &NodeSpec, config: &Config) -> Result<Report, Failure> {
    let zmq = ZmqConfig {
        join: spec.join.clone(),
        secret: spec.secret.clone(),
        insecure: spec.insecure,
        join_timeout: config.timeout,
        ..ZmqConfig::new(spec.listen.clone(), spec.cluster_id.clone())
    };
    let watchdog = Watchdog::start(config.timeout + zmq.lost_after + GRACE);
    let (id, outcome) = match run_parts(spec, zmq, config, &watchdog) {
        Ok(done) => done,
        Err(reason) => {
            return Err(Failure {
                observations: Vec::new(),
                reasons: vec![reason],
            })
        }
    };
    if id != 0 {
        return match outcome {
            Ok(_) => Ok(Report {
                observations: Vec::new(),
            }),
            Err(failure) => Err(Failure {
                observations: Vec::new(),
                reasons: failure.reasons,
            }),
        };
    }
    if let Plan::Host { expect } = spec.plan {
        println!(
            "coherence lab over ZeroMQ: {expect} nodes, the last to join opens the objects late, \
             {:?} policy, timeout {:?}",
            config.write_policy, config.timeout
        );
    }
    outcome
}

/// Starts the transport and the node, runs this node's part, reports it, waits for everyone
/// else's and shuts down. `Err` when the node could not get that far.
fn run_parts(
    spec: &NodeSpec,
    zmq: ZmqConfig,
    config: &Config,
    watchdog: &Watchdog,
) -> Result<(NodeId, Result<Report, Failure>), String> {
    let transport = watchdog
        .watch("start of the ZeroMQ transport", || ZmqTransport::start(zmq))
        .map_err(|e| format!("ZeroMQ: {e}"))?;
    let id = transport.local_id();
    println!("node {id}{LISTENING}{}", transport.local_addr());
    let node = watchdog
        .watch("node start", || Node::start(transport, config.clone()))
        .map_err(|e| format!("node {id}: start failed: {e}"))?;
    // Every wait for another node is bounded: a broken peer makes the verdict NO, not a hang.
    let patience = config.timeout * 4;

    let (part, takers, total) = match spec.plan {
        Plan::Host { expect } => {
            let group = gather(&node, expect, patience, watchdog)?;
            let late = group.iter().copied().max().unwrap_or(id);
            let takers: Vec<NodeId> = group.into_iter().filter(|&n| n != late).collect();
            let part = match takers.iter().position(|&n| n == id) {
                Some(rank) => Part::Taker { rank },
                None => Part::Late,
            };
            (part, takers.len(), expect)
        }
        Plan::Participant { nodes, .. } => {
            let group = gather(&node, nodes, patience, watchdog)?;
            let rank = group.iter().position(|&n| n == id).unwrap_or(0);
            (Part::Taker { rank }, nodes, nodes + 1)
        }
        Plan::Late { nodes } => (Part::Late, nodes, nodes + 1),
    };
    let process = Process::open(&node, takers, patience, watchdog)?;
    process.play(&node, part)?;
    if matches!(spec.plan, Plan::Participant { founder: true, .. }) {
        // Every participant has reported (or gave up waiting): the late joiner's turn.
        let _ = process.wait_for_results(takers);
        println!("{TESTS_DONE}");
    }
    Ok((id, process.verdict(node, total)))
}

/// Registers this node in the membership object and waits until `size` nodes have, for at
/// most `patience`. Returns the ids of the first `size` nodes that registered, sorted. A node
/// that comes after them is turned away with an error.
fn gather(
    node: &Node,
    size: usize,
    patience: Duration,
    watchdog: &Watchdog,
) -> Result<Vec<NodeId>, String> {
    let me = node.id();
    let failed = |e| format!("node {me}: membership: {e}");
    let members: DistObj<Vec<NodeId>> = watchdog
        .watch("open of the membership", || {
            node.object(MEMBERS, Vec::new())
        })
        .map_err(failed)?;
    let admitted = watchdog
        .watch("registration", || {
            members.update(|m| {
                if m.len() < size && !m.contains(&me) {
                    m.push(me);
                }
                m.contains(&me)
            })
        })
        .map_err(failed)?;
    if !admitted {
        return Err(format!(
            "node {me}: the run already has its {size} nodes; this one is not needed"
        ));
    }
    let deadline = Instant::now() + patience;
    loop {
        let seen = watchdog
            .watch("read of the membership", || members.read())
            .map_err(failed)?;
        if seen.len() >= size {
            let mut group = (*seen).clone();
            group.sort_unstable();
            return Ok(group);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "node {me}: only {} of {size} nodes arrived within {patience:?}",
                seen.len()
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Ends the process with a negative verdict when a library call outlives its limit: every
/// call must return within the configured timeout, so one that does not is a hang.
struct Watchdog {
    /// The call in progress, if any, and since when.
    call: Arc<Mutex<Option<(String, Instant)>>>,
}

impl Watchdog {
    /// Starts the watching thread; calls may run up to `limit`.
    fn start(limit: Duration) -> Watchdog {
        let call: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
        let watched = Arc::clone(&call);
        let spawned = thread::Builder::new()
            .name("watchdog".to_string())
            .spawn(move || loop {
                thread::sleep(POLL);
                if let Some((what, since)) = &*lock(&watched) {
                    if since.elapsed() > limit {
                        let _ = writeln!(
                            std::io::stdout(),
                            "{VERDICT}NO ({what} still running after {:.1?}, past the timeout; \
                             the library hangs)",
                            since.elapsed()
                        );
                        crate::exit(1);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the watchdog; library calls are unwatched");
        }
        Watchdog { call }
    }
}

impl Watch for Watchdog {
    /// Runs `call`, described by `what`, under watch.
    fn watch<R>(&self, what: &str, call: impl FnOnce() -> R) -> R {
        *lock(&self.call) = Some((what.to_string(), Instant::now()));
        let result = call();
        *lock(&self.call) = None;
        result
    }
}

/// Ends this process when its stdin reaches end of file: a launcher's child keeps a pipe
/// from the launcher open, so this is how it notices that the launcher is gone.
pub fn exit_when_launcher_is_gone() {
    let spawned = thread::Builder::new()
        .name("launcher-watch".to_string())
        .spawn(|| {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            // Not eprintln!: with the launcher gone, stderr is a broken pipe and it would panic.
            let _ = writeln!(std::io::stderr(), "the launcher is gone; stopping");
            crate::exit(1);
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch for the launcher's end");
    }
}

/// What the launcher needs to start its children.
#[derive(Debug)]
pub struct Launch {
    /// Participants; one more process joins late.
    pub nodes: usize,
    /// Flags every child gets: policy, timeout, cluster id, secret file, verbosity.
    pub common: Vec<OsString>,
    /// Child `k` writes its trace to this path with `.k` appended.
    pub trace: Option<PathBuf>,
    /// When every child must have exited; later ones are killed.
    pub deadline: Duration,
}

/// What a process started by the launcher is (its hidden `--zmq-role` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// Founds the cluster, takes turns, tells the launcher when the tests are done.
    Founder,
    /// Joins at the start and takes turns.
    Joiner,
    /// Joins once the tests are done.
    Late,
}

impl Role {
    /// The flag's value for this role.
    fn flag(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// One child process of the launcher.
struct Proc {
    name: String,
    child: Child,
    status: Option<ExitStatus>,
}

/// A line a child printed: (child index, from stdout, the line).
type Line = (usize, bool, String);

/// The launcher's children; any still running when this is dropped are killed.
struct Procs {
    procs: Vec<Proc>,
    readers: Vec<thread::JoinHandle<()>>,
    lines: mpsc::Sender<Line>,
}

impl Procs {
    /// Starts child `k` with `role`, joining through `join`, and relays its output as lines.
    fn spawn(&mut self, spec: &Launch, role: Role, join: Option<&str>) -> Result<(), String> {
        let k = self.procs.len();
        let name = format!("process {k} ({})", role.flag());
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this program to start {name}: {e}"))?;
        let mut command = Command::new(exe);
        command
            .args(&spec.common)
            .args(["--transport", "zmq", "--zmq-role", &role.flag()])
            .args(["--nodes", &spec.nodes.to_string()])
            .args(["--listen", "tcp://127.0.0.1:0"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(join) = join {
            command.args(["--join", join]);
        }
        if let Some(trace) = &spec.trace {
            let mut path = trace.clone().into_os_string();
            path.push(format!(".{k}"));
            command.arg("--trace").arg(path);
        }
        let mut child = command
            .spawn()
            .map_err(|e| format!("cannot start {name}: {e}"))?;
        let outputs = [
            child
                .stdout
                .take()
                .map(|s| (Box::new(s) as Box<dyn Read + Send>, true)),
            child
                .stderr
                .take()
                .map(|s| (Box::new(s) as Box<dyn Read + Send>, false)),
        ];
        for (stream, is_stdout) in outputs.into_iter().flatten() {
            let lines = self.lines.clone();
            let reader = thread::Builder::new()
                .name(format!("relay-{k}"))
                .spawn(move || relay(stream, k, is_stdout, &lines))
                .map_err(|e| format!("cannot relay the output of {name}: {e}"))?;
            self.readers.push(reader);
        }
        self.procs.push(Proc {
            name,
            child,
            status: None,
        });
        Ok(())
    }

    /// Notes which children have exited; true when all have.
    fn all_exited(&mut self) -> bool {
        for proc in &mut self.procs {
            if proc.status.is_none() {
                proc.status = proc.child.try_wait().ok().flatten();
            }
        }
        self.procs.iter().all(|p| p.status.is_some())
    }

    /// Kills every child still running; returns their names.
    fn kill_running(&mut self) -> Vec<String> {
        let mut killed = Vec::new();
        for proc in &mut self.procs {
            if proc.status.is_none() {
                let _ = proc.child.kill();
                proc.status = proc.child.wait().ok();
                killed.push(proc.name.clone());
            }
        }
        killed
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_running();
    }
}

/// Sends every line of `stream` to `lines` until end of file.
fn relay(stream: Box<dyn Read + Send>, k: usize, is_stdout: bool, lines: &mpsc::Sender<Line>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let line = String::from_utf8_lossy(&buf).trim_end().to_string();
                if lines.send((k, is_stdout, line)).is_err() {
                    return;
                }
            }
        }
    }
}

/// Runs the whole scenario as `spec.nodes + 1` processes on 127.0.0.1 (see the module docs).
/// Prints the founder's report as it arrives; returns the verdict (with no observations,
/// which are printed already).
pub fn launch(spec: &Launch) -> Result<Report, Failure> {
    let (tx, rx) = mpsc::channel();
    let mut procs = Procs {
        procs: Vec::new(),
        readers: Vec::new(),
        lines: tx,
    };
    let mut reasons = Vec::new();
    let deadline = Instant::now() + spec.deadline;
    let mut founder_addr: Option<String> = None;
    let mut late_started = false;
    let mut founder_verdict: Option<String> = None;
    let mut failed_to_start = false;

    if let Err(e) = procs.spawn(spec, Role::Founder, None) {
        reasons.push(e);
        failed_to_start = true;
    }
    while !failed_to_start {
        if let Ok((k, is_stdout, line)) = rx.recv_timeout(POLL) {
            if k != 0 || !is_stdout {
                eprintln!("[{}] {line}", procs.procs[k].name);
            } else if founder_addr.is_none() && line.contains(LISTENING) {
                let addr = line
                    .split_once(LISTENING)
                    .map_or("", |(_, a)| a)
                    .to_string();
                for _ in 1..spec.nodes {
                    if let Err(e) = procs.spawn(spec, Role::Joiner, Some(&addr)) {
                        reasons.push(e);
                        failed_to_start = true;
                        break;
                    }
                }
                founder_addr = Some(addr);
            } else if line == TESTS_DONE {
                if let Err(e) = procs.spawn(spec, Role::Late, founder_addr.as_deref()) {
                    reasons.push(e);
                    failed_to_start = true;
                }
                late_started = true;
            } else if let Some(verdict) = line.strip_prefix(VERDICT) {
                founder_verdict = Some(verdict.to_string());
            } else {
                println!("{line}");
            }
        }
        // The late joiner comes only after the founder's word; without the founder, never.
        if procs.all_exited() {
            break;
        }
        if Instant::now() > deadline {
            for name in procs.kill_running() {
                reasons.push(format!(
                    "{name} was still running after {:?}; killed",
                    spec.deadline
                ));
            }
            break;
        }
    }
    for name in procs.kill_running() {
        reasons.push(format!("{name} was killed after a start-up failure"));
    }
    // The children are gone: their output ends, so the relays do too.
    for reader in std::mem::take(&mut procs.readers) {
        let _ = reader.join();
    }
    for (k, is_stdout, line) in rx.try_iter() {
        if k != 0 || !is_stdout {
            eprintln!("[{}] {line}", procs.procs[k].name);
        } else if let Some(verdict) = line.strip_prefix(VERDICT) {
            founder_verdict = Some(verdict.to_string());
        } else if line != TESTS_DONE && !line.contains(LISTENING) {
            println!("{line}");
        }
    }

    match founder_verdict.as_deref() {
        Some("yes") => {}
        Some(no) => reasons.insert(
            0,
            no.strip_prefix("NO (")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or(no)
                .to_string(),
        ),
        None => reasons.push("the founder printed no verdict".to_string()),
    }
    if !late_started && !failed_to_start {
        reasons.push(
            "the late joiner was never started: the founder did not report the end of the tests"
                .to_string(),
        );
    }
    for proc in &procs.procs {
        match proc.status {
            Some(status) if status.success() => {}
            Some(status) => reasons.push(format!("{} ended with {status}", proc.name)),
            None => reasons.push(format!("{} did not end", proc.name)),
        }
    }
    if reasons.is_empty() {
        Ok(Report {
            observations: Vec::new(),
        })
    } else {
        Err(Failure {
            observations: Vec::new(),
            reasons,
        })
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section here leaves its data consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
