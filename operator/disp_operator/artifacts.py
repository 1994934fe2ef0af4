"""The operator's read-mostly view of a run in the artifact store: progress.json while a stage runs,
the evaluate stage's metrics.json at the end, the model folder's file names for validation, and
the clean-up of a deleted job's intermediate artifacts when the spec asks for it.

The figures the operator puts in status and exports to Prometheus (ASR, residual rate) are read
from objects that anyone holding the run's S3 keys can overwrite, so they are taken only when they
are the ones their stage published: the file's SHA-256 must be the one its stage manifest records,
and the manifest's the one the run's provenance.json records (`published_problem`). Anything else
raises ArtifactsTampered, and the job fails with that reason instead of showing the figures.

All of it is blocking I/O (the minio SDK); the handlers call it from a worker thread."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any, Callable, Mapping, Optional, Union

from pydantic import ValidationError

from disp_api import AuditFigures, MetricsSummary, PurificationJob, PurificationMetrics, StageName, StageProgress
from disp_api.contract import METRICS_FILE as STAGE_METRICS_FILE
from disp_api.contract import (AUDIT_FILE, MAX_MODEL_CONFIG_BYTES, MODEL_CONFIG, PROGRESS_FILE, PROVENANCE_FILE,
                               PROVENANCE_SIGNATURE_FILE, split_s3_uri)
from disp_api.contract import STAGE_MANIFEST_FILE
from disp_api.rounds import round_folder
from disp_api.spec import PURIFIED_MODEL_PATH
from disp_operator.validation import ConfigProblem
from disp_store.s3 import RetryPolicy, S3Store, StoreError

METRICS_FILE = f"{StageName.EVALUATE.value}/{STAGE_METRICS_FILE}"

# The operator polls many jobs: a store that does not answer is retried briefly, then reported as
# unavailable for this pass; the next pass tries again.
OPERATOR_RETRY = RetryPolicy(attempts=2, base_delay=0.5, max_delay=2.0)


class ArtifactsTampered(Exception):
    """A file the operator reads figures from is not the one its stage published."""


def published_problem(run_uri: str, stage: StageName, name: str, data: bytes, manifest: Optional[bytes],
                      provenance: Optional[bytes]) -> Optional[str]:
    """Why `data`, read as <run>/<stage>/<name>, is not the file the stage published (None when it
    is): its SHA-256 against the stage manifest's record of it, and the manifest's against the
    record of the run's provenance.json (written after the stage's manifest, before its pod ends)."""
    manifest_name = f"{stage.value}/{STAGE_MANIFEST_FILE}"
    manifest_uri, provenance_uri = f"{run_uri}/{manifest_name}", f"{run_uri}/{PROVENANCE_FILE}"
    return _digest_problem(data, f"{run_uri}/{stage.value}/{name}", manifest, manifest_uri, "a stage manifest",
                           lambda record: _digest_of(record["files"], "path", name, ("sha256",)),
                           "changed after the stage published it") or \
        _digest_problem(manifest or b"", manifest_uri, provenance, provenance_uri, "a provenance record",
                        lambda record: _digest_of(record["predicate"]["runDetails"]["byproducts"], "name",
                                                  manifest_name, ("digest", "sha256")),
                        "changed after the run published it")


def _digest_of(entries: list, key: str, value: str, digest: tuple[str, ...]) -> Optional[str]:
    """The digest recorded for the entry whose `key` is `value` (a list of JSON objects)."""
    entry = next((e for e in entries if isinstance(e, dict) and e.get(key) == value), None)
    if entry is None:
        return None
    for part in digest:
        entry = entry[part]
    return str(entry)


def _digest_problem(content: bytes, content_uri: str, record: Optional[bytes], record_uri: str, record_kind: str,
                    find: Callable[[Any], Optional[str]], changed: str) -> Optional[str]:
    """Why `content` is not what `record` (a JSON file, at `record_uri`) says it is, if it is not."""
    if record is None:
        return f"{content_uri}: {record_uri} is missing, so nothing records what was published"
    try:
        recorded = find(json.loads(record))
    except (ValueError, UnicodeDecodeError, RecursionError, KeyError, TypeError):
        return f"{record_uri}: not {record_kind}"
    if recorded is None:
        return f"{content_uri}: not recorded in {record_uri}"
    actual = hashlib.sha256(content).hexdigest()
    if actual != recorded:
        return f"{content_uri}: SHA-256 {actual[:12]}… differs from the {recorded[:12]}… that {record_uri} records " \
               f"({changed})"
    return None


class RunStore:
    def __init__(self, job: PurificationJob, access_key: str, secret_key: str):
        storage = job.spec.storage
        assert storage is not None and storage.endpoint, "validated: s3 URIs come with an endpoint"
        self.store = S3Store(storage.endpoint, access_key, secret_key, secure=storage.secure, region=storage.region,
                             retry=OPERATOR_RETRY)
        self.job = job
        self.bucket, self.run_key = split_s3_uri(job.run_uri())

    @classmethod
    def from_secret_data(cls, job: PurificationJob, data: Mapping[str, str]) -> "RunStore":
        """Open the run's store with the keys of the spec's credentials Secret (its base64 `data`)."""
        ref = job.spec.storage.credentials_secret
        assert ref is not None, "validated: s3 URIs come with a credentials Secret"
        decode = lambda key: base64.b64decode(data.get(key, "")).decode()  # noqa: E731
        return cls(job, decode(ref.access_key_key), decode(ref.secret_key_key))

    def model_files(self) -> tuple[str, ...]:
        """Names of the files directly in the model folder (empty if there is none)."""
        bucket, key = split_s3_uri(self.job.spec.model.uri)
        prefix = key + "/" if key else ""
        try:
            return tuple(name[len(prefix):] for name, _, _ in self.store.list(bucket, prefix)
                         if "/" not in name[len(prefix):])
        except StoreError as exc:
            if "NoSuchBucket" in str(exc):
                return ()
            raise

    def model_type(self) -> object:
        """config.json's model_type, or a ConfigProblem when config.json is not a small JSON object."""
        config = self.model_config()
        return config if isinstance(config, ConfigProblem) else config.get("model_type")

    def model_config(self) -> Union[dict, ConfigProblem]:
        """config.json as a JSON object, or a ConfigProblem when it is not a small one."""
        bucket, key = split_s3_uri(self.job.spec.model.uri)
        name = f"{key}/{MODEL_CONFIG}" if key else MODEL_CONFIG
        size = next((size for found, size, _ in self.store.list(bucket, name) if found == name), None)
        if size is None:
            return ConfigProblem("not found")
        if size > MAX_MODEL_CONFIG_BYTES:
            return ConfigProblem(f"{size} bytes, more than a model config can need")
        try:
            config = json.loads(self.store.get_bytes(bucket, name))
        except (ValueError, UnicodeDecodeError, RecursionError):
            return ConfigProblem("not valid JSON")
        if not isinstance(config, dict):
            return ConfigProblem(f"expected a JSON object, got {type(config).__name__}")
        return config

    def _round_key(self, round_number: int) -> str:
        folder = round_folder(round_number)
        return f"{self.run_key}/{folder}" if folder else self.run_key

    def progress(self, round_number: int = 1) -> Optional[StageProgress]:
        """The running stage's last progress report (in its round's folder), or None before the first one."""
        raw = self.store.get_bytes_or_none(self.bucket, f"{self._round_key(round_number)}/{PROGRESS_FILE}")
        if raw is None:
            return None
        try:
            return StageProgress.model_validate_json(raw)
        except ValidationError:
            return None  # a torn or foreign file: progress is advisory, wait for the next write

    def audit(self, round_number: int) -> MetricsSummary:
        """A round's audit figures (its finetune/audit.json), only as its stage published it."""
        raw = self._published(StageName.FINETUNE, AUDIT_FILE, round_number)
        try:
            return MetricsSummary.of_audit(AuditFigures.model_validate(json.loads(raw)))
        except (ValueError, ValidationError) as exc:
            key = f"{self._round_key(round_number)}/{StageName.FINETUNE.value}/{AUDIT_FILE}"
            raise StoreError(f"s3://{self.bucket}/{key}: not an audit file ({exc})") from None

    def metrics(self, round_number: int = 1) -> MetricsSummary:
        """The headline numbers of a finished run, from the round whose model it keeps:
        evaluate/metrics.json when the job has an evaluation set, else the audit alone
        (finetune/audit.json); each only as its stage published it (ArtifactsTampered otherwise)."""
        if self.job.spec.evaluation is None:
            return self.audit(round_number)
        raw = self._published(StageName.EVALUATE, STAGE_METRICS_FILE, round_number)
        try:
            metrics = PurificationMetrics.model_validate(json.loads(raw))
        except (ValueError, ValidationError) as exc:
            key = f"{self._round_key(round_number)}/{StageName.EVALUATE.value}/{STAGE_METRICS_FILE}"
            raise StoreError(f"s3://{self.bucket}/{key}: not a metrics file ({exc})") from None
        return MetricsSummary.model_validate(metrics.model_dump(include=set(MetricsSummary.model_fields)))

    def _published(self, stage: StageName, name: str, round_number: int = 1) -> bytes:
        """<round folder>/<stage>/<name>, checked against its stage manifest and the round's provenance."""
        round_key = self._round_key(round_number)
        stage_key = f"{round_key}/{stage.value}"
        data = self.store.get_bytes(self.bucket, f"{stage_key}/{name}")
        manifest = self.store.get_bytes_or_none(self.bucket, f"{stage_key}/{STAGE_MANIFEST_FILE}")
        provenance = self.store.get_bytes_or_none(self.bucket, f"{round_key}/{PROVENANCE_FILE}")
        problem = published_problem(f"s3://{self.bucket}/{round_key}", stage, name, data, manifest, provenance)
        if problem is not None:
            raise ArtifactsTampered(problem)
        return data

    def delete_intermediates(self, kept_round: int = 1) -> int:
        """Delete the run's files except the purified model (the kept round's) and its provenance
        record (what made the model; its digests still check the model); returns how many were deleted."""
        round_key = self._round_key(kept_round)
        keep = f"{round_key}/{PURIFIED_MODEL_PATH}/"
        records = {f"{round_key}/{PROVENANCE_FILE}", f"{round_key}/{PROVENANCE_SIGNATURE_FILE}"}
        keys = [name for name, _, _ in self.store.list(self.bucket, self.run_key + "/")
                if not name.startswith(keep) and name not in records]
        self.store.remove(self.bucket, keys)
        return len(keys)
