//! The FUSE view (`serve --mount DIR`), through real mounts: submissions with cp, rsync and
//! scp (rejections reported by the tool), generated status/queue, streaming logs, cancel
//! permissions, `ls -l`, concurrency, and recovery from a killed daemon.
//!
//! Needs root and /dev/fuse (else SKIPPED); scp needs the local sshd of `scripts/test-sshd`.
mod common;
use common::*;
use std::fs;
use std::io::{BufRead, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A mount point of its own; on drop it is lazily unmounted (should the daemon not have
/// done it), then removed.
struct MountDir {
    dir: tempfile::TempDir,
}

impl MountDir {
    fn new() -> MountDir {
        let dir = tempfile::Builder::new()
            .prefix("skyspool-mnt-")
            .tempdir()
            .expect("tempdir");
        let _ = fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        );
        MountDir { dir }
    }
}

impl Drop for MountDir {
    fn drop(&mut self) {
        // `umount -l`: never leave a mount behind (TempDir would then walk into it).
        let _ = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH);
    }
}

/// A daemon serving a mount. Fields drop in order: the daemon first (its SIGTERM handler
/// unmounts), then the mount directory (lazy unmount as a fallback).
struct Mounted {
    d: Daemon,
    mnt: MountDir,
}

impl Mounted {
    fn start(extra: &[&str]) -> Option<Mounted> {
        if !is_root() {
            skip("the FUSE tests need root (mount, other users)");
            return None;
        }
        if !Path::new("/dev/fuse").exists() {
            skip("no /dev/fuse: cannot mount the spool");
            return None;
        }
        let mnt = MountDir::new();
        let path = mnt.dir.path().to_str().expect("utf-8 tmp path").to_string();
        let mut args = vec!["--gpus", "H100:4", "--mount", path.as_str()];
        args.extend_from_slice(extra);
        let d = Daemon::start(&args);
        let m = Mounted { d, mnt };
        m.wait_mounted();
        Some(m)
    }

    fn root(&self) -> &Path {
        self.mnt.dir.path()
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root().join(rel)
    }

    fn wait_mounted(&self) {
        let queue = self.p("queue");
        wait_until(
            DEADLINE,
            "the spool to be mounted",
            || fs::metadata(&queue).is_ok(),
            || self.d.diagnostics(),
        );
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.p(rel))
            .unwrap_or_else(|e| panic!("reading MNT/{rel}: {e}\n{}", self.d.diagnostics()))
    }

    /// `job N` from a receipt.
    fn receipt_id(&self, name: &str) -> u64 {
        let text = self.read(&format!("incoming/{name}"));
        text.strip_prefix("job ")
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or_else(|| panic!("receipt of {name}: {text:?}"))
    }

    fn status(&self, id: u64) -> String {
        self.read(&format!("jobs/{id}/status")).trim().to_string()
    }

    /// The STATUS column of job `id` in MNT/queue.
    fn queue_status(&self, id: u64) -> Option<String> {
        self.read("queue").lines().skip(1).find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next()? == id.to_string()).then(|| l.split_whitespace().last().unwrap().into())
        })
    }

    /// After the daemon's own files say `want` (its queue file is written after the view is
    /// updated), the mount must say it too, at once.
    fn expect_state(&self, id: u64, want: &str) {
        self.d.wait_queue_status(id, want);
        assert_eq!(self.status(id), want, "{}", self.d.diagnostics());
        assert_eq!(
            self.queue_status(id).as_deref(),
            Some(want),
            "{}",
            self.read("queue")
        );
        let dir = match want {
            "PENDING" => "pending",
            "SETTING_UP" | "RUNNING" => "running",
            _ => "done",
        };
        for d in ["pending", "running", "done"] {
            let link = self.p(&format!("{d}/{id}"));
            assert_eq!(
                fs::symlink_metadata(&link).is_ok(),
                d == dir,
                "{d}/{id} for a {want} job"
            );
        }
        assert_eq!(
            fs::read_link(self.p(&format!("{dir}/{id}"))).unwrap(),
            PathBuf::from(format!("../jobs/{id}"))
        );
        assert_eq!(
            fs::read_to_string(self.p(&format!("{dir}/{id}/status"))).unwrap(),
            format!("{want}\n")
        );
    }
}

fn gated(name: &str, accel: &str, gate: &Gate) -> String {
    format!(
        "name: {name}\nresources:\n  accelerators: {accel}\nrun: |\n  echo started {name}\n  {}\n  echo finished {name}\n",
        gate.wait_cmd()
    )
}

/// Copies a file into MNT/incoming/ (cp, rsync, scp ...).
type Tool = Box<dyn Fn(&Path) -> Output>;

const BAD: &str = "name: bad\nresources:\n  acelerators: H100:1\nrun: echo hi\n";

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn bash(script: &str) -> Output {
    run(Command::new("bash").arg("-c").arg(script))
}

fn su(user: &str, script: &str) -> Output {
    run(Command::new("su").args([user, "-s", "/bin/bash", "-c", script]))
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn uid_of(user: &str) -> Option<(u32, u32)> {
    nix::unistd::User::from_name(user)
        .ok()
        .flatten()
        .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
}

fn is_live(status: &str) -> bool {
    matches!(status, "PENDING" | "SETTING_UP" | "RUNNING")
}

fn ssh_reachable() -> bool {
    Path::new(SSH_KEY).exists()
        && Command::new("ssh")
            .args(SSH_OPTS)
            .args([
                "-o",
                "ConnectTimeout=5",
                "-i",
                SSH_KEY,
                "root@127.0.0.2",
                "true",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// cp, rsync and scp into MNT/incoming/: a good file returns with the job admitted (its
/// receipt readable, the job PENDING or RUNNING), a bad one makes the tool fail and leaves
/// its reason beside it. Plus the rules for names, empty files and held dot-files.
#[test]
fn submissions_through_cp_rsync_and_scp() {
    let Some(m) = Mounted::start(&[]) else {
        return;
    };
    let s = m.d.scratch();
    let gate = Gate::new(&s, "subs");
    let mut tools: Vec<(&str, Tool)> = Vec::new();
    let inc = m.p("incoming");
    let inc_slash = format!("{}/", inc.display());
    {
        let to = inc_slash.clone();
        tools.push((
            "cp",
            Box::new(move |src| run(Command::new("cp").arg(src).arg(&to))),
        ));
    }
    if have_program("rsync") {
        let to = inc_slash.clone();
        tools.push((
            "rsync",
            Box::new(move |src| run(Command::new("rsync").arg("-a").arg(src).arg(&to))),
        ));
    } else {
        skip("rsync is not installed");
    }
    let sftp_server = Path::new("/usr/lib/openssh/sftp-server");
    if sftp_server.exists() {
        // scp's default (SFTP) protocol, against a local sftp-server (no ssh needed).
        let to = format!("localhost:{inc_slash}");
        tools.push((
            "scp-sftp",
            Box::new(move |src| {
                run(Command::new("scp")
                    .args(["-q", "-s", "-D", "/usr/lib/openssh/sftp-server"])
                    .arg(src)
                    .arg(&to))
            }),
        ));
    } else {
        skip("no /usr/lib/openssh/sftp-server (openssh-sftp-server): scp's SFTP mode not tested");
    }
    if ssh_reachable() {
        // The legacy scp protocol over a real ssh login (the test sshd has no sftp
        // subsystem).
        let to = format!("root@127.0.0.2:{inc_slash}");
        tools.push((
            "scp",
            Box::new(move |src| {
                run(Command::new("scp")
                    .args(["-q", "-O", "-p", "-i", SSH_KEY])
                    .args(SSH_OPTS)
                    .arg(src)
                    .arg(&to))
            }),
        ));
        // scp's default SFTP protocol over ssh, as from a laptop.
        let to = format!("root@127.0.0.2:{inc_slash}");
        tools.push((
            "scp-sftp-ssh",
            Box::new(move |src| {
                run(Command::new("scp")
                    .args(["-q", "-i", SSH_KEY])
                    .args(SSH_OPTS)
                    .arg(src)
                    .arg(&to))
            }),
        ));
        // rsync over ssh (temporary name, then rename into place on the mount).
        if have_program("rsync") {
            let to = format!("root@127.0.0.2:{inc_slash}");
            let ssh = format!("ssh -i {SSH_KEY} {}", SSH_OPTS.join(" "));
            tools.push((
                "rsync-ssh",
                Box::new(move |src| {
                    run(Command::new("rsync")
                        .args(["-a", "-e", &ssh])
                        .arg(src)
                        .arg(&to))
                }),
            ));
        }
    } else {
        skip("no ssh to root@127.0.0.2 (scripts/test-sshd): scp over ssh not tested");
    }
    let mut ids = Vec::new();
    for (tool, submit) in &tools {
        let good = s.join(format!("good-{tool}.yaml"));
        fs::write(&good, gated(&format!("good-{tool}"), "H100:1", &gate)).unwrap();
        let out = submit(&good);
        assert!(
            out.status.success(),
            "{tool}: {}\n{}",
            text(&out),
            m.d.diagnostics()
        );
        // Admitted before the tool returned: receipt, job directory, live status.
        let id = m.receipt_id(&format!("good-{tool}.yaml"));
        assert!(
            is_live(&m.status(id)),
            "{tool}: job {id} is {}",
            m.status(id)
        );
        assert!(m.d.job(id).join("job.yaml").exists());
        assert_eq!(
            m.read(&format!("jobs/{id}/job.yaml")),
            fs::read_to_string(&good).unwrap()
        );
        ids.push(id);

        let bad = s.join(format!("bad-{tool}.yaml"));
        fs::write(&bad, BAD).unwrap();
        let out = submit(&bad);
        assert!(
            !out.status.success(),
            "{tool} succeeded with a bad YAML: {}",
            text(&out)
        );
        let reason = m.read(&format!("incoming/bad-{tool}.yaml.reason"));
        assert!(
            reason.contains("acelerators") && reason.contains(&format!("bad-{tool}.yaml")),
            "{tool}: {reason}"
        );
        assert!(!m.p(&format!("incoming/bad-{tool}.yaml")).exists());
        // The daemon kept the file and its reason; the mount shows them.
        assert_eq!(m.read(&format!("rejected/bad-{tool}.yaml")), BAD);
        assert!(m
            .d
            .path(&format!("rejected/bad-{tool}.yaml.reason"))
            .exists());
    }
    let listing: Vec<String> = fs::read_dir(&inc)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    for (tool, _) in &tools {
        assert!(
            listing.contains(&format!("good-{tool}.yaml")),
            "{listing:?}"
        );
        assert!(
            listing.contains(&format!("bad-{tool}.yaml.reason")),
            "{listing:?}"
        );
    }

    // An empty file is not submitted; the shell's redirection (an early close of a dup)
    // then the data: submitted once, with the data.
    let jobs_before = m.d.job_ids().len();
    fs::write(inc.join("later.yaml"), b"").unwrap();
    assert_eq!(fs::metadata(inc.join("later.yaml")).unwrap().len(), 0);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        m.d.job_ids().len(),
        jobs_before,
        "an empty file was submitted"
    );
    let out = bash(&format!(
        "cat '{}' > '{}'",
        s.join("good-cp.yaml").display(),
        inc.join("later.yaml").display()
    ));
    assert!(out.status.success(), "{}", text(&out));
    let id = m.receipt_id("later.yaml");
    assert_eq!(m.d.job_ids().len(), jobs_before + 1);
    ids.push(id);

    // The safe protocol inside the mount: a dot-file is held, its rename submits.
    fs::write(inc.join(".held.yaml.tmp"), gated("held", "H100:1", &gate)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        m.d.job_ids().len(),
        jobs_before + 1,
        "a dot-file was submitted"
    );
    fs::rename(inc.join(".held.yaml.tmp"), inc.join("held.yaml")).unwrap();
    ids.push(m.receipt_id("held.yaml"));
    assert!(!inc.join(".held.yaml.tmp").exists());
    fs::write(inc.join(".bad.yaml.tmp"), BAD).unwrap();
    let err = fs::rename(inc.join(".bad.yaml.tmp"), inc.join("renamed-bad.yaml")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert!(m
        .read("incoming/renamed-bad.yaml.reason")
        .contains("acelerators"));
    // Renamed while its writer still has it open: the rename is only a new name (after a
    // short wait for a close that may be on its way), and the writer's close submits it.
    let jobs_before = m.d.job_ids().len();
    let mut open = fs::File::create(inc.join(".open.yaml.tmp")).unwrap();
    open.write_all(b"name: open\nrun: echo open\n").unwrap();
    fs::rename(inc.join(".open.yaml.tmp"), inc.join("open.yaml")).unwrap();
    assert_eq!(m.d.job_ids().len(), jobs_before, "submitted while open");
    drop(open);
    let opened = m.receipt_id("open.yaml");
    assert_eq!(m.d.job_ids().len(), jobs_before + 1);
    assert_eq!(
        m.read(&format!("jobs/{opened}/job.yaml")),
        "name: open\nrun: echo open\n"
    );

    // Names that can never be jobs, directories, links.
    let err = fs::write(inc.join("notes.txt"), b"hello").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    assert!(m.read("incoming/notes.txt.reason").contains("not a job"));
    let err = fs::write(inc.join("bad\nname.yaml"), b"run: x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EINVAL), "{err}");
    let err = fs::create_dir(inc.join("dir")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
    assert!(std::os::unix::fs::symlink("/etc/passwd", inc.join("link.yaml")).is_err());
    // Over 1 MiB: EFBIG.
    let big = vec![b'#'; 1024 * 1024 + 1];
    let err = fs::write(inc.join("big.yaml"), &big).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");

    // Opening a receipt for writing without writing (touch) keeps it; writing the name
    // again is a new submission.
    let first = m.receipt_id("good-cp.yaml");
    drop(
        fs::OpenOptions::new()
            .write(true)
            .open(inc.join("good-cp.yaml"))
            .unwrap(),
    );
    let out = run(Command::new("touch").arg(inc.join("good-cp.yaml")));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(m.receipt_id("good-cp.yaml"), first);
    let out = run(Command::new("cp")
        .arg(s.join("good-cp.yaml"))
        .arg(inc.join("good-cp.yaml")));
    assert!(out.status.success(), "{}", text(&out));
    let again = m.receipt_id("good-cp.yaml");
    assert!(again > first, "{again} after {first}");
    ids.push(again);
    gate.open();
    for id in ids {
        m.d.wait_done(id, "SUCCEEDED");
        assert_eq!(m.status(id), "SUCCEEDED");
    }
}

/// status, queue and the state links follow every transition; cancel through the mount
/// works for the owner and is refused (EACCES) to others; writes to the view fail;
/// `ls -l` shows the job's owner and sizes equal to what cat returns.
#[test]
fn state_cancel_permissions_and_attributes() {
    let Some(m) = Mounted::start(&[]) else {
        return;
    };
    let (Some((alice, alice_gid)), Some(_)) = (uid_of("skyspool-alice"), uid_of("skyspool-bob"))
    else {
        skip("users skyspool-alice and skyspool-bob are missing (.ci/run creates them)");
        return;
    };
    let s = m.d.scratch();
    let g1 = Gate::new(&s, "one");
    let g2 = Gate::new(&s, "two");
    fs::write(s.join("one.yaml"), gated("one", "H100:4", &g1)).unwrap();
    fs::write(s.join("two.yaml"), gated("two", "H100:4", &g2)).unwrap();
    let out = su(
        "skyspool-alice",
        &format!(
            "cp '{}' '{}'",
            s.join("one.yaml").display(),
            m.p("incoming/").display()
        ),
    );
    assert!(out.status.success(), "{}", text(&out));
    let one = m.receipt_id("one.yaml");
    let receipt = fs::metadata(m.p("incoming/one.yaml")).unwrap();
    assert_eq!((receipt.uid(), receipt.mode() & 0o777), (alice, 0o444));
    let out = run(Command::new("cp")
        .arg(s.join("two.yaml"))
        .arg(m.p("incoming/")));
    assert!(out.status.success(), "{}", text(&out));
    let two = m.receipt_id("two.yaml");
    m.expect_state(one, "RUNNING");
    m.expect_state(two, "PENDING");

    // ls -l: owner, sizes equal to content, times.
    let info = m.d.info(one);
    let dir = fs::metadata(m.p(&format!("jobs/{one}"))).unwrap();
    assert!(dir.is_dir());
    assert_eq!((dir.uid(), dir.gid()), (alice, alice_gid));
    let submitted = chrono::DateTime::parse_from_rfc3339(info["submitted"].as_str().unwrap())
        .unwrap()
        .timestamp();
    assert_eq!(dir.mtime(), submitted);
    for f in ["job.yaml", "status", "info.json", "log", "stream"] {
        let rel = format!("jobs/{one}/{f}");
        let meta = fs::metadata(m.p(&rel)).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (alice, alice_gid), "{rel}");
        assert_eq!(meta.mode() & 0o222, 0, "{rel} is writable");
        if f != "stream" {
            assert_eq!(meta.len(), m.read(&rel).len() as u64, "{rel}");
        }
    }
    for f in ["queue", "nodes"] {
        assert_eq!(
            fs::metadata(m.p(f)).unwrap().len(),
            m.read(f).len() as u64,
            "{f}"
        );
    }
    assert_eq!(
        m.read(&format!("jobs/{one}/job.yaml")),
        fs::read_to_string(m.d.job(one).join("job.yaml")).unwrap()
    );
    let from_mount: serde_json::Value =
        serde_json::from_str(&m.read(&format!("jobs/{one}/info.json"))).unwrap();
    assert_eq!(from_mount["uid"], serde_json::json!(alice));
    assert_eq!(from_mount["status"], serde_json::json!("RUNNING"));
    let mut names: Vec<String> = fs::read_dir(m.p(&format!("jobs/{one}")))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["info.json", "job.yaml", "log", "status", "stream"]);
    // readdir and lookup agree on inode numbers.
    for e in fs::read_dir(m.p(&format!("jobs/{one}"))).unwrap() {
        let e = e.unwrap();
        assert_eq!(
            std::os::unix::fs::DirEntryExt::ino(&e),
            fs::metadata(e.path()).unwrap().ino()
        );
    }

    // Writes where they make no sense fail, never silently.
    let denied = |r: std::io::Result<()>, what: &str| {
        let e = r.expect_err(what);
        assert!(
            matches!(
                e.raw_os_error(),
                Some(libc::EACCES) | Some(libc::EROFS) | Some(libc::EPERM)
            ),
            "{what}: {e}"
        );
    };
    denied(
        fs::write(m.p(&format!("jobs/{one}/status")), "SUCCEEDED\n"),
        "write status",
    );
    denied(
        fs::OpenOptions::new()
            .append(true)
            .open(m.p(&format!("jobs/{one}/log")))
            .map(|_| ()),
        "append to log",
    );
    denied(
        fs::write(m.p(&format!("jobs/{one}/info.json")), "{}"),
        "write info.json",
    );
    denied(
        fs::write(m.p(&format!("jobs/{one}/job.yaml")), "x"),
        "write job.yaml",
    );
    denied(fs::write(m.p("queue"), "x"), "write queue");
    denied(fs::write(m.p("nodes"), "x"), "write nodes");
    denied(
        fs::write(m.p(&format!("jobs/{one}/other")), "x"),
        "create in a job dir",
    );
    denied(
        fs::remove_file(m.p(&format!("jobs/{one}/log"))),
        "unlink log",
    );
    denied(fs::create_dir(m.p("jobs/999")), "mkdir in jobs/");
    denied(
        fs::rename(m.p(&format!("running/{one}")), m.p(&format!("done/{one}"))),
        "rename a state link",
    );
    denied(fs::write(m.p("rejected/x.yaml"), "x"), "write in rejected/");
    assert_eq!(m.status(one), "RUNNING");

    // Cancel: another user is refused with EACCES, the owner succeeds.
    let cancel = m.p(&format!("jobs/{one}/cancel"));
    let out = su("skyspool-bob", &format!("touch '{}'", cancel.display()));
    assert!(
        !out.status.success(),
        "bob cancelled alice's job: {}",
        text(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out)
    );
    assert!(!m.d.job(one).join("cancel").exists());
    let out = su("skyspool-alice", &format!("touch '{}'", cancel.display()));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out),
        m.d.diagnostics()
    );
    if let Ok(meta) = fs::symlink_metadata(m.d.job(one).join("cancel")) {
        assert_eq!(meta.uid(), alice, "the cancel request is alice's");
    }
    m.expect_state(one, "CANCELLED");
    // The pending job took the GPUs.
    m.expect_state(two, "RUNNING");
    // A finished job cannot be cancelled.
    denied(
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.p(&format!("jobs/{one}/cancel")))
            .map(|_| ()),
        "cancel a finished job",
    );
    g2.open();
    m.expect_state(two, "SUCCEEDED");
    let info_two: serde_json::Value =
        serde_json::from_str(&m.read(&format!("jobs/{two}/info.json"))).unwrap();
    assert_eq!(info_two, m.d.info(two));
    g1.open();
}

/// `tail -f log` sees lines while the job runs; `cat stream` blocks until the job ends and
/// returns its whole output; a finished job's stream is read at once.
#[test]
fn log_follows_and_stream_returns_at_the_end() {
    let Some(m) = Mounted::start(&[]) else {
        return;
    };
    let s = m.d.scratch();
    let gate = Gate::new(&s, "log");
    fs::write(
        s.join("talk.yaml"),
        format!(
            "name: talk\nrun: |\n  echo first line\n  {}\n  echo second line\n  sleep 0.3\n  echo third line\n",
            gate.wait_cmd()
        ),
    )
    .unwrap();
    let out = run(Command::new("cp")
        .arg(s.join("talk.yaml"))
        .arg(m.p("incoming/")));
    assert!(out.status.success(), "{}", text(&out));
    let id = m.receipt_id("talk.yaml");
    let log = m.p(&format!("jobs/{id}/log"));
    wait_until(
        DEADLINE,
        "the first line in MNT/.../log",
        || fs::read_to_string(&log).is_ok_and(|t| t.contains("first line")),
        || m.d.diagnostics(),
    );
    let mut tail = Command::new("tail")
        .args(["-n", "+1", "-f"])
        .arg(&log)
        .stdout(Stdio::piped())
        .spawn()
        .expect("tail");
    let (tx, rx) = std::sync::mpsc::channel();
    let tail_out = tail.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(tail_out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let expect_line = |want: &str| {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) if l == want => return,
                Ok(_) => {}
                Err(_) => panic!("tail -f never showed {want:?}\n{}", m.d.diagnostics()),
            }
        }
    };
    expect_line("first line");
    let mut cat = Command::new("cat")
        .arg(m.p(&format!("jobs/{id}/stream")))
        .stdout(Stdio::piped())
        .spawn()
        .expect("cat");
    let mut cat_out = cat.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = cat_out.read_to_string(&mut s);
        s
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        cat.try_wait().unwrap().is_none(),
        "cat stream returned while the job runs"
    );
    assert_eq!(m.status(id), "RUNNING");
    gate.open();
    expect_line("second line");
    let st = wait_child(&mut cat, DEADLINE, "cat stream to return", || {
        m.d.diagnostics()
    });
    assert!(st.success());
    let streamed = reader.join().unwrap();
    assert_eq!(m.status(id), "SUCCEEDED", "cat returned before the end");
    assert_eq!(streamed, m.d.log(id));
    assert!(streamed.ends_with("third line\n"), "{streamed:?}");
    expect_line("third line");
    let _ = tail.kill();
    let _ = tail.wait();
    // Over: read at once.
    let t = Instant::now();
    assert_eq!(m.read(&format!("jobs/{id}/stream")), m.d.log(id));
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(fs::metadata(&log).unwrap().len(), m.d.log(id).len() as u64);
}

/// 100 threads reading `queue` and blocked on `stream` while a job runs do not stall a
/// submission: it completes while the stream readers still wait.
#[test]
fn many_readers_do_not_stall_a_submission() {
    let Some(m) = Mounted::start(&[]) else {
        return;
    };
    let s = m.d.scratch();
    let gate = Gate::new(&s, "busy");
    fs::write(s.join("busy.yaml"), gated("busy", "H100:2", &gate)).unwrap();
    let out = run(Command::new("cp")
        .arg(s.join("busy.yaml"))
        .arg(m.p("incoming/")));
    assert!(out.status.success(), "{}", text(&out));
    let busy = m.receipt_id("busy.yaml");
    m.expect_state(busy, "RUNNING");
    let stream = m.p(&format!("jobs/{busy}/stream"));
    let queue = m.p("queue");
    let streams_done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let queue_reads = Arc::new(AtomicUsize::new(0));
    let mut threads = Vec::new();
    for _ in 0..50 {
        let (p, done) = (stream.clone(), streams_done.clone());
        threads.push(std::thread::spawn(move || {
            let text = fs::read_to_string(&p).expect("read stream");
            done.fetch_add(1, Ordering::SeqCst);
            text
        }));
    }
    for _ in 0..50 {
        let (p, stop, n) = (queue.clone(), stop.clone(), queue_reads.clone());
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let t = fs::read_to_string(&p).expect("read queue");
                assert!(t.starts_with("ID"));
                n.fetch_add(1, Ordering::SeqCst);
            }
            String::new()
        }));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(streams_done.load(Ordering::SeqCst), 0);
    let t = Instant::now();
    fs::write(s.join("quick.yaml"), "name: quick\nrun: echo quick\n").unwrap();
    let out = run(Command::new("cp")
        .arg(s.join("quick.yaml"))
        .arg(m.p("incoming/")));
    let took = t.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    let quick = m.receipt_id("quick.yaml");
    assert!(
        took < Duration::from_secs(5),
        "the submission took {took:?}"
    );
    assert_eq!(
        streams_done.load(Ordering::SeqCst),
        0,
        "stream readers returned while the job runs"
    );
    assert!(queue_reads.load(Ordering::SeqCst) > 0);
    m.d.wait_done(quick, "SUCCEEDED");
    // Every stream reader gets the whole output when the job ends.
    gate.open();
    m.d.wait_done(busy, "SUCCEEDED");
    stop.store(true, Ordering::SeqCst);
    let log = m.d.log(busy);
    let deadline = Instant::now() + DEADLINE;
    for (i, t) in threads.into_iter().enumerate() {
        while !t.is_finished() {
            assert!(Instant::now() < deadline, "reader {i} never returned");
            std::thread::sleep(Duration::from_millis(10));
        }
        let got = t.join().expect("reader panicked");
        if i < 50 {
            assert_eq!(got, log);
        }
    }
}

/// A daemon killed with SIGKILL leaves a dead mount (ENOTCONN); the next start clears it
/// and mounts again, with everything still there.
#[test]
fn killed_daemon_mount_is_cleaned_and_remounted() {
    let Some(mut m) = Mounted::start(&[]) else {
        return;
    };
    let s = m.d.scratch();
    fs::write(s.join("one.yaml"), "name: one\nrun: echo one\n").unwrap();
    let out = run(Command::new("cp")
        .arg(s.join("one.yaml"))
        .arg(m.p("incoming/")));
    assert!(out.status.success(), "{}", text(&out));
    let id = m.receipt_id("one.yaml");
    m.d.wait_done(id, "SUCCEEDED");
    m.d.kill9();
    let err = fs::metadata(m.root()).expect_err("the mount survived its daemon");
    assert_eq!(err.raw_os_error(), Some(libc::ENOTCONN), "{err}");
    m.d.spawn();
    m.wait_mounted();
    assert_eq!(m.status(id), "SUCCEEDED");
    assert_eq!(m.queue_status(id).as_deref(), Some("SUCCEEDED"));
    assert_eq!(m.read(&format!("jobs/{id}/log")), "one\n");
    fs::write(s.join("two.yaml"), "name: two\nrun: echo two\n").unwrap();
    let out = run(Command::new("cp")
        .arg(s.join("two.yaml"))
        .arg(m.p("incoming/")));
    assert!(out.status.success(), "{}", text(&out));
    let two = m.receipt_id("two.yaml");
    assert!(two > id);
    m.d.wait_done(two, "SUCCEEDED");
    // A clean stop unmounts.
    m.d.stop();
    assert!(!m.p("queue").exists(), "still mounted after SIGTERM");
}

/// From another machine through sshfs (here: over ssh to 127.0.0.2, the same host): the
/// mount works as a remote filesystem. sshfs cannot carry a close() error back (its release
/// is asynchronous), so a rejection shows as the reason file, not as cp's exit code.
#[test]
fn sshfs_from_another_machine() {
    let Some(m) = Mounted::start(&[]) else {
        return;
    };
    if !have_program("sshfs") {
        skip("sshfs is not installed: the mount over sshfs is not tested");
        return;
    }
    if !ssh_reachable() {
        skip("no ssh to root@127.0.0.2 (scripts/test-sshd): sshfs not tested");
        return;
    }
    let remote = MountDir::new();
    let out = run(Command::new("sshfs")
        .arg("-o")
        .arg(format!(
            "IdentityFile={SSH_KEY},StrictHostKeyChecking=no,UserKnownHostsFile=/dev/null,BatchMode=yes"
        ))
        .arg(format!("root@127.0.0.2:{}", m.root().display()))
        .arg(remote.dir.path()));
    assert!(out.status.success(), "sshfs: {}", text(&out));
    let r = remote.dir.path();
    let s = m.d.scratch();
    let good = s.join("good.yaml");
    fs::write(&good, "run: echo via-sshfs\n").unwrap();
    let out = run(Command::new("cp").arg(&good).arg(r.join("incoming/")));
    assert!(out.status.success(), "{}", text(&out));
    // sshfs sends the close to the server after cp's close() has returned, so the file
    // may still read as what was written until the server's close has submitted it.
    let receipt_path = r.join("incoming/good.yaml");
    let receipt_id = || -> Option<u64> {
        let text = fs::read_to_string(&receipt_path).ok()?;
        text.trim().strip_prefix("job ")?.parse().ok()
    };
    wait_until(
        DEADLINE,
        "the receipt to show through sshfs",
        || receipt_id().is_some(),
        || {
            format!(
                "incoming/good.yaml: {:?}\n{}",
                fs::read_to_string(&receipt_path),
                m.d.diagnostics()
            )
        },
    );
    let Some(id) = receipt_id() else {
        panic!(
            "the receipt went away: {:?}",
            fs::read_to_string(&receipt_path)
        );
    };
    m.d.wait_done(id, "SUCCEEDED");
    assert_eq!(
        fs::read_to_string(r.join(format!("jobs/{id}/status"))).unwrap(),
        "SUCCEEDED\n"
    );
    assert_eq!(
        fs::read_to_string(r.join(format!("jobs/{id}/log"))).unwrap(),
        "via-sshfs\n"
    );
    let bad = s.join("bad.yaml");
    fs::write(&bad, BAD).unwrap();
    let _ = run(Command::new("cp").arg(&bad).arg(r.join("incoming/")));
    let reason_path = r.join("incoming/bad.yaml.reason");
    wait_until(
        DEADLINE,
        "the reason to show through sshfs",
        || reason_path.exists(),
        || m.d.diagnostics(),
    );
    let reason = fs::read_to_string(&reason_path).unwrap();
    assert!(reason.contains("acelerators"), "{reason}");
    let _ = nix::mount::umount2(r, nix::mount::MntFlags::MNT_DETACH);
}
