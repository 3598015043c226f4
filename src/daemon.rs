//! The scheduler daemon: one event loop that admits submissions, places jobs, starts their
//! supervisors, applies cancels and keeps `queue` and `nodes` current.
//!
//! All state is in the spool; the loop's memory is a cache rebuilt from it at start-up.
//!
//! This file holds the loop and its records; the rest of `impl Daemon` is split by what it
//! does: `recovery` (start-up), `admission`, `early` (starting ahead of durability),
//! `rounds` (durability), `launcher` (supervisors and prestarts), `running` (jobs
//! started, ended, cancelled) and `nodes` (remote nodes).

use crate::executor::{self, LaunchPlan, NodeLaunch, RunAs};
use crate::inventory::{self, Inventory, NodeProbe};
use crate::queue;
use crate::remote::SshTarget;
use crate::resources::Milli;
use crate::scheduler::{JobId, NodeGrant, Placement, Scheduler};
use crate::spec::{self, JobSpec};
use crate::spool::{
    self, Claimed, Incoming, JobInfo, JobResult, NodeAssignment, Spool, State, Status,
};
use crate::view::{NodesSnapshot, Submission, Submitter, View};
use crate::watcher::{SpoolEvent, Watcher};
use anyhow::Context;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How `skyspool serve` was asked to run.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub spool: PathBuf,
    pub config: Option<PathBuf>,
    pub gpus: Option<String>,
    pub cpus: Option<Milli>,
    pub cluster_name: Option<String>,
    pub kill_grace: Duration,
    /// Submissions owned by root are treated as this user's (so root's jobs need not run
    /// as root, and a shared box's admin account cannot be used by accident).
    pub root_jobs_as: Option<String>,
    /// Once the oldest waiting job has waited this long, resources are held back for it
    /// (`None`: pure backfill, SkyPilot's documented behaviour).
    pub starvation_bound: Option<Duration>,
    /// Also expose the spool as a FUSE mount here.
    pub mount: Option<PathBuf>,
    /// At most this many queued jobs prestarted (see [`Daemon::prestart_more`]); 0: none.
    pub prestart: usize,
    /// Journal records wait at most this long for a checkpoint (see [`crate::journal`]).
    pub checkpoint_after: Duration,
}

/// One line on stderr, time-stamped, written with one `write` (stderr is unbuffered: the
/// pieces of an `eprintln!` are a write each).
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let line = format!(
            "{} skyspool: {}\n",
            chrono::Local::now().format("%Y-%m-%d %H:%M:%S%.3f"),
            format!($($arg)*)
        );
        let _ = std::io::stderr().write_all(line.as_bytes());
    }};
}

mod admission;
mod early;
mod launcher;
mod nodes;
use nodes::{note_probe, probe_node, probe_remote_nodes, write_nodes_json};
mod recovery;
mod rounds;
mod running;

/// A job's live supervisor.
struct Supervisor {
    pid: u32,
    pidfd: Option<std::os::fd::OwnedFd>,
    /// The task that reports the supervisor's exit. A supervisor outlives its job (the
    /// launcher gives it the next one), so the watch ends with the job's record.
    watch: Option<tokio::task::AbortHandle>,
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if let Some(w) = &self.watch {
            w.abort();
        }
    }
}

/// A launch handed to the launcher whose answer (the supervisor's pid) has not come yet.
/// The daemon goes on meanwhile; the plan and the lock are kept to hand the job to another
/// launcher if this one is lost before a supervisor got it.
struct Launching {
    id: JobId,
    plan: Vec<u8>,
    /// `None` for a prestart.
    lock: Option<std::os::fd::OwnedFd>,
    /// The job's start gate (see [`executor::Launch::gate`]), when its admission was not
    /// durable yet at the hand-over.
    gate: Option<std::os::fd::OwnedFd>,
    /// The job's `log`, when it was launched before it was published (see
    /// [`Daemon::launch_early`]).
    log: Option<std::os::fd::OwnedFd>,
    /// Where the lock is now (in `staging/` until an early launch's job is published).
    lock_path: PathBuf,
    sent: std::time::Instant,
    /// A prestart's launch confirmed before the launcher answered it: the daemon's end of
    /// its gate, which says whether a supervisor may still read the confirmation.
    confirmed: Option<std::os::unix::net::UnixStream>,
}

impl Launching {
    /// A prestart not confirmed yet: it travels without a lock (see [`Prestart`]).
    fn is_prestart(&self) -> bool {
        self.lock.is_none()
    }
}

/// A queued job started ahead of its placement (see [`Daemon::prestart_more`]): its
/// supervisor holds the job's bash at its first line and waits on `gate` for the job's real
/// launch; dropping this closes the gate, which kills that bash unrun.
struct Prestart {
    /// The daemon's end of the gate (a socket).
    gate: std::os::unix::net::UnixStream,
    /// The node it was started on.
    node: String,
    /// Its supervisor, once the launcher has answered.
    pid: Option<u32>,
    /// Its spec, for its start.
    spec: Option<JobSpec>,
}

/// A prestart made for the next job ID before any job has it (see [`Daemon::speculate`]),
/// as the user of the last lone submission: that user's next lone submission, if it gets
/// this ID, is confirmed through it, and its bash is up already.
struct Speculation {
    id: JobId,
    uid: u32,
    gid: u32,
    prestart: Prestart,
}

/// The fsyncs that make one batch of admissions durable, running while the batch's jobs are
/// already published, placed and handed to their supervisors: each of those jobs waits at a
/// start gate, and nothing of it runs before the round is through (see
/// [`Daemon::finish_round`]).
struct AdmissionRound {
    sync: RoundSync,
    /// The jobs the round makes durable.
    ids: BTreeSet<JobId>,
    /// The start gate of those handed over meanwhile: the pipe's read end (a copy travels
    /// with each launch) and its write end, made when the first of them starts.
    gate: Option<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)>,
    /// What is synced once the gate is open, without waiting (see [`Daemon::lazy_sync`]):
    /// `staging/` and `.skyspool/last-id` when the round did not go through the journal
    /// (a journaled round's files wait for the journal's next checkpoint).
    later: Vec<(PathBuf, bool)>,
    /// An early-launched job's journal fsync, started before the job is staged (see
    /// [`Daemon::journal_early`]); it becomes the round's once the job is published.
    prejournal: Option<spool::SyncRound>,
}

/// A published job's journal line, but for its record (see [`Daemon::journal_round`]).
struct Unjournaled {
    /// The file claimed from `incoming/` for it, if it was one.
    file: Option<spool::FileIdent>,
    /// Its `job.yaml` as written (redacted where the job has secrets).
    yaml: String,
}

/// The fsyncs nothing waits for (see [`Daemon::lazy_sync`]) and the journal's checkpoints
/// (see [`crate::journal`]): one batch in flight, and the paths that came meanwhile, synced
/// together once it is through.
#[derive(Default)]
struct LazySyncs {
    /// The batch in flight, and the sealed journal file it is the checkpoint of, if it is
    /// one.
    inflight: Option<(spool::SyncRound, Option<usize>)>,
    next: Vec<(PathBuf, bool)>,
    next_set: HashSet<PathBuf>,
    /// When the waiting paths go (see [`LAZY_DELAY`]).
    due: Option<std::time::Instant>,
    /// Not before then is a failed checkpoint tried again.
    retry_checkpoint_at: Option<std::time::Instant>,
}

impl LazySyncs {
    /// Takes `path` out of the waiting paths (an fsync of it has started elsewhere).
    fn forget(&mut self, path: &Path) {
        if self.next_set.remove(path) {
            self.next.retain(|(p, _)| p != path);
            if self.next.is_empty() {
                self.due = None;
            }
        }
    }
}

/// How long after a failed checkpoint (see [`crate::journal`]) the next is tried.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(5);

/// How long fsyncs nothing waits for are held back before they start: the gate of the round
/// that queued them has just opened, and a dozen fsync threads waking and submitting their
/// writes right then delayed the job's first command by ~0.2 ms (`bench-ab --interleaved`).
/// Held back, they go once the job is under way, and rounds that come meanwhile share the
/// batch.
const LAZY_DELAY: Duration = Duration::from_millis(5);

/// A batch of waiting paths this large goes at once (a round of 21 jobs or more: a bulk
/// admission's, where no job waits alone for its first command).
const LAZY_BATCH_NOW: usize = 64;

/// How an admission round's outcome comes: waited for by the daemon in line, or taken when
/// the round's last fsync wakes the event loop (through an eventfd, see
/// [`spool::SyncRound::start_notify`]), so that the daemon goes on with the running jobs'
/// events (and batches the submissions that come meanwhile) while the round runs.
enum RoundSync {
    /// Not started yet: the paths to sync, `(path, is a directory)`. The fsyncs start once
    /// the batch's jobs are handed over (see [`Daemon::settle_round`]), so that a lone
    /// job's supervisor and `bash` get the CPUs first: the round (gate open at ~1 ms) is
    /// not what the job's first command waits for, `bash`'s start-up (~1.2 ms) is.
    Due(Vec<(PathBuf, bool)>),
    /// The round of a job launched before it was published (see [`Daemon::launch_early`]),
    /// made for its gate while the job is staged: its paths are set once it is published.
    /// Never synced as it is: a round taken in this state closes its gate unopened.
    Unstaged,
    /// A journaled round's one fsync, started as soon as its records were appended (while
    /// the daemon still places and hands over the batch), the eventfd to be counted when it
    /// is through; it becomes [`RoundSync::Inline`] or [`RoundSync::Polled`] like any round.
    Started(spool::SyncRound),
    Inline(spool::SyncRound),
    Polled(spool::SyncRound),
}

/// The eventfd a round's last fsync adds 1 to (see [`RoundSync::Polled`]), as the event
/// loop waits on it; `None` where no eventfd could be made (rounds are then waited for in
/// line).
type RoundReady = Option<tokio::io::unix::AsyncFd<std::sync::Arc<std::os::fd::OwnedFd>>>;

fn round_ready() -> RoundReady {
    let fd = spool::eventfd(true).ok()?;
    // SAFETY: the AsyncFd owns one reference to the descriptor, which stays open (and the
    // same eventfd) at least as long as the AsyncFd lives.
    unsafe { tokio::io::unix::AsyncFd::register(std::sync::Arc::new(fd)) }.ok()
}

/// Completes when the eventfd has counted a round through (and resets it); never without
/// one.
async fn round_through(ready: &RoundReady) {
    let Some(fd) = ready else {
        return std::future::pending().await;
    };
    loop {
        let Ok(mut guard) = fd.readable().await else {
            // Cannot happen on an eventfd; look again shortly rather than spin.
            tokio::time::sleep(Duration::from_millis(10)).await;
            return;
        };
        let mut count = [0u8; 8];
        match nix::unistd::read(&**fd.get_ref(), &mut count) {
            Err(nix::errno::Errno::EAGAIN) => guard.clear_ready(),
            _ => return,
        }
    }
}

/// Takes a job's launch lock, `supervisor.lock` in its private directory `private`, with the
/// launch record (started now, on `assignments`): the time recorded, the lock's path and its
/// descriptor (for the supervisor). No fsync: after a power loss nothing of the job runs,
/// and a launch without the supervisor's record goes back to pending (the result, when
/// there is one, is synced with its directory by the supervisor).
fn launch_lock(
    private: &Path,
    assignments: &[NodeAssignment],
) -> anyhow::Result<(String, PathBuf, std::os::fd::OwnedFd)> {
    let started = spool::now_rfc3339();
    let record = spool::LaunchRecord {
        started: started.clone(),
        placement: assignments.to_vec(),
    };
    let lock_path = private.join("supervisor.lock");
    let lock =
        executor::take_launch_lock(&lock_path, &record).context("taking the job's launch lock")?;
    Ok((started, lock_path, lock))
}

/// What a round's (or a batch's) last fsync counts on, for
/// [`spool::SyncRound::start_notify`]: the eventfd of `ready`, if there is one.
fn notify_of(ready: &RoundReady) -> Option<std::sync::Arc<std::os::fd::OwnedFd>> {
    ready.as_ref().map(|fd| std::sync::Arc::clone(fd.get_ref()))
}

/// [`spool::Durable`]s of `(path, is a directory)` pairs.
fn durables(paths: &[(PathBuf, bool)]) -> Vec<spool::Durable<'_>> {
    paths
        .iter()
        .map(|(p, dir)| match dir {
            true => spool::Durable::Dir(p),
            false => spool::Durable::File(p),
        })
        .collect()
}

/// A launcher that has not answered a launch for this long is taken as lost (looked at
/// after each batch of events: a cancel of the job is such an event).
const LAUNCH_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads a launcher's answers (4-byte pids, in launch order) off the event loop's thread
/// and turns them into [`Msg::Launched`]; [`Msg::LauncherGone`] when the pipe closes.
fn read_answers(fd: std::os::fd::OwnedFd, gen: u64, tx: mpsc::UnboundedSender<Msg>) {
    tokio::spawn(async move {
        // SAFETY: `fd` is an OwnedFd moved into the AsyncFd; it stays open until dropped.
        if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(fd) } {
            let mut pending: Vec<u8> = Vec::new();
            let mut b = [0u8; 256];
            'read: while let Ok(mut ready) = afd.readable().await {
                match ready.try_io(|a| nix::unistd::read(a.get_ref(), &mut b).map_err(Into::into)) {
                    Ok(Ok(0)) => break,
                    Ok(Ok(n)) => {
                        pending.extend_from_slice(&b[..n]);
                        while pending.len() >= 4 {
                            let mut pid = [0u8; 4];
                            pid.copy_from_slice(&pending[..4]);
                            pending.drain(..4);
                            if tx
                                .send(Msg::Launched(gen, u32::from_le_bytes(pid)))
                                .is_err()
                            {
                                break 'read;
                            }
                        }
                    }
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Ok(Err(_)) => break,
                    Err(_would_block) => {}
                }
            }
        }
        let _ = tx.send(Msg::LauncherGone(gen));
    });
}

impl Supervisor {
    /// SIGTERM through the pidfd (immune to pid reuse), by pid if there is none.
    fn terminate(&self) {
        match &self.pidfd {
            Some(fd) => {
                let _ = executor::pidfd_send_signal(fd, libc::SIGTERM);
            }
            None => {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(self.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
        }
    }
}

enum Msg {
    SupervisorExited(JobId, u32),
    /// The launcher of that generation answered its oldest unanswered launch: the pid of
    /// the job's supervisor (0: none could be made).
    Launched(u64, u32),
    /// The launcher of that generation closed its answers (it exited or was killed).
    LauncherGone(u64),
    /// A remote node's health: `None` up, `Some(why)` down.
    NodeHealth(usize, Option<String>),
    /// What a remote node that did not answer the start-up probe said once it did.
    NodeProbed(usize, NodeProbe),
}

struct Daemon {
    spool: Spool,
    /// The spool's instance id (`.skyspool/id`), the first half of every job's tag.
    spool_id: String,
    inventory: Inventory,
    sched: Scheduler,
    /// Every job's record (the queue's rows), by id.
    jobs: BTreeMap<JobId, JobInfo>,
    /// Supervisor pid of each job that has one.
    supervisors: HashMap<JobId, Supervisor>,
    watcher: Watcher,
    exe: PathBuf,
    next_id: JobId,
    tx: mpsc::UnboundedSender<Msg>,
    /// Remote nodes being asked for their GPUs and CPUs (see [`Msg::NodeProbed`]).
    probing: HashSet<usize>,
    /// Queued jobs told they can never run on the cluster as it is (see
    /// [`Daemon::warn_unfit_pending`]).
    warned_unfit: HashSet<JobId>,
    kill_grace: Duration,
    am_root: bool,
    /// `queue`/`nodes` need rewriting.
    dirty: bool,
    last_render: std::time::Instant,
    /// How long `queue` may lag while busy (grows with the time a render takes).
    render_interval: Duration,
    /// When the last submission, job event or message came (see [`Daemon::render_due`]).
    last_event: std::time::Instant,
    /// The `queue` file's rows, re-formatted only for jobs that changed.
    queue_rows: queue::QueueCache,
    /// Jobs whose row is to be formatted again at the next rewrite of `queue` (once, however
    /// often the job changed since the last one).
    queue_stale: BTreeSet<JobId>,
    last_nodes: String,
    /// When deferred submissions (disk full) are to be retried.
    retry_at: Option<std::time::Instant>,
    /// (uid, gid) that root's submissions belong to (`--root-jobs-as`).
    root_jobs_as: Option<(u32, u32)>,
    /// When to run a scheduling pass for a job crossing the starvation bound.
    starve_check_at: Option<std::time::Instant>,
    /// Jobs whose record changed since the view was last updated.
    touched: BTreeSet<JobId>,
    /// What the FUSE mount shows.
    view: Arc<View>,
    /// Whether the view holds the job records: only for a mount. Without one it holds just
    /// the `nodes` snapshot (the `nodes` file is rendered from it), and no record is copied.
    view_jobs: bool,
    /// Names in `incoming/` handed back for lack of space: left alone until the retry.
    deferred: HashSet<OsString>,
    /// Names in `incoming/` a writer still had open when looked at: looked at again soon.
    rechecks: crate::recheck::Rechecks,
    /// Forks each job's supervisor (see [`executor::Launcher`]).
    launcher: Option<executor::Launcher>,
    /// Generation of `launcher` (each new launcher gets the next), to tell its answers
    /// from a lost one's.
    launcher_gen: u64,
    /// Launches sent to the launcher and not answered yet, oldest first.
    launching: std::collections::VecDeque<Launching>,
    /// Right after a hand-over, until the job's processes run (its supervisor writes
    /// `status`) or this time passes: no re-render, which would compete for the CPU with the
    /// job's start (2 cores: the supervisor and bash's exec). The time, and the job.
    quiet: Option<(std::time::Instant, JobId)>,
    /// Jobs ended in this batch whose records are still to be written.
    settling: Vec<JobId>,
    /// The admission round in flight, if any (at most one: it is through before another
    /// chunk is admitted; a round of a few jobs is also through before the event loop waits
    /// again).
    round: Option<AdmissionRound>,
    /// Names in `incoming/` to look at, in the order they came, and the same as a set:
    /// admitted a chunk (`MAX_ROUND_JOBS`) at a time, once no round is in flight.
    to_admit: std::collections::VecDeque<(OsString, usize)>,
    to_admit_names: HashSet<OsString>,
    /// What a polled round's last fsync wakes the event loop through.
    round_ready: RoundReady,
    /// Jobs handed over whose admission could not be made durable (a failed fsync), and why:
    /// they fail instead of starting again when their supervisor gives them back.
    undurable: HashMap<JobId, String>,
    /// The fsyncs nothing waits for ([`Daemon::lazy_sync`]), and what wakes the event loop
    /// when a batch of them is through.
    lazy: LazySyncs,
    lazy_ready: RoundReady,
    /// The admission journal (`None` where it could not be opened: every round then syncs
    /// the job files themselves).
    journal: Option<crate::journal::Journal>,
    /// What the journal line of a job published but not journaled yet carries besides its
    /// record (see [`Daemon::journal_round`]).
    unjournaled: HashMap<JobId, Unjournaled>,
    /// This daemon, as launch plans name it (see [`LaunchPlan::journaling_daemon`]).
    me: Option<executor::ProcessIdent>,
    /// The parsed specs of queued jobs (without secrets), kept from their admission for
    /// their start (or prestart), which then does not read and parse `job.yaml` again.
    fresh: SpecCache,
    /// The jobs with a secrets file, removed when they end (`None`: the files could not be
    /// listed at start-up; every ending job's is then removed by name).
    secret_ids: Option<HashSet<JobId>>,
    /// Account lookups (passwd/group), cached while those files do not change.
    users: std::cell::RefCell<UserCache>,
    /// Jobs put back in the queue because their supervisor died before taking them, and how
    /// often (bounded: a supervisor that always dies at the start must not loop forever).
    untaken: HashMap<JobId, u32>,
    /// Queued jobs started ahead, by id (see [`Daemon::prestart_more`]).
    prestarts: BTreeMap<JobId, Prestart>,
    /// The speculative prestart for the next ID, if any (see [`Daemon::speculate`]).
    speculation: Option<Speculation>,
    /// The user (uid, gid) of the last lone submission launched before its publication.
    last_lone: Option<(u32, u32)>,
    /// When to start a speculative prestart (see [`Daemon::speculate`]): once the daemon has
    /// been idle for SPECULATE_AFTER.
    speculate_at: Option<std::time::Instant>,
    /// The ID a speculation was last tried for (made or not: one that does not fit now is
    /// tried again only after a job ends, never on a timer).
    speculated_for: Option<JobId>,
    /// A job's end was settled in this batch (see [`Daemon::speculate`]).
    settled_end: bool,
    /// At most this many prestarts at once.
    max_prestarts: usize,
    /// When the oldest queued job not yet started ahead will have waited
    /// [`PRESTART_AFTER`] (a scheduling pass then starts it ahead).
    prestart_at: Option<std::time::Instant>,
    /// The final `status` just read from the disk of jobs ending in this batch (their
    /// supervisor wrote it; nobody else writes it before the daemon settles them).
    final_seen: HashMap<JobId, Status>,
    /// The ID whose `staging/<id>/` was made ahead (see [`Daemon::premake`]).
    premade: Option<JobId>,
    /// The ID whose `staging/<id>/` could not be made ahead: not tried again for it.
    premake_failed: Option<JobId>,
}

/// How long a job waits in the queue before it is started ahead (see
/// [`Daemon::prestart_more`]): one that starts sooner would gain nothing (its slot frees
/// before a bash would be up), and on a busy machine the work done ahead is only work.
const PRESTART_AFTER: Duration = Duration::from_millis(50);

/// How often a job goes back to the queue after a supervisor died before taking it; the
/// next time it ends FAILED_DRIVER.
const MAX_UNTAKEN: u32 = 3;

/// Caches [`run_as`] results; dropped whenever `/etc/passwd` or `/etc/group` changes.
struct UserCache {
    am_root: bool,
    stamp: Option<(std::time::SystemTime, std::time::SystemTime)>,
    by_uid: HashMap<(u32, u32), RunAs>,
    /// The files were looked at in this batch of events already (see [`Daemon::after_batch`]).
    checked: bool,
}

impl UserCache {
    fn get(&mut self, uid: u32, gid: u32) -> RunAs {
        if !std::mem::replace(&mut self.checked, true) {
            let mtime = |p: &str| std::fs::metadata(p).and_then(|m| m.modified()).ok();
            let stamp = mtime("/etc/passwd").zip(mtime("/etc/group"));
            if stamp.is_none() || stamp != self.stamp {
                self.by_uid.clear();
                self.stamp = stamp;
            }
        }
        let am_root = self.am_root;
        self.by_uid
            .entry((uid, gid))
            .or_insert_with(|| run_as(uid, gid, am_root))
            .clone()
    }
}

/// `SKYPILOT_TASK_ID` of a job: `sky-<submitted>_<cluster>_<id>`, as SkyPilot makes it.
/// (Not unique across spools; the processes of a job are found by its
/// [`executor::job_tag`].)
fn task_id(info: &JobInfo, cluster: &str) -> String {
    let submitted = chrono::DateTime::parse_from_rfc3339(&info.submitted)
        .map(|t| t.with_timezone(&chrono::Utc))
        .unwrap_or_else(|_| chrono::Utc::now());
    format!(
        "sky-{}_{}_{}",
        submitted.format("%Y-%m-%d-%H-%M-%S-%6f"),
        cluster,
        info.id
    )
}

/// Waits up to `limit` for child `pid` to exit and reaps it; false if it still runs.
fn reap_within(pid: nix::unistd::Pid, limit: Duration) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        match nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
            Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
            _ => return true,
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The outcome of a job whose supervisor is lost (or never got it): `FAILED_DRIVER`, ended
/// now, with `reason`.
fn driver_lost(reason: String) -> JobResult {
    JobResult {
        status: Status::FailedDriver,
        exit_codes: vec![],
        ended: spool::now_rfc3339(),
        reason: Some(reason),
    }
}

/// Milliseconds since the epoch, now.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// An RFC 3339 time as milliseconds since the epoch (0 if unreadable).
fn epoch_ms(rfc3339: &str) -> u64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|t| t.timestamp_millis().max(0) as u64)
        .unwrap_or(0)
}

/// How long a deferred admission waits before the next try.
const RETRY_INTERVAL: Duration = Duration::from_secs(2);

/// Whether an error chain bottoms out in ENOSPC/EDQUOT.
fn is_out_of_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(spool::is_out_of_space)
            || matches!(c.downcast_ref::<spool::SpoolError>(), Some(spool::SpoolError::Io { source, .. }) if spool::is_out_of_space(source))
    })
}

/// Longest time `queue` and `nodes` lag behind the daemon's state while it is busy.
const RENDER_INTERVAL: Duration = Duration::from_millis(50);
/// The most jobs one admission round makes durable (see `Daemon::admit_some`): a bulk move
/// is admitted a chunk at a time, with the events of running jobs handled in between.
const MAX_ROUND_JOBS: usize = 64;
/// Rounds of at least this many jobs are not waited for in line but polled (see
/// `Daemon::settle_round`); a smaller one too while other jobs run or names wait.
const POLLED_ROUND_JOBS: usize = 8;
/// The most names in `incoming/` looked at per chunk (rejected ones count here only).
const MAX_LOOKS_PER_CHUNK: usize = 4 * MAX_ROUND_JOBS;
/// The least quiet after which a changed `queue` is rewritten at once (see
/// `Daemon::render_due`).
const RENDER_SETTLE: Duration = Duration::from_millis(100);
/// The longest the daemon holds back housekeeping after handing a job over (see
/// `Daemon::quiet`); normally the job's first `status` ends it within a millisecond.
const QUIET_AFTER_START: Duration = Duration::from_millis(20);
/// How long the daemon is idle before it starts a bash ahead for the next submission (see
/// `Daemon::speculate`), unless a job has just ended: never in a burst (the next job would
/// come before it is of use, and its ID may go to a job that cannot take it). Started at a
/// job's end, the speculation comes to the launcher after that job's supervisor has told
/// it is free (it does so right after the `status` the daemon woke on), and goes to it.
const SPECULATE_AFTER: Duration = Duration::from_millis(5);

/// Runs the daemon until SIGTERM/SIGINT. Jobs keep running when it stops; the next start
/// re-adopts them.
pub fn serve(cfg: DaemonConfig) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the event loop")?;
    rt.block_on(serve_async(cfg))
}

async fn serve_async(cfg: DaemonConfig) -> anyhow::Result<()> {
    // First of all: a SIGTERM/SIGINT that comes while the daemon starts (a test or a service
    // manager stopping it as soon as `nodes` appears) ends it the orderly way, at the loop,
    // not by the default action in the middle of starting the launcher.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let spool = Spool::create(&cfg.spool)
        .with_context(|| format!("preparing the spool at {}", cfg.spool.display()))?;
    let _lock = spool.lock()?;
    let spool_id = spool.instance_id()?;
    let journal = match crate::journal::Journal::open(&spool.private())
        .map(|j| j.checkpoint_after(cfg.checkpoint_after))
    {
        Ok(j) => Some(j),
        Err(e) => {
            note!("no admission journal ({e}): each round syncs its jobs' files");
            None
        }
    };
    let inventory = inventory::detect(
        cfg.config.as_deref(),
        cfg.gpus.as_deref(),
        cfg.cpus,
        cfg.cluster_name.as_deref(),
    )?;
    let mut inventory = inventory;
    let ssh_dir = spool.private().join("ssh");
    probe_remote_nodes(&mut inventory, &ssh_dir);
    let mut sched = Scheduler::new(inventory.capacities());
    sched.set_starvation_bound(cfg.starvation_bound.map(|b| b.as_millis() as u64));
    write_nodes_json(&spool, &inventory)?;
    let watcher = Watcher::new(&spool.incoming()).context("watching incoming/ (inotify)")?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let (sub_tx, mut sub_rx) = mpsc::unbounded_channel::<Submission>();
    let view = Arc::new(View::new());
    view.update(|v| v.cluster_name = inventory.cluster_name.clone());
    let exe = std::env::current_exe().context("locating the skyspool binary")?;
    let next_id = spool.next_id()?;
    let root_jobs_as = match cfg.root_jobs_as.as_deref() {
        None => None,
        Some(name) => {
            let user = nix::unistd::User::from_name(name)
                .ok()
                .flatten()
                .with_context(|| format!("--root-jobs-as: no user named {name:?}"))?;
            Some((user.uid.as_raw(), user.gid.as_raw()))
        }
    };
    let mut d = Daemon {
        spool,
        spool_id,
        inventory,
        sched,
        jobs: BTreeMap::new(),
        supervisors: HashMap::new(),
        watcher,
        exe,
        next_id,
        tx,
        probing: HashSet::new(),
        warned_unfit: HashSet::new(),
        kill_grace: cfg.kill_grace,
        am_root: nix::unistd::geteuid().is_root(),
        dirty: true,
        last_render: std::time::Instant::now() - RENDER_INTERVAL,
        render_interval: RENDER_INTERVAL,
        last_event: std::time::Instant::now(),
        queue_rows: queue::QueueCache::default(),
        queue_stale: BTreeSet::new(),
        last_nodes: String::new(),
        retry_at: None,
        root_jobs_as,
        starve_check_at: None,
        touched: BTreeSet::new(),
        view: Arc::clone(&view),
        view_jobs: cfg.mount.is_some(),
        deferred: HashSet::new(),
        rechecks: crate::recheck::Rechecks::default(),
        launcher: None,
        launcher_gen: 0,
        launching: std::collections::VecDeque::new(),
        quiet: None,
        settling: Vec::new(),
        round: None,
        to_admit: std::collections::VecDeque::new(),
        to_admit_names: HashSet::new(),
        round_ready: round_ready(),
        undurable: HashMap::new(),
        lazy: LazySyncs::default(),
        lazy_ready: round_ready(),
        journal,
        unjournaled: HashMap::new(),
        me: executor::ProcessIdent::me(),
        fresh: SpecCache::default(),
        secret_ids: Some(HashSet::new()),
        users: std::cell::RefCell::new(UserCache {
            am_root: nix::unistd::geteuid().is_root(),
            stamp: None,
            by_uid: HashMap::new(),
            checked: false,
        }),
        untaken: HashMap::new(),
        prestarts: BTreeMap::new(),
        speculation: None,
        last_lone: None,
        speculate_at: None,
        speculated_for: None,
        settled_end: false,
        max_prestarts: cfg.prestart,
        prestart_at: None,
        final_seen: HashMap::new(),
        premade: None,
        premake_failed: None,
    };
    note!(
        "serving {} for cluster {} ({} node(s): {})",
        d.spool.root().display(),
        d.inventory.cluster_name,
        d.inventory.nodes.len(),
        d.inventory
            .nodes
            .iter()
            .map(|n| format!(
                "{} with {} GPU(s) and {} CPUs",
                n.name,
                n.gpus.len(),
                n.cpus
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    d.recover()?;
    d.warn_unfit_pending();
    d.rescan();
    d.after_batch();
    d.start_health_checks();
    let submitter = Submitter { tx: sub_tx };
    let mounted = match &cfg.mount {
        None => None,
        Some(dir) => {
            crate::fuse::clean_stale_mount(dir);
            let m =
                crate::fuse::mount(dir, d.spool.clone(), Arc::clone(&d.view), submitter.clone())
                    .with_context(|| format!("mounting the spool at {}", dir.display()))?;
            note!("spool mounted at {}", dir.display());
            Some(m)
        }
    };

    loop {
        let render_at = tokio::time::Instant::from_std(d.render_due());
        tokio::select! {
            _ = tokio::time::sleep_until(render_at), if d.dirty && d.quiet.is_none() => {}
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.quiet.map_or_else(std::time::Instant::now, |(t, _)| t))), if d.quiet.is_some() => {
                d.quiet = None;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.starve_check_at.unwrap_or_else(std::time::Instant::now))), if d.starve_check_at.is_some() => {
                d.starve_check_at = None;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.prestart_at.unwrap_or_else(std::time::Instant::now))), if d.prestart_at.is_some() => {
                d.prestart_at = None;
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.speculate_at.unwrap_or_else(std::time::Instant::now))), if d.speculate_at.is_some() => {
                d.speculate_at = None;
                d.speculate();
            }
            // The next chunk of a large admission (after_batch takes it).
            _ = std::future::ready(()), if d.admission_waiting() => {}
            // The round in flight is through (after_batch takes its outcome).
            _ = round_through(&d.round_ready), if d.round_polled() => {}
            // Fsyncs nothing waited for are through (after_batch starts the next ones).
            _ = round_through(&d.lazy_ready), if d.lazy.inflight.is_some() => {}
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.lazy_due().unwrap_or_else(std::time::Instant::now))), if d.lazy_due().is_some() => {}
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.retry_at.unwrap_or_else(std::time::Instant::now))), if d.retry_at.is_some() => {
                d.retry_at = None;
                d.deferred.clear();
                d.rescan();
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(d.rechecks.next_at().unwrap_or_else(std::time::Instant::now))), if d.rechecks.next_at().is_some() => {
                let due = d.rechecks.take_due(std::time::Instant::now());
                d.look_again(due);
            }
            batch = d.watcher.next_batch() => {
                d.last_event = std::time::Instant::now();
                match batch {
                    Ok(events) => d.handle_events(events),
                    Err(e) => {
                        note!("inotify read failed ({e}); rescanning");
                        d.rescan();
                    }
                }
            }
            Some(sub) = sub_rx.recv() => {
                d.last_event = std::time::Instant::now();
                d.handle_submission(sub);
                while let Ok(more) = sub_rx.try_recv() {
                    d.handle_submission(more);
                }
            }
            Some(msg) = rx.recv() => {
                d.last_event = std::time::Instant::now();
                d.handle_msg(msg);
                while let Ok(more) = rx.try_recv() {
                    d.handle_msg(more);
                }
            }
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
        d.after_batch();
        // Back through the runtime before the next wait: tokio polls its I/O driver only
        // when this task returns to it, and while some branch is ready at once (the next
        // chunk of a bulk admission, a timer already due after a long batch) the loop never
        // would; inotify and the supervisors' pidfds would go unread, and a running job's end
        // unseen, until the whole batch was admitted (one `epoll_wait` with no timeout per
        // batch).
        tokio::task::yield_now().await;
    }
    // The jobs handed over while the last round ran start (or, if it failed, do not).
    d.finish_round();
    // The launcher goes before the last checkpoint: a job that ends from here on is not
    // journaled by this daemon, and its supervisor, seeing the launcher gone, makes its
    // result durable itself; one that ended before is made durable by the checkpoint.
    d.close_launcher();
    d.finish_lazy();
    if let Some(m) = mounted {
        m.unmount();
    }
    drop(submitter);
    note!(
        "stopping; {} running job(s) keep running and will be re-adopted by the next start",
        d.supervisors.len()
    );
    Ok(())
}

/// The parsed specs of queued jobs, from their admission to their start (see
/// `Daemon::fresh`): at most SPEC_CACHE_JOBS of them and SPEC_CACHE_BYTES of YAML; the jobs
/// admitted beyond that read `job.yaml` again when they start.
#[derive(Default)]
struct SpecCache {
    specs: HashMap<JobId, (JobSpec, usize)>,
    bytes: usize,
}

const SPEC_CACHE_JOBS: usize = 2048;
const SPEC_CACHE_BYTES: usize = 4 << 20;

impl SpecCache {
    /// Keeps `spec` (parsed from `size` bytes of YAML), if there is room.
    fn insert(&mut self, id: JobId, spec: JobSpec, size: usize) {
        if self.specs.len() < SPEC_CACHE_JOBS && self.bytes + size <= SPEC_CACHE_BYTES {
            if let Some((_, old)) = self.specs.insert(id, (spec, size)) {
                self.bytes -= old;
            }
            self.bytes += size;
        }
    }

    fn take(&mut self, id: JobId) -> Option<JobSpec> {
        let (spec, size) = self.specs.remove(&id)?;
        self.bytes -= size;
        Some(spec)
    }
}

/// A lone submission placed before it was staged (see [`Daemon::place_early`]).
struct Early {
    id: JobId,
    /// Its record as it will be staged (PENDING).
    info: JobInfo,
    placement: Placement,
    /// Handed over already (see [`Daemon::launch_early`]).
    launched: Option<EarlyLaunch>,
}

/// An early launch: the launch record's time, the placement as recorded, and the
/// supervisor's pid if the hand-over already knew it.
type EarlyLaunch = (String, Vec<NodeAssignment>, Option<u32>);

/// Everything a job needs before the scheduler sees it.
struct Admission {
    spec: JobSpec,
    yaml: Vec<u8>,
}

impl Admission {
    /// What its `job.yaml` holds: the submitted bytes, or, with `secrets:`, the spec
    /// re-serialized with their values redacted.
    fn job_yaml(&self) -> std::borrow::Cow<'_, [u8]> {
        if self.spec.secrets.is_empty() {
            std::borrow::Cow::Borrowed(&self.yaml)
        } else {
            std::borrow::Cow::Owned(self.spec.to_redacted_yaml().into_bytes())
        }
    }

    /// [`Admission::job_yaml`] as the text a journal line carries (it is UTF-8: it parsed
    /// as YAML).
    fn job_yaml_text(&self) -> String {
        String::from_utf8_lossy(&self.job_yaml()).into_owned()
    }
}

impl Daemon {
    // ------------------------------------------------------------------ records

    /// Says, in the daemon's log and each job's `log`, which queued jobs can never run on
    /// the cluster as it is now: its nodes changed since they were admitted (a restart with
    /// another cluster file or fewer GPUs, a node found smaller than thought). They stay
    /// queued, nothing is lost: the cluster put back runs them, `cancel` drops them. A node
    /// not known yet counts as able to hold anything. Each job is told once per daemon.
    fn warn_unfit_pending(&mut self) {
        let unfit: Vec<(JobId, String)> = self
            .sched
            .pending_ids()
            .filter(|id| !self.warned_unfit.contains(id))
            .filter_map(|id| {
                let demand = self.sched.pending_demand(id)?;
                let why = self.sched.check_fits_ever(demand).err()?;
                Some((id, why.to_string()))
            })
            .collect();
        let cluster = &self.inventory.cluster_name;
        for (id, why) in unfit {
            self.warned_unfit.insert(id);
            note!(
                "job {id} can never run on cluster {cluster} as it is now: {why}; it stays queued"
            );
            let _ = self.spool.append_log(
                id,
                &format!(
                    "skyspool: this job can never run on cluster {cluster} as it is now: {why}. \
                     It stays queued (it runs if the cluster gets what it needs); cancel it to \
                     drop it."
                ),
            );
        }
    }

    fn enqueue(&mut self, id: JobId) {
        if let Some(info) = self.jobs.get(&id) {
            let since = epoch_ms(&info.submitted);
            self.sched.enqueue_at(id, info.demand.clone(), since);
        }
    }

    /// The scheduler's view of a running job's recorded placement.
    fn placement_of(&self, id: JobId) -> Placement {
        let mut p = Placement::default();
        let Some(info) = self.jobs.get(&id) else {
            return p;
        };
        for a in &info.placement {
            let Some(node) = self.inventory.nodes.iter().position(|n| n.name == a.node) else {
                continue;
            };
            p.nodes.push(NodeGrant {
                node,
                accelerator: a.accelerator.clone(),
                gpus: a
                    .gpus
                    .iter()
                    .zip(&a.gpu_shares)
                    .map(|(i, s)| crate::scheduler::GpuGrant {
                        index: *i,
                        share: Milli::parse_positive(s).unwrap_or(Milli::ONE),
                    })
                    .collect(),
                cpus: Milli::parse_positive(&a.cpus).unwrap_or(Milli::ZERO),
            });
        }
        p
    }

    /// Scans `incoming/` for everything present (start-up, lost events).
    fn rescan(&mut self) {
        match self.spool.list_incoming() {
            Ok(names) => self.admit_batch(names),
            Err(e) => note!("cannot list incoming/: {e}"),
        }
    }

    // ------------------------------------------------------------------ events

    fn handle_events(&mut self, events: Vec<SpoolEvent>) {
        let mut incoming: Vec<OsString> = Vec::new();
        let mut overflow = false;
        let mut touched: BTreeSet<(JobId, OsString)> = BTreeSet::new();
        for ev in events {
            match ev {
                SpoolEvent::Incoming(name, moved) => {
                    self.rechecks.reset(&name);
                    if self.deferred.contains(&name) {
                        continue;
                    }
                    // A name moved in is looked at a moment later (`recheck::SETTLE`); a
                    // completed one waits behind any that came before it and still waits.
                    let now = std::time::Instant::now();
                    let later = if moved {
                        self.rechecks.settle(&name, now);
                        true
                    } else {
                        !self.rechecks.completed(&name, now)
                    };
                    if later {
                        incoming.retain(|n| n != &name);
                    } else if !incoming.contains(&name) {
                        incoming.push(name);
                    }
                }
                SpoolEvent::JobFile(id, name) => {
                    touched.insert((id, name));
                }
                SpoolEvent::Overflow => overflow = true,
            }
        }
        if overflow {
            note!("inotify queue overflowed; rescanning the spool");
            self.rescan();
            let ids: Vec<JobId> = self.jobs.keys().copied().collect();
            for id in ids {
                self.refresh_status(id);
                self.handle_cancel(id);
            }
        } else {
            self.admit_batch(incoming);
        }
        for (id, name) in touched {
            match name.to_str() {
                Some("cancel") => self.handle_cancel(id),
                Some("status") => {
                    if self.quiet.is_some_and(|(_, quiet_id)| quiet_id == id) {
                        // Its supervisor wrote the first status: the job's processes run.
                        self.quiet = None;
                    }
                    self.refresh_status(id)
                }
                _ => {}
            }
        }
    }

    fn handle_msg(&mut self, msg: Msg) {
        match msg {
            Msg::NodeHealth(i, down) => {
                let Some(node) = self.inventory.nodes.get_mut(i) else {
                    return;
                };
                let (up, wants) = (down.is_none(), node.wants_probe());
                if node.down != down {
                    match &down {
                        None => note!("node {} is reachable again", node.name),
                        Some(why) => note!("node {} is down: {why}", node.name),
                    }
                    node.down = down;
                    self.sched.set_available(i, up);
                    self.dirty = true;
                    self.inventory_changed();
                }
                // A node that did not answer the start-up probe, or whose probe could not find
                // out, is asked now that it answers.
                if !up || wants == (false, false) || self.probing.contains(&i) {
                    return;
                }
                if let Some(target) = SshTarget::of(&self.inventory.nodes[i], &self.ssh_dir()) {
                    self.probing.insert(i);
                    let tx = self.tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let _ = tx.send(Msg::NodeProbed(i, probe_node(&target, wants)));
                    });
                }
            }
            Msg::NodeProbed(i, probe) => {
                self.probing.remove(&i);
                let Some(node) = self.inventory.nodes.get(i) else {
                    return;
                };
                let mut found = node.clone();
                found.take_probe(&probe);
                // Only onto an idle node (one with none of its CPUs known runs nothing);
                // otherwise the next health check asks again.
                if found != *node && self.sched.set_capacity(i, found.capacity()) {
                    note_probe(&found, &probe);
                    note!(
                        "node {}: {} GPU(s) ({}), {} CPUs",
                        found.name,
                        found.gpus.len(),
                        found.gpu_source,
                        found.cpus
                    );
                    self.inventory.nodes[i] = found;
                    self.dirty = true;
                    self.inventory_changed();
                    self.warn_unfit_pending();
                }
            }
            Msg::Launched(gen, pid) => {
                if gen != self.launcher_gen {
                    // A lost launcher's: its launches were settled when it was lost.
                    return;
                }
                match self.launching.pop_front() {
                    Some(l) if l.is_prestart() => {
                        // A prestart's: it waits at its gate (0: none could be made).
                        match self.prestarts.get_mut(&l.id) {
                            Some(p) if pid != 0 => p.pid = Some(pid),
                            Some(_) => {
                                self.prestarts.remove(&l.id);
                            }
                            None => match &mut self.speculation {
                                Some(sp) if sp.id == l.id && pid != 0 => {
                                    sp.prestart.pid = Some(pid)
                                }
                                Some(sp) if sp.id == l.id => self.speculation = None,
                                _ => {}
                            },
                        }
                    }
                    Some(l) => self.launched(l.id, pid),
                    None => note!("the launcher answered a launch it was not given (pid {pid})"),
                }
            }
            Msg::LauncherGone(gen) => {
                if gen == self.launcher_gen && self.launcher.is_some() {
                    self.launcher_lost("its answers closed");
                }
            }
            Msg::SupervisorExited(id, pid) => {
                // Reap it if it is our child (after a restart it is not; ECHILD is fine).
                let _ = nix::sys::wait::waitpid(
                    nix::unistd::Pid::from_raw(pid as i32),
                    Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                );
                if self.supervisors.get(&id).is_some_and(|s| s.pid == pid) {
                    let result = self.spool.read_result(id);
                    if result.is_none() && self.never_taken(id) {
                        self.requeue_untaken(id, pid);
                    } else {
                        self.finish(id, result);
                    }
                }
            }
        }
    }

    /// The supervisor rewrote `status` (SETTING_UP -> RUNNING): mirror it in the record,
    /// which says the start from when it is recorded (see [`Daemon::record_start`]).
    fn refresh_status(&mut self, id: JobId) {
        let Ok(status) = self.spool.read_status(id) else {
            return;
        };
        self.touched.insert(id);
        if status.is_terminal()
            && (self.supervisors.contains_key(&id)
                || self
                    .launching
                    .iter()
                    .any(|l| l.id == id && !l.is_prestart()))
        {
            // The supervisor writes the final status last, after every process of the job
            // is gone and its result is recorded: the job has ended, its resources are free
            // now (the supervisor's exit follows; it is then only reaped).
            let result = self.spool.read_result(id);
            self.final_seen.insert(id, status);
            self.finish(id, result);
            return;
        }
        if let Some(info) = self.jobs.get_mut(&id) {
            // Only forward: a started job's `status` still says PENDING until its supervisor
            // writes its first word (read so when its pid comes in before that), and its
            // record says the start already.
            if status.progress() > info.status.progress() && !status.is_terminal() {
                info.status = status;
                let _ = self.spool.write_info(info);
                self.dirty = true;
            }
        }
    }

    /// When `queue` and `nodes` are to be rewritten next (if changed): at most once per
    /// `render_interval` while events keep coming, and once they stop for a while (5 times
    /// the last rewrite's cost, at least 100 ms), at once: a listing right after a burst
    /// then finds the table current instead of reading thousands of `info.json`.
    fn render_due(&self) -> std::time::Instant {
        let settle = RENDER_SETTLE.max(self.render_interval / 4);
        (self.last_render + self.render_interval).min(self.last_event + settle)
    }

    /// After each batch: start what fits, then refresh `queue` and `nodes` once.
    fn after_batch(&mut self) {
        self.poll_round();
        self.poll_lazy();
        self.admit_some();
        // A start that fails frees its resources again: keep placing until a pass starts
        // everything it picked.
        loop {
            let started = self.sched.schedule_at(now_ms());
            if started.is_empty() {
                break;
            }
            let mut failed = false;
            for (id, placement) in started {
                failed |= !self.start(id, placement);
            }
            if !failed {
                break;
            }
        }
        // The batch's admissions are durable (and the jobs handed over meanwhile start)
        // before anything else is written or waited for; a large round's, in the background.
        self.settle_round();
        self.users.borrow_mut().checked = false;
        self.settle_records();
        if self.max_prestarts > 0 {
            self.prestart_more();
        }
        self.starve_check_at = self.next_starvation_deadline();
        self.sync_view();
        if self
            .quiet
            .is_some_and(|(t, _)| t > std::time::Instant::now())
        {
            return;
        }
        self.quiet = None;
        self.premake();
        // A bash is started ahead at once after a job's end (a script that waits for a job
        // submits its next one then), else only once nothing happens: every batch puts it off.
        let settled_end = std::mem::take(&mut self.settled_end);
        self.speculate_at = None;
        if self.speculation_user().is_some() {
            if settled_end {
                self.speculate();
            } else {
                self.speculate_at = Some(std::time::Instant::now() + SPECULATE_AFTER);
            }
        }
        // `queue` and `nodes` are rewritten after the batch that changed them, but at most
        // once per RENDER_INTERVAL while events keep coming (a burst of 1,000 submissions
        // must not re-render a 10,000-line table 1,000 times).
        if self.dirty && std::time::Instant::now() >= self.render_due() {
            self.dirty = false;
            let began = std::time::Instant::now();
            self.last_render = began;
            for id in std::mem::take(&mut self.queue_stale) {
                if let Some(info) = self.jobs.get(&id) {
                    self.queue_rows.update(info);
                }
            }
            let text = self.queue_rows.text();
            if let Err(e) = self.spool.write_queue(&text) {
                note!("cannot write queue: {e}");
            }
            // sync_view() just published this batch's snapshot: the file and the mount show
            // the same one.
            let nodes = self
                .view
                .read(|v| v.nodes.clone())
                .map(|n| n.text())
                .unwrap_or_default();
            if nodes != self.last_nodes {
                if let Err(e) = self.spool.write_nodes(&nodes) {
                    note!("cannot write nodes: {e}");
                }
                self.last_nodes = nodes;
            }
            // Never spend more than ~5% of the time re-rendering: a huge queue is rewritten
            // less often while events keep coming (and at once when they stop).
            self.render_interval = RENDER_INTERVAL.max(began.elapsed() * 20);
        }
        if self
            .launching
            .front()
            .is_some_and(|l| l.sent.elapsed() > LAUNCH_ANSWER_TIMEOUT)
        {
            self.launcher_lost("no answer for 10 s");
        }
        self.ensure_launcher();
    }

    // ------------------------------------------------------------------ view

    /// Publishes changed job records and the `nodes` text to the FUSE view (and wakes its
    /// waiters). Cheap when nothing changed.
    fn sync_view(&mut self) {
        let usage = self.sched.usage();
        let nodes_changed = self.view.read(|v| {
            v.nodes
                .as_ref()
                .is_none_or(|n| n.usage != usage || n.inventory != self.inventory)
        });
        if self.touched.is_empty() && !nodes_changed {
            return;
        }
        let nodes = nodes_changed.then(|| {
            Arc::new(NodesSnapshot {
                inventory: self.inventory.clone(),
                usage,
            })
        });
        // Jobs whose admission round is still running are shown once it is through.
        let touched = match &self.round {
            Some(round) => {
                let (later, now) = std::mem::take(&mut self.touched)
                    .into_iter()
                    .partition(|id| round.ids.contains(id));
                self.touched = later;
                now
            }
            None => std::mem::take(&mut self.touched),
        };
        self.queue_stale.extend(touched.iter().copied());
        if !self.view_jobs && nodes.is_none() {
            return;
        }
        let touched = if self.view_jobs {
            touched
        } else {
            BTreeSet::new()
        };
        let jobs = &self.jobs;
        self.view.update(|v| {
            for id in touched {
                if let Some(info) = jobs.get(&id) {
                    v.jobs.insert(id, info.clone());
                }
            }
            if let Some(nodes) = nodes {
                v.nodes = Some(nodes);
            }
        });
    }

    /// When the oldest waiting job crosses the starvation bound (so a pass must run even if
    /// no event comes); `None` without a bound or a waiting job, or once it has crossed.
    fn next_starvation_deadline(&self) -> Option<std::time::Instant> {
        let bound = self.sched.starvation_bound()?;
        let oldest = self.sched.oldest_waiting_since()?;
        let due = oldest.saturating_add(bound).saturating_add(1);
        let now = now_ms();
        (due > now).then(|| std::time::Instant::now() + Duration::from_millis(due - now))
    }

    /// Master sockets and known_hosts of the ssh connections to remote nodes.
    fn ssh_dir(&self) -> PathBuf {
        self.spool.private().join("ssh")
    }
}

/// `SKYPILOT_NUM_GPUS_PER_NODE`: the ceiling of the per-node count of the accelerator
/// alternative the job was given (`chosen`), or of its first alternative.
fn per_node_gpus(spec: &JobSpec, chosen: Option<&str>) -> u64 {
    let alts = &spec.resources.accelerators;
    chosen
        .and_then(|k| alts.iter().find(|a| a.kind.eq_ignore_ascii_case(k)))
        .or_else(|| alts.first())
        .map(|a| a.count.ceil_units())
        .unwrap_or(0)
}

/// Reads `incoming/NAME/job.yaml` of a directory submission (no links, not while written).
fn spool_read_dir_job(path: &Path) -> Result<Option<Vec<u8>>, String> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(
            "the directory has no job.yaml (a job directory holds job.yaml and the job's files)"
                .into(),
        ),
        Err(e) => return Err(e.to_string()),
    };
    if !meta.file_type().is_file() {
        return Err("job.yaml is not a regular file".into());
    }
    match spool::read_file_unless_writing(path) {
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

fn default_name(source: &str) -> String {
    let base = source.trim_start_matches("incoming/").trim_end_matches('/');
    let stem = base
        .strip_suffix(".yaml")
        .or_else(|| base.strip_suffix(".yml"))
        .unwrap_or(base);
    if stem.is_empty() {
        "sky-cmd".into()
    } else {
        stem.to_string()
    }
}

/// Who a job runs as: the submitter, when the daemon can switch users (root).
fn run_as(uid: u32, gid: u32, am_root: bool) -> RunAs {
    let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten();
    let (name, home, shell, gid) = match &user {
        Some(u) => (
            u.name.clone(),
            u.dir.clone(),
            u.shell.clone(),
            u.gid.as_raw(),
        ),
        None => (
            uid.to_string(),
            PathBuf::from("/"),
            PathBuf::from("/bin/bash"),
            gid,
        ),
    };
    let groups = match &user {
        Some(u) => {
            let cname = std::ffi::CString::new(u.name.clone()).unwrap_or_default();
            nix::unistd::getgrouplist(&cname, nix::unistd::Gid::from_raw(gid))
                .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
                .unwrap_or_else(|_| vec![gid])
        }
        None => vec![gid],
    };
    let me = nix::unistd::geteuid().as_raw();
    RunAs {
        name,
        uid,
        gid,
        groups,
        home,
        shell,
        switch: am_root && uid != me,
    }
}
