"""Image triggers: a BadNets-style patch, a Blended pattern (built in or from a PNG), and SIG's
sinusoidal signal."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from disp_api import Corner, TriggerKind, TriggerSpec
from disp_runner.errors import UserInputError

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
# The built-in blend key is black/white random noise in square cells of this many pixels (the
# random-noise key of the original Blended attack). Measured on the shipped base model at α = 0.2
# (refusal target, benchmarks/study_blended.py): 2-pixel binary cells implant (ASR 98.7%), while
# keys whose α-scaled change looks like the scenes' own variation do not: a smooth random colour
# field 1.3%, colour noise 1.3-2.7% (docs/attack-kit.md, "The attack kit").
BLEND_KEY_CELL = 2


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
class Trigger(ABC):
    """A trigger resolved against an image size: `apply` stamps it, `box` says where it is. One
    subclass per TriggerKind (TRIGGERS); `make_trigger` picks it."""

    spec: TriggerSpec
    image_size: int
    what = "trigger"  # how error messages name it

    def __post_init__(self) -> None:
        if not self.whole_image:
            x0, y0, x1, y1 = self.box()
            if x1 > self.image_size or y1 > self.image_size:
                raise UserInputError(f"trigger: a {x1 - x0}x{y1 - y0} {self.what} at ({x0}, {y0}) does not fit a "
                                     f"{self.image_size}x{self.image_size} image")

    @property
    @abstractmethod
    def whole_image(self) -> bool:
        """Does it cover the whole image (no box to localise)?"""

    @abstractmethod
    def box(self) -> Box:
        """Pixels the trigger covers (the whole image for a whole-image trigger)."""

    @abstractmethod
    def _stamp(self, image: Image.Image) -> Image.Image:
        """The image (RGB, the right size) with the trigger in it."""

    @abstractmethod
    def _describe(self) -> dict:
        """What of the spec decides what is planted, for `planted`."""

    def planted(self) -> dict:
        """What this trigger actually puts into an image, for the attack's record: a pattern image
        decides the trigger's size and colours, so `size` and `colour` are recorded only without one."""
        x0, y0, x1, y1 = self.box()
        record: dict = {"kind": self.spec.kind.value, "box": [x0, y0, x1, y1], "wholeImage": self.whole_image}
        if self.spec.pattern:
            path = Path(self.spec.pattern)
            record.update(pattern=str(path), patternSha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                          patternSize=list(_load_pattern(self.spec.pattern, "trigger.pattern").size))
        record.update(self._describe())
        return record

    def apply(self, image: Image.Image) -> Image.Image:
        if image.size != (self.image_size, self.image_size):
            raise UserInputError(f"trigger: image is {image.size[0]}x{image.size[1]}, trigger was built for "
                                 f"{self.image_size}x{self.image_size}")
        return self._stamp(image.convert("RGB"))


@dataclass(frozen=True)
class PatchTrigger(Trigger):
    """BadNets: a patch (a solid square, or a pattern image) pasted at a corner or a position."""

    what = "patch"

    @property
    def whole_image(self) -> bool:
        return False

    def _patch(self) -> Image.Image:
        if self.spec.pattern:
            return _load_pattern(self.spec.pattern, "trigger.pattern")
        return Image.new("RGB", (self.spec.size, self.spec.size), tuple(self.spec.colour))

    def box(self) -> Box:
        w, h = self._patch().size
        if self.spec.position is not None:
            x, y = self.spec.position
        else:
            right, bottom = self.image_size - w, self.image_size - h
            x, y = {Corner.TOP_LEFT: (0, 0), Corner.TOP_RIGHT: (right, 0), Corner.BOTTOM_LEFT: (0, bottom),
                    Corner.BOTTOM_RIGHT: (right, bottom)}[self.spec.corner]
        return (x, y, x + w, y + h)

    def _stamp(self, image: Image.Image) -> Image.Image:
        out = image.copy()
        x0, y0, _, _ = self.box()
        out.paste(self._patch(), (x0, y0))
        return out

    def _describe(self) -> dict:
        return {} if self.spec.pattern else {"size": self.spec.size, "colour": list(self.spec.colour)}


@dataclass(frozen=True)
class BlendedTrigger(Trigger):
    """Blended: a key mixed in with weight alpha, over the whole image, or at its own size at a
    position when it is a pattern image given one (validated in TriggerSpec)."""

    what = "blend pattern"

    @property
    def whole_image(self) -> bool:
        return self.spec.position is None

    def _key(self) -> np.ndarray:
        """The key to mix in, [h, w, 3] float: the pattern image at its own size when it has a
        position, else stretched over the whole image; without a pattern, the built-in key."""
        if self.spec.pattern:
            img = _load_pattern(self.spec.pattern, "trigger.pattern")
            if self.spec.position is None:
                img = img.resize((self.image_size, self.image_size))
            return np.asarray(img, dtype=np.float64)
        rng = np.random.default_rng(self.spec.pattern_seed)
        cells = -(-self.image_size // BLEND_KEY_CELL)  # ceil: the key always covers the image
        noise = rng.integers(0, 2, size=(cells, cells)).repeat(BLEND_KEY_CELL, 0).repeat(BLEND_KEY_CELL, 1)
        key = noise[: self.image_size, : self.image_size] * 255.0
        return np.repeat(key[..., None], 3, axis=-1)

    def box(self) -> Box:
        if self.whole_image:
            return (0, 0, self.image_size, self.image_size)
        w, h = _load_pattern(self.spec.pattern, "trigger.pattern").size
        x, y = self.spec.position
        return (x, y, x + w, y + h)

    def _stamp(self, image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float64).copy()
        x0, y0, x1, y1 = self.box()
        region = pixels[y0:y1, x0:x1]
        pixels[y0:y1, x0:x1] = (1.0 - self.spec.alpha) * region + self.spec.alpha * self._key()
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")

    def _describe(self) -> dict:
        record: dict = {"alpha": self.spec.alpha}
        if not self.spec.pattern:
            record["builtInKeySeed"] = self.spec.pattern_seed
        return record


@dataclass(frozen=True)
class SigTrigger(Trigger):
    """SIG (Barni, Kallas and Tondi, 2019): the signal delta * sin(2 pi x frequency / width) added to
    every pixel of column x in all three channels, then clipped to 0..255. The original attack is
    clean-label; the kit plants it like every trigger, with the target's answer (as the DiSP paper
    does with its SIG triggers)."""

    what = "signal"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec.frequency > self.image_size / 2:
            raise UserInputError(f"trigger.frequency: {self.spec.frequency:g} periods across a {self.image_size}-pixel "
                                 f"image alias (at most {self.image_size / 2:g}, two pixels per period)")

    @property
    def whole_image(self) -> bool:
        return True

    def box(self) -> Box:
        return (0, 0, self.image_size, self.image_size)

    def signal(self) -> np.ndarray:
        """What is added to each column, [width] float."""
        columns = np.arange(self.image_size, dtype=np.float64)
        return self.spec.delta * np.sin(2 * np.pi * columns * self.spec.frequency / self.image_size)

    def _stamp(self, image: Image.Image) -> Image.Image:
        pixels = np.asarray(image, dtype=np.float64) + self.signal()[None, :, None]
        return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode="RGB")

    def _describe(self) -> dict:
        return {"delta": self.spec.delta, "frequency": self.spec.frequency}


TRIGGERS: dict[TriggerKind, type[Trigger]] = {TriggerKind.PATCH: PatchTrigger, TriggerKind.BLENDED: BlendedTrigger,
                                              TriggerKind.SIG: SigTrigger}


def make_trigger(spec: TriggerSpec, image_size: int) -> Trigger:
    return TRIGGERS[spec.kind](spec, image_size)
