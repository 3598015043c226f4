//! Starting ahead: a lone submission's job launched before its admission is durable
//! (held at its gate), and the bash started ahead for the next job ID.

use super::*;

impl Daemon {
    /// Makes the next ID's staging directory ahead, while nothing waits: the next lone
    /// submission's early launch then creates no directory and no log on its way to its
    /// supervisor (see [`spool::Spool::prepare_staging`]).
    pub(super) fn premake(&mut self) {
        let id = self.next_id;
        if self.premade == Some(id)
            || self.premake_failed == Some(id)
            || self.round.is_some()
            || !self.to_admit.is_empty()
            || self.sched.pending_len() > 0
        {
            return;
        }
        match self.spool.prepare_staging(id) {
            Ok(()) => self.premade = Some(id),
            Err(e) => {
                // Only a head start lost: the claim makes what is missing (or says why not).
                note!("could not prepare staging/{id} ahead: {e}");
                self.premake_failed = Some(id);
            }
        }
    }

    /// Starts the next ID's job ahead of its submission, as the user of the last lone
    /// submission: a prestart (see [`Daemon::prestart`]) whose plan is a placeholder and
    /// whose bash, held at its first line, gets the real job's commands with its release
    /// ([`executor::LaunchPlan::speculative`]). Made once the next ID's staging directory
    /// is ready (its `log` is the bash's output), while nothing waits and a default job
    /// would fit now: in the batch that settled a job's end (a script that waits for its
    /// job submits the next one then), or after SPECULATE_AFTER of quiet. That user's next
    /// lone submission, if it gets this ID and can run in it, is confirmed through it
    /// ([`Daemon::launch_early`]) and skips its bash's start-up; anything else kills the
    /// bash at its first line.
    pub(super) fn speculate(&mut self) {
        let Some((uid, gid)) = self.speculation_user() else {
            return;
        };
        let id = self.next_id;
        self.speculated_for = Some(id);
        // One for another ID is stale.
        self.speculation = None;
        if let Err(e) = self.start_speculation(id, uid, gid) {
            note!("could not start a bash ahead for job {id}: {e:#}");
        }
    }

    /// The user (uid, gid) a speculative prestart is to be made for, for the next ID, if
    /// one is (see [`Daemon::speculate`]): the last lone submission's.
    pub(super) fn speculation_user(&self) -> Option<(u32, u32)> {
        let id = self.next_id;
        self.last_lone.filter(|_| {
            self.premade == Some(id)
                && self.max_prestarts > 0
                && self.round.is_none()
                && self.to_admit.is_empty()
                && self.sched.pending_len() == 0
                && self.speculation.as_ref().is_none_or(|sp| sp.id != id)
                && self.speculated_for != Some(id)
        })
    }

    /// The only node, when it is the local machine: what prestarts start on (its index,
    /// name and address).
    pub(super) fn lone_local_node(&self) -> Option<(usize, String, String)> {
        let mut locals = self
            .inventory
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.local);
        match (locals.next(), locals.next()) {
            (Some((index, node)), None) => Some((index, node.name.clone(), node.addr.clone())),
            _ => None,
        }
    }

    pub(super) fn start_speculation(
        &mut self,
        id: JobId,
        uid: u32,
        gid: u32,
    ) -> anyhow::Result<()> {
        let Some((index, name, addr)) = self.lone_local_node() else {
            return Ok(());
        };
        let spec = spec::parse("run: ':'\n", "a job started ahead", &BTreeMap::new())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let Some(grant) = self.sched.fit_now(index, &spec.demand()) else {
            return Ok(());
        };
        let info = self.new_info(id, (uid, gid), String::new(), String::new(), false, &spec);
        let tentative = NodeAssignment {
            rank: 0,
            node: name.clone(),
            ip: addr,
            accelerator: grant.accelerator,
            gpus: vec![],
            gpu_shares: vec![],
            cpus: grant.cpus.to_string(),
        };
        let mut plan = self.plan(&info, &spec, std::slice::from_ref(&tentative))?;
        plan.speculative = true;
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        let dir = self.spool.staging().join(id.to_string());
        let log = spool::open_log(&dir, "log")?;
        let lock_path = dir.join(".sky").join("supervisor.lock");
        let ours = self.send_prestart(id, json, Some(log.into()), lock_path)?;
        self.speculation = Some(Speculation {
            id,
            uid,
            gid,
            prestart: Prestart {
                gate: ours,
                node: name,
                pid: None,
                spec: None,
            },
        });
        Ok(())
    }

    /// A lone submission on a queue where nothing waits: placed at once, before it is
    /// staged, and, if it fits now and its launch opens no path of the job before its gate
    /// opens ([`executor::launchable_unpublished`]), handed to a supervisor right away, its
    /// lock (in `staging/<id>/.sky/`) and its `log` passed as descriptors, so that its
    /// `bash` starts while the daemon stages and publishes it. It waits at its start gate
    /// like any job of a round in flight: the round is made now (for the gate) and its
    /// fsyncs start only after the publication, so the gate never opens on a job that is
    /// not published and durable. `None`: it did not fit now (it is queued as usual once
    /// published).
    pub(super) fn place_early(
        &mut self,
        claimed: &Claimed,
        adm: &Admission,
        prepared: bool,
    ) -> Option<Early> {
        if claimed.has_workdir || self.sched.pending_len() > 0 || self.round.is_some() {
            return None;
        }
        let id = claimed.id;
        let info = self.job_info(claimed, adm);
        self.sched
            .enqueue_at(id, info.demand.clone(), epoch_ms(&info.submitted));
        let mut placed = self.sched.schedule_at(now_ms());
        let mine = placed
            .iter()
            .position(|(j, _)| *j == id)
            .map(|at| placed.remove(at).1);
        for (other, p) in placed {
            self.start(other, p);
        }
        let Some(placement) = mine else {
            self.sched.dequeue(id);
            return None;
        };
        let mut early = Early {
            id,
            info,
            placement,
            launched: None,
        };
        match self.launch_early(claimed, adm, &early, prepared) {
            Ok(launched) => early.launched = launched,
            Err(e) => {
                // Started the usual way once published (where this fails again, the job
                // fails to start with the reason).
                self.round = None;
                note!("job {id}: could not be launched before its publication: {e:#}");
            }
        }
        Some(early)
    }

    /// The hand-over of [`Daemon::place_early`]: the launch record's time and the
    /// placement, and the supervisor's pid if already known; `None` where the launch would
    /// open a path of the job before its gate opens (it is started once published).
    /// `prepared`: its staging directory was made ahead (see [`Daemon::premake`]).
    pub(super) fn launch_early(
        &mut self,
        claimed: &Claimed,
        adm: &Admission,
        early: &Early,
        prepared: bool,
    ) -> anyhow::Result<Option<EarlyLaunch>> {
        let id = early.id;
        let assignments = self.assignments(&early.placement);
        let plan = self.plan(&early.info, &adm.spec, &assignments)?;
        if !executor::launchable_unpublished(&plan) {
            return Ok(None);
        }
        if !prepared {
            spool::make_private_dir(&claimed.dir)?;
        }
        self.last_lone = Some((early.info.uid, early.info.gid));
        // The bash made ahead for this ID, if its user's: else it goes, and so does the log
        // it held (another user's process could have written to it).
        let speculation = match self.speculation.take() {
            // One for another ID is stale.
            Some(sp) if sp.id != id => None,
            Some(sp) if (sp.uid, sp.gid) == (early.info.uid, early.info.gid) => Some(sp),
            Some(_) => {
                spool::replace_log(&claimed.dir, "log")?;
                None
            }
            None => None,
        };
        let log = spool::open_log(&claimed.dir, "log")?;
        let (started, lock_path, lock) = launch_lock(&claimed.dir.join(".sky"), &assignments)?;
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        // The job's round, made now for its gate; its fsyncs are set once it is published.
        self.round = Some(AdmissionRound {
            sync: RoundSync::Unstaged,
            ids: BTreeSet::from([id]),
            gate: None,
            later: Vec::new(),
            prejournal: None,
        });
        let gate = self.gate_for(id).context("making the job's start gate")?;
        if let Some(sp) = speculation {
            if let Some(answered) =
                self.confirm(sp.prestart, id, &assignments, &json, &lock, gate.as_ref())
            {
                note!("job {id}: taken by a bash started ahead for it");
                return Ok(Some((started, assignments, answered)));
            }
        }
        let answered = self
            .hand_off(id, json, lock, gate, Some(log.into()), lock_path)
            .context("handing the job to its supervisor")?;
        Ok(Some((started, assignments, answered)))
    }

    /// An early placed job that could not be staged or published: its round (and so its
    /// gate) is dropped unopened, its resources freed.
    pub(super) fn abandon_early(&mut self, early: &Early) {
        if early.launched.is_some() {
            self.round = None;
        }
        self.sched.release(early.id);
    }
}
