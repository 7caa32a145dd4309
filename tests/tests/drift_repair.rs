//! Own mode drift: whatever someone does to the rules kilo-egressd owns (delete the SNAT rule,
//! flush KILO-NAT, delete the jump, delete the chain, add a foreign rule to it, reorder it), the
//! nat table returns to exactly what it was within seconds, and upstream sees the chosen
//! address again.

use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Iptables, Lab, REPAIR_TIMEOUT, backstop_read_interval,
    for_each_variant, poll_until,
};

fn no_nat_cidr(family: Family) -> &'static str {
    match family {
        Family::V4 => "10.45.0.0/16",
        Family::V6 => "fd00:45::/48",
    }
}

/// Lines of `dump` that add a rule to `chain`, e.g. `-A KILO-NAT ...`.
fn lines_of<'a>(dump: &'a str, chain: &str) -> Vec<&'a str> {
    let prefix = format!("-A {chain} ");
    dump.lines().filter(|l| l.starts_with(&prefix)).collect()
}

/// The jumps into KILO-NAT, as `-D POSTROUTING ...` restore lines.
fn delete_jumps(dump: &str) -> String {
    lines_of(dump, "POSTROUTING")
        .into_iter()
        .filter(|l| l.ends_with("-j KILO-NAT"))
        .map(|l| format!("-D{}\n", &l[2..]))
        .collect()
}

fn restore(ipt: &Iptables<'_>, body: &str) {
    ipt.restore_noflush(&format!("*nat\n{body}COMMIT\n"))
        .unwrap();
}

/// Starts own mode with a no-NAT CIDR (so KILO-NAT holds a RETURN and a SNAT rule), chooses the
/// preferred address, lets `tamper` change the nat table, and checks it is repaired.
fn repaired_after(family: Family, backend: Backend, tamper: impl FnOnce(&Iptables<'_>, &str)) {
    let lab = Lab::new().unwrap();
    let config = DaemonConfig::own(backend)
        .arg("--no-nat-cidr")
        .arg(no_nat_cidr(family));
    let d = lab.start_daemon(config).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let ipt = lab.iptables(backend, family);
    let before = d.must(ipt.nat_dump());
    assert_eq!(
        lines_of(&before, "KILO-NAT").len(),
        2,
        "RETURN + SNAT:\n{before}"
    );

    let detection = d.must(d.get_rules()).drift_detection().to_string();
    match backend {
        // With the periodic check an hour away, only a notification can repair in time.
        Backend::Nft => assert!(
            detection.starts_with("nftables change notifications") && detection.ends_with("1h"),
            "{detection}"
        ),
        // The shape is x_tables' IPT_SO_GET_INFO, read from the real kernel.
        Backend::Legacy => assert!(
            detection.starts_with("polling (") && detection.contains("the table's shape every 1s"),
            "{detection}"
        ),
    }

    // On legacy a change that keeps the table's shape (a reorder) waits for the backstop read.
    let backstop = backstop_read_interval(&detection);
    tamper(&ipt, &before);

    d.must(ipt.wait_for_nat_dump(&before, REPAIR_TIMEOUT + backstop));
    d.assert_upstream_sees(family, family.preferred(), "after the repair");
    let mut last = None;
    let in_sync = poll_until(REPAIR_TIMEOUT, || {
        let view = d.must(d.get_rules());
        let ok = view.in_sync();
        last = Some(view);
        ok
    });
    assert!(in_sync, "GetRules reports in sync again: {last:#?}");
}

fn deleted_snat_rule_is_put_back(family: Family, backend: Backend) {
    repaired_after(family, backend, |ipt, before| {
        let snat = lines_of(before, "KILO-NAT")
            .into_iter()
            .find(|l| l.contains("-j SNAT"))
            .expect("a SNAT rule");
        restore(ipt, &format!("-D{}\n", &snat[2..]));
    });
}
for_each_variant!(deleted_snat_rule_is_put_back: nft, legacy);

fn flushed_chain_is_refilled(family: Family, backend: Backend) {
    repaired_after(family, backend, |ipt, _| {
        ipt.run(&["-t", "nat", "-F", "KILO-NAT"]).unwrap();
    });
}
for_each_variant!(flushed_chain_is_refilled: nft, legacy);

fn deleted_jump_is_put_back(family: Family, backend: Backend) {
    repaired_after(family, backend, |ipt, before| {
        restore(ipt, &delete_jumps(before));
    });
}
for_each_variant!(deleted_jump_is_put_back: nft, legacy);

fn deleted_jump_and_chain_are_recreated(family: Family, backend: Backend) {
    repaired_after(family, backend, |ipt, before| {
        restore(
            ipt,
            &format!("{}-F KILO-NAT\n-X KILO-NAT\n", delete_jumps(before)),
        );
    });
}
for_each_variant!(deleted_jump_and_chain_are_recreated: nft, legacy);

fn foreign_rule_in_chain_is_removed(family: Family, backend: Backend) {
    repaired_after(family, backend, |ipt, _| {
        // Would let pod traffic to the service leave un-NATed (and fail) if it stayed.
        let service = format!(
            "{}/{}",
            family.service(),
            if family == Family::V4 { 32 } else { 128 }
        );
        ipt.run(&[
            "-t", "nat", "-I", "KILO-NAT", "1", "-d", &service, "-j", "RETURN",
        ])
        .unwrap();
    });
}
for_each_variant!(foreign_rule_in_chain_is_removed: nft, legacy);

fn reordered_chain_is_restored(family: Family, backend: Backend) {
    repaired_after(family, backend, |ipt, before| {
        let snat = lines_of(before, "KILO-NAT")
            .into_iter()
            .find(|l| l.contains("-j SNAT"))
            .expect("a SNAT rule");
        // SNAT first, RETURN second: the no-NAT CIDR would be NATed.
        restore(
            ipt,
            &format!(
                "-D KILO-NAT{rest}\n-I KILO-NAT 1{rest}\n",
                rest = &snat["-A KILO-NAT".len()..]
            ),
        );
    });
}
for_each_variant!(reordered_chain_is_restored: nft, legacy);
