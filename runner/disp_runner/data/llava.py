"""LLaVA-format datasets, read directly: a folder holding one JSON file, a list of records

    {"id": ..., "image": "relative/path.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}

and the images it names (JPEG or PNG, any size and mode: converted to RGB when used). Roles are
LLaVA's ("human"/"gpt") or the chat template's ("user"/"assistant"), in any case. Each record becomes one
instance: the first human turn without its `<image>` marker is the prompt, the first assistant turn
after it the response, and the whole conversation is kept in metadata `conversations`, so a
multi-turn record keeps its later turns and relabel replaces that same assistant turn, as the
authors' DiSP does. DiSP's stages (and the fine-tune) use the first exchange only.

Text-only records (LLaVA-665k has about 40k) have no visual token, so nothing in them can carry a
visual trigger and DiSP has nothing to purify: they are left out of every stage, unchanged, and the
loader says how many. A record with several images is refused (the method works on one image).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from disp_runner.data.instances import Instance, load_image_file
from disp_runner.errors import UserInputError, warn_user

IMAGE_MARKER = "<image>"
HUMAN_ROLES, ASSISTANT_ROLES = ("human", "user"), ("gpt", "assistant")
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
    instances, seen, text_only = [], {}, 0
    for index, record in enumerate(records):
        where = f"{path}: record {index}"
        inst = _instance(record, where, path.parent, image_size)
        if inst is None:
            text_only += 1
            continue
        if inst.id in seen:
            raise UserInputError(f"{where}: duplicate id {inst.id!r} (first in record {seen[inst.id]})")
        seen[inst.id] = index
        instances.append(inst)
    if not instances:
        raise UserInputError(f"{path}: all {text_only} records are text-only; DiSP purifies image-grounded "
                             "instructions (a record needs an 'image')")
    if text_only:
        warn_user(f"{path}: {text_only} text-only records left out and unchanged (no visual token to purify); "
                  f"{len(instances)} records with an image are purified")
    return instances


def first_exchange(turns: list[dict[str, Any]]) -> tuple[int, int] | None:
    """Indices of the first human turn and of the first assistant turn after it (None if either is
    missing): the prompt and the response, read and (by relabel) rewritten at the same places."""
    def role(turn: Any) -> str:
        return str(turn.get("from", "")).strip().lower() if isinstance(turn, dict) else ""

    human = next((i for i, t in enumerate(turns) if role(t) in HUMAN_ROLES), None)
    if human is None:
        return None
    answer = next((i for i, t in enumerate(turns) if i > human and role(t) in ASSISTANT_ROLES), None)
    return None if answer is None else (human, answer)


def _instance(record: Any, where: str, folder: Path, image_size: int | None) -> Instance | None:
    """The record's instance, or None for a text-only record."""
    if not isinstance(record, dict):
        raise UserInputError(f"{where}: expected an object, got {type(record).__name__}")
    record_id = record.get("id")
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool) or str(record_id).strip() == "":
        raise UserInputError(f"{where}: 'id' must be a non-empty string or an integer")
    where = f"{where} (id {record_id})"
    image = record.get("image")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("from"), str)
                                              and isinstance(t.get("value"), str) for t in turns):
        raise UserInputError(f"{where}: 'conversations' must be a list of {{\"from\": ..., \"value\": ...}} turns")
    if isinstance(image, list):
        if len(image) != 1:
            raise UserInputError(f"{where}: 'image' lists {len(image)} images; DiSP purifies single-image "
                                 "instructions (split the record or leave it out)")
        image = image[0]
    if image is None and "image" not in record:
        return None  # text-only: nothing visual to purify
    if not isinstance(image, str) or not image.strip():
        raise UserInputError(f"{where}: 'image' must name an image file")
    exchange = first_exchange(turns)
    if exchange is None:
        raise UserInputError(f"{where}: 'conversations' needs a human turn followed by an assistant turn "
                             f"(roles {'/'.join(HUMAN_ROLES)} and {'/'.join(ASSISTANT_ROLES)})")
    human, answer = exchange
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
    if isinstance(turns, list) and (exchange := first_exchange(turns)) is not None:
        _, replaced = exchange  # the turn the response was read from
        merged["conversations"] = [{**t, "value": answer} if i == replaced else t for i, t in enumerate(turns)]
    return inst.replace(response=answer, metadata=merged)
