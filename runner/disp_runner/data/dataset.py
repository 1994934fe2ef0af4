"""The dataset format the operator reads from MinIO and every stage reads and writes:

    <dataset>/manifest.jsonl   one JSON object per line:
                               {"id": str, "image": "images/<file>.png", "prompt": str,
                                "response": str, "metadata": {...}}   (metadata optional)
    <dataset>/images/*.png     RGB images, all of the model's image size

`load_dataset` validates every line and every image's header and raises `UserInputError` naming
the file and line at fault; images are decoded only when a stage uses them (a batch at a time), so
memory does not grow with the dataset, and a file that turns out corrupt then is reported the same
way. `write_dataset` writes to a temporary folder and renames it into place, so a crash never
leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from disp_runner.errors import UserInputError
from disp_runner.safepaths import resolve_inside

MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"
REQUIRED_FIELDS = {"id": str, "image": str, "prompt": str, "response": str}
# Checked from the PNG header before any pixel is decoded: a small file can claim a huge image.
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


def write_dataset(instances: Iterable[Instance], out_dir: str | Path) -> Path:
    """Write instances as manifest.jsonl + PNGs; atomic at the folder level."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / IMAGES_DIR).mkdir()
        seen: set[str] = set()
        with open(staging / MANIFEST_NAME, "w", encoding="utf-8") as manifest:
            for index, inst in enumerate(instances):
                if inst.id in seen:
                    raise ValueError(f"duplicate instance id {inst.id!r}")
                seen.add(inst.id)
                # The position makes the name unique: ids that differ only in characters a file
                # name cannot hold ("x/1", "x_1") must not share an image.
                rel = f"{IMAGES_DIR}/{index:06d}-{_safe_file_stem(inst.id)}.png"
                as_rgb(inst.image).save(staging / rel, format="PNG")
                record = {"id": inst.id, "image": rel, "prompt": inst.prompt, "response": inst.response,
                          "metadata": inst.metadata}
                manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
        if not seen:
            raise ValueError("refusing to write an empty dataset")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _safe_file_stem(instance_id: str) -> str:
    return "".join(c if c.isascii() and (c.isalnum() or c in "-_") else "_" for c in instance_id)[:80]


def load_dataset(
    folder: str | Path,
    image_size: int | None = None,
    empty_responses: bool = False,
) -> list[Instance]:
    """Read and validate a dataset folder: this format (manifest.jsonl), or a LLaVA conversations
    JSON (see llava.py). `image_size` (pixels, square) is enforced when given. `empty_responses`:
    a response may be empty (a purified dataset that keeps empty relabel answers); a user's may not."""
    from disp_runner.data.llava import llava_json, load_llava  # llava.py builds on this module

    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        if folder.is_dir() and (found := llava_json(folder)) is not None:
            return load_llava(found, image_size)
        raise UserInputError(f"{manifest}: dataset manifest not found (nor a LLaVA JSON file)")
    instances: list[Instance] = []
    seen: dict[str, int] = {}
    with open(manifest, "rb") as handle:
        for line_no, line in _numbered_lines(handle, manifest):
            if not line.strip():
                continue
            where = f"{manifest}:{line_no}"
            record = _parse_record(line, where, empty_responses)
            if record["id"] in seen:
                raise UserInputError(f"{where}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
            seen[record["id"]] = line_no
            image = load_image_file(folder, record["image"], where, image_size)
            instances.append(Instance(id=record["id"], prompt=record["prompt"], response=record["response"],
                                      image=image, metadata=record.get("metadata") or {}))
    if not instances:
        raise UserInputError(f"{manifest}: dataset is empty")
    return instances


def _numbered_lines(handle, manifest: Path):
    """(line number, text) of a file opened in binary: each line decoded on its own, so a bad byte
    is reported on its own line (a text-mode reader decodes ahead, in blocks)."""
    for line_no, raw in enumerate(handle, start=1):
        try:
            yield line_no, raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserInputError(f"{manifest}:{line_no}: not UTF-8 text") from None


def _parse_record(line: str, where: str, empty_responses: bool = False) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in record:
            raise UserInputError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], kind):
            raise UserInputError(f"{where}: field {name!r} must be a non-empty string")
        if not record[name].strip() and not (empty_responses and name == "response"):
            raise UserInputError(f"{where}: field {name!r} must be a non-empty string")
    if "metadata" in record and record["metadata"] is not None and not isinstance(record["metadata"], dict):
        raise UserInputError(f"{where}: field 'metadata' must be an object")
    unknown = set(record) - set(REQUIRED_FIELDS) - {"metadata"}
    if unknown:
        raise UserInputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return record


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
