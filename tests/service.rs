//! The shipped systemd unit (`scripts/skyspool.service`): valid for systemd, with a command
//! line the binary accepts, and stopping the daemon only (`KillMode=process`, SIGTERM), which
//! is the stop that `tests/restart.rs` shows running jobs survive.
mod common;
use common::*;
use std::collections::BTreeMap;
use std::process::Command;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/skyspool.service");
/// Where the unit expects the binary (its install steps put it there).
const INSTALLED: &str = "/usr/local/bin/skyspool";

/// The `[Service]` section's `Key=value` lines (a key given twice keeps its last value, as
/// systemd does for these keys).
fn service_keys(text: &str) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let mut section = "";
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            section = line;
            continue;
        }
        if section == "[Service]" {
            if let Some((k, v)) = line.split_once('=') {
                keys.insert(k.trim().to_string(), v.trim().to_string());
            }
        }
    }
    keys
}

#[test]
fn the_unit_stops_the_daemon_only_and_runs_a_valid_command() {
    let text = std::fs::read_to_string(UNIT).expect("scripts/skyspool.service");
    let keys = service_keys(&text);
    // systemd's default (control-group) would kill every running job with the daemon.
    assert_eq!(keys.get("KillMode").map(String::as_str), Some("process"));
    assert_eq!(keys.get("KillSignal").map(String::as_str), Some("SIGTERM"));
    let exec = keys.get("ExecStart").expect("ExecStart");
    let mut words = exec.split_whitespace();
    assert_eq!(words.next(), Some(INSTALLED), "{exec}");
    // The same arguments, to the built binary, with --help: clap refuses any it does not know.
    let args: Vec<&str> = words.collect();
    let out = Command::new(BIN)
        .args(&args)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{exec}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Run the scheduler daemon"));
}

#[test]
fn systemd_analyze_verify_finds_nothing_wrong() {
    if !have_program("systemd-analyze") {
        skip("systemd-analyze not installed (apt-get install systemd)");
        return;
    }
    let text = std::fs::read_to_string(UNIT).expect("scripts/skyspool.service");
    // Verified against the built binary: systemd checks that ExecStart's program exists.
    let tmp = tempfile::tempdir().unwrap();
    let unit = tmp.path().join("skyspool.service");
    std::fs::write(&unit, text.replace(INSTALLED, BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A bad value is only a warning to systemd ("..., ignoring"): any output fails.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {stderr}"
    );
}

/// What `KillMode=process` relies on: `systemctl restart` sends SIGTERM to the daemon alone
/// and starts it again. A job running meanwhile goes on under its supervisor, is re-adopted by
/// the new daemon, and ends once, with its status and full log.
#[test]
fn a_running_job_outlives_a_sigterm_restart() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "2"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "held");
    let runs = s.join("runs");
    let id = d.submit(
        "held.yaml",
        &format!(
            "resources:\n  accelerators: H100:1\nrun: |\n  echo run >> {runs}\n  echo before\n  {wait}\n  echo after\n",
            runs = runs.display(),
            wait = gate.wait_cmd()
        ),
    );
    wait_until(
        DEADLINE,
        "the job to run",
        || d.log(id).contains("before"),
        || d.diagnostics(),
    );
    let sup = d.supervisor_pid(id).expect("the supervisor's record");
    d.stop();
    assert!(alive(sup), "the supervisor died with the daemon");
    assert_eq!(d.status(id), "RUNNING");
    d.spawn();
    // Re-adopted with its GPU: a second GPU job waits for it.
    let next = d.submit(
        "next.yaml",
        "resources:\n  accelerators: H100:1\nrun: echo next\n",
    );
    assert_eq!(d.status(next), "PENDING", "{}", d.diagnostics());
    gate.open();
    d.wait_done(id, "SUCCEEDED");
    d.wait_done(next, "SUCCEEDED");
    assert_eq!(d.log(id), "before\nafter\n", "{}", d.diagnostics());
    assert_eq!(count_lines(&runs, "run"), 1);
}
