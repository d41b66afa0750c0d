//! SVG plots of one transport's figures: latency against nodes, throughput against read share.

use std::path::Path;

use plotters::prelude::*;

use crate::report::{Op, Policy, System, TransportReport, MIXES};

/// One line of a plot: its name and points.
type Series = (String, Vec<(f64, f64)>);

/// A tick label: `250`, `1.5`, `20k`, `3M`.
fn compact(y: f64) -> String {
    let (value, unit) = if y >= 1e6 {
        (y / 1e6, "M")
    } else if y >= 1e3 {
        (y / 1e3, "k")
    } else {
        (y, "")
    };
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}{unit}")
}

/// Draws `series` (x, y > 0) on a log-scaled y axis, with `x_label` formatting the x ticks.
fn draw(
    path: &Path,
    title: &str,
    (x_desc, y_desc): (&str, &str),
    x_range: std::ops::Range<f64>,
    x_label: &dyn Fn(&f64) -> String,
    series: &[Series],
) -> Result<(), String> {
    let ys = series.iter().flat_map(|(_, p)| p.iter().map(|&(_, y)| y));
    let (lo, hi) = ys
        .filter(|y| y.is_finite() && *y > 0.0)
        .fold((f64::MAX, f64::MIN), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if lo > hi {
        return Err(format!("{}: nothing to plot", path.display()));
    }
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(80)
        .build_cartesian_2d(x_range, (lo / 1.5..hi * 1.5).log_scale())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(x_label)
        .y_label_formatter(&|y| compact(*y))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = points.iter().copied().filter(|&(_, y)| y > 0.0).collect();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(PointSeries::of_element(
                points,
                4,
                color.filled(),
                &|c, s, st| Circle::new(c, s, st),
            ))
            .map_err(|e| err(&e))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))
}

/// `latency_vs_nodes-<transport>.svg`: median write and update latency (8 B) per policy
/// against the number of nodes, with the raw round trip as the floor.
pub fn latency_vs_nodes(dir: &Path, report: &TransportReport) -> Result<(), String> {
    let mut series: Vec<Series> = Vec::new();
    for policy in Policy::BOTH {
        for op in Op::BOTH {
            let points: Vec<(f64, f64)> = report
                .writes
                .iter()
                .filter(|w| w.policy == policy && w.op == op && w.size_bytes == 8)
                .map(|w| (w.nodes as f64, w.latency.typical_ns() / 1e3))
                .collect();
            if !points.is_empty() {
                series.push((format!("{}, {} policy", op.name(), policy.name()), points));
            }
        }
    }
    let nodes: Vec<f64> = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|&(x, _)| x))
        .collect();
    let (min, max) = nodes
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    if let Some(floor) = report.floor_ns(8) {
        series.push((
            "raw round trip (floor)".into(),
            vec![(min, floor / 1e3), (max, floor / 1e3)],
        ));
    }
    draw(
        &dir.join(format!("latency_vs_nodes-{}.svg", report.transport)),
        &format!(
            "{}: write latency with spread tokens, 8 B (median)",
            report.transport
        ),
        ("nodes", "latency (µs)"),
        min - 0.5..max + 0.5,
        &|x| format!("{x:.0}"),
        &series,
    )
}

/// `throughput_vs_read_share-<transport>.svg`: total ops/s of ours and the central server
/// against the share of reads, per node count.
pub fn throughput_vs_read_share(dir: &Path, report: &TransportReport) -> Result<(), String> {
    let mut series: Vec<Series> = Vec::new();
    let mut counts: Vec<usize> = report.mixed.iter().map(|m| m.nodes).collect();
    counts.sort_unstable();
    counts.dedup();
    for nodes in counts {
        for system in System::ALL {
            let points: Vec<(f64, f64)> = report
                .mixed
                .iter()
                .filter(|m| m.nodes == nodes && m.system == system)
                .filter_map(|m| {
                    let x = MIXES.iter().position(|&pct| pct == m.read_pct)?;
                    Some((x as f64, m.total))
                })
                .collect();
            if !points.is_empty() {
                series.push((format!("{nodes} nodes, {}", system.label()), points));
            }
        }
    }
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            MIXES
                .get(i as usize)
                .map_or(String::new(), |pct| format!("{pct} % reads"))
        } else {
            String::new()
        }
    };
    draw(
        &dir.join(format!("throughput_vs_read_share-{}.svg", report.transport)),
        &format!(
            "{}: mixed workload, total ops/s (one thread per node)",
            report.transport
        ),
        ("share of reads", "ops/s, all nodes"),
        -0.3..(MIXES.len() as f64 - 0.7),
        &label,
        &series,
    )
}
