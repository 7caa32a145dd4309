//! The benchmark command stays runnable: `egress-bench --quick` (tiny sizes) measures SetEgress
//! against both baselines on both backends, idle and busy, and writes its three result files; its
//! watch phase times the node watcher end to end on both backends.

use kilo_egress_tests::{bin_path, cmd, require_root};

/// Runs `egress-bench --quick --only PHASES` into a temporary directory; returns it and the parsed
/// results.json.
fn quick_run(phases: &str) -> (tempfile::TempDir, serde_json::Value) {
    let out = tempfile::tempdir().expect("temporary directory");
    let dir = out.path().display().to_string();
    let run = cmd::capture(
        std::process::Command::new(bin_path("egress-bench"))
            .args(["--quick", "--only", phases, "--out", &dir]),
        None,
    )
    .expect("run egress-bench");
    assert!(run.success(), "{run}");
    let results = serde_json::from_slice(
        &std::fs::read(out.path().join("results.json")).expect("results.json"),
    )
    .expect("results.json is JSON");
    (out, results)
}

#[test]
fn quick_bench_writes_results_for_every_backend_and_node() {
    if !require_root("quick_bench_writes_results_for_every_backend_and_node") {
        return;
    }
    let (out, results) = quick_run("setegress,ten-thousand");
    let cells = results["setegress"].as_array().expect("setegress cells");
    assert_eq!(
        cells.len(),
        8,
        "2 backends x idle/busy x 2 sizes: {cells:?}"
    );
    for cell in cells {
        for key in ["setegress", "bare_restore", "per_rule"] {
            assert!(
                cell[key]["p50_ms"].as_f64().is_some_and(|ms| ms > 0.0),
                "{key} measured: {cell}"
            );
        }
        assert!(
            cell["transactions_per_call"]
                .as_f64()
                .is_some_and(|t| t >= 1.0),
            "{cell}"
        );
    }
    for start in results["ten_thousand"].as_array().expect("large chain") {
        assert_eq!(start["kernel_transactions"], 1, "one transaction: {start}");
    }
    let svg = std::fs::read_to_string(out.path().join("setegress.svg")).expect("setegress.svg");
    assert_eq!(
        svg.matches("<polyline").count(),
        12,
        "3 lines in each of 4 panels"
    );
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert!(md.contains("| nft | busy | 100 |"), "{md}");
}

#[test]
fn quick_bench_times_the_node_watcher_on_both_backends() {
    let name = "quick_bench_times_the_node_watcher_on_both_backends";
    if !(require_root(name) && kilo_egress_tests::kube::require_kmock(name)) {
        return;
    }
    let (out, results) = quick_run("watch");
    let watch = results["watch"].as_array().expect("watch entries");
    assert_eq!(watch.len(), 2, "nft and legacy: {watch:?}");
    for entry in watch {
        assert_eq!(entry["timeouts"], 0, "{entry}");
        assert_eq!(entry["after_event"]["n"], 3, "every change timed: {entry}");
        let (event, write) = (
            entry["after_event"]["p50_ms"].as_f64().unwrap(),
            entry["after_write"]["p50_ms"].as_f64().unwrap(),
        );
        assert!(event > 0.0 && write >= event, "{entry}");
    }
    let md = std::fs::read_to_string(out.path().join("results.md")).expect("results.md");
    assert!(md.contains("### The node watcher end to end"), "{md}");
}
