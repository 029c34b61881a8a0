//! `mendfs server` takes its settings from the `--config` file, then `MENDFS_*` variables,
//! then flags, each overriding the one before. Checked through the errors of settings that
//! are refused, so no node has to start.

use std::process::Command;

fn server(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_mendfs"));
    command.arg("server").args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (name, value) in env {
        command.env(name, value);
    }
    let output = command.output().expect("run mendfs server");
    assert!(!output.status.success(), "a node with a refused setting must not start");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn the_environment_overrides_the_file_and_flags_override_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "node_id = 0\nlisten = \"127.0.0.1:1\"\nreplication_factor = 0\n").expect("config file");
    let config = file.to_str().expect("utf-8 path");

    // The file alone: its node id 0 is refused.
    assert!(server(&["--config", config], &[]).contains("--node-id is required"));
    // The environment's node id wins over the file's; the file's replication factor still counts.
    let error = server(
        &["--config", config, "--data-dir", "/nonexistent"],
        &[("MENDFS_NODE_ID", "2"), ("MENDFS_INSECURE_DEV", "true")],
    );
    assert!(error.contains("--replication-factor must be at least 1"), "{error}");
    // A flag wins over both.
    let error = server(
        &["--config", config, "--data-dir", "/nonexistent", "--replication-factor", "1", "--node-id", "0"],
        &[("MENDFS_NODE_ID", "2"), ("MENDFS_INSECURE_DEV", "true")],
    );
    assert!(error.contains("--node-id is required"), "{error}");
}

#[test]
fn an_unknown_setting_in_the_file_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("node.toml");
    std::fs::write(&file, "node_id = 1\nreplication_factr = 3\n").expect("config file");
    let error = server(&["--config", file.to_str().expect("utf-8 path")], &[]);
    assert!(error.contains("unknown field `replication_factr`"), "{error}");
}
