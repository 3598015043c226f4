//! The reference's examples, end to end through the spool: grid search, fractional GPUs,
//! workdir + envs, the environment contract of setup and run, and the CPU default.
mod common;
use common::*;
use std::fs;
use std::path::Path;

/// A job that prints `gpus=<CUDA_VISIBLE_DEVICES>` and the GPUs-per-node count, touches
/// `marker`, then holds until `gate` opens.
fn gated_job(name: &str, accel: Option<&str>, gate: &Gate, marker: &Path) -> String {
    let resources = match accel {
        Some(a) => format!("resources:\n  accelerators: {a}\n"),
        None => String::new(),
    };
    format!(
        "name: {name}\n{resources}run: |\n  echo gpus=$CUDA_VISIBLE_DEVICES\n  \
         echo per_node=$SKYPILOT_NUM_GPUS_PER_NODE\n  touch '{}'\n  {}\n",
        marker.display(),
        gate.wait_cmd()
    )
}

fn var(d: &Daemon, id: u64, key: &str) -> String {
    d.log_vars(id)
        .get(key)
        .cloned()
        .unwrap_or_else(|| panic!("job {id} printed no {key}= line\n{}", d.diagnostics()))
}

/// Grid search: five 1-GPU trials on 4 GPUs. Four run at once, each on its own GPU; the
/// fifth waits and starts as soon as one trial ends, on the GPU that trial freed.
#[test]
fn grid_search_four_run_one_waits() {
    let mut d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let gates: Vec<Gate> = (1..=5).map(|i| Gate::new(&s, &format!("t{i}"))).collect();
    let started = |i: u64| s.join(format!("started-{i}"));
    for i in 1..=5u64 {
        let id = d.submit(
            &format!("trial-{i}.yaml"),
            &gated_job(
                &format!("trial-{i}"),
                Some("H100:1"),
                &gates[i as usize - 1],
                &started(i),
            ),
        );
        assert_eq!(id, i, "{}", d.diagnostics());
    }
    // The queue is written after the pass that saw job 5: the decisions are final.
    d.wait_queue_status(5, "PENDING");
    for id in 1..=4 {
        assert_eq!(d.status(id), "RUNNING", "job {id}\n{}", d.diagnostics());
        assert_eq!(
            d.queue_status(id).as_deref(),
            Some("RUNNING"),
            "{}",
            d.diagnostics()
        );
    }
    assert_eq!(d.status(5), "PENDING", "{}", d.diagnostics());
    assert!(d.path("pending/5").exists(), "{}", d.diagnostics());
    for i in 1..=4 {
        wait_file(&started(i), || d.diagnostics());
    }
    assert!(
        !started(5).exists(),
        "trial 5 ran while pending\n{}",
        d.diagnostics()
    );
    let mut gpus: Vec<String> = (1..=4).map(|id| var(&d, id, "gpus")).collect();
    for g in &gpus {
        assert!(
            g.len() == 1 && g.chars().all(|c| c.is_ascii_digit()),
            "each trial gets one GPU index, got {g:?}\n{}",
            d.diagnostics()
        );
    }
    let gpu_of_2 = gpus[1].clone();
    gpus.sort();
    assert_eq!(
        gpus,
        ["0", "1", "2", "3"],
        "distinct GPUs\n{}",
        d.diagnostics()
    );

    // Trial 2 ends: trial 5 starts at once, on trial 2's GPU.
    gates[1].open();
    d.wait_done(2, "SUCCEEDED");
    d.wait_status(5, "RUNNING");
    wait_file(&started(5), || d.diagnostics());
    assert_eq!(var(&d, 5, "gpus"), gpu_of_2, "{}", d.diagnostics());
    assert_eq!(var(&d, 5, "per_node"), "1", "{}", d.diagnostics());
    for g in [0, 2, 3, 4] {
        gates[g].open();
    }
    for id in [1, 3, 4, 5] {
        d.wait_done(id, "SUCCEEDED");
    }
}

/// Fractional GPUs: four `H100:0.5` jobs share two GPUs two by two; a fifth waits.
#[test]
fn fractional_gpus_pack_two_per_gpu() {
    let mut d = Daemon::start(&["--gpus", "H100:2", "--cpus", "8"]);
    let s = d.scratch();
    let gates: Vec<Gate> = (1..=5).map(|i| Gate::new(&s, &format!("f{i}"))).collect();
    let started = |i: u64| s.join(format!("started-{i}"));
    for i in 1..=5u64 {
        let id = d.submit(
            &format!("half-{i}.yaml"),
            &gated_job(
                &format!("half-{i}"),
                Some("H100:0.5"),
                &gates[i as usize - 1],
                &started(i),
            ),
        );
        assert_eq!(id, i);
    }
    d.wait_queue_status(5, "PENDING");
    for id in 1..=4 {
        assert_eq!(d.status(id), "RUNNING", "job {id}\n{}", d.diagnostics());
        wait_file(&started(id), || d.diagnostics());
    }
    assert_eq!(d.status(5), "PENDING", "{}", d.diagnostics());
    let gpus: Vec<String> = (1..=4).map(|id| var(&d, id, "gpus")).collect();
    for (i, g) in gpus.iter().enumerate() {
        assert!(
            g == "0" || g == "1",
            "job {} got {g:?}\n{}",
            i + 1,
            d.diagnostics()
        );
        let sharing = gpus.iter().filter(|x| *x == g).count();
        assert_eq!(
            sharing,
            2,
            "each GPU holds exactly two halves: {gpus:?}\n{}",
            d.diagnostics()
        );
        assert_eq!(
            var(&d, i as u64 + 1, "per_node"),
            "1",
            "ceil(0.5) = 1\n{}",
            d.diagnostics()
        );
    }
    // info.json records the shares.
    let info = d.info(1);
    assert_eq!(
        info["placement"][0]["gpu_shares"],
        serde_json::json!(["0.5"]),
        "{info:#}"
    );
    assert!(!started(5).exists());
    // One half ends: the fifth takes its place on the same GPU.
    gates[2].open();
    d.wait_done(3, "SUCCEEDED");
    d.wait_status(5, "RUNNING");
    wait_file(&started(5), || d.diagnostics());
    assert_eq!(var(&d, 5, "gpus"), gpus[2], "{}", d.diagnostics());
    for g in [0, 1, 3, 4] {
        gates[g].open();
    }
    for id in [1, 2, 4, 5] {
        d.wait_done(id, "SUCCEEDED");
    }
}

/// A directory submission carries its files: the same project, submitted twice with a
/// different `VERSION`, runs `script.sh` from each job's own copy (`jobs/<id>/workdir`).
#[test]
fn workdir_and_envs_per_submission() {
    let d = Daemon::start(&["--gpus", "H100:4", "--cpus", "8"]);
    let s = d.scratch();
    let make = |dir: &str, version: u32| {
        let p = s.join(dir);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join("script.sh"), "echo $VERSION\n").unwrap();
        fs::write(
            p.join("job.yaml"),
            format!(
                "name: {dir}\nenvs:\n  VERSION: {version}\nrun: |\n  bash script.sh\n  \
                 pwd -P > '{}/cwd-{version}'\n",
                s.display()
            ),
        )
        .unwrap();
        p
    };
    let proj = make("proj", 1);
    let proj2 = make("proj2", 2);
    let incoming = d.path("incoming");
    let mv = |from: &Path| {
        let st = std::process::Command::new("mv")
            .arg(from)
            .arg(&incoming)
            .status()
            .expect("run mv");
        assert!(st.success(), "mv {} failed", from.display());
    };
    mv(&proj);
    d.wait_admitted(1);
    mv(&proj2);
    d.wait_admitted(2);
    d.wait_done(1, "SUCCEEDED");
    d.wait_done(2, "SUCCEEDED");
    assert_eq!(d.log(1), "1\n", "{}", d.diagnostics());
    assert_eq!(d.log(2), "2\n", "{}", d.diagnostics());
    for (id, v) in [(1, 1), (2, 2)] {
        let workdir = fs::canonicalize(d.job(id).join("workdir")).unwrap();
        let cwd = fs::read_to_string(s.join(format!("cwd-{v}"))).unwrap();
        assert_eq!(Path::new(cwd.trim()), workdir, "{}", d.diagnostics());
        assert!(workdir.join("script.sh").is_file());
        let info = d.info(id);
        assert_eq!(info["has_workdir"], serde_json::json!(true), "{info:#}");
    }
    assert_eq!(d.info(1)["source"], serde_json::json!("incoming/proj/"));
    assert!(d.incoming_names().is_empty(), "{:?}", d.incoming_names());
}

/// SkyPilot's environment contract for setup and run, and secrets that reach the job but
/// no file of the spool and no log.
#[test]
fn env_contract_and_secrets() {
    const SECRET: &str = "hf_Sup3rS3cretValue_93817";
    let mut d = Daemon::start(&[
        "--gpus",
        "H100:4",
        "--cpus",
        "8",
        "--cluster-name",
        "mycluster",
    ]);
    let s = d.scratch();
    let gate = Gate::new(&s, "setup");
    let seen = s.join("secret-seen");
    let yaml = format!(
        "name: envcheck\n\
         envs:\n  NUM: 42\n  RATE: 1.5\n  FLAG: true\n  WORD: hello\n\
         secrets:\n  HF_TOKEN: {SECRET}\n\
         setup: |\n  echo setup_cvd=${{CUDA_VISIBLE_DEVICES-unset}}\n  \
         echo setup_rank=$SKYPILOT_SETUP_NODE_RANK\n  echo setup_ips=$SKYPILOT_SETUP_NODE_IPS\n  \
         echo setup_num=$NUM\n  {}\n\
         run: |\n  echo cvd=[${{CUDA_VISIBLE_DEVICES-unset}}]\n  echo order=$CUDA_DEVICE_ORDER\n  \
         echo rank=$SKYPILOT_NODE_RANK\n  echo ips=$SKYPILOT_NODE_IPS\n  \
         echo nodes=$SKYPILOT_NUM_NODES\n  echo per_node=$SKYPILOT_NUM_GPUS_PER_NODE\n  \
         echo task=$SKYPILOT_TASK_ID\n  echo info=$SKYPILOT_CLUSTER_INFO\n  \
         echo user=$SKYPILOT_USER\n  echo num=$NUM\n  echo rate=$RATE\n  echo flag=$FLAG\n  \
         echo word=$WORD\n  echo setup_rank_in_run=${{SKYPILOT_SETUP_NODE_RANK-unset}}\n  \
         echo token_len=${{#HF_TOKEN}}\n  printf %s \"$HF_TOKEN\" > '{}'\n",
        gate.wait_cmd(),
        seen.display()
    );
    let id = d.submit("envcheck.yaml", &yaml);
    // Setup holds: the status says so, and the record and queue agree.
    d.wait_status(id, "SETTING_UP");
    d.wait_queue_status(id, "SETTING_UP");
    wait_until(
        DEADLINE,
        "setup to print its environment",
        || d.log(id).contains("setup_num="),
        || d.diagnostics(),
    );
    assert!(
        d.path(&format!("running/{id}")).exists(),
        "{}",
        d.diagnostics()
    );
    // While the job lives, the secret is in none of the readable files.
    let check_no_secret = |when: &str| {
        for (what, text) in [
            (
                "job.yaml",
                fs::read_to_string(d.job(id).join("job.yaml")).unwrap_or_default(),
            ),
            (
                "info.json",
                fs::read_to_string(d.job(id).join("info.json")).unwrap_or_default(),
            ),
            ("queue", d.queue()),
            ("daemon.log", d.daemon_log()),
            ("job log", d.log(id)),
        ] {
            assert!(
                !text.contains(SECRET),
                "{when}: the secret value appears in {what}:\n{text}"
            );
        }
    };
    check_no_secret("during setup");
    assert!(
        fs::read_to_string(d.job(id).join("job.yaml"))
            .unwrap()
            .contains("HF_TOKEN"),
        "job.yaml keeps the secret's name"
    );
    gate.open();
    d.wait_done(id, "SUCCEEDED");
    check_no_secret("after the end");
    // Nothing anywhere in the spool holds the value once the job has ended.
    for entry in walkdir::WalkDir::new(&d.spool).follow_links(false) {
        let entry = entry.unwrap();
        if entry.file_type().is_file() {
            let bytes = fs::read(entry.path()).unwrap_or_default();
            assert!(
                !String::from_utf8_lossy(&bytes).contains(SECRET),
                "the secret value remains in {}",
                entry.path().display()
            );
        }
    }
    // ... but the job saw it.
    assert_eq!(fs::read_to_string(&seen).unwrap(), SECRET);

    let v = d.log_vars(id);
    let get = |k: &str| {
        v.get(k)
            .cloned()
            .unwrap_or_else(|| panic!("no {k}=\n{}", d.diagnostics()))
    };
    assert_eq!(
        get("setup_cvd"),
        "unset",
        "setup must not see CUDA_VISIBLE_DEVICES"
    );
    assert_eq!(get("setup_rank"), "0");
    assert_eq!(get("setup_ips"), "127.0.0.1");
    assert_eq!(get("setup_num"), "42");
    assert_eq!(
        get("cvd"),
        "[]",
        "a CPU-only job gets an empty CUDA_VISIBLE_DEVICES"
    );
    assert_eq!(get("order"), "PCI_BUS_ID");
    assert_eq!(get("rank"), "0");
    assert_eq!(get("ips"), "127.0.0.1");
    assert_eq!(get("nodes"), "1");
    assert_eq!(get("per_node"), "0");
    assert_eq!(get("num"), "42");
    assert_eq!(get("rate"), "1.5");
    assert_eq!(get("flag"), "true");
    assert_eq!(get("word"), "hello");
    assert_eq!(get("setup_rank_in_run"), "unset");
    assert_eq!(get("token_len"), SECRET.len().to_string());
    assert_eq!(get("user"), d.info(id)["user"].as_str().unwrap());
    // sky-<YYYY-MM-DD-HH-MM-SS-ffffff>_<cluster>_<id>
    let task = get("task");
    let middle = task
        .strip_prefix("sky-")
        .and_then(|t| t.strip_suffix(&format!("_mycluster_{id}")))
        .unwrap_or_else(|| panic!("SKYPILOT_TASK_ID {task:?}"));
    assert_eq!(middle.len(), "2026-01-02-03-04-05-123456".len(), "{task}");
    assert!(
        middle
            .chars()
            .enumerate()
            .all(|(i, c)| if [4, 7, 10, 13, 16, 19].contains(&i) {
                c == '-'
            } else {
                c.is_ascii_digit()
            }),
        "{task}"
    );
    let info: serde_json::Value = serde_json::from_str(&get("info"))
        .unwrap_or_else(|e| panic!("SKYPILOT_CLUSTER_INFO is not JSON ({e}): {}", get("info")));
    assert_eq!(
        info["cluster_name"],
        serde_json::json!("mycluster"),
        "{info}"
    );
}

/// A job that names no `cpus` takes 0.5 CPU: two share a 1-CPU node, a third waits; a
/// `cpus: 1` job takes the whole node.
#[test]
fn cpu_default_is_half_a_cpu() {
    let mut d = Daemon::start(&["--gpus", "none", "--cpus", "1"]);
    let s = d.scratch();
    let gates: Vec<Gate> = (1..=5).map(|i| Gate::new(&s, &format!("c{i}"))).collect();
    let started = |i: u64| s.join(format!("started-{i}"));
    for i in 1..=3u64 {
        d.submit(
            &format!("c{i}.yaml"),
            &gated_job(&format!("c{i}"), None, &gates[i as usize - 1], &started(i)),
        );
    }
    d.wait_queue_status(3, "PENDING");
    assert_eq!(d.status(1), "RUNNING", "{}", d.diagnostics());
    assert_eq!(d.status(2), "RUNNING", "{}", d.diagnostics());
    assert_eq!(d.status(3), "PENDING", "{}", d.diagnostics());
    let whole = format!(
        "name: whole\nresources:\n  cpus: 1\nrun: |\n  touch '{}'\n  {}\n",
        started(4).display(),
        gates[3].wait_cmd()
    );
    assert_eq!(d.submit("whole.yaml", &whole), 4);
    d.wait_queue_status(4, "PENDING");
    // Job 1 ends: job 3 takes the half it frees; the whole-node job still waits.
    gates[0].open();
    d.wait_done(1, "SUCCEEDED");
    d.wait_status(3, "RUNNING");
    d.wait_queue_status(3, "RUNNING");
    assert_eq!(d.status(4), "PENDING", "{}", d.diagnostics());
    gates[1].open();
    d.wait_done(2, "SUCCEEDED");
    d.wait_queue_status(2, "SUCCEEDED");
    assert_eq!(
        d.status(4),
        "PENDING",
        "half a CPU is not enough\n{}",
        d.diagnostics()
    );
    gates[2].open();
    d.wait_done(3, "SUCCEEDED");
    d.wait_status(4, "RUNNING");
    wait_file(&started(4), || d.diagnostics());
    // While it runs, nothing else fits, not even half a CPU.
    let id5 = d.submit("c5.yaml", &gated_job("c5", None, &gates[4], &started(5)));
    d.wait_queue_status(id5, "PENDING");
    assert_eq!(d.status(4), "RUNNING");
    gates[3].open();
    d.wait_done(4, "SUCCEEDED");
    d.wait_status(id5, "RUNNING");
    gates[4].open();
    d.wait_done(id5, "SUCCEEDED");
    assert!(d.queue().contains("1x[CPU:1]"), "{}", d.queue());
    assert!(d.queue().contains("1x[CPU:0.5]"), "{}", d.queue());
}
