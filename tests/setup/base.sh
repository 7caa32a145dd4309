# kilo-egress: set-up shared by tests/run.sh and tests/bench.sh (sourced; they define step and die).
# Installs the system tools the labs need, finds Rust, and removes lab namespaces that killed
# earlier runs left behind. Idempotent.
# shellcheck shell=bash

# shellcheck source=tests/setup/packages.sh
source tests/setup/packages.sh

# iproute2, iptables (both backends), procps, getconf and conntrack, from Debian, when missing;
# groff and man render the manual pages in tests/tests/operator_cli.rs.
install_system_packages() {
    step "Setup: system packages"
    install_missing ip=iproute2 iptables-nft=iptables iptables-legacy=iptables sysctl=procps \
        kill=procps getconf=libc-bin conntrack=conntrack groff=groff-base man=man-db
}

# cargo on PATH (rustup's env is sourced when needed); `require_rust COMPONENT..` also adds rustup
# components such as rustfmt and clippy.
require_rust() {
    step "Setup: Rust toolchain"
    if ! command -v cargo >/dev/null 2>&1 && [[ -f $HOME/.cargo/env ]]; then
        # shellcheck disable=SC1091
        source "$HOME/.cargo/env"
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo is missing: install Rust >= 1.89 with rustup (https://rustup.rs); Debian's cargo is too old"
    local component
    if command -v rustup >/dev/null 2>&1; then
        for component in "$@"; do
            rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
        done
    fi
    cargo --version
}

# Test labs are named ke<pid>x..., demo labs ke<pid>d...; removes those whose creator is gone.
remove_stale_namespaces() {
    step "Setup: remove namespaces left behind by killed earlier runs"
    local ns pid p
    while read -r ns _; do
        [[ $ns =~ ^ke([0-9]+)[xd] ]] || continue
        pid=${BASH_REMATCH[1]}
        kill -0 "$pid" 2>/dev/null && continue
        for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null || true; done
        ip netns del "$ns" && echo "removed stale namespace $ns"
    done < <(ip netns list 2>/dev/null)
}
