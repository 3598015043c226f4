//! Scheduler scale benchmark (not a test): a simulated cluster of 1,000 nodes x 8 H100 and
//! 1k / 10k / 100k pending jobs of mixed shapes (fractional, 1, 2, 4, 8 GPUs; 1-16 nodes).
//! Measures the time to place the queue from empty, and the time of one scheduling decision
//! once the cluster is full (a running job ends; `schedule()` finds what to start).
//!
//! Run: `cargo bench --bench scheduler` (release build; prints a table).

use skyspool::resources::{AccelDemand, Demand, Milli, NodeDemand};
use skyspool::scheduler::{GpuSlot, JobId, NodeCapacity, Scheduler};
use std::time::{Duration, Instant};

fn cluster(nodes: usize, gpus: u32) -> Vec<NodeCapacity> {
    (0..nodes)
        .map(|i| NodeCapacity {
            name: format!("n{i}"),
            gpus: (0..gpus)
                .map(|g| GpuSlot {
                    index: g,
                    kind: "H100".into(),
                })
                .collect(),
            cpus: Milli::from_units(64),
            available: true,
            unknown: false,
        })
        .collect()
}

/// Deterministic xorshift.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn demand(rng: &mut Rng) -> Demand {
    let count = rng.pick(&[250u64, 500, 1000, 1000, 1000, 2000, 2000, 4000, 8000]);
    // Most jobs are single-node; some span 2-16 nodes.
    let nodes = if rng.next() % 10 < 8 {
        1
    } else {
        rng.pick(&[2u32, 4, 8, 16])
    };
    let count = if nodes > 1 { count.max(1000) } else { count };
    Demand {
        num_nodes: nodes,
        per_node: NodeDemand {
            accelerators: vec![AccelDemand {
                kind: "H100".into(),
                count: Milli(count),
            }],
            cpus: Milli(500),
        },
    }
}

fn main() {
    println!(
        "{:>8} {:>14} {:>12} {:>16} {:>16} {:>10}",
        "pending", "place all (ms)", "started", "decision p50 (µs)", "decision p99 (µs)", "shapes"
    );
    for n in [1_000usize, 10_000, 100_000] {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let mut s = Scheduler::new(cluster(1000, 8));
        let mut shapes = std::collections::HashSet::new();
        for id in 1..=n as JobId {
            let d = demand(&mut rng);
            shapes.insert(d.clone());
            s.enqueue(id, d);
        }
        let t0 = Instant::now();
        let started = s.schedule();
        let place_all = t0.elapsed();
        let mut running: Vec<JobId> = started.iter().map(|(id, _)| *id).collect();
        // Decisions: one job ends, schedule() picks what to start next.
        let mut times: Vec<Duration> = Vec::new();
        for _ in 0..2_000 {
            if running.is_empty() {
                break;
            }
            let i = (rng.next() % running.len() as u64) as usize;
            let id = running.swap_remove(i);
            s.release(id);
            let t = Instant::now();
            let more = s.schedule();
            times.push(t.elapsed());
            running.extend(more.into_iter().map(|(id, _)| id));
        }
        times.sort();
        let pct = |p: f64| {
            times
                .get(((times.len() as f64 - 1.0) * p) as usize)
                .map(|d| d.as_secs_f64() * 1e6)
                .unwrap_or(0.0)
        };
        println!(
            "{:>8} {:>14.2} {:>12} {:>16.1} {:>16.1} {:>10}",
            n,
            place_all.as_secs_f64() * 1e3,
            started.len(),
            pct(0.5),
            pct(0.99),
            shapes.len()
        );
    }
}
