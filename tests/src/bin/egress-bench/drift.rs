//! Phase 4: drift repair latency: the chain flushed or the SNAT rule deleted behind the daemon's
//! back → the chain is as before again, timed by a worker in the node namespace (nft with change
//! notifications, nft polling, legacy polling).

use crate::bench::{ADDR_A, Bench, CHAIN, chain_specs, in_node, nanos_summary, own_config};
use crate::plan::{Detection, Node};
use crate::stats::Summary;
use crate::worker::{self, Job};
use anyhow::Context;
use kilo_egress_tests::{Backend, Family, Lab};
use serde::Serialize;

/// One backend, node, detection and tamper of phase 4 (the `drift` entries of results.json).
#[derive(Debug, Serialize)]
pub struct Drift {
    /// `nft` or `legacy`.
    pub backend: String,
    /// `idle` or `busy`.
    pub node: String,
    /// How the daemon finds drift ([`Detection::name`]).
    pub detection: String,
    /// What was done to the chain.
    pub tamper: String,
    /// RETURN rules in the chain.
    pub rules: usize,
    /// Tamper → the chain seen as before.
    pub latency: Summary,
    /// One `iptables -S` poll: the resolution of the latency.
    pub poll: Summary,
    /// Tampers not repaired within 10 s.
    pub timeouts: usize,
}

impl Bench<'_> {
    /// Phase 4 for one detection: both tampers, `plan.drift_iterations` times each.
    pub fn drift(
        &self,
        lab: &Lab,
        backend: Backend,
        node: Node,
        detection: Detection,
    ) -> anyhow::Result<Vec<Drift>> {
        let plan = self.plan;
        let daemon = lab.start_daemon(own_config(backend, plan.drift_rules, detection))?;
        let mut client = self.client(&daemon)?;
        self.set(&mut client, ADDR_A)?;
        let specs = chain_specs(&self.get(&mut client)?);
        let snat = specs
            .iter()
            .find(|s| s.contains("-j SNAT"))
            .context("no SNAT rule")?;
        let mut delete = vec!["-t".to_owned(), "nat".into(), "-D".into()];
        delete.extend(worker::split_rule(snat.trim_start_matches("-A ")));
        let tampers = [
            (
                "chain flushed (iptables -F KILO-NAT)",
                vec!["-t".to_owned(), "nat".into(), "-F".into(), CHAIN.into()],
            ),
            ("SNAT rule deleted (iptables -D)", delete),
        ];
        let ipt = lab.iptables(backend, Family::V4);
        let mut out = Vec::new();
        for (name, tamper) in tampers {
            let samples = in_node(
                lab,
                &Job::Drift {
                    binary: ipt.binary(),
                    chain: CHAIN.into(),
                    tamper,
                    iterations: plan.drift_iterations,
                    pause_ms: plan.drift_pause_ms,
                    timeout_ms: 10_000,
                },
            )
            .with_context(|| format!("drift: {name}{}", daemon.context()))?;
            out.push(Drift {
                backend: backend.name().into(),
                node: node.name().into(),
                detection: detection.name().into(),
                tamper: name.into(),
                rules: plan.drift_rules,
                latency: nanos_summary(&samples.samples_ns),
                poll: nanos_summary(&samples.poll_ns),
                timeouts: samples.timeouts,
            });
        }
        Ok(out)
    }
}
