//! The launcher: one process that forks each job's supervisor; prestarts (a queued job's
//! bash started before its slot frees) and their confirmation.

use super::*;

impl Daemon {
    /// Starts queued jobs ahead of their placement, while every slot they could take is
    /// busy: each gets a supervisor that starts its first phase's bash as its user, held at
    /// the script's first line (exec, loading and bash's own start-up are done), and waits
    /// for the job's real launch (see [`executor::send_launch`] in [`Daemon::try_start`]).
    /// A freed slot then costs the next job only the hand-over. The oldest queued one-node
    /// jobs that fit the machine's own node (when it is the only local one) and have waited
    /// [`PRESTART_AFTER`] are taken (among the oldest 256), at most one per running job
    /// (each end frees one slot, at most) and at most `max_prestarts`. A job placed
    /// elsewhere, cancelled, or still queued when the daemon exits loses its prestart: its
    /// bash is killed unrun.
    pub(super) fn prestart_more(&mut self) {
        let sched = &self.sched;
        self.prestarts.retain(|id, _| sched.is_pending(*id));
        self.prestart_at = None;
        let want = self.max_prestarts.min(self.sched.running_len());
        if self.prestarts.len() >= want {
            return;
        }
        let Some((index, name, addr)) = self.lone_local_node() else {
            return;
        };
        let round = self.round.as_ref().map(|r| &r.ids);
        // Each with the grant it would get on the node (its GPUs are chosen at its start);
        // only jobs that have waited PRESTART_AFTER (the next such time is woken for).
        let ripe_before = now_ms().saturating_sub(PRESTART_AFTER.as_millis() as u64);
        let mut next_ripe: Option<u64> = None;
        let picked: Vec<(JobId, NodeGrant)> = self
            .sched
            .pending_ids()
            .take(256)
            .filter(|id| {
                !self.prestarts.contains_key(id)
                    && !self.undurable.contains_key(id)
                    && !round.is_some_and(|r| r.contains(id))
            })
            .filter_map(|id| {
                let d = self.sched.pending_demand(id)?;
                let grant = self.sched.fit_when_empty(index, d)?;
                let since = self.sched.waiting_since(id).unwrap_or(0);
                if since > ripe_before {
                    next_ripe = Some(next_ripe.map_or(since, |n| n.min(since)));
                    return None;
                }
                Some((id, grant))
            })
            .take(want - self.prestarts.len())
            .collect();
        if picked.len() < want - self.prestarts.len() {
            if let Some(since) = next_ripe {
                let wait = (since + PRESTART_AFTER.as_millis() as u64).saturating_sub(now_ms());
                self.prestart_at =
                    Some(std::time::Instant::now() + Duration::from_millis(wait.max(1)));
            }
        }
        for (id, grant) in picked {
            let tentative = NodeAssignment {
                rank: 0,
                node: name.clone(),
                ip: addr.clone(),
                accelerator: grant.accelerator,
                gpus: vec![],
                gpu_shares: vec![],
                cpus: grant.cpus.to_string(),
            };
            if let Err(e) = self.prestart(id, &tentative) {
                note!("job {id}: could not start it ahead: {e:#}");
            }
        }
    }

    /// Hands job `id` to a supervisor as a prestart on `node` (see [`Daemon::prestart_more`]).
    pub(super) fn prestart(&mut self, id: JobId, node: &NodeAssignment) -> anyhow::Result<()> {
        let spec = match self.fresh.take(id) {
            Some(spec) => spec,
            None => self.load_spec(id)?,
        };
        let info = self.jobs.get(&id).ok_or(spool::SpoolError::NoSuchJob(id))?;
        let plan = self.plan(info, &spec, std::slice::from_ref(node))?;
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        let lock_path = self.spool.job_private(id).join("supervisor.lock");
        let ours = self.send_prestart(id, json, None, lock_path)?;
        note!(
            "job {id} started ahead on {}: its bash waits at its first line for a slot",
            node.node
        );
        self.prestarts.insert(
            id,
            Prestart {
                gate: ours,
                node: node.node.clone(),
                pid: None,
                spec: Some(spec),
            },
        );
        Ok(())
    }

    /// Sends a prestart's tentative `plan` (and the job's `log`, for a job not published
    /// yet) to the launcher with one end of a new gate; returns the other, which its real
    /// launch goes through (see [`Daemon::confirm`]).
    pub(super) fn send_prestart(
        &mut self,
        id: JobId,
        plan: Vec<u8>,
        log: Option<std::os::fd::OwnedFd>,
        lock_path: PathBuf,
    ) -> anyhow::Result<std::os::unix::net::UnixStream> {
        let (ours, theirs) =
            std::os::unix::net::UnixStream::pair().context("making the job's gate")?;
        let mut l = Launching {
            id,
            plan,
            lock: None,
            gate: Some(theirs.into()),
            log,
            lock_path,
            sent: std::time::Instant::now(),
            confirmed: None,
        };
        if let Err(e) = self.send_to_launcher(&l) {
            // Like any failed hand-over: this launcher is done for (the next gets a new one).
            if self.launcher.is_some() {
                self.launcher_lost(&format!("{e}"));
            }
            return Err(e).context("handing it to a supervisor");
        }
        // Its supervisor's ends are the launcher's now: the daemon's copies would hide that
        // gate end's closing (see `launcher_lost`).
        l.gate = None;
        l.log = None;
        self.launching.push_back(l);
        Ok(ours)
    }

    /// Gives a prestarted job its launch (`plan`, `lock`) through its gate, when it was
    /// started where it is placed (`assignments`). `None`: it was not prestarted, or not
    /// there, or its supervisor is gone (its prestart goes: the gate closes, its bash dies
    /// unrun); the caller hands it over like any other job. `Some(pid)`: its supervisor
    /// has it; `Some(None)`: the launcher has not said which supervisor that is yet, its
    /// launch then stays in `launching` as an ordinary one (answered or, if the launcher is
    /// lost, settled by [`Daemon::launcher_lost`]).
    pub(super) fn confirm_prestart(
        &mut self,
        id: JobId,
        assignments: &[NodeAssignment],
        plan: &[u8],
        lock: &std::os::fd::OwnedFd,
    ) -> Option<Option<u32>> {
        let p = self.prestarts.remove(&id)?;
        self.confirm(p, id, assignments, plan, lock, None)
    }

    /// Gives the job of prestart `p` its launch through its gate (see
    /// [`Daemon::confirm_prestart`]); `gate`: the job's start gate, for a job launched
    /// before its admission is durable (a speculative prestart's).
    pub(super) fn confirm(
        &mut self,
        p: Prestart,
        id: JobId,
        assignments: &[NodeAssignment],
        plan: &[u8],
        lock: &std::os::fd::OwnedFd,
        gate: Option<&std::os::fd::OwnedFd>,
    ) -> Option<Option<u32>> {
        if !matches!(assignments, [a] if a.node == p.node) {
            return None;
        }
        let waiting = match p.pid {
            Some(_) => None,
            None => Some(
                self.launching
                    .iter()
                    .position(|l| l.id == id && l.is_prestart())?,
            ),
        };
        // The daemon keeps a copy of the lock while the launch is unanswered (as for any
        // launch: see `launcher_lost`).
        let kept = match waiting {
            Some(_) => Some(lock.try_clone().ok()?),
            None => None,
        };
        if let Err(e) = executor::send_launch(&p.gate, plan, Some(lock), gate, None) {
            note!("job {id}: its prestart is gone ({e}); launching it afresh");
            return None;
        }
        if let Some(l) = waiting.and_then(|i| self.launching.get_mut(i)) {
            l.plan = plan.to_vec();
            l.lock = kept;
            l.confirmed = Some(p.gate);
        }
        Some(p.pid)
    }

    /// Sends a launch to the launcher (a new one when there is none, or when sending fails:
    /// the old one is then lost, see [`Daemon::launcher_lost`]). `Some(pid)` when a
    /// supervisor is known to have the job already; otherwise its pid comes later as
    /// [`Msg::Launched`].
    pub(super) fn hand_off(
        &mut self,
        id: JobId,
        plan: Vec<u8>,
        lock: std::os::fd::OwnedFd,
        gate: Option<std::os::fd::OwnedFd>,
        log: Option<std::os::fd::OwnedFd>,
        lock_path: PathBuf,
    ) -> std::io::Result<Option<u32>> {
        let l = Launching {
            id,
            plan,
            lock: Some(lock),
            gate,
            log,
            lock_path,
            sent: std::time::Instant::now(),
            confirmed: None,
        };
        let mut last_error = None;
        for _ in 0..2 {
            match self.send_to_launcher(&l) {
                Ok(()) => {
                    self.launching.push_back(l);
                    return Ok(None);
                }
                // Not even a launcher could be started.
                Err(e) if self.launcher.is_none() => return Err(e),
                Err(e) => {
                    self.launcher_lost(&format!("{e}"));
                    // A supervisor may have got the job before the failure: it then holds
                    // the lock file open. Launching again would run the job twice.
                    if let Some(pid) = executor::flock_holder(&l.lock_path) {
                        return Ok(Some(pid));
                    }
                    last_error = Some(e);
                }
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::other("no launcher")))
    }

    /// Sends `l` to the launcher, starting one first when there is none.
    pub(super) fn send_to_launcher(&mut self, l: &Launching) -> std::io::Result<()> {
        if self.launcher.is_none() {
            self.new_launcher()?;
        }
        match self.launcher.as_mut() {
            Some(launcher) => {
                launcher.send(&l.plan, l.lock.as_ref(), l.gate.as_ref(), l.log.as_ref())
            }
            None => Err(std::io::Error::other("no launcher")),
        }
    }

    /// Starts a launcher (the next generation) and the reader of its answers.
    pub(super) fn new_launcher(&mut self) -> std::io::Result<()> {
        let mut launcher = executor::spawn_launcher(&self.exe, self.spool.root())?;
        self.launcher_gen += 1;
        match launcher.take_answers() {
            Some(fd) => read_answers(fd, self.launcher_gen, self.tx.clone()),
            None => return Err(std::io::Error::other("the launcher has no answer pipe")),
        }
        self.launcher = Some(launcher);
        Ok(())
    }

    /// Closes the launcher's socket and waits (up to 2 s, then kills it) for it to exit: every
    /// supervisor then finds its own socket to the launcher closed (see
    /// [`executor::supervise_main`]).
    pub(super) fn close_launcher(&mut self) {
        let Some(launcher) = self.launcher.take() else {
            return;
        };
        let pid = nix::unistd::Pid::from_raw(launcher.pid as i32);
        drop(launcher);
        if !reap_within(pid, Duration::from_secs(2)) {
            note!("launcher pid {pid} did not exit when its socket closed; killing it");
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            reap_within(pid, Duration::from_secs(2));
        }
    }

    /// The launcher failed (killed by someone, or it stopped taking launches): it is made
    /// sure to be gone, and each launch it had not answered is settled: a supervisor that
    /// holds the job's lock has it; any other goes to a new launcher (or fails to start).
    pub(super) fn launcher_lost(&mut self, why: &str) {
        if let Some(old) = self.launcher.take() {
            let pid = nix::unistd::Pid::from_raw(old.pid as i32);
            note!("launcher pid {} failed ({why}); starting another", old.pid);
            // It may hold locks of launches it had read: it must be gone before the locks'
            // holders are looked for. Its running supervisors live in sessions of their own.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            reap_within(pid, Duration::from_secs(2));
        }
        for mut l in std::mem::take(&mut self.launching) {
            if !self.jobs.contains_key(&l.id) {
                // An early launch whose job could not be staged (see
                // [`Daemon::launch_early`]): its gate is closed, nothing of it may run.
                continue;
            }
            if l.is_prestart() {
                // A prestart: given up (its supervisor, if any, is told by its gate).
                self.prestarts.remove(&l.id);
                continue;
            }
            if let Some(gate) = l.confirmed.take() {
                // A prestart confirmed through its gate: a supervisor may have it, or still
                // read it, unseen yet. It is launched again only once nobody can.
                match executor::await_gate_reader(&gate, &l.lock_path, Duration::from_secs(5)) {
                    executor::GateReader::Holder(pid) => {
                        self.launched(l.id, pid);
                        continue;
                    }
                    executor::GateReader::Gone => {
                        if let Some(rec) = self.spool.read_supervisor(l.id) {
                            // Taken, and over already.
                            self.launched(l.id, rec.pid);
                            continue;
                        }
                    }
                    executor::GateReader::Unknown => {
                        self.fail_start(
                            l.id,
                            "its launcher was lost while a supervisor may still have held its launch",
                        );
                        continue;
                    }
                }
            }
            if let Some(pid) = executor::flock_holder(&l.lock_path) {
                self.launched(l.id, pid);
                continue;
            }
            match self.send_to_launcher(&l) {
                Ok(()) => self.launching.push_back(Launching {
                    sent: std::time::Instant::now(),
                    ..l
                }),
                Err(e) => self.fail_start(l.id, &format!("handing the job to its supervisor: {e}")),
            }
        }
    }

    /// The launcher answered job `id`'s launch: `pid` supervises it (0: none could be made).
    pub(super) fn launched(&mut self, id: JobId, pid: u32) {
        if pid == 0 {
            self.fail_start(id, "the launcher could not fork a supervisor");
            return;
        }
        if self.jobs.get(&id).is_none_or(|j| j.status.is_terminal()) {
            // It ended (its final status came first) or was settled meanwhile.
            return;
        }
        self.watch_supervisor(id, pid);
        note!(
            "job {id} started (supervisor pid {pid}) on {}",
            self.jobs
                .get(&id)
                .map(|i| i
                    .placement
                    .iter()
                    .map(|a| format!("{} gpus {:?}", a.node, a.gpus))
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
        // What happened before its pid was known: the final status, a cancel.
        self.refresh_status(id);
        self.handle_cancel(id);
    }

    /// A job that was placed could not be started: FAILED_DRIVER, with the reason.
    pub(super) fn fail_start(&mut self, id: JobId, reason: &str) {
        note!("job {id}: could not start: {reason}");
        let _ = self
            .spool
            .append_log(id, &format!("skyspool: could not start the job: {reason}"));
        self.finish(id, Some(driver_lost(format!("could not start: {reason}"))));
    }

    /// Keeps a launcher ready for the next job (see [`executor::Launcher`]).
    pub(super) fn ensure_launcher(&mut self) {
        if self.launcher.is_some() {
            return;
        }
        if let Err(e) = self.new_launcher() {
            note!("could not start the launcher: {e}");
        }
    }
}
