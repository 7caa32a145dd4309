//! Egress that follows the address, in the engine: subscribing to the node's addresses before
//! the first apply, switching a family's decision when its chosen address comes or goes (one
//! transaction, the usual add-only switch), logging each transition once, and telling clients
//! (GetRules status, SetEgress warnings). What to program is decided in [`super::presence`].

use kilo_egress_api::egress::EgressAddrs;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::mpsc;
use tracing::{error, info, warn};

use super::presence::{AbsentPolicy, AddressPresence};
use super::report::FamilyReport;
use super::{Command, Engine, Trigger};
use crate::addrwatch::{self, Presence};

/// The node's addresses after a change, or why they can no longer be followed.
pub type AddressUpdate = Result<BTreeMap<IpAddr, Presence>, String>;

/// Subscribes to the node's addresses, puts the first dump into `presence`, and forwards every
/// later change to the engine. On failure every address counts as present; the reason is
/// returned for the log and GetRules.
pub(super) fn follow_addresses(
    commands: &mpsc::Sender<Command>,
    presence: &mut AddressPresence,
) -> Result<(), String> {
    let subscription = addrwatch::subscribe()
        .map_err(|e| format!("cannot follow the node's addresses through rtnetlink: {e}"))?;
    presence.update(subscription.addresses().view());
    let commands = commands.clone();
    subscription.spawn(move |update| {
        commands
            .send(Command::Addresses(update.map(|addresses| addresses.view())))
            .is_ok()
    });
    Ok(())
}

/// GetRules' `address_presence`: whether addresses are followed, and the policy.
pub(super) fn describe(following: &Result<(), String>, policy: AbsentPolicy) -> String {
    let policy = match policy {
        AbsentPolicy::Masquerade => "masquerade",
        AbsentPolicy::Keep => "keep",
    };
    match following {
        Ok(()) => format!("following the node's addresses (rtnetlink); absent address: {policy}"),
        Err(why) => {
            format!("NOT following the node's addresses, every address counts as present: {why}")
        }
    }
}

impl Engine {
    /// The node's addresses changed: log each family whose chosen address became unusable or
    /// usable again, and switch the families whose programmed decision changed.
    pub(super) fn addresses_changed(&mut self, update: AddressUpdate) {
        let before = self.presence.clone();
        match update {
            Ok(view) => self.presence.update(view),
            Err(why) => {
                error!(reason = %why, "address notifications stopped; every egress address now counts as present");
                self.presence.forget();
                self.address_following = Err(why);
            }
        }
        let chosen = self.state.addrs;
        let mut switch = Vec::new();
        for family in self.table.families().managed() {
            let addr = chosen.get(family);
            if before.absent(addr) != self.presence.absent(addr) {
                match (self.presence.note(addr), addr) {
                    (Some(note), _) => warn!(%family, %note, "egress address not usable"),
                    (None, Some(addr)) => {
                        info!(%family, %addr, "egress address usable again: SNAT to it")
                    }
                    (None, None) => {}
                }
            }
            if before.programmed(addr) != self.presence.programmed(addr) {
                switch.push(family);
            }
        }
        if !switch.is_empty() {
            self.reconcile_logged(switch, Trigger::AddressChange);
        }
    }

    /// Marks the reports of families whose chosen address (in `chosen`) is not usable, and puts
    /// the reason in front of their status.
    pub(super) fn annotate(&self, reports: &mut [FamilyReport], chosen: &EgressAddrs) {
        for report in reports {
            if self
                .table
                .families()
                .unmanaged_reason(report.family)
                .is_some()
            {
                continue;
            }
            if let Some(note) = self.presence.note(chosen.get(report.family)) {
                report.address_absent = true;
                report.status = format!("{note}; {}", report.status);
            }
        }
    }

    /// SetEgress warnings for the chosen addresses of `chosen` that are not usable now.
    pub(super) fn absence_warnings(&self, chosen: &EgressAddrs) -> Vec<String> {
        self.table
            .families()
            .managed()
            .into_iter()
            .filter_map(|family| {
                let note = self.presence.note(chosen.get(family))?;
                Some(format!("{family}: {note}"))
            })
            .collect()
    }
}
