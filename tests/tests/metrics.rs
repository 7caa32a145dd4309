//! Prometheus metrics on the real kernel: kilo-egressd's `/metrics` (nft and legacy) and
//! `kilo-egress watch`'s, scraped inside the lab's node namespace, accepted by `promtool check
//! metrics`, with values asserted after real actions: a switch counts transactions of its family
//! only, a tamper counts a drift repair, a failed apply (iptables-restore made to fail) counts a
//! failure and degrades the write path until a write succeeds, a rejected request is counted by
//! its gRPC code, an absent address shows. The watcher counts watch events, SetEgress calls,
//! invalid annotations and reconnects.

use kilo_egress_tests::faults::{path_first, restore_wrappers};
use kilo_egress_tests::kube::{
    ApiServer, FOLLOW_TIMEOUT, RECOVER_TIMEOUT, Watcher, require_kmock, require_kubectl,
    wait_for_pair,
};
use kilo_egress_tests::prom::{
    self, DAEMON_METRICS, WATCHER_METRICS, count, promtool_check, require_promtool, sample,
};
use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, for_each_backend, poll_until, require_root,
};

/// The `ip_family` label kilo-egressd uses.
fn label(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

fn restores(text: &str, family: Family, result: &str) -> f64 {
    count(
        text,
        &format!(
            r#"kilo_egress_iptables_restore_total{{ip_family="{}",result="{result}"}}"#,
            label(family)
        ),
    )
}

/// Drift repairs of `family`, summed over their causes.
fn repairs(text: &str, family: Family) -> f64 {
    let family = format!(r#"ip_family="{}""#, label(family));
    text.lines()
        .filter(|l| l.starts_with("kilo_egress_drift_repairs_total{") && l.contains(&family))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn set_egress_calls(text: &str, code: &str) -> f64 {
    count(
        text,
        &format!(r#"kilo_egress_set_egress_requests_total{{caller="unix",grpc_code="{code}"}}"#),
    )
}

fn per_family(text: &str, name: &str, family: Family) -> Option<f64> {
    sample(text, &format!(r#"{name}{{ip_family="{}"}}"#, label(family)))
}

fn assert_promtool_accepts(text: &str) {
    let check = promtool_check(text).unwrap();
    assert!(
        check.success() && check.stdout.trim().is_empty() && check.stderr.trim().is_empty(),
        "promtool check metrics: {check}\n{text}"
    );
}

fn daemon_metrics_follow_switches_repairs_failures_and_rejections(backend: Backend) {
    let lab = Lab::new().unwrap();
    let v4 = Family::V4;
    let wrappers = lab.dir().join("wrapped-bin");
    let refuse = restore_wrappers(&wrappers, backend);
    let config = DaemonConfig {
        env: vec![("PATH".into(), path_first(&wrappers))],
        ..DaemonConfig::own(backend)
    }
    .arg("--metrics-listen")
    .arg(DAEMON_METRICS);
    let d = lab.start_daemon(config).unwrap();
    let scrape = || d.must(prom::scrape(&lab, DAEMON_METRICS));
    let (status, body) = d.must(prom::get(&lab, DAEMON_METRICS, "/"));
    assert_eq!(status, 404, "only /metrics is served: {body}");

    let start = scrape();
    assert_promtool_accepts(&start);
    assert!(
        start.contains(r#"kilo_egress_build_info{binary="kilo-egressd",version=""#),
        "{start}"
    );
    for family in Family::ALL {
        assert_eq!(per_family(&start, "kilo_egress_in_sync", family), Some(1.0));
        assert!(
            restores(&start, family, "success") >= 1.0,
            "the start wrote {family:?}"
        );
        assert_eq!(restores(&start, family, "failure"), 0.0);
    }
    assert_eq!(sample(&start, "kilo_egress_write_path_degraded"), Some(0.0));

    // A switch of IPv4 (IPv6 stays MASQUERADE): IPv4's transactions grow, IPv6's do not.
    d.must(d.cli_ok(&["set", v4.preferred()]));
    let switched = scrape();
    assert!(restores(&switched, v4, "success") > restores(&start, v4, "success"));
    assert_eq!(
        restores(&switched, Family::V6, "success"),
        restores(&start, Family::V6, "success"),
        "no IPv6 transaction for an IPv4 switch"
    );
    let snat = format!(
        r#"kilo_egress_decision_info{{action="SNAT",address="{0}",address_present="true",chosen="{0}",ip_family="IPv4"}}"#,
        v4.preferred()
    );
    assert_eq!(sample(&switched, &snat), Some(1.0), "{switched}");
    assert_eq!(set_egress_calls(&switched, "OK"), 1.0);

    // A tamper is repaired and counted.
    let ipt = lab.iptables(backend, v4);
    d.must(ipt.run(&["-t", "nat", "-F", "KILO-NAT"]));
    let counted = poll_until(REPAIR_TIMEOUT, || repairs(&scrape(), v4) >= 1.0);
    assert!(
        counted,
        "no drift repair counted: {}{}",
        scrape(),
        d.context()
    );

    // Rejected requests (a bad address from grpcurl, a stale generation from the CLI, which
    // checks addresses itself): counted by code; the rules stay as they were.
    let before = d.must(lab.nat_dumps(backend));
    let request = r#"{"egress_ips": ["198.51.100.300"]}"#;
    let invalid = d.must(d.grpcurl(
        &["-d", request],
        &["kilo.egress.v1.EgressService/SetEgress"],
    ));
    assert!(invalid.stderr.contains("InvalidArgument"), "{invalid}");
    let stale = d.must(d.cli(&["set", "--expected-generation", "999", v4.primary()]));
    assert!(!stale.success(), "{stale}");
    let after_rejection = scrape();
    assert_eq!(set_egress_calls(&after_rejection, "InvalidArgument"), 1.0);
    assert_eq!(
        set_egress_calls(&after_rejection, "FailedPrecondition"),
        1.0
    );
    assert_eq!(d.must(lab.nat_dumps(backend)), before);

    // A failed apply: counted, the write path degraded and IPv4 out of sync until a write works.
    std::fs::write(&refuse, "").unwrap();
    let failed = d.must(d.cli(&["set", v4.primary()]));
    assert!(!failed.success(), "{failed}");
    let degraded = scrape();
    assert!(restores(&degraded, v4, "failure") >= 1.0, "{degraded}");
    assert_eq!(
        sample(&degraded, "kilo_egress_write_path_degraded"),
        Some(1.0)
    );
    assert_eq!(per_family(&degraded, "kilo_egress_in_sync", v4), Some(0.0));
    assert_eq!(set_egress_calls(&degraded, "Internal"), 1.0);
    assert_eq!(
        sample(&degraded, &snat),
        Some(1.0),
        "the old decision stays"
    );
    std::fs::remove_file(&refuse).unwrap();
    d.must(d.cli_ok(&["set", v4.primary()]));
    let recovered = scrape();
    assert_eq!(
        sample(&recovered, "kilo_egress_write_path_degraded"),
        Some(0.0)
    );
    assert_eq!(per_family(&recovered, "kilo_egress_in_sync", v4), Some(1.0));
    assert_eq!(
        sample(&recovered, &snat),
        None,
        "the old decision's series is gone"
    );

    // An address the node does not have: MASQUERADE meanwhile, and it shows.
    let absent = "203.0.113.99";
    d.must(d.cli(&["set", absent]));
    let text = scrape();
    assert_eq!(
        per_family(&text, "kilo_egress_address_absent", v4),
        Some(1.0)
    );
    let fallback = format!(
        r#"kilo_egress_decision_info{{action="MASQUERADE",address="",address_present="false",chosen="{absent}",ip_family="IPv4"}}"#
    );
    assert_eq!(sample(&text, &fallback), Some(1.0), "{text}");
    assert_eq!(per_family(&text, "kilo_egress_owned_rules", v4), Some(2.0));
    assert_promtool_accepts(&text);
}

fn may_run(test: &str) -> bool {
    require_root(test) && require_promtool(test)
}

fn daemon_metrics(backend: Backend) {
    if may_run(&format!("daemon_metrics_{}", backend.name())) {
        daemon_metrics_follow_switches_repairs_failures_and_rejections(backend);
    }
}

for_each_backend!(daemon_metrics);

#[test]
fn watcher_metrics_count_events_calls_invalid_annotations_and_reconnects() {
    let name = "watcher_metrics_count_events_calls_invalid_annotations_and_reconnects";
    if !(may_run(name) && require_kmock(name) && require_kubectl(name)) {
        return;
    }
    let lab = Lab::new().unwrap();
    let mut d = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    let mut api = ApiServer::start(&lab).unwrap();
    api.create_node(&[]).unwrap();
    let w = Watcher::start(&api, &d, &["--metrics-listen", WATCHER_METRICS]).unwrap();
    let must =
        |result: anyhow::Result<String>| result.unwrap_or_else(|e| panic!("{e:#}{}", w.context()));
    let scrape = || must(prom::scrape(&lab, WATCHER_METRICS));
    let served = poll_until(FOLLOW_TIMEOUT, || {
        prom::scrape(&lab, WATCHER_METRICS).is_ok()
    });
    assert!(served, "no watcher metrics{}", w.context());

    api.annotate("198.51.100.20").unwrap();
    wait_for_pair(&d, &w, "198.51.100.20", "", FOLLOW_TIMEOUT).unwrap();
    let applied = poll_until(FOLLOW_TIMEOUT, || {
        count(
            &scrape(),
            r#"kilo_egress_watch_set_egress_calls_total{result="success"}"#,
        ) == 1.0
    });
    assert!(applied, "one SetEgress counted: {}", scrape());
    let text = scrape();
    assert!(
        count(&text, r#"kilo_egress_watch_events_total{type="apply"}"#) >= 1.0,
        "{text}"
    );
    assert_eq!(
        count(
            &text,
            r#"kilo_egress_watch_reconciles_total{outcome="applied"}"#
        ),
        1.0
    );
    assert_eq!(sample(&text, "kilo_egress_watch_in_sync"), Some(1.0));

    // An invalid value: counted once, flagged until a valid one is handled.
    api.annotate("198.51.100.20/32").unwrap();
    let flagged = poll_until(FOLLOW_TIMEOUT, || {
        let text = scrape();
        sample(&text, "kilo_egress_watch_annotation_invalid") == Some(1.0)
            && count(&text, "kilo_egress_watch_invalid_annotations_total") == 1.0
    });
    assert!(flagged, "the invalid annotation shows: {}", scrape());
    api.annotate("198.51.100.20").unwrap();
    let cleared = poll_until(FOLLOW_TIMEOUT, || {
        sample(&scrape(), "kilo_egress_watch_annotation_invalid") == Some(0.0)
    });
    assert!(cleared, "a valid annotation clears the flag: {}", scrape());

    // The API server restarts: the watch resumes, counted as a reconnect.
    api.stop().unwrap();
    api.start_again().unwrap();
    api.create_node(&["kilo.squat.ai/egress-ip=198.51.100.20"])
        .unwrap();
    let resumed = poll_until(RECOVER_TIMEOUT, || {
        count(
            &scrape(),
            r#"kilo_egress_watch_reconnects_total{to="kubernetes"}"#,
        ) >= 1.0
    });
    assert!(
        resumed,
        "the API server reconnect counted: {}{}",
        scrape(),
        w.context()
    );

    // kilo-egressd is down: the failed calls show; once it is back the watcher connects again.
    d.stop().unwrap();
    let failing = poll_until(RECOVER_TIMEOUT, || {
        let text = scrape();
        sample(&text, "kilo_egress_watch_in_sync") == Some(0.0)
            && count(
                &text,
                r#"kilo_egress_watch_reconciles_total{outcome="error"}"#,
            ) >= 1.0
    });
    assert!(
        failing,
        "the unreachable kilo-egressd shows: {}{}",
        scrape(),
        w.context()
    );
    d.start_again().unwrap();
    let reconnected = poll_until(RECOVER_TIMEOUT, || {
        let text = scrape();
        sample(&text, "kilo_egress_watch_in_sync") == Some(1.0)
            && count(
                &text,
                r#"kilo_egress_watch_reconnects_total{to="kilo-egressd"}"#,
            ) >= 1.0
    });
    assert!(
        reconnected,
        "the kilo-egressd reconnect counted: {}{}",
        scrape(),
        w.context()
    );
    assert_promtool_accepts(&scrape());
}
