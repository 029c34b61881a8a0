//! The operator's side of S3 against real `mendfs server` processes: access keys (whose
//! secret is shown once and never listed), buckets, grants set exactly and revoked, the
//! errors an operator meets (a bad bucket name, an unknown key, a bucket that exists), and
//! the admin role every S3 admin call needs.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use mendfs_testkit::{wait_for, Cluster, ClusterOptions};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(120);

fn binary() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_mendfs"))
}

/// The CLI as the operator (the cluster secret), expecting failure: its stderr.
fn fails(cluster: &Cluster, args: &[&str]) -> String {
    let output: Output = cluster.cli().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "mendfs {} should fail; stdout: {}", args.join(" "), stdout_of(&output));
    stderr
}

fn stdout_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn json(cluster: &Cluster, args: &[&str]) -> Value {
    serde_json::from_str(&cluster.run_cli(args).unwrap()).unwrap()
}

fn keys(cluster: &Cluster) -> Vec<Value> {
    json(cluster, &["s3", "key", "list", "--json"]).as_array().cloned().unwrap()
}

fn key<'a>(keys: &'a [Value], key_id: &str) -> &'a Value {
    keys.iter().find(|key| key["key_id"] == key_id).unwrap_or_else(|| panic!("{key_id} not in {keys:?}"))
}

fn bucket_names(cluster: &Cluster) -> Vec<String> {
    let buckets = json(cluster, &["s3", "bucket", "list", "--json"]);
    buckets.as_array().unwrap().iter().map(|bucket| bucket["name"].as_str().unwrap().to_string()).collect()
}

/// The value of `export NAME=VALUE` in `text`.
fn exported<'a>(text: &'a str, name: &str) -> &'a str {
    let prefix = format!("export {name}=");
    text.lines().find_map(|line| line.strip_prefix(prefix.as_str())).unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn an_operator_manages_s3_keys_buckets_and_grants() {
    let cluster = Cluster::start(binary(), ClusterOptions::default()).expect("start cluster");
    cluster.wait_for_leader(DEADLINE).expect("a leader");
    // A leader that serves linearizable reads: every call below goes through it.
    wait_for("the S3 admin service", DEADLINE, || {
        Ok(cluster.run_cli(&["s3", "bucket", "list", "--timeout", "5"]).ok())
    })
    .unwrap();

    // A key: its id and secret, once, ready to paste.
    let created = cluster.run_cli(&["s3", "key", "create", "backup-job", "--create-buckets"]).unwrap();
    let key_id = exported(&created, "AWS_ACCESS_KEY_ID").to_string();
    let secret = exported(&created, "AWS_SECRET_ACCESS_KEY").to_string();
    assert!(key_id.len() == 20 && key_id.starts_with("MK"), "{key_id}");
    assert!(key_id.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit()), "{key_id}");
    assert!(secret.len() == 40 && secret.bytes().all(|b| b.is_ascii_alphanumeric()), "{secret}");
    assert!(created.contains(&format!("access key id:     {key_id}")), "{created}");

    // Listed, never with its secret.
    let listed = cluster.run_cli(&["s3", "key", "list"]).unwrap();
    assert!(listed.contains(&key_id) && listed.contains("backup-job"), "{listed}");
    assert!(!listed.contains(&secret), "the secret is listed: {listed}");
    let listed_json = cluster.run_cli(&["s3", "key", "list", "--json"]).unwrap();
    assert!(!listed_json.contains(&secret), "the secret is listed: {listed_json}");
    let keys_now = keys(&cluster);
    let backup = key(&keys_now, &key_id);
    assert_eq!(backup["name"], "backup-job");
    assert_eq!(backup["create_buckets"], true);
    assert!(backup["created_ms"].as_u64().unwrap() > 0);
    assert_eq!(backup["grants"], Value::Array(vec![]));

    // Buckets, one owned by the key.
    assert!(cluster.run_cli(&["s3", "bucket", "create", "photos"]).unwrap().contains("created bucket photos"));
    let owned = cluster.run_cli(&["s3", "bucket", "create", "archive-2024", "--owner", &key_id]).unwrap();
    assert!(owned.contains(&format!("owned by {key_id}")), "{owned}");
    assert_eq!(bucket_names(&cluster), ["archive-2024", "photos"]);
    let text = cluster.run_cli(&["s3", "bucket", "list"]).unwrap();
    assert!(text.contains("photos") && text.contains("archive-2024"), "{text}");
    let grants = key(&keys(&cluster), &key_id)["grants"].clone();
    assert_eq!(grants, serde_json::json!([{"bucket": "archive-2024", "read": true, "write": true, "owner": true}]));

    // A grant is set exactly, and revoked by giving no right.
    let allowed = cluster.run_cli(&["s3", "allow", &key_id, "photos", "--read", "--write"]).unwrap();
    assert!(allowed.contains("may now read,write in bucket photos"), "{allowed}");
    let grants = key(&keys(&cluster), &key_id)["grants"].clone();
    assert!(
        grants
            .as_array()
            .unwrap()
            .contains(&serde_json::json!({"bucket": "photos", "read": true, "write": true, "owner": false})),
        "{grants}"
    );
    cluster.run_cli(&["s3", "allow", &key_id, "photos", "--read"]).unwrap();
    let text = cluster.run_cli(&["s3", "key", "list"]).unwrap();
    assert!(text.contains("photos(read)") && text.contains("archive-2024(read,write,owner)"), "{text}");
    let revoked = cluster.run_cli(&["s3", "allow", &key_id, "photos"]).unwrap();
    assert!(revoked.contains("revoked every right") && revoked.contains("no --read, --write or --owner"), "{revoked}");
    let grants = key(&keys(&cluster), &key_id)["grants"].clone();
    assert_eq!(grants.as_array().unwrap().len(), 1, "only archive-2024 is left: {grants}");

    // The errors an operator meets.
    let refused = fails(&cluster, &["s3", "bucket", "create", "Bad_Name"]);
    assert!(refused.contains("invalid bucket name") && refused.contains("lower-case"), "{refused}");
    let refused = fails(&cluster, &["s3", "bucket", "create", "photos"]);
    assert!(refused.contains("bucket photos already exists"), "{refused}");
    let refused = fails(&cluster, &["s3", "key", "delete", "MKNOSUCHKEY000000000"]);
    assert!(refused.contains("access key MKNOSUCHKEY000000000 does not exist"), "{refused}");
    let refused = fails(&cluster, &["s3", "allow", "MKNOSUCHKEY000000000", "photos", "--read"]);
    assert!(refused.contains("does not exist"), "{refused}");
    let refused = fails(&cluster, &["s3", "allow", &key_id, "no-such-bucket", "--read"]);
    assert!(refused.contains("no-such-bucket"), "{refused}");
    let refused = fails(&cluster, &["s3", "bucket", "create", "orphan", "--owner", "MKNOSUCHKEY000000000"]);
    assert!(refused.contains("does not exist"), "{refused}");
    assert!(!bucket_names(&cluster).contains(&"orphan".to_string()), "a bucket for an unknown owner was created");
    let refused = fails(&cluster, &["s3", "key", "create", "has space"]);
    assert!(refused.contains("access key name"), "{refused}");

    // Every S3 admin call needs the admin role.
    let writer = cluster.run_cli(&["auth", "token", "create", "writer", "--role", "write"]).unwrap().trim().to_string();
    let output = cluster
        .cli()
        .env_remove("MENDFS_SECRET")
        .env("MENDFS_TOKEN", &writer)
        .args(["s3", "key", "list"])
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && refused.contains("needs role admin"), "{refused}");

    // Deleting: the bucket, then the key with its grants.
    assert!(cluster.run_cli(&["s3", "bucket", "delete", "photos"]).unwrap().contains("deleted bucket photos"));
    assert_eq!(bucket_names(&cluster), ["archive-2024"]);
    let refused = fails(&cluster, &["s3", "bucket", "delete", "photos"]);
    assert!(refused.contains("photos") && refused.contains("does not exist"), "{refused}");
    assert!(cluster
        .run_cli(&["s3", "key", "delete", &key_id])
        .unwrap()
        .contains(&format!("deleted S3 access key {key_id}")));
    assert!(keys(&cluster).iter().all(|key| key["key_id"] != key_id.as_str()));
    let refused = fails(&cluster, &["s3", "key", "delete", &key_id]);
    assert!(refused.contains("does not exist"), "{refused}");
}
