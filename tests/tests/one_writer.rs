//! One kilo-egressd per node: a second instance in the same network namespace (other mode,
//! socket and state directory) and `kilo-egressd cleanup` both refuse while a service runs,
//! name its pid, and leave every rule of both backends byte-identical.

use kilo_egress_tests::cmd;
use kilo_egress_tests::{Backend, DaemonConfig, Family, Lab, bin_path, poll_until, require_root};
use std::process::Stdio;
use std::time::Duration;

/// Both backends' nat tables, both families.
fn all_rules(lab: &Lab) -> String {
    [Backend::Nft, Backend::Legacy]
        .into_iter()
        .map(|backend| lab.nat_dumps(backend).unwrap())
        .collect()
}

/// Runs kilo-egressd with `args` in the node namespace and waits (bounded) for it to exit.
fn run_to_exit(lab: &Lab, args: &[&str]) -> (Option<i32>, String) {
    let mut child = cmd::netns_command(&lab.node, bin_path("kilo-egressd"), args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let exited = poll_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(exited, "the second instance kept running: {text}");
    (output.status.code(), text)
}

#[test]
fn a_second_instance_and_cleanup_refuse_and_change_nothing() {
    if !require_root("a_second_instance_and_cleanup_refuse_and_change_nothing") {
        return;
    }
    let lab = Lab::new().unwrap();
    let d = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    d.must(d.cli_ok(&["set", Family::V4.preferred()]));
    let before = all_rules(&lab);
    let holder = format!("pid {}", d.pid().unwrap());
    let dir = lab.dir().join("second");
    let socket = format!("unix://{}", dir.join("other.sock").display());
    let state = dir.join("state").display().to_string();

    let (code, out) = run_to_exit(
        &lab,
        &[
            "--mode",
            "kilo",
            "--iptables-backend",
            "legacy",
            "--listen",
            &socket,
            "--state-dir",
            &state,
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("another kilo-egressd") && out.contains(&holder),
        "{out}"
    );
    assert_eq!(
        all_rules(&lab),
        before,
        "the second instance changed rules\n{out}"
    );

    let (code, out) = run_to_exit(
        &lab,
        &[
            "cleanup",
            "--mode",
            "own",
            "--iptables-backend",
            "nft",
            "--state-dir",
            &state,
        ],
    );
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&holder), "{out}");
    assert_eq!(all_rules(&lab), before, "cleanup changed rules\n{out}");
    d.assert_upstream_sees(
        Family::V4,
        Family::V4.preferred(),
        "the first instance still rules",
    );
}
