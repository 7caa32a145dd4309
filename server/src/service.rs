//! The gRPC service `kilo.egress.v1.EgressService`: converts each request once into a validated
//! domain value (or an `INVALID_ARGUMENT` status naming the bad entry), hands it to the engine,
//! and converts the engine's answer back into wire types. SetEgress is authorized ([`crate::authz`])
//! and audited ([`crate::audit`]).

use kilo_egress_api::egress::{EgressAddrs, parse_egress_list};
use kilo_egress_api::pb::{self, egress_service_server::EgressService};
use tonic::{Request, Response, Status};

use crate::audit::{Outcome, SetEgressAudit};
use crate::authz::Authorizer;
use crate::engine::{EngineError, EngineHandle, FamilyReport, SetRequest, StatusReport};
use crate::peer::PeerInfo;

/// The gRPC front of the engine.
pub struct EgressApi {
    engine: EngineHandle,
    authorizer: Authorizer,
}

impl EgressApi {
    /// A service that forwards to `engine`, with no TLS writers.
    pub fn new(engine: EngineHandle) -> EgressApi {
        EgressApi::with_authorizer(engine, Authorizer::default())
    }

    /// A service that forwards to `engine` and lets `authorizer` decide who may write.
    pub fn with_authorizer(engine: EngineHandle, authorizer: Authorizer) -> EgressApi {
        EgressApi { engine, authorizer }
    }

    /// The pair and generation in force now, for the audit line of a call that changed nothing.
    fn current(&self) -> Option<(EgressAddrs, u64)> {
        Some(self.engine.accepted())
    }
}

fn user_agent<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("user-agent")
        .and_then(|v| v.to_str().ok())
}

/// Describes who sent a request: unix peer credentials, TCP address or certificate names, plus
/// the user agent.
pub fn requester<T>(request: &Request<T>) -> String {
    let peer = PeerInfo::of(request).map_or_else(|| "unknown".to_string(), ToString::to_string);
    match user_agent(request) {
        Some(agent) => format!("{peer} ({agent})"),
        None => peer,
    }
}

impl From<EngineError> for Status {
    fn from(error: EngineError) -> Status {
        match error {
            EngineError::StaleGeneration { .. } => Status::failed_precondition(error.to_string()),
            EngineError::Stopped => Status::unavailable(error.to_string()),
            EngineError::Apply(_) | EngineError::State(_) => Status::internal(error.to_string()),
        }
    }
}

fn family_rules(report: &FamilyReport) -> pb::FamilyRules {
    pb::FamilyRules {
        family: pb::Family::from(report.family) as i32,
        rules: report
            .rules
            .iter()
            .map(|r| pb::Rule {
                chain: r.observed.rule.chain.to_string(),
                spec: r.observed.rule.spec(),
                packets: r.observed.packets,
                bytes: r.observed.bytes,
                owned: r.owned,
            })
            .collect(),
        in_sync: report.in_sync,
        status: report.status.clone(),
        address_absent: report.address_absent,
    }
}

/// The wire form of a status report.
pub fn rules_response(report: &StatusReport) -> pb::GetRulesResponse {
    pb::GetRulesResponse {
        egress: Some(pb::EgressPair::from(&report.addrs)),
        generation: report.generation,
        mode: pb::Mode::from(report.mode) as i32,
        families: report.families.iter().map(family_rules).collect(),
        in_sync: report.in_sync,
        last_error: report.last_error.clone().unwrap_or_default(),
        last_apply_time: report.last_apply.map(timestamp),
        backend: report.backend.to_string(),
        backend_reason: report.backend_reason.clone(),
        drift_detection: report.drift_detection.clone(),
        address_presence: report.address_presence.clone(),
        random_fully: report.random_fully.clone(),
        conntrack_flush: report.conntrack_flush.clone(),
        kernel_transactions: report.kernel_transactions,
        last_write_failure: report
            .last_write_failure
            .as_ref()
            .map(|f| pb::WriteFailure {
                what: f.what.clone(),
                time: Some(timestamp(f.at)),
                error: f.error.clone(),
            }),
    }
}

fn timestamp(time: std::time::SystemTime) -> pbjson_types::Timestamp {
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    pbjson_types::Timestamp {
        seconds: since_epoch.as_secs() as i64,
        nanos: since_epoch.subsec_nanos() as i32,
    }
}

#[tonic::async_trait]
impl EgressService for EgressApi {
    async fn set_egress(
        &self,
        request: Request<pb::SetEgressRequest>,
    ) -> Result<Response<pb::SetEgressResponse>, Status> {
        let requester = requester(&request);
        let peer = PeerInfo::of(&request).cloned();
        let user_agent = user_agent(&request).map(str::to_string);
        let body = request.into_inner();
        let audit = |outcome, reason: String, result| {
            SetEgressAudit {
                peer: peer.as_ref(),
                user_agent: user_agent.as_deref(),
                request: &body,
                outcome,
                reason,
                result,
            }
            .log()
        };
        if let Err(denied) = self.authorizer.may_write(peer.as_ref()) {
            audit(Outcome::Denied, denied.to_string(), self.current());
            return Err(denied.into());
        }
        let parsed = match parse_egress_list(&body.egress_ips) {
            Ok(parsed) => parsed,
            Err(e) => {
                audit(Outcome::Invalid, e.to_string(), self.current());
                return Err(Status::invalid_argument(e.to_string()));
            }
        };
        let outcome = self
            .engine
            .set(SetRequest {
                parsed,
                dry_run: body.dry_run,
                expected_generation: body.expected_generation,
                requester,
            })
            .await;
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(error) => {
                audit(Outcome::Failed, error.to_string(), self.current());
                return Err(error.into());
            }
        };
        // A dry run changes nothing: its audit line shows the pair still in force.
        let in_force = if outcome.dry_run {
            self.current()
        } else {
            Some((outcome.addrs, outcome.generation))
        };
        audit(Outcome::Accepted, String::new(), in_force);
        Ok(Response::new(pb::SetEgressResponse {
            egress: Some(pb::EgressPair::from(&outcome.addrs)),
            generation: outcome.generation,
            warnings: outcome.warnings,
            rules: outcome.rules.iter().map(family_rules).collect(),
            dry_run: outcome.dry_run,
        }))
    }

    async fn get_rules(
        &self,
        _request: Request<pb::GetRulesRequest>,
    ) -> Result<Response<pb::GetRulesResponse>, Status> {
        let report = self.engine.status().await?;
        Ok(Response::new(rules_response(&report)))
    }
}
