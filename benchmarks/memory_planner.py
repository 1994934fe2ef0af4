"""The memory planner against measured peaks on a CPU: saliency, relabel (exact and prefix-cached)
and the projector fine-tune of the ~120 M LLaDA-V-shaped configuration at 1,485 and 3,627 visual
tokens, each run in a fresh process whose peak resident memory (ru_maxrss) is compared with
disp_api.planning's estimate of the same batch.

    .venv/bin/python benchmarks/memory_planner.py [--size llada-v-100m] [--batch 2] [--tokens 1485,3627]
    .venv/bin/python benchmarks/memory_planner.py --compare benchmarks/results/gpu_scale-h100.txt

Prints one row per stage and length: measured peak RSS, the estimate, their ratio, and the
estimate's largest terms. A process that only imports and builds the model is measured too: its
peak is the weights plus what the interpreter and libraries hold (the planner's RUNTIME_BYTES_CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
from pathlib import Path

STAGES = ("build only", "saliency", "relabel", "relabel (prefix cache)", "finetune")
# Also a child stage (`--child "finetune (checkpointed)" 3627`), not in the table: with activation
# checkpointing the tensors the fine-tune keeps shrink 11-fold (tests/runner/test_planning.py), but
# the CPU's peak RSS barely moves (3.3 against 3.1-3.7 GiB without): glibc keeps the freed heap
# of the recomputed layers, so RSS does not measure what the planner counts there.
GEN = 32


def child(size: str, stage: str, tokens: int, batch: int) -> dict:
    import torch

    from bench_stages import build_llada_v_on
    from gpu_scale import IMAGES
    from disp_api import DecodingCache
    from disp_runner.data.synthetic import generate_instances
    from disp_runner.diffusion.decoding import DecodingConfig
    from disp_runner.diffusion.inference import generate_responses
    from disp_runner.diffusion.training import TrainableParts, TrainingConfig, train_masked_diffusion
    from disp_runner.disp.saliency import SaliencyConfig, fisher_jacobian_scores
    from disp_api.model_shapes import llada_v_shape
    from disp_api.planning import PlannedStage, Precision, Workload, estimate_memory

    torch.manual_seed(0)
    device = torch.device("cpu")
    model, processor = build_llada_v_on(size, device)
    model.eval()
    width, height = IMAGES[tokens]
    instances = [inst.replace(image=inst.image.resize((width, height)), response="a red square in the middle")
                 for inst in generate_instances(batch, seed=tokens, image_size=64)]
    prompts = processor.encode(instances, GEN, with_response=False)
    shape = llada_v_shape(model.config.to_dict())
    work = Workload(batch=batch, sequence=int(prompts.input_ids.shape[1]), answer=GEN,
                    views=int(prompts.pixel_values.shape[1]), trainable_parameters=shape.projector_parameters)
    planned = {"saliency": PlannedStage.SALIENCY, "relabel": PlannedStage.RELABEL,
               "relabel (prefix cache)": PlannedStage.RELABEL_CACHED, "finetune": PlannedStage.FINETUNE,
               "finetune (checkpointed)": PlannedStage.FINETUNE}.get(stage)
    checkpointed = stage == "finetune (checkpointed)"
    work = dataclasses.replace(work, checkpointing=checkpointed)
    if stage == "saliency":
        fisher_jacobian_scores(model, prompts, GEN, SaliencyConfig(probes=6, block_length=GEN),
                               torch.Generator().manual_seed(0))
    elif stage.startswith("relabel"):
        cache = DecodingCache.PREFIX if "cache" in stage else DecodingCache.NONE
        generate_responses(model, processor, instances, dataclasses.replace(DecodingConfig.single_block(GEN), cache=cache),
                           batch_size=batch, show_progress=False)
    elif stage.startswith("finetune"):
        train_masked_diffusion(model, processor.encode(instances, GEN), processor.mask_token_id,
                               TrainingConfig(epochs=1, batch_size=batch, trainable=TrainableParts.PROJECTOR,
                                              activation_checkpointing=checkpointed), show_progress=False)
    estimate = estimate_memory(shape, planned, work, Precision.for_device("cpu")) if planned else None
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "sequence": work.sequence,
            "estimate": estimate.total if estimate else None, "describe": estimate.describe() if estimate else "",
            "weights": shape.parameters * 4}


def compare(report: Path) -> int:
    """The planner's estimates for the batches a recorded GPU run (benchmarks/gpu_scale.sh output)
    measured, beside the measured peaks. Saliency rows carry a second estimate for a model whose
    weights require gradients (as the run that produced results/gpu_scale-h100.txt had at 1,485
    tokens, before saliency froze them itself)."""
    import re

    from bench_stages import LLADA_V_8B
    from disp_api.model_shapes import llada_v_shape
    from disp_api.planning import (PlannedStage, Precision, Workload, estimate_memory,
                                      saved_bytes_per_token_layer)

    shape, precision = llada_v_shape(LLADA_V_8B), Precision.for_device("cuda")
    stages = {"saliency": PlannedStage.SALIENCY, "relabel (prefix cache)": PlannedStage.RELABEL_CACHED,
              "relabel": PlannedStage.RELABEL, "finetune": PlannedStage.FINETUNE}
    geometry = {1485: (1565, 2), 3627: (3707, 7)}  # sequence (prompt + 32 answer positions), views
    row = re.compile(r"\s*(\d+) (saliency|relabel \(prefix cache\)|relabel|finetune)\S*(?: \([^)]*\))?\s+(\d+)\s+([\d.]+) GiB")
    print(f"planner vs {report}")
    for line in report.read_text().splitlines():
        match = row.match(line)
        if not match:
            continue
        tokens, stage, batch, peak = int(match[1]), stages[match[2]], int(match[3]), float(match[4]) * 2**30
        sequence, views = geometry[tokens]
        work = Workload(batch=batch, sequence=sequence, answer=32, views=views,
                        trainable_parameters=shape.projector_parameters)
        estimate = estimate_memory(shape, stage, work, precision).total
        extra = ""
        if stage is PlannedStage.SALIENCY:
            kept = (batch * sequence * shape.layers * (saved_bytes_per_token_layer(shape, precision, 0, True)
                                                       - saved_bytes_per_token_layer(shape, precision)))
            extra = f"   weights requiring gradients: {(estimate + kept) / 2**30:6.2f} GiB (x{(estimate + kept) / peak:.2f})"
        print(f"{tokens:>6} {stage.value:<24} B={batch:<2} measured {peak / 2**30:6.2f} GiB  estimate "
              f"{estimate / 2**30:6.2f} GiB (x{estimate / peak:.2f}){extra}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="llada-v-100m")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--tokens", default="1485,3627")
    parser.add_argument("--compare", type=Path, help="a gpu_scale.sh report: the planner's estimates of its batches")
    parser.add_argument("--child", nargs=2, metavar=("STAGE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compare:
        return compare(args.compare)
    if args.child:
        print(json.dumps(child(args.size, args.child[0], int(args.child[1]), args.batch)))
        return 0
    print(f"model {args.size}, batch {args.batch}, fp32 on the CPU; peak RSS of a fresh process per row")
    worst = 0.0
    for tokens in (int(t) for t in args.tokens.split(",")):
        for stage in STAGES:
            out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--size", args.size, "--batch",
                                  str(args.batch), "--child", stage, str(tokens)], capture_output=True, text=True)
            if out.returncode:
                print(f"{tokens:>6} {stage:<24} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            peak = row["peak"] / 2**30
            if row["estimate"] is None:
                print(f"{tokens:>6} {stage:<24} L={row['sequence']:>5} peak {peak:6.2f} GiB "
                      f"(weights {row['weights'] / 2**30:.2f} GiB: runtime {peak - row['weights'] / 2**30:.2f} GiB)")
                continue
            ratio = row["estimate"] / row["peak"]
            worst = max(worst, abs(ratio - 1))
            print(f"{tokens:>6} {stage:<24} L={row['sequence']:>5} peak {peak:6.2f} GiB  estimate "
                  f"{row['estimate'] / 2**30:6.2f} GiB  ratio {ratio:.2f}   [{row['describe']}]", flush=True)
    print(f"largest deviation of the estimate from the measured peak: {100 * worst:.0f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
