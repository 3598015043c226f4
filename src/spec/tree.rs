//! The loosely typed tree a task YAML is read into first: bounded (depth, size, aliases),
//! every node with its position, so each error can name the key path, line and column.

use super::*;

/// One YAML node with its position (1-based; 0 = unknown) and, for scalars from a string
/// source, its byte span (used to recover the user's spelling of numbers and booleans).
#[derive(Debug, Clone)]
pub(super) struct Node {
    pub(super) kind: Kind,
    pub(super) line: usize,
    pub(super) col: usize,
    pub(super) span: Option<(usize, usize)>,
}

#[derive(Debug, Clone)]
pub(super) enum Kind {
    Null,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
}

impl Kind {
    pub(super) fn describe(&self) -> &'static str {
        match self {
            Kind::Null => "null",
            Kind::Bool(_) => "a boolean",
            Kind::Int(_) => "an integer",
            Kind::Float(_) => "a number",
            Kind::Str(_) => "a string",
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }
}

/// Why a `!!binary` value is refused.
pub(super) const BINARY_NOT_SUPPORTED: &str =
    "binary (!!binary) values are not supported in a task YAML: write commands and values as text";

/// Limit on the tree built from one document, on top of serde-saphyr's budget: counts every
/// node plus the bytes of every string, so aliases to one big scalar cannot multiply memory.
pub(super) const MAX_TREE_UNITS: usize = 8 << 20;

thread_local! {
    static TREE_UNITS: Cell<usize> = const { Cell::new(0) };
}

pub(super) fn charge<E: de::Error>(units: usize) -> Result<(), E> {
    TREE_UNITS.with(|c| {
        let total = c.get().saturating_add(units).saturating_add(1);
        c.set(total);
        if total > MAX_TREE_UNITS {
            Err(E::custom(
                "the document expands to too much data (more than 8 MiB, through aliases?)",
            ))
        } else {
            Ok(())
        }
    })
}

/// Whether a node's tag, as the parser resolved it, is YAML's binary type: serde-saphyr
/// decodes such a value (base64) into a string, which would let a job's commands be hidden.
fn is_binary_tag(tag: &str) -> bool {
    matches!(
        tag,
        "!!binary" | "!binary" | "tag:yaml.org,2002:binary" | "tag:yaml.org,2002:!binary"
    )
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s: serde_saphyr::Spanned<serde_saphyr::Tagged<Kind>> =
            serde_saphyr::Spanned::deserialize(d)?;
        let serde_saphyr::Tagged(kind, tag) = s.value;
        if tag.as_deref().is_some_and(is_binary_tag) {
            return Err(de::Error::custom(BINARY_NOT_SUPPORTED));
        }
        let span = s.defined.span();
        let span = match (span.byte_offset(), span.byte_len()) {
            (Some(o), Some(l)) => Some((o as usize, l as usize)),
            _ => None,
        };
        Ok(Node {
            kind,
            line: s.referenced.line() as usize,
            col: s.referenced.column() as usize,
            span,
        })
    }
}

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(KindVisitor)
    }
}

pub(super) struct KindVisitor;

impl<'de> Visitor<'de> for KindVisitor {
    type Value = Kind;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Kind, D::Error> {
        d.deserialize_any(KindVisitor)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Int(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Int(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Int(v))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Kind, E> {
        charge::<E>(0)?;
        match i128::try_from(v) {
            Ok(i) => Ok(Kind::Int(i)),
            Err(_) => Ok(Kind::Float(v as f64)),
        }
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Kind, E> {
        charge::<E>(0)?;
        Ok(Kind::Float(v))
    }
    fn visit_char<E: de::Error>(self, v: char) -> Result<Kind, E> {
        charge::<E>(4)?;
        Ok(Kind::Str(v.to_string()))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
        charge::<E>(v.len())?;
        Ok(Kind::Str(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Kind, E> {
        charge::<E>(v.len())?;
        Ok(Kind::Str(v))
    }
    fn visit_bytes<E: de::Error>(self, _v: &[u8]) -> Result<Kind, E> {
        Err(E::custom(BINARY_NOT_SUPPORTED))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Kind, A::Error> {
        charge::<A::Error>(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Node>()? {
            items.push(item);
        }
        Ok(Kind::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
        charge::<A::Error>(0)?;
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Node>()? {
            let value = map.next_value::<Node>()?;
            entries.push((key, value));
        }
        Ok(Kind::Map(entries))
    }
}

/// serde-saphyr options: strict, small budgets (a task YAML is a few hundred nodes).
pub(super) fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: 32,
            flow_nesting_limit: 32,
            max_documents: 1,
            max_events: 200_000,
            max_nodes: 100_000,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_merge_keys: 100,
            max_total_scalar_bytes: 2 * MAX_SPEC_BYTES,
            max_recorded_anchor_events: 100_000,
            max_recorded_anchor_bytes: 4 * MAX_SPEC_BYTES,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 10_000,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: 1_000,
        },
        duplicate_keys: serde_saphyr::DuplicateKeyPolicy::Error,
        strict_booleans: true,
        non_finite_float_policy: serde_saphyr::NonFiniteFloatPolicy::AsString,
        reject_unsupported_tags: true,
        emit_comments: false,
        with_snippet: false,
    }
}

pub(super) fn read_tree(cx: &Cx<'_>) -> Result<Node, SpecError> {
    TREE_UNITS.with(|c| c.set(0));
    let result = serde_saphyr::from_str_with_options::<Node>(cx.src, yaml_options());
    TREE_UNITS.with(|c| c.set(0));
    let root = result.map_err(|e| yaml_error(cx, &e))?;
    match &root.kind {
        Kind::Map(_) => Ok(root),
        Kind::Null => Err(cx.err_none(
            "the file is empty (or holds only comments); a task YAML must be a mapping \
             such as `run: echo hello`",
        )),
        other => Err(cx.err(
            &root,
            format!(
                "the document is {}, not a mapping; a task YAML must be a mapping of keys \
                 ({}), e.g. `run: echo hello`",
                other.describe(),
                HANDLED_TASK_KEYS.join(", ")
            ),
        )),
    }
}

/// Converts a serde-saphyr error, keeping its location.
pub(super) fn yaml_error(cx: &Cx<'_>, e: &serde_saphyr::Error) -> SpecError {
    use serde_saphyr::budget::BudgetBreach;
    use serde_saphyr::{Error as E, MessageFormatter};
    let (line, col) = e
        .location()
        .map(|l| (l.line() as usize, l.column() as usize))
        .unwrap_or((0, 0));
    let mut inner = e.without_snippet();
    while let E::AliasError { error, .. } = inner {
        inner = error.without_snippet();
    }
    let message = match inner {
        E::DuplicateMappingKey { key, .. } => match key {
            Some(k) => format!(
                "duplicate key '{}': each key may appear only once in a mapping",
                shown(k)
            ),
            None => "duplicate key: each key may appear only once in a mapping".to_string(),
        },
        E::MultipleDocuments { .. } => MULTI_DOC.to_string(),
        E::AliasReplayLimitExceeded { .. }
        | E::AliasExpansionLimitExceeded { .. }
        | E::AliasReplayStackDepthExceeded { .. }
        | E::AliasReplayCounterOverflow { .. } => {
            "the document expands aliases (*name) too much; a task YAML may reuse anchors \
             only a modest number of times"
                .to_string()
        }
        E::Budget { breach, .. } => match breach {
            BudgetBreach::Documents { .. } => MULTI_DOC.to_string(),
            BudgetBreach::Depth { .. } => {
                "the document is nested too deeply (more than 32 levels of lists/mappings)"
                    .to_string()
            }
            BudgetBreach::Aliases { .. }
            | BudgetBreach::Anchors { .. }
            | BudgetBreach::AliasAnchorRatio { .. }
            | BudgetBreach::RecordedAnchorEvents { .. }
            | BudgetBreach::RecordedAnchorBytes { .. } => {
                "the document uses too many anchors/aliases (&name / *name)".to_string()
            }
            BudgetBreach::ScalarBytes { .. } => {
                "the document holds too much text (more than 2 MiB of values, counting alias \
                 expansions)"
                    .to_string()
            }
            BudgetBreach::Events { .. } | BudgetBreach::Nodes { .. } => {
                "the document holds too many values (counting alias expansions) for a task YAML"
                    .to_string()
            }
            other => format!(
                "the document is too large or too complex for a task YAML ({})",
                shown(&format!("{other:?}"))
            ),
        },
        _ => {
            let text = serde_saphyr::UserMessageFormatter.format_message(inner);
            let text = shown_long(&text);
            if text.contains("recursion limit") {
                "the document is nested too deeply (more than 32 levels of lists/mappings)"
                    .to_string()
            } else {
                format!("invalid YAML: {text}")
            }
        }
    };
    cx.err_at(line, col, message)
}

pub(super) const MULTI_DOC: &str =
    "the file holds more than one YAML document (a `---` separator); \
                         put exactly one task in a task YAML";

pub(super) fn shown_long(s: &str) -> String {
    const MAX: usize = 300;
    let mut out: String = s
        .chars()
        .take(MAX)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

impl Node {
    /// The source text of a scalar (only for plain numbers/booleans/keys).
    pub(super) fn raw<'s>(&self, cx: &Cx<'s>) -> Option<&'s str> {
        let (o, l) = self.span?;
        let s = cx.src.get(o..o.checked_add(l)?)?;
        let ok = !s.is_empty()
            && !s.contains(['\n', '\r', '#', '&', '*', '!'])
            && !s.starts_with(['"', '\'', ' ', '\t', '|', '>']);
        ok.then_some(s)
    }

    /// The text of a scalar, in the user's spelling where it is known (`1.0`, `yes`, `0x1F`).
    /// `None` for null and collections.
    pub(super) fn scalar_text(&self, cx: &Cx<'_>) -> Option<String> {
        match &self.kind {
            Kind::Str(s) => Some(s.clone()),
            Kind::Bool(b) => Some(
                self.raw(cx)
                    .filter(|r| r.eq_ignore_ascii_case(if *b { "true" } else { "false" }))
                    .map(str::to_string)
                    .unwrap_or_else(|| b.to_string()),
            ),
            Kind::Int(i) => Some(
                self.raw(cx)
                    .filter(|r| looks_numeric(r))
                    .map(str::to_string)
                    .unwrap_or_else(|| i.to_string()),
            ),
            Kind::Float(f) => Some(
                self.raw(cx)
                    .filter(|r| looks_numeric(r))
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{f:?}")),
            ),
            Kind::Null | Kind::Seq(_) | Kind::Map(_) => None,
        }
    }

    /// A key's text: strings as they are, other scalars in the user's spelling.
    pub(super) fn key_text(&self, cx: &Cx<'_>) -> Option<String> {
        self.scalar_text(cx)
    }
}

pub(super) fn looks_numeric(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'+' | b'-' | b'_'))
}

/// A string-keyed view of a mapping; non-string keys are an error naming `path`.
pub(super) fn entries<'n>(
    cx: &Cx<'_>,
    entries: &'n [(Node, Node)],
    path: &str,
) -> Result<Vec<(String, &'n Node, &'n Node)>, SpecError> {
    let mut out: Vec<(String, &Node, &Node)> = Vec::with_capacity(entries.len());
    for (k, v) in entries {
        let key = match &k.kind {
            Kind::Str(s) => s.clone(),
            Kind::Null => {
                return Err(cx.err(
                    k,
                    format!("{path}: a key is empty (null); keys must be names"),
                ))
            }
            Kind::Seq(_) | Kind::Map(_) => {
                return Err(cx.err(
                    k,
                    format!(
                        "{path}: a key is {}; keys must be plain names",
                        k.kind.describe()
                    ),
                ))
            }
            _ => k.key_text(cx).unwrap_or_default(),
        };
        if let Some((_, prev, _)) = out.iter().find(|(name, _, _)| *name == key) {
            return Err(cx.err(
                k,
                format!(
                    "{path}: duplicate key '{}' (first at line {}); each key may appear only once",
                    shown(&key),
                    prev.line
                ),
            ));
        }
        out.push((key, k, v));
    }
    Ok(out)
}

pub(super) fn join_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}
