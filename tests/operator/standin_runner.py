"""A stand-in for the runner image in operator tests that are about the operator's own behaviour
(restart, suspend), where importing torch in every pod would only cost time. It honours the
runner's contract with the operator: the same command line (`disp run --manifest-env VAR --stage S
[--round R] [--shard i/N | --merge] [--processes N --nodes M --node-rank I]`), progress.json in the
round's S3 folder while it works (the run's for round 1, round-R/ in it for a later round), the
finetune stage's audit.json and the evaluate stage's metrics.json, each published as the runner
publishes a stage (its files, then its stage manifest, written by the runner's own code) and
followed by the round's provenance.json (the runner's own code again), and exit code 0. How long
each stage takes comes from STANDIN_SECONDS; STANDIN_RESIDUALS=<job name>:<rate>,<rate>,... gives
that job's audit a residual rate per round (else 4% of 21 suspects, below the default threshold);
STANDIN_OVERWRITE_METRICS=<job name> makes that job's evaluate pod overwrite its metrics.json after
publishing it, as someone holding the run's S3 keys could.
The real runner is exercised end to end in tests/e2e/test_operator.py."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from disp_api import AuditFigures, PurificationJob, PurificationMetrics, StageName, StageProgress
from disp_api.contract import PROGRESS_FILE
from disp_api.rounds import round_folder, round_job
from disp_runner.pipeline.artifacts import STAGE_MANIFEST, write_stage_manifest
from disp_runner.provenance import publish_remote_provenance
from disp_store.s3 import S3Store

AUDIT = {"suspicionThreshold": 3.0, "instances": 100, "suspects": 21, "estimatedPoisonedShare": 0.21,
         "residualRate": 0.04, "residualSample": 21}
METRICS = {"asrBefore": 0.97, "asrAfter": 0.02, "falseFiringBefore": 0.01, "falseFiringAfter": 0.0,
           "cleanPerformanceBefore": 0.95, "cleanPerformanceAfter": 0.94, "retention": 0.94 / 0.95}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("command")
    parser.add_argument("--manifest-env", required=True)
    parser.add_argument("--stage", required=True)
    parser.add_argument("--round", type=int, default=1)
    parser.add_argument("--shard")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    args = parser.parse_args()
    if args.node_rank > 0:
        return 0  # the other pods of a multi-node fine-tune publish nothing
    job = PurificationJob.model_validate_json(os.environ[args.manifest_env])
    storage = job.spec.storage
    store = S3Store(storage.endpoint, os.environ["DISP_S3_ACCESS_KEY"], os.environ["DISP_S3_SECRET_KEY"],
                    secure=storage.secure)
    bucket, _, run_key = job.run_uri().removeprefix("s3://").partition("/")
    run_key = "/".join(filter(None, [run_key, round_folder(args.round)]))
    job = round_job(job, args.round)  # its provenance records the round's settings, as the runner's does
    audit = {**AUDIT, **_residual(job.metadata.name, args.round)}
    seconds = float(os.environ.get("STANDIN_SECONDS", "0.5"))
    steps = 5
    for done in range(steps + 1):
        progress = StageProgress(stage=StageName(args.stage), shard=args.shard, fraction=done / steps,
                                 items_done=done, items_total=steps, updated_at=datetime.now(timezone.utc))
        store.put_bytes(bucket, f"{run_key}/{PROGRESS_FILE}", progress.model_dump_json(by_alias=True).encode())
        time.sleep(seconds / steps)
    if args.stage == "finetune":
        AuditFigures.model_validate(audit)  # the same schema the real stage writes
        _publish(job, store, bucket, run_key, StageName.FINETUNE, {"audit.json": audit})
    if args.stage == "evaluate":
        metrics = evaluation_metrics(audit)
        _publish(job, store, bucket, run_key, StageName.EVALUATE, {"metrics.json": metrics})
        if os.environ.get("STANDIN_OVERWRITE_METRICS") == job.metadata.name:
            store.put_bytes(bucket, f"{run_key}/evaluate/metrics.json",
                            json.dumps({**metrics, "asrAfter": 0.0}).encode())
    return 0


def _residual(job_name: str, round_number: int) -> dict:
    """The residual rate STANDIN_RESIDUALS gives this job's round, if it gives one."""
    named, _, rates = os.environ.get("STANDIN_RESIDUALS", "").partition(":")
    if named != job_name:
        return {}
    return {"residualRate": float(rates.split(",")[round_number - 1])}


def evaluation_metrics(audit: dict = AUDIT) -> dict:
    """The evaluate stage's metrics.json, valid under the schema the real stage writes."""
    metrics = {**METRICS, "before": _model_metrics(0.97), "after": _model_metrics(0.02), "audit": audit,
               "estimatedPoisonedShare": audit["estimatedPoisonedShare"], "residualRate": audit["residualRate"],
               "residualSample": audit["residualSample"]}
    PurificationMetrics.model_validate(metrics)
    return metrics


def _publish(job: PurificationJob, store: S3Store, bucket: str, run_key: str, stage: StageName,
             files: dict[str, dict]) -> None:
    """The stage's files, then its manifest, then the run's provenance, as the runner publishes them."""
    with tempfile.TemporaryDirectory(prefix="standin-") as folder:
        out = Path(folder) / stage.value
        out.mkdir()
        for name, record in files.items():
            (out / name).write_text(json.dumps(record))
        write_stage_manifest(out, stage, metrics={}, seconds=0.1)
        for name in [*files, STAGE_MANIFEST]:
            store.put_bytes(bucket, f"{run_key}/{stage.value}/{name}", (out / name).read_bytes())
        publish_remote_provenance(job, store, bucket, run_key, Path(folder) / "run")


def _model_metrics(asr: float) -> dict:
    return {"model": "m", "asrTriggered": asr, "asrUntriggered": 0.0, "cleanPerformance": 0.95,
            "counts": {"triggered": 100, "untriggered": 100, "clean": 100}}


if __name__ == "__main__":
    sys.exit(main())
