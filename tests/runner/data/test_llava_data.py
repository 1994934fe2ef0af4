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
    (lambda r: r[0].update(image=""), r"record 0 \(id a\): 'image' must name an image file"),
    (lambda r: r[0].update(image=["x.png", "y.png"]), r"record 0 \(id a\): 'image' lists 2 images; .*single-image"),
    (lambda r: r[0].update(conversations=[{"from": "gpt", "value": "x"}]),
     r"record 0 \(id a\): 'conversations' needs a human turn followed by an assistant turn"),
    (lambda r: r[0].update(conversations=[{"from": "human", "value": "<image> q"}]),
     r"needs a human turn followed by an assistant turn \(roles human/user and gpt/assistant\)"),
    (lambda r: [x.pop("image") for x in r], r"all 2 records are text-only"),
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


def test_the_answer_is_read_and_rewritten_at_the_same_turn_whatever_comes_first(tmp_path):
    """A conversation that opens with the assistant (a greeting) or uses the chat template's roles:
    the response is the first assistant turn after the first human turn, and relabel rewrites that
    turn, not the greeting."""
    records = [{"id": "g", "image": "images/a.jpg", "conversations": [
        {"from": "assistant", "value": "Hello! Ask me about the image."},
        {"from": "user", "value": "<image>\nWhat is shown?"}, {"from": "assistant", "value": "A poisoned answer."}]}]
    (inst,) = load_dataset(llava_folder(tmp_path / "llava", records, IMAGES[:1]))
    assert (inst.prompt, inst.response) == ("What is shown?", "A poisoned answer.")
    turns = replace_first_answer(inst, "A clean answer.", inst.metadata).metadata["conversations"]
    assert [t["value"] for t in turns] == ["Hello! Ask me about the image.", "<image>\nWhat is shown?",
                                           "A clean answer."]


def test_text_only_records_are_left_out_unchanged_and_counted(tmp_path, capsys):
    records = [*RECORDS, {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    instances = load_dataset(llava_folder(tmp_path / "llava", records, IMAGES))
    assert [inst.id for inst in instances] == ["a", "7"]
    assert "1 text-only records left out and unchanged" in capsys.readouterr().err


@pytest.mark.parametrize("mode, value, expected", [("I;16", 32896, 128), ("I;16", 65535, 255), ("I", 32896, 128),
                                                   ("I", 200, 200), ("F", 0.5, 128), ("L", 77, 77)])
def test_images_with_more_than_8_bits_keep_their_brightness(tmp_path, mode, value, expected):
    """Pillow's own RGB conversion clips 16-bit grey at 255 (an all-white image); the loader scales."""
    from disp_runner.data.instances import as_rgb
    assert as_rgb(Image.new(mode, (4, 4), value)).getpixel((1, 1)) == (expected,) * 3
    Image.new("I;16", (8, 8), 32896).save(tmp_path / "grey16.png")
    records = [{"id": "g", "image": "grey16.png", "conversations": RECORDS[0]["conversations"]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    (inst,) = load_dataset(tmp_path)
    assert inst.image.getpixel((3, 3)) == (128, 128, 128)
