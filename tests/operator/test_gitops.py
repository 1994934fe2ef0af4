"""The GitOps round trip the README describes ("Re-running from Git"): a changed parameter is
refused at apply time with a message saying how to re-run; a re-run is the same job under a new
name (the kustomize example); and Argo CD's health check and kstatus (Flux) read the job right
through a run, a suspension, a failure and a re-run, on statuses the operator's own state machine
writes."""

from __future__ import annotations

import copy
import json
import subprocess
from datetime import timedelta
from pathlib import Path

import yaml

from disp_api import StageName
from disp_api.status import PurificationJobStatus
from disp_operator.crd import IMMUTABLE_MESSAGE
from disp_operator.validation import check_static, parse_job
from tests.harness.tools import toolbox
from tests.operator.conftest import job_body, k8s_job, k8s_pod, make_job
from tests.operator.test_crd import _defaulted, cel_refusals, crd_schema, schema_errors
from tests.operator.test_reconcile import T0, run_to, step

ROOT = Path(__file__).resolve().parents[2]
GITOPS = ROOT / "crds" / "examples" / "gitops"
CHART = ROOT / "charts" / "disp-operator"


def test_changing_a_parameter_is_refused_with_how_to_re_run():
    import celpy

    rule = next(r for r in crd_schema()["properties"]["spec"]["x-kubernetes-validations"] if "oldSelf" in r["rule"])
    assert rule["message"] == IMMUTABLE_MESSAGE and "new name" in rule["message"] and "nameSuffix" in rule["message"]
    old = job_body()["spec"]
    new = copy.deepcopy(old) | {"finetune": {"epochs": 8}}
    env = celpy.Environment()
    verdict = env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(_defaulted(new)),
                                                               "oldSelf": celpy.json_to_cel(_defaulted(old))})
    assert not bool(verdict)


def _kustomize(folder: Path) -> list[dict]:
    """`kustomize build FOLDER`: the real kustomize (tools/clustertools/build.sh), as Argo CD and
    Flux run it."""
    result = subprocess.run([str(toolbox().path("kustomize")), "build", str(folder)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_the_re_run_example_builds_a_valid_job_and_a_bumped_suffix_is_a_new_run(tmp_path):
    (job,) = _kustomize(GITOPS)
    assert job["metadata"]["name"] == "llada-v-purify-r1"
    assert schema_errors(job) == [] and cel_refusals(job) == []
    check_static(parse_job(job | {"metadata": job["metadata"] | {"uid": "u1"}}))
    # The re-run commit: another parameter and the next suffix.
    bumped = tmp_path / "gitops"
    bumped.mkdir()
    kustomization = yaml.safe_load((GITOPS / "kustomization.yaml").read_text()) | {"nameSuffix": "-r2"}
    (bumped / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    changed = yaml.safe_load((GITOPS / "purificationjob.yaml").read_text())
    changed["spec"]["finetune"]["epochs"] = 8
    (bumped / "purificationjob.yaml").write_text(yaml.safe_dump(changed))
    (rerun,) = _kustomize(bumped)
    first = parse_job(job | {"metadata": job["metadata"] | {"uid": "u1"}})
    second = parse_job(rerun | {"metadata": rerun["metadata"] | {"uid": "u2"}})
    assert second.metadata.name == "llada-v-purify-r2" and second.run_uri() != first.run_uri()
    assert cel_refusals(rerun) == []  # a new object: no oldSelf, nothing to be immutable against


# -- health, as Argo CD (the chart's Lua script) and kstatus (Flux) read it --------------------------

def argocd_health(obj: dict) -> str:
    from lupa.lua51 import LuaRuntime  # Argo CD runs gopher-lua, a Lua 5.1

    lua = LuaRuntime(unpack_returned_tuples=True)
    check = lua.eval(f"function(obj) {(CHART / 'files' / 'argocd-health.lua').read_text()} end")
    return check(lua.table_from(json.loads(json.dumps(obj)), recursive=True))["status"]


def kstatus(obj: dict) -> str:
    """kstatus' reading of a custom resource (sigs.k8s.io/cli-utils/pkg/kstatus, its documented
    rules for resources with standard conditions): InProgress while the controller has not observed
    the generation or while Reconciling is True, Failed while Stalled is True, Current otherwise."""
    status = obj.get("status") or {}
    if status.get("observedGeneration", 0) < obj["metadata"]["generation"]:
        return "InProgress"
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    if conditions.get("Reconciling") == "True":
        return "InProgress"
    if conditions.get("Stalled") == "True":
        return "Failed"
    return "Current"


def _obj(status: PurificationJobStatus, generation: int, name: str = "purify") -> dict:
    return {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob",
            "metadata": {"name": name, "generation": generation}, "status": status.to_wire()}


def test_argocd_and_flux_read_a_run_a_suspension_a_failure_and_a_re_run():
    job = make_job(policy={"backoffLimit": 0})
    seen = []
    running = run_to(job, StageName.RELABEL)
    seen.append(("running", _obj(running.status, 1), "Progressing", "InProgress"))
    # Git sets suspend: the spec's generation moves before the operator has acted on it.
    seen.append(("suspend not yet observed", _obj(running.status, 2), "Progressing", "InProgress"))
    suspended = step(make_job(policy={"backoffLimit": 0, "suspend": True}), running.status,
                     jobs=[k8s_job("purify-relabel")], generation=2)
    seen.append(("suspended", _obj(suspended.status, 2), "Suspended", "Current"))
    resumed = step(job, suspended.status, at=T0 + timedelta(minutes=5), generation=3)
    seen.append(("resumed", _obj(resumed.status, 3), "Progressing", "InProgress"))
    relabel = resumed.status.stage(StageName.RELABEL).job_name
    failed = step(job, resumed.status, at=T0 + timedelta(minutes=6), generation=3,
                  jobs=[k8s_job(relabel, "failed")], pods={relabel: [k8s_pod(f"{relabel}-x", 2, message="bad data")]})
    seen.append(("failed", _obj(failed.status, 3), "Degraded", "Failed"))
    # The re-run: the same spec under a new name, from scratch, to success.
    rerun = make_job(policy={"backoffLimit": 0})
    plan = run_to(rerun, StageName.FINETUNE)
    seen.append(("re-run running", _obj(plan.status, 1, "purify-r2"), "Progressing", "InProgress"))
    from disp_api import MetricsSummary

    done = step(rerun, plan.status, jobs=[k8s_job("purify-finetune", "succeeded")],
                metrics=MetricsSummary(estimated_poisoned_share=0.2, residual_rate=0.0))
    seen.append(("re-run succeeded", _obj(done.status, 1, "purify-r2"), "Healthy", "Current"))
    for case, obj, argo, flux in seen:
        assert (argocd_health(obj), kstatus(obj)) == (argo, flux), case
