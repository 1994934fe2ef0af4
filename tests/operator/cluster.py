"""A Kubernetes stand-in for end-to-end tests of the operator (no cluster can run here):

- `EmulatedCluster`: kmock's KubernetesEmulator (an in-memory API server over real HTTP) on its
  own event loop in a background thread, and a kubeconfig pointing at it, so the real operator
  (under kopf.testing.KopfRunner) and the tests talk to it through real clients.
- `Kubelet`: plays the Job controller and the kubelet: for every Job it creates the pods (one per
  index for Indexed Jobs), runs each pod's container command as a local subprocess with its env
  (secretKeyRef resolved from the emulator's Secrets, $(VAR) expanded, the scratch mount mapped to a
  temporary folder), then writes the pods' terminated state and the Job's conditions. A Job
  deleted while its pods run gets them killed. It can also inject kubelet-level faults
  (OOM kill, eviction) into chosen pods."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import kmock
import kubernetes
import yaml
from kubernetes.client.exceptions import ApiException

RESOURCES = {
    # path: (kind, namespaced, subresources)
    "disp.dev/v1alpha1/purificationjobs": ("PurificationJob", True, {"status"}),
    "batch/v1/jobs": ("Job", True, {"status"}),
    "v1/pods": ("Pod", True, {"status"}),
    "v1/events": ("Event", True, set()),
    "v1/secrets": ("Secret", True, set()),
    "v1/namespaces": ("Namespace", False, set()),
    "apiextensions.k8s.io/v1/customresourcedefinitions": ("CustomResourceDefinition", False, set()),
}
VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}
GROUP, VERSION, PLURAL = "disp.dev", "v1alpha1", "purificationjobs"
STANDIN_IMAGE = "stand-in"  # pods of this image run tests/operator/standin_runner.py instead of `disp`


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


@dataclass
class Kubelet:
    cluster: EmulatedCluster
    workdir: Path
    faults: dict[str, PodFault] = field(default_factory=dict)  # by Job name: its first pod ends so
    standin_seconds: float = 0.5  # how long each stand-in runner pod works
    started: list[str] = field(default_factory=list)  # Job names, in the order they were picked up
    killed: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
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
                if key in self._seen:
                    continue
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
        condition = {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                     "message": "Job has reached the specified backoff limit"} if failed else \
            {"type": "Complete", "status": "True"}
        self.cluster.batch.patch_namespaced_job_status(name, namespace, {"status": {
            "active": 0, "succeeded": len(results) - failed, "failed": failed, "completionTime": now_iso(),
            "conditions": [condition]}})

    def _run_pod(self, job: dict[str, Any], index: Optional[int]) -> Optional[int]:
        """Run one pod; its exit code, or None when the Job was deleted meanwhile."""
        meta = job["metadata"]
        namespace, job_name = meta["namespace"], meta["name"]
        template = job["spec"]["template"]
        pod_name = f"{job_name}-{index if index is not None else 0}-{os.urandom(3).hex()}"
        labels = {**template["metadata"].get("labels", {}), "job-name": job_name,
                  "batch.kubernetes.io/job-name": job_name}
        if index is not None:
            labels["batch.kubernetes.io/job-completion-index"] = str(index)
        self.cluster.core.create_namespaced_pod(namespace, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "namespace": namespace, "labels": labels},
            "spec": template["spec"], "status": {"phase": "Running"}})
        fault = self.faults.pop(job_name, None)
        if fault is not None:
            exit_code, reason, message = fault.exit_code, fault.reason, fault.message
        else:
            outcome = self._execute(template["spec"]["containers"][0], namespace, job_name, index)
            if outcome is None:
                self.killed.append(job_name)
                return None
            exit_code, message = outcome
            reason = "Completed" if exit_code == 0 else "Error"
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

    def _execute(self, container: dict[str, Any], namespace: str, job_name: str,
                 index: Optional[int]) -> Optional[tuple[int, str]]:
        scratch = Path(tempfile.mkdtemp(prefix="scratch-", dir=self.workdir))
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "PYTHONPATH")}
        env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        if index is not None:
            env["JOB_COMPLETION_INDEX"] = str(index)
        for var in container.get("env", []):
            if "value" in var:
                value = var["value"]
                for mount in container.get("volumeMounts", []):
                    if mount["name"] == "scratch" and value.startswith(mount["mountPath"]):
                        value = str(scratch) + value[len(mount["mountPath"]):]
                env[var["name"]] = value
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                secret = self.cluster.core.read_namespaced_secret(ref["name"], namespace)
                env[var["name"]] = base64.b64decode(secret.data[ref["key"]]).decode()
        args = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in container["args"]]
        if container["image"] == STANDIN_IMAGE:
            args = [sys.executable, str(Path(__file__).with_name("standin_runner.py")), *args[1:]]
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                              env.get("PYTHONPATH")]))
            env["STANDIN_SECONDS"] = str(self.standin_seconds)
        elif args[0] == "disp":  # the image's entry point is the venv's console script here
            args[0] = str(Path(sys.executable).with_name("disp"))
        log = scratch / "pod.log"
        with log.open("wb") as out:
            process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=scratch)
            while process.poll() is None:
                if self._stop.wait(0.2) or not self._exists(namespace, job_name):
                    process.kill()
                    process.wait()
                    return None
        text = log.read_text(errors="replace")
        message = "\n".join(text.splitlines()[-20:])[-2048:] if process.returncode else ""
        (self.workdir / "logs").mkdir(exist_ok=True)
        shutil.copy(log, self.workdir / "logs" / f"{job_name}-{index or 0}.log")
        shutil.rmtree(scratch, ignore_errors=True)
        return process.returncode, message
