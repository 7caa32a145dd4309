//! The accepted desired state on disk: written atomically (temp file, fsync, rename, fsync of the
//! directory) so a crash leaves either the old or the new state, never a torn file. A file (or
//! directory) that cannot be read back is moved aside, so the service starts instead of
//! crash-looping. Generations never wrap and never repeat: a new state starts at a new epoch (the
//! time in microseconds), above anything an earlier state of this node handed out.

use kilo_egress_api::egress::EgressAddrs;
use serde::{Deserialize, Serialize};
use std::fs::{self, File};
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

/// The state file's name inside the state directory.
pub const STATE_FILE: &str = "state.json";

/// The largest generation a state file may hold; anything above is taken as corruption. Far
/// above every epoch ([`new_epoch`]) and far below `u64::MAX`, so increments never wrap.
pub const MAX_GENERATION: u64 = 1 << 62;

/// The generation a new state starts at: microseconds since the Unix epoch. A node's earlier
/// state (before a cleanup, or in a file that was lost) started at an earlier epoch and counted
/// one per change, far fewer than one per microsecond, so no writer can hold this value or any
/// after it.
pub fn new_epoch() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or_default()
        .clamp(1, MAX_GENERATION)
}
const FORMAT_VERSION: u32 = 1;

/// The desired state the service keeps across restarts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoredState {
    /// The chosen pair.
    pub addrs: EgressAddrs,
    /// Incremented by every accepted change of the pair.
    pub generation: u64,
}

impl StoredState {
    /// A new state for `addrs`, at a new epoch.
    pub fn new(addrs: EgressAddrs) -> StoredState {
        StoredState {
            addrs,
            generation: new_epoch(),
        }
    }

    /// The state after a change to `addrs`: the next generation.
    pub fn changed_to(self, addrs: EgressAddrs) -> StoredState {
        StoredState {
            addrs,
            // Generations start at most at MAX_GENERATION (2^62): adding one per change cannot
            // come near u64::MAX.
            generation: self.generation.saturating_add(1),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    version: u32,
    generation: u64,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
}

/// A failure to read or write the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// An I/O operation failed.
    #[error("{action} {path}: {error}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
}

/// What loading found.
#[derive(Debug)]
pub enum Loaded {
    /// No state file yet: a fresh node.
    Fresh,
    /// A valid state file.
    State(StoredState),
    /// The file was unreadable and has been moved to `moved_to`.
    Corrupt {
        /// Why it could not be used.
        reason: String,
        /// Where the bad file now is.
        moved_to: PathBuf,
    },
}

/// Reads and writes `state.json` in one directory.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    /// A store in `dir` (created on first save).
    pub fn new(dir: impl Into<PathBuf>) -> StateStore {
        StateStore { dir: dir.into() }
    }

    /// The path of the state file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// Loads the state. A file that cannot be read or parsed (garbage, wrong types, a
    /// directory, no permission) is moved aside and reported, never fatal; only a failure to
    /// move it aside is an error.
    pub fn load(&self) -> Result<Loaded, StateError> {
        let path = self.path();
        let reason = match fs::read(&path) {
            Ok(bytes) => match parse(&bytes) {
                Ok(state) => return Ok(Loaded::State(state)),
                Err(reason) => reason,
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Loaded::Fresh),
            Err(e) => format!("cannot read it: {e}"),
        };
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or_default();
        let moved_to = self.dir.join(format!("{STATE_FILE}.corrupt-{stamp}"));
        fs::rename(&path, &moved_to).map_err(|source| io("move aside", &path, source))?;
        Ok(Loaded::Corrupt { reason, moved_to })
    }

    /// Saves the state atomically.
    pub fn save(&self, state: &StoredState) -> Result<(), StateError> {
        fs::create_dir_all(&self.dir).map_err(|source| io("create", &self.dir, source))?;
        let file = StateFile {
            version: FORMAT_VERSION,
            generation: state.generation,
            ipv4: state.addrs.ipv4,
            ipv6: state.addrs.ipv6,
        };
        let mut text = serde_json::to_vec_pretty(&file).expect("state serializes");
        text.push(b'\n');
        let temp = self.dir.join(format!(".{STATE_FILE}.tmp"));
        let path = self.path();
        let write = || -> std::io::Result<()> {
            let mut out = File::create(&temp)?;
            out.write_all(&text)?;
            out.sync_all()?;
            fs::rename(&temp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(|source| io("write", &path, source))
    }

    /// Removes the state file (used by cleanup); absent is fine.
    pub fn remove(&self) -> Result<(), StateError> {
        match fs::remove_file(self.path()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(io("remove", &self.path(), e))
            }
            _ => Ok(()),
        }
    }
}

fn io(action: &'static str, path: &Path, error: std::io::Error) -> StateError {
    StateError::Io {
        action,
        path: path.to_path_buf(),
        error,
    }
}

fn parse(text: &[u8]) -> Result<StoredState, String> {
    let file: StateFile = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    if file.version != FORMAT_VERSION {
        return Err(format!("unknown state format version {}", file.version));
    }
    if file.generation > MAX_GENERATION {
        return Err(format!(
            "generation {} is out of range (at most {MAX_GENERATION})",
            file.generation
        ));
    }
    let addrs = EgressAddrs {
        ipv4: file.ipv4,
        ipv6: file.ipv6,
    };
    // A stored address must still pass today's checks.
    for addr in [addrs.ipv4.map(Into::into), addrs.ipv6.map(Into::into)]
        .into_iter()
        .flatten()
    {
        let addr: std::net::IpAddr = addr;
        kilo_egress_api::egress::parse_addr(&addr.to_string())
            .map_err(|reason| format!("stored address {addr} {reason}"))?;
    }
    Ok(StoredState {
        addrs,
        generation: file.generation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path().join("sub"));
        assert!(matches!(store.load().unwrap(), Loaded::Fresh));
        let state = StoredState {
            addrs: EgressAddrs {
                ipv4: Some("198.51.100.20".parse().unwrap()),
                ipv6: Some("2001:db8::20".parse().unwrap()),
            },
            generation: 7,
        };
        store.save(&state).unwrap();
        assert!(matches!(store.load().unwrap(), Loaded::State(s) if s == state));
        assert!(!dir.path().join("sub/.state.json.tmp").exists());
    }

    #[test]
    fn corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(store.path(), b"{not json").unwrap();
        match store.load().unwrap() {
            Loaded::Corrupt { moved_to, .. } => assert!(moved_to.exists()),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert!(!store.path().exists());
        assert!(matches!(store.load().unwrap(), Loaded::Fresh));
    }

    #[test]
    fn a_directory_or_an_out_of_range_generation_counts_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::create_dir(store.path()).unwrap();
        match store.load().unwrap() {
            Loaded::Corrupt { moved_to, reason } => {
                assert!(moved_to.is_dir(), "{reason}");
                assert!(reason.contains("cannot read it"), "{reason}");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        fs::write(
            store.path(),
            format!(
                r#"{{"version":1,"generation":{},"ipv4":null,"ipv6":null}}"#,
                u64::MAX
            ),
        )
        .unwrap();
        assert!(
            matches!(store.load().unwrap(), Loaded::Corrupt { reason, .. } if reason.contains("out of range"))
        );
    }

    #[test]
    fn new_states_start_above_every_earlier_generation() {
        let first = StoredState::new(EgressAddrs::NONE);
        let mut later = first;
        for _ in 0..1000 {
            later = later.changed_to(EgressAddrs::NONE);
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
        let again = StoredState::new(EgressAddrs::NONE);
        assert!(again.generation > later.generation, "{again:?} {later:?}");
        assert!(again.generation <= MAX_GENERATION);
    }

    #[test]
    fn stored_invalid_address_counts_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::new(dir.path());
        fs::write(
            store.path(),
            br#"{"version":1,"generation":1,"ipv4":"127.0.0.1","ipv6":null}"#,
        )
        .unwrap();
        assert!(
            matches!(store.load().unwrap(), Loaded::Corrupt { reason, .. } if reason.contains("loopback"))
        );
    }
}
