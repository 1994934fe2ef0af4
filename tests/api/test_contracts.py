"""The shared contracts: camelCase on the wire, strict, immutable, and free of heavy imports."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from disp_api import AttackSpec, AttackTarget, EvaluationMetrics, MetricsCounts, TriggerKind


def test_wire_format_is_camel_case_and_round_trips():
    spec = AttackSpec.model_validate({"trigger": {"kind": "blended", "alpha": 0.3},
                                      "target": {"kind": "misclassification", "sourceClass": "cross",
                                                 "targetClass": "diamond"},
                                      "poisonRate": 0.1})
    assert spec.trigger.kind is TriggerKind.BLENDED and spec.target.kind is AttackTarget.MISCLASSIFICATION
    wire = spec.to_wire()
    assert wire["poisonRate"] == 0.1 and wire["target"]["sourceClass"] == "cross"
    assert AttackSpec.model_validate(wire) == spec


def test_unknown_fields_are_errors_naming_the_field():
    with pytest.raises(ValidationError, match="poisonRatio"):
        AttackSpec.model_validate({"poisonRatio": 0.2})
    with pytest.raises(ValidationError, match="trigger.kind"):
        AttackSpec.model_validate({"trigger": {"kind": "sticker"}})


def test_contracts_are_frozen():
    spec = AttackSpec()
    with pytest.raises(ValidationError):
        spec.poison_rate = 0.5  # type: ignore[misc]


def test_metrics_bounds_are_enforced():
    counts = MetricsCounts(triggered=1, untriggered=1, clean=1).to_wire()
    with pytest.raises(ValidationError, match="asrTriggered"):
        EvaluationMetrics.model_validate({"model": "m", "asrTriggered": 1.5, "asrUntriggered": 0,
                                          "cleanPerformance": 1, "counts": counts})


def test_api_package_imports_no_ml_or_kubernetes_stack():
    code = ("import sys, disp_api; heavy = {'torch', 'transformers', 'kopf', 'kubernetes'} & set(sys.modules); "
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_runner_and_operator_use_the_one_definition_of_their_contract():
    """Exit codes, run-folder file names, s3:// parsing and weight-file rules come from disp_api.contract
    on both sides: the same objects, not copies that can drift."""
    from disp_api import contract
    from disp_operator import artifacts, children
    from disp_runner import errors
    from disp_runner.pipeline import artifacts as run_artifacts
    from disp_runner.stages import evaluate

    assert children.EXIT_USER_ERROR is errors.EXIT_USER_ERROR is contract.ExitCode.USER_ERROR
    assert children.EXIT_TRANSIENT_ERROR is errors.EXIT_TRANSIENT_ERROR is contract.ExitCode.TRANSIENT_ERROR
    assert artifacts.PROGRESS_FILE is run_artifacts.PROGRESS_FILE is contract.PROGRESS_FILE
    assert artifacts.METRICS_FILE == f"evaluate/{evaluate.METRICS_FILE}"
    assert contract.split_s3_uri("s3://bucket/a/b/") == ("bucket", "a/b")
    assert contract.split_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("s3:///key", "/local/path", "http://host/x"):
        with pytest.raises(ValueError):
            contract.split_s3_uri(bad)
    assert contract.weight_files(["model.safetensors", "training_args.bin", "pytorch_model.bin", "x.json"]) == (
        ["model.safetensors"], ["pytorch_model.bin"])


def test_a_folder_whose_only_pickle_is_training_args_is_judged_alike_by_runner_and_operator(tmp_path):
    """training_args.bin is the Trainer's pickled arguments, never weights: neither side counts it."""
    from disp_api import PurificationJob
    from disp_operator.validation import InvalidSpec, check_model_files
    from disp_runner.models.loading import load_model
    from disp_runner.errors import UnsafeModelFormatError, UserInputError
    from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL

    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((SHIPPED_BASE_MODEL / name).read_bytes())
    (folder / "training_args.bin").write_bytes(b"not weights")
    with pytest.raises(UserInputError, match="no model weights") as runner_error:
        load_model(folder)
    assert not isinstance(runner_error.value, UnsafeModelFormatError)
    job = PurificationJob.model_validate({
        "apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "metadata": {"name": "j"}, "spec": {"model": {"uri": "s3://models/m"}, "dataset": {"uri": "s3://data/x"},
                                            "output": {"uri": "s3://out/y"}}})
    with pytest.raises(InvalidSpec, match="no weights at s3://models/m"):
        check_model_files(job, tuple(p.name for p in folder.iterdir()))


def test_progress_json_is_written_and_read_through_one_model(tmp_path):
    """The runner's ProgressReporter writes StageProgress; the operator reads the same model, and a
    torn or foreign file reads as no progress (advisory), never as an error."""
    import json

    from disp_api import StageName, StageProgress
    from disp_runner.pipeline.artifacts import ProgressReporter, Shard

    path = tmp_path / "progress.json"
    ProgressReporter(path, StageName.RELABEL, total=8, shard=Shard(1, 4), interval=0).update(3, force=True)
    assert set(json.loads(path.read_text())) == {"stage", "shard", "fraction", "itemsDone", "itemsTotal",
                                                 "etaSeconds", "updatedAt"}
    progress = StageProgress.model_validate_json(path.read_text())
    assert (progress.stage, progress.shard, progress.fraction, progress.items_done, progress.items_total) == \
        (StageName.RELABEL, "1-of-4", 3 / 8, 3, 8)
    assert progress.updated_at is not None and progress.updated_at.utcoffset().total_seconds() == 0
    for torn in ('{"stage": "relabel", "fraction": 1.5}', '{"stage": "relabel", "fracti', '[]'):
        with pytest.raises(ValidationError):
            StageProgress.model_validate_json(torn)
