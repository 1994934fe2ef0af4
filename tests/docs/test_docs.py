"""The documentation: the site builds with mkdocs --strict (a broken link, a missing image or a page
left out of the navigation fails), the generated reference pages and diagram are what the code
gives today, and the short README stays short and agrees with the pages it summarises."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from disp_api import PurificationJob

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
TOOL = ROOT / "tools" / "docs_reference.py"


def _tool():
    spec = importlib.util.spec_from_file_location("docs_reference", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_site_builds_strictly(tmp_path):
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "spec" / "index.html").is_file()
    assert (tmp_path / "site" / "img" / "architecture.svg").is_file()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    """The check above can fail: the same configuration over a page that links a missing page."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n\nSee [the method](method.md).\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config.update(docs_dir=str(docs), site_dir=str(tmp_path / "site"), nav=[{"Home": "index.md"}])
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml")],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode != 0 and "method.md" in built.stderr


def test_the_reference_pages_and_the_diagram_are_what_the_code_gives_today():
    checked = subprocess.run([sys.executable, str(TOOL), "--check"], cwd=ROOT, capture_output=True, text=True,
                             timeout=300)
    assert checked.returncode == 0, checked.stderr


def test_every_spec_field_and_every_flag_is_in_the_reference():
    tool = _tool()
    spec_page, cli_page = tool.spec_page(), tool.cli_page()
    for field in ("spec.masking.ratio", "spec.relabel.decoding.cache", "spec.policy.ttlSecondsAfterFinished",
                  "spec.finetune.labels", "spec.storage.credentialsSecret.name"):
        assert f"| `{field}` |" in spec_page, field
    rho = next(line for line in spec_page.splitlines() if line.startswith("| `spec.masking.ratio` |"))
    assert "`0.3`" in rho  # the method's default, from the model
    for flag in ("`--trainable`", "`--signing-key`", "`--masked-inference`", "`--log-format`", "`--liveness-port`"):
        assert flag in cli_page, flag


def test_a_diagram_line_that_is_neither_box_nor_arrow_is_refused_by_its_number(tmp_path):
    source = tmp_path / "architecture.txt"
    source.write_text("# comment\nbox: 0,0 | A | a\nbox 1,0 | B | b\n")
    tool = _tool()
    tool.ROOT = tmp_path
    with pytest.raises(SystemExit, match=r"architecture.txt, line 3: not `box:"):
        tool.architecture_svg(source)
    source.write_text("box: 0,0 | A | a\narrow: A -> C | to nowhere\n")
    with pytest.raises(SystemExit, match="names no box 'C'"):
        tool.architecture_svg(source)


def test_the_readme_is_a_short_front_door_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert len(targets) >= 15
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert missing == []


def test_the_readmes_manifest_is_the_minimal_example_and_valid():
    block = re.search(r"```yaml\n(.*?)```", README.read_text(), re.S).group(1)
    shown = yaml.safe_load(block)
    assert shown == yaml.safe_load((ROOT / "crds" / "examples" / "minimal.yaml").read_text())
    PurificationJob.model_validate(shown)


def _table(text: str, heading: str) -> dict[str, dict[str, str]]:
    """The first table after `heading`: scenario -> column -> cell."""
    lines = text.split(heading, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[start:end]]
    return {cells[0].split(" (")[0]: dict(zip(rows[0], cells)) for cells in rows[2:]}


def test_the_readmes_table_is_the_results_pages_table():
    short = _table(README.read_text(), "## Measured")
    full = _table((ROOT / "docs" / "results.md").read_text(), "## Measured")
    assert set(short) == set(full) and len(short) == 4
    for scenario, row in short.items():
        for column, cell in list(row.items())[1:]:  # the figures; the scenario's name may be shorter
            assert full[scenario][column] == cell, (scenario, column)
