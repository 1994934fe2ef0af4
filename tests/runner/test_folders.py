"""The one way the runner writes a folder or a record so that no reader sees half of it."""

from __future__ import annotations

import pytest

from disp_runner.folders import atomic_folder, write_atomically


def test_a_folder_appears_whole_and_replaces_the_old_one(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_folder(final) as staging:
        (staging / "a.txt").write_text("a")
        assert not (final / "a.txt").exists() and (final / "old.txt").exists()  # not yet visible
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging folder left


def test_a_failure_leaves_the_old_folder_and_no_staging(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(final) as staging:
            (staging / "half.txt").write_text("half")
            raise RuntimeError("disk full")
    assert [p.name for p in final.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_record_is_replaced_whole(tmp_path):
    path = tmp_path / "progress.json"
    write_atomically(path, "{}")
    write_atomically(path, b'{"done": 1}')
    assert path.read_text() == '{"done": 1}' and [p.name for p in tmp_path.iterdir()] == ["progress.json"]
