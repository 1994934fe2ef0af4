"""Paths built from untrusted input (manifests, dataset records, stage manifests, job metadata)
must stay inside the folder they are relative to, also after symlinks are followed."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from disp_runner.errors import UserInputError


def resolve_inside(root: Path, relative: str | Path, what: str, inside: str = "") -> Path:
    """`root / relative` with symlinks resolved; UserInputError naming `what` when it is absolute,
    climbs with '..', or resolves (through a link) outside `root` (called `inside` in messages)."""
    inside = inside or str(root)
    rel = PurePosixPath(str(relative))
    if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\\" in str(relative):
        raise UserInputError(f"{what} must be a relative path inside {inside}, got {str(relative)!r}")
    base = root.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(base):
        raise UserInputError(f"{what} leads outside {inside} through a symbolic link: {str(relative)!r}")
    return path


def require_inside(root: Path, path: Path, what: str) -> Path:
    """`path` itself (resolved) must lie inside `root` (resolved)."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise UserInputError(f"{what}: {path} is outside {root}")
    return resolved
