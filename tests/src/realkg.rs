//! The real Kilo agent, `kg` (squat/kilo), in a lab's node namespace beside kilo-egressd in kilo
//! mode: [`RealKg`] starts it against the Kubernetes API emulator ([`ApiServer`]), stops it the
//! way a DaemonSet rollout does (SIGTERM: kg's default clean-up deletes KILO-NAT in both
//! families) or kills it (SIGKILL: the next start flushes KILO-NAT), and reads its metrics and
//! log.
//!
//! What kg needs to run here (see `shared/kilo/README.md`): the binary built by
//! `tests/setup/kg.sh` (`KILO_KG_BIN`); a userspace WireGuard interface (`wireguard-go`, this
//! kernel has no WireGuard module) with a machine-wide unique name, because its control socket
//! lives in `/var/run/wireguard/`; a private mount namespace in which `/var/lib` (its key) is a
//! directory of the lab and `/etc/hosts` names the node; `iptables` on `PATH` pointing at the
//! backend under test; a Node with `spec.podCIDR` (the lab's pod CIDR of the family under test, so
//! the pod's traffic really passes kg's POSTROUTING jump and chain) and at least one annotation.
//!
//! kg writes the POSTROUTING jump only for the Node's `spec.podCIDR`, one family: a Node whose
//! pod CIDR is IPv6 gets an ip6tables jump and no iptables jump (and the other way round). Both
//! families always get the chain and its MASQUERADE rule.

use crate::cmd::{self, Captured};
use crate::kube::{self, ApiServer, NODE};
use crate::lab::{Backend, Family, Iptables, Lab};
use crate::{poll_until, require_root, skip_or_fail};
use anyhow::{Context, bail};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The environment variable that names the kg binary (exported by `tests/setup/kg.sh`).
pub const KG_BIN_ENV: &str = "KILO_KG_BIN";

/// Where kg serves its metrics, inside the node namespace.
pub const METRICS_ADDR: &str = "127.0.0.1:1107";

/// How long kg may take from its start until its rules are in place and settled (it syncs its
/// informers first; about 1 s on a quiet machine).
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The comment prefix of the rules kilo-egressd writes.
pub const OWNED_COMMENT: &str = "--comment \"kilo-egress:";

/// The comment prefix of the rules kg writes.
pub const KG_COMMENT: &str = "--comment \"Kilo:";

/// The comment of kg's MASQUERADE rule.
pub const MASQUERADE_COMMENT: &str = crate::kg::MASQUERADE_COMMENT;

/// The comment of kg's POSTROUTING jump.
pub const JUMP_COMMENT: &str = crate::kg::JUMP_COMMENT;

/// kg's iptables operations that change the kernel (its metric `kilo_iptables_operations_total`
/// also counts reads: `List`, `ListChains`, `Exists`). `NewChain` is its "does the chain
/// exist" probe, a write only when the chain was missing.
pub const WRITE_OPERATIONS: [&str; 6] = [
    "AppendUnique",
    "InsertUnique",
    "Delete",
    "ClearChain",
    "DeleteChain",
    "NewChain",
];

static KG_COUNTER: AtomicU32 = AtomicU32::new(0);

/// The kg binary named by `KILO_KG_BIN`, when it exists.
pub fn kg_binary() -> Option<PathBuf> {
    std::env::var_os(KG_BIN_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_file())
}

/// True when the test may run kg: root, kmock, `wireguard-go`, `curl` and the kg binary
/// (`KILO_KG_BIN`, set by `tests/setup/kg.sh`). Otherwise it panics when `CI=true`, or prints a
/// loud `SKIPPED (...)` and returns false.
pub fn require_kg(test: &str) -> bool {
    if !(require_root(test)
        && kube::require_kmock(test)
        && kube::require_tool(test, "wireguard-go")
        && kube::require_tool(test, "curl"))
    {
        return false;
    }
    kg_binary().is_some()
        || skip_or_fail(
            test,
            &format!(
                "needs Kilo's agent kg: {KG_BIN_ENV} is {:?}; `source tests/setup/kg.sh` (tests/run.sh does) builds it and sets it",
                std::env::var_os(KG_BIN_ENV)
            ),
        )
}

/// Registers [`NODE`] in the emulator the way kg needs it: `spec.podCIDR` is the lab's pod CIDR
/// of `family`, plus one harmless annotation and `annotations` (`KEY=VALUE`).
pub fn register_node(
    api: &ApiServer<'_>,
    family: Family,
    annotations: &[&str],
) -> anyhow::Result<()> {
    let mut args = vec![
        "create-node",
        "--pod-cidr",
        family.pod_cidr(),
        NODE,
        "kilo-egress.test/lab=real-kg",
    ];
    args.extend_from_slice(annotations);
    api.ctl(&args).map(drop)
}

/// How to run kg.
#[derive(Debug, Clone)]
pub struct KgConfig {
    /// The iptables backend kg finds on its `PATH`.
    pub backend: Backend,
    /// The family of the Node's pod CIDR (the one kg writes a POSTROUTING jump for).
    pub family: Family,
    /// `--resync-period`.
    pub resync_period: Duration,
    /// `--service-cidr` values.
    pub service_cidrs: Vec<String>,
    /// Further arguments.
    pub args: Vec<String>,
}

impl KgConfig {
    /// kg for `backend` on a Node whose pod CIDR is the lab's of `family`, with kg's default
    /// resync period (30 s) and no service CIDR.
    pub fn new(backend: Backend, family: Family) -> Self {
        KgConfig {
            backend,
            family,
            resync_period: Duration::from_secs(30),
            service_cidrs: Vec::new(),
            args: Vec::new(),
        }
    }

    /// Sets `--resync-period`.
    pub fn resync_period(mut self, period: Duration) -> Self {
        self.resync_period = period;
        self
    }

    /// Adds a `--service-cidr`.
    pub fn service_cidr(mut self, cidr: &str) -> Self {
        self.service_cidrs.push(cidr.to_owned());
        self
    }
}

/// kg's counters, read from its `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KgMetrics {
    /// Every `kilo_iptables_operations_total` sample: (operation, protocol, chain, value).
    pub operations: Vec<(String, String, String, u64)>,
    /// `kilo_reconciles_total`.
    pub reconciles: u64,
    /// `kilo_errors_total`, all events.
    pub errors: u64,
}

impl KgMetrics {
    /// Parses the Prometheus text format.
    pub fn parse(text: &str) -> Self {
        let mut metrics = KgMetrics::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let value = value.parse::<f64>().unwrap_or_default() as u64;
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let label = |key: &str| -> String {
                labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=\"")))
                    .map(|v| v.trim_end_matches(['}', '"']).to_owned())
                    .unwrap_or_default()
            };
            match name {
                "kilo_iptables_operations_total" => metrics.operations.push((
                    label("operation"),
                    label("protocol"),
                    label("chain"),
                    value,
                )),
                "kilo_reconciles_total" => metrics.reconciles = value,
                "kilo_errors_total" => metrics.errors += value,
                _ => {}
            }
        }
        metrics
    }

    /// The sum of the operations for which `pick(operation, protocol)` holds.
    pub fn sum(&self, pick: impl Fn(&str, &str) -> bool) -> u64 {
        self.operations
            .iter()
            .filter(|(op, proto, _, _)| pick(op, proto))
            .map(|(_, _, _, v)| v)
            .sum()
    }

    /// iptables operations that change the kernel ([`WRITE_OPERATIONS`]), both families.
    pub fn writes(&self) -> u64 {
        self.sum(|op, _| WRITE_OPERATIONS.contains(&op))
    }

    /// iptables operations that only read, both families.
    pub fn reads(&self) -> u64 {
        self.sum(|op, _| !WRITE_OPERATIONS.contains(&op))
    }

    /// How often kg flushed (or created) KILO-NAT of `family` since it started.
    pub fn clear_chains(&self, family: Family) -> u64 {
        let protocol = family.name();
        self.operations
            .iter()
            .filter(|(op, proto, chain, _)| {
                op == "ClearChain" && proto == protocol && chain == "KILO-NAT"
            })
            .map(|(_, _, _, v)| v)
            .sum()
    }
}

/// True for a rule kilo-egressd wrote.
pub fn is_owned(rule: &str) -> bool {
    rule.contains(OWNED_COMMENT)
}

/// True for a rule kg wrote.
pub fn is_kg(rule: &str) -> bool {
    rule.contains(KG_COMMENT)
}

/// True for kg's `Kilo: NAT remaining packets` MASQUERADE rule.
pub fn is_kg_masquerade(rule: &str) -> bool {
    rule.contains(&format!("--comment \"{MASQUERADE_COMMENT}\""))
        && crate::decision(rule).ends_with("-j MASQUERADE")
}

/// True for a RETURN rule of kg's.
pub fn is_kg_return(rule: &str) -> bool {
    is_kg(rule) && rule.ends_with("-j RETURN")
}

/// The chain without kilo-egressd's rules: what kg wrote.
pub fn without_owned(chain: &[String]) -> Vec<String> {
    chain.iter().filter(|r| !is_owned(r)).cloned().collect()
}

/// When a rule of kilo-egressd's sits above one of kg's RETURN rules (so the SNAT would win over
/// kg's "do not NAT" exception), describes the first such pair.
pub fn snat_above_return(chain: &[String]) -> Option<String> {
    let first_owned = chain.iter().position(|r| is_owned(r))?;
    let below = chain[first_owned + 1..].iter().find(|r| is_kg_return(r))?;
    Some(format!(
        "our rule #{} `{}` sits above kg's RETURN `{below}`",
        first_owned + 1,
        chain[first_owned]
    ))
}

/// What is wrong with `chain` for kilo mode with the SNAT to `addr`: it must be kg's rules
/// (`kg_rules` when given, any rules with kg's comments otherwise) with exactly one kilo-egressd
/// SNAT to `addr` inserted directly before kg's MASQUERADE, the last rule; so after every RETURN.
pub fn placement_problem(
    chain: &[String],
    kg_rules: Option<&[String]>,
    addr: &str,
) -> Option<String> {
    let owned: Vec<&String> = chain.iter().filter(|r| is_owned(r)).collect();
    if owned.len() != 1 {
        return Some(format!("{} rules of kilo-egressd, expected 1", owned.len()));
    }
    if !crate::decision(owned[0]).ends_with(&format!("-j SNAT --to-source {addr}")) {
        return Some(format!("our rule is not SNAT to {addr}: {}", owned[0]));
    }
    if !chain.last().is_some_and(|r| is_kg_masquerade(r)) {
        return Some("the last rule is not kg's MASQUERADE".to_owned());
    }
    if !is_owned(&chain[chain.len().saturating_sub(2)]) {
        return Some("our SNAT is not directly before kg's MASQUERADE".to_owned());
    }
    if let Some(problem) = snat_above_return(chain) {
        return Some(problem);
    }
    let kg = without_owned(chain);
    if let Some(unknown) = kg.iter().find(|r| !is_kg(r)) {
        return Some(format!("a rule of neither kg nor kilo-egressd: {unknown}"));
    }
    match kg_rules {
        Some(expected) if kg != expected => Some(format!(
            "kg's rules are not the expected ones; expected {expected:#?}"
        )),
        _ => None,
    }
}

/// Polls `ipt`'s KILO-NAT until [`placement_problem`] finds nothing wrong, up to `timeout`;
/// returns how long that took. The error shows the last chain seen.
pub fn wait_for_placement(
    ipt: &Iptables<'_>,
    kg_rules: Option<&[String]>,
    addr: &str,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let mut last = (Vec::new(), None);
    let ok = poll_until(timeout, || {
        let chain = ipt.rules("KILO-NAT").unwrap_or_default();
        let problem = placement_problem(&chain, kg_rules, addr);
        let ok = problem.is_none();
        last = (chain, problem);
        ok
    });
    if !ok {
        bail!(
            "{} KILO-NAT did not get SNAT to {addr} directly before kg's MASQUERADE (after all of kg's rules) within {timeout:?}: {}\nlast seen: {:#?}",
            ipt.binary(),
            last.1.unwrap_or_default(),
            last.0
        );
    }
    Ok(started.elapsed())
}

/// The metrics of the kg serving on [`METRICS_ADDR`] in the namespace `ns`.
fn metrics_in(ns: &str) -> anyhow::Result<KgMetrics> {
    let url = format!("http://{METRICS_ADDR}/metrics");
    let out: Captured = cmd::run_in(
        ns,
        "curl",
        &["-sS", "--fail", "--max-time", "5", url.as_str()],
    )?
    .ok()?;
    Ok(KgMetrics::parse(&out.stdout))
}

fn tail(path: &Path, title: &str, lines: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = log.lines().collect();
    let tail = &all[all.len().saturating_sub(lines)..];
    format!(
        "\n--- {title} ({}, last {} lines) ---\n{}",
        path.display(),
        tail.len(),
        tail.join("\n")
    )
}

/// Kilo's agent in a lab's node namespace, on its own userspace WireGuard interface. Dropping it
/// kills kg and wireguard-go and removes wireguard-go's control socket, also when a test failed.
pub struct RealKg<'lab> {
    lab: &'lab Lab,
    config: KgConfig,
    iface: String,
    dir: PathBuf,
    log: PathBuf,
    wg: Option<Child>,
    child: Option<Child>,
    starts: u32,
    spawned_at: Option<Instant>,
}

impl<'lab> RealKg<'lab> {
    /// Creates the WireGuard interface, starts kg against the emulator of `lab` (the Node must be
    /// registered: [`register_node`]) and waits until its rules are in place
    /// ([`RealKg::wait_settled`]).
    pub fn start(lab: &'lab Lab, config: KgConfig) -> anyhow::Result<Self> {
        let mut kg = RealKg::prepare(lab, config)?;
        kg.spawn()?;
        kg.wait_settled()?;
        Ok(kg)
    }

    /// Everything but starting kg: directories, files, the WireGuard interface.
    fn prepare(lab: &'lab Lab, config: KgConfig) -> anyhow::Result<Self> {
        let n = KG_COUNTER.fetch_add(1, Ordering::Relaxed);
        // Machine-wide unique (wireguard-go's socket is /var/run/wireguard/NAME.sock), <= 15 chars.
        let iface = format!("kgw{}x{n}", std::process::id());
        let dir = lab.dir().join(format!("kg-{n}"));
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::create_dir_all(dir.join("var-lib"))?;
        for family in ["iptables", "ip6tables"] {
            for suffix in ["", "-save", "-restore"] {
                let target = format!("/usr/sbin/{family}-{}{suffix}", config.backend.name());
                std::os::unix::fs::symlink(&target, bin.join(format!("{family}{suffix}")))
                    .with_context(|| format!("symlink {target}"))?;
            }
        }
        std::fs::write(
            dir.join("hosts"),
            format!(
                "127.0.0.1 localhost\n::1 localhost ip6-localhost\n{} {NODE}\n",
                Family::V4.primary()
            ),
        )?;
        // A CNI configuration that already holds the pod CIDR: kg leaves it alone.
        std::fs::write(
            dir.join("10-kilo.conflist"),
            format!(
                r#"{{"cniVersion":"0.4.0","name":"kilo","plugins":[{{"name":"kilo","type":"bridge","bridge":"kube-bridge","isDefaultGateway":true,"ipam":{{"type":"host-local","ranges":[[{{"subnet":"{}"}}]]}}}}]}}"#,
                config.family.pod_cidr()
            ),
        )?;
        let log = dir.join("kg.log");
        let mut kg = RealKg {
            lab,
            config,
            iface,
            dir,
            log,
            wg: None,
            child: None,
            starts: 0,
            spawned_at: None,
        };
        kg.start_wireguard()?;
        Ok(kg)
    }

    fn wg_socket(&self) -> PathBuf {
        Path::new("/var/run/wireguard").join(format!("{}.sock", self.iface))
    }

    fn start_wireguard(&mut self) -> anyhow::Result<()> {
        // A socket left by a killed run of a process with the same pid.
        let _ = std::fs::remove_file(self.wg_socket());
        let log = self.dir.join("wireguard-go.log");
        let file = std::fs::File::create(&log)?;
        let child = cmd::netns_command(&self.lab.node, "wireguard-go", &["-f", &self.iface])
            .env("WG_PROCESS_FOREGROUND", "1")
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start wireguard-go")?;
        self.wg = Some(child);
        let (ns, iface, socket) = (&self.lab.node, &self.iface, self.wg_socket());
        let up = poll_until(Duration::from_secs(10), || {
            socket.exists()
                && cmd::run_in(ns, "ip", &["link", "show", iface]).is_ok_and(|o| o.success())
        });
        if !up {
            bail!(
                "wireguard-go did not create {iface}{}",
                tail(&log, "wireguard-go log", 20)
            );
        }
        Ok(())
    }

    /// The command line arguments of kg.
    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--master",
            &format!("http://127.0.0.1:{}", kube::API_PORT),
            "--hostname",
            NODE,
            "--create-interface=false",
            "--interface",
            &self.iface,
            "--encapsulate",
            "never",
            "--listen",
            METRICS_ADDR,
            "--cni-path",
            &self.dir.join("10-kilo.conflist").display().to_string(),
            "--resync-period",
            &format!("{}ms", self.config.resync_period.as_millis()),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for cidr in &self.config.service_cidrs {
            args.push("--service-cidr".to_owned());
            args.push(cidr.clone());
        }
        args.extend(self.config.args.iter().cloned());
        args
    }

    fn spawn(&mut self) -> anyhow::Result<Instant> {
        if self.is_running() {
            bail!("kg is still running");
        }
        self.starts += 1;
        let bin = kg_binary().with_context(|| format!("{KG_BIN_ENV} names no kg binary"))?;
        let args = self.args();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(
            log,
            "===== start {} in netns {} ({} backend): {}",
            self.starts,
            self.lab.node,
            self.config.backend.name(),
            cmd::cmdline(&bin, &args)
        )?;
        // A private mount namespace: /var/lib (kg's key, kept across restarts like a node's
        // hostPath) and /etc/hosts (the node's name, or kg waits ~10 s on DNS) are the lab's.
        // `unshare` and `sh` exec, so the child's pid is kg's.
        let script =
            r#"mount --bind "$1" /var/lib && mount --bind "$2" /etc/hosts && shift 2 && exec "$@""#;
        let var_lib = self.dir.join("var-lib");
        let hosts = self.dir.join("hosts");
        let mut full: Vec<String> = vec![
            "-m".into(),
            "--propagation".into(),
            "private".into(),
            "sh".into(),
            "-c".into(),
            script.into(),
            "kg-mounts".into(),
            var_lib.display().to_string(),
            hosts.display().to_string(),
            bin.display().to_string(),
        ];
        full.extend(args);
        let path = format!(
            "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            self.dir.join("bin").display()
        );
        let child = cmd::netns_command(&self.lab.node, "unshare", &full)
            .env("PATH", path)
            // The emulator sends no watch bookmarks.
            .env("KUBE_FEATURE_WatchListClient", "false")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start kg")?;
        let now = Instant::now();
        self.child = Some(child);
        self.spawned_at = Some(now);
        Ok(now)
    }

    /// Starts kg again (after [`RealKg::stop`] or [`RealKg::kill`]) and returns the moment it was
    /// started, without waiting: kg's first sync flushes KILO-NAT.
    pub fn start_again(&mut self) -> anyhow::Result<Instant> {
        self.spawn()
    }

    /// Polls until kg (started last at [`RealKg::start_again`]) has flushed or created KILO-NAT
    /// of its family, its MASQUERADE rule and POSTROUTING jump are there, and neither its write
    /// counter nor its rules have changed for 200 ms.
    pub fn wait_settled(&mut self) -> anyhow::Result<()> {
        self.spawned_at.context("kg was never started")?;
        let ipt = self.ipt();
        let jump = self.jump_rule();
        let node = self.lab.node.as_str();
        let family = self.config.family;
        let mut stable: Option<(u64, Vec<String>, Instant)> = None;
        let mut settled = false;
        let mut exited = None;
        poll_until(START_TIMEOUT, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            let Ok(metrics) = metrics_in(node) else {
                return false;
            };
            let chain = ipt.rules("KILO-NAT").unwrap_or_default();
            let postrouting = ipt.rules("POSTROUTING").unwrap_or_default();
            let complete = metrics.clear_chains(family) >= 1
                && chain.iter().any(|r| is_kg_masquerade(r))
                && postrouting.contains(&jump);
            if !complete {
                stable = None;
                return false;
            }
            let kg_rules = without_owned(&chain);
            let writes = metrics.writes();
            match &stable {
                Some((w, rules, since)) if *w == writes && *rules == kg_rules => {
                    if since.elapsed() >= Duration::from_millis(200) {
                        settled = true;
                        return true;
                    }
                }
                _ => stable = Some((writes, kg_rules, Instant::now())),
            }
            false
        });
        if let Some(status) = exited {
            self.child = None;
            bail!("kg exited ({status}) during its start{}", self.context());
        }
        if settled {
            return Ok(());
        }
        bail!(
            "kg's rules were not in place and settled within {START_TIMEOUT:?}\n{}{}",
            self.lab.nat_dumps(self.config.backend).unwrap_or_default(),
            self.context()
        )
    }

    /// Sends SIGTERM and waits until kg exits: with its default `--clean-up=true` it deletes its
    /// rules and KILO-NAT in both families first.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("kg is not running");
        };
        cmd::stop_child(&mut child, "kg").with_context(|| self.context())
    }

    /// Kills kg with SIGKILL (a crash, an OOM kill): its rules stay; its next start flushes
    /// KILO-NAT.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("kg is not running");
        };
        child.kill().context("kill kg")?;
        child.wait().context("wait for kg")?;
        Ok(())
    }

    /// True while kg runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &KgConfig {
        &self.config
    }

    /// The WireGuard interface it runs on.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The nat table of the node for kg's backend and the family of its pod CIDR.
    pub fn ipt(&self) -> Iptables<'lab> {
        self.lab.iptables(self.config.backend, self.config.family)
    }

    /// The nat table of the node for kg's backend and `family`.
    pub fn ipt_of(&self, family: Family) -> Iptables<'lab> {
        self.lab.iptables(self.config.backend, family)
    }

    /// kg's POSTROUTING jump for the Node's pod CIDR, as `iptables -S` prints it.
    pub fn jump_rule(&self) -> String {
        format!(
            "-A POSTROUTING -s {} -m comment --comment \"{JUMP_COMMENT}\" -j KILO-NAT",
            self.config.family.pod_cidr()
        )
    }

    /// KILO-NAT of `family` as it is now, without kilo-egressd's rules: what kg wrote.
    pub fn kg_rules(&self, family: Family) -> anyhow::Result<Vec<String>> {
        Ok(without_owned(&self.ipt_of(family).rules("KILO-NAT")?))
    }

    /// kg's metrics (`curl` in the node namespace).
    pub fn metrics(&self) -> anyhow::Result<KgMetrics> {
        metrics_in(&self.lab.node)
    }

    /// Everything kg logged (all its starts).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// How many times kg logged that it re-applied or prepended iptables rules (its resync found
    /// a rule of its own missing).
    pub fn repairs_logged(&self) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"msg\":\"applying ") || l.contains("prepending iptables rule"))
            .count()
    }

    /// The end of kg's log, formatted to append to an error message.
    pub fn context(&self) -> String {
        tail(&self.log, "kg log", 40)
    }

    /// Unwraps `result`, or panics with the error and the end of kg's log.
    pub fn must<T>(&self, result: anyhow::Result<T>) -> T {
        result.unwrap_or_else(|err| panic!("{err:#}{}", self.context()))
    }
}

/// One sample of KILO-NAT taken by a [`ChainSampler`].
#[derive(Debug, Clone)]
pub struct Sample {
    /// When the sample was read.
    pub at: Instant,
    /// The `-A KILO-NAT ...` lines, in kernel order (empty when the chain did not exist).
    pub chain: Vec<String>,
}

/// What a [`ChainSampler`] saw.
#[derive(Debug, Clone, Default)]
pub struct SampleReport {
    /// How many times the chain was read.
    pub samples: usize,
    /// Every sample in which a rule of kilo-egressd's sat above a RETURN of kg's
    /// ([`snat_above_return`]), each with the sample before it.
    pub offending: Vec<(Option<Sample>, Sample)>,
}

/// Reads KILO-NAT of one backend and family in the node namespace as fast as one process per
/// read allows (a shell loop inside the namespace: no `ip netns exec` per read), in the
/// background, and keeps the samples in which our SNAT sits above a kg RETURN. Killed when
/// finished or dropped.
pub struct ChainSampler {
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<SampleReport>>,
}

impl ChainSampler {
    /// Starts sampling `ipt`'s KILO-NAT in the namespace `ns`; returns once the first sample was
    /// read, so nothing that happens after this call is missed for want of a started loop.
    pub fn start(ns: &str, ipt: &Iptables<'_>) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let script = format!(
            "while :; do {} -t nat -S KILO-NAT 2>/dev/null; echo @@; done",
            ipt.binary()
        );
        let mut child = cmd::netns_command(ns, "sh", &["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start the KILO-NAT sampler")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut report = SampleReport::default();
            let mut prev: Option<Sample> = None;
            let mut chain = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line == "@@" {
                    let sample = Sample {
                        at: Instant::now(),
                        chain: std::mem::take(&mut chain),
                    };
                    report.samples += 1;
                    if report.samples == 1 {
                        let _ = first_tx.send(());
                    }
                    if snat_above_return(&sample.chain).is_some() {
                        report.offending.push((prev.clone(), sample.clone()));
                    }
                    prev = Some(sample);
                } else if line.starts_with("-A KILO-NAT ") {
                    chain.push(line);
                }
            }
            report
        });
        let sampler = ChainSampler {
            child: Some(child),
            reader: Some(reader),
        };
        first_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the KILO-NAT sampler read nothing within 10 s")?;
        Ok(sampler)
    }

    /// Stops sampling and returns what was seen.
    pub fn finish(mut self) -> SampleReport {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.reader
            .take()
            .map(|r| r.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for ChainSampler {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// One rule change reported by `xtables-monitor -e` (nft only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleEvent {
    /// When the event was read.
    pub at: Instant,
    /// The nft generation (transaction) it belongs to.
    pub generation: u64,
    /// The command name of the process that committed it, e.g. `iptables` (kg runs
    /// `iptables` from its PATH) or `iptables-nft-re` (kilo-egressd's `iptables-nft-restore`).
    pub writer: String,
    /// True when the rule was added, false when deleted.
    pub added: bool,
    /// The rule, e.g. `-A KILO-NAT -d 10.4.0.1/32 -m comment ... -j RETURN` (an insert is
    /// reported as `-A` as well: the event carries no position).
    pub rule: String,
}

impl RuleEvent {
    /// True when kg committed it (kg runs `iptables`/`ip6tables` from its PATH).
    pub fn by_kg(&self) -> bool {
        self.writer == "iptables" || self.writer == "ip6tables"
    }
}

/// `xtables-monitor -e` in the node namespace (nft only): every rule added to or deleted from the
/// nat table of one family, with the generation and the process that committed it. Killed when
/// finished or dropped.
pub struct RuleEvents {
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<Vec<RuleEvent>>>,
}

impl RuleEvents {
    /// Starts `stdbuf -oL xtables-monitor -e -4|-6` in `ns` and waits until it reports events
    /// (it is probed with an add and delete of a chain of its own).
    pub fn start(ns: &str, family: Family) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let flag = match family {
            Family::V4 => "-4",
            Family::V6 => "-6",
        };
        let mut child = cmd::netns_command(ns, "stdbuf", &["-oL", "xtables-monitor", "-e", flag])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("start xtables-monitor")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let (probe_tx, probe_rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut events = Vec::new();
            let mut pending: Vec<(Instant, bool, String)> = Vec::new();
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim();
                if line.contains("KE-PROBE") {
                    let _ = probe_tx.send(());
                    continue;
                }
                if let Some(event) = line.strip_prefix("EVENT: ") {
                    // "-4 -t nat -A KILO-NAT ..." or "-4 -t nat -D KILO-NAT ...".
                    let rest = event.split_once(" -t nat ").map_or("", |(_, r)| r);
                    if let Some(rule) = rest.strip_prefix("-A ") {
                        pending.push((Instant::now(), true, format!("-A {rule}")));
                    } else if let Some(rule) = rest.strip_prefix("-D ") {
                        pending.push((Instant::now(), false, format!("-A {rule}")));
                    }
                } else if let Some(newgen) = line.strip_prefix("NEWGEN: ") {
                    let field = |key: &str| {
                        newgen
                            .split_whitespace()
                            .find_map(|kv| kv.strip_prefix(key))
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let generation = field("GENID=").parse().unwrap_or_default();
                    let writer = field("NAME=");
                    for (at, added, rule) in pending.drain(..) {
                        events.push(RuleEvent {
                            at,
                            generation,
                            writer: writer.clone(),
                            added,
                            rule,
                        });
                    }
                }
            }
            events
        });
        let events = RuleEvents {
            child: Some(child),
            reader: Some(reader),
        };
        let ipt = Iptables::new(ns, Backend::Nft, family);
        let mut seen = false;
        for _ in 0..50 {
            ipt.run(&["-t", "nat", "-N", "KE-PROBE"])?;
            ipt.run(&["-t", "nat", "-X", "KE-PROBE"])?;
            if probe_rx.recv_timeout(Duration::from_millis(200)).is_ok() {
                seen = true;
                break;
            }
        }
        if !seen {
            bail!("xtables-monitor reported no event within 10 s");
        }
        Ok(events)
    }

    /// Stops the monitor and returns every rule event of the nat table it saw.
    pub fn finish(mut self) -> Vec<RuleEvent> {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.reader
            .take()
            .map(|r| r.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for RuleEvents {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RealKg<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut wg) = self.wg.take() {
            // SIGTERM: wireguard-go removes its interface and socket.
            let _ = cmd::stop_child(&mut wg, "wireguard-go");
        }
        let _ = std::fs::remove_file(self.wg_socket());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KG_V4: [&str; 3] = [
        "-A KILO-NAT -d 10.4.0.1/32 -m comment --comment \"Kilo: do not NAT packets destined for WireGuared IPs\" -j RETURN",
        "-A KILO-NAT -d 10.96.0.0/12 -m comment --comment \"Kilo: do not NAT packets destined for service CIDRs\" -j RETURN",
        "-A KILO-NAT -m comment --comment \"Kilo: NAT remaining packets\" -j MASQUERADE",
    ];
    const SNAT: &str = "-A KILO-NAT -m comment --comment \"kilo-egress: egress\" -j SNAT --to-source 198.51.100.20";

    fn chain(rules: &[&str]) -> Vec<String> {
        rules.iter().map(|r| r.to_string()).collect()
    }

    #[test]
    fn metrics_are_parsed_and_split_into_reads_and_writes() {
        let text = "# HELP kilo_iptables_operations_total Number of iptables operations.\n\
            kilo_iptables_operations_total{chain=\"KILO-NAT\",operation=\"ClearChain\",protocol=\"IPv4\",table=\"nat\"} 1\n\
            kilo_iptables_operations_total{chain=\"KILO-NAT\",operation=\"InsertUnique\",protocol=\"IPv4\",table=\"nat\"} 3\n\
            kilo_iptables_operations_total{chain=\"KILO-NAT\",operation=\"List\",protocol=\"IPv6\",table=\"nat\"} 7\n\
            kilo_reconciles_total 4\n";
        let m = KgMetrics::parse(text);
        assert_eq!((m.writes(), m.reads(), m.reconciles), (4, 7, 4));
        assert_eq!(m.clear_chains(Family::V4), 1);
        assert_eq!(m.clear_chains(Family::V6), 0);
    }

    #[test]
    fn placement_wants_the_snat_directly_before_masquerade() {
        let mut good = chain(&KG_V4);
        good.insert(2, SNAT.to_owned());
        let kg = chain(&KG_V4);
        assert_eq!(placement_problem(&good, Some(&kg), "198.51.100.20"), None);
        assert!(placement_problem(&good, Some(&kg), "198.51.100.21").is_some());
        let mut above = chain(&KG_V4);
        above.insert(1, SNAT.to_owned());
        assert!(snat_above_return(&above).unwrap().contains("service CIDRs"));
        assert!(placement_problem(&above, None, "198.51.100.20").is_some());
        assert!(snat_above_return(&good).is_none());
        assert!(placement_problem(&kg, None, "198.51.100.20").is_some());
    }
}
