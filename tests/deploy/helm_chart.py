"""The Helm chart rendered by Helm's own engine (helm-python-sdk), for the deployment tests and
for the operator-image test that runs the chart's Deployment in a container runtime."""

from __future__ import annotations

from pathlib import Path

import helm_python
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "disp-operator"
# The least an install must say (the chart refuses neither list): whose credentials it may read.
TEAM = {"credentialNamespaces": ["ml-team"]}


def render(values: dict) -> list[dict]:
    chart = helm_python.Chart.load(str(CHART))
    rendered = chart.render(values, name="disp-operator", namespace="disp-system", is_install=True)
    docs = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]
