//! Starts a job's process without copying its supervisor: `clone(CLONE_VM | CLONE_VFORK)`,
//! the way `posix_spawn` does, plus what `posix_spawn` cannot do (the user switch).
//!
//! A `fork` copies the supervisor's page tables, and every page the supervisor writes
//! afterwards takes a copy-on-write fault; the child then throws it all away at `exec`. That
//! was a fifth of a supervisor's CPU time per job. Here the child runs on a stack of its own in
//! the supervisor's memory, while the supervisor waits (the kernel resumes it once the child
//! has called `execve` or exited), and makes only system calls: no allocation, no lock, no
//! libc wrapper that looks at other threads (glibc's `setuid` signals every thread of the
//! process it thinks it is in, which here would be the supervisor's). Everything it needs is
//! prepared before the clone.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, Ordering};

/// The user to become: groups, then gid, then uid (while still root).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// One process to start.
pub struct Spawn<'a> {
    /// Absolute path of the program (no `PATH` search).
    pub program: &'a CStr,
    /// `argv`, `argv[0]` included.
    pub args: &'a [CString],
    /// The whole environment, as `KEY=value`.
    pub env: &'a [CString],
    /// Descriptors that become the child's 0, 1 and 2, in that order (so none of them may
    /// be a lower one of the three unless it is already in place: in a supervisor 0, 1 and
    /// 2 are always open, and every descriptor it opens is above them).
    pub stdio: [RawFd; 3],
    /// Working directory.
    pub cwd: &'a CStr,
    /// A process group of its own (`setpgid(0, 0)`).
    pub new_group: bool,
    /// Switch to this user (the caller must be root).
    pub user: Option<&'a Credentials>,
}

/// Everything the child reads, and where it leaves the errno of a failed step.
struct ChildArgs {
    program: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    stdio: [RawFd; 3],
    cwd: *const libc::c_char,
    new_group: bool,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: *const libc::gid_t,
    ngroups: usize,
    switch_user: bool,
    /// The signals to set to their default disposition (see [`non_default_signals`]).
    signals: *const libc::c_int,
    nsignals: usize,
    error: AtomicI32,
}

/// The child's stack. Its code makes system calls only; 64 KiB is ample.
const STACK_SIZE: usize = 64 * 1024;

/// Starts the process; returns its pid once it has called `execve`. A step that fails in
/// the child (bad working directory, credentials, no such program) comes back as the error,
/// and the child is reaped.
pub fn spawn(s: &Spawn) -> io::Result<u32> {
    let argv = null_terminated(s.args);
    let envp = null_terminated(s.env);
    let (uid, gid, groups) = match s.user {
        Some(c) => (c.uid, c.gid, c.groups.as_slice()),
        None => (0, 0, &[][..]),
    };
    let args = ChildArgs {
        program: s.program.as_ptr(),
        argv: argv.as_ptr(),
        envp: envp.as_ptr(),
        stdio: s.stdio,
        cwd: s.cwd.as_ptr(),
        new_group: s.new_group,
        uid,
        gid,
        groups: groups.as_ptr(),
        ngroups: groups.len(),
        switch_user: s.user.is_some(),
        signals: non_default_signals().as_ptr(),
        nsignals: non_default_signals().len(),
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; STACK_SIZE];
    // The stack grows down: pass its top, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + STACK_SIZE) & !15;
    // No signal handler may run in the child (it would run on the supervisor's memory): all
    // signals are blocked across the clone; the child unblocks them just before execve,
    // after setting every disposition to the default.
    // SAFETY: plain signal-mask calls on sets owned here.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // SAFETY: `child` only makes system calls and reads `args` (alive until clone returns:
    // CLONE_VFORK suspends this thread until the child has exec'd or exited), on `stack`,
    // which outlives it for the same reason.
    let pid = unsafe {
        libc::clone(
            child,
            top as *mut libc::c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            &args as *const ChildArgs as *mut libc::c_void,
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restoring the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    drop(stack);
    if pid < 0 {
        return Err(clone_error);
    }
    match args.error.load(Ordering::SeqCst) {
        0 => Ok(pid as u32),
        errno => {
            // It exited (127) without exec: reap it here, it is nobody's rank.
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
            Err(io::Error::from_raw_os_error(errno))
        }
    }
}

/// The pointers of `strings`, then a null one (`argv`, `envp`).
fn null_terminated(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|a| a.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 layout), for `rt_sigaction`.
#[repr(C)]
struct KernelSigaction {
    handler: libc::sighandler_t,
    flags: libc::c_ulong,
    restorer: usize,
    mask: u64,
}

/// The highest signal number (glibc's `_NSIG - 1`).
const MAX_SIGNAL: libc::c_int = 64;

/// The signals whose disposition in this process is not the default (a handler, or ignored),
/// read once, at the first spawn: only those need setting back in the child (a handler of
/// the parent's must never run there before `execve`, and an ignored signal would stay
/// ignored through it). A supervisor sets its dispositions when it starts and never changes
/// them afterwards, so the list stays true; resetting all 62 in every child cost ~35 µs
/// (62 system calls) on the way to each job's first command. A disposition that cannot be
/// read is reset anyway.
fn non_default_signals() -> &'static [libc::c_int] {
    static SIGNALS: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    SIGNALS.get_or_init(|| {
        (1..=MAX_SIGNAL)
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| {
                let mut old = KernelSigaction {
                    handler: libc::SIG_DFL,
                    flags: 0,
                    restorer: 0,
                    mask: 0,
                };
                // SAFETY: reads the disposition into `old`, changes nothing.
                let rc = unsafe {
                    libc::syscall(
                        libc::SYS_rt_sigaction,
                        sig,
                        std::ptr::null::<KernelSigaction>(),
                        &mut old as *mut KernelSigaction,
                        std::mem::size_of::<u64>(),
                    )
                };
                rc != 0 || old.handler != libc::SIG_DFL
            })
            .collect()
    })
}

/// Records the errno of the step that failed and exits without running any exit handler.
fn fail(a: &ChildArgs) -> ! {
    // SAFETY: errno is the suspended parent thread's (the child shares its memory and TLS);
    // `_exit` is the bare system call.
    unsafe {
        let e = *libc::__errno_location();
        a.error
            .store(if e == 0 { libc::EINVAL } else { e }, Ordering::SeqCst);
        libc::_exit(127)
    }
}

/// The child, on its own stack in the parent's memory. System calls only.
extern "C" fn child(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the parent's `ChildArgs`, alive while the parent is suspended.
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: every call below is a system call (or a libc wrapper that is nothing more) on
    // values prepared by the parent.
    unsafe {
        // Default dispositions for every signal that has another (see
        // [`non_default_signals`]): a handler of the supervisor's must never run here, and
        // ignored ones (SIGPIPE, or whatever the daemon inherited) would be inherited through
        // exec. The raw call reaches glibc's reserved signals too.
        let dfl = KernelSigaction {
            handler: libc::SIG_DFL,
            flags: 0,
            restorer: 0,
            mask: 0,
        };
        for i in 0..a.nsignals {
            libc::syscall(
                libc::SYS_rt_sigaction,
                *a.signals.add(i),
                &dfl as *const KernelSigaction,
                std::ptr::null_mut::<KernelSigaction>(),
                std::mem::size_of::<u64>(),
            );
        }
        if a.new_group && libc::setpgid(0, 0) != 0 {
            fail(a);
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            let target = target as RawFd;
            if fd == target {
                // Already in place: keep it across exec.
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    fail(a);
                }
            } else if libc::dup2(fd, target) < 0 {
                fail(a);
            }
        }
        if libc::chdir(a.cwd) != 0 {
            fail(a);
        }
        if a.switch_user {
            // Raw system calls: they change this process only.
            if libc::syscall(libc::SYS_setgroups, a.ngroups, a.groups) != 0
                || libc::syscall(libc::SYS_setgid, a.gid) != 0
                || libc::syscall(libc::SYS_setuid, a.uid) != 0
            {
                fail(a);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        libc::execve(a.program, a.argv, a.envp);
        fail(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;

    fn c(s: &str) -> CString {
        CString::new(s).expect("no NUL")
    }

    fn wait_code(pid: u32) -> i32 {
        match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None) {
            Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => code,
            other => panic!("unexpected wait status {other:?}"),
        }
    }

    /// Runs `script` with bash (as `user` if given), output into a pipe; returns (exit code,
    /// output).
    fn run(
        script: &str,
        env: &[&str],
        cwd: &str,
        new_group: bool,
        user: Option<&Credentials>,
    ) -> (i32, String) {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let args = [c("bash"), c("-c"), c(script)];
        let env: Vec<CString> = env.iter().map(|e| c(e)).collect();
        let cwd = c(cwd);
        let pid = spawn(&Spawn {
            program: c"/bin/bash",
            args: &args,
            env: &env,
            stdio: [null.as_raw_fd(), w.as_raw_fd(), w.as_raw_fd()],
            cwd: &cwd,
            new_group,
            user,
        })
        .expect("spawn");
        drop(w);
        let mut out = String::new();
        std::fs::File::from(r)
            .read_to_string(&mut out)
            .expect("read output");
        (wait_code(pid), out)
    }

    #[test]
    fn runs_with_exactly_the_given_environment_cwd_and_output() {
        let (code, out) = run(
            "echo \"$A|$B|$(pwd)\"; env | grep -c . ; echo err >&2; exit 3",
            &["A=1", "B=two words"],
            "/tmp",
            false,
            None,
        );
        assert_eq!(code, 3);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "1|two words|/tmp");
        // bash adds PWD, SHLVL and _ to what it was given: nothing of the test's own.
        let count: usize = lines[1].parse().expect("a count");
        assert!(count <= 5, "unexpected environment size {count}: {out}");
        assert_eq!(lines[2], "err");
    }

    #[test]
    fn new_group_and_default_signals_and_empty_mask() {
        // Rust ignores SIGPIPE in this process; the child must see it at its default, and
        // nothing blocked.
        let (code, out) = run(
            "ps -o pid=,pgid= -p $$; grep -E '^(SigBlk|SigIgn)' /proc/$$/status",
            &["PATH=/usr/bin:/bin"],
            "/",
            true,
            None,
        );
        assert_eq!(code, 0, "{out}");
        let mut lines = out.lines();
        let ids: Vec<&str> = lines.next().expect("ps line").split_whitespace().collect();
        assert_eq!(ids[0], ids[1], "the child leads its own group: {out}");
        for l in lines {
            let mask = l.split_whitespace().nth(1).expect("a mask");
            assert!(
                mask.chars().all(|c| c == '0'),
                "nothing blocked or ignored: {out}"
            );
        }
    }

    #[test]
    fn a_failing_step_in_the_child_is_the_error() {
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let fd = null.as_raw_fd();
        let args = [c("x")];
        for (program, cwd, what) in [
            (c"/nonexistent/program", c"/", "no such program"),
            (c"/bin/true", c"/nonexistent/dir", "no such directory"),
        ] {
            let err = spawn(&Spawn {
                program,
                args: &args,
                env: &[],
                stdio: [fd, fd, fd],
                cwd,
                new_group: false,
                user: None,
            })
            .expect_err(what);
            assert_eq!(err.raw_os_error(), Some(libc::ENOENT), "{what}");
        }
    }

    #[test]
    fn switches_user_when_root() {
        if !crate::root_or_skip("switches_user_when_root") {
            return;
        }
        let creds = Credentials {
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 4242],
        };
        let (code, out) = run(
            "id -u; id -g; id -G",
            &["PATH=/usr/bin:/bin"],
            "/",
            false,
            Some(&creds),
        );
        assert_eq!(code, 0, "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "65534");
        assert_eq!(lines[1], "65534");
        let mut groups: Vec<&str> = lines[2].split_whitespace().collect();
        groups.sort();
        assert_eq!(groups, vec!["4242", "65534"]);
        // This process is still root.
        assert!(nix::unistd::geteuid().is_root());
        assert!(nix::unistd::getuid().is_root());
    }
}
