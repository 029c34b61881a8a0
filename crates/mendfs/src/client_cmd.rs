//! `mendfs kv …` and `mendfs cluster …`: the client CLI. Values print alone on stdout; every
//! failure is one line on stderr and a non-zero exit.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mendfs_client::{Client, EventKind, KeyValue};
use serde_json::json;

use crate::cli::Connection;

#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Create KEY; fails if it exists.
    Create {
        key: String,
        value: String,
        /// Tie the key to a session: it disappears when this command's session ends.
        #[arg(long)]
        ephemeral: bool,
        /// Session TTL in seconds, for --ephemeral.
        #[arg(long, default_value_t = 10.0)]
        ttl: f64,
        /// With --ephemeral: keep the session (and the key) alive until interrupted.
        #[arg(long, requires = "ephemeral")]
        hold: bool,
    },
    /// Print KEY's value (with --json: value, version and revisions).
    Get {
        key: String,
        #[arg(long)]
        json: bool,
    },
    /// Set KEY to VALUE; with --expect-version, only if KEY is at that version (0: absent).
    Set {
        key: String,
        value: String,
        #[arg(long)]
        expect_version: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Delete KEY; with --expect-version, only if KEY is at that version.
    Delete {
        key: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Drop the key history up to REVISION (default: the current one), giving its bytes back to
    /// the kv quota; watchers that are further behind must re-list.
    Compact { revision: Option<u64> },
    /// List keys starting with PREFIX.
    List {
        #[arg(default_value = "")]
        prefix: String,
        /// At most this many keys (0: the server's maximum).
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print every change to KEY (or under it, with --prefix), in order, until interrupted.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// First revision to print (0: changes from now on).
        #[arg(long, default_value_t = 0)]
        from_revision: u64,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// One JSON object per event.
        #[arg(long)]
        json: bool,
    },
    /// Run CMD while holding the lock NAME; CMD gets a fencing token in MENDFS_LOCK_TOKEN.
    Lock {
        name: String,
        /// Session TTL in seconds: how long the lock outlives a crashed holder.
        #[arg(long, default_value_t = 10.0)]
        ttl: f64,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Leader, term, per node its role, log, liveness (state, phi, heartbeat age) and health,
    /// and the cluster's redundancy and repair progress.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Add node ID at ADDR: it joins as a learner, catches up, then becomes a voter.
    AddNode {
        id: u64,
        addr: String,
        /// Stay a non-voting learner (for a node started with --roles storage).
        #[arg(long)]
        learner: bool,
    },
    /// Remove node ID from the cluster (drain a storage node first).
    RemoveNode { id: u64 },
    /// Move every chunk copy off storage node ID and place no new ones on it.
    Drain { id: u64 },
    /// Make a drained node an ordinary storage node again.
    Undrain { id: u64 },
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

fn health_json(h: &mendfs_proto::v1::NodeHealth) -> serde_json::Value {
    json!({
        "disk_used_bytes": h.disk_used_bytes, "disk_capacity_bytes": h.disk_capacity_bytes,
        "cpu_percent": h.cpu_percent, "memory_used_bytes": h.memory_used_bytes,
        "memory_total_bytes": h.memory_total_bytes, "rss_bytes": h.rss_bytes,
        "chunk_count": h.chunk_count, "chunk_bytes": h.chunk_bytes,
        "io_errors": h.io_errors, "checksum_errors": h.checksum_errors,
        "scrub_passes": h.scrub_passes, "scrub_checked_chunks": h.scrub_checked_chunks,
        "scrub_checked_bytes": h.scrub_checked_bytes,
        "repair_copied_chunks": h.repair_copied_chunks, "repair_copied_bytes": h.repair_copied_bytes,
        "repair_rebuilt_shards": h.repair_rebuilt_shards, "repair_rebuilt_bytes": h.repair_rebuilt_bytes,
        "repair_rebuild_read_bytes": h.repair_rebuild_read_bytes,
    })
}

/// Timeline events `cluster status` prints (the newest).
const STATUS_EVENTS_SHOWN: usize = 5;

/// Earlier repair jobs `cluster status` prints (the JSON has all the cluster keeps).
const RECENT_REPAIRS_SHOWN: usize = 3;

fn repair_json(r: &mendfs_proto::v1::RepairStatus) -> serde_json::Value {
    json!({
        "job_id": r.job_id, "reason": r.reason, "started_unix_ms": r.started_unix_ms,
        "finished_unix_ms": r.finished_unix_ms, "done_bytes": r.done_bytes, "total_bytes": r.total_bytes,
        "done_copies": r.done_copies, "total_copies": r.total_copies,
        "bytes_per_sec": r.bytes_per_sec, "eta_secs": r.eta_secs,
        "throttle_bytes_per_sec": r.throttle_bytes_per_sec,
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "version": kv.version,
        "create_revision": kv.create_revision,
        "modify_revision": kv.modify_revision,
        "session_id": if kv.session_id == 0 { None } else { Some(kv.session_id) },
    })
}

fn ttl(seconds: f64) -> Result<Duration> {
    anyhow::ensure!(
        seconds.is_finite() && (0.1..=3600.0).contains(&seconds),
        "--ttl must be within 0.1 ..= 3600 seconds"
    );
    Ok(Duration::from_secs_f64(seconds))
}

pub async fn run_kv(connection: Connection, command: KvCommand) -> Result<ExitCode> {
    let client = connection.client()?;
    match command {
        KvCommand::Create { key, value, ephemeral, ttl: ttl_seconds, hold } => {
            if !ephemeral {
                let kv = client
                    .create(key.as_bytes(), value.as_bytes(), None)
                    .await
                    .with_context(|| format!("create {key}"))?;
                println!("{}", kv.modify_revision);
                return Ok(ExitCode::SUCCESS);
            }
            let session = client.open_session(ttl(ttl_seconds)?).await.context("open a session")?;
            let kv = match client.create(key.as_bytes(), value.as_bytes(), Some(session.id())).await {
                Ok(kv) => kv,
                Err(e) => {
                    let _ = session.close().await;
                    return Err(e).with_context(|| format!("create {key}"));
                }
            };
            println!("{}", kv.modify_revision);
            if hold {
                eprintln!("holding {key} in session {} (TTL {:?}); interrupt to release", session.id(), session.ttl());
                let keep_alive = session.keep_alive_in_background();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    ended = keep_alive => {
                        bail!("the session ended: {}", ended.map_or_else(|e| e.to_string(), |e| e.to_string()))
                    }
                }
                session.close().await.context("close the session")?;
            } else {
                // Without --hold, the key would outlive this command only until the TTL ran
                // out; closing now makes that explicit.
                eprintln!("note: without --hold the session closes now and {key} is deleted with it");
                session.close().await.context("close the session")?;
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Get { key, json } => match client.get(key.as_bytes()).await.with_context(|| format!("get {key}"))? {
            None => bail!("key {key:?} not found"),
            Some(kv) => {
                if json {
                    println!("{}", kv_json(&kv));
                } else {
                    println!("{}", text(&kv.value));
                }
                Ok(ExitCode::SUCCESS)
            }
        },
        KvCommand::Set { key, value, expect_version, json } => {
            let kv = client
                .set(key.as_bytes(), value.as_bytes(), expect_version, None)
                .await
                .with_context(|| format!("set {key}"))?;
            if json {
                println!("{}", kv_json(&kv));
            } else {
                println!("{}", kv.version);
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Delete { key, expect_version } => {
            let deleted =
                client.delete(key.as_bytes(), expect_version).await.with_context(|| format!("delete {key}"))?;
            if !deleted {
                bail!("key {key:?} not found");
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Compact { revision } => {
            let compacted = client.compact(revision.unwrap_or(0)).await.context("compact the key history")?;
            println!("history compacted through revision {compacted}");
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::List { prefix, limit, json } => {
            let (kvs, truncated) = client.list(prefix.as_bytes(), limit).await.context("list")?;
            if json {
                println!("{}", json!({"kvs": kvs.iter().map(kv_json).collect::<Vec<_>>(), "truncated": truncated}));
            } else {
                for kv in &kvs {
                    println!("{}\t{}", text(&kv.key), text(&kv.value));
                }
                if truncated {
                    eprintln!("(more keys follow; raise --limit)");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KvCommand::Watch { key, prefix, from_revision, count, json } => {
            let mut watch = client.watch(key.as_bytes(), prefix, from_revision);
            let mut printed = 0u64;
            loop {
                let reply = tokio::select! {
                    reply = watch.next() => reply.context("watch")?,
                    _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
                };
                for event in reply.events {
                    let Some(kv) = event.kv else { continue };
                    let kind = if event.kind == EventKind::Delete as i32 { "DELETE" } else { "PUT" };
                    if json {
                        let mut line = kv_json(&kv);
                        line["event"] = json!(kind);
                        line["revision"] = json!(reply.revision);
                        println!("{line}");
                    } else if kind == "DELETE" {
                        println!("{kind} {} (revision {})", text(&kv.key), reply.revision);
                    } else {
                        println!(
                            "{kind} {} {} (revision {}, version {})",
                            text(&kv.key),
                            text(&kv.value),
                            reply.revision,
                            kv.version
                        );
                    }
                    printed += 1;
                    if count.is_some_and(|count| printed >= count) {
                        return Ok(ExitCode::SUCCESS);
                    }
                }
            }
        }
        KvCommand::Lock { name, ttl: ttl_seconds, command } => {
            run_locked(&client, &name, ttl(ttl_seconds)?, &command).await
        }
    }
}

/// How holding the lock ended.
enum Held {
    /// The command ended by itself, the lock held throughout.
    Finished(Result<std::process::ExitStatus>),
    /// The session ended, or was given up, first: the command (if it had started) was stopped.
    Lost(String),
}

/// Runs `command` while holding lock `name` (the recipe and its fencing token are at
/// `mendfs_client::lock`). The command runs only while the session is known to be alive: once
/// the client gives the session up or hears that it is gone, the command is stopped, and that
/// is over before the cluster can expire the session and let the next contender in (see
/// `stop_command`).
async fn run_locked(client: &Client, name: &str, ttl: Duration, command: &[String]) -> Result<ExitCode> {
    let mut lock = client.lock(name, ttl).await.map_err(|e| match e {
        lost @ mendfs_client::Error::LockLost(_) => anyhow::Error::new(lost),
        other => anyhow::Error::new(other).context(format!("acquire lock {name}")),
    })?;
    let token = lock.token();
    eprintln!("lock {name} acquired (fencing token {token})");
    let spawned = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("MENDFS_LOCK_TOKEN", token.to_string())
        // The command gets its fencing token, not this shell's keys to the cluster.
        .env_remove("MENDFS_SECRET")
        .env_remove("MENDFS_TOKEN")
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = lock.release().await;
            return Err(e).with_context(|| format!("cannot run {}", command[0]));
        }
    };
    let held = tokio::select! {
        biased;
        lost = lock.lost() => {
            stop_command(&mut child, ttl / 6).await;
            Held::Lost(lost.to_string())
        }
        status = child.wait() => Held::Finished(status.context("wait for the command")),
    };
    match held {
        Held::Finished(status) => {
            lock.release().await.context("release the lock")?;
            let status = status?;
            Ok(match status.code() {
                Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
                None => ExitCode::FAILURE,
            })
        }
        Held::Lost(reason) => {
            lock.abandon().await;
            bail!("{reason}")
        }
    }
}

/// Stops a command whose lock is lost: SIGTERM, so that it can stop cleanly, then SIGKILL if it
/// is still running after `grace`. With `grace` at TTL/6 the command is gone by 5/6 of the
/// TTL after the last acknowledged keep-alive was sent, before the cluster can expire the
/// session (TTL after that send at the earliest). Only the command itself is signalled; what
/// it started must end with it.
async fn stop_command(child: &mut tokio::process::Child, grace: Duration) {
    let pid = child.id().and_then(|pid| i32::try_from(pid).ok()).and_then(rustix::process::Pid::from_raw);
    if let Some(pid) = pid {
        // The child is not yet reaped, so its pid cannot belong to another process.
        if rustix::process::kill_process(pid, rustix::process::Signal::TERM).is_ok()
            && tokio::time::timeout(grace, child.wait()).await.is_ok()
        {
            return;
        }
    }
    let _ = child.kill().await;
}

pub async fn run_cluster(connection: Connection, command: ClusterCommand) -> Result<ExitCode> {
    let client = connection.client()?;
    match command {
        ClusterCommand::Status { json } => {
            let status = client.status().await.context("cluster status")?;
            if json {
                let nodes: Vec<_> = status
                    .nodes
                    .iter()
                    .map(|n| {
                        json!({
                            "id": n.id, "addr": n.addr, "role": n.role, "voter": n.voter,
                            "last_log_index": n.last_log_index, "applied_index": n.applied_index, "lag": n.lag,
                            "snapshot_index": n.snapshot_index, "purged_index": n.purged_index,
                            "revision": n.revision, "term": n.term,
                            "error": if n.error.is_empty() { None } else { Some(&n.error) },
                            "state": if n.state.is_empty() { None } else { Some(&n.state) },
                            "state_reason": if n.state_reason.is_empty() { None } else { Some(&n.state_reason) },
                            "phi": n.phi, "heartbeat_age_ms": n.heartbeat_age_ms,
                            "storage": n.storage, "draining": n.draining, "chunks": n.chunks_listed,
                            "health": n.health.as_ref().map(health_json),
                            "http_addr": if n.http_addr.is_empty() { None } else { Some(&n.http_addr) },
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    json!({"leader": status.leader, "term": status.term, "revision": status.revision,
                           "cluster_id": status.cluster_id, "nodes": nodes,
                           "chunks": status.chunks,
                           "under_replicated_chunks": status.under_replicated_chunks,
                           "over_replicated_chunks": status.over_replicated_chunks,
                           "lost_chunks": status.lost_chunks,
                           "unplaceable_copies": status.unplaceable_copies,
                           "stripes": status.stripes.iter().map(|s| json!({
                               "live_shards": s.live_shards, "total_shards": s.total_shards,
                               "stripes": s.stripes})).collect::<Vec<_>>(),
                           "repair": status.repair.as_ref().map(repair_json),
                           "recent_repairs": status.recent_repairs.iter().map(repair_json).collect::<Vec<_>>(),
                           "kv": status.kv_usage.as_ref().map(|kv| json!({
                               "key_bytes": kv.key_bytes, "history_bytes": kv.history_bytes,
                               "quota_bytes": kv.quota_bytes, "quota_alarm": kv.quota_alarm,
                               "sessions": kv.sessions, "max_sessions": kv.max_sessions,
                               "compacted_revision": kv.compacted_revision})),
                           "events": status.events.iter().map(|e| json!({
                               "unix_ms": e.unix_ms, "kind": e.kind, "node": e.node,
                               "state": if e.state.is_empty() { None } else { Some(&e.state) },
                               "detail": e.detail})).collect::<Vec<_>>(),
                           "health_error": if status.health_error.is_empty() { None } else { Some(&status.health_error) }})
                );
            } else {
                println!(
                    "leader: {}   term: {}   revision: {}   cluster: {}",
                    status.leader.map_or("none".to_string(), |id| id.to_string()),
                    status.term,
                    status.revision,
                    status.cluster_id
                );
                println!(
                    "{:>4}  {:<22} {:<10} {:>5} {:>9} {:>6} {:<9} {:>6} {:>7} {:>7} {:>11} {:>5}",
                    "ID", "ADDRESS", "ROLE", "VOTER", "APPLIED", "LAG", "STATE", "PHI", "BEAT", "CHUNKS", "DISK", "CPU"
                );
                for n in &status.nodes {
                    let state = match (n.state.as_str(), n.draining) {
                        ("", _) => "-".to_string(),
                        (state, true) => format!("{state}/drain"),
                        (state, false) => state.to_string(),
                    };
                    let beat = n.heartbeat_age_ms.map_or("-".to_string(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
                    let (chunks, disk, cpu) = match &n.health {
                        Some(h) => (
                            h.chunk_count.to_string(),
                            if h.disk_capacity_bytes > 0 {
                                format!("{:.0}% full", 100.0 * h.disk_used_bytes as f64 / h.disk_capacity_bytes as f64)
                            } else {
                                "-".to_string()
                            },
                            format!("{:.0}%", h.cpu_percent),
                        ),
                        None => ("-".to_string(), "-".to_string(), "-".to_string()),
                    };
                    let mut notes = Vec::new();
                    if !n.state_reason.is_empty() {
                        notes.push(n.state_reason.clone());
                    }
                    if !n.error.is_empty() {
                        notes.push(n.error.clone());
                    }
                    println!(
                        "{:>4}  {:<22} {:<10} {:>5} {:>9} {:>6} {:<9} {:>6.1} {:>7} {:>7} {:>11} {:>5}{}",
                        n.id,
                        n.addr,
                        n.role,
                        if n.voter { "yes" } else { "no" },
                        n.applied_index,
                        n.lag,
                        state,
                        n.phi,
                        beat,
                        chunks,
                        disk,
                        cpu,
                        if notes.is_empty() { String::new() } else { format!("  ({})", notes.join("; ")) }
                    );
                }
                println!(
                    "chunks: {}   under-replicated: {}   over-replicated: {}   lost: {}   unplaceable copies: {}",
                    status.chunks,
                    status.under_replicated_chunks,
                    status.over_replicated_chunks,
                    status.lost_chunks,
                    status.unplaceable_copies
                );
                if !status.stripes.is_empty() {
                    // Fewest live shards first: the stripes nearest to loss lead the line.
                    let counts: Vec<String> = status
                        .stripes
                        .iter()
                        .map(|s| format!("{} with {}/{} shards", s.stripes, s.live_shards, s.total_shards))
                        .collect();
                    println!("erasure-coded stripes: {}", counts.join(", "));
                }
                if let Some(r) = &status.repair {
                    let progress =
                        if r.total_bytes > 0 { 100.0 * r.done_bytes as f64 / r.total_bytes as f64 } else { 100.0 };
                    let state = match (r.finished_unix_ms, r.eta_secs) {
                        (Some(_), _) => "finished".to_string(),
                        (None, Some(eta)) => format!("ETA {eta:.0}s"),
                        (None, None) => "running".to_string(),
                    };
                    println!(
                        "repair #{} ({}): {} / {} ({progress:.0}%), {} / {} copies, {}/s, {state}",
                        r.job_id,
                        r.reason,
                        mib(r.done_bytes),
                        mib(r.total_bytes),
                        r.done_copies,
                        r.total_copies,
                        mib(r.bytes_per_sec as u64),
                    );
                }
                // The jobs before it, briefly: enough to see that node 2 failed twice today.
                for r in status.recent_repairs.iter().take(RECENT_REPAIRS_SHOWN) {
                    let started = std::time::UNIX_EPOCH + std::time::Duration::from_millis(r.started_unix_ms);
                    let how = match r.finished_unix_ms {
                        Some(finished) => {
                            format!("finished in {:.1}s", finished.saturating_sub(r.started_unix_ms) as f64 / 1000.0)
                        }
                        None => "superseded before it finished".to_string(),
                    };
                    println!(
                        "  earlier repair #{} ({}): started {}, {} / {}, {} copies, {how}",
                        r.job_id,
                        r.reason,
                        humantime::format_rfc3339_seconds(started),
                        mib(r.done_bytes),
                        mib(r.total_bytes),
                        r.done_copies,
                    );
                }
                if let Some(kv) = &status.kv_usage {
                    let used = kv.key_bytes + kv.history_bytes;
                    println!(
                        "kv: {} of {} quota ({:.0}%: keys {}, history {}){}   sessions: {} of {}",
                        mib(used),
                        mib(kv.quota_bytes),
                        100.0 * used as f64 / kv.quota_bytes.max(1) as f64,
                        mib(kv.key_bytes),
                        mib(kv.history_bytes),
                        if kv.quota_alarm { "   QUOTA ALARM: writes refused" } else { "" },
                        kv.sessions,
                        kv.max_sessions
                    );
                }
                // The newest few of the leader's timeline; the dashboard shows it all.
                let recent = &status.events[status.events.len().saturating_sub(STATUS_EVENTS_SHOWN)..];
                if !recent.is_empty() {
                    println!("recent events:");
                    for event in recent {
                        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(event.unix_ms);
                        println!("  {}  {}", humantime::format_rfc3339_millis(at), event.detail);
                    }
                }
                if !status.health_error.is_empty() {
                    println!("(no liveness view: {})", status.health_error);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::AddNode { id, addr, learner } => {
            let reply = client.add_node(id, &addr, learner).await.with_context(|| format!("add node {id}"))?;
            println!("voters: {:?}  learners: {:?}", reply.voters, reply.learners);
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::RemoveNode { id } => {
            let reply = client.remove_node(id).await.with_context(|| format!("remove node {id}"))?;
            println!("voters: {:?}  learners: {:?}", reply.voters, reply.learners);
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Drain { id } => {
            client.drain(id, false).await.with_context(|| format!("drain node {id}"))?;
            println!("node {id} is draining: its copies move elsewhere; `mendfs cluster status` shows its chunk count");
            Ok(ExitCode::SUCCESS)
        }
        ClusterCommand::Undrain { id } => {
            client.drain(id, true).await.with_context(|| format!("undrain node {id}"))?;
            println!("node {id} accepts new chunks again");
            Ok(ExitCode::SUCCESS)
        }
    }
}
