"""The CRD: generated from the typed spec (no drift), structural, accepting its examples and
refusing malformed manifests together with the operator's own validation."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from disp_operator.crd import build_crd, render
from disp_operator.validation import ConfigProblem, ClusterFacts, InvalidSpec, check_cluster, check_static, parse_job
from tests.operator.conftest import job_body

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "purificationjobs.disp.dev.yaml"
EXAMPLES = sorted((ROOT / "crds" / "examples").glob("*.yaml"))


def _strict(schema: Any) -> Any:
    """The API server's strict field validation (kubectl's default) refuses unknown fields; the
    structural schema cannot say so itself, so the test adds it."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def crd_schema() -> dict:
    crd = yaml.safe_load(CRD_FILE.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def schema_errors(manifest: dict) -> list[str]:
    schema = _strict(copy.deepcopy(crd_schema()))
    schema["properties"]["metadata"] = {"type": "object"}
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI v3.0: boolean exclusiveMinimum
    return [".".join(str(p) for p in e.absolute_path) + ": " + e.message for e in validator.iter_errors(manifest)]


def test_the_crd_file_is_what_the_typed_spec_generates():
    assert CRD_FILE.read_text() == render(), "stale CRD: run `make crd`"


def test_the_crd_names_printer_columns_and_status_subresource():
    version = build_crd()["spec"]["versions"][0]
    names = build_crd()["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("PurificationJob", "purificationjobs", ["pj"])
    assert names["categories"]
    assert version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == \
        ["Phase", "Stage", "Round", "Progress", "ASR-Before", "ASR-After", "Suspects", "Residual", "Removed", "Age"]


def _walk(schema: dict, path: str = ""):
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}{{}}")


def test_the_schema_is_structural_and_documented():
    for path, node in _walk(crd_schema()):
        assert "type" in node, f"{path}: every node needs a type"
        assert not {"anyOf", "oneOf", "$ref", "prefixItems"} & set(node), f"{path}: not structural"
        assert not ("properties" in node and "additionalProperties" in node), f"{path}: not structural"
        if path.startswith(".spec.") and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path}: every spec field has a description"


def test_defaults_and_bounds_come_from_the_method():
    spec = crd_schema()["properties"]["spec"]["properties"]
    assert spec["saliency"]["properties"]["topK"]["default"] == 5
    assert spec["saliency"]["properties"]["probes"]["default"] == 6
    ratio = spec["masking"]["properties"]["ratio"]
    assert (ratio["default"], ratio["maximum"], ratio["minimum"], ratio["exclusiveMinimum"]) == (0.3, 1.0, 0.0, True)
    assert spec["finetune"]["properties"]["trainable"]["enum"] == ["projector", "projector-and-lm", "all"]
    assert spec["saliency"]["default"] == {}  # nested defaults are filled in field by field


def test_the_spec_is_immutable_except_suspend():
    rule = crd_schema()["properties"]["spec"]["x-kubernetes-validations"][0]["rule"]
    assert "self.model == oldSelf.model" in rule and "self.policy.backoffLimit == oldSelf.policy.backoffLimit" in rule
    assert "self.policy.suspend == oldSelf.policy.suspend" not in rule


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_schema_and_the_operator(example: Path):
    manifest = yaml.safe_load(example.read_text())
    assert schema_errors(manifest) == []
    check_static(parse_job(manifest | {"metadata": manifest["metadata"] | {"uid": "u"}}))


# Each malformed manifest, and a word the error must contain (the field at fault).
def _without(*path: str) -> dict:
    body = job_body()
    node = body
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    return body


SAFE_MODEL = ("config.json", "model.safetensors", "tokenizer.json")
SECRET = frozenset({"accessKey", "secretKey"})

BAD_MANIFESTS = [
    ("missing model", _without("spec", "model"), "model"),
    ("missing dataset uri", job_body(dataset={}), "uri"),
    ("missing output", _without("spec", "output"), "output"),
    ("topK not a number", job_body(saliency={"topK": "five"}), "topK"),
    ("topK below 2", job_body(saliency={"topK": 1}), "topK"),
    ("zero probes", job_body(saliency={"probes": 0}), "probes"),
    ("negative batch size", job_body(relabel={"batchSize": -4}), "batchSize"),
    ("rho above 1", job_body(masking={"ratio": 1.5}), "ratio"),
    ("rho zero", job_body(masking={"ratio": 0}), "ratio"),
    ("unknown field", job_body(saliency={"topk": 5}), "topk"),
    ("unknown top-level field", job_body(extra={"a": 1}), "extra"),
    ("unknown trainable parts", job_body(finetune={"trainable": "vision"}), "trainable"),
    ("negative GPUs", job_body(resources={"gpus": -1}), "gpus"),
    ("bad memory quantity", job_body(resources={"memory": "lots"}), "memory"),
    ("zero shards", job_body(parallelism={"saliencyShards": 0}), "saliencyShards"),
    ("zero fine-tune nodes", job_body(parallelism={"finetuneNodes": 0}), "finetuneNodes"),
    ("too many fine-tune nodes", job_body(parallelism={"finetuneNodes": 65}), "finetuneNodes"),
    ("negative stage GPUs", job_body(resources={"stages": {"finetune": {"gpus": -2}}}), "gpus"),
    ("unknown stage", job_body(resources={"stages": {"train": {"gpus": 2}}}), "train"),
    ("pod security context", job_body(podTemplate={"spec": {"securityContext": {"runAsUser": 0}}}),
     "securityContext"),
    ("privileged container", job_body(podTemplate={"spec": {"containers": [{"name": "runner",
                                                                            "securityContext": {"privileged": True}}]}}),
     "containers"),
    ("service account token", job_body(podTemplate={"spec": {"automountServiceAccountToken": True}}),
     "automountServiceAccountToken"),
    ("service account", job_body(podTemplate={"spec": {"serviceAccountName": "admin"}}), "serviceAccountName"),
    ("host network", job_body(podTemplate={"spec": {"hostNetwork": True}}), "hostNetwork"),
    ("extra volumes", job_body(podTemplate={"spec": {"volumes": [{"name": "h", "hostPath": {"path": "/"}}]}}),
     "volumes"),
    ("operator's own label", job_body(podTemplate={"metadata": {"labels": {"disp.dev/stage": "x"}}}), "labels"),
    ("unconfined AppArmor annotation", job_body(podTemplate={"metadata": {"annotations": {
        "container.apparmor.security.beta.kubernetes.io/runner": "unconfined"}}}), "annotations"),
    ("negative backoff limit", job_body(policy={"backoffLimit": -1}), "backoffLimit"),
    ("gen length not a block multiple", job_body(relabel={"decoding": {"genLength": 30, "blockLength": 8}}),
     "genLength"),
    ("model uri not on S3", job_body(model={"uri": "/data/model"}), "spec.model.uri"),
    ("bad scheme", job_body(dataset={"uri": "gs://bucket/train"}), "spec.dataset.uri"),
    ("bucket name invalid", job_body(output={"uri": "s3://Runs_Bucket/x"}), "spec.output.uri"),
    ("no endpoint", job_body(storage={"credentialsSecret": {"name": "minio"}}), "spec.storage.endpoint"),
    ("no credentials secret", job_body(storage={"endpoint": "minio:9000"}), "spec.storage.credentialsSecret"),
    ("secret does not exist", job_body(), "does not exist"),
    ("secret lacks the key", job_body(storage={"endpoint": "m:9000", "credentialsSecret": {
        "name": "minio", "secretKeyKey": "password"}}), "secretKeyKey"),
    ("pickle weights without opt-in", job_body(), "allowUnsafePickle"),
    ("unsupported model format", job_body(), "unsupported weight format"),
    ("no model at the uri", job_body(), "no model"),
    ("shards without an index", job_body(), "2 safetensors shards but no model.safetensors.index.json"),
    ("unsupported model family", job_body(), "model_type is 'mmada'; supported: disp_mdlm, llava_llada"),
    ("config that is not an object", job_body(), "config.json: expected a JSON object, got list"),
    ("signing secret does not exist", job_body(provenance={"signingKeySecret": {"name": "signer"}}),
     "spec.provenance.signingKeySecret.name: Secret 'signer' does not exist in namespace 'team'"),
]
FACTS = {
    "secret does not exist": ClusterFacts(secret_keys=None, model_files=SAFE_MODEL),
    "pickle weights without opt-in": ClusterFacts(SECRET, ("config.json", "pytorch_model.bin")),
    "unsupported model format": ClusterFacts(SECRET, ("config.json", "model.gguf")),
    "no model at the uri": ClusterFacts(SECRET, ()),
    "shards without an index": ClusterFacts(SECRET, ("config.json", "model-00001-of-00002.safetensors",
                                                     "model-00002-of-00002.safetensors")),
    "unsupported model family": ClusterFacts(SECRET, SAFE_MODEL, model_type="mmada"),
    "signing secret does not exist": ClusterFacts(SECRET, SAFE_MODEL, signing_secret_exists=False),
    "config that is not an object": ClusterFacts(SECRET, SAFE_MODEL,
                                                 model_type=ConfigProblem("expected a JSON object, got list")),
}


def admit(manifest: dict, facts: ClusterFacts) -> str:
    """What happens to a manifest: the schema check's error, or the operator's InvalidSpec, or ''."""
    errors = schema_errors(manifest)
    if errors:
        return "schema: " + "; ".join(errors)
    try:
        job = parse_job(manifest)
        check_static(job)
        check_cluster(job, facts)
    except InvalidSpec as exc:
        return "InvalidSpec: " + str(exc)
    return ""


@pytest.mark.parametrize("case, manifest, field", BAD_MANIFESTS, ids=[c[0] for c in BAD_MANIFESTS])
def test_malformed_manifests_are_refused_naming_the_field(case, manifest, field):
    outcome = admit(manifest, FACTS.get(case, ClusterFacts(SECRET, SAFE_MODEL)))
    assert outcome, f"{case}: accepted"
    assert field in outcome, outcome


def test_the_operator_alone_refuses_them_too():
    """kubectl may skip the schema (an old server, --validate=false): the operator's typed check is
    the last line, and it names the field too."""
    refused = 0
    for case, manifest, field in BAD_MANIFESTS:
        try:
            job = parse_job(manifest)
            check_static(job)
            check_cluster(job, FACTS.get(case, ClusterFacts(SECRET, SAFE_MODEL)))
        except InvalidSpec as exc:
            assert field in str(exc), (case, str(exc))
            refused += 1
    assert refused == len(BAD_MANIFESTS)


def test_pickle_weights_pass_with_the_opt_in():
    job = parse_job(job_body(model={"uri": "s3://models/m", "allowUnsafePickle": True}))
    check_cluster(job, ClusterFacts(SECRET, ("config.json", "pytorch_model.bin")))


def _defaulted(spec: dict) -> dict:
    """The spec as the API server stores it: defaults filled in, nulls pruned."""
    from disp_api import PurificationJobSpec

    return PurificationJobSpec.model_validate(spec).model_dump(mode="json", by_alias=True, exclude_none=True)


SUSPENDED = {"policy": {"suspend": True}}


@pytest.mark.parametrize("case, old_change, change, allowed", [
    ("no change", {}, {}, True),
    ("suspend", {}, {"policy": {"suspend": True}}, True),
    ("model uri", {}, {"model": {"uri": "s3://models/other"}}, False),
    ("masking ratio", {}, {"masking": {"ratio": 0.5}}, False),
    ("evaluation added", {}, {"evaluation": {"attack": {"target": {"kind": "insertion"}}, "triggeredUri": "s3://eval/t"}},
     False),
    ("backoff limit", {}, {"policy": {"backoffLimit": 9}}, False),
    ("deadline added", {}, {"policy": {"activeDeadlineSeconds": 60}}, False),
    ("resources of a running job", {}, {"resources": {"memory": "64Gi"}}, False),
    ("resources while suspended", SUSPENDED, {"resources": {"memory": "64Gi", "stages": {"finetune": {"gpus": 8}}},
                                              "policy": {"suspend": True}}, True),
    ("pod template while suspended", SUSPENDED, {"podTemplate": {"metadata": {"labels": {"team": "a"}}},
                                                 "policy": {"suspend": True}}, True),
    ("resources and resume in one edit", SUSPENDED, {"resources": {"memory": "64Gi"}, "policy": {"suspend": False}},
     False),
    ("model while suspended", SUSPENDED, {"model": {"uri": "s3://models/other"}, "policy": {"suspend": True}}, False),
])
def test_the_cel_rule_allows_suspend_and_scheduling_while_suspended(case, old_change, change, allowed):
    import celpy  # the CEL the API server evaluates (cel-python implements the same language)

    rule = crd_schema()["properties"]["spec"]["x-kubernetes-validations"][0]["rule"]
    old_spec = job_body()["spec"]
    for key, value in old_change.items():
        old_spec[key] = {**old_spec.get(key, {}), **value}
    new_spec = copy.deepcopy(old_spec)
    for key, value in change.items():
        new_spec[key] = {**new_spec.get(key, {}), **value} if isinstance(value, dict) else value
    env = celpy.Environment()
    program = env.program(env.compile(rule))
    verdict = program.evaluate({"self": celpy.json_to_cel(_defaulted(new_spec)),
                                "oldSelf": celpy.json_to_cel(_defaulted(old_spec))})
    assert bool(verdict) is allowed


@pytest.mark.parametrize("key, allowed", [
    ("team", True), ("example.com/cost-centre", True), ("disp.dev/stage", False), ("job-name", False),
    ("batch.kubernetes.io/job-name", False), ("kueue.x-k8s.io/queue-name", False),
    ("container.apparmor.security.beta.kubernetes.io/runner", False)])
def test_the_api_server_refuses_reserved_pod_label_and_annotation_keys(key, allowed):
    """The pod template's reserved keys are refused by CEL at apply time, as by the typed spec."""
    import celpy

    overlay = crd_schema()["properties"]["spec"]["properties"]["podTemplate"]["properties"]["metadata"]
    env = celpy.Environment()
    for field in ("labels", "annotations"):
        rule = overlay["properties"][field]["x-kubernetes-validations"][0]["rule"]
        verdict = env.program(env.compile(rule)).evaluate({"self": celpy.json_to_cel({key: "v"})})
        assert bool(verdict) is allowed, (field, key)


# -- CEL: what `kubectl apply` (and an Argo CD or Flux sync) refuses, as the API server would -------

def _with_defaults(schema: dict, value: Any) -> Any:
    """Structural defaulting, as the API server does before validating: a missing property with a
    default gets it (and the default is defaulted in turn)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = _with_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [_with_defaults(schema["items"], item) for item in value]
    return value


def cel_refusals(manifest: dict) -> list[str]:
    """Every CEL rule of the CRD evaluated where the API server would (each object the schema puts
    one on), on the defaulted manifest; create-time only (rules on oldSelf are updates' business).
    Returns '<path>: <message>' for each rule that fails."""
    import celpy

    env = celpy.Environment()
    schema = crd_schema()
    manifest = _with_defaults(schema, copy.deepcopy(manifest))
    failures = []

    def walk(node: dict, value: Any, path: str) -> None:
        if value is None:
            return
        for rule in node.get("x-kubernetes-validations", []):
            if "oldSelf" in rule["rule"]:
                continue
            if not bool(env.program(env.compile(rule["rule"])).evaluate({"self": celpy.json_to_cel(value)})):
                failures.append(f"{path}: {rule['message']}")
        if isinstance(value, dict):
            for name, sub in node.get("properties", {}).items():
                walk(sub, value.get(name), f"{path}.{name}".lstrip("."))
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for i, item in enumerate(value):
                walk(node["items"], item, f"{path}[{i}]")

    walk(schema, manifest, "")
    return failures


def _evaluation(**fields) -> dict:
    return {"attack": {"target": {"kind": "insertion"}}, "triggeredUri": "s3://eval/triggered", **fields}


def _attack(trigger=None, target=None) -> dict:
    return {"attack": {"trigger": trigger or {}, "target": target or {"kind": "insertion"}},
            "triggeredUri": "s3://eval/triggered"}


# (case, manifest, the field the refusal names, refused by `disp run` too). The typed spec's
# cross-field rules are `disp run`'s as well; the S3 and storage rules are a cluster's (the operator
# checks them too), since `disp run` on one machine reads local folders.
CEL_REFUSED = [
    ("relabel genLength not a multiple of blockLength",
     job_body(relabel={"decoding": {"genLength": 30, "blockLength": 8}}), "genLength", True),
    ("relabel steps not a multiple of the blocks",
     job_body(relabel={"decoding": {"genLength": 32, "blockLength": 8, "steps": 6}}), "steps", True),
    ("evaluation genLength not a multiple of blockLength",
     job_body(evaluation=_evaluation(decoding={"genLength": 20, "blockLength": 16})), "genLength", True),
    ("cache refresh without a cache",
     job_body(relabel={"decoding": {"cacheRefreshSteps": 4}}), "cacheRefreshSteps", True),
    ("inpainting without painting pixels", job_body(masking={"fill": "inpaint"}), "fill", True),
    ("inpainting while masking tokens", job_body(masking={"fill": "inpaint", "space": "tokens"}), "fill", True),
    ("evaluation with both attack and attackUri", job_body(evaluation=_evaluation(attackUri="s3://attacks/attack")),
     "attackUri", True),
    ("evaluation with neither attack nor attackUri", job_body(evaluation={"triggeredUri": "s3://eval/t"}),
     "attackUri", True),
    ("trigger colour out of range", job_body(evaluation=_attack(trigger={"colour": [0, 300, 0]})), "colour", True),
    ("negative trigger position", job_body(evaluation=_attack(trigger={"position": [-1, 4]})), "position", True),
    ("blended trigger positioned without a pattern",
     job_body(evaluation=_attack(trigger={"kind": "blended", "position": [4, 4]})), "position", True),
    ("sig trigger given a position", job_body(evaluation=_attack(trigger={"kind": "sig", "position": [4, 4]})),
     "sig trigger", True),
    ("misclassification onto its own class",
     job_body(evaluation=_attack(target={"kind": "misclassification", "sourceClass": "circle",
                                         "targetClass": "circle"})), "targetClass", True),
    ("model uri not on S3", job_body(model={"uri": "/data/model"}), "model.uri", False),
    ("projector uri not on S3", job_body(model={"uri": "s3://models/m", "projectorUri": "https://x/p.bin"}),
     "model.projectorUri", False),
    ("dataset uri not on S3", job_body(dataset={"uri": "gs://bucket/train"}), "dataset.uri", False),
    ("output uri not on S3", job_body(output={"uri": "file:///runs"}), "output.uri", False),
    ("triggered set not on S3", job_body(evaluation=_evaluation(triggeredUri="/eval/t")), "evaluation.triggeredUri",
     False),
    ("clean set not on S3", job_body(evaluation=_evaluation(cleanUri="/eval/c")), "evaluation.cleanUri", False),
    ("storage without credentials", job_body(storage={"endpoint": "minio:9000"}), "credentialsSecret", False),
    ("reserved pod label", job_body(podTemplate={"metadata": {"labels": {"disp.dev/stage": "x"}}}), "labels", True),
    ("dataset key leaving its prefix", job_body(dataset={"uri": "s3://data/train/../../../etc"}), "dataset.uri", True),
    ("projector key ending in '..'", job_body(model={"uri": "s3://models/m", "projectorUri": "s3://models/a/.."}),
     "model.projectorUri", True),
    ("output with a $VARIABLE", job_body(output={"uri": "s3://runs/$USER"}), "output.uri", True),
    ("attack folder key with a '.' segment", job_body(evaluation={
        "attackUri": "s3://attacks/./a", "triggeredUri": "s3://eval/triggered"}),
     "evaluation.attackUri", True),
]


def _long_name() -> dict:
    body = job_body()
    body["metadata"]["name"] = "a" * 64
    return body


CEL_REFUSED.append(("name longer than a DNS label", _long_name(), "metadata.name", True))


@pytest.mark.parametrize("case, manifest, field, by_disp_run", CEL_REFUSED, ids=[c[0] for c in CEL_REFUSED])
def test_the_api_server_refuses_at_apply_what_disp_run_and_the_operator_refuse(case, manifest, field, by_disp_run,
                                                                               tmp_path):
    from disp_runner.errors import UserInputError
    from disp_runner.jobfile import load_job

    refusals = cel_refusals(manifest)
    assert refusals and all(field in r for r in refusals), (case, refusals)  # the message names the field
    assert schema_errors(manifest) == [], "refused by CEL, not by a plain schema check"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in manifest.items() if k != "status"}))
    if by_disp_run:  # the same spec, the same meaning, where `disp run` reads it
        with pytest.raises(UserInputError, match=field.split(".")[-1]):
            load_job(path)
    else:  # a cluster's rule: the operator's own check says the same
        with pytest.raises(InvalidSpec, match=field.split(".")[-1]):
            check_static(parse_job(manifest))


def test_the_generated_cel_rules_accept_every_example_and_a_valid_spec():
    assert cel_refusals(job_body()) == []
    assert cel_refusals(job_body(masking={"space": "pixels", "fill": "inpaint"})) == []
    assert cel_refusals(job_body(evaluation=_attack(trigger={"kind": "blended"}, target={
        "kind": "misclassification", "sourceClass": "circle", "targetClass": "square"}))) == []
    for example in EXAMPLES:
        assert cel_refusals(yaml.safe_load(example.read_text())) == [], example.name


def test_the_cluster_can_forbid_pickle_and_fence_credentials_by_namespace():
    from disp_operator.validation import check_policy

    pickled = parse_job(job_body(model={"uri": "s3://models/m", "allowUnsafePickle": True}))
    check_policy(pickled, None, forbid_unsafe_pickle=False)  # the job's own opt-in is enough by default
    with pytest.raises(InvalidSpec, match=r"spec.model.allowUnsafePickle: this cluster refuses pickle"):
        check_policy(pickled, None, forbid_unsafe_pickle=True)
    job = parse_job(job_body())  # namespace "team"
    check_policy(job, frozenset({"team", "other"}), forbid_unsafe_pickle=False)
    with pytest.raises(InvalidSpec, match=r"may not read Secrets in namespace 'team' .*in: other\); ask"):
        check_policy(job, frozenset({"other"}), forbid_unsafe_pickle=False)
    with pytest.raises(InvalidSpec, match="in: no namespace"):
        check_policy(job, frozenset(), forbid_unsafe_pickle=False)


@pytest.mark.parametrize("endpoint, allowed", [
    ("minio.minio.svc:9000", True),
    ("MINIO.minio.svc:9000", True),  # hosts compare case-insensitively
    ("minio.minio.svc:9001", False),  # the pattern names its port
    ("store.s3.example", True), ("store.s3.example:443", True),  # no port in the pattern: any
    ("s3.example", False),  # "*.s3.example" needs a subdomain
    ("10.0.0.12:9000", False), ("kubernetes.default.svc:443", False), ("169.254.169.254", False),
])
def test_the_cluster_can_fence_the_storage_endpoints_jobs_may_name(endpoint, allowed):
    from disp_operator.validation import check_policy

    job = parse_job(job_body(storage={"endpoint": endpoint, "credentialsSecret": {"name": "minio"}}))
    fence = ("minio.minio.svc:9000", "*.s3.example")
    check_policy(job, None, forbid_unsafe_pickle=False)  # no fence: any endpoint
    if allowed:
        check_policy(job, None, forbid_unsafe_pickle=False, allowed_endpoints=fence)
    else:
        with pytest.raises(InvalidSpec, match=r"^spec.storage.endpoint: .* is not an S3 endpoint this cluster "
                                              r"allows \(storage.allowedEndpoints: minio.minio.svc:9000, \*.s3.example\)"):
            check_policy(job, None, forbid_unsafe_pickle=False, allowed_endpoints=fence)
