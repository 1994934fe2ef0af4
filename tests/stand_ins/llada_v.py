"""Small LLaDA-V-format checkpoints built here, for tests and benchmarks (a test helper, kept out of
the product package): no machine here reaches the hub, so the published weights and tokenizer.json
are not available.

`stand_in_tokenizer` is a word-level tokenizer over the given texts with LLaDA's special tokens
under their published names, at small ids by default (the runner always looks ids up by name) or,
with `published_ids`, at the published ids in a vocabulary of the published size; the real one is
a byte-level BPE of 126,464 entries. Like the published tokenizer it declares no mask token:
`<|mdm_mask|>` is only one of its added tokens. `build_model` builds a randomly initialised model
of any size whose special ids come from the tokenizer. `publish_layout` makes a saved checkpoint
look as the hub's does where loading depends on it. Loading, processing and every stage treat such
a checkpoint exactly as a published one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from disp_runner.models.llada_v.configuration import LladaVConfig
from disp_runner.models.llada_v.modeling import LladaVForMaskedDiffusion
from disp_runner.models.llada_v.processing import SYSTEM_PROMPT, LladaVProcessor, Specials

UNKNOWN = "<|unk|>"
# Where GSAI-ML/LLaDA-V's tokenizer (tokenizer_config.json's added_tokens_decoder) puts its special
# tokens, and its config's vocab_size.
PUBLISHED_IDS = {Specials.START: 126080, Specials.END: 126081, Specials.MASK: 126336,
                 Specials.HEADER_START: 126346, Specials.HEADER_END: 126347, Specials.EOT: 126348}
PUBLISHED_VOCAB_SIZE = 126464


def stand_in_tokenizer(texts: Iterable[str], published_ids: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `texts`; with `published_ids` its special tokens sit at the
    published ids (the words from 0 up), so a model built for it needs the published vocab_size."""
    split = pre_tokenizers.Whitespace()
    words = {piece.lower() for text in (SYSTEM_PROMPT, "system user assistant", *texts)
             for piece, _ in split.pre_tokenize_str(text)}
    specials = [UNKNOWN, *Specials.ALL]
    if published_ids:
        vocab = {token: i for i, token in enumerate([*sorted(words), UNKNOWN])}
        vocab.update(PUBLISHED_IDS)
    else:
        vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *sorted(words)]))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNKNOWN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNKNOWN, bos_token=Specials.START,
                                   eos_token=Specials.END, pad_token=Specials.END)


def build_model(tokenizer: PreTrainedTokenizerBase, vocab_size: int | None = None,
                **sizes) -> tuple[LladaVForMaskedDiffusion, LladaVProcessor]:
    """A randomly initialised LLaDA-V of the given sizes (LladaVConfig fields) and its processor;
    `vocab_size` may exceed the tokenizer's (the published model's is 126,464); by default it is
    the smallest that holds every id of the tokenizer."""
    config = LladaVConfig(vocab_size=vocab_size or max(tokenizer.get_vocab().values()) + 1,
                          mask_token_id=tokenizer.convert_tokens_to_ids(Specials.MASK),
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sizes)
    return LladaVForMaskedDiffusion(config).eval(), LladaVProcessor(tokenizer, config)


# What GSAI-ML/LLaDA-V's config.json names: its own code (the repository is tagged custom_code and
# ships configuration_llada.py). This runner never imports it.
PUBLISHED_AUTO_MAP = {"AutoConfig": "configuration_llada.LLaDAConfig",
                      "AutoModel": "modeling_llada.LLaDAModel",
                      "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"}
# Code that must never run: importing it leaves a marker beside it and fails.
_TRAP = ("from pathlib import Path\n"
         "(Path(__file__).parent / 'REMOTE-CODE-RAN').write_text(__name__)\n"
         "raise RuntimeError('the checkpoint\\'s own code was imported')\n")


def publish_layout(folder: str | Path) -> None:
    """Make a checkpoint saved here look as the published one does to a loader: no mask_token in
    tokenizer_config.json / special_tokens_map.json, config.json with an auto_map, and the
    checkpoint's own Python files beside it (traps that mark the folder if ever imported)."""
    folder = Path(folder)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            data = json.loads(path.read_text())
            data.pop("mask_token", None)
            path.write_text(json.dumps(data, indent=2))
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = PUBLISHED_AUTO_MAP
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for module in ("configuration_llada.py", "modeling_llada.py"):
        (folder / module).write_text(_TRAP)
