"""A real Prometheus (Debian's server) scrapes the real operator while it runs jobs against the
real control plane, with the chart's scrape settings (honorLabels) and alert rules: the job series
keep their namespace, the failure alert names a failed job, a run whose metrics.json was changed
after publication fires the tamper alert and exports no ASR, and every query of the chart's Grafana
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

from tests.e2e.support import PodFault, finished, free_port, operator, standin_manifest, wait_until
from tests.monitoring.test_alerts import chart_rules

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
    kubelet.extra_env["STANDIN_OVERWRITE_METRICS"] = "tampered"  # its evaluate pod rewrites metrics.json
    start = time.time()
    try:
        with operator(cluster, monkeypatch, metrics_port=metrics_port):
            namespace = cluster.namespace
            cluster.create_job(standin_manifest(s3, uploaded, namespace, "watched"))
            # More GPUs than any node has: the scheduler leaves its pod Pending (the stall panels).
            cluster.create_job(standin_manifest(s3, uploaded, namespace, "waiting",
                                                resources={"gpus": 4, "cpu": "1", "memory": "1Gi"}))
            # Accepted by the API server, refused by the operator: its Secret does not exist.
            cluster.create_job(standin_manifest(s3, uploaded, namespace, "invalid", storage={
                "endpoint": s3, "secure": False, "credentialsSecret": {"name": "no-such-secret"}}))
            # Its figures are overwritten (asrAfter 0) by the evaluate pod after it published them.
            cluster.create_job(standin_manifest(s3, uploaded, namespace, "tampered"))
            cluster.wait_for(namespace, "watched", finished, 90, "the job to finish")
            tampered = cluster.wait_for(namespace, "tampered", finished, 90, "the tampered job to finish")
            wait_until(lambda: prometheus.query_range('ALERTS{alertname="DispPurificationJobFailed",name="invalid"}',
                                                      start, time.time()), 30, "the failure alert")
            wait_until(lambda: prometheus.query_range('ALERTS{alertname="DispArtifactsTampered",alertstate="firing"}',
                                                      start, time.time()), 30, "the tamper alert")
            time.sleep(3)  # a few more scrapes of the final state
            end = time.time()
        # The job's series keep the job's namespace; the target's own went nowhere else.
        # (Scoped to this test's namespace: a cluster-wide operator also exports the jobs left in
        # namespaces of earlier tests that the namespace controller is still deleting.)
        after = prometheus.query_range(f'disp_job_asr_after_ratio{{namespace="{namespace}"}}', start, end)
        assert [s["metric"]["namespace"] for s in after] == [namespace] and after[0]["metric"]["name"] == "watched"
        assert not prometheus.query_range('{exported_namespace!=""}', start, end)
        alerts = prometheus.query_range(f'ALERTS{{alertname="DispPurificationJobFailed",namespace="{namespace}"}}',
                                        start, end)
        assert {(a["metric"]["namespace"], a["metric"]["name"], a["metric"]["alertstate"]) for a in alerts} == \
            {(namespace, "invalid", "firing"), (namespace, "tampered", "firing")}, [a["metric"] for a in alerts]
        # The tampered run: failed with the reason and the file named, its figures nowhere.
        failed = next(c for c in tampered["status"]["conditions"] if c["type"] == "Failed")
        assert failed["reason"] == "ArtifactsTampered" and "/evaluate/metrics.json: SHA-256" in failed["message"]
        assert "metrics" not in tampered["status"] and "purifiedModelUri" not in tampered["status"]
        assert any(e["reason"] == "ArtifactsTampered" and e["type"] == "Warning" and
                   e["involvedObject"]["name"] == "tampered" for e in cluster.events(namespace))
        for series in ("disp_job_asr_after_ratio", "disp_job_asr_before_ratio", "disp_job_residual_rate_ratio"):
            assert not prometheus.query_range(f'{series}{{namespace="{namespace}",name="tampered"}}', start, end)
        tamper_failures = prometheus.query_range('disp_job_failures_total{reason="ArtifactsTampered"}', start, end)
        assert tamper_failures[0]["values"][0][1] == "0" and tamper_failures[0]["values"][-1][1] == "1"
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
