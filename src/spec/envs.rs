//! `envs` and `secrets` (with `${VAR}` substitution, as SkyPilot does) and `file_mounts`.

use super::*;

pub(super) type EnvMap = BTreeMap<String, String>;

pub(super) fn build_envs_and_secrets(
    cx: &Cx<'_>,
    envs: Option<&(&Node, &Node)>,
    secrets: Option<&(&Node, &Node)>,
    overrides: &BTreeMap<String, String>,
) -> Result<(EnvMap, EnvMap), SpecError> {
    let envs_out = match envs {
        None => BTreeMap::new(),
        Some((_, v)) => env_map(cx, v, "envs", overrides)?,
    };
    let secrets_out = match secrets {
        None => BTreeMap::new(),
        Some((_, v)) => env_map(cx, v, "secrets", overrides)?,
    };
    if let (Some((_, sv)), Some(_)) = (secrets, envs) {
        if let Kind::Map(m) = &sv.kind {
            for (k, _) in m {
                if let Some(name) = k.key_text(cx) {
                    if envs_out.contains_key(&name) {
                        return Err(cx.err(
                            k,
                            format!(
                                "secrets.{} is also defined in envs; a name must be either an \
                                 env or a secret, not both",
                                shown(&name)
                            ),
                        ));
                    }
                }
            }
        }
    }
    Ok((envs_out, secrets_out))
}

pub(super) fn env_map(
    cx: &Cx<'_>,
    v: &Node,
    section: &str,
    overrides: &BTreeMap<String, String>,
) -> Result<EnvMap, SpecError> {
    let map = match &v.kind {
        Kind::Null => return Ok(BTreeMap::new()),
        Kind::Map(m) => m,
        Kind::Seq(_) if section == "secrets" => {
            return Err(cx.err(
                v,
                "secrets must be a mapping of NAME: value (SkyPilot's list form of managed \
                 secret references is not supported by skyspool)",
            ))
        }
        other => {
            return Err(cx.err(
                v,
                format!(
                    "{section} must be a mapping of NAME: value, not {}",
                    other.describe()
                ),
            ))
        }
    };
    let mut out = BTreeMap::new();
    for (name, k, val) in entries(cx, map, section)? {
        if !is_valid_env_name(&name) {
            return Err(cx.err(
                k,
                format!(
                    "{section}: '{}' is not a valid variable name; names must match \
                     ^[a-zA-Z_][a-zA-Z0-9_]*$ (letters, digits and _, not starting with a digit)",
                    shown(&name)
                ),
            ));
        }
        let value = if let Some(o) = overrides.get(&name) {
            o.clone()
        } else {
            match &val.kind {
                Kind::Null => {
                    let flag = if section == "secrets" {
                        "--secret"
                    } else {
                        "--env"
                    };
                    return Err(cx.err(
                        val,
                        format!(
                            "{section}.{name} is null: give it a value in the YAML or override \
                             it when submitting ({flag} {name}=VALUE)"
                        ),
                    ));
                }
                Kind::Seq(_) | Kind::Map(_) => {
                    return Err(cx.err(
                        val,
                        format!(
                            "{section}.{name} must be a string, number or boolean, not {}",
                            val.kind.describe()
                        ),
                    ))
                }
                _ => val.scalar_text(cx).unwrap_or_default(),
            }
        };
        if value.contains('\0') {
            return Err(cx.err(val, format!("{section}.{name} contains a NUL character")));
        }
        out.insert(name, value);
    }
    Ok(out)
}

/// Replaces `${NAME}` and `$NAME` with the value of env `NAME`; unknown names stay as written.
pub(super) fn substitute_envs(s: &str, envs: &EnvMap) -> String {
    if envs.is_empty() || !s.contains('$') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(inner) = after.strip_prefix('{') {
            if let Some(end) = inner.find('}') {
                let name = &inner[..end];
                if let Some(val) = envs.get(name).filter(|_| is_valid_env_name(name)) {
                    out.push_str(val);
                    rest = &inner[end + 1..];
                    continue;
                }
            }
        } else {
            let len = after
                .bytes()
                .take_while(|b| b.is_ascii_alphanumeric() || *b == b'_')
                .count();
            let name = &after[..len];
            if is_valid_env_name(name) {
                if let Some(val) = envs.get(name) {
                    out.push_str(val);
                    rest = &after[len..];
                    continue;
                }
            }
        }
        out.push('$');
        rest = after;
    }
    out.push_str(rest);
    out
}

pub(super) fn substitute_json(v: &mut serde_json::Value, envs: &EnvMap) {
    match v {
        serde_json::Value::String(s) => *s = substitute_envs(s, envs),
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| substitute_json(i, envs)),
        serde_json::Value::Object(map) => {
            let old = std::mem::take(map);
            for (k, mut val) in old {
                substitute_json(&mut val, envs);
                map.insert(substitute_envs(&k, envs), val);
            }
        }
        _ => {}
    }
}

pub(super) fn parse_file_mounts(
    cx: &Cx<'_>,
    v: &Node,
    envs: &EnvMap,
) -> Result<BTreeMap<String, serde_json::Value>, SpecError> {
    let map = match &v.kind {
        Kind::Null => return Ok(BTreeMap::new()),
        Kind::Map(m) => m,
        other => {
            return Err(cx.err(
                v,
                format!(
                    "file_mounts must be a mapping of destination path: source (a path or a \
                     storage mapping), not {}",
                    other.describe()
                ),
            ))
        }
    };
    let mut out = BTreeMap::new();
    for (dst, k, val) in entries(cx, map, "file_mounts")? {
        if dst.trim().is_empty() {
            return Err(cx.err(k, "file_mounts: a destination path is empty"));
        }
        match &val.kind {
            Kind::Str(_) | Kind::Map(_) => {}
            other => {
                return Err(cx.err(
                    val,
                    format!(
                        "file_mounts.{} must be a source path or a storage mapping \
                         ({{source: ..., mode: ...}}), not {}",
                        shown(&dst),
                        other.describe()
                    ),
                ))
            }
        }
        let mut json = to_json(cx, val, &format!("file_mounts.{dst}"))?;
        substitute_json(&mut json, envs);
        let dst = substitute_envs(&dst, envs);
        if out.insert(dst.clone(), json).is_some() {
            return Err(cx.err(
                k,
                format!(
                    "file_mounts: destination '{}' appears twice after substituting envs",
                    shown(&dst)
                ),
            ));
        }
    }
    Ok(out)
}

/// A JSON copy of a node (for `resources.other` and `file_mounts`).
pub(super) fn to_json(cx: &Cx<'_>, n: &Node, path: &str) -> Result<serde_json::Value, SpecError> {
    use serde_json::Value;
    Ok(match &n.kind {
        Kind::Null => Value::Null,
        Kind::Bool(b) => Value::Bool(*b),
        Kind::Int(i) => {
            if let Ok(x) = i64::try_from(*i) {
                Value::from(x)
            } else if let Ok(x) = u64::try_from(*i) {
                Value::from(x)
            } else {
                Value::String(n.scalar_text(cx).unwrap_or_else(|| i.to_string()))
            }
        }
        Kind::Float(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(n.scalar_text(cx).unwrap_or_default())),
        Kind::Str(s) => Value::String(s.clone()),
        Kind::Seq(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| to_json(cx, item, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Kind::Map(m) => {
            let mut obj = serde_json::Map::new();
            for (key, _, val) in entries(cx, m, path)? {
                let child = to_json(cx, val, &join_path(path, &key))?;
                obj.insert(key, child);
            }
            Value::Object(obj)
        }
    })
}
