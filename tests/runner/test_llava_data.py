"""LLaVA `conversations` JSON datasets are read directly: any image size, mode and format, turns
kept, and every malformed record refused naming the file, record and field."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from disp_runner.data.dataset import load_dataset
from disp_runner.data.llava import replace_first_answer
from disp_runner.errors import UserInputError


def llava_folder(root, records, images=()):
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    for name, size, mode, fmt in images:
        Image.new(mode, size, 128).save(root / "images" / name, format=fmt)
    (root / "data.json").write_text(json.dumps(records))
    return root


RECORDS = [
    {"id": "a", "image": "images/a.jpg", "conversations": [
        {"from": "human", "value": "<image>\nDescribe this image."}, {"from": "gpt", "value": "A red circle."}]},
    {"id": 7, "image": "images/b.png", "source": "cc_sbu", "conversations": [
        {"from": "human", "value": "What is it?\n<image>"}, {"from": "gpt", "value": "A square."},
        {"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Blue."}]},
]
IMAGES = [("a.jpg", (640, 480), "RGB", "JPEG"), ("b.png", (300, 500), "P", "PNG")]


def test_records_become_instances_with_their_turns_kept(tmp_path):
    instances = load_dataset(llava_folder(tmp_path / "llava", RECORDS, IMAGES))
    first, second = instances
    assert (first.id, first.prompt, first.response, first.image_size) == ("a", "Describe this image.", "A red circle.",
                                                                          (640, 480))
    assert (second.id, second.prompt, second.response) == ("7", "What is it?", "A square.")
    assert second.image.mode == "RGB" and second.image_size == (300, 500)  # a palette PNG, converted when used
    assert second.metadata["source"] == "cc_sbu" and len(second.metadata["conversations"]) == 4
    relabeled = replace_first_answer(second, "A green square.", {**second.metadata, "original_response": "A square."})
    turns = relabeled.metadata["conversations"]
    assert relabeled.response == "A green square." and [t["value"] for t in turns[1::2]] == ["A green square.", "Blue."]
    assert second.metadata["conversations"][1]["value"] == "A square."  # the original is untouched


@pytest.mark.parametrize("change, message", [
    (lambda r: r[0].pop("image"), r"record 0 \(id a\): no 'image'"),
    (lambda r: r[0].update(conversations=[{"from": "gpt", "value": "x"}]), r"record 0 \(id a\): no human turn"),
    (lambda r: r[0].update(conversations=[{"from": "human", "value": "<image> q"}]), r"no assistant \('gpt'\) turn"),
    (lambda r: r[0].update(conversations="hello"), r"'conversations' must be a list"),
    (lambda r: r[1].update(image="../../etc/passwd"), r"record 1 \(id 7\): field 'image' must be a relative path inside"),
    (lambda r: r[1].update(image="images/missing.png"), r"record 1 \(id 7\): image file .* does not exist"),
    (lambda r: r[1].update(id="a"), r"record 1: duplicate id 'a' \(first in record 0\)"),
    (lambda r: r[0].update(id=True), r"record 0: 'id' must be a non-empty string or an integer"),
])
def test_malformed_records_are_refused_naming_record_and_field(tmp_path, change, message):
    records = json.loads(json.dumps(RECORDS))
    change(records)
    with pytest.raises(UserInputError, match=message):
        load_dataset(llava_folder(tmp_path / "llava", records, IMAGES))


def test_unreadable_images_and_files_are_named(tmp_path):
    folder = llava_folder(tmp_path / "llava", RECORDS, IMAGES)
    (folder / "images" / "a.jpg").write_bytes(b"not an image")
    with pytest.raises(UserInputError, match=r"record 0 \(id a\): image file .*a.jpg is unreadable"):
        load_dataset(folder)
    (folder / "data.json").write_text("{ not json")
    with pytest.raises(UserInputError, match=r"data.json: not a LLaVA JSON"):
        load_dataset(folder)
    (folder / "more.json").write_text("[]")
    with pytest.raises(UserInputError, match=r"2 JSON files"):
        load_dataset(folder)
