"""What the end-to-end tests share. The job: the pipeline tests' reduced PurificationJob (tests/runner/test_pipeline.py)
with its model and data in a loopback S3 server (fixture `uploaded`, tests/e2e/conftest.py)."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.tiny import job_document

ACCESS, SECRET = "e2e-access-key", "e2e-secret-value-9f3a"
NAMESPACE = "ml-team"
CREDENTIALS_SECRET = "minio-credentials"


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
