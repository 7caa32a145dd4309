//! A busy node: 20,000 kube-proxy-like rules in 2,000 chains share the nat table. kilo-egressd
//! switches, clears and repairs its own chain there as anywhere else, never changes a line of
//! kube-proxy's, and a full kube-proxy resync (every kube chain flushed and refilled) costs it
//! no write.

use kilo_egress_tests::{
    Backend, BusyNode, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, for_each_variant, poll_until,
};
use std::time::Duration;

/// Kilo-like RETURN rules: 50 destination ranges never NATed.
fn no_nat_cidrs(family: Family) -> String {
    (0..50)
        .map(|i| match family {
            Family::V4 => format!("10.200.{i}.0/24"),
            Family::V6 => format!("fd00:200:{i:x}::/48"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn busy_node_switches_repairs_and_leaves_kube_proxy_alone(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let busy = BusyNode::default();
    busy.install(&ipt).unwrap();
    let kube_before = BusyNode::kube_lines(&ipt.nat_dump().unwrap());
    assert!(kube_before.len() > busy.rule_count(), "the table is busy");
    let config = DaemonConfig::own(backend).arg(format!("--no-nat-cidr={}", no_nat_cidrs(family)));
    let d = lab.start_daemon(config).unwrap();

    d.must(d.cli_ok(&["set", family.preferred()]));
    d.assert_upstream_sees(family, family.preferred(), "after set on a busy node");
    let ours = d.must(ipt.iptables_s("KILO-NAT"));
    assert_eq!(ours.lines().filter(|l| l.contains("-j RETURN")).count(), 50);

    d.must(ipt.run(&["-t", "nat", "-F", "KILO-NAT"]));
    let repaired = poll_until(REPAIR_TIMEOUT, || {
        ipt.iptables_s("KILO-NAT").ok().as_ref() == Some(&ours)
    });
    assert!(
        repaired,
        "KILO-NAT not repaired on a busy node{}",
        d.context()
    );

    // kube-proxy's full resync rewrites all of its chains: nothing of ours is wrong.
    let writes = d.must(d.get_rules()).kernel_transactions();
    busy.install(&ipt).unwrap();
    let wrote = poll_until(Duration::from_millis(1500), || {
        d.get_rules()
            .map(|v| v.kernel_transactions())
            .unwrap_or(writes)
            != writes
    });
    assert!(
        !wrote,
        "a kube-proxy resync made kilo-egressd write{}",
        d.context()
    );

    d.must(d.cli_ok(&["clear"]));
    d.assert_upstream_sees(family, family.primary(), "after clear on a busy node");
    let kube_after = BusyNode::kube_lines(&d.must(ipt.nat_dump()));
    assert!(kube_after == kube_before, "kube-proxy's rules changed");
}

for_each_variant!(busy_node_switches_repairs_and_leaves_kube_proxy_alone: nft, legacy);
