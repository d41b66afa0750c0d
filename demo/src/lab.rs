//! The lab's scenario (`mpiexec -n 4 python main.py`), written against one [`Node`] per
//! participant so that any transport can run it.
//!
//! `n` participants with ranks `0..n` take turns: in the integer test each writes a distinct
//! value to `"int"`, in the dictionary test each inserts its own key into `"dict"`, and after
//! every turn every participant reads and checks that it sees exactly what was written. Then a
//! late joiner opens both objects with different init values and must see the current ones.
//! Finally every node shuts down.
//!
//! A runner supplies the environment through [`Harness`]: how participants meet between turns,
//! how library calls are watched, and where observations go.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coherence_core::{DistObj, Error, Node, NodeId};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The integer object of the first test.
const INT: &str = "int";
/// The dictionary object of the second test.
const DICT: &str = "dict";
/// What the late joiner passes as `init` for `"int"`; it must never see it.
const LATE_INT_INIT: i64 = -1;

/// The value type of `"dict"`.
type Dict = BTreeMap<String, i64>;

/// Where in the scenario an observation was made; the report is printed in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Step {
    /// Every node opened `"int"` and read it.
    IntOpened,
    /// The node with this rank wrote `"int"`, then every node read it.
    IntWrite(usize),
    /// Every node opened `"dict"` and read it.
    DictOpened,
    /// The node with this rank inserted its key into `"dict"`, then every node read it.
    DictInsert(usize),
    /// The late joiner opened both objects.
    LateJoin,
    /// The nodes shut down.
    Shutdown,
}

impl Step {
    /// The heading of the part of the scenario this step belongs to.
    pub fn section(self) -> &'static str {
        match self {
            Step::IntOpened | Step::IntWrite(_) => {
                "integer test: each node writes \"int\" in turn, every node reads it"
            }
            Step::DictOpened | Step::DictInsert(_) => {
                "dictionary test: each node inserts its key into \"dict\" in turn, every node reads it"
            }
            Step::LateJoin => "late joiner: a new node opens both objects with other init values",
            Step::Shutdown => "shutdown: every node leaves at the same time",
        }
    }
}

/// One line of the report: what one node saw at one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    /// When.
    pub step: Step,
    /// Who.
    pub node: NodeId,
    /// What, e.g. `int: read 30 after node 2's write (version 3)`.
    pub text: String,
}

/// A coherent run: what every node saw, in scenario order (by step, then node, then the order
/// the node saw things in).
#[derive(Debug)]
pub struct Report {
    /// Every observation, in report order.
    pub observations: Vec<Observation>,
}

/// An incoherent or failed run.
#[derive(Debug)]
pub struct Failure {
    /// What the nodes saw before the run stopped, in the same order as [`Report`]'s.
    pub observations: Vec<Observation>,
    /// Why the run is not coherent: wrong values, library errors, panics, hangs.
    pub reasons: Vec<String>,
}

/// A report if `reasons` is empty, a failure otherwise; sorts the observations into report
/// order first (by step, then node; stable, so each node's own order stays).
pub fn outcome(
    mut observations: Vec<Observation>,
    reasons: Vec<String>,
) -> Result<Report, Failure> {
    observations.sort_by_key(|o| (o.step, o.node));
    if reasons.is_empty() {
        Ok(Report { observations })
    } else {
        Err(Failure {
            observations,
            reasons,
        })
    }
}

/// How far the turn-taking nodes of a multi-process run (ZeroMQ, MPI) have got, and whether
/// one of them gave up: the value of the shared barrier object.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Barrier {
    /// Arrivals so far, over every round.
    pub arrivals: u64,
    /// Why a node called the run off, naming the node.
    pub failed: Option<String>,
}

impl Barrier {
    /// Waits until `target` arrivals are in, reading the barrier with `read` every 200 µs, for
    /// at most `patience`. `who` prefixes a timeout's reason (say, "node 2: ").
    pub fn wait_for(
        target: u64,
        patience: Duration,
        who: &str,
        mut read: impl FnMut() -> Result<Arc<Barrier>, Stop>,
    ) -> Result<(), Stop> {
        let deadline = Instant::now() + patience;
        loop {
            let b = read()?;
            if b.failed.is_some() {
                return Err(Stop::Aborted);
            }
            if b.arrivals >= target {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Stop::Failed(format!(
                    "{who}barrier: {} of {target} arrivals within {patience:?}",
                    b.arrivals
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// What one process of a multi-process run reports at the end.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessResult {
    /// What its node saw.
    pub observations: Vec<Observation>,
    /// Why it failed, naming its node.
    pub failure: Option<String>,
}

/// Every process's result by node id: the value of the shared results object.
pub type Results = BTreeMap<NodeId, ProcessResult>;

/// Combines every process's result into the run's verdict: coherent only if all `total`
/// processes reported, none failed and this node's `shutdown` did not fail either.
pub fn verdict(
    all: Result<Results, String>,
    shutdown: Option<String>,
    total: usize,
) -> Result<Report, Failure> {
    let mut reasons: Vec<String> = shutdown.into_iter().collect();
    let results = all.unwrap_or_else(|e| {
        reasons.push(e);
        Results::new()
    });
    let mut observations = Vec::new();
    for result in results.values() {
        observations.extend(result.observations.iter().cloned());
        reasons.extend(result.failure.iter().cloned());
    }
    if results.len() < total && reasons.is_empty() {
        reasons.push(format!("only {} of {total} nodes reported", results.len()));
    }
    outcome(observations, reasons)
}

/// Why a scenario function stopped early.
#[derive(Debug)]
pub enum Stop {
    /// This node saw something wrong, or a library call failed; the text says what.
    Failed(String),
    /// Another participant failed, so the run was called off.
    Aborted,
}

/// What the scenario needs from whoever runs it.
pub trait Harness {
    /// Waits until every participant has reached this point; [`Stop::Aborted`] once the run
    /// has been called off.
    fn sync(&self) -> Result<(), Stop>;

    /// Runs one library call, described by `what`, so the harness can notice one that outlives
    /// the configured timeout.
    fn watch<R>(&self, what: &str, call: impl FnOnce() -> R) -> R;

    /// Records what a node saw.
    fn observe(&self, observation: Observation);
}

/// The value the node with rank `turn` writes to `"int"`.
fn int_value(turn: usize) -> i64 {
    (turn as i64 + 1) * 10
}

/// The key and value the node with rank `turn` inserts into `"dict"`.
fn dict_entry(turn: usize) -> (String, i64) {
    (format!("node{turn}"), (turn as i64 + 1) * 100)
}

/// `"dict"` once the nodes with ranks `0..turns` have inserted their keys.
fn dict_after(turns: usize) -> Dict {
    (0..turns).map(dict_entry).collect()
}

/// Runs one library call through the harness, turning an error into [`Stop::Failed`].
///
/// The call is a span, so that `--trace` shows the scenario's steps as the lab's code makes
/// them (`write of 20 to "int"`, `read of "int"`), reads served locally included, around the
/// library's own slices for the operations that had to ask other nodes.
fn call<H: Harness, R>(
    harness: &H,
    node: NodeId,
    what: &str,
    f: impl FnOnce() -> Result<R, Error>,
) -> Result<R, Stop> {
    let _call = tracing::debug_span!("call", node, call = what).entered();
    harness
        .watch(what, f)
        .map_err(|e| Stop::Failed(format!("node {node}: {what} failed: {e}")))
}

/// Reads `object` on `node`, records what it saw and checks it is `expected` at
/// `expected_version`. `when` says what the node should be seeing, e.g. "after node 2's write".
fn check<T, H>(
    harness: &H,
    node: NodeId,
    step: Step,
    object: &DistObj<T>,
    expected: &T,
    expected_version: u64,
    when: &str,
) -> Result<(), Stop>
where
    T: Serialize + DeserializeOwned + Send + Sync + PartialEq + Debug + 'static,
    H: Harness,
{
    let name = object.name();
    let value = call(harness, node, &format!("read of {name:?}"), || {
        object.read()
    })?;
    let version = object.version();
    harness.observe(Observation {
        step,
        node,
        text: format!("{name}: read {value:?} {when} (version {version})"),
    });
    if *value != *expected {
        return Err(Stop::Failed(format!(
            "node {node} read {value:?} from {name:?} {when}, expected {expected:?}"
        )));
    }
    if version != expected_version {
        return Err(Stop::Failed(format!(
            "node {node} holds version {version} of {name:?} {when}, expected version \
             {expected_version}"
        )));
    }
    Ok(())
}

/// The part of participant `rank` (of `n`) in the integer and dictionary tests.
///
/// Every participant opens `"int"` with init 0; then, for each rank in order, that rank writes
/// its value, everyone syncs, everyone reads and checks, everyone syncs. The same again for
/// `"dict"`, where each rank inserts its key with `update`. The node stays up afterwards so a
/// late joiner can find the objects; shut it down with [`shut_down`].
pub fn run_participant<H: Harness>(
    node: &Node,
    rank: usize,
    n: usize,
    harness: &H,
) -> Result<(), Stop> {
    let me = node.id();

    let int: DistObj<i64> = call(harness, me, "open of \"int\"", || node.object(INT, 0))?;
    check(harness, me, Step::IntOpened, &int, &0, 0, "on open")?;
    harness.sync()?;
    for turn in 0..n {
        let value = int_value(turn);
        if turn == rank {
            call(harness, me, &format!("write of {value} to \"int\""), || {
                int.write(value)
            })?;
        }
        harness.sync()?;
        let when = format!("after node {turn}'s write");
        check(
            harness,
            me,
            Step::IntWrite(turn),
            &int,
            &value,
            turn as u64 + 1,
            &when,
        )?;
        harness.sync()?;
    }

    let dict: DistObj<Dict> = call(harness, me, "open of \"dict\"", || {
        node.object(DICT, Dict::new())
    })?;
    check(
        harness,
        me,
        Step::DictOpened,
        &dict,
        &Dict::new(),
        0,
        "on open",
    )?;
    harness.sync()?;
    for turn in 0..n {
        if turn == rank {
            let (key, value) = dict_entry(turn);
            let what = format!("insert of {key:?} into \"dict\"");
            let previous = call(harness, me, &what, || {
                dict.update(|map| map.insert(key.clone(), value))
            })?;
            if let Some(previous) = previous {
                return Err(Stop::Failed(format!(
                    "node {me} found {key:?} already in \"dict\" (= {previous}) before inserting it"
                )));
            }
        }
        harness.sync()?;
        let when = format!("after node {turn}'s insert");
        let expected = dict_after(turn + 1);
        check(
            harness,
            me,
            Step::DictInsert(turn),
            &dict,
            &expected,
            turn as u64 + 1,
            &when,
        )?;
        harness.sync()?;
    }
    Ok(())
}

/// The late joiner's part, once the `n` participants have finished their tests: it opens
/// `"int"` and `"dict"` with init values nobody wrote and checks it sees the current values.
pub fn run_late_joiner<H: Harness>(node: &Node, n: usize, harness: &H) -> Result<(), Stop> {
    let me = node.id();
    let version = n as u64;

    let int: DistObj<i64> = call(harness, me, "open of \"int\"", || {
        node.object(INT, LATE_INT_INIT)
    })?;
    let when = format!("on open, not its init {LATE_INT_INIT}");
    check(
        harness,
        me,
        Step::LateJoin,
        &int,
        &int_value(n - 1),
        version,
        &when,
    )?;

    let init = Dict::from([("late".to_string(), -1)]);
    let when = format!("on open, not its init {init:?}");
    let dict: DistObj<Dict> = call(harness, me, "open of \"dict\"", || node.object(DICT, init))?;
    check(
        harness,
        me,
        Step::LateJoin,
        &dict,
        &dict_after(n),
        version,
        &when,
    )
}

/// Shuts `node` down and records how long it took.
pub fn shut_down<H: Harness>(node: Node, harness: &H) -> Result<(), Stop> {
    let me = node.id();
    let start = Instant::now();
    call(harness, me, "shutdown", || node.shutdown())?;
    harness.observe(Observation {
        step: Step::Shutdown,
        node: me,
        text: format!("shut down in {:.1?}", start.elapsed()),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(node: NodeId, failure: Option<&str>) -> ProcessResult {
        ProcessResult {
            observations: vec![Observation {
                step: Step::IntOpened,
                node,
                text: format!("seen by {node}"),
            }],
            failure: failure.map(str::to_string),
        }
    }

    #[test]
    fn verdict_needs_every_result_and_no_failure() {
        let all: Results = (0..3).map(|n| (n, result(n, None))).collect();
        let report = verdict(Ok(all.clone()), None, 3).unwrap();
        assert_eq!(report.observations.len(), 3);

        let failure = verdict(Ok(all.clone()), None, 4).unwrap_err();
        assert_eq!(failure.reasons, vec!["only 3 of 4 nodes reported"]);

        let failure = verdict(Ok(all), Some("node 0: shutdown failed".into()), 3).unwrap_err();
        assert_eq!(failure.reasons, vec!["node 0: shutdown failed"]);

        let mut some_failed: Results = (0..2).map(|n| (n, result(n, None))).collect();
        some_failed.insert(2, result(2, Some("node 2 read 3, expected 4")));
        let failure = verdict(Ok(some_failed), None, 3).unwrap_err();
        assert_eq!(failure.reasons, vec!["node 2 read 3, expected 4"]);
        assert_eq!(failure.observations.len(), 3);

        let failure = verdict(Err("only 1 of 3 nodes reported".into()), None, 3).unwrap_err();
        assert_eq!(failure.reasons, vec!["only 1 of 3 nodes reported"]);
    }

    #[test]
    fn expected_values() {
        assert_eq!(int_value(0), 10);
        assert_eq!(int_value(3), 40);
        assert_eq!(dict_after(0), Dict::new());
        assert_eq!(
            dict_after(2),
            Dict::from([("node0".into(), 100), ("node1".into(), 200)])
        );
    }

    #[test]
    fn steps_sort_in_scenario_order() {
        let mut steps = vec![
            Step::Shutdown,
            Step::DictInsert(0),
            Step::IntWrite(1),
            Step::LateJoin,
            Step::IntWrite(0),
            Step::DictOpened,
            Step::IntOpened,
        ];
        steps.sort();
        assert_eq!(
            steps,
            vec![
                Step::IntOpened,
                Step::IntWrite(0),
                Step::IntWrite(1),
                Step::DictOpened,
                Step::DictInsert(0),
                Step::LateJoin,
                Step::Shutdown,
            ]
        );
    }
}
