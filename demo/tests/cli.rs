//! Runs the built `demo` binary the way a user would, including its ZeroMQ modes: node
//! processes on 127.0.0.1, each bounded in time and killed when a test fails.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;

fn demo(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("cannot run the demo binary")
}

/// Asserts the run exited with 0 and its last stdout line is the positive verdict.
fn assert_coherent(args: &[&str]) -> String {
    let output = demo(args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let context = format!("demo {args:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    assert_eq!(output.status.code(), Some(0), "{context}");
    assert_eq!(stdout.lines().last(), Some("coherent: yes"), "{context}");
    stdout
}

#[test]
fn default_run_is_coherent() {
    let stdout = assert_coherent(&[]);
    // Four nodes and the late joiner each report their shutdown.
    for node in 0..5 {
        assert!(
            stdout.contains(&format!("[node {node}] shut down")),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("[node 4] int: read 40 on open, not its init -1 (version 4)"),
        "{stdout}"
    );
}

#[test]
fn invalidate_policy_on_three_nodes_is_coherent() {
    let stdout = assert_coherent(&["--policy", "invalidate", "--nodes", "3"]);
    assert!(
        stdout.contains("[node 3] int: read 30 on open, not its init -1 (version 3)"),
        "{stdout}"
    );
}

#[test]
fn one_node_is_rejected_with_a_clear_error() {
    let output = demo(&["--nodes", "1"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(stderr.contains("--nodes"), "{stderr}");
    assert!(stderr.contains("at least 2 nodes"), "{stderr}");
    assert!(!stdout.contains("coherent:"), "{stdout}");
}

#[test]
fn trace_file_is_a_chrome_trace_of_operations_and_messages() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-trace.json");
    assert_coherent(&["--nodes", "2", "--trace", path.to_str().unwrap()]);
    let text = std::fs::read_to_string(&path).unwrap();
    let trace: Vec<Value> = serde_json::from_str(&text).expect("the trace is one JSON array");
    // Thread tracks are named by metadata events; the rest refer to them by id.
    let tracks: HashMap<u64, &str> = trace
        .iter()
        .filter(|e| e["ph"] == "M" && e["name"] == "thread_name")
        .map(|e| {
            (
                e["tid"].as_u64().unwrap(),
                e["args"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    let track = |e: &Value| tracks[&e["tid"].as_u64().unwrap()];
    // Nodes 0 and 1 take turns, node 2 joins late: each has operation slices on its track.
    for node in 0..3 {
        let name = format!("node-{node}");
        // The library's operation spans, not the scenario's calls around them.
        let on_track = |ph: &str| {
            let operation = |e: &&Value| e["ph"] == ph && e["args"]["operation"].is_string();
            trace
                .iter()
                .filter(operation)
                .filter(|e| track(e) == name)
                .count()
        };
        assert!(on_track("B") > 0, "no operation slice on {name}:\n{text}");
        assert_eq!(on_track("B"), on_track("E"), "unbalanced slices on {name}");
    }
    for (message, peer) in [("send", "to"), ("receive", "from")] {
        let events: Vec<&Value> = trace
            .iter()
            .filter(|e| e["ph"] == "i" && e["args"]["message"] == message)
            .collect();
        assert!(!events.is_empty(), "no {message} event:\n{text}");
        for event in events {
            let args = &event["args"];
            assert!(
                args["node"].is_string() && args[peer].is_string(),
                "{event}"
            );
            assert!(args["msg"].is_string(), "{event}");
            let name = event["name"].as_str().unwrap();
            assert!(name.starts_with(message) && name.contains(peer), "{event}");
        }
    }
}

/// A child process that is killed when dropped, so a failing test leaves nothing running.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a bounded run of the demo printed and how it ended.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    /// Everything, for assertion messages.
    fn context(&self) -> String {
        format!(
            "exit code {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn last_line(&self) -> Option<&str> {
        self.stdout.lines().last()
    }
}

/// Starts the demo with `args`, its output captured on threads (so a full pipe never blocks
/// it), and a receiver of its stdout lines as they come.
fn spawn_demo(args: &[&str]) -> (Reaped, Receiver<String>, JoinHandle<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("COHERENCE_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run the demo binary");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let stderr = thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    (Reaped(child), rx, stderr)
}

/// Waits (at most until `deadline`) for the demo to end; kills it and fails the test if it
/// does not.
fn finish(
    (mut child, lines, stderr): (Reaped, Receiver<String>, JoinHandle<String>),
    deadline: Instant,
) -> Run {
    let mut stdout = String::new();
    loop {
        while let Ok(line) = lines.try_recv() {
            stdout.push_str(&line);
            stdout.push('\n');
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            // The process is gone: its pipes close and the readers end.
            for line in lines.iter() {
                stdout.push_str(&line);
                stdout.push('\n');
            }
            let stderr = stderr.join().unwrap();
            return Run {
                code: status.code(),
                stdout,
                stderr,
            };
        }
        assert!(
            Instant::now() < deadline,
            "the demo still runs at its deadline\n--- stdout so far\n{stdout}"
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// The bound on every ZeroMQ run below: far above a normal run (well under a second) and
/// above the launcher's own deadline (10 times the 10 s timeout) only for the launcher test.
const ZMQ_LIMIT: Duration = Duration::from_secs(150);

#[test]
fn zmq_processes_with_a_late_joining_process_are_coherent() {
    let run = finish(
        spawn_demo(&["--transport", "zmq", "--nodes", "4"]),
        Instant::now() + ZMQ_LIMIT,
    );
    let context = run.context();
    assert_eq!(run.code, Some(0), "{context}");
    assert_eq!(run.last_line(), Some("coherent: yes"), "{context}");
    for node in 0..4 {
        assert!(
            run.stdout.contains(&format!(
                "[node {node}] int: read 40 after node 3's write (version 4)"
            )),
            "{context}"
        );
    }
    // Node 4 is the fifth process, started after the tests: it must see the current values.
    assert!(
        run.stdout
            .contains("[node 4] int: read 40 on open, not its init -1 (version 4)"),
        "{context}"
    );
    assert!(
        run.stdout.contains(
            "[node 4] dict: read {\"node0\": 100, \"node1\": 200, \"node2\": 300, \"node3\": 400} \
             on open, not its init {\"late\": -1} (version 4)"
        ),
        "{context}"
    );
    assert!(
        run.stderr
            .contains("[process 4 (late)] node 4 listening on"),
        "{context}"
    );
}

/// Reads the founder's first line, `node 0 listening on ADDR`, and returns ADDR.
fn founder_address(lines: &Receiver<String>) -> String {
    let line = lines
        .recv_timeout(Duration::from_secs(30))
        .expect("the founder prints its address");
    line.strip_prefix("node 0 listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_string()
}

#[test]
fn zmq_one_node_per_process_with_a_secret_is_coherent() {
    let secret = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-secret");
    std::fs::write(&secret, "not so secret\n").unwrap();
    let secret = secret.to_str().unwrap();
    let common = [
        "--transport",
        "zmq",
        "--expect",
        "3",
        "--secret-file",
        secret,
        "--cluster-id",
        "cli-test",
        "--listen",
        "tcp://127.0.0.1:0",
    ];
    let deadline = Instant::now() + ZMQ_LIMIT;
    let founder = spawn_demo(&common);
    let addr = founder_address(&founder.1);
    let joiners: Vec<_> = (0..2)
        .map(|_| spawn_demo(&[&common[..], &["--join", &addr]].concat()))
        .collect();
    let founder = finish(founder, deadline);
    let joiners: Vec<Run> = joiners.into_iter().map(|j| finish(j, deadline)).collect();
    let context = founder.context();
    assert_eq!(founder.code, Some(0), "{context}");
    assert_eq!(founder.last_line(), Some("coherent: yes"), "{context}");
    // Nodes 0 and 1 take turns; node 2, the last admitted, opens late.
    assert!(
        founder
            .stdout
            .contains("[node 1] int: read 20 after node 1's write (version 2)"),
        "{context}"
    );
    assert!(
        founder
            .stdout
            .contains("[node 2] int: read 20 on open, not its init -1 (version 2)"),
        "{context}"
    );
    for joiner in &joiners {
        let context = joiner.context();
        assert_eq!(joiner.code, Some(0), "{context}");
        assert_eq!(joiner.last_line(), Some("coherent: yes"), "{context}");
    }
}

#[test]
fn zmq_node_with_a_wrong_secret_is_turned_away() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let (right, wrong) = (dir.join("demo-secret-right"), dir.join("demo-secret-wrong"));
    std::fs::write(&right, "right").unwrap();
    std::fs::write(&wrong, "wrong").unwrap();
    let common = [
        "--transport",
        "zmq",
        "--expect",
        "2",
        "--timeout-ms",
        "1000",
        "--listen",
        "tcp://127.0.0.1:0",
    ];
    let deadline = Instant::now() + ZMQ_LIMIT;
    let founder = spawn_demo(&[&common[..], &["--secret-file", right.to_str().unwrap()]].concat());
    let addr = founder_address(&founder.1);
    let intruder = spawn_demo(
        &[
            &common[..],
            &["--secret-file", wrong.to_str().unwrap(), "--join", &addr],
        ]
        .concat(),
    );
    let intruder = finish(intruder, deadline);
    let founder = finish(founder, deadline);
    let context = intruder.context();
    assert_eq!(intruder.code, Some(1), "{context}");
    assert!(
        intruder
            .last_line()
            .is_some_and(|l| l.starts_with("coherent: NO (ZeroMQ: no member addressed us")),
        "{context}"
    );
    let context = founder.context();
    assert_eq!(founder.code, Some(1), "{context}");
    assert_eq!(
        founder.last_line(),
        Some("coherent: NO (node 0: only 1 of 2 nodes arrived within 4s)"),
        "{context}"
    );
}

#[test]
fn zmq_flags_are_checked() {
    let output = demo(&["--listen", "tcp://127.0.0.1:0", "--expect", "2"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--listen needs --transport zmq"),
        "{stderr}"
    );

    let output = demo(&["--transport", "zmq", "--listen", "tcp://127.0.0.1:0"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--listen needs --expect"), "{stderr}");

    let output = demo(&["--transport", "zmq", "--secret-file", "/nonexistent/secret"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("cannot read the secret file"), "{stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).is_empty());
}
