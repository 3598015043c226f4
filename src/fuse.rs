//! The mounted spool (`skyspool serve --mount DIR`): a FUSE view of the spool where
//! status, queue and nodes are generated from the daemon's state on read, logs stream, and
//! submissions are validated when the writer closes the file.
//!
//! The spool on disk stays the single source of truth: the mount keeps nothing that matters
//! in memory except files being written and the short-lived receipts of submissions.
//!
//! ```text
//! MNT/incoming/          write NAME.yaml: close() answers only once the daemon has admitted
//!                        it (0; NAME.yaml then reads `job <id>`) or rejected it (EINVAL;
//!                        NAME.yaml.reason says why, and rejected/ keeps the file)
//! MNT/jobs/<id>/         job.yaml, status, info.json, log, log.rank<N>, stream, cancel
//! MNT/pending/<id>       -> ../jobs/<id>   (symlinks, as on disk; the state comes from the
//! MNT/running/<id>                          daemon's records, like `status`)
//! MNT/done/<id>
//! MNT/rejected/          the spool's rejected/, read-only
//! MNT/queue, MNT/nodes   generated on every open, always current
//! ```
//!
//! Behaviour, file by file:
//!
//! - `status`, `info.json`, `queue` (absolute times, like the file on disk) and `nodes` are
//!   generated from the daemon's [`View`] on open (and on `stat`, so the size `ls -l` shows is
//!   what `cat` returns). Reading them writes nothing to disk.
//! - `job.yaml`, `log` and `log.rank<N>` are read from `jobs/<id>/` (never following links).
//!   `log` is opened with direct I/O and its size is the size on disk at every `stat`, so
//!   `tail -f` follows it.
//! - `stream` is the log, except that a read at its end waits until there is more or the job
//!   is over (then EOF): `cat MNT/jobs/5/stream` prints the whole output and returns when
//!   the job ends, like `skyspool logs 5`. Waiting reads do not hold a FUSE thread (see
//!   `stream.rs`).
//! - `cancel`: creating it (`touch`), or touching it when it exists, creates the on-disk
//!   `jobs/<id>/cancel` owned by the requester, which the daemon acts on. Only the job's
//!   owner, root or the daemon's user may (others: EACCES), and only before the job ended.
//! - Every other write fails: EACCES for the files and directories of the view (status, log,
//!   queue, ..., mkdir/unlink/rename outside `incoming/`), EPERM for mkdir, symlinks, links
//!   and device nodes in `incoming/`. `jobs/<id>/workdir/` and `.sky/` are not shown (read
//!   them in the spool itself).
//! - Owners and times: a job's directory and files belong to the job's user; the directory
//!   and `job.yaml` carry the submission time, `status`/`info.json`/the state links the time
//!   of the last transition, logs their on-disk times.
//!
//! `incoming/` through the mount:
//!
//! - A name `NAME.yaml`/`NAME.yml` is submitted when a process that wrote it closes it
//!   (flush), or when a held file is renamed to it. Content is buffered in memory (at most
//!   1 MiB: EFBIG beyond). The submitter is the file's owner: its creator (or whom root
//!   chowned it to). An empty file is not submitted (it waits for data), nor is a close by
//!   a process that did not write it (a forked child closing an inherited descriptor);
//!   whatever is still unsubmitted when the last descriptor goes is submitted then.
//! - Dot-files (rsync's `.NAME.XXXXXX`), `~` backups, swap and `.tmp`/`.part` files are held
//!   in memory, never submitted under that name; `rename(.NAME.XXXXXX, NAME.yaml)` submits and
//!   fails with EINVAL when the job is rejected (how rsync reports it).
//! - After an admission, `NAME.yaml` reads `job <id>` (a read-only receipt) for 10 minutes;
//!   after a rejection, `NAME.yaml` is gone and `NAME.yaml.reason` holds the reason (the
//!   daemon also keeps the file and its reason in `rejected/`). Writing `NAME.yaml` again
//!   (cp, scp, an editor) replaces the receipt with a new submission.
//! - Other names (wrong extension, control characters, invalid UTF-8) are refused with
//!   EINVAL at create; `NAME.reason` explains when the name is printable. Directories cannot
//!   be submitted through the mount (mkdir: EPERM): move them into the spool's own
//!   `incoming/`. Files dropped there are listed here too until the daemon takes them.
//!
//! Mount options: `fsname=skyspool`, `subtype=skyspool`, `allow_other`, `nosuid`, `nodev`; no
//! `default_permissions` (the handlers check who asks). Unmounting is lazy (`MNT_DETACH`);
//! a daemon that was killed leaves a dead mount (ENOTCONN) that [`clean_stale_mount`] clears.

mod fs;
mod incoming;
mod node;
mod stream;

use crate::spool::Spool;
use crate::view::{Submitter, View};
use anyhow::Context;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// FUSE threads: enough that slow requests (a `getattr` on a busy disk) never block
/// everything; reads that wait (`stream`) do not hold one.
const FUSE_THREADS: usize = 8;

/// A rendering of the `nodes` file and the snapshot it was made from.
type NodesText = (Arc<crate::view::NodesSnapshot>, Arc<Vec<u8>>);

/// Everything the handlers and the helper threads share.
pub(crate) struct Shared {
    spool: Spool,
    view: Arc<View>,
    submitter: Submitter,
    /// The daemon's user: owner of the view's own directories and files.
    uid: u32,
    gid: u32,
    started: SystemTime,
    dyns: Mutex<node::DynTable>,
    incoming: Mutex<incoming::Incoming>,
    handles: Mutex<HashMap<u64, fs::Handle>>,
    next_fh: AtomicU64,
    streams: stream::Streams,
    shutdown: AtomicBool,
    /// When the view last changed (the time of `queue`, `nodes` and the state directories).
    changed_at: Mutex<SystemTime>,
    queue_cache: Mutex<Option<(u64, Arc<Vec<u8>>)>>,
    /// The `nodes` text and the snapshot it was rendered from.
    nodes_cache: Mutex<Option<NodesText>>,
    /// A condition told each time a write handle of an `incoming/` file is released (see
    /// [`Shared::wait_closed`]).
    releases: (Mutex<()>, std::sync::Condvar),
}

/// A live mount; unmounted by [`FuseMount::unmount`] (or when dropped).
pub struct FuseMount {
    mountpoint: PathBuf,
    shared: Arc<Shared>,
    session: Option<fuser::BackgroundSession>,
    helpers: Vec<std::thread::JoinHandle<()>>,
}

/// Mounts the view at `mountpoint` (which must exist), serving on background threads.
pub fn mount(
    mountpoint: &Path,
    spool: Spool,
    view: Arc<View>,
    submitter: Submitter,
) -> anyhow::Result<FuseMount> {
    let (streams, inotify) = stream::Streams::new().context("inotify for the mount's logs")?;
    let now = SystemTime::now();
    let shared = Arc::new(Shared {
        spool,
        view,
        submitter,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        started: now,
        dyns: Mutex::new(node::DynTable::default()),
        incoming: Mutex::new(incoming::Incoming::default()),
        handles: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        streams,
        shutdown: AtomicBool::new(false),
        changed_at: Mutex::new(now),
        queue_cache: Mutex::new(None),
        nodes_cache: Mutex::new(None),
        releases: (Mutex::new(()), std::sync::Condvar::new()),
    });
    let mut helpers = Vec::new();
    let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
        std::thread::Builder::new()
            .name(name.into())
            .spawn(f)
            .with_context(|| format!("starting the mount's {name} thread"))
    };
    let sh = Arc::clone(&shared);
    helpers.push(spawn(
        "skyspool-fuse-inotify",
        Box::new(move || stream::inotify_loop(sh, inotify)),
    )?);
    let sh = Arc::clone(&shared);
    helpers.push(spawn(
        "skyspool-fuse-view",
        Box::new(move || stream::view_loop(sh)),
    )?);
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("skyspool".into()),
        fuser::MountOption::Subtype("skyspool".into()),
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::RW,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(FUSE_THREADS);
    let fs = fs::SkyFs {
        sh: Arc::clone(&shared),
    };
    let session = match fuser::spawn_mount(fs, mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            stop_helpers(&shared, helpers);
            return Err(e).with_context(|| format!("mounting FUSE at {}", mountpoint.display()));
        }
    };
    Ok(FuseMount {
        mountpoint: mountpoint.to_path_buf(),
        shared,
        session: Some(session),
        helpers,
    })
}

fn stop_helpers(shared: &Shared, helpers: Vec<std::thread::JoinHandle<()>>) {
    shared.shutdown.store(true, Ordering::SeqCst);
    shared.streams.close();
    for h in helpers {
        let _ = h.join();
    }
}

impl FuseMount {
    /// Unmounts (lazily if something still holds it open) and stops the threads.
    pub fn unmount(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Parked `stream` reads fail now rather than hang until the process exits.
        stop_helpers(&self.shared, std::mem::take(&mut self.helpers));
        detach(&self.mountpoint);
        // The session ends when the kernel drops the connection: at once unless files are
        // still open on the detached mount (then when they are closed, or when this process
        // exits and its /dev/fuse descriptor goes).
        let deadline = Instant::now() + Duration::from_secs(2);
        while !session.guard.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if session.guard.is_finished() {
            let _ = session.join();
        } else {
            // Do not let fuser unmount by path again (a new mount may be there by then):
            // the session thread keeps serving the open files until the process exits.
            std::mem::forget(session);
        }
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `umount2(path, MNT_DETACH)`; errors (not mounted) are ignored.
fn detach(path: &Path) {
    let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
}

/// Clears a dead mount left by a daemon that was killed (ENOTCONN on access).
pub fn clean_stale_mount(mountpoint: &Path) {
    if let Err(e) = std::fs::metadata(mountpoint) {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            detach(mountpoint);
        }
    }
}
