//! `--iptables-backend auto` (the default) finds the backend that holds the host's rules, the
//! way kube-proxy's iptables wrappers decide: kubelet's marker chain first, then where Kilo's
//! KILO-NAT lives, then which backend holds more rules. GetRules names the backend and why.

use kilo_egress_tests::kg::wait_for_snat_before_masquerade;
use kilo_egress_tests::{Backend, BusyNode, Daemon, DaemonConfig, Family, Lab, for_each_variant};

fn other(backend: Backend) -> Backend {
    match backend {
        Backend::Nft => Backend::Legacy,
        Backend::Legacy => Backend::Nft,
    }
}

fn assert_detected(d: &Daemon<'_>, backend: Backend, reason: &str) {
    let view = d.must(d.get_rules());
    assert_eq!(view.backend(), backend.name(), "{}", view.backend_reason());
    assert!(
        view.backend_reason().starts_with("auto: ") && view.backend_reason().contains(reason),
        "reason {:?} does not say {reason:?}",
        view.backend_reason()
    );
}

fn auto_follows_kilo_nat(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let kg = lab.kg(backend, family);
    kg.sync().unwrap();
    let d = lab
        .start_daemon(DaemonConfig::kilo(backend).auto_backend())
        .unwrap();
    assert_detected(
        &d,
        backend,
        &format!("KILO-NAT exists only in {}", backend.name()),
    );
    d.must(d.cli_ok(&["set", family.preferred()]));
    d.must(wait_for_snat_before_masquerade(
        &lab.iptables(backend, family),
        &kg,
        family.preferred(),
    ));
    d.assert_upstream_sees(family, family.preferred(), "SNAT in the detected backend");
}

for_each_variant!(auto_follows_kilo_nat: nft, legacy);

fn auto_follows_the_larger_rule_set(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    BusyNode { services: 20 }
        .install(&lab.iptables(backend, family))
        .unwrap();
    let d = lab
        .start_daemon(DaemonConfig::own(backend).auto_backend())
        .unwrap();
    let reason = match backend {
        Backend::Legacy => "legacy holds more rules",
        Backend::Nft => "nft holds at least as many rules",
    };
    assert_detected(&d, backend, reason);
    d.must(d.cli_ok(&["set", family.preferred()]));
    d.assert_upstream_sees(family, family.preferred(), "SNAT in the detected backend");
}

for_each_variant!(auto_follows_the_larger_rule_set: nft, legacy);

fn kubelet_hint_outweighs_rule_counts(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    // More rules in the other backend, but kubelet marked this one.
    BusyNode { services: 20 }
        .install(&lab.iptables(other(backend), family))
        .unwrap();
    lab.iptables(backend, family)
        .run(&["-t", "mangle", "-N", "KUBE-IPTABLES-HINT"])
        .unwrap();
    let d = lab
        .start_daemon(DaemonConfig::own(backend).auto_backend())
        .unwrap();
    assert_detected(&d, backend, "kubelet's KUBE-IPTABLES-HINT");
}

for_each_variant!(kubelet_hint_outweighs_rule_counts: nft, legacy);
