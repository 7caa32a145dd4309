//! Transaction planning: the cheapest `iptables-restore --noflush` change from what the kernel
//! holds to what is desired ([`plan`]), as a typed [`Transaction`]; and the change that removes
//! everything the service wrote ([`plan_cleanup`]). Pure: values in, values out.

use std::fmt;
use std::sync::Arc;

use super::canonical::{KILO_NAT, POSTROUTING, Rule};
use super::desired::{Desired, ModeConfig, Observed};

/// One line of a transaction of table nat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `:CHAIN - [0:0]`: creates the chain, or flushes it when it exists.
    DeclareChain(&'static str),
    /// `-A CHAIN ARGS`: appends a rule.
    Append(Rule),
    /// `-I CHAIN POSITION ARGS`: inserts a rule at a 1-based position.
    Insert {
        /// The chain.
        chain: &'static str,
        /// Where the rule goes, 1-based.
        position: usize,
        /// The rule's arguments in canonical form.
        args: Arc<str>,
    },
    /// `-D CHAIN ARGS`: deletes the first rule that matches.
    Delete {
        /// The chain.
        chain: &'static str,
        /// The rule's arguments in canonical form.
        args: Arc<str>,
    },
    /// `-X CHAIN`: deletes an empty chain nothing jumps to.
    DeleteChain(&'static str),
}

impl Line {
    fn insert(chain: &'static str, position: usize, rule: &Rule) -> Line {
        Line::Insert {
            chain,
            position,
            args: rule.args.clone(),
        }
    }

    fn delete(chain: &'static str, rule: &Rule) -> Line {
        Line::Delete {
            chain,
            args: rule.args.clone(),
        }
    }

    /// Whether the line adds, inserts or deletes a rule or a chain (a declaration does not
    /// count: it only makes sure the chain exists).
    fn changes_rules(&self) -> bool {
        !matches!(self, Line::DeclareChain(_))
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::DeclareChain(chain) => write!(f, ":{chain} - [0:0]"),
            Line::Append(rule) => write!(f, "{rule}"),
            Line::Insert {
                chain,
                position,
                args,
            } => write!(f, "-I {chain} {position} {args}"),
            Line::Delete { chain, args } => write!(f, "-D {chain} {args}"),
            Line::DeleteChain(chain) => write!(f, "-X {chain}"),
        }
    }
}

/// One atomic change of table nat: the kernel applies all of its lines or none.
/// [`Display`](fmt::Display) renders it as `iptables-restore --noflush` input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    lines: Vec<Line>,
}

impl Transaction {
    /// A transaction of `lines`, or `None` when there are none.
    fn of(lines: Vec<Line>) -> Option<Transaction> {
        (!lines.is_empty()).then_some(Transaction { lines })
    }

    /// Its lines, in order.
    pub fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// How many rules (or chains) it adds, inserts or deletes.
    pub fn rule_count(&self) -> usize {
        self.lines.iter().filter(|l| l.changes_rules()).count()
    }

    /// How many rules it deletes.
    pub fn deletions(&self) -> usize {
        self.lines
            .iter()
            .filter(|l| matches!(l, Line::Delete { .. }))
            .count()
    }
}

impl fmt::Display for Transaction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "*nat")?;
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        writeln!(f, "COMMIT")
    }
}

/// Builds the `iptables-restore --noflush` input that turns `observed` into `desired`, or
/// `None` when nothing needs to change. The whole change is one transaction of table nat.
pub fn plan_transaction(
    mode: &ModeConfig,
    observed: &Observed,
    desired: &Desired,
) -> Option<Transaction> {
    let mut lines: Vec<Line> = Vec::new();
    if observed.kilo_nat != desired.kilo_nat
        && let Some(want) = &desired.kilo_nat
    {
        match mode {
            ModeConfig::Own { .. } => {
                // The chain is ours wholesale: declaring it flushes and refills it atomically.
                lines.push(Line::DeclareChain(KILO_NAT));
                lines.extend(want.iter().cloned().map(Line::Append));
            }
            ModeConfig::Kilo => {
                let have = observed.kilo_nat.as_deref().unwrap_or_default();
                lines.extend(kilo_lines(have, want));
            }
        }
    }
    lines.extend(jump_lines(observed, desired));
    Transaction::of(lines)
}

/// Kilo mode: the lines that turn `have` into `want` without a rule position. Kilo's agent
/// inserts its RETURN rules at position 1 at any time, so a position computed from a read made
/// a moment ago can land our SNAT above a RETURN it inserted since. Instead our own rules are
/// deleted by their spec, and our SNAT goes in by deleting the rules that follow it (kg's
/// MASQUERADE, and whatever trails it) by spec and appending SNAT and those rules again, all in
/// one transaction: whatever kg inserted at the top meanwhile stays above, and if a rule the
/// lines name has gone, the kernel applies nothing and the family is planned again on a read.
/// kg only checks that its rules exist, so the re-appended MASQUERADE does not disturb it; its
/// counters start again from zero.
fn kilo_lines(have: &[Rule], want: &[Rule]) -> Vec<Line> {
    let mut lines: Vec<Line> = have
        .iter()
        .filter(|r| r.is_owned())
        .map(|rule| Line::delete(KILO_NAT, rule))
        .collect();
    if let Some(index) = want.iter().position(Rule::is_owned) {
        let tail = &want[index + 1..];
        lines.extend(tail.iter().map(|rule| Line::delete(KILO_NAT, rule)));
        lines.push(Line::Append(want[index].clone()));
        lines.extend(tail.iter().cloned().map(Line::Append));
    }
    lines
}

/// The POSTROUTING lines that put the desired jumps at the top and remove any other jump of
/// ours; empty when POSTROUTING is right.
fn jump_lines(observed: &Observed, desired: &Desired) -> Vec<Line> {
    let mut lines = Vec::new();
    let have = &observed.postrouting;
    let top_ok =
        have.len() >= desired.jumps.len() && have[..desired.jumps.len()] == desired.jumps[..];
    let owned_count = have.iter().filter(|r| r.is_owned()).count();
    if !top_ok || owned_count != desired.jumps.len() {
        for rule in have.iter().filter(|r| r.is_owned()) {
            lines.push(Line::delete(POSTROUTING, rule));
        }
        for (i, jump) in desired.jumps.iter().enumerate() {
            lines.push(Line::insert(POSTROUTING, i + 1, jump));
        }
    }
    lines
}

/// What the kernel holds once the transaction of [`plan_transaction`] is committed.
fn settled(observed: &Observed, desired: &Desired) -> Observed {
    let postrouting = if jump_lines(observed, desired).is_empty() {
        observed.postrouting.clone()
    } else {
        desired
            .jumps
            .iter()
            .chain(observed.postrouting.iter().filter(|r| !r.is_owned()))
            .cloned()
            .collect()
    };
    Observed {
        kilo_nat: desired
            .kilo_nat
            .clone()
            .or_else(|| observed.kilo_nat.clone()),
        postrouting,
    }
}

/// A change of one family, shaped so that traffic meets the new egress decision in the cheapest
/// transaction the kernel allows, and never a missing one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The transaction that puts the desired decision in force, or `None` when it already is.
    /// When only the decision changes, it only inserts the new rule in front of the old one:
    /// an add-only transaction (on nft ~1 ms of kernel time instead of ~15 ms for any deletion).
    pub commit: Option<Transaction>,
    /// Removes decision rules of ours that `commit` left shadowed behind the new one. Traffic
    /// never reaches them, so this runs after the caller has its answer.
    pub tidy: Option<Transaction>,
    /// What the kernel holds once `commit` is in.
    pub after_commit: Observed,
    /// What the kernel holds once `tidy` is in too: the desired state.
    pub after_tidy: Observed,
}

/// Plans the change from `observed` to `desired`. In own mode, where nobody else writes the
/// chain, the add-only decision switch when the chain differs from the desired one only in its
/// decision rules of ours; otherwise, and always in kilo mode (see [`kilo_lines`]), one full
/// transaction.
pub fn plan(mode: &ModeConfig, observed: &Observed, desired: &Desired) -> Plan {
    let switch = match mode {
        ModeConfig::Own { .. } => plan_decision_switch(observed, desired),
        ModeConfig::Kilo => None,
    };
    switch.unwrap_or_else(|| {
        let after = settled(observed, desired);
        Plan {
            commit: plan_transaction(mode, observed, desired),
            tidy: None,
            after_commit: after.clone(),
            after_tidy: after,
        }
    })
}

/// A rule of ours that decides how traffic is NATed: our SNAT or MASQUERADE.
fn is_decision(rule: &Rule) -> bool {
    rule.is_owned() && matches!(rule.target().as_deref(), Some("SNAT" | "MASQUERADE"))
}

/// The plan when the chain holds exactly the desired other rules and our decision rules sit in
/// one block where the desired decision goes; `None` otherwise.
fn plan_decision_switch(observed: &Observed, desired: &Desired) -> Option<Plan> {
    let have = observed.kilo_nat.as_ref()?;
    let want = desired.kilo_nat.as_ref()?;
    if !jump_lines(observed, desired).is_empty() {
        return None;
    }
    // Compared in place: with thousands of RETURN rules a copy of each side costs ~0.3 MB.
    if !have
        .iter()
        .filter(|r| !is_decision(r))
        .eq(want.iter().filter(|r| !is_decision(r)))
    {
        return None;
    }
    let old: Vec<(usize, &Rule)> = have
        .iter()
        .enumerate()
        .filter(|(_, r)| is_decision(r))
        .collect();
    let new: Vec<(usize, &Rule)> = want
        .iter()
        .enumerate()
        .filter(|(_, r)| is_decision(r))
        .collect();
    let delete_old = |skip: usize| -> Option<Transaction> {
        Transaction::of(
            old[skip..]
                .iter()
                .map(|(_, r)| Line::delete(KILO_NAT, r))
                .collect(),
        )
    };
    let settled = Observed {
        kilo_nat: Some(want.clone()),
        postrouting: observed.postrouting.clone(),
    };
    let (slot, decision) = match new.as_slice() {
        [(slot, decision)] => (*slot, *decision),
        _ => return None,
    };
    if let (Some((first, _)), Some((last, _))) = (old.first(), old.last())
        && (*first != slot || last - first + 1 != old.len())
    {
        return None;
    }
    if old.first().is_some_and(|(_, r)| *r == decision) {
        let unchanged = observed.clone();
        return Some(Plan {
            commit: None,
            tidy: delete_old(1),
            after_commit: unchanged,
            after_tidy: settled,
        });
    }
    let mut inserted = have.clone();
    inserted.insert(slot, decision.clone());
    Some(Plan {
        commit: Transaction::of(vec![Line::insert(KILO_NAT, slot + 1, decision)]),
        tidy: delete_old(0),
        after_commit: Observed {
            kilo_nat: Some(inserted),
            postrouting: observed.postrouting.clone(),
        },
        after_tidy: settled,
    })
}

/// Builds the transactions that remove everything the service wrote: first its rules in
/// POSTROUTING and KILO-NAT; then, in own mode, the chain itself when nothing else is left in it.
pub fn plan_cleanup(mode: &ModeConfig, observed: &Observed) -> Vec<Transaction> {
    let mut lines: Vec<Line> = Vec::new();
    for rule in observed.postrouting.iter().filter(|r| r.is_owned()) {
        lines.push(Line::delete(POSTROUTING, rule));
    }
    let chain = observed.kilo_nat.as_deref().unwrap_or_default();
    for rule in chain.iter().filter(|r| r.is_owned()) {
        lines.push(Line::delete(KILO_NAT, rule));
    }
    let mut transactions: Vec<Transaction> = Transaction::of(lines).into_iter().collect();
    let only_ours_left = chain.iter().all(Rule::is_owned);
    if mode.owns_chain() && observed.kilo_nat.is_some() && only_ours_left {
        transactions.extend(Transaction::of(vec![Line::DeleteChain(KILO_NAT)]));
    }
    transactions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::canonical::{jump_rule, snat_rule};
    use crate::rules::desired::{describe_drift, desired, drift_cause};
    use crate::rules::fixtures::{kg_chain, own, rule};
    use kilo_egress_api::egress::Family;
    use std::net::IpAddr;

    #[test]
    fn own_mode_in_sync_plans_nothing() {
        let addr = Some("198.51.100.20".parse().unwrap());
        let want = desired(&own(), Family::Ipv4, addr, &Observed::default());
        let observed = Observed {
            kilo_nat: want.kilo_nat.clone(),
            postrouting: want.jumps.clone(),
        };
        assert_eq!(plan_transaction(&own(), &observed, &want), None);
        assert!(describe_drift(&own(), &observed, &want).is_empty());
    }

    #[test]
    fn own_mode_detects_each_drift_kind() {
        let addr = Some("198.51.100.20".parse().unwrap());
        let want = desired(&own(), Family::Ipv4, addr, &Observed::default());
        let good = Observed {
            kilo_nat: want.kilo_nat.clone(),
            postrouting: want.jumps.clone(),
        };
        let mut no_chain = good.clone();
        no_chain.kilo_nat = None;
        let mut no_jump = good.clone();
        no_jump.postrouting.clear();
        let mut foreign = good.clone();
        foreign
            .kilo_nat
            .as_mut()
            .unwrap()
            .insert(0, rule("-A KILO-NAT -j ACCEPT"));
        let mut reordered = good.clone();
        reordered.kilo_nat.as_mut().unwrap().reverse();
        let mut jump_below = good.clone();
        jump_below
            .postrouting
            .insert(0, rule("-A POSTROUTING -j KUBE-POSTROUTING"));
        let mut removed = good.clone();
        removed.kilo_nat.as_mut().unwrap().pop();
        for (name, case, expect, cause) in [
            (
                "flushed chain",
                no_chain,
                "chain KILO-NAT is missing",
                "chain_missing",
            ),
            ("removed jump", no_jump, "missing jump", "jump_missing"),
            (
                "foreign rule",
                foreign,
                "unexpected rule",
                "unexpected_rule",
            ),
            ("out of order", reordered, "out of order", "order"),
            (
                "jump below others",
                jump_below,
                "not at the top",
                "jump_order",
            ),
            ("removed rule", removed, "missing rule", "missing_rule"),
        ] {
            let drift = describe_drift(&own(), &case, &want);
            assert!(
                drift.iter().any(|d| d.contains(expect)),
                "{name}: {drift:?}"
            );
            let causes: Vec<&str> = drift.iter().map(|d| drift_cause(d)).collect();
            assert!(causes.contains(&cause), "{name}: {drift:?} -> {causes:?}");
            assert!(
                !causes.contains(&"other"),
                "{name}: {drift:?} -> {causes:?}"
            );
            assert!(plan_transaction(&own(), &case, &want).is_some(), "{name}");
        }
    }

    #[test]
    fn kilo_mode_places_snat_before_kilo_masquerade() {
        let observed = Observed {
            kilo_nat: Some(kg_chain()),
            postrouting: vec![],
        };
        let addr = Some("198.51.100.20".parse().unwrap());
        let want = desired(&ModeConfig::Kilo, Family::Ipv4, addr, &observed);
        let chain = want.kilo_nat.clone().unwrap();
        assert_eq!(chain.len(), 3);
        assert!(chain[1].is_owned());
        assert_eq!(chain[2].target().as_deref(), Some("MASQUERADE"));
        let tx = plan_transaction(&ModeConfig::Kilo, &observed, &want)
            .unwrap()
            .to_string();
        assert!(
            tx.contains("-A KILO-NAT -m comment --comment \"kilo-egress: SNAT"),
            "{tx}"
        );
        assert!(
            !tx.contains(":KILO-NAT"),
            "kilo mode must never flush: {tx}"
        );
    }

    /// kg inserts its RETURN rules at position 1 whenever it likes; one that lands between our
    /// read and our commit must still end up above our SNAT.
    #[test]
    fn kilo_mode_snat_stays_below_returns_inserted_after_the_read() {
        use crate::netfilter::Netfilter;
        use crate::testing::FakeNetfilter;
        let late_return = r#"-d 10.5.0.0/16 -m comment --comment "Kilo: do not NAT packets destined for peers" -j RETURN"#;
        let with_stale = {
            let mut chain = kg_chain();
            chain.insert(1, snat_rule("198.51.100.99".parse().unwrap()));
            chain
        };
        for (case, read) in [("no SNAT yet", kg_chain()), ("switch", with_stale)] {
            let fake = FakeNetfilter::new();
            let args: Vec<String> = read.iter().map(|r| r.args.to_string()).collect();
            fake.tamper_silently(Family::Ipv4, |t| {
                t.insert(KILO_NAT.into(), args);
            });
            let observed = Observed {
                kilo_nat: Some(read),
                postrouting: vec![],
            };
            let addr = Some("198.51.100.20".parse().unwrap());
            let want = desired(&ModeConfig::Kilo, Family::Ipv4, addr, &observed);
            let commit = plan(&ModeConfig::Kilo, &observed, &want).commit.unwrap();
            fake.tamper_silently(Family::Ipv4, |t| {
                t.get_mut(KILO_NAT).unwrap().insert(0, late_return.into());
            });
            fake.restore(Family::Ipv4, &commit).unwrap();
            let chain = fake.chain(Family::Ipv4, KILO_NAT).unwrap();
            let snat = chain
                .iter()
                .position(|r| r.contains("kilo-egress:"))
                .unwrap();
            assert!(
                chain[..snat].iter().all(|r| r.ends_with("-j RETURN"))
                    && chain[snat].ends_with("--to-source 198.51.100.20")
                    && chain[snat + 1..] == [kg_chain()[1].spec()],
                "{case}: our SNAT must follow every RETURN and precede MASQUERADE: {chain:#?}"
            );
        }
    }

    #[test]
    fn kilo_mode_removes_stale_snat_and_keeps_kilo_rules() {
        let mut chain = kg_chain();
        chain.insert(0, snat_rule("198.51.100.99".parse().unwrap()));
        let observed = Observed {
            kilo_nat: Some(chain),
            postrouting: vec![],
        };
        let want = desired(&ModeConfig::Kilo, Family::Ipv4, None, &observed);
        assert_eq!(want.kilo_nat.as_ref().unwrap(), &kg_chain());
        let tx = plan_transaction(&ModeConfig::Kilo, &observed, &want)
            .unwrap()
            .to_string();
        assert_eq!(tx.matches("-D ").count(), 1, "{tx}");
        assert!(tx.contains("198.51.100.99"));
        assert!(!tx.contains("-I "));
    }

    #[test]
    fn kilo_mode_without_masquerade_waits() {
        let observed = Observed {
            kilo_nat: Some(vec![]),
            postrouting: vec![],
        };
        let want = desired(
            &ModeConfig::Kilo,
            Family::Ipv6,
            Some("2001:db8::20".parse().unwrap()),
            &observed,
        );
        assert!(want.waiting.unwrap().contains("no MASQUERADE"));
        assert_eq!(
            plan_transaction(
                &ModeConfig::Kilo,
                &observed,
                &desired(&ModeConfig::Kilo, Family::Ipv6, None, &observed)
            ),
            None
        );
        let absent = desired(&ModeConfig::Kilo, Family::Ipv4, None, &Observed::default());
        assert!(absent.waiting.unwrap().contains("does not exist"));
    }

    #[test]
    fn own_mode_skips_family_without_source_cidr() {
        let mode = ModeConfig::Own {
            source_cidrs: vec!["10.44.0.0/24".parse().unwrap()],
            no_nat_cidrs: vec![],
        };
        assert!(!mode.manages(Family::Ipv6));
        let want = desired(&mode, Family::Ipv6, None, &Observed::default());
        assert!(want.waiting.is_some());
        assert_eq!(plan_transaction(&mode, &Observed::default(), &want), None);
    }

    #[test]
    fn cleanup_removes_only_owned_rules() {
        let mut chain = kg_chain();
        chain.insert(1, snat_rule("198.51.100.20".parse().unwrap()));
        let observed = Observed {
            kilo_nat: Some(chain),
            postrouting: vec![rule(
                r#"-A POSTROUTING -s 10.44.0.0/24 -m comment --comment "Kilo: jump to KILO-NAT chain" -j KILO-NAT"#,
            )],
        };
        let txs: Vec<String> = plan_cleanup(&ModeConfig::Kilo, &observed)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(txs.len(), 1);
        assert_eq!(txs[0].matches("-D ").count(), 1);
        assert!(!txs[0].contains("Kilo:"));
    }

    #[test]
    fn unmanaged_family_loses_our_rules_and_keeps_foreign_ones() {
        let v6_only = ModeConfig::Own {
            source_cidrs: vec!["fd00:44::/64".parse().unwrap()],
            no_nat_cidrs: vec![],
        };
        let foreign = rule("-A KILO-NAT -d 192.0.2.0/24 -j RETURN");
        let observed = Observed {
            kilo_nat: Some(vec![
                foreign.clone(),
                snat_rule("198.51.100.20".parse().unwrap()),
            ]),
            postrouting: vec![jump_rule("10.44.0.0/24".parse().unwrap())],
        };
        let want = desired(&v6_only, Family::Ipv4, None, &observed);
        assert_eq!(want.kilo_nat, Some(vec![foreign]));
        assert!(want.jumps.is_empty());
        let drift = describe_drift(&v6_only, &observed, &want);
        assert!(drift.iter().any(|d| d.contains("stale jump")), "{drift:?}");
        let tx = plan_transaction(&v6_only, &observed, &want)
            .unwrap()
            .to_string();
        assert!(tx.contains("-D POSTROUTING -s 10.44.0.0/24"), "{tx}");
        assert!(!tx.contains("SNAT"), "{tx}");
    }

    #[test]
    fn kilo_mode_removes_jumps_left_by_own_mode() {
        let observed = Observed {
            kilo_nat: Some(kg_chain()),
            postrouting: vec![
                rule(
                    r#"-A POSTROUTING -s 10.44.0.0/24 -m comment --comment "Kilo: jump to KILO-NAT chain" -j KILO-NAT"#,
                ),
                jump_rule("10.44.0.0/24".parse().unwrap()),
            ],
        };
        let want = desired(&ModeConfig::Kilo, Family::Ipv4, None, &observed);
        let tx = plan_transaction(&ModeConfig::Kilo, &observed, &want)
            .unwrap()
            .to_string();
        assert_eq!(tx.matches("-D POSTROUTING").count(), 1, "{tx}");
        assert!(
            !tx.contains("Kilo: jump"),
            "kg's jump is never touched: {tx}"
        );
    }

    /// Renders each scenario's transaction and compares it with `testdata/golden/NAME.txt`
    /// (`UPDATE_GOLDEN=1 cargo test` rewrites the files after a deliberate change).
    #[test]
    fn rendered_transactions_match_golden_files() {
        let v4: IpAddr = "198.51.100.20".parse().unwrap();
        let v6: IpAddr = "2001:db8::20".parse().unwrap();
        let kg6 = || -> Vec<Rule> {
            [
                r#"-A KILO-NAT -d fd00:4::/64 -m comment --comment "Kilo: do not NAT packets destined for WireGuared IPs" -j RETURN"#,
                r#"-A KILO-NAT -m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE"#,
            ]
            .iter()
            .map(|s| rule(s))
            .collect()
        };
        let with_stale = |mut chain: Vec<Rule>, stale: &str| {
            chain.insert(0, snat_rule(stale.parse().unwrap()));
            Observed {
                kilo_nat: Some(chain),
                postrouting: vec![],
            }
        };
        let fresh = Observed::default();
        let kg4 = Observed {
            kilo_nat: Some(kg_chain()),
            postrouting: vec![],
        };
        let kg6_obs = Observed {
            kilo_nat: Some(kg6()),
            postrouting: vec![],
        };
        let own_settled = |addr: Option<IpAddr>| {
            let want = desired(&own(), Family::Ipv4, addr, &Observed::default());
            Observed {
                kilo_nat: want.kilo_nat,
                postrouting: want.jumps,
            }
        };
        let kg_with_snat = |addr: &str| {
            let mut chain = kg_chain();
            chain.insert(1, snat_rule(addr.parse().unwrap()));
            Observed {
                kilo_nat: Some(chain),
                postrouting: vec![],
            }
        };
        let randomly = |mut observed: Observed| {
            observed.kilo_nat = observed
                .kilo_nat
                .map(|chain| chain.into_iter().map(Rule::with_random_fully).collect());
            observed
        };
        // `--random-fully` on (the default where iptables supports it): our SNAT or MASQUERADE
        // carries it, kg's MASQUERADE does not.
        let random_fully_cases: Vec<(&str, ModeConfig, Family, Option<IpAddr>, Observed)> = vec![
            (
                "own_ipv4_fresh_snat_random_fully",
                own(),
                Family::Ipv4,
                Some(v4),
                fresh.clone(),
            ),
            (
                "own_ipv6_fresh_masquerade_random_fully",
                own(),
                Family::Ipv6,
                None,
                fresh.clone(),
            ),
            (
                "own_ipv4_switch_masquerade_to_snat_random_fully",
                own(),
                Family::Ipv4,
                Some(v4),
                randomly(own_settled(None)),
            ),
            (
                "kilo_ipv4_insert_snat_random_fully",
                ModeConfig::Kilo,
                Family::Ipv4,
                Some(v4),
                kg4.clone(),
            ),
            (
                "kilo_ipv4_switch_snat_random_fully",
                ModeConfig::Kilo,
                Family::Ipv4,
                Some(v4),
                randomly(kg_with_snat("198.51.100.99")),
            ),
        ];
        let cases: Vec<(&str, ModeConfig, Family, Option<IpAddr>, Observed)> = vec![
            (
                "own_ipv4_switch_masquerade_to_snat",
                own(),
                Family::Ipv4,
                Some(v4),
                own_settled(None),
            ),
            (
                "own_ipv4_switch_snat_to_masquerade",
                own(),
                Family::Ipv4,
                None,
                own_settled(Some(v4)),
            ),
            (
                "kilo_ipv4_switch_snat",
                ModeConfig::Kilo,
                Family::Ipv4,
                Some(v4),
                kg_with_snat("198.51.100.99"),
            ),
            (
                "own_ipv4_fresh_masquerade",
                own(),
                Family::Ipv4,
                None,
                fresh.clone(),
            ),
            (
                "own_ipv4_fresh_snat",
                own(),
                Family::Ipv4,
                Some(v4),
                fresh.clone(),
            ),
            (
                "own_ipv6_fresh_masquerade",
                own(),
                Family::Ipv6,
                None,
                fresh.clone(),
            ),
            (
                "own_ipv6_fresh_snat",
                own(),
                Family::Ipv6,
                Some(v6),
                fresh.clone(),
            ),
            (
                "kilo_ipv4_insert_snat",
                ModeConfig::Kilo,
                Family::Ipv4,
                Some(v4),
                kg4.clone(),
            ),
            (
                "kilo_ipv4_replace_stale",
                ModeConfig::Kilo,
                Family::Ipv4,
                Some(v4),
                with_stale(kg_chain(), "198.51.100.99"),
            ),
            (
                "kilo_ipv4_clear",
                ModeConfig::Kilo,
                Family::Ipv4,
                None,
                with_stale(kg_chain(), "198.51.100.20"),
            ),
            (
                "kilo_ipv6_insert_snat",
                ModeConfig::Kilo,
                Family::Ipv6,
                Some(v6),
                kg6_obs.clone(),
            ),
            (
                "kilo_ipv6_replace_stale",
                ModeConfig::Kilo,
                Family::Ipv6,
                Some(v6),
                with_stale(kg6(), "2001:db8::99"),
            ),
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/golden");
        let update = std::env::var_os("UPDATE_GOLDEN").is_some();
        let all = (cases.into_iter().map(|case| (case, false)))
            .chain(random_fully_cases.into_iter().map(|case| (case, true)));
        for ((name, mode, family, addr, observed), random_fully) in all {
            let mut want = desired(&mode, family, addr, &observed);
            if random_fully {
                want = want.with_random_fully();
            }
            let plan = plan(&mode, &observed, &want);
            let rendered = format!(
                "# desired chain\n{}\n# commit (before the reply)\n{}# tidy (after the reply)\n{}",
                want.jumps
                    .iter()
                    .chain(want.kilo_nat.iter().flatten())
                    .map(Rule::spec)
                    .collect::<Vec<_>>()
                    .join("\n"),
                plan.commit.map(|t| t.to_string()).unwrap_or_default(),
                plan.tidy.map(|t| t.to_string()).unwrap_or_default(),
            );
            let path = dir.join(format!("{name}.txt"));
            if update {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &rendered).unwrap();
            }
            let golden = std::fs::read_to_string(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
                    path.display()
                )
            });
            assert_eq!(rendered, golden, "{name} differs from {}", path.display());
        }
    }
}
