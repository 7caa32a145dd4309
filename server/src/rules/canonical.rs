//! The canonical rule form: rules as `iptables -S` prints them (split into chain and
//! arguments), parsing a `-S -v` listing, and the rules the service writes, each marked as its
//! own by a comment. Pure text handling; nothing here runs a process.

use ipnet::IpNet;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, LazyLock};

/// The nat chain whose egress decision the service owns.
pub const KILO_NAT: &str = "KILO-NAT";
/// The built-in nat chain that jumps into [`KILO_NAT`].
pub const POSTROUTING: &str = "POSTROUTING";
/// Every comment the service writes starts with this; it is how the service knows its own rules.
pub const OWNED_COMMENT_PREFIX: &str = "kilo-egress:";

const COMMENT_SNAT: &str = "kilo-egress: SNAT to the chosen egress address";
/// The option that makes SNAT and MASQUERADE pick source ports fully at random.
const RANDOM_FULLY: &str = " --random-fully";
const COMMENT_MASQUERADE: &str = "kilo-egress: no egress address chosen, MASQUERADE";
const COMMENT_RETURN: &str = "kilo-egress: do not NAT this destination";
const COMMENT_JUMP: &str = "kilo-egress: jump to KILO-NAT";

/// One rule in canonical `iptables -S` form, split into its chain and the text after `-A CHAIN `.
/// Its text is shared, not copied, by its clones: the engine holds a chain several times over
/// (as read, as desired, as a plan leaves it, in a reply), and with 10,000 rules each copy of the
/// text would cost about a megabyte.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The chain that holds the rule.
    pub chain: Arc<str>,
    /// The match and target part, e.g. `-m comment --comment "..." -j MASQUERADE`.
    pub args: Arc<str>,
}

impl Rule {
    fn new(chain: &str, args: String) -> Rule {
        Rule {
            chain: chain_name(chain),
            args: args.into(),
        }
    }

    /// The rule as `iptables -S` prints it: `-A CHAIN ARGS`.
    pub fn spec(&self) -> String {
        self.to_string()
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
        let args = &*self.args;
        let start = if let Some(rest) = args.strip_prefix("-j ") {
            Some(args.len() - rest.len())
        } else {
            args.rmatch_indices(" -j ")
                .map(|(i, _)| i + 4)
                .find(|&i| outside_quotes(&args[..i]))
        }?;
        args[start..].split_whitespace().next().map(str::to_string)
    }

    /// The address an SNAT rule of ours writes (`-j SNAT --to-source ADDR`, exactly as
    /// [`snat_rule`] renders it), or `None` for any other rule, including a malformed one.
    pub fn owned_snat_source(&self) -> Option<IpAddr> {
        if !self.is_owned() || self.target().as_deref() != Some("SNAT") {
            return None;
        }
        let to = self.args.rsplit_once(" --to-source ")?.1;
        let addr: IpAddr = to.strip_suffix(RANDOM_FULLY).unwrap_or(to).parse().ok()?;
        let plain = snat_rule(addr);
        (*self == plain || *self == plain.clone().with_random_fully()).then_some(addr)
    }

    /// This rule with `--random-fully` when it is a SNAT or MASQUERADE rule of ours (what
    /// `iptables -S` prints last for those targets); any other rule unchanged. kube-proxy and
    /// Calico use it against SNAT source-port collisions.
    pub fn with_random_fully(self) -> Rule {
        let decision = matches!(self.target().as_deref(), Some("SNAT" | "MASQUERADE"));
        if !self.is_owned() || !decision || self.args.ends_with(RANDOM_FULLY) {
            return self;
        }
        Rule::new(&self.chain, format!("{}{RANDOM_FULLY}", self.args))
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

/// The name of a chain; the chains the service reads and writes share one string each.
fn chain_name(name: &str) -> Arc<str> {
    static KNOWN: LazyLock<[Arc<str>; 2]> =
        LazyLock::new(|| [Arc::from(KILO_NAT), Arc::from(POSTROUTING)]);
    KNOWN
        .iter()
        .find(|known| ***known == *name)
        .cloned()
        .unwrap_or_else(|| name.into())
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
        write!(f, "-A {} {}", self.chain, self.args)
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
    listing.lines().filter_map(parse_listing_line).collect()
}

/// One line of a `-S -v` listing as [`parse_listing`] reads it: the rule of an `-A` line, `None`
/// for any other line.
pub fn parse_listing_line(line: &str) -> Option<ObservedRule> {
    parse_listing_line_like(line, None)
}

/// [`parse_listing_line`], sharing the text of `like` when the line holds that very rule (see
/// [`share_text`]): a chain read back then costs no copy of what the service rendered.
pub fn parse_listing_line_like(line: &str, like: Option<&Rule>) -> Option<ObservedRule> {
    let (chain, args) = line.strip_prefix("-A ")?.split_once(' ')?;
    let (args, packets, bytes) = strip_counters(args);
    let rule = match like {
        Some(like) if *like.chain == *chain && *like.args == *args => like.clone(),
        _ => Rule::new(chain, args),
    };
    Some(ObservedRule {
        rule,
        packets,
        bytes,
    })
}

/// Makes each rule of `rules` that equals the rule at the same position of `like` share that
/// rule's text instead of holding a copy: a chain read back from the kernel then costs no text
/// where it holds what the service rendered (own mode's RETURN rules come first, in order).
pub fn share_text(rules: &mut [ObservedRule], like: &[Rule]) {
    for (observed, rule) in rules.iter_mut().zip(like) {
        if observed.rule == *rule {
            observed.rule = rule.clone();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::fixtures::rule;

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
    fn copies_of_a_chain_share_its_text() {
        // The engine holds a chain several times over; each copy must not copy the rule text
        // (a 10,000-rule chain is about a megabyte of it).
        let listing =
            "-A KILO-NAT -d 10.0.0.1/32 -j RETURN\n-A KILO-NAT -d 10.0.0.2/32 -j RETURN\n";
        let rules = parse_listing(listing);
        let copy = rules.clone();
        assert!(Arc::ptr_eq(&rules[0].rule.args, &copy[0].rule.args));
        assert!(Arc::ptr_eq(&rules[0].rule.chain, &rules[1].rule.chain));
        let rendered = return_rule("10.0.0.3/32".parse().unwrap());
        assert!(Arc::ptr_eq(&rendered.chain, &rules[0].rule.chain));
    }

    #[test]
    fn a_chain_read_back_shares_the_text_rendered_for_it() {
        let rendered: Vec<Rule> = ["10.0.0.1/32", "10.0.0.2/32"]
            .iter()
            .map(|net| return_rule(net.parse().unwrap()))
            .collect();
        let listing = format!(
            "-N KILO-NAT\n{} -c 3 180\n-A KILO-NAT -d 10.0.0.9/32 -j RETURN\n",
            rendered[0]
        );
        let mut read = parse_listing(&listing);
        assert!(!Arc::ptr_eq(&read[0].rule.args, &rendered[0].args));
        share_text(&mut read, &rendered);
        assert!(Arc::ptr_eq(&read[0].rule.args, &rendered[0].args));
        assert_eq!(read[0].packets, 3, "counters stay");
        assert_ne!(
            read[1].rule, rendered[1],
            "a different rule keeps its own text"
        );
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
    fn random_fully_goes_on_our_decision_rules_only() {
        let ours = snat_rule("198.51.100.20".parse().unwrap()).with_random_fully();
        assert!(
            ours.spec()
                .ends_with("-j SNAT --to-source 198.51.100.20 --random-fully")
        );
        assert_eq!(ours.owned_snat_source(), "198.51.100.20".parse().ok());
        assert_eq!(ours.clone().with_random_fully(), ours, "applied once");
        assert!(
            masquerade_rule()
                .with_random_fully()
                .spec()
                .ends_with("-j MASQUERADE --random-fully")
        );
        let kg =
            rule(r#"-A KILO-NAT -m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE"#);
        assert_eq!(kg.clone().with_random_fully(), kg, "kg's rule is kg's");
        let ret = return_rule("10.4.0.0/16".parse().unwrap());
        assert_eq!(ret.clone().with_random_fully(), ret);
    }

    #[test]
    fn only_our_well_formed_snat_rules_name_a_source() {
        let ours = snat_rule("198.51.100.20".parse().unwrap());
        assert_eq!(ours.owned_snat_source(), "198.51.100.20".parse().ok());
        let v6 = snat_rule("2001:db8::20".parse().unwrap());
        assert_eq!(v6.owned_snat_source(), "2001:db8::20".parse().ok());
        for other in [
            "-A KILO-NAT -j SNAT --to-source 192.0.2.1",
            r#"-A KILO-NAT -m comment --comment "kilo-egress: SNAT to the chosen egress address" -j SNAT --to-source 192.0.2.1:1024"#,
            r#"-A KILO-NAT -m comment --comment "kilo-egress: SNAT to the chosen egress address" -j SNAT --to-source 192.0.2.1-192.0.2.9"#,
            r#"-A KILO-NAT -m comment --comment "kilo-egress: no egress address chosen, MASQUERADE" -j MASQUERADE"#,
        ] {
            assert_eq!(rule(other).owned_snat_source(), None, "{other}");
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
}
