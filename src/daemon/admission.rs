//! Admission: a submission is read, checked, claimed out of `incoming/` and staged and
//! published as `jobs/<id>/` (or rejected with a reason).

use super::*;

impl Daemon {
    /// Parses and checks a submission; `Err` is the reason shown next to it in `rejected/`.
    pub(super) fn validate(
        &self,
        source: &str,
        yaml: &[u8],
        _uid: u32,
    ) -> Result<Admission, String> {
        let text = std::str::from_utf8(yaml)
            .map_err(|e| format!("{source}: the file is not UTF-8 text ({e})"))?;
        let spec = spec::parse(text, source, &BTreeMap::new()).map_err(|e| e.to_string())?;
        if !spec.secrets.is_empty() && spec.to_redacted_yaml().len() > spec::MAX_SPEC_BYTES {
            return Err(format!(
                "{source}: with its secrets redacted the job would exceed {} bytes; make the file smaller",
                spec::MAX_SPEC_BYTES
            ));
        }
        let demand = spec.demand();
        self.sched.check_fits_ever(&demand).map_err(|e| {
            format!(
                "{source}: this job can never run on cluster {}: {e}",
                self.inventory.cluster_name
            )
        })?;
        Ok(Admission {
            spec,
            yaml: yaml.to_vec(),
        })
    }

    /// Admits or rejects each named submission; admitted ones are made durable together
    /// (one round of fsyncs for the whole batch), then published in order.
    pub(super) fn admit_batch(&mut self, names: Vec<OsString>) {
        self.admit_names(names.into_iter().map(|n| (n, 0)).collect());
    }

    /// Submissions that were still open for writing when last looked at (see
    /// [`crate::recheck`]): admitted now if their writer is gone.
    pub(super) fn look_again(&mut self, due: Vec<(OsString, usize)>) {
        let due = due
            .into_iter()
            .filter(|(name, _)| !self.deferred.contains(name))
            .collect();
        self.admit_names(due);
    }

    /// [`Daemon::admit_batch`], each name with how often it was looked at again already:
    /// queued behind the names that came before, and the first chunk admitted now unless a
    /// round is in flight.
    pub(super) fn admit_names(&mut self, names: Vec<(OsString, usize)>) {
        for (name, tries) in names {
            if self.to_admit_names.insert(name.clone()) {
                self.to_admit.push_back((name, tries));
            }
        }
        self.admit_some();
    }

    /// Whether names wait in `to_admit` and nothing keeps them from being admitted now.
    pub(super) fn admission_waiting(&self) -> bool {
        self.round.is_none() && !self.to_admit.is_empty()
    }

    /// Admits the next chunk of `to_admit` (at most MAX_ROUND_JOBS jobs, one round of
    /// fsyncs), unless a round is still in flight. A bulk move of thousands of files is thus
    /// admitted a chunk at a time, and between chunks (and while a chunk's round runs) the
    /// daemon handles the events of the jobs already running, so their slots do not stay
    /// empty while the rest is admitted; nor does a rescan that finds 20,000 names leave them
    /// published for seconds before a round of 60,000 fsyncs makes them durable.
    pub(super) fn admit_some(&mut self) {
        if self.round.is_some() {
            return;
        }
        let mut ready: Vec<(Claimed, Admission)> = Vec::new();
        let mut looked = 0;
        while ready.len() < MAX_ROUND_JOBS && looked < MAX_LOOKS_PER_CHUNK {
            let Some((name, tries)) = self.to_admit.pop_front() else {
                break;
            };
            self.to_admit_names.remove(&name);
            if self.deferred.contains(&name) {
                continue;
            }
            looked += 1;
            match self.take_submission(&name, tries) {
                Ok(Some(pair)) => ready.push(pair),
                Ok(None) => {}
                Err(e) => note!("incoming/{}: {e}", spool::display_name(&name)),
            }
        }
        if !ready.is_empty() {
            if let Err(e) = self.stage_and_publish(ready, true) {
                note!("admission failed: {e}");
            }
        }
    }

    /// Looks at one name in `incoming/`: `Ok(None)` when there is nothing to admit (gone,
    /// ignored, rejected, or still being written).
    pub(super) fn take_submission(
        &mut self,
        name: &OsStr,
        tries: usize,
    ) -> anyhow::Result<Option<(Claimed, Admission)>> {
        let Some((kind, _meta)) = self.spool.inspect_incoming(name)? else {
            return Ok(None);
        };
        let source = format!("incoming/{}", spool::display_name(name));
        let yaml = match &kind {
            Incoming::Ignore => return Ok(None),
            Incoming::Bad(reason) => {
                let to = self
                    .spool
                    .reject_incoming(name, &format!("{source}: {reason}"))?;
                note!("rejected {source}: {reason} (now {})", to.display());
                return Ok(None);
            }
            Incoming::File => match self.spool.read_incoming_file(name) {
                Ok(bytes) => bytes,
                Err(spool::SpoolError::Io { source: e, .. })
                    if e.kind() == std::io::ErrorKind::NotFound =>
                {
                    return Ok(None)
                }
                Err(e) => {
                    self.spool
                        .reject_incoming(name, &format!("{source}: cannot read it: {e}"))?;
                    return Ok(None);
                }
            },
            Incoming::Dir => {
                let inner = self.spool.incoming().join(name).join("job.yaml");
                match spool_read_dir_job(&inner) {
                    Ok(bytes) => bytes,
                    Err(reason) => {
                        let to = self
                            .spool
                            .reject_incoming(name, &format!("{source}/: {reason}"))?;
                        note!("rejected {source}/: {reason} (now {})", to.display());
                        return Ok(None);
                    }
                }
            }
        };
        let Some(yaml) = yaml else {
            // A writer still has it open, or the last one's close is not through yet.
            self.rechecks.busy(name, tries, std::time::Instant::now());
            return Ok(None);
        };
        let shown = if kind == Incoming::Dir {
            format!("{source}/job.yaml")
        } else {
            source.clone()
        };
        match self.validate(&shown, &yaml, 0) {
            Ok(adm) => {
                let id = self.next_id;
                let claimed = self.spool.claim(name, &kind, id)?;
                self.next_id += 1;
                Ok(Some((claimed, adm)))
            }
            Err(reason) => {
                let to = self.spool.reject_incoming(name, &reason)?;
                note!("rejected {source}: {reason} (now {})", to.display());
                Ok(None)
            }
        }
    }

    /// Writes each claimed job's files, publishes each job, and starts the round of fsyncs
    /// that makes them durable (see [`AdmissionRound`]); the batch's starts happen while it
    /// runs, and [`Daemon::finish_round`] opens their gates once it is through. With
    /// `early`, a lone submission may be placed and launched before it is staged (see
    /// [`Daemon::place_early`]).
    pub(super) fn stage_and_publish(
        &mut self,
        ready: Vec<(Claimed, Admission)>,
        early: bool,
    ) -> anyhow::Result<()> {
        // One round at a time: the last one's jobs are durable before new IDs are given.
        self.finish_round();
        // The first claim of this batch used the prepared directory, if there was one.
        let prepared = self.premade.take();
        let early = match (early, ready.as_slice()) {
            (true, [(claimed, adm)]) => {
                self.place_early(claimed, adm, prepared == Some(claimed.id))
            }
            _ => None,
        };
        // A job handed over already: its record is journaled before it is staged.
        let journaled_early = match (&early, ready.as_slice()) {
            (Some(e), [(claimed, adm)]) if e.launched.is_some() => {
                self.journal_early(e, adm, claimed.file).then_some(e.id)
            }
            _ => None,
        };
        // A speculation for an ID of this batch that no early launch took: its bash goes,
        // and the log it held is replaced before the job's is written.
        let unused = self
            .speculation
            .as_ref()
            .and_then(|sp| ready.iter().find(|(c, _)| c.id == sp.id));
        if let Some((c, _)) = unused {
            self.speculation = None;
            if let Err(e) = spool::replace_log(&c.dir, "log") {
                note!("job {}: could not replace its log: {e}", c.id);
            }
        }
        let mut staged: Vec<(Claimed, JobInfo, Admission)> = Vec::new();
        let first_id = ready.iter().map(|(c, _)| c.id).min();
        for (claimed, adm) in ready {
            let launched = early
                .as_ref()
                .filter(|e| e.id == claimed.id && e.launched.is_some())
                .map(|e| &e.info);
            match self.stage(&claimed, &adm, launched) {
                Ok(info) => staged.push((claimed, info, adm)),
                Err(_) if !self.unjournal(claimed.id, journaled_early) => {}
                Err(e) if is_out_of_space(&e) => self.defer(&claimed, &e),
                Err(e) => {
                    let reason = format!("{}: could not be admitted: {e}", claimed.source);
                    let _ = self.spool.reject_claimed(&claimed, &reason);
                    note!("{reason}");
                }
            }
        }
        // The highest ID given goes to disk in the same round (not after it: one more fsync
        // on the way to every start).
        let last_id = match staged.iter().map(|(c, _, _)| c.id).max() {
            Some(max) => match self.spool.write_last_id(max) {
                Ok(path) => Some(path),
                Err(e) => {
                    // Nothing of this batch is visible yet: hand every submission back to
                    // incoming/ and try again later.
                    let err = anyhow::Error::from(e);
                    for (claimed, _, _) in &staged {
                        if self.unjournal(claimed.id, journaled_early) {
                            self.defer(claimed, &err);
                        }
                    }
                    staged.clear();
                    None
                }
            },
            None => None,
        };
        if staged.is_empty() {
            if let Some(e) = &early {
                // Its gate closes unopened: its supervisor (if it got the launch) kills the
                // bash still at its first line.
                self.abandon_early(e);
            }
            if early.as_ref().is_some_and(|e| e.launched.is_some()) {
                // Its ID is not given again: the launch, answered later, names it.
            } else if let Some(first) = first_id {
                // Nothing of this batch was published: its IDs were never seen, give them again.
                if self.next_id > first && self.spool.next_id().is_ok_and(|n| n <= first) {
                    self.next_id = first;
                }
            }
            return Ok(());
        }
        let mut ids = BTreeSet::new();
        // The early job once published, and its spec if it was launched already.
        let mut early_published = None;
        for (claimed, info, adm) in staged {
            let id = claimed.id;
            let this_early = early.as_ref().filter(|e| e.id == id);
            if claimed.has_workdir && self.spool.secrets_file(id).exists() {
                // The submitted copy holds the secrets in clear: keep only the redacted one.
                let _ = std::fs::remove_file(claimed.content.join("job.yaml"));
            }
            if let Err(e) = self.spool.publish(&claimed) {
                // Left in staging/ with its info.json: published at the next start.
                note!("job {id}: could not be published: {e}");
                if let Some(e) = this_early {
                    self.abandon_early(e);
                }
                continue;
            }
            ids.insert(id);
            // (An early job's line is in the journal already: its round takes that fsync.)
            if self.journal.is_some() && !claimed.has_workdir && journaled_early != Some(id) {
                self.unjournaled.insert(
                    id,
                    Unjournaled {
                        file: claimed.file,
                        yaml: adm.job_yaml_text(),
                    },
                );
            }
            self.record_admitted(id, info, "");
            let launched = this_early.is_some_and(|e| e.launched.is_some());
            let spec = if launched {
                Some(adm.spec)
            } else {
                if adm.spec.secrets.is_empty() {
                    // `job.yaml` holds exactly the bytes this was parsed from.
                    self.fresh.insert(id, adm.spec, adm.yaml.len());
                }
                None
            };
            if this_early.is_some() {
                // Placed already: started below, or launched already.
                early_published = Some(spec);
                continue;
            }
            self.enqueue(id);
            // A cancel may already be waiting (made between publish and watch).
            self.handle_cancel(id);
        }
        self.start_round(ids, last_id);
        if let (Some(e), Some(spec)) = (early, early_published) {
            let id = e.id;
            match (e.launched, spec) {
                (Some((started, assignments, answered)), Some(spec)) => {
                    // Its lock moved with its directory.
                    let lock_path = self.spool.job_private(id).join("supervisor.lock");
                    if let Some(l) = self.launching.iter_mut().find(|l| l.id == id) {
                        l.lock_path = lock_path;
                    }
                    self.record_start(e.info, &spec, started, assignments, answered);
                    // A cancel made meanwhile: its supervisor is signalled once known.
                    self.handle_cancel(id);
                }
                _ => {
                    self.start(id, e.placement);
                }
            }
        }
        Ok(())
    }

    /// A submission written through the FUSE mount: validated and admitted (or rejected)
    /// at once, and answered, so the writer's `close()` can report the outcome.
    pub(super) fn handle_submission(&mut self, sub: Submission) {
        let source = format!("incoming/{}", sub.name);
        let verdict = match self.validate(&source, &sub.yaml, sub.uid) {
            Err(reason) => {
                if let Err(e) = self.spool.reject_bytes(&sub.name, &sub.yaml, &reason) {
                    note!("{source}: could not record the rejection: {e}");
                }
                note!("rejected {source} (through the mount): {reason}");
                Err(reason)
            }
            Ok(adm) => {
                // IDs are given with no round in flight (see stage_and_publish).
                self.finish_round();
                // Its claim uses the prepared directory, if any, like any other.
                self.premade = None;
                let id = self.next_id;
                match self
                    .spool
                    .claim_bytes(&sub.name, &sub.yaml, sub.uid, sub.gid, id)
                {
                    Err(e) => Err(format!("{source}: could not be admitted: {e}")),
                    Ok(claimed) => {
                        self.next_id += 1;
                        self.admit_claimed_now(claimed, adm)
                    }
                }
            }
        };
        // The writer's close() returns with the job already visible in the mount.
        self.after_batch();
        let _ = sub.reply.send(verdict);
    }

    /// Stages and publishes one claimed submission without deferral: on failure it is
    /// dropped and the writer told why (they still hold their copy).
    pub(super) fn admit_claimed_now(
        &mut self,
        claimed: Claimed,
        adm: Admission,
    ) -> Result<JobId, String> {
        let id = claimed.id;
        let dir = claimed.dir.clone();
        let fail = |d: &mut Daemon, e: String| {
            let _ = std::fs::remove_dir_all(&dir);
            if d.next_id == id + 1 {
                d.next_id = id;
            }
            Err(format!("{}: could not be admitted: {e}", claimed.source))
        };
        let info = match self.stage(&claimed, &adm, None) {
            Ok(info) => info,
            Err(e) => return fail(self, format!("{e:#}")),
        };
        let synced = ["job.yaml", "info.json", "status"]
            .iter()
            .try_for_each(|f| spool::sync_file(&claimed.dir.join(f)))
            .and_then(|_| spool::sync_dir(&claimed.dir))
            .and_then(|_| spool::sync_dir(&self.spool.staging()))
            .and_then(|_| self.spool.record_last_id(id));
        if let Err(e) = synced {
            return fail(self, e.to_string());
        }
        if let Err(e) = self.spool.publish(&claimed) {
            return fail(self, e.to_string());
        }
        let _ = spool::sync_dir(&self.spool.jobs());
        let _ = spool::sync_dir(&self.spool.state_dir(State::Pending));
        self.record_admitted(id, info, " (through the mount)");
        self.enqueue(id);
        Ok(id)
    }

    /// Gives a claimed submission back to `incoming/` (disk full, sync failed) and asks for
    /// a retry: it is admitted when space returns, never rejected for it or lost.
    pub(super) fn defer(&mut self, claimed: &Claimed, why: &anyhow::Error) {
        if let Some(name) = claimed.content.file_name().and_then(|n| n.to_str()) {
            if let Some(orig) = name.strip_prefix(spool::CLAIM_PREFIX) {
                self.deferred.insert(OsString::from(orig));
            }
        }
        match self.spool.unclaim(claimed) {
            Ok(()) => note!(
                "{}: admission deferred ({why:#}); retrying shortly",
                claimed.source
            ),
            Err(e) => note!(
                "{}: admission deferred ({why:#}) but it could not be handed back ({e}); \
                 it stays staged and is admitted at the next start",
                claimed.source
            ),
        }
        self.retry_at = Some(std::time::Instant::now() + RETRY_INTERVAL);
    }

    /// Writes `job.yaml`, `status`, `log`, `info.json` (and secrets, privately) of a
    /// claimed submission inside its staging directory.
    /// `early`: the job was launched already (see [`Daemon::launch_early`]), which made its
    /// `.sky/` and `log`.
    pub(super) fn stage(
        &mut self,
        c: &Claimed,
        adm: &Admission,
        early: Option<&JobInfo>,
    ) -> anyhow::Result<JobInfo> {
        let spec = &adm.spec;
        if early.is_none() {
            spool::make_private_dir(&c.dir)?;
        }
        spool::write_private(&c.dir, "job.yaml", &adm.job_yaml())?;
        if !spec.secrets.is_empty() {
            if let Some(ids) = self.secret_ids.as_mut() {
                ids.insert(c.id);
            }
            self.spool.write_secrets(c.id, &spec.secrets)?;
        }
        spool::write_private(&c.dir, "status", b"PENDING\n")?;
        if early.is_none() {
            // Empty, or (a prepared directory's) empty already; start-up empties the log of
            // a job it stages again.
            spool::open_log(&c.dir, "log")?;
        }
        let info = match early {
            Some(info) => info.clone(),
            None => self.job_info(c, adm),
        };
        if self.am_root && info.uid != 0 {
            // The owner must be able to create `cancel`; nobody else may write here.
            spool::grant_create(&c.dir, info.uid)?;
        }
        // Last: a staging directory with a readable info.json is complete.
        let mut bytes = serde_json::to_vec_pretty(&info)?;
        bytes.push(b'\n');
        spool::write_private(&c.dir, "info.json", &bytes)?;
        Ok(info)
    }

    /// A claimed job's record as admitted (PENDING, submitted now).
    pub(super) fn job_info(&self, c: &Claimed, adm: &Admission) -> JobInfo {
        let spec = &adm.spec;
        let (uid, gid) = match self.root_jobs_as {
            Some(mapped) if c.uid == 0 => mapped,
            _ => (c.uid, c.gid),
        };
        let name = spec.name.clone().unwrap_or_else(|| default_name(&c.source));
        self.new_info(
            c.id,
            (uid, gid),
            name,
            c.source.clone(),
            c.has_workdir,
            spec,
        )
    }

    /// A job's record as admitted (PENDING, submitted now), run as `uid`/`gid`.
    pub(super) fn new_info(
        &self,
        id: JobId,
        (uid, gid): (u32, u32),
        name: String,
        source: String,
        has_workdir: bool,
        spec: &JobSpec,
    ) -> JobInfo {
        let user = self.users.borrow_mut().get(uid, gid).name;
        JobInfo {
            id,
            name,
            user,
            uid,
            gid,
            status: Status::Pending,
            submitted: spool::now_rfc3339(),
            started: None,
            ended: None,
            resources: spec.resources_display(),
            demand: spec.demand(),
            num_nodes: spec.num_nodes,
            source,
            has_workdir,
            placement: vec![],
            exit_codes: vec![],
            reason: None,
        }
    }

    /// Takes a job just published into the records: said in the daemon's log (`how` it
    /// came, after its source), watched, and shown at the next render.
    pub(super) fn record_admitted(&mut self, id: JobId, info: JobInfo, how: &str) {
        note!(
            "job {id} ({}) admitted from {}{how} for {}, needs {}",
            info.name,
            info.source,
            info.user,
            info.resources
        );
        self.jobs.insert(id, info);
        self.touched.insert(id);
        let _ = self.watcher.watch_job(id, &self.spool.job_dir(id));
        self.dirty = true;
    }
}
