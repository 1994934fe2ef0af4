"""One training loop for every fine-tune in the project (pretraining, backdoor injection, DiSP's
repair): the masked-diffusion loss, AdamW, cosine schedule with warmup, and `accelerate` so the
same code runs on one CPU, one GPU or several GPUs (bf16 on GPU)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from enum import Enum

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from disp_runner.diffusion import add_mask_noise, masked_diffusion_loss
from disp_runner.modeling import MDLMForMaskedDiffusion
from disp_runner.processing import EncodedBatch


class TrainableParts(str, Enum):
    """Which weights a fine-tune updates."""

    PROJECTOR = "projector"  # the paper's choice for both backdoor injection and DiSP repair
    PROJECTOR_AND_LM = "projector-and-lm"  # everything but the (frozen) vision encoder
    ALL = "all"


@dataclass(frozen=True)
class TrainingConfig:
    epochs: float = 4.0
    learning_rate: float = 1e-4
    batch_size: int = 32
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    trainable: TrainableParts = TrainableParts.PROJECTOR
    # The projector may learn at its own rate when more than it is trained (LLaVA's mm_projector_lr).
    projector_learning_rate: float | None = None

    def __post_init__(self) -> None:
        if self.epochs <= 0 or self.learning_rate <= 0 or self.batch_size <= 0:
            raise ValueError("epochs, learning_rate and batch_size must be positive")
        if self.projector_learning_rate is not None and self.projector_learning_rate <= 0:
            raise ValueError("projector_learning_rate must be positive")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError("warmup_ratio must be in [0, 1)")


@dataclass
class TrainingResult:
    steps: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    @property
    def first_loss(self) -> float:
        window = self.losses[: max(1, len(self.losses) // 10)]
        return sum(window) / len(window)

    @property
    def last_loss(self) -> float:
        window = self.losses[-max(1, len(self.losses) // 10):]
        return sum(window) / len(window)


def select_trainable(model: MDLMForMaskedDiffusion, parts: TrainableParts) -> list[torch.nn.Parameter]:
    """Freeze everything but `parts`; returns the parameters left trainable."""
    for p in model.parameters():
        p.requires_grad_(parts is not TrainableParts.PROJECTOR)
    if parts is TrainableParts.PROJECTOR_AND_LM:
        for p in model.vision_encoder.parameters():
            p.requires_grad_(False)
    for p in model.projector.parameters():
        p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def train_masked_diffusion(
    model: MDLMForMaskedDiffusion,
    data: EncodedBatch,
    config: TrainingConfig,
    description: str = "train",
    show_progress: bool = True,
) -> TrainingResult:
    """Fine-tune `model` in place on `data` with the LLaDA SFT objective."""
    accelerator = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    params = select_trainable(model, config.trainable)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(
        TensorDataset(data.input_ids, data.attention_mask, data.pixel_values, data.response_mask),
        batch_size=config.batch_size, shuffle=True, generator=generator, drop_last=False)
    projector_ids = {id(p) for p in model.projector.parameters()}
    projector_lr = config.projector_learning_rate or config.learning_rate
    groups = [{"params": [p for p in params if id(p) in projector_ids], "lr": projector_lr},
              {"params": [p for p in params if id(p) not in projector_ids], "lr": config.learning_rate}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(data) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)
    model.train()
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    noise_generator = torch.Generator(device=accelerator.device).manual_seed(config.seed + 1)
    mask_id = accelerator.unwrap_model(model).config.mask_token_id
    result = TrainingResult(steps=0, seconds=0.0)
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc=description, disable=not show_progress or not accelerator.is_main_process,
               leave=False, mininterval=1.0)
    while result.steps < total_steps:
        for input_ids, attention_mask, pixel_values, response_mask in loader:
            noised = add_mask_noise(input_ids, response_mask, mask_id, noise_generator)
            with accelerator.autocast():
                logits = model(input_ids=noised.noisy_ids, pixel_values=pixel_values, attention_mask=attention_mask)
            loss = masked_diffusion_loss(logits, input_ids, noised, response_mask)
            accelerator.backward(loss)
            if config.max_grad_norm:
                accelerator.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(float(loss.detach()))
            result.steps += 1
            bar.update(1)
            bar.set_postfix(loss=f"{result.losses[-1]:.3f}", refresh=False)
            if result.steps >= total_steps:
                break
    bar.close()
    # accelerate wraps (never copies) the module, so the caller's object is the one trained.
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result
