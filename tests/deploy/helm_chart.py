"""The Helm chart as the `helm` command renders and lints it (the real binary, built by `make k8s`
from Helm's Go module), for the deployment tests and for the end-to-end tests that run what the
chart deploys."""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tests.harness.tools import toolbox

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "disp-operator"
# The least an install must say (the chart refuses neither list): whose credentials it may read.
TEAM = {"credentialNamespaces": ["ml-team"]}
RELEASE, NAMESPACE = "disp-operator", "disp-system"


class HelmFailed(Exception):
    """`helm` refused; the message is what it printed."""


def helm(*args: str, values: dict[str, Any] | None = None) -> str:
    """Run `helm ARGS [-f VALUES]` with Helm's state in a scratch folder; its stdout, or HelmFailed."""
    with tempfile.TemporaryDirectory(prefix="helm-") as scratch:
        argv = [str(toolbox().path("helm")), *args]
        if values is not None:
            values_file = Path(scratch) / "values.json"
            values_file.write_text(json.dumps(values))
            argv += ["-f", str(values_file)]
        env = {"HOME": scratch, "HELM_CACHE_HOME": f"{scratch}/cache", "HELM_CONFIG_HOME": f"{scratch}/config",
               "HELM_DATA_HOME": f"{scratch}/data", "PATH": "/usr/bin:/bin"}
        result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    if result.returncode != 0:
        raise HelmFailed((result.stderr + result.stdout).strip())
    return result.stdout


def render(values: dict) -> list[dict]:
    """`helm template` of an install named disp-operator in disp-system."""
    text = helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, values=values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def lint(values: dict) -> str:
    """`helm lint --strict`: its report, or HelmFailed when it found an error or a warning."""
    return helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, values=values)


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]
