#!/usr/bin/env bash
# kilo-egress: THE benchmark command. Run as root from anywhere in a clone: `sudo ./tests/bench.sh`.
#
# Installs what it lacks (Debian 12: iproute2, iptables, procps; kmock from PyPI), builds the workspace in release
# mode, and runs `egress-bench`, which measures kilo-egressd inside network namespaces it creates
# (never touching the host's rules) and writes docs/benchmarks/{results.json,results.md,setegress.svg}.
# Takes about 10 minutes on 2 vCPU. Arguments go to egress-bench:
#   --quick                 tiny sizes, about a minute (a smoke run, not results)
#   --out DIR               write the results elsewhere (default docs/benchmarks; with --quick
#                           target/bench-quick)
#   --only PHASE,..         setegress, ten-thousand, concurrent, drift, idle, address, watch
#   --idle-seconds N        length of the idle CPU window (default 60)
# docs/BENCHMARKS.md says what is measured and how to read the results.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -t 1 ]]; then BOLD=$'\e[1m'; RED=$'\e[31m'; OFF=$'\e[0m'; else BOLD='' RED='' OFF=''; fi
step() { printf '\n%s==> [%s] %s%s\n' "$BOLD" "$(date +%H:%M:%S)" "$*" "$OFF"; }
die() { printf '%sFAILED: %s%s\n' "$RED" "$*" "$OFF" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: sudo ./tests/bench.sh (the benchmark creates network namespaces)"

# shellcheck source=tests/setup/base.sh
source tests/setup/base.sh
install_system_packages
# shellcheck disable=SC2119 # no rustup components needed for the bench
require_rust
remove_stale_namespaces
# The watch phase runs the Kubernetes API emulator (kmock, from PyPI) beside kilo-egress watch.
export PATH=$PATH:$HOME/.local/bin
# shellcheck source=tests/setup/kubernetes.sh
source tests/setup/kubernetes.sh

step "cargo build --release --workspace"
cargo build --release --workspace

step "egress-bench $*"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
./target/release/egress-bench "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
