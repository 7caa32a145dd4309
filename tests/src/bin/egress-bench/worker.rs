//! The timing loops that run inside the lab's node namespace (`egress-bench worker`, started
//! with `ip netns exec`), so a measured command costs what it costs on the node, without the
//! `ip netns exec` start-up of each command. The job comes as JSON on stdin; the samples go as
//! JSON to stdout.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// One timing job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Job {
    /// `iterations` runs of `RESTORE --noflush --wait 10`, fed `inputs[i % inputs.len()]`.
    Restore {
        /// e.g. `iptables-nft-restore`.
        binary: String,
        /// Complete `*nat ... COMMIT` inputs, used in turn.
        inputs: Vec<String>,
        /// How many runs.
        iterations: usize,
    },
    /// Rewrites `chain` with one process per rule: `IPT -w -t nat -F CHAIN`, then one
    /// `IPT -w -t nat -A CHAIN ARGS..` per rule of `rule_sets[i % rule_sets.len()]`.
    PerRule {
        /// e.g. `iptables-nft`.
        binary: String,
        /// The chain rewritten.
        chain: String,
        /// Per rule, the arguments after `-A CHAIN`; the sets are used in turn.
        rule_sets: Vec<Vec<Vec<String>>>,
        /// At most this many rewrites.
        iterations: usize,
        /// No new rewrite starts once this much time was spent (one always runs).
        budget_ms: u64,
        /// A single rewrite that has run this long is stopped, and its time extrapolated
        /// linearly from the processes run so far.
        rewrite_cap_ms: u64,
    },
    /// Tampers with `chain` (`IPT -w TAMPER..`) and polls `IPT -w -t nat -S CHAIN` until it
    /// equals what it was before the tamper, `iterations` times.
    Drift {
        /// e.g. `iptables-legacy`.
        binary: String,
        /// The chain watched.
        chain: String,
        /// The tampering command's arguments, e.g. `-t nat -F KILO-NAT`.
        tamper: Vec<String>,
        /// How many tampers.
        iterations: usize,
        /// Pause between a repair and the next tamper: uniformly random in this range (ms), so
        /// tampers fall at random phases of a polling daemon's interval.
        pause_ms: (u64, u64),
        /// Give up on one repair after this long.
        timeout_ms: u64,
    },
    /// Takes `address` off `device` and puts it back, `iterations` times, polling
    /// `IPT -w -t nat -S CHAIN` after each until the chain's decision (its first SNAT or
    /// MASQUERADE rule) is MASQUERADE, then SNAT again. Samples alternate: removed, added.
    Address {
        /// e.g. `iptables-legacy`.
        binary: String,
        /// The chain watched.
        chain: String,
        /// The address with its prefix, e.g. `198.51.100.20/32`.
        address: String,
        /// The interface that holds it, e.g. `up0`.
        device: String,
        /// How many removals (each followed by an addition).
        iterations: usize,
        /// Pause before each change (ms, uniformly random in this range).
        pause_ms: (u64, u64),
        /// Give up on one transition after this long.
        timeout_ms: u64,
    },
    /// Sets the Node annotation to each of `values` in turn through the API emulator
    /// (`python3 SCRIPT --server SERVER annotate NODE ANNOTATION=VALUE`, started without waiting)
    /// and polls `IPT -w -t nat -S CHAIN` until the chain's decision is SNAT to that value; records
    /// when it was seen (Unix time), for the emulator's timeline to be compared with.
    Annotate {
        /// e.g. `iptables-nft`.
        binary: String,
        /// The chain watched.
        chain: String,
        /// tests/kmock/apiserver.py.
        script: String,
        /// The emulator's URL.
        server: String,
        /// The Node's name.
        node: String,
        /// The annotation key.
        annotation: String,
        /// The addresses set in turn.
        values: Vec<String>,
        /// Pause before each change (ms, uniformly random in this range).
        pause_ms: (u64, u64),
        /// Give up on one change after this long.
        timeout_ms: u64,
    },
}

/// The target of a chain listing's decision rule: the first SNAT or MASQUERADE rule.
fn decision_of(listing: &str) -> Option<&'static str> {
    listing.lines().find_map(|line| {
        if line.contains(" -j SNAT ") {
            Some("SNAT")
        } else if line.contains(" -j MASQUERADE") {
            Some("MASQUERADE")
        } else {
            None
        }
    })
}

/// The samples of one job.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Samples {
    /// One duration per run, in nanoseconds (Restore, PerRule: the run; Drift: tamper → seen
    /// repaired).
    pub samples_ns: Vec<u64>,
    /// PerRule: how many of the rewrites were stopped at the cap and extrapolated.
    pub extrapolated: usize,
    /// PerRule: the share of the processes actually run in an extrapolated rewrite.
    pub measured_share: f64,
    /// Drift: the duration of every poll (one `iptables -S`), in nanoseconds: the resolution.
    pub poll_ns: Vec<u64>,
    /// Drift: tampers that were not repaired within the timeout.
    pub timeouts: usize,
    /// Address: address added → SNAT again, in nanoseconds (`samples_ns` has removed →
    /// MASQUERADE).
    #[serde(default)]
    pub back_ns: Vec<u64>,
    /// Annotate: when each value's SNAT was seen in the chain, in nanoseconds of Unix time (0 when
    /// it was not seen within the timeout).
    #[serde(default)]
    pub seen_unix_ns: Vec<u64>,
}

fn run(binary: &str, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
    let mut child = Command::new(binary)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {binary}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .with_context(|| format!("write the input of {binary}"))?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "`{binary} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().try_into().unwrap_or(u64::MAX)
}

/// A pseudo-random number in `lo..=hi` from the clock's nanoseconds (good enough to spread
/// tampers over a polling interval).
fn jitter(lo: u64, hi: u64) -> u64 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or_default();
    lo + seed.wrapping_mul(6364136223846793005) % (hi - lo + 1)
}

/// Runs `job` and returns its samples.
pub fn run_job(job: &Job) -> anyhow::Result<Samples> {
    let mut samples = Samples::default();
    match job {
        Job::Restore {
            binary,
            inputs,
            iterations,
        } => {
            for i in 0..*iterations {
                let started = Instant::now();
                run(
                    binary,
                    &["--noflush", "--wait", "10"],
                    Some(&inputs[i % inputs.len()]),
                )?;
                samples.samples_ns.push(nanos(started.elapsed()));
            }
        }
        Job::PerRule {
            binary,
            chain,
            rule_sets,
            iterations,
            budget_ms,
            rewrite_cap_ms,
        } => {
            let all = Instant::now();
            let cap = Duration::from_millis(*rewrite_cap_ms);
            for i in 0..*iterations {
                if i > 0 && all.elapsed() >= Duration::from_millis(*budget_ms) {
                    break;
                }
                let rules = &rule_sets[i % rule_sets.len()];
                let total = rules.len() + 1;
                let started = Instant::now();
                run(binary, &["-w", "-t", "nat", "-F", chain], None)?;
                let mut done = 1;
                for rule in rules {
                    if started.elapsed() >= cap {
                        break;
                    }
                    let mut args = vec!["-w", "-t", "nat", "-A", chain.as_str()];
                    args.extend(rule.iter().map(String::as_str));
                    run(binary, &args, None)?;
                    done += 1;
                }
                let elapsed = started.elapsed();
                if done < total {
                    samples.extrapolated += 1;
                    samples.measured_share = done as f64 / total as f64;
                    let scaled = elapsed.as_secs_f64() * total as f64 / done as f64;
                    samples.samples_ns.push((scaled * 1e9) as u64);
                } else {
                    samples.samples_ns.push(nanos(elapsed));
                }
            }
        }
        Job::Drift {
            binary,
            chain,
            tamper,
            iterations,
            pause_ms,
            timeout_ms,
        } => {
            let list = ["-w", "-t", "nat", "-S", chain.as_str()];
            let expected = run(binary, &list, None)?;
            let tamper: Vec<&str> = std::iter::once("-w")
                .chain(tamper.iter().map(String::as_str))
                .collect();
            for _ in 0..*iterations {
                std::thread::sleep(Duration::from_millis(jitter(pause_ms.0, pause_ms.1)));
                let now = run(binary, &list, None)?;
                if now != expected {
                    bail!("{chain} is not in its settled state before a tamper:\n{now}");
                }
                run(binary, &tamper, None)?;
                let tampered = Instant::now();
                loop {
                    let poll = Instant::now();
                    let seen = run(binary, &list, None).unwrap_or_default();
                    samples.poll_ns.push(nanos(poll.elapsed()));
                    if seen == expected {
                        samples.samples_ns.push(nanos(tampered.elapsed()));
                        break;
                    }
                    if tampered.elapsed() >= Duration::from_millis(*timeout_ms) {
                        samples.timeouts += 1;
                        break;
                    }
                }
            }
        }
        Job::Address {
            binary,
            chain,
            address,
            device,
            iterations,
            pause_ms,
            timeout_ms,
        } => {
            let list = ["-w", "-t", "nat", "-S", chain.as_str()];
            for _ in 0..*iterations {
                for (verb, wanted) in [("del", "MASQUERADE"), ("add", "SNAT")] {
                    std::thread::sleep(Duration::from_millis(jitter(pause_ms.0, pause_ms.1)));
                    run("ip", &["addr", verb, address, "dev", device], None)?;
                    let changed = Instant::now();
                    loop {
                        let poll = Instant::now();
                        let seen = run(binary, &list, None).unwrap_or_default();
                        samples.poll_ns.push(nanos(poll.elapsed()));
                        if decision_of(&seen) == Some(wanted) {
                            let took = nanos(changed.elapsed());
                            match verb {
                                "del" => samples.samples_ns.push(took),
                                _ => samples.back_ns.push(took),
                            }
                            break;
                        }
                        if changed.elapsed() >= Duration::from_millis(*timeout_ms) {
                            samples.timeouts += 1;
                            break;
                        }
                    }
                }
            }
        }
        Job::Annotate {
            binary,
            chain,
            script,
            server,
            node,
            annotation,
            values,
            pause_ms,
            timeout_ms,
        } => {
            let list = ["-w", "-t", "nat", "-S", chain.as_str()];
            for value in values {
                std::thread::sleep(Duration::from_millis(jitter(pause_ms.0, pause_ms.1)));
                let mut annotate = Command::new("python3")
                    .args([script, "--server", server, "annotate", node])
                    .arg(format!("{annotation}={value}"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .spawn()
                    .context("start apiserver.py annotate")?;
                let started = Instant::now();
                let seen = loop {
                    let poll = Instant::now();
                    let listing = run(binary, &list, None).unwrap_or_default();
                    samples.poll_ns.push(nanos(poll.elapsed()));
                    let decision = listing
                        .lines()
                        .find(|l| l.contains(" -j SNAT ") || l.contains(" -j MASQUERADE"));
                    let to_source = decision.and_then(|l| {
                        let mut words = l.split_whitespace();
                        words.find(|w| *w == "--to-source")?;
                        words.next()
                    });
                    if to_source == Some(value.as_str()) {
                        break nanos(std::time::UNIX_EPOCH.elapsed()?);
                    }
                    if started.elapsed() >= Duration::from_millis(*timeout_ms) {
                        samples.timeouts += 1;
                        break 0;
                    }
                };
                samples.seen_unix_ns.push(seen);
                let status = annotate.wait()?;
                if !status.success() {
                    bail!("apiserver.py annotate {node} {annotation}={value}: {status}");
                }
            }
        }
    }
    Ok(samples)
}

/// Splits a rule in `iptables -S` form into arguments: double quotes group, `\` escapes.
pub fn split_rule(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut current = String::new();
    let (mut in_arg, mut quoted) = (false, false);
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.extend(chars.next());
                in_arg = true;
            }
            '"' => {
                quoted = !quoted;
                in_arg = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_arg {
                    args.push(std::mem::take(&mut current));
                    in_arg = false;
                }
            }
            c => {
                current.push(c);
                in_arg = true;
            }
        }
    }
    if in_arg {
        args.push(current);
    }
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_quoted_comments() {
        assert_eq!(
            split_rule(r#"-d 172.16.0.1/32 -m comment --comment "kilo-egress: a \"b\"" -j RETURN"#),
            [
                "-d",
                "172.16.0.1/32",
                "-m",
                "comment",
                "--comment",
                "kilo-egress: a \"b\"",
                "-j",
                "RETURN"
            ]
        );
    }

    #[test]
    fn jitter_stays_in_range() {
        for _ in 0..100 {
            assert!((5..=9).contains(&jitter(5, 9)));
        }
    }
}
