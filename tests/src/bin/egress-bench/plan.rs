//! What one run measures: the sizes and iteration counts ([`Plan`], full or `--quick`), and the
//! two axes every phase is crossed with, the node ([`Node`]: idle or busy) and how the daemon
//! finds drift ([`Detection`]).

use serde::Serialize;

/// Sizes and iteration counts of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The RETURN-rule counts of the SetEgress phase.
    pub sizes: Vec<usize>,
    /// SetEgress calls per size that are made and not measured.
    pub warmup: usize,
    /// Measured SetEgress calls per size.
    pub setegress_iterations: usize,
    /// Runs of each bare `iptables-restore` baseline per size.
    pub restore_iterations: usize,
    /// Per size: at most this many per-rule rewrites.
    pub per_rule_iterations: Vec<(usize, usize)>,
    /// No new per-rule rewrite starts once this much time was spent (ms).
    pub per_rule_budget_ms: u64,
    /// A single per-rule rewrite is stopped and extrapolated after this long (ms).
    pub per_rule_rewrite_cap_ms: u64,
    /// Pause before each measured SetEgress call (ms).
    pub pace_ms: u64,
    /// Services of the busy node's kube-proxy-like rules.
    pub busy_services: usize,
    /// RETURN rules of the large chain programmed at start.
    pub ten_thousand: usize,
    /// SetEgress calls of the concurrency phase (made concurrently, then sequentially).
    pub concurrent_calls: usize,
    /// Connections the concurrent calls are spread over.
    pub concurrent_connections: usize,
    /// RETURN rules of the drift and concurrency phases.
    pub drift_rules: usize,
    /// Tampers per kind of drift.
    pub drift_iterations: usize,
    /// Removals (each followed by an addition) of the chosen address in the address phase.
    pub address_iterations: usize,
    /// Annotation changes timed in the watch phase.
    pub watch_changes: usize,
    /// Pause between a repair and the next tamper: a random value in this range (ms).
    pub drift_pause_ms: (u64, u64),
    /// RETURN rules of the idle daemons.
    pub idle_rules: usize,
    /// Length of the idle CPU window.
    pub idle_seconds: u64,
}

impl Plan {
    /// The sizes of a real run, with an idle window of `idle_seconds`.
    pub fn full(idle_seconds: u64) -> Plan {
        Plan {
            sizes: vec![10, 100, 1000, 5000],
            warmup: 3,
            setegress_iterations: 30,
            restore_iterations: 30,
            per_rule_iterations: vec![(10, 10), (100, 5), (1000, 3), (5000, 1)],
            per_rule_budget_ms: 20_000,
            per_rule_rewrite_cap_ms: 30_000,
            pace_ms: 50,
            busy_services: 1000,
            ten_thousand: 10_000,
            concurrent_calls: 1000,
            concurrent_connections: 16,
            drift_rules: 100,
            drift_iterations: 12,
            address_iterations: 20,
            watch_changes: 30,
            drift_pause_ms: (100, 600),
            idle_rules: 100,
            idle_seconds,
        }
    }

    /// Tiny sizes and few iterations: a smoke run of every phase (`--quick`).
    pub fn quick() -> Plan {
        Plan {
            sizes: vec![10, 100],
            warmup: 1,
            setegress_iterations: 5,
            restore_iterations: 5,
            per_rule_iterations: vec![(10, 2), (100, 1)],
            per_rule_budget_ms: 2_000,
            per_rule_rewrite_cap_ms: 2_000,
            pace_ms: 20,
            busy_services: 50,
            ten_thousand: 500,
            concurrent_calls: 50,
            concurrent_connections: 4,
            drift_rules: 10,
            drift_iterations: 2,
            address_iterations: 2,
            watch_changes: 3,
            drift_pause_ms: (50, 150),
            idle_rules: 10,
            idle_seconds: 3,
        }
    }

    /// How many per-rule rewrites to time at `size` rules (1 for a size the plan does not list).
    pub fn per_rule_iterations(&self, size: usize) -> usize {
        self.per_rule_iterations
            .iter()
            .find(|(s, _)| *s == size)
            .map_or(1, |(_, n)| *n)
    }
}

/// An idle node, or one with kube-proxy's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Node {
    /// Nothing but the lab's own rules.
    Idle,
    /// With [`Plan::busy_services`] services of kube-proxy-like rules (`BusyNode`).
    Busy,
}

impl Node {
    /// `idle` or `busy`, as in results.json.
    pub fn name(self) -> &'static str {
        match self {
            Node::Idle => "idle",
            Node::Busy => "busy",
        }
    }
}

/// How the daemon finds drift.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    /// nft change notifications (the nft backend's default).
    Notifications,
    /// Polling every second (`--kernel-notifications=false` on nft; always on legacy).
    Polling,
}

impl Detection {
    /// The detection as results.json and results.md name it.
    pub fn name(self) -> &'static str {
        match self {
            Detection::Notifications => "nft change notifications",
            Detection::Polling => "polling every 1 s",
        }
    }
}
