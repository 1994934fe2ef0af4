"""The closed loop in the cluster (spec.rounds): a round whose audit says the backdoor survived is
followed by the next recipe's round, its stages Jobs of their own (`<job>-r2-<stage>`, `--round 2`);
the evaluation measures the model the run keeps, and the status says which rounds ran and why."""

from __future__ import annotations

from disp_api import BackdoorVerdict, MetricsSummary, StageName
from disp_api.rounds import Recipe
from disp_api.status import (ConditionStatus, ConditionType, JobPhase, PurificationJobStatus, Reason, StagePhase,
                             StepKind)
from disp_operator.jobs import stage_job
from disp_operator.naming import LABEL_ROUND
from disp_operator.reconcile import CreateJob, EventType, kept_round
from disp_operator.validation import parse_job
from tests.operator.conftest import job_body, k8s_job
from tests.operator.test_reconcile import step

EVALUATED = {"evaluation": {"attack": {"target": {"kind": "insertion"}}, "triggeredUri": "s3://eval/triggered"}}
RUN = "s3://runs/runs/team/purify/0c1d2e3f-0000-4000-8000-000000000001"


def _audit(rate: float) -> MetricsSummary:
    return MetricsSummary(estimated_poisoned_share=0.1, residual_rate=rate, residual_sample=64)


def _through(job, plan, audits):
    """Let every stage Job started succeed, one pass each, until the job wants its figures."""
    while not plan.wants_metrics and not plan.status.phase.finished:
        current = next(s for s in plan.status.stages if s.phase is not StagePhase.SUCCEEDED)
        plan = step(job, plan.status, jobs=[k8s_job(current.job_name, "succeeded")], audits=audits)
    return plan


def test_a_surviving_backdoor_starts_round_two_with_its_own_stage_jobs():
    job = parse_job(job_body(**EVALUATED))
    # Round 1 through its fine-tune; its audit: 30% of the suspects keep the compromised answer.
    plan = step(job, PurificationJobStatus())
    for name in ("purify-saliency", "purify-masking", "purify-relabel"):
        plan = step(job, plan.status, jobs=[k8s_job(name, "succeeded")])
    waiting = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")])
    assert waiting.wants_audit == 1 and waiting.create == []
    assert waiting.status.progress.percent == 80  # four of round 1's five stages
    started = step(job, waiting.status, jobs=[k8s_job("purify-finetune", "succeeded")], audits={1: _audit(0.3)})
    assert started.status.progress.percent == 80  # 4 of 9 stages now, but the percent never goes back
    assert started.create == [CreateJob(StageName.SALIENCY, StepKind.RUN, 1, round=2)]
    assert [(s.name.value, s.round) for s in started.status.stages] == [
        ("saliency", 1), ("masking", 1), ("relabel", 1), ("finetune", 1),
        ("saliency", 2), ("masking", 2), ("relabel", 2), ("finetune", 2), ("evaluate", 1)]
    assert started.status.stage(StageName.SALIENCY, 2).job_name == "purify-r2-saliency"
    first, second = started.status.rounds
    assert (first.round, first.recipe, first.verdict, first.residual_rate) == \
        (1, Recipe.SPEC, BackdoorVerdict.PROBABLY_NOT_REMOVED, 0.3)
    assert (second.round, second.recipe, second.verdict) == (2, Recipe.PIXELS, None)
    assert second.reason.startswith("round 1 left a residual rate of 30.0% of 64 suspects")
    event = next(e for e in started.events if e.reason is Reason.ROUND_STARTED)
    assert event.type is EventType.NORMAL and event.message.startswith("round 2 (pixels recipe) starts: round 1 left")
    assert started.status.progress.current_round == 2
    assert started.status.message == "stage saliency (round 2) running (attempt 1)"
    assert started.status.phase is JobPhase.RUNNING

    # Round 2's audit: removed. The evaluation measures round 2's model.
    audits = {1: _audit(0.3), 2: _audit(0.0)}
    plan = _through(job, started, audits)
    evaluate = plan.status.stage(StageName.EVALUATE)
    assert evaluate.round == 2 and evaluate.job_name == "purify-r2-evaluate"
    assert plan.status.stage(StageName.RELABEL, 2).artifact_uri == f"{RUN}/round-2/relabel"
    assert kept_round(plan.status) == 2
    figures = MetricsSummary(asr_before=1.0, asr_after=0.01, residual_rate=0.0, residual_sample=64)
    done = step(job, plan.status, jobs=[k8s_job("purify-r2-evaluate", "succeeded")], metrics=figures, audits=audits)
    assert done.status.phase is JobPhase.SUCCEEDED
    assert done.status.purified_model_uri == f"{RUN}/round-2/finetune/model"
    assert "rounds 1 (spec, residual 30.0%), 2 (pixels, residual 0.0%); round 2's model kept" in done.status.message
    removed = done.status.condition(ConditionType.BACKDOOR_REMOVED)
    assert removed.status is ConditionStatus.TRUE
    assert [e for e in done.events if e.type is EventType.WARNING] == []


def test_when_no_round_removes_it_the_lowest_residual_is_kept_and_the_job_says_so():
    job = parse_job(job_body())  # no evaluation set: the kept round's audit is the run's figures
    plan = step(job, PurificationJobStatus())
    audits = {1: _audit(0.4), 2: _audit(0.2), 3: _audit(0.3)}
    plan = _through(job, plan, audits)
    assert [(r.round, r.recipe) for r in plan.status.rounds] == [(1, Recipe.SPEC), (2, Recipe.PIXELS),
                                                                 (3, Recipe.BLUR)]
    assert all(r.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED for r in plan.status.rounds)
    assert kept_round(plan.status) == 2 and plan.wants_metrics
    done = step(job, plan.status, jobs=[], metrics=audits[2], audits=audits)
    assert done.status.phase is JobPhase.SUCCEEDED
    assert done.status.purified_model_uri == f"{RUN}/round-2/finetune/model"
    removed = done.status.condition(ConditionType.BACKDOOR_REMOVED)
    assert (removed.status, removed.reason) == (ConditionStatus.FALSE, Reason.RESIDUAL_ABOVE_THRESHOLD)
    warnings = [e for e in done.events if e.type is EventType.WARNING]
    assert [e.reason for e in warnings] == [Reason.BACKDOOR_NOT_REMOVED]
    assert "round 2's model kept" in done.status.message and "probably not removed" in done.status.message


def test_max_rounds_and_a_single_pass_start_no_round_after_the_first():
    for spec in ({"rounds": {"maxRounds": 1}}, {"rounds": {"policy": "single-pass"}}):
        job = parse_job(job_body(**spec))
        plan = step(job, PurificationJobStatus())
        plan = _through(job, plan, {})  # no audit read before the figures
        assert [s.round for s in plan.status.stages] == [1, 1, 1, 1]
        done = step(job, plan.status, metrics=_audit(0.5), audits={})
        assert [(r.round, r.verdict) for r in done.status.rounds] == [(1, BackdoorVerdict.PROBABLY_NOT_REMOVED)]
        assert done.status.condition(ConditionType.BACKDOOR_REMOVED).status is ConditionStatus.FALSE


def test_an_audit_changed_after_publication_fails_the_job():
    job = parse_job(job_body())
    plan = step(job, PurificationJobStatus())
    for name in ("purify-saliency", "purify-masking", "purify-relabel"):
        plan = step(job, plan.status, jobs=[k8s_job(name, "succeeded")])
    why = "s3://runs/r/finetune/audit.json: SHA-256 0123… differs"
    done = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")], tampered=why)
    assert done.status.phase is JobPhase.FAILED and done.wants_audit is None
    assert done.status.condition(ConditionType.FAILED).reason is Reason.ARTIFACTS_TAMPERED


def test_a_later_round_stage_job_runs_that_round():
    from disp_operator.config import RunnerDefaults

    job = parse_job(job_body())
    manifest = stage_job(job, StageName.RELABEL, StepKind.RUN, 1, RunnerDefaults(image="disp-runner:test"),
                         round_number=2)
    assert manifest["metadata"]["name"] == "purify-r2-relabel"
    assert manifest["metadata"]["labels"][LABEL_ROUND] == "2"
    args = manifest["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--stage") + 1] == "relabel" and args[args.index("--round") + 1] == "2"
    first = stage_job(job, StageName.RELABEL, StepKind.RUN, 1, RunnerDefaults(image="disp-runner:test"))
    assert "--round" not in first["spec"]["template"]["spec"]["containers"][0]["args"]
    assert first["metadata"]["name"] == "purify-relabel"
