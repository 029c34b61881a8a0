//! `mendfs put|get|ls|rm|stat`: files. Progress bars on a terminal, quiet otherwise.

use mendfs_types::hex;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use mendfs_client::{ChunkInfo, Client, FileInfo};
use serde_json::json;

use crate::cli::Connection;

#[derive(Subcommand, Debug)]
pub enum FileCommand {
    /// Upload LOCAL (or - for stdin) as REMOTE, atomically: readers see the old file or the new one.
    Put {
        #[command(flatten)]
        connection: Connection,
        local: String,
        remote: String,
        /// Replace only this version of REMOTE (0: REMOTE must not exist).
        #[arg(long)]
        expect_version: Option<u64>,
        /// `replicate` (the cluster's copies) or `ec:K+M`: chunks of 64 KiB or more as K data
        /// and M parity shards on K + M nodes (ec:4+2 survives any two losses for 1.5x the
        /// bytes; repair rebuilds lost shards from K others). Without it, the policy of
        /// REMOTE's longest matching prefix (`mendfs policy`), else `replicate`.
        #[arg(long)]
        redundancy: Option<String>,
    },
    /// Download REMOTE into LOCAL (or - for stdout), verified against its content hash.
    Get {
        #[command(flatten)]
        connection: Connection,
        remote: String,
        local: String,
    },
    /// List files under a prefix.
    Ls {
        #[command(flatten)]
        connection: Connection,
        #[arg(default_value = "/")]
        prefix: String,
        /// Size, version, time, hash and redundancy too.
        #[arg(short = 'l')]
        long: bool,
        #[arg(long, default_value_t = 0)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Delete a file.
    Rm {
        #[command(flatten)]
        connection: Connection,
        path: String,
        #[arg(long)]
        expect_version: Option<u64>,
    },
    /// Size, hash, version, redundancy, and each chunk with the nodes holding it (read a page
    /// at a time).
    Stat {
        #[command(flatten)]
        connection: Connection,
        path: String,
        /// The summary and the chunk count only, not the chunks.
        #[arg(long)]
        summary: bool,
        #[arg(long)]
        json: bool,
    },
}

fn progress_bar(total: Option<u64>) -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new_spinner(),
    };
    let template = if total.is_some() {
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{spinner} {bytes} {bytes_per_sec}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    Some(bar)
}

/// A file's summary, without its chunk list.
fn file_json(info: &FileInfo) -> serde_json::Value {
    json!({
        "path": info.path,
        "size": info.size,
        "version": info.version,
        "mtime_ms": info.mtime_ms,
        "content_hash": hex(&info.content_hash),
        "n_chunks": info.n_chunks,
        "redundancy": info.redundancy,
    })
}

/// How a file's content is kept, for people: `-` when the node could not tell.
fn redundancy_text(info: &FileInfo) -> &str {
    if info.redundancy.is_empty() {
        "-"
    } else {
        &info.redundancy
    }
}

/// Whether `info`'s content is erasure-coded (by its first chunk, as the server says).
fn striped(info: &FileInfo) -> bool {
    info.redundancy.starts_with("ec:")
}

fn chunk_json(chunk: &ChunkInfo, striped: bool) -> serde_json::Value {
    // A chunk listed without copies is a stripe's (its shards are elsewhere) in an
    // erasure-coded file, and otherwise kept inline in the metadata (a small file).
    let without_copies = chunk.replicas.is_empty();
    json!({
        "hash": hex(&chunk.hash),
        "size": chunk.size,
        "replicas": chunk.replicas,
        "inline": without_copies && !striped,
        "striped": without_copies && striped,
    })
}

/// Prints `stat`: the summary, then (unless `summary`) every chunk, a page at a time, so that
/// a file of millions of chunks never sits in memory whole. JSON is written as it goes: the
/// summary's fields, then `"chunks": [...]`.
async fn print_stat(client: &Client, path: &str, summary: bool, json: bool) -> Result<()> {
    use std::io::Write;
    let info = client.stat_file(path).await.with_context(|| format!("stat {path}"))?;
    let mut out = std::io::BufWriter::new(std::io::stdout());
    if json {
        let mut head = file_json(&info).to_string();
        if summary {
            writeln!(out, "{head}")?;
            out.flush()?;
            return Ok(());
        }
        head.pop(); // the closing brace: the chunks come next
        write!(out, "{head},\"chunks\":[")?;
    } else {
        writeln!(out, "path:       {}", info.path)?;
        writeln!(out, "size:       {}", info.size)?;
        writeln!(out, "version:    {}", info.version)?;
        writeln!(out, "blake3:     {}", hex(&info.content_hash))?;
        writeln!(out, "chunks:     {}", info.n_chunks)?;
        writeln!(out, "redundancy: {}", redundancy_text(&info))?;
        if summary {
            out.flush()?;
            return Ok(());
        }
    }
    let mut index = 0u64;
    let mut print_page = |out: &mut std::io::BufWriter<std::io::Stdout>, page: &[ChunkInfo]| -> Result<()> {
        for chunk in page {
            if json {
                write!(out, "{}{}", if index == 0 { "" } else { "," }, chunk_json(chunk, striped(&info)))?;
            } else {
                let nodes: Vec<String> = chunk.replicas.iter().map(|id| id.to_string()).collect();
                let place = if nodes.is_empty() && striped(&info) {
                    format!("striped {}", info.redundancy)
                } else if nodes.is_empty() {
                    "inline in the metadata".to_string()
                } else {
                    format!("on nodes {}", nodes.join(","))
                };
                writeln!(out, "  {index:>6}  {}  {:>10} bytes  {place}", hex(&chunk.hash), chunk.size)?;
            }
            index += 1;
        }
        Ok(())
    };
    print_page(&mut out, &info.chunks)?;
    let mut pages = client.chunk_pages(&info, info.chunks.len() as u64);
    loop {
        let from = pages.next_index();
        let Some(page) = pages.next_page().await.with_context(|| format!("stat {path}: chunks from {from}"))? else {
            break;
        };
        print_page(&mut out, &page)?;
    }
    if json {
        writeln!(out, "]}}")?;
    }
    out.flush()?;
    Ok(())
}

/// Where a download goes: a new temporary file beside the target, renamed into place only when
/// complete and verified, so a failed download never leaves a partial file behind. Created
/// exclusively under an unpredictable name: a name planted in advance (a symlink to a file of
/// the user's) is never opened, let alone truncated.
fn temporary_beside(target: &Path) -> Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "download".into());
    let dir = match target.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    tempfile::Builder::new()
        .prefix(&format!(".{name}.mendfs-partial-"))
        // What a plain create would give, less the umask.
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))
}

pub async fn run(command: FileCommand) -> Result<ExitCode> {
    let connection = match &command {
        FileCommand::Put { connection, .. }
        | FileCommand::Get { connection, .. }
        | FileCommand::Ls { connection, .. }
        | FileCommand::Rm { connection, .. }
        | FileCommand::Stat { connection, .. } => connection.clone(),
    };
    let client = connection.client()?;
    match command {
        FileCommand::Put { local, remote, expect_version, redundancy, .. } => {
            let (reader, size): (Box<dyn tokio::io::AsyncRead + Unpin + Send>, Option<u64>) = if local == "-" {
                (Box::new(tokio::io::stdin()), None)
            } else {
                let file = tokio::fs::File::open(&local).await.with_context(|| format!("cannot open {local}"))?;
                let size = file.metadata().await.with_context(|| format!("cannot stat {local}"))?.len();
                (Box::new(file), Some(size))
            };
            let bar = progress_bar(size).map(Arc::new);
            let bar_for_progress = bar.clone();
            let reply = client
                .put_file_with(
                    &remote,
                    reader,
                    size,
                    expect_version,
                    redundancy.as_deref().unwrap_or(""),
                    move |sent| {
                        if let Some(bar) = &bar_for_progress {
                            bar.set_position(sent);
                        }
                    },
                )
                .await
                .with_context(|| format!("put {remote}"));
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            let reply = reply?;
            if !reply.fallback.is_empty() {
                eprintln!("note: {}", reply.fallback);
            }
            let chosen_by =
                if reply.policy.is_empty() { String::new() } else { format!(" (policy of {})", reply.policy) };
            println!(
                "{remote}: {} bytes, version {}, {} chunks, blake3 {}, {}{chosen_by}",
                reply.size,
                reply.version,
                reply.chunks,
                hex(&reply.content_hash),
                if reply.redundancy.is_empty() { "-" } else { &reply.redundancy },
            );
            Ok(ExitCode::SUCCESS)
        }
        FileCommand::Get { remote, local, .. } => {
            let mut bar: Option<ProgressBar> = None;
            let mut progress = |info: &FileInfo, received: u64| {
                if received == 0 && bar.is_none() {
                    bar = progress_bar(Some(info.size));
                }
                if let Some(bar) = &bar {
                    bar.set_position(received);
                }
            };
            if local == "-" {
                let mut stdout = tokio::io::stdout();
                client.get_file(&remote, &mut stdout, &mut progress).await.with_context(|| format!("get {remote}"))?;
            } else {
                let mut target = PathBuf::from(&local);
                // What the path itself is, not what a symlink there points to: a symlink planted
                // where a download goes is replaced, never written through, whether it points to
                // a file, a directory (the download would land among the victim's files) or a
                // device (it would be overwritten). A trailing slash asks to follow it.
                if std::fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                    // Like cp: into a directory, under the remote file's own name.
                    let name = remote.rsplit('/').find(|part| !part.is_empty()).unwrap_or("download");
                    target.push(name);
                }
                let existing = std::fs::symlink_metadata(&target).ok();
                if existing.is_some_and(|m| !m.is_file() && !m.is_dir() && !m.file_type().is_symlink()) {
                    // A device, FIFO or socket (/dev/null, a pipe another program reads): stream
                    // into it where it is. Renaming a temporary file over it would replace the
                    // device node with a regular file, and fsync means nothing for a pipe.
                    // O_NOFOLLOW: a symlink swapped in since the check is refused, not followed.
                    let mut sink = tokio::fs::OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&target)
                        .await
                        .with_context(|| format!("cannot open {} for writing", target.display()))?;
                    client
                        .get_file(&remote, &mut sink, &mut progress)
                        .await
                        .with_context(|| format!("get {remote}"))?;
                    tokio::io::AsyncWriteExt::flush(&mut sink)
                        .await
                        .with_context(|| format!("cannot write to {}", target.display()))?;
                    if let Some(bar) = bar {
                        bar.finish_and_clear();
                    }
                    return Ok(ExitCode::SUCCESS);
                }
                let (file, partial) = temporary_beside(&target)?.into_parts();
                let mut file = tokio::fs::File::from_std(file);
                let result = client.get_file(&remote, &mut file, &mut progress).await;
                let result = match result {
                    // Durable before it takes the target's name.
                    Ok(_) => file.sync_all().await.context("fsync the download"),
                    Err(e) => Err(anyhow::Error::new(e)),
                };
                // On failure, dropping `partial` deletes it.
                result.with_context(|| format!("get {remote}"))?;
                partial
                    .persist(&target)
                    .with_context(|| format!("cannot move the download to {}", target.display()))?;
            }
            if let Some(bar) = bar {
                bar.finish_and_clear();
            }
            Ok(ExitCode::SUCCESS)
        }
        FileCommand::Ls { prefix, long, limit, json, .. } => {
            let (files, truncated) = client.list_files(&prefix, limit).await.context("ls")?;
            if json {
                println!(
                    "{}",
                    json!({"files": files.iter().map(file_json).collect::<Vec<_>>(), "truncated": truncated})
                );
            } else {
                for info in &files {
                    if long {
                        println!(
                            "{:>14} {:>6} {:>14} {}  {:<11}  {}",
                            info.size,
                            info.version,
                            info.mtime_ms,
                            &hex(&info.content_hash)[..16],
                            redundancy_text(info),
                            info.path
                        );
                    } else {
                        println!("{}", info.path);
                    }
                }
                if truncated {
                    eprintln!("(more files follow; raise --limit)");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        FileCommand::Rm { path, expect_version, .. } => {
            client.delete_file(&path, expect_version).await.with_context(|| format!("rm {path}"))?;
            Ok(ExitCode::SUCCESS)
        }
        FileCommand::Stat { path, summary, json, .. } => {
            print_stat(&client, &path, summary, json).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
