"""What a run reads from the spec, resolved once per process: the files the spec names, made local
(an s3:// input is downloaded into the scratch cache) and fingerprinted; the model under
purification loaded on the stage's device; the datasets; the decoding settings with what the
manifest leaves out taken from the model. The pipeline builds these and hands them to stages;
a stage never opens a file the spec names itself."""

from __future__ import annotations

import os
import tempfile
from enum import Enum
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from disp_api import AttackRecord, AttackSpec, DecodingCache, PurificationJobSpec
from disp_api.spec import ATTACK_MANIFEST, DecodingSpec
from disp_runner.data.dataset import load_dataset
from disp_runner.data.instances import Instance
from disp_runner.device import default_device
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.prompt_cache import require_prompt_caching
from disp_runner.errors import UserInputError, warn_user
from disp_runner.models.base import trained_gen_length
from disp_runner.models.loading import LoadedModel, load_model, load_projector
from disp_store.credentials import open_s3_store
from disp_store.fingerprint import local_fingerprint, s3_fingerprint
from disp_store.location import Location, Scheme
from disp_store.s3 import S3Store
from disp_store.tree import download_folder


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


class SpecFiles:
    """The files and folders the spec names, as local paths: a local path itself, or an ETag-keyed
    copy of an s3:// prefix in the scratch cache (a rerun downloads only what changed). Fingerprints
    and content digests are taken once per process: inputs do not change mid-run."""

    def __init__(self, spec: PurificationJobSpec, store: Callable[[], S3Store] | None = None) -> None:
        self.spec = spec
        self._open_store = store or (lambda: open_s3_store(spec.storage))
        self._store: S3Store | None = None
        self._fingerprints: dict[SpecInput, str] = {}
        self._digests: dict[SpecInput, dict[str, Any]] = {}

    def store(self) -> S3Store:
        if self._store is None:
            self._store = self._open_store()
        return self._store

    def folder(self, uri: str, field_name: str) -> Path:
        """A local folder holding what `uri` names."""
        location = Location.parse(uri, field_name)
        if location.scheme is Scheme.LOCAL:
            if location.path.is_file():
                raise UserInputError(f"{field_name}: {location.path} is a file; a folder is expected here")
            return location.path
        cache = scratch_root() / "cache" / location.bucket / location.key
        return download_folder(self.store(), location.bucket, location.key, cache)

    def file(self, uri: str, field_name: str, hint: str = "") -> Path:
        """A local file holding what `uri` names: the file itself, or a copy of the s3:// object."""
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
        copy.write_bytes(self.store().get_bytes(location.bucket, location.key))
        return copy

    def attack_record(self) -> tuple[str, Path]:
        """The URI of the attack.json that spec.evaluation.attackUri names (a folder or the file),
        and a local copy of it."""
        uri = self.spec.evaluation.attack_uri.rstrip("/")
        if not uri.endswith("/" + ATTACK_MANIFEST) and uri != ATTACK_MANIFEST:
            uri = f"{uri}/{ATTACK_MANIFEST}"
        return uri, self.file(uri, SpecInput.ATTACK.value, "an attack folder written by disp attack?")

    def fingerprints(self, reads: tuple[SpecInput, ...]) -> dict[str, str]:
        """Each input in `reads` that the spec sets, fingerprinted (cheap: sizes and ETags)."""
        found = {}
        for spec_input in reads:
            uri = spec_input.uri(self.spec)
            if uri is None:
                continue
            if spec_input not in self._fingerprints:
                location = Location.parse(uri, spec_input.value)
                self._fingerprints[spec_input] = (
                    local_fingerprint(location.path, spec_input.value) if location.scheme is Scheme.LOCAL
                    else s3_fingerprint(self.store(), location.bucket, location.key))
            found[spec_input.value] = self._fingerprints[spec_input]
        return found

    def digests(self, reads: tuple[SpecInput, ...]) -> dict[str, dict[str, Any]]:
        """The content of each input in `reads` that the spec sets, digested file by file (for the
        stage's manifest and the run's provenance): a folder's every file, the projector file, or
        the attack record an attack folder holds. An s3:// input is digested in its local copy."""
        from disp_runner.provenance import content_digest  # hashing only; kept out of the import graph's core

        for spec_input in reads:
            uri = spec_input.uri(self.spec)
            if uri is None or spec_input in self._digests:
                continue
            if spec_input is SpecInput.PROJECTOR:
                path = self.file(uri, spec_input.value)
            elif spec_input is SpecInput.ATTACK:
                _, path = self.attack_record()
            else:
                path = self.folder(uri, spec_input.value)
            self._digests[spec_input] = content_digest(path)
        return {s.value: self._digests[s] for s in reads if s in self._digests}


class ResolvedInputs:
    """The spec's inputs resolved, each once per process and only when first asked for (a merge of
    scores never loads the model): the model under purification, the datasets, the decodings."""

    def __init__(self, spec: PurificationJobSpec, files: SpecFiles, device: torch.device | None = None) -> None:
        self.spec = spec
        self.files = files
        self.device = device or default_device()
        self._evaluation_sets: dict[str, list[Instance]] = {}

    def resolve(self, reads: tuple[SpecInput, ...]) -> None:
        """Resolve now what a stage reading `reads` is given, in the order a stage would first use
        it, so that a bad input (an unloadable model, a decoding the model cannot run, a dataset or
        attack record with an error) fails before the stage starts."""
        if SpecInput.MODEL in reads:
            self.model
        if SpecInput.DATASET in reads:
            self.decoding
            self.training_set
        if SpecInput.TRIGGERED in reads:
            self.evaluation_decoding
            for spec_input in (SpecInput.TRIGGERED, SpecInput.UNTRIGGERED, SpecInput.CLEAN):
                self.evaluation_set(spec_input)
            self.evaluation_attack

    @cached_property
    def model(self) -> LoadedModel:
        """The model under purification and its processor, on the stage's device, in eval mode."""
        source = self.spec.model
        model, processor = load_model(self.files.folder(source.uri, SpecInput.MODEL.value),
                                      allow_unsafe_pickle=source.allow_unsafe_pickle)
        if source.projector_uri is not None:
            load_projector(model, self.files.file(source.projector_uri, SpecInput.PROJECTOR.value),
                           allow_unsafe_pickle=source.allow_unsafe_pickle)
        return LoadedModel(model.to(self.device).eval(), processor)

    def make_model_local(self) -> None:
        """The model's files in the local scratch, without loading it (before processes are
        launched that each load it: one download, not one per process)."""
        source = self.spec.model
        self.files.folder(source.uri, SpecInput.MODEL.value)
        if source.projector_uri is not None:
            self.files.file(source.projector_uri, SpecInput.PROJECTOR.value)

    @cached_property
    def decoding(self) -> DecodingConfig:
        """Relabel's decoding, which also sets saliency's block and the fine-tune's response length."""
        return self._decoding(self.spec.relabel.decoding, "spec.relabel.decoding")

    @cached_property
    def evaluation_decoding(self) -> DecodingConfig:
        """The evaluation's decoding: its own when the spec gives one, else relabel's."""
        evaluation = self.spec.evaluation
        if evaluation is not None and evaluation.decoding is not None:
            return self._decoding(evaluation.decoding, "spec.evaluation.decoding")
        return self.decoding

    def _decoding(self, spec: DecodingSpec, field_name: str) -> DecodingConfig:
        """`spec` (validated with the rest of the manifest) completed from the model: what the
        manifest leaves out is what the model was trained with; a prompt cache the model's family
        cannot keep is refused here, before anything expensive runs."""
        model_gen_length = trained_gen_length(self.model.model.config)
        if spec.gen_length is not None and model_gen_length and spec.gen_length != model_gen_length:
            warn_user(f"{field_name}.genLength {spec.gen_length}: the model was trained to answer in "
                      f"{model_gen_length} positions (config gen_length); leave genLength out to use them")
        config = DecodingConfig.for_model(spec, model_gen_length, field_name)
        if config.cache is not DecodingCache.NONE:
            require_prompt_caching(self.model.model, config, field_name)
        return config

    @cached_property
    def training_set(self) -> list[Instance]:
        """The untrusted fine-tuning data, validated against the model's image size."""
        path = self.files.folder(self.spec.dataset.uri, SpecInput.DATASET.value)
        return load_dataset(path, self.model.processor.image_size)

    def evaluation_set(self, spec_input: SpecInput) -> list[Instance]:
        """One of the evaluation's datasets (empty when the spec leaves it out), cut to
        spec.evaluation.maxInstances."""
        uri = spec_input.uri(self.spec)
        if uri is None:
            return []
        if spec_input.value not in self._evaluation_sets:
            instances = load_dataset(self.files.folder(uri, spec_input.value), self.model.processor.image_size)
            limit = self.spec.evaluation.max_instances if self.spec.evaluation else None
            self._evaluation_sets[spec_input.value] = instances[:limit] if limit else instances
        return self._evaluation_sets[spec_input.value]

    @cached_property
    def evaluation_attack(self) -> AttackSpec:
        """The trigger and target the evaluation's ASR rule is for: spelled out in the spec, or read
        from the attack.json of the attack folder spec.evaluation.attackUri names."""
        spec = self.spec.evaluation
        assert spec is not None
        if spec.attack is not None:
            return spec.attack
        uri, path = self.files.attack_record()
        try:
            return AttackRecord.parse(path.read_bytes()).attack
        except ValueError as exc:
            raise UserInputError(f"{SpecInput.ATTACK.value}: {uri} is {exc}") from None
