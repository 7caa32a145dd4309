//! Whether the rules are in place: the last apply error (logged once per distinct error, and
//! once more when the rules are back), the time of the last successful apply, and the readiness
//! signal that health checks follow.

use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;
use tracing::{error, info};

use super::error::FamilyError;

/// The outcome of the engine's applies, as operators see it.
pub struct ApplyHealth {
    last_error: Option<Arc<FamilyError>>,
    last_apply: Option<SystemTime>,
    ready: watch::Sender<bool>,
}

impl ApplyHealth {
    /// Not ready, nothing applied yet; `ready` turns true at the first success.
    pub fn new(ready: watch::Sender<bool>) -> ApplyHealth {
        ApplyHealth {
            last_error: None,
            last_apply: None,
            ready,
        }
    }

    /// An apply succeeded.
    pub fn succeeded(&mut self) {
        if let Some(previous) = self.last_error.take() {
            info!(%previous, "rules are in place again");
        }
        self.last_apply = Some(SystemTime::now());
        self.ready.send_replace(true);
    }

    /// An apply failed; logged unless it is the same failure as last time.
    pub fn failed(&mut self, failure: Arc<FamilyError>) {
        let message = failure.to_string();
        if self.last_error.as_ref().map(ToString::to_string) != Some(message.clone()) {
            error!(error = %message, "applying the egress rules failed; retrying at the next check");
        }
        self.last_error = Some(failure);
    }

    /// The last failure, while it lasts.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.as_ref().map(ToString::to_string)
    }

    /// When rules were last applied successfully.
    pub fn last_apply(&self) -> Option<SystemTime> {
        self.last_apply
    }
}
