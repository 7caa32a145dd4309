//! `egress-bench`: measures kilo-egressd against the real kernel, in network namespaces it creates
//! (see `kilo_egress_tests::Lab`), and writes `results.json`, `results.md` and `setegress.svg`.
//!
//! In one run, for the nft and legacy backends, on an idle node and on a busy one (20,000
//! kube-proxy-like rules in 2,000 chains):
//!
//! 1. SetEgress round trip (Rust client over the unix socket → reply after the kernel commit)
//!    against one bare `iptables-restore --noflush` of the same full chain and against one
//!    `iptables -A` process per rule, for 10, 100, 1,000 and 5,000 RETURN rules;
//! 2. a 10,000-rule chain programmed at start: how many kernel transactions it took;
//! 3. 1,000 concurrent SetEgress calls against 1,000 sequential ones: wall time, transactions;
//! 4. drift repair latency (chain flushed, SNAT rule deleted → chain correct again), nft with
//!    change notifications, nft polling and legacy polling;
//! 5. idle CPU over a minute and peak RSS of the daemon;
//! 6. egress that follows the address (the chosen address removed and added back);
//! 7. the node watcher end to end: annotation written → SNAT in the kernel.
//!
//! Run it as root through `tests/bench.sh`, which builds everything in release mode first.
//! `egress-bench --quick` is a smoke run with tiny sizes (about a minute).
//!
//! This file holds the command line and runs the phases in order. Each phase is measured in its
//! own module (`setegress`, `ten_thousand`, `concurrency`, `drift`, `idle`, `address`, `watch`) on the shared
//! [`Bench`] (`bench`, `plan`); `results` holds what a run measured and judges the targets,
//! `report` writes the result files, `plot` draws the SVG, `stats` summarises samples and
//! `worker` runs the timing loops inside the node namespace (`egress-bench worker`).

#![forbid(unsafe_code)]

mod address;
mod bench;
mod concurrency;
mod drift;
mod idle;
mod plan;
mod plot;
mod report;
mod results;
mod setegress;
mod stats;
mod ten_thousand;
mod watch;
mod worker;

use anyhow::{Context, bail};
use bench::Bench;
use clap::{Parser, Subcommand};
use kilo_egress_tests::Backend;
use plan::{Detection, Node, Plan};
use results::{Results, loadavg, machine, targets};
use stats::{fmt_ms, group_thousands};
use std::path::{Path, PathBuf};
use std::time::Instant;
use worker::Job;

#[derive(Parser)]
#[command(name = "egress-bench", about = "Benchmark kilo-egressd (run as root)")]
struct Cli {
    #[command(subcommand)]
    worker: Option<WorkerCommand>,
    /// Tiny sizes and few iterations: a smoke run of every phase.
    #[arg(long)]
    quick: bool,
    /// Where results.json, results.md and setegress.svg are written (default docs/benchmarks,
    /// with --quick target/bench-quick).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these phases (comma-separated): setegress, ten-thousand, concurrent, drift, idle,
    /// address, watch.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Length of the idle CPU window.
    #[arg(long, default_value_t = 60)]
    idle_seconds: u64,
    /// Measure nothing: draw OUT/setegress.svg again from OUT/results.json.
    #[arg(long)]
    replot: bool,
}

#[derive(Subcommand)]
enum WorkerCommand {
    /// Internal: runs a timing job (JSON on stdin) in the current network namespace.
    #[command(hide = true)]
    Worker,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.worker {
        Some(WorkerCommand::Worker) => worker_main(),
        None if cli.replot => report::replot(
            cli.out
                .as_deref()
                .unwrap_or_else(|| Path::new("docs/benchmarks")),
        ),
        None => bench_main(&cli),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("egress-bench: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn worker_main() -> anyhow::Result<()> {
    let job: Job = serde_json::from_reader(std::io::stdin()).context("read the job")?;
    let samples = worker::run_job(&job)?;
    serde_json::to_writer(std::io::stdout(), &samples)?;
    Ok(())
}

fn only(cli: &Cli, phase: &str) -> bool {
    cli.only.is_empty() || cli.only.iter().any(|p| p == phase)
}

fn bench_main(cli: &Cli) -> anyhow::Result<()> {
    if !kilo_egress_tests::require_root("egress-bench") {
        bail!("run as root: sudo ./tests/bench.sh");
    }
    let plan = if cli.quick {
        Plan::quick()
    } else {
        Plan::full(cli.idle_seconds)
    };
    let started = Instant::now();
    let runtime = tokio::runtime::Runtime::new()?;
    let mut results = Results {
        quick: cli.quick,
        machine: Some(machine()),
        plan: Some(plan.clone()),
        ..Results::default()
    };
    println!(
        "egress-bench{}: load before: {}",
        if cli.quick { " --quick" } else { "" },
        results.machine.as_ref().map_or("", |m| &m.load_before)
    );
    let bench = Bench {
        plan: &plan,
        rt: &runtime,
    };
    for backend in [Backend::Nft, Backend::Legacy] {
        for node in [Node::Idle, Node::Busy] {
            let lab = bench.lab(backend, node)?;
            if only(cli, "setegress") {
                for &size in &plan.sizes {
                    let cell = bench.setegress_cell(&lab, backend, node, size)?;
                    println!(
                        "{:6} {} {:>5} rules: SetEgress {} | bare restore {} | per-rule {} | ratio {:.2} / {:.0}x",
                        backend.name(),
                        node.name(),
                        size,
                        cell.setegress.display(),
                        cell.bare_restore.display(),
                        cell.per_rule.display(),
                        cell.ratio_setegress_to_restore,
                        cell.ratio_per_rule_to_setegress
                    );
                    results.setegress.push(cell);
                }
            }
            if node == Node::Idle && only(cli, "ten-thousand") {
                let ten = bench.ten_thousand(&lab, backend)?;
                println!(
                    "{:6} {} rules at start: {} rules in the chain after {} kernel transaction(s)",
                    backend.name(),
                    group_thousands(ten.rules_requested as u64),
                    group_thousands(ten.rules_in_chain as u64),
                    ten.kernel_transactions
                );
                results.ten_thousand.push(ten);
            }
            if node == Node::Idle && only(cli, "concurrent") {
                let c = bench.concurrency(&lab, backend)?;
                println!(
                    "{:6} {} concurrent SetEgress: {} in {} transactions | sequential: {} in {} transactions",
                    backend.name(),
                    c.calls,
                    fmt_ms(c.concurrent_wall_ms),
                    c.concurrent_transactions,
                    fmt_ms(c.sequential_wall_ms),
                    c.sequential_transactions
                );
                results.concurrency.push(c);
            }
            if only(cli, "drift") {
                let detections: &[Detection] = match backend {
                    Backend::Nft => &[Detection::Notifications, Detection::Polling],
                    Backend::Legacy => &[Detection::Polling],
                };
                for &detection in detections {
                    for drift in bench.drift(&lab, backend, node, detection)? {
                        println!(
                            "{:6} {} drift repair, {}, {}: {} (poll {})",
                            backend.name(),
                            node.name(),
                            drift.detection,
                            drift.tamper,
                            drift.latency.display(),
                            fmt_ms(drift.poll.p50)
                        );
                        results.drift.push(drift);
                    }
                }
            }
        }
    }
    if only(cli, "address") {
        for backend in [Backend::Nft, Backend::Legacy] {
            let a = bench.address(backend)?;
            println!(
                "{:6} address removed → MASQUERADE {} | added → SNAT {} (poll {})",
                a.backend,
                a.removed.display(),
                a.added.display(),
                fmt_ms(a.poll.p50)
            );
            results.address.push(a);
        }
    }
    if only(cli, "watch") {
        for backend in [Backend::Nft, Backend::Legacy] {
            let w = bench.watch(backend)?;
            println!(
                "{:6} annotation → SNAT: after the watch event {} | after the write {} (poll {})",
                w.backend,
                w.after_event.display(),
                w.after_write.display(),
                fmt_ms(w.poll.p50)
            );
            results.watch.push(w);
        }
    }
    if only(cli, "idle") {
        results.idle = bench.idle()?;
        for idle in &results.idle {
            println!(
                "{:6} {} {}: idle CPU {:.3} % (with children {:.3} %), VmHWM {} KiB",
                idle.backend,
                idle.node,
                idle.detection,
                idle.cpu_daemon_pct,
                idle.cpu_with_children_pct,
                idle.vm_hwm_kib
            );
        }
    }
    results.duration_s = started.elapsed().as_secs_f64();
    if let Some(machine) = results.machine.as_mut() {
        machine.load_after = loadavg();
    }
    results.targets = targets(&results);
    let out = cli.out.clone().unwrap_or_else(|| {
        PathBuf::from(if cli.quick {
            "target/bench-quick"
        } else {
            "docs/benchmarks"
        })
    });
    report::write_outputs(&out, &results)?;
    println!("\n{}", report::markdown(&results));
    println!(
        "wrote {}/results.json, results.md, setegress.svg in {:.0} s",
        out.display(),
        results.duration_s
    );
    Ok(())
}
