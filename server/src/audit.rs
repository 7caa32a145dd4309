//! The audit trail of SetEgress: one structured log line (target `kilo_egressd::audit`) per
//! call, whether accepted, rejected as invalid, denied or failed, naming the caller, the request,
//! the outcome and the pair and generation in force afterwards. With `--log-format json` each
//! line is one JSON object whose fields are those of [`SetEgressAudit`].

use kilo_egress_api::egress::EgressAddrs;
use kilo_egress_api::pb;

use crate::peer::PeerInfo;

/// The log target of audit lines.
pub const TARGET: &str = "kilo_egressd::audit";

/// How a SetEgress call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The pair was stored and programmed (or, with `dry_run`, previewed: nothing changed).
    Accepted,
    /// The request was malformed (`INVALID_ARGUMENT`); nothing changed.
    Invalid,
    /// The caller may not write (`PERMISSION_DENIED`); nothing changed.
    Denied,
    /// The engine refused or failed (stale generation, apply error); see `reason`.
    Failed,
}

impl Outcome {
    /// `accepted`, `invalid`, `denied` or `failed`.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Invalid => "invalid",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One audited SetEgress call.
#[derive(Debug)]
pub struct SetEgressAudit<'a> {
    /// The connection it came on (`None` outside the server's listeners).
    pub peer: Option<&'a PeerInfo>,
    /// The client's user agent, if sent.
    pub user_agent: Option<&'a str>,
    /// The request as received.
    pub request: &'a pb::SetEgressRequest,
    /// How it ended.
    pub outcome: Outcome,
    /// Why it was not accepted; empty when it was.
    pub reason: String,
    /// The pair and generation in force after the call, when known.
    pub result: Option<(EgressAddrs, u64)>,
}

impl SetEgressAudit<'_> {
    /// Emits the audit line.
    pub fn log(&self) {
        let identity = self
            .peer
            .map_or_else(|| "unknown".to_string(), PeerInfo::identity);
        let peer = self
            .peer
            .map_or_else(|| "unknown".to_string(), ToString::to_string);
        let remote = self
            .peer
            .and_then(PeerInfo::remote)
            .map(|r| r.to_string())
            .unwrap_or_default();
        let request = serde_json::to_string(self.request).unwrap_or_default();
        let (ipv4, ipv6, generation) = match &self.result {
            Some((addrs, generation)) => (
                addrs.ipv4.map(|a| a.to_string()).unwrap_or_default(),
                addrs.ipv6.map(|a| a.to_string()).unwrap_or_default(),
                Some(*generation),
            ),
            None => (String::new(), String::new(), None),
        };
        tracing::info!(
            target: TARGET,
            audit = "SetEgress",
            identity = %identity,
            peer = %peer,
            remote = %remote,
            connection = self.peer.map(|p| p.connection),
            user_agent = self.user_agent.unwrap_or_default(),
            request = %request,
            dry_run = self.request.dry_run,
            outcome = self.outcome.name(),
            reason = %self.reason,
            egress_ipv4 = %ipv4,
            egress_ipv6 = %ipv6,
            generation,
            "SetEgress {}",
            self.outcome.name()
        );
    }
}
