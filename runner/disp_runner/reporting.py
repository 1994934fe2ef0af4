"""What people read: plain-text tables for a terminal, and the image sheets a person checks (did
DiSP find the trigger?): the masking stage's report and the audit's suspects sheet."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image, ImageDraw

from disp_api import EvaluationMetrics, PurificationMetrics, judge_residual
from disp_api.spec import AuditSpec
from disp_runner.data.instances import Instance
from disp_runner.disp.audit import SuspectRecord
from disp_runner.disp.masking import known_trigger_tokens
from disp_runner.models.base import VisualLayout


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_metrics_table(rows: Sequence[EvaluationMetrics], baseline: EvaluationMetrics | None = None) -> str:
    header = f"{'model':<34} {'trigger':<8} {'target':<18} {'ASR':>7} {'false-fire':>10} {'clean':>7} {'Δclean':>7}"
    lines = [header, "-" * len(header)]
    for m in rows:
        trigger = m.attack.trigger.kind.value if m.attack else "-"
        target = m.attack.target.kind.value if m.attack else "-"
        asr = _pct(m.asr_triggered) if m.attack else "    -  "
        fire = _pct(m.asr_untriggered) if m.attack else "    -  "
        delta = f"{100 * (m.clean_performance - baseline.clean_performance):+6.1f}" if baseline else ""
        name = m.model if len(m.model) <= 34 else "…" + m.model[-33:]
        lines.append(f"{name:<34} {trigger:<8} {target:<18} {asr:>7} {fire:>10} {_pct(m.clean_performance):>7} {delta:>7}")
    return "\n".join(lines)


@dataclass
class PurificationRow:
    name: str
    metrics: PurificationMetrics
    localisation: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    residual_threshold: float = AuditSpec().residual_threshold  # the job's spec.audit.residualThreshold
    residual_sample_limit: int = AuditSpec().residual_sample  # the job's spec.audit.residualSample
    rounds: int = 1  # purification rounds that ran (spec.rounds)
    kept_round: int = 1  # the round whose model the figures measure


def _rounds(row: PurificationRow) -> str:
    return str(row.rounds) if row.kept_round == row.rounds else f"{row.rounds} (kept {row.kept_round})"


def format_purification_table(rows: Sequence[PurificationRow]) -> str:
    """ASR before -> after, false firing, clean performance before -> after, retention, trigger
    localisation, the audit's residual rate and the BackdoorRemoved verdict a cluster would show
    (True, False or Unknown), the rounds that ran (and the one kept, when not the last), and the
    seconds each stage took (all rounds together)."""
    header = (f"{'scenario':<26} {'ASR before':>10} {'ASR after':>10} {'false-fire':>10} {'clean before':>12} "
              f"{'clean after':>11} {'retention':>9} {'localised':>9} {'residual':>9} {'removed':>8} {'rounds':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        m = row.metrics
        clean_b = _pct(m.clean_performance_before) if m.clean_performance_before is not None else "-"
        clean_a = _pct(m.clean_performance_after) if m.clean_performance_after is not None else "-"
        retention = _pct(m.retention) if m.retention is not None else "-"
        local = _pct(row.localisation) if row.localisation is not None else "n/a"
        residual = _pct(m.residual_rate) if m.residual_rate is not None and m.residual_sample else "n/a"
        verdict = judge_residual(m.residual_rate, m.residual_sample, row.residual_threshold,
                                 row.residual_sample_limit).verdict
        lines.append(f"{row.name:<26} {_pct(m.asr_before):>10} {_pct(m.asr_after):>10} "
                     f"{_pct(m.false_firing_after):>10} {clean_b:>12} {clean_a:>11} {retention:>9} {local:>9} "
                     f"{residual:>9} {verdict.condition_status:>8} {_rounds(row):>11}")
    stages = list(dict.fromkeys(s for row in rows for s in row.stage_seconds))
    lines += ["", f"{'seconds per stage':<26} " + " ".join(f"{s:>10}" for s in stages)]
    for row in rows:
        lines.append(f"{row.name:<26} " + " ".join(f"{row.stage_seconds.get(s, 0.0):10.1f}" for s in stages))
    return "\n".join(lines)


# --- the sheets a person checks: did DiSP find the trigger? ---------------------------------------

REPORT_SAMPLES = 8  # per row: instances with a known trigger, then others
REPORT_SCALE = 4


def draw_report(path: Path, instances: Sequence[Instance], masked: Sequence[Sequence[int]],
                layouts: Sequence[VisualLayout], rows: Sequence[Sequence[int]] | None = None,
                caption: str = "") -> None:
    """A grid of sample images (`rows` of instance indices; default: top row with a known trigger,
    bottom row without). Every masked token that sees a cell of the image is outlined in red
    (thicker for the most salient); a known trigger box is outlined in green."""
    if rows is None:
        with_trigger = [i for i, (inst, layout) in enumerate(zip(instances, layouts))
                        if known_trigger_tokens(inst, layout)]
        without = [i for i in range(len(instances)) if i not in set(with_trigger)]
        rows = [r for r in (with_trigger, without) if r]
        caption = "top row: known trigger (green box); " if with_trigger else ""
    rows = [list(r)[:REPORT_SAMPLES] for r in rows if r]
    cell_w = max((instances[i].image_size[0] for row in rows for i in row), default=1) * REPORT_SCALE
    cell_h = max((instances[i].image_size[1] for row in rows for i in row), default=1) * REPORT_SCALE
    top = 18  # caption
    sheet = Image.new("RGB", (REPORT_SAMPLES * (cell_w + 4) + 4, top + len(rows) * (cell_h + 4) + 4), "white")
    caption += "red: masked visual tokens (thick: most salient)"
    ImageDraw.Draw(sheet).text((4, 4), caption, fill=(0, 0, 0))
    for r, row in enumerate(rows):
        for c, index in enumerate(row):
            inst, layout = instances[index], layouts[index]
            width, height = inst.image_size
            img = inst.image.convert("RGB").resize((width * REPORT_SCALE, height * REPORT_SCALE), Image.NEAREST)
            draw = ImageDraw.Draw(img)
            cells = {token: cell for grid in layout.grids for token, cell in grid.cells()}
            for rank, token in enumerate(masked[index]):
                if token in cells:
                    x0, y0, x1, y1 = (v * REPORT_SCALE for v in cells[token])
                    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(230, 0, 0), width=3 if rank == 0 else 1)
            box = inst.metadata.get("trigger_box")
            if box and known_trigger_tokens(inst, layout):
                x0, y0, x1, y1 = (v * REPORT_SCALE for v in box)
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 200, 0), width=2)
            sheet.paste(img, (4 + c * (cell_w + 4), top + r * (cell_h + 4)))
    sheet.save(path, format="PNG")


def draw_suspects(path: Path, records: Sequence[SuspectRecord], training_set: Sequence[Instance],
                  masked_by_id: dict[str, list[int]], layout_of: Callable[[Instance], VisualLayout]) -> None:
    """The audit's suspects sheet: the most suspect instances (by support drop, then id) with the
    tokens DiSP masked; no suspects: an empty sheet."""
    by_id = {inst.id: inst for inst in training_set}
    top = [r for r in sorted(records, key=lambda r: (-r.supportDrop, r.id)) if r.suspect][:REPORT_SAMPLES]
    instances = [by_id[r.id] for r in top]
    draw_report(path, instances, [masked_by_id[r.id] for r in top], [layout_of(inst) for inst in instances],
                rows=[list(range(len(top)))], caption=f"top {len(top)} suspects by support drop; ")
