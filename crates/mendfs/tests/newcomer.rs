//! The newcomer's first commands, run as a newcomer runs them: `mendfs demo` end to end (not
//! on a terminal), and `mendfs local up` / `local down` with the printed endpoints.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use mendfs_testkit::wait_for;

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// Runs `mendfs demo ARGS` as a newcomer would, with no terminal and no cluster configured;
/// returns its standard output once it succeeded.
fn run_demo(args: &[&str]) -> String {
    let output = Command::new(binary())
        .arg("demo")
        .args(args)
        .env_remove("MENDFS_ENDPOINTS")
        .env_remove("MENDFS_SECRET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    // No progress bar escape codes without a terminal; plain progress lines instead.
    assert!(!stdout.contains('\u{1b}'), "terminal escapes in non-terminal output:\n{stdout}");
    assert!(stdout.contains("repaired: "), "no plain repair progress line:\n{stdout}");
    stdout
}

/// The story, in order: each milestone after the one before it.
fn assert_in_order(stdout: &str, milestones: &[&str]) {
    let mut at = 0;
    for milestone in milestones {
        let found =
            stdout[at..].find(milestone).unwrap_or_else(|| panic!("{milestone:?} missing (in order):\n{stdout}"));
        at += found + milestone.len();
    }
}

/// The first word after `prefix` in `text`, parsed.
fn number_after<T: std::str::FromStr>(text: &str, prefix: &str) -> T {
    let rest = &text[text.find(prefix).unwrap_or_else(|| panic!("{prefix:?} missing:\n{text}")) + prefix.len()..];
    rest.split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number after {prefix:?} in:\n{text}"))
}

#[test]
fn the_demo_runs_end_to_end_without_a_terminal_and_verifies_every_file() {
    // Smaller files than the default keep the debug build quick; the steps are the same.
    let stdout = run_demo(&["--files", "12", "--max-file-mib", "3"]);
    assert_in_order(
        &stdout,
        &[
            "== Starting a local 4-node cluster",
            "== Writing 12 sample files",
            "== SIGKILL node",
            "-> suspect (phi",
            "-> down (phi",
            "== Repairing",
            "full redundancy again",
            "== Verifying every file byte for byte",
            "12 of 12 files read back identical",
            "== Restarting node",
            "is up again",
            "== Summary",
            "files verified:     12 of 12",
        ],
    );
    let summary = &stdout[stdout.find("== Summary").unwrap()..];
    for field in ["time to detect:", "time to heal:", "bytes repaired:"] {
        assert!(summary.contains(field), "{field} missing from the summary:\n{summary}");
    }
    assert!(!summary.contains("bytes repaired:     0.0 MiB"), "nothing was repaired:\n{summary}");
    // Three copies of every chunked byte (inline files hold a few KiB in the metadata).
    let on_disk: f64 = number_after(summary, "on disk:");
    assert!((2.9..=3.01).contains(&on_disk), "{on_disk} bytes on disk per file byte:\n{summary}");
    // Repair re-created exactly the copies the killed node held: the counts agree.
    let held: u64 = number_after(&stdout, ": it holds ");
    let repaired: u64 = number_after(summary, " MiB in ");
    assert_eq!(held, repaired, "the killed node held {held} copies but {repaired} were repaired:\n{stdout}");
}

#[test]
fn the_erasure_coded_demo_reads_with_two_nodes_dead_and_rebuilds_every_stripe() {
    let stdout = run_demo(&["--redundancy", "ec:4+2", "--files", "12", "--max-file-mib", "3"]);
    assert_in_order(
        &stdout,
        &[
            "== Starting a local 8-node cluster: 3 metadata voters and 5 storage-only nodes",
            "8 nodes leave 6 alive when 2 are killed, so repair can restore every stripe to 6 shards on distinct live \
             nodes",
            "== Writing 12 sample files, ",
            "as ec:4+2",
            "files striped into",
            "on disk: ",
            "== SIGKILL nodes ",
            " at once: they hold ",
            "12 of 12 files read back identical with nodes ",
            "-> down (phi",
            "== Repairing: the leader rebuilds each shard",
            "stripes by live shards: ",
            "full redundancy again",
            "4.00 bytes read per byte rebuilt (K = 4)",
            "== Verifying every file byte for byte",
            "12 of 12 files read back identical",
            "== Restarting nodes ",
            "are up again",
            "== Summary",
            "files verified:     12 of 12",
            "degraded reads:     12 of 12 files read back with nodes ",
        ],
    );
    // Most sample files are striped: all but the few small enough to be inline.
    let striped_line = stdout.lines().find(|line| line.contains("files striped into")).unwrap();
    let striped: u64 = number_after(striped_line, "");
    let stripes: u64 = number_after(striped_line, "striped into ");
    assert!(striped >= 8, "only {striped} of 12 files striped:\n{stdout}");
    // 1.5 bytes per striped byte, a few small tails replicated 3 times, inline files none.
    let summary = &stdout[stdout.find("== Summary").unwrap()..];
    let on_disk: f64 = number_after(summary, "on disk:");
    assert!((1.45..=1.6).contains(&on_disk), "{on_disk} bytes on disk per file byte:\n{summary}");
    // Repair ends with every stripe whole again.
    let last_counts = stdout.lines().rfind(|line| line.starts_with("stripes by live shards: ")).unwrap();
    assert_eq!(last_counts, format!("stripes by live shards: {stripes} with 6/6 shards"), "{stdout}");
    // It restored exactly what the two killed nodes held: shards rebuilt (and small chunks copied).
    let held: u64 = number_after(&stdout, " at once: they hold ");
    let repaired: u64 = number_after(summary, " MiB in ");
    assert_eq!(
        held, repaired,
        "the killed nodes held {held} shards and copies but {repaired} were repaired:\n{stdout}"
    );
}

/// The processes whose command line mentions `dir`.
/// One HTTP/1.1 GET on a fresh connection: the status code and the body.
fn http_get(addr: &str, path: &str, bearer: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, bearer, "")
}

fn http_request(addr: &str, method: &str, path: &str, bearer: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let authorization = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{authorization}Content-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default();
    (code, body)
}

/// `local up` prints a one-time login link; the page answers on its address, the code buys one
/// read session (and only one), and the API answers that session's token.
fn check_dashboard_link(stdout: &str) {
    let link = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("http://").filter(|rest| rest.contains("/#login=")))
        .unwrap_or_else(|| panic!("no dashboard login link:\n{stdout}"));
    let (addr, code) = link.split_once("/#login=").unwrap_or_else(|| panic!("no login link: {link}"));
    assert!(code.starts_with("mendfs_login_"), "{link}");
    let body = format!("{{\"code\":\"{code}\"}}");
    let (status, session) = http_request(addr, "POST", "/api/login", None, &body);
    assert_eq!(status, 200, "the link logs in once: {session}");
    let session: serde_json::Value = serde_json::from_str(&session).unwrap();
    assert_eq!(session["role"], "read", "{session}");
    let token = session["token"].as_str().unwrap().to_string();
    let token = token.as_str();
    let (status, again) = http_request(addr, "POST", "/api/login", None, &body);
    assert_eq!(status, 401, "a used link is refused: {again}");
    assert!(again.contains("already used"), "{again}");
    let (status, garbage) = http_request(addr, "POST", "/api/login", None, "{\"code\":\"mendfs_login_nothex\"}");
    assert_eq!(status, 401, "{garbage}");
    let (code, page) = http_get(addr, "/", None);
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("<title>MendFS dashboard</title>"), "{page}");
    let (code, refused) = http_get(addr, "/api/status", None);
    assert_eq!(code, 401, "the API needs the token: {refused}");
    let status = wait_for("the dashboard's status", Duration::from_secs(60), || {
        let (code, body) = http_get(addr, "/api/status", Some(token));
        Ok((code == 200).then_some(body))
    })
    .unwrap();
    assert!(status.contains("\"http_addr\""), "{status}");
    let (code, bad) = http_get(addr, "/api/trace/not-hex", Some(token));
    assert_eq!(code, 400, "{bad}");
    assert!(bad.contains("32 hex digits"), "{bad}");
}

fn processes_in(dir: &Path) -> Vec<u32> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&dir))
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn local_up_gives_endpoints_that_work_and_local_down_leaves_no_process() {
    let dir = tempfile::tempdir().unwrap();
    let cluster_dir = dir.path().join("local");
    let up = Command::new(binary())
        .args(["local", "up", "--nodes", "3", "--dir"])
        .arg(&cluster_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(up.status.success(), "local up failed: {}\n{stdout}", String::from_utf8_lossy(&up.stderr));
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&cluster_dir), 0o700, "the cluster directory is the user's alone");
        assert_eq!(mode(&cluster_dir.join("secret")), 0o600, "the secret is the user's alone");
        assert_eq!(mode(&cluster_dir.join("admin.token")), 0o600, "the admin token is the user's alone");
    }
    let endpoints = stdout
        .lines()
        .find_map(|l| l.strip_prefix("export MENDFS_ENDPOINTS="))
        .unwrap_or_else(|| panic!("no MENDFS_ENDPOINTS line:\n{stdout}"))
        .to_string();
    // Clients get the admin token `up` made, not the nodes' secret.
    let token_file = stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("export MENDFS_TOKEN=$(cat ").and_then(|rest| rest.split_once(')')).map(|(f, _)| f)
        })
        .unwrap_or_else(|| panic!("no MENDFS_TOKEN line:\n{stdout}"))
        .to_string();
    let token = std::fs::read_to_string(&token_file).unwrap().trim().to_string();
    assert!(!stdout.contains("MENDFS_SECRET"), "the secret is not handed to clients:\n{stdout}");
    assert_eq!(processes_in(&cluster_dir).len(), 3, "three nodes run in the background");
    check_dashboard_link(&stdout);

    let cli = |args: &[&str]| {
        Command::new(binary())
            .args(args)
            .env("MENDFS_ENDPOINTS", &endpoints)
            .env("MENDFS_TOKEN", &token)
            .env_remove("MENDFS_SECRET")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let local_file = dir.path().join("hello.txt");
    std::fs::write(&local_file, "hello from a local cluster\n").unwrap();
    let put = cli(&["put", local_file.to_str().unwrap(), "/hello.txt"]);
    assert!(put.status.success(), "put: {}", String::from_utf8_lossy(&put.stderr));
    let get = cli(&["get", "/hello.txt", "-"]);
    assert!(get.status.success(), "get: {}", String::from_utf8_lossy(&get.stderr));
    assert_eq!(String::from_utf8_lossy(&get.stdout), "hello from a local cluster\n");

    // A second `up` on a running cluster is refused, not a second cluster.
    let again = Command::new(binary()).args(["local", "up", "--dir"]).arg(&cluster_dir).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    let down = Command::new(binary()).args(["local", "down", "--dir"]).arg(&cluster_dir).output().unwrap();
    assert!(down.status.success(), "local down: {}", String::from_utf8_lossy(&down.stderr));
    wait_for("no process of the local cluster left", Duration::from_secs(30), || {
        Ok(processes_in(&cluster_dir).is_empty().then_some(()))
    })
    .unwrap();

    // `up` again restarts the same nodes on their data: the file is still there.
    let up = Command::new(binary()).args(["local", "up", "--dir"]).arg(&cluster_dir).output().unwrap();
    assert!(up.status.success(), "local up again: {}", String::from_utf8_lossy(&up.stderr));
    let get = wait_for("the file after a restart", Duration::from_secs(60), || {
        let get = cli(&["get", "/hello.txt", "-"]);
        Ok(get.status.success().then_some(get))
    })
    .unwrap();
    assert_eq!(String::from_utf8_lossy(&get.stdout), "hello from a local cluster\n");
    let down = Command::new(binary()).args(["local", "down", "--purge", "--dir"]).arg(&cluster_dir).output().unwrap();
    assert!(down.status.success(), "local down --purge: {}", String::from_utf8_lossy(&down.stderr));
    assert!(processes_in(&cluster_dir).is_empty());
    assert!(!cluster_dir.exists());
}

/// `local up` runs what `local.json` says: it refuses one that another user could have written.
#[test]
fn local_up_refuses_a_directory_or_state_file_others_can_change() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let planted = dir.path().join("planted");
    std::fs::create_dir(&planted).unwrap();
    std::fs::set_permissions(&planted, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(planted.join("local.json"), r#"{"endpoints":"","secret_file":null,"nodes":[]}"#).unwrap();
    std::fs::set_permissions(planted.join("local.json"), std::fs::Permissions::from_mode(0o666)).unwrap();
    let up = Command::new(binary()).args(["local", "up", "--dir"]).arg(&planted).output().unwrap();
    assert!(!up.status.success());
    assert!(
        String::from_utf8_lossy(&up.stderr).contains("can be changed by other users"),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );

    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let up = Command::new(binary()).args(["local", "up", "--dir"]).arg(&shared).output().unwrap();
    assert!(!up.status.success());
    assert!(String::from_utf8_lossy(&up.stderr).contains("can be changed by other users"));

    // Owned by someone else (checked where the test can give a file away: as root).
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    if std::os::unix::fs::chown(&theirs, Some(65_534), Some(65_534)).is_ok() {
        let up = Command::new(binary()).args(["local", "up", "--dir"]).arg(&theirs).output().unwrap();
        assert!(!up.status.success());
        assert!(String::from_utf8_lossy(&up.stderr).contains("not to you"), "{}", String::from_utf8_lossy(&up.stderr));
    }
    // A private directory of ours, with a `local.json` someone else planted in it.
    let planted_by_them = dir.path().join("planted-by-them");
    std::fs::create_dir(&planted_by_them).unwrap();
    std::fs::set_permissions(&planted_by_them, std::fs::Permissions::from_mode(0o700)).unwrap();
    let state = planted_by_them.join("local.json");
    std::fs::write(&state, r#"{"endpoints":"","secret_file":null,"nodes":[]}"#).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).unwrap();
    if std::os::unix::fs::chown(&state, Some(65_534), Some(65_534)).is_ok() {
        let up = Command::new(binary()).args(["local", "up", "--dir"]).arg(&planted_by_them).output().unwrap();
        assert!(!up.status.success());
        assert!(String::from_utf8_lossy(&up.stderr).contains("not to you"), "{}", String::from_utf8_lossy(&up.stderr));
    }
}
