"""The audit's evidence: its arithmetic, what the relabel and fine-tune stages write, sharding, and
relabel.scope. (Its power on a real backdoor is tested in tests/e2e/test_purification.py.)"""

import json

import pytest

from disp_api import AuditFigures, PurificationMetrics, StageName
from disp_runner.disp.audit import SUSPECTS_FILE, SuspectRecord, auroc, comparison_tokens, figures, read_suspects
from disp_runner.data.dataset import load_dataset
from disp_runner.pipeline.artifacts import STAGE_MANIFEST
from disp_runner.pipeline.runner import run_job
from tests.tiny import layout_of, make_job


def test_auroc_counts_pairs_and_halves_ties():
    assert auroc([3, 2, 1, 0], [True, True, False, False]) == 1.0
    assert auroc([0, 1, 2, 3], [True, True, False, False]) == 0.0
    assert auroc([1, 1, 1, 1], [True, False, True, False]) == 0.5
    assert auroc([5, 1, 3, 2], [True, False, False, True]) == pytest.approx(0.75)
    assert auroc([1, 2], [True, True]) is None  # one class only: undefined


def test_comparison_tokens_avoid_the_salient_ones_and_are_reproducible_alone():
    salient = [0, 5, 7]
    drawn = comparison_tokens(salient, 36, seed=4, index=17)
    assert len(drawn) == 3 and not set(drawn) & set(salient) and drawn == sorted(drawn)
    assert drawn == comparison_tokens(salient, 36, seed=4, index=17)  # a shard draws what the whole run draws
    assert drawn != comparison_tokens(salient, 36, seed=4, index=18)
    assert comparison_tokens([0, 1, 2], 4, seed=0, index=0) == [3]  # fewer others than salient: all of them


def test_figures_estimate_the_share_and_score_the_detector_against_ground_truth():
    records = [SuspectRecord(f"i{i}", drop, 0.5, drop > 3, drop > 3, poisoned)
               for i, (drop, poisoned) in enumerate([(40.0, True), (9.0, True), (4.0, False), (0.1, False),
                                                     (0.0, False), (-0.2, False), (2.0, True), (0.0, False)])]
    audit = figures(records, threshold=3.0)
    assert (audit.instances, audit.suspects, audit.estimated_poisoned_share) == (8, 3, 3 / 8)
    assert audit.true_poisoned_share == 3 / 8
    assert audit.detector_precision == pytest.approx(2 / 3)
    assert audit.detector_auroc == pytest.approx(14 / 15)
    unlabelled = figures([SuspectRecord("x", 5.0, 0.5, True, True)], threshold=3.0)
    assert unlabelled.detector_auroc is None and unlabelled.true_poisoned_share is None


def test_relabel_ranks_every_instance_and_the_fine_tune_adds_the_residual_rate(workspace):
    run_job(make_job(workspace), show_progress=False)
    layout = layout_of(workspace)
    relabel = layout.stage_dir(StageName.RELABEL)
    records = read_suspects(relabel)
    assert len(records) == 24 and len({r.id for r in records}) == 24
    drops = [r.supportDrop for r in records]
    assert drops == sorted(drops, reverse=True)  # most suspect first
    assert all(r.poisoned is not None for r in records) and sum(r.poisoned for r in records) == 6  # kit metadata
    assert all(r.suspect == (r.supportDrop > 3.0) for r in records)
    assert (relabel / "suspects.png").stat().st_size > 0  # the top suspects, their masked tokens outlined
    manifest = json.loads((relabel / STAGE_MANIFEST).read_text())["metrics"]
    assert manifest["estimatedPoisonedShare"] == sum(r.suspect for r in records) / 24
    assert manifest["truePoisonedShare"] == 0.25 and 0.0 <= manifest["detectorAuroc"] <= 1.0
    audit = AuditFigures.model_validate_json((layout.stage_dir(StageName.FINETUNE) / "audit.json").read_text())
    chosen = [r for r in records if r.suspect and r.answerChanged]
    assert audit.residual_sample == min(64, len(chosen))
    assert (audit.residual_rate is None) == (not chosen)
    metrics = PurificationMetrics.model_validate_json((layout.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())
    assert metrics.schema_version == 2 and metrics.audit == audit
    assert metrics.estimated_poisoned_share == audit.estimated_poisoned_share


def test_a_sharded_relabel_audits_exactly_what_the_whole_run_audits(workspace):
    whole = make_job(workspace, evaluation=None)
    sharded = make_job(workspace, evaluation=None, parallelism={"relabelShards": 3})
    for job in (whole, sharded):
        run_job(job, only=StageName.SALIENCY, show_progress=False)
        run_job(job, only=StageName.MASKING, show_progress=False)
        run_job(job, only=StageName.RELABEL, show_progress=False)
    one = (layout_of(workspace, evaluation=None).stage_dir(StageName.RELABEL) / SUSPECTS_FILE).read_text()
    three = (layout_of(workspace, evaluation=None, parallelism={"relabelShards": 3}).stage_dir(StageName.RELABEL)
             / SUSPECTS_FILE).read_text()
    assert one == three


@pytest.mark.parametrize("threshold", [0.000001, 1000.0])
def test_relabeling_only_the_suspects_keeps_every_other_answer(workspace, threshold):
    job = make_job(workspace, evaluation=None, relabel={"decoding": {"steps": 8, "genLength": 16, "blockLength": 8},
                                                        "batchSize": 4, "scope": "suspects"},
                   audit={"suspicionThreshold": threshold})
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
        run_job(job, only=stage, show_progress=False)
    layout = layout_of(workspace, evaluation=None, relabel=job.spec.relabel.to_wire(), audit=job.spec.audit.to_wire())
    relabel = layout.stage_dir(StageName.RELABEL)
    suspects = {r.id: r for r in read_suspects(relabel)}
    purified = load_dataset(relabel / "dataset", 16)
    for inst in purified:
        if not suspects[inst.id].suspect:
            assert inst.response == inst.metadata["original_response"], inst.id
    if threshold == 1000.0:  # nobody is a suspect: the dataset is the original one
        assert not any(r.suspect for r in suspects.values())
        assert json.loads((relabel / STAGE_MANIFEST).read_text())["metrics"]["changedFraction"] == 0.0
