//! The nemesis: applies the scheduled faults to the running cluster and undoes them, and
//! records when each was in force (the fault windows of the report).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mendfs_client::Client;
use mendfs_testkit::netns::Lab;
use mendfs_testkit::{chunk_files, Cluster};
use serde::{Deserialize, Serialize};

use crate::history::Micros;
use crate::schedule::{FaultKind, PlannedFault, SplitMix64};
use crate::workload::Recorder;

/// A fault as it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultWindow {
    pub kind: FaultKind,
    /// The nodes it was applied to.
    pub targets: Vec<u64>,
    /// What exactly was done ("nodes [1, 2] | [3]", "flipped 3 bytes in 2 chunk files").
    pub detail: String,
    pub started_us: Micros,
    /// When it was undone (equal to `started_us` for instant faults).
    pub ended_us: Micros,
    /// Why applying or undoing it failed, if it did.
    pub error: Option<String>,
}

/// What undoing an applied fault takes.
enum Undo {
    Nothing,
    Restart(u64),
    Resume(u64),
    HealNetwork,
    ClearFaultFile(u64),
    ResetClock(u64),
}

/// The cluster and its surroundings, shared between the nemesis and the runner.
pub struct Target {
    pub cluster: Arc<Mutex<Cluster>>,
    pub lab: Option<Arc<Lab>>,
    pub node_ids: Vec<u64>,
    /// A client that asks who leads.
    pub observer: Client,
    /// The node the membership fault adds and removes, if that fault is on.
    pub spare: Option<u64>,
    /// Whether the spare is a member now.
    pub spare_joined: std::sync::atomic::AtomicBool,
}

impl Target {
    fn with_cluster<T>(&self, f: impl FnOnce(&mut Cluster) -> Result<T>) -> Result<T> {
        let mut cluster = self.cluster.lock().map_err(|_| anyhow::anyhow!("cluster lock poisoned"))?;
        f(&mut cluster)
    }

    fn data_dir(&self, id: u64) -> Result<PathBuf> {
        self.with_cluster(|cluster| {
            cluster.nodes.get(&id).map(|node| node.data_dir.clone()).with_context(|| format!("no node {id}"))
        })
    }

    fn lab(&self) -> Result<&Lab> {
        match &self.lab {
            Some(lab) => Ok(lab),
            None => bail!("network faults need the network lab (root and nftables)"),
        }
    }

    /// The current leader, as the cluster reports it; None while there is none.
    async fn leader(&self) -> Option<u64> {
        let status = tokio::time::timeout(Duration::from_secs(5), self.observer.status()).await.ok()?.ok()?;
        status.leader
    }
}

/// Applies `fault`, waits out its duration, undoes it; returns its window.
pub async fn inflict(target: &Target, recorder: &Recorder, fault: &PlannedFault) -> FaultWindow {
    let started_us = recorder.now_us();
    let mut window = FaultWindow {
        kind: fault.kind,
        targets: Vec::new(),
        detail: String::new(),
        started_us,
        ended_us: started_us,
        error: None,
    };
    let undo = match apply(target, fault, &mut window).await {
        Ok(undo) => undo,
        Err(e) => {
            window.error = Some(format!("{e:#}"));
            window.ended_us = recorder.now_us();
            return window;
        }
    };
    if !matches!(undo, Undo::Nothing) {
        tokio::time::sleep(Duration::from_millis(fault.duration_ms)).await;
    }
    if let Err(e) = undo_fault(target, undo).await {
        window.error = Some(format!("undo: {e:#}"));
    }
    window.ended_us = recorder.now_us();
    window
}

/// The node a fault for "any node" hits, drawn from the fault's pick.
fn any_node(target: &Target, random: &mut SplitMix64) -> u64 {
    target.node_ids[random.below(target.node_ids.len() as u64) as usize]
}

async fn leader_or_any(target: &Target, random: &mut SplitMix64) -> u64 {
    match target.leader().await {
        Some(leader) => leader,
        None => any_node(target, random),
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.context("nemesis task")?
}

async fn apply(target: &Target, fault: &PlannedFault, window: &mut FaultWindow) -> Result<Undo> {
    let mut random = SplitMix64::new(fault.pick);
    let cluster = target.cluster.clone();
    Ok(match fault.kind {
        FaultKind::Kill | FaultKind::KillLeader => {
            let id = if fault.kind == FaultKind::Kill {
                any_node(target, &mut random)
            } else {
                leader_or_any(target, &mut random).await
            };
            window.targets = vec![id];
            window.detail = format!("SIGKILL node {id}, restart after {} ms", fault.duration_ms);
            blocking(move || cluster.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.kill(id)).await?;
            Undo::Restart(id)
        }
        FaultKind::Pause | FaultKind::PauseLeader => {
            let id = if fault.kind == FaultKind::Pause {
                any_node(target, &mut random)
            } else {
                leader_or_any(target, &mut random).await
            };
            window.targets = vec![id];
            window.detail = format!("SIGSTOP node {id}, SIGCONT after {} ms", fault.duration_ms);
            blocking(move || cluster.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pause(id)).await?;
            Undo::Resume(id)
        }
        FaultKind::Isolate | FaultKind::IsolateLeader => {
            let id = if fault.kind == FaultKind::Isolate {
                any_node(target, &mut random)
            } else {
                leader_or_any(target, &mut random).await
            };
            let rest: Vec<u64> = target.node_ids.iter().copied().filter(|n| *n != id).collect();
            window.targets = vec![id];
            window.detail = format!("node {id} cut off from nodes {rest:?} (clients reach everyone)");
            target.lab()?.partition(&[vec![id], rest])?;
            Undo::HealNetwork
        }
        FaultKind::MajorityMinority => {
            let leader = leader_or_any(target, &mut random).await;
            let mut others: Vec<u64> = target.node_ids.iter().copied().filter(|n| *n != leader).collect();
            shuffle(&mut others, &mut random);
            // The leader's side is the minority: (n - 1) / 2 nodes with it.
            let minority_size = (target.node_ids.len() - 1) / 2;
            let mut minority = vec![leader];
            minority.extend(others.drain(..minority_size.saturating_sub(1)));
            window.targets = minority.clone();
            window.detail = format!("minority {minority:?} (with the leader) | majority {others:?}");
            target.lab()?.partition(&[minority, others])?;
            Undo::HealNetwork
        }
        FaultKind::OneWay => {
            let from = any_node(target, &mut random);
            let others: Vec<u64> = target.node_ids.iter().copied().filter(|n| *n != from).collect();
            let to = others[random.below(others.len() as u64) as usize];
            window.targets = vec![from, to];
            window.detail = format!("packets from node {from} to node {to} dropped, the other way pass");
            target.lab()?.cut_one_way(from, to)?;
            Undo::HealNetwork
        }
        FaultKind::Bridge => {
            let mut nodes = target.node_ids.clone();
            shuffle(&mut nodes, &mut random);
            let bridge = nodes.remove(0);
            let right = nodes.split_off(nodes.len() / 2);
            let left = nodes;
            window.targets = vec![bridge];
            window.detail = format!("{left:?} and {right:?} cannot see each other; node {bridge} sees both");
            target.lab()?.bridge(&left, bridge, &right)?;
            Undo::HealNetwork
        }
        FaultKind::Flaky => {
            let id = any_node(target, &mut random);
            let percent = random.between(10, 40) as u8;
            window.targets = vec![id];
            window.detail = format!("node {id} loses {percent}% of its packets to other nodes");
            target.lab()?.flaky(id, percent)?;
            Undo::HealNetwork
        }
        FaultKind::CorruptChunks | FaultKind::DeleteChunks => {
            let id = any_node(target, &mut random);
            window.targets = vec![id];
            let data_dir = target.data_dir(id)?;
            let corrupt = fault.kind == FaultKind::CorruptChunks;
            window.detail = blocking(move || damage_chunks(&data_dir, corrupt, &mut random)).await?;
            Undo::Nothing
        }
        FaultKind::DiskFull | FaultKind::SlowDisk => {
            let id = any_node(target, &mut random);
            window.targets = vec![id];
            let faults = if fault.kind == FaultKind::DiskFull {
                window.detail = format!("node {id}'s chunk store is full");
                serde_json::json!({ "chunk_store_full": true })
            } else {
                let delay_ms = random.between(20, 200);
                window.detail = format!("node {id}'s chunk reads and writes take {delay_ms} ms more");
                serde_json::json!({ "chunk_io_delay_ms": delay_ms })
            };
            write_fault_file(&target.data_dir(id)?, &faults.to_string())?;
            Undo::ClearFaultFile(id)
        }
        FaultKind::Membership => {
            let spare = target.spare.context("no spare node for membership changes")?;
            window.targets = vec![spare];
            if !target.spare_joined.load(std::sync::atomic::Ordering::Relaxed) {
                // A new storage node: a learner that catches up, registers and gets copies.
                blocking(move || cluster.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.add_storage_learner(spare))
                    .await?;
                target.spare_joined.store(true, std::sync::atomic::Ordering::Relaxed);
                window.detail = format!("node {spare} joined as a storage node");
            } else {
                window.detail = drain_and_remove(target, spare).await?;
            }
            Undo::Nothing
        }
        FaultKind::ClockSkew => {
            let id = any_node(target, &mut random);
            let seconds = random.between(30, 3_600) as i64 * if random.below(2) == 0 { 1 } else { -1 };
            window.targets = vec![id];
            window.detail = format!("node {id}'s wall clock is {seconds:+} s off");
            target.with_cluster(|cluster| cluster.set_clock_offset(id, seconds))?;
            Undo::ResetClock(id)
        }
    })
}

/// Drains the spare (repair moves its copies away under load), removes it from the cluster,
/// stops it and wipes its disk, so it can join again as a new node later.
async fn drain_and_remove(target: &Target, spare: u64) -> Result<String> {
    target.observer.drain(spare, false).await.context("drain the spare")?;
    let started = std::time::Instant::now();
    let drained_within = Duration::from_secs(90);
    loop {
        let listed = match target.observer.status().await {
            Ok(status) => status.nodes.iter().find(|n| n.id == spare).map(|n| n.chunks_listed),
            Err(_) => None,
        };
        if listed == Some(0) {
            break;
        }
        if started.elapsed() > drained_within {
            bail!("node {spare} still held copies {drained_within:?} after the drain began ({listed:?} listed)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    target.observer.remove_node(spare).await.context("remove the drained spare")?;
    target.spare_joined.store(false, std::sync::atomic::Ordering::Relaxed);
    let cluster = target.cluster.clone();
    blocking(move || {
        let mut cluster = cluster.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        cluster.kill(spare)?;
        if let Some(node) = cluster.nodes.get(&spare) {
            let _ = std::fs::remove_dir_all(&node.data_dir);
        }
        Ok(())
    })
    .await?;
    Ok(format!("node {spare} drained in {:.1} s and removed", started.elapsed().as_secs_f64()))
}

async fn undo_fault(target: &Target, undo: Undo) -> Result<()> {
    let cluster = target.cluster.clone();
    match undo {
        Undo::Nothing => Ok(()),
        Undo::Restart(id) => {
            blocking(move || cluster.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.restart(id)).await
        }
        Undo::Resume(id) => blocking(move || cluster.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.resume(id)).await,
        Undo::HealNetwork => target.lab()?.heal_network(),
        Undo::ClearFaultFile(id) => write_fault_file(&target.data_dir(id)?, "{}"),
        Undo::ResetClock(id) => target.with_cluster(|cluster| cluster.set_clock_offset(id, 0)),
    }
}

/// The node's runtime fault control (read only by a node started with
/// `--allow-fault-injection`). Written whole to a temporary name and renamed, so the node never
/// reads half a file.
fn write_fault_file(data_dir: &std::path::Path, json: &str) -> Result<()> {
    let temporary = data_dir.join("faults.json.tmp");
    std::fs::write(&temporary, json).with_context(|| format!("write {}", temporary.display()))?;
    std::fs::rename(&temporary, data_dir.join("faults.json")).context("install faults.json")
}

/// Flips a byte in, or deletes, up to 3 of a node's chunk files.
fn damage_chunks(data_dir: &std::path::Path, corrupt: bool, random: &mut SplitMix64) -> Result<String> {
    let mut files = chunk_files(data_dir);
    if files.is_empty() {
        return Ok("no chunk files yet".into());
    }
    let count = (random.between(1, 3) as usize).min(files.len());
    let mut damaged = Vec::new();
    for _ in 0..count {
        let file = files.remove(random.below(files.len() as u64) as usize);
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if corrupt {
            let mut bytes = std::fs::read(&file).with_context(|| format!("read {}", file.display()))?;
            if bytes.is_empty() {
                continue;
            }
            let at = random.below(bytes.len() as u64) as usize;
            bytes[at] ^= 0x5a;
            std::fs::write(&file, &bytes).with_context(|| format!("corrupt {}", file.display()))?;
            damaged.push(format!("{name}@{at}"));
        } else {
            std::fs::remove_file(&file).with_context(|| format!("delete {}", file.display()))?;
            damaged.push(name);
        }
    }
    Ok(format!("{} chunk files: {}", if corrupt { "flipped a byte in" } else { "deleted" }, damaged.join(", ")))
}

fn shuffle<T>(items: &mut [T], random: &mut SplitMix64) {
    for i in (1..items.len()).rev() {
        let j = random.below(i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

/// Undoes whatever a cancelled run may have left in force: every node running and resumed,
/// the network whole, no disk faults, clocks true.
pub fn heal_everything(target: &Target) -> Result<()> {
    if let Some(lab) = &target.lab {
        lab.heal_network()?;
    }
    let mut cluster = target.cluster.lock().map_err(|_| anyhow::anyhow!("cluster lock poisoned"))?;
    let mut members = target.node_ids.clone();
    if let Some(spare) = target.spare.filter(|_| target.spare_joined.load(std::sync::atomic::Ordering::Relaxed)) {
        members.push(spare);
    }
    for id in members {
        if let Some(node) = cluster.nodes.get(&id) {
            let data_dir = node.data_dir.clone();
            if data_dir.join("faults.json").exists() {
                write_fault_file(&data_dir, "{}")?;
            }
        }
        let _ = cluster.resume(id);
        if !cluster.nodes.get(&id).is_some_and(|node| node.is_running()) {
            cluster.restart(id)?;
        }
        let _ = cluster.set_clock_offset(id, 0);
    }
    Ok(())
}
