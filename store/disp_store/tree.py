"""Folders in and out of S3: stage outputs (manifest last up, verified down) and user folders
(models, datasets) fetched into a local cache keyed by object ETag, so a rerun downloads nothing."""

from __future__ import annotations

import json
from pathlib import Path

from disp_api.contract import STAGE_MANIFEST_FILE as STAGE_MANIFEST
from disp_store.s3 import S3Store, StoreError

ETAG_INDEX = ".disp-etags.json"


def _inside(dest: Path, rel: str, where: str) -> Path:
    """dest/rel, refusing names that would leave `dest` (keys and manifests are untrusted)."""
    parts = Path(rel).parts
    if not rel or Path(rel).is_absolute() or ".." in parts:
        raise StoreError(f"{where}: refusing object name {rel!r} (it would leave the download folder)")
    return dest / rel


def upload_stage(folder: Path, store: S3Store, bucket: str, prefix: str) -> dict[str, str]:
    """Upload a published stage folder: every file, then its manifest. A crash before the last call
    leaves no remote manifest, so readers ignore the partial upload and the stage reruns. Returns
    the ETag of every object written, by path in the folder."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != STAGE_MANIFEST)
    etags = {}
    for path in files:
        rel = path.relative_to(folder).as_posix()
        etags[rel] = store.upload_file(path, bucket, f"{prefix}/{rel}")
    etags[STAGE_MANIFEST] = store.upload_file(folder / STAGE_MANIFEST, bucket, f"{prefix}/{STAGE_MANIFEST}")
    return etags


def remote_stage_complete(store: S3Store, bucket: str, prefix: str) -> bool:
    return store.exists(bucket, f"{prefix}/{STAGE_MANIFEST}")


def _etag_record(folder: Path) -> Path:
    # Beside the folder, not in it: the folder's files are exactly what its manifest lists.
    return folder.with_name(f".{folder.name}.s3-etags.json")


def write_uploaded_etags(folder: Path, etags: dict[str, str]) -> None:
    """Remember the ETags of a stage output's objects as this process wrote or verified them."""
    _etag_record(folder).write_text(json.dumps(etags))


def read_uploaded_etags(folder: Path) -> dict[str, str]:
    return _read_index(_etag_record(folder))


def remote_stage_problem(store: S3Store, bucket: str, prefix: str, manifest_raw: bytes,
                         known_etags: dict[str, str]) -> str | None:
    """What is wrong with a published stage output in the store (None: nothing seen): a file its
    manifest lists that is missing or of another size, or whose ETag differs from the one this
    machine recorded when it uploaded or verified it (its content was overwritten). Without a
    record the SHA-256 check of the download decides."""
    try:
        entries = json.loads(manifest_raw)["files"]
        listed = {entry["path"]: entry["size"] for entry in entries}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return f"s3://{bucket}/{prefix}/{STAGE_MANIFEST} is unreadable"
    objects = {key[len(prefix) + 1:]: (size, etag) for key, size, etag in store.list(bucket, prefix + "/")}
    if known_etags.get(STAGE_MANIFEST) != objects.get(STAGE_MANIFEST, (0, None))[1]:
        known_etags = {}  # recorded for another publication of this output: it says nothing here
    for rel, size in sorted(listed.items()):
        if rel not in objects:
            return f"s3://{bucket}/{prefix}/{rel} is missing"
        if objects[rel][0] != size:
            return f"s3://{bucket}/{prefix}/{rel} has {objects[rel][0]} bytes, not {size}"
        if rel in known_etags and known_etags[rel] != objects[rel][1]:
            return f"s3://{bucket}/{prefix}/{rel} was overwritten since it was published"
    return None


def download_stage(store: S3Store, bucket: str, prefix: str, dest: Path) -> dict[str, str]:
    """Fetch a completed stage output: the manifest, then every file it lists, each verified
    against its SHA-256 (a changed object fails, naming its key). The manifest is written last.
    Returns the ETags of the objects as listed once they were verified."""
    manifest_key = f"{prefix}/{STAGE_MANIFEST}"
    if not store.exists(bucket, manifest_key):
        raise StoreError(f"s3://{bucket}/{manifest_key}: missing; that stage output is incomplete (rerun its stage)")
    raw = store.get_bytes(bucket, manifest_key)
    try:
        manifest = json.loads(raw)
        entries = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise StoreError(f"s3://{bucket}/{manifest_key}: unreadable stage manifest") from None
    dest.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        target = _inside(dest, entry["path"], f"s3://{bucket}/{manifest_key}")
        store.download_file(bucket, f"{prefix}/{entry['path']}", target, sha256=entry["sha256"])
    (dest / STAGE_MANIFEST).write_bytes(raw)
    wanted = {entry["path"] for entry in entries} | {STAGE_MANIFEST}
    return {rel: etag for key, _size, etag in store.list(bucket, prefix + "/")
            if (rel := key[len(prefix) + 1:]) in wanted}


def _read_index(path: Path) -> dict[str, str]:
    try:
        index = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}  # a damaged cache index only costs a fresh download
    return {k: v for k, v in index.items() if isinstance(k, str) and isinstance(v, str)} \
        if isinstance(index, dict) else {}


def download_folder(store: S3Store, bucket: str, prefix: str, dest: Path) -> Path:
    """Mirror every object under `prefix` into `dest`, skipping files whose ETag is unchanged and
    removing the cached files whose objects are gone, so `dest` holds exactly the remote listing."""
    index_path = dest / ETAG_INDEX
    index: dict[str, str] = _read_index(index_path)
    objects = list(store.list(bucket, prefix + "/"))
    if not objects:
        raise StoreError(f"s3://{bucket}/{prefix}/: no objects (wrong URI?)")
    dest.mkdir(parents=True, exist_ok=True)
    listed = {key[len(prefix) + 1:] for key, _size, _etag in objects}
    for cached in sorted(p for p in dest.rglob("*") if p.is_file() and p != index_path):
        rel = cached.relative_to(dest).as_posix()
        if rel not in listed:  # deleted (or never part of the folder) upstream
            cached.unlink()
            index.pop(rel, None)
    index_path.write_text(json.dumps(index))
    for key, _size, etag in objects:
        rel = key[len(prefix) + 1:]
        target = _inside(dest, rel, f"s3://{bucket}/{key}")
        if index.get(rel) == etag and target.is_file():
            continue
        store.download_file(bucket, key, target)
        index[rel] = etag
        index_path.write_text(json.dumps(index))  # after each file: an interrupted fetch resumes
    return dest
