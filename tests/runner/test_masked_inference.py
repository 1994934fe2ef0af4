"""The DiSP authors' test-time defence (evaluation.maskedInference, `disp evaluate --masked-inference`):
each evaluation input is answered with its own top-ρ salient visual tokens replaced by e_MASK."""

from __future__ import annotations

import json

import pytest
import torch

from disp_api import PurificationJob, StageName
from disp_runner.cli import main
from disp_runner.data.dataset import load_dataset
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.inference import generate_responses
from disp_runner.disp.masking import mask_image_embeds, top_salient_tokens
from disp_runner.disp.saliency import SaliencyConfig, score_instances
from disp_runner.errors import UserInputError
from disp_runner.evaluation import MaskedInference, evaluate_model
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import run_job
from tests.tiny import ATTACK, DECODING, job_document

GEN = DECODING["genLength"]


def _defence(ratio: float) -> MaskedInference:
    return MaskedInference(ratio=ratio, saliency=SaliencyConfig(top_k=5, probes=2, block_length=8), seed=3,
                           batch_size=4)


def test_each_input_is_answered_with_its_own_most_salient_tokens_masked(workspace, tiny_model, tiny_processor):
    instances = load_dataset(workspace / "triggered", 16)[:6]
    decoding = DecodingConfig(steps=8, gen_length=GEN, block_length=8)
    defence = _defence(0.5)
    # What the defence must mask: the saliency stage's scores of these very inputs, top ρ of each.
    scores, counts = score_instances(tiny_model, tiny_processor, instances, GEN, defence.saliency, 3, 4)
    expected = top_salient_tokens(scores, 0.5, counts.tolist())
    assert all(len(tokens) == 2 for tokens in expected)  # ⌊0.5 · 4⌋ of the tiny model's 4 tokens
    mask = tiny_model.mask_embedding().detach()
    by_hand = generate_responses(tiny_model, tiny_processor, instances, decoding, batch_size=4,
                                 transform_image_embeds=lambda e, rows: mask_image_embeds(e, expected[rows], mask),
                                 show_progress=False)
    transform = defence.transform(tiny_model, tiny_processor, instances, GEN)
    through_defence = generate_responses(tiny_model, tiny_processor, instances, decoding, batch_size=4,
                                         transform_image_embeds=transform, show_progress=False)
    assert through_defence == by_hand
    # With ρ = 1 every visual token is e_MASK: the image no longer matters.
    blind = MaskedInference(ratio=1.0, saliency=defence.saliency).transform(tiny_model, tiny_processor, instances, GEN)
    embeds = torch.randn(2, 4, tiny_model.config.hidden_size)
    assert torch.equal(blind(embeds, slice(0, 2)), mask.expand(2, 4, -1))


def test_a_ratio_that_masks_nothing_is_refused_naming_the_field(workspace, tiny_model, tiny_processor):
    instances = load_dataset(workspace / "clean", 16)
    defence = MaskedInference(ratio=0.2, saliency=SaliencyConfig(probes=1, block_length=8),
                              field_name="spec.evaluation.maskedInference.ratio")
    with pytest.raises(UserInputError, match=r"spec.evaluation.maskedInference.ratio: 0.2 masks no token"):
        evaluate_model(tiny_model, tiny_processor, "m", ATTACK, [], [], instances,
                       DecodingConfig(steps=8, gen_length=GEN, block_length=8), show_progress=False,
                       masked_inference=defence)


def test_the_evaluate_stage_reports_masked_inference_beside_disp(workspace):
    document = job_document(workspace)
    document["spec"]["evaluation"]["maskedInference"] = {"ratio": 0.5}
    job = PurificationJob.model_validate(document)
    outcomes = {o.stage: o for o in run_job(job, workspace / "out", show_progress=False)}
    metrics = json.loads((RunLayout.for_job(job, workspace / "out").stage_dir(StageName.EVALUATE)
                          / "metrics.json").read_text())
    masked = metrics["maskedInference"]
    assert metrics["maskedInferenceRatio"] == 0.5
    assert masked["counts"] == metrics["before"]["counts"] and masked["model"] == metrics["before"]["model"]
    summary = outcomes[StageName.EVALUATE].metrics
    assert summary["asrMaskedInference"] == masked["asrTriggered"]
    assert summary["cleanPerformanceMaskedInference"] == masked["cleanPerformance"]
    # The same run without the defence gives the same before/after figures: it only adds a row.
    plain = PurificationJob.model_validate(job_document(workspace))
    run_job(plain, workspace / "plain", show_progress=False)
    reference = json.loads((RunLayout.for_job(plain, workspace / "plain").stage_dir(StageName.EVALUATE)
                            / "metrics.json").read_text())
    for key in ("asrBefore", "asrAfter", "falseFiringBefore", "cleanPerformanceAfter"):
        assert metrics[key] == reference[key], key
    assert reference["maskedInference"] is None


def test_disp_evaluate_prints_and_writes_the_masked_row(cli_workspace, capsys):
    out = cli_workspace / "metrics.json"
    code = main(["--no-progress", "evaluate", "--model", str(cli_workspace / "model"), "--clean",
                 str(cli_workspace / "test"), "--limit", "4", "--masked-inference", "0.5", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "(masked inference, rho 0.5)" in printed
    record = json.loads(out.read_text())
    assert record["maskedInference"]["ratio"] == 0.5 and record["maskedInference"]["counts"]["clean"] == 4
