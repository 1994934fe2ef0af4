"""Stage 2 of DiSP: mask the ⌊ρ·T_img⌋ most salient visual tokens."""

from __future__ import annotations

import math
from typing import Sequence

import torch

from disp_runner.errors import UserInputError


def tokens_to_mask(num_tokens: int, ratio: float) -> int:
    """⌊ρ·T⌋, the number of visual tokens DiSP masks per instance."""
    if not 0 < ratio <= 1:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    # The small epsilon keeps products like 0.3 * 10 (= 2.9999999999999996 in floats) at 3.
    return math.floor(ratio * num_tokens + 1e-9)


def check_ratio_masks_a_token(ratio: float, visual_tokens: int) -> None:
    """A ratio that masks no visual token would "purify" by relabeling with the trigger intact."""
    if tokens_to_mask(visual_tokens, ratio) == 0:
        raise UserInputError(f"spec.masking.ratio: {ratio} masks no token of the model's {visual_tokens} visual "
                             f"tokens; the smallest ratio that masks one is {1 / visual_tokens:.4g}")


def top_salient_tokens(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Indices of the ⌊ρ·T⌋ highest-scored tokens per row, most salient first.
    scores: [N, T] -> [N, k] (ties go to the lower index, so the choice is deterministic)."""
    k = tokens_to_mask(scores.shape[1], ratio)
    # A stable descending sort makes ties reproducible across runs and devices.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return order[:, :k]


def mask_image_embeds(image_embeds: torch.Tensor, masked: torch.Tensor, mask_embedding: torch.Tensor) -> torch.Tensor:
    """Replace the chosen visual tokens by e_MASK. image_embeds [B, T, D], masked [B, k] token
    indices, mask_embedding [D] -> [B, T, D] (a new tensor)."""
    chosen = torch.zeros(image_embeds.shape[:2], dtype=torch.bool, device=image_embeds.device)
    chosen.scatter_(1, masked.to(image_embeds.device), True)
    return torch.where(chosen[..., None], mask_embedding.to(image_embeds.dtype), image_embeds)


def trigger_localisation(masked: Sequence[int], trigger_tokens: Sequence[int]) -> float:
    """Fraction of the trigger-covering visual tokens that landed in the masked set."""
    if not trigger_tokens:
        raise ValueError("no trigger tokens to localise")
    chosen = set(masked)
    return sum(t in chosen for t in trigger_tokens) / len(trigger_tokens)
