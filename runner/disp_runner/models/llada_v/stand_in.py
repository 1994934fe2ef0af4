"""Small LLaDA-V-format checkpoints built here, for tests and benchmarks: no machine here reaches
the hub, so the published weights and tokenizer.json are not available.

`stand_in_tokenizer` is a word-level tokenizer over the given texts with LLaDA's special tokens
under their published names (at other ids: the ids are always looked up by name); the real one
is a byte-level BPE of 126,464 entries. `build_model` builds a randomly initialised model of any
size whose special ids come from the tokenizer. Loading, processing and every stage treat such a
checkpoint exactly as a published one.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from disp_runner.models.llada_v.configuration import LladaVConfig
from disp_runner.models.llada_v.modeling import LladaVForMaskedDiffusion
from disp_runner.models.llada_v.processing import SYSTEM_PROMPT, LladaVProcessor, Specials

UNKNOWN = "<|unk|>"


def stand_in_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    split = pre_tokenizers.Whitespace()
    words = {piece.lower() for text in (SYSTEM_PROMPT, "system user assistant", *texts)
             for piece, _ in split.pre_tokenize_str(text)}
    specials = [UNKNOWN, *Specials.ALL]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *sorted(words)]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNKNOWN, bos_token=Specials.START,
                                   eos_token=Specials.END, pad_token=Specials.END, mask_token=Specials.MASK)


def build_model(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None,
                **sizes) -> tuple[LladaVForMaskedDiffusion, LladaVProcessor]:
    """A randomly initialised LLaDA-V of the given sizes (LladaVConfig fields) and its processor;
    `vocab_size` may exceed the tokenizer's (the published model's is 126,464)."""
    config = LladaVConfig(vocab_size=vocab_size or len(tokenizer), mask_token_id=tokenizer.mask_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    return LladaVForMaskedDiffusion(config).eval(), LladaVProcessor(tokenizer, config)
