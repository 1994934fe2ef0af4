"""Stage outputs on disk: the run folder layout, completion manifests and progress.json.

    <output>/runs/<namespace>/<name>/<uid>/
        progress.json                    overwritten while a stage runs
        <stage>/                         a completed stage's files ...
        <stage>/stage-manifest.json      ... and, written last, its manifest
        <stage>-shards/<i>-of-<N>/       one shard of a sharded stage (same structure)
        <stage>.checkpoints/             resumable state of a long stage (fine-tuning)

A stage writes into a staging folder, then its manifest (every file's size and SHA-256, plus the
stage's metrics), then renames the folder into place: a folder without a manifest is never
complete, and a reader verifies every checksum before trusting the files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from disp_api import PurificationJob, StageName, StageProgress
from disp_api.contract import PROGRESS_FILE
from disp_api.contract import STAGE_MANIFEST_FILE as STAGE_MANIFEST
from disp_runner import logs
from disp_runner.folders import write_atomically
from disp_runner.errors import TransientError, UserInputError
from disp_runner.safepaths import require_inside, resolve_inside
from disp_store.s3 import S3Store

MANIFEST_VERSION = 1
# A manifest input that is an earlier stage's output: "stage:<stage>" -> the SHA-256 of its manifest.
UPSTREAM_PREFIX = "stage:"


MAX_SHARDS = 1024  # as spec.parallelism allows


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0-based), parsed from the CLI's `i/N`."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if self.count < 1 or not 0 <= self.index < self.count:
            raise UserInputError(f"--shard {self.index}/{self.count}: need 0 <= index < count")
        if self.count > MAX_SHARDS:
            raise UserInputError(f"--shard {self.index}/{self.count}: at most {MAX_SHARDS} shards")

    @classmethod
    def parse(cls, text: str) -> "Shard":
        parts = text.split("/")
        if len(parts) != 2 or not all(p.strip().isdigit() and len(p.strip()) <= 9 for p in parts):
            raise UserInputError(f"--shard {text!r}: expected INDEX/COUNT, e.g. 0/4")
        return cls(int(parts[0]), int(parts[1]))

    @property
    def label(self) -> str:
        return f"{self.index}-of-{self.count}"

    def batch_range(self, num_items: int, batch_size: int) -> range:
        """The items of this shard: a contiguous run of whole batches, so every batch (and so every
        number computed from it) is the same as in the unsharded run."""
        num_batches = -(-num_items // batch_size)
        first = self.index * num_batches // self.count
        last = (self.index + 1) * num_batches // self.count
        return range(min(first * batch_size, num_items), min(last * batch_size, num_items))


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entries(path: Path, skip: str | None = None) -> list[dict[str, Any]]:
    """Every file of `path` (a file, or a folder read recursively, without files named `skip`),
    sorted, each with its relative path, size and SHA-256: a manifest's record of it."""
    if path.is_file():
        return [{"path": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != skip)
    return [{"path": p.relative_to(path).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files]


def write_stage_manifest(folder: Path, stage: StageName, metrics: dict[str, Any], seconds: float,
                         shard: Shard | None = None, inputs: dict[str, str] | None = None,
                         input_digests: dict[str, Any] | None = None,
                         runner: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record every file of `folder` with its size and SHA-256, the fingerprints of the inputs it
    was built from (which decide whether it is still complete), the content digests of the spec
    inputs it read and the runner that built it (for the run's provenance); written last, it marks
    completion."""
    manifest = {
        "version": MANIFEST_VERSION,
        "stage": stage.value,
        "shard": None if shard is None else {"index": shard.index, "count": shard.count},
        "completedAt": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "metrics": metrics,
        "inputs": inputs or {},
        "inputDigests": input_digests or {},
        "runner": runner or {},
        "files": file_entries(folder, skip=STAGE_MANIFEST),
    }
    write_atomically(folder / STAGE_MANIFEST, json.dumps(manifest, indent=2))
    return manifest


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_stage_manifest(folder: Path) -> dict[str, Any]:
    path = folder / STAGE_MANIFEST
    if not path.is_file():
        raise UserInputError(f"{folder}: no {STAGE_MANIFEST}; that stage output is incomplete (rerun its stage)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
            raise ValueError("no file list")
        if not isinstance(manifest.get("metrics", {}), dict):
            raise ValueError("'metrics' is not an object")
        for i, entry in enumerate(manifest["files"]):
            _check_file_entry(folder, entry, f"files[{i}]")
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UserInputError(f"{path}: unreadable stage manifest ({exc})") from None
    return manifest


def _check_file_entry(folder: Path, entry: Any, where: str) -> None:
    """A manifest entry names a file inside its folder, with an integer size and a SHA-256."""
    if not isinstance(entry, dict) or set(entry) != {"path", "size", "sha256"}:
        raise ValueError(f"{where}: expected an object with path, size and sha256")
    if not isinstance(entry["path"], str) or entry["path"] == STAGE_MANIFEST:
        raise ValueError(f"{where}.path: expected a file name")
    if not isinstance(entry["size"], int) or isinstance(entry["size"], bool) or entry["size"] < 0:
        raise ValueError(f"{where}.size: expected a non-negative integer")
    if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
        raise ValueError(f"{where}.sha256: expected 64 lower-case hex digits")
    try:
        resolve_inside(folder, entry["path"], f"{where}.path", inside="the stage folder")
    except UserInputError as exc:
        raise ValueError(str(exc)) from None


def stage_file_problems(folder: Path, manifest: dict[str, Any]) -> Iterator[tuple[Path, str]]:
    """Each file `manifest` lists that is missing from `folder` or differs from its record, with why."""
    for entry in manifest["files"]:
        path = folder / entry["path"]
        if not path.is_file():
            yield path, f"listed in {folder / STAGE_MANIFEST} but missing"
        elif path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            yield path, f"checksum mismatch with {folder / STAGE_MANIFEST} (file changed or corrupt)"


def verify_stage_output(folder: Path) -> dict[str, Any]:
    """The manifest of a completed stage output, after checking every file it lists."""
    manifest = read_stage_manifest(folder)
    for path, problem in stage_file_problems(folder, manifest):
        raise UserInputError(f"{path}: {problem}")
    return manifest


@contextlib.contextmanager
def output_lock(final: Path) -> Iterator[None]:
    """Hold the exclusive right to build `final` (a stage's or shard's output folder) for as long
    as the block runs. A second process on the same output is told who holds it and gets a
    TransientError (exit 75: retry later), not a half-published folder. The lock is the kernel's
    (flock on `<final>.lock`), so a killed holder releases it; whoever takes it next removes the
    staging folders such a holder left behind."""
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.with_name(final.name + ".lock")
    handle = open(lock_path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise TransientError(f"{final} is being built by {holder}; run again when it has finished") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        for stale in final.parent.glob(f".{final.name}.staging-*"):
            shutil.rmtree(stale, ignore_errors=True)
        yield
    finally:
        handle.close()  # releases the lock


@dataclass(frozen=True)
class RunLayout:
    """Where the files of one PurificationJob run live."""

    root: Path

    @classmethod
    def for_job(cls, job: PurificationJob, output_root: Path) -> "RunLayout":
        """The run's folder under `output_root`; refused (before anything is made or removed) if
        it would lie anywhere else, e.g. through a symbolic link inside the output folder."""
        meta = job.metadata
        root = output_root / "runs" / meta.namespace / meta.name / job.run_id
        if output_root.exists():
            require_inside(output_root, root, "metadata")
        return cls(root)

    def within(self, folder: str) -> "RunLayout":
        """The layout of a folder of the run (a purification round's, rounds.round_folder)."""
        return RunLayout(self.root / folder) if folder else self

    def stage_dir(self, stage: StageName) -> Path:
        return self.root / stage.value

    def shard_dir(self, stage: StageName, shard: Shard) -> Path:
        return self.root / f"{stage.value}-shards" / shard.label

    def checkpoint_dir(self, stage: StageName) -> Path:
        return self.root / f"{stage.value}.checkpoints"

    @property
    def progress_file(self) -> Path:
        return self.root / PROGRESS_FILE

    def is_complete(self, stage: StageName, shard: Shard | None = None) -> bool:
        folder = self.stage_dir(stage) if shard is None else self.shard_dir(stage, shard)
        return (folder / STAGE_MANIFEST).is_file()


@dataclass(frozen=True)
class RemoteRun:
    """The S3 prefix a run's stage outputs are mirrored to (published there, manifest last)."""

    store: S3Store
    bucket: str
    prefix: str

    def stage_prefix(self, layout: RunLayout, folder: Path) -> str:
        return f"{self.prefix}/{folder.relative_to(layout.root).as_posix()}"



class ProgressReporter:
    """Overwrites progress.json (stage, fraction, items, ETA, updated-at) at most every `interval`
    seconds, so a watcher (the operator) sees progress without any Kubernetes access from the pod;
    with `log_interval`, also prints one line at most that often (`kubectl logs -f` in a pod, where
    progress bars are off): items done, the stage's own detail (the loss), elapsed time and ETA."""

    def __init__(self, path: Path, stage: StageName, total: int, shard: Shard | None = None, interval: float = 10.0,
                 mirror: Callable[[Path], None] | None = None, log_interval: float | None = None):
        self.path, self.stage, self.total, self.shard, self.interval = path, stage, max(0, total), shard, interval
        self.mirror = mirror  # e.g. a put to the run's S3 prefix, where the operator reads it
        self.log_interval = log_interval
        self._last_write = self._last_log = float("-inf")
        self._last_logged = 0  # the count of the last line printed: the final update repeats none
        self._started = time.monotonic()
        self._first_done: int | None = None  # items already done when this process started (a resume)

    def restart(self, total: int, done: int) -> None:
        """The total became known (`done` of it already done by an earlier pod): rates count from now."""
        self.total, self._first_done, self._started = max(0, total), done, time.monotonic()

    def eta_seconds(self, done: int, now: float) -> float | None:
        """Time left at the rate this process has managed so far; None before any item is done."""
        first = self._first_done if self._first_done is not None else done
        elapsed, rate_items = now - self._started, done - first
        if rate_items <= 0 or elapsed <= 0 or self.total <= 0:
            return None
        return max(0.0, (self.total - done) * elapsed / rate_items)

    def update(self, done: int, force: bool = False, detail: str = "") -> None:
        now = time.monotonic()
        if self._first_done is None:
            self._first_done = done
        if (self.log_interval is not None and done and done != self._last_logged
                and (force or now - self._last_log >= self.log_interval)):
            self._last_log, self._last_logged = now, done
            eta = self.eta_seconds(done, now)
            logs.say(self._log_line(done, detail, now), stage=self.stage.value,
                     shard=None if self.shard is None else self.shard.label, itemsDone=done, itemsTotal=self.total,
                     etaSeconds=None if eta is None else round(eta, 1), detail=detail or None)
        if not force and now - self._last_write < self.interval:
            return
        self._last_write = now
        eta = self.eta_seconds(done, now)
        record = StageProgress(
            stage=self.stage, shard=None if self.shard is None else self.shard.label,
            fraction=1.0 if self.total == 0 else min(1.0, done / self.total), items_done=done,
            items_total=self.total, eta_seconds=None if eta is None else round(eta, 1),
            updated_at=datetime.now(timezone.utc).replace(microsecond=0))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(self.path, record.model_dump_json(by_alias=True))
        if self.mirror is not None:
            self.mirror(self.path)

    def _log_line(self, done: int, detail: str, now: float) -> str:
        where = self.stage.value + (f" shard {self.shard.label}" if self.shard else "")
        count = f"{done}/{self.total} ({100 * done / self.total:.0f}%)" if self.total else str(done)
        eta = self.eta_seconds(done, now)
        parts = [f"{where}: {count}", detail, f"elapsed {_duration(now - self._started)}",
                 f"ETA {_duration(eta)}" if eta is not None else ""]
        return ", ".join(p for p in parts if p)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
