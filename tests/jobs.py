"""The one builder of PurificationJob documents for the tests and the operator benchmark: a spec
wrapped in the resource's envelope, with overrides applied the same way everywhere."""

from __future__ import annotations

import copy
from typing import Any

API_VERSION = "disp.dev/v1alpha1"
KIND = "PurificationJob"


def with_overrides(spec: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of `spec` with each override applied: `relabel={...}` replaces the field,
    `relabel__batchSize=8` sets one nested field (parents made as needed), and None removes it."""
    spec = copy.deepcopy(spec)
    for dotted, value in overrides.items():
        node = spec
        *parents, leaf = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = copy.deepcopy(value)
    return spec


def job_document(spec: dict[str, Any], name: str, namespace: str | None = None, **metadata: Any) -> dict[str, Any]:
    """The manifest a user applies (or `disp run` reads): `spec` under the named resource."""
    meta = {"name": name, **({"namespace": namespace} if namespace is not None else {}), **metadata}
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": meta, "spec": copy.deepcopy(spec)}
