//! `jobs/<id>/stream`: reads that wait for output.
//!
//! A read at or past the end of the log while the job can still write is not answered on
//! the FUSE thread: its reply is parked in a waiter list and the thread goes back to serve
//! other requests. Waiters are answered by two threads:
//!
//! - the inotify thread, woken by `IN_MODIFY`/`IN_CLOSE_WRITE` of the logs being waited on
//!   (one watch per job with waiters, removed when the last one is answered);
//! - the view thread, woken by [`View::wait_change`](crate::view::View::wait_change) after
//!   each daemon batch (a job that ended: its readers get the rest and then EOF), and every
//!   [`TICK`] as a safety net. On that tick a reader with a signal to act on gets `EINTR`:
//!   one being killed (the kernel waits for our answer before it can exit, since fuser
//!   does not handle `FUSE_INTERRUPT`), or one with a handler for a pending signal.
//!
//! The answer is data as soon as the log holds bytes past the reader's offset, and EOF (an
//! empty read) once the job's status is final and nothing is left.

use super::incoming::lock;
use super::Shared;
use crate::scheduler::JobId;
use fuser::{Errno, ReplyData};
use inotify::{Inotify, WatchDescriptor, WatchMask, Watches};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Safety net: every waiter is re-examined at least this often.
pub(super) const TICK: Duration = Duration::from_millis(500);

struct Waiter {
    file: Arc<File>,
    offset: u64,
    size: u32,
    pid: u32,
    reply: ReplyData,
}

#[derive(Default)]
struct Inner {
    waiters: HashMap<JobId, Vec<Waiter>>,
    wds: HashMap<JobId, WatchDescriptor>,
    jobs_by_wd: HashMap<WatchDescriptor, JobId>,
    closed: bool,
}

pub(super) struct Streams {
    inner: Mutex<Inner>,
    watches: Mutex<Watches>,
}

/// What a look at the log says.
enum Answer {
    Data(Vec<u8>),
    Eof,
    Wait,
}

impl Streams {
    pub(super) fn new() -> std::io::Result<(Streams, Inotify)> {
        let inotify = Inotify::init()?;
        let watches = inotify.watches();
        Ok((
            Streams {
                inner: Mutex::new(Inner::default()),
                watches: Mutex::new(watches),
            },
            inotify,
        ))
    }

    /// A read of `stream`: answered now when there is something to say, parked otherwise.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn read(
        &self,
        sh: &Shared,
        id: JobId,
        file: Arc<File>,
        offset: u64,
        size: u32,
        pid: u32,
        reply: ReplyData,
    ) {
        match look(sh, id, &file, offset, size) {
            Ok(Answer::Data(d)) => return reply.data(&d),
            Ok(Answer::Eof) => return reply.data(&[]),
            Ok(Answer::Wait) => {}
            Err(e) => return reply.error(e),
        }
        let mut inner = lock(&self.inner);
        if inner.closed {
            return reply.error(Errno::from_i32(libc::ENOTCONN));
        }
        if !inner.wds.contains_key(&id) {
            let path = sh.spool.job_dir(id).join("log");
            let added = lock(&self.watches).add(
                &path,
                WatchMask::MODIFY
                    | WatchMask::CLOSE_WRITE
                    | WatchMask::ATTRIB
                    | WatchMask::DELETE_SELF
                    | WatchMask::MOVE_SELF
                    | WatchMask::DONT_FOLLOW,
            );
            // Without a watch the safety tick still answers it (within TICK).
            if let Ok(wd) = added {
                inner.jobs_by_wd.insert(wd.clone(), id);
                inner.wds.insert(id, wd);
            }
        }
        // Look again now that the watch is in place and the lock is held: whatever happens
        // from here on is seen by the threads that service waiters (they take this lock).
        match look(sh, id, &file, offset, size) {
            Ok(Answer::Data(d)) => reply.data(&d),
            Ok(Answer::Eof) => reply.data(&[]),
            Err(e) => reply.error(e),
            Ok(Answer::Wait) => inner.waiters.entry(id).or_default().push(Waiter {
                file,
                offset,
                size,
                pid,
                reply,
            }),
        }
        self.drop_idle_watch(&mut inner, id);
    }

    /// Answers what can be answered, for the given jobs (or all of them). `tick`: also
    /// answer readers that are being killed.
    pub(super) fn service(&self, sh: &Shared, jobs: Option<&[JobId]>, tick: bool) {
        let mut inner = lock(&self.inner);
        let ids: Vec<JobId> = match jobs {
            Some(ids) => ids.to_vec(),
            None => inner.waiters.keys().copied().collect(),
        };
        for id in ids {
            let Some(list) = inner.waiters.remove(&id) else {
                continue;
            };
            let mut keep = Vec::with_capacity(list.len());
            for w in list {
                match look(sh, id, &w.file, w.offset, w.size) {
                    Ok(Answer::Data(d)) => w.reply.data(&d),
                    Ok(Answer::Eof) => w.reply.data(&[]),
                    Err(e) => w.reply.error(e),
                    Ok(Answer::Wait) => {
                        if tick && interrupted(w.pid) {
                            w.reply.error(Errno::EINTR);
                        } else {
                            keep.push(w);
                        }
                    }
                }
            }
            if !keep.is_empty() {
                inner.waiters.insert(id, keep);
            }
            self.drop_idle_watch(&mut inner, id);
        }
    }

    /// The job a watch belongs to.
    pub(super) fn job_of(&self, wd: &WatchDescriptor) -> Option<JobId> {
        lock(&self.inner).jobs_by_wd.get(wd).copied()
    }

    fn drop_idle_watch(&self, inner: &mut Inner, id: JobId) {
        if inner.waiters.get(&id).is_some_and(|l| !l.is_empty()) {
            return;
        }
        if let Some(wd) = inner.wds.remove(&id) {
            inner.jobs_by_wd.remove(&wd);
            let _ = lock(&self.watches).remove(wd);
        }
    }

    /// Unmounting: every parked read fails (ENOTCONN), later ones too.
    pub(super) fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.closed = true;
        for (_, list) in inner.waiters.drain() {
            for w in list {
                w.reply.error(Errno::from_i32(libc::ENOTCONN));
            }
        }
        let wds: Vec<WatchDescriptor> = inner.wds.drain().map(|(_, wd)| wd).collect();
        inner.jobs_by_wd.clear();
        for wd in wds {
            let _ = lock(&self.watches).remove(wd);
        }
    }
}

/// Reads what is there past `offset`; EOF when the job is over (status read first, so no
/// output written before the final status can be missed).
fn look(sh: &Shared, id: JobId, file: &File, offset: u64, size: u32) -> Result<Answer, Errno> {
    let status = sh.view.read(|s| s.jobs.get(&id).map(|j| j.status));
    let over = status.is_none_or(|s| s.is_terminal());
    let len = file.metadata().map_err(Errno::from)?.len();
    if len > offset && size > 0 {
        let want = (len - offset).min(size as u64) as usize;
        let mut buf = vec![0u8; want];
        let mut got = 0;
        while got < want {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Errno::from(e)),
            }
        }
        if got > 0 {
            buf.truncate(got);
            return Ok(Answer::Data(buf));
        }
    }
    Ok(if over { Answer::Eof } else { Answer::Wait })
}

/// Whether the thread that asked has a signal to act on: a fatal one (it is being killed
/// and only waits for our answer to exit), or one it catches (Ctrl-C in a program with a
/// handler: like a read on a pipe, the read fails with EINTR and the handler runs).
fn interrupted(pid: u32) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let pending = field("SigPnd:") | field("ShdPnd:");
    let kill_bit = 1u64 << (libc::SIGKILL - 1);
    pending & kill_bit != 0 || pending & !field("SigBlk:") & field("SigCgt:") != 0
}

/// The inotify thread: answers the waiters of the logs that changed.
pub(super) fn inotify_loop(sh: Arc<Shared>, mut inotify: Inotify) {
    let mut buf = vec![0u8; 16 * 1024];
    while !sh.shutdown.load(Ordering::SeqCst) {
        let ready = {
            let mut fds = [nix::poll::PollFd::new(
                inotify.as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            let ms = TICK.as_millis() as u16;
            nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms)).unwrap_or(0) > 0
        };
        if !ready {
            continue;
        }
        let mut jobs = Vec::new();
        let mut overflow = false;
        match inotify.read_events(&mut buf) {
            Ok(events) => {
                for ev in events {
                    if ev.mask.contains(inotify::EventMask::Q_OVERFLOW) {
                        overflow = true;
                    } else if let Some(id) = sh.streams.job_of(&ev.wd) {
                        if !jobs.contains(&id) {
                            jobs.push(id);
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => std::thread::sleep(TICK),
        }
        if overflow {
            sh.streams.service(&sh, None, false);
        } else if !jobs.is_empty() {
            sh.streams.service(&sh, Some(&jobs), false);
        }
    }
}

/// The view thread: after each daemon batch (and every [`TICK`]), answers waiters whose job
/// ended, notes when the view changed, and forgets expired receipts.
pub(super) fn view_loop(sh: Arc<Shared>) {
    let mut seen = sh.view.read(|s| s.generation);
    let mut last_sweep = Instant::now();
    while !sh.shutdown.load(Ordering::SeqCst) {
        let generation = sh.view.wait_change(seen, TICK);
        if generation != seen {
            seen = generation;
            *lock(&sh.changed_at) = std::time::SystemTime::now();
        }
        if sh.shutdown.load(Ordering::SeqCst) {
            break;
        }
        sh.streams.service(&sh, None, true);
        if last_sweep.elapsed() >= Duration::from_secs(5) {
            last_sweep = Instant::now();
            lock(&sh.incoming).sweep(Instant::now());
        }
    }
}
