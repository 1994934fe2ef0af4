"""What the operator sees of its stage Jobs: a typed summary of each batch/v1 Job and its pods, and
why a failed one failed. Exit codes are the runner's contract (disp_api.contract.ExitCode): 2 means
the input is wrong and a retry cannot help, 75 means a dependency was unavailable."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from typing import Any, Mapping, Optional

from disp_api.contract import ExitCode

EXIT_USER_ERROR = ExitCode.USER_ERROR
EXIT_TRANSIENT_ERROR = ExitCode.TRANSIENT_ERROR

# Pod/container reasons that say the infrastructure, not the stage, ended the pod.
_DISRUPTION_REASONS = {"Evicted", "NodeLost", "Preempted", "Shutdown", "NodeShutdown", "Terminated",
                       "DeletionByTaintManager", "PreemptionByScheduler", "EvictionByEvictionAPI",
                       "DeletionByPodGC", "TerminationByKubelet"}


class ChildState(str, Enum):
    ACTIVE = "Active"
    QUEUED = "Queued"  # suspended, waiting for a queue (Kueue) to admit it: no pod runs
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class FailureKind(str, Enum):
    PERMANENT = "Permanent"  # bad input (exit 2): retrying cannot help
    DEADLINE = "Deadline"  # activeDeadlineSeconds exceeded: a retry would hit it again
    TRANSIENT = "Transient"  # OOM-killed, evicted, node lost, storage unavailable (exit 75)
    ERROR = "Error"  # any other crash; retried up to the backoff limit

    @property
    def retryable(self) -> bool:
        return self in (FailureKind.TRANSIENT, FailureKind.ERROR)


@dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str


@dataclass(frozen=True)
class PodOutcome:
    """The terminated state of one pod of a stage Job."""

    pod_name: str
    exit_code: Optional[int]
    reason: str  # container reason (OOMKilled, Error, Completed) or pod reason (Evicted)
    message: str  # the termination message: the runner's last error line
    disrupted: bool  # the pod carries a DisruptionTarget condition
    image_id: str = ""  # the image the container ran, as the kubelet reports it (containerStatuses[].imageID)

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> Optional["PodOutcome"]:
        status = pod.get("status") or {}
        name = (pod.get("metadata") or {}).get("name", "")
        disrupted = any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                        for c in status.get("conditions") or [])
        for container in status.get("containerStatuses") or []:
            terminated = (container.get("state") or {}).get("terminated")
            if terminated:
                return cls(name, terminated.get("exitCode"), terminated.get("reason") or "",
                           (terminated.get("message") or "").strip(), disrupted, container.get("imageID") or "")
        if status.get("phase") == "Failed":  # e.g. evicted before the container reported anything
            return cls(name, None, status.get("reason") or "", status.get("message") or "", disrupted)
        return None

    @property
    def failed(self) -> bool:
        return self.exit_code != 0


_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def pinned_reference(image_id: str) -> Optional[str]:
    """The by-digest reference (`repository@sha256:…`) of a container's imageID as the kubelet
    reports it: containerd and CRI-O give the repository digest (`registry/repo@sha256:…`), the
    Docker runtime the same behind `docker-pullable://`. None when there is no repository digest
    (an image ID alone, `sha256:…`, names local content no other node can pull)."""
    reference = image_id.split("://", 1)[-1]
    repository, at, digest = reference.partition("@")
    return reference if at and repository and _DIGEST.match(digest) else None


@dataclass(frozen=True)
class ChildJob:
    """One stage Job as observed: its state and, when it failed, how."""

    name: str
    state: ChildState
    job_failure_reason: str  # the Job's Failed condition reason (BackoffLimitExceeded, DeadlineExceeded,
    # PodFailurePolicy)
    job_failure_message: str
    failed_at: Optional[datetime] = None  # the Failed condition's lastTransitionTime

    @classmethod
    def from_job(cls, job: Mapping[str, Any]) -> "ChildJob":
        status = job.get("status") or {}
        name = (job.get("metadata") or {}).get("name", "")
        for condition in status.get("conditions") or []:
            if condition.get("status") != "True":
                continue
            if condition.get("type") == "Complete":
                return cls(name, ChildState.SUCCEEDED, "", "")
            if condition.get("type") == "Failed":
                return cls(name, ChildState.FAILED, condition.get("reason") or "", condition.get("message") or "",
                           _timestamp(condition.get("lastTransitionTime")))
        if (job.get("spec") or {}).get("suspend"):
            return cls(name, ChildState.QUEUED, "", "")
        return cls(name, ChildState.ACTIVE, "", "")


@dataclass(frozen=True)
class PendingPod:
    """A stage pod not running yet: since when, and what holds it (the scheduler's or kubelet's word)."""

    pod_name: str
    since: datetime
    reason: str  # Unschedulable, ImagePullBackOff, ErrImagePull, CreateContainerConfigError, or "Pending"
    message: str

    @property
    def unschedulable(self) -> bool:
        return self.reason == "Unschedulable"

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> Optional["PendingPod"]:
        status = pod.get("status") or {}
        if status.get("phase", "Pending") != "Pending":
            return None
        meta = pod.get("metadata") or {}
        since = _timestamp(meta.get("creationTimestamp"))
        if since is None:
            return None
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                return cls(meta.get("name", ""), since, condition.get("reason") or "Unschedulable",
                           condition.get("message") or "")
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting")
            if waiting and waiting.get("reason") not in (None, "", "ContainerCreating", "PodInitializing"):
                return cls(meta.get("name", ""), since, waiting["reason"], waiting.get("message") or "")
        return cls(meta.get("name", ""), since, "Pending", "")


@dataclass(frozen=True)
class StartedPod:
    """A stage pod whose container runs: the image it runs, as the kubelet reports it. Seen as soon
    as the container starts, long before its Job completes, so the run's image digest is pinned
    before the next stage's Job is made (a Job and its pods are two watches with no order)."""

    pod_name: str
    image_id: str

    @classmethod
    def from_pod(cls, pod: Mapping[str, Any]) -> Optional["StartedPod"]:
        for container in (pod.get("status") or {}).get("containerStatuses") or []:
            if (container.get("state") or {}).get("running") and container.get("imageID"):
                return cls((pod.get("metadata") or {}).get("name", ""), container["imageID"])
        return None


def _timestamp(value: Any) -> Optional[datetime]:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def classify_failure(job: ChildJob, pods: list[PodOutcome]) -> Failure:
    """Why a failed stage Job failed, from the most telling pod. Permanent beats everything (a bad
    input fails every shard the same way), then the deadline, then transient causes."""
    failed = [p for p in pods if p.failed]
    for pod in failed:
        if pod.exit_code == EXIT_USER_ERROR:
            return Failure(FailureKind.PERMANENT, _describe(pod, "rejected its input"))
    if job.job_failure_reason == "PodFailurePolicy":  # the stage Job's only FailJob rule: exit code 2
        return Failure(FailureKind.PERMANENT, job.job_failure_message or "a pod rejected its input")
    if job.job_failure_reason == "DeadlineExceeded":
        return Failure(FailureKind.DEADLINE, job.job_failure_message or "the stage ran past activeDeadlineSeconds")
    for pod in failed:
        if pod.reason == "OOMKilled":
            return Failure(FailureKind.TRANSIENT, _describe(pod, "was OOM-killed (raise spec.resources.memory)"))
        if pod.disrupted or pod.reason in _DISRUPTION_REASONS:
            return Failure(FailureKind.TRANSIENT, _describe(pod, f"was disrupted ({pod.reason or 'DisruptionTarget'})"))
        if pod.exit_code == EXIT_TRANSIENT_ERROR:
            return Failure(FailureKind.TRANSIENT, _describe(pod, "could not reach a dependency"))
    if failed:
        return Failure(FailureKind.ERROR, _describe(failed[0], f"exited with code {failed[0].exit_code}"))
    # No pod left to ask (deleted with its node, or garbage-collected): assume the node was lost.
    return Failure(FailureKind.TRANSIENT, job.job_failure_message or f"Job failed ({job.job_failure_reason or 'no pod status'})")


def _describe(pod: PodOutcome, what: str) -> str:
    detail = readable_line(pod.message.splitlines()[-1]) if pod.message else ""
    return f"pod {pod.pod_name} {what}" + (f": {detail}" if detail else "")


def readable_line(line: str) -> str:
    """A runner log line as people read it: the message of a JSON record (`disp run --log-format
    json`, the chart's runner.logFormat), the line itself otherwise."""
    if line.startswith("{"):
        try:
            record = json.loads(line)
        except ValueError:
            return line
        if isinstance(record, dict) and isinstance(record.get("message"), str):
            return record["message"]
    return line
