"""The wheel the images install ships every package of the source tree: pyproject.toml lists them
by hand, and a package left off imports in the source checkout but not in the image."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_of_the_source_tree_is_listed_in_pyproject():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for top, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join((top, *relative.parts)))
    assert found == listed, {"missing from pyproject": sorted(found - listed), "not in the tree": sorted(listed - found)}


def test_the_shipped_checkpoint_is_package_data():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = config["package-data"]["disp_runner.models.mdlm"]
    assert patterns == ["assets/**/*"]
    assert (ROOT / "runner/disp_runner/models/mdlm/assets/base-mdlm/model.safetensors").is_file()


# --- the operator's own distribution (operator/pyproject.toml), what its image installs ------------

def _operator_project() -> dict:
    return tomllib.loads((ROOT / "operator" / "pyproject.toml").read_text())


def test_the_version_is_found_under_either_distribution_name():
    """The operator image has only the operator's distribution: the version comes from its metadata
    there (a source-tree fallback would find no pyproject.toml in the image)."""
    from importlib.metadata import version

    from disp_api.version import DISTRIBUTIONS, VERSION, _version

    assert DISTRIBUTIONS[1] == _operator_project()["project"]["name"]
    assert _version(("not-installed-anywhere", "disp-operator")) == version("disp-operator") == VERSION


def test_the_operator_distribution_has_the_projects_version_and_dependencies_and_no_runner():
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    operator = _operator_project()
    assert operator["project"]["version"] == root["project"]["version"]
    wanted = root["project"]["dependencies"] + root["project"]["optional-dependencies"]["operator"]
    assert sorted(operator["project"]["dependencies"]) == sorted(set(wanted))
    assert operator["project"]["scripts"] == {"disp-operator": root["project"]["scripts"]["disp-operator"]}
    config = operator["tool"]["setuptools"]
    assert sorted(config["packages"]) == ["disp_api", "disp_operator", "disp_store"]
    for package, folder in config["package-dir"].items():  # the root project's folders, seen from operator/
        assert (ROOT / "operator" / folder).resolve() == (ROOT / root["tool"]["setuptools"]["package-dir"][package])


@pytest.mark.slow
def test_the_operator_wheel_holds_no_runner_code_and_its_operator_imports_without_it(tmp_path):
    from disp_api.version import VERSION

    """Built as the operator image builds it (the folders its Dockerfile stage copies, pip from
    operator/), then imported with the runner and torch made unimportable: what the image has is
    enough to start the controller."""
    source = tmp_path / "src"
    for folder in ("api", "store", "operator"):  # the build stage's COPY lines
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "build",
                                                                                      "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "--wheel-dir", str(tmp_path / "wheel"), str(source / "operator")],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "wheel").glob("disp_operator_controller-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(tmp_path / "site")
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    top_level = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert top_level == {"disp_api", "disp_store", "disp_operator"}
    assert "disp-operator = disp_operator.__main__:main" in entry_points and "disp =" not in entry_points
    probe = (
        "import sys, importlib.abc\n"
        "class Refuse(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('disp_runner', 'torch'):\n"
        "            raise ImportError(f'{name} is not in the operator image')\n"
        "sys.meta_path.insert(0, Refuse())\n"
        f"sys.path.insert(0, {str(tmp_path / 'site')!r})\n"
        "import disp_operator.handlers, disp_operator.__main__, disp_operator.artifacts, disp_store.lease\n"
        "assert disp_operator.handlers.__file__.startswith(sys.path[0]), disp_operator.handlers.__file__\n"
        "from importlib.metadata import version\n"
        f"assert version('disp-operator-controller') == {VERSION!r}  # the wheel's own metadata\n"
        "print('ok')\n")
    ran = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert ran.stdout.strip() == "ok", ran.stderr[-2000:]
