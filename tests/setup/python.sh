# kilo-egress: Python packages for the automation example and its test (sourced by tests/run.sh).
# Idempotent: installs grpcio and grpcio-tools from PyPI only when python3 cannot import them.
# Debian's own python refuses system-wide installs without --break-system-packages.
# shellcheck shell=bash

KILO_PY_PACKAGES=(grpcio grpcio-tools)
if python3 -c 'import grpc, grpc_tools.protoc' >/dev/null 2>&1; then
    echo "python3: grpcio $(python3 -c 'import grpc; print(grpc.__version__)') and grpcio-tools present"
else
    if ! python3 -m pip --version >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
    fi
    echo "installing: ${KILO_PY_PACKAGES[*]} (PyPI)"
    python3 -m pip install --quiet "${KILO_PY_PACKAGES[@]}" ||
        python3 -m pip install --quiet --break-system-packages "${KILO_PY_PACKAGES[@]}"
    python3 -c 'import grpc, grpc_tools.protoc' ||
        { echo "FAILED: python3 still cannot import grpc and grpc_tools after pip install" >&2; exit 1; }
fi
