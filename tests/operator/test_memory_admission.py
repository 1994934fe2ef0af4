"""The memory planner at admission: the floor of each heavy stage's batch from config.json and the
spec, refused in one line against the chart's GPU memory, and shown in status."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from disp_api import StageName
from disp_api.model_shapes import llada_v_shape
from disp_api.planning import PlannedStage, Precision, Workload, estimate_memory
from disp_api.status import PurificationJobStatus
from disp_operator.config import ConfigError, OperatorConfig
from disp_operator.memory import check_floors, stage_floors
from disp_operator.reconcile import Observation, reconcile
from disp_operator.validation import InvalidSpec
from tests.operator.conftest import make_job

# LLaDA-V's published sizes (its config.json names no vision_config: the tower is SigLIP so400m).
LLADA_V_8B = dict(model_type="llava_llada", vocab_size=126464, hidden_size=4096, intermediate_size=12288,
                  num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, torch_dtype="bfloat16")
SHORTEST = 27 * 27 + 32  # one 384-pixel view of 14-pixel patches, and the 32 answer positions


FIXED = dict(saliency={"batchSize": 16}, relabel={"batchSize": 64})  # batch sizes set, not auto


def test_each_gpu_stage_gets_the_planners_estimate_at_the_shortest_rows_the_model_takes():
    floors = {f.stage: f for f in stage_floors(make_job(**FIXED), LLADA_V_8B, default_gpus=1)}
    assert set(floors) == {StageName.SALIENCY, StageName.RELABEL, StageName.FINETUNE}  # masking runs on CPU
    shape, gpu = llada_v_shape(LLADA_V_8B), Precision.for_device("cuda", checkpoint_bytes=2)
    saliency = estimate_memory(shape, PlannedStage.SALIENCY, Workload(batch=16, sequence=SHORTEST, answer=32, views=1),
                               gpu)
    assert floors[StageName.SALIENCY].sequence == SHORTEST and floors[StageName.SALIENCY].rows == 16
    assert floors[StageName.SALIENCY].estimate.total == saliency.total
    assert floors[StageName.RELABEL].rows == 64 and floors[StageName.RELABEL].estimate.stage is PlannedStage.RELABEL
    # all but the weights grows with the batch: twice the saliency rows, twice the activations
    doubled = {f.stage: f for f in stage_floors(make_job(**{**FIXED, "saliency": {"batchSize": 32}}), LLADA_V_8B, 1)}
    weights = saliency.parts["weights"]
    assert doubled[StageName.SALIENCY].estimate.total - weights == pytest.approx(2 * (saliency.total - weights),
                                                                                  rel=1e-6)


def test_an_auto_batch_is_planned_at_one_row_and_sampled_decoding_at_its_noise_group():
    floors = {f.stage: f for f in stage_floors(make_job(), LLADA_V_8B, 1)}  # batchSize unset: auto
    assert floors[StageName.SALIENCY].rows == floors[StageName.RELABEL].rows == 1
    sampled = {f.stage: f for f in stage_floors(make_job(relabel={"decoding": {"temperature": 1.0}}), LLADA_V_8B, 1)}
    assert sampled[StageName.RELABEL].rows == 64
    check_floors(list(floors.values())[:2], gpu_memory_gib=24)  # one row of each fits a 24 GiB GPU
    with pytest.raises(InvalidSpec, match=r"spec.saliency.batchSize: 1 rows per GPU .* not even one row fits"):
        check_floors(list(floors.values())[:1], gpu_memory_gib=16)  # 15.7 GiB of weights alone


def test_a_prompt_cache_two_gpus_and_fsdp_change_the_plan_as_the_runner_would_run_them():
    base = {f.stage: f for f in stage_floors(make_job(), LLADA_V_8B, 1)}
    cached = {f.stage: f for f in stage_floors(make_job(relabel={"decoding": {"cache": "prefix"}}), LLADA_V_8B, 1)}
    assert cached[StageName.RELABEL].estimate.stage is PlannedStage.RELABEL_CACHED
    assert "prompt cache" in cached[StageName.RELABEL].estimate.parts
    two = {f.stage: f for f in stage_floors(make_job(resources={"stages": {"finetune": {"gpus": 2}}}), LLADA_V_8B, 1)}
    assert two[StageName.FINETUNE].rows == 16 and base[StageName.FINETUNE].rows == 32  # the global batch shared out
    whole = make_job(resources={"stages": {"finetune": {"gpus": 8}}}, finetune={"trainable": "all"})
    split = make_job(resources={"stages": {"finetune": {"gpus": 8}}}, finetune={"trainable": "all", "sharding": "fsdp"})
    (full,), (sharded,) = ([f for f in stage_floors(j, LLADA_V_8B, 1) if f.stage is StageName.FINETUNE]
                           for j in (whole, split))
    # every process holds all 8.4 B weights and AdamW's state for them, or an eighth of both
    assert full.estimate.parts["optimiser"] == 8 * sharded.estimate.parts["optimiser"]
    assert sharded.estimate.parts["weights"] < full.estimate.parts["weights"] / 3


def test_a_batch_that_cannot_fit_even_at_the_shortest_rows_is_refused_in_one_line_naming_the_numbers():
    floors = stage_floors(make_job(saliency={"batchSize": 64}), LLADA_V_8B, 1)
    with pytest.raises(InvalidSpec) as refused:
        check_floors(floors, gpu_memory_gib=80)
    message = str(refused.value)
    assert message.startswith("spec.saliency.batchSize: 64 rows per GPU need at least ")
    assert "761 tokens" in message and "78.0 GiB usable of the cluster's 80 GiB GPUs" in message
    fits = int(message.split("at most ")[1].split(" ")[0])
    assert 1 <= fits < 64 and "\n" not in message
    # that many fit, one more does not
    check_floors(stage_floors(make_job(saliency={"batchSize": fits}, finetune={"batchSize": 8}), LLADA_V_8B, 1), 80)
    with pytest.raises(InvalidSpec, match="finetune.activationCheckpointing"):
        check_floors(stage_floors(make_job(), LLADA_V_8B, 1), gpu_memory_gib=80)  # 32 rows of the fine-tune
    check_floors(stage_floors(make_job(), LLADA_V_8B, 1), gpu_memory_gib=141)  # an H200 takes the defaults
    check_floors(floors, gpu_memory_gib=None)  # GPU memory not configured: nothing is refused here


def test_cpu_stages_unknown_families_and_bad_sizes():
    assert stage_floors(make_job(resources={"gpus": 0}), LLADA_V_8B, 1) == []
    assert stage_floors(make_job(), {"model_type": "disp_mdlm", "hidden_size": 64}, 1) == []
    with pytest.raises(InvalidSpec, match=r"config.json: hidden_size must be a positive integer, got 'big'"):
        stage_floors(make_job(), {**LLADA_V_8B, "hidden_size": "big"}, 1)
    with pytest.raises(InvalidSpec, match="vision_config must be an object, got list"):
        stage_floors(make_job(), {**LLADA_V_8B, "vision_config": [1]}, 1)


def test_the_floors_reach_the_stages_status():
    job = make_job()
    floors = {f.stage: f.gib for f in stage_floors(job, LLADA_V_8B, 1)}
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    plan = reconcile(job, PurificationJobStatus(), 1, Observation(now=now, memory_floors=floors))
    shown = {s.name: s.minimum_memory_gib for s in plan.status.stages}
    assert shown[StageName.SALIENCY] == floors[StageName.SALIENCY] and shown[StageName.MASKING] is None
    wire = plan.status.to_wire()["stages"]
    assert [stage.get("minimumMemoryGiB") for stage in wire] == [shown[s.name] for s in plan.status.stages]
    later = reconcile(job, plan.status, 1, Observation(now=now))  # a restarted operator keeps what status says
    assert {s.name: s.minimum_memory_gib for s in later.status.stages} == shown


def test_the_chart_value_reaches_the_operator(monkeypatch):
    monkeypatch.delenv("DISP_RUNNER_GPU_MEMORY_GIB", raising=False)
    assert OperatorConfig.from_env().runner.gpu_memory_gib is None
    monkeypatch.setenv("DISP_RUNNER_GPU_MEMORY_GIB", "80")
    assert OperatorConfig.from_env().runner.gpu_memory_gib == 80.0
    monkeypatch.setenv("DISP_RUNNER_GPU_MEMORY_GIB", "eighty")
    with pytest.raises(ConfigError, match="DISP_RUNNER_GPU_MEMORY_GIB: 'eighty' is not a number"):
        OperatorConfig.from_env()
