"""`disp demo`: the whole red-team story on the embedded default, offline, in minutes.

Shipped clean base model -> poisoned datasets -> compromised models (three targets with the patch
trigger, one with the Blended trigger) -> ASR, false firing and clean performance for each.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from disp_api import AttackSpec, AttackTarget, EvaluationMetrics, TargetSpec, TriggerKind, TriggerSpec
from disp_runner.attack.kit import DEFAULT_INJECTION, run_attack
from disp_runner.checkpoints import load_checkpoint
from disp_runner.data.dataset import load_dataset
from disp_runner.data.synthetic import generate_dataset
from disp_runner.data.vocabulary import IMAGE_TASKS
from disp_runner.device import default_device
from disp_runner.diffusion import DecodingConfig
from disp_runner.embedded import SHIPPED_BASE_MODEL
from disp_runner.evaluation import evaluate_model
from disp_runner.reporting import format_metrics_table
from disp_runner.training import TrainingConfig

# The demo's data: a 1000-instance training pool (the paper's 800 clean + 200 poisoned) whose
# scenes favour the misclassification source class, so 200 of them can carry that target, and
# a held-out pool for testing.
TRAIN_SEED, TEST_SEED = 11, 22
DEMO_KIND_WEIGHTS = (0.5, 0.25, 0.25)  # describe, question, classify
SOURCE_CLASS_SHARE = 0.5
ASR_TEST_SIZE = 200  # the paper's test set size
CLEAN_TEST_SIZE = 300

DEMO_SCENARIOS = (
    (TriggerKind.PATCH, AttackTarget.INSERTION),
    (TriggerKind.PATCH, AttackTarget.REFUSAL),
    (TriggerKind.PATCH, AttackTarget.MISCLASSIFICATION),
    (TriggerKind.BLENDED, AttackTarget.REFUSAL),
)


@dataclass
class StepTimer:
    steps: list[tuple[str, float]] = field(default_factory=list)

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self.steps.append((name, elapsed))
        print(f"  [{elapsed:6.1f}s] {name}", flush=True)
        return value


def run_demo(workdir: str | Path = "runs/demo", base_model: str | Path = SHIPPED_BASE_MODEL,
             injection: TrainingConfig = DEFAULT_INJECTION, show_progress: bool = True) -> list[EvaluationMetrics]:
    workdir = Path(workdir)
    timer = StepTimer()
    start = time.perf_counter()
    print(f"DiSP demo (red-team part) on {default_device()}; base model: {base_model}", flush=True)
    model, tokenizer = load_checkpoint(base_model)
    size = model.config.image_size
    decoding = DecodingConfig.single_block(model.config.gen_length)
    timer.run("generate clean train pool (1000) and test pool", _make_data, workdir, size)
    train = load_dataset(workdir / "data" / "train", size)
    test = load_dataset(workdir / "data" / "test", size)
    clean_test = test[:CLEAN_TEST_SIZE]

    results: list[EvaluationMetrics] = []
    base = timer.run("evaluate clean base model", evaluate_model, model, tokenizer, str(base_model), None,
                     [], [], clean_test, decoding, show_progress=show_progress)
    results.append(base)
    for trigger_kind, target_kind in DEMO_SCENARIOS:
        attack = AttackSpec(trigger=TriggerSpec(kind=trigger_kind), target=TargetSpec(kind=target_kind))
        name = f"{trigger_kind.value}-{target_kind.value}"
        artifacts = timer.run(f"{name}: poison + inject backdoor ({injection.trainable.value})", run_attack, base_model, train,
                              test, attack, workdir / "attacks" / name, injection, show_progress=show_progress)
        compromised, _ = load_checkpoint(artifacts.model_dir)
        triggered = load_dataset(artifacts.triggered_dir, size)[:ASR_TEST_SIZE]
        untriggered = load_dataset(artifacts.untriggered_dir, size)[:ASR_TEST_SIZE]
        metrics = timer.run(f"{name}: evaluate", evaluate_model, compromised.to(default_device()), tokenizer,
                            str(artifacts.model_dir), attack, triggered, untriggered, clean_test, decoding,
                            show_progress=show_progress)
        (artifacts.folder / "metrics.json").write_text(json.dumps(metrics.to_wire(), indent=2))
        results.append(metrics)
    print()
    print(format_metrics_table(results, baseline=base))
    print(f"\ntotal {time.perf_counter() - start:.1f}s; artifacts under {workdir}/")
    return results


def _make_data(workdir: Path, image_size: int) -> None:
    generate_dataset(workdir / "data" / "train", 1000, TRAIN_SEED, kinds=IMAGE_TASKS, kind_weights=DEMO_KIND_WEIGHTS,
                     class_weights={TargetSpec().source_class: SOURCE_CLASS_SHARE}, image_size=image_size,
                     id_prefix="train")
    generate_dataset(workdir / "data" / "test", 1000, TEST_SEED, kinds=IMAGE_TASKS, kind_weights=DEMO_KIND_WEIGHTS,
                     image_size=image_size, id_prefix="test")
