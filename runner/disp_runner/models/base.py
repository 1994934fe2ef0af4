"""The model protocol: everything the DiSP stages, the trainer, the decoder and the evaluation may
know about a model. A model family implements it in its own folder and registers itself in
`disp_runner.models.registry`; nothing outside that folder imports the family's classes.

A family is two objects, as in transformers:

- the **model** (`DiffusionVLM`): a torch module, vision tower -> projector -> bidirectional
  language model that predicts the clean token at every position;
- its **processor** (`Processor`): the tokenizer and the family's sequence layout, which turn
  (image, prompt[, response]) into `ModelInputs` and generated ids back into text.

Every sequence is laid out, left-padded, as

    [PAD ...] [visual prefix: the family's own tokens around the image placeholders] [prompt] [response]

so the response always occupies the last `gen_length` positions and loss, decoding and saliency
index it the same way for every row and every family (a fine-tune with the authors' chat-turn
labels is the exception: its answers are unpadded, and `response_mask` says which positions the
loss supervises). Where each row's visual tokens sit is
recorded as its *visual span* (start, length), since padding moves it and a real model's number
of visual tokens depends on the image.
"""

from __future__ import annotations

import enum
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from disp_api import FinetuneLabels
from disp_runner.data.instances import Instance, as_rgb
from disp_runner.errors import UserInputError
from disp_api.planning import ModelShape


class ModelPart(enum.Enum):
    """The three parts of a multimodal diffusion LM, for choosing what a fine-tune trains."""

    VISION = "vision"  # the vision tower (SigLIP in LLaDA-V)
    PROJECTOR = "projector"  # vision features -> language-model embeddings (mm_projector)
    LANGUAGE = "language"  # the language model: token embeddings, transformer, head


@dataclass(frozen=True)
class TokenGrid:
    """A block of visual tokens that sit on a grid over the image: `rows` x `cols` cells of
    `cell_height` x `cell_width` pixels (fractional when a view is resized), numbered row-major
    from `first` in the visual span, `row_stride` tokens apart from one row to the next (more than
    `cols` when each row ends in a token that sees no cell, like LLaDA-V's image_newline)."""

    rows: int
    cols: int
    cell_height: float
    cell_width: float
    first: int = 0
    row_stride: int = 0  # 0: cols

    @property
    def stride(self) -> int:
        return self.row_stride or self.cols

    def token(self, row: int, col: int) -> int:
        return self.first + row * self.stride + col

    def cells(self) -> Iterator[tuple[int, tuple[int, int, int, int]]]:
        """(token, pixel box (x0, y0, x1, y1), end-exclusive) of every cell."""
        for r in range(self.rows):
            for c in range(self.cols):
                yield self.token(r, c), (math.floor(c * self.cell_width), math.floor(r * self.cell_height),
                                         math.ceil((c + 1) * self.cell_width), math.ceil((r + 1) * self.cell_height))


@dataclass(frozen=True)
class VisualLayout:
    """Where an image's visual tokens sit: `num_tokens` tokens in the visual span, of which those in
    `grids` see a cell of the image (the others, e.g. row separators, see none)."""

    num_tokens: int
    grids: tuple[TokenGrid, ...]

    @classmethod
    def single_grid(cls, grid: TokenGrid) -> "VisualLayout":
        return cls(grid.rows * grid.stride, (grid,))


@dataclass
class ModelInputs:
    """A batch as the model sees it. Shapes: B rows, L positions, T visual tokens."""

    input_ids: torch.Tensor  # [B, L] response positions hold the clean response, or [MASK] to generate
    attention_mask: torch.Tensor  # [B, L] 1 = real token, 0 = left padding
    pixel_values: torch.Tensor  # [B, ...] the family's image tensor
    # [B, L] the positions decoding fills or the loss supervises: the last gen_length (answers
    # padded to it), or with chat-turn labels each row's answer turn and chat markers
    response_mask: torch.Tensor
    visual_spans: torch.Tensor  # [B, 2] long: (start, length) of each row's visual tokens
    image_sizes: torch.Tensor  # [B, 2] long: (height, width) of each row's image in pixels

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The fields in order; `ModelInputs(*tensors)` rebuilds the batch."""
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device | str) -> "ModelInputs":
        return ModelInputs(*(t.to(device) for t in self.tensors()))

    def select(self, rows: torch.Tensor | Sequence[int]) -> "ModelInputs":
        """The batch of the given rows, in that order."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.input_ids.device)
        return ModelInputs(*(t[index] for t in self.tensors()))

    def batch(self, rows: torch.Tensor | Sequence[int]) -> "ModelInputs":
        """As a `TrainingData`: already encoded, so a selection."""
        return self.select(rows)

    def first_real_column(self) -> int:
        """The first column that holds a real token of any row (rows are left-padded)."""
        columns = self.attention_mask.bool().any(dim=0).nonzero()
        return int(columns[0]) if len(columns) else self.input_ids.shape[1]

    def trim_left(self, columns: int) -> "ModelInputs":
        """The batch without its first `columns` columns, which must be padding in every row: the
        same inputs for a model that reads positions from the attention mask, at less compute."""
        if columns == 0:
            return self
        if bool(self.attention_mask[:, :columns].any()):
            raise ValueError(f"the first {columns} columns hold real tokens")
        spans = self.visual_spans.clone()
        spans[:, 0] -= columns
        return ModelInputs(self.input_ids[:, columns:], self.attention_mask[:, columns:], self.pixel_values,
                           self.response_mask[:, columns:], spans, self.image_sizes)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class EncodedInstances:
    """Training data encoded a batch at a time, images decoded only then, so memory does not grow
    with the dataset. Every batch is padded to the dataset's longest row: a batch's tensors do not
    depend on which instances share it (a resumed or re-sharded run computes the same thing); the
    training loop then cuts the columns that are padding in every row of the global batch."""

    def __init__(self, processor: "Processor", instances: Sequence[Instance], gen_length: int,
                 labels: FinetuneLabels = FinetuneLabels.PADDED_ANSWER):
        self.processor, self.instances, self.gen_length, self.labels = processor, instances, gen_length, labels
        self.lengths = [len(row.ids) for row in processor.token_rows(instances, gen_length, labels=labels)]  # checks all
        self.length = max(self.lengths)

    def __len__(self) -> int:
        return len(self.instances)

    def batch(self, rows: torch.Tensor | Sequence[int]) -> ModelInputs:
        chosen = self.processor.encode([self.instances[int(i)] for i in rows], self.gen_length, pad_to=self.length,
                                       labels=self.labels)
        # Contiguous, as a DataLoader's collation of pre-encoded rows made them: convolutions round
        # differently on the channels-last strides the image arrays arrive in, and a fine-tune
        # must compute exactly what it did when the whole dataset was encoded up front.
        return ModelInputs(*(t.contiguous() for t in chosen.tensors()))


class TrainingData(Protocol):
    """What the training loop draws batches from: a number of rows and `batch(rows)`."""

    def __len__(self) -> int: ...

    def batch(self, rows: torch.Tensor | Sequence[int]) -> ModelInputs: ...


def visual_token_mask(tokens: torch.Tensor | Sequence[Sequence[int]], width: int,
                      device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, width] bool, True at each row's listed visual-token indices: a [B, k] tensor, or lists
    of different lengths (images with different numbers of visual tokens)."""
    mask = torch.zeros(len(tokens), width, dtype=torch.bool, device=device)
    if isinstance(tokens, torch.Tensor):
        return mask.scatter_(1, tokens.to(device), True)
    for row, chosen in enumerate(tokens):
        mask[row, list(chosen)] = True
    return mask


def images_to_tensor(instances: Sequence[Instance], image_size: int) -> torch.Tensor:
    """RGB images of `image_size` x `image_size` -> [B, 3, H, W] float in [0, 1]."""
    arrays = []
    for inst in instances:
        if inst.image_size != (image_size, image_size):
            raise UserInputError(f"instance {inst.id}: image is {inst.image_size[0]}x{inst.image_size[1]}, "
                                 f"model expects {image_size}x{image_size}")
        arrays.append(np.asarray(as_rgb(inst.image), dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
    return pixels.float() / 255.0


def split_parameters(model: nn.Module, vision: nn.Module, projector: nn.Module) -> dict[ModelPart, list[nn.Parameter]]:
    """`DiffusionVLM.parameter_parts` for a model whose tower and projector are modules: the
    language model is everything else (embeddings, transformer, head, any other extra)."""
    parts = {ModelPart.VISION: list(vision.parameters()), ModelPart.PROJECTOR: list(projector.parameters())}
    taken = {id(p) for part in parts.values() for p in part}
    parts[ModelPart.LANGUAGE] = [p for p in model.parameters() if id(p) not in taken]
    return parts


def trained_gen_length(config: PretrainedConfig) -> int | None:
    """The number of response positions the model was trained to fill (`config.gen_length`), if it says."""
    return getattr(config, "gen_length", None)


class DiffusionVLM(Protocol):
    """The model side of a family: a transformers `PreTrainedModel` with these methods.

    `config.vocab_size` is the size of the logits; an optional `config.gen_length` is the number of
    response positions the model was trained to fill (the default decoding length)."""

    config: PretrainedConfig

    @property
    def device(self) -> torch.device: ...

    def embed_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Visual tokens after the projector, where DiSP scores and masks: [B, ...] -> [B, T, D],
        T the longest row's visual span; a shorter row's tokens come first, the rest is padding
        the model never reads (so it gets no gradient and no saliency)."""

    def mask_embedding(self) -> torch.Tensor:
        """e_MASK, the input embedding of the mask token, which masking a position puts there: [D]."""

    def __call__(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual_spans: torch.Tensor,
                 image_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                 image_sizes: torch.Tensor | None = None, image_token_mask: torch.Tensor | None = None,
                 logits_at: slice | None = None) -> torch.Tensor:
        """Logits [B, L, V] of the clean token at every position, or [B, W, V] of the positions
        `logits_at` only: every stage reads the answer's positions alone, and the head over a whole
        3,600-token sequence would cost a 126k-wide product and a [B, L, V] tensor per position it
        never reads (1.9 GB a row for LLaDA-V in fp32). The visual tokens come from
        `image_embeds` [B, T, D] (already embedded, possibly rewritten by DiSP) or from
        `pixel_values` + `image_sizes`; `image_token_mask` [B, T] (True = replace by e_MASK) masks
        some of them. Row i's first `visual_spans[i, 1]` visual tokens go to the positions from
        `visual_spans[i, 0]` on."""

    def parameter_parts(self) -> dict[ModelPart, list[nn.Parameter]]:
        """Every parameter, in exactly one part (what `trainable` chooses among)."""

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def save_pretrained(self, save_directory: str, **kwargs: object) -> None: ...

    def train(self, mode: bool = True) -> "DiffusionVLM": ...

    def eval(self) -> "DiffusionVLM": ...

    def to(self, *args: object, **kwargs: object) -> "DiffusionVLM": ...


@dataclass(frozen=True)
class KeyValueContext:
    """A prompt cache: every layer's keys and values ([B, H, C, hd], positions already encoded) of
    the C positions a later forward pass attends to without recomputing them."""

    layers: list[tuple[torch.Tensor, torch.Tensor]]


@runtime_checkable
class PromptCaching(Protocol):
    """Optional part of the model protocol that cached decoding (`relabel.decoding.cache`) needs:
    a full pass that also returns the keys and values of chosen positions, and a pass over a
    window of text positions that attends to those instead of recomputing them. A family without
    it decodes exactly (a cache asked of it is refused with a clear error)."""

    def forward_with_context(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             visual_spans: torch.Tensor, image_embeds: torch.Tensor, keep: torch.Tensor,
                             logits_at: slice) -> tuple[torch.Tensor, KeyValueContext]:
        """One full forward pass (as `DiffusionVLM.__call__`): the logits [B, W, V] of the positions
        `logits_at` only, and the context of the positions where `keep` [L] (bool) is True."""

    def forward_over_context(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor, window: slice,
                             keep: torch.Tensor, context: KeyValueContext) -> torch.Tensor:
        """Logits [B, W, V] of the positions `window` of `input_ids` [B, L] (text tokens only), each
        attending to the window and to `context`, which holds the positions `keep` selected;
        `attention_mask` [B, L] is the whole sequence's, as in the pass that made the context."""


def adopt_mask_token(tokenizer: PreTrainedTokenizerBase, known: str | None) -> None:
    """A published tokenizer may hold its family's [MASK] only as an added token, without declaring
    it (LLaDA-V's tokenizer_config.json has no mask_token): take the family's known token then, when
    the vocabulary has it. The config's mask_token_id is still checked against it (Processor)."""
    if tokenizer.mask_token_id is None and known is not None and known in tokenizer.get_vocab():
        tokenizer.mask_token = known


class TokenRow(NamedTuple):
    """One instance as the model reads it (before padding)."""

    ids: list[int]  # visual prefix, prompt, response
    visual_offset: int  # where its visual tokens start
    visual_tokens: int  # how many there are
    supervised: list[bool]  # per id: decoding fills it or the loss supervises it (response_mask)


class Processor(ABC):
    """The processor side of a family: tokenizer + sequence layout. The family says how an image
    becomes pixels and which tokens precede the prompt; the sequence assembly, padding and the
    checks every family needs are written once here."""

    # The family's [MASK] token by name, taken when a tokenizer does not declare one.
    known_mask_token: str | None = None

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, where: str = "model"):
        """Raises UserInputError naming `where` when the tokenizer and the config disagree."""
        self.tokenizer = tokenizer
        self.config = config
        adopt_mask_token(tokenizer, self.known_mask_token)
        if tokenizer.mask_token_id is None:
            raise UserInputError(f"{where}: the tokenizer declares no mask token")
        for name in ("mask_token_id", "pad_token_id", "eos_token_id"):
            ours, theirs = getattr(tokenizer, name), getattr(config, name, None)
            if theirs is not None and ours != theirs:
                raise UserInputError(f"{where}: the tokenizer's {name} {ours} differs from config.{name} {theirs}")
        if len(tokenizer) > config.vocab_size:
            raise UserInputError(f"{where}: tokenizer has {len(tokenizer)} tokens, model vocab_size is "
                                 f"{config.vocab_size}")

    # -- what a family defines ----------------------------------------------------------------
    @property
    @abstractmethod
    def image_size(self) -> int | None:
        """The square size (pixels) images must have; None: the family takes images of any size."""

    @abstractmethod
    def visual_layout(self, width: int, height: int) -> VisualLayout:
        """How many visual tokens an image of this size becomes, and where they sit in it."""

    @abstractmethod
    def visual_prefix(self, layout: VisualLayout) -> tuple[list[int], int]:
        """The ids that precede the prompt of an image with this layout (its placeholders and the
        family's own markers), and the offset of the first visual token in them."""

    @abstractmethod
    def pixel_values(self, instances: Sequence[Instance]) -> torch.Tensor:
        """The family's image tensor for a batch: [B, ...]."""

    @property
    @abstractmethod
    def max_positions(self) -> int:
        """The longest sequence the model takes."""

    @property
    @abstractmethod
    def reserved_ids(self) -> frozenset[int]:
        """Ids only the processor may place (image placeholders, the mask): a prompt that brings one
        is refused, and decoding never generates one."""

    @property
    def mask_token_id(self) -> int:
        return self.tokenizer.mask_token_id

    # -- what a family may change -----------------------------------------------------------------
    @property
    def never_generate(self) -> tuple[int, ...]:
        """Ids decoding never puts in an answer position."""
        return tuple(sorted(self.reserved_ids | {self.mask_token_id}))

    @property
    def answer_end_ids(self) -> frozenset[int]:
        """An answer ends at the first of these (decoding cuts it there)."""
        return frozenset({self.tokenizer.eos_token_id})

    def wrap_prompt(self, user_ids: list[int]) -> list[int]:
        """The ids between the visual prefix and the answer, around the user's prompt (a chat template)."""
        return user_ids

    @property
    def answer_header_length(self) -> int:
        """How many of the last ids `wrap_prompt` adds open the answer's own turn (a chat format's
        assistant header): chat-turn labels supervise them with the answer."""
        return 0

    @property
    def chat_marker_ids(self) -> frozenset[int]:
        """The chat format's markers, which chat-turn labels supervise wherever they stand, in the
        prompt too (none without a chat format)."""
        return frozenset()

    def answer_ids(self, text: str) -> list[int]:
        """An answer as the model was trained to give it, before padding to gen_length with the end token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- shared plumbing ------------------------------------------------------------------------
    def layout_of(self, instance: Instance) -> VisualLayout:
        return self.visual_layout(*instance.image_size)

    def views_of(self, instance: Instance) -> int:
        """How many views of the image the vision tower encodes (one, unless the family tiles)."""
        return 1

    def response_ids(self, text: str, gen_length: int) -> list[int] | None:
        """An answer as the `gen_length` response positions hold it, padded with the end token; None
        when it does not fit. An answer that fills every position needs no end marker, as one that
        decoding produced has none."""
        ids = self.answer_ids(text)
        if len(ids) == gen_length + 1 and ids[-1] in self.answer_end_ids:
            ids = ids[:-1]
        if len(ids) > gen_length:
            return None
        return ids + [self.tokenizer.eos_token_id] * (gen_length - len(ids))

    def answer_turn(self, text: str, gen_length: int) -> list[int] | None:
        """An answer as chat-turn labels train it: unpadded, ending in the end token (which an
        answer that fills all `gen_length` positions keeps); None when it does not fit."""
        ids = self.answer_ids(text)
        if not ids or ids[-1] not in self.answer_end_ids:
            ids = ids + [self.tokenizer.eos_token_id]
        return ids if len(ids) <= gen_length + 1 else None

    def token_rows(self, instances: Sequence[Instance], gen_length: int, with_response: bool = True,
                   labels: FinetuneLabels = FinetuneLabels.PADDED_ANSWER) -> list[TokenRow]:
        """Each instance's ids — visual prefix, prompt, response (padded with the end token to
        `gen_length`, unpadded with chat-turn `labels`, or masks to generate) — with where its
        visual tokens are and which positions are supervised. Reads image sizes, never pixels."""
        tok = self.tokenizer
        prompts = tok([inst.prompt for inst in instances], add_special_tokens=False)["input_ids"]
        reserved = self.reserved_ids | {self.mask_token_id}
        chat_turns = with_response and labels is FinetuneLabels.CHAT_TURNS
        markers = self.chat_marker_ids if chat_turns else frozenset()
        rows: list[TokenRow] = []
        for inst, prompt_ids in zip(instances, prompts):
            layout = self.layout_of(inst)
            visual_tokens = layout.num_tokens
            prefix, visual_offset = self.visual_prefix(layout)
            found = reserved & set(prompt_ids)
            if found:  # the model's own placeholders: a prompt cannot bring images or masks
                names = " and ".join(tok.convert_ids_to_tokens(sorted(found)))
                raise UserInputError(f"instance {inst.id}: the prompt contains the model's {names} token, "
                                     "which only the runner may place")
            prompt_ids = self.wrap_prompt(prompt_ids)
            positions = len(prefix) + len(prompt_ids) + gen_length
            if positions > self.max_positions:
                raise UserInputError(
                    f"instance {inst.id}: {len(prefix)} image positions ({visual_tokens} visual tokens) + a "
                    f"{len(prompt_ids)}-token prompt + genLength {gen_length} = {positions} positions, more than "
                    f"the model's {self.max_positions}")
            if with_response:
                response_ids = (self.answer_turn if chat_turns else self.response_ids)(inst.response, gen_length)
                if response_ids is None:
                    raise UserInputError(f"instance {inst.id}: response has {len(self.answer_ids(inst.response))} "
                                         f"tokens, more than gen_length {gen_length}")
            else:
                response_ids = [self.mask_token_id] * gen_length
            ids = prefix + prompt_ids + response_ids
            if chat_turns:
                visual = range(visual_offset, visual_offset + visual_tokens)
                answer_from = len(ids) - len(response_ids) - self.answer_header_length
                supervised = [i >= answer_from or (token in markers and i not in visual) for i, token in enumerate(ids)]
            else:
                supervised = [i >= len(ids) - gen_length for i in range(len(ids))]
            rows.append(TokenRow(ids, visual_offset, visual_tokens, supervised))
        return rows

    def encode(self, instances: Sequence[Instance], gen_length: int, with_response: bool = True,
               pad_to: int = 0, labels: FinetuneLabels = FinetuneLabels.PADDED_ANSWER) -> ModelInputs:
        """The batch's `token_rows`, left-padded to the longest (or to `pad_to`, if longer), and its
        images (decoded now)."""
        rows = self.token_rows(instances, gen_length, with_response, labels)
        length = max(pad_to, *(len(row.ids) for row in rows))
        input_ids = torch.full((len(rows), length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        response_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        spans = torch.zeros((len(rows), 2), dtype=torch.long)
        for i, row in enumerate(rows):
            start = length - len(row.ids)
            input_ids[i, start:] = torch.tensor(row.ids)
            attention_mask[i, start:] = 1
            response_mask[i, start:] = torch.tensor(row.supervised)
            spans[i] = torch.tensor([start + row.visual_offset, row.visual_tokens])
        sizes = torch.tensor([[inst.image_size[1], inst.image_size[0]] for inst in instances], dtype=torch.long)
        return ModelInputs(input_ids, attention_mask, self.pixel_values(instances), response_mask, spans, sizes)

    def decode(self, response_ids: torch.Tensor) -> list[str]:
        """Generated response ids [B, G] -> text, cut at the first end token."""
        ends = self.answer_end_ids
        texts = []
        for row in response_ids.tolist():
            row = row[:next((i for i, token in enumerate(row) if token in ends), len(row))]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def save_pretrained(self, folder: Path) -> None:
        self.tokenizer.save_pretrained(str(folder))


@dataclass(frozen=True)
class ModelFamily:
    """A family as the registry knows it: loaded only from safetensors (or explicitly opted-in
    pickle) with this library's own classes, never with remote code."""

    model_type: str  # config.json's model_type
    model_class: type[PreTrainedModel]
    processor_class: type[Processor]
    # Config fields that must be positive integers before a model is built from them (a hostile
    # config must not make the constructor allocate without bound).
    positive_sizes: tuple[str, ...] = ()
    # Tokens the tokenizer must have, by name.
    required_tokens: tuple[str, ...] = ()
    # Other published weight names -> the family's (regex -> replacement), applied while loading.
    key_mapping: dict[str, str] | None = None
    # About how many parameters a config.json (a dict, untrusted) describes, so that a config too
    # large for the machine is refused before anything is allocated; ValueError for a bad size.
    parameter_count: Callable[[dict], int] | None = None
    # Config overrides that make the model match the tensor names the checkpoint holds (e.g. a
    # tower saved with one layer more than the config says); ValueError when they cannot match.
    config_for_weights: Callable[[dict, set[str]], dict] | None = None
    # The published checkpoint ships its own code (config.json's auto_map) for what this family
    # implements natively: the entry is ignored, never run. For other families auto_map is refused.
    native_for_auto_map: bool = False
    # The sizes the memory planner needs, from a config.json dict (disp_api.planning); None: the
    # family's stages run unplanned.
    model_shape: Callable[[dict], ModelShape] | None = None


