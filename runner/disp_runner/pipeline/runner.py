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
from disp_api.rounds import RoundRecord, chosen_round, first_round, judged, next_round
from disp_runner.device import seed_everything
from disp_runner.diffusion.distributed import Topology
from disp_runner.errors import UserInputError
from disp_runner.folders import StagingFolder
from disp_runner.pipeline.artifacts import Shard, output_lock, write_stage_manifest
from disp_runner.pipeline.opening import Run, open_run
from disp_runner.pipeline.stage import ShardableStage, Stage, StageInputs, StageResult
from disp_runner.provenance import runner_identity

logger = logging.getLogger(__name__)

@dataclass
class StageOutcome:
    stage: StageName
    skipped: bool
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    shard: Shard | None = None
    round: int = 1


def _already_complete(run: Run, stage: StageName, folder: Path, inputs: dict[str, str],
                      shard: Shard | None = None) -> StageOutcome | None:
    manifest = run.storage.completed_manifest(folder, inputs)
    if manifest is None:
        return None
    return StageOutcome(stage, skipped=True, seconds=0.0, metrics=manifest.get("metrics", {}), shard=shard,
                        round=run.round_number)


def _produce(run: Run, stage: Stage, final: Path, build: Callable[[Path], StageResult],
             inputs: dict[str, str], shard: Shard | None = None, **extra_metrics: Any) -> StageOutcome:
    """Build an output in a staging folder, write its manifest last, publish it (locally, then
    where the run lives); on any error the staging folder goes and nothing is complete."""
    start = time.perf_counter()
    staging = StagingFolder(final)
    try:
        digests = run.resolved.files.digests(stage.reads)  # what the stage reads, before it reads it
        result = build(staging.path)
        seconds = time.perf_counter() - start
        metrics = {"items": result.items, **extra_metrics, **result.metrics}
        write_stage_manifest(staging.path, stage.name, metrics, seconds, shard, inputs, digests, runner_identity())
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    run.storage.publish(final)  # files first, manifest last: a crash here leaves the stage incomplete
    return StageOutcome(stage.name, skipped=False, seconds=seconds, metrics=metrics, shard=shard,
                        round=run.round_number)


def run_stage(stage: Stage, run: Run, shard: Shard | None = None) -> StageOutcome:
    """Run one stage (or one `shard` of it) unless its output is already complete."""
    if shard is not None and not hasattr(stage, "merge"):
        raise UserInputError(f"stage {stage.name.value} cannot be sharded")
    final = run.output_dir(stage.name, shard)
    with output_lock(final), run.storage.lease(final):
        return _run_locked(stage, run, final, shard)


def _run_locked(stage: Stage, run: Run, final: Path, shard: Shard | None) -> StageOutcome:
    # Raises, naming the folder, when an earlier stage's output is incomplete or corrupt.
    fingerprints = run.input_fingerprints(stage)
    skipped = _already_complete(run, stage.name, final, fingerprints, shard)  # also when another process just finished it
    if skipped is not None:
        return skipped
    seed_everything(0)
    if not run.topology.distributed:  # launched processes resolve their own; this one only launches them
        run.resolved.resolve(stage.reads)
    inputs = run.stage_inputs(stage, shard)
    inputs = run.with_progress(inputs, stage.name, stage.total_items(inputs))
    inputs.progress.update(0, force=True)
    def build(out: Path) -> StageResult:
        result = stage.run(inputs, out)
        # A shard is part of the output: the steps that need all of it run after the merge.
        return result if shard is not None else _whole_output_steps(stage, inputs, out, result)

    outcome = _produce(run, stage, final, build, fingerprints, shard)
    # Resumable state (epoch checkpoints) is superseded by the published output.
    inputs.checkpoints.discard()
    # Done, in the stage's own unit (instances, optimiser steps, models): itemsDone = itemsTotal.
    inputs.progress.update(inputs.progress.total, force=True)
    return outcome


def merge_shards(stage: ShardableStage, run: Run, count: int) -> StageOutcome:
    """Combine the `count` shards of a stage into its output; every shard must be complete."""
    final = run.output_dir(stage.name)
    with output_lock(final), run.storage.lease(final):
        fingerprints = run.input_fingerprints(stage)
        skipped = _already_complete(run, stage.name, final, fingerprints)
        if skipped is not None:
            return skipped
        shard_dirs = [run.output_dir(stage.name, Shard(i, count)) for i in range(count)]
        for index, folder in enumerate(shard_dirs):
            if run.storage.completed_manifest(folder, fingerprints) is None:
                raise UserInputError(f"{run.storage.uri_of(folder)}: shard {index}/{count} of {stage.name.value} is "
                                     f"not complete for these inputs (run it with --shard {index}/{count} first)")
        inputs = run.stage_inputs(stage)
        return _produce(run, stage, final, lambda out: _whole_output_steps(
            stage, inputs, out, stage.merge(inputs, shard_dirs, out)), fingerprints, shards=count)


def _whole_output_steps(stage: Stage, inputs: StageInputs, out: Path, result: StageResult) -> StageResult:
    for step in stage.whole_output_steps:
        result = step.apply(inputs, out, result)
    return result


def shard_count(job: PurificationJob, stage: StageName) -> int:
    return job.spec.shards(stage)


@dataclass
class RunResult:
    """What `run_rounds` did: every stage outcome (each tagged with its round), the rounds with their
    audit's verdicts, and the round whose model is the run's purified model."""

    outcomes: list[StageOutcome]
    rounds: list[RoundRecord]
    chosen: int


def run_job(job: PurificationJob, output_root: Path | None = None, only: StageName | None = None,
            show_progress: bool = True, on_outcome=None, topology: Topology = Topology(),
            signing_key_file: Path | None = None, round_number: int = 1) -> list[StageOutcome]:
    """`run_rounds`' stage outcomes."""
    return run_rounds(job, output_root, only, show_progress, on_outcome, topology, signing_key_file,
                      round_number).outcomes


def run_rounds(job: PurificationJob, output_root: Path | None = None, only: StageName | None = None,
               show_progress: bool = True, on_outcome=None, topology: Topology = Topology(),
               signing_key_file: Path | None = None, round_number: int = 1) -> RunResult:
    """Run the job in this process, each stage skipped when complete: its purification rounds
    (spec.rounds: after each round's fine-tune the audit decides whether the next runs), then the
    evaluation of the round whose model the run keeps; or, with `only`, that one stage of round
    `round_number`. Sharded stages run shard by shard, then merge, exactly as the cluster would.
    Once a round's fine-tune is complete, its provenance is written (signed with
    `signing_key_file`, or the key in $DISP_SIGNING_KEY, when either is given)."""
    outcomes: list[StageOutcome] = []

    def ran(outcome: StageOutcome) -> None:
        outcomes.append(outcome)
        if on_outcome:
            on_outcome(outcome)

    def open_round(number: int) -> Run:
        run = open_run(job, output_root, show_progress=show_progress, topology=topology, round_number=number)
        run.signing_key_file = signing_key_file
        return run

    if only is not None:
        _run_stages(open_round(round_number), [only], ran)
        return RunResult(outcomes, [], round_number)
    records: list[RoundRecord] = []
    record: RoundRecord | None = first_round()
    while record is not None:
        _run_stages(open_round(record.round), [s for s in job.spec.stages() if s is not StageName.EVALUATE], ran)
        audit = next(o for o in reversed(outcomes) if o.stage is StageName.FINETUNE and o.shard is None).metrics
        records.append(judged(record, audit.get("residualRate"), audit.get("residualSample"), job.spec.audit))
        record = next_round(job.spec, records)
    chosen = chosen_round(records)
    if StageName.EVALUATE in job.spec.stages():
        _run_stages(open_round(chosen), [StageName.EVALUATE], ran)
    return RunResult(outcomes, records, chosen)


def _run_stages(run: Run, names: list[StageName], ran: Callable[[StageOutcome], None]) -> None:
    from disp_runner.stages import STAGES  # the stage registry imports torch-heavy modules

    finetune_dir = run.output_dir(StageName.FINETUNE)
    for name in names:
        stage = STAGES[name]
        count = shard_count(run.job, name)
        if count > 1 and not run.storage.is_complete(run.output_dir(name)):
            for index in range(count):
                ran(run_stage(stage, run, Shard(index, count)))
            outcome = merge_shards(stage, run, count)
        else:
            outcome = run_stage(stage, run)
        if name in PROVENANCE_STAGES and run.storage.is_complete(finetune_dir):
            # Again after a skipped stage: a crash may have left it unwritten.
            run.storage.publish_provenance(run.job, run.signing_key_file, run.round_number)
        ran(outcome)


# The stages after which the run's provenance is (re)written: the purified model exists, and then
# the evaluation's figures join the record.
PROVENANCE_STAGES = (StageName.FINETUNE, StageName.EVALUATE)


def join_distributed_stage(job: PurificationJob, output_root: Path | None, topology: Topology,
                           show_progress: bool = True, round_number: int = 1) -> None:
    """On a pod other than node 0 of a multi-node fine-tune: train alongside node 0, publish nothing
    (node 0 writes the output and its manifest). Nothing to do once the output is complete."""
    from disp_runner.stages import STAGES

    stage = STAGES[StageName.FINETUNE]
    run = open_run(job, output_root, show_progress=show_progress, topology=topology, round_number=round_number)
    if run.storage.is_complete(run.output_dir(stage.name)):
        return
    stage.join(run.stage_inputs(stage))
