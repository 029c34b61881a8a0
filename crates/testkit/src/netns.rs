//! Network namespaces for partition tests (Linux, root, `ip` from iproute2): each node in a
//! namespace of its own, all joined by a bridge in a hub namespace, and one more namespace for
//! the CLI. Cutting a node off brings its cable down at the hub: the node, and any client in
//! its namespace, still reach each other, and nobody else.
//!
//! Finer faults are packet filters (nftables, `nft`) inside the node namespaces: a cut between
//! two nodes ([`Lab::cut_between`]), a cut in one direction only ([`Lab::cut_one_way`]), random
//! loss ([`Lab::flaky`]), and partitions built from cuts ([`Lab::partition`], [`Lab::isolate`],
//! [`Lab::bridge`]). Every rule drops packets *arriving* at a node from another node's address,
//! silently, as a broken network does: a drop on the sending side would fail the sender's
//! `send` at once with EPERM, which no real network does. The CLI's address is never matched,
//! so clients, like Jepsen's, stand outside every partition and still reach each node. A
//! lab's rules live in one table, `inet mendfs_chaos`, in each node namespace it touched, and
//! [`Lab::heal_network`] deletes those tables (and reconnects cut-off nodes). The host's own
//! rules are never read or changed.
//!
//! Nothing is created in the host's own namespace: each veth pair is created with its ends
//! already in their namespaces, the addresses (one random 10.X.Y.0/24) exist only inside them,
//! and dropping the [`Lab`], also on a test's panic, deletes every namespace it made, which
//! removes the rest with them (filter tables included). Namespace names carry the process id
//! and a random tag, so concurrent runs never meet.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use anyhow::{bail, ensure, Context, Result};

use crate::Placement;

/// Per-test namespaces, veths and a bridge; see the module doc.
pub struct Lab {
    /// Every namespace name starts with this.
    tag: String,
    /// The second and third octets of the lab's 10.X.Y.0/24.
    subnet: (u8, u8),
    node_ids: Vec<u64>,
    /// Namespaces made so far, deleted on drop.
    namespaces: Vec<String>,
    /// Nodes whose namespace holds this lab's filter table, for [`Lab::heal_network`].
    filtered: Mutex<BTreeSet<u64>>,
}

/// The nftables table (family `inet`) holding a lab's packet filters in a node namespace.
const FILTER_TABLE: &str = "mendfs_chaos";

/// One filter: packets from node `from` arriving at node `to` are dropped, all of them or
/// `percent` % at random.
#[derive(Debug, Clone, Copy)]
struct PacketDrop {
    from: u64,
    to: u64,
    percent: u8,
}

/// The host part of the CLI namespace's address; nodes get 10 + their id.
const CLIENT_HOST: u8 = 200;

/// Runs `nft -f -` in namespace `netns` with `script` on its stdin (one transaction: all of it
/// applies or none); fails with nft's stderr, or says that nft is not installed.
fn nft(netns: &str, script: &str) -> Result<()> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("run ip (iproute2)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).context("write the nft script")?;
    }
    let output = child.wait_with_output().context("wait for nft")?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        // `ip netns exec` reports a missing program as: exec of "nft" failed: No such file ...
        if stderr.contains("exec of \"nft\" failed") {
            bail!("nft (nftables) is not installed, and packet-filter faults need it: apt-get install nftables");
        }
        bail!("nft in {netns} failed ({}): {}\nscript:\n{script}", output.status, stderr.trim());
    }
    Ok(())
}

/// Runs `ip` with `args`; fails with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip").args(args).output().context("run ip (iproute2)")?;
    if !output.status.success() {
        bail!("ip {} failed ({}): {}", args.join(" "), output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

impl Lab {
    /// Builds a lab for nodes `node_ids` (each below 100). Fails, with the reason, where this
    /// machine cannot: not root, no iproute2, no namespaces in this container. Callers then
    /// skip their test, saying so.
    pub fn create(node_ids: &[u64]) -> Result<Lab> {
        if let Some(big) = node_ids.iter().find(|id| **id >= 100) {
            bail!("node id {big} is too large for a lab address");
        }
        let random = crate::random_u64();
        let mut lab = Lab {
            tag: format!("mendfs-{}-{:04x}", std::process::id(), random & 0xffff),
            subnet: (16 + (random >> 16) as u8 % 200, (random >> 24) as u8),
            node_ids: node_ids.to_vec(),
            namespaces: Vec::new(),
            filtered: Mutex::new(BTreeSet::new()),
        };
        lab.build().context("building network namespaces (needs root and `ip netns`)")?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        let hub = self.hub_netns();
        self.add_namespace(&hub)?;
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &hub, "link", "set", "br0", "up"])?;
        let mut ends: Vec<(String, String, u8)> =
            self.node_ids.iter().map(|id| (self.node_netns(*id), format!("n{id}"), 10 + *id as u8)).collect();
        ends.push((self.client_netns(), "cli".to_string(), CLIENT_HOST));
        for (namespace, hub_end, host) in ends {
            self.add_namespace(&namespace)?;
            ip(&["-n", &namespace, "link", "set", "lo", "up"])?;
            // Both ends are born in their namespaces, never in the host's.
            ip(&["link", "add", "eth0", "netns", &namespace, "type", "veth", "peer", "name", &hub_end, "netns", &hub])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "master", "br0"])?;
            ip(&["-n", &hub, "link", "set", &hub_end, "up"])?;
            let address = format!("{}/24", self.ip_of(host));
            ip(&["-n", &namespace, "addr", "add", &address, "dev", "eth0"])?;
            ip(&["-n", &namespace, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    fn add_namespace(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        Ok(())
    }

    fn ip_of(&self, host: u8) -> String {
        format!("10.{}.{}.{host}", self.subnet.0, self.subnet.1)
    }

    fn hub_netns(&self) -> String {
        format!("{}-hub", self.tag)
    }

    /// The namespace node `id` runs in.
    pub fn node_netns(&self, id: u64) -> String {
        format!("{}-n{id}", self.tag)
    }

    /// Node `id`'s address in the lab.
    pub fn node_ip(&self, id: u64) -> String {
        self.ip_of(10 + id as u8)
    }

    /// The namespace the cluster's CLI runs in, reaching every node that is not cut off.
    pub fn client_netns(&self) -> String {
        format!("{}-cli", self.tag)
    }

    /// Where a [`crate::Cluster`] should run its nodes and CLI to live in this lab.
    pub fn placement(&self) -> Placement {
        Placement {
            nodes: self.node_ids.iter().map(|id| (*id, (self.node_netns(*id), self.node_ip(*id)))).collect(),
            cli_netns: Some(self.client_netns()),
        }
    }

    /// Cuts node `id` off: its cable is down at the hub, so packets between it and every other
    /// namespace are dropped silently (no resets, as with a failed switch port), while its
    /// own namespace still reaches it.
    pub fn cut_off(&self, id: u64) -> Result<()> {
        ip(&["-n", &self.hub_netns(), "link", "set", &format!("n{id}"), "down"])
    }

    /// Undoes [`Lab::cut_off`].
    pub fn reconnect(&self, id: u64) -> Result<()> {
        ip(&["-n", &self.hub_netns(), "link", "set", &format!("n{id}"), "up"])
    }

    /// Whether this machine can apply packet-filter faults: `nft` is installed and the kernel
    /// runs, in a namespace, the rule kinds this lab uses (the random-loss one included). The
    /// error says what is missing; a caller then lists those faults as skipped.
    pub fn filters_available(&self) -> Result<()> {
        // A table of its own in the CLI's namespace, with a chain that no hook calls: it
        // touches no packet, and is gone again in the same transaction.
        let probe = format!(
            "add table inet {FILTER_TABLE}_probe\n\
             add chain inet {FILTER_TABLE}_probe probe\n\
             add rule inet {FILTER_TABLE}_probe probe ip saddr {} numgen random mod 100 < 50 drop\n\
             delete table inet {FILTER_TABLE}_probe\n",
            self.node_ip(0),
        );
        nft(&self.client_netns(), &probe).context("packet filters (nftables) are unavailable")
    }

    /// Drops every packet between nodes `a` and `b`, both ways. Each still reaches every other
    /// node, and the CLI reaches both.
    pub fn cut_between(&self, a: u64, b: u64) -> Result<()> {
        ensure!(a != b, "cannot cut node {a} from itself");
        self.add_drops(&[PacketDrop { from: a, to: b, percent: 100 }, PacketDrop { from: b, to: a, percent: 100 }])
    }

    /// Drops every packet from node `from` to node `to`, while those from `to` to `from` pass.
    /// Over TCP, which needs both ways, no new connection between them opens, either way; on
    /// an open one `from` still receives what `to` sends, for as long as `to` resends what is
    /// never acknowledged.
    pub fn cut_one_way(&self, from: u64, to: u64) -> Result<()> {
        ensure!(from != to, "cannot cut node {from} from itself");
        self.add_drops(&[PacketDrop { from, to, percent: 100 }])
    }

    /// Drops `percent` % of the packets node `id` exchanges with the other nodes, at random,
    /// each direction on its own (the CLI's packets all pass).
    pub fn flaky(&self, id: u64, percent: u8) -> Result<()> {
        ensure!(percent <= 100, "a loss of {percent} % is not a percentage");
        self.check_node(id)?;
        let drops: Vec<PacketDrop> = self
            .node_ids
            .iter()
            .filter(|other| **other != id)
            .flat_map(|other| {
                [PacketDrop { from: *other, to: id, percent }, PacketDrop { from: id, to: *other, percent }]
            })
            .collect();
        self.add_drops(&drops)
    }

    /// Cuts every pair of nodes in different `groups`: each group then talks only within
    /// itself. A node in no group keeps all its links (see [`Lab::bridge`]). For a majority
    /// and a minority: `partition(&[vec![1, 2], vec![3]])`.
    pub fn partition(&self, groups: &[Vec<u64>]) -> Result<()> {
        let mut seen = BTreeSet::new();
        for id in groups.iter().flatten() {
            self.check_node(*id)?;
            ensure!(seen.insert(*id), "node {id} is in two groups of the partition");
        }
        let mut drops = Vec::new();
        for (index, group) in groups.iter().enumerate() {
            for other in groups.iter().skip(index + 1) {
                for a in group {
                    for b in other {
                        drops.push(PacketDrop { from: *a, to: *b, percent: 100 });
                        drops.push(PacketDrop { from: *b, to: *a, percent: 100 });
                    }
                }
            }
        }
        self.add_drops(&drops)
    }

    /// Node `id` alone on one side, every other node on the other.
    pub fn isolate(&self, id: u64) -> Result<()> {
        self.check_node(id)?;
        let others: Vec<u64> = self.node_ids.iter().copied().filter(|other| *other != id).collect();
        self.partition(&[vec![id], others])
    }

    /// `left` and `right` cannot reach each other, and `bridge` reaches both (a non-transitive
    /// partition: with 5 nodes, `bridge(&[1, 2], 3, &[4, 5])` gives both sides a majority
    /// through node 3).
    pub fn bridge(&self, left: &[u64], bridge: u64, right: &[u64]) -> Result<()> {
        self.check_node(bridge)?;
        ensure!(!left.contains(&bridge) && !right.contains(&bridge), "the bridge node {bridge} is on a side");
        self.partition(&[left.to_vec(), right.to_vec()])
    }

    /// Undoes every fault of this lab: deletes its filter table in each node namespace that has
    /// one, and reconnects every node (also those [`Lab::cut_off`] cut). Tries all of it, and
    /// fails with the first error.
    pub fn heal_network(&self) -> Result<()> {
        let mut first_error = None;
        let mut filtered = self.filtered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for id in filtered.clone() {
            match nft(&self.node_netns(id), &format!("delete table inet {FILTER_TABLE}\n")) {
                Ok(()) => {
                    filtered.remove(&id);
                }
                Err(e) => {
                    first_error.get_or_insert(e.context(format!("removing node {id}'s packet filters")));
                }
            }
        }
        for id in &self.node_ids {
            if let Err(e) = self.reconnect(*id) {
                first_error.get_or_insert(e.context(format!("reconnecting node {id}")));
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn check_node(&self, id: u64) -> Result<()> {
        ensure!(self.node_ids.contains(&id), "node {id} is not in this lab (nodes {:?})", self.node_ids);
        Ok(())
    }

    /// Adds `drops`, one nft transaction per receiving node's namespace, in its filter table
    /// (created on first use). Rules only accumulate; [`Lab::heal_network`] removes them all,
    /// also those of a call that failed part way.
    fn add_drops(&self, drops: &[PacketDrop]) -> Result<()> {
        let mut by_receiver: BTreeMap<u64, Vec<PacketDrop>> = BTreeMap::new();
        for drop in drops {
            self.check_node(drop.from)?;
            self.check_node(drop.to)?;
            by_receiver.entry(drop.to).or_default().push(*drop);
        }
        let mut filtered = self.filtered.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (receiver, drops) in by_receiver {
            // `add` of an existing table or chain is a no-op, so the first fault creates them
            // and later ones only append rules.
            let mut script = format!(
                "add table inet {FILTER_TABLE}\n\
                 add chain inet {FILTER_TABLE} input {{ type filter hook input priority filter; policy accept; }}\n"
            );
            for drop in drops {
                let chance = if drop.percent >= 100 {
                    String::new()
                } else {
                    format!(" numgen random mod 100 < {}", drop.percent)
                };
                script.push_str(&format!(
                    "add rule inet {FILTER_TABLE} input ip saddr {}{chance} drop\n",
                    self.node_ip(drop.from)
                ));
            }
            nft(&self.node_netns(receiver), &script)
                .with_context(|| format!("adding packet filters for node {receiver}"))?;
            filtered.insert(receiver);
        }
        Ok(())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth ends and the bridge inside it; a veth whose
        // one end goes takes its peer along.
        for namespace in self.namespaces.iter().rev() {
            if let Err(e) = ip(&["netns", "del", namespace]) {
                eprintln!("warning: could not delete network namespace {namespace}: {e:#}");
            }
        }
    }
}
