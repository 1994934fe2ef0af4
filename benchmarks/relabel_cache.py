"""Prompt-cache decoding (`relabel.decoding.cache`) measured against exact decoding.

    .venv/bin/python benchmarks/relabel_cache.py --part speed [--instances 2]   # LLaDA-V-shaped, ~8 min on 2 CPU cores
    .venv/bin/python benchmarks/relabel_cache.py --part demo [WORKDIR]          # the demo's backdoors, ~10 min

speed: the LLaDA-V-shaped ~120M-parameter configuration of bench_stages.py (1,485 visual tokens
for a 384 px image, sequence 1,573, random weights) decodes the same masked inputs (30% of the
visual tokens of each image masked at random: which ones does not change the cost) exactly and
with each cache setting; prints seconds, generated tokens/s, the speed-up over exact decoding, and
agreement with it (answers identical, and positions identical). Random weights make near-flat
logits whose argmax any perturbation flips, so agreement here is a lower bound; the trained
models of `--part demo` measure it where answers mean something.

demo: for each compromised model `make demo` left in WORKDIR (default runs/demo), DiSP runs with
exact relabel decoding and again with `relabel.decoding.cache: prefix` (saliency and masking
reused; the evaluation stays exact), and the table gives relabel's time, how many relabel answers
are identical, ASR after and retention of both runs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import torch

from demo_runs import SCENARIOS, demo_manifest, pct, run
from disp_api import DecodingCache, StageName
from disp_runner.data.dataset import load_dataset
from disp_runner.data.synthetic import generate_instances
from disp_runner.device import default_device
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.inference import generate_response_ids
from disp_runner.disp.masking import mask_image_embeds
from disp_runner.pipeline.artifacts import RunLayout, read_stage_manifest


# -- speed: the LLaDA-V-shaped configuration ------------------------------------------------------
def decode(model, processor, instances, masked, decoding: DecodingConfig, batch_size: int) -> torch.Tensor:
    """Response ids [N, gen] of the masked inputs, decoded as relabel decodes them."""
    mask_embedding = model.mask_embedding().detach()
    ids = torch.cat([part.cpu() for part in generate_response_ids(
        model, processor, instances, decoding, batch_size,
        transform_image_embeds=lambda embeds, rows: mask_image_embeds(embeds, masked[rows], mask_embedding))])
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return ids


def speed(instances_count: int, batch_size: int) -> None:
    from bench_stages import LLADA_V_GEN, build  # the benchmarks' shared configurations

    device = default_device()
    torch.manual_seed(0)
    model, processor, image_size, gen = build("llada-v-100m")
    model.to(device).eval()
    instances = generate_instances(instances_count, seed=0, image_size=image_size)
    tokens = processor.layout_of(instances[0]).num_tokens
    rng = torch.Generator().manual_seed(0)
    masked = [torch.randperm(tokens, generator=rng)[:int(0.3 * tokens)].tolist() for _ in instances]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    length = processor.encode(instances[:1], gen, with_response=False).input_ids.shape[1]
    print(f"device: {name}; model llada-v-100m ({params:.1f}M parameters, {tokens} visual tokens, sequence "
          f"{length}); {len(instances)} instances, batch {batch_size}; torch {torch.__version__}", flush=True)
    single = DecodingConfig(steps=LLADA_V_GEN, gen_length=LLADA_V_GEN, block_length=LLADA_V_GEN)
    blocks = DecodingConfig(steps=LLADA_V_GEN, gen_length=LLADA_V_GEN, block_length=LLADA_V_GEN // 4)
    settings = [("exact, 1 block", single), ("prefix", dataclasses.replace(single, cache=DecodingCache.PREFIX)),
                ("prefix, refresh every 8", dataclasses.replace(single, cache=DecodingCache.PREFIX,
                                                                cache_refresh_steps=8)),
                ("prefix, refresh every 4", dataclasses.replace(single, cache=DecodingCache.PREFIX,
                                                                cache_refresh_steps=4)),
                ("exact, 4 blocks", blocks), ("prefix, 4 blocks", dataclasses.replace(blocks, cache=DecodingCache.PREFIX)),
                ("dual, 4 blocks", dataclasses.replace(blocks, cache=DecodingCache.DUAL))]
    rows, reference = [], {}
    for label, decoding in settings:
        start = time.perf_counter()
        ids = decode(model, processor, instances, masked, decoding, batch_size)
        seconds = time.perf_counter() - start
        exact_label = "exact, 4 blocks" if "4 blocks" in label else "exact, 1 block"
        if decoding.cache is DecodingCache.NONE:
            reference[label] = (ids, seconds)
        ref_ids, ref_seconds = reference[exact_label]
        rows.append((label, seconds, ref_seconds / seconds, (ids == ref_ids).all(dim=1).float().mean().item(),
                     (ids == ref_ids).float().mean().item()))
        print(f"  {label}: {seconds:.1f}s", flush=True)
    generated = len(instances) * gen
    print(f"\n{'decoding (32 steps, gen 32)':<28} {'seconds':>8} {'tokens/s':>9} {'speed-up':>9} "
          f"{'answers same':>13} {'positions same':>15}")
    for label, seconds, speedup, answers, positions in rows:
        print(f"{label:<28} {seconds:8.1f} {generated / seconds:9.3g} {speedup:8.1f}x {100 * answers:12.1f}% "
              f"{100 * positions:14.1f}%")


# -- demo: the trained backdoored models -----------------------------------------------------------
def relabel_answers(layout: RunLayout) -> dict[str, str]:
    dataset = load_dataset(layout.stage_dir(StageName.RELABEL) / "dataset", None)
    return {inst.id: inst.response for inst in dataset}


def relabel_seconds(layout: RunLayout) -> float:
    return read_stage_manifest(layout.stage_dir(StageName.RELABEL))["seconds"]


def demo(workdir: str) -> None:
    root = Path(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="disp-cache-"))
    rows = []
    for name in SCENARIOS:
        document = demo_manifest(root, name, scratch)
        if "evaluation" in document["spec"]:  # the demo's YAML anchor shares one dict: keep evaluation exact
            document["spec"]["evaluation"]["decoding"] = copy.deepcopy(document["spec"]["relabel"]["decoding"])
        exact, exact_layout = run(document, scratch)
        document["spec"]["relabel"]["decoding"]["cache"] = DecodingCache.PREFIX.value
        cached, cached_layout = run(document, scratch, seed_from=exact_layout)
        a, b = relabel_answers(exact_layout), relabel_answers(cached_layout)
        same = sum(a[k] == b.get(k) for k in a) / len(a)
        rows.append((name, exact, cached, relabel_seconds(exact_layout), relabel_seconds(cached_layout), same))
        print(f"{name}: done", flush=True)
    print(f"\n{'scenario':<25} {'relabel s':>10} {'relabel s':>10} {'answers':>8} {'ASR after':>10} "
          f"{'ASR after':>10} {'retention':>10} {'retention':>10}")
    print(f"{'':<25} {'exact':>10} {'prefix':>10} {'same':>8} {'exact':>10} {'prefix':>10} {'exact':>10} "
          f"{'prefix':>10}")
    for name, exact, cached, t_exact, t_cached, same in rows:
        print(f"{name:<25} {t_exact:10.1f} {t_cached:10.1f} {pct(same):>8} {pct(exact.asr_after):>10} "
              f"{pct(cached.asr_after):>10} {pct(exact.retention):>10} {pct(cached.retention):>10}")
    print(f"\nruns: {scratch}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "demo"], required=True)
    parser.add_argument("workdir", nargs="?", default="runs/demo", help="demo: where `make demo` left its models")
    parser.add_argument("--instances", type=int, default=2, help="speed: instances decoded by every setting")
    parser.add_argument("--batch", type=int, default=2, help="speed: batch size")
    args = parser.parse_args(argv)
    if args.part == "speed":
        speed(args.instances, args.batch)
    else:
        demo(args.workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
