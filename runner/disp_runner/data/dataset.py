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
from pathlib import Path
from typing import Any, Iterable

from disp_runner.folders import atomic_folder
from disp_runner.data.instances import Instance, as_rgb, load_image_file
from disp_runner.data.llava import llava_json, load_llava
from disp_runner.errors import UserInputError

MANIFEST_NAME = "manifest.jsonl"
IMAGES_DIR = "images"
REQUIRED_FIELDS = {"id": str, "image": str, "prompt": str, "response": str}
# Checked from the PNG header before any pixel is decoded: a small file can claim a huge image.
def write_dataset(instances: Iterable[Instance], out_dir: str | Path) -> Path:
    """Write instances as manifest.jsonl + PNGs; atomic at the folder level."""
    out_dir = Path(out_dir)
    with atomic_folder(out_dir) as staging:
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
