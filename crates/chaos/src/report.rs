//! The report of a chaos run: `report.json` (everything), `history.jsonl` (every operation),
//! `report.txt` (for people: the faults' timeline, operations and availability per fault
//! window, each anomaly with the smallest sub-history that shows it, and how to replay the
//! run), and `timeline.svg` (each operation's latency over time, fault windows shaded).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use mendfs_client::StatusReply;
use serde::Serialize;

use crate::check::CheckReport;
use crate::history::{self, Micros, Operation, Outcome};
use crate::nemesis::FaultWindow;
use crate::schedule::{FaultKind, PlannedFault};
use crate::workload::WorkloadKind;

/// How the heal phase went.
#[derive(Debug, Clone, Serialize)]
pub struct Convergence {
    pub took_ms: u64,
    /// Why the cluster had not healed when the bound ran out; None when it healed.
    pub failure: Option<String>,
    /// The last status seen, summarized.
    pub status: Option<serde_json::Value>,
}

/// The facts of a run, as the runner gathered them.
pub struct RunFacts {
    pub seed: u64,
    pub nodes: usize,
    pub seconds: u64,
    pub workloads: Vec<WorkloadKind>,
    pub unsafe_local_reads: bool,
    pub planned: Vec<PlannedFault>,
    pub skipped: Vec<(FaultKind, String)>,
    pub windows: Vec<FaultWindow>,
    pub faults_over_us: Micros,
    pub history: Vec<Operation>,
    pub checked: CheckReport,
    /// Keys and paths the final reads could not read at all, with the last error.
    pub unreadable: Vec<String>,
    pub convergence: Convergence,
    pub node_log_tails: BTreeMap<u64, String>,
}

/// Operations of one workload, by outcome.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Tally {
    pub ok: u64,
    pub failed: u64,
    pub unknown: u64,
}

impl Tally {
    fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Ok { .. } => self.ok += 1,
            Outcome::Failed { .. } => self.failed += 1,
            Outcome::Unknown { .. } => self.unknown += 1,
        }
    }

    fn total(&self) -> u64 {
        self.ok + self.failed + self.unknown
    }

    /// The share of operations that succeeded, in percent.
    fn availability(&self) -> f64 {
        if self.total() == 0 {
            return 100.0;
        }
        self.ok as f64 * 100.0 / self.total() as f64
    }
}

/// A fault window with the operations invoked while it was in force.
#[derive(Debug, Clone, Serialize)]
pub struct WindowAvailability {
    pub window: FaultWindow,
    pub operations: BTreeMap<&'static str, Tally>,
}

#[derive(Serialize)]
pub struct Report {
    pub seed: u64,
    pub nodes: usize,
    pub seconds: u64,
    pub workloads: Vec<WorkloadKind>,
    pub unsafe_local_reads: bool,
    pub planned: Vec<PlannedFault>,
    pub skipped: Vec<(FaultKind, String)>,
    pub faults: Vec<WindowAvailability>,
    /// Operations per workload over the whole run.
    pub operations: BTreeMap<&'static str, Tally>,
    /// Operations invoked while no fault was in force.
    pub operations_without_faults: BTreeMap<&'static str, Tally>,
    pub check: CheckReport,
    /// Keys and paths that could not be read after healing: each counts as a violation.
    pub unreadable: Vec<String>,
    pub convergence: Convergence,
    pub node_log_tails: BTreeMap<u64, String>,
    #[serde(skip)]
    pub history: Vec<Operation>,
    pub faults_over_us: Micros,
}

pub use crate::check::workload_of;

impl Report {
    pub fn new(facts: RunFacts) -> Self {
        let mut operations: BTreeMap<&'static str, Tally> = BTreeMap::new();
        let mut operations_without_faults: BTreeMap<&'static str, Tally> = BTreeMap::new();
        let mut faults: Vec<WindowAvailability> = facts
            .windows
            .iter()
            .map(|window| WindowAvailability { window: window.clone(), operations: BTreeMap::new() })
            .collect();
        for operation in &facts.history {
            let workload = workload_of(&operation.call);
            operations.entry(workload).or_default().add(&operation.outcome);
            let during = faults.iter_mut().find(|f| {
                f.window.ended_us > f.window.started_us
                    && (f.window.started_us..f.window.ended_us).contains(&operation.invoked_us)
            });
            match during {
                Some(fault) => fault.operations.entry(workload).or_default().add(&operation.outcome),
                None => operations_without_faults.entry(workload).or_default().add(&operation.outcome),
            }
        }
        Report {
            seed: facts.seed,
            nodes: facts.nodes,
            seconds: facts.seconds,
            workloads: facts.workloads,
            unsafe_local_reads: facts.unsafe_local_reads,
            planned: facts.planned,
            skipped: facts.skipped,
            faults,
            operations,
            operations_without_faults,
            check: facts.checked,
            unreadable: facts.unreadable,
            convergence: facts.convergence,
            node_log_tails: facts.node_log_tails,
            history: facts.history,
            faults_over_us: facts.faults_over_us,
        }
    }

    /// Violations found by the checkers, keys the checker could not decide, and keys or paths
    /// unreadable after healing: each is a promise not shown kept.
    pub fn violations(&self) -> usize {
        self.check.violations.len() + self.check.inconclusive.len() + self.unreadable.len()
    }

    pub fn converged(&self) -> bool {
        self.convergence.failure.is_none()
    }

    /// No violation, nothing left undecided, every workload did work, and the cluster healed.
    pub fn passed(&self) -> bool {
        self.violations() == 0
            && self.converged()
            && self.workloads.iter().all(|w| self.operations.get(w.name()).is_some_and(|t| t.ok > 0))
    }

    pub fn summary_line(&self) -> String {
        format!(
            "chaos: seed={} ops={} faults={} violations={} converged={}",
            self.seed,
            self.history.len(),
            self.faults.len(),
            self.violations(),
            if self.converged() { "yes" } else { "no" }
        )
    }

    /// The report for people.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "MendFS chaos run: seed {}, {} nodes, {} s of faults, workloads {}{}",
            self.seed,
            self.nodes,
            self.seconds,
            self.workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(", "),
            if self.unsafe_local_reads { " (nodes in the broken --unsafe-local-reads mode)" } else { "" }
        );
        let _ = writeln!(
            out,
            "Replay: mendfs chaos --seed {} --nodes {} --seconds {} --workloads {}\n",
            self.seed,
            self.nodes,
            self.seconds,
            self.workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(",")
        );
        for (kind, reason) in &self.skipped {
            let _ = writeln!(out, "Skipped fault {}: {reason}", kind.name());
        }
        let _ = writeln!(out, "\nFaults (time in s since the workloads started; availability = ops that succeeded):");
        for fault in &self.faults {
            let window = &fault.window;
            let availability: Vec<String> = fault
                .operations
                .iter()
                .map(|(workload, tally)| format!("{workload} {:.1}% of {}", tally.availability(), tally.total()))
                .collect();
            let _ = writeln!(
                out,
                "  {:>7.1} - {:>7.1}  {:<17} {}{}{}",
                window.started_us as f64 / 1e6,
                window.ended_us as f64 / 1e6,
                window.kind.name(),
                window.detail,
                if availability.is_empty() { String::new() } else { format!(" | {}", availability.join(", ")) },
                window.error.as_deref().map(|e| format!(" | FAILED: {e}")).unwrap_or_default()
            );
        }
        let _ = writeln!(out, "\nOperations (ok / failed / unknown; without faults in brackets):");
        for (workload, tally) in &self.operations {
            let quiet = self.operations_without_faults.get(workload).cloned().unwrap_or_default();
            let _ = writeln!(
                out,
                "  {workload:<6} {} / {} / {}   [{} / {} / {}]",
                tally.ok, tally.failed, tally.unknown, quiet.ok, quiet.failed, quiet.unknown
            );
        }
        let _ = writeln!(
            out,
            "\nHeal: {}",
            match &self.convergence.failure {
                None =>
                    format!("converged {:.1} s after the last fault was removed", self.convergence.took_ms as f64 / 1e3),
                Some(why) => format!("NOT converged within {:.1} s: {why}", self.convergence.took_ms as f64 / 1e3),
            }
        );
        let _ = writeln!(
            out,
            "\nChecks: {} violations, {} inconclusive, {} unreadable after healing",
            self.check.violations.len(),
            self.check.inconclusive.len(),
            self.unreadable.len()
        );
        for violation in &self.check.violations {
            let _ = writeln!(out, "\n{violation}");
        }
        for inconclusive in &self.check.inconclusive {
            let _ = writeln!(out, "\nINCONCLUSIVE: {inconclusive}");
        }
        for unreadable in &self.unreadable {
            let _ = writeln!(out, "\nUNREADABLE after healing: {unreadable}");
        }
        if !self.passed() {
            for (id, tail) in &self.node_log_tails {
                let _ = writeln!(out, "\n--- node {id}, last log lines\n{tail}");
            }
        }
        let _ = writeln!(out, "\n{}", self.summary_line());
        out
    }
}

/// `text` without the terminal colour codes the node logs carry.
pub fn plain_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            // CSI: parameters and intermediates up to a final byte in @..~.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// What the report keeps of a status: the cluster-wide counts and each node's state.
pub fn status_summary(status: &StatusReply) -> serde_json::Value {
    serde_json::json!({
        "leader": status.leader,
        "term": status.term,
        "chunks": status.chunks,
        "under_replicated_chunks": status.under_replicated_chunks,
        "lost_chunks": status.lost_chunks,
        "unplaceable_copies": status.unplaceable_copies,
        "nodes": status.nodes.iter().map(|n| serde_json::json!({
            "id": n.id,
            "role": n.role,
            "state": n.state,
            "applied_index": n.applied_index,
            "chunks_stored": n.health.as_ref().map_or(0, |h| h.chunk_count),
            "chunks_listed": n.chunks_listed,
        })).collect::<Vec<_>>(),
    })
}

/// Writes the report files into `dir`.
pub fn write(dir: &Path, report: &Report) -> Result<()> {
    let json = serde_json::to_string_pretty(report).context("encode report.json")?;
    std::fs::write(dir.join("report.json"), json).context("write report.json")?;
    std::fs::write(dir.join("history.jsonl"), history::to_jsonl(&report.history)).context("write history.jsonl")?;
    std::fs::write(dir.join("report.txt"), report.text()).context("write report.txt")?;
    std::fs::write(dir.join("timeline.svg"), timeline_svg(report)?).context("write timeline.svg")?;
    Ok(())
}

/// `timeline.svg`: every operation's latency at the time it was invoked (log scale), coloured
/// by workload and outcome, with the fault windows shaded and named: the picture of where
/// the cluster stalled or failed, and under which fault.
pub fn timeline_svg(report: &Report) -> Result<String> {
    use plotters::prelude::*;

    let mut svg = String::new();
    {
        let backend = SVGBackend::with_string(&mut svg, (1400, 700));
        let root = backend.into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("draw: {e}"))?;
        // The run itself; the final reads, after the heal phase, would squeeze it to one side.
        let end_s = report.faults_over_us as f64 / 1e6;
        let history: Vec<&Operation> =
            report.history.iter().filter(|op| op.invoked_us <= report.faults_over_us).collect();
        let latency_ms = |op: &Operation| (op.completed_us.saturating_sub(op.invoked_us) as f64 / 1e3).max(0.1);
        let top_ms = history.iter().map(|op| latency_ms(op)).fold(10.0f64, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("MendFS chaos, seed {}: operation latency over time", report.seed), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..end_s.max(1.0), (0.1f64..top_ms).log_scale())
            .map_err(|e| anyhow::anyhow!("chart: {e}"))?;
        chart
            .configure_mesh()
            .x_desc("seconds since the workloads started")
            .y_desc("latency (ms)")
            .draw()
            .map_err(|e| anyhow::anyhow!("mesh: {e}"))?;
        let shades = [RGBColor(255, 200, 200), RGBColor(255, 230, 170), RGBColor(200, 220, 255)];
        for (i, fault) in report.faults.iter().enumerate() {
            let window = &fault.window;
            let from = window.started_us as f64 / 1e6;
            let to = (window.ended_us as f64 / 1e6).max(from + 0.15);
            let shade = shades[i % shades.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new([(from, 0.1), (to, top_ms)], shade.mix(0.5).filled())))
                .map_err(|e| anyhow::anyhow!("fault window: {e}"))?;
            chart
                .draw_series(std::iter::once(Text::new(
                    window.kind.name().to_string(),
                    (from, top_ms / (1.6 + (i % 4) as f64)),
                    ("sans-serif", 12),
                )))
                .map_err(|e| anyhow::anyhow!("fault label: {e}"))?;
        }
        let colour = |op: &Operation| -> RGBColor {
            match (&op.outcome, workload_of(&op.call)) {
                (Outcome::Failed { .. }, _) => RGBColor(230, 140, 0),
                (Outcome::Unknown { .. }, _) => RGBColor(220, 0, 0),
                (Outcome::Ok { .. }, "kv") => RGBColor(40, 90, 200),
                (Outcome::Ok { .. }, "files") => RGBColor(30, 150, 60),
                (Outcome::Ok { .. }, "s3") => RGBColor(0, 150, 160),
                (Outcome::Ok { .. }, _) => RGBColor(130, 60, 170),
            }
        };
        for (label, workload) in [("kv ok", "kv"), ("files ok", "files"), ("s3 ok", "s3"), ("lock ok", "lock")] {
            let points: Vec<(f64, f64)> = history
                .iter()
                .filter(|op| matches!(op.outcome, Outcome::Ok { .. }) && workload_of(&op.call) == workload)
                .map(|op| (op.invoked_us as f64 / 1e6, latency_ms(op)))
                .collect();
            let Some(first) =
                history.iter().find(|op| matches!(op.outcome, Outcome::Ok { .. }) && workload_of(&op.call) == workload)
            else {
                continue;
            };
            let style = colour(first);
            chart
                .draw_series(points.into_iter().map(|p| Circle::new(p, 2, style.filled())))
                .map_err(|e| anyhow::anyhow!("points: {e}"))?
                .label(label)
                .legend(move |(x, y)| Circle::new((x, y), 3, style.filled()));
        }
        for (label, failed) in [("failed", true), ("outcome unknown", false)] {
            let style = if failed { RGBColor(230, 140, 0) } else { RGBColor(220, 0, 0) };
            let points: Vec<(f64, f64)> = history
                .iter()
                .filter(|op| match op.outcome {
                    Outcome::Failed { .. } => failed,
                    Outcome::Unknown { .. } => !failed,
                    Outcome::Ok { .. } => false,
                })
                .map(|op| (op.invoked_us as f64 / 1e6, latency_ms(op)))
                .collect();
            chart
                .draw_series(points.into_iter().map(|p| Cross::new(p, 3, style)))
                .map_err(|e| anyhow::anyhow!("points: {e}"))?
                .label(label)
                .legend(move |(x, y)| Cross::new((x, y), 3, style));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow::anyhow!("legend: {e}"))?;
        root.present().map_err(|e| anyhow::anyhow!("present: {e}"))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_taken_out_of_log_lines() {
        let coloured = "\u{1b}[2m2026-12-03T21:20:14Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m node 2 [x]";
        assert_eq!(plain_text(coloured), "2026-12-03T21:20:14Z  WARN node 2 [x]");
        assert_eq!(plain_text("plain [text]"), "plain [text]");
    }

    /// The report tallies operations under the names `--workloads` takes, which is where
    /// `passed` looks for each workload's successes (a tally named otherwise failed every run).
    #[test]
    fn every_workloads_calls_are_tallied_under_its_own_name() {
        use crate::history::Call;
        use crate::workload::WorkloadKind;
        for kind in WorkloadKind::ALL {
            let call = match kind {
                WorkloadKind::Kv => Call::KvRead { key: crate::workload::kv_keys()[0].clone() },
                WorkloadKind::Lock => Call::LockHold { lock: crate::workload::LOCK_NAME.into() },
                WorkloadKind::Files => Call::FileGet { path: crate::workload::file_paths()[0].clone() },
                WorkloadKind::S3 => Call::FileGet { path: crate::workload::object_subjects()[0].clone() },
            };
            assert_eq!(workload_of(&call), kind.name(), "{call:?}");
        }
    }
}
