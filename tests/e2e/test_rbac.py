"""Least privilege, checked both ways against the real API server: the operator runs with the
chart's ServiceAccount token and RBAC, so a verb the chart does not grant fails for real; every
API call it makes in an end-to-end run (retry, suspend, resume, success, deletion) is read back from
the API server's audit log, and every rule the chart grants must have been used."""

from __future__ import annotations

import time

import pytest

from tests.deploy.helm_chart import by_kind, render
from tests.e2e.support import (OPERATOR_USER, PodFault, chart_values, delete_lease, finished, operator,
                               standin_manifest, wait_until)

CLUSTER = "*"  # a grant by a ClusterRole: every namespace


def granted_by_chart(values: dict) -> set[tuple[str, str, str, str]]:
    """(apiGroup, resource[/subresource], verb, namespace or CLUSTER) the install grants the
    operator's ServiceAccount."""
    docs = render(values)
    grants = set()
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        if not any(s["kind"] == "ServiceAccount" for s in binding["subjects"]):
            continue
        scope = binding["metadata"].get("namespace", CLUSTER) if binding["kind"] == "RoleBinding" else CLUSTER
        (role,) = [r for r in by_kind(docs, binding["roleRef"]["kind"]) if r["metadata"]["name"] ==
                   binding["roleRef"]["name"] and r["metadata"].get("namespace", CLUSTER) in (scope, CLUSTER)]
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants |= {(group, resource, verb, scope) for verb in rule["verbs"]}
    return grants


def used_by_operator(cluster) -> set[tuple[str, str, str, str]]:
    """The operator's calls as the API server's audit log recorded them (authorized or not)."""
    used = set()
    for event in cluster.audit(OPERATOR_USER):
        ref = event.get("objectRef") or {}
        if not ref.get("resource") or ref.get("resource") == "serviceaccounts":
            continue  # discovery; and the tests' own TokenRequest for the operator's token
        name = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        used.add((ref.get("apiGroup", ""), name, event["verb"], ref.get("namespace") or CLUSTER))
    return used


def forbidden_calls(cluster) -> list[str]:
    """The operator's calls the API server refused (403)."""
    return [f"{e['verb']} {e.get('objectRef')}" for e in cluster.audit(OPERATOR_USER)
            if (e.get("responseStatus") or {}).get("code") == 403]


def uncovered(used: set, granted: set) -> set:
    """Calls no grant allows: a namespaced call needs a grant in its namespace or a cluster one;
    a cluster-wide call (a watch of all namespaces) needs a cluster one."""
    return {call for call in used if call not in granted and (*call[:3], CLUSTER) not in granted}


def unused(granted: set, used: set) -> set:
    return {grant for grant in granted if not any(call[:3] == grant[:3] and grant[3] in (call[3], CLUSTER)
                                                  for call in used)}


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_the_chart_grants_exactly_what_the_operator_uses(cluster, kubelet, s3, uploaded, monkeypatch, mode):
    values = chart_values(cluster) if mode == "cluster-wide" else {"watchNamespaces": [cluster.namespace]}
    kubelet.standin_seconds = 1.5
    kubelet.faults["rbac-saliency"] = PodFault(137, "OOMKilled")
    delete_lease(cluster)  # a first install: the operator creates its Lease, renews it, hands it back
    with operator(cluster, monkeypatch, values):
        # A two-pod fine-tune: the operator creates its rendezvous Service too; clean-up on deletion:
        # the job carries the operator's finalizer (patched in, and out once the artifacts are gone).
        # A time to live: the operator deletes the finished job itself.
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "rbac", parallelism={"finetuneNodes": 2},
                                            policy={"cleanupArtifacts": True, "ttlSecondsAfterFinished": 1}))
        wait_until(lambda: "rbac-masking" in kubelet.started, 60, "the masking pod")
        cluster.set_suspend(cluster.namespace, "rbac", True)
        cluster.wait_for(cluster.namespace, "rbac", lambda b: b.get("status", {}).get("phase") == "Suspended", 20,
                         "suspension")
        cluster.set_suspend(cluster.namespace, "rbac", False)
        body = cluster.wait_for(cluster.namespace, "rbac", finished, 90, "the job to finish")
        assert body["status"]["phase"] == "Succeeded", body["status"]
        # kopf removes its finalizer once the artifacts are cleaned up, then the object goes
        wait_until(lambda: "rbac" not in cluster.list_jobs(cluster.namespace), 30, "the job to expire")
    assert forbidden_calls(cluster) == []
    used = used_by_operator(cluster)
    granted = granted_by_chart(values)
    assert uncovered(used, granted) == set(), f"calls the chart does not allow: {sorted(uncovered(used, granted))}"
    assert unused(granted, used) == set(), f"rules the operator never used: {sorted(unused(granted, used))}"
    # Secrets: never granted cluster-wide, read only in the job's namespace.
    assert not any(g[1] == "secrets" and g[3] == CLUSTER for g in granted)
    assert {c[3] for c in used if c[1] == "secrets"} == {cluster.namespace}


def test_with_kueue_the_chart_grants_exactly_the_queue_calls_the_operator_makes(cluster, kubelet, s3, uploaded, queue,
                                                                                 monkeypatch):
    """kueue.enabled: the run's Workload is created, read, finished; deleted while the run is
    suspended; the admitted flavor and the job's WorkloadPriorityClass read. Every Kueue rule the
    chart adds is used, none is missing."""
    values = chart_values(cluster, kueue={"enabled": True})
    priority = f"research-{cluster.namespace[-6:]}"
    queue.create_cluster_custom_object("kueue.x-k8s.io", "v1beta2", "workloadpriorityclasses", {
        "apiVersion": "kueue.x-k8s.io/v1beta2", "kind": "WorkloadPriorityClass", "metadata": {"name": priority},
        "value": 1000})
    kubelet.standin_seconds = 1.5
    with operator(cluster, monkeypatch, values):
        queued = standin_manifest(s3, uploaded, cluster.namespace, "queued-rbac")
        queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "gpu-batch",
                                        "kueue.x-k8s.io/priority-class": priority}
        cluster.create_job(queued)
        wait_until(lambda: "queued-rbac-masking" in kubelet.started, 60, "the masking pod")
        cluster.set_suspend(cluster.namespace, "queued-rbac", True)
        cluster.wait_for(cluster.namespace, "queued-rbac", lambda b: b.get("status", {}).get("phase") == "Suspended",
                         20, "suspension")
        cluster.set_suspend(cluster.namespace, "queued-rbac", False)
        body = cluster.wait_for(cluster.namespace, "queued-rbac", finished, 90, "the job to finish")
        assert body["status"]["phase"] == "Succeeded", body["status"]
        time.sleep(1.0)  # the Workload is finished in the pass after the status
    # The one left (suspension deleted the first) carries the priority class and its value.
    (workload,) = queue.list_namespaced_custom_object("kueue.x-k8s.io", "v1beta2", cluster.namespace,
                                                      "workloads")["items"]
    assert (workload["spec"]["priorityClassRef"]["name"], workload["spec"]["priority"]) == (priority, 1000)
    assert forbidden_calls(cluster) == []
    used = {c for c in used_by_operator(cluster) if c[0] == "kueue.x-k8s.io"}
    granted = {g for g in granted_by_chart(values) if g[0] == "kueue.x-k8s.io"}
    assert uncovered(used, granted) == set(), f"calls the chart does not allow: {sorted(uncovered(used, granted))}"
    assert unused(granted, used) == set(), f"rules the operator never used: {sorted(unused(granted, used))}"
    assert not any(g[0] == "kueue.x-k8s.io" for g in granted_by_chart(chart_values(cluster)))  # off by default


def test_cluster_wide_the_operator_reads_no_secret_outside_its_credential_namespaces(cluster, kubelet, s3, uploaded,
                                                                                    monkeypatch):
    """A job in a namespace the chart gives no credential access to fails at once, saying whom to
    ask, and the operator never asks the API server for its Secret."""
    other = cluster.create_namespace(f"other-team-{cluster.namespace[-6:]}")
    values = {"credentialNamespaces": [other]}
    with operator(cluster, monkeypatch, values):
        cluster.create_job(standin_manifest(s3, uploaded, cluster.namespace, "fenced"))
        body = cluster.wait_for(cluster.namespace, "fenced", finished, 30, "the job to fail")
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "credentialNamespaces" in failed["message"]
    assert f"namespace {cluster.namespace!r}" in failed["message"] and kubelet.started == []
    assert not [c for c in used_by_operator(cluster) if c[1] == "secrets" and c[3] == cluster.namespace]
    assert not any(g[1] == "secrets" and g[3] in (cluster.namespace, CLUSTER) for g in granted_by_chart(values))
