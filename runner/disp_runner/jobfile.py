"""Reading a PurificationJob manifest (YAML or JSON) with errors that name the file, the field and
its line: `job.yaml:12: spec.saliency.topK: Input should be greater than or equal to 2`.

The manifest is read as the Kubernetes API server would accept it: UTF-8, no key given twice, and
no type coercion (`topK: "3"` or `probes: true` are refused, as the CRD's schema refuses them)."""

from __future__ import annotations

import json
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


# Kubernetes keeps objects under about 1.5 MB; a manifest far larger is a mistake or an attack.
MAX_MANIFEST_BYTES = 1 << 20


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping key given twice (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys fail in the base class with their own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_job(path: str | Path) -> PurificationJob:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"{path}: no such manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise UserInputError(f"{path}: {path.stat().st_size} bytes, more than a manifest may have ({MAX_MANIFEST_BYTES})")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise UserInputError(f"{path}:{line}: not UTF-8 text") from None
    return parse_job_text(text, str(path))


def load_job_from_env(variable: str) -> PurificationJob:
    """The manifest a runner pod gets from the operator (JSON in an environment variable)."""
    text = os.environ.get(variable)
    if not text:
        raise UserInputError(f"${variable}: not set (the operator puts the job's manifest there)")
    return parse_job_text(text, f"${variable}")


def parse_job_text(text: str, path: str) -> PurificationJob:
    """Parse a manifest's text; errors name `path` (a file, or where the text came from)."""
    if "\x00" in text:
        raise UserInputError(f"{path}: binary data, not a YAML or JSON manifest")
    try:
        document = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        tree = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserInputError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise UserInputError(f"{path}: nested too deeply to be a manifest") from None
    if not isinstance(document, dict):
        raise UserInputError(f"{path}: expected a PurificationJob mapping, got {type(document).__name__}")
    try:
        # Through JSON in strict mode: the types a Kubernetes API server would accept, no coercion.
        wire = json.dumps(document)
    except (TypeError, ValueError, RecursionError) as exc:
        raise UserInputError(f"{path}: a value is not plain YAML data (quote dates and times): {exc}") from None
    try:
        return PurificationJob.model_validate_json(wire, strict=True)
    except ValidationError as exc:
        error = FieldError.first_of(exc)
        line = _line_of(tree, error.loc)
        where = f"{path}:{line}" if line else str(path)
        raise UserInputError(f"{where}: {error.field or 'manifest'}: {error.message}") from None
