//! Runs one job: the per-job supervisor process (`skyspool supervise`).
//!
//! The daemon keeps one launcher process ([`Launcher`], `skyspool supervise`) and hands it
//! each job: the launch lock and a [`LaunchPlan`] through a Unix socket (so secrets never
//! touch a file). The launcher hands it to a supervisor that has finished its last job, or
//! forks a new one; a supervisor lives in its own session, outlives the daemon if the
//! daemon dies, runs one job at a time, and for each:
//! - runs `setup` (status `SETTING_UP`, `CUDA_VISIBLE_DEVICES` unset) then `run` (`RUNNING`)
//!   with bash, once per node, each node's processes in a process group of their own, as the
//!   submitting user;
//! - sends all output to the job's `log` (one node: the same file descriptor for stdout and
//!   stderr, so order is kept exactly; several nodes: prefixed lines as SkyPilot prints them,
//!   plus one log per node);
//! - on `SIGTERM` (the daemon's cancel) stops every process of the job: `SIGTERM` to each
//!   process group, `SIGKILL` after the grace period, then every remaining descendant (it is a
//!   child subreaper, so daemonized grandchildren cannot escape);
//! - records its result (a line of `.sky/supervisor.lock`), then the final `status` (the
//!   daemon gives the job's resources away when it sees it); its [`Finalizer`] thread then
//!   fsyncs the result and frees the lock while the supervisor may take its next job.
//!
//! A supervisor runs a job on one thread: it waits for its children and for the daemon's
//! cancel in one `sigtimedwait` ([`Signals`]). Besides the finalizer, only a multi-node job
//! adds a thread per node to copy and prefix that node's output.
//!
//! This file holds the plan, the process helpers and what the daemon calls; `launcher` (the
//! launcher process and the daemon's handle on it), `supervisor` (one job's phases, gate and
//! result), `prestart` (a first phase started ahead) and `ranks` (a phase's bash on each
//! node, local or over ssh) hold the rest.

use crate::remote::{self, SshTarget};
use crate::scheduler::JobId;
use crate::spawn;
use crate::spool::{self, JobResult, Spool, Status, SupervisorRecord};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod launcher;
mod prestart;
mod ranks;
mod supervisor;
pub use launcher::*;
use prestart::*;
use ranks::*;
pub use supervisor::*;

/// The user a job runs as.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Switch to this user (only possible, and only done, when the supervisor is root).
    pub switch: bool,
}

/// One node of a job, in rank order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLaunch {
    pub rank: u32,
    pub name: String,
    pub ip: String,
    pub local: bool,
    /// GPU indices given on this node.
    pub gpus: Vec<u32>,
    /// How to reach it when it is not this machine.
    #[serde(default)]
    pub ssh: Option<SshTarget>,
}

/// Everything the supervisor needs to run one job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchPlan {
    pub job_id: JobId,
    pub spool: PathBuf,
    /// The job's tag ([`job_tag`]): names its private directories on remote nodes and is
    /// carried by its processes as [`TAG_VAR`].
    pub tag: String,
    pub user: RunAs,
    pub setup: Option<String>,
    pub run: Option<String>,
    /// Working directory of the job's commands on this machine.
    pub cwd: PathBuf,
    /// The job's own workdir copy (`jobs/<id>/workdir`), shipped to remote nodes by rsync.
    #[serde(default)]
    pub workdir: Option<PathBuf>,
    /// Lines written at the top of the log before anything runs (e.g. a workdir note).
    pub notes: Vec<String>,
    /// Environment shared by setup and run (envs, secrets, SKYPILOT_* common ones).
    pub env: BTreeMap<String, String>,
    /// Added for `setup` only.
    pub setup_env: BTreeMap<String, String>,
    /// Added for `run` only (per-node values are added by the supervisor).
    pub run_env: BTreeMap<String, String>,
    pub nodes: Vec<NodeLaunch>,
    /// `SKYPILOT_NUM_GPUS_PER_NODE` (ceil of the per-node count).
    pub num_gpus_per_node: u64,
    /// Between SIGTERM and SIGKILL on cancel.
    pub kill_grace_ms: u64,
    /// The daemon, when it records each job's end in its journal (see [`crate::journal`]):
    /// while it lives, the supervisor leaves the result's durability to it instead of
    /// fsyncing `supervisor.lock` and `.sky/` itself.
    #[serde(default)]
    pub journaling_daemon: Option<ProcessIdent>,
    /// A speculative prestart (see the daemon's `speculate`): made for the next job ID
    /// before any job has it, as the last submitter; its `run` is a placeholder. Its bash
    /// runs the real job's commands with `eval`, given with the environment's difference
    /// once the job is confirmed ([`PreSpawned::release`]).
    #[serde(default)]
    pub speculative: bool,
}

/// A process, told apart from a later one with its pid by its start time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdent {
    pub pid: u32,
    /// Its start time, in clock ticks after boot ([`process_start_ticks`]).
    pub start_ticks: u64,
}

impl ProcessIdent {
    /// This process.
    pub fn me() -> Option<ProcessIdent> {
        let pid = std::process::id();
        process_start_ticks(pid).map(|start_ticks| ProcessIdent { pid, start_ticks })
    }

    /// Whether it still runs (the same process, not another with its pid).
    pub fn alive(&self) -> bool {
        process_start_ticks(self.pid) == Some(self.start_ticks)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("reading the launch plan: {0}")]
    Plan(String),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("{0}: {1}")]
    Io(String, #[source] io::Error),
    /// A gated job's gate closed unopened: nothing of it ran.
    #[error("the job's admission was not confirmed durable")]
    Untaken,
}

/// The longest script passed to bash as an argument (Linux caps one argument at 128 KiB).
const INLINE_SCRIPT_MAX: usize = 100 * 1024;

/// Path of the job's private files (`jobs/<id>/.sky`).
fn private_dir(plan: &LaunchPlan) -> PathBuf {
    Spool::at(&plan.spool).job_private(plan.job_id)
}

/// Clock ticks since boot at which `pid` started (`/proc/PID/stat` field 22).
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    // One read into a buffer that holds the whole line: `read_to_string` would start from
    // the file's size (0 for /proc files) and read in growing chunks, five calls or more.
    let mut f = File::open(format!("/proc/{pid}/stat")).ok()?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match io::Read::read(&mut f, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
    let stat = std::str::from_utf8(&buf[..len]).ok()?;
    // The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The children of `pid`, from `/proc/PID/task/*/children` (every thread's own children).
/// Reading only the job's own process tree keeps the cost proportional to the job, not to
/// the number of processes on the machine.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(text) = fs::read_to_string(t.path().join("children")) {
                out.extend(
                    text.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}

/// Every live descendant of `root`, following the kernel's child lists. (The lists can miss
/// a process forked while they are read; callers loop until nothing is left.)
fn descendants(root: u32) -> Vec<u32> {
    let mut found: HashSet<u32> = HashSet::new();
    let mut frontier = vec![root];
    while let Some(p) = frontier.pop() {
        for c in children_of(p) {
            if found.insert(c) {
                frontier.push(c);
            }
        }
    }
    found.into_iter().collect()
}

/// Whether this process has no child at all, alive or zombie. As a child subreaper it then
/// has no descendant either: an orphaned descendant is re-parented to us, so every living
/// descendant hangs below one of our children.
fn has_no_children() -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag};
    matches!(
        waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT
        ),
        Err(nix::errno::Errno::ECHILD)
    )
}

fn signal_group(pgid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid as i32), sig);
}

/// Kills every remaining descendant of this process and reaps the orphans it inherited.
/// `tracked_running`: ranks still run and their exit status is still to be read, so nothing
/// may be reaped here.
fn kill_all_descendants(tracked_running: bool) {
    let me = std::process::id();
    for _ in 0..100 {
        if !tracked_running {
            reap_exited();
            if has_no_children() {
                // The common case: one syscall, no /proc walk.
                return;
            }
        }
        let pids = descendants(me);
        let live: Vec<u32> = pids.into_iter().filter(|p| !is_zombie(*p)).collect();
        if live.is_empty() {
            break;
        }
        for p in &live {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*p as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    if !tracked_running {
        reap_exited();
    }
}

fn is_zombie(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = s.get(s.rfind(')')? + 2..)?.to_string();
            rest.split_whitespace().next().map(|st| st == "Z")
        })
        .unwrap_or(true)
}

/// The bash script for one phase. `cd_target` is a shell word (already quoted). Locally,
/// env values come through the environment, never the file; for a remote node they are
/// `exports` (the file then lives in a private directory there for the job's lifetime).
fn script_text(body: &str, cd_target: &str, exports: &str) -> String {
    format!(
        "# generated by skyspool: sources ~/.bashrc like SkyPilot, then the job's commands\n\
         {exports}\
         [ -f ~/.bashrc ] && . ~/.bashrc >/dev/null 2>&1 </dev/null\n\
         cd {cd_target} || exit 1\n\
         {body}\n"
    )
}

/// The environment variable every process of a job carries its [`job_tag`] in.
pub const TAG_VAR: &str = "SKYSPOOL_JOB_TAG";

/// A job's tag: `<spool instance id>-<job id>`, unique across spools and machines (unlike
/// `SKYPILOT_TASK_ID`, which two spools with one cluster name can share when they admit
/// their job N in the same millisecond).
pub fn job_tag(spool_id: &str, id: JobId) -> String {
    format!("{spool_id}-{id}")
}

/// The private directory of one rank on a remote node.
fn remote_dir(plan: &LaunchPlan, node: &NodeLaunch) -> String {
    remote_dir_for(&plan.tag, node.rank)
}

/// `/tmp/skyspool-<job tag>-r<rank>` on the node.
fn remote_dir_for(tag: &str, rank: u32) -> String {
    let tag: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("/tmp/skyspool-{tag}-r{rank}")
}

/// Kills what runs of a remote rank of a job whose supervisor was lost (best effort).
pub fn kill_remote_rank(target: &SshTarget, tag: &str, rank: u32) {
    let dir = remote_dir_for(tag, rank);
    for phase in ["setup", "run"] {
        let _ = target.run(
            &remote::signal_command(&dir, phase, "KILL"),
            Duration::from_secs(15),
        );
    }
    let _ = target.run(
        &format!(
            "{}; rm -rf {}",
            remote::sweep_command(tag, rank),
            remote::shell_quote(&dir)
        ),
        Duration::from_secs(15),
    );
}

/// SIGKILLs every process on this machine whose environment holds `SKYSPOOL_JOB_TAG=<tag>`
/// (every process of that job inherits it, daemonized ones included), until none is left.
/// Returns how many were killed.
pub fn kill_tagged_processes(tag: &str) -> usize {
    let tag = format!("{TAG_VAR}={tag}");
    let me = std::process::id();
    let mut killed = 0;
    for _ in 0..50 {
        let mut found = 0;
        if let Ok(rd) = fs::read_dir("/proc") {
            for e in rd.flatten() {
                let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                    continue;
                };
                if pid == me || is_zombie(pid) {
                    continue;
                }
                let Ok(env) = fs::read(format!("/proc/{pid}/environ")) else {
                    continue;
                };
                if env.split(|b| *b == 0).any(|kv| kv == tag.as_bytes()) {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    found += 1;
                }
            }
        }
        if found == 0 {
            break;
        }
        killed += found;
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

/// The process that holds `path` open (the launch lock is held by exactly one: the
/// supervisor), found by scanning `/proc/*/fd`. (`/proc/locks` would name the
/// daemon that took the lock before handing it over, not its holder.)
pub fn flock_holder(path: &Path) -> Option<u32> {
    let target = fs::canonicalize(path).ok()?;
    let me = std::process::id();
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        if pid == me {
            return None;
        }
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|l| l == target))
            .then_some(pid)
    })
}

/// `export K='v'` lines for a remote rank (what the local environment carries otherwise).
fn exports(env: &BTreeMap<String, String>) -> String {
    env.iter()
        .filter(|(k, _)| !matches!(k.as_str(), "PATH" | "HOME" | "USER" | "LOGNAME" | "SHELL"))
        .map(|(k, v)| format!("export {k}={}\n", remote::shell_quote(v)))
        .collect()
}

/// Where the output of one node goes.
enum Sink {
    /// Single node: stdout and stderr are the log itself.
    Direct(File),
    /// Several nodes: a pipe read by a prefixing thread.
    Pipe,
}

/// What the supervisor waits for, all in its one thread: SIGCHLD (a child ended), SIGTERM
/// and SIGINT (stop the job), SIGHUP (ignored). They are blocked (the launcher blocks
/// TERM/INT/HUP before it forks, so a cancel sent before the supervisor looks is kept
/// pending) and taken with `sigtimedwait`: no thread per rank, no signal thread. Children
/// get an empty mask and default dispositions before exec.
struct Signals {
    set: nix::sys::signal::SigSet,
}

/// One thing [`Signals::wait`] saw.
#[derive(Debug, PartialEq, Eq)]
enum Wake {
    /// SIGCHLD: reap with [`reap_exited`].
    Child,
    /// SIGTERM or SIGINT: the daemon's cancel (or someone's ^C).
    Terminate,
    /// The deadline passed.
    Timeout,
}

impl Signals {
    fn block() -> Signals {
        use nix::sys::signal::{SigSet, Signal};
        let mut set = SigSet::empty();
        for sig in [
            Signal::SIGCHLD,
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
        ] {
            set.add(sig);
        }
        let _ = set.thread_block();
        Signals { set }
    }

    /// Discards every signal of the set that is pending now.
    fn drain(&self) {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: the set is a valid sigset_t, `zero` a valid timespec, no siginfo asked for.
        while unsafe { libc::sigtimedwait(self.set.as_ref(), std::ptr::null_mut(), &zero) } > 0 {}
    }

    /// Waits for the next signal of the set, or until `deadline`.
    fn wait(&self, deadline: Option<Instant>) -> Wake {
        loop {
            let mut timeout = deadline.map(|d| {
                let left = d.saturating_duration_since(Instant::now());
                libc::timespec {
                    tv_sec: left.as_secs() as libc::time_t,
                    tv_nsec: left.subsec_nanos() as libc::c_long,
                }
            });
            let tp = timeout
                .as_mut()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: the set is a valid sigset_t, `tp` null or a valid timespec, and no
            // siginfo is asked for.
            let sig = unsafe { libc::sigtimedwait(self.set.as_ref(), std::ptr::null_mut(), tp) };
            match sig {
                libc::SIGCHLD => return Wake::Child,
                libc::SIGTERM | libc::SIGINT => return Wake::Terminate,
                -1 if io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) => {
                    return Wake::Timeout
                }
                // SIGHUP, or EINTR: wait on.
                _ => continue,
            }
        }
    }
}

/// Reaps every child that has ended: `(pid, exit code)`, 128+N for a child killed by
/// signal N. Orphans of the job (re-parented to this subreaper) are reaped here too.
fn reap_exited() -> Vec<(u32, Option<i32>)> {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let mut out = Vec::new();
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw() as u32, Some(code))),
            Ok(WaitStatus::Signaled(pid, sig, _)) => {
                out.push((pid.as_raw() as u32, Some(128 + sig as i32)))
            }
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(_) => continue,
        }
    }
}

/// Takes an inherited launch lock fd (daemon side helper for tests and restarts).
/// Who has a prestart's confirmed launch, after its launcher was lost (see
/// [`await_gate_reader`]).
pub enum GateReader {
    /// This process holds the job's lock: its supervisor.
    Holder(u32),
    /// Nobody holds the lock and nobody holds the gate's other end: nobody can take the
    /// launch any more (it was taken and is over, or never will be).
    Gone,
    /// Neither within the wait.
    Unknown,
}

/// Waits (at most `wait`) until the launch sent through a prestart's gate (the daemon's end:
/// `gate`) is held by a supervisor (it holds `lock`), or cannot be (the gate's other end is
/// closed everywhere, so nothing will read it).
pub fn await_gate_reader(
    gate: &std::os::unix::net::UnixStream,
    lock: &Path,
    wait: Duration,
) -> GateReader {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(pid) = flock_holder(lock) {
            return GateReader::Holder(pid);
        }
        let mut fds = [libc::pollfd {
            fd: gate.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 10) };
        if n > 0 && fds[0].revents & (libc::POLLHUP | libc::POLLRDHUP) != 0 {
            // Closed: whoever read it holds the lock now, or has let it go.
            return match flock_holder(lock) {
                Some(pid) => GateReader::Holder(pid),
                None => GateReader::Gone,
            };
        }
        if Instant::now() >= deadline {
            return GateReader::Unknown;
        }
    }
}

pub fn lock_fd_is_held(path: &Path) -> io::Result<bool> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: flock on a valid descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        // SAFETY: as above.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_UN) };
        Ok(false)
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            Ok(true)
        } else {
            Err(e)
        }
    }
}

/// Opens (creating) a job's launch lock, takes it and writes the launch record as its first
/// line. The daemon passes the descriptor to the supervisor, so the lock is held exactly as
/// long as a supervisor lives; the supervisor appends its own record (`O_APPEND`).
pub fn take_launch_lock(path: &Path, record: &spool::LaunchRecord) -> io::Result<OwnedFd> {
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(path)?;
    // SAFETY: flock on a valid descriptor.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Only now, holding the lock: what an earlier launch attempt left is not ours to read.
    f.set_len(0)?;
    let mut line = serde_json::to_vec(record).map_err(io::Error::other)?;
    line.push(b'\n');
    f.write_all(&line)?;
    Ok(OwnedFd::from(f))
}

/// `pidfd_open(2)`: a descriptor that becomes readable when `pid` exits.
pub fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: raw syscall with integer arguments; a valid fd is returned on success.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `pidfd_send_signal(2)`.
pub fn pidfd_send_signal(fd: &OwnedFd, sig: i32) -> io::Result<()> {
    // SAFETY: raw syscall on a valid pidfd with a null siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Launches sent back to back (the daemon does not wait for answers) come out whole, in
    /// order, each with its own lock and its own gate (every other one is gated), however
    /// the reads split or glue them: a plan larger than one read, then small ones behind it.
    #[test]
    fn launches_sent_back_to_back_are_received_whole_with_their_own_locks() {
        let tmp = tempfile::tempdir().unwrap();
        let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let plans: Vec<Vec<u8>> = vec![
            vec![b'a'; 300 * 1024],
            b"{\"b\":1}".to_vec(),
            vec![b'c'; 70 * 1024],
            b"{}".to_vec(),
        ];
        let locks: Vec<PathBuf> = (0..plans.len())
            .map(|i| tmp.path().join(format!("lock{i}")))
            .collect();
        let sender = {
            let plans = plans.clone();
            let locks = locks.clone();
            std::thread::spawn(move || {
                for (i, (plan, path)) in plans.iter().zip(&locks).enumerate() {
                    let f = OwnedFd::from(File::create(path).unwrap());
                    let gate = (i % 2 == 1).then(|| {
                        OwnedFd::from(File::create(format!("{}.gate", path.display())).unwrap())
                    });
                    // Every third one carries its log (a job launched before it is published).
                    let log = (i % 3 == 2).then(|| {
                        OwnedFd::from(File::create(format!("{}.log", path.display())).unwrap())
                    });
                    // The last one is a prestart: a gate, no lock.
                    let lock = (i + 1 < plans.len()).then_some(&f);
                    send_launch(&tx, plan, lock, gate.as_ref(), log.as_ref()).unwrap();
                }
            })
        };
        let mut r = Receiver::new(rx.as_raw_fd());
        for (i, (plan, path)) in plans.iter().zip(&locks).enumerate() {
            let got = r.next().unwrap().expect("a launch");
            assert_eq!(got.plan.len(), plan.len());
            assert!(&got.plan == plan);
            match &got.lock {
                Some(lock) => {
                    let target =
                        fs::read_link(format!("/proc/self/fd/{}", lock.as_raw_fd())).unwrap();
                    assert_eq!(&target, path, "the lock of another launch");
                }
                None => assert_eq!(i + 1, plans.len(), "launch {i} came without its lock"),
            }
            match (i % 2 == 1, &got.gate) {
                (false, None) => {}
                (true, Some(g)) => {
                    let target = fs::read_link(format!("/proc/self/fd/{}", g.as_raw_fd())).unwrap();
                    assert_eq!(target, PathBuf::from(format!("{}.gate", path.display())));
                }
                (want, got) => panic!("launch {i}: gated {want}, gate received {got:?}"),
            }
            match (i % 3 == 2, &got.log) {
                (false, None) => {}
                (true, Some(l)) => {
                    let target = fs::read_link(format!("/proc/self/fd/{}", l.as_raw_fd())).unwrap();
                    assert_eq!(target, PathBuf::from(format!("{}.log", path.display())));
                }
                (want, got) => panic!("launch {i}: logged {want}, log received {got:?}"),
            }
        }
        sender.join().unwrap();
        assert!(!r.has_whole_launch());
        assert!(r.next().unwrap().is_none(), "end of file between launches");

        // Glued for certain: two launches' bytes in one message carrying both locks, then
        // one launch cut across two messages.
        use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
        let (tx, rx) = std::os::unix::net::UnixStream::pair().unwrap();
        let enc = |p: &[u8]| [&(p.len() as u64).to_le_bytes()[..], p].concat();
        let files: Vec<File> = locks.iter().map(|p| File::open(p).unwrap()).collect();
        let send = |bytes: &[u8], fds: &[i32]| {
            let cmsg = [ControlMessage::ScmRights(fds)];
            let n = sendmsg::<()>(
                tx.as_raw_fd(),
                &[io::IoSlice::new(bytes)],
                &cmsg,
                MsgFlags::empty(),
                None,
            )
            .unwrap();
            assert_eq!(n, bytes.len());
        };
        let two = [enc(b"one"), enc(b"two")].concat();
        send(&two, &[files[0].as_raw_fd(), files[1].as_raw_fd()]);
        let three = enc(b"three");
        send(&three[..5], &[files[2].as_raw_fd()]);
        send(&three[5..], &[]);
        drop(tx);
        let mut r = Receiver::new(rx.as_raw_fd());
        for (i, want) in [&b"one"[..], b"two", b"three"].into_iter().enumerate() {
            let got = r.next().unwrap().expect("a launch");
            assert_eq!(got.plan, want);
            assert!(got.gate.is_none());
            let lock = got.lock.expect("a lock");
            let target = fs::read_link(format!("/proc/self/fd/{}", lock.as_raw_fd())).unwrap();
            assert_eq!(target, locks[i]);
        }
        assert!(r.next().unwrap().is_none());
    }

    /// The line a prestarted bash evaluates at its gate turns the environment it started
    /// with into the placement's, whatever the values hold.
    #[test]
    fn env_change_is_evaluated_by_the_gate_line_to_the_exact_values() {
        let map = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let from = map(&[("KEEP", "same"), ("CHANGE", "old"), ("GONE", "x")]);
        let odd = "a b'c\"d$e`f\\g\nh\té,0";
        let to = map(&[("KEEP", "same"), ("CHANGE", odd), ("NEW", "")]);
        let line = env_change(&from, &to).unwrap();
        assert!(
            line.ends_with('\n') && line.matches('\n').count() == 1,
            "{line:?}"
        );
        assert!(
            !line.contains("KEEP"),
            "unchanged values are not sent: {line:?}"
        );
        let script = format!(
            "{GATE_LINE}printf '%s|' \"$KEEP\" \"$CHANGE\" \"${{NEW-unset}}\" \"${{GONE-unset}}\" \"${{_skyspool_env-unset}}\""
        );
        let out = crate::output_with_stdin(
            Command::new("/bin/bash")
                .args(["--noprofile", "--norc", "-c", &script])
                .env_clear()
                .envs(&from),
            line.as_bytes(),
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("same|{odd}||unset|unset|")
        );
        assert!(env_change(&from, &map(&[("BAD-NAME", "1")])).is_none());
    }

    /// A gate opens on the daemon's byte, and stays shut when its pipe closes without one
    /// (a failed round, or a daemon that died).
    #[test]
    fn gate_opens_on_a_byte_only() {
        let (r, w) = nix::unistd::pipe().unwrap();
        nix::unistd::write(&w, &[1]).unwrap();
        drop(w);
        assert!(Gate { daemon: r }.open());
        let (r, w) = nix::unistd::pipe().unwrap();
        drop(w);
        assert!(!Gate { daemon: r }.open());
    }

    #[test]
    fn start_ticks_of_self() {
        let me = std::process::id();
        let stat = fs::read_to_string(format!("/proc/{me}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let field_22: u64 = rest.split_whitespace().nth(19).unwrap().parse().unwrap();
        assert_eq!(process_start_ticks(me), Some(field_22));
        assert!(!children_of(std::process::id()).contains(&std::process::id()));
    }

    /// A process is told apart from a later one with its pid; one that has exited is not
    /// alive.
    #[test]
    fn process_ident_is_alive_only_for_the_same_process() {
        let me = ProcessIdent::me().expect("this process");
        assert!(me.alive());
        let later = ProcessIdent {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(!later.alive(), "same pid, another start time");
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        let ident = ProcessIdent {
            pid,
            start_ticks: process_start_ticks(pid).unwrap_or(0),
        };
        child.wait().unwrap();
        assert!(!ident.alive(), "reaped");
    }

    #[test]
    fn script_quotes_cwd() {
        let s = script_text("echo hi", &remote::shell_quote("/tmp/it's"), "");
        assert!(s.contains(r"cd '/tmp/it'\''s'"));
        assert!(s.ends_with("echo hi\n"));
    }

    #[test]
    fn prefixes_like_skypilot() {
        let n = NodeLaunch {
            rank: 1,
            name: "w1".into(),
            ip: "10.0.0.2".into(),
            local: true,
            gpus: vec![],
            ssh: None,
        };
        assert_eq!(
            rank_prefix(&n, 42),
            "(worker1, rank=1, pid=42, ip=10.0.0.2) "
        );
    }
}
