//! Runs the built `demo` binary the way a user would.

use std::process::{Command, Output};

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
fn trace_file_holds_json_lines_of_protocol_messages() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("demo-trace.jsonl");
    assert_coherent(&["--nodes", "2", "--trace", path.to_str().unwrap()]);
    let trace = std::fs::read_to_string(&path).unwrap();
    assert!(!trace.is_empty());
    for line in trace.lines() {
        assert!(line.starts_with('{') && line.ends_with('}'), "{line}");
    }
    assert!(
        trace.contains(r#""message":"send""#),
        "no protocol message in the trace"
    );
}
