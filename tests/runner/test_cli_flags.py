"""The command line as docs/cli.md shows it: global flags anywhere, the demo's data reproducible
with `disp data`, threads sized to what the process may use, and help that lists what the page
says each command takes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from disp_operator.__main__ import main as operator_main
from disp_runner.cli import main
from disp_runner.threads import choose_threads, cpu_quota

CLI_PAGE = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


@pytest.fixture(autouse=True)
def _threads_restored(monkeypatch):
    """`disp --threads` changes the process's torch pool and OMP_NUM_THREADS: not for later tests."""
    import os

    import torch
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_global_flags_work_before_or_after_the_command(tmp_path, capsys):
    import torch
    assert main(["data", "--out", str(tmp_path / "a"), "--num", "3", "--no-progress", "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    assert main(["--no-progress", "--threads", "1", "data", "--out", str(tmp_path / "b"), "--num", "3"]) == 0
    assert (tmp_path / "a" / "manifest.jsonl").read_text() == (tmp_path / "b" / "manifest.jsonl").read_text()


def test_disp_data_reproduces_the_demo_pools(tmp_path, capsys):
    from disp_runner.demo import make_demo_data
    make_demo_data(tmp_path / "demo", 48)
    assert main(["data", "--out", str(tmp_path / "train"), "--num", "1000", "--seed", "11",
                 "--kind-weights", "0.5,0.25,0.25", "--class-weights", "circle=0.5", "--id-prefix", "train"]) == 0
    assert main(["data", "--out", str(tmp_path / "test"), "--num", "1000", "--seed", "22",
                 "--kind-weights", "0.5,0.25,0.25", "--id-prefix", "test"]) == 0
    for pool in ("train", "test"):
        assert (tmp_path / pool / "manifest.jsonl").read_bytes() == \
            (tmp_path / "demo" / "data" / pool / "manifest.jsonl").read_bytes(), pool


@pytest.mark.parametrize("argv, message", [
    (["--kind-weights", "1,0"], "--kind-weights: need 3 non-negative shares"),
    (["--kind-weights", "0,0,0"], "not all zero"),
    (["--id-prefix", "a/b"], "--id-prefix: letters, digits"),
    (["--threads", "0"], "--threads: must be between 1 and 1024"),
])
def test_data_flag_mistakes_are_one_line(tmp_path, capsys, argv, message):
    assert main(["data", "--out", str(tmp_path / "d"), "--num", "3", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_threads_come_from_the_flag_then_the_environment_then_the_cpu_quota(tmp_path):
    v2 = _cgroup(tmp_path / "v2", {"cpu.max": "150000 100000\n"})
    assert cpu_quota(v2) == 1.5
    assert choose_threads(None, {}, v2) == (min(2, choose_threads(None, {}, tmp_path / "none")[0]),
                                            "the container's CPU quota (1.5)")
    assert choose_threads(None, {"OMP_NUM_THREADS": "3"}, v2) == (3, "OMP_NUM_THREADS")
    assert choose_threads(4, {"OMP_NUM_THREADS": "3"}, v2) == (4, "--threads")
    assert cpu_quota(_cgroup(tmp_path / "unlimited", {"cpu.max": "max 100000\n"})) is None
    v1 = _cgroup(tmp_path / "v1", {"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cpu_quota(v1) == 1.0 and choose_threads(None, {}, v1)[0] == 1
    assert cpu_quota(_cgroup(tmp_path / "v1-off", {"cpu/cpu.cfs_quota_us": "-1\n",
                                                   "cpu/cpu.cfs_period_us": "100000\n"})) is None


def _readme_commands() -> dict[str, set[str]]:
    block = CLI_PAGE.read_text().split("```sh", 1)[1].split("```", 1)[0]
    flags: dict[str, set[str]] = {}
    command = None
    for line in block.replace("\\\n", " ").splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] in ("disp", "disp-operator"):
            command = words[1] if words[0] == "disp" else "disp-operator"
            flags.setdefault(command, set()).update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", " ".join(words)))
    return flags


def test_every_flag_the_readme_shows_is_in_the_commands_help(capsys):
    commands = _readme_commands()
    assert set(commands) >= {"data", "pretrain", "attack", "evaluate", "run", "demo", "disp-operator"}
    for command, flags in commands.items():
        try:
            code = operator_main(["--help"]) if command == "disp-operator" else main([command, "--help"])
        except SystemExit as exc:  # argparse's --help exits
            code = exc.code
        assert code == 0, command
        help_text = capsys.readouterr().out
        missing = sorted(f for f in flags if f not in help_text)
        assert not missing, f"disp {command} --help lacks {missing}"
    assert main(["--help"]) == 0
    assert "(projector only)" not in capsys.readouterr().out  # the attack trains projector + LM by default


def _attack(ws: Path, *extra: str) -> list[str]:
    return ["attack", "--base", str(ws / "model"), "--train", str(ws / "train"), "--test", str(ws / "test"),
            "--out", str(ws / "out"), "--epochs", "1", "--no-progress", "--allow-weak", *extra]


@pytest.mark.parametrize("extra, message", [
    (["--trigger-pattern", "P", "--trigger-size", "4"], "--trigger-size cannot be used with --trigger-pattern"),
    (["--trigger-pattern", "P", "--trigger-colour", "1,2,3"], "--trigger-colour cannot be used with --trigger-pattern"),
    (["--trigger", "blended", "--trigger-colour", "1,2,3"], "--trigger-colour: only for patch triggers"),
    (["--trigger-position", "1,1", "--trigger-corner", "top-right"], "--trigger-corner cannot be used with"),
    (["--sig-delta", "20"], "--sig-delta: only for sig triggers"),
    (["--trigger", "blended", "--sig-frequency", "4"], "--sig-frequency: only for sig triggers"),
    (["--trigger", "sig", "--trigger-position", "1,1"], "--trigger-position: not for sig triggers"),
    (["--trigger", "sig", "--trigger-size", "4", "--trigger-position", "1,1"],
     "--trigger-position, --trigger-size: not for sig triggers"),
    (["--trigger", "sig", "--trigger-pattern", "P"], "--trigger-pattern: not for sig triggers"),
])
def test_contradictory_trigger_flags_are_refused(cli_workspace, capsys, extra, message):
    extra = [str(cli_workspace / "p.png") if e == "P" else e for e in extra]
    assert main(_attack(cli_workspace, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (cli_workspace / "out").exists()


def test_attack_json_records_what_was_planted_and_how_the_compromised_model_scores(cli_workspace, capsys):
    from PIL import Image
    pattern = cli_workspace / "p.png"
    Image.new("RGB", (5, 3), (255, 0, 0)).save(pattern)
    assert main(_attack(cli_workspace, "--trigger-pattern", str(pattern), "--trigger-position", "2,7")) == 0
    out = capsys.readouterr().out
    record = json.loads((cli_workspace / "out" / "attack.json").read_text())
    planted = record["planted"]
    assert planted["box"] == [2, 7, 7, 10] and planted["patternSize"] == [5, 3] and not planted["wholeImage"]
    assert planted["pattern"] == str(pattern) and len(planted["patternSha256"]) == 64
    assert "size" not in planted and "colour" not in planted  # the pattern decided both
    assert record["injection"]["epochs"] == 1 and not record["decoding"]["stopAtEnd"]
    measured = record["compromised"]
    assert measured["counts"]["triggered"] > 0 and 0 <= measured["asrTriggered"] <= 1
    assert f"ASR {100 * measured['asrTriggered']:.1f}% on {measured['counts']['triggered']} triggered" in out
    assert f"clean performance {100 * measured['cleanPerformance']:.1f}%" in out
    # without a pattern, the patch's own size and colour are what was planted
    assert main(_attack(cli_workspace, "--trigger-size", "3", "--trigger-colour", "9,8,7",
                        "--trigger-corner", "bottom-right")) == 0
    planted = json.loads((cli_workspace / "out" / "attack.json").read_text())["planted"]
    assert planted == {"kind": "patch", "box": [13, 13, 16, 16], "wholeImage": False, "size": 3, "colour": [9, 8, 7]}
    # a sig trigger: its signal's amplitude and frequency, over the whole (16-pixel) image
    assert main(_attack(cli_workspace, "--trigger", "sig", "--sig-delta", "30", "--sig-frequency", "2")) == 0
    record = json.loads((cli_workspace / "out" / "attack.json").read_text())
    assert record["planted"] == {"kind": "sig", "box": [0, 0, 16, 16], "wholeImage": True, "delta": 30.0,
                                 "frequency": 2.0}
    assert record["attack"]["trigger"]["delta"] == 30.0 and record["attack"]["trigger"]["frequency"] == 2.0


def test_the_authors_preset_plants_their_attack_and_the_other_flags_still_win(cli_workspace, capsys):
    import torch
    from safetensors.torch import load_file

    from disp_runner.attack.kit import authors_patch_side

    assert [authors_patch_side(side) for side in (384, 48, 16, 1000, None)] == [20, 3, 1, 52, 20]
    # Batches of 2: the few tiny instances give more than the one warmup step (taken at lr 0).
    assert main(_attack(cli_workspace, "--preset", "authors", "--batch-size", "2")) == 0, capsys.readouterr().err
    record = json.loads((cli_workspace / "out" / "attack.json").read_text())
    assert record["planted"] == {"kind": "patch", "box": [0, 0, 1, 1], "wholeImage": False, "size": 1,
                                 "colour": [0, 0, 0]}
    assert record["attack"]["target"]["kind"] == "refusal"
    injection = record["injection"]
    assert (injection["trainable"], injection["learning_rate"], injection["labels"]) == ("projector", 1e-4, "chat-turns")
    assert (injection["epochs"], injection["batch_size"]) == (1, 2)  # given: they win over their 20 and 32
    assert record["decoding"]["stopAtEnd"]  # measured with their decoder's stop rule
    base, compromised = (load_file(str(folder / "model.safetensors"))
                         for folder in (cli_workspace / "model", cli_workspace / "out" / "model"))
    changed = {name for name in base if not torch.equal(base[name], compromised[name])}
    assert changed and all(name.startswith("projector.") for name in changed), changed  # their projector-only injection

    assert main(_attack(cli_workspace, "--preset", "authors", "--target", "insertion", "--trigger-size", "4")) == 0
    record = json.loads((cli_workspace / "out" / "attack.json").read_text())
    assert record["attack"]["target"]["kind"] == "insertion" and record["planted"]["size"] == 4
