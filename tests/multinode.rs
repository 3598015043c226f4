//! Multi-node jobs over real ssh: a local sshd on 127.0.0.2 and 127.0.0.3 plays two worker
//! nodes (`scripts/test-sshd`, started by `.ci/run`), the head runs locally.
mod common;
use common::*;
use std::process::Command;

const KEY: &str = SSH_KEY;

/// Whether the test sshd answers on both worker addresses.
fn sshd_up() -> bool {
    if !is_root() {
        skip("not root: the ssh test key and sshd are root's");
        return false;
    }
    for ip in ["127.0.0.2", "127.0.0.3"] {
        if !ssh_answers(ip) {
            skip(&format!(
                "no test sshd on {ip} (run scripts/test-sshd as root)"
            ));
            return false;
        }
    }
    true
}

/// Whether `ssh skyspool-runner@IP true` succeeds with the test key.
fn ssh_answers(ip: &str) -> bool {
    Command::new("ssh")
        .args(SSH_OPTS)
        .args(["-o", "ConnectTimeout=5", "-i", KEY])
        .arg(format!("skyspool-runner@{ip}"))
        .arg("true")
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Starts a daemon on the cluster file `text` (kept for restarts: the daemon reads it at
/// each start), with `args` after `--config`.
fn start_with_cluster(text: &str, args: &[&str]) -> Daemon {
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("cluster.yaml");
    std::fs::write(&cfg, text).unwrap();
    let cfg_s = cfg.to_string_lossy().to_string();
    let d = Daemon::start(&[&["--config", cfg_s.as_str()], args].concat());
    std::mem::forget(cfg_dir);
    d
}

/// Head with 2 H100, w1 (127.0.0.2) with 2 H100, w2 (127.0.0.3) with 4 H100 and its CPUs
/// not declared (counted over ssh).
fn start() -> Option<Daemon> {
    if !sshd_up() {
        return None;
    }
    let text = format!(
        "cluster_name: mn\nnodes:\n\
         \x20 - name: head\n    host: local\n    ip: 127.0.0.1\n    accelerators: {{H100: 2}}\n    cpus: 4\n\
         \x20 - name: w1\n    host: skyspool-runner@127.0.0.2\n    identity: {KEY}\n    accelerators: {{H100: 2}}\n    cpus: 4\n\
         \x20 - name: w2\n    host: skyspool-runner@127.0.0.3\n    identity: {KEY}\n    accelerators: {{H100: 4}}\n"
    );
    Some(start_with_cluster(&text, &["--kill-grace", "1"]))
}

#[test]
fn ranks_ips_devices_and_merged_logs() {
    let Some(mut d) = start() else { return };
    let nodes = std::fs::read_to_string(d.path("nodes")).unwrap();
    assert!(
        nodes.contains("w1") && nodes.contains("127.0.0.2"),
        "{nodes}"
    );
    assert!(!nodes.contains("DOWN"), "{nodes}");
    // w2's CPUs were counted on it: the workers are this machine.
    let nproc = std::thread::available_parallelism().unwrap().get();
    let w2 = nodes
        .lines()
        .find(|l| l.starts_with("w2 "))
        .unwrap_or_default();
    assert!(w2.contains(&format!(" 0/{nproc} ")), "{nodes}");
    // 3 nodes with 2 GPUs each: head, w1 and w2 (w2 has 4; it gets 2 of them).
    let id = d.submit(
        "mn.yaml",
        "name: mn\nnum_nodes: 3\nresources:\n  accelerators: H100:2\n\
         setup: echo \"setup $SKYPILOT_SETUP_NODE_RANK\"\n\
         run: |\n  echo \"rank=$SKYPILOT_NODE_RANK n=$SKYPILOT_NUM_NODES gpn=$SKYPILOT_NUM_GPUS_PER_NODE cvd=$CUDA_VISIBLE_DEVICES\"\n  \
         echo \"ips=$(echo \"$SKYPILOT_NODE_IPS\" | paste -sd,)\"\n",
    );
    d.wait_done(id, "SUCCEEDED");
    let log = d.log(id);
    for (rank, prefix) in [
        (0, "(head, rank=0, pid="),
        (1, "(worker1, rank=1, pid="),
        (2, "(worker2, rank=2, pid="),
    ] {
        let line = log
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(&format!("rank={rank} n=3")))
            .unwrap_or_else(|| panic!("no rank {rank} line in\n{log}"));
        assert!(line.contains("gpn=2"), "{line}");
        assert!(
            line.contains("cvd=0,1"),
            "each node gets its own 0,1: {line}"
        );
        if rank > 0 {
            assert!(line.contains(&format!("ip=127.0.0.{}", rank + 1)), "{line}");
        }
        assert!(log.contains(&format!("setup {rank}")), "{log}");
        let own = std::fs::read_to_string(d.job(id).join(format!("log.rank{rank}"))).unwrap();
        assert!(
            own.contains(&format!("rank={rank} n=3")) && !own.contains("(head"),
            "{own}"
        );
    }
    assert!(log.contains("ips=127.0.0.1,127.0.0.2,127.0.0.3"), "{log}");
    let info = d.info(id);
    assert_eq!(info["exit_codes"], serde_json::json!([0, 0, 0]), "{info}");
    let nodes: Vec<String> = info["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(nodes, vec!["head", "w1", "w2"]);
}

#[test]
fn workdir_reaches_remote_nodes() {
    let Some(d) = start() else { return };
    let proj = d.scratch().join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(proj.join("data.txt"), "shipped\n").unwrap();
    std::fs::write(
        proj.join("job.yaml"),
        "num_nodes: 2\nresources:\n  accelerators: H100:1\nrun: echo \"r$SKYPILOT_NODE_RANK $(cat data.txt)\"\n",
    )
    .unwrap();
    std::fs::rename(&proj, d.path("incoming/proj")).unwrap();
    wait_until(
        DEADLINE,
        "admission",
        || d.job(1).join("status").exists(),
        || d.diagnostics(),
    );
    d.wait_done(1, "SUCCEEDED");
    let log = d.log(1);
    assert!(
        log.contains("r0 shipped") && log.contains("r1 shipped"),
        "{log}"
    );
}

fn pids_in(path: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn failing_rank_stops_the_others_everywhere() {
    let Some(mut d) = start() else { return };
    let s = d.scratch();
    // Rank 0 (head) and rank 2 (w2) sleep; rank 1 (w1) fails with 3.
    let id = d.submit(
        "fail.yaml",
        &format!(
            "num_nodes: 3\nresources:\n  accelerators: H100:1\nrun: |\n  \
             sleep 1000 & echo $! >> {s}/pids-$SKYPILOT_NODE_RANK\n  \
             if [ \"$SKYPILOT_NODE_RANK\" = 1 ]; then sleep 0.5; exit 3; fi\n  wait\n",
            s = s.display()
        ),
    );
    d.wait_done(id, "FAILED");
    let info = d.info(id);
    let codes = info["exit_codes"].as_array().unwrap().clone();
    assert_eq!(codes.len(), 3, "{info}");
    assert_eq!(codes[1], serde_json::json!(3), "{info}");
    assert!(
        codes[0] != serde_json::json!(0) && codes[2] != serde_json::json!(0),
        "others were stopped: {info}"
    );
    // The workers are this machine reached over ssh: their processes are visible here.
    for rank in 0..3 {
        let pids = pids_in(&s.join(format!("pids-{rank}")));
        wait_gone(&d, pids, &format!("rank {rank}'s sleep"));
    }
}

/// A process a remote rank daemonizes out of its process group (`setsid`) is killed when
/// the rank is over, like one on the head (its subreaper): found by the job's tag and the
/// rank, so another rank of the job on the same machine runs on untouched.
#[test]
fn a_remote_rank_leaves_no_daemonized_process_behind() {
    let Some(mut d) = start() else { return };
    let s = d.scratch();
    let id = d.submit(
        "daemonize.yaml",
        &format!(
            "num_nodes: 3\nresources:\n  accelerators: H100:1\nrun: |\n  \
             case $SKYPILOT_NODE_RANK in\n  \
             1) setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! >> {s}/escaped ;;\n  \
             2) sleep 3; echo rank 2 survived ;;\n  \
             esac\n",
            s = s.display()
        ),
    );
    wait_until(
        DEADLINE,
        "rank 1's daemonized sleep",
        || !pids_in(&s.join("escaped")).is_empty(),
        || d.diagnostics(),
    );
    let escaped = pids_in(&s.join("escaped"));
    wait_gone(&d, escaped.clone(), "rank 1's daemonized sleep");
    d.wait_done(id, "SUCCEEDED");
    assert!(d.log(id).contains("rank 2 survived"), "{}", d.log(id));
}

#[test]
fn cancel_stops_every_node() {
    let Some(mut d) = start() else { return };
    let s = d.scratch();
    let id = d.submit(
        "long.yaml",
        &format!(
            "num_nodes: 3\nresources:\n  accelerators: H100:1\nrun: |\n  \
             sleep 1000 & echo $! >> {s}/pids-$SKYPILOT_NODE_RANK\n  echo started\n  wait\n",
            s = s.display()
        ),
    );
    wait_until(
        DEADLINE,
        "all ranks started",
        || (0..3).all(|r| !pids_in(&s.join(format!("pids-{r}"))).is_empty()),
        || d.diagnostics(),
    );
    d.cancel(id);
    d.wait_done(id, "CANCELLED");
    for rank in 0..3 {
        let pids = pids_in(&s.join(format!("pids-{rank}")));
        wait_gone(&d, pids, &format!("rank {rank}'s sleep"));
    }
}

/// Two spools with one cluster name, each running its job 1 on the same worker at once, keep
/// their jobs apart there: a rank's private directory on the node and the tag its processes
/// carry are named for the spool's own id, not for `SKYPILOT_TASK_ID` (which two spools
/// admitting their job 1 in the same millisecond share), so one's cancel never reaches the
/// other's processes.
#[test]
fn two_spools_with_one_cluster_name_keep_their_jobs_apart_on_a_shared_worker() {
    let Some(mut a) = start() else { return };
    let Some(mut b) = start() else { return };
    let job = |s: &std::path::Path| {
        format!(
            "num_nodes: 2\nresources:\n  accelerators: H100:1\nrun: |\n  \
             echo \"dir=$(dirname \"$0\") tag=$SKYSPOOL_JOB_TAG\"\n  \
             sleep 1000 & echo $! >> {s}/pids-$SKYPILOT_NODE_RANK\n  wait\n",
            s = s.display()
        )
    };
    let (sa, sb) = (a.scratch(), b.scratch());
    let ia = a.submit("a.yaml", &job(&sa));
    let ib = b.submit("b.yaml", &job(&sb));
    let pids = |s: &std::path::Path| -> Vec<u32> {
        (0..2)
            .flat_map(|r| pids_in(&s.join(format!("pids-{r}"))))
            .collect()
    };
    for (d, s) in [(&a, &sa), (&b, &sb)] {
        wait_until(
            DEADLINE,
            "both ranks started",
            || (0..2).all(|r| !pids_in(&s.join(format!("pids-{r}"))).is_empty()),
            || d.diagnostics(),
        );
    }
    let spool_id = |d: &Daemon| {
        let text = std::fs::read_to_string(d.path(".skyspool/id")).unwrap();
        text.split_whitespace().next().unwrap().to_string()
    };
    let (ida, idb) = (spool_id(&a), spool_id(&b));
    assert_ne!(ida, idb);
    for (d, id, sid) in [(&a, ia, &ida), (&b, ib, &idb)] {
        let want = format!("dir=/tmp/skyspool-{sid}-{id}-r1 tag={sid}-{id}");
        wait_until(
            DEADLINE,
            &format!("rank 1 of job {id} to print {want}"),
            || {
                d.log(id)
                    .lines()
                    .any(|l| l.starts_with("(worker1") && l.ends_with(&want))
            },
            || d.diagnostics(),
        );
    }
    a.cancel(ia);
    a.wait_done(ia, "CANCELLED");
    wait_gone(&a, pids(&sa), "a's sleep");
    assert_eq!(b.status(ib), "RUNNING", "{}", b.diagnostics());
    for pid in pids(&sb) {
        assert!(alive(pid), "b's sleep {pid} was stopped by a's cancel");
    }
    b.cancel(ib);
    b.wait_done(ib, "CANCELLED");
    wait_gone(&b, pids(&sb), "b's sleep");
}

/// A daemon run as root runs every rank of a job as its submitter: on a worker the head
/// reaches as root too (not only on the head), with the user's own HOME and PATH, in the
/// workdir the user shipped; the user's cancel stops the rank there.
#[test]
fn ranks_on_a_node_reached_as_root_run_as_the_submitter() {
    if !sshd_up() || !have_users() {
        return;
    }
    let text = format!(
        "cluster_name: mnroot\nnodes:\n\
         \x20 - name: head\n    host: local\n    ip: 127.0.0.1\n    accelerators: {{H100: 1}}\n    cpus: 4\n\
         \x20 - name: w1\n    host: root@127.0.0.2\n    identity: {KEY}\n    accelerators: {{H100: 1}}\n    cpus: 4\n"
    );
    let d = start_with_cluster(&text, &["--kill-grace", "1"]);
    open_path_to_spool(&d);
    let s = d.scratch();
    std::fs::set_permissions(&s, std::os::unix::fs::PermissionsExt::from_mode(0o1777)).unwrap();
    // alice's project directory, moved in by alice: its job.yaml and a file for the workdir.
    let home = tempfile::Builder::new()
        .prefix("skyspool-mnroot-")
        .tempdir_in("/tmp")
        .unwrap();
    let proj = home.path().join("proj");
    std::fs::create_dir(&proj).unwrap();
    std::fs::write(proj.join("data.txt"), "shipped\n").unwrap();
    std::fs::write(
        proj.join("job.yaml"),
        format!(
            "num_nodes: 2\nresources:\n  accelerators: H100:1\nrun: |\n  \
             echo \"r$SKYPILOT_NODE_RANK user=$(id -un) home=$HOME data=$(cat data.txt) path=$PATH\"\n  \
             sleep 1000 & echo $! >> {s}/pids-$SKYPILOT_NODE_RANK\n  wait\n",
            s = s.display()
        ),
    )
    .unwrap();
    let (rc, out) = as_user(
        "root",
        &format!("chown -R skyspool-alice: {}", home.path().display()),
    );
    assert_eq!(rc, 0, "{out}");
    let (rc, out) = as_user(
        "skyspool-alice",
        &format!("mv {} {}/incoming/proj", proj.display(), d.spool.display()),
    );
    assert_eq!(rc, 0, "alice could not submit: {out}");
    wait_until(
        DEADLINE,
        "both ranks started",
        || (0..2).all(|r| !pids_in(&s.join(format!("pids-{r}"))).is_empty()),
        || d.diagnostics(),
    );
    let log = d.log(1);
    for (rank, prefix) in [(0, "(head, rank=0"), (1, "(worker1, rank=1")] {
        let line = log
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no rank {rank} line in\n{log}"));
        assert!(
            line.contains(&format!(
                "r{rank} user=skyspool-alice home=/home/skyspool-alice data=shipped"
            )),
            "{line}"
        );
        if rank == 1 {
            assert!(!line.contains("/root"), "root's PATH leaked in: {line}");
        }
        for pid in pids_in(&s.join(format!("pids-{rank}"))) {
            let uid = std::fs::metadata(format!("/proc/{pid}"))
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
                .unwrap();
            assert_eq!(uid, uid_of("skyspool-alice"), "rank {rank}'s sleep");
        }
    }
    let (rc, out) = as_user(
        "skyspool-alice",
        &format!("touch {}/jobs/1/cancel", d.spool.display()),
    );
    assert_eq!(rc, 0, "{out}");
    d.wait_done(1, "CANCELLED");
    for rank in 0..2 {
        wait_gone(
            &d,
            pids_in(&s.join(format!("pids-{rank}"))),
            &format!("rank {rank}'s sleep"),
        );
    }
}

/// A second sshd of the test's, on `addr` (same host key and users), stopped on drop.
struct ExtraSshd(std::process::Child);

impl ExtraSshd {
    fn start(addr: &str, tmp: &std::path::Path) -> ExtraSshd {
        ExtraSshd::start_with(addr, tmp, "")
    }

    /// [`ExtraSshd::start`] with `extra` (sshd_config lines) first in its config.
    fn start_with(addr: &str, tmp: &std::path::Path, extra: &str) -> ExtraSshd {
        let base = std::fs::read_to_string("/run/skyspool-test-sshd/sshd_config")
            .expect("scripts/test-sshd's config");
        let text: String = base
            .lines()
            .filter(|l| !l.starts_with("ListenAddress") && !l.starts_with("PidFile"))
            .map(|l| format!("{l}\n"))
            .collect();
        let cfg = tmp.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "ListenAddress {addr}\nPidFile {}\n{extra}{text}",
                tmp.join("sshd.pid").display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-f")
            .arg(&cfg)
            .spawn()
            .expect("sshd");
        ExtraSshd(child)
    }
}

impl Drop for ExtraSshd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A cluster file: a head with 1 CPU and no GPU, and the ssh node `name` at `ip` whose GPUs
/// and CPUs are found over ssh.
fn head_and_unprobed(name: &str, ip: &str) -> String {
    format!(
        "nodes:\n\
         \x20 - name: head\n    host: local\n    accelerators: {{}}\n    cpus: 1\n\
         \x20 - name: {name}\n    host: skyspool-runner@{ip}\n    identity: {KEY}\n"
    )
}

/// Node `name`'s line in the `nodes` file (empty while there is none).
fn nodes_line(d: &Daemon, name: &str) -> String {
    std::fs::read_to_string(d.path("nodes"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{name} ")))
        .unwrap_or_default()
        .to_string()
}

/// Node `name` in `nodes.json` (the inventory `skyspool check` reads).
fn nodes_json_entry(d: &Daemon, name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(d.path("nodes.json")).unwrap_or_default();
    let inv: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    inv["nodes"]
        .as_array()
        .and_then(|nodes| nodes.iter().find(|n| n["name"] == name).cloned())
        .unwrap_or_default()
}

/// Submits a 2-node job that prints its rank, and checks that it waits (not refused).
fn submit_two_ranks_pending(d: &mut Daemon) -> u64 {
    let id = d.submit(
        "two.yaml",
        "num_nodes: 2\nrun: echo \"on $SKYPILOT_NODE_RANK\"\n",
    );
    assert_eq!(d.status(id), "PENDING");
    id
}

/// Waits for [`submit_two_ranks_pending`]'s job to succeed, with both ranks in its log.
fn wait_both_ranks_ran(d: &Daemon, id: u64) {
    d.wait_done(id, "SUCCEEDED");
    let log = d.log(id);
    assert!(log.contains("on 0") && log.contains("on 1"), "{log}");
}

/// A worker that does not answer when the daemon starts (its GPUs and CPUs not in the
/// cluster file) is asked for them once it answers, and then takes jobs: no restart needed.
#[test]
fn a_worker_that_comes_up_later_is_probed_then_and_takes_jobs() {
    if !sshd_up() {
        return;
    }
    let mut d = start_with_cluster(&head_and_unprobed("late", "127.0.0.4"), &[]);
    let line = |d: &Daemon| nodes_line(d, "late");
    assert!(nodes_json_entry(&d, "late")["down"].is_string());
    assert!(
        line(&d).contains("0/0") && line(&d).contains("DOWN"),
        "{}",
        line(&d)
    );
    let id = submit_two_ranks_pending(&mut d);
    let tmp = tempfile::tempdir().unwrap();
    let _sshd = ExtraSshd::start("127.0.0.4:22", tmp.path());
    let nproc = std::thread::available_parallelism().unwrap().get();
    wait_until(
        DEADLINE,
        "the late worker to be up with its CPUs counted",
        || {
            let l = line(&d);
            l.contains(" up ") && l.contains("none (nvidia-smi found no GPU)")
        },
        || d.diagnostics(),
    );
    wait_both_ranks_ran(&d, id);
    assert!(line(&d).contains(&format!("/{nproc} ")), "{}", line(&d));
    // `skyspool check` sees the node as it is now, not as it was at start.
    let late = nodes_json_entry(&d, "late");
    assert!(late["down"].is_null(), "{late:#}");
    assert_eq!(
        late["gpu_source"], "none (nvidia-smi found no GPU)",
        "{late:#}"
    );
}

/// A worker that answers but whose probe fails (an ssh hiccup, a hung `nvidia-smi`) is not
/// taken for a node without GPUs or CPUs: it gets no job until a later health check finds
/// them out, then takes the queued job. No restart needed.
#[test]
fn a_worker_whose_probe_fails_is_asked_again_and_then_takes_jobs() {
    if !sshd_up() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // sshd runs the wrapper as skyspool-runner.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let refuse = tmp.path().join("refuse-probes");
    std::fs::write(&refuse, "").unwrap();
    let wrapper = tmp.path().join("force-command");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n\
             # The daemon's probes fail while {r} exists; anything else runs.\n\
             case \"$SSH_ORIGINAL_COMMAND\" in\n\
             \x20 nproc*|nvidia-smi*) if [ -e {r} ]; then echo 'probe refused by the test' >&2; exit 1; fi ;;\n\
             esac\n\
             exec /bin/bash -c \"$SSH_ORIGINAL_COMMAND\"\n",
            r = refuse.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _sshd = ExtraSshd::start_with(
        "127.0.0.5:22",
        tmp.path(),
        &format!("ForceCommand {}\n", wrapper.display()),
    );
    // Up before the daemon starts, so that its start-up probe is the one refused.
    wait_until(
        DEADLINE,
        "the extra sshd on 127.0.0.5 to answer",
        || ssh_answers("127.0.0.5"),
        String::new,
    );
    let mut d = start_with_cluster(&head_and_unprobed("flaky", "127.0.0.5"), &[]);
    let line = |d: &Daemon| nodes_line(d, "flaky");
    d.wait_daemon_log(
        "node flaky: could not count its CPUs",
        "the refused CPU count in the daemon's log",
    );
    let log = d.daemon_log();
    assert!(
        log.contains("node flaky: could not ask for its GPUs")
            && log.contains("asked again at the next health check"),
        "{log}"
    );
    assert!(
        line(&d).contains(" up ") && line(&d).contains("not probed yet"),
        "{}",
        line(&d)
    );
    assert_eq!(nodes_json_entry(&d, "flaky")["gpus_to_probe"], true);
    // Not refused as "can never run": the node may hold it once it is known.
    let id = submit_two_ranks_pending(&mut d);
    std::fs::remove_file(&refuse).unwrap();
    let nproc = std::thread::available_parallelism().unwrap().get();
    wait_until(
        DEADLINE,
        "the worker's GPUs and CPUs to be found at a later health check",
        || {
            let l = line(&d);
            l.contains("none (nvidia-smi found no GPU)") && l.contains(&format!("/{nproc} "))
        },
        || d.diagnostics(),
    );
    wait_both_ranks_ran(&d, id);
    let flaky = nodes_json_entry(&d, "flaky");
    assert!(
        flaky["gpus_to_probe"].is_null() && flaky["cpus_to_probe"].is_null(),
        "{flaky:#}"
    );
}

/// Waits until every process of `pids` has ended.
fn wait_gone(d: &Daemon, pids: Vec<u32>, what: &str) {
    for pid in pids {
        wait_until(
            DEADLINE,
            &format!("{what} {pid} to be gone"),
            || !alive(pid),
            || d.diagnostics(),
        );
    }
}

#[test]
fn multi_node_jobs_never_hold_partial_allocations() {
    let Some(mut d) = start() else { return };
    let s = d.scratch();
    let gate = Gate::new(&s, "big");
    // w2 is busy with 4 GPUs; a 3-node job needs w2 too, so it waits (holding nothing);
    // a 2-node job fits head + w1 meanwhile.
    let w2 = d.submit(
        "w2.yaml",
        &format!(
            "resources:\n  accelerators: H100:4\nrun: {}\n",
            gate.wait_cmd()
        ),
    );
    d.wait_status(w2, "RUNNING");
    let three = d.submit(
        "three.yaml",
        "num_nodes: 3\nresources:\n  accelerators: H100:1\nrun: echo three\n",
    );
    let two = d.submit(
        "two.yaml",
        "num_nodes: 2\nresources:\n  accelerators: H100:2\nrun: echo two\n",
    );
    d.wait_done(two, "SUCCEEDED");
    assert_eq!(d.status(three), "PENDING", "{}", d.diagnostics());
    gate.open();
    d.wait_done(w2, "SUCCEEDED");
    d.wait_done(three, "SUCCEEDED");
}

#[test]
fn unreachable_node_is_down_and_gets_no_jobs() {
    if !sshd_up() {
        return;
    }
    let text = format!(
        "nodes:\n\
         \x20 - name: head\n    host: local\n    accelerators: {{H100: 1}}\n    cpus: 4\n\
         \x20 - name: w1\n    host: skyspool-runner@127.0.0.2\n    identity: {KEY}\n    accelerators: {{H100: 1}}\n    cpus: 4\n\
         \x20 - name: gone\n    host: skyspool-runner@127.0.0.9\n    port: 2\n    identity: {KEY}\n    accelerators: {{H100: 1}}\n    cpus: 4\n"
    );
    let mut d = start_with_cluster(&text, &[]);
    let nodes = std::fs::read_to_string(d.path("nodes")).unwrap();
    let gone = nodes
        .lines()
        .find(|l| l.starts_with("gone"))
        .unwrap_or_default()
        .to_string();
    assert!(gone.contains("DOWN"), "{nodes}");
    // Two nodes: head and w1, never the unreachable one.
    let two = d.submit(
        "two.yaml",
        "num_nodes: 2\nresources:\n  accelerators: H100:1\nrun: echo ok\n",
    );
    d.wait_done(two, "SUCCEEDED");
    let placed: Vec<String> = d.info(two)["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["node"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(placed, vec!["head", "w1"]);
    // Three nodes would need the unreachable one: admitted (it may come back), but waits.
    let three = d.submit(
        "three.yaml",
        "num_nodes: 3\nresources:\n  accelerators: H100:1\nrun: echo no\n",
    );
    d.wait_queue_status(three, "PENDING");
    let again = d.submit(
        "again.yaml",
        "num_nodes: 2\nresources:\n  accelerators: H100:1\nrun: echo ok\n",
    );
    d.wait_done(again, "SUCCEEDED");
    assert_eq!(d.status(three), "PENDING");
    d.cancel(three);
    d.wait_done(three, "CANCELLED");
}

/// A node that stops answering mid-job: its rank's connection dies; the job ends FAILED with
/// the reason in its log (it never hangs), and the other ranks are stopped.
#[test]
fn lost_node_fails_the_job_instead_of_hanging() {
    let Some(mut d) = start() else { return };
    let s = d.scratch();
    let id = d.submit(
        "lost.yaml",
        &format!(
            "num_nodes: 2\nresources:\n  accelerators: H100:1\nrun: |\n  \
             sleep 1000 & echo $! >> {s}/pids-$SKYPILOT_NODE_RANK\n  wait\n",
            s = s.display()
        ),
    );
    wait_until(
        DEADLINE,
        "both ranks started",
        || (0..2).all(|r| !pids_in(&s.join(format!("pids-{r}"))).is_empty()),
        || d.diagnostics(),
    );
    // Cut rank 1's connection the way a dead node does: its ssh client dies.
    let sup_pid = d.supervisor_pid(id).expect("the supervisor's record");
    let ssh_client = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            let ppid = parent_of(*pid);
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(sup_pid) && String::from_utf8_lossy(&cmd).starts_with("ssh")
        })
        .expect("rank 1's ssh client");
    send_signal(ssh_client, nix::sys::signal::Signal::SIGKILL).unwrap();
    d.wait_done(id, "FAILED");
    let info = d.info(id);
    assert!(
        info["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("rank 1"),
        "{info}"
    );
    assert!(
        d.log(id).contains("skyspool: FAILED: rank 1 (w1)"),
        "{}",
        d.log(id)
    );
    // Rank 0 was stopped, and so was rank 1's work on its (still reachable) node.
    for rank in 0..2 {
        for pid in pids_in(&s.join(format!("pids-{rank}"))) {
            wait_until(
                DEADLINE,
                &format!("rank {rank}'s sleep {pid} to be gone"),
                || !alive(pid),
                || d.diagnostics(),
            );
        }
    }
}
