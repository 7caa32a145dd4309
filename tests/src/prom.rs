//! Prometheus metrics in the end-to-end tests: scrape a `/metrics` endpoint inside the lab's node
//! namespace, read one sample, and check the text with `promtool check metrics` (Debian's
//! promtool 2.42, fetched by `tests/setup/promtool.sh`).

use crate::cmd::{Captured, capture};
use crate::lab::Lab;
use anyhow::Context;
use std::process::Command;

/// Where the tests' kilo-egressd serves metrics, inside the lab's node namespace.
pub const DAEMON_METRICS: &str = "127.0.0.1:9464";
/// Where the tests' watcher serves metrics, inside the lab's node namespace.
pub const WATCHER_METRICS: &str = "127.0.0.1:9465";

/// Returns true when `promtool` runs. Otherwise it panics when `CI=true`, or prints a loud
/// `SKIPPED (needs promtool)` and returns false.
pub fn require_promtool(test: &str) -> bool {
    let found = Command::new("promtool")
        .arg("--version")
        .output()
        .is_ok_and(|out| out.status.success());
    found || crate::skip_or_fail(test, "needs promtool (tests/setup/promtool.sh)")
}

/// GETs `http://{addr}{path}` from inside the lab's node namespace: (status code, body).
pub fn get(lab: &Lab, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    const FETCH: &str = "import sys, urllib.request, urllib.error
try:
    answer = urllib.request.urlopen(sys.argv[1], timeout=5)
except urllib.error.HTTPError as e:
    answer = e
print(answer.status)
sys.stdout.write(answer.read().decode())";
    let url = format!("http://{addr}{path}");
    let out = lab.exec(&lab.node, "python3", &["-c", FETCH, &url])?;
    let out = out.ok().with_context(|| format!("GET {url}"))?.stdout;
    let (status, body) = out.split_once('\n').unwrap_or((&out, ""));
    Ok((status.trim().parse()?, body.to_string()))
}

/// The metrics served at `addr` in the lab's node namespace.
pub fn scrape(lab: &Lab, addr: &str) -> anyhow::Result<String> {
    match get(lab, addr, "/metrics")? {
        (200, body) => Ok(body),
        (status, body) => anyhow::bail!("GET /metrics answered {status}: {body}"),
    }
}

/// `promtool check metrics` of `text` (its lint findings in the output, exit 0 when clean).
pub fn promtool_check(text: &str) -> anyhow::Result<Captured> {
    capture(
        Command::new("promtool").args(["check", "metrics"]),
        Some(text),
    )
}

/// The value of the sample `series` (name and labels exactly as served, e.g.
/// `kilo_egress_in_sync{ip_family="IPv4"}`), or `None` when it is not there.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// [`sample`], 0 when the series is absent (a counter not yet incremented).
pub fn count(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_exact_series() {
        let text = "# HELP a x\na{b=\"1\"} 2\na{b=\"10\"} 3\nc 4.5\n";
        assert_eq!(sample(text, "a{b=\"1\"}"), Some(2.0));
        assert_eq!(sample(text, "c"), Some(4.5));
        assert_eq!(sample(text, "a"), None);
        assert_eq!(count(text, "d"), 0.0);
    }
}
