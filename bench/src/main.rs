//! `bench`: the speed of coherence against the physical floor and the alternatives, every
//! figure next to its baseline, measured in one run on one machine.
//!
//! ```text
//! cargo run --release -p bench -- [--quick] [--out DIR] [--transport local|zmq|all]
//! MPICC=mpicc.mpich cargo build --release -p bench --features mpi
//! mpiexec -n 2 target/release/bench --transport mpi [--quick]   # or -n 4
//! ```
//!
//! Per transport: the raw round trip (the floor); read hits against `RwLock<Arc<T>>` with 1 and
//! 2 threads, on a member of a 2-node cluster (over ZeroMQ it serves reads under a lease); write and update latency with spread tokens on 2, 4 and 8 nodes under both write
//! policies; writes by a node holding every token (messages and frames counted by the nodes);
//! mixed workloads against a central server built on the raw transport; value sizes 8 B,
//! 4 KiB and 1 MiB. ZeroMQ also runs between two processes (this one starts the second): the
//! raw zmq.rs round trip between them and write latency with spread tokens, which the
//! acceptance ratio uses. MPI runs one node per rank and owns MPI itself, so that raw MPI and
//! an MPI-3 RMA window are measured in the same run (see `mpi/mod.rs`): at 2 ranks the
//! latencies (raw round trip, RMA reads and writes, ours), at any size the mixed workloads of
//! ours, the RMA window and a central server on plain MPI.
//! Once per run, the protocol's own CPU time per write (two state machines on one thread,
//! no transport): with a floor whose receivers spin, the lowest latency a write could have,
//! printed next to the write ratios of local and MPI.
//!
//! Prints markdown tables and the project's acceptance ratios to stdout, writes every figure to
//! `DIR/bench-<transport>.json` and SVG plots to `DIR`, and shows progress on stderr. Nothing
//! here asserts on timings: it measures and reports. The exit code is 1 when a measurement
//! failed (the failure is in the report), 2 when nothing could be written.

mod central;
mod measure;
#[cfg(feature = "mpi")]
mod mpi;
mod net;
mod plot;
mod report;
mod suite;
mod two_process;
mod write_cpu;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use net::Net;
use report::{Policy, Report, TransportReport};

/// Measures coherence against the raw transport, an `RwLock<Arc<T>>` and a central server.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Make every measurement short (seconds in all): a smoke run, not figures to quote.
    #[arg(long)]
    quick: bool,

    /// Directory for the JSON file of every figure and the SVG plots.
    #[arg(long, value_name = "DIR", default_value = "target/bench")]
    out: PathBuf,

    /// Transport(s) to measure. `all` is local and zmq; MPI runs on its own, under
    /// `mpiexec -n 2` (or `-n 4`), in a build with `--features mpi`.
    #[arg(long, value_enum, default_value_t = Which::All)]
    transport: Which,

    /// Copies a write waits for (`Config::durability`) on every node measured; without it,
    /// the library's default for each transport (1 over ZeroMQ, 0 in memory and on MPI).
    #[arg(long, value_name = "N")]
    durability: Option<u32>,

    /// Internal: run as the second process of the two-process ZeroMQ measurement, talking to
    /// the first one's socket at ADDR.
    #[arg(long = two_process::PEER_FLAG, value_name = "ADDR", hide = true)]
    zmq_peer_of: Option<String>,
}

/// `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Which {
    /// In-memory channels between threads.
    Local,
    /// ZeroMQ over TCP loopback: all endpoints in this process, then two processes.
    Zmq,
    /// MPI, one node per rank (2 ranks for every figure, or 4).
    Mpi,
    /// Local and zmq.
    All,
}

impl Which {
    fn name(self) -> &'static str {
        match self {
            Which::Local => "local",
            Which::Zmq => "zmq",
            Which::Mpi => "mpi",
            Which::All => "all",
        }
    }
}

/// How many samples, and for how long, one pass of a latency measurement takes.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Stop a pass after this many timed samples...
    pub samples: usize,
    /// ...or after this long, once `min_samples` are in.
    pub time: Duration,
    /// Samples taken even if time is up.
    pub min_samples: usize,
    /// Untimed operations first.
    pub warmup: usize,
    /// Passes; the one with the lowest median counts (the machine is shared and noisy, and
    /// the floors are taken the same way).
    pub passes: usize,
}

impl Budget {
    /// Whether a pass with `n` samples that began at `start` is complete.
    pub fn done(&self, n: usize, start: Instant) -> bool {
        n >= self.samples || (n >= self.min_samples && start.elapsed() >= self.time)
    }

    /// Runs `pass` `passes` times and keeps the result with the lowest median, noting the
    /// worst pass's median in it.
    pub fn best(
        &self,
        mut pass: impl FnMut() -> Result<report::Latency, String>,
    ) -> Result<report::Latency, String> {
        let mut best: Option<report::Latency> = None;
        let mut worst = 0.0f64;
        for _ in 0..self.passes.max(1) {
            let latency = pass()?;
            worst = worst.max(latency.typical_ns());
            if best
                .as_ref()
                .is_none_or(|b| latency.typical_ns() < b.typical_ns())
            {
                best = Some(latency);
            }
        }
        let mut best = best.ok_or_else(|| "no pass".to_string())?;
        best.worst_pass_ns = Some(worst);
        Ok(best)
    }
}

/// How read hits are measured: the best of `rounds` rounds of `reads` reads per thread.
#[derive(Debug, Clone, Copy)]
pub struct ReadPlan {
    /// Reads per thread per round.
    pub reads: u64,
    /// Rounds; the fastest counts (the machine is shared and noisy).
    pub rounds: usize,
}

/// Sizes of every measurement.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Raw round trips (measured three times per transport: first, after the write
    /// latencies and last; the best pass counts).
    pub rtt: Budget,
    /// Write and update latency.
    pub latency: Budget,
    /// Writes holding every token (`samples` counts writes; `passes` is unused, the best
    /// batch is reported next to the mean).
    pub owned: Budget,
    /// Read hits.
    pub read: ReadPlan,
    /// Duration of each pass of a mixed workload.
    pub mixed: Duration,
    /// Passes of each mixed workload; the one with the highest total counts.
    pub mixed_passes: usize,
    /// Writes per pass of the protocol's own CPU time (passes as `latency`).
    pub write_cpu: u64,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        let budget = |samples, ms, min_samples, warmup, passes| Budget {
            samples,
            time: Duration::from_millis(ms),
            min_samples,
            warmup,
            passes,
        };
        if quick {
            Plan {
                rtt: budget(2_000, 25, 20, 20, 1),
                latency: budget(300, 40, 10, 5, 1),
                owned: budget(20_000, 30, 8, 5, 1),
                read: ReadPlan {
                    reads: 100_000,
                    rounds: 2,
                },
                mixed: Duration::from_millis(150),
                mixed_passes: 1,
                write_cpu: 20_000,
            }
        } else {
            Plan {
                rtt: budget(20_000, 150, 100, 200, 2),
                latency: budget(2_000, 170, 30, 20, 3),
                owned: budget(1_000_000, 300, 8, 100, 1),
                read: ReadPlan {
                    reads: 1_000_000,
                    rounds: 12,
                },
                mixed: Duration::from_millis(500),
                mixed_passes: 3,
                write_cpu: 300_000,
            }
        }
    }
}

/// The progress bar on stderr (hidden for `--quick` and on MPI ranks other than 0).
pub struct Progress(ProgressBar);

impl Progress {
    /// A bar of `steps` steps, drawn only if `visible`.
    pub fn new(steps: u64, visible: bool) -> Progress {
        if !visible {
            return Progress(ProgressBar::hidden());
        }
        let bar = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        if let Ok(style) =
            ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {wide_msg}")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        Progress(bar)
    }

    /// Starts the next step (and counts the previous one as done).
    pub fn step(&self, message: String) {
        if self.0.message().is_empty() {
            self.0.set_message(message);
        } else {
            self.0.inc(1);
            self.0.set_message(message);
        }
    }

    /// Removes the bar.
    pub fn finish(&self) {
        self.0.finish_and_clear();
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(copies) = args.durability {
        // Before any thread starts: the child processes inherit it.
        std::env::set_var(report::DURABILITY_ENV, copies.to_string());
    }
    if let Some(addr) = &args.zmq_peer_of {
        return two_process::serve(addr);
    }
    let plan = Plan::new(args.quick);
    match report::durability() {
        Some(copies) => eprintln!("durability: {copies} on every node"),
        None => eprintln!("durability: the library's default per transport"),
    }
    let started = Instant::now();
    let started_unix_s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());

    let transports = match measure_all(args.transport, &plan, args.quick) {
        Ok(Some(transports)) => transports,
        // An MPI rank other than 0: rank 0 reports.
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (mut write_cpu, mut errors) = (Vec::new(), Vec::new());
    for policy in Policy::BOTH {
        match write_cpu::measure(policy, plan.write_cpu, plan.latency.passes) {
            Ok(figure) => write_cpu.push(figure),
            Err(e) => errors.push(format!("{} policy: {e}", policy.name())),
        }
    }
    let verdicts: Vec<_> = transports
        .iter()
        .flat_map(|t| t.verdicts(&write_cpu))
        .collect();
    let report = Report {
        command: std::env::args().collect(),
        quick: args.quick,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        started_unix_s,
        elapsed_s: started.elapsed().as_secs_f64(),
        write_cpu,
        transports,
        verdicts,
        errors,
    };

    println!("# coherence benchmarks\n");
    println!(
        "`{}` on {} CPUs, {:.0} s{}.\n",
        report.command.join(" "),
        report.cpus,
        report.elapsed_s,
        if report.quick { ", --quick" } else { "" }
    );
    for t in &report.transports {
        println!("{}", t.markdown());
    }
    println!("{}", report::write_cpu_markdown(&report.write_cpu));
    println!("{}", report::verdicts_markdown(&report.verdicts));

    for e in &report.errors {
        eprintln!("error: {e}");
    }
    let failed =
        !report.errors.is_empty() || report.transports.iter().any(|t| !t.errors.is_empty());
    match write_outputs(&args.out, args.transport, &report) {
        Ok(()) if failed => ExitCode::FAILURE,
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// Measures the chosen transports; `Ok(None)` on an MPI rank that does not report.
fn measure_all(
    which: Which,
    plan: &Plan,
    quick: bool,
) -> Result<Option<Vec<TransportReport>>, String> {
    let nets: &[Net] = match which {
        Which::Local => &[Net::Local],
        Which::Zmq => &[Net::Zmq],
        Which::All => &[Net::Local, Net::Zmq],
        Which::Mpi => return measure_mpi(plan, quick).map(|r| r.map(|r| vec![r])),
    };
    let steps = suite::STEPS * nets.len() as u64
        + if nets.contains(&Net::Zmq) {
            two_process::STEPS
        } else {
            0
        };
    let progress = Progress::new(steps, !quick);
    let reports = nets
        .iter()
        .map(|&net| {
            let mut report = suite::run(net, plan, &progress);
            if net == Net::Zmq {
                two_process::measure(plan, &progress, &mut report);
            }
            report
        })
        .collect();
    progress.finish();
    Ok(Some(reports))
}

#[cfg(feature = "mpi")]
fn measure_mpi(plan: &Plan, quick: bool) -> Result<Option<TransportReport>, String> {
    mpi::run(plan, quick)
}

#[cfg(not(feature = "mpi"))]
fn measure_mpi(_plan: &Plan, _quick: bool) -> Result<Option<TransportReport>, String> {
    Err("this bench was built without MPI support: build it with \
         `cargo build --release -p bench --features mpi` and run it under `mpiexec -n 2` \
         (or `-n 4`)"
        .to_string())
}

/// Writes the JSON file and the plots; a plot that cannot be drawn is reported, not fatal.
fn write_outputs(dir: &Path, which: Which, report: &Report) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let json = dir.join(format!("bench-{}.json", which.name()));
    let text = serde_json::to_string_pretty(report).map_err(|e| format!("JSON: {e}"))?;
    std::fs::write(&json, text).map_err(|e| format!("cannot write {}: {e}", json.display()))?;
    eprintln!("wrote {}", json.display());
    for t in &report.transports {
        if !t.writes.is_empty() {
            match plot::latency_vs_nodes(dir, t) {
                Ok(()) => eprintln!(
                    "wrote {}/latency_vs_nodes-{}.svg",
                    dir.display(),
                    t.transport
                ),
                Err(e) => eprintln!("warning: plot: {e}"),
            }
        }
        if !t.mixed.is_empty() {
            match plot::throughput_vs_read_share(dir, t) {
                Ok(()) => eprintln!(
                    "wrote {}/throughput_vs_read_share-{}.svg",
                    dir.display(),
                    t.transport
                ),
                Err(e) => eprintln!("warning: plot: {e}"),
            }
        }
    }
    Ok(())
}
