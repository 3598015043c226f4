//! Pure placement logic (PLACEHOLDER: being written by a helper).
use crate::resources::{Demand, Milli};
use serde::{Deserialize, Serialize};

pub type JobId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSlot {
    pub index: u32,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    pub name: String,
    pub gpus: Vec<GpuSlot>,
    pub cpus: Milli,
    pub available: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuGrant {
    pub index: u32,
    pub share: Milli,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGrant {
    pub node: usize,
    pub accelerator: Option<String>,
    pub gpus: Vec<GpuGrant>,
    pub cpus: Milli,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub nodes: Vec<NodeGrant>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("{0}")]
    Never(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeUsage {
    pub gpu_used: Vec<(u32, Milli)>,
    pub cpus_used: Milli,
    pub jobs: usize,
}

pub struct Scheduler {}

impl Scheduler {
    pub fn new(_nodes: Vec<NodeCapacity>) -> Self {
        todo!()
    }
    pub fn nodes(&self) -> &[NodeCapacity] {
        todo!()
    }
    pub fn check_fits_ever(&self, _d: &Demand) -> Result<(), Unfit> {
        todo!()
    }
    pub fn enqueue(&mut self, _id: JobId, _d: Demand) {
        todo!()
    }
    pub fn dequeue(&mut self, _id: JobId) -> bool {
        todo!()
    }
    pub fn restore(&mut self, _id: JobId, _p: &Placement) -> Result<(), Unfit> {
        todo!()
    }
    pub fn release(&mut self, _id: JobId) {
        todo!()
    }
    pub fn schedule(&mut self) -> Vec<(JobId, Placement)> {
        todo!()
    }
    pub fn pending_len(&self) -> usize {
        todo!()
    }
    pub fn running_len(&self) -> usize {
        todo!()
    }
    pub fn usage(&self) -> Vec<NodeUsage> {
        todo!()
    }
    pub fn set_available(&mut self, _node: usize, _available: bool) {
        todo!()
    }
}
