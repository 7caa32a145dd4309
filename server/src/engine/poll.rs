//! What a poll reads, when the backend sends no change notifications (legacy, or
//! `--kernel-notifications=false`). Every `iptables-legacy` run copies and parses the whole nat
//! table, so on a busy node one read of our chains costs tens of milliseconds of CPU; reading
//! them every second would cost several percent of a core. Instead each poll (every
//! `--resync-interval`) first takes the table's shape ([`TableShape`], a few microseconds), and
//! reads a family's chains only when
//! - its shape changed since the last read (a rule was added or removed somewhere), or
//! - a backstop read is due: a same-size replacement does not change the shape, so every family
//!   is read at least every [`PollGate::backstop_interval`], or
//! - the backend gives no shape at all;
//!
//! and in every case only while the [`ReadBudget`] allows: reads that find nothing to repair are
//! paid from a bucket filled at [`POLL_CPU_SHARE`] of a core, so polling never costs more than
//! that on average, however often other writers (kube-proxy) change the table; a read that
//! repaired drift is free, so repairs are never rationed. The backstop is set to spend [`BACKSTOP_SHARE`] of the budget,
//! which leaves the rest for reads the shape asks for.

use kilo_egress_api::egress::Family;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::xtinfo::TableShape;

/// The share of one core that polling may spend on reads, on average.
pub const POLL_CPU_SHARE: f64 = 0.005;

/// The part of the budget the backstop reads may spend; reads the shape asks for get the rest
/// (and whatever the backstop leaves unspent, up to [`BUDGET_SAVINGS`]).
pub const BACKSTOP_SHARE: f64 = 0.8;

/// How much unspent budget may pile up, in seconds of refill: after a quiet period a burst of
/// changes is read at once, up to this much.
const BUDGET_SAVINGS: Duration = Duration::from_secs(120);

/// A point to measure the cost of reads from: the CPU time of this thread (parsing) and of the
/// child processes it ran and reaped (the iptables tools), which is what a share of a core is
/// about; a busy machine does not inflate it as it does wall time.
#[derive(Debug, Clone, Copy)]
pub struct CostMeter {
    cpu: Option<Duration>,
    wall: Instant,
}

impl CostMeter {
    /// Starts measuring now.
    pub fn start() -> CostMeter {
        CostMeter {
            cpu: cpu_so_far(),
            wall: Instant::now(),
        }
    }

    /// The CPU time spent since [`CostMeter::start`] (wall time if it cannot be read).
    pub fn cost(&self) -> Duration {
        match (self.cpu, cpu_so_far()) {
            (Some(before), Some(now)) => now.saturating_sub(before),
            _ => self.wall.elapsed(),
        }
    }
}

/// User and system time of the calling thread plus that of every reaped child of the process.
/// Only the engine thread runs iptables tools, so a difference taken on it is its reads' cost.
fn cpu_so_far() -> Option<Duration> {
    use nix::sys::resource::{UsageWho, getrusage};
    let total = |who| {
        getrusage(who).ok().map(|usage| {
            let micros = |t: nix::sys::time::TimeVal| {
                Duration::from_secs(t.tv_sec().max(0) as u64)
                    + Duration::from_micros(t.tv_usec().max(0) as u64)
            };
            micros(usage.user_time()) + micros(usage.system_time())
        })
    };
    Some(total(UsageWho::RUSAGE_THREAD)? + total(UsageWho::RUSAGE_CHILDREN)?)
}

/// Reads are paid from here: it fills at `share` of a core up to a cap, and a read may start
/// whenever the balance is positive (the balance may go negative by the cost of that read).
#[derive(Debug)]
pub struct ReadBudget {
    share: f64,
    cap: f64,
    balance: f64,
    at: Instant,
}

impl ReadBudget {
    /// A full budget at `now`.
    pub fn new(share: f64, now: Instant) -> ReadBudget {
        let cap = share * BUDGET_SAVINGS.as_secs_f64();
        ReadBudget {
            share,
            cap,
            balance: cap,
            at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.share;
        self.balance = (self.balance + earned).min(self.cap);
        self.at = self.at.max(now);
    }

    /// Whether a read may start at `now`.
    pub fn allows(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.balance > 0.0
    }

    /// A read that cost `cost` ended at `now`.
    pub fn spend(&mut self, cost: Duration, now: Instant) {
        self.refill(now);
        self.balance -= cost.as_secs_f64();
    }
}

/// Decides, poll by poll, which families to read (see the module header).
#[derive(Debug)]
pub struct PollGate {
    poll_interval: Duration,
    budget: ReadBudget,
    /// Each family's shape as taken just before its last read: a change after that look
    /// shows as a different shape at the next poll.
    read_at_shape: BTreeMap<Family, Option<TableShape>>,
    last_full_read: Option<Instant>,
    /// The cost of reading every managed family once (smoothed).
    read_cost: Duration,
}

impl PollGate {
    /// Polls every `poll_interval`, paying reads from a budget of [`POLL_CPU_SHARE`].
    pub fn new(poll_interval: Duration, now: Instant) -> PollGate {
        PollGate {
            poll_interval,
            budget: ReadBudget::new(POLL_CPU_SHARE, now),
            read_at_shape: BTreeMap::new(),
            last_full_read: None,
            read_cost: Duration::ZERO,
        }
    }

    /// Every family is read at least this often: the poll interval, or longer when reads are so
    /// dear that backstop reads alone would spend more than [`BACKSTOP_SHARE`] of the budget.
    pub fn backstop_interval(&self) -> Duration {
        let budgeted = self
            .read_cost
            .mul_f64(1.0 / (BACKSTOP_SHARE * POLL_CPU_SHARE));
        self.poll_interval.max(budgeted)
    }

    /// The families to read at `now`, given each managed family's current shape; empty when
    /// nothing needs reading or the budget says wait (the next poll asks again).
    pub fn to_read(
        &mut self,
        now: Instant,
        shapes: &[(Family, Option<TableShape>)],
    ) -> Vec<Family> {
        let backstop_due = self
            .last_full_read
            .is_none_or(|at| now.saturating_duration_since(at) >= self.backstop_interval());
        let wanted: Vec<Family> = shapes
            .iter()
            .filter(|(family, shape)| {
                backstop_due || shape.is_none() || self.read_at_shape.get(family) != Some(shape)
            })
            .map(|(family, _)| *family)
            .collect();
        if wanted.is_empty() || !self.budget.allows(now) {
            return Vec::new();
        }
        wanted
    }

    /// The families in `shapes` were read (with `shapes` taken before the reads), costing
    /// `cost` in all, ending at `now`. A read that found drift and `repaired` it is not paid
    /// from the budget: repairs are the job, only reads that find nothing are overhead.
    pub fn read(
        &mut self,
        shapes: &[(Family, Option<TableShape>)],
        cost: Duration,
        repaired: bool,
        now: Instant,
    ) {
        if !repaired {
            self.budget.spend(cost, now);
        }
        if shapes.is_empty() {
            return;
        }
        for (family, shape) in shapes {
            self.read_at_shape.insert(*family, *shape);
        }
        let families_known = self.read_at_shape.len() as u32;
        let full_cost = cost / shapes.len() as u32 * families_known;
        self.read_cost = if self.read_cost.is_zero() {
            full_cost
        } else {
            // Smoothed: one slow read (a contended moment) does not stretch the backstop alone.
            (self.read_cost * 3 + full_cost) / 4
        };
        if shapes.len() as u32 >= families_known {
            self.last_full_read = Some(now);
        }
    }

    /// The start read every family in `shapes` at a cost of `cost`: the first baseline and cost
    /// figure, not paid from the budget.
    pub fn baseline(
        &mut self,
        shapes: &[(Family, Option<TableShape>)],
        cost: Duration,
        now: Instant,
    ) {
        for (family, shape) in shapes {
            self.read_at_shape.insert(*family, *shape);
        }
        self.read_cost = cost;
        self.last_full_read = Some(now);
    }

    /// We wrote `family` ourselves and the table then had `shape`: what we wrote is known, so
    /// that change costs no read. (A foreign change within the same instant would wait for the
    /// backstop read.)
    pub fn wrote(&mut self, family: Family, shape: TableShape) {
        self.read_at_shape.insert(family, Some(shape));
    }

    /// Forgets every shape, so the next poll reads every family (budget permitting): after a
    /// change of detection or when what the table knew was dropped.
    pub fn forget(&mut self) {
        self.read_at_shape.clear();
    }

    /// How polling works now, in words (GetRules' `drift_detection`); `shaped` says whether
    /// the backend gives the table's shape.
    pub fn describe(&self, shaped: bool) -> String {
        let cost = if self.read_cost.is_zero() {
            "not yet measured".to_string()
        } else {
            format!("{:.1} ms", self.read_cost.as_secs_f64() * 1000.0)
        };
        let every = humantime::format_duration(self.poll_interval);
        let reads = if shaped {
            format!(
                "the table's shape every {every}, the chains when it changed and at least every {:.1} s",
                self.backstop_interval().as_secs_f64()
            )
        } else {
            format!("the chains every {every}")
        };
        format!(
            "{reads} (a read of all families costs {cost}; reads kept under {}% of a core)",
            POLL_CPU_SHARE * 100.0
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);
    const V4: Family = Family::Ipv4;
    const V6: Family = Family::Ipv6;

    fn shapes(v4: u32, v6: u32) -> Vec<(Family, Option<TableShape>)> {
        vec![
            (V4, Some(TableShape::for_test(v4, v4 * 100))),
            (V6, Some(TableShape::for_test(v6, v6 * 100))),
        ]
    }

    fn only(
        family: Family,
        all: &[(Family, Option<TableShape>)],
    ) -> Vec<(Family, Option<TableShape>)> {
        all.iter().filter(|(f, _)| *f == family).cloned().collect()
    }

    #[test]
    fn an_unchanged_table_is_read_only_by_the_backstop() {
        let start = Instant::now();
        let mut gate = PollGate::new(SECOND, start);
        let table = shapes(10, 5);
        assert_eq!(
            gate.to_read(start, &table),
            vec![V4, V6],
            "the first poll reads all"
        );
        // 20 ms per read of both families: the backstop spends 80 % of the budget, every 5 s.
        gate.read(&table, Duration::from_millis(20), false, start);
        assert_eq!(gate.backstop_interval(), Duration::from_secs(5));
        for second in 1..5 {
            assert!(
                gate.to_read(start + SECOND * second, &table).is_empty(),
                "second {second}"
            );
        }
        assert_eq!(gate.to_read(start + SECOND * 5, &table), vec![V4, V6]);
    }

    #[test]
    fn a_changed_shape_reads_that_family_at_the_next_poll() {
        let start = Instant::now();
        let mut gate = PollGate::new(SECOND, start);
        let table = shapes(10, 5);
        gate.to_read(start, &table);
        gate.read(&table, Duration::from_millis(20), false, start);
        let changed = shapes(9, 5);
        assert_eq!(gate.to_read(start + SECOND, &changed), vec![V4]);
        gate.read(
            &only(V4, &changed),
            Duration::from_millis(10),
            false,
            start + SECOND,
        );
        assert!(gate.to_read(start + SECOND * 2, &changed).is_empty());
    }

    #[test]
    fn without_a_shape_every_poll_reads_while_the_budget_lasts() {
        let start = Instant::now();
        let mut gate = PollGate::new(SECOND, start);
        let blind = vec![(V4, None)];
        assert_eq!(gate.to_read(start, &blind), vec![V4]);
        gate.read(&blind, Duration::from_millis(1), false, start);
        assert_eq!(gate.to_read(start + SECOND, &blind), vec![V4]);
    }

    #[test]
    fn constant_change_costs_at_most_the_budget() {
        // The table changes before every poll and a read costs 50 ms: over an hour, reads
        // may not cost more than the budget plus its savings.
        let start = Instant::now();
        let mut gate = PollGate::new(SECOND, start);
        let cost = Duration::from_millis(50);
        let mut spent = Duration::ZERO;
        let hour = 3600;
        for second in 0..hour {
            let now = start + SECOND * second;
            let table = shapes(second, 1);
            let read = gate.to_read(now, &table);
            if !read.is_empty() {
                gate.read(&table, cost, false, now);
                spent += cost;
            }
        }
        let allowed = POLL_CPU_SHARE * hour as f64 + POLL_CPU_SHARE * BUDGET_SAVINGS.as_secs_f64();
        assert!(
            spent.as_secs_f64() <= allowed + cost.as_secs_f64(),
            "spent {spent:?}"
        );
        // ...and it does keep reading: one read per 10 s on average (50 ms at 0.5 %).
        assert!(
            spent.as_secs_f64() >= 0.9 * POLL_CPU_SHARE * hour as f64,
            "spent {spent:?}"
        );
    }

    #[test]
    fn a_cheap_table_is_read_every_poll_by_the_backstop() {
        let start = Instant::now();
        let mut gate = PollGate::new(SECOND, start);
        let table = shapes(10, 5);
        gate.to_read(start, &table);
        gate.read(&table, Duration::from_micros(500), false, start);
        assert_eq!(gate.backstop_interval(), SECOND);
        assert_eq!(gate.to_read(start + SECOND, &table), vec![V4, V6]);
    }

    #[test]
    fn reads_that_repaired_drift_are_not_rationed() {
        let start = Instant::now();
        let mut gate = PollGate::new(SECOND, start);
        let cost = Duration::from_millis(50);
        // Someone flushes our chain before every poll for an hour: every poll reads and repairs.
        for second in 0..3600u32 {
            let now = start + Duration::from_secs(second.into());
            let table = vec![(Family::Ipv4, Some(TableShape::for_test(second, second)))];
            assert_eq!(
                gate.to_read(now, &table),
                vec![Family::Ipv4],
                "second {second}"
            );
            gate.read(&table, cost, true, now);
        }
    }

    #[test]
    fn the_cpu_of_reaped_children_is_measured() {
        let meter = CostMeter::start();
        // A child that burns about 50 ms of CPU.
        std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"])
            .status()
            .unwrap();
        assert!(cpu_so_far().is_some());
        assert!(
            meter.cost() >= Duration::from_millis(1),
            "{:?}",
            meter.cost()
        );
    }
}
