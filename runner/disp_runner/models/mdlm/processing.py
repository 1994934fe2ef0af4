"""The embedded family's layout: one `<image>` placeholder per patch, then the prompt.

    [PAD ...] [<image> x T] [prompt tokens] [response tokens]
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from disp_runner.data.instances import Instance
from disp_runner.errors import UserInputError
from disp_runner.models.base import Processor, TokenGrid, VisualLayout, images_to_tensor
from disp_runner.models.mdlm.configuration import MDLMConfig
from disp_runner.models.mdlm.tokenization import SpecialTokens


class MDLMProcessor(Processor):
    config: MDLMConfig

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: MDLMConfig, where: str = "model"):
        super().__init__(tokenizer, config, where)
        image_id = tokenizer.convert_tokens_to_ids(SpecialTokens.IMAGE)
        if image_id != config.image_token_id:
            raise UserInputError(f"{where}: the tokenizer's {SpecialTokens.IMAGE} id {image_id} differs from "
                                 f"config.image_token_id {config.image_token_id}")

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def visual_layout(self, width: int, height: int) -> VisualLayout:
        """One token per patch, row-major (every image has the model's size; encode checks)."""
        side, patch = self.config.image_size // self.config.patch_size, self.config.patch_size
        return VisualLayout.single_grid(TokenGrid(side, side, patch, patch))

    def visual_prefix(self, layout: VisualLayout) -> tuple[list[int], int]:
        return [self.config.image_token_id] * layout.num_tokens, 0

    def pixel_values(self, instances: Sequence[Instance]) -> torch.Tensor:
        return images_to_tensor(instances, self.config.image_size)

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    @property
    def reserved_ids(self) -> frozenset[int]:
        return frozenset({self.config.image_token_id})
