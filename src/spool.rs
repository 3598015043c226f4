//! All on-disk state of a spool and every atomic move on it.
//!
//! `spool-layout.md` is this module's contract: every path written here is described there,
//! with who writes it and how. Every visible change is a `rename(2)` (of a whole directory,
//! a symlink, or a fully written temporary file), so a reader never sees a half-written file
//! or a job in two state directories.

use crate::scheduler::JobId;
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

mod durable;
mod files;
pub use durable::*;
pub use files::*;

/// Largest job YAML the daemon reads (bigger files are rejected unread).
pub const MAX_YAML_BYTES: u64 = 1024 * 1024;

/// Errors of spool operations, with the path they concern.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("another skyspool daemon already serves {0} (lock {1} is held); stop it first")]
    Locked(PathBuf, PathBuf),
    #[error("{path}: corrupt state file: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("job {0} does not exist in this spool")]
    NoSuchJob(JobId),
}

pub type Result<T> = std::result::Result<T, SpoolError>;

/// Attach the path to an io::Error.
pub(crate) trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| SpoolError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

/// Job status, exactly SkyPilot's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Init,
    Pending,
    SettingUp,
    Running,
    Succeeded,
    Failed,
    FailedSetup,
    FailedDriver,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Init,
        Status::Pending,
        Status::SettingUp,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::FailedSetup,
        Status::FailedDriver,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Init => "INIT",
            Status::Pending => "PENDING",
            Status::SettingUp => "SETTING_UP",
            Status::Running => "RUNNING",
            Status::Succeeded => "SUCCEEDED",
            Status::Failed => "FAILED",
            Status::FailedSetup => "FAILED_SETUP",
            Status::FailedDriver => "FAILED_DRIVER",
            Status::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(word: &str) -> Option<Status> {
        Status::ALL.into_iter().find(|s| s.as_str() == word.trim())
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Succeeded
                | Status::Failed
                | Status::FailedSetup
                | Status::FailedDriver
                | Status::Cancelled
        )
    }

    /// How far a job has come: a job's status only ever moves to a higher one, except when
    /// the daemon puts a job that never ran back in the queue.
    pub fn progress(self) -> u8 {
        match self {
            Status::Init | Status::Pending => 0,
            Status::SettingUp => 1,
            Status::Running => 2,
            _ => 3,
        }
    }

    /// The state directory a job with this status is linked from.
    pub fn state(self) -> State {
        match self {
            Status::Init | Status::Pending => State::Pending,
            Status::SettingUp | Status::Running => State::Running,
            _ => State::Done,
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The three state directories a job is linked from, one at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum State {
    Pending,
    Running,
    Done,
}

impl State {
    pub const ALL: [State; 3] = [State::Pending, State::Running, State::Done];
    pub fn dir_name(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Running => "running",
            State::Done => "done",
        }
    }
}

/// One node's share of a running job, as recorded in `info.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAssignment {
    pub rank: u32,
    pub node: String,
    pub ip: String,
    pub accelerator: Option<String>,
    /// GPU indices given on that node (what `CUDA_VISIBLE_DEVICES` holds).
    pub gpus: Vec<u32>,
    /// Share of each GPU above, in the same order (`"1"`, `"0.5"`).
    pub gpu_shares: Vec<String>,
    pub cpus: String,
}

/// `jobs/<id>/info.json`: the machine-readable record of a job. Written by the daemon only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: JobId,
    pub name: String,
    pub user: String,
    pub uid: u32,
    pub gid: u32,
    pub status: Status,
    /// RFC 3339 times (UTC).
    pub submitted: String,
    pub started: Option<String>,
    pub ended: Option<String>,
    /// The `sky queue` RESOURCES column, e.g. `1x[H100:4]`.
    pub resources: String,
    /// The parsed demand the scheduler used.
    pub demand: crate::resources::Demand,
    pub num_nodes: u32,
    /// Where the submission came from (`incoming/NAME.yaml` or `incoming/NAME/`).
    pub source: String,
    /// True when the submission carried files (`jobs/<id>/workdir/`).
    pub has_workdir: bool,
    /// Filled when the job starts: one entry per node, rank order.
    pub placement: Vec<NodeAssignment>,
    /// Exit code per node (rank order) once known; `null` where a node gave none.
    pub exit_codes: Vec<Option<i32>>,
    /// Why the job ended the way it did (cancel, driver loss, ...), when there is more to say.
    pub reason: Option<String>,
}

/// What the per-job supervisor records when it finishes (a line of
/// `jobs/<id>/.sky/supervisor.lock`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobResult {
    pub status: Status,
    pub exit_codes: Vec<Option<i32>>,
    pub ended: String,
    pub reason: Option<String>,
}

/// What the daemon records in `jobs/<id>/.sky/supervisor.lock` (first line) when it
/// launches a job, before the supervisor gets it: where the job runs and since when. With
/// it, a restarted daemon knows the job's resources even if it died before `info.json` said.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchRecord {
    pub started: String,
    pub placement: Vec<NodeAssignment>,
}

/// What the per-job supervisor records when it takes a job (a line appended to
/// `jobs/<id>/.sky/supervisor.lock`, after the daemon's [`LaunchRecord`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorRecord {
    pub pid: u32,
    /// Process start time (clock ticks since boot, `/proc/PID/stat` field 22): with the pid,
    /// the identity of the supervisor that PID reuse cannot fake.
    pub start_ticks: u64,
}

/// What a name in `incoming/` is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// Not a submission (dot-files, editor swap/backup files, partial downloads): left alone.
    Ignore,
    /// A job YAML file.
    File,
    /// A directory holding `job.yaml` and the job's files.
    Dir,
    /// Something that can never be a submission; moved to `rejected/` with this reason.
    Bad(String),
}

/// A claimed submission, moved out of `incoming/` into `.skyspool/staging/<id>/`.
#[derive(Clone, Debug)]
pub struct Claimed {
    pub id: JobId,
    /// `.skyspool/staging/<id>`.
    pub dir: PathBuf,
    /// The claimed file or directory: `staging/<id>/in--NAME`.
    pub content: PathBuf,
    /// `incoming/NAME` (or `incoming/NAME/`).
    pub source: String,
    pub uid: u32,
    pub gid: u32,
    pub has_workdir: bool,
    /// Its `info.json` is written: only publishing is left.
    pub staged: bool,
    /// Which file was claimed from `incoming/` (a file submission claimed by rename).
    pub file: Option<FileIdent>,
}

/// What tells a claimed file apart from any later file of the same name: its inode, size
/// and modification time (a rename keeps all three).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdent {
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileIdent {
    pub fn of(meta: &fs::Metadata) -> FileIdent {
        FileIdent {
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

/// Prefix of a claimed submission's name inside its staging directory.
pub const CLAIM_PREFIX: &str = "in--";

fn source_of(name: &OsStr, dir: bool) -> String {
    format!(
        "incoming/{}{}",
        display_name(name),
        if dir { "/" } else { "" }
    )
}

/// The original name of a claimed path `.../in--NAME`.
fn claimed_name(content: &Path) -> Option<String> {
    let n = content.file_name()?.to_str()?;
    n.strip_prefix(CLAIM_PREFIX)
        .filter(|n| !n.is_empty())
        .map(str::to_string)
}

/// A spool directory.
#[derive(Clone, Debug)]
pub struct Spool {
    root: PathBuf,
}

/// Holds the daemon's exclusive lock on a spool for as long as it lives.
#[derive(Debug)]
pub struct SpoolLock {
    _file: File,
}

const PRIVATE: &str = ".skyspool";

impl Spool {
    /// A spool at `root`; nothing is created (readers use this).
    pub fn at(root: impl Into<PathBuf>) -> Spool {
        Spool { root: root.into() }
    }

    /// Creates the layout where missing (the daemon uses this) and sets its modes.
    pub fn create(root: impl Into<PathBuf>) -> Result<Spool> {
        let spool = Spool::at(root);
        fs::create_dir_all(&spool.root).at(&spool.root)?;
        let root = fs::canonicalize(&spool.root).at(&spool.root)?;
        let spool = Spool { root };
        for (dir, mode) in [
            ("incoming", 0o1777),
            ("jobs", 0o755),
            ("pending", 0o755),
            ("running", 0o755),
            ("done", 0o755),
            ("rejected", 0o1777),
            (PRIVATE, 0o700),
            (".skyspool/staging", 0o700),
            (".skyspool/secrets", 0o700),
        ] {
            let p = spool.root.join(dir);
            create_dir_if_missing(&p)?;
            let meta = fs::symlink_metadata(&p).at(&p)?;
            if !meta.is_dir() {
                return Err(SpoolError::Corrupt {
                    path: p,
                    message: "expected a directory".into(),
                });
            }
            if meta.mode() & 0o7777 != mode {
                fs::set_permissions(&p, fs::Permissions::from_mode(mode)).at(&p)?;
            }
        }
        Ok(spool)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn incoming(&self) -> PathBuf {
        self.root.join("incoming")
    }
    pub fn rejected(&self) -> PathBuf {
        self.root.join("rejected")
    }
    pub fn jobs(&self) -> PathBuf {
        self.root.join("jobs")
    }
    pub fn job_dir(&self, id: JobId) -> PathBuf {
        self.jobs().join(id.to_string())
    }
    pub fn state_dir(&self, state: State) -> PathBuf {
        self.root.join(state.dir_name())
    }
    pub fn private(&self) -> PathBuf {
        self.root.join(PRIVATE)
    }
    pub fn staging(&self) -> PathBuf {
        self.private().join("staging")
    }
    pub fn secrets_file(&self, id: JobId) -> PathBuf {
        self.private().join("secrets").join(format!("{id}.json"))
    }
    /// `jobs/<id>/.sky/`: the supervisor's and the daemon's private files of one job.
    pub fn job_private(&self, id: JobId) -> PathBuf {
        self.job_dir(id).join(".sky")
    }

    /// Takes the daemon lock (`.skyspool/lock`, flock); fails if another daemon holds it.
    pub fn lock(&self) -> Result<SpoolLock> {
        let path = self.private().join("lock");
        let mut file = open_private_file(&path)?;
        match flock_raw(&file, libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = writeln!(file, "{}", std::process::id());
                Ok(SpoolLock { _file: file })
            }
            Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => {
                Err(SpoolError::Locked(self.root.clone(), path))
            }
            Err(e) => Err(e).at(&path),
        }
    }

    // ---------------------------------------------------------------- ids

    /// This spool's instance id (`.skyspool/id`): 32 random hex digits, made once and kept.
    /// It names what a job leaves outside the spool (its private directories on remote
    /// nodes, the tag its processes carry), so two spools, even with the same cluster name
    /// and job ids, never mistake each other's jobs. The file also records the inode of the
    /// spool's root: a copy of the spool (`cp -a`, rsync) gets an id of its own at its first
    /// start instead of the original's. Call with the daemon lock held.
    pub fn instance_id(&self) -> Result<String> {
        let dir = self.private();
        let path = dir.join("id");
        let root_ino = fs::metadata(&self.root).at(&self.root)?.ino();
        match fs::read_to_string(&path) {
            Ok(s) => {
                let mut words = s.split_whitespace();
                if let (Some(id), Some(ino)) = (words.next(), words.next()) {
                    if is_instance_id(id) && ino.parse() == Ok(root_ino) {
                        return Ok(id.to_string());
                    }
                }
                // Torn, edited, or copied from another spool: make a new one.
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).at(&path),
        }
        let mut bytes = [0u8; 16];
        let mut got = 0;
        while got < bytes.len() {
            // SAFETY: the pointer and length describe the unfilled rest of `bytes`.
            let n =
                unsafe { libc::getrandom(bytes[got..].as_mut_ptr().cast(), bytes.len() - got, 0) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e).at(&path);
            }
            got += n as usize;
        }
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("{id} {root_ino}\n");
        write_atomic_mode(&dir, "id", text.as_bytes(), true, 0o600)?;
        sync_dir(&dir)?;
        Ok(id)
    }

    /// The next ID to give: one above the highest ever given (counter file, job
    /// directories and staged admissions all count, so an ID is never reused).
    pub fn next_id(&self) -> Result<JobId> {
        let counter_path = self.private().join("last-id");
        let mut max: JobId = match fs::read_to_string(&counter_path) {
            Ok(s) => s.trim().parse().unwrap_or(0),
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(e).at(&counter_path),
        };
        for dir in [self.jobs(), self.staging()] {
            for id in numeric_entries(&dir)? {
                max = max.max(id);
            }
        }
        Ok(max + 1)
    }

    /// Records `id` as the highest ID given, durably. The file is rewritten in place with a
    /// fixed width (one sector, so a crash leaves the old or the new number), which costs no
    /// new inode per admission batch.
    pub fn record_last_id(&self, id: JobId) -> Result<()> {
        let path = self.write_last_id(id)?;
        sync_file(&path)
    }

    /// Writes `id` as the highest ID given, not yet durably: an admission batch syncs it later,
    /// with other files (see `Daemon::finish_round`). Returns the file.
    pub fn write_last_id(&self, id: JobId) -> Result<PathBuf> {
        use std::os::unix::fs::FileExt;
        let path = self.private().join("last-id");
        let f = open_private_file(&path)?;
        f.write_all_at(format!("{id:020}\n").as_bytes(), 0)
            .at(&path)?;
        Ok(path)
    }

    // ----------------------------------------------------------- incoming

    /// Names in `incoming/`, sorted by modification time then name (submission order).
    pub fn list_incoming(&self) -> Result<Vec<std::ffi::OsString>> {
        let dir = self.incoming();
        let mut entries = Vec::new();
        for entry in fs::read_dir(&dir).at(&dir)? {
            let entry = entry.at(&dir)?;
            let name = entry.file_name();
            if classify_incoming(&name, None) == Incoming::Ignore {
                continue;
            }
            let mtime = entry
                .metadata()
                .map(|m| (m.mtime(), m.mtime_nsec()))
                .unwrap_or((0, 0));
            entries.push((mtime, name));
        }
        entries.sort();
        Ok(entries.into_iter().map(|(_, n)| n).collect())
    }

    /// Inspects `incoming/<name>` without following links or opening anything.
    pub fn inspect_incoming(&self, name: &OsStr) -> Result<Option<(Incoming, fs::Metadata)>> {
        let path = self.incoming().join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).at(&path),
        };
        Ok(Some((classify_incoming(name, Some(&meta)), meta)))
    }

    /// Reads `incoming/<name>` (a regular file) if no one has it open for writing.
    /// `Ok(None)` = a writer still has it open: wait for its close.
    pub fn read_incoming_file(&self, name: &OsStr) -> Result<Option<Vec<u8>>> {
        let path = self.incoming().join(name);
        read_file_unless_writing(&path)
    }

    /// Claims a submission: one rename moves it out of `incoming/` into the staging
    /// directory of job `id`, as `in--NAME` (so its name survives a crash). From this moment
    /// it is this job's and nobody else's.
    pub fn claim(&self, name: &OsStr, kind: &Incoming, id: JobId) -> Result<Claimed> {
        let src = self.incoming().join(name);
        let meta = fs::symlink_metadata(&src).at(&src)?;
        let dir = self.make_staging_dir(id)?;
        let mut target_name = std::ffi::OsString::from(CLAIM_PREFIX);
        target_name.push(name);
        fs::rename(&src, dir.join(&target_name)).at(&src)?;
        let has_workdir = *kind == Incoming::Dir;
        Ok(Claimed {
            id,
            source: source_of(name, has_workdir),
            content: dir.join(target_name),
            dir,
            uid: meta.uid(),
            gid: meta.gid(),
            has_workdir,
            staged: false,
            file: (!has_workdir).then(|| FileIdent::of(&meta)),
        })
    }

    /// Claims a submission made through the FUSE mount: its bytes are written straight
    /// into staging as `in--NAME`, owned by the writer.
    pub fn claim_bytes(
        &self,
        name: &str,
        bytes: &[u8],
        uid: u32,
        gid: u32,
        id: JobId,
    ) -> Result<Claimed> {
        let dir = self.make_staging_dir(id)?;
        let content_name = format!("{CLAIM_PREFIX}{name}");
        write_atomic(&dir, &content_name, bytes, false)?;
        let content = dir.join(&content_name);
        let _ = nix::unistd::chown(
            &content,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        );
        Ok(Claimed {
            id,
            source: source_of(OsStr::new(name), false),
            content,
            dir,
            uid,
            gid,
            has_workdir: false,
            staged: false,
            // Written here, never in `incoming/`.
            file: None,
        })
    }

    /// Makes `staging/<id>/` ahead of the claim that will use it: the directory, its `.sky/`
    /// and an empty `log`, as staging makes them, so that a lone submission's launch does
    /// not wait for them. A claim of `id` renames its submission into it; one left at
    /// start-up holds no claimed entry and is removed like any such staging directory.
    pub fn prepare_staging(&self, id: JobId) -> Result<()> {
        let dir = self.make_staging_dir(id)?;
        make_private_dir(&dir)?;
        open_log(&dir, "log").map(drop)
    }

    /// Gives a job admitted through the journal (see [`crate::journal`]) back whatever of
    /// its admission a power cut lost: its directory (in `staging/`, to be published like
    /// any staged job, when neither `jobs/<id>` nor `staging/<id>` is there), `job.yaml`
    /// (missing, or not the recorded length), `info.json` (missing or unreadable),
    /// `status`, `log` and `.sky/`. A job found whole is left as it is. Returns the
    /// directory the job is in and the paths to sync (`true`: a directory), none when
    /// nothing was written.
    pub fn restore_admission(
        &self,
        r: &crate::journal::Record,
    ) -> Result<(PathBuf, Vec<(PathBuf, bool)>)> {
        let is_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        let published = self.job_dir(r.id);
        let staged = self.staging().join(r.id.to_string());
        // A power cut can lose the claim's rename out of `incoming/` while the journal line
        // is durable: the submission is back there under its name. It is this job's (same
        // inode, size and modification time), not a new one: it must not become a second
        // job.
        let mut written = Vec::new();
        if let (Some(ident), Some(name)) = (r.file, r.info.source.strip_prefix("incoming/")) {
            let back = self.incoming().join(name);
            let same = fs::symlink_metadata(&back)
                .is_ok_and(|m| m.is_file() && FileIdent::of(&m) == ident);
            if same {
                fs::remove_file(&back).at(&back)?;
                written.push((self.incoming(), true));
            }
        }
        let (dir, parent, made) = if is_dir(&published) {
            (published, self.jobs(), false)
        } else if is_dir(&staged) {
            (staged, self.staging(), false)
        } else {
            let dir = self.make_staging_dir(r.id)?;
            make_private_dir(&dir)?;
            (dir, self.staging(), true)
        };
        let yaml = dir.join("job.yaml");
        let yaml_whole = fs::symlink_metadata(&yaml)
            .is_ok_and(|m| m.is_file() && m.len() == r.yaml.len() as u64);
        if !yaml_whole {
            write_private(&dir, "job.yaml", r.yaml.as_bytes())?;
            written.push((yaml, false));
        }
        let info = dir.join("info.json");
        let info_whole = fs::read(&info)
            .ok()
            .is_some_and(|b| serde_json::from_slice::<JobInfo>(&b).is_ok());
        if !info_whole {
            let mut bytes =
                serde_json::to_vec_pretty(&r.info).map_err(|e| SpoolError::Corrupt {
                    path: info.clone(),
                    message: e.to_string(),
                })?;
            bytes.push(b'\n');
            write_private(&dir, "info.json", &bytes)?;
            written.push((info, false));
        }
        if fs::symlink_metadata(dir.join("status")).is_err() {
            write_private(&dir, "status", format!("{}\n", r.info.status).as_bytes())?;
            written.push((dir.join("status"), false));
        }
        open_log(&dir, "log")?;
        create_dir_if_missing(&dir.join(".sky"))?;
        if !written.is_empty() || made {
            written.push((dir.clone(), true));
            written.push((parent, true));
        }
        Ok((dir, written))
    }

    /// Gives a job that ended the final record its journal end line holds (see
    /// [`crate::journal`]), where a power cut lost it: `info.json` when it does not say the
    /// job is settled, `status` when it is not final. A job whose directory is only in
    /// `staging/` (restored there from its admission line) is moved to `jobs/<id>` first,
    /// so that it is never published as pending; one found nowhere (removed by root since)
    /// is left alone. Returns the paths to sync (`true`: a directory), none when nothing was
    /// written.
    pub fn restore_end(&self, end: &JobInfo) -> Result<Vec<(PathBuf, bool)>> {
        let is_dir = |p: &Path| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir());
        let id = end.id;
        let dir = self.job_dir(id);
        let staged = self.staging().join(id.to_string());
        let mut written = Vec::new();
        if !is_dir(&dir) {
            if !is_dir(&staged) {
                return Ok(written);
            }
            finish_claimed_entries(&staged)?;
            fs::rename(&staged, &dir).at(&dir)?;
            written.push((self.staging(), true));
            written.push((self.jobs(), true));
        }
        create_dir_if_missing(&self.job_private(id))?;
        if !self.read_info(id).is_ok_and(|i| i.status.is_terminal()) {
            self.write_info(end)?;
            written.push((dir.join("info.json"), false));
        }
        if !self.read_status(id).is_ok_and(|s| s.is_terminal()) {
            self.write_status(id, end.status)?;
            written.push((dir.join("status"), false));
        }
        if !written.is_empty() {
            written.push((dir, true));
        }
        Ok(written)
    }

    /// `staging/<id>/`, made if it is not there yet (made ahead, or by a claim undone).
    fn make_staging_dir(&self, id: JobId) -> Result<PathBuf> {
        let dir = self.staging().join(id.to_string());
        create_dir_if_missing(&dir)?;
        Ok(dir)
    }

    /// Undoes a claim: the submission goes back to `incoming/` under its own name, and the
    /// staging directory is removed.
    pub fn unclaim(&self, c: &Claimed) -> Result<()> {
        let name = claimed_name(&c.content).unwrap_or_else(|| format!("deferred-{}.yaml", c.id));
        let back = self.incoming().join(&name);
        fs::rename(&c.content, &back).at(&back)?;
        let _ = fs::remove_dir_all(&c.dir);
        Ok(())
    }

    /// Staged admissions left by a daemon that died mid-admission: `staged` ones (their
    /// `info.json` was written) only need publishing; the others need staging again.
    pub fn list_staged(&self) -> Result<Vec<Claimed>> {
        let mut out = Vec::new();
        for id in numeric_entries(&self.staging())? {
            let dir = self.staging().join(id.to_string());
            let info: Option<JobInfo> = fs::read(dir.join("info.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let content = fs::read_dir(&dir)
                .at(&dir)?
                .flatten()
                .find(|e| {
                    e.file_name()
                        .as_bytes()
                        .starts_with(CLAIM_PREFIX.as_bytes())
                })
                .map(|e| e.path());
            match (content, info) {
                (_, Some(info)) => out.push(Claimed {
                    id,
                    content: dir.join(format!("{CLAIM_PREFIX}-")),
                    source: info.source.clone(),
                    uid: info.uid,
                    gid: info.gid,
                    has_workdir: info.has_workdir,
                    staged: true,
                    file: None,
                    dir,
                }),
                (Some(content), None) => {
                    let meta = fs::symlink_metadata(&content).at(&content)?;
                    let name = claimed_name(&content).unwrap_or_else(|| format!("staged-{id}"));
                    out.push(Claimed {
                        id,
                        source: source_of(OsStr::new(&name), meta.is_dir()),
                        has_workdir: meta.is_dir(),
                        content,
                        uid: meta.uid(),
                        gid: meta.gid(),
                        staged: false,
                        file: meta.is_file().then(|| FileIdent::of(&meta)),
                        dir,
                    });
                }
                (None, None) => {
                    // Died between mkdir and the claiming rename: nothing was claimed.
                    let _ = fs::remove_dir_all(&dir);
                }
            }
        }
        Ok(out)
    }

    /// The YAML text of a claimed submission (bounded, no links followed).
    pub fn read_claimed_yaml(&self, c: &Claimed) -> std::result::Result<Vec<u8>, String> {
        let path = if c.has_workdir {
            c.content.join("job.yaml")
        } else {
            c.content.clone()
        };
        match read_file_unless_writing(&path) {
            Ok(Some(bytes)) => Ok(bytes),
            Ok(None) => Err("job.yaml is still open for writing".into()),
            Err(SpoolError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err("the directory has no job.yaml (a job directory must hold job.yaml and the job's files)".into())
            }
            Err(SpoolError::Io { source, .. }) => Err(source.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Makes a staged job visible: the claimed directory becomes `workdir/` (a claimed file
    /// is dropped: `job.yaml` holds its text), `staging/<id>` becomes `jobs/<id>` and
    /// `pending/<id>` links to it. Idempotent, so recovery can redo it after a crash.
    pub fn publish(&self, c: &Claimed) -> Result<()> {
        let dst = self.job_dir(c.id);
        // The claimed entry, by its name; a redo (or a recovery, which knows no name) finds
        // it by listing.
        let direct = if c.has_workdir {
            fs::rename(&c.content, c.dir.join("workdir"))
        } else {
            fs::remove_file(&c.content)
        };
        let look = match direct {
            Ok(()) => false,
            Err(e) if e.kind() == io::ErrorKind::NotFound => true,
            Err(e) => return Err(e).at(&c.content),
        };
        if look && c.dir.exists() {
            finish_claimed_entries(&c.dir)?;
        }
        match fs::rename(&c.dir, &dst) {
            Ok(()) => {}
            // Published already (a redo).
            Err(e) if e.kind() == io::ErrorKind::NotFound && dst.is_dir() => {}
            Err(e) => return Err(e).at(&dst),
        }
        self.link_state(c.id, State::Pending)
    }

    /// Moves a claimed submission to `rejected/` with its reason beside it.
    pub fn reject_claimed(&self, c: &Claimed, reason: &str) -> Result<PathBuf> {
        let name = claimed_name(&c.content).unwrap_or_else(|| format!("staged-{}", c.id));
        let dest = self.reject_path(&name, reason)?;
        fs::rename(&c.content, &dest).at(&dest)?;
        let _ = fs::remove_dir_all(&c.dir);
        Ok(dest)
    }

    /// Records a rejected submission that never was a file in `incoming/` (FUSE writes):
    /// its bytes go to `rejected/NAME`, its reason beside it.
    pub fn reject_bytes(&self, name: &str, bytes: &[u8], reason: &str) -> Result<PathBuf> {
        let dest = self.reject_path(name, reason)?;
        let file_name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "unnamed".into());
        write_atomic(&self.rejected(), &file_name, bytes, false)?;
        Ok(dest)
    }

    /// Moves `incoming/<name>` straight to `rejected/` (never opened: links, FIFOs, ...).
    pub fn reject_incoming(&self, name: &OsStr, reason: &str) -> Result<PathBuf> {
        let src = self.incoming().join(name);
        let dest = self.reject_path(&display_name(name), reason)?;
        fs::rename(&src, &dest).at(&src)?;
        Ok(dest)
    }

    /// Picks a free `rejected/NAME[.N]` and writes its `.reason` first.
    fn reject_path(&self, name: &str, reason: &str) -> Result<PathBuf> {
        let dir = self.rejected();
        let safe = sanitize_name(name);
        let mut n = 0u32;
        loop {
            let candidate = if n == 0 {
                safe.clone()
            } else {
                format!("{safe}.{n}")
            };
            let p = dir.join(&candidate);
            let r = dir.join(format!("{candidate}.reason"));
            if fs::symlink_metadata(&p).is_err() && fs::symlink_metadata(&r).is_err() {
                let text = format!("{}\n", reason.trim_end());
                write_atomic(&dir, &format!("{candidate}.reason"), text.as_bytes(), false)?;
                let _ = fs::set_permissions(&r, fs::Permissions::from_mode(0o644));
                return Ok(p);
            }
            n += 1;
        }
    }

    // ------------------------------------------------------------ job files

    pub fn write_status(&self, id: JobId, status: Status) -> Result<()> {
        write_exchanged(
            &self.job_dir(id),
            "status",
            &self.job_private(id),
            format!("{status}\n").as_bytes(),
            false,
        )
    }

    /// Empties the spares of an ended job's `status` and `info.json` (see
    /// [`write_exchanged`]): they keep their inodes (freeing one costs more on ext4 than
    /// keeping it) but no longer any block.
    pub fn trim_spares(&self, id: JobId) {
        // By path (one call each): `.sky/` is the daemon's alone, nobody else can have put
        // a link or a FIFO there.
        for name in ["status.spare", "info.json.spare"] {
            let _ = nix::unistd::truncate(&self.job_private(id).join(name), 0);
        }
    }

    /// Moves job `id`'s link to `done/` from wherever it is (`running/`, else `pending/`),
    /// or makes it there.
    pub fn move_to_done(&self, id: JobId) -> Result<()> {
        let dst = self.state_dir(State::Done).join(id.to_string());
        for from in [State::Running, State::Pending] {
            match fs::rename(self.state_dir(from).join(id.to_string()), &dst) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e).at(&dst),
            }
        }
        self.link_state(id, State::Done)
    }

    pub fn read_status(&self, id: JobId) -> Result<Status> {
        self.read_exchanged(id, "status", false, |b| {
            let text = String::from_utf8_lossy(b);
            Status::parse(&text).ok_or_else(|| format!("unknown status {:?}", text.trim()))
        })
    }

    /// Reads and parses a job file replaced by [`write_exchanged`], reading it afresh (up to
    /// [`REREADS`] times) when what it read does not parse: a read that raced two
    /// replacements in a row can find the file emptied or half rewritten. A missing file
    /// means "no such job" when `missing_is_no_job`, else only when the job's directory is
    /// missing too.
    fn read_exchanged<T>(
        &self,
        id: JobId,
        name: &str,
        missing_is_no_job: bool,
        parse: impl Fn(&[u8]) -> std::result::Result<T, String>,
    ) -> Result<T> {
        let path = self.job_dir(id).join(name);
        let mut last = String::new();
        for _ in 0..REREADS {
            let bytes = fs::read(&path).map_err(|e| {
                if e.kind() == io::ErrorKind::NotFound
                    && (missing_is_no_job || !self.job_dir(id).exists())
                {
                    SpoolError::NoSuchJob(id)
                } else {
                    SpoolError::Io {
                        path: path.clone(),
                        source: e,
                    }
                }
            })?;
            match parse(&bytes) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(SpoolError::Corrupt {
            path,
            message: last,
        })
    }

    pub fn write_info(&self, info: &JobInfo) -> Result<()> {
        let bytes = info_bytes(&self.job_dir(info.id), info)?;
        write_exchanged(
            &self.job_dir(info.id),
            "info.json",
            &self.job_private(info.id),
            &bytes,
            false,
        )
    }

    pub fn read_info(&self, id: JobId) -> Result<JobInfo> {
        self.read_exchanged(id, "info.json", true, |b| {
            serde_json::from_slice(b).map_err(|e| e.to_string())
        })
    }

    /// Every job ID with a directory under `jobs/`, ascending.
    pub fn job_ids(&self) -> Result<Vec<JobId>> {
        numeric_entries(&self.jobs())
    }

    /// The jobs linked from one state directory.
    pub fn state_ids(&self, state: State) -> Result<Vec<JobId>> {
        numeric_entries(&self.state_dir(state))
    }

    /// Which state directory links to job `id` (the first found).
    pub fn state_of(&self, id: JobId) -> Option<State> {
        State::ALL
            .into_iter()
            .find(|s| fs::symlink_metadata(self.state_dir(*s).join(id.to_string())).is_ok())
    }

    /// Creates (or atomically re-points) `STATE/<id>` -> `../jobs/<id>`.
    pub fn link_state(&self, id: JobId, state: State) -> Result<()> {
        let dir = self.state_dir(state);
        let dst = dir.join(id.to_string());
        // A new link is created atomically in place; an existing one is re-pointed by rename.
        match std::os::unix::fs::symlink(format!("../jobs/{id}"), &dst) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).at(&dst),
        }
        let tmp = dir.join(format!(".{id}.tmp"));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(format!("../jobs/{id}"), &tmp).at(&tmp)?;
        fs::rename(&tmp, &dst).at(&dst)
    }

    /// Moves job `id`'s link from one state directory to another (one rename).
    pub fn move_state(&self, id: JobId, from: State, to: State) -> Result<()> {
        if from == to {
            return Ok(());
        }
        let src = self.state_dir(from).join(id.to_string());
        let dst = self.state_dir(to).join(id.to_string());
        match fs::rename(&src, &dst) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => self.link_state(id, to),
            Err(e) => Err(e).at(&src),
        }
    }

    /// Removes links of `id` from every state directory but `keep`.
    pub fn unlink_other_states(&self, id: JobId, keep: State) {
        for s in State::ALL {
            if s != keep {
                let _ = fs::remove_file(self.state_dir(s).join(id.to_string()));
            }
        }
    }

    pub fn write_queue(&self, text: &str) -> Result<()> {
        write_exchanged(&self.root, "queue", &self.private(), text.as_bytes(), false)
    }

    pub fn write_nodes(&self, text: &str) -> Result<()> {
        write_exchanged(&self.root, "nodes", &self.private(), text.as_bytes(), false)
    }

    /// Stores a job's secrets where only root can read them (never in the job directory).
    pub fn write_secrets(
        &self,
        id: JobId,
        secrets: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        let bytes = serde_json::to_vec(secrets).map_err(|e| SpoolError::Corrupt {
            path: self.secrets_file(id),
            message: e.to_string(),
        })?;
        write_atomic_mode(
            &self.private().join("secrets"),
            &format!("{id}.json"),
            &bytes,
            false,
            0o600,
        )
    }

    pub fn read_secrets(&self, id: JobId) -> std::collections::BTreeMap<String, String> {
        fs::read(self.secrets_file(id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// The jobs that have a secrets file (`.skyspool/secrets/<id>.json`).
    pub fn secret_ids(&self) -> Result<Vec<JobId>> {
        numbered_entries(&self.private().join("secrets"), ".json")
    }

    pub fn remove_secrets(&self, id: JobId) {
        let _ = fs::remove_file(self.secrets_file(id));
    }

    /// Whether `jobs/<id>/cancel` exists (any file type; never opened).
    pub fn cancel_requested(&self, id: JobId) -> Option<fs::Metadata> {
        fs::symlink_metadata(self.job_dir(id).join("cancel")).ok()
    }

    /// Removes a `cancel` entry of any type (a directory is removed recursively; links are
    /// removed, never followed).
    pub fn clear_cancel(&self, id: JobId) {
        let p = self.job_dir(id).join("cancel");
        if let Ok(m) = fs::symlink_metadata(&p) {
            if m.is_dir() {
                let _ = fs::remove_dir_all(&p);
            } else {
                let _ = fs::remove_file(&p);
            }
        }
    }

    /// Appends a line to a job's log (daemon notes such as refused cancels).
    pub fn append_log(&self, id: JobId, line: &str) -> Result<()> {
        let path = self.job_dir(id).join("log");
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(&path)
            .at(&path)?;
        f.write_all(format!("{}\n", line.trim_end()).as_bytes())
            .at(&path)
    }

    /// The supervisor's result: a line of `supervisor.lock` (or, from spools of earlier
    /// versions, `result.json`).
    pub fn read_result(&self, id: JobId) -> Option<JobResult> {
        self.lock_records(id)
            .and_then(|b| first_line_as(&b))
            .or_else(|| {
                let b = fs::read(self.job_private(id).join("result.json")).ok()?;
                serde_json::from_slice(&b).ok()
            })
    }

    /// The supervisor's record: a line of `supervisor.lock` (or, from spools of earlier
    /// versions, `supervisor.json`).
    pub fn read_supervisor(&self, id: JobId) -> Option<SupervisorRecord> {
        self.lock_records(id)
            .and_then(|b| first_line_as(&b))
            .or_else(|| {
                let b = fs::read(self.job_private(id).join("supervisor.json")).ok()?;
                first_line_as(&b)
            })
    }

    /// The daemon's launch record (first line of `supervisor.lock`).
    pub fn read_launch(&self, id: JobId) -> Option<LaunchRecord> {
        self.lock_records(id).and_then(|b| first_line_as(&b))
    }

    fn lock_records(&self, id: JobId) -> Option<Vec<u8>> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(self.job_private(id).join("supervisor.lock"))
            .ok()?;
        // Three short JSON lines: one read, not a doubling series from 32 bytes.
        let mut b = Vec::with_capacity(2048);
        f.take(64 * 1024).read_to_end(&mut b).ok()?;
        Some(b)
    }
}

/// The first line of `bytes` that parses as a `T` (JSON lines).
fn first_line_as<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    bytes
        .split(|b| *b == b'\n')
        .find_map(|line| serde_json::from_slice(line).ok())
}

/// Writes `info.json` into a job directory (atomic replace).
pub fn write_info_in(dir: &Path, info: &JobInfo) -> Result<()> {
    write_atomic(dir, "info.json", &info_bytes(dir, info)?, false)
}

/// `info.json`'s content (pretty JSON and a newline).
fn info_bytes(dir: &Path, info: &JobInfo) -> Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec_pretty(info).map_err(|e| SpoolError::Corrupt {
        path: dir.join("info.json"),
        message: e.to_string(),
    })?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// What `name` in `incoming/` is. `meta` (from lstat) decides file vs dir vs hostile.
pub fn classify_incoming(name: &OsStr, meta: Option<&fs::Metadata>) -> Incoming {
    let bytes = name.as_bytes();
    if bytes.first() == Some(&b'.') {
        return Incoming::Ignore; // dot-files: rsync temps, our own temps, editor state
    }
    // Decided on the raw bytes, so an editor's backup of a Latin-1 name is left alone too.
    if bytes.ends_with(b"~")
        || bytes.ends_with(b".swp")
        || bytes.ends_with(b".swx")
        || bytes.ends_with(b".tmp")
        || bytes.ends_with(b".part")
        || bytes.ends_with(b".partial")
        || bytes.starts_with(b"#")
    {
        return Incoming::Ignore; // editor backups/swap files, partial downloads
    }
    let Some(text) = name.to_str() else {
        return Incoming::Bad("the name is not valid UTF-8".into());
    };
    if text.chars().any(|c| c.is_control()) {
        return Incoming::Bad("the name contains control characters".into());
    }
    let Some(meta) = meta else {
        return Incoming::File; // tentative: decided on inspection
    };
    let ft = meta.file_type();
    if ft.is_symlink() {
        return Incoming::Bad(
            "symbolic links are not accepted (copy the file itself into incoming/)".into(),
        );
    }
    if ft.is_dir() {
        return Incoming::Dir;
    }
    if !ft.is_file() {
        return Incoming::Bad(
            "not a regular file or directory (FIFOs, sockets and devices are not accepted)".into(),
        );
    }
    if meta.nlink() > 1 {
        return Incoming::Bad(
            "the file has other hard links; submit a copy (cp), not a link (ln)".into(),
        );
    }
    if !(text.ends_with(".yaml") || text.ends_with(".yml")) {
        return Incoming::Bad(
            "not a job: submit NAME.yaml (or .yml), or a directory holding job.yaml and the job's files".into(),
        );
    }
    if meta.len() > MAX_YAML_BYTES {
        return Incoming::Bad(format!(
            "the file is {} bytes; a job YAML may be at most {} bytes",
            meta.len(),
            MAX_YAML_BYTES
        ));
    }
    Incoming::File
}

/// A printable, single-component version of a submitted name.
pub fn display_name(name: &OsStr) -> String {
    sanitize_name(&name.to_string_lossy())
}

fn sanitize_name(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_control() || c == '/' || c == '\u{FFFD}' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let s = s.trim_start_matches('.').to_string();
    if s.is_empty() {
        "unnamed".into()
    } else {
        s
    }
}

/// Numeric entry names of a directory (`jobs/`, `staging/`, `pending/`, ...), ascending.
pub fn numeric_entries(dir: &Path) -> Result<Vec<JobId>> {
    numbered_entries(dir, "")
}

/// The IDs `N` of the entries `N<suffix>` in `dir`, sorted; none if `dir` is missing.
fn numbered_entries(dir: &Path, suffix: &str) -> Result<Vec<JobId>> {
    let mut ids = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
        Err(e) => return Err(e).at(dir),
    };
    for entry in rd {
        let entry = entry.at(dir)?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.strip_suffix(suffix))
            .and_then(|s| s.parse::<JobId>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Whether `s` is an id as [`Spool::instance_id`] makes them.
fn is_instance_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// How often a reader of a file replaced by [`write_exchanged`] reads it again when what it
/// read does not parse.
const REREADS: usize = 3;

/// What publishing does with the claimed entries (`in--NAME`) in a staging directory `dir`,
/// found by listing: a claimed directory becomes `workdir/`, a claimed file (its text is in
/// `job.yaml`) is removed.
fn finish_claimed_entries(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).at(dir)?.flatten() {
        if !entry
            .file_name()
            .as_bytes()
            .starts_with(CLAIM_PREFIX.as_bytes())
        {
            continue;
        }
        let p = entry.path();
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            let w = dir.join("workdir");
            fs::rename(&p, &w).at(&w)?;
        } else {
            fs::remove_file(&p).at(&p)?;
        }
    }
    Ok(())
}

/// Whether `t` is a decimal number (digits only, at least one).
fn is_number(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())
}

/// The stem of `name` when it is a temporary file the daemon writes and renames at once:
/// `.STEM.tmp.PID` ([`write_atomic`]) or a state link's `.ID.tmp` ([`Spool::link_state`]).
fn is_daemon_temp(name: &OsStr) -> Option<&str> {
    let rest = name.to_str()?.strip_prefix('.')?;
    let (stem, pid) = rest.rsplit_once(".tmp")?;
    let ours = pid.is_empty() || pid.strip_prefix('.').is_some_and(is_number);
    (ours && !stem.is_empty()).then_some(stem)
}

impl Spool {
    /// Removes the temporary files a killed daemon left where the daemon writes them (the
    /// spool's root, `rejected/`, the state directories): written and renamed by one step of
    /// a daemon, they were never renamed when it died there. Only this user's regular files
    /// and links of the daemon's naming are removed (`rejected/` is writable by everyone).
    /// Run at start-up, under the daemon's lock. Returns how many were removed.
    pub fn remove_stale_temps(&self) -> usize {
        let mut dirs = vec![self.root.clone(), self.rejected()];
        dirs.extend(State::ALL.into_iter().map(|s| self.state_dir(s)));
        dirs.iter().map(|dir| remove_own_temps(dir, |_| true)).sum()
    }

    /// [`Spool::remove_stale_temps`] in job `id`'s directory: the daemon's temporary
    /// `info.json` (where the filesystem cannot exchange files, it is replaced through one),
    /// and a cancel request of the FUSE view ([`CANCEL_TEMP_PREFIX`]: chowned to the
    /// requester before it is renamed to `cancel`, so of any owner; a regular file or link
    /// only). A `status` temporary may be a live supervisor's, so it stays.
    pub fn remove_stale_job_temps(&self, id: JobId) -> usize {
        remove_plain_entries(&self.job_dir(id), |name| {
            if is_daemon_temp(name) == Some("info.json") {
                return Some(Owner::Daemon);
            }
            let fuse_cancel = name
                .to_str()
                .and_then(|n| n.strip_prefix(CANCEL_TEMP_PREFIX))
                .and_then(|rest| rest.split_once('.'))
                .is_some_and(|(pid, n)| is_number(pid) && is_number(n));
            fuse_cancel.then_some(Owner::Anyone)
        })
    }
}

/// The start of the temporary name under which the FUSE view writes a job's `cancel`
/// (`.cancel.fuse.PID.N`), before it chowns it to the requester and renames it.
pub const CANCEL_TEMP_PREFIX: &str = ".cancel.fuse.";

/// Removes `dir`'s temporary files of the daemon's naming ([`is_daemon_temp`]) whose stem
/// `wanted` accepts, when they are this user's regular files or links.
fn remove_own_temps(dir: &Path, wanted: impl Fn(&str) -> bool) -> usize {
    remove_plain_entries(dir, |name| {
        is_daemon_temp(name)
            .is_some_and(&wanted)
            .then_some(Owner::Daemon)
    })
}

/// Whose entry [`remove_plain_entries`] may remove.
enum Owner {
    /// Only this process's user's.
    Daemon,
    Anyone,
}

/// Removes the entries of `dir` that `pick` names (by name alone, so that only those are
/// looked at), when they are regular files or links (a link is not followed) of the owner it
/// says. Returns how many were removed.
fn remove_plain_entries(dir: &Path, pick: impl Fn(&OsStr) -> Option<Owner>) -> usize {
    let me = nix::unistd::geteuid().as_raw();
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let Some(owner) = pick(&entry.file_name()) else {
            continue;
        };
        // (`DirEntry::metadata` does not follow a link.)
        let removable = entry.metadata().is_ok_and(|m| {
            (m.file_type().is_file() || m.file_type().is_symlink())
                && (matches!(owner, Owner::Anyone) || m.uid() == me)
        });
        if removable && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// Undoes what a launch left in a staging directory `dir` (see the daemon's early launch):
/// its `.sky/supervisor.lock` removed, its `log` emptied. Only for a launch whose gate never
/// opened.
pub fn forget_launch(dir: &Path) {
    let _ = fs::remove_file(dir.join(".sky").join("supervisor.lock"));
    if let Ok(log) = open_existing_for_write(&dir.join("log")) {
        let _ = log.set_len(0);
    }
}

/// Now, as RFC 3339 UTC with seconds.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a daemon killed between writing a temporary file and renaming it left behind
    /// goes at the next start; anything else of a similar name stays.
    #[test]
    fn stale_temps_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::create(tmp.path().join("s")).unwrap();
        let gone = [
            spool.root().join(".nodes.json.tmp.4242"),
            spool.rejected().join(".bad.yaml.reason.tmp.17"),
            spool.rejected().join(".bad.yaml.tmp.17"),
        ];
        for p in &gone {
            fs::write(p, "x").unwrap();
        }
        let link = spool.state_dir(State::Pending).join(".5.tmp");
        std::os::unix::fs::symlink("../jobs/5", &link).unwrap();
        let kept = [
            spool.rejected().join("bad.yaml.tmp.17"),
            spool.rejected().join(".bad.yaml.tmp.17x"),
            spool.rejected().join(".tmp.17"),
            spool.rejected().join(".notes"),
            spool.incoming().join(".job.yaml.tmp.99"),
        ];
        for p in &kept {
            fs::write(p, "x").unwrap();
        }
        fs::create_dir(spool.rejected().join(".dir.tmp.3")).unwrap();
        assert_eq!(spool.remove_stale_temps(), 4);
        for p in gone.iter().chain([&link]) {
            assert!(fs::symlink_metadata(p).is_err(), "{} stayed", p.display());
        }
        for p in &kept {
            assert!(p.exists(), "{} went", p.display());
        }
        assert!(spool.rejected().join(".dir.tmp.3").is_dir());
        assert_eq!(spool.remove_stale_temps(), 0);

        let job = spool.job_dir(7);
        fs::create_dir_all(&job).unwrap();
        let names = [
            ".info.json.tmp.8",
            ".cancel.fuse.12.3",
            ".status.tmp.9",
            "info.json",
            ".cancel.fuse.12",
            ".cancel.fuse.x.3",
        ];
        for name in names {
            fs::write(job.join(name), "x").unwrap();
        }
        fs::create_dir(job.join(".cancel.fuse.12.4")).unwrap();
        assert_eq!(spool.remove_stale_job_temps(7), 2);
        for gone in &names[..2] {
            assert!(!job.join(gone).exists(), "{gone} stayed");
        }
        for kept in &names[2..] {
            assert!(job.join(kept).exists(), "{kept} went");
        }
        assert!(job.join(".cancel.fuse.12.4").is_dir());
        // The FUSE view chowns its cancel request to the requester: it goes whoever owns it.
        // An `info.json` temporary of another user is not the daemon's, and stays.
        if nix::unistd::geteuid().is_root() {
            let other = Some(nix::unistd::Uid::from_raw(65534));
            for name in [".cancel.fuse.13.1", ".info.json.tmp.14"] {
                fs::write(job.join(name), "x").unwrap();
                nix::unistd::chown(&job.join(name), other, None).unwrap();
            }
            assert_eq!(spool.remove_stale_job_temps(7), 1);
            assert!(!job.join(".cancel.fuse.13.1").exists());
            assert!(job.join(".info.json.tmp.14").exists());
        }
    }

    #[test]
    fn status_words_round_trip() {
        for s in Status::ALL {
            assert_eq!(Status::parse(&format!("{s}\n")), Some(s));
        }
        assert_eq!(Status::parse("nonsense"), None);
        assert!(Status::Cancelled.is_terminal());
        assert!(!Status::SettingUp.is_terminal());
        assert_eq!(Status::SettingUp.state(), State::Running);
    }

    #[test]
    fn progress_orders_a_jobs_life_and_matches_its_state() {
        use Status::*;
        assert!(Pending.progress() < SettingUp.progress());
        assert!(SettingUp.progress() < Running.progress());
        assert_eq!(Init.progress(), Pending.progress());
        for s in Status::ALL {
            assert_eq!(s.is_terminal(), s.progress() > Running.progress(), "{s}");
            let state = match s.progress() {
                0 => State::Pending,
                1 | 2 => State::Running,
                _ => State::Done,
            };
            assert_eq!(s.state(), state, "{s}");
        }
    }

    /// A temporary directory holding a directory for a file and one for its spare.
    fn dir_and_spare_dir() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, spare_dir) = (tmp.path().join("d"), tmp.path().join("p"));
        fs::create_dir(&dir).unwrap();
        fs::create_dir(&spare_dir).unwrap();
        (tmp, dir, spare_dir)
    }

    #[test]
    fn exchanged_rewrites_keep_their_two_inodes() {
        let (_tmp, dir, spare_dir) = dir_and_spare_dir();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let file = dir.join("status");
        let spare = spare_dir.join("status.spare");
        // No file yet: the spare becomes the file.
        write_exchanged(&dir, "status", &spare_dir, b"PENDING\n", false).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"PENDING\n");
        assert!(!spare.exists());
        let first = ino(&file);
        write_exchanged(&dir, "status", &spare_dir, b"RUNNING\n", false).unwrap();
        assert_eq!(fs::read(&file).unwrap(), b"RUNNING\n");
        assert_eq!(fs::read(&spare).unwrap(), b"PENDING\n");
        let second = ino(&file);
        assert_eq!(ino(&spare), first);
        // From now on the same two inodes trade places: nothing is created or freed.
        for (i, word) in ["SUCCEEDED\n", "FAILED\n", "CANCELLED\n"]
            .iter()
            .enumerate()
        {
            write_exchanged(&dir, "status", &spare_dir, word.as_bytes(), i == 1).unwrap();
            assert_eq!(fs::read_to_string(&file).unwrap(), *word);
            let inos = [ino(&file), ino(&spare)];
            assert!(inos.contains(&first) && inos.contains(&second), "{inos:?}");
        }
    }

    #[test]
    fn exchanged_rewrite_without_a_spare_directory_still_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::write(dir.join("status"), "PENDING\n").unwrap();
        write_exchanged(
            &dir,
            "status",
            &tmp.path().join("gone"),
            b"RUNNING\n",
            false,
        )
        .unwrap();
        assert_eq!(fs::read(dir.join("status")).unwrap(), b"RUNNING\n");
    }

    #[test]
    fn exchanged_rewrite_never_writes_through_a_planted_spare() {
        let (tmp, dir, spare_dir) = dir_and_spare_dir();
        let outside = tmp.path().join("outside");
        fs::write(&outside, "keep").unwrap();
        fs::write(dir.join("info.json"), "old").unwrap();
        // A symlink and a hard link to a file elsewhere: replaced, never written through.
        std::os::unix::fs::symlink(&outside, spare_dir.join("info.json.spare")).unwrap();
        write_exchanged(&dir, "info.json", &spare_dir, b"new", false).unwrap();
        assert_eq!(fs::read_to_string(dir.join("info.json")).unwrap(), "new");
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
        fs::remove_file(spare_dir.join("info.json.spare")).unwrap();
        fs::hard_link(&outside, spare_dir.join("info.json.spare")).unwrap();
        write_exchanged(&dir, "info.json", &spare_dir, b"newer", false).unwrap();
        assert_eq!(fs::read_to_string(dir.join("info.json")).unwrap(), "newer");
        assert_eq!(fs::read_to_string(&outside).unwrap(), "keep");
    }

    #[test]
    fn classifies_names() {
        let n = |s: &str| classify_incoming(OsStr::new(s), None);
        assert_eq!(n(".job.yaml.XYZ123"), Incoming::Ignore);
        assert_eq!(n("job.yaml~"), Incoming::Ignore);
        assert_eq!(n(".job.yaml.swp"), Incoming::Ignore);
        assert_eq!(n("job.yaml"), Incoming::File);
        assert!(matches!(n("bad\nname.yaml"), Incoming::Bad(_)));
        let invalid = OsStr::from_bytes(b"\xff.yaml");
        assert!(matches!(classify_incoming(invalid, None), Incoming::Bad(_)));
    }

    #[test]
    fn ids_never_reused_and_claims_move_files() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::create(tmp.path().join("s")).unwrap();
        assert_eq!(spool.next_id().unwrap(), 1);
        fs::write(spool.incoming().join("a.yaml"), "run: echo hi\n").unwrap();
        let (kind, _) = spool
            .inspect_incoming(OsStr::new("a.yaml"))
            .unwrap()
            .unwrap();
        assert_eq!(kind, Incoming::File);
        let c = spool.claim(OsStr::new("a.yaml"), &kind, 1).unwrap();
        assert!(!spool.incoming().join("a.yaml").exists());
        assert_eq!(spool.next_id().unwrap(), 2);
        assert_eq!(spool.read_claimed_yaml(&c).unwrap(), b"run: echo hi\n");
        fs::write(c.dir.join("job.yaml"), "run: echo hi\n").unwrap();
        spool.publish(&c).unwrap();
        assert_eq!(spool.state_of(1), Some(State::Pending));
        spool.move_state(1, State::Pending, State::Running).unwrap();
        assert_eq!(spool.state_of(1), Some(State::Running));
        assert!(spool.state_dir(State::Running).join("1/job.yaml").exists());
        spool.record_last_id(7).unwrap();
        assert_eq!(spool.next_id().unwrap(), 8);
    }

    #[test]
    fn rejections_keep_the_file_and_say_why() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::create(tmp.path().join("s")).unwrap();
        for _ in 0..2 {
            fs::write(spool.incoming().join("x.txt"), "hello").unwrap();
            spool
                .reject_incoming(OsStr::new("x.txt"), "not a job")
                .unwrap();
        }
        assert!(spool.rejected().join("x.txt").exists());
        assert!(spool.rejected().join("x.txt.1").exists());
        assert_eq!(
            fs::read_to_string(spool.rejected().join("x.txt.1.reason")).unwrap(),
            "not a job\n"
        );
    }

    /// Twenty small files in `dir`.
    fn twenty_files(dir: &Path) -> Vec<PathBuf> {
        let files: Vec<PathBuf> = (0..20).map(|i| dir.join(format!("f{i}"))).collect();
        for f in &files {
            fs::write(f, b"x").unwrap();
        }
        files
    }

    #[test]
    fn sync_all_syncs_every_path_and_reports_the_first_error() {
        let tmp = tempfile::tempdir().unwrap();
        let files = twenty_files(tmp.path());
        let mut paths: Vec<Durable<'_>> = files.iter().map(|f| Durable::File(f)).collect();
        paths.push(Durable::Dir(tmp.path()));
        sync_all(&paths).unwrap();
        sync_all(&paths[..1]).unwrap();
        sync_all(&[]).unwrap();
        let missing = tmp.path().join("missing");
        paths.insert(3, Durable::File(&missing));
        let e = sync_all(&paths).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        // A link is never followed.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&files[0], &link).unwrap();
        assert!(sync_all(&[Durable::File(&link), Durable::Dir(tmp.path())]).is_err());
        // A filesystem is named by a directory on it, never through a link.
        sync_all(&[Durable::Filesystem(tmp.path())]).unwrap();
        assert!(sync_all(&[Durable::Filesystem(&files[0])]).is_err());
        let dir_link = tmp.path().join("dir-link");
        std::os::unix::fs::symlink(tmp.path(), &dir_link).unwrap();
        assert!(sync_all(&[Durable::Filesystem(&dir_link)]).is_err());
    }

    /// A notifying round adds exactly 1 to its eventfd once every fsync is through, after
    /// which `try_wait` has the outcome (the first error included); an empty round notifies
    /// at once.
    #[test]
    fn a_notifying_round_counts_its_end_once_on_the_eventfd() {
        use std::os::fd::AsFd;
        // Blocks until the eventfd counts something; returns the count (and resets it).
        fn count(fd: &std::os::fd::OwnedFd) -> u64 {
            let mut buf = [0u8; 8];
            assert_eq!(nix::unistd::read(fd.as_fd(), &mut buf).unwrap(), 8);
            u64::from_ne_bytes(buf)
        }
        let tmp = tempfile::tempdir().unwrap();
        let files = twenty_files(tmp.path());
        let mut paths: Vec<Durable<'_>> = files.iter().map(|f| Durable::File(f)).collect();
        paths.push(Durable::Dir(tmp.path()));
        let fd = std::sync::Arc::new(eventfd(false).unwrap());
        let mut round = SyncRound::start_notify(&paths, Some(fd.clone()));
        assert_eq!(count(&fd), 1);
        assert!(matches!(round.try_wait(), Some(Ok(()))));
        let missing = tmp.path().join("missing");
        paths.insert(3, Durable::File(&missing));
        let mut round = SyncRound::start_notify(&paths, Some(fd.clone()));
        assert_eq!(count(&fd), 1);
        match round.try_wait() {
            Some(Err(e)) => assert!(e.to_string().contains("missing"), "{e}"),
            other => panic!("expected the missing file's error, got {other:?}"),
        }
        let mut round = SyncRound::start_notify(&[], Some(fd.clone()));
        assert_eq!(count(&fd), 1);
        assert!(matches!(round.try_wait(), Some(Ok(()))));
    }

    #[test]
    fn instance_id_is_made_once_kept_and_distinct() {
        let tmp = tempfile::tempdir().unwrap();
        let a = Spool::create(tmp.path().join("a")).unwrap();
        let b = Spool::create(tmp.path().join("b")).unwrap();
        let id = a.instance_id().unwrap();
        assert!(is_instance_id(&id), "{id}");
        assert_eq!(
            a.instance_id().unwrap(),
            id,
            "kept across calls (and restarts)"
        );
        assert_ne!(b.instance_id().unwrap(), id, "each spool has its own");
        let path = a.private().join("id");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        fs::write(&path, "").unwrap(); // torn by a crash before its fsync
        let again = a.instance_id().unwrap();
        assert!(is_instance_id(&again) && again != id, "{again}");
        // A copy of the spool (its id file included) is a spool of its own.
        fs::copy(&path, b.private().join("id")).unwrap();
        let copy = b.instance_id().unwrap();
        assert!(copy != again && is_instance_id(&copy), "{copy}");
        assert_eq!(b.instance_id().unwrap(), copy);
        assert_eq!(a.instance_id().unwrap(), again);
        assert!(!is_instance_id("../../etc") && !is_instance_id(&"A".repeat(32)));
    }

    #[test]
    fn lock_lines_are_told_apart() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::create(tmp.path().join("s")).unwrap();
        let id = 7;
        fs::create_dir_all(spool.job_private(id)).unwrap();
        let lock = spool.job_private(id).join("supervisor.lock");
        let launch = LaunchRecord {
            started: "2026-11-28T10:00:00.000Z".into(),
            placement: vec![],
        };
        let sup = SupervisorRecord {
            pid: 42,
            start_ticks: 4242,
        };
        let result = JobResult {
            status: Status::Failed,
            exit_codes: vec![Some(3)],
            ended: "2026-11-28T10:00:01.000Z".into(),
            reason: Some("rank 0 (head) exited with 3".into()),
        };
        let mut text = Vec::new();
        for line in [
            serde_json::to_vec(&launch).unwrap(),
            serde_json::to_vec(&sup).unwrap(),
        ] {
            text.extend(line);
            text.push(b'\n');
        }
        fs::write(&lock, &text).unwrap();
        assert_eq!(spool.read_supervisor(id), Some(sup.clone()));
        assert_eq!(spool.read_result(id), None, "no result line yet");
        // A torn result line (power cut in the middle of the append) is no result.
        let full = serde_json::to_vec(&result).unwrap();
        let mut torn = text.clone();
        torn.extend(&full[..full.len() / 2]);
        fs::write(&lock, &torn).unwrap();
        assert_eq!(spool.read_result(id), None);
        text.extend(&full);
        text.push(b'\n');
        fs::write(&lock, &text).unwrap();
        assert_eq!(spool.read_result(id), Some(result.clone()));
        assert_eq!(spool.read_supervisor(id), Some(sup));
        // A spool of an earlier version: result.json.
        fs::write(&lock, b"").unwrap();
        fs::write(
            spool.job_private(id).join("result.json"),
            serde_json::to_vec(&result).unwrap(),
        )
        .unwrap();
        assert_eq!(spool.read_result(id), Some(result));
    }

    #[test]
    fn second_lock_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::create(tmp.path().join("s")).unwrap();
        let _held = spool.lock().unwrap();
        assert!(matches!(spool.lock(), Err(SpoolError::Locked(..))));
    }

    #[test]
    fn writer_holding_file_open_defers_reading() {
        let tmp = tempfile::tempdir().unwrap();
        let spool = Spool::create(tmp.path().join("s")).unwrap();
        let path = spool.incoming().join("slow.yaml");
        let mut w = File::create(&path).unwrap();
        w.write_all(b"run: |\n  echo part").unwrap();
        assert_eq!(
            spool.read_incoming_file(OsStr::new("slow.yaml")).unwrap(),
            None
        );
        drop(w);
        assert!(spool
            .read_incoming_file(OsStr::new("slow.yaml"))
            .unwrap()
            .is_some());
    }
}
