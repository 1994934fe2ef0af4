#!/usr/bin/env bash
# Builds the project's two images, localhost/disp-operator and localhost/disp-runner, with podman
# from this repository's Dockerfile, on a machine that reaches no container registry.
#
# The Dockerfile is what a user builds with the official python:3.11 slim image. No registry is
# reachable here, so this script first makes an equivalent base from Debian's own packages
# (debootstrap bookworm + python3.11: the Python of the official bookworm images) and passes it as
# PYTHON_IMAGE. pip inside the build reaches the package index through this machine's certificate
# authority, and takes torch from this machine's wheel folder when pip is configured with one (the
# CPU wheel: a CUDA build would be several GB), both bind-mounted read-only into the build.
#
# Usage: containers/build-images.sh [operator|runner ...]   (default: both)
# Environment: DISP_IMAGE_TAG (default dev), TORCH_SPEC (default torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${DISP_IMAGE_TAG:-dev}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
BASE_IMAGE=localhost/disp-python:3.11-bookworm
DEFAULT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# runc, not crun: crun refuses a cgroup v1/hybrid host; podman's default rlimits are refused in
# unprivileged sandboxes, explicit low ones are not.
RUNTIME_FLAGS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1000:1000)

say() { printf 'images: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

ensure_tools() {
  local missing=()
  for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return
  [ "$(id -u)" = 0 ] || die "${missing[*]} not installed and not root to install them (apt-get install podman runc debootstrap)"
  say "installing ${missing[*]} from Debian's packages"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null
}

debian_mirror() {
  # The mirror apt itself uses on this machine (deb822 sources first, then the classic list).
  local uri
  uri=$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n 1)
  [ -n "$uri" ] || uri=$(grep -hsE '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n 1)
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  podman image exists "$BASE_IMAGE" && return
  local rootfs
  rootfs=$(mktemp -d /var/tmp/disp-rootfs.XXXXXX)
  say "making $BASE_IMAGE from Debian bookworm ($(debian_mirror))"
  # python-is-python3 gives `python`, as the official image has; `python -m venv` needs
  # python3-venv and python3-distutils (debootstrap does not pull the latter in by itself).
  if ! debootstrap --variant=minbase --include=python3.11,python3-venv,python3-distutils,python-is-python3,ca-certificates \
      bookworm "$rootfs" "$(debian_mirror)" >"$rootfs.log" 2>&1; then
    tail -n 5 "$rootfs.log" >&2; rm -rf "$rootfs" "$rootfs.log"; die "debootstrap failed"
  fi
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  # The configuration of the official python image that the Dockerfile builds on (PATH, LANG, CMD).
  tar -C "$rootfs" -c . | podman import --change 'CMD ["python3"]' --change "ENV PATH=$DEFAULT_PATH" \
    --change 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
}

build_target() {
  local target=$1 args=() mounts=()
  local cert find_links
  cert=$(pip config get global.cert 2>/dev/null || true); cert=${PIP_CERT:-$cert}
  find_links=$(pip config get global.find-links 2>/dev/null || true); find_links=${PIP_FIND_LINKS:-$find_links}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    mounts+=(-v "$cert:/run/host-ca.crt:ro"); args+=(--build-arg PIP_CERT=/run/host-ca.crt)
  fi
  if [ -n "$find_links" ] && [ -d "$find_links" ]; then
    mounts+=(-v "$find_links:/run/host-wheels:ro"); args+=(--build-arg PIP_FIND_LINKS=/run/host-wheels)
  fi
  say "building localhost/disp-$target:$TAG"
  podman build "${RUNTIME_FLAGS[@]}" --network host --target "$target" \
    --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" \
    "${args[@]}" "${mounts[@]}" -t "localhost/disp-$target:$TAG" -f Dockerfile . >&2
}

main() {
  local targets=("$@")
  [ ${#targets[@]} -gt 0 ] || targets=(operator runner)
  ensure_tools
  build_base
  for target in "${targets[@]}"; do
    case "$target" in operator|runner) build_target "$target" ;; *) die "unknown target $target (operator, runner)" ;; esac
  done
  # The layers of earlier builds that no tag uses any more. Housekeeping only: when a build cut
  # short earlier left its working containers holding some of them, the images are still built.
  podman image prune --force >/dev/null 2>&1 ||
    say "kept unused layers: containers of an interrupted build hold them (podman ps --all --external)"
  podman images --format '{{.Repository}}:{{.Tag}} {{.Size}}' --filter reference='localhost/disp-*' >&2
}

main "$@"
