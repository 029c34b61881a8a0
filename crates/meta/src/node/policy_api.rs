//! `MetaNode`'s policy face: setting and listing redundancy policies through Raft and the
//! leader, for the `Policy` service, and reading them from this node's own state, for the
//! coordinator's puts, together with how a committed version's content is kept.

use super::{unexpected, LeaderRequest, LeaderResponse, MetaNode, Origin};
use crate::error::ApiError;
use crate::files::FileRecord;
use crate::policy::{self, PolicyCommand, PolicyRecord, PolicyTarget, Redundancy, StoredAs};
use crate::schema::Outcome;
use crate::state::Command;

impl MetaNode {
    /// Proposes a policy change; answers the policy the target had before.
    async fn change_policy(&self, origin: Origin, command: PolicyCommand) -> Result<Option<Redundancy>, ApiError> {
        match self.execute(origin, None, Command::Policy(command)).await? {
            Outcome::PolicyChanged { previous } => Ok(previous),
            other => Err(unexpected("a policy change", other)),
        }
    }

    /// Sets (or replaces) the policy of `target`; answers the one it replaced.
    pub async fn set_policy(
        &self,
        origin: Origin,
        target: PolicyTarget,
        redundancy: Redundancy,
    ) -> Result<Option<Redundancy>, ApiError> {
        self.change_policy(origin, PolicyCommand::Set { target, redundancy }).await
    }

    /// Removes the policy of `target`; answers the one removed (None: there was none).
    pub async fn unset_policy(&self, origin: Origin, target: PolicyTarget) -> Result<Option<Redundancy>, ApiError> {
        self.change_policy(origin, PolicyCommand::Unset { target }).await
    }

    /// Every policy, from a linearizable read: paths first, then buckets.
    pub async fn policies(&self, origin: Origin) -> Result<Vec<(PolicyTarget, PolicyRecord)>, ApiError> {
        match self.serve_on_leader(LeaderRequest::Policies, origin).await? {
            LeaderResponse::Policies(policies) => Ok(policies),
            other => Err(unexpected("the policy list", other)),
        }
    }

    /// The policy governing a file at `path` (its longest matching prefix, and what it asks
    /// for), from this node's applied state. A put started just after a change may see the
    /// previous policy: the choice is only how to keep the new content, and either is durable
    /// and recorded with the write, so a leader round trip per put would buy nothing.
    pub fn policy_for_path(&self, path: &str) -> Result<Option<(String, Redundancy)>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        policy::policy_for_path(&view, path).map_err(ApiError::internal)
    }

    /// The policy of a bucket's objects, from this node's applied state (as for paths).
    pub fn policy_for_bucket(&self, bucket: &str) -> Result<Option<Redundancy>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        policy::policy_for_bucket(&view, bucket).map_err(ApiError::internal)
    }

    /// How a file version's content is kept, from this node's applied state; None when this
    /// node does not hold that version's first chunk (not applied yet, or released already).
    pub fn stored_as(&self, record: &FileRecord) -> Result<Option<StoredAs>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        policy::stored_as(&view, record).map_err(ApiError::internal)
    }

    /// How one listed chunk is kept, from this node's applied state; None if it holds no
    /// record of it.
    pub fn chunk_stored_as(&self, hash: &mendfs_types::ChunkHash) -> Result<Option<StoredAs>, ApiError> {
        let view = self.state.view().map_err(ApiError::internal)?;
        policy::chunk_stored_as(&view, hash).map_err(ApiError::internal)
    }
}
