//! Writing a run's results: results.json, results.md (the markdown tables, also printed at the
//! end of a run) and setegress.svg, and `--replot`, which draws the SVG again from results.json.

use crate::plot;
use crate::results::Results;
use crate::stats::{fmt_ms, group_thousands};
use anyhow::Context;
use std::path::Path;

/// results.md: the machine, the targets and one table per phase measured.
pub fn markdown(r: &Results) -> String {
    let mut md = String::new();
    let mut line = |s: String| {
        md.push_str(&s);
        md.push('\n');
    };
    if let Some(m) = &r.machine {
        line(format!(
            "Run {} on {} vCPU ({}), kernel {}, {}; {}. Load average before {}, after {}. Took {:.0} s.{}",
            m.date_utc,
            m.cpus,
            m.cpu_model,
            m.kernel,
            m.iptables,
            m.build,
            m.load_before,
            m.load_after,
            r.duration_s,
            if r.quick {
                " QUICK SMOKE RUN: tiny sizes, not results."
            } else {
                ""
            }
        ));
        line(String::new());
    }
    if !r.targets.is_empty() {
        line("### Targets".into());
        line(String::new());
        line("| target | measured | |".into());
        line("|---|---|---|".into());
        for t in &r.targets {
            line(format!(
                "| {} | {} | {} |",
                t.target,
                t.measured,
                if t.pass { "pass" } else { "**MISS**" }
            ));
        }
        line(String::new());
    }
    if !r.setegress.is_empty() {
        line("### SetEgress vs bare restore vs per-rule".into());
        line(String::new());
        line("Median (p25–p75; min–max when fewer than 5 samples) of each approach, in ms.".into());
        line(String::new());
        line("| backend | node | rules | SetEgress | bare restore | per-rule | SetEgress / restore | per-rule / SetEgress | transactions per call |".into());
        line("|---|---|---:|---|---|---|---:|---:|---:|".into());
        for c in &r.setegress {
            let per_rule = if c.per_rule_extrapolated > 0 {
                format!(
                    "{} ‡ (extrapolated from {:.0} % of the processes)",
                    c.per_rule.display(),
                    c.per_rule_measured_share * 100.0
                )
            } else {
                c.per_rule.display()
            };
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {:.2} | {:.0}× | {:.1} |",
                c.backend,
                c.node,
                group_thousands(c.rules as u64),
                c.setegress.display(),
                c.bare_restore.display(),
                per_rule,
                c.ratio_setegress_to_restore,
                c.ratio_per_rule_to_setegress,
                c.transactions_per_call
            ));
        }
        line(String::new());
        line("Where SetEgress time goes: the engine's own time per change (state file written with fsync, then the commit; from its log), and the daemon's two transactions run alone with `iptables-restore`.".into());
        line(String::new());
        line("| backend | node | rules | SetEgress | engine (save + commit) | state save alone (fsync) | commit alone (add-only insert) | tidy alone (delete) |".into());
        line("|---|---|---:|---|---|---|---|---|".into());
        for c in &r.setegress {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                c.backend,
                c.node,
                group_thousands(c.rules as u64),
                c.setegress.display(),
                c.engine_log.display(),
                c.state_save.display(),
                c.insert_restore.display(),
                c.delete_restore.display()
            ));
        }
        line(String::new());
    }
    if !r.ten_thousand.is_empty() {
        line("### A large chain at start".into());
        line(String::new());
        line("| backend | --no-nat-cidr | rules in KILO-NAT | kernel transactions since start | start log | start → SERVING |".into());
        line("|---|---:|---:|---:|---|---:|".into());
        for t in &r.ten_thousand {
            line(format!(
                "| {} | {} | {} | {} | `{}` | {} |",
                t.backend,
                group_thousands(t.rules_requested as u64),
                group_thousands(t.rules_in_chain as u64),
                t.kernel_transactions,
                t.start_log_line,
                fmt_ms(t.start_to_serving_ms)
            ));
        }
        line(String::new());
    }
    if !r.concurrency.is_empty() {
        line("### Concurrent SetEgress calls".into());
        line(String::new());
        line("| backend | rules | calls | concurrent: wall | concurrent: transactions | sequential: wall | sequential: transactions | sequential / concurrent wall |".into());
        line("|---|---:|---:|---:|---:|---:|---:|---:|".into());
        for c in &r.concurrency {
            line(format!(
                "| {} | {} | {} over {} connections{} | {} | {} | {} | {} | {:.1}× |",
                c.backend,
                c.rules,
                group_thousands(c.calls as u64),
                c.connections,
                if c.concurrent_failures > 0 {
                    format!(", {} FAILED", c.concurrent_failures)
                } else {
                    String::new()
                },
                fmt_ms(c.concurrent_wall_ms),
                c.concurrent_transactions,
                fmt_ms(c.sequential_wall_ms),
                c.sequential_transactions,
                c.wall_ratio_sequential_to_concurrent
            ));
        }
        line(String::new());
    }
    if !r.address.is_empty() {
        line("### Egress that follows the address".into());
        line(String::new());
        line("`ip addr del/add` of the chosen address on the node → the bench's poll of `iptables -S KILO-NAT` sees the new decision (MASQUERADE / SNAT); median (p25–p75), max.".into());
        line(String::new());
        line("| backend | removed → MASQUERADE | max | added → SNAT | max | poll (resolution) | not seen |".into());
        line("|---|---|---:|---|---:|---:|---:|".into());
        for a in &r.address {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                a.backend,
                a.removed.display(),
                fmt_ms(a.removed.max),
                a.added.display(),
                fmt_ms(a.added.max),
                fmt_ms(a.poll.p50),
                a.timeouts
            ));
        }
        line(String::new());
    }
    if !r.watch.is_empty() {
        line("### The node watcher end to end".into());
        line(String::new());
        line("The Node annotation set through the API emulator (alternating addresses) → the bench's poll of `iptables -S KILO-NAT` sees the SNAT to the new address; timed from the watch event the emulator sent to `kilo-egress watch`, and from the write it received; median (p25–p75), max.".into());
        line(String::new());
        line("| backend | watch event → SNAT | max | write → SNAT | max | poll (resolution) | not seen |".into());
        line("|---|---|---:|---|---:|---:|---:|".into());
        for w in &r.watch {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} |",
                w.backend,
                w.after_event.display(),
                fmt_ms(w.after_event.max),
                w.after_write.display(),
                fmt_ms(w.after_write.max),
                fmt_ms(w.poll.p50),
                w.timeouts
            ));
        }
        line(String::new());
    }
    if !r.drift.is_empty() {
        line("### Drift repair".into());
        line(String::new());
        line("Tamper → the bench's poll of `iptables -S KILO-NAT` sees the chain as before; median (p25–p75), max. Resolution: one poll.".into());
        line(String::new());
        line("| backend | node | detection | tamper | repair latency | max | poll (resolution) | not repaired |".into());
        line("|---|---|---|---|---|---:|---:|---:|".into());
        for d in &r.drift {
            line(format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                d.backend,
                d.node,
                d.detection,
                d.tamper,
                d.latency.display(),
                fmt_ms(d.latency.max),
                fmt_ms(d.poll.p50),
                d.timeouts
            ));
        }
        line(String::new());
    }
    if !r.idle.is_empty() {
        line("### Idle cost".into());
        line(String::new());
        line("| backend | node | detection | window | CPU, daemon + reaped iptables children | CPU, daemon threads only | VmHWM | VmRSS |".into());
        line("|---|---|---|---:|---:|---:|---:|---:|".into());
        for i in &r.idle {
            line(format!(
                "| {} | {} | {} | {:.0} s | {:.3} % | {:.3} % | {:.1} MiB | {:.1} MiB |",
                i.backend,
                i.node,
                i.detection,
                i.seconds,
                i.cpu_with_children_pct,
                i.cpu_daemon_pct,
                i.vm_hwm_kib as f64 / 1024.0,
                i.vm_rss_kib as f64 / 1024.0
            ));
        }
        line(String::new());
        line("What each daemon said about its drift detection after the window (GetRules):".into());
        line(String::new());
        for i in &r.idle {
            line(format!(
                "- {} {} node, {}: {}",
                i.backend, i.node, i.detection, i.drift_detection
            ));
        }
        line(String::new());
    }
    md
}

/// Writes results.json, results.md and setegress.svg of `r` into `dir`.
pub fn write_outputs(dir: &Path, r: &Results) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let json = serde_json::to_value(r)?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    std::fs::write(dir.join("results.md"), markdown(r))?;
    std::fs::write(dir.join("setegress.svg"), plot::render(&panels(&json)))?;
    Ok(())
}

/// Draws `DIR/setegress.svg` again from `DIR/results.json` (after a change of the plot).
pub fn replot(dir: &Path) -> anyhow::Result<()> {
    let path = dir.join("results.json");
    let json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("read {}", path.display()))?,
    )?;
    std::fs::write(dir.join("setegress.svg"), plot::render(&panels(&json)))?;
    println!("wrote {}/setegress.svg", dir.display());
    Ok(())
}

/// One plot panel per backend and node from the `setegress` cells of results.json.
fn panels(results: &serde_json::Value) -> Vec<plot::Panel> {
    let cells = results["setegress"].as_array().cloned().unwrap_or_default();
    [
        ("nft", "idle"),
        ("nft", "busy"),
        ("legacy", "idle"),
        ("legacy", "busy"),
    ]
    .iter()
    .map(|(backend, node)| {
        let mine: Vec<&serde_json::Value> = cells
            .iter()
            .filter(|c| c["backend"] == *backend && c["node"] == *node)
            .collect();
        let series = |name: &'static str, key: &str| plot::Series {
            name,
            points: mine
                .iter()
                .map(|c| {
                    let ms = |q: &str| c[key][q].as_f64().unwrap_or_default();
                    (
                        c["rules"].as_f64().unwrap_or_default(),
                        ms("p50_ms"),
                        ms("p25_ms"),
                        ms("p75_ms"),
                    )
                })
                .collect(),
        };
        plot::Panel {
            title: format!("{backend}, {node} node"),
            series: vec![
                series("SetEgress", "setegress"),
                series("bare iptables-restore of the chain", "bare_restore"),
                series("one iptables -A per rule", "per_rule"),
            ],
        }
    })
    .collect()
}
