//! `--conntrack-flush`: a UDP flow the pod started before a switch (one datagram every 100 ms
//! from a fixed port) keeps the old source without the option, because conntrack keeps its NAT
//! binding (documented behaviour); with the option, upstream sees the new source within 1 s of
//! the switch, while a flow of the node namespace itself keeps its conntrack entry (same id in
//! `conntrack -L`). Real kernel, both families, both backends, own mode.

use kilo_egress_tests::cmd::netns_command;
use kilo_egress_tests::{
    Backend, Daemon, DaemonConfig, Family, Lab, bin_path, for_each_variant, require_conntrack,
};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// The upstream UDP port the pod's flow goes to.
const FLOW_PORT: &str = "9999";
/// The pod's fixed source port.
const POD_PORT: &str = "40000";
/// The node's own flow: from this port to upstream port 9998 (nobody listens; the entry exists).
const NODE_PORT: &str = "40001";

/// Long-running probes, killed when the test ends.
struct Probes(Vec<Child>);

impl Drop for Probes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The pod's UDP flow, the listener that logs the source of each datagram, and the node's own
/// flow; returns the probes and the listener's log.
fn start_flows(lab: &Lab, family: Family) -> (Probes, std::path::PathBuf) {
    let log = lab.dir().join(format!("udp-{}.log", family.name()));
    let mut probes = Probes(Vec::new());
    let listener = netns_command(
        &lab.upstream,
        bin_path("egress-probe"),
        &["udp-listen", family.service(), FLOW_PORT],
    )
    .stdout(std::fs::File::create(&log).unwrap())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    probes.0.push(listener);
    assert!(
        kilo_egress_tests::poll_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.starts_with("listening on"))),
        "the UDP listener did not start"
    );
    for (ns, from, port) in [
        (&lab.pod, POD_PORT, FLOW_PORT),
        (&lab.node, NODE_PORT, "9998"),
    ] {
        let sender = netns_command(
            ns,
            bin_path("egress-probe"),
            &["udp-send", family.service(), port, from],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
        probes.0.push(sender);
    }
    (probes, log)
}

/// The source of the last datagram upstream received, and how many it received.
fn last_seen(log: &std::path::Path) -> (String, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().skip(1).collect();
    (
        lines.last().copied().unwrap_or_default().to_string(),
        lines.len(),
    )
}

fn wait_seen(log: &std::path::Path, expected: &str, timeout: Duration) -> bool {
    kilo_egress_tests::poll_until(timeout, || last_seen(log).0 == expected)
}

/// The id of the node's own flow in `conntrack -L` (the sender keeps it alive; a deleted entry
/// would come back with another id).
fn node_flow_id(lab: &Lab, family: Family) -> String {
    let fam = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    let out = lab
        .exec(
            &lab.node,
            "conntrack",
            &[
                "-L", "-f", fam, "-p", "udp", "--sport", NODE_PORT, "-o", "id",
            ],
        )
        .unwrap();
    let id = out
        .stdout
        .lines()
        .find_map(|line| line.split_whitespace().find(|w| w.starts_with("id=")))
        .map(str::to_owned);
    id.unwrap_or_else(|| panic!("no conntrack entry of the node's own flow: {out}"))
}

/// Starts the flows under MASQUERADE and waits until upstream sees the pod's flow.
fn flows_under_masquerade(lab: &Lab, family: Family) -> (Probes, std::path::PathBuf, String) {
    let (probes, log) = start_flows(lab, family);
    assert!(
        wait_seen(&log, family.primary(), Duration::from_secs(5)),
        "upstream never saw the pod's UDP flow from {}: {:?}",
        family.primary(),
        last_seen(&log)
    );
    let node_id = node_flow_id(lab, family);
    (probes, log, node_id)
}

fn udp_flow_keeps_the_old_source_without_conntrack_flush(family: Family, backend: Backend) {
    if !require_conntrack(module_path!()) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    assert_eq!(d.must(d.get_rules()).raw["conntrackFlush"], "off");
    let (_probes, log, _) = flows_under_masquerade(&lab, family);
    d.must(d.cli_ok(&["set", family.preferred()]));
    // New connections take the new decision at once ...
    assert_eq!(d.must(lab.seen_source(family)), family.preferred());
    // ... the flow opened before keeps its NAT binding.
    let (_, before) = last_seen(&log);
    std::thread::sleep(Duration::from_millis(1500));
    let (seen, after) = last_seen(&log);
    assert!(after >= before + 5, "the flow stopped: {before} → {after}");
    assert_eq!(
        seen,
        family.primary(),
        "without --conntrack-flush the old flow keeps the old source"
    );
    assert!(
        !d.log().contains("deleted conntrack entries"),
        "{}",
        d.log()
    );
}
for_each_variant!(udp_flow_keeps_the_old_source_without_conntrack_flush: nft, legacy);

fn switch_moves_the_flow(d: &Daemon<'_>, log: &std::path::Path, family: Family) {
    d.must(d.cli_ok(&["set", family.preferred()]));
    let switched = Instant::now();
    assert!(
        wait_seen(log, family.preferred(), Duration::from_secs(1)),
        "upstream did not see the new source within 1 s of the switch (after {:?}): {:?}{}",
        switched.elapsed(),
        last_seen(log),
        d.context()
    );
}

fn udp_flow_moves_within_a_second_with_conntrack_flush(family: Family, backend: Backend) {
    if !require_conntrack(module_path!()) {
        return;
    }
    let lab = Lab::new().unwrap();
    let config = DaemonConfig::own(backend).arg("--conntrack-flush");
    let d = lab.start_daemon(config).unwrap();
    assert_eq!(
        d.must(d.get_rules()).raw["conntrackFlush"],
        "on: no switch yet"
    );
    let (_probes, log, node_id) = flows_under_masquerade(&lab, family);

    switch_moves_the_flow(&d, &log, family);
    assert_eq!(
        node_flow_id(&lab, family),
        node_id,
        "the node's own flow lost its conntrack entry"
    );
    let view = d.must(d.get_rules());
    let status = view.raw["conntrackFlush"].as_str().unwrap_or_default();
    let name = family.name();
    let expected = format!(
        "{name} entries deleted after the last switch (MASQUERADE → SNAT to {})",
        family.preferred()
    );
    let deleted: usize = status
        .strip_prefix("on: ")
        .and_then(|s| s.split_once(' '))
        .and_then(|(n, rest)| (rest == expected).then(|| n.parse().ok()).flatten())
        .unwrap_or_else(|| panic!("GetRules conntrackFlush: {status:?}"));
    assert!(deleted >= 1, "{status}");
    assert!(
        d.log()
            .contains("deleted conntrack entries of the old egress decision"),
        "{}",
        d.log()
    );
    let printed = d.must(d.cli_ok(&["get"]));
    assert!(
        printed.contains(&format!("conntrack:    {status}")),
        "{printed}"
    );

    // And back: the flow returns to the node's address.
    d.must(d.cli_ok(&["clear"]));
    assert!(
        wait_seen(&log, family.primary(), Duration::from_secs(1)),
        "back to MASQUERADE: {:?}{}",
        last_seen(&log),
        d.context()
    );
    assert_eq!(node_flow_id(&lab, family), node_id);
}
for_each_variant!(udp_flow_moves_within_a_second_with_conntrack_flush: nft, legacy);

/// A switch the node's addresses cause (the chosen address leaves, then returns) flushes too.
fn an_address_change_moves_the_flow_with_conntrack_flush(family: Family, backend: Backend) {
    if !require_conntrack(module_path!()) {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = lab
        .start_daemon(DaemonConfig::own(backend).arg("--conntrack-flush"))
        .unwrap();
    let (_probes, log, node_id) = flows_under_masquerade(&lab, family);
    switch_moves_the_flow(&d, &log, family);
    let cidr = match family {
        Family::V4 => format!("{}/32", family.preferred()),
        Family::V6 => format!("{}/128", family.preferred()),
    };
    lab.node_ip(&format!("addr del {cidr} dev up0")).unwrap();
    assert!(
        wait_seen(&log, family.primary(), Duration::from_secs(1)),
        "the address left: the flow did not move to the node's address within 1 s: {:?}{}",
        last_seen(&log),
        d.context()
    );
    // Checked here, not after the address returns: a re-added IPv6 address is the newest, and
    // IPv6 source selection may then pick it for the node's own (unbound) flow: a new entry.
    assert_eq!(node_flow_id(&lab, family), node_id, "the node's own flow");
    let nodad = if family == Family::V6 { " nodad" } else { "" };
    lab.node_ip(&format!("addr add {cidr} dev up0{nodad}"))
        .unwrap();
    assert!(
        wait_seen(&log, family.preferred(), Duration::from_secs(1)),
        "the address returned: the flow did not move back within 1 s: {:?}{}",
        last_seen(&log),
        d.context()
    );
}
for_each_variant!(an_address_change_moves_the_flow_with_conntrack_flush: nft, legacy);
