"""The operator takes a run's figures (evaluate/metrics.json, or finetune/audit.json without an
evaluation set) only as their stage published them: the file's SHA-256 against its stage
manifest, the manifest's against the run's provenance.json. The run here is written by the
runner's own code (stage manifests, provenance) and read back from the loopback S3 server."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from disp_api import StageName
from disp_api.contract import PROVENANCE_FILE, STAGE_MANIFEST_FILE
from disp_operator.artifacts import ArtifactsTampered, RunStore, published_problem
from disp_runner.pipeline.artifacts import RunLayout, write_stage_manifest
from disp_runner.provenance import write_provenance
from disp_store.s3 import S3Store
from tests.harness.minio import S3_ACCESS, S3_SECRET
from tests.operator.conftest import make_job
from tests.operator.standin_runner import AUDIT, METRICS, evaluation_metrics

EVALUATION = {"attack": {"target": {"kind": "insertion"}}, "triggeredUri": "s3://data/triggered"}


def _published_run(root: Path, job) -> RunLayout:
    """finetune (a model file and audit.json) and evaluate (metrics.json), each with its manifest,
    then provenance.json: what a finished run leaves."""
    layout = RunLayout(root)
    finetune = layout.stage_dir(StageName.FINETUNE)
    (finetune / "model").mkdir(parents=True)
    (finetune / "model" / "config.json").write_text('{"model_type": "llava_llada"}')
    (finetune / "audit.json").write_text(json.dumps(AUDIT))
    write_stage_manifest(finetune, StageName.FINETUNE, {}, 1.0)
    evaluate = layout.stage_dir(StageName.EVALUATE)
    evaluate.mkdir()
    (evaluate / "metrics.json").write_text(json.dumps(evaluation_metrics()))
    write_stage_manifest(evaluate, StageName.EVALUATE, {}, 1.0)
    write_provenance(job, layout)
    return layout


@pytest.fixture
def run(tmp_path, s3_endpoint):
    """(RunStore, S3Store, the run's key prefix) with the run uploaded."""
    storage = {"endpoint": s3_endpoint, "secure": False, "credentialsSecret": {"name": "minio"}}
    job = make_job(storage=storage, evaluation=EVALUATION, output={"uri": f"s3://runs/{tmp_path.name}"})
    layout = _published_run(tmp_path / "run", job)
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    if not store.client.bucket_exists("runs"):
        store.client.make_bucket("runs")
    reader = RunStore(job, S3_ACCESS, S3_SECRET)
    for path in layout.root.rglob("*"):
        if path.is_file():
            store.put_bytes("runs", f"{reader.run_key}/{path.relative_to(layout.root).as_posix()}", path.read_bytes())
    return reader, store, reader.run_key


def test_published_figures_are_taken(run):
    reader, _, _ = run
    figures = reader.metrics()
    assert figures.asr_after == METRICS["asrAfter"] and figures.residual_rate == AUDIT["residualRate"]


def test_the_audit_is_checked_the_same_way_without_an_evaluation_set(run):
    reader, store, key = run
    no_evaluation = reader.job.model_copy(update={"spec": reader.job.spec.model_copy(update={"evaluation": None})})
    audit_reader = RunStore(no_evaluation, S3_ACCESS, S3_SECRET)
    assert audit_reader.metrics().residual_rate == AUDIT["residualRate"]
    store.put_bytes("runs", f"{key}/finetune/audit.json", json.dumps({**AUDIT, "residualRate": 0.0}).encode())
    with pytest.raises(ArtifactsTampered, match=r"finetune/audit\.json: SHA-256 .* differs .*/finetune/stage-manifest"):
        audit_reader.metrics()


@pytest.mark.parametrize("change, expected", [
    ("metrics", r"/evaluate/metrics\.json: SHA-256 \w+… differs from the \w+… that s3://\S+/evaluate/stage-manifest\.json "
                r"records \(changed after the stage published it\)"),
    # Whoever rewrites the manifest to match must also rewrite provenance.json, which records it.
    ("metrics and manifest", r"/evaluate/stage-manifest\.json: SHA-256 \w+… differs from the \w+… that "
                             r"s3://\S+/provenance\.json records"),
    ("manifest gone", r"/evaluate/metrics\.json: .*/evaluate/stage-manifest\.json is missing"),
    ("provenance gone", r"/evaluate/stage-manifest\.json: s3://\S+/provenance\.json is missing"),
    ("provenance garbled", r"/provenance\.json: not a provenance record"),
])
def test_figures_changed_after_publication_are_refused_naming_the_file(run, change, expected):
    reader, store, key = run
    forged = json.dumps({**evaluation_metrics(), "asrAfter": 0.0}).encode()
    if change.startswith("metrics"):
        store.put_bytes("runs", f"{key}/evaluate/metrics.json", forged)
    if change == "metrics and manifest":
        manifest = json.loads(store.get_bytes("runs", f"{key}/evaluate/{STAGE_MANIFEST_FILE}"))
        for entry in manifest["files"]:
            if entry["path"] == "metrics.json":
                entry.update(sha256=hashlib.sha256(forged).hexdigest(), size=len(forged))
        store.put_bytes("runs", f"{key}/evaluate/{STAGE_MANIFEST_FILE}", json.dumps(manifest).encode())
    if change == "manifest gone":
        store.remove("runs", [f"{key}/evaluate/{STAGE_MANIFEST_FILE}"])
    if change == "provenance gone":
        store.remove("runs", [f"{key}/{PROVENANCE_FILE}"])
    if change == "provenance garbled":
        store.put_bytes("runs", f"{key}/{PROVENANCE_FILE}", b"[1, 2]")
    with pytest.raises(ArtifactsTampered, match=expected) as caught:
        reader.metrics()
    assert str(caught.value).startswith(f"s3://runs/{key}/")


def test_each_way_a_record_can_be_wrong_is_named_without_a_traceback():
    data, run = b'{"asrAfter": 0.5}', "s3://runs/r"
    assert published_problem(run, StageName.EVALUATE, "metrics.json", data, b"{not json", b"{}") == \
        "s3://runs/r/evaluate/stage-manifest.json: not a stage manifest"
    unlisted = json.dumps({"files": [{"path": "other.json", "sha256": "0" * 64}]}).encode()
    assert published_problem(run, StageName.EVALUATE, "metrics.json", data, unlisted, b"{}") == \
        "s3://runs/r/evaluate/metrics.json: not recorded in s3://runs/r/evaluate/stage-manifest.json"
    listed = json.dumps({"files": [{"path": "metrics.json", "sha256": hashlib.sha256(data).hexdigest()}]}).encode()
    unchained = json.dumps({"predicate": {"runDetails": {"byproducts": []}}}).encode()
    assert published_problem(run, StageName.EVALUATE, "metrics.json", data, listed, unchained) == \
        "s3://runs/r/evaluate/stage-manifest.json: not recorded in s3://runs/r/provenance.json"
    chained = json.dumps({"predicate": {"runDetails": {"byproducts": [
        {"name": "evaluate/stage-manifest.json", "digest": {"sha256": hashlib.sha256(listed).hexdigest()}}]}}}).encode()
    assert published_problem(run, StageName.EVALUATE, "metrics.json", data, listed, chained) is None


def test_progress_is_read_through_the_shared_model_and_a_torn_file_is_no_progress(run):
    from datetime import datetime, timezone

    from disp_api import StageProgress

    reader, store, key = run
    assert reader.progress() is None  # none written yet
    written = StageProgress(stage=StageName.RELABEL, fraction=0.25, items_done=2, items_total=8, eta_seconds=30.0,
                            updated_at=datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc))
    store.put_bytes("runs", f"{key}/progress.json", written.model_dump_json(by_alias=True).encode())
    assert reader.progress() == written
    store.put_bytes("runs", f"{key}/progress.json", b'{"stage": "relabel", "fracti')
    assert reader.progress() is None
