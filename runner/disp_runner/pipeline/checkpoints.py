"""A long stage's epoch checkpoints, kept where they outlive the pod.

The training loop saves each whole epoch into <run>/<stage>.checkpoints/epoch-NNNN/ on local disk
(a pod's scratch, lost with the pod). In an S3-backed run each epoch folder is also published to
the run's prefix the way stage outputs are (every file, then a manifest with their SHA-256, last),
and a new pod, in a fresh scratch, restores the newest complete one before it trains, so an
evicted, OOM-killed or suspended fine-tune resumes at the next epoch. Older epochs are removed
only after a newer one is complete, and all of them once the stage's output is published."""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from disp_api import StageName
from disp_runner.folders import atomic_folder
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RemoteRun, write_stage_manifest
from disp_store.tree import download_stage, upload_stage

_EPOCH_FOLDER = re.compile(r"^epoch-(\d{4,9})$")


def epoch_of(name: str) -> int | None:
    """The epoch an epoch folder's name holds (epoch-0003 -> 3), None for any other name."""
    match = _EPOCH_FOLDER.match(name)
    return int(match.group(1)) if match else None


class Checkpoints(Protocol):
    """A stage's epoch checkpoints: the folder the training loop saves into, and what keeps them."""

    local: Path  # <run>/<stage>.checkpoints: the training loop saves each epoch here

    def restore(self) -> int | None:
        """The epoch training resumes after (None: from the start), its checkpoint made local."""

    def publish(self, epoch: int) -> None:
        """Keep the epoch just saved where it outlives the pod."""

    def discard(self) -> None:
        """The stage's output is published: its checkpoints are superseded."""


def _local_epochs(local: Path) -> list[int]:
    if not local.is_dir():
        return []
    return sorted(e for e in (epoch_of(p.name) for p in local.iterdir() if p.is_dir()) if e is not None)


@dataclass(frozen=True)
class LocalCheckpoints:
    """Checkpoints of a run on a local disk: the folder is where they outlive the process."""

    local: Path

    def restore(self) -> int | None:
        epochs = _local_epochs(self.local)
        return epochs[-1] if epochs else None

    def publish(self, epoch: int) -> None:
        """Already where it outlives the process."""

    def discard(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)


@dataclass(frozen=True)
class MirroredCheckpoints(LocalCheckpoints):
    """Checkpoints of an S3-backed run: each epoch folder mirrored to `prefix` in the run's store."""

    stage: StageName
    remote: RemoteRun
    prefix: str  # <run prefix>/<stage>.checkpoints

    def _remote_epochs(self) -> list[int]:
        """Epochs whose remote folder is complete (its manifest is there)."""
        prefix = self.prefix + "/"
        epochs = set()
        for key, _size, _etag in self.remote.store.list(self.remote.bucket, prefix):
            folder, _, name = key[len(prefix):].partition("/")
            epoch = epoch_of(folder)
            if epoch is not None and name == STAGE_MANIFEST:
                epochs.add(epoch)
        return sorted(epochs)

    def restore(self) -> int | None:
        """Bring the newest complete remote epoch into the local folder unless a local one is at
        least as new."""
        local = _local_epochs(self.local)
        remote = self._remote_epochs()
        if remote and (not local or remote[-1] > local[-1]):
            epoch = remote[-1]
            with atomic_folder(self.local / f"epoch-{epoch:04d}") as staging:
                download_stage(self.remote.store, self.remote.bucket, f"{self.prefix}/epoch-{epoch:04d}", staging)
                for older in self.local.iterdir():
                    if older != staging:
                        shutil.rmtree(older, ignore_errors=True)
            return epoch
        return local[-1] if local else None

    def publish(self, epoch: int) -> None:
        """Mirror the local epoch folder to S3 (files, then manifest), then drop older remote epochs."""
        folder = self.local / f"epoch-{epoch:04d}"
        write_stage_manifest(folder, self.stage, {"epoch": epoch}, 0.0)
        upload_stage(folder, self.remote.store, self.remote.bucket, f"{self.prefix}/epoch-{epoch:04d}")
        self._remove_remote(keep=f"{self.prefix}/epoch-{epoch:04d}/")

    def discard(self) -> None:
        super().discard()
        self._remove_remote(keep=None)

    def _remove_remote(self, keep: str | None) -> None:
        keys = [key for key, _size, _etag in self.remote.store.list(self.remote.bucket, self.prefix + "/")
                if keep is None or not key.startswith(keep)]
        # Manifests go first, so a folder that is half removed is never taken for complete.
        manifests = [key for key in keys if key.endswith("/" + STAGE_MANIFEST)]
        for batch in (manifests, [key for key in keys if key not in manifests]):
            if batch:
                self.remote.store.remove(self.remote.bucket, batch)
