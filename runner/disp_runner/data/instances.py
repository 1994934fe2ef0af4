"""One multimodal instruction (`Instance`: an image, a prompt, a response) and the images behind it:
held in memory, or a file whose header was checked and which is decoded only when used. Every
dataset format (dataset.py's own, llava.py's LLaVA JSON) builds instances from these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from disp_runner.errors import UserInputError
from disp_runner.safepaths import resolve_inside

MAX_IMAGE_PIXELS = 4096 * 4096


def as_rgb(img: Image.Image) -> Image.Image:
    """`img` in 8-bit RGB with its brightness kept. Pillow's own convert("RGB") clips the modes with
    more than 8 bits per sample (16-bit greyscale "I;16", 32-bit "I", float "F") at 255, which turns
    an ordinary 16-bit PNG white; those are scaled from their full range instead."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        import numpy as np

        values = np.asarray(img, dtype=np.float64)
        if img.mode == "F" and values.size and np.nanmax(values) <= 1.0:
            full_range = 1.0  # a float image in [0, 1]
        elif img.mode == "F" or (values.size and np.nanmax(values) <= 255):
            full_range = 255.0  # already 8-bit values held in a wider type
        else:
            full_range = 65535.0
        grey = np.clip(np.nan_to_num(values) * (255.0 / full_range), 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return img.convert("RGB")


@dataclass(frozen=True)
class ImageFile:
    """An image file whose header was checked; decoded each time it is used, never kept."""

    path: Path
    size: tuple[int, int]  # width, height
    where: str  # the manifest line that names it, for errors
    to_rgb: bool = False  # convert other modes (palette, grey, alpha) to RGB when decoding

    def decode(self) -> Image.Image:
        try:
            with Image.open(self.path) as img:
                if img.size != self.size:
                    raise UserInputError(f"{self.where}: image file {self.path} changed size since the dataset was read")
                img.load()
                return as_rgb(img) if self.to_rgb else img.copy()
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            raise UserInputError(f"{self.where}: image file {self.path} is unreadable ({exc.__class__.__name__})") from None


@dataclass(frozen=True)
class TransformedImage:
    """An image with a size-preserving transform (e.g. a blur) applied when it is decoded."""

    source: "Image.Image | ImageFile | TransformedImage"
    transform: Callable[[Image.Image], Image.Image]

    @property
    def size(self) -> tuple[int, int]:
        return self.source.size

    def decode(self) -> Image.Image:
        return self.transform(self.source if isinstance(self.source, Image.Image) else self.source.decode())


ImageSource = Image.Image | ImageFile | TransformedImage


class Instance:
    """One multimodal instruction: an image, a prompt and the assistant's response. The image is
    held in memory (synthetic data) or read from its file each time `image` is asked for."""

    __slots__ = ("id", "prompt", "response", "metadata", "_image")

    def __init__(self, id: str, prompt: str, response: str, image: ImageSource,
                 metadata: dict[str, Any] | None = None):
        self.id, self.prompt, self.response = id, prompt, response
        self.metadata: dict[str, Any] = {} if metadata is None else metadata
        self._image = image

    @property
    def image(self) -> Image.Image:
        return self._image if isinstance(self._image, Image.Image) else self._image.decode()

    @property
    def image_size(self) -> tuple[int, int]:
        """(width, height), without decoding the image."""
        return self._image.size

    def replace(self, **changes: Any) -> "Instance":
        values = {"id": self.id, "prompt": self.prompt, "response": self.response, "image": self._image,
                  "metadata": dict(self.metadata)}
        values.update(changes)
        return Instance(**values)

    def map_image(self, transform: Callable[[Image.Image], Image.Image]) -> "Instance":
        """The same instance whose image gets `transform` (size-preserving) when it is decoded."""
        return self.replace(image=TransformedImage(self._image, transform))

    def __repr__(self) -> str:
        return f"Instance(id={self.id!r}, prompt={self.prompt!r}, response={self.response!r}, image_size={self.image_size})"


def with_prompt(instances: list[Instance], prompt: str | None) -> list[Instance]:
    """The instances asked `prompt` instead of their own question (unchanged when None): what
    relabel's fixed purification prompt (spec.relabel.prompt) makes of them."""
    return instances if prompt is None else [inst.replace(prompt=prompt) for inst in instances]


def load_image_file(folder: Path, rel: str, where: str, image_size: int | None, any_mode: bool = False) -> ImageFile:
    """The image `rel` names, its header checked; RGB only unless `any_mode` (then converted on use)."""
    # Manifests come from untrusted users: an image path must stay inside the dataset folder, also
    # through symbolic links.
    path = resolve_inside(folder, rel, f"{where}: field 'image'", inside="the dataset")
    if not path.is_file():
        raise UserInputError(f"{where}: image file {folder / rel} does not exist")
    try:
        with Image.open(path) as img:
            width, height = img.size  # from the header: nothing is decoded yet
            if image_size is not None and (width, height) != (image_size, image_size):
                raise UserInputError(f"{where}: image file {path} is {width}x{height}, "
                                     f"expected {image_size}x{image_size}")
            if width * height > MAX_IMAGE_PIXELS:
                raise UserInputError(f"{where}: image file {path} is {width}x{height}, more than "
                                     f"{MAX_IMAGE_PIXELS} pixels (a decompression bomb?)")
            mode = img.mode
    except Image.DecompressionBombError:
        raise UserInputError(f"{where}: image file {path} claims too many pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserInputError(f"{where}: image file {path} is unreadable ({exc.__class__.__name__})") from None
    if mode != "RGB" and not any_mode:
        raise UserInputError(f"{where}: image file {path} has mode {mode}, expected RGB")
    return ImageFile(path, (width, height), where, to_rgb=any_mode)


def instances_by_task(instances: Sequence[Instance]) -> dict[str, list[Instance]]:
    groups: dict[str, list[Instance]] = {}
    for inst in instances:
        groups.setdefault(str(inst.metadata.get("task", "unknown")), []).append(inst)
    return groups
