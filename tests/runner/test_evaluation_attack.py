"""evaluation.attack spelled out (target kind required) or named by attackUri (the kit's attack.json)."""

from __future__ import annotations

import json

import pytest
import yaml

from disp_api import PurificationJob, PurificationMetrics, StageName
from disp_runner.cli import main
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.pipeline.runner import run_job
from tests.tiny import ATTACK, job_document
from tests.harness.minio import S3_ACCESS, S3_SECRET


def _metrics(ws, job: PurificationJob) -> PurificationMetrics:
    layout = RunLayout.for_job(job, ws / "out")
    return PurificationMetrics.model_validate_json((layout.stage_dir(StageName.EVALUATE) / "metrics.json").read_text())


@pytest.mark.parametrize("reference", ["folder", "file"])
def test_attack_uri_reads_the_kits_attack_json(workspace, reference):
    folder = workspace / "attack"
    folder.mkdir()
    (folder / "attack.json").write_text(json.dumps({"attack": ATTACK.to_wire(), "counts": {}}))
    spelled = PurificationJob.model_validate(job_document(workspace))
    run_job(spelled, show_progress=False)
    doc = job_document(workspace)
    del doc["spec"]["evaluation"]["attack"]
    doc["spec"]["evaluation"]["attackUri"] = str(folder if reference == "folder" else folder / "attack.json")
    doc["spec"]["output"]["uri"] = str(workspace / "out")
    referenced = PurificationJob.model_validate(doc)
    run_job(referenced, show_progress=False)
    a, b = _metrics(workspace, spelled), _metrics(workspace, referenced)
    assert (a.asr_before, a.asr_after, a.false_firing_before) == (b.asr_before, b.asr_after, b.false_firing_before)
    assert b.before.attack == ATTACK


@pytest.mark.parametrize("edit, message", [
    (lambda e: e["attack"]["target"].pop("kind"), "attack.target.kind is required: it decides the ASR rule"),
    (lambda e: e["attack"].pop("target"), "attack.target.kind is required"),
    (lambda e: e.update(attackUri="somewhere"), "give either attack (trigger and target) or attackUri"),
    (lambda e: e.pop("attack"), "give either attack (trigger and target) or attackUri"),
])
def test_the_attack_must_be_given_once_and_with_its_target_kind(workspace, capsys, edit, message):
    doc = job_document(workspace)
    edit(doc["spec"]["evaluation"])
    (workspace / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--no-progress", "run", str(workspace / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "spec.evaluation" in err and message in err and len(err.splitlines()) == 1


def test_an_attack_uri_without_an_attack_record_is_one_line(workspace, capsys):
    doc = job_document(workspace)
    del doc["spec"]["evaluation"]["attack"]
    doc["spec"]["evaluation"]["attackUri"] = str(workspace / "train")  # a dataset, not an attack folder
    (workspace / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--no-progress", "run", str(workspace / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert "spec.evaluation.attackUri" in err and "not found" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("content, reason", [
    (b'{"attack": {"target": {"kind": "teleport"}}}', "not an attack record (attack.target.kind: Input should be"),
    (b'{"counts": {}}', "not an attack record (attack: Field required)"),
    (b"\xff\xfe", "not an attack record (Expecting value"),
])
def test_a_malformed_attack_record_is_one_line_naming_the_field_and_the_reason(workspace, capsys, content, reason):
    folder = workspace / "attack-folder"
    folder.mkdir()
    (folder / "attack.json").write_bytes(content)
    doc = job_document(workspace)
    del doc["spec"]["evaluation"]["attack"]
    doc["spec"]["evaluation"]["attackUri"] = str(folder)
    (workspace / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["--no-progress", "run", str(workspace / "job.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("disp run: error: spec.evaluation.attackUri: ") and reason in err, err
    assert len(err.splitlines()) == 1


def test_attack_uri_reads_attack_json_from_s3_without_fetching_the_folder(workspace, s3_endpoint, monkeypatch):
    from minio import Minio

    from disp_runner.pipeline.inputs import ResolvedInputs, SpecFiles
    from disp_store.s3 import S3Store
    monkeypatch.setenv("DISP_S3_ACCESS_KEY", S3_ACCESS)
    monkeypatch.setenv("DISP_S3_SECRET_KEY", S3_SECRET)
    client = Minio(s3_endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False)
    if not client.bucket_exists("attacks"):
        client.make_bucket("attacks")
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    store.put_bytes("attacks", "patch/attack.json", json.dumps({"attack": ATTACK.to_wire()}).encode())
    store.put_bytes("attacks", "patch/model/model.safetensors", b"large weights the evaluation does not need")
    doc = job_document(workspace)
    del doc["spec"]["evaluation"]["attack"]
    doc["spec"]["evaluation"]["attackUri"] = "s3://attacks/patch"
    doc["spec"]["storage"] = {"endpoint": s3_endpoint, "secure": False}
    job = PurificationJob.model_validate(doc)
    assert ResolvedInputs(job.spec, SpecFiles(job.spec)).evaluation_attack == ATTACK
