"""LLaDA-V's "anyres_max_N" image geometry (LLaVA-OneVision's), as pure functions shared by the
processor (which cuts the views and lays the visual tokens out) and the model (which packs them).

An image becomes a *base view* (the whole image squashed to one view) plus a grid of crops of the
image resized and padded to the best of the `image_grid_pinpoints` resolutions. Each view gives
side x side tokens (27 x 27 for SigLIP so400m-patch14-384). The crops' tokens form one map, from
which the padding is cut away ("unpad"); a map larger than N views' worth of tokens (by more than
10%) is shrunk bilinearly; a newline token ends each row. Tokens = side² + rows · (cols + 1).

Derived from the LLaDA-V and LLaVA code (llava_arch.py, mm_utils.py), not from the published
checkpoint files, which no machine here can reach.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from PIL import Image


def expand_pinpoints(pinpoints: str | list, view_size: int) -> list[tuple[int, int]]:
    """`image_grid_pinpoints` as (width, height) pairs: a list of pairs, or LLaVA's range string
    "(1x1),...,(6x6)", which means every (i·view, j·view) for i, j from the first to the last."""
    if isinstance(pinpoints, str):
        found = re.findall(r"\((\d+)x(\d+)\)", pinpoints)
        if len(found) < 2:
            raise ValueError(f"image_grid_pinpoints {pinpoints!r}: expected a range like '(1x1),...,(6x6)'")
        (lo_w, lo_h), (hi_w, hi_h) = (tuple(map(int, pair)) for pair in (found[0], found[-1]))
        return [(i * view_size, j * view_size) for i in range(lo_w, hi_w + 1) for j in range(lo_h, hi_h + 1)]
    pairs = [tuple(int(v) for v in pair) for pair in pinpoints]
    if not pairs or any(len(p) != 2 or min(p) <= 0 for p in pairs):
        raise ValueError(f"image_grid_pinpoints {pinpoints!r}: expected [[width, height], ...] of positive sizes")
    return pairs  # type: ignore[return-value]


def select_best_resolution(width: int, height: int, candidates: list[tuple[int, int]]) -> tuple[int, int]:
    """The candidate (width, height) that keeps most of the image's pixels, then wastes fewest."""
    best, best_effective, best_waste = candidates[0], -1, math.inf
    for cand_w, cand_h in candidates:
        scale = min(cand_w / width, cand_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        waste = cand_w * cand_h - effective
        if effective > best_effective or (effective == best_effective and waste < best_waste):
            best, best_effective, best_waste = (cand_w, cand_h), effective, waste
    return best


def resize_and_pad(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """The image scaled to fit `target` (width, height), keeping its aspect ratio (sizes rounded up),
    centred on black."""
    width, height = image.size
    target_w, target_h = target
    if target_w / width < target_h / height:
        new_w, new_h = target_w, min(math.ceil(height * target_w / width), target_h)
    else:
        new_w, new_h = min(math.ceil(width * target_h / height), target_w), target_h
    canvas = Image.new("RGB", target, (0, 0, 0))
    canvas.paste(image.convert("RGB").resize((new_w, new_h), Image.BICUBIC), ((target_w - new_w) // 2,
                                                                             (target_h - new_h) // 2))
    return canvas


def unpadded_crop(map_rows: int, map_cols: int, width: int, height: int) -> tuple[slice, slice]:
    """Rows and columns of a map_rows x map_cols token map of the resized-and-padded image that
    show the image, not the padding (LLaVA's unpad_image). The scale is computed first, as there:
    int(height * (cols / width)) and int(height * cols / width) round apart for a few sizes."""
    if width / height > map_cols / map_rows:
        new_rows = int(height * (map_cols / width))
        pad = (map_rows - new_rows) // 2
        return slice(pad, map_rows - pad), slice(0, map_cols)
    new_cols = int(width * (map_rows / height))
    pad = (map_cols - new_cols) // 2
    return slice(0, map_rows), slice(pad, map_cols - pad)


@dataclass(frozen=True)
class AnyresGeometry:
    """What one image becomes: `crops` = (across, down) crops of the `resolution` (width, height)
    it is resized and padded to; the crop map's rows/columns that survive unpadding; and the
    packed map's size after the optional shrink."""

    resolution: tuple[int, int]
    crops: tuple[int, int]
    unpadded: tuple[slice, slice]
    packed: tuple[int, int]  # rows, cols of the map after unpadding and shrinking (newlines not counted)
    side: int  # tokens per view side

    @property
    def views(self) -> int:
        return 1 + self.crops[0] * self.crops[1]

    @property
    def num_tokens(self) -> int:
        rows, cols = self.packed
        return self.side * self.side + rows * (cols + 1)


def anyres_geometry(width: int, height: int, view_size: int, side: int, pinpoints: list[tuple[int, int]],
                    max_views: int) -> AnyresGeometry:
    resolution = select_best_resolution(width, height, pinpoints)
    across, down = resolution[0] // view_size, resolution[1] // view_size
    rows_slice, cols_slice = unpadded_crop(down * side, across * side, width, height)
    rows, cols = rows_slice.stop - rows_slice.start, cols_slice.stop - cols_slice.start
    times = math.sqrt(rows * cols / (max_views * side * side))
    if times > 1.1:  # LLaVA-OneVision: more than ~N views' worth of tokens is shrunk to about N
        rows, cols = int(rows // times), int(cols // times)
    return AnyresGeometry(resolution, (across, down), (rows_slice, cols_slice), (rows, cols), side)


def max_views_of(image_aspect_ratio: str) -> int:
    """N of "anyres_max_N" (LLaDA-V trains with anyres_max_4)."""
    match = re.fullmatch(r"anyres_max_(\d+)", image_aspect_ratio)
    if not match or int(match.group(1)) < 1:
        raise ValueError(f"image_aspect_ratio {image_aspect_ratio!r}: only 'anyres_max_N' is supported")
    return int(match.group(1))
