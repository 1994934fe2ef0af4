"""Prompt-cache decoding (`decoding.cache: prefix | dual`): the keys and values of the positions a
step does not un-mask are computed in one full pass when a block starts (and every
`cache_refresh_steps` steps), and the block's other steps run over the answer only.

Exact decoding recomputes the whole sequence at every step although only the answer changes; on
a real LLaDA-V input the prompt holds 1,485–3,627 visual tokens and the answer 32. The cache is an
approximation, the one Fast-dLLM makes for bidirectional diffusion LMs: the cached positions were
computed when the block was still fully masked and do not see the tokens un-masked since.

- prefix: the context is everything before the current block (image, prompt, earlier blocks);
  a step runs over the current block and the later, still masked, ones.
- dual: the later blocks are cached as well; a step runs over the current block only.

Masked visual tokens stay masked exactly as in exact decoding: the full pass sees the same
(rewritten) visual tokens, and the cached keys are theirs.
"""

from __future__ import annotations

import torch

from disp_api import DecodingCache
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.errors import UserInputError
from disp_runner.models.base import KeyValueContext, PromptCaching


class PromptCacheDenoiser:
    """A `Denoiser` for one batch: full passes on refresh steps, window passes in between."""

    def __init__(self, model: PromptCaching, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 visual_spans: torch.Tensor, image_embeds: torch.Tensor, decoding: DecodingConfig):
        if decoding.cache is DecodingCache.NONE:
            raise ValueError("PromptCacheDenoiser needs decoding.cache prefix or dual")
        self.model, self.decoding = model, decoding
        self.attention_mask, self.visual_spans, self.image_embeds = attention_mask, visual_spans, image_embeds
        self.length = input_ids.shape[1]
        self.context: KeyValueContext | None = None
        self.keep: torch.Tensor | None = None
        self.window = slice(0, 0)

    def _refreshes(self, step: int) -> bool:
        every = self.decoding.cache_refresh_steps
        return step == 0 or (every is not None and step % every == 0)

    def block_logits(self, ids: torch.Tensor, block: slice, step: int) -> torch.Tensor:
        if self._refreshes(step) or self.context is None:
            positions = torch.arange(self.length, device=ids.device)
            self.keep = positions < block.start
            self.window = slice(block.start, self.length)
            if self.decoding.cache is DecodingCache.DUAL:
                self.keep |= positions >= block.stop
                self.window = block
            logits, self.context = self.model.forward_with_context(
                input_ids=ids, attention_mask=self.attention_mask, visual_spans=self.visual_spans,
                image_embeds=self.image_embeds, keep=self.keep, logits_at=block)
            return logits
        logits = self.model.forward_over_context(input_ids=ids, attention_mask=self.attention_mask,
                                                 window=self.window, keep=self.keep, context=self.context)
        return logits[:, :block.stop - block.start]  # the window starts with the block


def require_prompt_caching(model: object, decoding: DecodingConfig, field_name: str = "decoding") -> PromptCaching:
    """The model, when the decoding's cache can run on it; else an error naming the field (the one
    check of a cache against a model family: the pipeline runs it before anything expensive, the
    decoder again for callers that come without a pipeline)."""
    if not isinstance(model, PromptCaching):
        raise UserInputError(f"{field_name}.cache: {decoding.cache.value} needs a model family with a prompt "
                             f"cache; {type(model).__name__} has none (use none)")
    return model
