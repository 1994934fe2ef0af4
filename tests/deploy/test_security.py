"""checkov (offline) on the rendered chart and on the stage Jobs the operator builds: no finding
beyond the accepted exceptions, which the chart's README lists with their reasons."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from disp_api import StageName
from disp_api.status import StepKind
from disp_operator.jobs import RunnerDefaults, stage_job
from tests.deploy.helm_chart import CHART, ROOT, TEAM, render
from tests.operator.conftest import make_job

# checkov lives in its own virtual environment (it pins many packages); the Makefile builds it.
CHECKOV = Path(os.environ.get("CHECKOV", ROOT / ".venv-checkov" / "bin" / "checkov"))
ACCEPTED = {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_38", "CKV_K8S_35", "CKV2_K8S_5", "CKV2_K8S_6"}


def test_the_accepted_exceptions_are_the_documented_ones():
    readme = (CHART / "README.md").read_text()
    section = readme[readme.index("## Security scan"):]
    assert set(re.findall(r"^\| (CKV2?_K8S_\d+) ", section, re.M)) == ACCEPTED


@pytest.mark.slow
def test_checkov_finds_nothing_beyond_the_accepted_exceptions(tmp_path):
    assert CHECKOV.exists(), f"{CHECKOV} missing: run `make setup` (it installs checkov in .venv-checkov)"
    values = {**TEAM, "monitoring": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}}
    for i, doc in enumerate(render(values)):
        (tmp_path / f"chart-{i:02d}-{doc['kind']}.yaml").write_text(yaml.safe_dump(doc))
    job = make_job(parallelism={"relabelShards": 2}, policy={"activeDeadlineSeconds": 3600})
    for step in (StepKind.RUN, StepKind.SHARDS, StepKind.MERGE):
        manifest = stage_job(job, StageName.RELABEL, step, 1, RunnerDefaults())
        (tmp_path / f"stage-job-{step.value}.yaml").write_text(yaml.safe_dump(manifest))
    result = subprocess.run([str(CHECKOV), "-d", str(tmp_path), "--framework", "kubernetes", "--quiet", "--compact",
                             "-o", "json", "--skip-download"], capture_output=True, text=True, timeout=600)
    reports = json.loads(result.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    failed = [(f["check_id"], f["file_path"], f["check_name"]) for r in reports
              for f in r["results"]["failed_checks"]]
    unexpected = [f for f in failed if f[0] not in ACCEPTED]
    assert unexpected == [], unexpected
    summary = [r["summary"] for r in reports]
    assert sum(x["passed"] for x in summary) > 100  # the scan really ran ...
    assert sum(x["resource_count"] for x in summary) >= len(list(tmp_path.glob("*.yaml")))  # ... over every file
