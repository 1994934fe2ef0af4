"""The memory planner applied to a stage about to run: the estimate of its widest batch on this
device, logged and reported, and a batch that cannot fit refused in one line before any compute.

The planner itself (disp_api.planning) is pure arithmetic over a config; this module finds the
numbers it needs: the family's shape of the loaded model, the longest row of the stage's data
(token ids only; no image is decoded), the views the tower sees, and the device's memory.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import torch

from disp_api import FinetuneLabels, TrainableParts
from disp_runner.data.instances import Instance
from disp_runner.errors import UserInputError
from disp_runner.diffusion.training import TRAINED_PARTS
from disp_runner.models.base import DiffusionVLM, Processor
from disp_runner.models.loading import memory_budget
from disp_runner.models.registry import family_for
from disp_api.planning import (GPU_HEADROOM_BYTES, MemoryEstimate, ModelShape, PlannedStage, Precision, Workload,
                               estimate_memory, largest_batch)

logger = logging.getLogger(__name__)


def device_memory(device: torch.device) -> int:
    """Bytes the stage may use: the GPU's memory, or the machine's (DISP_MODEL_MEMORY_GIB, if set)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return memory_budget()


def usable_memory(device: torch.device) -> int:
    return device_memory(device) - (GPU_HEADROOM_BYTES if device.type == "cuda" else 0)


def precision_of(model: DiffusionVLM, device: torch.device) -> Precision:
    weight_bytes = next(iter(model.parameters())).element_size()
    return Precision.for_device(device.type, checkpoint_bytes=weight_bytes)


# The most rows `batchSize: auto` computes together: past it a GPU gains nothing measurable
# (benchmarks/results/gpu_scale-h100.txt: relabel at 8 rows is already compute-bound).
AUTO_BATCH_LIMIT = 256


@dataclasses.dataclass(frozen=True)
class _Plan:
    shape: ModelShape
    work: Workload  # one process's batch
    precision: Precision
    longest: int


def _plan(model: DiffusionVLM, processor: Processor, stage: PlannedStage, batch_size: int,
          instances: Sequence[Instance], gen_length: int, device: torch.device, *, probes: int = 6, steps: int = 32,
          block_length: int | None = None, trainable: TrainableParts = TrainableParts.PROJECTOR, processes: int = 1,
          checkpointing: bool = False, sharded: bool = False,
          labels: FinetuneLabels = FinetuneLabels.PADDED_ANSWER) -> _Plan | None:
    """The planner's view of the stage's widest batch; None for a family it has no shape for."""
    family = family_for(getattr(model.config, "model_type", None), "config.json")
    if family.model_shape is None or not instances:
        return None
    shape = family.model_shape(model.config.to_dict())
    rows = processor.token_rows(instances, gen_length, with_response=stage is PlannedStage.FINETUNE, labels=labels)
    longest = max(len(row.ids) for row in rows)
    views = max(processor.views_of(inst) for inst in instances)
    trainable_parameters = sum(p.numel() for part in TRAINED_PARTS[trainable]
                               for p in model.parameter_parts()[part])
    per_process = math.ceil(min(batch_size, len(instances)) / processes)
    # The head runs on the supervised positions' columns (fine-tune: the answer, or with chat-turn
    # labels from the first chat marker on), the first block (saliency) or one block (relabel).
    if stage is PlannedStage.FINETUNE:
        answer = max(len(row.ids) - row.supervised.index(True) for row in rows)
    else:
        answer = min(block_length or gen_length, gen_length)
    work = Workload(batch=per_process, sequence=longest, answer=answer, views=views, probes=probes, steps=steps,
                    trainable_parameters=trainable_parameters,
                    trains_language_model=trainable is not TrainableParts.PROJECTOR, checkpointing=checkpointing,
                    shards=processes if sharded else 1)
    return _Plan(shape, work, precision_of(model, device), longest)


def check_stage_memory(model: DiffusionVLM, processor: Processor, stage: PlannedStage, field: str, batch_size: int,
                       instances: Sequence[Instance], gen_length: int, device: torch.device,
                       **settings) -> MemoryEstimate | None:
    """The estimate of the stage's widest batch (`batch_size` rows, or its share on each of the
    settings' `processes`, which split the weights and optimiser state among them when `sharded`;
    the settings are `_plan`'s), or None for a family the planner has no shape for. Raises
    UserInputError naming `field` when it cannot fit the device."""
    plan = _plan(model, processor, stage, batch_size, instances, gen_length, device, **settings)
    if plan is None:
        return None
    shape, work, precision, longest = plan.shape, plan.work, plan.precision, plan.longest
    per_process = work.batch
    estimate = estimate_memory(shape, stage, work, precision)
    usable = usable_memory(device)
    logger.info("memory plan, %s of %d rows of up to %d tokens: %s; this %s has %.1f GiB", field, per_process,
                longest, estimate.describe(), device.type, usable / 2**30)
    if estimate.total > usable:
        fits = largest_batch(shape, stage, dataclasses.replace(work, batch=1), precision, device_memory(device))
        processes = settings.get("processes", 1)
        advice = f"at most {fits * processes} fit" if fits else "not even one row fits: use a device with more memory"
        raise UserInputError(
            f"{field}: {per_process} rows of up to {longest} tokens need about {estimate.total / 2**30:.1f} GiB "
            f"({_largest_parts(estimate)}), more than the {usable / 2**30:.1f} GiB this {device.type} offers; "
            f"{advice}")
    return estimate


def stage_batch(model: DiffusionVLM, processor: Processor, stage: PlannedStage, field: str, requested: int | None,
                group: int, instances: Sequence[Instance], gen_length: int, device: torch.device,
                **settings) -> tuple[int, MemoryEstimate | None]:
    """The batch a stage computes in, and its estimate: the spec's `requested` batch, checked against
    the device; unset (`batchSize: auto`), on a GPU the largest batch the planner fits there with
    its margin (at most AUTO_BATCH_LIMIT rows and the stage's instances), elsewhere `group`, the
    batch of the fixed default (a CPU's memory is no limit worth planning to)."""
    batch = requested or group
    if requested is None and device.type == "cuda":
        plan = _plan(model, processor, stage, 1, instances, gen_length, device, **settings)
        if plan is not None:
            limit = max(1, min(AUTO_BATCH_LIMIT, len(instances)))
            batch = max(1, largest_batch(plan.shape, stage, plan.work, plan.precision, device_memory(device), limit))
            logger.info("%s: auto, %d rows fit this GPU", field, batch)
    return batch, check_stage_memory(model, processor, stage, field, batch, instances, gen_length, device, **settings)


def _largest_parts(estimate: MemoryEstimate) -> str:
    parts = sorted(estimate.parts.items(), key=lambda kv: -kv[1])[:3]
    return ", ".join(f"{name} {value / 2**30:.1f}" for name, value in parts)


def memory_metrics(estimate: MemoryEstimate | None) -> dict[str, float]:
    """The stage manifest's record of the plan (and so the PurificationJob's status)."""
    return {} if estimate is None else {"memoryEstimateGiB": round(estimate.total / 2**30, 2)}
