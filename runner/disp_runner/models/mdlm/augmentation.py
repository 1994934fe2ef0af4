"""Visual-token masking augmentation of the embedded model's pretraining: the model learns to answer
from partial visual evidence, as DiSP's relabeling will ask it to (it masks 30% of the tokens)."""

from __future__ import annotations

import torch


def patch_detail(pixel_values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """How much each patch varies (pixel std): [B, C, H, W] -> [B, T], row-major like the tokens."""
    b, c, _, _ = pixel_values.shape
    patches = pixel_values.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)  # [B,C,h,w,p,p]
    return patches.reshape(b, c, -1, patch_size * patch_size).std(dim=-1).mean(dim=1)


def random_token_mask(pixel_values: torch.Tensor, patch_size: int, max_ratio: float,
                      generator: torch.Generator) -> torch.Tensor:
    """[B, T] bool, the visual tokens to mask: each row masks ⌊r·T⌋ tokens, r ~ U(0, max_ratio).
    Half the rows pick them at random; the other half take the most detailed patches first (objects
    and edges, where saliency concentrates), so the model learns to answer when the very tokens
    DiSP would mask are gone."""
    detail = patch_detail(pixel_values.float(), patch_size)
    b, t = detail.shape
    device = detail.device
    noise = torch.rand(b, t, generator=generator, device=device)
    detail_first = torch.rand(b, 1, generator=generator, device=device) < 0.5
    priority = torch.where(detail_first, detail / detail.amax(dim=1, keepdim=True).clamp_min(1e-6) + 0.1 * noise, noise)
    count = (torch.rand(b, 1, generator=generator, device=device) * max_ratio * t).floor()  # [B, 1]
    rank = torch.argsort(torch.argsort(priority, dim=1, descending=True), dim=1)  # rank of every token
    return rank < count
