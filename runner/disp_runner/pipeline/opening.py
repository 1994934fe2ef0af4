"""Opening a run: where its outputs live (a local run folder, or a scratch copy mirrored to the
run's S3 prefix), its spec's inputs, what each stage is given, and the progress.json a stage
reports through. Apart from pipeline/runner.py, which runs the stages, so that a stage (the
fine-tune's launched processes) can open its run without importing the stage runner that imports
every stage."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from disp_api import PurificationJob, StageName
from disp_api.rounds import round_folder, round_job
from disp_runner.diffusion.distributed import Topology
from disp_runner.pipeline.artifacts import (STAGE_MANIFEST, UPSTREAM_PREFIX, ProgressReporter, RemoteRun, RunLayout,
                                            Shard, sha256_file)
from disp_runner.pipeline.inputs import ResolvedInputs, SpecFiles, scratch_root
from disp_runner.pipeline.stage import Stage, StageInputs
from disp_runner.pipeline.storage import LocalRunStorage, MirroredRunStorage, RunStorage
from disp_store.credentials import open_s3_store
from disp_store.location import Location, Scheme

LOG_INTERVAL = 30.0  # seconds between progress lines in a pod's log


@dataclass
class Run:
    """An open run: where its outputs live, its spec's inputs (resolved once per process) and how
    this process takes part (its processes, progress bars, signing key)."""

    job: PurificationJob
    storage: RunStorage
    resolved: ResolvedInputs
    topology: Topology = Topology()
    output_root: Path | None = None  # `disp run --output`, which a launched process reopens the run with
    show_progress: bool = True
    signing_key_file: Path | None = None  # `disp run --signing-key`: signs the run's provenance
    round_number: int = 1  # the purification round (spec.rounds) whose folder this is

    @property
    def layout(self) -> RunLayout:
        return self.storage.layout

    def output_dir(self, stage: StageName, shard: Shard | None = None) -> Path:
        return self.layout.stage_dir(stage) if shard is None else self.layout.shard_dir(stage, shard)

    def input_fingerprints(self, stage: Stage) -> dict[str, str]:
        """What `stage` reads, fingerprinted: each spec field it reads that the spec sets, and the
        manifest of each earlier stage output it reads (verified, and downloaded if need be; raises,
        naming the folder, when one is incomplete or corrupt)."""
        fingerprints = self.resolved.files.fingerprints(stage.reads)
        for needed in stage.inputs:
            manifest = self.storage.fetch(self.layout.stage_dir(needed)) / STAGE_MANIFEST
            fingerprints[UPSTREAM_PREFIX + needed.value] = "sha256:" + sha256_file(manifest)
        return fingerprints

    def stage_inputs(self, stage: Stage, shard: Shard | None = None) -> StageInputs:
        """What `stage` (or one shard of it) is given: its earlier outputs fetched and verified, the
        spec's inputs as this process resolved them."""
        upstream = {needed: self.storage.fetch(self.layout.stage_dir(needed)) for needed in stage.inputs}
        return StageInputs(job=self.job, resolved=self.resolved, upstream=upstream,
                           upstream_uris={needed: self.storage.uri_of(folder) for needed, folder in upstream.items()},
                           checkpoints=self.storage.checkpoints(stage.name), shard=shard, topology=self.topology,
                           output_root=self.output_root, show_progress=self.show_progress,
                           round_number=self.round_number)

    def with_progress(self, inputs: StageInputs, stage: StageName, total: int) -> StageInputs:
        """`inputs` reporting to progress.json for `stage` (or its shard), mirrored where the run lives."""
        return replace(inputs, progress=start_progress(self, stage, inputs.shard, total))


def _progress_path(layout: RunLayout, stage: StageName, shard: Shard | None) -> Path:
    # Shards of one stage run side by side: each keeps its own file beside the run's progress.json.
    if shard is None:
        return layout.progress_file
    return layout.root / f"progress-{stage.value}-{shard.label}.json"


def start_progress(run: Run, stage: StageName, shard: Shard | None, total: int) -> ProgressReporter:
    """progress.json for `stage` (or `shard` of it), mirrored to S3 in an S3-backed run."""
    # Without progress bars (a pod's log), a line every LOG_INTERVAL seconds says what is happening.
    return ProgressReporter(_progress_path(run.layout, stage, shard), stage, total, shard,
                            mirror=run.storage.progress_mirror(),
                            log_interval=None if run.show_progress else LOG_INTERVAL)


def open_run(job: PurificationJob, output_root: Path | None = None, show_progress: bool = True,
             topology: Topology = Topology(), round_number: int = 1) -> Run:
    """Open a run, in the folder of its round `round_number` with that round's settings
    (rounds.round_job; `job` may already be the round's). An s3:// output is mirrored: stages work
    in a local scratch copy of the run folder and each output is published to S3 (files, then
    manifest)."""
    job = round_job(job, round_number)
    folder = round_folder(round_number)
    location = Location.parse(job.spec.output.uri, "spec.output.uri")
    storage: RunStorage
    if output_root is not None or location.scheme is Scheme.LOCAL:
        root = output_root if output_root is not None else location.path
        storage = LocalRunStorage(RunLayout.for_job(job, root).within(folder))
    else:
        store = open_s3_store(job.spec.storage)
        store.check_bucket(location.bucket, f"{location.key}/" if location.key else "")  # fail at once, not after a stage
        run_path = RunLayout.for_job(job, Path()).root.as_posix()  # runs/<namespace>/<name>/<uid>
        remote = RemoteRun(store, location.bucket, "/".join(filter(None, [location.key, run_path, folder])))
        storage = MirroredRunStorage(RunLayout.for_job(job, scratch_root() / "runs" / location.bucket / location.key)
                                     .within(folder), remote)
    run_store = storage.s3_store()
    files = SpecFiles(job.spec, store=(lambda: run_store) if run_store is not None else None)
    return Run(job=job, storage=storage, resolved=ResolvedInputs(job.spec, files), topology=topology,
               output_root=output_root, show_progress=show_progress, round_number=round_number)


def run_uri(job: PurificationJob, output_root: Path | None = None) -> str:
    """Where a run's outputs live, for people: a local folder or the S3 prefix."""
    run_path = RunLayout.for_job(job, Path()).root.as_posix()  # runs/<namespace>/<name>/<uid>
    if output_root is not None:
        return str(output_root / run_path)
    return str(Location.parse(job.spec.output.uri, "spec.output.uri").child(run_path))
