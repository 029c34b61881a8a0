//! `mendfs chaos`: fault injection with a checker, on a local cluster (see `mendfs_chaos`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use mendfs_chaos::runner::{self, ChaosOptions};
use mendfs_chaos::schedule::FaultKind;
use mendfs_chaos::workload::WorkloadKind;

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Nodes in the cluster, all voters and storage nodes (3 or 5; a majority survives any
    /// one fault).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// How long faults are injected while the workloads run.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// The seed the fault schedule and the workloads follow (a run is replayed with the same
    /// seed); random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Faults to inject: all, or a comma-separated list of names and groups (process,
    /// network, disk, clock; kill, kill-leader, pause, pause-leader, isolate, isolate-leader,
    /// majority-minority, one-way, bridge, flaky, corrupt-chunks, delete-chunks, disk-full,
    /// slow-disk, clock-skew, membership). Faults this machine cannot inject are listed as
    /// skipped.
    #[arg(long, default_value = "all")]
    pub faults: String,
    /// Workloads to run: all, or a comma-separated list of kv, lock, files, s3.
    #[arg(long, default_value = "all")]
    pub workloads: String,
    /// Where to write report.txt, report.json, history.jsonl and the cluster's files
    /// (default: ./chaos-SEED).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// How long the cluster gets to heal after the last fault before the run fails.
    #[arg(long, default_value_t = 120)]
    pub heal_seconds: u64,
    /// Concurrent clients per workload.
    #[arg(long, default_value_t = 3)]
    pub clients: usize,
    /// Run the nodes in a deliberately broken mode that serves kv reads from local state,
    /// skipping the read index: the checker must report violations (a test of the checker).
    #[arg(long)]
    pub unsafe_local_reads: bool,
}

pub async fn run(args: ChaosArgs) -> Result<ExitCode> {
    let faults = FaultKind::parse_list(&args.faults).map_err(anyhow::Error::msg)?;
    let workloads = WorkloadKind::parse_list(&args.workloads).map_err(anyhow::Error::msg)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    let options = ChaosOptions {
        binary: std::env::current_exe().context("find the mendfs binary")?,
        nodes: args.nodes,
        seconds: args.seconds,
        seed,
        faults,
        workloads,
        report_dir: args.report.unwrap_or_else(|| PathBuf::from(format!("chaos-{seed}"))),
        heal_seconds: args.heal_seconds,
        clients: args.clients.max(1),
        unsafe_local_reads: args.unsafe_local_reads,
    };
    let report_dir = options.report_dir.clone();
    // The runner blocks (it starts processes and waits on them) and runs its own runtime.
    let outcome = tokio::task::spawn_blocking(move || runner::run(options)).await.context("chaos task")??;
    println!("chaos: report in {}", report_dir.display());
    if outcome.passed {
        println!("{}", outcome.summary_line);
    } else {
        // The whole report, which ends with the summary line.
        print!("{}", outcome.report.text());
    }
    Ok(if outcome.passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
