# shellcheck shell=bash
# kilo-egress: promtool for tests/tests/metrics.rs (`promtool check metrics`). Sourced by
# tests/run.sh (set -euo pipefail, step/die defined); idempotent.
# Debian's `prometheus` package ships promtool 2.42, but installing it would also install and start
# a Prometheus server: only the package file is downloaded, and promtool is taken out of it into
# target/tools/bin (put on PATH).
step "Setup: promtool (from Debian's prometheus package, not installed)"
PROMTOOL_DIR=$PWD/target/tools
if ! command -v promtool >/dev/null 2>&1 && [[ ! -x $PROMTOOL_DIR/bin/promtool ]]; then
    promtool_tmp=$(mktemp -d)
    # apt's download user cannot write into a root-only temporary directory.
    chmod 755 "$promtool_tmp"
    (cd "$promtool_tmp" && apt-get download prometheus) ||
        { apt-get update && (cd "$promtool_tmp" && apt-get download prometheus); } ||
        die "cannot download Debian's prometheus package for promtool"
    dpkg-deb -x "$promtool_tmp"/prometheus_*.deb "$promtool_tmp/x"
    mkdir -p "$PROMTOOL_DIR/bin"
    install -m 755 "$promtool_tmp/x/usr/bin/promtool" "$PROMTOOL_DIR/bin/promtool"
    rm -rf "$promtool_tmp"
fi
if ! command -v promtool >/dev/null 2>&1; then
    export PATH=$PROMTOOL_DIR/bin:$PATH
fi
promtool --version 2>&1 | head -1
