//! Phase 5: idle CPU of the daemon over a window (its own threads, and with the iptables
//! processes it reaped) and its peak and current RSS, six daemons side by side.

use crate::bench::{ADDR_A, Bench, daemon_pid, own_config, status_kib};
use crate::plan::{Detection, Node};
use anyhow::Context;
use kilo_egress_tests::{Backend, Lab};
use serde::Serialize;
use std::time::{Duration, Instant};

/// One daemon of phase 5 (the `idle` entries of results.json).
#[derive(Debug, Serialize)]
pub struct Idle {
    /// `nft` or `legacy`.
    pub backend: String,
    /// `idle` or `busy`.
    pub node: String,
    /// How the daemon finds drift ([`Detection::name`]).
    pub detection: String,
    /// RETURN rules in the chain.
    pub rules: usize,
    /// Length of the measured window.
    pub seconds: f64,
    /// utime + stime of the daemon's own threads, % of one core.
    pub cpu_daemon_pct: f64,
    /// Plus cutime + cstime: the iptables processes it ran and reaped, % of one core.
    pub cpu_with_children_pct: f64,
    /// Peak RSS (VmHWM) at the end of the window.
    pub vm_hwm_kib: u64,
    /// RSS (VmRSS) at the end of the window.
    pub vm_rss_kib: u64,
    /// GetRules' `drift_detection` after the window: how the daemon polls, with the measured
    /// cost of a read and the backstop interval it chose.
    pub drift_detection: String,
}

/// (utime + stime, cutime + cstime) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime is field 14 of the whole line.
    let rest: Vec<u64> = stat
        .rsplit_once(") ")
        .context("parse /proc/PID/stat")?
        .1
        .split_whitespace()
        .map(|f| f.parse().unwrap_or_default())
        .collect();
    Ok((rest[11] + rest[12], rest[13] + rest[14]))
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

impl Bench<'_> {
    /// Six daemons side by side (nft notifications, nft polling, legacy polling; idle and busy
    /// node), each in its own lab, measured over the same idle window.
    pub fn idle(&self) -> anyhow::Result<Vec<Idle>> {
        let configs: Vec<(Backend, Node, Detection)> = [Node::Idle, Node::Busy]
            .into_iter()
            .flat_map(|node| {
                [
                    (Backend::Nft, node, Detection::Notifications),
                    (Backend::Nft, node, Detection::Polling),
                    (Backend::Legacy, node, Detection::Polling),
                ]
            })
            .collect();
        let labs: Vec<Lab> = configs
            .iter()
            .map(|(backend, node, _)| self.lab(*backend, *node))
            .collect::<anyhow::Result<_>>()?;
        let mut daemons = Vec::new();
        for (lab, (backend, _, detection)) in labs.iter().zip(&configs) {
            let daemon =
                lab.start_daemon(own_config(*backend, self.plan.idle_rules, *detection))?;
            let mut client = self.client(&daemon)?;
            self.set(&mut client, ADDR_A)?;
            self.get(&mut client)?;
            daemons.push((daemon_pid(lab)?, daemon));
        }
        let before: Vec<(u64, u64)> = daemons
            .iter()
            .map(|(pid, _)| cpu_ticks(*pid))
            .collect::<anyhow::Result<_>>()?;
        let started = Instant::now();
        std::thread::sleep(Duration::from_secs(self.plan.idle_seconds));
        let after: Vec<(u64, u64)> = daemons
            .iter()
            .map(|(pid, _)| cpu_ticks(*pid))
            .collect::<anyhow::Result<_>>()?;
        let seconds = started.elapsed().as_secs_f64();
        let mut detections = Vec::new();
        for (_, daemon) in &daemons {
            let mut client = self.client(daemon)?;
            detections.push(self.get(&mut client)?.drift_detection);
        }
        let hz = clock_ticks_per_second();
        let pct = |ticks: u64| ticks as f64 / hz / seconds * 100.0;
        Ok(configs
            .iter()
            .zip(daemons.iter().zip(before.iter().zip(&after)))
            .zip(detections)
            .map(
                |(((backend, node, detection), ((pid, _), (b, a))), said)| Idle {
                    backend: backend.name().into(),
                    node: node.name().into(),
                    detection: detection.name().into(),
                    rules: self.plan.idle_rules,
                    seconds,
                    cpu_daemon_pct: pct(a.0 - b.0),
                    cpu_with_children_pct: pct(a.0 + a.1 - b.0 - b.1),
                    vm_hwm_kib: status_kib(*pid, "VmHWM"),
                    vm_rss_kib: status_kib(*pid, "VmRSS"),
                    drift_detection: said,
                },
            )
            .collect())
    }
}
