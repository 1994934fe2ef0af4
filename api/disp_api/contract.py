"""What the runner and the operator must agree on beyond the spec, defined once: the runner's exit
codes (the operator decides from them whether a failed pod is worth retrying), the files it reads
from a run folder, and how an `s3://` URI splits into bucket and key."""

from __future__ import annotations

import re
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL_ERROR = 1  # a bug: one line on stderr, the traceback with --debug
    USER_ERROR = 2  # bad input: permanent, a retry cannot help
    WEAK_BACKDOOR = 3  # `disp attack`: the backdoor did not reach its target ASR (the folder is written)
    NOT_VERIFIED = 4  # `disp verify`: the run does not match its provenance (each mismatch named)
    TRANSIENT_ERROR = 75  # EX_TEMPFAIL: the environment failed (storage unreachable); retry later


PROGRESS_FILE = "progress.json"  # in the run folder, overwritten while a stage runs
STAGE_MANIFEST_FILE = "stage-manifest.json"  # in a stage's folder, written last: its files' SHA-256
METRICS_FILE = "metrics.json"  # in the evaluate stage's folder
AUDIT_FILE = "audit.json"  # in the finetune stage's folder: disp_api.metrics.AuditFigures
PROVENANCE_FILE = "provenance.json"  # in the run folder once the fine-tune is complete: in-toto + SLSA
PROVENANCE_SIGNATURE_FILE = "provenance.sig.json"  # beside it when signed: a DSSE envelope (Ed25519)
# Environment the operator gives a stage pod beyond the manifest:
RUNNER_IMAGE_ENV = "DISP_RUNNER_IMAGE"  # the image reference the pod runs (recorded in its stage manifest)
SIGNING_KEY_ENV = "DISP_SIGNING_KEY"  # spec.provenance.signingKeySecret's PEM, from the Secret

S3_SCHEME = "s3://"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


# A URI the API server refuses (a CEL rule on every URI field of the CRD) and the runner and
# operator refuse before anything is created or deleted: a '..' segment (a key or path that leaves
# its folder, e.g. the local cache an s3:// key is mirrored into), a '.' segment in an s3:// key,
# a leading '~' and any '$' (nothing here expands them). The rule is made of contains, startsWith
# and endsWith only: the API server prices every rule by the longest string it may see, and a
# regular expression over 4096-character URIs costs a large share of the CRD's budget. An s3://
# key with an empty segment ('//', or an absolute key) is refused by uri_problem, so by `disp run`
# and the operator, not by the API server (as a malformed bucket name is).
UNSAFE_URI_MESSAGE = ("must not contain a '..' segment, a '.' segment in an s3:// key, a leading '~' or a '$' "
                      "(nothing is expanded: give the full path)")


def unsafe_uri_cel(value: str) -> str:
    """The CEL condition, true for a URI uri_problem refuses for its shape, on the string `value`."""
    return (f"{value}.startsWith('~') || {value}.startsWith('file://~') || {value}.contains('$') || "
            f"{value}.contains('/../') || {value}.endsWith('/..') || {value}.startsWith('../') || {value} == '..' || "
            f"({value}.startsWith('s3://') && ({value}.contains('/./') || {value}.endsWith('/.')))")


# s3:// bucket names as S3 and MinIO allow them.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def uri_problem(uri: str) -> str | None:
    """Why `uri` may not name an input or output (None when it may): the one check every URI field
    passes through, in the spec's validation, the operator and the runner."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        return "contains a control character"
    if uri.startswith("~") or uri.startswith("file://~"):
        return "starts with '~', which nothing expands here (give the full path)"
    if "$" in uri:
        return "contains a '$' ($VARIABLES are not expanded here: give the full path)"
    if is_s3_uri(uri):
        bucket, _, key = uri[len(S3_SCHEME):].partition("/")
        if not bucket:
            return "names no bucket (expected s3://BUCKET/PREFIX)"
        if not _BUCKET.match(bucket):
            return f"bucket {bucket!r} is not a valid bucket name (3-63 lower-case letters, digits, '.' and '-')"
        if key.startswith("/"):
            return "has an absolute key (a '/' right after the bucket)"
        segments = key[:-1].split("/") if key.endswith("/") else key.split("/")
        if key and "" in segments:
            return "has an empty segment ('//') in its key"
        if ".." in segments or "." in segments:
            return f"has a {'..' if '..' in segments else '.'!r} segment in its key, which would leave the prefix"
    else:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if "://" in uri and not uri.startswith("file://"):
            return "has an unsupported scheme (use a path, file:// or s3://)"
        if not path:
            return "names no path"
        if ".." in path.split("/"):
            return "has a '..' segment (give the folder's full path)"
    return None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://BUCKET/PREFIX` -> (BUCKET, PREFIX without leading or trailing "/"). ValueError when the
    URI is not s3:// or names no bucket."""
    if not is_s3_uri(uri):
        raise ValueError(f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(S3_SCHEME):].partition("/")
    if not bucket:
        raise ValueError(f"{uri!r} names no bucket (expected s3://BUCKET/PREFIX)")
    return bucket, key.strip("/")


# Model folders (Hugging Face format): the config the family is read from, and the index a sharded
# checkpoint needs. The operator refuses other model types before any pod starts; the runner's
# registry of model families must list exactly these (a test holds the two together).
MODEL_CONFIG = "config.json"
WEIGHT_INDEX = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("disp_mdlm", "llava_llada")
MAX_MODEL_CONFIG_BYTES = 2**20

# Weight files in a model folder: safetensors load without running code; the pickle formats run
# code when loaded, so both sides refuse them unless the spec opts in (spec.model.allowUnsafePickle).
SAFE_WEIGHT_SUFFIXES = (".safetensors",)
PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
NOT_WEIGHTS = frozenset({"training_args.bin"})  # the Trainer's pickled arguments, never loaded


def weight_files(names: list[str] | tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(safetensors files, pickle-format weight files) among a folder's file names."""
    safe = [n for n in names if n.endswith(SAFE_WEIGHT_SUFFIXES)]
    pickled = [n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES) and n not in NOT_WEIGHTS]
    return safe, pickled
