//! `mendfs policy`: redundancy policies, how the files under a path prefix (or the objects of
//! an S3 bucket) keep their chunks when their put does not say: `set`, `unset`, `list` (an
//! admin token, or the cluster secret on a node).

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use mendfs_client::PolicyTarget;

use crate::cli::ClusterAddress;

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Set (or replace) the redundancy of the files at or under PREFIX, or of a bucket's
    /// objects: `replicate` or `ec:K+M` (chunks of 64 KiB or more as K data and M parity shards
    /// on K + M nodes). It governs new puts; files already written keep how they are kept.
    #[command(
        override_usage = "mendfs policy set PREFIX REDUNDANCY\n       mendfs policy set --bucket NAME REDUNDANCY"
    )]
    Set {
        /// PREFIX REDUNDANCY (an absolute path; the longest matching prefix's policy applies),
        /// or REDUNDANCY alone with --bucket.
        #[arg(value_name = "PREFIX REDUNDANCY", num_args = 1..=2, required = true)]
        args: Vec<String>,
        /// The S3 bucket whose objects the policy governs (it must exist).
        #[arg(long, value_name = "NAME")]
        bucket: Option<String>,
    },
    /// Remove the policy of PREFIX (or of a bucket): puts there fall back to a shorter
    /// prefix's policy, or replicate.
    Unset {
        #[arg(required_unless_present = "bucket", conflicts_with = "bucket")]
        prefix: Option<String>,
        #[arg(long, value_name = "NAME")]
        bucket: Option<String>,
    },
    /// List the policies: path prefixes, then buckets.
    List {
        #[arg(long)]
        json: bool,
    },
}

fn set_at(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// `set`'s positional arguments and `--bucket` as a target and a redundancy.
fn set_arguments(args: Vec<String>, bucket: Option<String>) -> Result<(PolicyTarget, String)> {
    match (bucket, <[String; 1]>::try_from(args)) {
        (Some(bucket), Ok([redundancy])) => Ok((PolicyTarget::Bucket(bucket), redundancy)),
        (Some(_), Err(_)) => bail!("with --bucket, give only the redundancy: mendfs policy set --bucket NAME ec:4+2"),
        (None, Ok(_)) => bail!("give a prefix and a redundancy: mendfs policy set /cold ec:4+2"),
        (None, Err(args)) => {
            let [prefix, redundancy] =
                <[String; 2]>::try_from(args).map_err(|_| anyhow::anyhow!("give a prefix and a redundancy"))?;
            Ok((PolicyTarget::Prefix(prefix), redundancy))
        }
    }
}

fn kind_and_name(target: &PolicyTarget) -> (&'static str, &str) {
    match target {
        PolicyTarget::Prefix(prefix) => ("prefix", prefix),
        PolicyTarget::Bucket(bucket) => ("bucket", bucket),
    }
}

pub async fn run_policy(connection: ClusterAddress, command: PolicyCommand) -> Result<ExitCode> {
    let client = connection.client()?;
    match command {
        PolicyCommand::Set { args, bucket } => {
            let (target, redundancy) = set_arguments(args, bucket)?;
            let change =
                client.set_policy(&target, &redundancy).await.with_context(|| format!("set the policy of {target}"))?;
            let before = change.before.as_deref().unwrap_or("none");
            let after = change.after.as_deref().unwrap_or(redundancy.trim());
            println!("policy of {}: {after} (was {before})", change.target);
            eprintln!(
                "new puts there use it (chunks under 64 KiB stay replicated); what is already stored keeps how it \
                 is kept"
            );
        }
        PolicyCommand::Unset { prefix, bucket } => {
            let target = match (prefix, bucket) {
                (_, Some(bucket)) => PolicyTarget::Bucket(bucket),
                (Some(prefix), None) => PolicyTarget::Prefix(prefix),
                (None, None) => bail!("give a prefix or --bucket NAME"),
            };
            let change = client.unset_policy(&target).await.with_context(|| format!("unset the policy of {target}"))?;
            match change.before {
                Some(before) => println!("removed the policy of {} (it was {before})", change.target),
                None => println!("{} had no policy; nothing to remove", change.target),
            }
        }
        PolicyCommand::List { json } => {
            let policies = client.list_policies().await.context("list policies")?;
            if json {
                let policies: Vec<_> = policies
                    .iter()
                    .map(|policy| {
                        let (kind, name) = kind_and_name(&policy.target);
                        serde_json::json!({
                            "kind": kind,
                            "name": name,
                            "redundancy": policy.redundancy,
                            "set_ms": policy.set_ms,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(policies));
            } else {
                println!("{:<8} {:<40} {:<11} SET", "KIND", "PREFIX OR BUCKET", "REDUNDANCY");
                for policy in policies {
                    let (kind, name) = kind_and_name(&policy.target);
                    println!("{kind:<8} {name:<40} {:<11} {}", policy.redundancy, set_at(policy.set_ms));
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[&str]) -> Vec<String> {
        args.iter().map(|arg| arg.to_string()).collect()
    }

    #[test]
    fn set_takes_a_prefix_and_a_redundancy_or_a_bucket_and_a_redundancy() {
        let (target, redundancy) = set_arguments(strings(&["/cold", "ec:4+2"]), None).unwrap();
        assert_eq!((target, redundancy.as_str()), (PolicyTarget::Prefix("/cold".into()), "ec:4+2"));
        let (target, redundancy) = set_arguments(strings(&["ec:4+2"]), Some("photos".into())).unwrap();
        assert_eq!((target, redundancy.as_str()), (PolicyTarget::Bucket("photos".into()), "ec:4+2"));
        let error = set_arguments(strings(&["ec:4+2"]), None).unwrap_err().to_string();
        assert!(error.contains("a prefix and a redundancy"), "{error}");
        let error = set_arguments(strings(&["/cold", "ec:4+2"]), Some("photos".into())).unwrap_err().to_string();
        assert!(error.contains("only the redundancy"), "{error}");
    }
}
