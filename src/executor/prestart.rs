//! Prestarts: a queued job's first phase started ahead, held at its first line until the
//! daemon confirms the job (or kills it unrun).

use super::*;

/// A prestart's confirmation: the real plan, its lock, its start gate if its admission was
/// not durable yet (a speculative prestart's job, launched before its publication), the
/// bash if it can run it, and the job's log if the prestart was given it.
pub(super) type Confirmed = (
    LaunchPlan,
    OwnedFd,
    Option<OwnedFd>,
    Option<PreSpawned>,
    Option<OwnedFd>,
);

/// A prestart: a queued job's first phase, started ahead of its placement so that a freed
/// slot goes to a job whose bash is up already. `text` is the plan the daemon expects the
/// job to get (its node, no GPUs yet). The bash starts now, held at its script's first line
/// ([`GATE_LINE`]) like a gated job's, and this process waits on `gate` (a socket) for the
/// daemon's confirmation: the job's real launch (plan and lock) once it is placed. Without
/// one (the socket closes: the job was cancelled, placed elsewhere, or the daemon is gone)
/// the bash is killed at its first line and `None` comes back. With one, the bash is handed
/// on if the real plan is the one it was started for (see [`PreSpawned::release`]), and
/// killed otherwise (the phase then starts afresh).
pub(super) fn prestart(
    text: &[u8],
    gate: OwnedFd,
    log: Option<OwnedFd>,
) -> Result<Option<Confirmed>, ExecError> {
    let tentative = parse_plan(text)?;
    // A speculative prestart is given the log of the job it is made for (its directory is
    // not published yet): the bash writes there, and so does this process once the job is
    // confirmed.
    let kept = match &log {
        Some(f) => Some(
            f.try_clone()
                .map_err(|e| ExecError::Io("the job's log".into(), e))?,
        ),
        None => None,
    };
    let pre = match PreSpawned::start(&tentative, log) {
        Ok(pre) => pre,
        Err(e) => {
            eprintln!(
                "skyspool supervise: job {}: could not prestart: {e}",
                tentative.job_id
            );
            None
        }
    };
    // One launch, then the end: a small buffer (a plan is a few KiB; more takes more reads).
    let mut confirm = Receiver::with_buffer(gate.as_raw_fd(), 8 * 1024);
    let launch = match confirm.next() {
        Ok(Some(launch)) => launch,
        Ok(None) | Err(_) => {
            if let Some(p) = pre {
                p.abort();
            }
            return Ok(None);
        }
    };
    let plan = parse_plan(&launch.plan)?;
    let lock = launch
        .lock
        .ok_or_else(|| ExecError::Plan("a prestart confirmed without its lock".into()))?;
    let pre = match pre {
        Some(p) if p.fits(&tentative, &plan) => Some(p),
        Some(p) => {
            p.abort();
            None
        }
        None => None,
    };
    Ok(Some((plan, lock, launch.gate, pre, kept.or(launch.log))))
}

/// The first phase of a prestarted job: its bash, waiting at the script's first line for
/// the line of environment its placement adds (see [`GATE_LINE`]).
pub(super) struct PreSpawned {
    pub(super) phase: &'static str,
    pub(super) pid: u32,
    /// The write end of the bash's stdin.
    pub(super) release: OwnedFd,
    /// The environment it was started with.
    pub(super) env: BTreeMap<String, String>,
    /// Made before its job existed (see [`LaunchPlan::speculative`]): the job's commands
    /// come with its release.
    pub(super) speculative: bool,
}

/// The longest `run` a speculative prestart takes (bash reads its release line a byte at a
/// time from the pipe); a longer one starts afresh.
pub(super) const SPECULATIVE_RUN_MAX: usize = 16 * 1024;

impl PreSpawned {
    /// Starts the first phase of a one-node local job, held at its gate line; `None` for a
    /// job that has nothing to run or runs elsewhere. `log`: the job's log, when the job's
    /// directory is not published yet (a speculative prestart's).
    pub(super) fn start(
        plan: &LaunchPlan,
        log: Option<OwnedFd>,
    ) -> Result<Option<PreSpawned>, ExecError> {
        let [node] = plan.nodes.as_slice() else {
            return Ok(None);
        };
        let (phase, body) = match (commands(&plan.setup), commands(&plan.run)) {
            (Some(setup), _) => ("setup", setup),
            (None, Some(run)) => ("run", run),
            (None, None) => return Ok(None),
        };
        if node.ssh.is_some() {
            return Ok(None);
        }
        let (script, text) = phase_script(plan, phase, body, true);
        let inline = inline_script(&text);
        if inline.is_none() {
            spool::write_private(&private_dir(plan), &format!("{phase}.sh"), text.as_bytes())?;
        }
        let (held, release) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ExecError::Io("a pipe for a prestarted job".into(), e.into()))?;
        let log = match log {
            Some(fd) => File::from(fd),
            None => open_log(plan, "log")?,
        };
        let (pid, _) = spawn_rank(
            plan,
            phase,
            &script,
            inline,
            body,
            node,
            Sink::Direct(log),
            Some(held.as_fd()),
        )
        .map_err(|e| ExecError::Io(format!("starting {phase} ahead"), e))?;
        Ok(Some(PreSpawned {
            phase,
            pid,
            release,
            env: rank_env(plan, phase, node),
            speculative: plan.speculative,
        }))
    }

    /// Whether the bash started for `tentative` can run `plan`: the same job, script,
    /// user and working directory on the same single local node (the environment of the
    /// placement, its GPUs, comes through [`PreSpawned::release`]).
    pub(super) fn fits(&self, tentative: &LaunchPlan, plan: &LaunchPlan) -> bool {
        let node = |p: &LaunchPlan| match p.nodes.as_slice() {
            [n] if n.ssh.is_none() => Some(n.name.clone()),
            _ => None,
        };
        let script = match self.speculative {
            // Made for this ID before the job came: any job of its user that has only a
            // `run` (short enough to go down the pipe) can take it.
            true => {
                commands(&plan.setup).is_none()
                    && commands(&plan.run).is_some_and(|r| r.len() <= SPECULATIVE_RUN_MAX)
            }
            false => plan.setup == tentative.setup && plan.run == tentative.run,
        };
        node(plan).is_some()
            && node(plan) == node(tentative)
            && plan.job_id == tentative.job_id
            && script
            && !plan.speculative
            && plan.cwd == tentative.cwd
            && plan.user.uid == tentative.user.uid
            && plan.user.gid == tentative.user.gid
            && plan.user.groups == tentative.user.groups
            && plan.user.switch == tentative.user.switch
    }

    /// Lets the bash run with `env` (the phase's environment under the real plan): the
    /// difference from what it started with goes down its stdin as one line of `export`
    /// and `unset`, which its gate line evaluates. `Err(self)` when a name cannot be set by
    /// the shell (the caller then kills it and starts the phase afresh).
    /// A speculative one also gets the job's commands (`run`), as `_skyspool_run`, which
    /// its script evaluates where the job's commands would be.
    pub(super) fn release(
        self,
        env: &BTreeMap<String, String>,
        run: &str,
    ) -> Result<u32, PreSpawned> {
        let Some(mut line) = env_change(&self.env, env) else {
            return Err(self);
        };
        if self.speculative {
            line.pop();
            line.push_str("_skyspool_run=");
            line.push_str(&ansi_c_quoted(run));
            line.push('\n');
        }
        // A bash that is gone already (it could not start) is reaped with its exit code.
        let _ = write_all_fd(&self.release, line.as_bytes());
        Ok(self.pid)
    }

    /// Kills the bash, still at its first line: nothing of the job ran.
    pub(super) fn abort(self) {
        signal_group(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(self.pid as i32), None);
    }
}

/// One line of shell that turns environment `from` into `to` (`export K=$'…'`, `unset K`),
/// newline-terminated; `None` when a name to change is not a shell identifier.
pub(super) fn env_change(
    from: &BTreeMap<String, String>,
    to: &BTreeMap<String, String>,
) -> Option<String> {
    let ident = |k: &str| {
        let mut c = k.chars();
        c.next()
            .is_some_and(|f| f == '_' || f.is_ascii_alphabetic())
            && c.all(|x| x == '_' || x.is_ascii_alphanumeric())
    };
    let mut line = String::new();
    for (k, v) in to {
        if from.get(k) != Some(v) {
            if !ident(k) {
                return None;
            }
            line.push_str(&format!("export {k}={}; ", ansi_c_quoted(v)));
        }
    }
    for k in from.keys().filter(|k| !to.contains_key(*k)) {
        if !ident(k) {
            return None;
        }
        line.push_str(&format!("unset {k}; "));
    }
    line.push('\n');
    Some(line)
}

/// `text` as one shell word on one line: `$'…'`, with only `\`, `'` and control
/// characters escaped (bash reads a release line a byte at a time: the shorter the better).
/// The values of [`env_change`] and a speculative prestart's `run` are written so.
pub(super) fn ansi_c_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    out.push_str("$'");
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Writes all of `bytes` to `fd`.
pub(super) fn write_all_fd(fd: &OwnedFd, mut bytes: &[u8]) -> nix::Result<()> {
    while !bytes.is_empty() {
        match nix::unistd::write(fd, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
