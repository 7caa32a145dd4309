//! The boundary to the kernel's nat table: reading one chain and applying one
//! `iptables-restore --noflush` transaction. [`IptablesCli`] runs the real tools (`iptables -S`
//! to read, `iptables-restore` to write), and streams both: a listing is parsed line by line as
//! the tool prints it, and a transaction is written to the tool as it is rendered, so a chain of
//! 10,000 rules is never held as one text. The test double lives in `crate::testing` (feature
//! `test-util`).

use kilo_egress_api::egress::Family;
use std::fmt;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;

use crate::nftwatch::{self, KernelEvent};
use crate::rules::{ObservedRule, Rule, parse_listing_line_like, share_text};
use crate::xtinfo::{self, TableShape};

/// Which iptables implementation programs the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// `iptables-nft`: the nf_tables kernel API (the default on current distributions).
    Nft,
    /// `iptables-legacy`: the x_tables kernel API.
    Legacy,
}

impl Backend {
    /// The backend's name as flags and GetRules spell it.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The listing command of a family, e.g. `iptables-nft`.
    pub fn list_command(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::Ipv4) => "iptables-nft",
            (Backend::Nft, Family::Ipv6) => "ip6tables-nft",
            (Backend::Legacy, Family::Ipv4) => "iptables-legacy",
            (Backend::Legacy, Family::Ipv6) => "ip6tables-legacy",
        }
    }

    /// The save command of a family, e.g. `iptables-nft-save`.
    pub fn save_command(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::Ipv4) => "iptables-nft-save",
            (Backend::Nft, Family::Ipv6) => "ip6tables-nft-save",
            (Backend::Legacy, Family::Ipv4) => "iptables-legacy-save",
            (Backend::Legacy, Family::Ipv6) => "ip6tables-legacy-save",
        }
    }

    /// The restore command of a family, e.g. `iptables-nft-restore`.
    pub fn restore_command(self, family: Family) -> &'static str {
        match (self, family) {
            (Backend::Nft, Family::Ipv4) => "iptables-nft-restore",
            (Backend::Nft, Family::Ipv6) => "ip6tables-nft-restore",
            (Backend::Legacy, Family::Ipv4) => "iptables-legacy-restore",
            (Backend::Legacy, Family::Ipv6) => "ip6tables-legacy-restore",
        }
    }
}

/// `--iptables-backend`: a backend, or `auto` to use the one that holds the host's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// Detect the backend the host uses, as kube-proxy's iptables wrappers do.
    Auto,
    /// Always `iptables-nft`.
    Nft,
    /// Always `iptables-legacy`.
    Legacy,
}

/// What one backend's `*-save` output says about the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BackendEvidence {
    /// Whether the save tools ran at all (the backend is installed and usable).
    pub usable: bool,
    /// kubelet's marker chain `KUBE-IPTABLES-HINT` or `KUBE-KUBELET-CANARY` exists here.
    pub kubelet_hint: bool,
    /// Kilo's chain `KILO-NAT` exists here.
    pub kilo_nat: bool,
    /// Number of rules (`-A` lines) of both families.
    pub rules: usize,
}

impl BackendEvidence {
    /// Reads the evidence from `*-save` output of both families.
    pub fn from_save_output(outputs: &[&str]) -> BackendEvidence {
        let mut evidence = BackendEvidence {
            usable: true,
            ..BackendEvidence::default()
        };
        let mut table = "";
        for line in outputs.iter().flat_map(|o| o.lines()) {
            if let Some(name) = line.strip_prefix('*') {
                table = name;
            } else if line.starts_with("-A ") {
                evidence.rules += 1;
            } else if let Some(chain) = line.strip_prefix(':') {
                let name = chain.split_whitespace().next().unwrap_or_default();
                evidence.kubelet_hint |=
                    matches!(name, "KUBE-IPTABLES-HINT" | "KUBE-KUBELET-CANARY");
                evidence.kilo_nat |= table == "nat" && name == "KILO-NAT";
            }
        }
        evidence
    }
}

/// Picks the backend from the evidence of both, and says why. The order follows kube-proxy's
/// iptables wrapper: kubelet's marker chain, then (for Kilo) where KILO-NAT lives, then which
/// backend holds more rules; nft when nothing tells them apart.
pub fn decide_backend(nft: &BackendEvidence, legacy: &BackendEvidence) -> (Backend, String) {
    let only = |pick: fn(&BackendEvidence) -> bool| match (pick(nft), pick(legacy)) {
        (true, false) => Some(Backend::Nft),
        (false, true) => Some(Backend::Legacy),
        _ => None,
    };
    if let Some(backend) = only(|e| e.usable) {
        return (backend, format!("only {} tools are usable", backend.name()));
    }
    if let Some(backend) = only(|e| e.kubelet_hint) {
        return (
            backend,
            format!(
                "kubelet's KUBE-IPTABLES-HINT/KUBE-KUBELET-CANARY chain is in {}",
                backend.name()
            ),
        );
    }
    if let Some(backend) = only(|e| e.kilo_nat) {
        return (
            backend,
            format!("chain KILO-NAT exists only in {}", backend.name()),
        );
    }
    if legacy.rules > nft.rules {
        return (
            Backend::Legacy,
            format!(
                "legacy holds more rules ({} vs {} in nft)",
                legacy.rules, nft.rules
            ),
        );
    }
    (
        Backend::Nft,
        format!(
            "nft holds at least as many rules ({} vs {} in legacy)",
            nft.rules, legacy.rules
        ),
    )
}

/// Gathers the evidence of one backend by running its `iptables-save`/`ip6tables-save`.
pub fn backend_evidence(backend: Backend) -> BackendEvidence {
    let save = |family| {
        Command::new(backend.save_command(family))
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let outputs: Vec<String> = Family::ALL.into_iter().filter_map(save).collect();
    if outputs.is_empty() {
        return BackendEvidence::default();
    }
    BackendEvidence::from_save_output(&outputs.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Resolves `--iptables-backend`; with `auto`, inspects both backends once.
pub fn choose_backend(choice: BackendChoice) -> (Backend, String) {
    match choice {
        BackendChoice::Nft => (Backend::Nft, "--iptables-backend nft".to_string()),
        BackendChoice::Legacy => (Backend::Legacy, "--iptables-backend legacy".to_string()),
        BackendChoice::Auto => {
            let (backend, why) = decide_backend(
                &backend_evidence(Backend::Nft),
                &backend_evidence(Backend::Legacy),
            );
            (backend, format!("auto: {why}"))
        }
    }
}

/// A failure to read or write the nat table.
#[derive(Debug, thiserror::Error)]
pub enum NetfilterError {
    /// A tool could not be started at all.
    #[error("cannot run {command}: {error}; is the iptables package installed and on PATH?")]
    Spawn {
        /// The command that failed to start.
        command: String,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// Listing a chain failed for another reason than the chain being absent.
    #[error("{command} -t nat -S {chain} failed: {stderr}")]
    List {
        /// The listing command.
        command: String,
        /// The chain.
        chain: String,
        /// What the tool printed.
        stderr: String,
    },
    /// The kernel (or the restore tool) refused a transaction; nothing of it was applied.
    #[error("{command} refused the transaction (nothing applied): {stderr}{context}")]
    Restore {
        /// The restore command.
        command: String,
        /// What the tool printed.
        stderr: String,
        /// The failing line of the input with a few lines around it, when the tool named one.
        context: String,
    },
}

impl NetfilterError {
    /// Whether the tool gave up waiting for the xtables lock (legacy; another program holds
    /// it): the kernel was not asked, so reading again will not help for a while.
    pub fn is_lock_timeout(&self) -> bool {
        let stderr = match self {
            NetfilterError::List { stderr, .. } | NetfilterError::Restore { stderr, .. } => stderr,
            NetfilterError::Spawn { .. } => return false,
        };
        stderr.contains("holding the xtables lock")
    }
}

/// Reads chains of, and applies transactions to, the nat table of one network namespace.
pub trait Netfilter: Send + Sync {
    /// Lists one nat chain with counters; `Ok(None)` when the chain does not exist.
    fn read_chain(
        &self,
        family: Family,
        chain: &str,
    ) -> Result<Option<Vec<ObservedRule>>, NetfilterError>;
    /// [`Netfilter::read_chain`], where each rule that equals the rule of `like` at the same
    /// position shares that rule's text instead of holding a copy ([`share_text`]).
    fn read_chain_like(
        &self,
        family: Family,
        chain: &str,
        like: &[Rule],
    ) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        let mut rules = self.read_chain(family, chain)?;
        if let Some(rules) = &mut rules {
            share_text(rules, like);
        }
        Ok(rules)
    }

    /// Applies one `iptables-restore --noflush` input atomically. `input` renders the text (a
    /// [`crate::rules::Transaction`], or any text); it is written out as it is rendered.
    fn restore(&self, family: Family, input: &dyn fmt::Display) -> Result<(), NetfilterError>;
    /// The backend name reported to users.
    fn backend_name(&self) -> &'static str;
    /// The netlink port id under which the last successful restore changed the kernel (for
    /// iptables-nft, the process id of the restore tool), to recognise its own notifications.
    fn last_writer(&self) -> Option<u32> {
        None
    }
    /// A cheap look at the nat table of `family` that changes whenever a rule is added or
    /// removed anywhere in it ([`crate::xtinfo`]); `None` when the backend has none (nft sends
    /// notifications instead) or the look failed. Polling reads the chains only when it changed
    /// or a full read is due anyway.
    fn table_shape(&self, family: Family) -> Option<TableShape> {
        let _ = family;
        None
    }
    /// Starts forwarding change notifications of the nat chains of interest to `forward`, or
    /// says why this backend has none (legacy x_tables sends none; polling stays).
    fn watch_changes(&self, forward: ChangeForwarder) -> Result<(), String> {
        drop(forward);
        Err(format!(
            "the {} backend sends no change notifications",
            self.backend_name()
        ))
    }
}

/// Receives [`KernelEvent`]s; returns false once nobody listens any more.
pub type ChangeForwarder = Box<dyn FnMut(KernelEvent) -> bool + Send>;

/// The real kernel, through the iptables tools of one backend.
pub struct IptablesCli {
    backend: Backend,
    last_writer: std::sync::atomic::AtomicU32,
}

impl IptablesCli {
    /// Uses the tools of `backend`; fails with a clear message when they are not installed.
    pub fn new(backend: Backend) -> Result<IptablesCli, NetfilterError> {
        for family in Family::ALL {
            for command in [
                backend.list_command(family),
                backend.restore_command(family),
            ] {
                probe(command)?;
            }
        }
        Ok(IptablesCli {
            backend,
            last_writer: std::sync::atomic::AtomicU32::new(0),
        })
    }
}

fn probe(command: &str) -> Result<(), NetfilterError> {
    Command::new(command)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|_| ())
        .map_err(|error| NetfilterError::Spawn {
            command: command.to_string(),
            error,
        })
}

impl Netfilter for IptablesCli {
    fn read_chain(
        &self,
        family: Family,
        chain: &str,
    ) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        self.read_chain_like(family, chain, &[])
    }

    fn read_chain_like(
        &self,
        family: Family,
        chain: &str,
        like: &[Rule],
    ) -> Result<Option<Vec<ObservedRule>>, NetfilterError> {
        let command = self.backend.list_command(family);
        let failed = |stderr: String| NetfilterError::List {
            command: command.to_string(),
            chain: chain.to_string(),
            stderr,
        };
        // `--wait 10`, as restores do, so a stuck xtables lock cannot hang the engine.
        let mut child = Command::new(command)
            .args(["-t", "nat", "-S", chain, "-v", "--wait", "10"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|error| NetfilterError::Spawn {
                command: command.to_string(),
                error,
            })?;
        let rules = match child.stdout.take() {
            Some(stdout) => read_listing(BufReader::new(stdout), like),
            None => Ok(Vec::new()),
        };
        let output = child
            .wait_with_output()
            .map_err(|e| failed(e.to_string()))?;
        if output.status.success() {
            return rules.map(Some).map_err(|e| failed(e.to_string()));
        }
        // Exit status 1 is iptables' "no such chain" (the message differs by backend); anything
        // else, such as a parameter problem, is a real failure.
        if output.status.code() == Some(1) {
            return Ok(None);
        }
        Err(failed(
            String::from_utf8_lossy(&output.stderr).trim().to_string(),
        ))
    }

    fn restore(&self, family: Family, input: &dyn fmt::Display) -> Result<(), NetfilterError> {
        let command = self.backend.restore_command(family);
        let spawn_error = |error| NetfilterError::Spawn {
            command: command.to_string(),
            error,
        };
        let (pid, output, written) =
            run_restore(command, &["--noflush", "--wait", "10"], input).map_err(spawn_error)?;
        if output.status.success() {
            written.map_err(spawn_error)?;
            self.last_writer.store(pid, Ordering::SeqCst);
            return Ok(());
        }
        let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
        if stderr.is_empty() {
            stderr = format!("exited with {} and printed nothing", output.status);
        }
        Err(NetfilterError::Restore {
            command: command.to_string(),
            // Rendered again only now, to show the failing line.
            context: failing_line_context(&stderr, &input.to_string()),
            stderr,
        })
    }

    fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    fn last_writer(&self) -> Option<u32> {
        Some(self.last_writer.load(Ordering::SeqCst)).filter(|pid| *pid != 0)
    }

    fn table_shape(&self, family: Family) -> Option<TableShape> {
        if self.backend != Backend::Legacy {
            return None;
        }
        xtinfo::nat_table_shape(family)
            .inspect_err(|e| tracing::debug!(%family, error = %e, "no x_tables table shape"))
            .ok()
    }

    fn watch_changes(&self, forward: ChangeForwarder) -> Result<(), String> {
        if self.backend != Backend::Nft {
            drop(forward);
            return Err("the legacy backend (x_tables) sends no change notifications".into());
        }
        let subscription = nftwatch::subscribe()
            .map_err(|e| format!("cannot subscribe to nftables change notifications: {e}"))?;
        subscription.spawn(forward);
        Ok(())
    }
}

/// Parses a `-S -v` listing as the tool prints it, one line at a time (see
/// [`parse_listing_line_like`]); the listing itself is never held whole, and a rule equal to the
/// rule of `like` at its position shares that rule's text.
fn read_listing(mut listing: impl BufRead, like: &[Rule]) -> std::io::Result<Vec<ObservedRule>> {
    let mut rules = Vec::new();
    let mut line = Vec::new();
    while listing.read_until(b'\n', &mut line)? > 0 {
        let text = String::from_utf8_lossy(&line);
        let rule = parse_listing_line_like(text.trim_end_matches('\n'), like.get(rules.len()));
        rules.extend(rule);
        line.clear();
    }
    rules.shrink_to_fit();
    Ok(rules)
}

/// Runs `command args`, writes `input` to its stdin as it is rendered, and waits for it: its
/// pid, its output (stderr captured), and whether all of the input was written. A tool that
/// exits before reading all of its input closes the pipe: what it printed and its exit status say
/// why, not the write error; and it must be waited for either way.
fn run_restore(
    command: &str,
    args: &[&str],
    input: &dyn fmt::Display,
) -> std::io::Result<(u32, std::process::Output, std::io::Result<()>)> {
    let mut child = Command::new(command)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let written = match child.stdin.take() {
        Some(stdin) => {
            let mut stdin = BufWriter::new(stdin);
            write!(stdin, "{input}").and_then(|()| stdin.flush())
        }
        None => Ok(()),
    };
    let pid = child.id();
    Ok((pid, child.wait_with_output()?, written))
}

/// Whether `iptables-restore` of `backend` accepts `--random-fully` for every family in
/// `families`: one `--test` run per family (parsed and checked, never committed) of a throwaway
/// chain with `-j MASQUERADE --random-fully`. `Err` says which tool refused it and how.
pub fn detect_random_fully(backend: Backend, families: &[Family]) -> Result<(), String> {
    const PROBE: &str = "*nat\n:KILO-EGRESS-PROBE - [0:0]\n-A KILO-EGRESS-PROBE -j MASQUERADE --random-fully\nCOMMIT\n";
    for family in families {
        let command = backend.restore_command(*family);
        let (_, output, _) = run_restore(command, &["--test", "--noflush", "--wait", "10"], &PROBE)
            .map_err(|e| format!("{command}: {e}"))?;
        if !output.status.success() {
            let stderr = String::from_utf8_lossy(&output.stderr);
            return Err(format!(
                "{command} --test refused it: {}",
                stderr.lines().next().unwrap_or("no message").trim()
            ));
        }
    }
    Ok(())
}

/// Finds "line N" in a restore error and shows that input line with two lines around it.
pub fn failing_line_context(stderr: &str, input: &str) -> String {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    let line_no = words
        .windows(2)
        .find(|w| w[0].eq_ignore_ascii_case("line"))
        .and_then(|w| {
            w[1].trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse::<usize>()
                .ok()
        });
    let Some(line_no) = line_no else {
        return String::new();
    };
    let lines: Vec<&str> = input.lines().collect();
    let first = line_no.saturating_sub(3);
    let last = (line_no + 2).min(lines.len());
    let mut context = String::from("\n  input around the failing line:");
    for (i, line) in lines.iter().enumerate().take(last).skip(first) {
        let marker = if i + 1 == line_no { ">" } else { " " };
        context.push_str(&format!("\n  {marker} {:>3} | {line}", i + 1));
    }
    context
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_timeout_is_recognised() {
        let held = NetfilterError::Restore {
            command: "iptables-legacy-restore".into(),
            stderr: "Another app is currently holding the xtables lock. Stopped waiting after 10s."
                .into(),
            context: String::new(),
        };
        assert!(held.is_lock_timeout());
        let refused = NetfilterError::Restore {
            command: "iptables-legacy-restore".into(),
            stderr: "iptables-restore: line 2 failed".into(),
            context: String::new(),
        };
        assert!(!refused.is_lock_timeout());
    }

    #[test]
    fn a_streamed_listing_parses_as_the_whole_text_does() {
        let listing = "-P POSTROUTING ACCEPT -c 0 0\n-A KILO-NAT -d 10.0.0.1/32 -c 7 420 -j RETURN\n-A KILO-NAT -j MASQUERADE";
        // A small buffer, so lines arrive in pieces.
        let like = crate::rules::parse_listing(listing);
        let streamed = read_listing(
            BufReader::with_capacity(8, std::io::Cursor::new(listing)),
            &[like[0].rule.clone()],
        )
        .unwrap();
        assert_eq!(streamed, like);
        assert!(
            std::sync::Arc::ptr_eq(&streamed[0].rule.args, &like[0].rule.args),
            "a rule equal to the one given shares its text"
        );
        assert!(!std::sync::Arc::ptr_eq(
            &streamed[1].rule.args,
            &like[1].rule.args
        ));
    }

    #[test]
    fn a_restore_input_reaches_the_tool_as_rendered() {
        struct Lines(usize);
        impl fmt::Display for Lines {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                (0..self.0).try_for_each(|i| writeln!(f, "-A KILO-NAT -d 10.0.{i}.0/24 -j RETURN"))
            }
        }
        // Larger than a pipe's buffer: the tool must read while it is written.
        let input = Lines(20_000);
        let (_, output, written) = run_restore("sh", &["-c", "md5sum >&2"], &input).unwrap();
        written.unwrap();
        assert!(output.status.success());
        let expected = Command::new("sh")
            .args(["-c", "md5sum"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(input.to_string().as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert_eq!(output.stderr, expected.stdout);
    }

    #[test]
    fn failing_line_context_marks_the_line() {
        let input = "*nat\n-A X -j Y\n-A X -j Z\nCOMMIT\n";
        let context = failing_line_context("iptables-restore: line 3 failed", input);
        assert!(context.contains(">   3 | -A X -j Z"), "{context}");
        assert_eq!(failing_line_context("no line here", input), "");
    }
}
