//! `mendfs s3`: the operator's side of the S3 API, access keys and buckets and what each key
//! may do in each bucket (an admin token, or the cluster secret on a node).

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::cli::ClusterAddress;

#[derive(Subcommand, Debug)]
pub enum S3Command {
    /// Access keys for S3 clients: create, list, delete.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Set what an access key may do in a bucket, exactly: the rights not given are taken
    /// away (no flag at all: every right is revoked).
    Allow {
        key_id: String,
        bucket: String,
        /// Get, head and list objects.
        #[arg(long)]
        read: bool,
        /// Put, copy and delete objects, multipart uploads.
        #[arg(long)]
        write: bool,
        /// Delete the bucket.
        #[arg(long)]
        owner: bool,
    },
    /// Buckets: create, list, delete.
    Bucket {
        #[command(subcommand)]
        command: BucketCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Create an access key and print its id and secret (once: the secret is not shown again).
    Create {
        /// A label for the key: 1–64 of A-Z a-z 0-9 . _ -
        name: String,
        /// The key may create buckets (and owns those it creates).
        #[arg(long)]
        create_buckets: bool,
    },
    /// List the access keys and their grants (never the secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete an access key and its grants: S3 requests signed with it are refused.
    Delete { key_id: String },
}

#[derive(Subcommand, Debug)]
pub enum BucketCommand {
    /// Create a bucket (3–63 of a-z 0-9 . -, as S3 names them).
    Create {
        name: String,
        /// An access key that gets every right in the bucket (read, write, owner).
        #[arg(long, value_name = "KEY_ID")]
        owner: Option<String>,
    },
    /// List the buckets.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete an empty bucket (no objects, no multipart uploads) and its grants.
    Delete { name: String },
}

fn created(ms: u64) -> humantime::Rfc3339Timestamp {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
}

/// `read,write,owner`, or `none`.
fn rights(read: bool, write: bool, owner: bool) -> String {
    let names: Vec<&str> = [(read, "read"), (write, "write"), (owner, "owner")]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, n)| n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(",")
    }
}

pub async fn run_s3(connection: ClusterAddress, command: S3Command) -> Result<ExitCode> {
    let client = connection.client()?;
    match command {
        S3Command::Key { command: KeyCommand::Create { name, create_buckets } } => {
            let reply = client.s3_create_key(&name, create_buckets).await.context("create S3 access key")?;
            let may = if create_buckets { "may create buckets" } else { "may not create buckets" };
            eprintln!("created S3 access key {} ({name:?}, {may}); its secret is shown only now:", reply.key_id);
            println!("access key id:     {}", reply.key_id);
            println!("secret access key: {}", reply.secret);
            println!();
            println!("export AWS_ACCESS_KEY_ID={}", reply.key_id);
            println!("export AWS_SECRET_ACCESS_KEY={}", reply.secret);
        }
        S3Command::Key { command: KeyCommand::List { json } } => {
            let keys = client.s3_list_keys().await.context("list S3 access keys")?;
            if json {
                let keys: Vec<_> = keys
                    .iter()
                    .map(|key| {
                        let grants: Vec<_> = key
                            .grants
                            .iter()
                            .map(|g| {
                                serde_json::json!({"bucket": g.bucket, "read": g.read, "write": g.write, "owner": g.owner})
                            })
                            .collect();
                        serde_json::json!({
                            "key_id": key.key_id,
                            "name": key.name,
                            "create_buckets": key.create_buckets,
                            "created_ms": key.created_ms,
                            "grants": grants,
                        })
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(keys));
            } else {
                println!("{:<20} {:<24} {:<14} {:<20} GRANTS", "KEY ID", "NAME", "CREATE-BUCKETS", "CREATED");
                for key in keys {
                    let grants: Vec<String> = key
                        .grants
                        .iter()
                        .map(|g| format!("{}({})", g.bucket, rights(g.read, g.write, g.owner)))
                        .collect();
                    let grants = if grants.is_empty() { "-".to_string() } else { grants.join(" ") };
                    let create = if key.create_buckets { "yes" } else { "no" };
                    println!(
                        "{:<20} {:<24} {:<14} {:<20} {grants}",
                        key.key_id,
                        key.name,
                        create,
                        created(key.created_ms).to_string()
                    );
                }
            }
        }
        S3Command::Key { command: KeyCommand::Delete { key_id } } => {
            client.s3_delete_key(&key_id).await.context("delete S3 access key")?;
            println!("deleted S3 access key {key_id} and its grants");
        }
        S3Command::Allow { key_id, bucket, read, write, owner } => {
            client.s3_allow(&key_id, &bucket, read, write, owner).await.context("set S3 grant")?;
            if read || write || owner {
                println!("{key_id} may now {} in bucket {bucket} (exactly these rights)", rights(read, write, owner));
            } else {
                println!("revoked every right of {key_id} in bucket {bucket} (no --read, --write or --owner given)");
            }
        }
        S3Command::Bucket { command: BucketCommand::Create { name, owner } } => {
            client.s3_create_bucket(&name, owner.as_deref()).await.context("create bucket")?;
            match owner {
                Some(owner) => println!("created bucket {name}, owned by {owner}"),
                None => println!("created bucket {name}"),
            }
        }
        S3Command::Bucket { command: BucketCommand::List { json } } => {
            let buckets = client.s3_list_buckets().await.context("list buckets")?;
            if json {
                let buckets: Vec<_> =
                    buckets.iter().map(|b| serde_json::json!({"name": b.name, "created_ms": b.created_ms})).collect();
                println!("{}", serde_json::Value::Array(buckets));
            } else {
                println!("{:<63} CREATED", "NAME");
                for bucket in buckets {
                    println!("{:<63} {}", bucket.name, created(bucket.created_ms));
                }
            }
        }
        S3Command::Bucket { command: BucketCommand::Delete { name } } => {
            client.s3_delete_bucket(&name).await.context("delete bucket")?;
            println!("deleted bucket {name}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::rights;

    #[test]
    fn rights_are_named_in_order_or_none() {
        assert_eq!(rights(true, true, true), "read,write,owner");
        assert_eq!(rights(false, true, false), "write");
        assert_eq!(rights(true, false, true), "read,owner");
        assert_eq!(rights(false, false, false), "none");
    }
}
