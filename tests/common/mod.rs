//! Test harness: starts the real `skyspool` binary on a fresh spool in a temporary
//! directory and drives it through the filesystem, as a user would.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_skyspool");

/// Default deadline for a condition (generous: CI machines are small and busy).
pub const DEADLINE: Duration = Duration::from_secs(30);

/// The key `scripts/test-sshd` lets in (root and skyspool-runner on the test sshd).
#[allow(dead_code)]
pub const SSH_KEY: &str = "/root/.ssh/skyspool_test_ed25519";
/// ssh options for the test sshd: no prompt, no host key kept.
#[allow(dead_code)]
pub const SSH_OPTS: [&str; 8] = [
    "-o",
    "BatchMode=yes",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
];

/// True when CI asked that every environment-dependent skip be a failure.
pub fn strict() -> bool {
    std::env::var_os("SKYSPOOL_TEST_STRICT").is_some_and(|v| v == "1")
}

/// Skips a test loudly, or fails it under `SKYSPOOL_TEST_STRICT=1`.
pub fn skip(why: &str) {
    if strict() {
        panic!("SKYSPOOL_TEST_STRICT=1 forbids skipping: {why}");
    }
    eprintln!("SKIPPED (not a pass): {why}");
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` and `context()`.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(1);
    while !cond() {
        if Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(25));
    }
}

/// The unprivileged user that root's test submissions run as (`serve --root-jobs-as`).
pub const RUNNER: &str = "skyspool-runner";

/// As root: makes sure [`RUNNER`] exists with an empty `~/.bashrc`, and returns its name.
/// Tests then never run jobs as root, whose `~/.bashrc` on these machines runs `pyenv init`
/// (slow, and it leaves a stale lock behind when a job is killed in the middle of it).
pub fn runner() -> Option<&'static str> {
    static READY: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !is_root() {
        return None;
    }
    let ok = *READY.get_or_init(|| {
        if nix::unistd::User::from_name(RUNNER)
            .ok()
            .flatten()
            .is_none()
        {
            let _ = Command::new("useradd")
                .args(["--create-home", "--shell", "/bin/bash", RUNNER])
                .status();
        }
        match nix::unistd::User::from_name(RUNNER).ok().flatten() {
            Some(u) => {
                let rc = u.dir.join(".bashrc");
                let _ = fs::write(&rc, b"");
                let _ = nix::unistd::chown(&rc, Some(u.uid), Some(u.gid));
                true
            }
            None => false,
        }
    });
    if ok {
        Some(RUNNER)
    } else {
        skip("could not create the test user skyspool-runner; root's jobs run as root");
        None
    }
}

/// A running daemon on its own spool. Dropping it cancels the jobs left and stops it.
pub struct Daemon {
    pub child: Option<Child>,
    pub tmp: tempfile::TempDir,
    pub spool: PathBuf,
    pub args: Vec<String>,
    /// Extra environment of the daemon process (each start).
    pub env: Vec<(String, String)>,
    submissions: usize,
}

impl Daemon {
    /// `skyspool --spool TMP/spool serve ARGS...`, waiting until it serves.
    pub fn start(args: &[&str]) -> Daemon {
        Daemon::start_with_env(args, &[])
    }

    /// [`Daemon::start`] with extra environment variables for the daemon (every start).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("skyspool-test-")
            .tempdir()
            .expect("tempdir");
        // Jobs run as another user: let them reach the scratch directory inside.
        let _ = fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        let spool = tmp.path().join("spool");
        let mut all: Vec<String> = Vec::new();
        if let Some(user) = runner() {
            all.push("--root-jobs-as".into());
            all.push(user.into());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        let mut d = Daemon {
            child: None,
            tmp,
            spool,
            args: all,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            submissions: 0,
        };
        d.spawn();
        d
    }

    /// (Re)starts the daemon process on the same spool.
    pub fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("daemon.log"))
            .expect("daemon log");
        let _ = fs::remove_file(self.spool.join("nodes"));
        let child = Command::new(BIN)
            .arg("--spool")
            .arg(&self.spool)
            .arg("serve")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn skyspool serve");
        self.child = Some(child);
        let nodes = self.spool.join("nodes");
        wait_until(
            DEADLINE,
            "the daemon to serve",
            || nodes.exists(),
            || self.diagnostics(),
        );
    }

    /// SIGKILLs the daemon (jobs keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for exit; SIGKILL if it has not exited within [`DEADLINE`] (a
    /// daemon hung in its start-up never reaches the loop that acts on SIGTERM: it must
    /// fail the test, not hang it).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + DEADLINE;
            while matches!(c.try_wait(), Ok(None)) {
                if Instant::now() > deadline {
                    eprintln!(
                        "daemon {} ignored SIGTERM for {DEADLINE:?}; SIGKILL",
                        c.id()
                    );
                    let _ = c.kill();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.wait();
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.spool.join(rel)
    }

    /// The journal's files, as `spool-layout.md` names them.
    pub fn journal_files(&self) -> [PathBuf; 2] {
        [
            self.path(".skyspool/journal.0"),
            self.path(".skyspool/journal.1"),
        ]
    }

    /// The bytes in the journal's two files.
    pub fn journal_bytes(&self) -> u64 {
        self.journal_files()
            .iter()
            .map(|p| fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .sum()
    }

    pub fn job(&self, id: u64) -> PathBuf {
        self.spool.join("jobs").join(id.to_string())
    }

    /// The pid the job's supervisor recorded: its line in `jobs/<id>/.sky/supervisor.lock`
    /// (after the daemon's launch record).
    pub fn supervisor_pid(&self, id: u64) -> Option<u32> {
        let text = fs::read_to_string(self.job(id).join(".sky/supervisor.lock")).ok()?;
        text.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v["pid"].as_u64().map(|p| p as u32)
        })
    }

    /// The result the job's supervisor recorded when it finished: its line in
    /// `jobs/<id>/.sky/supervisor.lock` (the one with a `status`).
    pub fn result(&self, id: u64) -> Option<serde_json::Value> {
        let text = fs::read_to_string(self.job(id).join(".sky/supervisor.lock")).ok()?;
        text.lines().find_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            v.get("status").is_some().then_some(v)
        })
    }

    /// A scratch directory outside the spool (for gates, markers, workdirs).
    pub fn scratch(&self) -> PathBuf {
        let p = self.tmp.path().join("scratch");
        fs::create_dir_all(&p).expect("scratch");
        let _ = fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o777));
        p
    }

    /// Writes `incoming/.NAME.tmp`, then renames it to `incoming/NAME` (the safe protocol).
    pub fn drop_yaml(&mut self, name: &str, text: &str) {
        let tmp = self.spool.join("incoming").join(format!(".{name}.tmp"));
        let mut f = fs::File::create(&tmp).expect("create");
        f.write_all(text.as_bytes()).expect("write");
        drop(f);
        fs::rename(&tmp, self.spool.join("incoming").join(name)).expect("rename");
        self.submissions += 1;
    }

    /// Submits and waits for the job to be admitted; returns its ID (the next one).
    pub fn submit(&mut self, name: &str, text: &str) -> u64 {
        let before = self.job_ids().len();
        self.drop_yaml(name, text);
        let id = (before + 1) as u64;
        let status = self.job(id).join("status");
        wait_until(
            DEADLINE,
            &format!("job {id} from {name} to be admitted"),
            || status.exists(),
            || self.diagnostics(),
        );
        id
    }

    pub fn job_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = fs::read_dir(self.spool.join("jobs"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_unstable();
        ids
    }

    pub fn status(&self, id: u64) -> String {
        fs::read_to_string(self.job(id).join("status"))
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    pub fn log(&self, id: u64) -> String {
        fs::read_to_string(self.job(id).join("log")).unwrap_or_default()
    }

    pub fn info(&self, id: u64) -> serde_json::Value {
        let text = fs::read_to_string(self.job(id).join("info.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
    }

    pub fn queue(&self) -> String {
        fs::read_to_string(self.spool.join("queue")).unwrap_or_default()
    }

    /// The STATUS column of job `id` in the `queue` file (written after every scheduling
    /// pass, so it is a point where the daemon's decisions for a batch are complete).
    pub fn queue_status(&self, id: u64) -> Option<String> {
        self.queue().lines().skip(1).find_map(|l| {
            let mut cols = l.split_whitespace();
            if cols.next()? == id.to_string() {
                l.split_whitespace().last().map(str::to_string)
            } else {
                None
            }
        })
    }

    pub fn wait_status(&self, id: u64, want: &str) {
        wait_until(
            DEADLINE,
            &format!("job {id} to be {want}"),
            || self.status(id) == want,
            || self.diagnostics(),
        );
    }

    /// Waits until the queue file (post-scheduling) shows `want` for job `id`.
    pub fn wait_queue_status(&self, id: u64, want: &str) {
        wait_until(
            DEADLINE,
            &format!("queue to show job {id} {want}"),
            || self.queue_status(id).as_deref() == Some(want),
            || self.diagnostics(),
        );
    }

    /// Waits until the job is in `done/` and the queue shows its final status.
    pub fn wait_done(&self, id: u64, want: &str) {
        self.wait_status(id, want);
        let link = self.spool.join("done").join(id.to_string());
        wait_until(
            DEADLINE,
            &format!("job {id} in done/"),
            || link.exists(),
            || self.diagnostics(),
        );
        self.wait_queue_status(id, want);
    }

    pub fn cancel(&self, id: u64) {
        fs::write(self.job(id).join("cancel"), b"").expect("touch cancel");
    }

    /// Runs the CLI against this spool.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .arg("--spool")
            .arg(&self.spool)
            .args(args)
            .output()
            .expect("run skyspool")
    }

    pub fn diagnostics(&self) -> String {
        let mut s = String::new();
        s.push_str("--- daemon.log ---\n");
        s.push_str(&fs::read_to_string(self.tmp.path().join("daemon.log")).unwrap_or_default());
        // The supervisors' own messages (their stderr), when there are any.
        let sup = fs::read_to_string(self.spool.join(".skyspool/daemon.log")).unwrap_or_default();
        if !sup.is_empty() {
            s.push_str("--- .skyspool/daemon.log (supervisors) ---\n");
            s.push_str(&sup);
        }
        s.push_str("--- queue ---\n");
        s.push_str(&self.queue());
        for id in self.job_ids() {
            s.push_str(&format!(
                "--- job {id} log (status {}) ---\n",
                self.status(id)
            ));
            s.push_str(&self.log(id));
        }
        s
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Cancel what is left so no job outlives the test, then stop the daemon.
        if self.child.is_some() {
            let live: Vec<u64> = self
                .job_ids()
                .into_iter()
                .filter(|id| {
                    let s = self.status(*id);
                    !matches!(
                        s.as_str(),
                        "SUCCEEDED" | "FAILED" | "FAILED_SETUP" | "FAILED_DRIVER" | "CANCELLED"
                    )
                })
                .collect();
            for id in &live {
                let _ = fs::write(self.job(*id).join("cancel"), b"");
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline
                && live
                    .iter()
                    .any(|id| !self.spool.join("done").join(id.to_string()).exists())
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.stop();
    }
}

/// How many lines of the file at `path` are exactly `line` (0 if it is missing): jobs that
/// append their name to a scratch file say how many times they ran.
pub fn count_lines(path: &Path, line: &str) -> usize {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == line)
        .count()
}

/// A gate a job waits on: the job blocks until the test calls [`Gate::open`].
pub struct Gate {
    pub path: PathBuf,
}

impl Gate {
    pub fn new(dir: &Path, name: &str) -> Gate {
        Gate {
            path: dir.join(format!("gate-{name}")),
        }
    }
    /// Shell that blocks until the gate opens.
    pub fn wait_cmd(&self) -> String {
        format!(
            "until [ -e '{}' ]; do sleep 0.02; done",
            self.path.display()
        )
    }
    pub fn open(&self) {
        fs::write(&self.path, b"").expect("open gate");
    }
}

/// The fields of `/proc/PID/stat` after the `(comm)` one (which may hold spaces and
/// parentheses): `[0]` is the state, `[1]` the parent pid, `[19]` the start time.
pub fn proc_stat(pid: u32) -> Option<Vec<String>> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.get(s.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// The parent pid of a process.
pub fn parent_of(pid: u32) -> Option<u32> {
    proc_stat(pid)?.get(1)?.parse().ok()
}

/// Sends `sig` to process `pid`.
pub fn send_signal(pid: u32, sig: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig)
}

/// A process a test stopped: SIGKILLed when this is dropped, also when the test fails
/// first (a stopped process would outlive the test, holding what it holds).
pub struct Stopped(pub u32);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = send_signal(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// SIGSTOPs process `pid` (see [`Stopped`]).
pub fn stop_process(pid: u32, what: &str) -> Stopped {
    send_signal(pid, nix::sys::signal::Signal::SIGSTOP)
        .unwrap_or_else(|e| panic!("SIGSTOP {what} (pid {pid}): {e}"));
    Stopped(pid)
}

/// Whether a process with this pid is alive (not a zombie).
pub fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|f| f.first().is_some_and(|st| st != "Z"))
}

// ------------------------------------------------------------------ helpers added for the
// example, submission, cancel, cli and restart suites.

impl Daemon {
    /// Waits until job `id` exists (its `status` file is published).
    pub fn wait_admitted(&self, id: u64) {
        let status = self.job(id).join("status");
        wait_until(
            DEADLINE,
            &format!("job {id} to be admitted"),
            || status.exists(),
            || self.diagnostics(),
        );
    }

    /// Drops `name` (safe protocol) and waits for a job ID not seen before; returns it.
    /// Unlike [`Daemon::submit`], it does not assume IDs are contiguous from 1.
    pub fn submit_new(&mut self, name: &str, text: &str) -> u64 {
        let before = self.job_ids();
        self.drop_yaml(name, text);
        let mut new = None;
        wait_until(
            DEADLINE,
            &format!("a new job from {name} to be admitted"),
            || {
                new = self
                    .job_ids()
                    .into_iter()
                    .find(|id| !before.contains(id) && self.job(*id).join("status").exists());
                new.is_some()
            },
            || self.diagnostics(),
        );
        new.expect("new job")
    }

    /// Waits until `rejected/NAME` and its `.reason` exist; returns the reason text.
    pub fn wait_rejected(&self, name: &str) -> String {
        let item = self.path("rejected").join(name);
        let reason = self.path("rejected").join(format!("{name}.reason"));
        wait_until(
            DEADLINE,
            &format!("rejected/{name} and its reason"),
            || fs::symlink_metadata(&item).is_ok() && reason.exists(),
            || self.diagnostics(),
        );
        fs::read_to_string(&reason).expect("read reason")
    }

    /// The daemon's own output (stdout and stderr of `serve`).
    pub fn daemon_log(&self) -> String {
        fs::read_to_string(self.tmp.path().join("daemon.log")).unwrap_or_default()
    }

    /// Waits until the daemon's own output holds `needle` (`what`: what that means).
    pub fn wait_daemon_log(&self, needle: &str, what: &str) {
        wait_until(
            DEADLINE,
            what,
            || self.daemon_log().contains(needle),
            || self.diagnostics(),
        );
    }

    /// `KEY=VALUE` lines of a job's log, as a map (the last value of a key wins).
    pub fn log_vars(&self, id: u64) -> std::collections::BTreeMap<String, String> {
        self.log(id)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// Names present in `incoming/`.
    pub fn incoming_names(&self) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path("incoming"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

/// Waits for `path` to exist.
pub fn wait_file(path: &Path, context: impl Fn() -> String) {
    wait_until(
        DEADLINE,
        &format!("{} to exist", path.display()),
        || path.exists(),
        context,
    );
}

/// Waits for a child process to exit (killing it and panicking after `timeout`).
pub fn wait_child(
    child: &mut Child,
    timeout: Duration,
    what: &str,
    context: impl Fn() -> String,
) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "timed out after {timeout:?} waiting for {what}\n{}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pids listed one per line in `path` (lines that do not parse are skipped).
pub fn read_pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Whether a program is on PATH.
pub fn have_program(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|dir| {
            let p = dir.join(name);
            fs::metadata(&p).is_ok_and(|m| m.is_file())
        })
    })
}

/// Kills a daemon that hangs (e.g. blocked opening a FIFO), so a failing test fails instead
/// of hanging in `Daemon::drop`. Call [`Watchdog::disarm`] once the test has passed.
pub struct Watchdog {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Watchdog {
    pub fn arm(d: &Daemon, timeout: Duration) -> Watchdog {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let pid = d.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let spool = d.spool.to_string_lossy().into_owned();
        let flag = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if flag.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            // Only the daemon of this spool (a pid may have been reused).
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if pid != 0 && String::from_utf8_lossy(&cmdline).contains(&spool) {
                eprintln!("watchdog: daemon {pid} hung; SIGKILL");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        });
        Watchdog { stop }
    }

    pub fn disarm(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

// ------------------------------------------------------------------ helpers added for the
// crash suite.

impl Daemon {
    /// Like [`Daemon::start`], without starting the daemon: the caller may first move `spool`
    /// (onto a small filesystem, say), then call [`Daemon::spawn`].
    pub fn unstarted(args: &[&str]) -> Daemon {
        let tmp = tempfile::Builder::new()
            .prefix("skyspool-test-")
            .tempdir()
            .expect("tempdir");
        let _ = fs::set_permissions(
            tmp.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        let spool = tmp.path().join("spool");
        let mut all: Vec<String> = Vec::new();
        if let Some(user) = runner() {
            all.push("--root-jobs-as".into());
            all.push(user.into());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        Daemon {
            child: None,
            tmp,
            spool,
            args: all,
            env: Vec::new(),
            submissions: 0,
        }
    }

    /// The serving daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// `Some(status)` when the daemon process has exited on its own (it is then forgotten,
    /// so a later [`Daemon::spawn`] starts a new one).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(st)
    }
}

/// The entries of a `staging/` directory that hold a submission: a claimed entry (`in--*`)
/// or a staged job (`info.json`), by name. A directory the daemon made ahead for the next
/// ID (`.sky/` and an empty `log`) holds none.
pub fn staged_submissions(staging: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(staging)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let dir = e.path();
                    dir.join("info.json").exists()
                        || fs::read_dir(&dir).is_ok_and(|inner| {
                            inner
                                .flatten()
                                .any(|x| x.file_name().to_string_lossy().starts_with("in--"))
                        })
                        || !dir.is_dir()
                })
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Processes that carry job `id`'s tag in their environment.
pub fn job_processes(d: &Daemon, id: u64) -> Vec<u32> {
    let spool_id = fs::read_to_string(d.path(".skyspool/id")).expect("spool id");
    let spool_id = spool_id.split_whitespace().next().unwrap_or_default();
    let needle = format!("SKYSPOOL_JOB_TAG={spool_id}-{id}");
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == needle.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

// ---------------------------------------------------------------- other users

/// Whether the tests can act as the users `skyspool-alice` and `skyspool-bob` (root, the
/// users made by `.ci/run`, and `su`); skips (loudly) otherwise.
pub fn have_users() -> bool {
    if !is_root() {
        skip("not root: cannot act as other users");
        return false;
    }
    for u in ["skyspool-alice", "skyspool-bob"] {
        if nix::unistd::User::from_name(u).ok().flatten().is_none() {
            skip(&format!("user {u} does not exist (.ci/run creates it)"));
            return false;
        }
    }
    if !have_program("su") {
        skip("no su");
        return false;
    }
    true
}

/// Runs `sh -c CMD` as `user`; returns (exit code, stdout + stderr).
pub fn as_user(user: &str, cmd: &str) -> (i32, String) {
    let out = Command::new("su")
        .args([user, "-s", "/bin/sh", "-c", cmd])
        .output()
        .expect("su");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Makes the temporary directories down to the spool traversable by the test users.
pub fn open_path_to_spool(d: &Daemon) {
    use std::os::unix::fs::PermissionsExt;
    let mut p = d.spool.clone();
    while let Some(parent) = p.parent() {
        let _ = fs::set_permissions(&p, fs::Permissions::from_mode(0o755));
        if parent == Path::new("/tmp") || parent == Path::new("/") {
            break;
        }
        p = parent.to_path_buf();
    }
    let _ = fs::set_permissions(d.tmp.path(), fs::Permissions::from_mode(0o755));
}

/// `user` copies a job file with `yaml` into `incoming/NAME` (from a file of its own in
/// `/tmp`, which the users can read: tests run at once must not share one).
pub fn submit_as(d: &Daemon, user: &str, name: &str, yaml: &str) {
    use std::os::unix::fs::PermissionsExt;
    let src = tempfile::Builder::new()
        .prefix("skyspool-users-")
        .tempfile_in("/tmp")
        .expect("a job file in /tmp");
    fs::write(src.path(), yaml).unwrap();
    fs::set_permissions(src.path(), fs::Permissions::from_mode(0o644)).unwrap();
    let (rc, out) = as_user(
        user,
        &format!(
            "cp {} {}/incoming/{name}",
            src.path().display(),
            d.spool.display()
        ),
    );
    assert_eq!(rc, 0, "{user} could not submit: {out}");
}

/// The uid of `user` (which must exist).
pub fn uid_of(user: &str) -> u32 {
    nix::unistd::User::from_name(user)
        .unwrap()
        .unwrap()
        .uid
        .as_raw()
}
