"""LLaVA-format datasets, read directly: a folder holding one JSON file, a list of records

    {"id": ..., "image": "relative/path.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

and the images it names (JPEG or PNG, any size and mode: converted to RGB when used). Each record
becomes one instance: the first human turn without its `<image>` marker is the prompt, the first
assistant turn the response, and the whole conversation is kept in metadata `conversations`, so a
multi-turn record keeps its later turns and relabel replaces its first assistant turn, as the
authors' DiSP does. DiSP's stages (and the fine-tune) use the first exchange only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from disp_runner.data.dataset import Instance, load_image_file
from disp_runner.errors import UserInputError

IMAGE_MARKER = "<image>"
HUMAN, ASSISTANT = "human", "gpt"
MAX_JSON_BYTES = 2 * 2**30


def llava_json(folder: Path) -> Path | None:
    """The folder's LLaVA JSON file, if it holds exactly one *.json file (and no manifest.jsonl)."""
    found = sorted(p for p in folder.glob("*.json") if p.is_file())
    if len(found) > 1:
        raise UserInputError(f"{folder}: {len(found)} JSON files ({', '.join(p.name for p in found[:3])}...); a "
                             "LLaVA dataset folder holds one")
    return found[0] if found else None


def load_llava(path: Path, image_size: int | None = None) -> list[Instance]:
    """Read and validate a LLaVA conversations JSON; images are resolved inside its folder (and
    must be `image_size` square when given)."""
    if path.stat().st_size > MAX_JSON_BYTES:
        raise UserInputError(f"{path}: {path.stat().st_size} bytes, more than {MAX_JSON_BYTES}")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserInputError(f"{path}: not a LLaVA JSON ({getattr(exc, 'msg', type(exc).__name__)})") from None
    if not isinstance(records, list) or not records:
        raise UserInputError(f"{path}: expected a non-empty JSON list of records")
    instances, seen = [], {}
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        inst = _instance(record, where, path.parent, image_size)
        if inst.id in seen:
            raise UserInputError(f"{where}: duplicate id {inst.id!r} (first in record {seen[inst.id]})")
        seen[inst.id] = index
        instances.append(inst)
    return instances


def _instance(record: Any, where: str, folder: Path, image_size: int | None) -> Instance:
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected an object, got {type(record).__name__}")
    record_id = record.get("id")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) or str(record_id).strip() == "":
        raise UserInputError(f"{where}: 'id' must be a non-empty string or an integer")
    where = f"{where} (id {record_id})"
    image = record.get("image")
    if not isinstance(image, str) or not image.strip():
        raise UserInputError(f"{where}: no 'image' (DiSP purifies image-grounded instructions; drop text-only records)")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("from"), str)
                                              and isinstance(t.get("value"), str) for t in turns):
        raise UserInputError(f"{where}: 'conversations' must be a list of {{\"from\": ..., \"value\": ...}} turns")
    human = next((i for i, t in enumerate(turns) if t["from"] == HUMAN), None)
    if human is None:
        raise UserInputError(f"{where}: no human turn")
    answer = next((i for i, t in enumerate(turns) if t["from"] == ASSISTANT and i > human), None)
    if answer is None:
        raise UserInputError(f"{where}: no assistant ('gpt') turn after the first human turn")
    prompt = turns[human]["value"].replace(IMAGE_MARKER, "").strip()
    response = turns[answer]["value"].strip()
    if not prompt or not response:
        raise UserInputError(f"{where}: the first human turn and the first assistant turn must not be empty")
    extra = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
    return Instance(id=str(record_id), prompt=prompt, response=response,
                    image=load_image_file(folder, image, where, image_size, any_mode=True),
                    metadata={**extra, "conversations": turns})


def replace_first_answer(inst: Instance, answer: str, metadata: dict[str, Any]) -> Instance:
    """The instance with `answer` as its response and `metadata`, and, for a LLaVA record, with
    `answer` as its first assistant turn (later turns kept)."""
    merged = dict(metadata)
    turns = merged.get("conversations")
    if isinstance(turns, list):
        first = next((i for i, t in enumerate(turns) if isinstance(t, dict) and t.get("from") == ASSISTANT), None)
        if first is not None:
            merged["conversations"] = [{**t, "value": answer} if i == first else t for i, t in enumerate(turns)]
    return inst.replace(response=answer, metadata=merged)
