//! End-to-end test support for kilo-egress.
//!
//! The tests in `tests/tests/` run the real `kilo-egressd` and `kilo-egress` binaries (built by
//! `cargo build --workspace`) against the real kernel, inside a [`Lab`]: three network namespaces
//! pod → node → upstream created for one test and removed when it ends. Nothing touches the
//! machine's root network namespace: every iptables command and every daemon runs inside the
//! lab's node namespace.
//!
//! * [`Lab`] builds the namespaces and addresses, starts `egress-probe` listeners upstream and
//!   tells which source address upstream sees for pod traffic ([`Lab::seen_source`]).
//! * [`Iptables`] reads and changes the nat table of the node for one backend and family.
//! * [`Daemon`] starts, stops and restarts `kilo-egressd` in the node namespace and drives it with
//!   the `kilo-egress` CLI or `grpcurl`.
//! * [`KgAgent`] writes KILO-NAT the way Kilo's agent (kg) does, for kilo mode.
//! * [`BusyNode`] fills the nat table like kube-proxy on a busy node (20,000 rules).
//! * [`pki::Pki`] issues CA, server and client certificates at test time for mutual TLS;
//!   [`remote::RemoteTls`] runs the daemon with TLS on the node's addresses and drives it from
//!   the upstream namespace, as another machine would.
//!
//! * [`kube::ApiServer`] and [`kube::Watcher`] run a Kubernetes API emulator and `kilo-egress watch`
//!   beside the daemon.
//! * [`RealKg`] runs the real Kilo agent (kg, built by `tests/setup/kg.sh`) against that emulator
//!   in the node namespace, for kilo mode against the real thing.
//!
//! Tests need root; [`require_root`] skips them loudly (or fails them when `CI=true`).

#![forbid(unsafe_code)]

pub mod busy;
pub mod cmd;
pub mod daemon;
pub mod faults;
pub mod kg;
pub mod kube;
pub mod lab;
pub mod pki;
pub mod podman;
pub mod prom;
pub mod realkg;
pub mod remote;

pub use busy::BusyNode;
pub use cmd::Captured;
pub use daemon::{Daemon, DaemonConfig, Mode, RulesView};
pub use kg::KgAgent;
pub use lab::{Backend, Family, Iptables, Lab, SECOND_NODE_PRIMARY, SECOND_NODE_PRIMARY_V6};
pub use realkg::{KgConfig, RealKg};

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// How long a daemon may take to report SERVING after it was started.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the daemon may take to repair drifted rules or follow a rebuilt chain (it resyncs
/// every second: 3 s allows one missed resync on a loaded 2-core machine, and no more).
pub const REPAIR_TIMEOUT: Duration = Duration::from_secs(3);

/// The pause between two attempts of [`poll_until`].
pub const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// True when the environment says this is a CI run (`CI=true`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub(crate) fn skip_or_fail(test: &str, reason: &str) -> bool {
    if in_ci() {
        panic!("{test}: {reason}, and CI=true: this test must run in CI");
    }
    // Straight to stderr, past the test harness's capture, so the skip is seen.
    let bar = "!".repeat(72);
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n{bar}\n!!! SKIPPED ({reason}): {test}\n{bar}"
    );
    false
}

fn is_root() -> bool {
    // `id -u` instead of libc::geteuid: the workspace forbids unsafe code.
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// Returns true when the test may go on because it runs as root. Otherwise it panics when
/// `CI=true`, or prints a loud `SKIPPED (needs root): <test>` to stderr and returns false.
pub fn require_root(test: &str) -> bool {
    is_root() || skip_or_fail(test, "needs root")
}

/// Returns true when python3 can import grpc and grpc_tools (installed by
/// `tests/setup/python.sh`). Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs python3 grpcio)` to stderr and returns false.
pub fn require_python_grpc(test: &str) -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", "import grpc, grpc_tools.protoc"])
        .output()
        .is_ok_and(|out| out.status.success());
    found || skip_or_fail(test, "needs python3 grpcio and grpcio-tools")
}

/// The root of the source tree (the workspace), for files such as `examples/` and `proto/`.
pub fn source_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Returns true when `grpcurl` is on PATH. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs grpcurl): <test>` to stderr and returns false.
pub fn require_grpcurl(test: &str) -> bool {
    let found = std::process::Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|out| out.status.success());
    found || skip_or_fail(test, "needs grpcurl")
}

/// Returns true when the `conntrack` tool (Debian package `conntrack`, installed by
/// `tests/setup/base.sh`) runs. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs the conntrack tool): <test>` to stderr and returns false.
pub fn require_conntrack(test: &str) -> bool {
    let found = std::process::Command::new("conntrack")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    found || skip_or_fail(test, "needs the conntrack tool (package conntrack)")
}

/// The `node_modules` directory holding `@grpc/grpc-js` and `@grpc/proto-loader`:
/// `KILO_NODE_MODULES` (exported by `tests/setup/node.sh`), else `target/node-clients/node_modules`
/// where that script installs them.
pub fn node_modules_dir() -> PathBuf {
    std::env::var_os("KILO_NODE_MODULES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let target = bin_dir().parent().map(PathBuf::from).unwrap_or_default();
            target.join("node-clients/node_modules")
        })
}

/// Returns true when node can load `@grpc/grpc-js` and `@grpc/proto-loader` from
/// [`node_modules_dir`]. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs node @grpc/grpc-js)` to stderr and returns false.
pub fn require_node_grpc(test: &str) -> bool {
    let found = std::process::Command::new("node")
        .env("NODE_PATH", node_modules_dir())
        .args([
            "-e",
            r#"require("@grpc/grpc-js"); require("@grpc/proto-loader")"#,
        ])
        .output()
        .is_ok_and(|out| out.status.success());
    found
        || skip_or_fail(
            test,
            "needs node with @grpc/grpc-js and @grpc/proto-loader (tests/setup/node.sh)",
        )
}

/// Calls `cond` until it returns true or `timeout` has passed, pausing [`POLL_INTERVAL`] between
/// attempts. Returns whether `cond` became true. `cond` is always called at least once, and once
/// more after the deadline passed, so a slow machine does not lose the last attempt.
pub fn poll_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// The directory that holds the workspace's binaries (`target/debug`), found from the running
/// test executable (`target/debug/deps/<test>`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("path of the running test executable");
    let mut dir = exe
        .parent()
        .expect("test executable has a parent")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// The absolute path of a workspace binary such as `kilo-egressd`, `kilo-egress` or
/// `egress-probe`. Panics with a clear message when it has not been built.
pub fn bin_path(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the workspace first (`cargo build --workspace`), then run the tests",
        path.display()
    );
    path
}

/// Expands `for_each_backend!(case)` into `case::nft` and `case::legacy` tests that call
/// `case(Backend)` once [`require_root`] allows it.
#[macro_export]
macro_rules! for_each_backend {
    ($case:ident) => {
        mod $case {
            #[test]
            fn nft() {
                if $crate::require_root(concat!(module_path!(), "::nft")) {
                    super::$case($crate::Backend::Nft);
                }
            }

            #[test]
            fn legacy() {
                if $crate::require_root(concat!(module_path!(), "::legacy")) {
                    super::$case($crate::Backend::Legacy);
                }
            }
        }
    };
}

/// How long a polling daemon may take to see a change that leaves the table's shape as it was
/// (a rule replaced by one of the same size, or rules reordered): its backstop read interval, as
/// GetRules' `drift_detection` states it ("... at least every 4.8 s ..."); zero when it states
/// none (notifications, or a poll that reads every time).
pub fn backstop_read_interval(drift_detection: &str) -> Duration {
    drift_detection
        .split_once("at least every ")
        .and_then(|(_, rest)| rest.split_once(" s"))
        .and_then(|(secs, _)| secs.parse::<f64>().ok())
        .map_or(Duration::ZERO, Duration::from_secs_f64)
}

/// A rule of `iptables -S` without a trailing `--random-fully`, so checks of a SNAT or
/// MASQUERADE decision hold whether kilo-egressd uses it (the default where supported) or not.
pub fn decision(rule: &str) -> &str {
    rule.strip_suffix(" --random-fully").unwrap_or(rule)
}

/// Generates one `#[test]` per backend and family for a test case
/// `fn case(family: Family, backend: Backend)`: `for_each_variant!(case: nft, legacy);` defines
/// `case::nft::ipv4`, `case::nft::ipv6`, `case::legacy::ipv4` and `case::legacy::ipv6`. Each test
/// first calls [`require_root`].
#[macro_export]
macro_rules! for_each_variant {
    ($case:ident: $($backend:ident),+ $(,)?) => {
        mod $case {
            $(
                mod $backend {
                    #[test]
                    fn ipv4() {
                        if $crate::require_root(concat!(module_path!(), "::ipv4")) {
                            super::super::$case(
                                $crate::Family::V4,
                                $crate::Backend::from_name(stringify!($backend)),
                            );
                        }
                    }

                    #[test]
                    fn ipv6() {
                        if $crate::require_root(concat!(module_path!(), "::ipv6")) {
                            super::super::$case(
                                $crate::Family::V6,
                                $crate::Backend::from_name(stringify!($backend)),
                            );
                        }
                    }
                }
            )+
        }
    };
}
