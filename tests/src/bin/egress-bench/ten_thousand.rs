//! Phase 2: a 10,000-rule chain programmed at start: how many kernel transactions it took, how
//! long until the daemon served, and its peak RSS.

use crate::bench::{Bench, CHAIN, daemon_pid, own_config, status_kib};
use crate::plan::Detection;
use kilo_egress_tests::{Backend, Family, Lab};
use serde::Serialize;
use std::time::Instant;

/// One backend of phase 2 (the `ten_thousand` entries of results.json).
#[derive(Debug, Serialize)]
pub struct TenThousand {
    /// `nft` or `legacy`.
    pub backend: String,
    /// RETURN rules asked for (`--no-nat-cidr`).
    pub rules_requested: usize,
    /// Rules in KILO-NAT after the start (`iptables -S`), the SNAT rule included.
    pub rules_in_chain: usize,
    /// Kernel transactions since the daemon started (GetRules).
    pub kernel_transactions: u64,
    /// The numbers (`rules_touched=`, `duration_ms=`) of the daemon's start log line.
    pub start_log_line: String,
    /// From starting the daemon to it serving.
    pub start_to_serving_ms: f64,
    /// The daemon's peak RSS (VmHWM).
    pub daemon_vm_hwm_kib: u64,
}

impl Bench<'_> {
    /// Phase 2: starts a daemon with `plan.ten_thousand` RETURN rules and reads what it did.
    pub fn ten_thousand(&self, lab: &Lab, backend: Backend) -> anyhow::Result<TenThousand> {
        let n = self.plan.ten_thousand;
        let started = Instant::now();
        let daemon = lab.start_daemon(own_config(backend, n, Detection::Notifications))?;
        let start_to_serving = started.elapsed();
        let mut client = self.client(&daemon)?;
        let reply = self.get(&mut client)?;
        let listed = lab.iptables(backend, Family::V4).iptables_s(CHAIN)?;
        let start_log_line = daemon
            .log()
            .lines()
            .find(|l| l.contains("programmed the stored state"))
            .map(|l| {
                // The line carries the whole drift description; keep the numbers.
                l.split_whitespace()
                    .filter_map(|w| {
                        if w.starts_with("rules_touched=") {
                            Some(w.to_owned())
                        } else {
                            let ms: f64 = w.strip_prefix("duration_ms=")?.parse().ok()?;
                            Some(format!("duration_ms={ms:.1}"))
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        Ok(TenThousand {
            backend: backend.name().into(),
            rules_requested: n,
            rules_in_chain: listed.lines().filter(|l| l.starts_with("-A ")).count(),
            kernel_transactions: reply.kernel_transactions,
            start_log_line,
            start_to_serving_ms: start_to_serving.as_secs_f64() * 1e3,
            daemon_vm_hwm_kib: status_kib(daemon_pid(lab)?, "VmHWM"),
        })
    }
}
