//! `incoming/` as the mount keeps it in memory: files being written (buffers), receipts of
//! accepted submissions (`NAME.yaml` → `job <id>`) and reasons of rejected ones
//! (`NAME.yaml.reason`).

use crate::scheduler::JobId;
use crate::spool::{self, Incoming as DiskKind, MAX_YAML_BYTES};
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// The most a file written into the mount may hold (like the plain directory).
pub(super) const MAX_BYTES: u64 = MAX_YAML_BYTES;
/// How long receipts, reasons and abandoned (closed, never submitted) buffers are kept.
pub(super) const KEEP: Duration = Duration::from_secs(600);

/// What a name in `incoming/` is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum NameKind {
    /// `NAME.yaml` / `NAME.yml`: submitted when its writer closes it (or when a held file
    /// is renamed to it).
    Submit,
    /// Dot-files, `~` backups, editor swap files, `.tmp`/`.part`: held in memory, never
    /// submitted under this name (rename them to `NAME.yaml` to submit).
    Hold,
    /// Anything else: refused (EINVAL) with this reason.
    Bad(String),
}

/// Classifies a name written in `incoming/` through the mount, with the daemon's rules
/// (`spool::classify_incoming`) plus the ones a plain directory cannot enforce up front.
pub(super) fn classify(name: &OsStr) -> NameKind {
    let Some(text) = name.to_str() else {
        return NameKind::Bad("the name is not valid UTF-8".into());
    };
    if text.is_empty() || text.contains('/') || text == "." || text == ".." {
        return NameKind::Bad("not a single file name".into());
    }
    if text.chars().any(|c| c.is_control()) {
        return NameKind::Bad("the name contains control characters".into());
    }
    match spool::classify_incoming(name, None) {
        DiskKind::Ignore => NameKind::Hold,
        DiskKind::Bad(reason) => NameKind::Bad(reason),
        DiskKind::File | DiskKind::Dir => {
            if text.ends_with(".yaml") || text.ends_with(".yml") {
                NameKind::Submit
            } else {
                NameKind::Bad(format!(
                    "incoming/{text}: not a job: submit NAME.yaml (or .yml) through the mount; \
                     directory submissions go into the spool's own incoming/ (mv DIR spool/incoming/)"
                ))
            }
        }
    }
}

/// Whether a reason may be recorded under `NAME.reason` for this (refused) name.
pub(super) fn reason_name_for(name: &OsStr) -> Option<String> {
    let text = name.to_str()?;
    if text.is_empty()
        || text.starts_with('.')
        || text.ends_with(".reason")
        || text.contains('/')
        || text.chars().any(|c| c.is_control())
    {
        return None;
    }
    Some(format!("{text}.reason"))
}

/// A file being written (or held) in memory.
#[derive(Debug)]
pub(super) struct Buf {
    /// Its current name in `incoming/` (renames change it).
    pub name: String,
    pub data: Vec<u8>,
    /// The owner: the creator, or whom root chowned it to. The job runs as this user.
    pub uid: u32,
    pub gid: u32,
    pub mode: u16,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// Changed since it was last submitted.
    pub dirty: bool,
    /// Processes (thread group IDs) that changed it since it was last submitted: only their
    /// close submits it (a forked child closing an inherited descriptor does not).
    pub writers: HashSet<u32>,
    /// Open write handles.
    pub open_writers: usize,
    pub last_used: Instant,
    /// A write went past [`MAX_BYTES`]: never submitted (until truncated).
    pub too_big: bool,
    /// Unlinked: whatever its open descriptors still write goes nowhere.
    pub gone: bool,
    /// The receipt this buffer replaced when it was opened for writing: put back if it is
    /// closed without content (`touch` of a receipt does not lose it).
    pub replaced: Option<Box<Entry>>,
}

pub(super) type BufRef = Arc<Mutex<Buf>>;

impl Buf {
    pub(super) fn new(name: &str, uid: u32, gid: u32, mode: u16) -> BufRef {
        let now = SystemTime::now();
        Arc::new(Mutex::new(Buf {
            name: name.to_string(),
            data: Vec::new(),
            uid,
            gid,
            mode,
            mtime: now,
            ctime: now,
            dirty: false,
            writers: HashSet::new(),
            open_writers: 0,
            last_used: Instant::now(),
            too_big: false,
            gone: false,
            replaced: None,
        }))
    }

    /// Marks a change made by process `tgid`.
    pub(super) fn touched_by(&mut self, tgid: u32) {
        self.dirty = true;
        self.writers.insert(tgid);
        self.mtime = SystemTime::now();
        self.ctime = self.mtime;
        self.last_used = Instant::now();
    }
}

/// One name of `incoming/` in memory.
#[derive(Clone, Debug)]
pub(super) enum Entry {
    Buf(BufRef),
    /// `NAME.yaml` after it was admitted: `job <id>\n`.
    Receipt {
        id: JobId,
        uid: u32,
        gid: u32,
        at: SystemTime,
        until: Instant,
    },
    /// `NAME.yaml.reason` after `NAME.yaml` was rejected.
    Reason {
        text: String,
        uid: u32,
        gid: u32,
        at: SystemTime,
        until: Instant,
    },
}

impl Entry {
    /// The content of a receipt or reason (buffers are read live).
    pub(super) fn text(&self) -> Option<Vec<u8>> {
        match self {
            Entry::Buf(_) => None,
            Entry::Receipt { id, .. } => Some(receipt_text(*id).into_bytes()),
            Entry::Reason { text, .. } => Some(text.clone().into_bytes()),
        }
    }

    /// Who owns it (may unlink or replace it).
    pub(super) fn owner(&self) -> u32 {
        match self {
            Entry::Buf(b) => lock(b).uid,
            Entry::Receipt { uid, .. } | Entry::Reason { uid, .. } => *uid,
        }
    }
}

pub(super) fn receipt_text(id: JobId) -> String {
    format!("job {id}\n")
}

/// Poison-tolerant lock.
pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

/// Every in-memory name of `incoming/`.
#[derive(Debug, Default)]
pub(super) struct Incoming {
    pub entries: BTreeMap<String, Entry>,
}

impl Incoming {
    pub(super) fn receipt(&mut self, name: &str, id: JobId, uid: u32, gid: u32) {
        self.entries.insert(
            name.to_string(),
            Entry::Receipt {
                id,
                uid,
                gid,
                at: SystemTime::now(),
                until: Instant::now() + KEEP,
            },
        );
        self.entries.remove(&format!("{name}.reason"));
    }

    pub(super) fn reason(&mut self, reason_name: &str, text: &str, uid: u32, gid: u32) {
        self.entries.insert(
            reason_name.to_string(),
            Entry::Reason {
                text: format!("{}\n", text.trim_end()),
                uid,
                gid,
                at: SystemTime::now(),
                until: Instant::now() + KEEP,
            },
        );
    }

    /// Removes the entry that holds exactly this buffer (wherever it was renamed to).
    pub(super) fn remove_buf(&mut self, buf: &BufRef) {
        let name = lock(buf).name.clone();
        if let Some(Entry::Buf(b)) = self.entries.get(&name) {
            if Arc::ptr_eq(b, buf) {
                self.entries.remove(&name);
            }
        }
    }

    /// Whether `name` is a buffer someone is writing now (not to be clobbered).
    pub(super) fn busy(&self, name: &str) -> bool {
        match self.entries.get(name) {
            Some(Entry::Buf(b)) => lock(b).open_writers > 0,
            _ => false,
        }
    }

    /// Drops expired receipts and reasons, and buffers closed and untouched for [`KEEP`].
    pub(super) fn sweep(&mut self, now: Instant) {
        self.entries.retain(|_, e| match e {
            Entry::Receipt { until, .. } | Entry::Reason { until, .. } => *until > now,
            Entry::Buf(b) => {
                let b = lock(b);
                b.open_writers > 0 || now.duration_since(b.last_used) < KEEP
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let c = |s: &str| classify(OsStr::new(s));
        assert_eq!(c("job.yaml"), NameKind::Submit);
        assert_eq!(c("job.yml"), NameKind::Submit);
        assert_eq!(c(".job.yaml.XYZ123"), NameKind::Hold);
        assert_eq!(c("job.yaml~"), NameKind::Hold);
        assert_eq!(c("job.yaml.part"), NameKind::Hold);
        assert!(matches!(c("job.txt"), NameKind::Bad(_)));
        assert!(matches!(c("a\nb.yaml"), NameKind::Bad(_)));
        use std::os::unix::ffi::OsStrExt;
        assert!(matches!(
            classify(OsStr::from_bytes(b"\xff.yaml")),
            NameKind::Bad(_)
        ));
        assert_eq!(
            reason_name_for(OsStr::new("job.txt")).as_deref(),
            Some("job.txt.reason")
        );
        assert_eq!(reason_name_for(OsStr::new("x.reason")), None);
        assert_eq!(reason_name_for(OsStr::new("a\nb")), None);
    }

    #[test]
    fn receipts_replace_reasons_and_expire() {
        let mut inc = Incoming::default();
        inc.reason("a.yaml.reason", "bad", 1, 1);
        inc.receipt("a.yaml", 5, 1, 1);
        assert!(!inc.entries.contains_key("a.yaml.reason"));
        assert_eq!(inc.entries["a.yaml"].text().unwrap(), b"job 5\n".to_vec());
        let b = Buf::new(".x.tmp", 1, 1, 0o644);
        inc.entries.insert(".x.tmp".into(), Entry::Buf(b.clone()));
        inc.sweep(Instant::now() + KEEP + Duration::from_secs(1));
        assert!(inc.entries.is_empty());
        inc.entries.insert(".x.tmp".into(), Entry::Buf(b.clone()));
        inc.remove_buf(&b);
        assert!(inc.entries.is_empty());
    }
}
