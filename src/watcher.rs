//! inotify on the spool: `incoming/` and every job directory that can still change.
//!
//! One watch per directory (inotify does not recurse). Only completed writes count:
//! `CLOSE_WRITE` (cp, scp, sftp write in place) and `MOVED_TO` (rsync, `mv`, `skyspool
//! submit`). A queue overflow is reported as [`SpoolEvent::Overflow`] so the daemon rescans.

use crate::scheduler::JobId;
use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};
use std::collections::HashMap;
use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use tokio::io::unix::AsyncFd;

/// What a batch of inotify events means for the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpoolEvent {
    /// A name in `incoming/` was completed: closed after writing (`false`), or moved in
    /// (`true`).
    Incoming(OsString, bool),
    /// A name inside job `id`'s directory appeared or was replaced: one of [`JOB_SIGNALS`].
    JobFile(JobId, OsString),
    /// Events were lost (queue overflow): rescan everything.
    Overflow,
}

/// The names in a job's directory whose events are reported ([`SpoolEvent::JobFile`]): a new
/// `status` (its supervisor's word) and a `cancel` request.
pub const JOB_SIGNALS: [&[u8]; 2] = [b"status", b"cancel"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Incoming,
    Job(JobId),
}

pub struct Watcher {
    fd: AsyncFd<Inotify>,
    targets: HashMap<WatchDescriptor, Target>,
    jobs: HashMap<JobId, WatchDescriptor>,
    buf: Vec<u8>,
}

impl Watcher {
    /// Starts watching `incoming` (call before scanning it, so nothing falls in between).
    pub fn new(incoming: &Path) -> io::Result<Watcher> {
        let inotify = Inotify::init()?;
        let wd = inotify.watches().add(
            incoming,
            WatchMask::CLOSE_WRITE
                | WatchMask::MOVED_TO
                | WatchMask::ONLYDIR
                | WatchMask::DONT_FOLLOW
                | WatchMask::EXCL_UNLINK,
        )?;
        let mut targets = HashMap::new();
        targets.insert(wd, Target::Incoming);
        Ok(Watcher {
            // SAFETY: the Inotify owns its descriptor and keeps it open, unchanged, for as
            // long as the AsyncFd (which owns the Inotify) lives.
            fd: unsafe { AsyncFd::register(inotify)? },
            targets,
            jobs: HashMap::new(),
            buf: vec![0u8; 64 * 1024],
        })
    }

    /// Watches a job directory for `cancel` (any way it is made) and replaced files.
    pub fn watch_job(&mut self, id: JobId, dir: &Path) -> io::Result<()> {
        if self.jobs.contains_key(&id) {
            return Ok(());
        }
        let wd = self.fd.get_ref().watches().add(
            dir,
            WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::CLOSE_WRITE
                | WatchMask::ONLYDIR
                | WatchMask::DONT_FOLLOW
                | WatchMask::EXCL_UNLINK,
        )?;
        self.targets.insert(wd.clone(), Target::Job(id));
        self.jobs.insert(id, wd);
        Ok(())
    }

    pub fn unwatch_job(&mut self, id: JobId) {
        if let Some(wd) = self.jobs.remove(&id) {
            self.targets.remove(&wd);
            let _ = self.fd.get_ref().watches().remove(wd);
        }
    }

    pub fn watched_jobs(&self) -> usize {
        self.jobs.len()
    }

    /// Waits for events and returns every one available now, in order.
    pub async fn next_batch(&mut self) -> io::Result<Vec<SpoolEvent>> {
        loop {
            let mut guard = self.fd.readable_mut().await?;
            let mut out = Vec::new();
            let (inotify, buf) = (guard.get_inner_mut(), &mut self.buf);
            match inotify.read_events(buf) {
                Ok(events) => {
                    for ev in events {
                        if ev.mask.contains(EventMask::Q_OVERFLOW) {
                            out.push(SpoolEvent::Overflow);
                            continue;
                        }
                        if ev.mask.contains(EventMask::IGNORED) {
                            if let Some(Target::Job(id)) = self.targets.remove(&ev.wd) {
                                self.jobs.remove(&id);
                            }
                            continue;
                        }
                        let Some(name) = ev.name else { continue };
                        match self.targets.get(&ev.wd) {
                            Some(Target::Incoming)
                                if ev
                                    .mask
                                    .intersects(EventMask::CLOSE_WRITE | EventMask::MOVED_TO) =>
                            {
                                out.push(SpoolEvent::Incoming(
                                    name.to_os_string(),
                                    ev.mask.contains(EventMask::MOVED_TO),
                                ));
                            }
                            // Only `status` and `cancel` say something to the daemon; the
                            // rest (its own `info.json` exchanges, `log` closed by the
                            // supervisor) would wake it for a batch that changes nothing.
                            Some(Target::Job(id)) if JOB_SIGNALS.contains(&name.as_bytes()) => {
                                out.push(SpoolEvent::JobFile(*id, name.to_os_string()));
                            }
                            _ => {}
                        }
                    }
                    if !out.is_empty() {
                        return Ok(out);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    guard.clear_ready();
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A job directory's own bookkeeping (an `info.json` exchanged by rename, a `log`
    /// written and closed) wakes nobody; a new `status` and a `cancel` do, in order.
    #[test]
    fn only_status_and_cancel_in_a_job_directory_are_reported() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let tmp = tempfile::tempdir().unwrap();
            let incoming = tmp.path().join("incoming");
            let job = tmp.path().join("7");
            fs::create_dir(&incoming).unwrap();
            fs::create_dir(&job).unwrap();
            let mut w = Watcher::new(&incoming).unwrap();
            w.watch_job(7, &job).unwrap();
            fs::write(job.join("info.json.new"), b"{}").unwrap();
            fs::rename(job.join("info.json.new"), job.join("info.json")).unwrap();
            fs::write(job.join("log"), b"output\n").unwrap();
            fs::write(job.join("status.new"), b"RUNNING\n").unwrap();
            fs::rename(job.join("status.new"), job.join("status")).unwrap();
            fs::write(job.join("cancel"), b"").unwrap();
            let mut got = Vec::new();
            while got.len() < 3 {
                let batch = tokio::time::timeout(std::time::Duration::from_secs(5), w.next_batch())
                    .await
                    .expect("events within 5 s")
                    .unwrap();
                got.extend(batch.into_iter().map(|e| match e {
                    SpoolEvent::JobFile(id, name) => format!("{id}/{}", name.to_string_lossy()),
                    other => format!("{other:?}"),
                }));
            }
            // `cancel` comes as a creation and as a close after writing.
            assert_eq!(got, ["7/status", "7/cancel", "7/cancel"]);
        });
    }
}
