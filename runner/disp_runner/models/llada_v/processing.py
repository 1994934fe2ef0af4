"""LLaDA-V's input side: the LLaMA-3-style chat format with the fixed system prompt, and SigLIP's
view preprocessing over anyres crops.

    <|startoftext|><|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\n\n<image>\n{prompt}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>

`<image>` is not a token: its place is the visual span, filled by the packed visual tokens (here
the span's positions hold the end-of-text id as a placeholder). Special ids are looked up by name
in the checkpoint's tokenizer. Derived from LLaDA-V's conversation.py (conv_llava_llada) and
mm_utils.py, not checked against the published tokenizer files.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase

from disp_runner.data.instances import Instance, as_rgb
from disp_runner.errors import UserInputError
from disp_runner.models.base import Processor, TokenGrid, VisualLayout
from disp_runner.models.llada_v.anyres import anyres_geometry, expand_pinpoints, max_views_of, resize_and_pad
from disp_runner.models.llada_v.configuration import LladaVConfig

SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")


class Specials:
    """LLaDA's special tokens, by name."""

    START = "<|startoftext|>"
    END = "<|endoftext|>"  # EOS and PAD
    MASK = "<|mdm_mask|>"
    HEADER_START = "<|start_header_id|>"
    HEADER_END = "<|end_header_id|>"
    EOT = "<|eot_id|>"

    ALL = (START, END, MASK, HEADER_START, HEADER_END, EOT)


class LladaVProcessor(Processor):
    config: LladaVConfig
    known_mask_token = Specials.MASK  # the published tokenizer holds it only as an added token

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: LladaVConfig, where: str = "model"):
        super().__init__(tokenizer, config, where)
        self.ids = {name: tokenizer.convert_tokens_to_ids(name) for name in Specials.ALL}
        if self.ids[Specials.MASK] != config.mask_token_id:
            raise UserInputError(f"{where}: the tokenizer's {Specials.MASK} id {self.ids[Specials.MASK]} differs from "
                                 f"config.mask_token_id {config.mask_token_id}")
        vision = config.vision_config
        self.view_size, self.side = vision["image_size"], vision["image_size"] // vision["patch_size"]
        self.pinpoints = expand_pinpoints(config.image_grid_pinpoints, self.view_size)
        self.max_views = max_views_of(config.image_aspect_ratio)

    def _text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _header(self, role: str) -> list[int]:
        return [self.ids[Specials.HEADER_START], *self._text(role), self.ids[Specials.HEADER_END], *self._text("\n\n")]

    # -- what the protocol asks of a family ----------------------------------------------------
    @property
    def image_size(self) -> int | None:
        return None  # any size: anyres picks the crops

    def geometry(self, width: int, height: int):
        return anyres_geometry(width, height, self.view_size, self.side, self.pinpoints, self.max_views)

    def views_of(self, instance: Instance) -> int:
        return self.geometry(*instance.image_size).views

    def visual_layout(self, width: int, height: int) -> VisualLayout:
        """The base view's side x side tokens over the whole image, then the packed crop map, whose
        rows each end in a newline token that sees no cell."""
        rows, cols = self.geometry(width, height).packed
        base = TokenGrid(self.side, self.side, height / self.side, width / self.side)
        count = self.side * self.side + rows * (cols + 1)
        if not rows or not cols:  # a sliver of an image whose crop map unpads to nothing: newlines only
            return VisualLayout(count, (base,))
        crops = TokenGrid(rows, cols, height / rows, width / cols, first=self.side * self.side, row_stride=cols + 1)
        return VisualLayout(count, (base, crops))

    def visual_prefix(self, layout: VisualLayout) -> tuple[list[int], int]:
        head = [self.ids[Specials.START], *self._header("system"), *self._text(SYSTEM_PROMPT), self.ids[Specials.EOT],
                *self._header("user")]
        return head + [self.ids[Specials.END]] * layout.num_tokens, len(head)

    def wrap_prompt(self, user_ids: list[int]) -> list[int]:
        return [*self._text("\n"), *user_ids, self.ids[Specials.EOT], *self._header("assistant")]

    def answer_ids(self, text: str) -> list[int]:
        return [*self._text(text), self.ids[Specials.EOT]]

    @property
    def answer_header_length(self) -> int:
        return len(self._header("assistant"))

    @property
    def chat_marker_ids(self) -> frozenset[int]:
        """The tokens LLaDA-V's SFT labelling supervises even inside the system and user turns: the
        start of text, the header markers, the end of turn, and "\n\n" when the vocabulary holds a
        token of that very name (their list looks the names up as tokens; a byte-level vocabulary
        spells the blank line otherwise, so there it is supervised only in the answer's header)."""
        vocabulary = self.tokenizer.get_vocab()
        names = (Specials.START, Specials.HEADER_START, Specials.HEADER_END, Specials.EOT, "\n\n")
        return frozenset(vocabulary[name] for name in names if name in vocabulary)

    @property
    def answer_end_ids(self) -> frozenset[int]:
        return frozenset({self.ids[Specials.EOT], self.ids[Specials.END]})

    @property
    def never_generate(self) -> tuple[int, ...]:
        """As the authors' decoder: never the mask, start of text, end of text or a header marker."""
        return tuple(sorted({self.mask_token_id, self.ids[Specials.START], self.ids[Specials.END],
                             self.ids[Specials.HEADER_START], self.ids[Specials.HEADER_END]}))

    def pixel_values(self, instances: Sequence[Instance]) -> torch.Tensor:
        """[B, V, 3, S, S]: each image's base view (squashed to S x S) then its crops, row-major,
        rescaled to [-1, 1] (SigLIP: mean = std = 0.5); zero views after an image's last."""
        per_image = []
        for inst in instances:
            image = as_rgb(inst.image)
            geometry = self.geometry(*image.size)
            canvas = resize_and_pad(image, geometry.resolution)
            views = [image.resize((self.view_size, self.view_size), Image.BICUBIC)]
            views += [canvas.crop((x, y, x + self.view_size, y + self.view_size))
                      for y in range(0, geometry.resolution[1], self.view_size)
                      for x in range(0, geometry.resolution[0], self.view_size)]
            pixels = torch.from_numpy(np.stack([np.asarray(v, dtype=np.float32) for v in views])) / 255.0
            per_image.append((pixels.permute(0, 3, 1, 2) - 0.5) / 0.5)
        out = torch.zeros(len(per_image), max(p.shape[0] for p in per_image), 3, self.view_size, self.view_size)
        for i, pixels in enumerate(per_image):
            out[i, :pixels.shape[0]] = pixels
        return out

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def reserved_ids(self) -> frozenset[int]:
        """The chat format's own markers: a prompt that brings one could forge a turn."""
        return frozenset(self.ids[name] for name in Specials.ALL if name != Specials.MASK)
