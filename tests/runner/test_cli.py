"""User mistakes end in one line naming the file/line/field and exit code 2, never a traceback."""

import dataclasses
import json
import subprocess
import sys

import pytest

from disp_runner.cli import main
from disp_runner.data.dataset import MANIFEST_NAME
from disp_runner.errors import EXIT_USER_ERROR


@pytest.fixture
def workspace(cli_workspace):
    return cli_workspace


def _run(capsys, *argv):
    code = main(["--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _attack_args(ws, *extra):
    return ["attack", "--base", str(ws / "model"), "--train", str(ws / "train"), "--test", str(ws / "test"),
            "--out", str(ws / "out"), "--epochs", "1", "--allow-weak", *extra]  # a tiny random model


@pytest.mark.parametrize("extra,message", [
    (["--poison-rate", "0"], "attack.poisonRate: Input should be greater than 0"),
    (["--poison-rate", "1.5"], "attack.poisonRate: Input should be less than or equal to 1"),
    (["--poison-rate", "-0.2"], "attack.poisonRate"),
    (["--trigger-colour", "1,2"], "--trigger-colour: expected 3 comma-separated integers"),
    (["--trigger-colour", "0,0,300"], "attack.trigger: Value error, colour values must be in 0..255"),
    (["--blend-alpha", "0"], "attack.trigger.alpha"),
    (["--target", "misclassification", "--target-class", "circle"], "sourceClass and targetClass must differ"),
    (["--trigger-pattern", "/no/such.png"], "trigger.pattern: pattern image /no/such.png does not exist"),
    (["--trigger", "blended", "--trigger-position", "3,4"],
     "attack.trigger: Value error, position needs a pattern image for a blended trigger"),
    (["--trigger", "sig", "--sig-delta", "0"], "attack.trigger.delta: Input should be greater than 0"),
    (["--trigger", "sig", "--sig-frequency", "9"], "trigger.frequency: 9 periods across a 16-pixel image alias"),
])
def test_attack_flag_errors(capsys, workspace, extra, message):
    code, err = _run(capsys, *_attack_args(workspace, *extra))
    assert code == EXIT_USER_ERROR
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (workspace / "out").exists(), "nothing half-written is left behind"


def test_bad_dataset_line_is_named(capsys, workspace):
    manifest = workspace / "train" / MANIFEST_NAME
    lines = manifest.read_text().splitlines()
    lines[4] = lines[4][:-3]
    manifest.write_text("\n".join(lines) + "\n")
    code, err = _run(capsys, *_attack_args(workspace))
    assert code == EXIT_USER_ERROR
    assert f"{manifest}:5: not valid JSON" in err and len(err.splitlines()) == 1


def test_pickle_model_is_refused_by_the_cli(capsys, workspace):
    import torch

    (workspace / "model" / "model.safetensors").unlink()
    torch.save({}, workspace / "model" / "pytorch_model.bin")
    code, err = _run(capsys, "evaluate", "--model", str(workspace / "model"), "--clean", str(workspace / "test"))
    assert code == EXIT_USER_ERROR and "--allow-unsafe-pickle" in err


def test_data_command_validates_its_flags(capsys, tmp_path):
    assert _run(capsys, "data", "--out", str(tmp_path / "d"), "--num", "0")[0] == EXIT_USER_ERROR
    code, err = _run(capsys, "data", "--out", str(tmp_path / "d"), "--kinds", "describe,poetry")
    assert code == EXIT_USER_ERROR and "--kinds: unknown task kind" in err
    code, err = _run(capsys, "data", "--out", str(tmp_path / "d"), "--class-weights", "circle=2")
    assert code == EXIT_USER_ERROR and "--class-weights" in err


def test_attack_then_evaluate_writes_artifacts_and_metrics(capsys, workspace):
    assert main(["--no-progress", *_attack_args(workspace, "--target", "refusal")]) == 0
    out = workspace / "out"
    manifest = json.loads((out / "attack.json").read_text())
    counts = manifest["counts"]
    assert counts == {"train": 20, "poisoned": 4, "testTriggered": counts["testTriggered"],
                      "validationTriggered": counts["validationTriggered"]}
    assert counts["testTriggered"] >= 1 and counts["validationTriggered"] >= 1
    assert manifest["attack"]["target"]["kind"] == "refusal"
    assert (out / "model" / "model.safetensors").is_file()
    code = main(["--no-progress", "evaluate", "--model", str(out / "model"), "--attack", str(out),
                 "--clean", str(workspace / "test"), "--out", str(workspace / "metrics.json")])
    assert code == 0
    metrics = json.loads((workspace / "metrics.json").read_text())
    assert metrics["schemaVersion"] == 2
    assert metrics["counts"]["clean"] == 20 and metrics["counts"]["triggered"] == manifest["counts"]["testTriggered"]
    assert 0 <= metrics["asrTriggered"] <= 1 and 0 <= metrics["cleanPerformance"] <= 1
    assert "ASR" in capsys.readouterr().out


@pytest.mark.slow
def test_the_console_script_exits_with_the_user_error_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "disp_runner.cli", "evaluate", "--model", str(tmp_path / "none"),
                           "--clean", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == EXIT_USER_ERROR
    assert proc.stderr.strip() == f"disp evaluate: error: {tmp_path / 'none'}: model folder does not exist"


def test_run_reads_the_manifest_the_operator_puts_in_the_environment(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("DISP_JOB", json.dumps({"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob",
                                               "metadata": {"name": "x"}, "spec": {"model": {"uri": "m"}}}))
    code, err = _run(capsys, "run", "--manifest-env", "DISP_JOB", "--stage", "saliency")
    assert code == EXIT_USER_ERROR and err == "disp run: error: $DISP_JOB:1: spec.dataset: Field required (and 1 more)"
    monkeypatch.delenv("DISP_JOB")
    code, err = _run(capsys, "run", "--manifest-env", "DISP_JOB")
    assert code == EXIT_USER_ERROR and "$DISP_JOB: not set" in err
    code, err = _run(capsys, "run", str(tmp_path / "job.yaml"), "--manifest-env", "DISP_JOB")
    assert code == EXIT_USER_ERROR and "either a manifest file or --manifest-env" in err


def test_run_ends_with_the_audits_verdict_and_warns_when_the_backdoor_probably_survived(capsys, workspace,
                                                                                        monkeypatch):
    from disp_api import PurificationJob, StageName, judge_residual
    from disp_runner.pipeline import runner
    from disp_runner.pipeline.artifacts import RunLayout, read_stage_manifest
    from tests.tiny import job_document

    # Every instance a suspect, so the purified model is asked for the residual rate.
    doc = job_document(workspace, audit={"suspicionThreshold": 0.001}, evaluation=None)
    (workspace / "job.json").write_text(json.dumps(doc))
    assert main(["run", str(workspace / "job.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    layout = RunLayout.for_job(PurificationJob.model_validate(doc), workspace / "out")
    figures = read_stage_manifest(layout.stage_dir(StageName.FINETUNE))["metrics"]
    assert figures["residualSample"] > 0
    judgement = judge_residual(figures["residualRate"], figures["residualSample"], 0.05)
    assert judgement.message in out  # the same sentence the operator's BackdoorRemoved condition carries

    # A fine-tune whose audit says most suspects keep their answer: a warning, and still exit 0 (the
    # run completed; in a cluster the job is Succeeded with BackdoorRemoved=False).
    finished = runner.run_rounds

    def survived(*args, **kwargs):
        result = finished(*args, **kwargs)
        return dataclasses.replace(result, outcomes=[
            o if o.stage is not StageName.FINETUNE else
            dataclasses.replace(o, metrics={**o.metrics, "residualRate": 0.75, "residualSample": 8})
            for o in result.outcomes])

    monkeypatch.setattr(runner, "run_rounds", survived)
    assert main(["run", str(workspace / "job.json"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert ("warning: the backdoor was probably not removed: the purified model still gives 6 of the top 8 "
            "suspects their original answer (residual rate 75.0%, above spec.audit.residualThreshold 5.0%)"
            ) in captured.err
