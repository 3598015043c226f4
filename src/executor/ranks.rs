//! The ranks of one phase: a bash per node, local or over ssh, their environment and
//! output, and stopping them.

use super::*;

/// The environment of one rank in one phase.
pub(super) fn rank_env(
    plan: &LaunchPlan,
    phase: &str,
    node: &NodeLaunch,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    let path = std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.insert("PATH".into(), path);
    for key in ["LANG", "LC_ALL", "TZ"] {
        if let Ok(v) = std::env::var(key) {
            env.insert(key.into(), v);
        }
    }
    env.insert("HOME".into(), plan.user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), plan.user.name.clone());
    env.insert("LOGNAME".into(), plan.user.name.clone());
    env.insert(
        "SHELL".into(),
        plan.user.shell.to_string_lossy().into_owned(),
    );
    env.insert("PYTHONUNBUFFERED".into(), "1".into());
    env.insert("CUDA_DEVICE_ORDER".into(), "PCI_BUS_ID".into());
    env.extend(plan.env.clone());
    env.insert(TAG_VAR.into(), plan.tag.clone());
    if phase == "setup" {
        env.extend(plan.setup_env.clone());
        env.insert("SKYPILOT_SETUP_NODE_RANK".into(), node.rank.to_string());
        // Setup sees no devices at all (SkyPilot), whatever `envs` says.
        env.remove("CUDA_VISIBLE_DEVICES");
    } else {
        env.extend(plan.run_env.clone());
        let devices: Vec<String> = node.gpus.iter().map(|g| g.to_string()).collect();
        env.insert("CUDA_VISIBLE_DEVICES".into(), devices.join(","));
        env.insert("SKYPILOT_NODE_RANK".into(), node.rank.to_string());
        env.insert(
            "SKYPILOT_NUM_GPUS_PER_NODE".into(),
            plan.num_gpus_per_node.to_string(),
        );
    }
    env
}

/// Runs one phase on every node and waits for it (or for a cancel).
pub(super) fn run_phase(
    plan: &LaunchPlan,
    phase: &str,
    body: &str,
    log: &Arc<Mutex<File>>,
    signals: &Signals,
    taken: &mut Taken<'_>,
    pre: &mut Option<PreSpawned>,
) -> Result<PhaseOutcome, ExecError> {
    let dir = private_dir(plan);
    // A prestarted bash (this phase's, the job's first) runs on once it has the
    // environment of the placement; one that cannot take it is killed (still at its first
    // line) and the phase starts afresh.
    let mut started = None;
    if let (Some(p), [node]) = (pre.take(), plan.nodes.as_slice()) {
        match p.phase == phase {
            true => {
                // A speculative prestart's job was launched before its publication: its
                // commands go down only once its gate opens.
                if p.speculative {
                    if let Err(e) = taken.open_now() {
                        p.abort();
                        return Err(e);
                    }
                }
                match p.release(&rank_env(plan, phase, node), body) {
                    Ok(pid) => started = Some(pid),
                    Err(p) => p.abort(),
                }
            }
            false => p.abort(),
        }
    }
    // A job still behind its gate (one local node, its first phase): its bash starts now,
    // and waits at the script's first line, reading stdin (a pipe of ours), until the gate
    // opens. Its start-up (exec, loading, `bash` itself) overlaps the admission's fsyncs.
    let gate = taken.gate();
    let held = match &gate {
        None => None,
        Some(_) => Some(
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(|e| ExecError::Io("a pipe for the job's start gate".into(), e.into()))?,
        ),
    };
    let (script, text) = phase_script(plan, phase, body, held.is_some() || started.is_some());
    // A script that fits in one argument goes to bash as `-c` (with the script's path as
    // `$0`), and the file is written after the start, as the record of what ran: no file
    // to create on the way to the job's first command. A longer one is read from the file.
    // (Written in place, not renamed over: `.sky/` is the daemon's, nobody else writes
    // there.)
    let inline = inline_script(&text);
    if inline.is_none() && started.is_none() {
        spool::write_private(&dir, &format!("{phase}.sh"), text.as_bytes())?;
    }
    let multi = plan.nodes.len() > 1;
    let mut ranks: Vec<RankProc> = Vec::new();
    let mut pumps = Vec::new();
    let mut codes: Vec<Option<i32>> = vec![None; plan.nodes.len()];
    // The main process of each started rank, awaited through SIGCHLD and waitpid below.
    let mut by_pid: BTreeMap<u32, usize> = BTreeMap::new();
    if let Some(pid) = started {
        ranks.push(RankProc {
            pgid: pid,
            remote: None,
        });
        by_pid.insert(pid, 0);
    }
    for (i, node) in plan.nodes.iter().enumerate() {
        if started.is_some() {
            break;
        }
        let sink = if multi {
            Sink::Pipe
        } else {
            let f = log
                .lock()
                .map_err(|_| ExecError::Plan("log lock poisoned".into()))?
                .try_clone()
                .map_err(|e| ExecError::Io("log".into(), e))?;
            Sink::Direct(f)
        };
        let stdin = held.as_ref().map(|(r, _)| r.as_fd());
        match spawn_rank(plan, phase, &script, inline, body, node, sink, stdin) {
            Ok((pid, reader)) => {
                ranks.push(RankProc {
                    pgid: pid,
                    remote: node.ssh.clone().map(|t| (t, remote_dir(plan, node))),
                });
                if let Some(reader) = reader {
                    let per_node = open_log(plan, &format!("log.rank{}", node.rank))?;
                    let prefix = rank_prefix(node, pid);
                    let log = Arc::clone(log);
                    pumps.push(std::thread::spawn(move || {
                        pump(reader, prefix, log, per_node)
                    }));
                }
                by_pid.insert(pid, i);
            }
            Err(e) => {
                if let Ok(mut l) = log.lock() {
                    let _ = writeln!(l, "skyspool: could not start {phase} on {}: {e}", node.name);
                }
                codes[i] = Some(127);
            }
        }
    }
    if let (Some(g), Some((r, w))) = (gate, held) {
        drop(r);
        if !g.open() {
            // Still waiting at their first line: nothing of the job ran.
            for rank in &ranks {
                signal_group(rank.pgid, nix::sys::signal::Signal::SIGKILL);
            }
            for pid in by_pid.keys() {
                let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*pid as i32), None);
            }
            return Err(ExecError::Untaken);
        }
        taken.record()?;
        // The line bash waits for; then end-of-file.
        let _ = nix::unistd::write(&w, b"\n");
        drop(w);
    }
    // The phase's status, written once its processes run (it is this process that writes
    // the final one later, so the order holds; the daemon never writes it after the launch).
    let status = if phase == "setup" {
        Status::SettingUp
    } else {
        Status::Running
    };
    if let Some(text) = inline {
        if let Err(e) = spool::write_private(&dir, &format!("{phase}.sh"), text.as_bytes()) {
            if let Ok(mut l) = log.lock() {
                let _ = writeln!(
                    l,
                    "skyspool: could not keep a copy of the {phase} script: {e}"
                );
            }
        }
    }
    if let Err(e) = Spool::at(&plan.spool).write_status(plan.job_id, status) {
        // Not fatal: the processes run already and must be awaited; the final status is
        // written (in place if need be) at the end.
        if let Ok(mut l) = log.lock() {
            let _ = writeln!(l, "skyspool: could not record status {status}: {e}");
        }
    }
    let mut cancelled = false;
    let mut first_failed: Option<usize> = codes.iter().position(|c| c.is_some());
    let mut kill_deadline: Option<Instant> = None;
    while !by_pid.is_empty() {
        match signals.wait(kill_deadline) {
            Wake::Timeout => {
                stop_ranks(&ranks, phase, true);
                kill_all_descendants(true);
                kill_deadline = Some(Instant::now() + Duration::from_secs(3600));
            }
            Wake::Terminate => {
                // A supervisor takes one job after another: a SIGTERM the daemon sent for an
                // earlier job (a cancel that crossed that job's end) can land in this one.
                // The daemon signals only for a `cancel` file, so that file decides.
                if !cancelled && cancel_pending(&Spool::at(&plan.spool), plan) {
                    cancelled = true;
                    stop_ranks(&ranks, phase, false);
                    kill_deadline =
                        Some(Instant::now() + Duration::from_millis(plan.kill_grace_ms));
                }
            }
            Wake::Child => {
                for (pid, code) in reap_exited() {
                    // Anything else is an orphan of the job, reaped and forgotten.
                    let Some(rank) = by_pid.remove(&pid) else {
                        continue;
                    };
                    if let Some(c) = codes.get_mut(rank) {
                        *c = code;
                    }
                    if code != Some(0) && first_failed.is_none() && !cancelled {
                        first_failed = Some(rank);
                    }
                    // A node that fails stops the others (SkyPilot's multi-node rule).
                    if multi && code != Some(0) && kill_deadline.is_none() {
                        stop_ranks(&ranks, phase, false);
                        kill_deadline =
                            Some(Instant::now() + Duration::from_millis(plan.kill_grace_ms));
                    }
                }
            }
        }
    }
    // The main processes are gone: nothing they left behind may keep running.
    for r in &ranks {
        signal_group(r.pgid, nix::sys::signal::Signal::SIGKILL);
    }
    kill_all_descendants(false);
    for p in pumps {
        let _ = p.join();
    }
    if cancelled {
        Ok(PhaseOutcome::Cancelled(codes))
    } else {
        Ok(PhaseOutcome::Done(codes, first_failed))
    }
}

/// One started rank: its local process group (the bash, or the ssh client of a remote
/// rank) and, for a remote rank, where its processes live.
pub(super) struct RankProc {
    pub(super) pgid: u32,
    pub(super) remote: Option<(SshTarget, String)>,
}

/// Asks every rank to stop (SIGTERM) or forces it (SIGKILL). A remote rank is signalled on
/// its node (its process group there); its local ssh client is left to report the exit,
/// except when forcing.
pub(super) fn stop_ranks(ranks: &[RankProc], phase: &str, force: bool) {
    let (local_sig, name) = if force {
        (nix::sys::signal::Signal::SIGKILL, "KILL")
    } else {
        (nix::sys::signal::Signal::SIGTERM, "TERM")
    };
    let mut remote_signals = Vec::new();
    for r in ranks {
        match &r.remote {
            None => signal_group(r.pgid, local_sig),
            Some((target, dir)) => {
                let cmd = remote::signal_command(dir, phase, name);
                let target = target.clone();
                remote_signals.push(std::thread::spawn(move || {
                    let _ = target.run(&cmd, Duration::from_secs(15));
                }));
            }
        }
    }
    for t in remote_signals {
        let _ = t.join();
    }
    if force {
        for r in ranks.iter().filter(|r| r.remote.is_some()) {
            signal_group(r.pgid, local_sig);
        }
    }
}

pub(super) fn rank_prefix(node: &NodeLaunch, pid: u32) -> String {
    if node.rank == 0 {
        format!("(head, rank=0, pid={pid}) ")
    } else {
        format!(
            "(worker{}, rank={}, pid={pid}, ip={}) ",
            node.rank, node.rank, node.ip
        )
    }
}

/// Copies one rank's output, line by line, into the merged log (prefixed) and its own log.
pub(super) fn pump(reader: File, prefix: String, log: Arc<Mutex<File>>, mut per_node: File) {
    let mut r = BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                if !line.ends_with(b"\n") {
                    line.push(b'\n');
                }
                let _ = per_node.write_all(&line);
                if let Ok(mut l) = log.lock() {
                    let mut out = Vec::with_capacity(prefix.len() + line.len());
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&line);
                    let _ = l.write_all(&out);
                }
            }
        }
    }
}

/// Starts one rank of one phase: a local bash in its own process group (through
/// [`spawn::spawn`], as the job's user), or, for a remote node, an ssh client (in its own
/// process group) running [`remote::rank_wrapper`] there. Returns the pid to await.
#[allow(clippy::too_many_arguments)]
pub(super) fn spawn_rank(
    plan: &LaunchPlan,
    phase: &str,
    script: &Path,
    inline: Option<&str>,
    body: &str,
    node: &NodeLaunch,
    sink: Sink,
    stdin: Option<std::os::fd::BorrowedFd<'_>>,
) -> io::Result<(u32, Option<File>)> {
    if let Some(target) = &node.ssh {
        return spawn_remote_rank(plan, phase, body, node, target, sink)
            .map(|(child, reader)| (child.id(), reader));
    }
    fn cstring(s: impl Into<Vec<u8>>) -> io::Result<CString> {
        CString::new(s).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "a NUL byte in the script or its environment",
            )
        })
    }
    let mut args = vec![
        cstring("/bin/bash")?,
        cstring("--noprofile")?,
        cstring("--norc")?,
    ];
    if let Some(text) = inline {
        args.push(cstring("-c")?);
        args.push(cstring(text)?);
    }
    args.push(cstring(script.as_os_str().as_bytes())?);
    let env = rank_env(plan, phase, node)
        .into_iter()
        .map(|(k, v)| cstring(format!("{k}={v}")))
        .collect::<io::Result<Vec<_>>>()?;
    // Output: the log itself (one node), or a pipe to the prefixing pump.
    let (out, reader): (OwnedFd, Option<File>) = match sink {
        Sink::Direct(f) => (OwnedFd::from(f), None),
        Sink::Pipe => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
            (w, Some(File::from(r)))
        }
    };
    let null = File::open("/dev/null")?;
    let creds = plan.user.switch.then(|| spawn::Credentials {
        uid: plan.user.uid,
        gid: plan.user.gid,
        groups: plan.user.groups.clone(),
    });
    // In a process group of its own, default signal dispositions, nothing blocked; the
    // script's own `cd` (as the job's user) enters the working directory: changing into it
    // here would happen as root, through whatever the owner put there.
    let pid = spawn::spawn(&spawn::Spawn {
        program: c"/bin/bash",
        args: &args,
        env: &env,
        stdio: [
            stdin.map_or(null.as_raw_fd(), |fd| fd.as_raw_fd()),
            out.as_raw_fd(),
            out.as_raw_fd(),
        ],
        cwd: c"/",
        new_group: true,
        user: creds.as_ref(),
    })?;
    // Our copy of the pipe's write end goes, so the reader sees EOF when the rank is done.
    drop(out);
    Ok((pid, reader))
}

/// Puts a rank's process in a process group of its own, with default signal handling and
/// nothing blocked: the supervisor blocks CHLD/TERM/INT/HUP for its `sigtimedwait`, and std
/// does not reset the mask on every spawn path.
pub(super) fn own_group_with_default_signals(cmd: &mut Command) {
    cmd.process_group(0);
    // SAFETY: sigemptyset, pthread_sigmask and signal are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            for sig in [
                libc::SIGTERM,
                libc::SIGINT,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGPIPE,
            ] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
}

/// Output of a rank: the log itself, or a pipe for the prefixing pump.
pub(super) fn attach_output(cmd: &mut Command, sink: Sink) -> io::Result<Option<File>> {
    match sink {
        Sink::Direct(f) => {
            let f2 = f.try_clone()?;
            cmd.stdout(Stdio::from(f));
            cmd.stderr(Stdio::from(f2));
            Ok(None)
        }
        Sink::Pipe => {
            let (r, w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(io::Error::from)?;
            let w2 = w.try_clone()?;
            cmd.stdout(Stdio::from(w));
            cmd.stderr(Stdio::from(w2));
            Ok(Some(File::from(r)))
        }
    }
}

/// A remote rank: the script (with its environment as exports) goes over ssh's stdin into
/// a private directory on the node, where [`remote::rank_wrapper`] runs it.
pub(super) fn spawn_remote_rank(
    plan: &LaunchPlan,
    phase: &str,
    body: &str,
    node: &NodeLaunch,
    target: &SshTarget,
    sink: Sink,
) -> io::Result<(Child, Option<File>)> {
    let dir = remote_dir(plan, node);
    let cd = if plan.workdir.is_some() {
        remote::shell_quote(&format!("{dir}/workdir"))
    } else {
        "\"$HOME\"".to_string()
    };
    let env = rank_env(plan, phase, node);
    let text = script_text(body, &cd, &exports(&env));
    let user = plan.user.switch.then_some(plan.user.name.as_str());
    let mut cmd = target.command(&remote::rank_wrapper(
        &dir, phase, user, &plan.tag, node.rank,
    ));
    cmd.stdin(Stdio::piped());
    let reader = attach_output(&mut cmd, sink)?;
    own_group_with_default_signals(&mut cmd);
    let mut child = cmd.spawn()?;
    drop(cmd);
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes())?;
    }
    Ok((child, reader))
}

/// Copies the job's workdir to every remote node (rsync over the ssh master connection).
pub(super) fn sync_workdirs(plan: &LaunchPlan, log: &Arc<Mutex<File>>) -> Result<(), String> {
    let Some(local) = &plan.workdir else {
        return Ok(());
    };
    for node in &plan.nodes {
        let Some(target) = &node.ssh else { continue };
        let dir = remote_dir(plan, node);
        let mut cmd = target.rsync_to(local, &format!("{dir}/workdir"));
        cmd.arg(format!(
            "--rsync-path={} mkdir -p {}/workdir && rsync",
            remote::private_dir(&dir),
            remote::shell_quote(&dir)
        ));
        cmd.stdin(Stdio::null());
        let out = cmd
            .output()
            .map_err(|e| format!("rsync to {}: {e}", node.name))?;
        if !out.status.success() {
            let msg = format!(
                "copying the workdir to {} failed: {}",
                node.name,
                String::from_utf8_lossy(&out.stderr).trim()
            );
            if let Ok(mut l) = log.lock() {
                let _ = writeln!(l, "skyspool: {msg}");
            }
            return Err(msg);
        }
    }
    Ok(())
}

/// Removes the job's private directories on remote nodes (best effort).
pub(super) fn clean_remote(plan: &LaunchPlan) {
    let threads: Vec<_> = plan
        .nodes
        .iter()
        .filter_map(|n| n.ssh.clone().map(|t| (t, remote_dir(plan, n))))
        .map(|(t, d)| {
            std::thread::spawn(move || {
                let _ = t.run(
                    &format!("rm -rf {}", remote::shell_quote(&d)),
                    Duration::from_secs(15),
                );
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}
