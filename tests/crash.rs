//! Crash safety. The daemon is SIGKILLed at random moments and restarted on the same spool
//! while jobs are submitted, cancelled, run and end; per-job supervisors are SIGKILLed; a
//! second daemon is started on a served spool; the spool's filesystem fills up. Each time
//! the spool must say exactly what happened: no submission lost or doubled, no ID reused,
//! no job run twice, no GPU share given twice, and `status`, `info.json`, the state links and
//! `queue` agreeing with each other.
//!
//! Jobs record their own runs in files outside the spool (`scratch/`), so what really ran is
//! known independently of what the daemon says.
mod common;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------- helpers

const LIVE: [&str; 4] = ["INIT", "PENDING", "SETTING_UP", "RUNNING"];

fn is_final(s: &str) -> bool {
    matches!(
        s,
        "SUCCEEDED" | "FAILED" | "FAILED_SETUP" | "FAILED_DRIVER" | "CANCELLED"
    )
}

/// A tiny xorshift64 generator: reproducible choices from a printed seed, no new crates.
struct XorShift(u64);

impl XorShift {
    fn new(seed: u64) -> XorShift {
        let mut s = seed ^ 0x9E37_79B9_7F4A_7C15;
        if s == 0 {
            s = 1;
        }
        XorShift(s)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    /// Uniform in `0..n` (0 when n is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    fn pct(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Polls `cond` every 20 ms until it holds (true) or `timeout` passes (false).
fn poll(timeout: Duration, cond: impl FnMut() -> bool) -> bool {
    poll_every(ms(20), timeout, cond)
}

fn poll_every(every: Duration, timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// Non-empty lines of a file (none if it does not exist).
fn lines(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

fn tail(text: &str, n: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(n)..].join("\n")
}

/// A directory every job (run as the unprivileged test runner) may write into.
fn open_dir(path: &Path) -> PathBuf {
    fs::create_dir_all(path).expect("mkdir");
    let _ = fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o777));
    path.to_path_buf()
}

/// Which of `pending/`, `running/`, `done/` link to the job.
fn links(spool: &Path, id: u64) -> Vec<&'static str> {
    ["pending", "running", "done"]
        .into_iter()
        .filter(|s| fs::symlink_metadata(spool.join(s).join(id.to_string())).is_ok())
        .collect()
}

fn status_at(spool: &Path, id: u64) -> String {
    fs::read_to_string(spool.join("jobs").join(id.to_string()).join("status"))
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn numeric_dir(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort_unstable();
    v
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every file name under `dir` (recursively, links not followed).
fn walk_names(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        for e in fs::read_dir(&p).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
            out.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    out
}

/// The pid the job's supervisor recorded in `jobs/<id>/.sky/supervisor.lock`.
fn supervisor_pid(d: &Daemon, id: u64) -> Option<u32> {
    d.supervisor_pid(id)
}

/// Process start time (`/proc/PID/stat` field 22): with the pid, a process's identity.
fn start_ticks(pid: u32) -> Option<u64> {
    proc_stat(pid)?.get(19)?.parse().ok()
}

/// CPU time (user + system, clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let f = proc_stat(pid)?;
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

fn sigkill(pid: u32) {
    let _ = send_signal(pid, nix::sys::signal::Signal::SIGKILL);
}

/// Processes a test saw a job start. Whatever is still the same process when the test ends
/// (pass or fail) is SIGKILLed, so no test leaves a `sleep 1000` behind.
struct Leftovers(Vec<(u32, u64)>);

impl Leftovers {
    fn adopt(pids: &[u32]) -> Leftovers {
        Leftovers(
            pids.iter()
                .filter_map(|p| start_ticks(*p).map(|t| (*p, t)))
                .collect(),
        )
    }
    fn alive(&self) -> Vec<u32> {
        self.0
            .iter()
            .filter(|(p, t)| alive(*p) && start_ticks(*p) == Some(*t))
            .map(|(p, _)| *p)
            .collect()
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in self.alive() {
            sigkill(p);
        }
    }
}

fn rfc3339_ns(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()?
        .timestamp_nanos_opt()
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// `"1"`, `"0.5"` -> thousandths.
fn share_milli(s: &str) -> Option<u64> {
    let v: f64 = s.trim().parse().ok()?;
    Some((v * 1000.0).round() as u64)
}

/// Problems found, grouped by kind (a test reports all of them, then fails once).
#[derive(Default)]
struct Problems(BTreeMap<String, Vec<String>>);

impl Problems {
    fn add(&mut self, kind: &str, detail: impl Into<String>) {
        self.0
            .entry(kind.to_string())
            .or_default()
            .push(detail.into());
    }
    fn check(&mut self, ok: bool, kind: &str, detail: impl FnOnce() -> String) {
        if !ok {
            self.add(kind, detail());
        }
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    fn report(&self) -> String {
        let mut s = String::new();
        for (kind, list) in &self.0 {
            s.push_str(&format!("* {kind}: {} case(s)\n", list.len()));
            for d in list.iter().take(6) {
                s.push_str(&format!("    - {d}\n"));
            }
            if list.len() > 6 {
                s.push_str(&format!("    - ... and {} more\n", list.len() - 6));
            }
        }
        s
    }
}

/// Writes `incoming/.FILE.tmp` and renames it to `incoming/FILE` (the safe protocol), or
/// writes `incoming/FILE` in place (`direct`, as `cp` does).
fn drop_file(incoming: &Path, file: &str, text: &str, direct: bool) {
    if direct {
        fs::write(incoming.join(file), text).expect("write submission in place");
    } else {
        let tmp = incoming.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).expect("write submission");
        fs::rename(&tmp, incoming.join(file)).expect("rename submission");
    }
}

/// A job that appends `NAME START_NS CUDA_VISIBLE_DEVICES` to `starts` when it starts and
/// `NAME START_NS END_NS CUDA_VISIBLE_DEVICES` to `runs` when it ends, and prints `done NAME`.
fn recording_job(name: &str, resources: &str, sleep_ms: u64, starts: &Path, runs: &Path) -> String {
    format!(
        "name: {name}\n{resources}run: |\n  s=$(date +%s%N)\n  \
         echo \"{name} $s $CUDA_VISIBLE_DEVICES\" >> '{st}'\n  sleep {secs}.{frac:03}\n  \
         e=$(date +%s%N)\n  echo \"{name} $s $e $CUDA_VISIBLE_DEVICES\" >> '{rn}'\n  \
         echo \"done {name}\"\n",
        st = starts.display(),
        rn = runs.display(),
        secs = sleep_ms / 1000,
        frac = sleep_ms % 1000,
    )
}

// ---------------------------------------------------------------------------- 1. torture

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Gpu1,
    Gpu2,
    Half,
    Cpu,
    BadYaml,
    NeverFits,
    NotYaml,
}

impl Kind {
    fn good(self) -> bool {
        matches!(self, Kind::Gpu1 | Kind::Gpu2 | Kind::Half | Kind::Cpu)
    }
    /// (number of GPU indices in CUDA_VISIBLE_DEVICES, share of each in thousandths)
    fn gpus(self) -> (usize, u64) {
        match self {
            Kind::Gpu1 => (1, 1000),
            Kind::Gpu2 => (2, 1000),
            Kind::Half => (1, 500),
            _ => (0, 0),
        }
    }
}

struct Sub {
    file: String,
    name: String,
    kind: Kind,
    text: String,
    direct: bool,
    delay_ms: u64,
}

fn torture_plan(rng: &mut XorShift, n: usize, starts: &Path, runs: &Path) -> Vec<Sub> {
    let mut subs = Vec::new();
    let mut burst = 0u64;
    for i in 0..n {
        // One prefix, zero-padded: name order is submission order, even where two files
        // get the same (coarse) modification time.
        let name = format!("s{i:04}");
        let kind = match rng.below(100) {
            0..=24 => Kind::Gpu1,
            25..=39 => Kind::Gpu2,
            40..=59 => Kind::Half,
            60..=88 => Kind::Cpu,
            89..=93 => Kind::BadYaml,
            94..=96 => Kind::NeverFits,
            _ => Kind::NotYaml,
        };
        let sleep = rng.below(201);
        let (file, text) = match kind {
            Kind::Gpu1 | Kind::Gpu2 | Kind::Half | Kind::Cpu => {
                let resources = match kind {
                    Kind::Gpu1 => "resources:\n  accelerators: H100:1\n",
                    Kind::Gpu2 => "resources:\n  accelerators: H100:2\n",
                    Kind::Half => "resources:\n  accelerators: H100:0.5\n",
                    _ if rng.pct(50) => "resources:\n  cpus: 1\n",
                    _ => "",
                };
                let ext = if rng.pct(10) { "yml" } else { "yaml" };
                (
                    format!("{name}.{ext}"),
                    recording_job(
                        &name,
                        resources,
                        sleep,
                        &starts.join(&name),
                        &runs.join(&name),
                    ),
                )
            }
            Kind::BadYaml => (
                format!("{name}.yaml"),
                format!("name: {name}\nrun: [echo, unclosed\n"),
            ),
            Kind::NeverFits => (
                format!("{name}.yaml"),
                format!("name: {name}\nresources:\n  accelerators: H100:8\nrun: echo never\n"),
            ),
            Kind::NotYaml => (
                format!("{name}.txt"),
                format!("name: {name}\nrun: echo not a yaml name\n"),
            ),
        };
        let delay_ms = if burst > 0 {
            burst -= 1;
            0
        } else if rng.pct(8) {
            // Now and then a burst large enough for an admission round waited for in the
            // background (8 jobs or more), or for two chunks (over 64).
            burst = if rng.pct(25) {
                rng.range(8, 80)
            } else {
                rng.range(3, 8)
            };
            0
        } else {
            rng.below(61)
        };
        subs.push(Sub {
            file,
            name,
            kind,
            text,
            direct: rng.pct(20),
            delay_ms,
        });
    }
    subs
}

/// One run of a job, as the job itself recorded it.
struct Run {
    id: u64,
    name: String,
    start: i64,
    end: i64,
    complete: bool,
    devices: Vec<u32>,
    share: u64,
}

/// Every instant at which some GPU's shares add up to more than 1, described.
fn over_shared(runs: &[Run]) -> Vec<String> {
    let mut out = Vec::new();
    let gpu_ids: BTreeSet<u32> = runs.iter().flat_map(|r| r.devices.clone()).collect();
    for gpu in gpu_ids {
        // (time, -1 end / +1 start, run index): at the same instant ends come first.
        let mut events: Vec<(i64, i8, usize)> = Vec::new();
        for (k, r) in runs.iter().enumerate() {
            if r.devices.contains(&gpu) {
                events.push((r.start, 1, k));
                events.push((r.end, -1, k));
            }
        }
        events.sort();
        let mut active: BTreeSet<usize> = BTreeSet::new();
        for (_, delta, k) in events {
            if delta < 0 {
                active.remove(&k);
                continue;
            }
            active.insert(k);
            let sum: u64 = active.iter().map(|k| runs[*k].share).sum();
            if sum > 1000 {
                let who: Vec<String> = active
                    .iter()
                    .map(|k| {
                        let r = &runs[*k];
                        format!(
                            "job {} ({}, share {}, {}..{}{})",
                            r.id,
                            r.name,
                            r.share,
                            r.start,
                            r.end,
                            if r.complete { "" } else { ", killed" }
                        )
                    })
                    .collect();
                out.push(format!("GPU {gpu}: {}", who.join(" + ")));
            }
        }
    }
    out
}

/// The torture test's GPU check is not vacuous: it sees over-sharing, and only that.
#[test]
fn gpu_share_checker_finds_overlaps() {
    let run = |id: u64, start: i64, end: i64, devices: &[u32], share: u64| Run {
        id,
        name: format!("j{id}"),
        start,
        end,
        complete: true,
        devices: devices.to_vec(),
        share,
    };
    // Two halves share GPU 0; a whole GPU follows right after; GPU 1 back to back.
    let fine = [
        run(1, 0, 10, &[0], 500),
        run(2, 5, 15, &[0], 500),
        run(3, 15, 20, &[0, 1], 1000),
        run(4, 20, 30, &[1], 1000),
    ];
    assert!(over_shared(&fine).is_empty(), "{:?}", over_shared(&fine));
    // A third half on GPU 0, and a whole GPU 1 overlapping by one nanosecond.
    let bad = [
        run(1, 0, 10, &[0], 500),
        run(2, 5, 15, &[0], 500),
        run(3, 9, 12, &[0], 500),
        run(4, 0, 21, &[1], 1000),
        run(5, 20, 30, &[1], 1000),
    ];
    let found = over_shared(&bad);
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(
        found[0].starts_with("GPU 0") && found[1].starts_with("GPU 1"),
        "{found:?}"
    );
}

/// A submitter drops ~300 jobs (some bad), a canceller cancels some, and the daemon is
/// SIGKILLed and restarted 25-40 times at random moments. Then every submission must be
/// exactly one job or one rejection, every job final and consistent, no job run twice, no
/// GPU over-shared at any instant.
/// `SKYSPOOL_TORTURE_SEED=N` replays a run's random choices (not its thread timing).
#[test]
fn torture_sigkill_cycles() {
    let seed: u64 = std::env::var("SKYSPOOL_TORTURE_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| now_ns() as u64);
    eprintln!("torture seed {seed} (replay with SKYSPOOL_TORTURE_SEED={seed})");
    let t0 = Instant::now();
    let mut rng = XorShift::new(seed);
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8", "--kill-grace", "1"]);
    let scratch = d.scratch();
    let starts = open_dir(&scratch.join("starts"));
    let runs = open_dir(&scratch.join("runs"));
    const N: usize = 300;
    const LATE: usize = 6; // dropped while the daemon is down, just before the last start
    let plan = Arc::new(torture_plan(&mut rng, N, &starts, &runs));
    let cycles = rng.range(25, 40);
    let incoming = d.path("incoming");

    let submitter = {
        let plan = Arc::clone(&plan);
        let incoming = incoming.clone();
        std::thread::spawn(move || {
            for s in plan.iter().take(N - LATE) {
                std::thread::sleep(ms(s.delay_ms));
                drop_file(&incoming, &s.file, &s.text, s.direct);
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Stops the canceller however this test ends.
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _stop_canceller = StopOnDrop(Arc::clone(&stop));
    let cancelled: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let canceller = {
        let stop = Arc::clone(&stop);
        let cancelled = Arc::clone(&cancelled);
        let spool = d.spool.clone();
        let mut rng = XorShift::new(seed ^ 0xC0FF_EE00_D15E_A5E5);
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(ms(rng.range(40, 250)));
                let ids = numeric_dir(&spool.join("jobs"));
                if ids.is_empty() {
                    continue;
                }
                let id = ids[rng.below(ids.len() as u64) as usize];
                if LIVE.contains(&status_at(&spool, id).as_str())
                    && fs::write(spool.join("jobs").join(id.to_string()).join("cancel"), b"")
                        .is_ok()
                {
                    cancelled.lock().unwrap().insert(id);
                }
            }
        })
    };

    let mut problems = Problems::default();
    let mut modes = [0u32; 4];
    let running_dir = d.path("running");
    for cycle in 0..cycles {
        match rng.below(100) {
            0..=49 => {
                modes[0] += 1;
                std::thread::sleep(ms(rng.below(301)));
            }
            50..=69 => {
                // Aim at an admission: kill just after a submission lands.
                modes[1] += 1;
                poll_every(ms(1), ms(300), || {
                    d.incoming_names().iter().any(|n| !n.starts_with('.'))
                });
                std::thread::sleep(Duration::from_micros(rng.below(3000)));
            }
            70..=84 => {
                // Aim at a launch: kill just after a job moves to running/.
                modes[2] += 1;
                let before = numeric_dir(&running_dir);
                poll_every(ms(1), ms(300), || {
                    numeric_dir(&running_dir)
                        .iter()
                        .any(|id| !before.contains(id))
                });
                std::thread::sleep(Duration::from_micros(rng.below(2000)));
            }
            _ => {
                // Aim at recovery and the first scheduling pass after a start.
                modes[3] += 1;
                std::thread::sleep(ms(rng.below(20)));
            }
        }
        if let Some(st) = d.exited() {
            problems.add(
                "daemon exited by itself",
                format!("before kill {cycle}: {st}\n{}", tail(&d.daemon_log(), 30)),
            );
        }
        d.kill9();
        std::thread::sleep(ms(rng.below(101)));
        d.spawn();
    }
    submitter.join().expect("submitter thread");
    stop.store(true, Ordering::SeqCst);
    canceller.join().expect("canceller thread");
    // Last crash: some submissions arrive while no daemon runs, and are found at start-up.
    d.kill9();
    for s in plan.iter().skip(N - LATE) {
        drop_file(&incoming, &s.file, &s.text, s.direct);
    }
    d.spawn();
    let cycles_done = cycles + 1;

    // Everything settles: nothing left to admit, nothing live.
    let rejected_dir = d.path("rejected");
    let staging = d.path(".skyspool/staging");
    // (Quiet for 3 s with fewer entries than submissions also ends the wait: something was
    // lost, and the checks below say what.)
    let mut quiet_since: Option<Instant> = None;
    let settled = poll(Duration::from_secs(60), || {
        let ids = d.job_ids();
        let rejections = names_in(&rejected_dir)
            .into_iter()
            .filter(|n| !n.starts_with('.') && !n.ends_with(".reason"))
            .count();
        // Final as the supervisor wrote it, and recorded by the daemon (its link in done/):
        // the records below are checked once the daemon has settled every job, not in the
        // moment between a supervisor's final `status` and the daemon's settling of it.
        let quiet = d.incoming_names().is_empty()
            && staged_submissions(&staging).is_empty()
            && ids
                .iter()
                .all(|id| is_final(&d.status(*id)) && links(&d.spool, *id).contains(&"done"));
        if !quiet {
            quiet_since = None;
        } else if quiet_since.is_none() {
            quiet_since = Some(Instant::now());
        }
        quiet
            && (ids.len() + rejections >= N
                || quiet_since.is_some_and(|t| t.elapsed() > Duration::from_secs(3)))
    });
    if !settled {
        let stuck: Vec<String> = d
            .job_ids()
            .into_iter()
            .filter(|id| !is_final(&d.status(*id)))
            .map(|id| format!("{id}:{}", d.status(id)))
            .collect();
        problems.add(
            "did not settle within 60 s",
            format!(
                "live jobs {stuck:?}; incoming {:?}; staging {:?}\n{}",
                d.incoming_names(),
                staged_submissions(&staging),
                tail(&d.daemon_log(), 40)
            ),
        );
    }

    // ---- the record
    struct Job {
        id: u64,
        status: String,
        info: Value,
        name: String,
        links: Vec<&'static str>,
    }
    let ids = d.job_ids();
    let jobs: Vec<Job> = ids
        .iter()
        .map(|&id| {
            let info = d.info(id);
            Job {
                id,
                status: d.status(id),
                name: info["name"].as_str().unwrap_or("").to_string(),
                info,
                links: links(&d.spool, id),
            }
        })
        .collect();
    let mut by_name: HashMap<String, Vec<u64>> = HashMap::new();
    for j in &jobs {
        by_name.entry(j.name.clone()).or_default().push(j.id);
    }
    // Dot-names are the daemon's temporary files (`.NAME.reason.tmp.PID`), not rejections.
    let rejected_names: Vec<String> = names_in(&rejected_dir)
        .into_iter()
        .filter(|n| !n.starts_with('.'))
        .collect();
    // Temporary files a killed daemon left behind: each start removes them.
    let leftovers: Vec<String> = walk_names(&d.spool)
        .into_iter()
        .filter(|n| n.starts_with('.') && n.contains(".tmp"))
        .collect();
    let leftover_temps = leftovers.len();
    problems.check(
        leftovers.is_empty(),
        "temporary files a killed daemon left behind, still there after its restart",
        || format!("{leftovers:?}"),
    );
    let rejections_of = |file: &str| -> Vec<String> {
        rejected_names
            .iter()
            .filter(|n| {
                !n.ends_with(".reason")
                    && (n.as_str() == file
                        || n.strip_prefix(file)
                            .and_then(|r| r.strip_prefix('.'))
                            .is_some_and(|r| r.chars().all(|c| c.is_ascii_digit())))
            })
            .cloned()
            .collect()
    };
    let kinds: HashMap<&str, Kind> = plan.iter().map(|s| (s.name.as_str(), s.kind)).collect();

    // ---- every submission is exactly one job or one rejection
    let mut losses = 0;
    let mut duplicates = 0;
    let mut order: Vec<(usize, u64)> = Vec::new();
    for (i, s) in plan.iter().enumerate() {
        let as_jobs = by_name.get(&s.name).cloned().unwrap_or_default();
        let as_rejections = rejections_of(&s.file);
        if s.kind.good() {
            if as_jobs.is_empty() {
                losses += 1;
                problems.add(
                    "submission lost",
                    format!(
                        "{} ({:?}) is no job{}; the daemon logged about it: {:?}",
                        s.file,
                        s.kind,
                        if as_rejections.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "; rejected: {}",
                                fs::read_to_string(
                                    rejected_dir.join(format!("{}.reason", as_rejections[0]))
                                )
                                .unwrap_or_default()
                                .trim()
                            )
                        },
                        d.daemon_log()
                            .lines()
                            .filter(|l| l.contains(&s.file) || l.contains(&s.name))
                            .collect::<Vec<_>>()
                    ),
                );
            } else if as_jobs.len() > 1 {
                duplicates += 1;
                problems.add(
                    "submission became several jobs",
                    format!("{} -> jobs {as_jobs:?}", s.file),
                );
            } else if !as_rejections.is_empty() {
                duplicates += 1;
                problems.add(
                    "submission both a job and a rejection",
                    format!(
                        "{} -> job {} and rejected/{as_rejections:?}",
                        s.file, as_jobs[0]
                    ),
                );
            } else {
                order.push((i, as_jobs[0]));
                let job = jobs.iter().find(|j| j.id == as_jobs[0]).unwrap();
                let source = job.info["source"].as_str().unwrap_or("");
                problems.check(
                    source == format!("incoming/{}", s.file),
                    "info.json source is not the submitted file",
                    || format!("job {} ({}): source {source:?}", job.id, s.file),
                );
            }
        } else {
            if !as_jobs.is_empty() {
                problems.add(
                    "bad submission became a job",
                    format!("{} -> {as_jobs:?}", s.file),
                );
            }
            match as_rejections.len() {
                0 => {
                    losses += 1;
                    problems.add("bad submission neither rejected nor a job", s.file.clone());
                }
                1 => {
                    let reason = rejected_dir.join(format!("{}.reason", as_rejections[0]));
                    problems.check(
                        fs::read_to_string(&reason).is_ok_and(|r| r.contains(&s.file)),
                        "rejection without a reason naming the file",
                        || format!("{}", reason.display()),
                    );
                }
                _ => {
                    duplicates += 1;
                    problems.add(
                        "submission rejected several times",
                        format!("{} -> {as_rejections:?}", s.file),
                    );
                }
            }
        }
    }
    for j in &jobs {
        problems.check(
            kinds.contains_key(j.name.as_str()),
            "job from no submission",
            || format!("job {} named {:?}", j.id, j.name),
        );
    }
    let files: BTreeSet<&str> = plan.iter().map(|s| s.file.as_str()).collect();
    for item in rejected_names.iter().filter(|n| !n.ends_with(".reason")) {
        let base = item
            .rsplit_once('.')
            .filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit()))
            .map_or(item.as_str(), |(b, _)| b);
        problems.check(
            files.contains(item.as_str()) || files.contains(base),
            "rejection of no submitted file",
            || {
                format!(
                    "rejected/{item}: {}",
                    fs::read_to_string(rejected_dir.join(format!("{item}.reason")))
                        .unwrap_or_default()
                        .trim()
                )
            },
        );
    }
    // Reasons whose rejection is missing (a crash between writing the reason and the move):
    // harmless but worth knowing.
    let orphan_reasons: Vec<&String> = rejected_names
        .iter()
        .filter(|n| {
            n.strip_suffix(".reason")
                .is_some_and(|item| !rejected_names.iter().any(|m| m == item))
        })
        .collect();

    // ---- IDs: unique (directories), never reused, in admission order, few gaps
    let max_id = ids.last().copied().unwrap_or(0);
    let gaps: Vec<u64> = (1..=max_id).filter(|i| !ids.contains(i)).collect();
    // A gap is justified only by a crash between creating `staging/<id>` and the claiming
    // rename (the empty directory is dropped at the next start): at most one per crash.
    problems.check(
        gaps.len() as u64 <= cycles_done,
        "more ID gaps than crashes",
        || format!("{} gaps {gaps:?} for {cycles_done} crashes", gaps.len()),
    );
    let last_id: u64 = fs::read_to_string(d.path(".skyspool/last-id"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    problems.check(last_id >= max_id, "last-id below a given ID", || {
        format!("last-id {last_id}, highest job {max_id}")
    });
    // Submissions arrive one after the other: admission order is submission order.
    for w in order.windows(2) {
        let ((ia, ida), (ib, idb)) = (w[0], w[1]);
        problems.check(ida < idb, "IDs not in submission order", || {
            format!(
                "{} got {ida} but the later {} got {idb}",
                plan[ia].file, plan[ib].file
            )
        });
    }

    // ---- every job: final, one link, records agree, ran as its status says
    let cancel_requested = cancelled.lock().unwrap().clone();
    let mut runs_of: Vec<Run> = Vec::new();
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    for j in &jobs {
        *tally.entry(j.status.clone()).or_default() += 1;
        let (id, name) = (j.id, j.name.as_str());
        problems.check(is_final(&j.status), "job not final", || {
            format!("job {id} ({name}) is {}", j.status)
        });
        problems.check(j.links == ["done"], "state links wrong", || {
            format!("job {id} ({name}) status {} links {:?}", j.status, j.links)
        });
        let info_status = j.info["status"].as_str().unwrap_or("");
        problems.check(
            info_status == j.status,
            "info.json status differs from status",
            || {
                format!(
                    "job {id} ({name}): status {} but info.json {info_status} (ended {}, exit_codes {})",
                    j.status, j.info["ended"], j.info["exit_codes"]
                )
            },
        );
        if is_final(&j.status) {
            problems.check(
                j.info["ended"].is_string(),
                "final job without ended",
                || {
                    format!(
                        "job {id} ({name}) {}: info.json ended {}",
                        j.status, j.info["ended"]
                    )
                },
            );
        }
        let asked = cancel_requested.contains(&id) || d.job(id).join("cancel").exists();
        match j.status.as_str() {
            "SUCCEEDED" => {}
            "CANCELLED" => problems.check(asked, "cancelled without a cancel", || {
                format!("job {id} ({name})")
            }),
            "FAILED_DRIVER" => problems.check(
                j.info["reason"]
                    .as_str()
                    .is_some_and(|r| !r.trim().is_empty()),
                "FAILED_DRIVER without a reason in info.json",
                || format!("job {id} ({name}): {}", j.info),
            ),
            other => problems.add(
                "unexpected final status",
                format!(
                    "job {id} ({name}) {other}: {}\n{}",
                    j.info["reason"],
                    d.log(id)
                ),
            ),
        }
        // What the job itself recorded.
        let st = lines(&starts.join(name));
        let rn = lines(&runs.join(name));
        problems.check(
            st.len() <= 1 && rn.len() <= 1,
            "job ran more than once",
            || format!("job {id} ({name}) {}: starts {st:?} runs {rn:?}", j.status),
        );
        if j.status == "SUCCEEDED" {
            problems.check(
                st.len() == 1 && rn.len() == 1,
                "SUCCEEDED job did not run exactly once",
                || format!("job {id} ({name}): starts {st:?} runs {rn:?}"),
            );
            problems.check(
                d.log(id).contains(&format!("done {name}")),
                "SUCCEEDED job with an incomplete log",
                || format!("job {id} ({name}) log {:?}", d.log(id)),
            );
        }
        let Some(first) = st.first() else { continue };
        let f: Vec<&str> = first.split_whitespace().collect();
        let start: i64 = f.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        let devices: Vec<u32> = f
            .get(2)
            .map(|s| s.split(',').filter_map(|x| x.parse().ok()).collect())
            .unwrap_or_default();
        let kind = kinds.get(name).copied().unwrap_or(Kind::Cpu);
        let (count, share) = kind.gpus();
        problems.check(devices.len() == count, "wrong number of GPUs", || {
            format!("job {id} ({name}, {kind:?}) got CUDA_VISIBLE_DEVICES {devices:?}")
        });
        // info.json's placement is what the job got.
        let placed: Vec<u32> = j.info["placement"][0]["gpus"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|g| g.as_u64().map(|g| g as u32))
                    .collect()
            })
            .unwrap_or_default();
        let shares: Vec<Option<u64>> = j.info["placement"][0]["gpu_shares"]
            .as_array()
            .map(|a| a.iter().map(|s| s.as_str().and_then(share_milli)).collect())
            .unwrap_or_default();
        problems.check(
            placed == devices && shares.iter().all(|s| *s == Some(share)),
            "info.json placement differs from what the job got",
            || {
                format!(
                    "job {id} ({name}): ran with {devices:?}, placement {}",
                    j.info["placement"]
                )
            },
        );
        let (end, complete) = match rn.first() {
            Some(l) => (
                l.split_whitespace()
                    .nth(2)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(i64::MAX),
                true,
            ),
            None => {
                // Killed before it recorded its end (cancelled): its supervisor's end time
                // bounds it (the GPUs are freed only after that).
                let result = d.result(id);
                let ended = result
                    .as_ref()
                    .and_then(|r| r["ended"].as_str().and_then(rfc3339_ns))
                    .or_else(|| j.info["ended"].as_str().and_then(rfc3339_ns));
                (ended.unwrap_or_else(now_ns), false)
            }
        };
        runs_of.push(Run {
            id,
            name: name.to_string(),
            start,
            end,
            complete,
            devices,
            share,
        });
    }

    // ---- no GPU shared beyond 1 at any instant
    let over = over_shared(&runs_of);
    let overlaps = over.len();
    for o in over {
        problems.add("GPU given beyond its capacity", o);
    }
    let gpu_runs = runs_of.iter().filter(|r| !r.devices.is_empty()).count();

    // ---- the queue agrees
    let queue_ok = poll(Duration::from_secs(5), || {
        jobs.iter()
            .all(|j| d.queue_status(j.id).as_deref() == Some(j.status.as_str()))
    });
    if !queue_ok {
        for j in &jobs {
            let q = d.queue_status(j.id);
            problems.check(
                q.as_deref() == Some(j.status.as_str()),
                "queue differs from status",
                || format!("job {}: status {} queue {q:?}", j.id, j.status),
            );
        }
    }
    let log = d.daemon_log();
    problems.check(!log.contains("clash"), "re-adopted resources clash", || {
        log.lines()
            .filter(|l| l.contains("clash"))
            .collect::<Vec<_>>()
            .join("\n")
    });

    // ---- nothing is still held: a job asking for every GPU runs.
    let final_job = "name: zz-final\nresources:\n  accelerators: H100:4\nrun: echo all-four\n";
    let fid = d.submit_new("zz-final.yaml", final_job);
    problems.check(
        poll(DEADLINE, || d.status(fid) == "SUCCEEDED"),
        "GPUs still held after everything ended",
        || format!("H100:4 job {fid} is {}\n{}", d.status(fid), d.queue()),
    );

    let rejections = rejected_names
        .iter()
        .filter(|n| !n.ends_with(".reason"))
        .count();
    let summary = format!(
        "torture: seed={seed} cycles={cycles_done} (timed {} / after-submission {} / \
         after-launch {} / early {}) \
         submissions={N} jobs={} rejections={rejections} losses={losses} duplicates={duplicates} \
         id_gaps={} gpu_runs={gpu_runs} gpu_overlaps={overlaps} cancel_requests={} statuses={tally:?} \
         orphan_reasons={} leftover_temp_files={leftover_temps} prestarts={} elapsed={:.1}s",
        modes[0],
        modes[1],
        modes[2],
        modes[3],
        jobs.len(),
        gaps.len(),
        cancel_requested.len(),
        orphan_reasons.len(),
        d.daemon_log().matches(" started ahead on ").count(),
        t0.elapsed().as_secs_f64()
    );
    println!("{summary}");
    eprintln!("{summary}");
    if !problems.is_empty() {
        // SKYSPOOL_KEEP_FAILED=DIR keeps the spool and scratch of a failed run there.
        if let Some(keep) = std::env::var_os("SKYSPOOL_KEEP_FAILED") {
            let to = PathBuf::from(keep).join(format!("torture-{seed}"));
            let _ = fs::create_dir_all(&to);
            let _ = Command::new("cp")
                .arg("-a")
                .arg(&d.spool)
                .arg(&scratch)
                .arg(d.tmp.path().join("daemon.log"))
                .arg(&to)
                .status();
            eprintln!("kept the spool in {}", to.display());
        }
    }
    assert!(
        problems.is_empty() && losses == 0 && duplicates == 0,
        "{summary}\n{}\n(seed {seed})\n--- daemon.log (tail) ---\n{}",
        problems.report(),
        tail(&d.daemon_log(), 40)
    );
}

// ---------------------------------------------------------------------------- 2. restart

/// A job that logs `start NAME`, appends `NAME CUDA_VISIBLE_DEVICES` to `runs`, waits for its
/// gate, logs `end NAME` and exits with `code`.
fn held_job(name: &str, accel: &str, gate: &Gate, runs: &Path, code: i32) -> String {
    format!(
        "name: {name}\nresources:\n  accelerators: {accel}\nrun: |\n  echo \"start {name}\"\n  \
         echo \"{name} $CUDA_VISIBLE_DEVICES\" >> '{}'\n  {}\n  echo \"end {name}\"\n  exit {code}\n",
        runs.display(),
        gate.wait_cmd()
    )
}

fn gpus_of(info: &Value) -> BTreeSet<u64> {
    info["placement"][0]["gpus"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

/// A finished job's whole record: status, link, info.json, log, and one run.
fn check_ended(
    p: &mut Problems,
    d: &Daemon,
    id: u64,
    name: &str,
    runs: &Path,
    want: &str,
    code: i32,
) {
    let info = d.info(id);
    p.check(d.status(id) == want, "wrong final status", || {
        format!("job {id} ({name}) is {} (want {want})", d.status(id))
    });
    p.check(links(&d.spool, id) == ["done"], "state links wrong", || {
        format!("job {id} ({name}) links {:?}", links(&d.spool, id))
    });
    p.check(
        info["status"] == want
            && info["ended"].is_string()
            && info["exit_codes"] == serde_json::json!([code]),
        "info.json does not record the job's end",
        || {
            format!(
                "job {id} ({name}) ended {want} with exit code {code}, but info.json has status {} \
                 ended {} exit_codes {} reason {}",
                info["status"], info["ended"], info["exit_codes"], info["reason"]
            )
        },
    );
    let log = d.log(id);
    p.check(
        log.matches(&format!("start {name}")).count() == 1
            && log.matches(&format!("end {name}")).count() == 1,
        "incomplete log",
        || format!("job {id} ({name}) log {log:?}"),
    );
    p.check(lines(runs).len() == 1, "did not run exactly once", || {
        format!("job {id} ({name}) runs {:?}", lines(runs))
    });
}

/// SIGKILL the daemon with three jobs running and two pending; two running jobs end (one
/// fails) while no daemon runs. The next start settles those two from what their supervisors
/// recorded, re-adopts the third with its GPUs, and starts pending jobs only where GPUs are
/// really free.
#[test]
fn restart_while_jobs_run() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let names = ["long", "quick", "bad", "p1", "p2"];
    let accel = ["H100:2", "H100:1", "H100:1", "H100:2", "H100:1"];
    let codes = [0, 0, 3, 0, 0];
    let gates: Vec<Gate> = names.iter().map(|n| Gate::new(&s, n)).collect();
    let runs: Vec<PathBuf> = names.iter().map(|n| s.join(format!("runs-{n}"))).collect();
    let mut ids = Vec::new();
    for i in 0..5 {
        let yaml = held_job(names[i], accel[i], &gates[i], &runs[i], codes[i]);
        ids.push(d.submit_new(&format!("{}.yaml", names[i]), &yaml));
    }
    let [long, quick, bad, p1, p2] = [ids[0], ids[1], ids[2], ids[3], ids[4]];
    for (i, id) in [long, quick, bad].into_iter().enumerate() {
        let name = names[i];
        wait_until(
            DEADLINE,
            &format!("{name} to run"),
            || d.log(id).contains(&format!("start {name}")),
            || d.diagnostics(),
        );
    }
    d.wait_queue_status(p2, "PENDING");
    assert_eq!(d.status(p1), "PENDING", "{}", d.diagnostics());
    let long_sup = supervisor_pid(&d, long).expect("long's supervisor record");
    let long_gpus = gpus_of(&d.info(long));
    assert_eq!(long_gpus.len(), 2, "{}", d.info(long));
    let sups: Vec<u32> = [quick, bad]
        .iter()
        .map(|id| supervisor_pid(&d, *id).expect("the supervisor's record"))
        .collect();

    d.kill9();
    gates[1].open();
    gates[2].open();
    // Both end unobserved: their supervisors record the results and exit.
    wait_until(
        DEADLINE,
        "quick and bad to end while no daemon runs",
        || sups.iter().all(|p| !alive(*p)) && [quick, bad].iter().all(|id| d.result(*id).is_some()),
        || d.diagnostics(),
    );
    d.spawn();

    let mut p = Problems::default();
    d.wait_done(quick, "SUCCEEDED");
    d.wait_done(bad, "FAILED");
    check_ended(&mut p, &d, quick, "quick", &runs[1], "SUCCEEDED", 0);
    check_ended(&mut p, &d, bad, "bad", &runs[2], "FAILED", 3);

    // `long` is re-adopted: still running, same supervisor, its GPUs still its own.
    assert_eq!(d.status(long), "RUNNING", "{}", d.diagnostics());
    d.wait_queue_status(long, "RUNNING");
    p.check(
        links(&d.spool, long) == ["running"],
        "state links wrong",
        || format!("long: {:?}", links(&d.spool, long)),
    );
    p.check(alive(long_sup), "re-adopted supervisor gone", || {
        format!("long's supervisor {long_sup} is not running")
    });
    p.check(
        supervisor_pid(&d, long) == Some(long_sup),
        "long relaunched",
        || format!("supervisor {long_sup} -> {:?}", supervisor_pid(&d, long)),
    );
    // p1 takes the two GPUs freed by quick and bad; p2 must wait for long's.
    wait_until(
        DEADLINE,
        "p1 to start on the GPUs freed meanwhile",
        || d.log(p1).contains("start p1"),
        || d.diagnostics(),
    );
    let p1_gpus = gpus_of(&d.info(p1));
    p.check(
        p1_gpus.len() == 2 && p1_gpus.is_disjoint(&long_gpus),
        "GPU given twice after re-adoption",
        || format!("p1 got {p1_gpus:?} while the re-adopted long holds {long_gpus:?}"),
    );
    d.wait_queue_status(p2, "PENDING");
    std::thread::sleep(ms(700));
    p.check(
        d.status(p2) == "PENDING" && !runs[4].exists(),
        "pending job started on a re-adopted job's GPUs",
        || {
            format!(
                "p2 is {} (GPUs {:?}) while long holds {long_gpus:?} and p1 {p1_gpus:?}",
                d.status(p2),
                gpus_of(&d.info(p2))
            )
        },
    );

    gates[0].open();
    d.wait_done(long, "SUCCEEDED");
    check_ended(&mut p, &d, long, "long", &runs[0], "SUCCEEDED", 0);
    wait_until(
        DEADLINE,
        "p2 to start once long ended",
        || d.log(p2).contains("start p2"),
        || d.diagnostics(),
    );
    let p2_gpus = gpus_of(&d.info(p2));
    p.check(
        p2_gpus.len() == 1 && p2_gpus.is_disjoint(&p1_gpus),
        "GPU given twice",
        || format!("p2 got {p2_gpus:?} while p1 holds {p1_gpus:?}"),
    );
    gates[3].open();
    gates[4].open();
    d.wait_done(p1, "SUCCEEDED");
    d.wait_done(p2, "SUCCEEDED");
    check_ended(&mut p, &d, p1, "p1", &runs[3], "SUCCEEDED", 0);
    check_ended(&mut p, &d, p2, "p2", &runs[4], "SUCCEEDED", 0);
    assert!(p.is_empty(), "{}\n{}", p.report(), d.diagnostics());
}

// ---------------------------------------------------------------------------- 3. supervisor

/// A job that records its shell's pid and a child's, prints `ready`, and runs until killed.
fn victim_job(pids: &Path) -> String {
    let p = pids.display();
    format!(
        "name: victim\nresources:\n  accelerators: H100:1\nrun: |\n  echo $$ >> '{p}'\n  \
         sleep 1000 &\n  echo $! >> '{p}'\n  echo ready\n  wait\n"
    )
}

fn waiter_job(marker: &Path) -> String {
    format!(
        "name: waiter\nresources:\n  accelerators: H100:1\nrun: |\n  \
         echo \"waiter $CUDA_VISIBLE_DEVICES\" >> '{}'\n",
        marker.display()
    )
}

/// Starts the victim (holding the only GPU) and a waiter behind it; returns their IDs and
/// the victim's processes.
fn victim_and_waiter(d: &mut Daemon) -> (u64, u64, Leftovers, PathBuf) {
    let s = d.scratch();
    let pids = s.join("victim-pids");
    let marker = s.join("waiter-ran");
    let v = d.submit_new("victim.yaml", &victim_job(&pids));
    wait_until(
        DEADLINE,
        "the victim to run",
        || d.log(v).contains("ready") && read_pids(&pids).len() == 2,
        || d.diagnostics(),
    );
    let procs = Leftovers::adopt(&read_pids(&pids));
    let w = d.submit_new("waiter.yaml", &waiter_job(&marker));
    d.wait_queue_status(w, "PENDING");
    (v, w, procs, marker)
}

/// After the victim's supervisor was SIGKILLed: FAILED_DRIVER with a reason, GPU freed, and
/// none of the victim's processes left (else the waiter now shares the GPU with them).
fn check_driver_loss(d: &Daemon, v: u64, w: u64, procs: &Leftovers, marker: &Path) {
    let mut p = Problems::default();
    d.wait_done(v, "FAILED_DRIVER");
    let info = d.info(v);
    p.check(
        info["status"] == "FAILED_DRIVER"
            && info["reason"]
                .as_str()
                .is_some_and(|r| !r.trim().is_empty()),
        "info.json lacks the FAILED_DRIVER reason",
        || format!("{info:#}"),
    );
    p.check(
        d.log(v).contains("FAILED_DRIVER"),
        "log does not say FAILED_DRIVER",
        || format!("log {:?}", d.log(v)),
    );
    d.wait_done(w, "SUCCEEDED");
    p.check(
        lines(marker).len() == 1,
        "waiter did not run exactly once",
        || format!("{:?}", lines(marker)),
    );
    let gone = poll(Duration::from_secs(5), || procs.alive().is_empty());
    p.check(
        gone,
        "processes of a FAILED_DRIVER job keep running",
        || {
            format!(
                "job {v}'s processes {:?} (its shell and `sleep 1000`) still run 5 s after it was \
             recorded FAILED_DRIVER; meanwhile its GPU was given to job {w} ({:?})",
                procs.alive(),
                lines(marker)
            )
        },
    );
    assert!(p.is_empty(), "{}\n{}", p.report(), d.diagnostics());
}

/// SIGKILL a running job's supervisor while the daemon watches.
#[test]
fn supervisor_killed_is_failed_driver() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8", "--kill-grace", "1"]);
    let (v, w, procs, marker) = victim_and_waiter(&mut d);
    let sup = supervisor_pid(&d, v).expect("the supervisor's record");
    sigkill(sup);
    check_driver_loss(&d, v, w, &procs, &marker);
}

/// The same while no daemon runs: SIGKILL the daemon, then the supervisor; the next start
/// finds the lock free, a supervisor record and no result.
#[test]
fn supervisor_killed_while_daemon_down_is_failed_driver() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8", "--kill-grace", "1"]);
    let (v, w, procs, marker) = victim_and_waiter(&mut d);
    let sup = supervisor_pid(&d, v).expect("the supervisor's record");
    d.kill9();
    sigkill(sup);
    wait_until(
        DEADLINE,
        "the supervisor to die",
        || !alive(sup),
        || d.diagnostics(),
    );
    d.spawn();
    check_driver_loss(&d, v, w, &procs, &marker);
}

// ---------------------------------------------------------------------------- 4. lock

/// A second `serve` on a served spool exits non-zero, says why, and disturbs nothing.
#[test]
fn second_daemon_refused() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "4"]);
    let first = d.pid().expect("pid");
    let mut second = Command::new(BIN)
        .arg("--spool")
        .arg(&d.spool)
        .arg("serve")
        .args(["--gpus", "H100:1", "--cpus", "4"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn second serve");
    let st = wait_child(
        &mut second,
        Duration::from_secs(20),
        "the second daemon to give up",
        || d.diagnostics(),
    );
    let mut err = String::new();
    if let Some(mut e) = second.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(!st.success(), "second serve succeeded: {st}\n{err}");
    assert!(
        err.contains("another skyspool daemon already serves"),
        "the refusal does not say another daemon serves the spool: {err:?}"
    );
    assert!(d.exited().is_none(), "the first daemon died");
    let lock = fs::read_to_string(d.path(".skyspool/lock")).unwrap_or_default();
    assert_eq!(
        lock.trim(),
        first.to_string(),
        "the lock file no longer names the serving daemon"
    );
    let id = d.submit_new(
        "after.yaml",
        "name: after\nresources:\n  accelerators: H100:1\nrun: echo after\n",
    );
    d.wait_done(id, "SUCCEEDED");
}

// ---------------------------------------------------------------------------- 5. ENOSPC

/// A tmpfs mounted on a fresh directory; unmounted (lazily if busy) when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::Builder::new()
            .prefix("skyspool-tmpfs-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs { dir })
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// The daemon first (it stops and cancels its jobs), then the filesystem under it.
struct OnTmpfs {
    d: Daemon,
    _fs: Tmpfs,
}

fn free_bytes(p: &Path) -> u64 {
    nix::sys::statvfs::statvfs(p)
        .map(|v| v.blocks_available() * v.fragment_size())
        .unwrap_or(0)
}

/// Grows `filler` until the filesystem is full, then gives back `leave` bytes.
fn fill_leaving(filler: &Path, leave: u64) {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(filler)
        .expect("filler");
    let chunk = vec![0u8; 64 * 1024];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling: {e}"),
        }
    }
    let len = f.metadata().expect("stat filler").len();
    f.set_len(len.saturating_sub(leave))
        .expect("truncate filler");
}

/// The spool on a 2 MiB tmpfs that fills up: jobs submitted with little space left run; a
/// submission that cannot be staged waits (it is not lost, nor rejected for lack of space)
/// and is admitted once space returns; a job whose output fills the disk ends with a status
/// that says what happened; the daemon keeps serving throughout.
#[test]
fn enospc() {
    if !is_root() {
        skip("enospc needs root to mount a tmpfs");
        return;
    }
    let fs_ = match Tmpfs::mount("2m") {
        Ok(m) => m,
        Err(e) => {
            skip(&format!("enospc: cannot mount a tmpfs: {e}"));
            return;
        }
    };
    let mut d = Daemon::unstarted(&["--gpus", "H100:2", "--cpus", "8", "--kill-grace", "1"]);
    d.spool = fs_.path().join("spool");
    let mut env = OnTmpfs { d, _fs: fs_ };
    let d = &mut env.d;
    d.spawn();
    let mnt = d.spool.parent().expect("mount").to_path_buf();
    let filler = mnt.join("filler");
    let s = d.scratch();
    let mut p = Problems::default();
    let echo = |name: &str| {
        format!("name: {name}\nrun: |\n  echo \"start {name}\"\n  echo \"end {name}\"\n")
    };

    // A: waits for its gate, then writes 3 MB to its log (more than the filesystem holds).
    let gate = Gate::new(&s, "writer");
    let a_yaml = format!(
        "name: writer\nresources:\n  accelerators: H100:1\nrun: |\n  echo \"start writer\"\n  \
         {}\n  head -c 3000000 /dev/zero | tr '\\0' x\n  echo\n  echo \"end writer\"\n",
        gate.wait_cmd()
    );
    let a = d.submit_new("writer.yaml", &a_yaml);
    wait_until(
        DEADLINE,
        "the writer to start",
        || d.log(a).contains("start writer"),
        || d.diagnostics(),
    );

    // Little space left (96 KiB: a small job takes ~9 pages of tmpfs while it runs, its
    // files and the spares of `status` and `info.json`): small jobs are still admitted and
    // run.
    fill_leaving(&filler, 96 * 1024);
    let mut small = Vec::new();
    for n in ["b1", "b2"] {
        let id = d.submit_new(&format!("{n}.yaml"), &echo(n));
        d.wait_done(id, "SUCCEEDED");
        p.check(
            d.log(id).contains(&format!("end {n}")),
            "incomplete log with space left",
            || format!("{n}: {:?}", d.log(id)),
        );
        small.push((id, n));
    }

    // Full: one page left, taken by a submission, so it cannot be staged.
    fill_leaving(&filler, 4096);
    let c_file = "c.yaml";
    let incoming = d.path("incoming");
    let mut dropped = false;
    for _ in 0..4 {
        let r = fs::write(incoming.join(".c.yaml.tmp"), echo("c"));
        if r.is_ok() {
            fs::rename(incoming.join(".c.yaml.tmp"), incoming.join(c_file)).expect("rename c");
            dropped = true;
            break;
        }
        let _ = fs::remove_file(incoming.join(".c.yaml.tmp"));
        let len = fs::metadata(&filler).map(|m| m.len()).unwrap_or(0);
        let _ = fs::OpenOptions::new()
            .write(true)
            .open(&filler)
            .and_then(|f| f.set_len(len.saturating_sub(4096)));
    }
    assert!(dropped, "could not write the submission c.yaml at all");
    assert!(
        free_bytes(&mnt) <= 8192,
        "the tmpfs is not full: {} bytes free",
        free_bytes(&mnt)
    );
    let id_before_c = d.job_ids().last().copied().unwrap_or(0);
    std::thread::sleep(ms(500));
    // The daemon keeps serving, and does not spin on what it cannot admit.
    let pid = d.pid().expect("daemon pid");
    let cpu0 = cpu_ticks(pid).unwrap_or(0);
    std::thread::sleep(Duration::from_secs(2));
    let cpu1 = cpu_ticks(pid).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    p.check(
        cpu1.saturating_sub(cpu0) < hz,
        "daemon busy-loops while the disk is full",
        || {
            format!(
                "the daemon used {:.2} s of CPU in 2 s with one submission it cannot stage \
                 (disk full); staging now {:?}, incoming {:?}",
                (cpu1 - cpu0) as f64 / hz as f64,
                staged_submissions(&d.path(".skyspool/staging")),
                d.incoming_names()
            )
        },
    );
    assert!(
        d.exited().is_none(),
        "the daemon died with the disk full\n{}",
        d.daemon_log()
    );
    p.check(
        rejections_of_name(d, c_file).is_empty(),
        "submission rejected for lack of space",
        || {
            format!(
                "{c_file}: {}",
                fs::read_to_string(d.path("rejected/c.yaml.reason")).unwrap_or_default()
            )
        },
    );

    // A fills what is left with its output; its supervisor can then hardly write anything.
    // (The supervisor itself stays, free for the next job.)
    gate.open();
    wait_until(
        Duration::from_secs(30),
        "the writer to be settled",
        || is_final(&d.status(a)) && d.path("done").join(a.to_string()).exists(),
        || d.diagnostics(),
    );
    std::thread::sleep(ms(500));
    assert!(
        d.exited().is_none(),
        "the daemon died with the disk full\n{}",
        d.daemon_log()
    );

    // Space comes back: the daemon admits what waited and serves new submissions.
    let _ = fs::remove_file(&filler);
    let after = d.submit_new("after.yaml", &echo("after"));
    d.wait_done(after, "SUCCEEDED");
    let c_admitted = poll(Duration::from_secs(10), || {
        d.job_ids().into_iter().any(|id| d.info(id)["name"] == "c")
    });
    p.check(
        c_admitted,
        "submission not admitted once space returned",
        || {
            format!(
                "c.yaml: incoming {:?}, staging {:?}, rejected {:?}",
                d.incoming_names(),
                staged_submissions(&d.path(".skyspool/staging")),
                names_in(&d.path("rejected"))
            )
        },
    );
    if let Some(c) = d
        .job_ids()
        .into_iter()
        .find(|id| d.info(*id)["name"] == "c")
    {
        d.wait_done(c, "SUCCEEDED");
        p.check(
            c <= id_before_c + 50,
            "IDs burned while the disk was full",
            || format!("the job before c.yaml had ID {id_before_c}; c.yaml got ID {c}"),
        );
    }

    // The writer's end is recorded, says what happened, and agrees everywhere.
    let a_final = poll(Duration::from_secs(10), || is_final(&d.status(a)));
    let info = d.info(a);
    let log = d.log(a);
    let said = |t: &str| {
        let t = t.to_lowercase();
        [
            "no space",
            "enospc",
            "disk full",
            "filesystem is full",
            "file system is full",
        ]
        .iter()
        .any(|w| t.contains(w))
    };
    p.check(
        a_final && d.status(a) != "SUCCEEDED",
        "job that filled the disk not recorded as failed",
        || {
            format!(
                "writer: status {} links {:?} info.json status {} queue {:?}",
                d.status(a),
                links(&d.spool, a),
                info["status"],
                d.queue_status(a)
            )
        },
    );
    p.check(
        said(&log) || info["reason"].as_str().is_some_and(said),
        "disk full not visible in the job's log or reason",
        || {
            format!(
                "writer: info.json reason {} log {:?}",
                info["reason"],
                tail(&log, 5)
            )
        },
    );

    // Nothing admitted is lost, and every record agrees with itself.
    for id in d.job_ids() {
        let st = d.status(id);
        let info = d.info(id);
        p.check(is_final(&st), "job not final", || format!("job {id}: {st}"));
        p.check(
            info["status"] == st.as_str(),
            "info.json status differs from status",
            || format!("job {id}: status {st}, info.json {}", info["status"]),
        );
        p.check(links(&d.spool, id) == ["done"], "state links wrong", || {
            format!("job {id}: {st} {:?}", links(&d.spool, id))
        });
    }
    for (id, n) in small {
        p.check(d.status(id) == "SUCCEEDED", "admitted job lost", || {
            format!("{n} (job {id}) is {}", d.status(id))
        });
    }
    p.check(
        d.incoming_names().is_empty()
            && staged_submissions(&d.path(".skyspool/staging")).is_empty(),
        "submissions left behind",
        || {
            format!(
                "incoming {:?} staging {:?}",
                d.incoming_names(),
                staged_submissions(&d.path(".skyspool/staging"))
            )
        },
    );
    assert!(d.exited().is_none(), "the daemon died\n{}", d.daemon_log());
    let log = d.daemon_log();
    assert!(
        p.is_empty(),
        "{}\n--- daemon.log: {} lines, the last 25 ---\n{}\n--- queue ---\n{}",
        p.report(),
        log.lines().count(),
        tail(&log, 25),
        d.queue()
    );
}

fn rejections_of_name(d: &Daemon, file: &str) -> Vec<String> {
    names_in(&d.path("rejected"))
        .into_iter()
        .filter(|n| n == file || n.starts_with(&format!("{file}.")) && !n.ends_with(".reason"))
        .collect()
}

// ------------------------------------------------------------ crash points, made exactly
//
// Random SIGKILLs rarely land inside a window of a few instructions. These tests build the
// spool exactly as a SIGKILL at such a point leaves it (from a real job, moved back a step),
// then start the daemon on it.

/// `Spool::publish` removes `staging/<id>/in--NAME`, then renames `staging/<id>` to
/// `jobs/<id>`. A SIGKILL between the two leaves a fully staged job (job.yaml, status, log,
/// info.json) without `in--NAME`. The next start must publish it, not drop it.
#[test]
fn crash_inside_publish_loses_nothing() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "hold");
    let runs = s.join("runs-hold");
    let hold = d.submit_new("hold.yaml", &held_job("hold", "H100:1", &gate, &runs, 0));
    let x_runs = s.join("runs-x");
    let x = d.submit_new("x.yaml", &held_job("x", "H100:1", &gate, &x_runs, 0));
    d.wait_queue_status(x, "PENDING");
    d.kill9();
    // Back one step: published -> staged, as `publish` left it after its first line.
    let staged = d.path(".skyspool/staging").join(x.to_string());
    fs::rename(d.job(x), &staged).expect("unpublish");
    fs::remove_file(d.path("pending").join(x.to_string())).expect("unlink pending");
    assert!(!staged.join("in--x.yaml").exists());
    d.spawn();
    gate.open();
    d.wait_done(hold, "SUCCEEDED");
    let found = poll(Duration::from_secs(10), || {
        d.job_ids().contains(&x) || !rejections_of_name(&d, "x.yaml").is_empty()
    });
    assert!(
        found,
        "the submission x.yaml, staged as job {x} when the daemon died inside publish, is gone: \
         no jobs/{x}, no rejection, nothing in incoming/ ({:?}) or staging/ ({:?})\n{}",
        d.incoming_names(),
        staged_submissions(&d.path(".skyspool/staging")),
        d.daemon_log()
    );
    d.wait_done(x, "SUCCEEDED");
    assert_eq!(lines(&x_runs).len(), 1);
}

/// The daemon hands a job over and dies before the supervisor writes its record;
/// the next daemon starts before it does. The supervisor holds the launch lock (inherited
/// at spawn), so it is alive: the job must not be re-queued, re-launched or failed, and its
/// GPU must stay taken.
#[test]
fn restart_before_supervisor_records_itself() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let s = d.scratch();
    let gate = Gate::new(&s, "j");
    let runs = s.join("runs-j");
    let j = d.submit_new("j.yaml", &held_job("j", "H100:1", &gate, &runs, 0));
    wait_until(
        DEADLINE,
        "j to run",
        || d.log(j).contains("start j"),
        || d.diagnostics(),
    );
    let marker = s.join("waiter-ran");
    let w = d.submit_new("waiter.yaml", &waiter_job(&marker));
    d.wait_queue_status(w, "PENDING");
    let sup = supervisor_pid(&d, j).expect("the supervisor's record");
    d.kill9();
    // As at the moment the supervisor has the job but has not written its record yet: the
    // lock file holds only the daemon's launch record (the supervisor's line is the last).
    let record = d.job(j).join(".sky/supervisor.lock");
    let full = fs::read_to_string(&record).expect("supervisor.lock");
    let launch_only: String = full.lines().take(1).map(|l| format!("{l}\n")).collect();
    assert_ne!(
        launch_only, full,
        "the supervisor's record is in supervisor.lock"
    );
    fs::write(&record, &launch_only).expect("hide the supervisor's record");
    d.spawn();
    // The supervisor writes its record a moment later.
    std::thread::sleep(ms(100));
    fs::write(&record, &full).expect("restore the supervisor's record");
    std::thread::sleep(ms(1000));
    let mut p = Problems::default();
    p.check(
        d.status(j) == "RUNNING" && alive(sup),
        "job with a live supervisor failed or re-queued at start-up",
        || {
            format!(
                "j (supervisor {sup} alive: {}) is {} with reason {}",
                alive(sup),
                d.status(j),
                d.info(j)["reason"]
            )
        },
    );
    // Any event makes the daemon schedule: the waiter must still wait for j's GPU.
    let j_status = d.status(j);
    let waiter_before = d.status(w);
    let nudge = d.submit_new("nudge.yaml", "name: nudge\nrun: echo nudge\n");
    d.wait_done(nudge, "SUCCEEDED");
    let waiter_started = poll(Duration::from_secs(3), || marker.exists());
    p.check(
        !waiter_started,
        "GPU of a running job given to another",
        || {
            format!(
                "waiter ran on {:?} while j (supervisor {sup} alive: {}) still runs on GPU 0",
                lines(&marker),
                alive(sup)
            )
        },
    );
    if j_status != "RUNNING" && waiter_before == "PENDING" && waiter_started {
        p.add(
            "pending job not scheduled after resources were freed",
            format!(
                "j's GPU was released when j was recorded {j_status} at start-up, yet the waiter \
                 stayed PENDING ~1 s, until an unrelated submission woke the daemon"
            ),
        );
    }
    gate.open();
    wait_until(
        DEADLINE,
        "j's supervisor to end",
        || !alive(sup),
        || d.diagnostics(),
    );
    let settled = poll(DEADLINE, || {
        is_final(&d.status(j)) && d.path("done").join(j.to_string()).exists()
    });
    let info = d.info(j);
    p.check(
        settled && d.status(j) == "SUCCEEDED" && info["status"] == "SUCCEEDED",
        "job's records disagree with how it ended",
        || {
            format!(
                "j ran to the end (log {:?}) but status {} / info.json {} (reason {})",
                d.log(j),
                d.status(j),
                info["status"],
                info["reason"]
            )
        },
    );
    p.check(lines(&runs).len() == 1, "job ran more than once", || {
        format!("{:?}", lines(&runs))
    });
    d.wait_done(w, "SUCCEEDED");
    assert!(p.is_empty(), "{}\n{}", p.report(), d.diagnostics());
}

/// A chunk of a batch (up to 64 submissions) is claimed (every file renamed into
/// `staging/<id>/in--NAME`) before any of it is staged. A SIGKILL then leaves claimed submissions whose name is recorded nowhere
/// but in the daemon's memory. The next start admits them; each must keep the name it was
/// submitted under (`source`, and the job name of a YAML without `name:`).
#[test]
fn crash_after_claim_keeps_the_submission_name() {
    let mut d = Daemon::start(&["--gpus", "H100:1", "--cpus", "8"]);
    let incoming = d.path("incoming");
    let staging = d.path(".skyspool/staging");
    let mut files = Vec::new();
    let mut caught = 0;
    for attempt in 0..5 {
        let pid = d.pid().expect("pid");
        let nix_pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        for i in 0..100 {
            let file = format!("n{attempt}-{i:03}.yaml");
            drop_file(&incoming, &file, "run: echo hi\n", false);
            files.push(file);
        }
        // Kill it as soon as the first claim appears: the rest of the batch is then claimed
        // or being claimed, and little of it staged.
        let watch = staging.clone();
        let killer = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while staged_submissions(&watch).is_empty() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(50));
            }
            sigkill(pid);
        });
        nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGCONT).expect("SIGCONT");
        killer.join().expect("killer");
        d.kill9();
        caught = numeric_dir(&staging)
            .into_iter()
            .filter(|id| {
                let dir = staging.join(id.to_string());
                let claimed = std::fs::read_dir(&dir)
                    .map(|rd| {
                        rd.flatten()
                            .any(|e| e.file_name().to_string_lossy().starts_with("in--"))
                    })
                    .unwrap_or(false);
                claimed && !dir.join("info.json").exists()
            })
            .count();
        d.spawn();
        if caught > 0 {
            break;
        }
    }
    assert!(caught > 0, "never caught a claimed, unstaged submission");
    wait_until(
        Duration::from_secs(60),
        "every submission to be admitted and run",
        || {
            let ids = d.job_ids();
            ids.len() >= files.len() && ids.iter().all(|id| is_final(&d.status(*id)))
        },
        || d.daemon_log(),
    );
    let mut wrong = Vec::new();
    for id in d.job_ids() {
        let info = d.info(id);
        let source = info["source"].as_str().unwrap_or("").to_string();
        let name = info["name"].as_str().unwrap_or("").to_string();
        let ok = source
            .strip_prefix("incoming/")
            .is_some_and(|f| files.iter().any(|x| x == f) && name == f.trim_end_matches(".yaml"));
        if !ok {
            wrong.push(format!("job {id}: source {source:?}, name {name:?}"));
        }
    }
    assert_eq!(d.job_ids().len(), files.len(), "{}", d.daemon_log());
    assert!(
        wrong.is_empty(),
        "{} of {} jobs recovered from staging/ ({caught} were claimed but not staged when the \
         daemon died) lost the name they were submitted under:\n{}",
        wrong.len(),
        files.len(),
        wrong.join("\n")
    );
}
