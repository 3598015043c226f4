//! Durability: fsyncs of files and directories, alone or as a round run by a small pool
//! of threads (the caller polls it or is woken through an eventfd), and `syncfs`.

use super::*;

/// One fsync for a pool worker: what to sync, where to answer, and the round it counts
/// down (if any).
type SyncTask = (
    DurablePath,
    std::sync::mpsc::Sender<Result<()>>,
    Option<std::sync::Arc<Countdown>>,
);

/// fsync a directory (makes renames and creations in it durable).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|f| f.sync_all()).at(dir)
}

/// A path to fsync: a directory (its entries) or a regular file (no links followed); or a
/// directory whose whole filesystem is synced (`syncfs`: every file written on it so far,
/// with one cache flush).
#[derive(Clone, Copy, Debug)]
pub enum Durable<'a> {
    Dir(&'a Path),
    File(&'a Path),
    Filesystem(&'a Path),
}

/// fsyncs every path of `paths`, several at once (this thread and up to 7 of [`SyncPool`]'s):
/// each fsync waits for the device, and concurrent ones share its cache flushes, so a batch
/// costs about one fsync's wait instead of the sum. Returns the first error; every path is
/// attempted.
pub fn sync_all(paths: &[Durable<'_>]) -> Result<()> {
    let Some((mine, rest)) = paths.split_first() else {
        return Ok(());
    };
    let round = SyncRound::start(rest);
    let here = mine.detached().sync();
    let rest = round.wait();
    here.and(rest)
}

/// A round of fsyncs running on [`SyncPool`]'s threads while the caller goes on
/// ([`sync_all`] is one started and awaited at once). Dropping it without [`SyncRound::wait`]
/// leaves the fsyncs to finish unobserved. The default is a round of nothing, through at
/// once.
#[must_use = "a round's outcome is known only by waiting for it"]
#[derive(Default)]
pub struct SyncRound {
    pub(super) results: Option<std::sync::mpsc::Receiver<Result<()>>>,
    /// Fsyncs handed to the pool, and how many of their outcomes are in.
    pub(super) sent: usize,
    pub(super) received: usize,
    /// The first error so far (of the fsyncs that ran in line, or of those received).
    pub(super) error: Option<SpoolError>,
}

/// Counts a round's fsyncs down and, when the last is through, adds 1 to an eventfd (see
/// [`SyncRound::start_notify`]).
pub(super) struct Countdown {
    pub(super) left: std::sync::atomic::AtomicUsize,
    pub(super) fd: std::sync::Arc<std::os::fd::OwnedFd>,
}

impl Countdown {
    pub(super) fn done(&self) {
        if self.left.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            // An eventfd's counter only fails to take 1 at u64::MAX - 1: never here.
            let _ = nix::unistd::write(&*self.fd, &1u64.to_ne_bytes());
        }
    }
}

impl SyncRound {
    /// Hands every path to the pool (in line, here, where the pool cannot take it).
    pub fn start(paths: &[Durable<'_>]) -> SyncRound {
        SyncRound::start_notify(paths, None)
    }

    /// [`SyncRound::start`], and once every fsync of the round is through, 1 is added to
    /// the eventfd `notify` (by the thread that did the last one, or here if they all ran
    /// in line), so that an event loop can wait for the round with its other events and
    /// then take the outcome with [`SyncRound::try_wait`].
    pub fn start_notify(
        paths: &[Durable<'_>],
        notify: Option<std::sync::Arc<std::os::fd::OwnedFd>>,
    ) -> SyncRound {
        let mut round = SyncRound::default();
        // One count per path, and one for this loop, so that nothing notifies before every
        // path is handed out.
        let countdown = notify.map(|fd| {
            std::sync::Arc::new(Countdown {
                left: std::sync::atomic::AtomicUsize::new(paths.len() + 1),
                fd,
            })
        });
        let (done, results) = std::sync::mpsc::channel();
        let pool = SyncPool::get();
        for d in paths {
            let sent = match pool {
                Some(pool) => pool.send(d.detached(), done.clone(), countdown.clone()),
                None => Err(d.detached()),
            };
            match sent {
                Ok(()) => round.sent += 1,
                Err(d) => {
                    if let Err(e) = d.sync() {
                        round.error.get_or_insert(e);
                    }
                    if let Some(c) = &countdown {
                        c.done();
                    }
                }
            }
        }
        if let Some(c) = &countdown {
            c.done();
        }
        round.results = Some(results);
        round
    }

    /// The round's outcome if every fsync is through, without waiting; `None` while some
    /// still run.
    pub fn try_wait(&mut self) -> Option<Result<()>> {
        while self.received < self.sent {
            let r = match self.results.as_ref().map(|r| r.try_recv()) {
                Some(Ok(r)) => r,
                Some(Err(std::sync::mpsc::TryRecvError::Empty)) => return None,
                Some(Err(std::sync::mpsc::TryRecvError::Disconnected)) | None => Err(worker_gone()),
            };
            self.take(r);
        }
        Some(self.outcome())
    }

    /// Waits for every fsync of the round; the first error, if any.
    pub fn wait(mut self) -> Result<()> {
        while self.received < self.sent {
            let r = match self.results.as_ref().map(|r| r.recv()) {
                Some(Ok(r)) => r,
                Some(Err(_)) | None => Err(worker_gone()),
            };
            self.take(r);
        }
        self.outcome()
    }

    /// Counts one fsync's outcome in, keeping the first error.
    pub(super) fn take(&mut self, r: Result<()>) {
        self.received += 1;
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }

    /// The first error, if any (taken: asked once, when every outcome is in).
    pub(super) fn outcome(&mut self) -> Result<()> {
        match self.error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The outcome of an fsync whose worker died with the path (it cannot: `sync()` does not
/// panic).
pub(super) fn worker_gone() -> SpoolError {
    SpoolError::Io {
        path: PathBuf::from("(fsync worker)"),
        source: io::Error::other("an fsync worker exited"),
    }
}

/// A new eventfd (close-on-exec; `nonblocking` as asked), counting from 0: what
/// [`SyncRound::start_notify`] adds a round's end to.
pub fn eventfd(nonblocking: bool) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let flags = libc::EFD_CLOEXEC | if nonblocking { libc::EFD_NONBLOCK } else { 0 };
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by eventfd and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// A [`Durable`] that can go to another thread.
pub(super) enum DurablePath {
    Dir(PathBuf),
    File(PathBuf),
    Filesystem(PathBuf),
}

impl Durable<'_> {
    pub(super) fn detached(&self) -> DurablePath {
        match *self {
            Durable::Dir(p) => DurablePath::Dir(p.to_path_buf()),
            Durable::File(p) => DurablePath::File(p.to_path_buf()),
            Durable::Filesystem(p) => DurablePath::Filesystem(p.to_path_buf()),
        }
    }
}

impl DurablePath {
    pub(super) fn sync(&self) -> Result<()> {
        match self {
            DurablePath::Dir(p) => sync_dir(p),
            DurablePath::File(p) => sync_file(p),
            DurablePath::Filesystem(p) => sync_filesystem(p),
        }
    }
}

/// The threads [`sync_all`] hands fsyncs to: started once, on first use, and kept (a thread
/// made per batch cost the daemon two clones and two exits per admission).
///
/// Each worker has a channel of its own and says when it waits on it (`idle`): a task goes
/// straight to a waiting worker, so the fsyncs of a round are picked up at once, each by a
/// thread the daemon wakes itself. (With one receiver shared behind a mutex, the worker that
/// took a task woke the next one only as it let go of the receiver: the fsyncs of a round
/// started one scheduling hop after another, ~0.1 ms each and up to ~1 ms each while both
/// CPUs were busy with the job's `bash`.)
pub(super) struct SyncPool {
    pub(super) workers: Vec<std::sync::mpsc::Sender<SyncTask>>,
    /// The workers waiting for a task, most recently idle last.
    pub(super) idle: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    /// Where a task goes when no worker waits: the next worker in turn.
    pub(super) next: std::sync::atomic::AtomicUsize,
}

impl SyncPool {
    const THREADS: usize = 7;

    /// The pool, or `None` where no thread could be started (then fsyncs run in line).
    pub(super) fn get() -> Option<&'static SyncPool> {
        static POOL: std::sync::OnceLock<Option<SyncPool>> = std::sync::OnceLock::new();
        POOL.get_or_init(|| {
            let idle = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
            let mut workers = Vec::new();
            for i in 0..Self::THREADS {
                let (tx, rx) = std::sync::mpsc::channel::<SyncTask>();
                let index = workers.len();
                let idle_list = idle.clone();
                let worker = std::thread::Builder::new()
                    .name(format!("fsync-{i}"))
                    .stack_size(64 * 1024)
                    .spawn(move || loop {
                        // Idle once nothing is queued for it (a task sent to a busy worker
                        // is taken here first).
                        let task = match rx.try_recv() {
                            Ok(task) => task,
                            Err(std::sync::mpsc::TryRecvError::Disconnected) => return,
                            Err(std::sync::mpsc::TryRecvError::Empty) => {
                                if let Ok(mut list) = idle_list.lock() {
                                    if !list.contains(&index) {
                                        list.push(index);
                                    }
                                }
                                match rx.recv() {
                                    Ok(task) => task,
                                    Err(_) => return,
                                }
                            }
                        };
                        let (what, done, countdown) = task;
                        let _ = done.send(what.sync());
                        if let Some(c) = countdown {
                            c.done();
                        }
                    });
                if worker.is_ok() {
                    workers.push(tx);
                }
            }
            (!workers.is_empty()).then(|| SyncPool {
                workers,
                idle,
                next: std::sync::atomic::AtomicUsize::new(0),
            })
        })
        .as_ref()
    }

    /// Queues one fsync: on a waiting worker if any, else on the next one in turn (it takes
    /// the task after its current fsync). Gives the path back when no worker can take it.
    pub(super) fn send(
        &self,
        what: DurablePath,
        done: std::sync::mpsc::Sender<Result<()>>,
        countdown: Option<std::sync::Arc<Countdown>>,
    ) -> std::result::Result<(), DurablePath> {
        let waiting = self.idle.lock().ok().and_then(|mut list| list.pop());
        let mut task = (what, done, countdown);
        let first =
            waiting.unwrap_or_else(|| self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        // A worker whose thread is gone refuses the task: the next one is tried.
        for k in 0..self.workers.len() {
            let i = (first + k) % self.workers.len();
            match self.workers[i].send(task) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(back)) => task = back,
            }
        }
        Err(task.0)
    }
}

/// fsync one file by path (no links followed).
/// `syncfs` on the filesystem that holds the directory `dir`: everything written to it so
/// far is durable when this returns (its write errors since the last `syncfs` reported).
pub fn sync_filesystem(dir: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(dir)
        .at(dir)?;
    // SAFETY: syncfs on a valid, owned descriptor.
    if unsafe { libc::syncfs(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error()).at(dir);
    }
    Ok(())
}

pub fn sync_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .and_then(|f| f.sync_all())
        .at(path)
}
