//! Cancelling jobs (pending and running, with everything they started), failures, and the
//! `status` command's exit codes.
mod common;
use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

fn gated(name: &str, accel: &str, gate: &Gate, marker: &Path) -> String {
    format!(
        "name: {name}\nresources:\n  accelerators: {accel}\nrun: |\n  touch '{}'\n  {}\n",
        marker.display(),
        gate.wait_cmd()
    )
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A cancelled pending job never starts, even once resources free up.
#[test]
fn cancelled_pending_job_never_starts() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "one");
    let m1 = s.join("ran-1");
    let m2 = s.join("ran-2");
    let id1 = d.submit("one.yaml", &gated("one", "H100:1", &gate, &m1));
    let id2 = d.submit("two.yaml", &gated("two", "H100:1", &gate, &m2));
    d.wait_queue_status(id2, "PENDING");
    assert_eq!(d.status(id1), "RUNNING");
    d.cancel(id2);
    d.wait_done(id2, "CANCELLED");
    assert!(!d.path(&format!("pending/{id2}")).exists());
    assert!(
        d.log(id2).contains("cancelled before it started"),
        "{}",
        d.diagnostics()
    );
    assert_eq!(d.info(id2)["status"], serde_json::json!("CANCELLED"));
    assert!(d.info(id2)["started"].is_null(), "{:#}", d.info(id2));
    // The GPU frees up: a later job takes it, the cancelled one stays cancelled.
    gate.open();
    d.wait_done(id1, "SUCCEEDED");
    let id3 = d.submit(
        "three.yaml",
        "name: three\nresources:\n  accelerators: H100:1\nrun: echo three\n",
    );
    d.wait_done(id3, "SUCCEEDED");
    assert!(!m2.exists(), "the cancelled job ran\n{}", d.diagnostics());
    assert_eq!(d.status(id2), "CANCELLED");
    assert_eq!(d.queue_status(id2).as_deref(), Some("CANCELLED"));
}

/// Cancelling a running job stops every process it started: background children, a child
/// in a session of its own, a daemonized grandchild, all ignoring SIGTERM (killed after
/// `--kill-grace`).
#[test]
fn cancel_kills_every_process_of_the_job() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8", "--kill-grace", "1"]);
    let s = d.scratch();
    let pids = s.join("pids");
    let p = pids.display();
    let yaml = format!(
        "name: stubborn\nrun: |\n  trap '' TERM\n  echo $$ >> '{p}'\n  \
         sleep 1000 &\n  echo $! >> '{p}'\n  \
         setsid bash -c 'echo $$ >> \"$0\"; exec sleep 1000' '{p}' &\n  \
         ( setsid bash -c 'echo $$ >> \"$0\"; exec sleep 1000' '{p}' & )\n  \
         bash -c 'echo $$ >> \"$0\"; while :; do sleep 0.05; done' '{p}' &\n  \
         until [ \"$(wc -l < '{p}')\" -ge 5 ]; do sleep 0.01; done\n  \
         echo ready\n  while :; do sleep 0.05; done\n"
    );
    let id = d.submit("stubborn.yaml", &yaml);
    wait_until(
        DEADLINE,
        "the job to start its processes",
        || d.log(id).contains("ready"),
        || d.diagnostics(),
    );
    let recorded = read_pids(&pids);
    assert_eq!(recorded.len(), 5, "{recorded:?}");
    for pid in &recorded {
        assert!(alive(*pid), "pid {pid} should be running before the cancel");
    }
    d.cancel(id);
    d.wait_status(id, "CANCELLED");
    let left: Vec<u32> = recorded.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "processes of the cancelled job still alive: {left:?}\n{}",
        d.diagnostics()
    );
    d.wait_done(id, "CANCELLED");
    let info = d.info(id);
    assert_eq!(info["status"], serde_json::json!("CANCELLED"), "{info:#}");
    assert!(info["ended"].is_string(), "{info:#}");
    // Its resources are free again.
    let id2 = d.submit(
        "after.yaml",
        "name: after\nresources:\n  accelerators: H100:4\nrun: echo after\n",
    );
    d.wait_done(id2, "SUCCEEDED");
}

/// A job that ends normally leaves nothing running behind it.
#[test]
fn background_processes_end_with_a_succeeded_job() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let pids = s.join("pids");
    let p = pids.display();
    let yaml = format!(
        "name: leaky\nrun: |\n  sleep 1000 &\n  echo $! >> '{p}'\n  \
         setsid bash -c 'echo $$ >> \"$0\"; exec sleep 1000' '{p}' &\n  \
         ( setsid bash -c 'echo $$ >> \"$0\"; exec sleep 1000' '{p}' & )\n  \
         nohup sleep 1000 >/dev/null 2>&1 &\n  echo $! >> '{p}'\n  \
         until [ \"$(wc -l < '{p}')\" -ge 4 ]; do sleep 0.01; done\n  echo main-done\n"
    );
    let id = d.submit("leaky.yaml", &yaml);
    d.wait_status(id, "SUCCEEDED");
    let recorded = read_pids(&pids);
    assert_eq!(recorded.len(), 4, "{recorded:?}\n{}", d.diagnostics());
    let left: Vec<u32> = recorded.iter().copied().filter(|p| alive(*p)).collect();
    assert!(
        left.is_empty(),
        "processes left by a finished job still alive: {left:?}\n{}",
        d.diagnostics()
    );
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(d.log(id), "main-done\n");
    assert_eq!(d.info(id)["exit_codes"], serde_json::json!([0]));
}

/// `skyspool cancel ID` and `skyspool cancel --all`.
#[test]
fn cancel_cli_by_id_and_all() {
    let mut d = Daemon::start(&["--gpus", "H100:2", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "never");
    let id1 = d.submit("a.yaml", &gated("a", "H100:1", &gate, &s.join("m1")));
    let id2 = d.submit("b.yaml", &gated("b", "H100:1", &gate, &s.join("m2")));
    let id3 = d.submit("c.yaml", &gated("c", "H100:2", &gate, &s.join("m3")));
    d.wait_queue_status(id3, "PENDING");
    assert_eq!(d.status(id1), "RUNNING");
    assert_eq!(d.status(id2), "RUNNING");

    let out = d.cli(&["cancel", &id1.to_string()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(
        stdout(&out).contains(&format!("cancelling job {id1}")),
        "{}",
        stdout(&out)
    );
    d.wait_done(id1, "CANCELLED");
    // One GPU free is not enough for job 3.
    assert_eq!(d.status(id3), "PENDING");
    assert_eq!(d.status(id2), "RUNNING");

    let out = d.cli(&["cancel", &id1.to_string()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("already ended"), "{}", stdout(&out));

    let out = d.cli(&["cancel", "99"]);
    assert!(!out.status.success(), "cancel of a missing job must fail");
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));

    let out = d.cli(&["cancel", "--all"]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    let text = stdout(&out);
    assert!(text.contains(&format!("cancelling job {id2}")), "{text}");
    assert!(text.contains(&format!("cancelling job {id3}")), "{text}");
    assert!(!text.contains(&format!("cancelling job {id1}")), "{text}");
    d.wait_done(id2, "CANCELLED");
    d.wait_done(id3, "CANCELLED");

    let out = d.cli(&["cancel", "--all"]);
    assert!(out.status.success());
    assert!(
        stdout(&out).contains("no jobs to cancel"),
        "{}",
        stdout(&out)
    );
}

/// Failures: a non-zero exit is FAILED with its code; a failing setup is FAILED_SETUP and
/// run never runs. `skyspool status` answers with `sky logs --status` exit codes.
#[test]
fn failures_and_status_exit_codes() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let ran = s.join("run-ran");
    let gate = Gate::new(&s, "hold");
    let ok = d.submit("ok.yaml", "name: ok\nrun: echo fine\n");
    let failed = d.submit(
        "fail.yaml",
        "name: fail\nrun: |\n  echo failing\n  exit 3\n",
    );
    let bad_setup = d.submit(
        "badsetup.yaml",
        &format!(
            "name: badsetup\nsetup: |\n  echo setting-up\n  exit 7\nrun: touch '{}'\n",
            ran.display()
        ),
    );
    let held = d.submit(
        "held.yaml",
        &format!("name: held\nrun: |\n  {}\n", gate.wait_cmd()),
    );
    d.wait_done(ok, "SUCCEEDED");
    d.wait_done(failed, "FAILED");
    d.wait_done(bad_setup, "FAILED_SETUP");
    d.wait_status(held, "RUNNING");
    assert_eq!(
        d.info(failed)["exit_codes"],
        serde_json::json!([3]),
        "{:#}",
        d.info(failed)
    );
    assert_eq!(d.log(failed), "failing\n");
    assert!(
        !ran.exists(),
        "run ran after a failed setup\n{}",
        d.diagnostics()
    );
    assert!(
        d.log(bad_setup).starts_with("setting-up\n"),
        "{}",
        d.log(bad_setup)
    );
    assert_eq!(d.info(bad_setup)["exit_codes"], serde_json::json!([7]));
    let cancelled = d.submit(
        "cancelled.yaml",
        &format!(
            "name: cancelled\nrun: |\n  echo started\n  {}\n",
            gate.wait_cmd()
        ),
    );
    // Cancel once the run is under way (a cancel in the first instants of a job is
    // `cancel_right_after_start_ends_cancelled`'s subject).
    wait_until(
        DEADLINE,
        "job to start",
        || d.log(cancelled).contains("started"),
        || d.diagnostics(),
    );
    d.cancel(cancelled);
    d.wait_done(cancelled, "CANCELLED");

    let code = |id: u64| {
        let out = d.cli(&["status", &id.to_string()]);
        (out.status.code(), stdout(&out).trim().to_string())
    };
    assert_eq!(code(ok), (Some(0), "SUCCEEDED".to_string()));
    assert_eq!(code(failed), (Some(100), "FAILED".to_string()));
    assert_eq!(code(bad_setup), (Some(100), "FAILED_SETUP".to_string()));
    assert_eq!(code(cancelled), (Some(103), "CANCELLED".to_string()));
    assert_eq!(code(held), (Some(101), "RUNNING".to_string()));
    assert_eq!(code(999).0, Some(102));
    gate.open();
    d.wait_done(held, "SUCCEEDED");
    assert_eq!(code(held), (Some(0), "SUCCEEDED".to_string()));
}

/// A cancel that comes the moment a job has started (its status says RUNNING, its
/// supervisor is just being born) still ends the job CANCELLED, not FAILED_DRIVER.
#[test]
fn cancel_right_after_start_ends_cancelled() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "never");
    let mut ids = Vec::new();
    for i in 0..5 {
        let id = d.submit(
            &format!("quick-{i}.yaml"),
            &format!("name: quick-{i}\nrun: |\n  {}\n", gate.wait_cmd()),
        );
        // Spin (no sleep): cancel as soon as the daemon has marked the job RUNNING.
        let deadline = Instant::now() + Duration::from_secs(30);
        while d.status(id) != "RUNNING" {
            assert!(
                Instant::now() < deadline,
                "job {id} never started\n{}",
                d.diagnostics()
            );
            std::hint::spin_loop();
        }
        d.cancel(id);
        wait_until(
            DEADLINE,
            &format!("job {id} to end"),
            || d.path(&format!("done/{id}")).exists(),
            || d.diagnostics(),
        );
        ids.push(id);
    }
    let statuses: Vec<String> = ids.iter().map(|id| d.status(*id)).collect();
    assert!(
        statuses.iter().all(|s| s == "CANCELLED"),
        "cancelled jobs ended {statuses:?}\n{}",
        d.diagnostics()
    );
}
