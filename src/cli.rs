//! The command line: `serve` runs the daemon; every other command is a thin reader or
//! writer of spool files, so it works on any copy of the spool (local, NFS, sshfs).

use crate::daemon::{self, DaemonConfig};
use crate::inventory::Inventory;
use crate::queue::{self, TimeStyle};
use crate::resources::Milli;
use crate::scheduler::{JobId, Scheduler};
use crate::spec;
use crate::spool::{self, JobInfo, Spool, Status};
use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(
    name = "skyspool",
    version,
    about = "A GPU job queue whose interface is a directory: drop SkyPilot task YAMLs into incoming/"
)]
pub struct Cli {
    /// The spool directory.
    #[arg(long, global = true, env = "SKYSPOOL_DIR", default_value = "spool")]
    pub spool: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the scheduler daemon on the spool (created if missing).
    Serve {
        /// Cluster file listing the nodes (see README); default: this machine only.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Declare this node's GPUs instead of asking NVML, e.g. `H100:4` or `none`.
        #[arg(long)]
        gpus: Option<String>,
        /// CPUs this node offers to jobs (default: the machine's count).
        #[arg(long)]
        cpus: Option<String>,
        /// Cluster name shown to jobs (SKYPILOT_CLUSTER_INFO, SKYPILOT_TASK_ID).
        #[arg(long)]
        cluster_name: Option<String>,
        /// Seconds between SIGTERM and SIGKILL when a job is cancelled.
        #[arg(long, default_value_t = 10.0)]
        kill_grace: f64,
        /// Treat submissions owned by root as this user's: they run as USER (default: they
        /// run as root).
        #[arg(long, value_name = "USER")]
        root_jobs_as: Option<String>,
        /// Once the oldest waiting job has waited this many seconds, hold back the resources
        /// it needs until it starts (so a stream of small jobs cannot starve a big one);
        /// `off` for SkyPilot's pure backfill.
        #[arg(long, default_value = "1800", value_name = "SECS|off")]
        starvation_bound: String,
        /// Also expose the spool as a FUSE mount at DIR (live status/queue/logs; bad
        /// submissions fail at close()).
        #[arg(long, value_name = "DIR")]
        mount: Option<PathBuf>,
        /// Start up to N queued jobs ahead (their bash waits at its first line) while every
        /// slot they could take is busy, so a freed slot goes to a job that is up already;
        /// and, once idle after a lone job, one bash ahead for its user's next submission.
        /// 0 turns both off.
        #[arg(long, default_value_t = 4, value_name = "N")]
        prestart: usize,
        /// Admissions and job ends are durable on one fsync of the spool's journal; the
        /// job files themselves are synced by a checkpoint (one syncfs of the spool's
        /// filesystem) at most this many seconds later, or once 1 MiB of records wait.
        #[arg(long, default_value_t = 30.0, value_name = "SECS")]
        checkpoint_after: f64,
    },
    /// Submit job YAMLs safely (written aside, then renamed into incoming/).
    Submit {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Return at once instead of waiting for the daemon to give the job an ID.
        #[arg(long, short = 'd')]
        detach: bool,
    },
    /// Show the job queue (like `sky queue`).
    Queue {
        /// Only jobs that have not ended.
        #[arg(long)]
        active: bool,
    },
    /// Print a job's log; with --follow, stream it until the job ends.
    Logs {
        id: JobId,
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Cancel jobs (creates jobs/<id>/cancel; the daemon stops them).
    Cancel {
        ids: Vec<JobId>,
        /// Every job of yours that has not ended.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Print a job's status word. Exit code like `sky logs --status`: 0 succeeded,
    /// 100 failed, 101 not finished, 102 not found, 103 cancelled.
    Status { id: JobId },
    /// Validate job YAMLs without submitting them (with --spool: also whether the
    /// cluster serving that spool could ever run them).
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// (internal) Run one job; started by the daemon.
    #[command(hide = true)]
    Supervise,
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let spool_given = std::env::args().any(|a| a == "--spool" || a.starts_with("--spool="))
        || std::env::var_os("SKYSPOOL_DIR").is_some();
    match cli.command {
        Command::Serve {
            config,
            gpus,
            cpus,
            cluster_name,
            kill_grace,
            root_jobs_as,
            starvation_bound,
            mount,
            prestart,
            checkpoint_after,
        } => {
            let starvation_bound = match starvation_bound.as_str() {
                "off" | "none" => None,
                secs => Some(Duration::from_secs_f64(
                    secs.parse::<f64>()
                        .ok()
                        .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 1e9)
                        .ok_or_else(|| {
                            anyhow::anyhow!("--starvation-bound: give seconds (e.g. 1800) or off")
                        })?,
                )),
            };
            let cpus = cpus
                .map(|c| Milli::parse_positive(&c).map_err(|e| anyhow::anyhow!("--cpus: {e}")))
                .transpose()?;
            if !(0.0..=86400.0).contains(&kill_grace) {
                bail!("--kill-grace must be between 0 and 86400 seconds");
            }
            if !(0.0..=86400.0).contains(&checkpoint_after) {
                bail!("--checkpoint-after must be between 0 and 86400 seconds");
            }
            daemon::serve(DaemonConfig {
                spool: cli.spool,
                config,
                gpus,
                cpus,
                cluster_name,
                kill_grace: Duration::from_secs_f64(kill_grace),
                root_jobs_as,
                starvation_bound,
                mount,
                prestart,
                checkpoint_after: Duration::from_secs_f64(checkpoint_after),
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit { files, detach } => submit(&Spool::at(&cli.spool), &files, detach),
        Command::Queue { active } => {
            print_queue(&Spool::at(&cli.spool), active)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Logs { id, follow } => logs(&Spool::at(&cli.spool), id, follow),
        Command::Cancel { ids, all } => cancel(&Spool::at(&cli.spool), ids, all),
        Command::Status { id } => {
            let spool = Spool::at(&cli.spool);
            match spool.read_status(id) {
                Ok(s) => {
                    println!("{s}");
                    Ok(ExitCode::from(status_exit_code(s)))
                }
                Err(spool::SpoolError::NoSuchJob(_)) => {
                    eprintln!("job {id} not found in {}", spool.root().display());
                    Ok(ExitCode::from(102))
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Check { files } => check(&Spool::at(&cli.spool), spool_given, &files),
        Command::Supervise => {
            crate::executor::supervise_main()?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `sky logs --status` exit codes.
pub fn status_exit_code(s: Status) -> u8 {
    match s {
        Status::Succeeded => 0,
        Status::Failed | Status::FailedSetup | Status::FailedDriver => 100,
        Status::Cancelled => 103,
        _ => 101,
    }
}

/// Prints `skyspool queue`: the rows of [`queue_rows`], laid out.
fn print_queue(spool: &Spool, active: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let table = std::fs::read_to_string(spool.root().join("queue")).ok();
    let rows = queue_rows(spool, table.as_deref(), active)?;
    let mut out = std::io::stdout().lock();
    match out
        .write_all(queue::render_rows(&rows).as_bytes())
        .and_then(|()| out.flush())
    {
        // (`skyspool queue | head`: the reader has what it wanted.)
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The rows of `skyspool queue`, newest first. Rows that cannot have changed since the
/// daemon last wrote its `queue` file (`table`) are taken from it: an ended job's (final),
/// and a pending job's while it is still linked from `pending/` (nothing in a pending row
/// changes before it leaves). Every other job is read from its records (`info.json`,
/// `status`). With 10,000 finished jobs this reads one file and a directory instead of
/// 20,000 files, and cuts the file's rows without copying them.
fn queue_rows<'t>(
    spool: &Spool,
    table: Option<&'t str>,
    active: bool,
) -> anyhow::Result<Vec<queue::Cells<'t>>> {
    let now = chrono::Utc::now();
    // pending/ before running/: a job moving between them is seen in one of the two.
    // (Sorted: both are looked up by binary search.)
    let pending = spool.state_ids(spool::State::Pending).unwrap_or_default();
    let ids = if active {
        let mut ids = pending.clone();
        ids.extend(spool.state_ids(spool::State::Running).unwrap_or_default());
        ids.sort_unstable();
        ids.dedup();
        ids
    } else {
        spool.job_ids()?
    };
    let has = |set: &[JobId], id: &JobId| set.binary_search(id).is_ok();
    let mut relative = queue::Relative::new(now);
    let mut rows: Vec<(JobId, queue::Cells<'t>)> = Vec::with_capacity(ids.len());
    for cells in table.and_then(queue::parse_table).unwrap_or_default() {
        let Ok(id) = cells[0].parse::<JobId>() else {
            continue;
        };
        if !has(&ids, &id) {
            continue;
        }
        let status = spool::Status::parse(&cells[7]);
        let current = match status {
            // (Listing only active jobs, an ended one is checked against its records.)
            Some(s) if s.is_terminal() => !active,
            Some(spool::Status::Pending) => has(&pending, &id),
            _ => false,
        };
        if current {
            rows.push((id, relative.cells(cells)));
        }
    }
    // A table the daemon wrote lists each job once, newest first; anything else is sorted
    // the same way below.
    rows.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
    rows.dedup_by_key(|r| r.0);
    let from_table: Vec<JobId> = rows.iter().rev().map(|r| r.0).collect();
    for &id in &ids {
        if has(&from_table, &id) {
            continue;
        }
        let Some(info) = current_info(spool, id) else {
            continue;
        };
        if active && info.status.is_terminal() {
            continue;
        }
        rows.push((
            id,
            queue::row_cells(&info, now, TimeStyle::Relative).map(std::borrow::Cow::Owned),
        ));
    }
    if rows.len() > from_table.len() {
        // Rows the table did not have were added after its (sorted) ones.
        rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    }
    Ok(rows.into_iter().map(|(_, cells)| cells).collect())
}

/// A job's record with its current status (`status` is authoritative, `info.json` may lag).
fn current_info(spool: &Spool, id: JobId) -> Option<JobInfo> {
    let mut info = spool.read_info(id).ok()?;
    if let Ok(s) = spool.read_status(id) {
        info.status = s;
    }
    Some(info)
}

/// Every job record, with the live `status` file taking precedence.
fn load_jobs(spool: &Spool) -> anyhow::Result<Vec<JobInfo>> {
    Ok(spool
        .job_ids()?
        .into_iter()
        .filter_map(|id| current_info(spool, id))
        .collect())
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{:x}{:x}", std::process::id(), nanos & 0xffff_ffff)
}

/// Copies `src` into `dst` (a new directory), files and directories only; links are
/// copied as links, never followed.
fn copy_tree(src: &Path, dst: &Path) -> anyhow::Result<()> {
    for entry in walkdir::WalkDir::new(src).follow_links(false) {
        let entry = entry?;
        let rel = entry.path().strip_prefix(src)?;
        let target = dst.join(rel);
        let ft = entry.file_type();
        if ft.is_dir() {
            fs::create_dir_all(&target)?;
        } else if ft.is_symlink() {
            let link = fs::read_link(entry.path())?;
            std::os::unix::fs::symlink(link, &target)?;
        } else if ft.is_file() {
            fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Writes each file (and its workdir, when it names one that exists here) aside in
/// `incoming/`, then renames it into place; waits for its job ID unless detached.
fn submit(spool: &Spool, files: &[PathBuf], detach: bool) -> anyhow::Result<ExitCode> {
    let incoming = spool.incoming();
    if !incoming.is_dir() {
        bail!(
            "{} is not a spool (no incoming/); start one with `skyspool --spool {} serve`",
            spool.root().display(),
            spool.root().display()
        );
    }
    let mut code = ExitCode::SUCCESS;
    for file in files {
        let text =
            fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        let origin = file.display().to_string();
        let parsed = match spec::parse(&text, &origin, &BTreeMap::new()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("{e}");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        let stem = file
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty() && !s.starts_with('.'))
            .unwrap_or("job")
            .to_string();
        let base = format!("{stem}-{}", unique_suffix());
        let workdir = parsed.workdir.as_deref().map(|w| {
            let p = PathBuf::from(w);
            if p.is_absolute() {
                p
            } else {
                file.parent().unwrap_or(Path::new(".")).join(p)
            }
        });
        let tmp = incoming.join(format!(".{base}.tmp"));
        let (final_name, is_dir) = match workdir.filter(|w| w.is_dir()) {
            Some(w) => {
                fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
                copy_tree(&w, &tmp)?;
                fs::write(tmp.join("job.yaml"), &text)?;
                (base.clone(), true)
            }
            None => {
                let mut f = fs::File::create(&tmp)?;
                f.write_all(text.as_bytes())?;
                f.sync_all()?;
                (format!("{base}.yaml"), false)
            }
        };
        let dest = incoming.join(&final_name);
        fs::rename(&tmp, &dest)?;
        // What we made, not what is there now: the daemon may have taken it already.
        let source = format!("incoming/{final_name}{}", if is_dir { "/" } else { "" });
        if detach {
            println!("submitted {source}");
            continue;
        }
        match wait_for_admission(spool, &final_name, &source, Duration::from_secs(30)) {
            Admitted::Job(id) => println!("Job ID: {id}"),
            Admitted::Rejected(reason) => {
                eprintln!("rejected: {}", reason.trim_end());
                code = ExitCode::FAILURE;
            }
            Admitted::Waiting => {
                println!("submitted {source} (no daemon has picked it up yet)");
            }
        }
    }
    Ok(code)
}

enum Admitted {
    Job(JobId),
    Rejected(String),
    Waiting,
}

fn wait_for_admission(spool: &Spool, name: &str, source: &str, timeout: Duration) -> Admitted {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(2);
    loop {
        let path = spool.incoming().join(name);
        let still_there = fs::symlink_metadata(&path).is_ok();
        // Through a FUSE mount, the name stays as a receipt: "job N".
        if still_there {
            if let Some(id) = fs::read_to_string(&path)
                .ok()
                .and_then(|t| t.strip_prefix("job ")?.trim().parse::<JobId>().ok())
            {
                return Admitted::Job(id);
            }
            let reason = spool.incoming().join(format!("{name}.reason"));
            if let Ok(text) = fs::read_to_string(&reason) {
                return Admitted::Rejected(text);
            }
        }
        if !still_there {
            // Newest jobs first: the one that came from our file.
            if let Ok(ids) = spool.job_ids() {
                for id in ids.iter().rev().take(256) {
                    if let Ok(info) = spool.read_info(*id) {
                        if info.source == source {
                            return Admitted::Job(*id);
                        }
                    }
                }
            }
            let reason = spool.rejected().join(format!("{name}.reason"));
            if let Ok(text) = fs::read_to_string(&reason) {
                return Admitted::Rejected(text);
            }
        }
        if Instant::now() >= deadline {
            return Admitted::Waiting;
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Prints a job's log; with `follow`, keeps printing until the job ends.
fn logs(spool: &Spool, id: JobId, follow: bool) -> anyhow::Result<ExitCode> {
    let dir = spool.job_dir(id);
    if !dir.is_dir() {
        eprintln!("job {id} not found in {}", spool.root().display());
        return Ok(ExitCode::from(102));
    }
    let path = dir.join("log");
    let mut offset = 0u64;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 * 1024];
    let mut copy_new = |offset: &mut u64, out: &mut std::io::StdoutLock| -> anyhow::Result<()> {
        if let Ok(mut f) = fs::File::open(&path) {
            f.seek(SeekFrom::Start(*offset))?;
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])?;
                *offset += n as u64;
            }
            out.flush()?;
        }
        Ok(())
    };
    copy_new(&mut offset, &mut out)?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    // Woken by inotify on the job directory; a timeout covers spools on NFS/sshfs.
    let mut inotify = inotify::Inotify::init()?;
    inotify.watches().add(
        &dir,
        inotify::WatchMask::MODIFY | inotify::WatchMask::MOVED_TO | inotify::WatchMask::CLOSE_WRITE,
    )?;
    let mut ev_buf = [0u8; 4096];
    loop {
        let status = spool.read_status(id)?;
        copy_new(&mut offset, &mut out)?;
        if status.is_terminal() {
            copy_new(&mut offset, &mut out)?;
            return Ok(ExitCode::from(status_exit_code(status)));
        }
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&inotify),
            nix::poll::PollFlags::POLLIN,
        )];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(1000u16));
        let _ = inotify.read_events(&mut ev_buf);
    }
}

/// Creates `jobs/<id>/cancel` for each job (as the calling user).
fn cancel(spool: &Spool, ids: Vec<JobId>, all: bool) -> anyhow::Result<ExitCode> {
    let me = nix::unistd::geteuid().as_raw();
    let targets: Vec<JobId> = if all {
        load_jobs(spool)?
            .into_iter()
            .filter(|j| !j.status.is_terminal() && (me == 0 || j.uid == me))
            .map(|j| j.id)
            .collect()
    } else {
        ids
    };
    if targets.is_empty() {
        if all {
            println!("no jobs to cancel");
            return Ok(ExitCode::SUCCESS);
        }
        bail!("give job IDs or --all");
    }
    let mut code = ExitCode::SUCCESS;
    for id in targets {
        match spool.read_status(id) {
            Ok(s) if s.is_terminal() => {
                println!("job {id} already ended ({s})");
            }
            Ok(_) => {
                let p = spool.job_dir(id).join("cancel");
                match fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)
                {
                    Ok(_) => println!("cancelling job {id}"),
                    Err(e) => {
                        eprintln!("job {id}: cannot request a cancel: {e}");
                        code = ExitCode::FAILURE;
                    }
                }
            }
            Err(spool::SpoolError::NoSuchJob(_)) => {
                eprintln!("job {id} not found");
                code = ExitCode::FAILURE;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(code)
}

/// Validates files; with an explicit spool, also checks them against its cluster.
fn check(spool: &Spool, spool_given: bool, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let sched = if spool_given {
        let path = spool.root().join("nodes.json");
        let text = fs::read(&path).with_context(|| {
            format!(
                "reading {} (is a daemon serving this spool?)",
                path.display()
            )
        })?;
        let inv = Inventory::from_nodes_json(&text)
            .with_context(|| format!("parsing {}", path.display()))?;
        Some((Scheduler::new(inv.capacities()), inv.cluster_name))
    } else {
        None
    };
    let mut code = ExitCode::SUCCESS;
    for file in files {
        let origin = file.display().to_string();
        let text = match fs::read(file) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{origin}: {e}");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        let text = match String::from_utf8(text) {
            Ok(t) => t,
            Err(_) => {
                eprintln!("{origin}: the file is not UTF-8 text");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        match spec::parse(&text, &origin, &BTreeMap::new()) {
            Ok(s) => {
                if let Some((sched, cluster)) = &sched {
                    if let Err(e) = sched.check_fits_ever(&s.demand()) {
                        eprintln!("{origin}: can never run on cluster {cluster}: {e}");
                        code = ExitCode::FAILURE;
                        continue;
                    }
                }
                println!("{origin}: ok ({})", s.resources_display());
            }
            Err(e) => {
                eprintln!("{e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}
