//! The `Jobs` gRPC service: submit, cancel, status, list and results for users; claim,
//! checkpoint, complete and lease checks for workers (`mendfs worker`). Who may call what is
//! decided before a call gets here (`auth`: reads need `read`, the rest `write`). Every input
//! is checked here, before it is forwarded, and again on the leader (`validate`).

use mendfs_proto::v1 as pb;
use mendfs_proto::v1::jobs_server::{Jobs, JobsServer};
use mendfs_proto::LEADER_HINT_HEADER;
use tonic::{Request, Response, Status};

use crate::jobs::{self, JobCommand, JobSpec, TaskOutcome, TaskState};
use crate::node::{ClaimAnswer, JobView, MetaNode};
use crate::service::request_origin;
use crate::state::RequestId;

/// The `Jobs` service of a node. Its largest message is a checkpoint (1 MiB) plus framing.
pub fn jobs_service(node: &MetaNode) -> JobsServer<JobsApi> {
    JobsServer::new(JobsApi { node: node.clone() })
        .max_decoding_message_size(jobs::CHECKPOINT_BYTES_MAX + 64 * 1024)
        .max_encoding_message_size(usize::MAX)
}

pub struct JobsApi {
    node: MetaNode,
}

fn request_id(id: Option<pb::RequestId>) -> Option<RequestId> {
    id.map(|id| RequestId { client_id: id.client_id, sequence: id.sequence })
}

fn checked(command: &JobCommand) -> Result<(), Status> {
    command.check().map_err(Status::invalid_argument)
}

fn spec_from_pb(spec: Option<pb::JobSpec>) -> Result<JobSpec, Status> {
    let spec = spec.ok_or_else(|| Status::invalid_argument("a job submission needs its spec"))?;
    Ok(JobSpec {
        tasks: spec.tasks,
        redundancy: spec.redundancy,
        max_attempts: spec.max_attempts,
        ttl_ms: spec.ttl_ms,
        command: spec.command,
        speculative_max: spec.speculative_max,
    })
}

fn status_to_pb(view: JobView) -> pb::JobStatus {
    let record = view.record;
    let pending = record.pending();
    pb::JobStatus {
        name: view.name,
        spec: Some(pb::JobSpec {
            tasks: record.spec.tasks,
            redundancy: record.spec.redundancy,
            max_attempts: record.spec.max_attempts,
            ttl_ms: record.spec.ttl_ms,
            command: record.spec.command,
            speculative_max: record.spec.speculative_max,
        }),
        cancelled: record.cancelled,
        created_ms: record.created_ms,
        first_claim_ms: record.first_claim_ms,
        finished_ms: record.finished_ms,
        now_ms: view.now_ms,
        done: record.done,
        running: record.running,
        pending,
        failed: record.failed,
        attempts: record.attempts,
        resumed_from_checkpoint: record.resumed_from_checkpoint,
        lost_leases: record.lost_leases,
        fenced: record.fenced,
        speculative: record.speculative,
        workers: record.done_by_worker.into_iter().map(|(worker, done)| pb::JobWorkerCount { worker, done }).collect(),
        failures: view.failures.into_iter().map(|(task, stderr_tail)| pb::JobFailure { task, stderr_tail }).collect(),
        live_workers: view.live_workers,
    }
}

impl JobsApi {
    /// Names the leader on a reply this node had to forward, so the client goes there next.
    fn hint<T>(&self, reply: T) -> Result<Response<T>, Status> {
        let mut response = Response::new(reply);
        if !self.node.is_leader() {
            if let Some(addr) = self.node.leader_addr().and_then(|addr| addr.parse().ok()) {
                response.metadata_mut().insert(LEADER_HINT_HEADER, addr);
            }
        }
        Ok(response)
    }
}

#[tonic::async_trait]
impl Jobs for JobsApi {
    async fn submit(&self, request: Request<pb::JobSubmitRequest>) -> Result<Response<pb::JobSubmitReply>, Status> {
        let origin = request_origin(&request);
        let submit = request.into_inner();
        let spec = spec_from_pb(submit.spec)?;
        checked(&JobCommand::Submit { name: submit.name.clone(), spec: spec.clone() })?;
        self.node.job_submit(origin, request_id(submit.request_id), submit.name.clone(), spec.clone()).await?;
        tracing::info!(job = %submit.name, tasks = spec.tasks, redundancy = spec.redundancy, "submitted a job");
        self.hint(pb::JobSubmitReply {})
    }

    async fn cancel(&self, request: Request<pb::JobCancelRequest>) -> Result<Response<pb::JobCancelReply>, Status> {
        let origin = request_origin(&request);
        let cancel = request.into_inner();
        checked(&JobCommand::Cancel { name: cancel.name.clone() })?;
        self.node.job_cancel(origin, request_id(cancel.request_id), cancel.name.clone()).await?;
        tracing::info!(job = %cancel.name, "cancelled a job");
        self.hint(pb::JobCancelReply {})
    }

    async fn status(&self, request: Request<pb::JobStatusRequest>) -> Result<Response<pb::JobStatus>, Status> {
        let origin = request_origin(&request);
        let name = request.into_inner().name;
        jobs::validate_job_name(&name).map_err(Status::invalid_argument)?;
        self.hint(status_to_pb(self.node.job_status(origin, name).await?))
    }

    async fn list(&self, request: Request<pb::JobListRequest>) -> Result<Response<pb::JobListReply>, Status> {
        let views = self.node.job_list(request_origin(&request)).await?;
        self.hint(pb::JobListReply { jobs: views.into_iter().map(status_to_pb).collect() })
    }

    async fn results(&self, request: Request<pb::JobResultsRequest>) -> Result<Response<pb::JobResultsReply>, Status> {
        let origin = request_origin(&request);
        let read = request.into_inner();
        jobs::validate_job_name(&read.name).map_err(Status::invalid_argument)?;
        let (tasks, next_task) = self.node.job_results(origin, read.name, read.from_task, read.limit).await?;
        let results = tasks
            .into_iter()
            .map(|(task, record)| pb::JobTaskResult {
                task,
                state: match record.state {
                    TaskState::Done => "done",
                    TaskState::Failed => "failed",
                    TaskState::Active if record.leases.is_empty() => "pending",
                    TaskState::Active => "running",
                }
                .to_string(),
                output: record.result,
                worker: record.result_worker,
                attempt: record.result_attempt,
                stderr_tail: record.stderr_tail,
            })
            .collect();
        self.hint(pb::JobResultsReply { results, next_task })
    }

    async fn claim(&self, request: Request<pb::JobClaimRequest>) -> Result<Response<pb::JobClaimReply>, Status> {
        let origin = request_origin(&request);
        let claim = request.into_inner();
        checked(&JobCommand::Claim {
            name: claim.name.clone(),
            session_id: claim.session_id,
            worker: claim.worker.clone(),
        })?;
        let answer = self
            .node
            .job_claim(origin, request_id(claim.request_id), claim.name, claim.session_id, claim.worker)
            .await?;
        self.hint(match answer {
            ClaimAnswer::Claimed(claim) => pb::JobClaimReply {
                claimed: true,
                task: claim.task,
                lease: claim.lease,
                has_checkpoint: claim.has_checkpoint,
                command: claim.command,
                speculative: claim.speculative,
                retry_after_ms: 0,
                over: false,
            },
            ClaimAnswer::Nothing { retry_after_ms, over } => {
                pb::JobClaimReply { retry_after_ms, over, ..Default::default() }
            }
        })
    }

    async fn checkpoint(
        &self,
        request: Request<pb::JobCheckpointRequest>,
    ) -> Result<Response<pb::JobCheckpointReply>, Status> {
        let origin = request_origin(&request);
        let save = request.into_inner();
        let command =
            JobCommand::Checkpoint { name: save.name.clone(), task: save.task, lease: save.lease, data: save.data };
        checked(&command)?;
        let JobCommand::Checkpoint { name, task, lease, data } = command else {
            return Err(Status::internal("a checkpoint became another command"));
        };
        self.node.job_checkpoint(origin, request_id(save.request_id), name, task, lease, data).await?;
        self.hint(pb::JobCheckpointReply {})
    }

    async fn complete(
        &self,
        request: Request<pb::JobCompleteRequest>,
    ) -> Result<Response<pb::JobCompleteReply>, Status> {
        let origin = request_origin(&request);
        let done = request.into_inner();
        let outcome = if done.succeeded {
            TaskOutcome::Succeeded { stdout: done.output }
        } else {
            let tail = String::from_utf8_lossy(&done.output);
            TaskOutcome::Failed {
                exit_code: done.exit_code,
                stderr_tail: jobs::truncate_tail(&tail, jobs::STDERR_TAIL_BYTES_MAX),
            }
        };
        let command = JobCommand::Complete { name: done.name.clone(), task: done.task, lease: done.lease, outcome };
        checked(&command)?;
        let JobCommand::Complete { name, task, lease, outcome } = command else {
            return Err(Status::internal("a completion became another command"));
        };
        self.node.job_complete(origin, request_id(done.request_id), name, task, lease, outcome).await?;
        self.hint(pb::JobCompleteReply {})
    }

    async fn lease(&self, request: Request<pb::JobLeaseRequest>) -> Result<Response<pb::JobLeaseReply>, Status> {
        let origin = request_origin(&request);
        let check = request.into_inner();
        jobs::validate_job_name(&check.name).map_err(Status::invalid_argument)?;
        let (current, why) = self.node.job_lease(origin, check.name, check.task, check.lease).await?;
        self.hint(pb::JobLeaseReply { current, why })
    }

    async fn release(&self, request: Request<pb::JobReleaseRequest>) -> Result<Response<pb::JobReleaseReply>, Status> {
        let origin = request_origin(&request);
        let release = request.into_inner();
        jobs::validate_job_name(&release.name).map_err(Status::invalid_argument)?;
        let request_id = request_id(release.request_id);
        self.node.job_release(origin, request_id, release.name, release.task, release.lease).await?;
        self.hint(pb::JobReleaseReply {})
    }

    async fn read_checkpoint(
        &self,
        request: Request<pb::JobReadCheckpointRequest>,
    ) -> Result<Response<pb::JobReadCheckpointReply>, Status> {
        let origin = request_origin(&request);
        let read = request.into_inner();
        jobs::validate_job_name(&read.name).map_err(Status::invalid_argument)?;
        let data = self.node.job_read_checkpoint(origin, read.name, read.task).await?;
        self.hint(pb::JobReadCheckpointReply { data })
    }
}
