"""One version for everything a release ships: pyproject's, which `disp --version`, `disp-operator
--version` and the operator's default runner image report, and which the chart's appVersion and
image tags must equal; the chart packages with `helm package` and the package lints strictly."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import yaml

from disp_api.version import VERSION
from disp_operator.jobs import RunnerDefaults
from tests.deploy.helm_chart import CHART, ROOT, TEAM, by_kind, helm, render


def test_one_version_everywhere_a_release_names_it():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    bin_dir = Path(sys.executable).parent
    reported = {
        "pyproject.toml": pyproject,
        "disp_api.version.VERSION": VERSION,
        "disp --version": subprocess.run([str(bin_dir / "disp"), "--version"], capture_output=True, text=True,
                                         check=True).stdout.split()[-1],
        "disp-operator --version": subprocess.run([str(bin_dir / "disp-operator"), "--version"],
                                                  capture_output=True, text=True, check=True).stdout.split()[-1],
        "the operator's default runner image": RunnerDefaults().image.rsplit(":", 1)[1],
        "Chart.yaml appVersion": chart["appVersion"],
        "values.yaml image.tag": values["image"]["tag"],
        "values.yaml runner.image.tag": values["runner"]["image"]["tag"],
    }
    assert set(reported.values()) == {pyproject}, reported


def test_the_chart_packages_and_the_package_lints_and_renders_like_the_folder(tmp_path):
    helm("package", str(CHART), "--destination", str(tmp_path))
    version = yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    package = tmp_path / f"disp-operator-{version}.tgz"
    with tarfile.open(package) as archive:
        names = archive.getnames()
    assert "disp-operator/values.schema.json" in names and "disp-operator/files/purificationjobs.disp.dev.yaml" in names
    assert "1 chart(s) linted, 0 chart(s) failed" in helm("lint", "--strict", str(package), values=TEAM)
    packaged = [d for d in yaml.safe_load_all(helm("template", "disp-operator", str(package), "--namespace",
                                                   "disp-system", values=TEAM)) if d]
    assert packaged == render(TEAM)
    assert by_kind(packaged, "CustomResourceDefinition")


def test_the_release_files_name_the_license_and_the_version_pyproject_does():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    license_text = (ROOT / "LICENSE").read_text()
    assert project["license"] == "Apache-2.0"
    assert license_text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in license_text
    changelog = (ROOT / "CHANGELOG.md").read_text()
    headings = [line for line in changelog.splitlines() if line.startswith("## [")]
    # The newest section is unreleased work towards pyproject's version, or that version itself.
    assert headings and (headings[0].startswith("## [Unreleased]") and project["version"] in headings[0]
                         or headings[0].startswith(f"## [{project['version']}]")), headings[:1]
    assert "Report a vulnerability" in (ROOT / "SECURITY.md").read_text()
