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


def demo_manifest(workdir: Path, name: str, output: Path | None) -> dict:
    """The manifest `make demo` wrote for scenario `name` under `workdir`, its output moved to
    `output` (None: as written, so its run folder is the demo's own; its paths are relative to the
    repository, where `make demo` runs)."""
    manifest = workdir / "jobs" / f"{name}.yaml"
    if not manifest.is_file():
        raise SystemExit(f"{manifest}: not found; run `make demo` first (it writes the compromised models)")
    document = yaml.safe_load(manifest.read_text())
    if output is not None:
        document["spec"]["output"]["uri"] = str(output)
    return document


def demo_run(workdir: Path, name: str) -> tuple[PurificationJob, RunLayout, PurificationMetrics]:
    """The demo's own finished run of scenario `name`: its job, run folder and figures."""
    job = PurificationJob.model_validate(demo_manifest(workdir, name, None))
    layout = RunLayout.for_job(job, Path(job.spec.output.uri))
    metrics_path = layout.stage_dir(StageName.EVALUATE) / METRICS_FILE
    if not metrics_path.is_file():
        raise SystemExit(f"{metrics_path}: not found; run `make demo` first (from the repository's root)")
    return job, layout, PurificationMetrics.model_validate_json(metrics_path.read_text())


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
