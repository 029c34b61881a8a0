//! `mendfs demo`: a local 3-node metadata cluster, used, broken and healed in front of you.
//!
//! Starts real `mendfs server` processes on free 127.0.0.1 ports in a temporary directory,
//! writes keys, SIGKILLs the leader, shows a new leader take over while writes go on, restarts
//! the dead node, shows it catch up, verifies every key, and cleans up. Exit 0 only if every
//! acknowledged key reads back. (The file store and self-healing parts join the demo as they
//! land.)

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use mendfs_client::{Client, ClientConfig};
use mendfs_testkit::{Cluster, ClusterOptions};

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Leave the cluster running and print how to use it.
    #[arg(long)]
    pub keep: bool,
    /// Keys to write before and after the failure.
    #[arg(long, default_value_t = 200)]
    pub keys: u64,
}

fn step(text: &str) {
    println!("\n== {text}");
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let binary = std::env::current_exe().context("locate the mendfs binary")?;
    step("Starting a local 3-node cluster (real processes on 127.0.0.1)");
    let options = ClusterOptions { nodes: 3, keep_dir: args.keep, ..ClusterOptions::default() };
    let mut cluster = blocking(|| Cluster::start(&binary, options))?;
    println!("directory: {}", cluster.root().display());
    let leader = blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    println!("node {leader} was elected leader");
    print_status(&cluster);

    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    let client = Client::new(config)?;

    step(&format!("Writing {} keys", args.keys));
    let started = Instant::now();
    for i in 0..args.keys {
        client.set(format!("demo/key-{i:05}").as_bytes(), format!("value-{i}").as_bytes(), None, None).await?;
    }
    println!("{} keys in {:.2?}", args.keys, started.elapsed());

    step(&format!("SIGKILL the leader, node {leader}, and keep writing"));
    blocking(|| cluster.kill(leader))?;
    let killed_at = Instant::now();
    client.set(b"demo/after-failover", b"written while a node was dead", None, None).await?;
    let failover = killed_at.elapsed();
    println!("first write acknowledged {failover:.2?} after the kill");
    for i in args.keys..args.keys * 2 {
        client.set(format!("demo/key-{i:05}").as_bytes(), format!("value-{i}").as_bytes(), None, None).await?;
    }
    let new_leader = blocking(|| cluster.wait_for_leader(Duration::from_secs(60)))?;
    println!("node {new_leader} leads now; {} more keys written with one node down", args.keys);
    print_status(&cluster);

    step(&format!("Restarting node {leader}: it replays its log and catches up"));
    blocking(|| cluster.restart(leader))?;
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    let restarted_at = Instant::now();
    blocking(|| cluster.wait_for_caught_up(&ids, Duration::from_secs(60)))?;
    println!("node {leader} caught up in {:.2?}", restarted_at.elapsed());
    print_status(&cluster);

    step("Verifying every acknowledged key");
    let mut verified = 0u64;
    let mut wrong = Vec::new();
    for i in 0..args.keys * 2 {
        let key = format!("demo/key-{i:05}");
        match client.get(key.as_bytes()).await? {
            Some(kv) if kv.value == format!("value-{i}").as_bytes() => verified += 1,
            other => {
                wrong.push(format!("{key}: {:?}", other.map(|kv| String::from_utf8_lossy(&kv.value).into_owned())))
            }
        }
    }
    step("Summary");
    println!("keys verified:        {verified} of {}", args.keys * 2);
    println!("leader failover:      {failover:.2?} (SIGKILL to next acknowledged write)");
    println!("restarted node:       caught up in {:.2?}", restarted_at.elapsed());
    if !wrong.is_empty() {
        eprintln!("error: {} keys did not read back: {}", wrong.len(), wrong.join("; "));
        return Ok(ExitCode::FAILURE);
    }
    if args.keep {
        println!("\nThe cluster keeps running. Try:");
        println!("  export MENDFS_ENDPOINTS={}", cluster.endpoints());
        if let Some(path) = cluster.secret_file() {
            println!("  export MENDFS_SECRET=$(cat {})", path.display());
        }
        println!("  mendfs cluster status");
        println!("  mendfs kv get demo/key-00001");
        println!("Stop it with: pkill -f 'mendfs server.*{}'", cluster.root().display());
        std::mem::forget(cluster);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(cluster: &Cluster) {
    match blocking(|| cluster.run_cli(&["cluster", "status"])) {
        Ok(text) => print!("{text}"),
        Err(e) => println!("(status unavailable: {e:#})"),
    }
}
