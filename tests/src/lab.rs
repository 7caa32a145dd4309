//! The lab: three network namespaces pod → node → upstream, their addresses and routes, the
//! upstream listeners that report the source address they see, and the node's nat table.
//!
//! ```text
//!  pod                      node                                      upstream
//!  eth0 10.44.0.2/24  ──  pod0 10.44.0.1/24       up0 192.0.2.10/24  ──  eth0 192.0.2.1/24
//!       fd00:44::2/64          fd00:44::1/64          198.51.100.20/32        2001:db8:1::1/64
//!                                                     2001:db8:1::10/64  lo   203.0.113.1
//!                                                     2001:db8:2::20/128      2001:db8:ff::1
//! ```
//!
//! The node forwards; its default routes point at upstream (192.0.2.1, 2001:db8:1::1). Upstream
//! routes 198.51.100.0/24 and 2001:db8:2::/64 back via the node but has no route to the pod
//! ranges, so pod traffic reaches the services only when the node NATs it. Under MASQUERADE the
//! services see the primary addresses 192.0.2.10 / 2001:db8:1::10; with SNAT to the preferred
//! addresses they see 198.51.100.20 / 2001:db8:2::20.

use crate::cmd::{self, Captured, run_in, run_in_ok, run_ok};
use crate::daemon::{Daemon, DaemonConfig};
use crate::kg::KgAgent;
use crate::{POLL_INTERVAL, bin_path};
use anyhow::{Context, bail};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The TCP port of the upstream listeners.
pub const PROBE_PORT: u16 = 8080;

/// How long one probe connection may take before it counts as failed.
pub const PROBE_TIMEOUT_MS: u32 = 2000;

/// An IP address family, with the lab's addresses of that family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// IPv4, programmed with iptables.
    V4,
    /// IPv6, programmed with ip6tables.
    V6,
}

impl Family {
    /// Both families.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// "IPv4" or "IPv6".
    pub fn name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The other family.
    pub fn other(self) -> Family {
        match self {
            Family::V4 => Family::V6,
            Family::V6 => Family::V4,
        }
    }

    /// The node's primary uplink address: what upstream sees under MASQUERADE.
    pub fn primary(self) -> &'static str {
        match self {
            Family::V4 => "192.0.2.10",
            Family::V6 => "2001:db8:1::10",
        }
    }

    /// The node's preferred address, outside the gateway's subnet: what upstream sees after SNAT.
    pub fn preferred(self) -> &'static str {
        match self {
            Family::V4 => "198.51.100.20",
            Family::V6 => "2001:db8:2::20",
        }
    }

    /// The upstream service address the pod connects to.
    pub fn service(self) -> &'static str {
        match self {
            Family::V4 => "203.0.113.1",
            Family::V6 => "2001:db8:ff::1",
        }
    }

    /// The pod's address.
    pub fn pod_addr(self) -> &'static str {
        match self {
            Family::V4 => "10.44.0.2",
            Family::V6 => "fd00:44::2",
        }
    }

    /// The pod CIDR whose traffic the node NATs.
    pub fn pod_cidr(self) -> &'static str {
        match self {
            Family::V4 => "10.44.0.0/24",
            Family::V6 => "fd00:44::/64",
        }
    }

    /// `iptables` or `ip6tables`.
    pub fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }
}

/// The iptables implementation: the kernel's nf_tables or the legacy x_tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `iptables-nft`.
    Nft,
    /// `iptables-legacy`.
    Legacy,
}

impl Backend {
    /// "nft" or "legacy", as `--iptables-backend` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The backend named `name` ("nft" or "legacy"); panics on anything else.
    pub fn from_name(name: &str) -> Backend {
        match name {
            "nft" => Backend::Nft,
            "legacy" => Backend::Legacy,
            other => panic!("unknown iptables backend {other:?}: expected nft or legacy"),
        }
    }
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn random_suffix() -> String {
    let mut bytes = [0u8; 2];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("read /dev/urandom");
    format!("{:04x}", u16::from_be_bytes(bytes))
}

/// Three network namespaces pod → node → upstream, created by [`Lab::new`] and removed, with
/// every process started in them, when the lab is dropped.
pub struct Lab {
    /// The pod namespace.
    pub pod: String,
    /// The node namespace, where kilo-egressd and every iptables command run.
    pub node: String,
    /// The upstream namespace with the service listeners.
    pub upstream: String,
    dir: TempDir,
    children: Mutex<Vec<Child>>,
    daemons: AtomicU32,
    /// A second node's lab shares the first lab's upstream and leaves it alone when dropped.
    shares_upstream: bool,
}

impl Lab {
    /// A lab's names (nothing created yet): unique per process, lab and run,
    /// `ke<pid>x<counter><random>` plus `p`, `n`, `u`; with `upstream`, that upstream is shared
    /// and left alone when this lab is dropped.
    fn named(upstream: Option<String>) -> anyhow::Result<Lab> {
        let base = format!(
            "ke{}x{}{}",
            std::process::id(),
            LAB_COUNTER.fetch_add(1, Ordering::Relaxed),
            random_suffix()
        );
        Ok(Lab {
            pod: format!("{base}p"),
            node: format!("{base}n"),
            shares_upstream: upstream.is_some(),
            upstream: upstream.unwrap_or_else(|| format!("{base}u")),
            dir: tempfile::Builder::new()
                .prefix("kilo-egress-lab-")
                .tempdir()
                .context("create the lab's temporary directory")?,
            children: Mutex::new(Vec::new()),
            daemons: AtomicU32::new(0),
        })
    }

    /// Creates the namespaces, links, addresses and routes, and starts the upstream listeners.
    /// Names are unique per process, lab and run: `ke<pid>x<counter><random>` plus `p`, `n`, `u`.
    pub fn new() -> anyhow::Result<Lab> {
        let lab = Lab::named(None)?;
        let base = lab.node[..lab.node.len() - 1].to_owned();
        lab.build().with_context(|| format!("build lab {base}"))?;
        Ok(lab)
    }

    /// A second node behind this lab's upstream, with its own pod (the same pod addresses, so
    /// [`DaemonConfig::own`](crate::DaemonConfig::own) fits) on its own link to upstream:
    /// [`SECOND_NODE_PRIMARY`] / [`SECOND_NODE_PRIMARY_V6`]. Upstream routes a floating address
    /// to whichever node holds it as the cloud does ([`Lab::route_floating`]). Dropping it
    /// removes its pod and node, never the shared upstream.
    pub fn second_node(&self) -> anyhow::Result<Lab> {
        let lab = Lab::named(Some(self.upstream.clone()))?;
        let base = lab.node[..lab.node.len() - 1].to_owned();
        let (pod, node, up) = (lab.pod.as_str(), lab.node.as_str(), self.upstream.as_str());
        add_namespaces(&[pod, node], node)?;
        let upstream_end = format!("n{}", &base[base.len() - 6..]);
        link_pod(pod, node)?;
        run_ok(
            "ip",
            &[
                "-n",
                node,
                "link",
                "add",
                "up0",
                "type",
                "veth",
                "peer",
                "name",
                &upstream_end,
                "netns",
                up,
            ],
        )?;
        ip(node, &format!("addr add {SECOND_NODE_PRIMARY}/24 dev up0"))?;
        ip(
            node,
            &format!("addr add {SECOND_NODE_PRIMARY_V6}/64 dev up0 nodad"),
        )?;
        ip(up, &format!("addr add 10.99.0.1/24 dev {upstream_end}"))?;
        ip(
            up,
            &format!("addr add fd00:99::1/64 dev {upstream_end} nodad"),
        )?;
        for (ns, dev) in [
            (pod, "eth0"),
            (node, "pod0"),
            (node, "up0"),
            (up, upstream_end.as_str()),
        ] {
            ip(ns, &format!("link set {dev} up"))?;
        }
        ip(node, "route add default via 10.99.0.1")?;
        ip(node, "-6 route add default via fd00:99::1")?;
        Ok(lab)
    }

    /// Makes upstream route `addr` (a /32 or /128) to `via`, as a cloud does when a floating
    /// address moves to another instance.
    pub fn route_floating(&self, addr: &str, via: &str) -> anyhow::Result<()> {
        let prefix = if addr.contains(':') { 128 } else { 32 };
        ip(
            &self.upstream,
            &format!("route replace {addr}/{prefix} via {via}"),
        )
        .map(|_| ())
    }

    fn build(&self) -> anyhow::Result<()> {
        let (pod, node, up) = (
            self.pod.as_str(),
            self.node.as_str(),
            self.upstream.as_str(),
        );
        add_namespaces(&[pod, node, up], node)?;
        // Veths are created inside the namespaces, never in the root namespace.
        link_pod(pod, node)?;
        run_ok(
            "ip",
            &[
                "-n", node, "link", "add", "up0", "type", "veth", "peer", "name", "eth0", "netns",
                up,
            ],
        )?;

        ip(node, "addr add 192.0.2.10/24 dev up0")?;
        ip(node, "addr add 198.51.100.20/32 dev up0")?;
        // IPv6 source selection breaks ties by taking the most recently added address, and the
        // two node addresses tie for 2001:db8:ff::1: add the preferred one first so MASQUERADE
        // picks the primary one.
        ip(node, "addr add 2001:db8:2::20/128 dev up0 nodad")?;
        ip(node, "addr add 2001:db8:1::10/64 dev up0 nodad")?;
        ip(up, "addr add 192.0.2.1/24 dev eth0")?;
        ip(up, "addr add 2001:db8:1::1/64 dev eth0 nodad")?;
        ip(up, "addr add 203.0.113.1/32 dev lo")?;
        ip(up, "addr add 2001:db8:ff::1/128 dev lo")?;
        for (ns, dev) in [(node, "up0"), (up, "eth0")] {
            ip(ns, &format!("link set {dev} up"))?;
        }
        ip(node, "route add default via 192.0.2.1")?;
        ip(node, "-6 route add default via 2001:db8:1::1")?;
        ip(up, "route add 198.51.100.0/24 via 192.0.2.10")?;
        ip(up, "-6 route add 2001:db8:2::/64 via 2001:db8:1::10")?;

        for family in Family::ALL {
            self.start_listener(family.service())?;
        }
        Ok(())
    }

    fn start_listener(&self, addr: &str) -> anyhow::Result<()> {
        let log = self.dir.path().join(format!("listener-{addr}.log"));
        let port = PROBE_PORT.to_string();
        let mut child = cmd::netns_command(
            &self.upstream,
            bin_path("egress-probe"),
            &["listen", addr, &port],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("start egress-probe listen")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        self.children.lock().expect("lab children").push(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("listening on") {
            bail!(
                "egress-probe listen {addr} did not start: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        Ok(())
    }

    /// A directory that lives as long as the lab, for state directories, sockets and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn next_daemon_id(&self) -> u32 {
        self.daemons.fetch_add(1, Ordering::Relaxed)
    }

    /// Runs `program args` in the namespace `ns` and captures its output (whatever its exit code).
    pub fn exec(&self, ns: &str, program: &str, args: &[&str]) -> anyhow::Result<Captured> {
        run_in(ns, program, args)
    }

    /// The source address upstream sees when the pod connects to the family's service, i.e.
    /// what the node's NAT made of the pod's address. An error when the connection fails.
    pub fn seen_source(&self, family: Family) -> anyhow::Result<String> {
        self.seen_source_within(family, PROBE_TIMEOUT_MS)
    }

    /// [`Lab::seen_source`] with a connection timeout of `timeout_ms` milliseconds.
    pub fn seen_source_within(&self, family: Family, timeout_ms: u32) -> anyhow::Result<String> {
        let port = PROBE_PORT.to_string();
        let timeout = timeout_ms.to_string();
        let out = run_in(
            &self.pod,
            bin_path("egress-probe"),
            &["connect", family.service(), &port, "--timeout-ms", &timeout],
        )?;
        if !out.success() {
            bail!(
                "pod could not reach upstream {} over {}: {}",
                family.service(),
                family.name(),
                out.stderr.trim()
            );
        }
        Ok(out.stdout.trim().to_owned())
    }

    /// Polls [`Lab::seen_source`] until upstream sees `expected`; the error names what it saw.
    pub fn wait_for_source(
        &self,
        family: Family,
        expected: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let seen = self.seen_source(family);
            match &seen {
                Ok(addr) if addr == expected => return Ok(()),
                _ if Instant::now() >= deadline => bail!(
                    "upstream did not see {expected} over {} within {timeout:?}; last: {seen:?}",
                    family.name()
                ),
                _ => std::thread::sleep(POLL_INTERVAL),
            }
        }
    }

    /// Runs `ip ARGS` in the node namespace, e.g. `addr add 198.51.100.21/32 dev up0`: the
    /// node's addresses come and go as a cloud or keepalived would move them.
    pub fn node_ip(&self, args: &str) -> anyhow::Result<()> {
        ip(&self.node, args).map(|_| ())
    }

    /// The node's nat table for one backend and family.
    pub fn iptables(&self, backend: Backend, family: Family) -> Iptables<'_> {
        Iptables::new(&self.node, backend, family)
    }

    /// Both families' full `-t nat -S` dumps for one backend, labelled, as one string.
    pub fn nat_dumps(&self, backend: Backend) -> anyhow::Result<String> {
        let mut out = String::new();
        for family in Family::ALL {
            out.push_str(&format!(
                "# {}-{} -t nat -S\n",
                family.iptables(),
                backend.name()
            ));
            out.push_str(&self.iptables(backend, family).nat_dump()?);
        }
        Ok(out)
    }

    /// Starts kilo-egressd in the node namespace and waits until it reports SERVING.
    pub fn start_daemon(&self, config: DaemonConfig) -> anyhow::Result<Daemon<'_>> {
        Daemon::start(self, config)
    }

    /// A Kilo-agent look-alike writing KILO-NAT for one backend and family.
    pub fn kg(&self, backend: Backend, family: Family) -> KgAgent<'_> {
        KgAgent::new(self.iptables(backend, family))
    }
}

/// The primary address of [`Lab::second_node`] on its link to upstream.
pub const SECOND_NODE_PRIMARY: &str = "10.99.0.11";
/// Its IPv6 primary address.
pub const SECOND_NODE_PRIMARY_V6: &str = "fd00:99::11";

impl Drop for Lab {
    fn drop(&mut self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let own: Vec<&String> = if self.shares_upstream {
            vec![&self.pod, &self.node]
        } else {
            vec![&self.pod, &self.node, &self.upstream]
        };
        for ns in own {
            // Anything still running in a namespace of this lab was started by this test.
            if let Ok(out) = cmd::capture(
                std::process::Command::new("ip").args(["netns", "pids", ns]),
                None,
            ) {
                for pid in out.stdout.split_whitespace().filter_map(|p| p.parse().ok()) {
                    cmd::kill_pid(pid, "KILL");
                }
            }
            let _ = cmd::capture(
                std::process::Command::new("ip").args(["netns", "del", ns]),
                None,
            );
        }
    }
}

/// Links `pod` to `node` (`eth0` ↔ `pod0`) with the lab's pod addresses, both links up, and the
/// pod's default routes through the node.
fn link_pod(pod: &str, node: &str) -> anyhow::Result<()> {
    run_ok(
        "ip",
        &[
            "-n", pod, "link", "add", "eth0", "type", "veth", "peer", "name", "pod0", "netns", node,
        ],
    )?;
    ip(pod, "addr add 10.44.0.2/24 dev eth0")?;
    ip(pod, "addr add fd00:44::2/64 dev eth0 nodad")?;
    ip(node, "addr add 10.44.0.1/24 dev pod0")?;
    ip(node, "addr add fd00:44::1/64 dev pod0 nodad")?;
    ip(pod, "link set eth0 up")?;
    ip(node, "link set pod0 up")?;
    ip(pod, "route add default via 10.44.0.1")?;
    ip(pod, "-6 route add default via fd00:44::1")?;
    Ok(())
}

/// Creates `namespaces` without duplicate address detection (addresses usable at once) and with
/// `lo` up; `router` forwards IPv4 and IPv6.
fn add_namespaces(namespaces: &[&str], router: &str) -> anyhow::Result<()> {
    for ns in namespaces {
        run_ok("ip", &["netns", "add", ns])?;
        run_in_ok(
            ns,
            "sysctl",
            &[
                "-qw",
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        ip(ns, "link set lo up")?;
    }
    run_in_ok(
        router,
        "sysctl",
        &[
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ],
    )?;
    Ok(())
}

fn ip(ns: &str, args: &str) -> anyhow::Result<Captured> {
    let mut full = vec!["-n", ns];
    full.extend(args.split_whitespace());
    run_ok("ip", &full)
}

/// The nat table of the lab's node for one iptables backend and address family.
#[derive(Debug, Clone, Copy)]
pub struct Iptables<'lab> {
    ns: &'lab str,
    /// The backend every command uses.
    pub backend: Backend,
    /// The family every command uses.
    pub family: Family,
}

impl<'ns> Iptables<'ns> {
    /// The nat table of the network namespace `ns` for one backend and family.
    pub fn new(ns: &'ns str, backend: Backend, family: Family) -> Self {
        Iptables {
            ns,
            backend,
            family,
        }
    }

    /// The binary, e.g. `ip6tables-legacy`.
    pub fn binary(&self) -> String {
        format!("{}-{}", self.family.iptables(), self.backend.name())
    }

    /// The restore binary, e.g. `iptables-nft-restore`.
    pub fn restore_binary(&self) -> String {
        format!("{}-restore", self.binary())
    }

    /// Runs the backend's iptables with `-w` (wait for the xtables lock) and `args` in the node
    /// namespace; fails unless it exits 0.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<Captured> {
        let mut full = vec!["-w"];
        full.extend_from_slice(args);
        run_in_ok(self.ns, self.binary(), &full)
    }

    /// True when `-C` finds the rule `args` (e.g. `["POSTROUTING", "-s", ...]`) in the nat table.
    pub fn has_rule(&self, args: &[&str]) -> anyhow::Result<bool> {
        let mut full = vec!["-w", "-t", "nat", "-C"];
        full.extend_from_slice(args);
        Ok(run_in(self.ns, self.binary(), &full)?.success())
    }

    /// The whole nat table as `-t nat -S` prints it.
    pub fn nat_dump(&self) -> anyhow::Result<String> {
        Ok(self.run(&["-t", "nat", "-S"])?.stdout)
    }

    /// One chain of the nat table as `-t nat -S CHAIN` prints it; an error when it is missing.
    pub fn iptables_s(&self, chain: &str) -> anyhow::Result<String> {
        Ok(self.run(&["-t", "nat", "-S", chain])?.stdout)
    }

    /// The `-A CHAIN ...` lines of `chain` in kernel order; empty when the chain does not exist.
    pub fn rules(&self, chain: &str) -> anyhow::Result<Vec<String>> {
        let prefix = format!("-A {chain} ");
        Ok(self
            .nat_dump()?
            .lines()
            .filter(|line| line.starts_with(&prefix))
            .map(str::to_owned)
            .collect())
    }

    /// Feeds `input` (a complete `*nat ... COMMIT` text) to the backend's
    /// `iptables-restore --noflush`; fails unless it exits 0.
    pub fn restore_noflush(&self, input: &str) -> anyhow::Result<()> {
        let bin = self.restore_binary();
        cmd::capture(
            &mut cmd::netns_command(self.ns, &bin, &["-w", "--noflush"]),
            Some(input),
        )?
        .ok()
        .with_context(|| format!("{bin} --noflush with input:\n{input}"))?;
        Ok(())
    }

    /// Polls [`Iptables::nat_dump`] until it equals `expected`; the error shows both dumps.
    pub fn wait_for_nat_dump(&self, expected: &str, timeout: Duration) -> anyhow::Result<()> {
        let mut last = String::new();
        let matched = crate::poll_until(timeout, || {
            last = self
                .nat_dump()
                .unwrap_or_else(|e| format!("(dump failed: {e:#})"));
            last == expected
        });
        if !matched {
            bail!(
                "{} nat table did not return to the expected dump within {timeout:?}\n\
                 --- expected ---\n{expected}--- last seen ---\n{last}",
                self.binary()
            );
        }
        Ok(())
    }
}
