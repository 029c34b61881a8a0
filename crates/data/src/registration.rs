//! A storage node announces itself (id, address, zone, weight) to the metadata, retrying until
//! the metadata records it; its admin state and committed liveness are kept across restarts.

use std::time::Duration;

use mendfs_heal::detector::Liveness;
use mendfs_meta::{MetaNode, StorageNode};
use mendfs_worker::{Step, Worker, WorkerError};

use crate::DataConfig;

const RETRY_EVERY: Duration = Duration::from_millis(500);

pub struct RegistrationWorker {
    node: MetaNode,
    record: StorageNode,
}

impl RegistrationWorker {
    pub fn new(node: MetaNode, data: &DataConfig) -> Self {
        let record = StorageNode {
            id: node.id(),
            addr: node.config().advertise_addr.clone(),
            zone: data.zone.clone(),
            weight: data.weight,
            draining: false,
            liveness: Liveness::Up,
        };
        Self { node, record }
    }
}

impl Worker for RegistrationWorker {
    fn name(&self) -> String {
        "storage.registration".into()
    }

    async fn work(&mut self) -> Result<Step, WorkerError> {
        match self.node.register_storage_node(self.record.clone()).await {
            Ok(()) => {
                tracing::info!("storage registered");
                Ok(Step::Done)
            }
            // No leader yet (a cluster starting up): expected, so only a debug line.
            Err(e) => {
                tracing::debug!("storage registration will be retried: {e}");
                Ok(Step::Idle(RETRY_EVERY))
            }
        }
    }
}
