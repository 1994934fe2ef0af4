"""Stage `finetune`: repair the compromised model on the purified dataset (original image and
prompt, purified answer) with the masked-diffusion loss; the projector only by default.

Output: model/ (the purified model, safetensors + tokenizer) and, with spec.finetune.projectorFile,
projector.safetensors (the projector alone, keyed by parameter name). Epoch checkpoints live in
<run>/finetune.checkpoints/ until the stage completes, so a killed pod resumes where it stopped.
"""

from __future__ import annotations

import copy
from pathlib import Path

from disp_api import StageName
from disp_api.spec import PURIFIED_MODEL_PATH
from disp_runner.data.dataset import load_dataset
from disp_runner.models.base import EncodedInstances
from disp_runner.models.loading import save_model, save_projector
from disp_runner.pipeline.context import StageContext, StageResult
from disp_runner.stages.relabel import DATASET_DIR
from disp_runner.diffusion.training import TrainingConfig, train_masked_diffusion

MODEL_DIR = PURIFIED_MODEL_PATH.split("/")[-1]  # the operator reports <run>/finetune/model
PROJECTOR_FILE = "projector.safetensors"  # with spec.finetune.projectorFile


class FinetuneStage:
    name = StageName.FINETUNE
    inputs = (StageName.RELABEL,)

    def total_items(self, ctx: StageContext) -> int:
        return 0  # progress is reported in optimiser steps, once they are known

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        spec = ctx.spec.finetune
        model, processor = ctx.compromised_model()
        purified = load_dataset(ctx.input_dir(StageName.RELABEL) / DATASET_DIR, processor.image_size)
        data = EncodedInstances(processor, purified, ctx.decoding().gen_length)  # batch by batch
        config = TrainingConfig(epochs=spec.epochs, learning_rate=spec.learning_rate, batch_size=spec.batch_size,
                                warmup_ratio=spec.warmup_ratio, weight_decay=spec.weight_decay, seed=spec.seed,
                                trainable=spec.trainable)
        checkpoints = ctx.layout.checkpoint_dir(self.name)

        def on_step(step: int, total: int) -> None:
            if ctx.progress is not None:
                ctx.progress.total = total
            ctx.report_progress(step)

        # Training mutates the model in place; the cached compromised model must stay as it was
        # for any later stage of this process, so train a private copy.
        model = copy.deepcopy(model)
        result = train_masked_diffusion(model, data, processor.mask_token_id, config, description="finetune", show_progress=ctx.show_progress,
                                        checkpoint_dir=checkpoints, on_step=on_step)
        save_model(model.cpu(), processor, out / MODEL_DIR)
        if spec.projector_file:
            save_projector(model, out / PROJECTOR_FILE)
        return StageResult(items=len(purified), metrics={
            "steps": result.steps, "epochs": spec.epochs, "trainable": spec.trainable.value,
            "firstLoss": round(result.first_loss, 5), "lastLoss": round(result.last_loss, 5),
            "trainSeconds": round(result.seconds, 2)})
