//! ZeroMQ between two OS processes, as the acceptance targets ask: this process starts a copy
//! of itself (the hidden `--zmq-peer-of ADDR`) and, in one run, measures the raw zmq.rs round
//! trip between the two (a ROUTER here, a DEALER there, no library) and the write and update
//! latency of a `Node` over `ZmqTransport` in each, with spread tokens, under both policies,
//! without and then with a shared secret (every frame sealed in a Noise session), so that the
//! cost of the sessions is measured in the same run. The floor is measured before, between and
//! after the two policies' writes, as the in-process floors are; the best pass counts.
//!
//! The second process serves commands on its DEALER: ping frames are echoed as they are;
//! `start`, `read`, `stop` are text and answered with `ok` or `error: ...`; `quit` ends it.
//! `start` names the secret, or `-` for none; it is made up per run and crosses loopback only.
//! Every wait is bounded. The second process is killed when the measurement fails or it does
//! not quit in time, and ends itself when its stdin (a pipe from this process) closes.

use std::io::Read;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use coherence_core::{DistObj, Node};
use serde_bytes::ByteBuf;
use tokio::runtime::Runtime;
use transport_zmq::{ZmqConfig, ZmqTransport};
use zeromq::{DealerSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::measure::{self, Payload};
use crate::report::{
    merge_round_trips, relate_to_floor, size_label, Latency, Op, Policy, RoundTrip,
    TransportReport, TwoProcesses, WriteLatency, SIZES,
};
use crate::{Budget, Plan, Progress};

/// The hidden flag (without its dashes) that makes the bench the second process.
pub const PEER_FLAG: &str = "zmq-peer-of";
/// Frame and value sizes: 8 B and 4 KiB.
const SIZES_2P: [usize; 2] = [SIZES[0], SIZES[1]];
/// First byte of a ping frame; commands are text and never start with it.
const PING: u8 = 0;
/// Longest wait for an echo or an answer: above `Config::timeout` (10 s), so a library call
/// that times out in the second process is reported as such.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a wait for an answer checks that the second process still runs.
const CHECK_EVERY: Duration = Duration::from_millis(100);
/// Longest the second process waits for the next command.
const IDLE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the second process may take to quit before it is killed.
const QUIT_TIMEOUT: Duration = Duration::from_secs(15);

/// Progress steps: starting the second process, the floors before each policy and at the
/// end, the latencies without and with a secret.
pub const STEPS: u64 = (1
    + (Policy::BOTH.len() + 1) * SIZES_2P.len()
    + 2 * Policy::BOTH.len() * SIZES_2P.len() * 2) as u64;

/// Measures everything between two processes into `report.two_processes`; failures go to
/// `report.errors`, with whatever could be measured kept.
pub fn measure(plan: &Plan, progress: &Progress, report: &mut TransportReport) {
    let mut two = TwoProcesses::default();
    let mut errors = Vec::new();
    if let Err(e) = run(plan, progress, &mut two, &mut errors) {
        errors.push(e);
    }
    relate_to_floor(&mut two.writes, &two.round_trips);
    relate_to_floor(&mut two.secret_writes, &two.round_trips);
    report
        .errors
        .extend(errors.into_iter().map(|e| format!("two processes: {e}")));
    report.two_processes = Some(two);
}

fn run(
    plan: &Plan,
    progress: &Progress,
    two: &mut TwoProcesses,
    errors: &mut Vec<String>,
) -> Result<(), String> {
    progress.step("zmq, two processes: starting the second process".into());
    let mut peer = Peer::start()?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let secret = format!("bench-{}-{nanos}", std::process::id());
    for policy in Policy::BOTH {
        floors(&mut peer, plan, progress, two)?;
        if let Err(e) = phase(&mut peer, policy, None, plan, progress, &mut two.writes) {
            errors.push(format!("{} policy: {e}", policy.name()));
        }
        let writes = &mut two.secret_writes;
        if let Err(e) = phase(&mut peer, policy, Some(&secret), plan, progress, writes) {
            errors.push(format!("{} policy with a secret: {e}", policy.name()));
        }
    }
    floors(&mut peer, plan, progress, two)?;
    peer.quit()
}

/// The raw zmq.rs round trip at every size, merged into the earlier measurement if any.
fn floors(
    peer: &mut Peer,
    plan: &Plan,
    progress: &Progress,
    two: &mut TwoProcesses,
) -> Result<(), String> {
    for size in SIZES_2P {
        progress.step(format!(
            "zmq, two processes: raw zmq.rs round trip, {}",
            size_label(size)
        ));
        let latency = plan.rtt.best(|| peer.ping_pass(size, plan.rtt))?;
        let trip = RoundTrip {
            size_bytes: size,
            mode: "raw zmq.rs, ROUTER/DEALER between the two processes".into(),
            latency,
        };
        merge_round_trips(&mut two.round_trips, vec![trip]);
    }
    Ok(())
}

/// One node per process with `policy` and `secret`, measured into `writes`, and both shut
/// down.
fn phase(
    peer: &mut Peer,
    policy: Policy,
    secret: Option<&str>,
    plan: &Plan,
    progress: &Progress,
    writes: &mut Vec<WriteLatency>,
) -> Result<(), String> {
    let cluster_id = format!(
        "bench-{}-two-processes-{}-{}",
        std::process::id(),
        policy.name(),
        if secret.is_some() { "sealed" } else { "open" }
    );
    let transport = ZmqTransport::start(ZmqConfig {
        secret: secret.map(|s| s.as_bytes().to_vec()),
        ..ZmqConfig::new("tcp://127.0.0.1:0", &cluster_id)
    })
    .map_err(|e| format!("zmq: {e}"))?;
    // The second process answers once its node holds a token of every object, which needs
    // this node running: the answer is awaited after this node opened them.
    peer.send_command(&format!(
        "start {} {} {cluster_id} {}",
        policy.name(),
        transport.local_addr(),
        secret.unwrap_or("-")
    ))?;
    let config = policy.config();
    let node = Node::start(transport, config).map_err(|e| e.to_string());
    let result = node.as_ref().map_err(String::clone).and_then(|node| {
        let e = |e: coherence_core::Error| e.to_string();
        let small = node.object(&object_name(SIZES_2P[0]), 0u64).map_err(e)?;
        let page = node
            .object(&object_name(SIZES_2P[1]), ByteBuf::of_size(SIZES_2P[1]))
            .map_err(e)?;
        peer.answer()?;
        let sealed = secret.is_some();
        latencies(
            peer,
            &small,
            SIZES_2P[0],
            policy,
            sealed,
            plan,
            progress,
            writes,
        )?;
        latencies(
            peer,
            &page,
            SIZES_2P[1],
            policy,
            sealed,
            plan,
            progress,
            writes,
        )
    });
    // Both nodes leave at once (each leave waits for the other's acknowledgement), and every
    // answer is taken, so the next phase starts in step.
    let stop = peer.send_command("stop");
    let down = match node {
        Ok(node) => node.shutdown().map_err(|e| format!("shutdown: {e}")),
        Err(_) => Ok(()),
    };
    let stopped = stop.and_then(|()| peer.drain());
    result.and(down).and(stopped)
}

/// Write and update latency on `obj` while the second process holds a token.
#[allow(clippy::too_many_arguments)] // one call site per size, all arguments distinct
fn latencies<V: Payload>(
    peer: &mut Peer,
    obj: &DistObj<V>,
    size: usize,
    policy: Policy,
    sealed: bool,
    plan: &Plan,
    progress: &Progress,
    writes: &mut Vec<WriteLatency>,
) -> Result<(), String> {
    let read = format!("read {size}");
    for op in Op::BOTH {
        progress.step(format!(
            "zmq, two processes: {} latency, {}, {}{}",
            op.name(),
            policy.name(),
            size_label(size),
            if sealed { ", with a secret" } else { "" }
        ));
        let latency = measure::spread_write_latency(obj, size, op, plan.latency, || {
            match policy {
                // Each write hands the second process a token.
                Policy::Update => Ok(()),
                // It reads, which takes a token back, and answers once it has it.
                Policy::Invalidate => peer.command(&read),
            }
        })?;
        // Had it died, the writes would have waited for it to be declared lost and then
        // measured a node alone.
        peer.check_running()?;
        writes.push(WriteLatency {
            nodes: 2,
            policy,
            op,
            size_bytes: size,
            latency,
            discarded: 0,
            floor_ns: None,
            vs_floor: None,
        });
    }
    Ok(())
}

fn object_name(size: usize) -> String {
    format!("bench/write/{size}")
}

/// A new current-thread runtime, as transport-zmq's engine runs zmq.rs.
fn runtime() -> Result<Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("tokio runtime: {e}"))
}

/// A zmq.rs socket and its runtime, driven from the calling thread with `block_on`, so a
/// raw round trip crosses no thread of ours. The socket is dropped before the runtime.
struct Raw<S> {
    socket: S,
    runtime: Runtime,
}

impl<S: SocketSend + SocketRecv> Raw<S> {
    /// Sends `message` now. A zmq.rs send only queues it for the connection's writer task,
    /// which runs on this runtime: yielding once lets it write before `block_on` returns,
    /// instead of whenever this thread next enters the runtime.
    fn send(&mut self, message: ZmqMessage) -> Result<(), String> {
        self.runtime
            .block_on(async {
                self.socket.send(message).await?;
                tokio::task::yield_now().await;
                Ok::<(), zeromq::ZmqError>(())
            })
            .map_err(|e| format!("zmq send: {e}"))
    }

    /// The next message, `None` if none came within `timeout`.
    fn recv(&mut self, timeout: Duration) -> Result<Option<ZmqMessage>, String> {
        match self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, self.socket.recv()).await })
        {
            Ok(received) => received.map(Some).map_err(|e| format!("zmq receive: {e}")),
            Err(_) => Ok(None),
        }
    }
}

impl Raw<DealerSocket> {
    /// Echoes ping frames, within the runtime as the first process times them, until a
    /// command comes; returns it.
    fn next_command(&mut self) -> Result<String, String> {
        let Raw { socket, runtime } = self;
        runtime.block_on(async {
            loop {
                let message = tokio::time::timeout(IDLE_TIMEOUT, socket.recv())
                    .await
                    .map_err(|_| format!("no command within {IDLE_TIMEOUT:?}"))?
                    .map_err(|e| format!("zmq receive: {e}"))?;
                let frame = message.get(0).map(|f| &f[..]).unwrap_or_default();
                if frame.first() != Some(&PING) {
                    return Ok(String::from_utf8_lossy(frame).into_owned());
                }
                socket
                    .send(message)
                    .await
                    .map_err(|e| format!("zmq send: {e}"))?;
            }
        })
    }
}

/// The next message from the second process; fails within [`CHECK_EVERY`] once that process
/// has ended, and after [`ANSWER_TIMEOUT`] otherwise.
fn await_message(raw: &mut Raw<RouterSocket>, process: &mut Process) -> Result<ZmqMessage, String> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    loop {
        if let Some(message) = raw.recv(CHECK_EVERY)? {
            return Ok(message);
        }
        if let Ok(Some(status)) = process.0.try_wait() {
            return Err(format!("the second process ended ({status})"));
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the second process did not answer within {ANSWER_TIMEOUT:?}"
            ));
        }
    }
}

/// The second process: killed when dropped while it still runs.
struct Process(Child);

impl Process {
    /// `e`, with the exit status if the process has ended (the likely cause).
    fn explain(&mut self, e: String) -> String {
        match self.0.try_wait() {
            Ok(Some(status)) => format!("{e}; the second process ended ({status})"),
            _ => e,
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// The second process and the ROUTER that talks to its DEALER.
struct Peer {
    raw: Raw<RouterSocket>,
    /// The second process's routing identity (the first frame of what it sends).
    identity: ZmqMessage,
    process: Process,
    /// Commands sent and not answered yet.
    pending: usize,
    /// Set when an answer did not come: later calls fail at once instead of waiting again.
    broken: bool,
}

impl Peer {
    /// Binds a ROUTER on loopback, starts the second process with its address and waits for
    /// its hello.
    fn start() -> Result<Peer, String> {
        let runtime = runtime()?;
        let mut router = RouterSocket::new();
        let endpoint = runtime
            .block_on(router.bind("tcp://127.0.0.1:0"))
            .map_err(|e| format!("zmq bind: {e}"))?;
        let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
        let child = Command::new(exe)
            .arg(format!("--{PEER_FLAG}"))
            .arg(endpoint.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the second process: {e}"))?;
        let mut process = Process(child);
        let mut raw = Raw {
            socket: router,
            runtime,
        };
        let mut hello = await_message(&mut raw, &mut process)?;
        if hello.len() != 2 || hello.get(1).map(|f| &f[..]) != Some(b"hello") {
            return Err("the second process did not say hello".into());
        }
        hello.split_off(1);
        Ok(Peer {
            raw,
            identity: hello,
            process,
            pending: 0,
            broken: false,
        })
    }

    /// The next message, or an error that says whether the second process is still running.
    fn receive(&mut self) -> Result<ZmqMessage, String> {
        if self.broken {
            return Err("the second process stopped answering earlier".into());
        }
        let received = await_message(&mut self.raw, &mut self.process);
        self.broken = received.is_err();
        received
    }

    fn send(&mut self, payload: Vec<u8>) -> Result<(), String> {
        let mut message = ZmqMessage::from(payload);
        message.prepend(&self.identity);
        self.raw.send(message)
    }

    /// Round trips of `size`-byte frames, timed around the socket calls alone; every send is
    /// a fresh copy, as in the in-process floors.
    fn ping_pass(&mut self, size: usize, budget: Budget) -> Result<Latency, String> {
        if self.broken {
            return Err("the second process stopped answering earlier".into());
        }
        let mut payload = vec![0x5a_u8; size.max(1)];
        payload[0] = PING;
        let Raw { socket, runtime } = &mut self.raw;
        let identity = &self.identity;
        let result = runtime.block_on(async {
            let mut samples = Vec::new();
            let start = Instant::now();
            for i in 0.. {
                if budget.done(samples.len(), start) {
                    break;
                }
                let mut message = ZmqMessage::from(payload.clone());
                message.prepend(identity);
                let t = Instant::now();
                socket
                    .send(message)
                    .await
                    .map_err(|e| format!("zmq send: {e}"))?;
                let echo = tokio::time::timeout(ANSWER_TIMEOUT, socket.recv())
                    .await
                    .map_err(|_| format!("no echo within {ANSWER_TIMEOUT:?}"))?
                    .map_err(|e| format!("zmq receive: {e}"))?;
                let elapsed = t.elapsed();
                if echo.get(1).map(|f| f.len()) != Some(payload.len()) {
                    return Err("the echo is not the ping".to_string());
                }
                if i >= budget.warmup {
                    samples.push(elapsed);
                }
            }
            Latency::of(samples).ok_or_else(|| "no round trip measured".to_string())
        });
        self.broken = result.is_err();
        result.map_err(|e| self.process.explain(e))
    }

    /// Fails if the second process has ended.
    fn check_running(&mut self) -> Result<(), String> {
        match self.process.0.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => {
                self.broken = true;
                Err(format!("the second process ended ({status})"))
            }
            Err(e) => Err(format!("cannot check the second process: {e}")),
        }
    }

    /// Sends a command; its answer is taken by [`Peer::answer`] or [`Peer::drain`].
    fn send_command(&mut self, command: &str) -> Result<(), String> {
        self.send(command.as_bytes().to_vec())?;
        self.pending += 1;
        Ok(())
    }

    /// The answer to the oldest command not answered yet.
    fn answer(&mut self) -> Result<(), String> {
        let message = self.receive()?;
        self.pending = self.pending.saturating_sub(1);
        let text = message
            .get(1)
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .unwrap_or_default();
        match text.strip_prefix("error: ") {
            None if text == "ok" => Ok(()),
            None => Err(format!("unexpected answer {text:?}")),
            Some(e) => Err(format!("second process: {e}")),
        }
    }

    /// Sends a command and waits for its answer.
    fn command(&mut self, command: &str) -> Result<(), String> {
        self.send_command(command)?;
        self.answer()
    }

    /// Takes every pending answer; the first error counts.
    fn drain(&mut self) -> Result<(), String> {
        let mut result = Ok(());
        while self.pending > 0 {
            let answer = self.answer();
            if self.broken {
                return answer;
            }
            result = result.and(answer);
        }
        result
    }

    /// Tells the second process to quit and waits for it (it is killed if it does not).
    fn quit(mut self) -> Result<(), String> {
        self.send(b"quit".to_vec())?;
        let deadline = Instant::now() + QUIT_TIMEOUT;
        loop {
            match self.process.0.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("the second process ended ({status})")),
                Ok(None) if Instant::now() > deadline => {
                    return Err(format!(
                        "the second process did not quit within {QUIT_TIMEOUT:?}; killed"
                    ))
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(format!("waiting for the second process: {e}")),
            }
        }
    }
}

/// The second process: connects to the first one's ROUTER at `addr` and serves its commands
/// until it says quit.
pub fn serve(addr: &str) -> ExitCode {
    exit_when_parent_is_gone();
    match serve_commands(addr) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench, second process: {e}");
            ExitCode::FAILURE
        }
    }
}

/// This process's node and handles of the measured objects, between `start` and `stop`.
struct Follower {
    node: Node,
    small: DistObj<u64>,
    page: DistObj<ByteBuf>,
}

fn serve_commands(addr: &str) -> Result<(), String> {
    let runtime = runtime()?;
    let mut dealer = DealerSocket::new();
    runtime
        .block_on(dealer.connect(addr))
        .map_err(|e| format!("zmq connect to {addr}: {e}"))?;
    let mut raw = Raw {
        socket: dealer,
        runtime,
    };
    raw.send(ZmqMessage::from("hello"))?;
    let mut follower: Option<Follower> = None;
    loop {
        let text = raw.next_command()?;
        let answer = match text.split_whitespace().collect::<Vec<_>>().as_slice() {
            ["start", policy, join, cluster_id, secret] if follower.is_none() => {
                let secret = (*secret != "-").then_some(*secret);
                start(policy, join, cluster_id, secret).map(|f| follower = Some(f))
            }
            ["read", size] => read(follower.as_ref(), size),
            ["stop"] => stop(follower.take()),
            ["quit"] => return stop(follower.take()),
            _ => Err(format!("unexpected command {text:?}")),
        };
        let answer = match answer {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("error: {e}"),
        };
        raw.send(ZmqMessage::from(answer))?;
    }
}

/// Joins the first process's cluster and takes a token of every measured object.
fn start(
    policy: &str,
    join: &str,
    cluster_id: &str,
    secret: Option<&str>,
) -> Result<Follower, String> {
    let policy = Policy::BOTH
        .into_iter()
        .find(|p| p.name() == policy)
        .ok_or_else(|| format!("unknown policy {policy:?}"))?;
    let transport = ZmqTransport::start(ZmqConfig {
        join: Some(join.to_string()),
        secret: secret.map(|s| s.as_bytes().to_vec()),
        ..ZmqConfig::new("tcp://127.0.0.1:0", cluster_id)
    })
    .map_err(|e| format!("zmq: {e}"))?;
    let config = policy.config();
    let node = Node::start(transport, config).map_err(|e| e.to_string())?;
    let e = |e: coherence_core::Error| e.to_string();
    let small = node.object(&object_name(SIZES_2P[0]), 0u64).map_err(e)?;
    let page = node
        .object(&object_name(SIZES_2P[1]), ByteBuf::of_size(SIZES_2P[1]))
        .map_err(e)?;
    small.read().map_err(e)?;
    page.read().map_err(e)?;
    Ok(Follower { node, small, page })
}

/// Reads the object of `size` bytes, which takes a token back from the writer.
fn read(follower: Option<&Follower>, size: &str) -> Result<(), String> {
    let f = follower.ok_or("no node running")?;
    let e = |e: coherence_core::Error| e.to_string();
    match size.parse::<usize>() {
        Ok(s) if s == SIZES_2P[0] => f.small.read().map(drop).map_err(e),
        Ok(s) if s == SIZES_2P[1] => f.page.read().map(drop).map_err(e),
        _ => Err(format!("no object of {size} bytes")),
    }
}

fn stop(follower: Option<Follower>) -> Result<(), String> {
    match follower {
        Some(f) => f.node.shutdown().map_err(|e| format!("shutdown: {e}")),
        None => Ok(()),
    }
}

/// Ends this process when its stdin reaches end of file: the first process holds the other
/// end of that pipe, so this is how the second one notices that the first is gone.
fn exit_when_parent_is_gone() {
    let spawned = std::thread::Builder::new()
        .name("parent-watch".into())
        .spawn(|| {
            let mut buf = [0u8; 64];
            let mut stdin = std::io::stdin();
            while matches!(stdin.read(&mut buf), Ok(n) if n > 0) {}
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        eprintln!("bench, second process: cannot watch for the first one's end: {e}");
    }
}
