//! What the engine knows, exported after every step: per managed family the decision it
//! programs, whether the chosen address is on the node and whether the family is in sync; whether
//! the write path is degraded and whether the node's addresses are followed. Counters (syncs,
//! transactions, repairs) are counted where they happen.

use super::Engine;
use crate::metrics::FamilyState;

impl Engine {
    /// Brings the gauges of [`crate::metrics::Metrics`] up to date; cheap, no kernel read.
    pub(super) fn export_metrics(&self) {
        let failing = self.health.failing_family();
        let write_failure = self.health.last_write_failure().and_then(|f| f.family);
        let families: Vec<FamilyState> = (self.table.families().managed().into_iter())
            .map(|family| {
                let chosen = self.state.addrs.get(family);
                FamilyState {
                    family,
                    chosen,
                    programmed: self.presence.programmed(chosen),
                    present: chosen.map(|_| self.presence.absent(chosen).is_none()),
                    in_sync: failing != Some(family)
                        && write_failure != Some(family)
                        && !self.waiting_for_kilo.contains(&family),
                }
            })
            .collect();
        self.metrics.observe(
            &families,
            self.health.last_write_failure().is_some(),
            self.address_following.is_ok(),
        );
    }
}
