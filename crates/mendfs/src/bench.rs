//! `mendfs bench`: measurements, never pass/fail. Starts its own local cluster of real
//! processes and reports throughput, latency percentiles and failover times.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use hdrhistogram::Histogram;
use mendfs_client::{Client, ClientConfig};
use mendfs_testkit::{Cluster, ClusterOptions};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Sets/s and latency with 1, 16 and 64 concurrent clients, then leader failover times.
    Kv {
        /// Concurrent clients, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        clients: Vec<usize>,
        /// Seconds of load per client count.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Leader kills to time.
        #[arg(long, default_value_t = 20)]
        failovers: usize,
        /// Value size in bytes.
        #[arg(long, default_value_t = 64)]
        value_bytes: usize,
    },
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Kv { clients, seconds, failovers, value_bytes } => {
            bench_kv(&clients, Duration::from_secs_f64(seconds), failovers, value_bytes).await
        }
    }
}

struct LoadResult {
    ops: u64,
    errors: u64,
    elapsed: Duration,
    latency_us: Histogram<u64>,
}

/// `n_clients` tasks, each setting its own keys back to back for `duration`.
async fn run_load(client: &Client, n_clients: usize, duration: Duration, value: &[u8]) -> Result<LoadResult> {
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task_idx in 0..n_clients {
        let client = client.clone();
        let value = value.to_vec();
        let errors = errors.clone();
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds");
            let mut op_idx = 0u64;
            while started.elapsed() < duration {
                let key = format!("bench/{task_idx}/{}", op_idx % 1000);
                let op_started = Instant::now();
                match client.set(key.as_bytes(), &value, None, None).await {
                    Ok(_) => {
                        let _ = histogram.record(op_started.elapsed().as_micros() as u64);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                op_idx += 1;
            }
            histogram
        }));
    }
    let mut latency_us = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for task in tasks {
        latency_us.add(task.await.context("load task")?)?;
    }
    Ok(LoadResult {
        ops: latency_us.len(),
        errors: errors.load(Ordering::Relaxed),
        elapsed: started.elapsed(),
        latency_us,
    })
}

async fn bench_kv(clients: &[usize], duration: Duration, failovers: usize, value_bytes: usize) -> Result<()> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    let options = ClusterOptions { nodes: 3, ..ClusterOptions::default() };
    let mut cluster = blocking(|| Cluster::start(&binary, options))?;
    blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    let client = Client::new(config)?;
    let value = vec![b'x'; value_bytes];

    println!("MendFS kv sets, 3 nodes on 127.0.0.1, {value_bytes}-byte values, {duration:?} per row");
    println!("{:>8} {:>12} {:>10} {:>10} {:>10} {:>8}", "clients", "sets/s", "p50 ms", "p99 ms", "max ms", "errors");
    for &n in clients {
        let result = run_load(&client, n, duration, &value).await?;
        println!(
            "{:>8} {:>12.0} {:>10.2} {:>10.2} {:>10.2} {:>8}",
            n,
            result.ops as f64 / result.elapsed.as_secs_f64(),
            result.latency_us.value_at_quantile(0.5) as f64 / 1000.0,
            result.latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            result.latency_us.max() as f64 / 1000.0,
            result.errors
        );
    }
    for (id, node) in &cluster.nodes {
        if let Some(rss) = node.pid().and_then(peak_rss_kib) {
            println!("node {id}: peak RSS {:.1} MiB", rss as f64 / 1024.0);
        }
    }

    if failovers > 0 {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
        for round in 0..failovers {
            let leader = blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
            let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
            blocking(|| cluster.wait_for_caught_up(&ids, Duration::from_secs(60)))?;
            blocking(|| cluster.kill(leader))?;
            let killed_at = Instant::now();
            client.set(format!("bench/failover/{round}").as_bytes(), &value, None, None).await?;
            histogram.record(killed_at.elapsed().as_micros() as u64)?;
            blocking(|| cluster.restart(leader))?;
        }
        println!(
            "leader failover (SIGKILL -> next acknowledged set), {failovers} kills: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            histogram.value_at_quantile(0.5) as f64 / 1000.0,
            histogram.value_at_quantile(0.99) as f64 / 1000.0,
            histogram.max() as f64 / 1000.0
        );
    }
    Ok(())
}

/// Peak resident set size of a process, from /proc (Linux only).
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}
