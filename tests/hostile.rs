//! Hostile input through the spool. The daemon may run as root, so whatever a user puts in
//! `incoming/` (or in a job directory) must be rejected with a readable reason in
//! `rejected/NAME.reason` (or left alone, where `spool-layout.md` says so), must not make
//! the daemon read, write, follow or block on anything outside the spool, and must not stop
//! it serving: after every case a good job is submitted and must be admitted and SUCCEED.
mod common;
use common::*;
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------ helpers

/// A good job, submitted right after a hostile case: it must be admitted (exactly one new
/// job, from the file just dropped) and SUCCEED with the expected output.
fn still_serves(d: &mut Daemon, tag: &str) -> u64 {
    assert!(
        d.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none()),
        "the daemon exited\n{}",
        d.diagnostics()
    );
    let name = format!("good-{tag}.yaml");
    let before = d.job_ids();
    let id = d.submit_new(&name, &format!("name: good-{tag}\nrun: echo alive-{tag}\n"));
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(
        d.log(id),
        format!("alive-{tag}\n"),
        "job {id}\n{}",
        d.diagnostics()
    );
    assert_eq!(
        d.info(id)["source"],
        serde_json::json!(format!("incoming/{name}"))
    );
    let after = d.job_ids();
    assert_eq!(
        after.len(),
        before.len() + 1,
        "more than one job appeared ({before:?} -> {after:?})\n{}",
        d.diagnostics()
    );
    id
}

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// Builds an entry with `make` in the scratch directory (same filesystem), then renames it
/// to `incoming/NAME`: one `MOVED_TO`, the way `mv`, `rsync` and `skyspool submit` arrive.
fn move_in(d: &Daemon, name: &OsStr, make: impl FnOnce(&Path)) {
    let tmp = d
        .scratch()
        .join(format!("mk-{}", SEQ.fetch_add(1, Ordering::SeqCst)));
    make(&tmp);
    fs::rename(&tmp, d.path("incoming").join(name)).expect("rename into incoming/");
}

/// Moves a regular file with these bytes into `incoming/NAME`.
fn drop_bytes(d: &Daemon, name: &OsStr, bytes: &[u8]) {
    move_in(d, name, |p| fs::write(p, bytes).expect("write"));
}

/// Waits for `rejected/SHOWN` and `rejected/SHOWN.reason`; returns the reason.
fn wait_rejected_as(d: &Daemon, shown: &str, timeout: Duration) -> Result<String, String> {
    let item = d.path("rejected").join(shown);
    let reason = d.path("rejected").join(format!("{shown}.reason"));
    let deadline = Instant::now() + timeout;
    loop {
        if fs::symlink_metadata(&item).is_ok() {
            if let Ok(r) = fs::read_to_string(&reason) {
                return Ok(r);
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "not rejected as rejected/{shown} within {timeout:?}; rejected/ holds {:?}, \
                 incoming/ holds {:?}",
                rejected_entries(d),
                d.incoming_names()
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn rejected_entries(d: &Daemon) -> BTreeSet<String> {
    fs::read_dir(d.path("rejected"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// A reason is readable: UTF-8 (it was read as a String), one paragraph ending in a newline,
/// no control characters, bounded, naming the submission, saying what is wrong (`any_of`,
/// case-insensitive), and echoing none of `forbidden`.
fn check_reason(
    reason: &str,
    shown: &str,
    any_of: &[&str],
    forbidden: &[&str],
) -> Result<(), String> {
    let mut problems = Vec::new();
    if !reason.ends_with('\n') {
        problems.push("does not end with a newline".to_string());
    }
    let body = reason.trim_end_matches('\n');
    if body.trim().is_empty() {
        problems.push("is empty".into());
    }
    if body.lines().any(|l| l.trim().is_empty()) {
        problems.push("is more than one paragraph (blank line)".into());
    }
    if let Some(c) = body
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        problems.push(format!("contains the control character {c:?}"));
    }
    if reason.len() > 4096 {
        problems.push(format!("is {} bytes long", reason.len()));
    }
    if !reason.contains(shown) {
        problems.push(format!("does not name the file ({shown})"));
    }
    // The file's name may hold the very words looked for: they must come from the text.
    let lower = reason.replace(shown, "").to_lowercase();
    if !any_of.is_empty() && !any_of.iter().any(|n| lower.contains(&n.to_lowercase())) {
        problems.push(format!("says none of {any_of:?}"));
    }
    for f in forbidden {
        if !f.is_empty() && reason.contains(f) {
            problems.push(format!("echoes {f:?}"));
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("reason {}: {reason:?}", problems.join(", ")))
    }
}

/// What the test can observe of one filesystem entry, without following links.
#[derive(Clone, Debug, PartialEq)]
struct Snap {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: (i64, i64),
    len: u64,
    content: Option<Vec<u8>>,
    link: Option<PathBuf>,
}

fn snap(p: &Path) -> Option<Snap> {
    let m = fs::symlink_metadata(p).ok()?;
    let ft = m.file_type();
    let kind = if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_socket() {
        "socket"
    } else {
        "other"
    };
    Some(Snap {
        kind,
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        mtime: (m.mtime(), m.mtime_nsec()),
        len: if ft.is_dir() { 0 } else { m.len() },
        content: if ft.is_file() { fs::read(p).ok() } else { None },
        link: if ft.is_symlink() {
            fs::read_link(p).ok()
        } else {
            None
        },
    })
}

/// [`snap_tree`] without directories' modification times (which move whenever the daemon
/// replaces a file in them atomically).
fn snap_tree_entries(root: &Path) -> BTreeMap<PathBuf, Snap> {
    let mut t = snap_tree(root);
    for s in t.values_mut() {
        if s.kind == "dir" {
            s.mtime = (0, 0);
        }
    }
    t
}

/// Every entry under `root` (links not followed), by path.
fn snap_tree(root: &Path) -> BTreeMap<PathBuf, Snap> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .into_iter()
        .flatten()
        .filter_map(|e| snap(e.path()).map(|s| (e.path().to_path_buf(), s)))
        .collect()
}

fn diff_trees(before: &BTreeMap<PathBuf, Snap>, after: &BTreeMap<PathBuf, Snap>) -> Vec<String> {
    let mut out = Vec::new();
    for (p, s) in before {
        match after.get(p) {
            None => out.push(format!("{} disappeared", p.display())),
            Some(a) if a != s => out.push(format!("{} changed: {s:?} -> {a:?}", p.display())),
            _ => {}
        }
    }
    for p in after.keys() {
        if !before.contains_key(p) {
            out.push(format!("{} appeared", p.display()));
        }
    }
    out
}

fn atime(p: &Path) -> (i64, i64) {
    let m = fs::symlink_metadata(p).expect("stat");
    (m.atime(), m.atime_nsec())
}

/// Sets a file's access time an hour before its modification time, so that (under
/// `relatime` or `strictatime`) any read of it moves the access time: a read detector.
fn arm_read_detector(p: &Path) {
    use nix::sys::stat::{utimensat, UtimensatFlags};
    use nix::sys::time::TimeSpec;
    let m = fs::symlink_metadata(p).expect("stat");
    let old = TimeSpec::new(m.mtime() - 3600, 0);
    let mtime = TimeSpec::new(m.mtime(), m.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        p,
        &old,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .expect("utimensat");
}

/// Whether reading a file moves its access time on this filesystem (not `noatime`).
fn reads_are_detectable(dir: &Path) -> bool {
    let p = dir.join("atime-probe");
    fs::write(&p, b"probe").unwrap();
    arm_read_detector(&p);
    let before = atime(&p);
    let _ = fs::read(&p);
    let after = atime(&p);
    let _ = fs::remove_file(&p);
    before != after
}

/// Whether anyone has the FIFO open for reading (a writer's non-blocking open fails with
/// ENXIO when there is no reader): the daemon must never open one.
fn fifo_has_reader(p: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .is_ok()
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o666)).expect("mkfifo");
}

/// One content case: a file `name` with `body`, to be rejected with a reason saying one of
/// `any_of`.
struct Bad {
    name: String,
    body: Vec<u8>,
    any_of: Vec<&'static str>,
}

fn bad(name: &str, body: impl Into<Vec<u8>>, any_of: &[&'static str]) -> Bad {
    Bad {
        name: name.to_string(),
        body: body.into(),
        any_of: any_of.to_vec(),
    }
}

/// Drops each case; checks it is rejected, unchanged, with a readable reason, that no job
/// came of it, and that a good job right after it still runs. All failures are reported
/// together.
fn run_rejections(d: &mut Daemon, cases: &[Bad], rejection_time_limit: Duration) {
    let mut failures = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let jobs_before = d.job_ids();
        let failed_before = failures.len();
        let t0 = Instant::now();
        drop_bytes(d, OsStr::new(&c.name), &c.body);
        // Rejected, or (wrongly) admitted: whichever shows first.
        let status_of_new = |d: &Daemon| {
            d.job_ids()
                .into_iter()
                .find(|i| !jobs_before.contains(i) && d.job(*i).join("status").exists())
        };
        let deadline = Instant::now() + DEADLINE;
        while status_of_new(d).is_none()
            && !d
                .path("rejected")
                .join(format!("{}.reason", c.name))
                .exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        let outcome = match status_of_new(d) {
            Some(id) => Err(format!("admitted as job {id}, not rejected")),
            None => wait_rejected_as(d, &c.name, Duration::from_secs(1)),
        };
        match outcome {
            Err(e) => failures.push(format!("{}: {e}", c.name)),
            Ok(reason) => {
                let took = t0.elapsed();
                if took > rejection_time_limit {
                    failures.push(format!("{}: rejection took {took:?}", c.name));
                }
                if let Err(e) = check_reason(&reason, &c.name, &c.any_of, &[]) {
                    failures.push(format!("{}: {e}", c.name));
                }
                match fs::read(d.path("rejected").join(&c.name)) {
                    Ok(kept) if kept == c.body => {}
                    Ok(_) => failures.push(format!("{}: rejected copy differs", c.name)),
                    Err(e) => failures.push(format!("{}: rejected copy unreadable: {e}", c.name)),
                }
            }
        }
        if failures.len() == failed_before && d.job_ids() != jobs_before {
            failures.push(format!(
                "{}: a job was admitted ({:?} -> {:?})",
                c.name,
                jobs_before,
                d.job_ids()
            ));
        }
        for f in &failures[failed_before..] {
            eprintln!("FAILED: {f}");
        }
        still_serves(d, &format!("after{i}"));
    }
    let staged = staged_submissions(&d.path(".skyspool/staging"));
    if !staged.is_empty() {
        failures.push(format!("staging/ not empty: {staged:?}"));
    }
    // The daemon's log repeats each reason: no raw control character (terminal escapes,
    // forged lines) may reach it either.
    for l in d.daemon_log().lines() {
        if l.chars().any(|c| c.is_control() && c != '\t') {
            failures.push(format!("daemon log line with a control character: {l:?}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} failure(s):\n{}\n{}",
        failures.len(),
        failures.join("\n"),
        d.diagnostics()
    );
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

// ------------------------------------------------------------------- file types

/// A symbolic link moved into incoming/ is rejected without being followed: its target (a
/// file outside the spool, and /etc/shadow when running as root) is neither read nor
/// changed, and the reason does not echo its content.
#[test]
fn symlink_to_a_file_outside_the_spool_is_rejected_unread() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let outside = s.join("outside");
    fs::create_dir(&outside).unwrap();
    let secret = outside.join("secret.yaml");
    // If it were ever parsed, this name would be echoed in the error ("not a valid task name").
    let marker = "TOPSECRET_7f3a9 value!";
    fs::write(&secret, format!("name: {marker}\nrun: echo leaked\n")).unwrap();
    let detect = reads_are_detectable(&s);
    let tree = snap_tree(&outside);
    if detect {
        arm_read_detector(&secret);
    }
    let secret_atime = atime(&secret);
    let shadow = Path::new("/etc/shadow");
    let shadow_before = if is_root() { snap(shadow) } else { None };

    move_in(&d, OsStr::new("secret.yaml"), |p| {
        std::os::unix::fs::symlink(&secret, p).unwrap()
    });
    move_in(&d, OsStr::new("shadow.yaml"), |p| {
        std::os::unix::fs::symlink(shadow, p).unwrap()
    });
    move_in(&d, OsStr::new("relative.yaml"), |p| {
        std::os::unix::fs::symlink("../../scratch/outside/secret.yaml", p).unwrap()
    });
    for (name, target) in [
        ("secret.yaml", secret.clone()),
        ("shadow.yaml", shadow.to_path_buf()),
        (
            "relative.yaml",
            PathBuf::from("../../scratch/outside/secret.yaml"),
        ),
    ] {
        let reason = wait_rejected_as(&d, name, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        let mut forbidden = vec![marker, "TOPSECRET"];
        let shadow_text = if is_root() {
            fs::read_to_string(shadow).unwrap_or_default()
        } else {
            String::new()
        };
        forbidden.extend(
            shadow_text
                .lines()
                .filter_map(|l| l.split(':').nth(1))
                .filter(|h| h.len() > 3),
        );
        check_reason(&reason, name, &["symbolic link"], &forbidden)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let kept = d.path("rejected").join(name);
        assert!(
            fs::symlink_metadata(&kept)
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name}: rejected/ must hold the link itself"
        );
        assert_eq!(
            fs::read_link(&kept).unwrap(),
            target,
            "{name}: link changed"
        );
    }
    still_serves(&mut d, "a");
    assert_eq!(d.job_ids(), vec![1], "{}", d.diagnostics());
    if detect {
        assert_eq!(atime(&secret), secret_atime, "the link's target was read");
    }
    assert_eq!(
        diff_trees(&tree, &snap_tree(&outside)),
        Vec::<String>::new()
    );
    if let Some(before) = shadow_before {
        assert_eq!(snap(shadow), Some(before), "/etc/shadow changed");
    }
    assert!(!d.daemon_log().contains("TOPSECRET"), "{}", d.daemon_log());
    assert!(!d.log(1).contains("leaked"));
}

/// Links to another job's directory or files, and to a directory holding a job, are
/// rejected: the other job is untouched, the directory is neither moved nor run.
#[test]
fn symlink_to_a_job_directory_or_any_directory_is_rejected() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let first = still_serves(&mut d, "first");
    let job_tree = snap_tree(&d.job(first));

    // A directory outside the spool that looks like a job directory.
    let victim = s.join("victim");
    fs::create_dir(&victim).unwrap();
    let ran = s.join("victim-ran");
    fs::write(
        victim.join("job.yaml"),
        format!("name: victim\nrun: touch {}\n", sh_quote(&ran)),
    )
    .unwrap();
    fs::write(victim.join("data.bin"), b"precious").unwrap();
    let victim_tree = snap_tree(&victim);

    let job_dir = d.job(first);
    let cases: Vec<(&str, PathBuf)> = vec![
        ("steal", PathBuf::from(format!("../jobs/{first}"))),
        ("steal-abs", job_dir.clone()),
        ("steal-yaml.yaml", job_dir.join("job.yaml")),
        ("steal-status.yaml", job_dir.join("status")),
        ("dirlink", victim.clone()),
        ("dirlink.yaml", victim.clone()),
        ("private", d.path(".skyspool")),
        ("root", PathBuf::from("/")),
        ("dangling.yaml", s.join("does-not-exist")),
        ("loop.yaml", PathBuf::from("loop.yaml")),
    ];
    for (name, target) in &cases {
        move_in(&d, OsStr::new(name), |p| {
            std::os::unix::fs::symlink(target, p).unwrap()
        });
    }
    let mut failures = Vec::new();
    for (name, target) in &cases {
        match wait_rejected_as(&d, name, DEADLINE) {
            Err(e) => failures.push(e),
            Ok(reason) => {
                if let Err(e) = check_reason(&reason, name, &["symbolic link"], &["precious"]) {
                    failures.push(format!("{name}: {e}"));
                }
                if fs::read_link(d.path("rejected").join(name)).ok().as_ref() != Some(target) {
                    failures.push(format!("{name}: the rejected link is not the link sent"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    let next = still_serves(&mut d, "b");
    assert_eq!(d.job_ids(), vec![first, next], "{}", d.diagnostics());
    assert_eq!(d.status(first), "SUCCEEDED");
    assert!(d.path("done").join(first.to_string()).exists());
    assert_eq!(
        diff_trees(&job_tree, &snap_tree(&d.job(first))),
        Vec::<String>::new(),
        "the other job's directory changed"
    );
    assert_eq!(
        diff_trees(&victim_tree, &snap_tree(&victim)),
        Vec::<String>::new(),
        "the linked directory changed"
    );
    assert!(!ran.exists(), "the linked directory's job ran");
    assert!(d.path(".skyspool").is_dir());
}

/// A hard link to a file outside the spool is rejected: the reason says so, does not echo
/// the file's content, and the file is unchanged (and, where detectable, unread).
#[test]
fn hard_link_to_a_file_outside_the_spool_is_rejected_unread() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let outside = s.join("outside");
    fs::create_dir(&outside).unwrap();
    let secret = outside.join("private.yaml");
    let marker = "HARDSECRET_91c2 value!";
    fs::write(&secret, format!("name: {marker}\nrun: echo leaked\n")).unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let valid = outside.join("valid.yaml");
    let ran = s.join("valid-ran");
    fs::write(&valid, format!("run: touch {}\n", sh_quote(&ran))).unwrap();
    let detect = reads_are_detectable(&s);
    // The link is made at a dot-name (ignored), then renamed: one MOVED_TO.
    let tmp = d.path("incoming").join(".hard.tmp");
    fs::hard_link(&secret, &tmp).unwrap();
    let tree = snap_tree(&outside);
    if detect {
        arm_read_detector(&secret);
    }
    let a = atime(&secret);
    fs::rename(&tmp, d.path("incoming").join("hard.yaml")).unwrap();
    // A second link, to a valid job this time: rejected just the same.
    let tmp2 = d.path("incoming").join(".hard2.tmp");
    fs::hard_link(&valid, &tmp2).unwrap();
    fs::rename(&tmp2, d.path("incoming").join("hard2.yaml")).unwrap();

    for name in ["hard.yaml", "hard2.yaml"] {
        let reason = wait_rejected_as(&d, name, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        check_reason(&reason, name, &["hard link"], &[marker, "HARDSECRET"])
            .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    still_serves(&mut d, "a");
    assert_eq!(d.job_ids(), vec![1], "{}", d.diagnostics());
    assert!(!ran.exists(), "a hard-linked job ran");
    if detect {
        assert_eq!(atime(&secret), a, "the hard-linked file was read");
    }
    // (Renaming a link changes no file; only the inode's ctime may move.)
    assert_eq!(
        diff_trees(&tree, &snap_tree(&outside)),
        Vec::<String>::new()
    );
    assert_eq!(
        fs::read_to_string(&secret).unwrap(),
        format!("name: {marker}\nrun: echo leaked\n")
    );
    assert!(!d.daemon_log().contains("HARDSECRET"));
}

/// FIFOs are never opened: one moved in, one made in place (no event: found by nobody
/// until a rescan), and one as `job.yaml` of a directory submission. The daemon does not
/// block on any of them.
#[test]
fn fifos_are_never_opened_and_never_block_the_daemon() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let dog = Watchdog::arm(&d, Duration::from_secs(90));
    move_in(&d, OsStr::new("pipe.yaml"), mkfifo);
    move_in(&d, OsStr::new("pipe-noext"), mkfifo);
    move_in(&d, OsStr::new("fifodir"), |p| {
        fs::create_dir(p).unwrap();
        mkfifo(&p.join("job.yaml"));
        fs::write(p.join("data"), b"x").unwrap();
    });
    mkfifo(&d.path("incoming").join("inplace.yaml"));
    for (name, words) in [
        ("pipe.yaml", &["fifo", "not a regular file"][..]),
        ("pipe-noext", &["fifo", "not a regular file"][..]),
        ("fifodir", &["job.yaml", "regular file"][..]),
    ] {
        let reason = wait_rejected_as(&d, name, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        check_reason(&reason, name, words, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    still_serves(&mut d, "a");
    for p in [
        d.path("rejected/pipe.yaml"),
        d.path("rejected/pipe-noext"),
        d.path("rejected/fifodir/job.yaml"),
        d.path("incoming/inplace.yaml"),
    ] {
        assert!(
            fs::symlink_metadata(&p).unwrap().file_type().is_fifo(),
            "{} is no longer the FIFO",
            p.display()
        );
        assert!(!fifo_has_reader(&p), "someone holds {} open", p.display());
    }
    // A restart finds the FIFO made in place: rejected, still not opened.
    d.stop();
    d.spawn();
    let dog2 = Watchdog::arm(&d, Duration::from_secs(60));
    let reason = wait_rejected_as(&d, "inplace.yaml", DEADLINE).unwrap_or_else(|e| panic!("{e}"));
    check_reason(&reason, "inplace.yaml", &["fifo"], &[]).unwrap();
    assert!(!fifo_has_reader(&d.path("rejected/inplace.yaml")));
    still_serves(&mut d, "b");
    assert_eq!(d.job_ids(), vec![1, 2]);
    dog.disarm();
    dog2.disarm();
}

/// A unix socket (and, as root, character devices) moved in are rejected unopened.
#[test]
fn sockets_and_devices_are_rejected_unopened() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let dog = Watchdog::arm(&d, Duration::from_secs(90));
    let s = d.scratch();
    let sock_path = s.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock_path).unwrap();
    listener.set_nonblocking(true).unwrap();
    fs::rename(&sock_path, d.path("incoming/sock.yaml")).unwrap();
    let mut names = vec!["sock.yaml"];
    if is_root() {
        use nix::sys::stat::{makedev, mknod, Mode, SFlag};
        // /dev/zero (endless) and /dev/tty (would block or hijack a terminal).
        for (name, major, minor) in [("zero.yaml", 1, 5), ("tty.yaml", 5, 0)] {
            move_in(&d, OsStr::new(name), |p| {
                mknod(
                    p,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o666),
                    makedev(major, minor),
                )
                .unwrap()
            });
            names.push(name);
        }
    }
    for name in &names {
        let reason = wait_rejected_as(&d, name, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        check_reason(
            &reason,
            name,
            &["not a regular file", "socket", "device"],
            &[],
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the socket was connected to: {other:?}"),
    }
    still_serves(&mut d, "a");
    assert_eq!(d.job_ids(), vec![1]);
    dog.disarm();
}

// ------------------------------------------------------------------------ names

/// Names with newlines, control characters (terminal escapes included) or invalid UTF-8
/// are rejected, and land in rejected/ under a sanitized name: one printable component. No
/// raw control character reaches the reason, the daemon's log or the queue.
#[test]
fn hostile_names_are_rejected_under_sanitized_names() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let job = format!("run: touch {}\n", sh_quote(&ran));
    let cases: Vec<(&[u8], &str, &str)> = vec![
        (b"bad\nname.yaml", "bad_name.yaml", "control"),
        (
            b"ctl\x07\x1b[2J\x1b]0;pwn\x07.yaml",
            "ctl__[2J_]0;pwn_.yaml",
            "control",
        ),
        (b"cr\r.yaml", "cr_.yaml", "control"),
        (b"del\x7f.yaml", "del_.yaml", "control"),
        (b"tab\there.yaml", "tab_here.yaml", "control"),
        (b"\n.yaml", "_.yaml", "control"),
        ("nel\u{85}.yaml".as_bytes(), "nel_.yaml", "control"),
        (b"inv\xff\xfeX.yaml", "inv__X.yaml", "UTF-8"),
        (b"latin1-caf\xe9.yaml", "latin1-caf_.yaml", "UTF-8"),
        (b"\xc0\xaf.yaml", "__.yaml", "UTF-8"),
    ];
    for (raw, _, _) in &cases {
        drop_bytes(&d, OsStr::from_bytes(raw), job.as_bytes());
    }
    let mut failures = Vec::new();
    for (raw, shown, why) in &cases {
        match wait_rejected_as(&d, shown, DEADLINE) {
            Err(e) => failures.push(format!("{:?}: {e}", String::from_utf8_lossy(raw))),
            Ok(reason) => {
                if let Err(e) = check_reason(&reason, shown, &[why], &[]) {
                    failures.push(format!("{shown}: {e}"));
                }
                if fs::read(d.path("rejected").join(shown)).ok().as_deref() != Some(job.as_bytes())
                {
                    failures.push(format!("{shown}: content changed"));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        d.diagnostics()
    );
    still_serves(&mut d, "a");
    assert_eq!(d.job_ids(), vec![1]);
    assert!(!ran.exists(), "a job with a hostile name ran");
    // Every name in rejected/ is printable UTF-8; nothing is left in incoming/.
    for e in fs::read_dir(d.path("rejected")).unwrap().flatten() {
        let n = e.file_name();
        let t = n
            .to_str()
            .unwrap_or_else(|| panic!("rejected/{n:?} is not UTF-8"));
        assert!(!t.chars().any(char::is_control), "rejected/{t:?}");
    }
    assert_eq!(d.incoming_names(), Vec::<String>::new());
    std::thread::sleep(Duration::from_millis(200));
    for (what, text) in [("daemon log", d.daemon_log()), ("queue", d.queue())] {
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t'),
            "a control character reached the {what}: {text:?}"
        );
    }
}

/// The contract's ignored names (leading `.` or `#`, trailing `~`, `.swp`, `.swx`, `.tmp`,
/// `.part`, `.partial`) are left alone whatever else the name holds (invalid UTF-8, control
/// characters): an editor's autosave of a Latin-1 named file must not be moved away. Also at
/// start-up.
#[test]
fn ignored_names_are_left_alone_even_when_not_utf8() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let names: Vec<&[u8]> = vec![
        b"#caf\xe9.yaml#",
        b"caf\xe9.yaml~",
        b"x\xff.swp",
        b"x\xff.swx",
        b"x\xff.tmp",
        b"x\xff.part",
        b"x\xff.partial",
        b".caf\xe9.yaml",
        b"#ctl\x1b.yaml#",
        b"ctl\n.yaml~",
        b"ok.yaml~",
        b"#ok.yaml#",
        b".hidden.yaml",
    ];
    for n in &names {
        drop_bytes(&d, OsStr::from_bytes(n), b"run: echo should-not-run\n");
    }
    still_serves(&mut d, "a");
    d.stop();
    d.spawn();
    still_serves(&mut d, "b");
    let mut failures = Vec::new();
    for n in &names {
        let p = d.path("incoming").join(OsStr::from_bytes(n));
        if fs::symlink_metadata(&p).is_err() {
            failures.push(format!(
                "{:?} was moved out of incoming/ (it is an ignored name)",
                String::from_utf8_lossy(n)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{}\nrejected/: {:?}\n{}",
        failures.join("\n"),
        rejected_entries(&d),
        d.daemon_log()
    );
    assert_eq!(d.job_ids(), vec![1, 2]);
}

// ------------------------------------------------------------------ YAML content

/// The billion-laughs alias bomb.
fn alias_bomb() -> String {
    let mut y = String::from(
        "a0: &a0 [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        let list = [prev.as_str(); 9].join(",");
        y.push_str(&format!("a{i}: &a{i} [{list}]\n"));
    }
    y.push_str("run: echo *a9\nenvs:\n  X: *a9\n");
    y
}

/// Pseudo-random bytes (xorshift; deterministic).
fn garbage(n: usize, mut seed: u64) -> Vec<u8> {
    (0..n)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 24) as u8
        })
        .collect()
}

/// Oversized, deeply nested, alias bombs, binary garbage, empty files, documents that are
/// not mappings, duplicate keys, multiple documents, unsupported tags: each is rejected
/// quickly, unchanged, with a readable reason, and the daemon keeps serving.
#[test]
fn malformed_yaml_is_rejected_with_a_readable_reason() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let mut big = String::from("run: echo big\n");
    while big.len() <= 1024 * 1024 {
        big.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    let mut nul_text = b"run: echo a\n".to_vec();
    nul_text.extend_from_slice(b"envs:\n  X: \"a\0b\"\n");
    let mut deep_block = String::new();
    // As deep as fits in 1 MiB (the indentation grows by one per level).
    for i in 0..1400 {
        deep_block.push_str(&" ".repeat(i));
        deep_block.push_str("- \n");
    }
    let mut deep_map = String::new();
    for i in 0..1400 {
        deep_map.push_str(&" ".repeat(i));
        deep_map.push_str("k:\n");
    }
    let cases = vec![
        bad(
            "oversized.yaml",
            big.clone(),
            &["1048576", "at most", "1 MiB"],
        ),
        bad(
            "deep-flow.yaml",
            format!("run: {}", "[".repeat(10_000)),
            &["nested", "deep", "depth"],
        ),
        bad(
            "deep-flow-map.yaml",
            format!("run: {}", "{a: ".repeat(10_000)),
            &["nested", "deep", "depth"],
        ),
        bad("deep-block.yaml", deep_block, &["nested", "deep", "depth"]),
        bad("deep-map.yaml", deep_map, &["nested", "deep", "depth"]),
        bad("alias-bomb.yaml", alias_bomb(), &["alias", "anchor"]),
        bad(
            "garbage.yaml",
            garbage(4096, 0x9e3779b97f4a7c15),
            &["UTF-8", "binary", "control"],
        ),
        bad("nul.yaml", nul_text, &["NUL", "binary", "control"]),
        bad("empty.yaml", "", &["empty"]),
        bad("comments.yaml", "# nothing\n# here\n", &["empty"]),
        bad(
            "list.yaml",
            "- run: echo a\n- run: echo b\n",
            &["list", "mapping"],
        ),
        bad("scalar.yaml", "echo hello\n", &["string", "mapping"]),
        bad("number.yaml", "42\n", &["integer", "mapping"]),
        bad("dup.yaml", "run: echo a\nrun: echo b\n", &["duplicate"]),
        bad(
            "dup-nested.yaml",
            "run: x\nresources:\n  cpus: 1\n  cpus: 2\n",
            &["duplicate"],
        ),
        bad(
            "multidoc.yaml",
            "run: echo a\n---\nrun: echo b\n",
            &["more than one", "document"],
        ),
        bad(
            "python-tag.yaml",
            "run: !!python/object/apply:os.system [\"id\"]\n",
            &["tag", "yaml"],
        ),
        bad(
            "binary-tag.yaml",
            "run: !!binary aGVsbG8=\n",
            &["binary", "tag"],
        ),
        bad(
            "unclosed.yaml",
            "run: \"echo\n",
            &["yaml", "quot", "scalar"],
        ),
        bad("tabs.yaml", "run:\n\t- echo\n", &["yaml", "tab"]),
        // Control characters written as YAML escapes in keys: the reason (and the daemon's
        // log) must not carry them raw (terminal escapes, line breaks).
        bad(
            "esc-key.yaml",
            "resources:\n  \"x\\e[2J\\e[Hevil\\nline\": 1\nrun: x\n",
            &["resources"],
        ),
        bad(
            "esc-path.yaml",
            "resources:\n  labels:\n    \"a\\e]0;pwn\\a\\nb\":\n      ~: 1\nrun: x\n",
            &["key"],
        ),
        bad("esc-top-key.yaml", "\"ru\\bn\\r\": x\n", &["unknown"]),
        bad(
            "huge-int.yaml",
            format!("num_nodes: {}\nrun: x\n", "9".repeat(400)),
            &["num_nodes"],
        ),
        bad("bom-list.yaml", "\u{feff}- a\n", &["list", "mapping"]),
        bad(
            "not-utf16.yaml",
            b"\xff\xfer\x00u\x00n\x00:\x00".to_vec(),
            &["UTF-8"],
        ),
    ];
    // Rejections are cheap: the parser's limits stop each well within a few seconds even in
    // a debug build on a busy 2-core machine.
    run_rejections(&mut d, &cases, Duration::from_secs(10));

    // 1 MiB exactly is still accepted (the limit is inclusive).
    let mut exact = String::from("run: echo exact\n");
    let pad = "# padding\n";
    while exact.len() + pad.len() < 1024 * 1024 {
        exact.push_str(pad);
    }
    exact.push_str(&"#".repeat(1024 * 1024 - exact.len() - 1));
    exact.push('\n');
    assert_eq!(exact.len(), 1024 * 1024);
    let id = d.submit_new("exact.yaml", &exact);
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(d.log(id), "exact\n");

    // A directory whose job.yaml is oversized (never read whole) or a link.
    let s = d.scratch();
    let outside = s.join("linked-job.yaml");
    fs::write(&outside, "run: echo linked\n").unwrap();
    move_in(&d, OsStr::new("bigdir"), |p| {
        fs::create_dir(p).unwrap();
        fs::write(p.join("job.yaml"), &big).unwrap();
    });
    move_in(&d, OsStr::new("linkdir"), |p| {
        fs::create_dir(p).unwrap();
        std::os::unix::fs::symlink(&outside, p.join("job.yaml")).unwrap();
    });
    move_in(&d, OsStr::new("nojob"), |p| {
        fs::create_dir(p).unwrap();
        fs::write(p.join("README"), "no job here").unwrap();
    });
    move_in(&d, OsStr::new("dirjob"), |p| {
        fs::create_dir(p).unwrap();
        fs::create_dir(p.join("job.yaml")).unwrap();
    });
    for (name, words) in [
        ("bigdir", &["1048576", "at most", "larger"][..]),
        ("linkdir", &["regular file", "link"][..]),
        ("nojob", &["no job.yaml"][..]),
        ("dirjob", &["regular file"][..]),
    ] {
        let reason = wait_rejected_as(&d, name, DEADLINE).unwrap_or_else(|e| panic!("{e}"));
        check_reason(&reason, name, words, &[]).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert_eq!(fs::read_to_string(&outside).unwrap(), "run: echo linked\n");
    still_serves(&mut d, "dirs");
}

/// `name:` with path components is refused; `workdir:` pointing outside is never used as
/// the job's directory for a job that did not submit it.
#[test]
fn names_and_workdirs_that_escape_are_refused_or_contained() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let cases = vec![
        bad(
            "name-dotdot.yaml",
            "name: ../evil\nrun: echo x\n",
            &["name"],
        ),
        bad(
            "name-deep.yaml",
            "name: ../../../../tmp/evil\nrun: echo x\n",
            &["name"],
        ),
        bad("name-slash.yaml", "name: a/b\nrun: echo x\n", &["name"]),
        bad(
            "name-abs.yaml",
            "name: /etc/passwd\nrun: echo x\n",
            &["name"],
        ),
        bad("name-dots.yaml", "name: \"..\"\nrun: echo x\n", &["name"]),
        bad("name-nl.yaml", "name: \"a\\nb\"\nrun: echo x\n", &["name"]),
        bad(
            "name-esc.yaml",
            "name: \"a\\e[2Jb\"\nrun: echo x\n",
            &["name"],
        ),
        bad("name-list.yaml", "name: [a, b]\nrun: echo x\n", &["name"]),
    ];
    run_rejections(&mut d, &cases, Duration::from_secs(10));
    assert!(!d.tmp.path().join("evil").exists());
    assert!(!Path::new("/tmp/evil").exists() || !is_root());

    // workdir: ../../etc in a plain YAML: either refused, or the job runs somewhere that is
    // not /etc (skyspool runs it in the user's home with a note).
    let before = d.job_ids();
    d.drop_yaml("wd.yaml", "name: wd\nworkdir: ../../etc\nrun: pwd\n");
    let mut outcome = None;
    wait_until(
        DEADLINE,
        "wd.yaml to be admitted or rejected",
        || {
            if d.path("rejected/wd.yaml.reason").exists() {
                outcome = Some(None);
            } else if let Some(id) = d.job_ids().into_iter().find(|i| !before.contains(i)) {
                if d.job(id).join("status").exists() {
                    outcome = Some(Some(id));
                }
            }
            outcome.is_some()
        },
        || d.diagnostics(),
    );
    match outcome.unwrap() {
        None => {
            let reason = fs::read_to_string(d.path("rejected/wd.yaml.reason")).unwrap();
            check_reason(&reason, "wd.yaml", &["workdir"], &[]).unwrap();
        }
        Some(id) => {
            d.wait_done(id, "SUCCEEDED");
            let log = d.log(id);
            let pwd = log.lines().last().unwrap_or_default();
            assert_ne!(pwd, "/etc", "{log}");
            assert!(
                !Path::new(pwd).starts_with("/etc"),
                "the job ran in {pwd}\n{log}"
            );
            assert!(log.contains("workdir"), "no note about the workdir: {log}");
        }
    }
    // The same in a directory submission: the job runs in its own submitted workdir.
    move_in(&d, OsStr::new("wddir"), |p| {
        fs::create_dir(p).unwrap();
        fs::write(
            p.join("job.yaml"),
            "name: wddir\nworkdir: ../../etc\nrun: pwd\n",
        )
        .unwrap();
    });
    let id = (*d.job_ids().last().unwrap()) + 1;
    d.wait_admitted(id);
    d.wait_done(id, "SUCCEEDED");
    let expect = fs::canonicalize(d.job(id)).unwrap().join("workdir");
    assert_eq!(
        d.log(id).trim_end(),
        expect.display().to_string(),
        "{}",
        d.diagnostics()
    );
    still_serves(&mut d, "end");
}

/// Nonsense resources: negative, zero, absurd, too precise, NaN/inf counts; impossible
/// node counts; accelerators the cluster does not have.
#[test]
fn nonsense_resources_are_rejected() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let acc = |v: &str| format!("resources:\n  accelerators: {v}\nrun: echo x\n");
    let cases = vec![
        bad("gpu-neg.yaml", acc("H100:-1"), &["H100", "accelerator"]),
        bad("gpu-zero.yaml", acc("H100:0"), &["H100", "accelerator"]),
        bad("gpu-1e9.yaml", acc("H100:1e9"), &["H100", "accelerator"]),
        bad(
            "gpu-1e400.yaml",
            acc("H100:1e400"),
            &["H100", "accelerator"],
        ),
        bad(
            "gpu-third.yaml",
            acc("H100:0.33333333333"),
            &["H100", "decimal"],
        ),
        bad("gpu-nan.yaml", acc("H100:nan"), &["H100", "accelerator"]),
        bad("gpu-inf.yaml", acc("H100:inf"), &["H100", "accelerator"]),
        bad("gpu-hex.yaml", acc("H100:0x10"), &["H100", "accelerator"]),
        bad("gpu-1.5.yaml", acc("H100:1.5"), &["H100", "fraction"]),
        bad("gpu-5.yaml", acc("H100:5"), &["never run", "H100"]),
        bad(
            "gpu-big.yaml",
            acc("H100:18446744073709551617"),
            &["H100", "large"],
        ),
        bad(
            "gpu-map-neg.yaml",
            acc("{H100: -1}"),
            &["H100", "accelerator"],
        ),
        bad(
            "gpu-map-nan.yaml",
            acc("{H100: .nan}"),
            &["H100", "accelerator"],
        ),
        bad(
            "gpu-list-zero.yaml",
            acc("[H100:0, A100:1]"),
            &["H100", "accelerator"],
        ),
        bad("gpu-unknown.yaml", acc("FOO9000:1"), &["FOO9000"]),
        bad(
            "gpu-unknown-list.yaml",
            acc("[FOO1, BAR2:2]"),
            &["FOO1", "BAR2"],
        ),
        bad("gpu-empty-name.yaml", acc("\":1\""), &["accelerator"]),
        bad("gpu-colons.yaml", acc("H100:1:2"), &["':'", "H100"]),
        bad(
            "nodes-zero.yaml",
            "num_nodes: 0\nrun: echo x\n",
            &["num_nodes"],
        ),
        bad(
            "nodes-neg.yaml",
            "num_nodes: -1\nrun: echo x\n",
            &["num_nodes"],
        ),
        bad(
            "nodes-million.yaml",
            "num_nodes: 1000000\nrun: echo x\n",
            &["num_nodes"],
        ),
        bad(
            "nodes-float.yaml",
            "num_nodes: 1.5\nrun: echo x\n",
            &["num_nodes"],
        ),
        bad(
            "nodes-string.yaml",
            "num_nodes: two\nrun: echo x\n",
            &["num_nodes"],
        ),
        bad("nodes-two.yaml", "num_nodes: 2\nrun: echo x\n", &["node"]),
        bad(
            "cpus-neg.yaml",
            "resources:\n  cpus: -1\nrun: x\n",
            &["cpus"],
        ),
        bad(
            "cpus-zero.yaml",
            "resources:\n  cpus: 0\nrun: x\n",
            &["cpus"],
        ),
        bad(
            "cpus-nan.yaml",
            "resources:\n  cpus: .nan\nrun: x\n",
            &["cpus"],
        ),
        bad(
            "cpus-huge.yaml",
            "resources:\n  cpus: 1e12\nrun: x\n",
            &["cpus"],
        ),
        bad(
            "cpus-too-many.yaml",
            "resources:\n  cpus: 9\nrun: x\n",
            &["cpu", "never"],
        ),
        bad(
            "mem-neg.yaml",
            "resources:\n  memory: -5\nrun: x\n",
            &["memory"],
        ),
    ];
    run_rejections(&mut d, &cases, Duration::from_secs(10));
}

// ----------------------------------------------------------------------- cancel

/// `cancel` may be any file type and is never opened or followed: a directory (holding a
/// link out of the spool), a symlink to a file outside the spool, a FIFO. Made by root,
/// each cancels its job; what they point at is untouched; the daemon never blocks.
#[test]
fn cancel_of_any_type_cancels_and_is_never_followed() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "8", "--kill-grace", "1"]);
    let dog = Watchdog::arm(&d, Duration::from_secs(120));
    let s = d.scratch();
    let keep = s.join("keep");
    fs::create_dir(&keep).unwrap();
    fs::write(keep.join("precious.txt"), "precious\n").unwrap();
    fs::create_dir(keep.join("sub")).unwrap();
    fs::write(keep.join("sub/inner.txt"), "inner\n").unwrap();
    let keep_tree = snap_tree(&keep);

    let ids: Vec<u64> = ["dir", "link", "fifo", "linkdir"]
        .iter()
        .map(|n| {
            d.submit(
                &format!("{n}.yaml"),
                &format!("name: {n}\nrun: sleep 1000\n"),
            )
        })
        .collect();
    for id in &ids {
        d.wait_status(*id, "RUNNING");
    }
    // A directory holding a link out of the spool, moved in whole.
    let cdir = s.join("cancel-dir");
    fs::create_dir(&cdir).unwrap();
    std::os::unix::fs::symlink(&keep, cdir.join("escape")).unwrap();
    fs::write(cdir.join("note"), "x").unwrap();
    fs::rename(&cdir, d.job(ids[0]).join("cancel")).unwrap();
    // A symlink to a file outside the spool.
    std::os::unix::fs::symlink(keep.join("precious.txt"), d.job(ids[1]).join("cancel")).unwrap();
    // A FIFO.
    mkfifo(&d.job(ids[2]).join("cancel"));
    // A symlink to a directory outside the spool.
    std::os::unix::fs::symlink(&keep, d.job(ids[3]).join("cancel")).unwrap();

    for id in &ids {
        d.wait_done(*id, "CANCELLED");
    }
    assert!(!fifo_has_reader(&d.job(ids[2]).join("cancel")));
    assert_eq!(
        diff_trees(&keep_tree, &snap_tree(&keep)),
        Vec::<String>::new(),
        "something outside the spool changed"
    );
    still_serves(&mut d, "a");
    dog.disarm();
}

/// A pending job cancelled by a FIFO or a dangling symlink: CANCELLED, never started.
#[test]
fn pending_job_cancelled_by_fifo_or_dangling_link() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "1", "--kill-grace", "1"]);
    let dog = Watchdog::arm(&d, Duration::from_secs(120));
    let s = d.scratch();
    let gate = Gate::new(&s, "blocker");
    let blocker = d.submit(
        "blocker.yaml",
        &format!(
            "name: blocker\nresources:\n  cpus: 1\nrun: {}\n",
            gate.wait_cmd()
        ),
    );
    d.wait_status(blocker, "RUNNING");
    let ran = s.join("ran");
    let p1 = d.submit("p1.yaml", &format!("run: touch {}\n", sh_quote(&ran)));
    let p2 = d.submit("p2.yaml", &format!("run: touch {}\n", sh_quote(&ran)));
    d.wait_queue_status(p1, "PENDING");
    d.wait_queue_status(p2, "PENDING");
    mkfifo(&d.job(p1).join("cancel"));
    std::os::unix::fs::symlink(s.join("nowhere"), d.job(p2).join("cancel")).unwrap();
    d.wait_done(p1, "CANCELLED");
    d.wait_done(p2, "CANCELLED");
    gate.open();
    d.wait_done(blocker, "SUCCEEDED");
    still_serves(&mut d, "a");
    assert!(!ran.exists(), "a cancelled pending job ran");
    assert!(!s.join("nowhere").exists());
    dog.disarm();
}

// ------------------------------------------------------------------------ scale

/// A directory submission of 100,000 small files is admitted (one rename) and its job sees
/// all of them in its working directory.
#[test]
fn directory_with_100000_files_is_admitted() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "8"]);
    let s = d.scratch();
    let dir = s.join("many");
    fs::create_dir(&dir).unwrap();
    let t0 = Instant::now();
    for i in 0..100_000u32 {
        let mut f = fs::File::create(dir.join(format!("f{i:06}"))).unwrap();
        f.write_all(b"x").unwrap();
    }
    fs::write(dir.join("job.yaml"), "name: many\nrun: ls | wc -l\n").unwrap();
    eprintln!("created 100,000 files in {:?}", t0.elapsed());
    let t1 = Instant::now();
    fs::rename(&dir, d.path("incoming/many")).unwrap();
    let status = d.job(1).join("status");
    wait_until(
        Duration::from_secs(60),
        "the directory to be admitted",
        || status.exists(),
        || d.diagnostics(),
    );
    eprintln!("admitted in {:?}", t1.elapsed());
    wait_until(
        Duration::from_secs(60),
        "the job to end",
        || d.status(1) == "SUCCEEDED" || d.status(1).starts_with("FAILED"),
        || d.diagnostics(),
    );
    d.wait_done(1, "SUCCEEDED");
    assert_eq!(d.log(1).trim(), "100001", "{}", d.diagnostics());
    assert_eq!(d.info(1)["has_workdir"], serde_json::json!(true));
    still_serves(&mut d, "a");
}

/// A submission storm: thousands of files renamed into incoming/ as fast as possible. Every
/// one becomes exactly one job (IDs 1..=N, each source once), none is rejected or left
/// behind, whether or not inotify's queue (16384 events by default) overflowed.
///
/// The jobs do run, one at a time (each asks for all 64 CPUs), so the daemon also starts
/// and settles jobs while it admits; the test does not wait for all of them to run (10,000
/// job starts would take minutes). Two ignored dot-files are closed after every rename, so
/// that inotify's queue does overflow and the rescan path is the one exercised.
///
/// N is 10,000 (admitted in 20-30 s, the whole test 30-40 s, in a debug build on a 2-core
/// machine); `SKYSPOOL_STORM_FILES=3000` scales it down for a slower machine.
#[test]
fn submission_storm_every_file_becomes_exactly_one_job() {
    let n: usize = std::env::var("SKYSPOOL_STORM_FILES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "64", "--kill-grace", "1"]);
    let s = d.scratch();
    let src = s.join("storm");
    fs::create_dir(&src).unwrap();
    let name = |i: usize| format!("s{i:05}.yaml");
    for i in 0..n {
        fs::write(
            src.join(name(i)),
            format!("name: s{i}\nresources:\n  cpus: 64\nrun: \"true\"\n"),
        )
        .unwrap();
    }
    let incoming = d.path("incoming");
    // Noise: every rename is followed by closes of two ignored dot-files (alternating, so
    // the kernel cannot merge them with the previous event). They cost the daemon nothing
    // but fill inotify's queue, so that it overflows while the daemon is busy admitting and
    // the daemon has to rescan.
    let noise = [incoming.join(".noise-a.tmp"), incoming.join(".noise-b.tmp")];
    let mut noise_files: Vec<fs::File> = Vec::new();
    let t0 = Instant::now();
    for i in 0..n {
        fs::rename(src.join(name(i)), incoming.join(name(i))).unwrap();
        for p in &noise {
            noise_files.push(fs::File::create(p).unwrap());
            noise_files.clear(); // close: IN_CLOSE_WRITE
        }
    }
    eprintln!("renamed {n} files in {:?}", t0.elapsed());
    for p in &noise {
        fs::remove_file(p).unwrap();
    }
    // Polled gently (listing 10,000 entries every few ms would take CPU from the daemon):
    // `last-id` is one small file, recorded before each batch is published.
    let last_id = || -> usize {
        fs::read_to_string(d.path(".skyspool/last-id"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    while last_id() < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_until(
        Duration::from_secs(30).min(deadline.saturating_duration_since(Instant::now())),
        &format!("{n} jobs"),
        || d.job_ids().len() >= n && d.incoming_names().is_empty(),
        || {
            format!(
                "{} jobs, {} left in incoming/, rejected: {}\n{}",
                d.job_ids().len(),
                d.incoming_names().len(),
                rejected_entries(&d).len(),
                d.daemon_log()
                    .lines()
                    .rev()
                    .take(30)
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        },
    );
    eprintln!("all {n} admitted after {:?}", t0.elapsed());
    // Let a straggler (a second job from one file) show itself before counting.
    std::thread::sleep(Duration::from_millis(500));
    let ids = d.job_ids();
    assert_eq!(ids, (1..=n as u64).collect::<Vec<_>>(), "job IDs");
    let mut sources = BTreeSet::new();
    for id in &ids {
        let info = d.info(*id);
        let src = info["source"].as_str().unwrap_or_default().to_string();
        assert!(
            sources.insert(src.clone()),
            "job {id}: source {src} seen twice"
        );
    }
    let expect: BTreeSet<String> = (0..n).map(|i| format!("incoming/{}", name(i))).collect();
    assert_eq!(sources, expect);
    assert_eq!(rejected_entries(&d), BTreeSet::new(), "rejections");
    assert!(d.incoming_names().is_empty());
    let overflowed = d.daemon_log().contains("overflow");
    eprintln!("inotify queue overflowed during the storm: {overflowed}");
    let queue_max: usize = fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(16384);
    if 3 * n > 2 * queue_max {
        // Not a product requirement, but the test is meant to exercise the rescan.
        assert!(
            overflowed,
            "the storm did not overflow inotify's queue ({queue_max} events): the rescan \
             path was not exercised"
        );
    }
    // Stop without running the rest; let the job that is running end before cleanup.
    d.kill9();
    let running: Vec<u64> = fs::read_dir(d.path("running"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    for id in running {
        let _ = fs::write(d.job(id).join("cancel"), b"");
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline && d.result(id).is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ------------------------------------------------------------------ multi-user

/// Users cannot write into another user's job directory, into the state files of any job
/// (their own included), into the state directories or the daemon's private directory, nor
/// remove each other's submissions. A cancel from the wrong user never cancels.
#[test]
fn users_cannot_touch_other_jobs_or_daemon_state() {
    if !have_users() {
        return;
    }
    let d = Daemon::start(&["--gpus", "none", "--cpus", "8", "--kill-grace", "1"]);
    open_path_to_spool(&d);
    let spool = d.spool.clone();
    let sq = |rel: &str| sh_quote(&spool.join(rel));
    let src = d.tmp.path().join("sleep.yaml");
    fs::write(&src, "run: sleep 1000\n").unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
    let (rc, out) = as_user(
        "skyspool-alice",
        &format!("cp {} {}", sh_quote(&src), sq("incoming/alice.yaml")),
    );
    assert_eq!(rc, 0, "{out}");
    d.wait_admitted(1);
    let (rc, out) = as_user(
        "skyspool-bob",
        &format!("cp {} {}", sh_quote(&src), sq("incoming/bob.yaml")),
    );
    assert_eq!(rc, 0, "{out}");
    d.wait_admitted(2);
    d.wait_status(1, "RUNNING");
    d.wait_status(2, "RUNNING");
    // RUNNING is written as the supervisor is spawned; its own files follow. Snapshot after.
    for id in [1, 2] {
        let run = d.job(id).join(".sky/run.sh");
        wait_until(
            DEADLINE,
            "the supervisor to start the job",
            || run.exists(),
            || d.diagnostics(),
        );
    }
    assert_eq!(
        d.info(1)["uid"],
        serde_json::json!(uid_of("skyspool-alice"))
    );
    assert_eq!(d.info(2)["uid"], serde_json::json!(uid_of("skyspool-bob")));
    // Bob's pending submission and his rejected file: alice cannot remove or replace them.
    let (rc, out) = as_user(
        "skyspool-bob",
        &format!(
            "echo 'run: x' > {} && echo not-a-job > {}",
            sq("incoming/.bob-draft.tmp"),
            sq("incoming/bob.txt")
        ),
    );
    assert_eq!(rc, 0, "{out}");
    let reason = d.wait_rejected("bob.txt");
    assert!(reason.contains("bob.txt"));
    let tree = snap_tree_entries(&spool);

    let attempts: Vec<String> = vec![
        // Bob's job directory.
        format!("touch {}", sq("jobs/2/cancel")),
        format!("touch {}", sq("jobs/2/newfile")),
        format!("echo SUCCEEDED > {}", sq("jobs/2/status")),
        format!("echo '{{}}' > {}", sq("jobs/2/info.json")),
        format!("echo forged-bob >> {}", sq("jobs/2/log")),
        format!("rm -f {}", sq("jobs/2/status")),
        format!("mv {} {}", sq("jobs/2/status"), sq("jobs/2/status2")),
        format!("mkdir {}", sq("jobs/2/.sky/x")),
        format!("ln -s /tmp {}", sq("jobs/2/.skyx")),
        // Her own job's state files.
        format!("echo SUCCEEDED > {}", sq("jobs/1/status")),
        format!("echo '{{}}' > {}", sq("jobs/1/info.json")),
        format!("echo 'run: evil' > {}", sq("jobs/1/job.yaml")),
        format!("rm -f {}", sq("jobs/1/info.json")),
        format!("mv {} {}", sq("jobs/1/status"), sq("jobs/1/old")),
        format!("echo forged >> {}", sq("jobs/1/log")),
        format!("touch {}", sq("jobs/1/.sky/result.json")),
        // The spool's own files and directories.
        format!("echo x > {}", sq("queue")),
        format!("echo x > {}", sq("nodes")),
        format!("echo x > {}", sq("nodes.json")),
        format!("ln -s ../jobs/1 {}", sq("done/1x")),
        format!("mv {} {}", sq("running/1"), sq("done/1")),
        format!("rm -f {}", sq("running/2")),
        format!("mkdir {}", sq("jobs/99")),
        format!("ls {}", sq(".skyspool")),
        format!("cat {}", sq(".skyspool/last-id")),
        format!("touch {}", sq(".skyspool/staging/7")),
        // Bob's files in the shared, sticky directories.
        format!("rm -f {}", sq("incoming/.bob-draft.tmp")),
        format!(
            "mv {} {}",
            sq("incoming/.bob-draft.tmp"),
            sq("incoming/.mine.tmp")
        ),
        format!("echo hijack > {}", sq("incoming/.bob-draft.tmp")),
        format!("rm -f {}", sq("rejected/bob.txt")),
        format!("rm -f {}", sq("rejected/bob.txt.reason")),
        format!("echo forged > {}", sq("rejected/bob.txt.reason")),
    ];
    let mut succeeded = Vec::new();
    for cmd in &attempts {
        let (rc, _) = as_user("skyspool-alice", &format!("{cmd} 2>/dev/null"));
        if rc == 0 {
            succeeded.push(cmd.clone());
        }
    }
    assert!(
        succeeded.is_empty(),
        "alice could:\n{}",
        succeeded.join("\n")
    );
    let changed: Vec<String> = diff_trees(&tree, &snap_tree_entries(&spool))
        .into_iter()
        .filter(|l| {
            // The daemon's own files move on their own (queue, nodes, atomic temporaries).
            ![
                "/queue",
                "/nodes",
                "daemon.log",
                ".tmp.",
                "/log ",
                "/log changed",
                "last-id",
                // Emptied once the jobs' files are durable (after their start).
                "/.skyspool/journal.",
            ]
            .iter()
            .any(|x| l.contains(x))
        })
        .collect();
    assert_eq!(changed, Vec::<String>::new(), "the spool changed");
    assert_eq!(d.status(1), "RUNNING");
    assert_eq!(d.status(2), "RUNNING");
    assert!(!d.log(1).contains("forged") && !d.log(2).contains("forged"));

    // Bob's cancel in alice's job directory: refused by the filesystem (ACL mode), or, where
    // the fallback mode 1777 lets him create it, removed by the daemon with a refusal in the
    // job's log, the job still running.
    let (rc, _) = as_user("skyspool-bob", &format!("touch {}", sq("jobs/1/cancel")));
    if rc == 0 {
        wait_until(
            DEADLINE,
            "the daemon to remove bob's cancel and log the refusal",
            || !spool.join("jobs/1/cancel").exists() && d.log(1).contains("refused"),
            || d.diagnostics(),
        );
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(d.status(1), "RUNNING", "{}", d.diagnostics());
    } else {
        assert!(!spool.join("jobs/1/cancel").exists());
    }
    // Each owner cancels their own job.
    let (rc, out) = as_user("skyspool-alice", &format!("touch {}", sq("jobs/1/cancel")));
    assert_eq!(rc, 0, "{out}");
    d.wait_done(1, "CANCELLED");
    assert_eq!(d.status(2), "RUNNING");
    let (rc, out) = as_user("skyspool-bob", &format!("touch {}", sq("jobs/2/cancel")));
    assert_eq!(rc, 0, "{out}");
    d.wait_done(2, "CANCELLED");
}

/// While her job is pending, its owner can create entries in its directory (that is how
/// `cancel` works). She must not be able to use that to make the daemon (root) follow a
/// link out of the spool: `.sky` made a symlink to a root-only directory must not get that
/// directory chmod'ed, nor the daemon's or the supervisor's files (run.sh with her commands)
/// written into it.
#[test]
fn owner_cannot_redirect_the_jobs_private_directory_out_of_the_spool() {
    if !have_users() {
        return;
    }
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "1", "--kill-grace", "1"]);
    open_path_to_spool(&d);
    let s = d.scratch();
    let gate = Gate::new(&s, "blocker");
    let blocker = d.submit(
        "blocker.yaml",
        &format!(
            "name: blocker\nresources:\n  cpus: 1\nrun: {}\n",
            gate.wait_cmd()
        ),
    );
    d.wait_status(blocker, "RUNNING");
    // A root-only directory outside the spool (think /root or /etc/profile.d).
    let victim = s.join("root-only");
    fs::create_dir(&victim).unwrap();
    fs::write(victim.join("keep"), "keep\n").unwrap();
    fs::set_permissions(&victim, fs::Permissions::from_mode(0o700)).unwrap();
    let victim_tree = snap_tree(&victim);

    let src = d.tmp.path().join("alice.yaml");
    fs::write(&src, "run: echo alice-ran\n").unwrap();
    fs::set_permissions(&src, fs::Permissions::from_mode(0o644)).unwrap();
    // Two pending jobs of alice's: in the first she makes `.sky` a link to the root-only
    // directory; in the second, a directory of her own (she could then swap the daemon's
    // records in it, e.g. `supervisor.lock`, which names the pid the daemon signals on cancel).
    for name in ["alice-link.yaml", "alice-dir.yaml"] {
        let (rc, out) = as_user(
            "skyspool-alice",
            &format!(
                "cp {} {}",
                sh_quote(&src),
                sh_quote(&d.path("incoming").join(name))
            ),
        );
        assert_eq!(rc, 0, "{out}");
    }
    let (link_job, dir_job) = (blocker + 1, blocker + 2);
    for id in [link_job, dir_job] {
        d.wait_admitted(id);
        d.wait_queue_status(id, "PENDING");
    }
    let attacks = [
        format!(
            "ln -s {} {}",
            sh_quote(&victim),
            sh_quote(&d.job(link_job).join(".sky"))
        ),
        format!(
            "ln -s {} {}",
            sh_quote(&victim.join("x")),
            sh_quote(&d.job(link_job).join(".status.tmp.1"))
        ),
        format!("mkdir {}", sh_quote(&d.job(dir_job).join(".sky"))),
    ];
    let mut made = Vec::new();
    for a in &attacks {
        let (rc, _) = as_user("skyspool-alice", &format!("{a} 2>/dev/null"));
        if rc == 0 {
            made.push(a.clone());
        }
    }
    eprintln!("alice could create in her pending jobs' directories: {made:?}");
    gate.open();
    d.wait_done(blocker, "SUCCEEDED");
    for id in [link_job, dir_job] {
        wait_until(
            DEADLINE,
            "alice's job to end",
            || {
                let st = d.status(id);
                st != "PENDING" && st != "RUNNING" && st != "SETTING_UP" && !st.is_empty()
            },
            || d.diagnostics(),
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = snap_tree(&victim);
    let followed = diff_trees(&victim_tree, &after);
    let alice = uid_of("skyspool-alice");
    let private_owner = fs::symlink_metadata(d.job(dir_job).join(".sky"))
        .map(|m| m.uid())
        .ok();
    let mut failures = Vec::new();
    if !followed.is_empty() {
        failures.push(format!(
            "the daemon followed alice's link `{}/.sky -> {}` (job {link_job} ended {}): \
             {followed:#?}",
            d.job(link_job).display(),
            victim.display(),
            d.status(link_job)
        ));
    }
    if private_owner == Some(alice) && d.status(dir_job) == "SUCCEEDED" {
        failures.push(format!(
            "job {dir_job} ran with a `.sky` owned by alice (she can replace the daemon's and \
             the supervisor's records in it)"
        ));
    }
    assert!(
        failures.is_empty(),
        "{}\n{}",
        failures.join("\n"),
        d.diagnostics()
    );
    still_serves(&mut d, "a");
}

/// `secrets:` values never appear in job.yaml, info.json, queue, the daemon's logs, the
/// rejection reasons, or any file under the spool, except the daemon's private secrets
/// file (mode 0600, removed when the job ends). Other users cannot read that file.
#[test]
fn secret_values_never_leak_into_the_spool() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "8", "--kill-grace", "1"]);
    let s = d.scratch();
    let secret = "s3cr3t-VALUE-9d2b7e";
    let secret2 = "p4ss-W0RD-41aa";
    let gate = Gate::new(&s, "secrets");
    // The job hands its secrets to the test through a file outside the spool (its commands
    // must not hold the values: they are part of job.yaml).
    let seen = s.join("seen");
    fs::create_dir(&seen).unwrap();
    fs::set_permissions(&seen, fs::Permissions::from_mode(0o777)).unwrap();
    let check_token = format!(
        "printf '%s %s' \"$HF_TOKEN\" \"$DB_PASS\" > {}/$SEEN_AS && echo token-ok\n  {}",
        sh_quote(&seen),
        gate.wait_cmd()
    );
    let yaml_for = |tag: &str| {
        format!(
            "name: sec\nenvs:\n  PUBLIC: visible\n  SEEN_AS: {tag}\nsecrets:\n  HF_TOKEN: {secret}\n  DB_PASS: \"{secret2}\"\nrun: |\n  {check_token}\n"
        )
    };
    let yaml = yaml_for("file");
    let file_job = d.submit("sec.yaml", &yaml);
    // A directory submission: its submitted job.yaml (with the secrets) must not stay.
    let dir_job = file_job + 1;
    move_in(&d, OsStr::new("secdir"), |p| {
        fs::create_dir(p).unwrap();
        fs::write(p.join("job.yaml"), yaml_for("dir")).unwrap();
        fs::write(p.join("data.txt"), "data").unwrap();
    });
    d.wait_admitted(dir_job);
    // Rejected submissions that hold secrets: their reasons must not echo them.
    let rejects = [
        (
            "sec-bad1.yaml",
            format!("secrets:\n  HF_TOKEN: {secret}\nenvs:\n  HF_TOKEN: x\nrun: x\n"),
        ),
        (
            "sec-bad2.yaml",
            format!("secrets:\n  HF_TOKEN: [{secret}]\nrun: x\n"),
        ),
        (
            "sec-bad3.yaml",
            format!("secrets:\n  HF_TOKEN: \"{secret}\n"),
        ),
        (
            "sec-bad5.yaml",
            format!("secrets:\n  HF_TOKEN: {secret}\n  HF_TOKEN: {secret2}\nrun: x\n"),
        ),
        (
            "sec-bad6.yaml",
            format!("secrets:\n  HF_TOKEN: {secret}\nresources:\n  accelerators: H100:1\nrun: x\n"),
        ),
        ("sec-bad7.yaml", format!("secrets: {secret}\nrun: x\n")),
    ];
    for (name, text) in &rejects {
        move_in(&d, OsStr::new(name), |p| {
            fs::write(p, text).unwrap();
            fs::set_permissions(p, fs::Permissions::from_mode(0o600)).unwrap();
        });
    }
    let mut failures = Vec::new();
    for (name, _) in &rejects {
        match wait_rejected_as(&d, name, DEADLINE) {
            Err(e) => failures.push(e),
            Ok(reason) => {
                if let Err(e) = check_reason(&reason, name, &[], &[secret, secret2]) {
                    failures.push(format!("{name}: {e}"));
                }
            }
        }
    }
    for id in [file_job, dir_job] {
        wait_until(
            DEADLINE,
            "the job to check its secrets",
            || d.log(id).contains("token-ok"),
            || d.diagnostics(),
        );
    }
    for tag in ["file", "dir"] {
        assert_eq!(
            fs::read_to_string(seen.join(tag)).unwrap(),
            format!("{secret} {secret2}"),
            "the {tag} job did not get its secrets"
        );
    }
    // While the jobs run: the secrets file exists, is private, and nothing else has them.
    for id in [file_job, dir_job] {
        let f = d.path(&format!(".skyspool/secrets/{id}.json"));
        let m = fs::symlink_metadata(&f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
        let yaml = fs::read_to_string(d.job(id).join("job.yaml")).unwrap();
        assert!(yaml.contains("<redacted>"), "{yaml}");
        assert!(
            yaml.contains("HF_TOKEN") && yaml.contains("visible"),
            "{yaml}"
        );
    }
    assert!(!d.job(dir_job).join("workdir/job.yaml").exists());
    assert!(d.job(dir_job).join("workdir/data.txt").exists());
    // (Where the test users exist: this part is optional, so no skip is reported.)
    if is_root()
        && have_program("su")
        && nix::unistd::User::from_name("skyspool-bob")
            .ok()
            .flatten()
            .is_some()
    {
        open_path_to_spool(&d);
        let (rc, _) = as_user(
            "skyspool-bob",
            &format!("cat {}", sh_quote(&d.path(".skyspool/secrets/1.json"))),
        );
        assert_ne!(rc, 0, "another user read the secrets");
    }
    let scan = |d: &Daemon, failures: &mut Vec<String>| {
        for e in walkdir::WalkDir::new(&d.spool)
            .follow_links(false)
            .into_iter()
            .flatten()
        {
            let p = e.path();
            if p.starts_with(d.path(".skyspool/secrets")) || !e.file_type().is_file() {
                continue;
            }
            let m = e.metadata().unwrap();
            // The submitters' own unchanged files in rejected/ are theirs (mode 0600).
            if p.parent() == Some(&d.path("rejected"))
                && !p.to_string_lossy().ends_with(".reason")
                && m.mode() & 0o044 == 0
            {
                continue;
            }
            let bytes = fs::read(p).unwrap_or_default();
            let text = String::from_utf8_lossy(&bytes);
            for v in [secret, secret2] {
                if text.contains(v) {
                    failures.push(format!(
                        "{} (mode {:o}) holds a secret",
                        p.display(),
                        m.mode()
                    ));
                }
            }
        }
        let log = d.daemon_log();
        for v in [secret, secret2] {
            if log.contains(v) {
                failures.push("the daemon's stderr log holds a secret".into());
            }
        }
    };
    scan(&d, &mut failures);
    gate.open();
    d.wait_done(file_job, "SUCCEEDED");
    d.wait_done(dir_job, "SUCCEEDED");
    for id in [file_job, dir_job] {
        if d.path(&format!(".skyspool/secrets/{id}.json")).exists() {
            failures.push(format!("job {id} ended but its secrets file remains"));
        }
    }
    scan(&d, &mut failures);
    still_serves(&mut d, "a");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `.skyspool/secrets/<id>.json` has mode 0600 (spool-layout.md), not just a private parent
/// directory: a later chmod of `.skyspool/`, a backup or a copy must not expose it.
#[test]
fn secrets_file_has_mode_0600() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "8", "--kill-grace", "1"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "secret-mode");
    let id = d.submit(
        "sec.yaml",
        &format!("secrets:\n  TOKEN: abc123\nrun: {}\n", gate.wait_cmd()),
    );
    let f = d.path(&format!(".skyspool/secrets/{id}.json"));
    wait_file(&f, || d.diagnostics());
    let mode = fs::symlink_metadata(&f).unwrap().mode() & 0o7777;
    gate.open();
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(
        mode,
        0o600,
        "{} has mode {mode:o}; spool-layout.md says 0600",
        f.display()
    );
}

/// A job with `secrets:` whose YAML is just under the 1 MiB limit: its `job.yaml` is the
/// re-serialized, redacted spec, which may come out longer than the submission. It must be
/// either rejected at admission or run; not admitted and then fail to start because its own
/// job.yaml is over the limit.
#[test]
fn large_job_with_secrets_is_rejected_or_runs() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "8"]);
    // One long line: the redacted YAML folds it (`>-`), adding a newline and an indent
    // every 80 characters or so.
    let mut yaml = String::from("secrets:\n  TOKEN: abc\nrun: echo big-secret-job; true ");
    while yaml.len() < 1024 * 1024 - 100 {
        yaml.push_str("word ");
    }
    yaml.push('\n');
    assert!(yaml.len() <= 1024 * 1024);
    let before = d.job_ids();
    d.drop_yaml("big-secret.yaml", &yaml);
    let mut outcome = None;
    wait_until(
        DEADLINE,
        "big-secret.yaml to be admitted or rejected",
        || {
            if d.path("rejected/big-secret.yaml.reason").exists() {
                outcome = Some(None);
            } else if let Some(id) = d.job_ids().into_iter().find(|i| !before.contains(i)) {
                if d.job(id).join("status").exists() {
                    outcome = Some(Some(id));
                }
            }
            outcome.is_some()
        },
        || d.diagnostics(),
    );
    if let Some(id) = outcome.unwrap() {
        let job_yaml = fs::metadata(d.job(id).join("job.yaml")).unwrap().len();
        wait_until(
            DEADLINE,
            "the job to end",
            || !matches!(d.status(id).as_str(), "PENDING" | "SETTING_UP" | "RUNNING"),
            || d.diagnostics(),
        );
        assert_eq!(
            d.status(id),
            "SUCCEEDED",
            "submitted {} bytes, job.yaml is {job_yaml} bytes\n{}",
            yaml.len(),
            d.log(id)
        );
    }
    still_serves(&mut d, "a");
}
