"""Image triggers: a BadNets-style patch and a Blended pattern, either built in or from a PNG."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from disp_api import Corner, TriggerKind, TriggerSpec
from disp_runner.errors import UserInputError

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
BLEND_KEY_GRID = 6  # resolution of the built-in blend key before it is smoothed up to image size


def _load_pattern(path: str, field: str) -> Image.Image:
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{field}: pattern image {file} does not exist")
    try:
        with Image.open(file) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise UserInputError(f"{field}: pattern image {file} is unreadable ({exc.__class__.__name__})") from None


@dataclass(frozen=True)
class Trigger:
    """A trigger resolved against an image size: `apply` stamps it, `box` says where it is."""

    spec: TriggerSpec
    image_size: int

    def __post_init__(self) -> None:
        if self.spec.kind is TriggerKind.PATCH:
            w, h = self._patch().size
            x, y = self._patch_origin(w, h)
            if x + w > self.image_size or y + h > self.image_size:
                raise UserInputError(f"trigger: a {w}x{h} patch at ({x}, {y}) does not fit a "
                                     f"{self.image_size}x{self.image_size} image")

    def _patch(self) -> Image.Image:
        if self.spec.pattern:
            return _load_pattern(self.spec.pattern, "trigger.pattern")
        return Image.new("RGB", (self.spec.size, self.spec.size), tuple(self.spec.colour))

    def _patch_origin(self, w: int, h: int) -> tuple[int, int]:
        if self.spec.position is not None:
            return self.spec.position
        right = self.image_size - w
        bottom = self.image_size - h
        return {
            Corner.TOP_LEFT: (0, 0),
            Corner.TOP_RIGHT: (right, 0),
            Corner.BOTTOM_LEFT: (0, bottom),
            Corner.BOTTOM_RIGHT: (right, bottom),
        }[self.spec.corner]

    def _blend_pattern(self) -> np.ndarray:
        if self.spec.pattern:
            img = _load_pattern(self.spec.pattern, "trigger.pattern").resize((self.image_size, self.image_size))
            return np.asarray(img, dtype=np.float64)
        # Built-in key: a fixed random colour field, smooth like the photo keys of the Blended
        # attack (per-pixel noise would average out inside a patch and never reach the tokens).
        rng = np.random.default_rng(self.spec.pattern_seed)
        coarse = rng.integers(0, 256, size=(BLEND_KEY_GRID, BLEND_KEY_GRID, 3)).astype(np.uint8)
        key = Image.fromarray(coarse, mode="RGB").resize((self.image_size, self.image_size), Image.BILINEAR)
        return np.asarray(key, dtype=np.float64)

    def box(self) -> Box:
        """Pixels the trigger covers (the whole image for a blended trigger)."""
        if self.spec.kind is TriggerKind.BLENDED:
            return (0, 0, self.image_size, self.image_size)
        w, h = self._patch().size
        x, y = self._patch_origin(w, h)
        return (x, y, x + w, y + h)

    def apply(self, image: Image.Image) -> Image.Image:
        if image.size != (self.image_size, self.image_size):
            raise UserInputError(f"trigger: image is {image.size[0]}x{image.size[1]}, trigger was built for "
                                 f"{self.image_size}x{self.image_size}")
        if self.spec.kind is TriggerKind.PATCH:
            out = image.convert("RGB").copy()
            x0, y0, _, _ = self.box()
            out.paste(self._patch(), (x0, y0))
            return out
        mixed = (1.0 - self.spec.alpha) * np.asarray(image.convert("RGB"), dtype=np.float64) \
            + self.spec.alpha * self._blend_pattern()
        return Image.fromarray(np.clip(np.rint(mixed), 0, 255).astype(np.uint8), mode="RGB")


def patch_tokens_covered(box: Box, image_size: int, patch_size: int) -> list[int]:
    """Indices (row-major) of the visual tokens whose patch overlaps `box`."""
    x0, y0, x1, y1 = box
    grid = image_size // patch_size
    return [r * grid + c for r in range(grid) for c in range(grid)
            if c * patch_size < x1 and (c + 1) * patch_size > x0 and r * patch_size < y1 and (r + 1) * patch_size > y0]
