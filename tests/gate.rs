//! The start gate: a job admitted in a batch is handed to its supervisor (and its bash started)
//! while the batch's fsyncs still run, but nothing of the job may run before they are through.
//!
//! The daemon's fsyncs are held or failed from outside, by an `LD_PRELOAD` shim (built here
//! with the system's C compiler) around `fsync`/`fdatasync` of the admission journal
//! (`spool/.skyspool/journal.*`, what a round syncs) and of paths under `spool/jobs` (what it
//! syncs without a journal, and what is synced after it), or of a job's secrets file, while a
//! marker file exists; the same shim can hold the publication of a staged job (its
//! `rename` from `staging/` into `jobs/`) and fail the journal's checkpoint (`syncfs`): the
//! real binary, no test hook in it.
mod common;
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM: &str = r#"
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The path fd names, into path (PATH_MAX bytes); 0 when it cannot be read. */
static int fd_path(int fd, char *path) {
    char link[64];
    ssize_t n;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, PATH_MAX - 1);
    if (n < 0) return 0;
    path[n] = 0;
    return 1;
}

/* Whether the file named by $var exists. */
static int on(const char *var) {
    const char *marker = getenv(var);
    return marker && access(marker, F_OK) == 0;
}

/* Whether fd names the admission journal or a path under spool/jobs while the file named
   by $var exists. */
static int armed(int fd, const char *var) {
    char path[PATH_MAX];
    if (!on(var) || !fd_path(fd, path)) return 0;
    return strstr(path, "/spool/jobs") != NULL || strstr(path, "/spool/.skyspool/journal.") != NULL;
}

/* Whether fd names a secrets file or their directory (spool/.skyspool/secrets) while the
   file named by SKYSPOOL_SHIM_HOLD_SECRETS exists. */
static int secret(int fd) {
    char path[PATH_MAX];
    if (!on("SKYSPOOL_SHIM_HOLD_SECRETS") || !fd_path(fd, path)) return 0;
    return strstr(path, "/spool/.skyspool/secrets") != NULL;
}

static int before(int fd) {
    if (armed(fd, "SKYSPOOL_SHIM_FAIL")) { errno = EIO; return -1; }
    while (armed(fd, "SKYSPOOL_SHIM_HOLD") || secret(fd)) usleep(2000);
    return 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (before(fd)) return -1;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (before(fd)) return -1;
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}

/* A checkpoint's syncfs fails while the file named by SKYSPOOL_SHIM_FAIL_SYNCFS exists. */
int syncfs(int fd) {
    static int (*real)(int);
    const char *marker = getenv("SKYSPOOL_SHIM_FAIL_SYNCFS");
    if (marker && access(marker, F_OK) == 0) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "syncfs");
    return real(fd);
}

/* Whether a rename publishes a staged job while the file named by SKYSPOOL_SHIM_PUBLISH exists. */
static int publishing(const char *from, const char *to) {
    const char *marker = getenv("SKYSPOOL_SHIM_PUBLISH");
    return marker && access(marker, F_OK) == 0 && strstr(from, "/staging/")
        && strstr(to, "/spool/jobs/");
}

int rename(const char *from, const char *to) {
    static int (*real)(const char *, const char *);
    while (publishing(from, to)) usleep(2000);
    if (!real) real = (int (*)(const char *, const char *))dlsym(RTLD_NEXT, "rename");
    return real(from, to);
}

int renameat(int fromfd, const char *from, int tofd, const char *to) {
    static int (*real)(int, const char *, int, const char *);
    while (publishing(from, to)) usleep(2000);
    if (!real) real = (int (*)(int, const char *, int, const char *))dlsym(RTLD_NEXT, "renameat");
    return real(fromfd, from, tofd, to);
}
"#;

/// Builds the shim into `dir`; `None` (the test skips, loudly) without a C compiler.
fn shim(dir: &Path) -> Option<PathBuf> {
    let src = dir.join("fsync-shim.c");
    let so = dir.join("fsync-shim.so");
    fs::write(&src, SHIM).expect("write the shim's source");
    let built = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&so)
        .arg(&src)
        .arg("-ldl")
        .status();
    match built {
        Ok(s) if s.success() => Some(so),
        other => {
            skip(&format!(
                "no C compiler to build the fsync shim ({other:?})"
            ));
            None
        }
    }
}

/// A daemon whose fsyncs under `spool/jobs` the shim holds (`mode` HOLD) or fails (FAIL)
/// while the returned marker file exists (it does not yet); `None` without a C compiler.
fn shimmed_daemon(dir: &Path, mode: &str) -> Option<(Daemon, PathBuf)> {
    shimmed_daemon_with(dir, mode, &[])
}

/// [`shimmed_daemon`] with more `serve` arguments.
fn shimmed_daemon_with(dir: &Path, mode: &str, more: &[&str]) -> Option<(Daemon, PathBuf)> {
    let so = shim(dir)?.display().to_string();
    let marker = dir.join(mode.to_lowercase());
    let var = format!("SKYSPOOL_SHIM_{mode}");
    let path = marker.display().to_string();
    let mut args = vec!["--gpus", "none", "--cpus", "2"];
    args.extend_from_slice(more);
    let d = Daemon::start_with_env(&args, &[("LD_PRELOAD", &so), (&var, &path)]);
    Some((d, marker))
}

/// Waits until job `id` has its bash up, held at its gate (the script's first line, or,
/// for a bash started ahead before the job came, the line its commands come on); returns
/// those bash processes and their supervisors.
fn wait_for_gated_bash(d: &Daemon, id: u64, what: &str) -> (Vec<u32>, Vec<u32>) {
    let mut bash = Vec::new();
    wait_until(
        DEADLINE,
        what,
        || {
            bash = job_processes(d, id);
            !bash.is_empty()
        },
        || d.diagnostics(),
    );
    let supervisors = bash.iter().filter_map(|p| parent_of(*p)).collect();
    (bash, supervisors)
}

/// Waits until the gated bash processes and their supervisors are gone.
fn wait_gone(bash: &[u32], supervisors: &[u32]) {
    wait_until(
        DEADLINE,
        "the gated bash and its supervisor to go",
        || bash.iter().chain(supervisors).all(|p| !alive(*p)),
        || format!("bash {bash:?}, supervisors {supervisors:?}"),
    );
}

fn job_yaml(ran: &Path) -> String {
    format!(
        "name: gated\nrun: |\n  echo ran >> {}\n  echo done\n",
        ran.display()
    )
}

/// A daemon SIGKILLed while its admission fsyncs hang: the job's bash was already started,
/// waiting at its gate; it and its supervisor go without running anything of the job, and
/// the next daemon runs the job, once.
#[test]
fn job_behind_its_gate_does_not_run_when_the_daemon_dies_and_runs_once_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, hold)) = shimmed_daemon(dir.path(), "HOLD") else {
        return;
    };
    let ran = d.scratch().join("ran");
    fs::write(&hold, b"").expect("hold the fsyncs");
    let id = d.submit("gated.yaml", &job_yaml(&ran));
    let (bash, supervisors) = wait_for_gated_bash(&d, id, "the job's bash to wait at its gate");
    assert_eq!(d.status(id), "PENDING", "the supervisor said the job runs");
    d.kill9();
    wait_gone(&bash, &supervisors);
    assert!(
        !ran.exists(),
        "the job ran before its admission was durable"
    );
    let lock = fs::read_to_string(d.job(id).join(".sky/supervisor.lock")).unwrap_or_default();
    assert!(
        !lock.contains("\"pid\""),
        "a supervisor recorded that it took the job: {lock}"
    );

    fs::remove_file(&hold).expect("release the fsyncs");
    d.spawn();
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(
        fs::read_to_string(&ran).unwrap_or_default(),
        "ran\n",
        "the job did not run exactly once\n{}",
        d.diagnostics()
    );
    assert_eq!(d.log(id), "done\n");
}

/// A lone job is handed to its supervisor before its directory leaves `staging/` (its bash
/// starts while the daemon stages and publishes it). A daemon SIGKILLed then, with the
/// publication held: the job's bash, at its gate, and its supervisor go without running
/// anything of the job, and the next daemon publishes the job and runs it, once.
#[test]
fn job_launched_before_its_publication_does_not_run_when_the_daemon_dies_then_and_runs_once_after()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, hold)) = shimmed_daemon(dir.path(), "PUBLISH") else {
        return;
    };
    let ran = d.scratch().join("ran");
    fs::write(&hold, b"").expect("hold the publication");
    d.drop_yaml("early.yaml", &job_yaml(&ran));
    let (bash, supervisors) = wait_for_gated_bash(
        &d,
        1,
        "the job's bash to wait at its gate while the job is still staged",
    );
    assert!(
        d.path(".skyspool/staging/1").is_dir() && !d.job(1).exists(),
        "the job is not held in staging/ at its launch\n{}",
        d.diagnostics()
    );
    d.kill9();
    wait_gone(&bash, &supervisors);
    assert!(!ran.exists(), "the job ran before it was published");

    fs::remove_file(&hold).expect("release the publication");
    d.spawn();
    d.wait_done(1, "SUCCEEDED");
    assert_eq!(
        fs::read_to_string(&ran).unwrap_or_default(),
        "ran\n",
        "the job did not run exactly once\n{}",
        d.diagnostics()
    );
    assert_eq!(d.log(1), "done\n");
    assert_eq!(d.job_ids(), vec![1], "one submission, one job");
}

/// The admission's fsyncs fail: the job, already handed over, never runs; it fails with a
/// reason saying so, and keeps its job.yaml.
#[test]
fn job_whose_admission_cannot_be_made_durable_fails_without_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, fail)) = shimmed_daemon(dir.path(), "FAIL") else {
        return;
    };
    let ran = d.scratch().join("ran");
    fs::write(&fail, b"").expect("fail the fsyncs");
    let id = d.submit("doomed.yaml", &job_yaml(&ran));
    d.wait_done(id, "FAILED_DRIVER");
    fs::remove_file(&fail).expect("stop failing");
    assert!(!ran.exists(), "the job ran though its admission failed");
    let reason = d.info(id)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("durable") && reason.contains("nothing of it ran"),
        "reason: {reason}"
    );
    assert!(d.log(id).contains("durable"), "log: {}", d.log(id));
    assert_eq!(
        fs::read_to_string(d.job(id).join("job.yaml")).expect("job.yaml kept"),
        job_yaml(&ran)
    );
    // The daemon goes on: the next job is admitted and runs.
    let ran2 = d.scratch().join("ran2");
    let id2 = d.submit("fine.yaml", &job_yaml(&ran2));
    d.wait_done(id2, "SUCCEEDED");
    assert_eq!(fs::read_to_string(&ran2).unwrap_or_default(), "ran\n");
}

/// A shimmed daemon (see [`shimmed_daemon`]) running a blocker job that waits for `gate`,
/// and a job submitted with the shim armed (its fsyncs held or failed): the daemon, the
/// marker (still there), the gate, the blocker's ID, the job's ID and the file it writes
/// when it runs.
struct WithBlocker {
    d: Daemon,
    marker: PathBuf,
    gate: Gate,
    blocker: u64,
    id: u64,
    ran: PathBuf,
}

fn submit_beside_a_blocker(dir: &Path, mode: &str) -> Option<WithBlocker> {
    let (mut d, marker) = shimmed_daemon(dir, mode)?;
    let gate = Gate::new(&d.scratch(), "blocker");
    let blocker = d.submit(
        "blocker.yaml",
        &format!(
            "name: blocker\nrun: |\n  {}\n  echo blocker done\n",
            gate.wait_cmd()
        ),
    );
    d.wait_status(blocker, "RUNNING");
    let ran = d.scratch().join("ran");
    fs::write(&marker, b"").expect("arm the shim");
    let id = d.submit("gated.yaml", &job_yaml(&ran));
    Some(WithBlocker {
        d,
        marker,
        gate,
        blocker,
        id,
        ran,
    })
}

/// While another job runs, a submission's round is not waited for in line: with its fsyncs
/// held, the daemon still records the other job's end, and the new job stays behind its
/// gate until the fsyncs go through, then runs once. (Before, the event loop itself waited
/// for the round, and the other job's end went unrecorded as long as the fsyncs hung.)
#[test]
fn other_jobs_are_served_while_a_round_hangs_and_its_job_waits_at_its_gate() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(w) = submit_beside_a_blocker(dir.path(), "HOLD") else {
        return;
    };
    let d = &w.d;
    wait_for_gated_bash(d, w.id, "the job's bash to wait at its gate");
    w.gate.open();
    d.wait_done(w.blocker, "SUCCEEDED");
    assert!(
        !w.ran.exists(),
        "the job ran before its admission was durable"
    );
    assert_eq!(
        d.status(w.id),
        "PENDING",
        "the supervisor said the job runs"
    );
    fs::remove_file(&w.marker).expect("release the fsyncs");
    d.wait_done(w.id, "SUCCEEDED");
    assert_eq!(
        fs::read_to_string(&w.ran).unwrap_or_default(),
        "ran\n",
        "the job did not run exactly once\n{}",
        d.diagnostics()
    );
}

/// A job held at its gate (its round's fsyncs hang, beside a running job, so the daemon goes
/// on) is recorded as started: linked from `running/`, `info.json` RUNNING with its start,
/// while its `status`, which only its supervisor writes, still says PENDING. The daemon
/// reads that PENDING once the launcher answers; it used to rewrite `info.json` back to
/// PENDING then.
#[test]
fn a_job_held_at_its_gate_is_recorded_started_and_not_moved_back_to_pending() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(w) = submit_beside_a_blocker(dir.path(), "HOLD") else {
        return;
    };
    let (d, id) = (&w.d, w.id);
    wait_for_gated_bash(d, id, "the job's bash to wait at its gate");
    // The launcher's answer is in: the daemon read `status` right after this line.
    let answered = format!("job {id} started (supervisor pid");
    d.wait_daemon_log(&answered, "the daemon to take the launcher's answer");
    assert_eq!(d.status(id), "PENDING", "the supervisor said the job runs");
    let info = d.info(id);
    assert_eq!(
        info["status"], "RUNNING",
        "info.json does not say the recorded start: {info}"
    );
    assert!(info["started"].is_string(), "no start in info.json: {info}");
    assert!(
        d.path("running").join(id.to_string()).exists(),
        "the job is not linked from running/\n{}",
        d.diagnostics()
    );
    fs::remove_file(&w.marker).expect("release the fsyncs");
    d.wait_done(id, "SUCCEEDED");
    w.gate.open();
    d.wait_done(w.blocker, "SUCCEEDED");
    assert_eq!(fs::read_to_string(&w.ran).unwrap_or_default(), "ran\n");
}

/// A job's secrets are not in its journal line (its `job.yaml` has them redacted): its
/// secrets file is synced with its round, so nothing of the job runs before that file is
/// durable (else a power cut could leave the job to run with `<redacted>` values). With
/// the secrets' fsyncs held, a file submission (its round through the journal) and then a
/// directory submission (its round through its own files) each wait at their gate, and
/// run once the fsyncs go through. (No bash is started ahead for the next ID: the gated
/// bash of job 2 is then the directory job's.)
#[test]
fn a_job_with_secrets_waits_at_its_gate_for_its_secrets_file_to_be_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, hold)) = shimmed_daemon_with(dir.path(), "HOLD_SECRETS", &["--prestart", "0"])
    else {
        return;
    };
    let seen = d.scratch().join("seen");
    let yaml = |tag: &str| {
        format!(
            "name: {tag}\nsecrets:\n  TOKEN: tok-{tag}\nrun: |\n  echo \"$TOKEN\" >> {}\n",
            seen.display()
        )
    };
    fs::write(&hold, b"").expect("hold the secrets' fsyncs");
    let file_job = d.submit("secret.yaml", &yaml("file"));
    wait_for_gated_bash(&d, file_job, "the file job's bash to wait at its gate");
    assert_eq!(
        d.status(file_job),
        "PENDING",
        "the supervisor said the job runs"
    );
    assert!(
        !seen.exists(),
        "the job ran before its secrets were durable"
    );
    fs::remove_file(&hold).expect("release the fsyncs");
    d.wait_done(file_job, "SUCCEEDED");

    fs::write(&hold, b"").expect("hold the secrets' fsyncs again");
    let staged = d.scratch().join("secretdir");
    fs::create_dir(&staged).expect("mkdir");
    fs::write(staged.join("job.yaml"), yaml("dir")).expect("job.yaml");
    fs::rename(&staged, d.path("incoming").join("secretdir")).expect("move the directory in");
    let dir_job = file_job + 1;
    wait_for_gated_bash(&d, dir_job, "the directory job's bash to wait at its gate");
    assert_eq!(
        d.status(dir_job),
        "PENDING",
        "the supervisor said the job runs"
    );
    assert_eq!(
        fs::read_to_string(&seen).unwrap_or_default(),
        "tok-file\n",
        "the directory job ran before its secrets were durable"
    );
    fs::remove_file(&hold).expect("release the fsyncs");
    d.wait_done(dir_job, "SUCCEEDED");
    assert_eq!(
        fs::read_to_string(&seen).unwrap_or_default(),
        "tok-file\ntok-dir\n"
    );
}

/// The same round failing while another job runs: its job, handed over already, fails
/// without running; the running job is untouched and ends normally.
#[test]
fn a_round_that_fails_while_other_jobs_run_fails_only_its_job() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(w) = submit_beside_a_blocker(dir.path(), "FAIL") else {
        return;
    };
    let d = &w.d;
    d.wait_done(w.id, "FAILED_DRIVER");
    fs::remove_file(&w.marker).expect("stop failing");
    assert!(!w.ran.exists(), "the job ran though its admission failed");
    let reason = d.info(w.id)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("durable"), "reason: {reason}");
    assert_eq!(d.status(w.blocker), "RUNNING");
    w.gate.open();
    d.wait_done(w.blocker, "SUCCEEDED");
    assert_eq!(d.log(w.blocker), "blocker done\n");
}

/// Whether another process holds the flock of `path`.
fn flock_held(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let Ok(f) = fs::File::open(path) else {
        return false;
    };
    // SAFETY: flock on a descriptor this function owns; the lock goes with it.
    unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) != 0 }
}

/// With every fsync under the spool held (`hold` exists), job `id` ends: its supervisor, which
/// must make the result durable itself, keeps the job's `lock` until the held fsync is let
/// through (`hold` removed here). `freed_early`: the failure message.
fn result_fsynced_before_its_lock_is_freed(
    d: &Daemon,
    id: u64,
    lock: &Path,
    hold: &Path,
    freed_early: &str,
) {
    wait_until(
        DEADLINE,
        &format!("job {id}'s final status"),
        || d.status(id) == "SUCCEEDED",
        || d.diagnostics(),
    );
    assert!(flock_held(lock), "{freed_early}");
    fs::remove_file(hold).expect("release fsyncs");
    wait_until(
        DEADLINE,
        &format!("job {id}'s lock to be freed once its fsync is through"),
        || !flock_held(lock),
        || d.diagnostics(),
    );
}

#[test]
fn a_finished_jobs_result_is_left_to_the_journaling_daemon_and_fsynced_by_its_supervisor_without_one(
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, hold)) = shimmed_daemon(dir.path(), "HOLD") else {
        return;
    };
    let s = d.scratch();
    let gates = [Gate::new(&s, "first"), Gate::new(&s, "second")];
    let ids: Vec<u64> = gates
        .iter()
        .enumerate()
        .map(|(i, g)| {
            d.submit(
                &format!("job{i}.yaml"),
                &format!("name: job{i}\nrun: |\n  {}\n", g.wait_cmd()),
            )
        })
        .collect();
    for id in &ids {
        d.wait_status(*id, "RUNNING");
    }
    let locks: Vec<PathBuf> = ids
        .iter()
        .map(|id| d.job(*id).join(".sky/supervisor.lock"))
        .collect();
    // From now on every fsync under spool/jobs (and of the journal) waits.
    fs::write(&hold, b"").expect("hold fsyncs");

    // The daemon lives: the supervisor frees the lock at once, its fsyncs not needed (the
    // daemon's journal has the job's end).
    gates[0].open();
    d.wait_done(ids[0], "SUCCEEDED");
    wait_until(
        DEADLINE,
        "the first job's lock to be freed while fsyncs are held",
        || !flock_held(&locks[0]),
        || d.diagnostics(),
    );

    // No daemon: the supervisor makes the result durable itself, and frees the lock only
    // once that fsync is through.
    d.kill9();
    gates[1].open();
    result_fsynced_before_its_lock_is_freed(
        &d,
        ids[1],
        &locks[1],
        &hold,
        "the lock of a job that ended while no daemon watched is freed before its result is durable",
    );
    d.spawn();
    d.wait_done(ids[1], "SUCCEEDED");
    d.stop();
}

/// A supervisor whose launcher is gone makes its job's result durable itself, though the
/// daemon lives: a daemon that stops ends its launcher before its last checkpoint, and a
/// job that ends after that checkpoint is journaled by no daemon.
#[test]
fn a_supervisor_whose_launcher_is_gone_fsyncs_its_jobs_result() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some((mut d, hold)) = shimmed_daemon(dir.path(), "HOLD") else {
        return;
    };
    let s = d.scratch();
    let gate = Gate::new(&s, "held");
    let id = d.submit(
        "held.yaml",
        &format!("name: held\nrun: |\n  {}\n", gate.wait_cmd()),
    );
    d.wait_status(id, "RUNNING");
    let lock = d.job(id).join(".sky/supervisor.lock");
    let supervisor = d.supervisor_pid(id).expect("the job's supervisor");
    let launcher = parent_of(supervisor).expect("the supervisor's launcher");
    send_signal(launcher, nix::sys::signal::Signal::SIGKILL).expect("kill the launcher");
    wait_until(
        DEADLINE,
        "the daemon to replace its launcher",
        || {
            d.daemon_log()
                .contains(&format!("launcher pid {launcher} failed"))
        },
        || d.diagnostics(),
    );
    fs::write(&hold, b"").expect("hold fsyncs");
    gate.open();
    result_fsynced_before_its_lock_is_freed(
        &d,
        id,
        &lock,
        &hold,
        "a supervisor without its launcher freed the lock before its result was durable",
    );
    d.wait_done(id, "SUCCEEDED");
    d.stop();
}

#[test]
fn a_failed_checkpoint_keeps_the_journal_and_is_tried_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let Some(so) = shim(dir.path()) else {
        return;
    };
    let marker = dir.path().join("fail-syncfs");
    fs::write(&marker, b"").expect("fail syncfs");
    let mut d = Daemon::start_with_env(
        &["--gpus", "none", "--cpus", "2", "--checkpoint-after", "0.2"],
        &[
            ("LD_PRELOAD", &so.display().to_string()),
            ("SKYSPOOL_SHIM_FAIL_SYNCFS", &marker.display().to_string()),
        ],
    );
    let id = d.submit("one.yaml", "name: one\nrun: echo one\n");
    d.wait_done(id, "SUCCEEDED");
    d.wait_daemon_log(
        "journal checkpoint failed",
        "a failed checkpoint in the daemon's log",
    );
    assert!(
        d.journal_bytes() > 0,
        "the journal keeps its lines when its checkpoint fails"
    );
    // Once syncfs works again, the retry empties it (its lines were the job's).
    fs::remove_file(&marker).expect("let syncfs work");
    wait_until(
        DEADLINE,
        "the journal to be emptied by the checkpoint tried again",
        || d.journal_bytes() == 0,
        || d.diagnostics(),
    );
    assert_eq!(d.status(id), "SUCCEEDED");
    d.stop();
}
