"""The batch/v1 Job that runs one step of one stage: `disp run --stage S` in a locked-down pod.

The runner never talks to the Kubernetes API: it gets the whole validated job in an environment
variable, S3 keys from the spec's Secret, and writes progress and results to the artifact store.
The pod runs as non-root with a read-only root filesystem; everything it writes goes to an
emptyDir scratch volume."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from disp_api import LogFormat, PurificationJob, StageName
from disp_api.contract import RUNNER_IMAGE_ENV, SIGNING_KEY_ENV, ExitCode
from disp_operator.kueue import Admission, run_workload
from disp_api.version import VERSION
from disp_api.status import StepKind
from disp_operator.naming import (ANNOTATION_ATTEMPT, LABEL_JOB, LABEL_STAGE, child_labels,
                                  rendezvous_service_name, stage_job_name)

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

    image: str = f"ghcr.io/disp-dev/disp-runner:{VERSION}"  # the runner of this operator's own release
    service_account: str = ""  # empty: the namespace's default (its token is not mounted anyway)
    gpus: int = 1
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    priority_class_name: str = ""
    log_format: LogFormat = LogFormat.TEXT  # the chart's runner.logFormat, passed to every stage pod
    # GPU memory of the cluster's GPU nodes (the chart's runner.gpuMemoryGiB): a job whose batch cannot
    # fit it is refused at admission. None: not known, the stages' own plans decide.
    gpu_memory_gib: Optional[float] = None


RENDEZVOUS_PORT = 29500  # node 0's rendezvous store in a multi-node fine-tune (torchrun's default)


def _owner(job: PurificationJob) -> dict[str, Any]:
    meta = job.metadata
    return {"apiVersion": job.api_version, "kind": job.kind, "name": meta.name, "uid": meta.uid,
            "controller": True, "blockOwnerDeletion": True}


def finetune_nodes(job: PurificationJob, stage: StageName) -> int:
    """Pods a stage's Job runs together (more than one only for a multi-node fine-tune)."""
    return job.spec.parallelism.finetune_nodes if stage is StageName.FINETUNE else 1


RUNNER_CONTAINER = "runner"

# What the Job controller can decide itself, before the operator looks (Kubernetes' pod failure
# policy; rules are tried in order):
# - the runner's exit code 2 (USER_ERROR: the input is bad) fails the whole Job at once, with the
#   Job's own reason PodFailurePolicy, so a sharded stage stops every shard and the verdict survives
#   the pods being garbage-collected;
# - a pod disrupted by the cluster (preemption, eviction, node drain: the DisruptionTarget
#   condition) does not count as a failure: the Job controller replaces the pod within the same
#   Job, so no attempt of the run's backoffLimit is spent on what the workload did not cause.
# What the policy cannot say stays the operator's (children.classify_failure): OOMKilled (the
# policy sees exit code 137, not the reason; the operator names spec.resources.memory), the
# transient exit code 75 (retried by the operator with its own backoff across Jobs, up to
# spec.policy.backoffLimit) and the deadline.
POD_FAILURE_POLICY: dict[str, Any] = {"rules": [
    {"action": "FailJob", "onExitCodes": {"containerName": RUNNER_CONTAINER, "operator": "In",
                                          "values": [int(ExitCode.USER_ERROR)]}},
    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
]}


def stage_job(job: PurificationJob, stage: StageName, step: StepKind, attempt: int,
              defaults: RunnerDefaults, pinned_image: Optional[str] = None,
              admission: Optional[Admission] = None, round_number: int = 1) -> dict[str, Any]:
    """The Job manifest for `attempt` (1-based) of one step of `stage` in purification round
    `round_number` (spec.rounds); its pods run `pinned_image`
    (the run's status.runnerImage, by digest) when given, else the spec's or the operator's image,
    and, in a queued run, on the nodes of the flavors Kueue admitted the run's Workload to."""
    spec, meta = job.spec, job.metadata
    assert meta.uid, "stage Jobs are only built for objects the API server has accepted (they have a uid)"
    name = stage_job_name(meta.name, stage, step, attempt, round_number)
    labels = child_labels(meta.name, stage, step, round_number)
    overlay = spec.pod_template.metadata
    pod_metadata: dict[str, Any] = {"labels": {**(overlay.labels or {}), **labels}}
    if overlay.annotations:
        pod_metadata["annotations"] = dict(overlay.annotations)
    pod = _pod_spec(job, stage, step, defaults, name, pinned_image, round_number)
    if admission is not None:
        _place(pod, admission)
    job_spec: dict[str, Any] = {
        "backoffLimit": 0,  # the operator retries, with its own backoff and failure classification
        "podFailurePolicy": POD_FAILURE_POLICY,
        "template": {"metadata": pod_metadata, "spec": pod},
    }
    if step is StepKind.SHARDS:
        shards = spec.shards(stage)
        job_spec.update(completionMode="Indexed", completions=shards, parallelism=shards)
    elif (nodes := finetune_nodes(job, stage)) > 1:
        # All pods at once (they train together); pod i is `<name>-i.<service>` in DNS, and a
        # failed pod fails the Job (backoffLimit 0), whose controller then stops the others.
        job_spec.update(completionMode="Indexed", completions=nodes, parallelism=nodes)
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
            "ownerReferences": [_owner(job)],
        },
        "spec": job_spec,
    }


def rendezvous_service(job: PurificationJob) -> dict[str, Any]:
    """The headless Service through which the pods of a multi-node fine-tune find node 0 (the
    pattern JobSet and Kubeflow Trainer use): DNS records for every pod, ready or not."""
    meta = job.metadata
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": rendezvous_service_name(meta.name), "namespace": meta.namespace,
                     "labels": child_labels(meta.name, StageName.FINETUNE, StepKind.RUN),
                     "ownerReferences": [_owner(job)]},
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,  # the pods rendezvous before any of them is ready
            "selector": {LABEL_JOB: meta.name, LABEL_STAGE: StageName.FINETUNE.value},
            "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                       "protocol": "TCP"}],
        },
    }


def _runner_args(job: PurificationJob, stage: StageName, step: StepKind, gpus: int,
                 log_format: LogFormat = LogFormat.TEXT, round_number: int = 1) -> list[str]:
    """The arguments after RUNNER_COMMAND."""
    args = ["--no-progress", "run", "--manifest-env", JOB_ENV, "--stage", stage.value]
    if round_number > 1:
        args += ["--round", str(round_number)]
    if log_format is not LogFormat.TEXT:
        args += ["--log-format", log_format.value]
    if step is StepKind.SHARDS:
        # The kubelet expands $(VAR) from the container's env; the Job controller sets the index.
        args += ["--shard", f"$(JOB_COMPLETION_INDEX)/{job.spec.shards(stage)}"]
    elif step is StepKind.MERGE:
        args.append("--merge")
    if stage is StageName.FINETUNE:
        args += ["--processes", str(max(1, gpus))]  # one training process per GPU
        if (nodes := finetune_nodes(job, stage)) > 1:
            args += ["--nodes", str(nodes), "--node-rank", "$(JOB_COMPLETION_INDEX)"]
    return args


def _rendezvous_env(job: PurificationJob, job_name: str) -> list[dict[str, Any]]:
    """Node 0's address for the other pods of a multi-node fine-tune: its stable DNS name."""
    service = rendezvous_service_name(job.metadata.name)
    return [{"name": "MASTER_ADDR", "value": f"{job_name}-0.{service}"},
            {"name": "MASTER_PORT", "value": str(RENDEZVOUS_PORT)}]


def _env(job: PurificationJob, image: str) -> list[dict[str, Any]]:
    meta = job.metadata
    wire = {"apiVersion": job.api_version, "kind": job.kind,
            "metadata": {"name": meta.name, "namespace": meta.namespace, "uid": meta.uid, "generation": meta.generation},
            "spec": job.spec.to_wire()}
    env: list[dict[str, Any]] = [
        {"name": JOB_ENV, "value": json.dumps(wire, separators=(",", ":"), sort_keys=True)},
        {"name": RUNNER_IMAGE_ENV, "value": image},  # recorded in the stage manifest and the provenance
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
    signing = job.spec.provenance.signing_key_secret
    if signing is not None:
        env.append({"name": SIGNING_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": signing.name, "key": signing.key}}})
    return env


def _place(pod: dict[str, Any], admission: Admission) -> None:
    """Run the pod where Kueue admitted the run: the flavors' node labels and tolerations added to
    the pod's own, as Kueue does for a job it starts."""
    if admission.node_selector:
        pod["nodeSelector"] = {**pod.get("nodeSelector", {}), **admission.node_selector}
    extra = [dict(t) for t in admission.tolerations if dict(t) not in pod.get("tolerations", [])]
    if extra:
        pod["tolerations"] = pod.get("tolerations", []) + extra


def run_workload_manifest(job: PurificationJob, defaults: RunnerDefaults,
                          priority: Optional[int] = None) -> dict[str, Any]:
    """The queued run's Kueue Workload, sized from the pods its stages' Jobs would run."""
    stage_pods = {}
    for stage in job.spec.stages():
        step = StepKind.SHARDS if job.spec.shards(stage) > 1 else StepKind.RUN
        count = job.spec.shards(stage) if step is StepKind.SHARDS else finetune_nodes(job, stage)
        stage_pods[stage] = (count, _pod_spec(job, stage, step, defaults, stage_job_name(job.metadata.name, stage,
                                                                                       step, 1), None))
    return run_workload(job, stage_pods, _owner(job), priority)


def _pod_spec(job: PurificationJob, stage: StageName, step: StepKind, defaults: RunnerDefaults,
              job_name: str, pinned_image: Optional[str], round_number: int = 1) -> dict[str, Any]:
    res = job.spec.resources
    request = res.for_stage(stage, defaults.gpus)
    limits: dict[str, Any] = {"cpu": request.cpu, "memory": request.memory}
    if request.gpus:
        limits[GPU_RESOURCE] = request.gpus
    multi_node = finetune_nodes(job, stage) > 1 and step is StepKind.RUN
    image = pinned_image or res.image or defaults.image
    container = {
        "name": RUNNER_CONTAINER,
        "image": image,
        "imagePullPolicy": res.image_pull_policy.value,
        "command": list(RUNNER_COMMAND),
        "args": _runner_args(job, stage, step, request.gpus, defaults.log_format, round_number),
        "env": _env(job, image) + (_rendezvous_env(job, job_name) if multi_node else []),
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
            {"name": "scratch", "emptyDir": {"sizeLimit": request.scratch}},
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
    if multi_node:
        pod["subdomain"] = rendezvous_service_name(job.metadata.name)
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    # The user's scheduling settings: typed fields only (spec.podTemplate), so nothing here can
    # touch the security context, volumes, the service account or its token.
    overlay = job.spec.pod_template.spec
    if overlay.affinity:
        pod["affinity"] = dict(overlay.affinity)
    if overlay.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": ref.name} for ref in overlay.image_pull_secrets]
    if overlay.runtime_class_name:
        pod["runtimeClassName"] = overlay.runtime_class_name
    if overlay.scheduler_name:
        pod["schedulerName"] = overlay.scheduler_name
    return pod
