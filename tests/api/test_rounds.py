"""The closed loop's decisions (disp_api.rounds), shared by `disp run` and the operator."""

from __future__ import annotations

import pytest

from disp_api import BackdoorVerdict, PurificationJob
from disp_api.rounds import (ESCALATIONS, Recipe, chosen_round, first_round, judged, next_round, purified_model_uri,
                             round_folder, round_job, round_spec, rounds_summary)
from disp_api.spec import MAX_ROUNDS, AuditSpec, MaskingSpace, RelabelAcceptance


def _job(**spec) -> PurificationJob:
    return PurificationJob.model_validate({
        "apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "metadata": {"name": "j"},
        "spec": {"model": {"uri": "/m"}, "dataset": {"uri": "/d"}, "output": {"uri": "/o"}, **spec}})


def _rounds(spec, rates):
    """Run the loop's decisions on residual rates given per round (of 64 suspects)."""
    records = [judged(first_round(), rates[1], 64, spec.audit)]
    while (following := next_round(spec, records)) is not None:
        records.append(judged(following, rates[following.round], 64, spec.audit))
    return records


def test_the_default_escalates_while_the_residual_rate_is_above_the_threshold():
    spec = _job().spec
    assert [r.round for r in _rounds(spec, {1: 0.05})] == [1]  # at the threshold: removed
    assert [r.round for r in _rounds(spec, {1: 0.06, 2: 0.0})] == [1, 2]
    records = _rounds(spec, {1: 0.4, 2: 0.3, 3: 0.1})
    assert [r.recipe for r in records] == [Recipe.SPEC, Recipe.PIXELS, Recipe.BLUR] and len(records) == MAX_ROUNDS
    assert records[2].reason.startswith("round 2 left a residual rate of 30.0% of 64 suspects, above "
                                        "spec.audit.residualThreshold 5.0%: the blur recipe")


def test_no_residual_sample_ends_the_loop():
    spec = _job().spec
    records = [judged(first_round(), None, 0, AuditSpec())]
    assert records[0].verdict is BackdoorVerdict.UNKNOWN and next_round(spec, records) is None


@pytest.mark.parametrize("rounds, ran", [({"policy": "single-pass"}, [1]), ({"maxRounds": 1}, [1]),
                                         ({"maxRounds": 2}, [1, 2])])
def test_the_policy_and_max_rounds_bound_the_loop(rounds, ran):
    spec = _job(rounds=rounds).spec
    assert [r.round for r in _rounds(spec, {1: 0.9, 2: 0.9, 3: 0.9})] == ran


def test_a_rung_the_spec_already_runs_is_passed_over():
    spec = _job(saliency={"regionSize": 2}, masking={"space": "pixels"}, relabel={"acceptance": "signature"}).spec
    assert [r.round for r in _rounds(spec, {1: 0.9, 3: 0.0})] == [1, 3]


def test_each_round_replaces_the_spec_settings_with_its_rung():
    spec = _job(masking={"ratio": 0.2}).spec
    assert round_spec(spec, 1) is spec
    pixels, blur = round_spec(spec, 2), round_spec(spec, 3)
    assert (pixels.saliency.region_size, pixels.masking.space, pixels.relabel.acceptance) == \
        (2, MaskingSpace.PIXELS, RelabelAcceptance.SIGNATURE)
    assert blur.masking.blur_sigma == 1.0 and blur.masking.space is MaskingSpace.TOKENS
    assert pixels.masking.ratio == blur.masking.ratio == 0.2  # what no rung sets stays the spec's
    assert [e.recipe for e in ESCALATIONS] == [Recipe.PIXELS, Recipe.BLUR]
    with pytest.raises(ValueError, match="rounds are numbered 1 to 3"):
        round_spec(spec, 4)


def test_a_round_keeps_the_run_id_and_has_its_own_folder():
    job = _job()
    second = round_job(job, 2)
    assert second.run_id == job.run_id and second.run_path == job.run_path
    assert round_job(job, 1) is job and round_folder(1) == "" and round_folder(3) == "round-3"
    assert purified_model_uri("s3://b/runs/x", 1) == "s3://b/runs/x/finetune/model"
    assert purified_model_uri("s3://b/runs/x", 2) == "s3://b/runs/x/round-2/finetune/model"


def test_the_kept_model_is_the_first_removed_else_the_lowest_residual():
    spec = _job().spec
    assert chosen_round(_rounds(spec, {1: 0.4, 2: 0.0})) == 2
    assert chosen_round(_rounds(spec, {1: 0.2, 2: 0.5, 3: 0.3})) == 1
    assert chosen_round(_rounds(spec, {1: 0.3, 2: 0.1, 3: 0.1})) == 2  # the earlier of equals
    assert chosen_round([judged(first_round(), None, 0, AuditSpec())]) == 1
    records = _rounds(spec, {1: 0.4, 2: 0.0})
    assert rounds_summary(records, 2) == "rounds 1 (spec, residual 40.0%), 2 (pixels, residual 0.0%); " \
                                         "round 2's model kept"
    assert rounds_summary(records[:1], 1) == ""


def test_a_removed_verdict_needs_enough_suspects_to_show_the_rate_is_low():
    from disp_api import judge_residual
    from disp_api.metrics import evidence_needed

    assert [evidence_needed(0.05), evidence_needed(0.05, 64), evidence_needed(0.01, 64), evidence_needed(0.0, 64),
            evidence_needed(0.3), evidence_needed(0.05, 10)] == [20, 20, 64, 64, 4, 10]
    few = judge_residual(0.0, 11, 0.05, 64)
    assert few.verdict is BackdoorVerdict.UNKNOWN
    assert few.message == ("the purified model still gives 0 of the top 11 suspects their original answer (residual "
                           "rate 0.0%), but the audit cannot tell: 11 suspects are too few to show a rate of at most "
                           "spec.audit.residualThreshold 5.0% (one suspect weighs 9.1%; at least 20 are needed)")
    assert judge_residual(0.0, 20, 0.05, 64).verdict is BackdoorVerdict.REMOVED
    assert judge_residual(0.5, 4, 0.05, 64).verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED  # above: any sample


def test_a_later_round_the_audit_cannot_judge_does_not_end_the_loop_or_get_kept():
    spec = _job().spec
    records = [judged(first_round(), 0.6, 10, spec.audit)]
    second = next_round(spec, records)
    records.append(judged(second, 0.0, 11, spec.audit))  # a handful of suspects: no evidence of removal
    assert records[1].verdict is BackdoorVerdict.UNKNOWN
    third = next_round(spec, records)
    assert third.round == 3 and third.reason.startswith(
        "round 1 left a residual rate of 60.0% of 10 suspects, above spec.audit.residualThreshold 5.0%, and round "
        "2's audit could not tell: the blur recipe")
    records.append(judged(third, 0.4, 30, spec.audit))
    assert next_round(spec, records) is None and chosen_round(records) == 3  # not round 2's 0.0% of 11
    # Round 1 without evidence of a backdoor starts nothing.
    assert next_round(spec, [judged(first_round(), 0.0, 11, spec.audit)]) is None
