"""Stage `finetune`: repair the compromised model on the purified dataset (original image and
prompt, purified answer) with the masked-diffusion loss; the projector only by default.

Output: model/ (the purified model, safetensors + tokenizer), audit.json (the audit's figures with
the purified model's residual rate on the top suspects) and, with spec.finetune.projectorFile,
projector.safetensors (the projector alone, keyed by parameter name).

The stage runs in one process, or in one process per GPU on one or several pods (`disp run
--processes N --nodes M --node-rank I`, see diffusion/distributed.py) with the same training code;
the first process of the first pod saves the model. Epoch checkpoints live in
<run>/finetune.checkpoints/ and, in an S3-backed run, in the run's prefix, so a pod that is lost
resumes, in a new pod, at the epoch after its last complete one.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disp_api import AuditFigures, PurificationJob, StageName
from disp_api.contract import AUDIT_FILE
from disp_api.spec import PURIFIED_MODEL_PATH
from disp_runner import logs
from disp_runner.data.dataset import load_dataset
from disp_runner.diffusion.distributed import Topology, launch
from disp_runner.diffusion.inference import generate_responses
from disp_runner.disp.audit import figures as audit_figures
from disp_runner.disp.audit import read_suspects
from disp_runner.evaluation import normalise_answer
from disp_runner.diffusion.training import TrainingConfig, train_masked_diffusion
from disp_runner.models.base import EncodedInstances
from disp_runner.models.loading import save_model, save_projector
from disp_runner.pipeline.context import TRAINING_INPUTS, StageContext, StageResult
from disp_runner.pipeline.opening import open_run, start_progress
from disp_runner.stages.relabel import DATASET_DIR
from disp_runner.pipeline.memory import check_stage_memory, memory_metrics
from disp_runner.planning import PlannedStage

MODEL_DIR = PURIFIED_MODEL_PATH.split("/")[-1]  # the operator reports <run>/finetune/model
PROJECTOR_FILE = "projector.safetensors"  # with spec.finetune.projectorFile


class FinetuneStage:
    name = StageName.FINETUNE
    inputs = (StageName.RELABEL,)
    reads = TRAINING_INPUTS

    def total_items(self, ctx: StageContext) -> int:
        return 0  # progress is reported in optimiser steps, once they are known

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        self._prepare(ctx)
        if ctx.topology.distributed:
            figures = launch(ctx.topology, ctx.job.run_id, _launched_finetune,
                             _Launch(ctx.job, ctx.output_root, out, ctx.show_progress))
        else:
            figures = finetune(ctx, out)
        items = figures.pop("items")
        return StageResult(items=items, metrics=figures)

    def join(self, ctx: StageContext) -> None:
        """On a pod other than the first of a multi-node fine-tune: train with the others, publish nothing."""
        self._prepare(ctx)
        launch(ctx.topology, ctx.job.run_id, _launched_finetune, _Launch(ctx.job, ctx.output_root, None, ctx.show_progress))

    def _prepare(self, ctx: StageContext) -> None:
        """Once per pod, before any process is launched: the model's files and the purified data in
        the local scratch, and the newest epoch checkpoint restored from S3."""
        source = ctx.spec.model
        ctx.materialise(source.uri, "spec.model.uri")
        if source.projector_uri is not None:
            ctx.materialise_file(source.projector_uri, "spec.model.projectorUri")
        ctx.input_dir(StageName.RELABEL)
        epoch = ctx.checkpoints(self.name).restore()
        if epoch is not None:
            logs.say(f"finetune: resuming after epoch {epoch} from its checkpoint", stage="finetune", resumedEpoch=epoch)


def finetune(ctx: StageContext, out: Path | None) -> dict[str, Any]:
    """The fine-tune itself, run by every process of the stage; the first saves the model into `out`
    and returns the stage's figures (the others return an empty dict)."""
    spec = ctx.spec.finetune
    model, processor = ctx.compromised_model()
    purified = load_dataset(ctx.input_dir(StageName.RELABEL) / DATASET_DIR, processor.image_size,
                            empty_responses=True)  # relabel.emptyAnswers: keep writes them
    data = EncodedInstances(processor, purified, ctx.decoding().gen_length, spec.labels)  # batch by batch
    config = TrainingConfig(epochs=spec.epochs, learning_rate=spec.learning_rate, batch_size=spec.batch_size,
                            warmup_ratio=spec.warmup_ratio, weight_decay=spec.weight_decay, seed=spec.seed,
                            trainable=spec.trainable, group_by_length=spec.group_by_length,
                            activation_checkpointing=spec.activation_checkpointing)
    plan = check_stage_memory(model, processor, PlannedStage.FINETUNE, "spec.finetune.batchSize", spec.batch_size,
                              purified, ctx.decoding().gen_length, ctx.device, trainable=spec.trainable,
                              processes=ctx.topology.world_size, checkpointing=spec.activation_checkpointing,
                              labels=spec.labels)
    checkpoints = ctx.checkpoints(StageName.FINETUNE)

    def on_step(step: int, total: int, loss: float) -> None:
        if ctx.progress is not None:
            if ctx.progress.total != total:  # the first step of this process (maybe after a resume)
                ctx.progress.restart(total, step - 1)
            ctx.progress.update(step, detail=f"loss {loss:.4f}")

    # Training mutates the model in place; the cached compromised model must stay as it was
    # for any later stage of this process, so train a private copy.
    model = copy.deepcopy(model)
    result = train_masked_diffusion(model, data, processor.mask_token_id, config, description="finetune",
                                    show_progress=ctx.show_progress, checkpoint_dir=checkpoints.local,
                                    on_step=on_step, on_epoch_end=checkpoints.publish)
    if out is None or not _first_process():
        return {}
    audit = residual_audit(ctx, model, processor)
    (out / AUDIT_FILE).write_text(json.dumps(audit.to_wire(), indent=2))
    save_model(model.cpu(), processor, out / MODEL_DIR)
    if spec.projector_file:
        save_projector(model, out / PROJECTOR_FILE)
    return {"items": len(purified), "steps": result.steps, "epochs": spec.epochs, "trainable": spec.trainable.value,
            "processes": ctx.topology.world_size, "firstLoss": round(result.first_loss, 5),
            "lastLoss": round(result.last_loss, 5), "trainSeconds": round(result.seconds, 2),
            "residualRate": audit.residual_rate, "residualSample": audit.residual_sample, **memory_metrics(plan)}


def residual_audit(ctx: StageContext, model, processor) -> AuditFigures:
    """The relabel stage's audit figures plus the residual rate: of the top suspects whose answer
    relabeling changed (up to spec.audit.residualSample), the share the purified model, shown the
    unmasked image and the instance's own prompt, still answers with the dataset's answer."""
    relabel_dir = ctx.input_dir(StageName.RELABEL)
    records = read_suspects(relabel_dir)
    audit = audit_figures(records, ctx.spec.audit.suspicion_threshold)
    by_id = {inst.id: inst for inst in ctx.training_set()}
    chosen = [by_id[r.id] for r in records if r.suspect and r.answerChanged and r.id in by_id]
    chosen = chosen[:ctx.spec.audit.residual_sample]  # the records come most suspect first
    if not chosen:
        return audit
    model.to(ctx.device).eval()
    answers = generate_responses(model, processor, chosen, ctx.decoding(), batch_size=ctx.spec.relabel.batch_size,
                                 seed=ctx.spec.relabel.seed, description="residual", show_progress=ctx.show_progress)
    kept = sum(normalise_answer(a) == normalise_answer(inst.response) for a, inst in zip(answers, chosen))
    return audit.model_copy(update={"residual_rate": round(kept / len(chosen), 6), "residual_sample": len(chosen)})


def _first_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass(frozen=True)
class _Launch:
    """What a launched process needs to reopen the run (everything else it reads from the run)."""

    job: PurificationJob
    output_root: Path | None
    out: Path | None  # the staging folder the model is saved into (on the first pod)
    show_progress: bool


def _launched_finetune(task: _Launch) -> dict[str, Any]:
    """The body of every launched process (torch's launcher sets the variables read here)."""

    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    topology = Topology(nodes=int(os.environ["WORLD_SIZE"]) // per_node, node_rank=int(os.environ["GROUP_RANK"]),
                        processes_per_node=per_node)
    ctx = open_run(task.job, task.output_root, show_progress=task.show_progress, topology=topology)
    if int(os.environ["RANK"]) == 0:
        start_progress(ctx, StageName.FINETUNE, 0)
    return finetune(ctx, task.out)
