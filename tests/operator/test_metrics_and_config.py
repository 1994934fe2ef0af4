"""Prometheus series stay bounded; the operator's settings come from its environment."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from disp_api import StageName
from disp_api import MetricsSummary
from disp_api.status import JobPhase
from disp_operator.config import ConfigError, OperatorConfig
from disp_operator.metrics import OperatorMetrics

SUMMARY = MetricsSummary(asr_before=0.98, asr_after=0.01, false_firing_before=0.0, false_firing_after=0.0)


def scrape(metrics: OperatorMetrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_jobs_are_counted_once_per_phase():
    m = OperatorMetrics()
    m.set_phase("ns", "a", JobPhase.RUNNING)
    m.set_phase("ns", "a", JobPhase.RUNNING)
    m.set_phase("ns", "b", JobPhase.RUNNING)
    m.set_phase("ns", "a", JobPhase.SUCCEEDED)
    text = scrape(m)
    assert 'disp_purification_jobs{phase="Running"} 1.0' in text
    assert 'disp_purification_jobs{phase="Succeeded"} 1.0' in text
    assert 'disp_purification_jobs{phase="Failed"} 0.0' in text


def test_a_deleted_job_leaves_no_series_behind():
    m = OperatorMetrics()
    m.set_phase("ns", "a", JobPhase.RUNNING)
    m.set_progress("ns", "a", 0.4, 1_700_000_000)
    m.set_phase("ns", "a", JobPhase.SUCCEEDED)
    m.set_outcome("ns", "a", SUMMARY)
    m.set_round("ns", "a", 2)
    m.set_verdict("ns", "a", False)
    m.set_verdict("ns", "b", True)
    m.set_verdict("ns", "b", None)  # Unknown: no series
    text = scrape(m)
    assert 'disp_job_asr_after_ratio{name="a",namespace="ns"} 0.01' in text
    assert 'disp_job_round{name="a",namespace="ns"} 2.0' in text
    assert 'disp_job_backdoor_removed{name="a",namespace="ns"} 0.0' in text
    assert 'disp_job_backdoor_removed{name="b"' not in text
    assert 'disp_job_progress_ratio{name="a"' not in text  # a finished job is not "active"
    m.forget("ns", "a")
    text = scrape(m)
    assert 'name="a"' not in text
    assert 'disp_purification_jobs{phase="Succeeded"} 0.0' in text


def test_stage_durations_and_counters_follow_naming_conventions():
    m = OperatorMetrics()
    m.stage_finished(StageName.RELABEL, True, 42.0)
    m.stage_retries.labels("relabel", "Transient").inc()
    text = scrape(m)
    assert 'disp_stage_duration_seconds_sum{result="succeeded",stage="relabel"} 42.0' in text
    assert 'disp_stage_retries_total{failure="Transient",stage="relabel"} 1.0' in text
    assert "disp_operator_reconcile_duration_seconds_bucket" in text


def test_config_reads_the_environment(monkeypatch):
    monkeypatch.setenv("DISP_RUNNER_IMAGE", "mirror/disp:2")
    monkeypatch.setenv("DISP_RETRY_BASE_SECONDS", "30")
    monkeypatch.setenv("DISP_METRICS_PORT", "0")
    config = OperatorConfig.from_env()
    assert config.runner.image == "mirror/disp:2"
    assert config.backoff.base_seconds == 30 and config.metrics_port == 0
    assert config.credential_namespaces is None and config.forbid_unsafe_pickle is False  # no chart: unfenced
    monkeypatch.setenv("DISP_CREDENTIAL_NAMESPACES", "ml-team, research")
    monkeypatch.setenv("DISP_FORBID_UNSAFE_PICKLE", "true")
    monkeypatch.setenv("DISP_PENDING_THRESHOLD_SECONDS", "120")
    config = OperatorConfig.from_env()
    assert config.credential_namespaces == {"ml-team", "research"} and config.forbid_unsafe_pickle is True
    assert config.pending_threshold.total_seconds() == 120
    monkeypatch.setenv("DISP_CREDENTIAL_NAMESPACES", "")  # the chart, cluster-wide, with no namespace listed
    assert OperatorConfig.from_env().credential_namespaces == frozenset()
    assert config.allowed_endpoints is None  # the chart's default: an empty list, any endpoint
    monkeypatch.setenv("DISP_ALLOWED_S3_ENDPOINTS", "minio.minio.svc:9000, *.s3.example")
    assert OperatorConfig.from_env().allowed_endpoints == ("minio.minio.svc:9000", "*.s3.example")


@pytest.mark.parametrize("name, value", [("DISP_RETRY_BASE_SECONDS", "soon"), ("DISP_RECONCILE_INTERVAL_SECONDS", "0"),
                                         ("DISP_METRICS_PORT", "-1"), ("DISP_FORBID_UNSAFE_PICKLE", "yes"),
                                         ("DISP_PENDING_THRESHOLD_SECONDS", "0"),
                                         ("DISP_ALLOWED_S3_ENDPOINTS", "http://minio:9000")])
def test_bad_settings_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        OperatorConfig.from_env()


def test_a_default_storage_needs_its_secret(monkeypatch):
    monkeypatch.setenv("DISP_S3_ENDPOINT", "minio.minio.svc:9000")
    with pytest.raises(ConfigError, match="DISP_S3_CREDENTIALS_SECRET"):
        OperatorConfig.from_env()
    monkeypatch.setenv("DISP_S3_CREDENTIALS_SECRET", "minio")
    monkeypatch.setenv("DISP_S3_SECURE", "false")
    storage = OperatorConfig.from_env().default_storage
    assert (storage.endpoint, storage.secure, storage.credentials_secret.name) == ("minio.minio.svc:9000", False,
                                                                                  "minio")


def test_the_runner_log_format_comes_from_the_chart_and_a_wrong_one_stops_the_operator(monkeypatch):
    from disp_api import LogFormat

    assert OperatorConfig.from_env().runner.log_format is LogFormat.TEXT
    monkeypatch.setenv("DISP_RUNNER_LOG_FORMAT", "json")
    assert OperatorConfig.from_env().runner.log_format is LogFormat.JSON
    monkeypatch.setenv("DISP_RUNNER_LOG_FORMAT", "yaml")
    with pytest.raises(ConfigError, match="DISP_RUNNER_LOG_FORMAT: 'yaml' is not one of text, json"):
        OperatorConfig.from_env()
