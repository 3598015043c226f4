//! A lean spool daemon: a measuring stick for `scripts/bench-lean`, not a product.
//!
//! It does per job the least that the spool's user-visible contract needs — a durable
//! admission (one journal line and an `fdatasync` per batch), `jobs/<id>/` with `job.yaml`
//! (the submission itself, renamed in), `status` and `log`, a `pending/` → `running/` →
//! `done/` link, an atomic `status` — and runs the job's `run:` with `bash -c`, two at a time.
//! With `--info` it also writes an `info.json` at admission, start and end; with
//! `--supervisors` a pool of four long-lived processes (not the daemon) spawn and wait for
//! the jobs and write their `status`, as skyspool's supervisors do.
//!
//! Everything else skyspool does is left out on purpose: YAML parsing and validation,
//! rejections, the read lease, staging and crash recovery, user switching, cancelling,
//! placement, GPUs, `queue`, the FUSE view. The difference between this and skyspool in the
//! same run is what those cost per job (see BENCHMARKS.md, "A lean daemon").
//!
//! Usage: `lean_spool SPOOL [--slots N] [--info] [--supervisors]`, as the job user.

use std::collections::{HashMap, VecDeque};
use std::ffi::{CStr, CString};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::exit;

fn die(what: &str) -> ! {
    eprintln!("lean_spool: {what}: {}", std::io::Error::last_os_error());
    exit(1)
}

fn cstr(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| die("a path with a NUL byte"))
}

fn check(r: libc::c_int, what: &str) -> libc::c_int {
    if r < 0 {
        die(what)
    }
    r
}

/// Writes `dir/name` whole through a temporary file and a rename.
fn write_atomic(dir: &str, name: &str, text: &str) {
    let tmp = cstr(&format!("{dir}/.{name}.tmp"));
    let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC;
    // SAFETY: plain system calls on valid C strings and a buffer of the given length.
    unsafe {
        let fd = check(
            libc::open(tmp.as_ptr(), flags, 0o644),
            "create a temporary file",
        );
        if libc::write(fd, text.as_ptr().cast(), text.len()) != text.len() as isize {
            die("write a temporary file");
        }
        libc::close(fd);
        let dst = cstr(&format!("{dir}/{name}"));
        check(
            libc::rename(tmp.as_ptr(), dst.as_ptr()),
            "rename a temporary file",
        );
    }
}

fn rename(from: &str, to: &str) {
    let (f, t) = (cstr(from), cstr(to));
    // SAFETY: two valid C strings.
    check(
        unsafe { libc::rename(f.as_ptr(), t.as_ptr()) },
        "move a state link",
    );
}

/// The job's record, the size and shape of skyspool's `info.json`.
fn write_info(on: bool, id: u64, status: &str) {
    if !on {
        return;
    }
    let text = format!(
        "{{\n  \"id\": {id},\n  \"name\": \"t\",\n  \"user\": \"bench\",\n  \"status\": \"{status}\",\n  \
         \"submitted\": \"2026-11-30T03:00:00.000Z\",\n  \"started\": null,\n  \"ended\": null,\n  \
         \"resources\": \"1x[CPU:0.5]\",\n  \"demand\": {{\"num_nodes\": 1, \"per_node\": {{\"accelerators\": [], \"cpus\": 500}}}},\n  \
         \"num_nodes\": 1,\n  \"source\": \"incoming/t.yaml\",\n  \"has_workdir\": false,\n  \
         \"placement\": [{{\"rank\": 0, \"node\": \"head\", \"ip\": \"127.0.0.1\", \"gpus\": [], \"cpus\": \"0.5\"}}],\n  \
         \"exit_codes\": [],\n  \"reason\": null\n}}\n"
    );
    write_atomic(&format!("jobs/{id}"), "info.json", &text);
}

/// Starts `bash -c` of the job's script with its log as stdout and stderr.
fn spawn_job(root: &str, id: u64, body: &str, env: &[CString]) -> libc::pid_t {
    let dir = format!("{root}/jobs/{id}");
    let log = cstr(&format!("{dir}/log"));
    let script = cstr(&format!(
        "[ -f ~/.bashrc ] && . ~/.bashrc >/dev/null 2>&1 </dev/null\ncd {dir} || exit 1\n{body}\n"
    ));
    let mut jenv = env.to_vec();
    jenv.push(cstr(&format!("SKYPILOT_TASK_ID={id}")));
    jenv.push(cstr("SKYPILOT_NODE_RANK=0"));
    jenv.push(cstr("SKYPILOT_NUM_NODES=1"));
    let mut envp: Vec<*mut libc::c_char> = jenv.iter().map(|e| e.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());
    let (bash, a0, a1) = (cstr("/bin/bash"), cstr("bash"), cstr("-c"));
    let argv = [
        a0.as_ptr().cast_mut(),
        a1.as_ptr().cast_mut(),
        script.as_ptr().cast_mut(),
        std::ptr::null_mut(),
    ];
    // SAFETY: posix_spawn with initialised attributes and file actions, NUL-terminated argv
    // and envp whose strings outlive the call.
    unsafe {
        let lfd = check(
            libc::open(
                log.as_ptr(),
                libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC,
            ),
            "open a log",
        );
        let mut fa: libc::posix_spawn_file_actions_t = std::mem::zeroed();
        libc::posix_spawn_file_actions_init(&mut fa);
        libc::posix_spawn_file_actions_adddup2(&mut fa, lfd, 1);
        libc::posix_spawn_file_actions_adddup2(&mut fa, lfd, 2);
        let mut attr: libc::posix_spawnattr_t = std::mem::zeroed();
        libc::posix_spawnattr_init(&mut attr);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::posix_spawnattr_setsigmask(&mut attr, &empty);
        libc::posix_spawnattr_setflags(&mut attr, libc::POSIX_SPAWN_SETSIGMASK as libc::c_short);
        let mut pid = 0;
        let r = libc::posix_spawn(
            &mut pid,
            bash.as_ptr(),
            &fa,
            &attr,
            argv.as_ptr(),
            envp.as_ptr(),
        );
        libc::posix_spawn_file_actions_destroy(&mut fa);
        libc::posix_spawnattr_destroy(&mut attr);
        libc::close(lfd);
        if r != 0 {
            die("start bash");
        }
        pid
    }
}

fn exit_word(status: libc::c_int) -> &'static str {
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        "SUCCEEDED\n"
    } else {
        "FAILED\n"
    }
}

/// A pooled supervisor: takes `ID\nBODY` from its socket, runs the job, writes its `status`
/// (RUNNING, then the final word), answers with the ID, and waits for the next one.
fn supervise(sock: libc::c_int, root: &str, env: &[CString]) -> ! {
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: a read into a buffer of the given length.
        let n = unsafe { libc::recv(sock, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            exit(0);
        }
        let msg = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        let Some((id, body)) = msg.split_once('\n') else {
            exit(1)
        };
        let Ok(id) = id.parse::<u64>() else { exit(1) };
        let pid = spawn_job(root, id, body, env);
        let dir = format!("jobs/{id}");
        write_atomic(&dir, "status", "RUNNING\n");
        let mut st = 0;
        // SAFETY: waiting for our own child.
        check(unsafe { libc::waitpid(pid, &mut st, 0) }, "wait for a job");
        write_atomic(&dir, "status", exit_word(st));
        let reply = id.to_string();
        // SAFETY: a write of a buffer of the given length.
        unsafe { libc::send(sock, reply.as_ptr().cast(), reply.len(), 0) };
    }
}

/// The job's `run:` text from a task of the shape `run: |` + indented lines (the benchmark's).
fn run_body(text: &str) -> Option<String> {
    let at = text.find("run: |\n")?;
    Some(
        text[at + 7..]
            .lines()
            .map(str::trim_start)
            .collect::<Vec<_>>()
            .join("\n"),
    )
}

struct Lean {
    root: String,
    info: bool,
    env: Vec<CString>,
    next_id: u64,
    queued: VecDeque<(u64, String)>,
    /// Running jobs by pid (the daemon's own children) or by `-(supervisor + 1)`.
    running: HashMap<libc::pid_t, u64>,
    sups: Vec<libc::c_int>,
    free: Vec<usize>,
    journal: std::fs::File,
}

impl Lean {
    /// Admits what one read of the inotify descriptor named: one journal line each, one
    /// `fdatasync` for all of them.
    fn admit(&mut self, names: Vec<String>) {
        let mut lines = String::new();
        for name in names {
            let path = format!("incoming/{name}");
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let Some(body) = run_body(&text) else {
                continue;
            };
            self.next_id += 1;
            let id = self.next_id;
            let dir = format!("jobs/{id}");
            if std::fs::create_dir(&dir).is_err() {
                die("make a job directory");
            }
            rename(&path, &format!("{dir}/job.yaml"));
            write_atomic(&dir, "status", "PENDING\n");
            if std::fs::File::create(format!("{dir}/log")).is_err() {
                die("create a log");
            }
            if std::os::unix::fs::symlink(format!("../jobs/{id}"), format!("pending/{id}")).is_err()
            {
                die("link a job in pending/");
            }
            write_info(self.info, id, "PENDING");
            lines.push_str(&format!(
                "{{\"id\":{id},\"name\":{name:?},\"yaml\":{text:?}}}\n"
            ));
            self.queued.push_back((id, body));
        }
        if !lines.is_empty() {
            if self.journal.write_all(lines.as_bytes()).is_err() {
                die("append to the journal");
            }
            // SAFETY: fdatasync of an open file.
            check(
                unsafe { libc::fdatasync(self.journal.as_raw_fd()) },
                "sync the journal",
            );
        }
    }

    fn start_what_fits(&mut self, slots: usize) {
        while self.running.len() < slots && (self.sups.is_empty() || !self.free.is_empty()) {
            let Some((id, body)) = self.queued.pop_front() else {
                break;
            };
            let key = match self.free.pop() {
                Some(k) => {
                    let msg = format!("{id}\n{body}");
                    // SAFETY: a write of a buffer of the given length.
                    let sent =
                        unsafe { libc::send(self.sups[k], msg.as_ptr().cast(), msg.len(), 0) };
                    if sent < 0 {
                        die("hand a job to a supervisor");
                    }
                    -(k as libc::pid_t) - 1
                }
                None => spawn_job(&self.root, id, &body, &self.env),
            };
            self.running.insert(key, id);
            rename(&format!("pending/{id}"), &format!("running/{id}"));
            if self.sups.is_empty() {
                write_atomic(&format!("jobs/{id}"), "status", "RUNNING\n");
            }
            write_info(self.info, id, "RUNNING");
        }
    }

    fn ended(&mut self, key: libc::pid_t, word: Option<&str>) {
        let Some(id) = self.running.remove(&key) else {
            return;
        };
        if let Some(word) = word {
            write_atomic(&format!("jobs/{id}"), "status", word);
        }
        write_info(self.info, id, word.unwrap_or("SUCCEEDED\n").trim_end());
        rename(&format!("running/{id}"), &format!("done/{id}"));
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(root) = args.next() else {
        eprintln!("usage: lean_spool SPOOL [--slots N] [--info] [--supervisors]");
        exit(2)
    };
    let (mut slots, mut info, mut supervisors) = (2usize, false, false);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--slots" => slots = args.next().and_then(|s| s.parse().ok()).unwrap_or(2),
            "--info" => info = true,
            "--supervisors" => supervisors = true,
            _ => {
                eprintln!("lean_spool: unknown argument {a}");
                exit(2)
            }
        }
    }
    if std::env::set_current_dir(&root).is_err() {
        die("enter the spool");
    }
    let root = std::env::current_dir()
        .unwrap_or_else(|_| die("find the spool"))
        .to_string_lossy()
        .into_owned();
    for d in ["incoming", "jobs", "pending", "running", "done"] {
        let _ = std::fs::create_dir(d);
    }
    let journal = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open("journal")
        .unwrap_or_else(|_| die("open the journal"));
    let env: Vec<CString> = std::env::vars()
        .map(|(k, v)| cstr(&format!("{k}={v}")))
        .collect();
    let mut lean = Lean {
        root,
        info,
        env,
        next_id: 0,
        queued: VecDeque::new(),
        running: HashMap::new(),
        sups: Vec::new(),
        free: Vec::new(),
        journal,
    };
    // SAFETY: system calls with valid arguments; the forked child only runs `supervise`.
    let (ino, sfd) = unsafe {
        if supervisors {
            for k in 0..4 {
                let mut sv = [0; 2];
                let kind = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
                check(
                    libc::socketpair(libc::AF_UNIX, kind, 0, sv.as_mut_ptr()),
                    "socketpair",
                );
                match check(libc::fork(), "fork a supervisor") {
                    0 => {
                        libc::close(sv[0]);
                        supervise(sv[1], &lean.root, &lean.env)
                    }
                    _ => {
                        libc::close(sv[1]);
                        lean.sups.push(sv[0]);
                        lean.free.push(k);
                    }
                }
            }
        }
        let ino = check(libc::inotify_init1(libc::IN_CLOEXEC), "inotify_init1");
        let incoming = cstr("incoming");
        let mask = libc::IN_CLOSE_WRITE | libc::IN_MOVED_TO;
        check(
            libc::inotify_add_watch(ino, incoming.as_ptr(), mask),
            "watch incoming/",
        );
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let sfd = check(
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK),
            "signalfd",
        );
        (ino, sfd)
    };
    let mut buf = vec![0u8; 65536];
    loop {
        lean.start_what_fits(slots);
        let mut fds: Vec<libc::pollfd> = [ino, sfd]
            .iter()
            .chain(lean.sups.iter())
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: poll of a valid array of the given length.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        for k in 0..lean.sups.len() {
            if fds[2 + k].revents != 0 {
                // SAFETY: a read into a buffer of the given length.
                let n = unsafe { libc::recv(lean.sups[k], buf.as_mut_ptr().cast(), 64, 0) };
                if n <= 0 {
                    die("a supervisor went away");
                }
                lean.free.push(k);
                lean.ended(-(k as libc::pid_t) - 1, None);
            }
        }
        if fds[1].revents != 0 {
            // SAFETY: draining the signalfd, then reaping children without blocking.
            unsafe {
                while libc::read(sfd, buf.as_mut_ptr().cast(), 128) > 0 {}
                loop {
                    let mut st = 0;
                    let pid = libc::waitpid(-1, &mut st, libc::WNOHANG);
                    if pid <= 0 {
                        break;
                    }
                    lean.ended(pid, Some(exit_word(st)));
                }
            }
        }
        if fds[0].revents != 0 {
            // SAFETY: a read into a buffer of the given length.
            let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
            let mut names = Vec::new();
            let mut off = 0usize;
            let head = std::mem::size_of::<libc::inotify_event>();
            while n > 0 && off + head <= n as usize {
                // SAFETY: the kernel wrote whole events; the name follows the header.
                let (len, name) = unsafe {
                    let ev = std::ptr::read_unaligned(
                        buf.as_ptr().add(off).cast::<libc::inotify_event>(),
                    );
                    let name = match ev.len {
                        0 => String::new(),
                        _ => CStr::from_ptr(buf.as_ptr().add(off + head).cast())
                            .to_string_lossy()
                            .into_owned(),
                    };
                    (ev.len as usize, name)
                };
                off += head + len;
                if name.ends_with(".yaml") && !name.starts_with('.') {
                    names.push(name);
                }
            }
            lean.admit(names);
        }
    }
}
