"""The PurificationJob spec: the method's defaults, strictness, and the README's example."""

import re
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from disp_api import PurificationJob, PurificationJobSpec, StageName, TrainableParts

MINIMAL = {"model": {"uri": "m"}, "dataset": {"uri": "d"}, "output": {"uri": "o"}}


def test_defaults_are_the_methods():
    spec = PurificationJobSpec.model_validate(MINIMAL)
    assert (spec.saliency.top_k, spec.saliency.probes) == (5, 6)
    assert spec.masking.ratio == 0.3
    d = spec.relabel.decoding
    # left to the model (its own generation length; the authors' 32/32/32 for one without it)
    assert (d.steps, d.gen_length, d.block_length, d.temperature, spec.relabel.seed) == (None, None, None, 0.0, 1234)
    from disp_runner.diffusion.decoding import DecodingConfig
    assert DecodingConfig.for_model(d, None, "spec.relabel.decoding") == DecodingConfig(32, 32, 32, 0.0)
    assert DecodingConfig.for_model(d, 16, "spec.relabel.decoding") == DecodingConfig(16, 16, 16, 0.0)
    assert spec.relabel.prompt is None  # each instance's own prompt
    f = spec.finetune
    assert (f.epochs, f.learning_rate, f.warmup_ratio, f.weight_decay, f.batch_size) == (4, 1e-4, 0.03, 0.0, 32)
    assert f.trainable is TrainableParts.PROJECTOR
    assert spec.model.allow_unsafe_pickle is False
    assert spec.stages() == [StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE]


@pytest.mark.parametrize("patch,field", [
    ({"masking": {"ratio": 0}}, "masking.ratio"),
    ({"masking": {"ratio": 1.01}}, "masking.ratio"),
    ({"saliency": {"probes": 0}}, "saliency.probes"),
    ({"saliency": {"topK": 1}}, "saliency.topK"),
    ({"relabel": {"decoding": {"genLength": 32, "blockLength": 5}}}, "relabel.decoding"),
    ({"parallelism": {"saliencyShards": 0}}, "parallelism.saliencyShards"),
    ({"finetune": {"trainable": "lm"}}, "finetune.trainable"),
    ({"finetune": {"learningRatio": 1e-3}}, "finetune.learningRatio"),
])
def test_invalid_values_name_their_field(patch, field):
    with pytest.raises(ValidationError) as info:
        PurificationJobSpec.model_validate({**MINIMAL, **patch})
    assert field in str(info.value)


def test_run_id_follows_the_spec_outside_a_cluster():
    def job(**spec):
        return PurificationJob.model_validate({"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob",
                                               "metadata": {"name": "a"}, "spec": {**MINIMAL, **spec}})
    assert job().run_id == job().run_id and job().run_id.startswith("local-")
    assert job(masking={"ratio": 0.2}).run_id != job().run_id
    with_uid = PurificationJob.model_validate({**job().model_dump(by_alias=True), "metadata": {"name": "a", "uid": "u1"}})
    assert with_uid.run_id == "u1"


def test_names_must_be_dns_labels():
    with pytest.raises(ValidationError, match="metadata.name"):
        PurificationJob.model_validate({"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob",
                                        "metadata": {"name": "My_Job"}, "spec": MINIMAL})


def test_the_documented_example_manifest_is_valid():
    page = (Path(__file__).resolve().parents[2] / "docs" / "method.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", page, re.S) if "kind: PurificationJob" in b)
    job = PurificationJob.model_validate(yaml.safe_load(block))
    assert job.spec.evaluation is not None and StageName.EVALUATE in job.spec.stages()


# Every URI field goes through one check (disp_api.contract.uri_problem); the CRD carries the same
# rule as a regular expression for the API server. The two must refuse the same URIs.
URI_CASES = [
    ("s3://bucket/models/m", True), ("s3://bucket/models/m/", True), ("s3://bucket", True), ("s3://bucket/", True),
    ("/data/model", True), ("./model", True), ("model", True), ("file:///data/m", True), ("/a/b..c/d", True),
    ("/a/..b", True), ("s3://bucket/a.b/c", True), ("s3://bucket/.hidden", True),
    ("s3://bucket/../../etc", False), ("s3://bucket/a/../b", False), ("s3://bucket/a/..", False),
    ("s3://bucket//etc", False), ("s3://bucket/a//b", False), ("s3://bucket/a/./b", False), ("s3://bucket/.", False),
    ("/data/../etc", False), ("../model", False), ("file://../m", False), ("~/model", False), ("~", False), ("file://~/m", False), ("/data/~x", True),
    ("$HOME/model", False), ("/data/${USER}/m", False), ("s3://bucket/$X/m", False), ("/data/a$b", False),
    ("file://..", False), ("..", False), ("s3://bucket/a//", False), ("s3://bucket/a/", True),
]


@pytest.mark.parametrize("uri, allowed", URI_CASES)
def test_one_uri_rule_for_the_spec_and_the_api_server(uri, allowed):
    import celpy

    from disp_api.contract import unsafe_uri_cel, uri_problem
    assert (uri_problem(uri) is None) == allowed, uri_problem(uri)
    env = celpy.Environment()  # the CRD's rule, evaluated as the API server would
    refused = env.program(env.compile(unsafe_uri_cel("self"))).evaluate({"self": celpy.json_to_cel(uri)})
    # The server leaves empty segments in an s3:// key to the operator (a regular expression would
    # cost too much of the CRD's budget): every other refusal is the server's too.
    left_to_the_operator = uri.startswith("s3://") and "//" in uri[len("s3://"):]
    assert bool(refused) == (not allowed and not left_to_the_operator)


@pytest.mark.parametrize("uri, reason", [("s3://Bucket_1/x", "not a valid bucket name"), ("s3:///x", "names no bucket"),
                                         ("gs://b/x", "unsupported scheme"), ("/a\nb", "control character")])
def test_uris_the_api_server_leaves_to_the_operator_are_still_refused_by_the_spec(uri, reason):
    from disp_api.contract import uri_problem
    assert reason in uri_problem(uri)


def _authors(**spec):
    from tests.tiny import job_document
    document = job_document(Path("/data"), **spec)
    document["spec"]["profile"] = "authors"
    return PurificationJob.model_validate_json(__import__("json").dumps(document), strict=True).spec


def test_the_authors_profile_fills_their_settings_where_the_manifest_is_silent():
    from disp_api import EmptyAnswers, FinetuneLabels, ProbeDraws
    spec = _authors()
    assert spec.relabel.prompt == "Describe this image in detail."
    assert spec.relabel.decoding.stop_at_end and spec.evaluation.decoding.stop_at_end
    assert spec.saliency.probe_draws is ProbeDraws.SHARED
    assert spec.finetune.labels is FinetuneLabels.CHAT_TURNS and spec.finetune.group_by_length
    assert spec.relabel.empty_answers is EmptyAnswers.KEEP
    assert spec.relabel.batch_size == 4 and spec.relabel.decoding.gen_length == 16  # the rest as written
    # What the manifest sets wins; an evaluation without its own decoding keeps inheriting relabel's.
    mine = _authors(relabel={"prompt": "What is shown?", "decoding": {"stopAtEnd": False}},
                    saliency={"probeDraws": "independent"}, finetune={"labels": "padded-answer"})
    assert mine.relabel.prompt == "What is shown?" and not mine.relabel.decoding.stop_at_end
    assert mine.saliency.probe_draws is ProbeDraws.INDEPENDENT
    assert mine.finetune.labels is FinetuneLabels.PADDED_ANSWER and mine.finetune.group_by_length
    evaluation = _authors().evaluation.to_wire()
    evaluation.pop("decoding")
    assert _authors(evaluation=evaluation).evaluation.decoding is None
    # The completed spec reads back as itself (what the operator passes to its pods).
    assert PurificationJobSpec.model_validate(spec.to_wire()) == spec


def test_the_default_profile_changes_nothing():
    from tests.tiny import job_document
    plain = PurificationJob.model_validate(job_document(Path("/data"))).spec
    document = job_document(Path("/data"))
    document["spec"]["profile"] = "default"
    assert PurificationJob.model_validate(document).spec.model_dump(exclude={"profile"}) == \
        plain.model_dump(exclude={"profile"})
    assert plain.relabel.prompt is None and not plain.relabel.decoding.stop_at_end
