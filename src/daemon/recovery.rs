//! Start-up: the daemon rebuilds its records from the spool and the admission journal,
//! and re-adopts or settles the jobs a previous daemon left running.

use super::*;

impl Daemon {
    /// Rebuilds state from the spool: finishes staged admissions, re-adopts or settles
    /// jobs whose supervisor ran while no daemon watched, re-queues pending jobs in order.
    pub(super) fn recover(&mut self) -> anyhow::Result<()> {
        self.secret_ids = match self.spool.secret_ids() {
            Ok(ids) => Some(ids.into_iter().collect()),
            Err(e) => {
                note!("cannot list the secrets files: {e}");
                None
            }
        };
        self.replay_journal();
        let mut temps = self.spool.remove_stale_temps();
        for id in self.spool.job_ids()? {
            let info = match self.spool.read_info(id) {
                Ok(i) => i,
                Err(e) => {
                    note!("job {id}: skipped, unreadable record: {e}");
                    continue;
                }
            };
            let status = self.spool.read_status(id).unwrap_or(info.status);
            let settled = info.status.is_terminal();
            let mut info = info;
            info.status = status;
            if !(settled && status.is_terminal()) {
                // Its records may still be rewritten: a dead daemon's temporary goes.
                temps += self.spool.remove_stale_job_temps(id);
            }
            if status.is_terminal() {
                self.jobs.insert(id, info);
                self.touched.insert(id);
                if settled {
                    self.fix_link(id, State::Done);
                } else {
                    // It ended while no daemon watched: settle it like any ended job.
                    self.adopt_launch_record(id);
                    let placement = self.placement_of(id);
                    let _ = self.sched.restore(id, &placement);
                    self.finish(id, self.spool.read_result(id));
                }
                continue;
            }
            self.jobs.insert(id, info);
            self.touched.insert(id);
            let private = self.spool.job_private(id);
            if private.join("supervisor.lock").exists() {
                self.recover_launched(id);
            } else {
                self.fix_link(id, State::Pending);
                self.enqueue(id);
            }
        }
        if temps > 0 {
            note!("removed {temps} temporary file(s) a killed daemon left behind");
        }
        // Jobs fully staged before the crash: only publishing was left (and the round that
        // makes them durable, which may not have run).
        let mut published = BTreeSet::new();
        for claimed in self.spool.list_staged()? {
            let id = claimed.id;
            // The lock of a job launched before it was published (see
            // [`Daemon::launch_early`]): its gate opens only once the job is published and
            // durable, so nothing of it ran, and the dead daemon's end of the gate is closed.
            // Its log may hold its supervisor's notes: it starts again empty.
            spool::forget_launch(&claimed.dir);
            if claimed.staged {
                if let Err(e) = self.spool.publish(&claimed) {
                    note!("staged job {id}: {e}");
                    continue;
                }
                published.insert(id);
                if let Ok(info) = self.spool.read_info(id) {
                    note!(
                        "job {id} ({}) admitted from {} (staged before a restart)",
                        info.name,
                        info.source
                    );
                    self.jobs.insert(id, info);
                    self.touched.insert(id);
                    self.enqueue(id);
                    self.dirty = true;
                }
                continue;
            }
            match self.spool.read_claimed_yaml(&claimed) {
                Ok(yaml) => match self.validate(&claimed.source, &yaml, claimed.uid) {
                    Ok(adm) => {
                        if let Err(e) = self.stage_and_publish(vec![(claimed, adm)], false) {
                            note!("staged job {id}: {e}");
                        }
                    }
                    Err(reason) => {
                        let _ = self.spool.reject_claimed(&claimed, &reason);
                    }
                },
                Err(reason) => {
                    let _ = self.spool.reject_claimed(&claimed, &reason);
                }
            }
        }
        self.finish_round();
        self.start_round(published, None);
        self.settle_records();
        // From the disk as recovery left it: a directory prepared ahead (see
        // [`Daemon::premake`]) and removed above does not use its ID up.
        self.next_id = self.spool.next_id()?;
        let ids: Vec<JobId> = self.jobs.keys().copied().collect();
        for id in ids {
            if self.jobs.get(&id).is_some_and(|j| !j.status.is_terminal()) {
                let _ = self.watcher.watch_job(id, &self.spool.job_dir(id));
                self.handle_cancel(id);
            }
        }
        Ok(())
    }

    /// First thing at start-up: each job in the admission journal (see [`crate::journal`])
    /// gets back what a power cut lost of its admission (nothing, after a crash or a kill:
    /// the files were written), made durable at once; then the journal is emptied, but for
    /// the lines of a job that could not be restored, which stay for the next start (see
    /// [`crate::journal::Journal::keep_only`]).
    pub(super) fn replay_journal(&mut self) {
        let Some(journal) = self.journal.as_ref() else {
            return;
        };
        let records = journal.records();
        let mut failed = BTreeSet::new();
        let mut paths: Vec<(PathBuf, bool)> = Vec::new();
        for r in &records {
            match self.spool.restore_admission(r) {
                Ok((dir, written)) if !written.is_empty() => {
                    note!(
                        "job {} ({}): restored from the admission journal ({} path(s) rewritten or synced)",
                        r.id,
                        r.info.source,
                        written.len()
                    );
                    if self.am_root && r.info.uid != 0 {
                        if let Err(e) = spool::grant_create(&dir, r.info.uid) {
                            note!("job {}: {e}", r.id);
                        }
                    }
                    paths.extend(written);
                }
                Ok(_) => {}
                Err(e) => {
                    failed.insert(r.id);
                    note!(
                        "job {}: cannot be restored from the admission journal: {e}",
                        r.id
                    );
                }
            }
        }
        // Then the ends: a job that ended before the power cut is settled, never run again.
        let ends = journal.ends();
        for end in &ends {
            match self.spool.restore_end(end) {
                Ok(written) if !written.is_empty() => {
                    note!(
                        "job {} ({}): its end ({}) restored from the journal",
                        end.id,
                        end.source,
                        end.status
                    );
                    paths.extend(written);
                }
                Ok(_) => {}
                Err(e) => {
                    failed.insert(end.id);
                    note!(
                        "job {}: its end cannot be restored from the journal: {e}",
                        end.id
                    );
                }
            }
        }
        // A job restored into staging/ and then settled from its end was moved to jobs/:
        // what its admission's restore wrote is there now.
        let staging = self.spool.staging();
        for (path, _) in &mut paths {
            let Ok(rest) = path.strip_prefix(&staging) else {
                continue;
            };
            let mut parts = rest.components();
            let Some(id) = parts
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .and_then(|s| s.parse::<JobId>().ok())
            else {
                continue;
            };
            if !staging.join(id.to_string()).exists() {
                *path = self.spool.job_dir(id).join(parts.as_path());
            }
        }
        paths.sort();
        paths.dedup();
        if let Err(e) = spool::sync_all(&durables(&paths)) {
            // Not known to be durable: every line stays.
            failed.extend(
                records
                    .iter()
                    .map(|r| r.id)
                    .chain(ends.iter().map(|e| e.id)),
            );
            note!("journal: restored jobs not synced: {e}");
        }
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        if failed.is_empty() {
            if let Err(e) = journal.clear() {
                note!("admission journal: cannot empty it: {e}");
            }
        } else if let Err(e) = journal.keep_only(&failed) {
            note!("admission journal: cannot keep only the lines of the jobs not restored: {e}");
        } else {
            note!(
                "journal: the lines of {} job(s) not restored stay for the next start",
                failed.len()
            );
        }
    }

    /// A job whose launch was recorded: its supervisor is alive (re-adopt), finished
    /// (settle), died (FAILED_DRIVER), or never started (back to pending).
    pub(super) fn recover_launched(&mut self, id: JobId) {
        self.adopt_launch_record(id);
        let private = self.spool.job_private(id);
        let held = executor::lock_fd_is_held(&private.join("supervisor.lock")).unwrap_or(false);
        let record = self.spool.read_supervisor(id);
        if held {
            // A held lock means a supervisor lives (it may not have written its record yet):
            // find it by its record, or as the holder of the lock.
            let pid = record
                .as_ref()
                .filter(|rec| executor::process_start_ticks(rec.pid) == Some(rec.start_ticks))
                .map(|rec| rec.pid)
                .or_else(|| executor::flock_holder(&private.join("supervisor.lock")));
            if let Some(pid) = pid {
                let placement = self.placement_of(id);
                if let Err(e) = self.sched.restore(id, &placement) {
                    note!("job {id}: re-adopted but its resources clash: {e}");
                }
                self.fix_link(id, State::Running);
                self.watch_supervisor(id, pid);
                note!("job {id}: re-adopted running supervisor pid {pid}");
                return;
            }
        }
        if let Some(result) = self.spool.read_result(id) {
            self.fix_link(id, State::Running);
            let placement = self.placement_of(id);
            let _ = self.sched.restore(id, &placement);
            self.finish(id, Some(result));
            return;
        }
        if record.is_some() {
            self.fix_link(id, State::Running);
            self.finish(
                id,
                Some(driver_lost(
                    "the job's supervisor died without recording a result while no daemon was watching"
                        .into(),
                )),
            );
            return;
        }
        // Launch recorded but no supervisor ever ran: nothing of the job ran. Re-queue it.
        self.back_to_pending(id);
    }

    /// A launched job that nothing of ran goes back to the queue, in its place (its
    /// submission time): launch lock removed, `status` PENDING, no start or placement.
    pub(super) fn back_to_pending(&mut self, id: JobId) {
        let _ = std::fs::remove_file(self.spool.job_private(id).join("supervisor.lock"));
        let _ = self.spool.write_status(id, Status::Pending);
        self.touched.insert(id);
        if let Some(info) = self.jobs.get_mut(&id) {
            info.status = Status::Pending;
            info.started = None;
            info.placement.clear();
            let _ = self.spool.write_info(info);
        }
        self.fix_link(id, State::Pending);
        self.enqueue(id);
    }

    /// Whether a job whose supervisor exited never had anything of it run: the supervisor
    /// writes its record into the job's lock before anything else (a `cancel` check, a
    /// process), so no record and no final `status` mean it died before it took the job
    /// (for instance while it waited, free, with the launch unread in its socket). Not once
    /// the job has been put back [`MAX_UNTAKEN`] times.
    pub(super) fn never_taken(&self, id: JobId) -> bool {
        self.untaken.get(&id).copied().unwrap_or(0) < MAX_UNTAKEN
            && self.spool.read_supervisor(id).is_none()
            && !self.spool.read_status(id).is_ok_and(|s| s.is_terminal())
            && self.spool.read_launch(id).is_some()
    }

    /// Puts a job whose supervisor died before taking it back in the queue (it starts again
    /// at the next scheduling pass, on a new supervisor).
    pub(super) fn requeue_untaken(&mut self, id: JobId, pid: u32) {
        self.supervisors.remove(&id);
        self.sched.release(id);
        *self.untaken.entry(id).or_default() += 1;
        note!(
            "job {id}: its supervisor (pid {pid}) exited before it took the job; nothing of \
             it ran, so it is back in the queue"
        );
        self.back_to_pending(id);
        self.dirty = true;
        // A cancel that came while it was launched applies to it as a queued job now.
        self.handle_cancel(id);
    }

    /// A daemon that died between handing a job over and recording its start left
    /// `info.json` saying PENDING: take the start from the launch record.
    pub(super) fn adopt_launch_record(&mut self, id: JobId) {
        let Some(launch) = self.spool.read_launch(id) else {
            return;
        };
        let Some(info) = self.jobs.get_mut(&id) else {
            return;
        };
        if info.started.is_some() && !info.placement.is_empty() {
            return;
        }
        info.started = Some(launch.started);
        info.placement = launch.placement;
        if info.status == Status::Pending {
            info.status = Status::Running;
        }
        if let Err(e) = self.spool.write_info(info) {
            note!("job {id}: cannot record its launch in info.json: {e}");
        }
        self.touched.insert(id);
    }

    /// Makes sure exactly `state/<id>` links to the job.
    pub(super) fn fix_link(&self, id: JobId, state: State) {
        if self.spool.state_of(id) != Some(state) {
            let from = self.spool.state_of(id);
            match from {
                Some(f) => {
                    let _ = self.spool.move_state(id, f, state);
                }
                None => {
                    let _ = self.spool.link_state(id, state);
                }
            }
        }
        self.spool.unlink_other_states(id, state);
    }
}
