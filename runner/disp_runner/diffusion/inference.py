"""Batched inference over the model protocol: diffusion decoding of answers, and the first-step
likelihood of given answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from disp_api import DecodingCache
from disp_runner.data.instances import Instance
from disp_runner.device import autocast, sub_seed
from disp_runner.diffusion.decoding import DecodingConfig, diffusion_generate
from disp_runner.diffusion.objective import response_window
from disp_runner.diffusion.prompt_cache import PromptCacheDenoiser, require_prompt_caching
from disp_runner.models.base import DiffusionVLM, ModelInputs, Processor

# Optional hook for DiSP: rewrite the visual tokens ([B, T, D]) of a batch before decoding.
ImageEmbedsTransform = Callable[[torch.Tensor, slice], torch.Tensor]



@dataclass(frozen=True)
class ModelDenoiser:
    """Exact decoding: every step a full forward pass over the whole sequence, the head applied to
    the current block's positions only (the rest of the logits would be thrown away)."""

    model: DiffusionVLM
    batch: ModelInputs
    image_embeds: torch.Tensor

    def block_logits(self, ids: torch.Tensor, block: slice, step: int) -> torch.Tensor:
        return self.model(input_ids=ids, image_embeds=self.image_embeds, attention_mask=self.batch.attention_mask,
                          visual_spans=self.batch.visual_spans, logits_at=block)


def _encode_and_embed(model: DiffusionVLM, processor: Processor, chunk: Sequence[Instance], gen_length: int,
                      with_response: bool, transform_image_embeds: ImageEmbedsTransform | None,
                      rows: slice) -> tuple[ModelInputs, torch.Tensor]:
    """A batch on the model's device and its visual tokens [B, T, D], rewritten by the transform
    (call under autocast): what every inference path feeds the language model."""
    batch = processor.encode(chunk, gen_length, with_response=with_response).to(model.device)
    image_embeds = model.embed_images(batch.pixel_values, batch.image_sizes)
    if transform_image_embeds is not None:
        image_embeds = transform_image_embeds(image_embeds, rows)
    return batch, image_embeds


@torch.no_grad()
def generate_responses(
    model: DiffusionVLM,
    processor: Processor,
    instances: Sequence[Instance],
    decoding: DecodingConfig = DecodingConfig(),
    batch_size: int = 64,
    seed: int = 1234,
    transform_image_embeds: ImageEmbedsTransform | None = None,
    description: str = "generate",
    show_progress: bool = True,
    index_offset: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> list[str]:
    """The model's answer to every instance's prompt and image.

    Decoding noise is seeded per batch from `seed` and the batch's global position
    (`index_offset` + its start), so a shard of whole batches decodes exactly as the full run.
    `on_batch(done)` is called after each batch with the number of instances answered so far.
    `decoding.cache` chooses exact decoding or a prompt cache (diffusion/prompt_cache.py)."""
    texts: list[str] = []
    for response_ids in generate_response_ids(model, processor, instances, decoding, batch_size, seed,
                                              transform_image_embeds, description, show_progress, index_offset):
        texts.extend(processor.decode(response_ids))
        if on_batch is not None:
            on_batch(len(texts))
    return texts


def generate_response_ids(
    model: DiffusionVLM,
    processor: Processor,
    instances: Sequence[Instance],
    decoding: DecodingConfig,
    batch_size: int = 64,
    seed: int = 1234,
    transform_image_embeds: ImageEmbedsTransform | None = None,
    description: str = "generate",
    show_progress: bool = False,
    index_offset: int = 0,
) -> Iterator[torch.Tensor]:
    """`generate_responses`' decoding, one batch's generated ids [b, gen_length] at a time."""
    model.eval()
    device = model.device
    generator = torch.Generator(device=device)
    cached = None if decoding.cache is DecodingCache.NONE else require_prompt_caching(model, decoding)
    for lo in tqdm(range(0, len(instances), batch_size), desc=description, leave=False, disable=not show_progress,
                   mininterval=1.0):
        chunk = instances[lo:lo + batch_size]
        generator.manual_seed(sub_seed(seed, (index_offset + lo) // batch_size))
        with torch.no_grad(), autocast(device):  # the visual tokens are computed once per batch, not per step
            batch, image_embeds = _encode_and_embed(model, processor, chunk, decoding.gen_length, False,
                                                    transform_image_embeds, slice(lo, lo + len(chunk)))

            denoiser = ModelDenoiser(model, batch, image_embeds) if cached is None else PromptCacheDenoiser(
                cached, batch.input_ids, batch.attention_mask, batch.visual_spans, image_embeds, decoding)
            response_ids = diffusion_generate(denoiser, batch.input_ids, processor.mask_token_id, decoding,
                                              generator, never_generate=processor.never_generate,
                                              end_ids=tuple(processor.answer_end_ids))
        yield response_ids  # outside the no-grad and autocast contexts, which would leak into the caller


@torch.no_grad()
def first_step_log_likelihood(
    model: DiffusionVLM,
    processor: Processor,
    instances: Sequence[Instance],
    answers: Sequence[str],
    gen_length: int,
    batch_size: int = 64,
    transform_image_embeds: ImageEmbedsTransform | None = None,
) -> torch.Tensor:
    """log p(answer) summed over the `gen_length` answer positions (the answer padded with [EOS], as
    the model was trained), every position predicted at once from a fully masked answer: the
    first-step pseudo-likelihood a masked diffusion LM gives an answer. [N] float64; an answer
    longer than `gen_length` tokens, which the model could not have produced, gets -inf.
    `transform_image_embeds` rewrites the visual tokens exactly as in `generate_responses`."""
    model.eval()
    device = model.device
    out = torch.empty(len(instances), dtype=torch.float64)
    for lo in range(0, len(instances), batch_size):
        chunk = list(instances[lo:lo + batch_size])
        texts = list(answers[lo:lo + batch_size])
        fits = [processor.response_ids(t, gen_length) is not None for t in texts]
        scored = [inst.replace(response=text if ok else "") for inst, text, ok in zip(chunk, texts, fits)]
        with autocast(device):
            batch, image_embeds = _encode_and_embed(model, processor, scored, gen_length, True, transform_image_embeds,
                                                    slice(lo, lo + len(chunk)))
            masked_ids = torch.where(batch.response_mask, torch.full_like(batch.input_ids, processor.mask_token_id),
                                     batch.input_ids)
            window = response_window(batch.response_mask)
            logits = model(input_ids=masked_ids, image_embeds=image_embeds, attention_mask=batch.attention_mask,
                           visual_spans=batch.visual_spans, logits_at=window)
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        token = torch.gather(log_probs, -1, batch.input_ids[:, window, None]).squeeze(-1)  # [B, W]
        total = (token * batch.response_mask[:, window]).sum(dim=1).cpu()
        out[lo:lo + len(chunk)] = torch.where(torch.tensor(fits), total, torch.tensor(-torch.inf, dtype=torch.float64))
    return out
