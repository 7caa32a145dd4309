//! The nat table as the engine sees it, in the style of Calico felix's `Table`: one value owns,
//! per family, what it believes the kernel holds and how to get it right. It observes (or trusts
//! what it knows), reconciles a family with the cheapest transaction, keeps the tidy transactions
//! of add-only switches until they are due, forgets a family when a change notification says its
//! knowledge is stale, recognises the echo of its own transactions, and removes everything it
//! owns. It has no thread and no timer of its own: the engine decides when it runs.

use kilo_egress_api::egress::{EgressAddrs, Family};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use tracing::{debug, info, warn};

use super::families::ManagedFamilies;
use crate::metrics::Metrics;
use crate::netfilter::{ChangeForwarder, Netfilter, NetfilterError};
use crate::rules::{
    self, Desired, FixedRules, KILO_NAT, ModeConfig, Observed, ObservedRule, POSTROUTING,
    Transaction,
};
use crate::xtinfo::TableShape;

/// How many port ids of our own restores are remembered to recognise their notifications.
const OWN_WRITERS_KEPT: usize = 64;

/// Whether a plan may start from what the table knows or must read the kernel first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Use what the table knows (a switch costs one process). Should the kernel have changed
    /// unseen, the commit fails and is planned again on a read, or the drift is repaired at the
    /// next notification or poll, as it would be without the switch.
    Known,
    /// Read the kernel.
    Read,
}

/// What one reconcile of one family did.
#[derive(Debug)]
pub struct Reconciled {
    /// Rules added, inserted or deleted, counting the queued tidy.
    pub rules_touched: usize,
    /// How the kernel differed from the desired state before, in words.
    pub drift: Vec<String>,
    /// What the kernel holds once the pending tidy is in.
    pub settled: Observed,
    /// What was desired.
    pub desired: Desired,
    /// Whether a tidy was queued for rules the commit shadowed.
    pub tidy_queued: bool,
    /// Whether a transaction was committed.
    pub committed: bool,
}

/// One family as read from the kernel, with what the engine wants there.
#[derive(Debug)]
pub struct ReadBack {
    /// KILO-NAT with counters, `None` when the chain does not exist.
    pub chain: Option<Vec<ObservedRule>>,
    /// POSTROUTING with counters.
    pub postrouting: Vec<ObservedRule>,
    /// What the engine wants there.
    pub desired: Desired,
    /// How the kernel differs from it.
    pub drift: Vec<String>,
}

/// What a [`NatTable::tidy`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Tidied {
    /// Families whose tidy was committed.
    pub written: BTreeSet<Family>,
    /// Families whose tidy failed: they must be re-checked.
    pub failed: Vec<Family>,
}

/// A transaction that removes rules a switch shadowed, and what the family holds after it.
struct PendingTidy {
    family: Family,
    transaction: Transaction,
    settled: Observed,
}

/// What the kernel holds for each family, and how to get it right.
pub struct NatTable {
    mode: ModeConfig,
    /// The rules of each family that no address changes, rendered once: every desired chain,
    /// and every chain read back, shares their text.
    fixed: BTreeMap<Family, FixedRules>,
    families: ManagedFamilies,
    netfilter: Arc<dyn Netfilter>,
    /// What the kernel holds per family, as last read or written; dropped when a change
    /// notification or a failure says it may be stale.
    known: BTreeMap<Family, Observed>,
    /// Kilo mode: families whose POSTROUTING held no jump of ours when read.
    postrouting_clean: BTreeSet<Family>,
    /// Port ids of our recent restores, oldest first: their notifications are our own echo.
    own_writers: VecDeque<u32>,
    /// Tidies queued by switches, run when the engine says they are due.
    pending_tidy: Vec<PendingTidy>,
    /// Committed transactions since start.
    transactions: u64,
    /// Whether our SNAT and MASQUERADE rules carry `--random-fully`.
    random_fully: bool,
    /// The table's shape right after each of our writes since [`NatTable::take_written_shapes`].
    written_shapes: BTreeMap<Family, TableShape>,
    /// Counts every transaction by family and result.
    metrics: Arc<Metrics>,
}

impl NatTable {
    /// A table that knows nothing yet.
    pub fn new(
        mode: ModeConfig,
        families: ManagedFamilies,
        netfilter: Arc<dyn Netfilter>,
    ) -> NatTable {
        NatTable {
            fixed: Family::ALL
                .into_iter()
                .map(|family| (family, FixedRules::new(&mode, family)))
                .collect(),
            mode,
            families,
            netfilter,
            known: BTreeMap::new(),
            postrouting_clean: BTreeSet::new(),
            own_writers: VecDeque::new(),
            pending_tidy: Vec::new(),
            transactions: 0,
            random_fully: false,
            written_shapes: BTreeMap::new(),
            metrics: Arc::default(),
        }
    }

    /// The same table, counting its transactions into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> NatTable {
        self.metrics = metrics;
        self
    }

    /// The table's shape right after our last write of each family written since the last
    /// call (legacy only): what polling may take as read, since the table knows what it wrote.
    pub fn take_written_shapes(&mut self) -> BTreeMap<Family, TableShape> {
        std::mem::take(&mut self.written_shapes)
    }

    /// The same table, writing our SNAT and MASQUERADE rules with `--random-fully` when `on`.
    pub fn with_random_fully(mut self, on: bool) -> NatTable {
        self.random_fully = on;
        self
    }

    /// Who writes the chain.
    pub fn mode(&self) -> &ModeConfig {
        &self.mode
    }

    /// The families the table programs.
    pub fn families(&self) -> &ManagedFamilies {
        &self.families
    }

    /// The backend name reported to users.
    pub fn backend_name(&self) -> &'static str {
        self.netfilter.backend_name()
    }

    /// Committed transactions since start.
    pub fn transactions(&self) -> u64 {
        self.transactions
    }

    /// Subscribes `forward` to the backend's change notifications, or says why there are none.
    pub fn watch_changes(&self, forward: ChangeForwarder) -> Result<(), String> {
        self.netfilter.watch_changes(forward)
    }

    /// The cheap look at `family`'s nat table that polling compares ([`Netfilter::table_shape`]).
    pub fn shape(&self, family: Family) -> Option<TableShape> {
        self.netfilter.table_shape(family)
    }

    /// Whether a change notification by `writers` is only the echo of our own restores.
    pub fn is_own_echo(&self, writers: &BTreeSet<u32>) -> bool {
        !writers.is_empty() && writers.iter().all(|w| self.own_writers.contains(w))
    }

    /// Drops what the table knows of `families`: their next plan reads the kernel.
    pub fn forget(&mut self, families: &BTreeSet<Family>) {
        for family in families {
            self.known.remove(family);
        }
    }

    /// Drops everything the table knows.
    pub fn forget_all(&mut self) {
        self.known.clear();
    }

    /// What `addr` wants in `family`, given what the kernel holds.
    fn desire(&self, family: Family, addr: Option<IpAddr>, observed: &Observed) -> Desired {
        if let Some(why) = self.families.unmanaged_reason(family) {
            return rules::without_owned_rules(observed, why.to_string());
        }
        let desired = rules::desired_from(&self.mode, &self.fixed[&family], family, addr, observed);
        if self.random_fully {
            desired.with_random_fully()
        } else {
            desired
        }
    }

    /// Reads KILO-NAT of `family`; where it holds the rules rendered once, it shares their text.
    fn read_kilo_nat(&self, family: Family) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        let like = &self.fixed[&family].returns;
        self.netfilter.read_chain_like(family, KILO_NAT, like)
    }

    /// Reads one family from the kernel (with counters) and decides what `addr` wants there.
    /// Changes nothing the table knows.
    pub fn read_back(
        &self,
        family: Family,
        addr: Option<IpAddr>,
    ) -> Result<ReadBack, NetfilterError> {
        let chain = self.read_kilo_nat(family)?;
        let postrouting = self
            .netfilter
            .read_chain(family, POSTROUTING)?
            .unwrap_or_default();
        let observed = observed_rules(&chain, &postrouting);
        let desired = self.desire(family, addr, &observed);
        let drift = rules::describe_drift(&self.mode, &observed, &desired);
        Ok(ReadBack {
            chain,
            postrouting,
            desired,
            drift,
        })
    }

    /// What the kernel holds for `family`: with [`Freshness::Known`], what the table last read
    /// or wrote there, unless it was forgotten since; on legacy that is at most one polling
    /// interval old. Otherwise read from the kernel.
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
        let chain = self.read_kilo_nat(family)?;
        // Kilo mode writes nothing in POSTROUTING; it only removes jumps an earlier own-mode
        // run left there, which can exist only at start. Once seen clean it is not read again.
        let postrouting = if self.postrouting_clean.contains(&family) {
            Vec::new()
        } else {
            self.netfilter
                .read_chain(family, POSTROUTING)?
                .unwrap_or_default()
        };
        if !self.mode.owns_chain() && !postrouting.iter().any(|r| r.rule.is_owned()) {
            self.postrouting_clean.insert(family);
        }
        let observed = observed_rules(&chain, &postrouting);
        self.known.insert(family, observed.clone());
        Ok(observed)
    }

    /// Applies one transaction and counts it; forgets what it knew of the family on failure.
    fn restore(&mut self, family: Family, transaction: &Transaction) -> Result<(), NetfilterError> {
        debug!(%family, %transaction, "applying transaction");
        let result = self.netfilter.restore(family, transaction);
        self.metrics.restored(family, result.is_ok());
        match result {
            Ok(()) => {
                self.transactions += 1;
                // Our own write changes the table's shape: polling must not pay a read for it.
                if let Some(shape) = self.netfilter.table_shape(family) {
                    self.written_shapes.insert(family, shape);
                }
                if let Some(writer) = self.netfilter.last_writer() {
                    if self.own_writers.len() >= OWN_WRITERS_KEPT {
                        self.own_writers.pop_front();
                    }
                    self.own_writers.push_back(writer);
                }
                Ok(())
            }
            Err(e) => {
                self.known.remove(&family);
                Err(e)
            }
        }
    }

    /// Makes `family` right for `addr` with the cheapest transaction; a tidy transaction for
    /// rules it shadowed is queued ([`Reconciled::tidy_queued`]). A commit planned on known (not
    /// re-read) rules that the kernel refuses is planned again on a fresh read.
    pub fn reconcile(
        &mut self,
        family: Family,
        addr: Option<IpAddr>,
        freshness: Freshness,
    ) -> Result<Reconciled, NetfilterError> {
        let mut freshness = freshness;
        loop {
            let observed = self.observe(family, freshness)?;
            let desired = self.desire(family, addr, &observed);
            let drift = rules::describe_drift(&self.mode, &observed, &desired);
            let plan = rules::plan(&self.mode, &observed, &desired);
            let mut rules_touched = 0;
            let committed = plan.commit.is_some();
            if let Some(commit) = &plan.commit {
                match self.restore(family, commit) {
                    Ok(()) => rules_touched = commit.rule_count(),
                    // A held xtables lock is no sign of a changed chain: reading again would
                    // only wait for the lock twice more.
                    Err(e) if freshness == Freshness::Known && !e.is_lock_timeout() => {
                        debug!(%family, error = %e, "the kernel changed under known rules; reading them again");
                        freshness = Freshness::Read;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            self.known.insert(family, plan.after_commit);
            self.pending_tidy.retain(|t| t.family != family);
            let tidy_queued = plan.tidy.is_some();
            if let Some(transaction) = plan.tidy {
                rules_touched += transaction.rule_count();
                self.pending_tidy.push(PendingTidy {
                    family,
                    transaction,
                    settled: plan.after_tidy.clone(),
                });
            }
            return Ok(Reconciled {
                rules_touched,
                drift,
                settled: plan.after_tidy,
                desired,
                tidy_queued,
                committed,
            });
        }
    }

    /// How many shadowed rules the queued tidies would delete.
    pub fn shadowed_rules(&self) -> usize {
        self.pending_tidy
            .iter()
            .map(|t| t.transaction.rule_count())
            .sum()
    }

    /// The sources whose traffic `family` NATs: own mode's `--source-cidr`s of the family; in
    /// kilo mode the sources of kg's POSTROUTING jumps to KILO-NAT, read from the kernel.
    pub fn nat_sources(&self, family: Family) -> Result<Vec<ipnet::IpNet>, NetfilterError> {
        match &self.mode {
            ModeConfig::Own { source_cidrs, .. } => Ok(source_cidrs
                .iter()
                .filter(|net| rules::family_of_net(net) == family)
                .copied()
                .collect()),
            ModeConfig::Kilo => {
                let postrouting = self.netfilter.read_chain(family, POSTROUTING)?;
                let rules: Vec<rules::Rule> =
                    postrouting.into_iter().flatten().map(|o| o.rule).collect();
                Ok(crate::conntrack::jump_sources(&rules, family))
            }
        }
    }

    /// Removes the rules the last commits shadowed. A failure only means the chain changed
    /// meanwhile: the families it returns as failed must be re-checked.
    pub fn tidy(&mut self) -> Tidied {
        let mut tidied = Tidied::default();
        for tidy in std::mem::take(&mut self.pending_tidy) {
            match self.restore(tidy.family, &tidy.transaction) {
                Ok(()) => {
                    self.known.insert(tidy.family, tidy.settled);
                    tidied.written.insert(tidy.family);
                }
                Err(e) => {
                    debug!(family = %tidy.family, error = %e, "removing shadowed rules failed; re-checking");
                    tidied.failed.push(tidy.family);
                }
            }
        }
        tidied
    }

    /// The pair that the rules of ours in the kernel program: per managed family the address of
    /// our one well-formed SNAT rule, else none (MASQUERADE). For recovering from a lost state.
    pub fn adopt(&self) -> EgressAddrs {
        let mut addrs = EgressAddrs::NONE;
        for family in self.families.managed() {
            let Ok(Some(chain)) = self.netfilter.read_chain(family, KILO_NAT) else {
                continue;
            };
            let ours: Vec<&ObservedRule> = chain.iter().filter(|r| r.rule.is_owned()).collect();
            let [only] = ours.as_slice() else {
                continue;
            };
            match only.rule.owned_snat_source() {
                Some(IpAddr::V4(addr)) if family == Family::Ipv4 => addrs.ipv4 = Some(addr),
                Some(IpAddr::V6(addr)) if family == Family::Ipv6 => addrs.ipv6 = Some(addr),
                _ => {}
            }
        }
        addrs
    }

    /// Removes rules of ours that an earlier configuration or mode left in families the table
    /// does not manage. Best effort: a family the host cannot program is skipped.
    pub fn remove_leftovers(&mut self) {
        for family in self.families.unmanaged() {
            match self.reconcile(family, None, Freshness::Read) {
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
}

/// The rules of a listing, without counters.
fn observed_rules(chain: &Option<Vec<ObservedRule>>, postrouting: &[ObservedRule]) -> Observed {
    Observed {
        kilo_nat: chain
            .as_ref()
            .map(|rules| rules.iter().map(|r| r.rule.clone()).collect()),
        postrouting: postrouting.iter().map(|r| r.rule.clone()).collect(),
    }
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
                    removed += transaction.deletions();
                    let lines: Vec<String> = transaction
                        .lines()
                        .iter()
                        .map(ToString::to_string)
                        .collect();
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

/// The table driven directly, without the engine's thread or clock, against the in-memory fake.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeNetfilter;

    fn kilo_table(fake: &Arc<FakeNetfilter>) -> NatTable {
        let families = ManagedFamilies::new(&Family::ALL, &ModeConfig::Kilo);
        NatTable::new(ModeConfig::Kilo, families, fake.clone())
    }

    /// kg's chain: one RETURN, then MASQUERADE.
    fn install_kg_chain(fake: &FakeNetfilter, family: Family) {
        fake.tamper_silently(family, |t| {
            t.insert(
                KILO_NAT.into(),
                vec![
                    "-d 10.4.0.0/16 -m comment --comment \"Kilo: do not NAT\" -j RETURN".into(),
                    "-m comment --comment \"Kilo: NAT remaining packets\" -j MASQUERADE".into(),
                ],
            );
        });
    }

    fn addr(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    fn own_table(fake: &Arc<FakeNetfilter>) -> NatTable {
        let mode = ModeConfig::Own {
            source_cidrs: vec!["10.44.0.0/24".parse().unwrap()],
            no_nat_cidrs: vec!["10.4.0.0/16".parse().unwrap()],
        };
        let families = ManagedFamilies::new(&Family::ALL, &mode);
        NatTable::new(mode, families, fake.clone())
    }

    #[test]
    fn an_own_mode_switch_inserts_first_and_tidies_only_when_told() {
        let fake = Arc::new(FakeNetfilter::new());
        let mut table = own_table(&fake);
        let first = table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Read)
            .unwrap();
        assert!(!first.tidy_queued);
        let switch = table
            .reconcile(Family::Ipv4, addr("198.51.100.99"), Freshness::Known)
            .unwrap();
        assert!(switch.tidy_queued);
        assert_eq!(table.shadowed_rules(), 1);
        let chain = fake.chain(Family::Ipv4, KILO_NAT).unwrap();
        assert_eq!(
            chain.len(),
            3,
            "new SNAT in front of the old one: {chain:#?}"
        );
        assert!(
            chain[1].ends_with("--to-source 198.51.100.99"),
            "{chain:#?}"
        );
        assert!(table.tidy().failed.is_empty());
        let chain = fake.chain(Family::Ipv4, KILO_NAT).unwrap();
        assert_eq!(chain.len(), 2, "{chain:#?}");
        assert!(
            chain[1].ends_with("--to-source 198.51.100.99"),
            "{chain:#?}"
        );
        assert_eq!(table.shadowed_rules(), 0);
        assert_eq!(table.transactions(), 3);
    }

    #[test]
    fn a_chain_read_or_desired_again_shares_the_text_rendered_at_start() {
        // With 10,000 RETURN rules each copy of their text would cost about a megabyte.
        let fake = Arc::new(FakeNetfilter::new());
        let mut table = own_table(&fake);
        table
            .reconcile(Family::Ipv4, None, Freshness::Read)
            .unwrap();
        let first = table.read_back(Family::Ipv4, None).unwrap();
        let second = table
            .read_back(Family::Ipv4, addr("198.51.100.20"))
            .unwrap();
        let read = &first.chain.as_ref().unwrap()[0].rule;
        let desired = |back: &ReadBack| back.desired.kilo_nat.as_ref().unwrap()[0].clone();
        assert_eq!(read.target().as_deref(), Some("RETURN"));
        assert!(Arc::ptr_eq(&read.args, &desired(&first).args));
        assert!(Arc::ptr_eq(&desired(&first).args, &desired(&second).args));
    }

    #[test]
    fn a_kilo_mode_switch_is_one_transaction_without_a_tidy() {
        let fake = Arc::new(FakeNetfilter::new());
        install_kg_chain(&fake, Family::Ipv4);
        let mut table = kilo_table(&fake);
        for to in ["198.51.100.20", "198.51.100.99"] {
            let applied = table
                .reconcile(Family::Ipv4, addr(to), Freshness::Known)
                .unwrap();
            assert!(!applied.tidy_queued);
        }
        let chain = fake.chain(Family::Ipv4, KILO_NAT).unwrap();
        assert_eq!(chain.len(), 3, "{chain:#?}");
        assert!(
            chain[1].ends_with("--to-source 198.51.100.99"),
            "{chain:#?}"
        );
        assert_eq!(table.transactions(), 2);
    }

    #[test]
    fn known_state_saves_reads_until_forgotten() {
        let fake = Arc::new(FakeNetfilter::new());
        install_kg_chain(&fake, Family::Ipv4);
        let mut table = kilo_table(&fake);
        table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Read)
            .unwrap();
        let reads = fake.reads();
        table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Known)
            .unwrap();
        assert_eq!(fake.reads(), reads, "nothing to do, nothing read");
        table.forget(&[Family::Ipv4].into_iter().collect());
        table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Known)
            .unwrap();
        assert!(fake.reads() > reads, "forgotten knowledge is read again");
    }

    #[test]
    fn a_commit_refused_on_stale_knowledge_is_planned_again_on_a_read() {
        let fake = Arc::new(FakeNetfilter::new());
        install_kg_chain(&fake, Family::Ipv4);
        let mut table = kilo_table(&fake);
        table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Read)
            .unwrap();
        // kg is uninstalled unseen: the insert planned on what the table knows is refused.
        fake.tamper_silently(Family::Ipv4, |t| {
            t.remove(KILO_NAT);
        });
        let writes = fake.transactions();
        let applied = table
            .reconcile(Family::Ipv4, addr("198.51.100.99"), Freshness::Known)
            .unwrap();
        assert!(
            applied.desired.waiting.unwrap().contains("does not exist"),
            "planned again on what the kernel holds"
        );
        assert!(!applied.tidy_queued);
        assert_eq!(fake.transactions(), writes);
        assert_eq!(fake.chain(Family::Ipv4, KILO_NAT), None);
    }

    #[test]
    fn a_failed_tidy_names_its_family() {
        let fake = Arc::new(FakeNetfilter::new());
        let mut table = own_table(&fake);
        for to in ["198.51.100.20", "198.51.100.99"] {
            table
                .reconcile(Family::Ipv4, addr(to), Freshness::Known)
                .unwrap();
        }
        fake.tamper_silently(Family::Ipv4, |t| {
            t.get_mut(KILO_NAT).unwrap().clear();
        });
        assert_eq!(table.tidy().failed, vec![Family::Ipv4]);
    }

    #[test]
    fn only_our_own_writers_are_an_echo() {
        let fake = Arc::new(FakeNetfilter::new());
        install_kg_chain(&fake, Family::Ipv4);
        let mut table = kilo_table(&fake);
        assert!(!table.is_own_echo(&BTreeSet::new()));
        table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Read)
            .unwrap();
        let ours = fake.last_writer().unwrap();
        assert!(table.is_own_echo(&[ours].into_iter().collect()));
        assert!(!table.is_own_echo(&[ours, ours + 1000].into_iter().collect()));
    }

    #[test]
    fn cleanup_removes_our_rules_and_leaves_kg_alone() {
        let fake = Arc::new(FakeNetfilter::new());
        install_kg_chain(&fake, Family::Ipv4);
        let kg = fake.chain(Family::Ipv4, KILO_NAT);
        let mut table = kilo_table(&fake);
        table
            .reconcile(Family::Ipv4, addr("198.51.100.20"), Freshness::Read)
            .unwrap();
        assert_eq!(cleanup(&ModeConfig::Kilo, fake.as_ref()).unwrap(), 1);
        assert_eq!(fake.chain(Family::Ipv4, KILO_NAT), kg);
    }
}
