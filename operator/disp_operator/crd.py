"""The PurificationJob CustomResourceDefinition, generated from the typed spec and status in
disp_api so the two cannot drift apart (tests/operator/test_crd.py fails when the YAML in crds/ is
stale). Regenerate both copies (crds/ and the chart's files/) with `make crd`.

Pydantic writes JSON Schema (2020-12); the API server wants a *structural* OpenAPI v3 schema:
references inlined, no `anyOf` for optional fields, tuples as bounded arrays, boolean
`exclusiveMinimum`, and object defaults spelled `{}` so the server fills in nested defaults."""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml
from pydantic import BaseModel

from disp_api import PurificationJobSpec
from disp_api.contract import UNSAFE_URI_MESSAGE, unsafe_uri_cel
from disp_api.spec import API_GROUP, API_VERSION, KIND, PolicySpec
from disp_api.status import PurificationJobStatus
from disp_operator.naming import PLURAL
from disp_operator.validation import S3_URI_FIELDS, S3_URI_REASON

SHORT_NAMES = ["pj"]
CATEGORIES = ["disp", "all-disp"]
MUTABLE_POLICY_FIELDS = {"suspend"}  # may change at any time
# May change while the job is suspended (as Kueue and batch schedulers expect of a suspended
# workload): where and with what the stage pods run, never what they compute.
SCHEDULING_FIELDS = {"resources", "podTemplate"}


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


def reflow(text: str) -> str:
    """A docstring's lines joined into paragraphs: `kubectl explain` wraps descriptions to the
    terminal itself, so a source line break would show as a break in mid-sentence. Blank lines
    (paragraphs) and lines that start a list item stay breaks."""
    return re.sub(r"(?<=\S)\n(?![\n\-*])\s*", " ", text.strip())


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_structural(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    node.pop("$defs", None)
    node.pop("title", None)
    if "$ref" in node:  # inline; the field's own keys (description, default) win over the definition's
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**_structural(target, defs), **_structural(node, defs)}
    if "anyOf" in node:  # Optional[X] is X; the API server prunes explicit nulls before validating
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"unions other than Optional[X] have no structural schema: {options}")
        rest = {k: v for k, v in node.items() if k != "default" or v is not None}
        node = {**_structural(options[0], defs), **_structural(rest, defs)}
    if node.get("default", 0) is None:
        node.pop("default")
    if isinstance(node.get("description"), str):
        node["description"] = reflow(node["description"])
    if "prefixItems" in node:  # fixed-length tuples of one type, e.g. an RGB colour
        items = node.pop("prefixItems")
        node["items"] = _structural(items[0], defs)
        node["minItems"] = node["maxItems"] = len(items)
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node[bound]
            node[bound] = True
    if "properties" in node and node.get("additionalProperties") is False:
        # Structural schemas may not combine the two; unknown fields are refused instead by the API
        # server's strict field validation (kubectl's default) and by the typed spec in the operator.
        del node["additionalProperties"]
    if node.get("x-kubernetes-preserve-unknown-fields"):  # free-form (a pod's affinity): no schema for its fields
        node.pop("additionalProperties", None)
    if node.get("type") == "object" and isinstance(node.get("default"), dict) and "properties" in node:
        node["default"] = {}  # nested defaults are filled in by the server, field by field
    result = {}
    for key, value in node.items():
        if key == "properties":
            result[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            result[key] = _structural(value, defs)
        else:
            result[key] = value
    return result


def _immutable_rule() -> dict[str, str]:
    """CEL: every spec field keeps its value on update, except spec.policy.suspend, and the
    scheduling fields while the job is (and stays) suspended."""
    def same(path: str, optional: bool) -> str:
        if optional:
            return (f"(has(self.{path}) == has(oldSelf.{path})) && "
                    f"(!has(self.{path}) || self.{path} == oldSelf.{path})")
        return f"self.{path} == oldSelf.{path}"

    clauses = []
    for name, info in PurificationJobSpec.model_fields.items():
        alias = info.alias or name
        if alias == "policy":
            for sub, sub_info in PolicySpec.model_fields.items():
                sub_alias = sub_info.alias or sub
                if sub_alias not in MUTABLE_POLICY_FIELDS:
                    clauses.append(same(f"policy.{sub_alias}", sub_info.default is None))
        elif alias in SCHEDULING_FIELDS:
            clauses.append(f"((oldSelf.policy.suspend && self.policy.suspend) || "
                           f"{same(alias, not info.is_required() and info.default is None)})")
        else:
            clauses.append(same(alias, not info.is_required() and info.default is None))
    return {"rule": " && ".join(clauses), "message": IMMUTABLE_MESSAGE}


# What a GitOps sync that changed a parameter reads: why, and how to run again (docs/deploy.md, "Re-running
# from Git").
IMMUTABLE_MESSAGE = ("spec is immutable once created, except spec.policy.suspend, and spec.resources and "
                     "spec.podTemplate while the job is suspended; to run again with other settings, apply the "
                     "job under a new name (e.g. bump kustomize's nameSuffix in the same commit): a new run, "
                     "while this one stays as its record")


def _cluster_rules() -> list[dict[str, str]]:
    """CEL for what a cluster needs beyond the typed spec (the operator's check_static checks the
    same): every URI on S3, and a storage section that says how to reach it."""
    rules = []
    for path in S3_URI_FIELDS:
        parts = path.split(".")
        guards = [f"!has(self.{'.'.join(parts[:i + 1])})" for i in range(len(parts))]
        rules.append({"rule": " || ".join(guards + [f"self.{path}.startsWith('s3://')"]),
                      "message": f"{path}: must be an s3://BUCKET/PREFIX URI ({S3_URI_REASON})"})
        rules.append({"rule": " || ".join(guards + [f"!({unsafe_uri_cel('self.' + path)})"]),
                      "message": f"{path}: {UNSAFE_URI_MESSAGE}"})
    rules.append({"rule": "!has(self.storage) || (has(self.storage.endpoint) && has(self.storage.credentialsSecret))",
                  "message": "storage: endpoint and credentialsSecret are both required (the S3/MinIO endpoint "
                             "and the Secret with its keys)"})
    return rules


# Stage Jobs, pods and labels are named after the job: its name must be a DNS label (63 characters),
# although Kubernetes allows 253 for a custom resource.
NAME_RULE = {"rule": "size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')",
             "message": "metadata.name: must be a DNS label: lower-case letters, digits and '-', at most 63 characters "
                        "(stage Jobs and their pods are named after it)"}


def build_crd() -> dict[str, Any]:
    spec_schema = openapi_schema(PurificationJobSpec)
    spec_schema["description"] = ("What to purify and how; immutable once created except policy.suspend (and "
                                  "resources and podTemplate while suspended).")
    spec_schema["x-kubernetes-validations"] = [_immutable_rule(), *_cluster_rules()]
    status_schema = openapi_schema(PurificationJobStatus)
    status_schema["description"] = "Written by the operator."
    # Merged by key, as kstatus expects; a stage runs once per purification round.
    for field, keys in (("conditions", ["type"]), ("stages", ["name", "round"]), ("rounds", ["round"])):
        status_schema["properties"][field].update({"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": keys})
    columns = [
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Stage", "type": "string", "jsonPath": ".status.progress.currentStage"},
        {"name": "Round", "type": "integer", "jsonPath": ".status.progress.currentRound",
         "description": "The purification round the running stage belongs to (spec.rounds)", "priority": 1},
        {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent",
         "description": "Percent of the stages done"},
        {"name": "ASR-Before", "type": "number", "jsonPath": ".status.metrics.asrBefore"},
        {"name": "ASR-After", "type": "number", "jsonPath": ".status.metrics.asrAfter"},
        {"name": "Suspects", "type": "number", "jsonPath": ".status.metrics.estimatedPoisonedShare",
         "description": "Share of the training data the audit finds carried by a few visual tokens"},
        {"name": "Residual", "type": "number", "jsonPath": ".status.metrics.residualRate",
         "description": "How often the purified model still answers a suspect as the compromised one did"},
        {"name": "Removed", "type": "string", "jsonPath": '.status.conditions[?(@.type=="BackdoorRemoved")].status',
         "description": "The audit's verdict: False when the residual rate is above spec.audit.residualThreshold"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}", "labels": {"app.kubernetes.io/part-of": "disp-operator"}},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {"kind": KIND, "listKind": f"{KIND}List", "plural": PLURAL, "singular": KIND.lower(),
                      "shortNames": SHORT_NAMES, "categories": CATEGORIES},
            "versions": [{
                "name": API_VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": "Removes a backdoor from a multimodal diffusion language model with DiSP.",
                    "required": ["spec"],
                    "x-kubernetes-validations": [NAME_RULE],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec_schema,
                        "status": status_schema,
                    },
                }},
            }],
        },
    }


def render() -> str:
    header = "# Generated by `make crd` (python -m disp_operator.crd) from the typed spec in api/disp_api; do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render())
