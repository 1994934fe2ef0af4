"""Writing so that a reader never sees half a result: a folder is built in a staging folder beside
its final place and renamed into it whole (os.replace is atomic within one filesystem), a file is
written beside its final name and renamed over it. On an error the staging copy is removed and
whatever was there before stays. Every writer of a folder or a record in the runner goes through
these (stage outputs, datasets, attack folders, epoch checkpoints and their restore from S3, manifests,
progress, provenance)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class StagingFolder:
    """A temporary folder next to `final` that becomes `final` only by `publish()`; removed on error."""

    def __init__(self, final: Path):
        self.final = final
        final.parent.mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))

    def publish(self) -> Path:
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yields a staging folder; on a clean exit it replaces `final` whole, on an error it goes."""
    staging = StagingFolder(final)
    try:
        yield staging.path
        staging.publish()
    except BaseException:
        staging.discard()
        raise


def write_atomically(path: Path, data: str | bytes) -> Path:
    """`path` holds `data` entirely or keeps what it held (the temporary name is per process, so two
    writers never share one)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    if isinstance(data, str):
        tmp.write_text(data, encoding="utf-8")
    else:
        tmp.write_bytes(data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
