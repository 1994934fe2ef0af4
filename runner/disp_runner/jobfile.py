"""Reading a PurificationJob manifest (YAML or JSON) with errors that name the file, the field and
its line: `job.yaml:12: spec.saliency.topK: Input should be greater than or equal to 2`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml
from pydantic import ValidationError

from disp_api import PurificationJob
from disp_api.base import FieldError
from disp_runner.errors import UserInputError


def _line_of(node: yaml.Node | None, loc: Sequence[Any]) -> int | None:
    """1-based line of the YAML node at `loc` (or of its deepest existing parent)."""
    line = None if node is None else node.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((value for key, value in node.value if key.value == part), None)
            if match is None:  # an unknown or missing key: point at the key itself if present
                key = next((key for key, _ in node.value if key.value == part), None)
                return key.start_mark.line + 1 if key is not None else line
            node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def load_job(path: str | Path) -> PurificationJob:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such manifest")
    return parse_job_text(path.read_text(encoding="utf-8"), str(path))


def load_job_from_env(variable: str) -> PurificationJob:
    """The manifest a runner pod gets from the operator (JSON in an environment variable)."""
    text = os.environ.get(variable)
    if not text:
        raise UserInputError(f"${variable}: not set (the operator puts the job's manifest there)")
    return parse_job_text(text, f"${variable}")


def parse_job_text(text: str, path: str) -> PurificationJob:
    """Parse a manifest's text; errors name `path` (a file, or where the text came from)."""
    try:
        document = yaml.safe_load(text)
        tree = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserInputError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(document, dict):
        raise UserInputError(f"{path}: expected a PurificationJob mapping, got {type(document).__name__}")
    try:
        return PurificationJob.model_validate(document)
    except ValidationError as exc:
        error = FieldError.first_of(exc)
        line = _line_of(tree, error.loc)
        where = f"{path}:{line}" if line else str(path)
        raise UserInputError(f"{where}: {error.field or 'manifest'}: {error.message}") from None
