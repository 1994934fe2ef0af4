"""The CRD as the real API server takes it: accepted (its CEL rules within the cost budget, with
margin), every example accepted, every malformed manifest that the schema or a CEL rule refuses
refused by the server too with a message naming the field, and what only the operator can judge
(a Secret, the files in S3) accepted by the server. The same tables drive tests/operator/test_crd.py,
where jsonschema and cel-python stand for the server: this file proves they agree with it."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from tests.harness.cluster import CRD, GROUP, PLURAL, VERSION
from tests.operator.test_crd import (BAD_MANIFESTS, CEL_REFUSED, EXAMPLES, SUSPENDED, _defaulted, cel_refusals,
                                     schema_errors)
from tests.operator.conftest import job_body


def server_verdict(cluster, manifest: dict) -> str:
    """'' when the API server accepts the manifest (a dry run: nothing is stored), else its message.
    Strict field validation, as `kubectl apply` asks for by default."""
    body = copy.deepcopy(manifest)
    body["metadata"] = {**body.get("metadata", {}), "namespace": cluster.namespace}
    body["metadata"].pop("uid", None)
    body["metadata"].pop("generation", None)
    try:
        cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body,
                                                       dry_run="All", field_validation="Strict")
    except ApiException as exc:
        if exc.status not in (400, 422):
            raise
        return json.loads(exc.body).get("message", exc.body)
    return ""


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_the_server_accepts_every_example(cluster, example):
    assert server_verdict(cluster, yaml.safe_load(example.read_text())) == ""


def test_the_server_refuses_what_the_schema_refuses_and_accepts_what_only_the_operator_judges(cluster):
    """Each malformed manifest of the operator's table: refused by the server exactly when the
    offline schema and CEL checks refuse it, naming the same field."""
    disagreements = []
    for case, manifest, field in BAD_MANIFESTS:
        offline = schema_errors(manifest) + cel_refusals(manifest)
        verdict = server_verdict(cluster, manifest)
        if bool(offline) != bool(verdict):
            disagreements.append(f"{case}: offline {offline or 'accepts'}; server {verdict or 'accepts'}")
        elif verdict and field.split(".")[-1] not in verdict:
            disagreements.append(f"{case}: the server's message does not name {field!r}: {verdict}")
    assert disagreements == [], "\n".join(disagreements)


@pytest.mark.parametrize("case, manifest, field, by_disp_run", CEL_REFUSED, ids=[c[0] for c in CEL_REFUSED])
def test_the_server_refuses_every_cel_case_naming_the_field(cluster, case, manifest, field, by_disp_run):
    verdict = server_verdict(cluster, manifest)
    assert verdict, f"{case}: accepted by the API server"
    assert field.split(".")[-1] in verdict, verdict


@pytest.mark.parametrize("key, allowed", [
    ("team", True), ("example.com/cost-centre", True), ("disp.dev/stage", False), ("job-name", False),
    ("kueue.x-k8s.io/queue-name", False), ("container.apparmor.security.beta.kubernetes.io/runner", False)])
def test_the_server_refuses_reserved_pod_label_and_annotation_keys(cluster, key, allowed):
    for field in ("labels", "annotations"):
        verdict = server_verdict(cluster, job_body(podTemplate={"metadata": {field: {key: "v"}}}))
        assert (verdict == "") is allowed, (field, key, verdict)
        if not allowed:
            assert "reserved key" in verdict and field in verdict


def test_the_server_fills_in_the_documented_defaults(cluster):
    """What the server stores for a minimal job is what the typed spec says the defaults are."""
    body = job_body()
    body["metadata"] = {"name": "defaults", "namespace": cluster.namespace}
    stored = cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body,
                                                            dry_run="All")
    assert stored["spec"] == _defaulted(job_body()["spec"])


@pytest.mark.parametrize("case, old_change, change, allowed", [
    ("suspend", {}, {"policy": {"suspend": True}}, True),
    ("model uri", {}, {"model": {"uri": "s3://models/other"}}, False),
    ("masking ratio", {}, {"masking": {"ratio": 0.5}}, False),
    ("resources of a running job", {}, {"resources": {"memory": "64Gi"}}, False),
    ("resources while suspended", SUSPENDED, {"resources": {"memory": "64Gi"}, "policy": {"suspend": True}}, True),
    ("resources and resume in one edit", SUSPENDED, {"resources": {"memory": "64Gi"}, "policy": {"suspend": False}},
     False),
])
def test_the_server_keeps_the_spec_immutable_except_suspend(cluster, case, old_change, change, allowed):
    body = job_body(**{key: value for key, value in old_change.items()})
    body["metadata"] = {"name": "immutable", "namespace": cluster.namespace}
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, body)
    try:
        cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, cluster.namespace, PLURAL, "immutable",
                                                      {"spec": change})
        verdict = ""
    except ApiException as exc:
        assert exc.status == 422, exc.body
        verdict = json.loads(exc.body)["message"]
    assert (verdict == "") is allowed, verdict
    if not allowed:
        assert "spec is immutable once created" in verdict
    generation = cluster.get(cluster.namespace, "immutable")["metadata"]["generation"]
    assert generation == (2 if allowed else 1)  # the server counts spec changes, not refused ones


def _scaled(crd: dict, factor: int) -> dict:
    """The CRD with every string, list and map bound `factor` times larger."""
    crd = copy.deepcopy(crd)

    def walk(node: dict) -> None:
        for bound in ("maxLength", "maxItems", "maxProperties"):
            if bound in node and not (node.get("minItems") == node[bound]):  # fixed-size tuples stay
                node[bound] *= factor
        for sub in node.get("properties", {}).values():
            walk(sub)
        for key in ("items", "additionalProperties"):
            if isinstance(node.get(key), dict):
                walk(node[key])
    walk(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])
    crd["metadata"]["name"] = "margins.disp.dev"
    crd["spec"]["names"] = {"kind": "Margin", "listKind": "MarginList", "plural": "margins", "singular": "margin"}
    return crd


def test_the_crd_stays_within_the_cel_cost_budget_with_a_thousandfold_margin(control_plane):
    """The API server estimates each rule's worst cost from the schema's bounds and refuses a CRD
    over budget (this one was refused, 1.7x over, before its maps had maxProperties). The same CRD
    with every bound a thousand times larger is accepted (a dry run), so the rules have at least that
    much margin; at ten thousand times the server refuses it, so the check can fail."""
    import kubernetes

    api = kubernetes.client.ApiextensionsV1Api(control_plane.admin())
    crd = yaml.safe_load(CRD.read_text())
    api.create_custom_resource_definition(_scaled(crd, 1000), dry_run="All")
    with pytest.raises(ApiException) as refused:
        api.create_custom_resource_definition(_scaled(crd, 10_000), dry_run="All")
    assert "estimated rule cost exceeds budget" in refused.value.body
