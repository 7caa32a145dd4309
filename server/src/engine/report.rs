//! What the engine tells clients: the reports of SetEgress ([`SetOutcome`]) and GetRules
//! ([`StatusReport`]), one [`FamilyReport`] per family, and the pure builders that make them from
//! what the table read, planned or settled.

use kilo_egress_api::egress::{EgressAddrs, Family, Mode};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use super::table::{ReadBack, Reconciled};
use crate::rules::{self, Desired, KILO_NAT, ModeConfig, ObservedRule, POSTROUTING, Rule};

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
    /// Whether the chosen address is not usable on the node (absent, or IPv6 DAD pending or
    /// failed); `status` says what is programmed meanwhile.
    pub address_absent: bool,
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
    /// The rules as programmed (or as they would be, for a dry run); shared by every request of
    /// a batch, so a burst of coalesced calls holds one copy, not one per call.
    pub rules: Arc<[FamilyReport]>,
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
    /// Who writes the chain.
    pub mode: Mode,
    /// The rules read back from the kernel, per family.
    pub families: Vec<FamilyReport>,
    /// Whether every family is in sync.
    pub in_sync: bool,
    /// The error of the last write that failed, while no write has succeeded since.
    pub last_error: Option<String>,
    /// The last write that failed, while no write has succeeded since (a degraded write path).
    pub last_write_failure: Option<WriteFailureReport>,
    /// When rules were last applied successfully.
    pub last_apply: Option<SystemTime>,
    /// The iptables backend.
    pub backend: &'static str,
    /// Why that backend was chosen.
    pub backend_reason: String,
    /// How drift is detected.
    pub drift_detection: String,
    /// Whether the node's addresses are followed, and the absent-address policy.
    pub address_presence: String,
    /// Whether our SNAT and MASQUERADE rules carry `--random-fully`, and why.
    pub random_fully: String,
    /// `--conntrack-flush`: off, or what the last deletions did.
    pub conntrack_flush: String,
    /// Transactions committed since start.
    pub kernel_transactions: u64,
}

/// A write the kernel refused, while no write has succeeded since.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFailureReport {
    /// What was being written.
    pub what: String,
    /// When it failed.
    pub at: SystemTime,
    /// Why, naming the family.
    pub error: String,
}

/// The report of a family the engine leaves alone.
pub fn unmanaged(family: Family, why: &str) -> FamilyReport {
    FamilyReport {
        family,
        rules: Vec::new(),
        in_sync: true,
        status: format!("not managed: {why}"),
        address_absent: false,
    }
}

/// The report of a managed family the last apply did not reach.
pub fn not_applied(family: Family) -> FamilyReport {
    FamilyReport {
        family,
        rules: Vec::new(),
        in_sync: false,
        status: "not applied".to_string(),
        address_absent: false,
    }
}

/// The report of a family whose rules could not be read.
pub fn unreadable(family: Family, error: &dyn std::fmt::Display) -> FamilyReport {
    FamilyReport {
        family,
        rules: Vec::new(),
        in_sync: false,
        status: format!("cannot read the rules: {error}"),
        address_absent: false,
    }
}

/// The report of a family in a SetEgress reply: the rules it holds once the change has settled,
/// known from the committed plan (so the reply costs no extra read).
pub fn settled(
    mode: &ModeConfig,
    family: Family,
    addr: Option<IpAddr>,
    applied: Reconciled,
) -> FamilyReport {
    let drift = rules::describe_drift(mode, &applied.settled, &applied.desired);
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
}

/// The report of a family in a GetRules reply: the rules read back, with counters.
pub fn read_back(
    mode: &ModeConfig,
    family: Family,
    addr: Option<IpAddr>,
    read: ReadBack,
) -> FamilyReport {
    let waiting = read
        .desired
        .waiting
        .clone()
        .or_else(|| unreached(mode, family, &read));
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
    family_report(family, addr, rules, &read.drift, waiting)
}

/// Kilo mode: when nothing in POSTROUTING jumps to KILO-NAT, no pod traffic of the family passes
/// the chain, whatever it holds. Kilo's agent writes the jump only for the family of the node's
/// pod CIDR, so on a single-stack node an address of the other family has no effect; say so
/// rather than report "SNAT to X".
fn unreached(mode: &ModeConfig, family: Family, read: &ReadBack) -> Option<String> {
    let jumps = read
        .postrouting
        .iter()
        .any(|r| r.rule.target().as_deref() == Some(KILO_NAT));
    (!mode.owns_chain() && read.chain.is_some() && !jumps).then(|| {
        format!(
            "no rule in {POSTROUTING} jumps to {KILO_NAT} ({family}): Kilo's agent NATs no {family} pod traffic on this node (it writes the jump only for the family of the node's pod CIDR), so the {family} egress choice has no effect"
        )
    })
}

/// The report of a family in a dry run: the rules the request would program there.
pub fn preview(family: Family, read: ReadBack) -> FamilyReport {
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
        address_absent: false,
    }
}

/// Why an address this request chose is not (yet) programmed, one note per such family.
pub fn waiting_notes(reports: &[FamilyReport], addrs: &EgressAddrs) -> Vec<String> {
    reports
        .iter()
        .filter(|r| addrs.get(r.family).is_some() && !r.in_sync)
        .map(|r| format!("{}: {}", r.family, r.status))
        .collect()
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
        address_absent: false,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kg_read(postrouting: &[&str]) -> ReadBack {
        let listing = |lines: &[&str]| rules::parse_listing(&lines.join("\n"));
        let chain = listing(&[
            r#"-A KILO-NAT -m comment --comment "kilo-egress: SNAT to the chosen egress address" -j SNAT --to-source 2001:db8::20"#,
            r#"-A KILO-NAT -m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE"#,
        ]);
        let observed = rules::Observed {
            kilo_nat: Some(chain.iter().map(|r| r.rule.clone()).collect()),
            postrouting: vec![],
        };
        let addr = "2001:db8::20".parse().ok();
        let desired = rules::desired(&ModeConfig::Kilo, Family::Ipv6, addr, &observed);
        ReadBack {
            chain: Some(chain),
            postrouting: listing(postrouting),
            desired,
            drift: vec![],
        }
    }

    #[test]
    fn kilo_mode_says_when_nothing_jumps_to_the_chain() {
        let addr = "2001:db8::20".parse().ok();
        let unreached = read_back(&ModeConfig::Kilo, Family::Ipv6, addr, kg_read(&[]));
        assert!(!unreached.in_sync);
        assert!(
            unreached.status.contains("no IPv6 pod traffic"),
            "{}",
            unreached.status
        );
        let jumped = read_back(
            &ModeConfig::Kilo,
            Family::Ipv6,
            addr,
            kg_read(&[
                r#"-A POSTROUTING -s fd00:44::/64 -m comment --comment "Kilo: jump to KILO-NAT chain" -j KILO-NAT"#,
            ]),
        );
        assert!(jumped.in_sync);
        assert_eq!(jumped.status, "SNAT to 2001:db8::20");
    }

    #[test]
    fn status_names_drift_first_then_waiting_then_the_decision() {
        let addr = Some("198.51.100.20".parse().unwrap());
        let drifted = family_report(Family::Ipv4, addr, vec![], &["missing jump".into()], None);
        assert_eq!(drifted.status, "drift: missing jump");
        assert!(!drifted.in_sync);
        let waiting = family_report(Family::Ipv4, addr, vec![], &[], Some("waiting".into()));
        assert_eq!(
            (waiting.status.as_str(), waiting.in_sync),
            ("waiting", false)
        );
        let masquerade = family_report(Family::Ipv4, None, vec![], &[], Some("waiting".into()));
        assert!(masquerade.in_sync, "nothing chosen: nothing to wait for");
        let snat = family_report(Family::Ipv4, addr, vec![], &[], None);
        assert_eq!(snat.status, "SNAT to 198.51.100.20");
        let notes = waiting_notes(
            &[waiting],
            &EgressAddrs {
                ipv4: Some("198.51.100.20".parse().unwrap()),
                ipv6: None,
            },
        );
        assert_eq!(notes, vec!["IPv4: waiting".to_string()]);
    }
}
