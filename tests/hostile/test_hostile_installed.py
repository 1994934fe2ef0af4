"""Hostile and careless input against the installed `disp` executable, run as a subprocess: what
a library prints on stderr (a Pillow, torch or transformers warning, a load report) counts, as it
does for a user. One table row per kind of mistake or attack.

A refused case must end with the documented exit code and exactly one stderr line naming the file,
line or field at fault (the runner's own `disp: warning:` lines aside), no traceback, nothing
published, and nothing outside the run's output and scratch folders touched. The cases after the
table are accepted inputs whose results are checked, and S3-backed runs whose store, not the local
scratch copy, decides what is complete."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
from pathlib import Path
from typing import Callable

import pytest
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file

from disp_runner.data.dataset import MANIFEST_NAME
from disp_runner.errors import EXIT_TRANSIENT_ERROR, EXIT_USER_ERROR
from disp_runner.pipeline.artifacts import STAGE_MANIFEST
from tests.hostile.support import ACCESS, SECRET, assert_refused, run_disp
from tests.hostile.test_hostile import edit_config, first_image, png_header_only, write_job
from tests.tiny import job_document
from tests.harness.minio import S3_ACCESS, S3_SECRET

# Each case runs `disp` on hostile input in a fresh process: seconds apiece, so not in `make test-fast`.
pytestmark = pytest.mark.slow


def _job(ws: Path, *extra: str, edit: Callable[[dict], None] = lambda d: None, **spec) -> list[str]:
    doc = job_document(ws, **spec)
    edit(doc)
    return ["run", str(write_job(ws, doc)), *extra]


def _with_storage(endpoint: str, **spec) -> dict:
    return {"storage": {"endpoint": endpoint, "secure": False}, **spec}


@pytest.fixture(scope="module")
def html_endpoint():
    """A web server that answers every request with an HTML page (what a wrong endpoint often is)."""
    import http.server

    class Page(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = b"<html><body>Welcome</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        do_GET = do_HEAD = do_PUT = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _victim(ws: Path) -> Path:
    victim = ws / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "keep.txt").write_text("mine")
    return victim


def _dataset_key_with_dotdot(ws: Path) -> list[str]:
    _victim(ws)
    depth = len(ws.parts) + 8
    uri = "s3://bucket/" + "../" * depth + str(ws / "victim").lstrip("/")
    return _job(ws, **_with_storage("127.0.0.1:9", dataset={"uri": uri}))


def _bad_line_20(ws: Path) -> list[str]:
    manifest = ws / "train" / MANIFEST_NAME
    lines = manifest.read_bytes().split(b"\n")
    lines[19] = lines[19].replace(b'"prompt": "', b'"prompt": "\xff', 1)
    manifest.write_bytes(b"\n".join(lines))
    return _job(ws, "--stage", "saliency")


def _int8_weights(ws: Path) -> list[str]:
    import torch
    path = ws / "model" / "model.safetensors"
    tensors = load_file(str(path))
    name = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 2)[0]
    tensors[name] = tensors[name].to(torch.int8)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return _job(ws, "--stage", "saliency")


def _billion_laughs(ws: Path) -> list[str]:
    text = "a: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))
    (ws / "job.yaml").write_text(text)
    return ["run", str(ws / "job.yaml")]


def _projector_is_a_folder(ws: Path) -> list[str]:
    (ws / "projector").mkdir()
    return _job(ws, "--stage", "saliency", model={"uri": str(ws / "model"), "projectorUri": str(ws / "projector")})


CASES = [
    # 1. URIs that would leave their folder, or that rely on a shell's expansion
    ("s3-dataset-key-dotdot", _dataset_key_with_dotdot, EXIT_USER_ERROR, ["job.yaml:", "spec.dataset.uri", "'..'"]),
    ("s3-output-key-dotdot", lambda ws: _job(ws, **_with_storage("127.0.0.1:9", output={
        "uri": "s3://bucket/runs/../../escape"})), EXIT_USER_ERROR, ["spec.output.uri", "'..'"]),
    ("s3-absolute-key", lambda ws: _job(ws, **_with_storage("127.0.0.1:9", output={"uri": "s3://bucket//etc"})),
     EXIT_USER_ERROR, ["spec.output.uri", "absolute key"]),
    ("s3-empty-segment", lambda ws: _job(ws, **_with_storage("127.0.0.1:9", dataset={"uri": "s3://bucket/a//b"})),
     EXIT_USER_ERROR, ["spec.dataset.uri", "empty segment"]),
    ("local-dotdot", lambda ws: _job(ws, model={"uri": str(ws / "model" / ".." / "model")}), EXIT_USER_ERROR,
     ["spec.model.uri", "'..'"]),
    ("output-tilde", lambda ws: _job(ws, output={"uri": "~/disp-out"}), EXIT_USER_ERROR, ["spec.output.uri", "'~'"]),
    ("output-variable", lambda ws: _job(ws, output={"uri": "$HOME/disp-out"}), EXIT_USER_ERROR,
     ["spec.output.uri", "$VARIABLE"]),
    # 2. manifests
    ("billion-laughs", _billion_laughs, EXIT_USER_ERROR, ["job.yaml", "aliases", "expand to more than"]),
    ("manifest-is-a-folder", lambda ws: ["run", str(ws / "train")], EXIT_USER_ERROR, ["train", "a folder"]),
    # 3. results that would be degenerate or wrong
    ("region-covers-the-grid", lambda ws: _job(ws, "--stage", "saliency", saliency={
        "batchSize": 4, "probes": 2, "regionSize": 2}), EXIT_USER_ERROR,
     ["spec.saliency.regionSize", "covers a whole 2x2 token grid", "at most 1"]),
    ("config-gen-length-zero", lambda ws: (edit_config(ws / "model", gen_length=0), _job(ws, "--stage", "saliency"))[1],
     EXIT_USER_ERROR, ["config.json: gen_length must be a positive integer, got 0"]),
    ("config-gen-length-string", lambda ws: (edit_config(ws / "model", gen_length="16"),
                                             _job(ws, "--stage", "saliency"))[1],
     EXIT_USER_ERROR, ["config.json: gen_length must be a positive integer, got '16'"]),
    ("int8-weights", _int8_weights, EXIT_USER_ERROR, ["model.safetensors", "stored as I8", "not a floating-point"]),
    # 4. messages that must name the right thing
    ("bad-byte-on-line-20", _bad_line_20, EXIT_USER_ERROR, ["manifest.jsonl:20: not UTF-8"]),
    ("merge-unsharded", lambda ws: _job(ws, "--stage", "saliency", "--merge"), EXIT_USER_ERROR,
     ["--merge", "saliencyShards is 1"]),
    ("projector-is-a-folder", _projector_is_a_folder, EXIT_USER_ERROR, ["spec.model.projectorUri", "is a folder"]),
    ("dataset-is-a-file", lambda ws: _job(ws, dataset={"uri": str(ws / "train" / MANIFEST_NAME)}), EXIT_USER_ERROR,
     ["spec.dataset.uri", "is a file; a folder is expected"]),
    # 5. what the libraries print stays out of the way of the one line
    ("bomb-warning-not-printed", lambda ws: (_bomb_png(ws), _job(ws, "--stage", "saliency"))[1], EXIT_USER_ERROR,
     ["manifest.jsonl:1", "expected 16x16"]),
]


def _bomb_png(ws: Path) -> None:
    """An image Pillow warns about (DecompressionBombWarning) before the runner refuses its size."""
    _, _, image = first_image(ws / "train")
    png_header_only(image, 9500, 9500)


@pytest.mark.parametrize("setup, code, phrases", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_the_installed_command_refuses_with_one_line(workspace, setup, code, phrases):
    assert_refused(workspace, setup(workspace), code, phrases)
    assert not (Path.home() / "disp-out").exists() and not Path("~").exists()


# --- accepted input, results checked ------------------------------------------------------------

def test_yaml_merge_keys_and_standard_input_are_accepted(workspace):
    text = yaml.safe_dump(job_document(workspace), sort_keys=False)
    merged = text.replace("  saliency:\n", "  saliency:\n    <<: {seed: 3, probes: 9}\n", 1)
    assert "<<:" in merged
    ran = run_disp(workspace, "run", "-", "--stage", "saliency", stdin=merged)
    assert ran.code == 0, ran.err
    assert "saliency: done" in ran.out and "probes 2" in ran.out and ran.error_lines == []


def test_float16_checkpoint_is_held_in_float32_on_the_cpu(workspace):
    """A config saying float16 must not make the CPU train in float16 (it overflows); the weights
    are held in float32 and the fine-tune's loss stays finite."""
    edit_config(workspace / "model", dtype="float16", torch_dtype="float16")
    ran = run_disp(workspace, *_job(workspace, "--stage", "saliency"))
    assert ran.code == 0, ran.err
    from disp_runner.models.loading import load_model
    import torch
    loaded = load_model(workspace / "model")
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}


def test_a_stage_whose_files_were_removed_is_built_again_by_its_own_command(workspace):
    argv = _job(workspace, "--stage", "saliency")
    assert run_disp(workspace, *argv).code == 0
    saliency = next((workspace / "out").rglob("saliency"))
    removed = next(p for p in saliency.iterdir() if p.name != STAGE_MANIFEST)
    removed.unlink()
    ran = run_disp(workspace, *argv)
    assert ran.code == 0 and "saliency: done" in ran.out, ran.err + ran.out
    assert "not intact" in ran.err and removed.is_file()


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / STAGE_MANIFEST).read_bytes()).hexdigest()


def test_an_output_is_built_again_when_an_input_changed_and_reused_when_none_did(workspace):
    stages = [_job(workspace, "--stage", "saliency"), _job(workspace, "--stage", "masking")]

    def run_both() -> tuple[str, str]:
        ran = [run_disp(workspace, *argv) for argv in stages]
        assert all(r.code == 0 for r in ran), [r.err for r in ran]
        return "".join(r.out for r in ran), "".join(r.err for r in ran)

    run_both()
    run = next((workspace / "out").rglob("saliency")).parent
    saliency, masking = _digest(run / "saliency"), _digest(run / "masking")
    out, _ = run_both()
    assert "saliency: complete, skipped" in out and "masking: complete, skipped" in out
    _, _, image = first_image(workspace / "train")
    with Image.open(image) as img:
        changed = img.copy()
    changed.putpixel((0, 0), tuple(255 - v for v in changed.getpixel((0, 0))))
    changed.save(image)
    out, err = run_both()
    assert "spec.dataset.uri changed since this output was built" in err
    assert "stage:saliency" in err  # masking read the rebuilt scores
    assert "saliency: done" in out and "masking: done" in out
    assert _digest(run / "saliency") != saliency and _digest(run / "masking") != masking
    record = json.loads((run / "saliency" / STAGE_MANIFEST).read_text())
    assert set(record["inputs"]) == {"spec.model.uri", "spec.dataset.uri"}
    assert json.loads((run / "masking" / STAGE_MANIFEST).read_text())["inputs"]["stage:saliency"].startswith("sha256:")


# --- S3-backed runs: the store decides what is complete --------------------------------------------

@pytest.fixture
def s3_run(workspace, s3_endpoint):
    from minio import Minio
    client = Minio(s3_endpoint, access_key=ACCESS, secret_key=SECRET, secure=False)
    bucket = "hostile-" + hashlib.sha256(str(workspace).encode()).hexdigest()[:12]
    client.make_bucket(bucket)
    argv = _job(workspace, "--stage", "saliency", **_with_storage(s3_endpoint, output={"uri": f"s3://{bucket}/out"}))
    return workspace, client, bucket, argv


def _objects(client, bucket) -> dict[str, str]:
    return {o.object_name: o.etag for o in client.list_objects(bucket, recursive=True)
            if "/saliency/" in o.object_name}


def test_an_s3_run_republishes_what_the_store_lost_instead_of_trusting_its_scratch_copy(s3_run):
    import io
    workspace, client, bucket, argv = s3_run
    assert run_disp(workspace, *argv).code == 0
    published = _objects(client, bucket)
    manifest_key = next(k for k in published if k.endswith(STAGE_MANIFEST))
    # An upload cut short: the manifest never reached the store.
    client.remove_object(bucket, manifest_key)
    ran = run_disp(workspace, *argv)
    assert ran.code == 0 and "missing from the store; uploading the verified local copy again" in ran.err, ran.err
    assert set(_objects(client, bucket)) == set(published)
    # Every object deleted.
    for key in published:
        client.remove_object(bucket, key)
    assert run_disp(workspace, *argv).code == 0 and set(_objects(client, bucket)) == set(published)
    # One object overwritten with other bytes of the same size.
    victim = next(k for k in published if not k.endswith(STAGE_MANIFEST))
    data = client.get_object(bucket, victim).read()
    client.put_object(bucket, victim, io.BytesIO(bytes(255 - b for b in data)), len(data))
    ran = run_disp(workspace, *argv)
    assert ran.code == 0 and "was overwritten since it was published" in ran.err, ran.err
    assert client.get_object(bucket, victim).read() == data
    # The scratch copy damaged while the store's is intact: the store's copy replaces it.
    local = next(p for p in (workspace / "scratch").rglob(victim.rsplit("/", 1)[-1]) if "saliency" in p.parts)
    local.write_bytes(b"damaged")
    ran = run_disp(workspace, *argv)
    assert ran.code == 0 and "saliency: complete, skipped" in ran.out, ran.err
    assert local.read_bytes() == data


def test_a_fresh_scratch_rebuilds_an_s3_output_whose_object_was_corrupted(s3_run):
    import io
    import shutil
    workspace, client, bucket, argv = s3_run
    assert run_disp(workspace, *argv).code == 0
    victim = next(k for k in _objects(client, bucket) if not k.endswith(STAGE_MANIFEST))
    data = client.get_object(bucket, victim).read()
    client.put_object(bucket, victim, io.BytesIO(bytes(255 - b for b in data)), len(data))
    shutil.rmtree(workspace / "scratch")  # another pod: nothing local to trust or compare with
    ran = run_disp(workspace, *argv)
    assert ran.code == 0 and "checksum mismatch" in ran.err and "building it again" in ran.err, ran.err
    assert "saliency: done" in ran.out
    assert client.get_object(bucket, victim).read() != bytes(255 - b for b in data)


def test_a_changed_s3_input_is_noticed_by_its_listing(workspace, s3_endpoint):
    from minio import Minio
    client = Minio(s3_endpoint, access_key=ACCESS, secret_key=SECRET, secure=False)
    bucket = "inputs-" + hashlib.sha256(str(workspace).encode()).hexdigest()[:12]
    client.make_bucket(bucket)
    for path in sorted((workspace / "train").rglob("*")):
        if path.is_file():
            client.fput_object(bucket, f"train/{path.relative_to(workspace / 'train').as_posix()}", str(path))
    argv = _job(workspace, "--stage", "saliency", **_with_storage(s3_endpoint, dataset={"uri": f"s3://{bucket}/train"}))
    assert run_disp(workspace, *argv).code == 0
    assert "complete, skipped" in run_disp(workspace, *argv).out
    _, record, image = first_image(workspace / "train")
    with Image.open(image) as img:
        img.rotate(90).save(image)
    client.fput_object(bucket, f"train/{record['image']}", str(image))
    ran = run_disp(workspace, *argv)
    assert ran.code == 0 and "spec.dataset.uri changed" in ran.err and "saliency: done" in ran.out, ran.err


def test_an_endpoint_that_serves_web_pages_is_named(workspace, html_endpoint):
    ran = run_disp(workspace, *_job(workspace, "--stage", "saliency", **_with_storage(
        html_endpoint, output={"uri": "s3://bucket/out"})))
    assert ran.code == EXIT_USER_ERROR and len(ran.error_lines) == 1, ran.err
    assert "spec.storage.endpoint" in ran.err and "does not answer as S3 does" in ran.err


# --- the store's own failure modes ----------------------------------------------------------------

def test_an_endpoint_that_accepts_and_never_answers_fails_within_two_read_timeouts():
    from disp_store.s3 import RetryPolicy, S3Store, StoreUnavailableError
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel accepts; nobody ever answers
    sleeps: list[float] = []
    store = S3Store(f"127.0.0.1:{silent.getsockname()[1]}", "k", "s", secure=False, read_timeout=0.3,
                    retry=RetryPolicy(attempts=6), sleep=sleeps.append)
    with pytest.raises(StoreUnavailableError, match=r"still failing after 2 attempts \(no answer within"):
        store.exists("bucket", "key")
    assert len(sleeps) == 1
    silent.close()


def test_a_lease_released_while_it_is_being_looked_at_is_taken_not_a_permanent_error(s3_endpoint):
    from minio import Minio

    from disp_store.lease import S3Lease
    from disp_store.s3 import S3Store
    client = Minio(s3_endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False)
    if not client.bucket_exists("race"):
        client.make_bucket("race")
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    holder = S3Lease(store, "race", "run/saliency.lease", ttl=60)
    holder.acquire()
    real_etag = store.etag_or_none

    def released_meanwhile(bucket, key):  # the holder finishes between our failed create and our look
        etag = real_etag(bucket, key)
        if etag is not None and holder._renewer is not None:
            holder.release()
            holder._renewer = None
            return None
        return etag
    store.etag_or_none = released_meanwhile
    with S3Lease(store, "race", "run/saliency.lease", ttl=60) as second:
        assert json.loads(store.get_bytes("race", "run/saliency.lease"))["holder"] == second.holder


def test_disk_full_while_saving_weights_is_transient(workspace, monkeypatch, capsys):
    import safetensors.torch

    from disp_runner.cli import main

    def full(*args, **kwargs):
        raise safetensors.SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                          'message: "No space left on device" })')
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    monkeypatch.setattr("disp_runner.stages.saliency.save_file", full)
    code = main(["--no-progress", *_job(workspace, "--stage", "saliency")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_TRANSIENT_ERROR and err.splitlines()[-1].endswith("no space left on device (SafetensorError)")
    assert len([line for line in err.splitlines() if not line.startswith("disp: warning")]) == 1
