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
    let _ = target.run(&remote::sweep_command(tag, rank), Duration::from_secs(15));
    let _ = target.run(
        &format!("rm -rf {}", remote::shell_quote(&dir)),
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

/// Entry point of `skyspool supervise`: the daemon's *launcher*. One such process, started
/// by the daemon and kept for its lifetime, waits on its stdin (a Unix socket) for jobs:
/// each comes as the launch lock (`SCM_RIGHTS`) and a length-prefixed plan. It hands each
/// to a free supervisor, or forks a new one, and answers with that supervisor's pid.
///
/// Supervisors are kept: one that has finished a job (its final `status` written) says so
/// on its socket and takes the next job it is given, so a busy queue pays a fork, its
/// copy-on-write faults and an exit per supervisor, not per job. At most
/// [`MAX_FREE_SUPERVISORS`] wait; more are let go. End-of-file on stdin means the daemon is
/// gone or no longer needs the launcher: it exits, the free supervisors see their socket
/// close and exit too, and running ones finish their job (in sessions of their own) first.
pub fn supervise_main() -> Result<(), ExecError> {
    // Children are never waited for here: the kernel reaps them (the daemon watches each
    // through a pidfd, which does not need a parent's wait).
    // SAFETY: setting a signal disposition.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let mut launches = Receiver::new(0);
    let mut sups: Vec<Forked> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(0)
            .chain(sups.iter().map(|s| s.sock.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ExecError::Io("waiting for launches".into(), e));
        }
        // Supervisors first: one that said it is free must count for the launch its final
        // `status` made possible.
        for i in (0..sups.len()).rev() {
            if fds[i + 1].revents != 0 && !sups[i].heard() {
                sups.swap_remove(i);
            }
        }
        let mut free = 0;
        sups.retain(|s| {
            free += usize::from(s.free);
            !s.free || free <= MAX_FREE_SUPERVISORS
        });
        if fds[0].revents == 0 {
            continue;
        }
        // One launch, then those the same read brought along, before waiting again (poll
        // would not report bytes already taken off the socket).
        loop {
            let Some(job) = launches.next()? else {
                return Ok(());
            };
            let pid = launch(&mut sups, job, &mut launches);
            reply_pid(pid)?;
            if !launches.has_whole_launch() {
                break;
            }
        }
    }
}

/// How many supervisors with no job the launcher keeps for the next ones.
const MAX_FREE_SUPERVISORS: usize = 8;

/// A supervisor the launcher forked, and the launcher's end of their socket.
struct Forked {
    pid: u32,
    sock: std::os::unix::net::UnixStream,
    /// It said it has finished its job and waits for the next.
    free: bool,
}

impl Forked {
    /// Reads what the supervisor said (one byte per finished job); false when it is gone.
    fn heard(&mut self) -> bool {
        let mut b = [0u8; 16];
        loop {
            match nix::unistd::read(&self.sock, &mut b) {
                Ok(0) => return false,
                Ok(_) => {
                    self.free = true;
                    return true;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Gives one launch to a free supervisor, or to a new one forked for it. Returns its pid
/// (0: none could be made).
fn launch(sups: &mut Vec<Forked>, job: Launch, launches: &mut Receiver) -> u32 {
    while let Some(i) = sups.iter().rposition(|s| s.free) {
        if send_launch(
            &sups[i].sock,
            &job.plan,
            job.lock.as_ref(),
            job.gate.as_ref(),
            job.log.as_ref(),
        )
        .is_ok()
        {
            sups[i].free = false;
            return sups[i].pid;
        }
        // Gone since it said it was free: the next one, or a fork.
        sups.swap_remove(i);
    }
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skyspool supervise: socketpair: {e}");
            return 0;
        }
    };
    // SAFETY: this process is single-threaded (no thread is ever started before a fork),
    // so the child may run anything.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // The other supervisors' sockets are not this one's business; holding them
            // would hide their end from the launcher. Nor are the locks of launches that
            // came in the same read: holding one would keep that job's lock held.
            drop(std::mem::take(sups));
            drop(std::mem::take(&mut launches.locks));
            drop(ours);
            let code = supervisor_main(job, theirs);
            std::process::exit(code);
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            sups.push(Forked {
                pid: child.as_raw() as u32,
                sock: ours,
                free: false,
            });
            child.as_raw() as u32
        }
        Err(e) => {
            eprintln!("skyspool supervise: fork: {e}");
            0
        }
    }
}

/// One launch as the launcher and a supervisor receive it: the plan (`serde_json` of a
/// [`LaunchPlan`]), the launch lock, and the job's start gate when it has one.
pub struct Launch {
    pub plan: Vec<u8>,
    /// The launch lock; `None` for a prestart (the lock comes with its confirmation).
    pub lock: Option<OwnedFd>,
    /// With a lock: the read end of a pipe the daemon writes one byte into once the job's
    /// admission is durable, or closes without writing when it cannot be (or when the
    /// daemon dies first). A supervisor given a gate starts nothing of the job and records
    /// nothing before the byte is there: without it, it lets the job go untaken (see
    /// [`Gate::open`]). Without a lock (a prestart): a Unix socket the job's real launch
    /// comes on (see [`prestart`]).
    pub gate: Option<OwnedFd>,
    /// The job's `log`, opened for appending by the daemon, when the job is launched before
    /// it is published (its directory is still in `staging/`, see the daemon's early
    /// launch); otherwise the supervisor opens `jobs/<id>/log` itself.
    pub log: Option<OwnedFd>,
}

/// The bit of a launch's length word that says a gate travels with its lock.
const GATED: u64 = 1 << 63;
/// The bit of a launch's length word that says no lock travels with it: a prestart (see
/// [`prestart`]), whose gate is a socket the confirmation comes on.
const UNLOCKED: u64 = 1 << 62;
/// The bit of a launch's length word that says the job's log travels with it (after the
/// lock and the gate).
const LOGGED: u64 = 1 << 61;

/// Sends one launch on `sock`: the lock (if any), the gate (if any) and the log (if any) as
/// `SCM_RIGHTS` with the first bytes, the plan's length (8 bytes, little-endian; [`GATED`]
/// set when a gate comes, [`UNLOCKED`] when no lock does, [`LOGGED`] when the log does),
/// then the plan.
pub fn send_launch(
    sock: &std::os::unix::net::UnixStream,
    plan: &[u8],
    lock: Option<&OwnedFd>,
    gate: Option<&OwnedFd>,
    log: Option<&OwnedFd>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut bytes = Vec::with_capacity(8 + plan.len());
    let flag = if gate.is_some() { GATED } else { 0 }
        | if lock.is_none() { UNLOCKED } else { 0 }
        | if log.is_some() { LOGGED } else { 0 };
    bytes.extend_from_slice(&(plan.len() as u64 | flag).to_le_bytes());
    bytes.extend_from_slice(plan);
    let fds: Vec<_> = lock
        .iter()
        .chain(gate.iter())
        .chain(log.iter())
        .map(|f| f.as_raw_fd())
        .collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(&bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        match nix::sys::socket::send(sock.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A supervisor's life: set up once, then one job after another, each given by the
/// launcher on `sock`, until the launcher is gone or a job could not be finished cleanly.
fn supervisor_main(job: Launch, sock: std::os::unix::net::UnixStream) -> i32 {
    // SAFETY: restoring the default disposition; we wait for our own children.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    // The daemon's socket (stdin) and the launcher's answers (stdout) are not the jobs'
    // business, and a supervisor holding the answers' pipe would hide the launcher's exit
    // from the daemon.
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: dup2 onto fds 0 and 1.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    // Own session: a terminal's ^C or hang-up aimed at the daemon never reaches the job.
    let _ = nix::unistd::setsid();
    // Orphans of the job are re-parented to us, so nothing escapes a cancel.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let signals = Signals::block();
    let me = std::process::id();
    let record = SupervisorRecord {
        pid: me,
        start_ticks: process_start_ticks(me).unwrap_or(0),
    };
    // The same line in the lock of every job this supervisor takes.
    let record = match serde_json::to_vec(&record) {
        Ok(mut line) => {
            line.push(b'\n');
            line
        }
        Err(e) => {
            eprintln!("skyspool supervise: {e}");
            return 1;
        }
    };
    let finalizer = Finalizer::start();
    let mut launches = Receiver::new(sock.as_raw_fd());
    let code = serve_jobs(job, &sock, &mut launches, &signals, &record, &finalizer);
    // The last job's result is durable and its lock free before this process ends.
    finalizer.finish();
    code
}

/// The supervisor's loop: one job after another until the launcher is gone (0) or a job
/// could not be finished cleanly (1).
fn serve_jobs(
    first: Launch,
    sock: &std::os::unix::net::UnixStream,
    launches: &mut Receiver,
    signals: &Signals,
    record: &[u8],
    finalizer: &Finalizer,
) -> i32 {
    let mut job = first;
    loop {
        // A SIGTERM still pending was meant for the last job (a cancel racing with its
        // end). One meant for this job comes with its `cancel` file, which is looked at
        // before anything runs.
        signals.drain();
        let Launch {
            plan,
            lock,
            gate,
            log,
        } = job;
        // Said once the final `status` is written: the launcher may hand over the next job
        // while this one's result is made durable.
        let free = || {
            nix::sys::socket::send(
                sock.as_raw_fd(),
                &[1],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            )
            .is_ok()
        };
        // Whether the launcher still runs (its end of our socket is open): a daemon that
        // stops closes it, and waits for it to exit, before its last checkpoint.
        let launcher_alive = || {
            let mut fd = [libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd, no waiting.
            let n = unsafe { libc::poll(fd.as_mut_ptr(), 1, 0) };
            n >= 0 && fd[0].revents & (libc::POLLHUP | libc::POLLERR) == 0
        };
        match supervise_job(
            &plan,
            lock,
            gate,
            log,
            signals,
            record,
            &free,
            &launcher_alive,
            finalizer,
        ) {
            Ok(true) => {}
            Ok(false) => return 0,
            Err(e) => {
                eprintln!("skyspool supervise: {e}");
                return 1;
            }
        }
        job = match launches.next() {
            Ok(Some(next)) => next,
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("skyspool supervise: {e}");
                return 1;
            }
        };
    }
}

/// Tells the daemon the pid of the supervisor that got its launch (0: none), on stdout (a
/// pipe the daemon reads as answers come, in the order of the launches).
fn reply_pid(pid: u32) -> Result<(), ExecError> {
    let bytes = pid.to_le_bytes();
    let stdout = io::stdout();
    let mut done = 0;
    while done < bytes.len() {
        match nix::unistd::write(std::os::fd::AsFd::as_fd(&stdout), &bytes[done..]) {
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ExecError::Io("answering the daemon".into(), e.into())),
        }
    }
    Ok(())
}

/// Supervises one job. Returns whether this process may take another: its final `status`
/// was written and the launcher was told (`free`).
#[allow(clippy::too_many_arguments)]
fn supervise_job(
    text: &[u8],
    lock: Option<OwnedFd>,
    gate: Option<OwnedFd>,
    log: Option<OwnedFd>,
    signals: &Signals,
    record: &[u8],
    free: &dyn Fn() -> bool,
    launcher_alive: &dyn Fn() -> bool,
    finalizer: &Finalizer,
) -> Result<bool, ExecError> {
    let (plan, lock, gate, mut pre, log) = match lock {
        Some(lock) => (parse_plan(text)?, lock, gate, None, log),
        None => {
            let gate = gate.ok_or_else(|| ExecError::Plan("a prestart without a gate".into()))?;
            match prestart(text, gate, log)? {
                Some((plan, lock, start_gate, pre, log)) => (plan, lock, start_gate, pre, log),
                // Not confirmed: nothing of the job ran, nothing says it was taken.
                None => return Ok(false),
            }
        }
    };
    let spool = Spool::at(&plan.spool);
    let mut lock = File::from(lock);
    // This process's record, appended to the lock file (opened O_APPEND by the daemon) after
    // the daemon's launch record, says it took the job: no new file on the way to the job's
    // first command. Not fsynced: the record only matters while this process lives (after a
    // power loss nothing of the job runs any more), and a daemon that finds the lock held
    // before the record is written finds this process as the lock's holder instead. A gated
    // job's is written once its gate opens (see [`Gate`]).
    let mut taken = Taken::new(gate.map(|daemon| Gate { daemon }), &mut lock, record)?;
    // Only a job of one local node starts its bash behind the gate; any other waits here.
    let local = plan.nodes.len() <= 1 && plan.nodes.iter().all(|n| n.ssh.is_none());
    let cancel = cancel_pending(&spool, &plan);
    if !local || cancel {
        match taken.open_now() {
            Err(ExecError::Untaken) => return Ok(untaken(&plan)),
            other => other?,
        }
    }
    // A cancel whose file exists already (the daemon signals only a supervisor it knows)
    // is honoured before anything runs.
    let result = if cancel {
        Ok(finish(
            Status::Cancelled,
            vec![None; plan.nodes.len().max(1)],
            Some("cancelled before it started"),
        ))
    } else {
        match run_job(&plan, &spool, log, signals, &mut taken, &mut pre) {
            Err(ExecError::Untaken) => {
                kill_all_descendants(false);
                return Ok(untaken(&plan));
            }
            other => other,
        }
    };
    clean_remote(&plan);
    let result = match result {
        Ok(r) => r,
        Err(e) => JobResult {
            status: Status::FailedDriver,
            exit_codes: vec![],
            ended: spool::now_rfc3339(),
            reason: Some(format!("supervisor error: {e}")),
        },
    };
    kill_all_descendants(false);
    let mut result = result;
    if filesystem_full(&spool.job_dir(plan.job_id)) {
        let note = "the spool's filesystem is full: the job's log may be incomplete";
        result.reason = Some(match result.reason.take() {
            Some(r) => format!("{r}; {note}"),
            None => note.to_string(),
        });
    }
    // In a multi-node job, say which node's failure ended it (one node's log line alone does
    // not tell); a single-node job's log stays exactly its own output.
    if result.status != Status::Succeeded && plan.nodes.len() > 1 {
        if let (Some(reason), Ok(mut log)) = (&result.reason, open_log(&plan, "log")) {
            let _ = writeln!(log, "skyspool: {}: {reason}", result.status);
        }
    }
    let mut line = serde_json::to_vec(&result).map_err(|e| ExecError::Plan(e.to_string()))?;
    line.push(b'\n');
    // The result, as a line appended to `supervisor.lock` (after the launch record and this
    // supervisor's record: no new file, and no new block on a full disk); then `status`;
    // then the fsyncs. The daemon wakes on `status`, reads the result and gives the job's
    // resources to the next job while the finalizer thread makes the result durable (the
    // lock file and `.sky/`, which holds its name) and only then frees the lock (closes
    // it); the launcher is told this process is free once `status` is written, so its next
    // job can start meanwhile. (Nothing of the next job's start is durable before that
    // either; a power cut in between finds no result and settles the job FAILED_DRIVER, or
    // by the final `status` if that is on disk.) Each step is attempted whatever happens to
    // the others.
    if let Err(e) = lock.write_all(&line) {
        eprintln!(
            "skyspool supervise: job {}: supervisor.lock: {e}",
            plan.job_id
        );
    }
    let status = spool.write_status(plan.job_id, result.status);
    if daemon_journals_end(&plan) && launcher_alive() {
        drop(lock);
    } else {
        finalizer.submit((plan.job_id, lock, private_dir(&plan)));
    }
    status?;
    Ok(free())
}

/// A phase's commands, unless it has none (absent, or only blanks).
fn commands(phase: &Option<String>) -> Option<&str> {
    phase.as_deref().filter(|s| !s.trim().is_empty())
}

/// One local phase's script: its path (`.sky/<phase>.sh`) and its text, behind
/// [`GATE_LINE`] when `gated`. A text that fits in one argument goes to bash as `-c` (see
/// [`inline_script`]); a longer one is written to the path first and read from there.
fn phase_script(plan: &LaunchPlan, phase: &str, body: &str, gated: bool) -> (PathBuf, String) {
    let script = private_dir(plan).join(format!("{phase}.sh"));
    let cwd = remote::shell_quote(&plan.cwd.to_string_lossy());
    let body = match plan.speculative {
        true => SPECULATIVE_BODY,
        false => body,
    };
    let text = script_text(body, &cwd, "");
    match gated {
        false => (script, text),
        true => (script, format!("{GATE_LINE}{text}")),
    }
}

/// The commands of a speculative prestart's script: the job's own, given on its gate line
/// as `_skyspool_run` (see [`PreSpawned::release`]).
const SPECULATIVE_BODY: &str = "eval \"$_skyspool_run\"";

/// The script as bash's `-c` argument, when it fits in one.
fn inline_script(text: &str) -> Option<&str> {
    (text.len() <= INLINE_SCRIPT_MAX).then_some(text)
}

/// Whether a gated launch of `plan` opens no path of the job before its gate opens: one
/// local node, and a first phase (setup, else run) whose script goes to bash as an
/// argument (a longer one is written to `.sky/` first). Such a job may be launched before
/// its directory is published (see the daemon's early launch), with its log passed along.
pub fn launchable_unpublished(plan: &LaunchPlan) -> bool {
    let local = plan.nodes.len() == 1 && plan.nodes.iter().all(|n| n.ssh.is_none());
    let first = commands(&plan.setup).or_else(|| commands(&plan.run));
    local
        && first
            .is_none_or(|body| inline_script(&phase_script(plan, "setup", body, true).1).is_some())
}

fn parse_plan(text: &[u8]) -> Result<LaunchPlan, ExecError> {
    serde_json::from_slice(text).map_err(|e| ExecError::Plan(e.to_string()))
}

/// A prestart's confirmation: the real plan, its lock, its start gate if its admission was
/// not durable yet (a speculative prestart's job, launched before its publication), the
/// bash if it can run it, and the job's log if the prestart was given it.
type Confirmed = (
    LaunchPlan,
    OwnedFd,
    Option<OwnedFd>,
    Option<PreSpawned>,
    Option<OwnedFd>,
);

/// A prestart: a queued job's first phase, started ahead of its placement so that a freed
/// slot goes to a job whose bash is up already. `text` is the plan the daemon expects the
/// job to get (its node, no GPUs yet). The bash starts now, held at its script's first line
/// ([`GATE_LINE`]) like a gated job's, and this process waits on `gate` (a socket) for the
/// daemon's confirmation: the job's real launch (plan and lock) once it is placed. Without
/// one (the socket closes: the job was cancelled, placed elsewhere, or the daemon is gone)
/// the bash is killed at its first line and `None` comes back. With one, the bash is handed
/// on if the real plan is the one it was started for (see [`PreSpawned::release`]), and
/// killed otherwise (the phase then starts afresh).
fn prestart(
    text: &[u8],
    gate: OwnedFd,
    log: Option<OwnedFd>,
) -> Result<Option<Confirmed>, ExecError> {
    let tentative = parse_plan(text)?;
    // A speculative prestart is given the log of the job it is made for (its directory is
    // not published yet): the bash writes there, and so does this process once the job is
    // confirmed.
    let kept = match &log {
        Some(f) => Some(
            f.try_clone()
                .map_err(|e| ExecError::Io("the job's log".into(), e))?,
        ),
        None => None,
    };
    let pre = match PreSpawned::start(&tentative, log) {
        Ok(pre) => pre,
        Err(e) => {
            eprintln!(
                "skyspool supervise: job {}: could not prestart: {e}",
                tentative.job_id
            );
            None
        }
    };
    // One launch, then the end: a small buffer (a plan is a few KiB; more takes more reads).
    let mut confirm = Receiver::with_buffer(gate.as_raw_fd(), 8 * 1024);
    let launch = match confirm.next() {
        Ok(Some(launch)) => launch,
        Ok(None) | Err(_) => {
            if let Some(p) = pre {
                p.abort();
            }
            return Ok(None);
        }
    };
    let plan = parse_plan(&launch.plan)?;
    let lock = launch
        .lock
        .ok_or_else(|| ExecError::Plan("a prestart confirmed without its lock".into()))?;
    let pre = match pre {
        Some(p) if p.fits(&tentative, &plan) => Some(p),
        Some(p) => {
            p.abort();
            None
        }
        None => None,
    };
    Ok(Some((plan, lock, launch.gate, pre, kept.or(launch.log))))
}

/// The first phase of a prestarted job: its bash, waiting at the script's first line for
/// the line of environment its placement adds (see [`GATE_LINE`]).
struct PreSpawned {
    phase: &'static str,
    pid: u32,
    /// The write end of the bash's stdin.
    release: OwnedFd,
    /// The environment it was started with.
    env: BTreeMap<String, String>,
    /// Made before its job existed (see [`LaunchPlan::speculative`]): the job's commands
    /// come with its release.
    speculative: bool,
}

/// The longest `run` a speculative prestart takes (bash reads its release line a byte at a
/// time from the pipe); a longer one starts afresh.
const SPECULATIVE_RUN_MAX: usize = 16 * 1024;

impl PreSpawned {
    /// Starts the first phase of a one-node local job, held at its gate line; `None` for a
    /// job that has nothing to run or runs elsewhere. `log`: the job's log, when the job's
    /// directory is not published yet (a speculative prestart's).
    fn start(plan: &LaunchPlan, log: Option<OwnedFd>) -> Result<Option<PreSpawned>, ExecError> {
        let [node] = plan.nodes.as_slice() else {
            return Ok(None);
        };
        let (phase, body) = match (commands(&plan.setup), commands(&plan.run)) {
            (Some(setup), _) => ("setup", setup),
            (None, Some(run)) => ("run", run),
            (None, None) => return Ok(None),
        };
        if node.ssh.is_some() {
            return Ok(None);
        }
        let (script, text) = phase_script(plan, phase, body, true);
        let inline = inline_script(&text);
        if inline.is_none() {
            spool::write_private(&private_dir(plan), &format!("{phase}.sh"), text.as_bytes())?;
        }
        let (held, release) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ExecError::Io("a pipe for a prestarted job".into(), e.into()))?;
        let log = match log {
            Some(fd) => File::from(fd),
            None => open_log(plan, "log")?,
        };
        let (pid, _) = spawn_rank(
            plan,
            phase,
            &script,
            inline,
            body,
            node,
            Sink::Direct(log),
            Some(held.as_fd()),
        )
        .map_err(|e| ExecError::Io(format!("starting {phase} ahead"), e))?;
        Ok(Some(PreSpawned {
            phase,
            pid,
            release,
            env: rank_env(plan, phase, node),
            speculative: plan.speculative,
        }))
    }

    /// Whether the bash started for `tentative` can run `plan`: the same job, script,
    /// user and working directory on the same single local node (the environment of the
    /// placement, its GPUs, comes through [`PreSpawned::release`]).
    fn fits(&self, tentative: &LaunchPlan, plan: &LaunchPlan) -> bool {
        let node = |p: &LaunchPlan| match p.nodes.as_slice() {
            [n] if n.ssh.is_none() => Some(n.name.clone()),
            _ => None,
        };
        let script = match self.speculative {
            // Made for this ID before the job came: any job of its user that has only a
            // `run` (short enough to go down the pipe) can take it.
            true => {
                commands(&plan.setup).is_none()
                    && commands(&plan.run).is_some_and(|r| r.len() <= SPECULATIVE_RUN_MAX)
            }
            false => plan.setup == tentative.setup && plan.run == tentative.run,
        };
        node(plan).is_some()
            && node(plan) == node(tentative)
            && plan.job_id == tentative.job_id
            && script
            && !plan.speculative
            && plan.cwd == tentative.cwd
            && plan.user.uid == tentative.user.uid
            && plan.user.gid == tentative.user.gid
            && plan.user.groups == tentative.user.groups
            && plan.user.switch == tentative.user.switch
    }

    /// Lets the bash run with `env` (the phase's environment under the real plan): the
    /// difference from what it started with goes down its stdin as one line of `export`
    /// and `unset`, which its gate line evaluates. `Err(self)` when a name cannot be set by
    /// the shell (the caller then kills it and starts the phase afresh).
    /// A speculative one also gets the job's commands (`run`), as `_skyspool_run`, which
    /// its script evaluates where the job's commands would be.
    fn release(self, env: &BTreeMap<String, String>, run: &str) -> Result<u32, PreSpawned> {
        let Some(mut line) = env_change(&self.env, env) else {
            return Err(self);
        };
        if self.speculative {
            line.pop();
            line.push_str("_skyspool_run=");
            line.push_str(&ansi_c_quoted(run));
            line.push('\n');
        }
        // A bash that is gone already (it could not start) is reaped with its exit code.
        let _ = write_all_fd(&self.release, line.as_bytes());
        Ok(self.pid)
    }

    /// Kills the bash, still at its first line: nothing of the job ran.
    fn abort(self) {
        signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid as i32), None);
    }
}

/// One line of shell that turns environment `from` into `to` (`export K=$'…'`, `unset K`),
/// newline-terminated; `None` when a name to change is not a shell identifier.
fn env_change(from: &BTreeMap<String, String>, to: &BTreeMap<String, String>) -> Option<String> {
    let ident = |k: &str| {
        let mut c = k.chars();
        c.next()
            .is_some_and(|f| f == '_' || f.is_ascii_alphabetic())
            && c.all(|x| x == '_' || x.is_ascii_alphanumeric())
    };
    let mut line = String::new();
    for (k, v) in to {
        if from.get(k) != Some(v) {
            if !ident(k) {
                return None;
            }
            line.push_str(&format!("export {k}={}; ", ansi_c_quoted(v)));
        }
    }
    for k in from.keys().filter(|k| !to.contains_key(*k)) {
        if !ident(k) {
            return None;
        }
        line.push_str(&format!("unset {k}; "));
    }
    line.push('\n');
    Some(line)
}

/// `text` as one shell word on one line: `$'…'`, with only `\`, `'` and control
/// characters escaped (bash reads a release line a byte at a time: the shorter the better).
/// The values of [`env_change`] and a speculative prestart's `run` are written so.
fn ansi_c_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str("$'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Writes all of `bytes` to `fd`.
fn write_all_fd(fd: &OwnedFd, mut bytes: &[u8]) -> nix::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A gated job's launch that its gate closed on unopened: nothing of it ran and nothing says
/// this process took it, so the daemon (this one, or the next at its start-up) finds it
/// untaken and queues it again. This process ends rather than waits for another job (false:
/// not free): its exit is what tells.
fn untaken(plan: &LaunchPlan) -> bool {
    eprintln!(
        "skyspool supervise: job {}: its admission was not confirmed durable; leaving it untaken",
        plan.job_id
    );
    false
}

/// The supervisor's side of a job's start gate ([`Launch::gate`]).
struct Gate {
    daemon: OwnedFd,
}

impl Gate {
    /// Waits for the daemon's word: true once its byte is there, false when the pipe closed
    /// without one (or cannot be waited on).
    fn open(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.daemon.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        loop {
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
            if n >= 0 {
                return fds[0].revents & libc::POLLIN != 0;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}

/// What says this supervisor took its job: its record, written to the job's lock at once,
/// or (a gated job) once the gate opens, right before the job's first command may run.
struct Taken<'a> {
    gate: Option<Gate>,
    lock: &'a mut File,
    record: &'a [u8],
}

impl<'a> Taken<'a> {
    /// Writes the record at once unless the job is behind a gate.
    fn new(gate: Option<Gate>, lock: &'a mut File, record: &'a [u8]) -> Result<Self, ExecError> {
        let mut taken = Taken { gate, lock, record };
        if taken.gate.is_none() {
            taken.record()?;
        }
        Ok(taken)
    }

    /// The gate, if the job is still behind one (its record is then not written yet).
    fn gate(&mut self) -> Option<Gate> {
        self.gate.take()
    }

    /// Waits at the gate, if the job is still behind one, and records the job as taken
    /// once it opens; [`ExecError::Untaken`] when it closes unopened.
    fn open_now(&mut self) -> Result<(), ExecError> {
        match self.gate() {
            None => Ok(()),
            Some(g) if g.open() => self.record(),
            Some(_) => Err(ExecError::Untaken),
        }
    }

    /// Writes the record of a job whose gate just opened.
    fn record(&mut self) -> Result<(), ExecError> {
        self.lock
            .write_all(self.record)
            .map_err(|e| ExecError::Io("supervisor.lock".into(), e))
    }
}

/// The first line of a gated or prestarted job's script: bash waits there, started, until
/// the supervisor says the job may run (a line on stdin, then end-of-file), and gives up
/// when stdin closes without one; the line is evaluated (empty for a gated job; for a
/// prestarted one the environment of its placement, see [`env_change`]); then its stdin is
/// `/dev/null` like any job's.
const GATE_LINE: &str = "IFS= read -r _skyspool_env || exit 1; eval \"$_skyspool_env\"; unset _skyspool_env; exec </dev/null\n";

/// Whether the daemon that launched the job records its end in its journal and is alive
/// (by pid and start time): it reads the result once `status` is final and appends the
/// job's final record to the journal, whose fsync follows within milliseconds. Else (no
/// journal, or a daemon gone: the job ended while none watched) the [`Finalizer`] makes the
/// result durable. The caller also asks whether the launcher still runs: a daemon that
/// stops ends its launcher before its last checkpoint (a `syncfs`), so a result written
/// after that checkpoint (by a job that ended while the daemon was stopping, which no
/// daemon journals) is made durable here, and one written before it by the checkpoint.
fn daemon_journals_end(plan: &LaunchPlan) -> bool {
    plan.journaling_daemon.is_some_and(|d| d.alive())
}

/// One finished job for the [`Finalizer`]: its id, its lock (holding the result) and `.sky/`.
type Finished = (JobId, File, PathBuf);

/// Fsyncs a finished job's lock file and `.sky/`, then closes the lock (which frees it).
fn finalize((id, lock, private): Finished) {
    let synced = lock
        .sync_data()
        .map_err(|e| ExecError::Io("supervisor.lock".into(), e))
        .and_then(|()| spool::sync_dir(&private).map_err(ExecError::from));
    drop(lock);
    if let Err(e) = synced {
        eprintln!("skyspool supervise: job {id}: {e}");
    }
}

/// The supervisor's second thread: for each finished job, in order, fsyncs the lock file
/// (which holds the result) and `.sky/`, then closes the lock, which frees it. Keeping this
/// off the supervisor's own thread lets the next job start without waiting for the disk.
struct Finalizer {
    tx: Option<std::sync::mpsc::Sender<Finished>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Finalizer {
    fn start() -> Finalizer {
        let (tx, rx) = std::sync::mpsc::channel::<Finished>();
        let thread = std::thread::Builder::new()
            .name("finalizer".into())
            .spawn(move || rx.into_iter().for_each(finalize));
        match thread {
            Ok(t) => Finalizer {
                tx: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                // Done in line instead (see `submit`).
                eprintln!("skyspool supervise: no finalizer thread: {e}");
                Finalizer {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    /// Makes a finished job's result durable, then frees its lock: on the thread, or here.
    fn submit(&self, job: Finished) {
        match &self.tx {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
                    finalize(job);
                }
            }
            None => finalize(job),
        }
    }

    /// Waits until every submitted job is durable and its lock free.
    fn finish(mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The receiving end of launches on a Unix stream socket. A launch is the plan's length
/// (8 bytes, little-endian, [`GATED`] set when a gate comes, [`UNLOCKED`] when no lock
/// does) and the plan, with the launch lock and the gate, those that come, as `SCM_RIGHTS`
/// on its first bytes. The daemon does not wait for one
/// launch to be answered before it sends the next, so one `recvmsg` can return the end of
/// one launch and the start of the next: bytes and descriptors are kept, in order, until a
/// whole launch is there (each launch takes the next one or two descriptors).
struct Receiver {
    fd: std::os::fd::RawFd,
    data: Vec<u8>,
    locks: std::collections::VecDeque<OwnedFd>,
    /// One receive buffer for the receiver's lifetime (in the launcher, a fresh zeroed one
    /// per launch would write 16 pages, each a copy-on-write fault while the last forked
    /// supervisor shares them).
    buf: Vec<u8>,
}

impl Receiver {
    fn new(fd: std::os::fd::RawFd) -> Receiver {
        Receiver::with_buffer(fd, 64 * 1024)
    }

    fn with_buffer(fd: std::os::fd::RawFd, size: usize) -> Receiver {
        Receiver {
            fd,
            data: Vec::new(),
            locks: std::collections::VecDeque::new(),
            buf: vec![0u8; size],
        }
    }

    /// Where the first launch in `data` ends, once all of it is there, whether a lock
    /// comes with it, whether a gate does, and whether the log does.
    fn whole(&self) -> Result<Option<(usize, bool, bool, bool)>, ExecError> {
        let Some(head) = self.data.get(..8) else {
            return Ok(None);
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(head);
        let word = u64::from_le_bytes(len);
        let end = usize::try_from(word & !(GATED | UNLOCKED | LOGGED))
            .ok()
            .and_then(|l| l.checked_add(8))
            .ok_or_else(|| ExecError::Plan("a launch of impossible length".into()))?;
        Ok((self.data.len() >= end).then_some((
            end,
            word & UNLOCKED == 0,
            word & GATED != 0,
            word & LOGGED != 0,
        )))
    }

    /// Whether a whole launch (bytes and descriptors) is already here, with no read needed.
    fn has_whole_launch(&self) -> bool {
        match self.whole() {
            Ok(Some((_, locked, gated, logged))) => {
                self.locks.len() >= usize::from(locked) + usize::from(gated) + usize::from(logged)
            }
            _ => false,
        }
    }

    /// The next whole launch; `None` when the socket closes between launches.
    fn next(&mut self) -> Result<Option<Launch>, ExecError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::io::IoSliceMut;
        loop {
            if let Some((end, locked, gated, logged)) = self.whole()? {
                let lock = match locked {
                    false => None,
                    true => Some(self.locks.pop_front().ok_or_else(|| {
                        ExecError::Plan("no launch lock came with the plan".into())
                    })?),
                };
                let gate = match gated {
                    false => None,
                    true => Some(self.locks.pop_front().ok_or_else(|| {
                        ExecError::Plan("no start gate came with a gated plan".into())
                    })?),
                };
                let log = match logged {
                    false => None,
                    true => Some(self.locks.pop_front().ok_or_else(|| {
                        ExecError::Plan("no log came with a plan that said it would".into())
                    })?),
                };
                let rest = self.data.split_off(end);
                let mut plan = std::mem::replace(&mut self.data, rest);
                plan.drain(..8);
                return Ok(Some(Launch {
                    plan,
                    lock,
                    gate,
                    log,
                }));
            }
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut self.buf)];
                let msg = match recvmsg::<()>(
                    self.fd,
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(ExecError::Io("receiving a launch".into(), e.into()));
                    }
                };
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(r) = c {
                            fds.extend(r);
                        }
                    }
                }
                (msg.bytes, fds)
            };
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                self.locks.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                if self.data.is_empty() && self.locks.is_empty() {
                    return Ok(None);
                }
                return Err(ExecError::Plan(
                    "the daemon hung up in the middle of a launch".into(),
                ));
            }
            self.data.extend_from_slice(&self.buf[..n]);
        }
    }
}

/// Whether `jobs/<id>/cancel` exists and was made by the job's owner, root or the daemon's
/// user (the daemon removes anyone else's).
fn cancel_pending(spool: &Spool, plan: &LaunchPlan) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    spool
        .cancel_requested(plan.job_id)
        .is_some_and(|m| m.uid() == plan.user.uid || m.uid() == 0 || m.uid() == me)
}

/// No block left for an unprivileged writer on the filesystem holding `dir`.
fn filesystem_full(dir: &Path) -> bool {
    nix::sys::statvfs::statvfs(dir).is_ok_and(|v| v.blocks_available() == 0)
}

fn open_log(plan: &LaunchPlan, name: &str) -> Result<File, ExecError> {
    let dir = Spool::at(&plan.spool).job_dir(plan.job_id);
    Ok(spool::open_log(&dir, name)?)
}

/// Runs setup (if any) then run (if any) on every node; returns the outcome.
fn run_job(
    plan: &LaunchPlan,
    spool: &Spool,
    log: Option<OwnedFd>,
    signals: &Signals,
    taken: &mut Taken<'_>,
    pre: &mut Option<PreSpawned>,
) -> Result<JobResult, ExecError> {
    // Given by the daemon when the job was launched before it was published (its directory
    // is renamed from `staging/` meanwhile): nothing here opens a path of the job before its
    // gate opens, which is after the publication.
    let mut log = match log {
        Some(fd) => File::from(fd),
        None => open_log(plan, "log")?,
    };
    for note in &plan.notes {
        let _ = writeln!(log, "{note}");
    }
    let log = Arc::new(Mutex::new(log));
    let n = plan.nodes.len().max(1);
    if let Err(msg) = sync_workdirs(plan, &log) {
        return Ok(finish(Status::FailedSetup, vec![None; n], Some(&msg)));
    }
    if let Some(setup) = commands(&plan.setup) {
        let outcome = run_phase(plan, "setup", setup, &log, signals, taken, pre)?;
        match outcome {
            PhaseOutcome::Cancelled(codes) => {
                return Ok(finish(
                    Status::Cancelled,
                    codes,
                    Some("cancelled during setup"),
                ))
            }
            PhaseOutcome::Done(codes, _) if codes.iter().any(|c| *c != Some(0)) => {
                return Ok(finish(
                    Status::FailedSetup,
                    codes,
                    Some("setup exited with a non-zero code"),
                ));
            }
            PhaseOutcome::Done(..) => {}
        }
    }
    let Some(run) = commands(&plan.run) else {
        taken.open_now()?;
        spool.write_status(plan.job_id, Status::Running)?;
        return Ok(finish(Status::Succeeded, vec![Some(0); n], None));
    };
    match run_phase(plan, "run", run, &log, signals, taken, pre)? {
        PhaseOutcome::Cancelled(codes) => Ok(finish(Status::Cancelled, codes, Some("cancelled"))),
        PhaseOutcome::Done(codes, first) => {
            if codes.iter().all(|c| *c == Some(0)) {
                Ok(finish(Status::Succeeded, codes, None))
            } else {
                let describe = |r: usize| {
                    let node = plan.nodes.get(r).map(|n| n.name.as_str()).unwrap_or("?");
                    match codes.get(r).copied().flatten() {
                        Some(255) if plan.nodes.get(r).is_some_and(|n| n.ssh.is_some()) => {
                            format!(
                                "rank {r} ({node}) lost its connection (node down or unreachable)"
                            )
                        }
                        Some(c) if c > 128 => {
                            format!("rank {r} ({node}) was killed by signal {}", c - 128)
                        }
                        Some(c) => format!("rank {r} ({node}) exited with {c}"),
                        None => format!("rank {r} ({node}) gave no exit code"),
                    }
                };
                let first =
                    first.unwrap_or_else(|| codes.iter().position(|c| *c != Some(0)).unwrap_or(0));
                let mut reason = describe(first);
                if codes.len() > 1 {
                    reason.push_str("; the other ranks were stopped");
                }
                Ok(finish(Status::Failed, codes, Some(&reason)))
            }
        }
    }
}

fn finish(status: Status, exit_codes: Vec<Option<i32>>, reason: Option<&str>) -> JobResult {
    JobResult {
        status,
        exit_codes,
        ended: spool::now_rfc3339(),
        reason: reason.map(str::to_string),
    }
}

enum PhaseOutcome {
    /// Exit codes per rank, and the rank that failed first (whose failure stopped the rest).
    Done(Vec<Option<i32>>, Option<usize>),
    Cancelled(Vec<Option<i32>>),
}

/// The environment of one rank in one phase.
fn rank_env(plan: &LaunchPlan, phase: &str, node: &NodeLaunch) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.insert("PATH".into(), path);
    for key in ["LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.into(), v);
        }
    }
    env.insert("HOME".into(), plan.user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), plan.user.name.clone());
    env.insert("LOGNAME".into(), plan.user.name.clone());
    env.insert(
        "SHELL".into(),
        plan.user.shell.to_string_lossy().into_owned(),
    );
    env.insert("PYTHONUNBUFFERED".into(), "1".into());
    env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
    env.extend(plan.env.clone());
    env.insert(TAG_VAR.into(), plan.tag.clone());
    if phase == "setup" {
        env.extend(plan.setup_env.clone());
        env.insert("SKYPILOT_SETUP_NODE_RANK".into(), node.rank.to_string());
        // Setup sees no devices at all (SkyPilot), whatever `envs` says.
        env.remove("CUDA_VISIBLE_DEVICES");
    } else {
        env.extend(plan.run_env.clone());
        let devices: Vec<String> = node.gpus.iter().map(|g| g.to_string()).collect();
        env.insert("CUDA_VISIBLE_DEVICES".into(), devices.join(","));
        env.insert("SKYPILOT_NODE_RANK".into(), node.rank.to_string());
        env.insert(
            "SKYPILOT_NUM_GPUS_PER_NODE".into(),
            plan.num_gpus_per_node.to_string(),
        );
    }
    env
}

/// Runs one phase on every node and waits for it (or for a cancel).
fn run_phase(
    plan: &LaunchPlan,
    phase: &str,
    body: &str,
    log: &Arc<Mutex<File>>,
    signals: &Signals,
    taken: &mut Taken<'_>,
    pre: &mut Option<PreSpawned>,
) -> Result<PhaseOutcome, ExecError> {
    let dir = private_dir(plan);
    // A prestarted bash (this phase's, the job's first) runs on once it has the
    // environment of the placement; one that cannot take it is killed (still at its first
    // line) and the phase starts afresh.
    let mut started = None;
    if let (Some(p), [node]) = (pre.take(), plan.nodes.as_slice()) {
        match p.phase == phase {
            true => {
                // A speculative prestart's job was launched before its publication: its
                // commands go down only once its gate opens.
                if p.speculative {
                    if let Err(e) = taken.open_now() {
                        p.abort();
                        return Err(e);
                    }
                }
                match p.release(&rank_env(plan, phase, node), body) {
                    Ok(pid) => started = Some(pid),
                    Err(p) => p.abort(),
                }
            }
            false => p.abort(),
        }
    }
    // A job still behind its gate (one local node, its first phase): its bash starts now,
    // and waits at the script's first line, reading stdin (a pipe of ours), until the gate
    // opens. Its start-up (exec, loading, `bash` itself) overlaps the admission's fsyncs.
    let gate = taken.gate();
    let held = match &gate {
        None => None,
        Some(_) => Some(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| ExecError::Io("a pipe for the job's start gate".into(), e.into()))?,
        ),
    };
    let (script, text) = phase_script(plan, phase, body, held.is_some() || started.is_some());
    // A script that fits in one argument goes to bash as `-c` (with the script's path as
    // `$0`), and the file is written after the start, as the record of what ran: no file
    // to create on the way to the job's first command. A longer one is read from the file.
    // (Written in place, not renamed over: `.sky/` is the daemon's, nobody else writes
    // there.)
    let inline = inline_script(&text);
    if inline.is_none() && started.is_none() {
        spool::write_private(&dir, &format!("{phase}.sh"), text.as_bytes())?;
    }
    let multi = plan.nodes.len() > 1;
    let mut ranks: Vec<RankProc> = Vec::new();
    let mut pumps = Vec::new();
    let mut codes: Vec<Option<i32>> = vec![None; plan.nodes.len()];
    // The main process of each started rank, awaited through SIGCHLD and waitpid below.
    let mut by_pid: BTreeMap<u32, usize> = BTreeMap::new();
    if let Some(pid) = started {
        ranks.push(RankProc {
            pgid: pid,
            remote: None,
        });
        by_pid.insert(pid, 0);
    }
    for (i, node) in plan.nodes.iter().enumerate() {
        if started.is_some() {
            break;
        }
        let sink = if multi {
            Sink::Pipe
        } else {
            let f = log
                .lock()
                .map_err(|_| ExecError::Plan("log lock poisoned".into()))?
                .try_clone()
                .map_err(|e| ExecError::Io("log".into(), e))?;
            Sink::Direct(f)
        };
        let stdin = held.as_ref().map(|(r, _)| r.as_fd());
        match spawn_rank(plan, phase, &script, inline, body, node, sink, stdin) {
            Ok((pid, reader)) => {
                ranks.push(RankProc {
                    pgid: pid,
                    remote: node.ssh.clone().map(|t| (t, remote_dir(plan, node))),
                });
                if let Some(reader) = reader {
                    let per_node = open_log(plan, &format!("log.rank{}", node.rank))?;
                    let prefix = rank_prefix(node, pid);
                    let log = Arc::clone(log);
                    pumps.push(std::thread::spawn(move || {
                        pump(reader, prefix, log, per_node)
                    }));
                }
                by_pid.insert(pid, i);
            }
            Err(e) => {
                if let Ok(mut l) = log.lock() {
                    let _ = writeln!(l, "skyspool: could not start {phase} on {}: {e}", node.name);
                }
                codes[i] = Some(127);
            }
        }
    }
    if let (Some(g), Some((r, w))) = (gate, held) {
        drop(r);
        if !g.open() {
            // Still waiting at their first line: nothing of the job ran.
            for rank in &ranks {
                signal_group(rank.pgid, nix::sys::signal::Signal::SIGKILL);
            }
            for pid in by_pid.keys() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid as i32), None);
            }
            return Err(ExecError::Untaken);
        }
        taken.record()?;
        // The line bash waits for; then end-of-file.
        let _ = nix::unistd::write(&w, b"\n");
        drop(w);
    }
    // The phase's status, written once its processes run (it is this process that writes
    // the final one later, so the order holds; the daemon never writes it after the launch).
    let status = if phase == "setup" {
        Status::SettingUp
    } else {
        Status::Running
    };
    if let Some(text) = inline {
        if let Err(e) = spool::write_private(&dir, &format!("{phase}.sh"), text.as_bytes()) {
            if let Ok(mut l) = log.lock() {
                let _ = writeln!(
                    l,
                    "skyspool: could not keep a copy of the {phase} script: {e}"
                );
            }
        }
    }
    if let Err(e) = Spool::at(&plan.spool).write_status(plan.job_id, status) {
        // Not fatal: the processes run already and must be awaited; the final status is
        // written (in place if need be) at the end.
        if let Ok(mut l) = log.lock() {
            let _ = writeln!(l, "skyspool: could not record status {status}: {e}");
        }
    }
    let mut cancelled = false;
    let mut first_failed: Option<usize> = codes.iter().position(|c| c.is_some());
    let mut kill_deadline: Option<Instant> = None;
    while !by_pid.is_empty() {
        match signals.wait(kill_deadline) {
            Wake::Timeout => {
                stop_ranks(&ranks, phase, true);
                kill_all_descendants(true);
                kill_deadline = Some(Instant::now() + Duration::from_secs(3600));
            }
            Wake::Terminate => {
                // A supervisor takes one job after another: a SIGTERM the daemon sent for an
                // earlier job (a cancel that crossed that job's end) can land in this one.
                // The daemon signals only for a `cancel` file, so that file decides.
                if !cancelled && cancel_pending(&Spool::at(&plan.spool), plan) {
                    cancelled = true;
                    stop_ranks(&ranks, phase, false);
                    kill_deadline =
                        Some(Instant::now() + Duration::from_millis(plan.kill_grace_ms));
                }
            }
            Wake::Child => {
                for (pid, code) in reap_exited() {
                    // Anything else is an orphan of the job, reaped and forgotten.
                    let Some(rank) = by_pid.remove(&pid) else {
                        continue;
                    };
                    if let Some(c) = codes.get_mut(rank) {
                        *c = code;
                    }
                    if code != Some(0) && first_failed.is_none() && !cancelled {
                        first_failed = Some(rank);
                    }
                    // A node that fails stops the others (SkyPilot's multi-node rule).
                    if multi && code != Some(0) && kill_deadline.is_none() {
                        stop_ranks(&ranks, phase, false);
                        kill_deadline =
                            Some(Instant::now() + Duration::from_millis(plan.kill_grace_ms));
                    }
                }
            }
        }
    }
    // The main processes are gone: nothing they left behind may keep running.
    for r in &ranks {
        signal_group(r.pgid, nix::sys::signal::Signal::SIGKILL);
    }
    kill_all_descendants(false);
    for p in pumps {
        let _ = p.join();
    }
    if cancelled {
        Ok(PhaseOutcome::Cancelled(codes))
    } else {
        Ok(PhaseOutcome::Done(codes, first_failed))
    }
}

/// One started rank: its local process group (the bash, or the ssh client of a remote
/// rank) and, for a remote rank, where its processes live.
struct RankProc {
    pgid: u32,
    remote: Option<(SshTarget, String)>,
}

/// Asks every rank to stop (SIGTERM) or forces it (SIGKILL). A remote rank is signalled on
/// its node (its process group there); its local ssh client is left to report the exit,
/// except when forcing.
fn stop_ranks(ranks: &[RankProc], phase: &str, force: bool) {
    let (local_sig, name) = if force {
        (nix::sys::signal::Signal::SIGKILL, "KILL")
    } else {
        (nix::sys::signal::Signal::SIGTERM, "TERM")
    };
    let mut remote_signals = Vec::new();
    for r in ranks {
        match &r.remote {
            None => signal_group(r.pgid, local_sig),
            Some((target, dir)) => {
                let cmd = remote::signal_command(dir, phase, name);
                let target = target.clone();
                remote_signals.push(std::thread::spawn(move || {
                    let _ = target.run(&cmd, Duration::from_secs(15));
                }));
            }
        }
    }
    for t in remote_signals {
        let _ = t.join();
    }
    if force {
        for r in ranks.iter().filter(|r| r.remote.is_some()) {
            signal_group(r.pgid, local_sig);
        }
    }
}

fn rank_prefix(node: &NodeLaunch, pid: u32) -> String {
    if node.rank == 0 {
        format!("(head, rank=0, pid={pid}) ")
    } else {
        format!(
            "(worker{}, rank={}, pid={pid}, ip={}) ",
            node.rank, node.rank, node.ip
        )
    }
}

/// Copies one rank's output, line by line, into the merged log (prefixed) and its own log.
fn pump(reader: File, prefix: String, log: Arc<Mutex<File>>, mut per_node: File) {
    let mut r = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let _ = per_node.write_all(&line);
                if let Ok(mut l) = log.lock() {
                    let mut out = Vec::with_capacity(prefix.len() + line.len());
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&line);
                    let _ = l.write_all(&out);
                }
            }
        }
    }
}

/// Starts one rank of one phase: a local bash in its own process group (through
/// [`spawn::spawn`], as the job's user), or, for a remote node, an ssh client (in its own
/// process group) running [`remote::rank_wrapper`] there. Returns the pid to await.
#[allow(clippy::too_many_arguments)]
fn spawn_rank(
    plan: &LaunchPlan,
    phase: &str,
    script: &Path,
    inline: Option<&str>,
    body: &str,
    node: &NodeLaunch,
    sink: Sink,
    stdin: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<(u32, Option<File>)> {
    if let Some(target) = &node.ssh {
        return spawn_remote_rank(plan, phase, body, node, target, sink)
            .map(|(child, reader)| (child.id(), reader));
    }
    fn cstring(s: impl Into<Vec<u8>>) -> io::Result<CString> {
        CString::new(s).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a NUL byte in the script or its environment",
            )
        })
    }
    let mut args = vec![
        cstring("/bin/bash")?,
        cstring("--noprofile")?,
        cstring("--norc")?,
    ];
    if let Some(text) = inline {
        args.push(cstring("-c")?);
        args.push(cstring(text)?);
    }
    args.push(cstring(script.as_os_str().as_bytes())?);
    let env = rank_env(plan, phase, node)
        .into_iter()
        .map(|(k, v)| cstring(format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    // Output: the log itself (one node), or a pipe to the prefixing pump.
    let (out, reader): (OwnedFd, Option<File>) = match sink {
        Sink::Direct(f) => (OwnedFd::from(f), None),
        Sink::Pipe => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
            (w, Some(File::from(r)))
        }
    };
    let null = File::open("/dev/null")?;
    let creds = plan.user.switch.then(|| spawn::Credentials {
        uid: plan.user.uid,
        gid: plan.user.gid,
        groups: plan.user.groups.clone(),
    });
    // In a process group of its own, default signal dispositions, nothing blocked; the
    // script's own `cd` (as the job's user) enters the working directory: changing into it
    // here would happen as root, through whatever the owner put there.
    let pid = spawn::spawn(&spawn::Spawn {
        program: c"/bin/bash",
        args: &args,
        env: &env,
        stdio: [
            stdin.map_or(null.as_raw_fd(), |fd| fd.as_raw_fd()),
            out.as_raw_fd(),
            out.as_raw_fd(),
        ],
        cwd: c"/",
        new_group: true,
        user: creds.as_ref(),
    })?;
    // Our copy of the pipe's write end goes, so the reader sees EOF when the rank is done.
    drop(out);
    Ok((pid, reader))
}

/// Puts a rank's process in a process group of its own, with default signal handling and
/// nothing blocked: the supervisor blocks CHLD/TERM/INT/HUP for its `sigtimedwait`, and std
/// does not reset the mask on every spawn path.
fn own_group_with_default_signals(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: sigemptyset, pthread_sigmask and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
}

/// Output of a rank: the log itself, or a pipe for the prefixing pump.
fn attach_output(cmd: &mut Command, sink: Sink) -> io::Result<Option<File>> {
    match sink {
        Sink::Direct(f) => {
            let f2 = f.try_clone()?;
            cmd.stdout(Stdio::from(f));
            cmd.stderr(Stdio::from(f2));
            Ok(None)
        }
        Sink::Pipe => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
            let w2 = w.try_clone()?;
            cmd.stdout(Stdio::from(w));
            cmd.stderr(Stdio::from(w2));
            Ok(Some(File::from(r)))
        }
    }
}

/// A remote rank: the script (with its environment as exports) goes over ssh's stdin into
/// a private directory on the node, where [`remote::rank_wrapper`] runs it.
fn spawn_remote_rank(
    plan: &LaunchPlan,
    phase: &str,
    body: &str,
    node: &NodeLaunch,
    target: &SshTarget,
    sink: Sink,
) -> io::Result<(Child, Option<File>)> {
    let dir = remote_dir(plan, node);
    let cd = if plan.workdir.is_some() {
        remote::shell_quote(&format!("{dir}/workdir"))
    } else {
        "\"$HOME\"".to_string()
    };
    let env = rank_env(plan, phase, node);
    let text = script_text(body, &cd, &exports(&env));
    let user = plan.user.switch.then_some(plan.user.name.as_str());
    let mut cmd = target.command(&remote::rank_wrapper(
        &dir, phase, user, &plan.tag, node.rank,
    ));
    cmd.stdin(Stdio::piped());
    let reader = attach_output(&mut cmd, sink)?;
    own_group_with_default_signals(&mut cmd);
    let mut child = cmd.spawn()?;
    drop(cmd);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    Ok((child, reader))
}

/// Copies the job's workdir to every remote node (rsync over the ssh master connection).
fn sync_workdirs(plan: &LaunchPlan, log: &Arc<Mutex<File>>) -> Result<(), String> {
    let Some(local) = &plan.workdir else {
        return Ok(());
    };
    for node in &plan.nodes {
        let Some(target) = &node.ssh else { continue };
        let dir = remote_dir(plan, node);
        let mut cmd = target.rsync_to(local, &format!("{dir}/workdir"));
        cmd.arg(format!(
            "--rsync-path={} mkdir -p {}/workdir && rsync",
            remote::private_dir(&dir),
            remote::shell_quote(&dir)
        ));
        cmd.stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| format!("rsync to {}: {e}", node.name))?;
        if !out.status.success() {
            let msg = format!(
                "copying the workdir to {} failed: {}",
                node.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if let Ok(mut l) = log.lock() {
                let _ = writeln!(l, "skyspool: {msg}");
            }
            return Err(msg);
        }
    }
    Ok(())
}

/// Removes the job's private directories on remote nodes (best effort).
fn clean_remote(plan: &LaunchPlan) {
    let threads: Vec<_> = plan
        .nodes
        .iter()
        .filter_map(|n| n.ssh.clone().map(|t| (t, remote_dir(plan, n))))
        .map(|(t, d)| {
            std::thread::spawn(move || {
                let _ = t.run(
                    &format!("rm -rf {}", remote::shell_quote(&d)),
                    Duration::from_secs(15),
                );
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
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

/// The daemon's end of its launcher (see [`supervise_main`]). Dropping it closes the
/// socket: the launcher exits (running supervisors stay).
pub struct Launcher {
    pub pid: u32,
    sock: std::os::unix::net::UnixStream,
    /// The read end of the launcher's answers (its stdout, non-blocking): one supervisor
    /// pid (4 bytes, little-endian; 0 when none could be made) per launch, in order.
    answers: Option<OwnedFd>,
}

/// Starts the launcher (`skyspool supervise`, stdin a Unix socket, stderr the daemon's
/// log). TERM/INT/HUP are blocked before exec: every supervisor it forks inherits the mask,
/// so a cancel sent while a supervisor is still starting stays pending until its
/// `sigtimedwait` takes it.
pub fn spawn_launcher(exe: &Path, spool: &Path) -> io::Result<Launcher> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (answers, answers_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // Only the read end is non-blocking (the flag is per end of a pipe).
    nix::fcntl::fcntl(
        &answers_w,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    let mut cmd = Command::new(exe);
    cmd.arg("supervise");
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)));
    cmd.stdout(Stdio::from(answers_w));
    match open_daemon_log(spool) {
        Some(f) => cmd.stderr(Stdio::from(f)),
        None => cmd.stderr(Stdio::null()),
    };
    // SAFETY: sigemptyset, sigaddset and pthread_sigmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // Reaped by the daemon when it replaces a launcher; forget the handle.
    std::mem::forget(child);
    ours.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(Launcher {
        pid,
        sock: ours,
        answers: Some(answers),
    })
}

impl Launcher {
    /// Hands a job over: the launch lock travels as `SCM_RIGHTS` with the plan's length,
    /// then the plan (`serde_json` of a [`LaunchPlan`]). The launcher answers on
    /// [`Launcher::take_answers`] with the pid of the job's supervisor; the daemon does not
    /// wait for it here.
    pub fn send(
        &mut self,
        plan: &[u8],
        lock: Option<&OwnedFd>,
        gate: Option<&OwnedFd>,
        log: Option<&OwnedFd>,
    ) -> io::Result<()> {
        send_launch(&self.sock, plan, lock, gate, log)
    }

    /// The launcher's answers, for the daemon's event loop (once).
    pub fn take_answers(&mut self) -> Option<OwnedFd> {
        self.answers.take()
    }
}

fn open_daemon_log(spool: &Path) -> Option<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(spool.join(".skyspool").join("daemon.log"))
        .ok()
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
        let mut child = Command::new("/bin/bash")
            .args(["--noprofile", "--norc", "-c", &script])
            .env_clear()
            .envs(&from)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(line.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
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
