"""Throughput of the DiSP stages, and the cost of saliency relative to one plain forward pass.

    .venv/bin/python benchmarks/bench_stages.py                 # embedded size, CPU or GPU
    .venv/bin/python benchmarks/bench_stages.py --size 100m     # ~100M-parameter config (GPU, bf16)
    .venv/bin/python benchmarks/bench_stages.py --size llada-v-100m --batch 1 --instances 2 --repeats 1
                                        # LLaDA-V-shaped: 1,485 visual tokens per 384 px image
    python benchmarks/bench_stages.py --size llada-v-8b --batch 1 --instances 4 --repeats 1
                                        # the published size (a GPU of 80 GB; benchmarks/gpu_scale.sh
                                        # measures it at both token counts with memory and MFU)

Prints figures, never asserts: saliency cost as a ratio to a plain forward pass on the same batch
(and to the ideal 1 forward + m backward, from a measured single backward), samples/s of each
stage, relabel tokens/s exact and with the prefix cache, and the fine-tune's sequence tokens/s.
Random weights: speed does not depend on what the model learnt.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the LLaDA-V stand-in lives with the tests

from disp_api import DecodingCache
from disp_runner.data.synthetic import generate_instances
from disp_runner.device import autocast, default_device
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.disp.masking import mask_image_embeds, top_salient_tokens
from disp_runner.disp.saliency import SaliencyConfig, fisher_jacobian_scores, region_kl_scores
from disp_runner.disp.token_grid import window_masks
from tests.stand_ins.llada_v import build_model as build_llada_v
from tests.stand_ins.llada_v import stand_in_tokenizer
from disp_runner.models.mdlm import build_model as build_mdlm
from disp_runner.models.mdlm.embedded import EMBEDDED_MODEL_SIZE, build_embedded_tokenizer
from disp_runner.diffusion.inference import generate_responses
from disp_runner.diffusion.training import TrainableParts, TrainingConfig, train_masked_diffusion

SIZES = {
    "embedded": EMBEDDED_MODEL_SIZE,
    # ~100M parameters (LM 12 x 768), a 16x16-token vision tower on 128 px images.
    "100m": {**EMBEDDED_MODEL_SIZE, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512, "image_size": 128, "patch_size": 8,
             "vision_stem_channels": 64, "vision_hidden_size": 384, "vision_num_layers": 6, "vision_num_heads": 6,
             "vision_intermediate_size": 1536, "gen_length": 32},
}
# LLaDA-V's layer types, vocabulary and token counts (SigLIP patch 14 at 384 px: 27 x 27 tokens a
# view, anyres packing: 1,485 tokens for a 384 px image) at smaller widths: ~120M parameters, most
# of them the 126,464-entry embedding and head.
LLADA_V_100M = dict(vocab_size=126464, hidden_size=384, intermediate_size=1152, num_hidden_layers=6,
                    num_attention_heads=6, num_key_value_heads=6, max_position_embeddings=8192,
                    vision_config=dict(hidden_size=192, intermediate_size=768, num_hidden_layers=26,
                                       num_attention_heads=3, image_size=384, patch_size=14))
# GSAI-ML/LLaDA-V as published: LLaDA-8B (4096 wide, 32 layers) after SigLIP so400m-patch14-384
# (the config's default tower): 8.4 B parameters. Built on the device, never downloaded.
LLADA_V_8B = dict(vocab_size=126464, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192, rope_theta=500000.0)
# The published vocabulary and token geometry at tiny widths: the large sizes' code path in seconds.
LLADA_V_TINY = dict(vocab_size=126464, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2))
FAMILY_SIZES = {"llada-v-tiny": LLADA_V_TINY, "llada-v-100m": LLADA_V_100M, "llada-v-8b": LLADA_V_8B}
LLADA_V_IMAGE, LLADA_V_GEN = 384, 32  # the authors' purification decoding: 32 steps / length / block


def build_llada_v_on(size: str, device: torch.device):
    """(model, processor) of a LLaDA-V size with random weights, initialised where it runs and in
    the precision a loaded checkpoint is held in there (bf16 on a GPU, fp32 on a CPU): 8 B
    parameters never pass through the CPU."""
    corpus = [t for inst in generate_instances(300, seed=9) for t in (inst.prompt, inst.response)]
    tokenizer = stand_in_tokenizer(corpus)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            return build_llada_v(tokenizer, **FAMILY_SIZES[size])
    finally:
        torch.set_default_dtype(previous)


def build(size: str, device: torch.device | None = None):
    """(model, processor, image size, answer length) of a named configuration."""
    if size in FAMILY_SIZES:
        model, processor = build_llada_v_on(size, device or default_device())
        return model, processor, LLADA_V_IMAGE, LLADA_V_GEN
    model, processor = build_mdlm(build_embedded_tokenizer(), **SIZES[size])
    return model, processor, processor.image_size, model.config.gen_length


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Median seconds of `repeats` calls after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES) + sorted(FAMILY_SIZES), default="embedded")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--instances", type=int, default=128, help="instances for the per-stage throughput runs")
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    device = default_device()
    torch.manual_seed(0)
    model, processor, image_size, gen = build(args.size, device)
    model.to(device).eval()
    instances = generate_instances(args.instances, seed=0, image_size=image_size)
    batch = processor.encode(instances[:args.batch], gen, with_response=False).to(device)
    layouts = [processor.layout_of(inst) for inst in instances[:args.batch]]
    windows = len(window_masks(layouts[0], 2))
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; precision: {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
          f"model: {args.size} ({params / 1e6:.1f}M parameters, {layouts[0].num_tokens} visual tokens, "
          f"sequence {batch.input_ids.shape[1]}); batch {args.batch}; torch {torch.__version__}")

    # -- saliency cost relative to a plain forward pass on the same batch ------------------------
    def forward():
        with torch.no_grad(), autocast(device):
            model(input_ids=batch.input_ids, pixel_values=batch.pixel_values, image_sizes=batch.image_sizes,
                  attention_mask=batch.attention_mask, visual_spans=batch.visual_spans)

    def forward_backward():
        with autocast(device):
            embeds = model.embed_images(batch.pixel_values, batch.image_sizes).detach().requires_grad_(True)
            logits = model(input_ids=batch.input_ids, image_embeds=embeds, attention_mask=batch.attention_mask,
                           visual_spans=batch.visual_spans)
        torch.autograd.grad(logits[:, -gen:].float().sum(), embeds)

    config = SaliencyConfig(probes=args.probes, block_length=gen)

    def saliency():
        with autocast(device):
            fisher_jacobian_scores(model, batch, gen, config, torch.Generator(device=device).manual_seed(0))

    region = SaliencyConfig(probes=args.probes, block_length=gen, region_size=2)

    def region_refinement():  # what saliency.regionSize 2 adds: the exact KL of every 2x2 window
        with autocast(device):
            region_kl_scores(model, batch, gen, region, layouts)

    t_fwd = timed(forward, device, args.repeats)
    t_fb = timed(forward_backward, device, args.repeats)
    t_sal = timed(saliency, device, args.repeats)
    # One extra forward per window: measured where that is affordable (the embedded grid's 25).
    t_region = timed(region_refinement, device, args.repeats) if windows <= 100 else None
    t_bwd = max(t_fb - t_fwd, 1e-9)
    print(f"\nplain forward: {1e3 * t_fwd:.1f} ms; forward + 1 backward: {1e3 * t_fb:.1f} ms")
    print(f"saliency (m = {args.probes}): {1e3 * t_sal:.1f} ms = {t_sal / t_fwd:.1f} x plain forward; "
          f"ideal 1 forward + {args.probes} backward = {(t_fwd + args.probes * t_bwd) / t_fwd:.1f} x; "
          f"measured / ideal = {t_sal / (t_fwd + args.probes * t_bwd):.2f}")
    if t_region is None:
        print(f"regionSize 2 adds {windows} windows, one forward pass each: not measured")
    else:
        print(f"regionSize 2 adds {windows} windows: {1e3 * t_region:.1f} ms = {t_region / t_fwd:.1f} x plain "
              f"forward; saliency with it = {(t_sal + t_region) / t_sal:.2f} x the paper's")

    # -- per-stage throughput --------------------------------------------------------------------
    n = len(instances)
    sequence = batch.input_ids.shape[1]
    all_batch = processor.encode(instances, gen, with_response=False)
    start = time.perf_counter()
    scores = []
    for lo in range(0, n, args.batch):
        part = type(all_batch)(*(t[lo:lo + args.batch] for t in all_batch.tensors()))
        with autocast(device):
            scores.append(fisher_jacobian_scores(model, part.to(device), gen, config,
                                                 torch.Generator(device=device).manual_seed(lo)).cpu())
    sync(device)
    t_saliency = time.perf_counter() - start
    scores = torch.cat(scores)

    start = time.perf_counter()
    masked = top_salient_tokens(scores, 0.3)
    t_masking = time.perf_counter() - start

    mask_embedding = model.mask_embedding().detach()
    decoding = DecodingConfig.single_block(gen)
    start = time.perf_counter()
    answers = generate_responses(model, processor, instances, decoding, batch_size=64, show_progress=False,
                                 transform_image_embeds=lambda e, rows: mask_image_embeds(e, masked[rows],
                                                                                          mask_embedding))
    sync(device)
    t_relabel = time.perf_counter() - start

    start = time.perf_counter()
    generate_responses(model, processor, instances, dataclasses.replace(decoding, cache=DecodingCache.PREFIX),
                       batch_size=64, show_progress=False,
                       transform_image_embeds=lambda e, rows: mask_image_embeds(e, masked[rows], mask_embedding))
    sync(device)
    t_relabel_cached = time.perf_counter() - start

    train_data = processor.encode(instances, gen)
    start = time.perf_counter()
    train_masked_diffusion(model, train_data, processor.mask_token_id, TrainingConfig(epochs=1, batch_size=32,
                                                             trainable=TrainableParts.PROJECTOR), show_progress=False)
    sync(device)
    t_finetune = time.perf_counter() - start

    print(f"\n{'stage':<28} {'samples/s':>10} {'s/sample':>10}")
    for label, seconds, extra in [
            ("saliency (m = %d)" % args.probes, t_saliency, ""),
            ("masking", max(t_masking, 1e-9), ""),
            ("relabel (%d steps)" % decoding.steps, t_relabel, f"({n * gen / t_relabel:.3g} generated tokens/s)"),
            ("relabel, prefix cache", t_relabel_cached, f"({n * gen / t_relabel_cached:.3g} generated tokens/s, "
                                                        f"{t_relabel / t_relabel_cached:.1f}x exact)"),
            ("finetune (projector, 1 ep)", t_finetune, f"({n * sequence / t_finetune:.3g} sequence tokens/s)")]:
        print(f"{label:<28} {n / seconds:10.3g} {seconds / n:10.3g}   {extra}".rstrip())
    print(f"{'evaluate (= decoding)':<28} {n / t_relabel:10.3g} {t_relabel / n:10.3g}   (same decoding as relabel, per model)")
    print(f"\n{sum(bool(a) for a in answers)}/{n} relabel answers non-empty")
    return 0


if __name__ == "__main__":
    sys.exit(main())
