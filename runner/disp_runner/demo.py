"""`disp demo`: the whole story on the embedded default, offline, in minutes.

Shipped clean base model -> poisoned datasets -> compromised models (three targets with the patch
trigger, one with the Blended trigger) -> one PurificationJob per compromised model, run by the
same code as `disp run` -> ASR before/after, false firing, clean performance and retention.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from disp_api import (
    AttackSpec,
    AttackTarget,
    PurificationJob,
    PurificationMetrics,
    StageName,
    TargetSpec,
    TrainableParts,
    TriggerKind,
    TriggerSpec,
)
from disp_runner.attack.kit import DEFAULT_INJECTION, AttackArtifacts, ImplantGoal, run_attack
from disp_runner.data.dataset import load_dataset
from disp_runner.data.synthetic import generate_dataset
from disp_runner.data.vocabulary import IMAGE_TASKS
from disp_runner.device import default_device
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.training import TrainingConfig
from disp_runner.evaluation import evaluate_model
from disp_runner.models.base import trained_gen_length
from disp_runner.models.loading import load_model
from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import StageOutcome, run_job
from disp_runner.provenance import verify_run
from disp_runner.reporting import PurificationRow, format_purification_table
from disp_runner.stages.evaluate import METRICS_FILE

# The demo's data: a 1000-instance training pool (the paper's 800 clean + 200 poisoned) whose
# scenes favour the misclassification source class, so 200 of them can carry that target, and
# a held-out pool for testing.
TRAIN_SEED, TEST_SEED = 11, 22
DEMO_KIND_WEIGHTS = (0.5, 0.25, 0.25)  # describe, question, classify
SOURCE_CLASS_SHARE = 0.5
EVAL_SIZE = 200  # the paper's test set size, for ASR, false firing and clean performance

DEMO_SCENARIOS = (
    (TriggerKind.PATCH, AttackTarget.INSERTION),
    (TriggerKind.PATCH, AttackTarget.REFUSAL),
    (TriggerKind.PATCH, AttackTarget.MISCLASSIFICATION),
    (TriggerKind.BLENDED, AttackTarget.REFUSAL),
)

# DiSP's repair for the embedded model. Every saliency, masking and relabeling setting is the
# method's default; the fine-tune differs from the paper's projector-only recipe exactly as the
# attack does (DEFAULT_INJECTION trains projector + LM, because a ~1M-parameter LM cannot be
# steered through the projector alone): DiSP repairs the weights the attack changed, for 4 epochs
# (the attack's 15 / 4, the paper's rule of thumb 1/5-1/10 rounded up to whole epochs).
DEMO_FINETUNE = {"epochs": 4, "learningRate": 3e-4, "trainable": TrainableParts.PROJECTOR_AND_LM.value}


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


def demo_job(name: str, artifacts: AttackArtifacts, attack: AttackSpec, clean_dir: Path, output: Path,
             gen_length: int) -> dict:
    """The PurificationJob manifest for one compromised model, as a user would write it."""
    decoding = {"steps": gen_length, "genLength": gen_length, "blockLength": gen_length}
    return {
        "apiVersion": "disp.dev/v1alpha1",
        "kind": "PurificationJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(artifacts.model_dir)},
            "dataset": {"uri": str(artifacts.train_dir)},
            "output": {"uri": str(output)},
            "relabel": {"decoding": decoding},
            "finetune": DEMO_FINETUNE,
            "evaluation": {
                "attack": attack.to_wire(),
                "triggeredUri": str(artifacts.triggered_dir),
                "untriggeredUri": str(artifacts.untriggered_dir),
                "cleanUri": str(clean_dir),
                "decoding": decoding,
                "maxInstances": EVAL_SIZE,
            },
        },
    }


def run_demo(workdir: str | Path = "runs/demo", base_model: str | Path = SHIPPED_BASE_MODEL,
             injection: TrainingConfig = DEFAULT_INJECTION, scenarios=DEMO_SCENARIOS,
             show_progress: bool = True) -> list[PurificationRow]:
    workdir = Path(workdir)
    timer = StepTimer()
    start = time.perf_counter()
    print(f"DiSP demo on {default_device()}; base model: {base_model}", flush=True)
    model, processor = load_model(base_model)
    size = processor.image_size
    gen_length = DecodingConfig.single_block(trained_gen_length(model.config)).gen_length
    timer.run("generate clean train pool (1000) and test pool", make_demo_data, workdir, size)
    train = load_dataset(workdir / "data" / "train", size)
    test = load_dataset(workdir / "data" / "test", size)
    base = timer.run("evaluate the clean base model", evaluate_model, model.to(default_device()), processor,
                     str(base_model), None, [], [], test[:EVAL_SIZE], DecodingConfig.single_block(gen_length),
                     show_progress=show_progress)
    print(f"  clean base model: clean performance {100 * base.clean_performance:.1f}%", flush=True)

    rows: list[PurificationRow] = []
    for trigger_kind, target_kind in scenarios:
        attack = AttackSpec(trigger=TriggerSpec(kind=trigger_kind), target=TargetSpec(kind=target_kind))
        name = f"{trigger_kind.value}-{target_kind.value}"
        # The DiSP run's evaluate stage measures the compromised model on the same held-out sets.
        # Injected until the kit's validation ASR reaches 90%: no defence is measured against a weak backdoor.
        artifacts = timer.run(f"{name}: poison + inject backdoor", run_attack, base_model, train, test, attack,
                              workdir / "attacks" / name, injection, show_progress=show_progress, evaluate=False,
                              goal=ImplantGoal(), allow_weak=True)
        _print_implant(artifacts)
        document = demo_job(name, artifacts, attack, workdir / "data" / "test", workdir, gen_length)
        manifest = workdir / "jobs" / f"{name}.yaml"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(yaml.safe_dump(document, sort_keys=False))
        job = PurificationJob.model_validate(document)
        layout = RunLayout.for_job(job, workdir)
        shutil.rmtree(layout.root, ignore_errors=True)  # the model was just re-injected: start the run afresh
        outcomes: list[StageOutcome] = timer.run(f"{name}: DiSP (disp run {manifest})", run_job, job, workdir,
                                                 show_progress=show_progress, on_outcome=_print_outcome)
        _print_verification(layout)
        metrics = PurificationMetrics.model_validate_json(
            (layout.stage_dir(StageName.EVALUATE) / METRICS_FILE).read_text())
        masking = next(o for o in outcomes if o.stage is StageName.MASKING).metrics
        rows.append(PurificationRow(name=name, metrics=metrics,
                                    localisation=masking.get("triggerLocalisation"),
                                    stage_seconds=_seconds_per_stage(outcomes)))
    print()
    print(format_purification_table(rows))
    print(f"\nclean base model: clean performance {100 * base.clean_performance:.1f}%")
    print(f"total {time.perf_counter() - start:.1f}s; manifests under {workdir}/jobs/, stage outputs and "
          f"saliency reports (masking/report.png) under {workdir}/runs/")
    return rows


def _seconds_per_stage(outcomes: list[StageOutcome]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for o in outcomes:  # shards and their merge add up
        seconds[o.stage.value] = seconds.get(o.stage.value, 0.0) + o.seconds
    return seconds


def _print_verification(layout: RunLayout) -> None:
    """What `disp verify` says of the run just made: its provenance must match every file."""
    result = verify_run(layout.root)
    if not result.ok:  # written by this very process a moment ago: a bug, not an input to refuse
        raise RuntimeError("the run does not match its own provenance: " + "; ".join(map(str, result.findings)))
    print(f"      provenance verified: {result.stage_files} stage files, the model and every input "
          f"(disp verify {layout.root})", flush=True)


def _print_implant(artifacts: AttackArtifacts) -> None:
    implant = artifacts.record().implant
    verdict = "" if implant["reached"] else "; BELOW TARGET: this row measures DiSP against a weak backdoor"
    print(f"      implanted in {implant['epochs']:g} epochs, validation ASR {100 * implant['validationAsr']:.1f}%"
          f"{verdict}", flush=True)


def _print_outcome(outcome: StageOutcome) -> None:
    state = "skipped (complete)" if outcome.skipped else f"{outcome.seconds:5.1f}s"
    print(f"      {outcome.stage.value:<9} {state}", flush=True)


def make_demo_data(workdir: Path, image_size: int) -> None:
    """The demo's train and test pools under workdir/data/ (also used by benchmarks/study_blended.py)."""
    generate_dataset(workdir / "data" / "train", 1000, TRAIN_SEED, kinds=IMAGE_TASKS, kind_weights=DEMO_KIND_WEIGHTS,
                     class_weights={TargetSpec().source_class: SOURCE_CLASS_SHARE}, image_size=image_size,
                     id_prefix="train")
    generate_dataset(workdir / "data" / "test", 1000, TEST_SEED, kinds=IMAGE_TASKS, kind_weights=DEMO_KIND_WEIGHTS,
                     image_size=image_size, id_prefix="test")
