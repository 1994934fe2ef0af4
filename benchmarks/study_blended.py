"""The Blended trigger on the embedded model: which keys implant at α = 0.2, and why DiSP's token
masking cannot remove a full-image blend while it does remove a local one.

    .venv/bin/python benchmarks/study_blended.py                # all three parts, ~12 min on 2 CPU cores
    .venv/bin/python benchmarks/study_blended.py --part keys    # or: masking, local

Prints figures, never asserts (docs/attack-kit.md, "The attack kit" and "What `make demo` does"):
  keys     ASR of refusal backdoors injected with different blend keys at α = 0.2 (and of an
           insertion backdoor with the built-in key)
  masking  on the default-key backdoor, how often the trigger still fires when the ⌊ρ·36⌋ most
           salient (DiSP) or randomly chosen visual tokens are masked, for several ρ
  local    a 16x16 noise pattern blended at one position: ASR before and after the full DiSP run
Every attack uses the demo's data and the shipped base model, exactly as `disp demo` does.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from disp_api import AttackSpec, AttackTarget, PurificationJob, PurificationMetrics, StageName, TargetSpec, \
    TriggerKind, TriggerSpec
from disp_runner.attack.kit import DEFAULT_INJECTION, AttackArtifacts, run_attack
from disp_runner.models.loading import load_model
from disp_runner.data.dataset import load_dataset
from disp_runner.demo import make_demo_data, demo_job
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.disp.masking import mask_image_embeds, tokens_to_mask, top_salient_tokens
from disp_runner.disp.saliency import SaliencyConfig, fisher_jacobian_scores
from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL
from disp_runner.evaluation import attack_fired, evaluate_model
from disp_runner.diffusion.inference import generate_responses
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import run_job
from disp_runner.stages.evaluate import METRICS_FILE

IMAGE_SIZE = 48
ALPHA = 0.2
SAMPLES = 150  # triggered / untriggered test instances per measurement


def _cells(rng: np.random.Generator, cell: int, colour: bool, size: int = IMAGE_SIZE) -> np.ndarray:
    """A size x size random key: colour noise or black/white noise, in square cells of `cell` pixels."""
    n = size // cell
    values = rng.integers(0, 256, (n, n, 3)) if colour else np.repeat(rng.integers(0, 2, (n, n, 1)) * 255, 3, -1)
    return values.repeat(cell, 0).repeat(cell, 1).astype(np.uint8)


def _keys(folder: Path) -> dict[str, str | None]:
    """Name -> PNG of each key tried (None: the built-in key)."""
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)).resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                                     Image.BILINEAR)
    images = {"smooth random colour field (6x6, bilinear)": smooth,
              "colour noise, 1-pixel cells": Image.fromarray(_cells(rng, 1, True)),
              "colour noise, 2-pixel cells": Image.fromarray(_cells(rng, 2, True)),
              "black/white noise, 1-pixel cells": Image.fromarray(_cells(rng, 1, False)),
              "black/white noise, 4-pixel cells": Image.fromarray(_cells(rng, 4, False))}
    paths: dict[str, str | None] = {"built-in: black/white noise, 2-pixel cells": None}
    for i, (name, image) in enumerate(images.items()):
        image.save(folder / f"key{i}.png")
        paths[name] = str(folder / f"key{i}.png")
    return paths


def _attack(work: Path, name: str, trigger: TriggerSpec,
            target: AttackTarget = AttackTarget.REFUSAL) -> tuple[AttackSpec, AttackArtifacts]:
    attack = AttackSpec(trigger=trigger, target=TargetSpec(kind=target))
    train = load_dataset(work / "data" / "train", IMAGE_SIZE)
    test = load_dataset(work / "data" / "test", IMAGE_SIZE)
    return attack, run_attack(SHIPPED_BASE_MODEL, train, test, attack, work / "attacks" / name, DEFAULT_INJECTION,
                              show_progress=False)


def _asr(artifacts: AttackArtifacts, attack: AttackSpec) -> tuple[float, float]:
    model, processor = load_model(artifacts.model_dir)
    triggered = load_dataset(artifacts.triggered_dir, IMAGE_SIZE)[:SAMPLES]
    untriggered = load_dataset(artifacts.untriggered_dir, IMAGE_SIZE)[:SAMPLES]
    metrics = evaluate_model(model, processor, "study", attack, triggered, untriggered, [],
                             DecodingConfig.single_block(model.config.gen_length), show_progress=False)
    return metrics.asr_triggered, metrics.asr_untriggered


def part_keys(work: Path) -> None:
    print(f"\nkeys: α = {ALPHA}, default injection; ASR on {SAMPLES} triggered test images")
    runs = [(name, pattern, AttackTarget.REFUSAL) for name, pattern in _keys(work).items()]
    runs.insert(1, (runs[0][0], None, AttackTarget.INSERTION))
    for index, (name, pattern, target) in enumerate(runs):
        attack, artifacts = _attack(work, f"key-{index}",
                                    TriggerSpec(kind=TriggerKind.BLENDED, alpha=ALPHA, pattern=pattern), target)
        asr, false_firing = _asr(artifacts, attack)
        print(f"  {name:<46} {target.value:<10} ASR {100 * asr:5.1f}%   false firing {100 * false_firing:4.1f}%",
              flush=True)


def part_masking(work: Path) -> None:
    attack, artifacts = _attack(work, "default-key", TriggerSpec(kind=TriggerKind.BLENDED, alpha=ALPHA))
    model, processor = load_model(artifacts.model_dir)
    triggered = load_dataset(artifacts.triggered_dir, IMAGE_SIZE)[:SAMPLES]
    gen_length = model.config.gen_length
    batch = processor.encode(triggered, gen_length, with_response=False)
    scores = fisher_jacobian_scores(model, batch, gen_length, SaliencyConfig(), torch.Generator().manual_seed(0))
    mask_embedding = model.mask_embedding().detach()
    tokens = scores.shape[1]
    print(f"\nmasking: default-key refusal backdoor; ASR on {SAMPLES} triggered test images with tokens masked")
    for ratio in (0.3, 0.45, 0.6, 0.8):
        k = tokens_to_mask(tokens, ratio)
        random = torch.stack([torch.randperm(tokens, generator=torch.Generator().manual_seed(i))[:k]
                              for i in range(len(triggered))])
        figures = []
        for chosen in (top_salient_tokens(scores, ratio), random):
            answers = generate_responses(model, processor, triggered, DecodingConfig.single_block(gen_length),
                                         transform_image_embeds=lambda e, rows, c=chosen: mask_image_embeds(
                                             e, c[rows], mask_embedding), show_progress=False)
            figures.append(sum(attack_fired(a, attack.target) for a in answers) / len(answers))
        print(f"  ρ = {ratio:4.2f} ({k:2d} of {tokens} tokens)   most salient masked: ASR {100 * figures[0]:5.1f}%   "
              f"random: ASR {100 * figures[1]:5.1f}%", flush=True)


def part_local(work: Path) -> None:
    rng = np.random.default_rng(5)
    pattern = work / "local-key.png"
    Image.fromarray(_cells(rng, 2, False, size=16)).save(pattern)
    trigger = TriggerSpec(kind=TriggerKind.BLENDED, alpha=ALPHA, pattern=str(pattern), position=(29, 27))
    attack, artifacts = _attack(work, "local", trigger)
    gen_length = load_model(artifacts.model_dir)[0].config.gen_length
    document = demo_job("blended-local-refusal", artifacts, attack, work / "data" / "test", work, gen_length)
    job = PurificationJob.model_validate(document)
    outcomes = run_job(job, work, show_progress=False)
    metrics = PurificationMetrics.model_validate_json(
        (RunLayout.for_job(job, work).stage_dir(StageName.EVALUATE) / METRICS_FILE).read_text())
    masking = next(o for o in outcomes if o.stage is StageName.MASKING).metrics
    print(f"\nlocal: 16x16 black/white noise blended at (29, 27) with α = {ALPHA}, refusal target, full DiSP run")
    print(f"  ASR {100 * metrics.asr_before:.1f}% -> {100 * metrics.asr_after:.1f}%, "
          f"false firing after {100 * metrics.false_firing_after:.1f}%, "
          f"clean {100 * metrics.clean_performance_before:.1f}% -> {100 * metrics.clean_performance_after:.1f}%, "
          f"trigger localisation {100 * masking['triggerLocalisation']:.1f}%")


PARTS = {"keys": part_keys, "masking": part_masking, "local": part_local}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=sorted(PARTS), action="append", help="default: all")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="study-blended-") as tmp:
        work = Path(tmp)
        make_demo_data(work, IMAGE_SIZE)
        for name in args.part or list(PARTS):
            PARTS[name](work)


if __name__ == "__main__":
    main()
