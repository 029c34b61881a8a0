//! The S3 gateway against real S3 clients: a 3-node cluster with `--s3` on every node, access
//! keys made with `mendfs s3 key create`, and `tests/s3/test_s3.py` run with pytest: boto3, the
//! AWS CLI, s3cmd, rclone and curl (`pip install -r crates/mendfs/tests/s3/requirements.txt`,
//! `apt-get install rclone`; `.ci/run` does both).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mendfs_testkit::{free_port, Cluster, ClusterOptions};

const DEADLINE: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// The value of `export NAME=VALUE` in a command's output.
fn exported(output: &str, name: &str) -> String {
    let prefix = format!("export {name}=");
    output
        .lines()
        .find_map(|line| line.trim().strip_prefix(&prefix))
        .map(|value| value.trim_matches('\'').trim_matches('"').to_string())
        .unwrap_or_else(|| panic!("no `export {name}=` in:\n{output}"))
}

/// A cluster whose nodes serve S3, and their S3 endpoints.
fn s3_cluster() -> (Cluster, Vec<String>, String) {
    let mut node_args = BTreeMap::new();
    let mut endpoints = Vec::new();
    let metrics = format!("127.0.0.1:{}", free_port().unwrap());
    for id in 1..=3u64 {
        let addr = format!("127.0.0.1:{}", free_port().unwrap());
        endpoints.push(format!("http://{addr}"));
        let port = addr.rsplit(':').next().unwrap_or_default().to_string();
        // Virtual-hosted style too: BUCKET.s3.test:PORT (the test resolves it to 127.0.0.1).
        let mut args = vec!["--s3".to_string(), addr, "--s3-domain".to_string(), format!("s3.test:{port}")];
        if id == 1 {
            args.extend(["--http".to_string(), metrics.clone()]);
        }
        node_args.insert(id, args);
    }
    let options = ClusterOptions { node_args, ..ClusterOptions::default() };
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    (cluster, endpoints, format!("http://{metrics}/metrics"))
}

fn python_clients_installed() -> bool {
    Command::new("python3").args(["-c", "import boto3, botocore, pytest"]).status().is_ok_and(|status| status.success())
        && ["aws", "s3cmd", "rclone", "curl"]
            .iter()
            .all(|tool| Command::new(tool).arg("--version").output().is_ok_and(|out| out.status.success()))
}

#[test]
fn real_s3_clients_round_trip_list_copy_and_are_refused_when_they_should_be() {
    assert!(
        python_clients_installed(),
        "the S3 client tests need python3 with boto3 and pytest, the AWS CLI, s3cmd, rclone and curl: \
         pip install -r crates/mendfs/tests/s3/requirements.txt and apt-get install rclone curl"
    );
    let (cluster, endpoints, metrics) = s3_cluster();
    let creator = cluster.run_cli(&["s3", "key", "create", "tests", "--create-buckets"]).unwrap();
    let other = cluster.run_cli(&["s3", "key", "create", "no-grants"]).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/s3/test_s3.py");
    let output = Command::new("python3")
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=short"])
        .arg(&script)
        .env("MENDFS_S3_ENDPOINT", &endpoints[0])
        .env("MENDFS_S3_ENDPOINTS", endpoints.join(","))
        .env("MENDFS_S3_KEY", exported(&creator, "AWS_ACCESS_KEY_ID"))
        .env("MENDFS_S3_SECRET", exported(&creator, "AWS_SECRET_ACCESS_KEY"))
        .env("MENDFS_S3_OTHER_KEY", exported(&other, "AWS_ACCESS_KEY_ID"))
        .env("MENDFS_S3_OTHER_SECRET", exported(&other, "AWS_SECRET_ACCESS_KEY"))
        // For `mendfs trace` and the metrics of node 1 (whose S3 endpoint is the default).
        .env("MENDFS_BIN", binary())
        .env("MENDFS_ENDPOINTS", cluster.endpoints())
        .env("MENDFS_SECRET", cluster.secret().unwrap_or_default())
        .env("MENDFS_METRICS_URL", &metrics)
        // The clients must find nothing of the machine's own AWS setup.
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", cluster.root().join("no-aws-config"))
        .env("AWS_SHARED_CREDENTIALS_FILE", cluster.root().join("no-aws-credentials"))
        .output()
        .unwrap();
    let report = format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    println!("{report}");
    assert!(output.status.success(), "pytest failed:\n{report}\nnode 1's log tail:\n{}", cluster.log_tail(1, 40));
}

/// A node with TLS serves S3 over TLS only, with its node certificate (the cluster CA's).
#[test]
fn a_tls_node_serves_s3_over_tls_only() {
    let curl_works = Command::new("curl").arg("--version").output().is_ok_and(|out| out.status.success());
    assert!(curl_works, "this test signs its requests with curl --aws-sigv4: apt-get install curl");
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let node_args = BTreeMap::from([(1, vec!["--s3".to_string(), addr.clone()])]);
    let cluster = Cluster::start(binary(), ClusterOptions { tls: true, node_args, ..ClusterOptions::default() })
        .expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    let key = cluster.run_cli(&["s3", "key", "create", "tls", "--create-buckets"]).unwrap();
    let (id, secret) = (exported(&key, "AWS_ACCESS_KEY_ID"), exported(&key, "AWS_SECRET_ACCESS_KEY"));
    let ca = cluster.tls_dir().unwrap().join("ca.pem");
    let curl = |method: &str, path: &str, body: Option<&str>, scheme: &str| {
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--show-error", "--fail-with-body", "--request", method])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{id}:{secret}")])
            .args(["--header", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "--cacert"])
            .arg(&ca)
            .arg(format!("{scheme}://{addr}{path}"));
        if let Some(body) = body {
            command.args(["--data-binary", body]);
        }
        command.output().unwrap()
    };
    // The bucket and the object, over TLS, polled: the key reaches every node within moments.
    mendfs_testkit::wait_for("the bucket over TLS", DEADLINE, || {
        Ok(curl("PUT", "/secure", None, "https").status.success().then_some(()))
    })
    .unwrap();
    let put = curl("PUT", "/secure/object", Some("over tls"), "https");
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stdout));
    let got = curl("GET", "/secure/object", None, "https");
    assert_eq!(String::from_utf8_lossy(&got.stdout), "over tls");
    // Plaintext gets no S3 answer at all.
    let plain = curl("GET", "/secure/object", None, "http");
    assert!(!plain.status.success());
    assert!(!String::from_utf8_lossy(&plain.stdout).contains("over tls"));
}

/// An S3 key deleted through two nodes is refused at once by the third, which had not applied
/// the deletion when the request reached it: the deletion is acknowledged only once no node
/// can still sign requests with a view of the keys from before it.
#[test]
fn a_deleted_key_is_refused_at_once_by_a_node_that_had_not_applied_the_deletion() {
    let curl_works = Command::new("curl").arg("--version").output().is_ok_and(|out| out.status.success());
    assert!(curl_works, "this test signs its requests with curl --aws-sigv4: apt-get install curl");
    let (mut cluster, endpoints, _) = s3_cluster();
    let leader = cluster.wait_for_leader(DEADLINE).unwrap();
    let lagging = (1..=3u64).find(|id| *id != leader).unwrap();
    let lagging_s3 = endpoints[lagging as usize - 1].clone();
    let others = cluster.endpoints_of(&(1..=3).filter(|id| *id != lagging).collect::<Vec<_>>());
    let key = cluster.run_cli(&["s3", "key", "create", "doomed", "--create-buckets"]).unwrap();
    let (id, secret) = (exported(&key, "AWS_ACCESS_KEY_ID"), exported(&key, "AWS_SECRET_ACCESS_KEY"));
    let curl = |method: &str, path: &str, body: Option<&str>| {
        let mut command = Command::new("curl");
        command
            .args(["--silent", "--show-error", "--fail-with-body", "--max-time", "60", "--request", method])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3", "--user", &format!("{id}:{secret}")])
            .args(["--header", "x-amz-content-sha256: UNSIGNED-PAYLOAD"])
            .arg(format!("{lagging_s3}{path}"));
        if let Some(body) = body {
            command.args(["--data-binary", body]);
        }
        command
    };
    mendfs_testkit::wait_for("the bucket through the node about to lag", DEADLINE, || {
        Ok(curl("PUT", "/kept", None).output()?.status.success().then_some(()))
    })
    .unwrap();
    let put = curl("PUT", "/kept/object", Some("before")).output().unwrap();
    assert!(put.status.success(), "{}", String::from_utf8_lossy(&put.stdout));
    cluster.wait_for_caught_up(&[1, 2, 3], DEADLINE).unwrap();

    cluster.pause(lagging).unwrap();
    let deleted = cluster.cli_at(&others).args(["s3", "key", "delete", &id]).output().unwrap();
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    // Sent into the paused node's socket; answered once it runs again.
    let get = curl("GET", "/kept/object", None).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let port = lagging_s3.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    mendfs_testkit::wait_for("curl connected to the paused node", DEADLINE, || {
        Ok(established_connections_to(port)?.then_some(()))
    })
    .unwrap();
    cluster.resume(lagging).unwrap();
    let got = get.wait_with_output().unwrap();
    let body = String::from_utf8_lossy(&got.stdout);
    assert!(!got.status.success(), "node {lagging} served a deleted key: {body}");
    assert!(body.contains("InvalidAccessKeyId"), "{body}");
}

/// Whether a TCP connection to local `port` is established (the kernel accepts connections for
/// a paused process; the client writes its request right after).
fn established_connections_to(port: u16) -> std::io::Result<bool> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // local_address is HEX_IP:HEX_PORT; state 01 is ESTABLISHED.
        fields.get(1).and_then(|local| local.rsplit(':').next()).and_then(|hex| u16::from_str_radix(hex, 16).ok())
            == Some(port)
            && fields.get(3) == Some(&"01")
    }))
}
