//! Remote nodes: probed at start-up (GPUs, CPUs), health-checked, probed again when one
//! that did not answer at start does, or when a probe could not find out.

use super::*;

/// How often remote nodes are checked (only when the cluster has remote nodes).
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);

/// Asks every remote node, in parallel, whether it answers and (where the cluster file
/// declares none) which GPUs and how many CPUs it has. This also opens the ssh master
/// connection from the daemon, so jobs reuse it instead of paying a handshake. A node that
/// does not answer now is asked again when it does (see [`Daemon::handle_msg`]).
pub(super) fn probe_remote_nodes(inventory: &mut Inventory, ssh_dir: &Path) {
    let probes: Vec<_> = inventory
        .nodes
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let target = SshTarget::of(n, ssh_dir)?;
            let wants = n.wants_probe();
            Some(std::thread::spawn(move || {
                let up = target.run("true", Duration::from_secs(15));
                let probe = match up {
                    Ok(_) => probe_node(&target, wants),
                    Err(_) => NodeProbe::default(),
                };
                (i, up, probe)
            }))
        })
        .collect();
    for p in probes {
        let Ok((i, up, probe)) = p.join() else {
            continue;
        };
        let Some(node) = inventory.nodes.get_mut(i) else {
            continue;
        };
        match up {
            Ok(_) => node.down = None,
            Err(e) => {
                note!("node {} is unreachable: {e}", node.name);
                node.down = Some(format!("unreachable: {e}"));
            }
        }
        node.take_probe(&probe);
        note_probe(node, &probe);
    }
}

/// Asks an ssh node for what `wants` (from [`inventory::Node::wants_probe`]) names: its GPUs,
/// its CPUs.
pub(super) fn probe_node(target: &SshTarget, (gpus, cpus): (bool, bool)) -> NodeProbe {
    NodeProbe {
        gpus: gpus.then(|| target.probe_gpus()),
        cpus: cpus.then(|| target.probe_cpus()),
    }
}

/// Writes `nodes.json`, the inventory for `skyspool check`: at start, and whenever a node
/// goes down or comes back or a probe finds its GPUs and CPUs.
pub(super) fn write_nodes_json(spool: &Spool, inventory: &Inventory) -> anyhow::Result<()> {
    let json = serde_json::to_vec_pretty(inventory).context("encoding the inventory")?;
    spool::write_atomic(spool.root(), "nodes.json", &json, false)?;
    Ok(())
}

/// Says in the daemon's log what a node's probe left unknown.
pub(super) fn note_probe(node: &inventory::Node, probe: &NodeProbe) {
    if let Some(Err(e)) = &probe.gpus {
        note!(
            "node {}: could not ask for its GPUs ({e}): no job goes there until they are \
             found; asked again at the next health check (or give `accelerators` in the \
             cluster file)",
            node.name
        );
    }
    if let Some(Err(e)) = &probe.cpus {
        note!(
            "node {}: could not count its CPUs ({e}): no job goes there until they are \
             counted; asked again at the next health check (or give `cpus` in the cluster \
             file)",
            node.name
        );
    } else if node.cpus_to_probe {
        note!(
            "node {}: its CPUs are counted when it answers (or give `cpus` in the cluster \
             file): none for jobs until then",
            node.name
        );
    }
}

impl Daemon {
    /// Keeps `nodes.json` up to date after a change to the inventory (a failure leaves the
    /// old one and says so: `skyspool check` then judges by the cluster as it was).
    pub(super) fn inventory_changed(&self) {
        if let Err(e) = write_nodes_json(&self.spool, &self.inventory) {
            note!("could not rewrite nodes.json: {e:#}");
        }
    }

    /// Checks remote nodes every [`HEALTH_INTERVAL`] (blocking ssh calls run off the event
    /// loop); nothing runs when every node is local.
    pub(super) fn start_health_checks(&self) {
        let targets: Vec<(usize, SshTarget)> = self
            .inventory
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| SshTarget::of(n, &self.ssh_dir()).map(|t| (i, t)))
            .collect();
        if targets.is_empty() {
            return;
        }
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(HEALTH_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                for (i, t) in &targets {
                    let t = t.clone();
                    let i = *i;
                    let tx = tx.clone();
                    tokio::task::spawn_blocking(move || {
                        let down = t.run("true", Duration::from_secs(15)).err();
                        let _ = tx.send(Msg::NodeHealth(
                            i,
                            down.map(|e| format!("unreachable: {e}")),
                        ));
                    });
                }
            }
        });
    }
}
