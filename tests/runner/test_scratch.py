"""The stage pod's scratch folders: made inside $DISP_SCRATCH, nowhere else."""

import tempfile

from disp_runner.scratch import prepare_scratch


def test_the_folders_the_pod_env_names_inside_the_scratch_volume_are_made(tmp_path, monkeypatch):
    scratch, outside = tmp_path / "scratch", tmp_path / "elsewhere"
    scratch.mkdir()
    env = {"DISP_SCRATCH": str(scratch), "TMPDIR": f"{scratch}/tmp", "HOME": f"{scratch}/home",
           "HF_HOME": str(outside / "hf")}
    monkeypatch.setattr(tempfile, "tempdir", "/nonexistent-cached-answer")
    made = prepare_scratch(env)
    assert sorted(p.name for p in made) == ["home", "tmp"]
    assert (scratch / "tmp").is_dir() and (scratch / "home").is_dir()
    assert not outside.exists()  # a folder outside the scratch volume is not the runner's to make
    assert tempfile.tempdir is None  # tempfile will look TMPDIR up again
    assert prepare_scratch(env) == []  # idempotent


def test_without_a_scratch_volume_nothing_is_made(tmp_path):
    assert prepare_scratch({"TMPDIR": str(tmp_path / "tmp")}) == []
    assert prepare_scratch({"DISP_SCRATCH": str(tmp_path / "missing"), "TMPDIR": str(tmp_path / "missing/t")}) == []
    assert not (tmp_path / "tmp").exists() and not (tmp_path / "missing").exists()
