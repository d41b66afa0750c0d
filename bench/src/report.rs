//! What the benchmark measured: the figures of one run (serialized to JSON as they are), their
//! markdown rendering and the project's acceptance verdicts.

use std::fmt::Write as _;
use std::time::Duration;

use coherence_core::{Config, WritePolicy};
use serde::{Deserialize, Serialize};

/// Value sizes every size-dependent figure is measured at, in bytes.
pub const SIZES: [usize; 3] = [8, 4 << 10, 1 << 20];

/// Read shares of the mixed workloads, in percent, in the order of the plot's x axis.
pub const MIXES: [u32; 4] = [50, 90, 99, 100];

/// A human label of a value or frame size.
pub fn size_label(bytes: usize) -> String {
    match bytes {
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

/// A duration given in nanoseconds, with a unit that keeps three significant digits.
pub fn ns_label(ns: f64) -> String {
    if !ns.is_finite() {
        "-".to_string()
    } else if ns < 1e3 {
        format!("{ns:.0} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// An operation rate, in operations per second, with a unit.
pub fn rate_label(per_s: f64) -> String {
    if per_s >= 1e6 {
        format!("{:.2} M/s", per_s / 1e6)
    } else if per_s >= 1e3 {
        format!("{:.1} k/s", per_s / 1e3)
    } else {
        format!("{per_s:.0} /s")
    }
}

/// The write policy a figure was measured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// [`WritePolicy::Update`].
    Update,
    /// [`WritePolicy::Invalidate`].
    Invalidate,
}

impl Policy {
    /// Both policies, the default first.
    pub const BOTH: [Policy; 2] = [Policy::Update, Policy::Invalidate];

    /// The library's value.
    pub fn write_policy(self) -> WritePolicy {
        match self {
            Policy::Update => WritePolicy::Update,
            Policy::Invalidate => WritePolicy::Invalidate,
        }
    }

    /// The configuration every measured node runs with: the defaults under this policy, with
    /// the durability `--durability` asked for, if any (see [`DURABILITY_ENV`]).
    pub fn config(self) -> Config {
        let config = Config::default().write_policy(self.write_policy());
        match durability() {
            Some(copies) => config.durability(copies),
            None => config,
        }
    }
}

/// Carries `--durability` to every node the bench starts, in its own process and in the
/// child processes it starts (which inherit it).
pub const DURABILITY_ENV: &str = "COHERENCE_BENCH_DURABILITY";

/// The durability `--durability` asked for; `None`: the library's default per transport.
pub fn durability() -> Option<u32> {
    std::env::var(DURABILITY_ENV).ok()?.parse().ok()
}

impl Policy {
    /// The lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Update => "update",
            Policy::Invalidate => "invalidate",
        }
    }
}

/// The timed operation of a latency figure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// `DistObj::write`.
    Write,
    /// `DistObj::update` (read-modify-write).
    Update,
}

impl Op {
    /// Both operations.
    pub const BOTH: [Op; 2] = [Op::Write, Op::Update];

    /// The method name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Update => "update",
        }
    }
}

/// Latency statistics of one operation over many samples, in nanoseconds. (Deserialized
/// too: MPI ranks send their figures to rank 0 as JSON.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Latency {
    /// Number of timed operations.
    pub samples: usize,
    /// Median, when single operations were timed.
    pub median_ns: Option<f64>,
    /// Mean.
    pub mean_ns: f64,
    /// 99th percentile, when single operations were timed.
    pub p99_ns: Option<f64>,
    /// When this is the best of several passes: the median (or mean) of the worst one, to
    /// show how much the machine's noise moved the figure.
    pub worst_pass_ns: Option<f64>,
}

impl Latency {
    /// Statistics of individually timed operations; `None` without samples.
    pub fn of(mut samples: Vec<Duration>) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        let ns = |d: Duration| d.as_nanos() as f64;
        let n = samples.len();
        Some(Latency {
            samples: n,
            median_ns: Some(ns(samples[n / 2])),
            mean_ns: samples.iter().map(|&d| ns(d)).sum::<f64>() / n as f64,
            p99_ns: Some(ns(samples[(n * 99 / 100).min(n - 1)])),
            worst_pass_ns: None,
        })
    }

    /// The median, or the mean when only that is known: the figure ratios compare.
    pub fn typical_ns(&self) -> f64 {
        self.median_ns.unwrap_or(self.mean_ns)
    }
}

/// One raw round trip of the transport, without the library: the physical floor.
#[derive(Debug, Clone, Serialize)]
pub struct RoundTrip {
    /// Frame size.
    pub size_bytes: usize,
    /// How it was measured (e.g. threads of one process, `MPI_Send`/`MPI_Recv`).
    pub mode: String,
    /// Round-trip time.
    pub latency: Latency,
}

/// Read-hit cost at one thread count, against `RwLock<Arc<T>>` read-and-clone.
#[derive(Debug, Clone, Serialize)]
pub struct ReadHit {
    /// Value size.
    pub size_bytes: usize,
    /// Reader threads reading at once.
    pub threads: usize,
    /// `DistObj::read` nanoseconds per read (per thread).
    pub ours_ns: f64,
    /// `Arc::clone(&*lock.read().unwrap())` nanoseconds per read (per thread).
    pub baseline_ns: f64,
    /// Total `DistObj::read` reads per second over all threads.
    pub ours_reads_per_s: f64,
    /// Total baseline reads per second over all threads.
    pub baseline_reads_per_s: f64,
    /// `ours_ns / baseline_ns`.
    pub ratio: f64,
}

/// How reads scale from one thread to two.
#[derive(Debug, Clone, Serialize)]
pub struct ReadScaling {
    /// Value size.
    pub size_bytes: usize,
    /// `DistObj::read` throughput with 2 threads over that with 1.
    pub ours_2_vs_1: f64,
    /// The baseline's throughput with 2 threads over that with 1.
    pub baseline_2_vs_1: f64,
    /// The same for a loop that shares nothing between threads: about 2 when the machine
    /// gave the run two free cores, about 1 when other work took one.
    pub control_2_vs_1: f64,
}

/// Latency of a write or update on node 0 while the other nodes hold tokens.
#[derive(Debug, Clone, Serialize)]
pub struct WriteLatency {
    /// Nodes in the cluster.
    pub nodes: usize,
    /// Write policy of every node.
    pub policy: Policy,
    /// Timed operation.
    pub op: Op,
    /// Value size.
    pub size_bytes: usize,
    /// Latency of the operation.
    pub latency: Latency,
    /// Samples thrown away because the writer already held every token (MPI only).
    pub discarded: usize,
    /// The raw round trip of a frame of the same size on the same transport, if measured.
    pub floor_ns: Option<f64>,
    /// Typical latency over the floor.
    pub vs_floor: Option<f64>,
}

/// The protocol's own CPU time for one write with spread tokens on 2 nodes, on one thread
/// without a transport (see `write_cpu.rs`): with a raw round trip whose receivers spin, a
/// lower bound of the write's latency.
#[derive(Debug, Clone, Serialize)]
pub struct WriteCpu {
    /// Write policy of both nodes.
    pub policy: Policy,
    /// Writes timed (8 B values).
    pub writes: u64,
    /// Mean time per write from encoding the value to the writer's last frame encoded.
    pub critical_path_ns: f64,
    /// Mean time per write the peer then spends on that last frame, off the caller's path.
    pub peer_after_ns: f64,
}

/// Writes by a node that holds every token and that no other node disturbs.
#[derive(Debug, Clone, Serialize)]
pub struct OwnedWrite {
    /// Value size.
    pub size_bytes: usize,
    /// Writes timed.
    pub writes: u64,
    /// Nanoseconds per write in the fastest batch.
    pub ns_per_write: f64,
    /// Mean nanoseconds per write over all batches.
    pub mean_ns_per_write: f64,
    /// Protocol messages the nodes sent meanwhile (`Node::stats().messages_sent`, lease
    /// renewals aside; on MPI, the writer's node).
    pub messages_sent: u64,
    /// Frames the nodes handed to their transports meanwhile (`Node::stats().frames_sent`,
    /// those carrying only lease renewals aside; on MPI, the writer's node).
    pub frames_sent: u64,
}

/// Which system a mixed-workload figure is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// The library with the Update policy.
    Update,
    /// The library with the Invalidate policy.
    Invalidate,
    /// The central-server baseline.
    Central,
    /// MPI only: an MPI-3 RMA window of 8 bytes on rank 0 that every rank reads and writes
    /// one-sided.
    #[cfg_attr(not(feature = "mpi"), allow(dead_code))]
    Rma,
}

impl System {
    /// Every system, in the order of tables and plots.
    pub const ALL: [System; 4] = [
        System::Update,
        System::Invalidate,
        System::Central,
        System::Rma,
    ];

    /// The label in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            System::Update => "ours, update",
            System::Invalidate => "ours, invalidate",
            System::Central => "central server",
            System::Rma => "MPI RMA window",
        }
    }

    /// Whether this is the library (not a baseline).
    fn is_ours(self) -> bool {
        matches!(self, System::Update | System::Invalidate)
    }
}

/// A mixed read/write workload: one thread per node, each on its own node's handle of one
/// 8-byte object, for a fixed time.
#[derive(Debug, Clone, Serialize)]
pub struct Mixed {
    /// Nodes running the workload, one worker each; the central server's own endpoint is not
    /// counted. On MPI: the ranks of the world, one node each, except that under the central
    /// server rank 0 serves and runs no worker (`per_node` then lists its clients).
    pub nodes: usize,
    /// What ran it.
    pub system: System,
    /// Share of reads, in percent; the rest are writes.
    pub read_pct: u32,
    /// How long it ran, in seconds.
    pub secs: f64,
    /// Operations per second of each node.
    pub per_node: Vec<f64>,
    /// Sum over the nodes.
    pub total: f64,
    /// The slowest node's rate (fairness).
    pub min: f64,
    /// Total over the central server's total at the same mix (ours only).
    pub vs_central: Option<f64>,
    /// The slowest node's rate over the central server's slowest node (ours only).
    pub min_vs_central: Option<f64>,
    /// Total over the RMA window's total at the same mix (ours on MPI only).
    pub vs_rma: Option<f64>,
    /// The slowest node's rate over the RMA window's slowest rank (ours on MPI only).
    pub min_vs_rma: Option<f64>,
}

impl Mixed {
    /// The figure of `system` at `read_pct` % reads from each node's rate, over `secs`.
    pub fn new(
        nodes: usize,
        system: System,
        read_pct: u32,
        per_node: Vec<f64>,
        secs: f64,
    ) -> Mixed {
        Mixed {
            nodes,
            system,
            read_pct,
            secs,
            total: per_node.iter().sum(),
            min: per_node.iter().copied().fold(f64::INFINITY, f64::min),
            per_node,
            vs_central: None,
            min_vs_central: None,
            vs_rma: None,
            min_vs_rma: None,
        }
    }
}

/// A one-sided remote access of an MPI-3 RMA window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RmaOp {
    /// `MPI_Win_lock(MPI_LOCK_SHARED)`, `MPI_Get`, `MPI_Win_unlock`.
    Read,
    /// `MPI_Win_lock(MPI_LOCK_EXCLUSIVE)`, `MPI_Put`, `MPI_Win_unlock`.
    Write,
}

impl RmaOp {
    /// How the access is made.
    pub fn how(self) -> &'static str {
        match self {
            RmaOp::Read => "lock shared, MPI_Get, unlock",
            RmaOp::Write => "lock exclusive, MPI_Put, unlock",
        }
    }
}

/// Latency of one-sided accesses of rank 1 to a window on rank 0 (MPI, 2 ranks): the remote
/// access MPI itself offers, for comparison with ours.
#[cfg_attr(not(feature = "mpi"), allow(dead_code))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RmaLatency {
    /// The access.
    pub op: RmaOp,
    /// Bytes read or written (the whole window).
    pub size_bytes: usize,
    /// Time per access, epoch included.
    pub latency: Latency,
}

/// ZeroMQ between two OS processes (this one and a child it starts): the raw zmq.rs floor and
/// our writes, measured in the same run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TwoProcesses {
    /// Raw zmq.rs round trips between the two processes (ROUTER here, DEALER there).
    pub round_trips: Vec<RoundTrip>,
    /// Write and update latency: this process writes while the other holds a token.
    pub writes: Vec<WriteLatency>,
    /// The same with a shared secret: every connection a Noise session, every frame sealed.
    pub secret_writes: Vec<WriteLatency>,
}

/// Everything measured on one transport.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TransportReport {
    /// `local`, `zmq` or `mpi`.
    pub transport: String,
    /// MPI only: the ranks in the world, one node each.
    pub ranks: Option<usize>,
    /// Raw round trips, the floors.
    pub round_trips: Vec<RoundTrip>,
    /// Read hits.
    pub read_hits: Vec<ReadHit>,
    /// Read scaling from 1 to 2 threads.
    pub read_scaling: Vec<ReadScaling>,
    /// Write and update latency with spread tokens.
    pub writes: Vec<WriteLatency>,
    /// Writes holding every token.
    pub owned_writes: Vec<OwnedWrite>,
    /// MPI only, at 2 ranks: one-sided accesses of an RMA window.
    pub rma_latency: Vec<RmaLatency>,
    /// Mixed workloads: ours, the central server and (MPI) the RMA window.
    pub mixed: Vec<Mixed>,
    /// ZeroMQ only: the floor and the writes between two processes, which the acceptance
    /// ratio of writes uses.
    pub two_processes: Option<TwoProcesses>,
    /// What failed; the figures above are what could be measured anyway.
    pub errors: Vec<String>,
}

/// The first round trip in `trips` of a frame of `size_bytes`: the raw one, which every
/// transport's report lists first.
fn floor_ns(trips: &[RoundTrip], size_bytes: usize) -> Option<f64> {
    trips
        .iter()
        .find(|r| r.size_bytes == size_bytes)
        .map(|r| r.latency.typical_ns())
}

/// Fills `floor_ns` and `vs_floor` of `writes` from the round trips measured with them.
pub fn relate_to_floor(writes: &mut [WriteLatency], trips: &[RoundTrip]) {
    for w in writes {
        w.floor_ns = floor_ns(trips, w.size_bytes);
        w.vs_floor = w.floor_ns.map(|f| w.latency.typical_ns() / f);
    }
}

/// Merges a later measurement of round trips into `trips`: per row (size and method) the
/// better pass counts, and the worse worst pass shows the noise; new rows are added.
pub fn merge_round_trips(trips: &mut Vec<RoundTrip>, again: Vec<RoundTrip>) {
    for again in again {
        let same = trips
            .iter_mut()
            .find(|t| t.size_bytes == again.size_bytes && t.mode == again.mode);
        let Some(trip) = same else {
            trips.push(again);
            continue;
        };
        let worst = match (trip.latency.worst_pass_ns, again.latency.worst_pass_ns) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if again.latency.typical_ns() < trip.latency.typical_ns() {
            trip.latency = again.latency;
        }
        trip.latency.worst_pass_ns = worst;
    }
}

/// One of the project's acceptance ratios, checked.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Transport it was measured on.
    pub transport: String,
    /// What is required.
    pub criterion: String,
    /// The figures it rests on.
    pub measured: String,
    /// Whether it holds; `None` when not measured.
    pub holds: Option<bool>,
}

impl TransportReport {
    /// The floor of a frame of `size_bytes`.
    pub fn floor_ns(&self, size_bytes: usize) -> Option<f64> {
        floor_ns(&self.round_trips, size_bytes)
    }

    /// Fills `floor_ns` and `vs_floor` of the latency figures from the round trips.
    pub fn relate_to_floor(&mut self) {
        relate_to_floor(&mut self.writes, &self.round_trips);
    }

    /// Fills the ratios of our mixed figures to the central server's and the RMA window's at
    /// the same mix and node count.
    pub fn relate_to_baselines(&mut self) {
        let baselines: Vec<Mixed> = self
            .mixed
            .iter()
            .filter(|m| !m.system.is_ours())
            .cloned()
            .collect();
        let find = |m: &Mixed, system: System| {
            baselines
                .iter()
                .find(|b| b.system == system && b.nodes == m.nodes && b.read_pct == m.read_pct)
                .map(|b| (m.total / b.total, m.min / b.min))
        };
        for m in self.mixed.iter_mut().filter(|m| m.system.is_ours()) {
            if let Some((total, min)) = find(m, System::Central) {
                m.vs_central = Some(total);
                m.min_vs_central = Some(min);
            }
            if let Some((total, min)) = find(m, System::Rma) {
                m.vs_rma = Some(total);
                m.min_vs_rma = Some(min);
            }
        }
    }

    /// The project's acceptance ratios, as far as this transport measured them; `write_cpu`
    /// puts the write ratios next to their lower bound.
    pub fn verdicts(&self, write_cpu: &[WriteCpu]) -> Vec<Verdict> {
        let mut out = Vec::new();
        let mut verdict = |criterion: &str, measured: String, holds: Option<bool>| {
            out.push(Verdict {
                transport: self.transport.clone(),
                criterion: criterion.to_string(),
                measured,
                holds,
            });
        };
        for threads in [1, 2] {
            let hit = self
                .read_hits
                .iter()
                .find(|h| h.size_bytes == 8 && h.threads == threads);
            verdict(
                &format!("read hit <= 1.5x RwLock<Arc<T>> ({threads} thread(s), 8 B)"),
                hit.map_or("not measured".into(), |h| {
                    format!(
                        "{} vs {}: {:.2}x",
                        ns_label(h.ours_ns),
                        ns_label(h.baseline_ns),
                        h.ratio
                    )
                }),
                hit.map(|h| h.ratio <= 1.5),
            );
        }
        let scaling = self.read_scaling.iter().find(|s| s.size_bytes == 8);
        verdict(
            "2 reader threads >= 1.6x the throughput of 1 (8 B)",
            scaling.map_or("not measured".into(), |s| {
                format!(
                    "{:.2}x (RwLock baseline: {:.2}x; threads sharing nothing: {:.2}x)",
                    s.ours_2_vs_1, s.baseline_2_vs_1, s.control_2_vs_1
                )
            }),
            scaling.map(|s| s.ours_2_vs_1 >= 1.6),
        );
        // On ZeroMQ the target is set for two processes and a raw zmq.rs floor between them.
        let writes = self
            .two_processes
            .as_ref()
            .map_or(&self.writes, |two| &two.writes);
        for policy in Policy::BOTH {
            let write = writes.iter().find(|w| {
                w.nodes == 2 && w.policy == policy && w.op == Op::Write && w.size_bytes == 8
            });
            let pair = write.and_then(|w| w.vs_floor.map(|r| (w, r)));
            let criterion = if self.two_processes.is_some() {
                format!(
                    "write with spread tokens, 2 processes, {} policy <= 2x raw zmq.rs round \
                     trip between the two processes (8 B)",
                    policy.name()
                )
            } else {
                format!(
                    "write with spread tokens, 2 nodes, {} policy <= 2x raw round trip (8 B)",
                    policy.name()
                )
            };
            // A lower bound only against a floor that spins like our receivers do; the raw
            // zmq.rs floor between two processes sleeps in epoll, and our writes beat it.
            let cpu = write_cpu
                .iter()
                .find(|c| c.policy == policy && self.two_processes.is_none());
            verdict(
                &criterion,
                pair.map_or("not measured".into(), |(w, r)| {
                    let floor = w.floor_ns.unwrap_or(f64::NAN);
                    let mut text = format!(
                        "median {} vs {}: {r:.1}x",
                        ns_label(w.latency.typical_ns()),
                        ns_label(floor)
                    );
                    if let Some(c) = cpu {
                        let _ = write!(
                            text,
                            "; the state machine and codec alone take {} on the path (one \
                             thread, no transport), so a write takes at least {:.1}x",
                            ns_label(c.critical_path_ns),
                            (floor + c.critical_path_ns) / floor
                        );
                    }
                    text
                }),
                pair.map(|(_, r)| r <= 2.0),
            );
        }
        for system in [System::Update, System::Invalidate] {
            let mixed = self
                .mixed
                .iter()
                .find(|m| m.nodes == 2 && m.read_pct == 99 && m.system == system);
            let pair = mixed.and_then(|m| m.vs_central.map(|r| (m, r)));
            verdict(
                &format!(
                    "99% reads on 2 nodes >= 20x central server ops/s ({})",
                    system.label()
                ),
                pair.map_or("not measured".into(), |(m, r)| {
                    format!(
                        "{} vs {}: {r:.1}x (slowest node: {:.1}x)",
                        rate_label(m.total),
                        rate_label(m.total / r),
                        m.min_vs_central.unwrap_or(f64::NAN)
                    )
                }),
                pair.map(|(_, r)| r >= 20.0),
            );
        }
        let owned = self.owned_writes.iter().find(|o| o.size_bytes == 8);
        verdict(
            "write holding all tokens, durability 0: 0 messages and < 1 µs (8 B)",
            owned.map_or("not measured".into(), |o| {
                format!(
                    "{} messages, {} frames over {} writes; {} per write (best batch), {} (mean)",
                    o.messages_sent,
                    o.frames_sent,
                    o.writes,
                    ns_label(o.ns_per_write),
                    ns_label(o.mean_ns_per_write)
                )
            }),
            owned.map(|o| o.messages_sent == 0 && o.frames_sent == 0 && o.ns_per_write < 1000.0),
        );
        out
    }

    /// The markdown tables of this transport.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "## Transport: {}\n", self.transport);
        if let Some(ranks) = self.ranks {
            let _ = write!(
                s,
                "{ranks} MPI ranks, one node each. The central server is rank 0; its rows list \
                 the other ranks, its clients."
            );
            if ranks != 2 {
                let _ = write!(
                    s,
                    " Latency figures need exactly 2 ranks: `mpiexec -n 2` measures them."
                );
            }
            s.push_str("\n\n");
        }
        if !self.round_trips.is_empty() {
            let _ = writeln!(s, "### Raw round trip (the floor)\n");
            round_trip_table(&mut s, &self.round_trips);
        }
        if !self.read_hits.is_empty() {
            let _ = writeln!(s, "### Read hit vs `RwLock<Arc<T>>` read-and-clone\n");
            let _ = writeln!(
                s,
                "| value | threads | RwLock per read | ours per read | ours / RwLock | RwLock reads/s | ours reads/s |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|---|");
            for h in &self.read_hits {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.1} ns | {:.1} ns | {:.2}x | {} | {} |",
                    size_label(h.size_bytes),
                    h.threads,
                    h.baseline_ns,
                    h.ours_ns,
                    h.ratio,
                    rate_label(h.baseline_reads_per_s),
                    rate_label(h.ours_reads_per_s)
                );
            }
            let _ = writeln!(
                s,
                "\n| value | ours 2 threads / 1 | RwLock 2 threads / 1 | sharing nothing 2 / 1 |"
            );
            let _ = writeln!(s, "|---|---|---|---|");
            for r in &self.read_scaling {
                let _ = writeln!(
                    s,
                    "| {} | {:.2}x | {:.2}x | {:.2}x |",
                    size_label(r.size_bytes),
                    r.ours_2_vs_1,
                    r.baseline_2_vs_1,
                    r.control_2_vs_1
                );
            }
            s.push('\n');
        }
        if !self.writes.is_empty() {
            let _ = writeln!(s, "### Write and update latency with spread tokens\n");
            write_table(&mut s, &self.writes);
        }
        if !self.owned_writes.is_empty() {
            let _ = writeln!(
                s,
                "### Write holding every token (invalidate, durability 0, nobody else touches the object)\n"
            );
            let _ = writeln!(
                s,
                "| value | writes | per write, best batch | per write, mean | messages sent | frames sent |"
            );
            let _ = writeln!(s, "|---|---|---|---|---|---|");
            for o in &self.owned_writes {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    size_label(o.size_bytes),
                    o.writes,
                    ns_label(o.ns_per_write),
                    ns_label(o.mean_ns_per_write),
                    o.messages_sent,
                    o.frames_sent
                );
            }
            s.push('\n');
        }
        if !self.rma_latency.is_empty() {
            self.rma_markdown(&mut s);
        }
        if !self.mixed.is_empty() {
            let _ = writeln!(
                s,
                "### Mixed workloads (one thread per node, 8 B object), ops/s\n"
            );
            let rma = self.mixed.iter().any(|m| m.system == System::Rma);
            let _ = writeln!(
                s,
                "| nodes | reads | system | per node | total | slowest node | total / central | slowest / central |{}",
                if rma { " total / RMA | slowest / RMA |" } else { "" }
            );
            let _ = writeln!(
                s,
                "|---|---|---|---|---|---|---|---|{}",
                if rma { "---|---|" } else { "" }
            );
            let ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.1}x"));
            for m in &self.mixed {
                let per_node: Vec<String> = m.per_node.iter().map(|&r| rate_label(r)).collect();
                let _ = write!(
                    s,
                    "| {} | {} % | {} | {} | {} | {} | {} | {} |",
                    m.nodes,
                    m.read_pct,
                    m.system.label(),
                    per_node.join(", "),
                    rate_label(m.total),
                    rate_label(m.min),
                    ratio(m.vs_central),
                    ratio(m.min_vs_central)
                );
                if rma {
                    let _ = write!(s, " {} | {} |", ratio(m.vs_rma), ratio(m.min_vs_rma));
                }
                s.push('\n');
            }
            s.push('\n');
        }
        if let Some(two) = &self.two_processes {
            let _ = writeln!(
                s,
                "### Two processes: raw zmq.rs round trip (the floor)\n\n\
                 This process and a child it starts, on 127.0.0.1; the floor is a ROUTER here \
                 and a DEALER there, no library.\n"
            );
            round_trip_table(&mut s, &two.round_trips);
            let _ = writeln!(
                s,
                "### Two processes: write and update latency with spread tokens\n\n\
                 A `Node` over `ZmqTransport` in each process; this one writes while the child \
                 holds a token. Ratios are to the raw zmq.rs round trip above.\n"
            );
            write_table(&mut s, &two.writes);
            if !two.secret_writes.is_empty() {
                let _ = writeln!(
                    s,
                    "### Two processes: the same with a secret (Noise sessions)\n\n\
                     Every connection starts with a Noise handshake and every frame is \
                     encrypted and authenticated in its session. Measured in the same run, \
                     each policy right after its writes without a secret.\n"
                );
                write_table(&mut s, &two.secret_writes);
                secret_cost_table(&mut s, &two.writes, &two.secret_writes);
            }
        }
        if !self.errors.is_empty() {
            let _ = writeln!(s, "### Errors\n");
            for e in &self.errors {
                let _ = writeln!(s, "- {e}");
            }
            s.push('\n');
        }
        s
    }
}

impl TransportReport {
    /// The table of RMA window accesses next to ours, followed by a blank line.
    fn rma_markdown(&self, s: &mut String) {
        let _ = writeln!(
            s,
            "### One-sided access to an MPI RMA window vs ours (2 ranks)\n\n\
             Rank 1 reads or writes a window on rank 0, one lock epoch per access. Ours: the \
             same access through a `DistObj` (a read hit on 1 thread; a write while the other \
             rank holds a token).\n"
        );
        let _ = writeln!(
            s,
            "| access | value | RMA median | RMA p99 | samples | ours | ours typical | ours / RMA |"
        );
        let _ = writeln!(s, "|---|---|---|---|---|---|---|---|");
        for r in &self.rma_latency {
            let ours: Vec<(String, f64)> = match r.op {
                RmaOp::Read => self
                    .read_hits
                    .iter()
                    .filter(|h| h.size_bytes == r.size_bytes && h.threads == 1)
                    .map(|h| ("read hit, mean".to_string(), h.ours_ns))
                    .collect(),
                RmaOp::Write => self
                    .writes
                    .iter()
                    .filter(|w| w.size_bytes == r.size_bytes && w.op == Op::Write && w.nodes == 2)
                    .map(|w| {
                        (
                            format!("write, {} policy, median", w.policy.name()),
                            w.latency.typical_ns(),
                        )
                    })
                    .collect(),
            };
            let rma_ns = r.latency.typical_ns();
            let row = |s: &mut String, ours: &str, ours_ns: Option<f64>| {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {} | {} |",
                    r.op.how(),
                    size_label(r.size_bytes),
                    opt_ns(r.latency.median_ns),
                    opt_ns(r.latency.p99_ns),
                    r.latency.samples,
                    ours,
                    opt_ns(ours_ns),
                    ours_ns.map_or("-".into(), |o| format!("{:.2}x", o / rma_ns))
                );
            };
            if ours.is_empty() {
                row(s, "not measured", None);
            }
            for (what, ns) in ours {
                row(s, &what, Some(ns));
            }
        }
        s.push('\n');
    }
}

/// The table of raw round trips, followed by a blank line.
fn round_trip_table(s: &mut String, trips: &[RoundTrip]) {
    let _ = writeln!(
        s,
        "| frame | how | median | mean | p99 | samples | worst pass median |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|");
    for r in trips {
        let l = &r.latency;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            size_label(r.size_bytes),
            r.mode,
            opt_ns(l.median_ns),
            ns_label(l.mean_ns),
            opt_ns(l.p99_ns),
            l.samples,
            opt_ns(l.worst_pass_ns)
        );
    }
    s.push('\n');
}

/// The table of write and update latencies, followed by a blank line.
fn write_table(s: &mut String, writes: &[WriteLatency]) {
    let _ = writeln!(
        s,
        "| nodes | policy | op | value | median | mean | p99 | samples | worst pass median | median / raw RTT |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for w in writes {
        let l = &w.latency;
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            w.nodes,
            w.policy.name(),
            w.op.name(),
            size_label(w.size_bytes),
            opt_ns(l.median_ns),
            ns_label(l.mean_ns),
            opt_ns(l.p99_ns),
            l.samples,
            opt_ns(l.worst_pass_ns),
            w.vs_floor.map_or("-".into(), |r| format!("{r:.1}x"))
        );
    }
    s.push('\n');
}

/// Each write's typical latency with a secret over the same write's without one.
fn secret_cost_table(s: &mut String, open: &[WriteLatency], sealed: &[WriteLatency]) {
    let _ = writeln!(
        s,
        "| policy | op | value | without | with a secret | ratio |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for w in sealed {
        let same = open
            .iter()
            .find(|o| o.policy == w.policy && o.op == w.op && o.size_bytes == w.size_bytes);
        let Some(o) = same else { continue };
        let (without, with) = (o.latency.typical_ns(), w.latency.typical_ns());
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {:.2}x |",
            w.policy.name(),
            w.op.name(),
            size_label(w.size_bytes),
            ns_label(without),
            ns_label(with),
            with / without
        );
    }
    s.push('\n');
}

fn opt_ns(ns: Option<f64>) -> String {
    ns.map_or("-".into(), ns_label)
}

/// The table of the protocol's own CPU time per write.
pub fn write_cpu_markdown(write_cpu: &[WriteCpu]) -> String {
    let mut s = String::from(
        "## The protocol's own CPU time per write (2 nodes, one thread, no transport)\n\n\
         The critical path plus a raw round trip whose receivers spin (local, MPI) is a lower \
         bound of a write's latency there. The raw zmq.rs floor between two processes sleeps \
         in epoll instead, so it bounds nothing.\n\n",
    );
    let _ = writeln!(s, "| policy | writes | critical path | peer, afterwards |");
    let _ = writeln!(s, "|---|---|---|---|");
    for c in write_cpu {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            c.policy.name(),
            c.writes,
            ns_label(c.critical_path_ns),
            ns_label(c.peer_after_ns)
        );
    }
    s
}

/// The acceptance table.
pub fn verdicts_markdown(verdicts: &[Verdict]) -> String {
    let mut s = String::from("## Acceptance ratios\n\n");
    let _ = writeln!(s, "| transport | criterion | measured | verdict |");
    let _ = writeln!(s, "|---|---|---|---|");
    for v in verdicts {
        let verdict = match v.holds {
            Some(true) => "holds",
            Some(false) => "MISSES",
            None => "not measured",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            v.transport, v.criterion, v.measured, verdict
        );
    }
    s
}

/// The whole run, as written to the JSON file.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The command line.
    pub command: Vec<String>,
    /// Whether `--quick` shortened everything.
    pub quick: bool,
    /// Logical CPUs of this machine.
    pub cpus: usize,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix_s: u64,
    /// Wall-clock seconds the run took.
    pub elapsed_s: f64,
    /// The protocol's own CPU time per write, per policy.
    pub write_cpu: Vec<WriteCpu>,
    /// Figures per transport.
    pub transports: Vec<TransportReport>,
    /// The acceptance ratios.
    pub verdicts: Vec<Verdict>,
    /// What failed outside any transport (the protocol's own CPU time).
    pub errors: Vec<String>,
}
