"""Stage `relabel`: the compromised model answers each training instance with its most salient
visual tokens masked (the trigger is neutralised, so the answers are clean). The answers replace
the responses: the purified dataset, same format as the input (dataset/manifest.jsonl + images/).
With `spec.masking.space: pixels` the salient tokens' image cells are painted over instead of their
tokens replaced by e_MASK; with `spec.masking.blurSigma` the image it answers is also blurred
(whole-image triggers); with
`spec.relabel.minEvidence` an answer is replaced only when the masked input makes it that many nats
more likely than the dataset's (metadata `relabel_evidence`), else the dataset's answer is kept.

Each purified instance keeps its metadata plus `original_response`; an instance whose answer is
empty is left out and counted (`emptyResponses`), since an empty target teaches no answer, unless
`spec.relabel.emptyAnswers: keep` (the authors'), which keeps it with the empty answer.

The stage also audits every instance (disp/audit.py): two first-step forward passes give its
support drop, and suspects.jsonl ranks the instances by it; with `spec.relabel.scope: suspects`
only the suspects are decoded and relabelled. With `spec.relabel.acceptance: signature` only the
changed answers that remove the backdoor's answer signature are kept (disp/signature.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from PIL import ImageFilter

from disp_api import AuditFigures, DecodingCache, EmptyAnswers, MaskingSpace, RelabelAcceptance, StageName
from disp_api.spec import RelabelScope
from disp_runner.data.instances import Instance, with_prompt
from disp_runner.data.dataset import load_dataset, write_dataset
from disp_runner.data.llava import replace_first_answer
from disp_runner.disp.audit import (SuspectRecord, comparison_tokens, concentration, ground_truth, read_suspects,
                                   support_drop, write_suspects)
from disp_runner.disp.audit import figures as audit_figures
from disp_runner.disp.masking import mask_image_embeds, paint_token_cells
from disp_runner.disp.signature import keep_signature_relabels
from disp_runner.errors import UserInputError
from disp_runner.evaluation import normalise_answer
from disp_runner.diffusion.inference import ImageEmbedsTransform, first_step_log_likelihood, generate_responses
from disp_runner.pipeline.artifacts import read_stage_manifest
from disp_runner.pipeline.context import TRAINING_INPUTS, StageContext, StageResult
from disp_runner.reporting import REPORT_SAMPLES, draw_report
from disp_runner.stages.masking import read_masked
from disp_runner.stages.saliency import read_scores
from disp_runner.pipeline.memory import check_stage_memory, memory_metrics
from disp_runner.planning import PlannedStage

DATASET_DIR = "dataset"
SUSPECTS_REPORT = "suspects.png"  # the top suspects, their masked tokens outlined
SIGNATURE_FILE = "signature.json"  # relabel.acceptance signature: the words and what was put back


class RelabelStage:
    name = StageName.RELABEL
    inputs = (StageName.SALIENCY, StageName.MASKING)
    reads = TRAINING_INPUTS

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
        drops, concentrations = _audit(ctx, instances, masked, items.start)
        suspect = [drop > ctx.spec.audit.suspicion_threshold for drop in drops]
        prompted, mask_tokens = _masked_inputs(ctx, instances, masked)
        decoding = ctx.decoding()
        plan = check_stage_memory(model, processor, PlannedStage.RELABEL if decoding.cache is DecodingCache.NONE
                                  else PlannedStage.RELABEL_CACHED, "spec.relabel.batchSize", spec.batch_size, prompted,
                                  decoding.gen_length, ctx.device, steps=decoding.steps,
                                  block_length=decoding.block_length)
        if spec.scope is RelabelScope.ALL:
            answers = generate_responses(model, processor, prompted, ctx.decoding(),
                                         batch_size=spec.batch_size, seed=spec.seed, transform_image_embeds=mask_tokens,
                                         description="relabel", show_progress=ctx.show_progress,
                                         index_offset=items.start, on_batch=ctx.report_progress)
        else:
            answers = _relabel_suspects(ctx, instances, masked, suspect)
        evidence = None
        if spec.min_evidence is not None:
            # How much more likely the masked input makes the new answer than the dataset's (nats).
            gen_length = ctx.decoding().gen_length
            evidence = (first_step_log_likelihood(model, processor, prompted, answers, gen_length, spec.batch_size,
                                                  mask_tokens)
                        - first_step_log_likelihood(model, processor, prompted, [i.response for i in instances],
                                                    gen_length, spec.batch_size, mask_tokens)).tolist()
        purified: list[Instance] = []
        records: list[SuspectRecord] = []
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
            differs = normalise_answer(answer) != normalise_answer(inst.response)
            changed += differs
            records.append(SuspectRecord(id=inst.id, supportDrop=round(float(drops[index]), 4),
                                         concentration=round(concentrations[index], 4), answerChanged=differs,
                                         suspect=suspect[index], poisoned=ground_truth(inst)))
            if answer or spec.empty_answers is EmptyAnswers.KEEP:
                purified.append(replace_first_answer(inst, answer, metadata))
        accepted = {}
        if ctx.shard is None:  # the signature needs the whole dataset: a sharded run applies it at the merge
            purified, records, accepted = _accept(ctx, purified, records, out)
            changed -= accepted.get("putBack", 0)
        if ctx.shard is None and not _has_answers(purified):
            raise UserInputError("relabel: every answer was empty; nothing to fine-tune on (check spec.relabel)")
        if purified:
            write_dataset(purified, out / DATASET_DIR)
        write_suspects(records, out)
        if ctx.shard is None:
            _draw_suspects(ctx, records, masked_by_id, out)
        metrics = {"purified": len(purified), "emptyResponses": _empty_answers(len(instances), purified),
                   "changedFraction": changed / max(1, len(instances)), **accepted,
                   **_audit_metrics(audit_figures(records, ctx.spec.audit.suspicion_threshold)), **memory_metrics(plan)}
        if evidence is not None:
            metrics["keptOriginal"] = kept
        return StageResult(items=len(instances), metrics=metrics)

    def merge(self, ctx: StageContext, shard_dirs: list[Path], out: Path) -> StageResult:
        merged: list[Instance] = []
        items = changed = kept = 0
        for folder in shard_dirs:
            if (folder / DATASET_DIR).is_dir():
                merged += load_dataset(folder / DATASET_DIR, ctx.image_size(), empty_responses=True)
            shard_metrics = read_stage_manifest(folder)["metrics"]
            items += shard_metrics["items"]
            changed += round(shard_metrics["changedFraction"] * shard_metrics["items"])
            kept += shard_metrics.get("keptOriginal", 0)
        if not _has_answers(merged):
            raise UserInputError("relabel: every answer was empty; nothing to fine-tune on (check spec.relabel)")
        records = [record for folder in shard_dirs for record in read_suspects(folder)]
        merged, records, accepted = _accept(ctx, merged, records, out)
        changed -= accepted.get("putBack", 0)
        write_dataset(merged, out / DATASET_DIR)
        write_suspects(records, out)
        _draw_suspects(ctx, records, read_masked(ctx.input_dir(StageName.MASKING)), out)
        metrics = {"purified": len(merged), "emptyResponses": _empty_answers(items, merged),
                   "changedFraction": changed / max(1, items), **accepted,
                   **_audit_metrics(audit_figures(records, ctx.spec.audit.suspicion_threshold))}
        if ctx.spec.relabel.min_evidence is not None:
            metrics["keptOriginal"] = kept
        return StageResult(items=items, metrics=metrics)


def _has_answers(purified: list[Instance]) -> bool:
    """Whether any answer is left to fine-tune on (empty ones kept alone would only teach silence)."""
    return any(inst.response.strip() for inst in purified)


def _empty_answers(items: int, purified: list[Instance]) -> int:
    """Relabel answers that were empty: those left out, and those kept (relabel.emptyAnswers: keep)."""
    return items - len(purified) + sum(not inst.response.strip() for inst in purified)


def _accept(ctx: StageContext, purified: list[Instance], records: list[SuspectRecord],
            out: Path) -> tuple[list[Instance], list[SuspectRecord], dict]:
    """relabel.acceptance: signature — only the relabels that remove the backdoor's answer signature
    stay (disp/signature.py), recorded in signature.json, and the audit's records say which answers
    changed in the end (the residual rate samples those); all: every relabel stays."""
    if ctx.spec.relabel.acceptance is RelabelAcceptance.ALL or not purified:
        return purified, records, {}
    kept, signature = keep_signature_relabels(purified)
    (out / SIGNATURE_FILE).write_text(json.dumps(signature.to_wire(), indent=1) + "\n")
    put_back = {inst.id for inst in kept if inst.metadata.get("signature_put_back")}
    records = [dataclasses.replace(r, answerChanged=False) if r.id in put_back else r for r in records]
    return kept, records, {"signatureWords": len(signature.words), "keptRelabels": signature.kept_relabels,
                           "putBack": signature.put_back}


def _masked_inputs(ctx: StageContext, instances: list[Instance],
                   masked: list[list[int]]) -> tuple[list[Instance], ImageEmbedsTransform | None]:
    """What the compromised model is shown: the instances (with relabel's prompt, and the images
    blurred or painted over as the spec says) and the visual-token rewrite to apply, if any. The
    fine-tune still pairs the answers with the original images."""
    spec = ctx.spec
    shown = with_prompt(instances, spec.relabel.prompt)
    blur = spec.masking.blur_sigma
    if blur is not None:  # the opt-in whole-image neutraliser
        shown = [inst.map_image(lambda image: image.filter(ImageFilter.GaussianBlur(blur))) for inst in shown]
    if spec.masking.space is MaskingSpace.PIXELS:
        layout_of = ctx.compromised_model().processor.layout_of
        return [inst.map_image(lambda image, inst=inst, tokens=tokens: paint_token_cells(image, layout_of(inst), tokens))
                for inst, tokens in zip(shown, masked)], None
    mask_embedding = ctx.compromised_model().model.mask_embedding().detach()
    return shown, lambda image_embeds, rows: mask_image_embeds(image_embeds, masked[rows], mask_embedding)


def _relabel_suspects(ctx: StageContext, instances: list[Instance], masked: list[list[int]],
                      suspect: list[bool]) -> list[str]:
    """relabel.scope: suspects — only the suspects are decoded; the others keep the dataset's answer."""
    model, processor = ctx.compromised_model()
    chosen = [i for i, flag in enumerate(suspect) if flag]
    chosen_shown, mask_chosen = _masked_inputs(ctx, [instances[i] for i in chosen], [masked[i] for i in chosen])
    decoded = generate_responses(
        model, processor, chosen_shown, ctx.decoding(), batch_size=ctx.spec.relabel.batch_size,
        seed=ctx.spec.relabel.seed, description="relabel suspects", show_progress=ctx.show_progress,
        transform_image_embeds=mask_chosen)
    answers = [inst.response for inst in instances]
    for i, answer in zip(chosen, decoded):
        answers[i] = answer
    ctx.report_progress(len(instances))
    return answers


def _audit(ctx: StageContext, instances: list[Instance], salient: list[list[int]],
           first_index: int) -> tuple[list[float], list[float]]:
    """Each instance's support drop (nats) and saliency concentration (disp/audit.py)."""
    model, processor = ctx.compromised_model()
    ids, scores, counts = read_scores(ctx.input_dir(StageName.SALIENCY))
    row_of = {instance_id: row for row, instance_id in enumerate(ids)}
    missing = [inst.id for inst in instances if inst.id not in row_of]
    if missing:
        raise UserInputError(f"saliency output has no scores for instance {missing[0]!r} (rerun saliency)")
    rows = [row_of[inst.id] for inst in instances]
    comparison = [comparison_tokens(tokens, int(counts[row]), ctx.spec.audit.seed, first_index + i)
                  for i, (tokens, row) in enumerate(zip(salient, rows))]
    drops = support_drop(model, processor, instances, salient, comparison, ctx.decoding().gen_length,
                         ctx.spec.relabel.batch_size)
    concentrations = [concentration(scores[row, :int(counts[row])], tokens) for tokens, row in zip(salient, rows)]
    return drops.tolist(), concentrations


def _audit_metrics(audit: AuditFigures) -> dict:
    """The audit's figures for the stage manifest (and `disp run`'s summary line)."""
    wire = audit.to_wire()
    return {key: wire[key] for key in ("suspects", "estimatedPoisonedShare", "suspicionThreshold",
                                       "truePoisonedShare", "detectorAuroc", "detectorPrecision")
            if wire[key] is not None}


def _draw_suspects(ctx: StageContext, records: list[SuspectRecord], masked_by_id: dict[str, list[int]],
                   out: Path) -> None:
    """suspects.png: the most suspect instances with the tokens DiSP masked (none: an empty sheet)."""
    by_id = {inst.id: inst for inst in ctx.training_set()}
    top = [r for r in sorted(records, key=lambda r: -r.supportDrop) if r.suspect][:REPORT_SAMPLES]
    instances = [by_id[r.id] for r in top]
    layouts = [ctx.compromised_model().processor.layout_of(inst) for inst in instances]
    draw_report(out / SUSPECTS_REPORT, instances, [masked_by_id[r.id] for r in top], layouts,
                rows=[list(range(len(top)))], caption=f"top {len(top)} suspects by support drop; ")
