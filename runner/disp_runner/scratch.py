"""The writable scratch volume of a stage pod.

A stage pod's root filesystem is read-only; its one writable place is the scratch volume
($DISP_SCRATCH, an emptyDir that starts empty). The pod (and the runner image) point TMPDIR, HOME
and HF_HOME into it, so the caches and temporary files of Python, torch and transformers land there.
Those folders do not exist in a fresh volume, and Python's tempfile gives up on a TMPDIR that does
not exist, so the runner makes them before anything asks for them."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Mapping

SCRATCH_VARIABLE = "DISP_SCRATCH"
# Variables naming folders that libraries write to without creating them first (TMPDIR), or
# whose absence makes them fall back to the read-only root (HOME for ~/.cache and ~/.config).
FOLDER_VARIABLES = ("TMPDIR", "HOME", "HF_HOME")


def prepare_scratch(environ: Mapping[str, str] = os.environ) -> list[Path]:
    """Create the folders FOLDER_VARIABLES name inside $DISP_SCRATCH; the ones it created."""
    root = environ.get(SCRATCH_VARIABLE)
    if not root or not Path(root).is_dir():
        return []
    root_path = Path(root).resolve()
    made = []
    for variable in FOLDER_VARIABLES:
        value = environ.get(variable)
        if not value:
            continue
        folder = Path(value).resolve()
        if folder.is_relative_to(root_path) and not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            made.append(folder)
    tempfile.tempdir = None  # look TMPDIR up again if something already asked before it existed
    return made
