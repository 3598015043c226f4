//! The command line against a live spool: submit, queue, logs (and --follow), check, and
//! the single-daemon rule.
mod common;
use common::*;
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `skyspool ARGS` with no spool given (neither `--spool` nor `SKYSPOOL_DIR`).
fn cli_no_spool(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SKYSPOOL_DIR")
        .output()
        .expect("run skyspool")
}

fn job_id_of(o: &std::process::Output) -> u64 {
    out(o)
        .lines()
        .find_map(|l| l.strip_prefix("Job ID: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no 'Job ID: N' in: {}{}", out(o), err(o)))
}

/// `skyspool submit FILE` prints the job's ID; the job runs.
#[test]
fn submit_prints_job_id_and_the_job_runs() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let file = s.join("hello.yaml");
    fs::write(&file, "name: hello\nrun: echo hello from submit\n").unwrap();
    let o = d.cli(&["submit", file.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    let id = job_id_of(&o);
    assert_eq!(id, 1);
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(d.log(id), "hello from submit\n");
    assert_eq!(d.info(id)["name"], serde_json::json!("hello"));
    assert!(file.exists(), "submit copies, it does not move the file");
    // A second one gets the next ID.
    let o = d.cli(&["submit", file.to_str().unwrap()]);
    assert_eq!(job_id_of(&o), 2);
    d.wait_done(2, "SUCCEEDED");
}

/// `workdir: .` ships the directory beside the YAML: the job runs the script from its own
/// copy in `jobs/<id>/workdir`.
#[test]
fn submit_ships_the_workdir() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let proj = s.join("proj");
    fs::create_dir(&proj).unwrap();
    fs::write(proj.join("script.sh"), "echo from-script; pwd -P\n").unwrap();
    fs::create_dir(proj.join("data")).unwrap();
    fs::write(proj.join("data/input.txt"), "input-data\n").unwrap();
    fs::write(
        proj.join("job.yaml"),
        "name: shipped\nworkdir: .\nrun: |\n  bash script.sh\n  cat data/input.txt\n",
    )
    .unwrap();
    let o = d.cli(&["submit", proj.join("job.yaml").to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(
        out(&o).contains("Job ID: "),
        "{}{}\n{}",
        out(&o),
        err(&o),
        d.diagnostics()
    );
    let id = job_id_of(&o);
    d.wait_done(id, "SUCCEEDED");
    let workdir = fs::canonicalize(d.job(id).join("workdir")).unwrap();
    assert_eq!(
        d.log(id),
        format!("from-script\n{}\ninput-data\n", workdir.display()),
        "{}",
        d.diagnostics()
    );
    assert!(workdir.join("script.sh").is_file());
    assert!(workdir.join("data/input.txt").is_file());
    // The user's directory is untouched.
    assert!(proj.join("script.sh").is_file() && proj.join("job.yaml").is_file());
    assert_eq!(d.info(id)["has_workdir"], serde_json::json!(true));
}

/// A file that does not parse is refused by `submit` with its reason and a non-zero exit;
/// one the cluster can never run is refused by the daemon, and `submit` says so.
#[test]
fn submit_of_bad_files_fails_with_the_reason() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let bad = s.join("bad.yaml");
    fs::write(&bad, "name: bad\nrnu: echo hi\n").unwrap();
    let o = d.cli(&["submit", bad.to_str().unwrap()]);
    assert!(!o.status.success(), "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("bad.yaml:2"), "{}", err(&o));
    assert!(err(&o).contains("'rnu'"), "{}", err(&o));
    let big = s.join("big.yaml");
    fs::write(
        &big,
        "name: big\nresources:\n  accelerators: H100:8\nrun: echo big\n",
    )
    .unwrap();
    let o = d.cli(&["submit", big.to_str().unwrap()]);
    assert!(!o.status.success(), "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("rejected"), "{}", err(&o));
    assert!(err(&o).contains("never run"), "{}", err(&o));
    assert!(d.job_ids().is_empty(), "{}", d.diagnostics());
}

/// `skyspool queue` prints the `sky queue` table; `skyspool logs ID` prints the log.
#[test]
fn queue_and_logs() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "hold");
    let id1 = d.submit(
        "first.yaml",
        "name: first\nrun: |\n  echo one\n  echo two\n",
    );
    d.wait_done(id1, "SUCCEEDED");
    let id2 = d.submit(
        "second.yaml",
        &format!(
            "name: second\nresources:\n  accelerators: H100:2\nrun: |\n  echo waiting\n  {}\n",
            gate.wait_cmd()
        ),
    );
    d.wait_status(id2, "RUNNING");
    let o = d.cli(&["queue"]);
    assert!(o.status.success(), "{}", err(&o));
    let table = out(&o);
    let mut lines = table.lines();
    assert!(
        lines.next().unwrap_or("").split_whitespace().eq([
            "ID",
            "NAME",
            "USER",
            "SUBMITTED",
            "STARTED",
            "DURATION",
            "RESOURCES",
            "STATUS"
        ]),
        "{table}"
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert_eq!(rows[0][0], "2", "newest first: {table}");
    assert_eq!(rows[0][1], "second");
    assert!(rows[0].contains(&"1x[H100:2]"), "{table}");
    assert_eq!(*rows[0].last().unwrap(), "RUNNING", "{table}");
    assert_eq!(rows[1][0], "1");
    assert_eq!(*rows[1].last().unwrap(), "SUCCEEDED", "{table}");
    let o = d.cli(&["queue", "--active"]);
    let active = out(&o);
    assert_eq!(active.lines().count(), 2, "{active}");
    assert!(active.lines().nth(1).unwrap().starts_with('2'), "{active}");

    let o = d.cli(&["logs", &id1.to_string()]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(out(&o), "one\ntwo\n");
    let o = d.cli(&["logs", "77"]);
    assert_eq!(o.status.code(), Some(102), "{}{}", out(&o), err(&o));
    gate.open();
    d.wait_done(id2, "SUCCEEDED");
}

/// `skyspool logs ID --follow` streams until the job ends, then exits with the job's code.
#[test]
fn logs_follow_until_the_end() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    for (gate_name, last, want_code, want_status) in [
        ("ok", "exit 0", 0, "SUCCEEDED"),
        ("fail", "exit 4", 100, "FAILED"),
    ] {
        let gate = Gate::new(&s, gate_name);
        let id = d.submit_new(
            &format!("{gate_name}.yaml"),
            &format!(
                "name: {gate_name}\nrun: |\n  echo line-1\n  {}\n  echo line-2\n  {last}\n",
                gate.wait_cmd()
            ),
        );
        let captured = s.join(format!("follow-{gate_name}.out"));
        let mut child = Command::new(BIN)
            .arg("--spool")
            .arg(&d.spool)
            .args(["logs", &id.to_string(), "--follow"])
            .stdout(fs::File::create(&captured).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // It prints what is there and keeps following.
        wait_until(
            DEADLINE,
            "--follow to print the first line",
            || fs::read_to_string(&captured).unwrap_or_default() == "line-1\n",
            || d.diagnostics(),
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "--follow returned early"
        );
        gate.open();
        let st = wait_child(&mut child, DEADLINE, "logs --follow to return", || {
            d.diagnostics()
        });
        assert_eq!(st.code(), Some(want_code), "{}", d.diagnostics());
        assert_eq!(
            fs::read_to_string(&captured).unwrap(),
            "line-1\nline-2\n",
            "{}",
            d.diagnostics()
        );
        d.wait_done(id, want_status);
    }
}

/// `skyspool check`: valid files pass, invalid ones fail with file:line; with a spool, a
/// job the cluster can never run fails too.
#[test]
fn check_validates_files() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let good = s.join("good.yaml");
    fs::write(
        &good,
        "name: good\nresources:\n  accelerators: H100:2\nrun: echo ok\n",
    )
    .unwrap();
    let bad = s.join("bad.yaml");
    fs::write(&bad, "name: bad\nrun: echo hi\nenvs:\n  A: 1\n B: 2\n").unwrap();
    let big = s.join("big.yaml");
    fs::write(
        &big,
        "name: big\nresources:\n  accelerators: H100:8\nrun: echo big\n",
    )
    .unwrap();

    let o = cli_no_spool(&["check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("ok"), "{}", out(&o));
    let o = cli_no_spool(&["check", bad.to_str().unwrap()]);
    assert!(!o.status.success(), "{}{}", out(&o), err(&o));
    assert!(
        err(&o).contains(&format!("{}:5", bad.display())),
        "file:line expected: {}",
        err(&o)
    );
    // Without a spool, size is not judged.
    let o = cli_no_spool(&["check", big.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    // With the spool: the cluster has 4 H100.
    let o = d.cli(&["check", big.to_str().unwrap()]);
    assert!(!o.status.success(), "{}{}", out(&o), err(&o));
    assert!(err(&o).contains("can never run"), "{}", err(&o));
    let o = d.cli(&["check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    // Several files: one bad makes the whole check fail.
    let o = cli_no_spool(&["check", good.to_str().unwrap(), bad.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(d.job_ids().is_empty(), "check submits nothing");
}

/// A second daemon on the same spool refuses to start, saying why; the first serves on.
#[test]
fn second_daemon_on_a_spool_is_refused() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let mut second = Command::new(BIN)
        .arg("--spool")
        .arg(&d.spool)
        .args(["serve", "--gpus", "H100:4", "--cpus", "8"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let st = wait_child(
        &mut second,
        Duration::from_secs(20),
        "the second daemon to exit",
        || d.diagnostics(),
    );
    let mut text = String::new();
    use std::io::Read;
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(!st.success(), "second serve exited 0: {text}");
    assert!(text.contains("already serves"), "{text}");
    let id = d.submit("after.yaml", "name: after\nrun: echo still-here\n");
    d.wait_done(id, "SUCCEEDED");
    assert_eq!(d.log(id), "still-here\n");
}
