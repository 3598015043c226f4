//! `resources`: accelerators (every form SkyPilot accepts, and `any_of`/`ordered`
//! alternatives), `cpus`, `memory`.

use super::*;

pub(super) const ACCEL_FORMS_HINT: &str =
    "write accelerators as NAME or NAME:COUNT (e.g. H100, H100:4, \
                                H100:0.5), a mapping {H100: 4}, or a list of alternatives \
                                [V100, A100:2]";

pub(super) fn parse_resources(cx: &Cx<'_>, v: &Node) -> Result<ResourceSpec, SpecError> {
    let mut spec = ResourceSpec::default_spec();
    let map = match &v.kind {
        Kind::Null => return Ok(spec),
        Kind::Map(m) => m,
        other => {
            return Err(cx.err(
                v,
                format!(
                    "resources must be a mapping (accelerators, cpus, memory, ...), not {}",
                    other.describe()
                ),
            ))
        }
    };
    let fields = entries(cx, map, "resources")?;
    let mut top_accel_node: Option<&Node> = None;
    let mut alternatives: Option<(&str, &Node, &Node)> = None;
    for (key, k, val) in &fields {
        match key.as_str() {
            "accelerators" => {
                spec.accelerators = parse_accel_node(cx, val, "resources.accelerators")?;
                top_accel_node = Some(*val);
            }
            "cpus" => {
                if let Some((c, plus)) = parse_cpus(cx, val, "resources.cpus")? {
                    spec.cpus = Some(c);
                    spec.cpus_plus = plus;
                }
            }
            "memory" => spec.memory = parse_memory(cx, val, "resources.memory")?,
            "any_of" | "ordered" => {
                if let Some((prev, _, _)) = alternatives {
                    return Err(cx.err(
                        k,
                        format!(
                            "resources: both '{prev}' and '{key}' are given; use only one of \
                             any_of (any alternative) or ordered (in order of preference)"
                        ),
                    ));
                }
                let which = if key == "any_of" { "any_of" } else { "ordered" };
                alternatives = Some((which, *k, *val));
            }
            _ if OTHER_RESOURCE_KEYS.contains(&key.as_str()) || key.starts_with('_') => {
                let json = to_json(cx, val, &format!("resources.{key}"))?;
                spec.other.insert(key.clone(), json);
            }
            _ => {
                return Err(cx.err(
                    k,
                    format!(
                        "resources.{key} is not a SkyPilot resources key{}; valid keys: \
                         accelerators, cpus, memory, any_of, ordered, {}",
                        suggest(key, RESOURCE_KEYS_FOR_HINTS)
                            .map(|s| format!(" (did you mean '{s}'?)"))
                            .unwrap_or_default(),
                        OTHER_RESOURCE_KEYS.join(", ")
                    ),
                ))
            }
        }
    }
    if let Some((which, _, list)) = alternatives {
        apply_alternatives(cx, &mut spec, which, list, top_accel_node)?;
    }
    Ok(spec)
}

/// `resources.any_of` / `resources.ordered`: each entry's accelerators (or, when it names
/// none, the top-level ones) become alternatives, in order. The list is recorded in `other`
/// with the inherited accelerators filled in, so the redacted YAML parses back the same.
pub(super) fn apply_alternatives(
    cx: &Cx<'_>,
    spec: &mut ResourceSpec,
    which: &str,
    list: &Node,
    top_accel_node: Option<&Node>,
) -> Result<(), SpecError> {
    let path = format!("resources.{which}");
    let items = match &list.kind {
        Kind::Null => return Ok(()),
        Kind::Seq(items) => items,
        other => {
            return Err(cx.err(
                list,
                format!(
                    "{path} must be a list of resource mappings (e.g. - accelerators: H100), \
                     not {}",
                    other.describe()
                ),
            ))
        }
    };
    let top = std::mem::take(&mut spec.accelerators);
    let top_json = match top_accel_node {
        Some(n) if !top.is_empty() => Some(to_json(cx, n, "resources.accelerators")?),
        _ => None,
    };
    let mut accels: Vec<AccelDemand> = Vec::new();
    let mut with_gpu: Option<usize> = None;
    let mut without_gpu: Option<usize> = None;
    let mut entry_cpus: Option<(Milli, bool)> = None;
    let mut recorded = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let ipath = format!("{path}[{i}]");
        let Kind::Map(m) = &item.kind else {
            return Err(cx.err(
                item,
                format!(
                    "{ipath} must be a resource mapping (accelerators, cpus, ...), not {}",
                    item.kind.describe()
                ),
            ));
        };
        let mut own: Option<Vec<AccelDemand>> = None;
        for (key, k, val) in entries(cx, m, &ipath)? {
            match key.as_str() {
                "accelerators" => {
                    own = Some(parse_accel_node(cx, val, &format!("{ipath}.accelerators"))?)
                }
                "cpus" => {
                    if let Some((c, plus)) = parse_cpus(cx, val, &format!("{ipath}.cpus"))? {
                        if entry_cpus.is_none_or(|(prev, _)| c > prev) {
                            entry_cpus = Some((c, plus));
                        }
                    }
                }
                "memory" => {
                    parse_memory(cx, val, &format!("{ipath}.memory"))?;
                }
                "any_of" | "ordered" => {
                    return Err(cx.err(k, format!("{ipath}: {key} cannot be nested")))
                }
                _ => {}
            }
        }
        let mut json = to_json(cx, item, &ipath)?;
        let chosen = match own {
            Some(a) if !a.is_empty() => a,
            _ => {
                if let (Some(tj), serde_json::Value::Object(obj)) = (&top_json, &mut json) {
                    obj.insert("accelerators".to_string(), tj.clone());
                }
                top.clone()
            }
        };
        if chosen.is_empty() {
            without_gpu.get_or_insert(i);
        } else {
            with_gpu.get_or_insert(i);
        }
        for a in chosen {
            push_unique(&mut accels, a);
        }
        recorded.push(json);
    }
    if let (Some(g), Some(n)) = (with_gpu, without_gpu) {
        return Err(cx.err(
            &items[n],
            format!(
                "{path}[{n}] names no accelerators while {path}[{g}] does; skyspool needs every \
                 alternative to name accelerators (or none of them to)"
            ),
        ));
    }
    spec.accelerators = accels;
    if spec.cpus.is_none() {
        if let Some((c, plus)) = entry_cpus {
            spec.cpus = Some(c);
            spec.cpus_plus = plus;
        }
    }
    spec.other
        .insert(which.to_string(), serde_json::Value::Array(recorded));
    Ok(())
}

pub(super) fn push_unique(list: &mut Vec<AccelDemand>, a: AccelDemand) {
    if !list
        .iter()
        .any(|x| x.count == a.count && x.kind.eq_ignore_ascii_case(&a.kind))
    {
        list.push(a);
    }
}

/// Every SkyPilot form of `accelerators`.
pub(super) fn parse_accel_node(
    cx: &Cx<'_>,
    v: &Node,
    path: &str,
) -> Result<Vec<AccelDemand>, SpecError> {
    let mut out = Vec::new();
    match &v.kind {
        Kind::Null => {}
        Kind::Str(s) => {
            let a = parse_accel_str(s).map_err(|m| cx.err(v, format!("{path}: {m}")))?;
            out.push(a);
        }
        Kind::Map(m) => {
            for a in parse_accel_map(cx, m, path)? {
                push_unique(&mut out, a);
            }
        }
        Kind::Seq(items) => {
            for (i, item) in items.iter().enumerate() {
                let ipath = format!("{path}[{i}]");
                match &item.kind {
                    Kind::Str(s) => {
                        let a = parse_accel_str(s)
                            .map_err(|m| cx.err(item, format!("{ipath}: {m}")))?;
                        push_unique(&mut out, a);
                    }
                    Kind::Map(m) => {
                        for a in parse_accel_map(cx, m, &ipath)? {
                            push_unique(&mut out, a);
                        }
                    }
                    other => {
                        return Err(cx.err(
                            item,
                            format!(
                                "{ipath}: an alternative is {}; {ACCEL_FORMS_HINT}",
                                other.describe()
                            ),
                        ))
                    }
                }
            }
        }
        other => {
            return Err(cx.err(
                v,
                format!(
                    "{path} is {} ({}); {ACCEL_FORMS_HINT}",
                    other.describe(),
                    shown(&v.scalar_text(cx).unwrap_or_default())
                ),
            ))
        }
    }
    Ok(out)
}

/// `{H100: 4}`, `{H100: null}` (= 1), and the flow set `{A100:1, V100:1}` (keys with counts,
/// null values). Several entries are alternatives, in the order written.
pub(super) fn parse_accel_map(
    cx: &Cx<'_>,
    m: &[(Node, Node)],
    path: &str,
) -> Result<Vec<AccelDemand>, SpecError> {
    let mut out = Vec::new();
    for (name, k, val) in entries(cx, m, path)? {
        let a = match &val.kind {
            Kind::Null => parse_accel_str(&name).map_err(|e| cx.err(k, format!("{path}: {e}")))?,
            Kind::Int(_) | Kind::Float(_) | Kind::Str(_) => {
                if name.contains(':') {
                    return Err(cx.err(
                        k,
                        format!(
                            "{path}: '{}' has a count both in the name and as the value; write \
                             {{H100: 4}} or H100:4",
                            shown(&name)
                        ),
                    ));
                }
                let count = val.scalar_text(cx).unwrap_or_default();
                accel_demand(name.trim(), count.trim())
                    .map_err(|e| cx.err(val, format!("{path}.{}: {e}", shown(&name))))?
            }
            other => {
                return Err(cx.err(
                    val,
                    format!(
                        "{path}.{}: the count must be a number (or null for 1), not {}",
                        shown(&name),
                        other.describe()
                    ),
                ))
            }
        };
        out.push(a);
    }
    Ok(out)
}

/// `H100`, `H100:4`, `H100:0.5`.
pub(super) fn parse_accel_str(s: &str) -> Result<AccelDemand, String> {
    let s = s.trim();
    let mut parts = s.split(':');
    let name = parts.next().unwrap_or("").trim();
    let count = parts.next().map(str::trim);
    if parts.next().is_some() {
        return Err(format!(
            "'{}' has more than one ':'; {ACCEL_FORMS_HINT}",
            shown(s)
        ));
    }
    match count {
        None => accel_demand(name, "1"),
        Some("") => Err(format!(
            "'{}' has no count after ':'; {ACCEL_FORMS_HINT}",
            shown(s)
        )),
        Some(c) => accel_demand(name, c),
    }
}

pub(super) fn accel_demand(name: &str, count: &str) -> Result<AccelDemand, String> {
    if !is_valid_accelerator_name(name) {
        return Err(format!(
            "'{}' is not a valid accelerator name (letters, digits, '_', '.', '-', starting \
             with a letter or digit); {ACCEL_FORMS_HINT}",
            shown(name)
        ));
    }
    let c = Milli::parse_positive(count).map_err(|e| {
        format!(
            "accelerator count for {name}: {e}; use a whole number >= 1 or a fraction below 1 \
             with at most 3 decimals (e.g. {name}:4, {name}:0.5)"
        )
    })?;
    if !c.is_whole() && c > Milli::ONE {
        return Err(format!(
            "accelerator count {c} for {name}: fractional counts must be below 1 (e.g. \
             {name}:0.5); above 1 use a whole number (e.g. {name}:2)"
        ));
    }
    Ok(AccelDemand {
        kind: name.to_string(),
        count: c,
    })
}

/// The text of a number-like scalar (a number or a string, as written); `None` for null
/// (not given); an error naming `expected` for anything else.
fn number_text(
    cx: &Cx<'_>,
    v: &Node,
    path: &str,
    expected: &str,
) -> Result<Option<String>, SpecError> {
    match &v.kind {
        Kind::Null => Ok(None),
        Kind::Int(_) | Kind::Float(_) | Kind::Str(_) => {
            Ok(Some(v.scalar_text(cx).unwrap_or_default()))
        }
        other => Err(cx.err(
            v,
            format!("{path} must be {expected}, not {}", other.describe()),
        )),
    }
}

/// `4`, `4+`, `0.5`, `"8+"`. Null = not given.
pub(super) fn parse_cpus(
    cx: &Cx<'_>,
    v: &Node,
    path: &str,
) -> Result<Option<(Milli, bool)>, SpecError> {
    let Some(text) = number_text(cx, v, path, "a number such as 4, 4+ or 0.5")? else {
        return Ok(None);
    };
    let t = text.trim();
    let (num, plus) = match t.strip_suffix('+') {
        Some(n) => (n.trim_end(), true),
        None => (t, false),
    };
    let c = Milli::parse_positive(num).map_err(|e| {
        cx.err(
            v,
            format!("{path}: {e}; valid forms are 4 (exactly), 4+ (at least) or 0.5"),
        )
    })?;
    Ok(Some((c, plus)))
}

/// `64`, `32+`, `64GB`, `0.5`, `16GB+`, `4x`; recorded as written (trimmed).
pub(super) fn parse_memory(cx: &Cx<'_>, v: &Node, path: &str) -> Result<Option<String>, SpecError> {
    let Some(text) = number_text(cx, v, path, "a size such as 64, 32+ or 64GB")? else {
        return Ok(None);
    };
    let t = text.trim();
    if !valid_memory(t) {
        return Err(cx.err(
            v,
            format!(
                "{path}: '{}' is not a memory size; valid forms are a positive number of GB \
                 (64, 0.5), optionally with a unit (KB, MB, GB, TB, PB) and/or a trailing + \
                 for \"at least\" (32+, 64GB, 16GB+)",
                shown(t)
            ),
        ));
    }
    Ok(Some(t.to_string()))
}

pub(super) fn valid_memory(t: &str) -> bool {
    let body = t.strip_suffix('+').unwrap_or(t);
    let digits = body
        .bytes()
        .take_while(|b| b.is_ascii_digit() || *b == b'.')
        .count();
    let (num, unit) = body.split_at(digits);
    let unit_ok = matches!(
        unit.to_ascii_lowercase().as_str(),
        "" | "b" | "k" | "kb" | "m" | "mb" | "g" | "gb" | "t" | "tb" | "p" | "pb" | "x"
    );
    let num_ok = !num.is_empty()
        && num.bytes().filter(|b| *b == b'.').count() <= 1
        && num.bytes().any(|b| (b'1'..=b'9').contains(&b));
    unit_ok && num_ok
}
