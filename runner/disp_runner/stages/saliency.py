"""Stage `saliency`: the Fisher–Jacobian score of every visual token of every training instance.

Output: scores.safetensors ({"scores": float64 [N, T], "visualTokens": int64 [N]}: instance i's
T_i scores in the first T_i columns, zeros after them) and ids.json (instance ids, same order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from disp_api import StageName
from disp_runner.disp.masking import check_ratio_masks_a_token
from disp_runner.disp.saliency import SaliencyConfig, score_instances
from disp_runner.data.instances import with_prompt
from disp_runner.errors import DegenerateResultError, UserInputError
from disp_runner.pipeline.inputs import TRAINING_INPUTS
from disp_runner.pipeline.stage import StageInputs, StageResult
from disp_runner.pipeline.memory import memory_metrics, stage_batch
from disp_api.planning import PlannedStage

SCORES_FILE = "scores.safetensors"
IDS_FILE = "ids.json"
COUNTS_KEY = "visualTokens"  # tensor in SCORES_FILE: how many visual tokens each instance's image has


def read_scores(folder: Path) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """(ids, scores [N, T] float64, visual tokens per instance [N]) of a saliency output folder:
    instance i's image has counts[i] visual tokens, scored in the first counts[i] columns."""
    ids = json.loads((folder / IDS_FILE).read_text())
    tensors = load_file(str(folder / SCORES_FILE))
    scores = tensors["scores"]
    # Outputs written before images could differ in token count have no counts: every row is full.
    counts = tensors.get(COUNTS_KEY, torch.full((scores.shape[0],), scores.shape[1], dtype=torch.long))
    if len(ids) != scores.shape[0] or counts.shape != (scores.shape[0],):
        raise UserInputError(f"{folder}: {len(ids)} ids, {scores.shape[0]} score rows and {counts.numel()} token "
                             "counts do not agree")
    if len(counts) and not (0 < int(counts.min()) and int(counts.max()) <= scores.shape[1]):
        raise UserInputError(f"{folder}: token counts outside 1..{scores.shape[1]}")
    return ids, scores, counts


def write_scores(folder: Path, ids: list[str], scores: torch.Tensor, counts: torch.Tensor) -> None:
    bad = int((~torch.isfinite(scores)).sum())
    if bad:  # top-k over NaN would "find" tokens 0..k: nothing degenerate goes on to masking
        raise DegenerateResultError(f"saliency: {bad} of {scores.numel()} scores are NaN or infinite "
                                    "(the model's outputs are not finite); nothing was published")
    spans = [scores[row, :int(count)] for row, count in enumerate(counts.tolist())]
    if spans and all(span.numel() > 1 and bool((span == span[0]).all()) for span in spans):
        # Equal scores rank no token above another: masking would pick tokens by position alone.
        raise DegenerateResultError(f"saliency: every instance's {int(counts.max())} scores are equal (nothing "
                                    "ranks one token above another); nothing was published")
    save_file({"scores": scores.contiguous(), COUNTS_KEY: counts.to(torch.long).contiguous()},
              str(folder / SCORES_FILE))
    (folder / IDS_FILE).write_text(json.dumps(ids))


def _smallest_grid(instances, processor):
    """(side, grid, instance id) of the smallest token grid among `instances`' images, or None."""
    smallest = None
    for inst in instances:
        for grid in processor.layout_of(inst).grids:
            side = min(grid.rows, grid.cols)
            if smallest is None or side < smallest[0]:
                smallest = (side, grid, inst.id)
    return smallest


def check_region_fits_the_grids(region_size: int, instances, processor) -> None:
    """A window as large as a token grid covers all of it: every window holds every token, so every
    token gets the same score. Refused before any scoring, naming the smallest grid."""
    if region_size <= 1:
        return
    smallest = _smallest_grid(instances, processor)
    if smallest is not None and region_size >= smallest[0]:
        side, grid, instance_id = smallest
        raise UserInputError(f"spec.saliency.regionSize: {region_size} covers a whole {grid.rows}x{grid.cols} token "
                             f"grid (instance {instance_id!r}), so every token would score the same; use at most "
                             f"{max(1, side - 1)}")


def fitted_region(region_size: int, instances, processor) -> int:
    """`region_size`, or the largest window smaller than every token grid when it is not."""
    smallest = _smallest_grid(instances, processor)
    return region_size if smallest is None else max(1, min(region_size, smallest[0] - 1))


class SaliencyStage:
    name = StageName.SALIENCY
    inputs = ()
    reads = TRAINING_INPUTS
    whole_output_steps = ()

    def total_items(self, inputs: StageInputs) -> int:
        return len(inputs.items(inputs.spec.saliency.seed_group))

    def run(self, inputs: StageInputs, out: Path) -> StageResult:
        spec = inputs.spec.saliency
        model, processor = inputs.model
        decoding = inputs.decoding  # saliency looks at the first step of the decoding relabel uses
        if spec.top_k > model.config.vocab_size:
            raise UserInputError(f"spec.saliency.topK: {spec.top_k} is larger than the vocabulary "
                                 f"({model.config.vocab_size} tokens)")
        # The tokens are scored for the question relabel will ask (its fixed prompt, when set): a
        # token salient for another question is not the one whose masking changes that answer.
        instances = with_prompt(inputs.training_set, inputs.spec.relabel.prompt)
        counts = torch.tensor([processor.layout_of(inst).num_tokens for inst in instances], dtype=torch.long)
        # Before the expensive part: a masking ratio that would mask nothing makes the scores useless.
        check_ratio_masks_a_token(inputs.spec.masking.ratio, int(counts.min()))
        if inputs.round_number == 1:
            check_region_fits_the_grids(spec.region_size, instances, processor)
        else:  # the escalation ladder's window, not the user's: as large as the smallest grid allows
            spec = spec.model_copy(update={"region_size": fitted_region(spec.region_size, instances, processor)})
        config = SaliencyConfig.from_spec(spec, decoding.block_length)
        # Every shard pads to the whole dataset's widest image, so shards concatenate.
        items = inputs.items(spec.seed_group)
        batch, plan = stage_batch(model, processor, PlannedStage.SALIENCY, "spec.saliency.batchSize", spec.batch_size,
                                  spec.seed_group, instances[items.start:items.stop], decoding.gen_length,
                                  inputs.device, probes=spec.probes, block_length=decoding.block_length)
        scores, counts = score_instances(model, processor, instances, decoding.gen_length, config, spec.seed,
                                         batch, rows=items, on_batch=inputs.report_progress,
                                         seed_group=spec.seed_group)
        width = scores.shape[1]
        write_scores(out, [instances[i].id for i in items], scores, counts[items.start:items.stop])
        return StageResult(items=len(items), metrics={"visualTokens": width, "topK": spec.top_k,
                                                      "probes": spec.probes, "regionSize": spec.region_size,
                                                      "batchSize": batch, **memory_metrics(plan)})

    def merge(self, inputs: StageInputs, shard_dirs: list[Path], out: Path) -> StageResult:
        ids: list[str] = []
        parts: list[torch.Tensor] = []
        counts: list[torch.Tensor] = []
        for folder in shard_dirs:
            shard_ids, shard_scores, shard_counts = read_scores(folder)
            ids += shard_ids
            parts.append(shard_scores)
            counts.append(shard_counts)
        write_scores(out, ids, torch.cat(parts), torch.cat(counts))
        return StageResult(items=len(ids), metrics={"visualTokens": int(parts[0].shape[1])})
