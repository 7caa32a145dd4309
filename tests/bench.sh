#!/usr/bin/env bash
# kilo-egress: THE benchmark command. Run as root from anywhere in a clone: `sudo ./tests/bench.sh`.
#
# Installs what it lacks (Debian 12: iproute2, iptables, procps), builds the workspace in release
# mode, and runs `egress-bench`, which measures kilo-egressd inside network namespaces it creates
# (never touching the host's rules) and writes docs/benchmarks/{results.json,results.md,setegress.svg}.
# Takes about 10 minutes on 2 vCPU. Arguments go to egress-bench:
#   --quick                 tiny sizes, about a minute (a smoke run, not results)
#   --out DIR               write the results elsewhere (default docs/benchmarks; with --quick
#                           target/bench-quick)
#   --only PHASE,..         setegress, ten-thousand, concurrent, drift, idle
#   --idle-seconds N        length of the idle CPU window (default 60)
# docs/BENCHMARKS.md says what is measured and how to read the results.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -t 1 ]]; then BOLD=$'\e[1m'; RED=$'\e[31m'; OFF=$'\e[0m'; else BOLD='' RED='' OFF=''; fi
step() { printf '\n%s==> [%s] %s%s\n' "$BOLD" "$(date +%H:%M:%S)" "$*" "$OFF"; }
die() { printf '%sFAILED: %s%s\n' "$RED" "$*" "$OFF" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: sudo ./tests/bench.sh (the benchmark creates network namespaces)"

step "Setup: system packages"
declare -A NEEDS=([ip]=iproute2 [iptables-nft]=iptables [iptables-legacy]=iptables [sysctl]=procps [kill]=procps [getconf]=libc-bin)
missing=()
for tool in "${!NEEDS[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${NEEDS[$tool]}")
done
if ((${#missing[@]})); then
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
else
    echo "iproute2, iptables and procps present"
fi

step "Setup: Rust toolchain"
if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 ||
    die "cargo is missing: install Rust >= 1.88 with rustup (https://rustup.rs); Debian's cargo is too old"
cargo --version

step "Setup: remove namespaces left behind by killed earlier runs"
# Labs are named ke<pid>x...; remove those whose creator is gone.
while read -r ns _; do
    [[ $ns =~ ^ke([0-9]+)[xd] ]] || continue
    pid=${BASH_REMATCH[1]}
    kill -0 "$pid" 2>/dev/null && continue
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
    ip netns del "$ns" && echo "removed stale namespace $ns"
done < <(ip netns list 2>/dev/null)

step "cargo build --release --workspace"
cargo build --release --workspace

step "egress-bench $*"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
./target/release/egress-bench "$@"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
