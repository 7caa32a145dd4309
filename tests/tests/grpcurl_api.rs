//! The API as grpcurl sees it: reflection lists and describes the services, SetEgress switches
//! the source address upstream sees for both families and back, GetRules reports it, and the
//! standard health check reports SERVING.

use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, RulesView, for_each_backend, require_grpcurl,
};

const SET: &str = "kilo.egress.v1.EgressService/SetEgress";
const GET: &str = "kilo.egress.v1.EgressService/GetRules";

fn own_daemon(lab: &Lab, backend: Backend) -> Daemon<'_> {
    lab.start_daemon(DaemonConfig::own(backend)).unwrap()
}

fn grpcurl_lists_egress_and_health_services(backend: Backend) {
    if !require_grpcurl("grpcurl_lists_egress_and_health_services") {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = own_daemon(&lab, backend);
    let out = d.must(d.grpcurl(&[], &["list"]).and_then(|o| o.ok()));
    let services: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    for service in ["kilo.egress.v1.EgressService", "grpc.health.v1.Health"] {
        assert!(
            services.contains(&service),
            "`grpcurl list` shows {service}: {out}"
        );
    }
}

for_each_backend!(grpcurl_lists_egress_and_health_services);

fn grpcurl_describes_egress_service_with_set_and_get(backend: Backend) {
    if !require_grpcurl("grpcurl_describes_egress_service_with_set_and_get") {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = own_daemon(&lab, backend);
    let out = d.must(
        d.grpcurl(&[], &["describe", "kilo.egress.v1.EgressService"])
            .and_then(|o| o.ok()),
    );
    for rpc in [
        "rpc SetEgress ( .kilo.egress.v1.SetEgressRequest ) returns ( .kilo.egress.v1.SetEgressResponse )",
        "rpc GetRules ( .kilo.egress.v1.GetRulesRequest ) returns ( .kilo.egress.v1.GetRulesResponse )",
    ] {
        assert!(out.stdout.contains(rpc), "describe shows {rpc:?}: {out}");
    }
    let out = d.must(
        d.grpcurl(&[], &["describe", "kilo.egress.v1.SetEgressRequest"])
            .and_then(|o| o.ok()),
    );
    assert!(
        out.stdout.contains("repeated string egress_ips = 1;"),
        "{out}"
    );
}

for_each_backend!(grpcurl_describes_egress_service_with_set_and_get);

fn grpcurl_health_check_reports_serving(backend: Backend) {
    if !require_grpcurl("grpcurl_health_check_reports_serving") {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = own_daemon(&lab, backend);
    let reply = d.must(d.grpcurl_call("grpc.health.v1.Health/Check", "{}"));
    assert_eq!(reply["status"], "SERVING", "{reply:#}");
}

for_each_backend!(grpcurl_health_check_reports_serving);

fn grpcurl_set_egress_switches_source_for_both_families_and_back(backend: Backend) {
    if !require_grpcurl("grpcurl_set_egress_switches_source_for_both_families_and_back") {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = own_daemon(&lab, backend);
    for family in Family::ALL {
        d.assert_upstream_sees(family, family.primary(), "");
    }

    // IPv6 first, and a second IPv4 address that is ignored with a warning.
    let reply = d.must(d.grpcurl_call(
        SET,
        r#"{"egress_ips": ["2001:db8:2::20", "198.51.100.20", "192.0.2.10"]}"#,
    ));
    let set = RulesView { raw: reply };
    for family in Family::ALL {
        assert_eq!(set.egress(family), family.preferred(), "{:#}", set.raw);
        assert!(
            set.specs(family)
                .iter()
                .any(|s| kilo_egress_tests::decision(s)
                    .ends_with(&format!("-j SNAT --to-source {}", family.preferred()))),
            "the reply shows the programmed SNAT rule: {:#}",
            set.raw
        );
        d.assert_upstream_sees(family, family.preferred(), "");
    }
    assert!(
        set.raw["warnings"]
            .as_array()
            .is_some_and(|w| !w.is_empty()),
        "the ignored 192.0.2.10 is reported as a warning: {:#}",
        set.raw
    );

    let get = RulesView {
        raw: d.must(d.grpcurl_call(GET, "{}")),
    };
    assert_eq!(get.mode(), "MODE_OWN", "{:#}", get.raw);
    assert_eq!(get.backend(), backend.name(), "{:#}", get.raw);
    assert!(get.in_sync(), "{:#}", get.raw);
    assert_eq!(get.generation(), set.generation(), "{:#}", get.raw);
    for family in Family::ALL {
        assert_eq!(get.egress(family), family.preferred(), "{:#}", get.raw);
    }

    let reply = d.must(d.grpcurl_call(SET, r#"{"egressIps": []}"#));
    let cleared = RulesView { raw: reply };
    for family in Family::ALL {
        assert_eq!(cleared.egress(family), "", "{:#}", cleared.raw);
        d.assert_upstream_sees(family, family.primary(), "");
    }
}

for_each_backend!(grpcurl_set_egress_switches_source_for_both_families_and_back);
