"""Stage `relabel`: the compromised model answers each training instance with its most salient
visual tokens masked (the trigger is neutralised, so the answers are clean). The answers replace
the responses: the purified dataset, same format as the input (dataset/manifest.jsonl + images/).
With `spec.masking.blurSigma` the image it answers is also blurred (whole-image triggers); with
`spec.relabel.minEvidence` an answer is replaced only when the masked input makes it that many nats
more likely than the dataset's (metadata `relabel_evidence`), else the dataset's answer is kept.

Each purified instance keeps its metadata plus `original_response`; an instance whose answer is
empty is left out and counted (`emptyResponses`), since an empty target teaches nothing.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import ImageFilter

from disp_api import StageName
from disp_runner.data.dataset import Instance, load_dataset, write_dataset
from disp_runner.data.llava import replace_first_answer
from disp_runner.disp.masking import mask_image_embeds
from disp_runner.errors import UserInputError
from disp_runner.evaluation import normalise_answer
from disp_runner.diffusion.inference import first_step_log_likelihood, generate_responses
from disp_runner.pipeline.artifacts import read_stage_manifest
from disp_runner.pipeline.context import StageContext, StageResult
from disp_runner.stages.masking import read_masked

DATASET_DIR = "dataset"


class RelabelStage:
    name = StageName.RELABEL
    inputs = (StageName.MASKING,)

    def total_items(self, ctx: StageContext) -> int:
        return len(ctx.shard_items(ctx.spec.relabel.batch_size))

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        spec = ctx.spec.relabel
        model, processor = ctx.compromised_model()
        masked_by_id = read_masked(ctx.input_dir(StageName.MASKING))
        items = ctx.shard_items(spec.batch_size)
        instances = ctx.training_set()[items.start:items.stop]
        missing = [inst.id for inst in instances if inst.id not in masked_by_id]
        if missing:
            raise UserInputError(f"masking output has no entry for instance {missing[0]!r} (rerun masking)")
        masked = [masked_by_id[inst.id] for inst in instances]  # each instance's masked visual tokens
        mask_embedding = model.mask_embedding().detach()

        def mask_tokens(image_embeds: torch.Tensor, rows: slice) -> torch.Tensor:
            return mask_image_embeds(image_embeds, masked[rows], mask_embedding)

        prompted = instances if spec.prompt is None else [inst.replace(prompt=spec.prompt) for inst in instances]
        blur = ctx.spec.masking.blur_sigma
        if blur is not None:  # the opt-in whole-image neutraliser: the fine-tune still sees the original image
            prompted = [inst.map_image(lambda image: image.filter(ImageFilter.GaussianBlur(blur))) for inst in prompted]
        answers = generate_responses(model, processor, prompted, ctx.decoding(),
                                     batch_size=spec.batch_size, seed=spec.seed, transform_image_embeds=mask_tokens,
                                     description="relabel", show_progress=ctx.show_progress,
                                     index_offset=items.start, on_batch=ctx.report_progress)
        evidence = None
        if spec.min_evidence is not None:
            # How much more likely the masked input makes the new answer than the dataset's (nats).
            gen_length = ctx.decoding().gen_length
            evidence = (first_step_log_likelihood(model, processor, prompted, answers, gen_length, spec.batch_size,
                                                  mask_tokens)
                        - first_step_log_likelihood(model, processor, prompted, [i.response for i in instances],
                                                    gen_length, spec.batch_size, mask_tokens)).tolist()
        purified: list[Instance] = []
        kept = changed = 0
        for index, (inst, answer) in enumerate(zip(instances, answers)):
            metadata = {**inst.metadata, "original_response": inst.response}
            if evidence is not None:
                # JSON has no infinity: an answer the model could not have produced scores null.
                metadata["relabel_evidence"] = round(evidence[index], 4) if math.isfinite(evidence[index]) else None
                if normalise_answer(answer) != normalise_answer(inst.response) and not (
                        evidence[index] >= spec.min_evidence):  # NaN never counts as evidence
                    answer = inst.response
                    kept += 1
            # Case and punctuation differ by construction (the tokenizer lower-cases); count real changes.
            changed += normalise_answer(answer) != normalise_answer(inst.response)
            if answer:
                purified.append(replace_first_answer(inst, answer, metadata))
        if purified:
            write_dataset(purified, out / DATASET_DIR)
        elif ctx.shard is None:
            raise UserInputError("relabel: every answer was empty; nothing to fine-tune on (check spec.relabel)")
        metrics = {"purified": len(purified), "emptyResponses": len(instances) - len(purified),
                   "changedFraction": changed / max(1, len(instances))}
        if evidence is not None:
            metrics["keptOriginal"] = kept
        return StageResult(items=len(instances), metrics=metrics)

    def merge(self, ctx: StageContext, shard_dirs: list[Path], out: Path) -> StageResult:
        merged: list[Instance] = []
        items = changed = kept = 0
        for folder in shard_dirs:
            if (folder / DATASET_DIR).is_dir():
                merged += load_dataset(folder / DATASET_DIR, ctx.image_size())
            shard_metrics = read_stage_manifest(folder)["metrics"]
            items += shard_metrics["items"]
            changed += round(shard_metrics["changedFraction"] * shard_metrics["items"])
            kept += shard_metrics.get("keptOriginal", 0)
        if not merged:
            raise UserInputError("relabel: every answer was empty; nothing to fine-tune on (check spec.relabel)")
        write_dataset(merged, out / DATASET_DIR)
        metrics = {"purified": len(merged), "emptyResponses": items - len(merged),
                   "changedFraction": changed / max(1, items)}
        if ctx.spec.relabel.min_evidence is not None:
            metrics["keptOriginal"] = kept
        return StageResult(items=items, metrics=metrics)
