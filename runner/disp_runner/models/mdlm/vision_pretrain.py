"""Stage 1 of pretraining: the vision encoder alone, supervised on scene attributes.

LLaDA-V starts from a pretrained, frozen SigLIP tower; the embedded model gets the same kind of
start from a tower trained here to recognise what the synthetic scenes contain (class, colour,
count, and which patches an object covers). The attribute heads are thrown away afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from disp_runner.data.instances import Instance
from disp_runner.data.vocabulary import CLASSES, COLOURS
from disp_runner.models.mdlm.modeling import MDLMForMaskedDiffusion
from disp_runner.models.base import images_to_tensor
from disp_runner.models.mdlm.augmentation import random_token_mask

_CLASS_INDEX = {name: i for i, name in enumerate(CLASSES)}
_COLOUR_INDEX = {name: i for i, name in enumerate(COLOURS)}
MAX_COUNT = 3
LAYOUT_CELLS = 9


class AttributeHeads(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.class_head = nn.Linear(width, len(CLASSES))
        self.colour_head = nn.Linear(width, len(COLOURS))
        self.count_head = nn.Linear(width, MAX_COUNT)
        self.occupancy_head = nn.Linear(width, 1)
        # Which cells of the 3x3 layout grid hold an object, read from the pooled features: forces
        # the features to say *where* things are, as a general-purpose tower's do.
        self.cells_head = nn.Linear(width, LAYOUT_CELLS)

    def forward(self, features: torch.Tensor, keep: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """`keep` [B, T] (1 = pool this token) lets training pool over a subset of the tokens."""
        if keep is None:
            pooled = features.mean(dim=1)  # [B, T, Dv] -> [B, Dv]
        else:
            weights = keep.to(features.dtype)[..., None]  # [B, T, 1]
            pooled = (features * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
        return {"class": self.class_head(pooled), "colour": self.colour_head(pooled),
                "count": self.count_head(pooled), "occupancy": self.occupancy_head(features).squeeze(-1),
                "cells": self.cells_head(pooled)}


def scene_labels(instances: Sequence[Instance]) -> dict[str, torch.Tensor]:
    """Class, colour and count targets from the instance metadata."""
    return {
        "class": torch.tensor([_CLASS_INDEX[i.metadata["class"]] for i in instances]),
        "colour": torch.tensor([_COLOUR_INDEX[i.metadata["colour"]] for i in instances]),
        "count": torch.tensor([int(i.metadata["count"]) - 1 for i in instances]),
    }


def occupancy_targets(pixels: torch.Tensor, window: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/window)^2]: 1 where a window holds object pixels (saturated colour)."""
    saturation = pixels.max(dim=1).values - pixels.min(dim=1).values  # [B, H, W]
    object_pixels = (saturation > 0.35).float()[:, None]
    return (F.avg_pool2d(object_pixels, window).flatten(1) > 0.05).float()


@dataclass(frozen=True)
class VisionPretrainResult:
    steps: int
    seconds: float
    accuracy: dict[str, float]


def pretrain_vision_encoder(model: MDLMForMaskedDiffusion, train: Sequence[Instance], held_out: Sequence[Instance],
                            epochs: float = 3.0, learning_rate: float = 2e-3, batch_size: int = 128, seed: int = 0,
                            token_drop_ratio: float = 0.5, show_progress: bool = True) -> VisionPretrainResult:
    torch.manual_seed(seed)
    device = model.device
    encoder = model.vision_encoder
    heads = AttributeHeads(model.config.vision_hidden_size).to(device)
    pixels = images_to_tensor(train, model.config.image_size)
    labels = scene_labels(train)
    occupancy = occupancy_targets(pixels, model.config.patch_size)
    cells = occupancy_targets(pixels, model.config.image_size // 3)
    params = list(encoder.parameters()) + list(heads.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.01)
    steps_per_epoch = (len(train) + batch_size - 1) // batch_size
    total = max(1, int(epochs * steps_per_epoch))
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, total // 30), total)
    generator = torch.Generator().manual_seed(seed)
    drop_generator = torch.Generator(device=device).manual_seed(seed + 1)
    start = time.perf_counter()
    encoder.train()
    step = 0
    with tqdm(total=total, desc="pretrain vision", leave=False, disable=not show_progress, mininterval=1.0) as bar:
        while step < total:
            for idx in torch.randperm(len(train), generator=generator).split(batch_size):
                batch_pixels = pixels[idx].to(device)
                # Scene attributes are read from a random subset of the tokens that often leaves out
                # the object's own patches: the tower learns to spread what it sees over all tokens,
                # as large towers do, so masking a few tokens (DiSP) does not blind the model.
                keep = ~random_token_mask(batch_pixels, model.config.patch_size, token_drop_ratio, drop_generator)
                out = heads(encoder(batch_pixels), keep)
                loss = sum(F.cross_entropy(out[k], labels[k][idx].to(device)) for k in ("class", "colour", "count"))
                loss = loss + F.binary_cross_entropy_with_logits(out["occupancy"], occupancy[idx].to(device))
                loss = loss + F.binary_cross_entropy_with_logits(out["cells"], cells[idx].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                step += 1
                bar.update(1)
                if step >= total:
                    break
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        test_pixels = images_to_tensor(held_out, model.config.image_size)
        out = heads(encoder(test_pixels.to(device)))
        test_labels = scene_labels(held_out)
        accuracy = {k: float((out[k].argmax(-1).cpu() == test_labels[k]).float().mean()) for k in test_labels}
        occ = occupancy_targets(test_pixels, model.config.patch_size)
        accuracy["occupancy"] = float(((out["occupancy"].cpu() > 0) == (occ > 0.5)).float().mean())
        layout = occupancy_targets(test_pixels, model.config.image_size // 3)
        accuracy["cells"] = float(((out["cells"].cpu() > 0) == (layout > 0.5)).float().mean())  # per cell
    return VisionPretrainResult(step, time.perf_counter() - start, accuracy)
