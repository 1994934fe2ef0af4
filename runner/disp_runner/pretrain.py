"""Pretraining the clean base MDLM of the embedded default from scratch.

`disp pretrain` runs this; the shipped checkpoint under assets/base-mdlm was produced by it with
the defaults below (see README.md, "The shipped base model").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from disp_runner.checkpoints import build_model, save_checkpoint
from disp_runner.data.synthetic import generate_instances
from disp_runner.device import default_device, seed_everything
from disp_runner.embedded import (
    EMBEDDED_MODEL_SIZE,
    PRETRAIN_KINDS,
    PRETRAIN_WEIGHTS,
    build_embedded_tokenizer,
)
from disp_runner.processing import encode_instances
from disp_runner.training import TrainableParts, TrainingConfig, TrainingResult, train_masked_diffusion


@dataclass(frozen=True)
class PretrainConfig:
    num_instances: int = 40_000
    epochs: float = 6.0
    learning_rate: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.01
    data_seed: int = 1000  # the clean corpus; attack/evaluation data use other seeds
    seed: int = 0


def pretrain(out_dir: str | Path, config: PretrainConfig = PretrainConfig(), show_progress: bool = True,
             size_overrides: dict | None = None) -> TrainingResult:
    """Train all weights of a fresh embedded MDLM on clean synthetic data; save to `out_dir`."""
    seed_everything(config.seed)
    tokenizer = build_embedded_tokenizer()
    model = build_model(tokenizer, **{**EMBEDDED_MODEL_SIZE, **(size_overrides or {})}).to(default_device())
    corpus = generate_instances(config.num_instances, config.data_seed, kinds=PRETRAIN_KINDS,
                                kind_weights=PRETRAIN_WEIGHTS, image_size=model.config.image_size,
                                id_prefix="pretrain")
    data = encode_instances(tokenizer, model.config, corpus, model.config.gen_length)
    result = train_masked_diffusion(
        model, data,
        TrainingConfig(epochs=config.epochs, learning_rate=config.learning_rate, batch_size=config.batch_size,
                       weight_decay=config.weight_decay, seed=config.seed, trainable=TrainableParts.ALL),
        description="pretrain", show_progress=show_progress)
    save_checkpoint(model.to(torch.device("cpu")), tokenizer, out_dir)
    return result
