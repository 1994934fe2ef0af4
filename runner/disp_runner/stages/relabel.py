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
from disp_runner.data.dataset import MANIFEST_NAME, load_dataset, write_dataset
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
from disp_runner.pipeline.inputs import TRAINING_INPUTS
from disp_runner.pipeline.stage import StageInputs, StageResult
from disp_runner.reporting import draw_suspects
from disp_runner.stages.masking import read_masked
from disp_runner.stages.saliency import read_scores
from disp_runner.pipeline.memory import memory_metrics, stage_batch
from disp_api.planning import PlannedStage

DATASET_DIR = "dataset"
SUSPECTS_REPORT = "suspects.png"  # the top suspects, their masked tokens outlined
SIGNATURE_FILE = "signature.json"  # relabel.acceptance signature: the words and what was put back


# --- the steps that need the stage's whole output: after an unsharded run, or after the merge ------

class SignatureAcceptance:
    """relabel.acceptance: signature — only the relabels that remove the backdoor's answer signature
    stay (disp/signature.py), recorded in signature.json, and the audit's records say which answers
    changed in the end (the residual rate samples those); all: every relabel stays. The signature is
    learnt from the whole dataset's answers, so it is never applied to one shard."""

    def apply(self, inputs: StageInputs, out: Path, result: StageResult) -> StageResult:
        if inputs.spec.relabel.acceptance is RelabelAcceptance.ALL or not (out / DATASET_DIR).is_dir():
            return result
        purified = load_dataset(out / DATASET_DIR, inputs.model.processor.image_size, empty_responses=True)
        kept, signature = keep_signature_relabels(purified)
        (out / SIGNATURE_FILE).write_text(json.dumps(signature.to_wire(), indent=1) + "\n")
        put_back = {inst.id for inst in kept if inst.metadata.get("signature_put_back")}
        records = [dataclasses.replace(r, answerChanged=False) if r.id in put_back else r for r in read_suspects(out)]
        write_dataset(kept, out / DATASET_DIR)
        write_suspects(records, out)
        changed = round(result.metrics["changedFraction"] * result.items) - signature.put_back
        return dataclasses.replace(result, metrics={
            **result.metrics, "changedFraction": changed / max(1, result.items),
            "signatureWords": len(signature.words), "keptRelabels": signature.kept_relabels,
            "putBack": signature.put_back})


class RequireAnswers:
    """A purified dataset whose every answer is empty would only teach silence: refused, nothing published."""

    def apply(self, inputs: StageInputs, out: Path, result: StageResult) -> StageResult:
        manifest = out / DATASET_DIR / MANIFEST_NAME  # written by this stage a moment ago: its answers only
        answers = ([json.loads(line)["response"] for line in manifest.read_text(encoding="utf-8").splitlines()]
                   if manifest.is_file() else [])
        if not any(answer.strip() for answer in answers):
            raise UserInputError("relabel: every answer was empty; nothing to fine-tune on (check spec.relabel)")
        return result


class SuspectsSheet:
    """suspects.png: the most suspect instances with the tokens DiSP masked (none: an empty sheet)."""

    def apply(self, inputs: StageInputs, out: Path, result: StageResult) -> StageResult:
        draw_suspects(out / SUSPECTS_REPORT, read_suspects(out), inputs.training_set,
                      read_masked(inputs.upstream[StageName.MASKING]), inputs.model.processor.layout_of)
        return result


class RelabelStage:
    name = StageName.RELABEL
    inputs = (StageName.SALIENCY, StageName.MASKING)
    reads = TRAINING_INPUTS
    # Run by the pipeline once the whole output is there (unsharded, or merged), in this order.
    whole_output_steps = (SignatureAcceptance(), RequireAnswers(), SuspectsSheet())

    def total_items(self, inputs: StageInputs) -> int:
        return len(inputs.items(inputs.spec.relabel.seed_group))

    def run(self, inputs: StageInputs, out: Path) -> StageResult:
        spec = inputs.spec.relabel
        model, processor = inputs.model
        masked_by_id = read_masked(inputs.upstream[StageName.MASKING])
        items = inputs.items(spec.seed_group)
        instances = inputs.training_set[items.start:items.stop]
        missing = [inst.id for inst in instances if inst.id not in masked_by_id]
        if missing:
            raise UserInputError(f"masking output has no entry for instance {missing[0]!r} (rerun masking)")
        masked = [masked_by_id[inst.id] for inst in instances]  # each instance's masked visual tokens
        prompted, mask_tokens = _masked_inputs(inputs, instances, masked)
        decoding = inputs.decoding
        # Sampled decoding draws its noise per batch: it keeps the batch its noise is drawn for, so
        # the answers never depend on the device; argmax decoding draws nothing.
        requested = spec.batch_size or (spec.seed_group if decoding.temperature > 0 else None)
        batch, plan = stage_batch(model, processor, PlannedStage.RELABEL if decoding.cache is DecodingCache.NONE
                                  else PlannedStage.RELABEL_CACHED, "spec.relabel.batchSize", requested,
                                  spec.seed_group, prompted, decoding.gen_length, inputs.device, steps=decoding.steps,
                                  block_length=decoding.block_length)
        drops, concentrations = _audit(inputs, instances, masked, items.start, batch)
        suspect = [drop > inputs.spec.audit.suspicion_threshold for drop in drops]
        if spec.scope is RelabelScope.ALL:
            answers = generate_responses(model, processor, prompted, inputs.decoding,
                                         batch_size=batch, seed=spec.seed, transform_image_embeds=mask_tokens,
                                         description="relabel", show_progress=inputs.show_progress,
                                         index_offset=items.start, on_batch=inputs.report_progress)
        else:
            answers = _relabel_suspects(inputs, instances, masked, suspect, batch)
        evidence = None
        if spec.min_evidence is not None:
            # How much more likely the masked input makes the new answer than the dataset's (nats).
            gen_length = inputs.decoding.gen_length
            evidence = (first_step_log_likelihood(model, processor, prompted, answers, gen_length, batch, mask_tokens)
                        - first_step_log_likelihood(model, processor, prompted, [i.response for i in instances],
                                                    gen_length, batch, mask_tokens)).tolist()
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
        if purified:
            write_dataset(purified, out / DATASET_DIR)
        write_suspects(records, out)
        metrics = {"purified": len(purified), "emptyResponses": _empty_answers(len(instances), purified),
                   "changedFraction": changed / max(1, len(instances)),
                   **_audit_metrics(audit_figures(records, inputs.spec.audit.suspicion_threshold)), "batchSize": batch,
                   **memory_metrics(plan)}
        if evidence is not None:
            metrics["keptOriginal"] = kept
        return StageResult(items=len(instances), metrics=metrics)

    def merge(self, inputs: StageInputs, shard_dirs: list[Path], out: Path) -> StageResult:
        merged: list[Instance] = []
        items = changed = kept = 0
        for folder in shard_dirs:
            if (folder / DATASET_DIR).is_dir():
                merged += load_dataset(folder / DATASET_DIR, inputs.model.processor.image_size, empty_responses=True)
            shard_metrics = read_stage_manifest(folder)["metrics"]
            items += shard_metrics["items"]
            changed += round(shard_metrics["changedFraction"] * shard_metrics["items"])
            kept += shard_metrics.get("keptOriginal", 0)
        records = [record for folder in shard_dirs for record in read_suspects(folder)]
        if merged:
            write_dataset(merged, out / DATASET_DIR)
        write_suspects(records, out)
        metrics = {"purified": len(merged), "emptyResponses": _empty_answers(items, merged),
                   "changedFraction": changed / max(1, items),
                   **_audit_metrics(audit_figures(records, inputs.spec.audit.suspicion_threshold))}
        if inputs.spec.relabel.min_evidence is not None:
            metrics["keptOriginal"] = kept
        return StageResult(items=items, metrics=metrics)


def _empty_answers(items: int, purified: list[Instance]) -> int:
    """Relabel answers that were empty: those left out, and those kept (relabel.emptyAnswers: keep)."""
    return items - len(purified) + sum(not inst.response.strip() for inst in purified)


def _masked_inputs(inputs: StageInputs, instances: list[Instance],
                   masked: list[list[int]]) -> tuple[list[Instance], ImageEmbedsTransform | None]:
    """What the compromised model is shown: the instances (with relabel's prompt, and the images
    blurred or painted over as the spec says) and the visual-token rewrite to apply, if any. The
    fine-tune still pairs the answers with the original images."""
    spec = inputs.spec
    shown = with_prompt(instances, spec.relabel.prompt)
    blur = spec.masking.blur_sigma
    if blur is not None:  # the opt-in whole-image neutraliser
        shown = [inst.map_image(lambda image: image.filter(ImageFilter.GaussianBlur(blur))) for inst in shown]
    if spec.masking.space is MaskingSpace.PIXELS:
        layout_of = inputs.model.processor.layout_of
        fill = spec.masking.fill
        return [inst.map_image(lambda image, inst=inst, tokens=tokens: paint_token_cells(image, layout_of(inst), tokens,
                                                                                        fill))
                for inst, tokens in zip(shown, masked)], None
    mask_embedding = inputs.model.model.mask_embedding().detach()
    return shown, lambda image_embeds, rows: mask_image_embeds(image_embeds, masked[rows], mask_embedding)


def _relabel_suspects(inputs: StageInputs, instances: list[Instance], masked: list[list[int]],
                      suspect: list[bool], batch: int) -> list[str]:
    """relabel.scope: suspects — only the suspects are decoded; the others keep the dataset's answer."""
    model, processor = inputs.model
    chosen = [i for i, flag in enumerate(suspect) if flag]
    chosen_shown, mask_chosen = _masked_inputs(inputs, [instances[i] for i in chosen], [masked[i] for i in chosen])
    decoded = generate_responses(
        model, processor, chosen_shown, inputs.decoding, batch_size=batch,
        seed=inputs.spec.relabel.seed, description="relabel suspects", show_progress=inputs.show_progress,
        transform_image_embeds=mask_chosen)
    answers = [inst.response for inst in instances]
    for i, answer in zip(chosen, decoded):
        answers[i] = answer
    inputs.report_progress(len(instances))
    return answers


def _audit(inputs: StageInputs, instances: list[Instance], salient: list[list[int]],
           first_index: int, batch: int) -> tuple[list[float], list[float]]:
    """Each instance's support drop (nats) and saliency concentration (disp/audit.py)."""
    model, processor = inputs.model
    ids, scores, counts = read_scores(inputs.upstream[StageName.SALIENCY])
    row_of = {instance_id: row for row, instance_id in enumerate(ids)}
    missing = [inst.id for inst in instances if inst.id not in row_of]
    if missing:
        raise UserInputError(f"saliency output has no scores for instance {missing[0]!r} (rerun saliency)")
    rows = [row_of[inst.id] for inst in instances]
    comparison = [comparison_tokens(tokens, int(counts[row]), inputs.spec.audit.seed, first_index + i)
                  for i, (tokens, row) in enumerate(zip(salient, rows))]
    drops = support_drop(model, processor, instances, salient, comparison, inputs.decoding.gen_length, batch)
    concentrations = [concentration(scores[row, :int(counts[row])], tokens) for tokens, row in zip(salient, rows)]
    return drops.tolist(), concentrations


def _audit_metrics(audit: AuditFigures) -> dict:
    """The audit's figures for the stage manifest (and `disp run`'s summary line)."""
    wire = audit.to_wire()
    return {key: wire[key] for key in ("suspects", "estimatedPoisonedShare", "suspicionThreshold",
                                       "truePoisonedShare", "detectorAuroc", "detectorPrecision")
            if wire[key] is not None}
