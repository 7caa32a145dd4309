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
//! 5. idle CPU over a minute and peak RSS of the daemon.
//!
//! Run it as root through `tests/bench.sh`, which builds everything in release mode first.
//! `egress-bench --quick` is a smoke run with tiny sizes (about a minute).

#![forbid(unsafe_code)]

#[path = "../bench/plot.rs"]
mod plot;
#[path = "../bench/stats.rs"]
mod stats;
#[path = "../bench/worker.rs"]
mod worker;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use kilo_egress::{EgressClient, ServerAddr, api};
use kilo_egress_tests::{Backend, BusyNode, Daemon, DaemonConfig, Family, Lab, Mode, cmd};
use serde::Serialize;
use stats::{Summary, fmt_ms, group_thousands};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use worker::{Job, Samples};

/// The chain kilo-egressd owns in own mode.
const CHAIN: &str = "KILO-NAT";
/// The two addresses SetEgress switches between, so every call is a real change.
const ADDR_A: &str = "198.51.100.20";
const ADDR_B: &str = "198.51.100.21";

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
    /// Only these phases (comma-separated): setegress, ten-thousand, concurrent, drift, idle.
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

/// Sizes and iteration counts of one run.
#[derive(Debug, Clone, Serialize)]
struct Plan {
    sizes: Vec<usize>,
    warmup: usize,
    setegress_iterations: usize,
    restore_iterations: usize,
    /// Per size: at most this many per-rule rewrites.
    per_rule_iterations: Vec<(usize, usize)>,
    per_rule_budget_ms: u64,
    per_rule_rewrite_cap_ms: u64,
    pace_ms: u64,
    busy_services: usize,
    ten_thousand: usize,
    concurrent_calls: usize,
    concurrent_connections: usize,
    drift_rules: usize,
    drift_iterations: usize,
    drift_pause_ms: (u64, u64),
    idle_rules: usize,
    idle_seconds: u64,
}

impl Plan {
    fn full(idle_seconds: u64) -> Plan {
        Plan {
            sizes: vec![10, 100, 1000, 5000],
            warmup: 3,
            setegress_iterations: 30,
            restore_iterations: 30,
            per_rule_iterations: vec![(10, 10), (100, 5), (1000, 3), (5000, 1)],
            per_rule_budget_ms: 20_000,
            per_rule_rewrite_cap_ms: 30_000,
            pace_ms: 50,
            busy_services: 1000,
            ten_thousand: 10_000,
            concurrent_calls: 1000,
            concurrent_connections: 16,
            drift_rules: 100,
            drift_iterations: 12,
            drift_pause_ms: (100, 600),
            idle_rules: 100,
            idle_seconds,
        }
    }

    fn quick() -> Plan {
        Plan {
            sizes: vec![10, 100],
            warmup: 1,
            setegress_iterations: 5,
            restore_iterations: 5,
            per_rule_iterations: vec![(10, 2), (100, 1)],
            per_rule_budget_ms: 2_000,
            per_rule_rewrite_cap_ms: 2_000,
            pace_ms: 20,
            busy_services: 50,
            ten_thousand: 500,
            concurrent_calls: 50,
            concurrent_connections: 4,
            drift_rules: 10,
            drift_iterations: 2,
            drift_pause_ms: (50, 150),
            idle_rules: 10,
            idle_seconds: 3,
        }
    }

    fn per_rule_iterations(&self, size: usize) -> usize {
        self.per_rule_iterations
            .iter()
            .find(|(s, _)| *s == size)
            .map_or(1, |(_, n)| *n)
    }
}

/// An idle node, or one with kube-proxy's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Idle,
    Busy,
}

impl Node {
    fn name(self) -> &'static str {
        match self {
            Node::Idle => "idle",
            Node::Busy => "busy",
        }
    }
}

/// How the daemon finds drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Detection {
    Notifications,
    Polling,
}

impl Detection {
    fn name(self) -> &'static str {
        match self {
            Detection::Notifications => "nft change notifications",
            Detection::Polling => "polling every 1 s",
        }
    }
}

#[derive(Debug, Serialize)]
struct SetEgressCell {
    backend: String,
    node: String,
    rules: usize,
    setegress: Summary,
    /// The engine's own time per change (state file saved with fsync, then the commit), from
    /// the `duration_ms` of its "egress changed" log lines.
    engine_log: Summary,
    /// Saving a state file the way the daemon does (write, fsync, rename, fsync of the
    /// directory) in the lab's directory, on the same filesystem as the daemon's state.
    state_save: Summary,
    /// One `iptables-restore` of the add-only commit alone (`-I KILO-NAT <slot> <SNAT>`).
    insert_restore: Summary,
    /// One `iptables-restore` of the tidy alone (`-D KILO-NAT <old SNAT>`).
    delete_restore: Summary,
    bare_restore: Summary,
    per_rule: Summary,
    /// Per-rule rewrites stopped at the cap and extrapolated linearly (an underestimate).
    per_rule_extrapolated: usize,
    per_rule_measured_share: f64,
    ratio_setegress_to_restore: f64,
    ratio_per_rule_to_setegress: f64,
    /// Kernel transactions per SetEgress call (the commit and the tidy after the reply).
    transactions_per_call: f64,
    daemon_vm_hwm_kib: u64,
}

#[derive(Debug, Serialize)]
struct TenThousand {
    backend: String,
    rules_requested: usize,
    rules_in_chain: usize,
    kernel_transactions: u64,
    start_log_line: String,
    start_to_serving_ms: f64,
    daemon_vm_hwm_kib: u64,
}

#[derive(Debug, Serialize)]
struct Concurrency {
    backend: String,
    rules: usize,
    calls: usize,
    connections: usize,
    concurrent_wall_ms: f64,
    concurrent_transactions: u64,
    concurrent_failures: usize,
    sequential_wall_ms: f64,
    sequential_transactions: u64,
    wall_ratio_sequential_to_concurrent: f64,
    daemon_vm_hwm_kib: u64,
}

#[derive(Debug, Serialize)]
struct Drift {
    backend: String,
    node: String,
    detection: String,
    tamper: String,
    rules: usize,
    latency: Summary,
    /// One `iptables -S` poll: the resolution of the latency.
    poll: Summary,
    timeouts: usize,
}

#[derive(Debug, Serialize)]
struct Idle {
    backend: String,
    node: String,
    detection: String,
    rules: usize,
    seconds: f64,
    /// utime + stime of the daemon's own threads, % of one core.
    cpu_daemon_pct: f64,
    /// Plus cutime + cstime: the iptables processes it ran and reaped, % of one core.
    cpu_with_children_pct: f64,
    vm_hwm_kib: u64,
    vm_rss_kib: u64,
}

#[derive(Debug, Serialize)]
struct Target {
    target: String,
    measured: String,
    pass: bool,
}

#[derive(Debug, Serialize)]
struct Machine {
    date_utc: String,
    kernel: String,
    cpus: usize,
    cpu_model: String,
    iptables: String,
    load_before: String,
    load_after: String,
    build: String,
}

#[derive(Debug, Default, Serialize)]
struct Results {
    quick: bool,
    machine: Option<Machine>,
    plan: Option<Plan>,
    duration_s: f64,
    setegress: Vec<SetEgressCell>,
    ten_thousand: Vec<TenThousand>,
    concurrency: Vec<Concurrency>,
    drift: Vec<Drift>,
    idle: Vec<Idle>,
    targets: Vec<Target>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.worker {
        Some(WorkerCommand::Worker) => worker_main(),
        None if cli.replot => replot(
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

/// Runs `job` in the node namespace of `lab` (`ip netns exec NODE egress-bench worker`).
fn in_node(lab: &Lab, job: &Job) -> anyhow::Result<Samples> {
    let exe = std::env::current_exe()?;
    let mut child = cmd::netns_command(&lab.node, &exe, &["worker"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("start the worker")?;
    let input = serde_json::to_vec(job)?;
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(&input)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "worker failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("parse the worker's samples")
}

fn nanos_summary(ns: &[u64]) -> Summary {
    let ms: Vec<f64> = ns.iter().map(|n| *n as f64 / 1e6).collect();
    Summary::of_ms(&ms).unwrap_or_default()
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
    write_outputs(&out, &results)?;
    println!("\n{}", markdown(&results));
    println!(
        "wrote {}/results.json, results.md, setegress.svg in {:.0} s",
        out.display(),
        results.duration_s
    );
    Ok(())
}

struct Bench<'a> {
    plan: &'a Plan,
    rt: &'a tokio::runtime::Runtime,
}

/// `n` distinct /32 destinations in 172.16.0.0/12, outside every range the lab uses.
fn no_nat_cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("172.{}.{}.{}/32", 16 + i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

/// Own mode, IPv4 only, `rules` RETURN rules (passed in chunks: one argument may hold at most
/// 128 KiB).
fn own_config(backend: Backend, rules: usize, detection: Detection) -> DaemonConfig {
    let mut config = DaemonConfig {
        mode: Mode::Own,
        backend,
        auto_backend: false,
        args: vec![
            "--source-cidr".into(),
            Family::V4.pod_cidr().into(),
            "--ip-families".into(),
            "ipv4".into(),
            // The default, instead of the test harness's 1h.
            "--safety-check-interval".into(),
            "30s".into(),
        ],
    };
    for chunk in no_nat_cidrs(rules).chunks(1000) {
        config = config.arg("--no-nat-cidr").arg(chunk.join(","));
    }
    if detection == Detection::Polling && backend == Backend::Nft {
        config = config.arg("--kernel-notifications=false");
    }
    config
}

/// The pid of the kilo-egressd running in the lab's node namespace (`ip netns exec` execs it).
fn daemon_pid(lab: &Lab) -> anyhow::Result<u32> {
    let out = cmd::run_ok("ip", &["netns", "pids", &lab.node])?;
    out.stdout
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "kilo-egressd")
        })
        .with_context(|| format!("no kilo-egressd in netns {}", lab.node))
}

/// A `/proc/PID/status` field in KiB, e.g. `VmHWM`.
fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_default()
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

/// The KILO-NAT rules of IPv4 in a GetRules reply, in kernel order.
fn chain_specs(reply: &api::GetRulesResponse) -> Vec<String> {
    reply
        .families
        .iter()
        .filter(|f| f.family == api::Family::Ipv4 as i32)
        .flat_map(|f| f.rules.iter())
        .filter(|r| r.chain == CHAIN)
        .map(|r| r.spec.clone())
        .collect()
}

fn machine() -> Machine {
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

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

impl Bench<'_> {
    /// A fresh lab; for a busy node, with kube-proxy's rules installed for the backend.
    fn lab(&self, backend: Backend, node: Node) -> anyhow::Result<Lab> {
        let lab = Lab::new()?;
        if node == Node::Busy {
            BusyNode {
                services: self.plan.busy_services,
            }
            .install(&lab.iptables(backend, Family::V4))?;
        }
        Ok(lab)
    }

    fn client(&self, daemon: &Daemon<'_>) -> anyhow::Result<EgressClient> {
        let addr = ServerAddr::Unix(daemon.socket().to_path_buf());
        Ok(self
            .rt
            .block_on(EgressClient::connect(&addr, Duration::from_secs(30)))?)
    }

    fn set(&self, client: &mut EgressClient, addr: &str) -> anyhow::Result<()> {
        let reply = self
            .rt
            .block_on(client.set_egress(vec![addr.to_owned()], false, None))?;
        let got = reply.egress.map(|e| e.ipv4).unwrap_or_default();
        if got != addr {
            bail!("SetEgress {addr} answered with {got:?}");
        }
        Ok(())
    }

    fn get(&self, client: &mut EgressClient) -> anyhow::Result<api::GetRulesResponse> {
        Ok(self.rt.block_on(client.get_rules())?)
    }

    fn setegress_cell(
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

    fn ten_thousand(&self, lab: &Lab, backend: Backend) -> anyhow::Result<TenThousand> {
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

    fn concurrency(&self, lab: &Lab, backend: Backend) -> anyhow::Result<Concurrency> {
        let plan = self.plan;
        let rules = plan.drift_rules;
        // The server refuses SetEgress calls beyond 2 in flight per connection and 4 per identity
        // (RESOURCE_EXHAUSTED); raised here, so all the calls reach the engine's coalescing.
        let calls_limit = plan.concurrent_calls.to_string();
        let config = own_config(backend, rules, Detection::Notifications)
            .arg("--max-writes-per-connection")
            .arg(&calls_limit)
            .arg("--max-writes-per-identity")
            .arg(&calls_limit);
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

    fn drift(
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

    /// Six daemons side by side (nft notifications, nft polling, legacy polling; idle and busy
    /// node), each in its own lab, measured over the same idle window.
    fn idle(&self) -> anyhow::Result<Vec<Idle>> {
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
        let hz = clock_ticks_per_second();
        let pct = |ticks: u64| ticks as f64 / hz / seconds * 100.0;
        Ok(configs
            .iter()
            .zip(daemons.iter().zip(before.iter().zip(&after)))
            .map(|((backend, node, detection), ((pid, _), (b, a)))| Idle {
                backend: backend.name().into(),
                node: node.name().into(),
                detection: detection.name().into(),
                rules: self.plan.idle_rules,
                seconds,
                cpu_daemon_pct: pct(a.0 - b.0),
                cpu_with_children_pct: pct(a.0 + a.1 - b.0 - b.1),
                vm_hwm_kib: status_kib(*pid, "VmHWM"),
                vm_rss_kib: status_kib(*pid, "VmRSS"),
            })
            .collect())
    }
}

fn targets(r: &Results) -> Vec<Target> {
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
    fn label_of(idle: &Idle) -> String {
        format!("{} ({})", idle.backend, idle.detection)
    }
}

fn markdown(r: &Results) -> String {
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
    }
    md
}

fn write_outputs(dir: &Path, r: &Results) -> anyhow::Result<()> {
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
fn replot(dir: &Path) -> anyhow::Result<()> {
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
