#!/usr/bin/env bash
# Builds the test control plane (kine, kwok, helm, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl) from the Go module proxy into $BIN (default: .testenv/bin at the
# repository root, git-ignored). Binaries already there are skipped; about 10 minutes cold.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
BIN="${FLEETWISE_TESTENV_BIN:-$root/.testenv/bin}"
mkdir -p "$BIN"
command -v go >/dev/null || { echo "build.sh: the Go toolchain is needed to build the test control plane" >&2; exit 1; }

K8S=v1.34.4
LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=$K8S -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=34"

install() {  # name module@version
  if [ -x "$BIN/$1" ]; then echo "have $1"; return; fi
  echo "building $1 ($2)"
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "$2"
}

install kine github.com/k3s-io/kine@v0.16.4
install kwok sigs.k8s.io/kwok/cmd/kwok@v0.7.0
install helm helm.sh/helm/v3/cmd/helm@v3.21.4

cd "$here"
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
  if [ -x "$BIN/$cmd" ]; then echo "have $cmd"; continue; fi
  echo "building $cmd ($K8S)"
  go build -trimpath -ldflags "$LDFLAGS" -o "$BIN/$cmd" "k8s.io/kubernetes/cmd/$cmd"
done
echo "test control plane in $BIN"
