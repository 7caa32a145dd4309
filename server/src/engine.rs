//! The engine: the one thread that makes every iptables call. RPC handlers send it commands and
//! wait for the reply. Pending SetEgress commands are drained together and coalesced into one
//! transaction per family, shaped by [`rules::plan`] so the new decision goes in add-only and the
//! rules it shadows are removed once no request waits. Drift is found through nftables change
//! notifications (re-check within milliseconds, plus a slow safety check) or, on legacy, by
//! polling every resync interval.

use kilo_egress_api::egress::{EgressAddrs, Family, ParsedEgress};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, watch};
use tracing::{debug, error, info, warn};

use crate::netfilter::{Netfilter, NetfilterError};
use crate::nftwatch::KernelEvent;
use crate::rules::{
    self, Desired, KILO_NAT, ModeConfig, Observed, ObservedRule, POSTROUTING, Rule,
};
use crate::state::{Loaded, StateError, StateStore, StoredState};

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
}

impl EngineConfig {
    /// A configuration that checks nothing on its own: no change notifications and both check
    /// intervals an hour. For tests against a fake backend, which drive every step themselves.
    pub fn quiet(mode: ModeConfig) -> EngineConfig {
        EngineConfig {
            mode,
            resync_interval: Duration::from_secs(3600),
            safety_check_interval: Duration::from_secs(3600),
            kernel_notifications: false,
            backend_reason: "test".into(),
            notification_debounce: NOTIFICATION_DEBOUNCE,
            families: Family::ALL.to_vec(),
        }
    }
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

/// One rule as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportedRule {
    /// The rule and its counters.
    pub observed: ObservedRule,
    /// Whether the service wrote it.
    pub owned: bool,
}

/// The rules of one family as reported to clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FamilyReport {
    /// The family.
    pub family: Family,
    /// KILO-NAT in kernel order, then (own mode) the owned POSTROUTING jumps.
    pub rules: Vec<ReportedRule>,
    /// Whether the kernel holds exactly what is desired.
    pub in_sync: bool,
    /// A short human-readable status.
    pub status: String,
}

/// The reply to a SetEgress request.
#[derive(Debug, Clone)]
pub struct SetOutcome {
    /// The pair this request chose.
    pub addrs: EgressAddrs,
    /// The generation after this request.
    pub generation: u64,
    /// Ignored addresses and other remarks.
    pub warnings: Vec<String>,
    /// The rules as programmed (or as they would be, for a dry run).
    pub rules: Vec<FamilyReport>,
    /// Whether this was a dry run.
    pub dry_run: bool,
}

/// The reply to a GetRules request.
#[derive(Debug, Clone)]
pub struct StatusReport {
    /// The chosen pair.
    pub addrs: EgressAddrs,
    /// Its generation.
    pub generation: u64,
    /// `own` or `kilo`.
    pub mode: &'static str,
    /// The rules read back from the kernel, per family.
    pub families: Vec<FamilyReport>,
    /// Whether every family is in sync.
    pub in_sync: bool,
    /// The last error met while applying, if the last attempt failed.
    pub last_error: Option<String>,
    /// When rules were last applied successfully.
    pub last_apply: Option<SystemTime>,
    /// The iptables backend.
    pub backend: &'static str,
    /// Why that backend was chosen.
    pub backend_reason: String,
    /// How drift is detected.
    pub drift_detection: String,
    /// Transactions committed since start.
    pub kernel_transactions: u64,
}

/// Why a SetEgress request failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// `expected_generation` did not match.
    #[error(
        "generation is {current}, not the expected {expected}; read the current state (GetRules) and retry"
    )]
    StaleGeneration {
        /// What the caller expected.
        expected: u64,
        /// The current generation.
        current: u64,
    },
    /// The kernel refused the change; the previous state stays programmed.
    #[error("applying the rules failed, the previous egress state stays in place: {0}")]
    Apply(String),
    /// The state could not be saved; nothing was changed.
    #[error("saving the state failed, nothing was changed: {0}")]
    State(String),
    /// The engine is not running.
    #[error("the engine has stopped")]
    Stopped,
}

enum Command {
    Set(SetRequest, oneshot::Sender<Result<SetOutcome, EngineError>>),
    Get(oneshot::Sender<StatusReport>),
    Kernel(KernelEvent),
}

/// A cheap, cloneable handle that sends commands to the engine.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::Sender<Command>,
    ready: watch::Receiver<bool>,
    accepted: watch::Receiver<StoredState>,
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

/// The engine's state, owned by its thread.
pub struct Engine {
    config: EngineConfig,
    netfilter: Arc<dyn Netfilter>,
    store: StateStore,
    state: StoredState,
    last_error: Option<String>,
    last_apply: Option<SystemTime>,
    ready: watch::Sender<bool>,
    /// Publishes `state` to [`EngineHandle::accepted`].
    accepted: watch::Sender<StoredState>,
    /// What the kernel holds per family, as last read or written. Trusted only while change
    /// notifications are on and none arrived for the family since.
    known: BTreeMap<Family, Observed>,
    /// Families a change notification named, and when to re-check them (debounced).
    recheck: Option<(Instant, BTreeSet<Family>)>,
    /// Transactions that remove rules the last commit shadowed, run once the inbox is empty.
    pending_tidy: Vec<(Family, String, Observed)>,
    /// When to run them: [`TIDY_DELAY`] after the last commit that queued one.
    tidy_at: Option<Instant>,
    /// When the oldest pending tidy was queued.
    tidy_since: Option<Instant>,
    /// Whether kernel change notifications arrive; `Err` says why not.
    notifications: Result<(), String>,
    /// Committed transactions since start.
    transactions: u64,
    /// Kilo mode: families whose POSTROUTING held no jump of ours when read.
    postrouting_clean: BTreeSet<Family>,
    /// Port ids of our recent restores, whose change notifications are our own echo.
    own_writers: BTreeSet<u32>,
}

/// What one reconcile of one family did.
struct FamilyApply {
    rules_touched: usize,
    drift: Vec<String>,
    /// What the kernel holds once the pending tidy is in, and what was desired.
    settled: Observed,
    desired: Desired,
}

/// How long change notifications are collected before the chains are re-checked: a foreign
/// tool's transaction arrives as a burst of messages, and one read answers all of them.
pub const NOTIFICATION_DEBOUNCE: Duration = Duration::from_millis(5);

/// How many port ids of our own restores are remembered to recognise their notifications.
const OWN_WRITERS_KEPT: usize = 64;

/// How long after the last switch the rules it shadowed are removed. Deleting costs the kernel
/// far more than adding (~15 ms on nft), so back-to-back switches never wait for it; a burst of
/// switches costs one tidy at its end. Traffic never reaches shadowed rules.
const TIDY_DELAY: Duration = Duration::from_millis(100);

/// The longest a tidy waits for switches to pause.
const TIDY_MAX_DELAY: Duration = Duration::from_secs(1);

/// A tidy runs at once when it would delete this many shadowed rules.
const MAX_SHADOWED_RULES: usize = 16;

impl Engine {
    /// Loads the stored state, programs it, and starts the engine thread (and, on nft, the
    /// thread that listens for kernel change notifications). Returns once the first apply has
    /// been attempted, so the stored state is in the kernel before the API serves.
    pub fn start(
        config: EngineConfig,
        netfilter: Arc<dyn Netfilter>,
        store: StateStore,
    ) -> Result<(EngineHandle, std::thread::JoinHandle<()>), StateError> {
        let state = match store.load()? {
            Loaded::Fresh => {
                info!(path = %store.path().display(), "no stored state: starting with MASQUERADE");
                StoredState::default()
            }
            Loaded::State(state) => {
                info!(egress = %state.addrs, generation = state.generation, "loaded stored state");
                state
            }
            Loaded::Corrupt { reason, moved_to } => {
                error!(
                    %reason,
                    moved_to = %moved_to.display(),
                    "STORED STATE IS CORRUPT: moved it aside and starting with MASQUERADE; set the egress addresses again"
                );
                StoredState::default()
            }
        };
        let (commands, inbox) = mpsc::channel();
        // Subscribe before the first read, so no change between that read and the
        // subscription goes unseen.
        let notifications = if config.kernel_notifications {
            let events = commands.clone();
            netfilter.watch_changes(Box::new(move |event| {
                events.send(Command::Kernel(event)).is_ok()
            }))
        } else {
            Err("--kernel-notifications=false".to_string())
        };
        match &notifications {
            Ok(()) => info!(
                safety_check_interval = ?config.safety_check_interval,
                "drift detection: nftables change notifications"
            ),
            Err(why) => info!(
                resync_interval = ?config.resync_interval,
                reason = %why,
                "drift detection: polling"
            ),
        }
        let (ready_tx, ready_rx) = watch::channel(false);
        let (accepted_tx, accepted_rx) = watch::channel(state);
        let mut engine = Engine {
            config,
            netfilter,
            store,
            state,
            last_error: None,
            last_apply: None,
            ready: ready_tx,
            accepted: accepted_tx,
            known: BTreeMap::new(),
            recheck: None,
            pending_tidy: Vec::new(),
            tidy_at: None,
            tidy_since: None,
            notifications,
            transactions: 0,
            postrouting_clean: BTreeSet::new(),
            own_writers: BTreeSet::new(),
        };
        engine.remove_leftovers();
        engine.resync("start");
        let thread = std::thread::Builder::new()
            .name("egress-engine".into())
            .spawn(move || engine.run(inbox))
            .expect("spawn engine thread");
        Ok((
            EngineHandle {
                commands,
                ready: ready_rx,
                accepted: accepted_rx,
            },
            thread,
        ))
    }

    /// How often every family is re-read: rarely when notifications report changes, else at
    /// the polling interval.
    fn check_interval(&self) -> Duration {
        match self.notifications {
            Ok(()) => self.config.safety_check_interval,
            Err(_) => self.config.resync_interval,
        }
    }

    fn drift_detection(&self) -> String {
        match &self.notifications {
            Ok(()) => format!(
                "nftables change notifications, safety check every {}",
                humantime::format_duration(self.config.safety_check_interval)
            ),
            Err(why) => format!(
                "polling every {} ({why})",
                humantime::format_duration(self.config.resync_interval)
            ),
        }
    }

    fn run(mut self, inbox: mpsc::Receiver<Command>) {
        let mut next_check = Instant::now() + self.check_interval();
        loop {
            let now = Instant::now();
            if self.tidy_at.is_some_and(|at| at <= now) {
                self.run_tidies();
                continue;
            }
            if let Some((at, _)) = &self.recheck
                && *at <= now
            {
                let (_, families) = self.recheck.take().expect("checked above");
                self.recheck_families(families);
                continue;
            }
            if next_check <= now {
                self.resync("drift check");
                next_check = Instant::now() + self.check_interval();
                continue;
            }
            let wake = [
                Some(next_check),
                self.recheck.as_ref().map(|(at, _)| *at),
                self.tidy_at,
            ]
            .into_iter()
            .flatten()
            .min()
            .expect("next_check is always set");
            match inbox.recv_timeout(wake.saturating_duration_since(now)) {
                Ok(first) => self.handle_batch(first, &inbox),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Why the engine leaves `family` alone, or `None` when it programs it.
    fn unmanaged_reason(&self, family: Family) -> Option<String> {
        if !self.config.families.contains(&family) {
            Some(format!("--ip-families excludes {family}"))
        } else if !self.config.mode.manages(family) {
            Some(format!("no {family} --source-cidr"))
        } else {
            None
        }
    }

    fn managed_families(&self) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| self.unmanaged_reason(*f).is_none())
            .collect()
    }

    /// Removes rules of ours that an earlier configuration or mode left in families the engine
    /// no longer manages. Best effort: a family the host cannot program is skipped.
    fn remove_leftovers(&mut self) {
        for family in Family::ALL {
            if self.unmanaged_reason(family).is_none() {
                continue;
            }
            match self.reconcile_family(family, &EgressAddrs::NONE, Freshness::Read) {
                Ok(applied) if applied.rules_touched > 0 => info!(
                    %family,
                    removed = %applied.drift.join("; "),
                    "removed rules of ours from a family this configuration does not manage"
                ),
                Ok(_) => {}
                Err(e) => debug!(%family, error = %e, "not checking an unmanaged family"),
            }
        }
    }

    /// What `addr` wants in `family`, given what the kernel holds.
    fn desire(&self, family: Family, addr: Option<IpAddr>, observed: &Observed) -> Desired {
        match self.unmanaged_reason(family) {
            Some(why) => rules::without_owned_rules(observed, why),
            None => rules::desired(&self.config.mode, family, addr, observed),
        }
    }

    /// Reads one family from the kernel (with counters) and decides what `addr` wants there.
    fn read_back(&self, family: Family, addr: Option<IpAddr>) -> Result<ReadBack, NetfilterError> {
        let chain = self.netfilter.read_chain(family, KILO_NAT)?;
        let postrouting = self
            .netfilter
            .read_chain(family, POSTROUTING)?
            .unwrap_or_default();
        let observed = observed_rules(&chain, &postrouting);
        let desired = self.desire(family, addr, &observed);
        let drift = rules::describe_drift(&self.config.mode, &observed, &desired);
        Ok(ReadBack {
            chain,
            postrouting,
            desired,
            drift,
        })
    }

    /// What the kernel holds for `family`: with [`Freshness::Known`], what the engine last read
    /// or wrote there, unless a change notification (nft) or a failure has dropped it; on legacy
    /// that is at most one polling interval old. Otherwise read from the kernel.
    fn observe(
        &mut self,
        family: Family,
        freshness: Freshness,
    ) -> Result<Observed, NetfilterError> {
        if freshness == Freshness::Known
            && let Some(known) = self.known.get(&family)
        {
            return Ok(known.clone());
        }
        let chain = self.netfilter.read_chain(family, KILO_NAT)?;
        // Kilo mode writes nothing in POSTROUTING; it only removes jumps an earlier own-mode
        // run left there, which can exist only at start. Once seen clean it is not read again.
        let postrouting = if self.postrouting_clean.contains(&family) {
            Vec::new()
        } else {
            self.netfilter
                .read_chain(family, POSTROUTING)?
                .unwrap_or_default()
        };
        if !self.config.mode.owns_chain() && !postrouting.iter().any(|r| r.rule.is_owned()) {
            self.postrouting_clean.insert(family);
        }
        let observed = observed_rules(&chain, &postrouting);
        self.known.insert(family, observed.clone());
        Ok(observed)
    }

    /// Applies one transaction and counts it; forgets what it knew of the family on failure.
    fn restore(&mut self, family: Family, transaction: &str) -> Result<(), NetfilterError> {
        debug!(%family, %transaction, "applying transaction");
        match self.netfilter.restore(family, transaction) {
            Ok(()) => {
                self.transactions += 1;
                if let Some(writer) = self.netfilter.last_writer() {
                    if self.own_writers.len() >= OWN_WRITERS_KEPT {
                        self.own_writers.pop_first();
                    }
                    self.own_writers.insert(writer);
                }
                Ok(())
            }
            Err(e) => {
                self.known.remove(&family);
                Err(e)
            }
        }
    }

    /// Makes `family` right for `addrs` with the cheapest transaction; a tidy transaction for
    /// rules it shadowed is queued. A commit planned on known (not re-read) rules that the kernel
    /// refuses is planned again on a fresh read.
    fn reconcile_family(
        &mut self,
        family: Family,
        addrs: &EgressAddrs,
        freshness: Freshness,
    ) -> Result<FamilyApply, NetfilterError> {
        let mut freshness = freshness;
        loop {
            let observed = self.observe(family, freshness)?;
            let desired = self.desire(family, addrs.get(family), &observed);
            let drift = rules::describe_drift(&self.config.mode, &observed, &desired);
            let plan = rules::plan(&self.config.mode, &observed, &desired);
            let mut rules_touched = 0;
            if let Some(commit) = &plan.commit {
                match self.restore(family, commit) {
                    Ok(()) => rules_touched = count_rule_lines(commit),
                    Err(e) if freshness == Freshness::Known => {
                        debug!(%family, error = %e, "the kernel changed under known rules; reading them again");
                        freshness = Freshness::Read;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.known.insert(family, plan.after_commit);
            self.pending_tidy.retain(|(f, _, _)| *f != family);
            if let Some(tidy) = plan.tidy {
                rules_touched += count_rule_lines(&tidy);
                self.pending_tidy
                    .push((family, tidy, plan.after_tidy.clone()));
                // 100 ms after the last switch, but never later than a second after the first
                // one it waits for, nor once it shadows too many rules: a steady stream of
                // switches must not grow the chain without bound.
                let now = Instant::now();
                let since = *self.tidy_since.get_or_insert(now);
                let shadowed: usize = self
                    .pending_tidy
                    .iter()
                    .map(|(_, t, _)| count_rule_lines(t))
                    .sum();
                self.tidy_at = Some(if shadowed >= MAX_SHADOWED_RULES {
                    now
                } else {
                    (now + TIDY_DELAY).min(since + TIDY_MAX_DELAY)
                });
            }
            return Ok(FamilyApply {
                rules_touched,
                drift,
                settled: plan.after_tidy,
                desired,
            });
        }
    }

    /// Removes the rules the last commits shadowed. A failure only means the chain changed
    /// meanwhile: the family is re-checked at once.
    fn run_tidies(&mut self) {
        self.tidy_at = None;
        self.tidy_since = None;
        for (family, tidy, settled) in std::mem::take(&mut self.pending_tidy) {
            match self.restore(family, &tidy) {
                Ok(()) => {
                    self.known.insert(family, settled);
                }
                Err(e) => {
                    debug!(%family, error = %e, "removing shadowed rules failed; re-checking");
                    self.schedule_recheck([family], Duration::ZERO);
                }
            }
        }
    }

    /// Programs `addrs` for every managed family.
    fn apply(
        &mut self,
        addrs: &EgressAddrs,
        freshness: Freshness,
    ) -> Result<Vec<(Family, FamilyApply)>, String> {
        self.managed_families()
            .into_iter()
            .map(|family| {
                self.reconcile_family(family, addrs, freshness)
                    .map(|applied| (family, applied))
                    .map_err(|e| format!("{family}: {e}"))
            })
            .collect()
    }

    fn note_success(&mut self) {
        if let Some(previous) = self.last_error.take() {
            info!(%previous, "rules are in place again");
        }
        self.last_apply = Some(SystemTime::now());
        self.ready.send_replace(true);
    }

    fn note_failure(&mut self, message: String) {
        if self.last_error.as_deref() != Some(message.as_str()) {
            error!(error = %message, "applying the egress rules failed; retrying at the next check");
        }
        self.last_error = Some(message);
    }

    fn schedule_recheck(&mut self, families: impl IntoIterator<Item = Family>, delay: Duration) {
        let at = Instant::now() + delay;
        let (when, pending) = self.recheck.get_or_insert_with(|| (at, BTreeSet::new()));
        *when = (*when).min(at);
        pending.extend(families);
    }

    /// Re-reads every managed family and repairs drift, logging what was wrong.
    fn resync(&mut self, why: &str) {
        self.reconcile_logged(self.managed_families(), why);
    }

    /// Re-reads the families a change notification named and repairs them if they drifted.
    fn recheck_families(&mut self, families: BTreeSet<Family>) {
        let managed: Vec<Family> = families
            .into_iter()
            .filter(|f| self.unmanaged_reason(*f).is_none())
            .collect();
        self.reconcile_logged(managed, "kernel change notification");
    }

    fn reconcile_logged(&mut self, families: Vec<Family>, why: &str) {
        let started = Instant::now();
        let addrs = self.state.addrs;
        let mut failure = None;
        for family in families {
            match self.reconcile_family(family, &addrs, Freshness::Read) {
                Ok(applied) if applied.rules_touched > 0 && why == "start" => info!(
                    %family,
                    was = %applied.drift.join("; "),
                    rules_touched = applied.rules_touched,
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "programmed the stored state"
                ),
                Ok(applied) if !applied.drift.is_empty() && applied.rules_touched > 0 => warn!(
                    %family,
                    trigger = why,
                    drift = %applied.drift.join("; "),
                    rules_touched = applied.rules_touched,
                    duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                    "repaired rules"
                ),
                Ok(_) => {}
                Err(e) => failure = Some(format!("{family}: {e}")),
            }
        }
        match failure {
            None => self.note_success(),
            Some(message) => self.note_failure(message),
        }
    }

    fn handle_batch(&mut self, first: Command, inbox: &mpsc::Receiver<Command>) {
        let mut sets = Vec::new();
        let mut gets = Vec::new();
        for command in std::iter::once(first).chain(inbox.try_iter()) {
            match command {
                Command::Set(request, reply) => sets.push((request, reply)),
                Command::Get(reply) => gets.push(reply),
                Command::Kernel(KernelEvent::Changed { families, writers }) => {
                    if !writers.is_empty() && writers.is_subset(&self.own_writers) {
                        // The echo of our own transaction: what it did is known already.
                        debug!(?families, "notification of our own change");
                        continue;
                    }
                    for family in &families {
                        self.known.remove(family);
                    }
                    self.schedule_recheck(families, self.config.notification_debounce);
                }
                Command::Kernel(KernelEvent::Lost(why)) => {
                    warn!(reason = %why, interval = ?self.config.resync_interval, "kernel change notifications stopped; polling instead");
                    self.notifications = Err(format!("notifications stopped: {why}"));
                    self.known.clear();
                }
            }
        }
        if !sets.is_empty() {
            self.handle_sets(sets);
        }
        if !gets.is_empty() {
            // A reader sees the settled chain, not the moment between commit and tidy.
            self.run_tidies();
            let report = self.status_report();
            for reply in gets {
                let _ = reply.send(report.clone());
            }
        }
    }

    fn handle_sets(
        &mut self,
        sets: Vec<(SetRequest, oneshot::Sender<Result<SetOutcome, EngineError>>)>,
    ) {
        let started = Instant::now();
        let old = self.state;
        let mut running = old;
        let mut accepted = Vec::new();
        let mut requesters = Vec::new();
        for (request, reply) in sets {
            if let Some(expected) = request.expected_generation
                && expected != running.generation
            {
                let _ = reply.send(Err(EngineError::StaleGeneration {
                    expected,
                    current: running.generation,
                }));
                continue;
            }
            if request.dry_run {
                let _ = reply.send(Ok(self.preview(&request, &running)));
                continue;
            }
            if request.parsed.addrs != running.addrs {
                running = StoredState {
                    addrs: request.parsed.addrs,
                    generation: running.generation + 1,
                };
            }
            requesters.push(request.requester.clone());
            accepted.push((request, running, reply));
        }
        if accepted.is_empty() {
            return;
        }
        if running != old
            && let Err(e) = self.store.save(&running)
        {
            error!(error = %e, "cannot save the state; the change is refused");
            for (_, _, reply) in accepted {
                let _ = reply.send(Err(EngineError::State(e.to_string())));
            }
            return;
        }
        match self.apply(&running.addrs, Freshness::Known) {
            Ok(results) => {
                self.state = running;
                self.accepted.send_replace(running);
                self.note_success();
                let rules_touched: usize = results.iter().map(|(_, a)| a.rules_touched).sum();
                if running != old {
                    info!(
                        requester = %requesters.join(", "),
                        old = %old.addrs,
                        new = %running.addrs,
                        generation = running.generation,
                        coalesced_requests = accepted.len(),
                        rules_touched,
                        duration_ms = started.elapsed().as_secs_f64() * 1000.0,
                        "egress changed"
                    );
                } else if rules_touched > 0 {
                    warn!(requester = %requesters.join(", "), rules_touched, "egress unchanged, but rules had drifted and were repaired");
                } else {
                    debug!(requester = %requesters.join(", "), "egress unchanged");
                }
                let rules = self.settled_reports(&running.addrs, results);
                for (request, state, reply) in accepted {
                    let mut warnings = request.parsed.warnings();
                    if state.generation != running.generation {
                        warnings.push(format!(
                            "superseded by a request coalesced into the same transaction (generation {}, {})",
                            running.generation, running.addrs
                        ));
                    }
                    warnings.extend(waiting_notes(&rules, &state.addrs));
                    let _ = reply.send(Ok(SetOutcome {
                        addrs: state.addrs,
                        generation: state.generation,
                        warnings,
                        rules: rules.clone(),
                        dry_run: false,
                    }));
                }
            }
            Err(message) => {
                error!(error = %message, old = %old.addrs, new = %running.addrs, "applying the change failed; restoring the previous state");
                if running != old
                    && let Err(e) = self.store.save(&old)
                {
                    error!(error = %e, "cannot restore the previous state file");
                }
                self.state = old;
                self.accepted.send_replace(old);
                self.note_failure(message.clone());
                self.resync("rollback");
                for (_, _, reply) in accepted {
                    let _ = reply.send(Err(EngineError::Apply(message.clone())));
                }
            }
        }
    }

    /// The reports of a SetEgress reply: the rules each family holds once the change has
    /// settled, known from the committed plan (so the reply costs no extra read).
    fn settled_reports(
        &self,
        addrs: &EgressAddrs,
        results: Vec<(Family, FamilyApply)>,
    ) -> Vec<FamilyReport> {
        let mut results: BTreeMap<Family, FamilyApply> = results.into_iter().collect();
        Family::ALL
            .into_iter()
            .map(|family| {
                let addr = addrs.get(family);
                if let Some(why) = self.unmanaged_reason(family) {
                    return unmanaged_report(family, why);
                }
                let Some(applied) = results.remove(&family) else {
                    return FamilyReport {
                        family,
                        rules: Vec::new(),
                        in_sync: false,
                        status: "not applied".to_string(),
                    };
                };
                let drift =
                    rules::describe_drift(&self.config.mode, &applied.settled, &applied.desired);
                let rules = applied
                    .settled
                    .postrouting
                    .iter()
                    .filter(|r| r.is_owned())
                    .chain(applied.settled.kilo_nat.iter().flatten())
                    .cloned()
                    .map(without_counters)
                    .collect();
                family_report(family, addr, rules, &drift, applied.desired.waiting)
            })
            .collect()
    }

    /// Builds one report per family from what the kernel holds and what `addrs` wants there.
    fn report_families(
        &self,
        addrs: &EgressAddrs,
        report: impl Fn(Family, Option<IpAddr>, ReadBack) -> FamilyReport,
    ) -> Vec<FamilyReport> {
        Family::ALL
            .into_iter()
            .map(|family| {
                let addr = addrs.get(family);
                if let Some(why) = self.unmanaged_reason(family) {
                    return unmanaged_report(family, why);
                }
                match self.read_back(family, addr) {
                    Ok(read) => report(family, addr, read),
                    Err(e) => FamilyReport {
                        family,
                        rules: Vec::new(),
                        in_sync: false,
                        status: format!("cannot read the rules: {e}"),
                    },
                }
            })
            .collect()
    }

    /// The rules a request would program, computed from what the kernel holds now.
    fn preview(&self, request: &SetRequest, running: &StoredState) -> SetOutcome {
        let rules = self.report_families(&request.parsed.addrs, |family, _, read| {
            let in_sync = read.drift.is_empty();
            let status = read.desired.waiting.clone().unwrap_or_else(|| {
                if in_sync {
                    "dry run: nothing would change".to_string()
                } else {
                    "dry run: these rules would be programmed".to_string()
                }
            });
            FamilyReport {
                family,
                rules: desired_rules(&read.desired)
                    .into_iter()
                    .map(without_counters)
                    .collect(),
                in_sync,
                status,
            }
        });
        let generation = if request.parsed.addrs == running.addrs {
            running.generation
        } else {
            running.generation + 1
        };
        SetOutcome {
            addrs: request.parsed.addrs,
            generation,
            warnings: request.parsed.warnings(),
            rules,
            dry_run: true,
        }
    }

    /// Reads every family back from the kernel and compares it with the desired state.
    fn family_reports(&self, addrs: &EgressAddrs) -> Vec<FamilyReport> {
        self.report_families(addrs, |family, addr, read| {
            let rules: Vec<ReportedRule> = read
                .postrouting
                .into_iter()
                .filter(|r| r.rule.is_owned())
                .chain(read.chain.unwrap_or_default())
                .map(|observed| ReportedRule {
                    owned: observed.rule.is_owned(),
                    observed,
                })
                .collect();
            family_report(family, addr, rules, &read.drift, read.desired.waiting)
        })
    }

    fn status_report(&self) -> StatusReport {
        let families = self.family_reports(&self.state.addrs);
        StatusReport {
            addrs: self.state.addrs,
            generation: self.state.generation,
            mode: self.config.mode.name(),
            in_sync: families.iter().all(|f| f.in_sync) && self.last_error.is_none(),
            families,
            last_error: self.last_error.clone(),
            last_apply: self.last_apply,
            backend: self.netfilter.backend_name(),
            backend_reason: self.config.backend_reason.clone(),
            drift_detection: self.drift_detection(),
            kernel_transactions: self.transactions,
        }
    }
}

/// Whether a plan may start from what the engine knows or must read the kernel first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    /// Use what the engine knows (a switch costs one process). Should the kernel have changed
    /// unseen, the commit fails and is planned again on a read, or the drift is repaired at the
    /// next notification or poll, as it would be without the switch.
    Known,
    /// Read the kernel.
    Read,
}

/// A rule reported before the kernel has counted anything for it (planned, not read).
fn without_counters(rule: Rule) -> ReportedRule {
    ReportedRule {
        owned: rule.is_owned(),
        observed: ObservedRule {
            rule,
            packets: 0,
            bytes: 0,
        },
    }
}

fn count_rule_lines(transaction: &str) -> usize {
    transaction.lines().filter(|l| l.starts_with('-')).count()
}

fn unmanaged_report(family: Family, why: String) -> FamilyReport {
    FamilyReport {
        family,
        rules: Vec::new(),
        in_sync: true,
        status: format!("not managed: {why}"),
    }
}

/// The report of one family: its rules (owned jumps first, they send traffic into the chain)
/// and a status line.
fn family_report(
    family: Family,
    addr: Option<IpAddr>,
    rules: Vec<ReportedRule>,
    drift: &[String],
    waiting: Option<String>,
) -> FamilyReport {
    let in_sync = drift.is_empty() && (waiting.is_none() || addr.is_none());
    let status = if !drift.is_empty() {
        format!("drift: {}", drift.join("; "))
    } else if let Some(waiting) = waiting {
        waiting
    } else {
        addr.map_or_else(|| "MASQUERADE".to_string(), |a| format!("SNAT to {a}"))
    };
    FamilyReport {
        family,
        rules,
        in_sync,
        status,
    }
}

/// One family as read from the kernel, with what the engine wants there.
struct ReadBack {
    chain: Option<Vec<ObservedRule>>,
    postrouting: Vec<ObservedRule>,
    desired: Desired,
    drift: Vec<String>,
}

fn observed_rules(chain: &Option<Vec<ObservedRule>>, postrouting: &[ObservedRule]) -> Observed {
    Observed {
        kilo_nat: chain
            .as_ref()
            .map(|rules| rules.iter().map(|r| r.rule.clone()).collect()),
        postrouting: postrouting.iter().map(|r| r.rule.clone()).collect(),
    }
}

fn desired_rules(desired: &Desired) -> Vec<Rule> {
    desired
        .jumps
        .iter()
        .cloned()
        .chain(desired.kilo_nat.clone().unwrap_or_default())
        .collect()
}

/// Why an address this request chose is not (yet) programmed, one note per such family.
fn waiting_notes(reports: &[FamilyReport], addrs: &EgressAddrs) -> Vec<String> {
    reports
        .iter()
        .filter(|r| addrs.get(r.family).is_some() && !r.in_sync)
        .map(|r| format!("{}: {}", r.family, r.status))
        .collect()
}

/// Removes every rule the service wrote, for both families (`kilo-egressd cleanup`).
pub fn cleanup(mode: &ModeConfig, netfilter: &dyn Netfilter) -> Result<usize, NetfilterError> {
    let mut removed = 0;
    for family in Family::ALL {
        let chain = netfilter.read_chain(family, KILO_NAT)?;
        let postrouting = netfilter
            .read_chain(family, POSTROUTING)?
            .unwrap_or_default();
        let observed = observed_rules(&chain, &postrouting);
        for (i, transaction) in rules::plan_cleanup(mode, &observed).into_iter().enumerate() {
            match netfilter.restore(family, &transaction) {
                Ok(()) => {
                    removed += transaction.lines().filter(|l| l.starts_with("-D")).count();
                    let lines: Vec<&str> =
                        transaction.lines().filter(|l| l.starts_with('-')).collect();
                    info!(%family, rules = %lines.join("; "), "removed");
                }
                // The second transaction only deletes the then-empty chain; it fails when
                // something else still jumps to it, and that is fine.
                Err(e) if i > 0 => warn!(%family, error = %e, "left chain {KILO_NAT} in place"),
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::FakeNetfilter;
    use kilo_egress_api::egress::parse_egress_list;

    fn own_mode() -> ModeConfig {
        ModeConfig::Own {
            source_cidrs: vec![
                "10.44.0.0/24".parse().unwrap(),
                "fd00:44::/64".parse().unwrap(),
            ],
            no_nat_cidrs: vec![],
        }
    }

    fn start(fake: &Arc<FakeNetfilter>, dir: &std::path::Path) -> EngineHandle {
        let config = EngineConfig::quiet(own_mode());
        Engine::start(config, fake.clone(), StateStore::new(dir))
            .unwrap()
            .0
    }

    fn set(entries: &[&str]) -> SetRequest {
        SetRequest {
            parsed: parse_egress_list(entries).unwrap(),
            dry_run: false,
            expected_generation: None,
            requester: "test".into(),
        }
    }

    #[tokio::test]
    async fn start_programs_masquerade_and_becomes_ready() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        assert!(*handle.ready().borrow());
        let chain = fake.chain(Family::Ipv4, KILO_NAT).unwrap();
        assert!(chain[0].ends_with("-j MASQUERADE"), "{chain:?}");
        assert_eq!(fake.chain(Family::Ipv6, POSTROUTING).unwrap().len(), 1);
    }

    #[tokio::test]
    async fn set_programs_snat_and_persists() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        let outcome = handle
            .set(set(&["2001:db8::20", "198.51.100.20"]))
            .await
            .unwrap();
        assert_eq!(outcome.generation, 1);
        assert!(
            fake.chain(Family::Ipv4, KILO_NAT).unwrap()[0].ends_with("--to-source 198.51.100.20")
        );
        assert!(
            fake.chain(Family::Ipv6, KILO_NAT).unwrap()[0].ends_with("--to-source 2001:db8::20")
        );
        assert!(
            outcome.rules.iter().all(|r| r.in_sync),
            "{:?}",
            outcome.rules
        );
        // A restarted engine programs the stored state without any client.
        let fresh = Arc::new(FakeNetfilter::new());
        let again = start(&fresh, dir.path());
        let status = again.status().await.unwrap();
        assert_eq!(status.generation, 1);
        assert!(fresh.chain(Family::Ipv4, KILO_NAT).unwrap()[0].contains("198.51.100.20"));
    }

    #[tokio::test]
    async fn stale_generation_is_refused_and_changes_nothing() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        handle.set(set(&["198.51.100.20"])).await.unwrap();
        handle.status().await.unwrap(); // the shadowed rule is gone
        let before = fake.chain(Family::Ipv4, KILO_NAT);
        let mut stale = set(&["198.51.100.99"]);
        stale.expected_generation = Some(0);
        let err = handle.set(stale).await.unwrap_err();
        assert!(matches!(
            err,
            EngineError::StaleGeneration {
                expected: 0,
                current: 1
            }
        ));
        assert_eq!(fake.chain(Family::Ipv4, KILO_NAT), before);
    }

    #[tokio::test]
    async fn dry_run_changes_nothing() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        let transactions = fake.transactions();
        let mut dry = set(&["198.51.100.20"]);
        dry.dry_run = true;
        let outcome = handle.set(dry).await.unwrap();
        assert!(outcome.dry_run);
        let shown: Vec<String> = outcome.rules[0]
            .rules
            .iter()
            .map(|r| r.observed.rule.spec())
            .collect();
        assert!(
            shown
                .iter()
                .any(|s| s.contains("--to-source 198.51.100.20")),
            "{shown:?}"
        );
        assert_eq!(fake.transactions(), transactions);
        assert_eq!(handle.status().await.unwrap().generation, 0);
    }

    #[tokio::test]
    async fn concurrent_sets_are_coalesced() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        let before = fake.transactions();
        let calls: Vec<_> = (1..=50)
            .map(|i| {
                let handle = handle.clone();
                tokio::spawn(async move { handle.set(set(&[&format!("198.51.100.{i}")])).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        let used = fake.transactions() - before;
        assert!(used < 50, "50 calls cost {used} transactions");
        assert_eq!(handle.status().await.unwrap().generation, 50);
    }

    #[tokio::test]
    async fn drift_is_repaired_at_resync() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let config = EngineConfig {
            resync_interval: Duration::from_millis(20),
            ..EngineConfig::quiet(own_mode())
        };
        let handle = Engine::start(config, fake.clone(), StateStore::new(dir.path()))
            .unwrap()
            .0;
        handle.set(set(&["198.51.100.20"])).await.unwrap();
        handle.status().await.unwrap(); // the shadowed rule is gone
        let good = fake.chain(Family::Ipv4, KILO_NAT);
        fake.tamper(Family::Ipv4, |t| {
            t.get_mut(KILO_NAT).unwrap().clear();
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.chain(Family::Ipv4, KILO_NAT) != good {
            assert!(Instant::now() < deadline, "drift not repaired");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn failed_apply_rolls_back_state_and_the_family_that_succeeded() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        handle
            .set(set(&["198.51.100.20", "2001:db8::20"]))
            .await
            .unwrap();
        handle.status().await.unwrap(); // the shadowed rules are gone
        let saved = std::fs::read(dir.path().join("state.json")).unwrap();
        let ipv4_before = fake.chain(Family::Ipv4, KILO_NAT);
        // IPv4 applies first and succeeds; IPv6 then fails, also on a fresh read, because its
        // chains vanished (the built-in POSTROUTING cannot be recreated by a restore).
        fake.tamper(Family::Ipv6, |t| {
            t.remove(POSTROUTING);
            t.remove(KILO_NAT);
        });
        let err = handle
            .set(set(&["198.51.100.99", "2001:db8::99"]))
            .await
            .unwrap_err();
        assert!(matches!(err, EngineError::Apply(_)), "{err}");
        handle.status().await.unwrap(); // the rollback has settled
        assert_eq!(std::fs::read(dir.path().join("state.json")).unwrap(), saved);
        assert_eq!(handle.status().await.unwrap().generation, 1);
        assert_eq!(
            fake.chain(Family::Ipv4, KILO_NAT),
            ipv4_before,
            "IPv4 is put back to the previous state"
        );
    }

    #[tokio::test]
    async fn rules_of_an_excluded_family_are_removed_at_start() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let first = start(&fake, dir.path());
        first
            .set(set(&["198.51.100.20", "2001:db8::20"]))
            .await
            .unwrap();
        // A status read waits for the shadowed MASQUERADE rules to be removed.
        first.status().await.unwrap();
        assert!(fake.chain(Family::Ipv6, KILO_NAT).unwrap().len() == 1);
        let config = EngineConfig {
            families: vec![Family::Ipv4],
            ..EngineConfig::quiet(own_mode())
        };
        let handle = Engine::start(config, fake.clone(), StateStore::new(dir.path()))
            .unwrap()
            .0;
        assert_eq!(fake.chain(Family::Ipv6, KILO_NAT), Some(vec![]));
        assert!(fake.chain(Family::Ipv6, POSTROUTING).unwrap().is_empty());
        assert!(fake.chain(Family::Ipv4, KILO_NAT).unwrap()[0].contains("198.51.100.20"));
        let status = handle.status().await.unwrap();
        assert!(
            status.families[1]
                .status
                .contains("--ip-families excludes IPv6")
        );
        assert!(status.in_sync);
    }

    fn start_notified(fake: &Arc<FakeNetfilter>, dir: &std::path::Path) -> EngineHandle {
        start_notified_with_debounce(fake, dir, NOTIFICATION_DEBOUNCE)
    }

    fn start_notified_with_debounce(
        fake: &Arc<FakeNetfilter>,
        dir: &std::path::Path,
        debounce: Duration,
    ) -> EngineHandle {
        let config = EngineConfig {
            kernel_notifications: true,
            notification_debounce: debounce,
            ..EngineConfig::quiet(own_mode())
        };
        Engine::start(config, fake.clone(), StateStore::new(dir))
            .unwrap()
            .0
    }

    async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// An engine on a notifying fake with SNAT to 198.51.100.20 programmed and settled.
    async fn notified_engine_with_snat() -> (Arc<FakeNetfilter>, tempfile::TempDir, EngineHandle) {
        let fake = Arc::new(FakeNetfilter::with_change_notifications());
        let dir = tempfile::tempdir().unwrap();
        let handle = start_notified(&fake, dir.path());
        handle.set(set(&["198.51.100.20"])).await.unwrap();
        handle.status().await.unwrap();
        assert_eq!(
            fake.chain(Family::Ipv4, KILO_NAT),
            snat_only("198.51.100.20")
        );
        (fake, dir, handle)
    }

    fn snat_only(addr: &str) -> Option<Vec<String>> {
        let rule = rules::snat_rule(addr.parse().unwrap());
        Some(vec![rule.spec()])
    }

    #[tokio::test]
    async fn switch_commits_add_only_then_removes_the_shadowed_rule() {
        let (fake, _dir, handle) = notified_engine_with_snat().await;
        let before = fake.committed().len();
        let outcome = handle.set(set(&["198.51.100.99"])).await.unwrap();
        assert!(outcome.rules[0].in_sync, "{:?}", outcome.rules[0]);
        wait_for("the shadowed rule to be removed", || {
            fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.99")
        })
        .await;
        let ipv4: Vec<String> = fake.committed()[before..]
            .iter()
            .filter(|(f, _)| *f == Family::Ipv4)
            .map(|(_, t)| t.clone())
            .collect();
        assert_eq!(ipv4.len(), 2, "{ipv4:#?}");
        let rule_lines = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| l.starts_with('-') || l.starts_with(':'))
                .map(str::to_string)
                .collect()
        };
        let commit = rule_lines(&ipv4[0]);
        assert!(
            commit.len() == 1
                && commit[0].starts_with("-I KILO-NAT 1 ")
                && commit[0].contains("198.51.100.99"),
            "the switch is one insert in front of the old rule: {commit:?}"
        );
        let tidy = rule_lines(&ipv4[1]);
        assert!(
            tidy.len() == 1
                && tidy[0].starts_with("-D KILO-NAT ")
                && tidy[0].contains("198.51.100.20"),
            "the old rule goes afterwards: {tidy:?}"
        );
    }

    #[tokio::test]
    async fn a_notified_change_is_repaired_without_polling() {
        let (fake, _dir, handle) = notified_engine_with_snat().await;
        fake.tamper(Family::Ipv4, |t| {
            t.get_mut(KILO_NAT).unwrap().clear();
        });
        // Both check intervals are an hour: only the notification can bring the rule back.
        wait_for("the repair", || {
            fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.20")
        })
        .await;
        let status = handle.status().await.unwrap();
        assert!(
            status
                .drift_detection
                .starts_with("nftables change notifications")
        );
    }

    #[tokio::test]
    async fn a_foreign_change_costs_a_read_and_no_write() {
        let (fake, _dir, handle) = notified_engine_with_snat().await;
        // Let the re-check of our own write happen first.
        let status = handle.status().await.unwrap();
        assert!(status.in_sync);
        let writes = fake.transactions();
        let reads = fake.reads();
        fake.tamper(Family::Ipv4, |t| {
            t.entry("KUBE-SVC-TEST".into())
                .or_default()
                .push("-A KUBE-SVC-TEST -j RETURN".into());
        });
        wait_for("the re-check", || fake.reads() > reads).await;
        assert_eq!(
            handle.status().await.unwrap().kernel_transactions,
            status.kernel_transactions
        );
        assert_eq!(fake.transactions(), writes, "nothing of ours was wrong");
    }

    #[tokio::test]
    async fn a_switch_on_outdated_knowledge_still_ends_right() {
        let (fake, _dir, handle) = notified_engine_with_snat().await;
        handle.status().await.unwrap();
        // A change whose notification was lost: the engine's knowledge is outdated.
        fake.tamper_silently(Family::Ipv4, |t| {
            t.insert(KILO_NAT.into(), vec!["-A KILO-NAT -j RETURN".into(); 3]);
        });
        handle.set(set(&["198.51.100.99"])).await.unwrap();
        wait_for("the chain to be right", || {
            fake.chain(Family::Ipv4, KILO_NAT) == snat_only("198.51.100.99")
        })
        .await;
    }

    #[tokio::test]
    async fn own_notifications_keep_the_known_state_and_foreign_ones_drop_it() {
        let fake = Arc::new(FakeNetfilter::with_change_notifications());
        let dir = tempfile::tempdir().unwrap();
        // A notification that is not our own echo waits an hour for its re-check, but drops what
        // the engine knows at once: the next switch must read.
        let handle = start_notified_with_debounce(&fake, dir.path(), Duration::from_secs(3600));
        handle.set(set(&["198.51.100.20"])).await.unwrap();
        handle.status().await.unwrap();
        let reads = fake.reads();
        handle.set(set(&["198.51.100.99"])).await.unwrap();
        assert_eq!(
            fake.reads(),
            reads,
            "a switch after our own writes reads nothing"
        );
        handle.status().await.unwrap();
        let reads = fake.reads();
        fake.tamper(Family::Ipv4, |_| {});
        handle.set(set(&["198.51.100.20"])).await.unwrap();
        assert!(
            fake.reads() > reads,
            "a foreign change makes the next switch read"
        );
    }

    #[tokio::test]
    async fn a_stream_of_switches_never_piles_up_shadowed_rules() {
        let fake = Arc::new(FakeNetfilter::new());
        let dir = tempfile::tempdir().unwrap();
        let handle = start(&fake, dir.path());
        let mut longest = 0;
        // Far less than 100 ms apart: without a bound the tidy would wait for all of them.
        for i in 0..60 {
            handle
                .set(set(&[&format!("198.51.100.{}", i % 2 + 20)]))
                .await
                .unwrap();
            longest = longest.max(fake.chain(Family::Ipv4, KILO_NAT).unwrap().len());
        }
        assert!(
            longest <= MAX_SHADOWED_RULES + 1,
            "KILO-NAT grew to {longest} rules"
        );
    }
}
