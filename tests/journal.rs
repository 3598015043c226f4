//! The journal: a round is durable once its records are, a job's end once its end record
//! is, and the job files follow with the next checkpoint. A power cut cannot be made in a
//! test, so these tests make what one leaves behind (a job whose files never reached the
//! disk, a job whose files are torn, a finished job whose end never reached the disk) and
//! check that the next start gives each job back its admission or its end, runs it once,
//! and leaves whole jobs alone.
mod common;
use common::*;
use std::fs;
use std::io::Write;

/// Appends one record (the line the daemon writes) to `journal.0`.
fn append_record(d: &Daemon, id: u64, info: &serde_json::Value, yaml: &str) {
    append_line(
        d,
        serde_json::json!({ "id": id, "info": info, "yaml": yaml }),
    );
}

fn append_line(d: &Daemon, line: serde_json::Value) {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(d.path(".skyspool/journal.0"))
        .expect("journal.0");
    writeln!(f, "{line}").expect("append a record");
}

/// Job `id`'s record as it was admitted: PENDING, never started.
fn admitted_info(mut info: serde_json::Value, id: u64, name: &str) -> serde_json::Value {
    info["id"] = id.into();
    info["name"] = name.into();
    info["source"] = format!("incoming/{name}.yaml").into();
    info["status"] = "PENDING".into();
    for k in ["started", "ended", "reason"] {
        info[k] = serde_json::Value::Null;
    }
    info["placement"] = serde_json::json!([]);
    info["exit_codes"] = serde_json::json!([]);
    info
}

/// No checkpoint for an hour after the first record: the journal keeps every line but what
/// a full file's checkpoint drops.
const NO_TIMED_CHECKPOINTS: [&str; 6] = [
    "--gpus",
    "none",
    "--cpus",
    "4",
    "--checkpoint-after",
    "3600",
];

/// Checkpoints a fifth of a second after the first record (instead of 30 s), so that a
/// test sees the journal emptied while the daemon runs.
const QUICK_CHECKPOINTS: [&str; 2] = ["--checkpoint-after", "0.2"];

/// A daemon with no GPUs, 4 CPUs and [`QUICK_CHECKPOINTS`].
fn start_checkpointing_quickly() -> Daemon {
    Daemon::start(&[
        "--gpus",
        "none",
        "--cpus",
        "4",
        QUICK_CHECKPOINTS[0],
        QUICK_CHECKPOINTS[1],
    ])
}

fn waits_for_journal_to_empty(d: &Daemon) {
    wait_until(
        DEADLINE,
        "the journal to be emptied by a checkpoint",
        || d.journal_bytes() == 0,
        || d.diagnostics(),
    );
}

#[test]
fn a_job_whose_files_a_power_cut_lost_is_restored_from_its_record_and_runs_once() {
    let mut d = start_checkpointing_quickly();
    let s = d.scratch();
    let ran = s.join("ran");
    let yaml = |name: &str| {
        format!(
            "name: {name}\nrun: |\n  echo {name} >> '{}'\n  echo {name}-ran\n",
            ran.display()
        )
    };
    let first = d.submit("first.yaml", &yaml("first"));
    d.wait_done(first, "SUCCEEDED");
    // Once a checkpoint has made the job's own files durable, its records are dropped.
    waits_for_journal_to_empty(&d);
    d.stop();

    // What a power cut right after job 2's round leaves: its record in the journal, and
    // nothing of job 2 on disk (its staging, publication and files were still in memory).
    // Job 1, whole and done, also still has a record (the emptying was not on disk yet).
    let info = d.info(first);
    let lost = first + 1;
    append_record(
        &d,
        lost,
        &admitted_info(info.clone(), lost, "lost"),
        &yaml("lost"),
    );
    append_record(
        &d,
        first,
        &admitted_info(info, first, "first"),
        &fs::read_to_string(d.job(first).join("job.yaml")).expect("job.yaml"),
    );
    assert!(!d.job(lost).exists());

    d.spawn();
    d.wait_done(lost, "SUCCEEDED");
    assert_eq!(count_lines(&ran, "lost"), 1, "the restored job runs once");
    assert_eq!(
        count_lines(&ran, "first"),
        1,
        "a whole job is not run again by its old record"
    );
    assert_eq!(d.status(first), "SUCCEEDED");
    assert!(d.log(lost).contains("lost-ran"), "{}", d.log(lost));
    assert_eq!(
        fs::read_to_string(d.job(lost).join("job.yaml")).expect("job.yaml"),
        yaml("lost")
    );
    assert_eq!(d.info(lost)["source"], "incoming/lost.yaml");
    let log = d.daemon_log();
    assert!(
        log.contains(&format!(
            "job {lost} (incoming/lost.yaml): restored from the admission journal"
        )),
        "{log}"
    );
    assert!(
        !log.contains(&format!("job {first} (incoming/first.yaml): restored")),
        "{log}"
    );
    waits_for_journal_to_empty(&d);
    // The restored job's ID is used: the next submission gets the one after it.
    let next = d.submit_new("next.yaml", &yaml("next"));
    assert_eq!(next, lost + 1);
    d.wait_done(next, "SUCCEEDED");
    d.stop();
}

/// A record start-up cannot act on (a directory stands where the job's `job.yaml` would be
/// written again) stays in the journal, alone, through the checkpoints of the daemon that
/// found it and through its clean stop; the first start after the obstacle is gone gives
/// the job back its files, and it runs once. (A clean stop used to empty the journal, and
/// the job was lost.)
#[test]
fn a_record_start_up_could_not_act_on_stays_until_a_start_can() {
    let mut d = start_checkpointing_quickly();
    let s = d.scratch();
    let ran = s.join("ran");
    let yaml = |name: &str| format!("name: {name}\nrun: echo {name} >> '{}'\n", ran.display());
    let first = d.submit("first.yaml", &yaml("first"));
    d.wait_done(first, "SUCCEEDED");
    waits_for_journal_to_empty(&d);
    d.stop();

    let lost = first + 1;
    let record = serde_json::json!({
        "id": lost,
        "info": admitted_info(d.info(first), lost, "lost"),
        "yaml": yaml("lost"),
    });
    append_line(&d, record.clone());
    let kept = record.to_string().len() as u64 + 1;
    let obstacle = d.job(lost).join("job.yaml");
    fs::create_dir_all(&obstacle).expect("a directory where job.yaml goes");
    d.spawn();
    let told = format!("job {lost}: cannot be restored from the admission journal");
    assert!(d.daemon_log().contains(&told), "{}", d.daemon_log());
    assert_eq!(
        d.journal_bytes(),
        kept,
        "only the line not acted on is kept"
    );
    // Jobs come and go, checkpoints run: the line stays, and only it.
    for name in ["second", "third"] {
        let id = d.submit_new(&format!("{name}.yaml"), &yaml(name));
        assert!(id > lost, "job {id} took an ID at or below {lost}");
        d.wait_done(id, "SUCCEEDED");
        wait_until(
            DEADLINE,
            "a checkpoint to leave only the kept line",
            || d.journal_bytes() == kept,
            || d.diagnostics(),
        );
    }
    d.stop();
    assert_eq!(
        d.journal_bytes(),
        kept,
        "a clean stop dropped the kept line"
    );

    fs::remove_dir(&obstacle).expect("the obstacle removed");
    d.spawn();
    d.wait_done(lost, "SUCCEEDED");
    assert_eq!(count_lines(&ran, "lost"), 1, "the restored job runs once");
    waits_for_journal_to_empty(&d);
    d.stop();
    assert_eq!(d.journal_bytes(), 0);
}

/// Submits a job that holds the only GPU until its gate opens; returns the gate and its ID.
fn submit_holder(d: &mut Daemon) -> (Gate, u64) {
    let gate = Gate::new(&d.scratch(), "hold");
    let holder = d.submit(
        "holder.yaml",
        &format!(
            "name: holder\nresources:\n  accelerators: H100:1\nrun: |\n  {}\n",
            gate.wait_cmd()
        ),
    );
    (gate, holder)
}

#[test]
fn a_pending_job_with_torn_files_gets_them_back_from_its_record() {
    let mut d = Daemon::start(&[
        "--gpus",
        "H100:1",
        "--cpus",
        "4",
        QUICK_CHECKPOINTS[0],
        QUICK_CHECKPOINTS[1],
    ]);
    let s = d.scratch();
    let ran = s.join("ran");
    let (gate, holder) = submit_holder(&mut d);
    let waiting_yaml = format!(
        "name: waiting\nresources:\n  accelerators: H100:1\nrun: |\n  echo waiting >> '{}'\n  echo waiting-ran\n",
        ran.display()
    );
    let waiting = d.submit("waiting.yaml", &waiting_yaml);
    d.wait_queue_status(waiting, "PENDING");
    d.wait_status(holder, "RUNNING");
    let info = d.info(waiting);
    assert_eq!(info["status"], "PENDING");
    d.kill9();

    // A power cut tore the waiting job's files (sizes on disk, data not), and its record
    // is still in the journal.
    append_record(&d, waiting, &info, &waiting_yaml);
    for f in ["job.yaml", "info.json"] {
        fs::write(d.job(waiting).join(f), b"").expect("tear a file");
    }

    d.spawn();
    d.wait_admitted(waiting);
    assert_eq!(
        fs::read_to_string(d.job(waiting).join("job.yaml")).expect("job.yaml"),
        waiting_yaml
    );
    assert_eq!(d.info(waiting)["name"], "waiting");
    gate.open();
    d.wait_done(holder, "SUCCEEDED");
    d.wait_done(waiting, "SUCCEEDED");
    assert_eq!(count_lines(&ran, "waiting"), 1);
    assert!(
        d.daemon_log().contains(&format!(
            "job {waiting} (incoming/waiting.yaml): restored from the admission journal"
        )),
        "{}",
        d.daemon_log()
    );
    waits_for_journal_to_empty(&d);
    d.stop();
}

#[test]
fn a_submission_a_power_cut_put_back_in_incoming_does_not_become_a_second_job() {
    use std::os::unix::fs::MetadataExt;
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "4"]);
    let s = d.scratch();
    let ran = s.join("ran");
    let yaml = |name: &str| {
        format!(
            "name: {name}\nrun: |\n  echo {name} >> '{}'\n",
            ran.display()
        )
    };
    let first = d.submit("first.yaml", &yaml("first"));
    d.wait_done(first, "SUCCEEDED");
    d.stop();

    // A power cut right after job 2's round: its line is durable, but neither the claim's
    // rename out of incoming/ nor anything after it reached the disk, so the submission is
    // back in incoming/ under its name, the same file (inode, size, mtime) the line names.
    let back = s.join("back.yaml");
    fs::write(&back, yaml("back")).expect("write the submission");
    let meta = fs::metadata(&back).expect("stat");
    let id = first + 1;
    append_line(
        &d,
        serde_json::json!({
            "id": id,
            "info": admitted_info(d.info(first), id, "back"),
            "yaml": yaml("back"),
            "file": { "ino": meta.ino(), "size": meta.len(),
                      "mtime_ns": meta.mtime() * 1_000_000_000 + meta.mtime_nsec() },
        }),
    );
    fs::rename(&back, d.path("incoming/back.yaml")).expect("back into incoming/");

    d.spawn();
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(count_lines(&ran, "back"), 1, "one submission, one run");
    assert!(d.incoming_names().is_empty(), "{:?}", d.incoming_names());
    assert_eq!(d.job_ids(), vec![first, id], "{}", d.diagnostics());
    // Another file under the same name is a new submission.
    let next = d.submit_new("back.yaml", &yaml("again"));
    assert_eq!(next, id + 1);
    d.wait_done(next, "SUCCEEDED");
    assert_eq!(count_lines(&ran, "again"), 1);
    d.stop();
}

/// Job `id`'s state links, by state directory.
fn links_of(d: &Daemon, id: u64) -> Vec<&'static str> {
    ["pending", "running", "done"]
        .into_iter()
        .filter(|s| fs::symlink_metadata(d.path(&format!("{s}/{id}"))).is_ok())
        .collect()
}

#[test]
fn a_finished_job_whose_end_a_power_cut_lost_is_settled_from_its_end_record_not_run_again() {
    // No checkpoint while the test runs: the journal keeps every record.
    let mut d = Daemon::start(&NO_TIMED_CHECKPOINTS);
    let s = d.scratch();
    let ran = s.join("ran");
    let yaml = |name: &str| {
        format!(
            "name: {name}\nrun: |\n  echo {name} >> '{}'\n  exit 3\n",
            ran.display()
        )
    };
    let torn = d.submit("torn.yaml", &yaml("torn"));
    let gone = d.submit("gone.yaml", &yaml("gone"));
    d.wait_done(torn, "FAILED");
    d.wait_done(gone, "FAILED");
    let admitted = admitted_info(d.info(torn), torn, "torn");
    let settled = d.info(torn);
    assert_eq!(settled["exit_codes"], serde_json::json!([3]));
    wait_until(
        DEADLINE,
        "both jobs' end records in the journal",
        || {
            let text: String = d
                .journal_files()
                .iter()
                .map(|p| fs::read_to_string(p).unwrap_or_default())
                .collect();
            text.matches("{\"end\":").count() == 2
        },
        || d.diagnostics(),
    );
    d.kill9();

    // What a power cut leaves when only the journal reached the disk after the admissions:
    // job `torn` is on disk as it was admitted (PENDING, no launch record, a pending link),
    // and job `gone` not at all.
    let dir = d.job(torn);
    fs::write(dir.join("info.json"), format!("{admitted:#}\n")).expect("info.json");
    fs::write(dir.join("status"), "PENDING\n").expect("status");
    fs::remove_file(dir.join(".sky/supervisor.lock")).expect("lock");
    fs::remove_file(d.path(&format!("done/{torn}"))).expect("done link");
    std::os::unix::fs::symlink(
        format!("../jobs/{torn}"),
        d.path(&format!("pending/{torn}")),
    )
    .expect("pending link");
    fs::remove_dir_all(d.job(gone)).expect("remove the job");
    fs::remove_file(d.path(&format!("done/{gone}"))).expect("done link");

    d.spawn();
    for id in [torn, gone] {
        d.wait_done(id, "FAILED");
        assert_eq!(links_of(&d, id), vec!["done"], "{}", d.diagnostics());
        assert_eq!(d.info(id)["exit_codes"], serde_json::json!([3]));
    }
    assert_eq!(d.info(torn)["ended"], settled["ended"]);
    assert_eq!(
        count_lines(&ran, "torn"),
        1,
        "a finished job does not run again"
    );
    assert_eq!(
        count_lines(&ran, "gone"),
        1,
        "a finished job does not run again"
    );
    let log = d.daemon_log();
    for (id, name) in [(torn, "torn"), (gone, "gone")] {
        assert!(
            log.contains(&format!(
                "job {id} (incoming/{name}.yaml): its end (FAILED) restored from the journal"
            )),
            "{log}"
        );
    }
    assert_eq!(
        fs::read_to_string(d.job(gone).join("job.yaml")).expect("job.yaml"),
        yaml("gone")
    );
    // What was restored in staging/ and then moved to jobs/ is synced where it is now.
    assert!(!log.contains("not synced"), "{log}");
    assert!(!log.contains("not restored"), "{log}");
    // A clean stop checkpoints: nothing is left for the next start.
    d.stop();
    assert_eq!(d.journal_bytes(), 0, "{}", d.daemon_log());
}

#[test]
fn a_journal_file_holding_a_mebibyte_is_checkpointed_without_waiting_for_the_timer() {
    // The timer alone would wait an hour: only the size can bring the checkpoint.
    let mut d = Daemon::start(&NO_TIMED_CHECKPOINTS);
    let s = d.scratch();
    // Each admission line carries the job's YAML: ~3 KiB each, 1.2 MiB for 400 jobs.
    let pad = format!("# {}\n", "x".repeat(3000));
    let n = 400;
    let staged = s.join("bulk");
    fs::create_dir(&staged).expect("mkdir");
    for i in 0..n {
        fs::write(
            staged.join(format!("b{i}.yaml")),
            format!("{pad}name: b{i}\nrun: |\n  :\n"),
        )
        .expect("write a job");
    }
    for i in 0..n {
        let name = format!("b{i}.yaml");
        fs::rename(staged.join(&name), d.path(&format!("incoming/{name}"))).expect("submit");
    }
    wait_until(
        DEADLINE,
        "all jobs done",
        || fs::read_dir(d.path("done")).map(|r| r.count()).unwrap_or(0) == n,
        || d.diagnostics(),
    );
    wait_until(
        DEADLINE,
        "a checkpoint to empty the full journal file",
        || d.journal_bytes() < 1 << 20,
        || d.diagnostics(),
    );
    d.stop();
    assert_eq!(d.journal_bytes(), 0, "a clean stop checkpoints the rest");
}

/// A queued job whose secrets file is gone when it is to start (removed, or lost with a
/// disk; its `job.yaml` holds the values redacted) fails, FAILED_DRIVER with a reason that
/// says so, instead of running with `<redacted>` for them. Seen after a restart, when the
/// job's spec is read back from its files.
#[test]
fn a_queued_job_whose_secrets_file_is_gone_fails_with_a_reason_instead_of_running() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "4"]);
    let (gate, holder) = submit_holder(&mut d);
    d.wait_status(holder, "RUNNING");
    let secret = d.submit(
        "secret.yaml",
        "name: secret\nresources:\n  accelerators: H100:1\nsecrets:\n  TOKEN: t0k3n\nrun: |\n  echo \"token=$TOKEN\"\n",
    );
    d.wait_queue_status(secret, "PENDING");
    let file = d.path(&format!(".skyspool/secrets/{secret}.json"));
    assert!(file.exists(), "no secrets file\n{}", d.diagnostics());
    d.kill9();
    fs::remove_file(&file).expect("remove the secrets file");
    d.spawn();
    gate.open();
    d.wait_done(holder, "SUCCEEDED");
    d.wait_done(secret, "FAILED_DRIVER");
    let log = d.log(secret);
    assert!(!log.contains("token="), "the job ran: {log}");
    let reason = d.info(secret)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        reason.contains("secrets file")
            && reason.contains("TOKEN")
            && reason.contains("<redacted>"),
        "{reason}"
    );
    d.stop();
}
