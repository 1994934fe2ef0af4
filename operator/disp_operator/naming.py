"""Names and labels of the objects the operator creates. Names are deterministic, so creating the
same stage Job twice (after an operator restart, or a watch that lags) is answered by the API
server with AlreadyExists instead of running the stage twice."""

from __future__ import annotations

import hashlib

from disp_api import StageName
from disp_api.spec import MAX_FINETUNE_NODES
from disp_api.status import StepKind

GROUP = "disp.dev"
VERSION = "v1alpha1"
PLURAL = "purificationjobs"

MANAGED_BY = "disp-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "disp.dev/purification-job"  # the owning PurificationJob's name
LABEL_STAGE = "disp.dev/stage"
LABEL_STEP = "disp.dev/step"
LABEL_ROUND = "disp.dev/round"  # the purification round (spec.rounds) a stage Job belongs to
ANNOTATION_ATTEMPT = "disp.dev/attempt"
# On a PurificationJob: `tag` runs its later stages by the configured image tag instead of the
# digest its first stage ran (status.runnerImage); anything else, or none, pins the digest.
ANNOTATION_RUNNER_IMAGE = "disp.dev/runner-image"
FOLLOW_IMAGE_TAG = "tag"

_MAX_NAME = 63  # Job names become pod labels (job-name), which allow at most 63 characters


# An Indexed Job's pods are named (hostname) `<job name>-<index>`, a DNS label too: the fine-tune
# Job of a multi-node job leaves room for the index of its last pod.
_INDEX_ROOM = 1 + len(str(MAX_FINETUNE_NODES - 1))


def _bounded(base: str, suffix: str, limit: int) -> str:
    """`base + suffix`, or, when longer than `limit`, the base's head and a digest of it (two long
    names never collide)."""
    if len(base) + len(suffix) <= limit:
        return base + suffix
    digest = hashlib.sha256(base.encode()).hexdigest()[:8]
    keep = limit - len(suffix) - len(digest) - 1
    return f"{base[:keep].rstrip('-')}-{digest}{suffix}"


def stage_job_name(job_name: str, stage: StageName, step: StepKind, attempt: int, round_number: int = 1) -> str:
    """`<name>[-r<round>]-<stage>[-merge][-<attempt>]` (no round in round 1, no suffix on the first
    attempt), at most 63 characters, and short enough for the fine-tune's pod hostnames."""
    suffix = (f"-r{round_number}" if round_number > 1 else "") + f"-{stage.value}" + \
        ("-merge" if step is StepKind.MERGE else "") + (f"-{attempt}" if attempt > 1 else "")
    limit = _MAX_NAME - _INDEX_ROOM if stage is StageName.FINETUNE else _MAX_NAME
    return _bounded(job_name, suffix, limit)


def rendezvous_service_name(job_name: str) -> str:
    """The headless Service the pods of a multi-node fine-tune find each other through: a DNS-1035
    label (it must start with a letter, a job name may not)."""
    base = job_name if job_name[0].isalpha() else f"j{job_name}"
    return _bounded(base, "-finetune-nodes", _MAX_NAME)


def child_labels(job_name: str, stage: StageName, step: StepKind, round_number: int = 1) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB: job_name, LABEL_STAGE: stage.value, LABEL_STEP: step.value,
            LABEL_ROUND: str(round_number)}
