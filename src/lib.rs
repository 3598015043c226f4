//! skyspool: a job queue for GPU clusters whose interface is a filesystem spool.
//!
//! Modules, one job each:
//! - [`resources`]: exact quantities (GPU shares, CPUs) and job demands.
//! - [`spec`]: SkyPilot task YAML, parsed and validated.
//! - [`scheduler`]: pure placement logic (no I/O).
//! - [`inventory`]: nodes and GPUs (NVML, flags or a cluster file).
//! - [`spool`]: every on-disk file and atomic move (`spool-layout.md` is its contract).
//! - [`journal`]: the admission journal (a batch made durable with one fsync).
//! - [`executor`]: the per-job supervisor that runs setup/run and records the outcome, and
//!   the launcher that forks supervisors.
//! - [`spawn`]: starts a job's process as its user without copying the supervisor.
//! - [`watcher`]: inotify on the spool.
//! - [`recheck`]: submissions to look at again when a writer still had them open.
//! - [`daemon`]: the event loop tying them together.
//! - [`remote`]: ssh and rsync to other nodes.
//! - [`queue`]: the `queue` table.
//! - [`view`], [`fuse`]: what the daemon shares with the FUSE mount, and the mount.
//! - [`cli`]: the command-line front end.

pub mod cli;
pub mod daemon;
pub mod executor;
pub mod fuse;
pub mod inventory;
pub mod journal;
pub mod queue;
pub mod recheck;
pub mod remote;
pub mod resources;
pub mod scheduler;
pub mod spawn;
pub mod spec;
pub mod spool;
pub mod view;
pub mod watcher;

/// Whether this unit test runs as root; if not, says so loudly (`SKIPPED (not a pass)`) and,
/// under `SKYSPOOL_TEST_STRICT=1` (CI), fails instead of skipping.
#[cfg(test)]
pub(crate) fn root_or_skip(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = format!("{test} needs root");
    if std::env::var_os("SKYSPOOL_TEST_STRICT").is_some_and(|v| v == "1") {
        panic!("SKYSPOOL_TEST_STRICT=1 forbids skipping: {why}");
    }
    eprintln!("SKIPPED (not a pass): {why}");
    false
}

/// Runs `cmd` with `input` on its stdin and its stdout and stderr captured (unit tests that
/// feed a shell a script).
#[cfg(test)]
pub(crate) fn output_with_stdin(
    cmd: &mut std::process::Command,
    input: &[u8],
) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input)
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}
