"""The memory planner at admission: before any pod starts, the least GPU memory each heavy stage's
batch can need, from the model's config.json and the spec alone (the operator reads no dataset).

Rows are taken at the shortest a model can be given: one view of visual tokens and the answer's
positions, with no prompt text. Real rows are longer (LLaDA-V: 2 to 7 views per image), so the
figure is a floor: a job whose floor does not fit the cluster's GPUs cannot run, and is refused
here instead of failing in its first GPU pod; a job whose floor fits is still checked by each stage
against its own data (the runner's plan) before it computes.

Pure: the service reads config.json and the chart's GPU memory; this module decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

from disp_api import FinetuneSharding, PurificationJob, StageName, TrainableParts
from disp_api.model_shapes import shape_of
from disp_api.planning import (GPU_HEADROOM_BYTES, MemoryEstimate, ModelShape, PlannedStage, Precision, Workload,
                               estimate_memory, largest_batch)
from disp_api.spec import DecodingCache
from disp_operator.validation import InvalidSpec

GIB = 2**30
DEFAULT_GEN_LENGTH = 32  # what the runner decodes when neither the spec nor the model says (the authors')
# Checkpoint dtypes and the bytes a parameter is held in on a GPU (the runner keeps the checkpoint's).
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class StageFloor:
    """The least one batch of a stage can need on its GPU."""

    stage: StageName
    field: str  # the spec field that sets the batch
    shape: ModelShape
    precision: Precision
    workload: Workload  # rows per process, at the shortest row
    estimate: MemoryEstimate

    @property
    def rows(self) -> int:
        return self.workload.batch

    @property
    def sequence(self) -> int:
        return self.workload.sequence

    @property
    def gib(self) -> float:
        return round(self.estimate.total / GIB, 2)


def stage_floors(job: PurificationJob, config: dict, default_gpus: int) -> list[StageFloor]:
    """The floor of every heavy stage that runs on GPUs; empty for a model family the planner has
    no shape for. Raises InvalidSpec naming config.json's field when a size in it is not one."""
    try:
        shape = shape_of(config)
    except ValueError as exc:
        raise InvalidSpec(f"spec.model.uri: config.json: {exc}") from None
    if shape is None:
        return []
    spec = job.spec
    precision = Precision.for_device("cuda", checkpoint_bytes=DTYPE_BYTES.get(str(config.get("torch_dtype")), 2))
    decoding = spec.relabel.decoding
    model_gen_length = config.get("gen_length")
    if not (isinstance(model_gen_length, int) and not isinstance(model_gen_length, bool) and model_gen_length > 0):
        model_gen_length = None
    gen_length = decoding.gen_length or model_gen_length or DEFAULT_GEN_LENGTH
    block = min(decoding.block_length or gen_length, gen_length)
    shortest = shape.tokens_per_view + gen_length  # one view, the answer, no prompt text
    floors = []

    def add(stage: StageName, planned: PlannedStage, field: str, batch: int, **work) -> None:
        request = spec.resources.for_stage(stage, default_gpus)
        if request.gpus == 0:
            return  # a CPU stage: its memory is spec.resources' to give, not a GPU's
        if stage is StageName.FINETUNE:  # one process per GPU of each pod, the global batch shared out
            processes = request.gpus * spec.parallelism.finetune_nodes
            rows = math.ceil(batch / processes)
            if spec.finetune.sharding is FinetuneSharding.FSDP:
                work["shards"] = processes
        else:
            rows = batch
        workload = Workload(batch=rows, sequence=shortest, views=1, **work)
        floors.append(StageFloor(stage, field, shape, precision, workload,
                                 estimate_memory(shape, planned, workload, precision)))

    stages = set(spec.stages())
    if StageName.SALIENCY in stages:
        # batchSize unset (auto): the stage picks what fits its GPU, so one row is the least it takes
        add(StageName.SALIENCY, PlannedStage.SALIENCY, "spec.saliency.batchSize", spec.saliency.batch_size or 1,
            answer=block, probes=spec.saliency.probes)
    if StageName.RELABEL in stages:
        cached = decoding.cache is not DecodingCache.NONE
        # auto with sampled decoding keeps the group its noise is drawn for (the runner does the same)
        rows = spec.relabel.batch_size or (spec.relabel.seed_group if decoding.temperature > 0 else 1)
        add(StageName.RELABEL, PlannedStage.RELABEL_CACHED if cached else PlannedStage.RELABEL,
            "spec.relabel.batchSize", rows, answer=block, steps=decoding.steps or gen_length)
    if StageName.FINETUNE in stages:
        finetune = spec.finetune
        add(StageName.FINETUNE, PlannedStage.FINETUNE, "spec.finetune.batchSize", finetune.batch_size,
            answer=gen_length, trainable_parameters=_trainable(shape, finetune.trainable),
            trains_language_model=finetune.trainable is not TrainableParts.PROJECTOR,
            checkpointing=finetune.activation_checkpointing)
    return floors


def _trainable(shape: ModelShape, parts: TrainableParts) -> int:
    if parts is TrainableParts.PROJECTOR:
        return shape.projector_parameters
    if parts is TrainableParts.ALL:
        return shape.parameters
    return shape.parameters - shape.vision_parameters  # the projector and the language model


def check_floors(floors: list[StageFloor], gpu_memory_gib: Optional[float]) -> None:
    """Refuse a job one of whose stages cannot fit the cluster's GPUs (`gpu_memory_gib`, the chart's
    runner.gpuMemoryGiB; None: not known, nothing is refused), in one line naming the numbers."""
    if gpu_memory_gib is None:
        return
    device = int(gpu_memory_gib * GIB)
    usable = device - GPU_HEADROOM_BYTES
    for floor in floors:
        if floor.estimate.total <= usable:
            continue
        fits = largest_batch(floor.shape, floor.estimate.stage, replace(floor.workload, batch=1), floor.precision,
                             device)
        advice = (f"at most {fits} rows per GPU can fit" if fits else
                  "not even one row fits: the model needs GPUs with more memory")
        if floor.stage is StageName.FINETUNE and not floor.workload.checkpointing:
            advice += " (or share the batch among more GPUs, or set spec.finetune.activationCheckpointing)"
        largest = sorted(floor.estimate.parts.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in largest)
        raise InvalidSpec(
            f"{floor.field}: {floor.rows} rows per GPU need at least {floor.gib:.1f} GiB ({parts}) even at the "
            f"shortest rows this model takes ({floor.sequence} tokens), more than the {usable / GIB:.1f} GiB usable "
            f"of the cluster's {gpu_memory_gib:g} GiB GPUs (the chart's runner.gpuMemoryGiB); {advice}")
