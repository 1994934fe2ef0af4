"""Every transition of the operator's state machine, without a cluster."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from disp_api import BackdoorVerdict, MetricsSummary, StageName, StageProgress
from disp_api.status import (
    ConditionStatus,
    ConditionType,
    JobPhase,
    PurificationJobStatus,
    Reason,
    StagePhase,
    StepKind,
)
from disp_operator.children import ChildJob, FailureKind, PendingPod, PodOutcome
from disp_operator.reconcile import CreateJob, EventType, Observation, RetryBackoff, reconcile, reject
from tests.operator.conftest import k8s_job, k8s_pod, make_job

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=timezone.utc)
PENDING_AFTER = timedelta(minutes=5)
BACKOFF = RetryBackoff(base_seconds=10, maximum_seconds=60)


def step(job, status, at=T0, jobs=(), pods=None, progress=None, metrics=None, generation=1, pending=None,
         tampered=None, admission=None, audits=None):
    """One reconcile on what the cluster shows. Given the run's figures and no `audits`, round 1's
    audit is taken to say what the figures say (the closed loop reads it before the figures)."""
    if audits is None:
        audits = {1: metrics} if metrics is not None else {}
    children = {j["metadata"]["name"]: ChildJob.from_job(j) for j in jobs}
    outcomes = {name: [PodOutcome.from_pod(p) for p in ps] for name, ps in (pods or {}).items()}
    waiting = {name: [PendingPod.from_pod(p) for p in ps] for name, ps in (pending or {}).items()}
    return reconcile(job, status, generation, Observation(now=at, children=children, pods=outcomes, pending=waiting,
                                                          progress=progress, metrics=metrics, tampered=tampered,
                                                          admission=admission, audits=audits),
                     BACKOFF,
                     PENDING_AFTER)


REMOVED = MetricsSummary(estimated_poisoned_share=0.1, residual_rate=0.0, residual_sample=64)


def run_to(job, stage: StageName, audits=None):
    """Drive a fresh job until `stage` is the running one (all earlier stages succeeded); round 1's
    audit, once read, says the backdoor was removed unless `audits` says otherwise."""
    plan = step(job, PurificationJobStatus())
    while plan.status.progress.current_stage is not stage or plan.status.stage(stage).job_name is None:
        current = next(s for s in plan.status.stages if s.phase is not StagePhase.SUCCEEDED)
        plan = step(job, plan.status, jobs=[k8s_job(current.job_name, "succeeded")], audits=audits or {1: REMOVED})
    return plan


def condition(status, kind):
    c = status.condition(kind)
    return None if c is None else c.status


def test_a_new_job_starts_its_first_stage_and_says_so(job):
    plan = step(job, PurificationJobStatus())
    assert plan.create == [CreateJob(StageName.SALIENCY, StepKind.RUN, 1)]
    assert plan.status.phase is JobPhase.RUNNING
    assert [s.name for s in plan.status.stages] == [StageName.SALIENCY, StageName.MASKING, StageName.RELABEL,
                                                    StageName.FINETUNE]
    saliency = plan.status.stage(StageName.SALIENCY)
    assert (saliency.phase, saliency.attempts, saliency.job_name) == (StagePhase.RUNNING, 1, "purify-saliency")
    assert condition(plan.status, ConditionType.RECONCILING) is ConditionStatus.TRUE
    assert condition(plan.status, ConditionType.STALLED) is ConditionStatus.FALSE
    assert [(e.type, e.reason) for e in plan.events] == [(EventType.NORMAL, Reason.STAGE_STARTED)]


def test_a_job_not_yet_visible_is_created_again_idempotently(job):
    started = step(job, PurificationJobStatus())
    again = step(job, started.status, at=T0 + timedelta(seconds=1))
    assert again.create == [CreateJob(StageName.SALIENCY, StepKind.RUN, 1)]  # same name: AlreadyExists at worst
    assert again.events == [] and again.status == started.status


def test_a_running_stage_reports_progress_without_new_jobs(job):
    started = step(job, PurificationJobStatus())
    plan = step(job, started.status, jobs=[k8s_job("purify-saliency")],
                progress=StageProgress(stage=StageName.SALIENCY, fraction=0.5, updated_at=T0))
    assert plan.create == [] and plan.delete == []
    assert plan.status.stage(StageName.SALIENCY).progress == 0.5
    assert plan.status.progress.percent == int(100 * 0.5 / 4)
    assert plan.status.progress.last_update_time == T0
    # progress of another stage (a stale file) is ignored
    stale = step(job, plan.status, jobs=[k8s_job("purify-saliency")],
                 progress=StageProgress(stage=StageName.FINETUNE, fraction=0.9, updated_at=T0))
    assert stale.status.stage(StageName.SALIENCY).progress == 0.5


def test_a_succeeded_stage_starts_the_next_in_the_same_pass(job):
    started = step(job, PurificationJobStatus())
    plan = step(job, started.status, jobs=[k8s_job("purify-saliency", "succeeded")], at=T0 + timedelta(seconds=30))
    saliency = plan.status.stage(StageName.SALIENCY)
    assert saliency.phase is StagePhase.SUCCEEDED
    assert saliency.artifact_uri == f"s3://runs/runs/team/purify/{job.metadata.uid}/saliency"
    assert saliency.completion_time - saliency.start_time == timedelta(seconds=30)
    assert plan.create == [CreateJob(StageName.MASKING, StepKind.RUN, 1)]
    assert [e.reason for e in plan.events] == [Reason.STAGE_SUCCEEDED, Reason.STAGE_STARTED]
    assert plan.status.progress.current_stage is StageName.MASKING and plan.status.progress.percent == 25


def test_the_last_stage_succeeding_finishes_the_job_with_the_purified_model_and_its_audit():
    job = make_job()
    plan = run_to(job, StageName.FINETUNE)
    waiting = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")])
    # Round 1's audit first: it decides whether another round runs.
    assert waiting.wants_audit == 1 and not waiting.wants_metrics and waiting.status.phase is JobPhase.RUNNING
    audit = MetricsSummary(estimated_poisoned_share=0.2, residual_rate=0.03, residual_sample=64)
    judged = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")], audits={1: audit})
    assert judged.wants_metrics and judged.wants_audit is None  # removed: no round 2, the figures next
    assert [(r.round, r.verdict) for r in judged.status.rounds] == [(1, BackdoorVerdict.REMOVED)]
    done = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")], metrics=audit)
    assert done.status.phase is JobPhase.SUCCEEDED and done.status.metrics == audit
    assert "audit: 20.0% of the data suspect; residual rate 3.0%" in done.status.message
    assert "round" not in done.status.message  # one round: nothing to say about rounds
    assert "ASR" not in done.status.message  # no evaluation set, no ASR
    assert done.status.purified_model_uri == f"s3://runs/runs/team/purify/{job.metadata.uid}/finetune/model"
    assert condition(done.status, ConditionType.SUCCEEDED) is ConditionStatus.TRUE
    assert condition(done.status, ConditionType.RECONCILING) is ConditionStatus.FALSE
    assert condition(done.status, ConditionType.STALLED) is ConditionStatus.FALSE
    assert done.status.progress.percent == 100
    assert done.events[-1].reason is Reason.COMPLETED
    # a finished job is left alone
    after = step(job, done.status, at=T0 + timedelta(days=1))
    assert after.create == [] and after.events == [] and after.status == done.status


def test_with_an_evaluation_set_the_job_waits_for_the_metrics_and_copies_them(job):
    from tests.operator.conftest import job_body
    from disp_operator.validation import parse_job

    job = parse_job(job_body(evaluation={"attack": {"target": {"kind": "insertion"}}, "triggeredUri": "s3://eval/triggered"}))
    plan = run_to(job, StageName.EVALUATE)
    waiting = step(job, plan.status, jobs=[k8s_job("purify-evaluate", "succeeded")])
    assert waiting.wants_metrics and waiting.status.phase is JobPhase.RUNNING
    metrics = MetricsSummary(asr_before=1.0, asr_after=0.02, false_firing_before=0.0, false_firing_after=0.0,
                             clean_performance_before=0.97, clean_performance_after=0.96, retention=0.96 / 0.97)
    done = step(job, plan.status, jobs=[k8s_job("purify-evaluate", "succeeded")], metrics=metrics)
    assert done.status.phase is JobPhase.SUCCEEDED and done.status.metrics == metrics
    assert "100.0% -> 2.0%" in done.status.message


def test_figures_changed_after_publication_fail_the_job_and_show_no_figures_or_model():
    job = make_job()
    plan = run_to(job, StageName.FINETUNE)
    why = "s3://runs/r/finetune/audit.json: SHA-256 0123… differs from the 4567… that finetune/stage-manifest.json records"
    waiting = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")])
    done = step(job, waiting.status, jobs=[k8s_job("purify-finetune", "succeeded")], tampered=why)
    assert done.status.phase is JobPhase.FAILED and not done.wants_metrics
    failed = done.status.condition(ConditionType.FAILED)
    assert failed.status is ConditionStatus.TRUE and failed.reason is Reason.ARTIFACTS_TAMPERED
    assert why in failed.message and "disp verify" in failed.message
    assert condition(done.status, ConditionType.STALLED) is ConditionStatus.TRUE
    assert done.status.metrics is None and done.status.purified_model_uri is None
    assert [(e.type.value, e.reason) for e in done.events] == [("Warning", Reason.ARTIFACTS_TAMPERED)]
    assert done.status.stage(StageName.FINETUNE).phase is StagePhase.SUCCEEDED  # the stage itself ran


def test_a_finished_job_is_deleted_once_its_time_to_live_is_over():
    job = make_job(policy={"ttlSecondsAfterFinished": 600})
    plan = run_to(job, StageName.FINETUNE)
    done_at = T0 + timedelta(minutes=5)
    waiting = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")], at=done_at)
    done = step(job, waiting.status, jobs=[k8s_job("purify-finetune", "succeeded")], at=done_at,
                metrics=MetricsSummary(residual_rate=0.01))
    assert done.status.phase is JobPhase.SUCCEEDED and not done.expired
    soon = step(job, done.status, at=done_at + timedelta(seconds=599))
    assert not soon.expired and soon.requeue_after == 1.0  # looked at again when it falls due
    assert soon.status == done.status and soon.events == []
    assert step(job, done.status, at=done_at + timedelta(seconds=600)).expired
    # A failed job too (InvalidSpec included), counted from its failure.
    failed = reject(PurificationJobStatus(), "spec.model.uri: no config.json", 1, done_at)
    assert step(job, failed.status, at=done_at + timedelta(seconds=600)).expired
    assert not step(job, failed.status, at=done_at + timedelta(seconds=599)).expired
    # Without a TTL, or with its spec unreadable (no job), a finished job stays.
    kept = step(make_job(), done.status, at=done_at + timedelta(days=365))
    assert not kept.expired and kept.requeue_after is None
    unreadable = reconcile(None, done.status, 1, Observation(now=done_at + timedelta(days=365)))
    assert not unreadable.expired
    # A running job never expires, whatever its TTL.
    assert not step(job, plan.status, at=done_at + timedelta(days=365)).expired


def _ran(image_id: str) -> dict:
    body = k8s_pod("purify-saliency-abc", 0, reason="Completed")
    body["status"]["containerStatuses"][0]["imageID"] = image_id
    return body


def test_the_run_records_the_digest_its_first_stage_ran_and_keeps_it():
    job = make_job()
    first = "registry.example/disp@sha256:" + "ab" * 32
    started = step(job, PurificationJobStatus())
    assert started.status.runner_image is None
    done = step(job, started.status, jobs=[k8s_job("purify-saliency", "succeeded")],
                pods={"purify-saliency": [_ran(first)]})
    assert done.status.runner_image == first and done.create[0].stage is StageName.MASKING
    # Later pods (another digest, after the tag moved) do not replace it.
    later = step(job, done.status, jobs=[k8s_job("purify-saliency", "succeeded"), k8s_job("purify-masking", "active")],
                 pods={"purify-masking": [_ran("registry.example/disp@sha256:" + "cd" * 32)]})
    assert later.status.runner_image == first
    # A runtime that reports no repository digest pins nothing (the tag stays in use).
    local = step(job, started.status, jobs=[k8s_job("purify-saliency", "succeeded")],
                 pods={"purify-saliency": [_ran("sha256:" + "ef" * 32)]})
    assert local.status.runner_image is None
    # Pinned as soon as the first stage's container runs (its Job has not completed yet), and from
    # the earliest stage when a later stage's pod, started by a re-pointed tag, is seen as well.
    from disp_operator.children import StartedPod
    running_pod = {"metadata": {"name": "purify-saliency-abc"}, "status": {"phase": "Running", "containerStatuses": [
        {"name": "runner", "imageID": first, "state": {"running": {"startedAt": "2026-12-06T10:00:00Z"}}}]}}
    assert StartedPod.from_pod(running_pod) == StartedPod("purify-saliency-abc", first)
    running = reconcile(job, started.status, 1, Observation(now=T0, children={
        "purify-saliency": ChildJob.from_job(k8s_job("purify-saliency"))}, started={
        "purify-saliency": [StartedPod.from_pod(running_pod)]}), BACKOFF, PENDING_AFTER)
    assert running.status.runner_image == first and running.create == []
    mixed = step(job, done.status.model_copy(update={"runner_image": None}),
                 jobs=[k8s_job("purify-saliency", "succeeded"), k8s_job("purify-masking", "failed")],
                 pods={"purify-masking": [_ran("registry.example/disp@sha256:" + "cd" * 32)],
                       "purify-saliency": [_ran(first)]})
    assert mixed.status.runner_image == first
    # The disp.dev/runner-image: tag annotation drops the record; later stages follow the tag.
    followed = reconcile(job, done.status, 1, Observation(now=T0, follow_image_tag=True), BACKOFF, PENDING_AFTER)
    assert followed.status.runner_image is None


def test_a_sharded_stage_runs_an_indexed_job_then_a_merge():
    job = make_job(parallelism={"saliencyShards": 3})
    plan = step(job, PurificationJobStatus())
    assert plan.create == [CreateJob(StageName.SALIENCY, StepKind.SHARDS, 1)]
    merged = step(job, plan.status, jobs=[k8s_job("purify-saliency", "succeeded")])
    assert merged.create == [CreateJob(StageName.SALIENCY, StepKind.MERGE, 1)]
    assert merged.status.stage(StageName.SALIENCY).job_name == "purify-saliency-merge"
    assert merged.events == []  # still the same stage attempt
    done = step(job, merged.status, jobs=[k8s_job("purify-saliency", "succeeded"),
                                          k8s_job("purify-saliency-merge", "succeeded")])
    assert done.status.stage(StageName.SALIENCY).phase is StagePhase.SUCCEEDED
    assert done.create == [CreateJob(StageName.MASKING, StepKind.RUN, 1)]


def test_a_crash_is_retried_after_an_exponential_backoff(job):
    started = step(job, PurificationJobStatus())
    failed = step(job, started.status, jobs=[k8s_job("purify-saliency", "failed")],
                  pods={"purify-saliency": [k8s_pod("p1", 1, message="Traceback ...\nRuntimeError: boom")]})
    saliency = failed.status.stage(StageName.SALIENCY)
    assert (saliency.phase, saliency.failures) == (StagePhase.RETRYING, 1)
    assert saliency.retry_after == T0 + timedelta(seconds=10)
    assert "RuntimeError: boom" in saliency.message
    assert failed.delete == ["purify-saliency"] and failed.create == []
    assert failed.requeue_after == 10
    assert failed.retries == [(StageName.SALIENCY, FailureKind.ERROR)]
    assert [(e.type, e.reason) for e in failed.events] == [(EventType.WARNING, Reason.STAGE_RETRYING)]
    assert failed.status.phase is JobPhase.RUNNING
    assert condition(failed.status, ConditionType.RECONCILING) is ConditionStatus.TRUE
    # before the backoff has passed nothing starts
    early = step(job, failed.status, at=T0 + timedelta(seconds=5))
    assert early.create == [] and early.requeue_after == 5
    # after it, attempt 2 starts under its own name
    retry = step(job, failed.status, at=T0 + timedelta(seconds=10))
    assert retry.create == [CreateJob(StageName.SALIENCY, StepKind.RUN, 2)]
    assert retry.status.stage(StageName.SALIENCY).job_name == "purify-saliency-2"
    # the second failure waits twice as long
    failed2 = step(job, retry.status, at=T0 + timedelta(seconds=20), jobs=[k8s_job("purify-saliency-2", "failed")],
                   pods={"purify-saliency-2": [k8s_pod("p2", 75)]})
    assert failed2.status.stage(StageName.SALIENCY).retry_after == T0 + timedelta(seconds=40)
    assert failed2.retries == [(StageName.SALIENCY, FailureKind.TRANSIENT)]


def test_a_failed_job_waits_briefly_for_the_pod_that_says_why(job):
    """Jobs and pods arrive on separate watches: a Failed Job whose failed pod is not observed yet is
    held for a few seconds (its OOM-kill is not reported as an unknown cause), then decided."""
    started = step(job, PurificationJobStatus())
    failed_job = k8s_job("purify-saliency", "failed", failed_at="2026-11-28T12:00:00Z")
    early = step(job, started.status, at=T0 + timedelta(seconds=2), jobs=[failed_job])
    assert early.status.stage(StageName.SALIENCY).phase is StagePhase.RUNNING
    assert early.events == [] and early.delete == [] and early.requeue_after == 1.0
    told = step(job, started.status, at=T0 + timedelta(seconds=3), jobs=[failed_job],
                pods={"purify-saliency": [k8s_pod("p1", 137, reason="OOMKilled")]})
    assert "OOM-killed" in told.status.stage(StageName.SALIENCY).message
    assert told.retries == [(StageName.SALIENCY, FailureKind.TRANSIENT)]
    late = step(job, started.status, at=T0 + timedelta(seconds=30), jobs=[failed_job])  # its node went away
    assert late.status.stage(StageName.SALIENCY).phase is StagePhase.RETRYING
    assert late.retries == [(StageName.SALIENCY, FailureKind.TRANSIENT)]
    skewed = step(job, started.status, at=T0 - timedelta(minutes=5), jobs=[failed_job])  # API server clock ahead
    assert skewed.status.stage(StageName.SALIENCY).phase is StagePhase.RETRYING


def test_a_permanent_failure_fails_the_job_without_a_retry(job):
    started = step(job, PurificationJobStatus())
    plan = step(job, started.status, jobs=[k8s_job("purify-saliency", "failed")],
                pods={"purify-saliency": [k8s_pod("p1", 2, message="spec.dataset.uri: no manifest.jsonl")]})
    assert plan.status.phase is JobPhase.FAILED
    assert plan.create == [] and plan.requeue_after is None
    failed = plan.status.condition(ConditionType.FAILED)
    assert (failed.status, failed.reason) == (ConditionStatus.TRUE, Reason.STAGE_FAILED)
    assert "no manifest.jsonl" in failed.message and "saliency" in failed.message
    assert condition(plan.status, ConditionType.STALLED) is ConditionStatus.TRUE
    assert condition(plan.status, ConditionType.RECONCILING) is ConditionStatus.FALSE
    assert [(e.type, e.reason) for e in plan.events] == [(EventType.WARNING, Reason.STAGE_FAILED)]


def test_retries_stop_at_the_backoff_limit():
    job = make_job(policy={"backoffLimit": 1})
    plan = step(job, PurificationJobStatus())
    plan = step(job, plan.status, jobs=[k8s_job("purify-saliency", "failed")],
                pods={"purify-saliency": [k8s_pod("p", 137, reason="OOMKilled")]})
    assert plan.status.stage(StageName.SALIENCY).phase is StagePhase.RETRYING
    assert "OOM-killed" in plan.status.stage(StageName.SALIENCY).message
    plan = step(job, plan.status, at=T0 + timedelta(minutes=1))
    plan = step(job, plan.status, at=T0 + timedelta(minutes=2), jobs=[k8s_job("purify-saliency-2", "failed")],
                pods={"purify-saliency-2": [k8s_pod("p", 137, reason="OOMKilled")]})
    assert plan.status.phase is JobPhase.FAILED
    assert plan.status.condition(ConditionType.FAILED).reason is Reason.BACKOFF_LIMIT_EXCEEDED
    assert plan.status.stage(StageName.SALIENCY).failures == 2


def test_a_deadline_is_not_retried():
    job = make_job(policy={"activeDeadlineSeconds": 60})
    plan = step(job, PurificationJobStatus())
    plan = step(job, plan.status, jobs=[k8s_job("purify-saliency", "failed", reason="DeadlineExceeded",
                                                message="Job was active longer than specified deadline")])
    assert plan.status.phase is JobPhase.FAILED
    assert plan.status.condition(ConditionType.FAILED).reason is Reason.DEADLINE_EXCEEDED


def test_keep_failed_pods_keeps_the_failed_attempt():
    job = make_job(policy={"keepFailedPods": True})
    plan = step(job, PurificationJobStatus())
    plan = step(job, plan.status, jobs=[k8s_job("purify-saliency", "failed")], pods={"purify-saliency": [k8s_pod("p", 1)]})
    assert plan.delete == [] and plan.status.stage(StageName.SALIENCY).phase is StagePhase.RETRYING


def test_suspend_deletes_the_running_job_and_resume_starts_a_new_attempt_of_the_same_stage():
    job = make_job()
    running = run_to(job, StageName.RELABEL)
    suspended_job = make_job(policy={"suspend": True})
    suspended = step(suspended_job, running.status)
    assert suspended.delete == ["purify-relabel"] and suspended.create == []
    assert suspended.status.phase is JobPhase.SUSPENDED
    assert condition(suspended.status, ConditionType.SUSPENDED) is ConditionStatus.TRUE
    assert condition(suspended.status, ConditionType.RECONCILING) is ConditionStatus.FALSE
    assert [e.reason for e in suspended.events] == [Reason.SUSPENDED]
    assert suspended.status.stage(StageName.SALIENCY).phase is StagePhase.SUCCEEDED  # done work is kept
    # staying suspended: no repeated Events or deletions
    still = step(suspended_job, suspended.status)
    assert still.events == [] and still.delete == []
    resumed = step(job, suspended.status)
    relabel = resumed.status.stage(StageName.RELABEL)
    assert resumed.create == [CreateJob(StageName.RELABEL, StepKind.RUN, 2)]
    assert (relabel.attempts, relabel.failures, relabel.job_name) == (2, 0, "purify-relabel-2")
    assert [e.reason for e in resumed.events] == [Reason.RESUMED, Reason.STAGE_STARTED]
    assert condition(resumed.status, ConditionType.SUSPENDED) is ConditionStatus.FALSE
    assert resumed.status.phase is JobPhase.RUNNING


def test_a_job_suspended_before_it_started_creates_nothing():
    plan = step(make_job(policy={"suspend": True}), PurificationJobStatus())
    assert plan.create == [] and plan.delete == [] and plan.status.phase is JobPhase.SUSPENDED


def test_conditions_keep_their_transition_time_while_unchanged(job):
    first = step(job, PurificationJobStatus())
    later = step(job, first.status, at=T0 + timedelta(minutes=5), jobs=[k8s_job("purify-saliency")])
    assert later.status.condition(ConditionType.RECONCILING).last_transition_time == T0


def test_an_invalid_spec_is_rejected_with_its_reason():
    plan = reject(PurificationJobStatus(), "spec.masking.ratio: must be <= 1", 3, T0)
    assert plan.status.phase is JobPhase.FAILED and plan.create == []
    failed = plan.status.condition(ConditionType.FAILED)
    assert (failed.reason, failed.message, failed.observed_generation) == (Reason.INVALID_SPEC,
                                                                           "spec.masking.ratio: must be <= 1", 3)
    assert plan.events[0].type is EventType.WARNING and plan.events[0].reason is Reason.INVALID_SPEC


def test_observed_generation_follows_the_object(job):
    plan = step(job, PurificationJobStatus(), generation=4)
    assert plan.status.observed_generation == 4
    assert all(c.observed_generation == 4 for c in plan.status.conditions)


def test_backoff_is_capped():
    assert RetryBackoff(10, 60).delay(10) == timedelta(seconds=60)
    assert [RetryBackoff(10, 600).delay(n).total_seconds() for n in (1, 2, 3)] == [10, 20, 40]


def test_a_finished_job_only_acknowledges_later_edits():
    job = make_job()
    plan = run_to(job, StageName.FINETUNE)
    done = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")],
                metrics=MetricsSummary(estimated_poisoned_share=0.0))
    edited = reconcile(None, done.status, 2, Observation(now=T0 + timedelta(hours=1)))
    assert edited.status.observed_generation == 2 and edited.status.phase is JobPhase.SUCCEEDED
    assert edited.create == [] and edited.delete == [] and edited.events == []


# -- what holds a running stage up: a queue, a pod that cannot start -----------------------------

def _pending_pod(name, created, reason=None, message=""):
    status = {"phase": "Pending"}
    if reason == "Unschedulable":
        status["conditions"] = [{"type": "PodScheduled", "status": "False", "reason": reason, "message": message}]
    elif reason:
        status["containerStatuses"] = [{"name": "runner", "state": {"waiting": {"reason": reason, "message": message}}}]
    return {"metadata": {"name": name, "creationTimestamp": created.isoformat().replace("+00:00", "Z")},
            "status": status}


def test_a_queued_run_is_admitted_once_and_gives_its_quota_back_only_when_evicted_or_done():
    from disp_operator.kueue import Admission, AdmissionState
    from disp_operator.reconcile import WorkloadAction
    from disp_operator.validation import parse_job
    from tests.operator.conftest import job_body

    body = job_body()
    body["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-batch"}
    job = parse_job(body)
    # No Workload yet: it is created; no stage starts; the job says it waits, once.
    fresh = step(job, PurificationJobStatus())
    assert fresh.workload is WorkloadAction.CREATE and fresh.create == [] and fresh.status.phase is JobPhase.RUNNING
    reconciling = fresh.status.condition(ConditionType.RECONCILING)
    assert (reconciling.status, reconciling.reason) == (ConditionStatus.TRUE, Reason.WAITING_FOR_ADMISSION)
    assert fresh.status.message == "waiting for admission in Kueue queue gpu-batch"
    assert condition(fresh.status, ConditionType.STALLED) is ConditionStatus.FALSE  # queued is not stuck
    assert [(e.type, e.reason) for e in fresh.events] == [(EventType.NORMAL, Reason.WAITING_FOR_ADMISSION)]
    pending = Admission(AdmissionState.PENDING, "couldn't assign flavors to pod set stage: insufficient quota")
    waiting = step(job, fresh.status, at=T0 + timedelta(minutes=1), admission=pending)
    assert waiting.workload is None and waiting.create == [] and waiting.events == []
    assert waiting.status.message.endswith(": couldn't assign flavors to pod set stage: insufficient quota")
    # Admitted: the stages run one after the other under that one admission.
    admitted = Admission(AdmissionState.ADMITTED, flavors=("default",))
    running = step(job, waiting.status, at=T0 + timedelta(minutes=2), admission=admitted)
    assert running.create == [CreateJob(StageName.SALIENCY, StepKind.RUN, 1)] and running.workload is None
    masking = step(job, running.status, jobs=[k8s_job("purify-saliency", "succeeded")], admission=admitted)
    assert masking.create == [CreateJob(StageName.MASKING, StepKind.RUN, 1)] and masking.workload is None
    # Evicted mid-stage: the stage Job goes (not a failure), the quota once its pods are gone.
    evicted = Admission(AdmissionState.EVICTED, "Preempted to accommodate a workload (UID: 1) of higher priority")
    stopping = step(job, masking.status, jobs=[k8s_job("purify-saliency", "succeeded"), k8s_job("purify-masking")],
                    admission=evicted)
    assert stopping.delete == ["purify-masking"] and stopping.workload is None and stopping.requeue_after == 1.0
    stage = stopping.status.stage(StageName.MASKING)
    assert stage.phase is StagePhase.PENDING and stage.failures == 0
    assert "evicted by Kueue (Preempted to accommodate" in stopping.status.message
    released = step(job, stopping.status, jobs=[k8s_job("purify-saliency", "succeeded")], admission=evicted)
    assert released.workload is WorkloadAction.RELEASE and released.create == []
    # Admitted again: the stage starts again as a new attempt, with no failure counted.
    again = step(job, released.status, jobs=[k8s_job("purify-saliency", "succeeded")], admission=admitted)
    assert again.create == [CreateJob(StageName.MASKING, StepKind.RUN, 2)]
    assert again.status.stage(StageName.MASKING).failures == 0
    # A suspended run gives its quota back; a finished one ends its Workload.
    suspended = parse_job({**body, "spec": {**body["spec"], "policy": {"suspend": True}}})
    assert step(suspended, again.status, admission=admitted).workload is WorkloadAction.DELETE
    done = reconcile(None, reject(PurificationJobStatus(), "x", 1, T0).status, 1,
                     Observation(now=T0, admission=admitted), BACKOFF, PENDING_AFTER)
    assert done.workload is WorkloadAction.FINISH
    assert reconcile(None, done.status, 1, Observation(now=T0, admission=Admission(AdmissionState.FINISHED)),
                     BACKOFF, PENDING_AFTER).workload is None
    # A job without a queue label never has one.
    assert step(make_job(), PurificationJobStatus()).workload is None


def test_a_workload_is_read_as_kueue_writes_it():
    from disp_operator.kueue import AdmissionState, admission_of, released_status, with_flavors

    def workload(*conditions, admission=None):
        status = {"conditions": [{"type": t, "status": v, "reason": r, "message": m,
                                  "lastTransitionTime": "2026-12-06T10:00:00Z"} for t, v, r, m in conditions]}
        if admission:
            status["admission"] = admission
        return {"metadata": {"generation": 1}, "status": status}

    assert admission_of({}).state is AdmissionState.PENDING
    quota = workload(("QuotaReserved", "False", "Pending", "insufficient unused quota for cpu"))
    assert admission_of(quota) == admission_of(quota).__class__(AdmissionState.PENDING, "insufficient unused quota for cpu")
    admitted = workload(("QuotaReserved", "True", "QuotaReserved", ""), ("Admitted", "True", "Admitted", ""),
                        admission={"clusterQueue": "cq", "podSetAssignments": [
                            {"name": "stage", "flavors": {"cpu": "on-demand", "nvidia.com/gpu": "a100"}}]})
    seen = admission_of(admitted)
    assert seen.state is AdmissionState.ADMITTED and seen.flavors == ("a100", "on-demand")
    placed = with_flavors(seen, [{"spec": {"nodeLabels": {"gpu": "a100"}, "tolerations": [{"key": "g"}]}},
                                 {"spec": {"nodeLabels": {"pool": "od"}, "tolerations": [{"key": "g"}]}}])
    assert placed.node_selector == {"gpu": "a100", "pool": "od"} and placed.tolerations == ({"key": "g"},)
    evicted = workload(("QuotaReserved", "True", "QuotaReserved", ""), ("Admitted", "True", "Admitted", ""),
                       ("Evicted", "True", "Preempted", "Preempted by a higher priority workload"),
                       admission={"clusterQueue": "cq", "podSetAssignments": []})
    assert admission_of(evicted).state is AdmissionState.EVICTED
    status = released_status(evicted, T0)
    assert status["admission"] is None
    kinds = {c["type"]: c for c in status["conditions"]}
    assert (kinds["QuotaReserved"]["status"], kinds["QuotaReserved"]["reason"]) == ("False", "Pending")
    assert kinds["Admitted"]["status"] == "False" and kinds["Requeued"]["status"] == "True"
    assert admission_of({"status": status}).state is AdmissionState.PENDING  # released: queued again
    finished = workload(("Finished", "True", "Succeeded", "done"), ("Admitted", "True", "Admitted", ""))
    assert admission_of(finished).state is AdmissionState.FINISHED


def test_an_unschedulable_pod_stalls_the_job_with_the_schedulers_message(job):
    started = step(job, PurificationJobStatus())
    message = "0/12 nodes are available: 12 Insufficient nvidia.com/gpu."
    pod = _pending_pod("purify-saliency-x", T0, "Unschedulable", message)
    plan = step(job, started.status, at=T0 + timedelta(seconds=20), jobs=[k8s_job("purify-saliency")],
                pending={"purify-saliency": [pod]})
    stalled = plan.status.condition(ConditionType.STALLED)
    assert (stalled.status, stalled.reason) == (ConditionStatus.TRUE, Reason.UNSCHEDULABLE)
    assert message in stalled.message and "purify-saliency-x" in stalled.message
    assert plan.status.stage(StageName.SALIENCY).message == stalled.message
    assert [(e.type, e.reason) for e in plan.events] == [(EventType.WARNING, Reason.UNSCHEDULABLE)]
    assert plan.holdup.pending_seconds == 20
    again = step(job, plan.status, at=T0 + timedelta(seconds=40), jobs=[k8s_job("purify-saliency")],
                 pending={"purify-saliency": [pod]})
    assert again.events == []  # one Event per episode
    scheduled = step(job, again.status, at=T0 + timedelta(minutes=1), jobs=[k8s_job("purify-saliency")])
    assert condition(scheduled.status, ConditionType.STALLED) is ConditionStatus.FALSE
    assert scheduled.status.stage(StageName.SALIENCY).message == ""


def test_a_pod_pending_past_the_threshold_stalls_the_job_but_not_before(job):
    started = step(job, PurificationJobStatus())
    pod = _pending_pod("purify-saliency-x", T0, "ImagePullBackOff", "Back-off pulling image")
    early = step(job, started.status, at=T0 + PENDING_AFTER - timedelta(seconds=1),
                 jobs=[k8s_job("purify-saliency")], pending={"purify-saliency": [pod]})
    assert condition(early.status, ConditionType.STALLED) is ConditionStatus.FALSE and early.events == []
    late = step(job, early.status, at=T0 + PENDING_AFTER, jobs=[k8s_job("purify-saliency")],
                pending={"purify-saliency": [pod]})
    stalled = late.status.condition(ConditionType.STALLED)
    assert (stalled.status, stalled.reason) == (ConditionStatus.TRUE, Reason.POD_PENDING)
    assert "ImagePullBackOff" in stalled.message and "Back-off pulling image" in stalled.message


def test_a_suspended_job_is_never_stalled(job):
    started = step(job, PurificationJobStatus())
    pod = _pending_pod("purify-saliency-x", T0, "Unschedulable", "no GPU")
    stalled = step(job, started.status, at=T0 + timedelta(seconds=5), jobs=[k8s_job("purify-saliency")],
                   pending={"purify-saliency": [pod]})
    assert condition(stalled.status, ConditionType.STALLED) is ConditionStatus.TRUE
    suspended_job = make_job(policy={"suspend": True})
    plan = step(suspended_job, stalled.status, at=T0 + timedelta(seconds=10), jobs=[k8s_job("purify-saliency")],
                pending={"purify-saliency": [pod]})
    assert plan.status.phase is JobPhase.SUSPENDED
    assert condition(plan.status, ConditionType.STALLED) is ConditionStatus.FALSE


def test_the_running_stage_gets_an_estimated_completion_time(job):
    started = step(job, PurificationJobStatus())
    plan = step(job, started.status, jobs=[k8s_job("purify-saliency")],
                progress=StageProgress(stage=StageName.SALIENCY, fraction=0.25, updated_at=T0, eta_seconds=90.0))
    assert plan.status.stage(StageName.SALIENCY).estimated_completion_time == T0 + timedelta(seconds=90)
