"""Where tensors live and in which precision: CUDA with bf16 autocast when present, else CPU fp32."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the authors train in bf16); full precision on CPU, where bf16 is slow."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


def sub_seed(seed: int, index: int) -> int:
    """The seed of the index-th independent stream (a batch, an epoch) under a user's seed, so that
    any one of them can be regenerated alone: a shard decodes exactly what the full run does, a
    resumed fine-tune replays exactly the epochs it skipped."""
    return seed * 1_000_003 + index
