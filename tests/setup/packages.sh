# kilo-egress: one helper for the setup scripts (sourced; bash). Idempotent.
# shellcheck shell=bash

# install_missing TOOL=PACKAGE ...: installs from Debian the packages of the tools that are not on
# PATH (apt lists are refreshed only when an install fails without them), or says all are present.
install_missing() {
    local pair missing=()
    for pair in "$@"; do
        command -v "${pair%%=*}" >/dev/null 2>&1 || missing+=("${pair#*=}")
    done
    if ((${#missing[@]} == 0)); then
        echo "present: ${*%%=*}"
        return 0
    fi
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    echo "installing (Debian): ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends "${missing[@]}" ||
        { apt-get update && apt-get install -y --no-install-recommends "${missing[@]}"; }
    hash -r
}
