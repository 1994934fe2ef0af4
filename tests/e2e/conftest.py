"""Fixtures of the end-to-end tests: the loopback S3 server holding the tiny model and data, and
the container images."""

from __future__ import annotations

import uuid

import pytest
from minio import Minio

from disp_runner.store.s3 import S3Store
from tests.containers.podman import OPERATOR_IMAGE, RUNNER_IMAGE, RuntimeUnavailable, build_images
from tests.e2e.support import ACCESS, SECRET


@pytest.fixture
def s3(s3_endpoint):
    """The loopback S3 server of this module (tests/conftest.py)."""
    return s3_endpoint


@pytest.fixture
def uploaded(s3, workspace):  # noqa: F811
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
