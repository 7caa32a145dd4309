//! The watcher's Prometheus metrics (`kilo-egress watch --metrics-listen`): Node watch events,
//! reconciles by outcome, SetEgress calls by result, invalid annotations, reconnects. Served by
//! [`kilo_egress_api::metrics_http`]; docs/operations.md says what each one means.

use kilo_egress_api::metrics_http::registered;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Every metric of `kilo-egress watch`.
pub struct WatchMetrics {
    registry: Registry,
    events: IntCounterVec,
    reconciles: IntCounterVec,
    set_egress: IntCounterVec,
    invalid: IntCounter,
    annotation_invalid: IntGauge,
    reconnects: IntCounterVec,
    in_sync: IntGauge,
}

impl Default for WatchMetrics {
    fn default() -> WatchMetrics {
        WatchMetrics::new()
    }
}

impl WatchMetrics {
    /// A registry with every metric, the build info and the process metrics.
    pub fn new() -> WatchMetrics {
        let registry =
            kilo_egress_api::metrics_http::registry("kilo-egress-watch", env!("CARGO_PKG_VERSION"));
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registered(&registry, metric)
        };
        let events = counter(
            "kilo_egress_watch_events_total",
            "Node watch events by type (apply, delete, init, init_done, error).",
            &["type"],
        );
        let reconciles = counter(
            "kilo_egress_watch_reconciles_total",
            "Comparisons of the annotation with kilo-egressd by outcome (unchanged, in_sync, applied, invalid, error).",
            &["outcome"],
        );
        let set_egress = counter(
            "kilo_egress_watch_set_egress_calls_total",
            "SetEgress calls to kilo-egressd by result (success, failure).",
            &["result"],
        );
        let reconnects = counter(
            "kilo_egress_watch_reconnects_total",
            "Connections made again after a failure: to the Kubernetes API (the Node watch resumes) or to kilo-egressd.",
            &["to"],
        );
        let single = |metric: IntGauge| registered(&registry, metric);
        let annotation_invalid = single(
            IntGauge::new(
                "kilo_egress_watch_annotation_invalid",
                "1 while the node annotation is invalid (what is programmed stays).",
            )
            .expect("valid metric"),
        );
        let in_sync = single(
            IntGauge::new(
                "kilo_egress_watch_in_sync",
                "1 while the last comparison with kilo-egressd succeeded (the annotation is programmed, or invalid and reported).",
            )
            .expect("valid metric"),
        );
        let invalid = IntCounter::new(
            "kilo_egress_watch_invalid_annotations_total",
            "Invalid annotation values seen (each new value once).",
        )
        .expect("valid metric");
        let invalid = registered(&registry, invalid);
        WatchMetrics {
            registry,
            events,
            reconciles,
            set_egress,
            invalid,
            annotation_invalid,
            reconnects,
            in_sync,
        }
    }

    /// The registry to serve.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// A Node watch event of `kind` arrived.
    pub fn event(&self, kind: &str) {
        self.events.with_label_values(&[kind]).inc();
    }

    /// A reconcile ended with `outcome`; `ok` says whether kilo-egressd answered.
    pub fn reconciled(&self, outcome: &str, ok: bool) {
        self.reconciles.with_label_values(&[outcome]).inc();
        self.in_sync.set(i64::from(ok));
        if outcome != "invalid" && ok {
            self.annotation_invalid.set(0);
        }
    }

    /// A SetEgress call succeeded or failed.
    pub fn set_egress(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.set_egress.with_label_values(&[result]).inc();
    }

    /// A new invalid annotation value was seen.
    pub fn invalid_annotation(&self, new_value: bool) {
        if new_value {
            self.invalid.inc();
        }
        self.annotation_invalid.set(1);
    }

    /// A connection `to` the Kubernetes API or kilo-egressd is made again after a failure.
    pub fn reconnect(&self, to: &str) {
        self.reconnects.with_label_values(&[to]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_annotation_stays_flagged_until_a_valid_one_is_handled() {
        let metrics = WatchMetrics::new();
        metrics.invalid_annotation(true);
        metrics.reconciled("invalid", true);
        metrics.invalid_annotation(false);
        metrics.reconciled("invalid", true);
        let text = kilo_egress_api::metrics_http::render(metrics.registry());
        assert!(
            text.contains("kilo_egress_watch_annotation_invalid 1"),
            "{text}"
        );
        assert!(
            text.contains("kilo_egress_watch_invalid_annotations_total 1"),
            "{text}"
        );
        metrics.reconciled("error", false);
        let text = kilo_egress_api::metrics_http::render(metrics.registry());
        assert!(
            text.contains("kilo_egress_watch_annotation_invalid 1"),
            "{text}"
        );
        assert!(text.contains("kilo_egress_watch_in_sync 0"), "{text}");
        metrics.reconciled("applied", true);
        let text = kilo_egress_api::metrics_http::render(metrics.registry());
        assert!(
            text.contains("kilo_egress_watch_annotation_invalid 0"),
            "{text}"
        );
        assert!(
            text.contains(r#"kilo_egress_watch_reconciles_total{outcome="invalid"} 2"#),
            "{text}"
        );
    }
}
