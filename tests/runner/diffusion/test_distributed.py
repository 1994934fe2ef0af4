"""The fine-tune on several processes (torch's elastic launcher, gloo on CPU) trains exactly what
one process trains, on one pod or across pods; and its epoch checkpoints outlive the pod in S3."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from disp_api import StageName
from disp_runner.diffusion.distributed import Topology, batch_share
from disp_runner.errors import UserInputError
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, RunLayout, write_stage_manifest
from disp_runner.pipeline.opening import open_run
from disp_runner.pipeline.runner import run_job
from tests.tiny import job_document, make_job

# Uneven shares on purpose: 24 instances in batches of 7 are 7, 7, 7 and 3 rows; two processes
# train on 4 + 3 of each (2 + 1 of the last), three processes on 3 + 2 + 2 and 1 + 1 + 1.
FINETUNE = {"epochs": 2, "batchSize": 7, "learningRate": 0.01, "trainable": "projector-and-lm"}
WEIGHT_TOLERANCE = 1e-5  # float32 reductions summed in another order


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def _until_relabel(ws: Path, **overrides):
    job = make_job(ws, evaluation=None, finetune=FINETUNE, **overrides)
    run_job(job, only=StageName.SALIENCY, show_progress=False)
    run_job(job, only=StageName.MASKING, show_progress=False)
    run_job(job, only=StageName.RELABEL, show_progress=False)
    return job


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def test_a_batch_is_shared_out_in_contiguous_parts_that_sum_to_one():
    rows = torch.tensor([10, 11, 12, 13, 14, 15, 16])
    parts = [batch_share(rows, rank, 2) for rank in range(2)]
    assert [p[0].tolist() for p in parts] == [[10, 11, 12, 13], [14, 15, 16]]
    assert [p[1].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6]]
    assert sum(p[2] for p in parts) == 1.0
    lonely = batch_share(torch.tensor([5]), 1, 2)  # a process left without rows trains at weight 0
    assert lonely[0].tolist() == [5] and lonely[2] == 0.0


def test_the_topology_needs_the_rendezvous_address_for_several_nodes():
    with pytest.raises(UserInputError, match="MASTER_ADDR"):
        Topology.from_flags(1, nodes=2, node_rank=1, environ={})
    with pytest.raises(UserInputError, match="--node-rank 2"):
        Topology.from_flags(1, nodes=2, node_rank=2, environ={"MASTER_ADDR": "a"})
    topology = Topology.from_flags(2, nodes=2, node_rank=1, environ={"MASTER_ADDR": "job-0.svc", "MASTER_PORT": "1234"})
    assert (topology.world_size, topology.master_addr, topology.master_port, topology.publishes) == \
        (4, "job-0.svc", 1234, False)


@pytest.mark.slow
def test_two_processes_fine_tune_to_the_weights_one_process_reaches(workspace, tmp_path):
    job = _until_relabel(workspace)
    run_dir = open_run(job).layout.root
    twin = tmp_path / "twin"  # the same run, relabelled once, fine-tuned by two processes
    shutil.copytree(workspace / "out", twin)
    (single,) = run_job(job, only=StageName.FINETUNE, show_progress=False)
    (double,) = run_job(job, twin, only=StageName.FINETUNE, show_progress=False,
                        topology=Topology(processes_per_node=2))
    assert single.metrics["processes"] == 1 and double.metrics["processes"] == 2
    assert single.metrics["steps"] == double.metrics["steps"] == 8  # the same global batch and schedule
    assert double.metrics["firstLoss"] == pytest.approx(single.metrics["firstLoss"], rel=1e-5)
    assert double.metrics["lastLoss"] == pytest.approx(single.metrics["lastLoss"], rel=1e-5)
    twin_dir = twin / run_dir.relative_to(workspace / "out")
    one, two = _weights(run_dir / "finetune" / "model"), _weights(twin_dir / "finetune" / "model")
    assert _max_difference(one, two) < WEIGHT_TOLERANCE
    assert (twin_dir / "finetune" / STAGE_MANIFEST).is_file()


@pytest.mark.slow
def test_two_fully_sharded_processes_fine_tune_to_the_weights_one_process_reaches(workspace, tmp_path):
    job = _until_relabel(workspace)
    sharded = make_job(workspace, evaluation=None, finetune={**FINETUNE, "sharding": "fsdp"})
    run_dir = open_run(job).layout.root
    twin = tmp_path / "twin"  # the same relabelled run, under the sharded job's own run folder
    twin_dir = RunLayout.for_job(sharded, twin).root
    shutil.copytree(run_dir, twin_dir)
    (single,) = run_job(job, only=StageName.FINETUNE, show_progress=False)
    (double,) = run_job(sharded, twin, only=StageName.FINETUNE, show_progress=False,
                        topology=Topology(processes_per_node=2))
    assert double.metrics["sharding"] == "fsdp" and double.metrics["processes"] == 2
    assert single.metrics["steps"] == double.metrics["steps"] == 8  # the same global batch and schedule
    assert double.metrics["firstLoss"] == pytest.approx(single.metrics["firstLoss"], rel=1e-5)
    assert double.metrics["lastLoss"] == pytest.approx(single.metrics["lastLoss"], rel=1e-5)
    one, two = _weights(run_dir / "finetune" / "model"), _weights(twin_dir / "finetune" / "model")
    assert _max_difference(one, two) < WEIGHT_TOLERANCE


@pytest.mark.slow
def test_a_bad_input_in_a_launched_process_still_exits_as_a_bad_input(workspace):
    job = _until_relabel(workspace)
    # An image of the purified dataset that is no image, in an output whose manifest vouches for
    # it: only the launched processes, which decode images, find out.
    relabel_dir = open_run(job).layout.stage_dir(StageName.RELABEL)
    victim = sorted((relabel_dir / "dataset" / "images").iterdir())[0]
    victim.write_bytes(b"not an image")
    write_stage_manifest(relabel_dir, StageName.RELABEL, {}, 0.0)
    with pytest.raises(UserInputError, match=victim.name):
        run_job(job, only=StageName.FINETUNE, show_progress=False, topology=Topology(processes_per_node=2))
    assert not (relabel_dir.parent / "finetune").exists()


@pytest.mark.slow
def test_two_nodes_of_one_process_each_train_like_one_process(workspace, tmp_path):
    """Two `disp run --nodes 2 --node-rank i` commands stand for the two pods of an Indexed Job,
    meeting at node 0's address as the operator's headless Service makes them."""
    job = _until_relabel(workspace)
    run_dir = open_run(job).layout.root
    twin = tmp_path / "twin"
    shutil.copytree(workspace / "out", twin)
    (single,) = run_job(job, only=StageName.FINETUNE, show_progress=False)
    manifest = tmp_path / "job.json"
    manifest.write_text(json.dumps(job_document(workspace, evaluation=None, finetune=FINETUNE)))
    from disp_runner.net import free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([sys.executable, "-m", "disp_runner.cli", "--no-progress", "run", str(manifest),
                               "--output", str(twin), "--stage", "finetune", "--processes", "1", "--nodes", "2",
                               "--node-rank", str(rank)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    logs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert "finetune: node 1 of 2 done" in logs[1] and "processes 2" in logs[0]
    twin_dir = twin / run_dir.relative_to(workspace / "out")
    assert _max_difference(_weights(run_dir / "finetune" / "model"),
                           _weights(twin_dir / "finetune" / "model")) < WEIGHT_TOLERANCE
    assert single.metrics["steps"] == 8


def _sharded_training(checkpoints: str | None, crash_after: int | None, trainable: str):
    """What each launched process runs: the tiny model, seeded alike in every process, fine-tuned
    with FSDP; `crash_after` an epoch makes every process stop there, as a lost pod would."""
    from disp_api import FinetuneSharding, TrainableParts
    from disp_runner.data.synthetic import generate_instances
    from disp_runner.diffusion.training import TrainingConfig, train_masked_diffusion
    from disp_runner.models.mdlm import build_model
    from disp_runner.models.mdlm.embedded import build_embedded_tokenizer
    from tests.tiny import TINY_SIZE

    torch.manual_seed(0)
    model, processor = build_model(build_embedded_tokenizer(), **TINY_SIZE)
    data = processor.encode(generate_instances(40, 1, image_size=16), 16)
    config = TrainingConfig(epochs=3, batch_size=16, learning_rate=1e-2, seed=3, trainable=TrainableParts(trainable),
                            sharding=FinetuneSharding.FSDP)

    def crash(epoch):  # a main-process callback: the others then fail in their next collective
        if epoch == crash_after:
            raise RuntimeError("pod lost")

    result = train_masked_diffusion(model, data, processor.mask_token_id, config, show_progress=False,
                                    checkpoint_dir=Path(checkpoints) if checkpoints else None, on_epoch_end=crash)
    return {"weights": result.sharded_weights, "losses": result.losses, "steps": result.steps}


@pytest.mark.slow
def test_a_fully_sharded_fine_tune_resumes_from_its_whole_epoch_checkpoint(tmp_path):
    from disp_runner.diffusion.distributed import launch

    checkpoints = tmp_path / "ckpt"
    two = Topology(processes_per_node=2)
    uninterrupted = launch(two, "fsdp-whole", _sharded_training, None, None, "projector-and-lm")
    with pytest.raises(RuntimeError, match="pod lost"):
        launch(two, "fsdp-lost", _sharded_training, str(checkpoints), 2, "projector-and-lm")
    assert [p.name for p in checkpoints.iterdir()] == ["epoch-0002"]
    saved = load_file(str(checkpoints / "epoch-0002" / "optimizer.safetensors"))
    # the checkpoint holds whole tensors (the shards gathered), as a one-process run writes them
    weights = load_file(str(checkpoints / "epoch-0002" / "trainable.safetensors"))
    assert set(weights) == set(uninterrupted["weights"])
    assert all(weights[k].shape == uninterrupted["weights"][k].shape for k in weights)
    assert {k.split(".", 1)[1] for k in saved} == {"step", "exp_avg", "exp_avg_sq"}
    resumed = launch(two, "fsdp-resumed", _sharded_training, str(checkpoints), None, "projector-and-lm")
    assert resumed["steps"] == uninterrupted["steps"] == 9
    assert resumed["losses"][-3:] == pytest.approx(uninterrupted["losses"][-3:], rel=1e-5)
    assert _max_difference(resumed["weights"], uninterrupted["weights"]) < WEIGHT_TOLERANCE
