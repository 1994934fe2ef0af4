"""The project's one version: pyproject.toml's, read from the installed package's metadata. The
default runner image tag, `disp --version` and `disp-operator --version` are this; the chart's
appVersion and image tags are held to it by a test (tests/deploy/test_release.py)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# Where the contract can be installed from: the whole project (pyproject.toml's [project] name) or
# the operator's own distribution (operator/pyproject.toml, what the operator image installs). Both
# carry the same version (tests/deploy/test_packaging.py).
DISTRIBUTIONS = ("disp-operator", "disp-operator-controller")


def _version(distributions: tuple[str, ...] = DISTRIBUTIONS) -> str:
    for name in distributions:
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    # A source tree that was never installed: read pyproject itself.
    import tomllib

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    return tomllib.loads(pyproject.read_text())["project"]["version"]


VERSION = _version()
