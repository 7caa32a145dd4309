//! The deploy files: every kustomize overlay renders with `kubectl kustomize`, validates against
//! the Kubernetes schemas (`kubernetes-validate --strict`), grants exactly the API access the
//! watcher uses, and runs the two containers with the privileges the issue allows. The monitoring
//! overlay adds a PodMonitor that scrapes both containers' metrics ports and alert rules that
//! `promtool` accepts and that fire as tests/monitoring/alerts_test.yaml expects.

use anyhow::Context;
use kilo_egress::watch::API_ACCESS;
use kilo_egress_tests::cmd::{self, Captured};
use kilo_egress_tests::kube::{require_kubectl, require_tool};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The Kubernetes version the manifests are validated against (the oldest the image targets).
const KUBERNETES_VERSION: &str = "1.33.0";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// Every overlay a user may apply, relative to the repository.
const OVERLAYS: [&str; 2] = ["deploy/kubernetes", "deploy/kubernetes/overlays/own"];

fn run(program: &str, args: &[&str]) -> Captured {
    let mut command = Command::new(program);
    command.args(args);
    cmd::capture(&mut command, None).unwrap()
}

fn render(overlay: &str) -> String {
    let dir = repo().join(overlay);
    let out = run("kubectl", &["kustomize", dir.to_str().unwrap()]);
    assert!(out.success(), "{overlay} does not render: {out}");
    out.stdout
}

/// The rendered documents as JSON (PyYAML, which kubernetes-validate brings along).
fn documents(yaml: &str) -> Vec<Value> {
    let mut command = Command::new("python3");
    command.args([
        "-c",
        "import sys, json, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
    ]);
    let out = cmd::capture(&mut command, Some(yaml)).unwrap();
    assert!(out.success(), "{out}");
    serde_json::from_str(&out.stdout)
        .context("YAML to JSON")
        .unwrap()
}

fn validate(yaml: &str) -> Captured {
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), yaml).unwrap();
    run(
        "kubernetes-validate",
        &[
            "--strict",
            "-k",
            KUBERNETES_VERSION,
            file.path().to_str().unwrap(),
        ],
    )
}

fn may_run(test: &str) -> bool {
    require_kubectl(test) && require_tool(test, "kubernetes-validate")
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} rendered"))
}

fn container<'a>(daemonset: &'a Value, name: &str) -> &'a Value {
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_overlay_renders_and_validates_against_the_kubernetes_schemas() {
    if !may_run("every_overlay_renders_and_validates_against_the_kubernetes_schemas") {
        return;
    }
    for overlay in OVERLAYS {
        let yaml = render(overlay);
        let kinds: Vec<String> = documents(&yaml)
            .iter()
            .map(|d| d["kind"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "DaemonSet"
            ],
            "{overlay}"
        );
        let out = validate(&yaml);
        assert!(out.success(), "{overlay} is not valid: {out}");
    }
    // The validator does reject what the API server would: a field of the wrong type.
    let broken = render(OVERLAYS[0]).replace("hostNetwork: true", "hostNetwork: \"yes\"");
    let out = validate(&broken);
    assert!(!out.success(), "a wrongly typed field must fail: {out}");
}

#[test]
fn cluster_role_grants_exactly_what_the_watcher_uses() {
    if !may_run("cluster_role_grants_exactly_what_the_watcher_uses") {
        return;
    }
    let wanted: BTreeSet<(String, String, String)> = API_ACCESS
        .iter()
        .flat_map(|(group, resource, verbs)| {
            verbs
                .iter()
                .map(move |verb| (group.to_string(), resource.to_string(), verb.to_string()))
        })
        .collect();
    for overlay in OVERLAYS {
        let docs = documents(&render(overlay));
        let role = find(&docs, "ClusterRole");
        let mut granted = BTreeSet::new();
        for rule in role["rules"].as_array().unwrap() {
            assert!(
                rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
                "{rule}"
            );
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        granted.insert((group.to_owned(), resource.to_owned(), verb.to_owned()));
                    }
                }
            }
        }
        assert_eq!(granted, wanted, "{overlay}: ClusterRole vs API_ACCESS");
        let binding = find(&docs, "ClusterRoleBinding");
        let daemonset = find(&docs, "DaemonSet");
        assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
        assert_eq!(
            binding["subjects"][0]["name"],
            daemonset["spec"]["template"]["spec"]["serviceAccountName"]
        );
        assert_eq!(
            binding["subjects"][0]["namespace"],
            daemonset["metadata"]["namespace"]
        );
    }
}

#[test]
fn daemonset_runs_everywhere_with_only_the_privileges_it_needs() {
    if !may_run("daemonset_runs_everywhere_with_only_the_privileges_it_needs") {
        return;
    }
    for (overlay, mode) in OVERLAYS.iter().zip(["--mode=kilo", "--mode=own"]) {
        let docs = documents(&render(overlay));
        let ds = find(&docs, "DaemonSet");
        let pod = &ds["spec"]["template"]["spec"];
        assert_eq!(ds["metadata"]["namespace"], "kube-system", "{overlay}");
        assert_eq!(pod["hostNetwork"], true);
        assert_eq!(pod["priorityClassName"], "system-node-critical");
        assert!(
            pod["tolerations"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t["operator"] == "Exists" && t.get("key").is_none()),
            "tolerates every taint: {}",
            pod["tolerations"]
        );

        let daemon = container(ds, "kilo-egressd");
        let sc = &daemon["securityContext"];
        assert_eq!(sc["privileged"], false, "{overlay}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert_eq!(
            strings(&sc["capabilities"]["add"]),
            ["NET_ADMIN", "NET_RAW"]
        );
        assert!(
            strings(&daemon["args"]).contains(&mode),
            "{overlay}: {}",
            daemon["args"]
        );
        assert!(
            strings(&daemon["args"]).contains(&"--iptables-backend=auto"),
            "{overlay}: the host's backend is detected: {}",
            daemon["args"]
        );
        let mounts: Vec<&str> = daemon["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|m| m["mountPath"].as_str())
            .collect();
        for path in [
            "/run/xtables.lock",
            "/var/lib/kilo-egress",
            "/run/kilo-egress",
        ] {
            assert!(
                mounts.contains(&path),
                "{overlay}: {path} mounted: {mounts:?}"
            );
        }
        for probe in ["startupProbe", "readinessProbe"] {
            assert_eq!(
                strings(&daemon[probe]["exec"]["command"]),
                ["/usr/local/bin/kilo-egress", "health"],
                "{probe}"
            );
        }
        // Liveness does not restart kilo-egressd for a failing write (a restart repairs nothing),
        // nor while its reads wait for the xtables lock (10 s each): the probe outlasts the call.
        let liveness = &daemon["livenessProbe"];
        assert_eq!(
            strings(&liveness["exec"]["command"]),
            [
                "/usr/local/bin/kilo-egress",
                "--timeout=30s",
                "health",
                "--alive"
            ]
        );
        assert!(
            liveness["timeoutSeconds"].as_u64().unwrap() > 30,
            "{liveness}"
        );

        let watch = container(ds, "watch");
        let sc = &watch["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_ne!(sc["runAsUser"], 0);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(strings(&watch["args"]), ["watch"]);
        assert_eq!(
            watch["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
            "spec.nodeName"
        );
        // Metrics on the node's own address (status.hostIP), one named port per container.
        for (c, port, name, var) in [
            (daemon, 9464, "metrics", "KILO_EGRESS_METRICS_LISTEN"),
            (
                watch,
                9465,
                "watch-metrics",
                "KILO_EGRESS_WATCH_METRICS_LISTEN",
            ),
        ] {
            let env = c["env"].as_array().unwrap();
            let host_ip = env.iter().position(|e| e["name"] == "HOST_IP").unwrap();
            assert_eq!(
                env[host_ip]["valueFrom"]["fieldRef"]["fieldPath"],
                "status.hostIP"
            );
            let listen = env.iter().position(|e| e["name"] == var).unwrap();
            assert!(
                listen > host_ip,
                "{var} must come after HOST_IP to expand it"
            );
            assert_eq!(env[listen]["value"], format!("$(HOST_IP):{port}"));
            assert_eq!(c["ports"][0]["name"], name);
            assert_eq!(c["ports"][0]["containerPort"], port);
        }
        let volumes = pod["volumes"].as_array().unwrap();
        let socket = volumes.iter().find(|v| v["name"] == "socket").unwrap();
        assert!(
            socket.get("emptyDir").is_some(),
            "the socket is on an emptyDir"
        );
    }
}

/// The workspace's minimum Rust version, from the root Cargo.toml.
fn workspace_rust_version() -> String {
    let manifest = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("rust-version in Cargo.toml")
        .trim_matches('"')
        .to_owned()
}

#[test]
fn dockerfile_copies_what_exists_and_builds_with_the_workspace_rust_version() {
    // No container engine here: check what can drift without one.
    let dockerfile = std::fs::read_to_string(repo().join("deploy/Dockerfile")).unwrap();
    let rust = workspace_rust_version();
    assert!(
        dockerfile.contains(&format!("ARG RUST_VERSION={rust}\n")),
        "the build stage uses the workspace's rust-version {rust}"
    );
    let members = ["proto", "server", "client", "tests"];
    for line in dockerfile.lines().filter(|l| l.starts_with("COPY ")) {
        if line.contains("--from=") {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        for source in &words[1..words.len() - 1] {
            assert!(
                repo().join(source).exists(),
                "COPY source {source} does not exist"
            );
        }
    }
    for member in members {
        assert!(
            dockerfile.contains(&format!("COPY {member} {member}")),
            "workspace member {member} is copied"
        );
    }
    assert!(dockerfile.contains("-p kilo-egressd -p kilo-egress"));
    assert!(dockerfile.contains("apt-get install -y --no-install-recommends iptables"));
    assert!(
        dockerfile.contains("iptables-nft --version && iptables-legacy --version"),
        "the image proves both backends are there"
    );
}

#[test]
fn systemd_unit_verifies_and_is_hardened() {
    if !require_tool("systemd_unit_verifies_and_is_hardened", "systemd-analyze") {
        return;
    }
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/kilo-egressd.service")).unwrap();
    for hardening in [
        "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW\n",
        "ProtectSystem=strict\n",
        "NoNewPrivileges=yes\n",
        "RuntimeDirectory=kilo-egress\n",
        "StateDirectory=kilo-egress\n",
        "ReadWritePaths=/run/xtables.lock\n",
    ] {
        assert!(unit.contains(hardening), "missing {hardening:?}");
    }
    // `systemd-analyze verify` needs the binaries and the environment file where the unit
    // names them: point it at the built binary and the example configuration.
    let dir = tempfile::tempdir().unwrap();
    let verify = |text: &str| {
        let path = dir.path().join("kilo-egressd.service");
        std::fs::write(&path, text).unwrap();
        run("systemd-analyze", &["verify", path.to_str().unwrap()])
    };
    let bin = kilo_egress_tests::bin_path("kilo-egressd");
    let cli = kilo_egress_tests::bin_path("kilo-egress");
    let env = repo().join("deploy/systemd/kilo-egress.env");
    let local = unit
        .replace("/usr/local/bin/kilo-egressd", bin.to_str().unwrap())
        .replace(
            "/usr/local/bin/kilo-egress ",
            &format!("{} ", cli.display()),
        )
        .replace("/etc/default/kilo-egress", env.to_str().unwrap());
    let out = verify(&local);
    assert!(
        out.success() && out.stderr.trim().is_empty(),
        "the unit verifies cleanly: {out}"
    );
    let out = verify(&local.replace("ProtectSystem=strict", "ProtectSystm=strict"));
    assert!(
        out.stderr.contains("ProtectSystm"),
        "verify reports a misspelt key: {out}"
    );
}

#[test]
fn monitoring_overlay_scrapes_both_containers_and_its_alerts_fire_as_documented() {
    let test = "monitoring_overlay_scrapes_both_containers_and_its_alerts_fire_as_documented";
    if !(may_run(test) && require_tool(test, "promtool")) {
        return;
    }
    let docs = documents(&render("deploy/kubernetes/overlays/monitoring"));
    // The core objects validate against the Kubernetes schemas. The prometheus-operator kinds are
    // not in those schemas and their CRDs cannot be fetched here (no network but package
    // registries): they are checked below against what they must match instead.
    let (operator, core): (Vec<&Value>, Vec<&Value>) = docs.iter().partition(|d| {
        d["apiVersion"]
            .as_str()
            .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
    });
    let core_yaml: Vec<String> = core.iter().map(|d| d.to_string()).collect();
    let out = validate(&core_yaml.join("\n---\n"));
    assert!(out.success(), "the core objects are not valid: {out}");
    let kinds: Vec<&str> = operator.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["PodMonitor", "PrometheusRule"]);
    eprintln!(
        "note: PodMonitor and PrometheusRule not schema-validated (their CRDs are not available offline); checked structurally and with promtool"
    );

    // The PodMonitor selects the DaemonSet's pods and names both containers' metrics ports.
    let ds = find(&docs, "DaemonSet");
    let monitor = find(&docs, "PodMonitor");
    assert_eq!(
        monitor["metadata"]["namespace"],
        ds["metadata"]["namespace"]
    );
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    assert!(!selector.is_empty());
    for (key, value) in selector {
        assert_eq!(
            &pod_labels[key], value,
            "the PodMonitor selects {key}={value}"
        );
    }
    let ports: Vec<&str> = ["kilo-egressd", "watch"]
        .iter()
        .flat_map(|c| container(ds, c)["ports"].as_array().unwrap())
        .filter_map(|p| p["name"].as_str())
        .collect();
    let scraped: Vec<&str> = monitor["spec"]["podMetricsEndpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["port"].as_str())
        .collect();
    assert_eq!(scraped, ports);

    // The alert rules: valid, firing as the unit tests expect, on metrics the binaries export.
    let rules = find(&docs, "PrometheusRule");
    let dir = tempfile::tempdir().unwrap();
    let rule_file = dir.path().join("alerts.rules.yaml");
    let groups = serde_json::json!({"groups": rules["spec"]["groups"]});
    std::fs::write(&rule_file, groups.to_string()).unwrap();
    let out = run("promtool", &["check", "rules", rule_file.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    let unit_tests = dir.path().join("alerts_test.yaml");
    std::fs::copy(
        repo().join("tests/monitoring/alerts_test.yaml"),
        &unit_tests,
    )
    .unwrap();
    let out = run("promtool", &["test", "rules", unit_tests.to_str().unwrap()]);
    assert!(out.success(), "{out}");
    let exported = [
        std::fs::read_to_string(repo().join("server/src/metrics/mod.rs")).unwrap(),
        std::fs::read_to_string(repo().join("client/src/watch/metrics.rs")).unwrap(),
    ]
    .concat();
    let mut alerts = BTreeSet::new();
    for rule in rules["spec"]["groups"][0]["rules"].as_array().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        let metric = expr.split_whitespace().next().unwrap();
        assert!(
            exported.contains(&format!("\"{metric}\"")),
            "{}: {metric} is not a metric kilo-egress exports",
            rule["alert"]
        );
        alerts.insert(rule["alert"].as_str().unwrap().to_owned());
    }
    let tested = std::fs::read_to_string(&unit_tests).unwrap();
    for alert in &alerts {
        assert!(
            tested.contains(&format!("alertname: {alert}")),
            "{alert} has no promtool unit test"
        );
    }
}
