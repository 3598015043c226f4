//! SkyPilot's documented scheduling behaviour, driven through the spool.
mod common;
use common::*;

fn gpus_of(d: &Daemon, id: u64) -> String {
    // Each job prints its devices as its first log line: "gpus=<list>".
    d.log(id)
        .lines()
        .find_map(|l| l.strip_prefix("gpus=").map(str::to_string))
        .unwrap_or_default()
}

fn job(name: &str, gpus: &str, gate: &Gate, marker: &std::path::Path) -> String {
    format!(
        "name: {name}\nresources:\n  accelerators: {gpus}\nrun: |\n  echo gpus=$CUDA_VISIBLE_DEVICES\n  touch '{}'\n  {}\n",
        marker.display(),
        gate.wait_cmd()
    )
}

/// The job1..job5 example of the reference, exactly: on 4 H100, job4 (4 GPUs) waits while
/// job5 (2 GPUs) backfills, and starts only once all 4 GPUs are free.
#[test]
fn skypilot_job1_to_job5_sequence() {
    let mut d = Daemon::start(&["--gpus", "H100:4"]);
    let s = d.scratch();
    let gates: Vec<Gate> = (1..=5).map(|i| Gate::new(&s, &format!("job{i}"))).collect();
    let started = |i: usize| s.join(format!("started-{i}"));
    let id1 = d.submit(
        "huggingface.yaml",
        &job("huggingface", "H100:4", &gates[0], &started(1)),
    );
    d.wait_status(id1, "RUNNING");
    wait_until(
        DEADLINE,
        "job1 to run",
        || started(1).exists(),
        || d.diagnostics(),
    );
    let id2 = d.submit("job2.yaml", &job("job2", "H100:1", &gates[1], &started(2)));
    let id3 = d.submit("job3.yaml", &job("job3", "H100:1", &gates[2], &started(3)));
    let id4 = d.submit("job4.yaml", &job("job4", "H100:4", &gates[3], &started(4)));
    let id5 = d.submit("job5.yaml", &job("job5", "H100:2", &gates[4], &started(5)));
    assert_eq!((id1, id2, id3, id4, id5), (1, 2, 3, 4, 5));
    // All but job1 pending: no free GPU.
    d.wait_queue_status(5, "PENDING");
    for id in [2, 3, 4, 5] {
        assert_eq!(d.status(id), "PENDING", "{}", d.diagnostics());
    }
    // job1 finishes: job2, job3 start (1 GPU each), job4 waits (needs 4), job5 takes the 2 left.
    gates[0].open();
    d.wait_done(1, "SUCCEEDED");
    for id in [2, 3, 5] {
        d.wait_status(id, "RUNNING");
    }
    d.wait_queue_status(5, "RUNNING");
    assert_eq!(d.status(4), "PENDING", "{}", d.diagnostics());
    for i in [2, 3, 5] {
        wait_until(
            DEADLINE,
            "job to print its GPUs",
            || started(i).exists(),
            || d.diagnostics(),
        );
    }
    let mut all: Vec<String> = [2, 3, 5]
        .iter()
        .flat_map(|id| {
            gpus_of(&d, *id)
                .split(',')
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(gpus_of(&d, 2).split(',').count(), 1);
    assert_eq!(gpus_of(&d, 5).split(',').count(), 2);
    all.sort();
    assert_eq!(
        all,
        vec!["0", "1", "2", "3"],
        "no GPU given twice: {}",
        d.diagnostics()
    );
    // job2 and job3 finish: job4 still waits, job5 holds 2 GPUs.
    gates[1].open();
    gates[2].open();
    d.wait_done(2, "SUCCEEDED");
    d.wait_done(3, "SUCCEEDED");
    assert_eq!(d.status(4), "PENDING", "{}", d.diagnostics());
    assert_eq!(d.queue_status(4).as_deref(), Some("PENDING"));
    // job5 finishes: all 4 GPUs free, job4 runs on all of them.
    gates[4].open();
    d.wait_done(5, "SUCCEEDED");
    d.wait_status(4, "RUNNING");
    wait_until(
        DEADLINE,
        "job4 to print its GPUs",
        || started(4).exists(),
        || d.diagnostics(),
    );
    assert_eq!(gpus_of(&d, 4), "0,1,2,3");
    gates[3].open();
    d.wait_done(4, "SUCCEEDED");
    // The queue reads like `sky queue`: newest first.
    let q = d.queue();
    let ids: Vec<&str> = q
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ids, vec!["5", "4", "3", "2", "1"], "{q}");
    assert!(
        q.lines().next().unwrap_or("").split_whitespace().eq([
            "ID",
            "NAME",
            "USER",
            "SUBMITTED",
            "STARTED",
            "DURATION",
            "RESOURCES",
            "STATUS"
        ]),
        "{q}"
    );
}

/// Beyond SkyPilot: with a starvation bound, a big job under a stream of small ones starts
/// while the stream is still flowing, instead of waiting for it to run dry.
#[test]
fn starvation_bound_lets_a_big_job_through_a_stream_of_small_ones() {
    let mut d = Daemon::start(&["--gpus", "H100:2", "--starvation-bound", "0"]);
    let s = d.scratch();
    let first = Gate::new(&s, "first");
    // Two small jobs occupy both GPUs, then the big one arrives, then a long stream.
    let small = |i: usize, gate: Option<&Gate>| {
        format!(
            "name: small{i}\nresources:\n  accelerators: H100:1\nrun: {}\n",
            gate.map(|g| g.wait_cmd())
                .unwrap_or_else(|| "sleep 0.2".into())
        )
    };
    let a = d.submit("s0.yaml", &small(0, Some(&first)));
    let b = d.submit("s1.yaml", &small(1, Some(&first)));
    d.wait_status(a, "RUNNING");
    d.wait_status(b, "RUNNING");
    let big = d.submit(
        "big.yaml",
        "name: big\nresources:\n  accelerators: H100:2\nrun: echo big\n",
    );
    let stream: Vec<u64> = (2..32)
        .map(|i| d.submit(&format!("s{i}.yaml"), &small(i, None)))
        .collect();
    first.open();
    d.wait_status(big, "SUCCEEDED");
    let waiting = stream
        .iter()
        .filter(|id| {
            let st = d.status(**id);
            st == "PENDING"
        })
        .count();
    assert!(
        waiting >= 20,
        "the big job should start long before the stream runs dry; only {waiting} small jobs were still waiting\n{}",
        d.diagnostics()
    );
    for id in stream {
        d.wait_done(id, "SUCCEEDED");
    }
}

/// Without the bound the daemon is SkyPilot's pure backfill: a later small job takes a
/// freed GPU while the big one keeps waiting (the documented behaviour the bound improves on).
#[test]
fn without_a_bound_backfill_is_pure() {
    let mut d = Daemon::start(&["--gpus", "H100:2", "--starvation-bound", "off"]);
    let s = d.scratch();
    let g0 = Gate::new(&s, "g0");
    let g1 = Gate::new(&s, "g1");
    let gated = |i: usize, g: &Gate| {
        format!(
            "name: g{i}\nresources:\n  accelerators: H100:1\nrun: {}\n",
            g.wait_cmd()
        )
    };
    let a = d.submit("g0.yaml", &gated(0, &g0));
    let b = d.submit("g1.yaml", &gated(1, &g1));
    d.wait_status(a, "RUNNING");
    d.wait_status(b, "RUNNING");
    let big = d.submit(
        "big.yaml",
        "name: big\nresources:\n  accelerators: H100:2\nrun: echo big\n",
    );
    let later = d.submit(
        "later.yaml",
        "name: later\nresources:\n  accelerators: H100:1\nrun: echo later\n",
    );
    g0.open();
    d.wait_done(later, "SUCCEEDED");
    assert_eq!(d.status(big), "PENDING", "{}", d.diagnostics());
    g1.open();
    d.wait_done(big, "SUCCEEDED");
}
