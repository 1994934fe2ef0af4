"""Names and labels of the objects the operator creates. Names are deterministic, so creating the
same stage Job twice (after an operator restart, or a watch that lags) is answered by the API
server with AlreadyExists instead of running the stage twice."""

from __future__ import annotations

import hashlib

from disp_api import StageName
from disp_api.status import StepKind

GROUP = "disp.dev"
VERSION = "v1alpha1"
PLURAL = "purificationjobs"

MANAGED_BY = "disp-operator"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_JOB = "disp.dev/purification-job"  # the owning PurificationJob's name
LABEL_STAGE = "disp.dev/stage"
LABEL_STEP = "disp.dev/step"
ANNOTATION_ATTEMPT = "disp.dev/attempt"

_MAX_NAME = 63  # Job names become pod labels (job-name), which allow at most 63 characters


def stage_job_name(job_name: str, stage: StageName, step: StepKind, attempt: int) -> str:
    """`<name>-<stage>[-merge][-<attempt>]` (no suffix on the first attempt). Names over 63
    characters keep their tail and replace the rest of the job name by a short digest, so two
    long job names never collide."""
    suffix = f"-{stage.value}" + ("-merge" if step is StepKind.MERGE else "") + (f"-{attempt}" if attempt > 1 else "")
    if len(job_name) + len(suffix) <= _MAX_NAME:
        return job_name + suffix
    digest = hashlib.sha256(job_name.encode()).hexdigest()[:8]
    keep = _MAX_NAME - len(suffix) - len(digest) - 1
    return f"{job_name[:keep].rstrip('-')}-{digest}{suffix}"


def child_labels(job_name: str, stage: StageName, step: StepKind) -> dict[str, str]:
    return {LABEL_MANAGED_BY: MANAGED_BY, LABEL_JOB: job_name, LABEL_STAGE: stage.value, LABEL_STEP: step.value}
