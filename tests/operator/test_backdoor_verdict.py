"""The audit's verdict on a purified model: a Succeeded job whose residual rate says the backdoor
survived carries BackdoorRemoved=False and a Warning Event, never a quiet success."""

from __future__ import annotations

from datetime import timedelta

import pytest

from disp_api import BackdoorVerdict, MetricsSummary, StageName, judge_residual
from disp_api.status import ConditionStatus, ConditionType, JobPhase, Reason
from disp_operator.reconcile import EventType
from tests.operator.conftest import k8s_job, make_job
from tests.operator.test_reconcile import T0, run_to, step


@pytest.mark.parametrize("rate, sample, verdict", [
    (0.0, 64, BackdoorVerdict.REMOVED),
    (0.05, 20, BackdoorVerdict.REMOVED),  # at the threshold: not above it
    (0.0, 19, BackdoorVerdict.UNKNOWN),  # none kept, but one suspect would weigh more than the threshold
    (0.0625, 16, BackdoorVerdict.PROBABLY_NOT_REMOVED),
    (7 / 12, 12, BackdoorVerdict.PROBABLY_NOT_REMOVED),
    (None, 0, BackdoorVerdict.UNKNOWN),
    (0.5, 0, BackdoorVerdict.UNKNOWN),  # a rate on no sample says nothing
    (None, None, BackdoorVerdict.UNKNOWN),
])
def test_the_verdict_is_the_residual_rate_against_the_threshold(rate, sample, verdict):
    judgement = judge_residual(rate, sample, 0.05)
    assert judgement.verdict is verdict
    if verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED:
        kept = round(rate * sample)
        assert judgement.message.startswith("the backdoor was probably not removed")
        assert f"{kept} of the top {sample} suspects" in judgement.message
        assert f"residual rate {rate:.1%}" in judgement.message and "spec.audit.residualThreshold 5.0%" in judgement.message


def _finish(job, metrics, at=T0):
    plan = run_to(job, StageName.FINETUNE)
    waiting = step(job, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")], at=at)
    return step(job, waiting.status, jobs=[k8s_job("purify-finetune", "succeeded")], metrics=metrics, at=at)


SINGLE_PASS = {"policy": "single-pass"}  # the closed loop's rounds: tests/operator/test_rounds.py


def test_a_residual_above_the_threshold_ends_succeeded_with_backdoor_removed_false_and_a_warning():
    job = make_job(rounds=SINGLE_PASS)
    done = _finish(job, MetricsSummary(estimated_poisoned_share=0.016, residual_rate=7 / 12, residual_sample=12))
    assert done.status.phase is JobPhase.SUCCEEDED  # the pipeline ran: the model and its figures are there
    removed = done.status.condition(ConditionType.BACKDOOR_REMOVED)
    assert (removed.status, removed.reason) == (ConditionStatus.FALSE, Reason.RESIDUAL_ABOVE_THRESHOLD)
    assert "7 of the top 12 suspects" in removed.message and "58.3%" in removed.message
    warnings = [e for e in done.events if e.type is EventType.WARNING]
    assert [(e.reason, e.message) for e in warnings] == [(Reason.BACKDOOR_NOT_REMOVED, removed.message)]
    assert "the backdoor was probably not removed" in done.status.message  # the Succeeded condition's too
    assert "probably not removed" in done.status.condition(ConditionType.SUCCEEDED).message
    # Terminal: a later pass changes nothing and posts the warning no second time.
    later = step(job, done.status, at=T0 + timedelta(hours=1))
    assert later.events == [] and later.status == done.status


def test_a_residual_at_most_the_threshold_says_removed_without_a_warning():
    job = make_job()
    done = _finish(job, MetricsSummary(estimated_poisoned_share=0.2, residual_rate=0.03125, residual_sample=64))
    removed = done.status.condition(ConditionType.BACKDOOR_REMOVED)
    assert (removed.status, removed.reason) == (ConditionStatus.TRUE, Reason.RESIDUAL_BELOW_THRESHOLD)
    assert "2 of the top 64 suspects" in removed.message
    assert [e.type for e in done.events] == [EventType.NORMAL] * len(done.events)
    assert "probably not removed" not in done.status.message


def test_no_residual_sample_leaves_the_verdict_unknown():
    job = make_job()
    done = _finish(job, MetricsSummary(estimated_poisoned_share=0.0, residual_rate=None, residual_sample=0))
    removed = done.status.condition(ConditionType.BACKDOOR_REMOVED)
    assert (removed.status, removed.reason) == (ConditionStatus.UNKNOWN, Reason.NO_RESIDUAL_SAMPLE)
    assert all(e.type is EventType.NORMAL for e in done.events)


def test_the_threshold_is_the_jobs_own():
    figures = MetricsSummary(residual_rate=0.25, residual_sample=16)
    lenient = _finish(make_job(audit={"residualThreshold": 0.3}), figures)
    strict = _finish(make_job(audit={"residualThreshold": 0.0}, rounds=SINGLE_PASS), MetricsSummary(residual_rate=1 / 64,
                                                                                  residual_sample=64))
    assert lenient.status.condition(ConditionType.BACKDOOR_REMOVED).status is ConditionStatus.TRUE
    assert strict.status.condition(ConditionType.BACKDOOR_REMOVED).status is ConditionStatus.FALSE
    assert "spec.audit.residualThreshold 0.0%" in strict.status.condition(ConditionType.BACKDOOR_REMOVED).message
