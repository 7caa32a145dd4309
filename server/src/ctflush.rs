//! `--conntrack-flush`: after a family's egress decision changed, deletes the conntrack entries
//! of the flows the old decision NATed, on a thread of its own so the engine thread never waits
//! for a large conntrack table. One listing per family with the distribution's `conntrack` tool
//! (`conntrack -L -f FAMILY --src-nat -o extended,id`: one dump, filtered by the kernel's
//! SRC_NAT status), the choice in [`crate::conntrack`], then one ctnetlink delete per entry by
//! its exact tuple and id over a netlink socket. Not `conntrack -D` per entry: each of those
//! dumps the whole table again (5,000 deletions took 6 minutes on a 20,000-entry table here).

use kilo_egress_api::egress::Family;
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_NETFILTER};
use std::collections::BTreeMap;
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tracing::{debug, info, warn};

use crate::conntrack::{self, Decision, Selection};
use crate::metrics::Metrics;

/// The tool that lists the conntrack table.
const TOOL: &str = "conntrack";

/// Why `--conntrack-flush` cannot work here.
#[derive(Debug, thiserror::Error)]
pub enum FlushError {
    /// The tool could not be started.
    #[error(
        "--conntrack-flush needs the conntrack tool: cannot run `{TOOL}` ({0}); install the \
         package `conntrack` (Debian, Ubuntu) or `conntrack-tools` (RHEL, Fedora), or turn the \
         option off"
    )]
    Missing(std::io::Error),
    /// The tool ran and failed (no permission, no nf_conntrack_netlink).
    #[error("--conntrack-flush: `{command}` failed: {stderr}")]
    Failed {
        /// What ran.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// The ctnetlink socket could not be opened.
    #[error("--conntrack-flush: cannot open a netfilter netlink socket: {0}")]
    Socket(std::io::Error),
}

fn family_arg(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "IPv4",
        Family::Ipv6 => "IPv6",
    }
}

/// The source-NATed entries of `family`, as the tool lists them.
fn list(family: Family) -> Result<String, FlushError> {
    let args = [
        "-L",
        "-f",
        family_arg(family),
        "--src-nat",
        "-o",
        "extended,id",
    ];
    let out = Command::new(TOOL)
        .args(args)
        .output()
        .map_err(FlushError::Missing)?;
    if !out.status.success() {
        return Err(FlushError::Failed {
            command: format!("{TOOL} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn socket() -> Result<Socket, FlushError> {
    let mut socket = Socket::new(NETLINK_NETFILTER).map_err(FlushError::Socket)?;
    socket
        .bind(&SocketAddr::new(0, 0))
        .map_err(FlushError::Socket)?;
    Ok(socket)
}

/// At start, with the option on: the tool lists the table of every family and the netlink
/// socket opens; otherwise a clear error (nothing is programmed then).
pub fn check(families: &[Family]) -> Result<(), FlushError> {
    for family in families {
        list(*family)?;
    }
    socket().map(drop)
}

/// What the last deletion of a family did.
#[derive(Debug, Clone)]
enum Outcome {
    Running,
    Done {
        old: Vec<Decision>,
        new: Decision,
        deleted: usize,
    },
    Failed(String),
}

/// One decision change of one family.
#[derive(Debug)]
struct Job {
    family: Family,
    selection: Selection,
    started: Instant,
}

/// The handle the engine keeps: queues deletions and describes the last ones.
pub struct ConntrackFlush {
    jobs: mpsc::Sender<Job>,
    outcomes: Arc<Mutex<BTreeMap<Family, Outcome>>>,
    metrics: Arc<Metrics>,
}

impl ConntrackFlush {
    /// Starts the deleting thread, which counts what it deletes (or fails to) into `metrics`.
    pub fn start(metrics: Arc<Metrics>) -> ConntrackFlush {
        let (jobs, inbox) = mpsc::channel();
        let outcomes = Arc::new(Mutex::new(BTreeMap::new()));
        let shared = outcomes.clone();
        let counted = metrics.clone();
        std::thread::Builder::new()
            .name("egress-conntrack".into())
            .spawn(move || run(inbox, shared, &counted))
            .expect("spawn conntrack thread");
        ConntrackFlush {
            jobs,
            outcomes,
            metrics,
        }
    }

    /// `family` now programs `new` instead of `old`: delete the flows `old` NATed from
    /// `sources`. Returns at once.
    pub fn decision_changed(
        &self,
        family: Family,
        old: Decision,
        new: Decision,
        sources: Vec<ipnet::IpNet>,
    ) {
        self.set(family, Outcome::Running);
        let job = Job {
            family,
            selection: Selection {
                sources,
                old: vec![old],
                new,
            },
            started: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            // The deleting thread is gone (it panicked): say so instead of waiting forever.
            self.failed(
                family,
                "the conntrack thread stopped; restart kilo-egressd".into(),
            );
        }
    }

    /// The family could not be prepared (its NATed sources unreadable): say so in GetRules.
    pub fn failed(&self, family: Family, why: String) {
        warn!(%family, error = %why, "conntrack entries of the old egress decision not deleted");
        self.metrics.conntrack_flush_failed(family);
        self.set(family, Outcome::Failed(why));
    }

    fn set(&self, family: Family, outcome: Outcome) {
        self.outcomes
            .lock()
            .expect("conntrack outcomes")
            .insert(family, outcome);
    }

    /// GetRules' `conntrack_flush`, e.g. "on: 3 IPv4 entries deleted after the last switch
    /// (SNAT to 198.51.100.20 → MASQUERADE)".
    pub fn describe(&self) -> String {
        let outcomes = self.outcomes.lock().expect("conntrack outcomes");
        if outcomes.is_empty() {
            return "on: no switch yet".to_string();
        }
        let parts: Vec<String> = outcomes
            .iter()
            .map(|(family, outcome)| {
                let name = family_name(*family);
                match outcome {
                    Outcome::Running => format!("deleting the {name} entries of the last switch"),
                    Outcome::Done { old, new, deleted } => {
                        let old: Vec<String> = old.iter().map(Decision::to_string).collect();
                        format!(
                            "{deleted} {name} entries deleted after the last switch ({} → {new})",
                            old.join(", ")
                        )
                    }
                    Outcome::Failed(why) => {
                        format!("deleting the {name} entries of the last switch failed: {why}")
                    }
                }
            })
            .collect();
        format!("on: {}", parts.join("; "))
    }
}

/// The deleting thread: drains the queue, merges the changes of a family that came together
/// (every old decision goes, the latest new one stays), deletes, records.
fn run(
    inbox: mpsc::Receiver<Job>,
    outcomes: Arc<Mutex<BTreeMap<Family, Outcome>>>,
    metrics: &Metrics,
) {
    while let Ok(first) = inbox.recv() {
        let mut merged: BTreeMap<Family, Job> = BTreeMap::new();
        for job in std::iter::once(first).chain(inbox.try_iter()) {
            match merged.get_mut(&job.family) {
                Some(earlier) => {
                    earlier.selection.old.extend(job.selection.old);
                    earlier.selection.new = job.selection.new;
                    earlier.selection.sources = job.selection.sources;
                }
                None => {
                    merged.insert(job.family, job);
                }
            }
        }
        for (family, job) in merged {
            let outcome = match flush(&job) {
                Ok(deleted) => {
                    let old: Vec<String> =
                        job.selection.old.iter().map(Decision::to_string).collect();
                    info!(
                        %family,
                        old = %old.join(", "),
                        new = %job.selection.new,
                        deleted,
                        duration_ms = job.started.elapsed().as_secs_f64() * 1000.0,
                        "deleted conntrack entries of the old egress decision"
                    );
                    metrics.conntrack_deleted(family, deleted);
                    Outcome::Done {
                        old: job.selection.old,
                        new: job.selection.new,
                        deleted,
                    }
                }
                Err(why) => {
                    warn!(%family, error = %why, "deleting conntrack entries of the old egress decision failed");
                    metrics.conntrack_flush_failed(family);
                    Outcome::Failed(why)
                }
            };
            outcomes
                .lock()
                .expect("conntrack outcomes")
                .insert(family, outcome);
        }
    }
}

/// Lists, chooses and deletes; returns how many entries were deleted (an entry that ended
/// meanwhile is not counted).
fn flush(job: &Job) -> Result<usize, String> {
    let listing = list(job.family).map_err(|e| e.to_string())?;
    let entries = conntrack::parse_listing(&listing);
    let chosen = job.selection.select(&entries);
    if chosen.is_empty() {
        return Ok(0);
    }
    let socket = socket().map_err(|e| e.to_string())?;
    let mut deleted = 0;
    let mut refused = None;
    let mut datagram = vec![0u8; 8192];
    for (seq, entry) in (1u32..).zip(chosen) {
        let Some(message) = conntrack::delete_message(entry, seq) else {
            continue;
        };
        socket
            .send(&message, 0)
            .map_err(|e| format!("sending a ctnetlink delete: {e}"))?;
        loop {
            let n = socket
                .recv(&mut &mut datagram[..], 0)
                .map_err(|e| format!("reading a ctnetlink answer: {e}"))?;
            match conntrack::parse_ack(&datagram[..n]) {
                Some((answer, _)) if answer != seq => continue,
                Some((_, 0)) => deleted += 1,
                // ENOENT: the flow ended, or its tuple now belongs to a newer entry.
                Some((_, 2)) => debug!(%entry, "conntrack entry gone before its deletion"),
                Some((_, errno)) => {
                    refused = Some(format!(
                        "{entry}: {}",
                        std::io::Error::from_raw_os_error(errno)
                    ))
                }
                None => continue,
            }
            break;
        }
    }
    match refused {
        Some(why) if deleted == 0 => Err(format!("the kernel refused the deletion of {why}")),
        Some(why) => {
            warn!(family = %job.family, error = %why, "the kernel refused some conntrack deletions");
            Ok(deleted)
        }
        None => Ok(deleted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_thread_shows_as_a_failure_instead_of_waiting_forever() {
        let (jobs, inbox) = mpsc::channel();
        drop(inbox);
        let metrics = Arc::new(Metrics::new());
        let flush = ConntrackFlush {
            jobs,
            outcomes: Arc::default(),
            metrics: metrics.clone(),
        };
        let old = Decision::from(Some("198.51.100.20".parse().unwrap()));
        flush.decision_changed(Family::Ipv4, old, Decision::from(None), vec![]);
        let described = flush.describe();
        assert!(
            described.contains("failed: the conntrack thread stopped"),
            "{described}"
        );
        let text = kilo_egress_api::metrics_http::render(metrics.registry());
        assert!(
            text.contains(r#"kilo_egress_conntrack_flush_failures_total{ip_family="IPv4"} 1"#),
            "{text}"
        );
    }
}
