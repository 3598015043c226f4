//! The cluster's nodes and their GPUs.
//!
//! An [`Inventory`] comes from one of three sources (see [`detect`]):
//! - nothing: one local node `head`, GPUs from NVML;
//! - `--gpus H100:4` (and/or `--cpus`): one local node with declared GPUs;
//! - a cluster file (YAML), one entry per node; see [`detect`] for the format.
//!
//! All NVML use in the crate lives in this module ([`nvml_probe`], [`nvml_gpus`]).
//! A machine without an NVIDIA driver gets zero GPUs and a `gpu_source` that
//! says why; nothing here panics on missing hardware.

use crate::resources::Milli;
use crate::scheduler::{GpuSlot, NodeCapacity, NodeUsage};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// One GPU of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Device index on its node: the NVML index (PCI bus order) for detected
    /// GPUs, `0..n` in declaration order for declared ones.
    pub index: u32,
    /// SkyPilot accelerator name (`H100`, `A100-80GB`, ...); see [`canonical_gpu_name`].
    pub kind: String,
    /// NVML UUID (`GPU-...`); `None` for declared GPUs.
    pub uuid: Option<String>,
    /// Total device memory in MiB; `None` for declared GPUs.
    pub memory_mib: Option<u64>,
}

/// One node of the cluster.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Unique name, `[A-Za-z0-9._-]+` (not `.`/`..`, not starting with `-`).
    pub name: String,
    /// Address reported to jobs (`SKYPILOT_NODE_IPS`).
    pub addr: String,
    /// Runs on this machine (`host: local`); false for ssh nodes.
    pub local: bool,
    pub gpus: Vec<GpuInfo>,
    pub cpus: Milli,
    /// An ssh node whose cluster file entry gives no `cpus`: they are counted on the node
    /// (`nproc` over ssh) when the daemon starts, or when the node first answers after
    /// that, or at the next health check after a count that failed; 0 until then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cpus_to_probe: bool,
    /// An ssh node whose cluster file entry gives no `accelerators`: its GPUs are found on
    /// the node (`nvidia-smi` over ssh), as its CPUs are (see `cpus_to_probe`); none until
    /// then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub gpus_to_probe: bool,
    /// Where `gpus` came from: `nvml`, `declared (--gpus)`, `declared (config)`,
    /// `none (NVML unavailable: ...)`, `none (remote node: not probed)`, `nvidia-smi`,
    /// `none (nvidia-smi found no GPU)`, `none (remote node: not probed yet: ...)`.
    pub gpu_source: String,
    /// ssh destination (`user@host` or `host`) of a remote node; `None` when local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_destination: Option<String>,
    /// ssh port of a remote node, when the cluster file gives one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// ssh identity file of a remote node, as written in the cluster file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_identity: Option<PathBuf>,
    /// Why the node cannot be used now (unreachable); `None` when it is up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<String>,
}

impl Node {
    /// What the scheduler may place on this node.
    pub fn capacity(&self) -> NodeCapacity {
        NodeCapacity {
            name: self.name.clone(),
            gpus: self
                .gpus
                .iter()
                .map(|g| GpuSlot {
                    index: g.index,
                    kind: g.kind.clone(),
                })
                .collect(),
            cpus: self.cpus,
            available: self.down.is_none(),
            unknown: self.wants_probe() != (false, false),
        }
    }

    /// Whether this ssh node's GPUs and CPUs are still to be found on it: the cluster file
    /// gives none, and no probe of the node has found them yet.
    pub fn wants_probe(&self) -> (bool, bool) {
        (self.gpus_to_probe, self.cpus_to_probe)
    }

    /// Takes what a probe of this ssh node found (see [`Node::wants_probe`]): its GPUs
    /// (`nvidia-smi`), its CPUs (`nproc`). What a probe could not find out (ssh failed or
    /// timed out, `nproc` printed no count) stays to be found: the node is asked again at
    /// the next health check, and gets no job until then. A failure is not taken for "no
    /// GPU": one ssh hiccup, or one hung `nvidia-smi`, would leave a GPU node without its
    /// GPUs until the daemon restarted.
    pub fn take_probe(&mut self, probe: &NodeProbe) {
        match &probe.gpus {
            Some(Ok(list)) => {
                self.gpu_source = if list.is_empty() {
                    "none (nvidia-smi found no GPU)".into()
                } else {
                    "nvidia-smi".into()
                };
                self.gpus = list.clone();
                self.gpus_to_probe = false;
            }
            Some(Err(e)) => self.gpu_source = format!("{GPUS_NOT_PROBED_YET}: {e})"),
            None => {}
        }
        if let Some(Ok(n)) = probe.cpus {
            self.cpus = n;
            self.cpus_to_probe = false;
        }
    }
}

/// What asking an ssh node found: `None` for what was not asked (or the node did not
/// answer).
#[derive(Clone, Debug, Default)]
pub struct NodeProbe {
    pub gpus: Option<Result<Vec<GpuInfo>, String>>,
    pub cpus: Option<Result<Milli, String>>,
}

/// The `gpu_source` of an ssh node whose GPUs are to be found with `nvidia-smi`.
const GPUS_NOT_PROBED: &str = "none (remote node: not probed)";
/// The `gpu_source` of an ssh node whose probe failed, before the reason and a `)`.
const GPUS_NOT_PROBED_YET: &str = "none (remote node: not probed yet";

/// The cluster: its name and its nodes. `nodes[0]` is the head.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub cluster_name: String,
    pub nodes: Vec<Node>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// A bad flag or cluster file; the message names the flag or file and the problem.
    #[error("{0}")]
    Invalid(String),
}

fn invalid(msg: impl Into<String>) -> InventoryError {
    InventoryError::Invalid(msg.into())
}

/// Largest number of GPUs one node may declare (guards against `H100:4000000000`).
pub const MAX_GPUS_PER_NODE: u32 = 1024;

// ---------------------------------------------------------------------------
// The machine we run on (abstracted so tests don't depend on the host).
// ---------------------------------------------------------------------------

/// What NVML reports: usable GPUs plus the devices it could not read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NvmlProbe {
    pub gpus: Vec<GpuInfo>,
    /// One line per device that was skipped, e.g. `GPU 3: GPU is lost`.
    pub skipped: Vec<String>,
}

trait Machine {
    fn nvml(&self) -> Result<NvmlProbe, String>;
    fn cpus(&self) -> Milli;
    fn hostname(&self) -> Option<String>;
}

struct ThisMachine;

impl Machine for ThisMachine {
    fn nvml(&self) -> Result<NvmlProbe, String> {
        nvml_probe()
    }
    fn cpus(&self) -> Milli {
        machine_cpus()
    }
    fn hostname(&self) -> Option<String> {
        let h = nix::unistd::gethostname().ok()?.into_string().ok()?;
        let h = h.trim();
        (!h.is_empty()).then(|| h.to_string())
    }
}

/// GPUs as NVML sees them (index order = NVML index = PCI bus order), with
/// names made canonical. Devices NVML cannot read are skipped (see [`nvml_probe`]).
/// `Err` when NVML cannot start (no driver, no library) or cannot count devices.
pub fn nvml_gpus() -> Result<Vec<GpuInfo>, String> {
    nvml_probe().map(|p| p.gpus)
}

/// Like [`nvml_gpus`], also listing the devices that were skipped and why.
pub fn nvml_probe() -> Result<NvmlProbe, String> {
    let nvml = nvml_wrapper::Nvml::init().map_err(|e| e.to_string())?;
    let count = nvml
        .device_count()
        .map_err(|e| format!("cannot count devices: {e}"))?;
    let mut probe = NvmlProbe::default();
    for index in 0..count {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                probe.skipped.push(format!("GPU {index}: {e}"));
                continue;
            }
        };
        let name = match device.name() {
            Ok(n) => n,
            Err(e) => {
                probe
                    .skipped
                    .push(format!("GPU {index}: cannot read name: {e}"));
                continue;
            }
        };
        let memory_mib = device.memory_info().ok().map(|m| m.total / (1024 * 1024));
        let uuid = device.uuid().ok();
        probe.gpus.push(GpuInfo {
            index,
            kind: canonical_gpu_name(&name, memory_mib),
            uuid,
            memory_mib,
        });
    }
    Ok(probe)
}

/// CPUs this process may use: the affinity mask, further limited by a cgroup
/// CPU quota (`std::thread::available_parallelism` on Linux); 1 if unknown.
pub fn machine_cpus() -> Milli {
    let n = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    Milli::from_units(n)
}

// ---------------------------------------------------------------------------
// GPU names.
// ---------------------------------------------------------------------------

/// SkyPilot's canonical accelerator name for an NVML device name.
///
/// `"NVIDIA H100 80GB HBM3"` -> `H100`, `"NVIDIA A100-SXM4-80GB"` -> `A100-80GB`
/// (an A100 or V100 whose name lacks the size is told apart by `memory_mib`),
/// `"Tesla T4"` -> `T4`, `"NVIDIA GeForce RTX 4090"` -> `RTX4090`.
/// NVL/PCIe/SXM variants of a model get the model's name (`H100 NVL` -> `H100`),
/// as SkyPilot's Kubernetes labeler does. Unknown names: the name without a
/// leading `NVIDIA `/`Tesla `/`GeForce `/`Quadro `, spaces replaced by `-`.
pub fn canonical_gpu_name(nvml_name: &str, memory_mib: Option<u64>) -> String {
    let upper = nvml_name.trim().to_ascii_uppercase();
    let tokens: Vec<&str> = upper
        .split([' ', '-', '_', '/'])
        .filter(|t| !t.is_empty())
        .collect();
    let has = |t: &str| tokens.contains(&t);
    let mem_at_least = |gib: u64| memory_mib.is_some_and(|m| m >= gib * 1024);

    // Most specific first (L40S before L40 before L4, etc.). Tokens are whole
    // words, so "H800" never matches "H100" and "V100S" never matches "V100".
    const SIMPLE: &[(&str, &str)] = &[
        ("GB300", "GB300"),
        ("GB200", "GB200"),
        ("B300", "B300"),
        ("B200", "B200"),
        ("B100", "B100"),
        ("GH200", "GH200"),
        ("H200", "H200"),
        ("H100", "H100"),
    ];
    for (token, name) in SIMPLE {
        if has(token) {
            return (*name).to_string();
        }
    }
    if has("A100") {
        return if has("80GB") || mem_at_least(60) {
            "A100-80GB".into()
        } else {
            "A100".into()
        };
    }
    if has("RTX") && has("6000") && has("ADA") {
        return "RTX6000-Ada".into();
    }
    if has("V100") {
        return if has("32GB") || mem_at_least(24) {
            "V100-32GB".into()
        } else {
            "V100".into()
        };
    }
    const LATER: &[(&str, &str)] = &[
        ("A10G", "A10G"),
        ("A10", "A10"),
        ("A16", "A16"),
        ("A30", "A30"),
        ("A40", "A40"),
        ("L40S", "L40S"),
        ("L40", "L40"),
        ("L4", "L4"),
        ("A6000", "A6000"),
        ("A5000", "A5000"),
        ("A4000", "A4000"),
        ("P100", "P100"),
        ("P40", "P40"),
        ("P4000", "P4000"),
        ("P4", "P4"),
        ("T4G", "T4g"),
        ("T4", "T4"),
        ("K80", "K80"),
        ("M60", "M60"),
    ];
    for (token, name) in LATER {
        if has(token) {
            return (*name).to_string();
        }
    }
    fallback_gpu_name(nvml_name)
}

fn fallback_gpu_name(nvml_name: &str) -> String {
    let mut s = nvml_name.trim();
    loop {
        let before = s;
        for prefix in ["NVIDIA ", "Tesla ", "GeForce ", "Quadro "] {
            if let (Some(head), Some(rest)) = (s.get(..prefix.len()), s.get(prefix.len()..)) {
                if head.eq_ignore_ascii_case(prefix) {
                    s = rest.trim_start();
                }
            }
        }
        if s == before {
            break;
        }
    }
    // "RTX 4090" -> "RTX4090" (SkyPilot's catalog spelling).
    let joined = match s.get(..4) {
        Some(p) if p.eq_ignore_ascii_case("RTX ") => format!("RTX{}", s[4..].trim_start()),
        _ => s.to_string(),
    };
    let mut out = String::with_capacity(joined.len());
    for c in joined.chars() {
        let c = if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
            c
        } else {
            '-'
        };
        if c == '-' && (out.is_empty() || out.ends_with('-')) {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_end_matches('-');
    if out.is_empty() {
        "GPU".to_string()
    } else {
        out.to_string()
    }
}

// ---------------------------------------------------------------------------
// `--gpus` and `accelerators:` lists.
// ---------------------------------------------------------------------------

fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Parses `H100:4`, `H100` (= 1), `H100:4,A100:2` or `none` (no GPUs).
/// Counts are whole numbers >= 1; a kind may appear once; at most
/// [`MAX_GPUS_PER_NODE`] in total. Kinds are kept as written.
pub fn parse_gpus_flag(s: &str) -> Result<Vec<(String, u32)>, InventoryError> {
    let text = s.trim();
    if text.eq_ignore_ascii_case("none") {
        return Ok(Vec::new());
    }
    if text.is_empty() {
        return Err(invalid(
            "empty GPU list (write e.g. H100:4, H100:4,A100:2 or none)",
        ));
    }
    let mut out: Vec<(String, u32)> = Vec::new();
    for item in text.split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(invalid(format!("'{s}': empty entry in the GPU list")));
        }
        let (kind, count) = match item.split_once(':') {
            Some((k, c)) => (k.trim(), c.trim()),
            None => (item, "1"),
        };
        let count = parse_gpu_count(kind, count)?;
        out.push((kind.to_string(), count));
    }
    check_gpu_list(&out)?;
    Ok(out)
}

fn parse_gpu_count(kind: &str, count: &str) -> Result<u32, InventoryError> {
    if !valid_kind(kind) {
        return Err(invalid(format!(
            "'{kind}' is not a GPU name (letters, digits, '.', '_', '-')"
        )));
    }
    if !count.is_empty() && count.bytes().all(|b| b.is_ascii_digit()) {
        return match count.parse::<u32>() {
            Ok(0) => Err(invalid(format!(
                "{kind}:{count}: the count must be at least 1"
            ))),
            Ok(n) if n <= MAX_GPUS_PER_NODE => Ok(n),
            _ => Err(invalid(format!(
                "{kind}:{count}: too many GPUs (at most {MAX_GPUS_PER_NODE} per node)"
            ))),
        };
    }
    Err(invalid(format!(
        "{kind}:{count}: a node's GPU count must be a whole number >= 1"
    )))
}

fn check_gpu_list(list: &[(String, u32)]) -> Result<(), InventoryError> {
    let mut total: u32 = 0;
    for (i, (kind, count)) in list.iter().enumerate() {
        if list[..i].iter().any(|(k, _)| k.eq_ignore_ascii_case(kind)) {
            return Err(invalid(format!("GPU '{kind}' is listed twice")));
        }
        total = total.saturating_add(*count);
    }
    if total > MAX_GPUS_PER_NODE {
        return Err(invalid(format!(
            "{total} GPUs is too many (at most {MAX_GPUS_PER_NODE} per node)"
        )));
    }
    Ok(())
}

/// Declared GPUs with indices `0..n`, in list order.
fn declared_gpus(list: &[(String, u32)]) -> Vec<GpuInfo> {
    let mut gpus = Vec::new();
    for (kind, count) in list {
        for _ in 0..*count {
            gpus.push(GpuInfo {
                index: gpus.len() as u32,
                kind: kind.clone(),
                uuid: None,
                memory_mib: None,
            });
        }
    }
    gpus
}

// ---------------------------------------------------------------------------
// The cluster file.
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    cluster_name: Option<String>,
    nodes: Option<Vec<RawNode>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    identity: Option<String>,
    ip: Option<String>,
    accelerators: Option<RawAccels>,
    cpus: Option<serde_json::Value>,
}

/// `accelerators:` as written: a string, or a map kept in file order.
enum RawAccels {
    Text(String),
    Map(Vec<(String, serde_json::Value)>),
}

impl<'de> Deserialize<'de> for RawAccels {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawAccels;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map like {H100: 8} or a string like \"H100:8,A100:2\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawAccels, E> {
                Ok(RawAccels::Text(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<RawAccels, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = m.next_entry::<String, serde_json::Value>()? {
                    out.push(entry);
                }
                Ok(RawAccels::Map(out))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<RawAccels, A::Error> {
                // `[H100:8, A100:2]`: same as the comma-separated string.
                let mut items: Vec<String> = Vec::new();
                while let Some(item) = s.next_element::<String>()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Ok(RawAccels::Map(Vec::new()));
                }
                Ok(RawAccels::Text(items.join(",")))
            }
        }
        d.deserialize_any(V)
    }
}

impl RawAccels {
    fn parse(&self) -> Result<Vec<(String, u32)>, InventoryError> {
        match self {
            RawAccels::Text(t) => parse_gpus_flag(t),
            RawAccels::Map(entries) => {
                let mut out = Vec::new();
                for (kind, value) in entries {
                    let count = match value {
                        serde_json::Value::Number(n) => n.to_string(),
                        serde_json::Value::String(s) => s.clone(),
                        other => {
                            return Err(invalid(format!(
                                "{kind}: {other} is not a GPU count (a whole number >= 1)"
                            )))
                        }
                    };
                    out.push((
                        kind.trim().to_string(),
                        parse_gpu_count(kind.trim(), count.trim())?,
                    ));
                }
                check_gpu_list(&out)?;
                Ok(out)
            }
        }
    }
}

fn parse_cpus_value(v: &serde_json::Value) -> Result<Milli, String> {
    let text = match v {
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => return Err(format!("{other} is not a CPU count")),
    };
    Milli::parse_positive(&text).map_err(|e| e.to_string())
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != "."
        && name != ".."
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

/// Where a node's GPUs should come from, before NVML is asked.
enum GpuPlan {
    Declared(Vec<GpuInfo>, &'static str),
    Nvml,
    RemoteUnknown,
}

struct PlannedNode {
    name: String,
    addr: String,
    local: bool,
    gpus: GpuPlan,
    cpus: Option<Milli>,
    ssh_destination: Option<String>,
    ssh_port: Option<u16>,
    ssh_identity: Option<PathBuf>,
}

struct ParsedConfig {
    cluster_name: Option<String>,
    nodes: Vec<PlannedNode>,
}

fn parse_config(path: &Path, text: &str) -> Result<ParsedConfig, InventoryError> {
    let file = path.display();
    let err = |what: String| invalid(format!("{file}: {what}"));
    if text.trim().is_empty() {
        return Err(err("the file is empty (expected `nodes:`)".into()));
    }
    let raw: RawConfig = serde_saphyr::from_str(text).map_err(|e| err(yaml_error(&e)))?;
    let cluster_name = match raw.cluster_name {
        Some(c) => {
            let c = c.trim().to_string();
            if !valid_name(&c) {
                return Err(err(format!(
                    "cluster_name '{c}' is not valid (letters, digits, '.', '_', '-'; at most 64)"
                )));
            }
            Some(c)
        }
        None => None,
    };
    let raw_nodes = raw.nodes.unwrap_or_default();
    if raw_nodes.is_empty() {
        return Err(err(
            "`nodes` is missing or empty (list at least one node)".into()
        ));
    }
    let mut nodes: Vec<PlannedNode> = Vec::with_capacity(raw_nodes.len());
    for (i, rn) in raw_nodes.into_iter().enumerate() {
        let name = rn.name.map(|n| n.trim().to_string()).unwrap_or_default();
        let label = if name.is_empty() {
            format!("node #{}", i + 1)
        } else {
            format!("node '{name}'")
        };
        let nerr = |what: String| err(format!("{label}: {what}"));
        if name.is_empty() {
            return Err(nerr("missing `name`".into()));
        }
        if !valid_name(&name) {
            return Err(nerr(
                "`name` must be letters, digits, '.', '_', '-' (at most 64, not starting with '-')"
                    .into(),
            ));
        }
        if nodes.iter().any(|n| n.name == name) {
            return Err(nerr("duplicate node name".into()));
        }
        let host = rn.host.map(|h| h.trim().to_string()).unwrap_or_default();
        if host.is_empty() {
            return Err(nerr(
                "missing `host` (`local`, or an ssh destination like user@host)".into(),
            ));
        }
        let local = host == "local";
        let ssh_destination = if local {
            if rn.port.is_some() || rn.identity.is_some() {
                return Err(nerr("`port` and `identity` only apply to ssh nodes".into()));
            }
            None
        } else {
            Some(check_ssh_destination(&host).map_err(nerr)?)
        };
        if rn.port == Some(0) {
            return Err(nerr("`port` must be 1..65535".into()));
        }
        let ssh_identity = match rn.identity {
            Some(id) if id.trim().is_empty() => return Err(nerr("`identity` is empty".into())),
            Some(id) => Some(PathBuf::from(id.trim())),
            None => None,
        };
        let addr = match rn.ip {
            Some(ip) => {
                let ip = ip.trim().to_string();
                if !valid_addr(&ip) {
                    return Err(nerr(format!("`ip` '{ip}' is not an address")));
                }
                ip
            }
            None => match &ssh_destination {
                Some(dest) => ssh_host_part(dest).to_string(),
                None => "127.0.0.1".to_string(),
            },
        };
        let gpus = match &rn.accelerators {
            Some(acc) => GpuPlan::Declared(
                declared_gpus(
                    &acc.parse()
                        .map_err(|e| nerr(format!("accelerators: {e}")))?,
                ),
                "declared (config)",
            ),
            None if local => GpuPlan::Nvml,
            None => GpuPlan::RemoteUnknown,
        };
        let cpus = match &rn.cpus {
            Some(v) => Some(parse_cpus_value(v).map_err(|e| nerr(format!("cpus: {e}")))?),
            None => None,
        };
        nodes.push(PlannedNode {
            name,
            addr,
            local,
            gpus,
            cpus,
            ssh_destination,
            ssh_port: rn.port,
            ssh_identity,
        });
    }
    Ok(ParsedConfig {
        cluster_name,
        nodes,
    })
}

/// serde-saphyr's message without its multi-line source snippet:
/// `line 4 column 5: unknown field `gpus`, expected one of ...`.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    let msg = e.without_snippet().to_string();
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn check_ssh_destination(host: &str) -> Result<String, String> {
    if host.starts_with('-') {
        return Err(format!("`host` '{host}' must not start with '-'"));
    }
    if host.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`host` '{host}' contains whitespace"));
    }
    if ssh_host_part(host).is_empty() || host.starts_with('@') {
        return Err(format!(
            "`host` '{host}' is not an ssh destination (user@host)"
        ));
    }
    Ok(host.to_string())
}

fn ssh_host_part(dest: &str) -> &str {
    dest.rsplit_once('@').map_or(dest, |(_, h)| h)
}

fn valid_addr(a: &str) -> bool {
    !a.is_empty()
        && a.len() <= 255
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'%'))
}

// ---------------------------------------------------------------------------
// detect
// ---------------------------------------------------------------------------

/// Builds the inventory.
///
/// - `config`: a cluster file (YAML) or `None` for a single local node `head`
///   at `127.0.0.1`.
/// - `gpus_flag` (`--gpus`, e.g. `H100:4` or `H100:4,A100:2`, see
///   [`parse_gpus_flag`]): declared GPUs instead of asking NVML.
/// - `cpus_flag` (`--cpus`): CPUs instead of the machine's count.
///
/// With a cluster file, `gpus_flag` and `cpus_flag` override the values of the
/// FIRST node (the head) only.
///
/// The cluster name is `cluster_name` if given, else the file's
/// `cluster_name`, else the hostname, else `local`.
///
/// Cluster file format (unknown keys are errors):
/// ```yaml
/// cluster_name: mycluster      # optional
/// nodes:                       # required, at least one; the first is the head
///   - name: head               # required, unique, [A-Za-z0-9._-]+
///     host: local              # required: `local` or an ssh destination user@host
///     port: 22                 # optional, ssh nodes only
///     identity: /path/key      # optional, ssh nodes only
///     ip: 10.0.0.1             # optional; default 127.0.0.1 (local) or the host part
///     accelerators: {H100: 8}  # or "H100:8,A100:2", [H100:8], {} = none;
///                              # absent: NVML (local), none (ssh)
///     cpus: 32                 # optional; default: this machine's count (local),
///                              # `nproc` over ssh (ssh)
/// ```
/// At most one local node may take its GPUs from NVML when NVML finds GPUs
/// (two would claim the same devices); give other local nodes `accelerators`.
pub fn detect(
    config: Option<&Path>,
    gpus_flag: Option<&str>,
    cpus_flag: Option<Milli>,
    cluster_name: Option<&str>,
) -> Result<Inventory, InventoryError> {
    detect_on(&ThisMachine, config, gpus_flag, cpus_flag, cluster_name)
}

fn detect_on(
    machine: &dyn Machine,
    config: Option<&Path>,
    gpus_flag: Option<&str>,
    cpus_flag: Option<Milli>,
    cluster_name: Option<&str>,
) -> Result<Inventory, InventoryError> {
    let flag_gpus = match gpus_flag {
        Some(s) => Some(declared_gpus(
            &parse_gpus_flag(s).map_err(|e| invalid(format!("--gpus: {e}")))?,
        )),
        None => None,
    };
    if cpus_flag == Some(Milli::ZERO) {
        return Err(invalid("--cpus: must be greater than 0"));
    }
    let explicit_name = match cluster_name {
        Some(c) => {
            let c = c.trim();
            if !valid_name(c) {
                return Err(invalid(format!(
                    "cluster name '{c}' is not valid (letters, digits, '.', '_', '-'; at most 64)"
                )));
            }
            Some(c.to_string())
        }
        None => None,
    };

    let parsed = match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| invalid(format!("{}: cannot read: {e}", path.display())))?;
            parse_config(path, &text)?
        }
        None => ParsedConfig {
            cluster_name: None,
            nodes: vec![PlannedNode {
                name: "head".into(),
                addr: "127.0.0.1".into(),
                local: true,
                gpus: GpuPlan::Nvml,
                cpus: None,
                ssh_destination: None,
                ssh_port: None,
                ssh_identity: None,
            }],
        },
    };
    let mut planned = parsed.nodes;
    if let Some(first) = planned.first_mut() {
        if let Some(g) = flag_gpus {
            first.gpus = GpuPlan::Declared(g, "declared (--gpus)");
        }
        if let Some(c) = cpus_flag {
            first.cpus = Some(c);
        }
    }

    let mut nvml: Option<Result<NvmlProbe, String>> = None;
    let mut nvml_owner: Option<String> = None;
    let mut nodes = Vec::with_capacity(planned.len());
    for p in planned {
        let gpus_to_probe = matches!(p.gpus, GpuPlan::RemoteUnknown);
        let (gpus, gpu_source) = match p.gpus {
            GpuPlan::Declared(g, src) => (g, src.to_string()),
            GpuPlan::RemoteUnknown => (Vec::new(), GPUS_NOT_PROBED.to_string()),
            GpuPlan::Nvml => match nvml.get_or_insert_with(|| machine.nvml()) {
                Err(e) => (Vec::new(), format!("none (NVML unavailable: {e})")),
                Ok(probe) => {
                    if !probe.gpus.is_empty() {
                        if let Some(owner) = &nvml_owner {
                            return Err(invalid(format!(
                                "{}: nodes '{owner}' and '{}' are both local without \
                                 `accelerators`, so both would claim the same {} NVML GPU(s); \
                                 declare `accelerators` (e.g. {{}} for none) for virtual nodes",
                                config.map(|c| c.display().to_string()).unwrap_or_default(),
                                p.name,
                                probe.gpus.len()
                            )));
                        }
                        nvml_owner = Some(p.name.clone());
                    }
                    let mut src = "nvml".to_string();
                    if !probe.skipped.is_empty() {
                        src = format!("nvml (skipped {})", probe.skipped.join("; "));
                    }
                    (probe.gpus.clone(), src)
                }
            },
        };
        let (cpus, cpus_to_probe) = match p.cpus {
            Some(c) => (c, false),
            None if p.local => (machine.cpus(), false),
            None => (Milli::ZERO, true),
        };
        nodes.push(Node {
            name: p.name,
            addr: p.addr,
            local: p.local,
            gpus,
            cpus,
            cpus_to_probe,
            gpus_to_probe,
            gpu_source,
            ssh_destination: p.ssh_destination,
            ssh_port: p.ssh_port,
            ssh_identity: p.ssh_identity,
            down: None,
        });
    }

    let cluster_name = explicit_name
        .or(parsed.cluster_name)
        .or_else(|| machine.hostname())
        .unwrap_or_else(|| "local".to_string());
    Ok(Inventory {
        cluster_name,
        nodes,
    })
}

// ---------------------------------------------------------------------------
// Views for the scheduler and the spool.
// ---------------------------------------------------------------------------

impl Inventory {
    /// An inventory as the daemon wrote it to `nodes.json`, from this version or an earlier
    /// one: a daemon from before `gpus_to_probe` marked an unprobed ssh node only by its
    /// `gpu_source`, and `skyspool check` would otherwise take that node for one with no
    /// GPU while the old daemon still serves the spool.
    pub fn from_nodes_json(bytes: &[u8]) -> serde_json::Result<Inventory> {
        let mut inv: Inventory = serde_json::from_slice(bytes)?;
        for n in &mut inv.nodes {
            if n.gpus.is_empty() && n.gpu_source == GPUS_NOT_PROBED {
                n.gpus_to_probe = true;
            }
        }
        Ok(inv)
    }

    /// The scheduler's view: one [`NodeCapacity`] per node, in node order.
    pub fn capacities(&self) -> Vec<NodeCapacity> {
        self.nodes.iter().map(Node::capacity).collect()
    }

    /// The node called `name`, with its position (its scheduler index).
    pub fn node(&self, name: &str) -> Option<(usize, &Node)> {
        self.nodes.iter().enumerate().find(|(_, n)| n.name == name)
    }

    pub fn total_gpus(&self) -> usize {
        self.nodes.iter().map(|n| n.gpus.len()).sum()
    }

    /// Text of the spool's `nodes` file: a header line, a table with one row
    /// per node, then one line per NVML-detected GPU. `usage[i]` belongs to
    /// `nodes[i]`; missing entries count as zero.
    pub fn render_nodes(&self, usage: &[NodeUsage]) -> String {
        let empty = NodeUsage::default();
        let mut out = format!(
            "cluster: {}  ({} {}, {} {})\n",
            self.cluster_name,
            self.nodes.len(),
            plural(self.nodes.len(), "node", "nodes"),
            self.total_gpus(),
            plural(self.total_gpus(), "GPU", "GPUs"),
        );
        let mut rows = Vec::with_capacity(self.nodes.len());
        for (i, node) in self.nodes.iter().enumerate() {
            let u = usage.get(i).unwrap_or(&empty);
            let gpu_usage = if node.gpus.is_empty() {
                "-".to_string()
            } else {
                node.gpus
                    .iter()
                    .map(|g| {
                        let used = u
                            .gpu_used
                            .iter()
                            .filter(|(idx, _)| *idx == g.index)
                            .fold(Milli::ZERO, |a, (_, m)| a + *m);
                        format!("{}:{}", g.index, used)
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            rows.push(vec![
                node.name.clone(),
                node.addr.clone(),
                gpu_summary(&node.gpus),
                gpu_usage,
                format!("{}/{}", u.cpus_used, node.cpus),
                u.jobs.to_string(),
                match &node.down {
                    None => "up".to_string(),
                    Some(why) => format!("DOWN ({why})"),
                },
                node.gpu_source.clone(),
            ]);
        }
        out.push_str(&plain_table(
            &[
                "NODE",
                "ADDRESS",
                "GPUS",
                "GPU USAGE",
                "CPUS",
                "JOBS",
                "STATE",
                "SOURCE",
            ],
            rows,
        ));

        let detailed: Vec<Vec<String>> = self
            .nodes
            .iter()
            .flat_map(|n| {
                n.gpus
                    .iter()
                    .filter(|g| g.uuid.is_some() || g.memory_mib.is_some())
                    .map(move |g| {
                        vec![
                            n.name.clone(),
                            g.index.to_string(),
                            g.kind.clone(),
                            g.uuid.clone().unwrap_or_else(|| "-".into()),
                            g.memory_mib
                                .map(|m| format!("{m} MiB"))
                                .unwrap_or_else(|| "-".into()),
                        ]
                    })
            })
            .collect();
        if !detailed.is_empty() {
            out.push('\n');
            out.push_str(&plain_table(
                &["NODE", "GPU", "KIND", "UUID", "MEMORY"],
                detailed,
            ));
        }
        out
    }
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// `4x H100`, `4x H100, 2x A100`, or `-`.
fn gpu_summary(gpus: &[GpuInfo]) -> String {
    let mut groups: Vec<(&str, usize)> = Vec::new();
    for g in gpus {
        match groups.iter_mut().find(|(k, _)| *k == g.kind) {
            Some((_, n)) => *n += 1,
            None => groups.push((&g.kind, 1)),
        }
    }
    if groups.is_empty() {
        return "-".into();
    }
    groups
        .iter()
        .map(|(k, n)| format!("{n}x {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Borderless table, columns separated by two spaces, no trailing blanks.
fn plain_table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut table = comfy_table::Table::new();
    table
        .load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .force_no_tty()
        .set_header(header.to_vec());
    for row in rows {
        // One line per node, whatever a reason holds (ssh's stderr can be several lines):
        // `grep '^w2 ' nodes` finds the whole row.
        table.add_row(
            row.into_iter()
                .map(|cell| cell.split_whitespace().collect::<Vec<_>>().join(" ")),
        );
    }
    for column in table.column_iter_mut() {
        column.set_padding((0, 2));
    }
    let mut out = String::new();
    for line in table.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct FakeMachine {
        nvml: Result<NvmlProbe, String>,
        cpus: Milli,
        hostname: Option<String>,
    }

    impl Machine for FakeMachine {
        fn nvml(&self) -> Result<NvmlProbe, String> {
            self.nvml.clone()
        }
        fn cpus(&self) -> Milli {
            self.cpus
        }
        fn hostname(&self) -> Option<String> {
            self.hostname.clone()
        }
    }

    fn no_gpu_machine() -> FakeMachine {
        FakeMachine {
            nvml: Err("libnvidia-ml.so.1: cannot open".into()),
            cpus: Milli::from_units(16),
            hostname: Some("box1".into()),
        }
    }

    fn h100_machine(n: u32) -> FakeMachine {
        FakeMachine {
            nvml: Ok(NvmlProbe {
                gpus: (0..n)
                    .map(|i| GpuInfo {
                        index: i,
                        kind: "H100".into(),
                        uuid: Some(format!("GPU-{i:04}")),
                        memory_mib: Some(81559),
                    })
                    .collect(),
                skipped: vec![],
            }),
            cpus: Milli::from_units(64),
            hostname: Some("gpubox".into()),
        }
    }

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn detect_text(m: &FakeMachine, text: &str) -> Result<Inventory, String> {
        let f = write_config(text);
        detect_on(m, Some(f.path()), None, None, None).map_err(|e| e.to_string())
    }

    #[test]
    fn canonical_names() {
        let cases: &[(&str, Option<u64>, &str)] = &[
            ("NVIDIA H100 80GB HBM3", Some(81559), "H100"),
            ("NVIDIA H100 PCIe", None, "H100"),
            ("NVIDIA H100 NVL", None, "H100"),
            ("NVIDIA H200", None, "H200"),
            ("NVIDIA H200 NVL", None, "H200"),
            ("NVIDIA GH200 480GB", None, "GH200"),
            ("NVIDIA B200", None, "B200"),
            ("NVIDIA GB200", None, "GB200"),
            ("NVIDIA A100-SXM4-80GB", None, "A100-80GB"),
            ("NVIDIA A100 80GB PCIe", None, "A100-80GB"),
            ("NVIDIA A100-SXM4-40GB", Some(40960), "A100"),
            ("NVIDIA A100-PCIE-40GB", None, "A100"),
            ("NVIDIA A100", Some(81920), "A100-80GB"),
            ("NVIDIA A100", Some(40960), "A100"),
            ("NVIDIA A10G", None, "A10G"),
            ("NVIDIA A10", None, "A10"),
            ("NVIDIA L4", None, "L4"),
            ("NVIDIA L40", None, "L40"),
            ("NVIDIA L40S", None, "L40S"),
            ("Tesla T4", None, "T4"),
            ("Tesla V100-SXM2-16GB", Some(16384), "V100"),
            ("Tesla V100-SXM2-32GB", None, "V100-32GB"),
            ("Tesla V100-PCIE", Some(32768), "V100-32GB"),
            ("Tesla P100-PCIE-16GB", None, "P100"),
            ("Tesla K80", None, "K80"),
            ("Tesla M60", None, "M60"),
            ("Quadro P4000", None, "P4000"),
            ("NVIDIA RTX A6000", None, "A6000"),
            ("NVIDIA RTX 6000 Ada Generation", None, "RTX6000-Ada"),
            ("NVIDIA GeForce RTX 4090", None, "RTX4090"),
            ("NVIDIA GeForce RTX 3090", None, "RTX3090"),
            ("NVIDIA GeForce RTX 3090 Ti", None, "RTX3090-Ti"),
            // Unknown: prefix stripped, spaces -> '-'.
            ("NVIDIA H800", None, "H800"),
            ("Tesla V100S-PCIE-32GB", None, "V100S-PCIE-32GB"),
            ("NVIDIA Foo Bar  X", None, "Foo-Bar-X"),
            ("Weird (GPU) #1", None, "Weird-GPU-1"),
            ("", None, "GPU"),
            ("NVIDIÄ Ω", None, "NVIDI"),
            ("ÄÄÄÄÄÄÄ", None, "GPU"),
            ("RTX Ä", None, "RTX"),
        ];
        for (name, mem, want) in cases {
            assert_eq!(canonical_gpu_name(name, *mem), *want, "{name} {mem:?}");
        }
    }

    #[test]
    fn gpus_flag() {
        assert_eq!(parse_gpus_flag("H100:4").unwrap(), vec![("H100".into(), 4)]);
        assert_eq!(parse_gpus_flag("H100").unwrap(), vec![("H100".into(), 1)]);
        assert_eq!(
            parse_gpus_flag(" H100:4 , A100:2").unwrap(),
            vec![("H100".into(), 4), ("A100".into(), 2)]
        );
        assert_eq!(parse_gpus_flag("none").unwrap(), vec![]);
        for bad in [
            "",
            "H100:0",
            "H100:0.5",
            "H100:-1",
            "H100:x",
            ":4",
            "H100:4,",
            "H 100:1",
            "H100:4,h100:1",
            "H100:5000",
            "H100:1000,A100:1000",
        ] {
            assert!(parse_gpus_flag(bad).is_err(), "{bad:?}");
        }
        let e = parse_gpus_flag("H100:0.5").unwrap_err().to_string();
        assert!(e.contains("whole number"), "{e}");
    }

    #[test]
    fn no_config_uses_nvml_or_flags() {
        let inv = detect_on(&h100_machine(2), None, None, None, None).unwrap();
        assert_eq!(inv.cluster_name, "gpubox");
        assert_eq!(inv.nodes.len(), 1);
        let n = &inv.nodes[0];
        assert_eq!(
            (n.name.as_str(), n.addr.as_str(), n.local),
            ("head", "127.0.0.1", true)
        );
        assert_eq!(n.gpus.len(), 2);
        assert_eq!(n.gpu_source, "nvml");
        assert_eq!(n.cpus, Milli::from_units(64));

        let inv = detect_on(&no_gpu_machine(), None, None, None, None).unwrap();
        assert!(inv.nodes[0].gpus.is_empty());
        assert_eq!(
            inv.nodes[0].gpu_source,
            "none (NVML unavailable: libnvidia-ml.so.1: cannot open)"
        );

        let inv = detect_on(
            &no_gpu_machine(),
            None,
            Some("H100:2,A100:1"),
            Some(Milli(2500)),
            Some("c1"),
        )
        .unwrap();
        assert_eq!(inv.cluster_name, "c1");
        let n = &inv.nodes[0];
        assert_eq!(n.gpu_source, "declared (--gpus)");
        assert_eq!(n.cpus, Milli(2500));
        let kinds: Vec<(u32, &str)> = n.gpus.iter().map(|g| (g.index, g.kind.as_str())).collect();
        assert_eq!(kinds, vec![(0, "H100"), (1, "H100"), (2, "A100")]);

        let mut m = no_gpu_machine();
        m.hostname = None;
        assert_eq!(
            detect_on(&m, None, None, None, None).unwrap().cluster_name,
            "local"
        );
        assert!(detect_on(&m, None, Some("H100:0"), None, None).is_err());
        assert!(detect_on(&m, None, None, Some(Milli::ZERO), None).is_err());
        assert!(detect_on(&m, None, None, None, Some("bad name")).is_err());
    }

    /// A probe that could not find out (ssh failed, a hung `nvidia-smi`, `nproc` printing
    /// no count) leaves the node to be asked again, with no job until then; one that did
    /// find out is final, "no GPU" included.
    #[test]
    fn a_failed_probe_is_asked_again_and_a_found_answer_is_kept() {
        let text = "nodes:\n  - name: head\n    host: local\n  - name: w\n    host: 10.0.0.9\n";
        let inv = detect_text(&no_gpu_machine(), text).unwrap();
        let mut w = inv.nodes[1].clone();
        assert_eq!(w.wants_probe(), (true, true));
        assert!(w.capacity().unknown);
        assert_eq!(inv.nodes[0].wants_probe(), (false, false));

        w.take_probe(&NodeProbe {
            gpus: Some(Err("ssh timed out after 20s".into())),
            cpus: Some(Err("ssh 10.0.0.9 exited with 255: refused".into())),
        });
        assert_eq!(w.wants_probe(), (true, true));
        assert!(w.capacity().unknown, "no job before it is known");
        assert_eq!(
            w.gpu_source,
            "none (remote node: not probed yet: ssh timed out after 20s)"
        );

        w.take_probe(&NodeProbe {
            gpus: Some(Ok(vec![])),
            cpus: Some(Err("nproc printed \"\"".into())),
        });
        assert_eq!(w.wants_probe(), (false, true));
        assert!(w.capacity().unknown);
        assert_eq!(w.gpu_source, "none (nvidia-smi found no GPU)");

        // Asked for the CPUs only now; the GPUs found stay.
        w.take_probe(&NodeProbe {
            gpus: None,
            cpus: Some(Ok(Milli::from_units(16))),
        });
        assert_eq!(w.wants_probe(), (false, false));
        assert!(!w.capacity().unknown);
        assert_eq!(w.cpus, Milli::from_units(16));
        assert_eq!(w.gpu_source, "none (nvidia-smi found no GPU)");
    }

    /// `nodes.json` from a daemon before `gpus_to_probe`: its unprobed ssh node is still
    /// unknown (may hold a GPU job), not a node without GPUs.
    #[test]
    fn nodes_json_of_an_earlier_daemon_keeps_an_unprobed_node_unknown() {
        let text = "nodes:\n  - name: head\n    host: local\n  - name: w\n    host: 10.0.0.9\n    cpus: 8\n";
        let inv = detect_text(&no_gpu_machine(), text).unwrap();
        let mut old = serde_json::to_value(&inv).unwrap();
        for n in old["nodes"].as_array_mut().unwrap() {
            n.as_object_mut().unwrap().remove("gpus_to_probe");
        }
        let bytes = serde_json::to_vec(&old).unwrap();
        let plain: Inventory = serde_json::from_slice(&bytes).unwrap();
        assert!(
            !plain.nodes[1].capacity().unknown,
            "the old file as it reads plainly"
        );
        let read = Inventory::from_nodes_json(&bytes).unwrap();
        assert_eq!(read, inv);
        assert!(read.nodes[1].capacity().unknown);
        assert!(!read.nodes[0].capacity().unknown);
        // A node whose probe found no GPU stays known.
        let mut probed = inv.clone();
        probed.nodes[1].take_probe(&NodeProbe {
            gpus: Some(Ok(vec![])),
            cpus: None,
        });
        let bytes = serde_json::to_vec(&probed).unwrap();
        assert!(
            !Inventory::from_nodes_json(&bytes).unwrap().nodes[1]
                .capacity()
                .unknown
        );
    }

    #[test]
    fn good_config() {
        let text = r#"
cluster_name: mycluster
nodes:
  - name: head
    host: local
    accelerators: {H100: 2, A100: 1}
    cpus: 32
  - name: virt.1
    host: local
    accelerators: "T4:2"
    cpus: 0.5
  - name: w2
    host: ubuntu@10.0.0.2
    port: 2222
    identity: /keys/id
    cpus: "8"
  - name: w3
    host: gpu3.example
    ip: 10.0.0.3
    accelerators: [L4:4]
"#;
        let inv = detect_text(&no_gpu_machine(), text).unwrap();
        assert_eq!(inv.cluster_name, "mycluster");
        let names: Vec<&str> = inv.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["head", "virt.1", "w2", "w3"]);
        let head = &inv.nodes[0];
        let kinds: Vec<&str> = head.gpus.iter().map(|g| g.kind.as_str()).collect();
        assert_eq!(kinds, ["H100", "H100", "A100"]);
        assert_eq!(head.gpu_source, "declared (config)");
        assert_eq!(head.cpus, Milli::from_units(32));
        assert_eq!(inv.nodes[1].cpus, Milli(500));
        assert_eq!(inv.nodes[1].addr, "127.0.0.1");
        let w2 = &inv.nodes[2];
        assert!(!w2.local);
        assert_eq!(w2.addr, "10.0.0.2");
        assert_eq!(w2.ssh_destination.as_deref(), Some("ubuntu@10.0.0.2"));
        assert_eq!(w2.ssh_port, Some(2222));
        assert_eq!(w2.ssh_identity, Some(PathBuf::from("/keys/id")));
        assert!(w2.gpus.is_empty());
        assert_eq!(w2.gpu_source, "none (remote node: not probed)");
        assert_eq!(w2.cpus, Milli::from_units(8));
        assert!(!w2.cpus_to_probe);
        let w3 = &inv.nodes[3];
        assert_eq!(w3.addr, "10.0.0.3");
        assert_eq!(w3.gpus.len(), 4);
        // An ssh node without `cpus` has them counted when the daemon starts.
        assert_eq!((w3.cpus, w3.cpus_to_probe), (Milli::ZERO, true));
        assert!(inv.nodes[..3].iter().all(|n| !n.cpus_to_probe));

        let caps = inv.capacities();
        assert_eq!(caps.len(), 4);
        assert_eq!(
            caps[0].gpus[2],
            GpuSlot {
                index: 2,
                kind: "A100".into()
            }
        );
        assert!(caps.iter().all(|c| c.available));
        assert_eq!(caps[1].cpus, Milli(500));
    }

    #[test]
    fn config_defaults_and_overrides() {
        let text = "nodes:\n  - name: a\n    host: local\n  - name: b\n    host: local\n    accelerators: {}\n";
        // No cluster_name: hostname; the first local node gets NVML GPUs.
        let inv = detect_text(&h100_machine(4), text).unwrap();
        assert_eq!(inv.cluster_name, "gpubox");
        assert_eq!(inv.nodes[0].gpus.len(), 4);
        assert_eq!(inv.nodes[0].cpus, Milli::from_units(64));
        assert!(inv.nodes[1].gpus.is_empty());
        assert_eq!(inv.nodes[1].gpu_source, "declared (config)");

        // Flags override the first node only; the explicit name wins.
        let f = write_config(text);
        let inv = detect_on(
            &h100_machine(4),
            Some(f.path()),
            Some("T4:1"),
            Some(Milli::from_units(3)),
            Some("explicit"),
        )
        .unwrap();
        assert_eq!(inv.cluster_name, "explicit");
        assert_eq!(inv.nodes[0].gpu_source, "declared (--gpus)");
        assert_eq!(inv.nodes[0].gpus.len(), 1);
        assert_eq!(inv.nodes[0].cpus, Milli::from_units(3));
        assert_eq!(inv.nodes[1].cpus, Milli::from_units(64));

        // Two local nodes both on NVML would double-book the GPUs.
        let two = "nodes:\n  - name: a\n    host: local\n  - name: b\n    host: local\n";
        let e = detect_text(&h100_machine(4), two).unwrap_err();
        assert!(e.contains("'a' and 'b'"), "{e}");
        // ...but not when NVML finds nothing.
        assert!(detect_text(&no_gpu_machine(), two).is_ok());
    }

    #[test]
    fn config_errors() {
        let m = no_gpu_machine();
        let cases: &[(&str, &str)] = &[
            ("nodes:\n  - name: a\n    host: local\n    gpus: 4\n", "gpus"),
            ("nodez: []\n", "nodez"),
            (
                "nodes:\n  - name: a\n    host: local\n  - name: a\n    host: local\n    accelerators: {}\n",
                "duplicate node name",
            ),
            ("nodes:\n  - name: a\n    host: local\n    accelerators: {H100: 0.5}\n", "whole number"),
            ("nodes:\n  - name: a\n    host: local\n    accelerators: {H100: 0}\n", "at least 1"),
            ("nodes:\n  - name: a\n    host: local\n    accelerators: \"H100:x\"\n", "accelerators"),
            ("nodes:\n  - name: a\n    host: local\n    accelerators: 4\n", "H100"),
            ("nodes:\n  - name: a\n    host: local\n    accelerators: {H100: [1]}\n", "GPU count"),
            ("nodes:\n  - name: a b\n    host: local\n", "`name`"),
            ("nodes:\n  - name: ..\n    host: local\n", "`name`"),
            ("nodes:\n  - host: local\n", "missing `name`"),
            ("nodes:\n  - name: a\n", "missing `host`"),
            ("nodes:\n  - name: a\n    host: local\n    port: 22\n", "ssh nodes"),
            ("nodes:\n  - name: a\n    host: -oProxyCommand=x\n    cpus: 1\n", "must not start"),
            ("nodes:\n  - name: a\n    host: local\n    cpus: 0\n", "cpus"),
            ("nodes:\n  - name: a\n    host: local\n    ip: \"1.2.3.4, 5\"\n", "`ip`"),
            ("nodes: []\n", "missing or empty"),
            ("cluster_name: x\n", "missing or empty"),
            ("", "empty"),
            ("nodes: [\n", ""),
            (
                "nodes:\n  - name: a\n    host: local\n    cpus: 1\n    cpus: 2\n",
                "uplicate",
            ),
            (
                "nodes:\n  - name: a\n    host: local\n    accelerators: {H100: 1, H100: 2}\n",
                "uplicate",
            ),
            (
                "cluster_name: \"a/b\"\nnodes:\n  - name: a\n    host: local\n",
                "cluster_name",
            ),
        ];
        for (text, needle) in cases {
            let f = write_config(text);
            let e = detect_on(&m, Some(f.path()), None, None, None)
                .expect_err(text)
                .to_string();
            let file = f.path().display().to_string();
            assert!(e.starts_with(&file), "{text:?}: {e}");
            assert!(e.contains(needle), "{text:?}: {e}");
            assert!(!e.contains('\n'), "{text:?}: {e}");
        }
        let missing = detect_on(&m, Some(Path::new("/nonexistent/c.yaml")), None, None, None)
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("/nonexistent/c.yaml: cannot read"),
            "{missing}"
        );
    }

    #[test]
    fn real_machine_never_panics() {
        // Whatever this machine has (driver or not), detection succeeds.
        let inv = detect(None, None, None, None).unwrap();
        assert_eq!(inv.nodes.len(), 1);
        assert!(inv.nodes[0].cpus >= Milli::ONE);
        assert!(!inv.nodes[0].gpu_source.is_empty());
        let inv = detect(None, Some("H100:4"), None, Some("t")).unwrap();
        assert_eq!(inv.nodes[0].gpus.len(), 4);
        assert_eq!(inv.cluster_name, "t");
    }

    #[test]
    fn render_is_deterministic() {
        let inv = Inventory {
            cluster_name: "demo".into(),
            nodes: vec![
                Node {
                    name: "head".into(),
                    addr: "127.0.0.1".into(),
                    local: true,
                    gpus: (0..4)
                        .map(|i| GpuInfo {
                            index: i,
                            kind: "H100".into(),
                            uuid: Some(format!("GPU-{i}")),
                            memory_mib: Some(81559),
                        })
                        .collect(),
                    cpus: Milli::from_units(16),
                    cpus_to_probe: false,
                    gpus_to_probe: false,
                    gpu_source: "nvml".into(),
                    ssh_destination: None,
                    ssh_port: None,
                    ssh_identity: None,
                    down: None,
                },
                Node {
                    name: "w1".into(),
                    addr: "10.0.0.2".into(),
                    local: false,
                    gpus: declared_gpus(&[("T4".into(), 1), ("L4".into(), 1)]),
                    cpus: Milli::from_units(8),
                    cpus_to_probe: false,
                    gpus_to_probe: false,
                    gpu_source: "declared (config)".into(),
                    ssh_destination: Some("u@10.0.0.2".into()),
                    ssh_port: None,
                    ssh_identity: None,
                    down: None,
                },
                Node {
                    name: "cpu".into(),
                    addr: "127.0.0.1".into(),
                    local: true,
                    gpus: vec![],
                    cpus: Milli(2500),
                    cpus_to_probe: false,
                    gpus_to_probe: false,
                    gpu_source: "none (NVML unavailable: x)".into(),
                    ssh_destination: None,
                    ssh_port: None,
                    ssh_identity: None,
                    down: None,
                },
            ],
        };
        let usage = vec![NodeUsage {
            gpu_used: vec![(0, Milli(1000)), (1, Milli(250)), (1, Milli(250))],
            cpus_used: Milli(1500),
            jobs: 2,
        }];
        let text = inv.render_nodes(&usage);
        let want = "\
cluster: demo  (3 nodes, 6 GPUs)
NODE  ADDRESS    GPUS          GPU USAGE          CPUS    JOBS  STATE  SOURCE
head  127.0.0.1  4x H100       0:1 1:0.5 2:0 3:0  1.5/16  2     up     nvml
w1    10.0.0.2   1x T4, 1x L4  0:0 1:0            0/8     0     up     declared (config)
cpu   127.0.0.1  -             -                  0/2.5   0     up     none (NVML unavailable: x)

NODE  GPU  KIND  UUID   MEMORY
head  0    H100  GPU-0  81559 MiB
head  1    H100  GPU-1  81559 MiB
head  2    H100  GPU-2  81559 MiB
head  3    H100  GPU-3  81559 MiB
";
        assert_eq!(text, want, "\n{text}");
        assert_eq!(inv.render_nodes(&usage), text);

        // No NVML GPUs: no GPU detail block.
        let mut small = inv.clone();
        small.nodes.remove(0);
        assert!(!small.render_nodes(&[]).contains("UUID"));

        // A reason of several lines (ssh's stderr) stays on its node's row.
        small.nodes[0].down = Some("unreachable: ssh exited with 255: warning\n  refused".into());
        small.nodes[1].gpu_source = "none (remote node: not probed yet: a\nb)".into();
        let text = small.render_nodes(&[]);
        let rows: Vec<&str> = text.lines().skip(2).collect();
        assert_eq!(rows.len(), 2, "\n{text}");
        assert!(
            rows[0].starts_with("w1 ") && rows[0].ends_with("warning refused)  declared (config)"),
            "\n{text}"
        );
        assert!(rows[1].ends_with("not probed yet: a b)"), "\n{text}");
    }
}
