//! A busy node's nat table: kube-proxy-like service chains (20,000 rules in 2,000 chains by
//! default) that kilo-egressd must neither read nor touch.
//!
//! The shape follows kube-proxy's iptables mode: `KUBE-SERVICES` sends each cluster IP to a
//! `KUBE-SVC-*` chain, which jumps to `KUBE-SEP-*` endpoint chains that mark and DNAT;
//! `POSTROUTING` jumps to `KUBE-POSTROUTING`. Rules are written in canonical `iptables -S` form,
//! and one `iptables-restore --noflush` installs (or, as kube-proxy's full sync does, rewrites)
//! them all.

use crate::lab::{Family, Iptables};

/// The size of the kube-proxy-like table.
#[derive(Debug, Clone, Copy)]
pub struct BusyNode {
    /// Number of services; each has one `KUBE-SVC-*` and one `KUBE-SEP-*` chain.
    pub services: usize,
}

impl Default for BusyNode {
    /// 1,000 services: 2,000 chains and 20,000 rules.
    fn default() -> Self {
        BusyNode { services: 1000 }
    }
}

/// Rules per service: 1 in KUBE-SERVICES, 9 in its SVC chain, 10 in its SEP chain.
const RULES_PER_SERVICE: usize = 20;

impl BusyNode {
    /// How many rules [`BusyNode::restore_input`] writes (besides the POSTROUTING jump).
    pub fn rule_count(&self) -> usize {
        self.services * RULES_PER_SERVICE
    }

    /// How many chains it creates (besides KUBE-SERVICES, KUBE-POSTROUTING and KUBE-MARK-MASQ).
    pub fn chain_count(&self) -> usize {
        self.services * 2
    }

    fn cluster_ip(family: Family, i: usize) -> String {
        match family {
            Family::V4 => format!("10.96.{}.{}/32", i / 250, i % 250 + 1),
            Family::V6 => format!("fd00:96::{:x}/128", i + 1),
        }
    }

    fn endpoint(family: Family, i: usize, j: usize) -> (String, String) {
        match family {
            Family::V4 => {
                let ip = format!("10.{}.{}.{}", 100 + j, i / 250, i % 250 + 1);
                (format!("{ip}/32"), format!("{ip}:8080"))
            }
            Family::V6 => {
                let ip = format!("fd00:100:{j:x}::{:x}", i + 1);
                (format!("{ip}/128"), format!("[{ip}]:8080"))
            }
        }
    }

    /// The `iptables-restore --noflush` input: declares every kube chain (creating or flushing
    /// it) and fills it. Running it again is kube-proxy's full resync.
    pub fn restore_input(&self, family: Family) -> String {
        let mut chains = String::from(
            ":KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
        );
        let mut rules = String::new();
        rules.push_str("-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n");
        // As kube-proxy writes it: only the packets it marked are masqueraded.
        rules.push_str("-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n");
        rules.push_str("-A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE\n");
        for i in 0..self.services {
            let svc = format!("KUBE-SVC-{i:016X}");
            let sep = format!("KUBE-SEP-{i:016X}");
            chains.push_str(&format!(":{svc} - [0:0]\n:{sep} - [0:0]\n"));
            let name = format!("ns{}/svc{i}:http", i % 50);
            rules.push_str(&format!(
                "-A KUBE-SERVICES -d {} -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j {svc}\n",
                Self::cluster_ip(family, i)
            ));
            for j in 0..9 {
                let (src, _) = Self::endpoint(family, i, j);
                rules.push_str(&format!(
                    "-A {svc} -s {src} -m comment --comment \"{name} -> endpoint {j}\" -j {sep}\n"
                ));
            }
            for j in 0..5 {
                let (src, dst) = Self::endpoint(family, i, j);
                rules.push_str(&format!(
                    "-A {sep} -s {src} -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n"
                ));
                rules.push_str(&format!(
                    "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {dst}\n"
                ));
            }
        }
        format!("*nat\n{chains}{rules}COMMIT\n")
    }

    /// Installs the table, plus kube-proxy's POSTROUTING jump (once).
    pub fn install(&self, ipt: &Iptables<'_>) -> anyhow::Result<()> {
        ipt.restore_noflush(&self.restore_input(ipt.family))?;
        let jump = [
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "kubernetes postrouting rules",
            "-j",
            "KUBE-POSTROUTING",
        ];
        if !ipt.has_rule(&jump)? {
            let mut args = vec!["-t", "nat", "-A"];
            args.extend(jump);
            ipt.run(&args)?;
        }
        Ok(())
    }

    /// The kube-proxy part of a nat dump (`iptables -t nat -S`): every line about a `KUBE-`
    /// chain, and POSTROUTING's jump to it. Compare it before and after to show nothing of
    /// kube-proxy's was touched.
    pub fn kube_lines(dump: &str) -> Vec<String> {
        dump.lines()
            .filter(|l| l.contains("KUBE-"))
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_table_has_20000_rules_in_2000_chains() {
        let busy = BusyNode::default();
        let input = busy.restore_input(Family::V6);
        let rules = input.lines().filter(|l| l.starts_with("-A ")).count();
        let chains = input
            .lines()
            .filter(|l| l.starts_with(":KUBE-SVC-") || l.starts_with(":KUBE-SEP-"))
            .count();
        // Three rules of KUBE-MARK-MASQ and KUBE-POSTROUTING come on top.
        assert_eq!((rules, chains), (busy.rule_count() + 3, 2000));
        assert_eq!(busy.rule_count(), 20_000);
    }
}
