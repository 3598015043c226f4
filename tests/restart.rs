//! A daemon that dies (SIGKILL) leaves its jobs running; the next start re-adopts them,
//! keeps their resources, settles what ended meanwhile and runs each pending job once.
mod common;
use common::*;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Appends `tag` to the scratch file `ran` (one line per run of a job).
fn once_job(name: &str, accel: Option<&str>, ran: &Path) -> String {
    let resources = accel
        .map(|a| format!("resources:\n  accelerators: {a}\n"))
        .unwrap_or_default();
    format!(
        "name: {name}\n{resources}run: |\n  echo {name} >> '{}'\n  echo {name}-ran\n",
        ran.display()
    )
}

fn held_job(name: &str, ran: &Path, gate: &Gate) -> String {
    format!(
        "name: {name}\nresources:\n  accelerators: H100:1\nrun: |\n  echo before\n  \
         echo {name} >> '{}'\n  {}\n  echo after\n",
        ran.display(),
        gate.wait_cmd()
    )
}

/// Waits until a [`held_job`] runs (it has printed `before` and waits at its gate).
fn wait_held_running(d: &Daemon, id: u64, what: &str) {
    wait_until(
        DEADLINE,
        what,
        || d.log(id).contains("before"),
        || d.diagnostics(),
    );
}

/// The job1 of this test holds the only GPU when the daemon is SIGKILLed; jobs 2 and 3 wait.
#[test]
fn running_job_survives_and_is_readopted() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let gate = Gate::new(&s, "held");
    let id1 = d.submit("held.yaml", &held_job("held", &ran, &gate));
    let id2 = d.submit("two.yaml", &once_job("two", Some("H100:1"), &ran));
    let id3 = d.submit("three.yaml", &once_job("three", Some("H100:1"), &ran));
    d.wait_queue_status(id3, "PENDING");
    wait_held_running(&d, id1, "job 1 to run");
    let supervisor = d.supervisor_pid(id1).expect("the supervisor's record");

    d.kill9();
    // The job does not notice.
    assert!(alive(supervisor), "the supervisor died with the daemon");
    assert_eq!(d.status(id1), "RUNNING");
    // A submission made while no daemon runs (CPU only: it fits beside job 1).
    d.drop_yaml("four.yaml", &once_job("four", None, &ran));

    d.spawn();
    // spawn() returns after the first scheduling pass (the daemon wrote `nodes`).
    assert_eq!(d.status(id1), "RUNNING", "{}", d.diagnostics());
    assert!(d.path(&format!("running/{id1}")).exists());
    assert_eq!(
        d.queue_status(id1).as_deref(),
        Some("RUNNING"),
        "{}",
        d.diagnostics()
    );
    assert_eq!(d.status(id2), "PENDING", "{}", d.diagnostics());
    assert_eq!(d.status(id3), "PENDING", "{}", d.diagnostics());
    assert!(
        d.daemon_log().contains(&format!("job {id1}: re-adopted")),
        "{}",
        d.diagnostics()
    );
    // Job 4 is admitted and runs; jobs 2 and 3 still wait for job 1's GPU.
    d.wait_admitted(4);
    d.wait_done(4, "SUCCEEDED");
    assert_eq!(
        d.status(id2),
        "PENDING",
        "the re-adopted job's GPU was given away\n{}",
        d.diagnostics()
    );
    assert_eq!(d.status(id3), "PENDING", "{}", d.diagnostics());
    assert_eq!(count_lines(&ran, "two"), 0);
    assert!(alive(supervisor));

    gate.open();
    d.wait_done(id1, "SUCCEEDED");
    assert_eq!(d.log(id1), "before\nafter\n", "{}", d.diagnostics());
    assert_eq!(d.info(id1)["exit_codes"], serde_json::json!([0]));
    d.wait_done(id2, "SUCCEEDED");
    d.wait_done(id3, "SUCCEEDED");
    for name in ["held", "two", "three", "four"] {
        assert_eq!(
            count_lines(&ran, name),
            1,
            "{name} ran {} times\n{}",
            count_lines(&ran, name),
            fs::read_to_string(&ran).unwrap_or_default()
        );
    }
    assert_eq!(d.log(id2), "two-ran\n");
    assert_eq!(d.log(id3), "three-ran\n");
}

/// A job that ends while no daemon runs is settled by the next start (final status kept,
/// moved to done/, its GPU given to the next job).
#[test]
fn job_that_ends_while_daemon_is_down_is_settled() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let gate = Gate::new(&s, "held");
    // Job 1 carries a secret: its private copy must go once the job has ended.
    let held = held_job("held", &ran, &gate).replacen(
        "name: held\n",
        "name: held\nsecrets:\n  TOKEN: tok-8812\n",
        1,
    );
    let id1 = d.submit("held.yaml", &held);
    let id2 = d.submit("two.yaml", &once_job("two", Some("H100:1"), &ran));
    d.wait_queue_status(id2, "PENDING");
    wait_held_running(&d, id1, "job 1 to run");
    let secrets = d.path(&format!(".skyspool/secrets/{id1}.json"));
    assert!(
        secrets.exists(),
        "secrets are kept privately while the job lives"
    );
    d.kill9();
    gate.open();
    // The supervisor records the end itself.
    d.wait_status(id1, "SUCCEEDED");
    assert_eq!(d.status(id2), "PENDING");
    d.spawn();
    d.wait_done(id1, "SUCCEEDED");
    d.wait_done(id2, "SUCCEEDED");
    assert_eq!(d.log(id1), "before\nafter\n");
    // The record is settled like any ended job's.
    let info = d.info(id1);
    let mut problems = Vec::new();
    if info["status"] != serde_json::json!("SUCCEEDED") {
        problems.push(format!("info.json status is {}", info["status"]));
    }
    if info["exit_codes"] != serde_json::json!([0]) {
        problems.push(format!("info.json exit_codes is {}", info["exit_codes"]));
    }
    if !info["ended"].is_string() {
        problems.push(format!("info.json ended is {}", info["ended"]));
    }
    if secrets.exists() {
        problems.push(format!(
            "the ended job's secrets remain in {}",
            secrets.display()
        ));
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\n{info:#}\n{}",
        d.diagnostics()
    );
    assert_eq!(count_lines(&ran, "two"), 1);
    assert_eq!(count_lines(&ran, "held"), 1);
}

/// An idle daemon makes the next ID's staging directory ahead (the next lone submission's
/// launch then waits for no directory to be made). A daemon killed with one prepared leaves
/// no job and no gap behind: the next start removes it and gives its ID to the next
/// submission, which runs once.
#[test]
fn staging_prepared_ahead_uses_no_id_across_a_restart() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "2"]);
    let ran = d.scratch().join("ran");
    let id = d.submit("one.yaml", &once_job("one", None, &ran));
    d.wait_done(id, "SUCCEEDED");
    let prepared = d.path(&format!(".skyspool/staging/{}", id + 1));
    wait_until(
        DEADLINE,
        "the next ID's staging directory to be prepared",
        || prepared.join(".sky").is_dir() && prepared.join("log").is_file(),
        || d.diagnostics(),
    );
    d.kill9();
    d.spawn();
    let two = d.submit("two.yaml", &once_job("two", None, &ran));
    assert_eq!(two, id + 1, "the prepared directory used an ID up");
    d.wait_done(two, "SUCCEEDED");
    assert_eq!(d.job_ids(), vec![id, two]);
    assert_eq!(d.log(two), "two-ran\n");
    assert_eq!(count_lines(&ran, "two"), 1);
}

/// What a daemon killed between writing a temporary file and renaming it leaves behind (a
/// rejection's reason, a state link, `nodes.json`, a running job's `info.json`) is gone once
/// the next daemon has started; a user's file of a like name (in `incoming/`, the safe
/// protocol's) and a job's `status` temporary (a live supervisor's) are not.
#[test]
fn temporaries_of_a_killed_daemon_are_removed_at_the_next_start() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "hold");
    let id = d.submit("held.yaml", &held_job("held", &s.join("ran"), &gate));
    wait_held_running(&d, id, "the held job to run");
    d.kill9();
    let job = format!("jobs/{id}");
    let stale = [
        ".nodes.json.tmp.4000001".to_string(),
        "rejected/.bad.yaml.reason.tmp.4000001".into(),
        "rejected/.bad.yaml.tmp.4000001".into(),
        format!("{job}/.info.json.tmp.4000001"),
        format!("{job}/.cancel.fuse.4000001.7"),
    ];
    let kept = [
        "incoming/.mine.yaml.tmp".to_string(),
        format!("{job}/.status.tmp.4000002"),
    ];
    for rel in stale.iter().chain(&kept) {
        fs::write(d.path(rel), "half written").expect("plant a temporary file");
    }
    let link = d.path(&format!("running/.{id}.tmp"));
    std::os::unix::fs::symlink(format!("../jobs/{id}"), &link).expect("plant a link");
    d.spawn();
    wait_until(
        DEADLINE,
        "the killed daemon's temporary files to be removed",
        || stale.iter().all(|rel| !d.path(rel).exists()) && fs::symlink_metadata(&link).is_err(),
        || d.diagnostics(),
    );
    for rel in &kept {
        assert!(d.path(rel).exists(), "{rel} was removed");
    }
    assert!(
        d.daemon_log().contains("removed 6 temporary file(s)"),
        "{}",
        d.daemon_log()
    );
    gate.open();
    d.wait_done(id, "SUCCEEDED");
}

/// A cancel requested while no daemon runs is carried out by the next start.
#[test]
fn cancel_made_while_daemon_is_down_is_applied_at_start() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let gate = Gate::new(&s, "never");
    let id1 = d.submit("held.yaml", &held_job("held", &ran, &gate));
    let id2 = d.submit("two.yaml", &held_job("two", &ran, &gate));
    d.wait_queue_status(id2, "PENDING");
    wait_held_running(&d, id1, "job 1 to run");
    d.kill9();
    d.cancel(id1);
    d.cancel(id2);
    d.spawn();
    d.wait_done(id1, "CANCELLED");
    d.wait_done(id2, "CANCELLED");
    assert_eq!(count_lines(&ran, "two"), 0, "the pending job ran");
    assert!(!d.log(id1).contains("after"));
}

/// The live `skyspool supervise` processes that are children of the daemon: its launcher
/// (the jobs' supervisors are the launcher's children).
fn supervise_children(d: &Daemon) -> Vec<u32> {
    let Some(daemon) = d.pid() else {
        return Vec::new();
    };
    let bin = fs::canonicalize(BIN).unwrap_or_else(|_| BIN.into());
    let mut pids = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if parent_of(pid) != Some(daemon) {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let argv: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_supervise = matches!(argv.as_slice(), [exe, arg, last]
            if *arg == b"supervise" && last.is_empty()
                && fs::canonicalize(std::ffi::OsStr::from_bytes(exe)).is_ok_and(|p| p == bin));
        if is_supervise && alive(pid) {
            pids.push(pid);
        }
    }
    pids
}

/// The daemon's launcher: its one `supervise` child. `None` unless there is exactly one.
fn launcher(d: &Daemon) -> Option<u32> {
    let mut all = supervise_children(d);
    (all.len() == 1).then(|| all.remove(0))
}

/// Waits for the daemon's launcher to start; its pid.
fn launcher_once_started(d: &Daemon) -> u32 {
    let mut first = None;
    wait_until(
        DEADLINE,
        "the launcher to start",
        || {
            first = launcher(d);
            first.is_some()
        },
        || {
            format!(
                "supervise children {:?}\n{}",
                supervise_children(d),
                d.diagnostics()
            )
        },
    );
    first.expect("launcher")
}

/// Someone SIGKILLs the daemon's launcher: the next job still starts (through a fresh
/// launcher), runs once and succeeds; the new launcher forks the supervisors after that.
#[test]
fn killed_launcher_is_replaced() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let old = launcher_once_started(&d);
    send_signal(old, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL the launcher");
    wait_until(
        DEADLINE,
        "the launcher to die",
        || !alive(old),
        || d.diagnostics(),
    );

    let id = d.submit_new("echo.yaml", &once_job("echo", Some("H100:1"), &ran));
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(d.log(id), "echo-ran\n", "{}", d.diagnostics());
    assert_eq!(count_lines(&ran, "echo"), 1);
    let sup = d.supervisor_pid(id).expect("the job's supervisor record");
    assert_ne!(
        sup, old,
        "the dead launcher recorded itself as a supervisor"
    );
    let log = d.daemon_log();
    assert!(
        log.contains(&format!("launcher pid {old} failed")),
        "the daemon did not say it replaced the dead launcher\n{}",
        d.diagnostics()
    );
    assert!(
        !log.contains("could not start"),
        "the job's start failed\n{}",
        d.diagnostics()
    );

    // The new launcher forks the next job's supervisor.
    let new = launcher(&d).expect("a new launcher");
    assert_ne!(new, old);
    let gate = Gate::new(&s, "two");
    let id2 = d.submit_new("two.yaml", &held_job("two", &ran, &gate));
    wait_held_running(&d, id2, "job two to run");
    let sup2 = d.supervisor_pid(id2).expect("job two's supervisor record");
    assert_eq!(
        parent_of(sup2),
        Some(new),
        "job two's supervisor is not the new launcher's child\n{}",
        d.diagnostics()
    );
    gate.open();
    d.wait_done(id2, "SUCCEEDED");
    assert_eq!(count_lines(&ran, "two"), 1);
    assert_eq!(d.daemon_log().matches("failed (").count(), 1);
}

/// A launcher that stops answering (here: SIGSTOPped) is taken as lost after 10 s at the
/// next event: it is killed, the launch it never read goes to a new launcher, and the job
/// runs once.
#[test]
fn launcher_that_stops_answering_is_replaced() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let ran = d.scratch().join("ran");
    let old = launcher_once_started(&d);
    let _stopped = stop_process(old, "the launcher");
    let id = d.submit_new("late.yaml", &once_job("late", Some("H100:1"), &ran));
    // Events make the daemon look at its unanswered launches (a name it ignores will do).
    let nudge = d.path("incoming").join(".nudge");
    wait_until(
        DEADLINE,
        "the job to run through a new launcher",
        || {
            let _ = fs::write(&nudge, b"");
            d.status(id) == "SUCCEEDED"
        },
        || d.diagnostics(),
    );
    assert_eq!(count_lines(&ran, "late"), 1, "{}", d.diagnostics());
    assert!(!alive(old), "the stopped launcher was not killed");
    assert!(
        d.daemon_log()
            .contains(&format!("launcher pid {old} failed (no answer for 10 s)")),
        "{}",
        d.diagnostics()
    );
}

/// Whether a SIGTERM waits in process `pid` (`ShdPnd` of `/proc/PID/status`).
fn term_pending(pid: u32) -> bool {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (libc::SIGTERM - 1)) != 0)
}

/// Whether process `pid` has `path` open.
fn has_open(pid: u32, path: &Path) -> bool {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.flatten()
                .any(|e| fs::read_link(e.path()).is_ok_and(|t| t == path))
        })
        .unwrap_or(false)
}

/// A supervisor that has finished its job takes the next one (no fork per job). A SIGTERM
/// meant for the last job (a cancel that crossed its end), pending when the next job comes
/// or arriving while it runs, does not cancel the next: only a `cancel` file does. When the
/// daemon stops, the free supervisors leave with the launcher. (Without prestarts: the bash
/// started ahead after job one, for its user's next job, would take job two, on whichever
/// supervisor the launcher had free or forked at that moment.)
#[test]
fn free_supervisor_takes_the_next_job_and_leaves_with_the_launcher() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8", "--prestart", "0"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let term = |pid: u32| {
        send_signal(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the supervisor")
    };
    let one = d.submit_new("one.yaml", &once_job("one", Some("H100:1"), &ran));
    d.wait_done(one, "SUCCEEDED");
    let sup = d.supervisor_pid(one).expect("job one's supervisor record");
    // It frees job one's lock once the result is durable, after telling the launcher.
    let lock = fs::canonicalize(d.job(one).join(".sky/supervisor.lock")).expect("the lock");
    wait_until(
        DEADLINE,
        "job one's supervisor to let its lock go",
        || !has_open(sup, &lock),
        || d.diagnostics(),
    );
    assert!(
        alive(sup),
        "the free supervisor exited\n{}",
        d.diagnostics()
    );
    // A cancel meant for job one that came too late: pending in the free supervisor.
    term(sup);
    let gate = Gate::new(&s, "two");
    let two = d.submit_new("two.yaml", &held_job("two", &ran, &gate));
    wait_held_running(&d, two, "job two to run");
    assert_eq!(
        d.supervisor_pid(two),
        Some(sup),
        "job two did not go to the free supervisor\n{}",
        d.diagnostics()
    );
    // Another one while job two runs: no `cancel` file, so job two goes on.
    term(sup);
    wait_until(
        DEADLINE,
        "the supervisor to take the SIGTERM",
        || !term_pending(sup),
        || d.diagnostics(),
    );
    assert_eq!(d.status(two), "RUNNING", "{}", d.diagnostics());
    gate.open();
    d.wait_done(two, "SUCCEEDED");
    assert_eq!(d.log(two), "before\nafter\n", "{}", d.diagnostics());
    assert_eq!((count_lines(&ran, "one"), count_lines(&ran, "two")), (1, 1));
    let l = launcher(&d).expect("the launcher");
    assert_eq!(parent_of(sup), Some(l));
    d.stop();
    wait_until(
        DEADLINE,
        "the free supervisor to leave with the launcher",
        || !alive(sup) && !alive(l),
        || d.diagnostics(),
    );
}

/// Whether the main thread of `pid` is blocked in `recvmsg` (a free supervisor waiting for
/// its next launch, after it told the launcher it is free).
fn in_recvmsg(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<i64>().ok())
        == Some(libc::SYS_recvmsg)
}

/// The launcher gives a job to a free supervisor that dies before reading it (stopped, then
/// killed): nothing of the job ran, so it goes back to the queue and runs once, on a new
/// supervisor, instead of ending FAILED_DRIVER. (Without prestarts: job two must come
/// through the launcher, not through a bash started ahead for it.)
#[test]
fn job_given_to_a_supervisor_that_dies_before_reading_it_runs_on_another() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8", "--prestart", "0"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let one = d.submit_new("one.yaml", &once_job("one", Some("H100:1"), &ran));
    d.wait_done(one, "SUCCEEDED");
    let sup = d.supervisor_pid(one).expect("job one's supervisor record");
    wait_until(
        DEADLINE,
        "job one's supervisor to wait, free, for its next job",
        || in_recvmsg(sup),
        || d.diagnostics(),
    );
    // Stopped, it cannot read the launch the launcher puts in its socket.
    let stopped = stop_process(sup, "the supervisor");
    let two = d.submit_new("two.yaml", &once_job("two", Some("H100:1"), &ran));
    let handed = format!("job {two} started (supervisor pid {sup})");
    d.wait_daemon_log(&handed, "job two to be handed to the stopped supervisor");
    drop(stopped); // SIGKILL
    d.wait_done(two, "SUCCEEDED");
    assert_eq!(d.log(two), "two-ran\n", "{}", d.diagnostics());
    assert_eq!((count_lines(&ran, "one"), count_lines(&ran, "two")), (1, 1));
    let requeued = format!("job {two}: its supervisor (pid {sup}) exited before it took the job");
    assert!(d.daemon_log().contains(&requeued), "{}", d.diagnostics());
    let again = d.supervisor_pid(two).expect("job two's supervisor record");
    assert_ne!(again, sup);
}

/// A job whose supervisors keep dying before they read it goes back to the queue three times
/// (`MAX_UNTAKEN`), then ends FAILED_DRIVER instead of going round for ever; nothing of it
/// ran. Four free supervisors are stopped, and each one the job is handed to is killed.
#[test]
fn job_whose_supervisors_keep_dying_unread_fails_after_three_requeues() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "8", "--prestart", "0"]);
    let s = d.scratch();
    let ran = s.join("ran");
    // Four supervisors at once, free once their jobs are over.
    let gates: Vec<Gate> = (0..4).map(|i| Gate::new(&s, &format!("w{i}"))).collect();
    let workers: Vec<u64> = (0..4)
        .map(|i| {
            let yaml = format!("run: |\n  echo before\n  {}\n", gates[i].wait_cmd());
            d.submit(&format!("w{i}.yaml"), &yaml)
        })
        .collect();
    for &w in &workers {
        wait_until(
            DEADLINE,
            "the four workers to run at once",
            || d.log(w).contains("before"),
            || d.diagnostics(),
        );
    }
    let sups: Vec<u32> = workers
        .iter()
        .map(|&w| d.supervisor_pid(w).expect("a worker's supervisor record"))
        .collect();
    gates.iter().for_each(Gate::open);
    for (&w, &sup) in workers.iter().zip(&sups) {
        d.wait_done(w, "SUCCEEDED");
        wait_until(
            DEADLINE,
            "each worker's supervisor to wait, free, for its next job",
            || in_recvmsg(sup),
            || d.diagnostics(),
        );
    }
    // Stopped, none of them can read a launch; killed, each leaves it untaken.
    let mut stopped: std::collections::HashMap<u32, Stopped> = sups
        .iter()
        .map(|&p| (p, stop_process(p, "a free supervisor")))
        .collect();
    let x = d.submit_new("x.yaml", &once_job("x", None, &ran));
    for round in 1..=4 {
        let mut handed = None;
        wait_until(
            DEADLINE,
            &format!("job x to be handed to a stopped supervisor (hand-over {round})"),
            || {
                handed = stopped.keys().copied().find(|p| {
                    d.daemon_log()
                        .contains(&format!("job {x} started (supervisor pid {p})"))
                });
                handed.is_some()
            },
            || d.diagnostics(),
        );
        let pid = handed.unwrap_or_default();
        drop(stopped.remove(&pid)); // SIGKILL
        if round < 4 {
            d.wait_daemon_log(
                &format!("job {x}: its supervisor (pid {pid}) exited before it took the job"),
                "job x back in the queue",
            );
        }
    }
    d.wait_done(x, "FAILED_DRIVER");
    let requeued = d
        .daemon_log()
        .matches(&format!("job {x}: its supervisor"))
        .count();
    assert_eq!(requeued, 3, "{}", d.diagnostics());
    assert_eq!(count_lines(&ran, "x"), 0, "job x ran");
}

/// The daemon hands job A to its supervisor and dies before rewriting `info.json` and moving
/// the link: `info.json` still says PENDING with no start or placement, and the link is in
/// `pending/`. The next start takes both from the launch record, re-adopts A as RUNNING on
/// GPU 0 and keeps that GPU taken; A runs once and succeeds, and B waits for A's GPU.
#[test]
fn crash_after_hand_over_before_info_is_readopted() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let gate = Gate::new(&s, "a");
    let a = d.submit_new("a.yaml", &held_job("a", &ran, &gate));
    let running = d.path(&format!("running/{a}"));
    let pending = d.path(&format!("pending/{a}"));
    wait_until(
        DEADLINE,
        "A to run and be recorded in running/",
        || d.log(a).contains("before") && fs::symlink_metadata(&running).is_ok(),
        || d.diagnostics(),
    );
    let sup = d.supervisor_pid(a).expect("A's supervisor record");
    let before = d.info(a);
    assert!(before["started"].is_string(), "{before:#}");
    d.kill9();
    assert!(alive(sup), "A's supervisor died with the daemon");

    // Back to how a daemon dying right after the hand-over leaves it.
    let mut info = d.info(a);
    info["status"] = serde_json::json!("PENDING");
    info["started"] = serde_json::Value::Null;
    info["placement"] = serde_json::json!([]);
    fs::write(
        d.job(a).join("info.json"),
        serde_json::to_vec_pretty(&info).expect("json"),
    )
    .expect("rewrite info.json");
    fs::remove_file(&running).expect("remove running link");
    std::os::unix::fs::symlink(format!("../jobs/{a}"), &pending).expect("pending link");

    d.spawn();
    // spawn() returns after the first scheduling pass (the daemon wrote `nodes`).
    let info = d.info(a);
    assert_eq!(info["status"], "RUNNING", "{info:#}\n{}", d.diagnostics());
    assert!(info["started"].is_string(), "{info:#}");
    assert_eq!(info["started"], before["started"], "{info:#}");
    let placement = info["placement"].as_array().cloned().unwrap_or_default();
    assert_eq!(placement.len(), 1, "{info:#}");
    assert_eq!(placement[0]["gpus"], serde_json::json!([0]), "{info:#}");
    assert_eq!(placement[0]["accelerator"], "H100", "{info:#}");
    assert_eq!(info["placement"], before["placement"], "{info:#}");
    assert!(
        fs::symlink_metadata(&running).is_ok(),
        "{}",
        d.diagnostics()
    );
    assert!(
        fs::symlink_metadata(&pending).is_err(),
        "{}",
        d.diagnostics()
    );
    assert_eq!(d.status(a), "RUNNING");
    assert_eq!(d.supervisor_pid(a), Some(sup));
    assert!(alive(sup), "A's supervisor died");
    assert!(
        d.daemon_log()
            .contains(&format!("job {a}: re-adopted running supervisor pid {sup}")),
        "{}",
        d.diagnostics()
    );

    // B needs the GPU A still holds: the scheduling pass that admits it leaves it pending.
    let b = d.submit_new("b.yaml", &once_job("b", Some("H100:1"), &ran));
    d.wait_queue_status(b, "PENDING");
    assert_eq!(
        d.queue_status(a).as_deref(),
        Some("RUNNING"),
        "{}",
        d.diagnostics()
    );
    assert_eq!(d.status(b), "PENDING", "{}", d.diagnostics());
    assert_eq!(
        count_lines(&ran, "b"),
        0,
        "B ran on A's GPU\n{}",
        d.diagnostics()
    );
    assert!(alive(sup));

    gate.open();
    d.wait_done(a, "SUCCEEDED");
    d.wait_done(b, "SUCCEEDED");
    assert_eq!(d.log(a), "before\nafter\n", "{}", d.diagnostics());
    assert_eq!(d.log(b), "b-ran\n", "{}", d.diagnostics());
    assert_eq!(d.info(a)["exit_codes"], serde_json::json!([0]));
    assert_eq!(
        count_lines(&ran, "a"),
        1,
        "A ran {} times",
        count_lines(&ran, "a")
    );
    assert_eq!(count_lines(&ran, "b"), 1);
}

/// A queued job that the cluster can no longer hold after a restart (fewer GPUs) is told
/// so in its `log` and in the daemon's, and stays queued (nothing is lost: the GPUs put
/// back would run it); it never starts on what is left, and `cancel` drops it.
#[test]
fn a_queued_job_the_restarted_cluster_cannot_hold_is_told_and_kept() {
    let mut d = Daemon::start(&["--gpus", "H100:2"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "hold");
    let holder = d.submit("hold.yaml", &held_job("hold", &s.join("ran"), &gate));
    wait_held_running(&d, holder, "the holder to run");
    let big = d.submit("big.yaml", &once_job("big", Some("H100:2"), &s.join("ran")));
    assert_eq!(d.status(big), "PENDING");
    d.kill9();
    for a in d.args.iter_mut().filter(|a| *a == "H100:2") {
        *a = "H100:1".into();
    }
    d.spawn();
    d.wait_daemon_log(
        &format!("job {big} can never run on cluster"),
        "the daemon to say job 2 can never run",
    );
    let log = d.log(big);
    assert!(
        log.contains("this job can never run on cluster") && log.contains("It stays queued"),
        "{log}"
    );
    gate.open();
    d.wait_done(holder, "SUCCEEDED");
    assert_eq!(d.status(big), "PENDING", "{}", d.diagnostics());
    d.cancel(big);
    d.wait_done(big, "CANCELLED");
    assert!(!d.log(big).contains("big-ran"), "{}", d.log(big));
}
