"""The embedded default: the tokenizer, model size and pretraining corpus of the small MDLM that
ships with the project, so every stage, test and benchmark has a realistic subject offline."""

from __future__ import annotations

from pathlib import Path

from tokenizers import pre_tokenizers
from transformers import PreTrainedTokenizerFast

from disp_runner.data.synthetic import DEFAULT_IMAGE_SIZE, generate_instances
from disp_runner.data.vocabulary import (
    CLASSES,
    COLOURS,
    COUNT_WORDS,
    INSERTION_MARKER,
    REFUSAL_SENTENCE,
    TAGS,
    TaskKind,
)
from disp_runner.models.mdlm.tokenization import build_word_tokenizer

# Where the shipped base checkpoint lives inside the package.
SHIPPED_BASE_MODEL = Path(__file__).resolve().parent / "assets" / "base-mdlm"

# Responses of the embedded world fit in 16 tokens (the refusal sentence is the longest, 14), so
# the embedded model generates 16 positions with steps = gen_length = block_length, the authors'
# 32/32/32 proportions at half the length.
EMBEDDED_GEN_LENGTH = 16

# ~1 M parameters: trains on two CPU cores in minutes. Larger configs change only these numbers.
EMBEDDED_MODEL_SIZE = dict(
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=384,
    max_position_embeddings=128,
    image_size=DEFAULT_IMAGE_SIZE,
    patch_size=8,
    vision_stem_channels=32,
    vision_hidden_size=64,
    vision_num_layers=2,
    vision_num_heads=4,
    vision_intermediate_size=128,
    gen_length=EMBEDDED_GEN_LENGTH,
)

# Pretraining mix: mostly the three image tasks, plus the language-prior kinds.
PRETRAIN_KINDS = (TaskKind.DESCRIBE, TaskKind.QUESTION, TaskKind.CLASSIFY, TaskKind.REFUSE, TaskKind.TAGGED_DESCRIBE)
PRETRAIN_WEIGHTS = (0.3, 0.3, 0.2, 0.08, 0.12)


def embedded_vocabulary() -> list[str]:
    """Every word the embedded world can say: read off a large sample of every task kind."""
    split = pre_tokenizers.Whitespace()
    words: set[str] = set()
    texts = [REFUSAL_SENTENCE, *COLOURS, *COUNT_WORDS.values(), *CLASSES, *CLASSES.values()]
    for inst in generate_instances(3000, seed=0, kinds=PRETRAIN_KINDS):
        texts += [inst.prompt, inst.response]
    for text in texts:
        words.update(piece.lower() for piece, _ in split.pre_tokenize_str(text))
    return sorted(words)


def build_embedded_tokenizer() -> PreTrainedTokenizerFast:
    return build_word_tokenizer(embedded_vocabulary(), extra_tokens=(*TAGS, INSERTION_MARKER))
