//! The conformance suite over ZeroMQ with one node per OS process on 127.0.0.1: 2, 3 and 4
//! `zmq_conformance` processes (the scenarios of `tests::conformance` that process clusters
//! run, the same code the MPI suite and the thread clusters run) under both write policies,
//! each run a test of its own.
//!
//! The launcher starts the founder, then each joiner only once the previous one printed its
//! id, so ids (= ranks) come out 0..n in start order; the last process starts only when rank 0
//! says the others have written (`conformance::LATE_READY`), so it really joins a running cluster
//! and must start from the current values. A run fails, and every child is killed, as soon as
//! a child exits unsuccessfully, prints something unexpected where an id was due, or the run
//! outlives [`DEADLINE`]; the failure message carries every child's stdout and stderr. Runs
//! never overlap (they would compete for the cores and the timing checks).
//!
//! Time: 4 to 8 s per run on 2 cores in the test profile, about 30 s for the six runs.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tests::conformance::{Kind, Scenario, LATE_READY, REPORTER, SCENARIOS};

/// Longest one run may take, start-up included: every library call is bounded by 20 s and
/// every wait for another rank by 60 s, so a run that takes this long is broken.
const DEADLINE: Duration = Duration::from_secs(150);
/// Longest the launcher waits for a child to print its id, or for rank 0's go-ahead.
const START_WAIT: Duration = Duration::from_secs(60);

/// What a child prints once its transport is up: `node ID listening on ADDR`.
const LISTENING: &str = " listening on ";

/// Runs never overlap.
static SERIAL: Mutex<()> = Mutex::new(());

/// One child process: killed and reaped when dropped, so a failing run leaves nothing behind.
struct Proc {
    child: Child,
    /// Held open so the child (started with `--watch-stdin`) notices when we are gone.
    _stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The children of one run and the lines they print.
struct Run {
    n: usize,
    policy: &'static str,
    children: Vec<Proc>,
    began: Instant,
}

impl Run {
    fn new(n: usize, policy: &'static str) -> Run {
        Run {
            n,
            policy,
            children: Vec::new(),
            began: Instant::now(),
        }
    }

    /// Starts child `k`, joining through `join` unless it founds the cluster.
    fn spawn(&mut self, join: Option<&str>) {
        let k = self.children.len();
        let cluster = format!(
            "zmq-process-{}-{}-{}",
            std::process::id(),
            self.n,
            self.policy
        );
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_zmq_conformance"));
        cmd.args(["--expect", &self.n.to_string()])
            .args(["--policy", self.policy])
            .args(["--cluster-id", &cluster])
            .args(["--listen", "tcp://127.0.0.1:0"])
            .arg("--watch-stdin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(addr) = join {
            cmd.args(["--join", addr]);
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            self.fail(&format!("cannot start zmq_conformance {k}: {e}"));
        });
        let stdin = child.stdin.take();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let kept = Arc::clone(&stdout);
        let out_reader = thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lock(&kept).push(line);
            }
        });
        let kept = Arc::clone(&stderr);
        let err_reader = thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(err).read_to_string(&mut text);
            lock(&kept).push_str(&text);
        });
        self.children.push(Proc {
            child,
            _stdin: stdin,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        });
    }

    /// Waits for `expected` from child `k` on stdout, returning the line; fails the run if a
    /// child exits unsuccessfully or nothing comes within [`START_WAIT`].
    fn wait_for(&mut self, k: usize, expected: impl Fn(&str) -> bool, what: &str) -> String {
        let deadline = Instant::now() + START_WAIT;
        loop {
            let found = lock(&self.children[k].stdout)
                .iter()
                .find(|l| expected(l))
                .cloned();
            if let Some(line) = found {
                return line;
            }
            self.check_exits();
            if Instant::now() > deadline {
                self.fail(&format!(
                    "child {k} did not print {what} within {START_WAIT:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until child `k` printed its id and address; fails the run unless the id is `k`.
    /// Returns the address.
    fn wait_for_id(&mut self, k: usize) -> String {
        let line = self.wait_for(k, |l| l.contains(LISTENING), "its id");
        let parsed = line
            .strip_prefix("node ")
            .and_then(|rest| rest.split_once(LISTENING))
            .and_then(|(id, addr)| Some((id.parse::<usize>().ok()?, addr.to_string())));
        match parsed {
            Some((id, addr)) if id == k => addr,
            _ => self.fail(&format!("child {k} printed {line:?}, expected node {k}")),
        }
    }

    /// Fails the run if a child exited unsuccessfully.
    fn check_exits(&mut self) {
        for k in 0..self.children.len() {
            if let Ok(Some(status)) = self.children[k].child.try_wait() {
                if !status.success() {
                    self.fail(&format!("child {k} (rank {k}) exited with {status}"));
                }
            }
        }
    }

    /// Waits until every child exited successfully, for at most [`DEADLINE`] since the start.
    fn wait_all(&mut self) {
        loop {
            self.check_exits();
            let mut running = 0;
            for c in &mut self.children {
                if matches!(c.child.try_wait(), Ok(None)) {
                    running += 1;
                }
            }
            if running == 0 {
                break;
            }
            if self.began.elapsed() > DEADLINE {
                self.fail(&format!(
                    "{running} children still running after {DEADLINE:?}"
                ));
            }
            thread::sleep(Duration::from_millis(20));
        }
        for c in &mut self.children {
            for reader in c.readers.drain(..) {
                let _ = reader.join();
            }
        }
    }

    /// Kills every child and panics with `why` and everything the children printed.
    fn fail(&mut self, why: &str) -> ! {
        for c in &mut self.children {
            let _ = c.child.kill();
            let _ = c.child.wait();
        }
        // The children are gone, so their pipes end and the readers finish.
        for c in &mut self.children {
            for reader in c.readers.drain(..) {
                let _ = reader.join();
            }
        }
        panic!(
            "zmq_conformance -n {} {}: {why} after {:.1?}\n{}",
            self.n,
            self.policy,
            self.began.elapsed(),
            self.output()
        );
    }

    /// Every child's stdout and stderr.
    fn output(&self) -> String {
        let mut text = String::new();
        for (k, c) in self.children.iter().enumerate() {
            text.push_str(&format!("--- child {k} stdout ---\n"));
            for line in lock(&c.stdout).iter() {
                text.push_str(line);
                text.push('\n');
            }
            text.push_str(&format!("--- child {k} stderr ---\n{}\n", lock(&c.stderr)));
        }
        text
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Launches `n` processes under `policy` and checks that every one passed every scenario.
fn run(n: usize, policy: &'static str) {
    let _serial = lock(&SERIAL);
    let mut run = Run::new(n, policy);
    run.spawn(None);
    let addr = run.wait_for_id(0);
    // One at a time: each joiner is admitted before the next starts, so its id is its index.
    for k in 1..n - 1 {
        run.spawn(Some(&addr));
        run.wait_for_id(k);
    }
    run.wait_for(0, |line| line == LATE_READY, LATE_READY);
    let late_after = run.began.elapsed();
    run.spawn(Some(&addr));
    run.wait_for_id(n - 1);
    run.wait_all();

    // Every process passed (exit 0); the reporter's lines name every scenario.
    let reporter = lock(&run.children[REPORTER].stdout).clone();
    let policy_name = if policy == "update" {
        "Update"
    } else {
        "Invalidate"
    };
    let label = format!("zmq -n {n} {policy_name}");
    let scenarios: Vec<&Scenario> = SCENARIOS
        .iter()
        .filter(|s| s.needs.is_none_or(|need| Kind::Processes.has(need)))
        .collect();
    for scenario in &scenarios {
        let prefix = format!("{label}: {} ... ok (", scenario.name);
        if !reporter.iter().any(|l| l.starts_with(&prefix)) {
            run.fail(&format!("the reporter did not print {prefix:?}"));
        }
    }
    let summary = format!("zmq: {} passed, 0 failed", scenarios.len());
    if reporter.last() != Some(&summary) {
        run.fail(&format!("the reporter's last line is not {summary:?}"));
    }
    eprintln!(
        "{label}: {} processes passed {} scenarios in {:.1?} (late joiner started after {:.1?})\n{}",
        n,
        scenarios.len(),
        run.began.elapsed(),
        late_after,
        reporter.join("\n")
    );
}

#[test]
fn two_processes_update() {
    run(2, "update");
}

#[test]
fn two_processes_invalidate() {
    run(2, "invalidate");
}

#[test]
fn three_processes_update() {
    run(3, "update");
}

#[test]
fn three_processes_invalidate() {
    run(3, "invalidate");
}

#[test]
fn four_processes_update() {
    run(4, "update");
}

#[test]
fn four_processes_invalidate() {
    run(4, "invalidate");
}
