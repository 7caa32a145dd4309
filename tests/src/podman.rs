//! Containers for the image test (`tests/tests/image_pod.rs`): podman set up for this machine,
//! stand-in base images made from the host's own packages and Rust toolchain, the image built by
//! `deploy/build-image.sh`, and the DaemonSet's pod turned into something `podman kube play`
//! runs inside a lab's node namespace.
//!
//! Podman here (Debian 12, podman 4.3, see shared/NOTES.md): runtime runc, cgroupfs, explicit
//! ulimits, all in a containers.conf of the test's own ([`Podman::new`]); no registry is
//! reachable, so `debian:bookworm-slim` and `rust:<host version>-bookworm` are made locally
//! ([`Podman::ensure_base_images`]) under the names the Dockerfile's FROM lines expect; builds use
//! `--network host` (never podman's bridge network, which writes rules into the root namespace);
//! pods run with `hostNetwork: true` under `nsenter --net=/run/netns/NS`, so the host network is
//! the lab's.

use crate::cmd::{self, Captured};
use crate::{poll_until, skip_or_fail};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The Debian release of the Dockerfile's stages (its `ARG DEBIAN_RELEASE`).
pub const DEBIAN_RELEASE: &str = "bookworm";

/// The runtime stage's base image.
pub const DEBIAN_IMAGE: &str = "docker.io/library/debian:bookworm-slim";

/// The label that marks (and keys) a stand-in base image made by this module.
pub const STAND_IN_LABEL: &str = "io.kilo-egress.test.stand-in";

/// How long a first build may take on a slow, shared 2-core machine (stand-ins and the image's
/// release build from scratch); a cached build takes seconds.
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// The containers.conf of the tests: what podman 4.3 needs on these machines (shared/NOTES.md).
pub const CONTAINERS_CONF: &str = "\
# Written by tests/src/podman.rs; used through CONTAINERS_CONF, /etc/containers is left alone.
[containers]
# root here lacks CAP_SYS_RESOURCE: podman's default ulimits fail with setrlimit EPERM.
default_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]

[engine]
# crun 1.8 refuses this machine's cgroup set-up; runc works.
runtime = \"runc\"
cgroup_manager = \"cgroupfs\"
";

/// True when `podman --version` runs. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs podman)` and returns false.
pub fn require_podman(test: &str) -> bool {
    let found = Command::new("podman")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    found
        || skip_or_fail(
            test,
            "needs podman: source tests/setup/podman.sh, or apt-get install podman runc catatonit debootstrap",
        )
}

/// The last `lines` lines of the file at `path`, under a title, for error messages.
pub fn tail_of(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    format!(
        "\n--- {} (last {} lines) ---\n{}",
        path.display(),
        lines.min(all.len()),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

/// Runs `command` to completion with its output appended to `log`, killing it after `timeout`.
/// Fails with the end of the log unless it exits 0.
pub fn run_logged(command: &mut Command, log: &Path, timeout: Duration) -> anyhow::Result<()> {
    let line = cmd::cmdline(
        command.get_program(),
        &command.get_args().collect::<Vec<_>>(),
    );
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("open {}", log.display()))?;
    std::io::Write::write_all(&mut file, format!("===== {line}\n").as_bytes())?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("start `{line}`"))?;
    let mut status = None;
    // A build takes minutes: poll its exit once a second.
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        status = child.try_wait()?;
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500).min(deadline - Instant::now()));
    }
    match status.or(child.try_wait()?) {
        Some(status) if status.success() => Ok(()),
        Some(status) => bail!("`{line}` failed ({status}){}", tail_of(log, 40)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "`{line}` did not finish within {timeout:?} and was killed{}",
                tail_of(log, 40)
            )
        }
    }
}

/// The host's Rust toolchain: where it lives and its version (`1.95.0`).
#[derive(Debug, Clone)]
pub struct HostRust {
    /// `rustc --print sysroot`, symlinks resolved.
    pub sysroot: PathBuf,
    /// `release:` of `rustc -vV`.
    pub version: String,
}

impl HostRust {
    /// Asks the `rustc` on PATH (rustup's proxy picks the toolchain cargo builds with).
    pub fn find() -> anyhow::Result<HostRust> {
        let sysroot = cmd::capture(Command::new("rustc").args(["--print", "sysroot"]), None)?
            .ok()?
            .stdout;
        let sysroot = std::fs::canonicalize(sysroot.trim()).context("resolve rustc's sysroot")?;
        let verbose = cmd::capture(Command::new("rustc").arg("-vV"), None)?
            .ok()?
            .stdout;
        let version = verbose
            .lines()
            .find_map(|l| l.strip_prefix("release: "))
            .context("no `release:` in rustc -vV")?
            .trim()
            .to_owned();
        Ok(HostRust { sysroot, version })
    }

    /// The builder image name the Dockerfile's `FROM rust:${RUST_VERSION}-bookworm` expects
    /// when built with `--build-arg RUST_VERSION=<version>`.
    pub fn image(&self) -> String {
        format!("docker.io/library/rust:{}-{DEBIAN_RELEASE}", self.version)
    }
}

/// The apt mirror the host uses for `suite` (its sources), else deb.debian.org.
pub fn host_apt_mirror(suite: &str) -> String {
    let mut texts = vec![std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default()];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir.flatten() {
            texts.push(std::fs::read_to_string(entry.path()).unwrap_or_default());
        }
    }
    mirror_in(&texts, suite).unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The first http(s) URI serving `suite` in apt sources, one-line (`deb URI SUITE ...`) or
/// deb822 (`URIs:` / `Suites:` stanzas).
fn mirror_in(texts: &[String], suite: &str) -> Option<String> {
    for text in texts {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["deb", rest @ ..] = words.as_slice() {
                let rest: Vec<&str> = rest
                    .iter()
                    .copied()
                    .filter(|w| !w.starts_with('['))
                    .collect();
                if rest.len() >= 2 && rest[1] == suite && rest[0].starts_with("http") {
                    return Some(rest[0].to_owned());
                }
            }
        }
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                    .unwrap_or_default()
            };
            if field("Suites:").iter().any(|s| s == suite)
                && let Some(uri) = field("URIs:").into_iter().find(|u| u.starts_with("http"))
            {
                return Some(uri);
            }
        }
    }
    None
}

/// podman with the test's containers.conf.
#[derive(Debug, Clone)]
pub struct Podman {
    conf: PathBuf,
    dir: PathBuf,
}

impl Podman {
    /// Writes the containers.conf into `dir` (kept between runs, with the build logs).
    pub fn new(dir: &Path) -> anyhow::Result<Podman> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let conf = dir.join("containers.conf");
        std::fs::write(&conf, CONTAINERS_CONF)?;
        Ok(Podman {
            conf,
            dir: dir.to_path_buf(),
        })
    }

    /// The directory of the containers.conf and the build logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The containers.conf (for `CONTAINERS_CONF`).
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// `podman args` with `CONTAINERS_CONF` set.
    pub fn command<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> Command {
        let mut command = Command::new("podman");
        command.env("CONTAINERS_CONF", &self.conf).args(args);
        command
    }

    /// `podman args` in the network namespace `ns` (`nsenter --net=/run/netns/NS`): a pod with
    /// `hostNetwork: true` started so lives in `ns`.
    pub fn command_in<S: AsRef<std::ffi::OsStr>>(&self, ns: &str, args: &[S]) -> Command {
        let mut command = Command::new("nsenter");
        command
            .env("CONTAINERS_CONF", &self.conf)
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("podman")
            .args(args);
        command
    }

    /// Runs `podman args` and captures its output (any exit code).
    pub fn run<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<Captured> {
        cmd::capture(&mut self.command(args), None)
    }

    /// Runs `podman args`; fails unless it exits 0.
    pub fn run_ok<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<Captured> {
        self.run(args)?.ok()
    }

    /// True when the local storage holds `image`.
    pub fn image_exists(&self, image: &str) -> bool {
        self.run(&["image", "exists", image])
            .is_ok_and(|out| out.success())
    }

    /// The value of `label` on the local `image`, if any.
    pub fn image_label(&self, image: &str, label: &str) -> Option<String> {
        let format = format!("{{{{index .Labels \"{label}\"}}}}");
        let out = self
            .run(&["image", "inspect", "--format", &format, image])
            .ok()?;
        let value = out.stdout.trim();
        (out.success() && !value.is_empty() && value != "<no value>").then(|| value.to_owned())
    }

    /// Makes the Dockerfile's base images when the local storage lacks them (or holds a
    /// stand-in made by an older recipe): `debian:bookworm-slim` from `debootstrap --variant=minbase`
    /// with the host's apt mirror, and `rust:<host version>-bookworm` from it plus gcc, libc6-dev,
    /// the host's CA bundle (the crate registry is reached through this machine's TLS proxy) and
    /// the host's toolchain, laid out as the official image does (`/usr/local/cargo/bin`,
    /// `CARGO_HOME=/usr/local/cargo`). Returns what it made, for the test's log.
    pub fn ensure_base_images(&self, rust: &HostRust) -> anyhow::Result<Vec<String>> {
        let mut made = Vec::new();
        let debian_key = format!("debootstrap-minbase-{DEBIAN_RELEASE}-v1");
        let debian_fresh = self.image_label(DEBIAN_IMAGE, STAND_IN_LABEL).as_deref()
            == Some(debian_key.as_str())
            || (self.image_exists(DEBIAN_IMAGE)
                && self.image_label(DEBIAN_IMAGE, STAND_IN_LABEL).is_none());
        if !debian_fresh {
            self.make_debian(&debian_key)?;
            made.push(DEBIAN_IMAGE.to_owned());
        }
        let containerfile = rust_containerfile(&rust.version);
        let rust_key = format!("{}-{}", rust.version, fnv1a(&containerfile));
        let rust_image = rust.image();
        let rust_fresh = self.image_label(&rust_image, STAND_IN_LABEL).as_deref()
            == Some(rust_key.as_str())
            || (self.image_exists(&rust_image)
                && self.image_label(&rust_image, STAND_IN_LABEL).is_none());
        if !rust_fresh || !made.is_empty() {
            self.make_rust(rust, &containerfile, &rust_key)?;
            made.push(rust_image);
        }
        Ok(made)
    }

    fn make_debian(&self, key: &str) -> anyhow::Result<()> {
        let work = tempfile::Builder::new()
            .prefix("kilo-egress-debootstrap-")
            .tempdir_in(&self.dir)?;
        let rootfs = work.path().join("rootfs");
        let log = self.dir.join("debootstrap.log");
        let mirror = host_apt_mirror(DEBIAN_RELEASE);
        let mut debootstrap = Command::new("debootstrap");
        debootstrap
            .args(["--variant=minbase", DEBIAN_RELEASE])
            .arg(&rootfs)
            .arg(&mirror);
        run_logged(&mut debootstrap, &log, Duration::from_secs(15 * 60)).context(
            "debootstrap the stand-in for debian:bookworm-slim (apt-get install debootstrap)",
        )?;
        // Like the slim image: no package cache, no package lists.
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            if let Ok(entries) = std::fs::read_dir(rootfs.join(dir)) {
                for entry in entries.flatten() {
                    if entry.path().is_file() {
                        let _ = std::fs::remove_file(entry.path());
                    }
                }
            }
        }
        let tar = work.path().join("rootfs.tar");
        let mut pack = Command::new("tar");
        pack.arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
        run_logged(&mut pack, &log, Duration::from_secs(5 * 60))?;
        let label = format!("LABEL {STAND_IN_LABEL}={key}");
        let mut import =
            self.command(&["import", "--change", "CMD [\"bash\"]", "--change", &label]);
        import.arg(&tar).arg(DEBIAN_IMAGE);
        run_logged(&mut import, &log, Duration::from_secs(5 * 60))
    }

    fn make_rust(&self, rust: &HostRust, containerfile: &str, key: &str) -> anyhow::Result<()> {
        let context = tempfile::Builder::new()
            .prefix("kilo-egress-rust-stand-in-")
            .tempdir_in(&self.dir)?;
        let toolchain = context.path().join("toolchain");
        std::fs::create_dir(&toolchain)?;
        let log = self.dir.join("rust-stand-in.log");
        // Hard links when the toolchain is on the same file system, a copy otherwise.
        for part in ["bin", "lib", "libexec", "etc"] {
            let source = rust.sysroot.join(part);
            if !source.exists() {
                continue;
            }
            let linked = Command::new("cp")
                .arg("-al")
                .arg(&source)
                .arg(&toolchain)
                .status()
                .is_ok_and(|s| s.success());
            if !linked {
                let mut copy = Command::new("cp");
                copy.arg("-a").arg(&source).arg(&toolchain);
                run_logged(&mut copy, &log, Duration::from_secs(10 * 60))?;
            }
        }
        std::fs::copy(
            "/etc/ssl/certs/ca-certificates.crt",
            context.path().join("ca-certificates.crt"),
        )
        .context("the host's CA bundle /etc/ssl/certs/ca-certificates.crt")?;
        std::fs::write(context.path().join("Containerfile"), containerfile)?;
        let label = format!("{STAND_IN_LABEL}={key}");
        let mut build = self.command(&[
            "build",
            "--pull=never",
            "--network",
            "host",
            "--label",
            &label,
            "-t",
            &rust.image(),
        ]);
        build.arg(context.path());
        run_logged(&mut build, &log, Duration::from_secs(20 * 60))
            .context("build the stand-in Rust builder image")
    }

    /// Builds the image as a user would, with `deploy/build-image.sh` (podman, tag `image`), on
    /// the stand-in builder (`--build-arg RUST_VERSION`), local images only and the host network.
    /// Layers are cached by podman: unchanged sources rebuild nothing, a changed source
    /// rebuilds from its COPY on (cargo's target directory is a cache mount). Returns how long
    /// it took.
    pub fn build_image(
        &self,
        source: &Path,
        image: &str,
        rust: &HostRust,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let rust_arg = format!("RUST_VERSION={}", rust.version);
        let mut build = Command::new(source.join("deploy/build-image.sh"));
        build
            .env("CONTAINERS_CONF", &self.conf)
            .env("CONTAINER_ENGINE", "podman")
            .env("IMAGE", image)
            .args([
                "--pull=never",
                "--network",
                "host",
                "--build-arg",
                &rust_arg,
            ]);
        let log = self.dir.join("build-image.log");
        run_logged(&mut build, &log, BUILD_TIMEOUT).context("./deploy/build-image.sh")?;
        let took = started.elapsed();
        // Each changed source leaves the previous build's layers behind, untagged: keep a day's
        // worth (the cache of recent runs), drop older ones so the storage does not grow forever.
        let mut prune = self.command(&["image", "prune", "--force", "--filter", "until=24h"]);
        run_logged(&mut prune, &log, Duration::from_secs(5 * 60))?;
        Ok(took)
    }

    /// The value of `format` (a Go template) for a container.
    pub fn inspect(&self, container: &str, format: &str) -> anyhow::Result<String> {
        Ok(self
            .run_ok(&["inspect", "--format", format, container])?
            .stdout
            .trim()
            .to_owned())
    }

    /// The host pid of a running container's first process.
    pub fn pid(&self, container: &str) -> anyhow::Result<u32> {
        let pid = self.inspect(container, "{{.State.Pid}}")?;
        pid.parse()
            .ok()
            .filter(|&p| p > 0)
            .with_context(|| format!("{container} has no running process (pid {pid:?})"))
    }

    /// `podman exec [flags] container command..`, captured.
    pub fn exec(
        &self,
        flags: &[&str],
        container: &str,
        command: &[&str],
    ) -> anyhow::Result<Captured> {
        let mut args = vec!["exec"];
        args.extend_from_slice(flags);
        args.push(container);
        args.extend_from_slice(command);
        self.run(&args)
    }
}

/// The Containerfile of the stand-in Rust builder.
pub fn rust_containerfile(version: &str) -> String {
    let toolchain = format!("/usr/local/rustup/toolchains/{version}-x86_64-unknown-linux-gnu");
    format!(
        "# A stand-in for {DEBIAN_RELEASE}'s rust:{version} image, made by tests/src/podman.rs from the host's toolchain.\n\
         FROM {DEBIAN_IMAGE}\n\
         RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev ca-certificates \\\n    && rm -rf /var/lib/apt/lists/*\n\
         COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt\n\
         COPY toolchain {toolchain}\n\
         ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo RUST_VERSION={version} \\\n    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         RUN mkdir -p /usr/local/cargo/bin \\\n    && for b in cargo rustc rustdoc; do ln -s {toolchain}/bin/$b /usr/local/cargo/bin/$b; done \\\n    && cargo --version && rustc --version\n"
    )
}

/// A short stable hash (FNV-1a, 64 bits, hex) to key a stand-in by its recipe.
pub fn fnv1a(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// What the kubelet does to an emptyDir before the containers start, which podman 4.3 does not
/// model (it ignores `medium` and `fsGroup`): the directory is a tmpfs with mode 1777 (medium
/// Memory) or a directory with mode 0777, then `fsGroup` makes it group-owned by that group with
/// group rwx and the setgid bit.
pub fn kubelet_empty_dir_mode(medium_memory: bool, fs_group: Option<u32>) -> u32 {
    let mut mode = if medium_memory { 0o1777 } else { 0o777 };
    if fs_group.is_some() {
        mode |= 0o2000 | 0o070;
    }
    mode
}

/// The DaemonSet's pod as `podman kube play` takes it, and what had to change.
#[derive(Debug, Clone)]
pub struct PodPlan {
    /// The Pod (JSON, which kube play reads as YAML).
    pub pod: Value,
    /// Every change from the DaemonSet's pod template, one line each.
    pub changes: Vec<String>,
    /// Host directories the test must create for emptyDirs: path → (mode, group).
    pub empty_dirs: BTreeMap<PathBuf, (u32, Option<u32>)>,
}

/// Turns the rendered DaemonSet `daemonset` into a Pod named `name` for `podman kube play`,
/// changing only what podman cannot take:
/// * the kind (a Pod from the template; podman has no DaemonSet), and no namespace;
/// * hostPath volumes point into `host_dir` (the test's own directory), type kept;
/// * emptyDir volumes become hostPath directories in `host_dir` that the test prepares as the
///   kubelet would ([`kubelet_empty_dir_mode`]): podman ignores `medium` and `fsGroup`;
/// * the downward-API `fieldRef: spec.nodeName` becomes the literal `node`, `status.hostIP` the
///   literal `host_ip`, and `$(VAR)` in a later env value is expanded as the kubelet does
///   (podman expands neither);
/// * with `hostNetwork`, container `ports` are dropped: there they only document what the
///   containers listen on, and podman refuses port mappings on the host's network;
/// * containers that talk to the Kubernetes API (env `NODE_NAME`) get `KUBECONFIG` pointing at
///   `kubeconfig`, mounted read-only: podman has no service-account token.
///
/// Everything else (images, commands, args, securityContext, probes, mounts, resources) is kept
/// as rendered.
pub fn pod_from_daemonset(
    daemonset: &Value,
    name: &str,
    host_dir: &Path,
    node: &str,
    host_ip: &str,
    kubeconfig: &Path,
) -> anyhow::Result<PodPlan> {
    if daemonset["kind"] != "DaemonSet" {
        bail!("not a DaemonSet: {}", daemonset["kind"]);
    }
    let template = &daemonset["spec"]["template"];
    let mut spec = template["spec"].clone();
    let mut changes = vec![format!(
        "kind: DaemonSet {}/{} -> Pod {name} (its template; no namespace)",
        daemonset["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default(),
        daemonset["metadata"]["name"].as_str().unwrap_or_default()
    )];
    let fs_group = spec["securityContext"]["fsGroup"]
        .as_u64()
        .map(|g| g as u32);
    let mut empty_dirs = BTreeMap::new();
    for volume in spec["volumes"]
        .as_array_mut()
        .context("the pod template has no volumes")?
    {
        let vname = volume["name"].as_str().unwrap_or_default().to_owned();
        let path = host_dir.join(format!("volume-{vname}"));
        if let Some(host_path) = volume.get_mut("hostPath") {
            let was = host_path["path"].as_str().unwrap_or_default().to_owned();
            host_path["path"] = json!(path.to_str().context("utf-8 path")?);
            changes.push(format!(
                "volume {vname}: hostPath {was} -> {} (type {})",
                path.display(),
                host_path["type"].as_str().unwrap_or("\"\"")
            ));
        } else if let Some(empty_dir) = volume.get("emptyDir").cloned() {
            let memory = empty_dir["medium"] == "Memory";
            let mode = kubelet_empty_dir_mode(memory, fs_group);
            empty_dirs.insert(path.clone(), (mode, fs_group));
            *volume = json!({
                "name": vname,
                "hostPath": {"path": path.to_str().context("utf-8 path")?, "type": "Directory"},
            });
            changes.push(format!(
                "volume {vname}: emptyDir {empty_dir} -> hostPath {} prepared as the kubelet would: mode {mode:o}, group {}",
                path.display(),
                fs_group.map_or("unchanged".to_owned(), |g| g.to_string())
            ));
        }
    }
    let mut needs_kubeconfig = false;
    let host_network = spec["hostNetwork"] == true;
    for container in spec["containers"]
        .as_array_mut()
        .context("the pod template has no containers")?
    {
        let cname = container["name"].as_str().unwrap_or_default().to_owned();
        if host_network
            && let Some(ports) = container.as_object_mut().and_then(|c| c.remove("ports"))
        {
            changes.push(format!(
                "container {cname}: ports {ports} dropped (hostNetwork: informational only; podman maps ports, which the host's network cannot take)"
            ));
        }
        let mut talks_to_api = false;
        // The values defined so far, for `$(VAR)` in later ones.
        let mut defined: Vec<(String, String)> = Vec::new();
        for env in container
            .get_mut("env")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            let var = env["name"].as_str().unwrap_or_default().to_owned();
            let field = env["valueFrom"]["fieldRef"]["fieldPath"].clone();
            let literal = match field.as_str() {
                Some("spec.nodeName") => Some(node),
                Some("status.hostIP") => Some(host_ip),
                _ => None,
            };
            if let Some(value) = literal {
                *env = json!({"name": var, "value": value});
                changes.push(format!(
                    "container {cname}: env {var} from fieldRef {} -> value {value}",
                    field.as_str().unwrap_or_default()
                ));
                talks_to_api |= var == "NODE_NAME";
            } else if let Some(value) = env["value"].as_str().map(str::to_owned) {
                let expanded = defined.iter().fold(value.clone(), |text, (name, value)| {
                    text.replace(&format!("$({name})"), value)
                });
                if expanded != value {
                    env["value"] = json!(expanded);
                    changes.push(format!(
                        "container {cname}: env {var} {value} -> {expanded} (expanded as the kubelet does)"
                    ));
                }
            }
            if let Some(value) = env["value"].as_str() {
                defined.push((var, value.to_owned()));
            }
        }
        if talks_to_api {
            needs_kubeconfig = true;
            let env = container["env"].as_array_mut().expect("env exists");
            env.push(json!({"name": "KUBECONFIG", "value": "/etc/kilo-egress-test/kubeconfig"}));
            let mounts = container
                .as_object_mut()
                .expect("a container is an object")
                .entry("volumeMounts")
                .or_insert_with(|| json!([]));
            mounts
                .as_array_mut()
                .context("volumeMounts is a list")?
                .push(json!({"name": "test-kubeconfig", "mountPath": "/etc/kilo-egress-test/kubeconfig", "readOnly": true}));
            changes.push(format!(
                "container {cname}: KUBECONFIG=/etc/kilo-egress-test/kubeconfig (hostPath {}, read-only) instead of the service account token",
                kubeconfig.display()
            ));
        }
    }
    if needs_kubeconfig {
        spec["volumes"]
            .as_array_mut()
            .expect("volumes exist")
            .push(json!({"name": "test-kubeconfig", "hostPath": {"path": kubeconfig.to_str().context("utf-8 path")?, "type": "File"}}));
    }
    let pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": template["metadata"]["labels"].clone()},
        "spec": spec,
    });
    Ok(PodPlan {
        pod,
        changes,
        empty_dirs,
    })
}

/// A pod started with `podman kube play` in a lab namespace; removed (with its containers) when
/// dropped, whatever happened.
pub struct PlayedPod {
    podman: Podman,
    /// The pod's name.
    pub name: String,
    /// The file it was played from.
    pub file: PathBuf,
}

impl PlayedPod {
    /// Writes `pod` to `file` and runs `podman kube play` in the network namespace `ns`.
    pub fn play(podman: &Podman, ns: &str, pod: &Value, file: &Path) -> anyhow::Result<PlayedPod> {
        let name = pod["metadata"]["name"]
            .as_str()
            .context("the pod has no name")?
            .to_owned();
        std::fs::write(file, serde_json::to_string_pretty(pod)?)?;
        let played = PlayedPod {
            podman: podman.clone(),
            name,
            file: file.to_path_buf(),
        };
        let mut command = podman.command_in(
            ns,
            &[
                std::ffi::OsStr::new("kube"),
                "play".as_ref(),
                file.as_os_str(),
            ],
        );
        let out = cmd::capture(&mut command, None)?;
        if !out.success() {
            bail!("podman kube play failed: {out}");
        }
        Ok(played)
    }

    /// The podman name of the pod's container `container` (`<pod>-<container>`).
    pub fn container(&self, container: &str) -> String {
        format!("{}-{container}", self.name)
    }

    /// The state (`running`, `exited`, ...) and exit code of a container.
    pub fn state(&self, container: &str) -> anyhow::Result<(String, i64)> {
        let out = self.podman.inspect(
            &self.container(container),
            "{{.State.Status}} {{.State.ExitCode}}",
        )?;
        let (status, code) = out.split_once(' ').context("status and exit code")?;
        Ok((status.to_owned(), code.parse().unwrap_or(-1)))
    }

    /// Polls until the container `container` has exited; returns its exit code.
    pub fn wait_exited(&self, container: &str, timeout: Duration) -> anyhow::Result<i64> {
        let mut last = None;
        let done = poll_until(timeout, || {
            last = self.state(container).ok();
            last.as_ref().is_some_and(|(status, _)| status == "exited")
        });
        match last {
            Some((_, code)) if done => Ok(code),
            _ => bail!(
                "{} did not exit within {timeout:?} (last state {last:?}){}",
                self.container(container),
                self.logs(container)
            ),
        }
    }

    /// Everything a container logged, under a title, for error messages.
    pub fn logs(&self, container: &str) -> String {
        let name = self.container(container);
        let out = self.podman.run(&["logs", &name]);
        let mut text = format!("\n--- podman logs {name} ---\n");
        match out {
            Ok(out) => {
                let _ = write!(text, "{}{}", out.stdout, out.stderr);
            }
            Err(e) => {
                let _ = write!(text, "(podman logs failed: {e:#})");
            }
        }
        text
    }

    /// `podman pod stop -t grace`: SIGTERM to every container, SIGKILL after `grace`.
    pub fn stop(&self, grace: Duration) -> anyhow::Result<Captured> {
        let grace = grace.as_secs().to_string();
        self.podman
            .run_ok(&["pod", "stop", "-t", &grace, &self.name])
    }
}

impl Drop for PlayedPod {
    fn drop(&mut self) {
        let _ = self
            .podman
            .run(&["pod", "rm", "--force", "--time", "0", &self.name]);
    }
}

/// Creates the emptyDir stand-ins of `plan` as the kubelet would (owner root, group `fsGroup`).
pub fn prepare_empty_dirs(plan: &PodPlan) -> anyhow::Result<()> {
    for (path, (mode, group)) in &plan.empty_dirs {
        std::fs::create_dir_all(path)?;
        if let Some(group) = group {
            std::os::unix::fs::chown(path, Some(0), Some(*group))?;
        }
        // After chown, which clears setgid on some file systems.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apt_mirror_from_one_line_and_deb822_sources() {
        let one_line =
            "# comment\ndeb [arch=amd64] http://mirror.example/debian bookworm main\n".to_owned();
        assert_eq!(
            mirror_in(&[one_line], "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        let deb822 = "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
            .to_owned();
        assert_eq!(
            mirror_in(std::slice::from_ref(&deb822), "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(mirror_in(&[deb822], "trixie"), None);
    }

    #[test]
    fn empty_dirs_get_the_kubelets_modes() {
        assert_eq!(kubelet_empty_dir_mode(true, Some(65532)), 0o3777);
        assert_eq!(kubelet_empty_dir_mode(false, Some(65532)), 0o2777);
        assert_eq!(kubelet_empty_dir_mode(true, None), 0o1777);
    }

    #[test]
    fn the_pod_changes_only_what_podman_cannot_take() {
        let ds = json!({
            "kind": "DaemonSet",
            "metadata": {"name": "kilo-egress", "namespace": "kube-system"},
            "spec": {"template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {
                    "hostNetwork": true,
                    "securityContext": {"fsGroup": 65532},
                    "containers": [
                        {"name": "d", "securityContext": {"readOnlyRootFilesystem": true},
                         "volumeMounts": [{"name": "s", "mountPath": "/run/s"}],
                         "ports": [{"name": "metrics", "containerPort": 9464}]},
                        {"name": "w", "env": [
                            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                            {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                            {"name": "LISTEN", "value": "$(HOST_IP):9465"},
                        ]},
                    ],
                    "volumes": [
                        {"name": "s", "emptyDir": {"medium": "Memory"}},
                        {"name": "h", "hostPath": {"path": "/var/lib/x", "type": "DirectoryOrCreate"}},
                    ],
                },
            }},
        });
        let plan = pod_from_daemonset(
            &ds,
            "p",
            Path::new("/t"),
            "node-a",
            "192.0.2.10",
            Path::new("/t/kc"),
        )
        .unwrap();
        let spec = &plan.pod["spec"];
        assert_eq!(plan.pod["kind"], "Pod");
        let mut daemon = ds["spec"]["template"]["spec"]["containers"][0].clone();
        daemon.as_object_mut().unwrap().remove("ports");
        assert_eq!(spec["containers"][0], daemon, "only the ports are dropped");
        assert_eq!(
            spec["containers"][1]["env"][0],
            json!({"name": "NODE_NAME", "value": "node-a"})
        );
        assert_eq!(
            spec["containers"][1]["env"][1],
            json!({"name": "HOST_IP", "value": "192.0.2.10"})
        );
        assert_eq!(
            spec["containers"][1]["env"][2],
            json!({"name": "LISTEN", "value": "192.0.2.10:9465"})
        );
        assert_eq!(spec["containers"][1]["env"][3]["name"], "KUBECONFIG");
        assert_eq!(
            spec["volumes"][0]["hostPath"],
            json!({"path": "/t/volume-s", "type": "Directory"})
        );
        assert_eq!(
            spec["volumes"][1]["hostPath"],
            json!({"path": "/t/volume-h", "type": "DirectoryOrCreate"})
        );
        assert_eq!(spec["volumes"][2]["hostPath"]["path"], "/t/kc");
        assert_eq!(spec["securityContext"], json!({"fsGroup": 65532}));
        assert_eq!(
            plan.empty_dirs[Path::new("/t/volume-s")],
            (0o3777, Some(65532))
        );
        assert_eq!(plan.changes.len(), 8, "{:#?}", plan.changes);
    }
}
