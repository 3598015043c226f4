//! Pure placement logic: which pending jobs start now, and on which nodes and GPUs.
//!
//! No I/O happens here. The daemon feeds events in (`enqueue`, `dequeue`, `release`,
//! `restore`, `set_available`) and calls [`Scheduler::schedule`], which starts every
//! pending job that fits the free capacity right now, oldest first (backfill: a later
//! small job may start while an earlier large one waits).
//!
//! Rules (SkyPilot's cluster job queue):
//! - A GPU has capacity exactly [`Milli::ONE`]; a node's CPUs are a [`Milli`] too.
//!   Nothing is ever oversubscribed.
//! - A whole count `N >= 1` takes `N` distinct, fully free GPUs (share `ONE` each).
//!   A fraction `f < 1` takes share `f` on one GPU, packed best-fit onto an already
//!   shared GPU of that kind before a fully free one is broken.
//! - Accelerator alternatives are tried in the user's order; kinds match
//!   case-insensitively (ASCII).
//! - A multi-node job gets `num_nodes` distinct available nodes at once, or nothing.
//!   Its [`Placement::nodes`] are in rank order: ascending node index, so node 0
//!   (the head) is rank 0 whenever it is part of the job.
//!
//! Pending jobs are indexed by demand shape (identical [`Demand`]s share one group),
//! so a pass skips a whole group once one of its jobs does not fit: within a pass free
//! capacity only shrinks, so a shape that failed stays unfit until the next pass.
//!
//! # Starvation bound
//!
//! Plain backfill can starve a large job forever under a steady stream of small ones
//! (SkyPilot documents this: its scheduler starts any queued job that fits idle
//! resources, so a big job waits while later small ones run). With
//! [`Scheduler::set_starvation_bound`] and [`Scheduler::schedule_at`], a pass first
//! walks the jobs that have waited longer than the bound, longest wait first: each
//! one that fits starts at once; the first one that does not fit becomes the single
//! *reservation holder*. It gets a fixed target placement (see [`Scheduler::reservation`]
//! for the policy) and the rest of the pass backfills every other job on the free
//! capacity minus that target: reserved GPUs are closed to other jobs, and on a
//! reserved node other jobs may only use the CPUs the holder leaves. The target is
//! kept from pass to pass, so the jobs running on it when it was chosen are the only
//! ones it waits for: the holder starts at the latest in the first pass after they
//! have all ended. Jobs that would touch no reserved resource are never held back,
//! so the only idle capacity a pass leaves behind is reserved capacity.
//! [`Scheduler::schedule`] ignores all of this and is plain backfill.

use crate::resources::{AccelDemand, Demand, Milli, NodeDemand};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, HashSet};
use std::ops::Bound;

pub type JobId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSlot {
    pub index: u32,
    pub kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeCapacity {
    pub name: String,
    pub gpus: Vec<GpuSlot>,
    pub cpus: Milli,
    pub available: bool,
    /// Its GPUs or CPUs are not known yet (a remote node that has not answered): nothing
    /// is placed on it, but no job is refused as one that can never run for want of it
    /// (see [`Scheduler::check_fits_ever`], [`Scheduler::set_capacity`]).
    #[serde(default)]
    pub unknown: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuGrant {
    pub index: u32,
    pub share: Milli,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeGrant {
    /// Index into [`Scheduler::nodes`].
    pub node: usize,
    /// The accelerator kind granted, spelled as the cluster names it; `None` for a
    /// CPU-only job.
    pub accelerator: Option<String>,
    /// In ascending GPU index order.
    pub gpus: Vec<GpuGrant>,
    pub cpus: Milli,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// One grant per node, in rank order (ascending node index).
    pub nodes: Vec<NodeGrant>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    /// A user-facing sentence saying why.
    #[error("{0}")]
    Never(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NodeUsage {
    /// `(gpu index, used share)` for every GPU of the node, in index order.
    pub gpu_used: Vec<(u32, Milli)>,
    pub cpus_used: Milli,
    /// Running jobs with a grant on this node.
    pub jobs: usize,
}

/// Identifier of one pending demand shape (a group of identical [`Demand`]s).
type ShapeId = u64;

/// Pending jobs that share one demand, oldest first.
#[derive(Clone, Debug)]
struct ShapeGroup {
    demand: Demand,
    ids: BTreeSet<JobId>,
}

/// What is in use on one node; `gpu_used` is aligned with the node's (sorted) `gpus`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct NodeState {
    gpu_used: Vec<Milli>,
    cpus_used: Milli,
    jobs: usize,
}

impl NodeState {
    fn empty(cap: &NodeCapacity) -> NodeState {
        NodeState {
            gpu_used: vec![Milli::ZERO; cap.gpus.len()],
            cpus_used: Milli::ZERO,
            jobs: 0,
        }
    }
}

/// How an accelerator count is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Count {
    /// `n >= 1` whole, fully free GPUs.
    Whole(u64),
    /// A share in `(0, 1)` of one GPU.
    Fraction(Milli),
}

/// `None` for counts that can never be granted: zero, or a non-whole count above 1.
fn classify(count: Milli) -> Option<Count> {
    if count == Milli::ZERO {
        None
    } else if count < Milli::ONE {
        Some(Count::Fraction(count))
    } else if count.is_whole() {
        Some(Count::Whole(count.0 / 1000))
    } else {
        None
    }
}

/// Lower is better: how much a grant fragments the node it lands on.
type FitKey = (u64, u64);

/// One node's candidate grant for a demand.
struct NodeFit {
    /// Which accelerator alternative (0 for CPU-only).
    alt: usize,
    key: FitKey,
    grant: NodeGrant,
}

/// Position of GPU `index` in `cap.gpus` (sorted by index).
fn gpu_pos(cap: &NodeCapacity, index: u32) -> Option<usize> {
    cap.gpus.binary_search_by_key(&index, |g| g.index).ok()
}

/// Best GPUs for one accelerator alternative on one node, ignoring CPUs.
fn fit_alternative(
    cap: &NodeCapacity,
    st: &NodeState,
    alt: &AccelDemand,
) -> Option<(FitKey, String, Vec<GpuGrant>)> {
    let matching = || {
        cap.gpus
            .iter()
            .zip(&st.gpu_used)
            .filter(|(g, _)| g.kind.eq_ignore_ascii_case(&alt.kind))
    };
    match classify(alt.count)? {
        Count::Whole(n) => {
            let free: Vec<&GpuSlot> = matching()
                .filter(|(_, used)| **used == Milli::ZERO)
                .map(|(g, _)| g)
                .collect();
            let have = free.len() as u64;
            if have < n {
                return None;
            }
            let take = usize::try_from(n).ok()?;
            let kind = free.first()?.kind.clone();
            let grants = free
                .iter()
                .take(take)
                .map(|g| GpuGrant {
                    index: g.index,
                    share: Milli::ONE,
                })
                .collect();
            // Best fit: leave the fewest fully free GPUs behind on this node, so
            // nodes with many free GPUs stay whole for larger jobs.
            Some(((0, have - n), kind, grants))
        }
        Count::Fraction(f) => {
            // Best fit among already shared GPUs: least room that still fits.
            // GPUs are in index order and only a strictly smaller room wins, so
            // ties go to the lowest index.
            let mut shared: Option<(Milli, &GpuSlot)> = None;
            let mut first_free: Option<&GpuSlot> = None;
            let mut free_count: u64 = 0;
            for (g, used) in matching() {
                if *used == Milli::ZERO {
                    free_count += 1;
                    first_free.get_or_insert(g);
                    continue;
                }
                let room = Milli::ONE.saturating_sub(*used);
                if room >= f && shared.is_none_or(|(best, _)| room < best) {
                    shared = Some((room, g));
                }
            }
            let (key, g) = match (shared, first_free) {
                (Some((room, g)), _) => ((0, room.saturating_sub(f).0), g),
                (None, Some(g)) => ((1, free_count - 1), g),
                (None, None) => return None,
            };
            Some((
                key,
                g.kind.clone(),
                vec![GpuGrant {
                    index: g.index,
                    share: f,
                }],
            ))
        }
    }
}

/// The grant node `node` would give the per-node demand now (first alternative that
/// fits this node), ignoring its `available` flag.
fn fit_node(node: usize, cap: &NodeCapacity, st: &NodeState, nd: &NodeDemand) -> Option<NodeFit> {
    let cpus_after = st.cpus_used + nd.cpus;
    if cap.unknown || cpus_after > cap.cpus {
        return None;
    }
    if nd.accelerators.is_empty() {
        // CPU-only: prefer nodes without GPUs (keep GPU nodes' CPUs for GPU jobs),
        // then best fit on CPUs.
        return Some(NodeFit {
            alt: 0,
            key: (cap.gpus.len() as u64, cap.cpus.saturating_sub(cpus_after).0),
            grant: NodeGrant {
                node,
                accelerator: None,
                gpus: Vec::new(),
                cpus: nd.cpus,
            },
        });
    }
    nd.accelerators.iter().enumerate().find_map(|(alt, a)| {
        fit_alternative(cap, st, a).map(|(key, kind, gpus)| NodeFit {
            alt,
            key,
            grant: NodeGrant {
                node,
                accelerator: Some(kind),
                gpus,
                cpus: nd.cpus,
            },
        })
    })
}

/// Where `d` would run on the given capacity view right now, or `None` if it does
/// not fit. Pure: the starvation guard calls it on a view with the reservation
/// subtracted (see [`reserved_view`]).
fn place(nodes: &[NodeCapacity], state: &[NodeState], d: &Demand) -> Option<Placement> {
    let want = usize::try_from(d.num_nodes).ok()?;
    if want == 0 || want > nodes.len() {
        return None;
    }
    let mut fits: Vec<NodeFit> = nodes
        .iter()
        .zip(state)
        .enumerate()
        .filter(|(_, (cap, _))| cap.available)
        .filter_map(|(i, (cap, st))| fit_node(i, cap, st, &d.per_node))
        .collect();
    if fits.len() < want {
        return None;
    }
    // Earlier (preferred) alternatives first, then least fragmentation, then index.
    fits.sort_by_key(|f| (f.alt, f.key, f.grant.node));
    fits.truncate(want);
    // Rank order: ascending node index (node 0, the head, is rank 0 when present).
    fits.sort_by_key(|f| f.grant.node);
    Some(Placement {
        nodes: fits.into_iter().map(|f| f.grant).collect(),
    })
}

/// How soon a node could hold a reserved job: fewer units to drain is better.
/// Ordered field by field: GPU share in use on the GPUs the job would take (milli),
/// then CPUs missing until the job's CPUs fit (milli), then a tie-breaker (the
/// accelerator alternative's position, or for a CPU-only job the node's GPU count,
/// so GPU nodes stay free for GPU jobs as in [`fit_node`]).
type DrainKey = (u64, u64, usize);

/// The grant node `node` would give `nd` once the running jobs on the GPUs it picks
/// had ended, with its [`DrainKey`]; `None` if the node could not hold `nd` even when
/// empty. Per alternative it picks the least used GPUs of that kind (ties: lowest
/// index); a fraction picks one GPU and reserves all of it. Ignores `available`.
fn drain_fit(
    node: usize,
    cap: &NodeCapacity,
    st: &NodeState,
    nd: &NodeDemand,
) -> Option<(DrainKey, NodeGrant)> {
    if nd.cpus > cap.cpus {
        return None;
    }
    let cpus_short = (st.cpus_used + nd.cpus).saturating_sub(cap.cpus).0;
    if nd.accelerators.is_empty() {
        let grant = NodeGrant {
            node,
            accelerator: None,
            gpus: Vec::new(),
            cpus: nd.cpus,
        };
        return Some(((0, cpus_short, cap.gpus.len()), grant));
    }
    nd.accelerators
        .iter()
        .enumerate()
        .filter_map(|(alt, a)| {
            let (take, share) = match classify(a.count)? {
                Count::Whole(n) => (usize::try_from(n).ok()?, Milli::ONE),
                Count::Fraction(f) => (1, f),
            };
            let mut matching: Vec<(Milli, &GpuSlot)> = cap
                .gpus
                .iter()
                .zip(&st.gpu_used)
                .filter(|(g, _)| g.kind.eq_ignore_ascii_case(&a.kind))
                .map(|(g, used)| (*used, g))
                .collect();
            if matching.len() < take {
                return None;
            }
            matching.sort_by_key(|(used, g)| (*used, g.index));
            matching.truncate(take);
            let in_use: u64 = matching.iter().map(|(used, _)| used.0).sum();
            let kind = matching.first()?.1.kind.clone();
            let mut gpus: Vec<GpuGrant> = matching
                .iter()
                .map(|(_, g)| GpuGrant {
                    index: g.index,
                    share,
                })
                .collect();
            gpus.sort_by_key(|g| g.index);
            let grant = NodeGrant {
                node,
                accelerator: Some(kind),
                gpus,
                cpus: nd.cpus,
            };
            Some(((in_use, cpus_short, alt), grant))
        })
        .min_by_key(|(key, _)| *key)
}

/// The reservation target for a starving job: the `num_nodes` available nodes with
/// the least to drain ([`DrainKey`], ties to the lower index), each with the grant
/// from [`drain_fit`], in rank order. `None` if too few available nodes could hold
/// `d` even when empty.
fn reserve_target(nodes: &[NodeCapacity], state: &[NodeState], d: &Demand) -> Option<Placement> {
    let want = usize::try_from(d.num_nodes).ok()?;
    if want == 0 || want > nodes.len() {
        return None;
    }
    let mut fits: Vec<(DrainKey, NodeGrant)> = nodes
        .iter()
        .zip(state)
        .enumerate()
        .filter(|(_, (cap, _))| cap.available)
        .filter_map(|(i, (cap, st))| drain_fit(i, cap, st, &d.per_node))
        .collect();
    if fits.len() < want {
        return None;
    }
    fits.sort_by_key(|(key, g)| (*key, g.node));
    fits.truncate(want);
    fits.sort_by_key(|(_, g)| g.node);
    Some(Placement {
        nodes: fits.into_iter().map(|(_, g)| g).collect(),
    })
}

/// `state` with a reservation subtracted: every GPU in `target` counts as fully
/// used, and on each target node the holder's CPUs count as used (capped at the
/// node's CPUs, so a job asking no CPUs is not refused for CPUs it does not take).
fn reserved_view(
    nodes: &[NodeCapacity],
    state: &[NodeState],
    target: &Placement,
) -> Vec<NodeState> {
    let mut view = state.to_vec();
    for ng in &target.nodes {
        let (Some(cap), Some(st)) = (nodes.get(ng.node), view.get_mut(ng.node)) else {
            continue;
        };
        st.cpus_used = (st.cpus_used + ng.cpus).min(cap.cpus);
        for g in &ng.gpus {
            if let Some(used) = gpu_pos(cap, g.index).and_then(|pos| st.gpu_used.get_mut(pos)) {
                *used = Milli::ONE;
            }
        }
    }
    view
}

/// Adds a placement's usage to `state`.
fn apply_to(nodes: &[NodeCapacity], state: &mut [NodeState], p: &Placement) {
    for ng in &p.nodes {
        let (Some(cap), Some(st)) = (nodes.get(ng.node), state.get_mut(ng.node)) else {
            continue;
        };
        st.cpus_used += ng.cpus;
        st.jobs += 1;
        for g in &ng.gpus {
            if let Some(used) = gpu_pos(cap, g.index).and_then(|pos| st.gpu_used.get_mut(pos)) {
                *used += g.share;
            }
        }
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

/// `H100:1 and 8 CPUs`, `H100:8 or A100:8`, `2 CPUs`.
fn describe_node_demand(nd: &NodeDemand) -> String {
    let accel = nd
        .accelerators
        .iter()
        .map(|a| a.to_string())
        .collect::<Vec<_>>()
        .join(" or ");
    match (accel.is_empty(), nd.cpus == Milli::ZERO) {
        (true, _) => format!("{} CPUs", nd.cpus),
        (false, true) => accel,
        (false, false) => format!("{accel} and {} CPUs", nd.cpus),
    }
}

/// `cap` with its GPUs sorted by index and a repeated index dropped (the first is kept).
fn normalised(mut cap: NodeCapacity) -> NodeCapacity {
    cap.gpus.sort_by_key(|g| g.index);
    cap.gpus.dedup_by_key(|g| g.index);
    cap
}

/// The pending queue and running allocations of one cluster.
#[derive(Clone, Debug)]
pub struct Scheduler {
    /// Normalised: each node's GPUs sorted by index, duplicate indices dropped.
    nodes: Vec<NodeCapacity>,
    state: Vec<NodeState>,
    /// Pending job -> its shape.
    pending: BTreeMap<JobId, ShapeId>,
    shape_ids: HashMap<Demand, ShapeId>,
    groups: BTreeMap<ShapeId, ShapeGroup>,
    next_shape: ShapeId,
    running: BTreeMap<JobId, Placement>,
    /// Pending job -> when it started waiting (ms, the caller's clock).
    since: HashMap<JobId, u64>,
    /// `(since, id)` of every pending job: longest wait first.
    by_age: BTreeSet<(u64, JobId)>,
    /// Wait (ms) after which a job that does not fit gets a reservation.
    starvation_bound: Option<u64>,
    /// The job holding the reservation and its target placement.
    reservation: Option<(JobId, Placement)>,
}

impl Scheduler {
    /// A scheduler for these nodes, all idle. Each node's GPUs are sorted by index;
    /// a repeated index on one node is dropped (the first one is kept).
    pub fn new(nodes: Vec<NodeCapacity>) -> Self {
        let nodes: Vec<NodeCapacity> = nodes.into_iter().map(normalised).collect();
        let state = nodes.iter().map(NodeState::empty).collect();
        Scheduler {
            nodes,
            state,
            pending: BTreeMap::new(),
            shape_ids: HashMap::new(),
            groups: BTreeMap::new(),
            next_shape: 0,
            running: BTreeMap::new(),
            since: HashMap::new(),
            by_age: BTreeSet::new(),
            starvation_bound: None,
            reservation: None,
        }
    }

    pub fn nodes(&self) -> &[NodeCapacity] {
        &self.nodes
    }

    /// `Err(Unfit::Never)` if `d` could not run on this cluster even when it is
    /// empty (unavailable nodes count: they may come back; a node whose capacity is not
    /// known yet counts as one that can hold it).
    pub fn check_fits_ever(&self, d: &Demand) -> Result<(), Unfit> {
        let never = |s: String| Err(Unfit::Never(s));
        let nd = &d.per_node;
        if d.num_nodes == 0 {
            return never("the job asks for 0 nodes; it needs at least 1".to_string());
        }
        for a in &nd.accelerators {
            if classify(a.count).is_none() {
                return never(format!(
                    "accelerator count '{a}' is invalid: use a whole number (1, 2, ...) \
                     or a fraction below 1 (e.g. 0.5)"
                ));
            }
        }
        let want = usize::try_from(d.num_nodes).unwrap_or(usize::MAX);
        if want > self.nodes.len() {
            return never(format!(
                "needs {} but this cluster has {}",
                plural(want, "node"),
                plural(self.nodes.len(), "node")
            ));
        }
        let can_hold = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, cap)| {
                cap.unknown || fit_node(*i, cap, &NodeState::empty(cap), nd).is_some()
            })
            .count();
        if can_hold >= want {
            return Ok(());
        }

        // Say why, most specific first.
        if !nd.accelerators.is_empty() {
            let mut reasons = Vec::new();
            let mut unknown = Vec::new();
            for a in &nd.accelerators {
                let Some(spelled) = self.kind_spelling(&a.kind) else {
                    unknown.push(format!("'{}'", a.kind));
                    continue;
                };
                let most = self.most_of_kind(&a.kind);
                match classify(a.count) {
                    Some(Count::Whole(n)) if n > most => reasons.push(format!(
                        "needs {n}x {} on one node but the largest node has {most} {spelled}",
                        a.kind
                    )),
                    // This alternative fits some empty node by its GPUs alone.
                    _ => {
                        reasons.clear();
                        unknown.clear();
                        break;
                    }
                }
            }
            if !unknown.is_empty() {
                let kinds = self.kinds();
                let has = if kinds.is_empty() {
                    "this cluster has no accelerators".to_string()
                } else {
                    format!("this cluster has: {}", kinds.join(", "))
                };
                reasons.insert(
                    0,
                    format!("no node has accelerator {} ({has})", unknown.join(" or ")),
                );
            }
            if !reasons.is_empty() {
                return never(reasons.join("; "));
            }
        }
        let largest = self.nodes.iter().map(|n| n.cpus).max().unwrap_or_default();
        if nd.cpus > largest {
            return never(format!(
                "needs {} CPUs on one node but the largest node has {largest} CPUs",
                nd.cpus
            ));
        }
        let what = describe_node_demand(nd);
        if can_hold == 0 {
            return never(format!("no node has {what} at once"));
        }
        never(format!(
            "needs {} with {what} each but only {} of this cluster can hold that",
            plural(want, "node"),
            plural(can_hold, "node")
        ))
    }

    /// The cluster's own spelling of an accelerator kind, if any node has it.
    fn kind_spelling(&self, kind: &str) -> Option<&str> {
        self.nodes
            .iter()
            .flat_map(|n| &n.gpus)
            .find(|g| g.kind.eq_ignore_ascii_case(kind))
            .map(|g| g.kind.as_str())
    }

    /// The most GPUs of `kind` any one node has.
    fn most_of_kind(&self, kind: &str) -> u64 {
        self.nodes
            .iter()
            .map(|n| {
                n.gpus
                    .iter()
                    .filter(|g| g.kind.eq_ignore_ascii_case(kind))
                    .count() as u64
            })
            .max()
            .unwrap_or(0)
    }

    /// Distinct accelerator kinds (case-insensitively), sorted.
    fn kinds(&self) -> Vec<String> {
        let mut by_lower: BTreeMap<String, String> = BTreeMap::new();
        for g in self.nodes.iter().flat_map(|n| &n.gpus) {
            by_lower
                .entry(g.kind.to_ascii_lowercase())
                .or_insert_with(|| g.kind.clone());
        }
        by_lower.into_values().collect()
    }

    /// Adds a pending job that started waiting at time 0 (see [`Scheduler::enqueue_at`]).
    /// An id that is already pending or running is ignored.
    pub fn enqueue(&mut self, id: JobId, d: Demand) {
        self.enqueue_at(id, d, 0);
    }

    /// Adds a pending job that started waiting at `now_ms` (the caller's clock, the
    /// same one given to [`Scheduler::schedule_at`]; a daemon restoring jobs after a
    /// restart passes their original submission time). An id that is already
    /// pending or running is ignored, keeping its first time.
    pub fn enqueue_at(&mut self, id: JobId, d: Demand, now_ms: u64) {
        if self.pending.contains_key(&id) || self.running.contains_key(&id) {
            return;
        }
        self.since.insert(id, now_ms);
        self.by_age.insert((now_ms, id));
        let sid = match self.shape_ids.get(&d) {
            Some(sid) => *sid,
            None => {
                let sid = self.next_shape;
                self.next_shape += 1;
                self.shape_ids.insert(d.clone(), sid);
                self.groups.insert(
                    sid,
                    ShapeGroup {
                        demand: d,
                        ids: BTreeSet::new(),
                    },
                );
                sid
            }
        };
        if let Some(g) = self.groups.get_mut(&sid) {
            g.ids.insert(id);
        }
        self.pending.insert(id, sid);
    }

    /// Cancels a pending job; `true` if it was pending.
    pub fn dequeue(&mut self, id: JobId) -> bool {
        let Some(sid) = self.pending.remove(&id) else {
            return false;
        };
        if let Some(since) = self.since.remove(&id) {
            self.by_age.remove(&(since, id));
        }
        if self
            .reservation
            .as_ref()
            .is_some_and(|(holder, _)| *holder == id)
        {
            self.reservation = None;
        }
        if let Some(g) = self.groups.get_mut(&sid) {
            g.ids.remove(&id);
            if g.ids.is_empty() {
                if let Some(g) = self.groups.remove(&sid) {
                    self.shape_ids.remove(&g.demand);
                }
            }
        }
        true
    }

    /// Re-adopts a job that is running with exactly this placement (after a daemon
    /// restart). Fails, changing nothing, if the job is already running, or the
    /// placement names unknown nodes or GPUs, or would oversubscribe anything. A
    /// pending job with this id stops being pending.
    pub fn restore(&mut self, id: JobId, p: &Placement) -> Result<(), Unfit> {
        let never = |s: String| Err(Unfit::Never(s));
        if self.running.contains_key(&id) {
            return never(format!("job {id} is already running"));
        }
        if p.nodes.is_empty() {
            return never(format!("job {id}'s placement names no node"));
        }
        let mut seen = BTreeSet::new();
        for ng in &p.nodes {
            if !seen.insert(ng.node) {
                return never(format!("job {id}'s placement names node {} twice", ng.node));
            }
            let (Some(cap), Some(st)) = (self.nodes.get(ng.node), self.state.get(ng.node)) else {
                return never(format!(
                    "job {id} runs on node {} but this cluster has {}",
                    ng.node,
                    plural(self.nodes.len(), "node")
                ));
            };
            if st.cpus_used + ng.cpus > cap.cpus {
                return never(format!(
                    "job {id} needs {} CPUs on node '{}' but only {} of {} are free",
                    ng.cpus,
                    cap.name,
                    cap.cpus.saturating_sub(st.cpus_used),
                    cap.cpus
                ));
            }
            let mut extra: BTreeMap<usize, Milli> = BTreeMap::new();
            for g in &ng.gpus {
                let Some(pos) = gpu_pos(cap, g.index) else {
                    return never(format!(
                        "job {id} uses GPU {} on node '{}', which has no such GPU",
                        g.index, cap.name
                    ));
                };
                if g.share == Milli::ZERO || g.share > Milli::ONE {
                    return never(format!(
                        "job {id} has an invalid share {} of GPU {} on node '{}'",
                        g.share, g.index, cap.name
                    ));
                }
                *extra.entry(pos).or_default() += g.share;
            }
            for (pos, share) in extra {
                let used = st.gpu_used.get(pos).copied().unwrap_or_default();
                if used + share > Milli::ONE {
                    let index = cap.gpus.get(pos).map_or(0, |g| g.index);
                    return never(format!(
                        "job {id} would oversubscribe GPU {index} on node '{}' \
                         ({used} already used, {share} more asked)",
                        cap.name
                    ));
                }
            }
        }
        self.dequeue(id);
        self.apply(p);
        self.running.insert(id, p.clone());
        Ok(())
    }

    /// Frees a running job's allocation; no-op if it is not running.
    pub fn release(&mut self, id: JobId) {
        if let Some(p) = self.running.remove(&id) {
            self.unapply(&p);
        }
    }

    /// Starts every pending job that fits now, oldest first, applying the
    /// allocations; returns them in the order started (ascending id).
    ///
    /// Plain backfill: the starvation bound and any reservation are ignored (a
    /// reservation ends only if its holder starts here).
    ///
    /// Shapes are merged by their oldest pending id through a heap; a shape whose
    /// job did not fit is dropped for the rest of the pass, so the cost is about
    /// `shapes * log(shapes)` plus the work for jobs that start.
    pub fn schedule(&mut self) -> Vec<(JobId, Placement)> {
        self.backfill(Vec::new(), false)
    }

    /// [`Scheduler::schedule`] with the starvation bound applied at time `now_ms`
    /// (the clock of [`Scheduler::enqueue_at`]); identical to it when no bound is set.
    ///
    /// First, the jobs that have waited longer than the bound (`now_ms - since >
    /// bound`) are walked longest wait first (ties: lower id): each that fits starts;
    /// the first that does not fit but could run on the available nodes if they were
    /// empty becomes the reservation holder (see [`Scheduler::reservation`]) and the
    /// walk stops. Then every other pending job is backfilled oldest first, as in
    /// `schedule`, on the free capacity minus the reservation. Returns the jobs in
    /// the order started: the starving ones first, then the backfilled ones by id.
    pub fn schedule_at(&mut self, now_ms: u64) -> Vec<(JobId, Placement)> {
        let started = self.guard(now_ms);
        self.backfill(started, true)
    }

    /// Sets (or with `None` clears) the starvation bound in ms; clearing it drops the
    /// reservation. A new bound takes effect at the next [`Scheduler::schedule_at`].
    pub fn set_starvation_bound(&mut self, bound_ms: Option<u64>) {
        self.starvation_bound = bound_ms;
        if bound_ms.is_none() {
            self.reservation = None;
        }
    }

    pub fn starvation_bound(&self) -> Option<u64> {
        self.starvation_bound
    }

    /// When the longest-waiting pending job started waiting; `None` with no job pending.
    pub fn oldest_waiting_since(&self) -> Option<u64> {
        self.by_age.first().map(|&(since, _)| since)
    }

    /// When a pending job started waiting (as given to [`Scheduler::enqueue_at`]).
    pub fn waiting_since(&self, id: JobId) -> Option<u64> {
        self.since.get(&id).copied()
    }

    /// The starving job that holds the reservation, and its target placement as of
    /// the last [`Scheduler::schedule_at`].
    ///
    /// Policy: run times are unknown, so the target is the placement that has the
    /// least running work in the way: per available node, the GPUs of the job's
    /// kind with the least share in use (a fractional demand reserves one whole
    /// GPU), scored by that share, then by the CPUs it would still lack; the
    /// `num_nodes` best nodes win (ties: earlier alternative, lower node index). The
    /// target is kept while its holder stays the oldest starving job and its nodes
    /// stay available, so new work never lands on it and it drains. The holder starts
    /// on the first pass where it fits anywhere (not necessarily on its target).
    pub fn reservation(&self) -> Option<(JobId, &Placement)> {
        self.reservation.as_ref().map(|(id, p)| (*id, p))
    }

    /// The starving walk of [`Scheduler::schedule_at`]: starts the starving jobs
    /// that fit and sets (or clears) the reservation.
    fn guard(&mut self, now_ms: u64) -> Vec<(JobId, Placement)> {
        let mut started = Vec::new();
        let old = self.reservation.take();
        let Some(bound) = self.starvation_bound else {
            return started;
        };
        // Waited longer than the bound <=> started waiting before `cutoff`.
        let Some(cutoff) = now_ms.checked_sub(bound) else {
            return started;
        };
        // Shapes that neither fit now nor could be reserved: capacity only shrinks
        // and availability is fixed during the walk, so their other jobs cannot either.
        let mut unreservable: HashSet<ShapeId> = HashSet::new();
        let mut after: Option<(u64, JobId)> = None;
        loop {
            let next = match after {
                None => self.by_age.first(),
                Some(k) => self
                    .by_age
                    .range((Bound::Excluded(k), Bound::Unbounded))
                    .next(),
            };
            let Some(&(since, id)) = next else {
                break;
            };
            if since >= cutoff {
                break;
            }
            after = Some((since, id));
            let Some(&sid) = self.pending.get(&id) else {
                continue;
            };
            if unreservable.contains(&sid) {
                continue;
            }
            let Some(group) = self.groups.get(&sid) else {
                continue;
            };
            if let Some(p) = place(&self.nodes, &self.state, &group.demand) {
                self.start(id, p, &mut started);
                continue;
            }
            let kept = old.as_ref().filter(|(holder, target)| {
                *holder == id
                    && target
                        .nodes
                        .iter()
                        .all(|ng| self.nodes.get(ng.node).is_some_and(|c| c.available))
            });
            let target = match kept {
                Some((_, target)) => Some(target.clone()),
                None => reserve_target(&self.nodes, &self.state, &group.demand),
            };
            match target {
                Some(target) => {
                    self.reservation = Some((id, target));
                    break;
                }
                None => {
                    unreservable.insert(sid);
                }
            }
        }
        started
    }

    /// The oldest-first pass shared by `schedule` and `schedule_at`, appending to
    /// `started`. With `honour_reservation`, jobs are placed on the free capacity
    /// minus the reservation; that view only shrinks during the pass too, so a
    /// shape that failed on it is still skipped for the rest of the pass.
    fn backfill(
        &mut self,
        mut started: Vec<(JobId, Placement)>,
        honour_reservation: bool,
    ) -> Vec<(JobId, Placement)> {
        let mut view: Option<Vec<NodeState>> = match &self.reservation {
            Some((_, target)) if honour_reservation => {
                Some(reserved_view(&self.nodes, &self.state, target))
            }
            _ => None,
        };
        let mut heap: BinaryHeap<Reverse<(JobId, ShapeId)>> = self
            .groups
            .iter()
            .filter_map(|(sid, g)| g.ids.first().map(|id| Reverse((*id, *sid))))
            .collect();
        while let Some(Reverse((id, sid))) = heap.pop() {
            let Some(group) = self.groups.get(&sid) else {
                continue;
            };
            let on = view.as_deref().unwrap_or(&self.state);
            let Some(p) = place(&self.nodes, on, &group.demand) else {
                // Capacity only shrinks during a pass: skip the whole shape.
                continue;
            };
            if let Some(v) = view.as_mut() {
                apply_to(&self.nodes, v, &p);
            }
            self.start(id, p, &mut started);
            if let Some(next) = self.groups.get(&sid).and_then(|g| g.ids.first()) {
                heap.push(Reverse((*next, sid)));
            }
        }
        started
    }

    /// Moves a pending job to running with placement `p`.
    fn start(&mut self, id: JobId, p: Placement, started: &mut Vec<(JobId, Placement)>) {
        self.dequeue(id);
        self.apply(&p);
        self.running.insert(id, p.clone());
        started.push((id, p));
    }

    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    pub fn running_len(&self) -> usize {
        self.running.len()
    }

    /// Per node (in node order): used share per GPU, CPUs used, running jobs.
    pub fn usage(&self) -> Vec<NodeUsage> {
        self.nodes
            .iter()
            .zip(&self.state)
            .map(|(cap, st)| NodeUsage {
                gpu_used: cap
                    .gpus
                    .iter()
                    .zip(&st.gpu_used)
                    .map(|(g, used)| (g.index, *used))
                    .collect(),
                cpus_used: st.cpus_used,
                jobs: st.jobs,
            })
            .collect()
    }

    /// The grant node `node` would give the one-node demand `d` if it ran nothing (`None`
    /// for a job of several nodes, or one that never fits there).
    pub fn fit_when_empty(&self, node: usize, d: &Demand) -> Option<NodeGrant> {
        let cap = self.nodes.get(node).filter(|_| d.num_nodes == 1)?;
        fit_node(node, cap, &NodeState::empty(cap), &d.per_node).map(|f| f.grant)
    }

    /// The grant node `node` would give the one-node demand `d` now, beside what runs there
    /// (`None` when it does not fit now, or the node takes no new jobs).
    pub fn fit_now(&self, node: usize, d: &Demand) -> Option<NodeGrant> {
        let cap = self
            .nodes
            .get(node)
            .filter(|c| d.num_nodes == 1 && c.available)?;
        fit_node(node, cap, self.state.get(node)?, &d.per_node).map(|f| f.grant)
    }

    /// Marks a node (un)available for new jobs; running jobs are not touched.
    /// No-op for an unknown node.
    /// Replaces the capacity of a node on which nothing runs (its GPUs and CPUs, found
    /// after the start: a remote node that did not answer then). Returns false, changing
    /// nothing, when a job runs there or there is no such node. A reservation on the node
    /// is dropped (the next pass makes a new one).
    pub fn set_capacity(&mut self, node: usize, cap: NodeCapacity) -> bool {
        let (Some(old), Some(state)) = (self.nodes.get_mut(node), self.state.get_mut(node)) else {
            return false;
        };
        if state.jobs != 0 {
            return false;
        }
        let cap = normalised(cap);
        *state = NodeState::empty(&cap);
        *old = cap;
        if self
            .reservation
            .as_ref()
            .is_some_and(|(_, t)| t.nodes.iter().any(|ng| ng.node == node))
        {
            self.reservation = None;
        }
        true
    }

    pub fn set_available(&mut self, node: usize, available: bool) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.available = available;
        }
    }

    /// Where a running job runs.
    pub fn running_placement(&self, id: JobId) -> Option<&Placement> {
        self.running.get(&id)
    }

    pub fn is_pending(&self, id: JobId) -> bool {
        self.pending.contains_key(&id)
    }

    /// The demand of a pending job.
    pub fn pending_demand(&self, id: JobId) -> Option<&Demand> {
        let sid = self.pending.get(&id)?;
        self.groups.get(sid).map(|g| &g.demand)
    }

    /// Pending job ids, oldest first.
    pub fn pending_ids(&self) -> impl Iterator<Item = JobId> + '_ {
        self.pending.keys().copied()
    }

    /// Running jobs and their placements, by id.
    pub fn running(&self) -> impl Iterator<Item = (JobId, &Placement)> + '_ {
        self.running.iter().map(|(id, p)| (*id, p))
    }

    fn apply(&mut self, p: &Placement) {
        apply_to(&self.nodes, &mut self.state, p);
    }

    fn unapply(&mut self, p: &Placement) {
        for ng in &p.nodes {
            let (Some(cap), Some(st)) = (self.nodes.get(ng.node), self.state.get_mut(ng.node))
            else {
                continue;
            };
            st.cpus_used -= ng.cpus;
            st.jobs = st.jobs.saturating_sub(1);
            for g in &ng.gpus {
                if let Some(used) = gpu_pos(cap, g.index).and_then(|pos| st.gpu_used.get_mut(pos)) {
                    *used -= g.share;
                }
            }
        }
    }

    /// Reference for `schedule`: walks every pending job in id order, no grouping.
    #[cfg(test)]
    fn schedule_naive(&mut self) -> Vec<(JobId, Placement)> {
        let ids: Vec<JobId> = self.pending.keys().copied().collect();
        let mut started = Vec::new();
        for id in ids {
            let Some(d) = self.pending_demand(id).cloned() else {
                continue;
            };
            if let Some(p) = place(&self.nodes, &self.state, &d) {
                self.dequeue(id);
                self.apply(&p);
                self.running.insert(id, p.clone());
                started.push((id, p));
            }
        }
        started
    }

    /// Reference for `schedule_at`: the same starving walk, then every pending job
    /// in id order on the free capacity minus the reservation, no grouping.
    #[cfg(test)]
    fn schedule_at_naive(&mut self, now_ms: u64) -> Vec<(JobId, Placement)> {
        let mut started = self.guard(now_ms);
        let reserved = self.reservation.as_ref().map(|(_, t)| t.clone());
        let ids: Vec<JobId> = self.pending.keys().copied().collect();
        for id in ids {
            let Some(d) = self.pending_demand(id).cloned() else {
                continue;
            };
            let view = match &reserved {
                Some(t) => reserved_view(&self.nodes, &self.state, t),
                None => self.state.clone(),
            };
            if let Some(p) = place(&self.nodes, &view, &d) {
                self.start(id, p, &mut started);
            }
        }
        started
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::DEFAULT_JOB_CPUS;
    use proptest::prelude::*;

    fn node(name: &str, kinds: &[(&str, u32)], cpus: u64) -> NodeCapacity {
        let mut gpus = Vec::new();
        for (kind, n) in kinds {
            for _ in 0..*n {
                gpus.push(GpuSlot {
                    index: gpus.len() as u32,
                    kind: kind.to_string(),
                });
            }
        }
        NodeCapacity {
            name: name.to_string(),
            gpus,
            cpus: Milli::from_units(cpus),
            available: true,
            unknown: false,
        }
    }

    fn accel(kind: &str, milli: u64) -> AccelDemand {
        AccelDemand {
            kind: kind.to_string(),
            count: Milli(milli),
        }
    }

    fn demand(num_nodes: u32, alts: &[(&str, u64)], cpus: Milli) -> Demand {
        Demand {
            num_nodes,
            per_node: NodeDemand {
                accelerators: alts.iter().map(|(k, m)| accel(k, *m)).collect(),
                cpus,
            },
        }
    }

    fn gpu(kind: &str, milli: u64) -> Demand {
        demand(1, &[(kind, milli)], DEFAULT_JOB_CPUS)
    }

    fn ids(started: &[(JobId, Placement)]) -> Vec<JobId> {
        started.iter().map(|(id, _)| *id).collect()
    }

    fn gpu_indices(p: &Placement) -> Vec<u32> {
        p.nodes
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| g.index))
            .collect()
    }

    fn never(s: &Scheduler, d: &Demand) -> String {
        match s.check_fits_ever(d) {
            Err(Unfit::Never(r)) => r,
            Ok(()) => panic!("expected unfit: {d:?}"),
        }
    }

    #[test]
    fn skypilot_backfill_sequence() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 26)]);
        s.enqueue(1, gpu("H100", 4000));
        let started = s.schedule();
        assert_eq!(ids(&started), vec![1]);
        assert_eq!(gpu_indices(&started[0].1), vec![0, 1, 2, 3]);
        s.enqueue(2, gpu("H100", 1000));
        s.enqueue(3, gpu("H100", 1000));
        s.enqueue(4, gpu("H100", 4000));
        s.enqueue(5, gpu("H100", 2000));
        assert!(s.schedule().is_empty());
        assert_eq!(s.pending_len(), 4);

        s.release(1);
        let started = s.schedule();
        assert_eq!(ids(&started), vec![2, 3, 5]);
        assert_eq!(gpu_indices(&started[0].1), vec![0]);
        assert_eq!(gpu_indices(&started[1].1), vec![1]);
        assert_eq!(gpu_indices(&started[2].1), vec![2, 3]);
        assert!(s.is_pending(4));

        s.release(2);
        s.release(3);
        assert!(s.schedule().is_empty());
        assert!(s.is_pending(4));

        s.release(5);
        let started = s.schedule();
        assert_eq!(ids(&started), vec![4]);
        assert_eq!(gpu_indices(&started[0].1), vec![0, 1, 2, 3]);
        assert_eq!(s.pending_len(), 0);
        assert_eq!(s.running_len(), 1);
    }

    /// A node whose GPUs and CPUs are not known yet (it did not answer at start) gets no
    /// job, but no job is refused for want of it; once they are set it takes jobs. A node
    /// with a job on it keeps its capacity.
    #[test]
    fn set_capacity_fills_an_idle_node_and_leaves_a_busy_one() {
        let unknown = NodeCapacity {
            unknown: true,
            ..node("w1", &[("H100", 8)], 64)
        };
        let mut s = Scheduler::new(vec![node("head", &[("H100", 1)], 4), unknown]);
        let two = demand(2, &[("H100", 1000)], DEFAULT_JOB_CPUS);
        assert!(s.check_fits_ever(&two).is_ok(), "w1 may hold it");
        assert!(s.check_fits_ever(&demand(3, &[], Milli::ONE)).is_err());
        s.enqueue(1, two);
        s.enqueue(9, demand(1, &[], Milli::ONE));
        assert_eq!(ids(&s.schedule()), vec![9], "nothing goes to w1 yet");
        s.release(9);
        assert!(s.set_capacity(1, node("w1", &[("H100", 2)], 8)));
        let started = s.schedule();
        assert_eq!(ids(&started), vec![1]);
        assert_eq!(started[0].1.nodes[1].node, 1);
        assert!(
            !s.set_capacity(1, node("w1", &[("H100", 8)], 64)),
            "job 1 runs there"
        );
        assert!(!s.set_capacity(7, node("w7", &[], 1)), "no such node");
        s.release(1);
        s.enqueue(2, demand(1, &[("H100", 2000)], Milli::from_units(8)));
        let started = s.schedule();
        assert_eq!(ids(&started), vec![2]);
        assert_eq!(started[0].1.nodes[0].node, 1, "only w1 has 2 H100");
    }

    /// What a node would grant a job if it ran nothing: the prestart's guess of where and
    /// as what a queued job runs (busy GPUs do not matter; other nodes, several nodes and
    /// demands the node can never meet give nothing).
    #[test]
    fn fit_when_empty_ignores_what_runs_and_names_the_alternative() {
        let mut s = Scheduler::new(vec![
            node("head", &[("T4", 1)], 4),
            node("w1", &[("H100", 8)], 64),
        ]);
        s.enqueue(1, gpu("T4", 1000));
        assert_eq!(ids(&s.schedule()), vec![1]);
        let alts = demand(1, &[("H100", 1000), ("T4", 1000)], DEFAULT_JOB_CPUS);
        let g = s
            .fit_when_empty(0, &alts)
            .expect("fits the head when it is empty");
        assert_eq!((g.node, g.accelerator.as_deref()), (0, Some("T4")));
        assert_eq!(s.fit_when_empty(0, &gpu("H100", 1000)), None);
        assert_eq!(s.fit_when_empty(0, &gpu("T4", 2000)), None);
        assert!(s.fit_when_empty(1, &gpu("H100", 1000)).is_some());
        assert_eq!(
            s.fit_when_empty(1, &demand(2, &[("H100", 1000)], DEFAULT_JOB_CPUS)),
            None
        );
        assert_eq!(s.fit_when_empty(2, &gpu("T4", 1000)), None);
        let cpu = demand(1, &[], Milli::from_units(4));
        assert_eq!(
            s.fit_when_empty(0, &cpu).map(|g| g.cpus),
            Some(Milli::from_units(4))
        );
        assert_eq!(
            s.fit_when_empty(0, &demand(1, &[], Milli::from_units(5))),
            None
        );
    }

    #[test]
    fn grid_search_five_on_four() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 26)]);
        for id in 1..=5 {
            s.enqueue(id, gpu("H100", 1000));
        }
        assert_eq!(ids(&s.schedule()), vec![1, 2, 3, 4]);
        assert!(s.is_pending(5));
        s.release(3);
        let started = s.schedule();
        assert_eq!(ids(&started), vec![5]);
        assert_eq!(gpu_indices(&started[0].1), vec![2]);
    }

    #[test]
    fn fractions_pack() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 26)]);
        s.enqueue(1, gpu("H100", 500));
        s.enqueue(2, gpu("h100", 500));
        let started = s.schedule();
        assert_eq!(gpu_indices(&started[0].1), vec![0]);
        assert_eq!(gpu_indices(&started[1].1), vec![0]);

        // 0.5 + 0.25 + 0.25 fills one GPU exactly; the next quarter breaks a new one.
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 26)]);
        s.enqueue(1, gpu("H100", 500));
        s.enqueue(2, gpu("H100", 250));
        s.enqueue(3, gpu("H100", 250));
        s.enqueue(4, gpu("H100", 250));
        let started = s.schedule();
        assert_eq!(gpu_indices(&started[0].1), vec![0]);
        assert_eq!(gpu_indices(&started[1].1), vec![0]);
        assert_eq!(gpu_indices(&started[2].1), vec![0]);
        assert_eq!(gpu_indices(&started[3].1), vec![1]);
        assert_eq!(s.usage()[0].gpu_used[0], (0, Milli::ONE));

        // 4 x 0.5 use 2 GPUs, not 4.
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 26)]);
        for id in 1..=4 {
            s.enqueue(id, gpu("H100", 500));
        }
        s.schedule();
        let used: Vec<Milli> = s.usage()[0].gpu_used.iter().map(|(_, u)| *u).collect();
        assert_eq!(used, vec![Milli::ONE, Milli::ONE, Milli::ZERO, Milli::ZERO]);
    }

    #[test]
    fn fractions_best_fit() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 3)], 26)]);
        let p = |pairs: &[(u32, u64)]| Placement {
            nodes: vec![NodeGrant {
                node: 0,
                accelerator: Some("H100".into()),
                gpus: pairs
                    .iter()
                    .map(|(i, m)| GpuGrant {
                        index: *i,
                        share: Milli(*m),
                    })
                    .collect(),
                cpus: Milli::ZERO,
            }],
        };
        s.restore(1, &p(&[(0, 500)])).unwrap();
        s.restore(2, &p(&[(1, 750)])).unwrap();
        // 0.25 goes where the least room still fits: GPU 1 (0.25 left), not GPU 0.
        s.enqueue(3, gpu("H100", 250));
        // 0.5 only fits the shared GPU 0, not a fresh GPU 2.
        s.enqueue(4, gpu("H100", 500));
        let started = s.schedule();
        assert_eq!(gpu_indices(&started[0].1), vec![1]);
        assert_eq!(gpu_indices(&started[1].1), vec![0]);
        assert_eq!(s.usage()[0].gpu_used[2], (2, Milli::ZERO));
    }

    #[test]
    fn alternatives_in_order() {
        let mut s = Scheduler::new(vec![node("n0", &[("A100", 2), ("H100", 2)], 26)]);
        let d = demand(1, &[("a100", 2000), ("H100", 1000)], DEFAULT_JOB_CPUS);
        s.enqueue(1, d.clone());
        s.enqueue(2, d.clone());
        s.enqueue(3, d.clone());
        s.enqueue(4, d);
        let started = s.schedule();
        assert_eq!(ids(&started), vec![1, 2, 3]);
        let accel: Vec<_> = started
            .iter()
            .map(|(_, p)| p.nodes[0].accelerator.clone().unwrap())
            .collect();
        assert_eq!(accel, vec!["A100", "H100", "H100"]);
        assert_eq!(gpu_indices(&started[0].1), vec![0, 1]);
        assert_eq!(gpu_indices(&started[1].1), vec![2]);
        assert_eq!(gpu_indices(&started[2].1), vec![3]);
        // The first alternative wins across nodes too.
        let mut s = Scheduler::new(vec![
            node("n0", &[("H100", 1)], 4),
            node("n1", &[("A100", 1)], 4),
        ]);
        s.enqueue(1, demand(1, &[("A100", 1000), ("H100", 1000)], Milli::ZERO));
        let started = s.schedule();
        assert_eq!(started[0].1.nodes[0].node, 1);
    }

    #[test]
    fn multi_node_all_or_nothing() {
        let mut s = Scheduler::new(vec![
            node("head", &[("H100", 2)], 8),
            node("w1", &[("H100", 2)], 8),
            node("w2", &[("H100", 2)], 8),
        ]);
        s.enqueue(1, gpu("H100", 2000));
        let started = s.schedule();
        assert_eq!(started[0].1.nodes[0].node, 0);
        s.enqueue(2, demand(3, &[("H100", 2000)], Milli(500)));
        assert!(s.schedule().is_empty());
        // Nothing is held while waiting.
        let u = s.usage();
        assert_eq!(u[1].jobs + u[2].jobs, 0);
        assert_eq!(u[1].cpus_used, Milli::ZERO);
        // A 2-node job backfills on the two free workers.
        s.enqueue(3, demand(2, &[("H100", 1000)], Milli(500)));
        let started = s.schedule();
        assert_eq!(ids(&started), vec![3]);
        let nodes: Vec<usize> = started[0].1.nodes.iter().map(|n| n.node).collect();
        assert_eq!(nodes, vec![1, 2]);
        s.release(1);
        s.release(3);
        let started = s.schedule();
        assert_eq!(ids(&started), vec![2]);
        let nodes: Vec<usize> = started[0].1.nodes.iter().map(|n| n.node).collect();
        assert_eq!(nodes, vec![0, 1, 2], "rank 0 is the head");
        assert!(started[0].1.nodes.iter().all(|n| n.gpus.len() == 2));
    }

    #[test]
    fn unavailable_node_gets_nothing() {
        let mut s = Scheduler::new(vec![
            node("n0", &[("H100", 1)], 4),
            node("n1", &[("H100", 1)], 4),
        ]);
        s.set_available(0, false);
        s.enqueue(1, gpu("H100", 1000));
        s.enqueue(2, gpu("H100", 1000));
        let started = s.schedule();
        assert_eq!(ids(&started), vec![1]);
        assert_eq!(started[0].1.nodes[0].node, 1);
        assert!(s
            .check_fits_ever(&demand(2, &[("H100", 1000)], Milli::ZERO))
            .is_ok());
        s.set_available(0, true);
        assert_eq!(ids(&s.schedule()), vec![2]);
    }

    #[test]
    fn cpu_only_jobs_default_half_cpu() {
        let mut s = Scheduler::new(vec![node("cpu", &[], 2)]);
        for id in 1..=5 {
            s.enqueue(id, demand(1, &[], DEFAULT_JOB_CPUS));
        }
        assert_eq!(ids(&s.schedule()), vec![1, 2, 3, 4]);
        assert!(s.is_pending(5));
        assert_eq!(s.usage()[0].cpus_used, Milli::from_units(2));
        assert_eq!(s.usage()[0].jobs, 4);
    }

    #[test]
    fn cpu_only_prefers_gpu_less_nodes() {
        let mut s = Scheduler::new(vec![node("gpu", &[("H100", 1)], 8), node("cpu", &[], 8)]);
        s.enqueue(1, demand(1, &[], Milli(1000)));
        assert_eq!(s.schedule()[0].1.nodes[0].node, 1);
    }

    #[test]
    fn unfit_reasons() {
        let s = Scheduler::new(vec![
            node("n0", &[("H100", 4)], 8),
            node("n1", &[("H100", 2)], 16),
        ]);
        assert_eq!(
            never(&s, &gpu("H100", 8000)),
            "needs 8x H100 on one node but the largest node has 4 H100"
        );
        assert_eq!(
            never(&s, &gpu("A100", 1000)),
            "no node has accelerator 'A100' (this cluster has: H100)"
        );
        assert_eq!(
            never(&s, &demand(3, &[], Milli(500))),
            "needs 3 nodes but this cluster has 2 nodes"
        );
        assert_eq!(
            never(&s, &demand(1, &[], Milli::from_units(32))),
            "needs 32 CPUs on one node but the largest node has 16 CPUs"
        );
        assert_eq!(
            never(&s, &demand(1, &[("H100", 4000)], Milli::from_units(12))),
            "no node has H100:4 and 12 CPUs at once"
        );
        assert_eq!(
            never(&s, &demand(2, &[("H100", 3000)], Milli::ZERO)),
            "needs 2 nodes with H100:3 each but only 1 node of this cluster can hold that"
        );
        assert_eq!(
            never(
                &s,
                &demand(1, &[("A100", 1000), ("H100", 8000)], Milli::ZERO)
            ),
            "no node has accelerator 'A100' (this cluster has: H100); \
             needs 8x H100 on one node but the largest node has 4 H100"
        );
        assert!(never(&s, &gpu("H100", 1500)).contains("invalid"));
        assert!(never(&s, &demand(0, &[], Milli::ZERO)).contains("at least 1"));
        // Fits somewhere: an unknown alternative does not matter.
        assert!(s
            .check_fits_ever(&demand(1, &[("A100", 1000), ("h100", 4000)], Milli::ONE))
            .is_ok());
        assert!(s.check_fits_ever(&gpu("H100", 250)).is_ok());
        let cpu_only = Scheduler::new(vec![node("c", &[], 4)]);
        assert_eq!(
            never(&cpu_only, &gpu("T4", 1000)),
            "no node has accelerator 'T4' (this cluster has no accelerators)"
        );
    }

    #[test]
    fn restore_checks() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 2)], 4)]);
        let grant = |index: u32, share: u64, cpus: u64| Placement {
            nodes: vec![NodeGrant {
                node: 0,
                accelerator: Some("H100".into()),
                gpus: vec![GpuGrant {
                    index,
                    share: Milli(share),
                }],
                cpus: Milli(cpus),
            }],
        };
        s.enqueue(7, gpu("H100", 500));
        s.restore(7, &grant(1, 500, 500)).unwrap();
        assert!(!s.is_pending(7));
        assert_eq!(s.running_placement(7), Some(&grant(1, 500, 500)));
        assert!(s.restore(7, &grant(0, 500, 0)).is_err(), "already running");
        let err = s.restore(8, &grant(1, 1000, 0)).unwrap_err();
        assert!(err.to_string().contains("oversubscribe GPU 1"), "{err}");
        assert!(s.restore(8, &grant(5, 500, 0)).is_err(), "unknown GPU");
        assert!(s.restore(8, &grant(0, 500, 4000)).is_err(), "CPUs");
        let mut far = grant(0, 500, 0);
        far.nodes[0].node = 3;
        assert!(s.restore(8, &far).is_err(), "unknown node");
        // Failed restores changed nothing.
        assert_eq!(s.running_len(), 1);
        assert_eq!(
            s.usage()[0].gpu_used,
            vec![(0, Milli::ZERO), (1, Milli(500))]
        );
        s.restore(8, &grant(1, 500, 500)).unwrap();
        assert_eq!(s.usage()[0].gpu_used[1], (1, Milli::ONE));
        assert_eq!(s.usage()[0].jobs, 2);
        s.release(7);
        s.release(8);
        s.release(8);
        assert_eq!(
            s.usage()[0],
            NodeUsage {
                gpu_used: vec![(0, Milli::ZERO), (1, Milli::ZERO)],
                cpus_used: Milli::ZERO,
                jobs: 0
            }
        );
    }

    #[test]
    fn dequeue_pending_only() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 1)], 4)]);
        s.enqueue(1, gpu("H100", 1000));
        s.enqueue(2, gpu("H100", 1000));
        s.enqueue(3, gpu("H100", 1000));
        s.schedule();
        assert!(!s.dequeue(1), "running, not pending");
        assert!(s.dequeue(2));
        assert!(!s.dequeue(2));
        assert!(!s.dequeue(99));
        s.release(1);
        assert_eq!(ids(&s.schedule()), vec![3]);
        assert_eq!(s.pending_len(), 0);
        assert!(s.groups.is_empty() && s.shape_ids.is_empty());
    }

    #[test]
    fn unsorted_gpu_indices() {
        let mut n = node("n0", &[("H100", 3)], 4);
        n.gpus.reverse();
        let mut s = Scheduler::new(vec![n]);
        s.enqueue(1, gpu("H100", 2000));
        assert_eq!(gpu_indices(&s.schedule()[0].1), vec![0, 1]);
        let idx: Vec<u32> = s.usage()[0].gpu_used.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, vec![0, 1, 2]);
    }

    // ---- property tests ----------------------------------------------------

    #[derive(Clone, Debug)]
    enum Op {
        /// Enqueue the demand at this position of the case's palette (so shapes repeat).
        Enqueue(usize),
        Release(usize),
        Dequeue(usize),
        SetAvailable(usize, bool),
    }

    fn cluster_strategy() -> impl Strategy<Value = Vec<NodeCapacity>> {
        let node = (
            prop::collection::vec(any::<bool>(), 0..=8),
            any::<bool>(),
            1u64..=16,
        )
            .prop_map(|(kinds, reversed, cpus)| {
                let n = kinds.len() as u32;
                let mut gpus: Vec<GpuSlot> = kinds
                    .iter()
                    .enumerate()
                    .map(|(i, h)| GpuSlot {
                        index: i as u32,
                        kind: if *h { "H100" } else { "A100" }.to_string(),
                    })
                    .collect();
                if reversed {
                    gpus.reverse();
                }
                NodeCapacity {
                    name: format!("node-{n}"),
                    gpus,
                    cpus: Milli::from_units(cpus),
                    available: true,
                    unknown: false,
                }
            });
        prop::collection::vec(node, 1..=4)
    }

    fn demand_strategy() -> impl Strategy<Value = Demand> {
        let alt = (
            prop::sample::select(vec!["H100", "h100", "A100", "T4"]),
            prop::sample::select(vec![250u64, 500, 1000, 2000, 3000, 4000, 8000]),
        )
            .prop_map(|(k, m)| accel(k, m));
        (
            1u32..=3,
            prop::collection::vec(alt, 0..=2),
            prop::sample::select(vec![0u64, 250, 500, 1000, 2000, 4000]),
        )
            .prop_map(|(num_nodes, accelerators, cpus)| Demand {
                num_nodes,
                per_node: NodeDemand {
                    accelerators,
                    cpus: Milli(cpus),
                },
            })
    }

    fn op_strategy() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => any::<usize>().prop_map(Op::Enqueue),
            3 => any::<usize>().prop_map(Op::Release),
            1 => any::<usize>().prop_map(Op::Dequeue),
            1 => (0usize..4, any::<bool>()).prop_map(|(n, a)| Op::SetAvailable(n, a)),
        ]
    }

    /// Used shares recomputed from placements only: (per (node, gpu index), per node cpus).
    fn recompute(
        cluster: &[NodeCapacity],
        running: &BTreeMap<JobId, (Demand, Placement)>,
    ) -> (BTreeMap<(usize, u32), u64>, Vec<u64>) {
        let mut gpus = BTreeMap::new();
        let mut cpus = vec![0u64; cluster.len()];
        for (_, p) in running.values() {
            for ng in &p.nodes {
                cpus[ng.node] += ng.cpus.0;
                for g in &ng.gpus {
                    *gpus.entry((ng.node, g.index)).or_insert(0) += g.share.0;
                }
            }
        }
        (gpus, cpus)
    }

    /// Independent "does it fit right now" check.
    fn naive_fits(
        cluster: &[NodeCapacity],
        avail: &[bool],
        gpus: &BTreeMap<(usize, u32), u64>,
        cpus: &[u64],
        d: &Demand,
    ) -> bool {
        let mut ok = 0;
        for (i, n) in cluster.iter().enumerate() {
            if !avail[i] || cpus[i] + d.per_node.cpus.0 > n.cpus.0 {
                continue;
            }
            let used = |idx: u32| gpus.get(&(i, idx)).copied().unwrap_or(0);
            let accel_ok = d.per_node.accelerators.is_empty()
                || d.per_node.accelerators.iter().any(|a| {
                    let matching = n
                        .gpus
                        .iter()
                        .filter(|g| g.kind.to_lowercase() == a.kind.to_lowercase());
                    if a.count.0 < 1000 {
                        matching.clone().any(|g| used(g.index) + a.count.0 <= 1000)
                    } else {
                        matching.filter(|g| used(g.index) == 0).count() as u64 >= a.count.0 / 1000
                    }
                });
            if accel_ok {
                ok += 1;
            }
        }
        ok >= d.num_nodes as usize
    }

    /// Invariant 3: the placement grants exactly the demand.
    fn check_grant(cluster: &[NodeCapacity], avail: &[bool], d: &Demand, p: &Placement) {
        assert_eq!(p.nodes.len(), d.num_nodes as usize, "node count");
        for w in p.nodes.windows(2) {
            assert!(w[0].node < w[1].node, "distinct nodes in rank order");
        }
        for ng in &p.nodes {
            assert!(avail[ng.node], "placed on an unavailable node");
            assert_eq!(ng.cpus, d.per_node.cpus);
            let n = &cluster[ng.node];
            if d.per_node.accelerators.is_empty() {
                assert!(ng.accelerator.is_none() && ng.gpus.is_empty());
                continue;
            }
            let kind = ng.accelerator.as_deref().expect("accelerator recorded");
            let kind_of = |idx: u32| {
                n.gpus
                    .iter()
                    .find(|g| g.index == idx)
                    .map(|g| g.kind.to_lowercase())
                    .expect("granted GPU exists")
            };
            let matches_alt = d.per_node.accelerators.iter().any(|a| {
                if a.kind.to_lowercase() != kind.to_lowercase() {
                    return false;
                }
                let kinds_ok = ng
                    .gpus
                    .iter()
                    .all(|g| kind_of(g.index) == a.kind.to_lowercase());
                let distinct: BTreeSet<u32> = ng.gpus.iter().map(|g| g.index).collect();
                let shape_ok = if a.count.0 < 1000 {
                    ng.gpus.len() == 1 && ng.gpus[0].share == a.count
                } else {
                    ng.gpus.len() as u64 == a.count.0 / 1000
                        && distinct.len() == ng.gpus.len()
                        && ng.gpus.iter().all(|g| g.share == Milli::ONE)
                };
                kinds_ok && shape_ok
            });
            assert!(matches_alt, "grant {ng:?} does not match {d:?}");
        }
    }

    fn run_ops(cluster: Vec<NodeCapacity>, palette: Vec<Demand>, ops: Vec<Op>) {
        let mut s = Scheduler::new(cluster.clone());
        let cluster = s.nodes().to_vec();
        let mut avail = vec![true; cluster.len()];
        let mut pending: BTreeMap<JobId, Demand> = BTreeMap::new();
        let mut running: BTreeMap<JobId, (Demand, Placement)> = BTreeMap::new();
        let mut gone: BTreeSet<JobId> = BTreeSet::new();
        let mut next_id: JobId = 1;
        for op in ops {
            match op {
                Op::Enqueue(i) => {
                    let d = palette[i % palette.len()].clone();
                    s.enqueue(next_id, d.clone());
                    pending.insert(next_id, d);
                    next_id += 1;
                }
                Op::Release(i) => {
                    if !running.is_empty() {
                        let id = *running.keys().nth(i % running.len()).unwrap();
                        running.remove(&id);
                        s.release(id);
                        gone.insert(id);
                    }
                }
                Op::Dequeue(i) => {
                    if pending.is_empty() {
                        assert!(!s.dequeue(next_id + 5));
                    } else {
                        let id = *pending.keys().nth(i % pending.len()).unwrap();
                        pending.remove(&id);
                        assert!(s.dequeue(id));
                        gone.insert(id);
                    }
                }
                Op::SetAvailable(n, a) => {
                    if n < avail.len() {
                        avail[n] = a;
                    }
                    s.set_available(n, a);
                }
            }
            // The grouped pass must equal the plain oldest-first walk.
            let expected = s.clone().schedule_naive();
            let started = s.schedule();
            assert_eq!(
                started, expected,
                "grouped schedule differs from naive walk"
            );
            for w in started.windows(2) {
                assert!(w[0].0 < w[1].0, "started oldest first");
            }
            for (id, p) in started {
                let d = pending.remove(&id).expect("started job was pending");
                check_grant(&cluster, &avail, &d, &p);
                running.insert(id, (d, p));
            }

            // (1) no oversubscription, recomputed from placements.
            let (gpus, cpus) = recompute(&cluster, &running);
            for (&(node, _), &used) in &gpus {
                assert!(used <= 1000, "GPU oversubscribed on node {node}");
            }
            for (i, n) in cluster.iter().enumerate() {
                assert!(cpus[i] <= n.cpus.0, "CPUs oversubscribed on node {i}");
            }
            // Internal counters agree.
            for (i, u) in s.usage().iter().enumerate() {
                assert_eq!(u.cpus_used.0, cpus[i]);
                assert_eq!(u.gpu_used.len(), cluster[i].gpus.len());
                for (idx, used) in &u.gpu_used {
                    assert_eq!(used.0, gpus.get(&(i, *idx)).copied().unwrap_or(0));
                }
                let jobs = running
                    .values()
                    .filter(|(_, p)| p.nodes.iter().any(|n| n.node == i))
                    .count();
                assert_eq!(u.jobs, jobs);
            }
            // (2) work-conserving.
            for (id, d) in &pending {
                assert!(
                    !naive_fits(&cluster, &avail, &gpus, &cpus, d),
                    "job {id} fits but waits: {d:?}"
                );
            }
            // (4) pending xor running, nothing lost.
            assert_eq!(s.pending_len(), pending.len());
            assert_eq!(s.running_len(), running.len());
            for (id, d) in &pending {
                assert!(s.is_pending(*id) && s.running_placement(*id).is_none());
                assert_eq!(s.pending_demand(*id), Some(d));
            }
            for (id, (_, p)) in &running {
                assert!(!s.is_pending(*id));
                assert_eq!(s.running_placement(*id), Some(p));
            }
            for id in &gone {
                assert!(!s.is_pending(*id) && s.running_placement(*id).is_none());
            }
            assert_eq!(
                (pending.len() + running.len() + gone.len()) as u64,
                next_id - 1,
                "ids lost"
            );
        }

        // Restoring every running job into a fresh scheduler reproduces the usage.
        let mut fresh = Scheduler::new(cluster);
        for (id, (_, p)) in &running {
            fresh.restore(*id, p).expect("restore of a valid placement");
        }
        assert_eq!(fresh.usage(), s.usage());
        if let Some((id, (_, p))) = running.iter().next() {
            let mut again = fresh.clone();
            again.release(*id);
            again.restore(*id, p).expect("restore after release");
            // A full GPU cannot take the same whole-GPU grant twice.
            if p.nodes[0].gpus.iter().any(|g| g.share == Milli::ONE) {
                assert!(fresh.restore(id + 1_000_000, p).is_err());
            }
        }
    }

    // ---- starvation bound ---------------------------------------------------

    /// Run time (ticks) of the small jobs in the stream tests.
    const RUN: u64 = 6;

    /// One simulated tick: frees the jobs whose end tick has come.
    fn release_due(s: &mut Scheduler, ends: &mut BTreeMap<JobId, u64>, t: u64) {
        let due: Vec<JobId> = ends
            .iter()
            .filter(|(_, end)| **end <= t)
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            ends.remove(&id);
            s.release(id);
        }
    }

    /// A 4-GPU node fed 1-GPU jobs (each runs `run(id)` ticks) and one 4-GPU job
    /// submitted at tick 2; returns the tick the big job started, if it did within
    /// `ticks`. One small job arrives per tick during ticks 0..4 (so the first ones
    /// end on different ticks); from tick 4 one arrives every tick and more are added
    /// until at least 4 small jobs wait before each pass, enough to refill every GPU.
    /// Checks every tick that no GPU is idle unless the big job holds the reservation.
    fn big_job_in_small_stream(
        bound: Option<u64>,
        run: impl Fn(JobId) -> u64,
        ticks: u64,
    ) -> Option<u64> {
        const BIG_AT: u64 = 2;
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 26)]);
        s.set_starvation_bound(bound);
        let mut ends: BTreeMap<JobId, u64> = BTreeMap::new();
        let mut next: JobId = 1;
        let mut big = None;
        let mut big_started = None;
        for t in 0..ticks {
            release_due(&mut s, &mut ends, t);
            if t == BIG_AT {
                s.enqueue_at(next, gpu("H100", 4000), t);
                big = Some(next);
                next += 1;
            }
            let big_waits = big.is_some_and(|id| s.is_pending(id));
            let mut arrived = 0;
            while arrived == 0 || (t >= 4 && s.pending_len() - usize::from(big_waits) < 4) {
                s.enqueue_at(next, gpu("H100", 1000), t);
                next += 1;
                arrived += 1;
            }
            for (id, p) in s.schedule_at(t) {
                if Some(id) == big {
                    assert_eq!(gpu_indices(&p), vec![0, 1, 2, 3]);
                    big_started = Some(t);
                    ends.insert(id, t + 10);
                } else {
                    ends.insert(id, t + run(id));
                }
            }
            let idle = s.usage()[0]
                .gpu_used
                .iter()
                .filter(|(_, used)| *used == Milli::ZERO)
                .count();
            match s.reservation() {
                // While the big job waits it is the oldest job, so the only holder.
                Some((id, target)) if Some(id) == big => {
                    assert_eq!(gpu_indices(target), vec![0, 1, 2, 3]);
                }
                Some((id, _)) => assert!(big_started.is_some(), "{id} holds before the big job"),
                None => {}
            }
            let big_holds = big.is_some() && s.reservation().map(|r| r.0) == big;
            if t >= 4 && !big_holds {
                assert_eq!(idle, 0, "tick {t}: idle GPU outside a reservation");
            }
        }
        big_started
    }

    /// Without a bound this is SkyPilot's documented behaviour (its job-queue docs:
    /// the scheduler avoids idle resources by starting any queued job that fits, so
    /// a large job can wait behind later small ones): one GPU frees at a time and a
    /// waiting 1-GPU job takes it at once, so the 4-GPU job never finds 4 free GPUs.
    /// With a bound of `B` ticks it starts within `B + RUN` ticks of its submission.
    #[test]
    fn starvation_bound_rescues_big_job() {
        assert_eq!(big_job_in_small_stream(None, |_| RUN, 1_000), None);
        // A bound so large it never triggers is plain backfill too.
        assert_eq!(big_job_in_small_stream(Some(10_000), |_| RUN, 1_000), None);
        let varied = |id: JobId| 1 + id * 7 % RUN; // 1..=RUN
        for bound in [0, 1, 5, 17, 50, 200] {
            for (name, started) in [
                (
                    "fixed",
                    big_job_in_small_stream(Some(bound), |_| RUN, 1_000),
                ),
                (
                    "varied",
                    big_job_in_small_stream(Some(bound), varied, 1_000),
                ),
            ] {
                let t = started.unwrap_or_else(|| panic!("{name} B={bound}: never started"));
                let waited = t - 2;
                assert!(
                    waited > bound && waited <= bound + RUN,
                    "{name} B={bound}: started after {waited} ticks"
                );
            }
        }
    }

    /// With only 1-GPU jobs (no big job) and a bound that small jobs do exceed, no
    /// GPU is ever idle while a job waits: a 1-GPU holder starts on the first GPU that
    /// frees, before any backfill.
    #[test]
    fn starvation_bound_stays_work_conserving() {
        for bound in [0, 3, 20] {
            let mut s = Scheduler::new(vec![
                node("n0", &[("H100", 4)], 26),
                node("n1", &[("H100", 4)], 26),
            ]);
            s.set_starvation_bound(Some(bound));
            let mut ends: BTreeMap<JobId, u64> = BTreeMap::new();
            let mut next: JobId = 1;
            let mut rng: u64 = 0x2545_f491_4f6c_dd1d;
            let (mut waited_ticks, mut reserved_ticks) = (0, 0);
            for t in 0..2_000u64 {
                release_due(&mut s, &mut ends, t);
                rng = rng
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                // Alternating overload (2.5 jobs a tick) and underload (1.5) phases
                // against a throughput of 8 GPUs / 5 ticks.
                let overload = u64::from((t / 200) % 2 == 0);
                for _ in 0..(rng >> 62) + overload {
                    s.enqueue_at(next, gpu("H100", 1000), t);
                    next += 1;
                }
                for (id, _) in s.schedule_at(t) {
                    ends.insert(id, t + 2 + (id * 13) % 7);
                }
                if s.pending_len() > 0 {
                    waited_ticks += 1;
                    for u in s.usage() {
                        for (idx, used) in &u.gpu_used {
                            assert_eq!(*used, Milli::ONE, "B={bound} tick {t}: GPU {idx} idle");
                        }
                    }
                }
                if s.reservation().is_some() {
                    reserved_ticks += 1;
                }
            }
            assert!(
                waited_ticks > 100,
                "B={bound}: the stream saturates the cluster"
            );
            assert!(reserved_ticks > 0, "B={bound}: the guard was active");
        }
    }

    #[test]
    fn reservation_blocks_only_reserved_resources() {
        let mut s = Scheduler::new(vec![
            node("n0", &[("H100", 4)], 8),
            node("n1", &[("H100", 4)], 8),
        ]);
        s.set_starvation_bound(Some(10));
        let one = |node: usize, index: u32| Placement {
            nodes: vec![NodeGrant {
                node,
                accelerator: Some("H100".into()),
                gpus: vec![GpuGrant {
                    index,
                    share: Milli::ONE,
                }],
                cpus: DEFAULT_JOB_CPUS,
            }],
        };
        s.restore(1, &one(0, 0)).unwrap();
        s.restore(2, &one(1, 0)).unwrap();
        s.restore(3, &one(1, 1)).unwrap();
        s.enqueue_at(10, gpu("H100", 4000), 0);
        assert!(s.schedule_at(10).is_empty());
        assert_eq!(s.reservation(), None, "waited 10, not more than 10");
        assert!(s.schedule_at(11).is_empty());
        // n0 has the least in use (1 GPU against 2).
        let (holder, target) = s.reservation().expect("reserved");
        assert_eq!(holder, 10);
        assert_eq!(target.nodes.len(), 1);
        assert_eq!(target.nodes[0].node, 0);
        assert_eq!(gpu_indices(target), vec![0, 1, 2, 3]);
        // Small jobs backfill outside the reservation only.
        for id in 20..=24 {
            s.enqueue_at(id, gpu("H100", 1000), 11);
        }
        let started = s.schedule_at(11);
        assert_eq!(ids(&started), vec![20, 21]);
        assert!(started.iter().all(|(_, p)| p.nodes[0].node == 1));
        // Plain `schedule` ignores the reservation.
        let mut plain = s.clone();
        assert_eq!(ids(&plain.schedule()), vec![22, 23, 24]);
        assert_eq!(plain.reservation().map(|r| r.0), Some(10));
        // The holder starts as soon as the reservation drains.
        s.release(1);
        let started = s.schedule_at(12);
        assert_eq!(ids(&started), vec![10]);
        assert_eq!(gpu_indices(&started[0].1), vec![0, 1, 2, 3]);
        assert_eq!(s.reservation(), None);
        // Without a holder the rest backfills as before.
        s.release(20);
        assert_eq!(ids(&s.schedule_at(12)), vec![22]);
    }

    #[test]
    fn reservation_keeps_the_holders_cpus() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 4)], 8)]);
        s.set_starvation_bound(Some(0));
        s.enqueue_at(1, demand(1, &[("H100", 1000)], Milli::from_units(1)), 0);
        assert_eq!(ids(&s.schedule_at(0)), vec![1]);
        s.enqueue_at(2, demand(1, &[("H100", 4000)], Milli::from_units(6)), 0);
        assert!(s.schedule_at(1).is_empty());
        assert_eq!(s.reservation().map(|r| r.0), Some(2));
        // 8 CPUs: the holder keeps 6 and job 1 uses 1, so one more CPU is free.
        s.enqueue_at(3, demand(1, &[], Milli::from_units(2)), 1);
        s.enqueue_at(4, demand(1, &[], Milli::from_units(1)), 1);
        s.enqueue_at(5, demand(1, &[], Milli::from_units(1)), 1);
        s.enqueue_at(6, demand(1, &[("H100", 500)], Milli::ZERO), 1);
        assert_eq!(ids(&s.schedule_at(1)), vec![4]);
        assert_eq!(s.usage()[0].cpus_used, Milli::from_units(2));
        s.release(1);
        s.release(4);
        // The holder starts first, then the rest fill what it leaves.
        assert_eq!(ids(&s.schedule_at(2)), vec![2, 3]);

        // Running jobs already use more CPUs than the holder leaves: a job that asks
        // no CPUs may still take an unreserved GPU there, one that asks any may not.
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 6)], 8)]);
        s.set_starvation_bound(Some(0));
        s.enqueue_at(1, demand(1, &[("H100", 1000)], Milli::from_units(3)), 0);
        assert_eq!(ids(&s.schedule_at(0)), vec![1]);
        s.enqueue_at(2, demand(1, &[("H100", 4000)], Milli::from_units(6)), 0);
        s.enqueue_at(3, demand(1, &[("H100", 1000)], Milli::from_units(1)), 1);
        s.enqueue_at(4, demand(1, &[("H100", 1000)], Milli::ZERO), 1);
        s.enqueue_at(5, demand(1, &[], Milli::from_units(1)), 1);
        let started = s.schedule_at(1);
        let (holder, target) = s.reservation().expect("reserved");
        assert_eq!(holder, 2);
        assert_eq!(gpu_indices(target), vec![1, 2, 3, 4], "the idle GPUs");
        assert_eq!(ids(&started), vec![4]);
        assert_eq!(gpu_indices(&started[0].1), vec![5]);
        s.release(1);
        let started = s.schedule_at(2);
        assert_eq!(ids(&started), vec![2, 3, 5]);
        assert_eq!(gpu_indices(&started[0].1), vec![0, 1, 2, 3]);
    }

    #[test]
    fn one_holder_at_a_time_oldest_first() {
        let mut s = Scheduler::new(vec![node("n0", &[("H100", 2)], 8)]);
        s.set_starvation_bound(Some(5));
        s.enqueue_at(1, gpu("H100", 1000), 0);
        assert_eq!(ids(&s.schedule_at(0)), vec![1]);
        s.enqueue_at(2, gpu("H100", 2000), 1);
        s.enqueue_at(3, gpu("H100", 2000), 2);
        s.enqueue_at(4, gpu("H100", 1000), 2);
        // Not starving yet: plain backfill.
        assert_eq!(ids(&s.schedule_at(6)), vec![4]);
        s.release(4);
        s.enqueue_at(5, gpu("H100", 1000), 7);
        assert!(s.schedule_at(7).is_empty(), "job 2 holds GPU 1");
        assert_eq!(s.reservation().map(|r| r.0), Some(2));
        // A job restored with an older submission time takes over.
        s.enqueue_at(9, gpu("H100", 2000), 0);
        assert!(s.schedule_at(8).is_empty());
        assert_eq!(s.reservation().map(|r| r.0), Some(9));
        // Cancelling the holder drops the reservation; the next oldest takes it.
        assert!(s.dequeue(9));
        assert_eq!(s.reservation(), None);
        assert!(s.schedule_at(8).is_empty());
        assert_eq!(s.reservation().map(|r| r.0), Some(2));
        s.release(1);
        assert_eq!(ids(&s.schedule_at(9)), vec![2]);
        assert_eq!(s.reservation().map(|r| r.0), Some(3));
        // Clearing the bound drops the reservation: plain backfill again.
        s.set_starvation_bound(None);
        assert_eq!(s.reservation(), None);
        s.release(2);
        assert_eq!(ids(&s.schedule_at(10)), vec![3]);
        assert_eq!(s.waiting_since(5), Some(7));
        assert_eq!(s.waiting_since(3), None);
        assert_eq!(
            s.oldest_waiting_since(),
            s.pending_ids().filter_map(|id| s.waiting_since(id)).min()
        );
    }

    #[test]
    fn unreservable_starving_job_blocks_nothing() {
        let mut s = Scheduler::new(vec![
            node("n0", &[("H100", 2)], 8),
            node("n1", &[("H100", 2)], 8),
        ]);
        s.set_starvation_bound(Some(0));
        s.set_available(1, false);
        s.enqueue_at(1, demand(2, &[("H100", 1000)], Milli::ZERO), 0);
        s.enqueue_at(2, gpu("H100", 1000), 0);
        s.enqueue_at(3, gpu("H100", 2000), 0);
        // Job 1 cannot run while n1 is down, so it reserves nothing; job 2 starts and
        // job 3 (starving, does not fit) holds the reservation.
        assert_eq!(ids(&s.schedule_at(5)), vec![2]);
        assert_eq!(s.reservation().map(|r| r.0), Some(3));
        // Its target is on an available node; when n1 returns job 1 is older and fits.
        s.set_available(1, true);
        assert_eq!(ids(&s.schedule_at(6)), vec![1]);
        assert_eq!(s.reservation().map(|r| r.0), Some(3));
    }

    #[derive(Clone, Debug)]
    enum GuardOp {
        Enqueue(usize),
        /// Enqueue with a submission time this many ms in the past (a restored job).
        EnqueueOld(usize, u64),
        Release(usize),
        Dequeue(usize),
        SetAvailable(usize, bool),
        Advance(u64),
        SetBound(Option<u64>),
    }

    fn guard_op_strategy() -> impl Strategy<Value = GuardOp> {
        prop_oneof![
            6 => any::<usize>().prop_map(GuardOp::Enqueue),
            1 => (any::<usize>(), 0u64..=40).prop_map(|(i, age)| GuardOp::EnqueueOld(i, age)),
            3 => any::<usize>().prop_map(GuardOp::Release),
            1 => any::<usize>().prop_map(GuardOp::Dequeue),
            1 => (0usize..4, any::<bool>()).prop_map(|(n, a)| GuardOp::SetAvailable(n, a)),
            4 => (0u64..=15).prop_map(GuardOp::Advance),
            1 => prop::option::weighted(0.8, 0u64..=30).prop_map(GuardOp::SetBound),
        ]
    }

    fn run_guarded_ops(
        cluster: Vec<NodeCapacity>,
        palette: Vec<Demand>,
        ops: Vec<GuardOp>,
        bound: Option<u64>,
    ) {
        let mut s = Scheduler::new(cluster.clone());
        s.set_starvation_bound(bound);
        let mut bound = bound;
        let mut avail = vec![true; cluster.len()];
        let mut now: u64 = 50;
        let mut pending: BTreeMap<JobId, (Demand, u64)> = BTreeMap::new();
        let mut running: BTreeMap<JobId, (Demand, Placement)> = BTreeMap::new();
        let mut next_id: JobId = 1;
        let empty_gpus = BTreeMap::new();
        let no_cpus = vec![0u64; cluster.len()];
        for op in ops {
            match op {
                GuardOp::Enqueue(i) | GuardOp::EnqueueOld(i, _) => {
                    let since = match op {
                        GuardOp::EnqueueOld(_, age) => now.saturating_sub(age),
                        _ => now,
                    };
                    let d = palette[i % palette.len()].clone();
                    s.enqueue_at(next_id, d.clone(), since);
                    pending.insert(next_id, (d, since));
                    next_id += 1;
                }
                GuardOp::Release(i) => {
                    if let Some(id) = running.keys().nth(i % running.len().max(1)).copied() {
                        running.remove(&id);
                        s.release(id);
                    }
                }
                GuardOp::Dequeue(i) => {
                    if let Some(id) = pending.keys().nth(i % pending.len().max(1)).copied() {
                        pending.remove(&id);
                        assert!(s.dequeue(id));
                    }
                }
                GuardOp::SetAvailable(n, a) => {
                    if n < avail.len() {
                        avail[n] = a;
                    }
                    s.set_available(n, a);
                }
                GuardOp::Advance(dt) => now += dt,
                GuardOp::SetBound(b) => {
                    bound = b;
                    s.set_starvation_bound(b);
                }
            }
            let before = s.reservation().map(|(id, p)| (id, p.clone()));

            // Grouped pass == naive walk (and == plain backfill with no bound).
            let mut naive = s.clone();
            let expected = naive.schedule_at_naive(now);
            let plain = bound.is_none().then(|| s.clone().schedule_naive());
            let started = s.schedule_at(now);
            assert_eq!(
                started, expected,
                "grouped schedule_at differs from naive walk"
            );
            assert_eq!(s.reservation(), naive.reservation());
            if let Some(plain) = plain {
                assert_eq!(started, plain, "no bound: schedule_at is plain backfill");
            }
            for (id, p) in started {
                let (d, _) = pending.remove(&id).expect("started job was pending");
                check_grant(&cluster, &avail, &d, &p);
                running.insert(id, (d, p));
            }

            // No oversubscription; internal counters agree.
            let (mut gpus, mut cpus) = recompute(&cluster, &running);
            for (&(node, _), &used) in &gpus {
                assert!(used <= 1000, "GPU oversubscribed on node {node}");
            }
            for (i, n) in cluster.iter().enumerate() {
                assert!(cpus[i] <= n.cpus.0, "CPUs oversubscribed on node {i}");
            }
            for (i, u) in s.usage().iter().enumerate() {
                assert_eq!(u.cpus_used.0, cpus[i]);
                for (idx, used) in &u.gpu_used {
                    assert_eq!(used.0, gpus.get(&(i, *idx)).copied().unwrap_or(0));
                }
            }
            // Pending xor running.
            assert_eq!(s.pending_len(), pending.len());
            assert_eq!(s.running_len(), running.len());
            for (id, (d, since)) in &pending {
                assert!(s.is_pending(*id) && s.running_placement(*id).is_none());
                assert_eq!(s.pending_demand(*id), Some(d));
                assert_eq!(s.waiting_since(*id), Some(*since));
                assert_eq!(
                    s.oldest_waiting_since(),
                    pending.values().map(|(_, since)| *since).min()
                );
            }
            for (id, (_, p)) in &running {
                assert!(!s.is_pending(*id));
                assert_eq!(s.running_placement(*id), Some(p));
            }

            // The holder is the longest-waiting starving job that could run on the
            // available nodes if they were empty.
            let mut starving: Vec<(u64, JobId)> = match bound {
                Some(b) => pending
                    .iter()
                    .filter(|(_, (_, since))| now.saturating_sub(*since) > b)
                    .map(|(id, (_, since))| (*since, *id))
                    .collect(),
                None => Vec::new(),
            };
            starving.sort();
            let want = starving
                .iter()
                .map(|(_, id)| *id)
                .find(|id| naive_fits(&cluster, &avail, &empty_gpus, &no_cpus, &pending[id].0));
            assert_eq!(s.reservation().map(|(id, _)| id), want, "wrong holder");

            if let Some((holder, target)) = s.reservation() {
                let d = &pending[&holder].0;
                check_grant(&cluster, &avail, d, target);
                assert!(
                    !naive_fits(&cluster, &avail, &gpus, &cpus, d),
                    "holder {holder} fits but waits"
                );
                // A holder keeps its target while its nodes stay available.
                if let Some((was, old)) = &before {
                    if *was == holder && old.nodes.iter().all(|ng| avail[ng.node]) {
                        assert_eq!(old, target, "target moved");
                    }
                }
                // Subtract the reservation: its GPUs whole, its CPUs on its nodes.
                for ng in &target.nodes {
                    cpus[ng.node] = (cpus[ng.node] + ng.cpus.0).min(cluster[ng.node].cpus.0);
                    for g in &ng.gpus {
                        gpus.insert((ng.node, g.index), 1000);
                    }
                }
            }
            // Work-conserving outside the reservation.
            for (id, (d, _)) in &pending {
                assert!(
                    !naive_fits(&cluster, &avail, &gpus, &cpus, d),
                    "job {id} fits outside the reservation but waits: {d:?}"
                );
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn guarded_streams_keep_invariants(
            cluster in cluster_strategy(),
            palette in prop::collection::vec(demand_strategy(), 1..=5),
            ops in prop::collection::vec(guard_op_strategy(), 1..60),
            bound in prop::option::weighted(0.85, 0u64..=30),
        ) {
            run_guarded_ops(cluster, palette, ops, bound);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_streams_keep_invariants(
            cluster in cluster_strategy(),
            palette in prop::collection::vec(demand_strategy(), 1..=5),
            ops in prop::collection::vec(op_strategy(), 1..40),
        ) {
            run_ops(cluster, palette, ops);
        }

        #[test]
        fn fits_ever_agrees_with_empty_cluster(
            cluster in cluster_strategy(),
            d in demand_strategy(),
        ) {
            let mut s = Scheduler::new(cluster);
            let ever = s.check_fits_ever(&d).is_ok();
            s.enqueue(1, d);
            let now = !s.schedule().is_empty();
            prop_assert_eq!(ever, now);
        }
    }
}
