"""The images, built for real from the Dockerfile (podman, runc), and the pods the operator builds,
run in them with their security settings: what a cluster would run, with no stand-in in between.
See tests/harness/podman.py for how a pod spec becomes a `podman run`."""

from __future__ import annotations

import copy
import json
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from disp_api import MetricsSummary, PurificationJob, StageName
from disp_api.status import StepKind
from disp_operator.jobs import RunnerDefaults, stage_job
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RunLayout
from disp_runner.pipeline.runner import run_job
from disp_store.s3 import S3Store

import tests.harness.podman as podman_module
from tests.harness.podman import (
    OPERATOR_IMAGE,
    RUNNER_IMAGE,
    RUNTIME_FLAGS,
    ContainerRun,
    RuntimeUnavailable,
    build_images,
    inspect_config,
    podman,
    run_pod,
    started_pod,
)
from tests.e2e.support import ACCESS, CREDENTIALS_SECRET, SECRET, delete_lease, free_port, install, manifest
from tests.harness.cluster import OPERATOR_NAMESPACE
from tests.harness.container_rules import (
    ImageConfig,
    image_config,
    process_argv,
)
from tests.tiny import job_document

REPO = Path(__file__).resolve().parents[2]
UID = "5f0c7a52-0000-4000-8000-00000000c0c0"


def secrets(name: str, key: str) -> str | None:
    return {(CREDENTIALS_SECRET, "accessKey"): ACCESS, (CREDENTIALS_SECRET, "secretKey"): SECRET}.get((name, key))


def unique(prefix: str) -> str:
    return f"disp-test-{prefix}-{uuid.uuid4().hex[:6]}"


def test_a_machine_that_cannot_build_or_run_containers_is_told_why_in_one_line(tmp_path, monkeypatch):
    failing = tmp_path / "build.sh"
    failing.write_text("echo 'images: building' >&2\necho 'images: error: debootstrap failed' >&2\nexit 1\n")
    monkeypatch.setattr(podman_module, "BUILD_SCRIPT", failing)
    with pytest.raises(RuntimeUnavailable) as failed:
        build_images()
    assert str(failed.value) == "containers/build-images.sh failed (exit 1): images: error: debootstrap failed"
    monkeypatch.setattr(podman_module.shutil, "which", lambda name: None)
    monkeypatch.setattr(podman_module.os, "geteuid", lambda: 1000)
    with pytest.raises(RuntimeUnavailable, match="podman is not installed and the tests are not root"):
        build_images()


def test_the_images_are_configured_as_the_dockerfile_says(images):
    """The node agent reads ENTRYPOINT/CMD/ENV/USER from the Dockerfile; the builder must agree."""
    for target in ("runner", "operator"):
        assert inspect_config(images[target]) == image_config(REPO / "Dockerfile", target), target


def test_a_digest_names_the_same_image_after_its_tag_is_re_pointed(images):
    """The rule the operator's pinning (status.runnerImage) and the node agent rest on, held by a
    real runtime: `repository@sha256:<digest>` of a locally built image is a reference the runtime
    runs, and it still runs the first image after the tag was moved to another one."""
    probe = f"localhost/disp-pin-probe:{uuid.uuid4().hex[:8]}"
    has_torch = "import importlib.util; print(importlib.util.find_spec('torch') is not None)"
    podman("tag", images["operator"], probe)
    try:
        digest = podman("image", "inspect", probe, "--format", "{{.Digest}}").stdout.strip()
        pinned = f"{probe.rsplit(':', 1)[0]}@{digest}"
        podman("tag", images["runner"], probe)  # the tag now names the runner image
        runs = {reference: podman("run", "--rm", *RUNTIME_FLAGS, "--network", "none", "--entrypoint", "python",
                                  reference, "-c", has_torch).stdout.strip() for reference in (pinned, probe)}
    finally:
        podman("rmi", probe, check=False)
    assert runs == {pinned: "False", probe: "True"}  # by digest: the operator image (no torch) still


def test_the_runner_image_loads_its_shipped_model_as_the_pod_user_on_a_read_only_root(images, tmp_path):
    """The wheel carries the embedded model, the non-root user can read it, and nothing but the
    scratch volume is written (the default `disp` user, a read-only root, an empty scratch)."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o777)
    scratch.chmod(0o777)
    name = unique("assets")
    code = ("from disp_runner.scratch import prepare_scratch; prepare_scratch(); "
            "from disp_runner.models.loading import load_model; from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL; "
            "model, processor = load_model(SHIPPED_BASE_MODEL); "
            "print(sum(p.numel() for p in model.parameters()), processor.tokenizer.mask_token)")
    run = podman("run", "--name", name, *RUNTIME_FLAGS, "--network", "none", "--read-only", "--read-only-tmpfs=false",
                 "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "-v", f"{scratch}:/scratch",
                 "--entrypoint", "python", images["runner"], "-c", code, check=False)
    try:
        assert run.returncode == 0, run.stderr[-2000:]
        parameters, mask = run.stdout.split()
        assert int(parameters) > 100_000 and mask == "[MASK]"
        assert json.loads(podman("diff", "--format", "json", name).stdout or "{}").get("added") in (None, [])
    finally:
        podman("rm", "--force", name, check=False)


def test_the_runtime_merges_command_and_args_with_the_image_as_the_rules_say(images, tmp_path):
    """The node agent's command/args rules (container_rules.process_argv), checked against
    podman with a probe image whose entry point and command echo what they were given."""
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM localhost/disp-python:3.11-bookworm AS probe\n"
                          'ENTRYPOINT ["/bin/echo", "entry"]\nCMD ["from-cmd"]\n')
    probe = f"localhost/disp-probe:{uuid.uuid4().hex[:8]}"
    podman("build", "--runtime", "runc", "-t", probe, "-f", str(dockerfile), str(tmp_path))
    try:
        config = image_config(dockerfile, "probe")
        assert inspect_config(probe) == config
        env = [{"name": "GREETING", "value": "hi"}]
        cases = [{}, {"args": ["$(GREETING)", "$$(GREETING)"]}, {"command": ["/bin/echo", "cmd"]},
                 {"command": ["/bin/echo", "$(GREETING)"], "args": ["a", "$(NOT_SET)"]}]
        for case in cases:
            pod = {"metadata": {}, "spec": {"containers": [{"name": "c", "image": probe, "env": env, **case}]}}
            run = run_pod(pod, config, secrets, tmp_path, unique("probe"))
            expected = process_argv(config, pod["spec"]["containers"][0], {"GREETING": "hi"})
            assert expected[0] == "/bin/echo"
            assert run.exit_code == 0 and run.logs.strip() == " ".join(expected[1:]), (case, run.logs)
    finally:
        podman("rmi", probe, check=False)


def _run_stage_step(cluster, job: PurificationJob, stage: StageName, step: StepKind, runner: ImageConfig,
                    workdir: Path) -> list[ContainerRun]:
    """One stage step's pods, all at once: the operator's stage Job is given to the real API
    server and Job controller (with a scheduler name no scheduler serves, so the pods stay
    unbound), and the pods the controller makes of it (an Indexed Job's index in each) run in
    podman instead of on a node."""
    manifest = stage_job(job, stage, step, 1, RunnerDefaults(image=RUNNER_IMAGE))
    manifest["metadata"]["namespace"] = cluster.namespace
    del manifest["metadata"]["ownerReferences"]  # the PurificationJob is not in this API server
    manifest["spec"]["template"]["spec"]["schedulerName"] = "podman-in-this-test"
    name = manifest["metadata"]["name"]
    cluster.batch.create_namespaced_job(cluster.namespace, manifest)
    expected = job.spec.shards(stage) if step is StepKind.SHARDS else 1
    try:
        pods = _wait(lambda: (lambda found: found if len(found) == expected else None)(
            [p for p in cluster.pods(cluster.namespace)
             if p["metadata"]["labels"].get("batch.kubernetes.io/job-name") == name]), 60, f"the pods of {name}")
        with ThreadPoolExecutor(len(pods)) as pool:
            return list(pool.map(lambda pod: run_pod(pod, runner, secrets, workdir, unique(stage.value)), pods))
    finally:
        cluster.batch.delete_namespaced_job(name, cluster.namespace, propagation_policy="Background")


def test_every_stage_runs_in_the_runner_image_under_the_pod_security_settings(images, cluster, workspace, s3,
                                                                              uploaded, tmp_path):
    doc = manifest(workspace, s3, uploaded, "ml-team", name="contained", parallelism={"saliencyShards": 2})
    job = PurificationJob.model_validate({**doc, "metadata": {**doc["metadata"], "uid": UID}})
    runner = inspect_config(images["runner"])
    for stage in job.spec.stages():
        steps = [StepKind.SHARDS, StepKind.MERGE] if job.spec.shards(stage) > 1 else [StepKind.RUN]
        for step in steps:
            for run in _run_stage_step(cluster, job, stage, step, runner, tmp_path):
                assert run.exit_code == 0, f"{stage.value}/{step.value}: exit {run.exit_code}\n{run.logs[-3000:]}"
                # read-only root: nothing but the scratch volume (and /dev/shm) was written
                assert run.root_changes == [], (stage.value, run.root_changes)
                assert SECRET not in run.logs and ACCESS not in run.logs

    # The run in S3 is complete, and it is the run `disp run` makes in-process from the same files.
    store = S3Store(s3, ACCESS, SECRET, secure=False)
    run_key = job.run_uri().removeprefix("s3://runs/")
    contained = {stage: json.loads(store.get_bytes("runs", f"{run_key}/{stage.value}/{STAGE_MANIFEST}"))
                 for stage in StageName}
    local_job = PurificationJob.model_validate(job_document(workspace))
    run_job(local_job, show_progress=False)
    layout = RunLayout.for_job(local_job, workspace / "out")
    for stage in StageName:
        local = json.loads((layout.stage_dir(stage) / STAGE_MANIFEST).read_text())
        assert {f["path"] for f in contained[stage]["files"]} == {f["path"] for f in local["files"]}, stage
    hashes = {stage: {f["path"]: f["sha256"] for f in contained[stage]["files"]} for stage in StageName}
    local_hashes = {stage: {f["path"]: f["sha256"] for f in json.loads(
        (layout.stage_dir(stage) / STAGE_MANIFEST).read_text())["files"]} for stage in StageName}
    # the method's outputs are the same bytes (sharded in containers, unsharded here)
    assert hashes[StageName.SALIENCY] == local_hashes[StageName.SALIENCY]
    assert hashes[StageName.MASKING]["masked.json"] == local_hashes[StageName.MASKING]["masked.json"]
    summary = set(MetricsSummary.model_json_schema(by_alias=True)["properties"])
    metrics = json.loads(store.get_bytes("runs", f"{run_key}/evaluate/metrics.json"))
    local_metrics = json.loads((layout.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())
    assert {k: metrics[k] for k in summary if k in metrics} == {k: local_metrics[k] for k in summary
                                                                  if k in local_metrics}
    assert metrics["asrBefore"] is not None and metrics["cleanPerformanceAfter"] is not None


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_the_operator_image_runs_the_charts_deployment_without_torch(images, cluster, workspace, s3, uploaded,
                                                                     tmp_path):
    help_run = podman("run", "--rm", *RUNTIME_FLAGS, "--network", "none", images["operator"], "--help")
    assert "usage: disp-operator" in help_run.stdout
    probe = podman("run", "--rm", *RUNTIME_FLAGS, "--network", "none", "--entrypoint", "python",
                   images["operator"], "-c",
                   "import importlib.util as u, disp_operator.handlers, disp_store.s3; "
                   "print([u.find_spec(m) for m in ('torch', 'disp_runner')])")
    assert probe.stdout.strip() == "[None, None]"  # the operator image starts, with no torch and no runner code

    # The chart's own Deployment (securityContext, volumes, args, env) with this image, against the
    # real API server with its ServiceAccount's token in a kubeconfig (outside a cluster no token
    # is mounted for it).
    health, metrics = free_port(), free_port()
    namespace = cluster.namespace
    chart = install(cluster, {"image": {"repository": OPERATOR_IMAGE.rsplit(":", 1)[0],
                                        "tag": OPERATOR_IMAGE.rsplit(":", 1)[1], "pullPolicy": "Never"},
                              "watchNamespaces": [namespace],
                              "operator": {"healthPort": health, "metricsPort": metrics,
                                           "reconcileIntervalSeconds": 1}}, embed_ca=True)
    template = copy.deepcopy(chart.deployment["spec"]["template"])
    # what the API server gives the ReplicaSet's pod (the downward API reads them: leader election)
    template["metadata"].update(name=unique("disp-operator"), namespace=OPERATOR_NAMESPACE)
    delete_lease(cluster)  # no earlier test's Lease to wait out: the pod leads at once
    kube = tmp_path / "kube"
    kube.mkdir(mode=0o755)
    (kube / "config").write_text(chart.kubeconfig.read_text())
    (kube / "config").chmod(0o644)
    template["spec"]["volumes"].append({"name": "kubeconfig", "hostPath": {"path": str(kube)}})
    (container,) = template["spec"]["containers"]
    container["volumeMounts"].append({"name": "kubeconfig", "mountPath": "/disp-kube", "readOnly": True})
    container["env"].append({"name": "KUBECONFIG", "value": "/disp-kube/config"})
    with started_pod(template, inspect_config(images["operator"]), secrets, tmp_path, unique("operator")) as stop:
        url = f"http://127.0.0.1:{health}/healthz"
        _wait(lambda: urllib.request.urlopen(url, timeout=2).status == 200, 90, "/healthz")
        cluster.create_job(manifest(workspace, s3, uploaded, namespace, name="from-image"))
        names = _wait(lambda: [j["metadata"]["name"] for j in cluster.jobs(namespace)], 60, "the first stage Job")
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5).read().decode()
        ended = stop()
    assert names == ["from-image-saliency"]
    assert "disp_purification_jobs" in scrape
    assert ended.root_changes == [], ended.root_changes
    assert SECRET not in ended.logs and ACCESS not in ended.logs
    status = cluster.get(namespace, "from-image")["status"]
    assert status["stages"][0]["jobName"] == "from-image-saliency"
