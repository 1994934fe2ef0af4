"""Least privilege, checked both ways: every API call the operator makes in an end-to-end run
(retry, suspend, resume, success, deletion) is allowed by the chart's rules, and every rule the
chart grants was used."""

from __future__ import annotations

import time

import pytest

from tests.deploy.helm_chart import by_kind, render
from tests.e2e.support import NAMESPACE, UID, finished, operator, standin_manifest, wait_until
from tests.operator.cluster import PLURAL, AuditRecord, PodFault


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


def used_by_operator(audit: list[AuditRecord]) -> set[tuple[str, str, str, str]]:
    used = set()
    for record in audit:
        if not (record.agent.startswith("kopf/") or record.agent.startswith("disp-operator")):
            continue  # the tests' own client and the kubelet stand-in
        group_version, _, resource = record.resource.rpartition("/")
        group = group_version.rpartition("/")[0] if "/" in group_version else ""
        name = resource + (f"/{record.subresource}" if record.subresource else "")
        used.add((group, name, record.verb, record.namespace or CLUSTER))
    return used


def uncovered(used: set, granted: set) -> set:
    """Calls no grant allows: a namespaced call needs a grant in its namespace or a cluster one;
    a cluster-wide call (a watch of all namespaces) needs a cluster one."""
    return {call for call in used if call not in granted and (*call[:3], CLUSTER) not in granted}


def unused(granted: set, used: set) -> set:
    return {grant for grant in granted if not any(call[:3] == grant[:3] and grant[3] in (call[3], CLUSTER)
                                                  for call in used)}


def operator_env(values: dict) -> dict[str, str]:
    """The settings the chart gives the operator that decide which calls it makes."""
    (deployment,) = by_kind(render(values), "Deployment")
    env = {e["name"]: e.get("value", "") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    return {k: v for k, v in env.items() if k == "DISP_CREDENTIAL_NAMESPACES"}


@pytest.mark.parametrize("mode, values, scope", [
    ("cluster-wide", {"credentialNamespaces": [NAMESPACE]}, ()),
    ("namespaced", {"watchNamespaces": [NAMESPACE]}, (NAMESPACE,)),
])
def test_the_chart_grants_exactly_what_the_operator_uses(cluster, kubelet, s3, uploaded, monkeypatch,
                                                         mode, values, scope):
    kubelet.standin_seconds = 1.5
    kubelet.faults["rbac-saliency"] = PodFault(137, "OOMKilled")
    for name, value in operator_env(values).items():
        monkeypatch.setenv(name, value)
    with operator(monkeypatch, namespaces=scope):
        # A two-pod fine-tune: the operator creates its rendezvous Service too; clean-up on deletion:
        # the job carries the operator's finalizer (patched in, and out once the artifacts are gone).
        cluster.create_job(standin_manifest(s3, uploaded, "rbac", parallelism={"finetuneNodes": 2},
                                           policy={"cleanupArtifacts": True}), uid=UID)
        wait_until(lambda: "rbac-masking" in kubelet.started, 60, "the masking pod")
        cluster.set_suspend(NAMESPACE, "rbac", True)
        cluster.wait_for(NAMESPACE, "rbac", lambda b: b.get("status", {}).get("phase") == "Suspended", 20, "suspension")
        cluster.set_suspend(NAMESPACE, "rbac", False)
        cluster.wait_for(NAMESPACE, "rbac", finished, 60, "the job to finish")
        cluster.custom.delete_namespaced_custom_object("disp.dev", "v1alpha1", NAMESPACE, PLURAL, "rbac")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # kopf removes its finalizer, then the object goes
            if not any(o["metadata"]["name"] == "rbac" for o in
                       cluster.custom.list_namespaced_custom_object("disp.dev", "v1alpha1", NAMESPACE, PLURAL)["items"]):
                break
            time.sleep(0.1)
    used = used_by_operator(cluster.emulator.audit)
    granted = granted_by_chart(values)
    assert uncovered(used, granted) == set(), f"calls the chart does not allow: {sorted(uncovered(used, granted))}"
    assert unused(granted, used) == set(), f"rules the operator never used: {sorted(unused(granted, used))}"
    # Secrets: never granted cluster-wide, read only in the job's namespace.
    assert not any(g[1] == "secrets" and g[3] == CLUSTER for g in granted)
    assert {c[3] for c in used if c[1] == "secrets"} == {NAMESPACE}


def test_cluster_wide_the_operator_reads_no_secret_outside_its_credential_namespaces(cluster, kubelet, s3, uploaded,
                                                                                    monkeypatch):
    """A job in a namespace the chart gives no credential access to fails at once, saying whom to
    ask, and the operator never asks the API server for its Secret."""
    values = {"credentialNamespaces": ["other-team"]}
    for name, value in operator_env(values).items():
        monkeypatch.setenv(name, value)
    with operator(monkeypatch):
        cluster.create_job(standin_manifest(s3, uploaded, "fenced"), uid=UID)
        body = cluster.wait_for(NAMESPACE, "fenced", finished, 30, "the job to fail")
    failed = next(c for c in body["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "InvalidSpec" and "credentialNamespaces" in failed["message"]
    assert f"namespace {NAMESPACE!r}" in failed["message"] and kubelet.started == []
    assert not [c for c in used_by_operator(cluster.emulator.audit) if c[1] == "secrets"]
    assert not any(g[1] == "secrets" and g[3] in (NAMESPACE, CLUSTER) for g in granted_by_chart(values))
