#!/usr/bin/env bash
# kilo-egress: the reliability suite at full size (docs/RELIABILITY.md). Run as root from a clone:
#   sudo ./tests/reliability.sh
# The same tests run in `tests/run.sh` (and CI) at a size that fits; this raises the sizes:
# 100 kill -9 rounds per backend, 5 minutes of kg beside kilo-egressd. Takes about 15 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[[ $(id -u) == 0 ]] || { echo "run as root: sudo ./tests/reliability.sh" >&2; exit 1; }
export KILO_EGRESS_KILL_ROUNDS=${KILO_EGRESS_KILL_ROUNDS:-100}
export KILO_EGRESS_FIGHT_SECONDS=${KILO_EGRESS_FIGHT_SECONDS:-300}
export PROPTEST_CASES=${PROPTEST_CASES:-20000}
cargo build --workspace
cargo test -p kilo-egress-api --test properties
RUST_TEST_THREADS=2 cargo test -p kilo-egress-tests --test reliability --test write_failures \
    --test one_writer -- --nocapture
cargo test -p kilo-egressd --test grpc_fake a_burst_from_one_identity
