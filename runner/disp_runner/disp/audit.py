"""Audit evidence that needs no trigger, no clean data and no extra model: does a training
instance's answer rest on a few visual tokens, as a backdoor's rests on its trigger?

For each instance, the support drop is log p(answer | its most salient tokens masked, as DiSP
masks them) subtracted from log p(answer | as many of its other tokens masked), both the first-step
pseudo-likelihood of the dataset's answer: two forward passes, no decoding. A clean instance's
answer rests on the whole object and loses about as much either way (median drop 0.0 nats on the
demo's data); a poisoned instance's target answer rests on the trigger, which saliency found, and
collapses when it is masked (median 6 to 135 nats). A whole-image trigger (a blended key) is in
every token, so masking some of them changes nothing: the evidence then finds no suspects, and
says nothing about whether the model is clean.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from disp_api import AuditFigures
from disp_runner.data.instances import Instance
from disp_runner.device import sub_seed
from disp_runner.diffusion.inference import first_step_log_likelihood
from disp_runner.disp.masking import mask_image_embeds
from disp_runner.errors import UserInputError
from disp_runner.models.base import DiffusionVLM, Processor

SUSPECTS_FILE = "suspects.jsonl"  # in the relabel stage's output, most suspect first


@dataclass(frozen=True)
class SuspectRecord:
    """One training instance's evidence (a line of suspects.jsonl)."""

    id: str
    supportDrop: float  # nats; JSON has no infinity, so an answer no input could produce scores 0
    concentration: float  # share of the instance's saliency in its masked tokens
    answerChanged: bool  # relabeling gave another answer than the dataset's
    suspect: bool  # supportDrop > the threshold
    poisoned: Optional[bool] = None  # ground truth, when the data carries it (the attack kit's metadata)


def comparison_tokens(salient: Sequence[int], visual_tokens: int, seed: int, index: int) -> list[int]:
    """As many tokens as `salient`, drawn from the instance's other visual tokens (all others when
    they are fewer), seeded by the instance's index so that shards draw what the whole run draws."""
    chosen = set(salient)
    others = [t for t in range(visual_tokens) if t not in chosen]
    return sorted(random.Random(sub_seed(seed, index)).sample(others, min(len(salient), len(others))))


def support_drop(model: DiffusionVLM, processor: Processor, instances: Sequence[Instance],
                 salient: Sequence[Sequence[int]], comparison: Sequence[Sequence[int]], gen_length: int,
                 batch_size: int) -> torch.Tensor:
    """[N] float64: nats the dataset's answer loses with its salient tokens masked beyond what it
    loses with the comparison tokens masked. An answer longer than `gen_length` (no input could
    produce it) has no evidence either way: 0."""
    mask_embedding = model.mask_embedding().detach()

    def masking(tokens: Sequence[Sequence[int]]):
        return lambda embeds, rows: mask_image_embeds(embeds, tokens[rows], mask_embedding)

    answers = [inst.response for inst in instances]
    with torch.no_grad():
        masked = first_step_log_likelihood(model, processor, instances, answers, gen_length, batch_size,
                                           masking(salient))
        compared = first_step_log_likelihood(model, processor, instances, answers, gen_length, batch_size,
                                             masking(comparison))
    drop = compared - masked
    return torch.where(torch.isfinite(drop), drop, torch.zeros_like(drop))


def concentration(scores: torch.Tensor, salient: Sequence[int]) -> float:
    """Share of one instance's total saliency (its scores row, its own tokens only) in `salient`."""
    total = float(scores.sum())
    return float(scores[list(salient)].sum()) / total if total > 0 else 0.0


def ground_truth(inst: Instance) -> Optional[bool]:
    value = inst.metadata.get("poisoned")
    return value if isinstance(value, bool) else None


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> Optional[float]:
    """Area under the ROC curve of `scores` for `labels` (ties count half); None without both classes."""
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):  # average ranks over ties
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    positive_ranks = sum(r for r, label in zip(ranks, labels) if label)
    return (positive_ranks - positives * (positives + 1) / 2) / (positives * negatives)


def figures(records: Sequence[SuspectRecord], threshold: float) -> AuditFigures:
    """The run-level figures of the relabel stage's records (the residual rate comes later)."""
    suspects = sum(r.suspect for r in records)
    truth = [r.poisoned for r in records]
    known = bool(records) and all(t is not None for t in truth)
    detector_auroc = auroc([r.supportDrop for r in records], truth) if known else None
    return AuditFigures(
        suspicion_threshold=threshold, instances=len(records), suspects=suspects,
        estimated_poisoned_share=suspects / len(records) if records else 0.0,
        true_poisoned_share=sum(truth) / len(records) if known else None,
        detector_auroc=None if detector_auroc is None else round(detector_auroc, 6),
        detector_precision=round(sum(r.suspect and bool(r.poisoned) for r in records) / suspects, 6)
        if known and suspects else None)


def write_suspects(records: Sequence[SuspectRecord], folder: Path) -> None:
    ranked = sorted(records, key=lambda r: (-r.supportDrop, r.id))
    (folder / SUSPECTS_FILE).write_text("".join(json.dumps(asdict(r)) + "\n" for r in ranked))


def read_suspects(folder: Path) -> list[SuspectRecord]:
    path = folder / SUSPECTS_FILE
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = SuspectRecord(**json.loads(line))
        except (ValueError, TypeError) as exc:
            raise UserInputError(f"{path}:{number}: not an audit record ({exc})") from None
        if not math.isfinite(record.supportDrop):
            raise UserInputError(f"{path}:{number}: supportDrop is not a finite number")
        records.append(record)
    return records
