//! Never fail quietly, on the real kernel: with every `iptables-restore` of the backend made to
//! fail (a wrapper earlier on kilo-egressd's PATH), a SetEgress is refused and the failure stays
//! visible while health stays SERVING (the accepted rules are intact); a flushed chain that cannot
//! be repaired turns health NOT_SERVING; once restores work again, the retry loop (not the 1-hour
//! safety check the nft harness sets) repairs the chain and every trace of the failure is gone.
//! The liveness check (`health --alive`) passes throughout, and fails once the daemon is stopped.

use kilo_egress_tests::faults::{path_first, restore_wrappers};
use kilo_egress_tests::{
    Backend, DaemonConfig, Family, Lab, REPAIR_TIMEOUT, for_each_backend, poll_until,
};
use std::time::{Duration, Instant};

fn writes_fail_visibly_and_recover_through_retries(backend: Backend) {
    let lab = Lab::new().unwrap();
    let family = Family::V4;
    let ipt = lab.iptables(backend, family);
    let wrappers = lab.dir().join("wrapped-bin");
    let refuse = restore_wrappers(&wrappers, backend);
    let config = DaemonConfig {
        env: vec![("PATH".into(), path_first(&wrappers))],
        ..DaemonConfig::own(backend)
    };
    let mut d = lab.start_daemon(config).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let programmed = d.must(ipt.nat_dump());

    // A refused SetEgress: INTERNAL, nothing changed, and it stays visible.
    std::fs::write(&refuse, "").unwrap();
    let out = d.must(d.cli(&["set", family.primary()]));
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("previous egress state stays"), "{out}");
    assert_eq!(d.must(ipt.nat_dump()), programmed, "nothing changed");
    let health = d.must(d.cli(&["health"]));
    assert!(
        health.success(),
        "the accepted rules are in place: {health}"
    );
    assert!(health.stderr.contains("write path DEGRADED"), "{health}");
    assert!(health.stderr.contains("refused by the test"), "{health}");
    let view = d.must(d.get_rules());
    assert!(
        !view.in_sync(),
        "a failed write is not hidden: {:#}",
        view.raw
    );
    assert!(
        view.last_error().contains("refused by the test"),
        "{:#}",
        view.raw
    );
    let get = d.must(d.cli_ok(&["get"]));
    assert!(get.contains("write path:   DEGRADED since"), "{get}");

    // The chain is flushed while restores fail: health turns NOT_SERVING.
    d.must(ipt.run(&["-t", "nat", "-F", "KILO-NAT"]));
    assert!(
        poll_until(REPAIR_TIMEOUT, || d
            .cli(&["health"])
            .is_ok_and(|out| out.code == Some(1))),
        "NOT_SERVING while the repair fails{}",
        d.context()
    );
    // The liveness check still passes: the engine answers, and a restart would repair nothing.
    let alive = d.must(d.cli(&["health", "--alive"]));
    assert!(
        alive.success() && alive.stdout.contains("in sync: NO"),
        "{alive}"
    );
    let view = d.must(d.get_rules());
    let failure = &view.raw["lastWriteFailure"];
    assert!(
        failure["what"]
            .as_str()
            .unwrap_or_default()
            .starts_with("repair ("),
        "{:#}",
        view.raw
    );

    // The cause clears: the retry loop repairs the chain within its backoff.
    std::fs::remove_file(&refuse).unwrap();
    let cleared = Instant::now();
    assert!(
        poll_until(Duration::from_secs(8), || ipt
            .nat_dump()
            .is_ok_and(|dump| dump == programmed)),
        "repaired once restores work again{}",
        d.context()
    );
    println!(
        "{} {}: repaired {:?} after restores worked again",
        backend.name(),
        family.name(),
        cleared.elapsed()
    );
    d.must(lab.wait_for_source(family, family.preferred(), REPAIR_TIMEOUT));
    let health = d.must(d.cli(&["health"]));
    assert!(health.success() && health.stderr.is_empty(), "{health}");
    let view = d.must(d.get_rules());
    assert!(
        view.in_sync() && view.last_error().is_empty(),
        "{:#}",
        view.raw
    );
    // A stopped kilo-egressd fails the liveness check.
    let stopped = d.stop();
    d.must(stopped);
    let gone = d.must(d.cli(&["health", "--alive"]));
    assert_eq!(gone.code, Some(1), "{gone}");
}
for_each_backend!(writes_fail_visibly_and_recover_through_retries);
