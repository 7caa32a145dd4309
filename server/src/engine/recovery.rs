//! Loading the stored state at start, and rebuilding it when the file is gone or unusable.

use kilo_egress_api::egress::EgressAddrs;
use tracing::{error, info};

use super::table::NatTable;
use crate::state::{Loaded, StateError, StateStore, StoredState};

/// The stored state. A fresh node starts with MASQUERADE; after a corrupt or unreadable state
/// file (moved aside) the service adopts the pair that the rules of ours in the kernel program,
/// when they are well-formed, else MASQUERADE. Either way a new state at a new epoch is written
/// at once, so no earlier writer's generation can match it.
/// Also returns why the new state file could not be written, if it could not.
pub(super) fn load_state(
    store: &StateStore,
    table: &NatTable,
) -> (StoredState, Option<StateError>) {
    let state = match store.load() {
        Ok(Loaded::State(state)) => {
            info!(egress = %state.addrs, generation = state.generation, "loaded stored state");
            return (state, None);
        }
        Ok(Loaded::Fresh) => {
            let state = StoredState::new(EgressAddrs::NONE);
            info!(path = %store.path().display(), generation = state.generation, "no stored state: starting with MASQUERADE");
            state
        }
        Ok(Loaded::Corrupt { reason, moved_to }) => {
            let state = StoredState::new(table.adopt());
            error!(
                %reason,
                moved_to = %moved_to.display(),
                adopted = %state.addrs,
                generation = state.generation,
                "STORED STATE IS CORRUPT: moved it aside; keeping the pair the rules of ours in the kernel program (MASQUERADE where there are none); check it and set it again if it is not what this node should use"
            );
            state
        }
        Err(e) => {
            let state = StoredState::new(table.adopt());
            error!(
                error = %e,
                adopted = %state.addrs,
                "STORED STATE IS UNUSABLE and cannot be moved aside: keeping the pair the rules of ours in the kernel program; fix the state directory"
            );
            return (state, Some(e));
        }
    };
    match store.save(&state) {
        Ok(()) => (state, None),
        Err(e) => {
            error!(error = %e, "cannot write the new state file; a SetEgress will fail until the state directory is writable");
            (state, Some(e))
        }
    }
}
