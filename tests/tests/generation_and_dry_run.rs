//! Optimistic concurrency and dry runs: a stale `expected_generation` is refused with
//! FAILED_PRECONDITION (CLI exit 1) and a dry run shows the rules it would program; neither
//! changes the nat tables, state.json or what upstream sees.

use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, RulesView, for_each_backend, require_grpcurl,
};

const SET: &str = "kilo.egress.v1.EgressService/SetEgress";

/// Everything a refused or dry-run request must leave alone.
fn snapshot(lab: &Lab, d: &Daemon<'_>, backend: Backend) -> (String, Option<Vec<u8>>, u64) {
    (
        d.must(lab.nat_dumps(backend)),
        d.state_file(),
        d.must(d.get_rules()).generation(),
    )
}

/// Both families: upstream sees `addr(family)`.
fn assert_upstream_sees_both(d: &Daemon<'_>, addr: impl Fn(Family) -> &'static str) {
    for family in Family::ALL {
        d.assert_upstream_sees(family, addr(family), "");
    }
}

fn cli_dry_run_shows_snat_rules_and_changes_nothing(backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let before = snapshot(&lab, &d, backend);
    let out = d.must(d.cli_ok(&["set", "198.51.100.20", "2001:db8:2::20", "--dry-run"]));
    for family in Family::ALL {
        assert!(
            out.contains(&format!("-j SNAT --to-source {}", family.preferred())),
            "the dry run shows the SNAT rule for {}:\n{out}",
            family.name()
        );
    }
    assert_eq!(
        snapshot(&lab, &d, backend),
        before,
        "a dry run changes nothing{}",
        d.context()
    );
    assert_upstream_sees_both(&d, Family::primary);
}

for_each_backend!(cli_dry_run_shows_snat_rules_and_changes_nothing);

fn grpcurl_dry_run_reports_rules_and_changes_nothing(backend: Backend) {
    let test = "grpcurl_dry_run_reports_rules_and_changes_nothing";
    if !require_grpcurl(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", "198.51.100.20"]));
    let before = snapshot(&lab, &d, backend);
    let reply = d.must(d.grpcurl_call(
        SET,
        r#"{"egressIps": ["192.0.2.10", "2001:db8:2::20"], "dryRun": true}"#,
    ));
    assert_eq!(reply["dryRun"], true, "{reply:#}");
    let view = RulesView { raw: reply };
    for (family, addr) in [(Family::V4, "192.0.2.10"), (Family::V6, "2001:db8:2::20")] {
        assert!(
            view.specs(family)
                .iter()
                .any(|s| kilo_egress_tests::decision(s)
                    .ends_with(&format!("-j SNAT --to-source {addr}"))),
            "the dry run shows SNAT to {addr}: {:#}",
            view.raw
        );
    }
    assert_eq!(
        snapshot(&lab, &d, backend),
        before,
        "a dry run changes nothing{}",
        d.context()
    );
    assert_upstream_sees_both(&d, |f| match f {
        Family::V4 => "198.51.100.20",
        Family::V6 => f.primary(),
    });
}

for_each_backend!(grpcurl_dry_run_reports_rules_and_changes_nothing);

fn cli_stale_expected_generation_exits_1_and_changes_nothing(backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let g0 = d.must(d.get_rules()).generation().to_string();
    d.must(d.cli_ok(&[
        "set",
        "198.51.100.20",
        "2001:db8:2::20",
        "--expected-generation",
        &g0,
    ]));
    let before = snapshot(&lab, &d, backend);
    assert_ne!(before.2.to_string(), g0, "a change moves the generation on");

    let out = d.must(d.cli(&["set", "192.0.2.10", "--expected-generation", &g0]));
    assert_eq!(out.code, Some(1), "a stale generation is refused: {out}");
    assert_eq!(
        snapshot(&lab, &d, backend),
        before,
        "a refused set changes nothing{}",
        d.context()
    );
    assert_upstream_sees_both(&d, Family::preferred);
}

for_each_backend!(cli_stale_expected_generation_exits_1_and_changes_nothing);

fn grpcurl_stale_expected_generation_gets_failed_precondition(backend: Backend) {
    let test = "grpcurl_stale_expected_generation_gets_failed_precondition";
    if !require_grpcurl(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let g0 = d.must(d.get_rules()).generation();
    let reply = d.must(d.grpcurl_call(
        SET,
        &format!(
            r#"{{"egressIps": ["198.51.100.20", "2001:db8:2::20"], "expectedGeneration": "{g0}"}}"#
        ),
    ));
    let g1 = RulesView { raw: reply }.generation();
    assert_ne!(g1, g0, "a change moves the generation on");
    let before = snapshot(&lab, &d, backend);

    let request = format!(r#"{{"egressIps": ["192.0.2.10"], "expectedGeneration": "{g0}"}}"#);
    let out = d.must(d.grpcurl(&["-d", &request], &[SET]));
    assert!(
        !out.success() && out.stderr.contains("Code: FailedPrecondition"),
        "a stale generation is refused with FAILED_PRECONDITION: {out}"
    );
    assert_eq!(
        snapshot(&lab, &d, backend),
        before,
        "a refused set changes nothing{}",
        d.context()
    );
    assert_upstream_sees_both(&d, Family::preferred);

    let request = format!(r#"{{"egressIps": ["192.0.2.10"], "expectedGeneration": "{g1}"}}"#);
    d.must(d.grpcurl(&["-d", &request], &[SET]).and_then(|o| o.ok()));
    assert_upstream_sees_both(&d, |f| match f {
        Family::V4 => "192.0.2.10",
        Family::V6 => f.primary(),
    });
}

for_each_backend!(grpcurl_stale_expected_generation_gets_failed_precondition);
