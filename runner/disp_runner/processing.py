"""Turning instances into model tensors (and generated ids back into text).

Every sequence is left-padded to a common length so the response always occupies the last
`gen_length` positions: loss, decoding and saliency then index the response block the same way
for every row of a batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from disp_runner.data.dataset import Instance
from disp_runner.errors import UserInputError
from disp_runner.modeling import MDLMConfig
from disp_runner.tokenization import SpecialTokens


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # [B, L] (response positions hold the clean response, or [MASK] for generation)
    attention_mask: torch.Tensor  # [B, L] 1 = real token, 0 = left padding
    pixel_values: torch.Tensor  # [B, C, H, W] float in [0, 1]
    response_mask: torch.Tensor  # [B, L] True on the last gen_length positions

    def to(self, device: torch.device | str) -> "EncodedBatch":
        return EncodedBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.pixel_values,
                                                      self.response_mask)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def image_to_tensor(instances: Sequence[Instance], image_size: int) -> torch.Tensor:
    arrays = []
    for inst in instances:
        if inst.image.size != (image_size, image_size):
            raise UserInputError(f"instance {inst.id}: image is {inst.image.size[0]}x{inst.image.size[1]}, "
                                 f"model expects {image_size}x{image_size}")
        arrays.append(np.asarray(inst.image.convert("RGB"), dtype=np.uint8))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
    return pixels.float() / 255.0


def encode_instances(
    tokenizer: PreTrainedTokenizerBase,
    config: MDLMConfig,
    instances: Sequence[Instance],
    gen_length: int,
    with_response: bool = True,
) -> EncodedBatch:
    """Tokenize prompts (+ responses padded with [EOS] to `gen_length`, or [MASK]s to generate)."""
    image_id = tokenizer.convert_tokens_to_ids(SpecialTokens.IMAGE)
    if image_id != config.image_token_id or tokenizer.mask_token_id != config.mask_token_id:
        raise UserInputError("tokenizer and model config disagree on the <image> or [MASK] token id")
    prompts = tokenizer([inst.prompt for inst in instances], add_special_tokens=False)["input_ids"]
    rows: list[list[int]] = []
    special = {image_id, tokenizer.mask_token_id}
    for inst, prompt_ids in zip(instances, prompts):
        if special & set(prompt_ids):  # the model's own placeholders: a prompt cannot bring images or masks
            raise UserInputError(f"instance {inst.id}: the prompt contains the model's {SpecialTokens.IMAGE} "
                                 "or [MASK] token, which only the runner may place")
        positions = config.num_image_tokens + len(prompt_ids) + gen_length
        if positions > config.max_position_embeddings:
            raise UserInputError(
                f"instance {inst.id}: {config.num_image_tokens} visual tokens + a {len(prompt_ids)}-token prompt + "
                f"genLength {gen_length} = {positions} positions, more than the model's "
                f"{config.max_position_embeddings} (max_position_embeddings)")
        if with_response:
            response_ids = tokenizer(inst.response, add_special_tokens=False)["input_ids"]
            if len(response_ids) > gen_length:
                raise UserInputError(f"instance {inst.id}: response has {len(response_ids)} tokens, "
                                     f"more than gen_length {gen_length}")
            response_ids = response_ids + [tokenizer.eos_token_id] * (gen_length - len(response_ids))
        else:
            response_ids = [tokenizer.mask_token_id] * gen_length
        rows.append([image_id] * config.num_image_tokens + prompt_ids + response_ids)
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row):] = torch.tensor(row)
        attention_mask[i, length - len(row):] = 1
    response_mask = torch.zeros((len(rows), length), dtype=torch.bool)
    response_mask[:, length - gen_length:] = True
    return EncodedBatch(input_ids, attention_mask, image_to_tensor(instances, config.image_size), response_mask)


def decode_responses(tokenizer: PreTrainedTokenizerBase, response_ids: torch.Tensor) -> list[str]:
    """Generated response ids [B, G] -> text, cut at the first [EOS]."""
    texts = []
    for row in response_ids.tolist():
        if tokenizer.eos_token_id in row:
            row = row[: row.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return texts
