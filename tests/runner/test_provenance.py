"""Provenance: every run with a purified model carries an in-toto/SLSA record of what made it, and
`disp verify` finds, naming the file, anything that changed since (the model, an input, a
figure, the record itself), and checks the signature when the run is signed."""

from __future__ import annotations

import base64
import json
import subprocess

import pytest

from disp_api import PurificationJob, StageName
from disp_runner.cli import main
from disp_runner.errors import EXIT_NOT_VERIFIED, EXIT_USER_ERROR
from disp_runner.pipeline.artifacts import RunLayout, read_stage_manifest, sha256_file
from disp_runner.provenance import content_digest
from tests.tiny import job_document


def _ed25519(folder, name):
    """A key pair written as openssl writes it (PEM), as a user would make one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = folder / f"{name}.pem", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def _run(workspace, capsys, *extra):
    doc = job_document(workspace)
    (workspace / "job.json").write_text(json.dumps(doc))
    assert main(["run", str(workspace / "job.json"), "--no-progress", *extra]) == 0, capsys.readouterr().err
    capsys.readouterr()
    return RunLayout.for_job(PurificationJob.model_validate(doc), workspace / "out")


def _verify(capsys, run, *extra):
    code = main(["verify", str(run), *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def signed_run(workspace, capsys):
    private, public = _ed25519(workspace, "key")
    return _run(workspace, capsys, "--signing-key", str(private)), public


def test_the_record_names_the_model_every_input_and_every_stage(workspace, capsys):
    layout = _run(workspace, capsys)
    statement = json.loads((layout.root / "provenance.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    model_dir = layout.stage_dir(StageName.FINETUNE) / "model"
    assert {s["name"]: s["digest"]["sha256"] for s in statement["subject"]} == {
        f"finetune/model/{p.name}": sha256_file(p) for p in model_dir.iterdir() if p.is_file()}
    build = statement["predicate"]["buildDefinition"]
    applied = build["externalParameters"]
    assert applied["kind"] == "PurificationJob" and applied["metadata"]["name"] == "tiny"
    assert PurificationJob.model_validate({**applied, "metadata": {"name": "tiny"}}).spec == \
        PurificationJob.model_validate(job_document(workspace)).spec  # the spec as applied, whole
    inputs = {d["name"]: d for d in build["resolvedDependencies"]}
    assert set(inputs) == {"spec.model.uri", "spec.dataset.uri", "spec.evaluation.triggeredUri",
                           "spec.evaluation.untriggeredUri", "spec.evaluation.cleanUri"}
    for name, folder in (("spec.model.uri", "model"), ("spec.dataset.uri", "train"), ("spec.evaluation.cleanUri", "clean")):
        assert inputs[name]["digest"]["sha256"] == content_digest(workspace / folder)["sha256"]
        assert inputs[name]["uri"] == str(workspace / folder)
    assert sorted(inputs["spec.dataset.uri"]["annotations"]["readBy"]) == ["finetune", "masking", "relabel", "saliency"]
    run = statement["predicate"]["runDetails"]
    assert [b["name"] for b in run["byproducts"]] == [f"{s.value}/stage-manifest.json" for s in StageName]
    for product in run["byproducts"]:
        assert product["digest"]["sha256"] == sha256_file(layout.root / product["name"])
        assert product["annotations"]["runner"]["version"] == run["builder"]["version"]["disp"]
    assert run["metadata"]["invocationId"] == layout.root.name and run["metadata"]["startedOn"] <= run["metadata"]["finishedOn"]
    # Each stage manifest records the digests of what it read; the record gathers them.
    saliency = read_stage_manifest(layout.stage_dir(StageName.SALIENCY))
    assert saliency["inputDigests"]["spec.model.uri"]["sha256"] == inputs["spec.model.uri"]["digest"]["sha256"]
    assert not (layout.root / "provenance.sig.json").exists()  # no key: unsigned

    code, out, err = _verify(capsys, layout.root)
    assert code == 0, err
    assert "verified: every file matches its provenance" in out and "signature: none" in out


@pytest.mark.parametrize("change", ["weights", "dataset image", "metrics", "stage manifest", "added input file"])
def test_verify_names_what_changed(workspace, capsys, change):
    layout = _run(workspace, capsys)
    target = {
        "weights": layout.stage_dir(StageName.FINETUNE) / "model" / "model.safetensors",
        "dataset image": sorted((workspace / "train" / "images").iterdir())[3],
        "metrics": layout.stage_dir(StageName.EVALUATE) / "metrics.json",
        "stage manifest": layout.stage_dir(StageName.RELABEL) / "stage-manifest.json",
        "added input file": workspace / "clean" / "extra.txt",
    }[change]
    if change == "added input file":
        target.write_text("not read by the run")
    elif change == "metrics":
        metrics = json.loads(target.read_text())
        metrics["after"]["asrTriggered"] = 0.0  # a better-looking figure
        target.write_text(json.dumps(metrics))
    else:
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 1
        target.write_bytes(bytes(data))
    code, out, err = _verify(capsys, layout.root)
    assert code == EXIT_NOT_VERIFIED
    mismatches = [line for line in err.splitlines() if line.startswith("MISMATCH")]
    assert mismatches and all(str(target) in line for line in mismatches[:1]), err
    assert "mismatch" in err.splitlines()[-1] and "Traceback" not in err
    if change == "stage manifest":  # the record and the chain both say so
        assert any("is not the output the finetune stage was built from" in line for line in mismatches)
    assert main(["verify", str(layout.root), "--skip-inputs"]) == (0 if change in ("dataset image", "added input file")
                                                                   else EXIT_NOT_VERIFIED)


def test_a_signed_run_verifies_with_its_key_only(signed_run, workspace, capsys):
    layout, public = signed_run
    envelope = json.loads((layout.root / "provenance.sig.json").read_text())
    assert envelope["payloadType"] == "application/vnd.in-toto+json"
    assert base64.b64decode(envelope["payload"]) == (layout.root / "provenance.json").read_bytes()
    assert _verify(capsys, layout.root, "--key", str(public))[0] == 0

    _, other = _ed25519(workspace, "other")
    code, _, err = _verify(capsys, layout.root, "--key", str(other))
    assert code == EXIT_NOT_VERIFIED and f"provenance.sig.json: no signature made with the key {other}" in err
    code, _, err = _verify(capsys, layout.root)
    assert code == EXIT_NOT_VERIFIED and "the run is signed; pass --key" in err

    statement = layout.root / "provenance.json"  # a record edited to match a swapped model
    statement.write_text(statement.read_text().replace('"sha256": "', '"sha256": "0', 1))
    code, _, err = _verify(capsys, layout.root, "--key", str(public))
    assert code == EXIT_NOT_VERIFIED and "provenance.json: differs from the payload provenance.sig.json signs" in err


def test_openssl_keys_sign_and_verify_and_a_bad_key_is_refused_before_any_stage(workspace, capsys):
    key, pub = workspace / "ossl.pem", workspace / "ossl.pub"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(key), "-pubout", "-out", str(pub)], check=True)
    layout = _run(workspace, capsys, "--signing-key", str(key))
    assert _verify(capsys, layout.root, "--key", str(pub))[0] == 0

    rsa = workspace / "rsa.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:1024", "-out", str(rsa)],
                   check=True, capture_output=True)
    doc = job_document(workspace, output={"uri": str(workspace / "other-out")})
    (workspace / "other.json").write_text(json.dumps(doc))
    assert main(["run", str(workspace / "other.json"), "--no-progress", "--signing-key", str(rsa)]) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err == (f"disp run: error: --signing-key {rsa}: not an unencrypted Ed25519 private key in PEM "
                   "(make one with: openssl genpkey -algorithm ed25519 -out key.pem)")
    assert not (workspace / "other-out").exists()  # refused before any stage ran
    assert "PRIVATE KEY" not in err


@pytest.mark.parametrize("edit, message", [
    (lambda s: s["subject"][0].update(name="../../../etc/passwd"),
     "provenance.json subject[0].name must be a relative path inside the run folder"),
    (lambda s: s["predicate"]["runDetails"]["byproducts"][0].update(name="/etc/passwd"),
     "provenance.json byproducts[0].name must be a relative path inside the run folder"),
    (lambda s: s["predicate"]["buildDefinition"]["resolvedDependencies"][0]["annotations"]["files"][0].update(
        path="../../outside"), "a recorded file path must lie inside the input"),
    (lambda s: s["predicate"]["buildDefinition"].update(resolvedDependencies=[{"name": 3}]), "malformed provenance"),
])
def test_an_edited_record_that_points_outside_or_has_the_wrong_shape_is_one_line(workspace, capsys, edit, message):
    layout = _run(workspace, capsys)
    path = layout.root / "provenance.json"
    statement = json.loads(path.read_text())
    edit(statement)
    path.write_text(json.dumps(statement))
    code, _, err = _verify(capsys, layout.root)
    assert code == EXIT_USER_ERROR and message in err and len(err.strip().splitlines()) == 1, err


def test_a_run_in_s3_is_verified_there_and_so_are_its_inputs_in_s3(workspace, capsys, s3_endpoint, monkeypatch):
    """`disp verify s3://… --endpoint`: the run's objects are checked (findings name the objects),
    and an input recorded at an s3:// URI is read back from the store, object by object."""
    import uuid

    from disp_store.s3 import S3Store
    from tests.harness.minio import S3_ACCESS, S3_SECRET

    layout = _run(workspace, capsys)
    monkeypatch.setenv("DISP_S3_ACCESS_KEY", S3_ACCESS)
    monkeypatch.setenv("DISP_S3_SECRET_KEY", S3_SECRET)
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    for bucket in ("runs", "data"):
        if not store.client.bucket_exists(bucket):
            store.client.make_bucket(bucket)
    prefix = uuid.uuid4().hex[:8]
    run_key = f"{prefix}/{layout.root.relative_to(workspace / 'out').as_posix()}"
    for path in layout.root.rglob("*"):
        if path.is_file() and not path.name.endswith(".lock"):
            store.upload_file(path, "runs", f"{run_key}/{path.relative_to(layout.root).as_posix()}")
    for path in (workspace / "train").rglob("*"):
        if path.is_file():
            store.upload_file(path, "data", f"{prefix}/train/{path.relative_to(workspace / 'train').as_posix()}")
    # The record as a cluster run writes it: the dataset at an s3:// URI (unsigned, so editable here).
    statement = json.loads(store.get_bytes("runs", f"{run_key}/provenance.json"))
    for dependency in statement["predicate"]["buildDefinition"]["resolvedDependencies"]:
        if dependency["name"] == "spec.dataset.uri":
            dependency["uri"] = f"s3://data/{prefix}/train"
    store.put_bytes("runs", f"{run_key}/provenance.json", json.dumps(statement).encode())
    run_uri = f"s3://runs/{run_key}"
    flags = ("--endpoint", s3_endpoint, "--insecure")

    code, out, err = _verify(capsys, run_uri, *flags)
    assert code == 0, err
    assert f"{run_uri}: verified" in out and "inputs: spec.dataset.uri (" in out and "not checked" not in out

    images = sorted(name for name, _, _ in store.list("data", f"{prefix}/train/images/"))
    store.put_bytes("data", images[2], b"another image")
    store.put_bytes("data", f"{prefix}/train/extra.txt", b"not read by the run")
    store.put_bytes("runs", f"{run_key}/evaluate/metrics.json", b'{"asrAfter": 0.0}')
    code, _, err = _verify(capsys, run_uri, *flags)
    assert code == EXIT_NOT_VERIFIED and "Traceback" not in err
    mismatches = [line for line in err.splitlines() if line.startswith("MISMATCH")]
    assert f"MISMATCH {run_uri}/evaluate/metrics.json: checksum mismatch with {run_uri}/evaluate/stage-manifest.json" \
        in mismatches[0], mismatches
    assert f"MISMATCH s3://data/{images[2]}: an input file (spec.dataset.uri) changed since the run read it" in mismatches
    assert f"MISMATCH s3://data/{prefix}/train/extra.txt: a file added to the input (spec.dataset.uri)" \
        " since the run read it" in mismatches
    assert len(mismatches) == 3, mismatches

    code, _, err = _verify(capsys, run_uri)
    assert code == EXIT_USER_ERROR and err.strip().endswith("an s3:// run needs --endpoint HOST[:PORT]")
    code, _, err = _verify(capsys, f"s3://runs/{prefix}/nothing-here", *flags)
    assert code == EXIT_USER_ERROR and "provenance.json: no provenance there" in err
