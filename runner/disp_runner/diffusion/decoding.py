"""Semi-autoregressive low-confidence-remasking decoding, as LLaDA and LLaDA-V decode.

Pure tensor functions; the model is passed in as a callable so the same code serves any family.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch

from disp_api import DecodingCache, DecodingSpec
from disp_api.spec import decoding_problem
from disp_runner.errors import UserInputError


def transfer_schedule(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens to un-mask at each step: the block's masked tokens split evenly over
    `steps`, the remainder going to the first steps (LLaDA). [B] -> [B, steps]."""
    base = num_masked // steps
    remainder = num_masked % steps
    schedule = base[:, None].repeat(1, steps)
    schedule += (torch.arange(steps, device=num_masked.device)[None, :] < remainder[:, None]).long()
    return schedule


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """Temperature 0 is argmax; otherwise Gumbel-max sampling in float64 (low precision biases it)."""
    if temperature == 0:
        return logits
    logits = logits.double()
    noise = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float64)
    gumbel = (-torch.log(noise.clamp_min(1e-20))) ** temperature
    return logits.exp() / gumbel


@dataclass(frozen=True)
class DecodingConfig:
    """Diffusion decoding settings; defaults are the authors' (steps = gen = block = 32, argmax)."""

    steps: int = 32
    gen_length: int = 32
    block_length: int = 32
    temperature: float = 0.0
    cache: DecodingCache = DecodingCache.NONE
    cache_refresh_steps: int | None = None  # None: the cache is computed once per block
    stop_at_end: bool = False  # the authors' stop rule (DecodingSpec.stop_at_end)

    def __post_init__(self) -> None:
        # The spec's rules (disp_api.decoding_problem), on the settings with the model's defaults
        # filled in; the bounds the spec's fields carry, for configurations built in code.
        if min(self.gen_length, self.steps, self.block_length, self.cache_refresh_steps or 1) <= 0 or self.temperature < 0:
            raise ValueError("steps, genLength, blockLength and cacheRefreshSteps must be positive, temperature >= 0")
        problem = decoding_problem(self.gen_length, self.block_length, self.steps, self.cache is not DecodingCache.NONE,
                                   self.cache_refresh_steps)
        if problem:
            raise ValueError(problem)

    @classmethod
    def for_model(cls, spec: DecodingSpec, model_gen_length: int | None, field: str) -> "DecodingConfig":
        """The decoding a PurificationJob asks for (`field`: spec.relabel.decoding or
        spec.evaluation.decoding), what it leaves out taken from the model: its own generation
        length (else the authors' 32), one block, one step per position."""
        gen_length = spec.gen_length or model_gen_length or cls.gen_length
        block_length = spec.block_length or gen_length
        steps = spec.steps or gen_length
        try:
            return cls(steps=steps, gen_length=gen_length, block_length=block_length, temperature=spec.temperature,
                       cache=spec.cache, cache_refresh_steps=spec.cache_refresh_steps, stop_at_end=spec.stop_at_end)
        except ValueError as exc:
            raise UserInputError(f"{field}: {exc} (with what the manifest leaves out taken from the model: "
                                 f"genLength {gen_length}, blockLength {block_length}, steps {steps})") from None

    @classmethod
    def single_block(cls, gen_length: int | None) -> "DecodingConfig":
        """The authors' proportions at another length (None: theirs, 32): steps = gen_length =
        block_length, argmax."""
        gen_length = gen_length or cls.gen_length
        return cls(steps=gen_length, gen_length=gen_length, block_length=gen_length)

    @property
    def steps_per_block(self) -> int:
        return self.steps // (self.gen_length // self.block_length)


LogitsFn = Callable[[torch.Tensor], torch.Tensor]  # ids [B, L] -> logits [B, L, V]


class Denoiser(Protocol):
    """What a decoding step asks the model: the logits of the current block's positions."""

    def block_logits(self, ids: torch.Tensor, block: slice, step: int) -> torch.Tensor:
        """Logits [B, block length, V] of `block`'s positions of `ids` [B, L]; `step` counts the
        steps within the block from 0 (a cache refreshes itself on the steps it chooses)."""


@dataclass(frozen=True)
class ExactDenoiser:
    """Exact decoding: every step a full forward pass over the whole sequence."""

    logits_fn: LogitsFn

    def block_logits(self, ids: torch.Tensor, block: slice, step: int) -> torch.Tensor:
        return self.logits_fn(ids)[:, block]


@torch.no_grad()
def diffusion_generate(
    denoiser: Denoiser | LogitsFn,
    input_ids: torch.Tensor,
    mask_token_id: int,
    decoding: DecodingConfig,
    generator: torch.Generator | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    never_generate: Sequence[int] = (),
    end_ids: Sequence[int] = (),
) -> torch.Tensor:
    """Fill the last `gen_length` positions of `input_ids` (all [MASK]) by low-confidence remasking.

    Semi-autoregressive: blocks of `block_length` left to right, `steps_per_block` steps each; at
    every step all masked positions are predicted and the k most confident of the current block
    are kept. Returns the generated response ids [B, gen_length]. `on_step(step, ids)` observes.
    `denoiser` gives the block's logits (a plain function of the ids returning every position's
    logits decodes exactly).
    `never_generate` are ids no position may take (the [MASK] itself, image placeholders): their
    logits are -inf before argmax or sampling, as the authors' decoder does for its special ids.
    With `decoding.stop_at_end`, once a row commits one of `end_ids`, only its positions before the
    first such marker are unmasked (the step's count still comes from the block's schedule), its
    positions after it stay [MASK], and decoding ends when every row's positions before its marker
    are filled: the authors' stopping rule.
    """
    if not hasattr(denoiser, "block_logits"):
        denoiser = ExactDenoiser(denoiser)
    ids = input_ids.clone()
    b, l = ids.shape
    g = decoding.gen_length
    start = l - g
    if not bool((ids[:, start:] == mask_token_id).all()):
        raise ValueError("the last gen_length positions of input_ids must all be [MASK]")
    stopping = decoding.stop_at_end and len(end_ids) > 0
    ends = torch.tensor(sorted(end_ids), device=ids.device, dtype=ids.dtype)
    stop = torch.full((b,), g, dtype=torch.long, device=ids.device)  # each row's first end marker (g: none yet)
    step_index = 0
    for block in range(g // decoding.block_length):
        lo = start + block * decoding.block_length
        hi = lo + decoding.block_length
        if stopping and bool((stop <= lo - start).all()):
            break  # every row ended before this block
        schedule = transfer_schedule((ids[:, lo:hi] == mask_token_id).sum(dim=1), decoding.steps_per_block)
        positions = torch.arange(lo - start, hi - start, device=ids.device)[None, :]  # [1, W], answer positions
        for step in range(decoding.steps_per_block):
            # Only the block's masked positions (before a committed end marker) compete for un-masking.
            masked = ids[:, lo:hi] == mask_token_id  # [B, W]
            if stopping:
                masked &= positions < stop[:, None]
                if not bool(masked.any()):
                    break
            logits = denoiser.block_logits(ids, slice(lo, hi), step)  # [B, W, V]
            if never_generate:
                logits = logits.clone()
                logits[..., list(never_generate)] = -torch.inf
            predicted = torch.argmax(add_gumbel_noise(logits, decoding.temperature, generator), dim=-1)  # [B, W]
            probs = torch.softmax(logits.float(), dim=-1)
            confidence = torch.gather(probs, -1, predicted[..., None]).squeeze(-1)  # [B, W]
            confidence = torch.where(masked, confidence, torch.full_like(confidence, -torch.inf))
            k_max = int(schedule[:, step].max())
            if k_max > 0:
                top = torch.topk(confidence, k_max, dim=1).indices  # [B, k_max]
                keep = torch.arange(k_max, device=ids.device)[None, :] < schedule[:, step:step + 1]
                chosen = torch.zeros_like(masked)
                chosen.scatter_(1, top, keep)
                chosen &= masked  # a stopped row may have fewer candidates than its schedule's count
                ids[:, lo:hi] = torch.where(chosen, predicted, ids[:, lo:hi])
                if stopping:
                    is_end = torch.isin(ids[:, start:], ends)
                    first = torch.where(is_end.any(dim=1), is_end.int().argmax(dim=1), torch.full_like(stop, g))
                    stop = torch.minimum(stop, first)
            if on_step is not None:
                on_step(step_index, ids)
            step_index += 1
    return ids[:, start:]
