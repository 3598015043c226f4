//! One supervisor's job: its phases in order, its gate, its result made durable.

use super::*;

/// Supervises one job. Returns whether this process may take another: its final `status`
/// was written and the launcher was told (`free`).
#[allow(clippy::too_many_arguments)]
pub(super) fn supervise_job(
    text: &[u8],
    lock: Option<OwnedFd>,
    gate: Option<OwnedFd>,
    log: Option<OwnedFd>,
    signals: &Signals,
    record: &[u8],
    free: &dyn Fn() -> bool,
    launcher_alive: &dyn Fn() -> bool,
    finalizer: &Finalizer,
) -> Result<bool, ExecError> {
    let (plan, lock, gate, mut pre, log) = match lock {
        Some(lock) => (parse_plan(text)?, lock, gate, None, log),
        None => {
            let gate = gate.ok_or_else(|| ExecError::Plan("a prestart without a gate".into()))?;
            match prestart(text, gate, log)? {
                Some((plan, lock, start_gate, pre, log)) => (plan, lock, start_gate, pre, log),
                // Not confirmed: nothing of the job ran, nothing says it was taken.
                None => return Ok(false),
            }
        }
    };
    let spool = Spool::at(&plan.spool);
    let mut lock = File::from(lock);
    // This process's record, appended to the lock file (opened O_APPEND by the daemon) after
    // the daemon's launch record, says it took the job: no new file on the way to the job's
    // first command. Not fsynced: the record only matters while this process lives (after a
    // power loss nothing of the job runs any more), and a daemon that finds the lock held
    // before the record is written finds this process as the lock's holder instead. A gated
    // job's is written once its gate opens (see [`Gate`]).
    let mut taken = Taken::new(gate.map(|daemon| Gate { daemon }), &mut lock, record)?;
    // Only a job of one local node starts its bash behind the gate; any other waits here.
    let local = plan.nodes.len() <= 1 && plan.nodes.iter().all(|n| n.ssh.is_none());
    let cancel = cancel_pending(&spool, &plan);
    if !local || cancel {
        match taken.open_now() {
            Err(ExecError::Untaken) => return Ok(untaken(&plan)),
            other => other?,
        }
    }
    // A cancel whose file exists already (the daemon signals only a supervisor it knows)
    // is honoured before anything runs.
    let result = if cancel {
        Ok(finish(
            Status::Cancelled,
            vec![None; plan.nodes.len().max(1)],
            Some("cancelled before it started"),
        ))
    } else {
        match run_job(&plan, &spool, log, signals, &mut taken, &mut pre) {
            Err(ExecError::Untaken) => {
                kill_all_descendants(false);
                return Ok(untaken(&plan));
            }
            other => other,
        }
    };
    clean_remote(&plan);
    let result = match result {
        Ok(r) => r,
        Err(e) => JobResult {
            status: Status::FailedDriver,
            exit_codes: vec![],
            ended: spool::now_rfc3339(),
            reason: Some(format!("supervisor error: {e}")),
        },
    };
    kill_all_descendants(false);
    let mut result = result;
    if filesystem_full(&spool.job_dir(plan.job_id)) {
        let note = "the spool's filesystem is full: the job's log may be incomplete";
        result.reason = Some(match result.reason.take() {
            Some(r) => format!("{r}; {note}"),
            None => note.to_string(),
        });
    }
    // In a multi-node job, say which node's failure ended it (one node's log line alone does
    // not tell); a single-node job's log stays exactly its own output.
    if result.status != Status::Succeeded && plan.nodes.len() > 1 {
        if let (Some(reason), Ok(mut log)) = (&result.reason, open_log(&plan, "log")) {
            let _ = writeln!(log, "skyspool: {}: {reason}", result.status);
        }
    }
    let mut line = serde_json::to_vec(&result).map_err(|e| ExecError::Plan(e.to_string()))?;
    line.push(b'\n');
    // The result, as a line appended to `supervisor.lock` (after the launch record and this
    // supervisor's record: no new file, and no new block on a full disk); then `status`;
    // then the fsyncs. The daemon wakes on `status`, reads the result and gives the job's
    // resources to the next job while the finalizer thread makes the result durable (the
    // lock file and `.sky/`, which holds its name) and only then frees the lock (closes
    // it); the launcher is told this process is free once `status` is written, so its next
    // job can start meanwhile. (Nothing of the next job's start is durable before that
    // either; a power cut in between finds no result and settles the job FAILED_DRIVER, or
    // by the final `status` if that is on disk.) Each step is attempted whatever happens to
    // the others.
    if let Err(e) = lock.write_all(&line) {
        eprintln!(
            "skyspool supervise: job {}: supervisor.lock: {e}",
            plan.job_id
        );
    }
    let status = spool.write_status(plan.job_id, result.status);
    if daemon_journals_end(&plan) && launcher_alive() {
        drop(lock);
    } else {
        finalizer.submit((plan.job_id, lock, private_dir(&plan)));
    }
    status?;
    Ok(free())
}

/// A phase's commands, unless it has none (absent, or only blanks).
pub(super) fn commands(phase: &Option<String>) -> Option<&str> {
    phase.as_deref().filter(|s| !s.trim().is_empty())
}

/// One local phase's script: its path (`.sky/<phase>.sh`) and its text, behind
/// [`GATE_LINE`] when `gated`. A text that fits in one argument goes to bash as `-c` (see
/// [`inline_script`]); a longer one is written to the path first and read from there.
pub(super) fn phase_script(
    plan: &LaunchPlan,
    phase: &str,
    body: &str,
    gated: bool,
) -> (PathBuf, String) {
    let script = private_dir(plan).join(format!("{phase}.sh"));
    let cwd = remote::shell_quote(&plan.cwd.to_string_lossy());
    let body = match plan.speculative {
        true => SPECULATIVE_BODY,
        false => body,
    };
    let text = script_text(body, &cwd, "");
    match gated {
        false => (script, text),
        true => (script, format!("{GATE_LINE}{text}")),
    }
}

/// The commands of a speculative prestart's script: the job's own, given on its gate line
/// as `_skyspool_run` (see [`PreSpawned::release`]).
pub(super) const SPECULATIVE_BODY: &str = "eval \"$_skyspool_run\"";

/// The script as bash's `-c` argument, when it fits in one.
pub(super) fn inline_script(text: &str) -> Option<&str> {
    (text.len() <= INLINE_SCRIPT_MAX).then_some(text)
}

/// Whether a gated launch of `plan` opens no path of the job before its gate opens: one
/// local node, and a first phase (setup, else run) whose script goes to bash as an
/// argument (a longer one is written to `.sky/` first). Such a job may be launched before
/// its directory is published (see the daemon's early launch), with its log passed along.
pub fn launchable_unpublished(plan: &LaunchPlan) -> bool {
    let local = plan.nodes.len() == 1 && plan.nodes.iter().all(|n| n.ssh.is_none());
    let first = commands(&plan.setup).or_else(|| commands(&plan.run));
    local
        && first
            .is_none_or(|body| inline_script(&phase_script(plan, "setup", body, true).1).is_some())
}

pub(super) fn parse_plan(text: &[u8]) -> Result<LaunchPlan, ExecError> {
    serde_json::from_slice(text).map_err(|e| ExecError::Plan(e.to_string()))
}

/// A gated job's launch that its gate closed on unopened: nothing of it ran and nothing says
/// this process took it, so the daemon (this one, or the next at its start-up) finds it
/// untaken and queues it again. This process ends rather than waits for another job (false:
/// not free): its exit is what tells.
pub(super) fn untaken(plan: &LaunchPlan) -> bool {
    eprintln!(
        "skyspool supervise: job {}: its admission was not confirmed durable; leaving it untaken",
        plan.job_id
    );
    false
}

/// The supervisor's side of a job's start gate ([`Launch::gate`]).
pub(super) struct Gate {
    pub(super) daemon: OwnedFd,
}

impl Gate {
    /// Waits for the daemon's word: true once its byte is there, false when the pipe closed
    /// without one (or cannot be waited on).
    pub(super) fn open(&self) -> bool {
        let mut fds = [libc::pollfd {
            fd: self.daemon.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        loop {
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
            if n >= 0 {
                return fds[0].revents & libc::POLLIN != 0;
            }
            if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return false;
            }
        }
    }
}

/// What says this supervisor took its job: its record, written to the job's lock at once,
/// or (a gated job) once the gate opens, right before the job's first command may run.
pub(super) struct Taken<'a> {
    pub(super) gate: Option<Gate>,
    pub(super) lock: &'a mut File,
    pub(super) record: &'a [u8],
}

impl<'a> Taken<'a> {
    /// Writes the record at once unless the job is behind a gate.
    pub(super) fn new(
        gate: Option<Gate>,
        lock: &'a mut File,
        record: &'a [u8],
    ) -> Result<Self, ExecError> {
        let mut taken = Taken { gate, lock, record };
        if taken.gate.is_none() {
            taken.record()?;
        }
        Ok(taken)
    }

    /// The gate, if the job is still behind one (its record is then not written yet).
    pub(super) fn gate(&mut self) -> Option<Gate> {
        self.gate.take()
    }

    /// Waits at the gate, if the job is still behind one, and records the job as taken
    /// once it opens; [`ExecError::Untaken`] when it closes unopened.
    pub(super) fn open_now(&mut self) -> Result<(), ExecError> {
        match self.gate() {
            None => Ok(()),
            Some(g) if g.open() => self.record(),
            Some(_) => Err(ExecError::Untaken),
        }
    }

    /// Writes the record of a job whose gate just opened.
    pub(super) fn record(&mut self) -> Result<(), ExecError> {
        self.lock
            .write_all(self.record)
            .map_err(|e| ExecError::Io("supervisor.lock".into(), e))
    }
}

/// The first line of a gated or prestarted job's script: bash waits there, started, until
/// the supervisor says the job may run (a line on stdin, then end-of-file), and gives up
/// when stdin closes without one; the line is evaluated (empty for a gated job; for a
/// prestarted one the environment of its placement, see [`env_change`]); then its stdin is
/// `/dev/null` like any job's.
pub(super) const GATE_LINE: &str = "IFS= read -r _skyspool_env || exit 1; eval \"$_skyspool_env\"; unset _skyspool_env; exec </dev/null\n";

/// Whether the daemon that launched the job records its end in its journal and is alive
/// (by pid and start time): it reads the result once `status` is final and appends the
/// job's final record to the journal, whose fsync follows within milliseconds. Else (no
/// journal, or a daemon gone: the job ended while none watched) the [`Finalizer`] makes the
/// result durable. The caller also asks whether the launcher still runs: a daemon that
/// stops ends its launcher before its last checkpoint (a `syncfs`), so a result written
/// after that checkpoint (by a job that ended while the daemon was stopping, which no
/// daemon journals) is made durable here, and one written before it by the checkpoint.
pub(super) fn daemon_journals_end(plan: &LaunchPlan) -> bool {
    plan.journaling_daemon.is_some_and(|d| d.alive())
}

/// One finished job for the [`Finalizer`]: its id, its lock (holding the result) and `.sky/`.
pub(super) type Finished = (JobId, File, PathBuf);

/// Fsyncs a finished job's lock file and `.sky/`, then closes the lock (which frees it).
pub(super) fn finalize((id, lock, private): Finished) {
    let synced = lock
        .sync_data()
        .map_err(|e| ExecError::Io("supervisor.lock".into(), e))
        .and_then(|()| spool::sync_dir(&private).map_err(ExecError::from));
    drop(lock);
    if let Err(e) = synced {
        eprintln!("skyspool supervise: job {id}: {e}");
    }
}

/// The supervisor's second thread: for each finished job, in order, fsyncs the lock file
/// (which holds the result) and `.sky/`, then closes the lock, which frees it. Keeping this
/// off the supervisor's own thread lets the next job start without waiting for the disk.
pub(super) struct Finalizer {
    pub(super) tx: Option<std::sync::mpsc::Sender<Finished>>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

impl Finalizer {
    pub(super) fn start() -> Finalizer {
        let (tx, rx) = std::sync::mpsc::channel::<Finished>();
        let thread = std::thread::Builder::new()
            .name("finalizer".into())
            .spawn(move || rx.into_iter().for_each(finalize));
        match thread {
            Ok(t) => Finalizer {
                tx: Some(tx),
                thread: Some(t),
            },
            Err(e) => {
                // Done in line instead (see `submit`).
                eprintln!("skyspool supervise: no finalizer thread: {e}");
                Finalizer {
                    tx: None,
                    thread: None,
                }
            }
        }
    }

    /// Makes a finished job's result durable, then frees its lock: on the thread, or here.
    pub(super) fn submit(&self, job: Finished) {
        match &self.tx {
            Some(tx) => {
                if let Err(std::sync::mpsc::SendError(job)) = tx.send(job) {
                    finalize(job);
                }
            }
            None => finalize(job),
        }
    }

    /// Waits until every submitted job is durable and its lock free.
    pub(super) fn finish(mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `jobs/<id>/cancel` exists and was made by the job's owner, root or the daemon's
/// user (the daemon removes anyone else's).
pub(super) fn cancel_pending(spool: &Spool, plan: &LaunchPlan) -> bool {
    use std::os::unix::fs::MetadataExt;
    let me = nix::unistd::geteuid().as_raw();
    spool
        .cancel_requested(plan.job_id)
        .is_some_and(|m| m.uid() == plan.user.uid || m.uid() == 0 || m.uid() == me)
}

/// No block left for an unprivileged writer on the filesystem holding `dir`.
pub(super) fn filesystem_full(dir: &Path) -> bool {
    nix::sys::statvfs::statvfs(dir).is_ok_and(|v| v.blocks_available() == 0)
}

pub(super) fn open_log(plan: &LaunchPlan, name: &str) -> Result<File, ExecError> {
    let dir = Spool::at(&plan.spool).job_dir(plan.job_id);
    Ok(spool::open_log(&dir, name)?)
}

/// Runs setup (if any) then run (if any) on every node; returns the outcome.
pub(super) fn run_job(
    plan: &LaunchPlan,
    spool: &Spool,
    log: Option<OwnedFd>,
    signals: &Signals,
    taken: &mut Taken<'_>,
    pre: &mut Option<PreSpawned>,
) -> Result<JobResult, ExecError> {
    // Given by the daemon when the job was launched before it was published (its directory
    // is renamed from `staging/` meanwhile): nothing here opens a path of the job before its
    // gate opens, which is after the publication.
    let mut log = match log {
        Some(fd) => File::from(fd),
        None => open_log(plan, "log")?,
    };
    for note in &plan.notes {
        let _ = writeln!(log, "{note}");
    }
    let log = Arc::new(Mutex::new(log));
    let n = plan.nodes.len().max(1);
    if let Err(msg) = sync_workdirs(plan, &log) {
        return Ok(finish(Status::FailedSetup, vec![None; n], Some(&msg)));
    }
    if let Some(setup) = commands(&plan.setup) {
        let outcome = run_phase(plan, "setup", setup, &log, signals, taken, pre)?;
        match outcome {
            PhaseOutcome::Cancelled(codes) => {
                return Ok(finish(
                    Status::Cancelled,
                    codes,
                    Some("cancelled during setup"),
                ))
            }
            PhaseOutcome::Done(codes, _) if codes.iter().any(|c| *c != Some(0)) => {
                return Ok(finish(
                    Status::FailedSetup,
                    codes,
                    Some("setup exited with a non-zero code"),
                ));
            }
            PhaseOutcome::Done(..) => {}
        }
    }
    let Some(run) = commands(&plan.run) else {
        taken.open_now()?;
        spool.write_status(plan.job_id, Status::Running)?;
        return Ok(finish(Status::Succeeded, vec![Some(0); n], None));
    };
    match run_phase(plan, "run", run, &log, signals, taken, pre)? {
        PhaseOutcome::Cancelled(codes) => Ok(finish(Status::Cancelled, codes, Some("cancelled"))),
        PhaseOutcome::Done(codes, first) => {
            if codes.iter().all(|c| *c == Some(0)) {
                Ok(finish(Status::Succeeded, codes, None))
            } else {
                let describe = |r: usize| {
                    let node = plan.nodes.get(r).map(|n| n.name.as_str()).unwrap_or("?");
                    match codes.get(r).copied().flatten() {
                        Some(255) if plan.nodes.get(r).is_some_and(|n| n.ssh.is_some()) => {
                            format!(
                                "rank {r} ({node}) lost its connection (node down or unreachable)"
                            )
                        }
                        Some(c) if c > 128 => {
                            format!("rank {r} ({node}) was killed by signal {}", c - 128)
                        }
                        Some(c) => format!("rank {r} ({node}) exited with {c}"),
                        None => format!("rank {r} ({node}) gave no exit code"),
                    }
                };
                let first =
                    first.unwrap_or_else(|| codes.iter().position(|c| *c != Some(0)).unwrap_or(0));
                let mut reason = describe(first);
                if codes.len() > 1 {
                    reason.push_str("; the other ranks were stopped");
                }
                Ok(finish(Status::Failed, codes, Some(&reason)))
            }
        }
    }
}

pub(super) fn finish(
    status: Status,
    exit_codes: Vec<Option<i32>>,
    reason: Option<&str>,
) -> JobResult {
    JobResult {
        status,
        exit_codes,
        ended: spool::now_rfc3339(),
        reason: reason.map(str::to_string),
    }
}

pub(super) enum PhaseOutcome {
    /// Exit codes per rank, and the rank that failed first (whose failure stopped the rest).
    Done(Vec<Option<i32>>, Option<usize>),
    Cancelled(Vec<Option<i32>>),
}
