//! The results of a run (what results.json holds): the phases' records, the machine it ran on,
//! and the targets judged against them.

use crate::concurrency::Concurrency;
use crate::drift::Drift;
use crate::idle::Idle;
use crate::plan::{Detection, Plan};
use crate::setegress::SetEgressCell;
use crate::stats::{fmt_ms, group_thousands};
use crate::ten_thousand::TenThousand;
use serde::Serialize;

/// One target of the design, and whether the run met it.
#[derive(Debug, Serialize)]
pub struct Target {
    /// The target, as results.md states it.
    pub target: String,
    /// What the run measured against it.
    pub measured: String,
    /// Whether the measurement meets the target.
    pub pass: bool,
}

/// Where and how the run ran.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// When the run started (UTC).
    pub date_utc: String,
    /// `uname -r`.
    pub kernel: String,
    /// Available parallelism.
    pub cpus: usize,
    /// The first `model name` of /proc/cpuinfo.
    pub cpu_model: String,
    /// The versions of iptables-nft and iptables-legacy.
    pub iptables: String,
    /// Load averages before the run.
    pub load_before: String,
    /// Load averages after the run.
    pub load_after: String,
    /// Whether egress-bench was built in release or debug mode.
    pub build: String,
}

/// Everything one run measured: written to results.json, rendered as results.md.
#[derive(Debug, Default, Serialize)]
pub struct Results {
    /// A `--quick` smoke run.
    pub quick: bool,
    /// Where and how the run ran.
    pub machine: Option<Machine>,
    /// Sizes and iteration counts.
    pub plan: Option<Plan>,
    /// How long the run took.
    pub duration_s: f64,
    /// Phase 1: SetEgress vs bare restore vs per-rule.
    pub setegress: Vec<SetEgressCell>,
    /// Phase 2: a large chain at start.
    pub ten_thousand: Vec<TenThousand>,
    /// Phase 3: concurrent SetEgress calls.
    pub concurrency: Vec<Concurrency>,
    /// Phase 4: drift repair latency.
    pub drift: Vec<Drift>,
    /// Phase 6: the chosen address removed and added back → the decision in the kernel.
    pub address: Vec<crate::address::AddressFollow>,
    /// Phase 7: the node annotation changed → SNAT in the kernel, through `kilo-egress watch`.
    pub watch: Vec<crate::watch::WatchLatency>,
    /// Phase 5: idle CPU and RSS.
    pub idle: Vec<Idle>,
    /// The targets judged against the phases measured.
    pub targets: Vec<Target>,
}

/// The machine, now (the load after the run is filled in at the end).
pub fn machine() -> Machine {
    let sh = |line: &str| {
        std::process::Command::new("sh")
            .args(["-c", line])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    Machine {
        date_utc: sh("date -u +%Y-%m-%dT%H:%M:%SZ"),
        kernel: sh("uname -r"),
        cpus: std::thread::available_parallelism().map_or(0, usize::from),
        cpu_model: sh("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"),
        iptables: format!(
            "{} / {}",
            sh("iptables-nft --version"),
            sh("iptables-legacy --version")
        ),
        load_before: loadavg(),
        load_after: String::new(),
        build: if cfg!(debug_assertions) {
            "debug (numbers are not representative)".into()
        } else {
            "release (cargo build --release)".into()
        },
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The performance targets, judged on `r` (only those a measured phase covers).
pub fn targets(r: &Results) -> Vec<Target> {
    let mut out = Vec::new();
    if !r.setegress.is_empty() {
        let worst = r
            .setegress
            .iter()
            .max_by(|a, b| {
                a.ratio_setegress_to_restore
                    .total_cmp(&b.ratio_setegress_to_restore)
            })
            .expect("not empty");
        let misses: Vec<String> = r
            .setegress
            .iter()
            .filter(|c| c.ratio_setegress_to_restore >= 1.0)
            .map(|c| {
                format!(
                    "{} {} {}: {:.2}",
                    c.backend, c.node, c.rules, c.ratio_setegress_to_restore
                )
            })
            .collect();
        out.push(Target {
            target:
                "SetEgress p50 below one bare restore of the full chain at every size (ratio < 1.0)"
                    .into(),
            measured: if misses.is_empty() {
                format!(
                    "worst ratio {:.2} ({} {} {} rules)",
                    worst.ratio_setegress_to_restore, worst.backend, worst.node, worst.rules
                )
            } else {
                format!("ratio ≥ 1.0 in {}", misses.join("; "))
            },
            pass: misses.is_empty(),
        });
        let at_1000: Vec<&SetEgressCell> = r.setegress.iter().filter(|c| c.rules == 1000).collect();
        if !at_1000.is_empty() {
            out.push(Target {
                target: "≥ 40× faster than per-rule at 1,000 rules".into(),
                measured: at_1000
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {}: {:.0}×",
                            c.backend, c.node, c.ratio_per_rule_to_setegress
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", "),
                pass: at_1000
                    .iter()
                    .all(|c| c.ratio_per_rule_to_setegress >= 40.0),
            });
        }
    }
    if !r.ten_thousand.is_empty() {
        out.push(Target {
            target: format!(
                "a {}-rule chain applied in one transaction",
                group_thousands(r.ten_thousand[0].rules_requested as u64)
            ),
            measured: r
                .ten_thousand
                .iter()
                .map(|t| {
                    format!(
                        "{}: {} rules after {} transaction(s)",
                        t.backend,
                        group_thousands(t.rules_in_chain as u64),
                        t.kernel_transactions
                    )
                })
                .collect::<Vec<_>>()
                .join(", "),
            pass: r
                .ten_thousand
                .iter()
                .all(|t| t.kernel_transactions == 1 && t.rules_in_chain == t.rules_requested + 1),
        });
    }
    if !r.address.is_empty() {
        let max = r
            .address
            .iter()
            .flat_map(|a| [a.removed.max, a.added.max])
            .fold(0.0, f64::max);
        let p50 = r
            .address
            .iter()
            .flat_map(|a| [a.removed.p50, a.added.p50])
            .fold(0.0, f64::max);
        let timeouts: usize = r.address.iter().map(|a| a.timeouts).sum();
        out.push(Target {
            target: "address removed/added → decision in the kernel ≤ 100 ms (nft and legacy)"
                .into(),
            measured: format!(
                "p50 ≤ {}, max {} over {} transitions{}",
                fmt_ms(p50),
                fmt_ms(max),
                r.address
                    .iter()
                    .map(|a| a.removed.n + a.added.n)
                    .sum::<usize>(),
                if timeouts > 0 {
                    format!(", {timeouts} not seen within 10 s")
                } else {
                    String::new()
                }
            ),
            pass: timeouts == 0 && max <= 100.0,
        });
    }
    if !r.watch.is_empty() {
        let max = r
            .watch
            .iter()
            .map(|w| w.after_event.max)
            .fold(0.0, f64::max);
        let p50 = r
            .watch
            .iter()
            .map(|w| w.after_event.p50)
            .fold(0.0, f64::max);
        let timeouts: usize = r.watch.iter().map(|w| w.timeouts).sum();
        out.push(Target {
            target: "annotation watch event → SNAT in the kernel ≤ 100 ms (nft and legacy)".into(),
            measured: format!(
                "p50 ≤ {}, max {} over {} changes{}",
                fmt_ms(p50),
                fmt_ms(max),
                r.watch.iter().map(|w| w.after_event.n).sum::<usize>(),
                if timeouts > 0 {
                    format!(", {timeouts} not seen within 10 s")
                } else {
                    String::new()
                }
            ),
            pass: timeouts == 0 && max <= 100.0,
        });
    }
    let nft_repairs: Vec<&Drift> = r
        .drift
        .iter()
        .filter(|d| d.backend == "nft" && d.detection == Detection::Notifications.name())
        .collect();
    if !nft_repairs.is_empty() {
        let max = nft_repairs
            .iter()
            .map(|d| d.latency.max)
            .fold(0.0, f64::max);
        let p50 = nft_repairs
            .iter()
            .map(|d| d.latency.p50)
            .fold(0.0, f64::max);
        let timeouts: usize = nft_repairs.iter().map(|d| d.timeouts).sum();
        out.push(Target {
            target: "drift repair ≤ 100 ms on nft (every repair observed)".into(),
            measured: format!(
                "p50 ≤ {}, max {} over {} repairs{}",
                fmt_ms(p50),
                fmt_ms(max),
                nft_repairs.iter().map(|d| d.latency.n).sum::<usize>(),
                if timeouts > 0 {
                    format!(", {timeouts} not repaired within 10 s")
                } else {
                    String::new()
                }
            ),
            pass: max <= 100.0 && timeouts == 0,
        });
    }
    // The target is for the configurations a node runs: nft with change notifications, legacy
    // with polling. nft polling is the baseline, shown in the table and not judged.
    for idle in r
        .idle
        .iter()
        .filter(|i| (i.backend == "nft") == (i.detection == Detection::Notifications.name()))
    {
        out.push(Target {
            target: format!(
                "idle CPU ≤ 0.5 % of one core: {} {} node",
                Detection::label_of(idle),
                idle.node
            ),
            measured: format!(
                "{:.3} % (daemon threads {:.3} %)",
                idle.cpu_with_children_pct, idle.cpu_daemon_pct
            ),
            pass: idle.cpu_with_children_pct <= 0.5,
        });
    }
    let mut rss: Vec<(String, u64)> = r
        .idle
        .iter()
        .map(|i| {
            (
                format!("idle {} {}", Detection::label_of(i), i.node),
                i.vm_hwm_kib,
            )
        })
        .collect();
    rss.extend(r.setegress.iter().map(|c| {
        (
            format!("SetEgress {} {} {} rules", c.backend, c.node, c.rules),
            c.daemon_vm_hwm_kib,
        )
    }));
    rss.extend(r.ten_thousand.iter().map(|t| {
        (
            format!(
                "{} rules {}",
                group_thousands(t.rules_requested as u64),
                t.backend
            ),
            t.daemon_vm_hwm_kib,
        )
    }));
    rss.extend(r.concurrency.iter().map(|c| {
        (
            format!("{} concurrent calls {}", c.calls, c.backend),
            c.daemon_vm_hwm_kib,
        )
    }));
    if let Some((what, kib)) = rss.iter().max_by_key(|(_, kib)| *kib) {
        let idle_max = r.idle.iter().map(|i| i.vm_hwm_kib).max().unwrap_or(0);
        out.push(Target {
            target: "peak RSS (VmHWM) ≤ 15 MiB".into(),
            measured: format!(
                "largest {:.1} MiB ({what}); idle daemons ≤ {:.1} MiB",
                *kib as f64 / 1024.0,
                idle_max as f64 / 1024.0
            ),
            pass: *kib <= 15 * 1024,
        });
    }
    out
}

impl Detection {
    /// `BACKEND (DETECTION)` of an idle daemon.
    fn label_of(idle: &Idle) -> String {
        format!("{} ({})", idle.backend, idle.detection)
    }
}
