"""Stage 1 of DiSP: Fisher–Jacobian saliency of every visual token (disp-method.md "Stage 1").

For visual token i with embedding e_i, masking it moves the input by δe_i = e_MASK − e_i. To
second order the KL divergence of the first-step output distribution moves by

    score_i = ½ · δe_iᵀ Jᵀ F J δe_i,     J = ∂z/∂e,  F = blockdiag_g(diag(p_g) − p_g p_gᵀ),

with z the logits of the first decoding block at the first generation step (response all
[MASK]) and p_g the softmax over the top-K logits of position g. Hutchinson's trick estimates it
for every token at once: draw q with Cov(q) = F, take one backward pass of s = ⟨q, z⟩, and
E[⟨∂s/∂e_i, δe_i⟩²] = δe_iᵀ Jᵀ F J δe_i. So the cost is 1 forward + m backward passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from disp_runner.modeling import MDLMForMaskedDiffusion
from disp_runner.processing import EncodedBatch


@dataclass(frozen=True)
class SaliencyConfig:
    top_k: int = 5  # softmax over the K largest logits per position (the authors' purification run)
    probes: int = 6  # Hutchinson probes m (4–8 is the usual range)
    block_length: int = 32  # G = min(block_length, gen_length) positions enter the KL

    def __post_init__(self) -> None:
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2 (a softmax over one logit has no curvature), got {self.top_k}")
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")


def fisher_probe(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random q with Cov(q) = diag(p) − p pᵀ per row, from y ~ N(0, I): u = √p,
    q = u ⊙ (y − (y·u) u). p: [..., K] (rows sum to 1) -> q: [..., K]."""
    y = torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype)
    u = p.sqrt()
    return u * (y - (y * u).sum(dim=-1, keepdim=True) * u)


def first_step_top_logits(
    model: MDLMForMaskedDiffusion, batch: EncodedBatch, image_embeds: torch.Tensor, gen_length: int, top_k: int,
    block_length: int,
) -> torch.Tensor:
    """Top-K logits z [B, G, K] of the first decoding block at the first generation step, as a
    differentiable function of `image_embeds` [B, T, D]. `batch` holds prompts + gen_length [MASK]s."""
    logits = model(input_ids=batch.input_ids, image_embeds=image_embeds, attention_mask=batch.attention_mask)
    first = logits.shape[1] - gen_length
    g = min(block_length, gen_length)
    block = logits[:, first:first + g]
    block = block.to(torch.promote_types(block.dtype, torch.float32))  # [B, G, V], at least fp32 (bf16 on GPU)
    top = torch.topk(block.detach(), top_k, dim=-1).indices  # [B, G, K] which logits enter the softmax
    return torch.gather(block, -1, top)  # [B, G, K]


def fisher_jacobian_scores(
    model: MDLMForMaskedDiffusion,
    batch: EncodedBatch,
    gen_length: int,
    config: SaliencyConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Hutchinson estimate of ½ δeᵀJᵀFJδe for every visual token of every instance: [B, T] float64.

    `batch` must hold each prompt followed by `gen_length` [MASK]s (`with_response=False`)."""
    if config.top_k > model.config.vocab_size:
        raise ValueError(f"top_k {config.top_k} exceeds the vocabulary size {model.config.vocab_size}")
    model.eval()
    with torch.no_grad():
        image_embeds = model.embed_images(batch.pixel_values)  # [B, T, D]
        delta = (model.mask_embedding()[None, None, :] - image_embeds).double()  # δe_i: [B, T, D]
    image_embeds = image_embeds.detach().requires_grad_(True)
    z = first_step_top_logits(model, batch, image_embeds, gen_length, config.top_k, config.block_length)
    p = torch.softmax(z.detach().double(), dim=-1)  # [B, G, K]
    squared = torch.zeros(image_embeds.shape[:2], dtype=torch.float64, device=image_embeds.device)  # [B, T]
    for j in range(config.probes):
        q = fisher_probe(p, generator).to(z.dtype)  # [B, G, K]
        # Rows are independent, so one backward of the batch sum gives every row its own ∂s/∂e.
        s = (q * z).sum()
        (grad,) = torch.autograd.grad(s, image_embeds, retain_graph=j + 1 < config.probes)  # [B, T, D]
        directional = (grad.double() * delta).sum(dim=-1)  # ⟨∂s_j/∂e_i, δe_i⟩: [B, T]
        squared += directional.square()
    return 0.5 * squared / config.probes
