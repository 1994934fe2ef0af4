"""The three heavy DiSP stages on LLaDA-V at its published size, on one GPU: peak memory, seconds
per instance, tokens/s and MFU at 1,485 and 3,627 visual tokens, next to the memory planner's
estimate of the same batch.

    python benchmarks/gpu_scale.py                       # llada-v-8b, on the GPU (benchmarks/gpu_scale.sh)
    .venv/bin/python benchmarks/gpu_scale.py --size llada-v-tiny --tokens 1485   # the same code on a CPU

Random weights in the published shapes (LM 4096 wide, 32 layers, vocabulary 126,464; SigLIP
so400m without its last layer; the mlp2x_gelu projector), built on the device in bf16 as a
loaded checkpoint is held there; nothing is downloaded. Images: 384x384 (1,485 visual tokens,
2 views) and 1024x768 (3,627 visual tokens, 7 views), the anyres_max_4 packing of the runner.

MFU = model FLOPs / seconds / the GPU's dense bf16 peak (H100 and H200 SXM: 989.4 TFLOP/s), model
FLOPs from the config (disp_api.planning.stage_flops): 2 FLOPs per parameter per token for the
language model's blocks, 4·L²·D per layer for bidirectional attention, the head on the answer's
positions only, the vision tower and projector on every view; a backward for input gradients as
much as the forward (saliency: 1 forward + m backward; the projector fine-tune: 1 forward + 1
backward down to the projector); relabel: every decoding step a forward. Peak memory is
torch.cuda.max_memory_allocated (tensors; the CUDA context adds ~0.5 GiB outside it).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from disp_runner.data.synthetic import generate_instances
from disp_runner.device import autocast, default_device
from disp_runner.diffusion.decoding import DecodingConfig
from disp_runner.diffusion.inference import generate_responses
from disp_runner.diffusion.training import TrainableParts, TrainingConfig, train_masked_diffusion
from disp_runner.disp.masking import mask_image_embeds, top_salient_tokens
from disp_runner.disp.saliency import SaliencyConfig, fisher_jacobian_scores
from disp_api.model_shapes import llada_v_shape
from disp_api import DecodingCache
from bench_stages import FAMILY_SIZES, build_llada_v_on  # noqa: E402 - benchmarks/ is the script's folder
from disp_api.planning import PlannedStage, Precision, Workload, estimate_memory, largest_batch, stage_flops

IMAGES = {1485: (384, 384), 3627: (1024, 768)}  # (width, height) -> visual tokens under anyres_max_4
DENSE_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
GEN = 32  # the authors' purification decoding: 32 steps, one block of 32


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in DENSE_BF16_PEAK.items() if k in name), None)


class Meter:
    """Seconds and peak allocated bytes of a block (CUDA); seconds only on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = None
        self.seconds = time.perf_counter() - self.start
        return False


def build(size: str, device: torch.device):
    model, processor = build_llada_v_on(size, device)
    return model.eval(), processor, model.config


def report(label, tokens, meter, rows, flops, estimate, peak, extra=""):
    seconds = meter.seconds
    mfu = f"{100 * flops / seconds / peak:5.1f}%" if peak else "   n/a"
    measured = f"{meter.peak / 2**30:6.2f}" if meter.peak is not None else "   n/a"
    ratio = f"{estimate / meter.peak:5.2f}" if meter.peak else "  n/a"
    print(f"{tokens:>6} {label:<26} {rows:>3} {measured} GiB  est {estimate / 2**30:6.2f} GiB (x{ratio})  "
          f"{seconds / rows:7.3f} s/inst  {flops / seconds / 1e12:7.1f} TFLOP/s  MFU {mfu}  {extra}", flush=True)


def guarded(label, tokens, fn):
    """Run one measurement; an out-of-memory is a result (printed), not the end of the run."""
    try:
        fn()
    except torch.OutOfMemoryError as exc:
        print(f"{tokens:>6} {label:<26} out of memory: {str(exc).splitlines()[0][:160]}", flush=True)
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_length(model, processor, config, visual_tokens: int, args, device, peak) -> None:
    shape = llada_v_shape(config.to_dict())
    precision = Precision.for_device(device.type)
    width, height = IMAGES[visual_tokens]
    instances = [inst.replace(image=inst.image.resize((width, height)))
                 for inst in generate_instances(16, seed=visual_tokens, image_size=64)]
    layout = processor.layout_of(instances[0])
    assert layout.num_tokens == visual_tokens, (layout.num_tokens, visual_tokens)
    first = processor.encode(instances[:1], GEN, with_response=False)
    views, sequence = int(first.pixel_values.shape[1]), int(first.input_ids.shape[1])
    work = Workload(batch=1, sequence=sequence, answer=GEN, views=views, probes=args.probes, steps=GEN,
                    trainable_parameters=shape.projector_parameters)
    device_bytes = torch.cuda.get_device_properties(0).total_memory if device.type == "cuda" else None

    def batches(stage, asked):
        """The asked batch, and the planner's largest for this device (capped) when it differs."""
        chosen = [asked]
        if device_bytes is not None:
            auto = min(args.max_auto_batch, largest_batch(shape, stage, work, precision, device_bytes))
            print(f"{visual_tokens:>6} {stage.value:<26} planner: largest batch that fits "
                  f"{device_bytes / 2**30:.0f} GiB = {auto}", flush=True)
            if auto > asked:
                chosen.append(auto)
        return chosen

    chosen: list[list[int]] = []

    # -- saliency: 1 forward + m vector-Jacobian products ----------------------------------------
    def saliency(b):
        batch = processor.encode(instances[:b], GEN, with_response=False).to(device)
        settings = SaliencyConfig(probes=args.probes, block_length=GEN)
        for attempt in range(2):  # the first call warms kernels up
            with Meter(device) as meter, autocast(device):
                scores = fisher_jacobian_scores(model, batch, GEN, settings,
                                                torch.Generator(device=device).manual_seed(attempt))
        w = dataclasses.replace(work, batch=b)
        report(f"saliency (m={args.probes})", visual_tokens, meter, b, stage_flops(shape, PlannedStage.SALIENCY, w),
               estimate_memory(shape, PlannedStage.SALIENCY, w, precision).total, peak,
               f"{b * sequence / meter.seconds:.0f} seq tokens/s")
        if not chosen:  # every instance has the same layout: the first one's top 30% is masked in every row
            chosen.append(top_salient_tokens(scores.cpu(), 0.3)[0])

    for b in batches(PlannedStage.SALIENCY, args.saliency_batch):
        guarded("saliency", visual_tokens, lambda: saliency(b))
    mask_embedding = model.mask_embedding().detach()
    masked = chosen[0] if chosen else list(range(visual_tokens // 3))

    def hide(embeds, rows):
        return mask_image_embeds(embeds, [masked] * len(embeds), mask_embedding)

    # -- relabel: 32 decoding steps, exact and with the prefix cache -----------------------------
    def relabel(stage, cache, b):
        decoding = dataclasses.replace(DecodingConfig.single_block(GEN), cache=cache)
        with Meter(device) as meter:
            answers = generate_responses(model, processor, instances[:b], decoding, batch_size=b,
                                         show_progress=False, transform_image_embeds=hide)
        w = dataclasses.replace(work, batch=b)
        report(stage.value, visual_tokens, meter, b, stage_flops(shape, stage, w),
               estimate_memory(shape, stage, w, precision).total, peak,
               f"{b * GEN / meter.seconds:.1f} generated tokens/s; {sum(map(bool, answers))}/{b} non-empty")

    for stage, cache in ((PlannedStage.RELABEL, DecodingCache.NONE), (PlannedStage.RELABEL_CACHED, DecodingCache.PREFIX)):
        guarded(stage.value, visual_tokens, lambda: relabel(stage, cache, args.relabel_batch))

    # -- fine-tune (the projector, DiSP's default): one step, the first excluded --------------------
    def finetune(b):
        steps = args.finetune_steps
        rows = [inst.replace(response="a red square in the middle of the image") for inst in instances]
        data = processor.encode((rows * (b * (steps + 1)))[:b * (steps + 1)], GEN)
        stamps: list[float] = []

        def on_step(step, total, loss):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

        with Meter(device) as meter:
            train_masked_diffusion(model, data, processor.mask_token_id,
                                   TrainingConfig(epochs=1, batch_size=b, trainable=TrainableParts.PROJECTOR,
                                                  warmup_ratio=0.0), show_progress=False, on_step=on_step)
        meter.seconds = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
        w = dataclasses.replace(work, batch=b)
        report("finetune (projector)", visual_tokens, meter, b, stage_flops(shape, PlannedStage.FINETUNE, w),
               estimate_memory(shape, PlannedStage.FINETUNE, w, precision).total, peak,
               f"{b * sequence / meter.seconds:.0f} seq tokens/s; {len(stamps)} steps")

    for b in batches(PlannedStage.FINETUNE, args.finetune_batch):
        guarded("finetune", visual_tokens, lambda: finetune(b))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(FAMILY_SIZES), default="llada-v-8b")
    parser.add_argument("--tokens", default="1485,3627", help="visual tokens per image: 1485 and/or 3627")
    parser.add_argument("--probes", type=int, default=6)
    parser.add_argument("--saliency-batch", type=int, default=1)
    parser.add_argument("--relabel-batch", type=int, default=4)
    parser.add_argument("--finetune-batch", type=int, default=1)
    parser.add_argument("--finetune-steps", type=int, default=4)
    parser.add_argument("--max-auto-batch", type=int, default=8, help="cap on the planner-chosen batch measured")
    args = parser.parse_args(argv)
    device = default_device()
    torch.manual_seed(0)
    start = time.perf_counter()
    model, processor, config = build(args.size, device)
    params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    shape = llada_v_shape(config.to_dict())
    print(f"device: {name}; torch {torch.__version__}; model {args.size}: {params / 1e9:.3f} B parameters "
          f"(planner's count {shape.parameters / 1e9:.3f} B), weights {next(model.parameters()).dtype}, attention "
          f"{config._attn_implementation}; built in {time.perf_counter() - start:.1f} s; dense bf16 peak "
          f"{peak / 1e12 if peak else float('nan'):.1f} TFLOP/s", flush=True)
    print(f"{'tokens':>6} {'stage':<26} {'B':>3} {'peak':>10}", flush=True)
    for tokens in (int(t) for t in args.tokens.split(",")):
        run_length(model, processor, config, tokens, args, device, peak)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
