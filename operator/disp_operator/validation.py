"""Is a PurificationJob runnable in the cluster? The typed spec catches malformed values; these checks
add what only the cluster can tell: every URI is on S3 (pods have no other shared storage), the
credentials Secret exists with both keys, and the model folder holds weights the runner may load
(safetensors, or pickle only when the spec opts in). Each error names the field at fault."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from disp_api import PurificationJob
from disp_api.base import FieldError
from disp_api.contract import MODEL_CONFIG, SUPPORTED_MODEL_TYPES, WEIGHT_INDEX, split_s3_uri, weight_files
from disp_api.spec import URI_FIELDS

OTHER_WEIGHTS = (".gguf", ".ggml", ".onnx", ".h5", ".msgpack", ".tflite", ".mlmodel")


class InvalidSpec(Exception):
    """The job cannot run as written; the message names the field."""


def parse_job(body: Mapping[str, Any]) -> PurificationJob:
    """The typed job from a custom resource's body, or InvalidSpec naming the first bad field."""
    meta = body.get("metadata") or {}
    document = {
        "apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
        "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace") or "default", "uid": meta.get("uid"),
                     "labels": meta.get("labels") or {}},
        "spec": body.get("spec") or {},
    }
    try:
        return PurificationJob.model_validate(document)
    except ValidationError as exc:
        error = FieldError.first_of(exc)
        raise InvalidSpec(f"{error.field or 'spec'}: {error.message}") from None


# Every URI field of the spec (disp_api's list): in a cluster each must be s3://. The operator checks
# it (check_static) and the CRD's CEL rules, generated from this list, too.
S3_URI_FIELDS = URI_FIELDS
S3_URI_REASON = "runner pods share data only through the artifact store"


def check_static(job: PurificationJob) -> None:
    """What the spec alone must satisfy to run in a cluster."""
    for field, uri in job.spec.uris().items():
        try:
            bucket, _ = split_s3_uri(uri)
        except ValueError:
            raise InvalidSpec(f"{field}: {uri!r} is not an s3://BUCKET/PREFIX URI ({S3_URI_REASON})") from None
        if not 3 <= len(bucket) <= 63 or bucket != bucket.lower() or bucket.startswith("-"):
            raise InvalidSpec(f"{field}: {bucket!r} is not a valid bucket name")
    storage = job.spec.storage
    if storage is None or not storage.endpoint:
        raise InvalidSpec("spec.storage.endpoint: required (the S3/MinIO endpoint the URIs live on)")
    if storage.credentials_secret is None:
        raise InvalidSpec("spec.storage.credentialsSecret: required (a Secret with the S3 access and secret keys)")


def _host_port(text: str) -> tuple[str, str]:
    host, colon, port = text.strip().lower().rpartition(":")
    return (host, port) if colon and port.isdigit() else (text.strip().lower(), "")


def endpoint_allowed(endpoint: str, patterns: tuple[str, ...]) -> bool:
    """`host[:port]` against the chart's storage.allowedEndpoints: shell-style patterns on the host
    (`*.minio.svc`), a pattern without a port allows any port, hosts compare case-insensitively."""
    host, port = _host_port(endpoint)
    for pattern in patterns:
        allowed_host, allowed_port = _host_port(pattern)
        if fnmatch.fnmatchcase(host, allowed_host) and allowed_port in ("", port):
            return True
    return False


def check_policy(job: PurificationJob, credential_namespaces: Optional[frozenset[str]],
                 forbid_unsafe_pickle: bool, allowed_endpoints: Optional[tuple[str, ...]] = None) -> None:
    """What the cluster's operator is configured to allow (the chart's values). Checked before the
    operator reads a Secret or connects anywhere."""
    storage = job.spec.storage
    if allowed_endpoints is not None and storage is not None and not endpoint_allowed(storage.endpoint,
                                                                                     allowed_endpoints):
        raise InvalidSpec(f"spec.storage.endpoint: {storage.endpoint!r} is not an S3 endpoint this cluster allows "
                          f"(storage.allowedEndpoints: {', '.join(allowed_endpoints) or 'none'}); ask the "
                          "cluster's administrators to add it")
    if forbid_unsafe_pickle and job.spec.model.allow_unsafe_pickle:
        raise InvalidSpec("spec.model.allowUnsafePickle: this cluster refuses pickle weights (they run code when "
                          "loaded; the operator's forbidUnsafePickle is set): convert the model to safetensors")
    namespace = job.metadata.namespace
    if credential_namespaces is not None and namespace not in credential_namespaces:
        raise InvalidSpec(f"spec.storage.credentialsSecret: the operator may not read Secrets in namespace "
                          f"{namespace!r} (it reads S3 credentials only in: "
                          f"{', '.join(sorted(credential_namespaces)) or 'no namespace'}); ask the cluster's "
                          "administrators to add it to the chart's credentialNamespaces")


@dataclass(frozen=True)
class ClusterFacts:
    """What the handler looked up before validating."""

    secret_keys: Optional[frozenset[str]]  # the credentials Secret's data keys; None if it does not exist
    model_files: Optional[tuple[str, ...]] = None  # file names under spec.model.uri; None if not looked up
    # config.json's model_type (None if not looked up), or a ConfigProblem saying why it could not be read
    model_type: Optional[object] = None
    signing_secret_exists: Optional[bool] = None  # spec.provenance.signingKeySecret's Secret; None if not looked up


@dataclass(frozen=True)
class ConfigProblem:
    """config.json could not be read as a JSON object (too large, not JSON, not an object)."""

    reason: str


def check_cluster(job: PurificationJob, facts: ClusterFacts) -> None:
    ref = job.spec.storage.credentials_secret if job.spec.storage else None
    if ref is not None:
        if facts.secret_keys is None:
            raise InvalidSpec(f"spec.storage.credentialsSecret.name: Secret {ref.name!r} does not exist "
                              f"in namespace {job.metadata.namespace!r}")
        for field, key in (("accessKeyKey", ref.access_key_key), ("secretKeyKey", ref.secret_key_key)):
            if key not in facts.secret_keys:
                raise InvalidSpec(f"spec.storage.credentialsSecret.{field}: Secret {ref.name!r} has no key {key!r}")
    signing = job.spec.provenance.signing_key_secret
    if signing is not None and facts.signing_secret_exists is False:
        # Checked before any stage runs: otherwise the first stage pod would wait, Pending, for it.
        raise InvalidSpec(f"spec.provenance.signingKeySecret.name: Secret {signing.name!r} does not exist "
                          f"in namespace {job.metadata.namespace!r}")
    if facts.model_files is not None:
        check_model_files(job, facts.model_files)
    if facts.model_type is not None:
        check_model_type(job, facts.model_type)


def check_model_type(job: PurificationJob, model_type: object) -> None:
    """The runner loads only the families it knows: anything else would fail in the first GPU pod."""
    where = f"spec.model.uri: {job.spec.model.uri}/{MODEL_CONFIG}"
    if isinstance(model_type, ConfigProblem):
        raise InvalidSpec(f"{where}: {model_type.reason}")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidSpec(f"{where}: model_type is {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


def check_model_files(job: PurificationJob, files: tuple[str, ...]) -> None:
    """The model folder must be Hugging Face format with loadable weights."""
    uri = job.spec.model.uri
    names = [f.rsplit("/", 1)[-1] for f in files]
    if not names:
        raise InvalidSpec(f"spec.model.uri: no model at {uri}")
    if "config.json" not in names:
        raise InvalidSpec(f"spec.model.uri: {uri} has no config.json (expected a Hugging Face model folder)")
    safe, pickled = weight_files(names)
    if len(safe) > 1 and WEIGHT_INDEX not in names:
        raise InvalidSpec(f"spec.model.uri: {uri} holds {len(safe)} safetensors shards but no {WEIGHT_INDEX} "
                          "saying which weights each holds")
    other = [n for n in names if n.endswith(OTHER_WEIGHTS)]
    if safe:
        return
    if pickled:
        if job.spec.model.allow_unsafe_pickle:
            return
        raise InvalidSpec(f"spec.model.allowUnsafePickle: {uri} holds only pickle weights ({pickled[0]}), which run "
                          "code when loaded; convert them to safetensors or set allowUnsafePickle: true for a "
                          "model you trust")
    if other:
        raise InvalidSpec(f"spec.model.uri: unsupported weight format {other[0]!r} at {uri} "
                          "(safetensors expected)")
    raise InvalidSpec(f"spec.model.uri: no weights at {uri} (expected *.safetensors)")
