"""The stage Job builder and the reading of Job/pod outcomes."""

from __future__ import annotations

import json

import pytest

from disp_api import PurificationJob, StageName
from disp_api.status import StepKind
from disp_operator.children import ChildJob, ChildState, FailureKind, PodOutcome, classify_failure
from disp_operator.jobs import JOB_ENV, RunnerDefaults, stage_job
from disp_operator.naming import stage_job_name
from tests.operator.conftest import k8s_job, k8s_pod, make_job

DEFAULTS = RunnerDefaults(image="registry.example/disp:1.2.3")


def pod_of(manifest):
    return manifest["spec"]["template"]["spec"]


def test_job_names_are_deterministic_and_carry_step_and_attempt():
    assert stage_job_name("purify", StageName.SALIENCY, StepKind.RUN, 1) == "purify-saliency"
    assert stage_job_name("purify", StageName.RELABEL, StepKind.MERGE, 1) == "purify-relabel-merge"
    assert stage_job_name("purify", StageName.RELABEL, StepKind.SHARDS, 3) == "purify-relabel-3"


def test_long_names_stay_valid_and_distinct():
    a = stage_job_name("a" * 60, StageName.FINETUNE, StepKind.RUN, 12)
    b = stage_job_name("a" * 59 + "b", StageName.FINETUNE, StepKind.RUN, 12)
    assert len(a) <= 63 and len(b) <= 63 and a != b and a.endswith("-finetune-12")


def test_the_job_is_owned_by_the_purification_job_and_labelled(job: PurificationJob):
    manifest = stage_job(job, StageName.SALIENCY, StepKind.RUN, 1, DEFAULTS)
    meta = manifest["metadata"]
    assert (meta["name"], meta["namespace"]) == ("purify-saliency", "team")
    assert meta["ownerReferences"] == [{"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "name": "purify",
                                        "uid": job.metadata.uid, "controller": True, "blockOwnerDeletion": True}]
    assert meta["labels"]["disp.dev/purification-job"] == "purify"
    assert meta["labels"]["disp.dev/stage"] == "saliency"
    assert manifest["spec"]["template"]["metadata"]["labels"] == meta["labels"]  # pods are found by them too
    assert manifest["spec"]["backoffLimit"] == 0  # the operator owns retries


def test_the_pod_is_locked_down(job: PurificationJob):
    pod = pod_of(stage_job(job, StageName.SALIENCY, StepKind.RUN, 1, DEFAULTS))
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/scratch" in mounts  # the only writable place
    env = {e["name"]: e for e in container["env"]}
    assert env["HOME"]["value"].startswith("/scratch") and env["DISP_SCRATCH"]["value"] == "/scratch"


def test_gpus_resources_and_placement_come_from_the_spec():
    job = make_job(resources={"gpus": 2, "cpu": "8", "memory": "64Gi", "nodeSelector": {"gpu": "h100"},
                              "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                              "priorityClassName": "batch", "image": "mirror/disp:9", "imagePullPolicy": "Always"})
    pod = pod_of(stage_job(job, StageName.FINETUNE, StepKind.RUN, 1, DEFAULTS))
    (container,) = pod["containers"]
    assert container["resources"]["limits"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": 2}
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert (container["image"], container["imagePullPolicy"]) == ("mirror/disp:9", "Always")
    assert pod["nodeSelector"] == {"gpu": "h100"} and pod["priorityClassName"] == "batch"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_cpu_only_pods_request_no_gpu_and_use_the_operator_image():
    pod = pod_of(stage_job(make_job(resources={"gpus": 0}), StageName.MASKING, StepKind.RUN, 1, DEFAULTS))
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert pod["containers"][0]["image"] == DEFAULTS.image


def test_the_runner_gets_the_manifest_and_secret_refs_but_no_secret_values(job: PurificationJob):
    (container,) = pod_of(stage_job(job, StageName.RELABEL, StepKind.RUN, 1, DEFAULTS))["containers"]
    # The command is set, so the pod does not depend on the image's ENTRYPOINT (see test_container_rules).
    assert container["command"] == ["disp"]
    assert container["args"] == ["--no-progress", "run", "--manifest-env", JOB_ENV, "--stage", "relabel"]
    env = {e["name"]: e for e in container["env"]}
    handed = json.loads(env[JOB_ENV]["value"])
    assert PurificationJob.model_validate(handed) == job  # the runner sees exactly the validated job
    assert env["DISP_S3_ACCESS_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "minio", "key": "accessKey"}}
    assert env["DISP_S3_SECRET_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "minio", "key": "secretKey"}}


def test_a_sharded_step_is_an_indexed_job_and_the_merge_is_not():
    job = make_job(parallelism={"relabelShards": 4})
    shards = stage_job(job, StageName.RELABEL, StepKind.SHARDS, 1, DEFAULTS)
    assert (shards["spec"]["completionMode"], shards["spec"]["completions"], shards["spec"]["parallelism"]) == \
        ("Indexed", 4, 4)
    assert pod_of(shards)["containers"][0]["args"][-2:] == ["--shard", "$(JOB_COMPLETION_INDEX)/4"]
    merge = stage_job(job, StageName.RELABEL, StepKind.MERGE, 1, DEFAULTS)
    assert "completionMode" not in merge["spec"] and merge["metadata"]["name"] == "purify-relabel-merge"
    assert pod_of(merge)["containers"][0]["args"][-1] == "--merge"


def test_policy_reaches_the_job():
    job = make_job(policy={"activeDeadlineSeconds": 3600, "ttlSecondsAfterFinished": 600})
    spec = stage_job(job, StageName.SALIENCY, StepKind.RUN, 2, DEFAULTS)["spec"]
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (3600, 600)


@pytest.mark.parametrize("pod, job_reason, kind", [
    (k8s_pod("p", 2, message="spec.dataset.uri: bad"), "", FailureKind.PERMANENT),
    (k8s_pod("p", 75), "", FailureKind.TRANSIENT),
    (k8s_pod("p", 137, reason="OOMKilled"), "", FailureKind.TRANSIENT),
    (k8s_pod("p", None, pod_reason="Evicted"), "", FailureKind.TRANSIENT),
    (k8s_pod("p", 143, disrupted=True), "", FailureKind.TRANSIENT),
    (k8s_pod("p", 1), "", FailureKind.ERROR),
    (k8s_pod("p", 1), "DeadlineExceeded", FailureKind.DEADLINE),
    (None, "BackoffLimitExceeded", FailureKind.TRANSIENT),  # no pod left: its node went away
])
def test_failures_are_classified(pod, job_reason, kind):
    child = ChildJob.from_job(k8s_job("j", "failed", reason=job_reason))
    outcomes = [PodOutcome.from_pod(pod)] if pod else []
    assert classify_failure(child, outcomes).kind is kind


def test_a_permanent_shard_failure_wins_over_a_transient_one():
    child = ChildJob.from_job(k8s_job("j", "failed"))
    pods = [PodOutcome.from_pod(k8s_pod("a", 137, reason="OOMKilled")), PodOutcome.from_pod(k8s_pod("b", 2))]
    assert classify_failure(child, pods).kind is FailureKind.PERMANENT


def test_job_states_are_read_from_conditions():
    assert ChildJob.from_job(k8s_job("j")).state is ChildState.ACTIVE
    assert ChildJob.from_job(k8s_job("j", "succeeded")).state is ChildState.SUCCEEDED
    assert ChildJob.from_job(k8s_job("j", "failed")).state is ChildState.FAILED
    assert PodOutcome.from_pod({"metadata": {"name": "p"}, "status": {"phase": "Running"}}) is None


def test_the_operators_defaults_fill_what_the_spec_leaves_out():
    defaults = RunnerDefaults(image="r:1", gpus=4, node_selector={"pool": "gpu"},
                              tolerations=({"key": "gpu", "operator": "Exists"},), priority_class_name="batch")
    pod = pod_of(stage_job(make_job(), StageName.RELABEL, StepKind.RUN, 1, defaults))
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert pod["nodeSelector"] == {"pool": "gpu"} and pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["priorityClassName"] == "batch"
    # the spec wins where it speaks, even to say "none"
    pod = pod_of(stage_job(make_job(resources={"gpus": 0, "nodeSelector": {}, "tolerations": []}),
                           StageName.RELABEL, StepKind.RUN, 1, defaults))
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert "nodeSelector" not in pod and "tolerations" not in pod
