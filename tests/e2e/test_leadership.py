"""Two replicas on the real API server: leader election's calls (tests/operator/test_leadership.py
has the rule), then two `disp-operator` processes as the chart's Deployment runs them, the leader
killed mid-stage and the other taking over."""

from __future__ import annotations

import json
import threading
import time

import kubernetes

from disp_operator.leadership import LeaderElector
from tests.e2e.support import (LEASE, Replica, chart_values, delete_lease, finished, install, standin_manifest,
                               wait_until)
from tests.harness.cluster import OPERATOR_NAMESPACE

# The chart's leader-election settings, shortened for the test (client-go's proportions).
FAST = {"DISP_LEADER_LEASE_SECONDS": "4", "DISP_LEADER_RENEW_DEADLINE_SECONDS": "3",
        "DISP_LEADER_RETRY_SECONDS": "0.5", "DISP_RECONCILE_INTERVAL_SECONDS": "0.5",
        "DISP_PROGRESS_INTERVAL_SECONDS": "0.5", "DISP_RETRY_BASE_SECONDS": "0.2"}


def job_series(scrape: str) -> list[str]:
    """The samples that belong to one PurificationJob (labelled with its name)."""
    return [line for line in scrape.splitlines() if not line.startswith("#") and 'name="' in line]


def test_of_two_candidates_one_leads_and_the_other_takes_over_when_it_stops(cluster):
    api = kubernetes.client.CoordinationV1Api(cluster.plane.admin())
    lease = f"election-{cluster.namespace[-6:]}"
    first, second = (LeaderElector(api, cluster.namespace, lease, me, duration=2, renew_deadline=1.5, retry=0.2)
                     for me in ("first", "second"))
    # Both try at once, many times: the resourceVersion decides, exactly one holds it.
    results: dict[str, list[bool]] = {"first": [], "second": []}

    def contend(elector: LeaderElector) -> None:
        for _ in range(10):
            results[elector.me].append(elector.try_acquire_or_renew())

    threads = [threading.Thread(target=contend, args=(e,)) for e in (first, second)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    holder = api.read_namespaced_lease(lease, cluster.namespace).spec.holder_identity
    winner, loser = (first, second) if holder == "first" else (second, first)
    assert results[winner.me][-1] is True and results[loser.me][-1] is False
    assert not any(results[loser.me][results[loser.me].index(False):])  # once lost, never held again

    # A clean stop hands it over at once; the other's next round takes it.
    winner.leading = True
    winner.release()
    assert loser.try_acquire_or_renew() is True
    spec = api.read_namespaced_lease(lease, cluster.namespace).spec
    assert spec.holder_identity == loser.me and spec.lease_transitions == 1
    # A holder that stops renewing (a crash) is replaced only after the lease's duration.
    assert winner.try_acquire_or_renew() is False
    time.sleep(2.1)
    assert winner.try_acquire_or_renew() is True
    assert api.read_namespaced_lease(lease, cluster.namespace).spec.lease_transitions == 2


def test_the_leader_killed_mid_stage_is_replaced_without_a_duplicate_job_or_lost_progress(
        cluster, kubelet, s3, uploaded, tmp_path):
    chart = install(cluster)
    api = kubernetes.client.CoordinationV1Api(cluster.plane.admin())
    delete_lease(cluster)
    first = Replica.start(chart, "disp-operator-a", tmp_path, FAST)
    second = None
    try:
        wait_until(first.leads, 60, "the first replica to lead")
        second = Replica.start(chart, "disp-operator-b", tmp_path, FAST)
        wait_until(second.healthy, 60, "the second replica's /healthz while it waits")
        assert not second.leads()
        assert job_series(second.metrics()) == []  # a waiting replica exports no series of any job

        kubelet.standin_seconds = 3.0
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "failover"))
        wait_until(lambda: "failover-relabel" in kubelet.started, 60, "the relabel pod to start")
        first.kill()
        killed = time.monotonic()
        wait_until(second.leads, 30, "the second replica to take over")
        took_over = time.monotonic() - killed
        kubelet.standin_seconds = 0.3
        body = cluster.wait_for(cluster.namespace, "failover", finished, 90, "the job to finish")
        led_series = job_series(second.metrics())
    finally:
        first.stop()
        if second is not None:
            second.stop()
    assert body["status"]["phase"] == "Succeeded", body["status"]
    assert any('name="failover"' in line for line in led_series)  # the new leader exports the job's series
    # Each stage Job made once: the running relabel Job was adopted, not made again.
    assert kubelet.started == ["failover-saliency", "failover-masking", "failover-relabel", "failover-finetune",
                               "failover-evaluate"]
    assert all(s["attempts"] == 1 for s in body["status"]["stages"])
    assert 4 - 0.5 <= took_over <= 4 + 3, took_over  # the lease's duration, give or take a retry
    # The clean stop handed the Lease back.
    assert not api.read_namespaced_lease(LEASE, OPERATOR_NAMESPACE).spec.holder_identity


def test_with_log_format_json_every_line_the_operator_writes_is_json_and_names_its_job(
        cluster, kubelet, s3, uploaded, tmp_path):
    """The chart's operator.logFormat json: the whole log of a replica that led one run parses line
    by line, and the lines about the run carry its namespace and name for a log pipeline to filter."""
    chart = install(cluster, chart_values(cluster, operator={"logFormat": "json"}))
    assert "--log-format=json" in chart.container["args"]
    delete_lease(cluster)
    replica = Replica.start(chart, "disp-operator-json", tmp_path, FAST)
    try:
        wait_until(replica.leads, 60, "the replica to lead")
        kubelet.standin_seconds = 0.2
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "logged"))
        body = cluster.wait_for(cluster.namespace, "logged", finished, 90, "the job to finish")
    finally:
        replica.stop()
    assert body["status"]["phase"] == "Succeeded", body["status"]
    lines = [line for line in replica.log.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} of the operator's log is not JSON: {line[:200]}") from None
    assert all({"message", "severity"} <= set(record) for record in records)
    about = [r for r in records if (r.get("object") or {}).get("name") == "logged"]
    assert {r["object"]["namespace"] for r in about} == {cluster.namespace}
    assert any(r["message"] == "created Job logged-saliency" for r in about), [r["message"] for r in about]
