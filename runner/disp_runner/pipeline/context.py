"""What a stage gets to work with: the job, where its files live, and the shared, cached loaders."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from transformers import PreTrainedTokenizerBase

from disp_api import PurificationJob, PurificationJobSpec, StageName
from disp_runner.checkpoints import load_checkpoint
from disp_runner.data.dataset import Instance, load_dataset
from disp_runner.device import default_device
from disp_runner.errors import UserInputError
from disp_runner.modeling import MDLMForMaskedDiffusion
from disp_runner.pipeline.artifacts import ProgressReporter, RunLayout, Shard, verify_stage_output


def local_path(uri: str, field_name: str) -> Path:
    """A local folder from a manifest URI (plain path or file://)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise UserInputError(f"{field_name}: {scheme}:// URIs are not supported by this runner yet ({uri})")
    return Path(uri)


@dataclass
class StageResult:
    """What a stage reports: figures for its manifest (and the operator's status) and item count."""

    items: int
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    job: PurificationJob
    layout: RunLayout
    shard: Shard | None = None
    show_progress: bool = True
    progress: ProgressReporter | None = None
    _model: tuple[MDLMForMaskedDiffusion, PreTrainedTokenizerBase] | None = field(default=None, repr=False)
    _training_set: list[Instance] | None = field(default=None, repr=False)
    _verified: set[Path] = field(default_factory=set, repr=False)

    @property
    def spec(self) -> PurificationJobSpec:
        return self.job.spec

    @property
    def device(self) -> torch.device:
        return default_device()

    def compromised_model(self) -> tuple[MDLMForMaskedDiffusion, PreTrainedTokenizerBase]:
        """The model under purification (loaded once per process, on the stage's device)."""
        if self._model is None:
            path = local_path(self.spec.model.uri, "spec.model.uri")
            model, tokenizer = load_checkpoint(path, allow_unsafe_pickle=self.spec.model.allow_unsafe_pickle)
            self._model = (model.to(self.device).eval(), tokenizer)
        return self._model

    def image_size(self) -> int:
        return self.compromised_model()[0].config.image_size

    def training_set(self) -> list[Instance]:
        """The untrusted fine-tuning data, validated against the model's image size."""
        if self._training_set is None:
            path = local_path(self.spec.dataset.uri, "spec.dataset.uri")
            self._training_set = load_dataset(path, self.image_size())
        return self._training_set

    def load_evaluation_set(self, uri: str, field_name: str) -> list[Instance]:
        instances = load_dataset(local_path(uri, field_name), self.image_size())
        limit = self.spec.evaluation.max_instances if self.spec.evaluation else None
        return instances[:limit] if limit else instances

    def input_dir(self, stage: StageName) -> Path:
        """A previous stage's output folder, checked against its manifest."""
        folder = self.layout.stage_dir(stage)
        if folder not in self._verified:  # hash each input once per process, however often it is read
            verify_stage_output(folder)
            self._verified.add(folder)
        return folder

    def report_progress(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(done)


class Stage(Protocol):
    """One DiSP stage: algorithm only. The pipeline does the rest (inputs checked, staging folder,
    manifest, skip-if-complete, progress, timing)."""

    name: ClassVar[StageName]
    inputs: ClassVar[tuple[StageName, ...]]  # earlier stages whose outputs this one reads

    def total_items(self, ctx: StageContext) -> int:
        """How many items this run (or shard) will process, for progress."""

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        """Compute and write this stage's files into `out`."""


class ShardableStage(Stage, Protocol):
    """A per-instance stage that can be split into shards and merged (an Indexed Job in the cluster)."""

    def merge(self, ctx: StageContext, shard_dirs: list[Path], out: Path) -> StageResult:
        """Combine the shards' outputs (in shard order) into the stage's output in `out`."""
