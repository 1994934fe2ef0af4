"""`spec.profile: authors` against this project's defaults, and the authors' test-time defence
(masked inference) beside both, on the demo's four backdoors.

    make demo && .venv/bin/python benchmarks/authors_profile.py [WORKDIR]   # ~15 min on 2 CPU cores

For each compromised model `make demo` left in WORKDIR (default runs/demo): the demo's own DiSP
run (default profile; its figures read from its run folder), DiSP again with `profile: authors`
(the authors' fixed purification prompt, their decoding stop rule, shared probe draws, empty
answers kept, chat-turn fine-tune labels and length-grouped batches; every other setting as the
demo's manifest), and the compromised model answering the same evaluation
sets through masked inference at rho 0.3 with the demo's saliency settings (no fine-tune). Printed:
ASR after and retention of each, and the seconds of every stage of both DiSP runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from demo_runs import SCENARIOS, demo_manifest, demo_run, pct, run
from disp_api import StageName
from disp_runner.pipeline.artifacts import RunLayout, read_stage_manifest
from masked_inference import measure

STAGES = (StageName.SALIENCY, StageName.MASKING, StageName.RELABEL, StageName.FINETUNE, StageName.EVALUATE)


def stage_seconds(layout: RunLayout) -> list[float]:
    return [read_stage_manifest(layout.stage_dir(stage))["seconds"] for stage in STAGES]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default="runs/demo")
    parser.add_argument("--ratio", type=float, default=0.3, help="masked inference's rho")
    args = parser.parse_args(argv)
    root = Path(args.workdir)
    scratch = Path(tempfile.mkdtemp(prefix="disp-authors-"))
    rows = []
    for name in SCENARIOS:
        _, default_layout, default = demo_run(root, name)
        document = demo_manifest(root, name, scratch)
        document["spec"]["profile"] = "authors"
        authors, authors_layout = run(document, scratch)
        _, masked, masked_seconds = measure(root, name, args.ratio)
        rows.append((name, default, authors, masked, stage_seconds(default_layout), stage_seconds(authors_layout),
                     masked_seconds))
        print(f"{name}: done", flush=True)

    print(f"\nDiSP with the default profile vs profile: authors, and masked inference (rho {args.ratio:g}), "
          f"demo runs in {root}")
    print(f"{'scenario':<25} {'ASR':>7} {'ASR after':>9} {'ASR after':>9} {'ASR':>7} {'retention':>9} "
          f"{'retention':>9} {'clean':>7}")
    print(f"{'':<25} {'before':>7} {'default':>9} {'authors':>9} {'masked':>7} {'default':>9} {'authors':>9} "
          f"{'masked':>7}")
    for name, default, authors, masked, *_ in rows:
        masked_retention = (masked.clean_performance / default.clean_performance_before
                            if default.clean_performance_before else None)
        print(f"{name:<25} {pct(default.asr_before):>7} {pct(default.asr_after):>9} {pct(authors.asr_after):>9} "
              f"{pct(masked.asr_triggered):>7} {pct(default.retention):>9} {pct(authors.retention):>9} "
              f"{pct(masked_retention):>7}")
    print("\nseconds per stage (default / authors); masked inference's own evaluation of the three sets")
    print(f"{'scenario':<25} " + " ".join(f"{stage.value:>15}" for stage in STAGES) + f" {'masked eval':>12}")
    for name, _, _, _, default_s, authors_s, masked_s in rows:
        cells = " ".join(f"{d:7.1f}/{a:<7.1f}" for d, a in zip(default_s, authors_s))
        print(f"{name:<25} {cells} {masked_s:12.1f}")
    print(f"\nruns: {scratch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
