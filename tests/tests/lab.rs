//! The lab itself: pod traffic reaches upstream only when the node NATs it, MASQUERADE shows the
//! primary address and SNAT the chosen one, and a dropped lab leaves no namespace behind. These
//! run without kilo-egressd, so a failure here points at the machine, not at the service.

use kilo_egress_tests::{Backend, Family, Lab, for_each_variant, require_root};

fn pod_reaches_upstream_only_through_nat(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let unnated = lab.seen_source_within(family, 500);
    assert!(
        unnated.is_err(),
        "upstream must not answer un-NATed pod traffic, but saw {unnated:?}"
    );

    let cidr = family.pod_cidr();
    ipt.run(&[
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        cidr,
        "-j",
        "MASQUERADE",
    ])
    .unwrap();
    assert_eq!(lab.seen_source(family).unwrap(), family.primary());

    let preferred = family.preferred();
    ipt.run(&[
        "-t",
        "nat",
        "-I",
        "POSTROUTING",
        "1",
        "-s",
        cidr,
        "-j",
        "SNAT",
        "--to-source",
        preferred,
    ])
    .unwrap();
    assert_eq!(lab.seen_source(family).unwrap(), preferred);
}
for_each_variant!(pod_reaches_upstream_only_through_nat: nft, legacy);

#[test]
fn dropped_lab_leaves_no_namespace_behind() {
    if !require_root("dropped_lab_leaves_no_namespace_behind") {
        return;
    }
    let lab = Lab::new().unwrap();
    let names = [lab.pod.clone(), lab.node.clone(), lab.upstream.clone()];
    let dir = lab.dir().to_path_buf();
    let listed = |name: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|line| line.split_whitespace().next() == Some(name))
    };
    assert!(names.iter().all(|n| listed(n)), "lab namespaces exist");
    drop(lab);
    for name in &names {
        assert!(!listed(name), "namespace {name} is still there");
    }
    assert!(!dir.exists(), "{} is still there", dir.display());
}
