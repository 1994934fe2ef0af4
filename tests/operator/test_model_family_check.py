"""The operator reads the model's family from its config.json in S3 before any pod starts, and
accepts exactly the families the runner's registry loads."""

from __future__ import annotations

import json

from disp_api.contract import SUPPORTED_MODEL_TYPES
from disp_operator.artifacts import RunStore
from disp_operator.validation import ConfigProblem
from disp_store.s3 import S3Store
from tests.operator.conftest import make_job
from tests.harness.minio import S3_ACCESS, S3_SECRET


def test_the_operator_and_the_runner_agree_on_the_supported_families():
    from disp_runner.models.registry import supported_model_types

    assert supported_model_types() == sorted(SUPPORTED_MODEL_TYPES)


def test_the_model_type_is_read_from_config_json_and_bad_configs_are_named(s3_endpoint):
    store = S3Store(s3_endpoint, S3_ACCESS, S3_SECRET, secure=False)
    if not store.client.bucket_exists("models"):
        store.client.make_bucket("models")
    job = make_job(model={"uri": "s3://models/compromised"}, storage={"endpoint": s3_endpoint, "secure": False,
                                                                       "credentialsSecret": {"name": "minio"}})
    run = RunStore(job, S3_ACCESS, S3_SECRET)
    assert run.model_type() == ConfigProblem("not found")
    for body, expected in [(json.dumps({"model_type": "llava_llada"}), "llava_llada"),
                           (json.dumps({"hidden_size": 8}), None),
                           ("[1, 2]", ConfigProblem("expected a JSON object, got list")),
                           ("{not json", ConfigProblem("not valid JSON")),
                           (" " * (2**20 + 1), ConfigProblem(f"{2**20 + 1} bytes, more than a model config can need"))]:
        store.put_bytes("models", "compromised/config.json", body.encode())
        assert run.model_type() == expected
