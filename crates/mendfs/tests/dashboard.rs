//! The web dashboard in a real headless Chromium (driven through chromedriver), against a
//! four-node cluster of real `mendfs server` processes with auth on: a one-time login link
//! signs the page in once and is refused the second time; the page shows the nodes and the
//! leader, follows a SIGKILLed node through `suspect` and `down` (the node it was loaded from,
//! so the page must move to another node), shows the repair reach 100 % and, after a second
//! job, the first among the earlier ones; it opens a trace by id as a waterfall, and refuses a
//! bad trace id with the reason. Screenshots go to
//! `$CARGO_TARGET_TMPDIR/dashboard/` (printed). Needs Debian's `chromium` and
//! `chromium-driver`; without them the test fails saying so (CI installs them).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client as Browser, ClientBuilder, Locator};
use mendfs_testkit::{free_port, wait_for, Cluster, ClusterOptions};
use serde_json::{json, Value};

const DEADLINE: Duration = Duration::from_secs(120);
const CHUNK: usize = 64 << 10;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    // Debian puts chromedriver here, outside a non-login PATH.
    dirs.push(PathBuf::from("/usr/lib/chromium"));
    names.iter().flat_map(|name| dirs.iter().map(move |dir| dir.join(name))).find(|candidate| candidate.is_file())
}

/// chromedriver on a free port, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_driver() -> Driver {
    let chromium = find_program(&["chromium", "chromium-browser"]);
    let chromedriver = find_program(&["chromedriver"]);
    let (Some(_), Some(chromedriver)) = (&chromium, chromedriver) else {
        panic!(
            "the dashboard test needs a headless Chromium and its WebDriver: \
             apt-get install -y --no-install-recommends chromium chromium-driver (found chromium: {chromium:?})"
        );
    };
    let port = free_port().unwrap();
    let child = Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    wait_for("chromedriver listening", Duration::from_secs(30), || {
        Ok(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok().then_some(()))
    })
    .unwrap();
    Driver { child, url }
}

async fn open_browser(driver: &Driver) -> Browser {
    let chromium = find_program(&["chromium", "chromium-browser"]).unwrap();
    let mut capabilities = serde_json::Map::new();
    capabilities.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            // As root in a container Chromium needs --no-sandbox.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1700"],
        }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector).capabilities(capabilities).connect(&driver.url).await.expect("a Chromium session")
}

/// Runs `script` (a function body) in the page until it returns something truthy.
async fn wait_page(browser: &Browser, what: &str, script: &str) -> Value {
    let started = Instant::now();
    let mut last = Value::Null;
    while started.elapsed() < DEADLINE {
        match browser.execute(script, vec![]).await {
            Ok(value) if !value.is_null() && value != json!(false) => return value,
            Ok(value) => last = value,
            Err(e) => last = json!(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let text = browser.execute("return document.body.innerText", vec![]).await.unwrap_or_default();
    panic!("timed out after {DEADLINE:?} waiting for the page to show {what} (last: {last})\npage:\n{text}");
}

async fn screenshot(browser: &Browser, dir: &Path, name: &str) {
    let png = browser.screenshot().await.expect("a screenshot");
    let path = dir.join(format!("{name}.png"));
    std::fs::write(&path, png).expect("write the screenshot");
    println!("screenshot: {}", path.display());
}

fn node_state_script(id: u64) -> String {
    format!("const n = document.querySelector('#nodes [data-node-id=\"{id}\"]'); return n ? n.dataset.state : null;")
}

/// When `cluster status` (the CLI, through the survivors) first showed `id` suspect and down.
fn watch_cli_status(
    endpoints: String,
    secret: Option<String>,
    id: u64,
) -> std::thread::JoinHandle<(Option<Instant>, Option<Instant>)> {
    std::thread::spawn(move || {
        let (mut suspect, mut down) = (None, None);
        let started = Instant::now();
        while down.is_none() && started.elapsed() < DEADLINE {
            let mut command = Command::new(binary());
            command.args(["cluster", "status", "--json", "--timeout", "5"]).env("MENDFS_ENDPOINTS", &endpoints);
            command.env_remove("MENDFS_TOKEN");
            if let Some(secret) = &secret {
                command.env("MENDFS_SECRET", secret);
            }
            let Ok(output) = command.stdin(Stdio::null()).output() else { continue };
            let seen_at = Instant::now();
            let Ok(status) = serde_json::from_slice::<Value>(&output.stdout) else { continue };
            let state = status["nodes"]
                .as_array()
                .and_then(|nodes| nodes.iter().find(|n| n["id"] == id))
                .map(|n| n["state"].as_str().unwrap_or_default().to_string())
                .unwrap_or_default();
            if state == "suspect" && suspect.is_none() {
                suspect = Some(seen_at);
            }
            if state == "down" {
                down = Some(seen_at);
            }
        }
        (suspect, down)
    })
}

fn latency_ms(cli: Option<Instant>, page: Instant) -> String {
    match cli {
        // Negative: the page polled first.
        Some(cli) if page >= cli => format!("{}", (page - cli).as_millis()),
        Some(cli) => format!("-{}", (cli - page).as_millis()),
        None => "n/a (the CLI never saw it)".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_node_die_the_repair_finish_and_a_trace() {
    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&screenshots).unwrap();
    println!("screenshots go to {}", screenshots.display());
    let driver = start_driver();

    // Three voters and storage-only node 4, every one serving HTTP; a fast detector and a
    // throttled repair, so the page can see it run.
    let args: Vec<String> = [
        "--chunk-size-bytes",
        &CHUNK.to_string(),
        "--health-interval-ms",
        "250",
        "--acceptable-pause-ms",
        "1500",
        // Suspicion about 2.5 s after the last heartbeat, `down` 6 s after that: a wide window
        // for a page polling once a second on a busy machine to see `suspect`.
        "--down-after-ms",
        "6000",
        "--repair-scan-interval-ms",
        "300",
        "--repair-bytes-per-sec",
        "1048576",
        // A quick scrubber: a rotted copy starts a second repair job, so the first one is
        // shown among the earlier jobs.
        "--scrub-interval-ms",
        "500",
        "--scrub-bytes-per-sec",
        "104857600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let http: Vec<String> = (0..4).map(|_| format!("127.0.0.1:{}", free_port().unwrap())).collect();
    let node_args = (1..=3u64).map(|id| (id, vec!["--http".to_string(), http[id as usize - 1].clone()])).collect();
    let options = ClusterOptions { nodes: 3, server_args: args, node_args, ..ClusterOptions::default() };
    let mut cluster = Cluster::start(binary(), options).expect("start the cluster");
    let leader = tokio::task::block_in_place(|| cluster.wait_for_leader(DEADLINE)).unwrap();
    tokio::task::block_in_place(|| cluster.add_storage_learner_with(4, &["--http".to_string(), http[3].clone()]))
        .unwrap();

    // Some files (about 3 MiB at RF 3), the first traced.
    let local = cluster.root().join("file.bin");
    std::fs::write(&local, mendfs_testkit::stamped_bytes(7, 0, 8 * CHUNK)).unwrap();
    let output = cluster.cli().args(["put", local.to_str().unwrap(), "/dash/0", "--trace"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let trace_id = stderr
        .lines()
        .find_map(|line| line.strip_prefix("trace id: "))
        .unwrap_or_else(|| panic!("no trace id on stderr: {stderr}"))
        .trim()
        .to_string();
    for i in 1..6 {
        std::fs::write(&local, mendfs_testkit::stamped_bytes(7 + i, 0, 8 * CHUNK)).unwrap();
        cluster.run_cli(&["put", local.to_str().unwrap(), &format!("/dash/{i}")]).unwrap();
    }

    // The page is loaded from a follower's address: the node that will die.
    let victim = (1..=3).find(|id| *id != leader).unwrap();
    let browser = open_browser(&driver).await;
    // The unauthenticated page asks for a token first.
    browser.goto(&format!("http://{}/", http[victim as usize - 1])).await.unwrap();
    wait_page(&browser, "the sign-in form", "return !document.getElementById('login').hidden").await;
    screenshot(&browser, &screenshots, "0-sign-in").await;
    // A one-time login link: its code in the fragment, gone from the address bar at once and
    // traded for a session token.
    let link =
        cluster.run_cli(&["auth", "login-link", "--ttl", "10m", "--dashboard", &http[victim as usize - 1]]).unwrap();
    let link = link.trim().to_string();
    assert!(link.starts_with(&format!("http://{}/#login=mendfs_login_", http[victim as usize - 1])), "{link}");
    browser.goto(&link).await.unwrap();
    wait_page(&browser, "the code gone from the address bar", "return !location.href.includes('login');").await;
    wait_page(
        &browser,
        "4 nodes up",
        "const n = document.querySelectorAll('#nodes .node[data-state=\"up\"]'); return n.length === 4;",
    )
    .await;
    let shown_leader = wait_page(&browser, "the leader", "return document.getElementById('leader').textContent").await;
    assert_eq!(shown_leader, json!(format!("node {leader}")));
    let leader_card = format!("return document.querySelector('#nodes [data-node-id=\"{leader}\"]').dataset.role");
    assert_eq!(browser.execute(&leader_card, vec![]).await.unwrap(), json!("leader"));
    wait_page(&browser, "48 chunks", "return document.getElementById('chunks').textContent === '48'").await;
    screenshot(&browser, &screenshots, "1-cluster-healthy").await;
    // The session is a token of its own, with the link's role and an expiry.
    let tokens: Value = serde_json::from_str(&cluster.run_cli(&["auth", "token", "list", "--json"]).unwrap()).unwrap();
    let session =
        tokens.as_array().unwrap().iter().find(|t| t["name"].as_str().unwrap().starts_with("dashboard-login-"));
    let session = session.unwrap_or_else(|| panic!("no login session among the tokens: {tokens}"));
    assert_eq!(session["role"], "read", "{session}");
    assert!(session["expires_unix_ms"].as_u64().is_some(), "a session expires: {session}");
    // The same link in another tab (no session of its own): used up, and the page says so.
    let first_tab = browser.window().await.unwrap();
    let second_tab = browser.new_window(true).await.unwrap();
    browser.switch_to_window(second_tab.handle).await.unwrap();
    browser.goto(&link).await.unwrap();
    let reason = wait_page(
        &browser,
        "the used link refused",
        "const l = document.getElementById('login');          return !l.hidden && l.dataset.loginFailed === 'true' && document.getElementById('login-reason').textContent;",
    )
    .await;
    assert!(reason.as_str().unwrap_or_default().contains("already used"), "{reason}");
    screenshot(&browser, &screenshots, "1b-used-login-link").await;
    browser.close_window().await.unwrap();
    browser.switch_to_window(first_tab).await.unwrap();

    // SIGKILL the node the page came from, and time the page against `cluster status`.
    let survivors: Vec<u64> = (1..=4).filter(|id| *id != victim).collect();
    let cli_watch = watch_cli_status(cluster.endpoints_of(&survivors), cluster.secret(), victim);
    cluster.kill(victim).unwrap();
    let killed_at = Instant::now();
    wait_page(
        &browser,
        &format!("node {victim} suspect"),
        &format!(
            "const n = document.querySelector('#nodes [data-node-id=\"{victim}\"]'); \
             return n && (n.dataset.state === 'suspect' || n.dataset.state === 'down');"
        ),
    )
    .await;
    let page_suspect = Instant::now();
    let suspect_state = browser.execute(&node_state_script(victim), vec![]).await.unwrap();
    screenshot(&browser, &screenshots, "2-node-suspect").await;
    let banner = browser.execute("return document.getElementById('banner').textContent", vec![]).await.unwrap();
    assert!(banner.as_str().unwrap_or_default().contains("does not answer"), "no fallback banner: {banner}");
    wait_page(&browser, &format!("node {victim} down"), &format!(
        "const n = document.querySelector('#nodes [data-node-id=\"{victim}\"]'); return n && n.dataset.state === 'down';"
    ))
    .await;
    let page_down = Instant::now();
    screenshot(&browser, &screenshots, "3-node-down").await;
    let (cli_suspect, cli_down) = tokio::task::block_in_place(|| cli_watch.join()).unwrap();
    println!(
        "state change latency: page showed suspect {} ms and down {} ms after `cluster status` did \
         (suspect on the page {:.1}s, down {:.1}s after the SIGKILL; page first saw {suspect_state})",
        latency_ms(cli_suspect, page_suspect),
        latency_ms(cli_down, page_down),
        (page_suspect - killed_at).as_secs_f64(),
        (page_down - killed_at).as_secs_f64(),
    );
    assert_eq!(suspect_state, json!("suspect"), "the page skipped suspect");

    // The repair job for the dead node, to 100 %.
    let progress = wait_page(
        &browser,
        "a repair job running or done",
        "const p = document.getElementById('repair-percent'); return p ? p.textContent : null;",
    )
    .await;
    println!("repair first seen at {progress}");
    wait_page(
        &browser,
        "the repair at 100 %",
        "const p = document.getElementById('repair-percent'); \
         return p && p.textContent === '100 %' && p.dataset.finished === 'true';",
    )
    .await;
    let timeline = wait_page(
        &browser,
        "the timeline: suspect, down, repair, full redundancy",
        &format!(
            "const t = document.getElementById('timeline'); \
             const has = (s) => t.querySelector(s) !== null; \
             return has('[data-node=\"{victim}\"][data-state=\"suspect\"]') && has('[data-node=\"{victim}\"][data-state=\"down\"]') \
               && has('[data-kind=\"repair_started\"]') && has('[data-kind=\"redundancy_restored\"]') && t.innerText;"
        ),
    )
    .await;
    println!("timeline:\n{}", timeline.as_str().unwrap_or_default());
    screenshot(&browser, &screenshots, "4-repaired").await;
    // A rotted copy on a survivor: the scrubber finds it, a second job repairs it, and the
    // first moves to the earlier jobs, kept in the metadata.
    let rotted = survivors.iter().flat_map(|id| mendfs_testkit::chunk_files(&cluster.nodes[id].data_dir)).next();
    let rotted = rotted.expect("a chunk file on a survivor");
    let mut bytes = std::fs::read(&rotted).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&rotted, bytes).unwrap();
    let earlier = wait_page(
        &browser,
        "the first job among the earlier ones, the second finished",
        "const first = document.querySelector('#recent-repairs li[data-job]');          const p = document.getElementById('repair-percent');          return first && p && p.dataset.finished === 'true' && first.textContent;",
    )
    .await;
    println!("earlier repair job: {}", earlier.as_str().unwrap_or_default());
    assert!(earlier.as_str().unwrap_or_default().contains(&format!("node {victim} down")), "{earlier}");
    screenshot(&browser, &screenshots, "4b-earlier-jobs").await;
    // The CLI shows the newest of the same timeline.
    let text = cluster.cli_at(&cluster.endpoints_of(&survivors)).args(["cluster", "status"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string();
    assert!(text.contains("recent events:") && text.contains("full redundancy"), "{text}");

    // A trace by id: its spans as a waterfall (the dead node's spans are missing, and said so).
    let trace_box = browser.find(Locator::Id("trace-id")).await.unwrap();
    trace_box.send_keys(&trace_id).await.unwrap();
    browser.find(Locator::Css("#trace-form button")).await.unwrap().click().await.unwrap();
    let rows = wait_page(
        &browser,
        "the trace's spans",
        "const rows = document.querySelectorAll('#trace .span-row'); \
         return rows.length >= 3 && document.querySelector('#trace .slowest-mark') !== null && rows.length;",
    )
    .await;
    println!("trace {trace_id}: {rows} spans shown");
    let names = browser
        .execute(
            "return [...document.querySelectorAll('#trace .span-label')].map(l => l.textContent).join('\\n')",
            vec![],
        )
        .await
        .unwrap();
    assert!(names.as_str().unwrap_or_default().contains("Files/Put"), "{names}");
    screenshot(&browser, &screenshots, "5-trace-waterfall").await;

    // A bad trace id is refused with the reason, not a blank.
    let trace_box = browser.find(Locator::Id("trace-id")).await.unwrap();
    trace_box.clear().await.unwrap();
    trace_box.send_keys("not-a-trace").await.unwrap();
    browser.find(Locator::Css("#trace-form button")).await.unwrap().click().await.unwrap();
    wait_page(
        &browser,
        "the bad trace id's reason",
        "const a = document.querySelector('#trace [role=alert]'); return a && a.textContent.includes('32 hex digits');",
    )
    .await;

    // A request that fails is listed with a link to its trace, where its hop is red.
    let survivor_endpoints = cluster.endpoints_of(&survivors);
    let output = cluster.cli_at(&survivor_endpoints).args(["get", "/dash/missing", "-", "--trace"]).output().unwrap();
    assert!(!output.status.success(), "a get of a missing file succeeded");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let failed_trace = stderr
        .lines()
        .find_map(|line| line.strip_prefix("trace id: "))
        .unwrap_or_else(|| panic!("no trace id on stderr: {stderr}"))
        .trim()
        .to_string();
    wait_page(
        &browser,
        "the failed get among the recent requests",
        &format!(
            "const b = document.querySelector('#requests button[aria-label=\"open trace {failed_trace}\"]'); \
             if (!b) return false; b.click(); return true;"
        ),
    )
    .await;
    wait_page(
        &browser,
        "the failed hop in red",
        "const r = document.querySelector('#trace .span-row.failed'); return r && r.textContent.includes('Files/Get');",
    )
    .await;
    screenshot(&browser, &screenshots, "6-failed-request").await;

    // The log view, warnings and worse from every node: the detector's verdict is among them.
    browser.find(Locator::Css("#logs-form button")).await.unwrap().click().await.unwrap();
    wait_page(
        &browser,
        "the leader's warning that the node is down",
        "return [...document.querySelectorAll('#logs tbody tr')].some(r => r.textContent.includes('storage node down'));",
    )
    .await;

    // A phone's width: one column, nothing wider than the screen.
    browser.set_window_size(390, 1400).await.unwrap();
    wait_page(
        &browser,
        "the page within a phone's width",
        "return window.innerWidth < 500 && document.documentElement.scrollWidth <= document.documentElement.clientWidth;",
    )
    .await;
    screenshot(&browser, &screenshots, "7-phone-width").await;
    browser.close().await.unwrap();
}
