"""What the runner and the operator must agree on beyond the spec, defined once: the runner's exit
codes (the operator decides from them whether a failed pod is worth retrying), the files it reads
from a run folder, and how an `s3://` URI splits into bucket and key."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL_ERROR = 1  # a bug: one line on stderr, the traceback with --debug
    USER_ERROR = 2  # bad input: permanent, a retry cannot help
    WEAK_BACKDOOR = 3  # `disp attack`: the backdoor did not reach its target ASR (the folder is written)
    TRANSIENT_ERROR = 75  # EX_TEMPFAIL: the environment failed (storage unreachable); retry later


PROGRESS_FILE = "progress.json"  # in the run folder, overwritten while a stage runs
METRICS_FILE = "metrics.json"  # in the evaluate stage's folder
AUDIT_FILE = "audit.json"  # in the finetune stage's folder: disp_api.metrics.AuditFigures

S3_SCHEME = "s3://"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


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
