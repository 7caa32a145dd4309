//! The image and the DaemonSet's pod, for real. `./deploy/build-image.sh` builds the image with
//! podman (on stand-in base images the test makes from the host's packages and toolchain, cached
//! between runs; podman's layer cache rebuilds from the first changed source on), `kubectl
//! kustomize` renders `deploy/kubernetes` with the image set as a user sets it, and the
//! DaemonSet's pod runs with `podman kube play` inside a lab's node namespace: both containers,
//! with the securityContext, volumes and probes as written. Changed are only what podman cannot
//! take ([`kilo_egress_tests::podman::pod_from_daemonset`] lists them and prints them): the kind,
//! hostPath locations, emptyDirs (prepared as the kubelet prepares them, since podman ignores
//! `fsGroup` and `medium`), the downward-API node name and host IP, the containers' ports (podman
//! refuses them on the host's network), and a kubeconfig instead of the service account token. The node is a busy Kubernetes node (kubelet's marker chain, 20,000 kube-proxy
//! rules per family), once on nft and once on legacy, and kg writes KILO-NAT only after the pod
//! started, as it may on a new node. The test proves:
//!
//! * kilo-egressd serves before kg runs (its startup probe passes) on the node's backend;
//! * kilo-egressd's capabilities (effective, permitted, bounding) are exactly what the manifest
//!   grants, the watcher has none; both run as the manifest's user and group, with
//!   no-new-privileges and a seccomp filter, in the lab's network namespace;
//! * both root file systems are read-only;
//! * the watcher reaches the socket (mode 0660, group 65532) as the manifest's non-root user and
//!   group, and another user does not;
//! * with a stand-in API server serving the Node and its annotation, KILO-NAT gets the SNAT
//!   directly before a Kilo-style MASQUERADE and upstream sees the annotated addresses;
//! * both containers serve /metrics on the node's address (status.hostIP), and promtool accepts
//!   both;
//! * every exec probe of the manifest passes when run, as do podman's healthchecks; the
//!   watcher's liveness check fails while the watcher is stopped, and passes again after;
//! * the memory limits are applied and hold with room to spare: the peak on this node, times
//!   [`HEADROOM`], stays below each limit (the former 64Mi of kilo-egressd did not: the legacy
//!   tools read the whole nat table, and were OOM-killed at 40,000 rules per family);
//! * SIGTERM stops both containers cleanly, leaving the rules; `kilo-egressd cleanup` from the
//!   image, run as docs/operations.md says, removes them and nothing of kg's;
//! * the root namespace's rules are byte-identical before and after (iptables-save and
//!   ip6tables-save of both backends).
//!
//! What podman does not model, and so remains to check on a real cluster (docs/operations.md,
//! "What the image test proves, and what it cannot", has the commands):
//! * `fsGroup`: the kubelet's group ownership and setgid bit on the emptyDirs (emulated here);
//! * emptyDir `medium: Memory` and `sizeLimit` (here a plain directory);
//! * probe timers: periodSeconds, timeoutSeconds, failureThreshold, the startup probe holding the
//!   others back (here each probe runs once, by hand);
//! * DaemonSet scheduling: one pod per node, tolerations, priorityClassName, the rolling update;
//! * the service account token, RBAC against a real API server, the downward-API node name;
//! * the container runtime's own RuntimeDefault seccomp profile (here podman's).
//!
//! A second test drives `kilo-egress watch --heartbeat-file` and `watch-alive` with the workspace
//! binaries (no podman): the heartbeat stops while kilo-egressd is down and resumes after.

use kilo_egress_tests::cmd::{self, Captured};
use kilo_egress_tests::kg::snat_before_masquerade_problem;
use kilo_egress_tests::kube::{
    ANNOTATION, ApiServer, FOLLOW_TIMEOUT, NODE, RECOVER_TIMEOUT, Watcher, require_kmock,
    require_kubectl,
};
use kilo_egress_tests::podman::{
    HostRust, PlayedPod, Podman, fnv1a, pod_from_daemonset, prepare_empty_dirs, require_podman,
};
use kilo_egress_tests::prom::{self, require_promtool};
use kilo_egress_tests::{
    Backend, BusyNode, DaemonConfig, Family, Lab, bin_path, poll_until, require_root, source_root,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The image the test builds (a user's default is `kilo-egress:<version>`): one tag per checkout,
/// so test runs of two clones on one machine never run each other's build.
fn image() -> String {
    let checkout = source_root();
    format!(
        "localhost/kilo-egress:e2e-{}",
        &fnv1a(checkout.to_str().unwrap())[..8]
    )
}
const V4: &str = "198.51.100.20";
const V6: &str = "2001:db8:2::20";

/// How many times the memory peak on the test's busy node (20,000 nat rules per family) a
/// container's memory limit must hold: room for a node with four times the rules.
const HEADROOM: u64 = 4;

/// How long the pod may take from `kube play` until kilo-egressd serves and the watcher applied
/// the annotation (container start on a loaded 2-core machine, the watcher's backoff).
const POD_TIMEOUT: Duration = Duration::from_secs(90);

/// Progress lines, straight to stderr (past the harness's capture): the build takes minutes.
fn say(text: &str) {
    let _ = writeln!(std::io::stderr().lock(), "image_pod: {text}");
}

/// `to` relative to the directory `from` (kustomize refuses absolute resource paths).
fn relative(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<Component> = from.components().collect();
    let to: Vec<Component> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path = PathBuf::new();
    for _ in common..from.len() {
        path.push("..");
    }
    for part in &to[common..] {
        path.push(part);
    }
    path
}

/// Renders `deploy/kubernetes` with the image set as docs/operations.md tells users to (an
/// overlay with an `images:` entry), and returns the documents as JSON.
fn render_with_image(dir: &Path, image: &str) -> Vec<Value> {
    let overlay = dir.join("overlay");
    std::fs::create_dir_all(&overlay).unwrap();
    let (name, tag) = image.rsplit_once(':').unwrap();
    let base = relative(&overlay, &source_root().join("deploy/kubernetes"));
    std::fs::write(
        overlay.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - {}\nimages:\n  - name: kilo-egress\n    newName: {name}\n    newTag: {tag}\n",
            base.display()
        ),
    )
    .unwrap();
    let out = cmd::capture(
        Command::new("kubectl").args(["kustomize", overlay.to_str().unwrap()]),
        None,
    )
    .unwrap();
    assert!(out.success(), "kubectl kustomize: {out}");
    let mut python = Command::new("python3");
    python.args([
        "-c",
        "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
    ]);
    let json = cmd::capture(&mut python, Some(&out.stdout)).unwrap();
    assert!(json.success(), "YAML to JSON (PyYAML): {json}");
    serde_json::from_str(&json.stdout).unwrap()
}

/// The root namespace's rules: `iptables-save` and `ip6tables-save` of both backends, with the
/// `# Generated/Completed` time stamps and the chains' packet counters (live traffic) blanked.
fn root_namespace_rules() -> String {
    let mut all = String::new();
    for tool in [
        "iptables-nft-save",
        "ip6tables-nft-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ] {
        // Read-only, in the test's own (root) namespace.
        let out = cmd::capture(&mut Command::new(tool), None).unwrap();
        assert!(out.success(), "{out}");
        all.push_str(&format!("### {tool}\n"));
        for line in out.stdout.lines().filter(|l| !l.starts_with('#')) {
            let line = match (line.starts_with(':'), line.rfind(" [")) {
                (true, Some(at)) => format!("{} [-:-]", &line[..at]),
                _ => line.to_owned(),
            };
            all.push_str(&line);
            all.push('\n');
        }
    }
    all
}

/// The capability bits Linux numbers them with (capability.h), for the names a manifest uses.
fn capability_bit(name: &str) -> u32 {
    match name {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "DAC_READ_SEARCH" => 2,
        "FOWNER" => 3,
        "FSETID" => 4,
        "KILL" => 5,
        "SETGID" => 6,
        "SETUID" => 7,
        "SETPCAP" => 8,
        "NET_BIND_SERVICE" => 10,
        "NET_BROADCAST" => 11,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "SYS_MODULE" => 16,
        "SYS_CHROOT" => 18,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "MKNOD" => 27,
        "AUDIT_WRITE" => 29,
        "SETFCAP" => 31,
        "BPF" => 39,
        other => panic!("capability {other} is not in the test's table"),
    }
}

/// The capability set a container's securityContext grants (it must drop ALL: the runtime's
/// defaults differ between runtimes).
fn granted_capabilities(security: &Value) -> u64 {
    let caps = &security["capabilities"];
    let drop: Vec<&str> = caps["drop"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(drop, ["ALL"], "every container drops ALL capabilities");
    caps["add"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .fold(0, |mask, name| mask | 1u64 << capability_bit(name))
}

/// `/proc/PID/status` as a map of field → value.
fn proc_status(pid: u32) -> BTreeMap<String, String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

fn hex(field: &str) -> u64 {
    u64::from_str_radix(field, 16).unwrap()
}

fn container<'a>(pod: &'a Value, name: &str) -> &'a Value {
    pod["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// Polls until KILO-NAT holds kg's rules with our SNAT to the family's preferred address directly
/// before MASQUERADE, for both families.
fn wait_for_snat_in_kilo_nat(lab: &Lab, backend: Backend, timeout: Duration) -> Result<(), String> {
    for family in Family::ALL {
        let kg = lab.kg(backend, family);
        let mut last = (Vec::new(), None);
        let ok = poll_until(timeout, || {
            let chain = lab
                .iptables(backend, family)
                .rules("KILO-NAT")
                .unwrap_or_default();
            let problem = snat_before_masquerade_problem(&chain, &kg, family.preferred());
            let ok = problem.is_none();
            last = (chain, problem);
            ok
        });
        if !ok {
            return Err(format!(
                "{}: {} (KILO-NAT: {:#?})",
                family.name(),
                last.1.unwrap_or_default(),
                last.0
            ));
        }
    }
    Ok(())
}

/// The image, built once per test process (both backends' tests share it).
fn built_image() -> Podman {
    static BUILT: OnceLock<Result<Podman, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let podman = Podman::new(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("image-pod"))
            .map_err(|e| format!("{e:#}"))?;
        let rust = HostRust::find().map_err(|e| format!("{e:#}"))?;
        let started = Instant::now();
        let made = podman
            .ensure_base_images(&rust)
            .map_err(|e| format!("{e:#}"))?;
        say(&format!(
            "stand-in base images: {} ({:.1?})",
            if made.is_empty() {
                "cached".to_owned()
            } else {
                format!("made {}", made.join(", "))
            },
            started.elapsed()
        ));
        let took = podman
            .build_image(&source_root(), &image(), &rust)
            .map_err(|e| format!("{e:#}"))?;
        say(&format!(
            "./deploy/build-image.sh: {} in {took:.1?} (log: {})",
            image(),
            podman.dir().join("build-image.log").display()
        ));
        Ok(podman)
    });
    built
        .clone()
        .unwrap_or_else(|e| panic!("building the image failed: {e}"))
}

/// What a container's memory cgroup says (cgroup v1 or v2).
struct Memory {
    /// The limit, in bytes.
    limit: u64,
    /// The highest usage so far, page cache included, in bytes.
    peak: u64,
    /// How often usage hit the limit (the kernel then reclaims, or kills).
    hit_limit: u64,
    /// Processes the OOM killer ended.
    oom_kills: u64,
    /// memory.stat, for messages.
    stat: String,
}

/// The memory cgroup of the process `pid`.
fn memory_cgroup(pid: u32) -> Memory {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let read = |path: String| -> String {
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let number = |text: String| text.trim().parse().unwrap_or(u64::MAX);
    let field = |text: &str, name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map_or(0, |v| v.trim().parse().unwrap_or(0))
    };
    let v1 = cgroups.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    match v1 {
        Some(path) => {
            let dir = format!("/sys/fs/cgroup/memory{path}");
            Memory {
                limit: number(read(format!("{dir}/memory.limit_in_bytes"))),
                peak: number(read(format!("{dir}/memory.max_usage_in_bytes"))),
                hit_limit: number(read(format!("{dir}/memory.failcnt"))),
                oom_kills: field(&read(format!("{dir}/memory.oom_control")), "oom_kill"),
                stat: read(format!("{dir}/memory.stat")),
            }
        }
        None => {
            let path = cgroups
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .expect("a cgroup v2 path");
            let dir = format!("/sys/fs/cgroup{path}");
            let events = read(format!("{dir}/memory.events"));
            Memory {
                limit: number(read(format!("{dir}/memory.max"))),
                peak: number(read(format!("{dir}/memory.peak"))),
                hit_limit: field(&events, "max"),
                oom_kills: field(&events, "oom_kill"),
                stat: read(format!("{dir}/memory.stat")),
            }
        }
    }
}

/// Parses a Kubernetes memory quantity such as `64Mi`.
fn quantity_bytes(quantity: &str) -> u64 {
    let digits = quantity
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(quantity.len());
    let (number, unit) = quantity.split_at(digits);
    let scale = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        other => panic!("memory unit {other} is not in the test's table"),
    };
    number.parse::<u64>().unwrap() * scale
}

#[test]
fn the_image_runs_the_daemonsets_pod_as_written_on_an_nft_node() {
    const TEST: &str = "the_image_runs_the_daemonsets_pod_as_written_on_an_nft_node";
    if may_run(TEST) {
        pod_as_written(Backend::Nft);
    }
}

#[test]
fn the_image_runs_the_daemonsets_pod_as_written_on_a_legacy_node() {
    const TEST: &str = "the_image_runs_the_daemonsets_pod_as_written_on_a_legacy_node";
    if may_run(TEST) {
        pod_as_written(Backend::Legacy);
    }
}

#[test]
fn the_image_holds_manual_pages_and_shell_completions() {
    const TEST: &str = "the_image_holds_manual_pages_and_shell_completions";
    if !(require_root(TEST) && require_podman(TEST)) {
        return;
    }
    let podman = built_image();
    let script = "set -e; cd /usr/local/share
        for page in man/man1/kilo-egressd.1.gz man/man1/kilo-egress.1.gz man/man1/kilo-egress-set.1.gz; do
            gzip -t $page; zcat $page | grep -q '^.TH'; echo page $page; done
        source bash-completion/completions/kilo-egress; complete -p kilo-egress
        grep -q expected-generation zsh/site-functions/_kilo-egress
        grep -q expected-generation fish/vendor_completions.d/kilo-egress.fish";
    let image = image();
    let out = podman
        .run(&[
            "run",
            "--rm",
            "--network",
            "none",
            "--entrypoint",
            "/bin/bash",
            &image,
            "-c",
            script,
        ])
        .unwrap();
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains(" -F _kilo__egress kilo-egress"),
        "{out}"
    );
}

fn may_run(test: &str) -> bool {
    require_root(test)
        && require_podman(test)
        && require_kmock(test)
        && require_kubectl(test)
        && require_promtool(test)
}

/// The whole story on a node whose kubelet and kg use `backend`.
fn pod_as_written(backend: Backend) {
    let root_rules_before = root_namespace_rules();
    let podman = built_image();
    let say = |text: &str| say(&format!("[{}] {text}", backend.name()));

    // The lab node as a busy Kubernetes node: kubelet's marker chain in `backend` (what
    // `--iptables-backend=auto` looks for first) and 20,000 kube-proxy rules; kg starts after
    // the pod, as it may on a new node. The API emulator serves the annotated Node.
    let lab = Lab::new().unwrap();
    let busy = BusyNode::default();
    for family in Family::ALL {
        let ipt = lab.iptables(backend, family);
        ipt.run(&["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
            .unwrap();
        busy.install(&ipt).unwrap();
    }
    let api = ApiServer::start(&lab).unwrap();
    api.create_node(&[&format!("{ANNOTATION}={V4},{V6}")])
        .unwrap_or_else(|e| panic!("{e:#}"));

    // The DaemonSet's pod for podman.
    let docs = render_with_image(lab.dir(), &image());
    let daemonset = docs.iter().find(|d| d["kind"] == "DaemonSet").unwrap();
    let host_dir = lab.dir().join("pod");
    std::fs::create_dir_all(&host_dir).unwrap();
    let name = format!("kilo-egress-{}", lab.node);
    let host_ip = Family::V4.primary();
    let plan =
        pod_from_daemonset(daemonset, &name, &host_dir, NODE, host_ip, api.kubeconfig()).unwrap();
    say(&format!(
        "changed for podman:\n  {}",
        plan.changes.join("\n  ")
    ));
    prepare_empty_dirs(&plan).unwrap();
    let pod = &plan.pod;
    let pod_security = &pod["spec"]["securityContext"];
    let played = PlayedPod::play(&podman, &lab.node, pod, &host_dir.join("pod.json"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let daemon = played.container("kilo-egressd");
    let watch = played.container("watch");
    let context = || {
        let memory = podman
            .pid(&daemon)
            .map(memory_cgroup)
            .map(|m| {
                format!(
                    "peak {} of {} B, hit the limit {} times, {} OOM kills",
                    m.peak, m.limit, m.hit_limit, m.oom_kills
                )
            })
            .unwrap_or_else(|e| format!("{e:#}"));
        format!(
            "{}{}{}\n--- kilo-egressd's memory cgroup: {memory}",
            played.logs("kilo-egressd"),
            played.logs("watch"),
            api.context()
        )
    };
    let exec = |flags: &[&str], name: &str, command: &[&str]| -> Captured {
        podman
            .exec(flags, name, command)
            .unwrap_or_else(|e| panic!("{e:#}"))
    };

    // kilo-egressd serves before kg runs (its startup probe passes), on the host's backend.
    let ready = poll_until(POD_TIMEOUT, || {
        podman
            .exec(&[], &daemon, &["/usr/local/bin/kilo-egress", "health"])
            .is_ok_and(|out| out.success())
    });
    assert!(ready, "kilo-egressd never served in the pod{}", context());
    let out = exec(
        &[],
        &daemon,
        &["/usr/local/bin/kilo-egress", "get", "-o", "json"],
    );
    let view: Value = serde_json::from_str(&out.stdout).unwrap_or_else(|_| panic!("{out}"));
    assert_eq!(view["backend"], backend.name(), "{view}");
    say(&format!(
        "kilo-egressd serves before kg runs: backend {} ({})",
        view["backend"], view["backendReason"]
    ));

    // kg writes KILO-NAT (flushing it); the watcher applied the annotation through the socket.
    for family in Family::ALL {
        lab.kg(backend, family).sync().unwrap();
    }
    if let Err(problem) = wait_for_snat_in_kilo_nat(&lab, backend, POD_TIMEOUT) {
        panic!(
            "the annotation did not reach KILO-NAT: {problem}{}",
            context()
        );
    }
    for family in Family::ALL {
        lab.wait_for_source(family, family.preferred(), FOLLOW_TIMEOUT)
            .unwrap_or_else(|e| panic!("{e:#}{}", context()));
    }
    let applied = api.event_notes("EgressApplied").unwrap();
    assert!(
        applied.iter().any(|n| n.contains(&format!("{V4}, {V6}"))),
        "an EgressApplied Event: {applied:?}"
    );
    say("upstream sees the annotated addresses; KILO-NAT: SNAT directly before kg's MASQUERADE");

    // Each container: the lab's network namespace, the manifest's user, group and capabilities.
    let lab_netns = std::fs::metadata(format!("/run/netns/{}", lab.node))
        .unwrap()
        .ino();
    for (cname, podman_name) in [("kilo-egressd", &daemon), ("watch", &watch)] {
        let spec = container(pod, cname);
        let security = &spec["securityContext"];
        let pid = podman.pid(podman_name).unwrap();
        let netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .ino();
        assert_eq!(netns, lab_netns, "{cname} runs in the lab's node namespace");
        let status = proc_status(pid);
        let granted = granted_capabilities(security);
        for field in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(
                hex(&status[field]),
                granted,
                "{cname}: {field} {} is exactly what the manifest grants ({granted:#x})",
                status[field]
            );
        }
        assert_eq!(
            hex(&status["CapAmb"]),
            0,
            "{cname}: no ambient capabilities"
        );
        assert_eq!(
            hex(&status["CapInh"]),
            0,
            "{cname}: no inheritable capabilities"
        );
        let uid = security["runAsUser"].as_u64().unwrap().to_string();
        let gid = security["runAsGroup"].as_u64().unwrap().to_string();
        assert_eq!(
            status["Uid"].split_whitespace().collect::<Vec<_>>(),
            [uid.as_str(); 4],
            "{cname}: runAsUser"
        );
        assert_eq!(
            status["Gid"].split_whitespace().collect::<Vec<_>>(),
            [gid.as_str(); 4],
            "{cname}: runAsGroup"
        );
        if security["runAsNonRoot"] == true {
            assert_ne!(uid, "0", "{cname}: runAsNonRoot");
        }
        assert_eq!(security["allowPrivilegeEscalation"], false);
        assert_eq!(
            status["NoNewPrivs"], "1",
            "{cname}: no privilege escalation"
        );
        assert_eq!(pod_security["seccompProfile"]["type"], "RuntimeDefault");
        assert_eq!(status["Seccomp"], "2", "{cname}: a seccomp filter");

        // Read-only root file system: mounted ro, and a write fails with EROFS.
        assert_eq!(security["readOnlyRootFilesystem"], true, "{cname}");
        let mounts = std::fs::read_to_string(format!("/proc/{pid}/mounts")).unwrap();
        let root = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some("/"))
            .unwrap();
        let options = root.split_whitespace().nth(3).unwrap();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "{cname}: / is mounted read-only: {root}"
        );
        let out = exec(
            &[],
            podman_name,
            &["touch", "/usr/local/bin/written-by-test"],
        );
        assert!(
            !out.success() && out.stderr.contains("Read-only file system"),
            "{cname}: writing the root file system fails: {out}"
        );
        say(&format!(
            "{cname}: uid {uid} gid {gid}, CapEff {} (manifest {granted:#x}), NoNewPrivs, seccomp, root read-only",
            status["CapEff"]
        ));
    }

    // The socket: 0660, root and the watcher's group; the watcher (its user and group, no
    // capabilities) uses it, another user may not.
    let watch_security = &container(pod, "watch")["securityContext"];
    let watch_gid = watch_security["runAsGroup"].as_u64().unwrap();
    assert_eq!(pod_security["fsGroup"].as_u64(), Some(watch_gid));
    let out = exec(
        &[],
        &daemon,
        &[
            "stat",
            "-c",
            "%a %u %g %F",
            "/run/kilo-egress/kilo-egressd.sock",
        ],
    );
    assert_eq!(
        out.stdout.trim(),
        format!("660 0 {watch_gid} socket"),
        "the API socket: {out}"
    );
    let out = exec(
        &[],
        &watch,
        &["/usr/local/bin/kilo-egress", "get", "-o", "json"],
    );
    assert!(
        out.success(),
        "the watcher's user reaches the socket: {out}"
    );
    let rules: Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(rules["egress"], json!({"ipv4": V4, "ipv6": V6}), "{rules}");
    let out = exec(
        &["--user", "65533:65533"],
        &watch,
        &["/usr/local/bin/kilo-egress", "health"],
    );
    assert!(
        !out.success() && out.stderr.to_lowercase().contains("permission denied"),
        "a user outside the socket's group is refused: {out}"
    );
    say(
        "the watcher (uid/gid from the manifest, no capabilities) reaches the 0660 socket; uid 65533 does not",
    );

    // Both containers serve their metrics on the node's address, as promtool accepts them.
    let daemon_metrics = prom::scrape(&lab, &format!("{host_ip}:9464"))
        .unwrap_or_else(|e| panic!("{e:#}{}", context()));
    let watch_metrics = prom::scrape(&lab, &format!("{host_ip}:9465"))
        .unwrap_or_else(|e| panic!("{e:#}{}", context()));
    for text in [&daemon_metrics, &watch_metrics] {
        let check = prom::promtool_check(text).unwrap();
        assert!(check.success() && check.stdout.trim().is_empty(), "{check}");
    }
    assert_eq!(
        prom::sample(&daemon_metrics, r#"kilo_egress_in_sync{ip_family="IPv4"}"#),
        Some(1.0),
        "{daemon_metrics}"
    );
    assert!(
        prom::count(
            &watch_metrics,
            r#"kilo_egress_watch_set_egress_calls_total{result="success"}"#
        ) >= 1.0,
        "{watch_metrics}"
    );
    say("both containers serve /metrics on the node's address; promtool accepts them");

    // Every exec probe of the manifest passes when run; so do podman's healthchecks.
    for spec in pod["spec"]["containers"].as_array().unwrap() {
        let cname = spec["name"].as_str().unwrap();
        let podman_name = played.container(cname);
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let command = strings(&spec[probe]["exec"]["command"]);
            assert!(
                spec.get(probe).is_none() || !command.is_empty(),
                "{cname} {probe}: exec probes only"
            );
            if command.is_empty() {
                continue;
            }
            let command: Vec<&str> = command.iter().map(String::as_str).collect();
            let out = exec(&[], &podman_name, &command);
            assert!(out.success(), "{cname} {probe} passes: {out}{}", context());
            say(&format!("{cname} {probe}: {}", out.stdout.trim()));
        }
        assert!(
            !spec["livenessProbe"].is_null(),
            "{cname} has a liveness probe"
        );
        let out = podman.run(&["healthcheck", "run", &podman_name]).unwrap();
        assert!(
            out.success(),
            "podman healthcheck run {podman_name}: {out}{}",
            context()
        );
    }

    // The watcher's liveness check fails while the watcher is stuck (stopped), and passes
    // again once it runs: the manifest's probe command with a bound of 3 s instead of 60 s.
    let liveness: Vec<String> =
        strings(&container(pod, "watch")["livenessProbe"]["exec"]["command"])
            .into_iter()
            .map(|arg| {
                if arg.starts_with("--max-age=") {
                    "--max-age=3s".to_owned()
                } else {
                    arg
                }
            })
            .collect();
    assert!(
        liveness.contains(&"--max-age=3s".to_owned()),
        "{liveness:?}"
    );
    let liveness: Vec<&str> = liveness.iter().map(String::as_str).collect();
    let watcher_pid = podman.pid(&watch).unwrap().to_string();
    let signal = |sig: &str| {
        let out = cmd::capture(Command::new("kill").args([sig, &watcher_pid]), None).unwrap();
        assert!(out.success(), "{out}");
    };
    signal("-STOP");
    let mut last = None;
    let stuck = poll_until(Duration::from_secs(30), || {
        let out = exec(&[], &watch, &liveness);
        let stuck = !out.success() && out.stderr.contains("stuck");
        last = Some(out);
        stuck
    });
    signal("-CONT");
    assert!(
        stuck,
        "the liveness check fails for a stopped watcher: {last:?}"
    );
    let alive = poll_until(Duration::from_secs(30), || {
        exec(&[], &watch, &liveness).success()
    });
    assert!(alive, "alive again once the watcher runs{}", context());
    say("watch-alive: fails while the watcher is stopped, passes again after SIGCONT");

    // The memory limits hold on a node with 20,000 kube-proxy rules: the cgroup has the
    // manifest's limit, and the peak so far (start, kg's flush and the repair, every probe)
    // stayed below it.
    for (cname, podman_name) in [("kilo-egressd", &daemon), ("watch", &watch)] {
        let spec = container(pod, cname);
        let limit = quantity_bytes(spec["resources"]["limits"]["memory"].as_str().unwrap());
        let memory = memory_cgroup(podman.pid(podman_name).unwrap());
        assert_eq!(memory.limit, limit, "{cname}: the memory limit is applied");
        let restarts = podman.inspect(podman_name, "{{.RestartCount}}").unwrap();
        say(&format!(
            "{cname}: memory peak {:.1} MiB of {} MiB (hit the limit {} times, {} OOM kills, {restarts} restarts)",
            memory.peak as f64 / f64::from(1 << 20),
            limit >> 20,
            memory.hit_limit,
            memory.oom_kills,
        ));
        assert!(
            memory.oom_kills == 0 && memory.hit_limit == 0,
            "{cname}: its memory stays below the manifest's limit of {} MiB: peak {} B, hit the limit {} times, {} OOM kills\n--- memory.stat ---\n{}",
            limit >> 20,
            memory.peak,
            memory.hit_limit,
            memory.oom_kills,
            memory.stat
        );
        // iptables reads the whole nat table (legacy: the kernel's blob, ~3 MiB per 1,000
        // rules; nft: the table cache of a restore, ~1.4 MiB), so kilo-egressd's peak grows
        // with the node: its limit must leave room for a table four times this one's 20,000
        // rules per family. The watcher never runs iptables: its peak does not grow with the
        // node, and the check above (no OOM kill, the limit never hit) is what it must pass.
        assert!(
            cname != "kilo-egressd" || memory.peak.saturating_mul(HEADROOM) <= limit,
            "{cname}: peak {:.1} MiB with {} nat rules per family leaves less than {HEADROOM}x room under the limit of {} MiB{}",
            memory.peak as f64 / f64::from(1 << 20),
            busy.rule_count(),
            limit >> 20,
            context()
        );
        assert_eq!(
            restarts,
            "0",
            "{cname} never restarted (OOM, crash){}",
            context()
        );
    }

    // SIGTERM: both containers stop cleanly (they are PID 1), well within the grace period, and
    // the rules stay.
    let grace = pod["spec"]["terminationGracePeriodSeconds"]
        .as_u64()
        .unwrap();
    let stopping = Instant::now();
    played.stop(Duration::from_secs(grace)).unwrap();
    let stopped_in = stopping.elapsed();
    for cname in ["kilo-egressd", "watch"] {
        let (status, code) = played.state(cname).unwrap();
        assert_eq!(
            (status.as_str(), code),
            ("exited", 0),
            "{cname} stops cleanly on SIGTERM{}",
            context()
        );
    }
    assert!(
        stopped_in < Duration::from_secs(grace),
        "stopped in {stopped_in:?}, not killed after {grace} s"
    );
    wait_for_snat_in_kilo_nat(&lab, backend, Duration::ZERO)
        .expect("stopping leaves the rules in place");
    say(&format!(
        "SIGTERM: both containers exited 0 in {stopped_in:.1?}; the rules stay"
    ));

    // `kilo-egressd cleanup` from the image, as docs/operations.md says: the DaemonSet's
    // kilo-egressd container (same securityContext and mounts) with
    // `command: [kilo-egressd, cleanup, --mode, kilo]`, once.
    let mut cleanup = pod.clone();
    cleanup["metadata"]["name"] = json!(format!("{name}-cleanup"));
    let mut cleaner = container(pod, "kilo-egressd").clone();
    let obj = cleaner.as_object_mut().unwrap();
    for key in ["args", "startupProbe", "readinessProbe", "livenessProbe"] {
        obj.remove(key);
    }
    obj.insert(
        "command".into(),
        json!(["kilo-egressd", "cleanup", "--mode", "kilo"]),
    );
    let mounted: Vec<Value> = cleaner["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["mountPath"] != "/run/kilo-egress")
        .cloned()
        .collect();
    cleaner["volumeMounts"] = json!(mounted);
    let used: Vec<Value> = pod["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| mounted.iter().any(|m| m["name"] == v["name"]))
        .cloned()
        .collect();
    cleanup["spec"]["containers"] = json!([cleaner]);
    cleanup["spec"]["volumes"] = json!(used);
    cleanup["spec"]["restartPolicy"] = json!("Never");
    let cleaned = PlayedPod::play(&podman, &lab.node, &cleanup, &host_dir.join("cleanup.json"))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let code = cleaned
        .wait_exited("kilo-egressd", Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(code, 0, "cleanup succeeds{}", cleaned.logs("kilo-egressd"));
    for family in Family::ALL {
        let kg = lab.kg(backend, family);
        let chain = lab.iptables(backend, family).rules("KILO-NAT").unwrap();
        assert_eq!(
            chain,
            kg.chain_rules(),
            "{}: only kg's rules are left",
            family.name()
        );
        lab.wait_for_source(family, family.primary(), FOLLOW_TIMEOUT)
            .unwrap();
    }
    let state = host_dir.join("volume-state/state.json");
    assert!(!state.exists(), "cleanup removes {}", state.display());
    say("kilo-egressd cleanup from the image: our rules gone, kg's untouched, MASQUERADE again");

    drop(cleaned);
    drop(played);
    let leftover = podman
        .run_ok(&[
            "ps",
            "-a",
            "--filter",
            &format!("name={name}"),
            "--format",
            "{{.Names}}",
        ])
        .unwrap();
    assert_eq!(
        leftover.stdout.trim(),
        "",
        "no container of the test is left"
    );
    assert_eq!(
        root_namespace_rules(),
        root_rules_before,
        "the root namespace's rules are byte-identical"
    );
    say("the root namespace's rules (iptables/ip6tables, nft and legacy) are unchanged");
}

/// `kilo-egress watch-alive --heartbeat-file PATH --max-age AGE`, captured.
fn watch_alive(path: &Path, max_age: &str) -> Captured {
    let mut command = Command::new(bin_path("kilo-egress"));
    command
        .arg("watch-alive")
        .arg("--heartbeat-file")
        .arg(path)
        .args(["--max-age", max_age]);
    cmd::capture(&mut command, None).unwrap()
}

#[test]
fn the_heartbeat_stops_while_kilo_egressd_is_down_and_resumes_after() {
    const TEST: &str = "the_heartbeat_stops_while_kilo_egressd_is_down_and_resumes_after";
    if !(require_root(TEST) && require_kmock(TEST) && require_kubectl(TEST)) {
        return;
    }
    let lab = Lab::new().unwrap();
    let heartbeat = lab.dir().join("heartbeat");
    let out = watch_alive(&heartbeat, "3s");
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("no heartbeat at"), "{out}");

    let mut daemon = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    let api = ApiServer::start(&lab).unwrap();
    api.create_node(&[&format!("{ANNOTATION}={V4}")])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut watcher = Watcher::start(
        &api,
        &daemon,
        &["--heartbeat-file", heartbeat.to_str().unwrap()],
    )
    .unwrap();
    // The watcher resyncs every second: a bound of 3 s holds while kilo-egressd answers.
    let alive = poll_until(FOLLOW_TIMEOUT, || watch_alive(&heartbeat, "3s").success());
    assert!(
        alive,
        "alive once the watcher applied the annotation{}",
        watcher.context()
    );
    let out = watch_alive(&heartbeat, "3s");
    assert!(out.stdout.starts_with("alive: "), "{out}");

    daemon.stop().unwrap();
    let mut last = None;
    let stuck = poll_until(Duration::from_secs(15), || {
        let out = watch_alive(&heartbeat, "3s");
        let stuck = out.code == Some(1) && out.stderr.contains("stuck: ");
        last = Some(out);
        stuck
    });
    assert!(
        stuck,
        "stuck while kilo-egressd is down: {last:?}{}",
        watcher.context()
    );
    assert!(watcher.is_running(), "the watcher itself keeps retrying");

    daemon.start_again().unwrap();
    let alive = poll_until(RECOVER_TIMEOUT, || watch_alive(&heartbeat, "3s").success());
    assert!(
        alive,
        "alive again once kilo-egressd answers{}",
        watcher.context()
    );
    let status = watcher.stop().unwrap();
    assert!(status.success(), "{status}");

    // A watcher whose Node is not registered stays alive while kilo-egressd answers: a restart
    // would not register the Node (its log says what is wrong).
    let waiting = lab.dir().join("heartbeat-waiting");
    let server = daemon.server_url();
    let args = [
        "--server",
        server.as_str(),
        "watch",
        "--node",
        "not-registered",
        "--resync-interval",
        "1s",
        "--heartbeat-file",
        waiting.to_str().unwrap(),
    ];
    let mut orphan = cmd::netns_command(&lab.node, bin_path("kilo-egress"), &args)
        .env("KUBECONFIG", api.kubeconfig())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let alive = poll_until(FOLLOW_TIMEOUT, || watch_alive(&waiting, "3s").success());
    let _ = cmd::stop_child(&mut orphan, "kilo-egress watch --node not-registered");
    assert!(alive, "a watcher waiting for its Node is alive");
}

/// Runs `deploy/build-image.sh args` with only the fake engines in `engines` ("docker" with a
/// daemon that answers or not, "podman") on PATH; returns its output and the engine's recorded
/// command line.
fn build_image_sh(engines: &[(&str, bool)], env: &[(&str, &str)]) -> (Captured, String) {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["sed", "head", "dirname"] {
        let path = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let path = String::from_utf8(path.stdout).unwrap();
        std::os::unix::fs::symlink(path.trim(), bin.join(tool)).unwrap();
    }
    let record = dir.path().join("engine.log");
    for (engine, answers) in engines {
        let script = format!(
            "#!/bin/sh\ncase $1 in\n  info) exit {} ;;\n  --version) echo \"{engine} version 0.0-fake\" ;;\n  *) echo \"{engine} $*\" >> {} ;;\nesac\n",
            if *answers { 0 } else { 1 },
            record.display()
        );
        let path = bin.join(engine);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let mut command = Command::new("/bin/bash");
    command
        .arg(source_root().join("deploy/build-image.sh"))
        .arg("--build-arg")
        .arg("X=1")
        .env_clear()
        .env("PATH", &bin);
    for (key, value) in env {
        command.env(key, value);
    }
    let out = cmd::capture(&mut command, None).unwrap();
    let recorded = std::fs::read_to_string(&record).unwrap_or_default();
    (out, recorded.trim().to_owned())
}

#[test]
fn build_image_sh_uses_whichever_engine_works() {
    let version = env!("CARGO_PKG_VERSION");
    let expected = |engine: &str, extra: &str, tag: &str| {
        format!("{engine} build{extra} -f deploy/Dockerfile -t {tag} --build-arg X=1 .")
    };
    // docker whose daemon answers wins; podman gets the Dockerfile's ignore file.
    let (out, recorded) = build_image_sh(&[("docker", true), ("podman", true)], &[]);
    assert!(out.success(), "{out}");
    assert_eq!(
        recorded,
        expected("docker", "", &format!("kilo-egress:{version}"))
    );
    assert!(
        out.stderr
            .contains("kustomize edit set image kilo-egress=kilo-egress:"),
        "{out}"
    );
    // A docker client without a daemon (as on these machines): podman.
    let (out, recorded) = build_image_sh(&[("docker", false), ("podman", true)], &[]);
    assert!(out.success(), "{out}");
    assert_eq!(
        recorded,
        expected(
            "podman",
            " --ignorefile deploy/Dockerfile.dockerignore",
            &format!("kilo-egress:{version}")
        )
    );
    // IMAGE and CONTAINER_ENGINE choose.
    let (out, recorded) = build_image_sh(
        &[("docker", true), ("podman", true)],
        &[
            ("IMAGE", "registry.example:5000/kilo-egress:1.2.3"),
            ("CONTAINER_ENGINE", "podman"),
        ],
    );
    assert!(out.success(), "{out}");
    assert!(recorded.starts_with("podman build"), "{recorded}");
    assert!(
        recorded.contains("-t registry.example:5000/kilo-egress:1.2.3 "),
        "{recorded}"
    );
    assert!(
        out.stderr
            .contains("kilo-egress=registry.example:5000/kilo-egress:1.2.3"),
        "{out}"
    );
    // Nothing that works: a clear error, nothing run.
    let (out, recorded) = build_image_sh(&[("docker", false)], &[]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("daemon does not answer"), "{out}");
    assert_eq!(recorded, "");
    let (out, _) = build_image_sh(&[], &[]);
    assert!(
        out.stderr
            .contains("neither docker nor podman is installed"),
        "{out}"
    );
    let (out, _) = build_image_sh(&[("podman", true)], &[("CONTAINER_ENGINE", "buildah")]);
    assert!(out.stderr.contains("expected docker or podman"), "{out}");
}
