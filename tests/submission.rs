//! Submitting through `incoming/`: every ordinary way of putting a file there, files still
//! being written, rejections with reasons, start-up scans, IDs, and hostile entries.
mod common;
use common::*;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

fn echo_job(name: &str, word: &str) -> String {
    format!("name: {name}\nrun: echo {word}\n")
}

fn run_ok(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn rejected_names(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(d.path("rejected"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `cp` (written in place), `rsync` (temporary dot-file, then rename) and `mv` of a
/// directory all submit a job.
#[test]
fn submit_by_cp_rsync_and_mv() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let incoming = d.path("incoming");

    fs::write(s.join("copied.yaml"), echo_job("copied", "by-cp")).unwrap();
    run_ok(Command::new("cp").arg(s.join("copied.yaml")).arg(&incoming));
    d.wait_admitted(1);
    d.wait_done(1, "SUCCEEDED");
    assert_eq!(d.log(1), "by-cp\n", "{}", d.diagnostics());
    assert_eq!(
        d.info(1)["source"],
        serde_json::json!("incoming/copied.yaml")
    );

    let mut next = 2;
    if have_program("rsync") {
        fs::write(s.join("synced.yaml"), echo_job("synced", "by-rsync")).unwrap();
        run_ok(
            Command::new("rsync")
                .arg(s.join("synced.yaml"))
                .arg(&incoming),
        );
        d.wait_admitted(next);
        d.wait_done(next, "SUCCEEDED");
        assert_eq!(d.log(next), "by-rsync\n", "{}", d.diagnostics());
        assert_eq!(d.info(next)["name"], serde_json::json!("synced"));
        next += 1;
    } else {
        skip("rsync is not installed: submission by rsync not tested");
    }

    let dir = s.join("dirjob");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("data.txt"), "by-mv\n").unwrap();
    fs::write(dir.join("job.yaml"), "name: dirjob\nrun: cat data.txt\n").unwrap();
    run_ok(Command::new("mv").arg(&dir).arg(&incoming));
    d.wait_admitted(next);
    d.wait_done(next, "SUCCEEDED");
    assert_eq!(d.log(next), "by-mv\n", "{}", d.diagnostics());
    assert!(d.job(next).join("workdir/data.txt").is_file());
    assert!(d.incoming_names().is_empty(), "{:?}", d.incoming_names());
    assert!(rejected_names(&d).is_empty(), "{:?}", rejected_names(&d));
}

/// `mv a.yaml b.yaml c.yaml incoming/` succeeds. GNU mv stats each destination but the
/// last right after renaming it there; a daemon that claimed a moved-in file at once (woken
/// by the rename, often on mv's own CPU) made mv fail with "cannot stat" for a job it had in
/// fact submitted, in about half the runs on an idle daemon. Here mv also runs under strace
/// with each stat delayed by 3 ms (mv preempted between its rename and its stat), which the
/// old daemon lost every time.
/// A lone job on an idle queue is handed to its supervisor before it is staged only when its
/// script can go to bash as an argument; one whose script is longer (read from
/// `.sky/run.sh`, which exists only once the job is published) is placed at once and started
/// right after its publication. Both run once, with their output and their script on record.
#[test]
fn lone_jobs_with_short_and_long_scripts_each_run_once() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "2"]);
    let short = d.submit("short.yaml", "name: short\nrun: echo short-ran\n");
    d.wait_done(short, "SUCCEEDED");
    // Over 100 KiB of script: past what goes to bash as an argument.
    let mut long = String::from("name: long\nrun: |\n");
    for i in 0..4000 {
        long.push_str(&format!(
            "  : padding line {i} of a script longer than one argument\n"
        ));
    }
    long.push_str("  echo long-ran\n");
    let long_id = d.submit("long.yaml", &long);
    d.wait_done(long_id, "SUCCEEDED");
    assert_eq!(d.log(short), "short-ran\n");
    assert_eq!(d.log(long_id), "long-ran\n", "{}", d.diagnostics());
    let script = fs::read_to_string(d.job(long_id).join(".sky/run.sh")).unwrap_or_default();
    assert!(
        script.len() > 100 * 1024 && script.contains("echo long-ran"),
        "the long script is not on record ({} bytes)",
        script.len()
    );
    assert!(fs::read_to_string(d.job(short).join(".sky/run.sh"))
        .unwrap_or_default()
        .contains("echo short-ran"));
}

#[test]
fn mv_of_several_files_into_incoming_succeeds() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let incoming = d.path("incoming");
    let strace = have_program("strace");
    if !strace {
        skip("strace is not installed: mv with a delayed stat is not tested");
    }
    let mut next = 1;
    for round in 0..8 {
        let names: Vec<_> = (0..3)
            .map(|k| {
                let p = s.join(format!("r{round}k{k}.yaml"));
                fs::write(&p, echo_job(&format!("r{round}k{k}"), "moved")).unwrap();
                p
            })
            .collect();
        // Each round starts on an idle daemon (everything before it has ended).
        let mut mv = if strace && round % 2 == 1 {
            let mut c = Command::new("strace");
            c.args([
                "-o",
                "/dev/null",
                "-e",
                "inject=%stat:delay_enter=3000",
                "mv",
            ]);
            c
        } else {
            Command::new("mv")
        };
        let out = mv.args(&names).arg(&incoming).output().unwrap();
        assert!(
            out.status.success(),
            "round {round}: mv failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            d.diagnostics()
        );
        for _ in 0..3 {
            d.wait_admitted(next);
            d.wait_done(next, "SUCCEEDED");
            assert_eq!(d.log(next), "moved\n", "{}", d.diagnostics());
            next += 1;
        }
    }
    assert_eq!(d.job_ids().len(), 24, "{}", d.diagnostics());
    assert!(d.incoming_names().is_empty(), "{:?}", d.incoming_names());
}

/// A file written slowly in place is not read while its writer holds it open, even when
/// the daemon handles other submissions meanwhile; once closed, it is admitted whole.
#[test]
fn slow_writer_in_place_is_admitted_only_when_closed() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let incoming = d.path("incoming");
    let mut slow = fs::File::create(incoming.join("slow.yaml")).unwrap();
    slow.write_all(b"name: slow\nrun: |\n  echo first-line\n")
        .unwrap();
    slow.flush().unwrap();
    // Another file, written in place too (a CLOSE_WRITE), is admitted and runs.
    fs::write(incoming.join("other.yaml"), echo_job("other", "other")).unwrap();
    d.wait_admitted(1);
    d.wait_done(1, "SUCCEEDED");
    assert_eq!(d.info(1)["name"], serde_json::json!("other"));
    assert!(incoming.join("slow.yaml").exists(), "{}", d.diagnostics());
    assert_eq!(d.job_ids(), vec![1], "{}", d.diagnostics());
    assert!(rejected_names(&d).is_empty(), "{:?}", rejected_names(&d));
    // Finish writing and close: admitted with everything written.
    slow.write_all(b"  echo last-line\n").unwrap();
    drop(slow);
    d.wait_admitted(2);
    d.wait_done(2, "SUCCEEDED");
    assert_eq!(d.log(2), "first-line\nlast-line\n", "{}", d.diagnostics());
}

/// A directory moved in while its `job.yaml` is still open for writing: the daemon finds it
/// busy, and the close that follows is no event in `incoming/` (only `incoming/` itself is
/// watched). The daemon looks again shortly (the same path covers a `CLOSE_WRITE` that
/// arrives before the kernel has dropped the closing writer), so the job is admitted once
/// the writer is gone, with everything it wrote.
#[test]
fn directory_whose_job_yaml_is_closed_after_the_daemons_look_is_admitted() {
    use inotify::{Inotify, WatchMask};
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let dir = d.scratch().join("late");
    fs::create_dir(&dir).unwrap();
    let mut writer = fs::File::create(dir.join("job.yaml")).unwrap();
    writer
        .write_all(b"name: late\nrun: |\n  echo first-line\n")
        .unwrap();
    writer.flush().unwrap();
    // Watch the file for the daemon's look: its open for reading, then its close.
    let mut ino = Inotify::init().unwrap();
    ino.watches()
        .add(dir.join("job.yaml"), WatchMask::CLOSE_NOWRITE)
        .unwrap();
    let moved = d.path("incoming").join("late");
    fs::rename(&dir, &moved).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match ino.read_events(&mut buf) {
            Ok(mut events) => {
                if events.next().is_some() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => panic!("inotify: {e}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon never looked at incoming/late/job.yaml\n{}",
            d.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(moved.exists(), "admitted while open\n{}", d.diagnostics());
    assert!(d.job_ids().is_empty(), "{}", d.diagnostics());
    writer.write_all(b"  echo last-line\n").unwrap();
    drop(writer);
    d.wait_admitted(1);
    d.wait_done(1, "SUCCEEDED");
    assert_eq!(d.log(1), "first-line\nlast-line\n", "{}", d.diagnostics());
}

/// The start-up scan finds a file whose writer still has it open: it waits for the close
/// instead of admitting half a file.
#[test]
fn slow_writer_found_at_start_up_waits_for_close() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    d.stop();
    let incoming = d.path("incoming");
    let mut slow = fs::File::create(incoming.join("slow.yaml")).unwrap();
    slow.write_all(b"name: slow\nrun: |\n  echo first-line\n")
        .unwrap();
    slow.flush().unwrap();
    d.spawn();
    // The start-up scan is over (it precedes the first `nodes`); one more submission makes
    // sure a later pass did not take it either.
    let id = d.submit("other.yaml", &echo_job("other", "other"));
    assert_eq!(id, 1);
    d.wait_done(1, "SUCCEEDED");
    assert!(incoming.join("slow.yaml").exists(), "{}", d.diagnostics());
    assert_eq!(
        d.job_ids(),
        vec![1],
        "half a file was admitted\n{}",
        d.diagnostics()
    );
    slow.write_all(b"  echo last-line\n").unwrap();
    drop(slow);
    d.wait_admitted(2);
    d.wait_done(2, "SUCCEEDED");
    assert_eq!(d.log(2), "first-line\nlast-line\n", "{}", d.diagnostics());
}

/// Bad YAML goes to `rejected/` with a reason naming the file and line; the daemon serves on.
#[test]
fn malformed_yaml_is_rejected_with_file_and_line() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    d.drop_yaml(
        "broken.yaml",
        "name: broken\nrun: echo hi\nenvs:\n  A: 1\n B: 2\n",
    );
    let reason = d.wait_rejected("broken.yaml");
    let at = reason
        .find("broken.yaml:")
        .unwrap_or_else(|| panic!("reason does not name the file: {reason}"));
    let after = &reason[at + "broken.yaml:".len()..];
    assert!(
        after.starts_with(|c: char| c.is_ascii_digit()),
        "reason has no line number: {reason}"
    );
    assert!(after.starts_with("5:"), "the error is on line 5: {reason}");
    assert_eq!(
        fs::read_to_string(d.path("rejected/broken.yaml")).unwrap(),
        "name: broken\nrun: echo hi\nenvs:\n  A: 1\n B: 2\n",
        "the rejected file is kept as submitted"
    );
    assert!(d.job_ids().is_empty(), "{}", d.diagnostics());
    // The daemon keeps serving.
    let id = d.submit("good.yaml", &echo_job("good", "still-serving"));
    assert_eq!(id, 1);
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(d.log(id), "still-serving\n");
}

/// Unknown keys and demands the cluster can never meet are rejected, never queued.
#[test]
fn unknown_keys_and_impossible_demands_are_rejected() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    d.drop_yaml("typo.yaml", "name: typo\nrnu: echo hi\n");
    let reason = d.wait_rejected("typo.yaml");
    assert!(reason.contains("'rnu'"), "{reason}");
    assert!(reason.contains("typo.yaml:2"), "{reason}");

    d.drop_yaml(
        "big.yaml",
        "name: big\nresources:\n  accelerators: H100:8\nrun: echo big\n",
    );
    let reason = d.wait_rejected("big.yaml");
    assert!(reason.contains("big.yaml"), "{reason}");
    assert!(reason.contains("never run"), "{reason}");
    assert!(reason.contains('8') && reason.contains('4'), "{reason}");

    d.drop_yaml(
        "alien.yaml",
        "name: alien\nresources:\n  accelerators: FOO9000:1\nrun: echo alien\n",
    );
    let reason = d.wait_rejected("alien.yaml");
    assert!(reason.contains("FOO9000"), "{reason}");
    assert!(
        reason.contains("H100"),
        "the reason says what the cluster has: {reason}"
    );

    assert!(d.job_ids().is_empty(), "{}", d.diagnostics());
    let id = d.submit("fine.yaml", &echo_job("fine", "fine"));
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(id, 1, "rejected files take no ID\n{}", d.diagnostics());
    let q = d.queue();
    assert_eq!(
        q.lines().count(),
        2,
        "only the good job is in the queue:\n{q}"
    );
}

/// A non-YAML file is rejected; dot-files, editor backups and partial downloads are left
/// alone in incoming/.
#[test]
fn non_jobs_rejected_and_temporary_names_ignored() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let incoming = d.path("incoming");
    let ignored = [
        ".hidden.yaml",
        "foo.yaml~",
        ".foo.yaml.swp",
        "bar.yaml.part",
        "baz.yaml.tmp",
    ];
    for name in ignored {
        fs::write(incoming.join(name), "run: echo should-not-run\n").unwrap();
    }
    fs::write(incoming.join("notes.txt"), "just notes\n").unwrap();
    let reason = d.wait_rejected("notes.txt");
    assert!(reason.contains("notes.txt"), "{reason}");
    assert!(reason.contains("not a job"), "{reason}");
    // A good job after them: by its admission every earlier event has been handled.
    let id = d.submit("good.yaml", &echo_job("good", "good"));
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(id, 1);
    let mut want: Vec<String> = ignored.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(d.incoming_names(), want, "{}", d.diagnostics());
    assert_eq!(rejected_names(&d), vec!["notes.txt", "notes.txt.reason"]);
    assert_eq!(d.job_ids(), vec![1]);
}

fn set_mtime(path: &Path, ago_secs: u64) {
    let t = SystemTime::now() - Duration::from_secs(ago_secs);
    fs::File::open(path).unwrap().set_modified(t).unwrap();
}

/// Submissions already in incoming/ when the daemon starts are admitted, oldest first.
#[test]
fn files_present_at_start_up_are_admitted_in_mtime_order() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    d.stop();
    let incoming = d.path("incoming");
    // Name order (a, b, c, d) differs from mtime order (c, a, d, b).
    fs::write(incoming.join("c.yaml"), echo_job("c", "c")).unwrap();
    fs::write(incoming.join("a.yaml"), echo_job("a", "a")).unwrap();
    fs::write(incoming.join("b.yaml"), echo_job("b", "b")).unwrap();
    let dir = incoming.join("d");
    fs::create_dir(&dir).unwrap();
    fs::write(dir.join("job.yaml"), echo_job("d", "d")).unwrap();
    set_mtime(&incoming.join("c.yaml"), 40);
    set_mtime(&incoming.join("a.yaml"), 30);
    set_mtime(&dir, 20);
    set_mtime(&incoming.join("b.yaml"), 10);
    d.spawn();
    for id in 1..=4 {
        d.wait_admitted(id);
        d.wait_done(id, "SUCCEEDED");
    }
    let names: Vec<String> = (1..=4)
        .map(|id| d.info(id)["name"].as_str().unwrap_or("?").to_string())
        .collect();
    assert_eq!(names, ["c", "a", "d", "b"], "{}", d.diagnostics());
    for id in 1..=4 {
        assert_eq!(d.log(id), format!("{}\n", names[id as usize - 1]));
    }
    assert!(d.incoming_names().is_empty(), "{:?}", d.incoming_names());
}

/// A large batch is admitted a chunk (one round of fsyncs) at a time, and the daemon
/// serves the running jobs between chunks: with 1,500 submissions found at start-up, a job
/// that ends meanwhile is recorded as ended before the last of them is admitted (before
/// chunking, the whole batch was admitted first, and the slot stayed empty for as long).
/// Each submission still becomes exactly one job.
#[test]
fn running_jobs_are_served_while_a_large_batch_is_admitted() {
    const N: usize = 1500;
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "1"]);
    let gate = Gate::new(&d.scratch(), "a");
    let a = d.submit(
        "a.yaml",
        &format!(
            "name: a\nresources:\n  cpus: 1\nrun: |\n  {}\n",
            gate.wait_cmd()
        ),
    );
    d.wait_status(a, "RUNNING");
    d.stop();
    let incoming = d.path("incoming");
    for i in 0..N {
        fs::write(
            incoming.join(format!("b{i:04}.yaml")),
            format!("name: b{i}\nresources:\n  cpus: 1\nrun: echo b{i}\n"),
        )
        .unwrap();
    }
    // The daemon serves (writes `nodes`) once its start-up admission is under way.
    d.spawn();
    gate.open();
    d.wait_done(a, "SUCCEEDED");
    let last = (N + 1) as u64;
    d.wait_admitted(last);
    let log = d.daemon_log();
    let ended = log.find(&format!("job {a} ended"));
    let admitted = log.find(&format!("job {last} ("));
    assert!(
        matches!((ended, admitted), (Some(e), Some(l)) if e < l),
        "job {a} ended at {ended:?}, job {last} admitted at {admitted:?} in the daemon's log\n{}",
        d.diagnostics()
    );
    let mut sources: Vec<String> = (2..=last)
        .map(|id| d.info(id)["source"].as_str().unwrap_or("?").to_string())
        .collect();
    sources.sort();
    let want: Vec<String> = (0..N).map(|i| format!("incoming/b{i:04}.yaml")).collect();
    assert_eq!(sources, want, "{}", d.diagnostics());
    assert_eq!(d.job_ids().len(), N + 1, "{}", d.diagnostics());
    assert!(d.incoming_names().is_empty(), "{:?}", d.incoming_names());
}

/// IDs are 1, 2, 3, ... and a restarted daemon never gives one again, even when the job
/// directory that held it has been removed.
#[test]
fn ids_increase_and_are_never_reused_across_restarts() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    for i in 1..=3u64 {
        let id = d.submit_new(&format!("j{i}.yaml"), &echo_job(&format!("j{i}"), "x"));
        assert_eq!(id, i, "{}", d.diagnostics());
    }
    for id in 1..=3 {
        d.wait_done(id, "SUCCEEDED");
    }
    d.stop();
    d.spawn();
    let id = d.submit_new("j4.yaml", &echo_job("j4", "x"));
    assert_eq!(id, 4, "{}", d.diagnostics());
    d.wait_done(4, "SUCCEEDED");
    // The newest job is cleaned away; the daemon dies hard and restarts.
    fs::remove_file(d.path("done/4")).unwrap();
    fs::remove_dir_all(d.job(4)).unwrap();
    d.kill9();
    d.spawn();
    let id = d.submit_new("j5.yaml", &echo_job("j5", "x"));
    assert_eq!(id, 5, "ID 4 was given again\n{}", d.diagnostics());
    d.wait_done(5, "SUCCEEDED");
    let id = d.submit_new("j6.yaml", &echo_job("j6", "x"));
    assert_eq!(id, 6);
    d.wait_done(6, "SUCCEEDED");
}

/// A symbolic link and a FIFO moved into incoming/ are rejected as they are: the link is not
/// followed (its target stays where it is, unread), the FIFO is not opened (the daemon does
/// not block on it).
#[test]
fn symlink_and_fifo_moved_in_are_rejected_unopened() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let dog = Watchdog::arm(&d, Duration::from_secs(60));
    let s = d.scratch();
    let incoming = d.path("incoming");
    let marker = s.join("target-ran");
    let target_text = format!("name: target\nrun: touch '{}'\n", marker.display());
    fs::write(s.join("target.yaml"), &target_text).unwrap();
    std::os::unix::fs::symlink(s.join("target.yaml"), s.join("link.yaml")).unwrap();
    nix::unistd::mkfifo(
        &s.join("pipe.yaml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    fs::rename(s.join("link.yaml"), incoming.join("link.yaml")).unwrap();
    fs::rename(s.join("pipe.yaml"), incoming.join("pipe.yaml")).unwrap();
    let reason = d.wait_rejected("link.yaml");
    assert!(reason.contains("symbolic link"), "{reason}");
    let reason = d.wait_rejected("pipe.yaml");
    assert!(reason.contains("FIFO"), "{reason}");
    let id = d.submit("good.yaml", &echo_job("good", "good"));
    assert_eq!(id, 1, "nothing was admitted from the link or the FIFO");
    d.wait_done(id, "SUCCEEDED");
    assert!(fs::symlink_metadata(d.path("rejected/link.yaml"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(fs::symlink_metadata(d.path("rejected/pipe.yaml"))
        .unwrap()
        .file_type()
        .is_fifo());
    assert_eq!(
        fs::read_to_string(s.join("target.yaml")).unwrap(),
        target_text
    );
    assert!(!marker.exists(), "the link's target ran");
    assert_eq!(d.job_ids(), vec![1]);
    dog.disarm();
}

/// The same hostile entries made in place before the daemon starts (no event announces
/// them): the start-up scan rejects them without blocking; a hard link is refused too.
#[test]
fn symlink_fifo_and_hard_link_found_at_start_up_are_rejected() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    d.stop();
    let s = d.scratch();
    let incoming = d.path("incoming");
    let marker = s.join("target-ran");
    let target_text = format!("name: target\nrun: touch '{}'\n", marker.display());
    fs::write(s.join("target.yaml"), &target_text).unwrap();
    std::os::unix::fs::symlink(s.join("target.yaml"), incoming.join("link.yaml")).unwrap();
    nix::unistd::mkfifo(
        &incoming.join("pipe.yaml"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    fs::write(s.join("hard.yaml"), &target_text).unwrap();
    fs::hard_link(s.join("hard.yaml"), incoming.join("hard.yaml")).unwrap();
    // A start-up scan that blocks makes spawn() time out (and the harness's stop() SIGKILLs
    // a daemon that does not act on SIGTERM).
    d.spawn();
    let dog = Watchdog::arm(&d, Duration::from_secs(60));
    assert!(d.wait_rejected("link.yaml").contains("symbolic link"));
    assert!(d.wait_rejected("pipe.yaml").contains("FIFO"));
    assert!(d.wait_rejected("hard.yaml").contains("hard link"));
    let id = d.submit("good.yaml", &echo_job("good", "good"));
    assert_eq!(id, 1);
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(
        fs::read_to_string(s.join("target.yaml")).unwrap(),
        target_text
    );
    assert_eq!(
        fs::read_to_string(s.join("hard.yaml")).unwrap(),
        target_text
    );
    assert!(!marker.exists(), "the target ran");
    assert_eq!(d.job_ids(), vec![1]);
    dog.disarm();
}
