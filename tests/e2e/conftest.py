"""Fixtures of the end-to-end tests: the emulated cluster and its kubelet stand-in, the loopback S3
server holding the tiny model and data, and the container images."""

from __future__ import annotations

import uuid

import pytest
from minio import Minio

from disp_runner.store.s3 import S3Store
from tests.containers.podman import OPERATOR_IMAGE, RUNNER_IMAGE, RuntimeUnavailable, build_images
from tests.e2e.support import ACCESS, CREDENTIALS_SECRET, NAMESPACE, SECRET
from tests.operator.cluster import RUNNER_IMAGE as STANDIN_RUNNER_IMAGE
from tests.operator.cluster import EmulatedCluster, Kubelet


@pytest.fixture
def s3(s3_endpoint):
    """The loopback S3 server of this module (tests/conftest.py)."""
    return s3_endpoint


@pytest.fixture
def uploaded(s3, workspace):
    """The tiny model and datasets of the pipeline tests, in buckets `models` and `data`."""
    client = Minio(s3, access_key=ACCESS, secret_key=SECRET, secure=False)
    for bucket in ("models", "data", "runs"):
        if not client.bucket_exists(bucket):
            client.make_bucket(bucket)
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    prefix = uuid.uuid4().hex[:8]  # tests share the server
    for folder, bucket in (("model", "models"), ("train", "data"), ("triggered", "data"), ("untriggered", "data"),
                           ("clean", "data")):
        for path in (workspace / folder).rglob("*"):
            if path.is_file():
                store.upload_file(path, bucket, f"{prefix}/{folder}/{path.relative_to(workspace / folder).as_posix()}")
    return prefix


@pytest.fixture(scope="session")
def images():
    """The operator and runner images, built from the Dockerfile with podman (containers/
    build-images.sh; podman's layer cache makes a rebuild of unchanged sources quick). A machine
    that cannot build or run containers fails these tests with one line saying why."""
    try:
        build_images()
    except RuntimeUnavailable as exc:
        pytest.fail(f"container runtime unavailable: {exc}", pytrace=False)
    return {"operator": OPERATOR_IMAGE, "runner": RUNNER_IMAGE}


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    cluster = EmulatedCluster(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig))
    monkeypatch.setenv("DISP_RECONCILE_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("DISP_PROGRESS_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("DISP_RETRY_BASE_SECONDS", "0.2")
    monkeypatch.setenv("DISP_RUNNER_IMAGE", STANDIN_RUNNER_IMAGE)
    cluster.apply_secret(NAMESPACE, CREDENTIALS_SECRET, {"accessKey": ACCESS, "secretKey": SECRET})
    yield cluster
    cluster.close()


@pytest.fixture
def kubelet(cluster, tmp_path):
    kubelet = Kubelet(cluster, tmp_path)
    yield kubelet
    kubelet.close()
