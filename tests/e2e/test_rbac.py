"""Least privilege, checked both ways: every API call the operator makes in an end-to-end run
(retry, suspend, resume, success, deletion) is allowed by the chart's rules, and every rule the
chart grants was used."""

from __future__ import annotations

import time

import pytest

from tests.deploy.helm_chart import by_kind, render
from tests.e2e.support import NAMESPACE, UID, finished, operator, standin_manifest, wait_until
from tests.operator.cluster import PLURAL, AuditRecord, PodFault


def granted_by_chart(values: dict) -> set[tuple[str, str, str]]:
    """(apiGroup, resource[/subresource], verb) the install grants the operator's ServiceAccount."""
    docs = render(values)
    bindings = by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")
    operator_roles = {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings
                      if any(s["kind"] == "ServiceAccount" for s in b["subjects"])}
    grants = set()
    for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
        if (role["kind"], role["metadata"]["name"]) in operator_roles:
            for rule in role["rules"]:
                for group in rule["apiGroups"]:
                    for resource in rule["resources"]:
                        grants |= {(group, resource, verb) for verb in rule["verbs"]}
    return grants


def used_by_operator(audit: list[AuditRecord]) -> set[tuple[str, str, str]]:
    used = set()
    for record in audit:
        if not (record.agent.startswith("kopf/") or record.agent.startswith("disp-operator")):
            continue  # the tests' own client and the kubelet stand-in
        group_version, _, resource = record.resource.rpartition("/")
        group = group_version.rpartition("/")[0] if "/" in group_version else ""
        name = resource + (f"/{record.subresource}" if record.subresource else "")
        used.add((group, name, record.verb))
    return used


@pytest.mark.parametrize("mode, values, scope", [
    ("cluster-wide", {}, ()),
    ("namespaced", {"watchNamespaces": [NAMESPACE]}, (NAMESPACE,)),
])
def test_the_chart_grants_exactly_what_the_operator_uses(cluster, kubelet, s3, uploaded, monkeypatch,
                                                         mode, values, scope):
    kubelet.standin_seconds = 1.5
    kubelet.faults["rbac-saliency"] = PodFault(137, "OOMKilled")
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
    assert used - granted == set(), f"calls the chart does not allow: {sorted(used - granted)}"
    assert granted - used == set(), f"rules the operator never used: {sorted(granted - used)}"
