#!/usr/bin/env bash
# Builds the real Kubernetes control plane the end-to-end tests run against: kube-apiserver,
# kube-controller-manager and kube-scheduler from the k8s.io/kubernetes module, and etcd from
# go.etcd.io/etcd/server/v3, each pinned by the go.mod and go.sum beside this script; and kubectl
# from the same Kubernetes release (the deployment tests run the README's commands with it).
#
# The binaries go to a versioned cache folder (printed on the last line) behind a stamp that holds
# the digest of the pinning files, so a rebuild happens only when a version changes. Go's own
# module and build caches make a rebuild after a version change quick.
#
# Usage: tools/controlplane/build.sh          # prints the folder holding the binaries
# Environment: DISP_CONTROLPLANE_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/disp-operator)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

K8S_VERSION=$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" {print $3}' "$here/kubernetes/go.mod")
ETCD_VERSION=$(awk '$1 == "require" && $2 == "go.etcd.io/etcd/server/v3" {print $3}' "$here/etcd/go.mod")
[ -n "$K8S_VERSION" ] && [ -n "$ETCD_VERSION" ] || { echo "controlplane: cannot read the pinned versions" >&2; exit 1; }

cache=${DISP_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/disp-operator}
out="$cache/controlplane-$K8S_VERSION-etcd-$ETCD_VERSION"
digest=$(cat "$here"/kubernetes/go.{mod,sum} "$here"/etcd/go.{mod,sum} "$0" | sha256sum | cut -c1-16)
if [ -f "$out/.stamp" ] && [ "$(cat "$out/.stamp")" = "$digest" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "controlplane: the Go toolchain is not installed (go 1.26 or newer)" >&2; exit 1; }
say() { printf 'controlplane: %s\n' "$*" >&2; }
mkdir -p "$out"
rm -f "$out/.stamp"
start=$(date +%s)

# The version the servers report (kubectl version, /version) comes from these variables.
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
  -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
  -X k8s.io/component-base/version.gitTreeState=clean"
say "building kube-apiserver, kube-controller-manager, kube-scheduler, kubectl $K8S_VERSION (cold: about 5 min on 2 cores and 4 GB of Go caches)"
(cd "$here/kubernetes" && CGO_ENABLED=0 go build -trimpath -ldflags "$ldflags" -o "$out/" \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kubectl)

say "building etcd $ETCD_VERSION"
(cd "$here/etcd" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/etcd" go.etcd.io/etcd/server/v3)

echo "$digest" > "$out/.stamp"
say "built in $(( $(date +%s) - start )) s into $out"
echo "$out"
