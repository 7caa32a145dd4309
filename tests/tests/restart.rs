//! Restarts: on SIGTERM the rules stay and traffic keeps the chosen address; started again with
//! the same state directory and no client call, kilo-egressd keeps the rules and reports the
//! same choice; after the rules were wiped (a reboot), it programs the stored choice before its
//! API serves.

use kilo_egress_tests::{Backend, DaemonConfig, Family, Lab, for_each_variant};

fn rules_stay_on_sigterm_and_restart_keeps_choice_without_client(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let mut d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let before = d.must(ipt.nat_dump());
    let view_before = d.must(d.get_rules());

    d.stop_keeping_rules(&ipt, &before, family);

    let started = d.start_again();
    d.must(started);
    assert_eq!(
        d.must(ipt.nat_dump()),
        before,
        "restart keeps the rules{}",
        d.context()
    );
    let view = d.must(d.get_rules());
    for f in Family::ALL {
        assert_eq!(view.egress(f), view_before.egress(f), "{:#}", view.raw);
    }
    assert_eq!(
        view.generation(),
        view_before.generation(),
        "{:#}",
        view.raw
    );
    d.assert_upstream_sees(family, family.preferred(), "");
}
for_each_variant!(rules_stay_on_sigterm_and_restart_keeps_choice_without_client: nft, legacy);

fn stored_choice_is_programmed_before_api_serves(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let ipt = lab.iptables(backend, family);
    let mut d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let before = d.must(ipt.nat_dump());
    let stopped = d.stop();
    d.must(stopped);

    // A reboot: the nat table is empty again.
    for f in Family::ALL {
        let ipt = lab.iptables(backend, f);
        d.must(ipt.run(&["-t", "nat", "-F"]));
        d.must(ipt.run(&["-t", "nat", "-X"]));
    }
    assert!(
        lab.seen_source_within(family, 500).is_err(),
        "without rules pod traffic does not reach upstream"
    );

    // Read the kernel the moment the API socket exists, before any client could connect.
    let started = d.start_again_until_socket();
    d.must(started);
    assert_eq!(
        d.must(ipt.nat_dump()),
        before,
        "the stored choice is in the kernel before the API serves{}",
        d.context()
    );
    let ready = d.wait_ready();
    d.must(ready);
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(family), family.preferred(), "{:#}", view.raw);
    d.assert_upstream_sees(family, family.preferred(), "");
}
for_each_variant!(stored_choice_is_programmed_before_api_serves: nft, legacy);

fn kilo_mode_restart_puts_snat_back_before_api_serves(family: Family, backend: Backend) {
    let lab = Lab::new().unwrap();
    let kg = lab.kg(backend, family);
    let ipt = lab.iptables(backend, family);
    kg.sync().unwrap();
    let mut d = lab.start_daemon(DaemonConfig::kilo(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let with_snat = d.must(ipt.nat_dump());
    let stopped = d.stop();
    d.must(stopped);

    // kg restarts while kilo-egressd is down: the SNAT rule is flushed away.
    kg.sync().unwrap();
    assert_ne!(
        d.must(ipt.nat_dump()),
        with_snat,
        "kg flushed the SNAT rule"
    );

    let started = d.start_again();
    d.must(started);
    assert_eq!(
        d.must(ipt.nat_dump()),
        with_snat,
        "the stored choice is in the kernel when the API serves{}",
        d.context()
    );
    d.assert_upstream_sees(family, family.preferred(), "");
}
for_each_variant!(kilo_mode_restart_puts_snat_back_before_api_serves: nft, legacy);

/// The state files moved aside so far.
fn moved_aside(d: &kilo_egress_tests::Daemon<'_>) -> usize {
    std::fs::read_dir(d.state_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("state.json.corrupt-")
        })
        .count()
}

/// A corrupt state file (garbage, then a directory in its place) is moved aside and reported
/// loudly; the service starts anyway, keeps the pair that its rules in the kernel program
/// instead of replacing a still-correct SNAT with MASQUERADE, writes a fresh state file, and
/// hands out generations no earlier writer can hold.
fn corrupt_state_file_is_moved_aside_and_the_kernels_pair_is_kept(
    family: Family,
    backend: Backend,
) {
    let lab = Lab::new().unwrap();
    let mut d = lab.start_daemon(DaemonConfig::own(backend)).unwrap();
    d.must(d.cli_ok(&["set", family.preferred()]));
    let old_generation = d.must(d.get_rules()).generation();
    let stopped = d.stop();
    d.must(stopped);
    let state = d.state_dir().join("state.json");
    std::fs::write(&state, b"{\"version\":1,\"generation\":").unwrap();

    let started = d.start_again();
    d.must(started);
    assert!(
        d.log().contains("STORED STATE IS CORRUPT"),
        "the corrupt file is reported loudly{}",
        d.context()
    );
    assert_eq!(
        moved_aside(&d),
        1,
        "the corrupt file is kept aside for inspection"
    );
    d.assert_upstream_sees(
        family,
        family.preferred(),
        "the SNAT of ours in the kernel is kept",
    );
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(family), family.preferred(), "{:#}", view.raw);
    let adopted_generation = view.generation();
    assert!(adopted_generation > old_generation, "{:#}", view.raw);
    assert!(
        d.state_file()
            .is_some_and(|f| String::from_utf8_lossy(&f).contains(family.preferred())),
        "a fresh state file is written"
    );
    let out = d.must(d.cli(&[
        "set",
        family.primary(),
        "--expected-generation",
        &old_generation.to_string(),
    ]));
    assert_eq!(out.code, Some(1), "an old generation cannot match: {out}");

    // A directory where the file should be: no crash loop either.
    let stopped = d.stop();
    d.must(stopped);
    std::fs::remove_file(&state).unwrap();
    std::fs::create_dir(&state).unwrap();
    let started = d.start_again();
    d.must(started);
    assert_eq!(moved_aside(&d), 2, "the directory is moved aside");
    let view = d.must(d.get_rules());
    assert_eq!(view.egress(family), family.preferred(), "{:#}", view.raw);
    assert!(view.generation() > adopted_generation, "{:#}", view.raw);
}
for_each_variant!(corrupt_state_file_is_moved_aside_and_the_kernels_pair_is_kept: nft, legacy);
