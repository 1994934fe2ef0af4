"""The embedded model's word-level tokenizer, built with `tokenizers` and saved as a
`PreTrainedTokenizerFast`.

Special tokens are referred to by *name* everywhere (see `SpecialTokens`); their ids are read
from the tokenizer/config at run time, so no file repeats a magic id.
"""

from __future__ import annotations

from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast


class SpecialTokens:
    """Names of the tokens the MDLM relies on."""

    PAD = "[PAD]"
    UNK = "[UNK]"
    MASK = "[MASK]"  # the diffusion mask: a masked response position, and in DiSP a masked visual token
    EOS = "[EOS]"  # end of response; responses are padded with it up to gen_length (LLaDA SFT)
    IMAGE = "<image>"  # one placeholder per visual token, replaced by projected image embeddings

    ALL = (PAD, UNK, MASK, EOS, IMAGE)


def build_word_tokenizer(words: Iterable[str], extra_tokens: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over `words`.

    `extra_tokens` are kept whole even if they contain punctuation (e.g. ``<backdoor>``),
    as a subword tokenizer of a real model would spell them out of known pieces.
    """
    vocab: dict[str, int] = {}
    for token in (*SpecialTokens.ALL, *sorted(set(words)), *sorted(set(extra_tokens))):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SpecialTokens.UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies punctuation
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SpecialTokens.ALL])
    backend.add_tokens([AddedToken(t, special=False, normalized=True) for t in extra_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SpecialTokens.PAD,
        unk_token=SpecialTokens.UNK,
        mask_token=SpecialTokens.MASK,
        eos_token=SpecialTokens.EOS,
        extra_special_tokens={"image_token": SpecialTokens.IMAGE},
        clean_up_tokenization_spaces=True,
    )
