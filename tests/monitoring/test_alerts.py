"""The chart's alert rules and the operator's exposition, checked by Prometheus' own promtool:
`promtool check rules`, `promtool test rules` (tests/monitoring/alert_tests.yaml: firing and
non-firing cases of every alert) and `promtool check metrics`."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from disp_api import MetricsSummary, StageName
from disp_api.status import JobPhase, Reason
from disp_operator.metrics import OperatorMetrics
from tests.deploy.helm_chart import TEAM, by_kind, render

HERE = Path(__file__).parent


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not installed (`make test` installs Debian's prometheus package)", pytrace=False)
    return found


def chart_rules() -> dict:
    (rule,) = by_kind(render({**TEAM, "monitoring": {"prometheusRule": {"enabled": True}}}), "PrometheusRule")
    return {"groups": rule["spec"]["groups"]}


def test_every_alert_fires_and_stays_quiet_when_it_should(tmp_path):
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(chart_rules()))
    shutil.copy(HERE / "alert_tests.yaml", tmp_path / "alert_tests.yaml")
    checked = subprocess.run([promtool(), "check", "rules", "rules.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool(), "test", "rules", "alert_tests.yaml"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = {t["alertname"] for group in yaml.safe_load((HERE / "alert_tests.yaml").read_text())["tests"]
               for t in group["alert_rule_test"]}
    assert covered == {r["alert"] for g in chart_rules()["groups"] for r in g["rules"]}, "an alert without a test"


def test_the_operators_exposition_passes_promtools_lint():
    metrics = OperatorMetrics()
    metrics.set_phase("ml-team", "a", JobPhase.RUNNING)
    metrics.set_progress("ml-team", "a", 0.4, datetime.now(timezone.utc).timestamp())
    metrics.set_pending("ml-team", "a", 12.0)
    metrics.set_phase("ml-team", "b", JobPhase.SUCCEEDED)
    metrics.set_outcome("ml-team", "b", MetricsSummary(asr_before=0.97, asr_after=0.01, false_firing_before=0.0,
                                                       false_firing_after=0.0, clean_performance_before=0.9,
                                                       clean_performance_after=0.88, retention=0.88 / 0.9))
    metrics.stage_finished(StageName.SALIENCY, True, 42.0)
    metrics.job_failed(Reason.INVALID_SPEC)
    metrics.handler_runs.inc()
    metrics.handler_latency.observe(0.01)
    exposition = generate_latest(metrics.registry)
    checked = subprocess.run([promtool(), "check", "metrics"], input=exposition, capture_output=True)
    assert checked.returncode == 0 and not checked.stdout.strip() and not checked.stderr.strip(), \
        (checked.stdout + checked.stderr).decode()


def test_failure_and_retry_counters_exist_at_zero_before_the_first_failure():
    """increase() over a counter that appears at 1 misses that first failure."""
    text = generate_latest(OperatorMetrics().registry).decode()
    for stage in StageName:
        for reason in ("StageFailed", "BackoffLimitExceeded", "DeadlineExceeded"):
            assert f'disp_stage_failures_total{{reason="{reason}",stage="{stage.value}"}} 0.0' in text
        for failure in ("Transient", "Error"):
            assert f'disp_stage_retries_total{{failure="{failure}",stage="{stage.value}"}} 0.0' in text
    for reason in ("InvalidSpec", "StageFailed", "BackoffLimitExceeded", "DeadlineExceeded"):
        assert f'disp_job_failures_total{{reason="{reason}"}} 0.0' in text
