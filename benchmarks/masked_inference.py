"""The DiSP authors' test-time defence (evaluation.maskedInference) against DiSP itself, on the
demo's four backdoors.

    make demo && .venv/bin/python benchmarks/masked_inference.py [WORKDIR] [--ratio 0.3]   # ~5 min on 2 CPU cores

For each compromised model `make demo` left in WORKDIR (default runs/demo), the compromised model
answers the demo's evaluation sets (200 triggered, the same 200 untriggered, 200 clean) with each
input's top-ρ most salient visual tokens masked, saliency scored as the demo's job scores it (its
K, probes, seed and decoding; on the input's own prompt) — no fine-tune. Printed beside the demo
run's own figures (read from its metrics.json): ASR and clean performance of the compromised model
as is, of the purified model (DiSP), and of the compromised model through masked inference, plus
the seconds each evaluation took (masked inference pays a saliency pass per input on every query;
DiSP pays once, at purification).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from demo_runs import SCENARIOS, demo_run, pct
from disp_api import PurificationMetrics
from disp_runner.disp.saliency import SaliencyConfig
from disp_runner.evaluation import MaskedInference, evaluate_model
from disp_runner.pipeline.inputs import SpecInput
from disp_runner.pipeline.opening import open_run


def measure(workdir: Path, name: str, ratio: float) -> tuple[PurificationMetrics, object, float]:
    job, _, disp = demo_run(workdir, name)
    resolved = open_run(job, Path(job.spec.output.uri), show_progress=False).resolved
    saliency = job.spec.saliency
    decoding = resolved.evaluation_decoding
    defence = MaskedInference(ratio=ratio, seed=saliency.seed, batch_size=saliency.batch_size,
                              saliency=SaliencyConfig.from_spec(saliency, decoding.block_length))
    model, processor = resolved.model
    sets = [resolved.evaluation_set(spec_input)
            for spec_input in (SpecInput.TRIGGERED, SpecInput.UNTRIGGERED, SpecInput.CLEAN)]
    start = time.perf_counter()
    masked = evaluate_model(model, processor, f"{name} masked", resolved.evaluation_attack, *sets, decoding,
                            show_progress=False, masked_inference=defence)
    return disp, masked, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default="runs/demo")
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args(argv)
    rows = []
    for name in SCENARIOS:
        rows.append((name, *measure(Path(args.workdir), name, args.ratio)))
        print(f"{name}: done", flush=True)
    print(f"\nmasked inference at rho {args.ratio:g} vs DiSP (demo runs in {args.workdir})")
    print(f"{'scenario':<25} {'ASR':>8} {'ASR':>8} {'ASR':>8} {'clean':>8} {'clean':>8} {'clean':>8} {'eval s':>8} "
          f"{'eval s':>8}")
    print(f"{'':<25} {'before':>8} {'DiSP':>8} {'masked':>8} {'before':>8} {'DiSP':>8} {'masked':>8} {'DiSP':>8} "
          f"{'masked':>8}")
    for name, disp, masked, seconds in rows:
        print(f"{name:<25} {pct(disp.asr_before):>8} {pct(disp.asr_after):>8} {pct(masked.asr_triggered):>8} "
              f"{pct(disp.clean_performance_before):>8} {pct(disp.clean_performance_after):>8} "
              f"{pct(masked.clean_performance):>8} {disp.after.seconds:8.1f} {seconds:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
