//! The admission journal: what makes a batch of admissions durable with one `fsync`.
//!
//! An admission round (see `spool-layout.md`, "Admission") must make each job of the batch
//! durable before any of them runs: its `job.yaml`, its `info.json` and their names in
//! `jobs/`. Syncing those files and directories takes four fsyncs per round, each with its
//! own cache flush on a journal-less filesystem, and the round is what a lone job's first
//! command waits for. Instead, the round appends one record per job (the job's record and
//! its `job.yaml` text) to `.skyspool/journal.0` or `.skyspool/journal.1` and fsyncs that one
//! file; the job files are synced afterwards, while the jobs run, and once they are durable
//! the records are dropped (the file is truncated). At start-up, a record whose job is
//! missing or incomplete on disk (a power cut lost what was not synced yet) gives the job
//! back its files before anything else is recovered.
//!
//! Two files take turns so that a busy queue never waits to drop records: appends go to
//! one until it holds [`Journal::SWITCH_BYTES`], then to the other once that one is empty
//! again (all its jobs' files durable).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scheduler::JobId;
use crate::spool::JobInfo;

/// One job's admission as the journal keeps it: enough to write its `job.yaml` and
/// `info.json` again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: JobId,
    /// The job's `info.json` as admitted.
    pub info: JobInfo,
    /// The job's `job.yaml`, byte for byte (it is UTF-8: it parsed as YAML).
    pub yaml: String,
    /// The file claimed from `incoming/` for it, if it was one (see
    /// [`crate::spool::Spool::restore_admission`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<crate::spool::FileIdent>,
}

/// A line that takes back the record of a job whose admission did not go through after all
/// (see [`Journal::void`]).
#[derive(Serialize, Deserialize)]
struct Void {
    void: JobId,
}

/// One of the two journal files.
struct Part {
    path: PathBuf,
    file: File,
    len: u64,
    /// The highest job ID recorded in it since it was last emptied.
    last_id: Option<JobId>,
}

/// The two journal files of a spool (see the module documentation).
pub struct Journal {
    parts: [Part; 2],
    /// The file appends go to.
    current: usize,
}

impl Journal {
    /// Appends go to the other file once the current one holds this many bytes and the
    /// other one is empty.
    pub const SWITCH_BYTES: u64 = 1 << 20;

    /// The journal files in `private` (the spool's `.skyspool/`).
    pub fn paths(private: &Path) -> [PathBuf; 2] {
        [private.join("journal.0"), private.join("journal.1")]
    }

    /// Opens (creating where missing, mode 0600, never through a link) both files in
    /// `private`. A file created here is made durable with its name before it is used.
    pub fn open(private: &Path) -> io::Result<Journal> {
        let [p0, p1] = Journal::paths(private);
        let (a, made_a) = open_part(p0)?;
        let (b, made_b) = open_part(p1)?;
        if made_a || made_b {
            File::open(private)?.sync_all()?;
        }
        Ok(Journal {
            parts: [a, b],
            current: 0,
        })
    }

    /// Every intact record in both files (a line that does not parse, such as one a power
    /// cut tore, is skipped: its round was never through, so nothing of its jobs ran).
    /// Records taken back by a later void line are left out.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        let mut void = std::collections::HashSet::new();
        for part in &self.parts {
            let Ok(f) = File::open(&part.path) else {
                continue;
            };
            for line in io::BufReader::new(f).split(b'\n').map_while(|l| l.ok()) {
                if let Ok(r) = serde_json::from_slice::<Record>(&line) {
                    out.push(r);
                } else if let Ok(v) = serde_json::from_slice::<Void>(&line) {
                    void.insert(v.void);
                }
            }
        }
        out.retain(|r| !void.contains(&r.id));
        out
    }

    /// Appends the records of one round to the current file, in one write, and returns
    /// that file's path: the round is durable once it is fsynced.
    pub fn append(&mut self, records: &[Record]) -> io::Result<PathBuf> {
        let other = 1 - self.current;
        if self.parts[self.current].len >= Journal::SWITCH_BYTES && self.parts[other].len == 0 {
            self.current = other;
        }
        let mut bytes = Vec::new();
        for r in records {
            serde_json::to_writer(&mut bytes, r).map_err(io::Error::other)?;
            bytes.push(b'\n');
        }
        let part = &mut self.parts[self.current];
        if let Err(e) = part.file.write_all(&bytes) {
            // A partial line is skipped when read; the next record starts on a line of its
            // own.
            let _ = part.file.write_all(b"\n");
            part.len = part.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            return Err(e);
        }
        part.len += bytes.len() as u64;
        let max = records.iter().map(|r| r.id).max();
        part.last_id = part.last_id.max(max);
        Ok(part.path.clone())
    }

    /// Takes back job `id`'s record, durably (appended and synced before this returns): its
    /// admission did not go through (it could not be staged), and its submission is about
    /// to be handed back or rejected, so the record must never make it a job.
    pub fn void(&mut self, id: JobId) -> io::Result<()> {
        let mut line = serde_json::to_vec(&Void { void: id }).map_err(io::Error::other)?;
        line.push(b'\n');
        let part = &mut self.parts[self.current];
        part.file.write_all(&line)?;
        part.len += line.len() as u64;
        part.last_id = part.last_id.max(Some(id));
        part.file.sync_data()
    }

    /// The files of every job up to `id` are durable: a file whose records are all of such
    /// jobs is emptied. (Not synced: should the emptying be lost, the records are read
    /// again at start-up and find their jobs whole.)
    pub fn durable_through(&mut self, id: JobId) {
        for part in &mut self.parts {
            // An empty file is left alone: `ftruncate` would still touch its mtime.
            if part.last_id.is_some_and(|last| last <= id)
                && (part.len == 0 || part.file.set_len(0).is_ok())
            {
                part.len = 0;
                part.last_id = None;
            }
        }
    }

    /// Whether a record waits for its job's files to become durable.
    pub fn holds_records(&self) -> bool {
        self.parts.iter().any(|p| p.last_id.is_some())
    }

    /// Empties both files and syncs them (at start-up, once every record's job is whole and
    /// durable).
    pub fn clear(&mut self) -> io::Result<()> {
        for part in &mut self.parts {
            part.file.set_len(0)?;
            part.file.sync_all()?;
            part.len = 0;
            part.last_id = None;
        }
        self.current = 0;
        Ok(())
    }
}

/// Opens one journal file for appending; whether it was created now.
fn open_part(path: PathBuf) -> io::Result<(Part, bool)> {
    let open = |create: bool| {
        OpenOptions::new()
            .append(true)
            .create_new(create)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .mode(0o600)
            .open(&path)
    };
    let (file, made) = match open(false) {
        Ok(f) => (f, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (open(true)?, true),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a regular file", path.display()),
        ));
    }
    let len = meta.len();
    Ok((
        Part {
            path,
            file,
            len,
            // Records left by an earlier daemon: kept until start-up has read them and
            // cleared the files.
            last_id: (len > 0).then_some(JobId::MAX),
        },
        made,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: JobId) -> Record {
        use crate::resources::{Demand, NodeDemand};
        Record {
            id,
            info: JobInfo {
                id,
                name: format!("j{id}"),
                user: "alice".into(),
                uid: 1000,
                gid: 1000,
                status: crate::spool::Status::Pending,
                submitted: "2026-11-28T10:00:00Z".into(),
                started: None,
                ended: None,
                resources: "1x[CPU:1]".into(),
                demand: Demand {
                    num_nodes: 1,
                    per_node: NodeDemand::default(),
                },
                num_nodes: 1,
                source: format!("incoming/j{id}.yaml"),
                has_workdir: false,
                placement: vec![],
                exit_codes: vec![],
                reason: None,
            },
            yaml: format!("name: j{id}\nrun: echo {id}\n"),
            file: None,
        }
    }

    #[test]
    fn records_survive_reopening_and_torn_lines_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let path = j.append(&[record(1), record(2)]).unwrap();
        j.append(&[record(3)]).unwrap();
        // A torn last line (a power cut in the middle of a write).
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":4,\"info\":{\"id\"").unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        let ids: Vec<JobId> = j.records().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![1, 2, 3]);
        assert_eq!(j.records()[1], record(2));
        assert!(
            j.holds_records(),
            "records of an earlier daemon are kept until cleared"
        );
    }

    #[test]
    fn a_file_is_emptied_once_all_its_jobs_are_durable_and_appends_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let first = j.append(&[record(1)]).unwrap();
        j.append(&[record(2)]).unwrap();
        j.durable_through(1);
        assert_eq!(j.records().len(), 2, "job 2's record is still needed");
        j.durable_through(2);
        assert!(j.records().is_empty());
        assert!(!j.holds_records());
        // Fill the current file past the switch size: the next round goes to the other.
        j.parts[j.current].len = Journal::SWITCH_BYTES;
        j.parts[j.current].last_id = Some(3);
        let second = j.append(&[record(4)]).unwrap();
        assert_ne!(first, second);
        // The other file still holds a record: appends stay where they are.
        j.parts[j.current].len = Journal::SWITCH_BYTES;
        assert_eq!(j.append(&[record(5)]).unwrap(), second);
        j.durable_through(5);
        assert!(!j.holds_records());
    }

    #[test]
    fn a_voided_record_is_not_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&[record(1)]).unwrap();
        j.append(&[record(2)]).unwrap();
        j.void(1).unwrap();
        let ids: Vec<JobId> = j.records().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![2]);
    }

    #[test]
    fn clear_empties_both_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&[record(1)]).unwrap();
        j.clear().unwrap();
        assert!(j.records().is_empty());
        for p in Journal::paths(dir.path()) {
            assert_eq!(std::fs::metadata(p).unwrap().len(), 0);
        }
    }

    #[test]
    fn a_link_in_place_of_a_journal_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("journal.0")).unwrap();
        assert!(Journal::open(dir.path()).is_err());
    }
}
