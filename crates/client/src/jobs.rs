//! Jobs: submit, cancel and read them; and a worker's calls (claim, checkpoint, complete,
//! lease checks), each under the lease the claim gave. See `mendfs job` and `mendfs worker`.

use mendfs_proto::v1 as pb;
use mendfs_proto::v1::jobs_client::JobsClient;

use crate::{Client, Error, Intercepted};

pub use pb::{JobClaimReply, JobSpec, JobStatus, JobTaskResult};

/// How an attempt ended, for [`Client::job_complete`].
#[derive(Debug, Clone)]
pub enum AttemptEnd {
    /// Exit status 0: stdout is the task's result.
    Succeeded { stdout: Vec<u8> },
    /// Anything else, with the tail of stderr.
    Failed { exit_code: Option<i32>, stderr_tail: Vec<u8> },
}

impl Client {
    fn jobs(&self, index: usize) -> JobsClient<Intercepted> {
        JobsClient::with_interceptor(self.inner.channels[index].clone(), self.inner.interceptor.clone())
            .max_decoding_message_size(usize::MAX)
    }

    /// Records job `name`; refused if a job of that name exists.
    pub async fn job_submit(&self, name: &str, spec: JobSpec) -> Result<(), Error> {
        let request =
            pb::JobSubmitRequest { name: name.to_string(), spec: Some(spec), request_id: self.next_request_id() };
        self.call("submit job", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.submit(request).await }
        })
        .await
        .map(drop)
    }

    pub async fn job_cancel(&self, name: &str) -> Result<(), Error> {
        let request = pb::JobCancelRequest { name: name.to_string(), request_id: self.next_request_id() };
        self.call("cancel job", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.cancel(request).await }
        })
        .await
        .map(drop)
    }

    pub async fn job_status(&self, name: &str) -> Result<JobStatus, Error> {
        let request = pb::JobStatusRequest { name: name.to_string() };
        self.call("job status", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.status(request).await }
        })
        .await
    }

    pub async fn job_list(&self) -> Result<Vec<JobStatus>, Error> {
        self.call("list jobs", |i| {
            let mut jobs = self.jobs(i);
            async move { jobs.list(pb::JobListRequest {}).await }
        })
        .await
        .map(|reply| reply.jobs)
    }

    /// Claimed tasks of a job from `from_task` on, one page, and where the next page starts.
    pub async fn job_results_page(
        &self,
        name: &str,
        from_task: u64,
        limit: u32,
    ) -> Result<(Vec<JobTaskResult>, Option<u64>), Error> {
        let request = pb::JobResultsRequest { name: name.to_string(), from_task, limit };
        self.call("job results", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.results(request).await }
        })
        .await
        .map(|reply| (reply.results, reply.next_task))
    }

    /// Asks for a task of job `name` under `session_id`.
    pub async fn job_claim(&self, name: &str, session_id: u64, worker: &str) -> Result<JobClaimReply, Error> {
        let request = pb::JobClaimRequest {
            name: name.to_string(),
            session_id,
            worker: worker.to_string(),
            request_id: self.next_request_id(),
        };
        self.call("claim a task", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.claim(request).await }
        })
        .await
    }

    /// Stores a task's checkpoint; [`Error::LeaseLost`] if `lease` is no longer the task's.
    pub async fn job_checkpoint(&self, name: &str, task: u64, lease: u64, data: Vec<u8>) -> Result<(), Error> {
        let request =
            pb::JobCheckpointRequest { name: name.to_string(), task, lease, data, request_id: self.next_request_id() };
        self.call("save a checkpoint", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.checkpoint(request).await }
        })
        .await
        .map(drop)
    }

    /// Ends an attempt; a success is refused with [`Error::LeaseLost`] if `lease` is no longer
    /// the task's (another attempt won, or the lease expired).
    pub async fn job_complete(&self, name: &str, task: u64, lease: u64, end: AttemptEnd) -> Result<(), Error> {
        let (succeeded, output, exit_code) = match end {
            AttemptEnd::Succeeded { stdout } => (true, stdout, None),
            AttemptEnd::Failed { exit_code, stderr_tail } => (false, stderr_tail, exit_code),
        };
        let request = pb::JobCompleteRequest {
            name: name.to_string(),
            task,
            lease,
            succeeded,
            output,
            exit_code,
            request_id: self.next_request_id(),
        };
        self.call("complete a task", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.complete(request).await }
        })
        .await
        .map(drop)
    }

    /// Whether `lease` is still current for the task, and why not.
    pub async fn job_lease(&self, name: &str, task: u64, lease: u64) -> Result<(bool, String), Error> {
        let request = pb::JobLeaseRequest { name: name.to_string(), task, lease };
        self.call("check a lease", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.lease(request).await }
        })
        .await
        .map(|reply| (reply.current, reply.why))
    }

    /// Gives a lease back (a stopping worker): the task is claimable again at once.
    pub async fn job_release(&self, name: &str, task: u64, lease: u64) -> Result<(), Error> {
        let request = pb::JobReleaseRequest { name: name.to_string(), task, lease, request_id: self.next_request_id() };
        self.call("release a lease", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.release(request).await }
        })
        .await
        .map(drop)
    }

    pub async fn job_read_checkpoint(&self, name: &str, task: u64) -> Result<Option<Vec<u8>>, Error> {
        let request = pb::JobReadCheckpointRequest { name: name.to_string(), task };
        self.call("read a checkpoint", |i| {
            let request = request.clone();
            let mut jobs = self.jobs(i);
            async move { jobs.read_checkpoint(request).await }
        })
        .await
        .map(|reply| reply.data)
    }
}
