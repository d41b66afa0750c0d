//! `demo`: the lab's `mpiexec -n 4 python main.py` on in-memory nodes, MPI ranks or ZeroMQ
//! processes.
//!
//! Parses the flags, runs the scenario ([`lab`]: on threads by [`local`], on MPI ranks by
//! `mpi`, on processes over ZeroMQ by [`zmq`]), prints what every node saw to stdout and ends
//! with one verdict line, `coherent: yes` (exit code 0) or `coherent: NO (<why>)` (exit code
//! 1). Logs go to stderr. The demo only parses flags, launches and prints: protocol rules live
//! in the core, measurements in the `bench` crate.

mod lab;
mod local;
#[cfg(feature = "mpi")]
mod mpi;
mod processes;
mod zmq;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{ArgAction, CommandFactory, Parser, ValueEnum};
use coherence_core::{Config, WritePolicy};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id};
use tracing::Subscriber;
use tracing_chrome::{ChromeLayerBuilder, EventOrSpan, FlushGuard};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use lab::{Failure, Observation, Report};

/// What `--trace` records. The library logs each protocol message it sends and receives at
/// trace level, so the file needs that level to show every step.
const TRACE_FILTER: &str =
    "coherence_core=trace,transport_local=trace,transport_zmq=debug,demo=debug";

/// Runs the lab scenario on in-memory nodes, MPI ranks or ZeroMQ processes and checks that
/// every node always sees coherent values.
///
/// N nodes, one thread each, take turns: each writes a distinct value to the integer object
/// "int" and every node checks it reads exactly that value; then each inserts its own key into
/// the dictionary object "dict" and every node checks it reads exactly the keys written so far.
/// Then a new node joins, opens both objects with other init values and must see the current
/// ones. Finally all nodes shut down at once. The last line of stdout is the verdict:
/// `coherent: yes` (exit code 0) or `coherent: NO (<why>)` (exit code 1).
///
/// Over ZeroMQ (`--transport zmq`) every node is its own process:
///
/// - Without `--listen`, this process launches `--nodes` node processes on 127.0.0.1 plus one
///   that joins the running cluster only after the tests are done (a real late process join),
///   relays the founder's report and exits with the verdict. It kills every process still
///   running after 10 times `--timeout-ms`, and the verdict is NO then.
///
/// - With `--listen ADDR --expect N [--join ADDR]`, this process is one node, e.g. one per
///   host. The one without `--join` founds the cluster; the others join through any member.
///   Once N nodes are present, the last one admitted plays the new process (it opens the
///   objects only after the others wrote them, as under MPI) and the other N-1 take turns.
///   Node 0 prints the report; every process ends with the verdict line and exits with it.
///   Joining gives up after `--timeout-ms`, waiting for the other nodes after 4 times that.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Number of nodes taking turns (at least 2); the late joiner comes on top of these.
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_nodes)]
    nodes: usize,

    /// What a writer does with its tokens after a write.
    #[arg(long, value_enum, default_value_t = Policy::Update)]
    policy: Policy,

    /// Longest any library operation may wait, in milliseconds, before it fails with a
    /// timeout (which makes the verdict NO).
    #[arg(long, value_name = "MS", default_value_t = 10_000, value_parser = parse_timeout)]
    timeout_ms: u64,

    /// Where the nodes run: threads of this process talking over in-memory channels, one
    /// node per MPI rank (run under `mpiexec -n N`; needs a build with `--features mpi`), or
    /// one node per process over ZeroMQ (see above).
    #[arg(long, value_enum, default_value_t = TransportKind::Local)]
    transport: TransportKind,

    /// ZeroMQ: run one node bound to ADDR (e.g. tcp://10.0.0.1:7000; port 0 picks a free
    /// one) instead of launching processes on 127.0.0.1. Needs --expect.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,

    /// ZeroMQ with --listen: join the cluster through the member at ADDR. Without it this node
    /// founds the cluster (and is node 0).
    #[arg(long, value_name = "ADDR", requires = "listen")]
    join: Option<String>,

    /// ZeroMQ with --listen: how many nodes (processes) take part, this one included; the
    /// last one admitted opens the objects late.
    #[arg(long, value_name = "N", requires = "listen", value_parser = parse_nodes)]
    expect: Option<usize>,

    /// ZeroMQ: the cluster's name; frames of other clusters are dropped.
    #[arg(long, value_name = "NAME", default_value = "coherence-demo")]
    cluster_id: String,

    /// ZeroMQ: file holding the secret shared by all nodes; every connection then starts with
    /// a Noise handshake keyed by it and every frame is encrypted and authenticated. Without it
    /// the environment variable COHERENCE_SECRET is used if set, else frames travel in clear
    /// (allowed on loopback, or with --insecure).
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,

    /// ZeroMQ: allow --listen on an address other than loopback without a secret. Anyone who
    /// can reach the port could then join and read or change every object, so a node refuses
    /// that unless told so; use it only on a network you trust.
    #[arg(long)]
    insecure: bool,

    /// ZeroMQ: which process of a launched run this is (set by the launcher).
    #[arg(long, value_enum, hide = true, requires = "listen")]
    zmq_role: Option<zmq::Role>,

    /// Also write a trace of the run to FILE, to watch it on a timeline: open the file at
    /// https://ui.perfetto.dev ("Open trace file") or in Chrome at chrome://tracing ("Load").
    /// The scenario's calls (e.g. `write of 20 to "int"`) and, inside them, the library
    /// operations that had to ask other nodes (e.g. `write int`) are slices on the track of
    /// the thread that made them: node-K for node K here, main under ZeroMQ or MPI. Every
    /// protocol message a node sends or receives is a mark (e.g. `send Grant to 2`; select it
    /// for its fields) on the track of the thread that handled it: that caller's, or the
    /// node's own coherence-node-K. The ZeroMQ launcher's process K, and MPI rank K, write
    /// FILE.K.
    #[arg(long, value_name = "FILE")]
    trace: Option<PathBuf>,

    /// Log to stderr at debug level (-vv: trace level, every protocol message). Without it,
    /// RUST_LOG selects what is logged (default: warnings and errors).
    #[arg(short, long, action = ArgAction::Count)]
    verbose: u8,
}

/// The transport, as `--transport` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TransportKind {
    /// In-memory channels between threads of this process (`--nodes` of them).
    Local,
    /// One node per MPI rank; `--nodes` is ignored, the MPI world's size counts.
    Mpi,
    /// One node per process over ZeroMQ: launched on 127.0.0.1, or one per host with
    /// `--listen`.
    Zmq,
}

/// The write policy, as `--policy` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Policy {
    /// After a write, send the new value with one token to every node, so later reads are
    /// local (the lab's behaviour; best for read-mostly objects).
    Update,
    /// The writer keeps every token until another node asks for one (best when one node
    /// writes repeatedly).
    Invalidate,
}

impl From<Policy> for WritePolicy {
    fn from(policy: Policy) -> WritePolicy {
        match policy {
            Policy::Update => WritePolicy::Update,
            Policy::Invalidate => WritePolicy::Invalidate,
        }
    }
}

/// Parses `--nodes`: a whole number of at least 2.
fn parse_nodes(text: &str) -> Result<usize, String> {
    let nodes: usize = text
        .parse()
        .map_err(|_| format!("{text:?} is not a whole number"))?;
    if nodes < 2 {
        return Err(format!(
            "the scenario needs at least 2 nodes (one writes while the others read), got {nodes}"
        ));
    }
    Ok(nodes)
}

/// Parses `--timeout-ms`: a whole number of at least 1.
fn parse_timeout(text: &str) -> Result<u64, String> {
    match text.parse() {
        Ok(0) => Err("the timeout must be at least 1 ms".to_string()),
        Ok(ms) => Ok(ms),
        Err(_) => Err(format!("{text:?} is not a whole number of milliseconds")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    check_zmq_flags(&args);
    let trace = trace_path(&args);
    // Held to the end of main, early returns included: dropping it writes the trace out.
    let _trace = match init_logging(args.verbose, trace.as_deref()) {
        Ok(guard) => TraceFile::hold(guard),
        Err(e) => {
            let path = trace.as_deref().unwrap_or(Path::new("")).display();
            eprintln!("error: cannot create the trace file {path}: {e}");
            return ExitCode::from(2);
        }
    };
    let config = Config::default()
        .timeout(Duration::from_millis(args.timeout_ms))
        .write_policy(args.policy.into());

    let outcome = match args.transport {
        TransportKind::Local => {
            println!(
                "coherence lab: {} nodes and a late joiner, {:?} policy, timeout {:?}",
                args.nodes, config.write_policy, config.timeout
            );
            local::run(args.nodes, &config)
        }
        TransportKind::Mpi => match run_mpi(&config) {
            Ok(outcome) => outcome,
            Err(code) => return code,
        },
        TransportKind::Zmq => {
            // Read now, so that a bad secret file is a usage error, not a verdict.
            let secret = match transport_zmq::secret_from_env_or_file(args.secret_file.as_deref()) {
                Ok(secret) => secret,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            run_zmq(&args, secret, &config)
        }
    };
    print_outcome(outcome)
}

/// The variables in which MPI launchers tell a process its rank: MPICH's and Intel MPI's
/// (Hydra), Open MPI's, and those of PMIx-based launchers such as Slurm's.
const MPI_RANK_VARIABLES: [&str; 3] = ["PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK"];

/// Where this process writes the trace `--trace` asks for, if anywhere. Every process of a run
/// writes its own file, since one JSON array cannot take several writers: the ZeroMQ launcher
/// names its children's files and writes none itself, and MPI rank K, which gets the same flags
/// as every other rank, writes FILE.K like the launcher's child K. The rank comes from the
/// launcher's environment because the file is opened before MPI starts, so that the start is
/// traced too.
fn trace_path(args: &Args) -> Option<PathBuf> {
    let path = args.trace.clone()?;
    match args.transport {
        TransportKind::Zmq if args.listen.is_none() => None,
        TransportKind::Mpi => {
            let rank = MPI_RANK_VARIABLES
                .iter()
                .find_map(|name| std::env::var(name).ok());
            let Some(rank) = rank else {
                // Not started by an MPI launcher: the only rank.
                return Some(path);
            };
            let mut path = path.into_os_string();
            path.push(format!(".{rank}"));
            Some(path.into())
        }
        TransportKind::Local | TransportKind::Zmq => Some(path),
    }
}

/// Rejects ZeroMQ flags that do not fit the transport or each other (exit code 2).
fn check_zmq_flags(args: &Args) {
    let zmq_only = [
        ("--listen", args.listen.is_some()),
        ("--secret-file", args.secret_file.is_some()),
        ("--insecure", args.insecure),
    ];
    if args.transport != TransportKind::Zmq {
        if let Some((flag, _)) = zmq_only.iter().find(|(_, given)| *given) {
            Args::command()
                .error(
                    ErrorKind::ArgumentConflict,
                    format!("{flag} needs --transport zmq"),
                )
                .exit();
        }
    }
    if args.listen.is_some() && args.expect.is_none() && args.zmq_role.is_none() {
        Args::command()
            .error(
                ErrorKind::MissingRequiredArgument,
                "--listen needs --expect N: how many nodes take part",
            )
            .exit();
    }
}

/// Runs the ZeroMQ transport's part: the launcher without `--listen`, else one node.
fn run_zmq(args: &Args, secret: Option<Vec<u8>>, config: &Config) -> Result<Report, Failure> {
    let Some(listen) = &args.listen else {
        println!(
            "coherence lab over ZeroMQ: {} node processes on 127.0.0.1 and a late-joining \
             process, {:?} policy, timeout {:?}",
            args.nodes, config.write_policy, config.timeout
        );
        return zmq::launch(&zmq::Launch {
            nodes: args.nodes,
            common: child_flags(args),
            trace: args.trace.clone(),
            deadline: config.timeout * 10,
        });
    };
    let plan = match (args.zmq_role, args.expect) {
        (Some(role), _) => {
            zmq::exit_when_launcher_is_gone();
            match role {
                zmq::Role::Founder | zmq::Role::Joiner => zmq::Plan::Participant {
                    nodes: args.nodes,
                    founder: role == zmq::Role::Founder,
                },
                zmq::Role::Late => zmq::Plan::Late { nodes: args.nodes },
            }
        }
        // check_zmq_flags made sure --expect is there.
        (None, expect) => zmq::Plan::Host {
            expect: expect.unwrap_or(2),
        },
    };
    zmq::run_node(
        &zmq::NodeSpec {
            listen: listen.clone(),
            join: args.join.clone(),
            cluster_id: args.cluster_id.clone(),
            secret,
            insecure: args.insecure,
            plan,
        },
        config,
    )
}

/// The flags the ZeroMQ launcher passes on to every child.
fn child_flags(args: &Args) -> Vec<OsString> {
    let policy = match args.policy {
        Policy::Update => "update",
        Policy::Invalidate => "invalidate",
    };
    let mut flags: Vec<OsString> = vec![
        "--policy".into(),
        policy.into(),
        "--timeout-ms".into(),
        args.timeout_ms.to_string().into(),
        "--cluster-id".into(),
        args.cluster_id.clone().into(),
    ];
    if let Some(path) = &args.secret_file {
        flags.extend(["--secret-file".into(), path.clone().into_os_string()]);
    }
    if args.verbose > 0 {
        flags.push(format!("-{}", "v".repeat(args.verbose.into())).into());
    }
    flags
}

/// Runs this MPI rank's part. On a rank other than 0 (only rank 0 prints the report) it is
/// the exit code alone, returned rather than exited with so that main still writes the trace.
#[cfg(feature = "mpi")]
fn run_mpi(config: &Config) -> Result<Result<Report, Failure>, ExitCode> {
    match mpi::run(config) {
        mpi::Outcome::Report(outcome) => {
            println!(
                "coherence lab over MPI: the last rank opens late, {:?} policy, timeout {:?}",
                config.write_policy, config.timeout
            );
            Ok(outcome)
        }
        mpi::Outcome::Verdict(true) => Err(ExitCode::SUCCESS),
        mpi::Outcome::Verdict(false) => Err(ExitCode::FAILURE),
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_config: &Config) -> Result<Result<Report, Failure>, ExitCode> {
    Ok(Err(Failure {
        observations: Vec::new(),
        reasons: vec!["this demo was built without MPI support: build it with \
             `cargo build --release -p demo --features mpi` and run it under mpiexec"
            .to_string()],
    }))
}

/// Prints the report and the verdict line; the exit code follows the verdict.
fn print_outcome(outcome: Result<Report, Failure>) -> ExitCode {
    match outcome {
        Ok(Report { observations }) => {
            print_observations(&observations);
            println!("coherent: yes");
            ExitCode::SUCCESS
        }
        Err(Failure {
            observations,
            reasons,
        }) => {
            print_observations(&observations);
            println!("coherent: NO ({})", reasons.join("; "));
            ExitCode::FAILURE
        }
    }
}

/// Prints the observations, which are sorted, under a heading per part of the scenario.
fn print_observations(observations: &[Observation]) {
    let mut section = None;
    for observation in observations {
        let heading = observation.step.section();
        if section != Some(heading) {
            println!("== {heading}");
            section = Some(heading);
        }
        println!("[node {}] {}", observation.node, observation.text);
    }
}

/// The trace file's guard, reachable from a thread that must end the process at once (a hang
/// found by the watchdog, the launcher gone): [`exit`] completes the file first.
static TRACE: Mutex<Option<FlushGuard>> = Mutex::new(None);

/// Completes the trace file when main ends.
struct TraceFile;

impl TraceFile {
    fn hold(guard: Option<FlushGuard>) -> TraceFile {
        *TRACE.lock().unwrap_or_else(PoisonError::into_inner) = guard;
        TraceFile
    }
}

impl Drop for TraceFile {
    fn drop(&mut self) {
        drop(TRACE.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

/// Ends the process with `code` at once, after completing the trace file (if any).
pub fn exit(code: i32) -> ! {
    // `try_lock`: a thread that holds the lock is dropping the guard already.
    if let Ok(mut guard) = TRACE.try_lock() {
        drop(guard.take());
    }
    std::process::exit(code)
}

/// Sends logs to stderr (filtered by `-v` or RUST_LOG) and, with `--trace`, a Chrome trace to
/// a file. The trace is written by a thread of its own and completed (the closing `]` of its
/// JSON array) only when the returned guard is dropped, so main holds the guard to its end.
fn init_logging(verbose: u8, trace: Option<&Path>) -> io::Result<Option<FlushGuard>> {
    let stderr_filter = match verbose {
        0 => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        1 => EnvFilter::new("debug"),
        _ => EnvFilter::new("trace"),
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(io::stderr)
        .with_thread_names(true)
        .with_filter(stderr_filter);
    let (trace, guard) = match trace {
        Some(path) => {
            let (chrome, guard) = ChromeLayerBuilder::new()
                // Not `file`, which panics when the file cannot be created.
                .writer(File::create(path)?)
                .include_args(true)
                // Source lines would double the file and mean nothing to someone watching
                // the protocol.
                .include_locations(false)
                .name_fn(Box::new(trace_name))
                .build();
            let layer = SpanNames
                .and_then(chrome)
                .with_filter(EnvFilter::new(TRACE_FILTER));
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(trace)
        .init();
    Ok(guard)
}

/// The name a span or event gets in the trace, so that the timeline reads without opening
/// every entry: a library operation after what it does (`write int`), one of the scenario's
/// calls after the call (`read of "int"`), a protocol message after its kind and peer (`send
/// Grant to 2`), any other event after its message.
fn trace_name<S>(item: &EventOrSpan<'_, '_, S>) -> String
where
    S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    match item {
        EventOrSpan::Span(span) => match span.extensions().get::<SpanName>() {
            Some(SpanName(name)) => name.clone(),
            None => span.name().to_string(),
        },
        EventOrSpan::Event(event) => {
            let mut fields = Fields::default();
            event.record(&mut fields);
            fields
                .event_name()
                .unwrap_or_else(|| event.metadata().name().to_string())
        }
    }
}

/// Gives operation and call spans their trace names (`write int`, `read of "int"`) when they
/// are created: the Chrome layer names a slice only when it is entered, and by then the span's
/// field values are gone.
struct SpanNames;

/// A span's trace name, kept with the span.
struct SpanName(String);

impl<S> Layer<S> for SpanNames
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let (Some(name), Some(span)) = (fields.span_name(), ctx.span(id)) {
            span.extensions_mut().insert(SpanName(name));
        }
    }
}

/// The field values of a span or event, as text, by field name.
#[derive(Default)]
struct Fields(BTreeMap<&'static str, String>);

impl Fields {
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    /// `write int` for the library's operation span (fields `operation` and `object`), the
    /// call itself for the scenario's call span (field `call`).
    fn span_name(&self) -> Option<String> {
        match (self.get("operation"), self.get("object"), self.get("call")) {
            (Some(operation), Some(object), _) => Some(format!("{operation} {object}")),
            (_, _, Some(call)) => Some(call.to_string()),
            _ => None,
        }
    }

    /// `send Grant to 2` or `receive Request from 0` for the library's per-message events
    /// (the kind is the start of the message's `msg` field), else the event's message.
    fn event_name(&self) -> Option<String> {
        let message = self.get("message")?;
        let peer = match message {
            "send" => self.get("to").map(|to| format!("to {to}")),
            "receive" => self.get("from").map(|from| format!("from {from}")),
            _ => None,
        };
        Some(match (self.get("msg"), peer) {
            (Some(msg), Some(peer)) => {
                let kind = msg.split(|c: char| !c.is_alphanumeric()).next();
                format!("{message} {} {peer}", kind.unwrap_or(msg))
            }
            _ => message.to_string(),
        })
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.0.insert(field.name(), format!("{value:?}"));
    }
}
