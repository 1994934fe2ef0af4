"""The embedded model's word-level tokenizer, built with `tokenizers` and saved as a
`PreTrainedTokenizerFast`, plus the checks every loaded tokenizer must pass.

Special tokens are referred to by *name* everywhere (see `SpecialTokens`); their ids are read
from the tokenizer/config at run time, so no file repeats a magic id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from disp_runner.errors import UserInputError


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


def validate_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str) -> None:
    """Refuse a tokenizer the diffusion model cannot work with, naming `where` it came from."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (SpecialTokens.MASK, SpecialTokens.EOS, SpecialTokens.PAD, SpecialTokens.IMAGE) if t not in vocab]
    if missing:
        raise UserInputError(f"{where}: tokenizer lacks the special token(s) {', '.join(missing)}")
    if tokenizer.mask_token is None or tokenizer.mask_token_id is None:
        raise UserInputError(f"{where}: tokenizer does not declare a mask token ({SpecialTokens.MASK})")


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved beside a model; never runs remote code."""
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise UserInputError(f"{folder}: no tokenizer.json / tokenizer_config.json found")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse an untrusted file is the file's fault
        raise UserInputError(f"{folder}: cannot load tokenizer: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    validate_tokenizer(tokenizer, str(folder / "tokenizer.json"))
    return tokenizer
