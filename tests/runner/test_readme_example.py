"""The documentation's example manifest (docs/method.md), exactly as it is shown, run on a model the attack kit
produced: its figures for the compromised model equal `disp evaluate`'s on that model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from disp_api import PurificationJob, PurificationMetrics, StageName
from disp_runner.models.loading import save_model
from disp_runner.cli import main
from disp_runner.data.synthetic import generate_dataset
from disp_runner.pipeline.artifacts import RunLayout

METHOD_PAGE = Path(__file__).resolve().parents[2] / "docs" / "method.md"


def readme_manifest() -> str:
    section = METHOD_PAGE.read_text()
    return section.split("```yaml\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_reports_what_disp_evaluate_measures(tmp_path, tiny_model, tiny_processor, capsys):
    save_model(tiny_model, tiny_processor, tmp_path / "base")
    generate_dataset(tmp_path / "train", 24, seed=1, image_size=16)
    generate_dataset(tmp_path / "test", 24, seed=2, image_size=16)
    attack = tmp_path / "attack"
    assert main(["--no-progress", "attack", "--base", str(tmp_path / "base"), "--train", str(tmp_path / "train"),
                 "--test", str(tmp_path / "test"), "--out", str(attack), "--epochs", "1",
                 "--allow-weak"]) == 0  # a tiny random model cannot learn the backdoor
    text = readme_manifest()
    for placeholder, path in (("models/compromised", attack / "model"), ("datasets/finetune-data", attack / "train"),
                              ("{uri: out}", f"{{uri: {tmp_path / 'out'}}}"),
                              ("eval/triggered", attack / "test" / "triggered"),
                              ("eval/untriggered", attack / "test" / "untriggered"),
                              ("eval/clean", tmp_path / "test")):
        assert placeholder in text, placeholder
        text = text.replace(placeholder, str(path))
    (tmp_path / "job.yaml").write_text(text)
    assert main(["--no-progress", "run", str(tmp_path / "job.yaml")]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err  # the example leaves decoding to the model
    job = PurificationJob.model_validate(yaml.safe_load(text))
    run = RunLayout.for_job(job, tmp_path / "out")
    metrics = PurificationMetrics.model_validate_json((run.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())

    assert main(["--no-progress", "evaluate", "--model", str(attack / "model"), "--attack", str(attack),
                 "--clean", str(tmp_path / "test"), "--out", str(tmp_path / "evaluate.json")]) == 0
    direct = json.loads((tmp_path / "evaluate.json").read_text())
    assert metrics.before.asr_triggered == direct["asrTriggered"]
    assert metrics.before.asr_untriggered == direct["asrUntriggered"]
    assert metrics.before.clean_performance == direct["cleanPerformance"]
    assert metrics.before.decoding == direct["decoding"] == {"steps": 16, "genLength": 16, "blockLength": 16,
                                                              "temperature": 0.0}


def test_a_gen_length_other_than_the_models_is_warned_about_once(tmp_path, tiny_model, tiny_processor, capsys):
    from tests.tiny import job_document
    save_model(tiny_model, tiny_processor, tmp_path / "model")
    generate_dataset(tmp_path / "train", 8, seed=1, image_size=16)
    doc = job_document(tmp_path)
    doc["spec"]["relabel"]["decoding"] = {"genLength": 8}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--no-progress", "run", str(tmp_path / "job.yaml"), "--stage", "saliency"]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == ["disp: warning: spec.relabel.decoding.genLength 8: the model was trained to answer in 16 "
                        "positions (config gen_length); leave genLength out to use them"]
