//! Network namespaces for partition tests (Linux, root, `ip` from iproute2): each node in a
//! namespace of its own, all joined by a bridge in a hub namespace, and one more namespace for
//! the CLI. Cutting a node off brings its cable down at the hub: the node, and any client in
//! its namespace, still reach each other, and nobody else.
//!
//! Nothing is created in the host's own namespace: each veth pair is created with its ends
//! already in their namespaces, the addresses (one random 10.X.Y.0/24) exist only inside them,
//! and dropping the [`Lab`], also on a test's panic, deletes every namespace it made, which
//! removes the rest with them. Namespace names carry the process id and a random tag, so
//! concurrent runs never meet.

use std::process::Command;

use anyhow::{bail, Context, Result};

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
}

/// The host part of the CLI namespace's address; nodes get 10 + their id.
const CLIENT_HOST: u8 = 200;

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
