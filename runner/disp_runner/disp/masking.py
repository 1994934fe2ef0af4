"""Stage 2 of DiSP: mask the ⌊ρ·T_img⌋ most salient visual tokens."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from disp_api import MaskingFill
from disp_runner.data.instances import Instance
from disp_runner.disp.token_grid import seeing_tokens, tokens_covered
from disp_runner.errors import UserInputError
from disp_runner.models.base import VisualLayout, visual_token_mask


def tokens_to_mask(num_tokens: int, ratio: float) -> int:
    """⌊ρ·T⌋, the number of visual tokens DiSP masks per instance."""
    if not 0 < ratio <= 1:
        raise ValueError(f"mask ratio must be in (0, 1], got {ratio}")
    # The small epsilon keeps products like 0.3 * 10 (= 2.9999999999999996 in floats) at 3.
    return math.floor(ratio * num_tokens + 1e-9)


def check_ratio_masks_a_token(ratio: float, visual_tokens: int, field_name: str = "spec.masking.ratio") -> None:
    """A ratio that masks no visual token would "purify" by relabeling with the trigger intact.
    `visual_tokens`: the fewest any image of the dataset has."""
    if tokens_to_mask(visual_tokens, ratio) == 0:
        raise UserInputError(f"{field_name}: {ratio} masks no token of the model's {visual_tokens} visual "
                             f"tokens; the smallest ratio that masks one is {1 / visual_tokens:.4g}")


def top_salient_tokens(scores: torch.Tensor, ratio: float, lengths: Sequence[int] | None = None) -> list[list[int]]:
    """Indices of the ⌊ρ·T_i⌋ highest-scored tokens of each row, most salient first. scores: [N, T];
    `lengths` [N]: row i's image has T_i visual tokens, its first T_i scores (default: all T).
    Ties go to the lower index, so the choice is deterministic."""
    lengths = [scores.shape[1]] * scores.shape[0] if lengths is None else [int(n) for n in lengths]
    # A stable descending sort makes ties reproducible across runs and devices.
    return [torch.sort(row[:n], descending=True, stable=True).indices[:tokens_to_mask(n, ratio)].tolist()
            for row, n in zip(scores, lengths)]


def mask_image_embeds(image_embeds: torch.Tensor, masked: torch.Tensor | Sequence[Sequence[int]],
                      mask_embedding: torch.Tensor) -> torch.Tensor:
    """Replace the chosen visual tokens by e_MASK. image_embeds [B, T, D], masked: each row's token
    indices ([B, k], or lists of different lengths), mask_embedding [D] -> [B, T, D] (a new tensor)."""
    chosen = visual_token_mask(masked, image_embeds.shape[1], image_embeds.device)
    return torch.where(chosen[..., None], mask_embedding.to(image_embeds.dtype), image_embeds)


def trigger_localisation(masked: Sequence[int], trigger_tokens: Sequence[int]) -> float:
    """Fraction of the trigger-covering visual tokens that landed in the masked set."""
    if not trigger_tokens:
        raise ValueError("no trigger tokens to localise")
    chosen = set(masked)
    return sum(t in chosen for t in trigger_tokens) / len(trigger_tokens)


def paint_token_cells(image: Image.Image, layout: VisualLayout, tokens: Sequence[int],
                      fill: MaskingFill = MaskingFill.BORDER) -> Image.Image:
    """`masking.space: pixels`: the image with the cells the given visual tokens see painted over,
    so the vision tower never sees what they showed: in the median colour of its border (the
    scene's background, where it has one), or, with `fill` inpaint, drawn in from the pixels
    around the cells. Tokens that see no cell (row separators) paint nothing."""
    pixels = np.array(image.convert("RGB"))
    painted = np.zeros(pixels.shape[:2], dtype=np.uint8)
    chosen, side = set(tokens), 0
    for grid in layout.grids:
        for token, (x0, y0, x1, y1) in grid.cells():
            if token in chosen:
                painted[y0:y1, x0:x1] = 1
                side = max(side, x1 - x0, y1 - y0)
    if not painted.any():
        return Image.fromarray(pixels)
    if fill is MaskingFill.INPAINT and not painted.all():
        import cv2  # only this fill needs it

        # Telea's fast marching fills each painted pixel from the known ones around it, nearest
        # first, so a cell inside an object takes the object's colour and one on its edge the
        # edge's; each pixel's estimate weighs the known pixels within half a cell.
        return Image.fromarray(cv2.inpaint(pixels, painted, max(1, side // 2), cv2.INPAINT_TELEA))
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    pixels[painted.astype(bool)] = np.median(border, axis=0).astype(np.uint8)
    return Image.fromarray(pixels)


def known_trigger_tokens(inst: Instance, layout: VisualLayout) -> list[int] | None:
    """Visual tokens the instance's trigger covers, when its metadata says where it is and it is
    local (a patch or a positioned blend pattern; a full-image blend covers every token and
    cannot be localised). Metadata comes from the untrusted dataset: a malformed box is an error."""
    box = inst.metadata.get("trigger_box")
    if not box:
        return None
    width, height = inst.image_size
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, int) and not isinstance(v, bool)
                                                              for v in box)
            and 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height):
        raise UserInputError(f"instance {inst.id}: metadata.trigger_box must be [x0, y0, x1, y1], whole pixels "
                             f"inside the {width}x{height} image, got {box!r}")
    tokens = tokens_covered(layout, tuple(box))
    return tokens if 0 < len(tokens) < seeing_tokens(layout) else None
