"""Digests of what every DiSP stage computes on a small job, to show that a refactoring changed no
result: run it under two checkouts and compare the lines.

    .venv/bin/python benchmarks/stage_digests.py BASE_MODEL WORKDIR
    PYTHONPATH=/path/to/other/checkout/api:/path/to/other/checkout/store:/path/to/other/checkout/runner .venv/bin/python \\
        benchmarks/stage_digests.py OTHER_BASE_MODEL OTHER_WORKDIR

The job: 48 training instances (a quarter with the default patch trigger), saliency with
regionSize 2, relabel with minEvidence, a 2-epoch fine-tune and the evaluation, on the given
model (the shipped base model by default). Digests are of contents (score and weight tensors,
masked token lists, relabelled answers), not of files, so a file format that gains a field
still compares equal.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from disp_api import AttackSpec, TriggerSpec
from disp_runner.attack.poison import make_test_sets, poison_dataset
from disp_runner.cli import main as disp
from disp_runner.data.dataset import write_dataset
from disp_runner.data.synthetic import generate_instances


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def tensors_digest(path: Path, names: list[str] | None = None) -> str:
    tensors = load_file(str(path))
    return digest(b"".join(name.encode() + tensors[name].contiguous().numpy().tobytes()
                           for name in sorted(names or tensors)))


def main(base_model: str, workdir: str) -> None:
    ws = Path(workdir)
    attack = AttackSpec(trigger=TriggerSpec(), poison_rate=0.25)
    write_dataset(poison_dataset(generate_instances(48, seed=1), attack, 48).instances, ws / "train")
    triggered, untriggered = make_test_sets(generate_instances(40, seed=2), attack, 48)
    write_dataset(triggered, ws / "triggered")
    write_dataset(untriggered, ws / "untriggered")
    write_dataset(generate_instances(24, seed=3), ws / "clean")
    job = {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "metadata": {"name": "digests"}, "spec": {
        "model": {"uri": base_model}, "dataset": {"uri": str(ws / "train")}, "output": {"uri": str(ws / "out")},
        "saliency": {"batchSize": 16, "regionSize": 2}, "relabel": {"batchSize": 16, "minEvidence": 0.5},
        "finetune": {"epochs": 2, "batchSize": 16},
        "evaluation": {"attack": attack.to_wire(), "triggeredUri": str(ws / "triggered"),
                       "untriggeredUri": str(ws / "untriggered"), "cleanUri": str(ws / "clean")}}}
    (ws / "job.yaml").write_text(json.dumps(job))
    if disp(["run", str(ws / "job.yaml"), "--no-progress"]) != 0:
        raise SystemExit("the job failed")
    run = next((ws / "out").rglob("saliency")).parent
    masked = json.loads((run / "masking" / "masked.json").read_text())
    answers = [json.loads(line)["response"] for line in (run / "relabel/dataset/manifest.jsonl").read_text().splitlines()]
    metrics = json.loads((run / "evaluate" / "metrics.json").read_text())
    print("saliency scores  ", tensors_digest(run / "saliency" / "scores.safetensors", ["scores"]))
    print("masked tokens    ", digest(json.dumps([masked["ids"], masked["tokens"]]).encode()))
    print("relabel answers  ", digest(json.dumps(answers).encode()))
    print("purified weights ", tensors_digest(run / "finetune" / "model" / "model.safetensors"))
    print("metrics          ", {k: metrics[k] for k in ("asrBefore", "asrAfter", "cleanPerformanceBefore",
                                                        "cleanPerformanceAfter")})
    print("torch", torch.__version__)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
