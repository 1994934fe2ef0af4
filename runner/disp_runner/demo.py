"""`disp demo`: the whole story on the embedded default, offline, in minutes.

Shipped clean base model -> poisoned datasets -> compromised models (three targets with the patch
trigger, one with the Blended trigger) -> one PurificationJob per compromised model, run by the
same code as `disp run` -> ASR before/after, false firing, clean performance and retention.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import yaml

from disp_api.rounds import round_folder
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
from disp_runner.pipeline.runner import RunResult, StageOutcome, run_rounds
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
    say: Callable[[str], None] = print
    steps: list[tuple[str, float]] = field(default_factory=list)

    def run(self, name: str, fn, *args, **kwargs):
        start = time.perf_counter()
        value = fn(*args, **kwargs)
        elapsed = time.perf_counter() - start
        self.steps.append((name, elapsed))
        self.say(f"  [{elapsed:6.1f}s] {name}")
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


def demo_processes(threads: int, scenarios: int, device: str) -> int:
    """Scenarios run at once: on a CPU, one per torch thread the demo may use, each process then
    computing with one thread (a second thread speeds the embedded model's small operations up by
    about 1.7x, not 2x: on 2 cores, two scenarios side by side took 336 s in all against 406 s one
    after another); on a GPU, one (the scenarios would share the device)."""
    return 1 if device != "cpu" else max(1, min(threads, scenarios))


def run_demo(workdir: str | Path = "runs/demo", base_model: str | Path = SHIPPED_BASE_MODEL,
             injection: TrainingConfig = DEFAULT_INJECTION, scenarios=DEMO_SCENARIOS,
             show_progress: bool = True, processes: int = 1,
             scenario_run: Callable[["_Scenario", bool, Callable[[str], None]], PurificationRow] | None = None
             ) -> list[PurificationRow]:
    """The demo; with `processes` > 1, that many scenarios at once, each in its own process with
    torch's threads shared out among them. Every scenario is seeded on its own, so with the same
    threads per process the table does not depend on how many run at once; another thread count
    sums floats in another order, which moves the figures within their noise. `scenario_run`
    (default: poison, inject and purify) makes one row, saying what it does through its third
    argument; given, it must be importable by name (the processes are spawned)."""
    workdir = Path(workdir)
    timer = StepTimer()
    start = time.perf_counter()
    processes = max(1, min(processes, len(scenarios)))
    parallel = f"; {processes} scenarios at once, one process each" if processes > 1 else ""
    print(f"DiSP demo on {default_device()}; base model: {base_model}{parallel}", flush=True)
    model, processor = load_model(base_model)
    size = processor.image_size
    gen_length = DecodingConfig.single_block(trained_gen_length(model.config)).gen_length
    timer.run("generate clean train pool (1000) and test pool", make_demo_data, workdir, size)
    test = load_dataset(workdir / "data" / "test", size)
    base = timer.run("evaluate the clean base model", evaluate_model, model.to(default_device()), processor,
                     str(base_model), None, [], [], test[:EVAL_SIZE], DecodingConfig.single_block(gen_length),
                     show_progress=show_progress)
    print(f"  clean base model: clean performance {100 * base.clean_performance:.1f}%", flush=True)

    tasks = [_Scenario(trigger, target, str(workdir), str(base_model), injection, gen_length) for trigger, target in scenarios]
    body = scenario_run or _purify_saying
    if processes == 1:
        rows = [_purify(task, show_progress, True, None, body)[0] for task in tasks]
    else:
        threads = max(1, torch.get_num_threads() // processes)
        # spawn, not fork: each process starts its own torch thread pool (a forked one is unusable).
        with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
            running = [pool.submit(_purify, task, False, False, threads, body) for task in tasks]
            for future in running:  # in the table's order; each scenario's lines as one block
                row, lines = future.result()
                print("\n".join(lines), flush=True)
        rows = [future.result()[0] for future in running]
    print()
    print(format_purification_table(rows))
    print(f"\nclean base model: clean performance {100 * base.clean_performance:.1f}%")
    print(f"total {time.perf_counter() - start:.1f}s; manifests under {workdir}/jobs/, stage outputs and "
          f"saliency reports (masking/report.png) under {workdir}/runs/")
    return rows


@dataclass(frozen=True)
class _Scenario:
    """One row of the demo: what a process needs to poison, inject and purify it (picklable)."""

    trigger: TriggerKind
    target: AttackTarget
    workdir: str
    base_model: str
    injection: TrainingConfig
    gen_length: int

    @property
    def name(self) -> str:
        return f"{self.trigger.value}-{self.target.value}"


def _purify(task: _Scenario, show_progress: bool, echo: bool, threads: int | None,
            body: Callable[[_Scenario, bool, Callable[[str], None]], PurificationRow]
            ) -> tuple[PurificationRow, list[str]]:
    """Poison the pool, inject the backdoor, write the PurificationJob and run it: one table row,
    and the lines that tell how (printed as they come with `echo`, else returned for the caller)."""
    if threads is not None:
        torch.set_num_threads(threads)
    lines: list[str] = []

    def say(text: str) -> None:
        lines.append(text)
        if echo:
            print(text, flush=True)

    if echo:
        return body(task, show_progress, say), lines
    # Side by side, the stages' own progress lines would interleave with the other scenarios':
    # the caller prints this scenario's lines as one block instead.
    with contextlib.redirect_stdout(io.StringIO()):
        return body(task, show_progress, say), lines


def _purify_saying(task: _Scenario, show_progress: bool, say: Callable[[str], None]) -> PurificationRow:
    timer = StepTimer(say)
    workdir, name = Path(task.workdir), task.name
    attack = AttackSpec(trigger=TriggerSpec(kind=task.trigger), target=TargetSpec(kind=task.target))
    size = load_model(task.base_model).processor.image_size
    train = load_dataset(workdir / "data" / "train", size)
    test = load_dataset(workdir / "data" / "test", size)
    # The DiSP run's evaluate stage measures the compromised model on the same held-out sets.
    # Injected until the kit's validation ASR reaches 90%: no defence is measured against a weak backdoor.
    artifacts = timer.run(f"{name}: poison + inject backdoor", run_attack, task.base_model, train, test, attack,
                          workdir / "attacks" / name, task.injection, show_progress=show_progress, evaluate=False,
                          goal=ImplantGoal(), allow_weak=True)
    say(_implant_line(artifacts))
    document = demo_job(name, artifacts, attack, workdir / "data" / "test", workdir, task.gen_length)
    manifest = workdir / "jobs" / f"{name}.yaml"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    manifest.write_text(yaml.safe_dump(document, sort_keys=False))
    job = PurificationJob.model_validate(document)
    layout = RunLayout.for_job(job, workdir)
    shutil.rmtree(layout.root, ignore_errors=True)  # the model was just re-injected: start the run afresh
    result: RunResult = timer.run(f"{name}: DiSP (disp run {manifest})", run_rounds, job, workdir,
                                  show_progress=show_progress,
                                  on_outcome=lambda outcome: say(_outcome_line(outcome)))
    for record in result.rounds[1:]:
        say(f"      round {record.round} ran: {record.reason}")
    kept = layout.within(round_folder(result.chosen))
    for record in result.rounds:
        say(_verification_line(layout.within(round_folder(record.round))))
    metrics = PurificationMetrics.model_validate_json((kept.stage_dir(StageName.EVALUATE) / METRICS_FILE).read_text())
    masking = next(o for o in result.outcomes if o.stage is StageName.MASKING and o.round == result.chosen).metrics
    return PurificationRow(name=name, metrics=metrics, localisation=masking.get("triggerLocalisation"),
                           stage_seconds=_seconds_per_stage(result.outcomes),
                           residual_threshold=job.spec.audit.residual_threshold,
                           residual_sample_limit=job.spec.audit.residual_sample, rounds=len(result.rounds),
                           kept_round=result.chosen)


def _seconds_per_stage(outcomes: list[StageOutcome]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for o in outcomes:  # shards and their merge add up, and so do the rounds
        seconds[o.stage.value] = seconds.get(o.stage.value, 0.0) + o.seconds
    return seconds


def _verification_line(layout: RunLayout) -> str:
    """What `disp verify` says of the run just made: its provenance must match every file."""
    result = verify_run(layout.root)
    if not result.ok:  # written by this very process a moment ago: a bug, not an input to refuse
        raise RuntimeError("the run does not match its own provenance: " + "; ".join(map(str, result.findings)))
    return (f"      provenance verified: {result.stage_files} stage files, the model and every input "
            f"(disp verify {layout.root})")


def _implant_line(artifacts: AttackArtifacts) -> str:
    implant = artifacts.record().implant
    verdict = "" if implant["reached"] else "; BELOW TARGET: this row measures DiSP against a weak backdoor"
    return (f"      implanted in {implant['epochs']:g} epochs, validation ASR {100 * implant['validationAsr']:.1f}%"
            f"{verdict}")


def _outcome_line(outcome: StageOutcome) -> str:
    state = "skipped (complete)" if outcome.skipped else f"{outcome.seconds:5.1f}s"
    return f"      {'r' + str(outcome.round):<3} {outcome.stage.value:<9} {state}"


def make_demo_data(workdir: Path, image_size: int) -> None:
    """The demo's train and test pools under workdir/data/ (also used by benchmarks/study_blended.py)."""
    generate_dataset(workdir / "data" / "train", 1000, TRAIN_SEED, kinds=IMAGE_TASKS, kind_weights=DEMO_KIND_WEIGHTS,
                     class_weights={TargetSpec().source_class: SOURCE_CLASS_SHARE}, image_size=image_size,
                     id_prefix="train")
    generate_dataset(workdir / "data" / "test", 1000, TEST_SEED, kinds=IMAGE_TASKS, kind_weights=DEMO_KIND_WEIGHTS,
                     image_size=image_size, id_prefix="test")
