//! What can go wrong in the engine, typed: a family the kernel refused ([`FamilyError`]), why a
//! SetEgress request failed ([`EngineError`]), and why a reconcile ran ([`Trigger`]).

use kilo_egress_api::egress::Family;
use std::fmt;
use std::sync::Arc;

use crate::netfilter::NetfilterError;
use crate::state::StateError;

/// Reading or writing one family failed.
#[derive(Debug, thiserror::Error)]
#[error("{family}: {source}")]
pub struct FamilyError {
    /// The family.
    pub family: Family,
    /// What the iptables tools or the kernel said.
    #[source]
    pub source: NetfilterError,
}

/// Why a SetEgress request failed. Cheap to clone: every request of a batch gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// `expected_generation` did not match.
    #[error(
        "generation is {current}, not the expected {expected}; read the current state (GetRules) and retry"
    )]
    StaleGeneration {
        /// What the caller expected.
        expected: u64,
        /// The current generation.
        current: u64,
    },
    /// The kernel refused the change; the previous state stays programmed.
    #[error("applying the rules failed, the previous egress state stays in place: {0}")]
    Apply(#[source] Arc<FamilyError>),
    /// The state could not be saved; nothing was changed.
    #[error("saving the state failed, nothing was changed: {0}")]
    State(#[source] Arc<StateError>),
    /// The engine is not running.
    #[error("the engine has stopped")]
    Stopped,
}

impl From<FamilyError> for EngineError {
    fn from(error: FamilyError) -> EngineError {
        EngineError::Apply(Arc::new(error))
    }
}

impl From<StateError> for EngineError {
    fn from(error: StateError) -> EngineError {
        EngineError::State(Arc::new(error))
    }
}

/// Why the engine reads the kernel and repairs what it finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// The engine started: the stored state is programmed.
    Start,
    /// The periodic check (safety check, or a poll without notifications).
    DriftCheck,
    /// A change notification named the family.
    KernelNotification,
    /// A SetEgress failed: the previous state is re-asserted.
    Rollback,
    /// The last apply of the accepted state failed: it is tried again.
    Retry,
    /// A chosen address appeared on or left the node.
    AddressChange,
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trigger::Start => "start",
            Trigger::DriftCheck => "drift check",
            Trigger::KernelNotification => "kernel change notification",
            Trigger::Rollback => "rollback",
            Trigger::Retry => "retry",
            Trigger::AddressChange => "address change",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_family_and_keep_the_cause() {
        let error = EngineError::from(FamilyError {
            family: Family::Ipv6,
            source: NetfilterError::Restore {
                command: "ip6tables-restore".into(),
                stderr: "line 2 failed".into(),
                context: String::new(),
            },
        });
        assert_eq!(
            error.to_string(),
            "applying the rules failed, the previous egress state stays in place: IPv6: ip6tables-restore refused the transaction (nothing applied): line 2 failed"
        );
        let cause = std::error::Error::source(&error).expect("a source");
        assert!(cause.to_string().starts_with("IPv6: "), "{cause}");
    }
}
