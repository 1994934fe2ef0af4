"""What the hostile-input tests share: running the installed `disp` executable as a user does, and
the checks every refusal must pass."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from disp_runner.pipeline.artifacts import STAGE_MANIFEST
from tests.harness.minio import S3_ACCESS, S3_SECRET

DISP = Path(sys.executable).with_name("disp")
ACCESS, SECRET = S3_ACCESS, S3_SECRET  # the MinIO server's identity (tests/harness/minio.py)


@dataclass
class Ran:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        """stderr without the runner's own warnings (a setting it warned about may come first)."""
        return [line for line in self.err.splitlines() if not line.startswith("disp: warning: ")]


def run_disp(ws: Path, *argv: str, stdin: str | None = None, timeout: float = 600) -> Ran:
    """The installed `disp`, its scratch folder inside the workspace, S3 keys in its environment."""
    env = {**os.environ, "DISP_SCRATCH": str(ws / "scratch"), "DISP_S3_ACCESS_KEY": ACCESS,
           "DISP_S3_SECRET_KEY": SECRET, "PYTHONWARNINGS": "default"}
    result = subprocess.run([str(DISP), "--no-progress", *argv], capture_output=True, text=True, env=env,
                            input=stdin, timeout=timeout)
    return Ran(result.returncode, result.stdout, result.stderr.strip())


def snapshot(root: Path, *skipped: Path) -> dict[str, str]:
    """Every file and folder under `root` (links as links), except the `skipped` subtrees."""
    tree = {}
    for path in sorted(root.rglob("*")):
        if any(path == s or s in path.parents for s in skipped):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            tree[rel] = "link:" + os.readlink(path)
        elif path.is_file():
            tree[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            tree[rel] = "dir"
    return tree


def assert_refused(workspace: Path, argv: list[str], code: int, phrases: list[str]) -> None:
    """`disp argv` ends with `code` and one stderr line holding every phrase (no traceback, no
    library warning, no advice to unpickle), publishes nothing new and touches nothing outside the
    run's output and scratch folders."""
    out, scratch = workspace / "out", workspace / "scratch"
    before = snapshot(workspace, out, scratch)
    published_before = {p for root in (out, scratch) if root.exists() for p in root.rglob(STAGE_MANIFEST)}
    ran = run_disp(workspace, *argv)
    assert ran.code == code, ran.err
    assert len(ran.error_lines) == 1 and "Traceback" not in ran.err, ran.err
    assert all(phrase in ran.error_lines[0] for phrase in phrases), ran.err
    assert "Warning" not in ran.err and "weights_only=False" not in ran.err, ran.err
    assert snapshot(workspace, out, scratch) == before
    published_after = {p for root in (out, scratch) if root.exists() for p in root.rglob(STAGE_MANIFEST)}
    assert published_after <= published_before, "a refused run published a stage"
