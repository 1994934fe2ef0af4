"""Peak memory of the DiSP stages as the dataset grows: it should not (stages stream instances,
images are decoded a batch at a time).

Builds a small LLaDA-V-format checkpoint (stand-in tokenizer, tiny widths, the published layer
types and anyres packing) and two synthetic datasets of --small and --large instances whose
images have two sizes (so instances have different numbers of visual tokens), then runs each
stage of `disp run` in a fresh process and prints its peak resident memory (ru_maxrss) for both
sizes and their ratio.

    .venv/bin/python benchmarks/memory_scaling.py [--small 1000] [--large 20000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the LLaDA-V stand-in lives with the tests

STAGES = ("saliency", "masking", "relabel", "finetune")
MEASURE = ("import resource, subprocess, sys; "
           "code = subprocess.run(sys.argv[1:]).returncode; "
           "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def make_workspace(root: Path, count: int) -> Path:
    from PIL import Image

    from disp_api import AttackSpec, TriggerSpec
    from disp_runner.attack.poison import poison_dataset
    from disp_runner.data.dataset import write_dataset
    from disp_runner.data.synthetic import generate_instances

    def on_canvas(inst, index):  # every other image on a wider canvas: 10 or 14 visual tokens
        if index % 2 == 0:
            return inst
        canvas = Image.new("RGB", (40, 20))
        canvas.paste(inst.image, (0, 0))
        return inst.replace(image=canvas)

    instances = poison_dataset(generate_instances(count, seed=1, image_size=16, id_prefix="m"),
                               AttackSpec(trigger=TriggerSpec(size=4), poison_rate=0.1), 16).instances
    write_dataset([on_canvas(inst, i) for i, inst in enumerate(instances)], root / f"train-{count}")
    return root / f"train-{count}"


def make_checkpoint(root: Path) -> Path:
    import torch

    from disp_runner.data.synthetic import generate_instances
    from tests.stand_ins.llada_v import build_model, stand_in_tokenizer
    from disp_runner.models.loading import save_model

    corpus = [t for inst in generate_instances(2000, seed=3, image_size=16) for t in (inst.prompt, inst.response)]
    torch.manual_seed(0)
    model, processor = build_model(
        stand_in_tokenizer(corpus), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=512, image_grid_pinpoints="(1x1),...,(3x3)",
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14))
    return save_model(model, processor, root / "model")


def job(root: Path, model: Path, train: Path, name: str) -> Path:
    decoding = {"steps": 12, "genLength": 24, "blockLength": 12}
    document = {"apiVersion": "disp.dev/v1alpha1", "kind": "PurificationJob", "metadata": {"name": name}, "spec": {
        "model": {"uri": str(model)}, "dataset": {"uri": str(train)}, "output": {"uri": str(root / "out")},
        "saliency": {"batchSize": 64}, "relabel": {"batchSize": 64, "decoding": decoding},
        "finetune": {"epochs": 1, "batchSize": 64}}}
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(document))
    return path


def peak_rss_mib(job_file: Path, stage: str) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of `disp run --stage` in a fresh process."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "disp_runner.cli", "run", str(job_file),
                          "--stage", stage, "--no-progress"], capture_output=True, text=True, check=True)
    code, kib = out.stdout.split()[-2:]
    if code != "0":
        raise SystemExit(f"stage {stage} failed:\n{out.stderr[-2000:]}")
    return int(kib) / 1024, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=20000)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    root = args.workdir or Path(tempfile.mkdtemp(prefix="disp-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    model = make_checkpoint(root)
    figures = {}
    for count in (args.small, args.large):
        job_file = job(root, model, make_workspace(root, count), f"n{count}")
        figures[count] = {stage: peak_rss_mib(job_file, stage) for stage in STAGES}
    print(f"peak RSS per stage, a fresh process each (tiny LLaDA-V format, images 16x16 and 40x20; {root})")
    print(f"{'stage':<10} {args.small:>8} inst. {args.large:>8} inst.   ratio   seconds")
    for stage in STAGES:
        (small, t_small), (large, t_large) = figures[args.small][stage], figures[args.large][stage]
        print(f"{stage:<10} {small:>8.0f} MiB {large:>8.0f} MiB   {large / small:5.2f}   {t_small:5.0f} / {t_large:.0f}")


if __name__ == "__main__":
    main()
