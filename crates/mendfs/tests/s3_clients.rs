//! The S3 gateway against real S3 clients: a 3-node cluster with `--s3` on every node, access
//! keys made with `mendfs s3 key create`, and `tests/s3/test_s3.py` run with pytest, boto3 and
//! the AWS CLI (`pip install -r crates/mendfs/tests/s3/requirements.txt`; `.ci/run` does).

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
fn s3_cluster() -> (Cluster, Vec<String>) {
    let mut node_args = BTreeMap::new();
    let mut endpoints = Vec::new();
    for id in 1..=3u64 {
        let addr = format!("127.0.0.1:{}", free_port().unwrap());
        endpoints.push(format!("http://{addr}"));
        node_args.insert(id, vec!["--s3".to_string(), addr]);
    }
    let options = ClusterOptions { node_args, ..ClusterOptions::default() };
    let cluster = Cluster::start(binary(), options).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    (cluster, endpoints)
}

fn python_clients_installed() -> bool {
    Command::new("python3").args(["-c", "import boto3, botocore, pytest"]).status().is_ok_and(|status| status.success())
        && Command::new("aws").arg("--version").output().is_ok_and(|out| out.status.success())
}

#[test]
fn real_s3_clients_round_trip_list_copy_and_are_refused_when_they_should_be() {
    assert!(
        python_clients_installed(),
        "the S3 client tests need python3 with boto3 and pytest, and the AWS CLI: \
         pip install -r crates/mendfs/tests/s3/requirements.txt"
    );
    let (cluster, endpoints) = s3_cluster();
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
