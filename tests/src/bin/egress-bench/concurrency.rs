//! Phase 3: concurrent SetEgress calls against as many sequential ones: wall time and kernel
//! transactions (the engine coalesces concurrent changes).

use crate::bench::{ADDR_A, Bench, daemon_pid, own_config, status_kib};
use crate::plan::Detection;
use anyhow::bail;
use kilo_egress::EgressClient;
use kilo_egress_tests::{Backend, Lab};
use serde::Serialize;
use std::time::Instant;

/// One backend of phase 3 (the `concurrency` entries of results.json).
#[derive(Debug, Serialize)]
pub struct Concurrency {
    /// `nft` or `legacy`.
    pub backend: String,
    /// RETURN rules in the chain.
    pub rules: usize,
    /// SetEgress calls, concurrent and then as many sequential ones.
    pub calls: usize,
    /// Connections the concurrent calls are spread over.
    pub connections: usize,
    /// Wall time of the concurrent calls.
    pub concurrent_wall_ms: f64,
    /// Kernel transactions of the concurrent calls.
    pub concurrent_transactions: u64,
    /// Concurrent calls that failed.
    pub concurrent_failures: usize,
    /// Wall time of the sequential calls.
    pub sequential_wall_ms: f64,
    /// Kernel transactions of the sequential calls.
    pub sequential_transactions: u64,
    /// Sequential wall time / concurrent wall time.
    pub wall_ratio_sequential_to_concurrent: f64,
    /// The daemon's peak RSS (VmHWM) after the calls.
    pub daemon_vm_hwm_kib: u64,
}

impl Bench<'_> {
    /// Phase 3: `plan.concurrent_calls` SetEgress calls at once, then one after the other.
    pub fn concurrency(&self, lab: &Lab, backend: Backend) -> anyhow::Result<Concurrency> {
        let plan = self.plan;
        let rules = plan.drift_rules;
        // The server lets SetEgress calls beyond 2 in flight per connection and 4 per identity
        // wait their turn; raised here, so all the calls reach the engine's coalescing. The
        // addresses are not on the node: `keep` programs them anyway, so every call is a real
        // switch (the default falls back to MASQUERADE, and the calls would change nothing).
        let calls_limit = plan.concurrent_calls.to_string();
        let config = own_config(backend, rules, Detection::Notifications)
            .arg("--max-writes-per-connection")
            .arg(&calls_limit)
            .arg("--max-writes-per-identity")
            .arg(&calls_limit)
            .arg("--absent-address")
            .arg("keep");
        let daemon = lab.start_daemon(config)?;
        let mut client = self.client(&daemon)?;
        let clients: Vec<EgressClient> = (0..plan.concurrent_connections)
            .map(|_| self.client(&daemon))
            .collect::<anyhow::Result<_>>()?;
        // Distinct addresses from the benchmarking range 198.18.0.0/15: every call is a change.
        let addr = |net: u32, i: usize| format!("198.{net}.{}.{}", i / 250, i % 250 + 1);
        self.set(&mut client, ADDR_A)?;
        let before = self.get(&mut client)?.kernel_transactions;
        let calls = plan.concurrent_calls;
        let started = Instant::now();
        let failures = self.rt.block_on(async {
            let tasks: Vec<_> = (0..calls)
                .map(|i| {
                    let mut c = clients[i % clients.len()].clone();
                    let a = addr(18, i);
                    tokio::spawn(async move { c.set_egress(vec![a], false, None).await })
                })
                .collect();
            let mut failures = 0;
            for task in tasks {
                if !matches!(task.await, Ok(Ok(_))) {
                    failures += 1;
                }
            }
            failures
        });
        let concurrent_wall = started.elapsed();
        if failures > 0 {
            bail!(
                "{failures} of {calls} concurrent SetEgress calls failed{}",
                daemon.context()
            );
        }
        let middle = self.get(&mut client)?;
        if !middle.in_sync {
            bail!("not in sync after the concurrent calls{}", daemon.context());
        }
        let started = Instant::now();
        for i in 0..calls {
            self.set(&mut client, &addr(19, i))?;
        }
        let sequential_wall = started.elapsed();
        let after = self.get(&mut client)?;
        Ok(Concurrency {
            backend: backend.name().into(),
            rules,
            calls,
            connections: plan.concurrent_connections,
            concurrent_wall_ms: concurrent_wall.as_secs_f64() * 1e3,
            concurrent_transactions: middle.kernel_transactions - before,
            concurrent_failures: failures,
            sequential_wall_ms: sequential_wall.as_secs_f64() * 1e3,
            sequential_transactions: after.kernel_transactions - middle.kernel_transactions,
            wall_ratio_sequential_to_concurrent: sequential_wall.as_secs_f64()
                / concurrent_wall.as_secs_f64(),
            daemon_vm_hwm_kib: status_kib(daemon_pid(lab)?, "VmHWM"),
        })
    }
}
