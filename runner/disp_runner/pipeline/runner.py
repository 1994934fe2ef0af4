"""The plumbing every stage shares, written once: skip when complete, check inputs, stage into a
temporary folder, write the manifest last, publish, report progress and time. Also runs a whole
PurificationJob in order (`disp run`), fanning sharded stages out and merging them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from disp_api import PurificationJob, StageName
from disp_runner.device import seed_everything
from disp_runner.diffusion.distributed import Topology
from disp_runner.errors import UserInputError
from disp_runner.folders import StagingFolder
from disp_runner.pipeline.artifacts import Shard, output_lock, write_stage_manifest
from disp_runner.pipeline.context import ShardableStage, Stage, StageContext, StageResult
from disp_runner.pipeline.opening import open_run, start_progress
from disp_runner.provenance import publish_remote_provenance, runner_identity, write_provenance

logger = logging.getLogger(__name__)

@dataclass
class StageOutcome:
    stage: StageName
    skipped: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    shard: Shard | None = None


def _already_complete(ctx: StageContext, stage: StageName, folder: Path, inputs: dict[str, str],
                      shard: Shard | None = None) -> StageOutcome | None:
    manifest = ctx.completed_manifest(folder, inputs)
    if manifest is None:
        return None
    return StageOutcome(stage, skipped=True, seconds=0.0, metrics=manifest.get("metrics", {}), shard=shard)


def _produce(ctx: StageContext, stage: Stage, final: Path, build: Callable[[Path], StageResult],
             inputs: dict[str, str], shard: Shard | None = None, **extra_metrics: Any) -> StageOutcome:
    """Build an output in a staging folder, write its manifest last, publish it (locally, then to
    S3 when the run is mirrored there); on any error the staging folder goes and nothing is complete."""
    start = time.perf_counter()
    staging = StagingFolder(final)
    try:
        digests = ctx.input_digests(stage)  # what the stage reads, before it reads it
        result = build(staging.path)
        seconds = time.perf_counter() - start
        metrics = {"items": result.items, **extra_metrics, **result.metrics}
        write_stage_manifest(staging.path, stage.name, metrics, seconds, shard, inputs, digests, runner_identity())
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    ctx.publish_remote(final)  # files first, manifest last: a crash here leaves the stage incomplete
    return StageOutcome(stage.name, skipped=False, seconds=seconds, metrics=metrics, shard=shard)


def run_stage(stage: Stage, ctx: StageContext) -> StageOutcome:
    """Run one stage (or, with `ctx.shard`, one shard of it) unless its output is already complete."""
    shard = ctx.shard
    if shard is not None and not hasattr(stage, "merge"):
        raise UserInputError(f"stage {stage.name.value} cannot be sharded")
    final = ctx.layout.stage_dir(stage.name) if shard is None else ctx.layout.shard_dir(stage.name, shard)
    with output_lock(final), ctx.output_lease(final):
        return _run_locked(stage, ctx, final, shard)


def _run_locked(stage: Stage, ctx: StageContext, final: Path, shard: Shard | None) -> StageOutcome:
    # Raises, naming the folder, when an earlier stage's output is incomplete or corrupt.
    inputs = ctx.input_fingerprints(stage)
    skipped = _already_complete(ctx, stage.name, final, inputs, shard)  # also when another process just finished it
    if skipped is not None:
        return skipped
    seed_everything(0)
    start_progress(ctx, stage.name, stage.total_items(ctx))
    ctx.progress.update(0, force=True)
    outcome = _produce(ctx, stage, final, lambda out: stage.run(ctx, out), inputs, shard)
    # Resumable state (epoch checkpoints) is superseded by the published output.
    ctx.checkpoints(stage.name).discard()
    # Done, in the stage's own unit (instances, optimiser steps, models): itemsDone = itemsTotal.
    ctx.progress.update(ctx.progress.total, force=True)
    return outcome


def merge_shards(stage: ShardableStage, ctx: StageContext, count: int) -> StageOutcome:
    """Combine the `count` shards of a stage into its output; every shard must be complete."""
    final = ctx.layout.stage_dir(stage.name)
    with output_lock(final), ctx.output_lease(final):
        inputs = ctx.input_fingerprints(stage)
        skipped = _already_complete(ctx, stage.name, final, inputs)
        if skipped is not None:
            return skipped
        shard_dirs = [ctx.layout.shard_dir(stage.name, Shard(i, count)) for i in range(count)]
        for index, folder in enumerate(shard_dirs):
            if ctx.completed_manifest(folder, inputs) is None:
                raise UserInputError(f"{ctx.uri_of(folder)}: shard {index}/{count} of {stage.name.value} is "
                                     f"not complete for these inputs (run it with --shard {index}/{count} first)")
        return _produce(ctx, stage, final, lambda out: stage.merge(ctx, shard_dirs, out), inputs, shards=count)


def shard_count(job: PurificationJob, stage: StageName) -> int:
    return job.spec.shards(stage)


def run_job(job: PurificationJob, output_root: Path | None = None, only: StageName | None = None,
            show_progress: bool = True, on_outcome=None, topology: Topology = Topology(),
            signing_key_file: Path | None = None) -> list[StageOutcome]:
    """Run the job's stages in order in this process (all of them, or `only` one), each skipped when
    complete. Sharded stages run shard by shard, then merge, exactly as the cluster would. Once the
    fine-tune is complete, the run's provenance is written (signed with `signing_key_file`, or the
    key in $DISP_SIGNING_KEY, when either is given)."""
    from disp_runner.stages import STAGES  # the stage registry imports torch-heavy modules

    ctx = open_run(job, output_root, show_progress=show_progress, topology=topology)
    ctx.signing_key_file = signing_key_file
    outcomes: list[StageOutcome] = []
    finetune_dir = ctx.layout.stage_dir(StageName.FINETUNE)
    for name in job.spec.stages():
        if only is not None and name is not only:
            continue
        stage = STAGES[name]
        count = shard_count(job, name)
        if count > 1 and not ctx.is_complete(ctx.layout.stage_dir(name)):
            for index in range(count):
                ctx.shard = Shard(index, count)
                outcome = run_stage(stage, ctx)
                outcomes.append(outcome)
                if on_outcome:
                    on_outcome(outcome)
            ctx.shard = None
            outcome = merge_shards(stage, ctx, count)
        else:
            outcome = run_stage(stage, ctx)
        outcomes.append(outcome)
        if name in PROVENANCE_STAGES and ctx.is_complete(finetune_dir):
            publish_provenance(ctx)  # again after a skipped stage: a crash may have left it unwritten
        if on_outcome:
            on_outcome(outcome)
    return outcomes


# The stages after which the run's provenance is (re)written: the purified model exists, and then
# the evaluation's figures join the record.
PROVENANCE_STAGES = (StageName.FINETUNE, StageName.EVALUATE)


def publish_provenance(ctx: StageContext) -> None:
    """provenance.json (and its signature) for the run as its stage manifests now stand, in the run
    folder, and in an S3-backed run at the run's prefix as well."""
    if ctx.remote is None:
        write_provenance(ctx.job, ctx.layout, signing_key_file=ctx.signing_key_file)
        return
    remote = ctx.remote
    publish_remote_provenance(ctx.job, remote.store, remote.bucket, remote.prefix, ctx.layout.root,
                              signing_key_file=ctx.signing_key_file)


def join_distributed_stage(job: PurificationJob, output_root: Path | None, topology: Topology,
                           show_progress: bool = True) -> None:
    """On a pod other than node 0 of a multi-node fine-tune: train alongside node 0, publish nothing
    (node 0 writes the output and its manifest). Nothing to do once the output is complete."""
    from disp_runner.stages import STAGES

    stage = STAGES[StageName.FINETUNE]
    ctx = open_run(job, output_root, show_progress=show_progress, topology=topology)
    if ctx.is_complete(ctx.layout.stage_dir(stage.name)):
        return
    for needed in stage.inputs:
        ctx.input_dir(needed)
    stage.join(ctx)
