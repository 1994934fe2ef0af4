"""What the end-to-end tests share. The job: the tiny PurificationJob (tests/tiny.py) with its model
and data in a loopback S3 server (fixture `uploaded`, tests/e2e/conftest.py); the operator run
with kopf's test runner as the chart deploys it (its rendered RBAC and ServiceAccount applied to
the real API server, the Deployment's arguments and environment, the ServiceAccount's token); the
stand-in runner's job."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from kopf.testing import KopfRunner

from tests.deploy.helm_chart import by_kind, render
from tests.harness.cluster import OPERATOR_NAMESPACE, Cluster
from tests.harness.controlplane import free_port  # noqa: F401 - the tests' one free-port helper
from tests.harness.node_agent import STANDIN_IMAGE, NodeAgent, PodFault  # noqa: F401 - re-exported
from tests.jobs import job_document as document_of, with_overrides
from tests.tiny import job_document
from tests.harness.minio import S3_ACCESS, S3_SECRET

ACCESS, SECRET = S3_ACCESS, S3_SECRET  # the MinIO server's identity (tests/harness/minio.py)
CREDENTIALS_SECRET = "minio-credentials"
RBAC_KINDS = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
# The chart's settings a test replaces (the cluster fixture sets them for speed and for the node
# agent's image); every other DISP_* setting of the chart's Deployment reaches the operator as is.
TEST_SETTINGS = ("DISP_RUNNER_IMAGE", "DISP_RECONCILE_INTERVAL_SECONDS", "DISP_RETRY_BASE_SECONDS", "TMPDIR")


def manifest(ws: Path, s3: str, prefix: str, namespace: str, name: str = "tiny", **spec_overrides) -> dict:
    """The pipeline tests' reduced job, pointed at S3."""
    spec = with_overrides(job_document(ws)["spec"], {
        "model__uri": f"s3://models/{prefix}/model", "dataset__uri": f"s3://data/{prefix}/train",
        "output__uri": f"s3://runs/{prefix}",
        **{f"evaluation__{key}": f"s3://data/{prefix}/{key.removesuffix('Uri')}"
           for key in ("triggeredUri", "untriggeredUri", "cleanUri")},
        "storage": {"endpoint": s3, "secure": False, "credentialsSecret": {"name": CREDENTIALS_SECRET}},
        "resources": {"gpus": 0, "cpu": "1", "memory": "2Gi"}})
    return document_of(with_overrides(spec, spec_overrides), name, namespace)


def standin_manifest(s3: str, prefix: str, namespace: str, name: str, **spec_overrides) -> dict:
    """A job whose pods run the stand-in runner (tests/operator/standin_runner.py)."""
    spec = {"model": {"uri": f"s3://models/{prefix}/model"}, "dataset": {"uri": f"s3://data/{prefix}/train"},
            "output": {"uri": f"s3://runs/{prefix}"},
            "storage": {"endpoint": s3, "secure": False, "credentialsSecret": {"name": CREDENTIALS_SECRET}},
            "evaluation": {"attack": {"target": {"kind": "insertion"}}, "triggeredUri": f"s3://data/{prefix}/triggered"},
            "resources": {"gpus": 0, "cpu": "1", "memory": "1Gi", "image": STANDIN_IMAGE}}
    return document_of(with_overrides(spec, spec_overrides), name, namespace)


def chart_values(cluster: Cluster, **values: Any) -> dict[str, Any]:
    """The install a team makes for this test's namespace: cluster-wide, reading credentials there."""
    return {"credentialNamespaces": [cluster.namespace], **values}


@dataclass(frozen=True)
class Install:
    """What `helm install` with some values gives the operator: its Deployment's pod template,
    and a kubeconfig holding its ServiceAccount's token (the only credentials it gets)."""

    deployment: dict[str, Any]
    kubeconfig: Path

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.deployment["spec"]["template"]["spec"]["containers"]
        return container


def install(cluster: Cluster, values: Optional[dict[str, Any]] = None, embed_ca: bool = False) -> Install:
    """Render the chart, apply its ServiceAccount and RBAC to the API server, and get a token."""
    docs = render(chart_values(cluster) if values is None else values)
    cluster.apply_all([doc for doc in docs if doc["kind"] in RBAC_KINDS])
    (deployment,) = by_kind(docs, "Deployment")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    token = cluster.service_account_token(OPERATOR_NAMESPACE, account)
    kubeconfig = cluster.plane.token_kubeconfig(f"operator-{uuid.uuid4().hex[:6]}", token,
                                                f"system:serviceaccount:{OPERATOR_NAMESPACE}:{account}", embed_ca)
    return Install(deployment, kubeconfig)


@contextlib.contextmanager
def operator(cluster: Cluster, monkeypatch, values: Optional[dict[str, Any]] = None, metrics_port: int = 0):
    """The operator as `helm install` with `values` deploys it (see `install`), its arguments and
    environment the chart's Deployment's, run in this process by kopf's test runner."""
    chart = install(cluster, values)
    pod_name = f"disp-operator-{uuid.uuid4().hex[:5]}"
    downward = {"metadata.namespace": OPERATOR_NAMESPACE, "metadata.name": pod_name}  # what the kubelet fills in
    for var in chart.container["env"]:
        if var["name"] not in TEST_SETTINGS:
            field_ref = (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
            monkeypatch.setenv(var["name"], downward[field_ref] if field_ref else var.get("value", ""))
    monkeypatch.setenv("DISP_METRICS_PORT", str(metrics_port))
    monkeypatch.setenv("KUBECONFIG", str(chart.kubeconfig))
    scope = [arg for arg in chart.container["args"] if arg.startswith(("--namespace=", "--all-namespaces"))]
    with KopfRunner(["run", *scope, "--standalone", "-m", "disp_operator.handlers"], timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-3000:]


OPERATOR_USER = f"system:serviceaccount:{OPERATOR_NAMESPACE}:disp-operator"  # the chart's ServiceAccount
LEASE = "disp-operator"  # the chart's Lease (leader election), in OPERATOR_NAMESPACE


def delete_lease(cluster: Cluster) -> None:
    """Start from no Lease, as on a fresh install (the session's earlier operators left theirs)."""
    import kubernetes

    try:
        kubernetes.client.CoordinationV1Api(cluster.plane.admin()).delete_namespaced_lease(LEASE, OPERATOR_NAMESPACE)
    except kubernetes.client.exceptions.ApiException as exc:
        if exc.status != 404:
            raise


def finished(body: dict) -> bool:
    return (body.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class NodeView:
    """The session's node agent as one test sees it: the pods of its namespace, and fault hooks
    (by Job name) cleared when the test ends."""

    def __init__(self, agent: NodeAgent, namespace: str):
        self.agent = agent
        self.namespace = namespace
        self.faults: dict[str, PodFault] = agent.faults
        self.kill_when = agent.kill_when
        self.extra_env = agent.extra_env
        self.reset()

    def reset(self) -> None:
        errors, self.agent.errors[:] = list(self.agent.errors), []
        assert not errors, "the node agent failed:\n" + "\n".join(errors)
        self.agent.faults.clear()
        self.agent.kill_when.clear()
        self.agent.extra_env.clear()

    @property
    def standin_seconds(self) -> float:
        return self.agent.standin_seconds

    @standin_seconds.setter
    def standin_seconds(self, seconds: float) -> None:
        self.agent.standin_seconds = seconds

    @property
    def started(self) -> list[str]:
        """The Jobs of this namespace whose first pod started, in order."""
        return [job for namespace, job in list(self.agent.started) if namespace == self.namespace]

    @property
    def killed(self) -> list[str]:
        return [job for namespace, job in list(self.agent.killed) if namespace == self.namespace]

    @property
    def processes(self) -> list[tuple[str, tuple[str, ...]]]:
        return [(pod, argv) for namespace, pod, argv in list(self.agent.processes) if namespace == self.namespace]

    def log(self, job: str, pod: int = -1) -> str:
        """The log of one of the Job's pods (the last to end, by default)."""
        return self.agent.pod_logs[(self.namespace, job)][pod].read_text(errors="replace")


@dataclass
class Replica:
    """One replica of the operator as the chart's Deployment runs it, as its own process: the
    installed `disp-operator` with the Deployment's arguments and environment (the pod's name and
    namespace filled in as the kubelet does), the ServiceAccount's token, its own metrics and
    liveness ports. Killed with SIGKILL, it stops as a crashed pod does: without handing over."""

    name: str
    process: subprocess.Popen
    metrics_port: int
    liveness_port: int
    log: Path

    @classmethod
    def start(cls, chart: "Install", name: str, folder: Path, settings: dict[str, str]) -> "Replica":
        """The replica `name` (its pod's name), with `settings` over the chart's environment."""
        metrics_port, liveness_port = free_port(), free_port()
        downward = {"metadata.namespace": OPERATOR_NAMESPACE, "metadata.name": name}
        env = {"PATH": os.environ["PATH"], "HOME": str(folder), "KUBECONFIG": str(chart.kubeconfig)}
        for var in chart.container["env"]:
            field_ref = (var.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath")
            env[var["name"]] = downward[field_ref] if field_ref else var.get("value", "")
        env.update(settings, TMPDIR=str(folder))
        args = [a for a in chart.container["args"] if a.startswith(("--namespace=", "--all-namespaces", "--log-format"))]
        log = folder / f"{name}.log"
        process = subprocess.Popen(
            [str(Path(sys.executable).with_name("disp-operator")), *args, f"--metrics-port={metrics_port}",
             f"--liveness-port={liveness_port}"], env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return cls(name, process, metrics_port, liveness_port, log)

    def metrics(self) -> str:
        """/metrics, or "" while nothing answers."""
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2).read().decode()
        except OSError:
            return ""

    def leads(self) -> bool:
        return "disp_operator_leader 1.0" in self.metrics()

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=2).status == 200
        except OSError:
            return False

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
