"""Queued GPU work with the real Kueue (tests/harness/kueue.py): a PurificationJob labelled with a
LocalQueue is one Kueue Workload, admitted once for the whole run; with the queue's quota held by
another workload it waits, saying so in its status, and runs once the quota is free; a competitor
queued while it runs does not get in between its stages; evicted, it stops its stage, gives the
quota back and resumes when admitted again."""

from __future__ import annotations

import time

from tests.e2e.support import chart_values, finished, operator, standin_manifest, wait_until
from tests.harness.kueue import KUEUE_API

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
STAGES = ("saliency", "masking", "relabel", "finetune", "evaluate")
GROUP, VERSION = KUEUE_API.split("/")


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


def _with_kueue(cluster) -> dict:
    return chart_values(cluster, kueue={"enabled": True})


def _run_workload(objects, namespace: str, job: str) -> dict:
    (workload,) = [w for w in workloads(objects, namespace)
                   if (w["metadata"].get("ownerReferences") or [{}])[0].get("name") == job]
    return workload


def _condition(workload: dict, kind: str) -> dict:
    return next((c for c in (workload.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def test_kueue_admits_a_queued_run_once_for_all_its_stages(cluster, kubelet, s3, uploaded, queue, monkeypatch):
    kubelet.standin_seconds = 0.3
    with operator(cluster, monkeypatch, _with_kueue(cluster)):
        uid = cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "queued")))
        body = cluster.wait_for(cluster.namespace, "queued", finished, 120, "the job to finish")
        wait_until(lambda: _condition(_run_workload(queue, cluster.namespace, "queued"), "Finished").get("status")
                   == "True", 10, "the Workload to be finished")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert kubelet.started == [f"queued-{stage}" for stage in STAGES]
    # One Kueue Workload for the run, owned by the PurificationJob, admitted by Kueue (not by the
    # test), finished with the run; none for the stage Jobs, which carry no queue label.
    (workload,) = workloads(queue, cluster.namespace)
    owner = workload["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("PurificationJob", uid, True)
    assert workload["status"]["admission"]["clusterQueue"] == f"cq-{cluster.namespace}"
    assert _condition(workload, "Finished")["reason"] == "Succeeded"
    assert not any(QUEUE_LABEL in j["metadata"]["labels"] for j in cluster.jobs(cluster.namespace))
    assert sum(e["reason"] == "WaitingForAdmission" for e in cluster.events(cluster.namespace)) >= 1


def test_a_run_whose_queue_is_full_waits_visibly_and_runs_when_the_quota_is_freed(
        cluster, kubelet, s3, uploaded, queue, monkeypatch):
    holder = quota_holder(queue, cluster.namespace)
    wait_until(lambda: any(admitted(w) for w in workloads(queue, cluster.namespace)), 30, "the holder's admission")
    kubelet.standin_seconds = 0.3
    with operator(cluster, monkeypatch, _with_kueue(cluster)):
        cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "waits")))
        body = cluster.wait_for(cluster.namespace, "waits",
                                lambda b: "waiting for admission" in b.get("status", {}).get("message", ""), 30,
                                "the job to say it waits for admission")
        time.sleep(2.0)  # Kueue has looked at it several times: the quota is taken
        assert kubelet.started == [] and cluster.jobs(cluster.namespace) == []  # no stage Job at all
        body = cluster.get(cluster.namespace, "waits")
        conditions = {c["type"]: c for c in body["status"]["conditions"]}
        assert conditions["Reconciling"]["reason"] == "WaitingForAdmission"
        assert conditions["Stalled"]["status"] == "False"  # queued is not stuck
        assert "insufficient" in body["status"]["message"].lower(), body["status"]["message"]  # Kueue's word
        pending = _run_workload(queue, cluster.namespace, "waits")
        assert not admitted(pending)
        freed = time.monotonic()
        queue.delete_namespaced_custom_object(GROUP, VERSION, cluster.namespace, "workloads", holder)
        wait_until(lambda: "waits-saliency" in kubelet.started, 30, "the first stage to start")
        started_after = time.monotonic() - freed
        body = cluster.wait_for(cluster.namespace, "waits", finished, 120, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert started_after < 15, started_after  # Kueue admits it as soon as the quota is back


def test_a_competitor_queued_during_a_run_waits_for_the_whole_run(cluster, kubelet, s3, uploaded, queue, monkeypatch):
    """The run keeps its admission from its first stage to its last: the competitor is admitted
    only once the run's Workload is finished, and no stage of the run waits for it."""
    kubelet.standin_seconds = 1.0
    with operator(cluster, monkeypatch, _with_kueue(cluster)):
        cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "first")))
        wait_until(lambda: "first-saliency" in kubelet.started, 60, "the run's first stage")
        holder = quota_holder(queue, cluster.namespace)
        admitted_while_running = False
        while not finished(cluster.get(cluster.namespace, "first")):
            competitor = next(w for w in workloads(queue, cluster.namespace) if w["metadata"]["name"] == holder)
            admitted_while_running |= admitted(competitor)
            time.sleep(0.1)
        body = cluster.get(cluster.namespace, "first")
        wait_until(lambda: admitted(next(w for w in workloads(queue, cluster.namespace)
                                         if w["metadata"]["name"] == holder)), 30, "the competitor's admission")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert not admitted_while_running
    assert len([w for w in workloads(queue, cluster.namespace) if w["metadata"]["name"] != holder]) == 1


def test_an_evicted_run_stops_gives_the_quota_back_and_resumes_when_admitted_again(
        cluster, kubelet, s3, uploaded, queue, monkeypatch):
    """Deactivating the run's Workload (spec.active: false) makes Kueue evict it, as preemption
    does: the operator deletes the running stage Job, clears the reservation, and once the Workload
    is active again and re-admitted the stage runs again — a new attempt, not a failure."""
    kubelet.standin_seconds = 4.0
    with operator(cluster, monkeypatch, _with_kueue(cluster)):
        cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "evicted")))
        wait_until(lambda: "evicted-masking" in kubelet.started, 60, "the second stage to start")
        workload = _run_workload(queue, cluster.namespace, "evicted")
        patch = lambda active: queue.patch_namespaced_custom_object(  # noqa: E731
            GROUP, VERSION, cluster.namespace, "workloads", workload["metadata"]["name"], {"spec": {"active": active}})
        patch(False)
        wait_until(lambda: "evicted-masking" in kubelet.killed, 30, "the running stage to stop")
        wait_until(lambda: not admitted(_run_workload(queue, cluster.namespace, "evicted"))
                   and _condition(_run_workload(queue, cluster.namespace, "evicted"), "QuotaReserved")
                   .get("status") == "False", 30, "the quota to be given back")
        body = cluster.get(cluster.namespace, "evicted")
        assert "The workload is deactivated" in body["status"]["message"], body["status"]["message"]  # Kueue's word
        wait_until(lambda: any(e["reason"] == "WaitingForAdmission" and "evicted by Kueue" in e["message"]
                               for e in cluster.events(cluster.namespace)), 10, "the eviction's Event")
        kubelet.standin_seconds = 0.3
        patch(True)
        body = cluster.wait_for(cluster.namespace, "evicted", finished, 120, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    masking = next(s for s in body["status"]["stages"] if s["name"] == "masking")
    assert (masking["attempts"], masking.get("failures", 0)) == (2, 0)
    assert kubelet.started == ["evicted-saliency", "evicted-masking", "evicted-masking-2", "evicted-relabel",
                               "evicted-finetune", "evicted-evaluate"]


def test_a_queued_job_is_refused_by_an_operator_installed_without_kueue(cluster, kubelet, s3, uploaded, monkeypatch):
    with operator(cluster, monkeypatch):
        cluster.create_job(_queued(standin_manifest(s3, uploaded, cluster.namespace, "unqueued")))
        body = cluster.wait_for(cluster.namespace, "unqueued", finished, 30, "the job to be refused")
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "kueue.enabled" in failed["message"]
    assert cluster.jobs(cluster.namespace) == []
