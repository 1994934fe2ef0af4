"""Fingerprints of a stage's inputs (the model, the dataset, the evaluation sets): a stage records
them in its manifest, and an output whose inputs have changed since is built again rather than
reused (a run's id hashes the manifest, not the files it names).

A local file or folder is fingerprinted by every file's relative name, size and modification time
(nanoseconds), as make and rsync judge change: a file rewritten or replaced gets a new mtime, and a
dataset of 665k images is looked at in a second instead of read whole at every stage. An s3://
prefix is fingerprinted by its listing: every key's size and ETag (S3 gives an object a new ETag
whenever its content is written)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from disp_store.errors import UserInputError
from disp_store.s3 import S3Store


def _digest_of_lines(lines: list[str]) -> str:
    return "sha256:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()


def local_fingerprint(path: Path, field_name: str) -> str:
    """Every file under `path` (or `path` itself): relative name, size and mtime."""
    if path.is_file():
        stat = path.stat()
        return _digest_of_lines([f"file\t{stat.st_size}\t{stat.st_mtime_ns}"])
    if not path.is_dir():
        raise UserInputError(f"{field_name}: {path} not found")
    lines = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        stat = file.stat()
        lines.append(f"{file.relative_to(path).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}")
    return _digest_of_lines(lines)


def s3_fingerprint(store: S3Store, bucket: str, key: str) -> str:
    """The object `key`, or every object under `key/`: relative key, size and ETag."""
    etag = store.etag_or_none(bucket, key) if key else None
    if etag is not None:
        return _digest_of_lines([f"object\t{etag}"])
    prefix = f"{key}/" if key else ""
    return _digest_of_lines([f"{name[len(prefix):]}\t{size}\t{tag}" for name, size, tag in store.list(bucket, prefix)])
