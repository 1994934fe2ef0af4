"""Reading a PurificationJob manifest (YAML or JSON) with errors that name the file, the field and
its line: `job.yaml:12: spec.saliency.topK: Input should be greater than or equal to 2`.

The manifest is read as the Kubernetes API server would accept it: UTF-8, no key given twice, and
no type coercion (`topK: "3"` or `probes: true` are refused, as the CRD's schema refuses them)."""

from __future__ import annotations

import json
import os
import sys
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


# A manifest with aliases (&a ... *a) is small as text but may expand to billions of values when
# converted ("billion laughs"); the API server refuses excessive aliasing too. Counted on the
# composed node graph before anything is converted.
MAX_EXPANDED_VALUES = 100_000

_MERGE_TAG = "tag:yaml.org,2002:merge"


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping key given twice (plain YAML keeps the last, silently).
    Merge keys (`<<: *defaults`) are YAML's own way to override, so their keys may be given again."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # unhashable keys fail in the base class with their own message
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, limit: int) -> int:
    """How many values the document holds once every alias is expanded (counting stops past
    `limit`); linear in the distinct nodes, however deeply the aliases nest."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int = 0) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if depth > 1000:
            raise RecursionError
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child, depth + 1) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.value)
        sizes[id(node)] = total = min(total, limit + 1)
        return total

    return size(root)


def load_job(path: str | Path) -> PurificationJob:
    """Read a manifest file; `-` (or /dev/stdin, a pipe) reads standard input, up to the same size."""
    name = "-" if str(path) == "-" else str(path)
    path = Path(path)
    if name == "-":
        raw = sys.stdin.buffer.read(MAX_MANIFEST_BYTES + 1)
        name = "<stdin>"
    elif path.is_dir():
        raise UserInputError(f"{path}: a folder, not a manifest file")
    elif not path.exists():
        raise UserInputError(f"{path}: no such manifest")
    else:
        try:  # a regular file, or a pipe or device such as /dev/stdin: read no more than a manifest may have
            with open(path, "rb") as handle:
                raw = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise UserInputError(f"{path}: cannot read the manifest ({exc.strerror or type(exc).__name__})") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UserInputError(f"{name}: more than a manifest may have ({MAX_MANIFEST_BYTES} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserInputError(f"{name}:{line}: not UTF-8 text") from None
    return parse_job_text(text, name)


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
    loader = _UniqueKeyLoader(text)
    try:
        tree = loader.get_single_node()
        if tree is not None and _expanded_size(tree, MAX_EXPANDED_VALUES) > MAX_EXPANDED_VALUES:
            raise UserInputError(f"{path}: its aliases (*name) expand to more than {MAX_EXPANDED_VALUES} values; "
                                 "a manifest is never that large (write it out without aliases)")
        document = loader.construct_document(tree) if tree is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserInputError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except RecursionError:
        raise UserInputError(f"{path}: nested too deeply to be a manifest") from None
    finally:
        loader.dispose()
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
