#!/usr/bin/env bash
# Builds the cluster tools the deployment tests run as a platform team would: helm, kustomize, the
# MinIO server and Kueue's controller manager, each with `go install PACKAGE@VERSION` at the version
# pinned below (the module's own go.mod decides its dependencies, and the Go command checks every
# module against the checksum database). kubectl comes with the control plane
# (tools/controlplane/build.sh), from the same Kubernetes release as the API server.
#
# The binaries go to a versioned cache folder (printed on the last line) behind a stamp that holds
# the digest of this script, so nothing is rebuilt while the pins are unchanged.
#
# Usage: tools/clustertools/build.sh          # prints the folder holding the binaries
# Environment: DISP_CONTROLPLANE_CACHE (default ${XDG_CACHE_HOME:-$HOME/.cache}/disp-operator)
set -euo pipefail

# name  package@version  [the variable that holds the version the tool reports]
TOOLS=(
  "helm      helm.sh/helm/v4/cmd/helm@v4.3.2  helm.sh/helm/v4/internal/version.version"
  "kustomize sigs.k8s.io/kustomize/kustomize/v5@v5.8.1"
  # MinIO publishes RELEASE.* tags, which are not Go versions: this is the pseudo-version of the
  # last commit of its default branch the module proxy serves (2026-02-12).
  "minio     github.com/minio/minio@v0.0.0-20260212201848-7aac2a2c5b7c"
  "kueue     sigs.k8s.io/kueue/cmd/kueue@v0.17.0"
)

cache=${DISP_CONTROLPLANE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/disp-operator}
digest=$(sha256sum "$0" | cut -c1-16)
out="$cache/clustertools-$digest"
if [ -f "$out/.stamp" ]; then
  echo "$out"
  exit 0
fi

command -v go >/dev/null || { echo "clustertools: the Go toolchain is not installed (go 1.26 or newer)" >&2; exit 1; }
say() { printf 'clustertools: %s\n' "$*" >&2; }
mkdir -p "$out"
for entry in "${TOOLS[@]}"; do
  read -r name spec version_variable <<<"$entry"
  ldflags="-s -w"
  [ -n "${version_variable:-}" ] && ldflags="$ldflags -X $version_variable=${spec##*@}"
  [ -x "$out/$name" ] && continue
  start=$(date +%s)
  say "building $name ($spec)"
  tmp=$(mktemp -d)
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "$ldflags" "$spec"
  mv "$tmp"/* "$out/$name"
  rmdir "$tmp"
  say "built $name in $(( $(date +%s) - start )) s"
done
date -u +%FT%TZ > "$out/.stamp"
echo "$out"
