//! A look-alike of Kilo's agent (kg) for kilo mode: it writes KILO-NAT the way kg does.
//!
//! kg (squat/kilo, pkg/iptables and pkg/mesh/routes.go) "clears" KILO-NAT on start, which
//! flushes it, and fills it with RETURN rules for mesh destinations and service CIDRs followed by
//! `-m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE`; POSTROUTING jumps to it
//! for the pod subnet. [`KgAgent::sync`] does the same in one `iptables-restore --noflush`
//! transaction that declares `:KILO-NAT - [0:0]` (which flushes the chain) and adds the jump
//! when it is missing. Rules are written in the canonical `iptables -S` form, so the lines read
//! back compare equal to [`KgAgent::chain_rules`].

use crate::lab::{Family, Iptables};
use crate::{REPAIR_TIMEOUT, poll_until};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What a [`KgAgent::run`] loop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KgStats {
    /// Periodic checks made.
    pub checks: usize,
    /// Transactions written, the start-up sync included.
    pub writes: usize,
}

/// The comment of kg's MASQUERADE rule, the anchor kilo-egressd inserts its SNAT rule before.
pub const MASQUERADE_COMMENT: &str = "Kilo: NAT remaining packets";

/// The comment of kg's POSTROUTING jump.
pub const JUMP_COMMENT: &str = "Kilo: jump to KILO-NAT chain";

/// Writes KILO-NAT like kg for one backend and family of a lab's node.
#[derive(Debug, Clone, Copy)]
pub struct KgAgent<'lab> {
    ipt: Iptables<'lab>,
}

impl<'lab> KgAgent<'lab> {
    /// The agent for the node's nat table of `ipt`'s backend and family.
    pub fn new(ipt: Iptables<'lab>) -> Self {
        KgAgent { ipt }
    }

    fn family(&self) -> Family {
        self.ipt.family
    }

    /// kg's KILO-NAT rules in kernel order, as `iptables -S` prints them.
    pub fn chain_rules(&self) -> Vec<String> {
        let (wireguard, known, peer, service) = match self.family() {
            Family::V4 => (
                "10.4.0.0/16",
                "10.45.0.0/24",
                "10.46.0.1/32",
                "10.96.0.0/12",
            ),
            Family::V6 => (
                "fd00:4::/64",
                "fd00:45::/64",
                "fd00:46::1/128",
                "fd00:96::/108",
            ),
        };
        let ret = |dst: &str, what: &str| {
            format!(
                "-A KILO-NAT -d {dst} -m comment --comment \"Kilo: do not NAT packets destined for {what}\" -j RETURN"
            )
        };
        vec![
            ret(wireguard, "WireGuared IPs"),
            ret(known, "known IPs"),
            ret(peer, "peers"),
            ret(service, "service CIDRs"),
            format!("-A KILO-NAT -m comment --comment \"{MASQUERADE_COMMENT}\" -j MASQUERADE"),
        ]
    }

    /// kg's POSTROUTING jump into KILO-NAT for the lab's pod CIDR, as `iptables -S` prints it.
    pub fn jump_rule(&self) -> String {
        format!(
            "-A POSTROUTING -s {} -m comment --comment \"{JUMP_COMMENT}\" -j KILO-NAT",
            self.family().pod_cidr()
        )
    }

    /// The `iptables-restore --noflush` input of one sync: flush and refill KILO-NAT, and append
    /// the jump when `add_jump`.
    pub fn restore_input(&self, add_jump: bool) -> String {
        let mut input = String::from("*nat\n:KILO-NAT - [0:0]\n");
        for rule in self.chain_rules() {
            input.push_str(&rule);
            input.push('\n');
        }
        if add_jump {
            input.push_str(&self.jump_rule());
            input.push('\n');
        }
        input.push_str("COMMIT\n");
        input
    }

    /// What kg does on start: create or flush KILO-NAT, write its rules, and make sure the
    /// POSTROUTING jump exists. Any rule another program put into KILO-NAT is gone afterwards.
    pub fn sync(&self) -> anyhow::Result<()> {
        let has_jump = self.ipt.has_rule(&[
            "POSTROUTING",
            "-s",
            self.family().pod_cidr(),
            "-m",
            "comment",
            "--comment",
            JUMP_COMMENT,
            "-j",
            "KILO-NAT",
        ])?;
        self.ipt.restore_noflush(&self.restore_input(!has_jump))
    }

    /// What kg's periodic check does after someone deleted its chain rule number `index`: it
    /// appends the missing rule again, and deletes and appends again every rule of its own after
    /// it. Done here in one transaction together with that deletion, so rules of other programs
    /// that sat between kg's rules end up before the re-appended ones.
    pub fn reappend_from(&self, index: usize) -> anyhow::Result<()> {
        let rules = &self.chain_rules()[index..];
        let mut input = String::from("*nat\n");
        for rule in rules {
            input.push_str(&format!("-D{}\n", &rule[2..]));
        }
        for rule in rules {
            input.push_str(rule);
            input.push('\n');
        }
        input.push_str("COMMIT\n");
        self.ipt.restore_noflush(&input)
    }

    /// kg's periodic check: for each of its own rules it looks whether the rule exists
    /// (anywhere: kg checks presence, not order). The first missing chain rule is appended again,
    /// and every rule of kg's after it is deleted and appended again; a missing jump is appended.
    /// Rules of other programs are never deleted. Returns how many transactions it wrote (0 when
    /// everything was in place).
    pub fn check_and_repair(&self) -> anyhow::Result<usize> {
        let chain = self.ipt.iptables_s("KILO-NAT").unwrap_or_default();
        let present: Vec<&str> = chain.lines().collect();
        let rules = self.chain_rules();
        let mut input = String::new();
        if let Some(missing) = rules.iter().position(|r| !present.contains(&r.as_str())) {
            for rule in &rules[missing + 1..] {
                if present.contains(&rule.as_str()) {
                    input.push_str(&format!("-D{}\n", &rule[2..]));
                }
            }
            for rule in &rules[missing..] {
                input.push_str(rule);
                input.push('\n');
            }
        }
        let postrouting = self.ipt.iptables_s("POSTROUTING")?;
        if !postrouting.lines().any(|l| l == self.jump_rule()) {
            input.push_str(&self.jump_rule());
            input.push('\n');
        }
        if input.is_empty() {
            return Ok(0);
        }
        if !chain.starts_with("-N KILO-NAT") {
            input.insert_str(0, ":KILO-NAT - [0:0]\n");
        }
        self.ipt
            .restore_noflush(&format!("*nat\n{input}COMMIT\n"))?;
        Ok(1)
    }

    /// Runs like kg: [`KgAgent::sync`] on start (flushing KILO-NAT), then
    /// [`KgAgent::check_and_repair`] every `period` until `stop` is set.
    pub fn run(&self, period: Duration, stop: &AtomicBool) -> anyhow::Result<KgStats> {
        self.sync()?;
        let mut stats = KgStats {
            checks: 0,
            writes: 1,
        };
        loop {
            let next = Instant::now() + period;
            while Instant::now() < next {
                if stop.load(Ordering::SeqCst) {
                    return Ok(stats);
                }
                std::thread::sleep(Duration::from_millis(20).min(next - Instant::now()));
            }
            stats.writes += self.check_and_repair()?;
            stats.checks += 1;
        }
    }

    /// Every rule kg wrote, in kernel order: the chain's rules, then the jump.
    pub fn all_rules(&self) -> Vec<String> {
        let mut rules = self.chain_rules();
        rules.push(self.jump_rule());
        rules
    }
}

/// KILO-NAT must be kg's rules with one kilo-egress SNAT to `addr` directly before the last one
/// (MASQUERADE). Returns a description of what is wrong, or `None`.
pub fn snat_before_masquerade_problem(
    chain: &[String],
    kg: &KgAgent<'_>,
    addr: &str,
) -> Option<String> {
    let kg_rules = kg.chain_rules();
    if chain.len() != kg_rules.len() + 1 {
        return Some(format!(
            "expected kg's {} rules plus one SNAT",
            kg_rules.len()
        ));
    }
    let snat = &chain[chain.len() - 2];
    if !(snat.contains("--comment \"kilo-egress:")
        && crate::decision(snat).ends_with(&format!("-j SNAT --to-source {addr}")))
    {
        return Some(format!(
            "the rule before MASQUERADE is not our SNAT to {addr}: {snat}"
        ));
    }
    let mut without: Vec<String> = chain.to_vec();
    without.remove(chain.len() - 2);
    if without != kg_rules {
        return Some(format!("kg's rules changed; expected {kg_rules:#?}"));
    }
    None
}

/// Polls until [`snat_before_masquerade_problem`] finds nothing wrong, up to [`REPAIR_TIMEOUT`].
pub fn wait_for_snat_before_masquerade(
    ipt: &Iptables<'_>,
    kg: &KgAgent<'_>,
    addr: &str,
) -> anyhow::Result<()> {
    wait_for_snat_before_masquerade_within(ipt, kg, addr, REPAIR_TIMEOUT)
}

/// [`wait_for_snat_before_masquerade`] up to `timeout`.
pub fn wait_for_snat_before_masquerade_within(
    ipt: &Iptables<'_>,
    kg: &KgAgent<'_>,
    addr: &str,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut last = (Vec::new(), None);
    let ok = poll_until(timeout, || {
        let chain = ipt.rules("KILO-NAT").unwrap_or_default();
        let problem = snat_before_masquerade_problem(&chain, kg, addr);
        let ok = problem.is_none();
        last = (chain, problem);
        ok
    });
    if !ok {
        anyhow::bail!(
            "KILO-NAT did not get SNAT to {addr} directly before kg's MASQUERADE within {timeout:?}: {}\nlast seen: {:#?}",
            last.1.unwrap_or_default(),
            last.0
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::Backend;

    #[test]
    fn sync_input_flushes_the_chain_and_ends_with_masquerade() {
        let kg = KgAgent::new(Iptables::new("unused", Backend::Nft, Family::V6));
        let input = kg.restore_input(true);
        let lines: Vec<&str> = input.lines().collect();
        assert_eq!(lines[..2], ["*nat", ":KILO-NAT - [0:0]"]);
        assert_eq!(
            lines[lines.len() - 3..],
            [
                "-A KILO-NAT -m comment --comment \"Kilo: NAT remaining packets\" -j MASQUERADE",
                "-A POSTROUTING -s fd00:44::/64 -m comment --comment \"Kilo: jump to KILO-NAT chain\" -j KILO-NAT",
                "COMMIT",
            ]
        );
        assert!(!kg.restore_input(false).contains("POSTROUTING"));
    }
}
