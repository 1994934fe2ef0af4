"""The artifact store against a real MinIO server on loopback, through the minio SDK."""

import hashlib
import json

import pytest
import torch
from minio import Minio

from disp_api import PurificationJob, PurificationMetrics, StageName
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RunLayout
from disp_runner.pipeline.opening import open_run
from disp_runner.pipeline.runner import run_job
from disp_store.s3 import RetryPolicy, S3Store, StoreError, StoreUnavailableError
from disp_store.tree import download_folder, download_stage, remote_stage_complete, upload_stage

from .s3_faults import FaultProxy
from tests.tiny import job_document
from tests.harness.minio import S3_ACCESS, S3_SECRET, MinioServer

ACCESS, SECRET = S3_ACCESS, S3_SECRET  # the MinIO server's identity (tests/harness/minio.py)


@pytest.fixture
def bucket(s3_endpoint, request):
    name = "b-" + request.node.name.lower().replace("_", "-")[:40].strip("-")
    client = Minio(s3_endpoint, access_key=ACCESS, secret_key=SECRET, secure=False)
    if not client.bucket_exists(name):
        client.make_bucket(name)
    return name


@pytest.fixture
def store(s3_endpoint):
    sleeps = []
    s = S3Store(s3_endpoint, ACCESS, SECRET, secure=False, retry=RetryPolicy(attempts=4, base_delay=0.01),
                sleep=sleeps.append)
    s.sleeps = sleeps
    return s


def upload_inputs(store, bucket, workspace, folders):
    """The workspace's folders under s3://BUCKET/inputs/."""
    for name in folders:
        for path in sorted((workspace / name).rglob("*")):
            if path.is_file():
                store.upload_file(path, bucket, f"inputs/{name}/{path.relative_to(workspace / name).as_posix()}")


def make_stage(folder):
    from disp_runner.pipeline.artifacts import write_stage_manifest

    (folder / "sub").mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"x" * 100_000)
    (folder / "sub" / "b.json").write_text('{"k": 1}')
    write_stage_manifest(folder, StageName.SALIENCY, {"items": 2}, 1.0)
    return folder


def test_stage_outputs_round_trip_verified(tmp_path, store, bucket):
    src = make_stage(tmp_path / "src")
    upload_stage(src, store, bucket, "run/saliency")
    assert remote_stage_complete(store, bucket, "run/saliency")
    download_stage(store, bucket, "run/saliency", tmp_path / "dst")
    assert (tmp_path / "dst" / "a.bin").read_bytes() == b"x" * 100_000
    assert (tmp_path / "dst" / "sub" / "b.json").read_text() == '{"k": 1}'
    assert (tmp_path / "dst" / STAGE_MANIFEST).read_bytes() == (src / STAGE_MANIFEST).read_bytes()


def test_a_multipart_upload_streams_and_round_trips(tmp_path, store, bucket):
    big = tmp_path / "big.bin"
    with open(big, "wb") as handle:
        for i in range(20):  # 20 MiB: more than one 16 MiB part
            handle.write(bytes([i]) * 2**20)
    etag = store.upload_file(big, bucket, "models/big.bin")
    assert etag.endswith("-2")  # two parts
    store.download_file(bucket, "models/big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == big.read_bytes()


def test_a_corrupted_object_fails_its_checksum_naming_the_key(tmp_path, store, bucket):
    src = make_stage(tmp_path / "src")
    upload_stage(src, store, bucket, "run/saliency")
    store.put_bytes(bucket, "run/saliency/a.bin", b"y" * 100_000)  # changed after the manifest
    with pytest.raises(StoreError, match=f"s3://{bucket}/run/saliency/a.bin: checksum mismatch"):
        download_stage(store, bucket, "run/saliency", tmp_path / "dst")
    assert not (tmp_path / "dst" / STAGE_MANIFEST).exists()


def test_a_crash_before_the_manifest_leaves_the_stage_incomplete(tmp_path, store, bucket, monkeypatch):
    src = make_stage(tmp_path / "src")
    real = store.upload_file

    def dies_at_the_manifest(path, b, key):
        if key.endswith(STAGE_MANIFEST):
            raise StoreError("connection lost")
        return real(path, b, key)

    monkeypatch.setattr(store, "upload_file", dies_at_the_manifest)
    with pytest.raises(StoreError):
        upload_stage(src, store, bucket, "run/relabel")
    assert store.exists(bucket, "run/relabel/a.bin")
    assert not remote_stage_complete(store, bucket, "run/relabel")
    with pytest.raises(StoreError, match="stage-manifest.json: missing; that stage output is incomplete"):
        download_stage(store, bucket, "run/relabel", tmp_path / "dst")


def proxied_store(proxy: FaultProxy) -> tuple[S3Store, list[float]]:
    """A store that talks to the server through `proxy`; the list collects its backoff sleeps.
    (The region is given so the SDK sends no location lookup that would consume a fault.)"""
    sleeps: list[float] = []
    store = S3Store(proxy.endpoint, ACCESS, SECRET, secure=False, region="us-east-1",
                    retry=RetryPolicy(attempts=4, base_delay=0.01), sleep=sleeps.append)
    return store, sleeps


@pytest.mark.parametrize("faults", [[(503, "SlowDown"), (500, "InternalError")], [(503, "ServiceUnavailable")]])
def test_throttling_and_5xx_responses_are_retried_with_backoff(tmp_path, s3_endpoint, bucket, faults):
    path = tmp_path / "f.txt"
    path.write_text("hello")
    with FaultProxy(s3_endpoint) as proxy:
        store, sleeps = proxied_store(proxy)
        proxy.faults = list(faults)
        store.upload_file(path, bucket, "k")
        assert store.get_bytes(bucket, "k") == b"hello"
    assert len(sleeps) == len(faults)
    assert sleeps == sorted(sleeps) or len(sleeps) == 1  # backoff grows


@pytest.mark.parametrize("status,code", [(403, "InvalidAccessKeyId"), (403, "SignatureDoesNotMatch"),
                                         (403, "AccessDenied")])
def test_bad_credentials_fail_at_once_without_a_retry_storm(tmp_path, s3_endpoint, bucket, status, code):
    path = tmp_path / "f.txt"
    path.write_text("hello")
    with FaultProxy(s3_endpoint) as proxy:
        store, sleeps = proxied_store(proxy)
        proxy.faults = [(status, code)] * 10
        with pytest.raises(StoreError) as info:
            store.upload_file(path, bucket, "models/m/config.json")
        assert proxy.requests == 1
    assert sleeps == [] and len(str(info.value).splitlines()) == 1
    assert f"upload to s3://{bucket}/models/m/config.json: {code}" in str(info.value)


def test_the_server_stopping_mid_upload_leaves_no_manifest(tmp_path, minio_binary):
    from disp_store import tree

    src = make_stage(tmp_path / "src")
    server = MinioServer(minio_binary, tmp_path / "minio").start()  # a server of this test's own
    try:
        Minio(server.endpoint, access_key=ACCESS, secret_key=SECRET, secure=False).make_bucket("crash")
        store = S3Store(server.endpoint, ACCESS, SECRET, secure=False,
                        retry=RetryPolicy(attempts=2, base_delay=0.01), sleep=lambda s: None)
        uploaded = []
        real = store.upload_file

        def upload_then_crash_the_server(path, b, key):
            result = real(path, b, key)
            uploaded.append(key)
            if len(uploaded) == 1:
                server.stop()  # the server goes away after the first file
            return result

        store.upload_file = upload_then_crash_the_server
        with pytest.raises(StoreUnavailableError, match="still failing after 2 attempts"):
            tree.upload_stage(src, store, "crash", "run/finetune")
        assert len(uploaded) == 1
        # The server comes back on its folder: the first file is there, the manifest is not, so the
        # stage counts as incomplete and reruns.
        server.start()
        fresh = S3Store(server.endpoint, ACCESS, SECRET, secure=False)
        assert fresh.exists("crash", uploaded[0])
        assert not remote_stage_complete(fresh, "crash", "run/finetune")
    finally:
        server.stop()


def test_a_stopped_server_fails_after_the_retry_budget(tmp_path, minio_binary):
    server = MinioServer(minio_binary, tmp_path / "minio").start()
    server.stop()
    sleeps = []
    store = S3Store(server.endpoint, ACCESS, SECRET, secure=False, retry=RetryPolicy(attempts=3, base_delay=0.01),
                    sleep=sleeps.append)
    path = tmp_path / "f.txt"
    path.write_text("x")
    with pytest.raises(StoreUnavailableError, match=r"upload to s3://bucket/k: still failing after 3 attempts"):
        store.upload_file(path, "bucket", "k")
    assert len(sleeps) == 2


def test_a_missing_bucket_or_key_fails_at_once(tmp_path, store):
    with pytest.raises(StoreError, match="s3://no-such-bucket: no such bucket"):
        store.check_bucket("no-such-bucket")
    with pytest.raises(StoreError, match="download of s3://no-such-bucket/k: NoSuchBucket"):
        store.download_file("no-such-bucket", "k", tmp_path / "k")
    assert store.sleeps == []  # permanent errors are not retried


def test_folders_are_cached_by_etag(tmp_path, store, bucket, monkeypatch):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_text(name)
        store.upload_file(tmp_path / name, bucket, f"models/m/{name}")
    download_folder(store, bucket, "models/m", tmp_path / "cache")
    calls = []
    real = store.download_file
    monkeypatch.setattr(store, "download_file", lambda *a, **k: (calls.append(a[1]), real(*a, **k)))
    download_folder(store, bucket, "models/m", tmp_path / "cache")
    assert calls == []  # nothing changed, nothing fetched
    (tmp_path / "config.json").write_text("changed")
    store.upload_file(tmp_path / "config.json", bucket, "models/m/config.json")
    download_folder(store, bucket, "models/m", tmp_path / "cache")
    assert calls == ["models/m/config.json"] and (tmp_path / "cache" / "config.json").read_text() == "changed"


def test_a_manifest_cannot_write_outside_the_download_folder(tmp_path, store, bucket):
    evil = {"files": [{"path": "../../escape", "size": 1, "sha256": "0" * 64}]}
    store.put_bytes(bucket, "run/evil/" + STAGE_MANIFEST, json.dumps(evil).encode())
    with pytest.raises(StoreError, match="would leave the download folder"):
        download_stage(store, bucket, "run/evil", tmp_path / "dst")
    assert not (tmp_path / "escape").exists()


def test_disp_run_on_s3_gives_the_local_metrics(workspace, tmp_path, s3_endpoint, bucket, monkeypatch):
    monkeypatch.setenv("DISP_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("DISP_S3_SECRET_KEY", SECRET)
    monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / "scratch"))
    store = S3Store(s3_endpoint, ACCESS, SECRET, secure=False)
    upload_inputs(store, bucket, workspace, ("model", "train", "triggered", "untriggered", "clean"))

    local = PurificationJob.model_validate(job_document(workspace))
    run_job(local, show_progress=False)
    local_metrics = json.loads((RunLayout.for_job(local, workspace / "out").stage_dir(StageName.EVALUATE)
                                / "metrics.json").read_text())

    document = job_document(workspace)
    spec = document["spec"]
    uri = f"s3://{bucket}/inputs"
    spec["model"]["uri"] = f"{uri}/model"
    spec["dataset"]["uri"] = f"{uri}/train"
    spec["output"]["uri"] = f"s3://{bucket}/out"
    spec["storage"] = {"endpoint": s3_endpoint, "secure": False, "credentialsSecret": {"name": "minio"}}
    for key, name in (("triggeredUri", "triggered"), ("untriggeredUri", "untriggered"), ("cleanUri", "clean")):
        spec["evaluation"][key] = f"{uri}/{name}"
    remote = PurificationJob.model_validate(document)
    outcomes = run_job(remote, show_progress=False)
    assert not any(o.skipped for o in outcomes)

    prefix = open_run(remote).storage.remote.prefix
    remote_metrics = json.loads(store.get_bytes(bucket, f"{prefix}/evaluate/metrics.json"))
    assert PurificationMetrics.model_validate(remote_metrics).after.model == f"s3://{bucket}/{prefix}/finetune/model"
    for metrics in (local_metrics, remote_metrics):
        for side in ("before", "after"):
            metrics[side].pop("seconds")
            metrics[side].pop("model")
    assert remote_metrics == local_metrics
    assert json.loads(store.get_bytes(bucket, f"{prefix}/progress.json"))["stage"] == "evaluate"
    for stage in StageName:
        assert remote_stage_complete(store, bucket, f"{prefix}/{stage.value}")

    # A rerun in a fresh pod (empty scratch) finds every stage complete in S3 and skips it.
    monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / "scratch2"))
    assert all(o.skipped for o in run_job(remote, show_progress=False))


def test_credentials_come_from_the_environment_or_mounted_files(tmp_path, s3_endpoint, bucket, monkeypatch):
    from disp_api import StorageSpec
    from disp_runner.errors import UserInputError
    from disp_store.credentials import open_s3_store

    storage = StorageSpec(endpoint=s3_endpoint, secure=False)
    for name in ("DISP_S3_ACCESS_KEY", "DISP_S3_SECRET_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(UserInputError, match="S3 credentials missing"):
        open_s3_store(storage)
    (tmp_path / "access").write_text(ACCESS + "\n")
    (tmp_path / "secret").write_text(SECRET)
    monkeypatch.setenv("DISP_S3_ACCESS_KEY_FILE", str(tmp_path / "access"))
    monkeypatch.setenv("DISP_S3_SECRET_KEY_FILE", str(tmp_path / "secret"))
    open_s3_store(storage).check_bucket(bucket)
    monkeypatch.setenv("DISP_S3_SECRET_KEY_FILE", str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match="DISP_S3_SECRET_KEY_FILE: .*nope does not exist"):
        open_s3_store(storage)
    with pytest.raises(UserInputError, match="spec.storage.endpoint: required"):
        open_s3_store(None)


def test_an_unreachable_server_is_a_transient_exit_code(tmp_path, workspace, monkeypatch, capsys):
    import yaml

    from disp_runner.cli import main
    from disp_runner.errors import EXIT_TRANSIENT_ERROR
    # A short retry budget for the store the CLI builds (the default one sleeps ~15 s in all).
    monkeypatch.setattr(S3Store.__init__, "__defaults__", (True, None, RetryPolicy(attempts=2, base_delay=0.01),
                                                           lambda s: None, 60.0))
    monkeypatch.setenv("DISP_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("DISP_S3_SECRET_KEY", SECRET)
    document = job_document(workspace)
    document["spec"]["output"]["uri"] = "s3://bucket/out"
    document["spec"]["storage"] = {"endpoint": "127.0.0.1:9", "secure": False}  # nothing listens there
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(document))
    assert main(["--no-progress", "run", str(path)]) == EXIT_TRANSIENT_ERROR
    err = capsys.readouterr().err.strip()
    assert "transient error (retry later)" in err and "s3://bucket" in err and len(err.splitlines()) == 1


class PodLost(BaseException):
    """The pod disappears (evicted, OOM-killed): nothing of it runs any more."""


def test_a_fine_tune_pod_lost_after_epoch_two_resumes_in_a_fresh_pod_at_epoch_three(
        workspace, tmp_path, s3_endpoint, bucket, monkeypatch, capsys):
    from safetensors.torch import load_file

    from disp_runner.pipeline.checkpoints import MirroredCheckpoints

    monkeypatch.setenv("DISP_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("DISP_S3_SECRET_KEY", SECRET)
    monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / "pod-1"))
    store = S3Store(s3_endpoint, ACCESS, SECRET, secure=False)
    upload_inputs(store, bucket, workspace, ("model", "train"))
    finetune = {"epochs": 4, "batchSize": 7, "learningRate": 0.01}  # 4 steps an epoch, 16 in all
    local = PurificationJob.model_validate(job_document(workspace, evaluation=None, finetune=finetune))
    run_job(local, show_progress=False)  # uninterrupted
    document = job_document(workspace, evaluation=None, finetune=finetune)
    document["spec"].update(model={"uri": f"s3://{bucket}/inputs/model"}, dataset={"uri": f"s3://{bucket}/inputs/train"},
                            output={"uri": f"s3://{bucket}/out"},
                            storage={"endpoint": s3_endpoint, "secure": False, "credentialsSecret": {"name": "m"}})
    remote = PurificationJob.model_validate(document)
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL):
        run_job(remote, only=stage, show_progress=False)

    publish = MirroredCheckpoints.publish

    def publish_then_die_after_epoch_two(self, epoch):
        publish(self, epoch)
        if epoch == 2:
            raise PodLost

    monkeypatch.setattr(MirroredCheckpoints, "publish", publish_then_die_after_epoch_two)
    with pytest.raises(PodLost):
        run_job(remote, only=StageName.FINETUNE, show_progress=False)
    prefix = open_run(remote).storage.remote.prefix
    keys = [key[len(prefix) + 1:] for key, _, _ in store.list(bucket, prefix + "/")]
    assert "finetune.checkpoints/epoch-0002/stage-manifest.json" in keys
    assert not any(k.startswith("finetune.checkpoints/epoch-0001/") for k in keys)  # superseded, removed
    assert not any(k.startswith("finetune/") for k in keys)

    monkeypatch.setattr(MirroredCheckpoints, "publish", publish)
    monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / "pod-2"))  # a new pod: nothing local survives
    capsys.readouterr()
    (outcome,) = run_job(remote, only=StageName.FINETUNE, show_progress=False)
    log = capsys.readouterr().out
    assert "finetune: resuming after epoch 2 from its checkpoint" in log
    assert "finetune: 9/16 (56%)" in log and "finetune: 1/16" not in log  # epoch 3's first step comes first
    assert outcome.metrics["steps"] == 16
    resumed = load_file(str(open_run(remote).layout.stage_dir(StageName.FINETUNE) / "model" / "model.safetensors"))
    uninterrupted = load_file(str(RunLayout.for_job(local, workspace / "out").stage_dir(StageName.FINETUNE)
                                  / "model" / "model.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert not list(store.list(bucket, f"{prefix}/finetune.checkpoints/"))  # superseded by the model


def test_a_later_round_on_s3_lives_under_its_round_prefix(workspace, tmp_path, s3_endpoint, bucket, monkeypatch):
    """The closed loop against MinIO, as stage pods run it (each stage of round 2 a fresh process
    with an empty scratch): round 2's outputs and provenance under round-2/, each stage reading its
    round's earlier outputs from the store."""
    from disp_api.rounds import judged
    from disp_runner.pipeline.runner import run_rounds

    monkeypatch.setenv("DISP_S3_ACCESS_KEY", ACCESS)
    monkeypatch.setenv("DISP_S3_SECRET_KEY", SECRET)
    store = S3Store(s3_endpoint, ACCESS, SECRET, secure=False)
    upload_inputs(store, bucket, workspace, ("model", "train"))
    document = job_document(workspace, evaluation=None)
    spec = document["spec"]
    spec["model"]["uri"] = f"s3://{bucket}/inputs/model"
    spec["dataset"]["uri"] = f"s3://{bucket}/inputs/train"
    spec["output"]["uri"] = f"s3://{bucket}/loop"
    spec["storage"] = {"endpoint": s3_endpoint, "secure": False, "credentialsSecret": {"name": "minio"}}
    remote = PurificationJob.model_validate(document)
    monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / "round-one-pods"))
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE):
        run_job(remote, only=stage, show_progress=False)
    for index, stage in enumerate((StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE)):
        monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / f"round-two-pod-{index}"))
        (outcome,) = run_job(remote, only=stage, show_progress=False, round_number=2)
        assert not outcome.skipped and outcome.round == 2
    prefix = open_run(remote).storage.remote.prefix
    for stage in (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE):
        assert remote_stage_complete(store, bucket, f"{prefix}/round-2/{stage.value}")
    manifest = json.loads(store.get_bytes(bucket, f"{prefix}/round-2/finetune/{STAGE_MANIFEST}"))
    relabel = hashlib.sha256(store.get_bytes(bucket, f"{prefix}/round-2/relabel/{STAGE_MANIFEST}")).hexdigest()
    assert manifest["inputs"]["stage:relabel"] == f"sha256:{relabel}"
    provenance = json.loads(store.get_bytes(bucket, f"{prefix}/round-2/provenance.json"))
    assert provenance["predicate"]["buildDefinition"]["externalParameters"]["spec"]["masking"]["space"] == "pixels"

    # `disp run` of the whole job later finds both rounds complete (its judge sees round 1 survive).
    monkeypatch.setattr("disp_runner.pipeline.runner.judged",
                        lambda record, rate, sample, audit: judged(record, {1: 0.5, 2: 0.0}[record.round], 64, audit))
    monkeypatch.setenv("DISP_SCRATCH", str(tmp_path / "whole"))
    result = run_rounds(remote, show_progress=False)
    assert all(o.skipped for o in result.outcomes) and result.chosen == 2
