"""The closed loop in `disp run`: a round whose audit says the backdoor survived is followed by the
next recipe's round, from the compromised model, in its own folder; the evaluation measures the
model the run keeps; a rerun finds every round complete."""

from __future__ import annotations

import json

import pytest

from disp_api import BackdoorVerdict, StageName
from disp_api.rounds import Recipe, judged
from disp_runner.pipeline.artifacts import STAGE_MANIFEST
from disp_runner.pipeline.runner import run_rounds
from tests.tiny import layout_of, make_job

PURIFYING = [StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE]


def _audit_says(rates: dict[int, float]):
    """A judge that sees `rates[round]` as the round's residual rate (of 64 suspects): the tiny
    model's audit finds no suspect, so the verdict the loop acts on is given here."""
    def judge(record, residual_rate, residual_sample, audit):
        return judged(record, rates[record.round], 64, audit)
    return judge


def test_a_surviving_backdoor_gets_the_next_recipe_in_its_own_folder(workspace, monkeypatch):
    monkeypatch.setattr("disp_runner.pipeline.runner.judged", _audit_says({1: 0.4, 2: 0.0}))
    job = make_job(workspace)
    result = run_rounds(job, show_progress=False)
    assert [(o.stage, o.round) for o in result.outcomes] == \
        [(s, 1) for s in PURIFYING] + [(s, 2) for s in PURIFYING] + [(StageName.EVALUATE, 2)]
    assert [(r.round, r.recipe, r.verdict) for r in result.rounds] == \
        [(1, Recipe.SPEC, BackdoorVerdict.PROBABLY_NOT_REMOVED), (2, Recipe.PIXELS, BackdoorVerdict.REMOVED)]
    assert "round 1 left a residual rate of 40.0% of 64 suspects" in result.rounds[1].reason
    assert result.chosen == 2
    layout = layout_of(workspace)
    second = layout.within("round-2")
    for stage in PURIFYING:
        assert (layout.stage_dir(stage) / STAGE_MANIFEST).is_file()
        assert (second.stage_dir(stage) / STAGE_MANIFEST).is_file()
    assert not (layout.stage_dir(StageName.EVALUATE)).exists()  # round 1's model is not the one kept
    assert (second.stage_dir(StageName.EVALUATE) / STAGE_MANIFEST).is_file()
    assert (second.stage_dir(StageName.FINETUNE) / "model" / "config.json").is_file()
    # Each round's provenance records the settings it purified with, under the run's own id.
    first, then = (_recorded_spec(folder) for folder in (layout.root, second.root))
    assert first["masking"]["space"] == "tokens" and first["relabel"]["acceptance"] == "all"
    assert then["masking"]["space"] == "pixels" and then["relabel"]["acceptance"] == "signature"
    assert then["saliency"]["regionSize"] == 2
    # ... and which round it was, in which folder.
    internal = [json.loads((folder / "provenance.json").read_text())["predicate"]["buildDefinition"]
                ["internalParameters"] for folder in (layout.root, second.root)]
    run_path = make_job(workspace).run_path
    assert internal == [{"runPath": run_path, "round": 1}, {"runPath": f"{run_path}/round-2", "round": 2}]

    again = run_rounds(job, show_progress=False)
    assert all(o.skipped for o in again.outcomes) and again.rounds == result.rounds and again.chosen == 2


def test_when_no_round_removes_it_the_lowest_residual_is_kept_and_the_ladder_ends(workspace, monkeypatch):
    monkeypatch.setattr("disp_runner.pipeline.runner.judged", _audit_says({1: 0.3, 2: 0.5, 3: 0.2}))
    result = run_rounds(make_job(workspace, evaluation=None), show_progress=False)
    assert [r.round for r in result.rounds] == [1, 2, 3] and result.chosen == 3
    assert [r.recipe for r in result.rounds] == [Recipe.SPEC, Recipe.PIXELS, Recipe.BLUR]
    assert all(r.verdict is BackdoorVerdict.PROBABLY_NOT_REMOVED for r in result.rounds)


def _recorded_spec(folder) -> dict:
    provenance = json.loads((folder / "provenance.json").read_text())
    return provenance["predicate"]["buildDefinition"]["externalParameters"]["spec"]


@pytest.mark.parametrize("rounds", [{"policy": "single-pass"}, {"maxRounds": 1}])
def test_a_single_pass_runs_one_round_whatever_the_audit_says(workspace, monkeypatch, rounds):
    monkeypatch.setattr("disp_runner.pipeline.runner.judged", _audit_says({1: 0.9}))
    result = run_rounds(make_job(workspace, evaluation=None, rounds=rounds), show_progress=False)
    assert [o.round for o in result.outcomes] == [1] * 4 and [r.round for r in result.rounds] == [1]


def test_disp_run_says_which_rounds_ran_why_and_which_model_it_kept(workspace, monkeypatch, capsys):
    from disp_runner.cli import main
    from tests.tiny import job_document

    monkeypatch.setattr("disp_runner.pipeline.runner.judged", _audit_says({1: 0.4, 2: 0.25, 3: 0.3}))
    (workspace / "job.json").write_text(json.dumps(job_document(workspace, evaluation=None)))
    assert main(["run", str(workspace / "job.json"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    layout = layout_of(workspace, evaluation=None)
    assert "round 2 ran: round 1 left a residual rate of 40.0% of 64 suspects" in captured.out
    assert "round 3 ran: round 2 left a residual rate of 25.0% of 64 suspects" in captured.out
    assert "rounds 1 (spec, residual 40.0%), 2 (pixels, residual 25.0%), 3 (blur, residual 30.0%); " \
           "round 2's model kept" in captured.out
    assert f"purified model: {layout.root}/round-2/finetune/model" in captured.out
    # The stage pods' form: one stage of one round.
    assert main(["run", str(workspace / "job.json"), "--no-progress", "--stage", "masking", "--round", "3"]) == 0
    assert "masking: complete, skipped" in capsys.readouterr().out
    assert main(["run", str(workspace / "job.json"), "--no-progress", "--stage", "masking", "--round", "4"]) == 2
    assert "--round" in capsys.readouterr().err
