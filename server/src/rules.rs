//! Pure rule logic: the canonical rule form of `iptables -S`, the desired rules for each mode,
//! drift description, and the `iptables-restore --noflush` transaction that turns what the kernel
//! holds into what is desired. Nothing here runs a process; everything takes and returns values.

use ipnet::IpNet;
use kilo_egress_api::egress::Family;
use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

/// The nat chain whose egress decision the service owns.
pub const KILO_NAT: &str = "KILO-NAT";
/// The built-in nat chain that jumps into [`KILO_NAT`].
pub const POSTROUTING: &str = "POSTROUTING";
/// Every comment the service writes starts with this; it is how the service knows its own rules.
pub const OWNED_COMMENT_PREFIX: &str = "kilo-egress:";

const COMMENT_SNAT: &str = "kilo-egress: SNAT to the chosen egress address";
const COMMENT_MASQUERADE: &str = "kilo-egress: no egress address chosen, MASQUERADE";
const COMMENT_RETURN: &str = "kilo-egress: do not NAT this destination";
const COMMENT_JUMP: &str = "kilo-egress: jump to KILO-NAT";

/// One rule in canonical `iptables -S` form, split into its chain and the text after `-A CHAIN `.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The chain that holds the rule.
    pub chain: String,
    /// The match and target part, e.g. `-m comment --comment "..." -j MASQUERADE`.
    pub args: String,
}

impl Rule {
    fn new(chain: &str, args: String) -> Rule {
        Rule {
            chain: chain.to_string(),
            args,
        }
    }

    /// The rule as `iptables -S` prints it: `-A CHAIN ARGS`.
    pub fn spec(&self) -> String {
        format!("-A {} {}", self.chain, self.args)
    }

    /// The rule's comment, unquoted, if it has one.
    pub fn comment(&self) -> Option<String> {
        let tokens = tokenize(&self.args);
        tokens
            .iter()
            .position(|t| t == "--comment")
            .and_then(|i| tokens.get(i + 1).cloned())
    }

    /// The rule's target (`-j TARGET`), if it has one. In canonical form the target follows
    /// every match, so the last ` -j ` outside quotes is it; no full tokenizing is needed (this
    /// runs for every rule of a chain on every change).
    pub fn target(&self) -> Option<String> {
        let args = self.args.as_str();
        let start = if let Some(rest) = args.strip_prefix("-j ") {
            Some(args.len() - rest.len())
        } else {
            args.rmatch_indices(" -j ")
                .map(|(i, _)| i + 4)
                .find(|&i| outside_quotes(&args[..i]))
        }?;
        args[start..].split_whitespace().next().map(str::to_string)
    }

    /// True when the service wrote this rule (its comment carries the owned prefix).
    pub fn is_owned(&self) -> bool {
        // Most rules of a busy chain are not ours: skip tokenizing them.
        self.args.contains(OWNED_COMMENT_PREFIX)
            && self
                .comment()
                .is_some_and(|c| c.starts_with(OWNED_COMMENT_PREFIX))
    }
}

/// Whether the end of `text` lies outside a double-quoted string (`\"` escapes a quote).
fn outside_quotes(text: &str) -> bool {
    let mut inside = false;
    let mut escaped = false;
    for c in text.chars() {
        match c {
            '\\' if inside && !escaped => escaped = true,
            '"' if !escaped => inside = !inside,
            _ => escaped = false,
        }
    }
    !inside
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec())
    }
}

/// A rule read back from the kernel with its counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRule {
    /// The rule in canonical form, counters removed.
    pub rule: Rule,
    /// Packets matched.
    pub packets: u64,
    /// Bytes matched.
    pub bytes: u64,
}

/// Parses the output of `iptables -t nat -S CHAIN -v`: keeps `-A` lines, strips the `-c P B`
/// counters so the rule compares equal to a rendered one, and keeps the counters aside.
pub fn parse_listing(listing: &str) -> Vec<ObservedRule> {
    listing
        .lines()
        .filter_map(|line| line.strip_prefix("-A "))
        .filter_map(|rest| {
            let (chain, args) = rest.split_once(' ')?;
            let (args, packets, bytes) = strip_counters(args);
            Some(ObservedRule {
                rule: Rule::new(chain, args),
                packets,
                bytes,
            })
        })
        .collect()
}

fn strip_counters(args: &str) -> (String, u64, u64) {
    let tokens: Vec<&str> = args.split(' ').collect();
    for i in 0..tokens.len().saturating_sub(2) {
        if tokens[i] == "-c"
            && let (Ok(p), Ok(b)) = (tokens[i + 1].parse(), tokens[i + 2].parse())
        {
            let mut kept = tokens[..i].to_vec();
            kept.extend_from_slice(&tokens[i + 3..]);
            return (kept.join(" "), p, b);
        }
    }
    (args.to_string(), 0, 0)
}

/// Splits rule text into words as a shell would for `iptables` arguments: double quotes group,
/// backslash escapes the next character.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut in_token = false;
    let mut quoted = false;
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    current.push(next);
                }
                in_token = true;
            }
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    tokens.push(std::mem::take(&mut current));
                    in_token = false;
                }
            }
            c => {
                current.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        tokens.push(current);
    }
    tokens
}

fn comment(text: &str) -> String {
    // `iptables -S` always double-quotes comments and escapes `"` and `\`.
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"");
    format!("-m comment --comment \"{escaped}\"")
}

/// The SNAT rule that makes the chosen address the source of traffic leaving the node.
pub fn snat_rule(addr: IpAddr) -> Rule {
    Rule::new(
        KILO_NAT,
        format!("{} -j SNAT --to-source {addr}", comment(COMMENT_SNAT)),
    )
}

/// The MASQUERADE rule written in own mode when no address is chosen.
pub fn masquerade_rule() -> Rule {
    Rule::new(
        KILO_NAT,
        format!("{} -j MASQUERADE", comment(COMMENT_MASQUERADE)),
    )
}

/// The RETURN rule that exempts one destination range from NAT (own mode).
pub fn return_rule(destination: IpNet) -> Rule {
    Rule::new(
        KILO_NAT,
        format!(
            "{}{} -j RETURN",
            address_match("-d", destination),
            comment(COMMENT_RETURN)
        ),
    )
}

/// `-s NET ` / `-d NET ` in canonical form; nothing for a /0, which `iptables -S` omits.
fn address_match(flag: &str, net: IpNet) -> String {
    if net.prefix_len() == 0 {
        String::new()
    } else {
        format!("{flag} {} ", net.trunc())
    }
}

/// The POSTROUTING rule that sends traffic from one source range into [`KILO_NAT`] (own mode).
pub fn jump_rule(source: IpNet) -> Rule {
    Rule::new(
        POSTROUTING,
        format!(
            "{}{} -j {KILO_NAT}",
            address_match("-s", source),
            comment(COMMENT_JUMP)
        ),
    )
}

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
    /// The short name of the mode, as the command line spells it.
    pub fn name(&self) -> &'static str {
        match self {
            ModeConfig::Own { .. } => "own",
            ModeConfig::Kilo => "kilo",
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

/// Computes the desired rules of one family from the configuration, the chosen address and
/// (in kilo mode, where the service only adds to Kilo's chain) what the kernel holds.
pub fn desired(
    mode: &ModeConfig,
    family: Family,
    addr: Option<IpAddr>,
    observed: &Observed,
) -> Desired {
    match mode {
        ModeConfig::Own {
            source_cidrs,
            no_nat_cidrs,
        } => {
            let of_family = |nets: &[IpNet]| -> Vec<IpNet> {
                nets.iter()
                    .copied()
                    .filter(|n| family_of_net(n) == family)
                    .collect()
            };
            let jumps: Vec<Rule> = of_family(source_cidrs).into_iter().map(jump_rule).collect();
            if jumps.is_empty() {
                return without_owned_rules(observed, format!("no {family} --source-cidr"));
            }
            let mut chain: Vec<Rule> = of_family(no_nat_cidrs)
                .into_iter()
                .map(return_rule)
                .collect();
            chain.push(addr.map_or_else(masquerade_rule, snat_rule));
            Desired {
                kilo_nat: Some(chain),
                jumps,
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

/// Builds the `iptables-restore --noflush` input that turns `observed` into `desired`, or
/// `None` when nothing needs to change. The whole change is one transaction of table nat.
pub fn plan_transaction(
    mode: &ModeConfig,
    observed: &Observed,
    desired: &Desired,
) -> Option<String> {
    let mut lines: Vec<String> = Vec::new();
    if observed.kilo_nat != desired.kilo_nat
        && let Some(want) = &desired.kilo_nat
    {
        match mode {
            ModeConfig::Own { .. } => {
                // The chain is ours wholesale: declaring it flushes and refills it atomically.
                lines.push(format!(":{KILO_NAT} - [0:0]"));
                lines.extend(want.iter().map(Rule::spec));
            }
            ModeConfig::Kilo => {
                // Kilo's rules are never touched: delete our own rules, insert the one wanted.
                let have = observed.kilo_nat.as_deref().unwrap_or_default();
                for rule in have.iter().filter(|r| r.is_owned()) {
                    lines.push(format!("-D {KILO_NAT} {}", rule.args));
                }
                if let Some(index) = want.iter().position(Rule::is_owned) {
                    lines.push(format!("-I {KILO_NAT} {} {}", index + 1, want[index].args));
                }
            }
        }
    }
    lines.extend(jump_lines(observed, desired));
    if lines.is_empty() {
        return None;
    }
    Some(wrap_nat(&lines))
}

/// The POSTROUTING lines that put the desired jumps at the top and remove any other jump of
/// ours; empty when POSTROUTING is right.
fn jump_lines(observed: &Observed, desired: &Desired) -> Vec<String> {
    let mut lines = Vec::new();
    let have = &observed.postrouting;
    let top_ok =
        have.len() >= desired.jumps.len() && have[..desired.jumps.len()] == desired.jumps[..];
    let owned_count = have.iter().filter(|r| r.is_owned()).count();
    if !top_ok || owned_count != desired.jumps.len() {
        for rule in have.iter().filter(|r| r.is_owned()) {
            lines.push(format!("-D {POSTROUTING} {}", rule.args));
        }
        for (i, jump) in desired.jumps.iter().enumerate() {
            lines.push(format!("-I {POSTROUTING} {} {}", i + 1, jump.args));
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
    pub commit: Option<String>,
    /// Removes decision rules of ours that `commit` left shadowed behind the new one. Traffic
    /// never reaches them, so this runs after the caller has its answer.
    pub tidy: Option<String>,
    /// What the kernel holds once `commit` is in.
    pub after_commit: Observed,
    /// What the kernel holds once `tidy` is in too: the desired state.
    pub after_tidy: Observed,
}

/// Plans the change from `observed` to `desired`: the add-only decision switch when the chain
/// differs from the desired one only in its decision rules of ours, else one full transaction.
pub fn plan(mode: &ModeConfig, observed: &Observed, desired: &Desired) -> Plan {
    plan_decision_switch(observed, desired).unwrap_or_else(|| {
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
    let others = |rules: &[Rule]| -> Vec<Rule> {
        rules.iter().filter(|r| !is_decision(r)).cloned().collect()
    };
    if others(have) != others(want) {
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
    let delete_old = |skip: usize| -> Option<String> {
        let lines: Vec<String> = old[skip..]
            .iter()
            .map(|(_, r)| format!("-D {KILO_NAT} {}", r.args))
            .collect();
        (!lines.is_empty()).then(|| wrap_nat(&lines))
    };
    let settled = Observed {
        kilo_nat: Some(want.clone()),
        postrouting: observed.postrouting.clone(),
    };
    let (slot, decision) = match new.as_slice() {
        // Kilo mode with nothing chosen: only a deletion removes our SNAT.
        [] => {
            return Some(Plan {
                commit: delete_old(0),
                tidy: None,
                after_commit: settled.clone(),
                after_tidy: settled,
            });
        }
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
        commit: Some(wrap_nat(&[format!(
            "-I {KILO_NAT} {} {}",
            slot + 1,
            decision.args
        )])),
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
pub fn plan_cleanup(mode: &ModeConfig, observed: &Observed) -> Vec<String> {
    let mut transactions = Vec::new();
    let mut lines: Vec<String> = Vec::new();
    for rule in observed.postrouting.iter().filter(|r| r.is_owned()) {
        lines.push(format!("-D {POSTROUTING} {}", rule.args));
    }
    let chain = observed.kilo_nat.as_deref().unwrap_or_default();
    for rule in chain.iter().filter(|r| r.is_owned()) {
        lines.push(format!("-D {KILO_NAT} {}", rule.args));
    }
    if !lines.is_empty() {
        transactions.push(wrap_nat(&lines));
    }
    let only_ours_left = chain.iter().all(Rule::is_owned);
    if mode.owns_chain() && observed.kilo_nat.is_some() && only_ours_left {
        transactions.push(wrap_nat(&[format!("-X {KILO_NAT}")]));
    }
    transactions
}

fn wrap_nat(lines: &[String]) -> String {
    let mut text = String::from("*nat\n");
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    text.push_str("COMMIT\n");
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own() -> ModeConfig {
        ModeConfig::Own {
            source_cidrs: vec![
                "10.44.0.0/24".parse().unwrap(),
                "fd00:44::/64".parse().unwrap(),
            ],
            no_nat_cidrs: vec!["10.4.0.0/16".parse().unwrap()],
        }
    }

    fn rule(spec: &str) -> Rule {
        parse_listing(spec).remove(0).rule
    }

    fn kg_chain() -> Vec<Rule> {
        [
            r#"-A KILO-NAT -d 10.4.0.0/16 -m comment --comment "Kilo: do not NAT packets destined for WireGuared IPs" -j RETURN"#,
            r#"-A KILO-NAT -m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE"#,
        ]
        .iter()
        .map(|s| rule(s))
        .collect()
    }

    #[test]
    fn parses_listing_with_counters() {
        let listing = "-N KILO-NAT\n-A KILO-NAT -m comment --comment \"kilo-egress: x\" -c 12 720 -j SNAT --to-source 198.51.100.20\n";
        let rules = parse_listing(listing);
        assert_eq!(rules.len(), 1);
        assert_eq!(rules[0].packets, 12);
        assert_eq!(rules[0].bytes, 720);
        assert_eq!(
            rules[0].rule.spec(),
            "-A KILO-NAT -m comment --comment \"kilo-egress: x\" -j SNAT --to-source 198.51.100.20"
        );
        assert!(rules[0].rule.is_owned());
        assert_eq!(rules[0].rule.target().as_deref(), Some("SNAT"));
    }

    #[test]
    fn target_is_found_past_quoted_comments() {
        let cases = [
            ("-j RETURN", Some("RETURN")),
            (
                r#"-m comment --comment "a -j B" -j SNAT --to-source 192.0.2.1"#,
                Some("SNAT"),
            ),
            (
                r#"-m comment --comment "x \" -j Y" -j MASQUERADE"#,
                Some("MASQUERADE"),
            ),
            (r#"-m comment --comment "only -j FAKE""#, None),
            ("-d 10.0.0.0/8", None),
        ];
        for (args, target) in cases {
            let rule = Rule::new(KILO_NAT, args.to_string());
            assert_eq!(rule.target().as_deref(), target, "{args}");
            let tokens = tokenize(args);
            let slow = tokens
                .iter()
                .position(|t| t == "-j")
                .and_then(|i| tokens.get(i + 1));
            assert_eq!(rule.target().as_ref(), slow, "{args}: same as tokenizing");
        }
    }

    #[test]
    fn tokenize_handles_quotes_and_escapes() {
        assert_eq!(
            tokenize(r#"-m comment --comment "a \"q\" b" -j X"#),
            vec!["-m", "comment", "--comment", "a \"q\" b", "-j", "X"]
        );
    }

    #[test]
    fn owned_is_decided_by_comment_prefix_only() {
        assert!(
            !rule(
                r#"-A KILO-NAT -m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE"#
            )
            .is_owned()
        );
        assert!(!rule("-A KILO-NAT -j SNAT --to-source 192.0.2.1").is_owned());
        assert!(snat_rule("192.0.2.1".parse().unwrap()).is_owned());
    }

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
        for (name, case, expect) in [
            ("flushed chain", no_chain, "chain KILO-NAT is missing"),
            ("removed jump", no_jump, "missing jump"),
            ("foreign rule", foreign, "unexpected rule"),
            ("out of order", reordered, "out of order"),
            ("jump below others", jump_below, "not at the top"),
            ("removed rule", removed, "missing rule"),
        ] {
            let drift = describe_drift(&own(), &case, &want);
            assert!(
                drift.iter().any(|d| d.contains(expect)),
                "{name}: {drift:?}"
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
        let tx = plan_transaction(&ModeConfig::Kilo, &observed, &want).unwrap();
        assert!(tx.contains("-I KILO-NAT 2 -m comment"), "{tx}");
        assert!(
            !tx.contains(":KILO-NAT"),
            "kilo mode must never flush: {tx}"
        );
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
        let tx = plan_transaction(&ModeConfig::Kilo, &observed, &want).unwrap();
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
        let txs = plan_cleanup(&ModeConfig::Kilo, &observed);
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
        let tx = plan_transaction(&v6_only, &observed, &want).unwrap();
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
        let tx = plan_transaction(&ModeConfig::Kilo, &observed, &want).unwrap();
        assert_eq!(tx.matches("-D POSTROUTING").count(), 1, "{tx}");
        assert!(
            !tx.contains("Kilo: jump"),
            "kg's jump is never touched: {tx}"
        );
    }

    #[test]
    fn zero_prefix_renders_as_iptables_prints_it() {
        // `iptables -S` omits `-s 0.0.0.0/0` and `-d ::/0`; rendering them would never compare
        // equal and the engine would rewrite the rule at every resync.
        assert_eq!(
            jump_rule("0.0.0.0/0".parse().unwrap()).spec(),
            r#"-A POSTROUTING -m comment --comment "kilo-egress: jump to KILO-NAT" -j KILO-NAT"#
        );
        assert_eq!(
            return_rule("::/0".parse().unwrap()).spec(),
            r#"-A KILO-NAT -m comment --comment "kilo-egress: do not NAT this destination" -j RETURN"#
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
        for (name, mode, family, addr, observed) in cases {
            let want = desired(&mode, family, addr, &observed);
            let plan = plan(&mode, &observed, &want);
            let rendered = format!(
                "# desired chain\n{}\n# commit (before the reply)\n{}# tidy (after the reply)\n{}",
                want.jumps
                    .iter()
                    .chain(want.kilo_nat.iter().flatten())
                    .map(Rule::spec)
                    .collect::<Vec<_>>()
                    .join("\n"),
                plan.commit.unwrap_or_default(),
                plan.tidy.unwrap_or_default(),
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
