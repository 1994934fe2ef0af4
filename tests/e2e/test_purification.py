"""The reduced end-to-end story on the shipped base model: a real backdoor planted by the attack
kit, then the whole DiSP pipeline (`disp run` code path) on it. ASR must fall by 50 points or more
while the model keeps answering clean inputs."""

import pytest
import yaml

from disp_api import AttackSpec, AttackTarget, PurificationJob, PurificationMetrics, StageName, TargetSpec
from disp_runner.attack.kit import run_attack
from disp_runner.cli import main
from disp_runner.data.dataset import write_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.data.vocabulary import IMAGE_TASKS
from disp_runner.demo import demo_job
from disp_runner.embedded import SHIPPED_BASE_MODEL, EMBEDDED_GEN_LENGTH
from disp_runner.pipeline.artifacts import RunLayout

N_EVAL = 100


@pytest.fixture(scope="module")
def compromised(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    train = generate_instances(1000, 11, kinds=IMAGE_TASKS, kind_weights=(0.5, 0.25, 0.25),
                               class_weights={"circle": 0.4}, id_prefix="train")
    test = generate_instances(400, 22, kinds=IMAGE_TASKS, kind_weights=(0.5, 0.25, 0.25), id_prefix="test")
    attack = AttackSpec(target=TargetSpec(kind=AttackTarget.INSERTION))
    artifacts = run_attack(SHIPPED_BASE_MODEL, train, test, attack, root / "attack", show_progress=False)
    write_dataset(test, root / "clean")
    return root, attack, artifacts


def test_disp_run_removes_a_real_backdoor(compromised):
    root, attack, artifacts = compromised
    document = demo_job("e2e", artifacts, attack, root / "clean", root / "out", EMBEDDED_GEN_LENGTH)
    document["spec"]["evaluation"]["maxInstances"] = N_EVAL
    manifest = root / "e2e.yaml"
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))

    assert main(["--no-progress", "run", str(manifest)]) == 0

    layout = RunLayout.for_job(PurificationJob.model_validate(document), root / "out")
    metrics = PurificationMetrics.model_validate_json((layout.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())
    assert metrics.asr_before >= 0.9, metrics
    assert metrics.asr_after <= metrics.asr_before - 0.5, metrics
    assert metrics.false_firing_after <= 0.05, metrics
    assert metrics.retention >= 0.85, metrics
    masking = yaml.safe_load((layout.stage_dir(StageName.MASKING) / "stage-manifest.json").read_text())
    assert masking["metrics"]["triggerLocalisation"] >= 0.8, masking["metrics"]
