//! Prestarts: a queued job whose slots are all busy gets its bash started ahead, held at
//! its script's first line; the job runs in that bash once placed, with its placement's
//! environment, and never runs when cancelled or when the daemon dies first.
mod common;
use common::*;
use std::fs;
use std::time::Duration;

/// Waits until job `id` has exactly one process (its bash, started ahead) while it is still
/// PENDING with an empty log; returns that process.
fn wait_prestarted(d: &Daemon, id: u64) -> u32 {
    wait_until(
        Duration::from_secs(30),
        &format!("job {id}'s bash started ahead"),
        || job_processes(d, id).len() == 1,
        || d.diagnostics(),
    );
    assert_eq!(d.status(id), "PENDING", "a prestarted job is still queued");
    assert_eq!(d.log(id), "", "nothing of a prestarted job ran");
    let pids = job_processes(d, id);
    let cmdline = fs::read(format!("/proc/{}/cmdline", pids[0])).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("read -r _skyspool_env"),
        "the process started ahead is the job's bash at its gate line: {:?}",
        String::from_utf8_lossy(&cmdline)
    );
    pids[0]
}

/// A job holding `resources` (one line under `resources:`) until `gate` opens.
fn blocker(name: &str, resources: &str, gate: &Gate) -> String {
    format!(
        "name: {name}\nresources:\n  {resources}\nrun: |\n  echo gpus=$CUDA_VISIBLE_DEVICES\n  {}\n",
        gate.wait_cmd()
    )
}

#[test]
fn a_job_started_ahead_runs_in_that_bash_with_the_gpu_it_is_given() {
    let mut d = Daemon::start(&["--gpus", "H100:2", "--cpus", "4"]);
    let s = d.scratch();
    let g1 = Gate::new(&s, "one");
    let g2 = Gate::new(&s, "two");
    let a = d.submit("a.yaml", &blocker("a", "accelerators: H100:1", &g1));
    let b = d.submit("b.yaml", &blocker("b", "accelerators: H100:1", &g2));
    d.wait_status(a, "RUNNING");
    d.wait_status(b, "RUNNING");
    let ran = s.join("ran");
    let c = d.submit(
        "c.yaml",
        &format!(
            "name: c\nresources:\n  accelerators: H100:1\nenvs:\n  MINE: 'two words $HOME'\nrun: |\n  echo pid=$$\n  echo cvd=$CUDA_VISIBLE_DEVICES\n  echo rank=$SKYPILOT_NODE_RANK\n  echo per_node=$SKYPILOT_NUM_GPUS_PER_NODE\n  echo mine=$MINE\n  echo leftover=${{_skyspool_env-none}}\n  echo stdin=$(readlink /proc/$$/fd/0)\n  echo x >> '{}'\n",
            ran.display()
        ),
    );
    let bash = wait_prestarted(&d, c);
    let b_gpus = d
        .log(b)
        .lines()
        .find_map(|l| l.strip_prefix("gpus=").map(str::to_string))
        .expect("b's gpus");
    g2.open();
    d.wait_done(c, "SUCCEEDED");
    let vars = d.log_vars(c);
    assert_eq!(
        vars["pid"],
        bash.to_string(),
        "the job ran in the bash started ahead"
    );
    assert_eq!(vars["cvd"], b_gpus, "the GPU b freed, given at its start");
    assert_eq!(vars["rank"], "0");
    assert_eq!(vars["per_node"], "1");
    assert_eq!(vars["mine"], "two words $HOME", "per-job envs as given");
    assert_eq!(vars["leftover"], "none", "the gate's variable is gone");
    assert_eq!(vars["stdin"], "/dev/null");
    assert_eq!(fs::read_to_string(&ran).unwrap(), "x\n", "ran once");
    assert_eq!(
        d.info(c)["placement"][0]["gpus"].to_string(),
        format!("[{b_gpus}]")
    );
    assert!(
        !d.daemon_log().contains("afresh"),
        "no fallback launch:\n{}",
        d.daemon_log()
    );
    g1.open();
    d.wait_done(a, "SUCCEEDED");
    d.wait_done(b, "SUCCEEDED");
}

/// The one slot of a 1-CPU node held by job `a` until the gate opens, and job `c` (which
/// appends a line to the returned file) queued behind it and started ahead.
fn one_slot_busy_and_one_job_started_ahead() -> (Daemon, Gate, u64, u64, std::path::PathBuf) {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "1"]);
    let s = d.scratch();
    let g = Gate::new(&s, "g");
    let a = d.submit("a.yaml", &blocker("a", "cpus: 1", &g));
    d.wait_status(a, "RUNNING");
    let ran = s.join("ran");
    let c = d.submit(
        "c.yaml",
        &format!("name: c\nrun: |\n  echo x >> '{}'\n", ran.display()),
    );
    wait_prestarted(&d, c);
    assert!(
        d.daemon_log()
            .contains(&format!("job {c} started ahead on head")),
        "{}",
        d.daemon_log()
    );
    (d, g, a, c, ran)
}

/// Opens the slot of [`one_slot_busy_and_one_job_started_ahead`]: both jobs succeed, and
/// `c` ran exactly once.
fn free_the_slot_and_see_it_run_once(d: &Daemon, g: &Gate, a: u64, c: u64, ran: &std::path::Path) {
    g.open();
    d.wait_done(a, "SUCCEEDED");
    d.wait_done(c, "SUCCEEDED");
    assert_eq!(fs::read_to_string(ran).unwrap(), "x\n", "ran exactly once");
}

fn wait_no_processes(d: &Daemon, id: u64, what: &str) {
    wait_until(
        Duration::from_secs(30),
        what,
        || job_processes(d, id).is_empty(),
        || d.diagnostics(),
    );
}

#[test]
fn a_cancelled_job_started_ahead_never_runs() {
    let (d, g, a, c, ran) = one_slot_busy_and_one_job_started_ahead();
    d.cancel(c);
    d.wait_done(c, "CANCELLED");
    wait_no_processes(&d, c, "the bash started ahead to be gone");
    g.open();
    d.wait_done(a, "SUCCEEDED");
    assert!(!ran.exists(), "a cancelled job ran");
    assert_eq!(d.log(c).trim(), "skyspool: cancelled before it started");
}

#[test]
fn a_job_started_ahead_of_a_killed_daemon_runs_once_after_the_restart() {
    let (mut d, g, a, c, ran) = one_slot_busy_and_one_job_started_ahead();
    d.kill9();
    wait_no_processes(
        &d,
        c,
        "the bash started ahead to die with its daemon's gate",
    );
    assert!(!ran.exists(), "the job ran without its daemon");
    d.spawn();
    free_the_slot_and_see_it_run_once(&d, &g, a, c, &ran);
}

#[test]
fn no_job_is_started_ahead_with_prestart_off() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "1", "--prestart", "0"]);
    let s = d.scratch();
    let g = Gate::new(&s, "g");
    let a = d.submit("a.yaml", &blocker("a", "cpus: 1", &g));
    d.wait_status(a, "RUNNING");
    let c = d.submit("c.yaml", "name: c\nrun: |\n  true\n");
    d.wait_queue_status(c, "PENDING");
    // A job is started ahead once it has waited 50 ms (a pass is woken for then). Let c
    // wait four times that, then have the daemon admit another job: the pass for c, had
    // there been one, came before.
    let submitted = d.info(c)["submitted"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let submitted = chrono::DateTime::parse_from_rfc3339(&submitted).expect("c's submission time");
    wait_until(
        Duration::from_secs(10),
        "c to have waited 200 ms",
        || {
            chrono::Utc::now().signed_duration_since(submitted)
                > chrono::Duration::milliseconds(200)
        },
        || d.diagnostics(),
    );
    let e = d.submit("e.yaml", "name: e\nrun: |\n  true\n");
    d.wait_queue_status(e, "PENDING");
    assert!(
        !d.daemon_log().contains("started ahead"),
        "a job was started ahead:\n{}",
        d.daemon_log()
    );
    assert!(job_processes(&d, c).is_empty(), "c was started ahead");
    g.open();
    d.wait_done(c, "SUCCEEDED");
    d.wait_done(e, "SUCCEEDED");
}

#[test]
fn a_job_started_ahead_survives_its_launcher_and_runs_once() {
    let (d, g, a, c, ran) = one_slot_busy_and_one_job_started_ahead();
    let bash = job_processes(&d, c)[0];
    let supervisor = parent_of(bash).expect("the bash's supervisor");
    let launcher = parent_of(supervisor).expect("the supervisor's launcher");
    send_signal(launcher, nix::sys::signal::Signal::SIGKILL).expect("kill the launcher");
    wait_until(
        Duration::from_secs(30),
        "the daemon to replace its launcher",
        || {
            d.daemon_log()
                .contains(&format!("launcher pid {launcher} failed"))
        },
        || d.diagnostics(),
    );
    free_the_slot_and_see_it_run_once(&d, &g, a, c, &ran);
}

#[test]
fn a_job_with_setup_started_ahead_runs_setup_without_gpus_then_run_with_its_gpu() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "4"]);
    let s = d.scratch();
    let g = Gate::new(&s, "g");
    let a = d.submit("a.yaml", &blocker("a", "accelerators: H100:1", &g));
    d.wait_status(a, "RUNNING");
    let c = d.submit(
        "c.yaml",
        "name: c\nresources:\n  accelerators: H100:1\nsetup: |\n  echo setup_pid=$$\n  echo setup_cvd=${CUDA_VISIBLE_DEVICES-unset}\n  echo setup_rank=$SKYPILOT_SETUP_NODE_RANK\nrun: |\n  echo run_cvd=$CUDA_VISIBLE_DEVICES\n",
    );
    let bash = wait_prestarted(&d, c);
    g.open();
    d.wait_done(c, "SUCCEEDED");
    let vars = d.log_vars(c);
    assert_eq!(
        vars["setup_pid"],
        bash.to_string(),
        "setup ran in the bash started ahead"
    );
    assert_eq!(vars["setup_cvd"], "unset", "setup sees no devices");
    assert_eq!(vars["setup_rank"], "0");
    assert_eq!(vars["run_cvd"], "0", "run gets the GPU the blocker freed");
    d.wait_done(a, "SUCCEEDED");
}

/// After a lone job, the daemon starts a bash ahead for the next ID, as that job's user, once
/// it has been idle a few milliseconds; that user's next lone job runs in it (its start-up
/// done before the job came) exactly as in a bash started for it: its own commands (quotes,
/// a backslash, several lines, UTF-8), environment, working directory, `$0`, exit code,
/// log and `.sky/run.sh`.
#[test]
fn a_lone_job_runs_in_a_bash_started_ahead_for_it_exactly_as_in_its_own() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "2"]);
    let first = d.submit("first.yaml", "name: first\nrun: echo first\n");
    d.wait_done(first, "SUCCEEDED");
    let next = first + 1;
    wait_until(
        Duration::from_secs(30),
        "a bash started ahead for the next job",
        || job_processes(&d, next).len() == 1,
        || d.diagnostics(),
    );
    let yaml = "name: second\nrun: |\n  echo \"task=$SKYPILOT_TASK_ID tag=$SKYSPOOL_JOB_TAG\"\n  echo \"pwd=$(pwd) zero=$0\"\n  printf '%s\\n' 'it'\\''s a \\ back \"quoted\" ünï'\n  exit 3\n";
    let id = d.submit("second.yaml", yaml);
    assert_eq!(id, next);
    d.wait_done(id, "FAILED");
    assert!(
        d.daemon_log()
            .contains(&format!("job {id}: taken by a bash started ahead for it")),
        "{}",
        d.diagnostics()
    );
    let spool_id = fs::read_to_string(d.path(".skyspool/id")).expect("spool id");
    let spool_id = spool_id.split_whitespace().next().unwrap_or_default();
    let user = d.info(id)["user"].as_str().unwrap_or_default().to_string();
    let home = nix::unistd::User::from_name(&user)
        .ok()
        .flatten()
        .map(|u| u.dir.display().to_string())
        .unwrap_or_default();
    let log = d.log(id);
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    assert!(
        lines[0].starts_with("task=sky-")
            && lines[0].ends_with(&format!("_{id} tag={spool_id}-{id}")),
        "{log}"
    );
    assert_eq!(
        lines[1],
        format!(
            "pwd={home} zero={}",
            d.job(id).join(".sky/run.sh").display()
        )
    );
    assert_eq!(lines[2], "it's a \\ back \"quoted\" ünï");
    assert_eq!(d.info(id)["exit_codes"], serde_json::json!([3]));
    let script = fs::read_to_string(d.job(id).join(".sky/run.sh")).unwrap_or_default();
    assert!(
        script.contains("  exit 3\n") || script.contains("\nexit 3\n"),
        "{script}"
    );
    assert!(
        job_processes(&d, id).is_empty(),
        "the job's bash outlived it"
    );
}
