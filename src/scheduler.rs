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

use crate::resources::{AccelDemand, Demand, Milli, NodeDemand};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

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
    if cpus_after > cap.cpus {
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
/// not fit. Pure, so a future starvation guard can call it on a view with a
/// reservation for the oldest job subtracted.
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
}

impl Scheduler {
    /// A scheduler for these nodes, all idle. Each node's GPUs are sorted by index;
    /// a repeated index on one node is dropped (the first one is kept).
    pub fn new(nodes: Vec<NodeCapacity>) -> Self {
        let nodes: Vec<NodeCapacity> = nodes
            .into_iter()
            .map(|mut n| {
                n.gpus.sort_by_key(|g| g.index);
                n.gpus.dedup_by_key(|g| g.index);
                n
            })
            .collect();
        let state = nodes.iter().map(NodeState::empty).collect();
        Scheduler {
            nodes,
            state,
            pending: BTreeMap::new(),
            shape_ids: HashMap::new(),
            groups: BTreeMap::new(),
            next_shape: 0,
            running: BTreeMap::new(),
        }
    }

    pub fn nodes(&self) -> &[NodeCapacity] {
        &self.nodes
    }

    /// `Err(Unfit::Never)` if `d` could not run on this cluster even when it is
    /// empty (unavailable nodes count: they may come back).
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
            .filter(|(i, cap)| fit_node(*i, cap, &NodeState::empty(cap), nd).is_some())
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

    /// Adds a pending job. An id that is already pending or running is ignored.
    pub fn enqueue(&mut self, id: JobId, d: Demand) {
        if self.pending.contains_key(&id) || self.running.contains_key(&id) {
            return;
        }
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
    /// Shapes are merged by their oldest pending id through a heap; a shape whose
    /// job did not fit is dropped for the rest of the pass, so the cost is about
    /// `shapes * log(shapes)` plus the work for jobs that start.
    ///
    /// Extension point for a starvation guard: before the loop, place the job that
    /// waited too long on a capacity view and subtract that reservation from the
    /// view other jobs are placed on (see the private `place`).
    pub fn schedule(&mut self) -> Vec<(JobId, Placement)> {
        let mut heap: BinaryHeap<Reverse<(JobId, ShapeId)>> = self
            .groups
            .iter()
            .filter_map(|(sid, g)| g.ids.first().map(|id| Reverse((*id, *sid))))
            .collect();
        let mut started = Vec::new();
        while let Some(Reverse((id, sid))) = heap.pop() {
            let Some(group) = self.groups.get(&sid) else {
                continue;
            };
            let Some(p) = place(&self.nodes, &self.state, &group.demand) else {
                // Capacity only shrinks during a pass: skip the whole shape.
                continue;
            };
            self.dequeue(id);
            if let Some(next) = self.groups.get(&sid).and_then(|g| g.ids.first()) {
                heap.push(Reverse((*next, sid)));
            }
            self.apply(&p);
            self.running.insert(id, p.clone());
            started.push((id, p));
        }
        started
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

    /// Marks a node (un)available for new jobs; running jobs are not touched.
    /// No-op for an unknown node.
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
        for ng in &p.nodes {
            let (Some(cap), Some(st)) = (self.nodes.get(ng.node), self.state.get_mut(ng.node))
            else {
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
