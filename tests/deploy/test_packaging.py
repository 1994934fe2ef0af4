"""The wheel the images install ships every package of the source tree: pyproject.toml lists them
by hand, and a package left off imports in the source checkout but not in the image."""

from __future__ import annotations

import tomllib
from pathlib import Path

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
