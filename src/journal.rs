//! The spool's journal: what makes a batch of admissions, and the ends of jobs, durable
//! with one `fsync`.
//!
//! An admission round (see `spool-layout.md`, "Admission") must make each job of the batch
//! durable before any of them runs: its `job.yaml`, its `info.json` and their names in
//! `jobs/`. Syncing those files and directories takes four fsyncs per round, each with its
//! own cache flush on a journal-less filesystem, and the round is what a lone job's first
//! command waits for. Instead, the round appends one record per job (the job's record and
//! its `job.yaml` text) to `.skyspool/journal.0` or `.skyspool/journal.1` and fsyncs that one
//! file. Likewise a job's end: its final `info.json` is appended as an end record when the
//! daemon settles it (the fsync of the file shared with the next round, or started a few
//! milliseconds later), so that a power cut cannot make a finished job run again. The job
//! files themselves are not synced one by one: a **checkpoint** (`syncfs` of the spool's
//! filesystem: one cache flush for everything written) makes them durable once a file
//! holds [`Journal::SWITCH_BYTES`] or its oldest record is [`CHECKPOINT_AFTER`] old, and
//! then the records before it are dropped (the file is truncated). At start-up, an
//! admission record whose job is missing or incomplete on disk (a power cut lost what was
//! not synced yet) gives the job back its files, and an end record gives a job that is not
//! settled on disk its final record, before anything else is recovered.
//!
//! Two files take turns so that a busy queue never waits for a checkpoint: a checkpoint
//! seals the file appends went to, appends go to the other (empty) one, and the sealed one
//! is emptied once the checkpoint is through.

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

/// A job's end: its final `info.json` (see [`Journal::append_ends`]); written from a
/// reference, read back owned.
#[derive(Serialize, Deserialize)]
struct End<I> {
    end: I,
}

/// How long records wait at most, by default, for the checkpoint that drops them (see
/// [`Journal::checkpoint_due`]): the kernel has written the files back by then anyway
/// (`vm.dirty_expire_centisecs`), so the `syncfs` has little left to write.
pub const CHECKPOINT_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// One of the two journal files.
struct Part {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Part {
    /// Takes the file's length from the file, after a write that may have been partial
    /// (`u64::MAX` when it cannot be read: never taken for empty).
    fn reread_len(&mut self) {
        self.len = self.file.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
    }
}

/// The two journal files of a spool (see the module documentation).
pub struct Journal {
    parts: [Part; 2],
    /// The file appends go to.
    current: usize,
    /// The file a checkpoint is for (see [`Journal::seal`]), until it is emptied.
    sealed: Option<usize>,
    /// When the first record since the last checkpoint was appended.
    since: Option<std::time::Instant>,
    /// How long records wait at most for a checkpoint.
    after: std::time::Duration,
    /// Lines start-up could not act on (see [`Journal::keep_only`]): they stay in the file
    /// appends go to, moved to the other one at each checkpoint, until a start acts on them.
    carried: Vec<u8>,
}

impl Journal {
    /// A checkpoint is due once the file appends go to holds this many bytes.
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
            sealed: None,
            since: None,
            after: CHECKPOINT_AFTER,
            carried: Vec::new(),
        })
    }

    /// Records wait at most `after` for a checkpoint (instead of [`CHECKPOINT_AFTER`]).
    pub fn checkpoint_after(mut self, after: std::time::Duration) -> Journal {
        self.after = after;
        self
    }

    /// Every intact line of both files, as JSON text.
    fn lines(&self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for part in &self.parts {
            let Ok(f) = File::open(&part.path) else {
                continue;
            };
            out.extend(io::BufReader::new(f).split(b'\n').map_while(|l| l.ok()));
        }
        out
    }

    /// Every intact record in both files (a line that does not parse, such as one a power
    /// cut tore, is skipped: its round was never through, so nothing of its jobs ran).
    /// Records taken back by a later void line are left out.
    pub fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        let mut void = std::collections::HashSet::new();
        for line in self.lines() {
            if let Ok(r) = serde_json::from_slice::<Record>(&line) {
                out.push(r);
            } else if let Ok(v) = serde_json::from_slice::<Void>(&line) {
                void.insert(v.void);
            }
        }
        out.retain(|r| !void.contains(&r.id));
        out
    }

    /// The final records of the jobs whose end is in either file (a torn one skipped).
    pub fn ends(&self) -> Vec<JobInfo> {
        self.lines()
            .iter()
            .filter_map(|line| serde_json::from_slice::<End<JobInfo>>(line).ok())
            .map(|e| e.end)
            .collect()
    }

    /// Appends the records of one round to the current file, in one write, and returns
    /// that file's path: the round is durable once it is fsynced.
    pub fn append(&mut self, records: &[Record]) -> io::Result<PathBuf> {
        self.write_lines(&json_lines(records)?)
    }

    /// Appends the final records of jobs that ended (each a settled `info.json`), in one
    /// write, and returns the file's path: they are durable once it is fsynced.
    pub fn append_ends(&mut self, ends: &[&JobInfo]) -> io::Result<PathBuf> {
        self.write_lines(&json_lines(ends.iter().map(|end| End { end }))?)
    }

    fn write_lines(&mut self, bytes: &[u8]) -> io::Result<PathBuf> {
        let part = &mut self.parts[self.current];
        if let Err(e) = part.file.write_all(bytes) {
            // A partial line is skipped when read; the next record starts on a line of its
            // own.
            let _ = part.file.write_all(b"\n");
            part.reread_len();
            return Err(e);
        }
        part.len += bytes.len() as u64;
        self.since.get_or_insert_with(std::time::Instant::now);
        Ok(part.path.clone())
    }

    /// Takes back job `id`'s record, durably (appended and synced before this returns): its
    /// admission did not go through (it could not be staged), and its submission is about
    /// to be handed back or rejected, so the record must never make it a job.
    pub fn void(&mut self, id: JobId) -> io::Result<()> {
        let line = json_lines([Void { void: id }])?;
        let part = &mut self.parts[self.current];
        part.file.write_all(&line)?;
        part.len += line.len() as u64;
        part.file.sync_data()
    }

    /// When the next checkpoint is due (see [`Journal::seal`]), it being `now`: at once
    /// (`now`), where the file appends go to holds [`Journal::SWITCH_BYTES`] or a sealed
    /// file waits for one (an earlier checkpoint failed); else [`Journal::checkpoint_after`]
    /// after the oldest record since the last one; `None` while there are no records.
    pub fn checkpoint_due(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        let own = self.parts[self.current]
            .len
            .saturating_sub(self.carried.len() as u64);
        if self.sealed.is_some() || own >= Journal::SWITCH_BYTES {
            return Some(now);
        }
        self.since.map(|t| t + self.after)
    }

    /// Starts a checkpoint: seals the file appends went to (appends go to the other one
    /// from now on) and returns it; a checkpoint (`syncfs`) started after this call makes
    /// every record in it unneeded, and [`Journal::checkpointed`] then empties it. A file
    /// sealed before and not emptied (its checkpoint failed) is returned again. The lines
    /// start-up left ([`Journal::keep_only`]) are written to the other file first, so that
    /// the same checkpoint makes them durable there. `None`: nothing to checkpoint (no
    /// line but those), or the other file is not empty. An error: the lines left could not
    /// be written there, and nothing is sealed.
    pub fn seal(&mut self) -> io::Result<Option<usize>> {
        if self.sealed.is_some() {
            return Ok(self.sealed);
        }
        let other = 1 - self.current;
        let carried = self.carried.len() as u64;
        if self.parts[self.current].len <= carried || self.parts[other].len != 0 {
            self.since = None;
            return Ok(None);
        }
        if carried > 0 {
            let part = &mut self.parts[other];
            if let Err(e) = part.file.write_all(&self.carried) {
                // Nothing sealed: the lines stay where they are. (A partial line is
                // skipped when read, and the file is emptied at the next try's start.)
                let _ = part.file.set_len(0);
                part.reread_len();
                return Err(e);
            }
            part.len = carried;
        }
        self.sealed = Some(self.current);
        self.current = other;
        self.since = None;
        Ok(self.sealed)
    }

    /// The checkpoint for the sealed file `part` is through: the file is emptied. (Not
    /// synced: should the emptying be lost, its records are read again at start-up and
    /// find their jobs whole and settled.)
    pub fn checkpointed(&mut self, part: usize) {
        if self.sealed != Some(part) {
            return;
        }
        let p = &mut self.parts[part];
        // An empty file is left alone: `ftruncate` would still touch its mtime.
        if p.len == 0 || p.file.set_len(0).is_ok() {
            p.len = 0;
            self.sealed = None;
        }
    }

    /// Whether either file holds a record other than the lines start-up left.
    pub fn holds_records(&self) -> bool {
        self.parts.iter().map(|p| p.len).sum::<u64>() > self.carried.len() as u64
    }

    /// Empties both files and syncs them (at start-up, once every record's job is whole and
    /// durable; at a clean stop, after a last `syncfs`), but for the lines start-up left
    /// ([`Journal::keep_only`]), which are written again to the first file and synced there.
    pub fn clear(&mut self) -> io::Result<()> {
        // In an order that leaves every line kept in a durable file whatever step fails:
        // copied to the second file, then the first one made of them alone, then the second
        // one emptied. (A line twice in the journal is read as once.)
        let carried = std::mem::take(&mut self.carried);
        let result = (|| -> io::Result<()> {
            let [first, second] = &mut self.parts;
            if !carried.is_empty() {
                second.file.write_all(&carried)?;
                second.file.sync_data()?;
            }
            first.file.set_len(0)?;
            first.len = 0;
            first.file.write_all(&carried)?;
            first.len = carried.len() as u64;
            first.file.sync_all()?;
            second.file.set_len(0)?;
            second.len = 0;
            second.file.sync_all()
        })();
        self.carried = carried;
        if result.is_err() {
            self.parts.iter_mut().for_each(Part::reread_len);
        }
        result?;
        self.current = 0;
        self.sealed = None;
        self.since = None;
        Ok(())
    }

    /// At start-up, when the records of some jobs could not be acted on (their job could not
    /// be given back its files): the journal keeps every line of those jobs (`ids`), and only
    /// those, for the next start, as [`Journal::clear`] leaves them, through every
    /// checkpoint and clean stop of this daemon. The other lines are dropped (their jobs are
    /// whole and durable).
    pub fn keep_only(&mut self, ids: &std::collections::BTreeSet<JobId>) -> io::Result<()> {
        let mut kept = Vec::new();
        for line in self.lines() {
            if line_job(&line).is_some_and(|id| ids.contains(&id)) {
                kept.extend_from_slice(&line);
                kept.push(b'\n');
            }
        }
        self.carried = kept;
        self.clear()
    }
}

/// The job a line is about: an admission record's, an end's or a taken-back record's.
fn line_job(line: &[u8]) -> Option<JobId> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: JobId,
    }
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Line {
        Record(IdOnly),
        End(End<IdOnly>),
        Void(Void),
    }
    Some(match serde_json::from_slice::<Line>(line).ok()? {
        Line::Record(r) => r.id,
        Line::End(e) => e.end.id,
        Line::Void(v) => v.void,
    })
}

/// `items` as JSON, one per line.
fn json_lines<T: Serialize>(items: impl IntoIterator<Item = T>) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    for item in items {
        serde_json::to_writer(&mut bytes, &item).map_err(io::Error::other)?;
        bytes.push(b'\n');
    }
    Ok(bytes)
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
        // Records left by an earlier daemon are kept until start-up has read them and
        // cleared the files.
        Part { path, file, len },
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
    fn a_checkpoint_empties_the_sealed_file_and_appends_take_turns() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let now = std::time::Instant::now;
        assert!(j.checkpoint_due(now()).is_none(), "nothing to checkpoint");
        assert_eq!(j.seal().unwrap(), None);
        let first = j.append(&[record(1)]).unwrap();
        let due = j
            .checkpoint_due(now())
            .expect("a record waits for a checkpoint");
        assert!(due > now() + CHECKPOINT_AFTER / 2);
        let sealed = j.seal().unwrap().expect("the file with the record");
        // Appends made while the checkpoint runs go to the other file and stay.
        let second = j.append(&[record(2)]).unwrap();
        assert_ne!(first, second);
        assert_eq!(
            j.seal().unwrap(),
            Some(sealed),
            "sealed until it is emptied"
        );
        j.checkpointed(sealed);
        let ids: Vec<JobId> = j.records().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![2]);
        assert!(j.holds_records());
        // A full file makes the checkpoint due at once.
        j.parts[j.current].len = Journal::SWITCH_BYTES;
        let t = now();
        assert_eq!(j.checkpoint_due(t), Some(t), "due at once");
        j.parts[j.current].len = 1;
        let sealed = j.seal().unwrap().unwrap();
        assert_eq!(j.append(&[record(3)]).unwrap(), first);
        j.checkpointed(sealed);
        let ids: Vec<JobId> = j.records().iter().map(|r| r.id).collect();
        assert_eq!(ids, vec![3]);
    }

    #[test]
    fn ends_are_read_back_apart_from_admissions() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&[record(1), record(2)]).unwrap();
        let mut done = record(1).info;
        done.status = crate::spool::Status::Succeeded;
        done.exit_codes = vec![Some(0)];
        j.append_ends(&[&done]).unwrap();
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(j.records().len(), 2);
        assert_eq!(j.ends(), vec![done]);
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

    /// The lines of jobs start-up could not restore outlive every checkpoint and clean
    /// stop of the daemon that found them, take no part in when a checkpoint is due, and
    /// are read by the next start; every other line goes as before.
    #[test]
    fn lines_start_up_could_not_act_on_stay_through_checkpoints_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.append(&[record(1), record(2)]).unwrap();
        let mut two = record(2).info;
        two.status = crate::spool::Status::Succeeded;
        j.append_ends(&[&two]).unwrap();
        j.void(3).unwrap();
        j.append(&[record(4)]).unwrap();
        drop(j);
        let mut j = Journal::open(dir.path()).unwrap();
        j.keep_only(&[2, 3].into_iter().collect()).unwrap();
        let ids = |j: &Journal| j.records().iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(&j), vec![2]);
        assert_eq!(j.ends(), vec![two.clone()]);
        let now = std::time::Instant::now;
        assert!(!j.holds_records(), "only kept lines");
        assert!(
            j.checkpoint_due(now()).is_none(),
            "no timer for kept lines alone"
        );
        assert_eq!(j.seal().unwrap(), None, "nothing to checkpoint");
        // A checkpoint moves them to the file appends go to next, then empties the other.
        for round in 5..8 {
            j.append(&[record(round)]).unwrap();
            assert!(j.holds_records());
            let sealed = j.seal().unwrap().expect("a new record to checkpoint");
            let mut both = ids(&j);
            both.sort_unstable();
            assert_eq!(both, vec![2, 2, round], "kept lines in both files");
            j.checkpointed(sealed);
            assert_eq!(ids(&j), vec![2]);
            assert_eq!(j.ends(), vec![two.clone()]);
        }
        // Many kept bytes do not make a checkpoint due at once.
        j.carried
            .extend(std::iter::repeat_n(b' ', Journal::SWITCH_BYTES as usize));
        j.parts[j.current].len += Journal::SWITCH_BYTES;
        assert!(j.checkpoint_due(now()).is_none());
        j.carried
            .truncate(j.carried.len() - Journal::SWITCH_BYTES as usize);
        j.parts[j.current].len -= Journal::SWITCH_BYTES;
        // A clean stop's clear keeps them, synced in the first file alone.
        j.append(&[record(9)]).unwrap();
        j.clear().unwrap();
        let [first, second] = Journal::paths(dir.path());
        assert_eq!(std::fs::metadata(&second).unwrap().len(), 0);
        assert!(std::fs::metadata(&first).unwrap().len() > 0);
        drop(j);
        let j = Journal::open(dir.path()).unwrap();
        assert_eq!(ids(&j), vec![2]);
        assert_eq!(j.ends(), vec![two]);
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
