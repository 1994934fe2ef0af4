"""Pods in a real container runtime: a pod spec the operator builds, run with podman (runc) as a
kubelet would run it, with nothing mapped or skipped.

What the kubelet would decide comes from tests/harness/container_rules.py (the same rules the
node agent follows): the env with Secret values and $(VAR) expanded, the identity, and the
command/args, which map onto the runtime as the kubelet maps them (`command` -> the entry point,
`args` -> the arguments after the image). The pod's securityContext becomes the runtime's own
settings: a read-only root filesystem (without the writable /tmp, /var/tmp and /run that podman
adds unless told not to: Kubernetes adds none), the user and groups, dropped capabilities,
no-new-privileges, the default seccomp profile. emptyDir volumes are fresh host folders (mode 0777,
group fsGroup, as the kubelet makes them), a memory-backed emptyDir is a tmpfs, a hostPath volume
is bind-mounted.

One deliberate difference: the container shares the host's network namespace, where the tests'
S3 server listens on loopback; a pod's network reaches the cluster's S3 service the same way."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from tests.harness.container_rules import ImageConfig, container_process

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "containers" / "build-images.sh"
IMAGE_TAG = "dev"
OPERATOR_IMAGE = f"localhost/disp-operator:{IMAGE_TAG}"
RUNNER_IMAGE = f"localhost/disp-runner:{IMAGE_TAG}"
# runc, not crun (crun refuses a cgroup v1/hybrid host); podman's default rlimits are refused in
# unprivileged sandboxes, explicit ones are not.
RUNTIME_FLAGS = ("--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000")


class RuntimeUnavailable(Exception):
    """Containers cannot be built or run on this machine; the message says why, in one line."""


def podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"podman {args[0]} failed (exit {result.returncode}): {last}")
    return result


def build_images(timeout: float = 1800) -> None:
    """Build (or bring up to date, from podman's layer cache) both images; RuntimeUnavailable when
    this machine cannot."""
    if shutil.which("podman") is None and os.geteuid() != 0:
        raise RuntimeUnavailable("podman is not installed and the tests are not root to install it "
                                 "(apt-get install podman runc debootstrap)")
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "DISP_IMAGE_TAG": IMAGE_TAG})
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeUnavailable(f"containers/build-images.sh failed (exit {result.returncode}): {last}")
    smoke = podman("run", "--rm", *RUNTIME_FLAGS, "--network", "none", "--entrypoint", "true", RUNNER_IMAGE,
                   check=False, timeout=120)
    if smoke.returncode != 0:
        last = (smoke.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeUnavailable(f"podman cannot run a container here: {last}")


def inspect_config(image: str) -> ImageConfig:
    """The configuration podman recorded for a built image."""
    config = json.loads(podman("image", "inspect", image, "--format", "{{json .Config}}").stdout)
    env = dict(item.split("=", 1) for item in config.get("Env") or [])
    return ImageConfig(entrypoint=tuple(config.get("Entrypoint") or ()), cmd=tuple(config.get("Cmd") or ()),
                       env=env, workdir=config.get("WorkingDir") or "/", user=config.get("User") or "")


@dataclass
class ContainerRun:
    name: str
    exit_code: int
    logs: str
    root_changes: list[str]  # `podman diff`: what changed in the root filesystem (volume mount points aside)


def _quantity_bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


# Paths in the root filesystem the runtime itself changes for every container: it creates the mount
# points, and bind-mounts /etc/hosts, /etc/hostname and /etc/resolv.conf (so /etc shows as changed).
RUNTIME_CHANGED = {"/etc"}


def _run_args(pod: Mapping[str, Any], image: ImageConfig, secret_value: Callable[[str, str], Optional[str]],
              workdir: Path, name: str) -> list[str]:
    """`podman run` arguments (after `run`) for the pod's only container."""
    spec = pod["spec"]
    (container,) = spec["containers"]
    process = container_process(image, pod, container, secret_value)
    pod_ctx = spec.get("securityContext") or {}
    ctx = {**pod_ctx, **(container.get("securityContext") or {})}
    argv = ["--name", name, *RUNTIME_FLAGS, "--network", "host", "--user", process.identity.user]
    for group in process.identity.groups:
        argv += ["--group-add", str(group)]
    if ctx.get("readOnlyRootFilesystem"):
        argv += ["--read-only", "--read-only-tmpfs=false"]
    if ctx.get("privileged"):
        argv.append("--privileged")
    if ctx.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    if (ctx.get("seccompProfile") or {}).get("type") == "Unconfined":
        argv += ["--security-opt", "seccomp=unconfined"]  # RuntimeDefault is the runtime's own default
    capabilities = ctx.get("capabilities") or {}
    argv += [flag for cap in capabilities.get("drop", []) for flag in ("--cap-drop", cap)]
    argv += [flag for cap in capabilities.get("add", []) for flag in ("--cap-add", cap)]
    if container.get("workingDir"):
        argv += ["--workdir", container["workingDir"]]
    argv += _volume_args(spec, container, pod_ctx, workdir, name)
    # Secret values reach the runtime in a file only root can read, not on a command line.
    env_file = workdir / f"{name}.env"
    env_file.touch(mode=0o600)
    env_file.write_text("".join(f"{k}={v}\n" for k, v in process.pod_env.items()))
    argv += ["--env-file", str(env_file)]
    # The kubelet hands the runtime the expanded command and args, and the runtime puts them in
    # place of the image's ENTRYPOINT and CMD; test_containers checks that podman merges them with
    # an image exactly as container_rules.process_argv says.
    args: list[str] = []
    if container.get("command"):
        count = len(container["command"])
        argv += ["--entrypoint", json.dumps(list(process.argv[:count]))]
        args = list(process.argv[count:])
    elif container.get("args"):
        args = list(process.argv[len(image.entrypoint):])
    return [*argv, container["image"], *args]


def _volume_args(spec: Mapping[str, Any], container: Mapping[str, Any], pod_ctx: Mapping[str, Any],
                 workdir: Path, name: str) -> list[str]:
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    argv: list[str] = []
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        suffix = ":ro" if mount.get("readOnly") else ""
        if "hostPath" in volume:
            argv += ["-v", f"{volume['hostPath']['path']}:{mount['mountPath']}{suffix}"]
            continue
        empty_dir = volume.get("emptyDir")
        assert empty_dir is not None, f"volume {mount['name']}: only emptyDir and hostPath volumes are run here"
        if empty_dir.get("medium") == "Memory":
            size = _quantity_bytes(empty_dir.get("sizeLimit", "64Mi"))
            argv += ["--mount", f"type=tmpfs,destination={mount['mountPath']},tmpfs-size={size},tmpfs-mode=1777"]
            continue
        host = workdir / f"{name}-{mount['name']}"
        host.mkdir()
        host.chmod(0o777)  # what the kubelet makes an emptyDir
        if pod_ctx.get("fsGroup") is not None:
            os.chown(host, -1, pod_ctx["fsGroup"])
            host.chmod(0o2777)
        argv += ["-v", f"{host}:{mount['mountPath']}{suffix}"]
    return argv


def _root_changes(name: str, container: Mapping[str, Any]) -> list[str]:
    """What `podman diff` lists as added, changed or deleted in the container's root filesystem,
    less the runtime's own mount points."""
    report = json.loads(podman("diff", "--format", "json", name).stdout or "{}")
    mount_points = {m["mountPath"] for m in container.get("volumeMounts", [])}
    changed = set(report.get("changed") or []) - RUNTIME_CHANGED
    return sorted((set(report.get("added") or []) - mount_points) | changed | set(report.get("deleted") or []))


def run_pod(pod: Mapping[str, Any], image: ImageConfig, secret_value: Callable[[str, str], Optional[str]],
            workdir: Path, name: str, timeout: float = 600) -> ContainerRun:
    """Run the pod's only container to completion; the container is removed afterwards."""
    (container,) = pod["spec"]["containers"]
    try:
        finished = podman("run", *_run_args(pod, image, secret_value, workdir, name), timeout=timeout, check=False)
        return ContainerRun(name=name, exit_code=finished.returncode, logs=finished.stdout + finished.stderr,
                            root_changes=_root_changes(name, container))
    finally:
        (workdir / f"{name}.env").unlink(missing_ok=True)
        podman("rm", "--force", name, check=False)


@contextlib.contextmanager
def started_pod(pod: Mapping[str, Any], image: ImageConfig, secret_value: Callable[[str, str], Optional[str]],
                workdir: Path, name: str) -> Iterator[Callable[[], ContainerRun]]:
    """Start the pod's only container in the background; yields a function that stops it (as the
    kubelet does: SIGTERM, then SIGKILL after the grace period) and reports how it ended."""
    (container,) = pod["spec"]["containers"]
    podman("run", "--detach", *_run_args(pod, image, secret_value, workdir, name), timeout=120)

    def stop() -> ContainerRun:
        podman("stop", "--time", "10", name, check=False, timeout=60)
        state = json.loads(podman("inspect", name, "--format", "{{json .State}}").stdout)
        logs = podman("logs", name, check=False)
        return ContainerRun(name=name, exit_code=int(state.get("ExitCode", -1)), logs=logs.stdout + logs.stderr,
                            root_changes=_root_changes(name, container))

    try:
        yield stop
    finally:
        (workdir / f"{name}.env").unlink(missing_ok=True)
        podman("rm", "--force", name, check=False)
