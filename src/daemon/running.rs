//! Running jobs: placement to launch, supervisors watched, results settled, cancels.

use super::*;

impl Daemon {
    /// Starts a placed job: records the launch, moves it to `running/`, spawns its supervisor.
    pub(super) fn start(&mut self, id: JobId, placement: Placement) -> bool {
        let Err(e) = self.try_start(id, &placement) else {
            return true;
        };
        self.fail_start(id, &format!("{e:#}"));
        false
    }

    pub(super) fn try_start(&mut self, id: JobId, placement: &Placement) -> anyhow::Result<()> {
        if let Some(why) = self.undurable.remove(&id) {
            anyhow::bail!("{why}");
        }
        let cached = self
            .fresh
            .take(id)
            .or_else(|| self.prestarts.get_mut(&id).and_then(|p| p.spec.take()));
        let spec = match cached {
            Some(spec) => spec,
            None => self.load_spec(id)?,
        };
        let info = self
            .jobs
            .get(&id)
            .cloned()
            .ok_or(spool::SpoolError::NoSuchJob(id))?;
        let assignments = self.assignments(placement);
        let plan = self.plan(&info, &spec, &assignments)?;
        // `.sky/` was made at admission, before the owner could write in the job directory;
        // never create or follow anything here that the owner could have planted.
        let private = self.spool.job_private(id);
        let meta = std::fs::symlink_metadata(&private).context("the job's .sky directory")?;
        if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
            anyhow::bail!("jobs/{id}/.sky is not the daemon's directory");
        }
        let (started, lock_path, lock) = launch_lock(&private, &assignments)?;
        // The job goes first; the records follow while it starts on another core. From here
        // only the supervisor writes `status`; a daemon that dies before `info.json` says
        // RUNNING finds the placement in the launch record. The launcher's answer (the
        // supervisor's pid) is not awaited: it comes through the event loop (`launched`).
        let json = serde_json::to_vec(&plan).context("encoding the launch plan")?;
        let answered = match self.confirm_prestart(id, &assignments, &json, &lock) {
            Some(answered) => answered,
            None => {
                let gate = self.gate_for(id).context("making the job's start gate")?;
                self.hand_off(id, json, lock, gate, None, lock_path)
                    .context("handing the job to its supervisor")?
            }
        };
        self.record_start(info, &spec, started, assignments, answered);
        Ok(())
    }

    /// Records a job handed to its supervisor: `info.json` (started, placement, and the status
    /// its supervisor writes first: SETTING_UP or RUNNING, which `status` says only once the
    /// supervisor has written it), its link moved to `running/`, the daemon's view; the
    /// supervisor's pid if already known.
    pub(super) fn record_start(
        &mut self,
        mut info: JobInfo,
        spec: &JobSpec,
        started: String,
        assignments: Vec<NodeAssignment>,
        answered: Option<u32>,
    ) {
        let id = info.id;
        self.quiet = Some((std::time::Instant::now() + QUIET_AFTER_START, id));
        info.status = if spec.setup.as_deref().is_some_and(|s| !s.trim().is_empty()) {
            Status::SettingUp
        } else {
            Status::Running
        };
        info.started = Some(started);
        info.placement = assignments;
        // The job runs now whatever happens below: a failure here must not fail the start.
        if let Err(e) = self.spool.write_info(&info) {
            note!("job {id}: could not record its start in info.json: {e}");
        }
        if let Err(e) = self.spool.move_state(id, State::Pending, State::Running) {
            note!("job {id}: could not move it to running/: {e}");
        }
        self.jobs.insert(id, info);
        self.touched.insert(id);
        self.dirty = true;
        if let Some(pid) = answered {
            self.launched(id, pid);
        }
    }

    /// Job `id`'s spec, read from its `job.yaml` and secrets.
    pub(super) fn load_spec(&self, id: JobId) -> anyhow::Result<JobSpec> {
        let dir = self.spool.job_dir(id);
        let yaml = std::fs::read_to_string(dir.join("job.yaml")).context("reading job.yaml")?;
        let secrets = self.spool.read_secrets(id);
        let mut spec = spec::parse(&yaml, &format!("jobs/{id}/job.yaml"), &secrets)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        // Its `job.yaml` holds its secrets redacted: without their file (removed, or lost
        // with a disk) the job would run with `<redacted>` for them.
        let missing: Vec<&str> = spec
            .secrets
            .keys()
            .filter(|k| !secrets.contains_key(*k))
            .map(String::as_str)
            .collect();
        if !missing.is_empty() {
            anyhow::bail!(
                "its secrets file (.skyspool/secrets/{id}.json) is missing or unreadable, so \
                 {} would be `{}`: not run; submit the job again",
                missing.join(", "),
                spec::REDACTED
            );
        }
        spec.secrets.extend(secrets);
        Ok(spec)
    }

    pub(super) fn assignments(&self, placement: &Placement) -> Vec<NodeAssignment> {
        placement
            .nodes
            .iter()
            .enumerate()
            .map(|(rank, g)| {
                let node = self.inventory.nodes.get(g.node);
                NodeAssignment {
                    rank: rank as u32,
                    node: node.map(|n| n.name.clone()).unwrap_or_default(),
                    ip: node.map(|n| n.addr.clone()).unwrap_or_default(),
                    accelerator: g.accelerator.clone(),
                    gpus: g.gpus.iter().map(|x| x.index).collect(),
                    gpu_shares: g.gpus.iter().map(|x| x.share.to_string()).collect(),
                    cpus: g.cpus.to_string(),
                }
            })
            .collect()
    }

    /// Builds the supervisor's plan: user, cwd, and SkyPilot's environment.
    pub(super) fn plan(
        &self,
        info: &JobInfo,
        spec: &JobSpec,
        nodes: &[NodeAssignment],
    ) -> anyhow::Result<LaunchPlan> {
        let user = self.users.borrow_mut().get(info.uid, info.gid);
        let mut notes = Vec::new();
        let job_dir = self.spool.job_dir(info.id);
        let cwd = if info.has_workdir {
            job_dir.join("workdir")
        } else {
            match spec.workdir.as_deref() {
                Some(w) => {
                    let expanded = if let Some(rest) = w.strip_prefix("~/") {
                        user.home.join(rest)
                    } else if w == "~" {
                        user.home.clone()
                    } else {
                        PathBuf::from(w)
                    };
                    if expanded.is_absolute() && expanded.is_dir() {
                        expanded
                    } else {
                        notes.push(format!(
                            "skyspool: workdir '{w}' was not submitted with the job; running in {} \
                             (submit a directory holding job.yaml and the files, or use `skyspool submit`)",
                            user.home.display()
                        ));
                        user.home.clone()
                    }
                }
                None => user.home.clone(),
            }
        };
        let cluster = &self.inventory.cluster_name;
        let task_id = task_id(info, cluster);
        let cluster_info = serde_json::json!({
            "cluster_name": cluster,
            "cloud": "Local",
            "region": null,
            "zone": null,
        });
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.extend(spec.envs.clone());
        env.extend(spec.secrets.clone());
        env.insert("SKYPILOT_TASK_ID".into(), task_id);
        env.insert("SKYPILOT_CLUSTER_INFO".into(), cluster_info.to_string());
        env.insert("SKYPILOT_USER".into(), info.user.clone());
        env.insert("SKYPILOT_NUM_NODES".into(), nodes.len().to_string());
        let gpus_per_node =
            per_node_gpus(spec, nodes.first().and_then(|n| n.accelerator.as_deref()));
        let mut setup_env = BTreeMap::new();
        let all_ips: Vec<String> = self
            .inventory
            .nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect();
        setup_env.insert("SKYPILOT_SETUP_NODE_IPS".into(), all_ips.join("\n"));
        setup_env.insert(
            "SKYPILOT_SETUP_NUM_GPUS_PER_NODE".into(),
            gpus_per_node.to_string(),
        );
        let mut run_env = BTreeMap::new();
        let job_ips: Vec<String> = nodes.iter().map(|n| n.ip.clone()).collect();
        run_env.insert("SKYPILOT_NODE_IPS".into(), job_ips.join("\n"));
        let launches = nodes
            .iter()
            .map(|a| {
                let node = self.inventory.nodes.iter().find(|n| n.name == a.node);
                NodeLaunch {
                    rank: a.rank,
                    name: a.node.clone(),
                    ip: a.ip.clone(),
                    local: node.map(|n| n.local).unwrap_or(true),
                    gpus: a.gpus.clone(),
                    ssh: node.and_then(|n| SshTarget::of(n, &self.ssh_dir())),
                }
            })
            .collect();
        Ok(LaunchPlan {
            job_id: info.id,
            spool: self.spool.root().to_path_buf(),
            tag: executor::job_tag(&self.spool_id, info.id),
            user,
            setup: spec.setup.clone(),
            run: spec.run.clone(),
            cwd,
            workdir: info.has_workdir.then(|| job_dir.join("workdir")),
            notes,
            env,
            setup_env,
            run_env,
            nodes: launches,
            num_gpus_per_node: gpus_per_node,
            kill_grace_ms: self.kill_grace.as_millis() as u64,
            journaling_daemon: self.journal.as_ref().and(self.me),
            speculative: false,
        })
    }

    /// Watches a supervisor's pidfd; its exit comes back as a message. The daemon keeps a
    /// duplicate of the pidfd to signal it, so a recycled pid can never be hit.
    pub(super) fn watch_supervisor(&mut self, id: JobId, pid: u32) {
        let tx = self.tx.clone();
        let fd = executor::pidfd_open(pid);
        let kept = fd.as_ref().ok().and_then(|f| f.try_clone().ok());
        let watch = match fd {
            Ok(fd) => Some(
                tokio::spawn(async move {
                    // SAFETY: `fd` is an OwnedFd moved into the AsyncFd; it stays open until dropped.
                    if let Ok(afd) = unsafe { tokio::io::unix::AsyncFd::register(fd) } {
                        let _ = afd.readable().await;
                    }
                    let _ = tx.send(Msg::SupervisorExited(id, pid));
                })
                .abort_handle(),
            ),
            Err(_) => {
                // Already gone.
                let _ = tx.send(Msg::SupervisorExited(id, pid));
                None
            }
        };
        self.supervisors.insert(
            id,
            Supervisor {
                pid,
                pidfd: kept,
                watch,
            },
        );
    }

    /// Settles a job that was running: final status, record, `done/`, resources freed.
    pub(super) fn finish(&mut self, id: JobId, result: Option<JobResult>) {
        self.prestarts.remove(&id);
        self.fresh.take(id);
        let pid = self.supervisors.remove(&id).map(|s| s.pid);
        self.untaken.remove(&id);
        // A supervisor that could not record its result (disk full) still rewrote `status`
        // in place: trust a final word there.
        let result = result.or_else(|| {
            let status = self.spool.read_status(id).ok().filter(|s| s.is_terminal())?;
            Some(JobResult {
                status,
                exit_codes: vec![],
                ended: spool::now_rfc3339(),
                reason: Some(
                    "the supervisor could not record its result (disk full?); status as it last wrote it"
                        .into(),
                ),
            })
        });
        let result = result.unwrap_or_else(|| {
            driver_lost(format!(
                "the job's supervisor{} exited without recording a result",
                pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ))
        });
        if result.status == Status::FailedDriver {
            // The supervisor is gone: stop whatever of the job still runs before its GPUs
            // are given to anyone else.
            if let Some(info) = self.jobs.get(&id) {
                let tag = executor::job_tag(&self.spool_id, id);
                let killed = executor::kill_tagged_processes(&tag);
                if killed > 0 {
                    note!("job {id}: killed {killed} process(es) left by its lost supervisor");
                }
                let ssh_dir = self.ssh_dir();
                for a in &info.placement {
                    if let Some(node) = self.inventory.nodes.iter().find(|n| n.name == a.node) {
                        if let Some(t) = SshTarget::of(node, &ssh_dir) {
                            executor::kill_remote_rank(&t, &tag, a.rank);
                        }
                    }
                }
            }
            let _ = self.spool.append_log(
                id,
                &format!(
                    "skyspool: FAILED_DRIVER: {}",
                    result.reason.as_deref().unwrap_or("driver lost")
                ),
            );
        }
        self.touched.insert(id);
        if let Some(info) = self.jobs.get_mut(&id) {
            info.status = result.status;
            info.ended = Some(result.ended.clone());
            info.exit_codes = result.exit_codes.clone();
            info.reason = result.reason.clone();
        }
        self.sched.release(id);
        self.dirty = true;
        note!("job {id} ended {}", result.status);
        // Its records are written after this batch's starts: a freed slot is given to the
        // next job first. (A daemon killed in between finds the supervisor's result and
        // settles the job again at start-up.)
        self.settling.push(id);
    }

    /// Writes the records of the jobs that ended ([`Daemon::finish`], or cancelled while
    /// pending): final `status` (where the supervisor did not), `info.json`, the link moved
    /// to `done/`; then their final records go to the journal, in one write, whose fsync
    /// starts a few milliseconds later (or goes with the next round's): a power cut after
    /// it cannot make a finished job run again (see [`crate::journal`]).
    pub(super) fn settle_records(&mut self) {
        let settled = std::mem::take(&mut self.settling);
        if !settled.is_empty() {
            // A slot may be free now for a bash started ahead.
            self.speculated_for = None;
            self.settled_end = true;
        }
        for &id in &settled {
            let Some(info) = self.jobs.get(&id) else {
                continue;
            };
            let on_disk = self
                .final_seen
                .remove(&id)
                .or_else(|| self.spool.read_status(id).ok());
            if on_disk != Some(info.status) {
                let _ = self.spool.write_status(id, info.status);
            }
            let _ = self.spool.write_info(info);
            self.spool.trim_spares(id);
            let _ = self.spool.move_to_done(id);
            self.watcher.unwatch_job(id);
            if self.secret_ids.as_mut().is_none_or(|ids| ids.remove(&id)) {
                self.spool.remove_secrets(id);
            }
        }
        let Some(journal) = self.journal.as_mut() else {
            return;
        };
        let ends: Vec<&JobInfo> = settled.iter().filter_map(|id| self.jobs.get(id)).collect();
        if ends.is_empty() {
            return;
        }
        match journal.append_ends(&ends) {
            Ok(path) => self.lazy_sync(&[(path, false)]),
            Err(e) => note!("journal: cannot record the end of jobs {settled:?}: {e}"),
        }
    }

    /// Acts on `jobs/<id>/cancel` if present: the owner's (or root's) request cancels the
    /// job; anyone else's is removed and recorded in the job's log.
    pub(super) fn handle_cancel(&mut self, id: JobId) {
        let Some(meta) = self.spool.cancel_requested(id) else {
            return;
        };
        let Some(info) = self.jobs.get(&id) else {
            return;
        };
        if info.status.is_terminal() {
            return;
        }
        let by = meta.uid();
        if by != info.uid && by != 0 && by != nix::unistd::geteuid().as_raw() {
            self.spool.clear_cancel(id);
            let _ = self.spool.append_log(
                id,
                &format!(
                    "skyspool: refused a cancel request from uid {by}: only the job's owner ({}) or root may cancel it",
                    info.user
                ),
            );
            note!("job {id}: refused cancel from uid {by}");
            return;
        }
        if self.sched.dequeue(id) {
            let _ = self
                .spool
                .append_log(id, "skyspool: cancelled before it started");
            self.finish_pending_cancel(id);
        } else if let Some(sup) = self.supervisors.get(&id) {
            note!("job {id}: cancelling (SIGTERM to supervisor {})", sup.pid);
            sup.terminate();
        }
    }

    pub(super) fn finish_pending_cancel(&mut self, id: JobId) {
        self.prestarts.remove(&id);
        self.touched.insert(id);
        if let Some(info) = self.jobs.get_mut(&id) {
            info.status = Status::Cancelled;
            info.ended = Some(spool::now_rfc3339());
            info.reason = Some("cancelled while pending".into());
        }
        self.dirty = true;
        note!("job {id} cancelled while pending");
        // `status`, `info.json` and the move to `done/` are written like any ended job's.
        self.settling.push(id);
    }
}
