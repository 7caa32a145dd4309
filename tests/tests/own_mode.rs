//! Own mode: kilo-egressd writes KILO-NAT and the POSTROUTING jumps; upstream sees the primary
//! address under MASQUERADE, the chosen one after `kilo-egress set`, and the primary one again
//! after `kilo-egress clear`.

use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, for_each_backend, for_each_variant,
    poll_until,
};

fn upstream_sees_chosen_address_after_set_and_primary_after_clear(
    family: Family,
    backend: Backend,
) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let ipt = lab.iptables(backend, family);
    let seen = |f: Family| d.must(lab.seen_source(f));
    let (primary, preferred) = (family.primary(), family.preferred());

    assert_eq!(seen(family), primary, "under MASQUERADE{}", d.context());

    d.must(d.cli_ok(&["set", preferred]));
    assert_eq!(
        seen(family),
        preferred,
        "after set {preferred}{}",
        d.context()
    );
    let other = family.other();
    assert_eq!(
        seen(other),
        other.primary(),
        "setting only {} leaves {} under MASQUERADE{}",
        family.name(),
        other.name(),
        d.context()
    );
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(family), preferred, "{:#}", view.raw);
    assert_eq!(view.egress(other), "", "{:#}", view.raw);

    // Back and forth: SNAT to the primary address, then to the preferred one again.
    for addr in [primary, preferred, primary, preferred] {
        d.must(d.cli_ok(&["set", addr]));
        assert_eq!(seen(family), addr, "after set {addr}{}", d.context());
        let chain = d.must(ipt.rules("KILO-NAT"));
        assert!(
            chain.last().is_some_and(|r| kilo_egress_tests::decision(r)
                .ends_with(&format!("-j SNAT --to-source {addr}"))),
            "KILO-NAT ends with SNAT to {addr}: {chain:#?}"
        );
    }

    d.must(d.cli_ok(&["clear"]));
    assert_eq!(seen(family), primary, "after clear{}", d.context());
    let chain = d.must(ipt.rules("KILO-NAT"));
    assert!(
        chain
            .last()
            .is_some_and(|r| kilo_egress_tests::decision(r).ends_with("-j MASQUERADE"))
            && !chain.iter().any(|r| r.contains("-j SNAT")),
        "after clear KILO-NAT ends with MASQUERADE and has no SNAT: {chain:#?}"
    );
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(family), "", "{:#}", view.raw);
}
for_each_variant!(upstream_sees_chosen_address_after_set_and_primary_after_clear: nft, legacy);

fn no_nat_cidr(family: Family) -> &'static str {
    match family {
        Family::V4 => "10.45.0.0/16",
        Family::V6 => "fd00:45::/48",
    }
}

/// The chain and jumps have the documented shape, sit first in POSTROUTING even when other
/// rules were there before, leave those rules alone, and GetRules reports what the kernel holds.
fn jump_comes_first_and_chain_returns_then_snats(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    // A rule someone else wrote before kilo-egressd started: it must stay, after our jump.
    let foreign = "-A POSTROUTING -o up0 -j ACCEPT";
    ipt.run(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-o",
        "up0",
        "-j",
        "ACCEPT",
    ])
    .unwrap();
    let config = DaemonConfig::own(backend)
        .arg("--no-nat-cidr")
        .arg(no_nat_cidr(family));
    let d = lab.start_daemon(config).unwrap();
    d.assert_upstream_sees(family, family.primary(), "");
    d.must(d.cli_ok(&["set", family.preferred()]));
    d.assert_upstream_sees(family, family.preferred(), "");

    let postrouting = d.must(ipt.rules("POSTROUTING"));
    let jump_prefix = format!(
        "-A POSTROUTING -s {} -m comment --comment \"kilo-egress:",
        family.pod_cidr()
    );
    assert!(
        postrouting.len() == 2
            && postrouting[0].starts_with(&jump_prefix)
            && postrouting[0].ends_with("-j KILO-NAT")
            && postrouting[1] == foreign,
        "POSTROUTING: our jump first, then the foreign rule: {postrouting:#?}"
    );
    let chain = d.must(ipt.rules("KILO-NAT"));
    let return_prefix = format!(
        "-A KILO-NAT -d {} -m comment --comment \"kilo-egress:",
        no_nat_cidr(family)
    );
    assert!(
        chain.len() == 2
            && chain[0].starts_with(&return_prefix)
            && chain[0].ends_with("-j RETURN")
            && chain[1].starts_with("-A KILO-NAT -m comment --comment \"kilo-egress:")
            && kilo_egress_tests::decision(&chain[1])
                .ends_with(&format!("-j SNAT --to-source {}", family.preferred())),
        "KILO-NAT: RETURN for the no-NAT CIDR, then SNAT: {chain:#?}"
    );

    let view = d.must(d.get_rules());
    assert_eq!(view.mode(), "MODE_OWN", "{:#}", view.raw);
    assert_eq!(view.backend(), backend.name(), "{:#}", view.raw);
    assert!(view.in_sync(), "in sync: {:#}", view.raw);
    assert_eq!(view.last_error(), "", "{:#}", view.raw);
    let specs = view.specs(family);
    for rule in chain.iter().chain(&postrouting[..1]) {
        assert!(
            specs.contains(rule),
            "GetRules reports {rule:?} as the kernel prints it; reported: {specs:#?}"
        );
    }
}
for_each_variant!(jump_comes_first_and_chain_returns_then_snats: nft, legacy);

fn set_with_two_addresses_of_one_family_uses_the_first(backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let out = d.must(d.cli(&[
        "set",
        "2001:db8:2::20",
        "198.51.100.20",
        "192.0.2.10",
        "2001:db8:1::10",
    ]));
    assert!(
        out.success(),
        "extra addresses are ignored, not an error: {out}"
    );
    for family in Family::ALL {
        d.assert_upstream_sees(
            family,
            family.preferred(),
            &format!("the first {} address wins", family.name()),
        );
    }
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(Family::V4), "198.51.100.20", "{:#}", view.raw);
    assert_eq!(view.egress(Family::V6), "2001:db8:2::20", "{:#}", view.raw);
}

for_each_backend!(set_with_two_addresses_of_one_family_uses_the_first);

fn cleanup_removes_everything_it_wrote(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let pristine = ipt.nat_dump().unwrap();
    let mut d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    assert_ne!(d.must(ipt.nat_dump()), pristine, "rules were programmed");
    let stopped = d.stop();
    d.must(stopped);
    let out = d.must(d.cleanup());
    assert!(out.success(), "cleanup: {out}");
    assert_eq!(
        d.must(ipt.nat_dump()),
        pristine,
        "cleanup leaves the nat table as it was before kilo-egressd{}",
        d.context()
    );
    assert!(d.state_file().is_none(), "cleanup removes the stored state");
}
for_each_variant!(cleanup_removes_everything_it_wrote: nft, legacy);

/// Restarted with only the other family's `--source-cidr`, kilo-egressd removes the rules it
/// had written for this family: pod traffic of this family is no longer NATed by it.
fn dropping_a_family_from_the_config_removes_its_rules(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let pristine = ipt.nat_dump().unwrap();
    let mut d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let stopped = d.stop();
    d.must(stopped);

    let other = family.other();
    let config = DaemonConfig {
        args: vec!["--source-cidr".into(), other.pod_cidr().into()],
        ..DaemonConfig::own(backend)
    };
    let d2 = lab.start_daemon(config).unwrap();
    let after = d2.must(ipt.nat_dump());
    assert!(
        !after.contains("kilo-egress:"),
        "no rule of ours is left for {}:\n{after}{}",
        family.name(),
        d2.context()
    );
    assert!(
        after
            .lines()
            .all(|l| pristine.contains(l) || l == "-N KILO-NAT"),
        "nothing else changed:\n{after}"
    );
    let view = d2.must(d2.get_rules());
    assert!(view.in_sync(), "{:#}", view.raw);
}
for_each_variant!(dropping_a_family_from_the_config_removes_its_rules: nft, legacy);

/// The packets the kernel counted on KILO-NAT's RETURN rule (`iptables -L -v -x`).
fn return_rule_packets(ipt: &kilo_egress_tests::Iptables<'_>) -> u64 {
    let listing = ipt
        .run(&["-t", "nat", "-L", "KILO-NAT", "-v", "-x", "-n"])
        .unwrap()
        .stdout;
    let line = listing
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some("RETURN"))
        .unwrap_or_else(|| panic!("no RETURN rule in KILO-NAT:\n{listing}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

/// A switch inserts the new decision rule in front of the old one and never rewrites the rest of
/// the chain, so the kernel's counters of the other rules survive it (flushing and refilling the
/// chain would zero them).
fn switching_keeps_the_counters_of_the_other_rules(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let services = match family {
        Family::V4 => "203.0.113.0/24",
        Family::V6 => "2001:db8:ff::/64",
    };
    let config = DaemonConfig::own(backend)
        .arg("--no-nat-cidr")
        .arg(services);
    let d = lab.start_daemon(config).unwrap();
    // Exempt from NAT, the pod's connection gets no answer, but the RETURN rule counts it.
    let counts = poll_until(REPAIR_TIMEOUT, || {
        let _ = lab.seen_source_within(family, 300);
        return_rule_packets(&ipt) > 0
    });
    assert!(counts, "the RETURN rule counted nothing{}", d.context());
    let counted = return_rule_packets(&ipt);
    d.must(d.cli_ok(&["set", family.preferred()]));
    assert_eq!(
        return_rule_packets(&ipt),
        counted,
        "after set{}",
        d.context()
    );
    d.must(d.cli_ok(&["clear"]));
    assert_eq!(
        return_rule_packets(&ipt),
        counted,
        "after clear{}",
        d.context()
    );
}
for_each_variant!(switching_keeps_the_counters_of_the_other_rules: nft, legacy);

/// The daemon limits glibc to one malloc arena and a fixed mmap threshold (it executes itself
/// again with `MALLOC_ARENA_MAX=1` and `MALLOC_MMAP_THRESHOLD_=131072`): with one arena per
/// thread, the peaks of its threads add up and a 10,000-rule chain costs ~24 MiB of RSS instead
/// of ~15 MiB, and a growing threshold keeps large freed buffers resident (docs/BENCHMARKS.md).
/// The bench measures the memory; this checks the settings are still there, under the same pid.
fn the_daemon_runs_with_one_malloc_arena_and_a_fixed_mmap_threshold(backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let pid = d.pid().expect("the daemon runs");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    for wanted in ["MALLOC_ARENA_MAX=1", "MALLOC_MMAP_THRESHOLD_=131072"] {
        assert!(
            environ
                .split(|b| *b == 0)
                .any(|var| var == wanted.as_bytes()),
            "{wanted} is not in the environment of pid {pid}{}",
            d.context()
        );
    }
}

for_each_backend!(the_daemon_runs_with_one_malloc_arena_and_a_fixed_mmap_threshold);
