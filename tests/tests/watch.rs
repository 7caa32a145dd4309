//! `kilo-egress watch` with the real kilo-egressd, a Kubernetes API emulator (kmock) and real
//! `kubectl`, all in the lab's node namespace: the annotation drives the rules and what upstream
//! sees; invalid values are reported as Events and change nothing; the watcher survives watch
//! drops, `410 Gone`, an API server restart and a kilo-egressd restart that lost its state, and
//! names a Node that is not (yet) registered.

use kilo_egress_tests::kg::snat_before_masquerade_problem;
use kilo_egress_tests::kube::{
    ANNOTATION, ApiServer, FOLLOW_TIMEOUT, RECOVER_TIMEOUT, Watcher, require_kmock,
    require_kubectl, wait_for_pair,
};
use kilo_egress_tests::{Backend, Daemon, DaemonConfig, Family, Lab, poll_until, require_root};

const V4: &str = "198.51.100.20";
const V6: &str = "2001:db8:2::20";
const APPLIED: &str = "EgressApplied";
const INVALID: &str = "InvalidEgressIP";

fn may_run(test: &str) -> bool {
    require_root(test) && require_kmock(test) && require_kubectl(test)
}

/// A lab with kilo-egressd (own mode, nft) and the API emulator holding `NODE` with
/// `annotations`.
fn setup<'lab>(lab: &'lab Lab, annotations: &[&str]) -> (Daemon<'lab>, ApiServer<'lab>) {
    let daemon = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    let api = ApiServer::start(lab).unwrap();
    api.create_node(annotations)
        .unwrap_or_else(|e| panic!("{e:#}"));
    (daemon, api)
}

fn must<T>(result: anyhow::Result<T>, watcher: &Watcher) -> T {
    result.unwrap_or_else(|e| panic!("{e:#}{}", watcher.context()))
}

fn applied_lines(watcher: &Watcher) -> usize {
    watcher.log().matches("egress applied").count()
}

fn stop_cleanly(watcher: &mut Watcher) {
    let status = must(watcher.stop(), watcher);
    assert!(
        status.success(),
        "SIGTERM stops the watcher cleanly: {status}{}",
        watcher.context()
    );
}

#[test]
fn annotating_a_node_moves_pod_egress_and_removing_it_brings_masquerade_back() {
    if !may_run("annotating_a_node_moves_pod_egress_and_removing_it_brings_masquerade_back") {
        return;
    }
    let lab = Lab::new().unwrap();
    let (d, api) = setup(&lab, &[]);
    let mut w = Watcher::start(&api, &d, &[]).unwrap();

    // Annotate: both families SNAT to the preferred addresses; upstream sees them.
    must(api.annotate(&format!("{V4},{V6}")), &w);
    must(wait_for_pair(&d, &w, V4, V6, FOLLOW_TIMEOUT), &w);
    for family in Family::ALL {
        let rules = d.must(lab.iptables(Backend::Nft, family).iptables_s("KILO-NAT"));
        assert!(
            rules.contains(&format!("-j SNAT --to-source {}", family.preferred())),
            "{rules}"
        );
        d.must(lab.wait_for_source(family, family.preferred(), FOLLOW_TIMEOUT));
    }
    let notes = must(api.event_notes(APPLIED), &w);
    assert_eq!(notes.len(), 1, "one EgressApplied Event: {notes:?}");
    assert!(notes[0].contains(&format!("{V4}, {V6}")), "{notes:?}");

    // Status heartbeats change the Node, not the annotation: no SetEgress, no Event. The next
    // change is applied after them (one watch stream, in order), so counting then is exact.
    let applied = applied_lines(&w);
    for _ in 0..3 {
        must(api.heartbeat(), &w);
    }
    must(api.annotate(&format!(" {V6} ")), &w);
    must(wait_for_pair(&d, &w, "", V6, FOLLOW_TIMEOUT), &w);
    assert_eq!(
        applied_lines(&w),
        applied + 1,
        "heartbeats made no call{}",
        w.context()
    );
    assert_eq!(must(api.event_notes(APPLIED), &w).len(), 2);
    d.must(lab.wait_for_source(Family::V4, Family::V4.primary(), FOLLOW_TIMEOUT));
    d.assert_upstream_sees(Family::V6, V6, "IPv6 keeps its annotated address");

    // Remove: MASQUERADE for both families.
    must(api.remove_annotation(), &w);
    must(wait_for_pair(&d, &w, "", "", FOLLOW_TIMEOUT), &w);
    for family in Family::ALL {
        d.must(lab.wait_for_source(family, family.primary(), FOLLOW_TIMEOUT));
    }
    let notes = must(api.event_notes(APPLIED), &w);
    assert!(notes.last().unwrap().contains("MASQUERADE"), "{notes:?}");

    stop_cleanly(&mut w);
}

#[test]
fn on_a_kilo_node_the_annotation_puts_snat_before_kgs_masquerade_for_both_families() {
    if !may_run("on_a_kilo_node_the_annotation_puts_snat_before_kgs_masquerade_for_both_families") {
        return;
    }
    // The default deployment: Kilo's agent owns KILO-NAT, kilo-egressd runs in kilo mode.
    let lab = Lab::new().unwrap();
    for family in Family::ALL {
        lab.kg(Backend::Nft, family).sync().unwrap();
    }
    let d = lab.start_daemon(DaemonConfig::kilo(Backend::Nft)).unwrap();
    let api = ApiServer::start(&lab).unwrap();
    let annotated = format!("{ANNOTATION}={V6}, {V4}");
    api.create_node(&[&annotated])
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut w = Watcher::start(&api, &d, &[]).unwrap();
    must(wait_for_pair(&d, &w, V4, V6, FOLLOW_TIMEOUT), &w);
    for family in Family::ALL {
        let kg = lab.kg(Backend::Nft, family);
        let ok = poll_until(FOLLOW_TIMEOUT, || {
            let chain = lab
                .iptables(Backend::Nft, family)
                .rules("KILO-NAT")
                .unwrap_or_default();
            snat_before_masquerade_problem(&chain, &kg, family.preferred()).is_none()
        });
        assert!(
            ok,
            "{}: SNAT directly before kg's MASQUERADE{}",
            family.name(),
            d.context()
        );
        d.must(lab.wait_for_source(family, family.preferred(), FOLLOW_TIMEOUT));
    }
    must(api.remove_annotation(), &w);
    must(wait_for_pair(&d, &w, "", "", FOLLOW_TIMEOUT), &w);
    for family in Family::ALL {
        d.must(lab.wait_for_source(family, family.primary(), FOLLOW_TIMEOUT));
    }
    stop_cleanly(&mut w);
}

#[test]
fn invalid_annotation_posts_a_warning_event_and_leaves_the_rules_byte_identical() {
    if !may_run("invalid_annotation_posts_a_warning_event_and_leaves_the_rules_byte_identical") {
        return;
    }
    let lab = Lab::new().unwrap();
    let good = format!("{ANNOTATION}={V4},{V6}");
    let (d, api) = setup(&lab, &[&good]);
    let mut w = Watcher::start(&api, &d, &[]).unwrap();
    must(wait_for_pair(&d, &w, V4, V6, FOLLOW_TIMEOUT), &w);
    let before = d.must(lab.nat_dumps(Backend::Nft));
    let generation = d.must(d.get_rules()).generation();

    let bad = format!("{V4},{V6}/64");
    must(api.annotate(&bad), &w);
    let mut notes = Vec::new();
    let warned = poll_until(FOLLOW_TIMEOUT, || {
        notes = api.event_notes(INVALID).unwrap_or_default();
        !notes.is_empty()
    });
    assert!(warned, "no {INVALID} Event{}{}", w.context(), api.context());
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert!(
        notes[0].contains(&format!("#2 \"{V6}/64\"")),
        "the Event names the bad entry: {notes:?}"
    );
    assert!(
        notes[0].contains("is a prefix, not an address"),
        "the Event names the rule it breaks: {notes:?}"
    );
    let warning = api.events().unwrap();
    assert!(
        warning
            .iter()
            .any(|e| e["reason"] == INVALID && e["type"] == "Warning"),
        "{warning:?}"
    );
    assert!(w.log().contains("is invalid"), "a log line{}", w.context());

    assert_eq!(
        d.must(lab.nat_dumps(Backend::Nft)),
        before,
        "an invalid annotation changes no rule{}",
        w.context()
    );
    let view = d.must(d.get_rules());
    assert_eq!(
        view.generation(),
        generation,
        "no SetEgress: {:#}",
        view.raw
    );
    assert_eq!((view.egress(Family::V4), view.egress(Family::V6)), (V4, V6));
    d.assert_upstream_sees(Family::V4, V4, "the last good pair stays");

    // Fixing the value applies it.
    must(api.annotate(V4), &w);
    must(wait_for_pair(&d, &w, V4, "", FOLLOW_TIMEOUT), &w);
    stop_cleanly(&mut w);
}

#[test]
fn watcher_resumes_after_410_gone_a_dropped_watch_and_an_api_server_restart() {
    if !may_run("watcher_resumes_after_410_gone_a_dropped_watch_and_an_api_server_restart") {
        return;
    }
    let lab = Lab::new().unwrap();
    let first = format!("{ANNOTATION}={V4}");
    let d = lab.start_daemon(DaemonConfig::own(Backend::Nft)).unwrap();
    let mut api = ApiServer::start(&lab).unwrap();
    // Started before its Node is registered, the watcher says what it waits for.
    let mut w = Watcher::start(&api, &d, &[]).unwrap();
    let waiting = poll_until(RECOVER_TIMEOUT, || w.log().contains("no Node of this name"));
    assert!(waiting, "the watcher names the missing Node{}", w.context());
    must(api.create_node(&[&first]), &w);
    must(wait_for_pair(&d, &w, V4, "", FOLLOW_TIMEOUT), &w);

    // 410 Gone: the watcher lists again and watches anew.
    let watches = must(api.watch_requests(), &w);
    must(api.ctl(&["expire-watches"]), &w);
    let rewatched = poll_until(RECOVER_TIMEOUT, || {
        api.watch_requests().is_ok_and(|n| n > watches)
    });
    assert!(rewatched, "no new watch after 410{}", w.context());
    must(api.annotate(V6), &w);
    must(wait_for_pair(&d, &w, "", V6, RECOVER_TIMEOUT), &w);

    // The stream ends without a word (a load balancer cut it).
    let watches = must(api.watch_requests(), &w);
    must(api.ctl(&["drop-watches"]), &w);
    let rewatched = poll_until(RECOVER_TIMEOUT, || {
        api.watch_requests().is_ok_and(|n| n > watches)
    });
    assert!(rewatched, "no new watch after the drop{}", w.context());
    must(api.annotate(&format!("{V4},{V6}")), &w);
    must(wait_for_pair(&d, &w, V4, V6, RECOVER_TIMEOUT), &w);

    // The API server restarts (empty) and the Node is registered again with a new value.
    must(api.stop(), &w);
    must(api.start_again(), &w);
    api.create_node(&[&first])
        .unwrap_or_else(|e| panic!("{e:#}{}", w.context()));
    must(wait_for_pair(&d, &w, V4, "", RECOVER_TIMEOUT), &w);
    assert!(w.is_running(), "the watcher kept running{}", w.context());
    stop_cleanly(&mut w);
}

#[test]
fn kilo_egressd_restart_gets_the_annotation_reasserted_and_no_change_is_lost() {
    if !may_run("kilo_egressd_restart_gets_the_annotation_reasserted_and_no_change_is_lost") {
        return;
    }
    let lab = Lab::new().unwrap();
    let first = format!("{ANNOTATION}={V4}");
    let (mut d, api) = setup(&lab, &[&first]);
    let mut w = Watcher::start(&api, &d, &[]).unwrap();
    must(wait_for_pair(&d, &w, V4, "", FOLLOW_TIMEOUT), &w);

    // Changed while kilo-egressd is down: retried with backoff, applied once it is back.
    let stopped = d.stop();
    d.must(stopped);
    must(api.annotate(&format!("{V4},{V6}")), &w);
    let retried = poll_until(RECOVER_TIMEOUT, || {
        w.log().contains("cannot program kilo-egressd; retrying")
    });
    assert!(retried, "the watcher retries{}", w.context());
    let started = d.start_again();
    d.must(started);
    must(wait_for_pair(&d, &w, V4, V6, RECOVER_TIMEOUT), &w);

    // kilo-egressd loses its state (cleanup, then a fresh start with MASQUERADE): the watcher
    // sees GetRules differ from the annotation and sets it again.
    let stopped = d.stop();
    d.must(stopped);
    let cleaned = d.cleanup();
    d.must(d.must(cleaned).ok());
    let started = d.start_again();
    d.must(started);
    must(wait_for_pair(&d, &w, V4, V6, RECOVER_TIMEOUT), &w);
    for family in Family::ALL {
        d.must(lab.wait_for_source(family, family.preferred(), FOLLOW_TIMEOUT));
    }
    stop_cleanly(&mut w);
}

#[test]
fn watch_once_applies_the_annotation_and_exits_2_on_an_invalid_one() {
    if !may_run("watch_once_applies_the_annotation_and_exits_2_on_an_invalid_one") {
        return;
    }
    let lab = Lab::new().unwrap();
    let first = format!("{ANNOTATION}={V6},{V4}");
    let (d, api) = setup(&lab, &[&first]);

    let out = d.must(Watcher::once(&api, &d));
    assert!(out.success(), "{out}");
    let view = d.must(d.get_rules());
    assert_eq!((view.egress(Family::V4), view.egress(Family::V6)), (V4, V6));

    let before = d.must(lab.nat_dumps(Backend::Nft));
    d.must(api.annotate("node-a.example"));
    let out = d.must(Watcher::once(&api, &d));
    assert_eq!(out.code, Some(2), "invalid annotation: exit 2: {out}");
    assert!(out.stderr.contains("is a host name"), "{out}");
    assert_eq!(d.must(lab.nat_dumps(Backend::Nft)), before);
    let notes = d.must(api.event_notes(INVALID));
    assert_eq!(notes.len(), 1, "{notes:?}");
}

#[test]
fn an_absent_address_posts_a_warning_event_and_a_normal_one_once_it_is_on_the_node() {
    if !may_run("an_absent_address_posts_a_warning_event_and_a_normal_one_once_it_is_on_the_node") {
        return;
    }
    const ABSENT_REASON: &str = "EgressAddressAbsent";
    const PRESENT_REASON: &str = "EgressAddressPresent";
    let absent = "198.51.100.99";
    let lab = Lab::new().unwrap();
    let (d, api) = setup(&lab, &[]);
    let mut w = Watcher::start(&api, &d, &[]).unwrap();

    // The cloud has not attached the address yet: the annotation is applied anyway.
    must(api.annotate(absent), &w);
    must(wait_for_pair(&d, &w, absent, "", FOLLOW_TIMEOUT), &w);
    let mut notes = Vec::new();
    let warned = poll_until(FOLLOW_TIMEOUT, || {
        notes = api.event_notes(ABSENT_REASON).unwrap_or_default();
        !notes.is_empty()
    });
    assert!(
        warned,
        "no {ABSENT_REASON} Event{}{}",
        w.context(),
        api.context()
    );
    assert!(
        notes[0].contains(&format!("{absent} is not assigned to any interface")),
        "the Event names the address: {notes:?}"
    );
    assert!(
        api.events()
            .unwrap()
            .iter()
            .any(|e| e["reason"] == ABSENT_REASON && e["type"] == "Warning"),
        "a Warning"
    );
    let specs = d.must(d.get_rules()).specs(Family::V4).join("\n");
    assert!(
        specs.contains("-j MASQUERADE") && !specs.contains("-j SNAT"),
        "MASQUERADE meanwhile: {specs}"
    );

    // Attached: SNAT to it, and a Normal Event at the watcher's next look.
    lab.node_ip(&format!("addr add {absent}/32 dev up0"))
        .unwrap();
    let back = poll_until(FOLLOW_TIMEOUT, || {
        api.event_notes(PRESENT_REASON)
            .is_ok_and(|notes| notes.iter().any(|n| n.contains(absent)))
    });
    assert!(
        back,
        "no {PRESENT_REASON} Event{}{}",
        w.context(),
        api.context()
    );
    let specs = d.must(d.get_rules()).specs(Family::V4).join("\n");
    assert!(specs.contains(&format!("--to-source {absent}")), "{specs}");
    assert_eq!(
        api.event_notes(ABSENT_REASON).unwrap().len(),
        1,
        "one Warning per transition{}",
        w.context()
    );
    stop_cleanly(&mut w);
}
