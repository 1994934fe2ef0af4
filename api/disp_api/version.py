"""The project's one version: pyproject.toml's, read from the installed package's metadata. The
default runner image tag, `disp --version` and `disp-operator --version` are this; the chart's
appVersion and image tags are held to it by a test (tests/deploy/test_release.py)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "disp-operator"  # pyproject's [project] name


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # a source tree that was never installed: read pyproject itself
        import tomllib

        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"]


VERSION = _version()
