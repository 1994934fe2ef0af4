"""Padding in the fine-tune's batches on a LLaVA-JSON dataset whose images have mixed sizes (so
LLaDA-V's anyres packing gives each row between ~750 and ~3,700 visual tokens): padded tokens per
epoch when every batch is padded to the dataset's longest row (before), when each global batch is
cut to its own longest row (now, always), and with `finetune.groupByLength` as well.

    .venv/bin/python benchmarks/length_buckets.py [--instances 1024] [--batch 32]

The dataset is written as LLaVA conversations JSON with JPEG images and read back by the runner's
own loader; row lengths are the processor's (published geometry: 384 px views, patch 14,
anyres_max_4); batches are the training loop's own draw (`epoch_batches`). Counts only: nothing
is trained, so the figures are exact.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import torch
from PIL import Image

from bench_stages import build_llada_v_on
from disp_runner.data.dataset import load_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.diffusion.training import epoch_batches
from disp_runner.models.base import EncodedInstances

# Width x height of common photo and screenshot sizes (COCO's 640x480 and 480x640 dominate).
SIZES = [((640, 480), 6), ((480, 640), 3), ((640, 427), 3), ((500, 375), 2), ((384, 384), 1), ((1024, 768), 1),
         ((1920, 1080), 1), ((800, 1200), 1), ((336, 336), 1), ((1280, 720), 1)]


def write_llava(folder: Path, count: int, seed: int) -> Path:
    rng = random.Random(seed)
    sizes = [size for size, weight in SIZES for _ in range(weight)]
    (folder / "images").mkdir(parents=True)
    records = []
    for i, inst in enumerate(generate_instances(count, seed=seed, image_size=16)):
        name = f"images/{i}.jpg"
        Image.new("RGB", rng.choice(sizes), (i % 255, 90, 160)).save(folder / name, quality=80)
        records.append({"id": inst.id, "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{inst.prompt}"}, {"from": "gpt", "value": inst.response}]})
    (folder / "llava.json").write_text(json.dumps(records))
    return folder


def padded(batches: list[list[int]], lengths: list[int], pad_to: int | None = None) -> tuple[int, int]:
    """(positions computed, of which padding) over the batches."""
    total = sum(len(b) * (pad_to or max(lengths[i] for i in b)) for b in batches)
    return total, total - sum(lengths[i] for b in batches for i in b)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--gen-length", type=int, default=32)
    args = parser.parse_args(argv)
    _, processor = build_llada_v_on("llada-v-tiny", torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        instances = load_dataset(write_llava(Path(tmp) / "llava", args.instances, seed=1))
        lengths = EncodedInstances(processor, instances, args.gen_length).lengths
    order = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same draw for every policy
    random_batches = [b.tolist() for b in epoch_batches(len(lengths), args.batch, order())]
    grouped = [b.tolist() for b in epoch_batches(len(lengths), args.batch, order(), lengths)]
    real = sum(lengths)
    print(f"{len(lengths)} LLaVA rows, {min(lengths)}-{max(lengths)} positions (mean {real / len(lengths):.0f}); "
          f"global batch {args.batch}; one epoch")
    before = padded(random_batches, lengths, pad_to=max(lengths))
    for label, (total, pad) in [("padded to the dataset's longest (before)", before),
                                ("cut to each batch's longest (now)", padded(random_batches, lengths)),
                                ("+ finetune.groupByLength", padded(grouped, lengths))]:
        print(f"{label:<42} positions {total:>9}  padding {pad:>9} ({100 * pad / total:4.1f}%)  "
              f"{before[0] / total:4.2f}x fewer positions than before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
