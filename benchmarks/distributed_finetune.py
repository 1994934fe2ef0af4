"""The fine-tune on N processes against one process, on the same relabelled data: the weights'
largest difference, the losses, optimiser steps, rows each process trains per step, and time.

    .venv/bin/python benchmarks/distributed_finetune.py [--processes 2] [--trainable projector-and-lm]
        [--sharding fsdp]

The job: the shipped base model, 96 training instances (a quarter with the default patch trigger),
relabelled once; then `disp run --stage finetune` with 1 and with N processes on copies of that
run (gloo on CPU here; one process per GPU on a GPU pod), the N processes each holding the whole
model (`--sharding none`, DDP) or a share of it (`--sharding fsdp`). On a machine with fewer free cores than
processes the N-process run is not faster: it shows the results agree, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from disp_api import AttackSpec, TriggerSpec
from disp_runner.attack.poison import poison_dataset
from disp_runner.cli import main as disp
from disp_runner.data.dataset import write_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.jobfile import load_job
from disp_runner.pipeline.artifacts import RunLayout
from disp_runner.models.mdlm.embedded import SHIPPED_BASE_MODEL

INSTANCES, BATCH, EPOCHS = 96, 16, 2


def finetune(manifest: Path, output: Path, processes: int) -> dict:
    if disp(["--no-progress", "run", str(manifest), "--output", str(output), "--stage", "finetune",
             "--processes", str(processes)]) != 0:
        raise SystemExit(f"the {processes}-process fine-tune failed")
    stage = next(output.rglob("finetune/stage-manifest.json"))
    return {"metrics": json.loads(stage.read_text())["metrics"],
            "weights": load_file(str(stage.parent / "model" / "model.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--trainable", default="projector-and-lm", choices=["projector", "projector-and-lm", "all"])
    parser.add_argument("--sharding", default="none", choices=["none", "fsdp"])
    args = parser.parse_args()
    ws = Path(tempfile.mkdtemp(prefix="disp-ddp-"))
    attack = AttackSpec(trigger=TriggerSpec(), poison_rate=0.25)
    write_dataset(poison_dataset(generate_instances(INSTANCES, seed=1), attack, 48).instances, ws / "train")
    job = {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "metadata": {"name": "ddp"}, "spec": {
        "model": {"uri": str(SHIPPED_BASE_MODEL)}, "dataset": {"uri": str(ws / "train")},
        "output": {"uri": str(ws / "one")}, "saliency": {"batchSize": 16}, "relabel": {"batchSize": 32},
        "finetune": {"epochs": EPOCHS, "batchSize": BATCH, "trainable": args.trainable, "learningRate": 1e-4}}}
    manifest, sharded = ws / "job.json", ws / "sharded.json"
    manifest.write_text(json.dumps(job))
    job["spec"]["finetune"]["sharding"] = args.sharding
    sharded.write_text(json.dumps(job))
    for stage in ("saliency", "masking", "relabel"):
        if disp(["--no-progress", "run", str(manifest), "--stage", stage]) != 0:
            raise SystemExit(f"stage {stage} failed")
    # the relabelled run, under the run folder the N-process manifest names (its spec differs)
    shutil.copytree(RunLayout.for_job(load_job(manifest), ws / "one").root,
                    RunLayout.for_job(load_job(sharded), ws / "many").root)
    one = finetune(manifest, ws / "one", 1)
    many = finetune(sharded, ws / "many", args.processes)
    worst = max(float((one["weights"][k].float() - many["weights"][k].float()).abs().max()) for k in one["weights"])
    scale = max(float(t.float().abs().max()) for t in one["weights"].values())
    print(f"\n{INSTANCES} instances, global batch {BATCH}, {EPOCHS} epochs, trainable {args.trainable}, "
          f"sharding of the {args.processes}-process run: {args.sharding}")
    print(f"{'processes':>10} {'steps':>6} {'rows/process/step':>18} {'first loss':>11} {'last loss':>10} "
          f"{'train s':>8}")
    for n, run in ((1, one), (args.processes, many)):
        m = run["metrics"]
        print(f"{n:>10} {m['steps']:>6} {math.ceil(BATCH / n):>18} {m['firstLoss']:>11.5f} {m['lastLoss']:>10.5f} "
              f"{m['trainSeconds']:>8.1f}")
    print(f"largest weight difference: {worst:.2e} (largest weight {scale:.2f}; relative {worst / scale:.1e})")
    shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
