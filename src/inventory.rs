//! Nodes and their GPUs (PLACEHOLDER: being written by a helper).
use crate::resources::Milli;
use crate::scheduler::{NodeCapacity, NodeUsage};
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    pub index: u32,
    pub kind: String,
    pub uuid: Option<String>,
    pub memory_mib: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub name: String,
    pub addr: String,
    pub local: bool,
    pub gpus: Vec<GpuInfo>,
    pub cpus: Milli,
    pub gpu_source: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cluster_name: String,
    pub nodes: Vec<Node>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{0}")]
    Invalid(String),
}

pub fn detect(
    _config: Option<&Path>,
    _gpus_flag: Option<&str>,
    _cpus_flag: Option<Milli>,
    _cluster_name: Option<&str>,
) -> Result<Inventory, InventoryError> {
    todo!()
}

impl Inventory {
    pub fn capacities(&self) -> Vec<NodeCapacity> {
        todo!()
    }
    pub fn render_nodes(&self, _usage: &[NodeUsage]) -> String {
        todo!()
    }
}
