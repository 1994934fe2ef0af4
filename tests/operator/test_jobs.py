"""The stage Job builder and the reading of Job/pod outcomes."""

from __future__ import annotations

import json

import pytest

from disp_api import LogFormat, PurificationJob, StageName
from disp_api.status import StepKind
from disp_operator.children import (ChildJob, ChildState, FailureKind, PodOutcome, classify_failure, pinned_reference,
                                    readable_line)
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


def test_a_pinned_image_overrides_the_specs_and_the_operators_and_is_what_the_manifest_records():
    pinned = "registry.example/disp@sha256:" + "ab" * 32
    job = make_job(resources={"image": "team.example/disp:custom"})
    assert pod_of(stage_job(job, StageName.MASKING, StepKind.RUN, 1, DEFAULTS))["containers"][0]["image"] == \
        "team.example/disp:custom"
    (container,) = pod_of(stage_job(job, StageName.MASKING, StepKind.RUN, 2, DEFAULTS, pinned_image=pinned))["containers"]
    assert container["image"] == pinned
    assert {e["name"]: e.get("value") for e in container["env"]}["DISP_RUNNER_IMAGE"] == pinned


@pytest.mark.parametrize("image_id, expected", [
    ("registry.example/disp@sha256:" + "ab" * 32, "registry.example/disp@sha256:" + "ab" * 32),  # containerd, CRI-O
    ("docker-pullable://localhost:5000/disp@sha256:" + "cd" * 32, "localhost:5000/disp@sha256:" + "cd" * 32),
    ("sha256:" + "ef" * 32, None),  # an image ID alone: local content, not pullable elsewhere
    ("registry.example/disp@sha256:short", None),
    ("registry.example/disp:1.0", None),
    ("", None),
])
def test_only_a_repository_digest_is_pinned(image_id, expected):
    assert pinned_reference(image_id) == expected


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
    assert env["DISP_RUNNER_IMAGE"]["value"] == container["image"]  # recorded in the stage's manifest
    assert "DISP_SIGNING_KEY" not in env  # no signing key asked for


def test_a_signing_key_reaches_the_runner_as_a_secret_ref_and_the_generation_with_the_manifest():
    job = make_job(provenance={"signingKeySecret": {"name": "provenance-key", "key": "ed25519.pem"}})
    job = job.model_copy(update={"metadata": job.metadata.model_copy(update={"generation": 7})})
    (container,) = pod_of(stage_job(job, StageName.FINETUNE, StepKind.RUN, 1, DEFAULTS))["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["DISP_SIGNING_KEY"] == {"name": "DISP_SIGNING_KEY",
                                       "valueFrom": {"secretKeyRef": {"name": "provenance-key", "key": "ed25519.pem"}}}
    assert json.loads(env[JOB_ENV]["value"])["metadata"]["generation"] == 7


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
    (None, "PodFailurePolicy", FailureKind.PERMANENT),  # the pod is gone, the Job's verdict stays
])
def test_failures_are_classified(pod, job_reason, kind):
    child = ChildJob.from_job(k8s_job("j", "failed", reason=job_reason))
    outcomes = [PodOutcome.from_pod(pod)] if pod else []
    assert classify_failure(child, outcomes).kind is kind


def test_the_job_controller_fails_a_rejected_input_at_once_and_replaces_disrupted_pods():
    """The pod failure policy of every stage Job: the runner's exit code 2 fails the Job (every
    shard at once), a pod the cluster disrupted is replaced by the Job controller. The rules are
    checked on the real Job controller by tests/e2e/test_operator.py."""
    job = make_job()
    for stage, step in ((StageName.SALIENCY, StepKind.SHARDS), (StageName.FINETUNE, StepKind.RUN)):
        spec = stage_job(job, stage, step, 1, DEFAULTS)["spec"]
        (container,) = spec["template"]["spec"]["containers"]
        rules = spec["podFailurePolicy"]["rules"]
        assert rules[0] == {"action": "FailJob", "onExitCodes": {"containerName": container["name"],
                                                                 "operator": "In", "values": [2]}}
        assert rules[1] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
        assert spec["template"]["spec"]["restartPolicy"] == "Never"  # what the policy requires


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


# -- per-stage resources, the pod template, multi-node fine-tunes and Kueue ---------------------
KUBE_VERSION = "1.30"


def _valid(doc: dict) -> dict:
    import kubernetes_validate

    kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    return doc


def _limits(manifest: dict) -> dict:
    return pod_of(manifest)["containers"][0]["resources"]["limits"]


def test_each_stage_gets_its_own_resources_and_masking_no_gpu_by_default():
    job = make_job(resources={"gpus": 1, "memory": "32Gi",
                              "stages": {"finetune": {"gpus": 4, "memory": "128Gi"}, "relabel": {"scratch": "400Gi"}}})
    assert _limits(stage_job(job, StageName.MASKING, StepKind.RUN, 1, DEFAULTS)) == {"cpu": "4", "memory": "32Gi"}
    assert _limits(stage_job(job, StageName.SALIENCY, StepKind.RUN, 1, DEFAULTS))["nvidia.com/gpu"] == 1
    finetune = stage_job(job, StageName.FINETUNE, StepKind.RUN, 1, DEFAULTS)
    assert _limits(finetune) == {"cpu": "4", "memory": "128Gi", "nvidia.com/gpu": 4}
    args = pod_of(finetune)["containers"][0]["args"]
    assert args[args.index("--processes") + 1] == "4"  # one training process per GPU
    relabel = pod_of(stage_job(job, StageName.RELABEL, StepKind.RUN, 1, DEFAULTS))
    assert {v["name"]: v for v in relabel["volumes"]}["scratch"]["emptyDir"]["sizeLimit"] == "400Gi"
    gpu_masking = make_job(resources={"stages": {"masking": {"gpus": 1}}})
    assert _limits(stage_job(gpu_masking, StageName.MASKING, StepKind.RUN, 1, DEFAULTS))["nvidia.com/gpu"] == 1
    for stage in StageName:
        _valid(stage_job(job, stage, StepKind.RUN, 1, DEFAULTS))


def test_the_pod_template_adds_scheduling_without_loosening_security():
    locked = pod_of(stage_job(make_job(), StageName.FINETUNE, StepKind.RUN, 1, DEFAULTS))
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]}]}}}
    job = make_job(podTemplate={"metadata": {"labels": {"team": "vision"}, "annotations": {"cost": "42"}},
                                "spec": {"affinity": affinity, "imagePullSecrets": [{"name": "registry"}],
                                         "runtimeClassName": "gvisor", "schedulerName": "volcano"}})
    manifest = _valid(stage_job(job, StageName.FINETUNE, StepKind.RUN, 1, DEFAULTS))
    template = manifest["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "vision"
    assert template["metadata"]["labels"]["disp.dev/stage"] == "finetune"  # the operator still finds its pods
    assert template["metadata"]["annotations"] == {"cost": "42"}
    pod = template["spec"]
    assert (pod["affinity"], pod["imagePullSecrets"], pod["runtimeClassName"], pod["schedulerName"]) == \
        (affinity, [{"name": "registry"}], "gvisor", "volcano")
    for key in ("securityContext", "automountServiceAccountToken", "volumes", "enableServiceLinks"):
        assert pod[key] == locked[key], key
    assert pod["containers"][0]["securityContext"] == locked["containers"][0]["securityContext"]


@pytest.mark.parametrize("overlay, field", [
    ({"spec": {"securityContext": {"runAsUser": 0}}}, "securityContext"),
    ({"spec": {"automountServiceAccountToken": True}}, "automountServiceAccountToken"),
    ({"spec": {"serviceAccountName": "cluster-admin"}}, "serviceAccountName"),
    ({"spec": {"containers": [{"name": "runner", "securityContext": {"privileged": True}}]}}, "containers"),
    ({"spec": {"hostPID": True}}, "hostPID"),
    ({"metadata": {"labels": {"disp.dev/purification-job": "other"}}}, "labels"),
    ({"metadata": {"annotations": {"container.apparmor.security.beta.kubernetes.io/runner": "unconfined"}}},
     "annotations"),
])
def test_overriding_security_through_the_pod_template_is_refused_naming_the_field(overlay, field):
    from disp_operator.validation import InvalidSpec, parse_job
    from tests.operator.conftest import job_body

    with pytest.raises(InvalidSpec, match=f"spec.podTemplate.*{field}"):
        parse_job(job_body(podTemplate=overlay))


def test_a_multi_node_fine_tune_is_an_indexed_job_meeting_through_a_headless_service():
    from disp_operator.jobs import RENDEZVOUS_PORT, rendezvous_service

    job = make_job(parallelism={"finetuneNodes": 3}, resources={"stages": {"finetune": {"gpus": 8}}})
    manifest = _valid(stage_job(job, StageName.FINETUNE, StepKind.RUN, 2, DEFAULTS))
    spec = manifest["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"], spec["backoffLimit"]) == \
        ("Indexed", 3, 3, 0)
    pod = spec["template"]["spec"]
    service = _valid(rendezvous_service(job))
    assert pod["subdomain"] == service["metadata"]["name"] == "purify-finetune-nodes"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    # The Service selects exactly the fine-tune's pods, whatever the attempt.
    assert service["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()
    assert service["metadata"]["ownerReferences"][0]["uid"] == job.metadata.uid
    (container,) = pod["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MASTER_ADDR"] == "purify-finetune-2-0.purify-finetune-nodes"  # pod 0's DNS name
    assert env["MASTER_PORT"] == str(RENDEZVOUS_PORT)
    args = container["args"]
    assert args[args.index("--nodes") + 1] == "3" and args[args.index("--node-rank") + 1] == "$(JOB_COMPLETION_INDEX)"
    assert args[args.index("--processes") + 1] == "8"
    assert container["ports"] == [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    # Other stages are not touched by finetuneNodes.
    saliency = stage_job(job, StageName.SALIENCY, StepKind.RUN, 1, DEFAULTS)
    assert "completionMode" not in saliency["spec"] and "subdomain" not in pod_of(saliency)


def test_multi_node_pod_hostnames_stay_dns_labels_for_long_job_names():
    from disp_operator.naming import rendezvous_service_name

    name = stage_job_name("x" * 63, StageName.FINETUNE, StepKind.RUN, 12)
    assert len(f"{name}-63") <= 63
    service = rendezvous_service_name("7" + "x" * 62)
    assert len(service) <= 63 and service[0].isalpha()


def test_a_queued_run_is_one_workload_sized_for_its_largest_stage_and_its_stage_jobs_are_not_queued():
    from tests.operator.conftest import job_body
    from disp_operator.jobs import run_workload_manifest
    from disp_operator.kueue import Admission, AdmissionState
    from disp_operator.validation import parse_job

    body = job_body(parallelism={"saliencyShards": 3, "relabelShards": 2},
                    resources={"gpus": 1, "cpu": "4", "memory": "32Gi",
                               "stages": {"finetune": {"gpus": 2, "memory": "64Gi"}}})
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-batch", "kueue.x-k8s.io/priority-class": "high",
                                  "team": "vision"}
    job = parse_job(body)
    workload = run_workload_manifest(job, DEFAULTS, priority=1000)
    assert workload["metadata"]["name"] == f"purificationjob-purify-{job.metadata.uid[:5]}"
    assert workload["spec"]["priorityClassRef"] == {"group": "kueue.x-k8s.io", "kind": "WorkloadPriorityClass",
                                                    "name": "high"}
    assert workload["spec"]["priority"] == 1000  # Kueue's schema requires the value with the reference
    assert workload["metadata"]["labels"] == {"kueue.x-k8s.io/priority-class": "high"}
    (owner,) = workload["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("PurificationJob", job.metadata.uid, True)
    assert workload["spec"]["queueName"] == "gpu-batch"
    (pod_set,) = workload["spec"]["podSets"]
    assert pod_set["count"] == 3  # the widest stage: three saliency shards
    requests = pod_set["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests == {"cpu": "4", "memory": "64Gi", "nvidia.com/gpu": 2}  # the most any stage asks, each
    # Stage Jobs carry no queue label and are not suspended: the run is admitted as a whole.
    admitted = Admission(AdmissionState.ADMITTED, flavors=("a100",), node_selector={"gpu": "a100"},
                         tolerations=({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
                                      {"key": "reserved", "operator": "Exists"}))
    for stage in StageName:
        manifest = _valid(stage_job(job, stage, StepKind.RUN, 1, DEFAULTS, admission=admitted))
        assert not any(k.startswith("kueue") for k in manifest["metadata"]["labels"])
        assert "suspend" not in manifest["spec"]
        pod = pod_of(manifest)
        assert pod["nodeSelector"]["gpu"] == "a100"  # where Kueue admitted the run
        tolerations = pod["tolerations"]
        assert {"key": "reserved", "operator": "Exists"} in tolerations
        assert len(tolerations) == len({json.dumps(t, sort_keys=True) for t in tolerations})  # none twice


def test_with_the_charts_json_log_format_stage_pods_log_json_and_a_failure_still_reads_as_its_message():
    text = pod_of(stage_job(make_job(), StageName.SALIENCY, StepKind.RUN, 1, DEFAULTS))["containers"][0]["args"]
    assert "--log-format" not in text
    json_defaults = RunnerDefaults(image="r:1", log_format=LogFormat.JSON)
    args = pod_of(stage_job(make_job(), StageName.SALIENCY, StepKind.RUN, 1, json_defaults))["containers"][0]["args"]
    assert args.index("--log-format") > args.index("run") and args[args.index("--log-format") + 1] == "json"
    # The pod's termination message is its log's tail: the last record's message reaches status.
    last = json.dumps({"time": "t", "level": "error", "message": "spec.dataset.uri: no such folder",
                       "job": "j", "errorKind": "user"})
    pod = PodOutcome.from_pod(k8s_pod("p", 2, message=f'{{"level": "info", "message": "x"}}\n{last}'))
    failure = classify_failure(ChildJob.from_job(k8s_job("j", "failed")), [pod])
    assert failure.kind is FailureKind.PERMANENT and failure.message.endswith(": spec.dataset.uri: no such folder")
    assert readable_line("disp run: error: plain text") == "disp run: error: plain text"
    assert readable_line("{not json") == "{not json"
