"""The masked-diffusion training objective: LLaDA's forward (noising) process and SFT loss.

Pure tensor functions over the response block of a batch; they know nothing about any model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# LLaDA's floor on the mask probability, so that p never reaches 0 and 1/p stays bounded.
MASK_EPSILON = 1e-3


@dataclass(frozen=True)
class NoisedBatch:
    noisy_ids: torch.Tensor  # [B, L] input with masked response positions set to [MASK]
    masked: torch.Tensor  # [B, L] bool, which positions were masked (response positions only)
    mask_prob: torch.Tensor  # [B] p = (1 - eps) t + eps per sample


def add_mask_noise(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    generator: torch.Generator | None = None,
    eps: float = MASK_EPSILON,
    rows_of: tuple[int, torch.Tensor] | None = None,
) -> NoisedBatch:
    """Forward process: per sample t ~ U(0,1), mask each *response* token with p = (1-eps)t + eps.

    Prompt and image positions are never masked. With `rows_of` = (batch size, positions), the
    inputs are those rows of a larger batch and get the noise drawn for them in that batch, so a
    process training on part of a batch noises it exactly as a one-process run does.
    """
    b, l = input_ids.shape
    total, positions = rows_of if rows_of is not None else (b, None)
    t = torch.rand(total, generator=generator, device=input_ids.device)
    draws = torch.rand(total, l, generator=generator, device=input_ids.device)
    if positions is not None:
        positions = positions.to(input_ids.device)
        t, draws = t[positions], draws[positions]
    p = (1.0 - eps) * t + eps  # [B]
    masked = (draws < p[:, None]) & response_mask
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return NoisedBatch(noisy, masked, p)


def response_window(response_mask: torch.Tensor) -> slice:
    """The columns from the first that holds a response token of any row to the end: the only
    positions whose logits the loss reads (rows are left-padded, the response block is last)."""
    columns = response_mask.any(dim=0).nonzero()
    return slice(int(columns[0]) if len(columns) else response_mask.shape[1], None)


def masked_diffusion_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    noised: NoisedBatch,
    response_mask: torch.Tensor,
    window: slice = slice(None),
) -> torch.Tensor:
    """LLaDA SFT loss: sum over masked positions of CE / p, divided by the response length, batch mean.

    target_ids [B, L] (clean tokens), response_mask [B, L]; logits [B, W, V] of the columns
    `window` (by default all L), which must hold every response position (`response_window`).
    """
    ce = F.cross_entropy(logits.float().transpose(1, 2), target_ids[:, window], reduction="none")  # [B, W]
    weighted = (ce * noised.masked[:, window]) / noised.mask_prob[:, None]
    response_len = response_mask.sum(dim=1).clamp(min=1)  # [B]
    return (weighted.sum(dim=1) / response_len).mean()
