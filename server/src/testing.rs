//! Test doubles, compiled only for the crate's own tests and with the feature `test-util` (which
//! the integration tests enable): [`FakeNetfilter`], an in-memory nat table that re-parses every
//! transaction with `iptables-restore --noflush`'s all-or-nothing semantics;
//! [`EngineConfig::quiet`], an engine that checks nothing on its own; and [`serve`], the API on
//! one plaintext listener.

use kilo_egress_api::egress::Family;
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use crate::engine::presence::AbsentPolicy;
use crate::engine::{EngineConfig, EngineHandle, NOTIFICATION_DEBOUNCE};
use crate::listen::ListenAddr;
use crate::netfilter::{ChangeForwarder, Netfilter, NetfilterError, failing_line_context};
use crate::nftwatch::KernelEvent;
use crate::rules::{ModeConfig, ObservedRule, parse_listing, tokenize};
use crate::server::{Limits, Security, ServeError, serve_all};
use crate::xtinfo::TableShape;

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
            follow_addresses: false,
            absent_address: AbsentPolicy::Masquerade,
            random_fully: false,
            random_fully_reason: "off (test)".into(),
            conntrack_flush: false,
            metrics: std::sync::Arc::default(),
        }
    }
}

/// Serves the API on `listen` (plaintext; see [`serve_all`]) until `shutdown` completes.
pub async fn serve(
    listen: &ListenAddr,
    engine: EngineHandle,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_all(
        std::slice::from_ref(listen),
        engine,
        limits,
        Security::default(),
        shutdown,
    )
    .await
}

/// An in-memory nat table with `iptables-restore --noflush` semantics, for tests: chains
/// declared with `:NAME` are created or flushed (built-ins are not flushed), `-A`, `-I`, `-D` and
/// `-X` apply in order, and any error discards the whole transaction.
#[derive(Default)]
pub struct FakeNetfilter {
    tables: Mutex<BTreeMap<Family, BTreeMap<String, Vec<String>>>>,
    transactions: AtomicUsize,
    reads: AtomicUsize,
    committed: Mutex<Vec<(Family, String)>>,
    /// The next writer id: every restore and every tampering writes as a new "process".
    next_writer: AtomicU32,
    /// The writer id of the last successful restore.
    last_restore_writer: Mutex<Option<u32>>,
    /// While set, every restore fails with this message (a broken tool or kernel).
    refusing: Mutex<Option<String>>,
    /// Set by [`FakeNetfilter::with_change_notifications`]: every change is announced, as the
    /// nf_tables kernel does, once the engine has subscribed.
    announces_changes: bool,
    subscriber: Mutex<Option<ChangeForwarder>>,
    /// Set by [`FakeNetfilter::with_table_shapes`]: the CPU every chain read burns, and that the
    /// table has a shape, as x_tables does.
    shaped_reads: Option<Duration>,
}

const BUILTIN_NAT_CHAINS: [&str; 4] = ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"];

impl FakeNetfilter {
    /// An empty nat table with its built-in chains, for both families.
    pub fn new() -> FakeNetfilter {
        let fake = FakeNetfilter::default();
        {
            let mut tables = fake.tables.lock().unwrap();
            for family in Family::ALL {
                let table = tables.entry(family).or_default();
                for chain in BUILTIN_NAT_CHAINS {
                    table.insert(chain.to_string(), Vec::new());
                }
            }
        }
        fake
    }

    /// Like [`FakeNetfilter::new`], but announcing every change (restores and tampering) the way
    /// nf_tables does.
    pub fn with_change_notifications() -> FakeNetfilter {
        FakeNetfilter {
            announces_changes: true,
            ..FakeNetfilter::new()
        }
    }

    /// Like [`FakeNetfilter::new`], but giving the table's shape (rule count and total length,
    /// so a same-length replacement goes unseen, as on x_tables) and burning `read_cost` of CPU
    /// on every chain read, as a busy legacy node does.
    pub fn with_table_shapes(read_cost: Duration) -> FakeNetfilter {
        FakeNetfilter {
            shaped_reads: Some(read_cost),
            ..FakeNetfilter::new()
        }
    }

    /// A writer id not used before, as the port id of a new iptables-nft process would be.
    fn new_writer(&self) -> u32 {
        self.next_writer.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Tells the subscriber that `family` changed, by `writer`.
    fn announce(&self, family: Family, writer: u32) {
        if let Some(forward) = self.subscriber.lock().unwrap().as_mut() {
            forward(KernelEvent::Changed {
                families: [family].into_iter().collect(),
                writers: [writer].into_iter().collect(),
            });
        }
    }

    /// Makes every restore fail with `why` (a broken iptables binary, a missing kernel module),
    /// or work again with `None`.
    pub fn refuse_restores(&self, why: Option<&str>) {
        *self.refusing.lock().unwrap() = why.map(str::to_string);
    }

    /// How many chains were read.
    pub fn reads(&self) -> usize {
        self.reads.load(Ordering::SeqCst)
    }

    /// Every transaction applied successfully, in order.
    pub fn committed(&self) -> Vec<(Family, String)> {
        self.committed.lock().unwrap().clone()
    }

    /// Changes the table behind the service's back without announcing it (a lost
    /// notification).
    pub fn tamper_silently(
        &self,
        family: Family,
        edit: impl FnOnce(&mut BTreeMap<String, Vec<String>>),
    ) {
        edit(self.tables.lock().unwrap().get_mut(&family).unwrap());
    }

    /// How many transactions were applied successfully.
    pub fn transactions(&self) -> usize {
        self.transactions.load(Ordering::SeqCst)
    }

    /// The chain's rules as `-A CHAIN ARGS` lines, or `None` when absent.
    pub fn chain(&self, family: Family, chain: &str) -> Option<Vec<String>> {
        let tables = self.tables.lock().unwrap();
        tables[&family].get(chain).map(|rules| {
            rules
                .iter()
                .map(|args| format!("-A {chain} {args}"))
                .collect()
        })
    }

    /// Changes the table behind the service's back (as another agent or an operator would).
    pub fn tamper(&self, family: Family, edit: impl FnOnce(&mut BTreeMap<String, Vec<String>>)) {
        edit(self.tables.lock().unwrap().get_mut(&family).unwrap());
        self.announce(family, self.new_writer());
    }

    fn apply(table: &mut BTreeMap<String, Vec<String>>, input: &str) -> Result<(), String> {
        let mut in_nat = false;
        let mut committed = false;
        for (index, raw) in input.lines().enumerate() {
            let line = raw.trim();
            let fail = |why: &str| format!("line {}: {why}: {line}", index + 1);
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if line == "*nat" {
                in_nat = true;
                continue;
            }
            if !in_nat {
                return Err(fail("rule outside a table"));
            }
            if line == "COMMIT" {
                committed = true;
                in_nat = false;
                continue;
            }
            if let Some(decl) = line.strip_prefix(':') {
                let name = decl.split_whitespace().next().unwrap_or_default();
                if BUILTIN_NAT_CHAINS.contains(&name) {
                    table.entry(name.to_string()).or_default();
                } else {
                    table.insert(name.to_string(), Vec::new());
                }
                continue;
            }
            let tokens = tokenize(line);
            let (Some(op), Some(chain)) = (tokens.first(), tokens.get(1)) else {
                return Err(fail("incomplete line"));
            };
            let rest_after = |skip: usize| -> String {
                // Keep the canonical quoting of the original text: drop the first `skip` words.
                let mut text = line;
                for _ in 0..skip {
                    text = text.trim_start();
                    text = text.split_once(' ').map_or("", |(_, r)| r);
                }
                text.trim().to_string()
            };
            if let Some(target) = jump_target(&tokens)
                && !table.contains_key(&target)
                && !is_builtin_target(&target)
            {
                return Err(fail("unknown target"));
            }
            match op.as_str() {
                "-A" => {
                    let rules = table.get_mut(chain).ok_or_else(|| fail("no such chain"))?;
                    rules.push(rest_after(2));
                }
                "-I" => {
                    let rules = table.get_mut(chain).ok_or_else(|| fail("no such chain"))?;
                    let (position, args) = match tokens.get(2).and_then(|t| t.parse::<usize>().ok())
                    {
                        Some(n) => (n, rest_after(3)),
                        None => (1, rest_after(2)),
                    };
                    if position == 0 || position > rules.len() + 1 {
                        return Err(fail("index of insertion too big"));
                    }
                    rules.insert(position - 1, args);
                }
                "-D" => {
                    let rules = table.get_mut(chain).ok_or_else(|| fail("no such chain"))?;
                    let args = rest_after(2);
                    let at = rules
                        .iter()
                        .position(|r| *r == args)
                        .ok_or_else(|| fail("rule does not exist"))?;
                    rules.remove(at);
                }
                "-X" => {
                    let referenced = table
                        .values()
                        .flatten()
                        .any(|r| jump_target(&tokenize(r)).as_deref() == Some(chain));
                    if referenced {
                        return Err(fail("chain is still referenced"));
                    }
                    table.remove(chain).ok_or_else(|| fail("no such chain"))?;
                }
                _ => return Err(fail("unsupported command")),
            }
        }
        if in_nat || !committed {
            return Err("missing COMMIT".to_string());
        }
        Ok(())
    }
}

fn jump_target(tokens: &[String]) -> Option<String> {
    tokens
        .iter()
        .position(|t| t == "-j")
        .and_then(|i| tokens.get(i + 1).cloned())
}

fn is_builtin_target(target: &str) -> bool {
    matches!(
        target,
        "SNAT" | "MASQUERADE" | "RETURN" | "ACCEPT" | "DROP" | "MARK" | "DNAT"
    )
}

impl Netfilter for FakeNetfilter {
    fn read_chain(
        &self,
        family: Family,
        chain: &str,
    ) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        if let Some(cost) = self.shaped_reads {
            // The CPU cost of copying a large table, which is what polling must avoid.
            let started = std::time::Instant::now();
            while started.elapsed() < cost {
                std::hint::spin_loop();
            }
        }
        Ok(self
            .chain(family, chain)
            .map(|lines| parse_listing(&lines.join("\n"))))
    }

    fn restore(&self, family: Family, input: &dyn fmt::Display) -> Result<(), NetfilterError> {
        let input = &input.to_string();
        if let Some(why) = self.refusing.lock().unwrap().clone() {
            return Err(NetfilterError::Restore {
                command: "fake-restore".to_string(),
                stderr: why,
                context: String::new(),
            });
        }
        let mut tables = self.tables.lock().unwrap();
        let mut scratch = tables[&family].clone();
        FakeNetfilter::apply(&mut scratch, input).map_err(|stderr| NetfilterError::Restore {
            command: "fake-restore".to_string(),
            context: failing_line_context(&stderr, input),
            stderr,
        })?;
        tables.insert(family, scratch);
        drop(tables);
        self.transactions.fetch_add(1, Ordering::SeqCst);
        self.committed
            .lock()
            .unwrap()
            .push((family, input.to_string()));
        let writer = self.new_writer();
        *self.last_restore_writer.lock().unwrap() = Some(writer);
        self.announce(family, writer);
        Ok(())
    }

    fn backend_name(&self) -> &'static str {
        "fake"
    }

    fn last_writer(&self) -> Option<u32> {
        *self.last_restore_writer.lock().unwrap()
    }

    fn table_shape(&self, family: Family) -> Option<TableShape> {
        self.shaped_reads?;
        let tables = self.tables.lock().unwrap();
        let rules = tables[&family].values().flatten();
        let (count, length) = rules.fold((0, 0), |(n, len), rule| (n + 1, len + rule.len()));
        Some(TableShape::for_test(
            count + tables[&family].len() as u32,
            length as u32,
        ))
    }

    fn watch_changes(&self, forward: ChangeForwarder) -> Result<(), String> {
        if !self.announces_changes {
            return Err("this fake announces no changes".into());
        }
        *self.subscriber.lock().unwrap() = Some(forward);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_applies_all_or_nothing() {
        let fake = FakeNetfilter::new();
        fake.restore(
            Family::Ipv4,
            &"*nat\n:KILO-NAT - [0:0]\n-A KILO-NAT -j MASQUERADE\nCOMMIT\n",
        )
        .unwrap();
        let err = fake
            .restore(
                Family::Ipv4,
                &"*nat\n-A KILO-NAT -j RETURN\n-D KILO-NAT -j NOPE-NOT-THERE\nCOMMIT\n",
            )
            .unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        assert_eq!(
            fake.chain(Family::Ipv4, "KILO-NAT").unwrap(),
            vec!["-A KILO-NAT -j MASQUERADE"]
        );
        assert_eq!(fake.transactions(), 1);
    }

    #[test]
    fn fake_declaring_builtin_does_not_flush_it() {
        let fake = FakeNetfilter::new();
        fake.tamper(Family::Ipv6, |t| {
            t.get_mut("POSTROUTING").unwrap().push("-j ACCEPT".into())
        });
        fake.restore(Family::Ipv6, &"*nat\n:POSTROUTING ACCEPT [0:0]\nCOMMIT\n")
            .unwrap();
        assert_eq!(fake.chain(Family::Ipv6, "POSTROUTING").unwrap().len(), 1);
    }

    #[test]
    fn every_restore_writes_as_a_new_writer() {
        let fake = FakeNetfilter::new();
        assert_eq!(fake.last_writer(), None);
        let input = "*nat\n:KILO-NAT - [0:0]\nCOMMIT\n";
        fake.restore(Family::Ipv4, &input).unwrap();
        let first = fake.last_writer().unwrap();
        fake.restore(Family::Ipv4, &input).unwrap();
        assert_ne!(fake.last_writer(), Some(first));
    }
}
