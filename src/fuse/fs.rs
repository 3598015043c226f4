//! The FUSE request handlers.

use super::incoming::{self, classify, lock, reason_name_for, Buf, BufRef, Entry, NameKind};
use super::node::{parse_job_id, DynKey, JobFile, Node, PassRoot, MAX_RANK};
use super::Shared;
use crate::scheduler::JobId;
use crate::spool::{JobInfo, State};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Attributes and entries of anything that can change: never cached by the kernel, so a
/// size is never stale (`ls -l` agrees with `cat`).
const TTL_LIVE: Duration = Duration::ZERO;
/// Nodes whose attributes never change (the fixed directories, a job's directory).
const TTL_FIXED: Duration = Duration::from_secs(1);
/// How long a rename in `incoming/` waits for the file's last writer to be released (see
/// [`Shared::wait_closed`]).
const CLOSE_GRACE: Duration = Duration::from_millis(100);

const GEN: Generation = Generation(0);

/// What an open file handle reads from (or writes to).
#[derive(Clone)]
pub(super) enum Handle {
    /// Generated content, fixed at open (status, info.json, queue, nodes, receipts).
    Bytes(Arc<Vec<u8>>),
    /// A file of the spool, opened without following links.
    File(Arc<File>),
    /// `jobs/<id>/stream`.
    Stream { id: JobId, file: Arc<File> },
    /// A file of `incoming/` opened for writing.
    Write(BufRef),
    /// A file of `incoming/` being written, opened for reading.
    ReadBuf(BufRef),
    /// `jobs/<id>/cancel` opened for writing: the content does not matter.
    Discard,
    /// A directory listing, fixed at opendir.
    Dir(Arc<Vec<DirEnt>>),
}

#[derive(Clone, Debug)]
pub(super) struct DirEnt {
    ino: u64,
    kind: FileType,
    name: OsString,
}

type Res<T> = Result<T, Errno>;

fn io_err(e: std::io::Error) -> Errno {
    Errno::from(e)
}

fn parse_time(s: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)))
}

fn submitted(info: &JobInfo) -> SystemTime {
    parse_time(&info.submitted).unwrap_or(UNIX_EPOCH)
}

/// When the job last changed state: ended, else started, else submitted.
fn transitioned(info: &JobInfo) -> SystemTime {
    info.ended
        .as_deref()
        .or(info.started.as_deref())
        .and_then(parse_time)
        .unwrap_or_else(|| submitted(info))
}

fn meta_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec.clamp(0, 999_999_999) as u32)
    } else {
        UNIX_EPOCH
    }
}

#[allow(clippy::too_many_arguments)]
fn attr(
    ino: u64,
    kind: FileType,
    perm: u16,
    size: u64,
    uid: u32,
    gid: u32,
    mtime: SystemTime,
    nlink: u32,
) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
        kind,
        perm,
        nlink,
        uid,
        gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn kind_of(meta: &Metadata) -> FileType {
    FileType::from_std(meta.file_type()).unwrap_or(FileType::RegularFile)
}

/// Attributes of an on-disk entry, as is (`writable`: keep write bits).
fn from_meta(ino: u64, meta: &Metadata, writable: bool) -> FileAttr {
    let mut perm = (meta.mode() & 0o7777) as u16;
    if !writable {
        perm &= !0o222;
    }
    let mut a = attr(
        ino,
        kind_of(meta),
        perm,
        meta.len(),
        meta.uid(),
        meta.gid(),
        meta_time(meta.mtime(), meta.mtime_nsec()),
        meta.nlink() as u32,
    );
    a.atime = meta_time(meta.atime(), meta.atime_nsec());
    a.ctime = meta_time(meta.ctime(), meta.ctime_nsec());
    a.blocks = meta.blocks();
    a
}

/// Read permission by mode bits (owner, primary group, others; root always).
fn may_read(uid: u32, gid: u32, owner: u32, group: u32, mode: u32) -> bool {
    uid == 0
        || (uid == owner && mode & 0o400 != 0)
        || (gid == group && mode & 0o040 != 0)
        || mode & 0o004 != 0
}

/// Opens a spool file for reading: no links followed, never blocks, never a terminal.
fn open_ro(path: &Path) -> Res<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                Errno::EACCES
            } else {
                io_err(e)
            }
        })
}

fn slice_at(data: &[u8], offset: u64, size: u32) -> &[u8] {
    let start = (offset as usize).min(data.len());
    let end = start.saturating_add(size as usize).min(data.len());
    &data[start..end]
}

/// The thread group (process) of a thread ID as the kernel reports it in requests.
fn tgid_of(pid: u32) -> u32 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(pid)
}

impl Shared {
    fn job(&self, id: JobId) -> Option<JobInfo> {
        self.view.read(|s| s.jobs.get(&id).cloned())
    }

    fn has_job(&self, id: JobId) -> bool {
        self.view.read(|s| s.jobs.contains_key(&id))
    }

    fn dyn_ino(&self, key: DynKey) -> u64 {
        lock(&self.dyns).ino(key)
    }

    fn dyn_key(&self, ino: u64) -> Res<DynKey> {
        lock(&self.dyns).key(ino).ok_or(Errno::ENOENT)
    }

    fn pass_path(&self, root: PassRoot, rel: &Path) -> PathBuf {
        match root {
            PassRoot::Rejected => self.spool.rejected().join(rel),
            PassRoot::Incoming => self.spool.incoming().join(rel),
        }
    }

    fn changed_at(&self) -> SystemTime {
        *lock(&self.changed_at)
    }

    /// The `queue` table, rendered once per view generation.
    pub(super) fn queue_bytes(&self) -> Arc<Vec<u8>> {
        let mut cache = lock(&self.queue_cache);
        self.view.read(|s| {
            if let Some((g, bytes)) = cache.as_ref() {
                if *g == s.generation {
                    return Arc::clone(bytes);
                }
            }
            let rows: Vec<&JobInfo> = s.jobs.values().collect();
            let text =
                crate::queue::render(&rows, chrono::Utc::now(), crate::queue::TimeStyle::Absolute);
            let bytes = Arc::new(text.into_bytes());
            *cache = Some((s.generation, Arc::clone(&bytes)));
            bytes
        })
    }

    /// The `nodes` table, rendered once per snapshot of the inventory's use.
    fn nodes_bytes(&self) -> Arc<Vec<u8>> {
        let Some(nodes) = self.view.read(|s| s.nodes.clone()) else {
            // The daemon fills the snapshot with its first batch; until then the file it
            // wrote at start-up says the same.
            return Arc::new(fs::read(self.spool.root().join("nodes")).unwrap_or_default());
        };
        let mut cache = lock(&self.nodes_cache);
        if let Some((snapshot, bytes)) = cache.as_ref() {
            if Arc::ptr_eq(snapshot, &nodes) {
                return Arc::clone(bytes);
            }
        }
        let bytes = Arc::new(nodes.text().into_bytes());
        *cache = Some((nodes, Arc::clone(&bytes)));
        bytes
    }

    /// Generated content of a node (`None`: not a generated file).
    fn generated(&self, node: Node) -> Res<Option<Arc<Vec<u8>>>> {
        Ok(Some(match node {
            Node::Queue => self.queue_bytes(),
            Node::Nodes => self.nodes_bytes(),
            Node::JobFile(id, JobFile::Status) => {
                let info = self.job(id).ok_or(Errno::ENOENT)?;
                Arc::new(format!("{}\n", info.status).into_bytes())
            }
            Node::JobFile(id, JobFile::Info) => {
                let info = self.job(id).ok_or(Errno::ENOENT)?;
                let mut bytes = serde_json::to_vec_pretty(&info).map_err(|_| Errno::EIO)?;
                bytes.push(b'\n');
                Arc::new(bytes)
            }
            _ => return Ok(None),
        }))
    }

    fn job_path(&self, id: JobId, f: JobFile) -> PathBuf {
        self.spool.job_dir(id).join(f.name())
    }

    // ------------------------------------------------------------ attributes

    fn dir_attr(&self, node: Node, perm: u16, mtime: SystemTime) -> FileAttr {
        attr(
            node.ino(),
            FileType::Directory,
            perm,
            0,
            self.uid,
            self.gid,
            mtime,
            2,
        )
    }

    pub(super) fn attr_of(&self, node: Node) -> Res<FileAttr> {
        let ino = node.ino();
        Ok(match node {
            Node::Root => self.dir_attr(node, 0o755, self.started),
            Node::Incoming => self.dir_attr(node, 0o1777, self.changed_at()),
            Node::Jobs | Node::StateDir(_) => self.dir_attr(node, 0o755, self.changed_at()),
            Node::Rejected => {
                let meta = fs::symlink_metadata(self.spool.rejected()).map_err(io_err)?;
                let mut a = from_meta(ino, &meta, false);
                a.kind = FileType::Directory;
                a
            }
            Node::Queue | Node::Nodes => {
                let bytes = self.generated(node)?.unwrap_or_default();
                attr(
                    ino,
                    FileType::RegularFile,
                    0o444,
                    bytes.len() as u64,
                    self.uid,
                    self.gid,
                    self.changed_at(),
                    1,
                )
            }
            Node::JobDir(id) => {
                let info = self.job(id).ok_or(Errno::ENOENT)?;
                attr(
                    ino,
                    FileType::Directory,
                    0o755,
                    0,
                    info.uid,
                    info.gid,
                    submitted(&info),
                    2,
                )
            }
            Node::Link(id) => {
                let info = self.job(id).ok_or(Errno::ENOENT)?;
                attr(
                    ino,
                    FileType::Symlink,
                    0o777,
                    format!("../jobs/{id}").len() as u64,
                    info.uid,
                    info.gid,
                    transitioned(&info),
                    1,
                )
            }
            Node::JobFile(id, f) => self.job_file_attr(id, f)?,
            Node::Dyn(ino) => match self.dyn_key(ino)? {
                DynKey::Mem(name) => {
                    let entry = lock(&self.incoming)
                        .entries
                        .get(&name)
                        .cloned()
                        .ok_or(Errno::ENOENT)?;
                    mem_attr(ino, &entry)
                }
                DynKey::Pass(root, rel) => {
                    let meta = fs::symlink_metadata(self.pass_path(root, &rel)).map_err(io_err)?;
                    from_meta(ino, &meta, false)
                }
            },
        })
    }

    fn job_file_attr(&self, id: JobId, f: JobFile) -> Res<FileAttr> {
        let info = self.job(id).ok_or(Errno::ENOENT)?;
        let ino = Node::JobFile(id, f).ino();
        let file = |perm: u16, size: u64, mtime: SystemTime| {
            attr(
                ino,
                FileType::RegularFile,
                perm,
                size,
                info.uid,
                info.gid,
                mtime,
                1,
            )
        };
        Ok(match f {
            JobFile::Status | JobFile::Info => {
                let bytes = self.generated(Node::JobFile(id, f))?.ok_or(Errno::ENOENT)?;
                file(0o444, bytes.len() as u64, transitioned(&info))
            }
            JobFile::Yaml => {
                let meta = self.disk_file(id, f)?;
                file((meta.mode() & 0o444) as u16, meta.len(), submitted(&info))
            }
            JobFile::Log | JobFile::Rank(_) | JobFile::Stream => {
                let meta = self.disk_file(id, f)?;
                file(
                    (meta.mode() & 0o444) as u16,
                    meta.len(),
                    meta_time(meta.mtime(), meta.mtime_nsec()),
                )
            }
            JobFile::Cancel => {
                let meta = fs::symlink_metadata(self.job_path(id, f)).map_err(io_err)?;
                let mut a = from_meta(ino, &meta, true);
                if a.kind != FileType::RegularFile {
                    // Any type cancels; show it as the empty file it means.
                    a.kind = FileType::RegularFile;
                    a.size = 0;
                    a.blocks = 0;
                    a.perm = 0o644;
                }
                a
            }
        })
    }

    /// `lstat` of the on-disk file behind a job file (`stream` is the log); regular files only.
    fn disk_file(&self, id: JobId, f: JobFile) -> Res<Metadata> {
        let on_disk = if f == JobFile::Stream {
            JobFile::Log
        } else {
            f
        };
        let meta = fs::symlink_metadata(self.job_path(id, on_disk)).map_err(io_err)?;
        if !meta.is_file() {
            return Err(Errno::ENOENT);
        }
        Ok(meta)
    }

    // ------------------------------------------------------------ names

    pub(super) fn child(&self, parent: Node, name: &OsStr) -> Res<Node> {
        let text = name.to_str();
        match parent {
            Node::Root => Ok(match text.ok_or(Errno::ENOENT)? {
                "incoming" => Node::Incoming,
                "jobs" => Node::Jobs,
                "pending" => Node::StateDir(State::Pending),
                "running" => Node::StateDir(State::Running),
                "done" => Node::StateDir(State::Done),
                "rejected" => Node::Rejected,
                "queue" => Node::Queue,
                "nodes" => Node::Nodes,
                _ => return Err(Errno::ENOENT),
            }),
            Node::Jobs => {
                let id = text.and_then(parse_job_id).ok_or(Errno::ENOENT)?;
                if self.has_job(id) {
                    Ok(Node::JobDir(id))
                } else {
                    Err(Errno::ENOENT)
                }
            }
            Node::StateDir(state) => {
                let id = text.and_then(parse_job_id).ok_or(Errno::ENOENT)?;
                let here = self
                    .view
                    .read(|s| s.jobs.get(&id).is_some_and(|j| j.status.state() == state));
                if here {
                    Ok(Node::Link(id))
                } else {
                    Err(Errno::ENOENT)
                }
            }
            Node::JobDir(id) => {
                if !self.has_job(id) {
                    return Err(Errno::ENOENT);
                }
                let f = text.and_then(JobFile::parse).ok_or(Errno::ENOENT)?;
                match f {
                    JobFile::Rank(_) => {
                        self.disk_file(id, f)?;
                    }
                    JobFile::Cancel => {
                        fs::symlink_metadata(self.job_path(id, f)).map_err(io_err)?;
                    }
                    _ => {}
                }
                Ok(Node::JobFile(id, f))
            }
            Node::Incoming => {
                if let Some(t) = text {
                    if lock(&self.incoming).entries.contains_key(t) {
                        return Ok(Node::Dyn(self.dyn_ino(DynKey::Mem(t.to_string()))));
                    }
                }
                self.pass_child(PassRoot::Incoming, Path::new(""), name)
            }
            Node::Rejected => self.pass_child(PassRoot::Rejected, Path::new(""), name),
            Node::Dyn(ino) => match self.dyn_key(ino)? {
                DynKey::Pass(root, rel) => self.pass_child(root, &rel, name),
                DynKey::Mem(_) => Err(Errno::ENOTDIR),
            },
            Node::Queue | Node::Nodes | Node::JobFile(..) | Node::Link(_) => Err(Errno::ENOTDIR),
        }
    }

    fn pass_child(&self, root: PassRoot, rel: &Path, name: &OsStr) -> Res<Node> {
        if name.as_bytes().contains(&b'/') || name == "." || name == ".." {
            return Err(Errno::ENOENT);
        }
        let rel = rel.join(name);
        fs::symlink_metadata(self.pass_path(root, &rel)).map_err(io_err)?;
        Ok(Node::Dyn(self.dyn_ino(DynKey::Pass(root, rel))))
    }

    fn list(&self, node: Node) -> Res<Vec<DirEnt>> {
        let ent = |ino: u64, kind: FileType, name: &str| DirEnt {
            ino,
            kind,
            name: OsString::from(name),
        };
        let mut out = vec![
            ent(node.ino(), FileType::Directory, "."),
            ent(
                match node {
                    Node::JobDir(_) => Node::Jobs.ino(),
                    _ => Node::Root.ino(),
                },
                FileType::Directory,
                "..",
            ),
        ];
        match node {
            Node::Root => {
                for (n, name) in [
                    (Node::Incoming, "incoming"),
                    (Node::Jobs, "jobs"),
                    (Node::StateDir(State::Pending), "pending"),
                    (Node::StateDir(State::Running), "running"),
                    (Node::StateDir(State::Done), "done"),
                    (Node::Rejected, "rejected"),
                ] {
                    out.push(ent(n.ino(), FileType::Directory, name));
                }
                out.push(ent(Node::Queue.ino(), FileType::RegularFile, "queue"));
                out.push(ent(Node::Nodes.ino(), FileType::RegularFile, "nodes"));
            }
            Node::Jobs => {
                let ids: Vec<JobId> = self.view.read(|s| s.jobs.keys().copied().collect());
                for id in ids {
                    out.push(ent(
                        Node::JobDir(id).ino(),
                        FileType::Directory,
                        &id.to_string(),
                    ));
                }
            }
            Node::StateDir(state) => {
                let ids: Vec<JobId> = self.view.read(|s| {
                    s.jobs
                        .values()
                        .filter(|j| j.status.state() == state)
                        .map(|j| j.id)
                        .collect()
                });
                for id in ids {
                    out.push(ent(
                        Node::Link(id).ino(),
                        FileType::Symlink,
                        &id.to_string(),
                    ));
                }
            }
            Node::JobDir(id) => {
                if !self.has_job(id) {
                    return Err(Errno::ENOENT);
                }
                for f in JobFile::FIXED {
                    out.push(ent(
                        Node::JobFile(id, f).ino(),
                        FileType::RegularFile,
                        &f.name(),
                    ));
                }
                let mut ranks: Vec<u32> = fs::read_dir(self.spool.job_dir(id))
                    .map(|rd| {
                        rd.flatten()
                            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                            .filter_map(|e| match JobFile::parse(e.file_name().to_str()?) {
                                Some(JobFile::Rank(n)) if n <= MAX_RANK => Some(n),
                                _ => None,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                ranks.sort_unstable();
                for n in ranks {
                    let f = JobFile::Rank(n);
                    out.push(ent(
                        Node::JobFile(id, f).ino(),
                        FileType::RegularFile,
                        &f.name(),
                    ));
                }
                if fs::symlink_metadata(self.job_path(id, JobFile::Cancel)).is_ok() {
                    out.push(ent(
                        Node::JobFile(id, JobFile::Cancel).ino(),
                        FileType::RegularFile,
                        "cancel",
                    ));
                }
            }
            Node::Incoming => {
                let names: Vec<String> = lock(&self.incoming).entries.keys().cloned().collect();
                for name in &names {
                    out.push(ent(
                        self.dyn_ino(DynKey::Mem(name.clone())),
                        FileType::RegularFile,
                        name,
                    ));
                }
                for e in self.pass_list(PassRoot::Incoming, Path::new(""))? {
                    if e.name
                        .to_str()
                        .is_some_and(|n| names.iter().any(|m| m == n))
                    {
                        continue;
                    }
                    out.push(e);
                }
            }
            Node::Rejected => out.extend(self.pass_list(PassRoot::Rejected, Path::new(""))?),
            Node::Dyn(ino) => match self.dyn_key(ino)? {
                DynKey::Pass(root, rel) => out.extend(self.pass_list(root, &rel)?),
                DynKey::Mem(_) => return Err(Errno::ENOTDIR),
            },
            Node::Queue | Node::Nodes | Node::JobFile(..) | Node::Link(_) => {
                return Err(Errno::ENOTDIR)
            }
        }
        Ok(out)
    }

    fn pass_list(&self, root: PassRoot, rel: &Path) -> Res<Vec<DirEnt>> {
        let dir = self.pass_path(root, rel);
        let mut out = Vec::new();
        let mut names: Vec<(OsString, FileType)> = fs::read_dir(&dir)
            .map_err(io_err)?
            .flatten()
            .map(|e| {
                let kind = e
                    .file_type()
                    .ok()
                    .and_then(FileType::from_std)
                    .unwrap_or(FileType::RegularFile);
                (e.file_name(), kind)
            })
            .collect();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, kind) in names {
            let ino = self.dyn_ino(DynKey::Pass(root, rel.join(&name)));
            out.push(DirEnt { ino, kind, name });
        }
        Ok(out)
    }

    // ------------------------------------------------------------ handles

    fn new_handle(&self, h: Handle) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.handles).insert(fh, h);
        fh
    }

    fn handle(&self, fh: FileHandle) -> Option<Handle> {
        lock(&self.handles).get(&fh.0).cloned()
    }

    // ------------------------------------------------------------ permissions

    /// May `uid` cancel job `info`? Its owner, root, or the daemon's own user; and only
    /// while it can still be cancelled.
    fn may_cancel(&self, uid: u32, info: &JobInfo) -> Res<()> {
        self.owns(uid, info)?;
        if info.status.is_terminal() {
            return Err(Errno::EACCES);
        }
        Ok(())
    }

    /// Whether `uid` may act on the job as its owner (the owner, root or the daemon's user).
    fn owns(&self, uid: u32, info: &JobInfo) -> Res<()> {
        if uid != 0 && uid != info.uid && uid != self.uid {
            return Err(Errno::EACCES);
        }
        Ok(())
    }

    /// Creates (or re-signals) `jobs/<id>/cancel` on disk, owned by the requester: written
    /// under a temporary name, chowned, then renamed into place, so the daemon never sees
    /// it with another owner.
    fn request_cancel(&self, id: JobId, uid: u32, gid: u32) -> Res<()> {
        let info = self.job(id).ok_or(Errno::ENOENT)?;
        self.may_cancel(uid, &info)?;
        let dir = self.spool.job_dir(id);
        let n = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(
            "{}{}.{n}",
            crate::spool::CANCEL_TEMP_PREFIX,
            std::process::id()
        ));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(io_err)?;
        let owned = nix::unistd::fchown(
            &f,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        );
        drop(f);
        let moved = owned
            .map_err(|e| Errno::from_i32(e as i32))
            .and_then(|_| fs::rename(&tmp, dir.join("cancel")).map_err(io_err));
        if moved.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        moved
    }

    /// The attributes of `jobs/<id>/cancel` just after a request (the daemon may act on it
    /// and remove it at once: then those of the file we made).
    fn cancel_attr(&self, id: JobId, req: &Request) -> FileAttr {
        let node = Node::JobFile(id, JobFile::Cancel);
        self.attr_of(node).unwrap_or_else(|_| {
            attr(
                node.ino(),
                FileType::RegularFile,
                0o644,
                0,
                req.uid(),
                req.gid(),
                SystemTime::now(),
                1,
            )
        })
    }

    // ------------------------------------------------------------ incoming

    /// A new (or re-opened) file of `incoming/` for writing.
    fn incoming_write_open(
        &self,
        req: &Request,
        name: &OsStr,
        mode: Option<u16>,
        excl: bool,
    ) -> Res<(u64, BufRef)> {
        let kind = classify(name);
        if let NameKind::Bad(reason) = &kind {
            if let Some(rn) = reason_name_for(name) {
                lock(&self.incoming).reason(&rn, reason, req.uid(), req.gid());
            }
            return Err(Errno::EINVAL);
        }
        let text = name.to_str().ok_or(Errno::EINVAL)?.to_string();
        let mut inc = lock(&self.incoming);
        let existing = inc.entries.get(&text).cloned();
        let buf = match existing {
            Some(_) if excl => return Err(Errno::EEXIST),
            Some(Entry::Buf(b)) => {
                let owner = lock(&b).uid;
                if req.uid() != 0 && req.uid() != owner {
                    return Err(Errno::EACCES);
                }
                b
            }
            Some(Entry::Reason { .. }) => return Err(Errno::EACCES),
            Some(e @ Entry::Receipt { .. }) => {
                // Writing over a receipt is a new submission under the same name.
                if req.uid() != 0 && req.uid() != e.owner() {
                    return Err(Errno::EACCES);
                }
                let b = Buf::new(&text, req.uid(), req.gid(), mode.unwrap_or(0o644));
                lock(&b).replaced = Some(Box::new(e));
                inc.entries.insert(text.clone(), Entry::Buf(Arc::clone(&b)));
                b
            }
            None => {
                if self.spool.incoming().join(&text).symlink_metadata().is_ok() {
                    // A file of the plain directory, not yet admitted: not ours to change.
                    return Err(Errno::EACCES);
                }
                let b = Buf::new(&text, req.uid(), req.gid(), mode.unwrap_or(0o644));
                inc.entries.insert(text.clone(), Entry::Buf(Arc::clone(&b)));
                b
            }
        };
        {
            let mut b = lock(&buf);
            b.open_writers += 1;
            b.last_used = Instant::now();
        }
        drop(inc);
        let ino = self.dyn_ino(DynKey::Mem(text));
        Ok((ino, buf))
    }

    /// Submits `bytes` as `incoming/<name>` on a thread of its own (the event loop answers
    /// after validating and admitting it), records the outcome (receipt or reason), makes
    /// sure the mount shows the new job, then calls `done`. `origin`: the buffer submitted,
    /// removed on success (and on failure too when `drop_on_error`).
    #[allow(clippy::too_many_arguments)]
    fn submit(
        self: &Arc<Self>,
        name: String,
        bytes: Vec<u8>,
        uid: u32,
        gid: u32,
        origin: BufRef,
        drop_on_error: bool,
        done: impl FnOnce(Result<JobId, String>) + Send + 'static,
    ) {
        let sh = Arc::clone(self);
        let work = move || {
            let verdict = sh.submitter.submit(&name, bytes, uid, gid);
            {
                let mut inc = lock(&sh.incoming);
                match &verdict {
                    Ok(id) => {
                        inc.remove_buf(&origin);
                        if !inc.busy(&name) {
                            inc.receipt(&name, *id, uid, gid);
                        }
                    }
                    Err(reason) => {
                        if drop_on_error {
                            inc.remove_buf(&origin);
                        }
                        inc.reason(&format!("{name}.reason"), reason, uid, gid);
                    }
                }
            }
            if let Ok(id) = verdict {
                sh.wait_visible(id);
            }
            done(verdict);
        };
        let spawned = std::thread::Builder::new()
            .name("skyspool-fuse-submit".into())
            .spawn(work);
        if let Err(e) = spawned {
            // The request's reply went with the closure: it is answered EIO.
            eprintln!("skyspool: fuse: cannot start a submission thread: {e}");
        }
    }

    /// Waits (a little) until the view shows job `id`, so that the writer's close returns
    /// with `jobs/<id>/` already there.
    fn wait_visible(&self, id: JobId) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let (present, generation) =
                self.view.read(|s| (s.jobs.contains_key(&id), s.generation));
            if present || Instant::now() >= deadline {
                return;
            }
            self.view
                .wait_change(generation, Duration::from_millis(100));
        }
    }

    /// Submits what a write handle holds if this closer wrote it (flush) or if nobody
    /// else will (release). `None`: nothing to submit.
    fn take_submission(
        &self,
        buf: &BufRef,
        closer: Option<u32>,
    ) -> Option<(String, Vec<u8>, u32, u32)> {
        let mut b = lock(buf);
        if !b.dirty
            || b.too_big
            || b.gone
            || b.data.is_empty()
            || classify(OsStr::new(&b.name)) != NameKind::Submit
        {
            return None;
        }
        if let Some(tgid) = closer {
            if !b.writers.contains(&tgid) {
                return None;
            }
        }
        b.dirty = false;
        b.writers.clear();
        Some((b.name.clone(), b.data.clone(), b.uid, b.gid))
    }

    fn rename_in_incoming(
        self: &Arc<Self>,
        req: &Request,
        from: &OsStr,
        to: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::EINVAL);
        }
        let Some(src) = from.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        let kind = classify(to);
        if let NameKind::Bad(reason) = &kind {
            if let Some(rn) = reason_name_for(to) {
                lock(&self.incoming).reason(&rn, reason, req.uid(), req.gid());
            }
            return reply.error(Errno::EINVAL);
        }
        let Some(dst) = to.to_str().map(str::to_string) else {
            return reply.error(Errno::EINVAL);
        };
        let open = match lock(&self.incoming).entries.get(&src) {
            Some(Entry::Buf(b)) => Some(Arc::clone(b)),
            _ => None,
        };
        if let Some(buf) = open {
            self.wait_closed(&buf, CLOSE_GRACE);
        }
        let mut inc = lock(&self.incoming);
        let buf = match inc.entries.get(&src) {
            Some(Entry::Buf(b)) => Arc::clone(b),
            Some(_) => return reply.error(Errno::EACCES),
            None => {
                let on_disk = self.spool.incoming().join(&src).symlink_metadata().is_ok();
                return reply.error(if on_disk {
                    Errno::EACCES
                } else {
                    Errno::ENOENT
                });
            }
        };
        let (owner, writing) = {
            let b = lock(&buf);
            (b.uid, b.open_writers > 0)
        };
        if req.uid() != 0 && req.uid() != owner {
            return reply.error(Errno::EPERM);
        }
        if src == dst {
            return reply.ok();
        }
        if flags.contains(RenameFlags::RENAME_NOREPLACE) && inc.entries.contains_key(&dst) {
            return reply.error(Errno::EEXIST);
        }
        // incoming/ is sticky: nobody replaces another user's file.
        if inc
            .entries
            .get(&dst)
            .is_some_and(|e| req.uid() != 0 && e.owner() != req.uid())
        {
            return reply.error(Errno::EPERM);
        }
        if kind == NameKind::Hold || writing {
            // Just a new name: held files stay held; a file still being written is
            // submitted when its writer closes it.
            inc.entries.remove(&src);
            let mut b = lock(&buf);
            b.name = dst.clone();
            if kind == NameKind::Submit && !b.data.is_empty() {
                b.dirty = true;
                let tgid = tgid_of(req.pid());
                b.writers.insert(tgid);
            }
            drop(b);
            inc.entries.insert(dst, Entry::Buf(buf));
            return reply.ok();
        }
        // rsync's (and the safe protocol's) last step: the rename submits, and fails when
        // the submission is rejected.
        let (bytes, uid, gid) = {
            let mut b = lock(&buf);
            b.dirty = false;
            b.writers.clear();
            (b.data.clone(), b.uid, b.gid)
        };
        drop(inc);
        self.submit(dst, bytes, uid, gid, buf, false, move |v| match v {
            Ok(_) => reply.ok(),
            Err(_) => reply.error(Errno::EINVAL),
        });
    }

    /// Waits (at most `grace`) until no handle has `buf` open for writing. A writer's
    /// `close()` returns once its FLUSH is answered; its RELEASE follows on its own and may
    /// be handled on another FUSE thread after a rename the writer made right after closing
    /// (rsync, the safe protocol): that rename must find the file closed, so that it submits
    /// it (and fails when it is rejected) rather than leave it to the close. A file still
    /// open after `grace` is renamed as open (it is submitted when its writer closes it).
    fn wait_closed(&self, buf: &BufRef, grace: Duration) {
        let (mutex, cv) = &self.releases;
        // (A poisoned wait only ends the wait early.)
        let _ = cv.wait_timeout_while(lock(mutex), grace, |_| lock(buf).open_writers > 0);
    }

    /// Tells [`Shared::wait_closed`] that a write handle was released (taking the mutex
    /// first, so that a waiter between its look and its wait is not missed).
    fn released(&self) {
        let (mutex, cv) = &self.releases;
        drop(lock(mutex));
        cv.notify_all();
    }

    fn unlink_in_incoming(&self, req: &Request, name: &OsStr) -> Res<()> {
        if let Some(text) = name.to_str() {
            let mut inc = lock(&self.incoming);
            if let Some(e) = inc.entries.get(text) {
                if req.uid() != 0 && req.uid() != e.owner() {
                    return Err(Errno::EPERM);
                }
                if let Some(Entry::Buf(b)) = inc.entries.remove(text) {
                    lock(&b).gone = true;
                }
                return Ok(());
            }
        }
        // A file of the plain directory (not admitted yet): its owner may take it back.
        let path = self.spool.incoming().join(name);
        let meta = fs::symlink_metadata(&path).map_err(io_err)?;
        if meta.is_dir() {
            return Err(Errno::EISDIR);
        }
        if req.uid() != 0 && req.uid() != meta.uid() {
            return Err(Errno::EPERM);
        }
        fs::remove_file(&path).map_err(io_err)
    }

    /// Whether `uid` may read `node`.
    fn check_read(&self, req: &Request, node: Node) -> Res<()> {
        let (owner, group, mode) = match node {
            Node::JobFile(
                id,
                f @ (JobFile::Yaml | JobFile::Log | JobFile::Rank(_) | JobFile::Stream),
            ) => {
                let info = self.job(id).ok_or(Errno::ENOENT)?;
                let meta = self.disk_file(id, f)?;
                (info.uid, info.gid, meta.mode())
            }
            Node::Dyn(ino) => match self.dyn_key(ino)? {
                DynKey::Pass(root, rel) => {
                    let meta = fs::symlink_metadata(self.pass_path(root, &rel)).map_err(io_err)?;
                    (meta.uid(), meta.gid(), meta.mode())
                }
                DynKey::Mem(name) => match lock(&self.incoming).entries.get(&name) {
                    Some(Entry::Buf(b)) => {
                        let b = lock(b);
                        (b.uid, b.gid, b.mode as u32)
                    }
                    _ => return Ok(()),
                },
            },
            _ => return Ok(()),
        };
        if may_read(req.uid(), req.gid(), owner, group, mode) {
            Ok(())
        } else {
            Err(Errno::EACCES)
        }
    }

    fn open_node(&self, req: &Request, node: Node, flags: OpenFlags) -> Res<Handle> {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        if let Some(bytes) = self.generated(node)? {
            return if write {
                Err(Errno::EACCES)
            } else {
                Ok(Handle::Bytes(bytes))
            };
        }
        match node {
            Node::Root
            | Node::Incoming
            | Node::Jobs
            | Node::StateDir(_)
            | Node::Rejected
            | Node::JobDir(_) => Err(Errno::EISDIR),
            Node::Link(_) => Err(Errno::ELOOP),
            Node::JobFile(id, JobFile::Cancel) => {
                if write {
                    self.request_cancel(id, req.uid(), req.gid())?;
                    return Ok(Handle::Discard);
                }
                let path = self.job_path(id, JobFile::Cancel);
                match open_ro(&path) {
                    Ok(f) if f.metadata().is_ok_and(|m| m.is_file()) => {
                        Ok(Handle::File(Arc::new(f)))
                    }
                    Ok(_) => Ok(Handle::Bytes(Arc::default())),
                    Err(e) if e == Errno::ENOENT => Err(e),
                    Err(_) => Ok(Handle::Bytes(Arc::default())),
                }
            }
            Node::JobFile(id, f) => {
                if write {
                    return Err(Errno::EACCES);
                }
                self.check_read(req, node)?;
                let on_disk = if f == JobFile::Stream {
                    JobFile::Log
                } else {
                    f
                };
                let file = Arc::new(open_ro(&self.job_path(id, on_disk))?);
                if f == JobFile::Stream {
                    Ok(Handle::Stream { id, file })
                } else {
                    Ok(Handle::File(file))
                }
            }
            Node::Dyn(ino) => match self.dyn_key(ino)? {
                DynKey::Mem(name) => {
                    if write {
                        let (_, buf) =
                            self.incoming_write_open(req, OsStr::new(&name), None, false)?;
                        return Ok(Handle::Write(buf));
                    }
                    let entry = lock(&self.incoming)
                        .entries
                        .get(&name)
                        .cloned()
                        .ok_or(Errno::ENOENT)?;
                    if matches!(entry, Entry::Buf(_)) {
                        self.check_read(req, node)?;
                    }
                    Ok(match entry {
                        Entry::Buf(b) => Handle::ReadBuf(b),
                        e => Handle::Bytes(Arc::new(e.text().unwrap_or_default())),
                    })
                }
                DynKey::Pass(root, rel) => {
                    if write {
                        return Err(Errno::EACCES);
                    }
                    self.check_read(req, node)?;
                    let f = open_ro(&self.pass_path(root, &rel))?;
                    Ok(Handle::File(Arc::new(f)))
                }
            },
            Node::Queue | Node::Nodes => Err(Errno::EIO), // generated above
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr_node(
        &self,
        req: &Request,
        node: Node,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        mtime: Option<TimeOrNow>,
        fh: Option<FileHandle>,
    ) -> Res<FileAttr> {
        // Through an open write handle, the buffer is the one being written (even if its
        // name now shows something else).
        let via_handle = fh.and_then(|fh| match self.handle(fh) {
            Some(Handle::Write(b)) => Some(b),
            _ => None,
        });
        match node {
            Node::Dyn(ino) => {
                let DynKey::Mem(name) = self.dyn_key(ino)? else {
                    return Err(Errno::EACCES);
                };
                let buf = match via_handle {
                    Some(b) => b,
                    None => {
                        let entry = lock(&self.incoming).entries.get(&name).cloned();
                        match entry {
                            Some(Entry::Buf(b)) => b,
                            Some(e @ Entry::Receipt { .. }) if size.is_none() => {
                                // Times and mode (`scp -p` and `rsync -a --inplace` set them
                                // after their close, when the file already is a receipt):
                                // accepted, nothing changes. A new owner cannot be: the job
                                // was submitted as the old one.
                                if req.uid() != 0 && req.uid() != e.owner() {
                                    return Err(Errno::EPERM);
                                }
                                let a = mem_attr(ino, &e);
                                if uid.is_some_and(|u| u != a.uid)
                                    || gid.is_some_and(|g| g != a.gid)
                                {
                                    return Err(Errno::EPERM);
                                }
                                return Ok(a);
                            }
                            Some(e @ Entry::Receipt { .. }) if size.is_some() => {
                                // `truncate` of a receipt: a new, empty submission.
                                if req.uid() != 0 && req.uid() != e.owner() {
                                    return Err(Errno::EACCES);
                                }
                                let (_, b) =
                                    self.incoming_write_open(req, OsStr::new(&name), None, false)?;
                                lock(&b).open_writers -= 1;
                                b
                            }
                            Some(_) => return Err(Errno::EACCES),
                            None => return Err(Errno::ENOENT),
                        }
                    }
                };
                let mut b = lock(&buf);
                let owner = req.uid() == 0 || req.uid() == b.uid;
                if uid.is_some_and(|u| u != b.uid) || gid.is_some_and(|g| g != b.gid) {
                    if req.uid() != 0 {
                        return Err(Errno::EPERM);
                    }
                    if let Some(u) = uid {
                        b.uid = u;
                    }
                    if let Some(g) = gid {
                        b.gid = g;
                    }
                }
                if !owner && (mode.is_some() || size.is_some() || mtime.is_some()) {
                    return Err(Errno::EPERM);
                }
                if let Some(m) = mode {
                    b.mode = (m & 0o7777) as u16;
                }
                if let Some(sz) = size {
                    if sz > incoming::MAX_BYTES {
                        return Err(Errno::EFBIG);
                    }
                    if sz != b.data.len() as u64 {
                        b.data.resize(sz as usize, 0);
                        b.touched_by(tgid_of(req.pid()));
                    }
                    b.too_big = false;
                }
                match mtime {
                    Some(TimeOrNow::SpecificTime(t)) => b.mtime = t,
                    Some(TimeOrNow::Now) => b.mtime = SystemTime::now(),
                    None => {}
                }
                b.last_used = Instant::now();
                drop(b);
                Ok(mem_attr(ino, &Entry::Buf(buf)))
            }
            Node::JobFile(id, JobFile::Cancel) => {
                if mode.is_some() || uid.is_some() || gid.is_some() {
                    return Err(Errno::EPERM);
                }
                let opened_for_cancel =
                    matches!(fh.and_then(|fh| self.handle(fh)), Some(Handle::Discard));
                if !opened_for_cancel {
                    // `touch` of an existing cancel: ask again. A job that has ended since
                    // (as `touch`'s own create, just before its times, may have asked it
                    // to) has nothing left to stop: not an error for its owner.
                    match self.job(id).filter(|j| j.status.is_terminal()) {
                        Some(ended) => self.owns(req.uid(), &ended)?,
                        None => self.request_cancel(id, req.uid(), req.gid())?,
                    }
                }
                Ok(self.cancel_attr(id, req))
            }
            _ => Err(Errno::EACCES),
        }
    }
}

fn mem_attr(ino: u64, entry: &Entry) -> FileAttr {
    match entry {
        Entry::Buf(b) => {
            let b = lock(b);
            let mut a = attr(
                ino,
                FileType::RegularFile,
                b.mode,
                b.data.len() as u64,
                b.uid,
                b.gid,
                b.mtime,
                1,
            );
            a.ctime = b.ctime;
            a
        }
        Entry::Receipt { uid, gid, at, .. } | Entry::Reason { uid, gid, at, .. } => attr(
            ino,
            FileType::RegularFile,
            0o444,
            entry.text().map(|t| t.len()).unwrap_or(0) as u64,
            *uid,
            *gid,
            *at,
            1,
        ),
    }
}

fn ttl_of(node: Node) -> Duration {
    match node {
        Node::Root
        | Node::Incoming
        | Node::Jobs
        | Node::StateDir(_)
        | Node::Rejected
        | Node::JobDir(_) => TTL_FIXED,
        _ => TTL_LIVE,
    }
}

/// The filesystem fuser drives; all state is in [`Shared`].
pub(super) struct SkyFs {
    pub(super) sh: Arc<Shared>,
}

fn node_of(ino: INodeNo) -> Res<Node> {
    Node::from_ino(ino.0).ok_or(Errno::ENOENT)
}

impl Filesystem for SkyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Lookups in one directory may run in parallel (many readers of jobs/<id>/...).
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let r = node_of(parent)
            .and_then(|p| self.sh.child(p, name))
            .and_then(|n| Ok((n, self.sh.attr_of(n)?)));
        match r {
            Ok((n, a)) => reply.entry(&ttl_of(n), &a, GEN),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let node = match node_of(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        if let Some(Handle::Write(b) | Handle::ReadBuf(b)) = fh.and_then(|fh| self.sh.handle(fh)) {
            return reply.attr(&TTL_LIVE, &mem_attr(ino.0, &Entry::Buf(b)));
        }
        match self.sh.attr_of(node) {
            Ok(a) => reply.attr(&ttl_of(node), &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = node_of(ino).and_then(|n| {
            self.sh
                .setattr_node(req, n, mode, uid, gid, size, mtime, fh)
        });
        match r {
            Ok(a) => reply.attr(&TTL_LIVE, &a),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match node_of(ino) {
            Ok(Node::Link(id)) if self.sh.has_job(id) => {
                reply.data(format!("../jobs/{id}").as_bytes())
            }
            Ok(Node::Dyn(d)) => match self.sh.dyn_key(d) {
                Ok(DynKey::Pass(root, rel)) => match fs::read_link(self.sh.pass_path(root, &rel)) {
                    Ok(t) => reply.data(t.as_os_str().as_bytes()),
                    Err(e) => reply.error(io_err(e)),
                },
                Ok(DynKey::Mem(_)) => reply.error(Errno::EINVAL),
                Err(e) => reply.error(e),
            },
            Ok(Node::Link(_)) => reply.error(Errno::ENOENT),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(match node_of(parent) {
            Ok(Node::Incoming) => Errno::EPERM,
            _ => Errno::EACCES,
        });
    }

    fn mkdir(
        &self,
        _req: &Request,
        parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        // Directory submissions must be moved in whole: use the spool's own incoming/.
        reply.error(match node_of(parent) {
            Ok(Node::Incoming) => Errno::EPERM,
            _ => Errno::EACCES,
        });
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match node_of(parent) {
            Ok(Node::Incoming) => match self.sh.unlink_in_incoming(req, name) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            Ok(_) => reply.error(Errno::EACCES),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EACCES);
    }

    fn symlink(
        &self,
        _req: &Request,
        parent: INodeNo,
        _link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        reply.error(match node_of(parent) {
            Ok(Node::Incoming) => Errno::EPERM,
            _ => Errno::EACCES,
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match (node_of(parent), node_of(newparent)) {
            (Ok(Node::Incoming), Ok(Node::Incoming)) => {
                self.sh.rename_in_incoming(req, name, newname, flags, reply)
            }
            (Err(e), _) | (_, Err(e)) => reply.error(e),
            _ => reply.error(Errno::EACCES),
        }
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(match node_of(newparent) {
            Ok(Node::Incoming) => Errno::EPERM,
            _ => Errno::EACCES,
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match node_of(ino).and_then(|n| self.sh.open_node(req, n, flags)) {
            Ok(h) => {
                // Only writers need their close (flush) seen: it submits or reports.
                let flags = match h {
                    Handle::Write(_) | Handle::Discard => FopenFlags::FOPEN_DIRECT_IO,
                    _ => FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NOFLUSH,
                };
                let fh = self.sh.new_handle(h);
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.sh.handle(fh) {
            Some(Handle::Bytes(b)) => reply.data(slice_at(&b, offset, size)),
            Some(Handle::File(f)) => {
                let mut buf = vec![0u8; size as usize];
                let mut got = 0;
                while got < buf.len() {
                    match f.read_at(&mut buf[got..], offset + got as u64) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return reply.error(io_err(e)),
                    }
                }
                reply.data(&buf[..got]);
            }
            Some(Handle::Write(b) | Handle::ReadBuf(b)) => {
                let b = lock(&b);
                reply.data(slice_at(&b.data, offset, size));
            }
            Some(Handle::Discard) => reply.data(&[]),
            Some(Handle::Stream { id, file }) => {
                self.sh
                    .streams
                    .read(&self.sh, id, file, offset, size, req.pid(), reply)
            }
            Some(Handle::Dir(_)) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::EBADF),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.sh.handle(fh) {
            Some(Handle::Write(b)) => {
                let end = offset.saturating_add(data.len() as u64);
                if end > incoming::MAX_BYTES {
                    lock(&b).too_big = true;
                    return reply.error(Errno::EFBIG);
                }
                let tgid = tgid_of(req.pid());
                let mut b = lock(&b);
                if b.data.len() < end as usize {
                    b.data.resize(end as usize, 0);
                }
                b.data[offset as usize..end as usize].copy_from_slice(data);
                b.touched_by(tgid);
                reply.written(data.len() as u32);
            }
            Some(Handle::Discard) => reply.written(data.len() as u32),
            Some(_) => reply.error(Errno::EBADF),
            None => reply.error(Errno::EBADF),
        }
    }

    fn flush(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        let Some(Handle::Write(buf)) = self.sh.handle(fh) else {
            return reply.ok();
        };
        // The close of a process that wrote it submits it (an empty file waits for data;
        // a forked child closing an inherited descriptor does not submit).
        let Some((name, bytes, uid, gid)) = self.sh.take_submission(&buf, Some(tgid_of(req.pid())))
        else {
            return reply.ok();
        };
        self.sh
            .submit(name, bytes, uid, gid, buf, true, move |v| match v {
                Ok(_) => reply.ok(),
                Err(_) => reply.error(Errno::EINVAL),
            });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = lock(&self.sh.handles).remove(&fh.0);
        if let Some(Handle::Write(buf)) = h {
            let (name, restore, drop_it) = {
                let mut b = lock(&buf);
                b.open_writers = b.open_writers.saturating_sub(1);
                b.last_used = Instant::now();
                let closed = b.open_writers == 0;
                let restore = if closed && b.data.is_empty() {
                    b.replaced.take()
                } else {
                    None
                };
                (b.name.clone(), restore, closed && b.too_big)
            };
            if restore.is_some() || drop_it {
                let mut inc = lock(&self.sh.incoming);
                let ours =
                    matches!(inc.entries.get(&name), Some(Entry::Buf(b)) if Arc::ptr_eq(b, &buf));
                if ours {
                    match restore {
                        // Opened over a receipt and closed empty: the receipt stays.
                        Some(old) => {
                            inc.entries.insert(name, *old);
                        }
                        // Too big: refused at write, forgotten at close.
                        None => {
                            inc.entries.remove(&name);
                        }
                    }
                }
            }
            // Changes no writer's close submitted (the last descriptor was closed by a
            // process that did not write): submit them now; the outcome shows as the
            // receipt or the reason.
            if let Some((name, bytes, uid, gid)) = self.sh.take_submission(&buf, None) {
                self.sh.submit(name, bytes, uid, gid, buf, true, |_| {});
            }
            self.sh.released();
        }
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _d: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match node_of(ino).and_then(|n| self.sh.list(n)) {
            Ok(list) => {
                let fh = self.sh.new_handle(Handle::Dir(Arc::new(list)));
                reply.opened(FileHandle(fh), FopenFlags::empty());
            }
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let list = match self.sh.handle(fh) {
            Some(Handle::Dir(l)) => l,
            _ => match node_of(ino).and_then(|n| self.sh.list(n)) {
                Ok(l) => Arc::new(l),
                Err(e) => return reply.error(e),
            },
        };
        for (i, e) in list.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, e.kind, &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        lock(&self.sh.handles).remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _d: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match nix::sys::statvfs::statvfs(self.sh.spool.root()) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                255,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(Errno::from_i32(e as i32)),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let node = match node_of(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let a = match self.sh.attr_of(node) {
            Ok(a) => a,
            Err(e) => return reply.error(e),
        };
        let uid = req.uid();
        let ok = if mask.contains(AccessFlags::W_OK) {
            match node {
                Node::Incoming => true,
                Node::JobDir(id) | Node::JobFile(id, JobFile::Cancel) => self
                    .sh
                    .job(id)
                    .is_some_and(|info| self.sh.may_cancel(uid, &info).is_ok()),
                Node::Dyn(d) => match self.sh.dyn_key(d) {
                    Ok(DynKey::Mem(name)) => {
                        let e = lock(&self.sh.incoming).entries.get(&name).cloned();
                        matches!(e, Some(Entry::Buf(_) | Entry::Receipt { .. }))
                            && (uid == 0 || e.is_some_and(|e| e.owner() == uid))
                    }
                    _ => false,
                },
                _ => false,
            }
        } else {
            true
        };
        let ok = ok
            && (!mask.contains(AccessFlags::X_OK) || a.kind == FileType::Directory)
            && (!mask.contains(AccessFlags::R_OK) || self.sh.check_read(req, node).is_ok());
        if ok {
            reply.ok()
        } else {
            reply.error(Errno::EACCES)
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let r = match node_of(parent) {
            Ok(Node::Incoming) => {
                let perm = (mode & !umask & 0o7777) as u16;
                self.sh
                    .incoming_write_open(req, name, Some(perm), flags & libc::O_EXCL != 0)
                    .map(|(ino, buf)| (ino, Handle::Write(buf)))
            }
            Ok(Node::JobDir(id)) if name == "cancel" => self
                .sh
                .request_cancel(id, req.uid(), req.gid())
                .map(|_| (Node::JobFile(id, JobFile::Cancel).ino(), Handle::Discard)),
            Ok(Node::JobDir(id)) if !self.sh.has_job(id) => Err(Errno::ENOENT),
            Ok(_) => Err(Errno::EACCES),
            Err(e) => Err(e),
        };
        let r = r.and_then(|(ino, h)| {
            let a = match (&h, node_of(INodeNo(ino))?) {
                (Handle::Write(b), _) => mem_attr(ino, &Entry::Buf(Arc::clone(b))),
                (_, Node::JobFile(id, JobFile::Cancel)) => self.sh.cancel_attr(id, req),
                (_, n) => self.sh.attr_of(n)?,
            };
            Ok((a, h))
        });
        match r {
            Ok((a, h)) => {
                let fh = self.sh.new_handle(h);
                reply.created(
                    &TTL_LIVE,
                    &a,
                    GEN,
                    FileHandle(fh),
                    FopenFlags::FOPEN_DIRECT_IO,
                );
            }
            Err(e) => reply.error(e),
        }
    }
}
