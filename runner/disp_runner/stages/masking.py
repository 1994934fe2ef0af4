"""Stage `masking`: choose the top ⌊ρ·T⌋ visual tokens of each instance, record which, and draw
a report a person can check (did DiSP find the trigger?).

Output: masked.json ({"ratio", "visualTokens", "ids": [...], "tokens": [[token, ...], ...]},
most salient first) and report.png (sample images, masked tokens outlined in red, the known
trigger box in green). Metrics: trigger localisation where the trigger's position is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw

from disp_api import StageName
from disp_runner.data.dataset import Instance
from disp_runner.disp.masking import check_ratio_masks_a_token, top_salient_tokens, trigger_localisation
from disp_runner.disp.token_grid import tokens_covered
from disp_runner.errors import UserInputError
from disp_runner.models.base import TokenGrid
from disp_runner.pipeline.context import StageContext, StageResult
from disp_runner.stages.saliency import read_scores

MASKED_FILE = "masked.json"
REPORT_FILE = "report.png"
REPORT_SAMPLES = 8  # per row: instances with a known trigger, then others
REPORT_SCALE = 4


def read_masked(folder: Path) -> dict[str, list[int]]:
    """instance id -> masked visual token indices."""
    record = json.loads((folder / MASKED_FILE).read_text())
    return dict(zip(record["ids"], record["tokens"]))


def known_trigger_tokens(inst: Instance, image_size: int, grid: TokenGrid) -> list[int] | None:
    """Visual tokens the instance's trigger covers, when its metadata says where it is and it is
    local (a patch or a positioned blend pattern; a full-image blend covers every token and
    cannot be localised). Metadata comes from the untrusted dataset: a malformed box is an error."""
    box = inst.metadata.get("trigger_box")
    if not box:
        return None
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in box)
            and 0 <= box[0] < box[2] <= image_size and 0 <= box[1] < box[3] <= image_size):
        raise UserInputError(f"instance {inst.id}: metadata.trigger_box must be [x0, y0, x1, y1], whole pixels "
                             f"inside the {image_size}x{image_size} image, got {box!r}")
    tokens = tokens_covered(grid, tuple(box))
    return tokens if 0 < len(tokens) < grid.num_tokens else None


class MaskingStage:
    name = StageName.MASKING
    inputs = (StageName.SALIENCY,)

    def total_items(self, ctx: StageContext) -> int:
        return len(ctx.training_set())

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        ratio = ctx.spec.masking.ratio
        ids, scores = read_scores(ctx.input_dir(StageName.SALIENCY))
        check_ratio_masks_a_token(ratio, int(scores.shape[1]))
        instances = {inst.id: inst for inst in ctx.training_set()}
        if set(ids) != set(instances) or len(ids) != len(instances):
            raise UserInputError(f"{ctx.input_dir(StageName.SALIENCY)}: saliency scores do not cover the "
                                 f"dataset {ctx.spec.dataset.uri} (rerun saliency)")
        masked = top_salient_tokens(scores, ratio).tolist()  # [N, k]
        processor = ctx.compromised_model().processor
        image_size, grid = processor.image_size, processor.token_grid()
        record = {"ratio": ratio, "visualTokens": scores.shape[1], "ids": ids, "tokens": masked}
        (out / MASKED_FILE).write_text(json.dumps(record))

        localisation: list[float] = []
        top1_hits = 0
        for inst_id, tokens in zip(ids, masked):
            trigger = known_trigger_tokens(instances[inst_id], image_size, grid)
            if trigger is not None:
                localisation.append(trigger_localisation(tokens, trigger))
                top1_hits += bool(tokens) and tokens[0] in trigger
        metrics = {"ratio": ratio, "maskedPerInstance": len(masked[0]) if masked else 0,
                   "visualTokens": int(scores.shape[1]), "instancesWithKnownTrigger": len(localisation)}
        if localisation:
            metrics["triggerLocalisation"] = sum(localisation) / len(localisation)
            metrics["triggerTop1"] = top1_hits / len(localisation)
        draw_report(out / REPORT_FILE, [instances[i] for i in ids], masked, scores, image_size, grid)
        ctx.report_progress(len(ids))
        return StageResult(items=len(ids), metrics=metrics)


def draw_report(path: Path, instances: Sequence[Instance], masked: Sequence[Sequence[int]], scores: torch.Tensor,
                image_size: int, grid: TokenGrid) -> None:
    """A grid of sample images: top row with a known trigger, bottom row without. Every masked token
    is outlined in red (thicker for the most salient); a known trigger box is outlined in green."""
    with_trigger = [i for i, inst in enumerate(instances) if known_trigger_tokens(inst, image_size, grid)]
    without = [i for i, inst in enumerate(instances) if i not in set(with_trigger)]
    rows = [r[:REPORT_SAMPLES] for r in (with_trigger, without) if r]
    cell = image_size * REPORT_SCALE
    top = 18  # caption
    sheet = Image.new("RGB", (REPORT_SAMPLES * (cell + 4) + 4, top + len(rows) * (cell + 4) + 4), "white")
    caption = "red: masked visual tokens (thick: most salient)"
    if with_trigger:
        caption = "top row: known trigger (green box); " + caption
    ImageDraw.Draw(sheet).text((4, 4), caption, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, index in enumerate(row):
            inst = instances[index]
            img = inst.image.convert("RGB").resize((cell, cell), Image.NEAREST)
            draw = ImageDraw.Draw(img)
            for rank, token in enumerate(masked[index]):
                x0, y0, x1, y1 = (v * REPORT_SCALE for v in grid.box(token))
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(230, 0, 0), width=3 if rank == 0 else 1)
            box = inst.metadata.get("trigger_box")
            if box and known_trigger_tokens(inst, image_size, grid):
                x0, y0, x1, y1 = (v * REPORT_SCALE for v in box)
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 200, 0), width=2)
            sheet.paste(img, (4 + c * (cell + 4), top + r * (cell + 4)))
    sheet.save(path, format="PNG")
