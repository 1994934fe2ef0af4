"""The real operator (kopf.testing.KopfRunner) against kmock's Kubernetes emulator over HTTP, a
kubelet stand-in that runs each stage Job's `disp run` command as a subprocess, and a loopback S3
server (moto) holding the model, the data and the run's artifacts. See tests/operator/cluster.py."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from disp_api import MetricsSummary, StageName
from disp_runner.store.s3 import S3Store
from tests.e2e.support import (ACCESS, NAMESPACE, SECRET, UID, finished, free_port, manifest,
                               operator, standin_manifest, wait_until)
from tests.operator.cluster import PodFault

ALL_STAGES = [s.value for s in StageName]


def test_a_manifest_runs_every_stage_and_ends_succeeded(cluster, kubelet, workspace, s3, uploaded,
                                                         monkeypatch):
    """The happy path with the real runner in every pod, plus one stage pod OOM-killed once."""
    port = free_port()
    job = manifest(workspace, s3, uploaded, parallelism={"saliencyShards": 2})
    kubelet.faults["tiny-masking"] = PodFault(137, "OOMKilled")
    with operator(monkeypatch, metrics_port=port) as runner:
        cluster.create_job(job, uid=UID)
        body = cluster.wait_for(NAMESPACE, "tiny", finished, 300, "the job to finish")
        # kopf posts Events in the background, shortly after the status
        wait_until(lambda: any(e["reason"] == "Completed" for e in cluster.events(NAMESPACE)), 10, "the last Event")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    status = body["status"]
    assert status["phase"] == "Succeeded", status

    # Stage Jobs were created in order, each once; the sharded stage as an Indexed Job plus a merge;
    # the OOM-killed masking pod's Job was retried under a new name.
    assert kubelet.started == ["tiny-saliency", "tiny-saliency-merge", "tiny-masking", "tiny-masking-2",
                               "tiny-relabel", "tiny-finetune", "tiny-evaluate"]
    jobs = {j["metadata"]["name"]: j for j in cluster.jobs(NAMESPACE)}
    assert "tiny-masking" not in jobs  # the failed attempt was deleted (keepFailedPods is false)
    assert jobs["tiny-saliency"]["spec"]["completionMode"] == "Indexed"
    # Each pod ran the image's `disp` with the stage's arguments, the shard index expanded.
    argvs = [argv for _, argv in kubelet.processes]
    assert all(argv[:3] == ("disp", "--no-progress", "run") for argv in argvs), argvs
    assert sorted(argv[-1] for argv in argvs if "--shard" in argv) == ["0/2", "1/2"]
    assert all(j["metadata"]["ownerReferences"][0]["uid"] == UID for j in jobs.values())

    # status: conditions, stages, progress, metrics equal to the run's metrics.json
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Succeeded"]["status"] == "True" and conditions["Succeeded"]["reason"] == "Completed"
    assert conditions["Reconciling"]["status"] == "False" and conditions["Stalled"]["status"] == "False"
    assert status["observedGeneration"] == 1
    stages = {s["name"]: s for s in status["stages"]}
    assert list(stages) == ALL_STAGES and all(s["phase"] == "Succeeded" for s in stages.values())
    assert (stages["masking"]["attempts"], stages["masking"]["failures"]) == (2, 1)
    assert all(s["attempts"] == 1 for name, s in stages.items() if name != "masking")
    assert status["progress"]["percent"] == 100
    run = f"s3://runs/{uploaded}/runs/{NAMESPACE}/tiny/{UID}"
    assert status["purifiedModelUri"] == f"{run}/finetune/model"
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    metrics_json = json.loads(store.get_bytes("runs", f"{run.removeprefix('s3://runs/')}/evaluate/metrics.json"))
    expected = {k: v for k, v in metrics_json.items() if k in MetricsSummary.model_json_schema(by_alias=True)
                ["properties"] and v is not None}
    assert status["metrics"] == expected and {"asrBefore", "asrAfter", "cleanPerformanceAfter"} <= set(expected)
    assert store.exists("runs", f"{run.removeprefix('s3://runs/')}/finetune/model/config.json")

    # Events: one per transition; no secret anywhere.
    events = [(e["type"], e["reason"], e["message"]) for e in cluster.events(NAMESPACE)]
    reasons = [r for _, r, _ in events]
    assert reasons.count("StageStarted") == 6 and reasons.count("StageSucceeded") == 5
    retry = [e for e in events if e[1] == "StageRetrying"]
    assert len(retry) == 1 and retry[0][0] == "Warning" and "OOM-killed" in retry[0][2]
    (completed,) = [e for e in events if e[1] == "Completed"]  # Events carry no order; their count does
    assert completed[0] == "Normal" and "ASR" in completed[2]
    for text in (json.dumps(body), json.dumps(events), runner.output):
        assert SECRET not in text and ACCESS not in text

    # Prometheus: the job by phase, stage durations, the retry, reconciles.
    assert 'disp_purification_jobs{phase="Succeeded"} 1.0' in scrape
    for stage in ALL_STAGES:
        assert f'disp_stage_duration_seconds_count{{result="succeeded",stage="{stage}"}} 1.0' in scrape
    assert 'disp_stage_retries_total{failure="Transient",stage="masking"} 1.0' in scrape
    assert f'disp_job_asr_after_ratio{{name="tiny",namespace="{NAMESPACE}"}} {status["metrics"]["asrAfter"]}' in scrape
    assert "disp_operator_reconciles_total" in scrape


def test_a_permanent_failure_fails_the_job_once_without_retries(cluster, kubelet, workspace, s3, uploaded,
                                                                monkeypatch):
    """The runner rejects a dataset folder that holds no manifest (exit code 2): no retry storm."""
    job = manifest(workspace, s3, uploaded, dataset={"uri": f"s3://data/{uploaded}/no-such-dataset"})
    with operator(monkeypatch):
        cluster.create_job(job, uid=UID)
        body = cluster.wait_for(NAMESPACE, "tiny", finished, 120, "the job to fail")
        time.sleep(2)  # several reconcile intervals: nothing more may start
    status = body["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StageFailed" and "saliency" in failed["message"]
    assert "no-such-dataset/: no objects" in failed["message"]  # the runner's error, via the termination message
    assert kubelet.started == ["tiny-saliency"]
    warnings = [e for e in cluster.events(NAMESPACE) if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["StageFailed"]


def test_an_operator_restart_mid_stage_neither_duplicates_jobs_nor_loses_the_run(cluster, kubelet, s3, uploaded,
                                                                                  monkeypatch):
    kubelet.standin_seconds = 3.0
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "restart"), uid=UID)
        wait_until(lambda: "restart-relabel" in kubelet.started, 60, "the relabel pod to start")
    started_before = list(kubelet.started)
    kubelet.standin_seconds = 0.3
    with operator(monkeypatch):  # a new operator process against the same API state
        body = cluster.wait_for(NAMESPACE, "restart", finished, 60, "the job to finish")
    assert body["status"]["phase"] == "Succeeded"
    assert started_before[-1] == "restart-relabel"
    assert kubelet.started == ["restart-saliency", "restart-masking", "restart-relabel", "restart-finetune",
                               "restart-evaluate"]  # each exactly once: the running relabel was adopted
    assert body["status"]["metrics"]["asrAfter"] == 0.02
    assert all(s["attempts"] == 1 for s in body["status"]["stages"])


def test_suspend_stops_the_running_stage_and_resume_continues_from_the_last_completed_one(cluster, kubelet, s3,
                                                                                         uploaded, monkeypatch):
    kubelet.standin_seconds = 3.0
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "pause"), uid=UID)
        wait_until(lambda: "pause-relabel" in kubelet.started, 60, "the relabel pod to start")
        cluster.set_suspend(NAMESPACE, "pause", True)
        body = cluster.wait_for(NAMESPACE, "pause", lambda b: b.get("status", {}).get("phase") == "Suspended", 20,
                                "the job to be suspended")
        # its Job was deleted, so its pod was stopped
        wait_until(lambda: "pause-relabel" in kubelet.killed, 10, "the relabel pod to be killed")
        assert "pause-relabel" not in {j["metadata"]["name"] for j in cluster.jobs(NAMESPACE)}
        suspended = next(c for c in body["status"]["conditions"] if c["type"] == "Suspended")
        assert suspended["status"] == "True" and suspended["observedGeneration"] == 2
        time.sleep(1.5)
        assert kubelet.started[-1] == "pause-relabel"  # nothing starts while suspended
        kubelet.standin_seconds = 0.3
        cluster.set_suspend(NAMESPACE, "pause", False)
        body = cluster.wait_for(NAMESPACE, "pause", finished, 60, "the job to finish")
    assert body["status"]["phase"] == "Succeeded"
    assert kubelet.started == ["pause-saliency", "pause-masking", "pause-relabel", "pause-relabel-2",
                               "pause-finetune", "pause-evaluate"]
    relabel = next(s for s in body["status"]["stages"] if s["name"] == "relabel")
    assert (relabel["attempts"], relabel["failures"]) == (2, 0)
    reasons = [e["reason"] for e in cluster.events(NAMESPACE)]
    assert reasons.count("Suspended") == 1 and reasons.count("Resumed") == 1


@pytest.mark.parametrize("case, change, message", [
    ("missing secret", {"storage": {"endpoint": "x:9000", "secure": False, "credentialsSecret": {"name": "nope"}}},
     "spec.storage.credentialsSecret.name: Secret 'nope' does not exist"),
    ("pickle model", {"model": {"uri": "s3://models/PREFIX/pickled"}}, "spec.model.allowUnsafePickle"),
    ("ratio above one", {"masking": {"ratio": 1.5}}, "spec.masking.ratio"),
])
def test_an_invalid_spec_fails_at_once_without_children(cluster, kubelet, s3, uploaded, monkeypatch, case, change,
                                                       message):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    store.put_bytes("models", f"{uploaded}/pickled/config.json", b"{}")
    store.put_bytes("models", f"{uploaded}/pickled/pytorch_model.bin", b"not really")
    change = json.loads(json.dumps(change).replace("PREFIX", uploaded))
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "bad", **change), uid=UID)
        body = cluster.wait_for(NAMESPACE, "bad", finished, 30, "the job to be rejected")
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert body["status"]["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert message in failed["message"]
    assert kubelet.started == [] and cluster.jobs(NAMESPACE) == []
    (event,) = [e for e in cluster.events(NAMESPACE) if e["reason"] == "InvalidSpec"]
    assert event["type"] == "Warning" and message in event["message"]


def test_deleting_a_job_with_cleanup_removes_its_intermediates_but_keeps_the_model(cluster, kubelet, s3, uploaded,
                                                                                   monkeypatch):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    run_key = f"{uploaded}/runs/{NAMESPACE}/tidy/{UID}"
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "tidy", policy={"cleanupArtifacts": True}), uid=UID)
        cluster.wait_for(NAMESPACE, "tidy", finished, 60, "the job to finish")
        store.put_bytes("runs", f"{run_key}/finetune/model/config.json", b"{}")  # what the real finetune leaves
        assert store.exists("runs", f"{run_key}/evaluate/metrics.json")
        cluster.custom.delete_namespaced_custom_object("disp.dev", "v1alpha1", NAMESPACE, "purificationjobs", "tidy")
        wait_until(lambda: not any(o["metadata"]["name"] == "tidy" for o in cluster.custom.list_namespaced_custom_object(
            "disp.dev", "v1alpha1", NAMESPACE, "purificationjobs")["items"]), 20, "the job to be deleted")
    left = sorted(key for key, _, _ in store.list("runs", run_key + "/"))
    assert left == [f"{run_key}/finetune/model/config.json"]


def test_without_cleanup_a_deleted_job_leaves_its_artifacts(cluster, kubelet, s3, uploaded, monkeypatch):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "keep"), uid=UID)
        cluster.wait_for(NAMESPACE, "keep", finished, 60, "the job to finish")
        cluster.custom.delete_namespaced_custom_object("disp.dev", "v1alpha1", NAMESPACE, "purificationjobs", "keep")
        wait_until(lambda: not cluster.custom.list_namespaced_custom_object(
            "disp.dev", "v1alpha1", NAMESPACE, "purificationjobs")["items"], 20, "the job to be deleted")
    assert store.exists("runs", f"{uploaded}/runs/{NAMESPACE}/keep/{UID}/evaluate/metrics.json")


def test_a_job_deleted_while_no_operator_runs_goes_at_once_unless_it_asked_for_clean_up(cluster, kubelet, s3,
                                                                                       uploaded, monkeypatch):
    """Only a job with policy.cleanupArtifacts carries a finalizer: deleting it while the operator is
    away waits for one, which then cleans up and lets it go; any other job is deleted at once."""
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    run_key = f"{uploaded}/runs/{NAMESPACE}/tidy/{UID}"
    listed = lambda: {o["metadata"]["name"]: o for o in cluster.custom.list_namespaced_custom_object(  # noqa: E731
        "disp.dev", "v1alpha1", NAMESPACE, "purificationjobs")["items"]}
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "tidy", policy={"cleanupArtifacts": True}), uid=UID)
        cluster.create_job(standin_manifest(s3, uploaded, "plain"), uid=UID.replace("e2e1", "e2e2"))
        for name in ("tidy", "plain"):
            cluster.wait_for(NAMESPACE, name, finished, 60, f"{name} to finish")
    jobs = listed()
    assert jobs["plain"]["metadata"].get("finalizers", []) == []
    assert jobs["tidy"]["metadata"].get("finalizers")  # the operator's, for the clean-up
    store.put_bytes("runs", f"{run_key}/finetune/model/config.json", b"{}")  # what the real finetune leaves
    # The operator is gone (helm uninstall keeps the CRD and so the jobs).
    for name in ("tidy", "plain"):
        cluster.custom.delete_namespaced_custom_object("disp.dev", "v1alpha1", NAMESPACE, "purificationjobs", name)
    jobs = listed()
    assert "plain" not in jobs  # no finalizer: gone without any operator
    assert jobs["tidy"]["metadata"].get("deletionTimestamp")  # waits for an operator to clean up
    assert store.exists("runs", f"{run_key}/evaluate/metrics.json")
    with operator(monkeypatch):  # an operator comes back: it cleans up and removes its finalizer
        wait_until(lambda: "tidy" not in listed(), 30, "the job to be deleted")
    left = sorted(key for key, _, _ in store.list("runs", run_key + "/"))
    assert left == [f"{run_key}/finetune/model/config.json"]


def _condition(body: dict, kind: str) -> dict:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_with_a_kueue_queue_every_stage_job_waits_suspended_until_admitted(cluster, kubelet, s3, uploaded,
                                                                           monkeypatch):
    doc = standin_manifest(s3, uploaded, "queued")
    doc["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-batch"}
    admitted: list[str] = []
    with operator(monkeypatch):
        cluster.create_job(doc, uid=UID)
        body = cluster.wait_for(NAMESPACE, "queued",
                                lambda b: "waiting for admission" in b.get("status", {}).get("message", ""), 30,
                                "the job to say it waits for admission")
        time.sleep(1.0)  # several reconcile passes and kubelet polls
        assert kubelet.started == []  # a suspended Job runs no pod
        (queued,) = cluster.jobs(NAMESPACE)
        assert queued["spec"]["suspend"] is True
        assert queued["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-batch"
        assert _condition(body, "Reconciling")["reason"] == "WaitingForAdmission"
        assert _condition(body, "Stalled")["status"] == "False"
        deadline = time.monotonic() + 60
        while not finished(cluster.get(NAMESPACE, "queued")):  # play Kueue: admit what waits
            assert time.monotonic() < deadline, "timed out admitting the stages"
            for job in cluster.jobs(NAMESPACE):
                if job["spec"].get("suspend"):
                    cluster.batch.patch_namespaced_job(job["metadata"]["name"], NAMESPACE, {"spec": {"suspend": False}})
                    admitted.append(job["metadata"]["name"])
            time.sleep(0.1)
        body = cluster.get(NAMESPACE, "queued")
    assert body["status"]["phase"] == "Succeeded"
    assert admitted == kubelet.started == ["queued-saliency", "queued-masking", "queued-relabel", "queued-finetune",
                                           "queued-evaluate"]
    assert sum(e["reason"] == "WaitingForAdmission" for e in cluster.events(NAMESPACE)) == 5


def test_an_unschedulable_stage_pod_stalls_the_job_visibly_until_it_is_suspended(cluster, kubelet, s3, uploaded,
                                                                                  monkeypatch):
    message = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    kubelet.unschedulable["pending-saliency"] = message
    port = free_port()
    with operator(monkeypatch, metrics_port=port):
        cluster.create_job(standin_manifest(s3, uploaded, "pending"), uid=UID)
        body = cluster.wait_for(NAMESPACE, "pending", lambda b: _condition(b, "Stalled").get("status") == "True", 30,
                                "the job to be stalled")
        stalled = _condition(body, "Stalled")
        assert stalled["reason"] == "Unschedulable" and message in stalled["message"]
        assert body["status"]["phase"] == "Running" and message in body["status"]["stages"][0]["message"]
        wait_until(lambda: any(e["reason"] == "Unschedulable" and e["type"] == "Warning"
                               for e in cluster.events(NAMESPACE)), 10, "the Warning Event")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'disp_job_pending_pod_seconds{{name="pending",namespace="{NAMESPACE}"}}' in scrape
        cluster.set_suspend(NAMESPACE, "pending", True)
        body = cluster.wait_for(NAMESPACE, "pending", lambda b: b.get("status", {}).get("phase") == "Suspended", 20,
                                "suspension")
        assert _condition(body, "Stalled")["status"] == "False"  # suspended jobs are never stalled
        time.sleep(1.0)
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for series in ("disp_job_pending_pod_seconds{", "disp_job_last_progress_timestamp_seconds{"):
        assert series not in scrape, f"a suspended job still exports {series}"


def test_a_fine_tune_pod_killed_after_epoch_two_of_four_resumes_at_epoch_three(cluster, kubelet, workspace, s3,
                                                                               uploaded, monkeypatch):
    """The real runner: the fine-tune pod dies (SIGKILL, reported as OOMKilled) once epoch 2's
    checkpoint is complete in S3; the operator retries the stage in a new pod with a fresh scratch,
    which resumes at epoch 3 and ends with the weights of an uninterrupted run."""
    import torch
    from safetensors.torch import load, load_file

    from disp_runner.pipeline.runner import open_run, run_job
    from tests.tiny import make_job

    # 24 steps an epoch, through every weight: about a second an epoch to be killed in.
    finetune = {"epochs": 4, "batchSize": 1, "learningRate": 0.001, "trainable": "all"}
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    run_key = f"{uploaded}/runs/{NAMESPACE}/resume/{UID}"
    killed_after: list[int] = []

    def epoch_two_is_saved() -> bool:
        epochs = [int(key.split("/epoch-")[1][:4]) for key, _, _ in
                  store.list("runs", f"{run_key}/finetune.checkpoints/") if key.endswith("/stage-manifest.json")]
        if epochs and max(epochs) >= 2:
            killed_after.append(max(epochs))  # 2, unless the machine stalled the kubelet for an epoch
            return True
        return False

    kubelet.kill_when["resume-finetune"] = epoch_two_is_saved
    # The killed pod's lease on the stage lapses within one TTL (60 s by default), which the new
    # pod waits out before taking it over; 3 s keeps the test short.
    kubelet.extra_env["DISP_LEASE_TTL_SECONDS"] = "3"
    with operator(monkeypatch):
        cluster.create_job(manifest(workspace, s3, uploaded, name="resume", evaluation=None, finetune=finetune), uid=UID)
        body = cluster.wait_for(NAMESPACE, "resume", finished, 300, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert kubelet.started[-2:] == ["resume-finetune", "resume-finetune-2"]
    stage = next(s for s in body["status"]["stages"] if s["name"] == "finetune")
    assert (stage["attempts"], stage["failures"]) == (2, 1)
    log = (kubelet.workdir / "logs" / "resume-finetune-2-0.log").read_text()
    assert "took over the lapsed lease" in log or "waiting for it to lapse" in log, log
    (epoch,) = killed_after
    assert epoch in (2, 3), killed_after
    assert f"finetune: resuming after epoch {epoch} from its checkpoint" in log, log
    steps = [line for line in log.splitlines() if line.startswith("finetune: ") and "/96" in line]
    assert steps[0].startswith(f"finetune: {24 * epoch + 1}/96"), steps  # the next epoch's first step comes first
    assert not list(store.list("runs", f"{run_key}/finetune.checkpoints/"))  # superseded by the model

    local = make_job(workspace, evaluation=None, finetune=finetune)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pods (cpu: 1): float sums split over threads round differently
    try:
        run_job(local, show_progress=False)
    finally:
        torch.set_num_threads(threads)
    uninterrupted = load_file(str(open_run(local).layout.stage_dir(StageName.FINETUNE) / "model" / "model.safetensors"))
    resumed = load(store.get_bytes("runs", f"{run_key}/finetune/model/model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        assert (resumed[name] == tensor).all(), name
