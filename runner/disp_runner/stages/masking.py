"""Stage `masking`: choose the top ⌊ρ·T⌋ visual tokens of each instance, record which, and draw
a report a person can check (did DiSP find the trigger?).

Output: masked.json ({"ratio", "visualTokens": [T_i, ...], "ids": [...], "tokens": [[token, ...], ...]},
⌊ρ·T_i⌋ tokens per instance, most salient first) and report.png (sample images, masked tokens outlined in red, the known
trigger box in green). Metrics: trigger localisation where the trigger's position is known.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from disp_api import StageName
from disp_runner.data.instances import Instance
from disp_runner.disp.masking import check_ratio_masks_a_token, top_salient_tokens, trigger_localisation
from disp_runner.disp.token_grid import seeing_tokens, tokens_covered
from disp_runner.errors import UserInputError
from disp_runner.models.base import VisualLayout
from disp_runner.pipeline.context import TRAINING_INPUTS, StageContext, StageResult
from disp_runner.stages.saliency import read_scores

MASKED_FILE = "masked.json"
REPORT_FILE = "report.png"
REPORT_SAMPLES = 8  # per row: instances with a known trigger, then others
REPORT_SCALE = 4


def read_masked(folder: Path) -> dict[str, list[int]]:
    """instance id -> masked visual token indices."""
    record = json.loads((folder / MASKED_FILE).read_text())
    return dict(zip(record["ids"], record["tokens"]))


def known_trigger_tokens(inst: Instance, layout: VisualLayout) -> list[int] | None:
    """Visual tokens the instance's trigger covers, when its metadata says where it is and it is
    local (a patch or a positioned blend pattern; a full-image blend covers every token and
    cannot be localised). Metadata comes from the untrusted dataset: a malformed box is an error."""
    box = inst.metadata.get("trigger_box")
    if not box:
        return None
    width, height = inst.image_size
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in box)
            and 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        raise UserInputError(f"instance {inst.id}: metadata.trigger_box must be [x0, y0, x1, y1], whole pixels "
                             f"inside the {width}x{height} image, got {box!r}")
    tokens = tokens_covered(layout, tuple(box))
    return tokens if 0 < len(tokens) < seeing_tokens(layout) else None


class MaskingStage:
    name = StageName.MASKING
    inputs = (StageName.SALIENCY,)
    reads = TRAINING_INPUTS

    def total_items(self, ctx: StageContext) -> int:
        return len(ctx.training_set())

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        ratio = ctx.spec.masking.ratio
        ids, scores, counts = read_scores(ctx.input_dir(StageName.SALIENCY))
        instances = {inst.id: inst for inst in ctx.training_set()}
        if set(ids) != set(instances) or len(ids) != len(instances):
            raise UserInputError(f"{ctx.input_dir(StageName.SALIENCY)}: saliency scores do not cover the "
                                 f"dataset {ctx.spec.dataset.uri} (rerun saliency)")
        check_ratio_masks_a_token(ratio, int(counts.min()))
        masked = top_salient_tokens(scores, ratio, counts.tolist())  # per instance, most salient first
        processor = ctx.compromised_model().processor
        layouts = [processor.layout_of(instances[i]) for i in ids]
        record = {"ratio": ratio, "visualTokens": counts.tolist(), "ids": ids, "tokens": masked}
        (out / MASKED_FILE).write_text(json.dumps(record))

        localisation: list[float] = []
        top1_hits = 0
        for inst_id, tokens, layout in zip(ids, masked, layouts):
            trigger = known_trigger_tokens(instances[inst_id], layout)
            if trigger is not None:
                localisation.append(trigger_localisation(tokens, trigger))
                top1_hits += bool(tokens) and tokens[0] in trigger
        metrics = {"ratio": ratio, "maskedPerInstance": max(map(len, masked), default=0),
                   "visualTokens": int(counts.max()) if len(counts) else 0,
                   "instancesWithKnownTrigger": len(localisation)}
        if localisation:
            metrics["triggerLocalisation"] = sum(localisation) / len(localisation)
            metrics["triggerTop1"] = top1_hits / len(localisation)
        draw_report(out / REPORT_FILE, [instances[i] for i in ids], masked, layouts)
        ctx.report_progress(len(ids))
        return StageResult(items=len(ids), metrics=metrics)


def draw_report(path: Path, instances: Sequence[Instance], masked: Sequence[Sequence[int]],
                layouts: Sequence[VisualLayout], rows: Sequence[Sequence[int]] | None = None,
                caption: str = "") -> None:
    """A grid of sample images (`rows` of instance indices; default: top row with a known trigger,
    bottom row without). Every masked token that sees a cell of the image is outlined in red
    (thicker for the most salient); a known trigger box is outlined in green."""
    if rows is None:
        with_trigger = [i for i, (inst, layout) in enumerate(zip(instances, layouts))
                        if known_trigger_tokens(inst, layout)]
        without = [i for i in range(len(instances)) if i not in set(with_trigger)]
        rows = [r for r in (with_trigger, without) if r]
        caption = "top row: known trigger (green box); " if with_trigger else ""
    rows = [list(r)[:REPORT_SAMPLES] for r in rows if r]
    cell_w = max((instances[i].image_size[0] for row in rows for i in row), default=1) * REPORT_SCALE
    cell_h = max((instances[i].image_size[1] for row in rows for i in row), default=1) * REPORT_SCALE
    top = 18  # caption
    sheet = Image.new("RGB", (REPORT_SAMPLES * (cell_w + 4) + 4, top + len(rows) * (cell_h + 4) + 4), "white")
    caption += "red: masked visual tokens (thick: most salient)"
    ImageDraw.Draw(sheet).text((4, 4), caption, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, index in enumerate(row):
            inst, layout = instances[index], layouts[index]
            width, height = inst.image_size
            img = inst.image.convert("RGB").resize((width * REPORT_SCALE, height * REPORT_SCALE), Image.NEAREST)
            draw = ImageDraw.Draw(img)
            cells = {token: cell for grid in layout.grids for token, cell in grid.cells()}
            for rank, token in enumerate(masked[index]):
                if token in cells:
                    x0, y0, x1, y1 = (v * REPORT_SCALE for v in cells[token])
                    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(230, 0, 0), width=3 if rank == 0 else 1)
            box = inst.metadata.get("trigger_box")
            if box and known_trigger_tokens(inst, layout):
                x0, y0, x1, y1 = (v * REPORT_SCALE for v in box)
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 200, 0), width=2)
            sheet.paste(img, (4 + c * (cell_w + 4), top + r * (cell_h + 4)))
    sheet.save(path, format="PNG")
