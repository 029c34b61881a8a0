//! Who may do what: access keys from the metadata (the secret `s3s` checks signatures with)
//! and each key's grants per bucket.

use mendfs_meta::s3::Grant;
use mendfs_meta::MetaNode;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::dto::{CopyObjectInput, CopySource, UploadPartCopyInput};
use s3s::{S3Error, S3ErrorCode, S3Request, S3Result};

use crate::errors::from_api;

/// Presigned URLs live at most a week (S3's own bound).
const PRESIGNED_EXPIRES_MAX_SECS: u64 = 7 * 24 * 3600;

pub(crate) struct KeyAuth {
    pub node: MetaNode,
}

#[async_trait::async_trait]
impl S3Auth for KeyAuth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.node.s3_access_key(access_key).await {
            Ok(Some(key)) => Ok(SecretKey::from(key.secret)),
            Ok(None) => Err(S3Error::with_message(
                S3ErrorCode::InvalidAccessKeyId,
                "the access key id you provided does not exist in our records",
            )),
            Err(e) => Err(from_api(e)),
        }
    }
}

/// What an operation needs of the caller's grant in its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// Any valid key (ListBuckets).
    Key,
    /// A key allowed to create buckets.
    CreateBuckets,
    Read,
    Write,
    Owner,
}

fn needs(op: &str) -> Needs {
    match op {
        "ListBuckets" => Needs::Key,
        "CreateBucket" => Needs::CreateBuckets,
        "DeleteBucket" => Needs::Owner,
        "GetObject"
        | "HeadObject"
        | "ListObjects"
        | "ListObjectsV2"
        | "ListObjectVersions"
        | "HeadBucket"
        | "GetBucketLocation"
        | "ListMultipartUploads"
        | "ListParts"
        | "GetObjectAttributes" => Needs::Read,
        _ => Needs::Write,
    }
}

fn allows(grant: Grant, needs: Needs) -> bool {
    match needs {
        Needs::Key | Needs::CreateBuckets => true,
        Needs::Read => grant.read,
        Needs::Write => grant.write,
        Needs::Owner => grant.owner,
    }
}

fn denied(why: String) -> S3Error {
    S3Error::with_message(S3ErrorCode::AccessDenied, why)
}

/// The operation's name, for metrics: recorded in the request's extensions by the access
/// check, which is the first place `s3s` names it.
#[derive(Debug, Clone)]
pub(crate) struct OperationSlot(pub std::sync::Arc<std::sync::Mutex<Option<String>>>);

pub(crate) struct KeyAccess {
    pub node: MetaNode,
}

impl KeyAccess {
    /// The caller's grant in `bucket`: this node's state, and the leader's when this node's
    /// says no (a grant given a moment ago may not have been applied here yet).
    async fn grant(&self, key_id: &str, bucket: &str, needs: Needs) -> S3Result<Grant> {
        // A grant lowered a moment ago must not be used here on an old view.
        self.node.rights_state_fresh().await.map_err(from_api)?;
        let local = self.node.s3_grant(key_id, bucket).map_err(from_api)?;
        if allows(local, needs) {
            return Ok(local);
        }
        self.node.s3_grant_from_leader(key_id, bucket).await.map_err(from_api)
    }

    async fn check_read_source(&self, key_id: &str, source: &CopySource) -> S3Result<()> {
        let CopySource::Bucket { bucket, .. } = source else {
            return Err(S3Error::with_message(S3ErrorCode::NotImplemented, "access points are not supported"));
        };
        let grant = self.grant(key_id, bucket, Needs::Read).await?;
        if !grant.read {
            return Err(denied(format!("access key {key_id} may not read bucket {bucket} (the copy source)")));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl S3Access for KeyAccess {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let op = cx.s3_op().name().to_string();
        if let Some(slot) = cx.extensions_mut().get::<OperationSlot>() {
            if let Ok(mut name) = slot.0.lock() {
                *name = Some(op.clone());
            }
        }
        let Some(credentials) = cx.credentials() else {
            return Err(denied("anonymous requests are not allowed: sign the request with an access key".into()));
        };
        let key_id = credentials.access_key.clone();
        if cx
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("AWS "))
            || cx.uri().query().is_some_and(|q| q.contains("Signature=") && !q.contains("X-Amz-Signature="))
        {
            return Err(denied("Signature Version 2 is not accepted; sign with AWS Signature Version 4".into()));
        }
        if let Some(query) = cx.uri().query() {
            let expires = query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(name, _)| *name == "X-Amz-Expires")
                .map(|(_, value)| value.parse::<u64>());
            match expires {
                Some(Ok(seconds)) if seconds > PRESIGNED_EXPIRES_MAX_SECS => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::AuthorizationQueryParametersError,
                        format!("X-Amz-Expires must be at most {PRESIGNED_EXPIRES_MAX_SECS} seconds"),
                    ));
                }
                Some(Err(_)) => {
                    return Err(S3Error::with_message(
                        S3ErrorCode::AuthorizationQueryParametersError,
                        "X-Amz-Expires is not a number of seconds",
                    ));
                }
                _ => {}
            }
        }
        let needs = needs(&op);
        if needs == Needs::CreateBuckets {
            let key = self.node.s3_access_key(&key_id).await.map_err(from_api)?;
            if !key.is_some_and(|key| key.create_buckets) {
                return Err(denied(format!("access key {key_id} may not create buckets")));
            }
            return Ok(());
        }
        let Some(bucket) = cx.s3_path().get_bucket_name().map(str::to_string) else {
            return if needs == Needs::Key || op == "ListBuckets" {
                Ok(())
            } else {
                Err(denied(format!("{op} needs a bucket")))
            };
        };
        let grant = self.grant(&key_id, &bucket, needs).await?;
        if !allows(grant, needs) {
            // A bucket that does not exist is answered as such, as S3 does.
            if self.node.s3_bucket(mendfs_meta::Origin::LOCAL, bucket.clone()).await.map_err(from_api)?.is_none() {
                return Err(S3Error::with_message(
                    S3ErrorCode::NoSuchBucket,
                    format!("bucket {bucket} does not exist"),
                ));
            }
            let what = match needs {
                Needs::Read => "read",
                Needs::Owner => "delete",
                _ => "write to",
            };
            return Err(denied(format!("access key {key_id} may not {what} bucket {bucket}")));
        }
        Ok(())
    }

    async fn copy_object(&self, request: &mut S3Request<CopyObjectInput>) -> S3Result<()> {
        let key_id = request.credentials.as_ref().map(|c| c.access_key.clone()).unwrap_or_default();
        self.check_read_source(&key_id, &request.input.copy_source).await
    }

    async fn upload_part_copy(&self, request: &mut S3Request<UploadPartCopyInput>) -> S3Result<()> {
        let key_id = request.credentials.as_ref().map(|c| c.access_key.clone()).unwrap_or_default();
        self.check_read_source(&key_id, &request.input.copy_source).await
    }
}
