//! What a bench measured, kept as numbers: the printed tables are formatted from these and
//! `--json PATH` writes them, so the two can never disagree.
//!
//! The JSON is one object per run, shaped for a script comparing runs across commits: which
//! bench, when, on which commit and machine, with which parameters; the references measured
//! in the same run; one object per printed row; failover times; each node's peak memory. A
//! field a bench does not measure is `null` (or an empty list), never missing, so every run of
//! a bench has the same keys.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::Serialize;

use super::LoadResult;

/// Where the human-readable tables go. Stdout, unless stdout carries the JSON (`--json -`):
/// then stderr, so that stdout stays one pure JSON document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Console {
    Stdout,
    Stderr,
}

/// `--json PATH`: where the JSON goes, if anywhere.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum JsonTarget {
    Stdout,
    File(PathBuf),
}

impl JsonTarget {
    pub(super) fn from_arg(path: Option<&Path>) -> Option<Self> {
        path.map(|path| if path == Path::new("-") { JsonTarget::Stdout } else { JsonTarget::File(path.to_path_buf()) })
    }
}

#[derive(Serialize, Debug)]
pub(super) struct Report {
    /// kv, files, s3, heal, trace, ec or ec-cluster.
    pub bench: &'static str,
    pub started_unix_ms: u64,
    /// The commit this binary was built from, or `mendfs <version>` when the build could not
    /// tell (no git).
    pub git_commit: String,
    pub mendfs_version: &'static str,
    pub machine: Machine,
    /// The subcommand's options, as given or defaulted.
    pub parameters: serde_json::Value,
    pub references: References,
    pub rows: Vec<Row>,
    pub failover: Option<Failover>,
    pub heal: Option<HealFigures>,
    pub trace: Option<TraceFigures>,
    /// `bench ec-cluster`: one entry per redundancy measured, in the order run.
    pub redundancies: Vec<RedundancyFigures>,
    pub nodes: Vec<NodeMemory>,
    #[serde(skip)]
    console: Console,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct Machine {
    /// `std::thread::available_parallelism`.
    pub cores: usize,
    /// The 1-minute load average when the bench started: a run on a busy machine says so.
    pub load_average_1m: Option<f64>,
}

/// What MendFS is read against, measured in the same run. Other systems' rows (etcd,
/// SeaweedFS) are in `rows` under their own `system`; `peers` says what they were.
#[derive(Serialize, Debug, Clone, Default, PartialEq)]
pub(super) struct References {
    /// One 256 MiB file written and fdatasynced once.
    pub disk_fsync_mb_per_sec: Option<f64>,
    /// 4 MiB chunks put one at a time into a chunk store on the bench's disk (hashed, written,
    /// fsynced, renamed), as a node's store does.
    pub chunk_file_fsync_mb_per_sec: Option<f64>,
    pub loopback_tcp_mb_per_sec: Option<f64>,
    /// A bare append of a line the size of a recorded span.
    pub bare_write_us_per_line: Option<f64>,
    pub peers: Vec<Peer>,
}

/// A system measured beside MendFS in the same run.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct Peer {
    /// The `system` of its rows.
    pub system: String,
    pub version: String,
    /// How it was set up (nodes, copies, durability), as the printed header says it.
    pub setup: String,
}

/// One printed row.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct Row {
    /// mendfs, etcd, native (the MendFS client), s3 (MendFS's S3 gateway), seaweedfs,
    /// seaweedfs-fsync, bare-write.
    pub system: String,
    /// set, put, get, get-degraded (ec-cluster: with storage nodes dead), record-span,
    /// write-line.
    pub op: String,
    pub size_bytes: Option<u64>,
    /// Concurrent clients (connections, for S3), one operation in flight on each.
    pub clients: Option<usize>,
    /// Whether the cluster ran TLS (`--tls`'s second pass).
    pub tls: bool,
    /// How the files were kept (`replicate`, `ec:4+2`), where a bench compares redundancies.
    pub redundancy: Option<String>,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub mb_per_sec: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub errors: u64,
    /// The ratios printed for this row, by name: `mendfs_over_etcd`, `tls_over_plaintext`,
    /// `over_bound` (files: put / (disk/3), get / loopback), `s3_over_native`,
    /// `mendfs_s3_over_seaweedfs`, `over_bare_write`, `over_first_redundancy` (ec-cluster: MB/s
    /// over the first redundancy's, `replicate` by default).
    pub ratios: BTreeMap<&'static str, f64>,
    /// Each node's peak RSS during this row alone, in MiB, by node id (`bench files`: the
    /// kernel's high-water mark is reset before the row).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub node_peak_rss_mib: BTreeMap<String, f64>,
    /// `bench kv`: where the row's writes spent their time, means over the row from the nodes'
    /// `/metrics` (see [`super::WriteStages`]).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub write_stages: BTreeMap<&'static str, f64>,
}

impl Row {
    /// A row from a load's counts and latencies; `size_bytes` gives it a MB/s.
    pub(super) fn measured(system: &str, op: &str, size_bytes: Option<u64>, clients: usize, load: &LoadResult) -> Self {
        let seconds = load.elapsed.as_secs_f64();
        let ops_per_sec = load.ops as f64 / seconds;
        let latency_ms = |quantile: f64| load.latency_us.value_at_quantile(quantile) as f64 / 1000.0;
        Row {
            system: system.to_string(),
            op: op.to_string(),
            size_bytes,
            clients: Some(clients),
            tls: false,
            redundancy: None,
            ops: load.ops,
            seconds,
            ops_per_sec,
            mb_per_sec: size_bytes.map(|size| ops_per_sec * size as f64 / 1e6),
            p50_ms: Some(latency_ms(0.5)),
            p99_ms: Some(latency_ms(0.99)),
            max_ms: Some(load.latency_us.max() as f64 / 1000.0),
            errors: load.errors,
            ratios: BTreeMap::new(),
            node_peak_rss_mib: BTreeMap::new(),
            write_stages: BTreeMap::new(),
        }
    }

    /// A row of `ops` operations in `elapsed` with no latency histogram (whole-job timings).
    pub(super) fn counted(
        system: &str,
        op: &str,
        size_bytes: Option<u64>,
        clients: Option<usize>,
        ops: u64,
        elapsed: std::time::Duration,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        let ops_per_sec = ops as f64 / seconds;
        Row {
            system: system.to_string(),
            op: op.to_string(),
            size_bytes,
            clients,
            tls: false,
            redundancy: None,
            ops,
            seconds,
            ops_per_sec,
            mb_per_sec: size_bytes.map(|size| ops_per_sec * size as f64 / 1e6),
            p50_ms: None,
            p99_ms: None,
            max_ms: None,
            errors: 0,
            ratios: BTreeMap::new(),
            node_peak_rss_mib: BTreeMap::new(),
            write_stages: BTreeMap::new(),
        }
    }

    pub(super) fn with_tls(mut self, tls: bool) -> Self {
        self.tls = tls;
        self
    }

    pub(super) fn with_redundancy(mut self, redundancy: &str) -> Self {
        self.redundancy = Some(redundancy.to_string());
        self
    }
}

/// Leader failover: SIGKILL of the leader to the next acknowledged write.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct Failover {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct NodeMemory {
    /// mendfs, or the peer whose process it is (seaweedfs).
    pub system: String,
    /// The node id, or the peer process's role (master, volume-1, filer, s3).
    pub node: String,
    pub tls: bool,
    /// VmHWM at the end of the measurements.
    pub peak_rss_mib: f64,
}

/// `bench heal`'s figures beyond its write row.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct HealFigures {
    pub status_polls_under_load: u64,
    pub false_suspicions: Vec<String>,
    pub chunks: u64,
    pub killed_node_copies: u64,
    pub suspect_after_s: f64,
    pub down_after_s: f64,
    pub down_to_full_redundancy_s: f64,
    pub repaired_bytes: u64,
    pub repaired_copies: u64,
    pub repair_mb_per_sec: f64,
    pub repair_over_disk_fsync: f64,
    /// The repair job alone: first copy planned to last copy recorded.
    pub repair_job: Option<RepairJob>,
    pub kill_to_full_redundancy_s: f64,
}

#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct RepairJob {
    pub seconds: f64,
    pub mb_per_sec: f64,
    pub over_disk_fsync: f64,
    pub over_chunk_file_fsync: f64,
}

/// `bench ec-cluster`'s figures for one redundancy beyond its put and get rows.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct RedundancyFigures {
    /// `replicate` or `ec:K+M`.
    pub redundancy: String,
    /// The files the put row wrote (and the repair restored).
    pub files: u64,
    pub file_bytes: u64,
    /// What those files added to the nodes' chunk stores: copies or shards.
    pub disk_bytes: u64,
    pub disk_bytes_per_file_byte: f64,
    /// The storage nodes SIGKILLed at once.
    pub killed_nodes: Vec<u64>,
    pub kill_to_down_s: f64,
    /// Every killed node `down` to no chunk short of copies or shards and none listed on them.
    pub down_to_full_redundancy_s: f64,
    /// Chunk copies made (`repair_copied_*` on the live nodes) and shards rebuilt
    /// (`repair_rebuilt_*`).
    pub copied_chunks: u64,
    pub rebuilt_shards: u64,
    /// Bytes repair wrote: copies and rebuilt shards.
    pub repaired_bytes: u64,
    /// Bytes the repairing nodes read from others: a copy's bytes, or K shards per rebuild.
    pub repair_read_bytes: u64,
    pub repair_mb_per_sec: f64,
    pub read_bytes_per_repaired_byte: f64,
}

/// `bench trace`'s figures beyond its rows.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub(super) struct TraceFigures {
    pub spans_recorded: u64,
    pub bytes_per_span: u64,
    pub record_us_per_span: f64,
    pub store_mib: f64,
    pub store_bound_mib: u64,
    pub lookup_ms: f64,
    pub lookup_spans_scanned: u64,
    pub lookup_spans_found: usize,
}

impl Report {
    pub(super) fn new(bench: &'static str, parameters: serde_json::Value, json: Option<&JsonTarget>) -> Self {
        Report {
            bench,
            started_unix_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_millis() as u64),
            git_commit: option_env!("MENDFS_GIT_COMMIT")
                .map_or_else(|| format!("mendfs {}", env!("CARGO_PKG_VERSION")), str::to_string),
            mendfs_version: env!("CARGO_PKG_VERSION"),
            machine: Machine {
                cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
                load_average_1m: load_average_1m(),
            },
            parameters,
            references: References::default(),
            rows: Vec::new(),
            failover: None,
            heal: None,
            trace: None,
            redundancies: Vec::new(),
            nodes: Vec::new(),
            console: if json == Some(&JsonTarget::Stdout) { Console::Stderr } else { Console::Stdout },
        }
    }

    /// Prints one line of the human-readable output.
    pub(super) fn say(&self, line: impl Display) {
        match self.console {
            Console::Stdout => println!("{line}"),
            Console::Stderr => eprintln!("{line}"),
        }
    }

    /// Prints `row` as `format` renders it and keeps it; returns its index in `rows`, for
    /// ratios printed later.
    pub(super) fn add_row(&mut self, row: Row, format: impl Fn(&Row) -> String) -> usize {
        self.say(format(&row));
        self.rows.push(row);
        self.rows.len() - 1
    }

    pub(super) fn write_json(&self, target: &JsonTarget) -> Result<()> {
        let json = serde_json::to_string_pretty(self).context("encode the bench report as JSON")?;
        match target {
            JsonTarget::Stdout => {
                let mut stdout = std::io::stdout().lock();
                writeln!(stdout, "{json}").and_then(|()| stdout.flush()).context("write the JSON report to stdout")
            }
            JsonTarget::File(path) => std::fs::write(path, json + "\n")
                .with_context(|| format!("write the JSON report to {}", path.display())),
        }
    }
}

fn load_average_1m() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hand_made_report() -> Report {
        let mut report = Report::new("s3", serde_json::json!({ "sizes": [4096], "connections": 8 }), None);
        report.references.disk_fsync_mb_per_sec = Some(512.5);
        report.references.peers.push(Peer {
            system: "seaweedfs".into(),
            version: "4.48".into(),
            setup: "1 master, 3 volume servers".into(),
        });
        let mut ratios = BTreeMap::new();
        ratios.insert("s3_over_native", 0.75);
        report.rows.push(Row {
            system: "s3".into(),
            op: "put".into(),
            size_bytes: Some(4096),
            clients: Some(8),
            tls: false,
            redundancy: None,
            ops: 1000,
            seconds: 2.0,
            ops_per_sec: 500.0,
            mb_per_sec: Some(2.048),
            p50_ms: Some(1.5),
            p99_ms: Some(9.0),
            max_ms: Some(12.0),
            errors: 0,
            ratios,
            node_peak_rss_mib: BTreeMap::from([("1".to_string(), 75.25)]),
            write_stages: BTreeMap::from([("batch_ms", 3.5)]),
        });
        report.failover = Some(Failover { count: 2, p50_ms: 300.0, p99_ms: 800.0, max_ms: 800.0 });
        report.nodes.push(NodeMemory { system: "mendfs".into(), node: "1".into(), tls: false, peak_rss_mib: 80.5 });
        report
    }

    #[test]
    fn the_json_has_the_field_names_scripts_read() {
        let json = serde_json::to_string(&hand_made_report()).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["bench"], "s3");
        assert!(value["started_unix_ms"].as_u64().unwrap() > 1_600_000_000_000);
        assert!(value["git_commit"].as_str().is_some_and(|commit| !commit.is_empty()));
        assert!(value["machine"]["cores"].as_u64().unwrap() >= 1);
        assert_eq!(value["parameters"]["connections"], 8);
        assert_eq!(value["references"]["disk_fsync_mb_per_sec"], 512.5);
        assert_eq!(value["references"]["loopback_tcp_mb_per_sec"], serde_json::Value::Null);
        assert_eq!(value["references"]["peers"][0]["system"], "seaweedfs");
        let row = &value["rows"][0];
        for (field, expected) in [
            ("system", serde_json::json!("s3")),
            ("op", serde_json::json!("put")),
            ("size_bytes", serde_json::json!(4096)),
            ("clients", serde_json::json!(8)),
            ("ops_per_sec", serde_json::json!(500.0)),
            ("mb_per_sec", serde_json::json!(2.048)),
            ("p50_ms", serde_json::json!(1.5)),
            ("p99_ms", serde_json::json!(9.0)),
            ("max_ms", serde_json::json!(12.0)),
            ("errors", serde_json::json!(0)),
        ] {
            assert_eq!(row[field], expected, "rows[0].{field}");
        }
        assert_eq!(row["ratios"]["s3_over_native"], 0.75);
        assert_eq!(row["write_stages"]["batch_ms"], 3.5);
        assert_eq!(value["failover"]["count"], 2);
        assert_eq!(value["failover"]["p99_ms"], 800.0);
        assert_eq!(value["nodes"][0]["peak_rss_mib"], 80.5);
        assert_eq!(value["rows"][0]["node_peak_rss_mib"]["1"], 75.25);
        // Absent measurements are null, not missing: every run of a bench has the same keys.
        assert!(value.as_object().unwrap().contains_key("heal"));
        assert_eq!(value["heal"], serde_json::Value::Null);
        // The console choice is how the run printed, not a measurement.
        assert!(!value.as_object().unwrap().contains_key("console"));
    }

    #[test]
    fn json_to_stdout_sends_the_tables_to_stderr() {
        let to_stdout = JsonTarget::from_arg(Some(Path::new("-")));
        assert_eq!(to_stdout, Some(JsonTarget::Stdout));
        assert_eq!(Report::new("kv", serde_json::Value::Null, to_stdout.as_ref()).console, Console::Stderr);
        let to_file = JsonTarget::from_arg(Some(Path::new("run.json")));
        assert_eq!(to_file, Some(JsonTarget::File("run.json".into())));
        assert_eq!(Report::new("kv", serde_json::Value::Null, to_file.as_ref()).console, Console::Stdout);
        assert_eq!(Report::new("kv", serde_json::Value::Null, None).console, Console::Stdout);
    }

    #[test]
    fn a_measured_row_takes_its_rates_from_the_load() {
        let mut latency_us = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for us in [1000, 2000, 3000, 4000] {
            latency_us.record(us).unwrap();
        }
        let load = LoadResult { ops: 4, errors: 1, elapsed: std::time::Duration::from_secs(2), latency_us };
        let row = Row::measured("native", "put", Some(1_000_000), 2, &load);
        assert_eq!(row.ops_per_sec, 2.0);
        assert_eq!(row.mb_per_sec, Some(2.0));
        assert_eq!(row.errors, 1);
        assert!((row.max_ms.unwrap() - 4.0).abs() < 0.01);
        assert_eq!(Row::measured("mendfs", "set", None, 2, &load).mb_per_sec, None);
    }
}
