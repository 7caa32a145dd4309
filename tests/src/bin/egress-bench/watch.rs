//! Phase 7: the node watcher end to end. The Node annotation is set through the Kubernetes API
//! emulator (tests/kmock/apiserver.py, in the node namespace) to alternate addresses, and a worker
//! polls `iptables -S KILO-NAT` until the SNAT to the new address is in the kernel. The emulator's
//! timeline says when it received each write and when it sent the watch event to
//! `kilo-egress watch`; the latency is measured from each (nft and legacy, idle node).

use crate::bench::{ADDR_A, ADDR_B, Bench, CHAIN, in_node, nanos_summary, own_config};
use crate::plan::{Detection, Node};
use crate::stats::Summary;
use crate::worker::Job;
use anyhow::{Context, bail};
use kilo_egress_tests::kube::{ANNOTATION, ApiServer, NODE, Watcher, apiserver_script};
use kilo_egress_tests::{Backend, Family};
use serde::{Deserialize, Serialize};

/// One backend of phase 7 (the `watch` entries of results.json).
#[derive(Debug, Serialize)]
pub struct WatchLatency {
    /// `nft` or `legacy`.
    pub backend: String,
    /// Watch event sent to the watcher → SNAT in the kernel.
    pub after_event: Summary,
    /// Annotation written to the API emulator → SNAT in the kernel.
    pub after_write: Summary,
    /// One `iptables -S` poll: the resolution.
    pub poll: Summary,
    /// Changes not seen in the kernel within 10 s.
    pub timeouts: usize,
}

/// One entry of the emulator's timeline.
#[derive(Debug, Deserialize)]
struct Moment {
    /// Unix time, seconds.
    time: f64,
    /// `write` (a Node update received) or `event` (a Node watch event sent).
    what: String,
    /// The egress annotation the write set, or the event's Node carried.
    egress: Option<String>,
}

/// For each change `i` (to `values[i]`, seen in the kernel at `seen[i]` Unix seconds): the
/// latency from the watch event carrying it and from the write that set it, in ms. A change
/// without an event or a write before it is an error.
fn latencies(
    timeline: &[Moment],
    values: &[String],
    seen: &[f64],
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let (mut after_event, mut after_write) = (Vec::new(), Vec::new());
    let mut from = 0;
    for (value, seen) in values.iter().zip(seen) {
        let carries = |m: &&Moment| m.egress.as_deref() == Some(value) && m.time <= *seen;
        let rest = &timeline[from..];
        let write = rest
            .iter()
            .position(|m| m.what == "write" && carries(&m))
            .with_context(|| format!("no write of {value} before it was seen"))?;
        let event = rest[write..]
            .iter()
            .position(|m| m.what == "event" && carries(&m))
            .with_context(|| format!("no watch event of {value} before it was seen"))?;
        after_write.push((seen - rest[write].time) * 1000.0);
        after_event.push((seen - rest[write + event].time) * 1000.0);
        from += write + event + 1;
    }
    Ok((after_event, after_write))
}

impl Bench<'_> {
    /// Phase 7 for one backend: `plan.watch_changes` annotation changes.
    pub fn watch(&self, backend: Backend) -> anyhow::Result<WatchLatency> {
        let lab = self.lab(backend, Node::Idle)?;
        let detection = match backend {
            Backend::Nft => Detection::Notifications,
            Backend::Legacy => Detection::Polling,
        };
        let daemon = lab.start_daemon(own_config(backend, self.plan.drift_rules, detection))?;
        let api = ApiServer::start(&lab)?;
        api.create_node(&[])?;
        let watcher = Watcher::start(&api, &daemon, &[])?;
        let values: Vec<String> = (0..self.plan.watch_changes)
            .map(|i| if i % 2 == 0 { ADDR_A } else { ADDR_B }.to_string())
            .collect();
        let ipt = lab.iptables(backend, Family::V4);
        let script = apiserver_script();
        let samples = in_node(
            &lab,
            &Job::Annotate {
                binary: ipt.binary(),
                chain: CHAIN.into(),
                script: script.display().to_string(),
                server: api.url(),
                node: NODE.into(),
                annotation: ANNOTATION.into(),
                values: values.clone(),
                pause_ms: self.plan.drift_pause_ms,
                timeout_ms: 10_000,
            },
        )
        .with_context(|| format!("watch phase{}{}", watcher.context(), daemon.context()))?;
        let timeline: Vec<Moment> =
            serde_json::from_str(&api.ctl(&["timeline"])?).context("the emulator's timeline")?;
        let seen: Vec<(String, f64)> = values
            .into_iter()
            .zip(samples.seen_unix_ns.iter().map(|ns| *ns as f64 / 1e9))
            .filter(|(_, seen)| *seen > 0.0)
            .collect();
        let (values, seen): (Vec<String>, Vec<f64>) = seen.into_iter().unzip();
        let (after_event, after_write) = latencies(&timeline, &values, &seen)?;
        if after_event.is_empty() {
            bail!(
                "no annotation change reached the kernel{}",
                watcher.context()
            );
        }
        Ok(WatchLatency {
            backend: backend.name().into(),
            after_event: Summary::of_ms(&after_event).unwrap_or_default(),
            after_write: Summary::of_ms(&after_write).unwrap_or_default(),
            poll: nanos_summary(&samples.poll_ns),
            timeouts: samples.timeouts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn moment(time: f64, what: &str, egress: &str) -> Moment {
        Moment {
            time,
            what: what.into(),
            egress: Some(egress.into()),
        }
    }

    #[test]
    fn each_change_is_timed_from_its_own_write_and_event() {
        let timeline = [
            moment(1.0, "event", "a"), // the initial list: not a change
            moment(10.0, "write", "a"),
            moment(10.002, "event", "a"),
            moment(20.0, "write", "b"),
            moment(20.001, "event", "b"),
            moment(30.0, "write", "a"),
            moment(30.004, "event", "a"),
        ];
        let values = ["a", "b", "a"].map(String::from);
        let (event, write) = latencies(&timeline, &values, &[10.012, 20.011, 30.024]).unwrap();
        let round = |v: Vec<f64>| v.iter().map(|x| x.round()).collect::<Vec<_>>();
        assert_eq!(round(event), [10.0, 10.0, 20.0]);
        assert_eq!(round(write), [12.0, 11.0, 24.0]);
        let missing = latencies(&timeline, &["c".to_string()], &[40.0]);
        assert!(missing.is_err());
    }
}
