"""A second DiSP round on the purified model: for each scenario `make demo` left in WORKDIR (default
runs/demo), the demo's manifest runs again with `model.uri` set to the demo's purified model, so
saliency, masking and relabel start from round 1's model and the fine-tune continues it. The table
gives round 1's figures (the demo's run) beside round 2's, with the audit's residual rate of each.

    .venv/bin/python benchmarks/second_round.py [WORKDIR] [--only NAME,NAME]

Round 2's "ASR before" is round 1's purified model measured again by round 2's evaluate stage.
Round 2's audit recomputes its suspects on round 1's model. About 1 minute a scenario on the 2-core
CPU machine. Prints figures, never asserts; docs/results.md quotes it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from demo_runs import SCENARIOS, demo_manifest, demo_run, pct, run

from disp_api.spec import PURIFIED_MODEL_PATH


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default="runs/demo")
    parser.add_argument("--only", default=None, help="comma-separated scenario names (default: all four)")
    args = parser.parse_args()
    root = Path(args.workdir)
    scratch = Path(tempfile.mkdtemp(prefix="disp-second-round-"))
    chosen = args.only.split(",") if args.only else list(SCENARIOS)
    print(f"{'scenario':<25} {'round':>5} {'ASR before':>10} {'ASR after':>10} {'clean before':>12} "
          f"{'clean after':>11} {'residual':>16}")
    for name in chosen:
        _, layout, first = demo_run(root, name)
        document = demo_manifest(root, name, scratch)
        document["spec"]["model"]["uri"] = str(layout.root / PURIFIED_MODEL_PATH)
        second, _ = run(document, scratch)
        for round_number, metrics in ((1, first), (2, second)):
            residual = (f"{pct(metrics.residual_rate)} of {metrics.audit.residual_sample}"
                        if metrics.audit and metrics.audit.residual_sample else "—")
            print(f"{name:<25} {round_number:>5} {pct(metrics.asr_before):>10} {pct(metrics.asr_after):>10} "
                  f"{pct(metrics.clean_performance_before):>12} {pct(metrics.clean_performance_after):>11} "
                  f"{residual:>16}", flush=True)


if __name__ == "__main__":
    main()
