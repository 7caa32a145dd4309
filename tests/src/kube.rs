//! Kubernetes for the watcher's tests: the API emulator `tests/kmock/apiserver.py` (kmock from
//! PyPI, extended) and `kilo-egress watch`, both run in a lab's node namespace beside
//! kilo-egressd, plus `kubectl` pointed at the emulator through a kubeconfig.

use crate::cmd::{self, Captured};
use crate::daemon::Daemon;
use crate::lab::Lab;
use crate::{bin_path, poll_until, skip_or_fail};
use anyhow::{Context, bail};
use serde_json::Value;
use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::Duration;

/// The port the emulator listens on, on 127.0.0.1 of the node namespace (one per lab).
pub const API_PORT: u16 = 6443;

/// The Node the tests annotate.
pub const NODE: &str = "node-a";

/// The annotation the watcher reads by default.
pub const ANNOTATION: &str = "kilo.squat.ai/egress-ip";

/// The emulator script.
pub fn apiserver_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kmock/apiserver.py")
}

/// True when `python3` can import kmock. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs kmock)` and returns false.
pub fn require_kmock(test: &str) -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import kmock"])
        .output()
        .is_ok_and(|out| out.status.success());
    found || skip_or_fail(test, "needs kmock: python3 -m pip install kmock")
}

/// True when `program --version` runs. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs PROGRAM)` and returns false.
pub fn require_tool(test: &str, program: &str) -> bool {
    let found = std::process::Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    found || skip_or_fail(test, &format!("needs {program}"))
}

/// True when `kubectl` runs. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs kubectl)` and returns false.
pub fn require_kubectl(test: &str) -> bool {
    let found = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|out| out.status.success());
    found || skip_or_fail(test, "needs kubectl")
}

fn tail(path: &Path, title: &str) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let tail = &lines[lines.len().saturating_sub(40)..];
    format!(
        "\n--- {title} ({}, last {} lines) ---\n{}",
        path.display(),
        tail.len(),
        tail.join("\n")
    )
}

fn open_log(path: &Path, banner: &str) -> anyhow::Result<std::fs::File> {
    let mut log = OpenOptions::new().create(true).append(true).open(path)?;
    writeln!(log, "===== {banner}")?;
    Ok(log)
}

/// The Kubernetes API emulator in a lab's node namespace. Killed when dropped.
pub struct ApiServer<'lab> {
    lab: &'lab Lab,
    log: PathBuf,
    kubeconfig: PathBuf,
    child: Option<Child>,
}

impl<'lab> ApiServer<'lab> {
    /// Starts the emulator and waits until it listens.
    pub fn start(lab: &'lab Lab) -> anyhow::Result<Self> {
        let kubeconfig = lab.dir().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster: {{server: \"http://127.0.0.1:{API_PORT}\"}}\n\
                 users:\n- name: lab\n  user: {{}}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: lab}}\ncurrent-context: lab\n"
            ),
        )?;
        let mut api = ApiServer {
            lab,
            log: lab.dir().join("apiserver.log"),
            kubeconfig,
            child: None,
        };
        api.start_again()?;
        Ok(api)
    }

    /// Starts the emulator (again, after [`ApiServer::stop`]): empty, as a fresh API server.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the API emulator is still running");
        }
        let script = apiserver_script();
        let port = API_PORT.to_string();
        let args = [
            script.to_str().expect("utf-8 path"),
            "serve",
            "--port",
            &port,
        ];
        let log = open_log(&self.log, &cmd::cmdline("python3", &args))?;
        let mut child = cmd::netns_command(&self.lab.node, "python3", &args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("start the API emulator (python3 tests/kmock/apiserver.py)")?;
        let stdout = child.stdout.take().expect("stdout is piped");
        self.child = Some(child);
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        if !line.starts_with("listening on") {
            bail!("the API emulator did not start{}", self.context());
        }
        Ok(())
    }

    /// Stops the emulator with SIGTERM: every watch connection drops, and all state is lost.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            bail!("the API emulator is not running");
        };
        cmd::stop_child(&mut child, "the API emulator").map(drop)
    }

    /// The emulator's URL, inside the lab's node namespace.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{API_PORT}")
    }

    /// The kubeconfig file that points at the emulator.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The end of the emulator's log, to append to an error message.
    pub fn context(&self) -> String {
        tail(&self.log, "API emulator log")
    }

    /// Runs `apiserver.py --server URL args` (its client commands) in the node namespace.
    pub fn ctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let script = apiserver_script();
        let server = self.url();
        let mut full = vec![script.to_str().expect("utf-8 path"), "--server", &server];
        full.extend_from_slice(args);
        let out = cmd::run_in(&self.lab.node, "python3", &full)?;
        if !out.success() {
            bail!("{out}{}", self.context());
        }
        Ok(out.stdout)
    }

    /// Runs `kubectl --kubeconfig <emulator> args` in the node namespace.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Captured> {
        let kubeconfig = self.kubeconfig.display().to_string();
        let mut full = vec!["--kubeconfig", kubeconfig.as_str()];
        full.extend_from_slice(args);
        cmd::run_in(&self.lab.node, "kubectl", &full)
    }

    /// Creates [`NODE`] with the given `KEY=VALUE` annotations.
    pub fn create_node(&self, annotations: &[&str]) -> anyhow::Result<()> {
        let mut args = vec!["create-node", NODE];
        args.extend_from_slice(annotations);
        self.ctl(&args).map(drop)
    }

    /// `kubectl annotate node NODE ANNOTATION=value --overwrite`, as an operator would.
    pub fn annotate(&self, value: &str) -> anyhow::Result<()> {
        let set = format!("{ANNOTATION}={value}");
        self.kubectl(&["annotate", "node", NODE, &set, "--overwrite"])?
            .ok()
            .map(drop)
    }

    /// `kubectl annotate node NODE ANNOTATION-`: removes the annotation.
    pub fn remove_annotation(&self) -> anyhow::Result<()> {
        let remove = format!("{ANNOTATION}-");
        self.kubectl(&["annotate", "node", NODE, &remove])?
            .ok()
            .map(drop)
    }

    /// Changes only the Node's status, as the kubelet's heartbeat does every few seconds.
    pub fn heartbeat(&self) -> anyhow::Result<()> {
        self.ctl(&["heartbeat", NODE]).map(drop)
    }

    /// Every events.k8s.io Event stored.
    pub fn events(&self) -> anyhow::Result<Vec<Value>> {
        let out = self.ctl(&["events"])?;
        serde_json::from_str(&out).with_context(|| format!("events printed no JSON: {out}"))
    }

    /// The notes of the Events with `reason` regarding [`NODE`], oldest first.
    pub fn event_notes(&self, reason: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .events()?
            .iter()
            .filter(|e| e["reason"] == reason && e["regarding"]["name"] == NODE)
            .map(|e| e["note"].as_str().unwrap_or_default().to_owned())
            .collect())
    }

    /// The watch requests served so far (`GET ...?watch=true`).
    pub fn watch_requests(&self) -> anyhow::Result<usize> {
        let out = self.ctl(&["requests"])?;
        Ok(out.lines().filter(|l| l.contains("watch=true")).count())
    }
}

impl Drop for ApiServer<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `kilo-egress watch` in a lab's node namespace, talking to a [`Daemon`] and an [`ApiServer`].
/// Killed when dropped.
pub struct Watcher {
    log: PathBuf,
    child: Option<Child>,
}

impl Watcher {
    /// Starts `kilo-egress --server <daemon> watch --node NODE --resync-interval 1s extra..`.
    pub fn start(api: &ApiServer<'_>, daemon: &Daemon<'_>, extra: &[&str]) -> anyhow::Result<Self> {
        let log = api.lab.dir().join("watcher.log");
        let server = daemon.server_url();
        let mut args = vec![
            "--server",
            server.as_str(),
            "watch",
            "--node",
            NODE,
            "--resync-interval",
            "1s",
        ];
        args.extend_from_slice(extra);
        let bin = bin_path("kilo-egress");
        let file = open_log(&log, &cmd::cmdline(&bin, &args))?;
        let mut command = cmd::netns_command(&api.lab.node, &bin, &args);
        command.env("KUBECONFIG", api.kubeconfig());
        if std::env::var_os("RUST_LOG").is_none() {
            command.env("RUST_LOG", "info");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .context("start kilo-egress watch")?;
        Ok(Watcher {
            log,
            child: Some(child),
        })
    }

    /// Runs `NODE_NAME=NODE kilo-egress --server <daemon> watch --once` to completion (the node
    /// name as the DaemonSet passes it, from the downward API).
    pub fn once(api: &ApiServer<'_>, daemon: &Daemon<'_>) -> anyhow::Result<Captured> {
        let server = daemon.server_url();
        let args = ["--server", server.as_str(), "watch", "--once"];
        let mut command = cmd::netns_command(&api.lab.node, bin_path("kilo-egress"), &args);
        command
            .env("KUBECONFIG", api.kubeconfig())
            .env("NODE_NAME", NODE);
        cmd::capture(&mut command, None)
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("kilo-egress watch is not running");
        };
        cmd::stop_child(&mut child, "kilo-egress watch")
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The end of its log, to append to an error message.
    pub fn context(&self) -> String {
        tail(&self.log, "kilo-egress watch log")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How long an annotation change may take to reach the rules: the issue promises "within a
/// second"; this allows a loaded 2-core machine some slack, never a fixed sleep.
pub const FOLLOW_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the watcher may take to re-assert after kilo-egressd or the API server came back
/// (its backoff tops out at 5 s, plus a 1 s resync).
pub const RECOVER_TIMEOUT: Duration = Duration::from_secs(15);

/// Polls kilo-egressd until its pair is (`ipv4`, `ipv6`) ("" for MASQUERADE); the error shows
/// the last pair seen and the logs of both sides.
pub fn wait_for_pair(
    daemon: &Daemon<'_>,
    watcher: &Watcher,
    ipv4: &str,
    ipv6: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    use crate::lab::Family;
    let mut last = None;
    let ok = poll_until(timeout, || match daemon.get_rules() {
        Ok(view) => {
            let pair = (
                view.egress(Family::V4).to_owned(),
                view.egress(Family::V6).to_owned(),
            );
            let done = pair.0 == ipv4 && pair.1 == ipv6;
            last = Some(pair);
            done
        }
        Err(_) => false,
    });
    if !ok {
        bail!(
            "kilo-egressd did not reach ipv4={ipv4:?} ipv6={ipv6:?} within {timeout:?}; last seen {last:?}{}{}",
            watcher.context(),
            daemon.context()
        );
    }
    Ok(())
}
