"""The real operator (kopf.testing.KopfRunner, with the chart's ServiceAccount token and RBAC)
against a real Kubernetes control plane (API server, etcd, Job controller, scheduler, garbage
collector), the node agent that runs each stage pod's `disp run` command as a local process, and a
loopback MinIO server holding the model, the data and the run's artifacts. See
tests/harness/."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import kubernetes
import pytest

from disp_api import BackdoorVerdict, MetricsSummary, StageName, judge_residual
from disp_store.s3 import S3Store
from tests.e2e.support import (ACCESS, CREDENTIALS_SECRET, SECRET, PodFault, chart_values, finished, free_port,
                               manifest, operator, standin_manifest, wait_until)
from tests.harness.node_agent import IMAGE_BIN, STANDIN_IMAGE, LocalImage

ALL_STAGES = [s.value for s in StageName]


def test_a_manifest_runs_every_stage_and_ends_succeeded(cluster, kubelet, workspace, s3, uploaded,
                                                         monkeypatch):
    """The happy path with the real runner in every pod, plus one stage pod OOM-killed once; the
    chart's runner.logFormat json, so every line each pod writes is parsed."""
    port = free_port()
    job = manifest(workspace, s3, uploaded, cluster.namespace, parallelism={"saliencyShards": 2})
    kubelet.faults["tiny-masking"] = PodFault(137, "OOMKilled")
    values = chart_values(cluster, runner={"logFormat": "json"})
    with operator(cluster, monkeypatch, values, metrics_port=port) as runner:
        uid = cluster.create_job(job)
        body = cluster.wait_for(cluster.namespace, "tiny", finished, 300, "the job to finish")
        # kopf posts Events in the background, shortly after the status
        wait_until(lambda: any(e["reason"] == "Completed" for e in cluster.events(cluster.namespace)), 10, "the last Event")
        if any(c["type"] == "BackdoorRemoved" and c["status"] == "False" for c in body["status"]["conditions"]):
            wait_until(lambda: any(e["reason"] == "BackdoorNotRemoved" for e in cluster.events(cluster.namespace)),
                       10, "the audit's Warning")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    status = body["status"]
    assert status["phase"] == "Succeeded", status

    # Stage Jobs were created in order, each once; the sharded stage as an Indexed Job plus a merge;
    # the OOM-killed masking pod's Job was retried under a new name.
    assert kubelet.started == ["tiny-saliency", "tiny-saliency-merge", "tiny-masking", "tiny-masking-2",
                               "tiny-relabel", "tiny-finetune", "tiny-evaluate"]
    jobs = {j["metadata"]["name"]: j for j in cluster.jobs(cluster.namespace)}
    assert "tiny-masking" not in jobs  # the failed attempt was deleted (keepFailedPods is false)
    assert jobs["tiny-saliency"]["spec"]["completionMode"] == "Indexed"
    # Each pod ran the image's `disp` with the stage's arguments, the shard index expanded.
    argvs = [argv for _, argv in kubelet.processes]
    assert all(argv[:3] == ("disp", "--no-progress", "run") for argv in argvs), argvs
    assert sorted(argv[-1] for argv in argvs if "--shard" in argv) == ["0/2", "1/2"]
    assert all(j["metadata"]["ownerReferences"][0]["uid"] == uid for j in jobs.values())

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
    run = f"s3://runs/{uploaded}/runs/{cluster.namespace}/tiny/{uid}"
    assert status["purifiedModelUri"] == f"{run}/finetune/model"
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    metrics_json = json.loads(store.get_bytes("runs", f"{run.removeprefix('s3://runs/')}/evaluate/metrics.json"))
    expected = {k: v for k, v in metrics_json.items() if k in MetricsSummary.model_json_schema(by_alias=True)
                ["properties"] and v is not None}
    assert status["metrics"] == expected and {"asrBefore", "asrAfter", "cleanPerformanceAfter"} <= set(expected)
    assert store.exists("runs", f"{run.removeprefix('s3://runs/')}/finetune/model/config.json")

    # Events: one per transition; no secret anywhere.
    events = [(e["type"], e["reason"], e["message"]) for e in cluster.events(cluster.namespace)]
    reasons = [r for _, r, _ in events]
    assert reasons.count("StageStarted") == 6 and reasons.count("StageSucceeded") == 5
    retry = [e for e in events if e[1] == "StageRetrying"]
    assert len(retry) == 1 and retry[0][0] == "Warning" and "OOM-killed" in retry[0][2]
    (completed,) = [e for e in events if e[1] == "Completed"]  # Events carry no order; their count does
    assert completed[0] == "Normal" and "ASR" in completed[2]
    # The audit's verdict, as the CRD's status schema accepts it: the condition, and a Warning only
    # when the residual rate is above the job's threshold.
    judgement = judge_residual(status["metrics"].get("residualRate"), status["metrics"].get("residualSample"), 0.05)
    verdict = conditions["BackdoorRemoved"]
    assert (verdict["status"], verdict["message"]) == ({BackdoorVerdict.REMOVED: "True", BackdoorVerdict.UNKNOWN:
                                                        "Unknown"}.get(judgement.verdict, "False"), judgement.message)
    assert reasons.count("BackdoorNotRemoved") == (judgement.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED)
    # `kubectl get pj` shows it: the API server's own table for the resource (its printer columns).
    table = cluster.plane.admin().call_api(
        f"/apis/disp.dev/v1alpha1/namespaces/{cluster.namespace}/purificationjobs/tiny", "GET",
        header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"}, auth_settings=["BearerToken"],
        _preload_content=False, _return_http_data_only=True)
    table = json.loads(table.data)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert table["rows"][0]["cells"][columns.index("Removed")] == verdict["status"]
    for text in (json.dumps(body), json.dumps(events), runner.output):
        assert SECRET not in text and ACCESS not in text

    # Prometheus: the job by phase, stage durations, the retry, reconciles.
    assert 'disp_purification_jobs{phase="Succeeded"} 1.0' in scrape
    for stage in ALL_STAGES:
        assert f'disp_stage_duration_seconds_count{{result="succeeded",stage="{stage}"}} 1.0' in scrape
    assert 'disp_stage_retries_total{failure="Transient",stage="masking"} 1.0' in scrape
    assert f'disp_job_asr_after_ratio{{name="tiny",namespace="{cluster.namespace}"}} {status["metrics"]["asrAfter"]}' in scrape
    assert "disp_operator_reconciles_total" in scrape

    # Logs: every line every stage pod wrote is one JSON object naming the job, namespace and stage
    # (and the shard, in a shard's pod).
    pods = {job_name: kubelet.agent.pod_logs.get((cluster.namespace, job_name), []) for job_name in kubelet.started}
    assert sum(len(logs) for logs in pods.values()) == 7  # two shards, one OOM-killed pod wrote nothing
    for job_name, logs in pods.items():
        stage = job_name.removeprefix("tiny-").removesuffix("-merge").removesuffix("-2")
        for log in logs:
            for number, line in enumerate(log.read_text().splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise AssertionError(f"{log.name}:{number} is not JSON: {line[:200]}") from None
                assert {"time", "level", "message"} <= set(record), (log.name, record)
                assert (record.get("job"), record.get("namespace"), record.get("stage")) == \
                    ("tiny", cluster.namespace, stage), (log.name, record)
    assert any("shard" in json.loads(line) for log in pods["tiny-saliency"] for line in log.read_text().splitlines())


def test_a_permanent_failure_fails_the_job_once_without_retries(cluster, kubelet, workspace, s3, uploaded,
                                                                monkeypatch):
    """The runner rejects a dataset folder that holds no manifest (exit code 2): no retry storm."""
    job = manifest(workspace, s3, uploaded, cluster.namespace, dataset={"uri": f"s3://data/{uploaded}/no-such-dataset"})
    with operator(cluster, monkeypatch):
        cluster.create_job(job)
        body = cluster.wait_for(cluster.namespace, "tiny", finished, 120, "the job to fail")
        time.sleep(2)  # several reconcile intervals: nothing more may start
    status = body["status"]
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "StageFailed" and "saliency" in failed["message"]
    assert "no-such-dataset/: no objects" in failed["message"]  # the runner's error, via the termination message
    assert kubelet.started == ["tiny-saliency"]
    warnings = [e for e in cluster.events(cluster.namespace) if e["type"] == "Warning"]
    assert [e["reason"] for e in warnings] == ["StageFailed"]


def test_an_operator_restart_mid_stage_neither_duplicates_jobs_nor_loses_the_run(cluster, kubelet, s3, uploaded,
                                                                                  monkeypatch):
    kubelet.standin_seconds = 3.0
    with operator(cluster, monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "restart"))
        wait_until(lambda: "restart-relabel" in kubelet.started, 60, "the relabel pod to start")
    started_before = list(kubelet.started)
    kubelet.standin_seconds = 0.3
    with operator(cluster, monkeypatch):  # a new operator process against the same API state
        body = cluster.wait_for(cluster.namespace, "restart", finished, 60, "the job to finish")
    assert body["status"]["phase"] == "Succeeded"
    assert started_before[-1] == "restart-relabel"
    assert kubelet.started == ["restart-saliency", "restart-masking", "restart-relabel", "restart-finetune",
                               "restart-evaluate"]  # each exactly once: the running relabel was adopted
    assert body["status"]["metrics"]["asrAfter"] == 0.02
    assert all(s["attempts"] == 1 for s in body["status"]["stages"])


def test_suspend_stops_the_running_stage_and_resume_continues_from_the_last_completed_one(cluster, kubelet, s3,
                                                                                         uploaded, monkeypatch):
    kubelet.standin_seconds = 3.0
    with operator(cluster, monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "pause"))
        wait_until(lambda: "pause-relabel" in kubelet.started, 60, "the relabel pod to start")
        cluster.set_suspend(cluster.namespace, "pause", True)
        body = cluster.wait_for(cluster.namespace, "pause", lambda b: b.get("status", {}).get("phase") == "Suspended", 20,
                                "the job to be suspended")
        # its Job was deleted, so its pod was stopped
        wait_until(lambda: "pause-relabel" in kubelet.killed, 10, "the relabel pod to be killed")
        assert "pause-relabel" not in {j["metadata"]["name"] for j in cluster.jobs(cluster.namespace)}
        suspended = next(c for c in body["status"]["conditions"] if c["type"] == "Suspended")
        assert suspended["status"] == "True" and suspended["observedGeneration"] == 2
        time.sleep(1.5)
        assert kubelet.started[-1] == "pause-relabel"  # nothing starts while suspended
        kubelet.standin_seconds = 0.3
        cluster.set_suspend(cluster.namespace, "pause", False)
        body = cluster.wait_for(cluster.namespace, "pause", finished, 60, "the job to finish")
    assert body["status"]["phase"] == "Succeeded"
    assert kubelet.started == ["pause-saliency", "pause-masking", "pause-relabel", "pause-relabel-2",
                               "pause-finetune", "pause-evaluate"]
    relabel = next(s for s in body["status"]["stages"] if s["name"] == "relabel")
    assert (relabel["attempts"], relabel["failures"]) == (2, 0)
    reasons = [e["reason"] for e in cluster.events(cluster.namespace)]
    assert reasons.count("Suspended") == 1 and reasons.count("Resumed") == 1


@pytest.mark.parametrize("case, change, message", [
    ("missing secret", {"storage": {"endpoint": "x:9000", "secure": False, "credentialsSecret": {"name": "nope"}}},
     "spec.storage.credentialsSecret.name: Secret 'nope' does not exist"),
    ("pickle model", {"model": {"uri": "s3://models/PREFIX/pickled"}}, "spec.model.allowUnsafePickle"),
    ("unknown model family", {"model": {"uri": "s3://models/PREFIX/mmada"}}, "model_type is 'mmada'"),
    ("missing signing secret", {"provenance": {"signingKeySecret": {"name": "no-signer", "key": "key.pem"}}},
     "spec.provenance.signingKeySecret.name: Secret 'no-signer' does not exist"),
])
def test_an_invalid_spec_fails_at_once_without_children(cluster, kubelet, s3, uploaded, monkeypatch, case, change,
                                                       message):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    store.put_bytes("models", f"{uploaded}/pickled/config.json", b"{}")
    store.put_bytes("models", f"{uploaded}/pickled/pytorch_model.bin", b"not really")
    store.put_bytes("models", f"{uploaded}/mmada/config.json", b'{"model_type": "mmada"}')
    store.put_bytes("models", f"{uploaded}/mmada/model.safetensors", b"")
    change = json.loads(json.dumps(change).replace("PREFIX", uploaded))
    with operator(cluster, monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "bad", **change))
        body = cluster.wait_for(cluster.namespace, "bad", finished, 30, "the job to be rejected")
        # kopf posts Events from a queue after the status patch: wait for it before the operator stops
        wait_until(lambda: any(e["reason"] == "InvalidSpec" for e in cluster.events(cluster.namespace)), 10,
                   "the InvalidSpec Event")
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert body["status"]["phase"] == "Failed" and failed["reason"] == "InvalidSpec"
    assert message in failed["message"]
    assert kubelet.started == [] and cluster.jobs(cluster.namespace) == []
    (event,) = [e for e in cluster.events(cluster.namespace) if e["reason"] == "InvalidSpec"]
    assert event["type"] == "Warning" and message in event["message"]


# LLaDA-V's published sizes, as its config.json states them.
LLADA_V_CONFIG = {"model_type": "llava_llada", "vocab_size": 126464, "hidden_size": 4096, "intermediate_size": 12288,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                  "torch_dtype": "bfloat16"}


def test_the_chart_gpu_memory_refuses_a_batch_that_cannot_fit_and_status_shows_each_stage_floor(
        cluster, kubelet, s3, uploaded, monkeypatch):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    store.put_bytes("models", f"{uploaded}/llada-v/config.json", json.dumps(LLADA_V_CONFIG).encode())
    store.put_bytes("models", f"{uploaded}/llada-v/model.safetensors", b"")
    gpu_job = {"model": {"uri": f"s3://models/{uploaded}/llada-v"}, "resources": {"gpus": 1}}
    with operator(cluster, monkeypatch, chart_values(cluster, runner={"gpuMemoryGiB": 80})):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "too-wide", saliency={"batchSize": 64},
                                            **gpu_job))
        # suspended: admitted and planned, but no pod asks for a GPU this machine does not have
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "fits", saliency={"batchSize": 4},
                                            relabel={"batchSize": 8}, finetune={"batchSize": 8},
                                            policy={"suspend": True}, **gpu_job))
        refused = cluster.wait_for(cluster.namespace, "too-wide", finished, 30, "the job to be refused")
        planned = cluster.wait_for(cluster.namespace, "fits", lambda b: (b.get("status") or {}).get("phase") ==
                                   "Suspended", 30, "the job to be suspended")
    failed = next(c for c in refused["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert failed["message"].startswith("spec.saliency.batchSize: 64 rows per GPU need at least ")
    assert "of the cluster's 80 GiB GPUs (the chart's runner.gpuMemoryGiB); at most " in failed["message"]
    floors = {s["name"]: s.get("minimumMemoryGiB") for s in planned["status"]["stages"]}
    assert floors["masking"] is None and all(15.7 < floors[s] < 78 for s in ("saliency", "relabel", "finetune")), floors
    assert kubelet.started == [] and cluster.jobs(cluster.namespace) == []


def test_a_job_whose_signing_secret_exists_runs_and_its_pods_get_the_key(cluster, kubelet, s3, uploaded, monkeypatch):
    """The operator asks only for the signing Secret's metadata (the key never reaches it); the
    stage pods get it through a secretKeyRef."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()).decode()
    cluster.apply_secret(cluster.namespace, "signer", {"key.pem": pem})
    kubelet.standin_seconds = 0.2
    with operator(cluster, monkeypatch) as running:
        uid = cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "signed", provenance={
            "signingKeySecret": {"name": "signer", "key": "key.pem"}}))
        body = cluster.wait_for(cluster.namespace, "signed", finished, 60, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    assert store.exists("runs", f"{uploaded}/runs/{cluster.namespace}/signed/{uid}/provenance.sig.json")
    env = [e for j in cluster.jobs(cluster.namespace) for e in j["spec"]["template"]["spec"]["containers"][0]["env"]
           if e["name"] == "DISP_SIGNING_KEY"]
    assert env and all(e["valueFrom"]["secretKeyRef"] == {"name": "signer", "key": "key.pem"} for e in env)
    assert "PRIVATE KEY" not in running.output and pem.splitlines()[1] not in running.output


def test_deleting_a_job_with_cleanup_removes_its_intermediates_but_keeps_the_model(cluster, kubelet, s3, uploaded,
                                                                                   monkeypatch):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    with operator(cluster, monkeypatch):
        uid = cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "tidy",
                                                  policy={"cleanupArtifacts": True}))
        run_key = f"{uploaded}/runs/{cluster.namespace}/tidy/{uid}"
        cluster.wait_for(cluster.namespace, "tidy", finished, 60, "the job to finish")
        store.put_bytes("runs", f"{run_key}/finetune/model/config.json", b"{}")  # what the real finetune leaves
        store.put_bytes("runs", f"{run_key}/provenance.json", b"{}")  # and the record of what made it
        assert store.exists("runs", f"{run_key}/evaluate/metrics.json")
        cluster.delete_job(cluster.namespace, "tidy")
        wait_until(lambda: "tidy" not in cluster.list_jobs(cluster.namespace), 20, "the job to be deleted")
    left = sorted(key for key, _, _ in store.list("runs", run_key + "/"))
    assert left == [f"{run_key}/finetune/model/config.json", f"{run_key}/provenance.json"]


def test_a_backdoor_the_first_round_leaves_gets_a_second_round_of_stage_jobs(cluster, kubelet, s3, uploaded,
                                                                             monkeypatch):
    """The closed loop on the real control plane: round 1's audit (30% of the suspects keep their
    answer) starts round 2's stage Jobs; its audit (0%) ends the loop; the evaluation measures round
    2's model, which the status names and clean-up keeps."""
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    kubelet.agent.extra_env["STANDIN_RESIDUALS"] = "loop:0.3,0.0"
    port = free_port()
    with operator(cluster, monkeypatch, metrics_port=port):
        uid = cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "loop",
                                                  policy={"cleanupArtifacts": True}))
        body = cluster.wait_for(cluster.namespace, "loop", finished, 90, "the job to finish")
        wait_until(lambda: any(e["reason"] == "RoundStarted" for e in cluster.events(cluster.namespace)), 10,
                   "the RoundStarted Event")
        run_key = f"{uploaded}/runs/{cluster.namespace}/loop/{uid}"
        assert store.exists("runs", f"{run_key}/round-2/evaluate/metrics.json")
        assert not store.exists("runs", f"{run_key}/evaluate/metrics.json")
        store.put_bytes("runs", f"{run_key}/round-2/finetune/model/config.json", b"{}")  # what the real finetune leaves
        events = [e for e in cluster.events(cluster.namespace) if e["reason"] == "RoundStarted"]
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        cluster.delete_job(cluster.namespace, "loop")
        wait_until(lambda: "loop" not in cluster.list_jobs(cluster.namespace), 20, "the job to be deleted")
    status = body["status"]
    assert status["phase"] == "Succeeded", status
    assert kubelet.started == ["loop-saliency", "loop-masking", "loop-relabel", "loop-finetune",
                               "loop-r2-saliency", "loop-r2-masking", "loop-r2-relabel", "loop-r2-finetune",
                               "loop-r2-evaluate"]
    argvs = [argv for _, argv in kubelet.processes]
    assert [argv[argv.index("--round") + 1] for argv in argvs if "--round" in argv] == ["2"] * 5
    # The API server kept what the operator wrote: the rounds, each stage's round, the kept model.
    assert [(r["round"], r["recipe"], r.get("verdict")) for r in status["rounds"]] == \
        [(1, "spec", "ProbablyNotRemoved"), (2, "pixels", "Removed")]
    assert status["rounds"][1]["reason"].startswith("round 1 left a residual rate of 30.0% of 21 suspects")
    assert [(s["name"], s.get("round", 1)) for s in status["stages"]][-2:] == [("finetune", 2), ("evaluate", 2)]
    assert status["purifiedModelUri"] == f"s3://runs/{run_key}/round-2/finetune/model"
    removed = next(c for c in status["conditions"] if c["type"] == "BackdoorRemoved")
    assert removed["status"] == "True"
    assert "round 2's model kept" in status["message"]
    assert len(events) == 1 and events[0]["type"] == "Normal" and "round 2 (pixels recipe) starts" in events[0]["message"]
    labels = f'name="loop",namespace="{cluster.namespace}"'
    assert f"disp_job_round{{{labels}}} 2.0" in scrape and f"disp_job_backdoor_removed{{{labels}}} 1.0" in scrape
    left = sorted(key for key, _, _ in store.list("runs", run_key + "/"))
    assert left == [f"{run_key}/round-2/finetune/model/config.json", f"{run_key}/round-2/provenance.json"]


def test_without_cleanup_a_deleted_job_leaves_its_artifacts(cluster, kubelet, s3, uploaded, monkeypatch):
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    with operator(cluster, monkeypatch):
        uid = cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "keep"))
        cluster.wait_for(cluster.namespace, "keep", finished, 60, "the job to finish")
        cluster.delete_job(cluster.namespace, "keep")
        wait_until(lambda: not cluster.list_jobs(cluster.namespace), 20, "the job to be deleted")
    assert store.exists("runs", f"{uploaded}/runs/{cluster.namespace}/keep/{uid}/evaluate/metrics.json")


def test_a_finished_job_past_its_time_to_live_is_deleted_with_its_stage_jobs_and_intermediates(
        cluster, kubelet, s3, uploaded, monkeypatch):
    """policy.ttlSecondsAfterFinished: the operator deletes the finished PurificationJob (by uid),
    the garbage collector its stage Jobs, and its clean-up handler the run's intermediates."""
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    kubelet.standin_seconds = 0.2
    with operator(cluster, monkeypatch):
        uid = cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "brief",
                                                  policy={"ttlSecondsAfterFinished": 3, "cleanupArtifacts": True}))
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "lasting"))
        body = cluster.wait_for(cluster.namespace, "brief", finished, 60, "the job to finish")
        seen_finished = time.monotonic()
        assert body["status"]["phase"] == "Succeeded"
        wait_until(lambda: "brief" not in cluster.list_jobs(cluster.namespace), 30, "the job to expire")
        lived = time.monotonic() - seen_finished
        cluster.wait_for(cluster.namespace, "lasting", finished, 60, "the other job to finish")
        time.sleep(2)
    assert lived > 2.0  # not before its time (3 s after it finished, which the test saw a little later)
    assert "lasting" in cluster.list_jobs(cluster.namespace)  # no TTL: kept
    wait_until(lambda: not [j for j in cluster.jobs(cluster.namespace) if j["metadata"]["name"].startswith("brief-")],
               30, "its stage Jobs to go")
    run_key = f"{uploaded}/runs/{cluster.namespace}/brief/{uid}"
    assert [key for key, _, _ in store.list("runs", run_key + "/")] == [f"{run_key}/provenance.json"]


def test_a_job_deleted_while_no_operator_runs_goes_at_once_unless_it_asked_for_clean_up(cluster, kubelet, s3,
                                                                                       uploaded, monkeypatch):
    """Only a job with policy.cleanupArtifacts carries a finalizer: deleting it while the operator is
    away waits for one, which then cleans up and lets it go; any other job is deleted at once."""
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    listed = lambda: cluster.list_jobs(cluster.namespace)  # noqa: E731
    with operator(cluster, monkeypatch):
        uid = cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "tidy",
                                                  policy={"cleanupArtifacts": True}))
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "plain"))
        for name in ("tidy", "plain"):
            cluster.wait_for(cluster.namespace, name, finished, 60, f"{name} to finish")
    run_key = f"{uploaded}/runs/{cluster.namespace}/tidy/{uid}"
    jobs = listed()
    assert jobs["plain"]["metadata"].get("finalizers", []) == []
    assert jobs["tidy"]["metadata"].get("finalizers")  # the operator's, for the clean-up
    store.put_bytes("runs", f"{run_key}/finetune/model/config.json", b"{}")  # what the real finetune leaves
    store.put_bytes("runs", f"{run_key}/provenance.json", b"{}")  # and the record of what made it
    # The operator is gone (helm uninstall keeps the CRD and so the jobs).
    for name in ("tidy", "plain"):
        cluster.delete_job(cluster.namespace, name)
    jobs = listed()
    assert "plain" not in jobs  # no finalizer: gone without any operator
    assert jobs["tidy"]["metadata"].get("deletionTimestamp")  # waits for an operator to clean up
    assert store.exists("runs", f"{run_key}/evaluate/metrics.json")
    with operator(cluster, monkeypatch):  # an operator comes back: it cleans up and removes its finalizer
        wait_until(lambda: "tidy" not in listed(), 30, "the job to be deleted")
    left = sorted(key for key, _, _ in store.list("runs", run_key + "/"))
    assert left == [f"{run_key}/finetune/model/config.json", f"{run_key}/provenance.json"]


def _condition(body: dict, kind: str) -> dict:
    return next((c for c in body.get("status", {}).get("conditions", []) if c["type"] == kind), {})


def test_an_unschedulable_stage_pod_stalls_the_job_visibly_until_it_is_suspended(cluster, kubelet, s3, uploaded,
                                                                                  monkeypatch):
    """More GPUs than any node has: the real scheduler refuses the stage pod and says why."""
    message = "Insufficient nvidia.com/gpu"  # the scheduler's own words; the largest node has one GPU
    port = free_port()
    with operator(cluster, monkeypatch, metrics_port=port):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "pending",
                                            resources={"gpus": 4, "cpu": "1", "memory": "1Gi"}))
        body = cluster.wait_for(cluster.namespace, "pending", lambda b: _condition(b, "Stalled").get("status") == "True", 30,
                                "the job to be stalled")
        stalled = _condition(body, "Stalled")
        assert stalled["reason"] == "Unschedulable" and message in stalled["message"]
        assert body["status"]["phase"] == "Running" and message in body["status"]["stages"][0]["message"]
        wait_until(lambda: any(e["reason"] == "Unschedulable" and e["type"] == "Warning"
                               for e in cluster.events(cluster.namespace)), 10, "the Warning Event")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f'disp_job_pending_pod_seconds{{name="pending",namespace="{cluster.namespace}"}}' in scrape
        cluster.set_suspend(cluster.namespace, "pending", True)
        body = cluster.wait_for(cluster.namespace, "pending", lambda b: b.get("status", {}).get("phase") == "Suspended", 20,
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

    from disp_runner.pipeline.opening import open_run
    from disp_runner.pipeline.runner import run_job
    from tests.tiny import make_job

    # 24 steps an epoch, through every weight: about a second an epoch to be killed in.
    finetune = {"epochs": 4, "batchSize": 1, "learningRate": 0.001, "trainable": "all"}
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    run_key = ""  # known once the API server gives the job its uid
    killed_after: list[int] = []

    def epoch_two_is_saved() -> bool:
        if not run_key:
            return False
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
    with operator(cluster, monkeypatch):
        uid = cluster.create_job(manifest(workspace, s3, uploaded, cluster.namespace, name="resume", evaluation=None,
                                          finetune=finetune))
        run_key = f"{uploaded}/runs/{cluster.namespace}/resume/{uid}"
        body = cluster.wait_for(cluster.namespace, "resume", finished, 300, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert kubelet.started[-2:] == ["resume-finetune", "resume-finetune-2"]
    stage = next(s for s in body["status"]["stages"] if s["name"] == "finetune")
    assert (stage["attempts"], stage["failures"]) == (2, 1)
    log = kubelet.log("resume-finetune-2")
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


def test_a_pod_the_cluster_disrupts_is_replaced_by_the_job_controller_without_spending_an_attempt(
        cluster, kubelet, s3, uploaded, monkeypatch):
    """The stage Job's pod failure policy on the real Job controller: an evicted pod (Failed, with
    the DisruptionTarget condition the kubelet adds) is ignored and replaced within the same Job, so
    the run neither makes a second attempt nor counts a failure against spec.policy.backoffLimit."""
    kubelet.standin_seconds = 0.3
    kubelet.faults["evict-masking"] = PodFault(None, "Evicted", "The node was low on resource: memory.")
    with operator(cluster, monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "evict"))
        body = cluster.wait_for(cluster.namespace, "evict", finished, 90, "the job to finish")
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert kubelet.started == ["evict-saliency", "evict-masking", "evict-relabel", "evict-finetune", "evict-evaluate"]
    masking = next(s for s in body["status"]["stages"] if s["name"] == "masking")
    assert (masking["attempts"], masking.get("failures", 0)) == (1, 0)
    core = kubernetes.client.CoreV1Api(cluster.plane.admin())
    pods = core.list_namespaced_pod(cluster.namespace, label_selector="batch.kubernetes.io/job-name=evict-masking").items
    assert sorted((p.status.phase, p.status.reason or "") for p in pods) == [("Failed", "Evicted"), ("Succeeded", "")]
    assert not [e for e in cluster.events(cluster.namespace) if e["reason"] == "StageRetrying"]


def test_a_job_naming_an_endpoint_outside_the_fence_fails_before_any_connection(cluster, kubelet, s3, uploaded,
                                                                                monkeypatch):
    """The chart's storage.allowedEndpoints: a job that names another endpoint (here a listener that
    records every connection) fails InvalidSpec without the operator reading its Secret or
    connecting; a job on the allowed endpoint runs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    connections: list[tuple[str, int]] = []
    stop = threading.Event()

    def record() -> None:
        while not stop.is_set():
            try:
                conn, peer = listener.accept()
            except OSError:
                continue
            connections.append(peer)
            conn.close()

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    elsewhere = f"127.0.0.1:{listener.getsockname()[1]}"
    kubelet.standin_seconds = 0.2
    values = chart_values(cluster, storage={"allowedEndpoints": [s3]})
    try:
        with operator(cluster, monkeypatch, values):
            cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "fenced", storage={
                "endpoint": elsewhere, "secure": False, "credentialsSecret": {"name": CREDENTIALS_SECRET}}))
            cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "allowed"))
            refused = cluster.wait_for(cluster.namespace, "fenced", finished, 30, "the fenced job to fail")
            ran = cluster.wait_for(cluster.namespace, "allowed", finished, 90, "the allowed job to finish")
    finally:
        stop.set()
        recorder.join(5)
        listener.close()
    failed = next(c for c in refused["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and failed["message"].startswith("spec.storage.endpoint: ")
    assert f"storage.allowedEndpoints: {s3}" in failed["message"]
    assert connections == []  # not one connection to the endpoint outside the fence
    assert ran["status"]["phase"] == "Succeeded", ran["status"]
    assert not any(job.startswith("fenced-") for job in kubelet.started)


def test_every_stage_of_a_run_runs_the_image_digest_its_first_stage_ran_after_the_tag_moves(
        cluster, kubelet, s3, uploaded, monkeypatch, tmp_path):
    """status.runnerImage: the digest the first stage pod runs (its imageID). The tag is re-pointed
    while the first stage runs (a re-pushed tag, an upgrade) at an image whose `disp` fails: every
    later stage still runs the recorded digest, and the run succeeds."""
    agent = kubelet.agent
    moving = "registry.example/disp-standin:moving"
    standin = agent.images[STANDIN_IMAGE]
    broken_bin = tmp_path / "broken-bin"
    broken_bin.mkdir()
    (broken_bin / "disp").write_text("#!/bin/sh\necho 'this is not the image the run started with' >&2\nexit 1\n")
    (broken_bin / "disp").chmod(0o755)
    broken = LocalImage(standin.config, {**standin.folders, IMAGE_BIN: broken_bin})
    agent.tag(moving, standin)
    kubelet.standin_seconds = 1.5
    try:
        with operator(cluster, monkeypatch):
            cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "pinned",
                                                resources={"gpus": 0, "cpu": "1", "memory": "1Gi", "image": moving}))
            # Re-pointed once the first stage's container runs (the operator has recorded its digest
            # from the running pod, before its Job completes).
            cluster.wait_for(cluster.namespace, "pinned", lambda b: (b.get("status") or {}).get("runnerImage"), 60,
                             "the first stage's digest to be recorded")
            assert "pinned-masking" not in kubelet.started
            agent.tag(moving, broken)
            body = cluster.wait_for(cluster.namespace, "pinned", finished, 90, "the job to finish")
    finally:
        agent.images.pop(moving, None)
    assert body["status"]["phase"] == "Succeeded", body["status"]
    pinned = f"registry.example/disp-standin@{standin.digest}"
    assert body["status"]["runnerImage"] == pinned
    images = {j["metadata"]["name"]: j["spec"]["template"]["spec"]["containers"][0]["image"]
              for j in cluster.jobs(cluster.namespace)}
    assert images.pop("pinned-saliency") == moving  # the first stage ran the tag, whose digest was recorded
    assert set(images) == {"pinned-masking", "pinned-relabel", "pinned-finetune", "pinned-evaluate"}
    assert set(images.values()) == {pinned}
    env = {e["name"]: e.get("value") for j in cluster.jobs(cluster.namespace) if j["metadata"]["name"] == "pinned-evaluate"
           for e in j["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DISP_RUNNER_IMAGE"] == pinned  # what the stage manifest and provenance record
    core = kubernetes.client.CoreV1Api(cluster.plane.admin())
    ran = {p.metadata.labels["batch.kubernetes.io/job-name"]: p.status.container_statuses[0].image_id
           for p in core.list_namespaced_pod(cluster.namespace).items}
    assert set(ran.values()) == {pinned}, ran
