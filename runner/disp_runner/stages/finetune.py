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

from disp_api import AuditFigures, FinetuneSharding, PurificationJob, StageName
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
from disp_runner.pipeline.inputs import TRAINING_INPUTS
from disp_runner.pipeline.opening import open_run
from disp_runner.pipeline.stage import StageInputs, StageResult
from disp_runner.stages.relabel import DATASET_DIR
from disp_runner.pipeline.memory import check_stage_memory, memory_metrics
from disp_api.planning import PlannedStage

MODEL_DIR = PURIFIED_MODEL_PATH.split("/")[-1]  # the operator reports <run>/finetune/model
PROJECTOR_FILE = "projector.safetensors"  # with spec.finetune.projectorFile


class FinetuneStage:
    name = StageName.FINETUNE
    inputs = (StageName.RELABEL,)
    reads = TRAINING_INPUTS
    whole_output_steps = ()

    def total_items(self, inputs: StageInputs) -> int:
        return 0  # progress is reported in optimiser steps, once they are known

    def run(self, inputs: StageInputs, out: Path) -> StageResult:
        self._prepare(inputs)
        if inputs.topology.distributed:
            figures = launch(inputs.topology, inputs.job.run_id, _launched_finetune,
                             _Launch(inputs.job, inputs.output_root, out, inputs.show_progress, inputs.round_number))
        else:
            figures = finetune(inputs, out)
        items = figures.pop("items")
        return StageResult(items=items, metrics=figures)

    def join(self, inputs: StageInputs) -> None:
        """On a pod other than the first of a multi-node fine-tune: train with the others, publish nothing."""
        self._prepare(inputs)
        launch(inputs.topology, inputs.job.run_id, _launched_finetune,
               _Launch(inputs.job, inputs.output_root, None, inputs.show_progress, inputs.round_number))

    def _prepare(self, inputs: StageInputs) -> None:
        """Once per pod, before any process is launched: the model's files in the local scratch (the
        purified data is there: the pipeline fetched it), and the newest epoch checkpoint restored."""
        inputs.resolved.make_model_local()
        epoch = inputs.checkpoints.restore()
        if epoch is not None:
            logs.say(f"finetune: resuming after epoch {epoch} from its checkpoint", stage="finetune", resumedEpoch=epoch)


def finetune(inputs: StageInputs, out: Path | None) -> dict[str, Any]:
    """The fine-tune itself, run by every process of the stage; the first saves the model into `out`
    and returns the stage's figures (the others return an empty dict)."""
    spec = inputs.spec.finetune
    model, processor = inputs.model
    gen_length = inputs.decoding.gen_length
    purified = load_dataset(inputs.upstream[StageName.RELABEL] / DATASET_DIR, processor.image_size,
                            empty_responses=True)  # relabel.emptyAnswers: keep writes them
    data = EncodedInstances(processor, purified, gen_length, spec.labels)  # batch by batch
    config = TrainingConfig(epochs=spec.epochs, learning_rate=spec.learning_rate, batch_size=spec.batch_size,
                            warmup_ratio=spec.warmup_ratio, weight_decay=spec.weight_decay, seed=spec.seed,
                            trainable=spec.trainable, group_by_length=spec.group_by_length,
                            activation_checkpointing=spec.activation_checkpointing, sharding=spec.sharding)
    plan = check_stage_memory(model, processor, PlannedStage.FINETUNE, "spec.finetune.batchSize", spec.batch_size,
                              purified, gen_length, inputs.device, trainable=spec.trainable,
                              processes=inputs.topology.world_size, checkpointing=spec.activation_checkpointing,
                              sharded=spec.sharding is FinetuneSharding.FSDP, labels=spec.labels)
    checkpoints = inputs.checkpoints
    progress = inputs.progress

    def on_step(step: int, total: int, loss: float) -> None:
        if progress is not None:
            if progress.total != total:  # the first step of this process (maybe after a resume)
                progress.restart(total, step - 1)
            progress.update(step, detail=f"loss {loss:.4f}")

    # Training mutates the model in place; the cached compromised model must stay as it was
    # for any later stage of this process, so train a private copy.
    compromised, model = model, copy.deepcopy(model)
    result = train_masked_diffusion(model, data, processor.mask_token_id, config, description="finetune",
                                    show_progress=inputs.show_progress, checkpoint_dir=checkpoints.local,
                                    on_step=on_step, on_epoch_end=checkpoints.publish)
    if out is None or not _first_process():
        return {}
    if result.sharded_weights is not None:  # the trained copy stays split: the model is rebuilt whole
        model = copy.deepcopy(compromised)
        unknown = model.load_state_dict(result.sharded_weights, strict=False).unexpected_keys
        if unknown:
            raise RuntimeError(f"the sharded fine-tune returned weights the model does not have: {unknown[:3]}")
    audit = residual_audit(inputs, model, processor)
    (out / AUDIT_FILE).write_text(json.dumps(audit.to_wire(), indent=2))
    save_model(model.cpu(), processor, out / MODEL_DIR)
    if spec.projector_file:
        save_projector(model, out / PROJECTOR_FILE)
    return {"items": len(purified), "steps": result.steps, "epochs": spec.epochs, "trainable": spec.trainable.value,
            "processes": inputs.topology.world_size, "sharding": spec.sharding.value, "firstLoss": round(result.first_loss, 5),
            "lastLoss": round(result.last_loss, 5), "trainSeconds": round(result.seconds, 2),
            "residualRate": audit.residual_rate, "residualSample": audit.residual_sample, **memory_metrics(plan)}


def residual_audit(inputs: StageInputs, model, processor) -> AuditFigures:
    """The relabel stage's audit figures plus the residual rate: of the top suspects whose answer
    relabeling changed (up to spec.audit.residualSample), the share the purified model, shown the
    unmasked image and the instance's own prompt, still answers with the dataset's answer."""
    records = read_suspects(inputs.upstream[StageName.RELABEL])
    audit = audit_figures(records, inputs.spec.audit.suspicion_threshold)
    by_id = {inst.id: inst for inst in inputs.training_set}
    chosen = [by_id[r.id] for r in records if r.suspect and r.answerChanged and r.id in by_id]
    chosen = chosen[:inputs.spec.audit.residual_sample]  # the records come most suspect first
    if not chosen:
        return audit
    model.to(inputs.device).eval()
    answers = generate_responses(model, processor, chosen, inputs.decoding, batch_size=inputs.spec.relabel.seed_group,
                                 seed=inputs.spec.relabel.seed, description="residual",
                                 show_progress=inputs.show_progress)
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
    round_number: int  # the purification round whose folder the run is reopened in


def _launched_finetune(task: _Launch) -> dict[str, Any]:
    """The body of every launched process (torch's launcher sets the variables read here)."""

    per_node = int(os.environ["LOCAL_WORLD_SIZE"])
    topology = Topology(nodes=int(os.environ["WORLD_SIZE"]) // per_node, node_rank=int(os.environ["GROUP_RANK"]),
                        processes_per_node=per_node)
    run = open_run(task.job, task.output_root, show_progress=task.show_progress, topology=topology,
                   round_number=task.round_number)
    run.resolved.resolve(FinetuneStage.reads)
    inputs = run.stage_inputs(FinetuneStage())
    if int(os.environ["RANK"]) == 0:
        inputs = run.with_progress(inputs, StageName.FINETUNE, 0)
    return finetune(inputs, task.out)
