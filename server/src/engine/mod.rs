//! The engine: the one thread that makes every iptables call. RPC handlers send it a
//! [`Command`] through an [`EngineHandle`] and wait for the reply. Pending SetEgress commands
//! are drained together, accepted as one batch (`Engine::accept`) and committed as one
//! transaction per family (`Engine::commit`), shaped by [`crate::rules::plan`] so the new
//! decision goes in add-only and the rules it shadows are removed once no request waits.
//!
//! The rooms: `batch` accepts and commits SetEgress requests, [`table`] knows what the kernel
//! holds and gets it right, [`timers`] says when to wake up, [`report`] builds what clients see,
//! [`health`] tracks whether the rules are in place and writes work, [`families`] says which
//! families are programmed, `recovery` loads (or rebuilds) the stored state, [`error`] types
//! what goes wrong, `metrics` exports what the engine knows to Prometheus.

mod batch;
mod conntrack;
pub mod error;
pub mod families;
mod follow;
pub mod health;
mod metrics;
pub mod poll;
pub mod presence;
mod recovery;
pub mod report;
pub mod table;
pub mod timers;

use kilo_egress_api::egress::{EgressAddrs, Family, ParsedEgress};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

pub use error::{EngineError, FamilyError, Trigger};
pub use report::{FamilyReport, ReportedRule, SetOutcome, StatusReport};
pub use table::cleanup;

use crate::metrics::Metrics;
use crate::netfilter::Netfilter;
use crate::nftwatch::KernelEvent;
use crate::rules::{self, ModeConfig};
use crate::state::{StateStore, StoredState};
use families::ManagedFamilies;
use health::ApplyHealth;
use poll::{CostMeter, PollGate};
use presence::{AbsentPolicy, AddressPresence};
use table::{Freshness, NatTable, Reconciled};
use timers::{DriftDetection, Due, SystemClock, Timers};

/// How long change notifications are collected before the chains are re-checked: a foreign
/// tool's transaction arrives as a burst of messages, and one read answers all of them.
pub const NOTIFICATION_DEBOUNCE: Duration = Duration::from_millis(5);

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Who writes the chain.
    pub mode: ModeConfig,
    /// How often the engine re-reads its chains when no change notifications arrive (legacy).
    pub resync_interval: Duration,
    /// How often the engine re-reads its chains although change notifications arrive.
    pub safety_check_interval: Duration,
    /// Whether to subscribe to nftables change notifications (nft backend only).
    pub kernel_notifications: bool,
    /// Why the backend was chosen, for GetRules.
    pub backend_reason: String,
    /// How long change notifications are collected before a re-check ([`NOTIFICATION_DEBOUNCE`]).
    pub notification_debounce: Duration,
    /// The families the node uses (`--ip-families`); the others are never programmed.
    pub families: Vec<Family>,
    /// Whether to follow the node's addresses (rtnetlink); without, every address counts as
    /// present.
    pub follow_addresses: bool,
    /// What to program while a chosen address is not on the node (`--absent-address`).
    pub absent_address: AbsentPolicy,
    /// Whether our SNAT and MASQUERADE rules carry `--random-fully`.
    pub random_fully: bool,
    /// Why (`--random-fully`, detected, or not supported), for GetRules.
    pub random_fully_reason: String,
    /// Whether a decision change deletes the conntrack entries the old decision NATed.
    pub conntrack_flush: bool,
    /// Where the engine counts what it does (served by `--metrics-listen`).
    pub metrics: Arc<Metrics>,
}

/// A validated SetEgress request.
#[derive(Debug, Clone)]
pub struct SetRequest {
    /// The parsed addresses.
    pub parsed: ParsedEgress,
    /// Only show what would change.
    pub dry_run: bool,
    /// Optimistic concurrency: fail unless the generation equals this.
    pub expected_generation: Option<u64>,
    /// Who asked, for the log.
    pub requester: String,
}

/// Where the answer to a SetEgress request goes.
type SetReply = oneshot::Sender<Result<SetOutcome, EngineError>>;

/// Everything the engine is asked to do.
enum Command {
    /// SetEgress: program a pair (or preview it).
    Set(SetRequest, SetReply),
    /// GetRules: report the state and the rules.
    Get(oneshot::Sender<StatusReport>),
    /// The kernel said our chains changed, or that it stopped saying so.
    Kernel(KernelEvent),
    /// The node's addresses changed.
    Addresses(follow::AddressUpdate),
}

/// A cheap, cloneable handle that sends commands to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    ready: watch::Receiver<bool>,
    accepted: watch::Receiver<StoredState>,
    metrics: Arc<Metrics>,
}

impl EngineHandle {
    /// Sends a SetEgress request and waits until its rules are in the kernel.
    pub async fn set(&self, request: SetRequest) -> Result<SetOutcome, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Set(request, reply))
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Reads the current state and the rules from the kernel.
    pub async fn status(&self) -> Result<StatusReport, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Get(reply))
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)
    }

    /// The metrics the engine feeds, for the server's layers and `/metrics`.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Becomes true after the first successful apply.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// The accepted pair and its generation, without asking the engine or the kernel (for audit
    /// lines of requests that change nothing).
    pub fn accepted(&self) -> (EgressAddrs, u64) {
        let state = *self.accepted.borrow();
        (state.addrs, state.generation)
    }
}

/// The engine's state, owned by its thread: the request loop, the accepted state and its file.
pub struct Engine {
    table: NatTable,
    timers: Timers,
    health: ApplyHealth,
    store: StateStore,
    state: StoredState,
    /// Publishes `state` to [`EngineHandle::accepted`].
    accepted: watch::Sender<StoredState>,
    backend_reason: String,
    notification_debounce: Duration,
    /// Which families a poll reads (polling only).
    poll: PollGate,
    /// The node's addresses, and what to program while a chosen one is absent.
    presence: AddressPresence,
    /// Whether the node's addresses are followed, or why not.
    address_following: Result<(), String>,
    /// Whether our rules carry `--random-fully`, and why (GetRules).
    random_fully: String,
    /// Kilo mode: families whose last reconcile waited for Kilo's agent (no KILO-NAT, or no
    /// MASQUERADE in it), so the next SNAT placed there follows kg's normal start, not drift.
    waiting_for_kilo: BTreeSet<Family>,
    /// `--conntrack-flush`: the decisions committed, and the thread that deletes old flows.
    conntrack: conntrack::FlushState,
    /// Where the engine counts what it does.
    metrics: Arc<Metrics>,
}

impl Engine {
    /// Loads the stored state (recovering from a corrupt one), programs it, and starts the engine thread (and, on nft, the
    /// thread that listens for kernel change notifications). Returns once the first apply has
    /// been attempted, so the stored state is in the kernel before the API serves.
    pub fn start(
        config: EngineConfig,
        netfilter: Arc<dyn Netfilter>,
        store: StateStore,
    ) -> (EngineHandle, std::thread::JoinHandle<()>) {
        let families = ManagedFamilies::new(&config.families, &config.mode);
        for family in families.managed() {
            config.metrics.managed(family);
        }
        let table = NatTable::new(config.mode, families, netfilter)
            .with_random_fully(config.random_fully)
            .with_metrics(config.metrics.clone());
        let (state, unsaved) = recovery::load_state(&store, &table);
        let (commands, inbox) = mpsc::channel();
        // Subscribe before the first read, so no change between that read and the
        // subscription goes unseen.
        let detection = if config.kernel_notifications {
            let events = commands.clone();
            table.watch_changes(Box::new(move |event| {
                events.send(Command::Kernel(event)).is_ok()
            }))
        } else {
            Err("--kernel-notifications=false".to_string())
        };
        let detection = match detection {
            Ok(()) => {
                info!(
                    safety_check_interval = ?config.safety_check_interval,
                    "drift detection: nftables change notifications"
                );
                DriftDetection::Notifications
            }
            Err(why) => {
                info!(resync_interval = ?config.resync_interval, reason = %why, "drift detection: polling");
                DriftDetection::Polling(why)
            }
        };
        let mut presence = AddressPresence::new(config.absent_address);
        let address_following = if config.follow_addresses {
            follow::follow_addresses(&commands, &mut presence)
        } else {
            Err("--follow-addresses is off".to_string())
        };
        match &address_following {
            Ok(()) => {
                info!(absent_address = ?config.absent_address, "following the node's addresses")
            }
            Err(why) if config.follow_addresses => {
                error!(reason = %why, "every egress address counts as present")
            }
            Err(_) => {}
        }
        let (ready_tx, ready_rx) = watch::channel(false);
        let (accepted_tx, accepted_rx) = watch::channel(state);
        let mut engine = Engine {
            table,
            timers: Timers::new(
                Box::new(SystemClock),
                config.resync_interval,
                config.safety_check_interval,
                detection,
            ),
            health: ApplyHealth::new(ready_tx),
            store,
            state,
            accepted: accepted_tx,
            backend_reason: config.backend_reason,
            notification_debounce: config.notification_debounce,
            poll: PollGate::new(config.resync_interval, Instant::now()),
            presence,
            address_following,
            random_fully: config.random_fully_reason,
            waiting_for_kilo: BTreeSet::new(),
            conntrack: conntrack::FlushState::new(config.conntrack_flush, config.metrics.clone()),
            metrics: config.metrics.clone(),
        };
        if let Some(e) = unsaved {
            engine.metrics.state_save_failed();
            engine
                .health
                .save_failed(format!("writing a new state file for {}", state.addrs), &e);
        }
        engine.table.remove_leftovers();
        let meter = CostMeter::start();
        engine.resync(Trigger::Start);
        // The start read every family: polling's first baseline and first cost figure.
        engine.table.take_written_shapes();
        let shapes = engine.shapes();
        engine.poll.baseline(&shapes, meter.cost(), Instant::now());
        engine.timers.checked();
        engine.export_metrics();
        let thread = std::thread::Builder::new()
            .name("egress-engine".into())
            .spawn(move || engine.run(inbox))
            .expect("spawn engine thread");
        (
            EngineHandle {
                commands,
                ready: ready_rx,
                accepted: accepted_rx,
                metrics: config.metrics,
            },
            thread,
        )
    }

    /// The request loop: whatever is due first, else wait for commands until it is.
    fn run(mut self, inbox: mpsc::Receiver<Command>) {
        loop {
            match self.timers.due() {
                Some(Due::Tidy) => self.tidy(),
                Some(Due::Recheck(families)) => self.recheck(families),
                Some(Due::Retry) => self.resync(Trigger::Retry),
                Some(Due::Check) => {
                    self.periodic_check();
                    self.timers.checked();
                }
                None => match inbox.recv_timeout(self.timers.until_next()) {
                    Ok(first) => self.handle_batch(first, &inbox),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                },
            }
            self.export_metrics();
        }
    }

    /// Handles `first` and everything queued behind it: SetEgress requests as one batch,
    /// GetRules after it.
    fn handle_batch(&mut self, first: Command, inbox: &mpsc::Receiver<Command>) {
        let mut sets = Vec::new();
        let mut gets = Vec::new();
        for command in std::iter::once(first).chain(inbox.try_iter()) {
            match command {
                Command::Set(request, reply) => sets.push((request, reply)),
                Command::Get(reply) => gets.push(reply),
                Command::Kernel(event) => self.kernel_event(event),
                Command::Addresses(update) => self.addresses_changed(update),
            }
        }
        if let Some(batch) = self.accept(sets) {
            self.commit(batch);
        }
        if !gets.is_empty() {
            // A reader sees the settled chain, not the moment between commit and tidy.
            self.tidy();
            let report = self.status_report();
            for reply in gets {
                let _ = reply.send(report.clone());
            }
        }
    }

    fn kernel_event(&mut self, event: KernelEvent) {
        match event {
            KernelEvent::Changed { families, writers } => {
                if self.table.is_own_echo(&writers) {
                    // The echo of our own transaction: what it did is known already.
                    debug!(?families, "notification of our own change");
                    return;
                }
                self.table.forget(&families);
                self.timers.recheck(families, self.notification_debounce);
            }
            KernelEvent::Lost(why) => {
                self.timers.notifications_lost(&why);
                self.poll.forget();
                warn!(reason = %why, interval = ?self.timers.check_interval(), "kernel change notifications stopped; polling instead");
                self.table.forget_all();
            }
        }
    }

    /// Programs `addrs` for every managed family; stops at the first family that fails.
    fn apply(
        &mut self,
        addrs: &EgressAddrs,
        freshness: Freshness,
    ) -> Result<Vec<(Family, Reconciled)>, FamilyError> {
        let mut results = Vec::new();
        for family in self.table.families().managed() {
            let applied = self.reconcile(family, addrs, freshness)?;
            results.push((family, applied));
        }
        Ok(results)
    }

    /// Reconciles one family and starts the tidy timer when a tidy was queued.
    fn reconcile(
        &mut self,
        family: Family,
        addrs: &EgressAddrs,
        freshness: Freshness,
    ) -> Result<Reconciled, FamilyError> {
        let programmed = self.presence.programmed(addrs.get(family));
        let started = Instant::now();
        let applied = self.table.reconcile(family, programmed, freshness);
        let rules = applied.as_ref().ok().map(|applied| {
            let chain = applied.settled.kilo_nat.as_ref();
            let owned = (chain.into_iter().flatten())
                .chain(&applied.settled.postrouting)
                .filter(|rule| rule.is_owned())
                .count();
            (chain.map(Vec::len), owned)
        });
        self.metrics.synced(family, started.elapsed(), rules);
        let applied = applied.map_err(|source| FamilyError { family, source })?;
        if applied.desired.waiting.is_some() {
            self.waiting_for_kilo.insert(family);
        } else {
            self.waiting_for_kilo.remove(&family);
        }
        self.decision_committed(family, programmed);
        if applied.tidy_queued {
            self.timers.tidy_queued(self.table.shadowed_rules());
        }
        Ok(applied)
    }

    /// Removes the rules the last switches shadowed; a family whose tidy failed is re-checked
    /// at once.
    fn tidy(&mut self) {
        self.timers.tidied();
        let tidied = self.table.tidy();
        self.health.wrote(&tidied.written);
        if !tidied.failed.is_empty() {
            self.timers.recheck(tidied.failed, Duration::ZERO);
        }
    }

    /// The periodic check: with notifications, the safety check re-reads every family; when
    /// polling, the [`PollGate`] picks the families whose chains are worth a read.
    fn periodic_check(&mut self) {
        if !self.timers.is_polling() {
            return self.resync(Trigger::DriftCheck);
        }
        for (family, shape) in self.table.take_written_shapes() {
            self.poll.wrote(family, shape);
        }
        let shapes = self.shapes();
        let families = self.poll.to_read(Instant::now(), &shapes);
        if families.is_empty() {
            return;
        }
        let read: Vec<_> = shapes
            .into_iter()
            .filter(|(family, _)| families.contains(family))
            .collect();
        let meter = CostMeter::start();
        let repaired = self.reconcile_logged(families, Trigger::DriftCheck);
        self.poll
            .read(&read, meter.cost(), repaired, Instant::now());
    }

    /// Each managed family's table shape now ([`NatTable::shape`]).
    fn shapes(&self) -> Vec<(Family, Option<crate::xtinfo::TableShape>)> {
        (self.table.families().managed().into_iter())
            .map(|family| (family, self.table.shape(family)))
            .collect()
    }

    /// How drift is found, in words (GetRules).
    fn describe_detection(&self) -> String {
        let how = self.timers.describe_detection();
        if self.timers.is_polling() {
            let shaped = (self.table.families().managed().into_iter())
                .any(|family| self.table.shape(family).is_some());
            format!("{how}: {}", self.poll.describe(shaped))
        } else {
            how
        }
    }

    /// Re-reads every managed family and repairs drift, logging what was wrong.
    fn resync(&mut self, trigger: Trigger) {
        self.reconcile_logged(self.table.families().managed(), trigger);
    }

    /// Re-reads the families a change notification named and repairs them if they drifted.
    fn recheck(&mut self, families: BTreeSet<Family>) {
        let managed: Vec<Family> = families
            .into_iter()
            .filter(|f| self.table.families().is_managed(*f))
            .collect();
        self.reconcile_logged(managed, Trigger::KernelNotification);
    }

    /// Reconciles `families` with the accepted state on a fresh read; a failure is retried with
    /// backoff until a reconcile succeeds. Returns whether anything was written.
    fn reconcile_logged(&mut self, families: Vec<Family>, trigger: Trigger) -> bool {
        let started = Instant::now();
        let addrs = self.state.addrs;
        let mut failure = None;
        let mut written = BTreeSet::new();
        for family in families {
            let was_waiting = self.waiting_for_kilo.contains(&family);
            let result = self.reconcile(family, &addrs, Freshness::Read);
            if let Ok(applied) = &result
                && applied.committed
            {
                written.insert(family);
            }
            match result {
                Ok(applied) if applied.rules_touched > 0 && trigger == Trigger::Start => info!(
                    %family,
                    was = %summarise(&applied.drift),
                    rules_touched = applied.rules_touched,
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "programmed the stored state"
                ),
                Ok(applied) if applied.committed && trigger == Trigger::AddressChange => info!(
                    %family,
                    rules_touched = applied.rules_touched,
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "switched the egress decision for the address change"
                ),
                // kg's start (or its repair) wrote the MASQUERADE rule we waited for: no drift.
                Ok(applied) if was_waiting && applied.committed => info!(
                    %family,
                    trigger = %trigger,
                    rules_touched = applied.rules_touched,
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "Kilo's agent wrote its MASQUERADE rule: placed the SNAT rule before it"
                ),
                Ok(applied) if !applied.drift.is_empty() && applied.rules_touched > 0 => {
                    let causes: BTreeSet<&str> = applied
                        .drift
                        .iter()
                        .map(|d| rules::drift_cause(d))
                        .collect();
                    self.metrics.repaired(family, causes);
                    warn!(
                        %family,
                        trigger = %trigger,
                        drift = %summarise(&applied.drift),
                        rules_touched = applied.rules_touched,
                        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "repaired rules"
                    )
                }
                Ok(_) => {}
                Err(e) => failure = Some(e),
            }
        }
        let wrote = !written.is_empty();
        match failure {
            None => {
                self.health.reconciled(&written);
                self.timers.apply_succeeded();
            }
            Some(failure) => {
                // What did succeed on the way still counts as a write that worked.
                self.health.wrote(&written);
                let what = match trigger {
                    Trigger::Start => format!("programming the stored state {addrs}"),
                    Trigger::Rollback => format!("rollback to {addrs}"),
                    Trigger::AddressChange => format!("address change of {addrs}"),
                    other => format!("repair ({other}) of {addrs}"),
                };
                self.health.reconcile_failed(what, Arc::new(failure));
                self.timers.apply_failed();
            }
        }
        wrote
    }

    /// The reports of a SetEgress reply, from the committed plans.
    fn settled_reports(
        &self,
        addrs: &EgressAddrs,
        results: Vec<(Family, Reconciled)>,
    ) -> Vec<FamilyReport> {
        let mut results: std::collections::BTreeMap<Family, Reconciled> =
            results.into_iter().collect();
        let programmed = self.presence.programmed_pair(addrs);
        let mut reports: Vec<FamilyReport> = Family::ALL
            .into_iter()
            .map(|family| {
                if let Some(why) = self.table.families().unmanaged_reason(family) {
                    return report::unmanaged(family, why);
                }
                match results.remove(&family) {
                    Some(applied) => {
                        report::settled(self.table.mode(), family, programmed.get(family), applied)
                    }
                    None => report::not_applied(family),
                }
            })
            .collect();
        self.annotate(&mut reports, addrs);
        reports
    }

    /// Reads every family back from the kernel and reports it with `report`, given the address
    /// programmed for the chosen pair `addrs`.
    fn read_reports(
        &self,
        addrs: &EgressAddrs,
        report: impl Fn(Family, Option<std::net::IpAddr>, table::ReadBack) -> FamilyReport,
    ) -> Vec<FamilyReport> {
        let programmed = self.presence.programmed_pair(addrs);
        let mut reports: Vec<FamilyReport> = Family::ALL
            .into_iter()
            .map(|family| {
                let addr = programmed.get(family);
                if let Some(why) = self.table.families().unmanaged_reason(family) {
                    return report::unmanaged(family, why);
                }
                match self.table.read_back(family, addr) {
                    Ok(read) => report(family, addr, read),
                    Err(e) => report::unreadable(family, &e),
                }
            })
            .collect();
        self.annotate(&mut reports, addrs);
        reports
    }

    /// The rules a request would program, computed from what the kernel holds now.
    fn preview(&self, request: &SetRequest, running: &StoredState) -> SetOutcome {
        let rules = self.read_reports(&request.parsed.addrs, |family, _, read| {
            report::preview(family, read)
        });
        let generation = if request.parsed.addrs == running.addrs {
            running.generation
        } else {
            running.changed_to(request.parsed.addrs).generation
        };
        SetOutcome {
            addrs: request.parsed.addrs,
            generation,
            warnings: [
                request.parsed.warnings(),
                self.absence_warnings(&request.parsed.addrs),
            ]
            .concat(),
            rules: rules.into(),
            dry_run: true,
        }
    }

    fn status_report(&self) -> StatusReport {
        let mode = self.table.mode();
        let families = self.read_reports(&self.state.addrs, |family, addr, read| {
            report::read_back(mode, family, addr, read)
        });
        let last_write_failure =
            self.health
                .last_write_failure()
                .map(|f| report::WriteFailureReport {
                    what: f.what.clone(),
                    at: f.at,
                    error: f.error.clone(),
                });
        let last_error = last_write_failure.as_ref().map(|f| f.error.clone());
        StatusReport {
            addrs: self.state.addrs,
            generation: self.state.generation,
            mode: self.table.mode().mode(),
            in_sync: families.iter().all(|f| f.in_sync)
                && last_error.is_none()
                && !self.health.is_failing(),
            families,
            last_error,
            last_write_failure,
            last_apply: self.health.last_apply(),
            backend: self.table.backend_name(),
            backend_reason: self.backend_reason.clone(),
            drift_detection: self.describe_detection(),
            address_presence: follow::describe(&self.address_following, self.presence.policy()),
            random_fully: self.random_fully.clone(),
            conntrack_flush: self.conntrack.describe(),
            kernel_transactions: self.table.transactions(),
        }
    }
}

/// Drift words for one log line: the first few, and how many more (a flushed 10,000-rule
/// chain must not log 10,000 rules).
fn summarise(drift: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = drift[..drift.len().min(SHOWN)].join("; ");
    if drift.len() > SHOWN {
        text.push_str(&format!("; and {} more", drift.len() - SHOWN));
    }
    text
}

#[cfg(test)]
mod tests;
