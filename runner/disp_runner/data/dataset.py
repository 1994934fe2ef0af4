"""The dataset format the operator reads from MinIO and every stage reads and writes:

    <dataset>/manifest.jsonl   one JSON object per line:
                               {"id": str, "image": "images/<file>.png", "prompt": str,
                                "response": str, "metadata": {...}}   (metadata optional)
    <dataset>/images/*.png     RGB images, all of the model's image size

`load_dataset` validates every line and every image and raises `UserInputError` naming the file
and line at fault; `write_dataset` writes to a temporary folder and renames it into place, so a
crash never leaves a half-written dataset that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from PIL import Image, UnidentifiedImageError

from disp_runner.errors import UserInputError
from disp_runner.safepaths import resolve_inside

MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"
REQUIRED_FIELDS = {"id": str, "image": str, "prompt": str, "response": str}
# Checked from the PNG header before any pixel is decoded: a small file can claim a huge image.
MAX_IMAGE_PIXELS = 4096 * 4096


@dataclass
class Instance:
    """One multimodal instruction: an image, a prompt and the assistant's response."""

    id: str
    prompt: str
    response: str
    image: Image.Image
    metadata: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> "Instance":
        values = {"id": self.id, "prompt": self.prompt, "response": self.response,
                  "image": self.image, "metadata": dict(self.metadata)}
        values.update(changes)
        return Instance(**values)


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
                inst.image.convert("RGB").save(staging / rel, format="PNG")
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
) -> list[Instance]:
    """Read and validate a dataset folder. `image_size` (pixels, square) is enforced when given."""
    folder = Path(folder)
    manifest = folder / MANIFEST_NAME
    if not manifest.is_file():
        raise UserInputError(f"{manifest}: dataset manifest not found")
    instances: list[Instance] = []
    seen: dict[str, int] = {}
    with open(manifest, encoding="utf-8", errors="strict") as handle:
        for line_no, line in _numbered_lines(handle, manifest):
            if not line.strip():
                continue
            where = f"{manifest}:{line_no}"
            record = _parse_record(line, where)
            if record["id"] in seen:
                raise UserInputError(f"{where}: duplicate id {record['id']!r} (first on line {seen[record['id']]})")
            seen[record["id"]] = line_no
            image = _load_image(folder, record["image"], where, image_size)
            instances.append(Instance(id=record["id"], prompt=record["prompt"], response=record["response"],
                                      image=image, metadata=record.get("metadata") or {}))
    if not instances:
        raise UserInputError(f"{manifest}: dataset is empty")
    return instances


def _numbered_lines(handle, manifest: Path):
    line_no = 0
    try:
        for line_no, line in enumerate(handle, start=1):
            yield line_no, line
    except UnicodeDecodeError:
        raise UserInputError(f"{manifest}: not UTF-8 text (after line {line_no})") from None


def _parse_record(line: str, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name, kind in REQUIRED_FIELDS.items():
        if name not in record:
            raise UserInputError(f"{where}: missing field {name!r}")
        if not isinstance(record[name], kind) or not record[name].strip():
            raise UserInputError(f"{where}: field {name!r} must be a non-empty string")
    if "metadata" in record and record["metadata"] is not None and not isinstance(record["metadata"], dict):
        raise UserInputError(f"{where}: field 'metadata' must be an object")
    unknown = set(record) - set(REQUIRED_FIELDS) - {"metadata"}
    if unknown:
        raise UserInputError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
    return record


def _load_image(folder: Path, rel: str, where: str, image_size: int | None) -> Image.Image:
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
            img.load()
            image = img.copy()
    except Image.DecompressionBombError:
        raise UserInputError(f"{where}: image file {path} claims too many pixels (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise UserInputError(f"{where}: image file {path} is unreadable ({exc.__class__.__name__})") from None
    if image.mode != "RGB":
        raise UserInputError(f"{where}: image file {path} has mode {image.mode}, expected RGB")
    return image


def instances_by_task(instances: Sequence[Instance]) -> dict[str, list[Instance]]:
    groups: dict[str, list[Instance]] = {}
    for inst in instances:
        groups.setdefault(str(inst.metadata.get("task", "unknown")), []).append(inst)
    return groups
