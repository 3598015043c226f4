//! Durability: admission rounds (the journal, or each round's files synced), the gates
//! they open, and the lazy syncs and checkpoints behind them.

use super::*;

impl Daemon {
    /// Makes the round of fsyncs that makes the just published jobs `ids` durable: each
    /// one's `job.yaml`, `info.json`, directory and secrets file if any, and `jobs/` (and
    /// `.skyspool/secrets/`), run concurrently once the batch's jobs are placed and handed
    /// over (see [`AdmissionRound`], [`RoundSync::Due`]).
    /// Not `status` nor `log` (a PENDING lost to a power cut is what `info.json` says
    /// anyway), nor the `pending/` link (start-up makes it again from `info.json`);
    /// `staging/` (the name the job had) and `last_id` (the highest ID given; start-up also
    /// counts the IDs in `jobs/`, so it matters only for jobs removed since) are synced after
    /// the gate opens, off the way to the start ([`Daemon::lazy_sync`]). A power cut before
    /// the round is through finds the jobs in `jobs/` or `staging/`, whole or not at all,
    /// and nothing of them ran (their gates were closed).
    pub(super) fn start_round(&mut self, ids: BTreeSet<JobId>, last_id: Option<PathBuf>) {
        if ids.is_empty() {
            // An early launch's round, if any, closes its gate unopened.
            self.round = None;
            return;
        }
        let jobs = self.spool.jobs();
        let mut files = vec![(jobs, true)];
        for id in &ids {
            let dir = self.spool.job_dir(*id);
            files.push((dir.join("job.yaml"), false));
            files.push((dir.join("info.json"), false));
            files.push((dir, true));
        }
        files.extend(self.secrets_paths(ids.iter().copied()));
        let lazy = std::iter::once((self.spool.staging(), true)).chain(last_id.map(|p| (p, false)));
        // An early launch's round (see [`Daemon::launch_early`]) keeps its gate, and its
        // journal fsync if that started already.
        let (gate, prejournal) = match self.round.take() {
            Some(r) => (r.gate, r.prejournal.filter(|_| r.ids == ids)),
            None => (None, None),
        };
        // Through the journal: one fsync; the job files, `staging/` and `last-id` with the
        // journal's next checkpoint.
        let (sync, later) = match prejournal.or_else(|| self.journal_round(&ids)) {
            Some(sync) => (RoundSync::Started(sync), Vec::new()),
            None => (RoundSync::Due(files), lazy.collect()),
        };
        self.round = Some(AdmissionRound {
            sync,
            ids,
            gate,
            later,
            prejournal: None,
        });
    }

    /// An early-launched job's record goes to the journal before the job is staged, and its
    /// fsync starts at once: the round's one flush then runs while the job is staged and
    /// published, instead of after. The round still goes through only once the job is
    /// published (see [`Daemon::start_round`]); a job that cannot be staged gets its record
    /// taken back ([`Daemon::unjournal`]) before its submission is handed back. Returns
    /// whether the record was written.
    pub(super) fn journal_early(
        &mut self,
        early: &Early,
        adm: &Admission,
        file: Option<spool::FileIdent>,
    ) -> bool {
        // A job with secrets: its secrets file, written with its files, is synced with the
        // round's journal line (see [`Daemon::journal_append`]), so that line waits for it.
        if self.journal.is_none()
            || self.round.as_ref().is_none_or(|r| r.ids.len() != 1)
            || !adm.spec.secrets.is_empty()
        {
            return false;
        }
        let record = crate::journal::Record {
            id: early.id,
            info: early.info.clone(),
            yaml: adm.job_yaml_text(),
            file,
        };
        let Some(sync) = self.journal_append(&[record]) else {
            return false;
        };
        if let Some(round) = self.round.as_mut() {
            round.prejournal = Some(sync);
        }
        true
    }

    /// Before an early job's submission is handed back or rejected (its staging failed):
    /// takes back its record, if it was journaled early. `false`: the record could not be
    /// taken back, so the claim must stay where it is (start-up finishes it as the job the
    /// record says).
    pub(super) fn unjournal(&mut self, id: JobId, journaled_early: Option<JobId>) -> bool {
        if journaled_early != Some(id) {
            return true;
        }
        match self.journal.as_mut().map(|j| j.void(id)) {
            Some(Err(e)) => {
                note!("job {id}: its journal record cannot be taken back ({e}); its claim stays in staging/ for the next start");
                false
            }
            _ => true,
        }
    }

    /// Appends the records of the round's jobs to the admission journal (see
    /// [`crate::journal`]) and starts its fsync; `None` (the round then syncs the job files
    /// themselves) without a journal, for a round with a directory submission (its files
    /// are not in a record), or when the append fails.
    pub(super) fn journal_round(&mut self, ids: &BTreeSet<JobId>) -> Option<spool::SyncRound> {
        let mut lines: HashMap<JobId, Unjournaled> = ids
            .iter()
            .filter_map(|id| self.unjournaled.remove(id).map(|u| (*id, u)))
            .collect();
        self.journal.as_ref()?;
        let mut records = Vec::with_capacity(ids.len());
        for id in ids {
            let info = self.jobs.get(id).filter(|i| !i.has_workdir)?.clone();
            let line = match lines.remove(id) {
                Some(line) => line,
                // Published at start-up (staged before a restart): as written, read back.
                None => Unjournaled {
                    file: None,
                    yaml: String::from_utf8(
                        std::fs::read(self.spool.job_dir(*id).join("job.yaml")).ok()?,
                    )
                    .ok()?,
                },
            };
            records.push(crate::journal::Record {
                id: *id,
                info,
                yaml: line.yaml,
                file: line.file,
            });
        }
        self.journal_append(&records)
    }

    /// Whether job `id` has a secrets file (known from its staging and the listing at
    /// start-up; looked up when that listing failed).
    pub(super) fn has_secrets(&self, id: JobId) -> bool {
        self.secret_ids.as_ref().map_or_else(
            || self.spool.secrets_file(id).exists(),
            |ids| ids.contains(&id),
        )
    }

    /// What a round syncs for the secrets of its jobs `ids` (their `job.yaml` and journal
    /// lines have them redacted): each one's secrets file, and their directory once; none
    /// for jobs without secrets. `(path, is a directory)`.
    pub(super) fn secrets_paths(&self, ids: impl Iterator<Item = JobId>) -> Vec<(PathBuf, bool)> {
        let mut paths: Vec<(PathBuf, bool)> = ids
            .filter(|id| self.has_secrets(*id))
            .map(|id| (self.spool.secrets_file(id), false))
            .collect();
        if !paths.is_empty() {
            paths.push((self.spool.private().join("secrets"), true));
        }
        paths
    }

    /// Appends `records` to the journal in one write and starts its fsync at once (it waits
    /// for no hand-over: it is mostly the device's wait), the round's eventfd to be counted
    /// when it is through. `None` without a journal or when the append fails (noted): those
    /// jobs' files are then synced as the round.
    pub(super) fn journal_append(
        &mut self,
        records: &[crate::journal::Record],
    ) -> Option<spool::SyncRound> {
        // The lines hold no secrets: their files are synced with the line.
        let secrets = self.secrets_paths(records.iter().map(|r| r.id));
        match self.journal.as_mut()?.append(records) {
            Ok(path) => {
                // Job ends appended to the same file before are made durable by this fsync:
                // theirs, waiting, is not needed (see [`Daemon::settle_records`]).
                self.lazy.forget(&path);
                let mut paths = vec![(path, false)];
                paths.extend(secrets);
                Some(spool::SyncRound::start_notify(
                    &durables(&paths),
                    notify_of(&self.round_ready),
                ))
            }
            Err(e) => {
                note!("admission journal: cannot append ({e}); the round syncs its jobs' files");
                None
            }
        }
    }

    /// The start gate for job `id`'s launch: a copy of the round's gate when the job's
    /// admission round is still running (the gate is made with the first such launch).
    pub(super) fn gate_for(&mut self, id: JobId) -> std::io::Result<Option<std::os::fd::OwnedFd>> {
        let Some(round) = self.round.as_mut().filter(|r| r.ids.contains(&id)) else {
            return Ok(None);
        };
        if round.gate.is_none() {
            // Close-on-exec: the write end stays the daemon's alone (a launcher or any other
            // child holding it would keep a dead daemon's gates from closing).
            let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            round.gate = Some((r, w));
        }
        match &round.gate {
            Some((r, _)) => r.try_clone().map(Some),
            None => Ok(None),
        }
    }

    /// Fsyncs `paths` (true: a directory) in the background, nothing waiting for them: with
    /// the batch in flight if none is, else with the next one, which starts once the one in
    /// flight is through ([`Daemon::poll_lazy`]). A failure is only noted.
    pub(super) fn lazy_sync(&mut self, paths: &[(PathBuf, bool)]) {
        let lazy = &mut self.lazy;
        for p in paths {
            if lazy.next_set.insert(p.0.clone()) {
                lazy.next.push(p.clone());
            }
        }
        if lazy.due.is_none() && !lazy.next.is_empty() {
            lazy.due = Some(std::time::Instant::now() + LAZY_DELAY);
        }
        self.poll_lazy();
    }

    /// When the event loop next has background syncs to start: the waiting paths' time
    /// ([`LAZY_DELAY`]) or the journal's next checkpoint, whichever comes first; `None`
    /// while a batch is in flight (its end wakes the loop) or nothing waits.
    pub(super) fn lazy_due(&self) -> Option<std::time::Instant> {
        if self.lazy.inflight.is_some() {
            return None;
        }
        match (
            self.lazy.due,
            self.checkpoint_due(std::time::Instant::now()),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the journal's next checkpoint is due, it being `now` (see
    /// [`crate::journal::Journal::checkpoint_due`]), not before a failed one may be tried
    /// again.
    pub(super) fn checkpoint_due(&self, now: std::time::Instant) -> Option<std::time::Instant> {
        let due = self.journal.as_ref()?.checkpoint_due(now)?;
        Some(self.lazy.retry_checkpoint_at.map_or(due, |r| r.max(due)))
    }

    /// Takes the outcome of the background syncs in flight, if through (a checkpoint's
    /// sealed journal file is emptied), and starts the next batch: the journal's checkpoint
    /// when it is due (a `syncfs`, which makes the waiting paths durable too), else the
    /// waiting paths once their time has come.
    pub(super) fn poll_lazy(&mut self) {
        if let Some((sync, sealed)) = self.lazy.inflight.as_mut() {
            let Some(result) = sync.try_wait() else {
                return;
            };
            let sealed = *sealed;
            self.lazy.inflight = None;
            self.lazy_through(result, sealed);
        }
        let now = std::time::Instant::now();
        if self.checkpoint_due(now).is_some_and(|t| t <= now) {
            self.lazy.retry_checkpoint_at = None;
            let sealed = match self.journal.as_mut().map(|j| j.seal()) {
                Some(Ok(sealed)) => sealed,
                Some(Err(e)) => {
                    note!("journal: cannot move the lines start-up left: {e}");
                    None
                }
                None => None,
            };
            if let Some(sealed) = sealed {
                self.lazy.due = None;
                self.lazy.next.clear();
                self.lazy.next_set.clear();
                let root = self.spool.root().to_path_buf();
                self.lazy.inflight = Some((
                    spool::SyncRound::start_notify(
                        &[spool::Durable::Filesystem(&root)],
                        notify_of(&self.lazy_ready),
                    ),
                    Some(sealed),
                ));
                return;
            }
            if self
                .journal
                .as_ref()
                .is_some_and(|j| j.checkpoint_due(now).is_some())
            {
                // Records wait, but none can be sealed (the other file holds records start-up
                // could not restore): not again before the retry time.
                self.lazy.retry_checkpoint_at = Some(now + CHECKPOINT_RETRY);
            }
        }
        let due = self.lazy.due.is_some_and(|t| t <= now);
        if self.lazy.next.is_empty() || !(due || self.lazy.next.len() >= LAZY_BATCH_NOW) {
            return;
        }
        self.lazy.due = None;
        let paths = std::mem::take(&mut self.lazy.next);
        self.lazy.next_set.clear();
        self.lazy.inflight = Some((
            spool::SyncRound::start_notify(&durables(&paths), notify_of(&self.lazy_ready)),
            None,
        ));
    }

    /// A batch of background syncs is through: a checkpoint's sealed journal file is
    /// emptied; a failure keeps it (the checkpoint is tried again, and its records stay
    /// for start-up meanwhile).
    pub(super) fn lazy_through(&mut self, result: spool::Result<()>, sealed: Option<usize>) {
        match (result, sealed) {
            (Ok(()), Some(part)) => {
                if let Some(journal) = self.journal.as_mut() {
                    journal.checkpointed(part);
                }
            }
            (Ok(()), None) => {}
            (Err(e), Some(_)) => {
                note!(
                    "journal checkpoint failed: {e} (the journal keeps its records; tried again)"
                );
                self.lazy.retry_checkpoint_at = Some(std::time::Instant::now() + CHECKPOINT_RETRY);
            }
            (Err(e), None) => note!("background fsync failed: {e}"),
        }
    }

    /// At shutdown: waits for the background syncs, makes the waiting ones now, and a last
    /// checkpoint of the journal.
    pub(super) fn finish_lazy(&mut self) {
        if let Some((sync, sealed)) = self.lazy.inflight.take() {
            self.lazy_through(sync.wait(), sealed);
        }
        let paths = std::mem::take(&mut self.lazy.next);
        self.lazy.next_set.clear();
        self.lazy.due = None;
        let Some(journal) = self.journal.as_mut() else {
            if let Err(e) = spool::sync_all(&durables(&paths)) {
                note!("background fsync failed: {e}");
            }
            return;
        };
        if !journal.holds_records() {
            return;
        }
        match spool::sync_filesystem(self.spool.root()) {
            Ok(()) => {
                if let Err(e) = journal.clear() {
                    note!("journal: cannot empty it: {e}");
                }
            }
            Err(e) => {
                note!("journal checkpoint failed: {e} (its records are read at the next start)")
            }
        }
    }

    /// Waits for the admission round in flight, if any, then opens its gate: the jobs
    /// handed over meanwhile start. When the round failed, the gate closes unopened (their
    /// supervisors leave them untaken, and they come back to the queue) and each of its
    /// jobs fails instead of starting, with the reason: a job must not run when the spool
    /// cannot say it was ever submitted.
    pub(super) fn finish_round(&mut self) {
        let Some(mut round) = self.round.take() else {
            return;
        };
        let result = match &mut round.sync {
            RoundSync::Unstaged => {
                // Not published: its gate closes unopened as the round is dropped.
                note!(
                    "jobs {:?}: launched but never published; not run",
                    round.ids
                );
                return;
            }
            RoundSync::Due(paths) => spool::SyncRound::start(&durables(paths)).wait(),
            RoundSync::Started(sync) => {
                let result = std::mem::take(sync).wait();
                self.reset_round_ready();
                result
            }
            RoundSync::Inline(sync) | RoundSync::Polled(sync) => std::mem::take(sync).wait(),
        };
        self.round_done(round, result);
    }

    /// Starts the round's fsyncs, if due (the batch's jobs are handed over by now), and
    /// sees it through: waited for now ([`Daemon::finish_round`]), or, with an eventfd to
    /// be woken through, taken by [`Daemon::poll_round`] once its last fsync is through,
    /// while the daemon goes on with other events. A lone submission on an idle queue is
    /// waited for in line: nothing else is to be done meanwhile, and the wake-up through
    /// the event loop costs its start ~0.1 ms. A round of many jobs, or one while other
    /// jobs run or more names wait, is polled: their ends and starts go on meanwhile, and
    /// the submissions that come in the meantime share the next round.
    pub(super) fn settle_round(&mut self) {
        let Some(round) = self.round.as_mut() else {
            return;
        };
        if matches!(round.sync, RoundSync::Due(_) | RoundSync::Started(_)) {
            let own = round
                .ids
                .iter()
                .filter(|id| self.sched.running_placement(**id).is_some())
                .count();
            let busy = round.ids.len() >= POLLED_ROUND_JOBS
                || self.sched.running_len() > own
                || !self.to_admit.is_empty();
            let notify = notify_of(&self.round_ready).filter(|_| busy);
            round.sync = match (
                std::mem::replace(&mut round.sync, RoundSync::Unstaged),
                notify,
            ) {
                (RoundSync::Started(sync), Some(_)) => RoundSync::Polled(sync),
                (RoundSync::Due(paths), Some(fd)) => {
                    RoundSync::Polled(spool::SyncRound::start_notify(&durables(&paths), Some(fd)))
                }
                (RoundSync::Due(paths), None) => {
                    RoundSync::Inline(spool::SyncRound::start(&durables(&paths)))
                }
                // Waited for in line (finish_round), its count on the eventfd taken then.
                (other, _) => other,
            };
        }
        match round.sync {
            RoundSync::Polled(_) => self.poll_round(),
            _ => self.finish_round(),
        }
    }

    /// Whether the round in flight is polled (see [`Daemon::settle_round`]).
    pub(super) fn round_polled(&self) -> bool {
        matches!(
            self.round.as_ref().map(|r| &r.sync),
            Some(RoundSync::Polled(_))
        )
    }

    /// Takes back what a round waited for in line added to the eventfd (see
    /// [`RoundSync::Started`]), so that the next polled round is not woken for it.
    pub(super) fn reset_round_ready(&self) {
        if let Some(fd) = &self.round_ready {
            let mut count = [0u8; 8];
            let _ = nix::unistd::read(&**fd.get_ref(), &mut count);
        }
    }

    /// Takes the outcome of a polled round, if it is through.
    pub(super) fn poll_round(&mut self) {
        let Some(AdmissionRound {
            sync: RoundSync::Polled(sync),
            ..
        }) = self.round.as_mut()
        else {
            return;
        };
        let Some(result) = sync.try_wait() else {
            return;
        };
        if let Some(round) = self.round.take() {
            self.round_done(round, result);
        }
    }

    /// Opens a round's gate, or fails its jobs (see [`Daemon::finish_round`]).
    pub(super) fn round_done(&mut self, round: AdmissionRound, result: spool::Result<()>) {
        // Its jobs may now be listed (see sync_view).
        self.dirty = true;
        match result {
            Ok(()) => {
                if let Some((_, w)) = &round.gate {
                    // Nobody reading (every supervisor gone already) is fine: nothing to open.
                    let _ = nix::unistd::write(w, &[1]);
                }
                drop(round.gate);
                self.lazy_sync(&round.later);
            }
            Err(e) => {
                let why = format!(
                    "the spool's disk could not make its submission durable ({e}); nothing of \
                     it ran; its job.yaml is kept here, submit it again once the disk is sound"
                );
                note!("admission round failed: {e}; jobs {:?} fail", round.ids);
                for id in round.ids {
                    if self.sched.dequeue(id) {
                        let _ = self.spool.append_log(id, &format!("skyspool: {why}"));
                        self.finish(id, Some(driver_lost(why.clone())));
                    } else if self.jobs.get(&id).is_some_and(|j| !j.status.is_terminal()) {
                        // Handed over already: it fails when it comes back untaken.
                        self.undurable.insert(id, why.clone());
                    }
                }
            }
        }
    }
}
