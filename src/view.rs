//! What the daemon shares with its FUSE view: a snapshot of every job record and the
//! `nodes` text, updated after every batch of events, and a way to submit synchronously.
//!
//! The FUSE handlers run on their own threads; they read this snapshot (never stale by more
//! than the batch being processed) and send submissions to the event loop, which answers
//! with the job ID or the rejection reason.

use crate::inventory::Inventory;
use crate::scheduler::{JobId, NodeUsage};
use crate::spool::JobInfo;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex, RwLock};

/// The daemon's state as the mount shows it.
#[derive(Clone, Debug, Default)]
pub struct ViewState {
    pub jobs: BTreeMap<JobId, JobInfo>,
    /// What the `nodes` file shows: the inventory and each node's use. Rendered only
    /// when read through the mount ([`NodesSnapshot::text`]), not after every batch.
    pub nodes: Option<Arc<NodesSnapshot>>,
    pub cluster_name: String,
    /// Bumped after every update.
    pub generation: u64,
}

/// The inventory and its use at one moment.
#[derive(Clone, Debug, PartialEq)]
pub struct NodesSnapshot {
    pub inventory: Inventory,
    pub usage: Vec<NodeUsage>,
}

impl NodesSnapshot {
    /// The text of the `nodes` file.
    pub fn text(&self) -> String {
        self.inventory.render_nodes(&self.usage)
    }
}

/// Shared between the event loop (writer) and FUSE threads (readers).
#[derive(Debug, Default)]
pub struct View {
    state: RwLock<ViewState>,
    changed: (Mutex<u64>, Condvar),
}

impl View {
    pub fn new() -> View {
        View::default()
    }

    /// Reads the snapshot.
    pub fn read<R>(&self, f: impl FnOnce(&ViewState) -> R) -> R {
        match self.state.read() {
            Ok(g) => f(&g),
            Err(poisoned) => f(&poisoned.into_inner()),
        }
    }

    /// Updates the snapshot and wakes everyone waiting for a change.
    pub fn update(&self, f: impl FnOnce(&mut ViewState)) {
        let generation = {
            let mut g = match self.state.write() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            f(&mut g);
            g.generation += 1;
            g.generation
        };
        let (lock, cv) = &self.changed;
        if let Ok(mut gen) = lock.lock() {
            *gen = generation;
        }
        cv.notify_all();
    }

    /// Blocks until the generation passes `seen` or `timeout` elapses; returns the latest.
    pub fn wait_change(&self, seen: u64, timeout: std::time::Duration) -> u64 {
        let (lock, cv) = &self.changed;
        let Ok(guard) = lock.lock() else {
            return seen;
        };
        match cv.wait_timeout_while(guard, timeout, |g| *g <= seen) {
            Ok((g, _)) => *g,
            Err(_) => seen,
        }
    }
}

/// A submission made through the mount, answered by the event loop.
#[derive(Debug)]
pub struct Submission {
    /// The file name it was written under in `incoming/` (single component).
    pub name: String,
    pub yaml: Vec<u8>,
    /// The writer (the FUSE request's uid/gid).
    pub uid: u32,
    pub gid: u32,
    pub reply: std::sync::mpsc::Sender<Result<JobId, String>>,
}

/// The FUSE side's handle on the event loop.
#[derive(Clone, Debug)]
pub struct Submitter {
    pub(crate) tx: tokio::sync::mpsc::UnboundedSender<Submission>,
}

impl Submitter {
    /// Submits and waits for the verdict: the job ID, or the reason it was rejected.
    pub fn submit(&self, name: &str, yaml: Vec<u8>, uid: u32, gid: u32) -> Result<JobId, String> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx
            .send(Submission {
                name: name.to_string(),
                yaml,
                uid,
                gid,
                reply,
            })
            .map_err(|_| "the daemon is shutting down".to_string())?;
        answer
            .recv_timeout(std::time::Duration::from_secs(60))
            .map_err(|_| "the daemon did not answer".to_string())?
    }
}
