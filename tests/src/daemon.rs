//! kilo-egressd under test: started in the lab's node namespace with its own state directory,
//! socket and log file, driven with the `kilo-egress` CLI and `grpcurl`.

use crate::cmd::{self, Captured};
use crate::lab::{Backend, Family, Iptables, Lab};
use crate::{READY_TIMEOUT, bin_path, poll_until};
use anyhow::{Context, bail};
use serde_json::Value;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};

/// How long kilo-egressd may take to exit after SIGTERM.
pub use crate::cmd::STOP_TIMEOUT;

/// Who writes KILO-NAT: `--mode own` or `--mode kilo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// kilo-egressd writes KILO-NAT and the POSTROUTING jumps.
    Own,
    /// Kilo's agent writes KILO-NAT; kilo-egressd keeps one SNAT rule before its MASQUERADE.
    Kilo,
}

impl Mode {
    /// "own" or "kilo", as `--mode` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Own => "own",
            Mode::Kilo => "kilo",
        }
    }
}

/// How to start kilo-egressd. The state directory, socket and backend flags are added by
/// [`Daemon`]; `args` holds everything else.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// `--mode`.
    pub mode: Mode,
    /// `--iptables-backend`, and the backend the test helpers read.
    pub backend: Backend,
    /// Pass `--iptables-backend auto` instead: the daemon must find `backend` itself.
    pub auto_backend: bool,
    /// Further arguments, e.g. `--source-cidr 10.44.0.0/24`.
    pub args: Vec<String>,
    /// Environment variables set for the process, e.g. a `PATH` with wrapped iptables tools.
    pub env: Vec<(String, String)>,
    /// `--state-dir`, instead of a fresh directory of the lab's.
    pub state_dir: Option<PathBuf>,
}

impl DaemonConfig {
    /// Own mode NATing both pod CIDRs of the lab (10.44.0.0/24 and fd00:44::/64).
    pub fn own(backend: Backend) -> Self {
        let mut args = Vec::new();
        for family in Family::ALL {
            args.push("--source-cidr".to_owned());
            args.push(family.pod_cidr().to_owned());
        }
        DaemonConfig {
            mode: Mode::Own,
            backend,
            auto_backend: false,
            args,
            env: Vec::new(),
            state_dir: None,
        }
    }

    /// Kilo mode, next to Kilo's agent.
    pub fn kilo(backend: Backend) -> Self {
        DaemonConfig {
            mode: Mode::Kilo,
            backend,
            auto_backend: false,
            args: Vec::new(),
            env: Vec::new(),
            state_dir: None,
        }
    }

    /// Starts with `--iptables-backend auto`; `backend` is what the daemon should detect.
    pub fn auto_backend(mut self) -> Self {
        self.auto_backend = true;
        self
    }

    /// Adds one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }
}

/// One kilo-egressd in a lab's node namespace. Killed (SIGKILL) when dropped if still running;
/// the lab removes whatever it leaves behind.
pub struct Daemon<'lab> {
    lab: &'lab Lab,
    config: DaemonConfig,
    socket: PathBuf,
    state_dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl<'lab> Daemon<'lab> {
    /// Starts kilo-egressd with `config` and waits until `kilo-egress health` reports SERVING.
    pub fn start(lab: &'lab Lab, config: DaemonConfig) -> anyhow::Result<Self> {
        let dir = lab.dir().join(format!("daemon-{}", lab.next_daemon_id()));
        std::fs::create_dir_all(&dir)?;
        let state_dir = config
            .state_dir
            .clone()
            .unwrap_or_else(|| dir.join("state"));
        let mut daemon = Daemon {
            lab,
            config,
            socket: dir.join("kilo-egressd.sock"),
            state_dir,
            log: dir.join("kilo-egressd.log"),
            child: None,
            starts: 0,
        };
        daemon.spawn()?;
        daemon.wait_ready()?;
        Ok(daemon)
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &DaemonConfig {
        &self.config
    }

    /// The API's unix socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The `--server` value that reaches it: `unix:///...`.
    pub fn server_url(&self) -> String {
        format!("unix://{}", self.socket.display())
    }

    /// Its `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The bytes of `state.json`, or `None` when it does not exist.
    pub fn state_file(&self) -> Option<Vec<u8>> {
        std::fs::read(self.state_dir.join("state.json")).ok()
    }

    /// The command line arguments after the binary.
    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--mode".to_owned(),
            self.config.mode.name().to_owned(),
            "--iptables-backend".to_owned(),
            if self.config.auto_backend {
                "auto".to_owned()
            } else {
                self.config.backend.name().to_owned()
            },
            "--state-dir".to_owned(),
            self.state_dir.display().to_string(),
            "--listen".to_owned(),
            self.server_url(),
        ];
        // On nft, drift must be repaired through change notifications: the periodic safety
        // check is pushed out of every test's reach unless a test sets it.
        if self.config.backend == Backend::Nft
            && !self
                .config
                .args
                .iter()
                .any(|a| a.starts_with("--safety-check-interval"))
        {
            args.extend(["--safety-check-interval".to_owned(), "1h".to_owned()]);
        }
        args.extend(self.config.args.iter().cloned());
        args
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        self.starts += 1;
        let bin = bin_path("kilo-egressd");
        let args = self.args();
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        writeln!(
            log,
            "===== start {} in netns {}: {}",
            self.starts,
            self.lab.node,
            cmd::cmdline(&bin, &args)
        )?;
        let mut command = cmd::netns_command(&self.lab.node, &bin, &args);
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        command.envs(self.config.env.iter().map(|(k, v)| (k, v)));
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start kilo-egressd")?;
        self.child = Some(child);
        Ok(())
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Polls `kilo-egress health` until it exits 0; fails when the process exits first or the
    /// deadline passes.
    pub fn wait_ready(&mut self) -> anyhow::Result<()> {
        let mut last = None;
        let mut exited = None;
        let ready = poll_until(READY_TIMEOUT, || {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                exited = Some(status);
                return true;
            }
            let out = self.cli(&["health"]);
            let ok = out.as_ref().is_ok_and(Captured::success);
            last = Some(out);
            ok
        });
        if let Some(status) = exited {
            bail!(
                "kilo-egressd exited ({status}) before it was ready{}",
                self.context()
            );
        }
        if !ready {
            bail!(
                "kilo-egressd was not SERVING within {READY_TIMEOUT:?}; last health check: {}{}",
                match last {
                    Some(Ok(out)) => out.to_string(),
                    Some(Err(err)) => format!("{err:#}"),
                    None => "none".to_owned(),
                },
                self.context()
            );
        }
        Ok(())
    }

    /// Sends SIGTERM and waits for the process to exit; returns its exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("kilo-egressd is not running");
        };
        cmd::stop_child(&mut child, "kilo-egressd").with_context(|| self.context())
    }

    /// Starts the process again (after [`Daemon::stop`]) with the same arguments, state
    /// directory and socket, and waits until it is SERVING.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("kilo-egressd is still running");
        }
        self.spawn()?;
        self.wait_ready()
    }

    /// Starts the process again (after [`Daemon::stop`]) and returns the moment its API socket
    /// appears, without any RPC: what the kernel holds then is what the first client would see.
    pub fn start_again_until_socket(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("kilo-egressd is still running");
        }
        let _ = std::fs::remove_file(self.socket());
        self.spawn()?;
        let socket = self.socket().to_path_buf();
        if !poll_until(READY_TIMEOUT, || socket.exists()) {
            bail!("{} did not appear{}", socket.display(), self.context());
        }
        Ok(())
    }

    /// Stops with SIGTERM and asserts what a user relies on across restarts and upgrades: a
    /// clean exit, the nat table exactly as `dump` (from `ipt`), and upstream still seeing the
    /// chosen address of `family`.
    pub fn stop_keeping_rules(&mut self, ipt: &Iptables<'_>, dump: &str, family: Family) {
        let stopped = self.stop();
        let status = self.must(stopped);
        assert!(
            status.success(),
            "SIGTERM is a clean stop: {status}{}",
            self.context()
        );
        assert_eq!(
            self.must(ipt.nat_dump()),
            dump,
            "rules stay after SIGTERM{}",
            self.context()
        );
        self.assert_upstream_sees(
            family,
            family.preferred(),
            "traffic keeps the chosen address while the daemon is down",
        );
    }

    /// Asserts that upstream sees `expected` as the source of this family's pod traffic; a
    /// failure shows `why` and the end of the daemon's log.
    pub fn assert_upstream_sees(&self, family: Family, expected: &str, why: &str) {
        let seen = self.must(self.lab.seen_source(family));
        assert_eq!(seen, expected, "{why}{}", self.context());
    }

    /// [`Daemon::stop`] (SIGTERM) followed by [`Daemon::start_again`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.start_again()
    }

    /// Everything the process (all its starts) wrote to stdout and stderr.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of the log, formatted to append to an error message.
    pub fn context(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        let tail = &lines[lines.len().saturating_sub(60)..];
        format!(
            "\n--- kilo-egressd log ({}, last {} lines) ---\n{}",
            self.log.display(),
            tail.len(),
            tail.join("\n")
        )
    }

    /// Unwraps `result`, or panics with the error and the end of the daemon's log.
    pub fn must<T>(&self, result: anyhow::Result<T>) -> T {
        result.unwrap_or_else(|err| panic!("{err:#}{}", self.context()))
    }

    /// Runs `kilo-egress --server <this daemon> args` in the node namespace.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<Captured> {
        let server = self.server_url();
        let mut full = vec!["--server", server.as_str()];
        full.extend_from_slice(args);
        cmd::run_in(&self.lab.node, bin_path("kilo-egress"), &full)
    }

    /// Like [`Daemon::cli`], but fails (with the daemon's log) unless the CLI exits 0; returns
    /// its stdout. After a `set` or `clear` it also waits until the change has settled: the reply
    /// comes once the new decision is in force, and the rules it shadowed are removed right
    /// after; a GetRules call is answered only once that is done.
    pub fn cli_ok(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = self.cli(args)?;
        if !out.success() {
            bail!("{out}{}", self.context());
        }
        if matches!(args.first(), Some(&"set" | &"clear")) && !args.contains(&"--dry-run") {
            self.get_rules()?;
        }
        Ok(out.stdout)
    }

    /// `kilo-egress get -o json`, parsed.
    pub fn get_rules(&self) -> anyhow::Result<RulesView> {
        let out = self.cli_ok(&["get", "-o", "json"])?;
        let raw = serde_json::from_str(&out)
            .with_context(|| format!("`kilo-egress get -o json` printed no JSON:\n{out}"))?;
        Ok(RulesView { raw })
    }

    /// Runs `grpcurl -plaintext -unix FLAGS SOCKET VERB..` in the node namespace, e.g.
    /// `grpcurl(&["-d", "{}"], &["kilo.egress.v1.EgressService/GetRules"])`. No `-authority`:
    /// grpcurl sends the socket path, which the daemon accepts on a unix socket.
    pub fn grpcurl(&self, flags: &[&str], verb: &[&str]) -> anyhow::Result<Captured> {
        let socket = self.socket.display().to_string();
        let mut full = vec!["-plaintext", "-unix"];
        full.extend_from_slice(flags);
        full.push(&socket);
        full.extend_from_slice(verb);
        let out = cmd::run_in(&self.lab.node, "grpcurl", &full)?;
        // Like `cli_ok`: wait until a change has settled (shadowed rules removed).
        if out.success() && verb.iter().any(|v| v.ends_with("/SetEgress")) {
            self.get_rules()?;
        }
        Ok(out)
    }

    /// Like [`Daemon::grpcurl`] with a JSON request body, failing unless grpcurl exits 0;
    /// returns the parsed JSON reply.
    pub fn grpcurl_call(&self, method: &str, request: &str) -> anyhow::Result<Value> {
        let out = self.grpcurl(&["-d", request], &[method])?;
        if !out.success() {
            bail!("{out}{}", self.context());
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("grpcurl {method} printed no JSON:\n{}", out.stdout))
    }

    /// Runs `kilo-egressd cleanup` with this daemon's mode, backend and state directory in the
    /// node namespace.
    pub fn cleanup(&self) -> anyhow::Result<Captured> {
        let state_dir = self.state_dir.display().to_string();
        cmd::run_in(
            &self.lab.node,
            bin_path("kilo-egressd"),
            &[
                "cleanup",
                "--mode",
                self.config.mode.name(),
                "--iptables-backend",
                self.config.backend.name(),
                "--state-dir",
                &state_dir,
            ],
        )
    }
}

impl Drop for Daemon<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A GetRulesResponse (or SetEgressResponse) in proto3 JSON, as `kilo-egress get -o json` and
/// grpcurl print it. Proto3 JSON leaves out default values, so absent fields read as defaults.
#[derive(Debug, Clone)]
pub struct RulesView {
    /// The parsed JSON.
    pub raw: Value,
}

/// A proto3 JSON uint64: a string or a number; absent is 0.
pub fn json_u64(value: &Value) -> u64 {
    match value {
        Value::Number(n) => n.as_u64().unwrap_or_default(),
        Value::String(s) => s.parse().unwrap_or_default(),
        _ => 0,
    }
}

impl RulesView {
    /// The chosen address of `family`, "" for MASQUERADE.
    pub fn egress(&self, family: Family) -> &str {
        let key = match family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        self.raw["egress"][key].as_str().unwrap_or_default()
    }

    /// The generation of the desired state.
    pub fn generation(&self) -> u64 {
        json_u64(&self.raw["generation"])
    }

    /// True when every family is in sync.
    pub fn in_sync(&self) -> bool {
        self.raw["inSync"].as_bool().unwrap_or_default()
    }

    /// The mode, e.g. "MODE_OWN".
    pub fn mode(&self) -> &str {
        self.raw["mode"].as_str().unwrap_or_default()
    }

    /// How drift is detected, e.g. "nftables change notifications, safety check every 1h".
    pub fn drift_detection(&self) -> &str {
        self.raw["driftDetection"].as_str().unwrap_or_default()
    }

    /// Why the backend was chosen.
    pub fn backend_reason(&self) -> &str {
        self.raw["backendReason"].as_str().unwrap_or_default()
    }

    /// iptables-restore transactions committed since the daemon started.
    pub fn kernel_transactions(&self) -> u64 {
        json_u64(&self.raw["kernelTransactions"])
    }

    /// The backend, "nft" or "legacy".
    pub fn backend(&self) -> &str {
        self.raw["backend"].as_str().unwrap_or_default()
    }

    /// The last apply error, "" when none.
    pub fn last_error(&self) -> &str {
        self.raw["lastError"].as_str().unwrap_or_default()
    }

    /// The GetRules entry of `family` in `families`, if any.
    fn family_entry(&self, family: Family) -> Option<&Value> {
        let name = match family {
            Family::V4 => "FAMILY_IPV4",
            Family::V6 => "FAMILY_IPV6",
        };
        self.raw["families"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|fam| fam["family"].as_str() == Some(name))
    }

    /// The human-readable status of `family`, e.g. "waiting for Kilo's agent: ..."; "" when none.
    pub fn status(&self, family: Family) -> &str {
        self.family_entry(family)
            .and_then(|fam| fam["status"].as_str())
            .unwrap_or_default()
    }

    /// Whether GetRules says the chosen address of `family` is not usable on the node.
    pub fn address_absent(&self, family: Family) -> bool {
        self.family_entry(family)
            .and_then(|fam| fam["addressAbsent"].as_bool())
            .unwrap_or(false)
    }

    /// Whether our SNAT and MASQUERADE rules carry `--random-fully`, and why.
    pub fn random_fully(&self) -> &str {
        self.raw["randomFully"].as_str().unwrap_or_default()
    }

    /// Whether the service follows the node's addresses, and its absent-address policy.
    pub fn address_presence(&self) -> &str {
        self.raw["addressPresence"].as_str().unwrap_or_default()
    }

    /// The `spec` of every rule reported for `family`, in the order given.
    pub fn specs(&self, family: Family) -> Vec<String> {
        let name = match family {
            Family::V4 => "FAMILY_IPV4",
            Family::V6 => "FAMILY_IPV6",
        };
        let key = if self.raw.get("families").is_some() {
            "families"
        } else {
            "rules"
        };
        self.raw[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|fam| fam["family"].as_str() == Some(name))
            .flat_map(|fam| fam["rules"].as_array().into_iter().flatten())
            .filter_map(|rule| rule["spec"].as_str().map(str::to_owned))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_view_reads_defaults_for_absent_fields() {
        let view = RulesView {
            raw: serde_json::json!({
                "egress": {"ipv6": "2001:db8:2::20"},
                "generation": "7",
                "families": [
                    {"family": "FAMILY_IPV4", "rules": [{"spec": "-A KILO-NAT -j MASQUERADE"}]},
                    {"family": "FAMILY_IPV6", "inSync": true}
                ]
            }),
        };
        assert_eq!(view.egress(Family::V4), "");
        assert_eq!(view.egress(Family::V6), "2001:db8:2::20");
        assert_eq!(view.generation(), 7);
        assert!(!view.in_sync());
        assert_eq!(view.specs(Family::V4), ["-A KILO-NAT -j MASQUERADE"]);
        assert!(view.specs(Family::V6).is_empty());
    }
}
