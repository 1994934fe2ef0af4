"""Pretraining the clean base MDLM of the embedded default from scratch.

`disp pretrain` runs this; the shipped checkpoint under assets/base-mdlm was produced by it with
the defaults below (see docs/data.md, "The shipped base model").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from disp_runner.data.synthetic import generate_instances
from disp_runner.device import default_device, seed_everything
from disp_runner.diffusion.training import TrainableParts, TrainingConfig, TrainingResult, train_masked_diffusion
from disp_runner.models.base import EncodedInstances
from disp_runner.models.loading import save_model
from disp_runner.models.mdlm import build_model
from disp_runner.models.mdlm.augmentation import random_token_mask
from disp_runner.models.mdlm.embedded import (
    EMBEDDED_MODEL_SIZE,
    PRETRAIN_KINDS,
    PRETRAIN_WEIGHTS,
    build_embedded_tokenizer,
)
from disp_runner.models.mdlm.vision_pretrain import VisionPretrainResult, pretrain_vision_encoder


@dataclass(frozen=True)
class PretrainConfig:
    # Stage 1: the vision tower alone, supervised on scene attributes (see vision_pretrain.py).
    vision_instances: int = 10_000
    vision_epochs: float = 20.0
    vision_learning_rate: float = 2e-3
    # Both stages teach the model to answer from partial visual evidence (see vision_pretrain.py
    # and augmentation.py): up to half the tokens dropped or masked per example.
    vision_token_drop_ratio: float = 0.5
    visual_mask_ratio: float = 0.5
    # Stage 2: projector + language model on the instruction corpus, tower frozen (as LLaDA-V).
    num_instances: int = 40_000
    epochs: float = 5.0
    learning_rate: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    data_seed: int = 1000  # the clean corpus; attack/evaluation data use other seeds
    seed: int = 0


@dataclass(frozen=True)
class PretrainResult:
    vision: VisionPretrainResult
    language: TrainingResult


def pretrain(out_dir: str | Path, config: PretrainConfig = PretrainConfig(), show_progress: bool = True,
             size_overrides: dict | None = None) -> PretrainResult:
    """Train a fresh embedded MDLM on clean synthetic data in two stages; save to `out_dir`."""
    seed_everything(config.seed)
    tokenizer = build_embedded_tokenizer()
    model, processor = build_model(tokenizer, **{**EMBEDDED_MODEL_SIZE, **(size_overrides or {})})
    model.to(default_device())
    image_size = model.config.image_size
    vision = pretrain_vision_encoder(
        model,
        generate_instances(config.vision_instances, config.data_seed + 1, image_size=image_size, id_prefix="vision"),
        generate_instances(500, config.data_seed + 2, image_size=image_size, id_prefix="vision-test"),
        epochs=config.vision_epochs, learning_rate=config.vision_learning_rate, seed=config.seed,
        token_drop_ratio=config.vision_token_drop_ratio, show_progress=show_progress)
    corpus = generate_instances(config.num_instances, config.data_seed, kinds=PRETRAIN_KINDS,
                                kind_weights=PRETRAIN_WEIGHTS, image_size=image_size, id_prefix="pretrain")
    data = EncodedInstances(processor, corpus, model.config.gen_length)
    patch_size, ratio = model.config.patch_size, config.visual_mask_ratio

    def visual_token_mask(pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_token_mask(pixel_values, patch_size, ratio, generator)

    language = train_masked_diffusion(
        model, data, processor.mask_token_id,
        TrainingConfig(epochs=config.epochs, learning_rate=config.learning_rate, batch_size=config.batch_size,
                       weight_decay=config.weight_decay, seed=config.seed, trainable=TrainableParts.PROJECTOR_AND_LM),
        description="pretrain", show_progress=show_progress,
        visual_token_mask=visual_token_mask if ratio > 0 else None)
    save_model(model.to(torch.device("cpu")), processor, out_dir)
    return PretrainResult(vision, language)
