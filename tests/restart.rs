//! A daemon that dies (SIGKILL) leaves its jobs running; the next start re-adopts them,
//! keeps their resources, settles what ended meanwhile and runs each pending job once.
mod common;
use common::*;
use std::fs;
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

fn count(ran: &Path, name: &str) -> usize {
    fs::read_to_string(ran)
        .unwrap_or_default()
        .lines()
        .filter(|l| *l == name)
        .count()
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
    wait_until(
        DEADLINE,
        "job 1 to run",
        || d.log(id1).contains("before"),
        || d.diagnostics(),
    );
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
    assert_eq!(count(&ran, "two"), 0);
    assert!(alive(supervisor));

    gate.open();
    d.wait_done(id1, "SUCCEEDED");
    assert_eq!(d.log(id1), "before\nafter\n", "{}", d.diagnostics());
    assert_eq!(d.info(id1)["exit_codes"], serde_json::json!([0]));
    d.wait_done(id2, "SUCCEEDED");
    d.wait_done(id3, "SUCCEEDED");
    for name in ["held", "two", "three", "four"] {
        assert_eq!(
            count(&ran, name),
            1,
            "{name} ran {} times\n{}",
            count(&ran, name),
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
    wait_until(
        DEADLINE,
        "job 1 to run",
        || d.log(id1).contains("before"),
        || d.diagnostics(),
    );
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
    assert_eq!(count(&ran, "two"), 1);
    assert_eq!(count(&ran, "held"), 1);
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
    wait_until(
        DEADLINE,
        "job 1 to run",
        || d.log(id1).contains("before"),
        || d.diagnostics(),
    );
    d.kill9();
    d.cancel(id1);
    d.cancel(id2);
    d.spawn();
    d.wait_done(id1, "CANCELLED");
    d.wait_done(id2, "CANCELLED");
    assert_eq!(count(&ran, "two"), 0, "the pending job ran");
    assert!(!d.log(id1).contains("after"));
}
