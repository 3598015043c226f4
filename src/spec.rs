//! SkyPilot task YAML: parse and validate.
//!
//! [`parse`] turns the text of a SkyPilot task YAML into a [`JobSpec`]. It accepts the
//! forms real SkyPilot YAMLs use (`accelerators: H100:4`, `{A100:1, V100:1}`, `[V100, A100:2]`,
//! `resources.any_of`, `cpus: 4+`, `envs` with numbers, `secrets`, ...) and rejects everything
//! else with a [`SpecError`] that names the file, the line and column where one is known,
//! the key path (`resources.accelerators`) and what would be valid there.
//!
//! Parsing is hardened against hostile input: the text is capped at [`MAX_SPEC_BYTES`] before
//! the parser sees it, NUL and other control characters are refused, and serde-saphyr's budget
//! (nesting depth, events, nodes, aliases, anchors, documents) and alias-replay limits stop alias
//! bombs and deeply nested documents early, with an error instead of a stack overflow or a hang.
//!
//! The YAML is first read into a small loosely typed tree ([`Node`]) that keeps the line and
//! column of every key and value (through [`serde_saphyr::Spanned`]), then validated by hand,
//! so every validation error can point at the offending line. `tree` holds that tree, `envs`
//! the `envs`/`secrets`/`file_mounts` parts, `resources` the `resources` part.

use crate::resources::{AccelDemand, Demand, Milli, NodeDemand, DEFAULT_JOB_CPUS};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Serialize;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

mod envs;
mod resources;
mod tree;
use envs::*;
use resources::*;
use tree::*;

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
#[error("{}{}: {}", printable(origin), location(*line, *column), printable(message))]
pub struct SpecError {
    pub origin: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

/// A message as one printable line: control characters (from YAML escapes in keys or
/// values the user wrote) are shown escaped, so a reason can never forge log lines or send
/// terminal escapes.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}') {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// Public constants
// ---------------------------------------------------------------------------------------------

/// Largest task YAML accepted, checked before parsing (1 MiB).
pub const MAX_SPEC_BYTES: usize = 1 << 20;

/// Largest `num_nodes` accepted.
pub const MAX_NUM_NODES: u32 = 1024;

/// What a secret's value becomes in [`JobSpec::to_redacted_yaml`].
pub const REDACTED: &str = "<redacted>";

/// Top-level keys that skyspool reads.
pub const HANDLED_TASK_KEYS: &[&str] = &[
    "name",
    "workdir",
    "num_nodes",
    "resources",
    "envs",
    "secrets",
    "file_mounts",
    "setup",
    "run",
];

/// Other top-level keys of SkyPilot's task schema: accepted and ignored (they concern clouds,
/// services and pools that skyspool does not manage). They are not kept in the [`JobSpec`].
pub const IGNORED_TASK_KEYS: &[&str] = &[
    "event_callback",
    "service",
    "pool",
    "inputs",
    "outputs",
    "config",
    "volumes",
    "volume_mounts",
    "experimental",
    "managed_secrets",
    "file_mounts_mapping",
    "api_server_access",
    "_metadata",
];

/// The other keys of SkyPilot's `resources` schema: accepted and recorded in
/// [`ResourceSpec::other`] (they choose clouds and machines, which a fixed cluster has).
/// Keys starting with `_` (SkyPilot internals) are accepted too.
pub const OTHER_RESOURCE_KEYS: &[&str] = &[
    "infra",
    "cloud",
    "region",
    "zone",
    "instance_type",
    "accelerator_args",
    "use_spot",
    "spot_recovery",
    "job_recovery",
    "disk_size",
    "disk_tier",
    "network_tier",
    "ports",
    "labels",
    "image_id",
    "autostop",
    "priority",
    "volumes",
];

const RESOURCE_KEYS_FOR_HINTS: &[&str] = &[
    "accelerators",
    "cpus",
    "memory",
    "any_of",
    "ordered",
    "infra",
    "cloud",
    "region",
    "zone",
    "instance_type",
    "use_spot",
    "disk_size",
    "image_id",
];

/// The closest of `candidates` to `key` when it is a likely typo (edit distance <= 2).
fn suggest(key: &str, candidates: &[&'static str]) -> Option<&'static str> {
    candidates
        .iter()
        .map(|c| (edit_distance(&key.to_ascii_lowercase(), c), *c))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

/// Environment variable names SkyPilot accepts: `^[a-zA-Z_][a-zA-Z0-9_]*$`.
pub fn is_valid_env_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphabetic() || b == b'_' => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// SkyPilot task names: `[a-zA-Z0-9]+(?:[._-]{1,2}[a-zA-Z0-9]+)*` (the whole name).
pub fn is_valid_task_name(name: &str) -> bool {
    let b = name.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut separators = 0usize;
    for &c in b {
        if c.is_ascii_alphanumeric() {
            separators = 0;
        } else if matches!(c, b'.' | b'_' | b'-') {
            separators += 1;
            if separators > 2 {
                return false;
            }
        } else {
            return false;
        }
    }
    true
}

/// Accelerator names: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn is_valid_accelerator_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    match bytes.next() {
        Some(b) if b.is_ascii_alphanumeric() => {}
        _ => return false,
    }
    bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

/// Parses and validates a SkyPilot task YAML.
///
/// `origin` names the file in errors. `env_overrides` replace the values of names already
/// present in `envs` or `secrets` (they add no new names); they also fill in `null` values.
pub fn parse(
    text: &str,
    origin: &str,
    env_overrides: &BTreeMap<String, String>,
) -> Result<JobSpec, SpecError> {
    let cx = Cx { src: "", origin };
    if text.len() > MAX_SPEC_BYTES {
        return Err(cx.err_none(format!(
            "the file is {} bytes; a task YAML may be at most {} bytes (1 MiB)",
            text.len(),
            MAX_SPEC_BYTES
        )));
    }
    // A leading byte-order mark is harmless; drop it so byte offsets index `src`.
    let src = text.strip_prefix('\u{FEFF}').unwrap_or(text);
    let cx = Cx { src, origin };
    check_characters(&cx)?;
    let root = read_tree(&cx)?;
    build_spec(&cx, &root, env_overrides)
}

/// [`parse`] for raw bytes: rejects invalid UTF-8 with the position of the first bad byte.
pub fn parse_bytes(
    bytes: &[u8],
    origin: &str,
    env_overrides: &BTreeMap<String, String>,
) -> Result<JobSpec, SpecError> {
    let cx = Cx { src: "", origin };
    if bytes.len() > MAX_SPEC_BYTES {
        return Err(cx.err_none(format!(
            "the file is {} bytes; a task YAML may be at most {} bytes (1 MiB)",
            bytes.len(),
            MAX_SPEC_BYTES
        )));
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(text, origin, env_overrides),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            // The prefix is valid UTF-8 by construction; fall back to counting bytes otherwise.
            let prefix = std::str::from_utf8(valid).unwrap_or("");
            let (line, column) = line_col_of(prefix, prefix.len());
            Err(SpecError {
                origin: origin.to_string(),
                line: Some(line),
                column: Some(column),
                message: format!(
                    "the file is not valid UTF-8 text (bad byte 0x{:02x} at offset {}); \
                     a task YAML must be a UTF-8 text file",
                    bytes.get(e.valid_up_to()).copied().unwrap_or(0),
                    e.valid_up_to()
                ),
            })
        }
    }
}

/// Reads `path` (at most [`MAX_SPEC_BYTES`]) and parses it; errors name the path.
pub fn parse_file(
    path: &Path,
    env_overrides: &BTreeMap<String, String>,
) -> Result<JobSpec, SpecError> {
    let origin = path.display().to_string();
    let io_err = |e: std::io::Error| SpecError {
        origin: origin.clone(),
        line: None,
        column: None,
        message: format!("cannot read the task YAML: {e}"),
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_SPEC_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    parse_bytes(&bytes, &origin, env_overrides)
}

/// Parses a CLI accelerator flag such as `--gpus H100:4`, with the rules of the YAML string
/// form (`H100`, `H100:4`, `H100:0.5`). Several comma-separated alternatives
/// (`V100,A100:2`) are accepted too, in order of preference.
pub fn parse_accelerators_arg(s: &str) -> Result<Vec<AccelDemand>, String> {
    let mut out: Vec<AccelDemand> = Vec::new();
    if s.trim().is_empty() {
        return Err(format!("empty accelerator spec; {}", ACCEL_FORMS_HINT));
    }
    for part in s.split(',') {
        let a = parse_accel_str(part)?;
        push_unique(&mut out, a);
    }
    Ok(out)
}

impl JobSpec {
    /// The demand the scheduler places: `num_nodes` nodes, each with one of the accelerator
    /// alternatives free (in the user's order) and `cpus` (SkyPilot's 0.5 by default).
    pub fn demand(&self) -> Demand {
        Demand {
            num_nodes: self.num_nodes,
            per_node: NodeDemand {
                accelerators: self.resources.accelerators.clone(),
                cpus: self.resources.cpus.unwrap_or(DEFAULT_JOB_CPUS),
            },
        }
    }

    /// The `sky queue` RESOURCES column, e.g. `1x[H100:4]` or `1x[CPU:0.5]`.
    pub fn resources_display(&self) -> String {
        self.demand().display_resources(self.resources.cpus_plus)
    }

    /// A YAML text of the spec in which every secret value is `<redacted>`.
    ///
    /// Parsing it back with [`parse`] (no overrides) gives the same spec except the secret
    /// values. Known limits: top-level keys skyspool ignores (`service`, `config`, ...) are not
    /// part of the spec and so are not written; `$VAR` references were already substituted, so
    /// an env value that itself contains `$OTHER_ENV` would be substituted once more.
    pub fn to_redacted_yaml(&self) -> String {
        let doc = RedactedDoc::new(self);
        // No folding of long lines: the text must not grow past the size limit on the way.
        let options = serde_saphyr::ser_options! { folded_wrap_chars: usize::MAX / 4 };
        match serde_saphyr::to_string_with_options(&doc, options) {
            Ok(yaml) => yaml,
            // JSON is valid YAML, so this fallback still parses back (it never happens with
            // these plain types, but there is no reason to panic or to lose the redaction).
            Err(_) => serde_json::to_string_pretty(&doc).unwrap_or_default(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Errors and positions
// ---------------------------------------------------------------------------------------------

/// Validation context: the source text (for raw scalar spellings) and the origin.
struct Cx<'a> {
    src: &'a str,
    origin: &'a str,
}

impl Cx<'_> {
    fn err_none(&self, message: impl Into<String>) -> SpecError {
        SpecError {
            origin: self.origin.to_string(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    fn err_at(&self, line: usize, column: usize, message: impl Into<String>) -> SpecError {
        SpecError {
            origin: self.origin.to_string(),
            line: (line > 0).then_some(line),
            column: (line > 0 && column > 0).then_some(column),
            message: message.into(),
        }
    }

    fn err(&self, node: &Node, message: impl Into<String>) -> SpecError {
        self.err_at(node.line, node.col, message)
    }
}

/// 1-based line and column (in characters) of byte offset `at` in `text`, counting lines
/// the way YAML (and so the parser's own positions) does: `\r\n`, a lone `\r` and `\n`
/// each end a line.
fn line_col_of(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let before = text.get(..at).unwrap_or(text);
    let all = text.as_bytes();
    let line = all[..before.len()]
        .iter()
        .enumerate()
        .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && all.get(i + 1) != Some(&b'\n')))
        .count()
        + 1;
    let line_start = before.rfind(['\n', '\r']).map(|i| i + 1).unwrap_or(0);
    let column = before
        .get(line_start..)
        .map(|s| s.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

/// Refuses NUL and other control characters (the file is binary, or not YAML text).
fn check_characters(cx: &Cx<'_>) -> Result<(), SpecError> {
    for (i, c) in cx.src.char_indices() {
        let bad = c.is_control() && !matches!(c, '\t' | '\n' | '\r' | '\u{85}');
        if bad {
            let (line, col) = line_col_of(cx.src, i);
            let what = if c == '\0' {
                "a NUL byte: the file looks binary".to_string()
            } else {
                format!("the control character {:?}", c)
            };
            return Err(cx.err_at(
                line,
                col,
                format!("the file contains {what}; a task YAML must be UTF-8 text (tabs and newlines only)"),
            ));
        }
    }
    Ok(())
}

/// Makes untrusted text safe to show on one line, and bounded.
fn shown(s: &str) -> String {
    const MAX: usize = 80;
    let mut out: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Building the spec (from the tree of `tree`; `envs` and `resources` build their parts)
// ---------------------------------------------------------------------------------------------

fn build_spec(
    cx: &Cx<'_>,
    root: &Node,
    overrides: &BTreeMap<String, String>,
) -> Result<JobSpec, SpecError> {
    let Kind::Map(map) = &root.kind else {
        return Err(cx.err(root, "a task YAML must be a mapping"));
    };
    let fields = entries(cx, map, "")?;
    let mut get: BTreeMap<&str, (&Node, &Node)> = BTreeMap::new();
    for (key, k, v) in &fields {
        if HANDLED_TASK_KEYS.contains(&key.as_str()) {
            get.insert(key.as_str(), (*k, *v));
        } else if !IGNORED_TASK_KEYS.contains(&key.as_str()) {
            return Err(cx.err(k, unknown_key_message(key)));
        }
    }

    let (envs, secrets) =
        build_envs_and_secrets(cx, get.get("envs"), get.get("secrets"), overrides)?;

    let name = match get.get("name") {
        None => None,
        Some((_, v)) => match &v.kind {
            Kind::Null => None,
            Kind::Str(s) if is_valid_task_name(s) => Some(s.clone()),
            Kind::Str(s) => {
                return Err(cx.err(
                    v,
                    format!(
                        "name '{}' is not a valid task name: use letters and digits, separated by \
                         up to two of '.', '_' or '-' (e.g. my-task, train_v2.1)",
                        shown(s)
                    ),
                ))
            }
            other => {
                return Err(cx.err(
                    v,
                    format!(
                        "name must be a string such as my-task, not {} (quote it: name: \"{}\")",
                        other.describe(),
                        shown(&v.scalar_text(cx).unwrap_or_default())
                    ),
                ))
            }
        },
    };

    let workdir = match get.get("workdir") {
        None => None,
        Some((_, v)) => match &v.kind {
            Kind::Null => None,
            Kind::Str(s) if s.trim().is_empty() => {
                return Err(cx.err(v, "workdir is empty; give a directory such as `workdir: .`"))
            }
            Kind::Str(s) => {
                let w = substitute_envs(s, &envs);
                if w.contains('\0') {
                    return Err(cx.err(v, "workdir contains a NUL character"));
                }
                Some(w)
            }
            Kind::Map(_) => {
                return Err(cx.err(
                    v,
                    "workdir as a git repository ({url: ..., ref: ...}) is not supported by \
                     skyspool; give a local directory such as `workdir: .`",
                ))
            }
            other => {
                return Err(cx.err(
                    v,
                    format!(
                        "workdir must be a directory path such as `workdir: .`, not {}",
                        other.describe()
                    ),
                ))
            }
        },
    };

    let num_nodes = match get.get("num_nodes") {
        None => 1,
        Some((_, v)) => parse_num_nodes(cx, v)?,
    };

    let resources = match get.get("resources") {
        None => ResourceSpec::default_spec(),
        Some((_, v)) => parse_resources(cx, v)?,
    };

    let file_mounts = match get.get("file_mounts") {
        None => BTreeMap::new(),
        Some((_, v)) => parse_file_mounts(cx, v, &envs)?,
    };

    let setup = command_field(cx, &get, "setup")?;
    let run = command_field(cx, &get, "run")?;

    Ok(JobSpec {
        name,
        workdir,
        num_nodes,
        resources,
        envs,
        secrets,
        file_mounts,
        setup,
        run,
    })
}

impl ResourceSpec {
    fn default_spec() -> ResourceSpec {
        ResourceSpec {
            accelerators: Vec::new(),
            cpus: None,
            cpus_plus: false,
            memory: None,
            other: BTreeMap::new(),
        }
    }
}

fn unknown_key_message(key: &str) -> String {
    let mut valid: Vec<&str> = HANDLED_TASK_KEYS.to_vec();
    valid.extend(IGNORED_TASK_KEYS.iter().filter(|k| !k.starts_with('_')));
    let hint = valid
        .iter()
        .map(|v| (edit_distance(&key.to_ascii_lowercase(), v), *v))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, v)| format!(" (did you mean '{v}'?)"))
        .unwrap_or_default();
    format!(
        "unknown top-level key '{}'{hint}; valid keys are: {}",
        shown(key),
        valid.join(", ")
    )
}

fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().take(64).collect();
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

fn parse_num_nodes(cx: &Cx<'_>, v: &Node) -> Result<u32, SpecError> {
    let bad = |what: String| {
        cx.err(
            v,
            format!("num_nodes must be a positive whole number (1, 2, ... up to {MAX_NUM_NODES}), {what}"),
        )
    };
    match &v.kind {
        Kind::Null => Ok(1),
        Kind::Int(n) if *n <= 0 => Err(bad(format!("got {n}"))),
        Kind::Int(n) if *n > i128::from(MAX_NUM_NODES) => Err(cx.err(
            v,
            format!("num_nodes is {n}; skyspool supports at most {MAX_NUM_NODES} nodes per job"),
        )),
        Kind::Int(n) => u32::try_from(*n).map_err(|_| bad(format!("got {n}"))),
        other => Err(bad(format!(
            "not {} ({})",
            other.describe(),
            shown(&v.scalar_text(cx).unwrap_or_default())
        ))),
    }
}

fn command_field(
    cx: &Cx<'_>,
    get: &BTreeMap<&str, (&Node, &Node)>,
    key: &str,
) -> Result<Option<String>, SpecError> {
    let Some((_, v)) = get.get(key) else {
        return Ok(None);
    };
    match &v.kind {
        Kind::Null => Ok(None),
        Kind::Str(s) if s.contains('\0') => {
            Err(cx.err(v, format!("{key} contains a NUL character")))
        }
        Kind::Str(s) => Ok(Some(s.clone())),
        other => Err(cx.err(
            v,
            format!(
                "{key} must be a string of shell commands, not {}; write several commands as a \
                 block: `{key}: |` followed by indented lines",
                other.describe()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Redacted YAML
// ---------------------------------------------------------------------------------------------

#[derive(Serialize)]
struct RedactedDoc<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    workdir: Option<&'a str>,
    num_nodes: u32,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    resources: BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    envs: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    secrets: BTreeMap<&'a str, &'static str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    file_mounts: &'a BTreeMap<String, serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    setup: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    run: Option<&'a str>,
}

impl<'a> RedactedDoc<'a> {
    fn new(spec: &'a JobSpec) -> RedactedDoc<'a> {
        use serde_json::Value;
        let r = &spec.resources;
        let mut resources = r.other.clone();
        let has_alternatives =
            resources.contains_key("any_of") || resources.contains_key("ordered");
        resources.remove("accelerators");
        resources.remove("cpus");
        resources.remove("memory");
        if !has_alternatives {
            match r.accelerators.as_slice() {
                [] => {}
                [one] => {
                    resources.insert("accelerators".into(), Value::String(one.to_string()));
                }
                many => {
                    let list = many.iter().map(|a| Value::String(a.to_string())).collect();
                    resources.insert("accelerators".into(), Value::Array(list));
                }
            }
        }
        if let Some(c) = r.cpus {
            let text = format!("{c}{}", if r.cpus_plus { "+" } else { "" });
            resources.insert("cpus".into(), Value::String(text));
        }
        if let Some(m) = &r.memory {
            resources.insert("memory".into(), Value::String(m.clone()));
        }
        RedactedDoc {
            name: spec.name.as_deref(),
            workdir: spec.workdir.as_deref(),
            num_nodes: spec.num_nodes,
            resources,
            envs: &spec.envs,
            secrets: spec
                .secrets
                .keys()
                .map(|k| (k.as_str(), REDACTED))
                .collect(),
            file_mounts: &spec.file_mounts,
            setup: spec.setup.as_deref(),
            run: spec.run.as_deref(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    fn none() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn ok(yaml: &str) -> JobSpec {
        match parse(yaml, "task.yaml", &none()) {
            Ok(s) => s,
            Err(e) => panic!("expected {yaml:?} to parse, got: {e}"),
        }
    }

    fn err(yaml: &str) -> SpecError {
        match parse(yaml, "task.yaml", &none()) {
            Ok(s) => panic!("expected {yaml:?} to fail, got {s:?}"),
            Err(e) => {
                assert_eq!(e.origin, "task.yaml");
                e
            }
        }
    }

    fn err_has(yaml: &str, needles: &[&str]) -> SpecError {
        let e = err(yaml);
        for n in needles {
            assert!(
                e.message.contains(n),
                "{:?}: message {:?} lacks {:?}",
                yaml,
                e.message,
                n
            );
        }
        e
    }

    #[test]
    fn lines_are_counted_as_yaml_counts_them() {
        // `\r\n`, a lone `\r` and `\n` each end a line, as in the parser's own positions.
        assert_eq!(line_col_of("a\nb", 2), (2, 1));
        assert_eq!(line_col_of("a\r\nb", 3), (2, 1));
        assert_eq!(line_col_of("\r\ra", 2), (3, 1));
        assert_eq!(line_col_of("x\r\n", 1), (1, 2));
        assert_eq!(line_col_of("ab\rcd", 5), (2, 3));
        // The parser's error and ours agree on a file with old-Mac line ends.
        assert_eq!(err("\r\ra").line, Some(3));
        assert_eq!(err("run: a\r\rx: \u{1}").line, Some(3));
        assert_eq!(err("run: a\r\n\r\nx: \u{1}").line, Some(3));
    }

    fn a(kind: &str, milli: u64) -> AccelDemand {
        AccelDemand {
            kind: kind.into(),
            count: Milli(milli),
        }
    }

    fn accels(yaml: &str) -> Vec<AccelDemand> {
        ok(yaml).resources.accelerators
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FULL: &str = r#"# Fine-tune a model on one node with 4 H100s.
name: llama-finetune.v2

workdir: .   # synced to the node

num_nodes: 1

resources:
  accelerators: H100:4
  cpus: 16+
  memory: 64GB+
  use_spot: false
  disk_size: 512
  ports: [8080, "9000-9010"]
  labels:
    team: ml
  cloud: aws

envs:
  MODEL: meta-llama/Llama-3-8B
  EPOCHS: 3
  LR: 1.5e-4
  RATIO: 1.0
  DEBUG: true
  DATA_DIR: /data/${MODEL}
  EMPTY: ""

secrets:
  HF_TOKEN: hf_abc123

file_mounts:
  /data/$MODEL: ./data
  ~/.cache/${MODEL}/ckpt:
    source: s3://bucket/$MODEL
    mode: COPY
  /unknown: $NOT_AN_ENV/x

setup: |
  pip install -r requirements.txt
  echo "setup done"

run: |
  # comments inside a block are part of the script
  python train.py \
    --model $MODEL --epochs $EPOCHS
"#;

    #[test]
    fn full_skypilot_yaml() {
        let s = ok(FULL);
        assert_eq!(s.name.as_deref(), Some("llama-finetune.v2"));
        assert_eq!(s.workdir.as_deref(), Some("."));
        assert_eq!(s.num_nodes, 1);
        assert_eq!(s.resources.accelerators, vec![a("H100", 4000)]);
        assert_eq!(s.resources.cpus, Some(Milli(16000)));
        assert!(s.resources.cpus_plus);
        assert_eq!(s.resources.memory.as_deref(), Some("64GB+"));
        assert_eq!(s.resources.other["use_spot"], serde_json::json!(false));
        assert_eq!(s.resources.other["disk_size"], serde_json::json!(512));
        assert_eq!(
            s.resources.other["ports"],
            serde_json::json!([8080, "9000-9010"])
        );
        assert_eq!(
            s.resources.other["labels"],
            serde_json::json!({"team": "ml"})
        );
        assert_eq!(s.resources.other["cloud"], serde_json::json!("aws"));
        assert_eq!(s.envs["MODEL"], "meta-llama/Llama-3-8B");
        assert_eq!(s.envs["EPOCHS"], "3");
        assert_eq!(s.envs["LR"], "1.5e-4");
        assert_eq!(s.envs["RATIO"], "1.0");
        assert_eq!(s.envs["DEBUG"], "true");
        // envs values themselves are not substituted (the shell does that at run time).
        assert_eq!(s.envs["DATA_DIR"], "/data/${MODEL}");
        assert_eq!(s.envs["EMPTY"], "");
        assert_eq!(s.secrets["HF_TOKEN"], "hf_abc123");
        assert_eq!(
            s.file_mounts["/data/meta-llama/Llama-3-8B"],
            serde_json::json!("./data")
        );
        assert_eq!(
            s.file_mounts["~/.cache/meta-llama/Llama-3-8B/ckpt"],
            serde_json::json!({"source": "s3://bucket/meta-llama/Llama-3-8B", "mode": "COPY"})
        );
        assert_eq!(
            s.file_mounts["/unknown"],
            serde_json::json!("$NOT_AN_ENV/x")
        );
        assert_eq!(
            s.setup.as_deref(),
            Some("pip install -r requirements.txt\necho \"setup done\"\n")
        );
        assert!(s
            .run
            .as_deref()
            .is_some_and(|r| r.starts_with("# comments inside") && r.contains("--model $MODEL")));
        assert_eq!(s.resources_display(), "1x[H100:4]");
        let d = s.demand();
        assert_eq!(d.num_nodes, 1);
        assert_eq!(d.per_node.cpus, Milli(16000));
        assert_eq!(d.per_node.accelerators, vec![a("H100", 4000)]);
    }

    #[test]
    fn minimal_and_defaults() {
        let s = ok("run: echo hi\n");
        assert_eq!(s.name, None);
        assert_eq!(s.workdir, None);
        assert_eq!(s.num_nodes, 1);
        assert!(s.resources.accelerators.is_empty());
        assert_eq!(s.resources.cpus, None);
        assert_eq!(s.run.as_deref(), Some("echo hi"));
        assert_eq!(s.demand().per_node.cpus, DEFAULT_JOB_CPUS);
        assert_eq!(s.resources_display(), "1x[CPU:0.5]");
        // resources absent, null or empty
        for y in [
            "resources:\nrun: x\n",
            "resources: {}\nrun: x\n",
            "resources: null\n",
        ] {
            let s = ok(y);
            assert!(s.resources.accelerators.is_empty(), "{y}");
            assert!(s.resources.other.is_empty(), "{y}");
        }
        // setup only, no run
        let s = ok("setup: pip install x\n");
        assert_eq!(s.run, None);
        assert_eq!(s.setup.as_deref(), Some("pip install x"));
        // nulls for optional fields
        let s = ok("name:\nworkdir:\nnum_nodes:\nenvs:\nsecrets:\nfile_mounts:\nsetup:\nrun:\n");
        assert_eq!(s.num_nodes, 1);
        assert!(s.envs.is_empty() && s.secrets.is_empty() && s.file_mounts.is_empty());
        // a leading document marker and a BOM are fine
        assert_eq!(ok("---\nrun: x\n").run.as_deref(), Some("x"));
        assert_eq!(ok("\u{FEFF}run: x\n").run.as_deref(), Some("x"));
        // CRLF line endings
        assert_eq!(ok("name: a\r\nrun: x\r\n").name.as_deref(), Some("a"));
    }

    #[test]
    fn ignored_skypilot_keys_are_accepted() {
        let s = ok(
            "name: svc\nservice:\n  readiness_probe: /health\n  replicas: 2\n\
                    event_callback: echo done\ninputs: {s3://a: 1}\noutputs: {s3://b: 2}\n\
                    config:\n  kubernetes:\n    pod_config: {}\nvolumes:\n  /mnt: vol\n\
                    experimental:\n  config_overrides: {}\npool:\n  workers: 2\nrun: x\n",
        );
        assert_eq!(s.name.as_deref(), Some("svc"));
    }

    #[test]
    fn unknown_top_level_key_is_named() {
        let e = err_has(
            "name: a\nrnu: echo\n",
            &[
                "unknown top-level key 'rnu'",
                "did you mean 'run'",
                "valid keys are: name, workdir",
            ],
        );
        assert_eq!((e.line, e.column), (Some(2), Some(1)));
        assert!(e
            .to_string()
            .starts_with("task.yaml:2:1: unknown top-level key"));
        err_has("accelerators: H100\n", &["'accelerators'", "resources"]);
        err_has("1: x\n", &["unknown top-level key '1'"]);
        err_has("[a]: x\n", &["keys must be plain names"]);
    }

    #[test]
    fn task_names() {
        for good in ["a", "my-task", "a.b", "a__b", "A1-b2.c3_d4", "x--y", "2024"] {
            assert!(is_valid_task_name(good), "{good}");
        }
        for bad in [
            "", "-a", "a-", "a---b", "a b", "a/b", "é", ".a", "a..", "a.-_b",
        ] {
            assert!(!is_valid_task_name(bad), "{bad}");
        }
        assert_eq!(ok("name: my-task\n").name.as_deref(), Some("my-task"));
        let e = err_has("name: my task\n", &["not a valid task name", "my task"]);
        assert_eq!(e.line, Some(1));
        err_has("name: a---b\n", &["not a valid task name"]);
        err_has("name: [a]\n", &["name must be a string"]);
        err_has("name: 12\n", &["name must be a string", "quote it"]);
    }

    #[test]
    fn num_nodes_rules() {
        assert_eq!(ok("num_nodes: 4\n").num_nodes, 4);
        assert_eq!(ok("num_nodes: 1024\n").num_nodes, 1024);
        let s = ok("num_nodes: 2\nresources:\n  accelerators: T4:0.5\n");
        assert_eq!(s.resources_display(), "2x[T4:0.5]");
        assert_eq!(s.demand().num_nodes, 2);
        err_has(
            "num_nodes: 0\n",
            &["num_nodes must be a positive whole number", "got 0"],
        );
        err_has("num_nodes: -3\n", &["positive whole number"]);
        err_has("num_nodes: 1025\n", &["at most 1024 nodes"]);
        err_has("num_nodes: 99999999999999999999\n", &["num_nodes"]);
        err_has("num_nodes: 2.5\n", &["positive whole number"]);
        err_has("num_nodes: \"2\"\n", &["positive whole number", "a string"]);
        err_has("num_nodes: true\n", &["positive whole number"]);
    }

    #[test]
    fn accelerator_string_forms() {
        assert_eq!(
            accels("resources:\n  accelerators: H100\n"),
            vec![a("H100", 1000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: H100:4\n"),
            vec![a("H100", 4000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: H100:0.5\n"),
            vec![a("H100", 500)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: 'h100:2.0'\n"),
            vec![a("h100", 2000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: tpu-v5e_8.x:1\n"),
            vec![a("tpu-v5e_8.x", 1000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: A100-80GB:8\n"),
            vec![a("A100-80GB", 8000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: \"L4 : 2\"\n"),
            vec![a("L4", 2000)]
        );
    }

    #[test]
    fn accelerator_mapping_forms() {
        assert_eq!(
            accels("resources:\n  accelerators: {H100: 4}\n"),
            vec![a("H100", 4000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: {H100: null}\n"),
            vec![a("H100", 1000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: {H100: 0.25}\n"),
            vec![a("H100", 250)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: {H100: \"2\"}\n"),
            vec![a("H100", 2000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators:\n    H100: 8\n"),
            vec![a("H100", 8000)]
        );
        // Flow set: YAML reads `{A100:1, V100:1}` as keys "A100:1", "V100:1" with null values.
        assert_eq!(
            accels("resources:\n  accelerators: {A100:1, V100:1}\n"),
            vec![a("A100", 1000), a("V100", 1000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: {A100:8, V100}\n"),
            vec![a("A100", 8000), a("V100", 1000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: {A100: 1, V100: 2}\n"),
            vec![a("A100", 1000), a("V100", 2000)]
        );
    }

    #[test]
    fn accelerator_list_forms() {
        assert_eq!(
            accels("resources:\n  accelerators: [V100, A100:2]\n"),
            vec![a("V100", 1000), a("A100", 2000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators: [{H100: 1}]\n"),
            vec![a("H100", 1000)]
        );
        assert_eq!(
            accels("resources:\n  accelerators:\n    - L4:1\n    - {A10G: 1}\n    - T4\n"),
            vec![a("L4", 1000), a("A10G", 1000), a("T4", 1000)]
        );
        // exact duplicates collapse, order kept
        assert_eq!(
            accels("resources:\n  accelerators: [V100, A100, V100]\n"),
            vec![a("V100", 1000), a("A100", 1000)]
        );
        assert!(accels("resources:\n  accelerators: []\n").is_empty());
        assert!(accels("resources:\n  accelerators:\n").is_empty());
        let s = ok("resources:\n  accelerators: [V100, A100:2]\n");
        assert_eq!(s.resources_display(), "1x[V100:1|A100:2]");
    }

    #[test]
    fn any_of_and_ordered() {
        let s = ok(
            "resources:\n  ordered:\n    - accelerators: H100:8\n      cloud: aws\n    \
                    - accelerators: {A100: 8}\n      cloud: gcp\n",
        );
        assert_eq!(
            s.resources.accelerators,
            vec![a("H100", 8000), a("A100", 8000)]
        );
        assert!(s.resources.other.contains_key("ordered"));
        let s = ok(
            "resources:\n  accelerators: L4\n  any_of:\n    - cloud: aws\n    \
                    - accelerators: [A10G, T4]\n      cloud: gcp\n",
        );
        assert_eq!(
            s.resources.accelerators,
            vec![a("L4", 1000), a("A10G", 1000), a("T4", 1000)]
        );
        assert_eq!(
            s.resources.other["any_of"][0],
            serde_json::json!({"cloud": "aws", "accelerators": "L4"})
        );
        let s = ok("resources:\n  any_of:\n    - cloud: aws\n      cpus: 2\n    - cloud: gcp\n      cpus: 8+\n");
        assert!(s.resources.accelerators.is_empty());
        assert_eq!(
            (s.resources.cpus, s.resources.cpus_plus),
            (Some(Milli(8000)), true)
        );
        err_has(
            "resources:\n  any_of: [{accelerators: H100}]\n  ordered: [{accelerators: A100}]\n",
            &["only one of"],
        );
        err_has(
            "resources:\n  any_of: H100\n",
            &["resources.any_of must be a list"],
        );
        err_has(
            "resources:\n  any_of: [H100]\n",
            &["resources.any_of[0] must be a resource mapping"],
        );
        err_has(
            "resources:\n  any_of:\n    - accelerators: H100\n    - cloud: aws\n",
            &["resources.any_of[1] names no accelerators"],
        );
        let e = err_has(
            "resources:\n  ordered:\n    - accelerators: H100:1.5\n",
            &[
                "resources.ordered[0].accelerators",
                "fractional counts must be below 1",
            ],
        );
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn accelerator_rejections() {
        let cases: &[(&str, &[&str])] = &[
            ("H100:0", &["must be greater than 0"]),
            ("H100:-1", &["must be greater than 0"]),
            ("H100:nan", &["'nan' is not a number"]),
            ("H100:1e9", &["too large"]),
            ("H100:0.33333333333", &["more than 3 decimal places"]),
            ("H100:1.5", &["fractional counts must be below 1"]),
            ("'H100:'", &["no count after ':'"]),
            ("H100:1:2", &["more than one ':'"]),
            ("'-H100'", &["not a valid accelerator name"]),
            ("'H 100'", &["not a valid accelerator name"]),
            ("'H100/x:1'", &["not a valid accelerator name"]),
            ("4", &["resources.accelerators is an integer"]),
            ("true", &["resources.accelerators is a boolean"]),
            ("{H100: [1]}", &["count must be a number"]),
            ("{H100: true}", &["count must be a number"]),
            ("{H100: 0}", &["must be greater than 0"]),
            ("{H100: 1.5}", &["fractional counts must be below 1"]),
            ("{H100: .nan}", &["is not a number"]),
            (
                "{'H100:2': 4}",
                &["count both in the name and as the value"],
            ),
            (
                "[[H100]]",
                &["resources.accelerators[0]: an alternative is a list"],
            ),
            ("[null]", &["an alternative is null"]),
        ];
        for (form, needles) in cases {
            let y = format!("resources:\n  accelerators: {form}\n");
            let e = err_has(&y, needles);
            assert!(
                e.message.contains("resources.accelerators"),
                "{}",
                e.message
            );
            assert_eq!(e.line, Some(2), "{form}: {e}");
        }
    }

    #[test]
    fn cpus_and_memory() {
        let r = ok("resources:\n  cpus: 4\n").resources;
        assert_eq!((r.cpus, r.cpus_plus), (Some(Milli(4000)), false));
        let r = ok("resources:\n  cpus: 4+\n").resources;
        assert_eq!((r.cpus, r.cpus_plus), (Some(Milli(4000)), true));
        let r = ok("resources:\n  cpus: \"8+\"\n").resources;
        assert_eq!((r.cpus, r.cpus_plus), (Some(Milli(8000)), true));
        let r = ok("resources:\n  cpus: 0.5\n").resources;
        assert_eq!(r.cpus, Some(Milli(500)));
        let s = ok("resources:\n  cpus: 1+\n");
        assert_eq!(s.resources_display(), "1x[CPU:1+]");
        assert_eq!(
            ok("resources:\n  cpus: 0.5\n").resources_display(),
            "1x[CPU:0.5]"
        );
        err_has(
            "resources:\n  cpus: 0\n",
            &["resources.cpus", "must be greater than 0", "4+"],
        );
        err_has("resources:\n  cpus: -2\n", &["must be greater than 0"]);
        err_has("resources:\n  cpus: lots\n", &["'lots' is not a number"]);
        err_has(
            "resources:\n  cpus: 0.0001\n",
            &["more than 3 decimal places"],
        );
        err_has(
            "resources:\n  cpus: [4]\n",
            &["resources.cpus must be a number"],
        );

        for (form, want) in [
            ("64", "64"),
            ("32+", "32+"),
            ("64GB", "64GB"),
            ("\"16GB+\"", "16GB+"),
            ("0.5", "0.5"),
            ("4x", "4x"),
            ("512mb", "512mb"),
        ] {
            let r = ok(&format!("resources:\n  memory: {form}\n")).resources;
            assert_eq!(r.memory.as_deref(), Some(want), "{form}");
        }
        err_has(
            "resources:\n  memory: 0\n",
            &["resources.memory", "not a memory size"],
        );
        err_has("resources:\n  memory: lots\n", &["not a memory size"]);
        err_has("resources:\n  memory: 64 GiBs\n", &["not a memory size"]);
        err_has(
            "resources:\n  memory: {a: 1}\n",
            &["resources.memory must be a size"],
        );
    }

    #[test]
    fn resources_other_keys_recorded() {
        let r = ok(
            "resources:\n  infra: k8s/ctx\n  instance_type: p5.48xlarge\n  use_spot: true\n  \
                    image_id: docker:nvcr.io/nvidia/pytorch:24.01-py3\n  ports: 8080\n  \
                    region: us-east-1\n  zone: us-east-1a\n  disk_tier: best\n  job_recovery:\n    \
                    max_restarts_on_errors: 3\n",
        )
        .resources;
        assert_eq!(r.other["infra"], serde_json::json!("k8s/ctx"));
        assert_eq!(r.other["use_spot"], serde_json::json!(true));
        assert_eq!(r.other["ports"], serde_json::json!(8080));
        assert_eq!(
            r.other["image_id"],
            serde_json::json!("docker:nvcr.io/nvidia/pytorch:24.01-py3")
        );
        assert_eq!(
            r.other["job_recovery"],
            serde_json::json!({"max_restarts_on_errors": 3})
        );
        assert_eq!(r.other.len(), 9);
        err_has("resources: H100\n", &["resources must be a mapping"]);
        err_has("resources: [a]\n", &["resources must be a mapping"]);
    }

    #[test]
    fn envs_and_secrets() {
        let s = ok(
            "envs:\n  A: 1\n  B: true\n  C: 1.5\n  D: hello\n  E: 'quoted: yes'\n  \
                    F: 0x1F\n  G: yes\n  _H: \"\"\n  I: |\n    multi\n    line\n",
        );
        assert_eq!(s.envs["A"], "1");
        assert_eq!(s.envs["B"], "true");
        assert_eq!(s.envs["C"], "1.5");
        assert_eq!(s.envs["D"], "hello");
        assert_eq!(s.envs["E"], "quoted: yes");
        assert_eq!(s.envs["F"], "0x1F");
        assert_eq!(s.envs["G"], "yes");
        assert_eq!(s.envs["_H"], "");
        assert_eq!(s.envs["I"], "multi\nline\n");
        let s = ok("secrets:\n  TOKEN: abc\n  N: 42\n");
        assert_eq!(s.secrets, map(&[("TOKEN", "abc"), ("N", "42")]));

        let e = err_has(
            "envs:\n  FOO:\n",
            &[
                "envs.FOO is null: give it a value in the YAML or override it",
                "--env FOO=",
            ],
        );
        assert_eq!(e.line, Some(2));
        err_has(
            "secrets:\n  TOK: null\n",
            &["secrets.TOK is null", "--secret TOK="],
        );
        err_has(
            "envs:\n  1BAD: x\n",
            &["'1BAD' is not a valid variable name", "^[a-zA-Z_]"],
        );
        err_has("envs:\n  A-B: x\n", &["'A-B' is not a valid variable name"]);
        err_has(
            "envs:\n  A: [1, 2]\n",
            &["envs.A must be a string, number or boolean", "a list"],
        );
        err_has("envs:\n  A: {b: 1}\n", &["a mapping"]);
        err_has("envs: [A=1]\n", &["envs must be a mapping"]);
        err_has("envs: A=1\n", &["envs must be a mapping"]);
        err_has("secrets: [my-secret]\n", &["secrets must be a mapping"]);
        let e = err_has(
            "envs:\n  TOKEN: a\nsecrets:\n  TOKEN: b\n",
            &["secrets.TOKEN is also defined in envs"],
        );
        assert_eq!(e.line, Some(4));
        err_has(
            "envs:\n  A: \"x\\0y\"\n",
            &["envs.A contains a NUL character"],
        );
    }

    #[test]
    fn env_overrides() {
        let yaml = "envs:\n  A: 1\n  B:\nsecrets:\n  S:\n  T: keep\n";
        let o = map(&[
            ("A", "override"),
            ("B", "filled"),
            ("S", "sekret"),
            ("NEW", "x"),
        ]);
        let s = parse(yaml, "t.yaml", &o).expect("overrides fill nulls");
        assert_eq!(s.envs, map(&[("A", "override"), ("B", "filled")]));
        assert_eq!(s.secrets, map(&[("S", "sekret"), ("T", "keep")]));
        // overrides add no names
        assert!(!s.envs.contains_key("NEW") && !s.secrets.contains_key("NEW"));
        // an override does not hide a still-missing value elsewhere
        let e = parse(yaml, "t.yaml", &map(&[("A", "1")])).unwrap_err();
        assert!(e.message.contains("envs.B is null"), "{e}");
        // overridden values are used for substitution
        let s = parse(
            "envs:\n  D: /a\nworkdir: $D/w\n",
            "t.yaml",
            &map(&[("D", "/b")]),
        )
        .unwrap();
        assert_eq!(s.workdir.as_deref(), Some("/b/w"));
    }

    #[test]
    fn substitution() {
        let envs = map(&[("A", "x"), ("AB", "y"), ("_c1", "z")]);
        assert_eq!(
            substitute_envs("$A/${A}/$AB/${AB}x/$ABC/$_c1", &envs),
            "x/x/y/yx/$ABC/z"
        );
        assert_eq!(
            substitute_envs("$ ${ $${A} ${A-1} $1 ${} $", &envs),
            "$ ${ $x ${A-1} $1 ${} $"
        );
        assert_eq!(substitute_envs("${A", &envs), "${A");
        assert_eq!(substitute_envs("é$A€", &envs), "éx€");
        let s = ok(
            "envs:\n  BUCKET: my-bucket\n  N: 3\nworkdir: ~/code/${BUCKET}\n\
                    file_mounts:\n  /mnt/$BUCKET-$N: s3://${BUCKET}/$N\n",
        );
        assert_eq!(s.workdir.as_deref(), Some("~/code/my-bucket"));
        assert_eq!(
            s.file_mounts["/mnt/my-bucket-3"],
            serde_json::json!("s3://my-bucket/3")
        );
        // secrets are never substituted (they must not leak into file_mounts or workdir)
        let s = ok("secrets:\n  S: hidden\nworkdir: /w/$S\n");
        assert_eq!(s.workdir.as_deref(), Some("/w/$S"));
        // setup/run are left for the shell
        let s = ok("envs:\n  A: 1\nrun: echo $A\n");
        assert_eq!(s.run.as_deref(), Some("echo $A"));
    }

    #[test]
    fn file_mounts_forms() {
        let s = ok(
            "file_mounts:\n  /remote/a: ./local\n  /remote/b:\n    name: bkt\n    \
                    source: [./x, ./y]\n    mode: MOUNT\n",
        );
        assert_eq!(s.file_mounts["/remote/a"], serde_json::json!("./local"));
        assert_eq!(
            s.file_mounts["/remote/b"],
            serde_json::json!({"name": "bkt", "source": ["./x", "./y"], "mode": "MOUNT"})
        );
        err_has("file_mounts: [a]\n", &["file_mounts must be a mapping"]);
        err_has(
            "file_mounts:\n  /a:\n",
            &["file_mounts./a must be a source path", "null"],
        );
        err_has(
            "file_mounts:\n  /a: 3\n",
            &["file_mounts./a must be a source path"],
        );
    }

    #[test]
    fn setup_and_run_types() {
        let e = err_has(
            "run:\n  - echo a\n  - echo b\n",
            &["run must be a string", "run: |"],
        );
        assert_eq!(e.line, Some(2));
        err_has("setup: {a: 1}\n", &["setup must be a string"]);
        err_has("run: 12\n", &["run must be a string"]);
        err_has("run: \"a\\0b\"\n", &["run contains a NUL"]);
        let s = ok("run: >\n  folded\n  text\n");
        assert_eq!(s.run.as_deref(), Some("folded text\n"));
    }

    #[test]
    fn workdir_forms() {
        assert_eq!(ok("workdir: .\n").workdir.as_deref(), Some("."));
        assert_eq!(
            ok("workdir: ~/my code\n").workdir.as_deref(),
            Some("~/my code")
        );
        err_has(
            "workdir:\n  url: https://github.com/x/y\n",
            &["not supported", "workdir: ."],
        );
        err_has("workdir: [a]\n", &["workdir must be a directory path"]);
        err_has("workdir: ''\n", &["workdir is empty"]);
    }

    #[test]
    fn document_shape_errors() {
        err_has("", &["empty"]);
        err_has("\n\n   \n", &["empty"]);
        err_has("# just a comment\n", &["empty"]);
        err_has("- run: x\n", &["is a list, not a mapping"]);
        err_has("hello\n", &["is a string, not a mapping"]);
        err_has("42\n", &["is an integer, not a mapping"]);
        let e = err_has("run: a\n---\nrun: b\n", &["more than one YAML document"]);
        assert_eq!(e.line, Some(2));
        err_has("run: a\n---\n", &["more than one YAML document"]);
        let e = err_has("run: [a\n", &["invalid YAML"]);
        assert!(e.line.is_some());
        let e = err_has("name: a\n  bad: indentation\n", &["invalid YAML"]);
        assert!(e.line.is_some(), "{e}");
        err_has("run: !custom x\n", &["invalid YAML"]);
        err_has("run: *nope\n", &["invalid YAML"]);
    }

    #[test]
    fn yaml_syntax_errors_keep_location() {
        let e = err("name: a\nresources:\n  accelerators: [H100\n");
        assert!(e.line.is_some() && e.column.is_some(), "{e:?}");
        let shown = e.to_string();
        assert!(shown.starts_with("task.yaml:"), "{shown}");
    }

    #[test]
    fn control_characters_and_binary() {
        let e = err_has("run: a\0b\n", &["NUL", "binary"]);
        assert_eq!((e.line, e.column), (Some(1), Some(7)));
        let e = err_has("name: x\nrun: \u{1}\n", &["control character"]);
        assert_eq!(e.line, Some(2));
        err_has("run: \u{7f}\n", &["control character"]);
        // tabs inside values are fine
        assert_eq!(ok("run: \"a\tb\"\n").run.as_deref(), Some("a\tb"));
        // invalid UTF-8 through parse_bytes
        let e = parse_bytes(b"name: a\nrun: \xff\xfe\n", "bin.yaml", &none()).unwrap_err();
        assert_eq!(e.origin, "bin.yaml");
        assert_eq!((e.line, e.column), (Some(2), Some(6)));
        assert!(e.message.contains("not valid UTF-8"), "{e}");
        assert!(parse_bytes(b"run: ok\n", "b.yaml", &none()).is_ok());
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        assert!(parse_bytes(&garbage, "g.yaml", &none()).is_err());
    }

    /// A value whose tag is YAML's binary type is refused wherever it is, in any spelling
    /// of the tag, with its position; the word `!binary` in a script or a comment is text.
    #[test]
    fn binary_values_are_refused_and_the_word_is_not() {
        for (yaml, line) in [
            ("run: !!binary ZWNobyBoaQ==\n", 1),
            ("name: x\nrun: !binary ZWNobyBoaQ==\n", 2),
            ("run: !<tag:yaml.org,2002:binary> ZWNobyBoaQ==\n", 1),
            (
                "%TAG !y! tag:yaml.org,2002:\n---\nrun: !y!binary ZWNobyBoaQ==\n",
                3,
            ),
            ("envs:\n  A: !!binary aGk=\nrun: x\n", 2),
            ("run: x\nfile_mounts:\n  /a: !!binary aGk=\n", 3),
            ("!!binary cnVu: x\n", 1),
        ] {
            let e = err_has(yaml, &["binary (!!binary) values are not supported"]);
            assert_eq!(e.line, Some(line), "{yaml:?}: {e}");
        }
        for yaml in [
            "run: echo !!binary data\n",
            "run: |\n  grep -v !binary file\n  echo \"!!binary\"\n",
            "# a !!binary value would be refused\nrun: x\n",
            "envs:\n  WHAT: \"!binary\"\nrun: x\n",
        ] {
            ok(yaml);
        }
        assert_eq!(
            ok("run: |\n  grep -v !binary file\n").run.as_deref(),
            Some("grep -v !binary file\n")
        );
    }

    #[test]
    fn duplicate_keys() {
        let e = err_has("run: a\nrun: b\n", &["duplicate key 'run'"]);
        assert_eq!((e.line, e.column), (Some(2), Some(1)));
        let e = err_has("envs:\n  A: 1\n  A: 2\n", &["duplicate key 'A'"]);
        assert_eq!(e.line, Some(3));
        err_has("resources: {cpus: 1, cpus: 2}\n", &["duplicate key 'cpus'"]);
    }

    #[test]
    fn anchors_and_merge_keys_work() {
        let s = ok("envs:\n  A: &v 7\n  B: *v\nresources: &r\n  accelerators: T4\nrun: x\n");
        assert_eq!(s.envs["A"], "7");
        assert_eq!(s.envs["B"], "7");
        let s =
            ok("envs:\r\n  A: 1.0\r\n  B: yes\r\nresources:\r\n  accelerators: {H100: 0.50}\r\n");
        assert_eq!((s.envs["A"].as_str(), s.envs["B"].as_str()), ("1.0", "yes"));
        assert_eq!(s.resources.accelerators, vec![a("H100", 500)]);
        let s = ok("x-common: &c\n  A: 1\n  B: 2\nenvs:\n  <<: *c\n  B: 3\n"
            .replace("x-common", "config")
            .as_str());
        assert_eq!(s.envs, map(&[("A", "1"), ("B", "3")]));
    }

    #[test]
    fn alias_bomb_fails_fast() {
        let mut y = String::from("config:\n  a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let p = i - 1;
            y.push_str(&format!(
                "  a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
            ));
        }
        y.push_str("run: x\n");
        let t = std::time::Instant::now();
        let e = err(&y);
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            t.elapsed()
        );
        assert!(
            e.message.contains("alias") || e.message.contains("too"),
            "{e}"
        );
        // one big scalar aliased many times
        let big = "x".repeat(900_000);
        let mut y = format!("config:\n  big: &b \"{big}\"\n  list: [");
        for _ in 0..200 {
            y.push_str("*b, ");
        }
        y.push_str("]\nrun: x\n");
        let e = err(&y);
        assert!(
            e.message.contains("too much") || e.message.contains("alias"),
            "{e}"
        );
    }

    #[test]
    fn deep_nesting_fails_fast() {
        for (open, close) in [("[", "]"), ("{a: ", "}")] {
            let y = format!("config: {}1{}\n", open.repeat(10_000), close.repeat(10_000));
            let e = err(&y);
            assert!(
                e.message.contains("nested too deeply") || e.message.contains("too"),
                "{e}"
            );
            assert_eq!(e.line, Some(1));
        }
        // block nesting
        let mut y = String::from("config:\n");
        for i in 0..200 {
            y.push_str(&" ".repeat(2 * (i + 1)));
            y.push_str("k:\n");
        }
        let e = err(&y);
        assert!(e.message.contains("nested too deeply"), "{e}");
        // moderate nesting is fine
        let y = format!("config: {}1{}\nrun: x\n", "[".repeat(20), "]".repeat(20));
        ok(&y);
    }

    #[test]
    fn size_limit() {
        let mut y = String::from("run: |\n");
        while y.len() <= MAX_SPEC_BYTES {
            y.push_str("  echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n");
        }
        let e = err_has(&y, &["at most 1048576 bytes"]);
        assert_eq!(e.line, None);
        let e = parse_bytes(y.as_bytes(), "big.yaml", &none()).unwrap_err();
        assert!(e.message.contains("1 MiB"), "{e}");
        // just under the limit parses
        let mut y = String::from("run: |\n");
        while y.len() + 60 < MAX_SPEC_BYTES {
            y.push_str("  echo aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n");
        }
        assert!(ok(&y).run.is_some_and(|r| r.len() > 1_000_000));
    }

    #[test]
    fn redacted_yaml_round_trip() {
        let s = ok(FULL);
        let y = s.to_redacted_yaml();
        assert!(!y.contains("hf_abc123"), "{y}");
        assert!(y.contains(REDACTED), "{y}");
        let back = parse(&y, "job.yaml", &none()).unwrap_or_else(|e| panic!("{e}\n{y}"));
        assert_eq!(back.secrets, map(&[("HF_TOKEN", REDACTED)]));
        let mut expect = s.clone();
        expect.secrets = back.secrets.clone();
        assert_eq!(back, expect, "\n{y}");
    }

    #[test]
    fn redacted_yaml_round_trip_tricky_values() {
        let mut s = ok("run: x\n");
        let tricky = [
            "",
            " ",
            "yes",
            "no",
            "on",
            "off",
            "y",
            "n",
            "true",
            "null",
            "~",
            "1",
            "0x10",
            "1e3",
            ".nan",
            "-",
            "- item",
            "a: b",
            "#x",
            "x #y",
            "*a",
            "&a",
            "!t",
            "%p",
            "@",
            "`",
            "'",
            "\"",
            "\\",
            "{",
            "[",
            "  lead",
            "trail  ",
            "a\nb",
            "a\n",
            "\n",
            "\n\n",
            "  indented\nfirst",
            "line\n  more\n\n",
            "tab\there",
            "ünï©ødé",
            "€100",
            "a very long line that goes on and on and on and on and on and on and on and on \
             and on and on and on past eighty characters",
            "x\r\ny",
            "end with space \n",
            "${NOT}",
            "$NOT",
            "<redacted>",
        ];
        for (i, t) in tricky.iter().enumerate() {
            s.envs.insert(format!("E{i}"), t.to_string());
        }
        s.setup = Some("  starts indented\n\tthen tab\n".into());
        s.run = Some(tricky.join("\n"));
        s.name = Some("n.a-m_e".into());
        s.workdir = Some("~/w d".into());
        s.num_nodes = 3;
        s.resources.accelerators = vec![a("A100", 8000), a("v100", 500)];
        s.resources.cpus = Some(Milli(1500));
        s.resources.cpus_plus = true;
        s.resources.memory = Some("32+".into());
        s.resources
            .other
            .insert("use_spot".into(), serde_json::json!(true));
        s.resources.other.insert(
            "labels".into(),
            serde_json::json!({"yes": "no", "1": "null"}),
        );
        s.resources
            .other
            .insert("disk_size".into(), serde_json::json!(0.25));
        s.resources
            .other
            .insert("ports".into(), serde_json::json!([1, "2", null]));
        s.file_mounts.insert("/a b".into(), serde_json::json!("on"));
        s.file_mounts.insert(
            "/c".into(),
            serde_json::json!({"source": "s3://x", "mode": "MOUNT"}),
        );
        s.secrets.insert("S1".into(), "top secret\nvalue".into());
        let y = s.to_redacted_yaml();
        assert!(!y.contains("top secret"), "{y}");
        let back = parse(&y, "job.yaml", &none()).unwrap_or_else(|e| panic!("{e}\n{y}"));
        let mut expect = s.clone();
        expect.secrets.insert("S1".into(), REDACTED.into());
        assert_eq!(back, expect, "\n{y}");
    }

    #[test]
    fn redacted_yaml_round_trip_forms() {
        for yaml in [
            "run: x\n",
            "setup: only\n",
            "resources:\n  accelerators: {A100:1, V100:1}\n  cpus: 0.5\n",
            "resources:\n  accelerators: L4\n  any_of:\n    - cloud: aws\n    - accelerators: [A10G, T4]\n",
            "resources:\n  ordered:\n    - accelerators: H100:8\n    - {accelerators: A100:8, cpus: 4}\n",
            "resources:\n  any_of: [{cloud: aws, cpus: 2}, {cloud: gcp}]\n",
            "secrets:\n  A: b\nenvs:\n  C: d\n",
        ] {
            let s = ok(yaml);
            let y = s.to_redacted_yaml();
            let back = parse(&y, "job.yaml", &none()).unwrap_or_else(|e| panic!("{e}\n{y}"));
            let mut expect = s.clone();
            for v in expect.secrets.values_mut() {
                *v = REDACTED.into();
            }
            assert_eq!(back, expect, "{yaml}\n---\n{y}");
        }
    }

    #[test]
    fn cli_accelerator_arg() {
        assert_eq!(parse_accelerators_arg("H100:4"), Ok(vec![a("H100", 4000)]));
        assert_eq!(parse_accelerators_arg("H100"), Ok(vec![a("H100", 1000)]));
        assert_eq!(parse_accelerators_arg("T4:0.5"), Ok(vec![a("T4", 500)]));
        assert_eq!(
            parse_accelerators_arg("V100,A100:2"),
            Ok(vec![a("V100", 1000), a("A100", 2000)])
        );
        for (bad, needle) in [
            ("H100:0", "greater than 0"),
            ("H100:-1", "greater than 0"),
            ("H100:nan", "not a number"),
            ("H100:1e9", "too large"),
            ("H100:0.33333333333", "3 decimal"),
            ("H100:1.5", "fractional counts must be below 1"),
            ("", "empty"),
            ("H100:", "no count"),
            (":4", "not a valid accelerator name"),
            ("H100,", "not a valid accelerator name"),
        ] {
            let e = parse_accelerators_arg(bad).unwrap_err();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn parse_file_reads_and_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("task.yaml");
        std::fs::write(&p, "name: f\nrun: echo\n").unwrap();
        assert_eq!(parse_file(&p, &none()).unwrap().name.as_deref(), Some("f"));
        std::fs::write(&p, "nme: f\n").unwrap();
        let e = parse_file(&p, &none()).unwrap_err();
        assert_eq!(e.origin, p.display().to_string());
        assert_eq!(e.line, Some(1));
        let e = parse_file(&dir.path().join("missing.yaml"), &none()).unwrap_err();
        assert!(e.message.contains("cannot read"), "{e}");
    }

    #[test]
    fn resources_typo_is_an_error_with_a_hint() {
        let e = parse(
            "resources:\n  acelerators: H100:1\nrun: echo\n",
            "t.yaml",
            &BTreeMap::new(),
        )
        .unwrap_err();
        assert!(e.message.contains("did you mean 'accelerators'"), "{e}");
        assert_eq!(e.line, Some(2), "{e}");
        let ok = parse(
            "resources:\n  cloud: aws\n  use_spot: true\n  _docker_login_config: x\n",
            "t.yaml",
            &BTreeMap::new(),
        )
        .unwrap();
        assert!(ok.resources.other.contains_key("cloud"));
    }
}
