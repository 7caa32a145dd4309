//! Phase 6: egress that follows the address: the chosen address taken off the node's interface
//! → MASQUERADE is the chain's decision; put back → SNAT to it again, timed by a worker in the
//! node namespace polling `iptables -S KILO-NAT` (nft and legacy, idle node). The daemon learns
//! of the change from rtnetlink, whatever its drift detection.

use crate::bench::{ADDR_A, Bench, CHAIN, in_node, nanos_summary, own_config};
use crate::plan::{Detection, Node};
use crate::stats::Summary;
use crate::worker::Job;
use anyhow::Context;
use kilo_egress_tests::{Backend, Family};
use serde::Serialize;

/// One backend of phase 6 (the `address` entries of results.json).
#[derive(Debug, Serialize)]
pub struct AddressFollow {
    /// `nft` or `legacy`.
    pub backend: String,
    /// Address removed → MASQUERADE in the kernel.
    pub removed: Summary,
    /// Address added → SNAT in the kernel.
    pub added: Summary,
    /// One `iptables -S` poll: the resolution.
    pub poll: Summary,
    /// Transitions not seen within 10 s.
    pub timeouts: usize,
}

impl Bench<'_> {
    /// Phase 6 for one backend: `plan.address_iterations` removals and additions.
    pub fn address(&self, backend: Backend) -> anyhow::Result<AddressFollow> {
        let lab = self.lab(backend, Node::Idle)?;
        let detection = match backend {
            Backend::Nft => Detection::Notifications,
            Backend::Legacy => Detection::Polling,
        };
        let daemon = lab.start_daemon(own_config(backend, self.plan.drift_rules, detection))?;
        let mut client = self.client(&daemon)?;
        self.set(&mut client, ADDR_A)?;
        self.get(&mut client)?;
        let ipt = lab.iptables(backend, Family::V4);
        let samples = in_node(
            &lab,
            &Job::Address {
                binary: ipt.binary(),
                chain: CHAIN.into(),
                address: format!("{ADDR_A}/32"),
                device: "up0".into(),
                iterations: self.plan.address_iterations,
                pause_ms: self.plan.drift_pause_ms,
                timeout_ms: 10_000,
            },
        )
        .with_context(|| format!("address phase{}", daemon.context()))?;
        Ok(AddressFollow {
            backend: backend.name().into(),
            removed: nanos_summary(&samples.samples_ns),
            added: nanos_summary(&samples.back_ns),
            poll: nanos_summary(&samples.poll_ns),
            timeouts: samples.timeouts,
        })
    }
}
