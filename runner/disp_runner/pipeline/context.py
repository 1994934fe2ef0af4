"""What a stage gets to work with: the job, where its files live, and the shared, cached loaders."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from disp_api import AttackRecord, AttackSpec, DecodingCache, PurificationJob, PurificationJobSpec, StageName
from disp_api.spec import ATTACK_MANIFEST
from disp_runner.data.instances import Instance
from disp_runner.data.dataset import load_dataset
from disp_runner.device import default_device
from disp_runner.errors import UserInputError, warn_user
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.distributed import Topology
from disp_runner.diffusion.prompt_cache import require_prompt_caching
from disp_runner.models.base import trained_gen_length
from disp_runner.models.loading import LoadedModel, load_model, load_projector
from disp_runner.pipeline.artifacts import (
    STAGE_MANIFEST,
    ProgressReporter,
    RemoteRun,
    RunLayout,
    Shard,
    read_stage_manifest,
    sha256_file,
    verify_stage_output,
)
from disp_runner.pipeline.checkpoints import CheckpointMirror
from disp_store.credentials import open_s3_store
from disp_store.lease import LEASE_SUFFIX, S3Lease
from disp_store.location import Location, Scheme
from disp_store.fingerprint import local_fingerprint, s3_fingerprint
from disp_store.s3 import S3Store, StoreError
from disp_store.tree import (
    download_folder,
    download_stage,
    read_uploaded_etags,
    remote_stage_complete,
    remote_stage_problem,
    upload_stage,
    write_uploaded_etags,
)


def scratch_root() -> Path:
    """Local working space for S3-backed runs (a pod's writable scratch volume): $DISP_SCRATCH."""
    return Path(os.environ.get("DISP_SCRATCH") or Path(tempfile.gettempdir()) / "disp-scratch")


class SpecInput(str, Enum):
    """A spec field naming files a stage reads: recorded (as a fingerprint) in the stage's manifest,
    so that an output is built again when what the field names has changed."""

    MODEL = "spec.model.uri"
    PROJECTOR = "spec.model.projectorUri"
    DATASET = "spec.dataset.uri"
    TRIGGERED = "spec.evaluation.triggeredUri"
    UNTRIGGERED = "spec.evaluation.untriggeredUri"
    CLEAN = "spec.evaluation.cleanUri"
    ATTACK = "spec.evaluation.attackUri"

    def uri(self, spec: PurificationJobSpec) -> str | None:
        return spec.uris().get(self.value)


# Every stage reads the model under purification (and its projector); these are its other inputs.
MODEL_INPUTS = (SpecInput.MODEL, SpecInput.PROJECTOR)
TRAINING_INPUTS = (*MODEL_INPUTS, SpecInput.DATASET)
EVALUATION_INPUTS = (*MODEL_INPUTS, SpecInput.TRIGGERED, SpecInput.UNTRIGGERED, SpecInput.CLEAN, SpecInput.ATTACK)
UPSTREAM_PREFIX = "stage:"  # an input that is an earlier stage's output: the SHA-256 of its manifest


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
    _model: LoadedModel | None = field(default=None, repr=False)
    _training_set: list[Instance] | None = field(default=None, repr=False)
    _verified: set[Path] = field(default_factory=set, repr=False)
    remote: RemoteRun | None = None
    topology: Topology = Topology()  # the processes a distributed stage (the fine-tune) runs on
    output_root: Path | None = None  # `disp run --output`, which a launched process reopens the run with
    _stores: dict[str, S3Store] = field(default_factory=dict, repr=False)
    _fingerprints: dict[str, str] = field(default_factory=dict, repr=False)  # per process: inputs do not change mid-run
    _digests: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)  # likewise
    signing_key_file: Path | None = None  # `disp run --signing-key`: signs the run's provenance

    @property
    def spec(self) -> PurificationJobSpec:
        return self.job.spec

    @property
    def device(self) -> torch.device:
        return default_device()

    def s3_store(self) -> S3Store:
        if self.remote is not None:
            return self.remote.store
        if "default" not in self._stores:
            self._stores["default"] = open_s3_store(self.spec.storage)
        return self._stores["default"]

    def materialise(self, uri: str, field_name: str) -> Path:
        """A local folder holding what `uri` names: the folder itself, or an ETag-keyed cached copy
        of an s3:// prefix (a rerun downloads only what changed)."""
        location = Location.parse(uri, field_name)
        if location.scheme is Scheme.LOCAL:
            if location.path.is_file():
                raise UserInputError(f"{field_name}: {location.path} is a file; a folder is expected here")
            return location.path
        cache = scratch_root() / "cache" / location.bucket / location.key
        return download_folder(self.s3_store(), location.bucket, location.key, cache)

    def materialise_file(self, uri: str, field_name: str, hint: str = "") -> Path:
        """A local file holding what `uri` names: the file itself, or a copy of the s3:// object in
        the scratch cache."""
        location = Location.parse(uri, field_name)
        if location.scheme is Scheme.LOCAL:
            if location.path.is_dir():
                raise UserInputError(f"{field_name}: {location.path} is a folder; a file is expected here"
                                     + (f" ({hint})" if hint else ""))
            if not location.path.is_file():
                raise UserInputError(f"{field_name}: {location.path} not found" + (f" ({hint})" if hint else ""))
            return location.path
        copy = scratch_root() / "cache" / location.bucket / location.key
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(self.s3_store().get_bytes(location.bucket, location.key))
        return copy

    def decoding(self, evaluation: bool = False) -> DecodingConfig:
        """Relabel's decoding (which also sets saliency's block and the fine-tune's response
        length), or, with `evaluation`, the evaluation's (default: relabel's), with what the
        manifest leaves out taken from the model under purification."""
        spec, field_name = self.spec.relabel.decoding, "spec.relabel.decoding"
        if evaluation and self.spec.evaluation is not None and self.spec.evaluation.decoding is not None:
            spec, field_name = self.spec.evaluation.decoding, "spec.evaluation.decoding"
        model_gen_length = trained_gen_length(self.compromised_model().model.config)
        if spec.gen_length is not None and model_gen_length and spec.gen_length != model_gen_length:
            warn_user(f"{field_name}.genLength {spec.gen_length}: the model was trained to answer in "
                      f"{model_gen_length} positions (config gen_length); leave genLength out to use them")
        config = DecodingConfig.for_model(spec, model_gen_length, field_name)
        if config.cache is not DecodingCache.NONE:
            # Checked here, where saliency asks first, so nothing expensive runs before the refusal.
            require_prompt_caching(self.compromised_model().model, config, field_name)
        return config

    def evaluation_attack(self) -> AttackSpec:
        """The trigger and target the evaluation's ASR rule is for: spelled out in the spec, or read
        from the attack.json of the attack folder spec.evaluation.attackUri names."""
        spec = self.spec.evaluation
        assert spec is not None
        if spec.attack is not None:
            return spec.attack
        field_name = "spec.evaluation.attackUri"
        uri, path = self.attack_record_file()
        try:
            return AttackRecord.parse(path.read_bytes()).attack
        except ValueError as exc:
            raise UserInputError(f"{field_name}: {uri} is {exc}") from None

    def input_fingerprints(self, stage: "Stage") -> dict[str, str]:
        """What `stage` reads, fingerprinted: each spec field it reads that the spec sets, and the
        manifest of each earlier stage output it reads (verified, and downloaded if need be)."""
        fingerprints = {}
        for spec_input in stage.reads:
            uri = spec_input.uri(self.spec)
            if uri is None:
                continue
            if spec_input.value not in self._fingerprints:
                location = Location.parse(uri, spec_input.value)
                self._fingerprints[spec_input.value] = (
                    local_fingerprint(location.path, spec_input.value)
                    if location.scheme is Scheme.LOCAL
                    else s3_fingerprint(self.s3_store(), location.bucket, location.key))
            fingerprints[spec_input.value] = self._fingerprints[spec_input.value]
        for needed in stage.inputs:
            manifest = self.input_dir(needed) / STAGE_MANIFEST  # raises, naming the folder, when incomplete
            fingerprints[UPSTREAM_PREFIX + needed.value] = "sha256:" + sha256_file(manifest)
        return fingerprints

    def input_digests(self, stage: "Stage") -> dict[str, dict[str, Any]]:
        """The content of each spec input `stage` reads, digested file by file (for the stage's
        manifest and the run's provenance): a folder's every file, the projector file, or the
        attack record an attack folder holds. An s3:// input is digested in its local copy."""
        from disp_runner.provenance import content_digest  # hashing only; kept out of the import graph's core

        for spec_input in stage.reads:
            uri = spec_input.uri(self.spec)
            if uri is None or spec_input.value in self._digests:
                continue
            if spec_input is SpecInput.PROJECTOR:
                path = self.materialise_file(uri, spec_input.value)
            elif spec_input is SpecInput.ATTACK:
                _, path = self.attack_record_file()
            else:
                path = self.materialise(uri, spec_input.value)
            self._digests[spec_input.value] = content_digest(path)
        return {s.value: self._digests[s.value] for s in stage.reads if s.value in self._digests}

    def attack_record_file(self) -> tuple[str, Path]:
        """The URI of the attack.json that spec.evaluation.attackUri names (a folder or the file),
        and a local copy of it."""
        uri = self.spec.evaluation.attack_uri.rstrip("/")
        if not uri.endswith("/" + ATTACK_MANIFEST) and uri != ATTACK_MANIFEST:
            uri = f"{uri}/{ATTACK_MANIFEST}"
        return uri, self.materialise_file(uri, "spec.evaluation.attackUri", "an attack folder written by disp attack?")

    def is_complete(self, folder: Path) -> bool:
        """Whether `folder` holds a published output: in an S3-backed run, its manifest must be in
        the store (a local copy alone does not count). A cheap look; completed_manifest decides."""
        if self.remote is None:
            return (folder / STAGE_MANIFEST).is_file()
        return remote_stage_complete(self.remote.store, self.remote.bucket, self.remote.stage_prefix(self.layout, folder))

    def completed_manifest(self, folder: Path, inputs: dict[str, str]) -> dict[str, Any] | None:
        """The manifest of the output at `folder` when it is complete, intact and was built from
        `inputs` (see input_fingerprints); None when it must be built (again), after saying why
        when an output was there. In an S3-backed run the store decides: an output is complete when
        its manifest is in the store and every file it lists is there, unchanged; a verified local
        copy that the store lacks (an upload cut short, objects deleted or overwritten) is uploaded
        again rather than rebuilt."""
        where = folder.relative_to(self.layout.root).as_posix()
        if self.remote is None:
            manifest = self._verified_local(folder, where)
        else:
            manifest = self._verified_remote(folder, where)
        if manifest is None:
            return None
        recorded = manifest.get("inputs")
        if recorded != inputs:
            changed = sorted(k for k in set(inputs) | set(recorded or {}) if (recorded or {}).get(k) != inputs.get(k))
            warn_user(f"{where}: {', '.join(changed)} changed since this output was built; building it again")
            self._verified.discard(folder)
            return None
        return manifest

    def _verified_local(self, folder: Path, where: str) -> dict[str, Any] | None:
        if not (folder / STAGE_MANIFEST).is_file():
            return None
        try:
            manifest = verify_stage_output(folder) if folder not in self._verified else read_stage_manifest(folder)
        except UserInputError as exc:
            warn_user(f"{where}: not intact ({exc}); building it again")
            return None
        self._verified.add(folder)
        return manifest

    def _verified_remote(self, folder: Path, where: str) -> dict[str, Any] | None:
        assert self.remote is not None
        store, bucket, prefix = self.remote.store, self.remote.bucket, self.remote.stage_prefix(self.layout, folder)
        remote_raw = store.get_bytes_or_none(bucket, f"{prefix}/{STAGE_MANIFEST}")
        local_raw = (folder / STAGE_MANIFEST).read_bytes() if (folder / STAGE_MANIFEST).is_file() else None
        problem = None if remote_raw is None else remote_stage_problem(
            store, bucket, prefix, remote_raw, read_uploaded_etags(folder))
        if remote_raw is not None and problem is None:
            if local_raw != remote_raw:
                self._drop_local(folder)  # another attempt's copy: the store's wins
            problem = self._fetch_intact(folder)
            if problem is None:
                return read_stage_manifest(folder)
            local_raw = None
        if local_raw is None or (remote_raw is not None and local_raw != remote_raw):
            if problem is not None:
                warn_user(f"{self.uri_of(folder)}: not intact ({problem}); building it again")
            return None
        local = self._verified_local(folder, where)
        if local is None:
            return None
        warn_user(f"{self.uri_of(folder)}: " + ("missing from the store" if remote_raw is None else problem)
                  + "; uploading the verified local copy again")
        self.publish_remote(folder)
        return local

    def _drop_local(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        self._verified.discard(folder)

    def _fetch_intact(self, folder: Path) -> str | None:
        """Fetch a published output whose store copy looks complete; what is wrong with it, if
        anything. A scratch copy that no longer matches its manifest is replaced by the store's."""
        for attempt in range(2):
            try:
                self.fetch(folder)
                return None
            except StoreError as exc:  # an object changed since it was published (checksum mismatch)
                self._drop_local(folder)
                return str(exc)
            except UserInputError:  # the scratch copy changed: download the store's
                if attempt:
                    raise
                self._drop_local(folder)
        return None

    def fetch(self, folder: Path) -> Path:
        """A completed stage output (stage or shard folder), downloaded when it lives in S3 only,
        and checked against its manifest."""
        if folder not in self._verified:
            if self.remote is not None and not (folder / STAGE_MANIFEST).is_file():
                etags = download_stage(self.remote.store, self.remote.bucket,
                                       self.remote.stage_prefix(self.layout, folder), folder)
                write_uploaded_etags(folder, etags)
            verify_stage_output(folder)
            self._verified.add(folder)
        return folder

    def uri_of(self, folder: Path) -> str:
        """Where a run folder's content lives for users: its S3 URI in an S3-backed run."""
        if self.remote is None:
            return str(folder)
        return f"s3://{self.remote.bucket}/{self.remote.stage_prefix(self.layout, folder)}"

    def checkpoints(self, stage: StageName) -> CheckpointMirror:
        """`stage`'s epoch checkpoints: on local disk, and mirrored to S3 in an S3-backed run."""
        return CheckpointMirror(stage, self.layout, self.remote)

    def output_lease(self, folder: Path) -> contextlib.AbstractContextManager:
        """In an S3-backed run, the exclusive lease on building `folder` (see store/lease.py)."""
        if self.remote is None:
            return contextlib.nullcontext()
        return S3Lease(self.remote.store, self.remote.bucket,
                       self.remote.stage_prefix(self.layout, folder) + LEASE_SUFFIX)

    def publish_remote(self, folder: Path) -> None:
        if self.remote is not None:
            etags = upload_stage(folder, self.remote.store, self.remote.bucket,
                                 self.remote.stage_prefix(self.layout, folder))
            write_uploaded_etags(folder, etags)

    def compromised_model(self) -> LoadedModel:
        """The model under purification and its processor (loaded once per process, on the stage's device)."""
        if self._model is None:
            source = self.spec.model
            path = self.materialise(source.uri, "spec.model.uri")
            model, processor = load_model(path, allow_unsafe_pickle=source.allow_unsafe_pickle)
            if source.projector_uri is not None:
                load_projector(model, self.materialise_file(source.projector_uri, "spec.model.projectorUri"),
                               allow_unsafe_pickle=source.allow_unsafe_pickle)
            self._model = LoadedModel(model.to(self.device).eval(), processor)
        return self._model

    def image_size(self) -> int:
        return self.compromised_model().processor.image_size

    def training_set(self) -> list[Instance]:
        """The untrusted fine-tuning data, validated against the model's image size."""
        if self._training_set is None:
            path = self.materialise(self.spec.dataset.uri, "spec.dataset.uri")
            self._training_set = load_dataset(path, self.image_size())
        return self._training_set

    def load_evaluation_set(self, uri: str, field_name: str) -> list[Instance]:
        instances = load_dataset(self.materialise(uri, field_name), self.image_size())
        limit = self.spec.evaluation.max_instances if self.spec.evaluation else None
        return instances[:limit] if limit else instances

    def input_dir(self, stage: StageName) -> Path:
        """A previous stage's output folder, checked against its manifest."""
        return self.fetch(self.layout.stage_dir(stage))  # hashed once per process, however often read

    def shard_items(self, batch_size: int) -> range:
        """The training instances this run (or shard) processes: whole batches of `batch_size`."""
        return (self.shard or Shard()).batch_range(len(self.training_set()), batch_size)

    def report_progress(self, done: int) -> None:
        if self.progress is not None:
            self.progress.update(done)


class Stage(Protocol):
    """One DiSP stage: algorithm only. The pipeline does the rest (inputs checked, staging folder,
    manifest, skip-if-complete, progress, timing)."""

    name: ClassVar[StageName]
    inputs: ClassVar[tuple[StageName, ...]]  # earlier stages whose outputs this one reads
    reads: ClassVar[tuple[SpecInput, ...]]  # the files named in the spec it reads

    def total_items(self, ctx: StageContext) -> int:
        """How many items this run (or shard) will process, for progress."""

    def run(self, ctx: StageContext, out: Path) -> StageResult:
        """Compute and write this stage's files into `out`."""


class ShardableStage(Stage, Protocol):
    """A per-instance stage that can be split into shards and merged (an Indexed Job in the cluster)."""

    def merge(self, ctx: StageContext, shard_dirs: list[Path], out: Path) -> StageResult:
        """Combine the shards' outputs (in shard order) into the stage's output in `out`."""
