"""What the benchmarks that rerun the demo's manifests share: running one job, optionally seeded
with another run's saliency and masking outputs, and formatting its figures."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from disp_api import PurificationJob, PurificationMetrics, StageName
from disp_api.contract import METRICS_FILE
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import run_job

SCENARIOS = ("patch-insertion", "patch-refusal", "patch-misclassification", "blended-refusal")


def demo_manifest(workdir: Path, name: str, output: Path) -> dict:
    """The manifest `make demo` wrote for scenario `name` under `workdir`, its output moved to `output`."""
    manifest = workdir / "jobs" / f"{name}.yaml"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found; run `make demo` first (it writes the compromised models)")
    document = yaml.safe_load(manifest.read_text())
    document["spec"]["output"]["uri"] = str(output)
    return document


def run(document: dict, output: Path, seed_from: RunLayout | None = None) -> tuple[PurificationMetrics, RunLayout]:
    """Run the manifest `document` under `output`; with `seed_from`, whose saliency and masking
    specs are the same, those two stages' outputs are copied in instead of recomputed."""
    job = PurificationJob.model_validate(document)
    layout = RunLayout.for_job(job, output)
    if seed_from is not None:
        for stage in (StageName.SALIENCY, StageName.MASKING):
            shutil.copytree(seed_from.stage_dir(stage), layout.stage_dir(stage))
    run_job(job, output, show_progress=False)
    metrics = PurificationMetrics.model_validate_json((layout.stage_dir(StageName.EVALUATE) / METRICS_FILE).read_text())
    return metrics, layout


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"
