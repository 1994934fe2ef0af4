"""A Kubernetes stand-in for end-to-end tests of the operator (no cluster can run here):

- `EmulatedCluster`: kmock's KubernetesEmulator (an in-memory API server over real HTTP) on its
  own event loop in a background thread, and a kubeconfig pointing at it, so the real operator
  (under kopf.testing.KopfRunner) and the tests talk to it through real clients.
- `Kubelet`: plays the Job controller and the kubelet: for every Job it creates the pods (one per
  index for Indexed Jobs, with the index annotation and JOB_COMPLETION_INDEX env the Job controller
  adds), makes each container's process by the rules in container_rules.py (the image's
  ENTRYPOINT/CMD/ENV/WORKDIR/USER read from the Dockerfile's `runner` target, overridden by
  command/args, $(VAR) expansion, secretKeyRef from the emulator's Secrets, runAsNonRoot), runs it
  as a local subprocess, then writes the pods' terminated state and the Job's conditions. A Job
  deleted while its pods run gets them killed. It can also inject kubelet-level faults
  (OOM kill, eviction) into chosen pods, kill a running pod (SIGKILL, reported as OOMKilled, as the
  kernel's OOM killer does) once a condition holds, or leave a Job's pods Pending with the
  scheduler's PodScheduled=False/Unschedulable condition. Like the Job controller, it starts no pod
  of a suspended Job until the Job is unsuspended (what Kueue does when it admits one).

  What a local subprocess cannot do, it maps, and says so here: the image's folders (/opt/disp/bin,
  the venv on the image's PATH) are this test run's venv; each volume mount is a temporary folder,
  and paths under a mount path in env values and arguments are rewritten to it; the process runs
  as this test's user, not the pod's (the venv's interpreter is not readable by another user on
  these machines), after the pod's user has passed the kubelet's non-root check; OMP_NUM_THREADS is
  the container's CPU limit, which a node's CPU quota would enforce. tests/containers runs the
  same pods in a real container runtime, where none of this is mapped."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import kmock
import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

from tests.operator.container_rules import (ContainerConfigError, ImageConfig, container_process, image_config,
                                            indexed_pod_template)

RESOURCES = {
    # path: (kind, namespaced, subresources)
    "disp.dev/v1alpha1/purificationjobs": ("PurificationJob", True, {"status"}),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/services": ("Service", True, set()),
    "v1/events": ("Event", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
GROUP, VERSION, PLURAL = "disp.dev", "v1alpha1", "purificationjobs"
REPO = Path(__file__).resolve().parents[2]
RUNNER_IMAGE = "registry.example/disp-runner:test"  # the Dockerfile's runner target, over this venv
STANDIN_IMAGE = "stand-in"  # the same image with tests/operator/standin_runner.py as its `disp`
IMAGE_BIN = "/opt/disp/bin"  # where the images' venv puts `disp` (the Dockerfile's PATH)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditRecord:
    """One API call as an audit log (and RBAC) sees it."""

    verb: str  # get, list, watch, create, patch, update, delete
    resource: str  # group/version/plural, e.g. batch/v1/jobs
    subresource: str  # e.g. status, or ""
    namespace: str
    agent: str  # the client's User-Agent: kopf/..., disp-operator, or the tests' own client


_VERBS = {kmock.action.LIST: "list", kmock.action.WATCH: "watch", kmock.action.FETCH: "get",
          kmock.action.CREATE: "create", kmock.action.DELETE: "delete"}


class _ApiServer(kmock.KubernetesEmulator):
    """The emulator plus what the real API server does on create and kopf relies on: names from
    metadata.generateName (kopf posts its Events that way). It keeps a light audit log of the
    calls instead of kmock's full request history: kmock matches every request against the whole
    history, which makes a long test (hundreds of jobs) quadratic."""

    audit: list[AuditRecord]

    async def _handle(self, request):
        if not hasattr(self, "audit"):
            self.audit = []
        # API discovery (/apis/<group>/<version>) has no resource and needs no RBAC rule.
        if request.resource is not None and request.resource.plural and request.action is not None:
            resource = request.resource
            self.audit.append(AuditRecord(
                verb=_VERBS[request.action] if request.action != kmock.action.UPDATE else
                ("patch" if request.method == kmock.method.PATCH else "update"),
                resource=f"{resource.group}/{resource.version}/{resource.plural}".lstrip("/"),
                subresource=request.subresource or "", namespace=request.namespace or "",
                agent=request.headers.get("User-Agent", "")))
        del self._requests[:-1]  # the current request must stay: it is matched by identity
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + os.urandom(4).hex()
        return await super()._handle(request)


class EmulatedCluster:
    def __init__(self, workdir: Path):
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), name="kmock", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the Kubernetes emulator did not start")
        self.kubeconfig = workdir / "kubeconfig"
        self.kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
            "clusters": [{"name": "emulator", "cluster": {"server": self.url, "insecure-skip-tls-verify": True}}],
            "users": [{"name": "operator", "user": {"token": "emulator-token"}}],
            "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator"}}],
        }))
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=config)
        self.client = kubernetes.client.ApiClient(config)
        self.batch = kubernetes.client.BatchV1Api(self.client)
        self.core = kubernetes.client.CoreV1Api(self.client)
        self.custom = kubernetes.client.CustomObjectsApi(self.client)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        async with _ApiServer() as emulator, kmock.Server(emulator):
            for path, (kind, namespaced, subresources) in RESOURCES.items():
                emulator.resources[path] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS,
                                                              subresources=subresources)
            self.emulator = emulator
            self.url = str(emulator.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        self.client.close()

    # --- what the tests do, as kubectl would ---------------------------------------------------
    def apply_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        self.core.create_namespaced_secret(namespace, {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}})

    def create_job(self, manifest: dict[str, Any], uid: str) -> None:
        """What the API server adds on create: uid, generation, resourceVersion, creationTimestamp."""
        body = {**manifest, "metadata": {**manifest["metadata"], "uid": uid, "generation": 1,
                                         "resourceVersion": "1", "creationTimestamp": now_iso()}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, body["metadata"]["namespace"], PLURAL, body)

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> None:
        # The API server bumps generation on spec changes; the emulator does not, so the test does.
        current = self.get(namespace, name)
        generation = int(current["metadata"].get("generation", 1)) + 1
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {
            "metadata": {"generation": generation}, "spec": {"policy": {"suspend": suspend}}})

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def jobs(self, namespace: str) -> list[dict[str, Any]]:
        return [self.client.sanitize_for_serialization(j) for j in self.batch.list_namespaced_job(namespace).items]

    def events(self, namespace: str) -> list[dict[str, Any]]:
        return [self.client.sanitize_for_serialization(e) for e in self.core.list_namespaced_event(namespace).items]

    def wait_for(self, namespace: str, name: str, predicate, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        body: dict[str, Any] = {}
        while time.monotonic() < deadline:
            body = self.get(namespace, name)
            if predicate(body):
                return body
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; status: {body.get('status')}")


@dataclass
class PodFault:
    """Instead of running the container, the kubelet reports this terminated state."""

    exit_code: Optional[int]
    reason: str  # OOMKilled, Error, or a pod reason such as Evicted
    message: str = ""


@dataclass(frozen=True)
class LocalImage:
    """An image as the kubelet stand-in runs it here: its configuration, and the host folders that
    stand for the image's own."""

    config: ImageConfig
    folders: dict[str, Path]  # image path -> host path


def local_images(workdir: Path) -> dict[str, LocalImage]:
    """The runner image and the stand-in image (the runner image with `disp` replaced by a script
    that runs standin_runner.py with this interpreter)."""
    runner = image_config(REPO / "Dockerfile", "runner")
    shim_bin = workdir / "standin-image-bin"
    shim_bin.mkdir(exist_ok=True)
    shim = shim_bin / "disp"
    shim.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "
                    f"{Path(__file__).with_name('standin_runner.py')} \"$@\"\n")
    shim.chmod(0o755)
    return {RUNNER_IMAGE: LocalImage(runner, {IMAGE_BIN: Path(sys.executable).parent}),
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


def _cpu_threads(container: dict[str, Any]) -> str:
    limit = str(container.get("resources", {}).get("limits", {}).get("cpu", "1"))
    cores = float(limit[:-1]) / 1000 if limit.endswith("m") else float(limit)
    return str(max(1, int(cores)))


@dataclass
class Kubelet:
    cluster: EmulatedCluster
    workdir: Path
    faults: dict[str, PodFault] = field(default_factory=dict)  # by Job name: its first pod ends so
    # By Job name: its first pod is OOM-killed as soon as the condition holds (checked while it runs).
    kill_when: dict[str, Callable[[], bool]] = field(default_factory=dict)
    # By Job name: its pods stay Pending with the scheduler's PodScheduled=False/Unschedulable and this message.
    unschedulable: dict[str, str] = field(default_factory=dict)
    # Added to every container's environment: runner settings a test tunes for speed (as a
    # cluster's admission webhook or a team's image might set them), never Kubernetes' own.
    extra_env: dict[str, str] = field(default_factory=dict)
    standin_seconds: float = 0.5  # how long each stand-in runner pod works
    started: list[str] = field(default_factory=list)  # Job names, in the order they were picked up
    killed: list[str] = field(default_factory=list)
    processes: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)  # (pod, argv as the image sees it)

    def __post_init__(self) -> None:
        self.images = local_images(self.workdir)
        self._stop = threading.Event()
        self._seen: set[tuple[str, str, str]] = set()
        self._thread = threading.Thread(target=self._loop, name="kubelet", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                jobs = self.cluster.batch.list_job_for_all_namespaces().items
            except Exception:  # noqa: BLE001 - the emulator is going away
                return
            for job in jobs:
                key = (job.metadata.namespace, job.metadata.name, job.metadata.uid or job.metadata.name)
                if key in self._seen or job.spec.suspend:
                    continue  # the Job controller starts no pod for a suspended Job (Kueue unsuspends it)
                self._seen.add(key)
                self.started.append(job.metadata.name)
                raw = self.cluster.client.sanitize_for_serialization(job)
                threading.Thread(target=self._run_job, args=(raw,), daemon=True).start()
            time.sleep(0.1)

    def _exists(self, namespace: str, name: str) -> bool:
        try:
            self.cluster.batch.read_namespaced_job(name, namespace)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def _run_job(self, job: dict[str, Any]) -> None:
        meta, spec = job["metadata"], job["spec"]
        namespace, name = meta["namespace"], meta["name"]
        indexed = spec.get("completionMode") == "Indexed"
        indexes = list(range(spec.get("completions") or 1)) if indexed else [None]
        self.cluster.batch.patch_namespaced_job_status(name, namespace, {"status": {
            "active": len(indexes), "startTime": now_iso()}})
        results: list[Optional[int]] = [None] * len(indexes)

        def run(i: int, index: Optional[int]) -> None:
            results[i] = self._run_pod(job, index)

        threads = [threading.Thread(target=run, args=(i, index), daemon=True) for i, index in enumerate(indexes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if any(code is None for code in results) or not self._exists(namespace, name):
            return  # deleted while running: nothing to report
        failed = sum(1 for code in results if code != 0)
        # As the Job controller writes them: with lastProbeTime and lastTransitionTime.
        condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"} if failed else \
            {"type": "Complete", "status": "True"}
        condition |= {"lastProbeTime": now_iso(), "lastTransitionTime": now_iso()}
        self.cluster.batch.patch_namespaced_job_status(name, namespace, {"status": {
            "active": 0, "succeeded": len(results) - failed, "failed": failed, "completionTime": now_iso(),
            "conditions": [condition]}})

    def _run_pod(self, job: dict[str, Any], index: Optional[int]) -> Optional[int]:
        """Run one pod; its exit code, or None when the Job was deleted meanwhile."""
        meta = job["metadata"]
        namespace, job_name = meta["namespace"], meta["name"]
        template = job["spec"]["template"]
        if index is not None:
            template = indexed_pod_template(template, index)
        pod_name = f"{job_name}-{index if index is not None else 0}-{os.urandom(3).hex()}"
        labels = {**template["metadata"].get("labels", {}), "job-name": job_name,
                  "batch.kubernetes.io/job-name": job_name}
        if index is not None:
            labels["batch.kubernetes.io/job-completion-index"] = str(index)
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "namespace": namespace, "labels": labels,
                            "annotations": template["metadata"].get("annotations", {})},
               "spec": template["spec"], "status": {"phase": "Running"}}
        pod["metadata"]["creationTimestamp"] = now_iso()
        self.cluster.core.create_namespaced_pod(namespace, pod)
        if job_name in self.unschedulable:  # what the scheduler writes; nothing ever runs it
            self.cluster.core.patch_namespaced_pod_status(pod_name, namespace, {"status": {
                "phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                    "reason": "Unschedulable",
                                                    "message": self.unschedulable[job_name]}]}})
            while not self._stop.wait(0.2) and self._exists(namespace, job_name):
                pass
            return None
        fault = self.faults.pop(job_name, None)
        if fault is not None:
            exit_code, reason, message = fault.exit_code, fault.reason, fault.message
        else:
            try:
                outcome = self._execute(pod, job_name, index)
            except ContainerConfigError as exc:
                # The kubelet leaves such a pod Pending with this waiting reason; nothing ends it.
                self.cluster.core.patch_namespaced_pod_status(pod_name, namespace, {"status": {
                    "phase": "Pending", "containerStatuses": [{"name": pod["spec"]["containers"][0]["name"],
                    "state": {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}}]}})
                return None
            if outcome is None:
                self.killed.append(job_name)
                return None
            exit_code, reason, message = outcome
        status: dict[str, Any] = {"phase": "Succeeded" if exit_code == 0 else "Failed"}
        if exit_code is None:  # e.g. evicted: the pod failed without a container exit
            status.update(reason=reason, message=message)
            exit_code = 1
        else:
            container = template["spec"]["containers"][0]
            status["containerStatuses"] = [{
                "name": container["name"], "image": container["image"], "imageID": "", "ready": False,
                "restartCount": 0, "state": {"terminated": {"exitCode": exit_code, "reason": reason,
                                                            "message": message}}}]
        self.cluster.core.patch_namespaced_pod_status(pod_name, namespace, {"status": status})
        return exit_code

    def _secret_value(self, namespace: str) -> Any:
        def value(name: str, key: str) -> Optional[str]:
            try:
                secret = self.cluster.core.read_namespaced_secret(name, namespace)
            except ApiException as exc:
                if exc.status == 404:
                    return None
                raise
            data = secret.data or {}
            return base64.b64decode(data[key]).decode() if key in data else None
        return value

    def _execute(self, pod: dict[str, Any], job_name: str, index: Optional[int]) -> Optional[tuple[int, str, str]]:
        """(exit code, reason, termination message), or None when the Job was deleted meanwhile."""
        namespace = pod["metadata"]["namespace"]
        container = pod["spec"]["containers"][0]
        image = self.images.get(container["image"])
        if image is None:
            raise ContainerConfigError(f"image {container['image']!r} is not on this node "
                                       f"(known: {', '.join(self.images)})")
        process = container_process(image.config, pod, container, self._secret_value(namespace))
        scratch = Path(tempfile.mkdtemp(prefix="pod-", dir=self.workdir))
        volumes = {mount["mountPath"]: scratch / mount["name"] for mount in container.get("volumeMounts", [])}
        for host in volumes.values():
            host.mkdir()
        mounts = _Mounts({**volumes, **image.folders})
        env = {name: mounts.value(value) for name, value in process.env.items()}
        env["OMP_NUM_THREADS"] = _cpu_threads(container)
        env.update(self.extra_env)
        self.processes.append((pod["metadata"]["name"], process.argv))
        argv = [mounts.value(a) for a in process.argv]
        if "/" not in argv[0]:
            found = shutil.which(argv[0], path=env.get("PATH", ""))
            if found is None:  # what containerd reports for a command the image does not have
                return 128, "StartError", f'exec: "{argv[0]}": executable file not found in $PATH'
            argv[0] = found
        log = scratch / "pod.log"
        (self.workdir / "logs").mkdir(exist_ok=True)
        kill_when = self.kill_when.pop(job_name, None)
        with log.open("wb") as out:
            child = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     cwd=mounts.path(process.workdir))
            while child.poll() is None:
                if kill_when is not None and kill_when():
                    child.kill()  # the kernel's OOM killer: SIGKILL, no last word from the process
                    child.wait()
                    shutil.copy(log, self.workdir / "logs" / f"{job_name}-{index or 0}.log")
                    return 137, "OOMKilled", ""
                if self._stop.wait(0.02 if kill_when else 0.2) or not self._exists(namespace, job_name):
                    child.kill()
                    child.wait()
                    return None
        text = log.read_text(errors="replace")
        message = "\n".join(text.splitlines()[-20:])[-2048:] if child.returncode else ""
        shutil.copy(log, self.workdir / "logs" / f"{job_name}-{index or 0}.log")
        shutil.rmtree(scratch, ignore_errors=True)
        return child.returncode, "Completed" if child.returncode == 0 else "Error", message
