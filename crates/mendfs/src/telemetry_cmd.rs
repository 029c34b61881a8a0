//! `mendfs trace ID` and `mendfs logs`: ask every node what it recorded and merge the answers.
//! No node collects for the others, so losing any one loses only its own records.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use mendfs_client::{Client, Level, LogQuery, LogRecord, SpanRecord, TraceId};
use mendfs_telemetry::render::{render_json, render_text, Unreachable};

use crate::cli::{ClusterAddress, Connection};

#[derive(Args, Debug)]
pub struct TraceArgs {
    /// The trace id (32 hex digits), as `--trace` prints it.
    pub id: String,
    /// Print the spans as JSON instead of a tree.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: Connection,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    /// Only this node's lines.
    #[arg(long)]
    pub node: Option<u64>,
    /// Only lines written while serving this trace.
    #[arg(long, value_name = "ID")]
    pub trace: Option<String>,
    /// Only lines from the last DURATION (e.g. 90s, 5m, 2h).
    #[arg(long, value_name = "DURATION")]
    pub since: Option<String>,
    /// Only lines at this level or more severe: trace, debug, info, warn, error.
    #[arg(long)]
    pub level: Option<String>,
    /// The newest this many lines across the nodes.
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
    /// One JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connection: ClusterAddress,
}

/// Every member's id and address, from the cluster's status.
async fn members(client: &Client) -> Result<Vec<(u64, String)>> {
    let status = client.status().await.context("asking the cluster for its members")?;
    Ok(status.nodes.iter().map(|n| (n.id, n.addr.clone())).collect())
}

/// Asks every node at once; returns what they recorded, merged, and the nodes that did not
/// answer.
async fn ask_every_node<'a, R, F, Fut>(nodes: &'a [(u64, String)], ask: F) -> (Vec<R>, Vec<Unreachable>)
where
    F: Fn(&'a str) -> Fut,
    Fut: std::future::Future<Output = Result<(u64, Vec<R>), mendfs_client::Error>>,
{
    let answers = futures::future::join_all(nodes.iter().map(|(id, addr)| {
        let answer = ask(addr);
        async move { (*id, answer.await) }
    }))
    .await;
    let mut records = Vec::new();
    let mut unreachable = Vec::new();
    for (node, answer) in answers {
        match answer {
            Ok((_, found)) => records.extend(found),
            Err(e) => unreachable.push(Unreachable { node, error: e.to_string() }),
        }
    }
    (records, unreachable)
}

pub async fn trace(args: TraceArgs) -> Result<ExitCode> {
    let trace_id: TraceId = args.id.parse().context("the trace id")?;
    let client = args.connection.client()?;
    let nodes = members(&client).await?;
    let (spans, unreachable): (Vec<SpanRecord>, _) =
        ask_every_node(&nodes, |addr| client.trace_spans(addr, &trace_id)).await;
    let id = trace_id.to_string();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&render_json(&id, &spans, &unreachable))?);
    } else {
        print!("{}", render_text(&id, &spans, &unreachable));
    }
    Ok(if spans.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn unix_micros_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

fn format_line(line: &LogRecord) -> String {
    let time = UNIX_EPOCH + Duration::from_micros(line.time_unix_us);
    let mut text = format!(
        "{} node {} {:5} {}: {}",
        humantime::format_rfc3339_millis(time),
        line.node,
        line.level.as_str(),
        line.target,
        line.message
    );
    for (key, value) in &line.fields {
        text.push_str(&format!(" {key}={value}"));
    }
    if let Some(trace) = &line.trace_id {
        text.push_str(&format!(" trace={trace}"));
    }
    text
}

pub async fn logs(args: LogsArgs) -> Result<ExitCode> {
    let trace_id = args.trace.as_deref().map(|t| t.parse::<TraceId>().context("--trace")).transpose()?;
    let since_unix_us = match &args.since {
        Some(text) => {
            let ago =
                humantime::parse_duration(text).with_context(|| format!("--since {text:?} (e.g. 90s, 5m, 2h)"))?;
            Some(unix_micros_now().saturating_sub(ago.as_micros() as u64))
        }
        None => None,
    };
    let min_level =
        args.level.as_deref().map(|l| l.parse::<Level>().map_err(|e| anyhow::anyhow!("--level: {e}"))).transpose()?;
    let query = LogQuery { trace_id: trace_id.map(|t| t.to_string()), since_unix_us, min_level, limit: args.limit };
    let client = args.connection.client()?;
    let mut nodes = members(&client).await?;
    if let Some(only) = args.node {
        nodes.retain(|(id, _)| *id == only);
        anyhow::ensure!(!nodes.is_empty(), "node {only} is not a member of the cluster");
    }
    let (mut lines, unreachable): (Vec<LogRecord>, _) =
        ask_every_node(&nodes, |addr| client.query_logs(addr, &query)).await;
    // One timeline across nodes (their clocks as they are), newest `limit` kept.
    lines.sort_by_key(|line| (line.time_unix_us, line.node));
    let skip = lines.len().saturating_sub(args.limit);
    for line in &lines[skip..] {
        if args.json {
            println!("{}", serde_json::to_string(line)?);
        } else {
            println!("{}", format_line(line));
        }
    }
    if !unreachable.is_empty() {
        let list: Vec<String> = unreachable.iter().map(|u| format!("node {} ({})", u.node, u.error)).collect();
        eprintln!("unreachable: {}", list.join(", "));
    }
    Ok(if unreachable.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
