//! Desired state and drift: who writes the chain ([`ModeConfig`]), what one family should hold
//! for a chosen address ([`desired`]), and in words how the kernel differs from it
//! ([`describe_drift`]). Pure: values in, values out.

use ipnet::IpNet;
use kilo_egress_api::egress::{Family, Mode};
use std::collections::HashSet;
use std::net::IpAddr;

use super::canonical::{
    KILO_NAT, POSTROUTING, Rule, jump_rule, masquerade_rule, return_rule, snat_rule,
};

/// Who writes the chain, and what the service writes in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModeConfig {
    /// The service writes the whole chain and the POSTROUTING jumps into it.
    Own {
        /// Traffic from these ranges (pod CIDRs) is NATed.
        source_cidrs: Vec<IpNet>,
        /// Traffic to these ranges is never NATed.
        no_nat_cidrs: Vec<IpNet>,
    },
    /// Kilo's agent writes the chain; the service keeps one SNAT rule before its MASQUERADE rule.
    Kilo,
}

impl ModeConfig {
    /// Which mode this is.
    pub fn mode(&self) -> Mode {
        match self {
            ModeConfig::Own { .. } => Mode::Own,
            ModeConfig::Kilo => Mode::Kilo,
        }
    }

    /// Whether the service programs this family at all. In own mode a family without a source
    /// CIDR has nothing to NAT; in kilo mode both families follow Kilo's agent.
    pub fn manages(&self, family: Family) -> bool {
        match self {
            ModeConfig::Own { source_cidrs, .. } => {
                source_cidrs.iter().any(|c| family_of_net(c) == family)
            }
            ModeConfig::Kilo => true,
        }
    }

    /// Whether the service owns the whole chain (own mode), not only its SNAT rule.
    pub fn owns_chain(&self) -> bool {
        matches!(self, ModeConfig::Own { .. })
    }
}

/// The family of a network.
pub fn family_of_net(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::Ipv4,
        IpNet::V6(_) => Family::Ipv6,
    }
}

/// What the kernel holds for one family, as far as the service reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// The rules of [`KILO_NAT`], or `None` when the chain does not exist.
    pub kilo_nat: Option<Vec<Rule>>,
    /// The rules of POSTROUTING.
    pub postrouting: Vec<Rule>,
}

/// The rules the service wants for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// The complete desired content of [`KILO_NAT`]; `None` means "leave the chain absent".
    pub kilo_nat: Option<Vec<Rule>>,
    /// Owned jumps that must open POSTROUTING, in order (own mode).
    pub jumps: Vec<Rule>,
    /// Why the service programs nothing for this family, if it does not.
    pub waiting: Option<String>,
}

impl Desired {
    /// The same state with `--random-fully` on our SNAT or MASQUERADE rule (kg's MASQUERADE,
    /// in kilo mode, is Kilo's and stays as it is).
    pub fn with_random_fully(mut self) -> Desired {
        if let Some(chain) = self.kilo_nat.take() {
            self.kilo_nat = Some(chain.into_iter().map(Rule::with_random_fully).collect());
        }
        self
    }
}

/// The desired state of a family the service does not manage: none of its own rules (left over
/// from an earlier configuration or mode), everything else as it is.
pub fn without_owned_rules(observed: &Observed, why: String) -> Desired {
    Desired {
        kilo_nat: observed
            .kilo_nat
            .as_ref()
            .map(|chain| chain.iter().filter(|r| !r.is_owned()).cloned().collect()),
        jumps: Vec::new(),
        waiting: Some(format!("not managed: {why}")),
    }
}

/// The rules own mode writes in a family whatever address is chosen: its RETURN rules and its
/// POSTROUTING jumps, rendered once. Every desired chain of the family is built from these, so
/// its copies share their text: with 10,000 `--no-nat-cidr` each rendering would cost about a
/// megabyte, and the engine wants the chain at every change, check and GetRules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FixedRules {
    /// The RETURN rules of KILO-NAT, in order (own mode).
    pub returns: Vec<Rule>,
    /// The jumps that open POSTROUTING, in order (own mode).
    pub jumps: Vec<Rule>,
}

impl FixedRules {
    /// Renders the fixed rules of `family` for `mode` (none in kilo mode).
    pub fn new(mode: &ModeConfig, family: Family) -> FixedRules {
        let ModeConfig::Own {
            source_cidrs,
            no_nat_cidrs,
        } = mode
        else {
            return FixedRules::default();
        };
        let of_family = |nets: &[IpNet]| -> Vec<IpNet> {
            nets.iter()
                .copied()
                .filter(|n| family_of_net(n) == family)
                .collect()
        };
        FixedRules {
            returns: of_family(no_nat_cidrs)
                .into_iter()
                .map(return_rule)
                .collect(),
            jumps: of_family(source_cidrs).into_iter().map(jump_rule).collect(),
        }
    }
}

/// Computes the desired rules of one family from the configuration, the chosen address and
/// (in kilo mode, where the service only adds to Kilo's chain) what the kernel holds.
pub fn desired(
    mode: &ModeConfig,
    family: Family,
    addr: Option<IpAddr>,
    observed: &Observed,
) -> Desired {
    desired_from(mode, &FixedRules::new(mode, family), family, addr, observed)
}

/// [`desired`], built from the family's [`FixedRules`] rendered earlier.
pub fn desired_from(
    mode: &ModeConfig,
    fixed: &FixedRules,
    family: Family,
    addr: Option<IpAddr>,
    observed: &Observed,
) -> Desired {
    match mode {
        ModeConfig::Own { .. } => {
            if fixed.jumps.is_empty() {
                return without_owned_rules(observed, format!("no {family} --source-cidr"));
            }
            let mut chain = Vec::with_capacity(fixed.returns.len() + 1);
            chain.extend(fixed.returns.iter().cloned());
            chain.push(addr.map_or_else(masquerade_rule, snat_rule));
            Desired {
                kilo_nat: Some(chain),
                jumps: fixed.jumps.clone(),
                waiting: None,
            }
        }
        ModeConfig::Kilo => {
            let Some(existing) = &observed.kilo_nat else {
                return Desired {
                    kilo_nat: None,
                    jumps: Vec::new(),
                    waiting: Some(format!(
                        "waiting for Kilo's agent: chain {KILO_NAT} does not exist ({family}; if kg runs, check that --iptables-backend matches the backend kg uses)"
                    )),
                };
            };
            let mut chain: Vec<Rule> = existing.iter().filter(|r| !r.is_owned()).cloned().collect();
            let anchor = chain
                .iter()
                .position(|r| r.target().as_deref() == Some("MASQUERADE"));
            let waiting = match (anchor, addr) {
                (Some(index), Some(addr)) => {
                    chain.insert(index, snat_rule(addr));
                    None
                }
                (Some(_), None) => None,
                (None, _) => Some(format!(
                    "waiting for Kilo's agent: no MASQUERADE rule in {KILO_NAT} to place the SNAT rule before ({family})"
                )),
            };
            Desired {
                kilo_nat: Some(chain),
                jumps: Vec::new(),
                waiting,
            }
        }
    }
}

/// The differences between what the kernel holds and what is desired, one sentence each; empty
/// when the kernel is in sync.
pub fn describe_drift(mode: &ModeConfig, observed: &Observed, desired: &Desired) -> Vec<String> {
    let mut drift = Vec::new();
    match (&observed.kilo_nat, &desired.kilo_nat) {
        (None, Some(_)) => drift.push(format!("chain {KILO_NAT} is missing")),
        (Some(have), Some(want)) if have != want => {
            // Sets, not nested scans: chains can hold thousands of rules.
            let have_set: HashSet<&Rule> = have.iter().collect();
            let want_set: HashSet<&Rule> = want.iter().collect();
            let missing: Vec<&Rule> = want.iter().filter(|r| !have_set.contains(r)).collect();
            let extra: Vec<&Rule> = have.iter().filter(|r| !want_set.contains(r)).collect();
            for rule in &missing {
                drift.push(format!("missing rule: {rule}"));
            }
            for rule in &extra {
                if rule.is_owned() || mode.owns_chain() {
                    drift.push(format!("unexpected rule: {rule}"));
                }
            }
            if missing.is_empty() && extra.is_empty() {
                drift.push(format!("rules of {KILO_NAT} are out of order"));
            }
        }
        _ => {}
    }
    // Jumps: desired ones (own mode) must open POSTROUTING; any other jump of ours is stale.
    let top = &observed.postrouting[..desired.jumps.len().min(observed.postrouting.len())];
    if top != desired.jumps.as_slice() {
        for jump in &desired.jumps {
            if observed.postrouting.contains(jump) {
                drift.push(format!("jump not at the top of {POSTROUTING}: {jump}"));
            } else {
                drift.push(format!("missing jump: {jump}"));
            }
        }
    }
    let stray = observed
        .postrouting
        .iter()
        .filter(|r| r.is_owned() && !desired.jumps.contains(r));
    for rule in stray {
        drift.push(format!("stale jump: {rule}"));
    }
    let owned_jumps = observed.postrouting.iter().filter(|r| r.is_owned()).count();
    if owned_jumps > desired.jumps.len() && drift.is_empty() {
        drift.push(format!("duplicate jumps in {POSTROUTING}"));
    }
    drift
}

/// The kind of one [`describe_drift`] sentence, for the `cause` label of the drift-repair metric:
/// `chain_missing`, `missing_rule`, `unexpected_rule`, `order`, `jump_missing`, `jump_order`,
/// `stale_jump` or `duplicate_jumps`.
pub fn drift_cause(sentence: &str) -> &'static str {
    const KINDS: [(&str, &str); 8] = [
        ("chain ", "chain_missing"),
        ("missing rule: ", "missing_rule"),
        ("unexpected rule: ", "unexpected_rule"),
        ("rules of ", "order"),
        ("jump not at the top", "jump_order"),
        ("missing jump: ", "jump_missing"),
        ("stale jump: ", "stale_jump"),
        ("duplicate jumps", "duplicate_jumps"),
    ];
    KINDS
        .iter()
        .find(|(prefix, _)| sentence.starts_with(prefix))
        .map_or("other", |(_, kind)| kind)
}
