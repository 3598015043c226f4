//! The launcher (`skyspool supervise`): one process that forks supervisors and hands each
//! job to a free one; the daemon's side of it ([`Launcher`], [`send_launch`]).

use super::*;

/// Entry point of `skyspool supervise`: the daemon's *launcher*. One such process, started
/// by the daemon and kept for its lifetime, waits on its stdin (a Unix socket) for jobs:
/// each comes as the launch lock (`SCM_RIGHTS`) and a length-prefixed plan. It hands each
/// to a free supervisor, or forks a new one, and answers with that supervisor's pid.
///
/// Supervisors are kept: one that has finished a job (its final `status` written) says so
/// on its socket and takes the next job it is given, so a busy queue pays a fork, its
/// copy-on-write faults and an exit per supervisor, not per job. At most
/// [`MAX_FREE_SUPERVISORS`] wait; more are let go. End-of-file on stdin means the daemon is
/// gone or no longer needs the launcher: it exits, the free supervisors see their socket
/// close and exit too, and running ones finish their job (in sessions of their own) first.
pub fn supervise_main() -> Result<(), ExecError> {
    // Children are never waited for here: the kernel reaps them (the daemon watches each
    // through a pidfd, which does not need a parent's wait).
    // SAFETY: setting a signal disposition.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let mut launches = Receiver::new(0);
    let mut sups: Vec<Forked> = Vec::new();
    loop {
        let mut fds: Vec<libc::pollfd> = std::iter::once(0)
            .chain(sups.iter().map(|s| s.sock.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(ExecError::Io("waiting for launches".into(), e));
        }
        // Supervisors first: one that said it is free must count for the launch its final
        // `status` made possible.
        for i in (0..sups.len()).rev() {
            if fds[i + 1].revents != 0 && !sups[i].heard() {
                sups.swap_remove(i);
            }
        }
        let mut free = 0;
        sups.retain(|s| {
            free += usize::from(s.free);
            !s.free || free <= MAX_FREE_SUPERVISORS
        });
        if fds[0].revents == 0 {
            continue;
        }
        // One launch, then those the same read brought along, before waiting again (poll
        // would not report bytes already taken off the socket).
        loop {
            let Some(job) = launches.next()? else {
                return Ok(());
            };
            let pid = launch(&mut sups, job, &mut launches);
            reply_pid(pid)?;
            if !launches.has_whole_launch() {
                break;
            }
        }
    }
}

/// How many supervisors with no job the launcher keeps for the next ones.
pub(super) const MAX_FREE_SUPERVISORS: usize = 8;

/// A supervisor the launcher forked, and the launcher's end of their socket.
pub(super) struct Forked {
    pub(super) pid: u32,
    pub(super) sock: std::os::unix::net::UnixStream,
    /// It said it has finished its job and waits for the next.
    pub(super) free: bool,
}

impl Forked {
    /// Reads what the supervisor said (one byte per finished job); false when it is gone.
    pub(super) fn heard(&mut self) -> bool {
        let mut b = [0u8; 16];
        loop {
            match nix::unistd::read(&self.sock, &mut b) {
                Ok(0) => return false,
                Ok(_) => {
                    self.free = true;
                    return true;
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return false,
            }
        }
    }
}

/// Gives one launch to a free supervisor, or to a new one forked for it. Returns its pid
/// (0: none could be made).
pub(super) fn launch(sups: &mut Vec<Forked>, job: Launch, launches: &mut Receiver) -> u32 {
    while let Some(i) = sups.iter().rposition(|s| s.free) {
        if send_launch(
            &sups[i].sock,
            &job.plan,
            job.lock.as_ref(),
            job.gate.as_ref(),
            job.log.as_ref(),
        )
        .is_ok()
        {
            sups[i].free = false;
            return sups[i].pid;
        }
        // Gone since it said it was free: the next one, or a fork.
        sups.swap_remove(i);
    }
    let (ours, theirs) = match std::os::unix::net::UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skyspool supervise: socketpair: {e}");
            return 0;
        }
    };
    // SAFETY: this process is single-threaded (no thread is ever started before a fork),
    // so the child may run anything.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            // The other supervisors' sockets are not this one's business; holding them
            // would hide their end from the launcher. Nor are the locks of launches that
            // came in the same read: holding one would keep that job's lock held.
            drop(std::mem::take(sups));
            drop(std::mem::take(&mut launches.locks));
            drop(ours);
            let code = supervisor_main(job, theirs);
            std::process::exit(code);
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            sups.push(Forked {
                pid: child.as_raw() as u32,
                sock: ours,
                free: false,
            });
            child.as_raw() as u32
        }
        Err(e) => {
            eprintln!("skyspool supervise: fork: {e}");
            0
        }
    }
}

/// One launch as the launcher and a supervisor receive it: the plan (`serde_json` of a
/// [`LaunchPlan`]), the launch lock, and the job's start gate when it has one.
pub struct Launch {
    pub plan: Vec<u8>,
    /// The launch lock; `None` for a prestart (the lock comes with its confirmation).
    pub lock: Option<OwnedFd>,
    /// With a lock: the read end of a pipe the daemon writes one byte into once the job's
    /// admission is durable, or closes without writing when it cannot be (or when the
    /// daemon dies first). A supervisor given a gate starts nothing of the job and records
    /// nothing before the byte is there: without it, it lets the job go untaken (see
    /// [`Gate::open`]). Without a lock (a prestart): a Unix socket the job's real launch
    /// comes on (see [`prestart`]).
    pub gate: Option<OwnedFd>,
    /// The job's `log`, opened for appending by the daemon, when the job is launched before
    /// it is published (its directory is still in `staging/`, see the daemon's early
    /// launch); otherwise the supervisor opens `jobs/<id>/log` itself.
    pub log: Option<OwnedFd>,
}

/// The bit of a launch's length word that says a gate travels with its lock.
pub(super) const GATED: u64 = 1 << 63;

/// The bit of a launch's length word that says no lock travels with it: a prestart (see
/// [`prestart`]), whose gate is a socket the confirmation comes on.
pub(super) const UNLOCKED: u64 = 1 << 62;

/// The bit of a launch's length word that says the job's log travels with it (after the
/// lock and the gate).
pub(super) const LOGGED: u64 = 1 << 61;

/// Sends one launch on `sock`: the lock (if any), the gate (if any) and the log (if any) as
/// `SCM_RIGHTS` with the first bytes, the plan's length (8 bytes, little-endian; [`GATED`]
/// set when a gate comes, [`UNLOCKED`] when no lock does, [`LOGGED`] when the log does),
/// then the plan.
pub fn send_launch(
    sock: &std::os::unix::net::UnixStream,
    plan: &[u8],
    lock: Option<&OwnedFd>,
    gate: Option<&OwnedFd>,
    log: Option<&OwnedFd>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let mut bytes = Vec::with_capacity(8 + plan.len());
    let flag = if gate.is_some() { GATED } else { 0 }
        | if lock.is_none() { UNLOCKED } else { 0 }
        | if log.is_some() { LOGGED } else { 0 };
    bytes.extend_from_slice(&(plan.len() as u64 | flag).to_le_bytes());
    bytes.extend_from_slice(plan);
    let fds: Vec<_> = lock
        .iter()
        .chain(gate.iter())
        .chain(log.iter())
        .map(|f| f.as_raw_fd())
        .collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = loop {
        match sendmsg::<()>(
            sock.as_raw_fd(),
            &[io::IoSlice::new(&bytes)],
            &cmsg,
            MsgFlags::MSG_NOSIGNAL,
            None,
        ) {
            Ok(n) => break n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut rest = &bytes[sent..];
    while !rest.is_empty() {
        match nix::sys::socket::send(sock.as_raw_fd(), rest, MsgFlags::MSG_NOSIGNAL) {
            Ok(n) => rest = &rest[n..],
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// A supervisor's life: set up once, then one job after another, each given by the
/// launcher on `sock`, until the launcher is gone or a job could not be finished cleanly.
pub(super) fn supervisor_main(job: Launch, sock: std::os::unix::net::UnixStream) -> i32 {
    // SAFETY: restoring the default disposition; we wait for our own children.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    // The daemon's socket (stdin) and the launcher's answers (stdout) are not the jobs'
    // business, and a supervisor holding the answers' pipe would hide the launcher's exit
    // from the daemon.
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: dup2 onto fds 0 and 1.
        unsafe {
            libc::dup2(null.as_raw_fd(), 0);
            libc::dup2(null.as_raw_fd(), 1);
        }
    }
    // Own session: a terminal's ^C or hang-up aimed at the daemon never reaches the job.
    let _ = nix::unistd::setsid();
    // Orphans of the job are re-parented to us, so nothing escapes a cancel.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let signals = Signals::block();
    let me = std::process::id();
    let record = SupervisorRecord {
        pid: me,
        start_ticks: process_start_ticks(me).unwrap_or(0),
    };
    // The same line in the lock of every job this supervisor takes.
    let record = match serde_json::to_vec(&record) {
        Ok(mut line) => {
            line.push(b'\n');
            line
        }
        Err(e) => {
            eprintln!("skyspool supervise: {e}");
            return 1;
        }
    };
    let finalizer = Finalizer::start();
    let mut launches = Receiver::new(sock.as_raw_fd());
    let code = serve_jobs(job, &sock, &mut launches, &signals, &record, &finalizer);
    // The last job's result is durable and its lock free before this process ends.
    finalizer.finish();
    code
}

/// The supervisor's loop: one job after another until the launcher is gone (0) or a job
/// could not be finished cleanly (1).
pub(super) fn serve_jobs(
    first: Launch,
    sock: &std::os::unix::net::UnixStream,
    launches: &mut Receiver,
    signals: &Signals,
    record: &[u8],
    finalizer: &Finalizer,
) -> i32 {
    let mut job = first;
    loop {
        // A SIGTERM still pending was meant for the last job (a cancel racing with its
        // end). One meant for this job comes with its `cancel` file, which is looked at
        // before anything runs.
        signals.drain();
        let Launch {
            plan,
            lock,
            gate,
            log,
        } = job;
        // Said once the final `status` is written: the launcher may hand over the next job
        // while this one's result is made durable.
        let free = || {
            nix::sys::socket::send(
                sock.as_raw_fd(),
                &[1],
                nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
            )
            .is_ok()
        };
        // Whether the launcher still runs (its end of our socket is open): a daemon that
        // stops closes it, and waits for it to exit, before its last checkpoint.
        let launcher_alive = || {
            let mut fd = [libc::pollfd {
                fd: sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: one valid pollfd, no waiting.
            let n = unsafe { libc::poll(fd.as_mut_ptr(), 1, 0) };
            n >= 0 && fd[0].revents & (libc::POLLHUP | libc::POLLERR) == 0
        };
        match supervise_job(
            &plan,
            lock,
            gate,
            log,
            signals,
            record,
            &free,
            &launcher_alive,
            finalizer,
        ) {
            Ok(true) => {}
            Ok(false) => return 0,
            Err(e) => {
                eprintln!("skyspool supervise: {e}");
                return 1;
            }
        }
        job = match launches.next() {
            Ok(Some(next)) => next,
            Ok(None) => return 0,
            Err(e) => {
                eprintln!("skyspool supervise: {e}");
                return 1;
            }
        };
    }
}

/// Tells the daemon the pid of the supervisor that got its launch (0: none), on stdout (a
/// pipe the daemon reads as answers come, in the order of the launches).
pub(super) fn reply_pid(pid: u32) -> Result<(), ExecError> {
    let bytes = pid.to_le_bytes();
    let stdout = io::stdout();
    let mut done = 0;
    while done < bytes.len() {
        match nix::unistd::write(std::os::fd::AsFd::as_fd(&stdout), &bytes[done..]) {
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ExecError::Io("answering the daemon".into(), e.into())),
        }
    }
    Ok(())
}

/// The receiving end of launches on a Unix stream socket. A launch is the plan's length
/// (8 bytes, little-endian, [`GATED`] set when a gate comes, [`UNLOCKED`] when no lock
/// does) and the plan, with the launch lock and the gate, those that come, as `SCM_RIGHTS`
/// on its first bytes. The daemon does not wait for one
/// launch to be answered before it sends the next, so one `recvmsg` can return the end of
/// one launch and the start of the next: bytes and descriptors are kept, in order, until a
/// whole launch is there (each launch takes the next one or two descriptors).
pub(super) struct Receiver {
    pub(super) fd: std::os::fd::RawFd,
    pub(super) data: Vec<u8>,
    pub(super) locks: std::collections::VecDeque<OwnedFd>,
    /// One receive buffer for the receiver's lifetime (in the launcher, a fresh zeroed one
    /// per launch would write 16 pages, each a copy-on-write fault while the last forked
    /// supervisor shares them).
    pub(super) buf: Vec<u8>,
}

impl Receiver {
    pub(super) fn new(fd: std::os::fd::RawFd) -> Receiver {
        Receiver::with_buffer(fd, 64 * 1024)
    }

    pub(super) fn with_buffer(fd: std::os::fd::RawFd, size: usize) -> Receiver {
        Receiver {
            fd,
            data: Vec::new(),
            locks: std::collections::VecDeque::new(),
            buf: vec![0u8; size],
        }
    }

    /// Where the first launch in `data` ends, once all of it is there, whether a lock
    /// comes with it, whether a gate does, and whether the log does.
    pub(super) fn whole(&self) -> Result<Option<(usize, bool, bool, bool)>, ExecError> {
        let Some(head) = self.data.get(..8) else {
            return Ok(None);
        };
        let mut len = [0u8; 8];
        len.copy_from_slice(head);
        let word = u64::from_le_bytes(len);
        let end = usize::try_from(word & !(GATED | UNLOCKED | LOGGED))
            .ok()
            .and_then(|l| l.checked_add(8))
            .ok_or_else(|| ExecError::Plan("a launch of impossible length".into()))?;
        Ok((self.data.len() >= end).then_some((
            end,
            word & UNLOCKED == 0,
            word & GATED != 0,
            word & LOGGED != 0,
        )))
    }

    /// Whether a whole launch (bytes and descriptors) is already here, with no read needed.
    pub(super) fn has_whole_launch(&self) -> bool {
        match self.whole() {
            Ok(Some((_, locked, gated, logged))) => {
                self.locks.len() >= usize::from(locked) + usize::from(gated) + usize::from(logged)
            }
            _ => false,
        }
    }

    /// The next whole launch; `None` when the socket closes between launches.
    pub(super) fn next(&mut self) -> Result<Option<Launch>, ExecError> {
        use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
        use std::io::IoSliceMut;
        loop {
            if let Some((end, locked, gated, logged)) = self.whole()? {
                let lock = match locked {
                    false => None,
                    true => Some(self.locks.pop_front().ok_or_else(|| {
                        ExecError::Plan("no launch lock came with the plan".into())
                    })?),
                };
                let gate = match gated {
                    false => None,
                    true => Some(self.locks.pop_front().ok_or_else(|| {
                        ExecError::Plan("no start gate came with a gated plan".into())
                    })?),
                };
                let log = match logged {
                    false => None,
                    true => Some(self.locks.pop_front().ok_or_else(|| {
                        ExecError::Plan("no log came with a plan that said it would".into())
                    })?),
                };
                let rest = self.data.split_off(end);
                let mut plan = std::mem::replace(&mut self.data, rest);
                plan.drain(..8);
                return Ok(Some(Launch {
                    plan,
                    lock,
                    gate,
                    log,
                }));
            }
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 8]);
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut self.buf)];
                let msg = match recvmsg::<()>(
                    self.fd,
                    &mut iov,
                    Some(&mut cmsg),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                ) {
                    Ok(m) => m,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        return Err(ExecError::Io("receiving a launch".into(), e.into()));
                    }
                };
                let mut fds = Vec::new();
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(r) = c {
                            fds.extend(r);
                        }
                    }
                }
                (msg.bytes, fds)
            };
            for fd in fds {
                // SAFETY: the kernel just installed this descriptor for us.
                self.locks.push_back(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            if n == 0 {
                if self.data.is_empty() && self.locks.is_empty() {
                    return Ok(None);
                }
                return Err(ExecError::Plan(
                    "the daemon hung up in the middle of a launch".into(),
                ));
            }
            self.data.extend_from_slice(&self.buf[..n]);
        }
    }
}

/// The daemon's end of its launcher (see [`supervise_main`]). Dropping it closes the
/// socket: the launcher exits (running supervisors stay).
pub struct Launcher {
    pub pid: u32,
    pub(super) sock: std::os::unix::net::UnixStream,
    /// The read end of the launcher's answers (its stdout, non-blocking): one supervisor
    /// pid (4 bytes, little-endian; 0 when none could be made) per launch, in order.
    pub(super) answers: Option<OwnedFd>,
}

/// Starts the launcher (`skyspool supervise`, stdin a Unix socket, stderr the daemon's
/// log). TERM/INT/HUP are blocked before exec: every supervisor it forks inherits the mask,
/// so a cancel sent while a supervisor is still starting stays pending until its
/// `sigtimedwait` takes it.
pub fn spawn_launcher(exe: &Path, spool: &Path) -> io::Result<Launcher> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let (answers, answers_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    // Only the read end is non-blocking (the flag is per end of a pipe).
    nix::fcntl::fcntl(
        &answers_w,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )?;
    let mut cmd = Command::new(exe);
    cmd.arg("supervise");
    cmd.stdin(Stdio::from(OwnedFd::from(theirs)));
    cmd.stdout(Stdio::from(answers_w));
    match open_daemon_log(spool) {
        Some(f) => cmd.stderr(Stdio::from(f)),
        None => cmd.stderr(Stdio::null()),
    };
    // SAFETY: sigemptyset, sigaddset and pthread_sigmask are async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    let pid = child.id();
    // Reaped by the daemon when it replaces a launcher; forget the handle.
    std::mem::forget(child);
    ours.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(Launcher {
        pid,
        sock: ours,
        answers: Some(answers),
    })
}

impl Launcher {
    /// Hands a job over: the launch lock travels as `SCM_RIGHTS` with the plan's length,
    /// then the plan (`serde_json` of a [`LaunchPlan`]). The launcher answers on
    /// [`Launcher::take_answers`] with the pid of the job's supervisor; the daemon does not
    /// wait for it here.
    pub fn send(
        &mut self,
        plan: &[u8],
        lock: Option<&OwnedFd>,
        gate: Option<&OwnedFd>,
        log: Option<&OwnedFd>,
    ) -> io::Result<()> {
        send_launch(&self.sock, plan, lock, gate, log)
    }

    /// The launcher's answers, for the daemon's event loop (once).
    pub fn take_answers(&mut self) -> Option<OwnedFd> {
        self.answers.take()
    }
}

pub(super) fn open_daemon_log(spool: &Path) -> Option<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(0o600)
        .open(spool.join(".skyspool").join("daemon.log"))
        .ok()
}
