//! A chaos run, end to end: start a local cluster (each node in a network namespace of its
//! own where the machine allows), run the workloads while the nemesis follows the schedule,
//! remove every fault, wait for the cluster to heal, read everything back, check, report.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mendfs_client::{Client, ClientConfig, StatusReply};
use mendfs_testkit::netns::Lab;
use mendfs_testkit::{Cluster, ClusterOptions};

use crate::check;
use crate::history::Call;
use crate::nemesis::{self, FaultWindow, Target};
use crate::report::{self, Convergence, Report};
use crate::schedule::{self, FaultKind, ScheduleSpec};
use crate::workload::{self, Recorder, WorkloadContext, WorkloadKind};

/// What `mendfs chaos` was asked for.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// The `mendfs` binary the nodes run.
    pub binary: PathBuf,
    pub nodes: usize,
    pub seconds: u64,
    pub seed: u64,
    pub faults: Vec<FaultKind>,
    pub workloads: Vec<WorkloadKind>,
    /// Where the report goes (created if missing).
    pub report_dir: PathBuf,
    /// How long the cluster gets to heal after the last fault before the run fails.
    pub heal_seconds: u64,
    /// Clients per workload.
    pub clients: usize,
    /// Run the nodes in the deliberately broken `--unsafe-local-reads` mode (to show that the
    /// checker catches a server that breaks linearizability).
    pub unsafe_local_reads: bool,
}

/// Detector, repair, GC and scrub settings scaled down so that a fault is noticed and healed
/// within seconds (the defaults are tuned for production, in tens of seconds), and a small
/// chunk size so that files span several chunks. Snapshots every few hundred entries, so
/// restarts also exercise snapshot install and log compaction.
const CHAOS_SERVER_ARGS: &[&str] = &[
    "--chunk-size-bytes",
    "262144",
    "--health-interval-ms",
    "250",
    "--acceptable-pause-ms",
    "1500",
    "--down-after-ms",
    "4000",
    "--repair-scan-interval-ms",
    "500",
    "--repair-bytes-per-sec",
    "0",
    "--orphan-grace-ms",
    "8000",
    "--gc-interval-ms",
    "1000",
    "--scrub-interval-ms",
    "2000",
    "--scrub-bytes-per-sec",
    "104857600",
    "--snapshot-every-entries",
    "500",
    "--allow-fault-injection",
];

/// Client call settings for the workloads: an operation that has not finished in 5 s is
/// recorded as unknown and the client moves on.
const OPERATION_DEADLINE: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How a run ended.
pub struct ChaosOutcome {
    pub report: Report,
    /// `chaos: seed=S ops=N faults=F violations=V converged=yes|no`
    pub summary_line: String,
    pub passed: bool,
}

/// Runs chaos as `options` say; blocks until the report is written.
pub fn run(options: ChaosOptions) -> Result<ChaosOutcome> {
    if !(3..=9).contains(&options.nodes) {
        bail!("--nodes must be between 3 and 9 (a majority must survive any one fault)");
    }
    std::fs::create_dir_all(&options.report_dir)
        .with_context(|| format!("create the report directory {}", options.report_dir.display()))?;
    let node_ids: Vec<u64> = (1..=options.nodes as u64).collect();
    // The membership fault adds and removes one more node, which needs a place in the lab.
    let spare = options.faults.contains(&FaultKind::Membership).then_some(options.nodes as u64 + 1);
    let lab_ids: Vec<u64> = node_ids.iter().copied().chain(spare).collect();

    // What this machine allows; the rest of the requested faults are skipped, and said so.
    let mut skipped: Vec<(FaultKind, String)> = Vec::new();
    let lab = if options.faults.iter().any(|kind| kind.needs_network_lab()) {
        match Lab::create(&lab_ids).and_then(|lab| lab.filters_available().map(|()| lab)) {
            Ok(lab) => Some(Arc::new(lab)),
            Err(e) => {
                let reason = format!("no network lab: {e:#}");
                for kind in options.faults.iter().filter(|kind| kind.needs_network_lab()) {
                    skipped.push((*kind, reason.clone()));
                }
                None
            }
        }
    } else {
        None
    };
    let clock_control = options.faults.contains(&FaultKind::ClockSkew);
    let clock_control = clock_control
        && match mendfs_testkit::faketime_library() {
            Some(_) => true,
            None => {
                skipped.push((FaultKind::ClockSkew, "libfaketime is not installed (Debian: faketime)".into()));
                false
            }
        };
    let kinds: Vec<FaultKind> =
        options.faults.iter().copied().filter(|kind| !skipped.iter().any(|(skip, _)| skip == kind)).collect();
    let run_ms = options.seconds * 1000;
    let planned = schedule::plan(&ScheduleSpec::new(options.seed, run_ms, kinds));

    let mut server_args: Vec<String> = CHAOS_SERVER_ARGS.iter().map(|s| s.to_string()).collect();
    if options.unsafe_local_reads {
        server_args.push("--unsafe-local-reads".into());
    }
    // Every node serves S3 when the s3 workload runs (on its own address in the lab, where
    // every port is free).
    let mut node_args = BTreeMap::new();
    let mut gateways = Vec::new();
    if options.workloads.contains(&WorkloadKind::S3) {
        let placement = lab.as_ref().map(|lab| lab.placement()).unwrap_or_default();
        for id in &node_ids {
            let host = placement.nodes.get(id).map_or("127.0.0.1", |(_, ip)| ip.as_str());
            let gateway = format!("{host}:{}", mendfs_testkit::free_port()?);
            node_args.insert(*id, vec!["--s3".to_string(), gateway.clone()]);
            gateways.push(gateway);
        }
    }
    let cluster_options = ClusterOptions {
        nodes: options.nodes,
        server_args,
        node_args,
        dir: Some(options.report_dir.join("cluster")),
        keep_dir: true,
        placement: lab.as_ref().map(|lab| lab.placement()).unwrap_or_default(),
        clock_control,
        ..ClusterOptions::default()
    };
    if let Some(dir) = &cluster_options.dir {
        // A report directory reused for another run: the old cluster's files must not mix in.
        let _ = std::fs::remove_dir_all(dir);
    }
    println!(
        "chaos: seed {} | {} nodes{} | {} s | faults: {} | workloads: {}",
        options.seed,
        options.nodes,
        if lab.is_some() { " in network namespaces" } else { " on 127.0.0.1" },
        options.seconds,
        planned.iter().map(|f| f.kind.name()).collect::<Vec<_>>().join(" "),
        options.workloads.iter().map(|w| w.name()).collect::<Vec<_>>().join(","),
    );
    for (kind, reason) in &skipped {
        println!("chaos: skipping {}: {reason}", kind.name());
    }
    let cluster = Cluster::start(&options.binary, cluster_options).context("start the cluster")?;
    cluster.wait_for_leader(Duration::from_secs(60)).context("the cluster elected no leader")?;
    let mut config = ClientConfig::new(cluster.endpoint_list());
    config.secret = cluster.secret();
    config.deadline = OPERATION_DEADLINE;
    config.attempt_timeout = ATTEMPT_TIMEOUT;
    let cluster = Arc::new(Mutex::new(cluster));

    // The workloads run in the clients' namespace, which reaches every node whatever the
    // partition: a thread of its own enters it, and its runtime's threads are born there.
    let client_netns = lab.as_ref().map(|lab| lab.client_netns());
    let thread_options = options.clone();
    let thread_cluster = cluster.clone();
    let thread_lab = lab.clone();
    let outcome = std::thread::Builder::new()
        .name("chaos".into())
        .spawn(move || -> Result<Report> {
            if let Some(netns) = &client_netns {
                enter_network_namespace(netns)?;
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
            runtime.block_on(run_in_namespace(Setup {
                options: thread_options,
                cluster: thread_cluster,
                lab: thread_lab,
                node_ids,
                spare,
                config,
                gateways,
                planned,
                skipped,
            }))
        })
        .context("start the chaos thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("the chaos thread panicked"))?;
    let report = outcome?;
    report::write(&options.report_dir, &report)?;
    let summary_line = report.summary_line();
    let passed = report.passed();
    // Nodes stop with the cluster; the network lab is deleted when its last handle goes.
    drop(cluster);
    drop(lab);
    Ok(ChaosOutcome { report, summary_line, passed })
}

fn enter_network_namespace(name: &str) -> Result<()> {
    let path = format!("/var/run/netns/{name}");
    let namespace = File::open(&path).with_context(|| format!("open {path}"))?;
    rustix::thread::move_into_link_name_space(namespace.as_fd(), Some(rustix::thread::LinkNameSpaceType::Network))
        .with_context(|| format!("enter network namespace {name}"))
}

/// What the workloads' thread gets to run the chaos with.
struct Setup {
    options: ChaosOptions,
    cluster: Arc<Mutex<Cluster>>,
    lab: Option<Arc<Lab>>,
    node_ids: Vec<u64>,
    spare: Option<u64>,
    config: ClientConfig,
    /// Every node's S3 gateway (empty without the s3 workload).
    gateways: Vec<String>,
    planned: Vec<schedule::PlannedFault>,
    skipped: Vec<(FaultKind, String)>,
}

async fn run_in_namespace(setup: Setup) -> Result<Report> {
    let Setup { options, cluster, lab, node_ids, spare, config, gateways, planned, skipped } = setup;
    // The s3 workload's key and bucket are made before the clock starts, with no fault yet.
    let s3_target = if options.workloads.contains(&WorkloadKind::S3) {
        let admin = Client::new(config.clone())?;
        Some(Arc::new(prepare_s3(&admin, gateways).await?))
    } else {
        None
    };
    let started = Instant::now();
    let recorder = Recorder::new(started);
    let stop_at = started + Duration::from_secs(options.seconds);
    let context = WorkloadContext { recorder: recorder.clone(), stop_at, seed: options.seed };
    let endpoints = config.endpoints.clone();
    // Each client starts at another node, so that reads are served all over the cluster.
    let client_for = |n: usize| -> Result<Client> {
        let mut config = config.clone();
        config.endpoints.rotate_left(n % endpoints.len().max(1));
        Ok(Client::new(config)?)
    };
    let mut workers = tokio::task::JoinSet::new();
    let mut client_id = 0u64;
    // A kv client is bound to one node, as Jepsen's clients are: every node's own answers are
    // then checked, including a cut-off node's (a client that failed over would leave it at
    // its first refused write). File and lock clients fail over like any application.
    let pinned_to = |n: usize| -> Result<Client> {
        let mut config = config.clone();
        config.endpoints = vec![endpoints[n % endpoints.len().max(1)].clone()];
        Ok(Client::new(config)?)
    };
    for kind in &options.workloads {
        for _ in 0..options.clients {
            client_id += 1;
            let client = match kind {
                WorkloadKind::Kv => pinned_to(client_id as usize)?,
                _ => client_for(client_id as usize)?,
            };
            let context = context.clone();
            match kind {
                WorkloadKind::Kv => workers.spawn(workload::run_kv_client(context, client_id, client)),
                WorkloadKind::Files => workers.spawn(workload::run_files_client(context, client_id, client)),
                WorkloadKind::Lock => workers.spawn(workload::run_lock_client(context, client_id, client)),
                WorkloadKind::S3 => match &s3_target {
                    Some(target) => workers.spawn(workload::run_s3_client(context, client_id, target.clone())),
                    None => bail!("the s3 workload has no gateways"),
                },
            };
        }
    }
    // The observer asks for the cluster's status, which a follower forwards to the leader:
    // it gets more time per attempt than the workloads' operations.
    let observer = {
        let mut config = config.clone();
        config.attempt_timeout = Duration::from_secs(8);
        config.deadline = Duration::from_secs(20);
        Client::new(config)?
    };
    let target = Target {
        cluster: cluster.clone(),
        lab,
        node_ids: node_ids.clone(),
        observer: observer.clone(),
        spare,
        spare_joined: false.into(),
    };

    // The nemesis, on this task: one fault at a time, at the scheduled times.
    let mut windows: Vec<FaultWindow> = Vec::new();
    for fault in &planned {
        let at = started + Duration::from_millis(fault.at_ms);
        tokio::time::sleep_until(at.into()).await;
        let window = nemesis::inflict(&target, &recorder, fault).await;
        println!(
            "chaos: {:>7.1} s {:<17} {}{}",
            window.started_us as f64 / 1e6,
            fault.kind.name(),
            window.detail,
            window.error.as_deref().map(|e| format!(" (failed: {e})")).unwrap_or_default()
        );
        windows.push(window);
    }
    // Operations started before `stop_at` finish within their deadline.
    let workers_done = tokio::time::timeout(
        stop_at.saturating_duration_since(Instant::now()) + OPERATION_DEADLINE * 4 + workload::LOCK_TTL,
        async { while workers.join_next().await.is_some() {} },
    )
    .await;
    if workers_done.is_err() {
        workers.abort_all();
        println!("chaos: some workload clients did not stop in time; their last operations are left unknown");
    }
    let faults_over_us = recorder.now_us();
    let target = Arc::new(target);
    let healing = target.clone();
    tokio::task::spawn_blocking(move || nemesis::heal_everything(&healing)).await.context("heal task")??;
    println!("chaos: every fault removed; waiting up to {} s for the cluster to heal", options.heal_seconds);
    let convergence = wait_for_convergence(&target.observer, Duration::from_secs(options.heal_seconds)).await;
    match &convergence.failure {
        None => println!("chaos: healed in {:.1} s", convergence.took_ms as f64 / 1000.0),
        Some(why) => println!("chaos: NOT healed after {} s: {why}", options.heal_seconds),
    }

    // Reading everything back is part of the history: an acknowledged write that a final read
    // does not see is a violation like any other.
    let unreadable = final_reads(&options.workloads, &recorder, &target.observer, s3_target.as_ref()).await;
    for what in &unreadable {
        println!("chaos: UNREADABLE after healing: {what}");
    }
    let history = recorder.history();
    let checked = check::check_history(&history, &check::CheckOptions::default());
    let leaders_logs = {
        let cluster = cluster.lock().map_err(|_| anyhow::anyhow!("cluster lock poisoned"))?;
        target.node_ids.iter().map(|id| (*id, report::plain_text(&cluster.log_tail(*id, 30)))).collect()
    };
    Ok(Report::new(report::RunFacts {
        seed: options.seed,
        nodes: options.nodes,
        seconds: options.seconds,
        workloads: options.workloads.clone(),
        unsafe_local_reads: options.unsafe_local_reads,
        planned,
        skipped,
        windows,
        faults_over_us,
        history,
        checked,
        unreadable,
        convergence,
        node_log_tails: leaders_logs,
    }))
}

/// The client that makes the final reads.
const FINAL_READER: u64 = 0;

/// Reads every key and path once more; returns the ones that could not be read at all (after
/// healing, each is data the cluster can no longer serve: a violation of its own).
async fn final_reads(
    workloads: &[WorkloadKind],
    recorder: &Recorder,
    client: &Client,
    s3_target: Option<&Arc<workload::S3Target>>,
) -> Vec<String> {
    let mut unreadable = Vec::new();
    let mut calls: Vec<Call> = Vec::new();
    let mut s3_session = s3_target.map(|target| workload::S3Session::new(target.clone(), 0));
    if workloads.contains(&WorkloadKind::Kv) {
        calls.extend(workload::kv_keys().into_iter().map(|key| Call::KvRead { key }));
    }
    if workloads.contains(&WorkloadKind::Files) {
        calls.extend(workload::file_paths().into_iter().map(|path| Call::FileGet { path }));
    }
    if s3_session.is_some() {
        calls.extend(workload::object_subjects().into_iter().map(|path| Call::FileGet { path }));
    }
    for call in calls {
        // A final read that fails is tried again: after healing it should not, and a read
        // that never succeeds leaves that key unchecked, which the report shows.
        let mut last_error = None;
        for _ in 0..3 {
            let outcome = match &call {
                Call::KvRead { key } => {
                    let key = key.clone();
                    recorder
                        .record(FINAL_READER, call.clone(), async {
                            match client.get(key.as_bytes()).await {
                                Ok(found) => crate::history::Outcome::Ok {
                                    returned: crate::history::Returned::KvRead {
                                        found: found.map(|kv| crate::history::Versioned {
                                            value: std::str::from_utf8(&kv.value)
                                                .ok()
                                                .and_then(|v| v.parse().ok())
                                                .unwrap_or(u64::MAX),
                                            version: kv.version,
                                        }),
                                    },
                                },
                                Err(e) => crate::history::Outcome::Unknown { error: e.to_string() },
                            }
                        })
                        .await
                }
                Call::FileGet { path } if call.is_s3() => match s3_session.as_mut() {
                    Some(session) => recorder.record(FINAL_READER, call.clone(), session.get(path)).await,
                    None => break,
                },
                Call::FileGet { path } => {
                    recorder.record(FINAL_READER, call.clone(), workload::read_file(client, path)).await
                }
                _ => break,
            };
            match outcome {
                crate::history::Outcome::Ok { .. } => {
                    last_error = None;
                    break;
                }
                crate::history::Outcome::Failed { error } | crate::history::Outcome::Unknown { error } => {
                    last_error = Some(error)
                }
            }
        }
        if let Some(error) = last_error {
            unreadable.push(format!("{} {}: {error}", report::workload_of(&call), call.subject()));
        }
    }
    unreadable
}

/// Makes the s3 workload's access key and bucket (the key owns it), retrying while the
/// cluster comes up.
async fn prepare_s3(admin: &Client, gateways: Vec<String>) -> Result<workload::S3Target> {
    let ready_by = Instant::now() + Duration::from_secs(60);
    let key = loop {
        match admin.s3_create_key("chaos", false).await {
            Ok(key) => break key,
            Err(e) if Instant::now() >= ready_by => return Err(e).context("create the s3 workload's access key"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    loop {
        match admin.s3_create_bucket(workload::S3_BUCKET, Some(&key.key_id)).await {
            // A retried create that had applied the first time.
            Ok(()) | Err(mendfs_client::Error::AlreadyExists(_)) => break,
            Err(e) if Instant::now() >= ready_by => return Err(e).context("create the s3 workload's bucket"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(workload::S3Target {
        signer: crate::s3_client::Signer::new(&key.key_id, &key.secret),
        gateways,
        deadline: OPERATION_DEADLINE,
    })
}

/// Waits until the cluster has healed: a leader, every node up and caught up, every chunk at
/// full redundancy, no node holding copies the metadata does not list (orphans collected), and
/// every storage node through a whole scrub pass that started after the faults ended (a
/// flipped byte is only known once a scrub or a read meets it).
async fn wait_for_convergence(client: &Client, bound: Duration) -> Convergence {
    let started = Instant::now();
    let mut last_failure = String::from("no status yet");
    let mut last_status = None;
    // Scrub passes per node when healing began; counters restart with the process, and no
    // node restarts from here on.
    let mut passes_at_start: Option<BTreeMap<u64, u64>> = None;
    while started.elapsed() < bound {
        match tokio::time::timeout(Duration::from_secs(5), client.status()).await {
            Ok(Ok(status)) => {
                let passes = scrub_passes(&status);
                let before = passes_at_start.get_or_insert_with(|| passes.clone());
                let unscrubbed: Vec<u64> = before
                    .iter()
                    .filter(|(id, count)| passes.get(id).is_none_or(|now| now <= count))
                    .map(|(id, _)| *id)
                    .collect();
                let why = unhealed(&status).or_else(|| {
                    (!unscrubbed.is_empty())
                        .then(|| format!("nodes {unscrubbed:?} have not finished a scrub pass since the faults ended"))
                });
                last_status = Some(report::status_summary(&status));
                match why {
                    None => {
                        return Convergence {
                            took_ms: started.elapsed().as_millis() as u64,
                            failure: None,
                            status: last_status,
                        }
                    }
                    Some(why) => last_failure = why,
                }
            }
            Ok(Err(e)) => last_failure = format!("cluster status failed: {e}"),
            Err(_) => last_failure = "cluster status timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Convergence { took_ms: started.elapsed().as_millis() as u64, failure: Some(last_failure), status: last_status }
}

fn scrub_passes(status: &StatusReply) -> BTreeMap<u64, u64> {
    status.nodes.iter().filter(|n| n.storage).map(|n| (n.id, n.health.as_ref().map_or(0, |h| h.scrub_passes))).collect()
}

/// Why `status` is not yet a healed cluster, or None when it is.
pub fn unhealed(status: &StatusReply) -> Option<String> {
    let Some(leader) = status.leader else { return Some("no leader".into()) };
    if !status.health_error.is_empty() {
        return Some(format!("the leader's health view is missing: {}", status.health_error));
    }
    if let Some(node) = status.nodes.iter().find(|n| n.storage && n.health.is_none()) {
        return Some(format!("no heartbeat from node {} has reached the leader yet", node.id));
    }
    let leader_last = status.nodes.iter().find(|n| n.id == leader).map(|n| n.last_log_index).unwrap_or(0);
    for node in &status.nodes {
        if node.role == "unreachable" {
            return Some(format!("node {} is unreachable: {}", node.id, node.error));
        }
        if node.storage && node.state != "up" {
            return Some(format!("node {} is {} ({})", node.id, node.state, node.state_reason));
        }
        if node.applied_index < leader_last {
            return Some(format!("node {} has applied {} of {leader_last}", node.id, node.applied_index));
        }
    }
    if status.under_replicated_chunks > 0 || status.lost_chunks > 0 || status.unplaceable_copies > 0 {
        return Some(format!(
            "{} chunks under-replicated, {} lost, {} copies unplaceable",
            status.under_replicated_chunks, status.lost_chunks, status.unplaceable_copies
        ));
    }
    for node in status.nodes.iter().filter(|n| n.storage) {
        let stored = node.health.as_ref().map_or(0, |h| h.chunk_count);
        if stored != node.chunks_listed {
            return Some(format!(
                "node {} stores {stored} chunks and the metadata lists {} on it (orphans not yet collected, \
                 or copies missing)",
                node.id, node.chunks_listed
            ));
        }
    }
    None
}
