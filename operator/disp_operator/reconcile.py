"""The operator's decisions, as a pure function: given a PurificationJob, the status the operator
last wrote and what it observes now (its stage Jobs and their pods, the runner's progress and
metrics), return the next status, the Jobs to create or delete, and the Events to post.

No I/O happens here, so every transition is unit-tested without a cluster. The handlers
(`handlers.py`) gather the observation and carry the plan out. Creating a Job is idempotent
(deterministic names), so carrying out the same plan twice is harmless.

Stages run in order. A stage runs as one Job, or, when sharded, as an Indexed Job (one pod per
shard) followed by a merge Job. A failed attempt is retried after an exponential backoff up to
spec.policy.backoffLimit times, unless its failure is permanent (the runner rejected its input)
or the stage ran past its deadline."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Mapping, Optional

from disp_api import (BackdoorVerdict, MetricsSummary, PurificationJob, ResidualJudgement, StageName, StageProgress,
                      judge_residual)
from disp_api.rounds import (chosen_round, first_round, judged, next_round, purified_model_uri, round_uri,
                             rounds_summary)
from disp_api.spec import RoundPolicy
from disp_api.status import (
    Condition,
    ConditionStatus,
    ConditionType,
    JobPhase,
    JobProgress,
    PurificationJobStatus,
    Reason,
    StagePhase,
    StageStatus,
    StepKind,
)
from disp_operator.children import (ChildJob, ChildState, FailureKind, PendingPod, PodOutcome, StartedPod,
                                    classify_failure, pinned_reference)
from disp_operator.kueue import Admission, AdmissionState, queue_name
from disp_operator.naming import stage_job_name


class EventType(str, Enum):
    NORMAL = "Normal"
    WARNING = "Warning"


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: Reason
    message: str


class WorkloadAction(str, Enum):
    """What becomes of a queued run's Kueue Workload (kueue.py)."""

    CREATE = "create"  # the run waits for its one admission
    RELEASE = "release"  # evicted, and its stage has stopped: give the reserved quota back
    FINISH = "finish"  # the run ended: Kueue frees the quota
    DELETE = "delete"  # suspended (the quota goes back until resumed), or a stale finished one


@dataclass(frozen=True)
class CreateJob:
    stage: StageName
    step: StepKind
    attempt: int
    round: int = 1  # the purification round (spec.rounds) the stage belongs to


@dataclass(frozen=True)
class Observation:
    now: datetime
    children: Mapping[str, ChildJob] = field(default_factory=dict)  # this job's stage Jobs, by name
    pods: Mapping[str, list[PodOutcome]] = field(default_factory=dict)  # their pods' outcomes, by Job name
    pending: Mapping[str, list[PendingPod]] = field(default_factory=dict)  # their pods not started yet, by Job name
    started: Mapping[str, list[StartedPod]] = field(default_factory=dict)  # their running pods, by Job name
    progress: Optional[StageProgress] = None  # the running stage's progress.json
    metrics: Optional[MetricsSummary] = None  # the kept round's figures (evaluate's metrics.json or its audit), once read
    audits: Mapping[int, MetricsSummary] = field(default_factory=dict)  # each finished round's audit.json, by round
    tampered: Optional[str] = None  # why the figure file read is not the one its stage published
    follow_image_tag: bool = False  # the job's disp.dev/runner-image annotation says `tag`: pin no digest
    admission: Optional[Admission] = None  # a queued run's Kueue Workload (None: there is none)
    memory_floors: Mapping[StageName, float] = field(default_factory=dict)  # the planner's, in GiB, by stage


@dataclass(frozen=True)
class RetryBackoff:
    """Delay before attempt n+1 after n failures: base * 2^(n-1), at most `maximum` seconds."""

    base_seconds: float = 10.0
    maximum_seconds: float = 600.0

    def delay(self, failures: int) -> timedelta:
        return timedelta(seconds=min(self.maximum_seconds, self.base_seconds * 2 ** max(0, failures - 1)))


@dataclass(frozen=True)
class Holdup:
    """Why the running stage does not run yet: queued for admission, or a pod that cannot start."""

    reason: Reason
    message: str
    stalled: bool  # kstatus Stalled: the cluster must change (quota, nodes) before the stage can run
    pending_seconds: float = 0.0  # how long its oldest pod has been waiting


@dataclass
class Plan:
    status: PurificationJobStatus
    create: list[CreateJob] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)  # Job names
    events: list[Event] = field(default_factory=list)
    requeue_after: Optional[float] = None  # seconds until a decision falls due (a retry's backoff)
    wants_metrics: bool = False  # read the kept round's figures and reconcile again
    wants_audit: Optional[int] = None  # read this round's audit.json and reconcile again
    failure_reason: Optional[Reason] = None  # why the current stage failed for good
    retries: list[tuple[StageName, FailureKind]] = field(default_factory=list)  # failed attempts to retry
    holdup: Optional[Holdup] = None  # what keeps the running stage from running
    expired: bool = False  # a finished job past policy.ttlSecondsAfterFinished: delete it
    workload: Optional["WorkloadAction"] = None  # what to do with a queued run's Kueue Workload


def first_step(job: PurificationJob, stage: StageName) -> StepKind:
    return StepKind.SHARDS if job.spec.shards(stage) > 1 else StepKind.RUN


def initial_stages(job: PurificationJob) -> list[StageStatus]:
    """Round 1's stages and the evaluation (further rounds are inserted before it as they start)."""
    return [StageStatus(name=stage, step=first_step(job, stage)) for stage in job.spec.stages()]


def round_stages(job: PurificationJob, round_number: int) -> list[StageStatus]:
    return [StageStatus(name=stage, step=first_step(job, stage), round=round_number)
            for stage in job.spec.stages() if stage is not StageName.EVALUATE]


def loops(job: PurificationJob) -> bool:
    """Whether a round's audit can start another round (else it is read only with the run's figures)."""
    return job.spec.rounds.policy is RoundPolicy.CLOSED_LOOP and job.spec.rounds.max_rounds > 1


def reject(status: PurificationJobStatus, message: str, generation: int, now: datetime) -> Plan:
    """An invalid spec: Failed/InvalidSpec, no child is ever created."""
    plan = Plan(status)
    _finish(plan, JobPhase.FAILED, Reason.INVALID_SPEC, message, generation, now)
    return plan


# A stage pod Pending this long (image pulls, volume binding, a queue outside Kueue) counts as stalled;
# one the scheduler has declared Unschedulable counts at once.
PENDING_THRESHOLD = timedelta(minutes=10)


def reconcile(job: Optional[PurificationJob], status: PurificationJobStatus, generation: int,
              observed: Observation, backoff: RetryBackoff = RetryBackoff(),
              pending_threshold: timedelta = PENDING_THRESHOLD) -> Plan:
    """One step of the state machine described in the module docstring. `job` may be None only
    for a finished job (whose spec then matters only for its time to live)."""
    plan = _reconcile(job, status, generation, observed, backoff, pending_threshold)
    admission = observed.admission
    if admission is not None and admission.state is not AdmissionState.FINISHED and plan.workload is None:
        # A run that ended holds no quota; a suspended one gives it back until it is resumed.
        if plan.status.phase.finished:
            plan.workload = WorkloadAction.FINISH
        elif plan.status.phase is JobPhase.SUSPENDED:
            plan.workload = WorkloadAction.DELETE
    return plan


def _reconcile(job: Optional[PurificationJob], status: PurificationJobStatus, generation: int,
               observed: Observation, backoff: RetryBackoff, pending_threshold: timedelta) -> Plan:
    now = observed.now
    plan = Plan(status)
    if status.phase.finished:
        # Terminal: nothing changes the outcome; a later edit (suspend) is only acknowledged.
        plan.status = status.model_copy(update={"observed_generation": max(status.observed_generation, generation)})
        ttl = job.spec.policy.ttl_seconds_after_finished if job is not None else None
        left = time_to_live(status, ttl, now)
        if left is not None:
            plan.expired = left <= timedelta(0)
            plan.requeue_after = None if plan.expired else left.total_seconds()
        return plan
    assert job is not None, "an unfinished job is reconciled against its spec"
    stages = [stage if stage.name not in observed.memory_floors else
              stage.model_copy(update={"minimum_memory_gib": observed.memory_floors[stage.name]})
              for stage in list(status.stages) or initial_stages(job)]
    if job.spec.policy.suspend:
        _suspend(plan, stages, generation, now)
        return plan
    if status.phase is JobPhase.SUSPENDED:
        plan.events.append(Event(EventType.NORMAL, Reason.RESUMED, "resumed from the last completed stage"))

    queue = queue_name(job)
    unfinished = any(stage.phase is not StagePhase.SUCCEEDED for stage in stages)
    if queue is not None and unfinished and \
            (observed.admission is None or observed.admission.state is not AdmissionState.ADMITTED):
        _await_admission(plan, stages, queue, observed, generation, now)
        return plan
    _pin_runner_image(plan, stages, observed)
    if not plan.status.rounds:
        plan.status = plan.status.model_copy(update={"rounds": [first_round()]})
    index = 0
    while index < len(stages):  # a round's end may insert the next round's stages after it
        stage = stages[index]
        if stage.phase is not StagePhase.SUCCEEDED:
            stage = _advance(plan, job, stage, observed, backoff, pending_threshold)
            stages[index] = stage
            if stage.phase is StagePhase.FAILED:
                _set_stages(plan, stages, observed, generation)
                _finish(plan, JobPhase.FAILED, plan.failure_reason or Reason.STAGE_FAILED,
                        f"{_stage_label(stage)} failed: {stage.message}", generation, now)
                return plan
            if stage.phase is not StagePhase.SUCCEEDED:
                _set_stages(plan, stages, observed, generation)
                _running(plan, stage, generation, now)
                return plan
        # Done (in this pass or before): the next stage starts in this same pass, after a round's
        # fine-tune once its audit has decided whether another round runs.
        if stage.name is StageName.FINETUNE and loops(job) and _unjudged(plan.status, stage.round):
            if not _end_round(plan, job, stages, index, observed):
                _set_stages(plan, stages, observed, generation)
                if observed.tampered is not None:
                    _finish(plan, JobPhase.FAILED, Reason.ARTIFACTS_TAMPERED,
                            f"figures not taken: {observed.tampered}; `disp verify` on the run names every changed "
                            "file", generation, now)
                return plan
        index += 1

    # Every stage succeeded: the run's figures (the audit's, and ASR with an evaluation set) first.
    _set_stages(plan, stages, observed, generation)
    if observed.tampered is not None:
        # Figures someone changed after their stage published them are not shown, exported or
        # trusted, and neither is the model they would vouch for: the job fails, saying which file.
        _finish(plan, JobPhase.FAILED, Reason.ARTIFACTS_TAMPERED,
                f"figures not taken: {observed.tampered}; `disp verify` on the run names every changed file",
                generation, now)
        return plan
    if observed.metrics is None:
        plan.wants_metrics = True
        return plan
    rounds = plan.status.rounds
    chosen = kept_round(plan.status)
    if any(r.round == chosen and r.verdict is None for r in rounds):  # a single pass: judged with the figures
        rounds = [r if r.round != chosen else judged(r, observed.metrics.residual_rate, observed.metrics.residual_sample,
                                                     job.spec.audit) for r in rounds]
    plan.status = plan.status.model_copy(update={
        "metrics": observed.metrics,
        "rounds": rounds,
        "purified_model_uri": purified_model_uri(job.run_uri(), chosen),
        "progress": JobProgress(percent=100, current_stage=None,
                                last_update_time=plan.status.progress.last_update_time),
    })
    judgement = judge_residual(observed.metrics.residual_rate, observed.metrics.residual_sample,
                               job.spec.audit.residual_threshold, job.spec.audit.residual_sample)
    message = "purified model at " + plan.status.purified_model_uri + _figures(observed.metrics)
    summary = rounds_summary(rounds, chosen)
    if summary:
        message += "; " + summary
    if judgement.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED:
        message += "; " + judgement.message
    _finish(plan, JobPhase.SUCCEEDED, Reason.COMPLETED, message, generation, now)
    _judge_backdoor(plan, judgement, generation, now)
    return plan


def kept_round(status: PurificationJobStatus) -> int:
    """The round whose model the run keeps (and evaluates): decided once the last round is judged;
    round 1 until then."""
    return chosen_round(status.rounds) if status.rounds else 1


def _unjudged(status: PurificationJobStatus, round_number: int) -> bool:
    return any(r.round == round_number and r.verdict is None for r in status.rounds)


def _end_round(plan: Plan, job: PurificationJob, stages: list[StageStatus], index: int,
               observed: Observation) -> bool:
    """Round `stages[index]`'s fine-tune is done: its audit's verdict decides whether the next round
    of the ladder runs (its stages inserted after this one) or the loop ends (the evaluation then
    measures the kept round's model). False while the audit is still to be read."""
    round_number = stages[index].round
    audit = observed.audits.get(round_number)
    if audit is None:
        if observed.tampered is None:
            plan.wants_audit = round_number
        return False
    rounds = [judged(r, audit.residual_rate, audit.residual_sample, job.spec.audit) if r.round == round_number else r
              for r in plan.status.rounds]
    following = next_round(job.spec, rounds)
    if following is not None:
        rounds.append(following)
        stages[index + 1:index + 1] = round_stages(job, following.round)
        plan.events.append(Event(EventType.NORMAL, Reason.ROUND_STARTED,
                                 f"round {following.round} ({following.recipe.value} recipe) starts: {following.reason}"))
    else:
        chosen = chosen_round(rounds)
        stages[:] = [s.model_copy(update={"round": chosen}) if s.name is StageName.EVALUATE else s for s in stages]
    plan.status = plan.status.model_copy(update={"rounds": rounds})
    return True


_VERDICT_REASONS = {
    BackdoorVerdict.REMOVED: Reason.RESIDUAL_BELOW_THRESHOLD,
    BackdoorVerdict.PROBABLY_NOT_REMOVED: Reason.RESIDUAL_ABOVE_THRESHOLD,
    BackdoorVerdict.UNKNOWN: Reason.NO_RESIDUAL_SAMPLE,
}


def _judge_backdoor(plan: Plan, judgement: ResidualJudgement, generation: int, now: datetime) -> None:
    """The audit's verdict on the purified model, as the BackdoorRemoved condition; a model the audit
    finds still answering the suspects as the compromised one did also gets a Warning Event, so a
    Succeeded job never hides it (the pipeline ran, the backdoor probably survived)."""
    conditions = _with_condition(plan.status.conditions, ConditionType.BACKDOOR_REMOVED,
                                 ConditionStatus(judgement.verdict.condition_status),
                                 _VERDICT_REASONS[judgement.verdict], judgement.message, generation, now)
    plan.status = plan.status.model_copy(update={"conditions": conditions})
    if judgement.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED:
        plan.events.append(Event(EventType.WARNING, Reason.BACKDOOR_NOT_REMOVED, judgement.message))


def _stage_label(stage: StageStatus) -> str:
    """How messages name a stage: "stage relabel", or "stage relabel (round 2)" in a later round."""
    return f"stage {stage.name.value}" + (f" (round {stage.round})" if stage.round > 1 else "")


def _pin_runner_image(plan: Plan, stages: list[StageStatus], observed: Observation) -> None:
    """Record the digest the run's earliest stage with a started or ended pod ran (its imageID);
    every stage Job created after it runs that digest (service.py). Following the tag instead drops
    the record."""
    if observed.follow_image_tag:
        if plan.status.runner_image is not None:
            plan.status = plan.status.model_copy(update={"runner_image": None})
        return
    if plan.status.runner_image is not None:
        return
    for stage in stages:  # in order: a later stage may already have run a re-pointed tag
        job_name = stage.job_name or ""
        image_ids = [p.image_id for p in observed.pods.get(job_name, [])] + \
            [p.image_id for p in observed.started.get(job_name, [])]
        for image_id in image_ids:
            reference = pinned_reference(image_id)
            if reference is not None:
                plan.status = plan.status.model_copy(update={"runner_image": reference})
                return


def finished_at(status: PurificationJobStatus) -> Optional[datetime]:
    """When the job succeeded or failed: its true Succeeded or Failed condition's transition."""
    for kind in (ConditionType.SUCCEEDED, ConditionType.FAILED):
        condition = status.condition(kind)
        if condition is not None and condition.status is ConditionStatus.TRUE:
            return condition.last_transition_time
    return None


def time_to_live(status: PurificationJobStatus, ttl_seconds: Optional[int], now: datetime) -> Optional[timedelta]:
    """How long a finished job has left under policy.ttlSecondsAfterFinished (<= 0: delete it now);
    None when it is kept (no TTL, or no record of when it finished)."""
    finished = finished_at(status)
    if ttl_seconds is None or finished is None:
        return None
    return finished + timedelta(seconds=ttl_seconds) - now


def _figures(metrics: MetricsSummary) -> str:
    """The run's headline numbers for the completion message."""
    parts = []
    if metrics.asr_before is not None and metrics.asr_after is not None:
        parts.append(f"ASR {metrics.asr_before:.1%} -> {metrics.asr_after:.1%}")
    if metrics.estimated_poisoned_share is not None:
        parts.append(f"audit: {metrics.estimated_poisoned_share:.1%} of the data suspect")
    if metrics.residual_rate is not None:
        parts.append(f"residual rate {metrics.residual_rate:.1%}")
    return "".join("; " + p for p in parts)


# How long a failed Job's verdict waits for its failed pod to be observed (then: no pod left to ask).
POD_STATUS_GRACE = timedelta(seconds=10)


def _advance(plan: Plan, job: PurificationJob, stage: StageStatus, observed: Observation,
             backoff: RetryBackoff, pending_threshold: timedelta) -> StageStatus:
    """Move the current (first unfinished) stage forward as far as the observation allows."""
    now = observed.now
    if stage.phase in (StagePhase.PENDING, StagePhase.RETRYING):
        if stage.retry_after is not None and now < stage.retry_after:
            plan.requeue_after = (stage.retry_after - now).total_seconds()
            return stage
        return _start(plan, job, stage, stage.step, stage.attempts + 1, now)

    child = observed.children.get(stage.job_name or "")
    if child is None or child.state in (ChildState.ACTIVE, ChildState.QUEUED):
        if child is None:  # not seen yet (just created) or gone: (re)create it, idempotently
            plan.create.append(CreateJob(stage.name, stage.step, stage.attempts, stage.round))
        plan.holdup = _holdup(job, stage, child, observed.pending.get(stage.job_name or "", []), now,
                              pending_threshold)
        update: dict = {"message": plan.holdup.message if plan.holdup else ""}
        progress = observed.progress
        if progress is not None and progress.stage is stage.name:
            update["progress"] = max(stage.progress, min(1.0, progress.fraction))
            if progress.eta_seconds is not None and progress.updated_at is not None:
                update["estimated_completion_time"] = progress.updated_at + timedelta(seconds=progress.eta_seconds)
        return stage.model_copy(update=update)

    if child.state is ChildState.SUCCEEDED:
        if stage.step is StepKind.SHARDS:  # every shard is done: merge them
            return _start(plan, job, stage, StepKind.MERGE, stage.attempts, now, announce=False)
        plan.events.append(Event(EventType.NORMAL, Reason.STAGE_SUCCEEDED,
                                 f"{_stage_label(stage)} succeeded (attempt {stage.attempts})"))
        return stage.model_copy(update={
            "phase": StagePhase.SUCCEEDED, "completion_time": now, "progress": 1.0, "message": "",
            "artifact_uri": f"{round_uri(job.run_uri(), stage.round)}/{stage.name.value}"})

    # The attempt failed.
    pods = list(observed.pods.get(child.name, []))
    if not any(pod.failed for pod in pods) and child.failed_at is not None \
            and abs(now - child.failed_at) < POD_STATUS_GRACE:  # abs: a skewed API-server clock never holds long
        # Jobs and pods are two watches with no order between them: the Job's Failed condition can
        # arrive before the failed pod's status that says why (OOM-killed, bad input). Wait for it a
        # moment rather than report the cause as unknown.
        plan.requeue_after = 1.0
        return stage
    failure = classify_failure(child, pods)
    failures = stage.failures + 1
    if not job.spec.policy.keep_failed_pods:
        plan.delete.append(child.name)
    limit = job.spec.policy.backoff_limit
    if failure.kind.retryable and failures <= limit:
        retry_after = now + backoff.delay(failures)
        plan.retries.append((stage.name, failure.kind))
        plan.requeue_after = (retry_after - now).total_seconds()
        plan.events.append(Event(EventType.WARNING, Reason.STAGE_RETRYING,
                                 f"{_stage_label(stage)} attempt {stage.attempts} failed ({failure.kind.value}): "
                                 f"{failure.message}; retry {failures} of {limit} in "
                                 f"{backoff.delay(failures).total_seconds():.0f}s"))
        return stage.model_copy(update={"phase": StagePhase.RETRYING, "failures": failures,
                                        "retry_after": retry_after, "message": failure.message})
    if failure.kind is FailureKind.DEADLINE:
        reason = Reason.DEADLINE_EXCEEDED
    elif failure.kind.retryable:
        reason = Reason.BACKOFF_LIMIT_EXCEEDED
    else:
        reason = Reason.STAGE_FAILED
    why = failure.message if reason is not Reason.BACKOFF_LIMIT_EXCEEDED else \
        f"{failure.message} (failed {failures} times; backoffLimit {limit})"
    plan.failure_reason = reason
    return stage.model_copy(update={"phase": StagePhase.FAILED, "failures": failures, "completion_time": now,
                                    "message": why, "retry_after": None})


def _holdup(job: PurificationJob, stage: StageStatus, child: Optional[ChildJob], pending: list[PendingPod],
            now: datetime, threshold: timedelta) -> Optional[Holdup]:
    """What keeps a running stage's Job from running, if anything."""
    if child is not None and child.state is ChildState.QUEUED:
        queue = queue_name(job)
        where = f" in Kueue queue {queue}" if queue else ""
        return Holdup(Reason.WAITING_FOR_ADMISSION,
                      f"{_stage_label(stage)}: Job {child.name} is waiting for admission{where}", stalled=False)
    if not pending:
        return None
    oldest = min(pending, key=lambda p: p.since)
    waited = max(0.0, (now - oldest.since).total_seconds())
    blocked = next((p for p in pending if p.unschedulable), None)
    pod = blocked or oldest
    detail = f": {pod.message}" if pod.message else ""
    if blocked is not None:
        return Holdup(Reason.UNSCHEDULABLE, f"{_stage_label(stage)}: pod {pod.pod_name} cannot be scheduled"
                      f"{detail}", stalled=True, pending_seconds=waited)
    if waited >= threshold.total_seconds():
        return Holdup(Reason.POD_PENDING, f"{_stage_label(stage)}: pod {pod.pod_name} pending for "
                      f"{waited / 60:.0f} min ({pod.reason}){detail}", stalled=True, pending_seconds=waited)
    return Holdup(Reason.POD_PENDING, "", stalled=False, pending_seconds=waited)


def _start(plan: Plan, job: PurificationJob, stage: StageStatus, step: StepKind, attempt: int, now: datetime,
           announce: bool = True) -> StageStatus:
    name = stage_job_name(job.metadata.name, stage.name, step, attempt, stage.round)
    plan.create.append(CreateJob(stage.name, step, attempt, stage.round))
    if announce:
        plan.events.append(Event(EventType.NORMAL, Reason.STAGE_STARTED,
                                 f"{_stage_label(stage)} attempt {attempt}: Job {name}"))
    return stage.model_copy(update={"phase": StagePhase.RUNNING, "step": step, "attempts": attempt, "job_name": name,
                                    "start_time": stage.start_time or now, "retry_after": None})


def _await_admission(plan: Plan, stages: list[StageStatus], queue: str, observed: Observation, generation: int,
                     now: datetime) -> None:
    """A queued run without its admission: no stage runs. Without a Workload it gets one; evicted,
    its running stage stops (a new attempt, not a failure, once admitted again) and, once no stage
    Job of the run is active, the reserved quota is given back so that Kueue can queue it again."""
    admission = observed.admission
    if admission is None:
        plan.workload = WorkloadAction.CREATE
        message = f"waiting for admission in Kueue queue {queue}"
    elif admission.state is AdmissionState.EVICTED:
        _stop_running(plan, stages, message="")
        active = [c.name for c in observed.children.values() if c.state in (ChildState.ACTIVE, ChildState.QUEUED)]
        if active:
            plan.requeue_after = 1.0  # its pods are stopping: the quota goes back once they are gone
        else:
            plan.workload = WorkloadAction.RELEASE
        message = f"evicted by Kueue ({admission.message or 'no reason given'}): the running stage stopped; " \
                  f"waiting for admission in Kueue queue {queue}"
    elif admission.state is AdmissionState.FINISHED:
        plan.workload = WorkloadAction.DELETE  # not this run's (it has not ended): a new one next pass
        message = f"waiting for admission in Kueue queue {queue}"
    else:
        message = f"waiting for admission in Kueue queue {queue}" + (f": {admission.message}" if admission.message
                                                                      else "")
    _set_stages(plan, stages, observed, generation)
    plan.holdup = Holdup(Reason.WAITING_FOR_ADMISSION, message, stalled=False)
    current = next((s for s in stages if s.phase is not StagePhase.SUCCEEDED), stages[-1])
    _running(plan, current, generation, now)


def _stop_running(plan: Plan, stages: list[StageStatus], **update: object) -> None:
    """Delete the running stage's Job and make the stage pending again: its next start is a new
    attempt, not a failure (suspension, a Kueue eviction)."""
    for index, stage in enumerate(stages):
        if stage.phase is StagePhase.RUNNING and stage.job_name:
            plan.delete.append(stage.job_name)
            stages[index] = stage.model_copy(update={"phase": StagePhase.PENDING, "progress": 0.0, **update})


def _suspend(plan: Plan, stages: list[StageStatus], generation: int, now: datetime) -> None:
    """Delete the running stage Job; the stage starts again (a new attempt, not a failure) on resume."""
    _stop_running(plan, stages)
    was_suspended = plan.status.phase is JobPhase.SUSPENDED
    plan.status = plan.status.model_copy(update={
        "stages": stages, "phase": JobPhase.SUSPENDED, "observed_generation": generation,
        "message": "suspended: no stage runs until spec.policy.suspend is false"})
    conditions = plan.status.conditions
    conditions = _with_condition(conditions, ConditionType.SUSPENDED, True, Reason.SUSPENDED,
                                 "spec.policy.suspend is true", generation, now)
    conditions = _with_condition(conditions, ConditionType.RECONCILING, False, Reason.SUSPENDED,
                                 "suspended", generation, now)
    # A suspended job waits by choice: never stalled (nor alerted on as such).
    conditions = _with_condition(conditions, ConditionType.STALLED, False, Reason.SUSPENDED, "", generation, now)
    plan.status = plan.status.model_copy(update={"conditions": conditions})
    if not was_suspended:
        plan.events.append(Event(EventType.NORMAL, Reason.SUSPENDED, "suspended; running stage Jobs deleted"))


def _set_stages(plan: Plan, stages: list[StageStatus], observed: Observation, generation: int) -> None:
    """Store the stages and the whole-job progress derived from them."""
    done = sum(1 for s in stages if s.phase is StagePhase.SUCCEEDED)
    current = next((s for s in stages if s.phase is not StagePhase.SUCCEEDED), None)
    fraction = current.progress if current is not None else 0.0
    percent = int(100 * (done + fraction) / len(stages)) if stages else 0
    if any(s.round > 1 for s in stages):
        # A later round's stages, inserted when the round before it ended, add to the work left:
        # the share done would fall (80% -> 44% when round 2 starts); the percent holds instead
        # until the new round's work passes it, so a dashboard or alert never sees it go back.
        percent = max(percent, plan.status.progress.percent)
    last_update = plan.status.progress.last_update_time
    if observed.progress is not None and observed.progress.updated_at is not None:
        last_update = max(filter(None, [last_update, observed.progress.updated_at]))
    plan.status = plan.status.model_copy(update={
        "stages": stages, "observed_generation": generation,
        "progress": JobProgress(percent=min(100, percent), current_stage=current.name if current else None,
                                current_round=current.round if current else None, last_update_time=last_update)})


def _running(plan: Plan, stage: StageStatus, generation: int, now: datetime) -> None:
    holdup = plan.holdup if plan.holdup is not None and plan.holdup.message else None
    if stage.phase is StagePhase.RETRYING:
        reason, message = Reason.STAGE_RETRYING, f"{_stage_label(stage)} failed, retrying: {stage.message}"
    elif holdup is not None:
        reason, message = holdup.reason, holdup.message
    else:
        reason, message = Reason.STAGE_RUNNING, f"{_stage_label(stage)} running (attempt {stage.attempts})"
    conditions = plan.status.conditions
    stalled = holdup is not None and holdup.stalled
    old = plan.status.condition(ConditionType.STALLED)
    if stalled and (old is None or old.status is not ConditionStatus.TRUE or old.reason is not reason):
        plan.events.append(Event(EventType.WARNING, reason, message))
    if holdup is not None and not holdup.stalled:
        old_reconciling = plan.status.condition(ConditionType.RECONCILING)
        if old_reconciling is None or old_reconciling.reason is not reason:
            plan.events.append(Event(EventType.NORMAL, reason, message))
    conditions = _with_condition(conditions, ConditionType.RECONCILING, True, reason, message, generation, now)
    conditions = _with_condition(conditions, ConditionType.STALLED, stalled, reason, message if stalled else "",
                                 generation, now)
    conditions = _with_condition(conditions, ConditionType.SUSPENDED, False, Reason.RESUMED, "", generation, now) \
        if plan.status.condition(ConditionType.SUSPENDED) else conditions
    plan.status = plan.status.model_copy(update={"phase": JobPhase.RUNNING, "conditions": conditions,
                                                 "message": message})


def _finish(plan: Plan, phase: JobPhase, reason: Reason, message: str, generation: int, now: datetime) -> None:
    succeeded = phase is JobPhase.SUCCEEDED
    conditions = plan.status.conditions
    conditions = _with_condition(conditions, ConditionType.SUCCEEDED, succeeded, reason, message if succeeded else "",
                                 generation, now)
    conditions = _with_condition(conditions, ConditionType.FAILED, not succeeded, reason,
                                 "" if succeeded else message, generation, now)
    conditions = _with_condition(conditions, ConditionType.RECONCILING, False, reason, "", generation, now)
    conditions = _with_condition(conditions, ConditionType.STALLED, not succeeded, reason,
                                 "" if succeeded else message, generation, now)
    plan.status = plan.status.model_copy(update={"phase": phase, "conditions": conditions, "message": message,
                                                 "observed_generation": generation})
    plan.events.append(Event(EventType.NORMAL if succeeded else EventType.WARNING,
                             reason if not succeeded else Reason.COMPLETED, message))


def _with_condition(conditions: list[Condition], kind: ConditionType, true: bool | ConditionStatus, reason: Reason,
                    message: str, generation: int, now: datetime) -> list[Condition]:
    """Set one condition (True/False, or any ConditionStatus); lastTransitionTime changes only when
    the status flips (API conventions)."""
    status = true if isinstance(true, ConditionStatus) else ConditionStatus.TRUE if true else ConditionStatus.FALSE
    old = next((c for c in conditions if c.type is kind), None)
    changed_at = old.last_transition_time if old is not None and old.status is status else now
    new = Condition(type=kind, status=status, reason=reason, message=message, last_transition_time=changed_at,
                    observed_generation=generation)
    return [c for c in conditions if c.type is not kind] + [new] if old is None else \
        [new if c.type is kind else c for c in conditions]
