"""The audit's evidence and `relabel.scope` on the demo's four scenarios: for each compromised
model `make demo` left in WORKDIR (default runs/demo), DiSP runs twice, relabeling every instance
(the paper) and only the audit's suspects, and the table gives the audit's figures against the
ground truth the attack kit wrote, then ASR after and retention for both scopes.

    .venv/bin/python benchmarks/audit_and_scope.py [WORKDIR]

Each scenario reuses the demo's manifest (runs/demo/jobs/NAME.yaml) with its output moved to a
temporary folder; the saliency and masking outputs of the first run are copied into the second,
whose spec differs only after them. About 2 minutes a scenario on the 2-core CPU machine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

from demo_runs import SCENARIOS, demo_manifest, pct, run


def main(workdir: str = "runs/demo") -> None:
    root = Path(workdir)
    scratch = Path(tempfile.mkdtemp(prefix="disp-scope-"))
    rows = []
    for name in SCENARIOS:
        document = demo_manifest(root, name, scratch)
        start = time.perf_counter()
        paper, layout = run(document, scratch)
        document["spec"]["relabel"]["scope"] = "suspects"
        selective, _ = run(document, scratch, seed_from=layout)
        rows.append((name, paper, selective, time.perf_counter() - start))
        print(f"{name}: {time.perf_counter() - start:.0f}s", flush=True)
    print()
    print(f"{'scenario':<25} {'true share':>10} {'est. share':>10} {'AUROC':>7} {'precision':>9} "
          f"{'residual':>9} {'ASR after':>10} {'ASR after':>10} {'retention':>10} {'retention':>10}")
    print(f"{'':<25} {'':>10} {'':>10} {'':>7} {'':>9} {'':>9} {'all':>10} {'suspects':>10} {'all':>10} "
          f"{'suspects':>10}")
    for name, paper, selective, _ in rows:
        audit = paper.audit
        print(f"{name:<25} {pct(audit.true_poisoned_share):>10} {pct(audit.estimated_poisoned_share):>10} "
              f"{audit.detector_auroc if audit.detector_auroc is not None else '—':>7} "
              f"{pct(audit.detector_precision):>9} {pct(audit.residual_rate):>9} {pct(paper.asr_after):>10} "
              f"{pct(selective.asr_after):>10} {pct(paper.retention):>10} {pct(selective.retention):>10}")
    print(json.dumps({name: {"all": p.model_dump(mode="json", by_alias=True, exclude={"before", "after"}),
                             "suspects": s.model_dump(mode="json", by_alias=True, exclude={"before", "after"})}
                      for name, p, s, _ in rows}, indent=1), file=open(scratch / "results.json", "w"))
    print(f"\nfull figures: {scratch / 'results.json'}")


if __name__ == "__main__":
    main(*sys.argv[1:])
