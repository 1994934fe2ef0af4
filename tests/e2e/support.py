"""What the end-to-end tests share. The job: the tiny PurificationJob (tests/tiny.py) with its model
and data in a loopback S3 server (fixture `uploaded`, tests/e2e/conftest.py); the operator run with
kopf's test runner; the stand-in runner's job."""

from __future__ import annotations

import contextlib
import socket
import time
from pathlib import Path

from kopf.testing import KopfRunner

from tests.operator.cluster import STANDIN_IMAGE
from tests.tiny import job_document

ACCESS, SECRET = "e2e-access-key", "e2e-secret-value-9f3a"
NAMESPACE = "ml-team"
CREDENTIALS_SECRET = "minio-credentials"
UID = "5f0c7a52-0000-4000-8000-00000000e2e1"


def manifest(ws: Path, s3: str, prefix: str, name: str = "tiny", **spec_overrides) -> dict:
    """The pipeline tests' reduced job, pointed at S3."""
    doc = job_document(ws)
    spec = doc["spec"]
    spec["model"]["uri"] = f"s3://models/{prefix}/model"
    spec["dataset"]["uri"] = f"s3://data/{prefix}/train"
    spec["output"]["uri"] = f"s3://runs/{prefix}"
    for key in ("triggeredUri", "untriggeredUri", "cleanUri"):
        spec["evaluation"][key] = f"s3://data/{prefix}/{key.removesuffix('Uri')}"
    spec["storage"] = {"endpoint": s3, "secure": False, "credentialsSecret": {"name": CREDENTIALS_SECRET}}
    spec["resources"] = {"gpus": 0, "cpu": "1", "memory": "2Gi"}
    spec.update(spec_overrides)
    return {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def operator(monkeypatch, metrics_port: int = 0, namespaces: tuple[str, ...] = ()):
    monkeypatch.setenv("DISP_METRICS_PORT", str(metrics_port))
    scope = [f"--namespace={ns}" for ns in namespaces] or ["--all-namespaces"]
    with KopfRunner(["run", *scope, "--standalone", "-m", "disp_operator.handlers"], timeout=60) as runner:
        yield runner
    assert runner.exception is None, runner.output[-3000:]


def finished(body: dict) -> bool:
    return (body.get("status") or {}).get("phase") in ("Succeeded", "Failed")


def standin_manifest(s3: str, prefix: str, name: str, **spec_overrides) -> dict:
    """A job whose pods run the stand-in runner (tests/operator/standin_runner.py)."""
    spec = {"model": {"uri": f"s3://models/{prefix}/model"}, "dataset": {"uri": f"s3://data/{prefix}/train"},
            "output": {"uri": f"s3://runs/{prefix}"},
            "storage": {"endpoint": s3, "secure": False, "credentialsSecret": {"name": CREDENTIALS_SECRET}},
            "evaluation": {"attack": {"target": {"kind": "insertion"}}, "triggeredUri": f"s3://data/{prefix}/triggered"},
            "resources": {"gpus": 0, "image": STANDIN_IMAGE}}
    spec.update(spec_overrides)
    return {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob",
            "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec}


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
