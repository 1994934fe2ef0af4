"""The PurificationJob's status, written only by the operator. It follows the Kubernetes API
conventions (conditions with reasons and observedGeneration) and stays kstatus-compatible:
Reconciling is True while work is in progress, Stalled is True when the job cannot progress
without a change, so Flux and Argo CD read it without a custom health check."""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Optional

from pydantic import Field

from disp_api.base import ContractModel
from disp_api.metrics import MetricsSummary
from disp_api.rounds import RoundRecord
from disp_api.spec import StageName


class JobPhase(str, Enum):
    """The whole job's state, a convenience summary of the conditions (printed by kubectl get)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (JobPhase.SUCCEEDED, JobPhase.FAILED)


class StagePhase(str, Enum):
    PENDING = "Pending"
    RUNNING = "Running"
    RETRYING = "Retrying"  # an attempt failed; the next one starts after a backoff
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class StepKind(str, Enum):
    """The part of a stage a Job runs: the whole stage, or, for a sharded stage, its shards (an
    Indexed Job, one pod per shard) and then the merge of their outputs."""

    RUN = "run"
    SHARDS = "shards"
    MERGE = "merge"


class ConditionType(str, Enum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"
    RECONCILING = "Reconciling"  # kstatus: in progress
    STALLED = "Stalled"  # kstatus: cannot progress without a change to the spec or the cluster
    # Set once the job succeeded: the audit's verdict on the purified model (True: the residual rate
    # is at most spec.audit.residualThreshold; False: above it; Unknown: no residual sample).
    BACKDOOR_REMOVED = "BackdoorRemoved"


class ConditionStatus(str, Enum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Reason(str, Enum):
    """Machine-readable reasons of conditions and Events (CamelCase, as Kubernetes expects)."""

    ACCEPTED = "Accepted"
    INVALID_SPEC = "InvalidSpec"
    STAGE_STARTED = "StageStarted"
    STAGE_RUNNING = "StageRunning"
    STAGE_SUCCEEDED = "StageSucceeded"
    STAGE_RETRYING = "StageRetrying"
    STAGE_FAILED = "StageFailed"
    BACKOFF_LIMIT_EXCEEDED = "BackoffLimitExceeded"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    SUSPENDED = "Suspended"
    RESUMED = "Resumed"
    COMPLETED = "Completed"
    WAITING_FOR_ADMISSION = "WaitingForAdmission"  # a stage Job waits in a Kueue queue
    UNSCHEDULABLE = "Unschedulable"  # the scheduler finds no node for a stage pod
    POD_PENDING = "PodPending"  # a stage pod has not started for longer than the operator's threshold
    ARTIFACTS_TAMPERED = "ArtifactsTampered"  # a figure file is not the one its stage published
    RESIDUAL_BELOW_THRESHOLD = "ResidualBelowThreshold"  # BackdoorRemoved True
    RESIDUAL_ABOVE_THRESHOLD = "ResidualAboveThreshold"  # BackdoorRemoved False
    NO_RESIDUAL_SAMPLE = "NoResidualSample"  # BackdoorRemoved Unknown
    BACKDOOR_NOT_REMOVED = "BackdoorNotRemoved"  # the Warning Event of a succeeded job whose residual is too high
    ROUND_STARTED = "RoundStarted"  # the Event of a closed-loop run purifying again (spec.rounds)


class Condition(ContractModel):
    type: ConditionType
    """Which aspect of the job this condition describes."""
    status: ConditionStatus
    """True, False or Unknown."""
    reason: Reason
    """Why the condition has its status (CamelCase)."""
    message: str = ""
    """Human-readable details."""
    last_transition_time: datetime
    """When the status last changed."""
    observed_generation: int = Field(0, ge=0)
    """The metadata.generation this condition was computed for."""


class StageStatus(ContractModel):
    name: StageName
    """The stage."""
    round: int = Field(1, ge=1)
    """The purification round it belongs to (spec.rounds; the evaluation: the round whose model the
    run publishes)."""
    phase: StagePhase = StagePhase.PENDING
    """Where the stage stands."""
    step: StepKind = StepKind.RUN
    """The part of the stage running now."""
    attempts: int = Field(0, ge=0)
    """Attempts started so far (a resume after suspension starts a new one)."""
    failures: int = Field(0, ge=0)
    """Failed attempts, counted against spec.policy.backoffLimit."""
    job_name: Optional[str] = None
    """The batch/v1 Job of the current or last attempt."""
    start_time: Optional[datetime] = None
    """When the first attempt started."""
    completion_time: Optional[datetime] = None
    """When the stage succeeded or failed for good."""
    retry_after: Optional[datetime] = None
    """When the next attempt may start (exponential backoff after a failure)."""
    artifact_uri: Optional[str] = None
    """Where the stage's outputs are (set once it succeeded)."""
    progress: float = Field(0.0, ge=0.0, le=1.0)
    """Fraction of the stage's items done (from progress.json)."""
    estimated_completion_time: Optional[datetime] = None
    """When the running stage should finish, at the rate its pod has managed so far."""
    minimum_memory_gib: Optional[float] = Field(None, ge=0.0, alias="minimumMemoryGiB")
    """The memory planner's floor for one batch of the stage on its GPU, in GiB, from the model's
    config.json and the spec: the batch's rows (one row when batchSize is auto) at the shortest a
    row can be (one image view and the answer). Real rows are longer; the stage plans its own data
    again before it computes. Unset: a CPU stage, or a model family the planner does not know."""
    message: str = ""
    """What holds the stage up (a queue, an unschedulable pod), or the last failure's explanation."""


class JobProgress(ContractModel):
    percent: int = Field(0, ge=0, le=100)
    """Whole-job progress: finished stages plus the running stage's fraction."""
    current_stage: Optional[StageName] = None
    """The stage running now."""
    current_round: Optional[int] = Field(None, ge=1)
    """The purification round it belongs to (spec.rounds)."""
    last_update_time: Optional[datetime] = None
    """When the runner last reported progress (alert on it going stale)."""


class PurificationJobStatus(ContractModel):
    phase: JobPhase = JobPhase.PENDING
    """Summary of the conditions."""
    observed_generation: int = Field(0, ge=0)
    """The metadata.generation the operator last acted on."""
    conditions: list[Condition] = []
    """Succeeded, Failed, Suspended, Reconciling, Stalled."""
    stages: list[StageStatus] = []
    """One entry per stage, in order."""
    progress: JobProgress = JobProgress()
    """Whole-job progress."""
    metrics: Optional[MetricsSummary] = None
    """ASR and clean performance before and after (when the job has an evaluation set)."""
    rounds: list[RoundRecord] = []
    """The purification rounds started so far, in order, each with why it ran and its audit's verdict."""
    purified_model_uri: Optional[str] = None
    """The purified model, in Hugging Face format."""
    run_uri: Optional[str] = None
    """Where this run's artifacts are."""
    runner_image: Optional[str] = None
    """The runner image of this run, by digest: the one its first stage pod runs (the pod's
    imageID, recorded once its container runs). Every later stage, retry and merge runs it, so a helm upgrade or a re-pushed tag
    cannot mix code versions within a run; the annotation disp.dev/runner-image: tag lets later
    stages follow the configured tag instead."""
    message: str = ""
    """What is happening, or why the job failed."""

    def stage(self, name: StageName, round_number: Optional[int] = None) -> Optional[StageStatus]:
        """The stage's entry (of `round_number`; without it, the first round that has one)."""
        return next((s for s in self.stages if s.name is name and round_number in (None, s.round)), None)

    def condition(self, kind: ConditionType) -> Optional[Condition]:
        return next((c for c in self.conditions if c.type is kind), None)
