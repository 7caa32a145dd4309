//! kilo-egressd's Prometheus metrics: one [`Metrics`] per process, fed by the engine (syncs,
//! transactions, repairs, the decision and whether it holds) and by the gRPC layer ([`grpc`]:
//! SetEgress calls by code and caller), served by `--metrics-listen`
//! ([`kilo_egress_api::metrics_http`]). Names follow kube-proxy's and felix's conventions;
//! docs/operations.md says what each one means and which alerts to set.

pub mod grpc;

use kilo_egress_api::egress::Family;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use kilo_egress_api::metrics_http::registered;

/// The `ip_family` label of `family`, as kube-proxy spells it.
pub fn family_label(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

/// What one managed family programs and whether it holds, as the engine knows it after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyState {
    /// The family.
    pub family: Family,
    /// The address SetEgress chose, if any.
    pub chosen: Option<IpAddr>,
    /// The SNAT address programmed, or `None` for MASQUERADE.
    pub programmed: Option<IpAddr>,
    /// Whether the chosen address is on the node; `None` when none is chosen.
    pub present: Option<bool>,
    /// Whether the accepted rules are in the kernel and nothing waits or fails.
    pub in_sync: bool,
}

/// Every metric kilo-egressd exports, registered in one registry.
pub struct Metrics {
    registry: Registry,
    sync_duration: HistogramVec,
    restores: IntCounterVec,
    drift_repairs: IntCounterVec,
    chain_rules: IntGaugeVec,
    owned_rules: IntGaugeVec,
    decision: IntGaugeVec,
    address_absent: IntGaugeVec,
    in_sync: IntGaugeVec,
    last_sync: IntGaugeVec,
    write_path_degraded: IntGauge,
    address_following: IntGauge,
    state_save_failures: IntCounter,
    conntrack_deleted: IntCounterVec,
    conntrack_failures: IntCounterVec,
    set_egress: IntCounterVec,
    /// The label values of each family's decision series, to replace it when it changes.
    decisions: Mutex<BTreeMap<Family, [String; 4]>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registered(registry, metric)
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registered(registry, metric)
}

impl Metrics {
    /// A registry with every metric, the build info and the process metrics.
    pub fn new() -> Metrics {
        let registry =
            kilo_egress_api::metrics_http::registry("kilo-egressd", env!("CARGO_PKG_VERSION"));
        let sync_duration = HistogramVec::new(
            HistogramOpts::new(
                "kilo_egress_sync_duration_seconds",
                "How long one reconcile of a family took: read (when needed), plan, and write.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
            &["ip_family"],
        )
        .expect("valid metric");
        let sync_duration = registered(&registry, sync_duration);
        let r = &registry;
        let single = |name: &str, help: &str| {
            registered(r, IntGauge::new(name, help).expect("valid metric"))
        };
        let write_path_degraded = single(
            "kilo_egress_write_path_degraded",
            "1 from a failed write (kernel transaction or state file) until a later write of that kind succeeds.",
        );
        let address_following = single(
            "kilo_egress_address_following",
            "1 while the node's addresses are followed; 0 means every egress address counts as present.",
        );
        let state_save_failures = IntCounter::new(
            "kilo_egress_state_save_failures_total",
            "State-file writes that failed.",
        )
        .expect("valid metric");
        let state_save_failures = registered(r, state_save_failures);
        Metrics {
            sync_duration,
            restores: counter(
                r,
                "kilo_egress_iptables_restore_total",
                "Kernel transactions (iptables-restore runs) by family and result.",
                &["ip_family", "result"],
            ),
            drift_repairs: counter(
                r,
                "kilo_egress_drift_repairs_total",
                "Repairs of rules changed by someone else, by family and kind of drift repaired.",
                &["ip_family", "cause"],
            ),
            chain_rules: gauge(
                r,
                "kilo_egress_iptables_rules",
                "Rules in the chain after the last reconcile, all writers.",
                &["ip_family", "chain"],
            ),
            owned_rules: gauge(
                r,
                "kilo_egress_owned_rules",
                "Rules of kilo-egressd in the nat table after the last reconcile.",
                &["ip_family"],
            ),
            decision: gauge(
                r,
                "kilo_egress_decision_info",
                "Always 1 for the decision each managed family programs: action SNAT (to address) or MASQUERADE, the chosen address and whether it is on the node.",
                &[
                    "ip_family",
                    "action",
                    "address",
                    "chosen",
                    "address_present",
                ],
            ),
            address_absent: gauge(
                r,
                "kilo_egress_address_absent",
                "1 while the chosen address of the family is not on the node (MASQUERADE meanwhile, or no egress with --absent-address keep).",
                &["ip_family"],
            ),
            in_sync: gauge(
                r,
                "kilo_egress_in_sync",
                "1 while the accepted decision is in the kernel and no write of the family fails or waits for Kilo's agent.",
                &["ip_family"],
            ),
            last_sync: gauge(
                r,
                "kilo_egress_last_sync_success_timestamp_seconds",
                "When a reconcile of the family last succeeded (Unix time).",
                &["ip_family"],
            ),
            conntrack_deleted: counter(
                r,
                "kilo_egress_conntrack_entries_deleted_total",
                "Conntrack entries of an old decision deleted after a switch (--conntrack-flush).",
                &["ip_family"],
            ),
            conntrack_failures: counter(
                r,
                "kilo_egress_conntrack_flush_failures_total",
                "Deletions of an old decision's conntrack entries that failed (--conntrack-flush).",
                &["ip_family"],
            ),
            set_egress: counter(
                r,
                "kilo_egress_set_egress_requests_total",
                "SetEgress calls by gRPC code and caller kind (unix, tcp, tls).",
                &["grpc_code", "caller"],
            ),
            write_path_degraded,
            address_following,
            state_save_failures,
            decisions: Mutex::new(BTreeMap::new()),
            registry,
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Starts the counters of a managed family at 0, so rates and increases work from the first
    /// scrape on.
    pub fn managed(&self, family: Family) {
        let label = family_label(family);
        for result in ["success", "failure"] {
            self.restores.with_label_values(&[label, result]);
        }
        self.conntrack_deleted.with_label_values(&[label]);
        self.conntrack_failures.with_label_values(&[label]);
    }

    /// One reconcile of `family` took `took`; on success the family's rule counts are
    /// `chain_rules` in KILO-NAT (`None`: no chain) and `owned_rules` of ours.
    pub fn synced(&self, family: Family, took: Duration, rules: Option<(Option<usize>, usize)>) {
        let label = family_label(family);
        self.sync_duration(family).observe(took.as_secs_f64());
        let Some((chain_rules, owned_rules)) = rules else {
            return;
        };
        let chain = self
            .chain_rules
            .with_label_values(&[label, crate::rules::KILO_NAT]);
        chain.set(chain_rules.unwrap_or(0) as i64);
        self.owned_rules
            .with_label_values(&[label])
            .set(owned_rules as i64);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.last_sync
            .with_label_values(&[label])
            .set(now.as_secs() as i64);
    }

    fn sync_duration(&self, family: Family) -> Histogram {
        self.sync_duration
            .with_label_values(&[family_label(family)])
    }

    /// A kernel transaction of `family` was committed (`ok`) or refused.
    pub fn restored(&self, family: Family, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.restores
            .with_label_values(&[family_label(family), result])
            .inc();
    }

    /// Drift of `family` was repaired; `causes` are the kinds of drift it fixed.
    pub fn repaired(&self, family: Family, causes: impl IntoIterator<Item = &'static str>) {
        for cause in causes {
            self.drift_repairs
                .with_label_values(&[family_label(family), cause])
                .inc();
        }
    }

    /// The state file could not be written.
    pub fn state_save_failed(&self) {
        self.state_save_failures.inc();
    }

    /// `count` conntrack entries of `family` were deleted.
    pub fn conntrack_deleted(&self, family: Family, count: usize) {
        self.conntrack_deleted
            .with_label_values(&[family_label(family)])
            .inc_by(count as u64);
    }

    /// Deleting the conntrack entries of an old decision of `family` failed.
    pub fn conntrack_flush_failed(&self, family: Family) {
        self.conntrack_failures
            .with_label_values(&[family_label(family)])
            .inc();
    }

    /// A SetEgress call ended with `code` for a `caller` kind.
    pub fn set_egress(&self, code: &str, caller: &str) {
        self.set_egress.with_label_values(&[code, caller]).inc();
    }

    /// The engine's view after a step: each managed family, whether the write path is degraded,
    /// whether addresses are followed.
    pub fn observe(&self, families: &[FamilyState], degraded: bool, following: bool) {
        self.write_path_degraded.set(i64::from(degraded));
        self.address_following.set(i64::from(following));
        let mut decisions = self.decisions.lock().expect("metrics lock");
        for state in families {
            let label = family_label(state.family);
            self.in_sync
                .with_label_values(&[label])
                .set(i64::from(state.in_sync));
            let absent = state.present == Some(false);
            self.address_absent
                .with_label_values(&[label])
                .set(i64::from(absent));
            let labels = decision_labels(state);
            if decisions.get(&state.family) == Some(&labels) {
                continue;
            }
            if let Some(old) = decisions.insert(state.family, labels.clone()) {
                let _ = self.decision.remove_label_values(&label_refs(label, &old));
            }
            self.decision
                .with_label_values(&label_refs(label, &labels))
                .set(1);
        }
    }
}

/// The decision series' labels after `ip_family`: action, address, chosen, address_present.
fn decision_labels(state: &FamilyState) -> [String; 4] {
    let text = |addr: Option<IpAddr>| addr.map(|a| a.to_string()).unwrap_or_default();
    let action = if state.programmed.is_some() {
        "SNAT"
    } else {
        "MASQUERADE"
    };
    let present = match state.present {
        Some(true) => "true",
        Some(false) => "false",
        None => "",
    };
    [
        action.to_string(),
        text(state.programmed),
        text(state.chosen),
        present.to_string(),
    ]
}

fn label_refs<'a>(family: &'a str, rest: &'a [String; 4]) -> [&'a str; 5] {
    [family, &rest[0], &rest[1], &rest[2], &rest[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(metrics: &Metrics) -> String {
        kilo_egress_api::metrics_http::render(metrics.registry())
    }

    #[test]
    fn a_changed_decision_replaces_the_series_of_its_family_only() {
        let metrics = Metrics::new();
        let v4 = |programmed: Option<&str>, present| FamilyState {
            family: Family::Ipv4,
            chosen: Some("198.51.100.20".parse().unwrap()),
            programmed: programmed.map(|a| a.parse().unwrap()),
            present: Some(present),
            in_sync: true,
        };
        let v6 = FamilyState {
            family: Family::Ipv6,
            chosen: None,
            programmed: None,
            present: None,
            in_sync: false,
        };
        metrics.observe(&[v4(Some("198.51.100.20"), true), v6.clone()], false, true);
        let before = text(&metrics);
        assert!(before.contains(r#"kilo_egress_decision_info{action="SNAT",address="198.51.100.20",address_present="true",chosen="198.51.100.20",ip_family="IPv4"} 1"#), "{before}");
        assert!(before.contains(r#"kilo_egress_decision_info{action="MASQUERADE",address="",address_present="",chosen="",ip_family="IPv6"} 1"#), "{before}");
        assert!(
            before.contains(r#"kilo_egress_in_sync{ip_family="IPv6"} 0"#),
            "{before}"
        );
        metrics.observe(&[v4(None, false), v6], true, true);
        let after = text(&metrics);
        assert!(
            !after.contains(r#"action="SNAT""#),
            "the old series stays: {after}"
        );
        assert!(after.contains(r#"kilo_egress_decision_info{action="MASQUERADE",address="",address_present="false",chosen="198.51.100.20",ip_family="IPv4"} 1"#), "{after}");
        assert!(
            after.contains(r#"kilo_egress_address_absent{ip_family="IPv4"} 1"#),
            "{after}"
        );
        assert!(
            after.contains("kilo_egress_write_path_degraded 1"),
            "{after}"
        );
        assert_eq!(
            after.matches("kilo_egress_decision_info{").count(),
            2,
            "{after}"
        );
    }

    #[test]
    fn counters_count_per_label() {
        let metrics = Metrics::new();
        metrics.restored(Family::Ipv4, true);
        metrics.restored(Family::Ipv4, false);
        metrics.repaired(Family::Ipv6, ["missing_rule", "order"]);
        metrics.synced(Family::Ipv4, Duration::from_millis(3), Some((Some(5), 1)));
        let text = text(&metrics);
        for line in [
            r#"kilo_egress_iptables_restore_total{ip_family="IPv4",result="success"} 1"#,
            r#"kilo_egress_iptables_restore_total{ip_family="IPv4",result="failure"} 1"#,
            r#"kilo_egress_drift_repairs_total{cause="missing_rule",ip_family="IPv6"} 1"#,
            r#"kilo_egress_iptables_rules{chain="KILO-NAT",ip_family="IPv4"} 5"#,
            r#"kilo_egress_owned_rules{ip_family="IPv4"} 1"#,
            r#"kilo_egress_sync_duration_seconds_count{ip_family="IPv4"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing in {text}");
        }
        assert!(!text.contains(r#"ip_family="IPv6",result="#), "{text}");
    }
}
