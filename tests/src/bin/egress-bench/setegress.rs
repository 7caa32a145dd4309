//! Phase 1: the SetEgress round trip (Rust client over the unix socket → reply after the kernel
//! commit) against one bare `iptables-restore --noflush` of the same full chain and against one
//! `iptables -A` process per rule, with where SetEgress time goes (engine log, state save, the
//! commit and the tidy run alone).

use crate::bench::{
    ADDR_A, ADDR_B, Bench, CHAIN, chain_specs, daemon_pid, in_node, nanos_summary, own_config,
    status_kib,
};
use crate::plan::{Detection, Node};
use crate::stats::Summary;
use crate::worker::{self, Job};
use anyhow::{Context, bail};
use kilo_egress_tests::{Backend, Family, Lab};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

/// One backend, node and size of phase 1 (the `setegress` cells of results.json).
#[derive(Debug, Serialize)]
pub struct SetEgressCell {
    /// `nft` or `legacy`.
    pub backend: String,
    /// `idle` or `busy`.
    pub node: String,
    /// RETURN rules in the chain (the SNAT rule comes on top).
    pub rules: usize,
    /// The SetEgress round trip, as the client sees it.
    pub setegress: Summary,
    /// The engine's own time per change (state file saved with fsync, then the commit), from
    /// the `duration_ms` of its "egress changed" log lines.
    pub engine_log: Summary,
    /// Saving a state file the way the daemon does (write, fsync, rename, fsync of the
    /// directory) in the lab's directory, on the same filesystem as the daemon's state.
    pub state_save: Summary,
    /// One `iptables-restore` of the add-only commit alone (`-I KILO-NAT <slot> <SNAT>`).
    pub insert_restore: Summary,
    /// One `iptables-restore` of the tidy alone (`-D KILO-NAT <old SNAT>`).
    pub delete_restore: Summary,
    /// One `iptables-restore --noflush` of the full chain.
    pub bare_restore: Summary,
    /// A rewrite of the chain with one `iptables -A` process per rule.
    pub per_rule: Summary,
    /// Per-rule rewrites stopped at the cap and extrapolated linearly (an underestimate).
    pub per_rule_extrapolated: usize,
    /// In an extrapolated rewrite, the share of the processes actually run.
    pub per_rule_measured_share: f64,
    /// Median SetEgress / median bare restore.
    pub ratio_setegress_to_restore: f64,
    /// Median per-rule rewrite / median SetEgress.
    pub ratio_per_rule_to_setegress: f64,
    /// Kernel transactions per SetEgress call (the commit and the tidy after the reply).
    pub transactions_per_call: f64,
    /// The daemon's peak RSS (VmHWM) after the calls.
    pub daemon_vm_hwm_kib: u64,
}

/// Times `n` durable saves of a small file in `dir`, as the daemon persists its state before
/// every change: write a temporary file, fsync it, rename it, fsync the directory.
fn state_save_cost(dir: &Path, n: usize) -> anyhow::Result<Summary> {
    let dir = dir.join("bench-state-save");
    std::fs::create_dir_all(&dir)?;
    let mut samples = Vec::new();
    for i in 0..n {
        let started = Instant::now();
        let tmp = dir.join("state.json.tmp");
        let mut file = std::fs::File::create(&tmp)?;
        write!(file, "{{\"generation\":{i},\"ipv4\":\"{ADDR_A}\"}}")?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, dir.join("state.json"))?;
        std::fs::File::open(&dir)?.sync_all()?;
        samples.push(started.elapsed());
    }
    Ok(Summary::of(&samples).unwrap_or_default())
}

/// `*nat`, `:KILO-NAT - [0:0]`, every rule, `COMMIT`: what a naive tool restores.
fn full_chain_input(specs: &[String]) -> String {
    let mut input = format!("*nat\n:{CHAIN} - [0:0]\n");
    for spec in specs {
        input.push_str(spec);
        input.push('\n');
    }
    input.push_str("COMMIT\n");
    input
}

/// The chain's rules with the SNAT rule pointing at `addr`.
fn with_snat(specs: &[String], addr: &str) -> Vec<String> {
    specs
        .iter()
        .map(|spec| match spec.split_once("-j SNAT --to-source ") {
            Some((head, _)) => format!("{head}-j SNAT --to-source {addr}"),
            None => spec.clone(),
        })
        .collect()
}

impl Bench<'_> {
    /// Phase 1 at `size` rules: SetEgress, then (daemon stopped) both baselines on its chain.
    pub fn setegress_cell(
        &self,
        lab: &Lab,
        backend: Backend,
        node: Node,
        size: usize,
    ) -> anyhow::Result<SetEgressCell> {
        let plan = self.plan;
        let mut daemon = lab.start_daemon(own_config(backend, size, Detection::Notifications))?;
        let pid = daemon_pid(lab)?;
        let mut client = self.client(&daemon)?;
        let pace = Duration::from_millis(plan.pace_ms);
        let mut samples = Vec::new();
        let mut transactions = 0;
        for i in 0..plan.warmup + plan.setegress_iterations {
            let addr = if i % 2 == 0 { ADDR_A } else { ADDR_B };
            let before = self.get(&mut client)?.kernel_transactions;
            std::thread::sleep(pace);
            let started = Instant::now();
            self.set(&mut client, addr)?;
            let elapsed = started.elapsed();
            // GetRules is answered once the shadowed rule is removed: the chain has settled.
            let after = self.get(&mut client)?;
            if !after.in_sync {
                bail!("not in sync after SetEgress {addr}{}", daemon.context());
            }
            if i >= plan.warmup {
                samples.push(elapsed);
                transactions += after.kernel_transactions - before;
            }
        }
        let state_save = state_save_cost(lab.dir(), plan.restore_iterations)?;
        let settled = self.get(&mut client)?;
        let specs = chain_specs(&settled);
        if specs.len() != size + 1 {
            bail!(
                "expected {} rules in {CHAIN}, GetRules reports {}",
                size + 1,
                specs.len()
            );
        }
        let vm_hwm = status_kib(pid, "VmHWM");
        let engine_ms: Vec<f64> = daemon
            .log()
            .lines()
            .filter(|l| l.contains("egress changed"))
            .filter_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("duration_ms="))
                    .and_then(|v| v.parse().ok())
            })
            .collect();
        let engine_ms = &engine_ms[engine_ms.len().saturating_sub(samples.len())..];
        // The baselines run with the daemon stopped (SIGTERM keeps its rules): they rewrite the
        // same chain in the same table, and nothing repairs behind them.
        drop(client);
        daemon.stop()?;
        let ipt = lab.iptables(backend, Family::V4);
        let restore = in_node(
            lab,
            &Job::Restore {
                binary: ipt.restore_binary(),
                inputs: [ADDR_B, ADDR_A]
                    .iter()
                    .map(|a| full_chain_input(&with_snat(&specs, a)))
                    .collect(),
                iterations: plan.restore_iterations,
            },
        )?;
        // The daemon's two transactions on their own: the commit inserts the new SNAT rule in
        // front of the old one, the tidy deletes it again (alternating, so the chain stays).
        let snat_args = |addr: &str| -> anyhow::Result<String> {
            with_snat(&specs, addr)
                .iter()
                .find(|s| s.contains("-j SNAT"))
                .and_then(|s| s.strip_prefix("-A KILO-NAT "))
                .map(str::to_owned)
                .context("no SNAT rule in the chain")
        };
        let other = snat_args(ADDR_B)?;
        let insert_delete = in_node(
            lab,
            &Job::Restore {
                binary: ipt.restore_binary(),
                inputs: vec![
                    format!("*nat\n-I {CHAIN} {} {other}\nCOMMIT\n", specs.len()),
                    format!("*nat\n-D {CHAIN} {other}\nCOMMIT\n"),
                ],
                iterations: plan.restore_iterations,
            },
        )?;
        let every_other = |first: usize| -> Vec<u64> {
            insert_delete
                .samples_ns
                .iter()
                .skip(first)
                .step_by(2)
                .copied()
                .collect()
        };
        let (inserts, deletes) = (every_other(0), every_other(1));
        let per_rule = in_node(
            lab,
            &Job::PerRule {
                binary: ipt.binary(),
                chain: CHAIN.into(),
                rule_sets: [ADDR_B, ADDR_A]
                    .iter()
                    .map(|a| {
                        with_snat(&specs, a)
                            .iter()
                            .map(|s| worker::split_rule(s.trim_start_matches("-A KILO-NAT ")))
                            .collect()
                    })
                    .collect(),
                iterations: plan.per_rule_iterations(size),
                budget_ms: plan.per_rule_budget_ms,
                rewrite_cap_ms: plan.per_rule_rewrite_cap_ms,
            },
        )?;
        let setegress = Summary::of(&samples).unwrap_or_default();
        let bare_restore = nanos_summary(&restore.samples_ns);
        let per_rule_summary = nanos_summary(&per_rule.samples_ns);
        Ok(SetEgressCell {
            backend: backend.name().into(),
            node: node.name().into(),
            rules: size,
            ratio_setegress_to_restore: setegress.p50 / bare_restore.p50,
            ratio_per_rule_to_setegress: per_rule_summary.p50 / setegress.p50,
            setegress,
            engine_log: Summary::of_ms(engine_ms).unwrap_or_default(),
            state_save,
            insert_restore: nanos_summary(&inserts),
            delete_restore: nanos_summary(&deletes),
            bare_restore,
            per_rule: per_rule_summary,
            per_rule_extrapolated: per_rule.extrapolated,
            per_rule_measured_share: per_rule.measured_share,
            transactions_per_call: transactions as f64 / samples.len() as f64,
            daemon_vm_hwm_kib: vm_hwm,
        })
    }
}
