//! Faults the tests inject into kilo-egressd's surroundings: restore tools that fail on demand.

use crate::lab::{Backend, Family};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Writes wrappers for the backend's restore tools into `dir` (put it first on kilo-egressd's
/// PATH): they fail while `dir/refuse` exists and run the real tool otherwise (with `exec`, so the netlink port id stays the
/// tool's own pid). Returns the path of that switch file.
pub fn restore_wrappers(dir: &Path, backend: Backend) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for family in Family::ALL {
        let name = format!("{}-{}-restore", family.iptables(), backend.name());
        let real = ["/usr/sbin", "/sbin", "/usr/bin"]
            .iter()
            .map(|d| Path::new(d).join(&name))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{name} not found"));
        let script = format!(
            "#!/bin/sh\nif [ -e '{flag}' ]; then echo \"{name}: refused by the test (broken tool)\" >&2; exit 1; fi\nexec '{real}' \"$@\"\n",
            flag = dir.join("refuse").display(),
            real = real.display(),
        );
        let path = dir.join(&name);
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir.join("refuse")
}

/// This process's PATH with `dir` first, for a daemon that must find the wrappers.
pub fn path_first(dir: &Path) -> String {
    format!(
        "{}:{}",
        dir.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}
