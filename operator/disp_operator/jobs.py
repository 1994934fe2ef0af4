"""The batch/v1 Job that runs one step of one stage: `disp run --stage S` in a locked-down pod.

The runner never talks to the Kubernetes API: it gets the whole validated job in an environment
variable, S3 keys from the spec's Secret, and writes progress and results to the artifact store.
The pod runs as non-root with a read-only root filesystem; everything it writes goes to an
emptyDir scratch volume."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from disp_api import PurificationJob, StageName
from disp_api.status import StepKind
from disp_operator.naming import ANNOTATION_ATTEMPT, child_labels, stage_job_name

JOB_ENV = "DISP_JOB"  # the runner reads the manifest from here (`disp run --manifest-env`)
# The container's command is set, not left to the image: Kubernetes appends `args` to the image's
# ENTRYPOINT when `command` is unset, so a pod that relied on it would depend on how the image was
# built (ours has ENTRYPOINT ["disp"]; a team's own image built on another base may have none).
RUNNER_COMMAND = ("disp",)
SCRATCH_PATH = "/scratch"
RUNNER_UID = 10001  # the image's non-root user
GPU_RESOURCE = "nvidia.com/gpu"


@dataclass(frozen=True)
class RunnerDefaults:
    """What the operator's deployment decides for every runner pod unless the spec overrides it."""

    image: str = "ghcr.io/disp-dev/disp-runner:0.1.0"
    service_account: str = ""  # empty: the namespace's default (its token is not mounted anyway)
    gpus: int = 1
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str = ""


def stage_job(job: PurificationJob, stage: StageName, step: StepKind, attempt: int,
              defaults: RunnerDefaults) -> dict[str, Any]:
    """The Job manifest for `attempt` (1-based) of one step of `stage`."""
    spec, meta = job.spec, job.metadata
    assert meta.uid, "stage Jobs are only built for objects the API server has accepted (they have a uid)"
    shards = spec.shards(stage)
    name = stage_job_name(meta.name, stage, step, attempt)
    labels = child_labels(meta.name, stage, step)
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # the operator retries, with its own backoff and failure classification
        "template": {
            "metadata": {"labels": labels},
            "spec": _pod_spec(job, stage, step, defaults),
        },
    }
    if step is StepKind.SHARDS:
        job_spec.update(completionMode="Indexed", completions=shards, parallelism=shards)
    if spec.policy.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.policy.active_deadline_seconds
    if spec.policy.ttl_seconds_after_finished is not None:
        job_spec["ttlSecondsAfterFinished"] = spec.policy.ttl_seconds_after_finished
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": meta.namespace,
            "labels": labels,
            "annotations": {ANNOTATION_ATTEMPT: str(attempt)},
            "ownerReferences": [{
                "apiVersion": job.api_version, "kind": job.kind, "name": meta.name, "uid": meta.uid,
                "controller": True, "blockOwnerDeletion": True,
            }],
        },
        "spec": job_spec,
    }


def _runner_args(job: PurificationJob, stage: StageName, step: StepKind) -> list[str]:
    """The arguments after RUNNER_COMMAND."""
    args = ["--no-progress", "run", "--manifest-env", JOB_ENV, "--stage", stage.value]
    if step is StepKind.SHARDS:
        # The kubelet expands $(VAR) from the container's env; the Job controller sets the index.
        args += ["--shard", f"$(JOB_COMPLETION_INDEX)/{job.spec.shards(stage)}"]
    elif step is StepKind.MERGE:
        args.append("--merge")
    return args


def _env(job: PurificationJob) -> list[dict[str, Any]]:
    wire = {"apiVersion": job.api_version, "kind": job.kind,
            "metadata": {"name": job.metadata.name, "namespace": job.metadata.namespace, "uid": job.metadata.uid},
            "spec": job.spec.to_wire()}
    env: list[dict[str, Any]] = [
        {"name": JOB_ENV, "value": json.dumps(wire, separators=(",", ":"), sort_keys=True)},
        {"name": "DISP_SCRATCH", "value": SCRATCH_PATH},
        # Libraries that cache under $HOME must write to the scratch volume (the root fs is read-only).
        {"name": "HOME", "value": f"{SCRATCH_PATH}/home"},
        {"name": "HF_HOME", "value": f"{SCRATCH_PATH}/hf"},
        {"name": "TMPDIR", "value": f"{SCRATCH_PATH}/tmp"},
    ]
    storage = job.spec.storage
    if storage is not None and storage.credentials_secret is not None:
        ref = storage.credentials_secret
        for var, key in (("DISP_S3_ACCESS_KEY", ref.access_key_key), ("DISP_S3_SECRET_KEY", ref.secret_key_key)):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}})
    return env


def _pod_spec(job: PurificationJob, stage: StageName, step: StepKind, defaults: RunnerDefaults) -> dict[str, Any]:
    res = job.spec.resources
    limits: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    gpus = defaults.gpus if res.gpus is None else res.gpus
    if gpus:
        limits[GPU_RESOURCE] = gpus
    container = {
        "name": "runner",
        "image": res.image or defaults.image,
        "imagePullPolicy": res.image_pull_policy.value,
        "command": list(RUNNER_COMMAND),
        "args": _runner_args(job, stage, step),
        "env": _env(job),
        "resources": {"requests": dict(limits), "limits": limits},
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH_PATH}, {"name": "dshm", "mountPath": "/dev/shm"}],
        # The runner's last error line becomes the pod's termination message, which the operator
        # copies into status and Events.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "runAsGroup": RUNNER_UID,
            "fsGroup": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [
            {"name": "scratch", "emptyDir": {"sizeLimit": res.scratch}},
            # PyTorch data loaders share tensors through /dev/shm, which is 64 MiB by default.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}},
        ],
    }
    if defaults.service_account:
        pod["serviceAccountName"] = defaults.service_account
    node_selector = defaults.node_selector if res.node_selector is None else res.node_selector
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    tolerations = [dict(t) for t in defaults.tolerations] if res.tolerations is None else \
        [t.model_dump(mode="json", by_alias=True, exclude_none=True) for t in res.tolerations]
    if tolerations:
        pod["tolerations"] = tolerations
    priority_class = res.priority_class_name or defaults.priority_class_name
    if priority_class:
        pod["priorityClassName"] = priority_class
    return pod
