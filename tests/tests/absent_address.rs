//! Egress that follows the address: kilo-egressd SNATs to the chosen address only while it is on
//! an interface of the node (IPv6: once duplicate address detection is over). When the address
//! leaves (a cloud detaching it, keepalived moving it), `--absent-address masquerade` (default)
//! falls back to the node's own address until it returns; `keep` keeps the SNAT and says so.
//! An address moving between the node's own interfaces costs nothing, and a floating address
//! moving between two nodes moves which node SNATs to it. Real kernel, both backends, both
//! families.

use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, SECOND_NODE_PRIMARY,
    SECOND_NODE_PRIMARY_V6, cmd, for_each_variant, poll_until, require_root,
};

/// `addr` as a host prefix (/32 or /128), as the lab assigns the preferred address.
fn host(addr: &str) -> String {
    let prefix = if addr.contains(':') { 128 } else { 32 };
    format!("{addr}/{prefix}")
}

/// The preferred address with its prefix, as the lab assigns it to the node's `up0`.
fn preferred_cidr(family: Family) -> String {
    host(family.preferred())
}

/// Assigns `addr` to the node's `dev`, usable at once (no DAD, like the lab's own addresses).
fn assign(lab: &Lab, addr: &str, dev: &str) {
    let nodad = if addr.contains(':') { " nodad" } else { "" };
    lab.node_ip(&format!("addr add {} dev {dev}{nodad}", host(addr)))
        .unwrap();
}

/// Takes `addr` off the node's `dev`.
fn unassign(lab: &Lab, addr: &str, dev: &str) {
    lab.node_ip(&format!("addr del {} dev {dev}", host(addr)))
        .unwrap();
}

/// Takes the preferred address off the node, as a cloud moving it elsewhere does: removed from
/// `up0`, and upstream no longer routes it back to this node.
fn move_address_away(lab: &Lab, family: Family) {
    unassign(lab, family.preferred(), "up0");
    let out = lab
        .exec(
            &lab.upstream,
            "ip",
            &["route", "add", "blackhole", &preferred_cidr(family)],
        )
        .unwrap();
    assert!(out.success(), "{out}");
}

/// Brings the preferred address back to this node (no DAD: the lab's other addresses have none).
fn bring_address_back(lab: &Lab, family: Family) {
    let out = lab
        .exec(
            &lab.upstream,
            "ip",
            &["route", "del", "blackhole", &preferred_cidr(family)],
        )
        .unwrap();
    assert!(out.success(), "{out}");
    assign(lab, family.preferred(), "up0");
}

fn an_absent_address_falls_back_to_masquerade_until_it_returns(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let (primary, preferred) = (family.primary(), family.preferred());
    d.must(d.cli_ok(&["set", preferred]));
    assert_eq!(
        d.must(lab.seen_source(family)),
        preferred,
        "{}",
        d.context()
    );
    let view = d.must(d.get_rules());
    assert!(
        view.address_presence()
            .starts_with("following the node's addresses (rtnetlink); absent address: masquerade"),
        "{:#}",
        view.raw
    );
    assert!(!view.address_absent(family), "{:#}", view.raw);

    move_address_away(&lab, family);
    d.must(lab.wait_for_source(family, primary, REPAIR_TIMEOUT));
    let view = d.must(d.get_rules());
    assert!(view.address_absent(family), "{:#}", view.raw);
    assert!(
        view.status(family).starts_with(&format!(
            "{preferred} is not assigned to any interface: MASQUERADE until it is usable"
        )),
        "{:#}",
        view.raw
    );
    assert!(
        view.in_sync(),
        "the fallback is the desired state: {:#}",
        view.raw
    );
    assert_eq!(
        view.egress(family),
        preferred,
        "the choice stays: {:#}",
        view.raw
    );
    let specs = view.specs(family).join("\n");
    assert!(
        specs.contains("-j MASQUERADE") && !specs.contains("-j SNAT"),
        "{specs}"
    );
    assert!(
        d.log().contains("egress address not usable"),
        "one WARN per transition{}",
        d.context()
    );
    let get = d.must(d.cli_ok(&["get"]));
    assert!(get.contains("is not assigned to any interface"), "{get}");

    bring_address_back(&lab, family);
    d.must(lab.wait_for_source(family, preferred, REPAIR_TIMEOUT));
    let view = d.must(d.get_rules());
    assert!(!view.address_absent(family), "{:#}", view.raw);
    assert!(
        d.log().contains("egress address usable again"),
        "{}",
        d.context()
    );
    // The other family never noticed.
    assert_eq!(
        d.must(lab.seen_source(family.other())),
        family.other().primary()
    );
}
for_each_variant!(an_absent_address_falls_back_to_masquerade_until_it_returns: nft, legacy);

fn keep_policy_keeps_the_snat_and_says_why(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let config = DaemonConfig::own(backend)
        .arg("--absent-address")
        .arg("keep");
    let d = lab.start_daemon(config).unwrap();
    let preferred = family.preferred();
    d.must(d.cli_ok(&["set", preferred]));
    assert_eq!(
        d.must(lab.seen_source(family)),
        preferred,
        "{}",
        d.context()
    );
    let ipt = lab.iptables(backend, family);
    let before = d.must(ipt.nat_dump());

    move_address_away(&lab, family);
    let said = poll_until(REPAIR_TIMEOUT, || {
        d.get_rules().is_ok_and(|v| v.address_absent(family))
    });
    let view = d.must(d.get_rules());
    assert!(
        said,
        "GetRules never said the address is absent: {:#}",
        view.raw
    );
    assert!(
        view.status(family)
            .contains("SNAT kept (--absent-address keep)"),
        "{:#}",
        view.raw
    );
    assert_eq!(d.must(ipt.nat_dump()), before, "keep changes no rule");
    // Fail closed: the pod's packets still leave as the absent address, so no reply comes back.
    let seen = lab.seen_source_within(family, 1500);
    assert!(
        seen.is_err(),
        "upstream answered {seen:?} although the address is gone"
    );
    assert_eq!(
        view.kernel_transactions(),
        d.must(d.get_rules()).kernel_transactions()
    );
}
for_each_variant!(keep_policy_keeps_the_snat_and_says_why: nft, legacy);

fn an_address_moved_between_interfaces_costs_nothing(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let preferred = family.preferred();
    d.must(d.cli_ok(&["set", preferred]));
    let settled = d.must(d.get_rules()).kernel_transactions();
    // A second interface of the node (veth: this kernel may have no dummy module).
    lab.node_ip("link add egress1 type veth peer name egress1p")
        .unwrap();
    lab.node_ip("link set egress1 up").unwrap();
    assign(&lab, preferred, "egress1");
    unassign(&lab, preferred, "up0");
    // An IPv4 link going down removes no address, so nothing changes either. (IPv6 addresses
    // really are removed on link down unless keep_addr_on_down is set: that is an absence.)
    if family == Family::V4 {
        lab.node_ip("link set egress1 down").unwrap();
    }
    // A call through the engine's queue, behind the address notifications of the moves.
    d.must(d.cli_ok(&["set", preferred, family.other().preferred()]));
    let view = d.must(d.get_rules());
    assert!(!view.address_absent(family), "{:#}", view.raw);
    assert_eq!(
        view.kernel_transactions(),
        settled + 2, // the other family's switch: its commit and its tidy
        "the moves cost transactions: {:#}{}",
        view.raw,
        d.context()
    );
    assert_eq!(
        d.must(lab.seen_source(family)),
        preferred,
        "{}",
        d.context()
    );
    assert!(
        !d.log().contains("egress address not usable"),
        "{}",
        d.context()
    );
}
for_each_variant!(an_address_moved_between_interfaces_costs_nothing: nft, legacy);

fn set_with_an_absent_address_warns_and_masquerades(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    let absent = match family {
        Family::V4 => "198.51.100.99",
        Family::V6 => "2001:db8:2::99",
    };
    // A dry run says what would happen, and changes nothing.
    let before = d.must(lab.nat_dumps(backend));
    let out = d.must(d.cli(&["set", "--dry-run", absent]));
    assert!(out.success(), "{out}");
    assert!(
        out.stdout.contains(&format!(
            "{absent} is not assigned to any interface: MASQUERADE until it is usable"
        )),
        "the dry run warns, naming the address: {out}"
    );
    assert_eq!(
        d.must(lab.nat_dumps(backend)),
        before,
        "a dry run writes nothing"
    );
    let out = d.must(d.cli(&["set", absent]));
    assert!(out.success(), "an absent address is accepted: {out}");
    assert!(
        out.stdout
            .contains(&format!("{absent} is not assigned to any interface"))
            || out
                .stderr
                .contains(&format!("{absent} is not assigned to any interface")),
        "the reply warns, naming the address: {out}"
    );
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(family), absent, "{:#}", view.raw);
    assert!(view.address_absent(family), "{:#}", view.raw);
    let specs = view.specs(family).join("\n");
    assert!(
        specs.contains("-j MASQUERADE") && !specs.contains("-j SNAT"),
        "{specs}"
    );
    assert_eq!(d.must(lab.seen_source(family)), family.primary());
    // The address is attached later (the cloud was slow): SNAT to it, no call needed.
    assign(&lab, absent, "up0");
    let snat = poll_until(REPAIR_TIMEOUT, || {
        d.get_rules().is_ok_and(|v| {
            v.specs(family)
                .iter()
                .any(|s| kilo_egress_tests::decision(s).ends_with(&format!("--to-source {absent}")))
        })
    });
    assert!(snat, "{:#}", d.must(d.get_rules()).raw);
}
for_each_variant!(set_with_an_absent_address_warns_and_masquerades: nft, legacy);

/// IPv6 only: an address added with duplicate address detection on is tentative for about a
/// second; it is not used until DAD completes.
fn a_tentative_ipv6_address_waits_for_dad(backend: Backend) {
    let family = Family::V6;
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    // The lab turns DAD off for its own addresses; this interface does it again.
    let out = d.must(lab.exec(
        &lab.node,
        "sysctl",
        &["-w", "net.ipv6.conf.up0.accept_dad=1"],
    ));
    assert!(out.success(), "{out}");
    lab.node_ip(&format!("addr del {} dev up0", preferred_cidr(family)))
        .unwrap();
    lab.node_ip(&format!("addr add {} dev up0", preferred_cidr(family)))
        .unwrap();
    let tentative = poll_until(REPAIR_TIMEOUT, || {
        d.get_rules()
            .is_ok_and(|v| v.status(family).contains("duplicate address detection"))
    });
    assert!(
        tentative,
        "never reported as tentative: {:#}",
        d.must(d.get_rules()).raw
    );
    let dad = d.must(lab.exec(
        &lab.node,
        "ip",
        &["-6", "addr", "show", "dev", "up0", "tentative"],
    ));
    let specs = d.must(d.get_rules()).specs(family).join("\n");
    if dad.stdout.contains(family.preferred()) {
        assert!(!specs.contains("-j SNAT"), "SNAT during DAD: {specs}");
    }
    let usable = poll_until(REPAIR_TIMEOUT, || {
        d.get_rules().is_ok_and(|v| !v.address_absent(family))
    });
    assert!(usable, "{:#}", d.must(d.get_rules()).raw);
    d.must(lab.wait_for_source(family, family.preferred(), REPAIR_TIMEOUT));
}

#[test]
fn a_tentative_ipv6_address_waits_for_dad_nft() {
    if require_root("a_tentative_ipv6_address_waits_for_dad_nft") {
        a_tentative_ipv6_address_waits_for_dad(Backend::Nft);
    }
}

#[test]
fn a_tentative_ipv6_address_waits_for_dad_legacy() {
    if require_root("a_tentative_ipv6_address_waits_for_dad_legacy") {
        a_tentative_ipv6_address_waits_for_dad(Backend::Legacy);
    }
}

#[test]
fn an_unknown_absent_address_policy_is_refused_before_any_rule() {
    if !require_root("an_unknown_absent_address_policy_is_refused_before_any_rule") {
        return;
    }
    let lab = Lab::new().unwrap();
    let before = lab.nat_dumps(Backend::Nft).unwrap();
    let out = cmd::run_in(
        &lab.node,
        kilo_egress_tests::bin_path("kilo-egressd"),
        &[
            "--mode",
            "own",
            "--source-cidr",
            "10.44.0.0/24",
            "--state-dir",
            &lab.dir().join("state").display().to_string(),
            "--absent-address",
            "maybe",
        ],
    )
    .unwrap();
    assert_eq!(out.code, Some(2), "{out}");
    assert!(
        out.stderr
            .contains("invalid value 'maybe' for '--absent-address")
            && out.stderr.contains("masquerade")
            && out.stderr.contains("keep"),
        "{out}"
    );
    assert_eq!(
        lab.nat_dumps(Backend::Nft).unwrap(),
        before,
        "nothing programmed"
    );
}

/// The floating-address recipe of docs/operations.md: two nodes behind one upstream, both set
/// to the same address; the cloud (here: upstream's route) moves it from one to the other. The
/// node that holds it SNATs to it, the other masquerades, and neither blackholes its pods.
fn a_floating_address_moves_which_node_snats_to_it(family: Family, backend: Backend) {
    let (floating, first_primary, second_primary) = match family {
        Family::V4 => ("198.51.100.50", "192.0.2.10", SECOND_NODE_PRIMARY),
        Family::V6 => ("2001:db8:2::50", "2001:db8:1::10", SECOND_NODE_PRIMARY_V6),
    };
    let first = Lab::new().unwrap();
    let second = first.second_node().unwrap();
    let a = first.start_daemon(DaemonConfig::own(backend)).unwrap();
    let b = second.start_daemon(DaemonConfig::own(backend)).unwrap();
    assign(&first, floating, "up0");
    first.route_floating(floating, first_primary).unwrap();
    for d in [&a, &b] {
        let out = d.must(d.cli(&["set", floating]));
        assert!(out.success(), "{out}");
    }
    a.must(first.wait_for_source(family, floating, REPAIR_TIMEOUT));
    b.must(second.wait_for_source(family, second_primary, REPAIR_TIMEOUT));
    assert!(b.must(b.get_rules()).address_absent(family));

    // The address moves to the second node.
    hand_over(&first, &second, floating, second_primary);
    b.must(second.wait_for_source(family, floating, REPAIR_TIMEOUT));
    a.must(first.wait_for_source(family, first_primary, REPAIR_TIMEOUT));
    assert!(a.must(a.get_rules()).address_absent(family));
    assert!(!b.must(b.get_rules()).address_absent(family));

    // And back.
    hand_over(&second, &first, floating, first_primary);
    a.must(first.wait_for_source(family, floating, REPAIR_TIMEOUT));
    b.must(second.wait_for_source(family, second_primary, REPAIR_TIMEOUT));
}

/// Moves `floating` from the node of `from` to the node of `to`, whose address upstream routes
/// it to from now on (`via`), as a cloud or keepalived moves a floating address.
fn hand_over(from: &Lab, to: &Lab, floating: &str, via: &str) {
    unassign(from, floating, "up0");
    assign(to, floating, "up0");
    from.route_floating(floating, via).unwrap();
}
for_each_variant!(a_floating_address_moves_which_node_snats_to_it: nft, legacy);
