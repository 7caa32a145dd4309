//! A batch of SetEgress requests, in two named steps: [`Engine::accept`] checks each request's
//! `expected_generation` in arrival order and answers dry runs; [`Engine::commit`] persists the
//! batch's state, programs it, and answers every request of it (rolling back when the kernel
//! refuses).

use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, error, info, warn};

use super::table::Freshness;
use super::{Engine, EngineError, SetOutcome, SetReply, SetRequest, Trigger, report};
use crate::state::StoredState;

/// A batch of SetEgress requests that passed their generation checks, with the state it leads
/// to.
pub(super) struct Batch {
    /// Each request, the state right after it, and where its answer goes.
    requests: Vec<(SetRequest, StoredState, SetReply)>,
    /// The state before the batch.
    old: StoredState,
    /// The state after the whole batch.
    new: StoredState,
    started: Instant,
}

impl Engine {
    /// Step one of a SetEgress batch: checks `expected_generation` in arrival order, answers
    /// dry runs, and returns the requests that change (or re-assert) the state, if any.
    pub(super) fn accept(&mut self, sets: Vec<(SetRequest, SetReply)>) -> Option<Batch> {
        let started = Instant::now();
        let old = self.state;
        let mut running = old;
        let mut requests = Vec::new();
        for (request, reply) in sets {
            if let Some(expected) = request.expected_generation
                && expected != running.generation
            {
                let _ = reply.send(Err(EngineError::StaleGeneration {
                    expected,
                    current: running.generation,
                }));
                continue;
            }
            if request.dry_run {
                let _ = reply.send(Ok(self.preview(&request, &running)));
                continue;
            }
            if request.parsed.addrs != running.addrs {
                running = running.changed_to(request.parsed.addrs);
            }
            requests.push((request, running, reply));
        }
        (!requests.is_empty()).then_some(Batch {
            requests,
            old,
            new: running,
            started,
        })
    }

    /// Step two: persists the batch's state, programs it, and answers every request of it;
    /// when the kernel refuses, the previous state is restored on disk and in the kernel.
    pub(super) fn commit(&mut self, batch: Batch) {
        let Batch {
            requests,
            old,
            new,
            started,
        } = batch;
        let requesters: Vec<&str> = requests
            .iter()
            .map(|(r, _, _)| r.requester.as_str())
            .collect();
        let requesters = requesters.join(", ");
        let what = format!(
            "SetEgress {} (generation {}) by {requesters}",
            new.addrs, new.generation
        );
        if new != old {
            if let Err(e) = self.store.save(&new) {
                error!(error = %e, "cannot save the state; the change is refused");
                self.metrics.state_save_failed();
                self.health.save_failed(what, &e);
                let error = EngineError::from(e);
                for (_, _, reply) in requests {
                    let _ = reply.send(Err(error.clone()));
                }
                return;
            }
            self.health.saved();
        }
        match self.apply(&new.addrs, Freshness::Known) {
            Ok(results) => {
                self.publish(new);
                let written = results
                    .iter()
                    .filter(|(_, a)| a.committed)
                    .map(|(family, _)| *family)
                    .collect();
                self.health.reconciled(&written);
                self.timers.apply_succeeded();
                let rules_touched: usize = results.iter().map(|(_, a)| a.rules_touched).sum();
                if new != old {
                    info!(
                        requester = %requesters,
                        old = %old.addrs,
                        new = %new.addrs,
                        generation = new.generation,
                        coalesced_requests = requests.len(),
                        rules_touched,
                        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "egress changed"
                    );
                } else if rules_touched > 0 {
                    warn!(requester = %requesters, rules_touched, "egress unchanged, but rules had drifted and were repaired");
                } else {
                    debug!(requester = %requesters, "egress unchanged");
                }
                let rules: Arc<[_]> = self.settled_reports(&new.addrs, results).into();
                for (request, state, reply) in requests {
                    let mut warnings = request.parsed.warnings();
                    if state.generation != new.generation {
                        warnings.push(format!(
                            "superseded by a request coalesced into the same transaction (generation {}, {})",
                            new.generation, new.addrs
                        ));
                    }
                    warnings.extend(report::waiting_notes(&rules, &state.addrs));
                    warnings.extend(self.absence_warnings(&state.addrs));
                    let _ = reply.send(Ok(SetOutcome {
                        addrs: state.addrs,
                        generation: state.generation,
                        warnings,
                        rules: rules.clone(),
                        dry_run: false,
                    }));
                }
            }
            Err(failure) => {
                error!(error = %failure, old = %old.addrs, new = %new.addrs, "applying the change failed; restoring the previous state");
                if new != old
                    && let Err(e) = self.store.save(&old)
                {
                    error!(error = %e, "cannot restore the previous state file");
                    self.metrics.state_save_failed();
                }
                self.publish(old);
                let failure = Arc::new(failure);
                self.health.write_refused(what, failure.clone());
                // Answer before re-asserting the previous rules: that can wait for the xtables
                // lock again, and any later call is handled after it anyway.
                for (_, _, reply) in requests {
                    let _ = reply.send(Err(EngineError::Apply(failure.clone())));
                }
                self.resync(Trigger::Rollback);
            }
        }
    }

    /// Makes `state` the accepted state, for the engine and for [`EngineHandle::accepted`].
    pub(super) fn publish(&mut self, state: StoredState) {
        self.state = state;
        self.accepted.send_replace(state);
    }
}
