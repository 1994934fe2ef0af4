"""Opening a run: the context its stages share (a local run folder, or a scratch copy mirrored to
the run's S3 prefix) and the progress.json a stage reports through. Apart from pipeline/runner.py,
which runs the stages, so that a stage (the fine-tune's launched processes) can open its run
without importing the stage runner that imports every stage."""

from __future__ import annotations

import logging
from pathlib import Path

from disp_api import PurificationJob, StageName
from disp_runner.diffusion.distributed import Topology
from disp_runner.errors import TransientError
from disp_runner.pipeline.artifacts import ProgressReporter, RemoteRun, RunLayout, Shard
from disp_runner.pipeline.context import StageContext, scratch_root
from disp_store.credentials import open_s3_store
from disp_store.location import Location, Scheme

logger = logging.getLogger(__name__)

LOG_INTERVAL = 30.0  # seconds between progress lines in a pod's log


def _progress_path(layout: RunLayout, stage: StageName, shard: Shard | None) -> Path:
    # Shards of one stage run side by side: each keeps its own file beside the run's progress.json.
    if shard is None:
        return layout.progress_file
    return layout.root / f"progress-{stage.value}-{shard.label}.json"


def start_progress(ctx: StageContext, stage: StageName, total: int) -> ProgressReporter:
    """progress.json for `stage` (or the context's shard of it), mirrored to S3 in an S3-backed run."""
    # Without progress bars (a pod's log), a line every LOG_INTERVAL seconds says what is happening.
    ctx.progress = ProgressReporter(_progress_path(ctx.layout, stage, ctx.shard), stage, total, ctx.shard,
                                    mirror=_progress_mirror(ctx),
                                    log_interval=None if ctx.show_progress else LOG_INTERVAL)
    return ctx.progress


def open_run(job: PurificationJob, output_root: Path | None = None, shard: Shard | None = None,
             show_progress: bool = True, topology: Topology = Topology()) -> StageContext:
    """The context a run's stages share. An s3:// output is mirrored: stages work in a local scratch
    copy of the run folder and publish each output to S3 (files, then manifest)."""
    location = Location.parse(job.spec.output.uri, "spec.output.uri")
    common = dict(job=job, shard=shard, show_progress=show_progress, topology=topology, output_root=output_root)
    if output_root is not None or location.scheme is Scheme.LOCAL:
        root = output_root if output_root is not None else location.path
        return StageContext(layout=RunLayout.for_job(job, root), **common)
    layout = RunLayout.for_job(job, scratch_root() / "runs" / location.bucket / location.key)
    store = open_s3_store(job.spec.storage)
    store.check_bucket(location.bucket, f"{location.key}/" if location.key else "")  # fail at once, not after a stage
    run_path = RunLayout.for_job(job, Path()).root.as_posix()  # runs/<namespace>/<name>/<uid>
    remote = RemoteRun(store, location.bucket, "/".join(filter(None, [location.key, run_path])))
    return StageContext(layout=layout, remote=remote, **common)


def run_uri(job: PurificationJob, output_root: Path | None = None) -> str:
    """Where a run's outputs live, for people: a local folder or the S3 prefix."""
    run_path = RunLayout.for_job(job, Path()).root.as_posix()  # runs/<namespace>/<name>/<uid>
    if output_root is not None:
        return str(output_root / run_path)
    return str(Location.parse(job.spec.output.uri, "spec.output.uri").child(run_path))


def _progress_mirror(ctx: StageContext):
    if ctx.remote is None:
        return None
    remote = ctx.remote

    def put(path: Path) -> None:
        # Progress is advisory: an unreachable store must not kill the stage (its outputs still
        # have to be published later, and that does fail loudly).
        try:
            remote.store.put_bytes(remote.bucket, remote.stage_prefix(ctx.layout, path), path.read_bytes())
        except TransientError as exc:
            logger.warning("progress.json not mirrored to S3: %s", exc)

    return put
