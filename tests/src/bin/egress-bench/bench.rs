//! What every phase shares: the [`Bench`] (the plan and the tokio runtime) with its lab and
//! client helpers, the daemon's configuration in own mode, running a timing job in the node
//! namespace ([`in_node`]), and reading the daemon's pid, memory and chain.

use crate::plan::{Detection, Node, Plan};
use crate::stats::Summary;
use crate::worker::{Job, Samples};
use anyhow::{Context, bail};
use kilo_egress::{EgressClient, ServerAddr, api};
use kilo_egress_tests::{Backend, BusyNode, Daemon, DaemonConfig, Family, Lab, Mode, cmd};
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

/// The chain kilo-egressd owns in own mode.
pub const CHAIN: &str = "KILO-NAT";
/// The two addresses SetEgress switches between, so every call is a real change.
pub const ADDR_A: &str = "198.51.100.20";
/// The other of the two addresses.
pub const ADDR_B: &str = "198.51.100.21";

/// One run: its plan and the runtime the gRPC client runs on. The phases are its methods.
pub struct Bench<'a> {
    /// Sizes and iteration counts.
    pub plan: &'a Plan,
    /// The runtime of the gRPC clients.
    pub rt: &'a tokio::runtime::Runtime,
}

impl Bench<'_> {
    /// A fresh lab; for a busy node, with kube-proxy's rules installed for the backend.
    pub fn lab(&self, backend: Backend, node: Node) -> anyhow::Result<Lab> {
        let lab = Lab::new()?;
        // The switches alternate between two addresses the node holds (an absent one would be
        // programmed as MASQUERADE).
        lab.node_ip(&format!("addr add {ADDR_B}/32 dev up0"))?;
        if node == Node::Busy {
            BusyNode {
                services: self.plan.busy_services,
            }
            .install(&lab.iptables(backend, Family::V4))?;
        }
        Ok(lab)
    }

    /// A gRPC client of `daemon` over its unix socket.
    pub fn client(&self, daemon: &Daemon<'_>) -> anyhow::Result<EgressClient> {
        let addr = ServerAddr::Unix(daemon.socket().to_path_buf());
        Ok(self
            .rt
            .block_on(EgressClient::connect(&addr, Duration::from_secs(30)))?)
    }

    /// SetEgress to `addr` (IPv4), checking the reply carries it.
    pub fn set(&self, client: &mut EgressClient, addr: &str) -> anyhow::Result<()> {
        let reply = self
            .rt
            .block_on(client.set_egress(vec![addr.to_owned()], false, None))?;
        let got = reply.egress.map(|e| e.ipv4).unwrap_or_default();
        if got != addr {
            bail!("SetEgress {addr} answered with {got:?}");
        }
        Ok(())
    }

    /// GetRules.
    pub fn get(&self, client: &mut EgressClient) -> anyhow::Result<api::GetRulesResponse> {
        Ok(self.rt.block_on(client.get_rules())?)
    }
}

/// Runs `job` in the node namespace of `lab` (`ip netns exec NODE egress-bench worker`).
pub fn in_node(lab: &Lab, job: &Job) -> anyhow::Result<Samples> {
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

/// Summarises samples in nanoseconds (an empty summary when there are none).
pub fn nanos_summary(ns: &[u64]) -> Summary {
    let ms: Vec<f64> = ns.iter().map(|n| *n as f64 / 1e6).collect();
    Summary::of_ms(&ms).unwrap_or_default()
}

/// `n` distinct /32 destinations in 172.16.0.0/12, outside every range the lab uses.
fn no_nat_cidrs(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("172.{}.{}.{}/32", 16 + i / 65536, (i / 256) % 256, i % 256))
        .collect()
}

/// Own mode, IPv4 only, `rules` RETURN rules (passed in chunks: one argument may hold at most
/// 128 KiB).
pub fn own_config(backend: Backend, rules: usize, detection: Detection) -> DaemonConfig {
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
        env: Vec::new(),
        state_dir: None,
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
pub fn daemon_pid(lab: &Lab) -> anyhow::Result<u32> {
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
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_default()
}

/// The KILO-NAT rules of IPv4 in a GetRules reply, in kernel order.
pub fn chain_specs(reply: &api::GetRulesResponse) -> Vec<String> {
    reply
        .families
        .iter()
        .filter(|f| f.family == api::Family::Ipv4 as i32)
        .flat_map(|f| f.rules.iter())
        .filter(|r| r.chain == CHAIN)
        .map(|r| r.spec.clone())
        .collect()
}
