//! `--random-fully`: by default kilo-egressd's SNAT and MASQUERADE rules carry it wherever
//! iptables accepts it (detected once at start, reported by GetRules), as kube-proxy and Calico
//! do against SNAT source-port collisions; `--random-fully=false` turns it off. In kilo mode it
//! goes on our SNAT rule only: kg's MASQUERADE is kg's. Both backends, both families, checked
//! in `iptables -S` of the real kernel and by what upstream sees.

use kilo_egress_tests::{Backend, DaemonConfig, Family, Lab, for_each_variant};

fn own_rules_carry_random_fully_unless_turned_off(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let view = d.must(d.get_rules());
    assert!(
        view.random_fully()
            .starts_with("on (detected: iptables-restore accepts --random-fully)"),
        "{:#}",
        view.raw
    );
    let chain = d.must(ipt.rules("KILO-NAT"));
    assert!(
        chain
            .last()
            .is_some_and(|r| r.ends_with("-j MASQUERADE --random-fully")),
        "{chain:#?}"
    );
    d.must(d.cli_ok(&["set", family.preferred()]));
    let chain = d.must(ipt.rules("KILO-NAT"));
    assert!(
        chain.last().is_some_and(|r| r.ends_with(&format!(
            "-j SNAT --to-source {} --random-fully",
            family.preferred()
        ))),
        "{chain:#?}"
    );
    assert_eq!(d.must(lab.seen_source(family)), family.preferred());
    drop(d);

    // The same node restarted with it off: the rules lose it, the choice stays.
    let config = DaemonConfig::own(backend).arg("--random-fully=false");
    let d = lab.start_daemon(config).unwrap();
    let view = d.must(d.get_rules());
    assert_eq!(
        view.random_fully(),
        "off (--random-fully=false)",
        "{:#}",
        view.raw
    );
    d.must(d.cli_ok(&["set", family.preferred()]));
    let chain = d.must(ipt.rules("KILO-NAT"));
    assert!(
        !chain.iter().any(|r| r.contains("--random-fully")),
        "{chain:#?}"
    );
    assert!(
        chain
            .last()
            .is_some_and(|r| r.ends_with(&format!("-j SNAT --to-source {}", family.preferred()))),
        "{chain:#?}"
    );
    assert_eq!(d.must(lab.seen_source(family)), family.preferred());
}
for_each_variant!(own_rules_carry_random_fully_unless_turned_off: nft, legacy);

fn kilo_mode_puts_it_on_our_snat_only(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let kg = lab.kg(backend, family);
    let ipt = lab.iptables(backend, family);
    kg.sync().unwrap();
    let d = lab.start_daemon(DaemonConfig::kilo(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let chain = d.must(ipt.rules("KILO-NAT"));
    let n = chain.len();
    assert!(
        chain[n - 2].ends_with(&format!(
            "-j SNAT --to-source {} --random-fully",
            family.preferred()
        )) && chain[n - 1].ends_with("-j MASQUERADE"),
        "our SNAT with it, kg's MASQUERADE without: {chain:#?}"
    );
    assert_eq!(d.must(lab.seen_source(family)), family.preferred());
}
for_each_variant!(kilo_mode_puts_it_on_our_snat_only: nft, legacy);
