"""Synthetic data is deterministic by seed; the loader rejects every malformed input clearly."""

import hashlib
import json

import pytest
from PIL import Image

from disp_runner.data.dataset import MANIFEST_NAME, load_dataset, write_dataset
from disp_runner.data.synthetic import generate_dataset, generate_instances
from disp_runner.data.vocabulary import TaskKind
from disp_runner.errors import UserInputError


def _digest(folder):
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = generate_dataset(tmp_path / "a", 40, seed=7)
    b = generate_dataset(tmp_path / "b", 40, seed=7)
    c = generate_dataset(tmp_path / "c", 40, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_instances_cover_three_task_kinds_and_varied_scenes():
    instances = generate_instances(300, seed=3)
    kinds = {inst.metadata["task"] for inst in instances}
    assert kinds == {TaskKind.DESCRIBE.value, TaskKind.QUESTION.value, TaskKind.CLASSIFY.value}
    assert len({inst.metadata["class"] for inst in instances}) >= 5
    assert len({inst.metadata["colour"] for inst in instances}) >= 5
    assert {inst.metadata["count"] for inst in instances} == {1, 2, 3}
    for inst in instances:
        assert inst.metadata["answer_keys"], inst


def test_class_weights_shift_the_class_mix():
    instances = generate_instances(1000, seed=3, class_weights={"circle": 0.5})
    share = sum(inst.metadata["class"] == "circle" for inst in instances) / 1000
    assert 0.45 < share < 0.55
    with pytest.raises(ValueError, match="unknown class"):
        generate_instances(10, seed=3, class_weights={"dragon": 0.5})


def test_round_trip_and_manifest_format(tmp_path):
    folder = generate_dataset(tmp_path / "d", 5, seed=1)
    lines = (folder / MANIFEST_NAME).read_text().splitlines()
    record = json.loads(lines[0])
    assert set(record) == {"id", "image", "prompt", "response", "metadata"}
    assert record["image"].startswith("images/") and record["image"].endswith(".png")
    loaded = load_dataset(folder, image_size=48)
    assert [i.id for i in loaded] == [json.loads(line)["id"] for line in lines]
    assert loaded[0].image.size == (48, 48) and loaded[0].image.mode == "RGB"


@pytest.fixture
def dataset(tmp_path):
    return generate_dataset(tmp_path / "ds", 3, seed=1)


def _rewrite_line(folder, index, new_line):
    path = folder / MANIFEST_NAME
    lines = path.read_text().splitlines()
    lines[index] = new_line
    path.write_text("\n".join(lines) + "\n")


def _first_record(folder):
    return json.loads((folder / MANIFEST_NAME).read_text().splitlines()[0])


@pytest.mark.parametrize("mutate,message", [
    (lambda f: _rewrite_line(f, 1, "{not json"), r"manifest.jsonl:2: not valid JSON"),
    (lambda f: _rewrite_line(f, 0, json.dumps({k: v for k, v in _first_record(f).items() if k != "prompt"})),
     r"manifest.jsonl:1: missing field 'prompt'"),
    (lambda f: _rewrite_line(f, 0, json.dumps({**_first_record(f), "response": 3})),
     r"manifest.jsonl:1: field 'response' must be a non-empty string"),
    (lambda f: _rewrite_line(f, 0, json.dumps({**_first_record(f), "extra": 1})),
     r"manifest.jsonl:1: unknown field\(s\) extra"),
    (lambda f: _rewrite_line(f, 0, "[1, 2]"), r"manifest.jsonl:1: expected a JSON object"),
    (lambda f: _rewrite_line(f, 2, json.dumps({**_first_record(f), "id": "x", "image": "../../etc/passwd"})),
     r"manifest.jsonl:3: field 'image' must be a relative path inside the dataset"),
    (lambda f: _rewrite_line(f, 2, json.dumps(_first_record(f))), r"manifest.jsonl:3: duplicate id"),
    (lambda f: (f / _first_record(f)["image"]).unlink(), r"manifest.jsonl:1: image file .* does not exist"),
    (lambda f: (f / _first_record(f)["image"]).write_bytes(b"not a png"), r"manifest.jsonl:1: image file .* unreadable"),
    (lambda f: Image.new("RGB", (32, 48)).save(f / _first_record(f)["image"]),
     r"manifest.jsonl:1: image file .* is 32x48, expected 48x48"),
    (lambda f: Image.new("L", (48, 48)).save(f / _first_record(f)["image"]),
     r"manifest.jsonl:1: image file .* has mode L, expected RGB"),
    (lambda f: (f / MANIFEST_NAME).write_text("\n"), r"manifest.jsonl: dataset is empty"),
    (lambda f: (f / MANIFEST_NAME).unlink(), r"manifest.jsonl: dataset manifest not found"),
])
def test_malformed_datasets_are_rejected_naming_file_and_line(dataset, mutate, message):
    mutate(dataset)
    with pytest.raises(UserInputError, match=message):
        load_dataset(dataset, image_size=48)


def test_a_failed_write_leaves_no_dataset_behind(tmp_path):
    instances = generate_instances(3, seed=1)
    instances.append(instances[0])  # duplicate id fails mid-write
    with pytest.raises(ValueError, match="duplicate"):
        write_dataset(instances, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []
