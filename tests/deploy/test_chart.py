"""The Helm chart, rendered and linted by the `helm` command, validated against the
Kubernetes schemas, and its values schema; the Dockerfile, linted; the Argo CD health script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from disp_operator.crd import render as render_crd
from tests.deploy.helm_chart import CHART, ROOT, TEAM, HelmFailed, by_kind, lint, render

KUBE_VERSION = "1.30"
LEASE_ROLE = "disp-operator-leader-election"

OPTION_SETS = {
    "default": TEAM,
    "namespaced": {"watchNamespaces": ["ml-team", "research"]},
    "monitoring": {**TEAM, "monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}},
                                  "prometheusRule": {"enabled": True}}},
    "hosted-runbooks": {**TEAM, "monitoring": {"prometheusRule": {"enabled": True,
                                                          "runbookBaseUrl": "https://git.example/ml/disp/blob/main"},
                                       "grafanaDashboard": {"enabled": True}}},
    "custom-image": {**TEAM, "image": {"repository": "registry.example/disp-operator", "tag": "1.2.3"},
                     "runner": {"image": {"repository": "registry.example/disp-runner", "tag": "1.2.3"},
                                "gpus": 2, "nodeSelector": {"pool": "h100"}},
                     "storage": {"endpoint": "minio.minio.svc:9000", "credentialsSecret": "minio",
                                 "allowedEndpoints": ["minio.minio.svc:9000", "*.s3.example"]}},
    "fenced-operator": {**TEAM, "networkPolicy": {"apiServer": {"cidrs": ["172.18.0.2/32"], "ports": [6443]}}},
}


@pytest.mark.parametrize("option", OPTION_SETS)
def test_the_chart_renders_lints_and_validates(option):
    values = OPTION_SETS[option]
    report = lint(values)  # --strict: a warning fails too
    assert "1 chart(s) linted, 0 chart(s) failed" in report, report
    docs = render(values)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus operator CRs: not in the Kubernetes schemas, checked below
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    (deployment,) = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0  # the new pod waits, then leads
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    env = {e["name"]: e.get("value") for e in container["env"]}
    if option == "custom-image":
        assert container["image"] == "registry.example/disp-operator:1.2.3"
        assert env["DISP_RUNNER_IMAGE"] == "registry.example/disp-runner:1.2.3"
        assert env["DISP_RUNNER_GPUS"] == "2" and json.loads(env["DISP_RUNNER_NODE_SELECTOR"]) == {"pool": "h100"}
        assert (env["DISP_S3_ENDPOINT"], env["DISP_S3_CREDENTIALS_SECRET"]) == ("minio.minio.svc:9000", "minio")
        assert env["DISP_ALLOWED_S3_ENDPOINTS"] == "minio.minio.svc:9000,*.s3.example"
    if option == "namespaced":
        assert "--namespace=ml-team" in container["args"] and "--all-namespaces" not in container["args"]
        roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] != LEASE_ROLE]
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml-team", "research"]
        assert [r["metadata"]["name"] for r in by_kind(docs, "ClusterRole") if "\"batch\"" in json.dumps(r)] == []
    else:
        # cluster-wide: one Role, reading Secrets only, in each credential namespace
        assert "--all-namespaces" in container["args"]
        roles = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] != LEASE_ROLE]
        assert [(r["metadata"]["namespace"], r["rules"]) for r in roles] == \
            [("ml-team", [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}])]
    # and, in both modes, Leases only in the operator's own namespace (leader election)
    (lease_role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == LEASE_ROLE]
    assert lease_role["metadata"]["namespace"] == "disp-system"
    if option == "monitoring":
        (monitor,) = by_kind(docs, "ServiceMonitor")
        assert monitor["metadata"]["labels"]["release"] == "prom"
        (rule,) = by_kind(docs, "PrometheusRule")
        alerts = {r["alert"]: r for r in rule["spec"]["groups"][0]["rules"]}
        assert set(alerts) == {"DispPurificationJobFailed", "DispPurificationJobStalled", "DispBackdoorNotRemoved",
                               "DispResidualBackdoor", "DispStageRetriesClimbing", "DispOperatorDown",
                               "DispArtifactsTampered"}
        assert alerts["DispBackdoorNotRemoved"]["expr"] == "disp_job_asr_after_ratio > 0.05"
        stalled = alerts["DispPurificationJobStalled"]["expr"]
        assert "disp_job_last_progress_timestamp_seconds) > 1800" in stalled
        assert "disp_job_pending_pod_seconds > 1800" in stalled  # a stage pod that never starts
        assert "absent(" in alerts["DispOperatorDown"]["expr"]
        for alert in alerts.values():
            assert {"summary", "description", "runbook_url"} <= set(alert["annotations"])
            path, anchor = alert["annotations"]["runbook_url"].split("#")
            assert (ROOT / path).is_file(), path  # a page of this repository
            assert anchor == alert["alert"].lower() and f"### {alert['alert']}" in (ROOT / path).read_text()
        (monitor,) = by_kind(docs, "ServiceMonitor")
        assert monitor["spec"]["endpoints"][0]["honorLabels"] is True  # job series keep their namespace
    elif option == "hosted-runbooks":
        (rule,) = by_kind(docs, "PrometheusRule")
        urls = [r["annotations"]["runbook_url"] for r in rule["spec"]["groups"][0]["rules"]]
        assert all(u.startswith("https://git.example/ml/disp/blob/main/charts/disp-operator/README.md#")
                   for u in urls), urls
        (dashboard,) = by_kind(docs, "ConfigMap")
        assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    else:
        assert by_kind(docs, "PrometheusRule") == [] and by_kind(docs, "ServiceMonitor") == []


def test_the_chart_ships_the_generated_crd_and_keeps_it_on_uninstall():
    assert (CHART / "files" / "purificationjobs.disp.dev.yaml").read_text() == render_crd()
    (crd,) = by_kind(render(TEAM), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["spec"] == yaml.safe_load(render_crd())["spec"]
    (crd,) = by_kind(render({**TEAM, "crd": {"keep": False}}), "CustomResourceDefinition")
    assert "annotations" not in crd["metadata"]
    assert by_kind(render({**TEAM, "crd": {"install": False}}), "CustomResourceDefinition") == []


def test_two_replicas_elect_a_leader_and_keep_one_through_a_drain():
    """replicaCount 2: both replicas get what leader election needs (their pod's name and
    namespace, the Lease's name, a Role for Leases in the release's namespace only) and a
    PodDisruptionBudget keeps one; with one replica there is nothing for a budget to keep."""
    docs = render({**TEAM, "replicaCount": 2})
    (deployment,) = by_kind(docs, "Deployment")
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["DISP_LEADER_ELECTION"]["value"] == "true" and env["DISP_LEADER_LEASE_NAME"]["value"] == "disp-operator"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "Role")}
    lease_role = roles["disp-operator-leader-election"]
    assert lease_role["metadata"]["namespace"] == "disp-system"
    assert lease_role["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                    "verbs": ["get", "create", "patch"]}]
    (budget,) = by_kind(docs, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
    assert by_kind(render(TEAM), "PodDisruptionBudget") == []


def test_user_roles_aggregate_into_view_and_edit():
    roles = {r["metadata"]["name"]: r for r in by_kind(render(TEAM), "ClusterRole")}
    viewer, editor = roles["disp-operator-viewer"], roles["disp-operator-editor"]
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert set(viewer["rules"][0]["verbs"]) == {"get", "list", "watch"}


BAD_VALUES = [
    ("negative replicas", {"replicaCount": -1}, "replicaCount"),
    ("three replicas", {"replicaCount": 3}, "replicaCount"),
    ("negative GPUs", {"runner": {"gpus": -1}}, "gpus"),
    ("unknown top-level key", {"replicas": 1}, "replicas"),
    ("non-string image tag", {"image": {"tag": 1.2}}, "tag"),
    ("endpoint without a credentials Secret", {"storage": {"endpoint": "minio:9000"}}, "credentialsSecret"),
    ("bad namespace", {"watchNamespaces": ["Not_A_Namespace"]}, "watchNamespaces"),
    ("bad port", {"operator": {"metricsPort": 70000}}, "metricsPort"),
    ("endpoint pattern with a scheme", {"storage": {"allowedEndpoints": ["http://minio:9000"]}}, "allowedEndpoints"),
]


@pytest.mark.parametrize("case, values, field", BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_the_values_schema_rejects(case, values, field):
    with pytest.raises(HelmFailed) as exc:
        lint({**TEAM, **values})
    assert "values don't meet the specifications of the schema" in str(exc.value) and field in str(exc.value)
    with pytest.raises(HelmFailed) as exc:  # and `helm install` refuses to render them
        render({**TEAM, **values})
    assert field in str(exc.value)


def test_an_install_that_names_no_namespace_is_refused_saying_what_to_set():
    """With neither list, the operator could read no credentials and every job would fail
    InvalidSpec: `helm install` refuses at once instead, naming both values."""
    with pytest.raises(HelmFailed) as exc:
        render({})
    assert "set credentialNamespaces" in str(exc.value) and "watchNamespaces" in str(exc.value)
    for values in (TEAM, {"watchNamespaces": ["ml-team"]}):
        (deployment,) = by_kind(render(values), "Deployment")
        env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["DISP_CREDENTIAL_NAMESPACES"] == "ml-team"


def test_the_default_values_pass_the_schema_and_a_parent_chart_may_pass_global_values():
    """The chart's own values.yaml is valid for its schema (lint with no values reads only it), and
    as a subchart it receives the parent's `global:` values, which a closed schema must allow."""
    assert "0 chart(s) failed" in lint({})
    assert by_kind(render({**TEAM, "global": {"imageRegistry": "registry.example", "storageClass": "fast"}}),
                   "Deployment")


def test_the_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_operator_image_needs_no_torch():
    """The operator target installs only the `operator` extra: importing it must not pull torch."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None; "
            "import disp_operator.handlers, disp_operator.__main__")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


ARGO_CASES = [
    ("no status yet", {}, "Progressing"),
    ("running", {"phase": "Running", "observedGeneration": 1}, "Progressing"),
    ("pending", {"phase": "Pending", "observedGeneration": 1}, "Progressing"),
    ("succeeded", {"phase": "Succeeded", "observedGeneration": 1, "message": "done"}, "Healthy"),
    ("failed", {"phase": "Failed", "observedGeneration": 1}, "Degraded"),
    ("suspended", {"phase": "Suspended", "observedGeneration": 1}, "Suspended"),
    ("generation not observed", {"phase": "Succeeded", "observedGeneration": 0}, "Progressing"),
    ("suspend not yet observed", {"phase": "Running"}, "Progressing"),
]


@pytest.mark.parametrize("case, status, health", ARGO_CASES, ids=[c[0] for c in ARGO_CASES])
def test_the_argocd_health_check(case, status, health):
    from lupa.lua51 import LuaRuntime  # Argo CD runs gopher-lua, a Lua 5.1

    lua = LuaRuntime(unpack_returned_tuples=True)
    obj = {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "metadata": {"name": "x", "generation": 1}}
    if status:
        obj["status"] = status
    script = (CHART / "files" / "argocd-health.lua").read_text()
    check = lua.eval(f"function(obj) {script} end")
    result = check(lua.table_from(json.loads(json.dumps(obj)), recursive=True))
    assert result["status"] == health
    assert result["message"]


@pytest.mark.parametrize("values, namespaces", [
    ({"watchNamespaces": ["ml-team", "research"]}, ["ml-team", "research"]),
    ({"credentialNamespaces": ["ml-team"]}, ["ml-team"]),
])
def test_stage_pods_are_fenced_in_every_namespace_jobs_run_in(values, namespaces):
    from disp_api import StageName
    from disp_api.status import StepKind
    from disp_operator.jobs import RunnerDefaults, stage_job
    from tests.operator.conftest import make_job

    policies = [p for p in by_kind(render(values), "NetworkPolicy") if p["metadata"]["name"].endswith("-runners")]
    assert sorted(p["metadata"]["namespace"] for p in policies) == namespaces
    pod_labels = stage_job(make_job(), StageName.FINETUNE, StepKind.RUN, 1, RunnerDefaults())["spec"]["template"][
        "metadata"]["labels"]
    for policy in policies:
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        spec = policy["spec"]
        assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()  # selects every stage pod
        assert spec["policyTypes"] == ["Ingress", "Egress"]
        ports = [sorted((p["port"], p["protocol"]) for p in rule.get("ports", [])) for rule in spec["egress"]]
        assert ports == [[(53, "TCP"), (53, "UDP")], [(9000, "TCP")], []]  # DNS, S3, each other: nothing else
        assert spec["egress"][2]["to"] == [{"podSelector": {"matchLabels": {"app.kubernetes.io/managed-by":
                                                                            "disp-operator"}}}]
        assert spec["ingress"] == [{"from": spec["egress"][2]["to"]}]
    external = by_kind(render({"credentialNamespaces": ["ml-team"], "runnerNetworkPolicy": {
        "s3": {"cidrs": ["203.0.113.0/24"], "port": 443}}}), "NetworkPolicy")
    (fenced,) = [p for p in external if p["metadata"]["name"].endswith("-runners")]
    assert fenced["spec"]["egress"][1] == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                                           "ports": [{"port": 443, "protocol": "TCP"}]}


def test_the_operators_egress_is_limited_to_the_api_server_dns_and_s3_once_the_api_server_is_named():
    """Without the API server's addresses (the chart cannot know them) the operator's egress stays
    open; with them, the operator reaches only them, DNS and the S3 endpoint the runners reach."""
    def operator_policy(values):
        (policy,) = [p for p in by_kind(render({"credentialNamespaces": ["ml-team"], **values}), "NetworkPolicy")
                     if not p["metadata"]["name"].endswith("-runners")]
        kubernetes_validate.validate(policy, KUBE_VERSION, strict=True)
        return policy["spec"]

    assert operator_policy({})["egress"] == [{}]
    spec = operator_policy({"networkPolicy": {"apiServer": {"cidrs": ["172.18.0.2/32"], "ports": [6443]}}})
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    api, dns, s3 = spec["egress"]
    assert api == {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}], "ports": [{"port": 6443, "protocol": "TCP"}]}
    assert sorted((p["port"], p["protocol"]) for p in dns["ports"]) == [(53, "TCP"), (53, "UDP")]
    assert dns["to"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}
    assert s3["ports"] == [{"port": 9000, "protocol": "TCP"}]
    assert s3["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "minio"}},
                         "podSelector": {}}]
    external = operator_policy({"networkPolicy": {"apiServer": {"cidrs": ["10.0.0.1/32"]}},
                                "runnerNetworkPolicy": {"s3": {"cidrs": ["203.0.113.0/24"], "port": 443}}})
    assert external["egress"][0]["ports"] == [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}]
    assert external["egress"][2] == {"to": [{"ipBlock": {"cidr": "203.0.113.0/24"}}],
                                     "ports": [{"port": 443, "protocol": "TCP"}]}
    with pytest.raises(HelmFailed, match="apiServer"):
        render({"credentialNamespaces": ["ml-team"], "networkPolicy": {"apiServer": {"cidrs": ["kubernetes.default"]}}})
