"""The stage interface: what a stage is given (`StageInputs`, resolved by the pipeline before it
runs), what it returns (`StageResult`), and the `Stage` protocol every DiSP stage implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping, Protocol

import torch

from disp_api import AttackSpec, PurificationJob, PurificationJobSpec, StageName
from disp_runner.data.instances import Instance
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.distributed import Topology
from disp_runner.models.loading import LoadedModel
from disp_runner.pipeline.artifacts import ProgressReporter, Shard
from disp_runner.pipeline.checkpoints import Checkpoints
from disp_runner.pipeline.inputs import ResolvedInputs, SpecInput


@dataclass
class StageResult:
    """What a stage reports: figures for its manifest (and the operator's status) and item count."""

    items: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StageInputs:
    """Everything a stage reads, resolved by the pipeline: the job's settings, the spec's inputs
    (loaded once per process, when first used), the earlier stages' outputs (verified against their
    manifests), and where to report progress. Nothing here opens storage: that stays with the
    pipeline, which also publishes what the stage writes."""

    job: PurificationJob
    resolved: ResolvedInputs
    upstream: Mapping[StageName, Path]  # the verified output folder of each stage in Stage.inputs
    upstream_uris: Mapping[StageName, str]  # where people find those outputs (an S3 URI in an S3-backed run)
    checkpoints: Checkpoints  # this stage's epoch checkpoints (the fine-tune's)
    shard: Shard | None = None  # the part of the training set this run (or pod) processes
    topology: Topology = Topology()  # the processes a distributed stage (the fine-tune) runs on
    output_root: Path | None = None  # `disp run --output`: what a launched process reopens the run with
    show_progress: bool = True
    round_number: int = 1  # the purification round (spec.rounds) the stage runs in
    progress: ProgressReporter | None = None  # set once the pipeline knows the stage's total

    @property
    def spec(self) -> PurificationJobSpec:
        return self.job.spec

    @property
    def device(self) -> torch.device:
        return self.resolved.device

    @property
    def model(self) -> LoadedModel:
        return self.resolved.model

    @property
    def decoding(self) -> DecodingConfig:
        """Relabel's decoding (saliency's block and the fine-tune's response length come from it)."""
        return self.resolved.decoding

    @property
    def evaluation_decoding(self) -> DecodingConfig:
        return self.resolved.evaluation_decoding

    @property
    def training_set(self) -> list[Instance]:
        return self.resolved.training_set

    def evaluation_set(self, spec_input: SpecInput) -> list[Instance]:
        return self.resolved.evaluation_set(spec_input)

    @property
    def evaluation_attack(self) -> AttackSpec:
        return self.resolved.evaluation_attack

    def items(self, batch_size: int) -> range:
        """The training instances this run (or shard) processes: whole batches of `batch_size`."""
        return (self.shard or Shard()).batch_range(len(self.training_set), batch_size)

    def report_progress(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(done)


class WholeOutputStep(Protocol):
    """A step that needs a stage's whole output (every shard's part): the pipeline runs it on the
    output, before its manifest is written, after an unsharded run or after the merge."""

    def apply(self, inputs: StageInputs, out: Path, result: StageResult) -> StageResult:
        """Check or rework the files in `out`; the stage's result with its figures updated."""


class Stage(Protocol):
    """One DiSP stage: algorithm only. The pipeline does the rest (inputs resolved and checked,
    staging folder, manifest, skip-if-complete, publishing, progress, timing)."""

    name: ClassVar[StageName]
    inputs: ClassVar[tuple[StageName, ...]]  # earlier stages whose outputs this one reads
    reads: ClassVar[tuple[SpecInput, ...]]  # the files named in the spec it reads
    whole_output_steps: ClassVar[tuple[WholeOutputStep, ...]]  # run once the whole output is there

    def total_items(self, inputs: StageInputs) -> int:
        """How many items this run (or shard) will process, for progress."""

    def run(self, inputs: StageInputs, out: Path) -> StageResult:
        """Compute and write this stage's files into `out`."""


class ShardableStage(Stage, Protocol):
    """A per-instance stage that can be split into shards and merged (an Indexed Job in the cluster)."""

    def merge(self, inputs: StageInputs, shard_dirs: list[Path], out: Path) -> StageResult:
        """Combine the shards' outputs (in shard order) into the stage's output in `out`."""
