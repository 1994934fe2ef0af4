"""Stage `saliency`: the Fisher–Jacobian score of every visual token of every training instance.

Output: scores.safetensors ({"scores": float64 [N, T]}) and ids.json (instance ids, same order).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from disp_api import StageName
from disp_runner.device import autocast, sub_seed
from disp_runner.disp.masking import check_ratio_masks_a_token
from disp_runner.disp.saliency import SaliencyConfig, token_saliency
from disp_runner.errors import DegenerateResultError, UserInputError
from disp_runner.pipeline.context import StageContext, StageResult

SCORES_FILE = "scores.safetensors"
IDS_FILE = "ids.json"


def read_scores(folder: Path) -> tuple[list[str], torch.Tensor]:
    """(ids, scores [N, T] float64) of a saliency output folder."""
    ids = json.loads((folder / IDS_FILE).read_text())
    scores = load_file(str(folder / SCORES_FILE))["scores"]
    if len(ids) != scores.shape[0]:
        raise UserInputError(f"{folder}: {len(ids)} ids but {scores.shape[0]} score rows")
    return ids, scores


def write_scores(folder: Path, ids: list[str], scores: torch.Tensor) -> None:
    bad = int((~torch.isfinite(scores)).sum())
    if bad:  # top-k over NaN would "find" tokens 0..k: nothing degenerate goes on to masking
        raise DegenerateResultError(f"saliency: {bad} of {scores.numel()} scores are NaN or infinite "
                                    "(the model's outputs are not finite); nothing was published")
    save_file({"scores": scores.contiguous()}, str(folder / SCORES_FILE))
    (folder / IDS_FILE).write_text(json.dumps(ids))


class SaliencyStage:
    name = StageName.SALIENCY
    inputs = ()

    def total_items(self, ctx: StageContext) -> int:
        return len(ctx.shard_items(ctx.spec.saliency.batch_size))

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        spec = ctx.spec.saliency
        model, processor = ctx.compromised_model()
        decoding = ctx.decoding()  # saliency looks at the first step of the decoding relabel uses
        if spec.top_k > model.config.vocab_size:
            raise UserInputError(f"spec.saliency.topK: {spec.top_k} is larger than the vocabulary "
                                 f"({model.config.vocab_size} tokens)")
        # Before the expensive part: a masking ratio that would mask nothing makes the scores useless.
        grid = processor.token_grid()
        check_ratio_masks_a_token(ctx.spec.masking.ratio, grid.num_tokens)
        config = SaliencyConfig(top_k=spec.top_k, probes=spec.probes, block_length=decoding.block_length,
                                region_size=spec.region_size)
        instances = ctx.training_set()
        items = ctx.shard_items(spec.batch_size)
        rows: list[torch.Tensor] = []
        for lo in range(items.start, items.stop, spec.batch_size):
            chunk = instances[lo:min(lo + spec.batch_size, items.stop)]
            batch = processor.encode(chunk, decoding.gen_length, with_response=False)
            # Probes are seeded per global batch, so a shard computes exactly what the full run does.
            generator = torch.Generator(device=ctx.device).manual_seed(sub_seed(spec.seed, lo // spec.batch_size))
            with autocast(ctx.device):
                rows.append(token_saliency(model, batch.to(ctx.device), decoding.gen_length, config, generator,
                                           grid).cpu())
            ctx.report_progress(lo + len(chunk) - items.start)
        tokens = grid.num_tokens
        scores = torch.cat(rows) if rows else torch.zeros(0, tokens, dtype=torch.float64)
        write_scores(out, [instances[i].id for i in items], scores)
        return StageResult(items=len(items), metrics={"visualTokens": tokens, "topK": spec.top_k,
                                                      "probes": spec.probes, "regionSize": spec.region_size})

    def merge(self, ctx: StageContext, shard_dirs: list[Path], out: Path) -> StageResult:
        ids: list[str] = []
        parts: list[torch.Tensor] = []
        for folder in shard_dirs:
            shard_ids, shard_scores = read_scores(folder)
            ids += shard_ids
            parts.append(shard_scores)
        write_scores(out, ids, torch.cat(parts))
        return StageResult(items=len(ids), metrics={"visualTokens": int(parts[0].shape[1])})
