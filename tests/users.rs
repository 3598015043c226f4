//! Jobs run as the user who submitted them; only the owner (or root) may cancel.
//! Needs root and the users `skyspool-alice` / `skyspool-bob` (made by `.ci/run`).
mod common;
use common::*;
use std::process::Command;

fn have_users() -> bool {
    if !is_root() {
        skip("not root: cannot run jobs as other users");
        return false;
    }
    for u in ["skyspool-alice", "skyspool-bob"] {
        if nix::unistd::User::from_name(u).ok().flatten().is_none() {
            skip(&format!("user {u} does not exist (.ci/run creates it)"));
            return false;
        }
    }
    true
}

/// Runs `sh -c CMD` as `user`; returns (exit code, stderr).
fn as_user(user: &str, cmd: &str) -> (i32, String) {
    let out = Command::new("su")
        .args([user, "-s", "/bin/sh", "-c", cmd])
        .output()
        .expect("su");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn job_runs_as_submitter_and_only_owner_cancels() {
    if !have_users() {
        return;
    }
    let d = Daemon::start(&["--gpus", "none", "--kill-grace", "1"]);
    // World-traversable so the users can reach the spool under the test's temp dir.
    let mut p = d.spool.clone();
    while let Some(parent) = p.parent() {
        let _ = std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        if parent == std::path::Path::new("/tmp") || parent == std::path::Path::new("/") {
            break;
        }
        p = parent.to_path_buf();
    }
    let yaml = "name: mine\nrun: |\n  echo \"who=$(id -un) uid=$(id -u) home=$HOME user=$USER sky=$SKYPILOT_USER\"\n  sleep 1000\n";
    let src = format!("/tmp/skyspool-users-{}.yaml", std::process::id());
    std::fs::write(&src, yaml).unwrap();
    std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (rc, err) = as_user(
        "skyspool-alice",
        &format!("cp {src} {}/incoming/alice.yaml", d.spool.display()),
    );
    assert_eq!(rc, 0, "alice could not submit: {err}");
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
    let _ = std::fs::remove_file(&src);
}
