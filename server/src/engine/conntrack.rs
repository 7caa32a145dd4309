//! `--conntrack-flush` in the engine: remembers the decision each family last committed and,
//! when a reconcile commits another one, hands the old one (with the family's NATed sources) to
//! [`crate::ctflush`], whose thread deletes the flows it NATed. The engine thread never waits for
//! the conntrack table; in kilo mode it reads POSTROUTING once per change (kg's jumps name the
//! sources).

use kilo_egress_api::egress::Family;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::Engine;
use crate::conntrack::Decision;
use crate::ctflush::ConntrackFlush;
use crate::metrics::Metrics;

/// The decisions committed per family, and the deleting thread when the option is on.
pub(super) struct FlushState {
    flush: Option<ConntrackFlush>,
    committed: BTreeMap<Family, Option<IpAddr>>,
}

impl FlushState {
    pub(super) fn new(on: bool, metrics: Arc<Metrics>) -> FlushState {
        FlushState {
            flush: on.then(|| ConntrackFlush::start(metrics)),
            committed: BTreeMap::new(),
        }
    }

    /// GetRules' `conntrack_flush`.
    pub(super) fn describe(&self) -> String {
        self.flush
            .as_ref()
            .map_or_else(|| "off".to_string(), ConntrackFlush::describe)
    }
}

impl Engine {
    /// A reconcile of `family` committed `programmed` (SNAT address, or `None` for MASQUERADE):
    /// if it replaced another decision, queue the deletion of the flows that one NATed.
    pub(super) fn decision_committed(&mut self, family: Family, programmed: Option<IpAddr>) {
        let previous = self.conntrack.committed.insert(family, programmed);
        let Some(flush) = &self.conntrack.flush else {
            return;
        };
        let Some(old) = previous.filter(|old| *old != programmed) else {
            return;
        };
        match self.table.nat_sources(family) {
            Ok(sources) => flush.decision_changed(
                family,
                Decision::from(old),
                Decision::from(programmed),
                sources,
            ),
            Err(e) => flush.failed(family, format!("reading the NATed sources: {e}")),
        }
    }
}
