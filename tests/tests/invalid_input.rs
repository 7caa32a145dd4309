//! Invalid egress addresses are refused and change nothing: the CLI exits 2, grpcurl gets
//! INVALID_ARGUMENT naming the entry, and both nat tables and state.json stay byte-identical.

use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, for_each_backend, require_grpcurl, require_root,
};

/// Values that are not a plain unicast IP address usable as a source address.
const INVALID: &[&str] = &[
    "198.51.100.20/32",
    "node-a.example",
    "",
    " 198.51.100.20",
    "198.51.100.20 ",
    "fe80::1%eth0",
    "0.0.0.0",
    "127.0.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "169.254.1.1",
    "fe80::1",
    "::ffff:192.0.2.1",
    "::",
    "::1",
    "ff02::1",
    "2001:db8:2::20/128",
    "198.51.100.256",
];

/// Everything an invalid request must leave alone.
fn snapshot(lab: &Lab, d: &Daemon<'_>, backend: Backend) -> (String, Option<Vec<u8>>) {
    (d.must(lab.nat_dumps(backend)), d.state_file())
}

/// A daemon with a valid choice already made, so a refused request has something to break.
fn daemon_with_choice(lab: &Lab, backend: Backend) -> Daemon<'_> {
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", Family::V4.preferred(), Family::V6.preferred()]));
    assert!(
        d.state_file().is_some(),
        "state.json exists after a set{}",
        d.context()
    );
    d
}

fn cli_refuses_invalid_addresses_and_changes_nothing(backend: Backend) {
    let lab = Lab::new().unwrap();
    let d = daemon_with_choice(&lab, backend);
    let before = snapshot(&lab, &d, backend);
    let mut failures = Vec::new();
    for &bad in INVALID {
        // Alone, and next to a valid address of each family: the whole request is refused.
        for args in [
            vec!["set", bad],
            vec!["set", "198.51.100.21", bad],
            vec!["set", bad, "2001:db8:2::21"],
        ] {
            let out = d.must(d.cli(&args));
            if out.code != Some(2) {
                failures.push(format!("{args:?}: expected exit 2: {out}"));
            }
            let after = snapshot(&lab, &d, backend);
            if after.0 != before.0 {
                failures.push(format!("{args:?} changed the nat tables:\n{}", after.0));
            }
            if after.1 != before.1 {
                failures.push(format!("{args:?} changed state.json"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}\n--- nat tables before ---\n{}{}",
        failures.len(),
        failures.join("\n\n"),
        before.0,
        d.context()
    );
    for family in Family::ALL {
        d.assert_upstream_sees(family, family.preferred(), "");
    }
}

#[test]
fn cli_refuses_invalid_addresses_with_exit_2_and_changes_nothing_nft() {
    if require_root("cli_refuses_invalid_addresses_with_exit_2_and_changes_nothing_nft") {
        cli_refuses_invalid_addresses_and_changes_nothing(Backend::Nft);
    }
}

#[test]
fn cli_refuses_invalid_addresses_with_exit_2_and_changes_nothing_legacy() {
    if require_root("cli_refuses_invalid_addresses_with_exit_2_and_changes_nothing_legacy") {
        cli_refuses_invalid_addresses_and_changes_nothing(Backend::Legacy);
    }
}

fn grpcurl_gets_invalid_argument_naming_the_entry_and_nothing_changes(backend: Backend) {
    let test = "grpcurl_gets_invalid_argument_naming_the_entry_and_nothing_changes";
    if !require_grpcurl(test) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = daemon_with_choice(&lab, backend);
    let before = snapshot(&lab, &d, backend);
    let mut failures = Vec::new();
    for &bad in INVALID {
        let request = serde_json::json!({ "egressIps": ["198.51.100.21", bad] }).to_string();
        let out = d.must(d.grpcurl(
            &["-d", &request],
            &["kilo.egress.v1.EgressService/SetEgress"],
        ));
        let text = format!("{}{}", out.stdout, out.stderr);
        if out.success() || !text.contains("Code: InvalidArgument") {
            failures.push(format!("{request}: expected INVALID_ARGUMENT: {out}"));
        } else if !bad.trim().is_empty() && !text.contains(bad.trim()) {
            failures.push(format!(
                "{request}: the message does not name {bad:?}: {out}"
            ));
        }
        if snapshot(&lab, &d, backend) != before {
            failures.push(format!("{request} changed the nat tables or state.json"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}{}",
        failures.len(),
        failures.join("\n\n"),
        d.context()
    );
}

for_each_backend!(grpcurl_gets_invalid_argument_naming_the_entry_and_nothing_changes);
