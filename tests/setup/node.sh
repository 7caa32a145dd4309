# shellcheck shell=bash
# kilo-egress: Node's gRPC client for tests/tests/any_grpc_client.rs. Sourced by tests/run.sh (set
# -euo pipefail, step/die defined, the repository root as working directory); idempotent.
#   nodejs, npm          Debian/apt, when missing
#   @grpc/grpc-js        npm, with @grpc/proto-loader, pinned, into <target>/node-clients (never
#                        global), installed again only when a pinned version is missing there
# Exports KILO_NODE_MODULES (the node_modules directory the test puts on NODE_PATH).
KILO_GRPC_JS_VERSION=1.14.7
KILO_PROTO_LOADER_VERSION=0.8.1

node_clients_setup() {
    step "Setup: Node gRPC client (@grpc/grpc-js $KILO_GRPC_JS_VERSION, tests/setup/node.sh)"
    # shellcheck source=tests/setup/packages.sh
    source tests/setup/packages.sh
    install_missing node=nodejs npm=npm
    command -v node >/dev/null 2>&1 || die "node is still missing after apt-get install nodejs"
    local dir=${CARGO_TARGET_DIR:-$PWD/target}/node-clients
    local wanted="@grpc/grpc-js@$KILO_GRPC_JS_VERSION @grpc/proto-loader@$KILO_PROTO_LOADER_VERSION"
    if [[ $(cat "$dir/installed" 2>/dev/null) != "$wanted" ]]; then
        echo "installing from npm into $dir: $wanted"
        mkdir -p "$dir"
        # shellcheck disable=SC2086
        npm install --prefix "$dir" --no-audit --no-fund --loglevel=error $wanted
        echo "$wanted" >"$dir/installed"
    fi
    export KILO_NODE_MODULES=$dir/node_modules
    NODE_PATH=$KILO_NODE_MODULES node -e 'require("@grpc/grpc-js"); require("@grpc/proto-loader")' ||
        die "node cannot load @grpc/grpc-js and @grpc/proto-loader from $KILO_NODE_MODULES"
    echo "node $(node --version), $wanted in $KILO_NODE_MODULES"
}
node_clients_setup
