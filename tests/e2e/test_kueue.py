"""Queued GPU work with the real Kueue (tests/harness/kueue.py): a PurificationJob labelled with a
LocalQueue has each stage Job admitted by Kueue; with the queue's quota held by another workload it
waits, saying so in its status, and runs once the quota is free."""

from __future__ import annotations

import time

import kubernetes
import pytest

from tests.e2e.support import finished, operator, standin_manifest, wait_until
from tests.harness.kueue import KUEUE_API, KueueManager
from tests.harness.tools import ToolError, toolbox

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
STAGES = ("saliency", "masking", "relabel", "finetune", "evaluate")
GROUP, VERSION = KUEUE_API.split("/")


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
    objects.create_cluster_custom_object(GROUP, VERSION, "resourceflavors",
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
    objects.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", {
        "apiVersion": KUEUE_API, "kind": "ClusterQueue", "metadata": {"name": name},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cluster.namespace}},
                 "resourceGroups": [{"coveredResources": ["cpu", "memory"], "flavors": [{
                     "name": "default-flavor", "resources": [{"name": "cpu", "nominalQuota": "1"},
                                                             {"name": "memory", "nominalQuota": "2Gi"}]}]}]}})
    objects.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "localqueues", {
        "apiVersion": KUEUE_API, "kind": "LocalQueue", "metadata": {"name": "gpu-batch"},
        "spec": {"clusterQueue": name}})
    yield objects
    objects.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", name)


def workloads(objects, namespace: str) -> list[dict]:
    return objects.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]


def admitted(workload: dict) -> bool:
    return any(c["type"] == "Admitted" and c["status"] == "True"
               for c in (workload.get("status") or {}).get("conditions", []))


def quota_holder(objects, namespace: str) -> str:
    """A workload of another team's that takes the whole queue (no Job behind it: it holds the
    quota until it is deleted)."""
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, "workloads", {
        "apiVersion": KUEUE_API, "kind": "Workload", "metadata": {"name": "holder"},
        "spec": {"queueName": "gpu-batch", "podSets": [{"name": "main", "count": 1, "template": {"spec": {
            "restartPolicy": "Never", "containers": [{"name": "c", "image": "holder",
                                                      "resources": {"requests": {"cpu": "1"}}}]}}}]}})
    return "holder"


def _queued(doc: dict) -> dict:
    doc["metadata"]["labels"] = {QUEUE_LABEL: "gpu-batch"}
    return doc


def test_kueue_admits_each_stage_job_of_a_queued_run(cluster, kubelet, s3, uploaded, queue, monkeypatch):
    kubelet.standin_seconds = 0.3
    with operator(cluster, monkeypatch):
        cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "queued")))
        body = cluster.wait_for(cluster.namespace, "queued", finished, 120, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert kubelet.started == [f"queued-{stage}" for stage in STAGES]
    # One Kueue Workload per stage Job, each admitted by Kueue (not by the test).
    owned = {w["metadata"]["ownerReferences"][0]["name"]: w for w in workloads(queue, cluster.namespace)}
    assert sorted(owned) == sorted(f"queued-{stage}" for stage in STAGES)
    assert all(w["status"]["admission"]["clusterQueue"] == f"cq-{cluster.namespace}" for w in owned.values())
    assert sum(e["reason"] == "WaitingForAdmission" for e in cluster.events(cluster.namespace)) >= 1


def test_a_run_whose_queue_is_full_waits_visibly_and_runs_when_the_quota_is_freed(
        cluster, kubelet, s3, uploaded, queue, monkeypatch):
    holder = quota_holder(queue, cluster.namespace)
    wait_until(lambda: any(admitted(w) for w in workloads(queue, cluster.namespace)), 30, "the holder's admission")
    kubelet.standin_seconds = 0.3
    with operator(cluster, monkeypatch):
        cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "waits")))
        body = cluster.wait_for(cluster.namespace, "waits",
                                lambda b: "waiting for admission" in b.get("status", {}).get("message", ""), 30,
                                "the job to say it waits for admission")
        time.sleep(2.0)  # Kueue has looked at it several times: the quota is taken
        assert kubelet.started == []
        (stage_job,) = cluster.jobs(cluster.namespace)
        assert stage_job["spec"]["suspend"] is True
        conditions = {c["type"]: c for c in body["status"]["conditions"]}
        assert conditions["Reconciling"]["reason"] == "WaitingForAdmission"
        assert conditions["Stalled"]["status"] == "False"  # queued is not stuck
        pending = [w for w in workloads(queue, cluster.namespace) if w["metadata"]["name"] != holder]
        assert len(pending) == 1 and not admitted(pending[0])
        freed = time.monotonic()
        queue.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", holder)
        wait_until(lambda: "waits-saliency" in kubelet.started, 30, "the first stage to start")
        started_after = time.monotonic() - freed
        body = cluster.wait_for(cluster.namespace, "waits", finished, 120, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert started_after < 15, started_after  # Kueue admits it as soon as the quota is back
