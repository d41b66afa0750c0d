//! `demo`: the lab's `mpiexec -n 4 python main.py` on in-memory nodes.
//!
//! Parses the flags, runs the scenario ([`lab`], on threads by [`local`]), prints what every
//! node saw to stdout and ends with one verdict line, `coherent: yes` (exit code 0) or
//! `coherent: NO (<why>)` (exit code 1). Logs go to stderr.

mod lab;
mod local;
#[cfg(feature = "mpi")]
mod mpi;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use clap::{ArgAction, Parser, ValueEnum};
use coherence_core::{Config, WritePolicy};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use lab::{Failure, Observation, Report};

/// What `--trace` records. The library logs each protocol message it sends and receives at
/// trace level, so the file needs that level to show every step.
const TRACE_FILTER: &str = "coherence_core=trace,transport_local=trace,demo=debug";

/// Runs the lab scenario on in-memory nodes and checks that every node always sees coherent
/// values.
///
/// N nodes, one thread each, take turns: each writes a distinct value to the integer object
/// "int" and every node checks it reads exactly that value; then each inserts its own key into
/// the dictionary object "dict" and every node checks it reads exactly the keys written so far.
/// Then a new node joins, opens both objects with other init values and must see the current
/// ones. Finally all nodes shut down at once. The last line of stdout is the verdict:
/// `coherent: yes` (exit code 0) or `coherent: NO (<why>)` (exit code 1).
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

    /// Where the nodes run: threads of this process talking over in-memory channels, or one
    /// node per MPI rank (run under `mpiexec -n N`; needs a build with `--features mpi`).
    #[arg(long, value_enum, default_value_t = TransportKind::Local)]
    transport: TransportKind,

    /// Also write a JSON-lines trace of the run to FILE: one object per event, including every
    /// protocol message each node sends and receives.
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
    if let Err(e) = init_logging(args.verbose, args.trace.as_deref()) {
        let path = args.trace.as_deref().unwrap_or(Path::new("")).display();
        eprintln!("error: cannot create the trace file {path}: {e}");
        return ExitCode::from(2);
    }
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
            Some(outcome) => outcome,
            None => return ExitCode::SUCCESS,
        },
    };
    print_outcome(outcome)
}

/// Runs this MPI rank's part; `None` on a rank other than 0 whose run was coherent (only rank
/// 0 prints the report).
#[cfg(feature = "mpi")]
fn run_mpi(config: &Config) -> Option<Result<Report, Failure>> {
    match mpi::run(config) {
        mpi::Outcome::Report(outcome) => {
            println!(
                "coherence lab over MPI: the last rank opens late, {:?} policy, timeout {:?}",
                config.write_policy, config.timeout
            );
            Some(outcome)
        }
        mpi::Outcome::Verdict(true) => None,
        mpi::Outcome::Verdict(false) => std::process::exit(1),
    }
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_config: &Config) -> Option<Result<Report, Failure>> {
    Some(Err(Failure {
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

/// Sends logs to stderr (filtered by `-v` or RUST_LOG) and, with `--trace`, JSON lines to a
/// file.
fn init_logging(verbose: u8, trace: Option<&Path>) -> io::Result<()> {
    let stderr_filter = match verbose {
        0 => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        1 => EnvFilter::new("debug"),
        _ => EnvFilter::new("trace"),
    };
    let stderr = fmt::layer()
        .with_writer(io::stderr)
        .with_thread_names(true)
        .with_filter(stderr_filter);
    let trace = match trace {
        Some(path) => Some(
            fmt::layer()
                .json()
                .with_thread_names(true)
                // Unbuffered, so nothing is lost when the watchdog ends the process early.
                .with_writer(Mutex::new(File::create(path)?))
                .with_filter(EnvFilter::new(TRACE_FILTER)),
        ),
        None => None,
    };
    tracing_subscriber::registry()
        .with(stderr)
        .with(trace)
        .init();
    Ok(())
}
