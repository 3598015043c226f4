//! Inode numbers of the mounted spool.
//!
//! Everything the view derives from the daemon's state has a computed, stable inode number
//! (the same in `lookup` and `readdir`, never reused for something else, generation 0):
//!
//! | inode | node |
//! |---|---|
//! | 1..=9 | the root, `incoming/`, `jobs/`, `pending/`, `running/`, `done/`, `rejected/`, `queue`, `nodes` |
//! | `1<<62 \| id<<16 \| kind` | `jobs/<id>/` (kind 0) and its files (kind 1..; `log.rank<N>` = 16+N) |
//! | `1<<61 \| id` | the `pending/<id>`, `running/<id>`, `done/<id>` link of job `id` |
//! | `1<<60 \| n` | names that come and go: `incoming/` entries (in memory or on disk) and the `rejected/` tree; `n` counts up from 1 and is never reused |

use crate::scheduler::JobId;
use crate::spool::State;
use std::collections::HashMap;
use std::path::PathBuf;

pub(super) const ROOT: u64 = 1;
pub(super) const INCOMING: u64 = 2;
pub(super) const JOBS: u64 = 3;
pub(super) const PENDING: u64 = 4;
pub(super) const RUNNING: u64 = 5;
pub(super) const DONE: u64 = 6;
pub(super) const REJECTED: u64 = 7;
pub(super) const QUEUE: u64 = 8;
pub(super) const NODES: u64 = 9;

const JOB_TAG: u64 = 1 << 62;
const LINK_TAG: u64 = 1 << 61;
const DYN_TAG: u64 = 1 << 60;
const TAG_MASK: u64 = JOB_TAG | LINK_TAG | DYN_TAG;
/// Job IDs above this do not fit the inode layout (2^44: never reached in practice).
pub(super) const MAX_JOB_ID: JobId = (1 << 44) - 1;
const RANK_BASE: u64 = 16;
/// The highest `log.rank<N>` exposed.
pub(super) const MAX_RANK: u32 = (0xffff - RANK_BASE) as u32;

/// A file of `jobs/<id>/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum JobFile {
    Yaml,
    Status,
    Info,
    Log,
    Stream,
    Cancel,
    Rank(u32),
}

impl JobFile {
    /// The fixed files, in listing order (`log.rank<N>` and `cancel` are listed when they
    /// exist on disk).
    pub(super) const FIXED: [JobFile; 5] = [
        JobFile::Yaml,
        JobFile::Status,
        JobFile::Info,
        JobFile::Log,
        JobFile::Stream,
    ];

    pub(super) fn name(self) -> String {
        match self {
            JobFile::Yaml => "job.yaml".into(),
            JobFile::Status => "status".into(),
            JobFile::Info => "info.json".into(),
            JobFile::Log => "log".into(),
            JobFile::Stream => "stream".into(),
            JobFile::Cancel => "cancel".into(),
            JobFile::Rank(n) => format!("log.rank{n}"),
        }
    }

    pub(super) fn parse(name: &str) -> Option<JobFile> {
        Some(match name {
            "job.yaml" => JobFile::Yaml,
            "status" => JobFile::Status,
            "info.json" => JobFile::Info,
            "log" => JobFile::Log,
            "stream" => JobFile::Stream,
            "cancel" => JobFile::Cancel,
            _ => {
                let n = name.strip_prefix("log.rank")?;
                let rank = parse_canonical(n)?;
                if rank > MAX_RANK as u64 {
                    return None;
                }
                JobFile::Rank(rank as u32)
            }
        })
    }

    fn kind(self) -> u64 {
        match self {
            JobFile::Yaml => 1,
            JobFile::Status => 2,
            JobFile::Info => 3,
            JobFile::Log => 4,
            JobFile::Stream => 5,
            JobFile::Cancel => 6,
            JobFile::Rank(n) => RANK_BASE + n as u64,
        }
    }

    fn from_kind(kind: u64) -> Option<JobFile> {
        Some(match kind {
            1 => JobFile::Yaml,
            2 => JobFile::Status,
            3 => JobFile::Info,
            4 => JobFile::Log,
            5 => JobFile::Stream,
            6 => JobFile::Cancel,
            k if k >= RANK_BASE => JobFile::Rank((k - RANK_BASE) as u32),
            _ => return None,
        })
    }
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Node {
    Root,
    Incoming,
    Jobs,
    StateDir(State),
    Rejected,
    Queue,
    Nodes,
    JobDir(JobId),
    JobFile(JobId, JobFile),
    Link(JobId),
    /// Resolved through the [`DynTable`].
    Dyn(u64),
}

impl Node {
    pub(super) fn ino(self) -> u64 {
        match self {
            Node::Root => ROOT,
            Node::Incoming => INCOMING,
            Node::Jobs => JOBS,
            Node::StateDir(State::Pending) => PENDING,
            Node::StateDir(State::Running) => RUNNING,
            Node::StateDir(State::Done) => DONE,
            Node::Rejected => REJECTED,
            Node::Queue => QUEUE,
            Node::Nodes => NODES,
            Node::JobDir(id) => JOB_TAG | (id << 16),
            Node::JobFile(id, f) => JOB_TAG | (id << 16) | f.kind(),
            Node::Link(id) => LINK_TAG | id,
            Node::Dyn(ino) => ino,
        }
    }

    pub(super) fn from_ino(ino: u64) -> Option<Node> {
        match ino & TAG_MASK {
            0 => Some(match ino {
                ROOT => Node::Root,
                INCOMING => Node::Incoming,
                JOBS => Node::Jobs,
                PENDING => Node::StateDir(State::Pending),
                RUNNING => Node::StateDir(State::Running),
                DONE => Node::StateDir(State::Done),
                REJECTED => Node::Rejected,
                QUEUE => Node::Queue,
                NODES => Node::Nodes,
                _ => return None,
            }),
            JOB_TAG => {
                let id = (ino & !JOB_TAG) >> 16;
                match ino & 0xffff {
                    0 => Some(Node::JobDir(id)),
                    k => JobFile::from_kind(k).map(|f| Node::JobFile(id, f)),
                }
            }
            LINK_TAG => Some(Node::Link(ino & !LINK_TAG)),
            DYN_TAG => Some(Node::Dyn(ino)),
            _ => None,
        }
    }
}

/// A job ID as a directory name: canonical decimal only (`5`, not `05` or `+5`).
pub(super) fn parse_job_id(name: &str) -> Option<JobId> {
    parse_canonical(name).filter(|id| *id >= 1 && *id <= MAX_JOB_ID)
}

fn parse_canonical(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

/// Which on-disk tree a passthrough node lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum PassRoot {
    /// `rejected/` (read-only).
    Rejected,
    /// `incoming/` (files dropped in the plain directory, not yet admitted).
    Incoming,
}

/// What a dynamic inode names.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) enum DynKey {
    /// An entry of `incoming/` kept in memory (buffer, receipt or reason), by name.
    Mem(String),
    /// A path on disk, relative to its root.
    Pass(PassRoot, PathBuf),
}

/// Dynamic inode numbers: one per key, allocated on first sight, never reused.
#[derive(Debug, Default)]
pub(super) struct DynTable {
    next: u64,
    by_key: HashMap<DynKey, u64>,
    by_ino: HashMap<u64, DynKey>,
}

impl DynTable {
    pub(super) fn ino(&mut self, key: DynKey) -> u64 {
        if let Some(ino) = self.by_key.get(&key) {
            return *ino;
        }
        self.next += 1;
        let ino = DYN_TAG | self.next;
        self.by_ino.insert(ino, key.clone());
        self.by_key.insert(key, ino);
        ino
    }

    pub(super) fn key(&self, ino: u64) -> Option<DynKey> {
        self.by_ino.get(&ino).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inodes_round_trip() {
        let nodes = [
            Node::Root,
            Node::Incoming,
            Node::Jobs,
            Node::StateDir(State::Pending),
            Node::StateDir(State::Running),
            Node::StateDir(State::Done),
            Node::Rejected,
            Node::Queue,
            Node::Nodes,
            Node::JobDir(1),
            Node::JobDir(MAX_JOB_ID),
            Node::JobFile(7, JobFile::Yaml),
            Node::JobFile(7, JobFile::Stream),
            Node::JobFile(7, JobFile::Cancel),
            Node::JobFile(7, JobFile::Rank(0)),
            Node::JobFile(7, JobFile::Rank(MAX_RANK)),
            Node::Link(42),
        ];
        let mut seen = std::collections::HashSet::new();
        for n in nodes {
            assert_eq!(Node::from_ino(n.ino()), Some(n), "{n:?}");
            assert!(seen.insert(n.ino()), "{n:?} collides");
        }
        let mut t = DynTable::default();
        let a = t.ino(DynKey::Mem("a.yaml".into()));
        let b = t.ino(DynKey::Pass(PassRoot::Rejected, "a.yaml".into()));
        assert_ne!(a, b);
        assert_eq!(t.ino(DynKey::Mem("a.yaml".into())), a);
        assert_eq!(Node::from_ino(a), Some(Node::Dyn(a)));
        assert!(!seen.contains(&a));
    }

    #[test]
    fn names() {
        assert_eq!(parse_job_id("5"), Some(5));
        assert_eq!(parse_job_id("05"), None);
        assert_eq!(parse_job_id("0"), None);
        assert_eq!(parse_job_id("+5"), None);
        assert_eq!(JobFile::parse("log.rank3"), Some(JobFile::Rank(3)));
        assert_eq!(JobFile::parse("log.rank03"), None);
        assert_eq!(JobFile::parse("workdir"), None);
        for f in JobFile::FIXED {
            assert_eq!(JobFile::parse(&f.name()), Some(f));
        }
    }
}
