//! Fuzzing of the task-YAML parser and of the submission path.
//!
//! (a) The parser (`skyspool::spec::parse_bytes`) gets arbitrary bytes, near-YAML bytes,
//! grammar-generated YAML (keys, indentation, flow collections, anchors, aliases, tags,
//! numbers, block scalars) and mutations of it. It must never panic, must answer within
//! [`TIME_LIMIT`], must explain every error on one printable line, and every spec it accepts
//! must satisfy the invariants in [`check_spec`] (including the redacted-YAML round trip).
//! The corpus in `tests/fuzz-corpus/spec/` goes through the same checks (`ok-*` files must
//! parse, `bad-*` files must be refused, `any-*` may do either).
//!
//! (b) A running daemon gets random names (dots, tildes, spaces, unicode, control characters,
//! invalid UTF-8, `..`, editor and download suffixes) with random good or bad content in
//! `incoming/`: each becomes exactly one job or one rejection, or is left alone exactly when
//! `spool-layout.md` says so.
//!
//! Case counts are small by default (the suite runs in seconds in a debug build);
//! `SKYSPOOL_FUZZ_CASES` sets the parser tests' count and `SKYSPOOL_FUZZ_SUBMIT_CASES` the
//! submission test's (see `scripts/fuzz`). Each run draws a new random seed and a failure
//! names it: `SKYSPOOL_FUZZ_SEED=N` replays that run's inputs.
mod common;

use common::*;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use skyspool::resources::Milli;
use skyspool::spec::{self, JobSpec, SpecError};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest a single parse may take (debug build, busy 2-core machine included).
const TIME_LIMIT: Duration = Duration::from_secs(2);

/// The limit for an input of `len` bytes: [`TIME_LIMIT`], except for inputs near the 1 MiB
/// cap in a debug build (unoptimized serde-saphyr needs ~3 s for a MiB of small keys on a
/// busy 2-core machine; a release build, what the daemon runs, stays well under 2 s).
fn time_limit(len: usize) -> Duration {
    if cfg!(debug_assertions) && len > 64 * 1024 {
        Duration::from_secs(10)
    } else {
        TIME_LIMIT
    }
}

fn env_cases(var: &str, default: u32) -> u32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

/// Parser fuzzing config: `SKYSPOOL_FUZZ_CASES` cases if set, else `default`.
/// The seed of this run's inputs: `SKYSPOOL_FUZZ_SEED`, or drawn from the clock (and printed,
/// so that a failure can be replayed).
fn fuzz_seed() -> u64 {
    static SEED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SEED.get_or_init(|| {
        let seed = std::env::var("SKYSPOOL_FUZZ_SEED")
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            });
        eprintln!("fuzz seed: SKYSPOOL_FUZZ_SEED={seed}");
        seed
    })
}

/// How to replay a failure, for the failure message.
fn replay_hint() -> String {
    format!(
        "replay with SKYSPOOL_FUZZ_SEED={} (and the same SKYSPOOL_FUZZ_CASES)",
        fuzz_seed()
    )
}

fn parser_config(default: u32) -> Config {
    Config {
        cases: env_cases("SKYSPOOL_FUZZ_CASES", default),
        rng_seed: RngSeed::Fixed(fuzz_seed()),
        max_shrink_iters: 2048,
        // Failures are printed (minimal input included); no regression file is written into
        // the source tree.
        failure_persistence: None,
        ..Config::default()
    }
}

// ----------------------------------------------------------------------- invariants

/// Parses with a time limit; a panic fails the test (proptest reports the input).
fn parse_timed(bytes: &[u8]) -> Result<Result<JobSpec, SpecError>, TestCaseError> {
    let t0 = Instant::now();
    let r = spec::parse_bytes(bytes, "fuzz.yaml", &BTreeMap::new());
    let took = t0.elapsed();
    let limit = time_limit(bytes.len());
    if took > limit {
        return Err(TestCaseError::fail(format!(
            "parsing {} bytes took {took:?} (limit {limit:?})",
            bytes.len()
        )));
    }
    Ok(r)
}

/// A failure message, clipped: inputs can be a megabyte long.
fn fail(msg: String) -> TestCaseError {
    TestCaseError::fail(clip(&msg, 4000))
}

fn clip(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes in all)", &s[..end], s.len())
}

/// An error names the file, says something, stays on one printable line of bounded length,
/// and points at a line that exists.
fn check_error(bytes: &[u8], e: &SpecError) -> Result<(), TestCaseError> {
    let shown = e.to_string();
    if !shown.starts_with("fuzz.yaml") {
        return Err(fail(format!("error does not name the file: {shown:?}")));
    }
    if e.message.trim().is_empty() {
        return Err(fail(format!("empty error message: {e:?}")));
    }
    if let Some(c) = shown.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(fail(format!(
            "error message holds the control character {c:?} (it ends up in \
             rejected/NAME.reason, one readable paragraph): {shown:?}"
        )));
    }
    if shown.len() > 8192 {
        return Err(fail(format!("error message is {} bytes long", shown.len())));
    }
    if let Some(line) = e.line {
        // YAML's line breaks: `\r\n`, a lone `\r`, `\n`.
        let lines = bytes
            .iter()
            .enumerate()
            .filter(|&(i, &b)| b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')))
            .count()
            + 1;
        if line == 0 || line > lines + 1 {
            return Err(fail(format!(
                "error points at line {line} of a {lines}-line input: {shown:?}"
            )));
        }
    }
    if e.column == Some(0) {
        return Err(fail(format!("column 0 (columns are 1-based): {shown:?}")));
    }
    Ok(())
}

/// Whether the spec holds `$` where the parser substitutes envs (`workdir`, `file_mounts`):
/// the redacted YAML then parses back with one more round of substitution, a documented
/// limit of `to_redacted_yaml`.
fn substitution_sensitive(s: &JobSpec) -> bool {
    s.workdir.as_deref().is_some_and(|w| w.contains('$'))
        || serde_json::to_string(&s.file_mounts)
            .unwrap_or_default()
            .contains('$')
}

/// What every accepted spec satisfies.
fn check_spec(s: &JobSpec) -> Result<(), TestCaseError> {
    let bad = |what: String| Err(fail(format!("{what}\nspec: {s:#?}")));
    if s.num_nodes < 1 || s.num_nodes > spec::MAX_NUM_NODES {
        return bad(format!("num_nodes {}", s.num_nodes));
    }
    if let Some(n) = &s.name {
        if !spec::is_valid_task_name(n) {
            return bad(format!("invalid task name {n:?} accepted"));
        }
    }
    for (section, map) in [("envs", &s.envs), ("secrets", &s.secrets)] {
        for (k, v) in map {
            if !spec::is_valid_env_name(k) {
                return bad(format!("{section}: invalid name {k:?} accepted"));
            }
            if v.contains('\0') {
                return bad(format!("{section}.{k} holds a NUL"));
            }
        }
    }
    if let Some(k) = s.envs.keys().find(|k| s.secrets.contains_key(*k)) {
        return bad(format!("{k} is both an env and a secret"));
    }
    for a in &s.resources.accelerators {
        if a.count <= Milli::ZERO {
            return bad(format!("accelerator {a:?} with a count <= 0"));
        }
        if a.count > Milli::MAX {
            return bad(format!("accelerator {a:?} with an absurd count"));
        }
        if !a.count.is_whole() && a.count > Milli::ONE {
            return bad(format!("fractional count above 1: {a:?}"));
        }
        if !spec::is_valid_accelerator_name(&a.kind) {
            return bad(format!("invalid accelerator name {:?}", a.kind));
        }
    }
    if let Some(c) = s.resources.cpus {
        if c <= Milli::ZERO || c > Milli::MAX {
            return bad(format!("cpus {c:?}"));
        }
    }
    for (what, v) in [
        ("setup", &s.setup),
        ("run", &s.run),
        ("workdir", &s.workdir),
    ] {
        if v.as_deref().is_some_and(|t| t.contains('\0')) {
            return bad(format!("{what} holds a NUL"));
        }
    }
    if s.workdir.as_deref().is_some_and(|w| w.trim().is_empty()) {
        return bad("empty workdir accepted".into());
    }
    let d = s.demand();
    if d.num_nodes != s.num_nodes || d.per_node.accelerators != s.resources.accelerators {
        return bad(format!("demand {d:?} does not match the spec"));
    }
    if s.resources_display().is_empty() {
        return bad("empty RESOURCES column".into());
    }

    // Redaction: no secret value survives in the redacted text.
    let mut marked = s.clone();
    for (i, v) in marked.secrets.values_mut().enumerate() {
        *v = format!("FUZZSECRETMARKER{i}X");
    }
    let y = marked.to_redacted_yaml();
    if y.contains("FUZZSECRETMARKER") {
        return bad(format!("a secret value is in the redacted YAML:\n{y}"));
    }
    // Round trip: the redacted YAML parses back to the same spec, secrets redacted. (One
    // that would exceed the size limit is refused at admission by the daemon instead:
    // `large_job_with_secrets_is_rejected_or_runs` in tests/hostile.rs.)
    let y = s.to_redacted_yaml();
    if y.len() > spec::MAX_SPEC_BYTES && !s.secrets.is_empty() {
        return Ok(());
    }
    let back = match spec::parse(&y, "redacted.yaml", &BTreeMap::new()) {
        Ok(b) => b,
        Err(e) => return bad(format!("the redacted YAML does not parse: {e}\n{y}")),
    };
    let mut expect = s.clone();
    for v in expect.secrets.values_mut() {
        *v = spec::REDACTED.to_string();
    }
    if back != expect && !substitution_sensitive(s) {
        return bad(format!(
            "the redacted YAML parses back to another spec\n--- redacted ---\n{y}\n--- back ---\n{back:#?}"
        ));
    }
    Ok(())
}

/// The full check of one input: no panic, in time, deterministic, error or valid spec.
fn check_input(bytes: &[u8]) -> Result<Option<JobSpec>, TestCaseError> {
    let r = parse_timed(bytes)?;
    // Deterministic (checked on small inputs: a debug-build parse of a MiB takes seconds).
    if bytes.len() <= 64 * 1024 {
        let again = spec::parse_bytes(bytes, "fuzz.yaml", &BTreeMap::new());
        if r != again {
            return Err(fail(format!(
                "two parses of the same input differ: {r:?} vs {again:?}"
            )));
        }
    }
    match r {
        Ok(s) => {
            check_spec(&s)?;
            Ok(Some(s))
        }
        Err(e) => {
            check_error(bytes, &e)?;
            Ok(None)
        }
    }
}

// ---------------------------------------------------------------------- strategies

/// Bytes YAML is made of, plus troublemakers (NUL, ESC, DEL, BOM pieces, invalid UTF-8).
const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzHAV0123456789 \n\n\n\t:::---,[]{}&*!|>'\"#%@`?~.+_$\\/<=\r\0\x1b\x7f\xef\xbb\xbf\xc3\xa9\xff\xe2\x80\xae";

fn near_yaml_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop::sample::select(ALPHABET), 0..400)
}

/// Tokens that make up SkyPilot YAMLs, glued together at random.
fn token_soup() -> impl Strategy<Value = Vec<u8>> {
    let tokens: Vec<&'static str> = vec![
        "name",
        "run",
        "setup",
        "envs",
        "secrets",
        "resources",
        "accelerators",
        "cpus",
        "memory",
        "num_nodes",
        "workdir",
        "file_mounts",
        "any_of",
        "ordered",
        "service",
        "config",
        ":",
        ": ",
        "\n",
        "\n  ",
        "\n    ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ", ",
        "&a ",
        "*a",
        "&b ",
        "*b",
        "!!str ",
        "!!int ",
        "!!binary ",
        "!custom ",
        "<<: ",
        "|\n  ",
        ">-\n  ",
        "\"",
        "'",
        "#",
        "---\n",
        "...\n",
        "? ",
        "H100",
        "H100:4",
        "H100:0.5",
        "A100:8",
        "4+",
        "0",
        "-1",
        "1e9",
        ".nan",
        ".inf",
        "0x10",
        "null",
        "~",
        "true",
        "yes",
        "$HOME",
        "${X}",
        "echo hi",
        "\t",
        "\u{feff}",
        "é",
        "\u{202e}",
        "\\n",
        "1_000",
        "2001-01-01",
    ];
    prop::collection::vec(prop::sample::select(tokens), 0..60)
        .prop_map(|ts| ts.concat().into_bytes())
}

/// A YAML value, rendered later in block or flow style.
#[derive(Clone, Debug)]
enum Y {
    /// A scalar as written (plain, quoted, anything).
    Scalar(String),
    /// `|` / `>-` block scalar with these lines.
    Block(&'static str, Vec<String>),
    Seq(Vec<Y>, bool),
    Map(Vec<(String, Y)>, bool),
    Anchor(&'static str, Box<Y>),
    Alias(&'static str),
    Tagged(&'static str, Box<Y>),
}

fn scalar_text() -> impl Strategy<Value = String> {
    let fixed: Vec<&'static str> = vec![
        "0",
        "1",
        "2",
        "4",
        "8",
        "-1",
        "0.5",
        "0.25",
        "0.001",
        "0.0001",
        "1.5",
        "1e3",
        "1e9",
        "1e400",
        "1E-2",
        "0x10",
        "0o7",
        "1_000",
        ".nan",
        ".NaN",
        ".inf",
        "-.inf",
        "4+",
        "0.5+",
        "null",
        "Null",
        "~",
        "true",
        "false",
        "yes",
        "no",
        "on",
        "off",
        "H100",
        "H100:4",
        "H100:0.5",
        "H100:0",
        "H100:-1",
        "h100:2",
        "A100-80GB:8",
        "L4:1",
        "tpu-v4-8",
        ":1",
        "H100:1:2",
        "\"H100:2\"",
        "'A100'",
        "\"\"",
        "''",
        "\"a\\nb\"",
        "\"\\u0000\"",
        "\"\\e[2J\"",
        "\"\\x7f\"",
        "'it''s'",
        "echo hi",
        "$HOME",
        "${X}",
        "$X/y",
        "~/work",
        "../..",
        "/etc",
        ".",
        "s3://bucket/x",
        "64GB",
        "32+",
        "16GB+",
        "a: b",
        "- x",
        "#c",
        "x #c",
        "ünï",
        "€",
        "\u{202e}evil",
        "2001-12-14",
        "12:30:00",
        "[]",
        "{}",
        "@x",
        "`x",
        "%x",
        "\\",
        "a\tb",
        "9999999999999999999999999",
    ];
    prop_oneof![
        4 => prop::sample::select(fixed).prop_map(str::to_string),
        1 => "[a-zA-Z0-9_.:+ -]{0,12}",
        1 => any::<u32>().prop_map(|n| n.to_string()),
        1 => any::<f64>().prop_map(|f| format!("{f}")),
    ]
}

fn generic_key() -> impl Strategy<Value = String> {
    let keys: Vec<&'static str> = vec![
        "name",
        "run",
        "setup",
        "envs",
        "secrets",
        "resources",
        "accelerators",
        "cpus",
        "memory",
        "num_nodes",
        "workdir",
        "file_mounts",
        "any_of",
        "ordered",
        "infra",
        "cloud",
        "use_spot",
        "labels",
        "ports",
        "disk_size",
        "image_id",
        "service",
        "config",
        "source",
        "mode",
        "A",
        "B_1",
        "HF_TOKEN",
        "1X",
        "a-b",
        "_",
        "H100",
        "A100",
        "<<",
        "\"\"",
        "''",
        "null",
        "~",
        "1",
        "true",
        "\"a:b\"",
        "? [x]",
        "_internal",
        "unknown",
        "Run",
        "ACCELERATORS",
        // Control characters through YAML escapes: error messages must not echo them raw.
        "\"k\\e[2J\"",
        "\"a\\nb\"",
        "\"t\\tx\"",
        "\"\\u202eX\"",
    ];
    prop_oneof![
        5 => prop::sample::select(keys).prop_map(str::to_string),
        1 => "[a-zA-Z_][a-zA-Z0-9_]{0,8}",
    ]
}

fn leaf() -> impl Strategy<Value = Y> {
    prop_oneof![
        8 => scalar_text().prop_map(Y::Scalar),
        1 => (
            prop::sample::select(vec!["|", "|-", "|+", ">", ">-", "|2"]),
            prop::collection::vec("[a-z $#:\"'-]{0,16}", 0..4)
        )
            .prop_map(|(i, l)| Y::Block(i, l)),
        1 => prop::sample::select(vec!["a", "b", "zz"]).prop_map(Y::Alias),
    ]
}

fn tree() -> impl Strategy<Value = Y> {
    leaf().prop_recursive(4, 40, 6, |inner| {
        prop_oneof![
            3 => (prop::collection::vec(inner.clone(), 0..5), any::<bool>())
                .prop_map(|(v, flow)| Y::Seq(v, flow)),
            3 => (
                prop::collection::vec((generic_key(), inner.clone()), 0..5),
                any::<bool>()
            )
                .prop_map(|(v, flow)| Y::Map(v, flow)),
            1 => (prop::sample::select(vec!["a", "b"]), inner.clone())
                .prop_map(|(n, y)| Y::Anchor(n, Box::new(y))),
            1 => (
                prop::sample::select(vec![
                    "!!str", "!!int", "!!float", "!!bool", "!!null", "!!map", "!!seq",
                    "!!binary", "!custom", "!<tag:yaml.org,2002:str>", "!!python/object",
                ]),
                inner
            )
                .prop_map(|(t, y)| Y::Tagged(t, Box::new(y))),
        ]
    })
}

fn map_of(
    keys: impl Strategy<Value = String>,
    values: impl Strategy<Value = Y>,
    n: std::ops::Range<usize>,
) -> impl Strategy<Value = Y> {
    (prop::collection::vec((keys, values), n), any::<bool>()).prop_map(|(v, flow)| Y::Map(v, flow))
}

fn pick(v: Vec<&'static str>) -> impl Strategy<Value = Y> {
    prop::sample::select(v).prop_map(|s| Y::Scalar(s.to_string()))
}

fn accel_value() -> impl Strategy<Value = Y> {
    prop_oneof![
        4 => pick(vec![
            "H100", "H100:1", "H100:4", "H100:8", "H100:0.5", "H100:0.25", "A100:2",
            "A100-80GB:8", "L4", "h100:1", "H100:0", "H100:-1", "H100:1.5", "H100:1e9",
            "H100:nan", "H100:0.3333", "\"H100:2\"", "{A100:1, V100:1}", "[V100, A100:2]",
            "{H100: 4}", "{H100: null}", "{H100: 0.5}", "[H100:1, {A100: 2}]", "null",
        ]),
        1 => tree(),
    ]
}

fn resources_value() -> impl Strategy<Value = Y> {
    let key = prop::sample::select(vec![
        "accelerators",
        "cpus",
        "memory",
        "any_of",
        "ordered",
        "infra",
        "cloud",
        "use_spot",
        "disk_size",
        "labels",
        "ports",
        "image_id",
        "_x",
        "accelerator",
        "\"acc\\eler\"",
        "\"cpus\\n\"",
    ])
    .prop_map(str::to_string);
    let alt = map_of(
        prop::sample::select(vec!["accelerators", "cpus", "memory", "infra", "cloud"])
            .prop_map(str::to_string),
        accel_value(),
        0..3,
    );
    let value = prop_oneof![
        3 => accel_value(),
        2 => pick(vec!["1", "2", "4+", "0.5", "8", "0", "-1", ".nan", "64", "32+", "16GB+", "x"]),
        1 => (prop::collection::vec(alt, 0..3), any::<bool>()).prop_map(|(v, f)| Y::Seq(v, f)),
        1 => tree(),
    ];
    map_of(key, value, 0..5)
}

fn env_map_value() -> impl Strategy<Value = Y> {
    let name = prop_oneof![
        5 => prop::sample::select(vec!["A", "B_1", "HF_TOKEN", "PATH", "_X", "x1"]).prop_map(str::to_string),
        1 => prop::sample::select(vec!["1X", "a-b", "", "\"\"", "A B", "é"]).prop_map(str::to_string),
    ];
    map_of(name, prop_oneof![5 => leaf(), 1 => tree()], 0..4)
}

/// A value suited to a top-level key, or anything at all now and then.
fn value_for(key: &str) -> BoxedStrategy<Y> {
    let specific: BoxedStrategy<Y> = match key {
        "name" => pick(vec![
            "my-task", "a", "train_v2.1", "x--y", "x---y", "-x", "x-", "../x", "a/b", "123",
            "\"bad name\"", "null", "[a]",
        ])
        .boxed(),
        "num_nodes" => pick(vec![
            "1", "2", "4", "0", "-1", "1024", "1025", "1.5", "two", "null", "0x2", "1e1",
            "\"2\"", "99999999999999999999",
        ])
        .boxed(),
        "resources" => resources_value().boxed(),
        "envs" | "secrets" => env_map_value().boxed(),
        "file_mounts" => map_of(
            prop::sample::select(vec!["/data", "~/x", "$A/y", "", "/a b"]).prop_map(str::to_string),
            prop_oneof![
                3 => pick(vec!["s3://b/x", "./local", "~/.netrc", "null", "1"]),
                1 => map_of(
                    prop::sample::select(vec!["source", "mode", "name", "store"]).prop_map(str::to_string),
                    pick(vec!["s3://b", "MOUNT", "COPY", "gcs", "x"]),
                    0..3,
                ),
            ],
            0..3,
        )
        .boxed(),
        "workdir" => pick(vec![
            ".", "~/x", "$A/b", "${A}", "../../etc", "\"\"", "\" \"", "null", "/tmp",
            "{url: x, ref: y}", "[a]",
        ])
        .boxed(),
        "setup" | "run" => prop_oneof![
            3 => leaf(),
            1 => pick(vec!["[a, b]", "{a: b}", "1", "true", "null"]),
        ]
        .boxed(),
        _ => tree().boxed(),
    };
    prop_oneof![6 => specific, 1 => tree()].boxed()
}

fn top_key() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec![
            "name", "run", "setup", "envs", "secrets", "resources", "num_nodes", "workdir",
            "file_mounts", "service", "config", "event_callback", "_metadata",
        ])
        .prop_map(str::to_string),
        1 => generic_key(),
    ]
}

fn entry() -> impl Strategy<Value = (String, Y)> {
    top_key().prop_flat_map(|k| {
        let v = value_for(&k);
        (Just(k), v)
    })
}

/// A whole document: a top-level mapping (usually), with optional decorations.
fn document() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(entry(), 0..8),
        any::<bool>(),
        prop::sample::select(vec![
            "",
            "",
            "",
            "",
            "# comment\n",
            "---\n",
            "%YAML 1.2\n---\n",
            "\u{feff}",
            "--- !!map\n",
        ]),
        prop::sample::select(vec![
            "",
            "",
            "",
            "",
            "...\n",
            "---\nrun: x\n",
            "# end",
            "\n\n",
        ]),
        prop::option::weighted(0.1, tree()),
    )
        .prop_map(|(entries, flow, head, tail, other)| {
            let body = match other {
                Some(y) => render_top(&y),
                None => render_top(&Y::Map(entries, flow)),
            };
            format!("{head}{body}{tail}")
        })
}

fn flow(y: &Y) -> String {
    match y {
        Y::Scalar(s) => s.clone(),
        Y::Block(_, lines) => serde_json::to_string(&lines.join("\n")).unwrap(),
        Y::Seq(items, _) => format!(
            "[{}]",
            items.iter().map(flow).collect::<Vec<_>>().join(", ")
        ),
        Y::Map(entries, _) => format!(
            "{{{}}}",
            entries
                .iter()
                .map(|(k, v)| format!("{k}: {}", flow(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Y::Anchor(n, y) => format!("&{n} {}", flow(y)),
        Y::Alias(n) => format!("*{n}"),
        Y::Tagged(t, y) => format!("{t} {}", flow(y)),
    }
}

/// The text that follows `key:` or `-` for `y` whose children are indented by `indent`.
fn block(y: &Y, indent: usize) -> String {
    let pad = " ".repeat(indent);
    match y {
        Y::Scalar(s) => format!(" {s}\n"),
        Y::Alias(n) => format!(" *{n}\n"),
        Y::Block(ind, lines) => {
            let mut out = format!(" {ind}\n");
            for l in lines {
                out.push_str(&pad);
                out.push_str(l);
                out.push('\n');
            }
            out
        }
        Y::Seq(_, true) | Y::Map(_, true) => format!(" {}\n", flow(y)),
        Y::Seq(items, _) => {
            if items.is_empty() {
                return " []\n".into();
            }
            let mut out = String::from("\n");
            for it in items {
                out.push_str(&pad);
                out.push('-');
                out.push_str(&block(it, indent + 2));
            }
            out
        }
        Y::Map(entries, _) => {
            if entries.is_empty() {
                return " {}\n".into();
            }
            let mut out = String::from("\n");
            for (k, v) in entries {
                out.push_str(&pad);
                out.push_str(k);
                out.push(':');
                out.push_str(&block(v, indent + 2));
            }
            out
        }
        Y::Anchor(n, inner) => format!(" &{n}{}", block(inner, indent)),
        Y::Tagged(t, inner) => format!(" {t}{}", block(inner, indent)),
    }
}

fn render_top(y: &Y) -> String {
    match y {
        Y::Map(entries, false) if !entries.is_empty() => {
            let mut out = String::new();
            for (k, v) in entries {
                out.push_str(k);
                out.push(':');
                out.push_str(&block(v, 2));
            }
            out
        }
        other => block(other, 0).trim_start().to_string(),
    }
}

/// Small edits of a text: replace, insert or delete a byte, duplicate or drop a line.
fn mutated(text: String) -> impl Strategy<Value = Vec<u8>> {
    let len = text.len().max(1);
    prop::collection::vec((0..4u8, 0..len, prop::sample::select(ALPHABET)), 0..4).prop_map(
        move |edits| {
            let mut b = text.clone().into_bytes();
            for (op, at, byte) in edits {
                let at = at.min(b.len());
                match op {
                    0 if at < b.len() => b[at] = byte,
                    1 => b.insert(at, byte),
                    2 if at < b.len() => {
                        b.remove(at);
                    }
                    _ => {
                        // Duplicate the line holding `at`.
                        let start = b[..at]
                            .iter()
                            .rposition(|c| *c == b'\n')
                            .map_or(0, |i| i + 1);
                        let end = b[at..]
                            .iter()
                            .position(|c| *c == b'\n')
                            .map_or(b.len(), |i| at + i + 1);
                        let line = b[start..end].to_vec();
                        b.splice(end..end, line);
                    }
                }
            }
            b
        },
    )
}

// ------------------------------------------------------------------- parser tests

fn run_parser<S: Strategy>(default_cases: u32, strategy: S, bytes_of: impl Fn(&S::Value) -> Vec<u8>)
where
    S::Value: std::fmt::Debug,
{
    let mut runner = TestRunner::new(parser_config(default_cases));
    let oks = std::cell::Cell::new(0u32);
    let t0 = Instant::now();
    let result = runner.run(&strategy, |v| {
        let bytes = bytes_of(&v);
        if check_input(&bytes)?.is_some() {
            oks.set(oks.get() + 1);
        }
        Ok(())
    });
    eprintln!(
        "{} cases in {:?}, {} parsed into a spec",
        runner.config().cases,
        t0.elapsed(),
        oks.get()
    );
    if let Err(e) = result {
        panic!("{}", explain(e, bytes_of));
    }
}

/// A proptest failure with its minimal input shown as (escaped, clipped) text.
fn explain<V>(e: proptest::test_runner::TestError<V>, bytes_of: impl Fn(&V) -> Vec<u8>) -> String {
    match e {
        proptest::test_runner::TestError::Abort(r) => format!("aborted: {r}"),
        proptest::test_runner::TestError::Fail(r, v) => {
            let b = bytes_of(&v);
            format!(
                "{r}\nminimal failing input ({} bytes): {:?}\n{}",
                b.len(),
                clip(&String::from_utf8_lossy(&b), 2000),
                replay_hint()
            )
        }
    }
}

#[test]
fn fuzz_parser_arbitrary_bytes() {
    run_parser(
        2000,
        prop_oneof![
            2 => prop::collection::vec(any::<u8>(), 0..1024),
            3 => near_yaml_bytes(),
            3 => token_soup(),
        ],
        |b| b.clone(),
    );
}

#[test]
fn fuzz_parser_grammar() {
    run_parser(1000, document(), |t| t.clone().into_bytes());
}

#[test]
fn fuzz_parser_grammar_mutated() {
    run_parser(1000, document().prop_flat_map(mutated), |b| b.clone());
}

/// The grammar must reach valid specs often enough for the invariants to mean something.
#[test]
fn grammar_reaches_valid_specs() {
    let mut runner = TestRunner::deterministic();
    let strategy = document();
    let (mut ok, mut n) = (0, 0);
    for _ in 0..300 {
        let t = strategy.new_tree(&mut runner).unwrap().current();
        n += 1;
        if spec::parse(&t, "g.yaml", &BTreeMap::new()).is_ok() {
            ok += 1;
        }
    }
    eprintln!("{ok}/{n} grammar documents parse");
    assert!(ok * 20 >= n, "only {ok} of {n} generated documents parse");
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-corpus/spec")
}

/// Every corpus file through the same checks; `ok-*` must parse, `bad-*` must be refused.
#[test]
fn corpus_files_pass_the_parser_checks() {
    let mut files: Vec<PathBuf> = fs::read_dir(corpus_dir())
        .expect("tests/fuzz-corpus/spec")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension() == Some(OsStr::new("yaml")))
        .collect();
    files.sort();
    assert!(files.len() >= 25, "corpus too small: {}", files.len());
    let mut failures = Vec::new();
    for p in &files {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = fs::read(p).unwrap();
        match check_input(&bytes) {
            Err(e) => failures.push(format!("{name}: {e}")),
            Ok(spec) => {
                let parsed = spec.is_some();
                if name.starts_with("ok-") && !parsed {
                    let e = spec::parse_bytes(&bytes, &name, &BTreeMap::new()).unwrap_err();
                    failures.push(format!("{name}: must parse, got: {e}"));
                }
                if name.starts_with("bad-") && parsed {
                    failures.push(format!("{name}: must be refused, was accepted"));
                }
            }
        }
        // Each corpus file, mutated a little, through the same checks.
        let mut runner = TestRunner::new(Config {
            cases: env_cases("SKYSPOOL_FUZZ_CASES", 1000) / 50 + 1,
            rng_seed: RngSeed::Fixed(fuzz_seed()),
            failure_persistence: None,
            ..Config::default()
        });
        let text = String::from_utf8_lossy(&bytes).into_owned();
        if let Err(e) = runner.run(&mutated(text), |b| check_input(&b).map(|_| ())) {
            failures.push(format!("{name} (mutated): {}", explain(e, |b| b.clone())));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Big and nasty inputs, generated (too large to keep in the corpus): each is answered
/// within the time limit with an error (or a spec that passes the checks).
#[test]
fn nasty_generated_inputs_are_answered_in_time() {
    let max = spec::MAX_SPEC_BYTES;
    let fill = |unit: &str, prefix: &str| {
        let mut s = String::from(prefix);
        while s.len() + unit.len() <= max {
            s.push_str(unit);
        }
        s
    };
    let mut laughs = String::from("a0: &a0 [x,x,x,x,x,x,x,x,x,x]\n");
    for i in 1..12 {
        laughs.push_str(&format!(
            "a{i}: &a{i} [{}]\n",
            vec![format!("*a{}", i - 1); 10].join(",")
        ));
    }
    laughs.push_str("run: x\n");
    let mut many_anchors = String::from("envs:\n");
    for i in 0..5000 {
        many_anchors.push_str(&format!("  V{i}: &a{i} v\n"));
    }
    many_anchors.push_str("run: x\n");
    let mut big_alias = String::from("envs:\n  A: &big \"");
    big_alias.push_str(&"x".repeat(500_000));
    big_alias.push_str("\"\n  B: *big\n  C: *big\n  D: *big\n  E: *big\nrun: x\n");
    let mut nested_block = String::new();
    for i in 0..400 {
        nested_block.push_str(&" ".repeat(i));
        nested_block.push_str("k:\n");
    }
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("10k [", "[".repeat(10_000).into_bytes()),
        ("10k {", "{".repeat(10_000).into_bytes()),
        (
            "run: 10k [",
            format!("run: {}", "[".repeat(10_000)).into_bytes(),
        ),
        ("10k '- '", "- ".repeat(10_000).into_bytes()),
        ("block nesting 400", nested_block.into_bytes()),
        ("billion laughs", laughs.into_bytes()),
        ("5000 anchors", many_anchors.into_bytes()),
        ("big alias x4", big_alias.into_bytes()),
        ("1 MiB of list items", fill("- a\n", "").into_bytes()),
        ("1 MiB of keys", {
            let mut s = String::new();
            let mut i = 0;
            while s.len() < max - 32 {
                s.push_str(&format!("k{i}: v\n"));
                i += 1;
            }
            s.into_bytes()
        }),
        ("1 MiB comment", fill("#", "run: x\n").into_bytes()),
        ("1 MiB of envs", {
            let mut s = String::from("envs:\n");
            let mut i = 0;
            while s.len() < max - 64 {
                s.push_str(&format!("  E{i}: value{i}\n"));
                i += 1;
            }
            s.push_str("run: x\n");
            s.into_bytes()
        }),
        (
            "1 MiB + 1",
            fill(" ", "run: x\n")
                .into_bytes()
                .into_iter()
                .chain([b'x', b'y'])
                .collect(),
        ),
        ("1 MiB of NULs", vec![0u8; max]),
        ("1 MiB of 0xff", vec![0xffu8; max]),
        ("1 MiB of newlines", vec![b'\n'; max]),
        ("1 MiB of quotes", vec![b'"'; max]),
        (
            "long flow map",
            format!("{{{}}}", vec!["a: b"; 50_000].join(", ")).into_bytes(),
        ),
        ("many documents", "---\n".repeat(50_000).into_bytes()),
        ("deep alias chain", {
            let mut s = String::from("a0: &a0 x\n");
            for i in 1..1000 {
                s.push_str(&format!("a{i}: &a{i} [*a{}]\n", i - 1));
            }
            s.push_str("run: x\n");
            s.into_bytes()
        }),
        ("merge bomb", {
            let mut s = String::from("m0: &m0 {k0: v}\n");
            for i in 1..20 {
                s.push_str(&format!(
                    "m{i}: &m{i} {{<<: [*m{}, *m{}], k{i}: v}}\n",
                    i - 1,
                    i - 1
                ));
            }
            s.push_str("run: x\n");
            s.into_bytes()
        }),
    ];
    let mut failures = Vec::new();
    for (what, bytes) in &cases {
        let t0 = Instant::now();
        match check_input(bytes) {
            Err(e) => failures.push(format!("{what}: {e}")),
            Ok(_) => eprintln!("{what}: {:?}", t0.elapsed()),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A spec accepted within the size limit has a redacted YAML that parses back: the daemon
/// stores the redacted YAML as `job.yaml` of a job with secrets and parses it again to start
/// the job. Re-serializing may lengthen the text (long lines are folded, with an indent per
/// line), past the limit.
#[test]
fn redacted_yaml_of_a_spec_within_the_limit_parses_back() {
    let max = spec::MAX_SPEC_BYTES;
    let mut failures = Vec::new();
    for (what, prefix) in [
        ("long plain run", "run: echo "),
        (
            "long run with secrets",
            "secrets:\n  TOKEN: abc\nrun: echo ",
        ),
    ] {
        let mut text = String::from(prefix);
        while text.len() < max - 16 {
            text.push_str("word ");
        }
        text.push('\n');
        match check_input(text.as_bytes()) {
            Ok(Some(_)) => {}
            Ok(None) => failures.push(format!("{what}: refused")),
            Err(e) => failures.push(format!("{what} ({} bytes): {e}", text.len())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// --------------------------------------------------------------- submission path

/// What the contract says a name in incoming/ is, given whether its content is a good job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    Ignored,
    Rejected,
    Job,
}

/// spool-layout.md, "Submitting": names the daemon leaves alone, then names that are
/// rejected whatever they hold, then extension and content.
fn fate(name: &[u8], good: bool) -> Fate {
    let ends = |s: &[u8]| name.ends_with(s);
    if name.first() == Some(&b'.')
        || name.first() == Some(&b'#')
        || ends(b"~")
        || ends(b".swp")
        || ends(b".swx")
        || ends(b".tmp")
        || ends(b".part")
        || ends(b".partial")
    {
        return Fate::Ignored;
    }
    let Ok(text) = std::str::from_utf8(name) else {
        return Fate::Rejected;
    };
    if text.chars().any(char::is_control) {
        return Fate::Rejected;
    }
    if !(text.ends_with(".yaml") || text.ends_with(".yml")) {
        return Fate::Rejected;
    }
    if good {
        Fate::Job
    } else {
        Fate::Rejected
    }
}

/// The printable name a rejection is filed under (control characters, invalid UTF-8 and
/// `/` as `_`; leading dots dropped).
fn sanitized(name: &[u8]) -> String {
    let s: String = String::from_utf8_lossy(name)
        .chars()
        .map(|c| {
            if c.is_control() || c == '/' || c == '\u{FFFD}' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "unnamed".into()
    } else {
        s
    }
}

fn name_strategy() -> impl Strategy<Value = Vec<u8>> {
    let prefixes: Vec<&'static [u8]> = vec![
        b"", b"", b"", b".", b"#", b"..", b" ", b"~", b"-", b"\xff", b"\n",
    ];
    let stems: Vec<&'static [u8]> = vec![
        b"job",
        b"a b",
        "ünï".as_bytes(),
        "日本".as_bytes(),
        b"x\ny",
        b"tab\tx",
        b"del\x7f",
        b"e\x1b[1m",
        b"..",
        b"-",
        b"caf\xe9",
        b"bad\xff\xfe",
        b"j.yaml",
        b"n",
        "\u{202e}rtl".as_bytes(),
        b"#x",
        b"x~y",
        b"%20",
        b"'q'",
        b"\"dq\"",
        b"*",
        b"?",
    ];
    let suffixes: Vec<&'static [u8]> = vec![
        b".yaml",
        b".yaml",
        b".yaml",
        b".yml",
        b".YAML",
        b".yaml~",
        b".yaml.swp",
        b".swx",
        b".tmp",
        b".part",
        b".partial",
        b"",
        b".txt",
        b".yaml.bak",
        b"#",
        b"~",
        b" ",
        b".yaml ",
        b"..yaml",
    ];
    (
        prop::sample::select(prefixes),
        prop::sample::select(stems),
        prop::sample::select(suffixes),
    )
        .prop_map(|(p, s, x)| [p, s, x].concat())
        .prop_filter("not a valid single name", |n| {
            !n.is_empty() && n != b"." && n != b".." && !n.contains(&b'/') && !n.contains(&0)
        })
}

const GOOD: &[&str] = &[
    "run: echo ok\n",
    "name: fuzz-job\nrun: echo ok\n",
    "resources:\n  accelerators: H100:1\nrun: echo gpu\n",
    "envs:\n  A: 1\nrun: echo $A\n",
    "setup: echo s\nrun: echo r\n",
    "resources:\n  accelerators: {H100: 0.5}\n  cpus: 1\nrun: \"true\"\n",
];

const BAD: &[&[u8]] = &[
    b"",
    b"run: [\n",
    b"- a\n",
    b"resources:\n  accelerators: H100:9\nrun: x\n",
    b"num_nodes: 0\nrun: x\n",
    b"\x00\x01binary\xff",
    b"run: echo a\nrun: echo b\n",
    b"name: ../x\nrun: x\n",
    b"\xff\xfe",
    b"nonsense: 1\n",
];

#[derive(Clone)]
struct Submission {
    name: Vec<u8>,
    /// Index into GOOD (Ok) or BAD (Err).
    content: Result<usize, usize>,
    /// 0: safe protocol (dot-name in incoming/, rename), 1: rename from outside, 2: written
    /// in place (create, write, close).
    how: u8,
}

impl std::fmt::Debug for Submission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} ({}, {:?}, written {})",
            String::from_utf8_lossy(&self.name),
            match self.content {
                Ok(i) => format!("good #{i}"),
                Err(i) => format!("bad #{i}"),
            },
            self.fate(),
            ["by safe rename", "by rename from outside", "in place"][self.how.min(2) as usize]
        )
    }
}

impl Submission {
    fn bytes(&self) -> &[u8] {
        match self.content {
            Ok(i) => GOOD[i].as_bytes(),
            Err(i) => BAD[i],
        }
    }
    fn fate(&self) -> Fate {
        fate(&self.name, self.content.is_ok())
    }
}

fn submissions() -> impl Strategy<Value = Vec<Submission>> {
    prop::collection::vec(
        (
            name_strategy(),
            prop_oneof![
                3 => (0..GOOD.len()).prop_map(Ok),
                2 => (0..BAD.len()).prop_map(Err),
            ],
            0..3u8,
        )
            .prop_map(|(name, content, how)| Submission { name, content, how }),
        1..=10,
    )
    .prop_map(|v| {
        // Distinct names within a case.
        let mut seen = BTreeSet::new();
        v.into_iter()
            .filter(|s| seen.insert(s.name.clone()))
            .collect()
    })
}

fn list(dir: &Path) -> BTreeSet<Vec<u8>> {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().as_bytes().to_vec())
                .collect()
        })
        .unwrap_or_default()
}

/// One case against a running daemon: every submission becomes exactly one job or one
/// rejection, or stays in incoming/ untouched when its name is one the daemon leaves alone.
fn check_submissions(d: &Daemon, subs: &[Submission]) -> Result<(), TestCaseError> {
    let incoming = d.path("incoming");
    let rejected = d.path("rejected");
    // Start clean: whatever an earlier (failed or shrinking) case left in incoming/ goes.
    for n in list(&incoming) {
        let p = incoming.join(OsStr::from_bytes(&n));
        let _ = fs::remove_file(&p).or_else(|_| fs::remove_dir_all(&p));
    }
    let jobs_before: BTreeSet<u64> = d.job_ids().into_iter().collect();
    let rejected_before = list(&rejected);
    let scratch = d.scratch();
    for (i, s) in subs.iter().enumerate() {
        let dst = incoming.join(OsStr::from_bytes(&s.name));
        match s.how {
            0 => {
                let tmp = incoming.join(format!(".fuzz-{i}.partial-write"));
                fs::write(&tmp, s.bytes()).unwrap();
                fs::rename(&tmp, &dst).unwrap();
            }
            1 => {
                let tmp = scratch.join(format!("fuzz-{i}"));
                fs::write(&tmp, s.bytes()).unwrap();
                fs::rename(&tmp, &dst).unwrap();
            }
            _ => fs::write(&dst, s.bytes()).unwrap(),
        }
    }
    let want_jobs: Vec<&Submission> = subs.iter().filter(|s| s.fate() == Fate::Job).collect();
    let want_rejected: Vec<&Submission> =
        subs.iter().filter(|s| s.fate() == Fate::Rejected).collect();
    let ignored: Vec<&Submission> = subs.iter().filter(|s| s.fate() == Fate::Ignored).collect();
    let ignored_names: BTreeSet<Vec<u8>> = ignored.iter().map(|s| s.name.clone()).collect();
    let new_jobs = || -> Vec<u64> {
        d.job_ids()
            .into_iter()
            .filter(|i| !jobs_before.contains(i) && d.job(*i).join("status").exists())
            .collect()
    };
    let new_rejected = || -> Vec<Vec<u8>> {
        list(&rejected)
            .into_iter()
            .filter(|n| !rejected_before.contains(n) && !n.ends_with(b".reason"))
            .collect()
    };
    let describe = || {
        format!(
            "submissions: {:#?}\nincoming/: {:?}\nnew rejections: {:?}\nnew jobs: {:?}\n{}",
            subs.iter()
                .map(|s| (
                    String::from_utf8_lossy(&s.name).into_owned(),
                    s.fate(),
                    s.how
                ))
                .collect::<Vec<_>>(),
            list(&incoming)
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect::<Vec<_>>(),
            new_rejected()
                .iter()
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect::<Vec<_>>(),
            new_jobs(),
            d.daemon_log()
                .lines()
                .rev()
                .take(20)
                .collect::<Vec<_>>()
                .join("\n")
        )
    };
    let deadline = Instant::now() + DEADLINE;
    loop {
        let left: BTreeSet<Vec<u8>> = list(&incoming)
            .into_iter()
            .filter(|n| !n.starts_with(b".fuzz-"))
            .collect();
        let settled = left.is_subset(&ignored_names)
            && new_jobs().len() >= want_jobs.len()
            && new_rejected().len() >= want_rejected.len();
        if settled {
            break;
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "not settled within {DEADLINE:?} (a submission was neither admitted, rejected \
                 nor left alone as expected)\n{}",
                describe()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Give a wrongly handled ignored name, or a second job from one file, time to show.
    std::thread::sleep(Duration::from_millis(150));
    let jobs = new_jobs();
    let rejections = new_rejected();
    let mut problems = Vec::new();
    // Exactly one job per good submission, with its source.
    let mut sources: Vec<String> = jobs
        .iter()
        .map(|i| d.info(*i)["source"].as_str().unwrap_or("?").to_string())
        .collect();
    sources.sort();
    let mut want_sources: Vec<String> = want_jobs
        .iter()
        .map(|s| format!("incoming/{}", String::from_utf8_lossy(&s.name)))
        .collect();
    want_sources.sort();
    if sources != want_sources {
        problems.push(format!(
            "job sources {sources:?}, expected {want_sources:?}"
        ));
    }
    // Exactly one rejection per bad submission, under its sanitized name (or NAME.N).
    let mut want_bases: BTreeMap<String, usize> = BTreeMap::new();
    for s in &want_rejected {
        *want_bases.entry(sanitized(&s.name)).or_default() += 1;
    }
    for r in &rejections {
        let Ok(r) = std::str::from_utf8(r) else {
            problems.push(format!(
                "rejected/{:?} is not UTF-8",
                String::from_utf8_lossy(r)
            ));
            continue;
        };
        if r.chars().any(char::is_control) {
            problems.push(format!("rejected/{r:?} has a control character"));
        }
        let base = want_bases.keys().find(|b| {
            r == b.as_str()
                || r.strip_prefix(b.as_str())
                    .and_then(|rest| rest.strip_prefix('.'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
        });
        match base.cloned() {
            Some(b) => {
                let reason =
                    fs::read_to_string(rejected.join(format!("{r}.reason"))).unwrap_or_default();
                // Reasons show direction controls escaped (they could disguise names).
                let shown: String = b
                    .chars()
                    .map(|c| match c {
                        '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => {
                            c.escape_unicode().to_string()
                        }
                        c => c.to_string(),
                    })
                    .collect();
                if !(reason.contains(&b) || reason.contains(&shown))
                    || reason.trim_end().chars().any(char::is_control)
                {
                    problems.push(format!("rejected/{r}.reason: {reason:?}"));
                }
                let n = want_bases.get_mut(&b).unwrap();
                *n -= 1;
                if *n == 0 {
                    want_bases.remove(&b);
                }
            }
            None => problems.push(format!("unexpected rejection rejected/{r}")),
        }
    }
    if !want_bases.is_empty() {
        problems.push(format!("missing rejections: {want_bases:?}"));
    }
    // Ignored names: still there, unchanged.
    for s in &ignored {
        let p = incoming.join(OsStr::from_bytes(&s.name));
        match fs::read(&p) {
            Ok(b) if b == s.bytes() => {}
            Ok(_) => problems.push(format!(
                "ignored {:?} was changed",
                String::from_utf8_lossy(&s.name)
            )),
            Err(_) => problems.push(format!(
                "ignored {:?} was moved out of incoming/ (spool-layout.md: names starting \
                 with . or #, or ending in ~ .swp .swx .tmp .part .partial are left alone)",
                String::from_utf8_lossy(&s.name)
            )),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(fail(format!("{}\n{}", problems.join("\n"), describe())))
    }
}

#[test]
fn fuzz_submission_path() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let dog = Watchdog::arm(&d, Duration::from_secs(600));
    let mut runner = TestRunner::new(Config {
        cases: env_cases("SKYSPOOL_FUZZ_SUBMIT_CASES", 20),
        max_shrink_iters: 64,
        max_shrink_time: 20_000,
        rng_seed: RngSeed::Fixed(fuzz_seed()),
        failure_persistence: None,
        ..Config::default()
    });
    let t0 = Instant::now();
    let result = runner.run(&submissions(), |subs| check_submissions(&d, &subs));
    eprintln!("submission fuzzing: {:?}", t0.elapsed());
    if let Err(e) = result {
        panic!("{e}\n{}", replay_hint());
    }
    // Every admitted job was a good one: all of them succeed.
    for id in d.job_ids() {
        d.wait_done(id, "SUCCEEDED");
    }
    dog.disarm();
}
