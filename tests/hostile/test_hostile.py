"""Hostile and careless input against `disp`, one table row per kind of mistake or attack.

Every refused case must: end with the right exit code (2 for the user's input, 75 for a transient
condition), print exactly one line on stderr that names the file, line or field at fault and no
Python traceback, publish nothing (no stage-manifest.json appears), and leave everything outside
the run's output and scratch folders as they were (a snapshot of the whole workspace, those aside)."""

from __future__ import annotations

import errno
import json
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from safetensors.torch import load_file, save_file

from disp_api import PurificationJob, StageName
from disp_runner.cli import main
from disp_runner.data.dataset import MANIFEST_NAME
from disp_runner.errors import EXIT_INTERNAL_ERROR, EXIT_TRANSIENT_ERROR, EXIT_USER_ERROR
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RunLayout, output_lock
from tests.hostile.support import assert_refused
from tests.tiny import job_document
from tests.harness.minio import S3_ACCESS, S3_SECRET

# Each case runs `disp` on hostile input in a fresh process: seconds apiece, so not in `make test-fast`.
pytestmark = pytest.mark.slow


@dataclass
class Ran:
    code: int
    err: str


def disp(capsys, *argv: str) -> Ran:
    """`disp` in this process (for the cases that patch its internals)."""
    code = main(["--no-progress", *argv])
    captured = capsys.readouterr()
    return Ran(code, captured.err.strip())


def write_job(ws: Path, document: dict | str, name: str = "job.yaml") -> Path:
    path = ws / name
    if isinstance(document, str):
        path.write_text(document)
    else:
        path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG file whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def first_image(dataset: Path) -> tuple[list[str], dict, Path]:
    lines = (dataset / MANIFEST_NAME).read_text().splitlines()
    record = json.loads(lines[0])
    return lines, record, dataset / record["image"]


def set_record(dataset: Path, **changes) -> None:
    lines, record, _ = first_image(dataset)
    lines[0] = json.dumps({**record, **changes})
    (dataset / MANIFEST_NAME).write_text("\n".join(lines) + "\n")


def edit_weights(model: Path, edit: Callable[[dict], dict]) -> None:
    path = model / "model.safetensors"
    save_file(edit(load_file(str(path))), str(path), metadata={"format": "pt"})


def nan_weight(tensors: dict) -> dict:
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] = float("nan")
    return tensors


def drop_a_tensor(tensors: dict) -> dict:
    tensors.pop(sorted(tensors)[0])
    return tensors


def edit_config(model: Path, **changes) -> None:
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, **changes}))


class Pickled:
    def __reduce__(self):
        return (os.system, ("touch /tmp/disp-hostile-pickle-ran",))


# --- every case: (id, setup(ws) -> argv, expected exit code, phrases the one line must contain) ----

def _run_job(ws: Path, *extra: str, **spec) -> list[str]:
    return ["run", str(write_job(ws, job_document(ws, **spec))), *extra]


def _with_doc(ws: Path, edit: Callable[[dict], None], *extra: str) -> list[str]:
    doc = job_document(ws)
    edit(doc)
    return ["run", str(write_job(ws, doc)), *extra]


def _raw_job(ws: Path, text: str | bytes, *extra: str) -> list[str]:
    path = ws / "job.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return ["run", str(path), *extra]


def _uid_traversal(ws: Path) -> list[str]:
    (ws / "victim" / "saliency").mkdir(parents=True)
    (ws / "victim" / "saliency" / "keep.txt").write_text("mine")
    return _with_doc(ws, lambda d: d["metadata"].update(uid="../../../../victim"), "--stage", "saliency")


def _output_symlink_out(ws: Path) -> list[str]:
    (ws / "elsewhere").mkdir()
    (ws / "out").mkdir()
    (ws / "out" / "runs").symlink_to(ws / "elsewhere")
    return _run_job(ws, "--stage", "saliency")


def _image_symlink(ws: Path) -> list[str]:
    _, record, image = first_image(ws / "train")
    outside = ws / "outside.png"
    outside.write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(outside)
    return _run_job(ws, "--stage", "saliency")


def _image_folder_symlink(ws: Path) -> list[str]:
    (ws / "outside-images").mkdir()
    for png in (ws / "train" / "images").iterdir():
        (ws / "outside-images" / png.name).write_bytes(png.read_bytes())
    import shutil
    shutil.rmtree(ws / "train" / "images")
    (ws / "train" / "images").symlink_to(ws / "outside-images")
    return _run_job(ws, "--stage", "saliency")


def _stage_manifest_escape(path_entry: str) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        job = PurificationJob.model_validate(job_document(ws))
        saliency = RunLayout.for_job(job, ws / "out").stage_dir(StageName.SALIENCY)
        saliency.mkdir(parents=True)
        (saliency / STAGE_MANIFEST).write_text(json.dumps({"version": 1, "stage": "saliency", "metrics": {}, "files": [
            {"path": path_entry, "size": 5, "sha256": "0" * 64}]}))
        return _run_job(ws, "--stage", "masking")
    return setup


def _bomb(side: int) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        _, _, image = first_image(ws / "train")
        png_header_only(image, side, side)
        return _run_job(ws, "--stage", "saliency")
    return setup


def _model_file(mutate: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        mutate(ws / "model")
        return _run_job(ws, "--stage", "saliency")
    return setup


def _truncate(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _huge_header(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + path.read_bytes()[8:])


def _pickle_only(model: Path) -> None:
    (model / "model.safetensors").unlink()
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Pickled()))


def _dataset_edit(edit: Callable[[Path], None]) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        edit(ws / "train")
        return _run_job(ws, "--stage", "saliency")
    return setup


def _masking_after_saliency_with_box(box) -> Callable[[Path], list[str]]:
    def setup(ws: Path) -> list[str]:
        set_record(ws / "train", metadata={"trigger_box": box})
        assert main(["--no-progress", *_run_job(ws, "--stage", "saliency")]) == 0
        return _run_job(ws, "--stage", "masking")
    return setup


def _output_is_a_file(ws: Path) -> list[str]:
    (ws / "out").write_text("not a folder")
    return _run_job(ws, "--stage", "saliency")


CASES = [
    # 1. the run path: uid shapes, and links out of the output folder
    ("uid-traversal", _uid_traversal, EXIT_USER_ERROR, ["job.yaml:", "metadata.uid", "not a valid uid"]),
    ("output-link-out", _output_symlink_out, EXIT_USER_ERROR, ["metadata:", "is outside"]),
    # 2. dataset images through symbolic links
    ("image-symlink", _image_symlink, EXIT_USER_ERROR, ["manifest.jsonl:1: field 'image'", "leads outside the dataset"]),
    ("images-folder-symlink", _image_folder_symlink, EXIT_USER_ERROR, ["manifest.jsonl:1", "leads outside"]),
    # 3. stage-manifest entries
    ("manifest-entry-absolute", _stage_manifest_escape("/etc/hostname"), EXIT_USER_ERROR,
     [STAGE_MANIFEST, "files[0].path must be a relative path"]),
    ("manifest-entry-dotdot", _stage_manifest_escape("../../x"), EXIT_USER_ERROR,
     [STAGE_MANIFEST, "files[0].path must be a relative path"]),
    # 4. decompression bombs (checked from the header, before decoding)
    ("decompression-bomb-13000", _bomb(13000), EXIT_USER_ERROR, ["manifest.jsonl:1", "13000x13000, expected 16x16"]),
    ("decompression-bomb-20000", _bomb(20000), EXIT_USER_ERROR, ["manifest.jsonl:1", "decompression bomb"]),
    # 9. NaN / infinity
    ("nan-weights", _model_file(lambda m: edit_weights(m, nan_weight)), EXIT_USER_ERROR, ["holds NaN or infinite"]),
    ("inf-weight-decay", lambda ws: _raw_job(ws, yaml.safe_dump(job_document(ws)).replace(
        "finetune:\n", "finetune:\n    weightDecay: .inf\n")), EXIT_USER_ERROR,
     ["spec.finetune.weightDecay", "finite"]),
    ("nan-attack-lr", lambda ws: ["attack", "--base", str(ws / "model"), "--train", str(ws / "train"), "--test",
                                  str(ws / "clean"), "--out", str(ws / "out"), "--lr", "nan"],
     EXIT_USER_ERROR, ["--lr", "finite"]),
    ("nan-poison-rate", lambda ws: ["attack", "--base", str(ws / "model"), "--train", str(ws / "train"), "--test",
                                    str(ws / "clean"), "--out", str(ws / "out"), "--poison-rate", "nan"],
     EXIT_USER_ERROR, ["attack.poisonRate", "finite number"]),
    # 10. a tensor missing from the weights
    ("missing-tensor", _model_file(lambda m: edit_weights(m, drop_a_tensor)), EXIT_USER_ERROR, ["missing keys"]),
    # 11. a ratio that masks nothing
    ("ratio-masks-nothing", lambda ws: _run_job(ws, "--stage", "saliency", masking={"ratio": 0.001}), EXIT_USER_ERROR,
     ["spec.masking.ratio", "masks no token", "smallest ratio"]),
    # 12. manifests
    ("manifest-not-utf8", lambda ws: _raw_job(ws, b"apiVersion: disp.dev/v1alpha1\nkind: \xff\xfe\n"),
     EXIT_USER_ERROR, ["job.yaml:2: not UTF-8"]),
    ("manifest-binary", lambda ws: _raw_job(ws, "a: \x00\x01"), EXIT_USER_ERROR, ["job.yaml", "binary"]),
    ("manifest-deep", lambda ws: _raw_job(ws, "a: " + "[" * 20000 + "]" * 20000), EXIT_USER_ERROR,
     ["job.yaml", "nested too deeply"]),
    ("seed-beyond-64-bits", lambda ws: _run_job(ws, saliency={"seed": 2**70}), EXIT_USER_ERROR,
     ["spec.saliency.seed", "less than or equal to 4294967295"]),
    ("gen-length-beyond-positions", lambda ws: _run_job(ws, "--stage", "saliency", relabel={
        "decoding": {"steps": 256, "genLength": 256, "blockLength": 256}}), EXIT_USER_ERROR,
     ["genLength 256", "more than the model's 128"]),
    ("temperature-inf", lambda ws: _raw_job(ws, yaml.safe_dump(job_document(ws)).replace(
        "blockLength: 8\n", "blockLength: 8\n      temperature: .inf\n", 1)), EXIT_USER_ERROR,
     ["spec.relabel.decoding.temperature", "finite"]),
    ("duplicate-key", lambda ws: _raw_job(ws, yaml.safe_dump(job_document(ws)) + "kind: PurificationJob\n"),
     EXIT_USER_ERROR, ["job.yaml:", "'kind' given twice"]),
    ("bool-for-int", lambda ws: _run_job(ws, saliency={"probes": True}), EXIT_USER_ERROR,
     ["spec.saliency.probes", "valid integer"]),
    ("string-for-int", lambda ws: _run_job(ws, saliency={"topK": "3"}), EXIT_USER_ERROR,
     ["spec.saliency.topK", "valid integer"]),
    # 13. datasets
    ("dataset-not-utf8", _dataset_edit(lambda d: (d / MANIFEST_NAME).write_bytes(
        (d / MANIFEST_NAME).read_bytes() + b'{"id": "\xff"}\n')), EXIT_USER_ERROR, ["manifest.jsonl", "not UTF-8"]),
    ("prompt-too-long", _dataset_edit(lambda d: set_record(d, prompt=" ".join(["circle"] * 5000))),
     EXIT_USER_ERROR, ["instance", "5000-token prompt", "more than the model's 128"]),
    ("image-token-in-prompt", _dataset_edit(lambda d: set_record(d, prompt="what is <image> here")),
     EXIT_USER_ERROR, ["instance", "prompt contains the model's <image>"]),
    ("trigger-box-wrong-type", _masking_after_saliency_with_box("top-left"), EXIT_USER_ERROR,
     ["metadata.trigger_box must be [x0, y0, x1, y1]"]),
    # 14. models
    ("truncated-safetensors", _model_file(_truncate), EXIT_USER_ERROR, ["cannot load model weights", "SafetensorError"]),
    ("huge-safetensors-header", _model_file(_huge_header), EXIT_USER_ERROR, ["corrupt safetensors", "header length"]),
    ("config-is-a-list", _model_file(lambda m: (m / "config.json").write_text("[1, 2]")), EXIT_USER_ERROR,
     ["config.json: expected a JSON object"]),
    ("patch-size-zero", _model_file(lambda m: edit_config(m, patch_size=0)), EXIT_USER_ERROR,
     ["config.json: patch_size must be a positive integer"]),
    ("malicious-pickle-opted-in", lambda ws: (_pickle_only(ws / "model"), _run_job(
        ws, "--stage", "saliency", model={"uri": str(ws / "model"), "allowUnsafePickle": True}))[1],
     EXIT_USER_ERROR, ["cannot load model weights"]),
    # 15. output
    ("output-is-a-file", _output_is_a_file, EXIT_USER_ERROR, ["out"]),
    # 16. S3 endpoints
    ("endpoint-with-scheme", lambda ws: _run_job(ws, storage={"endpoint": "http://minio:9000"}), EXIT_USER_ERROR,
     ["spec.storage.endpoint"]),
    ("endpoint-with-path", lambda ws: _run_job(ws, storage={"endpoint": "minio/path"}), EXIT_USER_ERROR,
     ["spec.storage.endpoint"]),
    # 17. command-line flags
    ("image-size-huge", lambda ws: ["data", "--out", str(ws / "d"), "--image-size", "100000"], EXIT_USER_ERROR,
     ["--image-size", "between 16 and 1024"]),
    ("image-size-zero", lambda ws: ["data", "--out", str(ws / "d"), "--image-size", "0"], EXIT_USER_ERROR,
     ["--image-size", "between 16 and 1024"]),
    ("shard-count-huge", lambda ws: _run_job(ws, "--stage", "saliency", "--shard", "0/99999999999999999999"),
     EXIT_USER_ERROR, ["--shard", "INDEX/COUNT"]),
    ("shard-count-beyond-limit", lambda ws: _run_job(ws, "--stage", "saliency", "--shard", "0/5000"),
     EXIT_USER_ERROR, ["--shard 0/5000", "at most 1024"]),
]


@pytest.mark.parametrize("setup, code, phrases", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_with_one_line_nothing_published_nothing_outside_touched(workspace, setup, code, phrases):
    """Through the installed executable: what a library prints on stderr counts, as for a user."""
    assert_refused(workspace, setup(workspace), code, phrases)
    assert not Path("/tmp/disp-hostile-pickle-ran").exists()


# --- what is not a refusal: data kept apart, locks, caches, leftovers --------------------------------

def test_ids_that_differ_only_in_unsafe_characters_keep_their_own_images(tmp_path):
    from PIL import Image

    from disp_runner.data.instances import Instance

    from disp_runner.data.dataset import load_dataset, write_dataset
    instances = [Instance(id=i, prompt="p", response="r", image=Image.new("RGB", (8, 8), colour))
                 for i, colour in (("x/1", "red"), ("x_1", "blue"), ("x:1", "green"))]
    write_dataset(instances, tmp_path / "d")
    loaded = {inst.id: inst.image.getpixel((0, 0)) for inst in load_dataset(tmp_path / "d", 8)}
    assert loaded == {"x/1": (255, 0, 0), "x_1": (0, 0, 255), "x:1": (0, 128, 0)}


def test_a_second_process_on_the_same_stage_is_told_to_retry(capsys, workspace):
    job = PurificationJob.model_validate(job_document(workspace))
    final = RunLayout.for_job(job, workspace / "out").stage_dir(StageName.SALIENCY)
    with output_lock(final):  # as another `disp run` building the same output would hold it
        ran = disp(capsys, *_run_job(workspace, "--stage", "saliency"))
    assert ran.code == EXIT_TRANSIENT_ERROR and len(ran.err.splitlines()) == 1
    assert "is being built by pid" in ran.err and "run again" in ran.err
    assert not (final / STAGE_MANIFEST).exists()
    assert disp(capsys, *_run_job(workspace, "--stage", "saliency")).code == 0  # once it is released


def test_staging_folders_left_by_a_killed_stage_are_removed_by_the_next_run(capsys, workspace):
    job = PurificationJob.model_validate(job_document(workspace))
    final = RunLayout.for_job(job, workspace / "out").stage_dir(StageName.SALIENCY)
    final.parent.mkdir(parents=True)
    stale = final.parent / ".saliency.staging-killed"
    stale.mkdir()
    (stale / "scores.safetensors").write_bytes(b"half")
    assert disp(capsys, *_run_job(workspace, "--stage", "saliency")).code == 0
    assert not stale.exists() and (final / STAGE_MANIFEST).is_file()


def test_a_diverging_fine_tune_is_not_published(capsys, workspace, monkeypatch):
    import disp_runner.diffusion.training as training

    real = training.masked_diffusion_loss
    monkeypatch.setattr(training, "masked_diffusion_loss", lambda *a, **k: real(*a, **k) * float("nan"))
    ran = disp(capsys, *_run_job(workspace))
    assert ran.code == EXIT_USER_ERROR and "training diverged at step 1" in ran.err
    job = PurificationJob.model_validate(job_document(workspace))
    layout = RunLayout.for_job(job, workspace / "out")
    assert not layout.is_complete(StageName.FINETUNE) and not layout.is_complete(StageName.EVALUATE)


def test_disk_full_is_transient_and_other_bugs_are_one_line_with_a_pointer_to_debug(capsys, workspace,
                                                                                    monkeypatch):
    import disp_runner.cli as cli

    def disk_full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(workspace / "out"))
    monkeypatch.setitem(cli.COMMANDS, "run", disk_full)
    ran = disp(capsys, *_run_job(workspace))
    assert ran.code == EXIT_TRANSIENT_ERROR and "No space left on device" in ran.err
    assert len(ran.err.splitlines()) == 1

    def read_only(args):
        raise OSError(errno.EROFS, "Read-only file system", str(workspace / "out"))
    monkeypatch.setitem(cli.COMMANDS, "run", read_only)
    ran = disp(capsys, *_run_job(workspace))
    assert ran.code == EXIT_USER_ERROR and ran.err.endswith("out: Read-only file system")

    def bug(args):
        raise KeyError("surprise")
    monkeypatch.setitem(cli.COMMANDS, "run", bug)
    ran = disp(capsys, *_run_job(workspace))
    assert ran.code == EXIT_INTERNAL_ERROR and len(ran.err.splitlines()) == 1
    assert "internal error: KeyError" in ran.err and "--debug" in ran.err and "Traceback" not in ran.err
    with pytest.raises(KeyError):
        main(["--debug", *_run_job(workspace)])


def test_tls_against_a_plain_http_server_is_a_setting_to_fix_not_retried(s3_endpoint):
    from disp_store.s3 import RetryPolicy, S3Store, StoreError
    sleeps: list[float] = []
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=True, retry=RetryPolicy(attempts=4), sleep=sleeps.append)
    with pytest.raises(StoreError, match="TLS handshake failed .*secure: false"):
        store.exists("models", "x")
    assert sleeps == []  # refused at once


def test_the_s3_input_cache_drops_what_was_deleted_upstream(s3_endpoint, tmp_path):
    from minio import Minio

    from disp_store.s3 import S3Store
    from disp_store.tree import download_folder
    client = Minio(s3_endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False)
    if not client.bucket_exists("cache"):
        client.make_bucket("cache")
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    for name in ("config.json", "model.safetensors"):
        store.put_bytes("cache", f"m/{name}", name.encode())
    dest = download_folder(store, "cache", "m", tmp_path / "cache")
    assert (dest / "model.safetensors").is_file()
    client.remove_object("cache", "m/model.safetensors")
    download_folder(store, "cache", "m", dest)
    assert not (dest / "model.safetensors").exists() and (dest / "config.json").read_bytes() == b"config.json"


def test_nan_saliency_scores_are_never_written(tmp_path):
    import torch

    from disp_runner.errors import DegenerateResultError
    from disp_runner.stages.saliency import write_scores
    scores = torch.ones(3, 4, dtype=torch.float64)
    scores[1, 2] = float("nan")
    with pytest.raises(DegenerateResultError, match="1 of 12 scores are NaN"):
        write_scores(tmp_path, ["a", "b", "c"], scores, torch.full((3,), 4))
    assert list(tmp_path.iterdir()) == []


def test_decoding_never_generates_the_mask_or_image_placeholder():
    import torch

    from disp_runner.diffusion.decoding import DecodingConfig, diffusion_generate
    mask, image = 2, 4
    vocab = 8

    def favours_specials(ids):  # a hostile model: the placeholders are always the likeliest tokens
        logits = torch.zeros(*ids.shape, vocab)
        logits[..., mask] = 10.0
        logits[..., image] = 9.0
        logits[..., 6] = 1.0
        return logits

    ids = torch.tensor([[5, 5, mask, mask, mask, mask]])
    out = diffusion_generate(favours_specials, ids, mask, DecodingConfig(steps=4, gen_length=4, block_length=4),
                             never_generate=(mask, image))
    assert out.tolist() == [[6, 6, 6, 6]]


def test_the_installed_command_prints_no_traceback_for_bad_input(workspace):
    """The same refusal through the `disp` executable: nothing outside main() prints a traceback."""
    import subprocess
    import sys
    argv = _with_doc(workspace, lambda d: d["metadata"].update(uid="../escape"))
    result = subprocess.run([str(Path(sys.executable).with_name("disp")), *argv], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == EXIT_USER_ERROR
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr and "metadata.uid" in result.stderr


def test_an_s3_lease_is_exclusive_lapses_when_its_holder_dies_and_is_released(s3_endpoint):
    from minio import Minio

    from disp_runner.errors import TransientError
    from disp_store.lease import S3Lease
    from disp_store.s3 import S3Store
    client = Minio(s3_endpoint, access_key=S3_ACCESS, secret_key=S3_SECRET, secure=False)
    if not client.bucket_exists("leases"):
        client.make_bucket("leases")
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    now = [1000.0]
    waits = []

    def sleep(seconds):  # time passes without the holder renewing: it is dead
        waits.append(seconds)
        now[0] += seconds

    first = S3Lease(store, "leases", "run/saliency.lease", ttl=60, clock=lambda: now[0])
    first.acquire()
    first._stop.set()  # as if its process were killed: no more renewals, no release
    # The next attempt waits for the dead holder's lease to lapse (at most one TTL) and takes it over.
    with S3Lease(store, "leases", "run/saliency.lease", ttl=60, clock=lambda: now[0], sleep=sleep):
        assert waits == [61.0]
        assert json.loads(store.get_bytes("leases", "run/saliency.lease"))["expiresAt"] == now[0] + 60
    assert not store.exists("leases", "run/saliency.lease")  # released

    live = S3Lease(store, "leases", "run/relabel.lease", ttl=60, clock=lambda: now[0])
    live.acquire()
    live._stop.set()

    def sleep_while_the_holder_renews(seconds):
        now[0] += seconds
        live._etag = store.put_conditionally("leases", "run/relabel.lease", live._record(), if_match=live._etag)

    with pytest.raises(TransientError, match=r"is being built by pid .* \(lease until"):
        S3Lease(store, "leases", "run/relabel.lease", ttl=60, clock=lambda: now[0],
                sleep=sleep_while_the_holder_renews).acquire()
