"""The node agent: the one part of the end-to-end tests' cluster that is ours. It does a kubelet's
work for the real control plane (tests/harness/controlplane.py), with a node's own credentials
(user system:node:<name>, so the API server's Node authorizer and NodeRestriction admission decide
what it may do, as for a real kubelet):

- registers each Node with its capacity (cpu, memory, pods, nvidia.com/gpu) and a Ready
  condition, and renews the node's Lease in kube-node-lease, so the node-lifecycle controller
  keeps it schedulable;
- watches the pods the real scheduler binds to its nodes (fieldSelector spec.nodeName) and runs
  each: the container's process is made by the rules of tests/harness/container_rules.py (the
  image's ENTRYPOINT/CMD/ENV/WORKDIR/USER read from the Dockerfile, command/args, $(VAR)
  expansion, Secret values read through the API as the kubelet does, runAsNonRoot), started as a
  local process whose environment maps the image's folders onto this test run's virtual
  environment (tests/e2e/test_containers.py runs the same pod specs in podman, unmapped);
- enforces the container's limits as a runtime does, with a cgroup per container (memory limit:
  the kernel's OOM killer ends a process over it, reported OOMKilled; CPU limit: a CFS quota);
- resolves images as a container runtime does: by tag (a tag a test may re-point, as a re-pushed
  tag is), or by digest (`repository@sha256:…`, the content the digest names whatever its tags say
  now; an unknown digest leaves the pod Pending with ErrImagePull); the container's status carries
  the imageID containerd and CRI-O report, `repository@sha256:<digest>`;
- writes pod status as a kubelet does: Running with a running container state, then Succeeded or
  Failed with the container's exit code, reason (Completed, Error, OOMKilled) and termination
  message (the file at terminationMessagePath, or with FallbackToLogsOnError the log's last 80
  lines / 2048 bytes when the file is empty and the container failed);
- honours deletion: a pod given a deletionTimestamp gets SIGTERM, SIGKILL after its grace period,
  a terminated state, and is then deleted with grace period 0 (the kubelet's last word).

What it does as the node's kernel would, on a test's request: kill a pod's process as the OOM
killer does (SIGKILL, reason OOMKilled, exit 137) when a condition holds, or end a pod with a
given state instead of running it (e.g. OOMKilled, or Evicted as node-pressure eviction reports
it). Everything else (which pods exist, when, where, what fails a Job) comes from the real
Job controller and scheduler.

- fills projected volumes as the kubelet does (the service-account token, bound to the pod by a
  TokenRequest the Node authorizer grants, the cluster's CA from kube-root-ca.crt, the namespace),
  and sets KUBERNETES_SERVICE_HOST/PORT, so an operator pod logs in as its ServiceAccount.

What a local process cannot do, it maps, and says so here: each volume is a temporary folder and
paths under a mount path in env values and arguments are rewritten to it, except the token's
folder, which client libraries read at a fixed path: with root and unshare(1) it is bind-mounted
there in a mount namespace of the pod's own (as is /etc/hosts, below); the process runs as this
test's user after the pod's user has passed the non-root check; OMP_NUM_THREADS is the container's
CPU limit; every pod shares the host's loopback network (the S3 server listens there). Cluster DNS
and kube-proxy are stood in for by names in the pod's /etc/hosts (`host_aliases`, e.g. a MinIO
Service's name -> the loopback address the test's MinIO listens on at the Service's port) and, for
the `kubernetes` Service at port 443 (kopf dials https://kubernetes.default.svc), a relay from a
loopback address of this control plane's own to the API server."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import select
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import kubernetes
from kubernetes.client.exceptions import ApiException

from tests.harness.container_rules import (ContainerConfigError, ImageConfig, container_process, field_value,
                                          image_config)
from tests.harness.controlplane import ControlPlane, api_client

REPO = Path(__file__).resolve().parents[2]
RUNNER_IMAGE = "registry.example/disp-runner:test"  # the Dockerfile's runner target, over this venv
OPERATOR_IMAGE = "registry.example/disp-operator:test"  # the Dockerfile's operator target, over this venv
STANDIN_IMAGE = "stand-in"  # the same image with tests/operator/standin_runner.py as its `disp`
IMAGE_BIN = "/opt/disp/bin"  # where the images' venv puts `disp` (the Dockerfile's PATH)
GPU = "nvidia.com/gpu"
# Where client libraries (client-go, the Python client, kopf) read a pod's service-account token,
# whatever the environment says: mounted there, in the process's own mount namespace.
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
HOSTS_FILE = "/etc/hosts"
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
RENEW_SECONDS = 5.0
RELIST_SECONDS = 30.0
CONFIG_RETRY_SECONDS = 1.0  # how soon a pod that could not be configured is tried again  # a full list now and then, as informers resync: a missed event cannot strand a pod
TERMINATION_LOG_LINES, TERMINATION_LOG_BYTES = 80, 2048  # the kubelet's fallback-to-logs limits
KUBELET_VERSION = "v1.36.3-disp-node-agent"


def now() -> datetime:
    return datetime.now(timezone.utc)


def iso(moment: Optional[datetime] = None) -> str:
    return (moment or now()).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    cpu: str = "16"
    memory: str = "64Gi"
    gpus: int = 0
    pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()  # registered with the node, as kubelet's --register-with-taints


@dataclass
class PodFault:
    """Instead of running the container, the node reports this terminated state."""

    exit_code: Optional[int]  # None: the pod failed without a container exit (e.g. Evicted)
    reason: str  # OOMKilled, Error, or a pod reason such as Evicted
    message: str = ""


@dataclass(frozen=True)
class LocalImage:
    """An image as the agent runs it here: its configuration, and the host folders that stand for
    the image's own."""

    config: ImageConfig
    folders: dict[str, Path]  # image path -> host path

    @property
    def digest(self) -> str:
        """What this image is, as a content digest: its configuration and what its folders hold
        (the folders' paths, and the stand-in's `disp` script, which differs from the runner's)."""
        content = [repr(self.config)] + [f"{image_path}={host}" for image_path, host in sorted(self.folders.items())]
        shim = self.folders.get(IMAGE_BIN, Path("/nonexistent")) / "disp"
        if shim.is_file() and shim.stat().st_size < 4096:
            content.append(shim.read_text())
        return "sha256:" + hashlib.sha256("\n".join(content).encode()).hexdigest()


def repository(reference: str) -> str:
    """`registry/name` of `registry/name:tag` or `registry/name@sha256:…` (a registry's port stays)."""
    name = reference.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def local_images(workdir: Path) -> dict[str, LocalImage]:
    """The runner image, the operator image and the stand-in image (the runner image with `disp`
    replaced by a script that runs standin_runner.py with this interpreter)."""
    runner = image_config(REPO / "Dockerfile", "runner")
    operator = image_config(REPO / "Dockerfile", "operator")
    shim_bin = workdir / "standin-image-bin"
    shim_bin.mkdir(parents=True, exist_ok=True)
    shim = shim_bin / "disp"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "
                    f"{REPO / 'tests' / 'operator' / 'standin_runner.py'} \"$@\"\n")
    shim.chmod(0o755)
    return {RUNNER_IMAGE: LocalImage(runner, {IMAGE_BIN: Path(sys.executable).parent}),
            OPERATOR_IMAGE: LocalImage(operator, {IMAGE_BIN: Path(sys.executable).parent}),
            STANDIN_IMAGE: LocalImage(runner, {IMAGE_BIN: shim_bin})}


class _Mounts:
    """Image and volume paths -> host paths, longest prefix first."""

    def __init__(self, folders: dict[str, Path]):
        self._folders = sorted(folders.items(), key=lambda item: -len(item[0]))

    def path(self, value: str) -> str:
        for image_path, host in self._folders:
            if value == image_path or value.startswith(image_path.rstrip("/") + "/"):
                return str(host) + value[len(image_path):]
        return value

    def value(self, value: str) -> str:
        """An env value or argument: a path, or a colon-separated list of paths (PATH)."""
        return ":".join(self.path(part) for part in value.split(":"))


def cpu_threads(container: dict[str, Any]) -> str:
    limit = str(((container.get("resources") or {}).get("limits") or {}).get("cpu", "1"))
    return str(max(1, int(cpu_cores(limit))))


_QUANTITY_SUFFIXES = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20,
                      "Gi": 2**30, "Ti": 2**40}


def quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (e.g. 2Gi, 512M, 1e9) in bytes."""
    for suffix in sorted(_QUANTITY_SUFFIXES, key=len, reverse=True):
        if suffix and value.endswith(suffix):
            return int(float(value[:-len(suffix)]) * _QUANTITY_SUFFIXES[suffix])
    return int(float(value))


def cpu_cores(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


class ContainerCgroup:
    """The container's limits, enforced by the kernel as a container runtime does it: a cgroup
    (v1, the memory and cpu controllers) per container, with memory.limit_in_bytes from
    limits.memory (the kernel's OOM killer ends a process that goes over: exit 137, and
    memory.oom_control counts the kill) and a CFS quota from limits.cpu. Where this process may
    not make cgroups (not root, no v1 controllers) the limits are not enforced."""

    ROOTS = {"memory": Path("/sys/fs/cgroup/memory"), "cpu": Path("/sys/fs/cgroup/cpu")}

    def __init__(self, name: str, limits: dict[str, Any]):
        self.paths: dict[str, Path] = {}
        for controller, root in self.ROOTS.items():
            if not os.access(root, os.W_OK):
                continue
            path = root / "disp-node-agent" / name
            path.mkdir(parents=True, exist_ok=True)
            self.paths[controller] = path
        if "memory" in self.paths and limits.get("memory"):
            (self.paths["memory"] / "memory.limit_in_bytes").write_text(str(quantity_bytes(str(limits["memory"]))))
        if "cpu" in self.paths and limits.get("cpu"):
            period = 100_000
            (self.paths["cpu"] / "cpu.cfs_period_us").write_text(str(period))
            (self.paths["cpu"] / "cpu.cfs_quota_us").write_text(str(max(1000, int(cpu_cores(str(limits["cpu"])) * period))))

    @property
    def enforced(self) -> bool:
        return "memory" in self.paths

    def wrap(self, argv: list[str]) -> list[str]:
        """argv run inside the cgroups from its first instruction: a shell joins them, then execs."""
        if not self.paths:
            return argv
        joins = " && ".join(f"echo $$ > {path / 'cgroup.procs'}" for path in self.paths.values())
        return ["/bin/sh", "-c", f'{joins} && exec "$@"', "container", *argv]

    def oom_killed(self) -> bool:
        if "memory" not in self.paths:
            return False
        for line in (self.paths["memory"] / "memory.oom_control").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value) > 0
        return False

    def remove(self) -> None:
        for path in self.paths.values():
            for _ in range(50):  # the kernel empties a cgroup shortly after its last process exits
                try:
                    path.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


def fallback_message(log: str) -> str:
    """The kubelet's FallbackToLogsOnError message: the log's last 80 lines, at most 2048 bytes."""
    tail = "\n".join(log.splitlines()[-TERMINATION_LOG_LINES:])
    return tail.encode()[-TERMINATION_LOG_BYTES:].decode(errors="ignore")


@dataclass
class _RunningPod:
    uid: str
    stop: threading.Event = field(default_factory=threading.Event)
    grace: float = 30.0
    done: threading.Event = field(default_factory=threading.Event)


class NodeAgent:
    """Runs the nodes in `nodes`; `close()` stops every pod and the agent's threads."""

    def __init__(self, plane: ControlPlane, workdir: Path, nodes: tuple[NodeSpec, ...] = (NodeSpec("node-0"),)):
        self.plane = plane
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.nodes = nodes
        self.images = local_images(workdir)  # by tag; tag() re-points one
        self._by_digest: dict[str, LocalImage] = {image.digest: image for image in self.images.values()}
        # Test hooks, by Job name (the pod's batch.kubernetes.io/job-name label): its first pod...
        self.faults: dict[str, PodFault] = {}  # ...ends with this state instead of running
        self.kill_when: dict[str, Callable[[], bool]] = {}  # ...is OOM-killed as soon as this holds
        # Added to every container's environment: runner settings a test tunes for speed (as a
        # cluster's admission webhook or a team's image might set them), never Kubernetes' own.
        self.extra_env: dict[str, str] = {}
        # name -> address, in every pod's /etc/hosts: what cluster DNS and kube-proxy give a pod for
        # a Service (e.g. minio.minio.svc -> the loopback address a test's MinIO listens on).
        self.host_aliases: dict[str, str] = {}
        # The `kubernetes` Service by name, at port 443 as in a cluster (kopf's in-cluster login
        # dials https://kubernetes.default.svc): a loopback address of this control plane's own,
        # relayed to the API server. Needs root (port 443); without it, pods use the variables only.
        # Resolved so in the pods that mount a service-account token (the others have no business there).
        self._proxies: list[ServiceProxy] = []
        self._api_aliases: dict[str, str] = {}
        if os.geteuid() == 0:
            address = f"127.1.{plane.port // 256}.{plane.port % 256}"
            self._proxies.append(ServiceProxy(address, 443, ("127.0.0.1", plane.port)))
            self._api_aliases = {name: address for name in ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                                                             "kubernetes.default.svc.cluster.local")}
        # (namespace, Job name) of each Job whose first pod started, in order; of each pod stopped
        # by its deletion; (namespace, pod, argv as the image sees it) of each process started.
        self.started: list[tuple[str, str]] = []
        self.killed: list[tuple[str, str]] = []
        self.processes: list[tuple[str, str, tuple[str, ...]]] = []
        self.pod_logs: dict[tuple[str, str], list[Path]] = {}  # (namespace, Job name) -> its pods' logs
        self.errors: list[str] = []  # what went wrong in the agent itself (a test fails on any)
        self._lock = threading.Lock()
        self._pods: dict[str, _RunningPod] = {}  # by pod uid, while the agent runs them
        self._finished: set[str] = set()  # uids of pods that ended here (a late event must not rerun one)
        self._stop = threading.Event()
        self._clients = {node.name: api_client(plane.client_kubeconfig(
            f"node-{node.name}", f"system:node:{node.name}", ("system:nodes",))) for node in nodes}
        self._threads: list[threading.Thread] = []
        for node in nodes:
            self._register(node)
            for target, name in ((self._heartbeat, "heartbeat"), (self._watch_pods, "pods")):
                thread = threading.Thread(target=target, args=(node,), name=f"{name}-{node.name}", daemon=True)
                thread.start()
                self._threads.append(thread)

    @property
    def standin_seconds(self) -> float:
        return float(self.extra_env.get("STANDIN_SECONDS", "0.5"))

    @standin_seconds.setter
    def standin_seconds(self, seconds: float) -> None:
        """How long each stand-in runner pod works (tests/operator/standin_runner.py reads it)."""
        self.extra_env["STANDIN_SECONDS"] = str(seconds)

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            running = list(self._pods.values())
        for pod in running:
            pod.grace = 0
            pod.stop.set()
        for pod in running:
            pod.done.wait(30)
        for thread in self._threads:
            thread.join(10)
        for client in self._clients.values():
            client.close()
        for proxy in self._proxies:
            proxy.close()

    # --- the node object and its lease ------------------------------------------------------------
    def _register(self, node: NodeSpec) -> None:
        core = kubernetes.client.CoreV1Api(self._clients[node.name])
        capacity = {"cpu": node.cpu, "memory": node.memory, "pods": str(node.pods), "ephemeral-storage": "100Gi"}
        if node.gpus:
            capacity[GPU] = str(node.gpus)
        body = {"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name,
                                                           "kubernetes.io/os": "linux",
                                                           "kubernetes.io/arch": "amd64", **node.labels}},
                "spec": {"taints": [dict(t) for t in node.taints]}}
        try:
            core.create_node(body)
        except ApiException as exc:
            if exc.status != 409:
                raise
        core.patch_node_status(node.name, {"status": {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": node.name}],
            "conditions": self._conditions(),
            "nodeInfo": {"kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": "", "operatingSystem": "linux",
                         "architecture": "amd64", "containerRuntimeVersion": "local-process://1",
                         "kernelVersion": os.uname().release, "osImage": "disp test node",
                         "machineID": "", "systemUUID": "", "bootID": ""}}})

    @staticmethod
    def _conditions() -> list[dict[str, Any]]:
        stamp = iso()
        healthy = [("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                   ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                   ("PIDPressure", "False", "KubeletHasSufficientPID"),
                   ("Ready", "True", "KubeletReady")]
        return [{"type": kind, "status": status, "reason": reason, "message": reason,
                 "lastHeartbeatTime": stamp, "lastTransitionTime": stamp} for kind, status, reason in healthy]

    def _heartbeat(self, node: NodeSpec) -> None:
        coordination = kubernetes.client.CoordinationV1Api(self._clients[node.name])
        core = kubernetes.client.CoreV1Api(self._clients[node.name])
        last_status = time.monotonic()
        wait = 0.0  # the first lease at once, then one every RENEW_SECONDS
        while not self._stop.wait(wait):
            wait = RENEW_SECONDS
            lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                     "metadata": {"name": node.name, "namespace": LEASE_NAMESPACE},
                     "spec": {"holderIdentity": node.name, "leaseDurationSeconds": LEASE_SECONDS,
                              "renewTime": now().isoformat(timespec="microseconds").replace("+00:00", "Z")}}
            try:
                try:
                    coordination.patch_namespaced_lease(node.name, LEASE_NAMESPACE, {"spec": lease["spec"]})
                except ApiException as exc:
                    if exc.status != 404:
                        raise
                    coordination.create_namespaced_lease(LEASE_NAMESPACE, lease)
                if time.monotonic() - last_status > 60:
                    core.patch_node_status(node.name, {"status": {"conditions": self._conditions()}})
                    last_status = time.monotonic()
            except Exception:  # noqa: BLE001 - the API server is going away at the end of a session
                if self._stop.is_set():
                    return

    # --- pods -------------------------------------------------------------------------------------
    def _watch_pods(self, node: NodeSpec) -> None:
        core = kubernetes.client.CoreV1Api(self._clients[node.name])
        selector = f"spec.nodeName={node.name}"
        resource_version = ""
        listed_at = 0.0
        while not self._stop.is_set():
            try:
                if not resource_version or time.monotonic() - listed_at > RELIST_SECONDS:
                    listed_at = time.monotonic()
                    listing = core.list_pod_for_all_namespaces(field_selector=selector)
                    resource_version = listing.metadata.resource_version
                    for pod in listing.items:
                        self._seen(node, core.api_client.sanitize_for_serialization(pod))
                stream = kubernetes.watch.Watch().stream(core.list_pod_for_all_namespaces, field_selector=selector,
                                                         resource_version=resource_version, timeout_seconds=5,
                                                         allow_watch_bookmarks=True)
                for event in stream:
                    raw = event["raw_object"]
                    if event["type"] == "ERROR":  # e.g. 410 Gone as an event: the window moved on, list again
                        resource_version = ""
                        break
                    resource_version = raw["metadata"].get("resourceVersion", resource_version)
                    if event["type"] in ("ADDED", "MODIFIED"):
                        self._seen(node, raw)
                    if self._stop.is_set():
                        break
            except ApiException as exc:
                if exc.status == 410:  # the watch window moved on: list again
                    resource_version = ""
                    continue
                if self._stop.is_set():
                    return
                time.sleep(0.5)
            except Exception as exc:  # noqa: BLE001 - a dropped stream: watch again from where it was
                if self._stop.is_set():
                    return
                if not isinstance(exc, (OSError, ValueError)) and "ProtocolError" not in type(exc).__name__:
                    with self._lock:
                        self.errors.append(f"watch of {node.name}: {traceback.format_exc()}")
                time.sleep(0.5)

    def _seen(self, node: NodeSpec, pod: dict[str, Any]) -> None:
        uid = pod["metadata"]["uid"]
        deleting = pod["metadata"].get("deletionTimestamp")
        with self._lock:
            running = self._pods.get(uid)
            if running is None:
                if uid in self._finished or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
                    if deleting:  # ended here earlier; the kubelet confirms the deletion
                        self._delete_now(node, pod)
                    return
                running = _RunningPod(uid)
                self._pods[uid] = running
                if deleting:
                    running.stop.set()
                threading.Thread(target=self._run_pod, args=(node, pod, running), name=f"pod-{uid[:8]}",
                                 daemon=True).start()
                return
        if deleting and not running.stop.is_set():
            running.grace = float(pod["metadata"].get("deletionGracePeriodSeconds") or 0)
            running.stop.set()

    def _delete_now(self, node: NodeSpec, pod: dict[str, Any]) -> None:
        meta = pod["metadata"]
        core = kubernetes.client.CoreV1Api(self._clients[node.name])
        try:
            core.delete_namespaced_pod(meta["name"], meta["namespace"], grace_period_seconds=0,
                                       body=kubernetes.client.V1DeleteOptions(
                                           grace_period_seconds=0,
                                           preconditions=kubernetes.client.V1Preconditions(uid=meta["uid"])))
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def _patch_status(self, node: NodeSpec, pod: dict[str, Any], status: dict[str, Any]) -> None:
        core = kubernetes.client.CoreV1Api(self._clients[node.name])
        meta = pod["metadata"]
        try:
            core.patch_namespaced_pod_status(meta["name"], meta["namespace"], {"status": status})
        except ApiException as exc:
            if exc.status != 404:  # gone already: nothing to report to
                raise

    def _run_pod(self, node: NodeSpec, pod: dict[str, Any], running: _RunningPod) -> None:
        try:
            self._run_pod_inner(node, pod, running)
        except Exception:  # noqa: BLE001 - a kubelet keeps going; the tests see it in `errors`
            with self._lock:
                self.errors.append(f"pod {pod['metadata']['namespace']}/{pod['metadata']['name']}:\n"
                                   f"{traceback.format_exc()}")
        finally:
            running.done.set()

    def _run_pod_inner(self, node: NodeSpec, pod: dict[str, Any], running: _RunningPod) -> None:
        meta = pod["metadata"]
        job_name = (meta.get("labels") or {}).get("batch.kubernetes.io/job-name", meta["name"])
        container = pod["spec"]["containers"][0]
        started_at = iso()
        if running.stop.is_set():  # deleted before it ever ran
            self._finish(node, pod, container, None, "", "", started_at, deleted=True)
            return
        namespace = meta["namespace"]
        fault = self.faults.pop(job_name, None)
        kill_when = self.kill_when.pop(job_name, None)
        with self._lock:
            if (namespace, job_name) not in self.started:
                self.started.append((namespace, job_name))
        try:
            _, image_id = self.resolve(container["image"])
        except ContainerConfigError:
            image_id = ""  # _prepare reports it, and the pod waits
        if fault is not None:
            self._running(node, pod, container, started_at, image_id)
            self._finish(node, pod, container, fault.exit_code, fault.reason, fault.message, started_at,
                         image_id=image_id)
            return
        while True:
            try:
                image, image_id = self.resolve(container["image"])  # the tag as it points now
                prepared = self._prepare(pod, container, image)
                break
            except ContainerConfigError as exc:
                # The kubelet leaves such a pod Pending with this waiting reason and tries again on
                # its next sync (a Secret created later, or one the Node authorizer's graph does
                # not relate to this node yet, right after the pod was bound).
                self._patch_status(node, pod, {"phase": "Pending", "containerStatuses": [{
                    "name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                    "restartCount": 0, "state": {"waiting": {"reason": exc.reason, "message": str(exc)}}}]})
                if running.stop.wait(CONFIG_RETRY_SECONDS):
                    self._finish(node, pod, container, None, "", "", started_at, deleted=True)
                    return
        if prepared is None:  # no such executable in the image: the runtime could not start it
            self._running(node, pod, container, started_at, image_id)
            self._finish(node, pod, container, 128, "StartError",
                         f'exec: "{self._argv0(container)}": executable file not found in $PATH', started_at,
                         image_id=image_id)
            return
        argv, env, cwd, scratch, termination_log = prepared
        cgroup = ContainerCgroup(meta["uid"], (container.get("resources") or {}).get("limits") or {})
        self._running(node, pod, container, started_at, image_id)
        log = scratch / "container.log"
        with log.open("wb") as out:
            child = subprocess.Popen(cgroup.wrap(argv), env=env, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
            oom_killed = False
            while child.poll() is None:
                if kill_when is not None and kill_when():
                    _signal_group(child, signal.SIGKILL)  # the kernel's OOM killer: no last word
                    oom_killed = True
                    break
                if running.stop.wait(0.02 if kill_when else 0.1):
                    self._terminate(child, running.grace)
                    break
            child.wait()
        text = log.read_text(errors="replace")
        (self.workdir / "logs").mkdir(exist_ok=True)
        kept = self.workdir / "logs" / f"{namespace}-{meta['name']}.log"
        shutil.copy(log, kept)
        with self._lock:
            self.pod_logs.setdefault((namespace, job_name), []).append(kept)
        code = child.returncode if child.returncode >= 0 else 128 - child.returncode  # -9 -> 137
        oom_killed = oom_killed or (code == 137 and cgroup.oom_killed())
        cgroup.remove()
        if oom_killed:
            reason, message = "OOMKilled", ""
        else:
            reason = "Completed" if code == 0 else "Error"
            message = termination_log.read_text(errors="replace") if termination_log.exists() else ""
            if not message and code != 0 and container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
                message = fallback_message(text)
        deleted = running.stop.is_set() and not oom_killed
        if deleted:
            with self._lock:
                self.killed.append((namespace, job_name))
        self._finish(node, pod, container, code, reason, message, started_at, deleted=deleted, image_id=image_id)
        shutil.rmtree(scratch, ignore_errors=True)

    def _terminate(self, child: subprocess.Popen, grace: float) -> None:
        _signal_group(child, signal.SIGTERM)
        try:
            child.wait(max(grace, 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(child, signal.SIGKILL)

    @staticmethod
    def _argv0(container: dict[str, Any]) -> str:
        return (container.get("command") or ["?"])[0]

    def _secret_value(self, namespace: str, node_client: kubernetes.client.ApiClient, pod_node: str):
        core = kubernetes.client.CoreV1Api(node_client)

        def value(name: str, key: str) -> Optional[str]:
            try:
                secret = core.read_namespaced_secret(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status == 403:  # the Node authorizer relates no pod of this node to it (yet)
                    raise ContainerConfigError(f'secret "{name}" is forbidden to node {pod_node}') from None
                raise
            data = secret.data or {}
            return base64.b64decode(data[key]).decode() if key in data else None
        return value

    def tag(self, reference: str, image: LocalImage) -> None:
        """Point the tag `reference` at `image` (as pushing to a tag does); the image it named before
        stays reachable by its digest."""
        with self._lock:
            self.images[reference] = image
            self._by_digest[image.digest] = image

    def resolve(self, reference: str) -> tuple[LocalImage, str]:
        """(the image, the imageID reported for it) of a container's `image`, by tag or digest;
        ContainerConfigError (reported as ErrImagePull) when this node has no such image."""
        with self._lock:
            if "@" in reference:
                image = self._by_digest.get(reference.split("@", 1)[1])
                known = any(repository(tag) == repository(reference) for tag in self.images)
                image = image if known else None
            else:
                image = self.images.get(reference)
        if image is None:
            raise ContainerConfigError(f"image {reference!r} is not on this node (known: {', '.join(self.images)})",
                                       reason="ErrImagePull")
        return image, f"{repository(reference)}@{image.digest}"

    def _prepare(self, pod: dict[str, Any], container: dict[str, Any], image: LocalImage):
        """(argv, env, cwd, scratch folder, termination-log host path), or None when the image
        has no such executable. Raises ContainerConfigError as the kubelet would report it."""
        namespace = pod["metadata"]["namespace"]
        node_client = self._clients[pod["spec"]["nodeName"]]
        process = container_process(image.config, pod, container,
                                    self._secret_value(namespace, node_client, pod["spec"]["nodeName"]))
        scratch = Path(tempfile.mkdtemp(prefix="pod-", dir=self.workdir))
        volumes = {mount["mountPath"]: scratch / mount["name"] for mount in container.get("volumeMounts", [])}
        for host in volumes.values():
            host.mkdir(exist_ok=True)
        pod_volumes = {volume["name"]: volume for volume in pod["spec"].get("volumes") or []}
        for mount in container.get("volumeMounts", []):
            volume = pod_volumes.get(mount["name"], {})
            if "projected" in volume:
                try:
                    self._fill_projected(pod, volume, volumes[mount["mountPath"]], node_client)
                except ContainerConfigError:
                    shutil.rmtree(scratch, ignore_errors=True)
                    raise
        # What a path cannot be rewritten for (read at a fixed path by libraries, not named in the
        # environment or arguments) is bind-mounted in the process's own mount namespace.
        binds = [(volumes[path], path) for path in volumes if path == SERVICE_ACCOUNT_PATH]
        aliases = {**self.host_aliases, **(self._api_aliases if binds else {})}
        if aliases:
            hosts = scratch / "hosts"
            hosts.write_text(Path(HOSTS_FILE).read_text() + "".join(
                f"{address} {name}\n" for name, address in sorted(aliases.items())))
            binds.append((hosts, HOSTS_FILE))
        termination_path = container.get("terminationMessagePath") or "/dev/termination-log"
        termination_log = scratch / "termination-log"
        termination_log.touch()
        mounts = _Mounts({**volumes, **image.folders, termination_path: termination_log})
        env = {name: mounts.value(value) for name, value in process.env.items()}
        env["OMP_NUM_THREADS"] = cpu_threads(container)
        # The kubelet's variables for the `kubernetes` Service, at the address kube-proxy would
        # route its ClusterIP to: the API server on this host's loopback.
        env["KUBERNETES_SERVICE_HOST"], env["KUBERNETES_SERVICE_PORT"] = "127.0.0.1", str(self.plane.port)
        env.update(self.extra_env)
        with self._lock:
            self.processes.append((namespace, pod["metadata"]["name"], process.argv))
        argv = [mounts.value(a) for a in process.argv]
        if "/" not in argv[0]:
            found = shutil.which(argv[0], path=env.get("PATH", ""))
            if found is None:
                shutil.rmtree(scratch, ignore_errors=True)
                return None
            argv[0] = found
        return bind_mounted(binds, argv), env, mounts.path(process.workdir), scratch, termination_log

    def _fill_projected(self, pod: dict[str, Any], volume: dict[str, Any], host: Path,
                        node_client: kubernetes.client.ApiClient) -> None:
        """A projected volume's files as the kubelet writes them (the API server's ServiceAccount
        admission gives every pod that mounts its token one): a service-account token bound to the
        pod (TokenRequest, which the Node authorizer grants a node for the pods bound to it), the
        keys of a ConfigMap (kube-root-ca.crt: the cluster's CA) and downward-API fields."""
        core = kubernetes.client.CoreV1Api(node_client)
        meta = pod["metadata"]
        for source in volume["projected"].get("sources") or []:
            if "serviceAccountToken" in source:
                request = source["serviceAccountToken"]
                spec = {"expirationSeconds": request.get("expirationSeconds", 3600),
                        "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}
                if request.get("audience"):
                    spec["audiences"] = [request["audience"]]
                account = pod["spec"].get("serviceAccountName") or "default"
                try:
                    token = core.create_namespaced_service_account_token(account, meta["namespace"], {
                        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
                except ApiException as exc:
                    raise ContainerConfigError(f"token for service account {account!r}: {exc.status} {exc.reason}") from None
                (host / request["path"]).write_text(token.status.token)
            elif "configMap" in source:
                ref = source["configMap"]
                try:
                    data = core.read_namespaced_config_map(ref["name"], meta["namespace"]).data or {}
                except ApiException as exc:
                    if exc.status == 404 and ref.get("optional"):
                        continue
                    raise ContainerConfigError(f'configmap "{ref["name"]}": {exc.status} {exc.reason}') from None
                for item in ref.get("items") or [{"key": key, "path": key} for key in data]:
                    (host / item["path"]).write_text(data[item["key"]])
            elif "downwardAPI" in source:
                for item in source["downwardAPI"].get("items") or []:
                    (host / item["path"]).write_text(field_value(pod, item["fieldRef"]["fieldPath"]))
            else:
                raise ContainerConfigError(f"volume {volume['name']}: unsupported projected source {sorted(source)}")

    def _running(self, node: NodeSpec, pod: dict[str, Any], container: dict[str, Any], started_at: str,
                 image_id: str) -> None:
        self._patch_status(node, pod, {
            "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
            "startTime": started_at,
            "conditions": [{"type": kind, "status": "True", "lastTransitionTime": started_at}
                           for kind in ("Initialized", "ContainersReady", "Ready")],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": image_id,
                                   "ready": True, "started": True, "restartCount": 0,
                                   "state": {"running": {"startedAt": started_at}}}]})

    def _finish(self, node: NodeSpec, pod: dict[str, Any], container: dict[str, Any], exit_code: Optional[int],
                reason: str, message: str, started_at: str, deleted: bool = False, image_id: str = "") -> None:
        finished_at = iso()
        if deleted and exit_code is None:
            exit_code, reason = 137, "ContainerStatusUnknown"
        status: dict[str, Any] = {"phase": "Succeeded" if exit_code == 0 and not deleted else "Failed",
                                  "conditions": [{"type": kind, "status": "False", "reason": "PodCompleted",
                                                  "lastTransitionTime": finished_at}
                                                 for kind in ("ContainersReady", "Ready")]}
        if exit_code is None:  # e.g. evicted: the pod failed without a container exit
            status.update(reason=reason, message=message)
            status["conditions"].append({"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet",
                                         "message": message, "lastTransitionTime": finished_at})
        else:
            terminated = {"exitCode": exit_code, "reason": reason, "startedAt": started_at, "finishedAt": finished_at}
            if message:
                terminated["message"] = message
            status["containerStatuses"] = [{"name": container["name"], "image": container["image"], "imageID": image_id,
                                            "ready": False, "started": False, "restartCount": 0,
                                            "state": {"terminated": terminated}}]
        self._patch_status(node, pod, status)
        with self._lock:
            self._pods.pop(pod["metadata"]["uid"], None)
            self._finished.add(pod["metadata"]["uid"])
        if deleted:
            self._delete_now(node, pod)


class ServiceProxy:
    """What kube-proxy does for one Service port: each connection to `address:port` is relayed to
    the Service's endpoint, byte for byte (TLS passes through untouched)."""

    def __init__(self, address: str, port: int, endpoint: tuple[str, int]):
        self.address, self.port, self.endpoint = address, port, endpoint
        self._listener = socket.create_server((address, port))
        self._listener.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name=f"proxy-{address}:{port}", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.endpoint, timeout=10)
        except OSError:
            client.close()
            return
        with client, upstream:
            upstream.settimeout(None)
            sockets = [client, upstream]
            try:
                while not self._stop.is_set():
                    readable, _, _ = select.select(sockets, [], [], 0.5)
                    for source in readable:
                        data = source.recv(65536)
                        if not data:
                            return
                        (upstream if source is client else client).sendall(data)
            except OSError:  # reset by either side: that connection ends, as it would through kube-proxy
                return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)


def bind_mounted(binds: list[tuple[Path, str]], argv: list[str]) -> list[str]:
    """argv run in a mount namespace of its own where each host path is bind-mounted at its path
    (the mount point made on the host when missing: an empty folder or file, which nothing else
    sees filled). Needs root and unshare(1); without them, or with nothing to bind, argv as is."""
    if not binds or os.geteuid() != 0 or shutil.which("unshare") is None:
        return argv
    steps = []
    for host, path in binds:
        target = Path(path)
        if host.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()
        steps.append(f"mount --bind {shlex.quote(str(host))} {shlex.quote(path)}")
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            " && ".join(steps) + ' && exec "$@"', "container", *argv]


def _signal_group(child: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(child.pid, sig)
    except ProcessLookupError:
        pass
