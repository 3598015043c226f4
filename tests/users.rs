//! Jobs run as the user who submitted them; only the owner (or root) may cancel.
//! Needs root and the users `skyspool-alice` / `skyspool-bob` (made by `.ci/run`).
mod common;
use common::*;

/// The bash the daemon starts ahead for the next job is its last lone submitter's: another
/// user's next job does not run in it (it is killed at its first line, and the job gets a
/// new log), but as that user, with only its own output in its log.
#[test]
fn a_bash_started_ahead_for_one_user_never_runs_anothers_job() {
    if !have_users() {
        return;
    }
    let d = Daemon::start(&["--gpus", "none"]);
    open_path_to_spool(&d);
    let who = "name: who\nrun: |\n  echo \"who=$(id -un) home=$HOME\"\n";
    submit_as(&d, "skyspool-alice", "alice.yaml", who);
    d.wait_done(1, "SUCCEEDED");
    wait_until(
        DEADLINE,
        "a bash started ahead for job 2, as alice",
        || {
            let pids = job_processes(&d, 2);
            pids.len() == 1
                && std::fs::read_to_string(format!("/proc/{}/status", pids[0]))
                    .unwrap_or_default()
                    .lines()
                    .any(|l| {
                        l.starts_with("Uid:")
                            && l.split_whitespace().nth(1)
                                == nix::unistd::User::from_name("skyspool-alice")
                                    .ok()
                                    .flatten()
                                    .map(|u| u.uid.to_string())
                                    .as_deref()
                    })
        },
        || d.diagnostics(),
    );
    // The file alice's bash writes to (job 2's log as made ahead), held open here so that
    // its inode cannot be given to another file meanwhile.
    let held = job_processes(&d, 2)
        .first()
        .and_then(|pid| std::fs::File::open(format!("/proc/{pid}/fd/1")).ok())
        .expect("the output of alice's bash");
    let held_ino = std::os::unix::fs::MetadataExt::ino(&held.metadata().expect("its inode"));
    submit_as(&d, "skyspool-bob", "bob.yaml", who);
    d.wait_done(2, "SUCCEEDED");
    assert_eq!(d.log(2), "who=skyspool-bob home=/home/skyspool-bob\n");
    assert!(
        !d.daemon_log()
            .contains("job 2: taken by a bash started ahead"),
        "{}",
        d.diagnostics()
    );
    let log = std::fs::metadata(d.job(2).join("log")).expect("job 2's log");
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&log),
        held_ino,
        "bob's job writes to the log alice's bash held"
    );
    let links = std::os::unix::fs::MetadataExt::nlink(&held.metadata().expect("its inode"));
    assert_eq!(links, 0, "the log alice's bash held is still in the spool");
    wait_until(
        DEADLINE,
        "alice's bash for job 2 to go",
        || job_processes(&d, 2).is_empty(),
        || d.diagnostics(),
    );
}

#[test]
fn job_runs_as_submitter_and_only_owner_cancels() {
    if !have_users() {
        return;
    }
    let d = Daemon::start(&["--gpus", "none", "--kill-grace", "1"]);
    // World-traversable so the users can reach the spool under the test's temp dir.
    open_path_to_spool(&d);
    let yaml = "name: mine\nrun: |\n  echo \"who=$(id -un) uid=$(id -u) home=$HOME user=$USER sky=$SKYPILOT_USER\"\n  sleep 1000\n";
    submit_as(&d, "skyspool-alice", "alice.yaml", yaml);
    let status = d.job(1).join("status");
    wait_until(
        DEADLINE,
        "alice's job to be admitted",
        || status.exists(),
        || d.diagnostics(),
    );
    d.wait_status(1, "RUNNING");
    wait_until(
        DEADLINE,
        "the job to print who it is",
        || d.log(1).contains("who="),
        || d.diagnostics(),
    );
    let log = d.log(1);
    assert!(log.contains("who=skyspool-alice"), "{log}");
    assert!(log.contains("home=/home/skyspool-alice"), "{log}");
    assert!(log.contains("user=skyspool-alice"), "{log}");
    assert!(log.contains("sky=skyspool-alice"), "{log}");
    wait_until(
        DEADLINE,
        "the queue to show alice's job",
        || d.queue().contains("skyspool-alice"),
        || d.diagnostics(),
    );

    // Bob can neither cancel alice's job nor forge its state.
    let job = d.job(1);
    let (rc, _) = as_user("skyspool-bob", &format!("touch {}/cancel", job.display()));
    assert_ne!(rc, 0, "bob must not be able to create alice's cancel file");
    let (rc, _) = as_user(
        "skyspool-bob",
        &format!("echo SUCCEEDED > {}/status", job.display()),
    );
    assert_ne!(rc, 0, "bob must not be able to write a status");
    let (rc, _) = as_user(
        "skyspool-alice",
        &format!("echo SUCCEEDED > {}/status", job.display()),
    );
    assert_ne!(rc, 0, "the owner must not be able to forge a status either");
    let (rc, _) = as_user("skyspool-alice", &format!("rm -f {}/status", job.display()));
    assert!(
        job.join("status").exists(),
        "status removed by a user (rc {rc})"
    );
    assert_eq!(d.status(1), "RUNNING");
    // Nor can she swap the daemon's private directory for a link to elsewhere.
    for cmd in [
        format!("rm -rf {}/.sky", job.display()),
        format!("mv {0}/.sky {0}/old", job.display()),
        format!("ln -sfn /etc {}/.sky", job.display()),
    ] {
        let _ = as_user("skyspool-alice", &cmd);
    }
    let sky = std::fs::symlink_metadata(job.join(".sky")).unwrap();
    assert!(
        sky.is_dir() && !sky.file_type().is_symlink(),
        ".sky replaced by its owner"
    );
    assert!(!std::path::Path::new("/etc/supervisor.lock").exists());

    // Alice cancels her own job.
    let (rc, err) = as_user("skyspool-alice", &format!("touch {}/cancel", job.display()));
    assert_eq!(rc, 0, "alice could not cancel: {err}");
    d.wait_done(1, "CANCELLED");
}
