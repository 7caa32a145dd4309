#!/usr/bin/env bash
# kilo-egress: build the container image (deploy/Dockerfile) with docker or podman, whichever
# works here. Run from anywhere in a clone:
#
#   ./deploy/build-image.sh                               # -> kilo-egress:<version in Cargo.toml>
#   IMAGE=registry.example/kilo-egress:0.1.0 ./deploy/build-image.sh && docker push registry.example/kilo-egress:0.1.0
#   ./deploy/build-image.sh --build-arg RUST_VERSION=1.95.0     # any further flags go to `build`
#
# Environment:
#   IMAGE             the image name and tag (default kilo-egress:<workspace version>)
#   CONTAINER_ENGINE  docker or podman; default: docker when its daemon answers, else podman
# Builds again quickly: cargo's registry and target directory are build cache mounts, and a
# source change rebuilds only the layers after it. Deploying the image: docs/operations.md.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
[[ -n $version ]] || die "no version = \"...\" in Cargo.toml"
image=${IMAGE:-kilo-egress:$version}

engine=${CONTAINER_ENGINE:-}
if [[ -z $engine ]]; then
    if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
        engine=docker
    elif command -v podman >/dev/null 2>&1; then
        engine=podman
    elif command -v docker >/dev/null 2>&1; then
        die "docker is installed but its daemon does not answer (docker info failed), and podman is not installed"
    else
        die "neither docker nor podman is installed: install one (e.g. apt-get install podman)"
    fi
fi

case $engine in
docker)
    # BuildKit: RUN --mount=type=cache and deploy/Dockerfile.dockerignore need it.
    export DOCKER_BUILDKIT=1
    build=(docker build)
    ;;
podman)
    # podman 4 does not look for deploy/Dockerfile.dockerignore by itself.
    build=(podman build --ignorefile deploy/Dockerfile.dockerignore)
    ;;
*) die "CONTAINER_ENGINE=$engine: expected docker or podman" ;;
esac

echo "build-image.sh: building $image with $engine ($(${engine} --version | head -1))" >&2
started=$SECONDS
"${build[@]}" -f deploy/Dockerfile -t "$image" "$@" .
echo "build-image.sh: built $image in $((SECONDS - started))s" >&2
name=${image%:*} tag=${image##*:}
if [[ $name == "$image" || $tag == */* ]]; then name=$image tag=latest; fi
echo "  deploy it: push it, then in deploy/kubernetes: kustomize edit set image kilo-egress=$name:$tag" >&2
