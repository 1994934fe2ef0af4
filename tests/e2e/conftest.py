"""Fixtures of the end-to-end tests: a real Kubernetes control plane (etcd, kube-apiserver,
kube-controller-manager, kube-scheduler; tests/harness/controlplane.py) with the CRD installed,
the node agent that runs the pods the scheduler binds (tests/harness/node_agent.py), a namespace
of each test's own with the S3 credentials Secret, the loopback S3 server holding the tiny model
and data, the container images, and the real Kueue with a ClusterQueue and LocalQueue for a test's namespace."""

from __future__ import annotations

import uuid

import kubernetes
import pytest
from minio import Minio

from disp_store.s3 import S3Store
from tests.harness.podman import OPERATOR_IMAGE, RUNNER_IMAGE, RuntimeUnavailable, build_images
from tests.e2e.support import ACCESS, CREDENTIALS_SECRET, SECRET, NodeView
from tests.harness.cluster import Cluster
from tests.harness.kueue import KUEUE_API, KueueManager
from tests.harness.node_agent import RUNNER_IMAGE as LOCAL_RUNNER_IMAGE
from tests.harness.tools import ToolError, toolbox

KUEUE_GROUP, KUEUE_VERSION = KUEUE_API.split("/")


@pytest.fixture
def cluster(control_plane, monkeypatch):
    """A namespace of this test's own, with the S3 credentials Secret; the operator's settings
    that make a test quick (reconcile and progress every half second, short retry backoff) and the
    runner image the node agent knows."""
    cluster = Cluster(control_plane)
    monkeypatch.setenv("DISP_RECONCILE_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("DISP_PROGRESS_INTERVAL_SECONDS", "0.5")
    monkeypatch.setenv("DISP_RETRY_BASE_SECONDS", "0.2")
    # Leader election as the chart sets it up, on shorter timings: a test's operator that did not
    # hand its Lease back is replaced within seconds by the next test's.
    monkeypatch.setenv("DISP_LEADER_LEASE_SECONDS", "4")
    monkeypatch.setenv("DISP_LEADER_RENEW_DEADLINE_SECONDS", "3")
    monkeypatch.setenv("DISP_LEADER_RETRY_SECONDS", "0.5")
    monkeypatch.setenv("DISP_RUNNER_IMAGE", LOCAL_RUNNER_IMAGE)
    cluster.apply_secret(cluster.namespace, CREDENTIALS_SECRET, {"accessKey": ACCESS, "secretKey": SECRET})
    yield cluster
    cluster.close()


@pytest.fixture
def kubelet(node_agent, cluster):
    """The node agent as this test sees it: its own namespace's pods, its own fault hooks."""
    view = NodeView(node_agent, cluster.namespace)
    yield view
    view.reset()


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


@pytest.fixture(scope="session")
def kueue(control_plane, tmp_path_factory):
    core = kubernetes.client.CoreV1Api(control_plane.admin())
    core.create_namespace({"metadata": {"name": "kueue-system"}})
    manager = KueueManager(control_plane, toolbox().path("kueue"), tmp_path_factory.mktemp("kueue"))
    try:
        manager.install_crds(toolbox().path("kubectl"))
        manager.start()
    except ToolError as exc:
        pytest.fail(f"Kueue did not come up: {exc}", pytrace=False)
    objects = kubernetes.client.CustomObjectsApi(control_plane.admin())
    objects.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "resourceflavors",
                                         {"apiVersion": KUEUE_API, "kind": "ResourceFlavor",
                                          "metadata": {"name": "default-flavor"}})
    yield manager
    manager.stop()


@pytest.fixture
def queue(kueue, cluster):
    """A ClusterQueue for this test's namespace with room for one stage pod (1 CPU, 2 GiB), and
    the LocalQueue `gpu-batch` in the namespace."""
    objects = kubernetes.client.CustomObjectsApi(cluster.plane.admin())
    name = f"cq-{cluster.namespace}"
    objects.create_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", {
        "apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{
                     "name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "1"},
                                                             {"name": "memory", "nominalQuota": "2Gi"}]}]}]}})
    objects.create_namespaced_custom_object(KUEUE_GROUP, KUEUE_VERSION, cluster.namespace, "localqueues", {
        "apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": "gpu-batch"},
        "spec": {"clusterQueue": name}})
    yield objects
    objects.delete_cluster_custom_object(KUEUE_GROUP, KUEUE_VERSION, "clusterqueues", name)
