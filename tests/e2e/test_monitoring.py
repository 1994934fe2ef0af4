"""A real Prometheus (Debian's server) scrapes the real operator while it runs jobs against the
emulated cluster, with the chart's scrape settings (honorLabels) and alert rules: the job series
keep their namespace, the failure alert names a failed job, and every query of the chart's Grafana
dashboard returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.e2e.support import NAMESPACE, UID, finished, free_port, operator, standin_manifest, wait_until
from tests.monitoring.test_alerts import chart_rules
from tests.operator.cluster import PodFault

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "disp-operator" / "files" / "grafana-dashboard.json"


class Prometheus:
    def __init__(self, workdir: Path, target: str):
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not installed (`make test` installs Debian's prometheus package)", pytrace=False)
        self.port = free_port()
        (workdir / "rules.yaml").write_text(yaml.safe_dump(chart_rules()))
        # What the chart's ServiceMonitor makes of the metrics Service: the target carries the
        # operator's own namespace, and honorLabels keeps the series' namespace (the job's).
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(workdir / "rules.yaml")],
                  "scrape_configs": [{"job_name": "disp-operator", "honor_labels": True, "static_configs": [
                      {"targets": [target], "labels": {"namespace": "disp-system"}}]}]}
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"], stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(self._ready, 30, "Prometheus to be ready")

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1).status == 200
        except OSError:
            return False

    def query_range(self, expr: str, start: float, end: float) -> list:
        params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": "1"})
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/v1/query_range?{params}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def _has_numbers(result: list) -> bool:
    return any(value not in ("NaN", "+Inf", "-Inf") for series in result for _, value in series["values"])


def test_a_real_prometheus_scrapes_the_operator_and_every_dashboard_query_returns_data(cluster, kubelet, s3, uploaded,
                                                                                      monkeypatch, tmp_path):
    metrics_port = free_port()
    prometheus = Prometheus(tmp_path, f"127.0.0.1:{metrics_port}")
    kubelet.faults["watched-masking"] = PodFault(137, "OOMKilled")  # one retry
    kubelet.unschedulable["waiting-saliency"] = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    start = time.time()
    try:
        with operator(monkeypatch, metrics_port=metrics_port):
            cluster.create_job(standin_manifest(s3, uploaded, "watched"), uid=UID)
            cluster.create_job(standin_manifest(s3, uploaded, "waiting"), uid=UID.replace("e2e1", "e2e2"))
            cluster.create_job(standin_manifest(s3, uploaded, "invalid", masking={"ratio": 1.5}),
                               uid=UID.replace("e2e1", "e2e3"))
            cluster.wait_for(NAMESPACE, "watched", finished, 90, "the job to finish")
            wait_until(lambda: prometheus.query_range('ALERTS{alertname="DispPurificationJobFailed",name="invalid"}',
                                                      start, time.time()), 30, "the failure alert")
            time.sleep(3)  # a few more scrapes of the final state
            end = time.time()
        # The job's series keep the job's namespace; the target's own went nowhere else.
        after = prometheus.query_range("disp_job_asr_after_ratio", start, end)
        assert [s["metric"]["namespace"] for s in after] == [NAMESPACE] and after[0]["metric"]["name"] == "watched"
        assert not prometheus.query_range('{exported_namespace!=""}', start, end)
        (alert,) = prometheus.query_range('ALERTS{alertname="DispPurificationJobFailed"}', start, end)
        assert (alert["metric"]["namespace"], alert["metric"]["name"]) == (NAMESPACE, "invalid")
        failures = prometheus.query_range('disp_job_failures_total{reason="InvalidSpec"}', start, end)
        assert failures and failures[0]["values"][-1][1] == "1"
        dashboard = json.loads(DASHBOARD.read_text())
        empty = []
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                if not _has_numbers(prometheus.query_range(target["expr"], start, end)):
                    empty.append(f"{panel['title']}: {target['expr']}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    finally:
        prometheus.close()
