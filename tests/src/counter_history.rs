//! The history of the real-process fault matrix (`fault_node` processes, driven by
//! `fault_matrix`): every node process updates (increments) and reads one shared counter and
//! logs each operation with its start and end on the machine's monotonic clock, which all
//! processes share, network namespaces included. [`check`] then decides whether the history
//! is linearizable, lost no write that returned, and returned no value twice.
//!
//! An update returns the counter's new value, so the value names the update's place in any
//! linearization: the update that returned `v` is the `v`-th, and a read of `v` sits between
//! it and the `v+1`-th. That makes the check exact and linear in the history's length, where a
//! general linearizability search would be exponential.

use std::collections::BTreeMap;
use std::fmt;

/// Nanoseconds on `CLOCK_MONOTONIC`: the same clock in every process of this machine.
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC exists on every Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What an operation was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `update(|v| v + 1)`, which returns the new value.
    Update,
    /// `read()`.
    Read,
}

/// How an operation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It returned this value.
    Ok(i64),
    /// It failed in a way that guarantees it had no effect (`Interrupted`, `NoMajority`).
    NoEffect(String),
    /// It failed, or its process died, without saying whether it took effect (a timeout, a
    /// node cut off or removed under it, a SIGKILL mid-write): the update of `attempted`
    /// (the value its function computed, if it ran) may have taken effect.
    Unknown {
        /// The value the update's function returned, if it ran.
        attempted: Option<i64>,
        /// What was reported.
        error: String,
    },
}

/// One operation of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Which process (its label in the matrix, e.g. `p2`, or `p2'` after it rejoined).
    pub process: String,
    /// What it was.
    pub kind: Kind,
    /// When it started (ns, [`now_ns`]).
    pub start: u64,
    /// When it ended; `u64::MAX` for an update whose process was killed under it.
    pub end: u64,
    /// How it ended.
    pub ending: Ending,
}

impl fmt::Display for Op {
    /// The line `fault_node` prints for an operation: `op U|R START END ok V`,
    /// `op U|R START END none ERROR` or `op U START END unknown V|- ERROR`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Update => "U",
            Kind::Read => "R",
        };
        write!(f, "op {kind} {} {} ", self.start, self.end)?;
        match &self.ending {
            Ending::Ok(v) => write!(f, "ok {v}"),
            Ending::NoEffect(e) => write!(f, "none {e}"),
            Ending::Unknown { attempted, error } => match attempted {
                Some(v) => write!(f, "unknown {v} {error}"),
                None => write!(f, "unknown - {error}"),
            },
        }
    }
}

impl Op {
    /// Parses a line printed by [`Op`]'s `Display` for `process`; `None` for other lines.
    pub fn parse(process: &str, line: &str) -> Option<Op> {
        let mut words = line.split_whitespace();
        if words.next()? != "op" {
            return None;
        }
        let kind = match words.next()? {
            "U" => Kind::Update,
            "R" => Kind::Read,
            _ => return None,
        };
        let start = words.next()?.parse().ok()?;
        let end = words.next()?.parse().ok()?;
        let rest: Vec<&str> = words.collect();
        let ending = match rest.as_slice() {
            ["ok", v] => Ending::Ok(v.parse().ok()?),
            ["none", error @ ..] => Ending::NoEffect(error.join(" ")),
            ["unknown", v, error @ ..] => Ending::Unknown {
                attempted: if *v == "-" {
                    None
                } else {
                    Some(v.parse().ok()?)
                },
                error: error.join(" "),
            },
            _ => return None,
        };
        Some(Op {
            process: process.to_string(),
            kind,
            start,
            end,
            ending,
        })
    }
}

/// The operations placed so far, as far as the ones still to place care.
struct Walk<'a> {
    latest_start: u64,
    latest_by: Option<&'a Op>,
}

impl<'a> Walk<'a> {
    /// `op`, placed next, must not have ended before an operation placed earlier began.
    fn check(&self, op: &Op, place: &str) -> Result<(), String> {
        match self.latest_by {
            Some(by) if op.end < self.latest_start => Err(format!(
                "not linearizable: {} {place} ({op}) ended before {} began an operation that \
                 the counter orders before it ({by})",
                op.process, by.process
            )),
            _ => Ok(()),
        }
    }

    fn passed(&mut self, op: &'a Op) {
        if op.start > self.latest_start {
            self.latest_start = op.start;
            self.latest_by = Some(op);
        }
    }
}

/// What [`check`] counted in a history that passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Updates that returned Ok.
    pub ok_updates: usize,
    /// Updates of unknown outcome, and how many of them took effect (the final value says).
    pub unknown_updates: usize,
    /// Unknown updates that took effect.
    pub unknown_took_effect: usize,
    /// Reads that returned a value.
    pub ok_reads: usize,
    /// Operations that failed without effect.
    pub no_effect: usize,
}

/// Checks a counter history that ended at `final_value` (read by every process after the
/// last operation): no value returned by two updates, no returned update lost (every value
/// an update returned is at most the final value), every value up to the final one written
/// by an update that returned it or may have taken effect, and every operation placed by its
/// value in an order that respects real time (an operation that ended before another began
/// comes first).
pub fn check(ops: &[Op], final_value: i64) -> Result<Summary, String> {
    let mut summary = Summary {
        ok_updates: 0,
        unknown_updates: 0,
        unknown_took_effect: 0,
        ok_reads: 0,
        no_effect: 0,
    };
    // The update at each place of the order: the one that returned the value, or else the
    // earliest-starting one of unknown outcome that computed it.
    let mut returned: BTreeMap<i64, &Op> = BTreeMap::new();
    let mut maybe: BTreeMap<i64, &Op> = BTreeMap::new();
    let mut reads: BTreeMap<i64, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        match (&op.ending, op.kind) {
            (Ending::Ok(v), Kind::Update) => {
                summary.ok_updates += 1;
                if let Some(other) = returned.insert(*v, op) {
                    return Err(format!(
                        "value {v} returned by two updates: {} ({other}) and {} ({op})",
                        other.process, op.process
                    ));
                }
                if *v > final_value || *v < 1 {
                    return Err(format!(
                        "{} returned {v} from an update ({op}), but the final value is \
                         {final_value}: a returned write was lost",
                        op.process
                    ));
                }
            }
            (Ending::Ok(v), Kind::Read) => {
                summary.ok_reads += 1;
                if *v > final_value || *v < 0 {
                    return Err(format!(
                        "{} read {v} ({op}), outside 0..={final_value}",
                        op.process
                    ));
                }
                reads.entry(*v).or_default().push(op);
            }
            (Ending::NoEffect(_), _) => summary.no_effect += 1,
            (Ending::Unknown { attempted, .. }, Kind::Update) => {
                summary.unknown_updates += 1;
                if let Some(v) = attempted {
                    let earlier = maybe.get(v).is_some_and(|o| o.start <= op.start);
                    if !earlier {
                        maybe.insert(*v, op);
                    }
                }
            }
            (Ending::Unknown { .. }, Kind::Read) => summary.no_effect += 1,
        }
    }
    let mut order: Vec<&Op> = Vec::with_capacity(final_value.max(0) as usize);
    for v in 1..=final_value {
        match (returned.get(&v), maybe.get(&v)) {
            (Some(op), _) => order.push(op),
            (None, Some(op)) => {
                summary.unknown_took_effect += 1;
                order.push(op);
            }
            (None, None) => {
                return Err(format!(
                    "the final value is {final_value}, but no update that returned or may have \
                     taken effect made the counter {v}"
                ))
            }
        }
    }
    // Walk the order: every operation must end no earlier than the latest start of those
    // placed before it (else it ended before one of them began). Reads of one value may
    // take any order among themselves.
    let mut walk = Walk {
        latest_start: 0,
        latest_by: None,
    };
    let no_reads = Vec::new();
    for value in 0..=final_value {
        if value > 0 {
            let op = order[value as usize - 1];
            walk.check(op, &format!("update to {value}"))?;
            walk.passed(op);
        }
        let group = reads.get(&value).unwrap_or(&no_reads);
        for op in group {
            walk.check(op, &format!("read {value}"))?;
        }
        for op in group {
            walk.passed(op);
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: &str, kind: Kind, start: u64, end: u64, ending: Ending) -> Op {
        Op {
            process: process.into(),
            kind,
            start,
            end,
            ending,
        }
    }

    fn update(p: &str, start: u64, end: u64, v: i64) -> Op {
        op(p, Kind::Update, start, end, Ending::Ok(v))
    }

    fn read(p: &str, start: u64, end: u64, v: i64) -> Op {
        op(p, Kind::Read, start, end, Ending::Ok(v))
    }

    fn unknown(p: &str, start: u64, v: i64) -> Op {
        let ending = Ending::Unknown {
            attempted: Some(v),
            error: "killed".into(),
        };
        op(p, Kind::Update, start, u64::MAX, ending)
    }

    #[test]
    fn lines_round_trip() {
        for o in [
            update("p0", 1, 2, 3),
            read("p1", 4, 5, 0),
            op(
                "p2",
                Kind::Read,
                1,
                9,
                Ending::NoEffect("no majority".into()),
            ),
            unknown("p3", 7, 8),
            op(
                "p3",
                Kind::Update,
                1,
                2,
                Ending::Unknown {
                    attempted: None,
                    error: "cut off".into(),
                },
            ),
        ] {
            assert_eq!(Op::parse(&o.process, &o.to_string()), Some(o.clone()));
        }
        assert_eq!(Op::parse("p0", "ready 3"), None);
    }

    #[test]
    fn a_concurrent_history_passes() {
        let ops = [
            read("a", 0, 5, 0),
            update("a", 1, 10, 2),
            update("b", 2, 6, 1),
            read("b", 7, 8, 1),
            read("a", 11, 12, 2),
            unknown("c", 3, 3),
            read("b", 20, 21, 3),
        ];
        let summary = check(&ops, 3).unwrap();
        assert_eq!(summary.ok_updates, 2);
        assert_eq!(summary.unknown_took_effect, 1);
    }

    #[test]
    fn a_value_returned_twice_fails() {
        let ops = [update("a", 1, 2, 1), update("b", 3, 4, 1)];
        assert!(check(&ops, 1).unwrap_err().contains("returned by two"));
    }

    #[test]
    fn a_lost_write_fails() {
        let ops = [update("a", 1, 2, 1), update("b", 3, 4, 2)];
        assert!(check(&ops, 1).unwrap_err().contains("was lost"));
    }

    #[test]
    fn a_value_nobody_wrote_fails() {
        let ops = [update("a", 1, 2, 1)];
        assert!(check(&ops, 2).unwrap_err().contains("made the counter 2"));
    }

    #[test]
    fn a_stale_read_fails() {
        // "b" read 1 after the update to 2 had returned.
        let ops = [
            update("a", 1, 2, 1),
            update("a", 3, 4, 2),
            read("b", 5, 6, 1),
        ];
        assert!(check(&ops, 2).unwrap_err().contains("not linearizable"));
    }

    #[test]
    fn updates_out_of_real_time_order_fail() {
        // The update to 2 returned before the update to 1 began.
        let ops = [update("a", 1, 2, 2), update("b", 3, 4, 1)];
        assert!(check(&ops, 2).unwrap_err().contains("not linearizable"));
    }

    #[test]
    fn a_read_from_the_future_fails() {
        let ops = [read("b", 1, 2, 1), update("a", 3, 4, 1)];
        assert!(check(&ops, 1).unwrap_err().contains("not linearizable"));
    }
}
