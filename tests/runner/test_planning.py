"""The memory planner: its parameter count is the model's, its per-token term is what autograd
really keeps, its batch choice and refusals follow from the estimate, and a stage that cannot fit
is refused in one line before it computes anything."""

import dataclasses
import json

import pytest
import torch

from disp_api import PurificationJob, StageName
from disp_runner.cli import main
from disp_runner.data.dataset import load_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.disp.saliency import SaliencyConfig, fisher_jacobian_scores
from disp_api.model_shapes import llada_v_shape
from disp_runner.pipeline.artifacts import RunLayout, read_stage_manifest
from disp_api.planning import (BATCH_MARGIN, PlannedStage, Precision, Workload, estimate_memory, largest_batch,
                                  saved_bytes_per_token_layer, stage_flops)
from tests.runner.models.test_llada_v import tiny_checkpoint
from tests.tiny import job_document

# LLaDA-V as published (LLaDA-8B after SigLIP so400m): what the sizing table in the docs is for.
PUBLISHED = dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32)
GPU = Precision.for_device("cuda")


@pytest.mark.parametrize("overrides", [{}, {"num_key_value_heads": 2}, {"head_dim": 16, "intermediate_size": 48}])
def test_the_shape_counts_exactly_the_parameters_the_model_has(overrides):
    model, _ = tiny_checkpoint(None, **overrides)
    assert llada_v_shape(model.config.to_dict()).parameters == sum(p.numel() for p in model.parameters())


def test_the_published_size_is_eight_point_four_billion_parameters():
    assert 8.40e9 < llada_v_shape(PUBLISHED).parameters < 8.45e9


class KeptByAutograd:
    """Within the block, every tensor autograd keeps for a backward, by storage; `bytes`: those that
    are not the model's own weights."""

    def __init__(self, model):
        self.weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.kept: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        self.kept[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    def __enter__(self):
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self.hooks.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(size for pointer, size in self.kept.items() if pointer not in self.weights)


def _saved_bytes(layers: int, rows: int, length: int, bf16: bool, kv_heads: int) -> int:
    """Bytes autograd keeps (beyond the weights) for a gradient to the input embeddings through
    the language model of a fresh tiny LLaDA-V with `layers` layers; `rows` > 1 are padded."""
    torch.manual_seed(0)
    model, _ = tiny_checkpoint(None, num_hidden_layers=layers, num_key_value_heads=kv_heads, hidden_size=64,
                               intermediate_size=160, num_attention_heads=4)
    model.to(torch.bfloat16 if bf16 else torch.float32).requires_grad_(False)  # saliency's gradient: to the input only
    embeds = torch.randn(rows, length, 64, dtype=next(model.parameters()).dtype, requires_grad=True)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[1:, :5] = 0  # every row after the first is left-padded
    with KeptByAutograd(model) as kept, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=torch.arange(length)[None].expand(rows, -1),
                    use_cache=False)
    return kept.bytes


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32 (CPU)", "bf16 autocast (as on a GPU)"])
@pytest.mark.parametrize("rows", [1, 2], ids=["one row", "padded rows"])
def test_the_per_token_term_is_what_autograd_keeps_per_layer(bf16, rows):
    """The difference between 3 and 1 layers isolates the per-layer bytes; they must match the
    planner's per-token-layer formula times the tokens."""
    length, kv_heads = 96, 2
    per_layer = (_saved_bytes(3, rows, length, bf16, kv_heads) - _saved_bytes(1, rows, length, bf16, kv_heads)) / 2
    model, _ = tiny_checkpoint(None, num_hidden_layers=1, num_key_value_heads=kv_heads, hidden_size=64,
                               intermediate_size=160, num_attention_heads=4)
    shape = llada_v_shape(model.config.to_dict())
    precision = Precision(2, 2, "cuda") if bf16 else Precision.for_device("cpu")
    expected = rows * length * saved_bytes_per_token_layer(shape, precision, length if rows > 1 else 0)
    assert per_layer == pytest.approx(expected, rel=0.05)


def test_with_activation_checkpointing_a_fine_tune_keeps_each_layers_input_only():
    from disp_runner.diffusion.training import _set_activation_checkpointing

    def kept(layers: int) -> int:
        model, _ = tiny_checkpoint(None, num_hidden_layers=layers, hidden_size=64, intermediate_size=160)
        model.train().requires_grad_(False)
        _set_activation_checkpointing(model, True)
        embeds = torch.randn(1, 300, 64, requires_grad=True)
        with KeptByAutograd(model) as saved:
            model.model(inputs_embeds=embeds, attention_mask=torch.ones(1, 300, dtype=torch.long),
                        position_ids=torch.arange(300)[None], use_cache=False)
        return saved.bytes

    per_layer = (kept(5) - kept(1)) / 4
    assert per_layer == pytest.approx(300 * 64 * 4, rel=0.02)  # the layer's input, in fp32: what the planner counts
    # On the published size: every layer's input plus one layer's recompute, a small part of 32 layers' tensors.
    work = Workload(batch=1, sequence=3707, answer=32, views=7, checkpointing=True)
    saved = lambda w: estimate_memory(llada_v_shape(PUBLISHED), PlannedStage.FINETUNE, w, GPU).parts["saved activations"]  # noqa: E731
    assert saved(work) < saved(dataclasses.replace(work, checkpointing=False)) / 10


def test_saliency_keeps_no_linear_input_even_for_a_model_whose_weights_require_gradients():
    """A model as from_pretrained returns it (every weight requiring a gradient) is scored with the
    memory of a frozen one, and its weights' settings are left as they were."""
    model, processor = tiny_checkpoint(None)
    batch = processor.encode([inst.replace(image=inst.image.resize((40, 20)))
                              for inst in generate_instances(2, seed=0, image_size=16)], 24, with_response=False)

    def kept_bytes(requires_grad: bool) -> int:
        model.requires_grad_(requires_grad)
        with KeptByAutograd(model) as kept:
            scores = fisher_jacobian_scores(model, batch, 24, SaliencyConfig(probes=2, block_length=12),
                                            torch.Generator().manual_seed(0))
        assert all(p.requires_grad is requires_grad for p in model.parameters())
        return kept.bytes, scores

    (trainable, scores_a), (frozen, scores_b) = kept_bytes(True), kept_bytes(False)
    assert trainable == frozen
    # The same scores up to fp32 rounding: whether a weight requires a gradient can change which
    # kernel computes a product (on an Intel CPU with MKL the two differ by ~4e-7 relative; on an
    # AMD one they were bitwise equal).
    torch.testing.assert_close(scores_a, scores_b, rtol=1e-5, atol=1e-6 * scores_b.abs().max().item())


def test_the_estimate_grows_with_the_batch_and_the_length_and_halves_in_bf16():
    shape = llada_v_shape(PUBLISHED)
    one = Workload(batch=1, sequence=1565, answer=32, views=2, trainable_parameters=shape.projector_parameters)
    for stage in PlannedStage:
        small = estimate_memory(shape, stage, one, GPU)
        assert small.parts["weights"] == shape.parameters * 2
        assert estimate_memory(shape, stage, Workload(**{**one.__dict__, "batch": 4}), GPU).total > small.total
        assert estimate_memory(shape, stage, Workload(**{**one.__dict__, "sequence": 3707}), GPU).total > small.total
    saved = lambda p: estimate_memory(shape, PlannedStage.SALIENCY, one, p).parts["saved activations"]  # noqa: E731
    assert 0.3 < saved(GPU) / saved(Precision(4, 4, "cuda")) < 0.6  # fp32 norm inputs stay fp32 under autocast


def test_the_largest_batch_keeps_the_margin_and_zero_means_nothing_fits():
    shape = llada_v_shape(PUBLISHED)
    work = Workload(batch=1, sequence=3707, answer=32, views=7, trainable_parameters=shape.projector_parameters)
    device = 80 * 2**30
    batch = largest_batch(shape, PlannedStage.FINETUNE, work, GPU, device)
    assert batch >= 1

    def needs(b):
        estimate = estimate_memory(shape, PlannedStage.FINETUNE, Workload(**{**work.__dict__, "batch": b}), GPU)
        return estimate.parts["weights"] + (estimate.total - estimate.parts["weights"]) * BATCH_MARGIN
    assert needs(batch) <= device - 2 * 2**30 < needs(batch + 1)
    assert largest_batch(shape, PlannedStage.FINETUNE, work, GPU, 16 * 2**30) == 0  # the weights alone are 15.7 GiB


def test_flops_follow_the_stated_formula():
    shape = llada_v_shape(PUBLISHED)
    work = Workload(batch=1, sequence=3707, answer=32, views=7, probes=6)
    forward = (2 * shape.body_parameters * 3707 + 4 * 32 * 3707 ** 2 * 4096 + 2 * shape.head_parameters * 32)
    tower = stage_flops(shape, PlannedStage.RELABEL, Workload(**{**work.__dict__, "steps": 0}))
    assert stage_flops(shape, PlannedStage.SALIENCY, work) == pytest.approx(tower + 7 * forward)
    assert stage_flops(shape, PlannedStage.RELABEL, work) == pytest.approx(tower + 32 * forward)
    cached, exact = (stage_flops(shape, s, work) for s in (PlannedStage.RELABEL_CACHED, PlannedStage.RELABEL))
    assert cached < exact / 10  # 31 of 32 steps see 32 positions instead of 3,707


def _llada_v_job(workspace, batch_size: int):
    corpus = [t for inst in load_dataset(workspace / "train") + load_dataset(workspace / "clean")
              for t in (inst.prompt, inst.response)]
    tiny_checkpoint(workspace / "llada-v", corpus)
    doc = job_document(workspace, model={"uri": str(workspace / "llada-v")}, evaluation=None)
    doc["spec"]["saliency"]["batchSize"] = batch_size
    doc["spec"]["relabel"]["decoding"] = {"steps": 12, "genLength": 24, "blockLength": 12}
    path = workspace / "llada-v.yaml"
    path.write_text(json.dumps(doc))
    return path, doc


def test_a_stage_records_its_estimate_and_one_that_cannot_fit_is_refused_in_one_line(workspace, capsys, monkeypatch):
    path, doc = _llada_v_job(workspace, batch_size=8)
    assert main(["run", str(path), "--stage", "saliency", "--no-progress"]) == 0, capsys.readouterr().err
    layout = RunLayout.for_job(PurificationJob.model_validate(doc), workspace / "out")
    estimate = read_stage_manifest(layout.stage_dir(StageName.SALIENCY))["metrics"]["memoryEstimateGiB"]
    assert 0.8 <= estimate < 1.5  # the runtime's 0.8 GiB and a tiny model's batch

    # A machine that offers less than the estimate: refused before scoring, the numbers in one line.
    monkeypatch.setenv("DISP_MODEL_MEMORY_GIB", "0.5")
    doc["spec"]["output"] = {"uri": str(workspace / "small")}
    path.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main(["run", str(path), "--stage", "saliency", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("disp run: error: spec.saliency.batchSize: 8 rows of up to ")
    assert "more than the 0.5 GiB this cpu offers; not even one row fits" in err[0]
    assert not RunLayout.for_job(PurificationJob.model_validate(doc), workspace / "small").is_complete(StageName.SALIENCY)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["saliency", "finetune"])
def test_the_estimate_is_within_a_fifth_of_the_peak_a_fresh_process_reaches(stage):
    """benchmarks/memory_planner.py's measurement for one stage: the ~120 M LLaDA-V-shaped model,
    two rows of 1,485 visual tokens, fp32 on this CPU, peak RSS of a process that does nothing else."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "memory_planner.py"
    out = subprocess.run([sys.executable, str(script), "--child", stage, "1485"], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["sequence"] > 1485 and 0.8 < row["estimate"] / row["peak"] < 1.2, row


def test_with_chat_turn_labels_the_head_is_planned_over_every_row_from_its_first_chat_marker(monkeypatch):
    """LLaDA-V's chat-turn labels supervise <|startoftext|>, the row's first token, so a fine-tune's
    head runs over the whole row, not only over genLength answer positions; the plan must say so."""
    from disp_api import FinetuneLabels
    from disp_runner.pipeline import memory

    model, processor = tiny_checkpoint(None)
    instances = generate_instances(3, seed=2)
    planned = []
    real_estimate = memory.estimate_memory
    monkeypatch.setattr(memory, "estimate_memory", lambda *a: planned.append(a[2]) or real_estimate(*a))
    for labels in FinetuneLabels:
        memory.check_stage_memory(model, processor, PlannedStage.FINETUNE, "spec.finetune.batchSize", 2, instances,
                                  16, torch.device("cpu"), labels=labels)
    padded, chat = planned
    assert padded.answer == 16 and chat.answer == chat.sequence
    longest = max(len(row.ids) for row in processor.token_rows(instances, 16, labels=FinetuneLabels.CHAT_TURNS))
    assert chat.sequence == longest < padded.sequence


def test_an_auto_batch_is_the_largest_that_fits_a_gpu_and_the_fixed_default_elsewhere(monkeypatch):
    """batchSize unset: on a GPU the planner's largest batch with its margin (at most the stage's
    instances and 256), which then passes the stage's own check; on a CPU the former default."""
    from disp_api.planning import largest_batch
    from disp_runner.pipeline import memory

    model, processor = tiny_checkpoint(None)
    instances = generate_instances(40, seed=2)
    gpu, cpu = torch.device("cuda"), torch.device("cpu")  # planned only: nothing runs on the device
    settings = dict(probes=2, block_length=12)
    assert memory.stage_batch(model, processor, PlannedStage.SALIENCY, "spec.saliency.batchSize", None, 16,
                              instances, 24, cpu, **settings)[0] == 16
    assert memory.stage_batch(model, processor, PlannedStage.SALIENCY, "spec.saliency.batchSize", 5, 5,
                              instances, 24, cpu, **settings)[0] == 5  # a batch the spec sets is kept
    one = memory._plan(model, processor, PlannedStage.SALIENCY, 1, instances, 24, gpu, **settings)
    budget = memory.GPU_HEADROOM_BYTES + estimate_memory(one.shape, PlannedStage.SALIENCY,
                                                         dataclasses.replace(one.work, batch=12), one.precision).total
    monkeypatch.setattr(memory, "device_memory", lambda device: budget)
    batch, estimate = memory.stage_batch(model, processor, PlannedStage.SALIENCY, "spec.saliency.batchSize", None, 16,
                                         instances, 24, gpu, **settings)
    assert batch == largest_batch(one.shape, PlannedStage.SALIENCY, one.work, one.precision, budget, 40)
    assert 1 <= batch < 12 and estimate.total <= budget - memory.GPU_HEADROOM_BYTES  # the margin is kept
    monkeypatch.setattr(memory, "device_memory", lambda device: 1 << 50)  # a GPU of a petabyte
    assert memory.stage_batch(model, processor, PlannedStage.SALIENCY, "spec.saliency.batchSize", None, 16,
                              instances, 24, gpu, **settings)[0] == 40  # no more than the instances
