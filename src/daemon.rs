//! The scheduler daemon: one event loop that admits submissions, places jobs, starts their
//! supervisors, applies cancels and keeps `queue` and `nodes` current.
//!
//! All state is in the spool; the loop's memory is a cache rebuilt from it at start-up.

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

/// How often remote nodes are checked (only when the cluster has remote nodes).
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// Asks every remote node, in parallel, whether it answers and (where the cluster file
/// declares none) which GPUs and how many CPUs it has. This also opens the ssh master
/// connection from the daemon, so jobs reuse it instead of paying a handshake. A node that
/// does not answer now is asked again when it does (see [`Daemon::handle_msg`]).
fn probe_remote_nodes(inventory: &mut Inventory, ssh_dir: &Path) {
    let probes: Vec<_> = inventory
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let target = SshTarget::of(n, ssh_dir)?;
            let wants = n.wants_probe();
            Some(std::thread::spawn(move || {
                let up = target.run("true", Duration::from_secs(15));
                let probe = match up {
                    Ok(_) => probe_node(&target, wants),
                    Err(_) => NodeProbe::default(),
                };
                (i, up, probe)
            }))
        })
        .collect();
    for p in probes {
        let Ok((i, up, probe)) = p.join() else {
            continue;
        };
        let Some(node) = inventory.nodes.get_mut(i) else {
            continue;
        };
        match up {
            Ok(_) => node.down = None,
            Err(e) => {
                note!("node {} is unreachable: {e}", node.name);
                node.down = Some(format!("unreachable: {e}"));
            }
        }
        node.take_probe(&probe);
        note_probe(node, &probe);
    }
}

/// Asks an ssh node for what `wants` (from [`inventory::Node::wants_probe`]) names: its GPUs,
/// its CPUs.
fn probe_node(target: &SshTarget, (gpus, cpus): (bool, bool)) -> NodeProbe {
    NodeProbe {
        gpus: gpus.then(|| target.probe_gpus()),
        cpus: cpus.then(|| target.probe_cpus()),
    }
}

/// Says in the daemon's log what a node's probe left unknown.
fn note_probe(node: &inventory::Node, probe: &NodeProbe) {
    if let Some(Err(e)) = &probe.cpus {
        note!(
            "node {}: could not count its CPUs ({e}): none for jobs (give `cpus` in the \
             cluster file)",
            node.name
        );
    } else if node.cpus_to_probe {
        note!(
            "node {}: its CPUs are counted when it answers (or give `cpus` in the cluster \
             file): none for jobs until then",
            node.name
        );
    }
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
    let inventory_json = serde_json::to_vec_pretty(&inventory).context("encoding the inventory")?;
    spool::write_atomic(spool.root(), "nodes.json", &inventory_json, false)?;
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
    // ------------------------------------------------------------------ start-up

    /// Rebuilds state from the spool: finishes staged admissions, re-adopts or settles
    /// jobs whose supervisor ran while no daemon watched, re-queues pending jobs in order.
    fn recover(&mut self) -> anyhow::Result<()> {
        self.secret_ids = match self.spool.secret_ids() {
            Ok(ids) => Some(ids.into_iter().collect()),
            Err(e) => {
                note!("cannot list the secrets files: {e}");
                None
            }
        };
        self.replay_journal();
        for id in self.spool.job_ids()? {
            let info = match self.spool.read_info(id) {
                Ok(i) => i,
                Err(e) => {
                    note!("job {id}: skipped, unreadable record: {e}");
                    continue;
                }
            };
            let status = self.spool.read_status(id).unwrap_or(info.status);
            let settled = info.status.is_terminal();
            let mut info = info;
            info.status = status;
            if status.is_terminal() {
                self.jobs.insert(id, info);
                self.touched.insert(id);
                if settled {
                    self.fix_link(id, State::Done);
                } else {
                    // It ended while no daemon watched: settle it like any ended job.
                    self.adopt_launch_record(id);
                    let placement = self.placement_of(id);
                    let _ = self.sched.restore(id, &placement);
                    self.finish(id, self.spool.read_result(id));
                }
                continue;
            }
            self.jobs.insert(id, info);
            self.touched.insert(id);
            let private = self.spool.job_private(id);
            if private.join("supervisor.lock").exists() {
                self.recover_launched(id);
            } else {
                self.fix_link(id, State::Pending);
                self.enqueue(id);
            }
        }
        // Jobs fully staged before the crash: only publishing was left (and the round that
        // makes them durable, which may not have run).
        let mut published = BTreeSet::new();
        for claimed in self.spool.list_staged()? {
            let id = claimed.id;
            // The lock of a job launched before it was published (see
            // [`Daemon::launch_early`]): its gate opens only once the job is published and
            // durable, so nothing of it ran, and the dead daemon's end of the gate is closed.
            // Its log may hold its supervisor's notes: it starts again empty.
            spool::forget_launch(&claimed.dir);
            if claimed.staged {
                if let Err(e) = self.spool.publish(&claimed) {
                    note!("staged job {id}: {e}");
                    continue;
                }
                published.insert(id);
                if let Ok(info) = self.spool.read_info(id) {
                    note!(
                        "job {id} ({}) admitted from {} (staged before a restart)",
                        info.name,
                        info.source
                    );
                    self.jobs.insert(id, info);
                    self.touched.insert(id);
                    self.enqueue(id);
                    self.dirty = true;
                }
                continue;
            }
            match self.spool.read_claimed_yaml(&claimed) {
                Ok(yaml) => match self.validate(&claimed.source, &yaml, claimed.uid) {
                    Ok(adm) => {
                        if let Err(e) = self.stage_and_publish(vec![(claimed, adm)], false) {
                            note!("staged job {id}: {e}");
                        }
                    }
                    Err(reason) => {
                        let _ = self.spool.reject_claimed(&claimed, &reason);
                    }
                },
                Err(reason) => {
                    let _ = self.spool.reject_claimed(&claimed, &reason);
                }
            }
        }
        self.finish_round();
        self.start_round(published, None);
        self.settle_records();
        // From the disk as recovery left it: a directory prepared ahead (see
        // [`Daemon::premake`]) and removed above does not use its ID up.
        self.next_id = self.spool.next_id()?;
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            if self.jobs.get(&id).is_some_and(|j| !j.status.is_terminal()) {
                let _ = self.watcher.watch_job(id, &self.spool.job_dir(id));
                self.handle_cancel(id);
            }
        }
        Ok(())
    }

    /// First thing at start-up: each job in the admission journal (see [`crate::journal`])
    /// gets back what a power cut lost of its admission (nothing, after a crash or a kill:
    /// the files were written), made durable at once; then the journal is emptied. A job
    /// that cannot be restored keeps its record for the next start.
    fn replay_journal(&mut self) {
        let Some(journal) = self.journal.as_ref() else {
            return;
        };
        let records = journal.records();
        let mut complete = true;
        let mut paths: Vec<(PathBuf, bool)> = Vec::new();
        for r in &records {
            match self.spool.restore_admission(r) {
                Ok((dir, written)) if !written.is_empty() => {
                    note!(
                        "job {} ({}): restored from the admission journal ({} path(s) rewritten or synced)",
                        r.id,
                        r.info.source,
                        written.len()
                    );
                    if self.am_root && r.info.uid != 0 {
                        if let Err(e) = spool::grant_create(&dir, r.info.uid) {
                            note!("job {}: {e}", r.id);
                        }
                    }
                    paths.extend(written);
                }
                Ok(_) => {}
                Err(e) => {
                    complete = false;
                    note!(
                        "job {}: cannot be restored from the admission journal: {e}",
                        r.id
                    );
                }
            }
        }
        // Then the ends: a job that ended before the power cut is settled, never run again.
        for end in journal.ends() {
            match self.spool.restore_end(&end) {
                Ok(written) if !written.is_empty() => {
                    note!(
                        "job {} ({}): its end ({}) restored from the journal",
                        end.id,
                        end.source,
                        end.status
                    );
                    paths.extend(written);
                }
                Ok(_) => {}
                Err(e) => {
                    complete = false;
                    note!(
                        "job {}: its end cannot be restored from the journal: {e}",
                        end.id
                    );
                }
            }
        }
        paths.sort();
        paths.dedup();
        if let Err(e) = spool::sync_all(&durables(&paths)) {
            complete = false;
            note!("journal: restored jobs not synced: {e}");
        }
        if complete {
            if let Some(Err(e)) = self.journal.as_mut().map(|j| j.clear()) {
                note!("admission journal: cannot empty it: {e}");
            }
        }
    }

    /// A job whose launch was recorded: its supervisor is alive (re-adopt), finished
    /// (settle), died (FAILED_DRIVER), or never started (back to pending).
    fn recover_launched(&mut self, id: JobId) {
        self.adopt_launch_record(id);
        let private = self.spool.job_private(id);
        let held = executor::lock_fd_is_held(&private.join("supervisor.lock")).unwrap_or(false);
        let record = self.spool.read_supervisor(id);
        if held {
            // A held lock means a supervisor lives (it may not have written its record yet):
            // find it by its record, or as the holder of the lock.
            let pid = record
                .as_ref()
                .filter(|rec| executor::process_start_ticks(rec.pid) == Some(rec.start_ticks))
                .map(|rec| rec.pid)
                .or_else(|| executor::flock_holder(&private.join("supervisor.lock")));
            if let Some(pid) = pid {
                let placement = self.placement_of(id);
                if let Err(e) = self.sched.restore(id, &placement) {
                    note!("job {id}: re-adopted but its resources clash: {e}");
                }
                self.fix_link(id, State::Running);
                self.watch_supervisor(id, pid);
                note!("job {id}: re-adopted running supervisor pid {pid}");
                return;
            }
        }
        if let Some(result) = self.spool.read_result(id) {
            self.fix_link(id, State::Running);
            let placement = self.placement_of(id);
            let _ = self.sched.restore(id, &placement);
            self.finish(id, Some(result));
            return;
        }
        if record.is_some() {
            self.fix_link(id, State::Running);
            self.finish(
                id,
                Some(driver_lost(
                    "the job's supervisor died without recording a result while no daemon was watching"
                        .into(),
                )),
            );
            return;
        }
        // Launch recorded but no supervisor ever ran: nothing of the job ran. Re-queue it.
        self.back_to_pending(id);
    }

    /// A launched job that nothing of ran goes back to the queue, in its place (its
    /// submission time): launch lock removed, `status` PENDING, no start or placement.
    fn back_to_pending(&mut self, id: JobId) {
        let _ = std::fs::remove_file(self.spool.job_private(id).join("supervisor.lock"));
        let _ = self.spool.write_status(id, Status::Pending);
        self.touched.insert(id);
        if let Some(info) = self.jobs.get_mut(&id) {
            info.status = Status::Pending;
            info.started = None;
            info.placement.clear();
            let _ = self.spool.write_info(info);
        }
        self.fix_link(id, State::Pending);
        self.enqueue(id);
    }

    /// Whether a job whose supervisor exited never had anything of it run: the supervisor
    /// writes its record into the job's lock before anything else (a `cancel` check, a
    /// process), so no record and no final `status` mean it died before it took the job
    /// (for instance while it waited, free, with the launch unread in its socket). Not once
    /// the job has been put back [`MAX_UNTAKEN`] times.
    fn never_taken(&self, id: JobId) -> bool {
        self.untaken.get(&id).copied().unwrap_or(0) < MAX_UNTAKEN
            && self.spool.read_supervisor(id).is_none()
            && !self.spool.read_status(id).is_ok_and(|s| s.is_terminal())
            && self.spool.read_launch(id).is_some()
    }

    /// Puts a job whose supervisor died before taking it back in the queue (it starts again
    /// at the next scheduling pass, on a new supervisor).
    fn requeue_untaken(&mut self, id: JobId, pid: u32) {
        self.supervisors.remove(&id);
        self.sched.release(id);
        *self.untaken.entry(id).or_default() += 1;
        note!(
            "job {id}: its supervisor (pid {pid}) exited before it took the job; nothing of \
             it ran, so it is back in the queue"
        );
        self.back_to_pending(id);
        self.dirty = true;
        // A cancel that came while it was launched applies to it as a queued job now.
        self.handle_cancel(id);
    }

    /// A daemon that died between handing a job over and recording its start left
    /// `info.json` saying PENDING: take the start from the launch record.
    fn adopt_launch_record(&mut self, id: JobId) {
        let Some(launch) = self.spool.read_launch(id) else {
            return;
        };
        let Some(info) = self.jobs.get_mut(&id) else {
            return;
        };
        if info.started.is_some() && !info.placement.is_empty() {
            return;
        }
        info.started = Some(launch.started);
        info.placement = launch.placement;
        if info.status == Status::Pending {
            info.status = Status::Running;
        }
        if let Err(e) = self.spool.write_info(info) {
            note!("job {id}: cannot record its launch in info.json: {e}");
        }
        self.touched.insert(id);
    }

    /// Makes sure exactly `state/<id>` links to the job.
    fn fix_link(&self, id: JobId, state: State) {
        if self.spool.state_of(id) != Some(state) {
            let from = self.spool.state_of(id);
            match from {
                Some(f) => {
                    let _ = self.spool.move_state(id, f, state);
                }
                None => {
                    let _ = self.spool.link_state(id, state);
                }
            }
        }
        self.spool.unlink_other_states(id, state);
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
                let ssh_dir = self.ssh_dir();
                let Some(node) = self.inventory.nodes.get_mut(i) else {
                    return;
                };
                if node.down != down {
                    match &down {
                        None => note!("node {} is reachable again", node.name),
                        Some(why) => note!("node {} is down: {why}", node.name),
                    }
                    node.down = down;
                    self.sched.set_available(i, node.down.is_none());
                    self.dirty = true;
                }
                // A node that did not answer the start-up probe is asked now that it does.
                let wants = node.wants_probe();
                let target = SshTarget::of(node, &ssh_dir)
                    .filter(|_| node.down.is_none() && wants != (false, false));
                if let Some(target) = target.filter(|_| self.probing.insert(i)) {
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

    // ------------------------------------------------------------------ admission

    /// Parses and checks a submission; `Err` is the reason shown next to it in `rejected/`.
    fn validate(&self, source: &str, yaml: &[u8], _uid: u32) -> Result<Admission, String> {
        let text = std::str::from_utf8(yaml)
            .map_err(|e| format!("{source}: the file is not UTF-8 text ({e})"))?;
        let spec = spec::parse(text, source, &BTreeMap::new()).map_err(|e| e.to_string())?;
        if !spec.secrets.is_empty() && spec.to_redacted_yaml().len() > spec::MAX_SPEC_BYTES {
            return Err(format!(
                "{source}: with its secrets redacted the job would exceed {} bytes; make the file smaller",
                spec::MAX_SPEC_BYTES
            ));
        }
        let demand = spec.demand();
        self.sched.check_fits_ever(&demand).map_err(|e| {
            format!(
                "{source}: this job can never run on cluster {}: {e}",
                self.inventory.cluster_name
            )
        })?;
        Ok(Admission {
            spec,
            yaml: yaml.to_vec(),
        })
    }

    /// Admits or rejects each named submission; admitted ones are made durable together
    /// (one round of fsyncs for the whole batch), then published in order.
    fn admit_batch(&mut self, names: Vec<OsString>) {
        self.admit_names(names.into_iter().map(|n| (n, 0)).collect());
    }

    /// Submissions that were still open for writing when last looked at (see
    /// [`crate::recheck`]): admitted now if their writer is gone.
    fn look_again(&mut self, due: Vec<(OsString, usize)>) {
        let due = due
            .into_iter()
            .filter(|(name, _)| !self.deferred.contains(name))
            .collect();
        self.admit_names(due);
    }

    /// [`Daemon::admit_batch`], each name with how often it was looked at again already:
    /// queued behind the names that came before, and the first chunk admitted now unless a
    /// round is in flight.
    fn admit_names(&mut self, names: Vec<(OsString, usize)>) {
        for (name, tries) in names {
            if self.to_admit_names.insert(name.clone()) {
                self.to_admit.push_back((name, tries));
            }
        }
        self.admit_some();
    }

    /// Whether names wait in `to_admit` and nothing keeps them from being admitted now.
    fn admission_waiting(&self) -> bool {
        self.round.is_none() && !self.to_admit.is_empty()
    }

    /// Admits the next chunk of `to_admit` (at most MAX_ROUND_JOBS jobs, one round of
    /// fsyncs), unless a round is still in flight. A bulk move of thousands of files is thus
    /// admitted a chunk at a time, and between chunks (and while a chunk's round runs) the
    /// daemon handles the events of the jobs already running, so their slots do not stay
    /// empty while the rest is admitted; nor does a rescan that finds 20,000 names leave them
    /// published for seconds before a round of 60,000 fsyncs makes them durable.
    fn admit_some(&mut self) {
        if self.round.is_some() {
            return;
        }
        let mut ready: Vec<(Claimed, Admission)> = Vec::new();
        let mut looked = 0;
        while ready.len() < MAX_ROUND_JOBS && looked < MAX_LOOKS_PER_CHUNK {
            let Some((name, tries)) = self.to_admit.pop_front() else {
                break;
            };
            self.to_admit_names.remove(&name);
            if self.deferred.contains(&name) {
                continue;
            }
            looked += 1;
            match self.take_submission(&name, tries) {
                Ok(Some(pair)) => ready.push(pair),
                Ok(None) => {}
                Err(e) => note!("incoming/{}: {e}", spool::display_name(&name)),
            }
        }
        if !ready.is_empty() {
            if let Err(e) = self.stage_and_publish(ready, true) {
                note!("admission failed: {e}");
            }
        }
    }

    /// Looks at one name in `incoming/`: `Ok(None)` when there is nothing to admit (gone,
    /// ignored, rejected, or still being written).
    fn take_submission(
        &mut self,
        name: &OsStr,
        tries: usize,
    ) -> anyhow::Result<Option<(Claimed, Admission)>> {
        let Some((kind, _meta)) = self.spool.inspect_incoming(name)? else {
            return Ok(None);
        };
        let source = format!("incoming/{}", spool::display_name(name));
        let yaml = match &kind {
            Incoming::Ignore => return Ok(None),
            Incoming::Bad(reason) => {
                let to = self
                    .spool
                    .reject_incoming(name, &format!("{source}: {reason}"))?;
                note!("rejected {source}: {reason} (now {})", to.display());
                return Ok(None);
            }
            Incoming::File => match self.spool.read_incoming_file(name) {
                Ok(bytes) => bytes,
                Err(spool::SpoolError::Io { source: e, .. })
                    if e.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(None)
                }
                Err(e) => {
                    self.spool
                        .reject_incoming(name, &format!("{source}: cannot read it: {e}"))?;
                    return Ok(None);
                }
            },
            Incoming::Dir => {
                let inner = self.spool.incoming().join(name).join("job.yaml");
                match spool_read_dir_job(&inner) {
                    Ok(bytes) => bytes,
                    Err(reason) => {
                        let to = self
                            .spool
                            .reject_incoming(name, &format!("{source}/: {reason}"))?;
                        note!("rejected {source}/: {reason} (now {})", to.display());
                        return Ok(None);
                    }
                }
            }
        };
        let Some(yaml) = yaml else {
            // A writer still has it open, or the last one's close is not through yet.
            self.rechecks.busy(name, tries, std::time::Instant::now());
            return Ok(None);
        };
        let shown = if kind == Incoming::Dir {
            format!("{source}/job.yaml")
        } else {
            source.clone()
        };
        match self.validate(&shown, &yaml, 0) {
            Ok(adm) => {
                let id = self.next_id;
                let claimed = self.spool.claim(name, &kind, id)?;
                self.next_id += 1;
                Ok(Some((claimed, adm)))
            }
            Err(reason) => {
                let to = self.spool.reject_incoming(name, &reason)?;
                note!("rejected {source}: {reason} (now {})", to.display());
                Ok(None)
            }
        }
    }

    /// Writes each claimed job's files, publishes each job, and starts the round of fsyncs
    /// that makes them durable (see [`AdmissionRound`]); the batch's starts happen while it
    /// runs, and [`Daemon::finish_round`] opens their gates once it is through. With
    /// `early`, a lone submission may be placed and launched before it is staged (see
    /// [`Daemon::place_early`]).
    fn stage_and_publish(
        &mut self,
        ready: Vec<(Claimed, Admission)>,
        early: bool,
    ) -> anyhow::Result<()> {
        // One round at a time: the last one's jobs are durable before new IDs are given.
        self.finish_round();
        // The first claim of this batch used the prepared directory, if there was one.
        let prepared = self.premade.take();
        let early = match (early, ready.as_slice()) {
            (true, [(claimed, adm)]) => {
                self.place_early(claimed, adm, prepared == Some(claimed.id))
            }
            _ => None,
        };
        // A job handed over already: its record is journaled before it is staged.
        let journaled_early = match (&early, ready.as_slice()) {
            (Some(e), [(claimed, adm)]) if e.launched.is_some() => {
                self.journal_early(e, adm, claimed.file).then_some(e.id)
            }
            _ => None,
        };
        // A speculation for an ID of this batch that no early launch took: its bash goes,
        // and the log it held is replaced before the job's is written.
        let unused = self
            .speculation
            .as_ref()
            .and_then(|sp| ready.iter().find(|(c, _)| c.id == sp.id));
        if let Some((c, _)) = unused {
            self.speculation = None;
            if let Err(e) = spool::replace_log(&c.dir, "log") {
                note!("job {}: could not replace its log: {e}", c.id);
            }
        }
        let mut staged: Vec<(Claimed, JobInfo, Admission)> = Vec::new();
        let first_id = ready.iter().map(|(c, _)| c.id).min();
        for (claimed, adm) in ready {
            let launched = early
                .as_ref()
                .filter(|e| e.id == claimed.id && e.launched.is_some())
                .map(|e| &e.info);
            match self.stage(&claimed, &adm, launched) {
                Ok(info) => staged.push((claimed, info, adm)),
                Err(_) if !self.unjournal(claimed.id, journaled_early) => {}
                Err(e) if is_out_of_space(&e) => self.defer(&claimed, &e),
                Err(e) => {
                    let reason = format!("{}: could not be admitted: {e}", claimed.source);
                    let _ = self.spool.reject_claimed(&claimed, &reason);
                    note!("{reason}");
                }
            }
        }
        // The highest ID given goes to disk in the same round (not after it: one more fsync
        // on the way to every start).
        let last_id = match staged.iter().map(|(c, _, _)| c.id).max() {
            Some(max) => match self.spool.write_last_id(max) {
                Ok(path) => Some(path),
                Err(e) => {
                    // Nothing of this batch is visible yet: hand every submission back to
                    // incoming/ and try again later.
                    let err = anyhow::Error::from(e);
                    for (claimed, _, _) in &staged {
                        if self.unjournal(claimed.id, journaled_early) {
                            self.defer(claimed, &err);
                        }
                    }
                    staged.clear();
                    None
                }
            },
            None => None,
        };
        if staged.is_empty() {
            if let Some(e) = &early {
                // Its gate closes unopened: its supervisor (if it got the launch) kills the
                // bash still at its first line.
                self.abandon_early(e);
            }
            if early.as_ref().is_some_and(|e| e.launched.is_some()) {
                // Its ID is not given again: the launch, answered later, names it.
            } else if let Some(first) = first_id {
                // Nothing of this batch was published: its IDs were never seen, give them again.
                if self.next_id > first && self.spool.next_id().is_ok_and(|n| n <= first) {
                    self.next_id = first;
                }
            }
            return Ok(());
        }
        let mut ids = BTreeSet::new();
        // The early job once published, and its spec if it was launched already.
        let mut early_published = None;
        for (claimed, info, adm) in staged {
            let id = claimed.id;
            let this_early = early.as_ref().filter(|e| e.id == id);
            if claimed.has_workdir && self.spool.secrets_file(id).exists() {
                // The submitted copy holds the secrets in clear: keep only the redacted one.
                let _ = std::fs::remove_file(claimed.content.join("job.yaml"));
            }
            if let Err(e) = self.spool.publish(&claimed) {
                // Left in staging/ with its info.json: published at the next start.
                note!("job {id}: could not be published: {e}");
                if let Some(e) = this_early {
                    self.abandon_early(e);
                }
                continue;
            }
            ids.insert(id);
            // (An early job's line is in the journal already: its round takes that fsync.)
            if self.journal.is_some() && !claimed.has_workdir && journaled_early != Some(id) {
                self.unjournaled.insert(
                    id,
                    Unjournaled {
                        file: claimed.file,
                        yaml: adm.job_yaml_text(),
                    },
                );
            }
            note!(
                "job {id} ({}) admitted from {} for {}, needs {}",
                info.name,
                info.source,
                info.user,
                info.resources
            );
            self.jobs.insert(id, info);
            self.touched.insert(id);
            let _ = self.watcher.watch_job(id, &self.spool.job_dir(id));
            self.dirty = true;
            let launched = this_early.is_some_and(|e| e.launched.is_some());
            let spec = if launched {
                Some(adm.spec)
            } else {
                if adm.spec.secrets.is_empty() {
                    // `job.yaml` holds exactly the bytes this was parsed from.
                    self.fresh.insert(id, adm.spec, adm.yaml.len());
                }
                None
            };
            if this_early.is_some() {
                // Placed already: started below, or launched already.
                early_published = Some(spec);
                continue;
            }
            self.enqueue(id);
            // A cancel may already be waiting (made between publish and watch).
            self.handle_cancel(id);
        }
        self.start_round(ids, last_id);
        if let (Some(e), Some(spec)) = (early, early_published) {
            let id = e.id;
            match (e.launched, spec) {
                (Some((started, assignments, answered)), Some(spec)) => {
                    // Its lock moved with its directory.
                    let lock_path = self.spool.job_private(id).join("supervisor.lock");
                    if let Some(l) = self.launching.iter_mut().find(|l| l.id == id) {
                        l.lock_path = lock_path;
                    }
                    self.record_start(e.info, &spec, started, assignments, answered);
                    // A cancel made meanwhile: its supervisor is signalled once known.
                    self.handle_cancel(id);
                }
                _ => {
                    self.start(id, e.placement);
                }
            }
        }
        Ok(())
    }

    /// Makes the next ID's staging directory ahead, while nothing waits: the next lone
    /// submission's early launch then creates no directory and no log on its way to its
    /// supervisor (see [`spool::Spool::prepare_staging`]).
    fn premake(&mut self) {
        let id = self.next_id;
        if self.premade == Some(id)
            || self.premake_failed == Some(id)
            || self.round.is_some()
            || !self.to_admit.is_empty()
            || self.sched.pending_len() > 0
        {
            return;
        }
        match self.spool.prepare_staging(id) {
            Ok(()) => self.premade = Some(id),
            Err(e) => {
                // Only a head start lost: the claim makes what is missing (or says why not).
                note!("could not prepare staging/{id} ahead: {e}");
                self.premake_failed = Some(id);
            }
        }
    }

    /// Starts the next ID's job ahead of its submission, as the user of the last lone
    /// submission: a prestart (see [`Daemon::prestart`]) whose plan is a placeholder and
    /// whose bash, held at its first line, gets the real job's commands with its release
    /// ([`executor::LaunchPlan::speculative`]). Made once the next ID's staging directory
    /// is ready (its `log` is the bash's output), while nothing waits and a default job
    /// would fit now: in the batch that settled a job's end (a script that waits for its
    /// job submits the next one then), or after SPECULATE_AFTER of quiet. That user's next
    /// lone submission, if it gets this ID and can run in it, is confirmed through it
    /// ([`Daemon::launch_early`]) and skips its bash's start-up; anything else kills the
    /// bash at its first line.
    fn speculate(&mut self) {
        let Some((uid, gid)) = self.speculation_user() else {
            return;
        };
        let id = self.next_id;
        self.speculated_for = Some(id);
        // One for another ID is stale.
        self.speculation = None;
        if let Err(e) = self.start_speculation(id, uid, gid) {
            note!("could not start a bash ahead for job {id}: {e:#}");
        }
    }

    /// The user (uid, gid) a speculative prestart is to be made for, for the next ID, if
    /// one is (see [`Daemon::speculate`]): the last lone submission's.
    fn speculation_user(&self) -> Option<(u32, u32)> {
        let id = self.next_id;
        self.last_lone.filter(|_| {
            self.premade == Some(id)
                && self.max_prestarts > 0
                && self.round.is_none()
                && self.to_admit.is_empty()
                && self.sched.pending_len() == 0
                && self.speculation.as_ref().is_none_or(|sp| sp.id != id)
                && self.speculated_for != Some(id)
        })
    }

    /// The only node, when it is the local machine: what prestarts start on (its index,
    /// name and address).
    fn lone_local_node(&self) -> Option<(usize, String, String)> {
        let mut locals = self
            .inventory
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.local);
        match (locals.next(), locals.next()) {
            (Some((index, node)), None) => Some((index, node.name.clone(), node.addr.clone())),
            _ => None,
        }
    }

    fn start_speculation(&mut self, id: JobId, uid: u32, gid: u32) -> anyhow::Result<()> {
        let Some((index, name, addr)) = self.lone_local_node() else {
            return Ok(());
        };
        let spec = spec::parse("run: ':'\n", "a job started ahead", &BTreeMap::new())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let Some(grant) = self.sched.fit_now(index, &spec.demand()) else {
            return Ok(());
        };
        let info = self.new_info(id, (uid, gid), String::new(), String::new(), false, &spec);
        let tentative = NodeAssignment {
            rank: 0,
            node: name.clone(),
            ip: addr,
            accelerator: grant.accelerator,
            gpus: vec![],
            gpu_shares: vec![],
            cpus: grant.cpus.to_string(),
        };
        let mut plan = self.plan(&info, &spec, std::slice::from_ref(&tentative))?;
        plan.speculative = true;
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        let dir = self.spool.staging().join(id.to_string());
        let log = spool::open_log(&dir, "log")?;
        let lock_path = dir.join(".sky").join("supervisor.lock");
        let ours = self.send_prestart(id, json, Some(log.into()), lock_path)?;
        self.speculation = Some(Speculation {
            id,
            uid,
            gid,
            prestart: Prestart {
                gate: ours,
                node: name,
                pid: None,
                spec: None,
            },
        });
        Ok(())
    }

    /// A lone submission on a queue where nothing waits: placed at once, before it is
    /// staged, and, if it fits now and its launch opens no path of the job before its gate
    /// opens ([`executor::launchable_unpublished`]), handed to a supervisor right away, its
    /// lock (in `staging/<id>/.sky/`) and its `log` passed as descriptors, so that its
    /// `bash` starts while the daemon stages and publishes it. It waits at its start gate
    /// like any job of a round in flight: the round is made now (for the gate) and its
    /// fsyncs start only after the publication, so the gate never opens on a job that is
    /// not published and durable. `None`: it did not fit now (it is queued as usual once
    /// published).
    fn place_early(&mut self, claimed: &Claimed, adm: &Admission, prepared: bool) -> Option<Early> {
        if claimed.has_workdir || self.sched.pending_len() > 0 || self.round.is_some() {
            return None;
        }
        let id = claimed.id;
        let info = self.job_info(claimed, adm);
        self.sched
            .enqueue_at(id, info.demand.clone(), epoch_ms(&info.submitted));
        let mut placed = self.sched.schedule_at(now_ms());
        let mine = placed
            .iter()
            .position(|(j, _)| *j == id)
            .map(|at| placed.remove(at).1);
        for (other, p) in placed {
            self.start(other, p);
        }
        let Some(placement) = mine else {
            self.sched.dequeue(id);
            return None;
        };
        let mut early = Early {
            id,
            info,
            placement,
            launched: None,
        };
        match self.launch_early(claimed, adm, &early, prepared) {
            Ok(launched) => early.launched = launched,
            Err(e) => {
                // Started the usual way once published (where this fails again, the job
                // fails to start with the reason).
                self.round = None;
                note!("job {id}: could not be launched before its publication: {e:#}");
            }
        }
        Some(early)
    }

    /// The hand-over of [`Daemon::place_early`]: the launch record's time and the
    /// placement, and the supervisor's pid if already known; `None` where the launch would
    /// open a path of the job before its gate opens (it is started once published).
    /// `prepared`: its staging directory was made ahead (see [`Daemon::premake`]).
    fn launch_early(
        &mut self,
        claimed: &Claimed,
        adm: &Admission,
        early: &Early,
        prepared: bool,
    ) -> anyhow::Result<Option<EarlyLaunch>> {
        let id = early.id;
        let assignments = self.assignments(&early.placement);
        let plan = self.plan(&early.info, &adm.spec, &assignments)?;
        if !executor::launchable_unpublished(&plan) {
            return Ok(None);
        }
        if !prepared {
            spool::make_private_dir(&claimed.dir)?;
        }
        self.last_lone = Some((early.info.uid, early.info.gid));
        // The bash made ahead for this ID, if its user's: else it goes, and so does the log
        // it held (another user's process could have written to it).
        let speculation = match self.speculation.take() {
            // One for another ID is stale.
            Some(sp) if sp.id != id => None,
            Some(sp) if (sp.uid, sp.gid) == (early.info.uid, early.info.gid) => Some(sp),
            Some(_) => {
                spool::replace_log(&claimed.dir, "log")?;
                None
            }
            None => None,
        };
        let log = spool::open_log(&claimed.dir, "log")?;
        let (started, lock_path, lock) = launch_lock(&claimed.dir.join(".sky"), &assignments)?;
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        // The job's round, made now for its gate; its fsyncs are set once it is published.
        self.round = Some(AdmissionRound {
            sync: RoundSync::Unstaged,
            ids: BTreeSet::from([id]),
            gate: None,
            later: Vec::new(),
            prejournal: None,
        });
        let gate = self.gate_for(id).context("making the job's start gate")?;
        if let Some(sp) = speculation {
            if let Some(answered) =
                self.confirm(sp.prestart, id, &assignments, &json, &lock, gate.as_ref())
            {
                note!("job {id}: taken by a bash started ahead for it");
                return Ok(Some((started, assignments, answered)));
            }
        }
        let answered = self
            .hand_off(id, json, lock, gate, Some(log.into()), lock_path)
            .context("handing the job to its supervisor")?;
        Ok(Some((started, assignments, answered)))
    }

    /// An early placed job that could not be staged or published: its round (and so its
    /// gate) is dropped unopened, its resources freed.
    fn abandon_early(&mut self, early: &Early) {
        if early.launched.is_some() {
            self.round = None;
        }
        self.sched.release(early.id);
    }

    /// Makes the round of fsyncs that makes the just published jobs `ids` durable: each
    /// one's `job.yaml`, `info.json`, directory and secrets file if any, and `jobs/` (and
    /// `.skyspool/secrets/`), run concurrently once the batch's jobs are placed and handed
    /// over (see [`AdmissionRound`], [`RoundSync::Due`]).
    /// Not `status` nor `log` (a PENDING lost to a power cut is what `info.json` says
    /// anyway), nor the `pending/` link (start-up makes it again from `info.json`);
    /// `staging/` (the name the job had) and `last_id` (the highest ID given; start-up also
    /// counts the IDs in `jobs/`, so it matters only for jobs removed since) are synced after
    /// the gate opens, off the way to the start ([`Daemon::lazy_sync`]). A power cut before
    /// the round is through finds the jobs in `jobs/` or `staging/`, whole or not at all,
    /// and nothing of them ran (their gates were closed).
    fn start_round(&mut self, ids: BTreeSet<JobId>, last_id: Option<PathBuf>) {
        if ids.is_empty() {
            // An early launch's round, if any, closes its gate unopened.
            self.round = None;
            return;
        }
        let jobs = self.spool.jobs();
        let mut files = vec![(jobs, true)];
        for id in &ids {
            let dir = self.spool.job_dir(*id);
            files.push((dir.join("job.yaml"), false));
            files.push((dir.join("info.json"), false));
            files.push((dir, true));
        }
        files.extend(self.secrets_paths(ids.iter().copied()));
        let lazy = std::iter::once((self.spool.staging(), true)).chain(last_id.map(|p| (p, false)));
        // An early launch's round (see [`Daemon::launch_early`]) keeps its gate, and its
        // journal fsync if that started already.
        let (gate, prejournal) = match self.round.take() {
            Some(r) => (r.gate, r.prejournal.filter(|_| r.ids == ids)),
            None => (None, None),
        };
        // Through the journal: one fsync; the job files, `staging/` and `last-id` with the
        // journal's next checkpoint.
        let (sync, later) = match prejournal.or_else(|| self.journal_round(&ids)) {
            Some(sync) => (RoundSync::Started(sync), Vec::new()),
            None => (RoundSync::Due(files), lazy.collect()),
        };
        self.round = Some(AdmissionRound {
            sync,
            ids,
            gate,
            later,
            prejournal: None,
        });
    }

    /// An early-launched job's record goes to the journal before the job is staged, and its
    /// fsync starts at once: the round's one flush then runs while the job is staged and
    /// published, instead of after. The round still goes through only once the job is
    /// published (see [`Daemon::start_round`]); a job that cannot be staged gets its record
    /// taken back ([`Daemon::unjournal`]) before its submission is handed back. Returns
    /// whether the record was written.
    fn journal_early(
        &mut self,
        early: &Early,
        adm: &Admission,
        file: Option<spool::FileIdent>,
    ) -> bool {
        // A job with secrets: its secrets file, written with its files, is synced with the
        // round's journal line (see [`Daemon::journal_append`]), so that line waits for it.
        if self.journal.is_none()
            || self.round.as_ref().is_none_or(|r| r.ids.len() != 1)
            || !adm.spec.secrets.is_empty()
        {
            return false;
        }
        let record = crate::journal::Record {
            id: early.id,
            info: early.info.clone(),
            yaml: adm.job_yaml_text(),
            file,
        };
        let Some(sync) = self.journal_append(&[record]) else {
            return false;
        };
        if let Some(round) = self.round.as_mut() {
            round.prejournal = Some(sync);
        }
        true
    }

    /// Before an early job's submission is handed back or rejected (its staging failed):
    /// takes back its record, if it was journaled early. `false`: the record could not be
    /// taken back, so the claim must stay where it is (start-up finishes it as the job the
    /// record says).
    fn unjournal(&mut self, id: JobId, journaled_early: Option<JobId>) -> bool {
        if journaled_early != Some(id) {
            return true;
        }
        match self.journal.as_mut().map(|j| j.void(id)) {
            Some(Err(e)) => {
                note!("job {id}: its journal record cannot be taken back ({e}); its claim stays in staging/ for the next start");
                false
            }
            _ => true,
        }
    }

    /// Appends the records of the round's jobs to the admission journal (see
    /// [`crate::journal`]) and starts its fsync; `None` (the round then syncs the job files
    /// themselves) without a journal, for a round with a directory submission (its files
    /// are not in a record), or when the append fails.
    fn journal_round(&mut self, ids: &BTreeSet<JobId>) -> Option<spool::SyncRound> {
        let mut lines: HashMap<JobId, Unjournaled> = ids
            .iter()
            .filter_map(|id| self.unjournaled.remove(id).map(|u| (*id, u)))
            .collect();
        self.journal.as_ref()?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let info = self.jobs.get(id).filter(|i| !i.has_workdir)?.clone();
            let line = match lines.remove(id) {
                Some(line) => line,
                // Published at start-up (staged before a restart): as written, read back.
                None => Unjournaled {
                    file: None,
                    yaml: String::from_utf8(
                        std::fs::read(self.spool.job_dir(*id).join("job.yaml")).ok()?,
                    )
                    .ok()?,
                },
            };
            records.push(crate::journal::Record {
                id: *id,
                info,
                yaml: line.yaml,
                file: line.file,
            });
        }
        self.journal_append(&records)
    }

    /// Whether job `id` has a secrets file (known from its staging and the listing at
    /// start-up; looked up when that listing failed).
    fn has_secrets(&self, id: JobId) -> bool {
        self.secret_ids.as_ref().map_or_else(
            || self.spool.secrets_file(id).exists(),
            |ids| ids.contains(&id),
        )
    }

    /// What a round syncs for the secrets of its jobs `ids` (their `job.yaml` and journal
    /// lines have them redacted): each one's secrets file, and their directory once; none
    /// for jobs without secrets. `(path, is a directory)`.
    fn secrets_paths(&self, ids: impl Iterator<Item = JobId>) -> Vec<(PathBuf, bool)> {
        let mut paths: Vec<(PathBuf, bool)> = ids
            .filter(|id| self.has_secrets(*id))
            .map(|id| (self.spool.secrets_file(id), false))
            .collect();
        if !paths.is_empty() {
            paths.push((self.spool.private().join("secrets"), true));
        }
        paths
    }

    /// Appends `records` to the journal in one write and starts its fsync at once (it waits
    /// for no hand-over: it is mostly the device's wait), the round's eventfd to be counted
    /// when it is through. `None` without a journal or when the append fails (noted): those
    /// jobs' files are then synced as the round.
    fn journal_append(&mut self, records: &[crate::journal::Record]) -> Option<spool::SyncRound> {
        // The lines hold no secrets: their files are synced with the line.
        let secrets = self.secrets_paths(records.iter().map(|r| r.id));
        match self.journal.as_mut()?.append(records) {
            Ok(path) => {
                // Job ends appended to the same file before are made durable by this fsync:
                // theirs, waiting, is not needed (see [`Daemon::settle_records`]).
                self.lazy.forget(&path);
                let mut paths = vec![(path, false)];
                paths.extend(secrets);
                Some(spool::SyncRound::start_notify(
                    &durables(&paths),
                    notify_of(&self.round_ready),
                ))
            }
            Err(e) => {
                note!("admission journal: cannot append ({e}); the round syncs its jobs' files");
                None
            }
        }
    }

    /// The start gate for job `id`'s launch: a copy of the round's gate when the job's
    /// admission round is still running (the gate is made with the first such launch).
    fn gate_for(&mut self, id: JobId) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        let Some(round) = self.round.as_mut().filter(|r| r.ids.contains(&id)) else {
            return Ok(None);
        };
        if round.gate.is_none() {
            // Close-on-exec: the write end stays the daemon's alone (a launcher or any other
            // child holding it would keep a dead daemon's gates from closing).
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            round.gate = Some((r, w));
        }
        match &round.gate {
            Some((r, _)) => r.try_clone().map(Some),
            None => Ok(None),
        }
    }

    /// Fsyncs `paths` (true: a directory) in the background, nothing waiting for them: with
    /// the batch in flight if none is, else with the next one, which starts once the one in
    /// flight is through ([`Daemon::poll_lazy`]). A failure is only noted.
    fn lazy_sync(&mut self, paths: &[(PathBuf, bool)]) {
        let lazy = &mut self.lazy;
        for p in paths {
            if lazy.next_set.insert(p.0.clone()) {
                lazy.next.push(p.clone());
            }
        }
        if lazy.due.is_none() && !lazy.next.is_empty() {
            lazy.due = Some(std::time::Instant::now() + LAZY_DELAY);
        }
        self.poll_lazy();
    }

    /// When the event loop next has background syncs to start: the waiting paths' time
    /// ([`LAZY_DELAY`]) or the journal's next checkpoint, whichever comes first; `None`
    /// while a batch is in flight (its end wakes the loop) or nothing waits.
    fn lazy_due(&self) -> Option<std::time::Instant> {
        if self.lazy.inflight.is_some() {
            return None;
        }
        match (
            self.lazy.due,
            self.checkpoint_due(std::time::Instant::now()),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the journal's next checkpoint is due, it being `now` (see
    /// [`crate::journal::Journal::checkpoint_due`]), not before a failed one may be tried
    /// again.
    fn checkpoint_due(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        let due = self.journal.as_ref()?.checkpoint_due(now)?;
        Some(self.lazy.retry_checkpoint_at.map_or(due, |r| r.max(due)))
    }

    /// Takes the outcome of the background syncs in flight, if through (a checkpoint's
    /// sealed journal file is emptied), and starts the next batch: the journal's checkpoint
    /// when it is due (a `syncfs`, which makes the waiting paths durable too), else the
    /// waiting paths once their time has come.
    fn poll_lazy(&mut self) {
        if let Some((sync, sealed)) = self.lazy.inflight.as_mut() {
            let Some(result) = sync.try_wait() else {
                return;
            };
            let sealed = *sealed;
            self.lazy.inflight = None;
            self.lazy_through(result, sealed);
        }
        let now = std::time::Instant::now();
        if self.checkpoint_due(now).is_some_and(|t| t <= now) {
            self.lazy.retry_checkpoint_at = None;
            if let Some(sealed) = self.journal.as_mut().and_then(|j| j.seal()) {
                self.lazy.due = None;
                self.lazy.next.clear();
                self.lazy.next_set.clear();
                let root = self.spool.root().to_path_buf();
                self.lazy.inflight = Some((
                    spool::SyncRound::start_notify(
                        &[spool::Durable::Filesystem(&root)],
                        notify_of(&self.lazy_ready),
                    ),
                    Some(sealed),
                ));
                return;
            }
            if self
                .journal
                .as_ref()
                .is_some_and(|j| j.checkpoint_due(now).is_some())
            {
                // Records wait, but none can be sealed (the other file holds records start-up
                // could not restore): not again before the retry time.
                self.lazy.retry_checkpoint_at = Some(now + CHECKPOINT_RETRY);
            }
        }
        let due = self.lazy.due.is_some_and(|t| t <= now);
        if self.lazy.next.is_empty() || !(due || self.lazy.next.len() >= LAZY_BATCH_NOW) {
            return;
        }
        self.lazy.due = None;
        let paths = std::mem::take(&mut self.lazy.next);
        self.lazy.next_set.clear();
        self.lazy.inflight = Some((
            spool::SyncRound::start_notify(&durables(&paths), notify_of(&self.lazy_ready)),
            None,
        ));
    }

    /// A batch of background syncs is through: a checkpoint's sealed journal file is
    /// emptied; a failure keeps it (the checkpoint is tried again, and its records stay
    /// for start-up meanwhile).
    fn lazy_through(&mut self, result: spool::Result<()>, sealed: Option<usize>) {
        match (result, sealed) {
            (Ok(()), Some(part)) => {
                if let Some(journal) = self.journal.as_mut() {
                    journal.checkpointed(part);
                }
            }
            (Ok(()), None) => {}
            (Err(e), Some(_)) => {
                note!(
                    "journal checkpoint failed: {e} (the journal keeps its records; tried again)"
                );
                self.lazy.retry_checkpoint_at = Some(std::time::Instant::now() + CHECKPOINT_RETRY);
            }
            (Err(e), None) => note!("background fsync failed: {e}"),
        }
    }

    /// At shutdown: waits for the background syncs, makes the waiting ones now, and a last
    /// checkpoint of the journal.
    fn finish_lazy(&mut self) {
        if let Some((sync, sealed)) = self.lazy.inflight.take() {
            self.lazy_through(sync.wait(), sealed);
        }
        let paths = std::mem::take(&mut self.lazy.next);
        self.lazy.next_set.clear();
        self.lazy.due = None;
        let Some(journal) = self.journal.as_mut() else {
            if let Err(e) = spool::sync_all(&durables(&paths)) {
                note!("background fsync failed: {e}");
            }
            return;
        };
        if !journal.holds_records() {
            return;
        }
        match spool::sync_filesystem(self.spool.root()) {
            Ok(()) => {
                if let Err(e) = journal.clear() {
                    note!("journal: cannot empty it: {e}");
                }
            }
            Err(e) => {
                note!("journal checkpoint failed: {e} (its records are read at the next start)")
            }
        }
    }

    /// Waits for the admission round in flight, if any, then opens its gate: the jobs
    /// handed over meanwhile start. When the round failed, the gate closes unopened (their
    /// supervisors leave them untaken, and they come back to the queue) and each of its
    /// jobs fails instead of starting, with the reason: a job must not run when the spool
    /// cannot say it was ever submitted.
    fn finish_round(&mut self) {
        let Some(mut round) = self.round.take() else {
            return;
        };
        let result = match &mut round.sync {
            RoundSync::Unstaged => {
                // Not published: its gate closes unopened as the round is dropped.
                note!(
                    "jobs {:?}: launched but never published; not run",
                    round.ids
                );
                return;
            }
            RoundSync::Due(paths) => spool::SyncRound::start(&durables(paths)).wait(),
            RoundSync::Started(sync) => {
                let result = std::mem::take(sync).wait();
                self.reset_round_ready();
                result
            }
            RoundSync::Inline(sync) | RoundSync::Polled(sync) => std::mem::take(sync).wait(),
        };
        self.round_done(round, result);
    }

    /// Starts the round's fsyncs, if due (the batch's jobs are handed over by now), and
    /// sees it through: waited for now ([`Daemon::finish_round`]), or, with an eventfd to
    /// be woken through, taken by [`Daemon::poll_round`] once its last fsync is through,
    /// while the daemon goes on with other events. A lone submission on an idle queue is
    /// waited for in line: nothing else is to be done meanwhile, and the wake-up through
    /// the event loop costs its start ~0.1 ms. A round of many jobs, or one while other
    /// jobs run or more names wait, is polled: their ends and starts go on meanwhile, and
    /// the submissions that come in the meantime share the next round.
    fn settle_round(&mut self) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if matches!(round.sync, RoundSync::Due(_) | RoundSync::Started(_)) {
            let own = round
                .ids
                .iter()
                .filter(|id| self.sched.running_placement(**id).is_some())
                .count();
            let busy = round.ids.len() >= POLLED_ROUND_JOBS
                || self.sched.running_len() > own
                || !self.to_admit.is_empty();
            let notify = notify_of(&self.round_ready).filter(|_| busy);
            round.sync = match (
                std::mem::replace(&mut round.sync, RoundSync::Unstaged),
                notify,
            ) {
                (RoundSync::Started(sync), Some(_)) => RoundSync::Polled(sync),
                (RoundSync::Due(paths), Some(fd)) => {
                    RoundSync::Polled(spool::SyncRound::start_notify(&durables(&paths), Some(fd)))
                }
                (RoundSync::Due(paths), None) => {
                    RoundSync::Inline(spool::SyncRound::start(&durables(&paths)))
                }
                // Waited for in line (finish_round), its count on the eventfd taken then.
                (other, _) => other,
            };
        }
        match round.sync {
            RoundSync::Polled(_) => self.poll_round(),
            _ => self.finish_round(),
        }
    }

    /// Whether the round in flight is polled (see [`Daemon::settle_round`]).
    fn round_polled(&self) -> bool {
        matches!(
            self.round.as_ref().map(|r| &r.sync),
            Some(RoundSync::Polled(_))
        )
    }

    /// Takes back what a round waited for in line added to the eventfd (see
    /// [`RoundSync::Started`]), so that the next polled round is not woken for it.
    fn reset_round_ready(&self) {
        if let Some(fd) = &self.round_ready {
            let mut count = [0u8; 8];
            let _ = nix::unistd::read(&**fd.get_ref(), &mut count);
        }
    }

    /// Takes the outcome of a polled round, if it is through.
    fn poll_round(&mut self) {
        let Some(AdmissionRound {
            sync: RoundSync::Polled(sync),
            ..
        }) = self.round.as_mut()
        else {
            return;
        };
        let Some(result) = sync.try_wait() else {
            return;
        };
        if let Some(round) = self.round.take() {
            self.round_done(round, result);
        }
    }

    /// Opens a round's gate, or fails its jobs (see [`Daemon::finish_round`]).
    fn round_done(&mut self, round: AdmissionRound, result: spool::Result<()>) {
        // Its jobs may now be listed (see sync_view).
        self.dirty = true;
        match result {
            Ok(()) => {
                if let Some((_, w)) = &round.gate {
                    // Nobody reading (every supervisor gone already) is fine: nothing to open.
                    let _ = nix::unistd::write(w, &[1]);
                }
                drop(round.gate);
                self.lazy_sync(&round.later);
            }
            Err(e) => {
                let why = format!(
                    "the spool's disk could not make its submission durable ({e}); nothing of \
                     it ran; its job.yaml is kept here, submit it again once the disk is sound"
                );
                note!("admission round failed: {e}; jobs {:?} fail", round.ids);
                for id in round.ids {
                    if self.sched.dequeue(id) {
                        let _ = self.spool.append_log(id, &format!("skyspool: {why}"));
                        self.finish(id, Some(driver_lost(why.clone())));
                    } else if self.jobs.get(&id).is_some_and(|j| !j.status.is_terminal()) {
                        // Handed over already: it fails when it comes back untaken.
                        self.undurable.insert(id, why.clone());
                    }
                }
            }
        }
    }

    /// A submission written through the FUSE mount: validated and admitted (or rejected)
    /// at once, and answered, so the writer's `close()` can report the outcome.
    fn handle_submission(&mut self, sub: Submission) {
        let source = format!("incoming/{}", sub.name);
        let verdict = match self.validate(&source, &sub.yaml, sub.uid) {
            Err(reason) => {
                if let Err(e) = self.spool.reject_bytes(&sub.name, &sub.yaml, &reason) {
                    note!("{source}: could not record the rejection: {e}");
                }
                note!("rejected {source} (through the mount): {reason}");
                Err(reason)
            }
            Ok(adm) => {
                // IDs are given with no round in flight (see stage_and_publish).
                self.finish_round();
                // Its claim uses the prepared directory, if any, like any other.
                self.premade = None;
                let id = self.next_id;
                match self
                    .spool
                    .claim_bytes(&sub.name, &sub.yaml, sub.uid, sub.gid, id)
                {
                    Err(e) => Err(format!("{source}: could not be admitted: {e}")),
                    Ok(claimed) => {
                        self.next_id += 1;
                        self.admit_claimed_now(claimed, adm)
                    }
                }
            }
        };
        // The writer's close() returns with the job already visible in the mount.
        self.after_batch();
        let _ = sub.reply.send(verdict);
    }

    /// Stages and publishes one claimed submission without deferral: on failure it is
    /// dropped and the writer told why (they still hold their copy).
    fn admit_claimed_now(&mut self, claimed: Claimed, adm: Admission) -> Result<JobId, String> {
        let id = claimed.id;
        let dir = claimed.dir.clone();
        let fail = |d: &mut Daemon, e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            if d.next_id == id + 1 {
                d.next_id = id;
            }
            Err(format!("{}: could not be admitted: {e}", claimed.source))
        };
        let info = match self.stage(&claimed, &adm, None) {
            Ok(info) => info,
            Err(e) => return fail(self, format!("{e:#}")),
        };
        let synced = ["job.yaml", "info.json", "status"]
            .iter()
            .try_for_each(|f| spool::sync_file(&claimed.dir.join(f)))
            .and_then(|_| spool::sync_dir(&claimed.dir))
            .and_then(|_| spool::sync_dir(&self.spool.staging()))
            .and_then(|_| self.spool.record_last_id(id));
        if let Err(e) = synced {
            return fail(self, e.to_string());
        }
        if let Err(e) = self.spool.publish(&claimed) {
            return fail(self, e.to_string());
        }
        let _ = spool::sync_dir(&self.spool.jobs());
        let _ = spool::sync_dir(&self.spool.state_dir(State::Pending));
        note!(
            "job {id} ({}) admitted from {} (through the mount) for {}, needs {}",
            info.name,
            info.source,
            info.user,
            info.resources
        );
        self.jobs.insert(id, info);
        self.touched.insert(id);
        let _ = self.watcher.watch_job(id, &self.spool.job_dir(id));
        self.enqueue(id);
        self.dirty = true;
        Ok(id)
    }

    /// Gives a claimed submission back to `incoming/` (disk full, sync failed) and asks for
    /// a retry: it is admitted when space returns, never rejected for it or lost.
    fn defer(&mut self, claimed: &Claimed, why: &anyhow::Error) {
        if let Some(name) = claimed.content.file_name().and_then(|n| n.to_str()) {
            if let Some(orig) = name.strip_prefix(spool::CLAIM_PREFIX) {
                self.deferred.insert(OsString::from(orig));
            }
        }
        match self.spool.unclaim(claimed) {
            Ok(()) => note!(
                "{}: admission deferred ({why:#}); retrying shortly",
                claimed.source
            ),
            Err(e) => note!(
                "{}: admission deferred ({why:#}) but it could not be handed back ({e}); \
                 it stays staged and is admitted at the next start",
                claimed.source
            ),
        }
        self.retry_at = Some(std::time::Instant::now() + RETRY_INTERVAL);
    }

    /// Writes `job.yaml`, `status`, `log`, `info.json` (and secrets, privately) of a
    /// claimed submission inside its staging directory.
    /// `early`: the job was launched already (see [`Daemon::launch_early`]), which made its
    /// `.sky/` and `log`.
    fn stage(
        &mut self,
        c: &Claimed,
        adm: &Admission,
        early: Option<&JobInfo>,
    ) -> anyhow::Result<JobInfo> {
        let spec = &adm.spec;
        if early.is_none() {
            spool::make_private_dir(&c.dir)?;
        }
        spool::write_private(&c.dir, "job.yaml", &adm.job_yaml())?;
        if !spec.secrets.is_empty() {
            if let Some(ids) = self.secret_ids.as_mut() {
                ids.insert(c.id);
            }
            self.spool.write_secrets(c.id, &spec.secrets)?;
        }
        spool::write_private(&c.dir, "status", b"PENDING\n")?;
        if early.is_none() {
            // Empty, or (a prepared directory's) empty already; start-up empties the log of
            // a job it stages again.
            spool::open_log(&c.dir, "log")?;
        }
        let info = match early {
            Some(info) => info.clone(),
            None => self.job_info(c, adm),
        };
        if self.am_root && info.uid != 0 {
            // The owner must be able to create `cancel`; nobody else may write here.
            spool::grant_create(&c.dir, info.uid)?;
        }
        // Last: a staging directory with a readable info.json is complete.
        let mut bytes = serde_json::to_vec_pretty(&info)?;
        bytes.push(b'\n');
        spool::write_private(&c.dir, "info.json", &bytes)?;
        Ok(info)
    }

    /// A claimed job's record as admitted (PENDING, submitted now).
    fn job_info(&self, c: &Claimed, adm: &Admission) -> JobInfo {
        let spec = &adm.spec;
        let (uid, gid) = match self.root_jobs_as {
            Some(mapped) if c.uid == 0 => mapped,
            _ => (c.uid, c.gid),
        };
        let name = spec.name.clone().unwrap_or_else(|| default_name(&c.source));
        self.new_info(
            c.id,
            (uid, gid),
            name,
            c.source.clone(),
            c.has_workdir,
            spec,
        )
    }

    /// A job's record as admitted (PENDING, submitted now), run as `uid`/`gid`.
    fn new_info(
        &self,
        id: JobId,
        (uid, gid): (u32, u32),
        name: String,
        source: String,
        has_workdir: bool,
        spec: &JobSpec,
    ) -> JobInfo {
        let user = self.users.borrow_mut().get(uid, gid).name;
        JobInfo {
            id,
            name,
            user,
            uid,
            gid,
            status: Status::Pending,
            submitted: spool::now_rfc3339(),
            started: None,
            ended: None,
            resources: spec.resources_display(),
            demand: spec.demand(),
            num_nodes: spec.num_nodes,
            source,
            has_workdir,
            placement: vec![],
            exit_codes: vec![],
            reason: None,
        }
    }

    // ------------------------------------------------------------------ running

    /// Starts a placed job: records the launch, moves it to `running/`, spawns its supervisor.
    fn start(&mut self, id: JobId, placement: Placement) -> bool {
        let Err(e) = self.try_start(id, &placement) else {
            return true;
        };
        self.fail_start(id, &format!("{e:#}"));
        false
    }

    fn try_start(&mut self, id: JobId, placement: &Placement) -> anyhow::Result<()> {
        if let Some(why) = self.undurable.remove(&id) {
            anyhow::bail!("{why}");
        }
        let cached = self
            .fresh
            .take(id)
            .or_else(|| self.prestarts.get_mut(&id).and_then(|p| p.spec.take()));
        let spec = match cached {
            Some(spec) => spec,
            None => self.load_spec(id)?,
        };
        let info = self
            .jobs
            .get(&id)
            .cloned()
            .ok_or(spool::SpoolError::NoSuchJob(id))?;
        let assignments = self.assignments(placement);
        let plan = self.plan(&info, &spec, &assignments)?;
        // `.sky/` was made at admission, before the owner could write in the job directory;
        // never create or follow anything here that the owner could have planted.
        let private = self.spool.job_private(id);
        let meta = std::fs::symlink_metadata(&private).context("the job's .sky directory")?;
        if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
            anyhow::bail!("jobs/{id}/.sky is not the daemon's directory");
        }
        let (started, lock_path, lock) = launch_lock(&private, &assignments)?;
        // The job goes first; the records follow while it starts on another core. From here
        // only the supervisor writes `status`; a daemon that dies before `info.json` says
        // RUNNING finds the placement in the launch record. The launcher's answer (the
        // supervisor's pid) is not awaited: it comes through the event loop (`launched`).
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        let answered = match self.confirm_prestart(id, &assignments, &json, &lock) {
            Some(answered) => answered,
            None => {
                let gate = self.gate_for(id).context("making the job's start gate")?;
                self.hand_off(id, json, lock, gate, None, lock_path)
                    .context("handing the job to its supervisor")?
            }
        };
        self.record_start(info, &spec, started, assignments, answered);
        Ok(())
    }

    /// Records a job handed to its supervisor: `info.json` (started, placement, and the status
    /// its supervisor writes first: SETTING_UP or RUNNING, which `status` says only once the
    /// supervisor has written it), its link moved to `running/`, the daemon's view; the
    /// supervisor's pid if already known.
    fn record_start(
        &mut self,
        mut info: JobInfo,
        spec: &JobSpec,
        started: String,
        assignments: Vec<NodeAssignment>,
        answered: Option<u32>,
    ) {
        let id = info.id;
        self.quiet = Some((std::time::Instant::now() + QUIET_AFTER_START, id));
        info.status = if spec.setup.as_deref().is_some_and(|s| !s.trim().is_empty()) {
            Status::SettingUp
        } else {
            Status::Running
        };
        info.started = Some(started);
        info.placement = assignments;
        // The job runs now whatever happens below: a failure here must not fail the start.
        if let Err(e) = self.spool.write_info(&info) {
            note!("job {id}: could not record its start in info.json: {e}");
        }
        if let Err(e) = self.spool.move_state(id, State::Pending, State::Running) {
            note!("job {id}: could not move it to running/: {e}");
        }
        self.jobs.insert(id, info);
        self.touched.insert(id);
        self.dirty = true;
        if let Some(pid) = answered {
            self.launched(id, pid);
        }
    }

    /// Job `id`'s spec, read from its `job.yaml` and secrets.
    fn load_spec(&self, id: JobId) -> anyhow::Result<JobSpec> {
        let dir = self.spool.job_dir(id);
        let yaml = std::fs::read_to_string(dir.join("job.yaml")).context("reading job.yaml")?;
        let secrets = self.spool.read_secrets(id);
        let mut spec = spec::parse(&yaml, &format!("jobs/{id}/job.yaml"), &secrets)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Its `job.yaml` holds its secrets redacted: without their file (removed, or lost
        // with a disk) the job would run with `<redacted>` for them.
        let missing: Vec<&str> = spec
            .secrets
            .keys()
            .filter(|k| !secrets.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "its secrets file (.skyspool/secrets/{id}.json) is missing or unreadable, so \
                 {} would be `{}`: not run; submit the job again",
                missing.join(", "),
                spec::REDACTED
            );
        }
        spec.secrets.extend(secrets);
        Ok(spec)
    }

    /// Starts queued jobs ahead of their placement, while every slot they could take is
    /// busy: each gets a supervisor that starts its first phase's bash as its user, held at
    /// the script's first line (exec, loading and bash's own start-up are done), and waits
    /// for the job's real launch (see [`executor::send_launch`] in [`Daemon::try_start`]).
    /// A freed slot then costs the next job only the hand-over. The oldest queued one-node
    /// jobs that fit the machine's own node (when it is the only local one) and have waited
    /// [`PRESTART_AFTER`] are taken (among the oldest 256), at most one per running job
    /// (each end frees one slot, at most) and at most `max_prestarts`. A job placed
    /// elsewhere, cancelled, or still queued when the daemon exits loses its prestart: its
    /// bash is killed unrun.
    fn prestart_more(&mut self) {
        let sched = &self.sched;
        self.prestarts.retain(|id, _| sched.is_pending(*id));
        self.prestart_at = None;
        let want = self.max_prestarts.min(self.sched.running_len());
        if self.prestarts.len() >= want {
            return;
        }
        let Some((index, name, addr)) = self.lone_local_node() else {
            return;
        };
        let round = self.round.as_ref().map(|r| &r.ids);
        // Each with the grant it would get on the node (its GPUs are chosen at its start);
        // only jobs that have waited PRESTART_AFTER (the next such time is woken for).
        let ripe_before = now_ms().saturating_sub(PRESTART_AFTER.as_millis() as u64);
        let mut next_ripe: Option<u64> = None;
        let picked: Vec<(JobId, NodeGrant)> = self
            .sched
            .pending_ids()
            .take(256)
            .filter(|id| {
                !self.prestarts.contains_key(id)
                    && !self.undurable.contains_key(id)
                    && !round.is_some_and(|r| r.contains(id))
            })
            .filter_map(|id| {
                let d = self.sched.pending_demand(id)?;
                let grant = self.sched.fit_when_empty(index, d)?;
                let since = self.sched.waiting_since(id).unwrap_or(0);
                if since > ripe_before {
                    next_ripe = Some(next_ripe.map_or(since, |n| n.min(since)));
                    return None;
                }
                Some((id, grant))
            })
            .take(want - self.prestarts.len())
            .collect();
        if picked.len() < want - self.prestarts.len() {
            if let Some(since) = next_ripe {
                let wait = (since + PRESTART_AFTER.as_millis() as u64).saturating_sub(now_ms());
                self.prestart_at =
                    Some(std::time::Instant::now() + Duration::from_millis(wait.max(1)));
            }
        }
        for (id, grant) in picked {
            let tentative = NodeAssignment {
                rank: 0,
                node: name.clone(),
                ip: addr.clone(),
                accelerator: grant.accelerator,
                gpus: vec![],
                gpu_shares: vec![],
                cpus: grant.cpus.to_string(),
            };
            if let Err(e) = self.prestart(id, &tentative) {
                note!("job {id}: could not start it ahead: {e:#}");
            }
        }
    }

    /// Hands job `id` to a supervisor as a prestart on `node` (see [`Daemon::prestart_more`]).
    fn prestart(&mut self, id: JobId, node: &NodeAssignment) -> anyhow::Result<()> {
        let spec = match self.fresh.take(id) {
            Some(spec) => spec,
            None => self.load_spec(id)?,
        };
        let info = self.jobs.get(&id).ok_or(spool::SpoolError::NoSuchJob(id))?;
        let plan = self.plan(info, &spec, std::slice::from_ref(node))?;
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        let lock_path = self.spool.job_private(id).join("supervisor.lock");
        let ours = self.send_prestart(id, json, None, lock_path)?;
        note!(
            "job {id} started ahead on {}: its bash waits at its first line for a slot",
            node.node
        );
        self.prestarts.insert(
            id,
            Prestart {
                gate: ours,
                node: node.node.clone(),
                pid: None,
                spec: Some(spec),
            },
        );
        Ok(())
    }

    /// Sends a prestart's tentative `plan` (and the job's `log`, for a job not published
    /// yet) to the launcher with one end of a new gate; returns the other, which its real
    /// launch goes through (see [`Daemon::confirm`]).
    fn send_prestart(
        &mut self,
        id: JobId,
        plan: Vec<u8>,
        log: Option<std::os::fd::OwnedFd>,
        lock_path: PathBuf,
    ) -> anyhow::Result<std::os::unix::net::UnixStream> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().context("making the job's gate")?;
        let mut l = Launching {
            id,
            plan,
            lock: None,
            gate: Some(theirs.into()),
            log,
            lock_path,
            sent: std::time::Instant::now(),
            confirmed: None,
        };
        if let Err(e) = self.send_to_launcher(&l) {
            // Like any failed hand-over: this launcher is done for (the next gets a new one).
            if self.launcher.is_some() {
                self.launcher_lost(&format!("{e}"));
            }
            return Err(e).context("handing it to a supervisor");
        }
        // Its supervisor's ends are the launcher's now: the daemon's copies would hide that
        // gate end's closing (see `launcher_lost`).
        l.gate = None;
        l.log = None;
        self.launching.push_back(l);
        Ok(ours)
    }

    /// Gives a prestarted job its launch (`plan`, `lock`) through its gate, when it was
    /// started where it is placed (`assignments`). `None`: it was not prestarted, or not
    /// there, or its supervisor is gone (its prestart goes: the gate closes, its bash dies
    /// unrun); the caller hands it over like any other job. `Some(pid)`: its supervisor
    /// has it; `Some(None)`: the launcher has not said which supervisor that is yet, its
    /// launch then stays in `launching` as an ordinary one (answered or, if the launcher is
    /// lost, settled by [`Daemon::launcher_lost`]).
    fn confirm_prestart(
        &mut self,
        id: JobId,
        assignments: &[NodeAssignment],
        plan: &[u8],
        lock: &std::os::fd::OwnedFd,
    ) -> Option<Option<u32>> {
        let p = self.prestarts.remove(&id)?;
        self.confirm(p, id, assignments, plan, lock, None)
    }

    /// Gives the job of prestart `p` its launch through its gate (see
    /// [`Daemon::confirm_prestart`]); `gate`: the job's start gate, for a job launched
    /// before its admission is durable (a speculative prestart's).
    fn confirm(
        &mut self,
        p: Prestart,
        id: JobId,
        assignments: &[NodeAssignment],
        plan: &[u8],
        lock: &std::os::fd::OwnedFd,
        gate: Option<&std::os::fd::OwnedFd>,
    ) -> Option<Option<u32>> {
        if !matches!(assignments, [a] if a.node == p.node) {
            return None;
        }
        let waiting = match p.pid {
            Some(_) => None,
            None => Some(
                self.launching
                    .iter()
                    .position(|l| l.id == id && l.is_prestart())?,
            ),
        };
        // The daemon keeps a copy of the lock while the launch is unanswered (as for any
        // launch: see `launcher_lost`).
        let kept = match waiting {
            Some(_) => Some(lock.try_clone().ok()?),
            None => None,
        };
        if let Err(e) = executor::send_launch(&p.gate, plan, Some(lock), gate, None) {
            note!("job {id}: its prestart is gone ({e}); launching it afresh");
            return None;
        }
        if let Some(l) = waiting.and_then(|i| self.launching.get_mut(i)) {
            l.plan = plan.to_vec();
            l.lock = kept;
            l.confirmed = Some(p.gate);
        }
        Some(p.pid)
    }

    /// Sends a launch to the launcher (a new one when there is none, or when sending fails:
    /// the old one is then lost, see [`Daemon::launcher_lost`]). `Some(pid)` when a
    /// supervisor is known to have the job already; otherwise its pid comes later as
    /// [`Msg::Launched`].
    fn hand_off(
        &mut self,
        id: JobId,
        plan: Vec<u8>,
        lock: std::os::fd::OwnedFd,
        gate: Option<std::os::fd::OwnedFd>,
        log: Option<std::os::fd::OwnedFd>,
        lock_path: PathBuf,
    ) -> std::io::Result<Option<u32>> {
        let l = Launching {
            id,
            plan,
            lock: Some(lock),
            gate,
            log,
            lock_path,
            sent: std::time::Instant::now(),
            confirmed: None,
        };
        let mut last_error = None;
        for _ in 0..2 {
            match self.send_to_launcher(&l) {
                Ok(()) => {
                    self.launching.push_back(l);
                    return Ok(None);
                }
                // Not even a launcher could be started.
                Err(e) if self.launcher.is_none() => return Err(e),
                Err(e) => {
                    self.launcher_lost(&format!("{e}"));
                    // A supervisor may have got the job before the failure: it then holds
                    // the lock file open. Launching again would run the job twice.
                    if let Some(pid) = executor::flock_holder(&l.lock_path) {
                        return Ok(Some(pid));
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no launcher")))
    }

    /// Sends `l` to the launcher, starting one first when there is none.
    fn send_to_launcher(&mut self, l: &Launching) -> std::io::Result<()> {
        if self.launcher.is_none() {
            self.new_launcher()?;
        }
        match self.launcher.as_mut() {
            Some(launcher) => {
                launcher.send(&l.plan, l.lock.as_ref(), l.gate.as_ref(), l.log.as_ref())
            }
            None => Err(std::io::Error::other("no launcher")),
        }
    }

    /// Starts a launcher (the next generation) and the reader of its answers.
    fn new_launcher(&mut self) -> std::io::Result<()> {
        let mut launcher = executor::spawn_launcher(&self.exe, self.spool.root())?;
        self.launcher_gen += 1;
        match launcher.take_answers() {
            Some(fd) => read_answers(fd, self.launcher_gen, self.tx.clone()),
            None => return Err(std::io::Error::other("the launcher has no answer pipe")),
        }
        self.launcher = Some(launcher);
        Ok(())
    }

    /// Closes the launcher's socket and waits (up to 2 s, then kills it) for it to exit: every
    /// supervisor then finds its own socket to the launcher closed (see
    /// [`executor::supervise_main`]).
    fn close_launcher(&mut self) {
        let Some(launcher) = self.launcher.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(launcher.pid as i32);
        drop(launcher);
        if !reap_within(pid, Duration::from_secs(2)) {
            note!("launcher pid {pid} did not exit when its socket closed; killing it");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            reap_within(pid, Duration::from_secs(2));
        }
    }

    /// The launcher failed (killed by someone, or it stopped taking launches): it is made
    /// sure to be gone, and each launch it had not answered is settled: a supervisor that
    /// holds the job's lock has it; any other goes to a new launcher (or fails to start).
    fn launcher_lost(&mut self, why: &str) {
        if let Some(old) = self.launcher.take() {
            let pid = nix::unistd::Pid::from_raw(old.pid as i32);
            note!("launcher pid {} failed ({why}); starting another", old.pid);
            // It may hold locks of launches it had read: it must be gone before the locks'
            // holders are looked for. Its running supervisors live in sessions of their own.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            reap_within(pid, Duration::from_secs(2));
        }
        for mut l in std::mem::take(&mut self.launching) {
            if !self.jobs.contains_key(&l.id) {
                // An early launch whose job could not be staged (see
                // [`Daemon::launch_early`]): its gate is closed, nothing of it may run.
                continue;
            }
            if l.is_prestart() {
                // A prestart: given up (its supervisor, if any, is told by its gate).
                self.prestarts.remove(&l.id);
                continue;
            }
            if let Some(gate) = l.confirmed.take() {
                // A prestart confirmed through its gate: a supervisor may have it, or still
                // read it, unseen yet. It is launched again only once nobody can.
                match executor::await_gate_reader(&gate, &l.lock_path, Duration::from_secs(5)) {
                    executor::GateReader::Holder(pid) => {
                        self.launched(l.id, pid);
                        continue;
                    }
                    executor::GateReader::Gone => {
                        if let Some(rec) = self.spool.read_supervisor(l.id) {
                            // Taken, and over already.
                            self.launched(l.id, rec.pid);
                            continue;
                        }
                    }
                    executor::GateReader::Unknown => {
                        self.fail_start(
                            l.id,
                            "its launcher was lost while a supervisor may still have held its launch",
                        );
                        continue;
                    }
                }
            }
            if let Some(pid) = executor::flock_holder(&l.lock_path) {
                self.launched(l.id, pid);
                continue;
            }
            match self.send_to_launcher(&l) {
                Ok(()) => self.launching.push_back(Launching {
                    sent: std::time::Instant::now(),
                    ..l
                }),
                Err(e) => self.fail_start(l.id, &format!("handing the job to its supervisor: {e}")),
            }
        }
    }

    /// The launcher answered job `id`'s launch: `pid` supervises it (0: none could be made).
    fn launched(&mut self, id: JobId, pid: u32) {
        if pid == 0 {
            self.fail_start(id, "the launcher could not fork a supervisor");
            return;
        }
        if self.jobs.get(&id).is_none_or(|j| j.status.is_terminal()) {
            // It ended (its final status came first) or was settled meanwhile.
            return;
        }
        self.watch_supervisor(id, pid);
        note!(
            "job {id} started (supervisor pid {pid}) on {}",
            self.jobs
                .get(&id)
                .map(|i| i
                    .placement
                    .iter()
                    .map(|a| format!("{} gpus {:?}", a.node, a.gpus))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
        // What happened before its pid was known: the final status, a cancel.
        self.refresh_status(id);
        self.handle_cancel(id);
    }

    /// A job that was placed could not be started: FAILED_DRIVER, with the reason.
    fn fail_start(&mut self, id: JobId, reason: &str) {
        note!("job {id}: could not start: {reason}");
        let _ = self
            .spool
            .append_log(id, &format!("skyspool: could not start the job: {reason}"));
        self.finish(id, Some(driver_lost(format!("could not start: {reason}"))));
    }

    /// Keeps a launcher ready for the next job (see [`executor::Launcher`]).
    fn ensure_launcher(&mut self) {
        if self.launcher.is_some() {
            return;
        }
        if let Err(e) = self.new_launcher() {
            note!("could not start the launcher: {e}");
        }
    }

    fn assignments(&self, placement: &Placement) -> Vec<NodeAssignment> {
        placement
            .nodes
            .iter()
            .enumerate()
            .map(|(rank, g)| {
                let node = self.inventory.nodes.get(g.node);
                NodeAssignment {
                    rank: rank as u32,
                    node: node.map(|n| n.name.clone()).unwrap_or_default(),
                    ip: node.map(|n| n.addr.clone()).unwrap_or_default(),
                    accelerator: g.accelerator.clone(),
                    gpus: g.gpus.iter().map(|x| x.index).collect(),
                    gpu_shares: g.gpus.iter().map(|x| x.share.to_string()).collect(),
                    cpus: g.cpus.to_string(),
                }
            })
            .collect()
    }

    /// Builds the supervisor's plan: user, cwd, and SkyPilot's environment.
    fn plan(
        &self,
        info: &JobInfo,
        spec: &JobSpec,
        nodes: &[NodeAssignment],
    ) -> anyhow::Result<LaunchPlan> {
        let user = self.users.borrow_mut().get(info.uid, info.gid);
        let mut notes = Vec::new();
        let job_dir = self.spool.job_dir(info.id);
        let cwd = if info.has_workdir {
            job_dir.join("workdir")
        } else {
            match spec.workdir.as_deref() {
                Some(w) => {
                    let expanded = if let Some(rest) = w.strip_prefix("~/") {
                        user.home.join(rest)
                    } else if w == "~" {
                        user.home.clone()
                    } else {
                        PathBuf::from(w)
                    };
                    if expanded.is_absolute() && expanded.is_dir() {
                        expanded
                    } else {
                        notes.push(format!(
                            "skyspool: workdir '{w}' was not submitted with the job; running in {} \
                             (submit a directory holding job.yaml and the files, or use `skyspool submit`)",
                            user.home.display()
                        ));
                        user.home.clone()
                    }
                }
                None => user.home.clone(),
            }
        };
        let cluster = &self.inventory.cluster_name;
        let task_id = task_id(info, cluster);
        let cluster_info = serde_json::json!({
            "cluster_name": cluster,
            "cloud": "Local",
            "region": null,
            "zone": null,
        });
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.extend(spec.envs.clone());
        env.extend(spec.secrets.clone());
        env.insert("SKYPILOT_TASK_ID".into(), task_id);
        env.insert("SKYPILOT_CLUSTER_INFO".into(), cluster_info.to_string());
        env.insert("SKYPILOT_USER".into(), info.user.clone());
        env.insert("SKYPILOT_NUM_NODES".into(), nodes.len().to_string());
        let gpus_per_node =
            per_node_gpus(spec, nodes.first().and_then(|n| n.accelerator.as_deref()));
        let mut setup_env = BTreeMap::new();
        let all_ips: Vec<String> = self
            .inventory
            .nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect();
        setup_env.insert("SKYPILOT_SETUP_NODE_IPS".into(), all_ips.join("\n"));
        setup_env.insert(
            "SKYPILOT_SETUP_NUM_GPUS_PER_NODE".into(),
            gpus_per_node.to_string(),
        );
        let mut run_env = BTreeMap::new();
        let job_ips: Vec<String> = nodes.iter().map(|n| n.ip.clone()).collect();
        run_env.insert("SKYPILOT_NODE_IPS".into(), job_ips.join("\n"));
        let launches = nodes
            .iter()
            .map(|a| {
                let node = self.inventory.nodes.iter().find(|n| n.name == a.node);
                NodeLaunch {
                    rank: a.rank,
                    name: a.node.clone(),
                    ip: a.ip.clone(),
                    local: node.map(|n| n.local).unwrap_or(true),
                    gpus: a.gpus.clone(),
                    ssh: node.and_then(|n| SshTarget::of(n, &self.ssh_dir())),
                }
            })
            .collect();
        Ok(LaunchPlan {
            job_id: info.id,
            spool: self.spool.root().to_path_buf(),
            tag: executor::job_tag(&self.spool_id, info.id),
            user,
            setup: spec.setup.clone(),
            run: spec.run.clone(),
            cwd,
            workdir: info.has_workdir.then(|| job_dir.join("workdir")),
            notes,
            env,
            setup_env,
            run_env,
            nodes: launches,
            num_gpus_per_node: gpus_per_node,
            kill_grace_ms: self.kill_grace.as_millis() as u64,
            journaling_daemon: self.journal.as_ref().and(self.me),
            speculative: false,
        })
    }

    /// Checks remote nodes every [`HEALTH_INTERVAL`] (blocking ssh calls run off the event
    /// loop); nothing runs when every node is local.
    fn start_health_checks(&self) {
        let targets: Vec<(usize, SshTarget)> = self
            .inventory
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| SshTarget::of(n, &self.ssh_dir()).map(|t| (i, t)))
            .collect();
        if targets.is_empty() {
            return;
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                for (i, t) in &targets {
                    let t = t.clone();
                    let i = *i;
                    let tx = tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let down = t.run("true", Duration::from_secs(15)).err();
                        let _ = tx.send(Msg::NodeHealth(
                            i,
                            down.map(|e| format!("unreachable: {e}")),
                        ));
                    });
                }
            }
        });
    }

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

    /// Watches a supervisor's pidfd; its exit comes back as a message. The daemon keeps a
    /// duplicate of the pidfd to signal it, so a recycled pid can never be hit.
    fn watch_supervisor(&mut self, id: JobId, pid: u32) {
        let tx = self.tx.clone();
        let fd = executor::pidfd_open(pid);
        let kept = fd.as_ref().ok().and_then(|f| f.try_clone().ok());
        let watch = match fd {
            Ok(fd) => Some(
                tokio::spawn(async move {
                    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd; it stays open until dropped.
                    if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(fd) } {
                        let _ = afd.readable().await;
                    }
                    let _ = tx.send(Msg::SupervisorExited(id, pid));
                })
                .abort_handle(),
            ),
            Err(_) => {
                // Already gone.
                let _ = tx.send(Msg::SupervisorExited(id, pid));
                None
            }
        };
        self.supervisors.insert(
            id,
            Supervisor {
                pid,
                pidfd: kept,
                watch,
            },
        );
    }

    /// Settles a job that was running: final status, record, `done/`, resources freed.
    fn finish(&mut self, id: JobId, result: Option<JobResult>) {
        self.prestarts.remove(&id);
        self.fresh.take(id);
        let pid = self.supervisors.remove(&id).map(|s| s.pid);
        self.untaken.remove(&id);
        // A supervisor that could not record its result (disk full) still rewrote `status`
        // in place: trust a final word there.
        let result = result.or_else(|| {
            let status = self.spool.read_status(id).ok().filter(|s| s.is_terminal())?;
            Some(JobResult {
                status,
                exit_codes: vec![],
                ended: spool::now_rfc3339(),
                reason: Some(
                    "the supervisor could not record its result (disk full?); status as it last wrote it"
                        .into(),
                ),
            })
        });
        let result = result.unwrap_or_else(|| {
            driver_lost(format!(
                "the job's supervisor{} exited without recording a result",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ))
        });
        if result.status == Status::FailedDriver {
            // The supervisor is gone: stop whatever of the job still runs before its GPUs
            // are given to anyone else.
            if let Some(info) = self.jobs.get(&id) {
                let tag = executor::job_tag(&self.spool_id, id);
                let killed = executor::kill_tagged_processes(&tag);
                if killed > 0 {
                    note!("job {id}: killed {killed} process(es) left by its lost supervisor");
                }
                let ssh_dir = self.ssh_dir();
                for a in &info.placement {
                    if let Some(node) = self.inventory.nodes.iter().find(|n| n.name == a.node) {
                        if let Some(t) = SshTarget::of(node, &ssh_dir) {
                            executor::kill_remote_rank(&t, &tag, a.rank);
                        }
                    }
                }
            }
            let _ = self.spool.append_log(
                id,
                &format!(
                    "skyspool: FAILED_DRIVER: {}",
                    result.reason.as_deref().unwrap_or("driver lost")
                ),
            );
        }
        self.touched.insert(id);
        if let Some(info) = self.jobs.get_mut(&id) {
            info.status = result.status;
            info.ended = Some(result.ended.clone());
            info.exit_codes = result.exit_codes.clone();
            info.reason = result.reason.clone();
        }
        self.sched.release(id);
        self.dirty = true;
        note!("job {id} ended {}", result.status);
        // Its records are written after this batch's starts: a freed slot is given to the
        // next job first. (A daemon killed in between finds the supervisor's result and
        // settles the job again at start-up.)
        self.settling.push(id);
    }

    /// Writes the records of the jobs that ended ([`Daemon::finish`], or cancelled while
    /// pending): final `status` (where the supervisor did not), `info.json`, the link moved
    /// to `done/`; then their final records go to the journal, in one write, whose fsync
    /// starts a few milliseconds later (or goes with the next round's): a power cut after
    /// it cannot make a finished job run again (see [`crate::journal`]).
    fn settle_records(&mut self) {
        let settled = std::mem::take(&mut self.settling);
        if !settled.is_empty() {
            // A slot may be free now for a bash started ahead.
            self.speculated_for = None;
            self.settled_end = true;
        }
        for &id in &settled {
            let Some(info) = self.jobs.get(&id) else {
                continue;
            };
            let on_disk = self
                .final_seen
                .remove(&id)
                .or_else(|| self.spool.read_status(id).ok());
            if on_disk != Some(info.status) {
                let _ = self.spool.write_status(id, info.status);
            }
            let _ = self.spool.write_info(info);
            self.spool.trim_spares(id);
            let _ = self.spool.move_to_done(id);
            self.watcher.unwatch_job(id);
            if self.secret_ids.as_mut().is_none_or(|ids| ids.remove(&id)) {
                self.spool.remove_secrets(id);
            }
        }
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        let ends: Vec<&JobInfo> = settled.iter().filter_map(|id| self.jobs.get(id)).collect();
        if ends.is_empty() {
            return;
        }
        match journal.append_ends(&ends) {
            Ok(path) => self.lazy_sync(&[(path, false)]),
            Err(e) => note!("journal: cannot record the end of jobs {settled:?}: {e}"),
        }
    }

    // ------------------------------------------------------------------ cancel

    /// Acts on `jobs/<id>/cancel` if present: the owner's (or root's) request cancels the
    /// job; anyone else's is removed and recorded in the job's log.
    fn handle_cancel(&mut self, id: JobId) {
        let Some(meta) = self.spool.cancel_requested(id) else {
            return;
        };
        let Some(info) = self.jobs.get(&id) else {
            return;
        };
        if info.status.is_terminal() {
            return;
        }
        let by = meta.uid();
        if by != info.uid && by != 0 && by != nix::unistd::geteuid().as_raw() {
            self.spool.clear_cancel(id);
            let _ = self.spool.append_log(
                id,
                &format!(
                    "skyspool: refused a cancel request from uid {by}: only the job's owner ({}) or root may cancel it",
                    info.user
                ),
            );
            note!("job {id}: refused cancel from uid {by}");
            return;
        }
        if self.sched.dequeue(id) {
            let _ = self
                .spool
                .append_log(id, "skyspool: cancelled before it started");
            self.finish_pending_cancel(id);
        } else if let Some(sup) = self.supervisors.get(&id) {
            note!("job {id}: cancelling (SIGTERM to supervisor {})", sup.pid);
            sup.terminate();
        }
    }

    fn finish_pending_cancel(&mut self, id: JobId) {
        self.prestarts.remove(&id);
        self.touched.insert(id);
        if let Some(info) = self.jobs.get_mut(&id) {
            info.status = Status::Cancelled;
            info.ended = Some(spool::now_rfc3339());
            info.reason = Some("cancelled while pending".into());
        }
        self.dirty = true;
        note!("job {id} cancelled while pending");
        // `status`, `info.json` and the move to `done/` are written like any ended job's.
        self.settling.push(id);
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
