//! SkyPilot task YAML: parse and validate (PLACEHOLDER: being written by a helper).
use crate::resources::{AccelDemand, Demand, Milli};
use serde::Serialize;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResourceSpec {
    pub accelerators: Vec<AccelDemand>,
    pub cpus: Option<Milli>,
    pub cpus_plus: bool,
    pub memory: Option<String>,
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct JobSpec {
    pub name: Option<String>,
    pub workdir: Option<String>,
    pub num_nodes: u32,
    pub resources: ResourceSpec,
    pub envs: BTreeMap<String, String>,
    #[serde(skip)]
    pub secrets: BTreeMap<String, String>,
    pub file_mounts: BTreeMap<String, serde_json::Value>,
    pub setup: Option<String>,
    pub run: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{origin}{}: {message}", location(*line, *column))]
pub struct SpecError {
    pub origin: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

pub fn parse(
    _text: &str,
    _origin: &str,
    _env_overrides: &BTreeMap<String, String>,
) -> Result<JobSpec, SpecError> {
    todo!()
}

impl JobSpec {
    pub fn demand(&self) -> Demand {
        todo!()
    }
    pub fn resources_display(&self) -> String {
        todo!()
    }
    pub fn to_redacted_yaml(&self) -> String {
        todo!()
    }
}
