//! Pure rule logic, one job a module: [`canonical`] (the `iptables -S` text form, parsing a
//! listing, the rules the service writes), [`desired`] (what one family should hold for each mode,
//! and drift in words) and [`plan`] (the cheapest transaction from what the kernel holds to what is
//! desired). Nothing here runs a process; everything takes and returns values.

pub mod canonical;
pub mod desired;
pub mod plan;

pub use canonical::{
    KILO_NAT, OWNED_COMMENT_PREFIX, ObservedRule, POSTROUTING, Rule, jump_rule, masquerade_rule,
    parse_listing, parse_listing_line, parse_listing_line_like, return_rule, share_text, snat_rule,
    tokenize,
};
pub use desired::{
    Desired, FixedRules, ModeConfig, Observed, describe_drift, desired, desired_from, drift_cause,
    family_of_net, without_owned_rules,
};
pub use plan::{Line, Plan, Transaction, plan, plan_cleanup, plan_transaction};

/// Chains and rules the tests of several rule modules share.
#[cfg(test)]
mod fixtures {
    use super::*;

    pub fn own() -> ModeConfig {
        ModeConfig::Own {
            source_cidrs: vec![
                "10.44.0.0/24".parse().unwrap(),
                "fd00:44::/64".parse().unwrap(),
            ],
            no_nat_cidrs: vec!["10.4.0.0/16".parse().unwrap()],
        }
    }

    pub fn rule(spec: &str) -> Rule {
        parse_listing(spec).remove(0).rule
    }

    pub fn kg_chain() -> Vec<Rule> {
        [
            r#"-A KILO-NAT -d 10.4.0.0/16 -m comment --comment "Kilo: do not NAT packets destined for WireGuared IPs" -j RETURN"#,
            r#"-A KILO-NAT -m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE"#,
        ]
        .iter()
        .map(|s| rule(s))
        .collect()
    }
}
