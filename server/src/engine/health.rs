//! Whether the rules are in place, and whether writes work: the service is healthy while the
//! accepted rules are in the kernel (the last reconcile of the accepted state succeeded), and its
//! write path is degraded from a failed write until a later write succeeds. Each failure is logged
//! once per distinct error, and once more when it is over.

use kilo_egress_api::egress::Family;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;
use tracing::{error, info};

use super::error::FamilyError;

/// A write that failed (to the kernel, or to the state file), kept until a later write of the
/// same kind succeeds.
#[derive(Debug, Clone)]
pub struct WriteFailure {
    /// What was being written, e.g. `SetEgress ipv4=198.51.100.20 ipv6=MASQUERADE` or
    /// `repair (drift check)`.
    pub what: String,
    /// When it failed.
    pub at: SystemTime,
    /// Why.
    pub error: String,
    /// The family the kernel refused, or `None` for the state file.
    pub family: Option<Family>,
}

/// The outcome of the engine's applies, as operators see it.
pub struct ApplyHealth {
    /// The failure that keeps the accepted rules out of the kernel, while it lasts.
    failing: Option<Arc<FamilyError>>,
    /// The last write that failed, while no write has succeeded since.
    last_write_failure: Option<WriteFailure>,
    last_apply: Option<SystemTime>,
    /// True while the accepted rules are in the kernel (gRPC health SERVING).
    ready: watch::Sender<bool>,
}

impl ApplyHealth {
    /// Not ready, nothing applied yet; `ready` turns true at the first success.
    pub fn new(ready: watch::Sender<bool>) -> ApplyHealth {
        ApplyHealth {
            failing: None,
            last_write_failure: None,
            last_apply: None,
            ready,
        }
    }

    /// The accepted state was reconciled: its rules are in the kernel (or wait for Kilo's
    /// agent). `written` are the families a transaction was committed to on the way.
    pub fn reconciled(&mut self, written: &BTreeSet<Family>) {
        if let Some(previous) = self.failing.take() {
            info!(%previous, "rules are in place again");
        }
        self.wrote(written);
        self.last_apply = Some(SystemTime::now());
        self.ready.send_replace(true);
    }

    /// Transactions were committed to `written`: writes to those families work (again), which
    /// ends a degraded write path of one of them.
    pub fn wrote(&mut self, written: &BTreeSet<Family>) {
        if self
            .last_write_failure
            .as_ref()
            .is_some_and(|f| f.family.is_some_and(|family| written.contains(&family)))
        {
            let previous = self.last_write_failure.take().expect("checked above");
            info!(what = %previous.what, error = %previous.error, "writes succeed again");
        }
    }

    /// Reconciling the accepted state failed: its rules may not be in the kernel. Health turns
    /// NOT_SERVING until a retry succeeds.
    pub fn reconcile_failed(&mut self, what: String, failure: Arc<FamilyError>) {
        let message = failure.to_string();
        if self.failing.as_ref().map(ToString::to_string) != Some(message.clone()) {
            error!(error = %message, %what, "applying the egress rules failed; retrying with backoff");
        }
        self.failing = Some(failure.clone());
        self.write_refused(what, failure);
        self.ready.send_replace(false);
    }

    /// A write was refused; the accepted rules stay as they were (a failed SetEgress).
    pub fn write_refused(&mut self, what: String, error: Arc<FamilyError>) {
        self.last_write_failure = Some(WriteFailure {
            what,
            at: SystemTime::now(),
            error: error.to_string(),
            family: Some(error.family),
        });
    }

    /// The state file could not be written; nothing was changed.
    pub fn save_failed(&mut self, what: String, error: &dyn std::fmt::Display) {
        self.last_write_failure = Some(WriteFailure {
            what,
            at: SystemTime::now(),
            error: format!("saving the state failed: {error}"),
            family: None,
        });
    }

    /// The state file was written: a failure to write it is over.
    pub fn saved(&mut self) {
        if self
            .last_write_failure
            .as_ref()
            .is_some_and(|f| f.family.is_none())
        {
            let previous = self.last_write_failure.take().expect("checked above");
            info!(what = %previous.what, error = %previous.error, "the state file is written again");
        }
    }

    /// Whether the accepted rules are known not to be in the kernel.
    pub fn is_failing(&self) -> bool {
        self.failing.is_some()
    }

    /// The family whose failure keeps the accepted rules out of the kernel, while it lasts.
    pub fn failing_family(&self) -> Option<Family> {
        self.failing.as_ref().map(|f| f.family)
    }

    /// The last write that failed, while no write has succeeded since.
    pub fn last_write_failure(&self) -> Option<&WriteFailure> {
        self.last_write_failure.as_ref()
    }

    /// When rules were last applied successfully.
    pub fn last_apply(&self) -> Option<SystemTime> {
        self.last_apply
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::NetfilterError;

    fn failure() -> Arc<FamilyError> {
        Arc::new(FamilyError {
            family: Family::Ipv4,
            source: NetfilterError::Restore {
                command: "iptables-restore".into(),
                stderr: "broken".into(),
                context: String::new(),
            },
        })
    }

    #[test]
    fn a_refused_write_stays_visible_until_a_write_succeeds() {
        let (ready, watch) = watch::channel(false);
        let mut health = ApplyHealth::new(ready);
        let (none, ipv4, ipv6) = (
            BTreeSet::new(),
            BTreeSet::from([Family::Ipv4]),
            BTreeSet::from([Family::Ipv6]),
        );
        health.reconciled(&ipv4);
        health.write_refused("SetEgress".into(), failure());
        health.reconciled(&none);
        assert!(*watch.borrow(), "the accepted rules are in place");
        health.reconciled(&ipv6);
        assert_eq!(
            health.last_write_failure().unwrap().what,
            "SetEgress",
            "a write to another family proves nothing"
        );
        health.reconciled(&ipv4);
        assert!(health.last_write_failure().is_none());
    }

    #[test]
    fn a_failed_reconcile_is_not_serving_until_a_retry_succeeds() {
        let (ready, watch) = watch::channel(false);
        let mut health = ApplyHealth::new(ready);
        let ipv4 = BTreeSet::from([Family::Ipv4]);
        health.reconciled(&ipv4);
        health.reconcile_failed("repair (drift check)".into(), failure());
        assert!(!*watch.borrow());
        assert!(health.is_failing());
        health.reconciled(&ipv4);
        assert!(*watch.borrow());
        assert!(!health.is_failing() && health.last_write_failure().is_none());
    }
}
