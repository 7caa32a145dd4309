# shellcheck shell=bash
# kilo-egress: what the image test (tests/tests/image_pod.rs) needs. Sourced by tests/run.sh
# (set -euo pipefail, step/die defined); idempotent: installs only what is missing.
#   podman       Debian 12's podman 4.3 (builds the image, runs the pod with `podman kube play`)
#   runc         its OCI runtime here (crun 1.8 refuses this machine's cgroup set-up)
#   catatonit    the pod's infra (pause) process: podman builds its pause image from it locally
#   debootstrap  the stand-in base images (debian:bookworm-slim, rust:<version>-bookworm) come
#                from a Debian rootfs made with the host's apt mirror: no registry is reachable
# The test writes its own containers.conf (runtime runc, cgroupfs, ulimits) and points podman at
# it with CONTAINERS_CONF: nothing under /etc/containers is changed.

step "Setup: podman, runc, catatonit, debootstrap (for tests/tests/image_pod.rs)"
podman_wanted=()
command -v podman >/dev/null 2>&1 || podman_wanted+=(podman)
command -v runc >/dev/null 2>&1 || podman_wanted+=(runc)
[[ -x /usr/libexec/podman/catatonit || -x /usr/bin/catatonit ]] || podman_wanted+=(catatonit)
command -v debootstrap >/dev/null 2>&1 || podman_wanted+=(debootstrap)
if ((${#podman_wanted[@]})); then
    echo "installing: ${podman_wanted[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update
    # No recommends: slirp4netns, fuse-overlayfs and buildah are for rootless use and builds
    # outside podman; root's overlay storage and podman's built-in build are enough here.
    apt-get install -y --no-install-recommends "${podman_wanted[@]}"
    hash -r
fi
command -v podman >/dev/null 2>&1 || die "podman is still missing after apt-get install podman"
command -v runc >/dev/null 2>&1 || die "runc is still missing after apt-get install runc"
command -v debootstrap >/dev/null 2>&1 || die "debootstrap is still missing after apt-get install debootstrap"
echo "$(podman --version), $(runc --version | head -1), debootstrap $(dpkg-query -W -f '${Version}' debootstrap)"
