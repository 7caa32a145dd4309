//! The engine thread against the in-memory fake: coalescing, rollback, drift repair, add-only
//! switches and tidies, notifications.

use super::timers::MAX_SHADOWED_RULES;
use super::*;
use crate::rules::{self, KILO_NAT, POSTROUTING};
use crate::testing::FakeNetfilter;
use kilo_egress_api::egress::parse_egress_list;

fn own_mode() -> ModeConfig {
    ModeConfig::Own {
        source_cidrs: vec![
            "10.44.0.0/24".parse().unwrap(),
            "fd00:44::/64".parse().unwrap(),
        ],
        no_nat_cidrs: vec![],
    }
}

fn start(fake: &Arc<FakeNetfilter>, dir: &std::path::Path) -> EngineHandle {
    let config = EngineConfig::quiet(own_mode());
    Engine::start(config, fake.clone(), StateStore::new(dir)).0
}

fn set(entries: &[&str]) -> SetRequest {
    SetRequest {
        parsed: parse_egress_list(entries).unwrap(),
        dry_run: false,
        expected_generation: None,
        requester: "test".into(),
    }
}

#[tokio::test]
async fn start_programs_masquerade_and_becomes_ready() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    assert!(*handle.ready().borrow());
    let chain = fake.chain(Family::Ipv4, KILO_NAT).unwrap();
    assert!(chain[0].ends_with("-j MASQUERADE"), "{chain:?}");
    assert_eq!(fake.chain(Family::Ipv6, POSTROUTING).unwrap().len(), 1);
}

#[tokio::test]
async fn set_programs_snat_and_persists() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let g0 = handle.status().await.unwrap().generation;
    let outcome = handle
        .set(set(&["2001:db8::20", "198.51.100.20"]))
        .await
        .unwrap();
    assert_eq!(outcome.generation, g0 + 1);
    assert!(fake.chain(Family::Ipv4, KILO_NAT).unwrap()[0].ends_with("--to-source 198.51.100.20"));
    assert!(fake.chain(Family::Ipv6, KILO_NAT).unwrap()[0].ends_with("--to-source 2001:db8::20"));
    assert!(
        outcome.rules.iter().all(|r| r.in_sync),
        "{:?}",
        outcome.rules
    );
    // A restarted engine programs the stored state without any client.
    let fresh = Arc::new(FakeNetfilter::new());
    let again = start(&fresh, dir.path());
    let status = again.status().await.unwrap();
    assert_eq!(status.generation, g0 + 1);
    assert!(fresh.chain(Family::Ipv4, KILO_NAT).unwrap()[0].contains("198.51.100.20"));
}

#[tokio::test]
async fn stale_generation_is_refused_and_changes_nothing() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let g0 = handle.status().await.unwrap().generation;
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap(); // the shadowed rule is gone
    let before = fake.chain(Family::Ipv4, KILO_NAT);
    let mut stale = set(&["198.51.100.99"]);
    stale.expected_generation = Some(g0);
    let err = handle.set(stale).await.unwrap_err();
    assert!(matches!(
        err,
        EngineError::StaleGeneration {
            expected,
            current
        } if expected == g0 && current == g0 + 1
    ));
    assert_eq!(fake.chain(Family::Ipv4, KILO_NAT), before);
}

#[tokio::test]
async fn dry_run_changes_nothing() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let g0 = handle.status().await.unwrap().generation;
    let transactions = fake.transactions();
    let mut dry = set(&["198.51.100.20"]);
    dry.dry_run = true;
    let outcome = handle.set(dry).await.unwrap();
    assert!(outcome.dry_run);
    let shown: Vec<String> = outcome.rules[0]
        .rules
        .iter()
        .map(|r| r.observed.rule.spec())
        .collect();
    assert!(
        shown
            .iter()
            .any(|s| s.contains("--to-source 198.51.100.20")),
        "{shown:?}"
    );
    assert_eq!(fake.transactions(), transactions);
    assert_eq!(handle.status().await.unwrap().generation, g0);
}

#[tokio::test]
async fn concurrent_sets_are_coalesced() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let g0 = handle.status().await.unwrap().generation;
    let before = fake.transactions();
    let calls: Vec<_> = (1..=50)
        .map(|i| {
            let handle = handle.clone();
            tokio::spawn(async move { handle.set(set(&[&format!("198.51.100.{i}")])).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap().unwrap());
    }
    let used = fake.transactions() - before;
    assert!(used < 50, "50 calls cost {used} transactions");
    assert_eq!(handle.status().await.unwrap().generation, g0 + 50);
    // The calls of one batch share one report of the rules: a burst of 1,000 calls on a large
    // chain would otherwise hold 1,000 copies of it (docs/BENCHMARKS.md, peak RSS).
    let reports: std::collections::HashSet<*const [FamilyReport]> =
        outcomes.iter().map(|o| Arc::as_ptr(&o.rules)).collect();
    assert!(
        reports.len() < outcomes.len(),
        "{} calls answered with {} separate reports",
        outcomes.len(),
        reports.len()
    );
}

#[tokio::test]
async fn drift_is_repaired_at_resync() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        resync_interval: Duration::from_millis(20),
        ..EngineConfig::quiet(own_mode())
    };
    let handle = Engine::start(config, fake.clone(), StateStore::new(dir.path())).0;
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap(); // the shadowed rule is gone
    let good = fake.chain(Family::Ipv4, KILO_NAT);
    fake.tamper(Family::Ipv4, |t| {
        t.get_mut(KILO_NAT).unwrap().clear();
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while fake.chain(Family::Ipv4, KILO_NAT) != good {
        assert!(Instant::now() < deadline, "drift not repaired");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn failed_apply_rolls_back_state_and_the_family_that_succeeded() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let first = handle
        .set(set(&["198.51.100.20", "2001:db8::20"]))
        .await
        .unwrap();
    handle.status().await.unwrap(); // the shadowed rules are gone
    let saved = std::fs::read(dir.path().join("state.json")).unwrap();
    let ipv4_before = fake.chain(Family::Ipv4, KILO_NAT);
    // IPv4 applies first and succeeds; IPv6 then fails, also on a fresh read, because its
    // chains vanished (the built-in POSTROUTING cannot be recreated by a restore).
    fake.tamper(Family::Ipv6, |t| {
        t.remove(POSTROUTING);
        t.remove(KILO_NAT);
    });
    let err = handle
        .set(set(&["198.51.100.99", "2001:db8::99"]))
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::Apply(_)), "{err}");
    handle.status().await.unwrap(); // the rollback has settled
    assert_eq!(std::fs::read(dir.path().join("state.json")).unwrap(), saved);
    assert_eq!(handle.status().await.unwrap().generation, first.generation);
    assert_eq!(
        fake.chain(Family::Ipv4, KILO_NAT),
        ipv4_before,
        "IPv4 is put back to the previous state"
    );
}

#[tokio::test]
async fn rules_of_an_excluded_family_are_removed_at_start() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let first = start(&fake, dir.path());
    first
        .set(set(&["198.51.100.20", "2001:db8::20"]))
        .await
        .unwrap();
    // A status read waits for the shadowed MASQUERADE rules to be removed.
    first.status().await.unwrap();
    assert!(fake.chain(Family::Ipv6, KILO_NAT).unwrap().len() == 1);
    let config = EngineConfig {
        families: vec![Family::Ipv4],
        ..EngineConfig::quiet(own_mode())
    };
    let handle = Engine::start(config, fake.clone(), StateStore::new(dir.path())).0;
    assert_eq!(fake.chain(Family::Ipv6, KILO_NAT), Some(vec![]));
    assert!(fake.chain(Family::Ipv6, POSTROUTING).unwrap().is_empty());
    assert!(fake.chain(Family::Ipv4, KILO_NAT).unwrap()[0].contains("198.51.100.20"));
    let status = handle.status().await.unwrap();
    assert!(
        status.families[1]
            .status
            .contains("--ip-families excludes IPv6")
    );
    assert!(status.in_sync);
}

fn start_notified(fake: &Arc<FakeNetfilter>, dir: &std::path::Path) -> EngineHandle {
    start_notified_with_debounce(fake, dir, NOTIFICATION_DEBOUNCE)
}

fn start_notified_with_debounce(
    fake: &Arc<FakeNetfilter>,
    dir: &std::path::Path,
    debounce: Duration,
) -> EngineHandle {
    let config = EngineConfig {
        kernel_notifications: true,
        notification_debounce: debounce,
        ..EngineConfig::quiet(own_mode())
    };
    Engine::start(config, fake.clone(), StateStore::new(dir)).0
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// An engine on a notifying fake with SNAT to 198.51.100.20 programmed and settled.
async fn notified_engine_with_snat() -> (Arc<FakeNetfilter>, tempfile::TempDir, EngineHandle) {
    let fake = Arc::new(FakeNetfilter::with_change_notifications());
    let dir = tempfile::tempdir().unwrap();
    let handle = start_notified(&fake, dir.path());
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap();
    assert_eq!(
        fake.chain(Family::Ipv4, KILO_NAT),
        snat_only("198.51.100.20")
    );
    (fake, dir, handle)
}

fn snat_only(addr: &str) -> Option<Vec<String>> {
    let rule = rules::snat_rule(addr.parse().unwrap());
    Some(vec![rule.spec()])
}

#[tokio::test]
async fn switch_commits_add_only_then_removes_the_shadowed_rule() {
    let (fake, _dir, handle) = notified_engine_with_snat().await;
    let before = fake.committed().len();
    let outcome = handle.set(set(&["198.51.100.99"])).await.unwrap();
    assert!(outcome.rules[0].in_sync, "{:?}", outcome.rules[0]);
    wait_for("the shadowed rule to be removed", || {
        fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.99")
    })
    .await;
    let ipv4: Vec<String> = fake.committed()[before..]
        .iter()
        .filter(|(f, _)| *f == Family::Ipv4)
        .map(|(_, t)| t.clone())
        .collect();
    assert_eq!(ipv4.len(), 2, "{ipv4:#?}");
    let rule_lines = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.starts_with('-') || l.starts_with(':'))
            .map(str::to_string)
            .collect()
    };
    let commit = rule_lines(&ipv4[0]);
    assert!(
        commit.len() == 1
            && commit[0].starts_with("-I KILO-NAT 1 ")
            && commit[0].contains("198.51.100.99"),
        "the switch is one insert in front of the old rule: {commit:?}"
    );
    let tidy = rule_lines(&ipv4[1]);
    assert!(
        tidy.len() == 1 && tidy[0].starts_with("-D KILO-NAT ") && tidy[0].contains("198.51.100.20"),
        "the old rule goes afterwards: {tidy:?}"
    );
}

#[tokio::test]
async fn a_notified_change_is_repaired_without_polling() {
    let (fake, _dir, handle) = notified_engine_with_snat().await;
    fake.tamper(Family::Ipv4, |t| {
        t.get_mut(KILO_NAT).unwrap().clear();
    });
    // Both check intervals are an hour: only the notification can bring the rule back.
    wait_for("the repair", || {
        fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.20")
    })
    .await;
    let status = handle.status().await.unwrap();
    assert!(
        status
            .drift_detection
            .starts_with("nftables change notifications")
    );
}

#[tokio::test]
async fn a_foreign_change_costs_a_read_and_no_write() {
    let (fake, _dir, handle) = notified_engine_with_snat().await;
    // Let the re-check of our own write happen first.
    let status = handle.status().await.unwrap();
    assert!(status.in_sync);
    let writes = fake.transactions();
    let reads = fake.reads();
    fake.tamper(Family::Ipv4, |t| {
        t.entry("KUBE-SVC-TEST".into())
            .or_default()
            .push("-A KUBE-SVC-TEST -j RETURN".into());
    });
    wait_for("the re-check", || fake.reads() > reads).await;
    assert_eq!(
        handle.status().await.unwrap().kernel_transactions,
        status.kernel_transactions
    );
    assert_eq!(fake.transactions(), writes, "nothing of ours was wrong");
}

#[tokio::test]
async fn a_switch_on_outdated_knowledge_still_ends_right() {
    let (fake, _dir, handle) = notified_engine_with_snat().await;
    handle.status().await.unwrap();
    // A change whose notification was lost: the engine's knowledge is outdated.
    fake.tamper_silently(Family::Ipv4, |t| {
        t.insert(KILO_NAT.into(), vec!["-A KILO-NAT -j RETURN".into(); 3]);
    });
    handle.set(set(&["198.51.100.99"])).await.unwrap();
    wait_for("the chain to be right", || {
        fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.99")
    })
    .await;
}

#[tokio::test]
async fn own_notifications_keep_the_known_state_and_foreign_ones_drop_it() {
    let fake = Arc::new(FakeNetfilter::with_change_notifications());
    let dir = tempfile::tempdir().unwrap();
    // A notification that is not our own echo waits an hour for its re-check, but drops what
    // the engine knows at once: the next switch must read.
    let handle = start_notified_with_debounce(&fake, dir.path(), Duration::from_secs(3600));
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap();
    let reads = fake.reads();
    handle.set(set(&["198.51.100.99"])).await.unwrap();
    assert_eq!(
        fake.reads(),
        reads,
        "a switch after our own writes reads nothing"
    );
    handle.status().await.unwrap();
    let reads = fake.reads();
    fake.tamper(Family::Ipv4, |_| {});
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    assert!(
        fake.reads() > reads,
        "a foreign change makes the next switch read"
    );
}

#[tokio::test]
async fn a_stream_of_switches_never_piles_up_shadowed_rules() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let mut longest = 0;
    // Far less than 100 ms apart: without a bound the tidy would wait for all of them.
    for i in 0..60 {
        handle
            .set(set(&[&format!("198.51.100.{}", i % 2 + 20)]))
            .await
            .unwrap();
        longest = longest.max(fake.chain(Family::Ipv4, KILO_NAT).unwrap().len());
    }
    assert!(
        longest <= MAX_SHADOWED_RULES + 1,
        "KILO-NAT grew to {longest} rules"
    );
}

#[tokio::test]
async fn a_refused_write_stays_visible_until_a_write_succeeds() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    fake.refuse_restores(Some("iptables-restore: broken"));
    let err = handle.set(set(&["198.51.100.20"])).await.unwrap_err();
    assert!(matches!(err, EngineError::Apply(_)), "{err}");
    // The rollback found the previous rules intact: the node is healthy, but writes fail.
    let status = handle.status().await.unwrap();
    assert!(*handle.ready().borrow(), "the accepted rules are in place");
    assert!(!status.in_sync, "a failed write is not hidden: {status:?}");
    let failure = status
        .last_write_failure
        .expect("the failed write is reported");
    assert!(
        failure.what.starts_with("SetEgress ipv4=198.51.100.20"),
        "{failure:?}"
    );
    assert!(failure.error.contains("broken"), "{failure:?}");
    assert_eq!(status.last_error.as_deref(), Some(failure.error.as_str()));
    fake.refuse_restores(None);
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    let status = handle.status().await.unwrap();
    assert!(
        status.in_sync && status.last_write_failure.is_none(),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_failed_repair_is_retried_until_the_cause_clears() {
    let (fake, _dir, handle) = notified_engine_with_snat().await;
    fake.refuse_restores(Some("iptables-restore: broken"));
    fake.tamper(Family::Ipv4, |t| {
        t.get_mut(KILO_NAT).unwrap().clear();
    });
    let mut ready = handle.ready();
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|ready| !*ready))
        .await
        .expect("health turns NOT_SERVING while the repair fails")
        .unwrap();
    let status = handle.status().await.unwrap();
    assert!(!status.in_sync);
    assert!(
        status
            .last_write_failure
            .unwrap()
            .what
            .starts_with("repair (kernel change notification)"),
    );
    // Both check intervals are an hour: only the retry loop can bring the rule back.
    fake.refuse_restores(None);
    wait_for("the retried repair", || {
        fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.20")
    })
    .await;
    tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|ready| *ready))
        .await
        .expect("SERVING again")
        .unwrap();
    let status = handle.status().await.unwrap();
    assert!(
        status.in_sync && status.last_write_failure.is_none(),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_corrupt_state_file_adopts_the_pair_our_rules_program() {
    let fake = Arc::new(FakeNetfilter::new());
    let dir = tempfile::tempdir().unwrap();
    let handle = start(&fake, dir.path());
    let before = handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap();
    let rules = fake.chain(Family::Ipv4, KILO_NAT);
    std::fs::write(dir.path().join("state.json"), b"garbage").unwrap();
    let again = start(&fake, dir.path());
    let status = again.status().await.unwrap();
    assert_eq!(status.addrs.ipv4, Some("198.51.100.20".parse().unwrap()));
    assert_eq!(status.addrs.ipv6, None);
    assert!(status.generation > before.generation, "{status:?}");
    assert_eq!(fake.chain(Family::Ipv4, KILO_NAT), rules, "the SNAT stays");
    let stored = std::fs::read_to_string(dir.path().join("state.json")).unwrap();
    assert!(
        stored.contains("198.51.100.20"),
        "a fresh state file: {stored}"
    );
}

#[tokio::test]
async fn polling_reads_the_chains_only_when_the_table_shape_changed() {
    // Every chain read burns 5 ms of CPU, as on a busy legacy node, so the backstop read is 5 s
    // away (20 ms for both families, at 80 % of 0.5 % of a core) and the shape decides alone.
    let fake = Arc::new(FakeNetfilter::with_table_shapes(Duration::from_millis(5)));
    let dir = tempfile::tempdir().unwrap();
    let config = EngineConfig {
        resync_interval: Duration::from_millis(10),
        ..EngineConfig::quiet(own_mode())
    };
    let handle = Engine::start(config, fake.clone(), StateStore::new(dir.path())).0;
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap();
    let good = fake.chain(Family::Ipv4, KILO_NAT);
    // Our own writes changed the shape, but the table knows what it wrote: no read for them.
    let settled = fake.reads();
    tokio::time::sleep(Duration::from_millis(300)).await; // 30 polls
    assert_eq!(
        fake.reads(),
        settled,
        "30 polls of an unchanged table read chains"
    );

    fake.tamper_silently(Family::Ipv4, |t| {
        t.get_mut(KILO_NAT).unwrap().clear();
    });
    wait_for("the flushed chain repaired", || {
        fake.chain(Family::Ipv4, KILO_NAT) == good
    })
    .await;
    let detection = handle.status().await.unwrap().drift_detection;
    assert!(
        detection.contains("the table's shape every 10ms"),
        "{detection}"
    );
}

/// One sample of `name{labels}` in the engine's metrics, 0 when absent.
fn metric(handle: &EngineHandle, series: &str) -> f64 {
    let text = kilo_egress_api::metrics_http::render(handle.metrics().registry());
    kilo_egress_tests::prom::count(&text, series)
}

#[tokio::test]
async fn metrics_count_switches_per_family_repairs_and_failures() {
    let fake = Arc::new(FakeNetfilter::with_change_notifications());
    let dir = tempfile::tempdir().unwrap();
    let handle = start_notified(&fake, dir.path());
    let v4_ok = r#"kilo_egress_iptables_restore_total{ip_family="IPv4",result="success"}"#;
    let v6_ok = r#"kilo_egress_iptables_restore_total{ip_family="IPv6",result="success"}"#;
    let v4_failed = r#"kilo_egress_iptables_restore_total{ip_family="IPv4",result="failure"}"#;
    handle.status().await.unwrap();
    let (v4, v6) = (metric(&handle, v4_ok), metric(&handle, v6_ok));
    assert!(v4 >= 1.0 && v6 >= 1.0, "the start wrote both families");

    // A switch of IPv4 only: IPv4's transactions grow, IPv6's do not.
    handle.set(set(&["198.51.100.20"])).await.unwrap();
    handle.status().await.unwrap();
    assert!(metric(&handle, v4_ok) > v4);
    assert_eq!(metric(&handle, v6_ok), v6);
    let snat = r#"kilo_egress_decision_info{action="SNAT",address="198.51.100.20",address_present="true",chosen="198.51.100.20",ip_family="IPv4"}"#;
    assert_eq!(metric(&handle, snat), 1.0);
    assert_eq!(
        metric(&handle, r#"kilo_egress_owned_rules{ip_family="IPv4"}"#),
        2.0
    );

    // A tamper is repaired and counted by kind.
    fake.tamper(Family::Ipv4, |t| t.get_mut(KILO_NAT).unwrap().clear());
    let repairs = r#"kilo_egress_drift_repairs_total{cause="missing_rule",ip_family="IPv4"}"#;
    wait_for("the repair to be counted", || {
        metric(&handle, repairs) == 1.0
    })
    .await;

    // Failing restores: a failed SetEgress counts a failure and degrades the write path.
    fake.refuse_restores(Some("iptables-restore: line 2 failed"));
    handle.set(set(&["198.51.100.21"])).await.unwrap_err();
    assert!(metric(&handle, v4_failed) >= 1.0);
    wait_for("the degraded gauge", || {
        metric(&handle, "kilo_egress_write_path_degraded") == 1.0
            && metric(&handle, r#"kilo_egress_in_sync{ip_family="IPv4"}"#) == 0.0
    })
    .await;
    fake.refuse_restores(None);
    handle.set(set(&["198.51.100.21"])).await.unwrap();
    wait_for("the write path to recover", || {
        metric(&handle, "kilo_egress_write_path_degraded") == 0.0
            && metric(&handle, r#"kilo_egress_in_sync{ip_family="IPv4"}"#) == 1.0
    })
    .await;
    assert_eq!(
        metric(&handle, snat),
        0.0,
        "the old decision's series is gone"
    );
}
