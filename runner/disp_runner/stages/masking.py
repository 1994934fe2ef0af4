"""Stage `masking`: choose the top ⌊ρ·T⌋ visual tokens of each instance, record which, and draw
a report a person can check (did DiSP find the trigger?).

Output: masked.json ({"ratio", "visualTokens": [T_i, ...], "ids": [...], "tokens": [[token, ...], ...]},
⌊ρ·T_i⌋ tokens per instance, most salient first) and report.png (sample images, masked tokens outlined in red, the known
trigger box in green). Metrics: trigger localisation where the trigger's position is known.
"""

from __future__ import annotations

import json
from pathlib import Path

from disp_api import StageName
from disp_runner.errors import UserInputError
from disp_runner.disp.masking import (check_ratio_masks_a_token, known_trigger_tokens, top_salient_tokens,
                                     trigger_localisation)
from disp_runner.reporting import draw_report
from disp_runner.pipeline.inputs import TRAINING_INPUTS
from disp_runner.pipeline.stage import StageInputs, StageResult
from disp_runner.stages.saliency import read_scores

MASKED_FILE = "masked.json"
REPORT_FILE = "report.png"


def read_masked(folder: Path) -> dict[str, list[int]]:
    """instance id -> masked visual token indices."""
    record = json.loads((folder / MASKED_FILE).read_text())
    return dict(zip(record["ids"], record["tokens"]))


class MaskingStage:
    name = StageName.MASKING
    inputs = (StageName.SALIENCY,)
    reads = TRAINING_INPUTS
    whole_output_steps = ()

    def total_items(self, inputs: StageInputs) -> int:
        return len(inputs.training_set)

    def run(self, inputs: StageInputs, out: Path) -> StageResult:
        ratio = inputs.spec.masking.ratio
        saliency_dir = inputs.upstream[StageName.SALIENCY]
        ids, scores, counts = read_scores(saliency_dir)
        instances = {inst.id: inst for inst in inputs.training_set}
        if set(ids) != set(instances) or len(ids) != len(instances):
            raise UserInputError(f"{saliency_dir}: saliency scores do not cover the "
                                 f"dataset {inputs.spec.dataset.uri} (rerun saliency)")
        check_ratio_masks_a_token(ratio, int(counts.min()))
        masked = top_salient_tokens(scores, ratio, counts.tolist())  # per instance, most salient first
        processor = inputs.model.processor
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
        inputs.report_progress(len(ids))
        return StageResult(items=len(ids), metrics=metrics)
