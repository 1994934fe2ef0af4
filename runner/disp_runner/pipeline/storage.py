"""Where a run's outputs live, behind one interface the pipeline uses: a local run folder, or a
local scratch copy mirrored to the run's S3 prefix. Stages never see it; they get their inputs
resolved (pipeline/inputs.py) and write into the staging folder the pipeline gives them.

Both implementations decide the same questions (is this output complete and built from these
inputs? fetch and verify an earlier output; publish a finished one; where do people find it?), so
the pipeline has no "is this run in S3?" branch anywhere."""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Protocol

from disp_api import PurificationJob, StageName
from disp_runner.errors import TransientError, UserInputError, warn_user
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RemoteRun, RunLayout, read_stage_manifest, verify_stage_output
from disp_runner.pipeline.checkpoints import Checkpoints, LocalCheckpoints, MirroredCheckpoints
from disp_runner.provenance import publish_remote_provenance, write_provenance
from disp_store.lease import LEASE_SUFFIX, S3Lease
from disp_store.s3 import S3Store, StoreError
from disp_store.tree import (
    download_stage,
    read_uploaded_etags,
    remote_stage_complete,
    remote_stage_problem,
    upload_stage,
    write_uploaded_etags,
)

logger = logging.getLogger(__name__)


class RunStorage(Protocol):
    """A run's outputs: what the pipeline asks of them, wherever they live."""

    layout: RunLayout  # the local folders stages work in (the run folder, or its scratch copy)

    def is_complete(self, folder: Path) -> bool:
        """Whether `folder` holds a published output (a cheap look; completed_manifest decides)."""

    def completed_manifest(self, folder: Path, inputs: dict[str, str]) -> dict[str, Any] | None:
        """The manifest of the output at `folder` when it is complete, intact and was built from
        `inputs`; None when it must be built (again), after saying why when an output was there."""

    def fetch(self, folder: Path) -> Path:
        """A completed output, local and checked against its manifest (hashed once per process)."""

    def publish(self, folder: Path) -> None:
        """Make a finished output (already complete in its local folder) complete where the run lives."""

    def uri_of(self, folder: Path) -> str:
        """Where a run folder's content lives, for people."""

    def lease(self, folder: Path) -> contextlib.AbstractContextManager:
        """Exclusive right to build `folder` against other pods (beside the local file lock)."""

    def checkpoints(self, stage: StageName) -> Checkpoints:
        """`stage`'s epoch checkpoints, kept where they outlive the pod."""

    def progress_mirror(self) -> Callable[[Path], None] | None:
        """What copies progress.json to where the operator reads it, if anywhere but the run folder."""

    def publish_provenance(self, job: PurificationJob, signing_key_file: Path | None, round_number: int) -> None:
        """provenance.json (and its signature) for the run's round as its stage manifests now stand."""

    def s3_store(self) -> S3Store | None:
        """The store the run lives in, if any (inputs in the same store reuse its connection)."""


class LocalRunStorage:
    """A run folder on a local (or mounted) disk: an output is complete when its manifest is there
    and every file it lists matches it."""

    def __init__(self, layout: RunLayout) -> None:
        self.layout = layout
        self._verified: set[Path] = set()  # folders hashed in this process: outputs do not change mid-run

    def is_complete(self, folder: Path) -> bool:
        return (folder / STAGE_MANIFEST).is_file()

    def completed_manifest(self, folder: Path, inputs: dict[str, str]) -> dict[str, Any] | None:
        where = folder.relative_to(self.layout.root).as_posix()
        manifest = self._verified_manifest(folder, where)
        if manifest is None:
            return None
        recorded = manifest.get("inputs")
        if recorded != inputs:
            changed = sorted(k for k in set(inputs) | set(recorded or {}) if (recorded or {}).get(k) != inputs.get(k))
            warn_user(f"{where}: {', '.join(changed)} changed since this output was built; building it again")
            self._verified.discard(folder)
            return None
        return manifest

    def _verified_manifest(self, folder: Path, where: str) -> dict[str, Any] | None:
        return self._verified_local(folder, where)

    def _verified_local(self, folder: Path, where: str) -> dict[str, Any] | None:
        if not (folder / STAGE_MANIFEST).is_file():
            return None
        try:
            manifest = verify_stage_output(folder) if folder not in self._verified else read_stage_manifest(folder)
        except UserInputError as exc:
            warn_user(f"{where}: not intact ({exc}); building it again")
            return None
        self._verified.add(folder)
        return manifest

    def fetch(self, folder: Path) -> Path:
        if folder not in self._verified:
            verify_stage_output(folder)
            self._verified.add(folder)
        return folder

    def publish(self, folder: Path) -> None:
        """The staging folder's rename already published it."""

    def uri_of(self, folder: Path) -> str:
        return str(folder)

    def lease(self, folder: Path) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the local file lock (output_lock) is enough on one disk

    def checkpoints(self, stage: StageName) -> Checkpoints:
        return LocalCheckpoints(self.layout.checkpoint_dir(stage))

    def progress_mirror(self) -> Callable[[Path], None] | None:
        return None

    def publish_provenance(self, job: PurificationJob, signing_key_file: Path | None, round_number: int) -> None:
        write_provenance(job, self.layout, signing_key_file=signing_key_file, round_number=round_number)

    def s3_store(self) -> S3Store | None:
        return None


class MirroredRunStorage(LocalRunStorage):
    """A run whose home is an S3 prefix: stages work in a local scratch copy, and each finished
    output is uploaded (files, then manifest). The store decides completeness: an output is complete
    when its manifest is in the store and every file it lists is there, unchanged; a verified local
    copy that the store lacks (an upload cut short, objects deleted or overwritten) is uploaded
    again rather than rebuilt."""

    def __init__(self, layout: RunLayout, remote: RemoteRun) -> None:
        super().__init__(layout)
        self.remote = remote

    def _prefix(self, folder: Path) -> str:
        return self.remote.stage_prefix(self.layout, folder)

    def is_complete(self, folder: Path) -> bool:
        return remote_stage_complete(self.remote.store, self.remote.bucket, self._prefix(folder))

    def _verified_manifest(self, folder: Path, where: str) -> dict[str, Any] | None:
        store, bucket, prefix = self.remote.store, self.remote.bucket, self._prefix(folder)
        remote_raw = store.get_bytes_or_none(bucket, f"{prefix}/{STAGE_MANIFEST}")
        local_raw = (folder / STAGE_MANIFEST).read_bytes() if (folder / STAGE_MANIFEST).is_file() else None
        problem = None if remote_raw is None else remote_stage_problem(
            store, bucket, prefix, remote_raw, read_uploaded_etags(folder))
        if remote_raw is not None and problem is None:
            if local_raw != remote_raw:
                self._drop_local(folder)  # another attempt's copy: the store's wins
            problem = self._fetch_intact(folder)
            if problem is None:
                return read_stage_manifest(folder)
            local_raw = None
        if local_raw is None or (remote_raw is not None and local_raw != remote_raw):
            if problem is not None:
                warn_user(f"{self.uri_of(folder)}: not intact ({problem}); building it again")
            return None
        local = self._verified_local(folder, where)
        if local is None:
            return None
        warn_user(f"{self.uri_of(folder)}: " + ("missing from the store" if remote_raw is None else problem)
                  + "; uploading the verified local copy again")
        self.publish(folder)
        return local

    def _drop_local(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        self._verified.discard(folder)

    def _fetch_intact(self, folder: Path) -> str | None:
        """Fetch a published output whose store copy looks complete; what is wrong with it, if
        anything. A scratch copy that no longer matches its manifest is replaced by the store's."""
        for attempt in range(2):
            try:
                self.fetch(folder)
                return None
            except StoreError as exc:  # an object changed since it was published (checksum mismatch)
                self._drop_local(folder)
                return str(exc)
            except UserInputError:  # the scratch copy changed: download the store's
                if attempt:
                    raise
                self._drop_local(folder)
        return None

    def fetch(self, folder: Path) -> Path:
        if folder not in self._verified and not (folder / STAGE_MANIFEST).is_file():
            etags = download_stage(self.remote.store, self.remote.bucket, self._prefix(folder), folder)
            write_uploaded_etags(folder, etags)
        return super().fetch(folder)

    def publish(self, folder: Path) -> None:
        etags = upload_stage(folder, self.remote.store, self.remote.bucket, self._prefix(folder))
        write_uploaded_etags(folder, etags)

    def uri_of(self, folder: Path) -> str:
        return f"s3://{self.remote.bucket}/{self._prefix(folder)}"

    def lease(self, folder: Path) -> contextlib.AbstractContextManager:
        """The exclusive lease on building `folder` among pods (see store/lease.py)."""
        return S3Lease(self.remote.store, self.remote.bucket, self._prefix(folder) + LEASE_SUFFIX)

    def checkpoints(self, stage: StageName) -> Checkpoints:
        local = self.layout.checkpoint_dir(stage)
        return MirroredCheckpoints(local, stage, self.remote, self._prefix(local))

    def progress_mirror(self) -> Callable[[Path], None] | None:
        remote, layout = self.remote, self.layout

        def put(path: Path) -> None:
            # Progress is advisory: an unreachable store must not kill the stage (its outputs still
            # have to be published later, and that does fail loudly).
            try:
                remote.store.put_bytes(remote.bucket, remote.stage_prefix(layout, path), path.read_bytes())
            except TransientError as exc:
                logger.warning("progress.json not mirrored to S3: %s", exc)

        return put

    def publish_provenance(self, job: PurificationJob, signing_key_file: Path | None, round_number: int) -> None:
        publish_remote_provenance(job, self.remote.store, self.remote.bucket, self.remote.prefix, self.layout.root,
                                  signing_key_file=signing_key_file, round_number=round_number)

    def s3_store(self) -> S3Store | None:
        return self.remote.store
