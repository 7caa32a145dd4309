//! The API from another machine: kilo-egressd listens with mutual TLS on the node's addresses
//! (192.0.2.10:7443 and [2001:db8:1::10]:7443) and is driven from the upstream namespace with
//! grpcurl, the `kilo-egress` CLI and the Python automation example. A writer identity changes
//! the egress address, a reader identity only reads, strangers do not get past the handshake,
//! certificates rotate without a restart, and every SetEgress leaves an audit line.

use kilo_egress_tests::remote::{NODE_V4, NODE_V6, READER, RemoteTls, WRITER, audit_lines};
use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, RulesView, cmd, poll_until, require_grpcurl,
    require_python_grpc, require_root, source_root,
};
use serde_json::Value;
use std::time::Duration;

const SET: &str = "kilo.egress.v1.EgressService/SetEgress";
const GET: &str = "kilo.egress.v1.EgressService/GetRules";

fn start<'lab>(lab: &'lab Lab, tls: &RemoteTls, extra: &[&str]) -> Daemon<'lab> {
    let mut config = tls.daemon_config(DaemonConfig::own(Backend::Nft));
    for arg in extra {
        config = config.arg(*arg);
    }
    lab.start_daemon(config).unwrap()
}

fn json(out: &cmd::Captured) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {out}"))
}

#[test]
fn remote_writer_sets_egress_reader_is_denied_and_every_call_is_audited() {
    let test = "remote_writer_sets_egress_reader_is_denied_and_every_call_is_audited";
    if !(require_root(test) && require_grpcurl(test)) {
        return;
    }
    let lab = Lab::new().unwrap();
    let tls = RemoteTls::new(&lab);
    let d = start(&lab, &tls, &[]);
    let ipt = lab.iptables(Backend::Nft, Family::V4);

    // The writer, with grpcurl from another machine, as in the issue.
    let out = tls.grpcurl(
        &lab,
        Some(&tls.writer),
        &["-d", r#"{"egress_ips":["198.51.100.20"]}"#],
        &[SET],
    );
    assert!(out.success(), "{out}{}", d.context());
    let set = RulesView { raw: json(&out) };
    assert_eq!(set.egress(Family::V4), "198.51.100.20", "{out}");
    d.assert_upstream_sees(
        Family::V4,
        "198.51.100.20",
        "after the writer's grpcurl SetEgress",
    );

    // The writer with the CLI and an https:// address.
    let out = tls.cli(
        &lab,
        &tls.pki.ca(),
        &tls.writer,
        &["set", "2001:db8:2::20", "198.51.100.20"],
    );
    assert!(out.success(), "{out}{}", d.context());
    d.assert_upstream_sees(Family::V6, "2001:db8:2::20", "after the writer's CLI set");

    // The reader: GetRules works, SetEgress is PERMISSION_DENIED and changes nothing.
    let before = tls.grpcurl(&lab, Some(&tls.reader), &["-d", "{}"], &[GET]);
    assert!(before.success(), "{before}");
    let before = RulesView { raw: json(&before) };
    let dump_before = ipt.nat_dump().unwrap();
    let out = tls.grpcurl(
        &lab,
        Some(&tls.reader),
        &["-d", r#"{"egress_ips":[]}"#],
        &[SET],
    );
    assert!(
        !out.success(),
        "the reader must not clear the egress: {out}"
    );
    assert!(out.stderr.contains("PermissionDenied"), "{out}");
    assert!(out.stderr.contains(READER), "the identity is named: {out}");
    let out = tls.cli(&lab, &tls.pki.ca(), &tls.reader, &["clear"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("may read (GetRules) but not change")
            && out.stderr.contains("(PERMISSION_DENIED)")
            && out.stderr.contains(READER),
        "{out}"
    );
    let after = tls.grpcurl(&lab, Some(&tls.reader), &["-d", "{}"], &[GET]);
    let after = RulesView { raw: json(&after) };
    assert_eq!(after.generation(), before.generation(), "{:#}", after.raw);
    assert_eq!(after.egress(Family::V4), "198.51.100.20");
    assert_eq!(after.egress(Family::V6), "2001:db8:2::20");
    assert_eq!(
        ipt.nat_dump().unwrap(),
        dump_before,
        "the reader changed the rules"
    );
    d.assert_upstream_sees(
        Family::V4,
        "198.51.100.20",
        "after the reader's denied calls",
    );

    // An invalid request from the writer.
    let out = tls.grpcurl(
        &lab,
        Some(&tls.writer),
        &["-d", r#"{"egress_ips":["10.0.0.0/8"]}"#],
        &[SET],
    );
    assert!(out.stderr.contains("InvalidArgument"), "{out}");

    // No client certificate, or plaintext: no answer at all.
    let out = tls.grpcurl(&lab, None, &["-d", "{}"], &[GET]);
    assert!(
        !out.success() && !out.stdout.contains("generation"),
        "{out}"
    );
    let out = cmd::run_in(
        &lab.upstream,
        "grpcurl",
        &["-plaintext", "-d", "{}", NODE_V4, GET],
    )
    .unwrap();
    assert!(
        !out.success() && !out.stdout.contains("generation"),
        "{out}"
    );

    // A certificate from another CA, and an expired one from the right CA: refused at the
    // handshake, before any call (so no audit line), and logged with the caller's address.
    let other = kilo_egress_tests::pki::Pki::new(&tls.dir().join("other"), "other");
    let stranger = other.client("stranger", WRITER);
    let expired = tls.pki.expired_client("expired", WRITER);
    for (who, cert) in [("another CA", &stranger), ("expired", &expired)] {
        let out = tls.cli(&lab, &tls.pki.ca(), cert, &["set", "198.51.100.21"]);
        assert_eq!(out.code, Some(1), "{who}: {out}");
        assert!(
            out.stderr.contains("transport error")
                && out
                    .stderr
                    .contains("must come from the CA the server trusts"),
            "{who}: the CLI says what is wrong: {out}"
        );
    }
    // Each refusal is logged with the caller's address and rustls' reason.
    for reason in [
        "peer sent no certificates",
        "UnknownIssuer",
        "certificate expired",
    ] {
        let logged = poll_until(Duration::from_secs(5), || {
            d.log().lines().any(|l| {
                l.contains("TLS handshake rejected")
                    && l.contains("192.0.2.1:")
                    && l.contains(reason)
            })
        });
        assert!(
            logged,
            "no rejected handshake logged for {reason:?}{}",
            d.context()
        );
    }
    d.assert_upstream_sees(Family::V4, "198.51.100.20", "after the refused clients");

    // The audit trail: accepted, accepted, denied, denied, invalid, each one JSON line.
    let mut audits = Vec::new();
    let complete = poll_until(Duration::from_secs(5), || {
        audits = audit_lines(&d.log());
        audits.len() >= 5
    });
    assert!(
        complete,
        "five audit lines expected: {audits:#?}{}",
        d.context()
    );
    let outcomes: Vec<&str> = audits
        .iter()
        .map(|a| a["outcome"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        outcomes,
        ["accepted", "accepted", "denied", "denied", "invalid"],
        "{audits:#?}"
    );
    for audit in &audits {
        assert_eq!(audit["audit"], "SetEgress", "{audit:#}");
        assert!(
            audit["remote"]
                .as_str()
                .is_some_and(|r| r.starts_with("192.0.2.1:")),
            "the caller's address: {audit:#}"
        );
        assert!(
            audit["generation"].is_u64(),
            "the generation afterwards: {audit:#}"
        );
        assert!(
            audit["request"]
                .as_str()
                .is_some_and(|r| r.starts_with('{')),
            "{audit:#}"
        );
    }
    let accepted = &audits[0];
    assert_eq!(accepted["identity"], WRITER, "{accepted:#}");
    assert_eq!(accepted["egress_ipv4"], "198.51.100.20", "{accepted:#}");
    let g1 = accepted["generation"].as_u64().unwrap();
    assert!(
        accepted["request"]
            .as_str()
            .unwrap()
            .contains("198.51.100.20"),
        "{accepted:#}"
    );
    assert_eq!(
        audits[1]["egress_ipv6"], "2001:db8:2::20",
        "{:#}",
        audits[1]
    );
    let denied = &audits[2];
    assert_eq!(denied["identity"], READER, "{denied:#}");
    assert!(
        denied["reason"].as_str().unwrap().contains(READER),
        "{denied:#}"
    );
    assert_eq!(
        denied["egress_ipv4"], "198.51.100.20",
        "the pair stays: {denied:#}"
    );
    assert_eq!(
        audits[1]["generation"],
        g1 + 1,
        "each change moves the generation on: {:#}",
        audits[1]
    );
    assert_eq!(denied["generation"], g1 + 1, "{denied:#}");
    let invalid = &audits[4];
    assert_eq!(invalid["identity"], WRITER, "{invalid:#}");
    assert!(
        invalid["reason"].as_str().unwrap().contains("10.0.0.0/8"),
        "{invalid:#}"
    );
    assert_eq!(invalid["generation"], g1 + 1, "{invalid:#}");

    // The local unix socket still works, and its caller's credentials are audited.
    d.must(d.cli_ok(&["clear"]));
    let mut last = Value::Null;
    assert!(
        poll_until(Duration::from_secs(5), || {
            last = audit_lines(&d.log()).pop().unwrap_or_default();
            last["peer"]
                .as_str()
                .is_some_and(|p| p.starts_with("unix uid=0 gid=0"))
        }),
        "{last:#}"
    );
    assert_eq!(last["outcome"], "accepted", "{last:#}");

    // A dry run is audited with the pair still in force, not the previewed one.
    let out = tls.cli(
        &lab,
        &tls.pki.ca(),
        &tls.writer,
        &["set", "198.51.100.20", "--dry-run"],
    );
    assert!(out.success(), "{out}");
    assert!(
        poll_until(Duration::from_secs(5), || {
            last = audit_lines(&d.log()).pop().unwrap_or_default();
            last["dry_run"] == true
        }),
        "{last:#}"
    );
    assert_eq!(last["identity"], WRITER, "{last:#}");
    assert_eq!(last["egress_ipv4"], "", "nothing changed: {last:#}");
}

#[test]
fn python_example_sets_and_verifies_each_node_and_reports_failures_per_node() {
    let test = "python_example_sets_and_verifies_each_node_and_reports_failures_per_node";
    if !(require_root(test) && require_python_grpc(test)) {
        return;
    }
    let lab = Lab::new().unwrap();
    let tls = RemoteTls::new(&lab);
    let d = start(&lab, &tls, &[]);
    let script = source_root().join("examples/automation/set_egress.py");
    let script = script.display().to_string();
    let run = |client: &kilo_egress_tests::pki::CertFiles, args: &[&str]| {
        let (ca, cert, key) = (
            tls.pki.ca().display().to_string(),
            client.cert.display().to_string(),
            client.key.display().to_string(),
        );
        let mut full = vec![
            script.as_str(),
            "--json",
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--key",
            &key,
            "--timeout",
            "5",
        ];
        full.extend_from_slice(args);
        let out = cmd::run_in(&lab.upstream, "python3", &full).unwrap();
        let results: Vec<Value> = out
            .stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {out}")))
            .collect();
        (out, results)
    };

    // Two reachable nodes (the node's two listeners) and one where nothing listens.
    let dead = "192.0.2.10:7444";
    let (out, results) = run(
        &tls.writer,
        &[
            "--egress",
            "198.51.100.20",
            "--egress",
            "2001:db8:2::20",
            NODE_V4,
            NODE_V6,
            dead,
        ],
    );
    assert_eq!(out.code, Some(1), "one node failed: {out}{}", d.context());
    assert_eq!(results.len(), 3, "{out}");
    for (result, node) in results.iter().zip([NODE_V4, NODE_V6]) {
        assert_eq!(result["node"], node, "{out}");
        assert_eq!(result["ok"], true, "{out}{}", d.context());
        assert_eq!(result["ipv4"], "198.51.100.20", "{out}");
        assert_eq!(result["ipv6"], "2001:db8:2::20", "{out}");
        assert_eq!(result["in_sync"], true, "{out}");
    }
    assert_eq!(results[2]["node"], dead);
    assert_eq!(results[2]["ok"], false, "{out}");
    assert!(
        results[2]["error"]
            .as_str()
            .unwrap()
            .starts_with("UNAVAILABLE"),
        "{out}"
    );
    for family in Family::ALL {
        d.assert_upstream_sees(family, family.preferred(), "after the Python example");
    }

    // The reader is refused on each node, by name, and nothing changes.
    let (out, results) = run(&tls.reader, &["--clear", NODE_V4, NODE_V6]);
    assert_eq!(out.code, Some(1), "{out}");
    for result in &results {
        assert_eq!(result["ok"], false, "{out}");
        let error = result["error"].as_str().unwrap();
        assert!(
            error.starts_with("PERMISSION_DENIED") && error.contains(READER),
            "{out}"
        );
    }
    d.assert_upstream_sees(Family::V4, "198.51.100.20", "after the reader's attempt");

    // Clearing on all reachable nodes succeeds: exit 0.
    let (out, results) = run(&tls.writer, &["--clear", NODE_V4, NODE_V6]);
    assert_eq!(out.code, Some(0), "{out}{}", d.context());
    assert!(
        results.iter().all(|r| r["ok"] == true && r["ipv4"] == ""),
        "{out}"
    );
    d.assert_upstream_sees(Family::V4, Family::V4.primary(), "after clearing");
}

#[test]
fn server_certificate_rotates_without_restart_and_a_broken_one_is_not_used() {
    let test = "server_certificate_rotates_without_restart_and_a_broken_one_is_not_used";
    if !require_root(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let tls = RemoteTls::new(&lab);
    let mut d = start(&lab, &tls, &["--tls-reload-interval", "200ms"]);
    let ca = tls.pki.ca();
    let get = |ca: &std::path::Path| tls.cli(&lab, ca, &tls.reader, &["get", "-o", "json"]);
    assert!(get(&ca).success(), "{}", d.context());

    // The new certificate comes from another CA, so a client that trusts only that CA gets an
    // answer exactly when new handshakes present the new certificate.
    let next = kilo_egress_tests::pki::Pki::new(&tls.dir().join("next"), "next");
    let stale = get(&next.ca());
    assert!(
        !stale.success() && stale.stderr.contains("--ca must be the CA that signed it"),
        "the old certificate is not from the next CA, and the CLI says what is wrong: {stale}"
    );
    let v2 = next.server("server-v2", &["192.0.2.10", "2001:db8:1::10"]);
    tls.install_server_files("v2", &v2.cert, &v2.key);
    let rotated = poll_until(Duration::from_secs(10), || get(&next.ca()).success());
    assert!(
        rotated,
        "new handshakes never used the new certificate{}",
        d.context()
    );
    assert!(
        !get(&ca).success(),
        "the old certificate is no longer presented"
    );
    assert!(
        d.log()
            .contains("TLS material changed on disk: new handshakes use it"),
        "{}",
        d.context()
    );

    // A corrupt replacement is reported, and the current certificate keeps serving.
    let v3 = tls.dir().join("v3-src");
    std::fs::create_dir_all(&v3).unwrap();
    std::fs::write(
        v3.join("tls.crt"),
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    tls.install_server_files("v3", &v3.join("tls.crt"), &v2.key);
    let reported = poll_until(Duration::from_secs(10), || {
        d.log()
            .contains("cannot be used; still serving the previous certificate")
    });
    assert!(
        reported,
        "the broken certificate was not reported{}",
        d.context()
    );
    assert!(
        d.log().contains("--tls-cert"),
        "the report names the file{}",
        d.context()
    );
    let out = get(&next.ca());
    assert!(
        out.success(),
        "the previous certificate stopped serving: {out}{}",
        d.context()
    );
    assert!(d.is_running());
    let stopped = d.stop();
    assert!(stopped.as_ref().is_ok_and(|s| s.success()), "{stopped:?}");
}

#[test]
fn non_loopback_listener_without_tls_is_refused_with_what_to_add() {
    let test = "non_loopback_listener_without_tls_is_refused_with_what_to_add";
    if !require_root(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let out = cmd::run_in(
        &lab.node,
        kilo_egress_tests::bin_path("kilo-egressd"),
        &[
            "--mode",
            "kilo",
            "--state-dir",
            &lab.dir().join("state").display().to_string(),
            "--listen",
            &format!("tcp://{NODE_V4}"),
        ],
    )
    .unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("refusing to listen on 192.0.2.10:7443 without TLS")
            && out
                .stderr
                .contains("add --tls-cert FILE --tls-key FILE --client-ca FILE"),
        "{out}"
    );
    let out = cmd::run_in(
        &lab.node,
        kilo_egress_tests::bin_path("kilo-egressd"),
        &[
            "--mode",
            "kilo",
            "--state-dir",
            &lab.dir().join("state").display().to_string(),
            "--listen",
            &format!("tcp://{NODE_V4}"),
            "--tls-cert",
            "/nonexistent.pem",
        ],
    )
    .unwrap();
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("add --tls-key and --client-ca"),
        "{out}"
    );
}
