"""Stage 1 of DiSP: Fisher–Jacobian saliency of every visual token.

For visual token i with embedding e_i, masking it moves the input by δe_i = e_MASK − e_i. To
second order the KL divergence of the first-step output distribution moves by

    score_i = ½ · δe_iᵀ Jᵀ F J δe_i,     J = ∂z/∂e,  F = blockdiag_g(diag(p_g) − p_g p_gᵀ),

with z the logits of the first decoding block at the first generation step (response all
[MASK]) and p_g the softmax over the top-K logits of position g. Hutchinson's trick estimates it
for every token at once: draw q with Cov(q) = F, take one backward pass of s = ⟨q, z⟩, and
E[⟨∂s/∂e_i, δe_i⟩²] = δe_iᵀ Jᵀ F J δe_i. So the cost is 1 forward + m backward passes.

Region refinement (this project's addition, opt-in: `region_size` w ≥ 2). The quadratic form is the KL's
second-order expansion for masking ONE token. It misses a trigger that straddles several tokens
(any trigger not aligned to the token grid, the paper's own 20-pixel patch over 14-pixel patches
included): masking one of its tokens leaves the rest, the backdoor still fires, and a confident
(saturated) backdoor answer has almost no curvature to show. Measured on a 6x6 patch over the
object straddling 4 tokens: the 4 tokens ranked 22nd, 21st, 7th and 17th of 36 on average, and
masking the top 10 left the backdoor firing on 46% of triggered images, while masking exactly the
4 left 7%. So every w x w window of the token grid is also scored by the exact KL of masking it
as a whole, KL(p_g || p'_g) over the same top-K logits and positions, summed over g (the quantity
the quadratic form approximates), and a token's score is the largest of its own quadratic form
and the KL of any window containing it: both are "how far the first-step answer moves when this
is masked", in nats. Cost: (rows-w+1)·(cols-w+1) extra forward passes without gradients per batch.
It is not the default: in a clean image the window that moves the answer most is the object, so
the relabels of clean instances lose it more often and clean performance drops (docs/results.md,
"Triggers anywhere").
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from disp_api import ProbeDraws, SaliencySpec
from disp_runner.data.instances import Instance
from disp_runner.device import autocast, sub_seed
from disp_runner.disp.token_grid import window_masks
from disp_runner.models.base import DiffusionVLM, ModelInputs, Processor, VisualLayout


@dataclass(frozen=True)
class SaliencyConfig:
    top_k: int = 5  # softmax over the K largest logits per position (the authors' purification run)
    probes: int = 6  # Hutchinson probes m (4–8 is the usual range)
    block_length: int = 32  # G = min(block_length, gen_length) positions enter the KL
    region_size: int = 1  # w >= 2: w x w windows are scored exactly too (opt-in); 1 = the paper's scores
    shared_probes: bool = False  # every instance scored with the same probe draws (the authors' reseeding)

    @classmethod
    def from_spec(cls, spec: SaliencySpec, block_length: int) -> "SaliencyConfig":
        """spec.saliency's scoring settings; `block_length`: the decoding's (its first block is scored)."""
        return cls(top_k=spec.top_k, probes=spec.probes, block_length=block_length, region_size=spec.region_size,
                   shared_probes=spec.probe_draws is ProbeDraws.SHARED)

    def __post_init__(self) -> None:
        if self.region_size < 1:
            raise ValueError(f"region_size must be >= 1, got {self.region_size}")
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2 (a softmax over one logit has no curvature), got {self.top_k}")
        if self.probes < 1:
            raise ValueError(f"probes must be >= 1, got {self.probes}")
        if self.block_length < 1:
            raise ValueError(f"block_length must be >= 1, got {self.block_length}")


class GroupedDraws:
    """Standard normal draws for rows `lo`..`hi` of a run of `total` rows, each group of `group` rows
    drawn by a generator of its own (seeded with `seed` and the group's index) as one tensor, of
    which the rows asked for are kept: the same numbers whatever batch computes the rows, so a batch
    chosen for a device's memory never changes a result. A batch equal to the group draws exactly
    what one generator per batch drew."""

    def __init__(self, seed: int, group: int, lo: int, hi: int, total: int, device: torch.device | str):
        self.spans = []  # (generator, rows of its group, first and last+1 row wanted within the group)
        for index in range(lo // group, (hi - 1) // group + 1):
            start, stop = index * group, min((index + 1) * group, total)
            generator = torch.Generator(device=device).manual_seed(sub_seed(seed, index))
            self.spans.append((generator, stop - start, max(lo, start) - start, min(hi, stop) - start))

    def normal(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """[hi - lo, *shape[1:]] draws; each group's generator advances by its whole group."""
        return torch.cat([torch.randn((rows, *shape[1:]), generator=generator, dtype=dtype, device=device)[a:b]
                          for generator, rows, a, b in self.spans])


ProbeSource = torch.Generator | GroupedDraws  # one generator for the batch, or one per group of rows


def fisher_probe(p: torch.Tensor, source: ProbeSource, shared: bool = False) -> torch.Tensor:
    """A random q with Cov(q) = diag(p) − p pᵀ per row, from y ~ N(0, I): u = √p,
    q = u ⊙ (y − (y·u) u). p: [B, ..., K] (rows sum to 1) -> q: [B, ..., K]. `shared`: one draw of
    y for the first instance, used by every instance of the batch (from a generator)."""
    shape = (1, *p.shape[1:]) if shared else p.shape
    if isinstance(source, GroupedDraws):
        y = source.normal(shape, p.dtype, p.device).expand(p.shape)
    else:
        y = torch.randn(shape, generator=source, device=p.device, dtype=p.dtype).expand(p.shape)
    u = p.sqrt()
    return u * (y - (y * u).sum(dim=-1, keepdim=True) * u)


def first_step_block_logits(model: DiffusionVLM, batch: ModelInputs, image_embeds: torch.Tensor, gen_length: int,
                            block_length: int) -> torch.Tensor:
    """Logits [B, G, V] (at least fp32) of the first decoding block at the first generation step.
    `image_embeds` may hold n copies of the batch's rows ([n·B, T, D]); the batch is repeated to match."""
    copies = image_embeds.shape[0] // len(batch)
    first = batch.input_ids.shape[1] - gen_length
    block = model(input_ids=batch.input_ids.repeat(copies, 1), attention_mask=batch.attention_mask.repeat(copies, 1),
                  visual_spans=batch.visual_spans.repeat(copies, 1), image_embeds=image_embeds,
                  logits_at=slice(first, first + min(block_length, gen_length)))
    return block.to(torch.promote_types(block.dtype, torch.float32))  # bf16 on GPU -> fp32


def first_step_top_logits(
    model: DiffusionVLM, batch: ModelInputs, image_embeds: torch.Tensor, gen_length: int, top_k: int,
    block_length: int,
) -> torch.Tensor:
    """Top-K logits z [B, G, K] of the first decoding block at the first generation step, as a
    differentiable function of `image_embeds` [B, T, D]. `batch` holds prompts + gen_length [MASK]s."""
    block = first_step_block_logits(model, batch, image_embeds, gen_length, block_length)
    top = torch.topk(block.detach(), top_k, dim=-1).indices  # [B, G, K] which logits enter the softmax
    return torch.gather(block, -1, top)  # [B, G, K]


@torch.no_grad()
def region_kl_scores(
    model: DiffusionVLM,
    batch: ModelInputs,
    gen_length: int,
    config: SaliencyConfig,
    layouts: Sequence[VisualLayout],
    max_rows_per_pass: int = 256,
) -> torch.Tensor:
    """Per token, the largest exact KL(p || p') of masking a whole w x w window containing it, with p
    the top-K softmax of the first decoding block (K indices fixed by the unmasked pass), summed over
    positions: [B, T] float64 (0 beyond a row's visual tokens and for tokens in no window). `layouts`:
    each row's visual layout; rows that share one are scored together, in passes of at most
    `max_rows_per_pass` rows."""
    model.eval()
    image_embeds = model.embed_images(batch.pixel_values, batch.image_sizes)  # [B, T, D]
    b, t, _ = image_embeds.shape
    for row, (layout, count) in enumerate(zip(layouts, batch.visual_spans[:, 1].tolist(), strict=True)):
        if layout.num_tokens != count:
            raise ValueError(f"row {row}: a layout of {layout.num_tokens} visual tokens does not match its {count}")
    block = first_step_block_logits(model, batch, image_embeds, gen_length, config.block_length)
    top = torch.topk(block, config.top_k, dim=-1).indices  # [B, G, K]
    log_p = torch.log_softmax(torch.gather(block, -1, top).double(), dim=-1)  # [B, G, K]
    mask_embedding = model.mask_embedding().to(image_embeds.dtype)
    scores = torch.zeros(b, t, dtype=torch.float64, device=image_embeds.device)
    groups: dict[VisualLayout, list[int]] = {}
    for row, layout in enumerate(layouts):
        groups.setdefault(layout, []).append(row)
    for layout, rows in groups.items():
        # [W, T]: the layout's windows, none reaching past its own tokens into the batch's padding.
        windows = F.pad(window_masks(layout, config.region_size), (0, t - layout.num_tokens)).to(image_embeds.device)
        index = torch.tensor(rows, device=image_embeds.device)
        group, embeds, group_log_p = batch.select(index), image_embeds[index], log_p[index]
        g = len(rows)
        per_pass = max(1, max_rows_per_pass // g)
        for lo in range(0, len(windows), per_pass):
            chunk = windows[lo:lo + per_pass]  # [n, T]
            n = len(chunk)
            # Row (window j, instance i) sits at j * g + i.
            masked = torch.where(chunk[:, None, :, None], mask_embedding, embeds[None]).reshape(n * g, t, -1)
            logits = first_step_block_logits(model, group, masked, gen_length, config.block_length)
            log_q = torch.log_softmax(torch.gather(logits, -1, top[index].repeat(n, 1, 1)).double(), dim=-1)
            kl = (group_log_p.exp().repeat(n, 1, 1) * (group_log_p.repeat(n, 1, 1) - log_q)).sum(dim=(-1, -2))
            for window, window_kl in zip(chunk, kl.reshape(n, g)):
                scores[index] = torch.where(window[None, :], torch.maximum(scores[index], window_kl[:, None]),
                                            scores[index])
    return scores


def fisher_jacobian_scores(
    model: DiffusionVLM,
    batch: ModelInputs,
    gen_length: int,
    config: SaliencyConfig,
    generator: ProbeSource,
) -> torch.Tensor:
    """Hutchinson estimate of ½ δeᵀJᵀFJδe for every visual token of every instance: [B, T] float64.

    `batch` must hold each prompt followed by `gen_length` [MASK]s (`with_response=False`)."""
    if config.top_k > model.config.vocab_size:
        raise ValueError(f"top_k {config.top_k} exceeds the vocabulary size {model.config.vocab_size}")
    model.eval()
    with torch.no_grad():
        image_embeds = model.embed_images(batch.pixel_values, batch.image_sizes)  # [B, T, D]
        delta = (model.mask_embedding()[None, None, :] - image_embeds).double()  # δe_i: [B, T, D]
    image_embeds = image_embeds.detach().requires_grad_(True)
    with frozen_weights(model):
        z = first_step_top_logits(model, batch, image_embeds, gen_length, config.top_k, config.block_length)
    p = torch.softmax(z.detach().double(), dim=-1)  # [B, G, K]
    squared = torch.zeros(image_embeds.shape[:2], dtype=torch.float64, device=image_embeds.device)  # [B, T]
    for j in range(config.probes):
        q = fisher_probe(p, generator, config.shared_probes).to(z.dtype)  # [B, G, K]
        # Rows are independent, so one backward of the batch sum gives every row its own ∂s/∂e.
        s = (q * z).sum()
        (grad,) = torch.autograd.grad(s, image_embeds, retain_graph=j + 1 < config.probes)  # [B, T, D]
        directional = (grad.double() * delta).sum(dim=-1)  # ⟨∂s_j/∂e_i, δe_i⟩: [B, T]
        squared += directional.square()
    return 0.5 * squared / config.probes


@contextlib.contextmanager
def frozen_weights(model: DiffusionVLM) -> Iterator[None]:
    """No weight requires a gradient inside (each one's own setting back after): the gradient goes to
    the visual tokens only, and a weight that required one would make autograd keep the input of
    every linear layer for a weight gradient nobody asks for (LLaDA-V 8B: 2.3 GiB more for each
    row of 1,485 visual tokens, measured on an H100)."""
    settings = [(p, p.requires_grad) for p in model.parameters()]
    for parameter, _ in settings:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, setting in settings:
            parameter.requires_grad_(setting)


def token_saliency(
    model: DiffusionVLM,
    batch: ModelInputs,
    gen_length: int,
    config: SaliencyConfig,
    generator: ProbeSource,
    layouts: Sequence[VisualLayout],
) -> torch.Tensor:
    """The score DiSP masks by: the Fisher–Jacobian quadratic form of each visual token, raised to
    the exact KL of masking any w x w window containing it when `config.region_size` > 1. [B, T];
    `layouts`: each row's visual layout."""
    scores = fisher_jacobian_scores(model, batch, gen_length, config, generator)
    if config.region_size > 1:
        scores = torch.maximum(scores, region_kl_scores(model, batch, gen_length, config, layouts))
    return scores


def score_instances(
    model: DiffusionVLM,
    processor: Processor,
    instances: Sequence[Instance],
    gen_length: int,
    config: SaliencyConfig,
    seed: int,
    batch_size: int,
    rows: range | None = None,
    on_batch: Callable[[int], None] | None = None,
    seed_group: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """token_saliency over `instances[rows]` (default: all) in batches of `batch_size`: scores
    [len(rows), T] float64 (row i's first counts[i] columns; T = the widest image of all
    `instances`, so the rows of any split concatenate) and counts, the visual tokens of every
    instance [len(instances)]. Probes are drawn per group of `seed_group` instances (default: the
    batch), each seeded with `seed` and the group's index (GroupedDraws), so a shard of whole groups,
    or a batch of any size, scores exactly what the whole run does; with `config.shared_probes`,
    every batch is seeded with `seed` itself, so every instance gets the same draws (the authors'
    code reseeds before each instance). `on_batch(done)` after each batch."""
    rows = range(len(instances)) if rows is None else rows
    device = model.device
    layouts = [processor.layout_of(inst) for inst in instances]
    counts = torch.tensor([layout.num_tokens for layout in layouts], dtype=torch.long)
    scores = torch.zeros(len(rows), int(counts.max()) if len(counts) else 0, dtype=torch.float64)
    for lo in range(rows.start, rows.stop, batch_size):
        hi = min(lo + batch_size, rows.stop)
        batch = processor.encode(instances[lo:hi], gen_length, with_response=False)
        if config.shared_probes:
            generator: ProbeSource = torch.Generator(device=device).manual_seed(seed)
        else:
            generator = GroupedDraws(seed, seed_group or batch_size, lo, hi, len(instances), device)
        with autocast(device):
            part = token_saliency(model, batch.to(device), gen_length, config, generator, layouts[lo:hi]).cpu()
        for row, count in enumerate(batch.visual_spans[:, 1].tolist()):  # beyond a row's tokens stays 0
            scores[lo - rows.start + row, :count] = part[row, :count]
        if on_batch is not None:
            on_batch(hi - rows.start)
    return scores, counts
